"""ismd guest mode: the host side of smcish between virtual machines (docs/vm.md sections 1-4).

``python -m ism_backend.vmhost --guest NAME,qmp=PATH,chan=PATH [--guest ...] --quota BYTES
--total-memory BYTES --dir DIR [--ports 12] [--status-socket PATH]`` serves the guests named on
the command line; ``python -m ism_backend.vmhost status --status-socket PATH`` prints its state.

Design:

- **Identity.** A guest is the pair of sockets the operator named for it: its QMP socket and the
  Unix socket of its virtio-serial chardev (``org.smcish.ism.0``). vmhost is the client of both
  (QEMU is the server). Every request is attributed to the guest whose channel it came on;
  nothing a guest says names another guest.
- **Regions** are files ``<dir>/<id>`` (a private 0700 directory, locked with ``flock`` so two
  vmhosts never share one, emptied and removed at exit) of ``bar = next_pow2(size + 4096)``
  bytes with the header ``ISMREG1\\0 | token | u64 size | u64 id`` at offset 0. The owner guest's
  quota and the total are charged ``bar`` bytes from ``alloc`` until the region is freed by its
  owner (or its owner is gone) *and* unplugged from every guest. Plugging is QMP ``object-add``
  (memory-backend-file, share, ``readonly`` for attachers) + ``device_add`` (ivshmem-plain on a
  free ``ismrpN`` root port); unplugging is ``device_del``, ``DEVICE_DELETED`` (bounded),
  ``object-del``. vmhost unplugs from a guest only when that guest asked (``detach``/``free``)
  or is gone.
- **Routing.** Endpoint ids map to guests; a peer channel is a pair (guest A, chan a) <->
  (guest B, chan b) of per-link ids the host allocates; ``data``/``close`` are relayed in order.
  A connector learns its channel id from the ``connect`` reply, and nothing of the channel
  reaches it before that reply (records the acceptor sends early wait on the host).
  ``find`` asks every other live guest ``match`` in parallel (about 1 s each), with the id the
  claim will have (the server guest's agent keeps it to ``verify`` the connection it accepts);
  exactly one answer naming an endpoint of the answering guest records the claim, which
  ``verify`` (from the claim's server guest only) spends after asking the client guest ``check``.
- **Threads and locks.** vmlink answers requests on worker threads and delivers notifications
  on each link's reader thread. One lock guards every table and is never held across I/O; a
  per-guest *plug lock* serialises that guest's hot-plug operations (QMP commands, bounded by
  ``--qmp-timeout``), so a slow or hostile guest delays only itself. Requests to other guests
  (``take``, ``match``, ``check``) run on a shared pool and are bounded by their timeouts.
  Notifications to a guest go through its *outbox* (a writer thread): a reader thread never
  blocks on another guest's socket; a channel whose records pile up unread (8 MiB) is closed,
  doorbells are coalesced, and a guest that does not read its link for ``--send-timeout`` seconds
  is dropped.
- **A guest goes away** when its channel or its QMP socket closes (or its link broke: malformed
  frames, a write timeout). Its channels are closed on the other side, its claims, endpoints and
  tokens die, regions it owned stay plugged where they were attached until those guests detach,
  and what was plugged into it is unplugged if its QMP still answers (else forgotten: the QEMU
  is gone). A gone guest is not reconnected.
- **Limits.** Every table is bounded per guest (``MAX_ENTRIES``); a quota or port shortage is a
  ``QuotaExceeded`` that names the figures and the flag to raise.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import errno
import fcntl
import ipaddress
import json
import logging
import os
import re
import secrets
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .contract import MAX_REGION_SIZE, ZERO_ID
from .daemon import clear_stale_socket
from .errors import (
    ERRORS,
    DeviceGone,
    DeviceProtocolError,
    IsmError,
    PermissionDenied,
    QuotaExceeded,
    UnknownToken,
)
from .vmlink import MAX_FRAME, Link, LinkClosed, check

__all__ = ["GuestSpec", "Qmp", "QmpError", "QmpUnavailable", "VmHost", "build_parser", "main",
           "next_pow2", "parse_guest"]

log = logging.getLogger("ism_backend.vmhost")

HEADER_MAGIC = b"ISMREG1\0"
#: Where the region proper starts in its file (and BAR).
REGION_OFFSET = 4096
#: Bound on each per-guest table: owned regions, endpoints, channel ends, claims.
MAX_ENTRIES = 4096
QMP_TIMEOUT = 10.0
UNPLUG_TIMEOUT = 5.0
MATCH_TIMEOUT = 1.0
TAKE_TIMEOUT = 5.0
CHECK_TIMEOUT = 2.0
#: A write to a guest's channel that makes no progress for this long drops the guest.
SEND_TIMEOUT = 10.0
#: Unverified claims older than this are dropped when a guest's claim table is full.
CLAIM_TTL = 60.0
#: Bytes of peer-channel records that may wait for one side of one channel.
CHANNEL_BACKLOG = 8 << 20
#: Bytes of records that may wait for one guest in all.
OUTBOX_LIMIT = 64 << 20
#: Largest base64 record relayed (leaves room for the frame's other fields).
MAX_RECORD_TEXT = MAX_FRAME - 256
LOCK_NAME = ".vmhost.lock"

_PORT = (1, 65535)
_PID = (0, (1 << 31) - 1)
_UID = (0, (1 << 32) - 2)         # (uid_t)-1 is no uid
_INODE = (1, (1 << 64) - 1)
_ID = (1, (1 << 53) - 1)          # ids the host hands out (exact in any JSON reader)
_FAMILY = (4, 6)

#: Guest -> host requests: op -> vmlink.check schema (docs/vm.md section 3).
REQUESTS: dict[str, dict[str, Any]] = {
    "hello": {"version": (0, _UID[1])},
    "alloc": {"size": (1, MAX_REGION_SIZE)},
    "attach": {"token": "id16"},
    "detach": {"region": _ID},
    "free": {"region": _ID},
    "endpoint": {"endpoint_id": "id16", "up": "bool"},
    "connect": {"from_endpoint": "id16", "to_endpoint": "id16", "pid": _PID, "uid": _UID,
                "gid": _UID},
    "find": {"family": _FAMILY, "src": "str", "sport": _PORT, "dst": "str", "dport": _PORT,
             "endpoint_id": "id16"},
    "verify": {"claim": _ID, "inode": _INODE, "endpoint_id": "id16", "family": _FAMILY,
               "local": "str", "lport": _PORT, "peer": "str", "pport": _PORT},
    "release": {"claim": _ID},
}
#: Guest -> host notifications. (``rec`` is checked as a string and relayed as sent.)
NOTIFICATIONS: dict[str, dict[str, Any]] = {
    "ring": {"region": _ID},
    "data": {"chan": _ID, "rec": "data"},
    "close": {"chan": _ID},
}
_MATCH_REPLY = {"found": "bool", "endpoint_id": "id16", "hub_id": "id16", "pid": _PID,
                "uid": _UID}
_TAKE_REPLY = {"pid": _PID, "uid": _UID, "gid": _UID}
_CHECK_REPLY = {"verified": "bool"}
_NOT_FOUND = {"found": False, "endpoint_id": ZERO_ID, "hub_id": ZERO_ID, "pid": 0, "uid": 0,
              "claim": 0}


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (``n`` >= 1)."""
    return 1 << (n - 1).bit_length()


def _set_send_timeout(sock: socket.socket, seconds: float) -> None:
    """SO_SNDTIMEO: a blocking write that makes no progress fails after ``seconds``."""
    sec = int(seconds)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                    struct.pack("@ll", sec, int((seconds - sec) * 1e6)))


# --- QMP -------------------------------------------------------------------------------------

class QmpError(IsmError):
    """QEMU answered a QMP command with an error (``qmp_class``, ``desc``)."""

    def __init__(self, command: str, error: Any) -> None:
        err = error if isinstance(error, dict) else {}
        self.qmp_class = str(err.get("class", ""))[:64]
        self.desc = str(err.get("desc", ""))[:512]
        super().__init__(f"QMP {command} failed: {self.qmp_class}: {self.desc}")


class QmpUnavailable(DeviceGone):
    """The QMP connection is closed, broke, or did not answer in time."""


class Qmp:
    """A QMP client over a Unix socket (QEMU is the server).

    ``connect`` retries until a deadline (QEMU may still be starting), reads the greeting and
    negotiates capabilities; a reader thread then routes replies (matched by ``id``) and collects
    events (the last 256). Commands are serialised by a lock and bounded by ``timeout``.

    Args:
        path: the QMP socket.
        name: the guest's name, for messages.
        timeout: default bound on a command, seconds.
        on_close: called once (from the reader thread) when the connection ends.
    """

    MAX_LINE = 1 << 20

    def __init__(self, path: str, name: str, timeout: float = QMP_TIMEOUT,
                 on_close: Callable[[], None] | None = None) -> None:
        self.path = path
        self.name = name
        self.timeout = timeout
        self.on_close = on_close
        self.closed = False
        self._sock: socket.socket | None = None
        self._buf = bytearray()
        self._cmd_lock = threading.Lock()
        self._cond = threading.Condition()
        self._waiting: set[int] = set()
        self._replies: dict[int, dict[str, Any]] = {}
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=256)
        self._next = 0

    def connect(self, deadline: float, stop: Callable[[], bool] = lambda: False) -> None:
        """Connect (retrying until ``deadline``, a ``time.monotonic`` value) and negotiate.

        Raises:
            QmpUnavailable: not reachable or not speaking QMP by then.
        """
        fix = f"start its QEMU with -qmp unix:{self.path},server=on,wait=off"
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
                sock.connect(self.path)
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() >= deadline or stop():
                    raise QmpUnavailable(f"guest {self.name}: cannot connect to its QMP socket "
                                         f"{self.path} ({exc.strerror or exc}): {fix}") from None
                time.sleep(0.1)
        self._sock = sock
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            greeting = self._read_message()
            if not isinstance(greeting.get("QMP"), dict):
                raise ValueError("no QMP greeting")
            sock.sendall(b'{"execute": "qmp_capabilities", "id": 0}\n')
            while True:
                msg = self._read_message()
                if msg.get("id") == 0:
                    break
            if "error" in msg:
                raise ValueError(f"qmp_capabilities refused: {msg['error']!r:.200}")
            sock.settimeout(None)
            _set_send_timeout(sock, self.timeout)
        except (OSError, ValueError, EOFError) as exc:
            sock.close()
            self.closed = True
            raise QmpUnavailable(f"guest {self.name}: {self.path} does not speak QMP "
                                 f"({str(exc) or type(exc).__name__}; QEMU serves one QMP client at "
                                 f"a time: is another one connected?): {fix}") from None
        threading.Thread(target=self._run, name=f"qmp-{self.name}", daemon=True).start()

    def _read_message(self) -> dict[str, Any]:
        assert self._sock is not None
        while True:
            end = self._buf.find(b"\n")
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[:end + 1]
                if not line.strip():
                    continue
                msg = json.loads(line)
                if not isinstance(msg, dict):
                    raise ValueError("a QMP message is not a JSON object")
                return msg
            if len(self._buf) > self.MAX_LINE:
                raise ValueError("a QMP message exceeds 1 MiB")
            data = self._sock.recv(1 << 16)
            if not data:
                raise EOFError
            self._buf += data

    def _run(self) -> None:
        try:
            while True:
                msg = self._read_message()
                with self._cond:
                    if "event" in msg:
                        self._events.append(msg)
                    elif type(msg.get("id")) is int and msg["id"] in self._waiting:
                        self._replies[msg["id"]] = msg
                    else:
                        continue
                    self._cond.notify_all()
        except (OSError, ValueError, EOFError) as exc:
            if not self.closed:
                log.info("guest %s: QMP connection ended (%s)", self.name,
                         "end of stream" if isinstance(exc, EOFError) else exc)
        finally:
            self._end()

    def _end(self) -> None:
        with self._cond:
            already = self.closed
            self.closed = True
            self._cond.notify_all()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        callback, self.on_close = self.on_close, None
        if callback is not None and not already:
            try:
                callback()
            except Exception:  # a handler bug must not kill the reader
                log.exception("guest %s: QMP close handler failed", self.name)

    def command(self, name: str, timeout: float | None = None, **args: Any) -> Any:
        """Run one QMP command; returns its ``return`` value.

        Raises:
            QmpError: QEMU refused it.
            QmpUnavailable: closed, or no answer within ``timeout`` (default ``self.timeout``).
        """
        bound = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + bound
        if not self._cmd_lock.acquire(timeout=bound):
            raise QmpUnavailable(f"guest {self.name}: QMP busy for {bound:.1f} s ({name})")
        cid = -1
        try:
            with self._cond:
                if self.closed or self._sock is None:
                    raise QmpUnavailable(f"guest {self.name}: its QMP connection is closed "
                                         "(QEMU exited?)")
                self._next += 1
                cid = self._next
                self._waiting.add(cid)
            msg: dict[str, Any] = {"execute": name, "id": cid}
            if args:
                msg["arguments"] = args
            try:
                self._sock.sendall(json.dumps(msg).encode() + b"\n")
            except OSError as exc:
                self._end()   # a partial command would desynchronise the stream: QEMU is lost
                raise QmpUnavailable(f"guest {self.name}: QMP write failed "
                                     f"({exc.strerror or exc})") from None
            with self._cond:
                while cid not in self._replies:
                    left = deadline - time.monotonic()
                    if self.closed:
                        raise QmpUnavailable(f"guest {self.name}: QMP closed during {name} "
                                             "(QEMU exited?)")
                    if left <= 0:
                        raise QmpUnavailable(f"guest {self.name}: QEMU did not answer {name} "
                                             f"within {bound:.1f} s")
                    self._cond.wait(left)
                reply = self._replies.pop(cid)
        finally:
            with self._cond:
                self._waiting.discard(cid)
                self._replies.pop(cid, None)
            self._cmd_lock.release()
        if "error" in reply:
            raise QmpError(name, reply["error"])
        return reply.get("return")

    def wait_event(self, name: str, pred: Callable[[dict[str, Any]], bool],
                   timeout: float) -> dict[str, Any] | None:
        """Take the first collected (or coming) event ``name`` whose data satisfies ``pred``;
        None after ``timeout`` seconds or when the connection closes."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for event in self._events:
                    data = event.get("data")
                    if event.get("event") == name and pred(data if isinstance(data, dict) else {}):
                        self._events.remove(event)
                        return event
                left = deadline - time.monotonic()
                if self.closed or left <= 0:
                    return None
                self._cond.wait(left)

    def purge_events(self, name: str, pred: Callable[[dict[str, Any]], bool]) -> None:
        """Forget collected events ``name`` whose data satisfies ``pred``."""
        with self._cond:
            keep = [e for e in self._events
                    if not (e.get("event") == name
                            and pred(e["data"] if isinstance(e.get("data"), dict) else {}))]
            self._events.clear()
            self._events.extend(keep)

    def close(self) -> None:
        """Close the connection here (``on_close`` does not run: it is for QEMU's end)."""
        self.on_close = None
        self._end()
        if self._sock is not None:
            self._sock.close()


# --- the guests' links -----------------------------------------------------------------------

class _GuestLink(Link):
    """A vmlink ``Link`` that can run a function right after the current request's reply is
    written (``after_reply``, keyed by the worker thread, which is the one writing the reply),
    and reports a failed write (``on_broken``: a frame may be cut, the stream is lost)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._after: dict[int, Callable[[], None]] = {}
        self._after_lock = threading.Lock()
        self.on_broken: Callable[[bool], None] | None = None   # (the write timed out)

    def _write(self, frame: bytes) -> None:
        try:
            super()._write(frame)
        except LinkClosed as exc:
            if not self.closed and self.on_broken is not None:
                # (vmlink raises it "from None": the OSError is still its __context__)
                self.on_broken(isinstance(exc.__context__, BlockingIOError))
            raise

    def after_reply(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once this worker thread has written the reply it is preparing."""
        with self._after_lock:
            self._after[threading.get_ident()] = fn

    def _answer(self, req_id: int, op: str, msg: dict[str, Any]) -> None:
        try:
            super()._answer(req_id, op, msg)
        finally:
            with self._after_lock:
                fn = self._after.pop(threading.get_ident(), None)
            if fn is not None:
                try:
                    fn()
                except Exception:  # logged; the link goes on
                    log.exception("%s: after-reply hook of %s failed", self.name, op)


class _Outbox:
    """Notifications to one guest, written in order by a thread of their own.

    Producers (other guests' reader threads) never block: a channel with ``CHANNEL_BACKLOG``
    bytes unread, or a guest with ``OUTBOX_LIMIT``, refuses more (the caller closes the channel);
    doorbells of a region already queued are coalesced.
    """

    def __init__(self, name: str, link: Link) -> None:
        self.name = name
        self._link = link
        self._cond = threading.Condition()
        self._items: collections.deque[tuple[str, dict[str, Any], int, _Channel | None, int]] = \
            collections.deque()
        self._rings: set[int] = set()
        self._bytes = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"vmhost-out-{name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, op: str, fields: dict[str, Any], size: int = 0, channel: _Channel | None = None,
            side: int = 0) -> bool:
        """Queue a notification; False (nothing queued) if it would exceed a bound."""
        with self._cond:
            if self._closed:
                return True
            if size and (self._bytes + size > OUTBOX_LIMIT or
                         (channel is not None and channel.queued[side] + size > CHANNEL_BACKLOG)):
                return False
            self._items.append((op, fields, size, channel, side))
            self._bytes += size
            if channel is not None:
                channel.queued[side] += size
            self._cond.notify()
            return True

    def ring(self, region: int) -> None:
        """Queue a doorbell for ``region`` unless one is already waiting."""
        with self._cond:
            if self._closed or region in self._rings:
                return
            self._rings.add(region)
            self._items.append(("ring", {"region": region}, 0, None, 0))
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._items.clear()
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                op, fields, size, channel, side = self._items.popleft()
                if op == "ring":
                    self._rings.discard(fields["region"])
            try:
                self._link.notify(op, **fields)
            except LinkClosed:
                return        # the link's on_broken/on_close made the guest gone
            except ValueError as exc:  # a frame over the limit: records are bounded before
                log.warning("guest %s: %s not sent: %s", self.name, op, exc)
            with self._cond:
                self._bytes -= size
                if channel is not None:
                    channel.queued[side] -= size


# --- state -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GuestSpec:
    """A guest as named on the command line."""

    name: str
    qmp: str
    chan: str


class _Guest:
    def __init__(self, spec: GuestSpec, ports: int) -> None:
        self.name = spec.name
        self.spec = spec
        self.live = False
        self.hello = False
        self.qmp: Qmp | None = None
        self.link: _GuestLink | None = None
        self.link_closed = False               # Link.close() called (it closes the fd: once)
        self.outbox: _Outbox | None = None
        self.plug_lock = threading.Lock()
        self.free_ports: set[int] = set(range(ports))
        self.bad_ports: set[int] = set()       # QEMU never confirmed what was left on them
        self.used = 0                          # bytes of bar charged to this guest
        self.owned: dict[int, _Region] = {}    # regions not yet reclaimed
        self.plugs: dict[int, _Plug] = {}      # region id -> plug in this guest
        self.endpoints: set[bytes] = set()
        self.channels: dict[int, tuple[_Channel, int]] = {}
        self.claims: set[int] = set()          # claims this guest is the client of
        self.next_chan = 0


class _Region:
    __slots__ = ("bar", "created", "dead", "id", "owner", "path", "plugs", "reclaimed", "size",
                 "token")

    def __init__(self, region_id: int, owner: _Guest, size: int, bar: int, path: str) -> None:
        self.id = region_id
        self.owner = owner
        self.size = size
        self.bar = bar
        self.path = path
        self.token = secrets.token_bytes(16)
        self.dead = False          # the token died: freed by its owner, or the owner is gone
        self.created = False       # the file exists
        self.reclaimed = False
        self.plugs: dict[str, _Plug] = {}    # guest name -> plug


class _Plug:
    __slots__ = ("guest", "port", "readonly", "region", "state")

    def __init__(self, guest: _Guest, region: _Region, port: int, readonly: bool) -> None:
        self.guest = guest
        self.region = region
        self.port = port
        self.readonly = readonly
        self.state = "plugging"    # -> plugged -> unplugging (-> plugged if that failed)


class _Channel:
    """A peer channel: ends[0] is the connector (guest A), ends[1] the acceptor (guest B).

    States: ``taking`` (B is being asked), ``open``, ``closed``. ``a_ready`` once A has its
    ``connect`` reply: until then what B sends waits in ``pending``.
    """

    __slots__ = ("a_ready", "b_closed", "ends", "pending", "pending_bytes", "queued", "state")

    def __init__(self, a: _Guest, chan_a: int, b: _Guest, chan_b: int) -> None:
        self.ends = ((a, chan_a), (b, chan_b))
        self.state = "taking"
        self.a_ready = False
        self.b_closed = False
        self.pending: list[str | None] = []     # B's records for A (None: B closed)
        self.pending_bytes = 0
        self.queued = [0, 0]                    # bytes waiting in each side's outbox


class _Claim:
    __slots__ = ("client", "client_endpoint", "created", "dport", "dst", "family", "id", "server",
                 "sport", "src")

    def __init__(self, claim_id: int, client: _Guest, server: _Guest, f: dict[str, Any]) -> None:
        self.id = claim_id
        self.client = client
        self.server = server
        self.family: int = f["family"]
        self.src: str = f["src"]
        self.sport: int = f["sport"]
        self.dst: str = f["dst"]
        self.dport: int = f["dport"]
        self.client_endpoint: bytes = f["endpoint_id"]
        self.created = time.monotonic()


class _PlugFailed(DeviceGone):
    """A hot-plug failed; ``clean`` says whether QEMU confirmed nothing was left behind."""

    def __init__(self, message: str, clean: bool) -> None:
        super().__init__(message)
        self.clean = clean


def _wire_error(exc: IsmError) -> IsmError:
    """``exc`` as a class that may cross the link (its nearest base in ``errors.ERRORS``)."""
    if ERRORS.get(type(exc).__name__) is type(exc):
        return exc
    cls = next(c for c in type(exc).__mro__ if ERRORS.get(c.__name__) is c)
    assert issubclass(cls, IsmError)
    return cls(str(exc))


def _address(family: int, text: str, what: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if family not in (4, 6):
        raise DeviceProtocolError("field 'family': must be 4 or 6")
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise DeviceProtocolError(f"field {what!r}: not an IPv{family} address") from None
    if addr.version != family:
        raise DeviceProtocolError(f"field {what!r}: not an IPv{family} address")
    return addr


def _fold(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | \
        ipaddress.IPv6Address:
    """An address for comparison across guests: v4-mapped folded to v4, no zone."""
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        return ipaddress.IPv6Address(addr.packed)
    return addr


# --- the host --------------------------------------------------------------------------------

class VmHost:
    """The host side: state, request handlers, QMP plugging, routing. See the module docstring.

    Args:
        guests: the guests to serve (distinct names and sockets).
        directory: the private region directory (``prepare_dir`` creates or checks it).
        quota: bytes of bar one guest may hold.
        total_memory: bytes of bar all guests may hold.
        ports: root ports ``ismrp0..`` each guest was started with.
        port_reserve: the root ports' ``pref64-reserve``: the largest bar a guest can map.
        qmp_timeout: bound on each QMP command.
        unplug_timeout: bound on waiting for ``DEVICE_DELETED``.
        send_timeout: a guest whose link takes no bytes for this long is dropped.
    """

    def __init__(self, guests: list[GuestSpec], directory: str, *, quota: int, total_memory: int,
                 ports: int = 12, port_reserve: int = 256 << 20, qmp_timeout: float = QMP_TIMEOUT,
                 unplug_timeout: float = UNPLUG_TIMEOUT, send_timeout: float = SEND_TIMEOUT) -> None:
        self.dir = os.path.abspath(directory)
        self.quota = quota
        self.total_memory = total_memory
        self.ports = ports
        self.port_reserve = port_reserve
        self.qmp_timeout = qmp_timeout
        self.unplug_timeout = unplug_timeout
        self.send_timeout = send_timeout
        self.guests = {spec.name: _Guest(spec, ports) for spec in guests}
        self.used = 0
        self.regions: dict[int, _Region] = {}     # every region not yet reclaimed
        self.tokens: dict[bytes, _Region] = {}    # live tokens
        self.endpoints: dict[bytes, _Guest] = {}
        self.claims: dict[int, _Claim] = {}
        self._next_region = 0
        self._next_claim = 0
        self._lock = threading.Lock()
        self._stopping = False
        self._pool = concurrent.futures.ThreadPoolExecutor(32, "vmhost-call")
        self._lock_fd = -1
        self._status_sock: socket.socket | None = None
        self._status_path = ""
        self._status_ino = 0
        self._handlers: dict[str, Callable[[_Guest, _GuestLink, dict[str, Any]],
                                           dict[str, Any]]] = {
            op: getattr(self, "_op_" + op) for op in REQUESTS}

    # --- the region directory ---

    def prepare_dir(self) -> None:
        """Create the private region directory, or use an existing one if it is ours.

        An existing directory is used only if it is a 0700 directory of our uid that is empty
        (made for us, e.g. by ``mktemp -d``) or holds a ``.vmhost.lock`` nobody holds (a dead
        vmhost's: its region files, decimal names, are removed).

        Raises:
            SystemExit: the directory is someone else's, unsafe, or in use.
        """
        fix = "remove it or choose another --dir"
        try:
            os.mkdir(self.dir, 0o700)
            fresh = True
        except FileExistsError:
            fresh = False
        except OSError as exc:
            raise SystemExit(f"vmhost: cannot create --dir {self.dir} ({exc.strerror}): choose "
                             "another --dir (on /dev/shm)") from None
        if not fresh:
            st = os.lstat(self.dir)
            mode = stat.S_IMODE(st.st_mode)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or mode & 0o077:
                raise SystemExit(f"vmhost: refusing --dir {self.dir}: it exists and is not a "
                                 f"private directory of uid {os.geteuid()} (uid {st.st_uid}, "
                                 f"mode {mode:o}): {fix}")
            if os.listdir(self.dir) and not os.path.lexists(os.path.join(self.dir, LOCK_NAME)):
                raise SystemExit(f"vmhost: refusing --dir {self.dir}: it holds files and was "
                                 f"not made by vmhost (no {LOCK_NAME}): {fix}")
        try:
            fd = os.open(os.path.join(self.dir, LOCK_NAME),
                         os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise SystemExit(f"vmhost: cannot open {self.dir}/{LOCK_NAME} ({exc.strerror}): "
                             f"{fix}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise SystemExit(f"vmhost: another vmhost is using --dir {self.dir}: stop it or "
                             "choose another --dir") from None
        self._lock_fd = fd
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        stale = [n for n in os.listdir(self.dir) if n.isdigit()]
        for name in stale:
            path = os.path.join(self.dir, name)
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.unlink(path)
        if stale:
            log.info("%s: removed %d region files of a vmhost that exited", self.dir, len(stale))

    # --- starting, stopping ---

    def start(self, connect_timeout: float = 30.0, stop: Callable[[], bool] = lambda: False) -> None:
        """Connect to every guest's QMP and channel sockets (in parallel, each retried until
        ``connect_timeout``) and start serving them.

        Raises:
            SystemExit: a guest could not be reached (the message names it and the fix).
        """
        deadline = time.monotonic() + connect_timeout
        with concurrent.futures.ThreadPoolExecutor(max(1, len(self.guests))) as pool:
            futures = [pool.submit(self._connect, g, deadline, stop) for g in self.guests.values()]
            errors = [str(f.exception()) for f in futures if f.exception() is not None]
        if errors:
            raise SystemExit("vmhost: " + "; ".join(errors))

    def _connect(self, guest: _Guest, deadline: float, stop: Callable[[], bool]) -> None:
        qmp = Qmp(guest.spec.qmp, guest.name, self.qmp_timeout,
                  on_close=lambda: self._gone(guest, "its QMP socket closed (QEMU exited?)"))
        qmp.connect(deadline, stop)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(max(0.1, min(2.0, deadline - time.monotonic())))
                sock.connect(guest.spec.chan)
                break
            except OSError as exc:
                sock.close()
                if time.monotonic() >= deadline or stop():
                    qmp.close()
                    raise DeviceGone(
                        f"guest {guest.name}: cannot connect to its channel socket "
                        f"{guest.spec.chan} ({exc.strerror or exc}): start its QEMU with "
                        f"-chardev socket,id=ism,path={guest.spec.chan},server=on,wait=off and "
                        "-device virtserialport,chardev=ism,name=org.smcish.ism.0") from None
                time.sleep(0.1)
        sock.settimeout(None)
        _set_send_timeout(sock, self.send_timeout)

        def on_request(link: Link, op: str, msg: dict[str, Any]) -> dict[str, Any]:
            assert isinstance(link, _GuestLink)
            return self._on_request(guest, link, op, msg)

        def on_notify(link: Link, op: str, msg: dict[str, Any]) -> None:
            self._on_notify(guest, op, msg)

        link = _GuestLink(sock.detach(), on_request, on_notify,
                          on_close=lambda _link: self._gone(guest, "its channel closed"),
                          name=f"guest {guest.name}")
        link.on_broken = lambda stuck: self._drop(guest, stuck)
        outbox = _Outbox(guest.name, link)
        with self._lock:
            guest.qmp, guest.link, guest.outbox = qmp, link, outbox
            guest.live = True
        outbox.start()
        link.start()
        if qmp.closed:    # QEMU went away while we were connecting to the channel
            self._gone(guest, "its QMP socket closed (QEMU exited?)")
        log.info("guest %s: connected (QMP %s, channel %s)", guest.name, guest.spec.qmp,
                 guest.spec.chan)

    def close(self) -> None:
        """Stop serving: close every link and QMP connection (unplugging nothing: the guests go
        with vmhost), delete the region files and the directory, the status socket."""
        with self._lock:
            self._stopping = True
            guests = list(self.guests.values())
        for guest in guests:
            if guest.outbox is not None:
                guest.outbox.close()
            self._close_link(guest)
            if guest.qmp is not None:
                guest.qmp.close()
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._status_sock is not None:
            self._status_sock.close()
            try:
                if os.stat(self._status_path).st_ino == self._status_ino:
                    os.unlink(self._status_path)
            except OSError:
                pass
        with self._lock:
            self.regions.clear()
            self.tokens.clear()
        if self._lock_fd >= 0:
            try:
                for name in os.listdir(self.dir):
                    if name.isdigit():
                        os.unlink(os.path.join(self.dir, name))
                os.unlink(os.path.join(self.dir, LOCK_NAME))
                os.rmdir(self.dir)
            except OSError as exc:
                log.warning("could not remove %s (%s): remove it by hand", self.dir, exc.strerror)
            os.close(self._lock_fd)
            self._lock_fd = -1

    # --- a guest goes away ---

    def _drop(self, guest: _Guest, stuck: bool) -> None:
        """Give up on a guest whose link could not be written (closed by the gone thread)."""
        if stuck:
            self._gone(guest, f"dropped: it took no bytes of its link for {self.send_timeout:g} s",
                       logging.WARNING)
        else:
            self._gone(guest, "its channel closed")

    def _close_link(self, guest: _Guest) -> None:
        """Close a guest's link exactly once (``Link.close`` closes its fd). The socket is shut
        down first: a write blocked on a guest that does not read holds the link's write lock,
        which ``Link.close`` takes."""
        with self._lock:
            link, done, guest.link_closed = guest.link, guest.link_closed, True
        if link is None or done:
            return
        try:
            with socket.socket(fileno=os.dup(link.fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        link.close()

    def _gone(self, guest: _Guest, why: str, level: int = logging.INFO) -> None:
        """The guest went away: docs/vm.md section 3's rules. Tables at once (this thread);
        closing its sockets and its plugs on a thread of its own."""
        with self._lock:
            if self._stopping or not guest.live:
                return
            guest.live = False
            guest.hello = False
            for ch, side in list(guest.channels.values()):
                if ch.state == "closed":
                    continue
                other = 1 - side
                self._close_channel(ch, notify_a=other == 0 and ch.a_ready,
                                    notify_b=other == 1 and ch.state == "open")
            for claim_id, claim in list(self.claims.items()):
                if guest in (claim.client, claim.server):
                    del self.claims[claim_id]
                    claim.client.claims.discard(claim_id)
            for endpoint in guest.endpoints:
                if self.endpoints.get(endpoint) is guest:
                    del self.endpoints[endpoint]
            guest.endpoints.clear()
            for region in guest.owned.values():
                if not region.dead:
                    region.dead = True
                    self.tokens.pop(region.token, None)
            outbox, guest.outbox = guest.outbox, None
        if outbox is not None:
            outbox.close()
        log.log(level, "guest %s is gone: %s", guest.name, why)
        threading.Thread(target=self._gone_plugs, args=(guest,), name=f"vmhost-gone-{guest.name}",
                         daemon=True).start()

    def _gone_plugs(self, guest: _Guest) -> None:
        """Unplug what a gone guest had plugged if its QMP still answers, else forget it; then
        reclaim what nobody holds any more."""
        self._close_link(guest)
        # wait for its hot-plug operations in flight (each bounded by the QMP timeouts)
        locked = guest.plug_lock.acquire(timeout=4 * (3 * self.qmp_timeout + self.unplug_timeout))
        try:
            qmp = guest.qmp
            if qmp is not None and not qmp.closed and not self._stopping:
                for region_id in list(guest.plugs):
                    try:
                        self._qmp_unplug(guest, region_id)
                        log.info("unplugged region %d from gone guest %s", region_id, guest.name)
                    except IsmError as exc:
                        log.info("guest %s: region %d left to QEMU: %s", guest.name, region_id, exc)
                        if qmp.closed:
                            break
            if qmp is not None:
                qmp.close()
            with self._lock:
                if self._stopping:
                    return
                for plug in list(guest.plugs.values()):
                    self._remove_plug(plug, free_port=False)
                for region in list(guest.owned.values()):
                    self._reclaim(region)
                guest.free_ports = set(range(self.ports))
                guest.bad_ports.clear()
        finally:
            if locked:
                guest.plug_lock.release()

    # --- dispatch ---

    def _on_request(self, guest: _Guest, link: _GuestLink, op: str,
                    msg: dict[str, Any]) -> dict[str, Any]:
        schema = REQUESTS.get(op)
        if schema is None:
            raise DeviceProtocolError(f"unknown request {op[:40]!r}: vmhost serves "
                                      f"{', '.join(REQUESTS)} (docs/vm.md section 3)")
        fields = check(msg, schema)
        with self._lock:
            if not guest.live:
                raise DeviceGone(f"guest {guest.name}'s link is closing")
            if op != "hello" and not guest.hello:
                raise DeviceProtocolError("send hello first: it must be the first request")
        try:
            return self._handlers[op](guest, link, fields)
        except IsmError as exc:
            raise _wire_error(exc) from None

    def _on_notify(self, guest: _Guest, op: str, msg: dict[str, Any]) -> None:
        schema = NOTIFICATIONS.get(op)
        if schema is None:
            raise DeviceProtocolError(f"unknown notification {op[:40]!r}")
        if not guest.hello:
            raise DeviceProtocolError(f"{op} before hello: ignored")
        if op == "data":
            text = msg.get("rec")
            if isinstance(text, str) and len(text) > MAX_RECORD_TEXT:
                self._chan_too_big(guest, msg.get("chan"))
                return
        fields = check(msg, schema)
        if op == "ring":
            self._ring(guest, fields["region"])
        elif op == "data":
            self._data(guest, fields["chan"], msg["rec"])
        else:
            self._close_from(guest, fields["chan"])

    # --- ops: identity ---

    def _op_hello(self, guest: _Guest, link: _GuestLink, f: dict[str, Any]) -> dict[str, Any]:
        if f["version"] != 1:
            raise DeviceProtocolError(f"vmlink version {f['version']} is not spoken here: vmhost "
                                      "speaks version 1; use a matching guest agent")
        with self._lock:
            guest.hello = guest.live
        return {"name": guest.name, "quota": self.quota, "ports": self.ports}

    # --- ops: regions ---

    @contextlib.contextmanager
    def _plug_locked(self, guest: _Guest) -> Iterator[None]:
        """Hold this guest's plug lock (waiting a bounded time): its hot-plug operations run one
        at a time."""
        bound = 3 * self.qmp_timeout + self.unplug_timeout + 5
        if not guest.plug_lock.acquire(timeout=bound):
            raise DeviceGone(f"guest {guest.name}: another hot-plug operation of this guest took "
                             f"over {bound:.0f} s: retry later")
        try:
            yield
        finally:
            guest.plug_lock.release()

    def _take_port(self, guest: _Guest) -> int:
        if not guest.free_ports:
            bad = len(guest.bad_ports)
            raise QuotaExceeded(
                f"guest {guest.name} has all {self.ports} region ports in use"
                f"{f' ({bad} left out of use after QEMU failures)' if bad else ''}"
                ": detach or free a region first, or start the guest with more pcie-root-ports "
                "(ismrpN) and raise vmhost --ports")
        port = min(guest.free_ports)
        guest.free_ports.discard(port)
        return port

    def _op_alloc(self, guest: _Guest, link: _GuestLink, f: dict[str, Any]) -> dict[str, Any]:
        size = f["size"]
        bar = next_pow2(size + REGION_OFFSET)
        if bar > self.port_reserve:
            raise QuotaExceeded(
                f"a region of {size} bytes needs a {bar}-byte BAR but the guests' root ports "
                f"reserve {self.port_reserve} bytes: use regions of at most "
                f"{self.port_reserve - REGION_OFFSET} bytes, or start the guests with a larger "
                "pref64-reserve and raise vmhost --port-reserve")
        with self._plug_locked(guest):
            with self._lock:
                if not guest.live:
                    raise DeviceGone(f"guest {guest.name}'s link is closing")
                if len(guest.owned) >= MAX_ENTRIES:
                    raise QuotaExceeded(f"guest {guest.name} holds {MAX_ENTRIES} regions: free "
                                        "some first")
                if guest.used + bar > self.quota:
                    raise QuotaExceeded(
                        f"vmhost quota exceeded: guest {guest.name} holds {guest.used} of its "
                        f"{self.quota} bytes and asked for {bar} (a {size}-byte region plus its "
                        "4096-byte header, rounded up to a power of two): free regions or raise "
                        "vmhost --quota")
                if self.used + bar > self.total_memory:
                    raise QuotaExceeded(
                        f"vmhost memory exhausted: the guests hold {self.used} of "
                        f"{self.total_memory} bytes and guest {guest.name} asked for {bar}: free "
                        "regions or raise vmhost --total-memory")
                port = self._take_port(guest)
                self._next_region += 1
                region_id = self._next_region
                region = _Region(region_id, guest, size, bar,
                                 os.path.join(self.dir, str(region_id)))
                while region.token in self.tokens:
                    region.token = secrets.token_bytes(16)
                self.regions[region_id] = region
                guest.owned[region_id] = region
                guest.used += bar
                self.used += bar
                plug = _Plug(guest, region, port, readonly=False)
                guest.plugs[region_id] = plug
                region.plugs[guest.name] = plug
            try:
                self._create_file(region)
                with self._lock:
                    region.created = True
                self._plug(guest, region, port, readonly=False)
            except BaseException as exc:
                with self._lock:
                    region.dead = True
                    self._remove_plug(plug, free_port=not isinstance(exc, _PlugFailed)
                                      or exc.clean)
                raise
            with self._lock:
                plug.state = "plugged"
                if guest.live:
                    self.tokens[region.token] = region
                else:
                    region.dead = True   # the gone thread (waiting for the plug lock) reclaims
        return {"region": region_id, "token": region.token, "size": size,
                "offset": REGION_OFFSET, "bar": bar}

    def _create_file(self, region: _Region) -> None:
        header = HEADER_MAGIC + region.token + struct.pack("<QQ", region.size, region.id)
        try:
            fd = os.open(region.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise IsmError(f"vmhost cannot create {region.path} ({exc.strerror}): check --dir") \
                from None
        try:
            try:
                os.posix_fallocate(fd, 0, region.bar)   # fail now, not with SIGBUS in QEMU
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise QuotaExceeded(
                        f"the host has no room for a {region.bar}-byte region in {self.dir} "
                        f"({exc.strerror}): free regions, or lower vmhost --total-memory to what "
                        "that file system holds") from None
                os.ftruncate(fd, region.bar)
            os.pwrite(fd, header, 0)
        except BaseException:
            os.close(fd)
            os.unlink(region.path)
            raise
        os.close(fd)

    def _op_attach(self, guest: _Guest, link: _GuestLink, f: dict[str, Any]) -> dict[str, Any]:
        with self._plug_locked(guest):
            with self._lock:
                if not guest.live:
                    raise DeviceGone(f"guest {guest.name}'s link is closing")
                region = self.tokens.get(f["token"])
                if region is None:
                    raise UnknownToken("no live region has that token (freed, or its owner guest "
                                       "went away): ask the owner for a current one")
                if region.owner is guest:
                    raise PermissionDenied(f"region {region.id} is this guest's own: it is plugged "
                                           "read-write here already (alloc's reply)")
                reply = {"region": region.id, "size": region.size, "offset": REGION_OFFSET,
                         "bar": region.bar}
                if region.id in guest.plugs:
                    return reply    # idempotent per guest
                port = self._take_port(guest)
                plug = _Plug(guest, region, port, readonly=True)
                guest.plugs[region.id] = plug
                region.plugs[guest.name] = plug
            try:
                self._plug(guest, region, port, readonly=True)
            except BaseException as exc:
                with self._lock:
                    self._remove_plug(plug, free_port=not isinstance(exc, _PlugFailed)
                                      or exc.clean)
                raise
            with self._lock:
                plug.state = "plugged"
        return reply

    def _op_detach(self, guest: _Guest, link: _GuestLink, f: dict[str, Any]) -> dict[str, Any]:
        self._unplug_op(guest, f["region"], own=False)
        return {}

    def _op_free(self, guest: _Guest, link: _GuestLink, f: dict[str, Any]) -> dict[str, Any]:
        self._unplug_op(guest, f["region"], own=True)
        return {}

    def _unplug_op(self, guest: _Guest, region_id: int, own: bool) -> None:
        """``detach`` (own=False) or ``free`` (own=True): unplug from the asking guest."""
        with self._plug_locked(guest):
            with self._lock:
                if not guest.live:
                    raise DeviceGone(f"guest {guest.name}'s link is closing")
                plug = guest.plugs.get(region_id)
                if own:
                    region = guest.owned.get(region_id)
                    if region is None:
                        raise UnknownToken(f"region {region_id} is not a region of guest "
                                           f"{guest.name}: nothing to free")
                    if not region.dead:
                        region.dead = True
                        self.tokens.pop(region.token, None)
                    if plug is None:
                        raise UnknownToken(f"region {region_id} is freed already")
                else:
                    if plug is None:
                        raise UnknownToken(f"region {region_id} is not plugged in guest "
                                           f"{guest.name}: nothing to detach")
                    if plug.region.owner is guest:
                        raise PermissionDenied(f"region {region_id} is this guest's own: free it "
                                               "instead of detaching it")
                plug.state = "unplugging"
            try:
                self._qmp_unplug(guest, region_id)
            except IsmError as exc:
                with self._lock:
                    plug.state = "plugged"
                raise DeviceGone(f"unplugging region {region_id} from guest {guest.name} failed: "
                                 f"{exc}: retry {'free' if own else 'detach'} (the region stays "
                                 "plugged until then)") from None
            with self._lock:
                self._remove_plug(plug, free_port=True)
            log.info("unplugged region %d from guest %s (%s)", region_id, guest.name,
                     "freed" if own else "detached")

    def _remove_plug(self, plug: _Plug, free_port: bool) -> None:
        """Forget a plug (under the lock); the port returns to the free set or is left out."""
        guest, region = plug.guest, plug.region
        if guest.plugs.get(region.id) is plug:
            del guest.plugs[region.id]
            if free_port:
                guest.free_ports.add(plug.port)
            else:
                guest.bad_ports.add(plug.port)
        if region.plugs.get(guest.name) is plug:
            del region.plugs[guest.name]
        self._reclaim(region)

    def _reclaim(self, region: _Region) -> None:
        """Delete a dead region nobody has plugged, and uncharge it (under the lock)."""
        if not region.dead or region.plugs or region.reclaimed:
            return
        region.reclaimed = True
        self.regions.pop(region.id, None)
        region.owner.owned.pop(region.id, None)
        region.owner.used -= region.bar
        self.used -= region.bar
        if region.created:
            try:
                os.unlink(region.path)
            except OSError as exc:
                log.warning("could not delete %s (%s)", region.path, exc.strerror)
        log.info("region %d of guest %s reclaimed (%d bytes)", region.id, region.owner.name,
                 region.bar)

    # --- QMP plugging ---

    def _qmp(self, guest: _Guest) -> Qmp:
        if guest.qmp is None:
            raise QmpUnavailable(f"guest {guest.name} has no QMP connection")
        return guest.qmp

    def _plug(self, guest: _Guest, region: _Region, port: int, readonly: bool) -> None:
        """object-add + device_add (docs/vm.md section 2); on failure undo what QEMU did.

        Raises:
            _PlugFailed: with ``clean`` False if QEMU did not confirm the undo.
        """
        qmp = self._qmp(guest)
        device, memdev = f"ismd{region.id}", f"ismm{region.id}"
        qmp.purge_events("DEVICE_DELETED", lambda d: d.get("device") == device)
        what = f"hot-plug of region {region.id} into guest {guest.name} (port ismrp{port})"
        backend: dict[str, Any] = {"qom-type": "memory-backend-file", "id": memdev,
                                   "mem-path": region.path, "size": region.bar, "share": True,
                                   "readonly": readonly}
        try:
            qmp.command("object-add", **backend)
        except QmpError as exc:
            raise _PlugFailed(f"{what} failed: {exc}: check the QEMU can open {self.dir}",
                              clean=True) from None
        except QmpUnavailable as exc:
            raise _PlugFailed(f"{what} failed: {exc}", clean=self._undo(guest, region.id, False)) \
                from None
        try:
            qmp.command("device_add", driver="ivshmem-plain", memdev=memdev, bus=f"ismrp{port}",
                        id=device)
        except QmpError as exc:
            raise _PlugFailed(
                f"{what} failed: {exc}: start the guest with -device pcie-root-port,id=ismrp{port},"
                f"...,pref64-reserve=256M for each of its {self.ports} ports",
                clean=self._undo(guest, region.id, False)) from None
        except QmpUnavailable as exc:
            raise _PlugFailed(f"{what} failed: {exc}", clean=self._undo(guest, region.id, True)) \
                from None
        log.info("plugged region %d (%d bytes, bar %d) into guest %s at ismrp%d, %s", region.id,
                 region.size, region.bar, guest.name, port,
                 "read-only" if readonly else "read-write")

    def _undo(self, guest: _Guest, region_id: int, device: bool) -> bool:
        """Best-effort removal of a half-done plug; True if QEMU confirmed it."""
        try:
            if device:
                self._qmp_unplug(guest, region_id)
            else:
                try:
                    self._qmp(guest).command("object-del", id=f"ismm{region_id}")
                except QmpError as exc:
                    if "not found" not in exc.desc.lower():
                        raise
            return True
        except IsmError as exc:
            log.warning("guest %s: could not undo region %d's hot-plug (%s): its port stays out "
                        "of use", guest.name, region_id, exc)
            return False

    def _qmp_unplug(self, guest: _Guest, region_id: int) -> None:
        """device_del, wait for DEVICE_DELETED (bounded), object-del. A device or object QEMU
        no longer has counts as removed.

        Raises:
            QmpError, QmpUnavailable, DeviceGone: not confirmed (retry later).
        """
        qmp = self._qmp(guest)
        device, memdev = f"ismd{region_id}", f"ismm{region_id}"
        try:
            qmp.command("device_del", id=device)
            wait = True
        except QmpError as exc:
            if exc.qmp_class == "DeviceNotFound" or "not found" in exc.desc.lower():
                wait = False
            elif "in the process of unplug" in exc.desc.lower():
                wait = True
            else:
                raise
        if wait and qmp.wait_event("DEVICE_DELETED", lambda d: d.get("device") == device,
                                   self.unplug_timeout) is None:
            raise DeviceGone(f"guest {guest.name} did not release {device} within "
                             f"{self.unplug_timeout:.0f} s (its kernel has not finished the "
                             "hot-unplug)")
        try:
            qmp.command("object-del", id=memdev)
        except QmpError as exc:
            if "not found" not in exc.desc.lower():
                raise

    # --- doorbells ---

    def _ring(self, guest: _Guest, region_id: int) -> None:
        with self._lock:
            plug = guest.plugs.get(region_id)
            if plug is None or not plug.readonly or plug.state != "plugged":
                log.debug("guest %s: ring of region %d it has not attached: dropped", guest.name,
                          region_id)
                return
            owner = plug.region.owner
            if not owner.live or region_id not in owner.plugs or owner.outbox is None:
                return  # the owner freed it or went away: nobody to wake
            owner.outbox.ring(region_id)

    # --- ops: endpoints and peer channels ---

    def _op_endpoint(self, guest: _Guest, link: _GuestLink, f: dict[str, Any]) -> dict[str, Any]:
        endpoint = f["endpoint_id"]
        if endpoint == ZERO_ID:
            raise DeviceProtocolError("field 'endpoint_id': the zero id names no endpoint")
        with self._lock:
            holder = self.endpoints.get(endpoint)
            if not f["up"]:
                if holder is guest:
                    del self.endpoints[endpoint]
                    guest.endpoints.discard(endpoint)
                return {}
            if holder is guest:
                return {}
            if holder is not None:
                raise PermissionDenied(f"endpoint {endpoint.hex()[:8]}... is another guest's: "
                                       "endpoint ids are random per process; open a new one")
            if len(guest.endpoints) >= MAX_ENTRIES:
                raise QuotaExceeded(f"guest {guest.name} serves {MAX_ENTRIES} endpoints: take "
                                    "some down first")
            self.endpoints[endpoint] = guest
            guest.endpoints.add(endpoint)
        return {}

    def _new_chan(self, guest: _Guest) -> int:
        if len(guest.channels) >= MAX_ENTRIES:
            raise QuotaExceeded(f"guest {guest.name} has {MAX_ENTRIES} peer channels open: close "
                                "some first (or fall back to TCP)")
        guest.next_chan += 1
        return guest.next_chan

    def _op_connect(self, guest: _Guest, link: _GuestLink, f: dict[str, Any]) -> dict[str, Any]:
        source, target = f["from_endpoint"], f["to_endpoint"]
        with self._lock:
            if self.endpoints.get(source) is not guest:
                raise PermissionDenied(f"endpoint {source.hex()[:8]}... is not served in guest "
                                       f"{guest.name}: send endpoint (up) for it first")
            peer = self.endpoints.get(target)
            if peer is None or not peer.live:
                raise DeviceGone(f"no guest serves endpoint {target.hex()[:8]}... (its process "
                                 "exited, or its guest went away): fall back to TCP")
            chan_a = self._new_chan(guest)
            chan_b = self._new_chan(peer)
            ch = _Channel(guest, chan_a, peer, chan_b)
            guest.channels[chan_a] = (ch, 0)
            peer.channels[chan_b] = (ch, 1)
        try:
            reply = self._call(peer, "take", TAKE_TIMEOUT, chan=chan_b, from_endpoint=source,
                               to_endpoint=target, pid=f["pid"], uid=f["uid"], gid=f["gid"])
            rest = {k: v for k, v in reply.items() if k not in ("re", "ok")}
            info = check(reply, _TAKE_REPLY) if rest else {"pid": 0, "uid": 0, "gid": 0}
        except IsmError as exc:
            with self._lock:
                if ch.state != "closed":     # B may have taken it late: tell it
                    self._close_channel(ch, notify_a=False, notify_b=True)
            cls = type(_wire_error(exc))
            raise cls(f"guest {peer.name} did not take the peer channel ({exc}): fall back to "
                      "TCP") from None
        with self._lock:
            if ch.state == "closed":
                if peer.live and peer.outbox is not None:
                    peer.outbox.put("close", {"chan": chan_b})
                raise DeviceGone("the peer channel closed while it was set up: fall back to TCP")
            ch.state = "open"
        link.after_reply(lambda: self._channel_ready(ch))
        return {"chan": chan_a, "pid": info["pid"], "uid": info["uid"], "gid": info["gid"]}

    def _channel_ready(self, ch: _Channel) -> None:
        """A has its connect reply: deliver what B sent meanwhile, then relay directly."""
        a, chan_a = ch.ends[0]
        with self._lock:
            if ch.state == "closed":
                if a.live and a.outbox is not None:
                    a.outbox.put("close", {"chan": chan_a})
                return
            ch.a_ready = True
            pending, ch.pending, ch.pending_bytes = ch.pending, [], 0
            for text in pending:
                if text is None:
                    self._close_channel(ch, notify_a=True, notify_b=False)
                    return
                if not self._forward(ch, 0, text):
                    return

    def _forward(self, ch: _Channel, side: int, text: str) -> bool:
        """Queue a record for ``side`` (under the lock); closes the channel if it piles up."""
        guest, chan = ch.ends[side]
        if guest.outbox is None or guest.outbox.put("data", {"chan": chan, "rec": text},
                                                    len(text), ch, side):
            return True
        log.warning("guest %s does not read peer channel %d (%d bytes waiting): closing it",
                    guest.name, chan, ch.queued[side])
        self._close_channel(ch, notify_a=ch.a_ready, notify_b=True)
        return False

    def _close_channel(self, ch: _Channel, notify_a: bool, notify_b: bool) -> None:
        """Close a channel on both sides (under the lock), telling the sides asked to."""
        ch.state = "closed"
        ch.pending = []
        for side, notify in ((0, notify_a), (1, notify_b)):
            guest, chan = ch.ends[side]
            if guest.channels.get(chan, (None, 0))[0] is ch:
                del guest.channels[chan]
            if notify and guest.live and guest.outbox is not None:
                guest.outbox.put("close", {"chan": chan})

    def _data(self, guest: _Guest, chan: int, text: str) -> None:
        with self._lock:
            entry = guest.channels.get(chan)
            if entry is None:
                return  # closed meanwhile (or never ours): nothing to relay to
            ch, side = entry
            if side == 1 and not ch.a_ready:
                if ch.b_closed:
                    return
                if ch.pending_bytes + len(text) > CHANNEL_BACKLOG:
                    log.warning("guest %s: peer channel %d: %d bytes sent before the other side "
                                "had it: closing it", guest.name, chan, ch.pending_bytes)
                    self._close_channel(ch, notify_a=False, notify_b=True)
                    return
                ch.pending.append(text)
                ch.pending_bytes += len(text)
                return
            if ch.state != "open":
                return
            self._forward(ch, 1 - side, text)

    def _close_from(self, guest: _Guest, chan: int) -> None:
        with self._lock:
            entry = guest.channels.get(chan)
            if entry is None:
                return
            ch, side = entry
            if side == 1 and not ch.a_ready:
                if not ch.b_closed:
                    ch.b_closed = True
                    ch.pending.append(None)
                return
            self._close_channel(ch, notify_a=side == 1, notify_b=side == 0)

    def _chan_too_big(self, guest: _Guest, chan: Any) -> None:
        with self._lock:
            entry = guest.channels.get(chan) if type(chan) is int else None
            if entry is not None:
                ch, side = entry
                self._close_channel(ch, notify_a=ch.a_ready,
                                    notify_b=ch.state == "open" or side == 1)
        raise DeviceProtocolError(f"a peer-channel record over {MAX_RECORD_TEXT} base64 "
                                  "characters: channel closed; split records")

    # --- ops: listener lookups and claims ---

    def _op_find(self, guest: _Guest, link: _GuestLink, f: dict[str, Any]) -> dict[str, Any]:
        _address(f["family"], f["src"], "src")
        _address(f["family"], f["dst"], "dst")
        with self._lock:
            self._claim_room(guest)
            others = [g for g in self.guests.values() if g is not guest and g.live and g.hello]
            self._next_claim += 1
            claim_id = self._next_claim
        # the claim id travels with the question: the server guest's agent needs it to verify
        # the connection it will accept (it is recorded only if exactly one guest matches)
        question = {k: f[k] for k in ("family", "src", "sport", "dst", "dport")}
        question["claim"] = claim_id
        matches: list[tuple[_Guest, dict[str, Any]]] = []
        for other, reply in self._ask_all(others, "match", MATCH_TIMEOUT, question):
            try:
                answer = check(reply, _MATCH_REPLY)
            except DeviceProtocolError as exc:
                log.info("guest %s: malformed match reply ignored: %s", other.name, exc)
                continue
            if answer["found"]:
                matches.append((other, answer))
        if len(matches) != 1:
            return dict(_NOT_FOUND)   # nothing, or ambiguous: stay on TCP
        server, answer = matches[0]
        with self._lock:
            if self.endpoints.get(answer["endpoint_id"]) is not server:
                log.info("guest %s matched with endpoint %s... it does not serve: ignored",
                         server.name, answer["endpoint_id"].hex()[:8])
                return dict(_NOT_FOUND)
            if not guest.live or not server.live:
                return dict(_NOT_FOUND)
            self._claim_room(guest)
            claim = _Claim(claim_id, guest, server, f)
            self.claims[claim.id] = claim
            guest.claims.add(claim.id)
        return {**answer, "found": True, "claim": claim.id}

    def _claim_room(self, guest: _Guest) -> None:
        if len(guest.claims) < MAX_ENTRIES:
            return
        now = time.monotonic()
        for claim_id in list(guest.claims):
            claim = self.claims.get(claim_id)
            if claim is None or now - claim.created > CLAIM_TTL:
                guest.claims.discard(claim_id)
                self.claims.pop(claim_id, None)
        if len(guest.claims) >= MAX_ENTRIES:
            raise QuotaExceeded(f"guest {guest.name} holds {MAX_ENTRIES} unverified claims: "
                                "release the ones it no longer needs")

    def _op_verify(self, guest: _Guest, link: _GuestLink, f: dict[str, Any]) -> dict[str, Any]:
        local = _fold(_address(f["family"], f["local"], "local"))
        peer = _fold(_address(f["family"], f["peer"], "peer"))
        with self._lock:
            claim = self.claims.get(f["claim"])
            if claim is None or claim.server is not guest:
                return {"verified": False}    # not this guest's to spend
            del self.claims[claim.id]
            claim.client.claims.discard(claim.id)
            client = claim.client
            mirrored = (local == _fold(ipaddress.ip_address(claim.dst))
                        and f["lport"] == claim.dport
                        and peer == _fold(ipaddress.ip_address(claim.src))
                        and f["pport"] == claim.sport
                        and f["endpoint_id"] == claim.client_endpoint)
            if not mirrored or not client.live:
                return {"verified": False}
        try:
            reply = self._call(client, "check", CHECK_TIMEOUT, inode=f["inode"],
                               endpoint_id=f["endpoint_id"], family=claim.family, local=claim.src,
                               lport=claim.sport, peer=claim.dst, pport=claim.dport)
            verified: bool = check(reply, _CHECK_REPLY)["verified"]
        except IsmError as exc:
            log.info("guest %s: check of claim %d failed: %s", client.name, claim.id, exc)
            verified = False
        return {"verified": verified}

    def _op_release(self, guest: _Guest, link: _GuestLink, f: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            claim = self.claims.get(f["claim"])
            if claim is not None and guest in (claim.client, claim.server):
                del self.claims[claim.id]
                claim.client.claims.discard(claim.id)
        return {}

    # --- requests to guests ---

    def _call(self, guest: _Guest, op: str, timeout: float, **fields: Any) -> dict[str, Any]:
        """A request to a guest on the shared pool, bounded even if its socket is stuck."""
        link = guest.link
        if link is None or not guest.live:
            raise DeviceGone(f"guest {guest.name} went away")
        try:
            future = self._pool.submit(link.call, op, timeout, **fields)
        except RuntimeError:
            raise DeviceGone("vmhost is stopping") from None
        try:
            return future.result(timeout + 1.0)
        except concurrent.futures.TimeoutError:
            raise DeviceGone(f"guest {guest.name} did not answer {op} within {timeout:.1f} s") \
                from None

    def _ask_all(self, guests: list[_Guest], op: str, timeout: float,
                 fields: dict[str, Any]) -> list[tuple[_Guest, dict[str, Any]]]:
        """The same request to several guests in parallel: the answers that came in time."""
        futures: dict[concurrent.futures.Future[dict[str, Any]], _Guest] = {}
        for guest in guests:
            link = guest.link
            if link is None:
                continue
            try:
                futures[self._pool.submit(link.call, op, timeout, **fields)] = guest
            except RuntimeError:
                break
        done, _ = concurrent.futures.wait(futures, timeout=timeout + 0.5)
        answers = []
        for future, guest in futures.items():
            if future in done and future.exception() is None:
                answers.append((guest, future.result()))
            elif future in done:
                log.info("guest %s: %s failed: %s", guest.name, op, future.exception())
        return answers

    # --- status ---

    def status(self) -> dict[str, Any]:
        """The state as a JSON-able dict (tokens are capabilities: never shown)."""
        with self._lock:
            guests = []
            for g in self.guests.values():
                guests.append({
                    "name": g.name, "live": g.live, "hello": g.hello, "quota_used": g.used,
                    "ports_used": sorted(p.port for p in g.plugs.values()),
                    "ports_out_of_use": sorted(g.bad_ports),
                    "regions_owned": [
                        {"id": r.id, "size": r.size, "bar": r.bar, "live": not r.dead,
                         "plugged_in": sorted(r.plugs)} for r in g.owned.values()],
                    "plugged": [
                        {"region": p.region.id, "owner": p.region.owner.name, "port": p.port,
                         "readonly": p.readonly, "state": p.state, "size": p.region.size,
                         "bar": p.region.bar} for p in g.plugs.values()],
                    "endpoints": len(g.endpoints),
                    "channels": [
                        {"chan": chan, "peer": ch.ends[1 - side][0].name,
                         "peer_chan": ch.ends[1 - side][1], "state": ch.state}
                        for chan, (ch, side) in g.channels.items()],
                    "claims": len(g.claims),
                })
            regions = [{"id": r.id, "owner": r.owner.name, "size": r.size, "bar": r.bar,
                        "live": not r.dead, "file": r.path, "plugged_in": sorted(r.plugs)}
                       for r in self.regions.values()]
            return {
                "kind": "vmhost", "pid": os.getpid(), "dir": self.dir, "quota": self.quota,
                "total_memory": self.total_memory, "used": self.used, "ports": self.ports,
                "port_reserve": self.port_reserve, "guests": guests, "regions": regions,
                "totals": {"guests_live": sum(1 for g in self.guests.values() if g.live),
                           "regions": len(self.regions), "live_tokens": len(self.tokens),
                           "plugged": sum(len(g.plugs) for g in self.guests.values()),
                           "endpoints": len(self.endpoints),
                           "channels": sum(len(g.channels) for g in self.guests.values()) // 2,
                           "claims": len(self.claims), "used": self.used},
            }

    def serve_status(self, path: str) -> None:
        """Answer every connection to the Unix socket ``path`` with the status JSON, then EOF.

        Raises:
            SystemExit: something that is not a stale socket is in the way.
        """
        path = os.path.abspath(path)
        clear_stale_socket(path, socket.SOCK_STREAM, "vmhost", "--status-socket")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(path)
        os.chmod(path, 0o600)
        sock.listen(16)
        self._status_sock, self._status_path = sock, path
        self._status_ino = os.stat(path).st_ino
        threading.Thread(target=self._status_loop, args=(sock,), name="vmhost-status",
                         daemon=True).start()

    def _status_loop(self, sock: socket.socket) -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return    # closed
            try:
                conn.settimeout(5.0)
                conn.sendall(json.dumps(self.status(), sort_keys=True).encode() + b"\n")
            except OSError:
                pass
            finally:
                conn.close()


# --- command line ----------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")


def parse_guest(text: str) -> GuestSpec:
    """``NAME,qmp=PATH,chan=PATH`` -> GuestSpec (paths made absolute)."""
    name, *options = text.split(",")
    if not _NAME.match(name):
        raise argparse.ArgumentTypeError(
            f"guest name {name!r}: use 1-64 letters, digits, '.', '_', '-' "
            "(form: NAME,qmp=/path/qmp.sock,chan=/path/chan.sock)")
    paths: dict[str, str] = {}
    for option in options:
        key, eq, value = option.partition("=")
        if key not in ("qmp", "chan") or not eq or not value or key in paths:
            raise argparse.ArgumentTypeError(
                f"--guest {text!r}: expected NAME,qmp=/path/qmp.sock,chan=/path/chan.sock "
                "(paths without commas)")
        paths[key] = os.path.abspath(value)
    if set(paths) != {"qmp", "chan"}:
        raise argparse.ArgumentTypeError(f"--guest {text!r}: both qmp= and chan= are required")
    return GuestSpec(name, paths["qmp"], paths["chan"])


def _bytes(text: str) -> int:
    from .daemon import parse_bytes
    return parse_bytes(text)


def build_parser() -> argparse.ArgumentParser:
    """The vmhost command line (``serve`` is the default command)."""
    parser = argparse.ArgumentParser(prog="python -m ism_backend.vmhost",
                                     description="smcish ismd guest mode: ISM regions and routing "
                                                 "between QEMU guests (docs/vm.md)")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("serve", help="serve the guests (default)")
    run.add_argument("--guest", type=parse_guest, action="append", required=True,
                     metavar="NAME,qmp=PATH,chan=PATH",
                     help="a guest: its QMP socket and its org.smcish.ism.0 chardev socket "
                          "(repeatable)")
    run.add_argument("--quota", type=_bytes, default=256 << 20,
                     help="bytes of region memory (BAR sizes) one guest may hold (default 256M)")
    run.add_argument("--total-memory", type=_bytes, default=1 << 30,
                     help="bytes of region memory all guests may hold together (default 1G)")
    run.add_argument("--dir", required=True,
                     help="private directory for the region files, created 0700 if missing "
                          "(e.g. /dev/shm/smcish-vmhost-$$; an existing one must be ours, 0700 "
                          "and empty); removed at exit")
    run.add_argument("--ports", type=int, default=12,
                     help="pcie-root-ports ismrp0.. each guest has (default 12)")
    run.add_argument("--port-reserve", type=_bytes, default=256 << 20,
                     help="the root ports' pref64-reserve: the largest BAR (default 256M)")
    run.add_argument("--status-socket", help="Unix socket answering the state as JSON")
    run.add_argument("--connect-timeout", type=float, default=30.0,
                     help="seconds to wait for the guests' sockets at start (default 30)")
    run.add_argument("--qmp-timeout", type=float, default=QMP_TIMEOUT,
                     help=f"bound on each QMP command, seconds (default {QMP_TIMEOUT:g})")
    run.add_argument("--unplug-timeout", type=float, default=UNPLUG_TIMEOUT,
                     help=f"bound on waiting for DEVICE_DELETED, seconds (default "
                          f"{UNPLUG_TIMEOUT:g})")
    run.add_argument("--send-timeout", type=float, default=SEND_TIMEOUT,
                     help="seconds a guest's link may take no bytes before the guest is dropped "
                          f"(default {SEND_TIMEOUT:g})")
    run.add_argument("-v", "--verbose", action="store_true")
    st = sub.add_parser("status", help="print a running vmhost's state as JSON")
    st.add_argument("--status-socket", required=True)
    st.add_argument("--timeout", type=float, default=5.0)
    return parser


def serve(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT/SIGHUP."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="vmhost: %(message)s", stream=sys.stderr)
    names = [g.name for g in args.guest]
    paths = [p for g in args.guest for p in (g.qmp, g.chan)]
    if len(set(names)) != len(names) or len(set(paths)) != len(paths):
        raise SystemExit("vmhost: every --guest needs its own name, QMP socket and channel socket")
    if not 1 <= args.ports <= 256:
        raise SystemExit("vmhost: --ports must be in 1..256")
    stop = [False]
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)

    def on_signal(signum: int, frame: Any) -> None:
        stop[0] = True

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    host = VmHost(args.guest, args.dir, quota=args.quota, total_memory=args.total_memory,
                  ports=args.ports, port_reserve=args.port_reserve, qmp_timeout=args.qmp_timeout,
                  unplug_timeout=args.unplug_timeout, send_timeout=args.send_timeout)
    host.prepare_dir()
    try:
        try:
            host.start(args.connect_timeout, stop=lambda: stop[0])
        except SystemExit:
            if stop[0]:
                return 0     # stopped while the guests were still starting
            raise
        if args.status_socket:
            host.serve_status(args.status_socket)
        log.info("serving %d guests (pid %d, dir %s, quota %d bytes per guest, total %d bytes)",
                 len(names), os.getpid(), host.dir, args.quota, args.total_memory)
        while not stop[0]:
            select.select([wake_r], [], [], 1.0)
            try:
                os.read(wake_r, 64)
            except BlockingIOError:
                pass
    finally:
        host.close()
        log.info("stopped")
    return 0


def status_command(args: argparse.Namespace) -> int:
    """Print a running vmhost's status JSON (pretty)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(args.timeout)
    try:
        sock.connect(args.status_socket)
        chunks = []
        while True:
            data = sock.recv(1 << 16)
            if not data:
                break
            chunks.append(data)
        state = json.loads(b"".join(chunks))
    except (OSError, ValueError) as exc:
        print(f"vmhost status: no answer from {args.status_socket} ({exc}): is vmhost running "
              "with that --status-socket?", file=sys.stderr)
        return 1
    finally:
        sock.close()
    try:
        json.dump(state, sys.stdout, indent=2, sort_keys=True)
        print()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def main(argv: list[str] | None = None) -> int:
    """CLI: ``vmhost [serve] --guest ... `` or ``vmhost status --status-socket PATH``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve", "status", "-h", "--help"):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    if args.command == "status":
        return status_command(args)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
