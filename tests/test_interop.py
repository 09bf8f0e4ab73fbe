"""Interop with plain asyncio peers, and every fallback cause we can provoke, with its visible reason."""

from __future__ import annotations

import asyncio
import os

import pytest

import smcish
from conftest import new_loop
from smcish.clc import DeclineReason as R

HOST = "127.0.0.1"
GREETING = b"220 hello from a server-speaks-first protocol\r\n"


def run(loop_kind, coro, timeout=30):
    loop = new_loop(loop_kind)
    errors = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout))
    finally:
        loop.run_until_complete(asyncio.sleep(0.01))
        loop.close()
        assert not errors, errors


async def echo_handler(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
    writer.close()


async def greeter_handler(reader, writer):
    writer.write(GREETING)                     # server speaks first
    line = await reader.readline()
    writer.write(b"echo:" + line)
    await writer.drain()
    writer.close()


async def client_first(open_connection, port, **kw):
    reader, writer = await open_connection(HOST, port, **kw)
    payload = os.urandom(200_000)
    writer.write(payload)
    writer.write_eof()
    got = await reader.read()
    writer.close()
    assert got == payload
    return writer.get_extra_info("smcish")


async def server_first(open_connection, port, **kw):
    reader, writer = await open_connection(HOST, port, **kw)
    # A generous bound only to catch a hang: the server's handshake_timeout is set far above it,
    # so a server that waited for a proposal from this client would fail here.
    assert await asyncio.wait_for(reader.readexactly(len(GREETING)), 5) == GREETING
    writer.write(b"line\n")
    assert await reader.readline() == b"echo:line\n"
    writer.close()
    return writer.get_extra_info("smcish")


@pytest.mark.parametrize("protocol", ["client_first", "server_first"])
def test_plain_client_against_smcish_server(loop_kind, protocol):
    handler, check = {"client_first": (echo_handler, client_first),
                      "server_first": (greeter_handler, server_first)}[protocol]

    async def main():
        server = await smcish.start_server(handler, HOST, 0, handshake_timeout=30)
        async with server:
            port = server.sockets[0].getsockname()[1]
            info = await check(asyncio.open_connection, port)
            assert info is None                 # a stock transport: nothing of ours on the client

    run(loop_kind, main())


@pytest.mark.parametrize("protocol", ["client_first", "server_first"])
def test_smcish_client_against_plain_server(loop_kind, protocol):
    handler, check = {"client_first": (echo_handler, client_first),
                      "server_first": (greeter_handler, server_first)}[protocol]

    async def main():
        server = await asyncio.start_server(handler, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            info = await check(smcish.open_connection, port)
            assert info.mode == "tcp" and info.reason is R.PEER_NOT_ADVERTISED

    run(loop_kind, main())


@pytest.mark.parametrize("protocol", ["client_first", "server_first"])
def test_smcish_both_ends_use_shared_memory(loop_kind, protocol):
    handler, check = {"client_first": (echo_handler, client_first),
                      "server_first": (greeter_handler, server_first)}[protocol]

    async def main():
        server = await smcish.start_server(handler, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            info = await check(smcish.open_connection, port)
            assert info.mode == "ism", info

    run(loop_kind, main())


@pytest.mark.parametrize("client_kw,reason", [
    ({"device": "none"}, R.NO_DEVICE),
    ({"negotiate": "never"}, R.DISABLED_BY_POLICY),
])
def test_client_side_fallback_reasons(loop_kind, client_kw, reason):
    async def main():
        server = await smcish.start_server(echo_handler, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            info = await client_first(smcish.open_connection, port, **client_kw)
            assert info.mode == "tcp" and info.reason is reason

    run(loop_kind, main())


def test_always_is_auto_and_never_speaks_to_a_deviceless_server(loop_kind):
    """negotiate="always" is kept for compatibility and means "auto" (v2): against a device-less
    smcish server (a plain server as far as discovery goes), the client stays TCP untouched."""
    async def main():
        server = await smcish.start_server(echo_handler, HOST, 0, device="none")
        async with server:
            port = server.sockets[0].getsockname()[1]
            info = await client_first(smcish.open_connection, port, negotiate="always")
            assert info.mode == "tcp" and info.reason is R.PEER_NOT_ADVERTISED, info

    run(loop_kind, main())


def test_plain_client_data_starting_with_old_magic(loop_kind):
    """A plain client whose first bytes happen to be v1's magic is a plain client like any other."""
    async def main():
        server = await smcish.start_server(echo_handler, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection(HOST, port)
            payload = b"SMCi" + b"\x01\x01\x00\x40" + os.urandom(100)
            writer.write(payload)
            writer.write_eof()
            assert await reader.read() == payload
            writer.close()

    run(loop_kind, main())


@pytest.mark.parametrize("protocol", ["client_first", "server_first"])
def test_client_falls_back_when_server_declines(loop_kind, protocol, monkeypatch):
    """A server without memory for the connection declines through the group: the client sees
    the server's reason (peer_declined) at once, and the bytes flow over TCP."""
    from smcish.linkgroup import LinkGroup

    real_alloc = LinkGroup.alloc_block

    def alloc_block(self, size):
        return None if self.role == "server" else real_alloc(self, size)

    async def no_growth(self, size):
        return self.role != "server"

    monkeypatch.setattr(LinkGroup, "alloc_block", alloc_block)
    monkeypatch.setattr(LinkGroup, "grow", no_growth)
    handler, check = {"client_first": (echo_handler, client_first),
                      "server_first": (greeter_handler, server_first)}[protocol]

    async def main():
        server = await smcish.start_server(handler, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            info = await check(smcish.open_connection, port)
            assert info.mode == "tcp" and info.reason is R.NO_MEMORY and info.peer_declined, info
        assert smcish.stats()["fallbacks"].get("NO_MEMORY", 0) >= 2

    run(loop_kind, main())


def test_ssl_passes_through(loop_kind):
    """ssl= calls are handed to the loop untouched (the handshake error is the loop's own)."""
    import ssl

    async def main():
        server = await asyncio.start_server(echo_handler, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            ctx = ssl.create_default_context()
            with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
                await smcish.open_connection(HOST, port, ssl=ctx, server_hostname="x",
                                             ssl_handshake_timeout=2)

    run(loop_kind, main())
