"""A hostile link-group peer: whatever it writes, we raise GroupCorrupted/RingCorrupted or ignore it.

The victim maps the peer's extent 0 and its heap extent between PROT_NONE guard pages, PROT_READ
(so any access outside them, or any store into them, kills the test with SIGSEGV), and its own
extent 0 between guard pages too. The hostile side writes its extents through its own writable
mapping: single faults, Hypothesis-fuzzed fields, and values flipped concurrently by a thread and
by another process while the victim reads.
"""

import ctypes
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
from slot_helpers import U64, Memfd, hdr, sealed_memfd
from smcish import ring
from smcish.ring import Extent, Group, GroupCorrupted, Ring, RingCorrupted, drain_doorbell

PAGE = mmap.PAGESIZE
PROT_NONE = 0  # Linux values; the mmap module does not export these two
MAP_FIXED = 0x10
SLOTS = 128
EXT1_SIZE = 65536 + 4096  # the largest block that fits is 64 KiB; a 4 KiB one ends flush at 65536
HYP = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value


class GuardedMemfd:
    """An extent in a sealed memfd, mapped for the victim between PROT_NONE guard pages.

    align="end": the extent's last byte is the last byte before the trailing guard page;
    align="start": it starts right after the leading guard page. `rw` is the owner's (hostile
    side's) plain writable mapping of the whole memfd, where offsets are shifted by `offset`.
    """

    def __init__(self, size, align="end"):
        self.size = size
        self.span = -(-size // PAGE) * PAGE
        self.offset = self.span - size if align == "end" else 0
        self.fd = sealed_memfd(self.span, "smcish-group-hostile")
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

    def put(self, off, fmt, value):
        bits = 8 * struct.calcsize(fmt)
        struct.pack_into(fmt, self.rw, self.offset + off, value % (1 << bits))

    def put_u64(self, off, value):
        self.put(off, "<Q", value)

    def put_u32(self, off, value):
        self.put(off, "<I", value)

    def get_u64(self, off):
        return struct.unpack_from("<Q", self.rw, self.offset + off)[0]

    def write(self, off, data):
        self.rw[self.offset + off:self.offset + off + len(data)] = data

    def close(self):
        for base, total in self._maps:
            _libc.munmap(base, total)
        self.rw.close()
        os.close(self.fd)


class Victim:
    """Our honest side of a group whose peer (`evil0`, `evil1`) the test writes freely."""

    def __init__(self, align="end"):
        self.mine0 = GuardedMemfd(ring.heap0(SLOTS), align)
        self.evil0 = GuardedMemfd(ring.heap0(SLOTS), align)
        self.evil1 = GuardedMemfd(EXT1_SIZE, align)
        self.mine1 = Memfd(1 << 16)
        self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)  # the evil hub's doorbell
        self.my0 = Extent(self.mine0.view(mmap.PROT_READ | mmap.PROT_WRITE), True)
        self.peer0 = Extent(self.evil0.view(mmap.PROT_READ), False)
        self.peer1 = Extent(self.evil1.view(mmap.PROT_READ), False)
        self.tx = Extent(self.mine1.rw, True)
        self.group = self.ring = None
        self.new_group()

    def new_group(self):
        """A fresh Group (and slot 0 ring) over our extents; it resumes from our extent 0."""
        if self.ring is not None:
            self.ring.close()
        if self.group is not None:
            self.group.close()
        self.group = Group(self.my0, self.peer0, self.efd, ring.ROLE_SERVER, SLOTS)
        self.group.add_peer_extent(1, self.peer1)
        self.ring = Ring.in_slot(self.group, 0, self.tx, 0, 4096, 1, 0, 12)
        return self.group

    def queue(self, *slots, start=0):
        """Hostile side: put entries into its queue from position `start`, publish nq_prod."""
        for i, slot in enumerate(slots):
            pos = (start + i) % ring.G_NQ_ENTRIES
            self.evil0.put_u32(ring.G_OFF_NQ + 4 * pos, slot)
        self.evil0.put_u64(ring.G_OFF_NQ_PROD, start + len(slots))

    def hdr(self, off, fmt, value, slot=0):
        self.evil0.put(hdr(slot) + off, fmt, value)

    def switch(self, seq, pos, ext, off, log2):
        """Hostile side: publish a switch descriptor for slot 0 (fields, then sw_seq)."""
        self.hdr(ring.OFF_SW_POS, "<Q", pos)
        self.hdr(ring.OFF_SW_OFF, "<Q", off)
        self.hdr(ring.OFF_SW_EXT, "<I", ext)
        self.hdr(ring.OFF_SW_LOG2, "<I", log2)
        self.hdr(ring.OFF_SW_SEQ, "<I", seq)

    def close(self):
        self.ring.close()
        self.group.close()
        for ext in (self.my0, self.peer0, self.peer1, self.tx):
            ext.release()
        for m in (self.mine0, self.evil0, self.evil1, self.mine1):
            m.close()
        os.close(self.efd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@pytest.fixture(params=["end", "start"])
def victim(request):
    v = Victim(align=request.param)
    yield v
    v.close()


def assert_group_sticky(g, match):
    """After a violation every queue call raises the same GroupCorrupted; CLOSING still works."""
    first = None
    for call in (lambda: g.take(), g.pending, g.prepare_sleep, lambda: g.spin(1),
                 lambda: g.notify(1)):
        with pytest.raises(GroupCorrupted, match=match) as info:
            call()
        first = first or str(info.value)
        assert str(info.value) == first
    assert g.error == first
    g.set_closing()


def assert_ring_sticky(r, match):
    for call in (r.readable, r.status, r.tx_space, lambda: r.write(b"x"), r.prepare_sleep_rx,
                 r.prepare_sleep_tx, lambda: r.read_into(bytearray(10)), lambda: r.spin(1),
                 lambda: r.spin_tx(1), lambda: r.writev([b"a", b"b"]), r.switch_pending):
        with pytest.raises(RingCorrupted, match=match):
            call()
    r.set_abort()


# ------------------------------------------------------------------------- the queue and cursors

def test_honest_peer_sanity(victim):
    victim.queue(3, 4, 127)
    assert victim.group.take() == ([3, 4, 127], False)
    assert victim.mine0.get_u64(ring.G_OFF_NQ_CONS_PEER) == 3
    victim.evil0.put_u64(ring.G_OFF_NQ_OVERFLOW, 1)
    assert victim.group.pending() and victim.group.take() == ([], True)
    victim.group.notify(5)  # the peer's nq_cons_peer (0) is fine
    assert victim.mine0.get_u64(ring.G_OFF_NQ_PROD) == 1


@pytest.mark.parametrize("back_to", [4, 0, U64 - 1])
def test_nq_prod_goes_backwards(victim, back_to):
    victim.queue(1, 2, 3, 4, 5)
    assert victim.group.take(2) == ([1, 2], False)
    victim.evil0.put_u64(ring.G_OFF_NQ_PROD, back_to)  # below what we saw
    with pytest.raises(GroupCorrupted, match=rf"nq_prod {back_to} outside \[5, 16386\]"):
        victim.group.take()
    assert_group_sticky(victim.group, "nq_prod")


@pytest.mark.parametrize("too_far", [ring.G_NQ_ENTRIES + 1, 1 << 40, U64 - 1])
def test_nq_prod_more_than_the_queue_ahead(victim, too_far):
    victim.evil0.put_u64(ring.G_OFF_NQ_PROD, too_far)
    assert victim.group.pending()  # pending only compares; take validates
    with pytest.raises(GroupCorrupted, match=rf"nq_prod {too_far} outside \[0, 16384\]"):
        victim.group.take()
    assert_group_sticky(victim.group, "nq_prod")


def test_a_full_queue_from_the_peer_is_fine(victim):
    victim.evil0.put_u64(ring.G_OFF_NQ_PROD, ring.G_NQ_ENTRIES)  # entries are all 0
    slots, overflow = victim.group.take(1 << 20)
    assert slots == [0] * ring.G_NQ_ENTRIES and not overflow


@pytest.mark.parametrize("entry", [SLOTS, ring.MAX_SLOTS - 1, ring.MAX_SLOTS, 0xFFFFFFFF])
def test_queued_slot_index_out_of_range(victim, entry):
    victim.queue(1, entry, 2)
    with pytest.raises(GroupCorrupted, match=rf"slot index {entry} is not below max_slots {SLOTS}"):
        victim.group.take()
    assert_group_sticky(victim.group, "slot index")


def test_entries_are_loaded_once(victim):
    # an entry changed after take copied it does not matter; entries are copied before the
    # consumption is published (a peer may reuse them right after)
    victim.queue(7)
    assert victim.group.take() == ([7], False)
    victim.evil0.put_u32(ring.G_OFF_NQ, 0xFFFFFFFF)
    assert victim.group.take() == ([], False)


def test_nq_cons_peer_beyond_our_prod(victim):
    victim.evil0.put_u64(ring.G_OFF_NQ_CONS_PEER, 1)
    with pytest.raises(GroupCorrupted, match=r"nq_cons_peer .* 1 outside \[\d+, 0\]"):
        victim.group.notify(1)  # the first notify re-reads it (the cache starts "full")
    assert_group_sticky(victim.group, "nq_cons_peer")


def test_nq_cons_peer_backwards_when_our_queue_is_full(victim):
    g = victim.group
    for _ in range(ring.G_NQ_ENTRIES):
        g.notify(1)
    victim.evil0.put_u64(ring.G_OFF_NQ_CONS_PEER, 100)
    g.notify(2)  # full: re-read, 100 entries free now
    assert g.overflows == 0
    for _ in range(99):
        g.notify(3)
    victim.evil0.put_u64(ring.G_OFF_NQ_CONS_PEER, 50)
    with pytest.raises(GroupCorrupted, match=r"nq_cons_peer .* 50 outside \[100, 16484\]"):
        g.notify(4)
    assert_group_sticky(g, "nq_cons_peer")


def test_wild_want_wake_and_gstate_are_harmless(victim):
    g = victim.group
    for value, rings in [(0xDEADBEEF, 1), (0xDEADBEEF, 0), (1, 1), (0, 0), (1, 0), (2, 1)]:
        victim.evil0.put_u32(ring.G_OFF_WANT_WAKE, value)
        g.notify(1)
        assert drain_doorbell(victim.efd) == rings
    victim.evil0.put_u32(ring.G_OFF_GSTATE, 0xFFFFFFFE)
    assert not g.peer_closing  # unknown bits ignored
    victim.evil0.put_u32(ring.G_OFF_GSTATE, 0xFFFFFFFF)
    assert g.peer_closing


def test_garbage_listener_count_is_clamped(victim):
    g = victim.group
    table = ring.G_OFF_LISTENERS + 8
    victim.evil0.put_u32(ring.G_OFF_LISTENERS, 0xFFFFFFFF)
    victim.evil0.put_u64(table + 8 * 62, 4242)  # the last real entry
    victim.evil0.put_u64(table + 8 * 63, 4343)  # beyond the table: never read
    assert g.peer_has_listener(4242) and not g.peer_has_listener(4343)
    victim.evil0.put_u64(table, 0)
    assert not g.peer_has_listener(0)


@given(st.integers(0, 65535), st.lists(st.one_of(
    st.integers(0, U64 - 1),
    st.tuples(st.sampled_from([0, 1, 2, 7]), st.sampled_from([0, 1, 2, SLOTS, SLOTS + 1, 0xFFFFFFFF])),
), min_size=ring.G_CLAIM_PROBE, max_size=ring.G_CLAIM_PROBE))
@settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_garbage_claim_table_never_yields_a_bad_slot(port, entries):
    with Victim() as v:
        home = ((port * 2654435761) % (1 << 32)) >> 19
        expected = []
        ports = [port, port + 1, 0, 0xFFFFFFFF]
        for i, e in enumerate(entries):
            value = e if isinstance(e, int) else (ports[e[0] % 4] % (1 << 32)) << 32 | e[1]
            v.evil0.put_u64(ring.G_OFF_CLAIMS + 8 * ((home + i) % ring.G_CLAIM_ENTRIES), value)
            if value >> 32 == port and 1 <= value & 0xFFFFFFFF <= SLOTS:
                expected.append((value & 0xFFFFFFFF) - 1)
        found = v.group.find_claims(port)
        assert found == expected and all(0 <= s < SLOTS for s in found)


# ------------------------------------------------------------------------ ring switch descriptors

def _block_ok(ext, off, log2):
    if not 12 <= log2 <= 30 or ext not in (0, 1):
        return False
    size = ring.heap0(SLOTS) if ext == 0 else EXT1_SIZE
    cap = 1 << log2
    return off % cap == 0 and off + cap <= size


def test_honest_switch_from_a_hostile_peer_is_followed(victim):
    r = victim.ring
    victim.evil1.write(0, b"a" * 100)
    victim.hdr(ring.OFF_PROD, "<Q", 100)
    assert r.readable() == 100
    victim.switch(1, 100, 1, 8192, 13)
    victim.evil1.write(8192, b"b" * 8192)
    victim.hdr(ring.OFF_PROD, "<Q", 100 + 8192)  # exactly the new block full
    assert r.readable() == 100 + 8192 and r.rx_extents == (1,) and r.rx_switches == 0
    assert r.read() == b"a" * 100 + b"b" * 8192
    assert r.rx_switches == 1 and r.rx_capacity == 8192
    # the descriptor was loaded once: rewriting it later changes nothing
    victim.hdr(ring.OFF_SW_OFF, "<Q", 12345)
    victim.hdr(ring.OFF_SW_LOG2, "<I", 99)
    victim.evil1.write(8192 + 100, b"c" * 10)  # cursor 8292 sits at offset 100 of the block
    victim.hdr(ring.OFF_PROD, "<Q", 100 + 8192 + 10)
    assert r.read() == b"c" * 10


def test_blocks_flush_with_the_extent_end_are_read_exactly(victim):
    # The last byte of each block below is the last byte of its extent, right before a guard
    # page: a one-byte over-read in the copy paths is a SIGSEGV (checked with a planted bug).
    r = Ring.in_slot(victim.group, 1, victim.tx, 8192, 4096, 1, 65536, 12)
    victim.evil1.write(65536, bytes(range(256)) * 16)
    victim.hdr(ring.OFF_PROD, "<Q", 4096, slot=1)
    assert r.read_into(bytearray(4096)) == 4096
    end0 = ring.heap0(SLOTS)
    victim.hdr(ring.OFF_SW_POS, "<Q", 4096 + 100, slot=1)  # the switch lies 100 B ahead
    victim.hdr(ring.OFF_SW_OFF, "<Q", end0 - 8192, slot=1)  # the last 8 KiB of extent 0
    victim.hdr(ring.OFF_SW_EXT, "<I", 0, slot=1)
    victim.hdr(ring.OFF_SW_LOG2, "<I", 13, slot=1)
    victim.hdr(ring.OFF_SW_SEQ, "<I", 1, slot=1)
    victim.hdr(ring.OFF_PROD, "<Q", 4096 + 100 + 8192, slot=1)  # old rest + a full new block
    out = bytearray(100 + 8192)
    # the old block's last 100 B (wrapped to its start), then the new block from offset 4196 to
    # the end of extent 0 and around
    assert r.read_into(out) == len(out)
    assert out[:100] == (bytes(range(256)) * 16)[:100]
    assert r.rx_switches == 1 and r.rx_extents == (0,)
    victim.hdr(ring.OFF_PROD, "<Q", 4096 + 100 + 8192 + 8192 - 100, slot=1)
    assert r.read_into(out) == 8192 - 100  # again across the end of extent 0
    r.close()


@pytest.mark.parametrize("seq", [2, 3, 0xFFFFFFFF])
def test_switch_seq_jumps(victim, seq):
    victim.switch(seq, 0, 1, 0, 12)
    with pytest.raises(RingCorrupted, match=rf"sw_seq {seq} is neither 0 .* nor 1"):
        victim.ring.readable()
    assert_ring_sticky(victim.ring, "sw_seq")


def test_switch_seq_back_after_completion(victim):
    victim.switch(1, 0, 1, 8192, 13)
    assert victim.ring.readable() == 0 and victim.ring.rx_switches == 1
    victim.hdr(ring.OFF_SW_SEQ, "<I", 0)
    with pytest.raises(RingCorrupted, match=r"sw_seq 0 is neither 1 .* nor 2"):
        victim.ring.status()


def test_switch_seq_back_while_pending_is_ignored(victim):
    victim.hdr(ring.OFF_PROD, "<Q", 10)
    victim.switch(1, 10, 1, 8192, 13)
    assert victim.ring.readable() == 10
    victim.hdr(ring.OFF_SW_SEQ, "<I", 0)  # the recorded switch stands
    victim.hdr(ring.OFF_PROD, "<Q", 20)
    assert len(victim.ring.read()) == 20 and victim.ring.rx_switches == 1


def test_switch_pos_behind_the_last_prod(victim):
    victim.hdr(ring.OFF_PROD, "<Q", 100)
    assert victim.ring.readable() == 100
    victim.switch(1, 50, 1, 8192, 13)
    with pytest.raises(RingCorrupted, match=r"sw_pos 50 outside \[100, 4096\]"):
        victim.ring.readable()
    assert_ring_sticky(victim.ring, "sw_pos")


@pytest.mark.parametrize("pos", [4097, 1 << 40, U64 - 1])
def test_switch_pos_beyond_the_old_ring(victim, pos):
    victim.hdr(ring.OFF_PROD, "<Q", 100)
    assert len(victim.ring.read(60)) == 60
    victim.switch(1, pos + 60, 1, 8192, 13)
    with pytest.raises(RingCorrupted, match="sw_pos"):
        victim.ring.status()


@pytest.mark.parametrize("ext, off, log2, match", [
    (1, 0, 11, "log2 11 outside"), (1, 0, 31, "log2 31 outside"), (1, 0, 0xFFFFFFFF, "log2"),
    (2, 0, 12, "extent 2 is not attached"), (31, 0, 12, "extent 31"), (32, 0, 12, "extent 32"),
    (0xFFFFFFFF, 0, 12, "extent 4294967295"), (1, 4096, 13, "not a multiple"),
    (1, 65536, 13, "exceeds the extent's 69632 bytes"), (1, 69632, 12, "exceeds"),
    (1, 65540, 12, "not a multiple"),
    (1, U64 - 4096, 12, "exceeds"), (0, 0, 20, "exceeds"),
])
def test_switch_to_a_bad_block(victim, ext, off, log2, match):
    victim.switch(1, 0, ext, off, log2)
    with pytest.raises(RingCorrupted, match=match):
        victim.ring.read_into(bytearray(10))
    assert_ring_sticky(victim.ring, "invalid ring block")


def test_prod_beyond_the_switch_bound(victim):
    victim.hdr(ring.OFF_PROD, "<Q", 100)
    victim.switch(1, 100, 1, 8192, 13)
    victim.hdr(ring.OFF_PROD, "<Q", 100 + 8192 + 1)
    with pytest.raises(RingCorrupted, match=r"prod 8293 outside \[0, 8292\] .* old ring's 100 bytes"):
        victim.ring.readable()
    assert_ring_sticky(victim.ring, "peer prod")


def test_switch_after_eof_keeps_eof_rules(victim):
    victim.hdr(ring.OFF_PROD, "<Q", 10)
    victim.hdr(ring.OFF_EOF_POS, "<Q", 10)
    victim.hdr(ring.OFF_STATE, "<I", ring.STATE_EOF)
    assert victim.ring.status() & ring.ST_DATA
    victim.switch(1, 10, 1, 8192, 13)
    assert len(victim.ring.read()) == 10 and victim.ring.status() & ring.ST_EOF
    victim.hdr(ring.OFF_PROD, "<Q", 11)
    with pytest.raises(RingCorrupted, match="moved after EOF"):
        victim.ring.readable()


@given(st.integers(0, (1 << 32) - 1) | st.sampled_from([0, 1, 2]),
       st.integers(0, U64 - 1) | st.sampled_from([0, 4096, 8192, 65536, 69632]),
       st.integers(0, (1 << 32) - 1) | st.integers(10, 32))
@settings(deadline=None, max_examples=200)
def test_hostile_ring0_block_at_in_slot(ext, off, log2):
    with Victim() as v:
        ok = _block_ok(ext, off, log2)
        try:
            r = Ring.in_slot(v.group, 1, v.tx, 8192, 4096, ext, off, log2)
        except RingCorrupted as exc:
            assert not ok and "invalid ring block" in str(exc)
            return
        assert ok
        cap = 1 << log2
        v.evil0.put_u64(hdr(1) + ring.OFF_PROD, cap)  # a full ring: every byte of the block
        assert r.readable() == cap and r.read_into(bytearray(cap)) == cap
        r.close()


# ----------------------------------------------------------------------------- fuzzing everything

GROUP_FIELDS = [(ring.G_OFF_NQ_PROD, "<Q"), (ring.G_OFF_NQ_OVERFLOW, "<Q"),
                (ring.G_OFF_NQ_CONS_PEER, "<Q"), (ring.G_OFF_WANT_WAKE, "<I"),
                (ring.G_OFF_GSTATE, "<I"), (ring.G_OFF_LISTENERS, "<I"), (ring.G_OFF_NQ, "<I"),
                (ring.G_OFF_NQ + 4, "<I")]
SLOT_FIELDS = [(ring.OFF_PROD, "<Q"), (ring.OFF_SW_SEQ, "<I"), (ring.OFF_SW_LOG2, "<I"),
               (ring.OFF_SW_POS, "<Q"), (ring.OFF_SW_OFF, "<Q"), (ring.OFF_SW_EXT, "<I"),
               (ring.OFF_CONS_PEER, "<Q"), (ring.OFF_STATE, "<I"), (ring.OFF_WANT_DATA, "<I"),
               (ring.OFF_WANT_SPACE, "<I"), (ring.OFF_EOF_POS, "<Q")]
FIELDS = [(off, fmt) for off, fmt in GROUP_FIELDS] + [(hdr(0) + off, fmt) for off, fmt in SLOT_FIELDS]
MAX_READ = 4096 + 65536  # the old block's rest plus the largest block extent 1 can hold


def value_strategy():
    return st.one_of(st.integers(0, 10000), st.integers(0, U64 - 1), st.integers(U64 - 10000, U64 - 1),
                     st.sampled_from([0, 1, 2, 12, 13, 16, 127, 128, 4096, 8192, 16384, 65536]))


def _call(v, name, size):
    """One victim call; returns normally, or raises RingCorrupted/GroupCorrupted."""
    g, r = v.group, v.ring
    if name == "take":
        slots, _ = g.take()
        assert all(0 <= s < SLOTS for s in slots) and len(slots) <= ring.G_NQ_ENTRIES
    elif name == "pending":
        g.pending()
    elif name == "notify":
        g.notify(size % SLOTS)
    elif name == "gsleep":
        g.prepare_sleep()
        g.clear_wake()
    elif name == "claims":
        assert all(0 <= s < SLOTS for s in g.find_claims(size))
    elif name == "listener":
        g.peer_has_listener(size)
        g.peer_closing  # noqa: B018
    elif name == "readable":
        assert 0 <= r.readable() <= MAX_READ
    elif name == "status":
        assert 0 <= r.status() < 32
    elif name == "write":
        assert 0 <= r.write(b"w" * size) <= min(size, 4096)
    elif name == "read_into":
        assert 0 <= r.read_into(bytearray(size)) <= size
    elif name == "read":
        assert len(r.read(size)) <= size
    elif name == "tx_space":
        assert 0 <= r.tx_space() <= 4096
    elif name == "sleep_rx":
        assert r.prepare_sleep_rx() >= 0
    elif name == "sleep_tx":
        assert r.prepare_sleep_tx() >= 0
    elif name == "spin":
        assert r.spin(0) >= 0
    elif name == "switch_pending":
        r.switch_pending()
    else:
        raise AssertionError(name)


STICKY_GROUP_CALLS = ("take", "pending", "notify", "gsleep")  # claims and listeners are hints
CALLS = ["take", "pending", "notify", "gsleep", "claims", "listener", "readable", "status", "write",
         "read_into", "read", "tx_space", "sleep_rx", "sleep_tx", "spin", "switch_pending"]


@st.composite
def hostile_ops(draw):
    poke = st.tuples(st.just("poke"), st.sampled_from(range(len(FIELDS))), value_strategy())
    call = st.tuples(st.just("call"), st.sampled_from(CALLS), st.integers(0, 70000))
    return draw(st.lists(st.one_of(poke, call), max_size=40))


@given(hostile_ops(), st.sampled_from(["end", "start"]))
@HYP
def test_fuzzed_group_and_slot_header_never_crash(ops, align):
    with Victim(align) as v:
        errors = {"ring": None, "group": None}
        for op, a, b in ops:
            if op == "poke":
                off, fmt = FIELDS[a]
                v.evil0.put(off, fmt, b)
                continue
            kind = "group" if CALLS.index(a) < 6 else "ring"
            try:
                _call(v, a, b)
                if kind == "ring" or a in STICKY_GROUP_CALLS:
                    assert errors[kind] is None, "a call succeeded after a sticky error"
            except GroupCorrupted as exc:
                assert kind == "group"
                assert errors["group"] in (None, str(exc))
                errors["group"] = str(exc)
            except RingCorrupted as exc:
                assert kind == "ring"
                assert errors["ring"] in (None, str(exc))
                errors["ring"] = str(exc)
            except ValueError as exc:  # writes after our own EOF are the only other outcome
                assert "EOF" in str(exc)


# ----------------------------------------------------------------- values flipped concurrently

def _exercise(v, deadline):
    """Hammer the victim with random calls until the deadline; recover from each corruption.

    A GroupCorrupted starts a fresh group (our extent 0 zeroed); a RingCorrupted only a fresh
    ring in the same slot (our slot header reset), so the ring paths keep running while the
    group's fields are flipped too. Returns (group corruptions, ring corruptions, calls).
    """
    group_errors = ring_errors = calls = 0
    rnd = random.Random(3)
    while time.monotonic() < deadline:
        for _ in range(200):
            name = rnd.choice(CALLS)
            try:
                _call(v, name, rnd.randrange(8192))
                calls += 1
            except GroupCorrupted:
                group_errors += 1
                v.mine0.rw[:] = bytes(len(v.mine0.rw))
                v.new_group()
            except RingCorrupted:
                ring_errors += 1
                v.ring.close()
                v.group.reset_slot(0)
                v.ring = Ring.in_slot(v.group, 0, v.tx, 0, 4096, 1, 0, 12)
    return group_errors, ring_errors, calls


def _plausible(rnd, off):
    """A value for the field at `off` that an honest peer could have written (mostly)."""
    if rnd.random() < 0.1:
        return rnd.getrandbits(64)
    field = off - hdr(0) if off >= hdr(0) else None
    if field == ring.OFF_SW_SEQ:
        return rnd.randrange(3)
    if field == ring.OFF_SW_LOG2:
        return rnd.choice([12, 13, 16, 40])
    if field == ring.OFF_SW_EXT:
        return rnd.randrange(3)
    if field == ring.OFF_SW_OFF:
        return rnd.choice([0, 4096, 8192, 65536])
    if field == ring.OFF_STATE or off == ring.G_OFF_GSTATE:
        return rnd.getrandbits(3)
    if off in (ring.G_OFF_NQ, ring.G_OFF_NQ + 4):
        return rnd.randrange(SLOTS + 2)
    return rnd.randrange(4097)


def test_values_flipped_from_a_thread_while_reading():
    v = Victim()
    stop = threading.Event()

    def flipper():
        rnd = random.Random(1)
        while not stop.is_set():
            for off, fmt in FIELDS:
                v.evil0.put(off, fmt, _plausible(rnd, off))

    t = threading.Thread(target=flipper)
    t.start()
    try:
        group_errors, ring_errors, calls = _exercise(v, time.monotonic() + 1.0)
    finally:
        stop.set()
        t.join()
        v.close()
    assert group_errors > 0 and ring_errors > 0 and calls > 0


def test_values_flipped_from_another_process_while_reading():
    v = Victim()
    spec = ",".join(f"{off}:{fmt}" for off, fmt in FIELDS)
    child = spawn_python(script=program("group_flipper.py"),
                         args=[v.evil0.fd, v.evil0.span, v.evil0.offset, 1500, hdr(0), spec],
                         pass_fds=[v.evil0.fd], stdin=None)
    try:
        child.read_until("go")
        group_errors, ring_errors, calls = _exercise(v, time.monotonic() + 1.0)
    finally:
        child.stop()
        v.close()
    assert group_errors > 0 and ring_errors > 0 and calls > 0


def test_send_only_ring_reads_nothing_until_attached_and_attaches_once():
    """The optimistic client's ring: writable at once, blind to the peer's header (whatever the
    hostile side wrote there) until attach_rx() with a validated block; attach only once."""
    with Victim() as v:
        for off in range(0, ring.HEADER_SIZE, 8):         # garbage all over the peer's header
            v.hdr(off, "<Q", U64 - 1 - off, slot=2)
        r = Ring.in_slot(v.group, 2, v.tx, 8192, 4096, 0, 0, None)
        try:
            assert not r.rx_attached and r.rx_extents == ()
            assert r.write(b"early bytes") == 11
            assert r.read(100) == b""
            with pytest.raises(RingCorrupted):
                r.attach_rx(1, 4096, 0)              # log2 0 is no block
            assert not r.rx_attached
            r.attach_rx(1, 4096, 12)
            assert r.rx_attached and r.rx_extents == (1,)
            with pytest.raises(ValueError):
                r.attach_rx(1, 8192, 12)
        finally:
            r.close()


def test_send_only_ring_with_a_hostile_block_is_corrupted_for_good():
    with Victim() as v:
        r = Ring.in_slot(v.group, 2, v.tx, 8192, 4096, 0, 0, None)
        try:
            with pytest.raises(RingCorrupted, match="not a multiple"):
                r.attach_rx(1, 4096 + 1, 12)
            assert not r.rx_attached
            with pytest.raises(RingCorrupted):
                r.attach_rx(1, 4096, 12)             # sticky: the peer lied once
        finally:
            r.close()


def test_the_peers_cpu_hint_only_makes_a_spin_yield():
    """The peer's "CPU I poll on" field is a hint: our own CPU there makes a spin yield the CPU
    (counted), any other value changes nothing; a spin never reports an entry that is not there
    and still finds one that is."""
    cpu = sorted(os.sched_getaffinity(0))[0]
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        with Victim() as v:
            g = v.group
            for value in (0, cpu + 2, U64 & 0xFFFFFFFF, cpu + 1):
                v.evil0.put_u32(ring.G_OFF_CPU, value)
                before = g.spin_colocated
                assert g.spin(200) is False
                assert (g.spin_colocated > before) == (value == cpu + 1), value
            # we published our own CPU (1 + cpu) for the peer
            assert struct.unpack_from("<I", v.mine0.rw, v.mine0.offset + ring.G_OFF_CPU)[0] == cpu + 1
            v.queue(0)
            assert g.spin(200) is True
    finally:
        os.sched_setaffinity(0, saved)
