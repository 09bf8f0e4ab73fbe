"""A hostile peer: whatever it writes into its region, the ring raises RingCorrupted, never crashes.

The victim maps both regions with a PROT_NONE guard page right after them (or right before),
so any access outside [base, base + HEADER_SIZE + capacity) would kill the test with SIGSEGV;
the peer's region is mapped PROT_READ, so any store into it would too. The hostile side writes
its header through its own writable mapping, also from another thread and another process
while the victim is reading.
"""

import ctypes
import fcntl
import mmap
import os
import random
import struct
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from benchmarks.children import spawn_python
from conftest import program
from smcish import ring
from smcish.ring import ST_DATA, ST_EOF, ST_SPACE, Ring, RingCorrupted, drain_doorbell, region_size

U64 = 1 << 64
PAGE = mmap.PAGESIZE
PROT_NONE = 0  # Linux values; the mmap module does not export these two
MAP_FIXED = 0x10

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class GuardedRegion:
    """A region in a sealed memfd, mapped for the victim between PROT_NONE guard pages.

    align="end": the region's last byte is the last byte before the trailing guard page.
    align="start": the region starts on the first byte after the leading guard page.
    `rw` is the owner's (or hostile peer's) plain writable mapping of the whole memfd;
    `view(prot)` is the victim's guarded mapping as a buffer.
    """

    def __init__(self, capacity, align="end"):
        self.capacity = capacity
        self.size = region_size(capacity)
        self.span = -(-self.size // PAGE) * PAGE
        self.offset = self.span - self.size if align == "end" else 0
        self.fd = os.memfd_create("smcish-hostile", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, self.span)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.rw = mmap.mmap(self.fd, self.span)
        self._maps = []

    def view(self, prot):
        total = self.span + 2 * PAGE
        base = _libc.mmap(None, total, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        assert base not in (None, _MAP_FAILED)
        got = _libc.mmap(base + PAGE, self.span, prot, mmap.MAP_SHARED | MAP_FIXED, self.fd, 0)
        assert got == base + PAGE, ctypes.get_errno()
        self._maps.append((base, total))
        return (ctypes.c_char * self.size).from_address(base + PAGE + self.offset)

    def put_u64(self, off, value):
        struct.pack_into("<Q", self.rw, self.offset + off, value % U64)

    def put_u32(self, off, value):
        struct.pack_into("<I", self.rw, self.offset + off, value % (1 << 32))

    def get_u64(self, off):
        return struct.unpack_from("<Q", self.rw, self.offset + off)[0]

    def put_data(self, pos, data):
        """Store payload at ring cursor `pos` (wrapping), as an honest producer would."""
        for i, byte in enumerate(data):
            self.rw[self.offset + ring.HEADER_SIZE + (pos + i) % self.capacity] = byte

    def close(self):
        for base, total in self._maps:
            _libc.munmap(base, total)
        self.rw.close()
        os.close(self.fd)


class Victim:
    """Our endpoint (honest) facing a hostile peer region `evil` that the test writes freely."""

    def __init__(self, cap=4096, peer_cap=4096, align="end", doorbell=True):
        self.mine = GuardedRegion(cap, align)
        self.evil = GuardedRegion(peer_cap, align)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) if doorbell else -1
        self.my_view = self.mine.view(mmap.PROT_READ | mmap.PROT_WRITE)
        self.peer_view = self.evil.view(mmap.PROT_READ)
        self.ring = self.new_ring()

    def new_ring(self):
        """A Ring over our guarded views; it resumes from the cursors in our header."""
        return Ring(self.my_view, self.peer_view, self.mine.capacity, self.evil.capacity, self.efd)

    def close(self):
        self.ring.close()
        self.mine.close()
        self.evil.close()
        if self.efd >= 0:
            os.close(self.efd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def assert_sticky(r, match):
    """After a violation every data call raises the same RingCorrupted; ABORT can still be set."""
    for call in (r.readable, r.status, r.tx_space, lambda: r.write(b"x"), r.prepare_sleep_rx,
                 r.prepare_sleep_tx, lambda: r.read_into(bytearray(10)), lambda: r.spin(1),
                 lambda: r.spin_tx(1),
                 lambda: r.writev([b"a", b"b"])):
        with pytest.raises(RingCorrupted, match=match):
            call()
    r.set_abort()


@pytest.fixture(params=["end", "start"])
def victim(request):
    v = Victim(align=request.param)
    yield v
    v.close()


# ------------------------------------------------------------------------------ single faults

def test_honest_peer_sanity(victim):
    victim.evil.put_data(0, b"hello")
    victim.evil.put_u64(ring.OFF_PROD, 5)
    assert victim.ring.read() == b"hello"
    assert victim.ring.write(b"abc") == 3
    victim.evil.put_u64(ring.OFF_CONS_PEER, 3)
    assert victim.ring.tx_space() == 4096


def test_error_is_a_connection_reset(victim):
    victim.evil.put_u64(ring.OFF_PROD, 4097)
    with pytest.raises(ConnectionResetError):
        victim.ring.readable()
    assert issubclass(RingCorrupted, ring.RingError) and issubclass(RingCorrupted, ConnectionError)


@pytest.mark.parametrize("bad_prod", [4097, 1 << 40, U64 - 1, U64 - 4096])
def test_prod_beyond_capacity(victim, bad_prod):
    victim.evil.put_u64(ring.OFF_PROD, bad_prod)
    with pytest.raises(RingCorrupted, match=rf"peer prod {bad_prod} outside \[0, 4096\]"):
        victim.ring.read_into(bytearray(8192))
    assert_sticky(victim.ring, "peer prod")


def test_prod_beyond_capacity_after_consuming(victim):
    victim.evil.put_u64(ring.OFF_PROD, 4096)
    assert victim.ring.read_into(bytearray(1000)) == 1000
    victim.evil.put_u64(ring.OFF_PROD, 1000 + 4096)  # exactly full again: fine
    assert victim.ring.readable() == 4096
    victim.evil.put_u64(ring.OFF_PROD, 1000 + 4097)
    with pytest.raises(RingCorrupted, match="prod 5097"):
        victim.ring.readable()


@pytest.mark.parametrize("backwards_to", [99, 50, 0])
def test_prod_goes_backwards(victim, backwards_to):
    victim.evil.put_u64(ring.OFF_PROD, 100)
    assert victim.ring.readable() == 100
    assert victim.ring.read(50)
    victim.evil.put_u64(ring.OFF_PROD, backwards_to)  # below what we saw (and maybe below our cons)
    with pytest.raises(RingCorrupted, match=rf"prod {backwards_to} outside \[100, 4146\]"):
        victim.ring.status()
    assert_sticky(victim.ring, "peer prod")


def test_cons_beyond_our_prod(victim):
    victim.evil.put_u64(ring.OFF_CONS_PEER, 1)
    with pytest.raises(RingCorrupted, match=r"cons_peer .* 1 outside \[\d+, 0\]"):
        victim.ring.tx_space()
    assert_sticky(victim.ring, "cons_peer")


def test_cons_goes_backwards(victim):
    r = victim.ring
    assert r.write(b"x" * 4096) == 4096
    victim.evil.put_u64(ring.OFF_CONS_PEER, 3000)
    assert r.tx_space() == 3000
    victim.evil.put_u64(ring.OFF_CONS_PEER, 2999)
    with pytest.raises(RingCorrupted, match=r"cons_peer .* 2999 outside \[3000, 4096\]"):
        r.write(b"y" * 4000)
    assert_sticky(r, "cons_peer")


def test_cons_checked_on_status_and_full_write(victim):
    assert victim.ring.write(b"z" * 4096) == 4096
    victim.evil.put_u64(ring.OFF_CONS_PEER, 5000)
    with pytest.raises(RingCorrupted):
        victim.ring.write(b"more")  # the ring looked full: the write re-read cons


def test_cached_cons_is_enough_without_reloading(victim):
    # A write that fits in space already proven by an earlier cons does not re-read cons, so a
    # bad value is only caught at the next reload; it never matters for memory safety.
    victim.evil.put_u64(ring.OFF_CONS_PEER, 0)
    assert victim.ring.tx_space() == 4096
    victim.evil.put_u64(ring.OFF_CONS_PEER, 123456)
    assert victim.ring.write(b"a" * 10) == 10
    with pytest.raises(RingCorrupted):
        victim.ring.tx_space()


def test_eof_pos_differs_from_prod(victim):
    victim.evil.put_u64(ring.OFF_PROD, 10)
    victim.evil.put_u64(ring.OFF_EOF_POS, 11)
    victim.evil.put_u32(ring.OFF_STATE, ring.STATE_EOF)
    with pytest.raises(RingCorrupted, match="eof_pos 11 differs from its prod 10"):
        victim.ring.status()
    assert_sticky(victim.ring, "eof_pos")


def test_eof_pos_below_our_cons(victim):
    victim.evil.put_u64(ring.OFF_PROD, 10)
    assert len(victim.ring.read()) == 10
    victim.evil.put_u64(ring.OFF_EOF_POS, 5)
    victim.evil.put_u32(ring.OFF_STATE, ring.STATE_EOF)
    with pytest.raises(RingCorrupted, match="eof_pos 5"):
        victim.ring.prepare_sleep_rx()


def test_prod_moves_after_eof(victim):
    victim.evil.put_u64(ring.OFF_PROD, 10)
    victim.evil.put_u64(ring.OFF_EOF_POS, 10)
    victim.evil.put_u32(ring.OFF_STATE, ring.STATE_EOF)
    assert victim.ring.status() & ST_DATA
    assert len(victim.ring.read()) == 10
    assert victim.ring.status() & ST_EOF
    victim.evil.put_u64(ring.OFF_PROD, 20)
    with pytest.raises(RingCorrupted, match="prod 20 moved after EOF at eof_pos 10"):
        victim.ring.readable()
    assert_sticky(victim.ring, "after EOF")


def test_eof_cleared_or_eof_pos_rewritten_later_is_ignored(victim):
    victim.evil.put_u64(ring.OFF_PROD, 4)
    victim.evil.put_u64(ring.OFF_EOF_POS, 4)
    victim.evil.put_u32(ring.OFF_STATE, ring.STATE_EOF)
    victim.ring.read()
    assert victim.ring.status() & ST_EOF
    victim.evil.put_u32(ring.OFF_STATE, 0)
    victim.evil.put_u64(ring.OFF_EOF_POS, 999)
    assert victim.ring.status() & ST_EOF  # validated once, kept locally


def test_unknown_state_bits_and_wild_want_flags_are_harmless(victim):
    victim.evil.put_u32(ring.OFF_STATE, 0xFFFFFFF8)
    victim.evil.put_u32(ring.OFF_WANT_DATA, 0xDEADBEEF)
    victim.evil.put_u32(ring.OFF_WANT_SPACE, 0xFFFFFFFF)
    victim.evil.put_u64(ring.OFF_MAGIC, 0)
    victim.evil.put_u64(ring.OFF_CAPACITY, 1 << 62)  # informational only, never read
    assert victim.ring.status() == ST_SPACE
    assert victim.ring.write(b"x") == 1
    assert drain_doorbell(victim.efd) == 1
    assert victim.ring.write(b"x") == 1
    assert drain_doorbell(victim.efd) == 0  # one doorbell per epoch, whatever the value


def test_set_abort_after_corruption_tells_the_peer(victim):
    victim.evil.put_u64(ring.OFF_PROD, U64 - 1)
    with pytest.raises(RingCorrupted):
        victim.ring.readable()
    victim.ring.set_abort()
    assert struct.unpack_from("<I", victim.mine.rw, victim.mine.offset + ring.OFF_STATE)[0] == 4


# ------------------------------------------------------------------------- fuzzing the header

FIELDS = [(ring.OFF_PROD, 8), (ring.OFF_CONS_PEER, 8), (ring.OFF_STATE, 4),
          (ring.OFF_WANT_DATA, 4), (ring.OFF_WANT_SPACE, 4), (ring.OFF_EOF_POS, 8)]


def value_strategy():
    return st.one_of(st.integers(0, 10000), st.integers(0, U64 - 1),
                     st.integers(U64 - 10000, U64 - 1), st.sampled_from([0, 1, 4095, 4096, 4097]))


@st.composite
def hostile_ops(draw):
    poke = st.tuples(st.just("poke"), st.sampled_from(range(len(FIELDS))), value_strategy())
    call = st.tuples(st.just("call"),
                     st.sampled_from(["readable", "status", "tx_space", "write", "writev",
                                      "read_into", "read", "sleep_rx", "sleep_tx", "spin",
                                      "spin_tx"]),
                     st.integers(0, 9000))
    return draw(st.lists(st.one_of(poke, call), max_size=40))


@given(hostile_ops(), st.sampled_from(["end", "start"]))
@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_fuzzed_header_never_crashes(ops, align):
    v = Victim(align=align)
    try:
        r = v.ring
        corrupted = None
        for op in ops:
            if op[0] == "poke":
                off, width = FIELDS[op[1]]
                (v.evil.put_u64 if width == 8 else v.evil.put_u32)(off, op[2])
                continue
            name, size = op[1], op[2]
            try:
                if name == "readable":
                    assert 0 <= r.readable() <= 4096
                elif name == "status":
                    assert 0 <= r.status() < 32
                elif name == "tx_space":
                    assert 0 <= r.tx_space() <= 4096
                elif name == "write":
                    assert 0 <= r.write(b"w" * size) <= min(size, 4096)
                elif name == "writev":
                    assert 0 <= r.writev([b"v" * (size // 3)] * 3) <= min(size, 4096)
                elif name == "read_into":
                    assert 0 <= r.read_into(bytearray(size)) <= min(size, 4096)
                elif name == "read":
                    assert len(r.read(size)) <= min(size, 4096)
                elif name == "sleep_rx":
                    assert r.prepare_sleep_rx() >= 0
                elif name == "sleep_tx":
                    assert r.prepare_sleep_tx() >= 0
                elif name == "spin_tx":
                    assert r.spin_tx(0) >= 0
                else:
                    assert r.spin(0) >= 0
                assert corrupted is None, "a call succeeded after a sticky error"
            except RingCorrupted as exc:
                if corrupted is not None:
                    assert str(exc) == corrupted  # the same error, again
                corrupted = str(exc)
            except ValueError as exc:  # writes after our own EOF are the only other outcome
                assert "EOF" in str(exc)
    finally:
        v.close()


# ----------------------------------------------------------------- values flipped concurrently

def _exercise(v, deadline):
    """Hammer the victim until the deadline; reset the peer's header after each corruption."""
    corruptions = calls = 0
    buf = bytearray(8192)
    data = b"q" * 5000
    while time.monotonic() < deadline:
        r = v.ring
        ops = (lambda r=r: r.read_into(buf), r.status, lambda r=r: r.write(data),
               lambda r=r: r.writev([data[:700], data[:900]]), r.readable, r.tx_space,
               r.prepare_sleep_rx, lambda r=r: r.spin(0), lambda r=r: r.spin_tx(0))
        try:
            for _ in range(50):
                for call in ops:
                    assert call() >= 0
                    calls += 1
        except RingCorrupted:
            corruptions += 1
            r.close()
            # a fresh ring over fresh (zeroed) own cursors; the hostile side keeps flipping
            v.mine.rw[:] = bytes(len(v.mine.rw))
            v.ring = v.new_ring()
    return corruptions, calls


def test_values_flipped_from_a_thread_while_reading():
    v = Victim()
    stop = threading.Event()

    def flipper():
        rnd = random.Random(1)
        while not stop.is_set():
            for off, width in FIELDS:
                if rnd.random() < 0.1:  # garbage
                    value = rnd.getrandbits(8 * width)
                elif off == ring.OFF_STATE:
                    value = rnd.getrandbits(3)
                else:  # plausible for a fresh 4 KiB ring, so some calls succeed
                    value = rnd.randrange(4097)
                (v.evil.put_u64 if width == 8 else v.evil.put_u32)(off, value)

    t = threading.Thread(target=flipper)
    t.start()
    try:
        corruptions, calls = _exercise(v, time.monotonic() + 1.0)
    finally:
        stop.set()
        t.join()
        v.close()
    assert corruptions > 0 and calls > 0


def test_values_flipped_from_another_process_while_reading():
    v = Victim()
    child = spawn_python(script=program("ring_flipper.py"),
                         args=[v.evil.fd, v.evil.span, v.evil.offset, 1500], pass_fds=[v.evil.fd],
                         stdin=None)
    try:
        child.read_until("go")
        corruptions, calls = _exercise(v, time.monotonic() + 1.0)
    finally:
        child.stop()
        v.close()
    assert corruptions > 0 and calls > 0
