"""Zero-copy and file primitives of the ring: reserve/commit, peek/consume, write_from_fd.

Honest pairs come from tests/test_ring.py (legacy regions: sealed memfds, the peer's mapped
PROT_READ) and tests/slot_helpers.py (link groups); hostile peers from tests/test_ring_hostile.py
and tests/test_ring_group_hostile.py (the victim's mappings sit between PROT_NONE guard pages, so
a view reaching outside a ring block is a SIGSEGV as soon as its bytes are read).

Views pin their mapping (a buffer export), so a test releases them before closing the memory.
"""

import errno
import os
import pathlib
import random
import re
import shutil
import subprocess
import tempfile
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ring_group_hostile import Victim as GroupVictim
from test_ring_hostile import Victim

from slot_helpers import GroupPair
from smcish import _ring as _ring_module
from smcish import ring
from smcish._ring import ffi as _ffi
from smcish.ring import ST_DATA, ST_SPACE, RingCorrupted, drain_doorbell
from test_ring import Pair, payload

U64 = 1 << 64
HYP = settings(deadline=None, max_examples=150,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def fill(view, data):
    view[:len(data)] = data


@pytest.fixture
def datafile():
    """A temp file of 1 MiB + 123 position-dependent bytes; yields (fd, contents)."""
    data = payload((1 << 20) + 123, 11) + bytes(range(256)) * 3
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        yield f.fileno(), data


# ------------------------------------------------------------------------------ reserve/commit

def test_reserve_commit_publishes_like_write():
    with Pair(4096, 4096) as p:
        v = p.a.reserve(10)
        assert len(v) == 10 and not v.readonly and p.a.reservation == 10
        fill(v, b"0123456789")
        assert p.b.readable() == 0  # nothing is published before commit
        assert p.a.commit(7) is None
        assert p.a.reservation == 0
        assert p.ra.get_u64(ring.OFF_PROD) == 7 and p.a.tx_bytes == 7
        assert p.b.read() == b"0123456"
        assert p.b.rx_bytes == 7
        with pytest.raises(ValueError):  # the view was released by commit
            v[0] = 1
        # the next reservation starts right after the committed bytes, not after the reservation
        v = p.a.reserve(3)
        fill(v, b"abc")
        p.a.commit(3)
        assert p.b.read() == b"abc"
        assert p.a.tx_space() == 4096


def test_reserve_is_contiguous_and_bounded_by_free_space_and_the_block_end():
    cap = 4096
    with Pair(cap, 4096) as p:
        assert p.a.write(payload(3000, 1)) == 3000
        v = p.a.reserve(cap)  # free 1096 at the end, the consumer is at 0: bounded by space
        assert len(v) == 1096
        p.a.cancel_reservation()
        assert p.b.read(3000) == payload(3000, 1)
        v = p.a.reserve(cap)  # 4096 free now, but only 1096 before the end of the block
        assert len(v) == 1096
        fill(v, payload(1096, 2))
        p.a.commit(1096)
        v = p.a.reserve(cap)  # wrapped: the block's start, up to the consumer's cursor
        assert len(v) == 3000
        fill(v, payload(3000, 3))
        p.a.commit(3000)
        assert len(p.a.reserve(1)) == 0 and p.a.reservation == 0  # full: nothing reserved
        assert p.a.reserve(0) == b"" and p.a.reservation == 0
        assert p.b.read(1096) == payload(1096, 2)
        v = p.a.reserve(5000)
        assert len(v) == 1096 and p.a.reservation == 1096  # freed by that read, up to the end
        p.a.cancel_reservation()
        assert p.b.read() == payload(3000, 3)


def test_commit_errors():
    with Pair() as p:
        a = p.a
        with pytest.raises(ValueError, match="without a reservation"):
            a.commit(0)
        v = a.reserve(100)
        with pytest.raises(ValueError, match="within the reservation of 100"):
            a.commit(101)
        with pytest.raises(ValueError):
            a.commit(-1)
        with pytest.raises(ValueError, match="outstanding"):
            a.reserve(1)
        with pytest.raises(ValueError, match="outstanding"):
            a.write(b"x")
        with pytest.raises(ValueError, match="outstanding"):
            a.writev([b"x", b"y"])
        with pytest.raises(ValueError, match="outstanding"):
            a.write_from_fd(0, 0, 1)
        assert a.reservation == 100  # failed calls left it alone
        fill(v, b"z" * 100)
        a.commit(100)
        with pytest.raises(ValueError, match="without a reservation"):
            a.commit(100)  # once only
        with pytest.raises(ValueError, match="without a reservation"):
            a.commit(0)
        with pytest.raises(ValueError):
            a.reserve(-1)
        a.cancel_reservation()  # no-op without one
        # a full ring reserves nothing, so there is nothing to commit
        a.write(payload(4096, 1))
        assert len(a.reserve(10)) == 0
        with pytest.raises(ValueError, match="without a reservation"):
            a.commit(0)
        assert a.tx_bytes == 100 + 4096 - 100  # 4096 - 100 bytes fitted after the first 100
        assert p.b.read() == b"z" * 100 + payload(4096, 1)[:3996]


def test_commit_after_eof_and_after_close():
    with Pair() as p:
        v = p.a.reserve(10)
        p.a.set_eof()
        with pytest.raises(ValueError, match="EOF"):
            p.a.commit(5)
        with pytest.raises(ValueError, match="EOF"):
            p.a.reserve(5)
        p.a.cancel_reservation()
        assert p.b.status() & ring.ST_EOF and p.ra.get_u64(ring.OFF_PROD) == 0
        with pytest.raises(ValueError):
            v[0] = 1
    p = Pair()
    v = p.a.reserve(10)
    pv = p.b.peek()
    p.a.close()
    p.b.close()
    for call in (lambda: p.a.commit(1), lambda: p.a.reserve(1), p.b.peek, lambda: p.b.consume(0),
                 lambda: p.a.write_from_fd(0, 0, 1)):
        with pytest.raises(ValueError, match="closed"):
            call()
    assert p.a.reservation == 0
    with pytest.raises(ValueError):  # close() released the reservation's view
        v[0] = 1
    pv.release()
    p.close()  # would raise BufferError if the rings still pinned the mappings


def test_views_pin_the_mapping_until_released():
    p = Pair()
    p.a.write(b"pinned")
    v = p.b.peek()
    p.b.close()
    with pytest.raises(BufferError):
        p.ra.ro.close()  # a live view keeps the peer's mapping exported: never a dangling view
    assert bytes(v) == b"pinned"
    v.release()
    p.close()


def test_commit_wakes_exactly_like_write():
    with Pair() as p:
        a, b = p.a, p.b
        fill(a.reserve(1), b"x")
        a.commit(1)  # B is not asleep: no doorbell
        assert drain_doorbell(p.efd_b) == 0
        assert b.read() == b"x"
        assert b.prepare_sleep_rx() == 0
        a.reserve(10)
        a.commit(0)  # nothing published: nobody woken
        assert drain_doorbell(p.efd_b) == 0 and a.doorbells == 0
        fill(a.reserve(10), b"y" * 10)
        a.commit(4)
        assert drain_doorbell(p.efd_b) == 1 and a.doorbells == 1
        fill(a.reserve(1), b"z")
        a.commit(1)  # same epoch already rung
        assert drain_doorbell(p.efd_b) == 0
        assert b.read() == b"yyyyz"


# -------------------------------------------------------------------------------- peek/consume

def test_peek_is_read_only_contiguous_and_validated():
    cap = 4096
    with Pair(cap, 4096) as p:
        assert p.b.peek() == b"" and p.b.peek(10) == b""
        p.a.write(payload(3000, 1))
        assert p.b.read(3000) == payload(3000, 1)
        p.a.write(payload(4096, 2))  # 1096 bytes up to the block's end, 3000 from its start
        v = p.b.peek()
        assert v.readonly and len(v) == 1096 and v == payload(1096, 2)
        with pytest.raises(TypeError):
            v[0] = 0
        assert p.b.peek(10) == payload(10, 2)  # a new peek replaces the old one as the limit
        with pytest.raises(ValueError, match="within the 10 peeked"):
            p.b.consume(11)
        v.release()
        v = p.b.peek(2000)
        assert len(v) == 1096
        p.b.consume(96)
        p.b.consume(1000)  # several consumes within one peek
        with pytest.raises(ValueError, match="within the 0 peeked"):
            p.b.consume(1)
        p.b.consume(0)
        v.release()
        v = p.b.peek()
        assert len(v) == 3000 and v == payload(4096, 2)[1096:]
        v.release()
        assert p.b.read(100) == payload(4096, 2)[1096:1196]  # a read within the peek
        p.b.consume(2900)  # consumes the rest of what was peeked
        with pytest.raises(ValueError):
            p.b.consume(-1)
        assert p.b.readable() == 0 and p.b.rx_bytes == 3000 + 4096
        assert p.rb.get_u64(ring.OFF_CONS_PEER) == 3000 + 4096
        v = p.b.peek()  # a read past the peek's end leaves nothing to consume
        p.a.write(b"abcdef")
        assert len(p.b.peek()) == 6
        assert p.b.read() == b"abcdef"
        with pytest.raises(ValueError, match="within the 0 peeked"):
            p.b.consume(1)


def test_consume_without_peek_is_refused_near_the_2_64_wrap():
    # rx_peek_end starts at the resumed cursor: a consume before any peek is refused even when
    # the cursor sits just below 2**64 (where a zero-initialised limit would look close by).
    with Pair(start_a=U64 - 10) as p:
        p.a.write(b"0123456789abc")
        with pytest.raises(ValueError):
            p.b.consume(10)
        with p.b.peek() as v:
            assert v == b"0123456789"  # up to the block's end (offset 4086 + 10)
        p.b.consume(10)
        with p.b.peek() as v:
            assert v == b"abc"
        p.b.consume(3)
        assert p.rb.get_u64(ring.OFF_CONS_PEER) == 3


def test_consume_notifies_a_waiting_producer_like_read():
    cap = 8192
    with Pair(cap, 4096) as p:
        a, b = p.a, p.b
        a.write(payload(cap, 1))
        assert a.prepare_sleep_tx() == 0
        b.peek(cap // 8 - 1)
        b.consume(cap // 8 - 1)
        assert drain_doorbell(p.efd_a) == 0  # below rx_cap / 8
        b.peek(1)
        b.consume(1)
        assert drain_doorbell(p.efd_a) == 1  # reached cap / 8 since it asked
        a.clear_wants()
        a.write(payload(cap, 2))
        assert a.prepare_sleep_tx() == 0
        with b.peek(10):
            b.consume(10)
        assert drain_doorbell(p.efd_a) == 0
        while True:
            with b.peek() as v:
                if not v:
                    break
                b.consume(len(v))
        assert drain_doorbell(p.efd_a) == 1  # once for the epoch, however many consumes
        assert a.prepare_sleep_tx() & ST_SPACE


# --------------------------------------------------------------------------------- write_from_fd

def test_write_from_fd_crossing_the_wrap(datafile):
    fd, data = datafile
    cap = 4096
    with Pair(cap, 4096) as p:
        p.a.write(payload(3000, 1))
        assert p.b.read() == payload(3000, 1)
        assert p.a.write_from_fd(fd, 777, 4096) == 4096  # 1096 to the end, 3000 from the start
        assert p.ra.get_u64(ring.OFF_PROD) == 3000 + 4096 and p.a.tx_bytes == 3000 + 4096
        assert p.b.read() == data[777:777 + 4096]
        assert p.a.write_from_fd(fd, 5, 10) == 10 and p.b.read() == data[5:15]
        assert p.a.write_from_fd(fd, 5, 0) == 0
        p.a.write(payload(4096, 2))
        assert p.a.write_from_fd(fd, 0, 100) == 0  # full: nothing read, nothing published
        assert p.b.read() == payload(4096, 2)
    assert os.lseek(fd, 0, os.SEEK_CUR) == len(data)  # pread: the file position is untouched


def test_write_from_fd_stops_at_eof(datafile):
    fd, data = datafile
    with Pair(1 << 16, 4096) as p:
        assert p.a.write_from_fd(fd, len(data) - 100, 1000) == 100
        assert p.a.write_from_fd(fd, len(data), 1000) == 0
        assert p.a.write_from_fd(fd, len(data) + 12345, 1000) == 0
        assert p.a.write_from_fd(fd, (1 << 63) - 1, U64) == 0
        assert p.a.tx_bytes == 100 and p.ra.get_u64(ring.OFF_PROD) == 100
        assert p.b.read() == data[-100:]


def test_write_from_fd_errors_publish_nothing(datafile, tmp_path):
    fd, data = datafile
    with Pair() as p:
        a = p.a
        a.write(b"head")
        r, w = os.pipe()
        dirfd = os.open(tmp_path, os.O_RDONLY)
        wronly = os.open(tmp_path / "w", os.O_WRONLY | os.O_CREAT)
        try:
            for bad, code in ((1 << 20, errno.EBADF), (-1, errno.EBADF), (r, errno.ESPIPE),
                              (dirfd, errno.EISDIR), (wronly, errno.EBADF)):
                with pytest.raises(OSError) as info:
                    a.write_from_fd(bad, 0, 100)
                assert info.value.errno == code
        finally:
            for x in (r, w, dirfd, wronly):
                os.close(x)
        for offset, count in ((-1, 10), (0, -1), (1 << 63, 10)):
            with pytest.raises(ValueError):
                a.write_from_fd(fd, offset, count)
        assert a.tx_bytes == 4 and p.ra.get_u64(ring.OFF_PROD) == 4 and a.tx_space() == 4092
        assert p.b.read() == b"head"
        assert a.write_from_fd(fd, 0, 10) == 10 and p.b.read() == data[:10]  # still usable
        a.set_eof()
        with pytest.raises(ValueError, match="EOF"):
            a.write_from_fd(fd, 0, 10)


def test_write_from_fd_wakes_exactly_like_write(datafile):
    fd, data = datafile
    with Pair() as p:
        assert p.b.prepare_sleep_rx() == 0
        assert p.a.write_from_fd(fd, len(data), 10) == 0  # EOF: nothing published, nobody woken
        assert drain_doorbell(p.efd_b) == 0
        assert p.a.write_from_fd(fd, 0, 10) == 10
        assert drain_doorbell(p.efd_b) == 1 and p.a.doorbells == 1
        assert p.a.write_from_fd(fd, 10, 10) == 10
        assert drain_doorbell(p.efd_b) == 0  # same epoch
        assert p.b.read() == data[:20]


def _direct_calls(function: str, library: str) -> list[str] | None:
    """The functions that ``function`` of the compiled ``library`` calls directly, in address
    order (objdump); None when that cannot be read (no objdump, or the symbol is stripped)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        return None
    proc = subprocess.run([objdump, "-d", "--no-show-raw-insn", f"--disassemble={function}",
                           library], capture_output=True, text=True, timeout=60)
    calls = re.findall(r"\b(?:call|bl)\s+[0-9a-f]+\s+<([^>@+]+)", proc.stdout)
    return calls or None


def test_write_from_fd_runs_without_the_gil():
    # cffi API mode wraps every call in Py_BEGIN/END_ALLOW_THREADS unless told otherwise. Checked
    # on the compiled module in use (the checkout's build or the installed wheel's): its wrapper
    # calls smc_tx_write_fd between PyEval_SaveThread and PyEval_RestoreThread; and on the
    # generated source too where a build in place left it next to the module.
    checked = []
    calls = _direct_calls("_cffi_f_smc_tx_write_fd", _ring_module.__file__)
    if calls is not None:
        assert "smc_tx_write_fd" in calls, calls
        call = calls.index("smc_tx_write_fd")
        assert "PyEval_SaveThread" in calls[:call], calls
        assert "PyEval_RestoreThread" in calls[call + 1:], calls
        checked.append(_ring_module.__file__)
    src = pathlib.Path(ring.__file__).with_name("_ring.c")
    if src.exists():
        text = src.read_text()
        body = text[text.index("_cffi_f_smc_tx_write_fd(PyObject"):]
        body = body[:body.index("Py_END_ALLOW_THREADS")]
        assert "Py_BEGIN_ALLOW_THREADS" in body
        assert "smc_tx_write_fd(x0" in body.split("Py_BEGIN_ALLOW_THREADS")[1]
        checked.append(str(src))
    if not checked:
        pytest.skip("neither objdump (with the module's symbols) nor the generated _ring.c here")


@given(st.sampled_from([4096, 8192, 65536]),
       st.one_of(st.just(0), st.integers(0, U64 - 1), st.integers(U64 - 70000, U64 - 1)),
       st.lists(st.tuples(st.integers(0, (1 << 20) + 900), st.integers(0, 70000),
                          st.integers(0, 70000)), min_size=1, max_size=12))
@settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
def test_write_from_fd_matches_the_file_byte_for_byte(datafile, cap, start, steps):
    fd, data = datafile
    with Pair(cap, 4096, start_a=start) as p:
        queue = bytearray()
        for offset, count, drain in steps:
            n = p.a.write_from_fd(fd, offset, count)
            assert n == max(0, min(count, cap - len(queue), len(data) - offset))
            queue += data[offset:offset + n]
            got = p.b.read(drain)
            assert got == bytes(queue[:len(got)])
            del queue[:len(got)]
            assert p.a.tx_space() == cap - len(queue)
        assert p.b.read() == bytes(queue)
        assert p.ra.get_u64(ring.OFF_PROD) == (start + p.a.tx_bytes) % U64


# ------------------------------------------------------------- write_from_fd's bounce buffer
# When the ring address of a segment is 1..31 bytes ahead of the file offset modulo 4096 (the
# kernel's copy is ~4x slower there on AMD Zen 3), write_from_fd reads through a per-thread bounce
# buffer of 128 KiB and copies into the ring (FD_ALIAS_WINDOW, FD_BOUNCE_SIZE in ring.c);
# struct smc_ring's stat_tx_fd_bounced counts the bytes that went that way, so the tests can tell
# the two paths apart.

PAGE = 4096
WINDOW = 32             # ring.c FD_ALIAS_WINDOW
BOUNCE = 128 * 1024     # ring.c FD_BOUNCE_SIZE


def tx_addr(r):
    """Address of the byte the next write_from_fd's pread fills first."""
    rr = r._r
    return int(_ffi.cast("uintptr_t", rr.tx_base)) + (rr.tx_prod & rr.tx_mask)


def bounced(r):
    return r._r.stat_tx_fd_bounced


def in_window(dist):
    return 0 < dist % PAGE < WINDOW


def offset_for(r, dist, near):
    """The smallest file offset >= near such that the next write_from_fd's first target lies
    `dist` bytes after it modulo 4096."""
    return near + (tx_addr(r) - dist - near) % PAGE


def place(p, idx):
    """Move A's ring (empty before and after) to ring index idx, through filler bytes."""
    a, b = p.a, p.b
    cap = a.tx_capacity
    step = (idx - (a._r.tx_prod & (cap - 1))) % cap
    while step:
        n = a.write(bytes(min(step, cap)))
        assert b.read() == bytes(n)
        step -= n


def index_with_page_offset(r, page_off, lo):
    """The smallest ring index >= lo whose address lies at `page_off` modulo 4096."""
    base = int(_ffi.cast("uintptr_t", r._r.tx_base))
    return lo + (page_off - base - lo) % PAGE


@pytest.mark.parametrize("mis", [1, 8, 63])
def test_write_from_fd_bounces_exactly_in_the_alias_window(datafile, mis):
    # file offsets at page offset `mis`; ring targets at every distance around the window
    fd, data = datafile
    with Pair(1 << 16, 4096) as p:
        a, b = p.a, p.b
        dists = list(range(-3, 70)) + [127, 128, 2048, 4000, 4064, 4095]
        for i, dist in enumerate(dists):
            off = (i * 37 % 200) * PAGE + mis
            place(p, index_with_page_offset(a, off + dist, (i * 1237) % 50000))
            assert (tx_addr(a) - off) % PAGE == dist % PAGE
            before, tx = bounced(a), a.tx_bytes
            n = a.write_from_fd(fd, off, 5000 + i)
            assert n == 5000 + i and a.tx_bytes == tx + n
            assert bounced(a) - before == (n if in_window(dist) else 0), dist
            assert b.read() == data[off:off + n]


@pytest.mark.parametrize("mis", [1, 8, 63])
@pytest.mark.parametrize("dist", [1, 8, 31])
def test_write_from_fd_bounced_across_the_wrap(datafile, mis, dist):
    fd, data = datafile
    cap = 1 << 16
    with Pair(cap, 4096) as p:
        a, b = p.a, p.b
        off = 12 * PAGE + mis
        idx = index_with_page_offset(a, off + dist, cap - 3 * PAGE)   # 8..12 KiB before the end
        place(p, idx)
        n = a.write_from_fd(fd, off, cap)                              # fills the whole ring
        assert n == cap and bounced(a) == cap and a.tx_space() == 0
        assert p.ra.get_u64(ring.OFF_PROD) == a.tx_bytes
        with b.peek(cap) as v:                                         # the part before the end
            assert len(v) == cap - idx and v == data[off:off + cap - idx]
            b.consume(len(v))
        assert b.read() == data[off + cap - idx:off + cap]
        # the same with the ring partly full: bounded by the free space, both segments
        assert a.write(payload(1000, 3)) == 1000
        off2 = offset_for(a, dist, 300000 + mis)
        assert a.write_from_fd(fd, off2, cap) == cap - 1000
        assert bounced(a) == 2 * cap - 1000
        assert b.read() == payload(1000, 3) + data[off2:off2 + cap - 1000]


@pytest.mark.parametrize("dist", [1, 8, 63 - 32, 63])
def test_write_from_fd_bounced_larger_than_the_bounce_buffer(datafile, dist):
    fd, data = datafile
    cap = 1 << 20
    assert cap > 5 * BOUNCE
    with Pair(cap, 4096) as p:
        a, b = p.a, p.b
        for first in (BOUNCE // 3, BOUNCE + 1000, 3 * BOUNCE + 5):    # bytes before the wrap
            place(p, index_with_page_offset(a, 0, cap - first - PAGE))
            off = offset_for(a, dist, 8 + 1)
            count = len(data) - off - 5000
            before = bounced(a)
            n = a.write_from_fd(fd, off, count)
            assert n == min(count, cap)
            assert bounced(a) - before == (n if in_window(dist) else 0)
            got = bytearray()
            while len(got) < n:
                with b.peek(n) as v:
                    got += v
                    b.consume(len(v))
            assert got == data[off:off + n]


@pytest.mark.parametrize("dist", [1, 8, 31, 0, 40])
def test_write_from_fd_bounced_stops_at_eof_mid_piece_and_mid_segment(datafile, dist):
    fd, data = datafile
    size = len(data)
    with Pair(1 << 20, 4096) as p:
        a, b = p.a, p.b
        # in the middle of the first segment (and of its second bounce piece), no wrap
        off = offset_for(a, dist, size - BOUNCE - 777 - PAGE)
        before = bounced(a)
        assert a.write_from_fd(fd, off, 1 << 20) == size - off
        assert bounced(a) - before == (size - off if in_window(dist) else 0)
        assert b.read() == data[off:]
        assert a.write_from_fd(fd, size, 100) == 0 and a.write_from_fd(fd, size + 7, 100) == 0
        # the file ends in the second segment, after the wrap
        cap = a.tx_capacity
        place(p, index_with_page_offset(a, 123, cap - 2 * PAGE))
        off = offset_for(a, dist, size - 2 * PAGE - 5000)
        first = cap - (a._r.tx_prod & (cap - 1))
        assert size - off > first
        before = bounced(a)
        assert a.write_from_fd(fd, off, 1 << 20) == size - off
        assert bounced(a) - before == (size - off if in_window(dist) else 0)
        assert b.read() == data[off:]
        # the file ends exactly at the end of the first segment: the second read sees EOF. The
        # distance is then (block address - file size) mod 4096: cut the file to fit.
        base = int(_ffi.cast("uintptr_t", a._r.tx_base))
        end = size - PAGE + (base - dist - (size - PAGE)) % PAGE
        with tempfile.TemporaryFile() as f:
            f.write(data[:end])
            f.flush()
            place(p, cap - 2 * PAGE - 99)
            first = 2 * PAGE + 99
            off = end - first
            assert (tx_addr(a) - off) % PAGE == dist % PAGE
            before = bounced(a)
            assert a.write_from_fd(f.fileno(), off, 1 << 20) == first
            assert bounced(a) - before == (first if in_window(dist) else 0)
            assert b.read() == data[off:end]


@pytest.mark.parametrize("dist", [8, 0])
def test_write_from_fd_bounced_read_errors(datafile, tmp_path, dist):
    # errors before any byte: nothing published, the same errno as the direct path
    fd, data = datafile
    with Pair(1 << 16, 4096) as p:
        a = p.a
        a.write(b"head")
        r, w = os.pipe()
        dirfd = os.open(tmp_path, os.O_RDONLY)
        wronly = os.open(tmp_path / "w", os.O_WRONLY | os.O_CREAT)
        try:
            for bad, code in ((1 << 20, errno.EBADF), (r, errno.ESPIPE), (dirfd, errno.EISDIR),
                              (wronly, errno.EBADF)):
                with pytest.raises(OSError) as info:
                    a.write_from_fd(bad, offset_for(a, dist, 4096 + 8), 1 << 16)
                assert info.value.errno == code
        finally:
            for x in (r, w, dirfd, wronly):
                os.close(x)
        assert a.tx_bytes == 4 and p.ra.get_u64(ring.OFF_PROD) == 4 and bounced(a) == 0
        assert p.b.read() == b"head"
        off = offset_for(a, dist, 8)
        assert a.write_from_fd(fd, off, 10) == 10 and p.b.read() == data[off:off + 10]


class HoleyMemory:
    """`pages` readable pages of `content` followed by a page beyond the end of their memfd:
    pread of /proc/self/mem returns the readable bytes short, then fails with EIO."""

    def __init__(self, content, pages):
        import ctypes
        import mmap as _mmap
        self.libc = libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.memfd = os.memfd_create("smcish-holey", os.MFD_CLOEXEC)
        os.write(self.memfd, content[:pages * PAGE].ljust(pages * PAGE, b"\0"))
        self.length = (pages + 1) * PAGE
        addr = libc.mmap(None, self.length, _mmap.PROT_READ, _mmap.MAP_SHARED, self.memfd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            os.close(self.memfd)
            raise OSError(ctypes.get_errno(), "mmap")
        self.addr = addr
        self.end = addr + pages * PAGE
        try:
            self.fd = os.open("/proc/self/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            self.close()
            pytest.skip(f"/proc/self/mem: {exc}")

    def close(self):
        self.libc.munmap(self.addr, self.length)
        os.close(self.memfd)
        if getattr(self, "fd", -1) >= 0:
            os.close(self.fd)
            self.fd = -1


@pytest.mark.parametrize("dist", [1, 8, 31, 0, 2048])
def test_write_from_fd_bounced_error_after_some_bytes_publishes_them(dist):
    # 40 readable pages (more than the bounce buffer) at a page offset of the file (here
    # /proc/self/mem, whose offsets are addresses), then a hole: the read fails with EIO after
    # a short read. The bytes before it are published; the next call reports the error.
    content = payload(40 * PAGE, 5)
    mem = HoleyMemory(content, 40)
    try:
        with Pair(1 << 20, 4096) as p:
            a, b = p.a, p.b
            for skip in (8, 1, 63, 40 * PAGE - 100):
                off = offset_for(a, dist, mem.addr + skip)
                if off >= mem.end:
                    continue
                before = bounced(a)
                n = a.write_from_fd(mem.fd, off, 1 << 20)
                assert n == mem.end - off > 0
                assert bounced(a) - before == (n if in_window(dist) else 0)
                assert b.read() == content[off - mem.addr:]
                tx = a.tx_bytes
                with pytest.raises(OSError) as info:
                    a.write_from_fd(mem.fd, mem.end, 1 << 20)
                assert info.value.errno == errno.EIO
                assert a.tx_bytes == tx and b.readable() == 0
            # across the wrap: the first segment is read whole, the second fails after a part
            cap = a.tx_capacity
            place(p, index_with_page_offset(a, 0, cap - 10 * PAGE))
            off = offset_for(a, dist, mem.addr + 8)
            n = a.write_from_fd(mem.fd, off, 1 << 20)
            assert n == mem.end - off and n > cap - (a._r.tx_prod - n) % cap
            assert b.read() == content[off - mem.addr:]
    finally:
        mem.close()


def test_write_from_fd_bounces_in_several_threads_at_once(datafile):
    # each thread has its own bounce buffer; the reads run without the GIL
    fd, data = datafile
    errors = []

    def worker(k):
        try:
            with Pair(1 << 18, 4096) as p:
                a, b = p.a, p.b
                rng = random.Random(k)
                total = 0
                for _ in range(60):
                    dist = rng.choice([1, 8, 17, 31, 0, 32, 63])
                    off = offset_for(a, dist, rng.randrange(0, len(data) - 300000))
                    count = rng.randrange(1, 300000)
                    n = a.write_from_fd(fd, off, count)
                    assert n == min(count, a.tx_capacity)
                    got = bytearray()
                    while len(got) < n:
                        got += b.read()
                    assert got == data[off:off + n]
                    total += n if in_window(dist) else 0
                assert bounced(a) == total > 0
        except BaseException as exc:   # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@given(st.sampled_from([4096, 8192, 65536, 1 << 20]),
       st.one_of(st.just(0), st.integers(0, U64 - 1), st.integers(U64 - 70000, U64 - 1)),
       st.booleans(),
       st.lists(st.tuples(st.one_of(st.integers(1, WINDOW - 1), st.integers(0, PAGE - 1)),
                          st.integers(0, (1 << 20) + 900), st.integers(0, 300000),
                          st.integers(0, 300000)), min_size=1, max_size=10))
@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
def test_write_from_fd_bounced_matches_the_file_byte_for_byte(datafile, cap, start, heap, steps):
    # heap=True: exact-size malloc'd regions, so AddressSanitizer checks every bounce memcpy
    fd, data = datafile
    with Pair(cap, 4096, start_a=start, heap=heap) as p:
        queue = bytearray()
        for dist, near, count, drain in steps:
            offset = offset_for(p.a, dist, near)
            before = bounced(p.a)
            n = p.a.write_from_fd(fd, offset, count)
            assert n == max(0, min(count, cap - len(queue), len(data) - offset))
            assert bounced(p.a) - before == (n if in_window(dist) else 0)
            queue += data[offset:offset + n]
            got = p.b.read(drain)
            assert got == bytes(queue[:len(got)])
            del queue[:len(got)]
        assert p.b.read() == bytes(queue)
        assert p.ra.get_u64(ring.OFF_PROD) == (start + p.a.tx_bytes) % U64


# --------------------------------------------------------------- the byte-stream property

@st.composite
def zc_scenario(draw):
    cap_a = draw(st.sampled_from([4096, 8192, 65536]))
    start = draw(st.one_of(st.just(0), st.integers(0, U64 - 1), st.integers(U64 - 3 * cap_a, U64 - 1)))
    size = st.one_of(st.integers(0, 64), st.integers(0, 2 * cap_a))
    op = st.one_of(
        st.tuples(st.just("write"), size, st.none()),
        st.tuples(st.just("writev"), st.lists(size, max_size=4), st.none()),
        st.tuples(st.just("reserve"), size, st.floats(0, 1)),     # commit this fraction of it
        st.tuples(st.just("reserve_cancel"), size, st.none()),
        st.tuples(st.just("from_fd"), size, st.integers(0, 1 << 20)),
        st.tuples(st.just("read"), st.one_of(st.just(-1), size), st.none()),
        st.tuples(st.just("read_into"), size, st.none()),
        st.tuples(st.just("peek"), st.one_of(st.just(-1), size), st.floats(0, 1)),  # consume a fraction
    )
    return cap_a, start, draw(st.lists(op, max_size=40))


@given(zc_scenario())
@settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.data_too_large,
                                                                   HealthCheck.function_scoped_fixture])
def test_zero_copy_interleaved_with_copies_delivers_exact_bytes_in_order(datafile, scenario):
    fd, data = datafile
    cap, start, ops = scenario
    counter = 0
    with Pair(cap, 4096, start_a=start) as p:
        a, b = p.a, p.b
        queue = bytearray()
        for op, arg, extra in ops:
            free = cap - len(queue)
            if op == "write":
                counter += 1
                chunk = payload(arg, counter)
                n = a.write(chunk)
                assert n == min(arg, free)
                queue += chunk[:n]
            elif op == "writev":
                parts = []
                for size in arg:
                    counter += 1
                    parts.append(payload(size, counter))
                n = a.writev(parts)
                assert n == min(sum(arg), free)
                queue += b"".join(parts)[:n]
            elif op in ("reserve", "reserve_cancel"):
                tx_pos = (start + a.tx_bytes) % cap
                view = a.reserve(arg)
                assert len(view) == min(arg, free, cap - tx_pos)
                assert a.reservation == len(view)
                counter += 1
                chunk = payload(len(view), counter)
                fill(view, chunk)
                if op == "reserve_cancel" or not view:
                    a.cancel_reservation()
                else:
                    k = int(len(view) * extra)
                    a.commit(k)
                    queue += chunk[:k]
                assert a.reservation == 0
            elif op == "from_fd":
                n = a.write_from_fd(fd, extra, arg)
                assert n == max(0, min(arg, free, len(data) - extra))
                queue += data[extra:extra + n]
            elif op == "read":
                got = b.read(arg)
                want = len(queue) if arg < 0 else min(arg, len(queue))
                assert got == bytes(queue[:want])
                del queue[:want]
            elif op == "read_into":
                dst = bytearray(arg)
                n = b.read_into(dst)
                assert n == min(arg, len(queue)) and dst[:n] == queue[:n]
                del queue[:n]
            else:
                rx_pos = (start + b.rx_bytes) % cap
                view = b.peek(arg)
                want = len(queue) if arg < 0 else min(arg, len(queue))
                assert len(view) == min(want, cap - rx_pos) and view.readonly
                assert view == bytes(queue[:len(view)])
                k = int(len(view) * extra)
                b.consume(k)
                view.release()
                del queue[:k]
            assert b.readable() == len(queue)
            assert a.tx_space() == cap - len(queue)
            assert bool(b.status() & ST_DATA) == bool(queue)
        assert b.read() == bytes(queue)
        assert a.tx_bytes == b.rx_bytes
        assert p.ra.get_u64(ring.OFF_PROD) == p.rb.get_u64(ring.OFF_CONS_PEER) == (start + a.tx_bytes) % U64


# ---------------------------------------------------------------------------- slot rings

def test_slot_rings_zero_copy_and_ring_switch():
    with GroupPair() as p:
        ra, rb = p.slot_rings(3, 4096)
        v = ra.reserve(100)
        with pytest.raises(ValueError, match="outstanding"):
            ra.switch_tx(p.a.rw[2], 0, 8192, 2)
        fill(v, payload(100, 1))
        ra.commit(100)
        with rb.peek() as pv:
            assert pv == payload(100, 1)
        rb.consume(50)
        assert ra.switch_tx(p.a.rw[2], 8192, 8192, 2)  # 50 bytes of the old block are unread
        v = ra.reserve(1 << 20)
        assert len(v) == 8092  # the new block, empty: cursor 100 is its offset 100, up to its end
        fill(v, payload(8092, 2))
        ra.commit(8092)
        with rb.peek() as pv:
            assert pv == payload(100, 1)[50:]  # a view never spans the switch
        with pytest.raises(ValueError):
            rb.consume(51)
        rb.consume(50)  # reaches the switch: the next peek sees the new block
        assert rb.rx_switches == 1 and rb.rx_capacity == 8192
        assert rb._rx_view is None  # the ring no longer pins the old block's extent
        with rb.peek() as pv:
            assert pv == payload(8092, 2)
            rb.consume(8000)
        assert not ra.switch_pending()
        assert rb.read() == payload(8092, 2)[8000:]
        assert ra.tx_bytes == rb.rx_bytes == 100 + 8092


@given(st.lists(st.tuples(st.sampled_from(["reserve", "write", "switch", "peek", "read"]),
                          st.integers(0, 20000), st.floats(0, 1)), max_size=40),
       st.one_of(st.just(0), st.integers(U64 - 70000, U64 - 1)))
@HYP
def test_slot_ring_zero_copy_across_switches_delivers_exact_bytes(ops, start):
    blocks = [(1, 0, 4096), (2, 0, 16384), (1, 65536, 65536), (2, 1 << 20, 8192), (1, 8192, 4096)]
    with GroupPair() as p:
        ra, rb = p.slot_rings(5, 4096, start_a=start)
        cur = 0
        queue = bytearray()
        counter = 0
        for op, size, frac in ops:
            counter += 1
            if op == "reserve":
                v = ra.reserve(size)
                chunk = payload(len(v), counter)
                fill(v, chunk)
                k = int(len(v) * frac)
                if v:
                    ra.commit(k)
                queue += chunk[:k]
            elif op == "write":
                chunk = payload(size, counter)
                queue += chunk[:ra.write(chunk)]
            elif op == "switch":
                nxt = (cur + 1) % len(blocks)
                ext, off, cap = blocks[nxt]
                if ra.switch_pending():
                    continue  # the block we would go to may still be read
                if ra.switch_tx(p.a.rw[ext], off, cap, ext):
                    cur = nxt
            elif op == "peek":
                v = rb.peek(size)
                assert 0 < len(v) <= min(size, len(queue)) or not (size and queue)
                assert v == bytes(queue[:len(v)])
                k = int(len(v) * frac)
                rb.consume(k)
                v.release()
                del queue[:k]
            else:
                got = rb.read(size)
                assert got == bytes(queue[:len(got)])
                del queue[:len(got)]
            assert rb.readable() == len(queue)
        got = bytearray()
        while True:
            with rb.peek() as v:
                if not v:
                    break
                got += v
                rb.consume(len(v))
        assert got == queue and ra.tx_bytes == rb.rx_bytes


# ---------------------------------------------------------------------------- hostile peers

@pytest.fixture(params=["end", "start"])
def victim(request):
    v = Victim(align=request.param)
    yield v
    v.close()


@pytest.fixture(params=["end", "start"])
def gvictim(request):
    v = GroupVictim(align=request.param)
    yield v
    v.close()


def test_peek_reads_a_hostile_but_valid_ring_exactly_up_to_the_guard_page(victim):
    # The block's last byte is the last byte before a PROT_NONE page (align="end") or its first
    # byte follows one (align="start"): reading every byte of every view would fault if a view
    # reached outside the block.
    r = victim.ring
    victim.evil.put_data(0, payload(4096, 1))
    victim.evil.put_u64(ring.OFF_PROD, 4096)
    with r.peek() as v:
        assert len(v) == 4096 and bytes(v) == payload(4096, 1)
    r.consume(4000)
    victim.evil.put_data(4096, payload(4000, 2))
    victim.evil.put_u64(ring.OFF_PROD, 4096 + 4000)
    with r.peek() as v:
        assert bytes(v) == payload(4096, 1)[4000:]  # up to the end of the block, not beyond
    r.consume(96)
    with r.peek() as v:
        assert bytes(v) == payload(4000, 2)
    r.consume(4000)


@pytest.mark.parametrize("bad_prod", [4097, 1 << 40, U64 - 1, U64 - 4096])
def test_hostile_prod_makes_peek_raise(victim, bad_prod):
    victim.evil.put_u64(ring.OFF_PROD, bad_prod)
    with pytest.raises(RingCorrupted, match=rf"peer prod {bad_prod} outside \[0, 4096\]"):
        victim.ring.peek()
    for call in (victim.ring.peek, lambda: victim.ring.peek(1), lambda: victim.ring.consume(0),
                 lambda: victim.ring.reserve(1), lambda: victim.ring.commit(0),
                 lambda: victim.ring.write_from_fd(0, 0, 1)):
        with pytest.raises(RingCorrupted, match="peer prod"):
            call()


def test_hostile_prod_going_backwards_after_a_peek(victim):
    r = victim.ring
    victim.evil.put_u64(ring.OFF_PROD, 100)
    with r.peek() as v:
        assert len(v) == 100
    victim.evil.put_u64(ring.OFF_PROD, 10)  # consume only uses what was validated
    r.consume(60)
    assert victim.mine.get_u64(ring.OFF_CONS_PEER) == 60
    with pytest.raises(RingCorrupted, match=r"prod 10 outside \[100, 4156\]"):
        r.peek()


def test_hostile_consumer_cursor_makes_reserve_and_write_from_fd_raise(victim, datafile):
    fd, _ = datafile
    r = victim.ring
    assert r.write(b"x" * 4096) == 4096
    victim.evil.put_u64(ring.OFF_CONS_PEER, 3000)
    with r.reserve(10000) as v:
        assert len(v) == 3000  # from the block's start up to the validated cursor
        bytes(v)
    r.cancel_reservation()
    victim.evil.put_u64(ring.OFF_CONS_PEER, 5000)  # beyond our prod
    with pytest.raises(RingCorrupted, match=r"cons_peer .* 5000 outside \[3000, 4096\]"):
        r.reserve(4000)
    with pytest.raises(RingCorrupted, match="cons_peer"):
        r.write_from_fd(fd, 0, 10)


def test_hostile_consumer_cursor_going_backwards_stops_write_from_fd(victim, datafile):
    fd, _ = datafile
    r = victim.ring
    assert r.write_from_fd(fd, 0, 8192) == 4096
    victim.evil.put_u64(ring.OFF_CONS_PEER, 3000)
    assert r.write_from_fd(fd, 0, 8192) == 3000
    victim.evil.put_u64(ring.OFF_CONS_PEER, 2999)
    with pytest.raises(RingCorrupted, match=r"2999 outside \[3000, 7096\]"):
        r.write_from_fd(fd, 0, 8192)
    assert victim.mine.get_u64(ring.OFF_PROD) == 7096


@given(st.lists(st.tuples(st.one_of(st.integers(0, 5000), st.integers(0, U64 - 1),
                                    st.integers(U64 - 5000, U64 - 1)),
                          st.one_of(st.just(-1), st.integers(0, 5000)), st.floats(0, 1)),
                max_size=25),
       st.sampled_from(["end", "start"]))
@settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])
def test_fuzzed_hostile_prod_never_yields_a_view_outside_the_block(steps, align):
    with Victim(align=align) as v:
        r = v.ring
        cons = seen = 0  # our cursor, the last prod validated (mod 2**64)
        for prod, want, frac in steps:
            v.evil.put_u64(ring.OFF_PROD, prod)
            cached = (seen - cons) % U64
            w = U64 - 1 if want < 0 else want
            if cached < w:  # the prod is reloaded (and validated) only when needed
                valid = cached <= (prod - cons) % U64 <= 4096
                try:
                    view = r.peek(want)
                except RingCorrupted:
                    assert not valid
                    return
                assert valid
                seen = prod
            else:
                view = r.peek(want)
            avail = (seen - cons) % U64
            assert len(view) == min(avail, 4096 - cons % 4096, w)
            bytes(view)  # every byte readable: a view outside the block would fault
            k = int(len(view) * frac)
            r.consume(k)
            view.release()
            cons = (cons + k) % U64


def test_values_flipped_from_a_thread_while_peeking(victim):
    r = victim.ring
    stop = threading.Event()

    def flip():
        rnd = random.Random(5)
        while not stop.is_set():
            victim.evil.put_u64(ring.OFF_PROD, rnd.choice([0, 100, 4096, 4097, U64 - 1, rnd.getrandbits(64)]))

    t = threading.Thread(target=flip)
    t.start()
    try:
        with pytest.raises(RingCorrupted):
            for _ in range(200000):
                v = r.peek()
                bytes(v)
                r.consume(len(v) // 2)
                v.release()
    finally:
        stop.set()
        t.join()


def test_group_peek_follows_an_honest_switch_from_a_hostile_peer(gvictim):
    r = gvictim.ring
    gvictim.evil1.write(0, b"a" * 100)
    gvictim.hdr(ring.OFF_PROD, "<Q", 100)
    gvictim.switch(1, 100, 1, 65536, 12)  # the new block ends flush with the extent (guard page)
    gvictim.evil1.write(65536, b"b" * 4096)
    gvictim.hdr(ring.OFF_PROD, "<Q", 100 + 4096)
    with r.peek() as v:
        assert bytes(v) == b"a" * 100  # the old block's rest only
    r.consume(100)
    assert r.rx_switches == 1
    with r.peek() as v:
        assert bytes(v) == b"b" * 3996  # cursor 100 is offset 100 of the new block: to its end
    r.consume(3996)
    with r.peek() as v:
        assert bytes(v) == b"b" * 100
    r.consume(100)


@pytest.mark.parametrize("ext, off, log2, match", [
    (1, 0, 11, "log2 11 outside"), (2, 0, 12, "extent 2 is not attached"),
    (1, 4096, 13, "not a multiple"), (1, 65536, 13, "exceeds"), (1, U64 - 4096, 12, "exceeds"),
])
def test_group_hostile_switch_makes_peek_raise(gvictim, ext, off, log2, match):
    gvictim.hdr(ring.OFF_PROD, "<Q", 10)
    gvictim.switch(1, 10, ext, off, log2)
    with pytest.raises(RingCorrupted, match=match):
        gvictim.ring.peek()
    with pytest.raises(RingCorrupted, match="invalid ring block"):
        gvictim.ring.consume(0)


def test_group_hostile_prod_beyond_the_switch_bound_makes_peek_raise(gvictim):
    gvictim.hdr(ring.OFF_PROD, "<Q", 100)
    gvictim.switch(1, 100, 1, 8192, 13)
    gvictim.hdr(ring.OFF_PROD, "<Q", 100 + 8192 + 1)
    with pytest.raises(RingCorrupted, match=r"prod 8293 outside \[0, 8292\]"):
        gvictim.ring.peek(1 << 20)


@given(st.lists(st.tuples(st.sampled_from(["reserve", "from_fd", "peek", "read"]),
                          st.integers(1, 9000)), min_size=1, max_size=30),
       st.integers(0, U64 - 1))
@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_heap_backed_zero_copy_roundtrip(datafile, ops, start):
    # On malloc'd memory (PYTHONMALLOC=malloc under AddressSanitizer, docs/ring.md) every pread
    # target and every view access is checked against the exact-size regions' redzones.
    fd, data = datafile
    with Pair(4096, 8192, start_a=start, heap=True) as p:
        expected = bytearray()
        got = bytearray()
        for i, (op, size) in enumerate(ops):
            if op == "reserve":
                v = p.a.reserve(size)
                chunk = payload(len(v), i)
                fill(v, chunk)
                if v:
                    p.a.commit(len(v))
                expected += chunk
            elif op == "from_fd":
                off = (i * 7919) % len(data)
                n = p.a.write_from_fd(fd, off, size)
                expected += data[off:off + n]
            elif op == "peek":
                with p.b.peek(size) as v:
                    got += v
                    p.b.consume(len(v))
            else:
                got += p.b.read(size)
        got += p.b.read()
        assert got == expected
