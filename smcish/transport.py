"""SmcTransport: the asyncio.Transport an application sees, over a slot's ring pair or the TCP connection.

The application receives it only once the set-up decided (like SSL's handshake before
connection_made), in one of two modes:
- ism: bytes move through the slot's rings in the link group; the TCP connection underneath stays
  open, silent, as the liveness channel (the handshake protocol keeps forwarding its events here);
  the group's notification dispatch calls ``_smc_notify`` when the peer published something for us;
- tcp (fallback): every method is re-bound, per instance, to the loop's own TCP transport, so a
  fallen-back connection pays no Python call of ours per write, and the application protocol is
  attached to the TCP transport directly (no call of ours per read).
Semantics follow asyncio's selector socket transport (selector_events.py). The transport's life
is the state machine ``TransportState`` / ``_TRANSITIONS`` (docs/design.md 4.1), moved only by
``SmcTransport._set_state``.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import logging
import warnings
from asyncio import constants as _aconst
from collections.abc import Mapping
from typing import Any, TypeVar

from . import policy as _policy
from . import ring as _ring
from . import stats as _stats
from . import zerocopy as _zerocopy
from .clc import DeclineReason
from .errors import PeerReset

log = logging.getLogger("smcish")
_asyncio_log = logging.getLogger("asyncio")

_MAX_READ = 256 * 1024          # largest chunk handed to data_received at once
_READS_PER_CALLBACK = 16        # deliveries before yielding to the loop (fairness)
_MAX_BACKOFF = 10               # a missed tx poll skips up to 2**10 - 1 later chances
_GROW_FACTOR = 4
_ST_DONE = _ring.ST_EOF | _ring.ST_CLOSED | _ring.ST_ABORT

# Methods re-bound to the TCP transport when a connection falls back.
_DELEGATED = (
    "write", "writelines", "write_eof", "can_write_eof", "close", "abort", "is_closing",
    "pause_reading", "resume_reading", "is_reading", "get_write_buffer_size",
    "get_write_buffer_limits", "set_write_buffer_limits", "set_protocol", "get_protocol",
    "_force_close",     # asyncio's SSLProtocol aborts its transport with this on a TLS failure
)


class SmcInfo:
    """What ``get_extra_info("smcish")`` returns.

    Attributes:
        mode: ``"ism"`` (shared memory) or ``"tcp"`` (plain TCP).
        reason: a ``DeclineReason`` saying why the connection is TCP, or None.
        device: the ISM device gid (hex) the connection shares memory through, or None.
        ring_size / peer_ring_size: ring capacities in bytes when the connection was set up (ISM).
        role: ``"client"`` or ``"server"``.
        peer_declined: True when the peer's word made it TCP.
        slot: the connection's slot in its link group (ISM), else None.
    """

    __slots__ = ("device", "mode", "peer_declined", "peer_ring_size", "reason", "ring_size", "role",
                 "slot")

    def __init__(self, role: str, mode: str = "tcp") -> None:
        self.role = role
        self.mode = mode
        self.reason: Any = None
        self.device: str | None = None
        self.ring_size: int | None = None
        self.peer_ring_size: int | None = None
        self.peer_declined = False
        self.slot: int | None = None

    def __repr__(self) -> str:
        reason = getattr(self.reason, "name", self.reason)
        return f"<SmcInfo {self.role} mode={self.mode} reason={reason} device={self.device}>"


class TransportState(enum.IntEnum):
    """The life of an ``SmcTransport``; ``_TRANSITIONS`` lists the moves, docs/design.md 4.1 shows them.

    Numbered so that the per-message paths test a group of states with one compare: closing
    (``is_closing()``) is ``>= OPTIMISTIC_CLOSING``, lost (``connection_lost`` scheduled, what
    asyncio's ``_conn_lost`` says) is ``>= OPTIMISTIC_CLOSED``.
    """

    SETUP = 0
    TCP = 1
    OPTIMISTIC = 2
    ISM = 3
    OPTIMISTIC_CLOSING = 4
    CLOSING = 5
    OPTIMISTIC_CLOSED = 6
    OPTIMISTIC_ABORTED = 7
    CLOSED = 8
    LINGERING = 9
    RELEASED = 10


_S = TransportState
# Module aliases: a global is one lookup, an Enum class attribute costs far more (per-message paths).
_SETUP, _TCP, _OPTIMISTIC, _ISM = _S.SETUP, _S.TCP, _S.OPTIMISTIC, _S.ISM
_OPT_CLOSING, _CLOSING, _OPT_CLOSED, _OPT_ABORTED = (
    _S.OPTIMISTIC_CLOSING, _S.CLOSING, _S.OPTIMISTIC_CLOSED, _S.OPTIMISTIC_ABORTED)
_CLOSED, _LINGERING, _RELEASED = _S.CLOSED, _S.LINGERING, _S.RELEASED
_CLOSING_FROM = _OPT_CLOSING     # state >= this: closing (close() or an abort was called)
_LOST_FROM = _OPT_CLOSED         # state >= this: connection_lost is scheduled (or done)

# The whitelist: state -> the states it may become. ``_set_state`` refuses anything else.
_TRANSITIONS: dict[TransportState, frozenset[TransportState]] = {
    _SETUP: frozenset({_TCP, _OPTIMISTIC, _ISM}),
    _TCP: frozenset(),
    _OPTIMISTIC: frozenset({_ISM, _TCP, _OPT_CLOSING, _OPT_ABORTED, _RELEASED}),
    _ISM: frozenset({_CLOSING, _CLOSED}),
    _OPT_CLOSING: frozenset({_CLOSING, _TCP, _OPT_CLOSED, _OPT_ABORTED, _RELEASED}),
    _CLOSING: frozenset({_CLOSED}),
    _OPT_CLOSED: frozenset({_CLOSED, _RELEASED}),
    _OPT_ABORTED: frozenset({_RELEASED}),
    _CLOSED: frozenset({_LINGERING, _RELEASED}),
    _LINGERING: frozenset({_RELEASED}),
    _RELEASED: frozenset(),
}

# What get_extra_info("smcish").mode says in each state (set on entering TCP, OPTIMISTIC, ISM).
_MODES: dict[TransportState, str] = {state: "tcp" if state <= _TCP else "ism" for state in _S}

_MEANINGS: dict[TransportState, str] = {
    _SETUP: "created by the handshake protocol; the set-up has not decided, the application has no "
            "transport yet",
    _TCP: "plain TCP (fallback at set-up, or an optimistic connection migrated): every method is "
          "the loop's TCP transport's, which runs the rest of the connection",
    _OPTIMISTIC: "shared memory, the client's optimistic claim not answered yet: writes go into a "
                 "send-only ring (3.3)",
    _ISM: "shared memory, both rings",
    _OPT_CLOSING: "`close()` while optimistic, bytes still buffered: they go into the ring first",
    _CLOSING: "`close()`, bytes still buffered: they go into the ring first",
    _OPT_CLOSED: "EOF and CLOSED published, `connection_lost` scheduled; the TCP close waits for "
                 "the server's answer (after a resend over TCP if it declines)",
    _OPT_ABORTED: "aborted while optimistic: TCP reset, the claim abandoned (the set-up lets go "
                  "of the slot at once)",
    _CLOSED: "EOF and CLOSED (or ABORT) published, TCP closed or reset, `connection_lost` "
             "scheduled; the slot is ours until the peer is done with it",
    _LINGERING: "closed, the peer still reads: our ring is armed for its CLOSED, the maintenance "
                "tick retries",
    _RELEASED: "slot and ring blocks given back: by us once the peer is done with them, or by the "
               "set-up for an optimistic connection that did not end on shared memory",
}

_E = TypeVar("_E", bound=enum.Enum)


def transition_table(transitions: Mapping[_E, frozenset[_E]], columns: Mapping[str, Mapping[_E, str]]) -> str:
    """A markdown table of a state machine: each state, the states it may become, ``columns``."""
    head = ["State", "May become", *columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for state, nexts in transitions.items():
        after = ", ".join(s.name for s in type(state) if s in nexts) or "(final)"
        cells = [state.name, after, *(column[state] for column in columns.values())]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def state_table() -> str:
    """The transport's table as docs/design.md 4.1 holds it (tests/test_transport_states.py checks)."""
    return transition_table(_TRANSITIONS, {"`mode`": {s: f"`{m}`" for s, m in _MODES.items()},
                                           "Meaning": _MEANINGS})


class SmcTransport(asyncio.transports._FlowControlMixin):
    """The application's transport; see the module docstring for its two modes.

    A ``_FlowControlMixin`` (the selector transports' base), because ``loop.sendfile()``'s
    fallback (aiohttp's FileResponse) accepts only those.
    """

    _sendfile_compatible = _aconst._SendfileMode.FALLBACK
    _start_tls_compatible = True     # asyncio's own start_tls works over us too (tls.py wraps it)

    # Every attribute, declared here. A fallen-back connection should cost next to nothing, so
    # values that start the same for every connection are class defaults (None, bool, int, float:
    # an instance assignment shadows them) and __init__ sets only the others. _become_ism assigns
    # per instance the ones the per-message paths read: CPython 3.11 reads an instance attribute
    # ~3x faster than a class one.
    _loop: asyncio.AbstractEventLoop  # _FlowControlMixin's, as _high_water, _low_water
    _tcp: Any                        # the loop's TCP transport underneath
    _info: SmcInfo
    _conn_lost: int                  # asyncio's counter: >0 exactly when lost (_set_state); write()
                                     # counts on, linkgroup.py reads it
    _state: TransportState           # the life: see _TRANSITIONS, moved only by _set_state()
    _protocol: Any = None
    _buffered: bool = False          # the protocol is a BufferedProtocol
    _feed: Any = None                # streams: ring -> reader, one copy
    _ring: Any = None
    _reserved: Any = None            # the ring (ism) or private buffer of reserve()
    _stats_done: bool = False        # the ring's counters were added to the process totals
    _write_paused: bool              # our protocol's pause_writing() state (the mixin's __init__
                                     # sets it, through _protocol_paused)
    # shared memory (set by _become_ism)
    _group: Any = None
    _setup: Any = None               # the optimistic ClientSetup, exactly in OPTIMISTIC*
    _handshake: Any = None
    _slot: int = -1
    _smc_gen: int = 0
    _block: Any = None               # our current tx ring block
    _old_block: Any = None           # the block before a ring switch, until the peer passed it
    _ring_size: int = 0              # the size rings start at (and shrink back to)
    _max_ring: int = 0
    _full_count: int = 0             # times the writer found the ring full since the last switch
    _growing: bool = False
    _tick_tx: int = -1               # tx bytes at the last maintenance tick (shrink when idle)
    _hot_fired: bool = False         # the group poll saw news on our ring (see _read_ready)
    _pending: collections.deque[bytes | memoryview]   # what the ring had no room for (mutable:
                                                       # created by _become_ism)
    _pending_size: int = 0
    _reading_paused: bool = False
    _eof_requested: bool = False     # write_eof() called
    _eof_written: bool = False       # EOF flag published in the ring
    _eof_delivered: bool = False
    _peer_gone: bool = False         # TCP control connection lost without a clean close
    _gone_why: str = "TCP connection lost without close"
    _read_scheduled: bool = False
    _poll_us: float = 0.0
    _tx_level: int = 0
    _tx_skip: int = 0
    _space_waiter: Any = None        # sendfile waits here for room in the ring
    _born: Any = None                # (loop time, peername): client, learned short-lived rule

    def __init__(self, loop: Any, tcp_transport: Any, info: SmcInfo) -> None:
        # Only what differs per connection (see above): a fallen-back one should cost next to nothing.
        super().__init__(None, loop)
        self._tcp = tcp_transport
        self._info = info
        self._conn_lost = 0
        # (Not a class default: CPython 3.11 does not specialise reads of an attribute whose class
        # default is an instance of a Python class, such as an enum member.)
        self._state = _SETUP

    def _set_state(self, new: TransportState) -> None:
        """The one place the transport's life moves; refuses a move ``_TRANSITIONS`` does not list."""
        old = self._state
        if new not in _TRANSITIONS[old]:
            raise RuntimeError(f"SmcTransport cannot go from {old.name} to {new.name}")
        self._state = new
        if new <= _ISM:
            self._info.mode = _MODES[new]       # public: get_extra_info("smcish").mode
        elif old < _LOST_FROM <= new:
            self._conn_lost += 1

    # ----------------------------------------------------------------- set-up
    def set_protocol(self, protocol: Any) -> None:
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)
        self._feed = getattr(protocol, "_smc_feed", None)      # streams: ring -> reader, one copy
        if isinstance(protocol, _zerocopy.ZeroCopyProtocol):
            protocol.transport = self

    def get_protocol(self) -> Any:
        return self._protocol

    def __repr__(self) -> str:
        state = self._state
        text = "closed" if state >= _LOST_FROM else ("closing" if state >= _CLOSING_FROM else "open")
        return f"<SmcTransport {self._info.mode} {text}>"

    def _become_tcp(self, reason: Any, peer_declined: bool = False) -> None:
        """Fallback: re-bind every method to the TCP transport (no per-call cost of ours)."""
        self._set_state(_TCP)
        self._info.reason = reason
        self._info.peer_declined = peer_declined
        tcp = self._tcp
        for name in _DELEGATED:
            setattr(self, name, getattr(tcp, name))
        if self._protocol is not None:
            tcp.set_protocol(self._protocol)

    def _become_ism(self, ring: Any, group: Any, slot: int, gen: int, block: Any, config: Any,
                    pending: Any = None, handshake: Any = None) -> None:
        """Switch to the shared-memory data path (the set-up established, or optimistic).

        ``pending``: an optimistic ClientSetup not answered yet: we send through a send-only
        ring, and it either completes the ring (``_setup_established``) or makes us resend
        everything over TCP (``_migrate``).
        """
        self._set_state(_OPTIMISTIC if pending is not None else _ISM)
        self._info.slot = slot
        self._ring = ring
        self._group = group
        self._slot = slot
        self._smc_gen = gen
        self._block = block
        self._ring_size = config.ring_size
        self._max_ring = max(config.max_ring_size, config.ring_size)
        self._setup = pending
        self._handshake = handshake
        self._poll_us = float(config.poll_us)
        self._pending = collections.deque()
        # Per instance, the class defaults the per-message paths read (see the class body).
        self._pending_size = self._tx_level = self._tx_skip = 0
        self._reading_paused = self._read_scheduled = self._hot_fired = False
        self._eof_requested = self._eof_delivered = self._peer_gone = False
        self._old_block = self._space_waiter = None
        group.bind(slot, self, self._poll_us)
        if pending is not None:
            pending.transport = self
            return
        _stats.count("connections_ism")
        _stats.track(self)
        if self._info.role == "client":
            self._learn_established()
        self._schedule_read()

    def _learn_established(self) -> None:
        """A client set-up ended in shared memory: what the learned policy keeps (policy.py)."""
        if _policy.short_lived_on or _policy._strikes:
            peer = self._tcp.get_extra_info("peername")
            _policy.note_outcome(peer, None)
            if _policy.short_lived_on:
                self._born = (self._loop.time(), peer)

    def _setup_established(self) -> None:
        """The optimistic claim was accepted: our ring is complete; read, and finish a close."""
        self._setup = None
        state = self._state
        self._set_state(_ISM if state is _OPTIMISTIC else _CLOSING if state is _OPT_CLOSING else _CLOSED)
        self._info.peer_ring_size = self._ring.rx_capacity
        if self._space_waiter is not None:
            self._wake_space_waiter()
        _stats.count("connections_ism")
        _stats.track(self)
        self._learn_established()
        if state is _OPT_CLOSED:          # closed by the application meanwhile: the deferred FIN
            self._tcp.close()
            self._try_release()
            return
        self._schedule_read()
        if self._pending_size:
            self._flush()
        elif state is _OPT_CLOSING:
            self._finish_close()

    def _migrate(self, reason: Any, by_peer: bool, sent: bytes) -> None:
        """The optimistic claim fell through (declined, or the server is not ours): go TCP,
        resending first everything the application gave us so far, in order."""
        self._setup = None
        self._ring = None                 # closed and freed by the set-up
        self._block = None
        if self._space_waiter is not None:    # a sendfile goes on over TCP (loop._sendfile)
            self._wake_space_waiter()
        state = self._state
        if state >= _LOST_FROM:
            if state is _OPT_CLOSED:      # closed by the application meanwhile: send, then FIN
                if sent:
                    self._tcp.write(sent)
                self._tcp.close()
            self._set_state(_RELEASED)    # (else aborted meanwhile: TCP was reset)
            return
        pending = b"".join(self._pending)
        self._pending.clear()
        self._pending_size = 0
        closing, eof, paused = state is _OPT_CLOSING, self._eof_requested, self._write_paused
        self._eof_requested = self._write_paused = False
        _stats.count_fallback(reason, peer=self._tcp)
        _stats.count("migrations")
        _stats.count("migrated_bytes", len(sent))
        self._become_tcp(reason, by_peer)
        tcp = self._tcp
        if sent or pending:
            tcp.write(sent + pending)
        if paused:
            self._maybe_resume_after_migration()
        if closing:
            tcp.close()
        elif eof:
            tcp.write_eof()
        if self._handshake is not None:
            self._handshake._migrated()

    def _setup_failed(self, exc: BaseException) -> None:
        """The optimistic claim was accepted with a ring block we cannot use: neither shared
        memory nor TCP can carry this connection (the server took it as ISM): reset it. The
        set-up has closed the ring and quarantined our block and slot."""
        self._setup = None
        self._ring = None
        self._block = None
        if self._space_waiter is not None:
            self._wake_space_waiter()
        self._pending.clear()
        self._pending_size = 0
        lost = self._state >= _LOST_FROM  # closed by the application meanwhile
        self._set_state(_RELEASED)
        self._tcp.abort()
        if not lost:
            self._loop.call_soon(self._call_connection_lost, exc)

    def _maybe_resume_after_migration(self) -> None:
        # We paused the application for a full ring; the TCP transport pauses it again if its
        # own buffer is too full (it did not see our pause, so resume it explicitly).
        try:
            self._protocol.resume_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - as asyncio: a protocol's error goes to the loop
            self._loop.call_exception_handler({
                "message": "protocol.resume_writing() failed", "exception": exc,
                "transport": self, "protocol": self._protocol})

    # ----------------------------------------------------------------- info
    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "smcish":
            return self._info
        if name == "sslcontext":
            return None
        return self._tcp.get_extra_info(name, default)

    def _counters(self) -> dict[str, int]:
        ring = self._ring
        if ring is None or ring.closed:
            return {}
        return {"bytes_sent": ring.tx_bytes, "bytes_received": ring.rx_bytes,
                "notifications": ring.doorbells}

    def _describe(self) -> dict[str, Any]:
        """One row of `python -m smcish stat` (called from the device's endpoint thread)."""
        ring = self._ring
        out = {"mode": self._info.mode, "role": self._info.role,
               "peer": _fmt_addr(self._tcp.get_extra_info("peername")),
               "local": _fmt_addr(self._tcp.get_extra_info("sockname")),
               "reason": getattr(self._info.reason, "name", None), "slot": self._slot,
               "ring_size": ring.tx_capacity if ring is not None and not ring.closed else None,
               "pending": self._pending_size}
        out.update(self._counters())
        return out

    # ----------------------------------------------------------------- notifications
    def _smc_notify(self) -> None:
        """The peer queued our slot: data, space, a state change (or we linger after close)."""
        if self._setup is not None:
            self._setup._smc_notify()     # optimistic: the server's answer first
            return
        ring = self._ring
        if ring is None:
            return
        if self._state >= _LOST_FROM:
            self._try_release()
            return
        if self._old_block is not None:
            self._free_old_block()
        if self._pending_size:
            self._flush()
        elif self._space_waiter is not None:
            self._wake_space_waiter()
        if not self._read_scheduled:
            self._read_ready()

    def _smc_group_failed(self, exc: BaseException) -> None:
        """The link group died under us (corrupted, or torn down): fail now and let go."""
        if self._state < _LOST_FROM:
            self._fatal_error(exc, "smcish: link group failed")
        self._try_release()

    def _smc_tick(self, now: float) -> None:
        """Maintenance (1 s): release a lingering slot, shrink an idle grown ring."""
        ring = self._ring
        if ring is None:
            self._group.tickers.discard(self)
            return
        if self._state >= _LOST_FROM:
            self._try_release()
            return
        if self._old_block is not None:
            self._free_old_block()
        tx = ring.tx_bytes
        if (ring.tx_capacity > self._ring_size and tx == self._tick_tx and not self._pending_size
                and self._old_block is None):
            try:
                if ring.tx_space() == ring.tx_capacity:
                    self._switch(self._ring_size)
            except _ring.RingCorrupted as exc:
                self._ring_corrupted(exc)
                return
        self._tick_tx = tx
        if ring.tx_capacity <= self._ring_size and self._old_block is None:
            self._group.tickers.discard(self)

    # ----------------------------------------------------------------- reading
    def is_reading(self) -> bool:
        return not self._reading_paused and self._state < _CLOSING_FROM

    def pause_reading(self) -> None:
        self._reading_paused = True

    def resume_reading(self) -> None:
        if not self._reading_paused:
            return
        self._reading_paused = False
        if self._ring is not None:
            self._schedule_read()

    def _schedule_read(self) -> None:
        if not self._read_scheduled:
            self._read_scheduled = True
            self._loop.call_soon(self._read_ready)
            group = self._group
            if group is not None:
                group.read_soon = True    # a poll queued before this read lets it run first

    def _read_ready(self) -> None:
        self._read_scheduled = False
        if self._state >= _CLOSING_FROM or self._reading_paused:
            return
        ring = self._ring
        protocol = self._protocol
        try:
            fired, self._hot_fired = self._hot_fired, False
            hot_ok = self._poll_us and not self._eof_delivered and not self._peer_gone
            for reads in range(_READS_PER_CALLBACK):  # noqa: B007 - read after the loop
                avail = ring.readable()
                if not avail:
                    break
                if self._feed is not None:
                    got = self._feed(ring, avail)
                elif self._buffered:
                    try:
                        buf = protocol.get_buffer(avail)
                        if not len(buf):
                            raise RuntimeError("get_buffer() returned an empty buffer")
                    except (SystemExit, KeyboardInterrupt):
                        raise
                    except BaseException as exc:  # noqa: BLE001 - as asyncio: the protocol's error
                        self._fatal_error(exc, "Fatal error: protocol.get_buffer() call failed.",
                                          self._nothing_unread())
                        return
                    got = ring.read_into(buf)
                    protocol.buffer_updated(got)
                else:
                    got = min(avail, _MAX_READ)
                    protocol.data_received(ring.read(got))
                if self._reading_paused or self._state >= _CLOSING_FROM:
                    return
                if got == avail and hot_ok and self._group.add_hot(self, ring):
                    # All that was there is delivered: the group poll looks again (and fires
                    # at once if more came meanwhile), which saves a look here per message.
                    return
            else:
                self._schedule_read()
                return
            # Drained. With polling, the group poll watches this ring directly (no notification
            # from the peer for the next bytes) and arms it before the hub sleeps; else arm the
            # slot now (the peer queues a notification on its next write; the re-check reports
            # data that came meanwhile, or EOF/CLOSED/ABORT).
            # (News from the poll without data is a state change: EOF, CLOSED or ABORT: the
            # re-check below reports it.)
            if hot_ok and (reads or not fired) and self._group.add_hot(self, ring):
                return
            status = ring.prepare_sleep_rx()
            if status:
                if status & _ring.ST_DATA:
                    self._schedule_read()
                else:
                    self._on_peer_state(status)
                return
            if self._peer_gone:
                self._fatal_error(PeerReset(f"smcish peer vanished ({self._gone_why})"))
                return
            group = self._group
            if self._poll_us and not group._poll_scheduled:
                group.schedule_poll(wake=True)
        except (SystemExit, KeyboardInterrupt):
            raise
        except _ring.RingCorrupted as exc:
            self._ring_corrupted(exc)
        except BaseException as exc:  # noqa: BLE001 - as asyncio: a protocol's error goes to the loop
            self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed."
                              if self._buffered else "Fatal error: protocol.data_received() call failed.",
                              self._nothing_unread())

    def _hot_arm(self) -> bool:
        """The group poll is about to sleep: arm our ring (see _read_ready). True if news came."""
        ring = self._ring
        if ring is None or self._state >= _LOST_FROM:
            return False
        try:
            status = ring.prepare_sleep_rx()
        except _ring.RingCorrupted as exc:
            self._ring_corrupted(exc)
            return True
        if status:
            self._smc_notify()
            return True
        return False

    def _on_peer_state(self, status: int) -> None:
        if status & _ring.ST_ABORT:
            self._fatal_error(PeerReset("smcish peer aborted the connection"))
            return
        if status & _ring.ST_EOF and not self._eof_delivered:
            self._eof_delivered = True
            try:
                keep_open = self._protocol.eof_received()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:  # noqa: BLE001 - as asyncio: the protocol's error
                self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.",
                                  self._nothing_unread())
                return
            if not keep_open:
                self.close()
        elif status & _ring.ST_CLOSED and not status & _ring.ST_EOF:
            self._fatal_error(PeerReset("smcish peer closed without EOF"))

    # ----------------------------------------------------------------- writing
    def write(self, data: Any) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__!r}")
        if self._eof_requested:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not data:
            return
        if self._conn_lost:               # (= state >= OPTIMISTIC_CLOSED; asyncio's check, and
            # one compare cheaper than the state's: the per-message path counts it as asyncio does)
            if self._conn_lost >= _aconst.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                _asyncio_log.warning("socket.send() raised exception.")   # as asyncio's
            self._conn_lost += 1
            return
        ring = self._ring
        if not self._pending_size:
            try:
                n = ring.write(data)
            except _ring.RingCorrupted as exc:
                self._ring_corrupted(exc)
                return
            if n == len(data):
                # A reply is likely: poll for it. Not while an optimistic set-up is pending: no
                # reply can come before the server's ACCEPTED, which takes its accept() and
                # wakes us through the group anyway (a spin would only burn the wait).
                if self._poll_us and not self._group._poll_scheduled and self._setup is None:
                    self._group.schedule_poll(wake=True)
                return
            data = data[n:]
        self._pending.append(bytes(data))
        self._pending_size += len(data)
        if len(self._pending) == 1:
            self._wait_space()
        self._maybe_pause_protocol()

    def writelines(self, list_of_data: Any) -> None:
        # As asyncio's: one write of the joined data (a bad item raises before any is sent).
        self.write(b"".join(list_of_data))

    def _wait_space(self) -> None:
        """Our ring is full: grow it if the flow is bulk, poll briefly for room, else sleep."""
        _stats.count("ring_full")
        ring = self._ring
        try:
            self._full_count += 1
            if (ring.tx_capacity < self._max_ring and not self._growing and self._old_block is None
                    and self._setup is None
                    and (self._full_count >= 2 or self._pending_size > ring.tx_capacity // 2)
                    and self._switch(min(self._max_ring, ring.tx_capacity * _GROW_FACTOR))):
                self._loop.call_soon(self._flush)
                return
            if self._poll_us:
                if self._tx_skip:
                    self._tx_skip -= 1
                elif ring.spin_tx(self._poll_us) & _ring.ST_SPACE:
                    self._tx_level = 0
                    self._loop.call_soon(self._flush)
                    return
                else:
                    self._tx_level = min(self._tx_level + 1, _MAX_BACKOFF)
                    self._tx_skip = (1 << self._tx_level) - 1
            status = ring.prepare_sleep_tx()
            if (status & (_ring.ST_CLOSED | _ring.ST_ABORT) or self._peer_gone
                    or (not status and ring.status() & (_ring.ST_CLOSED | _ring.ST_ABORT))):
                # (As a TCP write to a peer that closed: EPIPE/RST, not a wait that never ends.)
                self._fatal_error(PeerReset("smcish peer closed; it will not read what we write"))
            elif status:
                self._loop.call_soon(self._flush)
        except _ring.RingCorrupted as exc:
            self._ring_corrupted(exc)

    def _switch(self, capacity: int) -> bool:
        """Move our tx ring to a new block of ``capacity`` (grow or shrink). True if switched."""
        if (self._growing or self._old_block is not None or self._group.dying
                or self._ring.reservation):
            return False
        got = self._group.alloc_block(capacity)
        if got is None:
            if capacity > self._ring.tx_capacity:
                self._growing = True
                task = self._loop.create_task(self._group.grow(capacity))
                task.add_done_callback(self._grown)
            return False
        block, extent = got
        if not self._ring.switch_tx(extent, block.off, block.size, block.ext):
            self._group.free_block(block)
            return False
        self._old_block, self._block = self._block, block
        self._full_count = 0
        self._group.tickers.add(self)
        return True

    def _grown(self, task: Any) -> None:
        self._growing = False
        if (not task.cancelled() and task.exception() is None and task.result()
                and self._pending_size and self._state < _LOST_FROM):
            self._full_count = 2
            self._loop.call_soon(self._flush)

    def _free_old_block(self) -> None:
        try:
            if self._ring.switch_pending():
                return
        except _ring.RingCorrupted:
            return
        block, self._old_block = self._old_block, None
        self._group.free_block(block)

    def _flush(self) -> None:
        ring = self._ring
        if ring is None or self._state >= _LOST_FROM or not self._pending_size:
            if self._space_waiter is not None:
                self._wake_space_waiter()
            return
        pending = self._pending
        try:
            n = ring.writev(pending)
        except _ring.RingCorrupted as exc:
            self._ring_corrupted(exc)
            return
        self._pending_size -= n
        while n:
            head = pending[0]
            if len(head) <= n:
                n -= len(head)
                pending.popleft()
            else:
                # A view, not a copy: a large write is flushed in many steps.
                pending[0] = (head if isinstance(head, memoryview) else memoryview(head))[n:]
                n = 0
        if self._pending_size:
            self._wait_space()
            return
        if self._space_waiter is not None:
            self._wake_space_waiter()
        self._maybe_resume_protocol()
        if self._state >= _CLOSING_FROM:
            self._finish_close()
        elif self._eof_requested:
            self._publish_eof()

    @property
    def _protocol_paused(self) -> bool:
        # loop.sendfile()'s fallback reads this: in tcp mode the TCP transport's state counts.
        if self._state <= _TCP:
            return bool(getattr(self._tcp, "_protocol_paused", False))
        return self._write_paused

    @_protocol_paused.setter
    def _protocol_paused(self, value: bool) -> None:
        self._write_paused = value

    def _maybe_pause_protocol(self) -> None:
        if self._pending_size <= self._high_water or self._protocol_paused:
            return
        self._protocol_paused = True
        try:
            self._protocol.pause_writing()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:  # noqa: BLE001 - as asyncio: a protocol's error goes to the loop
            self._loop.call_exception_handler({
                "message": "protocol.pause_writing() failed", "exception": exc,
                "transport": self, "protocol": self._protocol})

    def _maybe_resume_protocol(self) -> None:
        if self._protocol_paused and self._pending_size <= self._low_water:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except (SystemExit, KeyboardInterrupt):
                raise
            except BaseException as exc:  # noqa: BLE001 - as asyncio: a protocol's error goes to the loop
                self._loop.call_exception_handler({
                    "message": "protocol.resume_writing() failed", "exception": exc,
                    "transport": self, "protocol": self._protocol})

    def get_write_buffer_size(self) -> int:
        return self._pending_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (self._low_water, self._high_water)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if high is None:
            high = 64 * 1024 if low is None else 4 * low
        if low is None:
            low = high // 4
        if not high >= low >= 0:
            raise ValueError(f"high ({high!r}) must be >= low ({low!r}) must be >= 0")
        self._high_water, self._low_water = high, low
        self._maybe_pause_protocol()

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._state >= _CLOSING_FROM or self._eof_requested:
            return
        self._eof_requested = True
        if not self._pending_size:
            self._publish_eof()

    def _publish_eof(self) -> None:
        if self._eof_written:
            return
        self._eof_written = True
        try:
            self._ring.set_eof()
        except _ring.RingCorrupted as exc:
            self._ring_corrupted(exc)

    # ----------------------------------------------------------------- zero copy (zerocopy.py)
    def reserve(self, nbytes: int) -> memoryview:
        """A writable memoryview of 1..``nbytes`` bytes to fill, then ``commit(k)`` the first k.

        On shared memory with room in the ring (nothing else buffered, set-up confirmed) the
        view is ring space: the bytes are written once, by the caller. Otherwise (ring full,
        TCP) it is a private buffer of up to 1 MiB that ``commit`` writes (one copy). The view
        is invalid after ``commit``. Do not ``write()`` between the two: on ring space it raises
        ValueError, on a private buffer the written bytes would go before the committed ones.
        """
        if nbytes <= 0:
            raise ValueError(f"nbytes must be positive, got {nbytes!r}")
        if self.__dict__.get("write") == self._write_in_sendfile:
            raise RuntimeError("unable to write; sendfile is in progress")
        if self._reserved is not None:
            raise RuntimeError("a reservation is outstanding: commit() it first")
        ring = self._ring
        if self._state is _ISM and not self._pending_size and not self._eof_requested:
            try:
                view: memoryview = ring.reserve(nbytes)
            except _ring.RingCorrupted as exc:
                self._ring_corrupted(exc)
                raise
            if len(view):
                self._reserved = ring
                return view
        buf = memoryview(bytearray(min(nbytes, 1 << 20)))
        self._reserved = buf
        return buf

    def commit(self, nbytes: int) -> None:
        """Send the first ``nbytes`` of the view ``reserve()`` returned (0: send nothing)."""
        reserved = self._reserved
        if reserved is None:
            raise RuntimeError("commit() without reserve()")
        if isinstance(reserved, memoryview):
            if not 0 <= nbytes <= len(reserved):
                raise ValueError(f"nbytes must be between 0 and {len(reserved)}, got {nbytes!r}")
            self._reserved = None
            if nbytes:
                self.write(reserved[:nbytes].tobytes())
            reserved.release()
            return
        if reserved is not self._ring or reserved.closed:
            self._reserved = None        # the connection ended meanwhile: nothing to send
            return
        if self._state >= _CLOSING_FROM:
            self._reserved = None
            reserved.cancel_reservation()
            return
        if self._eof_requested:
            self._reserved = None
            reserved.cancel_reservation()
            raise RuntimeError("Cannot call write() after write_eof()")
        if not 0 <= nbytes <= reserved.reservation:
            raise ValueError(f"nbytes must be between 0 and {reserved.reservation}, got {nbytes!r}")
        self._reserved = None
        try:
            reserved.commit(nbytes)
        except _ring.RingCorrupted as exc:
            self._ring_corrupted(exc)
            return
        except ValueError:
            reserved.cancel_reservation()     # EOF published meanwhile
            raise
        if nbytes and self._poll_us and not self._group._poll_scheduled:
            self._group.schedule_poll(wake=True)

    async def wait_reservable(self) -> None:
        """Wait until ``reserve()`` can hand out ring space (shared memory: room in the ring and
        nothing buffered before it); returns at once where it cannot (TCP, a set-up not
        confirmed yet, a closing connection): ``reserve()`` then gives a private buffer."""
        while True:
            if self._state is not _ISM:
                return
            try:
                if not self._pending_size and self._ring.tx_space():
                    return
            except _ring.RingCorrupted as exc:
                self._ring_corrupted(exc)
                return
            await asyncio.shield(self._space())   # shared: never cancel it for all

    # ----------------------------------------------------------------- sendfile
    def _wake_space_waiter(self) -> None:
        waiter, self._space_waiter = self._space_waiter, None
        if not waiter.done():
            waiter.set_result(None)

    def _space(self) -> Any:
        """A future resolved when the ring may have room again (or the connection ended); shared
        by everyone waiting at the time."""
        waiter = self._space_waiter
        if waiter is not None and not waiter.done():
            return waiter
        waiter = self._space_waiter = self._loop.create_future()
        self._wait_space()
        return waiter

    async def _sendfile_ism(self, file: Any, offset: int, count: int | None) -> int:
        """``loop.sendfile()`` on shared memory: pread(2) in C from the file straight into the
        ring (no Python chunk loop, no intermediate bytes). As asyncio's native sendfile: what was
        written before goes first, reading is paused meanwhile, the file position ends after the
        last byte sent. Returns the number of bytes sent; returns early (fewer bytes) only if an
        optimistic set-up fell through to TCP meanwhile (the caller sends the rest there)."""
        if self.__dict__.get("write") == self._write_in_sendfile:
            raise RuntimeError("unable to write; sendfile is in progress")
        fd = file.fileno()
        total = 0
        resume = self.is_reading()
        self.pause_reading()
        # As asyncio's transports: no write() while sendfile runs (it would land inside the file's
        # bytes). An instance attribute, so write() itself gets no check.
        self.write = self._write_in_sendfile  # type: ignore[method-assign]  # per instance, as above
        try:
            while count is None or total < count:
                if self._state is _TCP:
                    break                        # migrated to TCP: the caller goes on there
                ring = self._ring
                if self._state >= _CLOSING_FROM or ring is None:
                    raise ConnectionError("Connection closed by peer")
                if self._pending_size:           # earlier writes first
                    await asyncio.shield(self._space())   # shared: never cancel it for all
                    continue
                want = count - total if count is not None else 1 << 30
                try:
                    # Room seen before the call is still there in it (only we fill the ring):
                    # then nothing read means the end of the file, not a full ring.
                    room = ring.tx_space()
                    n = ring.write_from_fd(fd, offset + total, want)
                except _ring.RingCorrupted as exc:
                    self._ring_corrupted(exc)
                    raise
                if n:
                    total += n
                    continue
                if room:
                    break                        # end of file
                await asyncio.shield(self._space())   # shared: never cancel it for all
            return total
        finally:
            if self.__dict__.get("write") == self._write_in_sendfile:
                del self.write
            if total:
                file.seek(offset + total)
            if resume and not self.is_closing():
                self.resume_reading()

    def _write_in_sendfile(self, data: Any) -> None:
        raise RuntimeError("unable to write; sendfile is in progress")

    # ----------------------------------------------------------------- closing
    def is_closing(self) -> bool:
        return self._state >= _CLOSING_FROM

    def close(self) -> None:
        state = self._state
        if state >= _CLOSING_FROM:
            return
        self._set_state(_OPT_CLOSING if state is _OPTIMISTIC else _CLOSING)
        if not self._pending_size:
            self._finish_close()

    def _finish_close(self) -> None:
        """All our bytes are in the ring: publish EOF + CLOSED, close TCP, report connection_lost."""
        state = self._state
        if state >= _LOST_FROM:
            return
        try:
            # The TCP FIN below wakes a peer that is still open; one that already closed (and
            # waits, lingering, for our CLOSED to reuse the slot) must be told through the group.
            ring = self._ring
            ring.set_closed(quiet=not ring.status() & _ring.ST_CLOSED)
        except _ring.RingCorrupted:
            pass
        # Optimistic and not answered yet: the application is done, but the TCP close waits for
        # the answer (a server that is not ours gets our bytes over TCP first).
        self._set_state(_OPT_CLOSED if state is _OPT_CLOSING else _CLOSED)
        self._group.lingering.add(self._slot)
        if state is not _OPT_CLOSING:
            self._tcp.close()
        self._loop.call_soon(self._call_connection_lost, None)

    def abort(self) -> None:
        # As a TCP socket's close(): FIN (the peer reads what was sent, then EOF) unless data we
        # never read is left, then RST (ABORT). What our buffer still holds is dropped either way.
        self._force_close(None)

    def _nothing_unread(self) -> bool:
        """No byte of the peer's is left unread (a closing TCP socket would send FIN, not RST)."""
        ring = self._ring
        if ring is None or self._setup is not None or self._state >= _LOST_FROM:
            return False
        try:
            return not ring.readable()
        except (_ring.RingCorrupted, ValueError):
            return False

    def _ring_corrupted(self, exc: BaseException) -> None:
        """The one way a peer's garbage in the shared ring (``RingCorrupted``) ends the
        connection: reset it (ABORT, TCP reset); the application gets ``connection_lost(exc)``."""
        self._fatal_error(exc, "smcish: peer corrupted the shared ring")

    def _fatal_error(self, exc: BaseException, message: str = "Fatal error on smcish transport",
                     graceful: bool = False) -> None:
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                log.debug("%r: %s", self, message, exc_info=exc)
        else:
            self._loop.call_exception_handler({
                "message": message, "exception": exc, "transport": self, "protocol": self._protocol})
        self._force_close(exc, graceful)

    def _force_close(self, exc: BaseException | None, graceful: bool | None = None) -> None:
        """Close now, dropping what is buffered. ``graceful`` (default, as a TCP socket's close:
        nothing left unread): the peer reads what was published, then EOF; else ABORT."""
        if self._state >= _LOST_FROM:
            return
        if graceful is None:
            graceful = self._nothing_unread()
        setup = self._setup
        if setup is not None:             # aborted while optimistic: the set-up lets go
            self._set_state(_OPT_ABORTED)
            self._tcp.abort()
            setup.abandon(DeclineReason.INTERNAL)     # -> _migrate: RELEASED
            self._loop.call_soon(self._call_connection_lost, exc)
            return
        self._pending.clear()
        self._pending_size = 0
        ring = self._ring
        if ring is not None:
            try:
                peer_closed = ring.status() & _ring.ST_CLOSED
            except (_ring.RingCorrupted, ValueError):
                peer_closed = 0
            try:
                if graceful:
                    ring.set_closed(quiet=not peer_closed)
                else:
                    ring.set_abort(quiet=not peer_closed)   # else the TCP reset wakes the peer
            except (_ring.RingCorrupted, ValueError):
                pass
            self._group.lingering.add(self._slot)
        self._set_state(_CLOSED)
        self._tcp.abort()
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: BaseException | None) -> None:
        if self._space_waiter is not None:
            self._wake_space_waiter()
        try:
            if self._protocol is not None:
                self._protocol.connection_lost(exc)
        finally:
            self._protocol = self._feed = None     # as asyncio: get_protocol() is None now
            self._stats_final()
            born = self._born
            if born is not None:
                self._born = None
                _policy.note_ended(born[1], self._loop.time() - born[0])
            self._try_release()

    def _stats_final(self) -> None:
        """Add our ring's counters to the process totals, once (connection_lost, or the ring's
        release if that comes first: a link group's death releases before connection_lost)."""
        ring = self._ring
        if ring is not None and not ring.closed and not self._stats_done:
            self._stats_done = True
            for key, value in self._counters().items():
                _stats.count(key, value)

    def _peer_done(self) -> bool:
        """The peer will never read our ring again (so its block and our slot can be reused)."""
        group = self._group
        if group.dying or self._peer_gone:
            return True
        try:
            return bool(self._ring.status() & (_ring.ST_CLOSED | _ring.ST_ABORT))
        except (_ring.RingCorrupted, ValueError):
            return True

    def _try_release(self) -> None:
        """After connection_lost: give the slot back once the peer is done with it."""
        state = self._state
        if state is not _CLOSED and state is not _LINGERING:
            return                                # (open, optimistic, or released already)
        ring = self._ring
        if not self._peer_done():
            group = self._group
            group.tickers.add(self)               # linger: retried on notifications and ticks
            if state is _CLOSED:
                # Make sure the peer's CLOSED notifies us (a hot ring left want_data unarmed).
                self._set_state(_LINGERING)
                group.drop_hot(self)
                try:
                    armed = ring.prepare_sleep_rx()
                except (_ring.RingCorrupted, ValueError):
                    armed = 0
                if armed and self._peer_done():
                    self._try_release()
            return
        self._stats_final()
        self._set_state(_RELEASED)
        self._ring = None
        group = self._group
        group.drop_hot(self)
        ring.close()
        group.tickers.discard(self)
        if self._reserved is ring:
            # The application still holds a view of our tx block (reserve() never committed):
            # the block is never reused, so a late write into it cannot reach another connection.
            self._block = None
        for block in (self._block, self._old_block):
            if block is not None:
                group.free_block(block)
        self._block = self._old_block = None
        group.slot_done(self._slot, self._smc_gen)

    # Events forwarded by the handshake protocol, which stays on the TCP transport.
    def _tcp_eof(self) -> None:
        self._tcp_gone()

    def _tcp_lost(self, exc: BaseException | None) -> None:
        self._tcp_gone()

    def _tcp_bytes(self) -> None:
        """A byte arrived on the TCP connection of an ISM connection: the peer broke the protocol."""
        self._fatal_error(ConnectionResetError(
            "smcish: the peer wrote on the TCP connection of a shared-memory connection"))

    def _smc_peer_gone(self) -> None:
        """The device says the peer process is gone (between guests, where its TCP connection
        cannot tell): deliver what it published, then reset, as when TCP reports it."""
        self._gone_why = "its link group's device channel closed: the peer guest or process is gone"
        self._tcp_gone()

    def _tcp_gone(self) -> None:
        if self._ring is None or self._state >= _LOST_FROM:
            # After our own close or abort the TCP events say nothing about whether the peer
            # still reads our ring: only its CLOSED/ABORT flag or the group's death do.
            return
        try:
            status = self._ring.status()
        except _ring.RingCorrupted as exc:
            self._ring_corrupted(exc)
            return
        if status & _ring.ST_ABORT:
            self._fatal_error(PeerReset("smcish peer aborted the connection"))
        elif not status & _ring.ST_CLOSED:
            self._peer_gone = True
            if self._pending_size or self._state >= _CLOSING_FROM:
                # Nobody will ever consume what we still hold: fail now, as TCP's send would.
                self._fatal_error(PeerReset("smcish peer vanished with our data unread"))
            else:
                self._schedule_read()    # deliver what it published, then reset
        elif self._state >= _CLOSING_FROM or self._eof_delivered:
            pass
        else:
            self._schedule_read()

    def __del__(self, _warn: Any = warnings.warn) -> None:
        # Collected after its loop closed: the loop's TCP transport underneath warns itself, as
        # in plain asyncio; one warning per connection, not two.
        if _OPTIMISTIC <= self._state < _LOST_FROM and not self._loop.is_closed():
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            try:
                self._tcp.abort()
            except Exception:  # noqa: BLE001 - a finaliser must not raise
                pass


def _fmt_addr(addr: Any) -> str | None:
    if not addr:
        return None
    if isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    return str(addr)
