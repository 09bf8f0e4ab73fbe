"""Transparent mode (install, loop_factory, `python -m smcish run`), sock=, stats and `smcish stat`."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import subprocess
import textwrap
import time
import warnings

import pytest

import smcish
from benchmarks.children import spawn_python
from conftest import PYTHON, new_loop, program, python_env

HOST = "127.0.0.1"


async def stock_echo_roundtrip():
    """Unchanged asyncio code: the loop decides whether it is accelerated."""
    async def handle(reader, writer):
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, HOST, 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(HOST, port)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        info = writer.get_extra_info("smcish")
        writer.close()
        await writer.wait_closed()
        return info


def test_install_accelerates_stock_calls(loop_kind):
    loop = new_loop(loop_kind)
    try:
        smcish.install(loop)
        smcish.install(loop)                    # idempotent
        info = loop.run_until_complete(stock_echo_roundtrip())
        assert info is not None and info.mode == "ism", info
    finally:
        loop.close()


def test_loop_factory_with_runner(loop_kind):
    base = None
    if loop_kind == "uvloop":
        import uvloop

        base = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=smcish.loop_factory(base)) as runner:
        info = runner.run(stock_echo_roundtrip())
    assert info.mode == "ism"


def test_uninstalled_loop_is_untouched(loop_kind):
    loop = new_loop(loop_kind)
    try:
        assert loop.run_until_complete(stock_echo_roundtrip()) is None
    finally:
        loop.close()


def test_unix_sockets_pass_through(loop_kind, tmp_path):
    path = str(tmp_path / "s.sock")

    async def main():
        async def handle(reader, writer):
            writer.write(await reader.readexactly(3))
            writer.close()

        server = await asyncio.start_unix_server(handle, path)
        async with server:
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"abc")
            assert await reader.readexactly(3) == b"abc"
            assert writer.get_extra_info("smcish") is None
            writer.close()

    loop = smcish.install(new_loop(loop_kind))
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


SCRIPT = textwrap.dedent('''
    import asyncio, json, sys

    async def main():
        async def handle(reader, writer):
            writer.write(await reader.readexactly(4))
            await writer.drain()
            writer.close()
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            info = writer.get_extra_info("smcish")
            print(json.dumps({"mode": info.mode if info else None, "argv": sys.argv[1:]}))
            writer.close()

    if sys.argv[1] == "uvloop":
        import uvloop
        uvloop.run(main())
    else:
        asyncio.run(main())
''')


@pytest.mark.parametrize("runner", ["asyncio", "uvloop"])
def test_python_m_smcish_run_unchanged_program(tmp_path, runner):
    script = tmp_path / "prog.py"
    script.write_text(SCRIPT)
    out = subprocess.run([PYTHON, "-m", "smcish", "run", str(script), runner, "extra"],
                         env=python_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"mode": "ism", "argv": [runner, "extra"]}
    plain = subprocess.run([PYTHON, str(script), runner], env=python_env(), capture_output=True,
                           text=True, timeout=60)
    assert json.loads(plain.stdout.strip().splitlines()[-1])["mode"] is None


def test_socket_connected_before_smcish_saw_it_stays_tcp(loop_kind):
    """A socket the caller connected by itself reached the server unclaimed: the server took it
    as plain TCP at accept, so the client must not claim it afterwards; the bytes flow over TCP."""
    async def main():
        async def handle(reader, writer):
            writer.write(await reader.readexactly(3))
            await writer.drain()
            writer.close()

        server = await smcish.start_server(handle, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            sock = socket.create_connection((HOST, port))
            sock.setblocking(False)
            reader, writer = await smcish.open_connection(sock=sock)
            writer.write(b"abc")
            assert await asyncio.wait_for(reader.readexactly(3), 5) == b"abc"
            info = writer.get_extra_info("smcish")
            writer.close()
            return info

    loop = new_loop(loop_kind)
    try:
        info = loop.run_until_complete(main())
    finally:
        loop.close()
    assert info.mode == "tcp" and info.reason is smcish.DeclineReason.PEER_NOT_ADVERTISED, info


def test_stats_count_connections_and_bytes(loop_kind):
    async def main():
        before = smcish.stats()

        async def handle(reader, writer):
            writer.write(await reader.readexactly(1000))
            await writer.drain()
            await reader.read()            # hold our end open until the client's EOF
            writer.close()

        server = await smcish.start_server(handle, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await smcish.open_connection(HOST, port)
            writer.write(b"x" * 1000)
            await reader.readexactly(1000)
            live = smcish.stats()["live"]
            writer.write_eof()
            await reader.read()
            writer.close()
            await writer.wait_closed()
            _, w2 = await smcish.open_connection(HOST, port, negotiate="never")
            w2.close()
        await asyncio.sleep(0.05)
        after = smcish.stats()
        return before, live, after

    loop = new_loop(loop_kind)
    try:
        before, live, after = loop.run_until_complete(main())
    finally:
        loop.close()
    assert live >= 2                                       # both ends, same process
    assert after["connections_ism"] - before["connections_ism"] == 2
    assert after["bytes_sent"] - before["bytes_sent"] >= 2000
    assert after["fallbacks"].get("DISABLED_BY_POLICY", 0) > before["fallbacks"].get("DISABLED_BY_POLICY", 0)


def test_stat_command_lists_other_processes(tmp_path):
    with spawn_python(script=program("stat_holder.py"), env=python_env(), handshake="ready") as proc:
        port = int(proc.hello.split()[1])
        out = subprocess.run([PYTHON, "-m", "smcish", "stat", "--json", "--connections"], env=python_env(),
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        rows = [r for r in json.loads(out.stdout) if r.get("pid") == proc.pid]
        assert {r["role"] for r in rows} == {"client", "server"}, rows
        assert all(r["mode"] == "ism" for r in rows)
        client = next(r for r in rows if r["role"] == "client")
        assert client["peer"] == f"{HOST}:{port}" and client["bytes_sent"] == 12345
        proc.close_stdin()
        proc.wait(10)


def test_unclosed_transport_warns(loop_kind):
    """An ISM connection left unclosed warns like the loop's own transports, once: collected
    after its loop closed, the loop's TCP transport underneath says so, and SmcTransport adds no
    second warning (tests/test_parity.py compares the whole set with plain asyncio)."""
    async def main():
        server = await smcish.start_server(lambda r, w: None, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await smcish.create_connection(asyncio.Protocol, HOST, port)
        assert transport.get_extra_info("smcish").mode == "ism"
        for _ in range(100):                  # the optimistic set-up answered (bounded wait)
            if transport._setup is None:
                break
            await asyncio.sleep(0.01)
        server.close()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop = new_loop(loop_kind)
        loop.run_until_complete(main())
        loop.close()          # drops the loop's references to the TCP transport (and ours)
        del loop
        for _ in range(20):   # device threads may hold a reference for a moment after a request
            gc.collect()
            if any("unclosed" in str(w.message) for w in caught):
                break
            time.sleep(0.05)
    messages = [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]
    assert any("unclosed" in m and "Transport" in m for m in messages), messages
    assert not any("SmcTransport" in m for m in messages), messages


def test_caller_connected_socket_on_installed_loop_uses_shared_memory(loop_kind):
    """aiohttp's connector: loop.sock_connect() then create_connection(sock=). The patched
    sock_connect claims the connection before connecting, so the server waits for the proposal."""
    async def main():
        async def handle(reader, writer):
            writer.write(await reader.readexactly(3))
            await writer.drain()
            writer.close()

        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(handle, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, (HOST, port))
            reader = asyncio.StreamReader()
            transport, _ = await loop.create_connection(
                lambda: asyncio.StreamReaderProtocol(reader), sock=sock)
            transport.write(b"abc")
            assert await reader.readexactly(3) == b"abc"
            info = transport.get_extra_info("smcish")
            transport.close()
            return info

    loop = smcish.install(new_loop(loop_kind))
    try:
        info = loop.run_until_complete(main())
    finally:
        loop.close()
    assert info.mode == "ism", info


def test_sendfile_over_smcish_transport(loop_kind, tmp_path):
    """loop.sendfile() (aiohttp's FileResponse) on both paths: the fallback copy works."""
    data = os.urandom(300_000)
    src = tmp_path / "f.bin"
    src.write_bytes(data)

    unsupported = []

    async def main(kw):

        async def handle(reader, writer):
            try:
                with open(src, "rb") as f:
                    await asyncio.get_running_loop().sendfile(writer.transport, f)
            except NotImplementedError:         # uvloop has no loop.sendfile (aiohttp copes)
                unsupported.append(True)
            writer.close()

        server = await smcish.start_server(handle, HOST, 0, **kw)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await smcish.open_connection(HOST, port, **kw)
            body = await reader.read()
            mode = writer.get_extra_info("smcish").mode
            writer.close()
            return body, mode

    for kw, mode in (({}, "ism"), ({"device": "none"}, "tcp")):
        loop = new_loop(loop_kind)
        try:
            body, got_mode = loop.run_until_complete(main(kw))
        finally:
            loop.close()
        if unsupported:
            pytest.skip(f"{loop_kind} has no loop.sendfile()")
        assert got_mode == mode and body == data


@pytest.mark.parametrize("use", ["thread_sendall", "connect_accepted_socket"])
def test_preclaimed_socket_used_behind_smcish_back_loses_nothing(loop_kind, use):
    """A socket connected with the patched sock_connect (a claim made before the connect) that
    the application then writes without smcish seeing it: from a thread with a plain blocking
    sendall (more than the 256 KiB a server holds while it waits for the client's final word),
    or wrapped with connect_accepted_socket. Every byte arrives in order, on TCP. Before: the
    server reset the connection past 256 KiB (the sender's sendall had succeeded; the server's
    application got nothing), and connect_accepted_socket waited for the claim's timer."""
    n = 400_000
    payload = bytes(i * 7 % 251 for i in range(n))

    async def main():
        loop = asyncio.get_running_loop()
        got = bytearray()
        done = loop.create_future()
        infos = []

        class Sink(asyncio.Protocol):
            def connection_made(self, transport):
                infos.append(transport.get_extra_info("smcish"))

            def data_received(self, data):
                got.extend(data)
                if len(got) >= n and not done.done():
                    done.set_result(None)

            def connection_lost(self, exc):
                if not done.done():
                    done.set_exception(ConnectionError(f"lost after {len(got)} bytes: {exc!r}"))

        server = await loop.create_server(Sink, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, (HOST, port))
            if use == "thread_sendall":
                def send():
                    sock.setblocking(True)
                    sock.sendall(payload)
                await loop.run_in_executor(None, send)
                transport = None
            else:
                transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, sock)
                transport.write(payload)
            await asyncio.wait_for(done, 15)
            if transport is not None:
                transport.close()
            sock.close()
        assert bytes(got) == payload
        assert infos and infos[0].mode == "tcp", infos

    loop = new_loop(loop_kind)
    try:
        smcish.install(loop)
        loop.run_until_complete(main())
    finally:
        loop.close()
