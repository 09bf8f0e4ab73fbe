"""The transport suite, run in {ism, tcp fallback} x {asyncio, uvloop}: bytes, order, close, flow control."""

from __future__ import annotations

import asyncio
import os
import zlib

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import smcish

HOST = "127.0.0.1"


async def echo_server(env, **kw):
    async def handle(reader, writer):
        try:
            while True:
                data = await reader.read(1 << 16)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    server = await smcish.start_server(handle, HOST, 0, **env.kw, **kw)
    return server, server.sockets[0].getsockname()[1]


def check_mode(env, writer):
    info = writer.get_extra_info("smcish")
    assert info is not None
    assert info.mode == env.expected_mode, info
    if env.path == "tcp":
        assert info.reason is not None
    else:
        assert info.reason is None and info.device


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chunks=st.lists(st.binary(min_size=0, max_size=20000), max_size=25),
       ring_log2=st.integers(min_value=12, max_value=16))
def test_echo_random_chunking(env, chunks, ring_log2):
    async def main():
        server, port = await echo_server(env, ring_size=1 << ring_log2)
        async with server:
            reader, writer = await smcish.open_connection(HOST, port, ring_size=1 << ring_log2, **env.kw)
            check_mode(env, writer)
            expected = b"".join(chunks)

            async def send():
                for chunk in chunks:
                    writer.write(chunk)
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.ensure_future(send())
            got = bytearray()
            while True:
                data = await reader.read(7919)
                if not data:
                    break
                got += data
            await sender
            writer.close()
            await writer.wait_closed()
            assert bytes(got) == expected

    env.run(main())


def test_one_gib_with_checksum(env):
    total = 1 << 30
    block = os.urandom(4 << 20)

    async def main():
        result = {}

        async def sink(reader, writer):
            crc = 0
            n = 0
            while True:
                data = await reader.read(1 << 20)
                if not data:
                    break
                crc = zlib.crc32(data, crc)
                n += len(data)
            result["crc"], result["n"] = crc, n
            writer.write(n.to_bytes(8, "big"))
            await writer.drain()
            writer.close()

        server = await smcish.start_server(sink, HOST, 0, **env.kw)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await smcish.open_connection(HOST, port, **env.kw)
            check_mode(env, writer)
            crc = 0
            sent = 0
            i = 0
            while sent < total:
                size = min(total - sent, (1 << 20) - (i * 4099) % (1 << 19))
                off = (i * 7919) % (len(block) - size)
                chunk = block[off:off + size]
                crc = zlib.crc32(chunk, crc)
                writer.write(chunk)
                await writer.drain()
                sent += size
                i += 1
            writer.write_eof()
            assert int.from_bytes(await reader.readexactly(8), "big") == total
            writer.close()
            await writer.wait_closed()
        assert result == {"crc": crc, "n": total}

    env.run(main(), timeout=180)


def test_half_close(env):
    async def main():
        async def handle(reader, writer):
            data = await reader.read()          # until EOF
            writer.write(b"got:" + data)
            await writer.drain()
            writer.close()

        server = await smcish.start_server(handle, HOST, 0, **env.kw)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await smcish.open_connection(HOST, port, **env.kw)
            assert writer.can_write_eof()
            writer.write(b"hello")
            writer.write_eof()
            assert await reader.read() == b"got:hello"
            assert reader.at_eof()
            writer.close()
            await writer.wait_closed()

    env.run(main())


def test_close_with_pending_data(env):
    payload = os.urandom(5 << 20)             # larger than the ring and the socket buffers

    async def main():
        done = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            data = await reader.read()
            done.set_result(data)
            writer.close()

        server = await smcish.start_server(handle, HOST, 0, ring_size=1 << 16, **env.kw)
        async with server:
            port = server.sockets[0].getsockname()[1]
            _, writer = await smcish.open_connection(HOST, port, ring_size=1 << 16, **env.kw)
            writer.write(payload)
            assert writer.transport.get_write_buffer_size() > 0
            writer.close()                     # must drain what is pending first
            await writer.wait_closed()
            assert await done == payload

    env.run(main())


def test_abort_resets_peer(env):
    async def main():
        lost = asyncio.get_running_loop().create_future()

        class Server(asyncio.Protocol):
            def connection_lost(self, exc):
                lost.set_result(exc)

        server = await smcish.create_server(Server, HOST, 0, **env.kw)
        async with server:
            port = server.sockets[0].getsockname()[1]
            transport, _ = await smcish.create_connection(asyncio.Protocol, HOST, port, **env.kw)
            transport.write(b"x" * 100)
            await asyncio.sleep(0.05)
            transport.abort()
            assert transport.is_closing()
            exc = await asyncio.wait_for(lost, 5)
            # As a TCP socket's close() (asyncio's abort()): FIN when nothing is left unread.
            assert exc is None, exc

    env.run(main())


def test_abort_with_unread_data_resets_peer(env):
    """abort() with bytes we never read: the peer sees a reset (ISM: ABORT; TCP: RST)."""
    async def main():
        loop = asyncio.get_running_loop()
        lost = loop.create_future()
        made = loop.create_future()

        class Server(asyncio.Protocol):
            def connection_made(self, transport):
                made.set_result(transport)

            def connection_lost(self, exc):
                lost.set_result(exc)

        class Client(asyncio.Protocol):
            def connection_made(self, transport):
                transport.pause_reading()

        server = await smcish.create_server(Server, HOST, 0, **env.kw)
        async with server:
            port = server.sockets[0].getsockname()[1]
            transport, _ = await smcish.create_connection(Client, HOST, port, **env.kw)
            peer = await asyncio.wait_for(made, 5)
            peer.write(b"y" * 1000)                 # never read by the paused client
            await asyncio.sleep(0.05)
            transport.abort()
            peer.write(b"z")                        # TCP: the RST is seen on the next send/recv
            exc = await asyncio.wait_for(lost, 5)
            assert isinstance(exc, ConnectionResetError), exc
            assert transport.get_extra_info("smcish").mode == env.expected_mode

    env.run(main())


def test_connection_lost_exactly_once(env):
    async def main():
        calls = []
        closed = asyncio.Event()

        class Client(asyncio.Protocol):
            def connection_lost(self, exc):
                calls.append(exc)
                closed.set()

        server, port = await echo_server(env)
        async with server:
            transport, _ = await smcish.create_connection(Client, HOST, port, **env.kw)
            transport.write(b"ping")
            transport.close()
            transport.close()
            transport.abort()
            await asyncio.wait_for(closed.wait(), 5)
            await asyncio.sleep(0.05)
            assert calls == [None]

    env.run(main())


def test_flow_control_slow_reader(env):
    total = 8 << 20

    async def main():
        events = []
        got = bytearray()
        done = asyncio.get_running_loop().create_future()

        class SlowServer(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
                transport.pause_reading()
                asyncio.get_running_loop().call_later(0.2, self.resume)

            def resume(self):
                events.append("resume_reading")
                self.transport.resume_reading()

            def data_received(self, data):
                got.extend(data)
                if len(got) >= total:
                    done.set_result(None)

        class Writer(asyncio.Protocol):
            def pause_writing(self):
                events.append("pause_writing")

            def resume_writing(self):
                events.append("resume_writing")

        server = await smcish.create_server(SlowServer, HOST, 0, ring_size=1 << 16, **env.kw)
        async with server:
            port = server.sockets[0].getsockname()[1]
            transport, _ = await smcish.create_connection(Writer, HOST, port, ring_size=1 << 16, **env.kw)
            payload = os.urandom(total)
            for i in range(0, total, 1 << 20):
                transport.write(payload[i:i + (1 << 20)])
            await asyncio.wait_for(done, 30)
            assert bytes(got) == payload
            assert events[0] == "pause_writing" and "resume_writing" in events, events
            transport.close()

    env.run(main())


def test_write_copies_data(env):
    async def main():
        server, port = await echo_server(env)
        async with server:
            reader, writer = await smcish.open_connection(HOST, port, ring_size=1 << 12, **env.kw)
            buf = bytearray(b"a" * 100_000)
            writer.write(buf)                  # larger than the ring: part of it is held back
            buf[:] = b"b" * 100_000            # mutating afterwards must not change what is sent
            writer.write_eof()
            data = await reader.read()
            assert data == b"a" * 100_000
            writer.close()

    env.run(main())


def test_buffered_protocol(env):
    payload = os.urandom(3 << 20)

    async def main():
        done = asyncio.get_running_loop().create_future()

        class Receiver(asyncio.BufferedProtocol):
            def __init__(self):
                self.buf = bytearray(10_000)       # odd size: forces many partial deliveries
                self.got = bytearray()

            def get_buffer(self, sizehint):
                return self.buf

            def buffer_updated(self, nbytes):
                self.got += self.buf[:nbytes]

            def eof_received(self):
                done.set_result(bytes(self.got))

        server = await smcish.create_server(Receiver, HOST, 0, **env.kw)
        async with server:
            port = server.sockets[0].getsockname()[1]
            transport, _ = await smcish.create_connection(asyncio.Protocol, HOST, port, **env.kw)
            assert transport.get_extra_info("smcish").mode == env.expected_mode
            transport.write(payload[:1000])
            transport.writelines([payload[1000:5000], memoryview(payload)[5000:]])
            transport.write_eof()
            assert await asyncio.wait_for(done, 30) == payload
            transport.close()

    env.run(main())


def test_many_concurrent_connections(env):
    n_conns = 200

    async def main():
        server, port = await echo_server(env, ring_size=1 << 14)
        async with server:
            async def one(i):
                reader, writer = await smcish.open_connection(HOST, port, ring_size=1 << 14, **env.kw)
                check_mode(env, writer)
                msg = os.urandom(1000 + i)
                for _ in range(3):
                    writer.write(msg)
                    assert await reader.readexactly(len(msg)) == msg
                writer.close()
                await writer.wait_closed()

            await asyncio.gather(*(one(i) for i in range(n_conns)))

    env.run(main(), timeout=120)


def test_extra_info(env):
    async def main():
        server, port = await echo_server(env)
        async with server:
            _reader, writer = await smcish.open_connection(HOST, port, **env.kw)
            assert writer.get_extra_info("peername")[1] == port
            assert writer.get_extra_info("sockname")[0] == HOST
            assert writer.get_extra_info("socket") is not None
            assert writer.get_extra_info("sslcontext") is None
            assert writer.transport._sendfile_compatible is not None
            writer.close()
            await writer.wait_closed()

    env.run(main())
