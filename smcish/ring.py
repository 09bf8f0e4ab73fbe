"""The Python face of the shared-memory ring (smcish._ring, built from smcish/_cffi/ring.c).

This module is the only importer of the compiled extension. It turns negative returns into
exceptions and otherwise stays out of the way: it sits on the per-message path, so methods are
one C call plus one comparison. Every C call runs without the GIL (cffi API mode releases it),
so large copies do not block other Python threads. Layout and protocol: docs/ring.md.
"""

from __future__ import annotations

import os

from smcish._buffers import new_bytes as _new_bytes

try:
    from smcish._ring import ffi as _ffi, lib as _lib
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "smcish._ring (the compiled ring) is missing: install the package (pip install .) or build "
        "it in place with `python smcish/_cffi/build_ring.py`"
    ) from exc

__all__ = [
    "HEADER_SIZE", "MIN_CAPACITY", "MAX_CAPACITY",
    "ST_DATA", "ST_EOF", "ST_CLOSED", "ST_ABORT", "ST_SPACE",
    "OFF_PROD", "OFF_CONS_PEER", "OFF_STATE", "OFF_WANT_DATA", "OFF_WANT_SPACE", "OFF_EOF_POS",
    "OFF_MAGIC", "OFF_CAPACITY", "MAGIC", "STATE_EOF", "STATE_CLOSED", "STATE_ABORT",
    "region_size", "RingError", "RingCorrupted", "Ring", "drain_doorbell",
]

HEADER_SIZE: int = _lib.SMC_HEADER_SIZE
MIN_CAPACITY: int = _lib.SMC_MIN_CAPACITY
MAX_CAPACITY: int = _lib.SMC_MAX_CAPACITY

ST_DATA: int = _lib.SMC_ST_DATA
ST_EOF: int = _lib.SMC_ST_EOF
ST_CLOSED: int = _lib.SMC_ST_CLOSED
ST_ABORT: int = _lib.SMC_ST_ABORT
ST_SPACE: int = _lib.SMC_ST_SPACE

# Header layout (for tests, tools and the device; the ring itself never needs these in Python).
OFF_PROD: int = _lib.SMC_OFF_PROD
OFF_CONS_PEER: int = _lib.SMC_OFF_CONS_PEER
OFF_STATE: int = _lib.SMC_OFF_STATE
OFF_WANT_DATA: int = _lib.SMC_OFF_WANT_DATA
OFF_WANT_SPACE: int = _lib.SMC_OFF_WANT_SPACE
OFF_EOF_POS: int = _lib.SMC_OFF_EOF_POS
OFF_MAGIC: int = _lib.SMC_OFF_MAGIC
OFF_CAPACITY: int = _lib.SMC_OFF_CAPACITY
MAGIC: int = _lib.SMC_MAGIC
STATE_EOF: int = _lib.SMC_STATE_EOF
STATE_CLOSED: int = _lib.SMC_STATE_CLOSED
STATE_ABORT: int = _lib.SMC_STATE_ABORT

_EINVAL = _lib.SMC_EINVAL
_ECLOSED = _lib.SMC_ECLOSED

# Bound once: attribute lookups on `lib` cost more than the calls' own Python overhead.
_new = _ffi.new
_from_buffer = _ffi.from_buffer
_release = _ffi.release
_CHAR_ARRAY = _ffi.typeof("char[]")  # from_buffer(type, buf, True): positional args parse ~2x faster
_tx_write = _lib.smc_tx_write
_tx_writev = _lib.smc_tx_writev
_tx_space = _lib.smc_tx_space
_rx_avail = _lib.smc_rx_avail
_rx_read = _lib.smc_rx_read
_rx_status = _lib.smc_rx_status
_rx_prepare_sleep = _lib.smc_rx_prepare_sleep
_tx_prepare_sleep = _lib.smc_tx_prepare_sleep
_clear_wants = _lib.smc_clear_wants
_set_state = _lib.smc_set_state
_rx_spin = _lib.smc_rx_spin
_tx_spin = _lib.smc_tx_spin
_doorbell = _lib.smc_doorbell
_doorbell_drain = _lib.smc_doorbell_drain

# writev joins the buffers in Python and makes one write (about 20 ns a buffer plus a memcpy)
# when the total or the average buffer is small; otherwise the C gather saves that extra copy at
# about 0.3 us of cffi overhead a buffer. Measured (docs/ring.md): 256 x 64 B join 5.6 us vs
# gather 73 us; 64 x 4 KiB 34 vs 49 us; 16 x 16 KiB 31 vs 29 us; 16 x 64 KiB 156 vs 94 us.
_JOIN_LIMIT = 64 * 1024
# read(): from this size on, fill an uninitialised bytes object in place (below it, the ctypes
# call costs more than the copy it saves).
_DIRECT_READ = 4096
_JOIN_AVG_LIMIT = 8 * 1024


def region_size(capacity: int) -> int:
    """Bytes a region needs for a ring of `capacity` bytes.

    Args:
        capacity: ring capacity, a power of two in [MIN_CAPACITY, MAX_CAPACITY].
    Returns:
        HEADER_SIZE + capacity.
    Raises:
        ValueError: capacity is not a power of two in range.
    """
    if not (MIN_CAPACITY <= capacity <= MAX_CAPACITY) or capacity & (capacity - 1):
        raise ValueError(
            f"ring capacity {capacity} must be a power of two in [{MIN_CAPACITY}, {MAX_CAPACITY}]")
    return HEADER_SIZE + capacity


class RingError(ConnectionError):
    """Base class of the ring's errors."""


class RingCorrupted(RingError, ConnectionResetError):
    """The peer wrote an invalid cursor or flag into its region: abort the connection.

    The error is sticky: every later call on the same Ring raises it again.
    """


def _corruption_message(r) -> str:
    detail = r.err_detail
    seen, lo, hi = r.err_seen, r.err_lo, r.err_hi
    if detail == _lib.SMC_DETAIL_PROD_RANGE:
        return (f"peer ring corrupted: peer prod {seen} outside [{lo}, {hi}] (it may neither go "
                f"below the last prod seen nor run more than the capacity {r.rx_cap} ahead of our "
                f"consumer cursor {r.rx_cons})")
    if detail == _lib.SMC_DETAIL_CONS_RANGE:
        return (f"peer ring corrupted: peer cons_peer (its consumer cursor of our ring) {seen} "
                f"outside [{lo}, {hi}] (it may neither go backwards nor pass our prod {hi})")
    if detail == _lib.SMC_DETAIL_EOF_POS:
        return f"peer ring corrupted: peer eof_pos {seen} differs from its prod {lo} read after EOF"
    if detail == _lib.SMC_DETAIL_PROD_AFTER_EOF:
        return f"peer ring corrupted: peer prod {seen} moved after EOF at eof_pos {lo}"
    return f"peer ring corrupted (error {r.error})"  # pragma: no cover


class Ring:
    """Both directions of one connection: our ring (we write) and the peer's (we read).

    Args:
        my_mem: writable buffer (mmap, memoryview) of our region, >= region_size(tx_capacity).
        peer_mem: buffer of the peer's region, read-only is enough and expected,
            >= region_size(rx_capacity). The ring never stores into it.
        tx_capacity: capacity of our ring (from our own allocation).
        rx_capacity: capacity of the peer's ring (from the validated handshake).
        peer_doorbell_fd: eventfd to write to wake the peer, or -1.
    Raises:
        ValueError: bad capacities, too short or misaligned buffers, overlapping regions.

    The Ring keeps references to both buffers (and buffer exports on them) until close().
    Cursors resume from our own header (zero for a fresh region).
    Not thread-safe: use one Ring from one thread at a time (the event loop's), and never
    close() it while another thread is inside a call (the calls run without the GIL).
    """

    __slots__ = ("_r", "_my", "_peer", "_my_mem", "_peer_mem", "tx_capacity", "rx_capacity",
                 "__weakref__")

    def __init__(self, my_mem, peer_mem, tx_capacity: int, rx_capacity: int,
                 peer_doorbell_fd: int = -1):
        self._r = _new("struct smc_ring *")
        self._my = self._peer = None
        region_size(tx_capacity)
        region_size(rx_capacity)
        self._my_mem = my_mem
        self._peer_mem = peer_mem
        try:
            self._my = _from_buffer("uint8_t[]", my_mem, require_writable=True)
        except BufferError:
            raise TypeError("my_mem must be a writable buffer (our own region)") from None
        try:
            self._peer = _from_buffer("uint8_t[]", peer_mem)
        except BaseException:
            self.close()
            raise
        self.tx_capacity = tx_capacity
        self.rx_capacity = rx_capacity
        my_len, peer_len = len(self._my), len(self._peer)
        rc = _lib.smc_ring_init(self._r, self._my, my_len, self._peer, peer_len,
                                tx_capacity, rx_capacity, peer_doorbell_fd)
        if rc < 0:
            self.close()
            raise ValueError(
                f"cannot set up ring: each region needs >= {HEADER_SIZE} + its capacity bytes "
                f"(got {my_len} and {peer_len} bytes for capacities {tx_capacity} and "
                f"{rx_capacity}), 8-byte alignment and no overlap; peer_doorbell_fd must be "
                f">= -1 (got {peer_doorbell_fd})")

    # ------------------------------------------------------------------ errors

    def _raise(self, rc):
        if rc == _EINVAL:
            if self._r.my_state:
                raise ValueError("cannot write: EOF, close or abort was already published")
            raise ValueError("invalid argument to the ring")
        if rc == _ECLOSED:
            raise ValueError("ring is closed")
        raise RingCorrupted(_corruption_message(self._r))

    # ------------------------------------------------------------------ sending

    def write(self, data) -> int:
        """Copy as much of `data` as fits into our ring and publish it.

        Args:
            data: bytes (fast path) or any contiguous buffer.
        Returns:
            Bytes written, 0 when the ring is full.
        Raises:
            RingCorrupted: the peer's consumer cursor is invalid.
            ValueError: after set_eof/set_closed/set_abort, or the ring is closed.
        """
        if type(data) is bytes:
            n = _tx_write(self._r, data, len(data))
        else:
            buf = _from_buffer(data)
            n = _tx_write(self._r, buf, len(buf))
        if n < 0:
            self._raise(n)
        return n

    def writev(self, buffers) -> int:
        """Gather-write a sequence of buffers with one publish and one doorbell check.

        Args:
            buffers: sequence of bytes-like objects, written in order, the last one that fits
                possibly partially.
        Returns:
            Total bytes written.
        Raises:
            Same as write().
        """
        if type(buffers) is not list and type(buffers) is not tuple:
            buffers = list(buffers)
        count = len(buffers)
        total = sum(map(len, buffers))
        if total <= _JOIN_LIMIT or total < _JOIN_AVG_LIMIT * count:
            joined = b"".join(buffers)
            n = _tx_write(self._r, joined, len(joined))
        else:
            views = [_from_buffer(b) for b in buffers]
            n = _tx_writev(self._r, views, [len(v) for v in views], count)
        if n < 0:
            self._raise(n)
        return n

    def tx_space(self) -> int:
        """Free bytes in our ring (re-reads and validates the peer's consumer cursor)."""
        n = _tx_space(self._r)
        if n < 0:
            self._raise(n)
        return n

    # ------------------------------------------------------------------ receiving

    def readable(self) -> int:
        """Bytes readable from the peer's ring (re-reads and validates the peer's prod)."""
        n = _rx_avail(self._r)
        if n < 0:
            self._raise(n)
        return n

    def read_into(self, buf) -> int:
        """Copy up to len(buf) readable bytes into `buf` (one copy) and publish the consumption.

        Args:
            buf: writable contiguous buffer (bytearray, memoryview, mmap, array).
        Returns:
            Bytes copied, 0 when nothing is readable.
        Raises:
            RingCorrupted: the peer's prod or eof_pos is invalid.
        """
        dst = _from_buffer(_CHAR_ARRAY, buf, True)  # True: require_writable
        n = _rx_read(self._r, dst, len(dst))
        if n < 0:
            self._raise(n)
        return n

    def read(self, n: int = -1) -> bytes:
        """Read up to `n` bytes (all readable bytes when n < 0); b"" when nothing is readable."""
        if n < 0 or n > 65536:  # do not allocate more than can be there
            avail = self.readable()
            n = avail if n < 0 else min(n, avail)
        if n == 0:
            return b""
        if n >= _DIRECT_READ:
            # One copy, ring -> a fresh bytes object (no zero-fill, no second copy).
            out = _new_bytes(n)
            got = _rx_read(self._r, _from_buffer(_CHAR_ARRAY, out, False), n)
            if got < 0:
                self._raise(got)
            return out if got == n else out[:got]
        out = bytearray(n)
        got = _rx_read(self._r, _from_buffer(out), n)
        if got < 0:
            self._raise(got)
        if got != n:
            del out[got:]
        return bytes(out)

    # ------------------------------------------------------------------ state and sleeping

    def status(self) -> int:
        """Validated ST_* bits: DATA, EOF (peer EOF and all of it consumed), CLOSED, ABORT, SPACE."""
        bits = _rx_status(self._r)
        if bits < 0:
            self._raise(bits)
        return bits

    def prepare_sleep_rx(self) -> int:
        """Announce that we are about to sleep waiting for data (new want_data epoch), then re-check.

        Returns:
            0: nothing pending, sleep on our doorbell now (the flag stays set; call clear_wants()
            after waking). >0: ST_* bits (at least one of DATA/EOF/CLOSED/ABORT); flag cleared.
        """
        bits = _rx_prepare_sleep(self._r)
        if bits < 0:
            self._raise(bits)
        return bits

    def prepare_sleep_tx(self) -> int:
        """Announce that we wait for space in our ring, then re-check.

        Returns:
            0: still full, sleep now. >0: ST_* bits (SPACE, or CLOSED/ABORT from the peer);
            flag cleared.
        """
        bits = _tx_prepare_sleep(self._r)
        if bits < 0:
            self._raise(bits)
        return bits

    def clear_wants(self) -> None:
        """Clear both of our want flags (after waking up)."""
        _clear_wants(self._r)

    def _set_state(self, bits):
        rc = _set_state(self._r, bits)
        if rc < 0:
            self._raise(rc)

    def set_eof(self) -> None:
        """Publish EOF at the current prod (write_eof). Later writes raise ValueError."""
        self._set_state(STATE_EOF)

    def set_closed(self) -> None:
        """Publish EOF (if not yet) and CLOSED together: we will neither write nor read again."""
        self._set_state(STATE_EOF | STATE_CLOSED)

    def set_abort(self) -> None:
        """Publish ABORT. Works even after RingCorrupted, so the peer learns about it."""
        self._set_state(STATE_ABORT)

    def spin(self, budget_us: float) -> int:
        """Busy-poll (without the GIL) for up to `budget_us` microseconds.

        Returns:
            ST_* bits (DATA/EOF/CLOSED/ABORT) as soon as one is present, 0 on timeout.
        """
        bits = _rx_spin(self._r, int(budget_us * 1000.0))
        if bits < 0:
            self._raise(bits)
        return bits

    def spin_tx(self, budget_us: float) -> int:
        """Busy-poll (without the GIL) for up to `budget_us` microseconds for space in our ring.

        Returns:
            ST_SPACE as soon as there is room, ST_CLOSED/ST_ABORT if the peer went away,
            0 on timeout (then prepare_sleep_tx() and sleep).
        """
        bits = _tx_spin(self._r, int(budget_us * 1000.0))
        if bits < 0:
            self._raise(bits)
        return bits

    def doorbell(self) -> None:
        """Ring the peer's doorbell unconditionally (no-op without one)."""
        rc = _doorbell(self._r)
        if rc < 0:
            raise OSError(-rc, f"ring doorbell write failed: {os.strerror(-rc)}")

    # ------------------------------------------------------------------ stats

    @property
    def doorbells(self) -> int:
        """Doorbells rung (eventfd writes done)."""
        return self._r.stat_doorbells

    @property
    def doorbell_errors(self) -> int:
        """Doorbell writes that failed other than with EAGAIN."""
        return self._r.stat_doorbell_errors

    @property
    def tx_bytes(self) -> int:
        """Bytes published into our ring."""
        return self._r.stat_tx_bytes

    @property
    def rx_bytes(self) -> int:
        """Bytes consumed from the peer's ring."""
        return self._r.stat_rx_bytes

    @property
    def spin_hits(self) -> int:
        """spin() calls that found something."""
        return self._r.stat_spin_hits

    @property
    def spin_misses(self) -> int:
        """spin() calls that ran out of budget."""
        return self._r.stat_spin_misses

    @property
    def tx_spin_hits(self) -> int:
        """spin_tx() calls that found space."""
        return self._r.stat_tx_spin_hits

    @property
    def tx_spin_misses(self) -> int:
        """spin_tx() calls that ran out of budget."""
        return self._r.stat_tx_spin_misses

    @property
    def closed(self) -> bool:
        """True after close()."""
        return self._my is None

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop using the mappings and release the buffer exports, so the caller can close them.

        Idempotent. Later calls raise ValueError; the stats stay readable.
        """
        _lib.smc_ring_close(self._r)
        for view in (self._my, self._peer):
            if view is not None:
                _release(view)
        self._my = self._peer = self._my_mem = self._peer_mem = None

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __repr__(self):
        r = self._r
        state = "closed" if self._my is None else f"tx_prod={r.tx_prod} rx_cons={r.rx_cons}"
        return f"<Ring tx_cap={self.tx_capacity} rx_cap={self.rx_capacity} {state}>"


def drain_doorbell(fd: int) -> int:
    """Read (and so reset) a non-blocking eventfd.

    Returns:
        The count read, 0 if nothing was pending.
    Raises:
        OSError: the read failed (other than EAGAIN).
    """
    n = _doorbell_drain(fd)
    if n < 0:
        raise OSError(-n, f"doorbell read failed: {os.strerror(-n)}")
    return n
