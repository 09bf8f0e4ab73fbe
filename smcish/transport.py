"""SmcTransport: the asyncio.Transport an application sees, over a ring pair or the TCP connection.

The application receives it only once the handshake decided (like SSL's handshake before
connection_made), in one of two modes:
- ism: bytes move through the shared-memory rings; the TCP connection underneath stays open as the
  control and liveness channel (the handshake protocol keeps forwarding its events here);
- tcp (fallback): every method is re-bound, per instance, to the loop's own TCP transport, so a
  fallen-back connection pays no Python call of ours per write, and the application protocol is
  attached to the TCP transport directly (no call of ours per read).
Semantics follow asyncio's selector socket transport (selector_events.py).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import os
import threading
import warnings

from asyncio import constants as _aconst

from . import ring as _ring
from . import stats as _stats
from .errors import PeerReset

log = logging.getLogger("smcish")

_MAX_READ = 256 * 1024          # largest chunk handed to data_received at once
_READS_PER_CALLBACK = 16        # deliveries before yielding to the loop (fairness)
_MAX_BACKOFF = 10               # a missed poll skips up to 2**10 - 1 later chances

# Receive polls queued in this process. Spinning pays only when nothing else waits to run: with
# several busy connections, one's spin would delay the others' work (the loop is single-threaded),
# so a poll spins only while it is the only one queued.
_queued_polls = 0
_ST_DONE = _ring.ST_EOF | _ring.ST_CLOSED | _ring.ST_ABORT

# Methods re-bound to the TCP transport when a connection falls back.
_DELEGATED = (
    "write", "writelines", "write_eof", "can_write_eof", "close", "abort", "is_closing",
    "pause_reading", "resume_reading", "is_reading", "get_write_buffer_size",
    "get_write_buffer_limits", "set_write_buffer_limits", "set_protocol", "get_protocol",
)


class SmcInfo:
    """What ``get_extra_info("smcish")`` returns.

    Attributes:
        mode: ``"ism"`` (shared memory) or ``"tcp"`` (plain TCP).
        reason: a ``DeclineReason`` saying why the connection is TCP, or None.
        device: the ISM device gid (hex) the connection shares memory through, or None.
        ring_size / peer_ring_size: ring capacities in bytes (ISM only).
        role: ``"client"`` or ``"server"``.
    """

    __slots__ = ("mode", "reason", "device", "ring_size", "peer_ring_size", "role", "peer_declined")

    def __init__(self, role: str, mode: str = "tcp") -> None:
        self.role = role
        self.mode = mode
        self.reason = None
        self.device = None
        self.ring_size = None
        self.peer_ring_size = None
        self.peer_declined = False

    def __repr__(self) -> str:
        reason = getattr(self.reason, "name", self.reason)
        return f"<SmcInfo {self.role} mode={self.mode} reason={reason} device={self.device}>"


class SmcTransport(asyncio.transports._FlowControlMixin):
    """The application's transport; see the module docstring for its two modes.

    A ``_FlowControlMixin`` (the selector transports' base), because ``loop.sendfile()``'s
    fallback (aiohttp's FileResponse) accepts only those.
    """

    _sendfile_compatible = _aconst._SendfileMode.FALLBACK
    _start_tls_compatible = False

    def __init__(self, loop, tcp_transport, info: SmcInfo) -> None:
        # Only what both modes need: a fallen-back connection should cost next to nothing.
        super().__init__(None, loop)
        self._tcp = tcp_transport
        self._info = info
        self._protocol = None
        self._buffered = False
        self._feed = None
        self._ring = None
        self._closing = False
        self._conn_lost = 0

    def _init_ism(self, poll_us: float) -> None:
        """The state of the shared-memory data path."""
        self._regions = None            # (device, my_region, peer_region) while in ism mode
        self._doorbell_fd = -1
        self._pending = collections.deque()
        self._pending_size = 0
        self._high_water = 64 * 1024
        self._low_water = 16 * 1024
        self._write_paused = False       # our protocol's pause_writing() state (ism mode)
        self._reading_paused = False
        self._eof_requested = False      # write_eof() called
        self._eof_written = False        # EOF flag published in the ring
        self._eof_delivered = False
        self._peer_gone = False          # TCP control connection lost without a clean close
        self._read_scheduled = False
        self._poll_us = float(poll_us)
        self._poll_scheduled = False
        # Adaptive polling, per direction: after a miss, skip 2**level - 1 chances (level grows
        # with each miss, resets on a hit), so a peer that never answers costs almost nothing.
        self._rx_level = self._rx_skip = 0
        self._tx_level = self._tx_skip = 0

    # ----------------------------------------------------------------- set-up
    def set_protocol(self, protocol) -> None:
        self._protocol = protocol
        self._buffered = isinstance(protocol, asyncio.BufferedProtocol)
        self._feed = getattr(protocol, "_smc_feed", None)      # streams: ring -> reader, one copy

    def get_protocol(self):
        return self._protocol

    def __repr__(self) -> str:
        state = "closed" if self._conn_lost else ("closing" if self._closing else "open")
        return f"<SmcTransport {self._info.mode} {state}>"

    def _become_tcp(self, reason, peer_declined: bool = False) -> None:
        """Fallback: re-bind every method to the TCP transport (no per-call cost of ours)."""
        self._info.mode = "tcp"
        self._info.reason = reason
        self._info.peer_declined = peer_declined
        tcp = self._tcp
        for name in _DELEGATED:
            setattr(self, name, getattr(tcp, name))
        if self._protocol is not None:
            tcp.set_protocol(self._protocol)

    def _become_ism(self, ring, device, my_region, peer_region, poll_us: float) -> None:
        """Switch to the shared-memory data path (after CONFIRM)."""
        self._init_ism(poll_us)
        self._info.mode = "ism"
        self._addrs = (_fmt_addr(self._tcp.get_extra_info("sockname")),
                       _fmt_addr(self._tcp.get_extra_info("peername")))
        self._ring = ring
        self._regions = (device, my_region, peer_region)
        self._doorbell_fd = my_region.doorbell_fd
        self._loop.add_reader(self._doorbell_fd, self._on_doorbell)
        _stats.count("connections_ism")
        _stats.track(self)
        self._schedule_read()

    # ----------------------------------------------------------------- info
    def get_extra_info(self, name, default=None):
        if name == "smcish":
            return self._info
        if name == "sslcontext":
            return None
        return self._tcp.get_extra_info(name, default)

    def _counters(self) -> dict:
        ring = self._ring
        if ring is None:
            return {}
        return {"bytes_sent": ring.tx_bytes, "bytes_received": ring.rx_bytes,
                "doorbells": ring.doorbells, "poll_hits": ring.spin_hits,
                "poll_misses": ring.spin_misses}

    def _describe(self) -> dict:
        """One row of `python -m smcish stat` (called from the device's endpoint thread)."""
        out = {"mode": self._info.mode, "role": self._info.role,
               "peer": self._addrs[1], "local": self._addrs[0],
               "reason": getattr(self._info.reason, "name", None),
               "ring_size": self._info.ring_size, "pending": self._pending_size}
        out.update(self._counters())
        return out

    # ----------------------------------------------------------------- reading
    def is_reading(self) -> bool:
        return not self._reading_paused and not self._closing

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

    def _on_doorbell(self) -> None:
        _ring.drain_doorbell(self._doorbell_fd)
        ring = self._ring
        if ring is None:
            return
        ring.clear_wants()
        if self._pending_size:
            self._flush()
        self._read_ready()

    def _read_ready(self) -> None:
        self._read_scheduled = False
        if self._conn_lost or self._reading_paused or self._closing:
            return
        ring = self._ring
        protocol = self._protocol
        try:
            for _ in range(_READS_PER_CALLBACK):
                avail = ring.readable()
                if not avail:
                    break
                if self._feed is not None:
                    self._feed(ring, avail)
                elif self._buffered:
                    buf = protocol.get_buffer(avail)
                    if not len(buf):
                        raise RuntimeError("get_buffer() returned an empty buffer")
                    protocol.buffer_updated(ring.read_into(buf))
                else:
                    protocol.data_received(ring.read(min(avail, _MAX_READ)))
                if self._reading_paused or self._closing or self._conn_lost:
                    return
            else:
                self._schedule_read()
                return
            status = ring.status()
            if status & _ST_DONE:
                self._on_peer_state(status)
                return
            if self._peer_gone:
                self._fatal_error(PeerReset("smcish peer vanished (TCP connection lost without close)"))
                return
            if self._poll_us:
                self._schedule_poll()           # poll (then sleep) after the app's callbacks
            elif ring.prepare_sleep_rx():
                self._schedule_read()
        except (SystemExit, KeyboardInterrupt):
            raise
        except _ring.RingCorrupted as exc:
            self._fatal_error(exc, "smcish: peer corrupted the shared ring")
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol data callback failed.")

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
            except BaseException as exc:
                self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
                return
            if not keep_open:
                self.close()
        elif status & _ring.ST_CLOSED and not status & _ring.ST_EOF:
            self._fatal_error(PeerReset("smcish peer closed without EOF"))

    def _poll(self) -> None:
        """The receive side is idle: busy-poll briefly for more data, then sleep on the doorbell.

        Scheduled with call_soon after a write (a reply is likely) and when a read drained the
        ring, so it runs after the application's callbacks of this loop iteration: polling never
        delays the application's answer, and a quick peer never pays the sleep/wake-up cost.
        """
        global _queued_polls
        _queued_polls -= 1
        self._poll_scheduled = False
        ring = self._ring
        if (ring is None or self._conn_lost or self._closing or self._reading_paused
                or self._read_scheduled):
            return
        try:
            if not self._pending_size and not _queued_polls:   # clear_wants() drops want_space too
                if self._rx_skip:
                    self._rx_skip -= 1
                else:
                    ring.clear_wants()
                    if ring.spin(self._poll_us):     # returns at once if something is there
                        self._rx_level = 0
                        self._read_ready()
                        return
                    self._rx_level = min(self._rx_level + 1, _MAX_BACKOFF)
                    self._rx_skip = (1 << self._rx_level) - 1
            if ring.prepare_sleep_rx():
                self._schedule_read()
        except _ring.RingCorrupted as exc:
            self._fatal_error(exc, "smcish: peer corrupted the shared ring")

    def _schedule_poll(self) -> None:
        global _queued_polls
        if not self._poll_scheduled:
            self._poll_scheduled = True
            _queued_polls += 1
            self._loop.call_soon(self._poll)

    # ----------------------------------------------------------------- writing
    def write(self, data) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, not {type(data).__name__!r}")
        if self._eof_requested:
            raise RuntimeError("Cannot call write() after write_eof()")
        if not data:
            return
        if self._conn_lost:
            if self._conn_lost >= _aconst.LOG_THRESHOLD_FOR_CONNLOST_WRITES:
                log.warning("socket.send() raised exception.")
            self._conn_lost += 1
            return
        ring = self._ring
        if not self._pending_size:
            try:
                n = ring.write(data)
            except _ring.RingCorrupted as exc:
                self._fatal_error(exc, "smcish: peer corrupted the shared ring")
                return
            if n == len(data):
                if self._poll_us and not self._poll_scheduled:
                    self._schedule_poll()
                return
            data = data[n:]
        self._pending.append(bytes(data))
        self._pending_size += len(data)
        if len(self._pending) == 1:
            self._wait_space()
        self._maybe_pause_protocol()

    def writelines(self, list_of_data) -> None:
        for data in list_of_data:
            self.write(data)

    def _wait_space(self) -> None:
        """Our ring is full: poll briefly for the consumer to make room, else sleep for space."""
        ring = self._ring
        try:
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
            if ring.prepare_sleep_tx():
                self._loop.call_soon(self._flush)
            elif self._peer_gone or ring.status() & (_ring.ST_CLOSED | _ring.ST_ABORT):
                self._fatal_error(PeerReset("smcish peer closed; it will not read what we write"))
        except _ring.RingCorrupted as exc:
            self._fatal_error(exc, "smcish: peer corrupted the shared ring")

    def _flush(self) -> None:
        ring = self._ring
        if ring is None or self._conn_lost or not self._pending_size:
            return
        pending = self._pending
        try:
            n = ring.writev(pending)
        except _ring.RingCorrupted as exc:
            self._fatal_error(exc, "smcish: peer corrupted the shared ring")
            return
        self._pending_size -= n
        while n:
            head = pending[0]
            if len(head) <= n:
                n -= len(head)
                pending.popleft()
            else:
                pending[0] = head[n:]
                n = 0
        if self._pending_size:
            self._wait_space()
            return
        self._maybe_resume_protocol()
        if self._closing:
            self._finish_close()
        elif self._eof_requested:
            self._publish_eof()

    @property
    def _protocol_paused(self) -> bool:
        # loop.sendfile()'s fallback reads this: in tcp mode the TCP transport's state counts.
        if self._ring is None and self._info.mode == "tcp":
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
        except BaseException as exc:
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
            except BaseException as exc:
                self._loop.call_exception_handler({
                    "message": "protocol.resume_writing() failed", "exception": exc,
                    "transport": self, "protocol": self._protocol})

    def get_write_buffer_size(self) -> int:
        return self._pending_size

    def get_write_buffer_limits(self):
        return (self._low_water, self._high_water)

    def set_write_buffer_limits(self, high=None, low=None) -> None:
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
        if self._closing or self._eof_requested:
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
            self._fatal_error(exc, "smcish: peer corrupted the shared ring")

    # ----------------------------------------------------------------- closing
    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if not self._pending_size:
            self._finish_close()

    def _finish_close(self) -> None:
        """All our bytes are in the ring: publish EOF + CLOSED, close TCP, report connection_lost."""
        if self._conn_lost:
            return
        try:
            self._ring.set_eof()
            self._ring.set_closed()
        except _ring.RingCorrupted:
            pass
        self._conn_lost += 1
        self._tcp.close()
        self._loop.call_soon(self._call_connection_lost, None)

    def abort(self) -> None:
        self._force_close(None)

    def _fatal_error(self, exc, message="Fatal error on smcish transport") -> None:
        if isinstance(exc, OSError):
            if self._loop.get_debug():
                log.debug("%r: %s", self, message, exc_info=True)
        else:
            self._loop.call_exception_handler({
                "message": message, "exception": exc, "transport": self, "protocol": self._protocol})
        self._force_close(exc)

    def _force_close(self, exc) -> None:
        if self._conn_lost:
            return
        self._closing = True
        self._pending.clear()
        self._pending_size = 0
        if self._ring is not None:
            try:
                self._ring.set_abort()
            except _ring.RingCorrupted:
                pass
        self._conn_lost += 1
        self._tcp.abort()
        self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc) -> None:
        try:
            if self._protocol is not None:
                self._protocol.connection_lost(exc)
        finally:
            self._release()

    def _release(self) -> None:
        """Give the regions back to the device; the peer keeps its own mapping of ours."""
        regions, self._regions = self._regions, None
        if self._doorbell_fd >= 0:
            self._loop.remove_reader(self._doorbell_fd)
            self._doorbell_fd = -1
        ring, self._ring = self._ring, None
        written = None
        if ring is not None:
            # Cursors start at 0 in a fresh or re-zeroed region: we wrote the header and the
            # first min(bytes sent, capacity) bytes of the ring. The pool zeroes only those.
            written = _ring.HEADER_SIZE + min(ring.tx_bytes, ring.tx_capacity)
            for key, value in {"bytes_sent": ring.tx_bytes, "bytes_received": ring.rx_bytes,
                               "doorbells": ring.doorbells, "poll_hits": ring.spin_hits,
                               "poll_misses": ring.spin_misses}.items():
                _stats.count(key, value)
            ring.close()
        if regions is not None:
            device, mine, peer = regions
            release_regions(device, mine, peer, written)

    # Events forwarded by the handshake protocol, which stays on the TCP transport.
    def _tcp_eof(self) -> None:
        self._tcp_gone()

    def _tcp_lost(self, exc) -> None:
        self._tcp_gone()

    def _tcp_gone(self) -> None:
        if self._conn_lost or self._ring is None:
            return
        try:
            status = self._ring.status()
        except _ring.RingCorrupted as exc:
            self._fatal_error(exc, "smcish: peer corrupted the shared ring")
            return
        if status & _ring.ST_ABORT:
            self._fatal_error(PeerReset("smcish peer aborted the connection"))
        elif not status & _ring.ST_CLOSED:
            self._peer_gone = True
            if self._pending_size or self._closing:
                # Nobody will ever consume what we still hold: fail now, as TCP's send would.
                self._fatal_error(PeerReset("smcish peer vanished with our data unread"))
            else:
                self._schedule_read()    # deliver what it published, then reset
        elif self._closing or self._eof_delivered:
            pass
        else:
            self._schedule_read()

    def __del__(self, _warn=warnings.warn) -> None:
        if not self._conn_lost and self._info.mode == "ism":
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)
            try:
                self._tcp.abort()
            except Exception:
                pass


_pool = None
_pool_lock = threading.Lock()


def device_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for device calls that wait on a peer (attach, detach): never on the event loop,
    where a peer whose device endpoint stalls would freeze every connection of the process."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=8, thread_name_prefix="smcish-device")
    return _pool


def _forget_pool_after_fork() -> None:
    global _pool, _pool_lock
    _pool = None
    _pool_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_pool_after_fork)


def release_regions(device, mine, peer, written: int | None = None) -> None:
    """Detach the peer's region and free ours, off the event loop (see device_pool)."""
    try:
        device_pool().submit(_release_now, device, mine, peer, written)
    except RuntimeError:            # interpreter shutting down: do it here
        _release_now(device, mine, peer, written)


def _release_now(device, mine, peer, written: int | None = None) -> None:
    """Detach the peer's region and free ours (``written``: the pool's zeroing hint), ignoring a
    device that already went away."""
    try:
        if peer is not None:
            device.detach(peer)
    except Exception as exc:  # the device may be gone; memory goes with the process
        log.debug("smcish: detaching the peer's region failed: %r", exc)
    try:
        if mine is not None:
            device.free(mine, written)
    except Exception as exc:
        log.debug("smcish: freeing our region failed: %r", exc)


def _fmt_addr(addr) -> str | None:
    if not addr:
        return None
    if isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    return str(addr)
