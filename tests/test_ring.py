"""Properties of the shared-memory ring (smcish.ring) between two honest peers in one process.

Both regions are sealed memfds; each Ring maps its own region read-write and the peer's with
PROT_READ, so a store into the peer's mapping would kill the test with SIGSEGV.
"""

import array
import fcntl
import mmap
import os
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smcish import ring
from smcish.ring import (
    HEADER_SIZE,
    MAX_CAPACITY,
    MIN_CAPACITY,
    ST_ABORT,
    ST_CLOSED,
    ST_DATA,
    ST_EOF,
    ST_SPACE,
    Ring,
    drain_doorbell,
    region_size,
)

U64 = 1 << 64
WAKE = ST_DATA | ST_EOF | ST_CLOSED | ST_ABORT
HYP = settings(deadline=None, max_examples=150,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------------------------------- helpers

class Region:
    """A sealed memfd region with the owner's read-write and the peer's read-only mapping."""

    def __init__(self, capacity, heap=False):
        self.capacity = capacity
        self.size = region_size(capacity)
        self.fd = -1
        if heap:  # plain heap memory: lets AddressSanitizer see overruns (PYTHONMALLOC=malloc)
            self.rw = bytearray(self.size)
            self.ro = memoryview(self.rw).toreadonly()
            return
        self.fd = os.memfd_create("smcish-ring-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, self.size)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.rw = mmap.mmap(self.fd, self.size)
        self.ro = mmap.mmap(self.fd, self.size, prot=mmap.PROT_READ)

    def put_u64(self, off, value):
        struct.pack_into("<Q", self.rw, off, value % U64)

    def put_u32(self, off, value):
        struct.pack_into("<I", self.rw, off, value)

    def get_u64(self, off):
        return struct.unpack_from("<Q", self.rw, off)[0]

    def get_u32(self, off):
        return struct.unpack_from("<I", self.rw, off)[0]

    def close(self):
        if self.fd >= 0:
            self.rw.close()
            self.ro.close()
            os.close(self.fd)


class Pair:
    """Two honest endpoints A and B; A's ring carries A->B, B's ring carries B->A.

    start_a/start_b preset the cursors of A's/B's ring consistently in both headers.
    Doorbells: A rings efd_b (B sleeps on it), B rings efd_a.
    """

    def __init__(self, cap_a=4096, cap_b=4096, start_a=0, start_b=0, heap=False):
        self.ra, self.rb = Region(cap_a, heap), Region(cap_b, heap)
        self.ra.put_u64(ring.OFF_PROD, start_a)
        self.rb.put_u64(ring.OFF_CONS_PEER, start_a)
        self.rb.put_u64(ring.OFF_PROD, start_b)
        self.ra.put_u64(ring.OFF_CONS_PEER, start_b)
        self.efd_a = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.efd_b = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.a = Ring(self.ra.rw, self.rb.ro, cap_a, cap_b, self.efd_b)
        self.b = Ring(self.rb.rw, self.ra.ro, cap_b, cap_a, self.efd_a)

    def close(self):
        self.a.close()
        self.b.close()
        self.ra.close()
        self.rb.close()
        os.close(self.efd_a)
        os.close(self.efd_b)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def payload(n, seed):
    """Deterministic, position-dependent bytes (a wrong offset shows up as a mismatch)."""
    if n == 0:
        return b""
    block = bytes((seed * 131 + i * 7) & 0xFF for i in range(256))
    return (block * (n // 256 + 1))[:n]


# ------------------------------------------------------------------------------- basics and API

def test_constants_match_layout():
    assert (HEADER_SIZE, MIN_CAPACITY, MAX_CAPACITY) == (512, 4096, 1 << 30)
    assert (ring.OFF_PROD, ring.OFF_CONS_PEER, ring.OFF_STATE, ring.OFF_WANT_DATA,
            ring.OFF_WANT_SPACE, ring.OFF_EOF_POS, ring.OFF_MAGIC) == (0, 128, 256, 260, 264, 272, 384)
    assert (ST_DATA, ST_EOF, ST_CLOSED, ST_ABORT, ST_SPACE) == (1, 2, 4, 8, 16)
    assert region_size(4096) == 4608
    for bad in (0, 4095, 2048, 4097, 3 * 4096, MAX_CAPACITY * 2):
        with pytest.raises(ValueError):
            region_size(bad)


def test_init_writes_nothing():
    # v2: the header's line 3 (384..511) is a slot's set-up record, no longer magic/capacity;
    # a legacy ring writes neither it nor anything else at init.
    with Pair(4096, 8192) as p:
        assert bytes(p.ra.rw[:ring.HEADER_SIZE]) == bytes(ring.HEADER_SIZE)
        assert bytes(p.rb.rw[:ring.HEADER_SIZE]) == bytes(ring.HEADER_SIZE)
        assert p.ra.get_u64(ring.OFF_PROD) == 0 and p.a.tx_space() == 4096
        assert p.a.tx_capacity == 4096 and p.a.rx_capacity == 8192


def test_init_rejects_bad_arguments():
    r1, r2 = Region(4096), Region(4096)
    try:
        with pytest.raises(ValueError):
            Ring(r1.rw, r2.ro, 8192, 4096)  # our mapping too short for the capacity
        with pytest.raises(ValueError):
            Ring(r1.rw, r2.ro, 4096, 8192)  # peer mapping too short
        with pytest.raises(ValueError):
            Ring(r1.rw, r2.ro, 6000, 4096)  # not a power of two
        with pytest.raises(ValueError):
            Ring(r1.rw, r1.ro, 4096, 4096, peer_doorbell_fd=-2)
        with pytest.raises(TypeError):
            Ring(r2.ro, r1.rw, 4096, 4096)  # our own region must be writable
        heap = bytearray(2 * region_size(4096) + 8)
        with pytest.raises(ValueError):  # both "regions" in one buffer: overlap
            Ring(heap, memoryview(heap).toreadonly(), 4096, 4096)
        with pytest.raises(ValueError):  # misaligned: atomics need 8-byte alignment
            Ring(memoryview(heap)[1:1 + region_size(4096)], r2.ro, 4096, 4096)
    finally:
        r1.close()
        r2.close()


def test_read_write_basic_and_buffer_types():
    with Pair(4096, 4096) as p:
        assert p.a.write(b"hello") == 5
        assert p.b.readable() == 5
        assert p.b.status() & (ST_DATA | ST_SPACE) == ST_DATA | ST_SPACE
        assert p.b.read(2) == b"he"
        assert p.b.read() == b"llo"
        assert p.b.read() == b"" and p.b.read(10) == b""
        assert p.b.status() & ST_DATA == 0
        # every kind of source buffer
        src_kinds = [b"bytes", bytearray(b"bytearray"), memoryview(b"xxmemoryviewxx")[2:-2],
                     array.array("I", [1, 2, 3]), mmap.mmap(-1, 16)]
        expected = b"".join(bytes(s) for s in src_kinds)
        for s in src_kinds:
            assert p.a.write(s) == memoryview(s).nbytes
        out = bytearray(len(expected))
        assert p.b.read_into(out) == len(expected)
        assert out == expected
        # every kind of destination buffer
        data = payload(100, 3)
        p.a.write(data)
        dsts = [bytearray(10), memoryview(bytearray(30))[5:25], array.array("B", bytes(20)),
                mmap.mmap(-1, 10), memoryview(bytearray(16)).cast("I")]
        got = b""
        for d in dsts:
            n = p.b.read_into(d)
            assert n == min(memoryview(d).nbytes, 100 - len(got))
            got += bytes(memoryview(d).cast("B")[:n])
        got += p.b.read()
        assert got == data
        with pytest.raises(BufferError):
            p.b.read_into(b"read-only destination")
        with pytest.raises(TypeError):
            p.a.write("str is not a buffer")
        # the other direction works independently
        assert p.b.write(b"reply") == 5 and p.a.read() == b"reply"
        assert p.a.tx_bytes == 5 + len(expected) + 100 and p.b.rx_bytes == p.a.tx_bytes


def test_full_ring_partial_write_and_writev():
    with Pair(4096, 4096) as p:
        assert p.a.write(payload(5000, 1)) == 4096
        assert p.a.write(b"x") == 0 and p.a.tx_space() == 0
        assert p.b.read() == payload(5000, 1)[:4096]
        parts = [b"", payload(1000, 2), b"", payload(3000, 3), payload(500, 4)]
        assert p.a.writev(parts) == 4096
        assert p.b.read() == b"".join(parts)[:4096]
        assert p.a.writev([]) == 0
        assert p.a.writev([bytearray(b"one")]) == 3
        assert p.b.read() == b"one"


def test_writev_c_gather_path():
    # totals above the join limit go through smc_tx_writev (one publish, partial last buffer)
    with Pair(1 << 20, 4096) as p:
        parts = [payload(40000, i) for i in range(40)] + [memoryview(payload(9000, 99))[1:]]
        total = sum(len(x) for x in parts)
        n = p.a.writev(parts)
        assert n == min(total, 1 << 20)
        assert p.b.read() == b"".join(bytes(x) for x in parts)[:n]
        assert p.b.read_into(bytearray(10)) == 0


def test_wrap_at_every_offset():
    cap = 4096
    with Pair(cap, 4096) as p:
        full = payload(cap, 7)
        out = bytearray(cap)
        for _offset in range(cap):
            assert p.a.write(full) == cap
            assert p.b.read_into(out) == cap and out == full
            assert p.a.write(b"!") == 1 and p.b.read(1) == b"!"  # advance the start by one
        assert p.a.tx_bytes == cap * (cap + 1)


@pytest.mark.parametrize("start", [0, U64 - 1, U64 - 4096, U64 - 4095, (1 << 63) + 12345])
def test_cursors_wrap_modulo_2_64(start):
    with Pair(4096, 4096, start_a=start, start_b=start) as p:
        data = payload(3 * 4096 + 17, 5)
        sent = received = 0
        out = bytearray(1500)
        while received < len(data):
            sent += p.a.write(data[sent:sent + 2500])
            n = p.b.read_into(out)
            assert out[:n] == data[received:received + n]
            received += n
        assert p.ra.get_u64(ring.OFF_PROD) == (start + len(data)) % U64
        assert p.rb.get_u64(ring.OFF_CONS_PEER) == (start + len(data)) % U64
        p.a.set_eof()
        assert p.b.status() & ST_EOF
        assert p.ra.get_u64(ring.OFF_EOF_POS) == (start + len(data)) % U64


# --------------------------------------------------------------------- the byte-stream property

@st.composite
def stream_scenario(draw):
    cap_a = draw(st.sampled_from([4096, 8192, 65536]))
    cap_b = draw(st.sampled_from([4096, 16384]))
    start_a = draw(st.one_of(st.just(0), st.integers(0, U64 - 1), st.integers(U64 - 3 * cap_a, U64 - 1)))
    start_b = draw(st.one_of(st.just(0), st.integers(0, U64 - 1)))
    size = st.one_of(st.integers(0, 64), st.integers(0, 3 * max(cap_a, cap_b)))
    op = st.one_of(
        st.tuples(st.just("write"), st.sampled_from("ab"), size,
                  st.sampled_from(["bytes", "bytearray", "memoryview", "array"])),
        st.tuples(st.just("writev"), st.sampled_from("ab"), st.lists(size, max_size=6), st.just(None)),
        st.tuples(st.just("read_into"), st.sampled_from("ab"), size,
                  st.sampled_from(["bytearray", "memoryview", "mmap"])),
        st.tuples(st.just("read"), st.sampled_from("ab"), st.one_of(st.just(-1), size), st.just(None)),
    )
    return cap_a, cap_b, start_a, start_b, draw(st.lists(op, max_size=40))


def _source(kind, data):
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    if kind == "memoryview":
        return memoryview(b"#" + data + b"#")[1:-1]
    return array.array("B", data)


def _dest(kind, n):
    if kind == "bytearray":
        return bytearray(n)
    if kind == "memoryview":
        return memoryview(bytearray(n + 3))[3:]
    return mmap.mmap(-1, max(n, 1))


@given(stream_scenario())
@HYP
def test_any_interleaving_delivers_exact_bytes_in_order(scenario):
    cap_a, cap_b, start_a, start_b, ops = scenario
    counter = 0
    with Pair(cap_a, cap_b, start_a, start_b) as p:
        side = {"a": (p.a, p.b, cap_a, bytearray()), "b": (p.b, p.a, cap_b, bytearray())}
        for op, who, arg, kind in ops:
            sender, receiver, cap, queue = side[who]
            if op == "write":
                counter += 1
                data = payload(arg, counter)
                n = sender.write(_source(kind, data))
                assert n == min(arg, cap - len(queue))
                queue += data[:n]
            elif op == "writev":
                parts = []
                for size in arg:
                    counter += 1
                    parts.append(payload(size, counter))
                n = sender.writev(parts)
                assert n == min(sum(arg), cap - len(queue))
                queue += b"".join(parts)[:n]
            elif op == "read_into":
                dst = _dest(kind, arg)
                n = receiver.read_into(dst)
                want = min(memoryview(dst).nbytes, len(queue))  # an mmap is at least 1 byte
                assert n == want
                assert bytes(memoryview(dst)[:n]) == bytes(queue[:n])
                del queue[:n]
            else:
                got = receiver.read(arg)
                want = len(queue) if arg < 0 else min(arg, len(queue))
                assert got == bytes(queue[:want])
                del queue[:want]
            for sender, receiver, cap, queue in side.values():
                assert receiver.readable() == len(queue)
                assert sender.tx_space() == cap - len(queue)
                assert bool(receiver.status() & ST_DATA) == bool(queue)
        # drain everything left: still exactly the queued bytes
        for _sender, receiver, _cap, queue in side.values():
            assert receiver.read() == bytes(queue)
        assert p.a.tx_bytes == p.b.rx_bytes and p.b.tx_bytes == p.a.rx_bytes


@given(st.lists(st.integers(1, 9000), min_size=1, max_size=30), st.integers(0, U64 - 1))
@settings(deadline=None, max_examples=40)
def test_heap_backed_regions_roundtrip(sizes, start):
    # Same property on malloc'd memory, where AddressSanitizer (docs/ring.md) checks every access.
    with Pair(4096, 8192, start_a=start, heap=True) as p:
        expected = bytearray()
        got = bytearray()
        for i, size in enumerate(sizes):
            data = payload(size, i)
            n = p.a.write(data)
            expected += data[:n]
            got += p.b.read(size // 2 + 1)
        got += p.b.read()
        assert got == expected


# ------------------------------------------------------------------------ state: eof/close/abort

def test_eof_delivered_after_draining():
    with Pair() as p:
        p.a.write(b"last words")
        p.a.set_eof()
        st_ = p.b.status()
        assert st_ & ST_DATA and not st_ & ST_EOF
        assert p.b.read(4) == b"last"
        assert not p.b.status() & ST_EOF
        assert p.b.read() == b" words"
        assert p.b.status() & ST_EOF and not p.b.status() & ST_DATA
        with pytest.raises(ValueError, match="EOF"):
            p.a.write(b"more")
        with pytest.raises(ValueError):
            p.a.writev([b"a", b"b"])
        p.a.set_eof()  # idempotent, eof_pos unchanged
        assert p.b.status() & ST_EOF
        # B can still send to A after A's EOF (half close)
        assert p.b.write(b"answer") == 6 and p.a.read() == b"answer"
        p.a.set_closed()
        assert p.b.status() & (ST_EOF | ST_CLOSED) == ST_EOF | ST_CLOSED


def test_closed_and_abort_bits():
    with Pair() as p:
        p.a.write(b"pending")
        p.a.set_closed()  # EOF + CLOSED together
        s = p.b.status()
        assert s & ST_CLOSED and s & ST_DATA and not s & ST_EOF
        assert p.b.read() == b"pending" and p.b.status() & ST_EOF
        assert p.ra.get_u32(ring.OFF_STATE) == ring.STATE_EOF | ring.STATE_CLOSED
    with Pair() as p:
        p.b.set_abort()
        assert p.a.status() & ST_ABORT
        assert p.a.prepare_sleep_rx() & ST_ABORT
        assert p.a.spin(10) & ST_ABORT
        with pytest.raises(ValueError):
            p.b.write(b"x")


def test_tx_prepare_sleep_wakes_on_peer_close():
    with Pair() as p:
        p.a.write(payload(4096, 1))
        assert p.a.prepare_sleep_tx() == 0
        p.b.set_closed()
        assert drain_doorbell(p.efd_a) == 1  # B's close rang A, which sleeps for space
        assert p.a.prepare_sleep_tx() & ST_CLOSED


# ---------------------------------------------------------------------------- sleep protocol

def test_data_doorbell_once_per_sleep_epoch():
    with Pair() as p:
        a, b = p.a, p.b
        a.write(b"x")  # B is not asleep: no doorbell
        assert drain_doorbell(p.efd_b) == 0
        assert b.prepare_sleep_rx() & ST_DATA  # data pending: do not sleep, flag cleared
        assert p.rb.get_u32(ring.OFF_WANT_DATA) == 0
        assert b.read() == b"x"
        assert b.prepare_sleep_rx() == 0  # nothing pending: sleep, flag stays
        epoch = p.rb.get_u32(ring.OFF_WANT_DATA)
        assert epoch != 0
        a.write(b"y")
        assert drain_doorbell(p.efd_b) == 1 and a.doorbells == 1
        a.write(b"z")  # same epoch already rung
        assert drain_doorbell(p.efd_b) == 0
        b.clear_wants()
        assert p.rb.get_u32(ring.OFF_WANT_DATA) == 0
        a.write(b"!")
        assert drain_doorbell(p.efd_b) == 0
        assert b.read() == b"yz!"
        assert b.prepare_sleep_rx() == 0
        assert p.rb.get_u32(ring.OFF_WANT_DATA) not in (0, epoch)  # a new epoch
        a.writev([b"1", b"2"])
        assert drain_doorbell(p.efd_b) == 1
        a.set_eof()  # B still flagged: EOF rings too
        assert drain_doorbell(p.efd_b) == 1 and a.doorbells == 3


def test_space_doorbell_threshold_and_drain():
    cap = 8192
    with Pair(cap, 4096) as p:
        a, b = p.a, p.b
        a.write(payload(cap, 1))
        assert a.prepare_sleep_tx() == 0
        assert b.read(cap // 8 - 1) and drain_doorbell(p.efd_a) == 0  # below rx_cap / 8
        assert b.read(1) and drain_doorbell(p.efd_a) == 1  # reached cap / 8 since it asked
        assert b.read(100) and drain_doorbell(p.efd_a) == 0  # that epoch was rung already
        a.clear_wants()
        a.write(payload(cap, 2))
        assert a.prepare_sleep_tx() == 0
        b.read(10)
        assert drain_doorbell(p.efd_a) == 0
        assert b.read() and drain_doorbell(p.efd_a) == 1  # drained the ring: ring at once
        assert a.prepare_sleep_tx() & ST_SPACE  # space now: do not sleep, flag cleared
        assert p.ra.get_u32(ring.OFF_WANT_SPACE) == 0


@st.composite
def sleep_scenario(draw):
    op = st.one_of(
        st.tuples(st.just("a_write"), st.integers(0, 5000)),
        st.tuples(st.just("b_read"), st.integers(0, 5000)),
        st.tuples(st.just("b_sleep_rx"), st.none()),
        st.tuples(st.just("a_sleep_tx"), st.none()),
        st.tuples(st.just("b_clear"), st.none()),
        st.tuples(st.just("a_clear"), st.none()),
        st.tuples(st.just("b_spin"), st.none()),
        st.tuples(st.just("b_status"), st.none()),
    )
    return draw(st.lists(op, max_size=60)), draw(st.booleans())


@given(sleep_scenario())
@HYP
def test_sleep_protocol_model(scenario):
    """prepare_sleep says "sleep" only when nothing is pending, and doorbells ring exactly when
    the sleeper flagged a new epoch (data) or was worth waking (space)."""
    ops, end_with_eof = scenario
    cap = 4096
    with Pair(cap, cap) as p:
        queue = 0  # bytes in A's ring
        want_data_b = want_space_a = 0  # epochs in the headers
        rung_data = rung_space = 0  # epochs the writer/reader already rang for
        ask_epoch = ask_cons = 0
        cons = 0
        for op, arg in ops:
            if op == "a_write":
                n = p.a.write(b"d" * arg)
                assert n == min(arg, cap - queue)
                queue += n
                if n and want_data_b and want_data_b != rung_data:
                    rung_data = want_data_b
                    assert drain_doorbell(p.efd_b) == 1
            elif op == "b_read":
                n = len(p.b.read(arg))
                assert n == min(arg, queue)
                queue -= n
                cons += n
                if n and want_space_a and want_space_a != rung_space:
                    if want_space_a != ask_epoch:
                        ask_epoch, ask_cons = want_space_a, cons - n
                    if cons - ask_cons >= cap // 8 or queue == 0:
                        rung_space = want_space_a
                        assert drain_doorbell(p.efd_a) == 1
            elif op == "b_sleep_rx":
                bits = p.b.prepare_sleep_rx()
                assert (bits == 0) == (queue == 0)
                want_data_b = p.rb.get_u32(ring.OFF_WANT_DATA)
                assert (want_data_b != 0) == (bits == 0)
            elif op == "a_sleep_tx":
                bits = p.a.prepare_sleep_tx()
                assert (bits == 0) == (queue == cap)
                want_space_a = p.ra.get_u32(ring.OFF_WANT_SPACE)
                assert (want_space_a != 0) == (bits == 0)
            elif op == "b_clear":
                p.b.clear_wants()
                want_data_b = 0
            elif op == "a_clear":
                p.a.clear_wants()
                want_space_a = 0
            elif op == "b_spin":
                assert bool(p.b.spin(0)) == bool(queue)
            else:
                assert bool(p.b.status() & ST_DATA) == bool(queue)
            # no doorbell the model did not expect
            assert drain_doorbell(p.efd_a) == 0 and drain_doorbell(p.efd_b) == 0
        if end_with_eof:
            p.a.set_eof()
            assert drain_doorbell(p.efd_b) == (1 if want_data_b else 0)
            p.b.read()
            assert p.b.prepare_sleep_rx() & ST_EOF


def test_epochs_change_every_sleep_and_skip_zero():
    with Pair() as p:
        seen = set()
        for _ in range(50):
            assert p.b.prepare_sleep_rx() == 0
            seen.add(p.rb.get_u32(ring.OFF_WANT_DATA))
        assert len(seen) == 50 and 0 not in seen
    # a Ring resumed on a region continues after the epochs already in its header
    with Pair() as p:
        p.rb.put_u32(ring.OFF_WANT_DATA, 0xFFFFFFFF)
        p.b.close()
        p.b = Ring(p.rb.rw, p.ra.ro, 4096, 4096, p.efd_a)
        assert p.b.prepare_sleep_rx() == 0
        assert p.rb.get_u32(ring.OFF_WANT_DATA) == 1  # wrapped, skipping 0


def test_doorbell_explicit_and_without_fd():
    with Pair() as p:
        p.a.doorbell()
        p.a.doorbell()
        assert drain_doorbell(p.efd_b) == 2 and drain_doorbell(p.efd_b) == 0
    r1, r2 = Region(4096), Region(4096)
    try:
        rr = Ring(r1.rw, r2.ro, 4096, 4096)  # no doorbell fd: everything still works
        rr.doorbell()
        assert rr.prepare_sleep_rx() == 0 and rr.doorbells == 0
        rr.close()
    finally:
        r1.close()
        r2.close()
    with pytest.raises(OSError):
        drain_doorbell(-1)


def test_doorbell_write_errors_are_counted_not_raised_on_the_data_path():
    r1, r2 = Region(4096), Region(4096)
    try:
        bad = Ring(r1.rw, r2.ro, 4096, 4096, 10_000)  # an fd number that is not open
        r2.put_u32(ring.OFF_WANT_DATA, 5)  # the "peer" sleeps for data
        assert bad.write(b"x") == 1  # the write succeeds; the failed doorbell is counted
        assert bad.doorbell_errors == 1 and bad.doorbells == 0
        with pytest.raises(OSError):
            bad.doorbell()
        bad.close()
    finally:
        r1.close()
        r2.close()


def test_spin_hits_and_misses():
    with Pair() as p:
        t0 = time.monotonic()
        assert p.b.spin(2000) == 0  # 2 ms budget, nothing arrives
        assert time.monotonic() - t0 >= 0.0015
        assert p.b.spin_misses == 1 and p.b.spin_hits == 0
        p.a.write(b"x")
        assert p.b.spin(1e6) & ST_DATA and p.b.spin_hits == 1


def test_spin_tx_waits_for_space():
    with Pair() as p:
        assert p.a.spin_tx(0) == ST_SPACE and p.a.tx_spin_hits == 1
        p.a.write(payload(4096, 1))
        assert p.a.spin_tx(0) == 0 and p.a.spin_tx(500) == 0
        assert p.a.tx_spin_misses == 2
        reader = threading.Timer(0.02, lambda: p.b.read(10))
        reader.start()
        assert p.a.spin_tx(2e6) == ST_SPACE  # woken by the consumer's progress, not the budget
        reader.join()
        assert p.a.write(b"x" * 20) == 10
        p.b.set_closed()
        assert p.a.spin_tx(1e6) & ST_CLOSED  # a closed peer will never make room


def test_spin_releases_the_gil():
    # While one thread spins inside C for 500 ms, this thread keeps running Python code (with
    # the GIL held by the spinner it could not run at all for those 500 ms). Every cffi call
    # is wrapped the same way (Py_BEGIN_ALLOW_THREADS in the generated smcish/_ring.c), so
    # large copies in read_into/write run without the GIL too.
    with Pair() as p:
        result = []
        spinner = threading.Thread(target=lambda: result.append(p.b.spin(500_000)))
        spinner.start()
        last = time.monotonic()
        max_gap = 0.0
        ticks = 0
        while spinner.is_alive():
            now = time.monotonic()
            max_gap = max(max_gap, now - last)
            last = now
            ticks += 1
        spinner.join()
        assert result == [0]
        assert ticks > 1000 and max_gap < 0.35, (ticks, max_gap)


# ---------------------------------------------------------------------------------- lifetime

def test_close_releases_mappings_and_is_idempotent():
    p = Pair()
    p.a.write(b"abc")
    p.a.close()
    p.a.close()
    assert p.a.closed and p.a.tx_bytes == 3
    for call in (lambda: p.a.write(b"x"), p.a.readable, p.a.status, p.a.prepare_sleep_rx,
                 p.a.set_eof, lambda: p.a.read_into(bytearray(1)), lambda: p.a.spin(1)):
        with pytest.raises(ValueError, match="closed"):
            call()
    p.a.clear_wants()  # no-op, no crash
    p.a.doorbell()  # no-op after close
    p.b.close()
    p.ra.rw.close()  # would raise BufferError if the ring still exported the buffer
    p.rb.ro.close()
    p.close()


def test_context_manager_and_repr():
    r1, r2 = Region(4096), Region(4096)
    with Ring(r1.rw, r2.ro, 4096, 4096) as rr:
        assert "tx_cap=4096" in repr(rr)
    assert "closed" in repr(rr)
    r1.close()
    r2.close()


def test_peer_mapping_is_really_read_only():
    r1 = Region(4096)
    try:
        with pytest.raises(TypeError):
            r1.ro[0] = 1
    finally:
        r1.close()
