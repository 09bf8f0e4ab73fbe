"""No byte of ours ever reaches a listener that is not the smcish server accepting this very connection.

Each case here sent a PROPOSAL (65 bytes starting b"SMCi") to a plain server under v1 (main at
530ebbc), where discovery matched advertised addresses by name: a v6only listener matched IPv4,
a name's first address was not the advertised one, and an advertisement outlived its listener.
In every case the plain server must receive exactly the client's bytes, and the client must work
over plain TCP with no added delay.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

import smcish

MAGIC = b"SMCi"


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _has_ipv6(), reason="no IPv6 loopback here")


class PlainSink:
    """A plain asyncio server that records what each connection sent, and answers b"ok"."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.server = None

    async def handle(self, reader, writer) -> None:
        data = await reader.read(4096)
        self.received.append(data)
        writer.write(b"ok")
        await writer.drain()
        writer.close()

    async def start(self, host: str, port: int, **kw) -> int:
        self.server = await asyncio.start_server(self.handle, host, port, **kw)
        return self.server.sockets[0].getsockname()[1]


async def smcish_echo(host, port=0, **kw):
    async def handle(reader, writer):
        writer.write(await reader.read(4096))
        await writer.drain()
        writer.close()

    return await smcish.start_server(handle, host, port, **kw)


async def talk(host, port, payload=b"hello plain world", **kw):
    started = time.monotonic()
    reader, writer = await smcish.open_connection(host, port, **kw)
    writer.write(payload)
    await writer.drain()
    reply = await asyncio.wait_for(reader.read(100), 5)
    info = writer.get_extra_info("smcish")
    writer.close()
    return reply, info, time.monotonic() - started


@needs_ipv6
def test_v6only_smcish_listener_does_not_capture_the_ipv4_plain_server(loop_kind):
    from tests.conftest import Env

    async def main():
        for _ in range(20):                      # a port free on both families
            smc = await smcish_echo("::", 0)    # asyncio sets IPV6_V6ONLY on "::"
            port = smc.sockets[0].getsockname()[1]
            sink = PlainSink()
            try:
                await sink.start("127.0.0.1", port)
                break
            except OSError:
                smc.close()
                await smc.wait_closed()
        async with smc, sink.server:
            reply, info, took = await talk("127.0.0.1", port)
            assert reply == b"ok"
            assert sink.received == [b"hello plain world"]
            assert info.mode == "tcp" and info.reason is smcish.DeclineReason.PEER_NOT_ADVERTISED
            assert took < 1.0
            # and the smcish server itself is still reached over shared memory on IPv6
            reply6, info6, _ = await talk("::1", port, b"v6")
            assert reply6 == b"v6" and info6.mode == "ism"

    Env(loop_kind, "ism").run(main())


@needs_ipv6
def test_name_whose_first_address_is_a_plain_server(loop_kind):
    from tests.conftest import Env

    async def main():
        loop = asyncio.get_running_loop()
        for _ in range(20):                      # a port free on both families
            smc = await smcish_echo("127.0.0.1", 0)
            port = smc.sockets[0].getsockname()[1]
            sink = PlainSink()
            try:
                await sink.start("::1", port)
                break
            except OSError:
                smc.close()
                await smc.wait_closed()
        orig = loop.getaddrinfo

        async def two_addresses(host, *args, **kwargs):
            if host == "both.test":
                return [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
                        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]
            return await orig(host, *args, **kwargs)

        loop.getaddrinfo = two_addresses
        try:
            async with smc, sink.server:
                reply, info, took = await talk("both.test", port)
                assert reply == b"ok" and sink.received == [b"hello plain world"]
                assert info.mode == "tcp" and took < 1.0
        finally:
            loop.getaddrinfo = orig

    Env(loop_kind, "ism").run(main())


def test_closed_listener_replaced_by_a_plain_one_at_once(loop_kind):
    from tests.conftest import Env

    async def main():
        smc = await smcish_echo("127.0.0.1", 0)
        port = smc.sockets[0].getsockname()[1]
        reply, info, _ = await talk("127.0.0.1", port, b"first")
        assert reply == b"first" and info.mode == "ism"
        smc.close()
        await smc.wait_closed()
        sink = PlainSink()
        await sink.start("127.0.0.1", port, reuse_address=True)
        async with sink.server:
            for _ in range(3):
                reply, info, took = await talk("127.0.0.1", port)
                assert reply == b"ok" and info.mode == "tcp" and took < 1.0
        assert sink.received == [b"hello plain world"] * 3

    Env(loop_kind, "ism").run(main())


def test_server_first_plain_server_gets_no_bytes_and_client_sees_the_banner(loop_kind):
    """A plain server-speaks-first protocol on a port an smcish server used before."""
    from tests.conftest import Env

    async def main():
        smc = await smcish_echo("127.0.0.1", 0)
        port = smc.sockets[0].getsockname()[1]
        smc.close()
        await smc.wait_closed()
        got = []

        async def banner(reader, writer):
            writer.write(b"220 plain ready\r\n")
            await writer.drain()
            got.append(await reader.read(100))
            writer.close()

        plain = await asyncio.start_server(banner, "127.0.0.1", port, reuse_address=True)
        async with plain:
            started = time.monotonic()
            reader, writer = await smcish.open_connection("127.0.0.1", port)
            line = await asyncio.wait_for(reader.readline(), 5)
            assert line == b"220 plain ready\r\n"
            assert time.monotonic() - started < 1.0
            writer.write(b"QUIT\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()
        assert got == [b"QUIT\r\n"]

    Env(loop_kind, "ism").run(main())


def test_plain_client_bytes_starting_with_our_old_magic_reach_the_smcish_server(loop_kind):
    from tests.conftest import Env

    async def main():
        smc = await smcish_echo("127.0.0.1", 0)
        port = smc.sockets[0].getsockname()[1]
        async with smc:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            payload = MAGIC + b"\x01\x01\x00\x41" + bytes(57)
            writer.write(payload)
            await writer.drain()
            assert await asyncio.wait_for(reader.read(4096), 5) == payload
            writer.close()

    Env(loop_kind, "ism").run(main())
