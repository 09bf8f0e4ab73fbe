"""The Python face of the shared-memory rings and link groups (smcish._ring, from smcish/_cffi/ring.c).

This module is the only importer of the compiled extension. It turns negative returns into
exceptions and otherwise stays out of the way: the Ring methods sit on the per-message path, so
each is one C call plus one comparison. Every C call runs without the GIL (cffi API mode releases
it), so large copies and spins do not block other Python threads. Layouts and protocol:
docs/ring.md; the contract: docs/design.md section 2.

Two kinds of ring:
- legacy: ``Ring(my_mem, peer_mem, tx_capacity, rx_capacity, peer_doorbell_fd)``, one region
  per side (header + ring), the peer woken through its eventfd;
- slot: ``Ring.in_slot(group, slot, ...)``, the headers are slot ``slot`` of a link ``Group``,
  the rings are blocks inside the group's extents and may be switched while the stream runs,
  notifications travel through the group's queue.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple, NoReturn, Self

from smcish._buffers import new_bytes as _new_bytes

try:
    from smcish._ring import ffi as _ffi
    from smcish._ring import lib as _lib
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "smcish._ring (the compiled ring) is missing: install the package (pip install .) or build "
        "it in place with `python smcish/_cffi/build_ring.py`"
    ) from exc

if TYPE_CHECKING:  # type-only names of the extension's stub (smcish/_ring.pyi), and the buffer protocol
    from typing_extensions import Buffer

    from smcish._ring import CData, GroupStruct, Pointer, RingStruct, SetupStruct, U32Array, U64Array

# ---------------------------------------------------------------------------------- constants
# Every SMC_* define of ring.h, without the prefix (tests/test_ring_slots.py checks the list is
# complete and the values equal).

HEADER_SIZE: int = _lib.SMC_HEADER_SIZE
MIN_CAPACITY: int = _lib.SMC_MIN_CAPACITY
MAX_CAPACITY: int = _lib.SMC_MAX_CAPACITY
MIN_LOG2: int = _lib.SMC_MIN_LOG2
MAX_LOG2: int = _lib.SMC_MAX_LOG2

# slot / region header layout
OFF_PROD: int = _lib.SMC_OFF_PROD
OFF_SW_SEQ: int = _lib.SMC_OFF_SW_SEQ
OFF_SW_LOG2: int = _lib.SMC_OFF_SW_LOG2
OFF_SW_POS: int = _lib.SMC_OFF_SW_POS
OFF_SW_OFF: int = _lib.SMC_OFF_SW_OFF
OFF_SW_EXT: int = _lib.SMC_OFF_SW_EXT
OFF_CONS_PEER: int = _lib.SMC_OFF_CONS_PEER
OFF_STATE: int = _lib.SMC_OFF_STATE
OFF_WANT_DATA: int = _lib.SMC_OFF_WANT_DATA
OFF_WANT_SPACE: int = _lib.SMC_OFF_WANT_SPACE
OFF_EOF_POS: int = _lib.SMC_OFF_EOF_POS
OFF_SETUP: int = _lib.SMC_OFF_SETUP
OFF_REASON: int = _lib.SMC_OFF_REASON
OFF_FAMILY: int = _lib.SMC_OFF_FAMILY
OFF_RING0_OFF: int = _lib.SMC_OFF_RING0_OFF
OFF_RING0_EXT: int = _lib.SMC_OFF_RING0_EXT
OFF_RING0_LOG2: int = _lib.SMC_OFF_RING0_LOG2
OFF_SOCK_INO: int = _lib.SMC_OFF_SOCK_INO
OFF_CPORT: int = _lib.SMC_OFF_CPORT
OFF_SPORT: int = _lib.SMC_OFF_SPORT
OFF_CADDR: int = _lib.SMC_OFF_CADDR
OFF_SADDR: int = _lib.SMC_OFF_SADDR
OFF_RELEASED: int = _lib.SMC_OFF_RELEASED

STATE_EOF: int = _lib.SMC_STATE_EOF
STATE_CLOSED: int = _lib.SMC_STATE_CLOSED
STATE_ABORT: int = _lib.SMC_STATE_ABORT

PHASE_NONE: int = _lib.SMC_PHASE_NONE
PHASE_CLAIMED: int = _lib.SMC_PHASE_CLAIMED
PHASE_FINAL_ISM: int = _lib.SMC_PHASE_FINAL_ISM
PHASE_FINAL_TCP: int = _lib.SMC_PHASE_FINAL_TCP
PHASE_OPTIMISTIC: int = _lib.SMC_PHASE_OPTIMISTIC
PHASE_WITHDRAWING: int = _lib.SMC_PHASE_WITHDRAWING
PHASE_ACCEPTED: int = _lib.SMC_PHASE_ACCEPTED
PHASE_DECLINED: int = _lib.SMC_PHASE_DECLINED

# link group: extent 0 layout
G_MAGIC: int = _lib.SMC_G_MAGIC
G_VERSION: int = _lib.SMC_G_VERSION
G_OFF_MAGIC: int = _lib.SMC_G_OFF_MAGIC
G_OFF_NQ_PROD: int = _lib.SMC_G_OFF_NQ_PROD
G_OFF_NQ_OVERFLOW: int = _lib.SMC_G_OFF_NQ_OVERFLOW
G_OFF_NQ_CONS_PEER: int = _lib.SMC_G_OFF_NQ_CONS_PEER
G_OFF_WANT_WAKE: int = _lib.SMC_G_OFF_WANT_WAKE
G_OFF_GSTATE: int = _lib.SMC_G_OFF_GSTATE
G_OFF_CPU: int = _lib.SMC_G_OFF_CPU
G_OFF_LISTENERS: int = _lib.SMC_G_OFF_LISTENERS
G_MAX_LISTENERS: int = _lib.SMC_G_MAX_LISTENERS
G_OFF_CLAIMS: int = _lib.SMC_G_OFF_CLAIMS
G_CLAIM_ENTRIES: int = _lib.SMC_G_CLAIM_ENTRIES
G_CLAIM_PROBE: int = _lib.SMC_G_CLAIM_PROBE
G_OFF_NQ: int = _lib.SMC_G_OFF_NQ
G_NQ_ENTRIES: int = _lib.SMC_G_NQ_ENTRIES
G_OFF_HDRS: int = _lib.SMC_G_OFF_HDRS
MAX_SLOTS: int = _lib.SMC_MAX_SLOTS
MIN_SLOTS: int = _lib.SMC_MIN_SLOTS
MAX_EXTENTS: int = _lib.SMC_MAX_EXTENTS
HOT_MAX: int = _lib.SMC_HOT_MAX
GSTATE_CLOSING: int = _lib.SMC_GSTATE_CLOSING
ROLE_CLIENT: int = _lib.SMC_ROLE_CLIENT
ROLE_SERVER: int = _lib.SMC_ROLE_SERVER

# C return codes and error details
EINVAL: int = _lib.SMC_EINVAL
EPROD: int = _lib.SMC_EPROD
ECONS: int = _lib.SMC_ECONS
EEOF: int = _lib.SMC_EEOF
ECLOSED: int = _lib.SMC_ECLOSED
ESWITCH: int = _lib.SMC_ESWITCH
EGROUP: int = _lib.SMC_EGROUP
EBUSY: int = _lib.SMC_EBUSY
EFULL: int = _lib.SMC_EFULL
EREAD: int = _lib.SMC_EREAD
DETAIL_PROD_RANGE: int = _lib.SMC_DETAIL_PROD_RANGE
DETAIL_CONS_RANGE: int = _lib.SMC_DETAIL_CONS_RANGE
DETAIL_EOF_POS: int = _lib.SMC_DETAIL_EOF_POS
DETAIL_PROD_AFTER_EOF: int = _lib.SMC_DETAIL_PROD_AFTER_EOF
DETAIL_SW_SEQ: int = _lib.SMC_DETAIL_SW_SEQ
DETAIL_SW_POS: int = _lib.SMC_DETAIL_SW_POS
DETAIL_SW_BLOCK: int = _lib.SMC_DETAIL_SW_BLOCK
DETAIL_NQ_PROD: int = _lib.SMC_DETAIL_NQ_PROD
DETAIL_NQ_CONS: int = _lib.SMC_DETAIL_NQ_CONS
DETAIL_NQ_ENTRY: int = _lib.SMC_DETAIL_NQ_ENTRY

ST_DATA: int = _lib.SMC_ST_DATA
ST_EOF: int = _lib.SMC_ST_EOF
ST_CLOSED: int = _lib.SMC_ST_CLOSED
ST_ABORT: int = _lib.SMC_ST_ABORT
ST_SPACE: int = _lib.SMC_ST_SPACE
TAKE_OVERFLOW: int = _lib.SMC_TAKE_OVERFLOW

# v1 names of the legacy header's informational line (384..399), kept for existing callers. The
# ring no longer writes them: that line is now the slot's set-up record.
OFF_MAGIC: int = 384
OFF_CAPACITY: int = 392
MAGIC: int = 0x676E695269434D53  # "SMCiRing" little endian

__all__ = [name for name in dict(globals()) if name.isupper() and not name.startswith("_")] + [
    "region_size", "heap0", "RingError", "RingCorrupted", "GroupCorrupted", "Extent", "Setup",
    "Group", "Ring", "drain_doorbell",
]

_U64 = 1 << 64
_U32 = 1 << 32

# Bound once: attribute lookups on `lib` cost more than the calls' own Python overhead.
_new = _ffi.new
_from_buffer = _ffi.from_buffer
_release = _ffi.release
# ffi.unpack, typed per use (the same object): a uint32_t array gives a list, a char array bytes
_unpack: Callable[[U32Array, int], list[int]] = _ffi.unpack
_unpack_bytes: Callable[[CData, int], bytes] = _ffi.unpack
_NULL: Pointer = _ffi.NULL
_CHAR_ARRAY = _ffi.typeof("char[]")  # from_buffer(type, buf, True): positional args parse ~2x faster
_tx_write = _lib.smc_tx_write
_tx_writev = _lib.smc_tx_writev
_tx_space = _lib.smc_tx_space
_rx_avail = _lib.smc_rx_avail
_rx_read = _lib.smc_rx_read
_tx_reserve = _lib.smc_tx_reserve
_tx_commit = _lib.smc_tx_commit
_tx_cancel = _lib.smc_tx_cancel
_rx_peek = _lib.smc_rx_peek
_rx_consume = _lib.smc_rx_consume
_tx_write_fd = _lib.smc_tx_write_fd
_rx_status = _lib.smc_rx_status
_rx_prepare_sleep = _lib.smc_rx_prepare_sleep
_tx_prepare_sleep = _lib.smc_tx_prepare_sleep
_clear_wants = _lib.smc_clear_wants
_set_state = _lib.smc_set_state
_set_state_quiet = _lib.smc_set_state_quiet
_rx_spin = _lib.smc_rx_spin
_tx_spin = _lib.smc_tx_spin
_doorbell = _lib.smc_doorbell
_doorbell_drain = _lib.smc_doorbell_drain
_tx_switch = _lib.smc_tx_switch
_tx_switch_pending = _lib.smc_tx_switch_pending
_group_notify = _lib.smc_group_notify
_group_take = _lib.smc_group_take
_group_pending = _lib.smc_group_pending
_group_prepare_sleep = _lib.smc_group_prepare_sleep
_group_clear_wake = _lib.smc_group_clear_wake
_group_spin = _lib.smc_group_spin
_group_spin_hot = _lib.smc_group_spin_hot

# writev joins the buffers in Python and makes one write (about 20 ns a buffer plus a memcpy)
# when the total or the average buffer is small; otherwise the C gather saves that extra copy at
# about 0.3 us of cffi overhead a buffer. Measured (docs/ring.md): 256 x 64 B join 5.6 us vs
# gather 73 us; 64 x 4 KiB 34 vs 49 us; 16 x 16 KiB 31 vs 29 us; 16 x 64 KiB 156 vs 94 us.
_JOIN_LIMIT = 64 * 1024
# read(): from this size on, fill an uninitialised bytes object in place (below it, the ctypes
# call costs more than the copy it saves).
_DIRECT_READ = 4096
_JOIN_AVG_LIMIT = 8 * 1024
_UINTPTR = _ffi.typeof("uintptr_t")


def region_size(capacity: int) -> int:
    """Bytes a legacy region needs for a ring of `capacity` bytes.

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


def heap0(max_slots: int) -> int:
    """Offset of the heap in a group's extent 0: control area plus `max_slots` slot headers.

    Extent 0 must be at least this long; ring blocks may be placed from here on.
    """
    return G_OFF_HDRS + max_slots * HEADER_SIZE


class RingError(ConnectionError):
    """Base class of the ring's errors."""


class RingCorrupted(RingError, ConnectionResetError):
    """The peer wrote an invalid cursor, flag or ring switch: abort the connection.

    The error is sticky: every later call on the same Ring raises it again.
    """


class GroupCorrupted(RingCorrupted):
    """The peer broke the link group's notification queue: abort every connection of the group.

    The error is sticky: every later queue call on the same Group raises it again.
    """


def _block_problem(ext: int, off: int, log2: int, ext_len: int) -> str:
    if not MIN_LOG2 <= log2 <= MAX_LOG2:
        return f"capacity log2 {log2} outside [{MIN_LOG2}, {MAX_LOG2}]"
    if not 0 <= ext < MAX_EXTENTS or ext_len == 0:
        return f"extent {ext} is not attached"
    cap = 1 << log2
    if off % cap:
        return f"offset {off} is not a multiple of the capacity {cap}"
    return f"offset {off} + capacity {cap} exceeds the extent's {ext_len} bytes"


def _block_message(ext: int, off: int, log2: int, ext_len: int) -> str:
    return (f"peer ring corrupted: invalid ring block (extent {ext}, offset {off}, log2 {log2}): "
            f"{_block_problem(ext, off, log2, ext_len)}")


def _corruption_message(r: RingStruct) -> str:
    detail = r.err_detail
    seen, lo, hi = r.err_seen, r.err_lo, r.err_hi
    if detail == DETAIL_PROD_RANGE:
        if r.rx_sw_pending:
            in_old = (r.rx_sw_pos - r.rx_cons) % _U64
            return (f"peer ring corrupted: peer prod {seen} outside [{lo}, {hi}] (it may neither go "
                    f"below the last prod seen nor run more than the old ring's {in_old} bytes up "
                    f"to the switch at {r.rx_sw_pos} plus the next ring's capacity {r.rx_sw_cap} "
                    f"ahead of our consumer cursor {r.rx_cons})")
        return (f"peer ring corrupted: peer prod {seen} outside [{lo}, {hi}] (it may neither go "
                f"below the last prod seen nor run more than the capacity {r.rx_cap} ahead of our "
                f"consumer cursor {r.rx_cons})")
    if detail == DETAIL_CONS_RANGE:
        return (f"peer ring corrupted: peer cons_peer (its consumer cursor of our ring) {seen} "
                f"outside [{lo}, {hi}] (it may neither go backwards nor pass our prod {hi})")
    if detail == DETAIL_EOF_POS:
        return f"peer ring corrupted: peer eof_pos {seen} differs from its prod {lo} read after EOF"
    if detail == DETAIL_PROD_AFTER_EOF:
        return f"peer ring corrupted: peer prod {seen} moved after EOF at eof_pos {lo}"
    if detail == DETAIL_SW_SEQ:
        return (f"peer ring corrupted: peer sw_seq {seen} is neither {lo} (the ring switches "
                f"completed) nor {hi} (the next one)")
    if detail == DETAIL_SW_POS:
        return (f"peer ring corrupted: peer sw_pos {seen} outside [{lo}, {hi}] (a ring switch may "
                f"neither start before the last prod seen nor leave more than the capacity "
                f"{r.rx_cap} of bytes in the old ring ahead of our consumer cursor {r.rx_cons})")
    if detail == DETAIL_SW_BLOCK:
        return _block_message(lo >> 32, seen, lo & 0xFFFFFFFF, hi)
    return f"peer ring corrupted (error {r.error})"  # pragma: no cover


def _group_message(g: GroupStruct) -> str:
    detail = g.err_detail
    seen, lo, hi = g.err_seen, g.err_lo, g.err_hi
    if detail == DETAIL_NQ_PROD:
        return (f"peer corrupted the link group: peer nq_prod {seen} outside [{lo}, {hi}] (it may "
                f"neither go backwards nor run more than the queue's {G_NQ_ENTRIES} entries ahead "
                f"of our consumption {g.pq_cons})")
    if detail == DETAIL_NQ_CONS:
        return (f"peer corrupted the link group: peer nq_cons_peer (its consumption of our queue) "
                f"{seen} outside [{lo}, {hi}] (it may neither go backwards nor pass our nq_prod {hi})")
    if detail == DETAIL_NQ_ENTRY:
        return (f"peer corrupted the link group: queued slot index {seen} is not below max_slots "
                f"{g.max_slots}")
    return f"peer corrupted the link group (error {g.error})"  # pragma: no cover


# ------------------------------------------------------------------------------------ extents

class Extent:
    """A mapped extent (or legacy region) and the buffer export that keeps it mapped.

    Args:
        mem: the mapping: mmap, memoryview, ctypes array, bytearray... Our own extents are
            writable; the peer's are expected read-only (PROT_READ).
        writable: whether rings and groups will store into it (require a writable buffer).
    Raises:
        TypeError: `writable` is true but `mem` is read-only.

    While the export lives, `mem` cannot be closed (mmap.close raises BufferError). Groups and
    rings keep references to the Extents they use; release() ends the export explicitly.
    """

    __slots__ = ("_buf", "_mem", "size", "writable")

    _buf: CData               # None once released
    _mem: Buffer | None
    size: int
    writable: bool

    def __init__(self, mem: Buffer, writable: bool) -> None:
        try:
            self._buf = _from_buffer("uint8_t[]", mem, require_writable=writable)
        except BufferError:
            raise TypeError("a writable extent needs a writable buffer (our own mapping)") from None
        self._mem = mem
        self.size = len(self._buf)
        self.writable = bool(writable)

    @property
    def released(self) -> bool:
        """True after release()."""
        return self._buf is None

    def release(self) -> None:
        """Drop the buffer export, so the mapping can be closed. Idempotent.

        The caller guarantees that no Ring or Group uses the extent any more.
        """
        if self._buf is not None:
            _release(self._buf)
        self._buf = self._mem = None

    def _ptr(self, off: int = 0) -> CData:
        if self._buf is None:
            raise ValueError("extent was released")
        return self._buf + off

    def __repr__(self) -> str:
        state = "released" if self._buf is None else ("rw" if self.writable else "ro")
        return f"<Extent {self.size} B {state}>"


def _check_tx_block(extent: Extent, off: int, capacity: int) -> None:
    if not isinstance(extent, Extent):
        raise TypeError(f"a ring block lives in an Extent, not {type(extent).__name__}")
    if extent.released or not extent.writable:
        raise ValueError("our ring block needs a writable, unreleased Extent")
    region_size(capacity)
    if off < 0 or off % capacity or off + capacity > extent.size:
        raise ValueError(f"ring block at offset {off} with capacity {capacity} must be aligned to "
                         f"its capacity and inside the extent's {extent.size} bytes")


def _pinned_block(mem: Buffer | None, block: CData, capacity: int, writable: bool) -> memoryview:
    """A byte memoryview of the ring block at C pointer `block` (`capacity` bytes) inside `mem`.

    The view holds its own buffer export of `mem` (a fresh from_buffer, not the Ring's or the
    Extent's, which close()/release() end), so the mapping cannot be closed (mmap.close raises
    BufferError; the device keeps it as a zombie) while this view or any slice of it lives: a
    view handed to the application can never point into unmapped memory. Read-only unless
    `writable`, whatever `mem` allows (a ctypes view of a PROT_READ mapping claims to be writable).
    """
    if mem is None:
        raise ValueError("the ring's memory was released")
    whole = _from_buffer("uint8_t[]", mem, writable)
    base = int(_ffi.cast(_UINTPTR, block)) - int(_ffi.cast(_UINTPTR, whole))
    if not 0 <= base <= len(whole) - capacity:  # pragma: no cover - C validated the block
        raise ValueError(f"ring block at {base} (+{capacity}) outside its mapping of {len(whole)} bytes")
    view = memoryview(_ffi.buffer(whole))[base:base + capacity]
    return view if writable else view.toreadonly()


# ---------------------------------------------------------------------------- set-up records

class Setup(NamedTuple):
    """A slot's set-up record (header line 3), as published or as a snapshot of the peer's.

    A snapshot is not validated: check gen and phase first, then every field you use.
    """

    gen: int
    phase: int
    reason: int = 0
    family: int = 0
    ring0_off: int = 0
    ring0_ext: int = 0
    ring0_log2: int = 0
    sock_ino: int = 0
    cport: int = 0
    sport: int = 0
    caddr: bytes = bytes(16)
    saddr: bytes = bytes(16)


# ------------------------------------------------------------------------------------- groups

class Group:
    """One side's view of a link group: our extent 0 (written), the peer's extents (read).

    Args:
        my_ext0: our extent 0 (writable Extent), at least heap0(max_slots) bytes.
        peer_ext0: the peer's extent 0 (read-only Extent is enough and expected), same minimum.
        peer_doorbell_fd: the peer's extent-0 doorbell (eventfd) to ring when its hub sleeps,
            or -1.
        role: ROLE_CLIENT or ROLE_SERVER (written into our extent 0, informational).
        max_slots: the group's slot count, a power of two in [MIN_SLOTS, MAX_SLOTS].
    Raises:
        ValueError: bad sizes, alignment, role, slot count or fd; overlapping extents.

    Queue cursors resume from our own extent 0 (zero for a fresh one). Not thread-safe: use a
    Group from one thread (the hub's loop thread). close() does not release the Extents.
    """

    __slots__ = ("__weakref__", "_claim_buf", "_flags", "_g", "_hot_buf", "_my_ext0", "_peer_exts",
                 "_ready_buf", "_rings", "_scratch", "_setup", "_take_buf", "max_slots")

    _g: GroupStruct
    _my_ext0: Extent
    _peer_exts: dict[int, Extent]
    _rings: weakref.WeakSet[Ring]
    _take_buf: U32Array
    _flags: U32Array
    _hot_buf: CData           # struct smc_ring *[HOT_MAX]
    _ready_buf: U32Array
    _claim_buf: U32Array
    _setup: SetupStruct
    _scratch: CData           # char[_DIRECT_READ]
    max_slots: int

    def __init__(self, my_ext0: Extent, peer_ext0: Extent, peer_doorbell_fd: int, role: int,
                 max_slots: int) -> None:
        self._g = _new("struct smc_group *")
        # small reads of the group's rings land here, then one copy into a bytes object (the
        # group is used from its hub's loop thread only, so one buffer serves all its rings)
        self._scratch = _new("char[]", _DIRECT_READ)
        for ext in (my_ext0, peer_ext0):
            if not isinstance(ext, Extent) or ext.released:
                raise ValueError("a group needs two unreleased Extents (ours and the peer's extent 0)")
        if not my_ext0.writable:
            raise ValueError("our extent 0 must be a writable Extent")
        rc = _lib.smc_group_init(self._g, my_ext0._ptr(), my_ext0.size, peer_ext0._ptr(),
                                 peer_ext0.size, peer_doorbell_fd, role, max_slots)
        if rc < 0:
            raise ValueError(
                f"cannot set up link group: max_slots must be a power of two in [{MIN_SLOTS}, "
                f"{MAX_SLOTS}] (got {max_slots}), both extent 0s >= heap0(max_slots) bytes (got "
                f"{my_ext0.size} and {peer_ext0.size}), 8-byte aligned and not overlapping, role "
                f"ROLE_CLIENT or ROLE_SERVER (got {role}), peer_doorbell_fd >= -1 (got "
                f"{peer_doorbell_fd})")
        self._my_ext0 = my_ext0
        self._peer_exts = {0: peer_ext0}
        self._rings = weakref.WeakSet()
        self._take_buf = _new("uint32_t[]", 4096)
        self._flags = _new("uint32_t *")
        self._hot_buf = _new("struct smc_ring *[]", HOT_MAX)
        self._ready_buf = _new("uint32_t[]", HOT_MAX)
        self._claim_buf = _new("uint32_t[]", G_CLAIM_PROBE)
        self._setup = _new("struct smc_setup *")
        self.max_slots = max_slots

    # ------------------------------------------------------------------ errors

    def _slot(self, slot: int) -> int:
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} outside [0, {self.max_slots})")
        return slot

    def _raise(self, rc: int) -> NoReturn:
        if rc == ECLOSED:
            raise ValueError("link group is closed")
        if rc == EGROUP:
            raise GroupCorrupted(_group_message(self._g))
        if rc == EINVAL:
            raise ValueError("invalid argument to the link group (slot out of range?)")
        raise ValueError(f"link group call failed ({rc})")  # pragma: no cover

    @property
    def error(self) -> str | None:
        """None while the group is fine, else what went wrong (sticky)."""
        rc = self._g.error
        if rc == 0:
            return None
        if rc == ECLOSED:
            return "link group is closed"
        return _group_message(self._g)

    @property
    def closed(self) -> bool:
        """True after close()."""
        return self._g.my_ext0 == _NULL

    # ------------------------------------------------------------------ extents

    def add_peer_extent(self, index: int, ext: Extent) -> None:
        """Attach the peer's extent `index` (1..MAX_EXTENTS-1), where its ring blocks may lie.

        Raises:
            ValueError: bad index, index already attached, released Extent, overlap with our
                extent 0, or the group is closed.
        """
        if not isinstance(ext, Extent) or ext.released:
            raise ValueError("add_peer_extent needs an unreleased Extent")
        if not 0 < index < MAX_EXTENTS:
            raise ValueError(f"peer extent index {index} outside [1, {MAX_EXTENTS - 1}]")
        rc = _lib.smc_group_add_peer_extent(self._g, index, ext._ptr(), ext.size)
        if rc < 0:
            if rc == EINVAL:
                raise ValueError(f"cannot attach peer extent {index}: already attached (remove it "
                                 f"first), empty, or overlapping our extent 0")
            self._raise(rc)
        self._peer_exts[index] = ext

    def remove_peer_extent(self, index: int) -> None:
        """Forget the peer's extent `index` (the Extent itself is not released).

        Raises:
            ValueError: not attached, index 0, the group is closed, or a live ring of this group
                still reads a block in it (see Ring.rx_extents).
        """
        if not 0 < index < MAX_EXTENTS:
            raise ValueError(f"peer extent index {index} outside [1, {MAX_EXTENTS - 1}]")
        for ring in list(self._rings):
            if not ring.closed and index in ring.rx_extents:
                raise ValueError(f"peer extent {index} is still read by the ring of slot {ring.slot}")
        rc = _lib.smc_group_remove_peer_extent(self._g, index)
        if rc < 0:
            if rc == EINVAL:
                raise ValueError(f"peer extent {index} is not attached")
            self._raise(rc)
        del self._peer_exts[index]

    # ------------------------------------------------------------------ notification queue

    def notify(self, slot: int) -> None:
        """Queue `slot` for the peer's hub (or count an overflow) and ring it if it sleeps.

        Raises:
            GroupCorrupted: the peer's nq_cons_peer is invalid (sticky).
            ValueError: slot out of range or the group is closed.
        """
        try:
            rc = _group_notify(self._g, slot)
        except OverflowError:
            rc = EINVAL
        if rc < 0:
            self._raise(rc)

    def take(self, max_entries: int = 4096) -> tuple[list[int], bool]:
        """Take up to `max_entries` slot indices the peer queued for us.

        Returns:
            (slot indices in queue order, overflow): overflow True means the peer's queue was
            full at some point since the last take: rescan every connection of the group.
            Indices are < max_slots; one may name no live connection (a stale notification).
        Raises:
            GroupCorrupted: the peer's nq_prod or an entry is invalid (sticky).
        """
        buf = self._take_buf
        if max_entries > 4096:
            if max_entries > len(buf):
                buf = self._take_buf = _new("uint32_t[]", max_entries)
        elif max_entries < 0:
            raise ValueError("max_entries must be >= 0")
        flags = self._flags
        n = _group_take(self._g, buf, max_entries, flags)
        if n > 0:
            return _unpack(buf, n), flags[0] != 0
        if n < 0:
            self._raise(n)
        return [], flags[0] != 0

    def poll(self, budget_us: float) -> tuple[list[int], bool] | None:
        """``spin(budget_us)`` then ``take()`` in one call (the hub's per-message path).

        Returns:
            None when nothing came within the budget (0: look once), else ``take()``'s result.
        Raises:
            GroupCorrupted: as spin() and take().
        """
        g = self._g
        rc = _group_spin(g, int(budget_us * 1000.0))
        if rc <= 0:
            if rc < 0:
                self._raise(rc)
            return None
        buf, flags = self._take_buf, self._flags
        n = _group_take(g, buf, 4096, flags)
        if n > 0:
            return _unpack(buf, n), flags[0] != 0
        if n < 0:
            self._raise(n)
        return [], flags[0] != 0

    def poll_hot(self, budget_us: float,
                 rings: Sequence[Ring]) -> int | tuple[list[int], tuple[list[int], bool] | None] | None:
        """``poll()`` that also watches ``rings`` directly (slot rings of this group, at most
        HOT_MAX, whose reader drained them without re-arming want_data).

        Returns:
            None: nothing within the budget (arm every hot ring before sleeping); an int i:
            only ``rings[i]`` has news (the common case, without allocations); else
            ``(indices, taken)``: the indices (ascending) of the rings with news (data, EOF,
            CLOSED, ABORT, or a sticky error their own calls will raise), and ``take()``'s
            result if the peer's queue had entries (else None).
        Raises:
            GroupCorrupted: as spin() and take(). ValueError: too many rings, or one not of this
            group.
        """
        g = self._g
        n = len(rings)
        if n > HOT_MAX:
            raise ValueError(f"at most {HOT_MAX} hot rings")
        arr = self._hot_buf
        for i in range(n):
            arr[i] = rings[i]._r
        rc = _group_spin_hot(g, arr, n, int(budget_us * 1000.0), self._ready_buf)
        if rc <= 0:
            if rc < 0:
                if rc == EINVAL:
                    raise ValueError("a hot ring is not a slot ring of this group")
                self._raise(rc)
            return None
        if rc == 2:                              # the common case: one ring, no queue entry
            return self._ready_buf[0]
        found = rc >> 1
        indices = _unpack(self._ready_buf, found) if found else []
        if not rc & 1:
            return indices, None
        buf, flags = self._take_buf, self._flags
        n = _group_take(g, buf, 4096, flags)
        if n > 0:
            return indices, (_unpack(buf, n), flags[0] != 0)
        if n < 0:
            self._raise(n)
        return indices, ([], flags[0] != 0)

    def pending(self) -> bool:
        """Is there anything to take (new entries or a new overflow)?"""
        rc = _group_pending(self._g)
        if rc < 0:
            self._raise(rc)
        return bool(rc)

    def prepare_sleep(self) -> bool:
        """Announce that our hub is about to sleep on its doorbell (new want_wake epoch), re-check.

        Returns:
            True: something is pending, do not sleep (want_wake cleared). False: sleep now (the
            epoch stays set; call clear_wake() after waking).
        """
        rc = _group_prepare_sleep(self._g)
        if rc < 0:
            self._raise(rc)
        return bool(rc)

    def clear_wake(self) -> None:
        """Clear our want_wake (after waking up)."""
        _group_clear_wake(self._g)

    def spin(self, budget_us: float) -> bool:
        """Busy-poll (without the GIL) up to `budget_us` microseconds for a pending entry."""
        rc = _group_spin(self._g, int(budget_us * 1000.0))
        if rc < 0:
            self._raise(rc)
        return bool(rc)

    # ------------------------------------------------------------------ group state

    def set_closing(self) -> None:
        """Publish CLOSING in our gstate and ring the peer's doorbell (works after GroupCorrupted)."""
        rc = _lib.smc_group_set_gstate(self._g, GSTATE_CLOSING)
        if rc < 0:
            self._raise(rc)

    @property
    def peer_closing(self) -> bool:
        """The peer published CLOSING."""
        return bool(_lib.smc_group_peer_gstate(self._g) & GSTATE_CLOSING)

    def set_listeners(self, inodes: Iterable[int]) -> None:
        """Publish our hub's listener socket inodes (server role; at most G_MAX_LISTENERS)."""
        values = list(inodes)
        if len(values) > G_MAX_LISTENERS:
            raise ValueError(f"at most {G_MAX_LISTENERS} listeners per group (got {len(values)})")
        rc = _lib.smc_group_set_listeners(self._g, _new("uint64_t[]", values) if values else _NULL,
                                          len(values))
        if rc < 0:
            self._raise(rc)

    def peer_has_listener(self, inode: int) -> bool:
        """Does the peer's listener table name `inode`? A hint only (inode 0 never matches)."""
        rc = _lib.smc_group_peer_has_listener(self._g, inode)
        if rc < 0:
            self._raise(rc)
        return bool(rc)

    # ------------------------------------------------------------------ claims

    def post_claim(self, port: int, slot: int) -> bool:
        """Insert (port, slot) into our claim table. False when its probe window is full."""
        if not 0 <= port < _U32:
            raise ValueError(f"port {port} does not fit 32 bits")
        rc = _lib.smc_group_post_claim(self._g, port, self._slot(slot))
        if rc == EFULL:
            return False
        if rc < 0:
            self._raise(rc)
        return True

    def clear_claim(self, port: int, slot: int) -> None:
        """Remove (port, slot) from our claim table (no-op if absent)."""
        if 0 <= port < _U32 and 0 <= slot < _U32:
            _lib.smc_group_clear_claim(self._g, port, slot)

    def find_claims(self, port: int) -> list[int]:
        """Slots the peer claims for `port` (each < max_slots; a hint to check against the record)."""
        if not 0 <= port < _U32:
            return []
        n = _lib.smc_group_find_claims(self._g, port, self._claim_buf, G_CLAIM_PROBE)
        if n < 0:
            self._raise(n)
        return _unpack(self._claim_buf, n)

    # ------------------------------------------------------------------ set-up records

    def publish_setup(self, slot: int, setup: Setup) -> None:
        """Store our set-up record of `slot` (fields first, then gen/phase with release).

        No notification: call notify(slot) afterwards.
        """
        for name in ("caddr", "saddr"):
            if len(getattr(setup, name)) != 16:
                raise ValueError(f"Setup.{name} must be 16 bytes (IPv4 in the first 4)")
        s = self._setup
        s.gen, s.phase, s.reason, s.family = setup.gen, setup.phase, setup.reason, setup.family
        s.ring0_off, s.ring0_ext, s.ring0_log2 = setup.ring0_off, setup.ring0_ext, setup.ring0_log2
        s.sock_ino, s.cport, s.sport = setup.sock_ino, setup.cport, setup.sport
        _ffi.memmove(s.caddr, bytes(setup.caddr), 16)
        _ffi.memmove(s.saddr, bytes(setup.saddr), 16)
        rc = _lib.smc_setup_publish(self._g, self._slot(slot), s)
        if rc < 0:
            self._raise(rc)

    def set_phase(self, slot: int, gen: int, phase: int, reason: int = 0) -> None:
        """Store reason, then gen/phase (release) of our record of `slot`. No notification."""
        rc = _lib.smc_setup_set_phase(self._g, self._slot(slot), gen, phase, reason)
        if rc < 0:
            self._raise(rc)

    def read_peer_setup(self, slot: int) -> Setup:
        """A snapshot of the peer's set-up record of `slot` (acquire on gen/phase, not validated)."""
        s = self._setup
        rc = _lib.smc_setup_read_peer(self._g, self._slot(slot), s)
        if rc < 0:
            self._raise(rc)
        return Setup(s.gen, s.phase, s.reason, s.family, s.ring0_off, s.ring0_ext, s.ring0_log2,
                     s.sock_ino, s.cport, s.sport, bytes(_ffi.buffer(s.caddr)),
                     bytes(_ffi.buffer(s.saddr)))

    def reset_slot(self, slot: int) -> None:
        """Zero header lines 0-2 of our side of `slot` (cursors, switch, state) for a new connection."""
        rc = _lib.smc_slot_reset(self._g, self._slot(slot))
        if rc < 0:
            self._raise(rc)

    def release_slot(self, slot: int, gen: int) -> None:
        """Publish that we finished connection `gen` in `slot` (released = gen, release)."""
        rc = _lib.smc_slot_release(self._g, self._slot(slot), gen)
        if rc < 0:
            self._raise(rc)

    def peer_released(self, slot: int) -> int:
        """The gen the peer last finished in `slot` (0 if never used)."""
        rc = _lib.smc_slot_peer_released(self._g, self._slot(slot))
        if rc < 0:
            self._raise(rc)
        return rc

    # ------------------------------------------------------------------ stats

    @property
    def doorbells(self) -> int:
        """Doorbells rung toward the peer's hub (eventfd writes done)."""
        return self._g.stat_doorbells

    @property
    def doorbell_errors(self) -> int:
        """Doorbell writes that failed other than with EAGAIN."""
        return self._g.stat_doorbell_errors

    @property
    def queued(self) -> int:
        """Entries put into our queue."""
        return self._g.stat_queued

    @property
    def taken(self) -> int:
        """Entries taken from the peer's queue."""
        return self._g.stat_taken

    @property
    def overflows(self) -> int:
        """Notifications that found our queue full (counted in nq_overflow instead)."""
        return self._g.stat_overflows

    @property
    def spin_hits(self) -> int:
        """spin() calls that found something."""
        return self._g.stat_spin_hits

    @property
    def spin_misses(self) -> int:
        """spin() calls that ran out of budget."""
        return self._g.stat_spin_misses

    @property
    def spin_colocated(self) -> int:
        """Times a spin found the peer's hub on our CPU (and yielded it the CPU)."""
        return self._g.stat_spin_colocated

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop using the extents (every later call raises ValueError). Idempotent.

        Close the group's rings first. The Extents are not released (the group keeps referring
        to them, so rings still alive keep their mappings).
        """
        _lib.smc_group_close(self._g)

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"queued={self.queued} taken={self.taken}"
        return f"<Group max_slots={self.max_slots} {state}>"


# -------------------------------------------------------------------------------------- rings

class Ring:
    """Both directions of one connection: our ring (we write) and the peer's (we read).

    Legacy constructor (one region per side):

    Args:
        my_mem: writable buffer (mmap, memoryview) of our region, >= region_size(tx_capacity).
        peer_mem: buffer of the peer's region, read-only is enough and expected,
            >= region_size(rx_capacity). The ring never stores into it.
        tx_capacity: capacity of our ring (from our own allocation).
        rx_capacity: capacity of the peer's ring (from the validated handshake).
        peer_doorbell_fd: eventfd to write to wake the peer, or -1.
    Raises:
        ValueError: bad capacities, too short or misaligned buffers, overlapping regions.

    Slot rings come from Ring.in_slot(). The Ring keeps references to its buffers (and buffer
    exports on them) until close(). Cursors resume from our own header (zero for a fresh one).
    Not thread-safe: use one Ring from one thread at a time (the event loop's), and never
    close() it while another thread is inside a call (the calls run without the GIL).
    """

    __slots__ = ("__weakref__", "_group", "_my", "_my_mem", "_peer", "_peer_mem", "_r", "_resv", "_rx_key",
                 "_rx_view", "_tx_ext", "_tx_prev", "_tx_view", "_zc_out")

    _r: RingStruct
    _my: CData                # legacy: buffer exports of the two regions (None: slot ring, closed)
    _peer: CData
    _my_mem: Buffer | None
    _peer_mem: Buffer | None
    _group: Group | None      # slot rings only, until close()
    _tx_ext: Extent | None    # slot: the Extent of our current block
    _tx_prev: Extent | None   # slot: the Extent of the block before a pending switch
    _zc_out: U64Array
    _tx_view: memoryview | None
    _rx_view: memoryview | None
    _rx_key: int
    _resv: memoryview | None

    def __init__(self, my_mem: Buffer, peer_mem: Buffer, tx_capacity: int, rx_capacity: int,
                 peer_doorbell_fd: int = -1) -> None:
        self._r = _new("struct smc_ring *")
        self._my = self._peer = None
        self._group = self._tx_ext = self._tx_prev = None
        self._zc_init()
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

    @classmethod
    def in_slot(cls, group: Group, slot: int, tx_extent: Extent, tx_off: int, tx_capacity: int,
                rx_ext: int, rx_off: int, rx_log2: int | None) -> Ring:
        """A ring over slot `slot` of `group`: our tx block, and the peer's rx block.

        Args:
            group: the link group (must stay open while the ring is used).
            slot: slot index, < group.max_slots.
            tx_extent, tx_off, tx_capacity: our ring block (a writable Extent of ours, offset
                a multiple of the capacity, a power of two in [MIN_CAPACITY, MAX_CAPACITY]).
            rx_ext, rx_off, rx_log2: the peer's ring block as it announced it (extent index,
                offset, capacity log2); validated against the group's peer extents.
                rx_log2 None: not known yet: a send-only ring (nothing to read, the peer's
                header not looked at) until attach_rx() (the optimistic client). A peer's
                log2 of 0 is an invalid block like any other.
        Raises:
            RingCorrupted: the peer's block is invalid (bad log2, extent not attached,
                misaligned, out of bounds).
            ValueError: bad local arguments (slot, our block) or the group is closed.

        Notifications go through the group's queue; doorbells counts them.
        """
        if not isinstance(group, Group):
            raise TypeError(f"in_slot needs a Group, not {type(group).__name__}")
        if group.closed:
            raise ValueError("link group is closed")
        if not 0 <= slot < group.max_slots:
            raise ValueError(f"slot {slot} outside [0, {group.max_slots})")
        _check_tx_block(tx_extent, tx_off, tx_capacity)
        if rx_log2 is None:
            rx_ext = rx_off = rx_log2 = 0            # the C layer's "send-only"
        elif not (0 <= rx_ext < _U32 and 0 <= rx_off < _U64 and 0 < rx_log2 < _U32):
            raise RingCorrupted(_block_message(rx_ext, rx_off, rx_log2, 0))
        self = cls.__new__(cls)
        self._r = _new("struct smc_ring *")
        self._my = self._peer = self._my_mem = self._peer_mem = None
        self._group = group
        self._tx_ext = tx_extent
        self._tx_prev = None
        self._zc_init()
        rc = _lib.smc_ring_init_slot(self._r, group._g, slot, tx_extent._ptr(tx_off), tx_capacity,
                                     rx_ext, rx_off, rx_log2)
        if rc < 0:
            self._group = self._tx_ext = None
            if rc == ESWITCH:
                raise RingCorrupted(_corruption_message(self._r))
            raise ValueError(f"cannot set up slot ring {slot}: our block overlaps our slot header "
                             f"or the group is closed")
        group._rings.add(self)
        return self

    # ------------------------------------------------------------------ errors

    def _raise(self, rc: int) -> NoReturn:
        if rc == EINVAL:
            if self._r.my_state:
                raise ValueError("cannot write: EOF, close or abort was already published")
            if self._r.tx_resv:
                raise ValueError(f"a reservation of {self._r.tx_resv} bytes is outstanding: "
                                 f"commit() or cancel_reservation() it first")
            raise ValueError("invalid argument to the ring")
        if rc == ECLOSED:
            raise ValueError("ring is closed")
        raise RingCorrupted(_corruption_message(self._r))

    # ------------------------------------------------------------------ sending

    def write(self, data: Buffer) -> int:
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

    def writev(self, buffers: Iterable[Buffer]) -> int:
        """Gather-write a sequence of buffers with one publish and one notification check.

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

    def read_into(self, buf: Buffer) -> int:
        """Copy up to len(buf) readable bytes into `buf` (one copy) and publish the consumption.

        Args:
            buf: writable contiguous buffer (bytearray, memoryview, mmap, array).
        Returns:
            Bytes copied, 0 when nothing is readable.
        Raises:
            RingCorrupted: the peer's prod, eof_pos or ring switch is invalid.
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
            err = self._r.error
            if err:
                self._raise(err)          # sticky: even an empty read says so
            return b""
        if n >= _DIRECT_READ:
            # One copy, ring -> a fresh bytes object (no zero-fill, no second copy).
            out = _new_bytes(n)
            got = _rx_read(self._r, _from_buffer(_CHAR_ARRAY, out, False), n)
            if got < 0:
                self._raise(got)
            return out if got == n else out[:got]
        group = self._group
        if group is not None:                 # (n < _DIRECT_READ here)
            scratch = group._scratch
            got = _rx_read(self._r, scratch, n)
            if got < 0:
                self._raise(got)
            return _unpack_bytes(scratch, got)
        arr = bytearray(n)
        got = _rx_read(self._r, _from_buffer(arr), n)
        if got < 0:
            self._raise(got)
        if got != n:
            del arr[got:]
        return bytes(arr)

    # ------------------------------------------------------------------ zero copy

    def _zc_init(self) -> None:
        self._zc_out = _new("uint64_t[1]")
        self._tx_view = self._rx_view = self._resv = None
        self._rx_key = -1

    def _drop_view(self, name: str) -> None:
        """Release the memoryview in slot `name` (so it no longer pins its mapping), if any.

        Slices the application still holds keep the mapping exported on their own.
        """
        view = getattr(self, name)
        if view is not None:
            setattr(self, name, None)
            try:
                view.release()
            except BufferError:  # exported by the application (e.g. numpy): it stays usable
                pass

    def _tx_block(self) -> memoryview:
        r = self._r
        ext = self._tx_ext                    # set exactly when _group is (slot rings)
        mem = self._my_mem if ext is None else ext._mem
        view = self._tx_view = _pinned_block(mem, r.tx_base, r.tx_cap, True)
        return view

    def _rx_block(self, key: int) -> memoryview:
        # Keyed by rx_switches: the block changes only when a switch completes (a send-only
        # slot ring, whose block attach_rx replaces, never has a byte to peek before that).
        self._drop_view("_rx_view")
        r = self._r
        if self._group is None:
            mem = self._peer_mem
        else:
            ext = self._group._peer_exts.get(r.rx_ext)
            mem = None if ext is None else ext._mem
        view = self._rx_view = _pinned_block(mem, r.rx_base, r.rx_cap, False)
        self._rx_key = key
        return view

    def reserve(self, n: int) -> memoryview:
        """Reserve up to `n` contiguous free bytes of our ring at the write position (zero copy).

        Fill (a prefix of) the returned view, then commit() what was filled. The view is
        shorter than `n` when the free space is smaller or reaches the end of the ring block
        (the rest follows at the block's start: commit, then reserve again).

        Args:
            n: the most bytes wanted (>= 0).
        Returns:
            A writable memoryview over exactly the reserved bytes of our own ring block; empty
            (nothing reserved, nothing to commit) when the ring is full or n is 0.
        Raises:
            ValueError: n < 0; a reservation is outstanding; after set_eof/set_closed/set_abort;
                the ring is closed.
            RingCorrupted: the peer's consumer cursor is invalid.

        Until commit() or cancel_reservation(), write(), writev(), write_from_fd(), switch_tx()
        and another reserve() raise ValueError. Fill the view from the thread that commits it.
        The view pins the mapping (like any buffer export) until released; commit() and
        cancel_reservation() release it, so using it afterwards raises ValueError (slices
        taken of it stay usable: do not write through them after the commit).
        """
        if n < 0:
            raise ValueError(f"reserve({n}): n must be >= 0")
        out = self._zc_out
        got = _tx_reserve(self._r, n if n <= MAX_CAPACITY else MAX_CAPACITY, out)
        if got <= 0:
            if got < 0:
                self._raise(got)
            return memoryview(bytearray())  # a fresh one: the caller may release() it
        view = self._tx_view
        if view is None:
            view = self._tx_block()
        off = out[0]
        resv = self._resv = view[off:off + got]
        return resv

    @property
    def reservation(self) -> int:
        """Length of the outstanding reservation (0: none)."""
        return self._r.tx_resv

    def commit(self, n: int) -> None:
        """Publish the first `n` bytes of the outstanding reservation, as write() of them would.

        Same cursor update, memory ordering, tx_bytes count and wake-up decision as write();
        n == 0 publishes nothing. Either way the reservation ends (the rest of it is given
        back) and its view is released.

        Raises:
            ValueError: nothing is reserved, n < 0 or n > the reservation (the reservation stays
                as it was); EOF/close/abort was published since reserve(); the ring is closed.
            RingCorrupted: sticky error of an earlier call.
        """
        r = self._r
        rc = _tx_commit(r, n) if 0 <= n < _U64 else EINVAL
        if rc < 0:
            if rc == EINVAL and not r.my_state:
                if r.tx_resv == 0:
                    raise ValueError("commit() without a reservation (reserve() gave nothing, or it "
                                     "was committed or cancelled already)")
                raise ValueError(f"commit({n}): n must be within the reservation of {r.tx_resv} bytes")
            self._raise(rc)
        if self._resv is not None:
            self._drop_view("_resv")

    def cancel_reservation(self) -> None:
        """Give the outstanding reservation back unpublished (no-op without one); releases its view."""
        _tx_cancel(self._r)
        if self._resv is not None:
            self._drop_view("_resv")

    def peek(self, n: int = -1) -> memoryview:
        """A read-only view of up to `n` contiguous readable bytes at the read position (zero copy).

        The bytes are validated as read() validates them (the peer's prod, eof_pos and ring
        switches), and the view never extends outside the peer's current ring block: it ends at
        the first of the readable bytes, the end of the block and a pending ring switch, so it
        may be shorter than what readable() reports; consume() it and peek again for the rest.

        Args:
            n: the most bytes wanted; n < 0: as many as are contiguous.
        Returns:
            A read-only memoryview into the peer's ring block (empty when nothing is readable).
            Its bytes stay as they are until consume()d; after that the peer may overwrite
            them. The view pins the peer's mapping (the device keeps it until the view is gone).
        Raises:
            RingCorrupted: the peer's prod, eof_pos or ring switch is invalid.
            ValueError: the ring is closed.

        Every peek() replaces the previous one as the limit of consume().
        """
        got = _rx_peek(self._r, n if 0 <= n < _U64 else _U64 - 1, self._zc_out)
        if got <= 0:
            if got < 0:
                self._raise(got)
            return memoryview(b"")
        key = self._r.rx_switches
        view = self._rx_view
        if view is None or key != self._rx_key:
            view = self._rx_block(key)
        off = self._zc_out[0]
        return view[off:off + got]

    def consume(self, n: int) -> None:
        """Advance the read position by `n` bytes of the last peek() and publish the consumption.

        Same memory ordering, rx_bytes count and space notification of a waiting producer as
        read(). Several consume() calls may share one peek (n counts from the current read
        position each time).

        Raises:
            ValueError: n < 0, or n more than the bytes of the last peek() not yet consumed
                (a read() past the peek's end leaves none); the ring is closed.
            RingCorrupted: sticky error of an earlier call.
        """
        r = self._r
        rc = _rx_consume(r, n) if 0 <= n < _U64 else EINVAL
        if rc < 0:
            if rc == EINVAL:
                left = (r.rx_peek_end - r.rx_cons) % _U64
                if left > (r.rx_prod - r.rx_cons) % _U64:
                    left = 0
                raise ValueError(f"consume({n}): n must be within the {left} peeked bytes not "
                                 f"consumed yet")
            self._raise(rc)
        if self._rx_view is not None and r.rx_switches != self._rx_key:
            self._drop_view("_rx_view")  # a switch completed: stop pinning the old block's extent

    def write_from_fd(self, fd: int, offset: int, count: int) -> int:
        """Read up to `count` bytes of file `fd` at `offset` straight into our ring (pread(2),
        without the GIL, no Python copy) and publish them as write() would.

        Reads at most the free space (into up to two ring segments when it wraps), retrying
        short reads and EINTR, stopping at end of file. Only bytes that were read are
        published. A segment whose ring address is 1-31 bytes ahead of the file offset modulo
        4096 (where the kernel's copy is about 4x slower on the machines measured) is read
        through a per-thread bounce buffer placed outside that window, then copied.

        Args:
            fd: a readable file descriptor that supports pread (a regular file, a block
                device, a memfd). Its file position is not used or changed.
            offset, count: file offset and the most bytes to move (both >= 0).
        Returns:
            Bytes published: 0 when the ring is full, count is 0 or the file ends at `offset`
            (tx_space() tells the first case apart).
        Raises:
            OSError: the read failed before any byte was read (nothing published); a failure
                after some bytes publishes those and is reported by the next call.
            ValueError: negative offset/count, offset beyond the largest file offset, a
                reservation is outstanding, after set_eof/set_closed/set_abort, ring closed.
            RingCorrupted: the peer's consumer cursor is invalid.
        """
        if offset < 0 or count < 0 or offset >= 1 << 63:
            raise ValueError(f"write_from_fd: offset {offset} and count {count} must be >= 0 "
                             f"(offset < 2**63)")
        err = _new("int32_t *")
        n = _tx_write_fd(self._r, fd, offset, count if count <= MAX_CAPACITY else MAX_CAPACITY, err)
        if n < 0:
            if n == EREAD:
                raise OSError(err[0], f"write_from_fd: pread failed: {os.strerror(err[0])}")
            self._raise(n)
        return n

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
            0: nothing pending, sleep now (legacy: on our doorbell; slot: the hub's group sleep);
            the flag stays set, call clear_wants() after waking. >0: ST_* bits (at least one of
            DATA/EOF/CLOSED/ABORT); flag cleared.
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

    def _set_state(self, bits: int, quiet: bool = False) -> None:
        rc = (_set_state_quiet if quiet else _set_state)(self._r, bits)
        if rc < 0:
            self._raise(rc)

    def set_eof(self) -> None:
        """Publish EOF at the current prod (write_eof). Later writes raise ValueError."""
        self._set_state(STATE_EOF)

    def set_closed(self, quiet: bool = False) -> None:
        """Publish EOF (if not yet) and CLOSED together: we will neither write nor read again.

        ``quiet``: do not notify the peer (the caller closes the TCP connection next, whose FIN
        wakes it anyway).
        """
        self._set_state(STATE_EOF | STATE_CLOSED, quiet)

    def set_abort(self, quiet: bool = False) -> None:
        """Publish ABORT. Works even after RingCorrupted, so the peer learns about it.

        ``quiet``: as set_closed (the caller resets the TCP connection next).
        """
        self._set_state(STATE_ABORT, quiet)

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
        """Legacy: ring the peer's doorbell unconditionally (no-op without one).
        Slot: queue our slot for the peer's hub (its doorbell rings only if it sleeps)."""
        rc = _doorbell(self._r)
        if rc < 0:
            if self._group is not None:
                return  # slot mode: SMC_* codes of the group, whose own calls report its state
            raise OSError(-rc, f"ring doorbell write failed: {os.strerror(-rc)}")

    # ------------------------------------------------------------------ ring switch

    def switch_tx(self, extent: Extent, off: int, capacity: int, ext_index: int) -> bool:
        """Move our outgoing stream to a new ring block (grow or shrink) from the current prod.

        Args:
            extent: our Extent holding the block (writable); ext_index: its index in the group.
            off: the block's offset in the extent, a multiple of `capacity`.
            capacity: power of two in [MIN_CAPACITY, MAX_CAPACITY].
        Returns:
            True: switched; bytes from now on go to the new block. The old block stays in use
            until switch_pending() is False. False: not now (the consumer has not yet read a
            byte of the current block; retry later).
        Raises:
            ValueError: a legacy ring, bad arguments, or a block overlapping the current one
                while it still holds unread bytes.
            RingCorrupted: the peer's consumer cursor is invalid.
        """
        if self._group is None:
            raise ValueError("ring switches need a slot ring (Ring.in_slot)")
        if self._r.tx_resv:
            raise ValueError("cannot switch rings while a reservation is outstanding")
        _check_tx_block(extent, off, capacity)
        if not 0 <= ext_index < MAX_EXTENTS:
            raise ValueError(f"extent index {ext_index} outside [0, {MAX_EXTENTS})")
        rc = _tx_switch(self._r, extent._ptr(off), capacity, ext_index, off)
        if rc == 0:
            self._tx_prev = self._tx_ext if self._r.tx_switch_pending else None
            self._tx_ext = extent
            self._drop_view("_tx_view")  # it pins the old block's extent
            return True
        if rc == EBUSY:
            return False
        if rc == EINVAL:
            raise ValueError("ring switch refused: the new block overlaps the current one, which "
                             "still holds unread bytes, or our slot header")
        self._raise(rc)

    def switch_pending(self) -> bool:
        """True while the consumer may still read the block before the last switch.

        Re-reads the peer's consumer cursor; once False, that block may be freed.
        """
        rc = _tx_switch_pending(self._r)
        if rc < 0:
            self._raise(rc)
        if rc == 0:
            self._tx_prev = None
        return bool(rc)

    @property
    def tx_capacity(self) -> int:
        """Capacity of our current ring block."""
        return self._r.tx_cap

    @property
    def rx_capacity(self) -> int:
        """Capacity of the peer's current ring block (as far as we have read)."""
        return self._r.rx_cap

    def attach_rx(self, rx_ext: int, rx_off: int, rx_log2: int) -> None:
        """Give a send-only slot ring (``in_slot(..., rx_log2=None)``) the peer's ring block.

        Raises:
            RingCorrupted: the block is invalid (as in_slot). ValueError: not a send-only ring.
        """
        if not (0 <= rx_ext < _U32 and 0 <= rx_off < _U64 and 0 < rx_log2 < _U32):
            raise RingCorrupted(_block_message(rx_ext, rx_off, rx_log2, 0))
        rc = _lib.smc_ring_attach_rx(self._r, rx_ext, rx_off, rx_log2)
        if rc < 0:
            if rc == EINVAL:
                raise ValueError("attach_rx() needs a send-only slot ring, once")
            self._raise(rc)

    @property
    def rx_attached(self) -> bool:
        """False for a send-only slot ring (no peer block yet)."""
        return bool(_lib.smc_ring_rx_attached(self._r))

    @property
    def rx_extents(self) -> tuple[int, ...]:
        """Peer extents this ring may still read: the current block's, and a pending switch's."""
        r = self._r
        if self._group is None or r.my_hdr == _NULL or not _lib.smc_ring_rx_attached(r):
            return ()
        if r.rx_sw_pending and r.rx_sw_ext != r.rx_ext:
            return (r.rx_ext, r.rx_sw_ext)
        return (r.rx_ext,)

    @property
    def tx_switches(self) -> int:
        """Ring switches we published."""
        return self._r.tx_switches

    @property
    def rx_switches(self) -> int:
        """Peer ring switches we completed."""
        return self._r.rx_switches

    @property
    def slot(self) -> int | None:
        """Slot index (None for a legacy ring)."""
        return None if self._group is None else self._r.slot

    # ------------------------------------------------------------------ stats

    @property
    def doorbells(self) -> int:
        """Legacy: doorbells rung (eventfd writes done). Slot: notifications queued."""
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
        return self._r.my_hdr == _NULL

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Stop using the memory and release our references, so the caller can unmap it.

        Idempotent. Later calls raise ValueError; the stats stay readable. A slot ring releases
        its references to the group and its tx Extents (never closes or releases them).
        """
        _lib.smc_ring_close(self._r)
        for view in (self._my, self._peer):
            if view is not None:
                _release(view)
        for name in ("_resv", "_tx_view", "_rx_view"):
            self._drop_view(name)
        self._my = self._peer = self._my_mem = self._peer_mem = None
        self._group = self._tx_ext = self._tx_prev = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        r = self._r
        state = "closed" if self.closed else f"tx_prod={r.tx_prod} rx_cons={r.rx_cons}"
        where = "" if self._group is None else f" slot={r.slot}"
        return f"<Ring{where} tx_cap={r.tx_cap} rx_cap={r.rx_cap} {state}>"


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
