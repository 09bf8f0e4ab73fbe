"""Zero copy at the transport and protocol level, in {ism, tcp fallback} x {asyncio, uvloop}.

Sending: ``SmcTransport.reserve(n)`` / ``commit(k)`` and ``send_buffer(writer, data)``.
Receiving: ``ZeroCopyProtocol`` (``view_received`` / ``release_view`` / ``view_eof_received``).
The ring primitives underneath are tested in tests/test_ring_zerocopy.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import pickle
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import smcish
from smcish import ZeroCopyProtocol, send_buffer

try:
    import numpy
except ImportError:                  # pragma: no cover - numpy is a test dependency
    numpy = None

HOST = "127.0.0.1"
_BLOCK = random.Random(7).randbytes(1 << 21)
BUFFER_KINDS = ["bytes", "bytearray", "memoryview", "memoryview_cast", "pickle"] + (
    ["numpy"] if numpy is not None else [])


def chunk(seq: int, n: int) -> bytes:
    """n bytes of test data, different for each seq (so a misplaced byte shows)."""
    off = (seq * 7919 + n * 31) % (len(_BLOCK) - n + 1)
    return _BLOCK[off:off + n]


def wrap(kind: str, data: bytes):
    """``data`` as a buffer of the given kind (what send_buffer accepts)."""
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":                      # a slice at an offset of a bigger buffer
        return memoryview(bytearray(b"<<" + data + b">>"))[2:2 + len(data)]
    if kind == "memoryview_cast":                 # items wider than a byte
        if len(data) % 4 == 0:
            return memoryview(bytearray(data)).cast("I")
        return memoryview(data)
    if kind == "pickle":
        return pickle.PickleBuffer(bytearray(data))
    if kind == "numpy":
        arr = numpy.frombuffer(data, dtype=numpy.uint8)
        return arr.view(numpy.uint64) if len(data) % 8 == 0 else arr
    raise AssertionError(kind)


def check_mode(env, transport) -> None:
    info = transport.get_extra_info("smcish")
    assert info is not None
    assert info.mode == env.expected_mode, info
    if env.path == "tcp":
        assert info.reason is not None
    else:
        assert info.reason is None and info.device


def port_of(server) -> int:
    return server.sockets[0].getsockname()[1]


class ZCReceiver(ZeroCopyProtocol):
    """Records everything; releases each view per ``policy``.

    inside: in view_received; soon: loop.call_soon; task: after an await in a task; later: after
    ``hold`` seconds; mixed: one of those at random per view; keep: never (the test releases).
    Protocol violations seen are collected in ``problems`` (checked by the tests).
    """

    def __init__(self, policy: str = "inside", keep_open: bool = False, seed: int = 0,
                 hold: float = 0.02, hash_only: bool = False, greet: bool = False) -> None:
        self.loop = asyncio.get_running_loop()
        self.policy = policy
        self.keep_open = keep_open
        self.rng = random.Random(seed)
        self.hold = hold
        self.hash_only = hash_only
        self.greet = greet
        self.sha = hashlib.sha256()
        self.nbytes = 0
        self.data = bytearray()
        self.views = 0
        self.held = None                 # the outstanding view (as we track it)
        self.problems: list[str] = []
        self.events: list = []
        self.eofs = 0
        self.lost: list = []
        self.tr = None
        self.first_view = self.loop.create_future()
        self.eof = self.loop.create_future()
        self.closed = self.loop.create_future()
        self.tasks: set = set()

    # ------------------------------------------------------------- protocol
    def connection_made(self, transport):
        self.tr = transport
        if self.transport is not transport:
            self.problems.append(f"self.transport is {self.transport!r}, not {transport!r}")
        if self.greet:
            transport.write(b"!")

    def view_received(self, view):
        self.views += 1
        if self.held is not None:
            self.problems.append("view_received while a view is outstanding")
        if self.eofs:
            self.problems.append("view_received after view_eof_received")
        if self.lost:
            self.problems.append("view_received after connection_lost")
        if not isinstance(view, memoryview) or not view.readonly or not len(view):
            self.problems.append(f"bad view {view!r} (readonly={getattr(view, 'readonly', None)})")
        self.held = view
        self.events.append(len(view))
        if not self.first_view.done():
            self.first_view.set_result(view)
        policy = self.policy
        if policy == "mixed":
            policy = self.rng.choice(["inside", "soon", "task", "later"])
        if policy == "inside":
            self.release()
        elif policy == "soon":
            self.loop.call_soon(self.release)
        elif policy == "task":
            task = self.loop.create_task(self._release_after_await())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        elif policy == "later":
            self.loop.call_later(self.hold, self.release)
        else:
            assert policy == "keep", policy

    async def _release_after_await(self):
        await asyncio.sleep(0)
        if self.rng.random() < 0.3:
            await asyncio.sleep(0.001)
        self.release()

    def release(self):
        view, self.held = self.held, None
        if view is None:
            self.problems.append("release with nothing held")
            return
        if self.hash_only:
            self.sha.update(view)
        else:
            self.data += view            # read the view's bytes just before releasing it
        self.nbytes += len(view)
        self.events.append("release")
        self.release_view()

    def view_eof_received(self):
        self.eofs += 1
        if self.held is not None:
            self.problems.append("view_eof_received while a view is outstanding")
        self.events.append("eof")
        if not self.eof.done():
            self.eof.set_result(None)
        return self.keep_open

    def connection_lost(self, exc):
        self.lost.append(exc)
        self.events.append("lost")
        if not self.closed.done():
            self.closed.set_result(exc)

    # ------------------------------------------------------------- checks
    def check_clean(self, env, expected: bytes | None = None) -> None:
        assert self.problems == []
        check_mode(env, self.tr)
        if expected is not None:
            assert self.nbytes == len(expected)
            assert bytes(self.data) == expected
        assert self.eofs == 1
        assert self.events[-2:] == ["eof", "lost"], self.events[-5:]
        assert self.lost == [None]


class PlainReceiver(asyncio.Protocol):
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.data = bytearray()
        self.eofs = 0
        self.lost: list = []
        self.tr = None
        self.closed = self.loop.create_future()

    def connection_made(self, transport):
        self.tr = transport

    def data_received(self, data):
        if self.eofs:
            raise AssertionError("data after eof")
        self.data += data

    def eof_received(self):
        self.eofs += 1
        return None

    def connection_lost(self, exc):
        self.lost.append(exc)
        if not self.closed.done():
            self.closed.set_result(exc)


def factory(made: list, cls=ZCReceiver, **kw):
    def make():
        proto = cls(**kw)
        made.append(proto)
        return proto
    return make


async def confirmed_client(env, port: int, **kw):
    """open_connection, then read the server's greeting (ZCReceiver(greet=True)): an ism
    client's optimistic set-up is confirmed once it can read from the server."""
    reader, writer = await smcish.open_connection(HOST, port, **{**env.kw, **kw})
    check_mode(env, writer.transport)
    assert await asyncio.wait_for(reader.readexactly(1), 5) == b"!"
    return reader, writer


# =============================================================================== 1. hypothesis

_size = st.one_of(st.integers(0, 64), st.integers(0, 70_000), st.integers(0, 300_000))
_op = st.one_of(
    st.tuples(st.just("reserve"), st.integers(1, 300_000),
              st.one_of(st.just(0), st.just(-1), st.integers(0, 300_000))),
    st.tuples(st.just("write"), _size),
    st.tuples(st.just("send"), st.sampled_from(BUFFER_KINDS), _size),
    st.just(("drain",)),
)


async def run_ops(writer, ops, expect: bytearray) -> None:
    """Carry out the sender operations on writer.transport; append what must arrive to expect."""
    transport = writer.transport
    for seq, op in enumerate(ops):
        kind = op[0]
        if kind == "reserve":
            _, want, upto = op
            view = transport.reserve(want)
            assert isinstance(view, memoryview) and not view.readonly
            assert 1 <= len(view) <= want
            data = chunk(seq, len(view))
            view[:] = data
            n = len(view) if upto < 0 else min(upto, len(view))
            transport.commit(n)
            expect += data[:n]
            with pytest.raises(ValueError):
                view[0]                      # invalid after commit
        elif kind == "write":
            data = chunk(seq, op[1])
            transport.write(data)
            expect += data
        elif kind == "send":
            data = chunk(seq, op[2])
            await send_buffer(writer, wrap(op[1], data))
            expect += data
        else:
            await writer.drain()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(_op, max_size=12),
       receiver=st.sampled_from(["inside", "soon", "task", "mixed", "plain"]),
       sender_side=st.sampled_from(["client", "server"]),
       ring_size=st.sampled_from([1 << 12, 1 << 14, 1 << 16]),
       seed=st.integers(0, 1000))
def test_random_operations_arrive_in_order(env, ops, receiver, sender_side, ring_size, seed):
    async def main():
        loop = asyncio.get_running_loop()
        made: list = []
        expect = bytearray()
        if receiver == "plain":
            make = factory(made, PlainReceiver)
        else:
            make = factory(made, ZCReceiver, policy=receiver, seed=seed)
        kw = dict(ring_size=ring_size, **env.kw)

        if sender_side == "client":
            server = await smcish.create_server(make, HOST, 0, **kw)
            async with server:
                reader, writer = await smcish.open_connection(HOST, port_of(server), **kw)
                check_mode(env, writer.transport)
                await run_ops(writer, ops, expect)
                writer.write_eof()
                assert await reader.read() == b""      # the receiver closes after EOF
                writer.close()
                await writer.wait_closed()
                rcv = made[0]
                await asyncio.wait_for(rcv.closed, 20)
        else:
            sent = loop.create_future()

            async def handle(reader, writer):
                try:
                    check_mode(env, writer.transport)
                    await run_ops(writer, ops, expect)
                    writer.write_eof()
                    assert await reader.read() == b""
                except BaseException as exc:
                    sent.set_exception(exc)
                    raise
                else:
                    sent.set_result(None)
                finally:
                    writer.close()

            server = await smcish.start_server(handle, HOST, 0, **kw)
            async with server:
                _, rcv = await smcish.create_connection(make, HOST, port_of(server), **kw)
                await asyncio.wait_for(sent, 20)
                await asyncio.wait_for(rcv.closed, 20)

        if receiver == "plain":
            check_mode(env, rcv.tr)
            assert rcv.eofs == 1 and rcv.lost == [None]
            assert bytes(rcv.data) == bytes(expect)
        else:
            rcv.check_clean(env, bytes(expect))

    env.errors.clear()
    env.run(main(), timeout=30)


# =============================================================================== 2. large transfer

def test_64_mib_send_buffer_hashed_both_sides(env):
    total = 64 << 20
    data = os.urandom(total)
    digest = hashlib.sha256(data).digest()

    class Hasher(ZCReceiver):
        def view_eof_received(self):
            super().view_eof_received()
            # half-open: report what arrived, then close
            self.tr.write(self.sha.digest() + self.nbytes.to_bytes(8, "big"))
            self.tr.close()
            return True

    async def main():
        made: list = []
        server = await smcish.create_server(factory(made, Hasher, hash_only=True), HOST, 0, **env.kw)
        async with server:
            reader, writer = await smcish.open_connection(HOST, port_of(server), **env.kw)
            check_mode(env, writer.transport)
            await send_buffer(writer, data)
            writer.write_eof()
            reply = await asyncio.wait_for(reader.read(), 60)
            assert reply == digest + total.to_bytes(8, "big")      # checked by the sender
            writer.close()
            await writer.wait_closed()
            rcv = made[0]
            await asyncio.wait_for(rcv.closed, 10)
            assert rcv.sha.digest() == digest                       # checked by the receiver
            rcv.check_clean(env)
            assert rcv.nbytes == total

    env.run(main(), timeout=120)


def test_view_held_50ms_blocks_delivery(env):
    total = 1 << 20

    async def main():
        made: list = []
        kw = dict(ring_size=1 << 14, **env.kw)
        server = await smcish.create_server(factory(made, ZCReceiver, policy="keep"), HOST, 0, **kw)
        async with server:
            reader, writer = await smcish.open_connection(HOST, port_of(server), **kw)
            check_mode(env, writer.transport)
            payload = chunk(3, total)
            sender = asyncio.ensure_future(send_buffer(writer, payload))
            while not made:
                await asyncio.sleep(0.001)
            rcv = made[0]
            await asyncio.wait_for(rcv.first_view, 5)
            await asyncio.sleep(0.05)
            assert rcv.views == 1, rcv.events            # nothing delivered while the view is held
            assert rcv.nbytes == 0 and rcv.held is not None
            check_mode(env, rcv.tr)
            rcv.policy = "inside"
            rcv.release()
            await asyncio.wait_for(sender, 10)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 10) == b""
            await asyncio.wait_for(rcv.closed, 10)
            rcv.check_clean(env, payload)
            assert rcv.views > 1
            writer.close()

    env.run(main())


# =============================================================================== 3. views

def test_receive_view_rules(env):
    async def main():
        made: list = []
        server = await smcish.create_server(factory(made, ZCReceiver, policy="keep"), HOST, 0, **env.kw)
        async with server:
            reader, writer = await smcish.open_connection(HOST, port_of(server), **env.kw)
            writer.write(b"0123456789")
            while not made:
                await asyncio.sleep(0.001)
            rcv = made[0]
            view = await asyncio.wait_for(rcv.first_view, 5)
            check_mode(env, rcv.tr)
            assert view.readonly
            with pytest.raises(TypeError):
                view[0] = 65
            with pytest.raises(TypeError):
                view[:2] = b"xx"
            assert bytes(view) == b"0123456789"[:len(view)]
            rcv.release()
            with pytest.raises(ValueError):
                view[0]
            with pytest.raises(ValueError):
                bytes(view)
            with pytest.raises(RuntimeError):
                rcv.release_view()            # nothing outstanding any more
            rcv.policy = "inside"
            writer.write_eof()
            assert await reader.read() == b""
            await asyncio.wait_for(rcv.closed, 5)
            rcv.check_clean(env, b"0123456789")
            writer.close()
        with pytest.raises(RuntimeError):
            ZCReceiver().release_view()      # never connected, never got a view

    env.run(main())


def test_reserve_commit_rules(env):
    async def main():
        made: list = []
        server = await smcish.create_server(factory(made, ZCReceiver, greet=True), HOST, 0, **env.kw)
        async with server:
            reader, writer = await confirmed_client(env, port_of(server))
            t = writer.transport
            t.write(b"a")
            with pytest.raises(RuntimeError):
                t.commit(0)                       # no reservation
            with pytest.raises(ValueError):
                t.reserve(0)
            with pytest.raises(ValueError):
                t.reserve(-5)
            view = t.reserve(100)
            assert len(view) == 100 and not view.readonly
            with pytest.raises(RuntimeError):
                t.reserve(10)                     # reserve twice
            if env.path == "ism":
                with pytest.raises(ValueError):
                    t.write(b"x")                 # ring space reserved: write() refuses
            with pytest.raises(ValueError):
                t.commit(101)                     # more than reserved: the reservation stays
            with pytest.raises(ValueError):
                t.commit(-1)
            view[:] = b"b" * 100                  # still usable
            t.commit(40)
            with pytest.raises(ValueError):
                view[0]                           # invalid after commit
            with pytest.raises(RuntimeError):
                t.commit(0)                       # the reservation is over
            view = t.reserve(3)
            view[:] = b"zzz"
            t.commit(0)                           # nothing sent
            with pytest.raises(ValueError):
                view[0]
            t.write(b"c")                         # no reservation: fine
            send_me = t.reserve(5)
            send_me[:5] = b"ddddd"
            t.commit(5)
            writer.write_eof()
            assert await reader.read() == b""
            rcv = made[0]
            await asyncio.wait_for(rcv.closed, 5)
            rcv.check_clean(env, b"a" + b"b" * 40 + b"c" + b"ddddd")
            writer.close()

    env.run(main())


def test_reserve_with_full_ring_gives_private_buffer(env):
    """Ring full (the receiver holds a view): reserve gives a private buffer of up to 1 MiB;
    what commit sends stays in order behind what was buffered."""
    async def main():
        made: list = []
        kw = dict(ring_size=1 << 12, max_ring_size=1 << 12, **env.kw)    # no growing
        server = await smcish.create_server(factory(made, ZCReceiver, policy="keep"), HOST, 0, **kw)
        async with server:
            reader, writer = await smcish.open_connection(HOST, port_of(server), **kw)
            t = writer.transport
            check_mode(env, t)
            first = chunk(1, 3 << 20)          # more than the ring and the socket buffers take
            t.write(first)
            while not made:
                await asyncio.sleep(0.001)
            rcv = made[0]
            await asyncio.wait_for(rcv.first_view, 5)
            view = t.reserve(10 << 20)
            assert 1 <= len(view) <= 1 << 20
            if env.path == "ism":
                assert t.get_write_buffer_size() > 0
                assert len(view) == 1 << 20       # a private buffer, at its maximum
            second = chunk(2, len(view))
            view[:] = second
            t.commit(len(view) - 7)
            with pytest.raises(ValueError):
                view[0]
            rcv.policy = "inside"
            rcv.release()
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 20) == b""
            await asyncio.wait_for(rcv.closed, 5)
            rcv.check_clean(env, first + second[:-7])
            writer.close()

    env.run(main())


def test_commit_after_write_eof_raises_like_write(env):
    """write_eof() between reserve() and commit(): commit raises what write() after write_eof()
    raises (RuntimeError), whatever the view is (ring space or a private buffer), and sends
    nothing; the stream ends after the bytes before the EOF."""
    async def main():
        made: list = []
        server = await smcish.create_server(factory(made, ZCReceiver, greet=True), HOST, 0, **env.kw)
        async with server:
            _reader, writer = await confirmed_client(env, port_of(server))
            t = writer.transport
            t.write(b"before")
            view = t.reserve(10)
            view[:] = b"0123456789"
            t.write_eof()
            with pytest.raises(RuntimeError):
                t.write(b"x")
            with pytest.raises(RuntimeError):
                t.commit(10)
            rcv = made[0]
            await asyncio.wait_for(rcv.closed, 5)
            rcv.check_clean(env, b"before")
            writer.close()

    env.run(main())


# =============================================================================== 4. EOF ordering

@pytest.mark.parametrize("keep_open", [False, True], ids=["close-on-eof", "half-open"])
@pytest.mark.parametrize("policy", ["inside", "later"])
def test_eof_after_last_view_released(env, keep_open, policy):
    class Replier(ZCReceiver):
        def view_eof_received(self):
            result = super().view_eof_received()
            if keep_open:
                self.loop.call_soon(self.reply)
            else:
                self.loop.call_soon(self.check_closing)
            return result

        def reply(self):
            assert not self.tr.is_closing()       # half-open: still usable for writing
            self.tr.write(b"reply:" + str(self.nbytes).encode())
            self.tr.close()

        def check_closing(self):
            if not self.tr.is_closing():
                self.problems.append("falsy view_eof_received did not close the transport")

    async def main():
        made: list = []
        make = factory(made, Replier, policy=policy, keep_open=keep_open, hold=0.03)
        server = await smcish.create_server(make, HOST, 0, ring_size=1 << 12, **env.kw)
        async with server:
            reader, writer = await smcish.open_connection(HOST, port_of(server), ring_size=1 << 12,
                                                          **env.kw)
            check_mode(env, writer.transport)
            payload = chunk(5, 10_000)
            writer.write(payload)                 # EOF comes while the last view is still held
            writer.write_eof()
            reply = await asyncio.wait_for(reader.read(), 10)
            assert reply == (b"reply:10000" if keep_open else b"")
            while not made:
                await asyncio.sleep(0.001)
            rcv = made[0]
            await asyncio.wait_for(rcv.closed, 5)
            await asyncio.sleep(0.01)
            rcv.check_clean(env, payload)
            ends = [i for i, e in enumerate(rcv.events) if e == "release"]
            assert rcv.events.index("eof") == ends[-1] + 1     # right after the last release
            writer.close()

    env.run(main())


@pytest.mark.parametrize("keep_open", [False, True], ids=["close-on-eof", "half-open"])
def test_eof_without_data(env, keep_open):
    async def main():
        made: list = []
        server = await smcish.create_server(factory(made, ZCReceiver, keep_open=keep_open), HOST, 0,
                                            **env.kw)
        async with server:
            reader, writer = await smcish.open_connection(HOST, port_of(server), **env.kw)
            check_mode(env, writer.transport)
            writer.write_eof()
            while not made:
                await asyncio.sleep(0.001)
            rcv = made[0]
            await asyncio.wait_for(rcv.eof, 5)
            await asyncio.sleep(0.02)
            assert rcv.views == 0 and rcv.eofs == 1 and rcv.problems == []
            check_mode(env, rcv.tr)
            if keep_open:
                assert not rcv.tr.is_closing() and not rcv.lost
                rcv.tr.write(b"still here")
                rcv.tr.close()
                assert await reader.read() == b"still here"
            else:
                assert await reader.read() == b""
            await asyncio.wait_for(rcv.closed, 5)
            rcv.check_clean(env, b"")
            writer.close()

    env.run(main())


# =============================================================================== 5. close with a reservation

class DigestReplier(ZCReceiver):
    """After EOF (half-open) sends back REPLY_SIZE known bytes and the sha256 of what it got,
    then closes: the server's ring carries data too. Until ``replying[0]``: an ordinary receiver."""

    replying = [False]

    def view_eof_received(self):
        super().view_eof_received()
        if not self.replying[0]:
            return False
        self.tr.write(chunk(77, REPLY_SIZE) + hashlib.sha256(self.data).digest())
        self.tr.close()
        return True


REPLY_SIZE = 40_000


@pytest.mark.parametrize("how", ["close", "abort"])
def test_close_with_outstanding_reservation(env, how):
    async def main():
        made: list = []
        # Rings that do not grow, and receivers that keep each view a loop iteration: every byte
        # of the new connections (both ways) sits a while in a 16 KiB block, like the stale one.
        kw = dict(ring_size=1 << 14, max_ring_size=1 << 14, **env.kw)

        def make():
            proto = DigestReplier(greet=True, policy="soon")
            proto.replying = replying
            made.append(proto)
            return proto

        replying = [False]
        server = await smcish.create_server(make, HOST, 0, **kw)
        async with server:
            reader, writer = await confirmed_client(env, port_of(server), **kw)
            t = writer.transport
            t.write(b"hello")
            while not made or made[0].nbytes < 5:
                await asyncio.sleep(0.001)
            rcv = made[0]
            view = t.reserve(1 << 13)
            assert len(view) == 1 << 13
            if env.path == "ism":
                with pytest.raises(ValueError):
                    t.write(b"x")             # the view is ring space
            view[:] = b"LEAK" * (len(view) // 4)
            alias = view[:]                   # a slice outlives the view's release
            getattr(t, how)()
            exc = await asyncio.wait_for(rcv.closed, 5)
            # Both sides done: the old slot is released (after an abort, by the aborting side's
            # maintenance tick, within 1 s), so its block could be handed out again.
            await asyncio.sleep(1.2 if how == "abort" and env.path == "ism" else 0.05)
            assert rcv.problems == []
            assert b"LEAK" not in rcv.data and bytes(rcv.data) == b"hello"[:len(rcv.data)]
            if how == "close":
                rcv.check_clean(env, b"hello")
            else:
                assert rcv.lost == [exc] and (exc is None or isinstance(exc, ConnectionError))
            assert await reader.read() == b""  # (the stream saw its own connection end)
            # The stale view and its slice: scribbling into them must reach no other connection.
            garbage = bytes([0xA5]) * len(alias)
            try:
                view[:] = garbage
            except ValueError:
                pass                          # released: fine as well
            alias[:] = garbage
            stop = False

            async def scribble():
                while not stop:
                    alias[:] = garbage
                    await asyncio.sleep(0)

            replying[0] = True
            scribbler = asyncio.ensure_future(scribble())
            try:
                await many_checked_transfers(env, server, made, kw, n_conns=24)
            finally:
                stop = True
                await scribbler
            alias = view = None               # (not `del`: scribble() closes over alias)

    env.run(main(), timeout=60)


async def many_checked_transfers(env, server, made, kw, n_conns: int) -> None:
    """New connections on the same loop (and link group), several at a time, each checked by
    sha256 on both sides (DigestReplier receivers)."""
    reply = chunk(77, REPLY_SIZE)

    async def one(i):
        size = 150_000 + i * 997
        payload = chunk(100 + i, size)
        reader, writer = await smcish.open_connection(HOST, port_of(server), **kw)
        check_mode(env, writer.transport)
        t = writer.transport
        t.write(payload[:1000])
        pos = 1000
        while pos < size:                      # part reserve/commit, part send_buffer
            view = t.reserve(min(5000, size - pos))
            n = len(view)
            view[:] = payload[pos:pos + n]
            t.commit(n)
            pos += n
            if pos > size // 2:
                await send_buffer(writer, memoryview(payload)[pos:])
                pos = size
            elif t.get_write_buffer_size():
                await writer.drain()
        writer.write_eof()
        t.pause_reading()                      # the reply waits a while in the server's ring
        await asyncio.sleep(0.01)
        t.resume_reading()
        got = await asyncio.wait_for(reader.read(), 20)
        assert got[:1] == b"!"                 # the greeting
        assert got[1:1 + REPLY_SIZE] == reply, "the server's bytes were corrupted"
        assert got[1 + REPLY_SIZE:] == hashlib.sha256(payload).digest(), "the client's bytes were corrupted"
        writer.close()
        await writer.wait_closed()

    first = len(made)
    for start in range(0, n_conns, 8):
        await asyncio.gather(*(one(i) for i in range(start, min(n_conns, start + 8))))
    receivers = made[first:]
    assert len(receivers) == n_conns
    for rcv in receivers:
        await asyncio.wait_for(rcv.closed, 10)
        rcv.check_clean(env)


def test_commit_after_connection_ended_is_a_noop(env):
    """A reservation outlives its connection (closed, both sides done, slot released): commit()
    sends nothing and raises nothing (as before the release), and leaves no reservation behind."""
    async def main():
        made: list = []
        server = await smcish.create_server(factory(made, ZCReceiver, greet=True), HOST, 0, **env.kw)
        async with server:
            _reader, writer = await confirmed_client(env, port_of(server))
            t = writer.transport
            t.write(b"hi")
            while not made or made[0].nbytes < 2:
                await asyncio.sleep(0.001)
            view = t.reserve(100)
            view[:5] = b"LEAKS"
            t.close()
            await asyncio.wait_for(made[0].closed, 5)
            await asyncio.sleep(0.05)           # the old slot is released meanwhile
            try:
                t.commit(5)
            except RuntimeError:
                # the loop's own write() after close (uvloop raises, asyncio drops it silently)
                assert env.path == "tcp" and env.loop_kind == "uvloop"
            t.reserve(10)                        # not "a reservation is outstanding"
            made[0].check_clean(env, b"hi")

    env.run(main())


# ========================================================================== 6. hostile: abort under a view

@pytest.mark.parametrize("aborter", ["client", "server"])
def test_peer_aborts_while_view_held(env, aborter):
    async def main():
        loop = asyncio.get_running_loop()
        made: list = []
        peer_transport = loop.create_future()

        class Sender(asyncio.Protocol):
            def connection_made(self, transport):
                peer_transport.set_result(transport)

        payload = chunk(9, 50_000)
        if aborter == "client":
            server = await smcish.create_server(factory(made, ZCReceiver, policy="keep"), HOST, 0,
                                                **env.kw)
            t, _ = await smcish.create_connection(Sender, HOST, port_of(server), **env.kw)
        else:
            server = await smcish.create_server(Sender, HOST, 0, **env.kw)
            _, rcv = await smcish.create_connection(factory(made, ZCReceiver, policy="keep"), HOST,
                                                    port_of(server), **env.kw)
            t = await peer_transport
        async with server:
            check_mode(env, t)
            t.write(payload)
            while not made:
                await asyncio.sleep(0.001)
            rcv = made[0]
            view = await asyncio.wait_for(rcv.first_view, 5)
            check_mode(env, rcv.tr)
            t.abort()
            try:
                await asyncio.wait_for(asyncio.shield(rcv.closed), 0.5)
            except TimeoutError:
                # reading is paused while the view is held: the peer's close (it had nothing
                # unread: a FIN, as over TCP) is only seen once reading resumes (release_view)
                pass
            else:
                assert len(bytes(view)) == len(view)   # the mapping stays readable
            rcv.policy = "inside"              # (TCP: bytes may still come before the reset)
            rcv.release()                      # must not raise
            with pytest.raises(RuntimeError):
                rcv.release_view()
            await asyncio.wait_for(rcv.closed, 5)
            await asyncio.sleep(0.05)
            assert len(rcv.lost) == 1, rcv.lost
            exc = rcv.lost[0]
            assert exc is None or isinstance(exc, ConnectionError), exc
            assert rcv.eofs <= 1
            assert rcv.problems == []
            assert bytes(rcv.data) == payload[:len(rcv.data)]

    env.run(main())


@pytest.mark.parametrize("how", ["close", "abort"])
def test_receiver_ends_while_view_held(env, how):
    async def main():
        made: list = []
        server = await smcish.create_server(factory(made, ZCReceiver, policy="keep"), HOST, 0,
                                            **env.kw)
        async with server:
            reader, writer = await smcish.open_connection(HOST, port_of(server), **env.kw)
            writer.write(chunk(4, 30_000))
            while not made:
                await asyncio.sleep(0.001)
            rcv = made[0]
            await asyncio.wait_for(rcv.first_view, 5)
            check_mode(env, rcv.tr)
            getattr(rcv.tr, how)()
            await asyncio.wait_for(rcv.closed, 5)
            rcv.release()                       # after connection_lost: must not raise
            await asyncio.sleep(0.05)
            assert rcv.problems == [] and len(rcv.lost) == 1
            try:
                await asyncio.wait_for(reader.read(), 5)
            except ConnectionError:
                pass
            writer.close()

    env.run(main())


# =============================================================================== 7. fallback parity

def test_same_receiver_over_both_modes(env):
    """The same ZeroCopyProtocol code, over env's mode and over forced TCP: the same bytes, the
    same EOF and close; over TCP the views are over copies (bytes), over ism over ring memory."""
    async def transcript(kw, expected_mode):
        made: list = []
        seen_objs: list = []

        class Recorder(ZCReceiver):
            def view_received(self, view):
                seen_objs.append(type(view.obj))
                super().view_received(view)

            def view_eof_received(self):
                super().view_eof_received()
                self.tr.write(hashlib.sha256(self.data).digest())
                self.tr.close()
                return True

        server = await smcish.create_server(factory(made, Recorder, policy="mixed", seed=3), HOST, 0,
                                            ring_size=1 << 12, **kw)
        async with server:
            reader, writer = await smcish.open_connection(HOST, port_of(server), ring_size=1 << 12, **kw)
            assert writer.get_extra_info("smcish").mode == expected_mode
            payload = chunk(11, 400_000)
            await send_buffer(writer, payload[:200_000])
            writer.write(payload[200_000:300_000])
            await send_buffer(writer, pickle.PickleBuffer(bytearray(payload[300_000:])))
            writer.write_eof()
            digest = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            rcv = made[0]
            await asyncio.wait_for(rcv.closed, 5)
            assert rcv.tr.get_extra_info("smcish").mode == expected_mode
            assert digest == hashlib.sha256(payload).digest()
            assert rcv.problems == [] and rcv.eofs == 1 and rcv.lost == [None]
            if expected_mode == "tcp":
                assert seen_objs and all(obj is bytes for obj in seen_objs), seen_objs
            else:
                assert seen_objs and not any(obj in (bytes, bytearray) for obj in seen_objs)
            return bytes(rcv.data), digest, rcv.eofs, rcv.lost, rcv.events[-2:]

    async def main():
        mine = await transcript(env.kw, env.expected_mode)
        tcp = await transcript({"device": "none"}, "tcp")
        assert mine == tcp

    env.run(main())


# =============================================================================== flow control interplay

def test_resume_reading_while_a_view_is_held(env):
    """An application (or a framework under it) calling resume_reading() while it holds a view
    must not get the same bytes again: one view outstanding at a time, as over TCP."""
    async def main():
        made: list = []
        server = await smcish.create_server(factory(made, ZCReceiver, policy="keep"), HOST, 0,
                                            ring_size=1 << 12, **env.kw)
        async with server:
            reader, writer = await smcish.open_connection(HOST, port_of(server), ring_size=1 << 12,
                                                          **env.kw)
            payload = chunk(6, 20_000)
            writer.write(payload[:1000])
            while not made:
                await asyncio.sleep(0.001)
            rcv = made[0]
            await asyncio.wait_for(rcv.first_view, 5)
            check_mode(env, rcv.tr)
            writer.write(payload[1000:])
            rcv.tr.resume_reading()
            await asyncio.sleep(0.05)
            assert rcv.views == 1 and rcv.problems == [], (rcv.events, rcv.problems)
            rcv.policy = "inside"
            rcv.release()
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            await asyncio.wait_for(rcv.closed, 5)
            rcv.check_clean(env, payload)
            writer.close()

    env.run(main())


def test_pause_reading_after_release_view_holds(env):
    """A held view pauses reading and release_view() resumes it (documented in zerocopy.py);
    an application that wants to stay paused calls pause_reading() after release_view(): then
    nothing arrives until resume_reading(), as asyncio's contract says."""
    async def main():
        made: list = []
        server = await smcish.create_server(factory(made, ZCReceiver, policy="keep"), HOST, 0,
                                            **env.kw)
        async with server:
            reader, writer = await smcish.open_connection(HOST, port_of(server), **env.kw)
            payload = chunk(8, 5000)
            writer.write(payload[:1000])
            while not made:
                await asyncio.sleep(0.001)
            rcv = made[0]
            await asyncio.wait_for(rcv.first_view, 5)
            check_mode(env, rcv.tr)
            rcv.policy = "inside"
            rcv.release()
            rcv.tr.pause_reading()                 # the application's own flow control
            writer.write(payload[1000:])
            await asyncio.sleep(0.05)
            assert rcv.views == 1, rcv.events      # still paused
            rcv.tr.resume_reading()
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            await asyncio.wait_for(rcv.closed, 5)
            rcv.check_clean(env, payload)
            writer.close()

    env.run(main())


def test_concurrent_send_buffers_both_finish(env):
    """Two tasks waiting for ring space at once (send_buffer): both are woken, both finish."""
    async def main():
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        got = bytearray()

        class Sink(asyncio.Protocol):
            def data_received(self, data):
                got.extend(data)

            def eof_received(self):
                done.set_result(None)

        server = await smcish.create_server(Sink, HOST, 0, **env.kw)
        async with server:
            _reader, writer = await smcish.open_connection(HOST, port_of(server), **env.kw)
            assert writer.get_extra_info("smcish").mode == env.expected_mode
            a, b = b"A" * (3 << 20), b"B" * (3 << 20)
            await asyncio.wait_for(asyncio.gather(smcish.send_buffer(writer, a),
                                                  smcish.send_buffer(writer, b)), 30)
            writer.write_eof()
            await asyncio.wait_for(done, 30)
            writer.close()
        return bytes(got)

    data = env.run(main(), timeout=60)
    assert len(data) == 6 << 20
    assert data.count(b"A") == 3 << 20 and data.count(b"B") == 3 << 20


def test_cancelling_one_waiter_leaves_the_other(env):
    """Two send_buffer tasks wait for ring space at once; cancelling one must not cancel the
    other (they share one space future inside the transport)."""
    async def main():
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        made = loop.create_future()
        got = bytearray()

        class Sink(asyncio.Protocol):
            def connection_made(self, transport):
                transport.pause_reading()           # the ring fills: both senders wait
                made.set_result(transport)

            def data_received(self, data):
                got.extend(data)

            def eof_received(self):
                done.set_result(None)

        server = await smcish.create_server(Sink, HOST, 0, **env.kw)
        async with server:
            _reader, writer = await smcish.open_connection(HOST, port_of(server), **env.kw)
            assert writer.get_extra_info("smcish").mode == env.expected_mode
            peer = await asyncio.wait_for(made, 5)
            a = asyncio.ensure_future(smcish.send_buffer(writer, b"A" * (8 << 20)))
            b = asyncio.ensure_future(smcish.send_buffer(writer, b"B" * (1 << 20)))
            await asyncio.sleep(0.1)
            a.cancel()
            await asyncio.sleep(0.05)
            peer.resume_reading()
            await asyncio.wait_for(b, 30)
            assert not b.cancelled()
            writer.write_eof()
            await asyncio.wait_for(done, 30)
            writer.close()
        return bytes(got)

    data = env.run(main(), timeout=60)
    assert data.count(b"B") == 1 << 20
