"""Slot rings and link groups between two honest sides in one process (smcish.ring, v2).

Every extent is a sealed memfd; each side maps its own read-write and the peer's PROT_READ, so a
store into a peer mapping would kill the test with SIGSEGV. Doorbells are real eventfds.
"""

import ctypes
import struct
import threading

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from slot_helpers import U64, Blocks, GroupPair, Memfd, hdr, payload
from smcish import ring
from smcish.ring import (
    ST_DATA,
    ST_EOF,
    ST_SPACE,
    Extent,
    Group,
    GroupCorrupted,
    Ring,
    RingCorrupted,
    Setup,
    drain_doorbell,
)

HYP = settings(deadline=None, max_examples=150,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CAPS = [4096, 8192, 16384, 65536]


# ------------------------------------------------------------------------------- constants, API

def test_every_c_constant_is_exported_without_prefix():
    lib = ring._lib
    names = [n for n in dir(lib) if n.startswith("SMC_") and isinstance(getattr(lib, n), int)]
    assert len(names) > 80
    for name in names:
        assert getattr(ring, name[4:]) == getattr(lib, name), name
        assert name[4:] in ring.__all__
    assert ring.heap0(128) == 256 * 1024 + 128 * 512 == ring.G_OFF_HDRS + 128 * ring.HEADER_SIZE
    # layout of design.md 2.2 / 2.3
    assert (ring.G_OFF_NQ_PROD, ring.G_OFF_NQ_OVERFLOW, ring.G_OFF_NQ_CONS_PEER, ring.G_OFF_WANT_WAKE,
            ring.G_OFF_GSTATE, ring.G_OFF_LISTENERS, ring.G_OFF_CLAIMS, ring.G_OFF_NQ) == (
            128, 136, 256, 384, 388, 512, 4096, 69632)
    assert (ring.OFF_SW_SEQ, ring.OFF_SW_LOG2, ring.OFF_SW_POS, ring.OFF_SW_OFF, ring.OFF_SW_EXT,
            ring.OFF_SETUP, ring.OFF_RELEASED) == (8, 12, 16, 24, 32, 384, 464)
    assert issubclass(GroupCorrupted, RingCorrupted) and issubclass(GroupCorrupted, ConnectionResetError)


def test_group_init_writes_magic_and_validates_arguments():
    with GroupPair() as p:
        assert p.a.ext0.get_u64(0) == ring.G_MAGIC
        assert p.a.ext0.get_u32(8) == ring.G_VERSION and p.a.ext0.get_u32(12) == ring.ROLE_CLIENT
        assert p.b.ext0.get_u32(12) == ring.ROLE_SERVER
        assert p.ga.max_slots == 128 and not p.ga.closed and p.ga.error is None
    small, big, other = Memfd(ring.heap0(128) - 8), Memfd(ring.heap0(256)), Memfd(ring.heap0(256))
    exts = []

    def ext(mem, writable):
        exts.append(Extent(mem, writable))
        return exts[-1]

    try:
        mine, peer = ext(big.rw, True), ext(other.ro, False)
        for bad in [{"max_slots": 100}, {"max_slots": 64}, {"max_slots": 32768},
                    {"max_slots": 512}, {"role": 3}, {"fd": -2}]:
            with pytest.raises(ValueError):
                Group(mine, peer, bad.get("fd", -1), bad.get("role", ring.ROLE_SERVER),
                      bad.get("max_slots", 256))
        with pytest.raises(ValueError):
            Group(ext(small.rw, True), peer, -1, ring.ROLE_CLIENT, 128)  # too short
        with pytest.raises(ValueError):
            Group(mine, ext(small.ro, False), -1, ring.ROLE_CLIENT, 128)
        with pytest.raises(ValueError):
            Group(ext(big.ro, False), peer, -1, ring.ROLE_CLIENT, 128)  # ours must be writable
        with pytest.raises(TypeError):
            Extent(big.ro, True)
        with pytest.raises(ValueError):  # both extent 0s in one buffer
            Group(mine, ext(memoryview(big.rw).toreadonly(), False), -1, ring.ROLE_CLIENT, 128)
        g = Group(mine, peer, -1, ring.ROLE_CLIENT, 256)
        for index in (0, 32, -1):
            with pytest.raises(ValueError):
                g.add_peer_extent(index, ext(small.ro, False))
        g.add_peer_extent(3, ext(small.ro, False))
        with pytest.raises(ValueError, match="already attached"):
            g.add_peer_extent(3, ext(small.ro, False))
        with pytest.raises(ValueError):
            g.add_peer_extent(4, mine)  # our own extent 0 is not a peer extent
        g.remove_peer_extent(3)
        with pytest.raises(ValueError, match="not attached"):
            g.remove_peer_extent(3)
        g.close()
        g.close()
        assert g.closed and g.error == "link group is closed"
        for call in (lambda: g.notify(0), g.take, g.pending, g.prepare_sleep, lambda: g.spin(0),
                     lambda: g.post_claim(1, 1), lambda: g.find_claims(1), g.set_closing,
                     lambda: g.read_peer_setup(0), lambda: g.reset_slot(0)):
            with pytest.raises(ValueError, match="closed"):
                call()
        g.clear_wake()  # no-op after close
        assert g.peer_closing is False
        with pytest.raises(BufferError):
            big.rw.close()  # exported
        mine.release()
        mine.release()
        assert mine.released
        with pytest.raises(ValueError, match="released"):
            Group(mine, peer, -1, ring.ROLE_CLIENT, 256)
    finally:
        for e in exts:
            e.release()
        for m in (small, big, other):
            m.close()


def test_in_slot_rejects_bad_local_arguments_and_bad_peer_blocks():
    with GroupPair() as p:
        a1 = p.a.rw[1]
        for args in [(128, a1, 0, 4096), (-1, a1, 0, 4096), (0, a1, 100, 4096), (0, a1, 0, 6000),
                     (0, a1, 4 << 20, 4096), (0, p.a.ro[1], 0, 4096)]:
            with pytest.raises(ValueError):
                Ring.in_slot(p.ga, args[0], args[1], args[2], args[3], 1, 0, 12)
        with pytest.raises(TypeError):
            Ring.in_slot(p.ga, 0, bytearray(8192), 0, 4096, 1, 0, 12)
        with pytest.raises(ValueError):  # our block may not cover our own slot header
            Ring.in_slot(p.ga, 0, p.a.rw[0], ring.G_OFF_HDRS, 4096, 1, 0, 12)
        cases = [((1, 0, 11), "log2 11 outside"), ((1, 0, 31), "log2 31 outside"),
                 ((5, 0, 12), "extent 5 is not attached"), ((32, 0, 12), "extent 32"),
                 ((1, 4096, 13), "not a multiple"), ((1, 4 << 20, 12), "exceeds the extent"),
                 ((1, U64 - 4096, 12), "exceeds"), ((0, 0, 30), "exceeds")]
        for (ext, off, log2), match in cases:
            with pytest.raises(RingCorrupted, match=match):
                Ring.in_slot(p.ga, 0, a1, 0, 4096, ext, off, log2)
        # a block in the peer's extent 0 heap is fine
        r = Ring.in_slot(p.ga, 0, a1, 0, 4096, 0, p.b.heap0, 12)
        assert r.rx_extents == (0,) and r.slot == 0
        r.close()
        p.gb.close()
        with pytest.raises(ValueError, match="closed"):
            Ring.in_slot(p.gb, 0, p.b.rw[1], 0, 4096, 1, 0, 12)


def test_legacy_ring_has_no_switch():
    fd_a, fd_b = Memfd(ring.region_size(4096)), Memfd(ring.region_size(4096))
    try:
        r = Ring(fd_a.rw, fd_b.ro, 4096, 4096)
        assert r.rx_extents == () and r.tx_switches == 0 and r.slot is None
        for off in range(8, 40, 4):  # garbage in the switch fields: never read in legacy mode
            fd_b.put_u32(off, 0xFFFFFFFF)
        fd_b.put_u64(ring.OFF_PROD, 10)
        assert r.readable() == 10 and len(r.read()) == 10 and r.rx_switches == 0
        assert not r.switch_pending()
        with pytest.raises(ValueError, match="slot ring"):
            r.switch_tx(Extent(fd_a.rw, True), 0, 4096, 1)
        assert ring._lib.smc_tx_switch(r._r, ring._ffi.cast("uint8_t *", 4096), 4096, 1, 0) == ring.EINVAL
        r.close()
    finally:
        fd_a.close()
        fd_b.close()


# ------------------------------------------------------------------------------- basic slot data

def test_slot_ring_roundtrip_and_headers():
    with GroupPair() as p:
        ra, rb = p.slot_rings(7, 4096, 8192, at_a=(1, 8192), at_b=(2, 0))
        assert ra.tx_capacity == 4096 and ra.rx_capacity == 8192 and ra.rx_extents == (2,)
        assert ra.write(b"hello") == 5 and rb.read() == b"hello"
        assert rb.write(payload(9000, 1)) == 8192
        assert ra.read() == payload(8192, 1)
        assert p.a.ext0.get_u64(hdr(7) + ring.OFF_PROD) == 5
        assert p.b.ext0.get_u64(hdr(7) + ring.OFF_CONS_PEER) == 5
        assert p.a.ext0.get_u64(hdr(7) + ring.OFF_CONS_PEER) == 8192
        assert bytes(p.a.mem[1].rw[8192:8197]) == b"hello"  # A's block at (1, 8192)
        # nothing but our own slot header moved (no magic, no other slot)
        assert p.a.ext0.get_u64(hdr(6) + ring.OFF_PROD) == 0
        ra.set_eof()
        assert rb.status() & ST_EOF
        assert "slot=7" in repr(ra)


def test_read_crosses_a_switch_in_one_call():
    with GroupPair() as p:
        ra, rb = p.slot_rings(1, 4096, 4096)
        assert ra.write(payload(3000, 1)) == 3000
        assert ra.switch_tx(p.a.rw[2], 65536, 65536, 2)
        assert ra.switch_pending() and ra.tx_capacity == 65536 and ra.tx_switches == 1
        assert ra.tx_space() == 65536  # the new block is empty; the old one still holds 3000 B
        assert ra.write(payload(70000, 2)) == 65536
        out = bytearray(3000 + 65536)
        assert rb.read_into(out) == len(out)
        assert out == payload(3000, 1) + payload(70000, 2)[:65536]
        assert rb.rx_switches == 1 and rb.rx_capacity == 65536 and rb.rx_extents == (2,)
        assert not ra.switch_pending()


def test_switch_busy_until_the_consumer_read_a_byte_of_the_current_block():
    with GroupPair() as p:
        ra, rb = p.slot_rings(2)
        ra.write(b"x" * 100)
        assert ra.switch_tx(p.a.rw[1], 8192, 8192, 1)  # the first switch is always allowed
        assert not ra.switch_tx(p.a.rw[1], 16384, 4096, 1)  # nothing of block 2 read yet
        ra.write(b"y" * 10)
        assert rb.read(100) == b"x" * 100  # consumer exactly at the switch point
        assert not ra.switch_pending()  # the old block will not be read again
        assert not ra.switch_tx(p.a.rw[1], 16384, 4096, 1)  # but no byte of block 2 is read
        assert rb.read(1) == b"y"
        assert ra.switch_tx(p.a.rw[1], 16384, 4096, 1)  # now it is
        assert ra.tx_switches == 2
        assert rb.read() == b"y" * 9 and rb.rx_switches == 2 and rb.rx_capacity == 4096


def test_switch_into_the_current_block_only_when_drained():
    with GroupPair() as p:
        ra, rb = p.slot_rings(3, 8192)
        ra.write(b"abc")
        with pytest.raises(ValueError, match="overlaps"):
            ra.switch_tx(p.a.rw[1], 0, 4096, 1)  # would overwrite unread bytes
        assert rb.read() == b"abc"
        assert ra.switch_tx(p.a.rw[1], 0, 4096, 1)  # drained: shrinking in place is fine
        assert not ra.switch_pending()
        assert ra.write(payload(5000, 3)) == 4096 and rb.read() == payload(4096, 3)
        with pytest.raises(ValueError):
            ra.switch_tx(p.a.rw[1], 100, 4096, 1)  # misaligned
        with pytest.raises(ValueError):
            ra.switch_tx(p.a.rw[1], 0, 4096, 32)  # extent index
        with pytest.raises(ValueError):
            ra.switch_tx(p.a.ro[1], 8192, 4096, 1)  # not ours to write


def test_a_drained_switch_completes_on_the_consumers_next_look():
    with GroupPair() as p:
        ra, rb = p.slot_rings(4)
        assert ra.switch_tx(p.a.rw[2], 0, 1 << 20, 2)  # before any byte: sw_pos == 0
        assert rb.readable() == 0 and rb.rx_switches == 1 and rb.rx_capacity == 1 << 20
        assert rb.rx_extents == (2,)
        assert ra.write(payload(1 << 20, 4)) == 1 << 20 and rb.read() == payload(1 << 20, 4)


@pytest.mark.parametrize("start", [U64 - 1, U64 - 4096, U64 - 5000, (1 << 63) + 12345])
def test_switches_across_the_2_64_wrap(start):
    with GroupPair() as p:
        ra, rb = p.slot_rings(5, 4096, 4096, start_a=start)
        blocks = [(1, 8192, 8192), (2, 0, 4096), (1, 65536, 65536), (2, 4096, 4096)]
        sent, got = bytearray(), bytearray()
        for seed, (ext, off, cap) in enumerate(blocks, start=1):
            data = payload(3 * cap // 2 + 7, seed)
            n = ra.write(data)
            sent += data[:n]
            got += rb.read(n // 2 + 1)
            assert ra.switch_tx(p.a.rw[ext], off, cap, ext)
            n = ra.write(data)
            sent += data[:n]
            got += rb.read()
        assert got == sent and rb.rx_switches == ra.tx_switches == 4
        assert p.a.ext0.get_u64(hdr(5) + ring.OFF_PROD) == (start + len(sent)) % U64
        ra.set_eof()
        assert rb.status() & ST_EOF


# ------------------------------------------------------------------- the byte-stream property

@st.composite
def switch_scenario(draw):
    caps = st.sampled_from(CAPS)
    cap_a, cap_b = draw(caps), draw(caps)
    start = st.one_of(st.just(0), st.integers(0, U64 - 1), st.integers(U64 - 3 * 65536, U64 - 1))
    start_a, start_b = draw(start), draw(start)
    size = st.one_of(st.integers(0, 64), st.integers(0, 3 * 65536))
    who = st.sampled_from("ab")
    op = st.one_of(
        st.tuples(st.just("write"), who, size, st.sampled_from(["bytes", "bytearray", "memoryview"])),
        st.tuples(st.just("writev"), who, st.lists(size, max_size=5), st.none()),
        st.tuples(st.just("read_into"), who, size, st.none()),
        st.tuples(st.just("read"), who, st.one_of(st.just(-1), size), st.none()),
        st.tuples(st.just("switch"), who, caps, st.sampled_from([0, 1, 2])),
        st.tuples(st.just("check"), who, st.none(), st.none()),
    )
    return cap_a, cap_b, start_a, start_b, draw(st.lists(op, max_size=50))


class Direction:
    """Model of one direction: absolute cursors, the current block and a pending old block."""

    def __init__(self, sender, receiver, side, blocks, cap, start):
        self.sender, self.receiver, self.side, self.blocks = sender, receiver, side, blocks
        self.prod = self.cons = self.tx_start = start
        self.switches = 0
        self.cur = (1, 0, cap)
        self.old = None
        self.queue = bytearray()

    def space(self):
        return self.cur[2] - (self.prod - max(self.cons, self.tx_start))

    def collect(self):
        if self.old is not None and self.cons >= self.tx_start:
            self.blocks.free(*self.old)
            self.old = None


def _source(kind, data):
    if kind == "bytes":
        return data
    if kind == "bytearray":
        return bytearray(data)
    return memoryview(b"#" + data + b"#")[1:-1]


@given(switch_scenario())
@HYP
def test_any_writes_reads_and_switches_deliver_exact_bytes_in_order(scenario):
    cap_a, cap_b, start_a, start_b, ops = scenario
    with GroupPair() as p:
        ra, rb = p.slot_rings(9, cap_a, cap_b, at_a=(1, 0), at_b=(1, 0), start_a=start_a, start_b=start_b)
        heap = (p.a.heap0, p.a.mem[0].size)
        dirs = {}
        for who, sender, receiver, side, cap, start in (("a", ra, rb, p.a, cap_a, start_a),
                                                        ("b", rb, ra, p.b, cap_b, start_b)):
            blocks = Blocks({0: heap, 1: (0, 4 << 20), 2: (0, 4 << 20)})
            blocks.take(1, 0, cap)
            dirs[who] = Direction(sender, receiver, side, blocks, cap, start)
        counter = 0
        for op, who, arg, extra in ops:
            d = dirs[who]
            if op in ("write", "writev"):
                sizes = [arg] if op == "write" else arg
                parts = []
                for size in sizes:
                    counter += 1
                    parts.append(payload(size, counter))
                if op == "write":
                    n = d.sender.write(_source(extra, parts[0]))
                else:
                    n = d.sender.writev(parts)
                assert n == min(sum(sizes), d.space())
                d.queue += b"".join(parts)[:n]
                d.prod += n
            elif op == "read_into":
                dst = bytearray(arg)
                n = d.receiver.read_into(dst)
                assert n == min(arg, len(d.queue)) and dst[:n] == d.queue[:n]
                if d.cons < d.tx_start < d.cons + n:
                    event("one read crosses a switch")
                del d.queue[:n]
                d.cons += n
            elif op == "read":
                got = d.receiver.read(arg)
                want = len(d.queue) if arg < 0 else min(arg, len(d.queue))
                assert got == bytes(d.queue[:want])
                if d.cons < d.tx_start < d.cons + want:
                    event("one read crosses a switch")
                del d.queue[:want]
                d.cons += want
            elif op == "switch":
                d.collect()
                may = d.switches == 0 or 1 <= d.cons - d.tx_start <= d.prod - d.tx_start
                placed = d.blocks.alloc(arg, prefer=extra)
                if placed is None:
                    continue
                ext, off = placed
                ok = d.sender.switch_tx(d.side.rw[ext], off, arg, ext)
                assert ok == may
                if not ok:
                    event("switch refused (busy)")
                if not ok:
                    d.blocks.free(ext, off, arg)
                    continue
                assert d.old is None  # the strict rule: the previous old block is free
                event("switch " + ("grow" if arg > d.cur[2] else "shrink" if arg < d.cur[2] else "same"))
                if d.cons < d.prod:
                    d.old = d.cur
                else:
                    d.blocks.free(*d.cur)
                d.cur, d.tx_start = (ext, off, arg), d.prod
                d.switches += 1
            else:  # check every observable against the model (this refreshes the caches)
                assert d.receiver.readable() == len(d.queue)
                assert d.sender.tx_space() == d.space()
                pending = d.cons < d.tx_start
                assert d.sender.switch_pending() == pending
                assert d.sender.tx_capacity == d.cur[2] and d.sender.tx_switches == d.switches
                assert d.receiver.rx_switches == d.switches - (1 if pending else 0)
                if pending:
                    assert set(d.receiver.rx_extents) == {d.old[0], d.cur[0]}
                else:
                    assert d.receiver.rx_extents == (d.cur[0],)
                    assert d.receiver.rx_capacity == d.cur[2]
                assert bool(d.receiver.status() & ST_DATA) == bool(d.queue)
        for d in dirs.values():
            assert d.receiver.read() == bytes(d.queue)
            d.sender.set_eof()
            assert d.receiver.status() & ST_EOF
            assert d.receiver.rx_switches == d.sender.tx_switches == d.switches
        assert ra.tx_bytes == rb.rx_bytes and rb.tx_bytes == ra.rx_bytes


def test_several_slots_are_independent():
    with GroupPair() as p:
        rings = {}
        for i, slot in enumerate((0, 17, 127)):
            rings[slot] = p.slot_rings(slot, 4096, 8192, at_a=(1, i * 65536), at_b=(2, i * 65536))
        expected = {slot: bytearray() for slot in rings}
        for round_ in range(20):
            for slot, (ra, _rb) in rings.items():
                data = payload(1000 + 37 * round_ + slot, round_ * 131 + slot)
                expected[slot] += data[:ra.write(data)]
                if round_ == 7 + slot % 5:
                    ra.switch_tx(p.a.rw[2], (4 + slot % 3) * 65536, 16384, 2)
            for slot, (_ra, rb) in rings.items():
                got = rb.read(2500)
                assert got == expected[slot][:len(got)]
                del expected[slot][:len(got)]
        for slot, (ra, rb) in rings.items():
            assert rb.read() == bytes(expected[slot])
            assert ra.tx_switches == 1 and rb.rx_switches == 1
        # the headers of other slots were never touched
        assert p.a.ext0.get_u64(hdr(1) + ring.OFF_PROD) == 0


# ------------------------------------------------------------------------- notifications

def test_data_notification_once_per_want_data_epoch_through_the_queue():
    with GroupPair() as p:
        ra, rb = p.slot_rings(12)
        ra.write(b"x")  # B does not wait: no notification
        assert p.gb.take() == ([], False) and ra.doorbells == 0
        assert rb.read() == b"x"
        assert rb.prepare_sleep_rx() == 0  # B's ring waits for data (its hub is awake)
        ra.write(b"y")
        assert ra.doorbells == 1 and p.ga.queued == 1
        assert drain_doorbell(p.b.efd) == 0  # B's hub does not sleep: no doorbell
        ra.write(b"z")  # same epoch: nothing more
        assert ra.doorbells == 1
        assert p.gb.take() == ([12], False) and p.gb.take() == ([], False)
        rb.clear_wants()
        assert rb.read() == b"yz"
        # now B's hub sleeps too: one doorbell for the next notification
        assert rb.prepare_sleep_rx() == 0
        assert p.gb.prepare_sleep() is False
        ra.write(b"1")
        assert drain_doorbell(p.b.efd) == 1 and p.ga.doorbells == 1
        assert p.gb.take() == ([12], False)
        assert rb.prepare_sleep_rx() & ST_DATA  # data pending: do not sleep, flag cleared
        ra.write(b"2")  # B's ring does not wait: no entry; B's hub epoch was rung already
        assert p.gb.take() == ([], False) and drain_doorbell(p.b.efd) == 0
        p.gb.clear_wake()
        assert p.b.ext0.get_u32(ring.G_OFF_WANT_WAKE) == 0


def test_space_notification_after_an_eighth_or_drain():
    cap = 8192
    with GroupPair() as p:
        ra, rb = p.slot_rings(3, cap)
        ra.write(payload(cap, 1))
        assert ra.prepare_sleep_tx() == 0
        rb.read(cap // 8 - 1)
        assert p.ga.take() == ([], False)
        rb.read(1)
        assert p.ga.take() == ([3], False) and rb.doorbells == 1  # B queued 3 into B's queue
        rb.read(100)
        assert p.ga.take() == ([], False)  # that epoch was notified already
        ra.clear_wants()
        ra.write(payload(cap, 2))
        assert ra.prepare_sleep_tx() == 0
        rb.read(10)
        assert p.ga.take() == ([], False)
        rb.read()
        assert p.ga.take() == ([3], False)  # drained: at once


def test_state_changes_notify_only_a_waiting_peer():
    with GroupPair() as p:
        ra, rb = p.slot_rings(4)
        ra.set_eof()
        assert p.gb.take() == ([], False)
        assert rb.prepare_sleep_rx() & ST_EOF
        rb2a, rb2b = p.slot_rings(5, at_a=(1, 65536), at_b=(1, 65536))
        assert rb2b.prepare_sleep_tx() == ST_SPACE  # space: it does not wait
        rb2a.write(b"q")
        rb2b.write(payload(4096, 1))
        assert rb2b.prepare_sleep_tx() == 0  # B waits for space in its ring
        rb2a.set_closed()  # A's state change: B waits (want_space) -> notify
        assert p.gb.take() == ([5], False)
        assert rb2b.prepare_sleep_tx() & ring.ST_CLOSED


def test_group_doorbell_once_per_want_wake_epoch():
    with GroupPair() as p:
        assert p.gb.prepare_sleep() is False
        epoch = p.b.ext0.get_u32(ring.G_OFF_WANT_WAKE)
        assert epoch != 0
        for slot in (1, 2, 3, 1):
            p.ga.notify(slot)
        assert drain_doorbell(p.b.efd) == 1 and p.ga.doorbells == 1
        assert p.gb.pending() and p.gb.spin(0)
        assert p.gb.prepare_sleep() is True  # something pending: do not sleep, epoch cleared
        assert p.b.ext0.get_u32(ring.G_OFF_WANT_WAKE) == 0
        assert p.gb.take() == ([1, 2, 3, 1], False) and p.gb.taken == 4
        assert not p.gb.pending() and not p.gb.spin(0)
        assert p.gb.spin_hits == 1 and p.gb.spin_misses == 1
        assert p.gb.prepare_sleep() is False
        assert p.b.ext0.get_u32(ring.G_OFF_WANT_WAKE) not in (0, epoch)
        p.ga.notify(9)
        assert drain_doorbell(p.b.efd) == 1
        p.gb.clear_wake()
        p.ga.notify(9)
        assert drain_doorbell(p.b.efd) == 0
        assert p.gb.take(1) == ([9], False) and p.gb.take(0) == ([], False)
        assert p.gb.take() == ([9], False)


def test_closing_rings_the_peer_unconditionally():
    with GroupPair() as p:
        assert not p.gb.peer_closing
        p.ga.set_closing()
        assert p.gb.peer_closing and drain_doorbell(p.b.efd) == 1
        assert p.a.ext0.get_u32(ring.G_OFF_GSTATE) == ring.GSTATE_CLOSING


def test_queue_overflow_is_flagged_and_recovers():
    with GroupPair() as p:
        for i in range(ring.G_NQ_ENTRIES):
            p.ga.notify(i % 128)
        assert p.ga.overflows == 0 and p.ga.queued == ring.G_NQ_ENTRIES
        p.ga.notify(5)
        p.ga.notify(6)
        assert p.ga.overflows == 2 and p.a.ext0.get_u64(ring.G_OFF_NQ_OVERFLOW) == 2
        slots, overflow = p.gb.take(100000)
        assert overflow and slots == [i % 128 for i in range(ring.G_NQ_ENTRIES)]
        assert p.gb.take() == ([], False)
        p.ga.notify(7)  # room again (the peer's consumption is re-read when the queue looks full)
        assert p.gb.take() == ([7], False)
        # overflow alone (nothing queued) still counts as pending
        for _ in range(ring.G_NQ_ENTRIES + 1):
            p.ga.notify(1)
        slots, overflow = p.gb.take(10)
        assert len(slots) == 10 and overflow
        slots, overflow = p.gb.take(100000)
        assert len(slots) == ring.G_NQ_ENTRIES - 10 and not overflow


@st.composite
def wake_scenario(draw):
    op = st.one_of(st.tuples(st.just("notify"), st.integers(0, 127)),
                   st.sampled_from([("sleep", None), ("clear", None), ("take", None),
                                    ("pending", None), ("spin", None)]))
    return draw(st.lists(op, max_size=60))


@given(wake_scenario())
@HYP
def test_group_sleep_protocol_model(ops):
    """prepare_sleep says "sleep" only when nothing is pending; the doorbell rings exactly once
    per announced sleep epoch in which something was queued."""
    with GroupPair() as p:
        queue = []
        want = 0  # B's want_wake epoch in its extent 0
        rung = 0  # the epoch A already rang for
        for op, arg in ops:
            if op == "notify":
                p.ga.notify(arg)
                queue.append(arg)
                if want and want != rung:
                    rung = want
                    assert drain_doorbell(p.b.efd) == 1
            elif op == "sleep":
                assert p.gb.prepare_sleep() == bool(queue)
                want = p.b.ext0.get_u32(ring.G_OFF_WANT_WAKE)
                assert (want != 0) == (not queue)
            elif op == "clear":
                p.gb.clear_wake()
                want = 0
            elif op == "take":
                assert p.gb.take() == (queue, False)
                queue = []
            elif op == "pending":
                assert p.gb.pending() == bool(queue)
            else:
                assert p.gb.spin(0) == bool(queue)
            assert drain_doorbell(p.b.efd) == 0 and drain_doorbell(p.a.efd) == 0


def test_group_spin_runs_without_the_gil():
    # If spin held the GIL, this thread could not notify until the 20 s budget ran out and the
    # spinner would return False; it returns True as soon as the entry is queued.
    with GroupPair() as p:
        result = []
        spinner = threading.Thread(target=lambda: result.append(p.gb.spin(20e6)))
        spinner.start()
        p.ga.notify(3)
        spinner.join(30)
        assert result == [True]


def test_ring_doorbell_in_slot_mode_queues_the_slot():
    with GroupPair() as p:
        ra, _rb = p.slot_rings(33)
        ra.doorbell()
        assert p.gb.take() == ([33], False) and ra.doorbells == 1


# ------------------------------------------------------------------------ claims and listeners

def _home(port):
    return ((port * 2654435761) % (1 << 32)) >> 19


def test_claims_post_find_clear_and_full_window():
    with GroupPair() as p:
        port = 40000
        for slot in range(ring.G_CLAIM_PROBE):
            assert p.ga.post_claim(port, slot)
        assert not p.ga.post_claim(port, 99)  # the window is full
        assert p.gb.find_claims(port) == list(range(ring.G_CLAIM_PROBE))
        home = _home(port)
        assert p.a.ext0.get_u64(ring.G_OFF_CLAIMS + 8 * home) == (port << 32) | 1
        p.ga.clear_claim(port, 5)
        assert 5 not in p.gb.find_claims(port)
        assert p.ga.post_claim(port, 99)  # reuses the freed entry
        assert p.gb.find_claims(port)[5] == 99
        p.ga.clear_claim(port, 12345)  # absent: no-op
        assert p.gb.find_claims(port + 1) == [] and p.ga.find_claims(port) == []
        with pytest.raises(ValueError):
            p.ga.post_claim(port, 128)
        with pytest.raises(ValueError):
            p.ga.post_claim(1 << 32, 1)


def test_claims_of_colliding_ports_share_a_window_and_wrap():
    with GroupPair() as p:
        by_home = {}
        for port in range(1, 65536):
            by_home.setdefault(_home(port), []).append(port)
        last = ring.G_CLAIM_ENTRIES - 1  # windows starting here wrap to entry 0
        ports = by_home[last][:3]
        assert len(ports) == 3
        for i in range(ring.G_CLAIM_PROBE):
            assert p.ga.post_claim(ports[i % 3], i)
        assert not p.ga.post_claim(ports[0], 1)
        assert p.a.ext0.get_u64(ring.G_OFF_CLAIMS) != 0  # wrapped into entry 0
        for j, port in enumerate(ports):
            assert p.gb.find_claims(port) == list(range(j, ring.G_CLAIM_PROBE, 3))


def test_listeners():
    with GroupPair() as p:
        assert not p.ga.peer_has_listener(5)
        inodes = list(range(1000, 1000 + ring.G_MAX_LISTENERS))
        p.gb.set_listeners(inodes)
        assert all(p.ga.peer_has_listener(i) for i in inodes)
        assert not p.ga.peer_has_listener(999) and not p.ga.peer_has_listener(0)
        p.gb.set_listeners([0, 7])
        assert p.ga.peer_has_listener(7) and not p.ga.peer_has_listener(0)
        assert not p.ga.peer_has_listener(1000)
        p.gb.set_listeners([])
        assert not p.ga.peer_has_listener(7)
        with pytest.raises(ValueError):
            p.gb.set_listeners(range(ring.G_MAX_LISTENERS + 1))


# ------------------------------------------------------------------------- set-up records, slots

def test_setup_record_round_trip_and_phase():
    with GroupPair() as p:
        assert p.gb.read_peer_setup(3) == Setup(0, 0)
        rec = Setup(gen=7, phase=ring.PHASE_CLAIMED, reason=0, family=10, ring0_off=65536,
                    ring0_ext=2, ring0_log2=16, sock_ino=123456789012, cport=40001, sport=443,
                    caddr=bytes(range(16)), saddr=bytes(range(16, 32)))
        p.ga.publish_setup(3, rec)
        assert p.gb.take() == ([], False)  # no notification by itself
        assert p.gb.read_peer_setup(3) == rec
        assert p.a.ext0.get_u64(hdr(3) + ring.OFF_SETUP) == (7 << 32) | 1
        p.gb.set_phase(3, 7, ring.PHASE_DECLINED, reason=42)
        got = p.ga.read_peer_setup(3)
        assert (got.gen, got.phase, got.reason) == (7, ring.PHASE_DECLINED, 42)
        p.ga.set_phase(3, 7, ring.PHASE_FINAL_TCP)
        assert p.gb.read_peer_setup(3) == rec._replace(phase=ring.PHASE_FINAL_TCP)
        with pytest.raises(ValueError):
            p.ga.publish_setup(3, rec._replace(caddr=b"\x7f\0\0\1"))
        with pytest.raises(ValueError):
            p.ga.publish_setup(128, rec)
        with pytest.raises(ValueError):
            p.gb.read_peer_setup(128)


def test_slot_reset_and_release():
    with GroupPair() as p:
        ra, rb = p.slot_rings(8)
        ra.write(b"data")
        rb.read()
        rb.prepare_sleep_rx()
        ra.switch_tx(p.a.rw[2], 0, 8192, 2)
        ra.set_closed()
        p.ga.publish_setup(8, Setup(1, ring.PHASE_FINAL_ISM, ring0_ext=1))
        ra.close()
        rb.close()
        p.ga.release_slot(8, 1)
        assert p.gb.peer_released(8) == 1 and p.ga.peer_released(8) == 0
        p.ga.reset_slot(8)
        assert bytes(p.a.mem[0].rw[hdr(8):hdr(8) + 384]) == bytes(384)
        assert p.gb.read_peer_setup(8).gen == 1  # line 3 stays (the next publish overwrites it)
        assert p.gb.peer_released(8) == 1
        # a new connection in the slot starts from zero
        p.gb.reset_slot(8)
        ra, rb = p.slot_rings(8)
        assert ra.tx_switches == 0 and ra.write(b"again") == 5 and rb.read() == b"again"
        with pytest.raises(ValueError):
            p.ga.reset_slot(128)
        with pytest.raises(ValueError):
            p.ga.peer_released(-1)


def test_remove_peer_extent_refuses_while_a_ring_reads_it():
    with GroupPair() as p:
        ra, rb = p.slot_rings(6, at_b=(2, 0))
        assert ra.rx_extents == (2,)
        with pytest.raises(ValueError, match="still read by the ring of slot 6"):
            p.ga.remove_peer_extent(2)
        rb.write(b"x")
        assert rb.switch_tx(p.b.rw[1], 0, 4096, 1)
        rb.write(b"y")
        assert ra.read(1) == b"x"
        assert ra.rx_extents == (1,)  # moved on at sw_pos
        p.ga.remove_peer_extent(2)
        assert ra.read() == b"y"
        with pytest.raises(ValueError):
            p.ga.remove_peer_extent(0)


def test_ring_close_keeps_group_and_extents():
    with GroupPair() as p:
        ra, rb = p.slot_rings(10)
        ra.write(b"x")
        ra.close()
        ra.close()
        assert ra.closed and not p.ga.closed and ra.rx_extents == ()
        for call in (lambda: ra.write(b"x"), ra.readable, ra.status, lambda: ra.spin(1),
                     lambda: ra.switch_tx(p.a.rw[1], 8192, 4096, 1), ra.switch_pending):
            with pytest.raises(ValueError):
                call()
        ra.doorbell()  # no-op after close
        assert rb.read() == b"x"
        p.ga.notify(10)  # the group still works
        assert p.gb.take() == ([10], False)


def test_extents_outlive_a_closed_group_for_open_rings():
    with GroupPair() as p:
        ra, rb = p.slot_rings(11)
        p.ga.close()
        with pytest.raises(BufferError):
            p.a.mem[0].rw.close()  # still exported: the ring's header cannot be unmapped
        assert ra.write(b"still") == 5 and rb.read() == b"still"  # notify errors are ignored
        ra.close()


def _heap(n):
    """n bytes of malloc'd memory, exactly (under PYTHONMALLOC=malloc AddressSanitizer puts a
    redzone right after it; a bytearray would have a spare NUL byte there)."""
    return (ctypes.c_char * n)()


@given(st.lists(st.tuples(st.integers(0, 9000), st.integers(0, 9000), st.sampled_from([0] + CAPS)),
                min_size=1, max_size=30), st.integers(0, U64 - 1))
@settings(deadline=None, max_examples=60)
def test_heap_backed_slot_rings_roundtrip(steps, start):
    # Blocks sit flush with the end of malloc'd extents, so AddressSanitizer (docs/ring.md) checks
    # every slot-mode access, across switches, against the redzones.
    size = 65536
    a0, b0 = _heap(ring.heap0(128)), _heap(ring.heap0(128))
    a_heap = {1: _heap(size), 2: _heap(size)}
    b_heap = {1: _heap(size)}
    struct.pack_into("<Q", a0, hdr(0) + ring.OFF_PROD, start)
    struct.pack_into("<Q", b0, hdr(0) + ring.OFF_CONS_PEER, start)
    ga = Group(Extent(a0, True), Extent(b0, False), -1, ring.ROLE_CLIENT, 128)
    gb = Group(Extent(b0, True), Extent(a0, False), -1, ring.ROLE_SERVER, 128)
    for i, buf in a_heap.items():
        gb.add_peer_extent(i, Extent(buf, False))
    ga.add_peer_extent(1, Extent(b_heap[1], False))
    ra = Ring.in_slot(ga, 0, Extent(a_heap[1], True), size - 4096, 4096, 1, size - 4096, 12)
    rb = Ring.in_slot(gb, 0, Extent(b_heap[1], True), size - 4096, 4096, 1, size - 4096, 12)
    ext, expected, got = 1, bytearray(), bytearray()
    for i, (write, read, cap) in enumerate(steps):
        data = payload(write, i)
        expected += data[:ra.write(data)]
        got += rb.read(read)
        if cap and ra.switch_tx(Extent(a_heap[3 - ext], True), size - cap, cap, 3 - ext):
            ext = 3 - ext
    got += rb.read()
    assert got == expected
    for r in (ra, rb):
        r.close()
    ga.close()
    gb.close()


def test_heap_extents_from_plain_buffers():
    # bytearray-backed extents (what AddressSanitizer checks under PYTHONMALLOC=malloc)
    mine0, peer0 = bytearray(ring.heap0(128)), bytearray(ring.heap0(128))
    mine1, peer1 = bytearray(65536), bytearray(65536)
    g = Group(Extent(mine0, True), Extent(memoryview(peer0).toreadonly(), False), -1,
              ring.ROLE_CLIENT, 128)
    g.add_peer_extent(1, Extent(memoryview(peer1).toreadonly(), False))
    r = Ring.in_slot(g, 0, Extent(mine1, True), 4096, 4096, 1, 61440, 12)
    assert r.write(payload(5000, 1)) == 4096
    assert bytes(mine1[4096:8192]) == payload(4096, 1)
    r.close()
    g.close()


def test_poll_hot_watches_unarmed_rings_and_reports_which():
    """poll_hot: a hot ring's data (or EOF) is found without any notification from its
    producer (want_data not armed), every hot ring with news is reported in one call, queue
    entries come along; rings of another group or more than HOT_MAX are refused."""
    with GroupPair() as p:
        rings = [p.slot_rings(s, at_a=(1, s * 4096), at_b=(1, s * 4096)) for s in range(3)]
        hot = [rb for _, rb in rings]                 # B reads, nobody armed want_data
        assert p.gb.poll_hot(0, hot) is None
        rings[1][0].write(b"to slot 1")               # A writes: no notification queued
        assert p.gb.pending() is False
        assert p.gb.poll_hot(50, hot) == 1             # one ring, no queue entry: its index
        assert hot[1].read() == b"to slot 1"
        assert p.gb.poll_hot(0, hot) is None
        rings[2][0].set_eof()                         # a state change alone is news too
        rings[0][0].write(b"to slot 0")
        assert p.gb.poll_hot(50, hot) == ([0, 2], None)
        assert hot[0].read() == b"to slot 0"
        p.ga.notify(0)                                # queue entries come along
        assert p.gb.poll_hot(0, hot[:2]) == ([], ([0], False))
        with pytest.raises(ValueError):
            p.gb.poll_hot(0, [rings[0][0]])            # A's ring: not of B's group
        with pytest.raises(ValueError):
            p.gb.poll_hot(0, [hot[0]] * (ring.HOT_MAX + 1))


def test_hot_ring_armed_before_sleep_gets_its_notification():
    """The hub's contract: a hot ring is armed (prepare_sleep_rx) before the group sleeps; the
    producer's next write then queues the slot and rings the doorbell."""
    with GroupPair() as p:
        ra, rb = p.slot_rings(5)
        ra.write(b"x")
        assert rb.read() == b"x"
        assert rb.prepare_sleep_rx() == 0             # armed
        assert p.gb.prepare_sleep() is False          # the hub sleeps
        ra.write(b"y")
        assert p.gb.pending() is True
        assert drain_doorbell(p.b.efd) > 0                 # A rang B, which sleeps
