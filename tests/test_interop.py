"""Interop with plain asyncio peers, and every fallback cause we can provoke, with its visible reason."""

from __future__ import annotations

import asyncio
import os
import secrets
import socket

import pytest

import ism_backend
import smcish
from smcish import clc
from smcish.clc import DeclineReason as R

from conftest import new_loop

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


def test_always_against_server_without_device_fails_loudly(loop_kind):
    """negotiate="always" needs a device both ends share (docs/design.md §3). Misused against a
    device-less echo server, the client must not hang: it sees its own proposal come back and
    reports PROTOCOL_ERROR (or aborts)."""
    async def main():
        server = await smcish.start_server(echo_handler, HOST, 0, device="none")
        async with server:
            port = server.sockets[0].getsockname()[1]
            try:
                _, writer = await smcish.open_connection(HOST, port, negotiate="always")
            except smcish.HandshakeError:
                return
            info = writer.get_extra_info("smcish")
            assert info.mode == "tcp" and info.reason is R.PROTOCOL_ERROR, info
            writer.close()

    run(loop_kind, main())


def test_plain_client_data_starting_with_magic(loop_kind):
    """A plain client whose first bytes happen to be our magic is still a plain client."""
    async def main():
        server = await smcish.start_server(echo_handler, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection(HOST, port)
            payload = clc.MAGIC + b"\x01\x01\x00\x40" + os.urandom(100)
            writer.write(payload)
            writer.write_eof()
            assert await reader.read() == payload
            writer.close()

    run(loop_kind, main())


def _proposal(**changes):
    device = ism_backend.get_device()
    fields = dict(min_version=1, max_version=1, flags=0, gid=device.gid,
                  endpoint_id=device.endpoint_id, token=secrets.token_bytes(16), capacity_log2=16)
    fields.update(changes)
    return clc.encode(clc.Proposal(**fields))


def _raw_exchange(port, first: bytes, then: bytes = b"after\n"):
    """A hand-made client: claim the connection like smcish does, send `first`, read the server's
    DECLINE, then talk plain TCP."""
    device = ism_backend.get_device()
    with socket.socket() as sock:
        sock.settimeout(5)
        sock.bind((HOST, 0))
        claim = device.claim(sock.getsockname()[1], HOST, port, "client")
        assert claim is not None
        sock.connect((HOST, port))
        sock.sendall(first)
        buf = b""
        msg = None
        while msg is None:
            chunk = sock.recv(4096)
            assert chunk, "server closed instead of declining"
            buf += chunk
            msg, used = clc.decode(buf)
        buf = buf[used:]
        sock.sendall(then)
        sock.shutdown(socket.SHUT_WR)
        while chunk := sock.recv(4096):
            buf += chunk
        device.release_claim(claim)
        return msg, buf


@pytest.mark.parametrize("case,reason", [
    ("version", R.VERSION_MISMATCH),
    ("gid", R.GID_MISMATCH),
    ("token", R.ATTACH_FAILED),
    ("garbage", R.PROTOCOL_ERROR),
])
def test_server_declines_and_stays_tcp(loop_kind, case, reason):
    first = {
        "version": lambda: _proposal(min_version=7, max_version=9),
        "gid": lambda: _proposal(gid=secrets.token_bytes(16)),
        "token": lambda: _proposal(),           # a token nobody allocated: attach refused
        "garbage": lambda: _proposal()[:8] + b"\xff" * (len(_proposal()) - 12) + clc.TRAILER,
    }[case]()

    async def main():
        infos = []

        async def handler(reader, writer):
            infos.append(writer.get_extra_info("smcish"))
            writer.write(await reader.read())
            writer.close()

        server = await smcish.start_server(handler, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            loop = asyncio.get_running_loop()
            msg, rest = await loop.run_in_executor(None, _raw_exchange, port, first)
            assert isinstance(msg, clc.Decline) and msg.reason is reason, msg
            assert rest == b"after\n"            # the connection carried on as plain TCP
            assert infos[0].mode == "tcp" and infos[0].reason is reason
        assert smcish.stats()["fallbacks"].get(reason.name, 0) >= 1

    run(loop_kind, main())


def test_client_falls_back_when_server_declines(loop_kind):
    """The client's reason is visible when an smcish server declines it (here: gid mismatch)."""
    async def main():
        async def fake_server(reader, writer):
            proposal = await reader.readexactly(len(_proposal()))
            assert proposal.startswith(clc.MAGIC)
            writer.write(clc.encode(clc.Decline(reason=R.GID_MISMATCH)))
            writer.write(b"plain bytes after the decline")
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(fake_server, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await smcish.open_connection(HOST, port, negotiate="always")
            info = writer.get_extra_info("smcish")
            assert info.mode == "tcp" and info.reason is R.GID_MISMATCH and info.peer_declined
            assert await reader.read() == b"plain bytes after the decline"
            writer.close()

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
