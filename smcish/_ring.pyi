"""Type stub of the compiled cffi extension ``smcish._ring`` (built from smcish/_cffi/ring.h).

The extension only has ``ffi`` and ``lib``. ``lib`` is typed here as ``Lib``: every ``SMC_*``
define of ring.h's cdef section and every C function, with Python-level argument and return
types (cffi converts C integers to ``int``; ``void`` returns ``None``). Pointers, arrays and
buffers are ``CData`` (``Any``): cffi checks those at run time.

Type-only names (not in the compiled module, so import them under ``if TYPE_CHECKING:``):
``CData``, ``Pointer``, ``Lib``, ``RingStruct``, ``GroupStruct``, ``SetupStruct``, ``U32Array``, ``U64Array``.
The struct classes type the fields ring.py reads of a ``struct smc_* *`` (from ``ffi.new``);
keep them, and the functions, in step with ring.h.
"""

from typing import Any, TypeAlias

CData: TypeAlias = Any
"""A cffi pointer, array or buffer (``ffi.new``/``ffi.from_buffer``), or ``ffi.NULL``."""

ffi: Any

class Pointer:
    """A pointer field of a struct (``T *``): compared with ``ffi.NULL``, passed back to C."""

    def __eq__(self, other: object, /) -> bool: ...
    def __ne__(self, other: object, /) -> bool: ...
    def __bool__(self) -> bool: ...

class U32Array:
    """``uint32_t[]`` or ``uint32_t *`` from ``ffi.new``."""

    def __getitem__(self, index: int, /) -> int: ...
    def __setitem__(self, index: int, value: int, /) -> None: ...
    def __len__(self) -> int: ...

class U64Array:
    """``uint64_t[]`` or ``uint64_t *`` from ``ffi.new``."""

    def __getitem__(self, index: int, /) -> int: ...
    def __setitem__(self, index: int, value: int, /) -> None: ...
    def __len__(self) -> int: ...

class GroupStruct:
    """``struct smc_group *``."""

    my_ext0: Pointer
    peer_ext: CData
    peer_ext_len: CData
    max_slots: int
    peer_doorbell_fd: int
    nq_prod: int
    nq_peer_cons: int
    nq_overflow: int
    pq_cons: int
    pq_prod: int
    pq_overflow_seen: int
    my_wake_epoch: int
    rung_wake_epoch: int
    error: int
    err_detail: int
    err_seen: int
    err_lo: int
    err_hi: int
    doorbell_errno: int
    stat_doorbells: int
    stat_doorbell_errors: int
    stat_queued: int
    stat_taken: int
    stat_overflows: int
    stat_spin_hits: int
    stat_spin_misses: int
    stat_spin_colocated: int

class RingStruct:
    """``struct smc_ring *``."""

    my_hdr: Pointer
    peer_hdr: Pointer
    group: Pointer
    slot: int
    tx_base: Pointer
    tx_cap: int
    tx_mask: int
    tx_start: int
    tx_switches: int
    tx_switch_pending: int
    rx_base: Pointer
    rx_cap: int
    rx_mask: int
    rx_switches: int
    rx_sw_pending: int
    rx_sw_pos: int
    rx_sw_base: Pointer
    rx_sw_cap: int
    rx_sw_ext: int
    rx_ext: int
    tx_prod: int
    tx_cons: int
    rx_cons: int
    rx_prod: int
    rx_cons_at_space_ask: int
    rx_eof_pos: int
    space_ask_epoch: int
    my_epoch: int
    rung_data_epoch: int
    rung_space_epoch: int
    my_state: int
    peer_state: int
    rx_eof_seen: int
    peer_doorbell_fd: int
    error: int
    doorbell_errno: int
    err_detail: int
    err_seen: int
    err_lo: int
    err_hi: int
    stat_doorbells: int
    stat_doorbell_errors: int
    stat_tx_bytes: int
    stat_rx_bytes: int
    stat_spin_hits: int
    stat_spin_misses: int
    stat_tx_spin_hits: int
    stat_tx_spin_misses: int
    tx_resv: int
    rx_peek_end: int
    stat_tx_fd_bounced: int

class SetupStruct:
    """``struct smc_setup *``."""

    gen: int
    phase: int
    reason: int
    family: int
    ring0_off: int
    ring0_ext: int
    ring0_log2: int
    sock_ino: int
    cport: int
    sport: int
    caddr: CData
    saddr: CData

class Lib:
    """The type of ``lib``: ring.h's defines and functions."""

    SMC_HEADER_SIZE: int
    SMC_MIN_CAPACITY: int
    SMC_MAX_CAPACITY: int
    SMC_MIN_LOG2: int
    SMC_MAX_LOG2: int
    SMC_OFF_PROD: int
    SMC_OFF_SW_SEQ: int
    SMC_OFF_SW_LOG2: int
    SMC_OFF_SW_POS: int
    SMC_OFF_SW_OFF: int
    SMC_OFF_SW_EXT: int
    SMC_OFF_CONS_PEER: int
    SMC_OFF_STATE: int
    SMC_OFF_WANT_DATA: int
    SMC_OFF_WANT_SPACE: int
    SMC_OFF_EOF_POS: int
    SMC_OFF_SETUP: int
    SMC_OFF_REASON: int
    SMC_OFF_FAMILY: int
    SMC_OFF_RING0_OFF: int
    SMC_OFF_RING0_EXT: int
    SMC_OFF_RING0_LOG2: int
    SMC_OFF_SOCK_INO: int
    SMC_OFF_CPORT: int
    SMC_OFF_SPORT: int
    SMC_OFF_CADDR: int
    SMC_OFF_SADDR: int
    SMC_OFF_RELEASED: int
    SMC_STATE_EOF: int
    SMC_STATE_CLOSED: int
    SMC_STATE_ABORT: int
    SMC_PHASE_NONE: int
    SMC_PHASE_CLAIMED: int
    SMC_PHASE_FINAL_ISM: int
    SMC_PHASE_FINAL_TCP: int
    SMC_PHASE_OPTIMISTIC: int
    SMC_PHASE_WITHDRAWING: int
    SMC_PHASE_ACCEPTED: int
    SMC_PHASE_DECLINED: int
    SMC_G_MAGIC: int
    SMC_G_VERSION: int
    SMC_G_OFF_MAGIC: int
    SMC_G_OFF_NQ_PROD: int
    SMC_G_OFF_NQ_OVERFLOW: int
    SMC_G_OFF_NQ_CONS_PEER: int
    SMC_G_OFF_WANT_WAKE: int
    SMC_G_OFF_GSTATE: int
    SMC_G_OFF_CPU: int
    SMC_G_OFF_LISTENERS: int
    SMC_G_MAX_LISTENERS: int
    SMC_G_OFF_CLAIMS: int
    SMC_G_CLAIM_ENTRIES: int
    SMC_G_CLAIM_PROBE: int
    SMC_G_OFF_NQ: int
    SMC_G_NQ_ENTRIES: int
    SMC_G_OFF_HDRS: int
    SMC_MAX_SLOTS: int
    SMC_MIN_SLOTS: int
    SMC_MAX_EXTENTS: int
    SMC_HOT_MAX: int
    SMC_GSTATE_CLOSING: int
    SMC_ROLE_CLIENT: int
    SMC_ROLE_SERVER: int
    SMC_EINVAL: int
    SMC_EPROD: int
    SMC_ECONS: int
    SMC_EEOF: int
    SMC_ECLOSED: int
    SMC_ESWITCH: int
    SMC_EGROUP: int
    SMC_EBUSY: int
    SMC_EFULL: int
    SMC_EREAD: int
    SMC_DETAIL_PROD_RANGE: int
    SMC_DETAIL_CONS_RANGE: int
    SMC_DETAIL_EOF_POS: int
    SMC_DETAIL_PROD_AFTER_EOF: int
    SMC_DETAIL_SW_SEQ: int
    SMC_DETAIL_SW_POS: int
    SMC_DETAIL_SW_BLOCK: int
    SMC_DETAIL_NQ_PROD: int
    SMC_DETAIL_NQ_CONS: int
    SMC_DETAIL_NQ_ENTRY: int
    SMC_ST_DATA: int
    SMC_ST_EOF: int
    SMC_ST_CLOSED: int
    SMC_ST_ABORT: int
    SMC_ST_SPACE: int
    SMC_TAKE_OVERFLOW: int

    # rings
    def smc_ring_init(self, r: RingStruct, my_base: CData, my_len: int, peer_base: CData, peer_len: int,
                      tx_cap: int, rx_cap: int, peer_doorbell_fd: int, /) -> int: ...
    def smc_ring_init_slot(self, r: RingStruct, g: GroupStruct, slot: int, tx_base: CData, tx_cap: int,
                           rx_ext: int, rx_off: int, rx_log2: int, /) -> int: ...
    def smc_ring_attach_rx(self, r: RingStruct, rx_ext: int, rx_off: int, rx_log2: int, /) -> int: ...
    def smc_ring_rx_attached(self, r: RingStruct, /) -> int: ...
    def smc_ring_close(self, r: RingStruct, /) -> None: ...
    def smc_tx_space(self, r: RingStruct, /) -> int: ...
    def smc_tx_write(self, r: RingStruct, buf: CData, len: int, /) -> int: ...
    def smc_tx_writev(self, r: RingStruct, bufs: CData, lens: CData, n: int, /) -> int: ...
    def smc_rx_avail(self, r: RingStruct, /) -> int: ...
    def smc_rx_read(self, r: RingStruct, dst: CData, len: int, /) -> int: ...
    def smc_tx_reserve(self, r: RingStruct, want: int, off: U64Array, /) -> int: ...
    def smc_tx_commit(self, r: RingStruct, n: int, /) -> int: ...
    def smc_tx_cancel(self, r: RingStruct, /) -> None: ...
    def smc_rx_peek(self, r: RingStruct, want: int, off: U64Array, /) -> int: ...
    def smc_rx_consume(self, r: RingStruct, n: int, /) -> int: ...
    def smc_tx_write_fd(self, r: RingStruct, fd: int, offset: int, count: int, err: CData, /) -> int: ...
    def smc_rx_status(self, r: RingStruct, /) -> int: ...
    def smc_rx_prepare_sleep(self, r: RingStruct, /) -> int: ...
    def smc_tx_prepare_sleep(self, r: RingStruct, /) -> int: ...
    def smc_clear_wants(self, r: RingStruct, /) -> None: ...
    def smc_set_state(self, r: RingStruct, bits: int, /) -> int: ...
    def smc_set_state_quiet(self, r: RingStruct, bits: int, /) -> int: ...
    def smc_rx_spin(self, r: RingStruct, budget_ns: int, /) -> int: ...
    def smc_tx_spin(self, r: RingStruct, budget_ns: int, /) -> int: ...
    def smc_doorbell(self, r: RingStruct, /) -> int: ...
    def smc_doorbell_drain(self, fd: int, /) -> int: ...
    def smc_tx_switch(self, r: RingStruct, new_base: CData, new_cap: int, ext: int, off: int, /) -> int: ...
    def smc_tx_switch_pending(self, r: RingStruct, /) -> int: ...
    # link groups
    def smc_group_init(self, g: GroupStruct, my_ext0: CData, my_len: int, peer_ext0: CData, peer_len: int,
                       peer_doorbell_fd: int, role: int, max_slots: int, /) -> int: ...
    def smc_group_add_peer_extent(self, g: GroupStruct, index: int, base: CData, len: int, /) -> int: ...
    def smc_group_remove_peer_extent(self, g: GroupStruct, index: int, /) -> int: ...
    def smc_group_close(self, g: GroupStruct, /) -> None: ...
    def smc_group_notify(self, g: GroupStruct, slot: int, /) -> int: ...
    def smc_group_take(self, g: GroupStruct, out: U32Array, max: int, flags: U32Array, /) -> int: ...
    def smc_group_pending(self, g: GroupStruct, /) -> int: ...
    def smc_group_prepare_sleep(self, g: GroupStruct, /) -> int: ...
    def smc_group_clear_wake(self, g: GroupStruct, /) -> None: ...
    def smc_group_spin(self, g: GroupStruct, budget_ns: int, /) -> int: ...
    def smc_group_spin_hot(self, g: GroupStruct, hot: CData, n: int, budget_ns: int, ready: U32Array,
                           /) -> int: ...
    def smc_group_set_gstate(self, g: GroupStruct, bits: int, /) -> int: ...
    def smc_group_peer_gstate(self, g: GroupStruct, /) -> int: ...
    def smc_group_set_listeners(self, g: GroupStruct, inodes: CData, n: int, /) -> int: ...
    def smc_group_peer_has_listener(self, g: GroupStruct, inode: int, /) -> int: ...
    def smc_group_post_claim(self, g: GroupStruct, port: int, slot: int, /) -> int: ...
    def smc_group_clear_claim(self, g: GroupStruct, port: int, slot: int, /) -> None: ...
    def smc_group_find_claims(self, g: GroupStruct, port: int, out_slots: U32Array, max: int, /) -> int: ...
    def smc_group_my_hdr(self, g: GroupStruct, slot: int, /) -> CData: ...
    def smc_group_peer_hdr(self, g: GroupStruct, slot: int, /) -> CData: ...
    # set-up records and slots
    def smc_setup_publish(self, g: GroupStruct, slot: int, s: SetupStruct, /) -> int: ...
    def smc_setup_set_phase(self, g: GroupStruct, slot: int, gen: int, phase: int, reason: int, /) -> int: ...
    def smc_setup_read_peer(self, g: GroupStruct, slot: int, out: SetupStruct, /) -> int: ...
    def smc_slot_reset(self, g: GroupStruct, slot: int, /) -> int: ...
    def smc_slot_release(self, g: GroupStruct, slot: int, gen: int, /) -> int: ...
    def smc_slot_peer_released(self, g: GroupStruct, slot: int, /) -> int: ...

lib: Lib
