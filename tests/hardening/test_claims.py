"""Connection claims when the device answers "plain TCP" or cannot answer.

A claim (docs/design.md §3) decides, per TCP connection, whether the server parses a handshake.
Both ends must agree; when they do not, handshake bytes end up in an application's stream.
"""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest

import ism_backend
import smcish

from .conftest import CLIENT_CHILD, HOST, Child, run_loop


class ReplyOnce(asyncio.Protocol):
    """Echo the first chunk, then close (the server closes first: the client's port is free)."""

    received: list = []

    def connection_made(self, transport):
        self.transport = transport
        self.info = transport.get_extra_info("smcish")

    def data_received(self, data):
        ReplyOnce.received.append((self.info.mode, bytes(data)))
        self.transport.write(data)
        self.transport.close()


def _plain_client(port: int) -> int:
    sock = socket.create_connection((HOST, port))
    local = sock.getsockname()[1]
    sock.sendall(b"plain hello")
    while sock.recv(100):
        pass
    sock.close()
    return local


def test_port_reused_within_claim_ttl_keeps_streams_intact():
    async def main():
        ReplyOnce.received = []
        server = await smcish.create_server(ReplyOnce, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        # a plain TCP client from port P: the server records (P, server) as plain TCP for 60 s
        p = await loop.run_in_executor(None, _plain_client, port)
        await asyncio.sleep(0.1)
        # an smcish client that gets the same port (ephemeral ports are reused)
        reader, writer = await smcish.open_connection(HOST, port, local_addr=(HOST, p))
        info = writer.get_extra_info("smcish")
        try:
            writer.write(b"hello")
            echoed = await asyncio.wait_for(reader.read(100), 5)
        except ConnectionError as exc:
            echoed = repr(exc)
        writer.close()
        server.close()
        await server.wait_closed()
        return info, echoed, ReplyOnce.received[-1]

    (info, echoed, (mode, server_got)), _ = run_loop(main())
    print("client", info, "got", echoed, "; server application got", server_got)
    assert server_got == b"hello", f"server application received {server_got!r}"
    assert echoed == b"hello"


def test_server_claim_failure_does_not_leak_handshake_bytes():
    dev = ism_backend.get_device()
    original = dev._slots.alive

    def failing_alive(prefix, locked=False):
        if prefix.startswith("int-"):
            raise OSError(errno.EMFILE, "Too many open files")
        return original(prefix, locked)

    async def main():
        server = await smcish.create_server(EchoLike, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        dev._slots.alive = failing_alive
        try:
            child = Child(CLIENT_CHILD, {"mode": "many", "port": port, "count": 1}, quiet=True)
            try:
                out = await child.await_line(lambda ev: ev.get("event") == "many", 30)
            finally:
                child.close()
        finally:
            dev._slots.alive = original
        server.close()
        await server.wait_closed()
        return out["results"][0], sorted(EchoLike.sizes)

    (result, sizes), _ = run_loop(main())
    print("client:", result, "server application byte counts:", sizes)
    assert result["echo"] is True, result
    assert all(n in (0, 3000) for n in sizes), sizes


class EchoLike(asyncio.Protocol):
    sizes: list = []

    def connection_made(self, transport):
        self.transport = transport
        self.n = 0

    def data_received(self, data):
        self.n += len(data)
        self.transport.write(data)

    def connection_lost(self, exc):
        EchoLike.sizes.append(self.n)
