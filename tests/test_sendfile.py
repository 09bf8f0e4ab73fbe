"""loop.sendfile() on smcish transports: the kernel's sendfile(2) on a fallen-back connection (as
plain asyncio), pread straight into the ring on shared memory; every byte checked by sha256."""

from __future__ import annotations

import asyncio
import hashlib
import os

import pytest

import smcish

_SIZE = 48 * 1024 * 1024 + 12345          # not a multiple of any ring size


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sendfile") / "payload.bin"
    h = hashlib.sha256()
    with open(path, "wb") as f:
        left = _SIZE
        seed = os.urandom(1 << 20)
        i = 0
        while left:
            chunk = hashlib.sha256(i.to_bytes(8, "little")).digest() * 32 + seed
            chunk = chunk[:min(left, len(chunk))]
            f.write(chunk)
            h.update(chunk)
            left -= len(chunk)
            i += 1
    return path, h.hexdigest()


class _Sink(asyncio.Protocol):
    def __init__(self, done: asyncio.Future) -> None:
        self.h = hashlib.sha256()
        self.n = 0
        self.done = done

    def data_received(self, data: bytes) -> None:
        self.h.update(data)
        self.n += len(data)

    def eof_received(self):
        if not self.done.done():
            self.done.set_result((self.n, self.h.hexdigest()))

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("lost before EOF"))


async def _transfer(env, path, offset=0, count=None, head=b""):
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    server = await smcish.create_server(lambda: _Sink(done), "127.0.0.1", 0, **env.kw)
    port = server.sockets[0].getsockname()[1]
    transport, _ = await smcish.create_connection(asyncio.Protocol, "127.0.0.1", port, **env.kw)
    assert transport.get_extra_info("smcish").mode == env.expected_mode
    with open(path, "rb") as f:
        if head:
            transport.write(head)          # written before: must arrive before the file
        sent = await loop.sendfile(transport, f, offset, count)
        position = f.tell()
    transport.write_eof()
    n, digest = await asyncio.wait_for(done, 60)
    transport.close()
    server.close()
    await server.wait_closed()
    return sent, position, n, digest


def test_sendfile_whole_file(env, big_file):
    path, digest = big_file
    if env.loop_kind == "uvloop" and env.path == "tcp":
        # uvloop has no loop.sendfile: smcish's fallback is exactly as uvloop (NotImplementedError).
        async def main():
            loop = asyncio.get_running_loop()
            server = await smcish.create_server(asyncio.Protocol, "127.0.0.1", 0, **env.kw)
            port = server.sockets[0].getsockname()[1]
            transport, _ = await smcish.create_connection(asyncio.Protocol, "127.0.0.1", port, **env.kw)
            with open(path, "rb") as f, pytest.raises(NotImplementedError):
                await loop.sendfile(transport, f)
            transport.close()
            server.close()
        env.run(main())
        return
    sent, position, n, got = env.run(_transfer(env, path), timeout=120)
    assert (sent, position, n) == (_SIZE, _SIZE, _SIZE)
    assert got == digest


def test_sendfile_offset_count_after_write(env, big_file):
    """offset/count honoured, file position after the last byte sent, earlier writes first."""
    if env.loop_kind == "uvloop" and env.path == "tcp":
        pytest.skip("uvloop has no loop.sendfile (checked in test_sendfile_whole_file)")
    path, _ = big_file
    offset, count = 777, 5 * 1024 * 1024 + 3
    head = b"head-" * 1000
    sent, position, n, got = env.run(_transfer(env, path, offset, count, head), timeout=120)
    with open(path, "rb") as f:
        f.seek(offset)
        want = hashlib.sha256(head + f.read(count)).hexdigest()
    assert (sent, position, n) == (count, offset + count, len(head) + count)
    assert got == want


def test_sendfile_fallback_uses_kernel_sendfile(big_file, monkeypatch):
    """On the default loop a fallen-back connection takes the kernel path (os.sendfile), as
    plain asyncio does, not asyncio's Python read/write loop."""
    path, digest = big_file
    calls = []
    real = os.sendfile

    def counting(*args, **kwargs):
        calls.append(args[3] if len(args) > 3 else None)
        return real(*args, **kwargs)

    monkeypatch.setattr(os, "sendfile", counting)

    class E:
        kw = {"device": "none"}
        expected_mode = "tcp"

    loop = asyncio.new_event_loop()
    try:
        sent, _, n, got = loop.run_until_complete(asyncio.wait_for(_transfer(E(), path), 120))
    finally:
        loop.close()
    assert calls, "os.sendfile was never called"
    assert (sent, n, got) == (_SIZE, _SIZE, digest)


def test_sendfile_non_file_falls_back_to_copies(env):
    """A file object without fileno(): asyncio's own chunk loop on the default loop."""
    import io

    if env.loop_kind == "uvloop":
        pytest.skip("uvloop has no loop.sendfile")
    data = os.urandom(3 * 1024 * 1024 + 5)

    async def main():
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        server = await smcish.create_server(lambda: _Sink(done), "127.0.0.1", 0, **env.kw)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await smcish.create_connection(asyncio.Protocol, "127.0.0.1", port, **env.kw)
        sent = await loop.sendfile(transport, io.BytesIO(data))
        transport.write_eof()
        result = await asyncio.wait_for(done, 30)
        transport.close()
        server.close()
        return sent, result

    sent, (n, got) = env.run(main())
    assert (sent, n, got) == (len(data), len(data), hashlib.sha256(data).hexdigest())


def test_sendfile_closed_transport_raises(env, big_file):
    if env.loop_kind == "uvloop" and env.path == "tcp":
        pytest.skip("uvloop has no loop.sendfile")
    path, _ = big_file

    async def main():
        loop = asyncio.get_running_loop()
        server = await smcish.create_server(asyncio.Protocol, "127.0.0.1", 0, **env.kw)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await smcish.create_connection(asyncio.Protocol, "127.0.0.1", port, **env.kw)
        transport.close()
        with open(path, "rb") as f, pytest.raises(RuntimeError, match="closing"):
            await loop.sendfile(transport, f)
        server.close()

    env.run(main())


def test_sendfile_while_optimistic_set_up_falls_through(loop_kind, big_file):
    """sendfile right after connect, the server's loop stalled past the set-up timeout: the
    file fills the send-only ring, the claim is withdrawn, the connection moves to TCP with the
    ring's bytes resent, and the rest of the file follows over TCP: every byte once, in order."""
    from conftest import Env
    from test_optimistic import ThreadServer, sha_echo

    path, digest = big_file
    srv = ThreadServer(loop_kind, sha_echo)
    try:
        async def main():
            loop = asyncio.get_running_loop()
            reader, writer = await smcish.open_connection("127.0.0.1", srv.port)
            writer.write_eof()                           # opens the link group
            await reader.read()
            writer.close()
            srv.stall(3.0)            # well past the 0.3 s set-up timeout, even on a busy machine
            await asyncio.sleep(0.05)
            reader, writer = await smcish.open_connection("127.0.0.1", srv.port,
                                                          handshake_timeout=0.3)
            assert writer.get_extra_info("smcish").mode == "ism"    # optimistic
            with open(path, "rb") as f:
                sent = await asyncio.wait_for(loop.sendfile(writer.transport, f), 60)
                assert f.tell() == _SIZE
            info = writer.get_extra_info("smcish")
            assert info.mode == "tcp", info
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(), 60)
            writer.close()
            return sent, got

        sent, got = Env(loop_kind, "ism").run(main(), timeout=120)
        assert sent == _SIZE
        assert got == b"%d %s\n" % (_SIZE, digest.encode())
    finally:
        srv.close()


def test_write_during_sendfile_raises_as_asyncio(env, big_file):
    """asyncio's transports refuse write() while sendfile runs; so does smcish on shared memory
    (the bytes would land inside the file's)."""
    if env.loop_kind == "uvloop" and env.path == "tcp":
        pytest.skip("uvloop has no loop.sendfile")
    path, _digest = big_file

    async def main():
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        server = await smcish.create_server(lambda: _Sink(done), "127.0.0.1", 0, **env.kw)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await smcish.create_connection(asyncio.Protocol, "127.0.0.1", port, **env.kw)
        assert transport.get_extra_info("smcish").mode == env.expected_mode
        with open(path, "rb") as f:
            task = asyncio.ensure_future(loop.sendfile(transport, f))
            await asyncio.sleep(0)
            errors = []
            for _ in range(50):
                if task.done():
                    break
                try:
                    transport.write(b"X")
                except RuntimeError as exc:
                    errors.append(str(exc))
                await asyncio.sleep(0)
            sent = await task
        transport.write(b"after")                    # allowed again
        transport.write_eof()
        n, got = await asyncio.wait_for(done, 60)
        transport.close()
        server.close()
        return sent, errors, n, got

    sent, errors, n, got = env.run(main(), timeout=120)
    assert errors and all("sendfile is in progress" in e for e in errors), errors
    assert (sent, n) == (_SIZE, _SIZE + 5)
    with open(path, "rb") as f:
        assert got == hashlib.sha256(f.read() + b"after").hexdigest()


def test_writer_after_peer_abort_fails_instead_of_spinning(env):
    """The peer aborts (nothing unread: a clean close) while we have a large write queued: our
    drain() fails with a connection error, as over TCP (EPIPE), and quickly, without burning CPU."""
    import time

    async def main():
        loop = asyncio.get_running_loop()
        made = loop.create_future()

        class Server(asyncio.Protocol):
            def connection_made(self, transport):
                transport.pause_reading()           # read nothing: our writes queue up
                made.set_result(transport)

        server = await smcish.create_server(Server, "127.0.0.1", 0, **env.kw)
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await smcish.open_connection("127.0.0.1", port, **env.kw)
        peer = await asyncio.wait_for(made, 5)
        writer.write(os.urandom(8 << 20))
        await asyncio.sleep(0.05)
        peer.resume_reading()
        peer.abort()
        cpu = time.process_time()
        try:
            for _ in range(20):
                writer.write(b"y" * (1 << 20))
                await asyncio.wait_for(writer.drain(), 5)
            outcome = "no error"
        except (ConnectionError, OSError, RuntimeError) as exc:   # uvloop TCP: RuntimeError
            outcome = type(exc).__name__
        cpu = time.process_time() - cpu
        writer.close()
        server.close()
        assert writer.get_extra_info("smcish").mode == env.expected_mode
        return outcome, cpu

    outcome, cpu = env.run(main(), timeout=60)
    assert outcome != "no error"
    assert cpu < 2.0, cpu
