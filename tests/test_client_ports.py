"""Client ports: the random ephemeral port smcish binds must never cost a connection.

A random port may carry a 4-tuple already in use toward the same server (one of our own live
connections, or a TIME_WAIT remnant); the kernel's lookup sees it, and smcish tries other ports,
and then lets the kernel pick. Here the random range is narrowed to three ports so that every
random try collides once three connections are open.
"""

from __future__ import annotations

import socket

import smcish
from conftest import Env
from smcish import discovery

HOST = "127.0.0.1"


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_every_random_port_taken_then_the_kernel_picks(loop_kind, monkeypatch):
    async def echo(reader, writer):
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    async def main():
        server = await smcish.start_server(echo, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        lo = min(free_ports(1))
        monkeypatch.setattr(discovery, "_PORTS", (lo, lo + 2))
        async with server:
            conns = []
            for i in range(8):
                reader, writer = await smcish.open_connection(HOST, port)
                conns.append((reader, writer))
                writer.write(b"ping %d" % i)
                assert await reader.readexactly(len(b"ping %d" % i)) == b"ping %d" % i
            modes = [w.get_extra_info("smcish").mode for _, w in conns]
            ports = [w.get_extra_info("sockname")[1] for _, w in conns]
            assert modes == ["ism"] * 8, [w.get_extra_info("smcish") for _, w in conns]
            assert len(set(ports)) == 8
            assert sum(lo <= p <= lo + 2 for p in ports) <= 3
            for _, writer in conns:
                writer.close()

    Env(loop_kind, "ism").run(main())
