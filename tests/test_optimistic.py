"""Optimistic (0-RTT) set-up: bytes written before the server answered are never lost.

A client connection is handed to the application before the server has accepted its claim; what
the application writes goes into a send-only ring. If the server then declines (or never answers),
the connection moves to TCP and everything written so far is resent there, in order, before any
later write. These tests force the real reasons: an ismd quota that leaves the server no memory,
and a server whose event loop is stalled past the set-up timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time

import pytest

import smcish
from conftest import Env, new_loop
from device_helpers import Ismd
from smcish.clc import DeclineReason

HOST = "127.0.0.1"
MiB = 1 << 20


async def sha_echo(reader, writer):
    """Read to EOF, answer with the length and sha256 of what arrived."""
    h = hashlib.sha256()
    n = 0
    try:
        while data := await reader.read(1 << 20):
            h.update(data)
            n += len(data)
        writer.write(b"%d %s\n" % (n, h.hexdigest().encode()))
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def payload(n: int, seed: int) -> bytes:
    return (hashlib.sha256(b"%d" % seed).digest() * (n // 32 + 1))[:n]


def expected(data: bytes) -> bytes:
    return b"%d %s\n" % (len(data), hashlib.sha256(data).hexdigest().encode())


# ----------------------------------------------------------------- declined after writing


def test_server_out_of_memory_after_optimistic_writes_resends_over_tcp(loop_kind):
    """ismd's quota lets the server fill one extent with 4 MiB rings and no more: the fifth
    connection is declined (NO_MEMORY) after its client wrote into its ring: all of it arrives."""
    daemon = Ismd("--total-memory", "256M", "--quota", "40M")
    try:
        async def main():
            server = await smcish.start_server(sha_echo, HOST, 0, device=daemon.spec,
                                               ring_size=4 * MiB, max_ring_size=4 * MiB)
            port = server.sockets[0].getsockname()[1]
            async with server:
                before = smcish.stats()
                modes, reasons = [], []
                for i in range(6):
                    data = payload(200_000 + i, i)
                    reader, writer = await smcish.open_connection(HOST, port, device=daemon.spec)
                    writer.write(data[:1000])          # before any answer from the server
                    writer.write(data[1000:])
                    writer.write_eof()
                    got = await asyncio.wait_for(reader.read(), 20)
                    assert got == expected(data), f"connection {i}: {got!r}"
                    info = writer.get_extra_info("smcish")
                    modes.append(info.mode)
                    reasons.append(info.reason)
                    writer.close()
                after = smcish.stats()
            assert modes[:4] == ["ism"] * 4, modes
            assert "tcp" in modes[4:], modes
            assert DeclineReason.NO_MEMORY in [r for m, r in zip(modes, reasons, strict=False) if m == "tcp"]
            assert after["migrations"] > before["migrations"]
            assert after["migrated_bytes"] > before["migrated_bytes"]

        Env(loop_kind, "ism").run(main(), timeout=90)
    finally:
        daemon.stop()


# ----------------------------------------------------------------- a stalled server


class ThreadServer:
    """An smcish server on its own loop in a thread; ``stall(s)`` blocks that loop."""

    def __init__(self, loop_kind: str, handler, **kw) -> None:
        self.loop = new_loop(loop_kind)
        self.ready = threading.Event()
        self.port = 0
        self.kw = kw
        self.handler = handler
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)

        async def start():
            self.server = await smcish.start_server(self.handler, HOST, 0, **self.kw)
            self.port = self.server.sockets[0].getsockname()[1]
            self.ready.set()

        self.loop.run_until_complete(start())
        self.loop.run_forever()

        async def stop():
            self.server.close()
            await self.server.wait_closed()
            await asyncio.sleep(0.05)
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self.loop.run_until_complete(stop())
        self.loop.close()

    def stall(self, seconds: float) -> None:
        self.loop.call_soon_threadsafe(time.sleep, seconds)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(15)
        assert not self.thread.is_alive()


def test_stalled_server_client_withdraws_and_resends_over_tcp(loop_kind):
    """The server's loop is stuck past the client's set-up timeout: the client withdraws its
    claim, moves to TCP with what it wrote, and the server, once back, reads it all over TCP."""
    srv = ThreadServer(loop_kind, sha_echo)
    try:
        async def main():
            # a first connection opens the link group while the server is responsive
            reader, writer = await smcish.open_connection(HOST, srv.port)
            writer.write_eof()
            assert await reader.read() == expected(b"")
            assert writer.get_extra_info("smcish").mode == "ism"
            writer.close()
            before = smcish.stats()
            srv.stall(1.5)
            await asyncio.sleep(0.05)
            reader, writer = await smcish.open_connection(HOST, srv.port, handshake_timeout=0.3)
            assert writer.get_extra_info("smcish").mode == "ism"     # optimistic, answer pending
            data = payload(300_000, 7)
            writer.write(data[:10])
            await asyncio.sleep(0.6)                   # past the timeout: withdrawn, migrated
            assert writer.get_extra_info("smcish").mode == "tcp"
            writer.write(data[10:])
            writer.write_eof()
            got = await asyncio.wait_for(reader.read(), 20)
            assert got == expected(data)
            info = writer.get_extra_info("smcish")
            assert info.reason == DeclineReason.TIMEOUT, info
            writer.close()
            after = smcish.stats()
            assert after["migrations"] == before["migrations"] + 1
            assert after["migrated_bytes"] == before["migrated_bytes"] + 10

        Env(loop_kind, "ism").run(main())
    finally:
        srv.close()


def test_stalled_server_without_a_group_yet_does_not_delay_the_connection(loop_kind):
    """The link group cannot open while the server's loop is stuck: the connection goes TCP
    after the set-up timeout at most, as plain TCP would have connected (the kernel accepts)."""
    srv = ThreadServer(loop_kind, sha_echo)
    try:
        async def main():
            srv.stall(2.0)
            await asyncio.sleep(0.05)
            started = time.monotonic()
            reader, writer = await smcish.open_connection(HOST, srv.port, handshake_timeout=0.3)
            took = time.monotonic() - started
            info = writer.get_extra_info("smcish")
            assert info.mode == "tcp" and info.reason == DeclineReason.TIMEOUT, info
            assert took < 1.2, took
            data = payload(100_000, 3)
            writer.write(data)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 20) == expected(data)
            writer.close()

        Env(loop_kind, "ism").run(main())
    finally:
        srv.close()


def test_close_right_after_writing_while_the_server_is_stalled(loop_kind):
    """write(); close() before the server answered: the close waits for the set-up, the bytes
    and then the EOF arrive (over TCP here: the server answers too late)."""
    got = []

    async def record(reader, writer):
        got.append(await reader.read())
        writer.close()

    srv = ThreadServer(loop_kind, record)
    try:
        async def main():
            _reader, writer = await smcish.open_connection(HOST, srv.port)   # opens the group
            writer.close()
            await writer.wait_closed()
            srv.stall(1.0)
            await asyncio.sleep(0.05)
            _reader, writer = await smcish.open_connection(HOST, srv.port, handshake_timeout=0.3)
            writer.write(b"last words")
            writer.close()
            await writer.wait_closed()
            deadline = time.monotonic() + 10
            while len(got) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert got == [b"", b"last words"]

        Env(loop_kind, "ism").run(main())
    finally:
        srv.close()


@pytest.mark.parametrize("rounds", [50])
def test_close_right_after_writing_on_shared_memory(loop_kind, rounds):
    """The same with a live server: ISM, and every connection's bytes and EOF arrive."""
    got = []

    async def record(reader, writer):
        got.append(await reader.read())
        writer.close()

    async def main():
        server = await smcish.start_server(record, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            modes = []
            for i in range(rounds):
                _reader, writer = await smcish.open_connection(HOST, port)
                writer.write(b"conn %d" % i)
                modes.append(writer.get_extra_info("smcish").mode)
                writer.close()
                await writer.wait_closed()
            deadline = time.monotonic() + 10
            while len(got) < rounds and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
        assert sorted(got) == sorted(b"conn %d" % i for i in range(rounds))
        assert set(modes) == {"ism"}

    Env(loop_kind, "ism").run(main())
