"""The guest agent of ismd's guest mode: inside a VM, it serves the ismd protocol to the guest's
processes and gets everything that crosses the guest's boundary from the host (docs/vm.md).

``python -m ism_backend.vmguest [serve] [--port /dev/vportNpM] [--socket PATH]`` runs it (root,
in the guest); ``... status [--socket PATH]`` prints its state. Unchanged ``DaemonDevice``
clients use it: its ``hello`` says kind ``"guest"``, and they map regions as PCI BARs. Tests run
it without a VM: ``--link-fd N`` / ``--link-socket PATH`` instead of the port, ``--sysfs-root``
for a fake ``/sys`` (tests/test_vmguest.py).

It is an ``Ismd`` (same socket, same local machinery: endpoint ids, advertisements, local
listener lookups, peer channels brokered between two processes of this guest, status, cleanup on
disconnect) whose other parts go through the host over a ``vmlink.Link`` on the virtio-serial
port ``org.smcish.ism.0``:

- Regions are the host's, even between two processes of this guest: ``alloc`` asks the host,
  which hot-plugs an ivshmem BAR into the guest; the agent finds it by the header at its
  offset 0 under ``/sys/bus/pci/devices`` and hands the process ``resource2`` (O_RDWR) and a
  doorbell eventfd. An attach of a region of this guest is local (``resource2`` O_RDONLY, the
  owner's doorbell); of another guest's, the host plugs it read-only, and the attacher's doorbell
  is an eventfd the agent watches and forwards to the host as ``ring``. The host is told
  ``detach``/``free`` only once no process of this guest maps the BAR any more (an unplugged BAR
  SIGBUSes whoever still maps it): the agent counts attachments and, before telling the host,
  reads ``/proc/<pid>/maps`` of every process it gave the BAR to; a BAR still mapped waits.
- Listener lookups across guests: ``find_remote_listener`` becomes a host ``find`` (the claim
  is kept here, a dup of the client socket, for the host's ``check``); the host's ``match`` asks
  this guest's kernel (sock_diag) whether an advertised listener gets that SYN;
  ``verify_remote_peer`` becomes a host ``verify``.
- Peer channels to endpoints of other guests are socketpairs the agent relays record by record
  as ``data`` notifications; the host's ``take`` hands a local endpoint such a channel.

Threads: the ``ControlServer`` loop runs the ``Ismd`` handlers (under ``_lock``); host requests
run on the link's workers and take the same lock briefly, never the serving thread, so two guests
waiting on each other never deadlock; a process's request that needs the host is answered later
(``DEFERRED``) from a worker pool; one I/O thread moves relay records and doorbells; a supervisor
(re)connects the link. The lock is never held across a link call. When the link ends (the host
went away) cross-guest requests fail with a message saying so, relays close, local work goes on,
and the supervisor says ``hello`` again every second.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import errno
import functools
import json
import logging
import mmap
import os
import resource
import select
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from . import memfd, proto, sockets, vmlink
from .client import GUEST_PORT_NAME, GUEST_SOCKET_PATH, find_guest_port
from .contract import check_read_access
from .control import DEFERRED, ControlConn, ControlServer, HandlerResult, Reply
from .daemon import _NOT_FOUND, Ismd, _endpoint, _inet_stream, _RemoteClaim, bind_listener, status_command
from .errors import DeviceGone, DeviceProtocolError, IsmError, PermissionDenied, QuotaExceeded, UnknownToken
from .policy import AttachRights, check_entries

__all__ = ["BarFinder", "FdTransport", "GuestAgent", "PortTransport", "SocketTransport",
           "Transport", "build_parser", "main"]

log = logging.getLogger("ism_backend.vmguest")

#: Bound on one link request (the host answers at once; a hot-plug is a few ms of QMP).
LINK_TIMEOUT = 2.0
#: Bound on finding a plugged BAR in sysfs (seen within ~0.7 s under TCG, docs/vm.md 2).
BAR_TIMEOUT = 3.0
#: Bound on a whole process request that needs the host (client.GUEST_TIMEOUT is longer).
OP_BUDGET = 6.0
#: Seconds between two attempts to (re)connect to the host.
RETRY_INTERVAL = 1.0
#: Seconds between two checks of a released BAR that some process still maps.
LINGER_INTERVAL = 1.0
#: Largest region the host allocates (docs/vm.md 3: alloc).
MAX_HOST_REGION = (1 << 30) + (1 << 20)
#: A BAR's header page: magic, token, region size, region id (docs/vm.md 2).
HEADER = struct.Struct("<8s16sQQ")
MAGIC = b"ISMREG1\0"
HEADER_PAGE = 4096
IVSHMEM_IDS = ("0x1af4", "0x1110")        # vendor, device of ivshmem-plain
#: Relayed records queued to a process that does not read; then its channel is closed.
MAX_RELAY_QUEUE = 256
#: Peer channels to and from other guests, per link session.
MAX_RELAYS = 4096
#: How long (s) and how many claim ids of the host's ``match`` requests are remembered.
MATCH_TTL = 30.0
MAX_MATCHES = 4096
#: Seconds a closed channel id stays refused (a close may overtake the reply that opens it).
CLOSED_CHAN_TTL = 10.0

NO_HOST = ("no ISM host: ismd guest mode is not running on the host (python -m "
           "ism_backend.vmhost), or it is not linked to this guest yet: fall back to TCP")

_ID = (1, (1 << 53) - 1)
_PID = (0, (1 << 31) - 1)
_UID = (0, (1 << 32) - 2)
_PORT = (1, 65535)
_FAMILY = (4, 6)
_BYTES = (1, 1 << 40)

# Link schemas (vmlink.check kinds), docs/vm.md 3.
_HELLO_REPLY = {"name": "str", "quota": (0, 1 << 62), "ports": (0, 1 << 16)}
_ALLOC_REPLY = {"region": _ID, "token": "id16", "size": (1, MAX_HOST_REGION),
                "offset": (0, 1 << 40), "bar": _BYTES}
_ATTACH_REPLY = {"region": _ID, "size": (1, MAX_HOST_REGION), "offset": (0, 1 << 40),
                 "bar": _BYTES}
_CONNECT_REPLY = {"chan": _ID, "pid": _PID, "uid": _UID, "gid": _UID}
_FIND_REPLY = {"found": "bool", "endpoint_id": "id16", "hub_id": "id16", "pid": _PID,
               "uid": _UID, "claim": (0, (1 << 63) - 1)}
_VERIFY_REPLY = {"verified": "bool"}
_EMPTY: dict[str, Any] = {}
_MATCH = {"family": _FAMILY, "src": "str", "sport": _PORT, "dst": "str", "dport": _PORT}
_MATCH_CLAIM = {**_MATCH, "claim": (1, (1 << 63) - 1)}
_TAKE = {"chan": _ID, "from_endpoint": "id16", "to_endpoint": "id16", "pid": _PID, "uid": _UID,
         "gid": _UID}
_CHECK = {"inode": (1, (1 << 64) - 1), "endpoint_id": "id16", "family": _FAMILY, "local": "str",
          "lport": _PORT, "peer": "str", "pport": _PORT}
_RING = {"region": _ID}
_DATA = {"chan": _ID, "rec": "data"}
_CLOSE = {"chan": _ID}


# --- finding BARs -----------------------------------------------------------------------------

def _read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as fh:
            return fh.read(64).decode("ascii", "replace").strip()
    except OSError:
        return None


class BarFinder:
    """Finds the ivshmem BAR the host plugged for a region, by the header at its offset 0.

    Args:
        sysfs_root: ``/sys`` (tests point it at a tree of their own).
    """

    def __init__(self, sysfs_root: str = "/sys") -> None:
        self.root = os.path.join(sysfs_root, "bus", "pci", "devices")
        # BARs whose unplug was not confirmed (a detach that failed): never taken again for
        # the same region, as they may still vanish under a new mapping. (ident, region id)
        self._retired: collections.OrderedDict[tuple[int, int, int], None] = \
            collections.OrderedDict()
        self._lock = threading.Lock()

    def retire(self, ident: tuple[int, int], region_id: int) -> None:
        """Never hand out this BAR (``(st_dev, st_ino)`` of its resource2) for that region."""
        with self._lock:
            self._retired[(ident[0], ident[1], region_id)] = None
            while len(self._retired) > 256:
                self._retired.popitem(last=False)

    def find(self, token: bytes, region_id: int, size: int, offset: int,
             deadline: float) -> tuple[str, tuple[int, int]]:
        """Poll until the BAR with this header is visible (bounded by ``deadline``).

        Returns:
            (path of its resource2, (st_dev, st_ino) of it).
        Raises:
            DeviceGone: not found in time (says what to check).
        """
        delay = 0.005
        while True:
            hit = self.scan(token, region_id, size, offset)
            if hit is not None:
                return hit
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeviceGone(
                    f"the host plugged region {region_id} but no ivshmem device with its header "
                    f"appeared under {self.root} in time: check the guest's PCIe root ports "
                    "(hot-plug, pref64-reserve large enough for the BAR; docs/vm.md 2); fall "
                    "back to TCP")
            time.sleep(min(delay, left))
            delay = min(delay * 2, 0.05)

    def scan(self, token: bytes, region_id: int, size: int,
             offset: int) -> tuple[str, tuple[int, int]] | None:
        """One pass over the ivshmem devices; the matching BAR or None."""
        try:
            entries = sorted(os.listdir(self.root))
        except OSError:
            return None
        for entry in entries:
            path = os.path.join(self.root, entry)
            if (_read_text(os.path.join(path, "vendor")),
                    _read_text(os.path.join(path, "device"))) != IVSHMEM_IDS:
                continue
            hit = self._probe(path, token, region_id, size, offset)
            if hit is not None:
                return hit
        return None

    def _probe(self, path: str, token: bytes, region_id: int, size: int,
               offset: int) -> tuple[str, tuple[int, int]] | None:
        bar = os.path.join(path, "resource2")
        if not os.path.exists(bar):
            return None                 # BAR2 not assigned (yet, or no room on the port)
        if _read_text(os.path.join(path, "enable")) == "0":
            try:                        # memory decoding on, else the BAR reads as ~0
                with open(os.path.join(path, "enable"), "w") as fh:
                    fh.write("1")
            except OSError:
                pass
        try:
            fd = os.open(bar, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if st.st_size < max(HEADER_PAGE, offset + size):
                return None
            with self._lock:
                if (st.st_dev, st.st_ino, region_id) in self._retired:
                    return None
            # A memory BAR's resource file has no read(): map the header page.
            with mmap.mmap(fd, HEADER_PAGE, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as mem:
                magic, tok, hsize, hid = HEADER.unpack_from(mem)
        except (OSError, ValueError):
            return None
        finally:
            os.close(fd)
        if magic != MAGIC or tok != token or hsize != size or hid != region_id:
            return None
        return bar, (st.st_dev, st.st_ino)


def _maps(pid: int, ident: tuple[int, int]) -> bool | None:
    """Does process ``pid`` map the file ``ident`` (st_dev, st_ino)? None: no such process."""
    major, minor, ino = os.major(ident[0]), os.minor(ident[0]), str(ident[1]).encode()
    try:
        with open(f"/proc/{pid}/maps", "rb") as fh:
            for line in fh:
                parts = line.split(None, 5)
                if len(parts) < 5 or parts[4] != ino:
                    continue
                dev_major, _, dev_minor = parts[3].partition(b":")
                try:
                    if int(dev_major, 16) == major and int(dev_minor, 16) == minor:
                        return True
                except ValueError:
                    continue
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return True                     # cannot tell: assume it does (never unplug under it)
    return False


# --- link transports ------------------------------------------------------------------------

class Transport:
    """Where the link runs. ``open()`` gives a connected blocking stream fd for one session (the
    link then owns it), or None with ``why`` set."""

    why = ""

    def open(self) -> int | None:
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def close(self) -> None:
        """Release what the transport holds (the agent is stopping)."""


class FdTransport(Transport):
    """A connected stream socket handed over by the caller (tests, or a supervisor): one
    session only."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def open(self) -> int | None:
        fd, self._fd = self._fd, None
        if fd is None:
            self.why = "the link fd (--link-fd) ended: restart the agent with a new one"
        return fd

    def describe(self) -> str:
        return "fd"

    def close(self) -> None:
        if self._fd is not None:
            memfd.close_fds((self._fd,))
            self._fd = None


class SocketTransport(Transport):
    """A Unix stream socket to connect to, again for every session."""

    def __init__(self, path: str) -> None:
        self.path = path

    def open(self) -> int | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(LINK_TIMEOUT)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            self.why = f"cannot connect to {self.path} ({exc.strerror or exc})"
            return None
        sock.settimeout(None)
        return sock.detach()

    def describe(self) -> str:
        return f"socket {self.path}"


class PortTransport(Transport):
    """The virtio-serial port (``/dev/vportNpM`` named ``org.smcish.ism.0``).

    The link gets one end of a socketpair; two pump threads move bytes between the other end
    and the port, which is non-blocking: while the host side is not connected, a port's read
    returns EOF and its writes would block for ever (poll says POLLHUP), which a pump notices
    and ends the session instead.

    Args:
        path: the port's device node; None: found by name under ``sysfs_root`` each session.
    """

    def __init__(self, path: str | None = None, sysfs_root: str = "/sys") -> None:
        self.path = path
        self.sysfs_root = sysfs_root
        self._fd = -1
        self._bad = False
        self._stop = threading.Event()
        self._pumps: list[threading.Thread] = []
        self._sock: socket.socket | None = None

    def describe(self) -> str:
        return f"port {self.path or '(by name ' + GUEST_PORT_NAME + ')'}"

    def _end_session(self) -> None:
        self._stop.set()
        for pump in self._pumps:
            pump.join(2.0)
        self._pumps = []
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._bad and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._bad = False

    def open(self) -> int | None:
        self._end_session()
        path = self.path or find_guest_port(self.sysfs_root)
        if path is None:
            self.why = (f"no virtio-serial port named {GUEST_PORT_NAME} in this guest: start "
                        "the VM with it (docs/vm.md 1) or pass --port")
            return None
        if self._fd < 0:
            try:
                self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as exc:
                self.why = f"cannot open {path} ({exc.strerror or exc})"
                return None
        poller = select.poll()
        poller.register(self._fd, select.POLLIN | select.POLLOUT)
        events = 0
        for _, ev in poller.poll(0):
            events |= ev
        if events & select.POLLHUP:
            self.why = f"nobody is connected to the host side of {path} (vmhost not running?)"
            return None
        if events & (select.POLLERR | select.POLLNVAL):
            self._bad = True
            self.why = f"{path} reports an error: reopening it"
            return None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._sock = ours
        self._stop = threading.Event()
        self._pumps = [
            threading.Thread(target=self._pump_in, args=(self._fd, ours, self._stop),
                             name="vmguest-port-in", daemon=True),
            threading.Thread(target=self._pump_out, args=(self._fd, ours, self._stop),
                             name="vmguest-port-out", daemon=True)]
        for pump in self._pumps:
            pump.start()
        return theirs.detach()

    def _finish(self, sock: socket.socket, stop: threading.Event) -> None:
        stop.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)  # the link's reader sees EOF
        except OSError:
            pass

    def _pump_in(self, fd: int, sock: socket.socket, stop: threading.Event) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        try:
            while not stop.is_set():
                if not poller.poll(200):
                    continue
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    log.warning("reading the port failed (%s): reopening it", exc.strerror)
                    self._bad = True
                    return
                if not data:
                    return              # the host side disconnected
                sock.sendall(data)
        except OSError:
            return                      # the link's end is gone
        finally:
            self._finish(sock, stop)

    def _pump_out(self, fd: int, sock: socket.socket, stop: threading.Event) -> None:
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        waiter = select.poll()          # (no socket timeout: _pump_in writes the same socket)
        waiter.register(sock, select.POLLIN)
        try:
            while not stop.is_set():
                if not waiter.poll(200):
                    continue
                data = sock.recv(1 << 16)
                if not data:
                    return              # the link ended on our side
                view = memoryview(data)
                stalled = time.monotonic() + 30.0
                while view:
                    if stop.is_set():
                        return
                    try:
                        view = view[os.write(fd, view):]
                        continue
                    except BlockingIOError:
                        pass
                    except OSError as exc:
                        log.warning("writing the port failed (%s): reopening it", exc.strerror)
                        self._bad = True
                        return
                    for _, ev in poller.poll(200):
                        if ev & select.POLLHUP:
                            return      # the host side disconnected
                    if time.monotonic() > stalled:
                        log.warning("the host has not read the port for 30 s: ending the link")
                        return
        except OSError:
            return
        finally:
            self._finish(sock, stop)

    def close(self) -> None:
        self._end_session()
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


# --- state ----------------------------------------------------------------------------------

class _Session:
    """One link session with the host, from ``hello`` to the link's end. Region ids, channel
    ids and claim ids are the host's, valid within one session."""

    def __init__(self, serial: int) -> None:
        self.serial = serial
        self.link: vmlink.Link | None = None
        self.up = False
        self.ended = False             # _session_ended ran
        self.closed = False            # we closed the link (exactly once: see _close_session)
        self.name = ""
        self.quota = 0
        self.ports = 0
        self.regions: dict[int, _GRegion] = {}           # host region id -> plugged here
        # (family, src, sport, dst, dport) of a positive ``match`` -> (claim id, expiry)
        self.matches: collections.OrderedDict[tuple[int, str, int, str, int], tuple[int, float]] = \
            collections.OrderedDict()
        # I/O thread only:
        self.relays: dict[int, _Relay] = {}
        # channel ids closed here or by the host lately -> until when a late open is refused
        self.closed_chans: collections.OrderedDict[int, float] = collections.OrderedDict()

    def chan_closed(self, chan: int) -> None:
        """(I/O thread.) Remember a closed channel id for a while: a ``close`` can overtake
        the ``connect`` reply that opens it (ids may be reused after that)."""
        self.closed_chans[chan] = time.monotonic() + CLOSED_CHAN_TTL
        self.closed_chans.move_to_end(chan)
        while len(self.closed_chans) > 1024:
            self.closed_chans.popitem(last=False)

    def chan_refused(self, chan: int) -> bool:
        until = self.closed_chans.pop(chan, None)
        return until is not None and until > time.monotonic()

    def call(self, op: str, timeout: float, **fields: Any) -> dict[str, Any]:
        link = self.link
        if link is None or not self.up:
            raise DeviceGone(NO_HOST)
        return link.call(op, timeout, **fields)


class _GRegion:
    """A BAR plugged into this guest: owned by a local process (``owned``) or attached from
    another guest. ``pids``: every process it was handed to (checked before an unplug)."""

    def __init__(self, session: _Session, region_id: int, token: bytes, size: int, offset: int,
                 path: str, ident: tuple[int, int], owned: bool, doorbell: int) -> None:
        self.session = session
        self.id = region_id
        self.token = token
        self.size = size
        self.offset = offset
        self.path = path
        self.ident = ident
        self.owned = owned
        self.doorbell = doorbell       # owned: the owner's eventfd; else the one we watch
        self.owner: ControlConn | None = None
        self.freed = False             # owned: the owner freed it (its token is dead here)
        self.released = False          # the host was (or is being) told; fds closing
        self.attachments: dict[int, ControlConn] = {}
        self.pids: set[int] = set()
        self.rights = AttachRights()

    def state(self) -> str:
        if self.released:
            return "released"
        if not self.session.up:
            return "stale"
        if self.owned:
            return "freed" if self.freed else "live"
        return "attached"


class _GClient:
    """What one connection holds through the host (Ismd's ``_Client`` holds the rest)."""

    __slots__ = ("attachments", "owned", "xclaims")

    def __init__(self) -> None:
        self.owned: dict[bytes, _GRegion] = {}          # token -> region
        self.attachments: dict[int, _GRegion] = {}
        self.xclaims: set[int] = set()


class _XClaim:
    """A client socket whose listener the host found in another guest (a dup we keep until the
    host's ``check``, the process's release, or its disconnect)."""

    __slots__ = ("claim", "conn", "endpoint_id", "inode", "session", "sock")

    def __init__(self, inode: int, sock: socket.socket, conn: ControlConn, endpoint_id: bytes,
                 claim: int, session: _Session) -> None:
        self.inode = inode
        self.sock = sock
        self.conn = conn
        self.endpoint_id = endpoint_id
        self.claim = claim
        self.session = session


class _Relay:
    """Our end of a peer channel to another guest: records in, ``data`` out, and back."""

    __slots__ = ("chan", "events", "outq", "session", "sock")

    def __init__(self, session: _Session, chan: int, sock: socket.socket) -> None:
        self.session = session
        self.chan = chan
        self.sock = sock
        self.outq: collections.deque[bytes] = collections.deque()
        self.events = 0


# --- the I/O thread -------------------------------------------------------------------------

class _IoLoop:
    """One thread with a selector: relay sockets and watched doorbells (callbacks on readiness),
    functions other threads queue (``call_soon``), and a periodic ``tick``."""

    def __init__(self, tick: Callable[[], None], interval: float) -> None:
        self._tick = tick
        self._interval = interval
        self.sel = selectors.DefaultSelector()
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.sel.register(self._wake, selectors.EVENT_READ, None)
        self._calls: collections.deque[Callable[[], None]] = collections.deque()
        # Other threads ring the wake fd: it must never be closed under them (a reused fd
        # number would get our write).
        self._wake_lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="vmguest-io", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the I/O thread (from any thread)."""
        self._calls.append(fn)
        with self._wake_lock:
            if self._wake >= 0:
                memfd.ring(self._wake)

    def stop(self) -> None:
        self._stopping = True
        with self._wake_lock:
            if self._wake >= 0:
                memfd.ring(self._wake)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(2.0)
        while self._calls:               # what was queued still runs (it closes fds)
            self._run_one(self._calls.popleft())
        self.sel.close()
        with self._wake_lock:
            if self._wake >= 0:
                os.close(self._wake)
                self._wake = -1

    @staticmethod
    def _run_one(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:  # the I/O thread must survive a handler bug (logged)
            log.exception("I/O callback failed")

    def _run(self) -> None:
        next_tick = time.monotonic() + self._interval
        while not self._stopping:
            timeout = max(0.0, next_tick - time.monotonic())
            for key, events in self.sel.select(timeout):
                if key.data is None:
                    memfd.drain(self._wake)
                elif not self._stopping:
                    self._run_one(functools.partial(key.data, events))
            while self._calls and not self._stopping:
                self._run_one(self._calls.popleft())
            if time.monotonic() >= next_tick:
                next_tick = time.monotonic() + self._interval
                self._run_one(self._tick)


# --- the agent ------------------------------------------------------------------------------

_GuestOp = Callable[[ControlConn, proto.Request, list[int]], HandlerResult]


class GuestAgent(Ismd):
    """The guest agent: an ``Ismd`` whose regions, cross-guest lookups and cross-guest peer
    channels go through the host (see the module docstring).

    Args:
        transport: where the link to the host runs.
        sysfs_root: where PCI devices are looked for (``/sys``).
        socket_path: for status output.
        allow_uids, allow_gids, max_entries, max_regions (per connection), max_connections: as
            ismd's.
        link_timeout, bar_timeout, op_budget: bounds (seconds) on one link request, on
            finding a BAR, on a whole process request that needs the host.
        retry_interval: seconds between attempts to reach the host.
        linger_interval: seconds between checks of a BAR some process still maps.
        workers: threads serving process requests that need the host.
    """

    def __init__(self, transport: Transport, *, sysfs_root: str = "/sys", socket_path: str = "",
                 allow_uids: Iterable[int] = frozenset(), allow_gids: Iterable[int] = frozenset(),
                 max_entries: int = 4096, max_regions: int = 4096, max_connections: int = 1024,
                 link_timeout: float = LINK_TIMEOUT, bar_timeout: float = BAR_TIMEOUT,
                 op_budget: float = OP_BUDGET, retry_interval: float = RETRY_INTERVAL,
                 linger_interval: float = LINGER_INTERVAL, workers: int = 8) -> None:
        super().__init__(total_memory=1 << 40, quota=1 << 40, allow_uids=allow_uids,
                         allow_gids=allow_gids, max_regions=max_regions, max_entries=max_entries,
                         socket_path=socket_path, max_connections=max_connections)
        self.policy.fix = ("restart the guest agent with --allow-uid {uid} or --allow-gid {gid}")
        self.transport = transport
        self.bars = BarFinder(sysfs_root)
        self.link_timeout = link_timeout
        self.bar_timeout = bar_timeout
        self.op_budget = op_budget
        self.retry_interval = retry_interval
        self._lock = threading.RLock()
        self.session: _Session | None = None
        self._serial = 0
        self._own_netns = sockets.netns_inode()
        self._gclients: dict[ControlConn, _GClient] = {}
        self._live_tokens: dict[bytes, _GRegion] = {}    # regions owned here, not yet freed
        self._held: set[_GRegion] = set()                # every region not yet released
        self._lingering: set[_GRegion] = set()
        self._xclaims: dict[int, _XClaim] = {}           # client socket inode -> claim
        self._token_locks: dict[bytes, list[Any]] = {}   # token -> [Lock, users]
        self._endpoint_ready: dict[bytes, concurrent.futures.Future[None]] = {}
        self._workers = concurrent.futures.ThreadPoolExecutor(workers, "vmguest-op")
        self._ep_queue = concurrent.futures.ThreadPoolExecutor(1, "vmguest-endpoints")
        self._io = _IoLoop(self._tick, linger_interval)
        self._changed = threading.Event()
        self._stopping = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="vmguest-link",
                                            daemon=True)
        self._gops: dict[str, _GuestOp] = {
            "hello": self._g_hello, "alloc": self._g_alloc, "reuse": self._g_reuse,
            "release": self._g_release, "attach": self._g_attach, "detach": self._g_detach,
            "free": self._g_free, "grant": self._g_grant, "revoke": self._g_revoke,
            "find_remote_listener": self._g_find_remote_listener,
            "verify_remote_peer": self._g_verify_remote_peer,
            "release_remote_claim": self._g_release_remote_claim,
            "serve_endpoint": self._g_serve_endpoint,
            "connect_endpoint": self._g_connect_endpoint,
        }

    # --- lifecycle ---

    def start(self, server: ControlServer) -> None:
        """Serve ``server``'s connections and start reaching the host."""
        self.bind(server)
        self._io.start()
        self._supervisor.start()

    def wait_linked(self, timeout: float) -> bool:
        """Wait (bounded) until a session with the host is up."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.session is not None:
                return True
            time.sleep(0.01)
        return self.session is not None

    def close(self) -> None:
        """Stop (after the server closed its connections): end the link, release every fd."""
        self._stopping.set()
        self._changed.set()
        for _ in range(2):   # (again after the supervisor stopped: it may have just linked)
            with self._lock:
                session = self.session
            if session is not None:
                self._close_session(session)
            if self._supervisor.is_alive():
                self._supervisor.join(self.link_timeout + 1.0)
        self._workers.shutdown(wait=False, cancel_futures=True)
        self._ep_queue.shutdown(wait=False, cancel_futures=True)
        self._io.stop()
        with self._lock:
            for region in list(self._held):
                self._close_region_fds_locked(region, now=True)
            self._held.clear()
            for claim in self._xclaims.values():
                claim.sock.close()
            self._xclaims.clear()
        self.transport.close()
        super().close()

    # --- ControlServer handler (serving thread) ---

    def accept(self, conn: ControlConn) -> IsmError | None:
        with self._lock:
            refusal = super().accept(conn)
            if refusal is None:
                self._gclients[conn] = _GClient()
            return refusal

    def handle(self, conn: ControlConn, request: proto.Request, fds: list[int]) -> HandlerResult:
        with self._lock:
            op = self._gops.get(request.op)
            if op is not None:
                return op(conn, request, fds)
            return super().handle(conn, request, fds)

    def disconnect(self, conn: ControlConn) -> None:
        jobs: list[Callable[[], None]] = []
        with self._lock:
            eid = conn.endpoint_id
            was_endpoint = eid is not None and self.endpoints.get(eid) is conn
            super().disconnect(conn)
            g = self._gclients.pop(conn, None)
            if g is not None:
                for token, region in g.owned.items():
                    if self._live_tokens.get(token) is region:
                        del self._live_tokens[token]
                    region.freed = True
                    region.owner = None
                    if self._release_due(region):
                        jobs.append(functools.partial(self._release_job, region))
                for aid, region in g.attachments.items():
                    region.attachments.pop(aid, None)
                    if self._release_due(region):
                        jobs.append(functools.partial(self._release_job, region))
                for inode in list(g.xclaims):
                    claim = self._forget_xclaim(inode)
                    if claim is not None:
                        jobs.append(functools.partial(self._release_claim_job, claim))
            if was_endpoint and eid is not None:
                self._endpoint_ready.pop(eid, None)
        for job in jobs:
            self._submit(job)
        if was_endpoint and eid is not None:
            self._queue_endpoint(eid, False)

    def status(self, viewer: ControlConn | None = None) -> dict[str, Any]:
        with self._lock:
            out = super().status(viewer)
            out["kind"] = "guest"
            out["guest"] = guest = self._guest_status(viewer)
        if "region_list" in guest and len(json.dumps(out, default=str)) > proto.MAX_BODY - 512:
            del guest["region_list"]     # ismd's own lists already fill the record
            guest["truncated"] = out["truncated"] = True
        return out

    # --- helpers ---

    def _submit(self, job: Callable[[], None]) -> None:
        """Run ``job`` on a worker (background: nobody waits for it; failures are logged)."""
        def run() -> None:
            try:
                job()
            except IsmError as exc:
                log.info("background request failed: %s", exc)
            except Exception:  # a worker must survive a bug (logged)
                log.exception("background job failed")
        try:
            self._workers.submit(run)
        except RuntimeError:
            pass  # stopping: the host forgets this guest's state with the link

    def _defer(self, conn: ControlConn, request: proto.Request,
               job: Callable[[], Reply]) -> HandlerResult:
        """Answer ``request`` later, from a worker running ``job`` (it may call the host)."""
        server = self.server
        assert server is not None  # start() bound it before serving
        op = request.op

        def run() -> None:
            try:
                fields, fds = job()
            except DeviceProtocolError as exc:
                # The host (not this connection) sent something wrong: as a DeviceProtocolError
                # the client would drop its connection to us, which is fine.
                server.complete(conn, request.id, op, error=IsmError(str(exc)))
            except IsmError as exc:
                server.complete(conn, request.id, op, error=exc)
            except OSError as exc:  # resource exhaustion: refuse, keep serving
                log.warning("%s failed: %s", op, exc)
                server.complete(conn, request.id, op, error=QuotaExceeded(
                    f"the guest agent could not serve {op} ({exc.strerror or exc}): retry later "
                    "or free resources"))
            except Exception:  # answered as an internal error (logged)
                log.exception("%s failed", op)
                server.complete(conn, request.id, op, error=IsmError(f"internal error in {op}"))
            else:
                server.complete(conn, request.id, op, fields=fields, fds=fds)
        try:
            self._workers.submit(run)
        except RuntimeError:
            raise DeviceGone("the guest agent is stopping: fall back to TCP") from None
        return DEFERRED

    def _session_or_gone(self) -> _Session:
        session = self.session
        if session is None:
            raise DeviceGone(NO_HOST)
        return session

    def _call(self, session: _Session, op: str, deadline: float, schema: dict[str, Any],
              **fields: Any) -> dict[str, Any]:
        """A link request (never with ``_lock`` held), its reply validated against ``schema``."""
        left = deadline - time.monotonic()
        if left <= 0:
            gone = DeviceGone(f"the guest agent's {self.op_budget:g} s bound ran out before "
                              f"asking the host {op}: fall back to TCP")
            gone.timed_out = True
            raise gone
        try:
            reply = session.call(op, min(self.link_timeout, left), **fields)
        except vmlink.LinkClosed:
            raise DeviceGone(NO_HOST) from None
        except DeviceGone as exc:
            if not exc.timed_out:
                raise
            gone = DeviceGone(f"the ISM host did not answer {op} within "
                              f"{min(self.link_timeout, left):.1f} s: fall back to TCP")
            gone.timed_out = True
            raise gone from None
        try:
            return vmlink.check(reply, schema)
        except DeviceProtocolError as exc:
            raise DeviceProtocolError(f"the ISM host's reply to {op} is malformed ({exc}): "
                                      "check that vmhost and this agent are the same version") \
                from None

    def _deadline(self) -> float:
        return time.monotonic() + self.op_budget

    @contextlib.contextmanager
    def _token_lock(self, token: bytes, deadline: float) -> Iterator[None]:
        """Host requests about one token (attach, detach) one at a time: a detach the host has
        not finished must not race an attach that would reuse the BAR it unplugs."""
        with self._lock:
            entry = self._token_locks.get(token)
            if entry is None:
                entry = self._token_locks[token] = [threading.Lock(), 0]
            entry[1] += 1
        lock: threading.Lock = entry[0]
        try:
            if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                gone = DeviceGone("another request about this region is still waiting for the "
                                  "host: fall back to TCP")
                gone.timed_out = True
                raise gone
            try:
                yield
            finally:
                lock.release()
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] <= 0:
                    self._token_locks.pop(token, None)

    def _g_entries(self, conn: ControlConn) -> None:
        client, g = self.clients[conn], self._gclients[conn]
        check_entries(len(client.attachments) + len(client.adverts) + len(client.claims)
                      + len(g.attachments) + len(g.xclaims), self.max_entries,
                      "detach, withdraw or release some (or raise the agent's --max-entries)")

    def _check_geometry(self, op: str, size: int, offset: int, bar: int) -> None:
        if (offset < HEADER_PAGE or offset % HEADER_PAGE or offset + size > bar
                or bar & (bar - 1)):
            raise DeviceProtocolError(
                f"the ISM host's {op} reply has an impossible layout (size {size}, offset "
                f"{offset}, bar {bar}; docs/vm.md 2): check that vmhost and this agent match")

    # --- process ops: identity, status ---

    def _g_hello(self, conn: ControlConn, request: proto.Request, fds: list[int]) -> Reply:
        fields, out = self._op_hello(conn, self.clients[conn], request.fields, fds)
        fields["kind"] = "guest"
        return fields, out

    # --- process ops: regions ---

    def _g_alloc(self, conn: ControlConn, request: proto.Request,
                 fds: list[int]) -> HandlerResult:
        size = request.fields["size"]
        if size > MAX_HOST_REGION:
            raise QuotaExceeded(f"region of {size} bytes exceeds the guest maximum "
                                f"{MAX_HOST_REGION} (docs/vm.md 3)")
        if len(self._gclients[conn].owned) >= self.max_regions:
            raise QuotaExceeded(f"this connection holds {self.max_regions} regions: free some "
                                "(or raise the agent's --max-regions)")
        session = self._session_or_gone()
        return self._defer(conn, request, functools.partial(self._alloc_job, conn, session, size))

    def _alloc_job(self, conn: ControlConn, session: _Session, size: int) -> Reply:
        deadline = self._deadline()
        reply = self._call(session, "alloc", deadline, _ALLOC_REPLY, size=size)
        rid, token, offset, bar = reply["region"], reply["token"], reply["offset"], reply["bar"]
        fd = doorbell = -1
        free_at_host = True
        try:
            if reply["size"] != size:
                raise DeviceProtocolError(f"the ISM host allocated {reply['size']} bytes, asked "
                                          f"{size}")
            self._check_geometry("alloc", size, offset, bar)
            path, ident = self.bars.find(token, rid, size, offset,
                                         min(deadline, time.monotonic() + self.bar_timeout))
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            doorbell = memfd.new_doorbell()
            with self._lock:
                if rid in session.regions:
                    free_at_host = False   # (that id names another region here: never free it)
                    raise DeviceProtocolError(f"the ISM host allocated region {rid} twice: "
                                              "check vmhost")
                if conn not in self._gclients or not session.up:
                    raise DeviceGone("the connection or the host link went away during alloc")
                region = _GRegion(session, rid, token, size, offset, path, ident, True, doorbell)
                out = [fd, os.dup(doorbell)]
                region.owner = conn
                region.pids.add(conn.pid)
                session.regions[rid] = region
                self._held.add(region)
                self._live_tokens[token] = region
                self._gclients[conn].owned[token] = region
        except BaseException:
            memfd.close_fds([x for x in (fd, doorbell) if x >= 0])
            if free_at_host:  # nothing here maps it: the host may unplug it at once
                self._submit(functools.partial(self._forget_at_host, session, "free", rid))
            raise
        return {"token": token, "region": rid, "size": size, "offset": offset}, out

    def _forget_at_host(self, session: _Session, op: str, rid: int) -> None:
        if session.up:
            self._call(session, op, self._deadline(), _EMPTY, region=rid)

    def _g_reuse(self, conn: ControlConn, request: proto.Request, fds: list[int]) -> Reply:
        raise UnknownToken("no freed region of that size is ready for reuse (a guest's regions "
                           "are never pooled: free them with keep=false)")

    def _g_release(self, conn: ControlConn, request: proto.Request, fds: list[int]) -> Reply:
        raise UnknownToken("unknown pooled region (a guest's regions are never pooled)")

    def _g_attach(self, conn: ControlConn, request: proto.Request,
                  fds: list[int]) -> HandlerResult:
        token, access = request.fields["token"], request.fields["access"]
        try:
            check_read_access(access)    # PermissionDenied for "rw"
        except ValueError as exc:
            raise PermissionDenied(str(exc)) from None
        self._g_entries(conn)
        region = self._live_tokens.get(token)
        if region is not None:
            # Owned by a process of this guest: nothing to ask the host, the BAR is here.
            region.rights.check(conn.uid, access)
            ro = os.open(region.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                bell = os.dup(region.doorbell)
            except OSError:
                os.close(ro)
                raise
            region.rights.record()
            aid = self._add_attachment(conn, region)
            return {"attachment": aid, "size": region.size, "offset": region.offset}, [ro, bell]
        session = self._session_or_gone()
        return self._defer(conn, request,
                           functools.partial(self._attach_job, conn, session, token))

    def _add_attachment(self, conn: ControlConn, region: _GRegion) -> int:
        aid = self._id()
        region.attachments[aid] = conn
        region.pids.add(conn.pid)
        self._gclients[conn].attachments[aid] = region
        self._lingering.discard(region)
        return aid

    def _attach_job(self, conn: ControlConn, session: _Session, token: bytes) -> Reply:
        deadline = self._deadline()
        with self._token_lock(token, deadline):
            reply = self._call(session, "attach", deadline, _ATTACH_REPLY, token=token)
            rid, size, offset = reply["region"], reply["size"], reply["offset"]
            self._check_geometry("attach", size, offset, reply["bar"])
            with self._lock:
                region = session.regions.get(rid)
                if region is not None and (region.owned or region.token != token
                                           or region.size != size or region.offset != offset):
                    raise DeviceProtocolError(
                        f"the ISM host answered attach with region {rid}, which this guest holds "
                        "as another region: check vmhost")
            created = region is None
            if region is None:
                try:
                    path, ident = self.bars.find(token, rid, size, offset,
                                                 min(deadline, time.monotonic() + self.bar_timeout))
                    watch = memfd.new_doorbell()
                except BaseException:
                    self._forget_quietly(session, "detach", rid, deadline)
                    raise
                region = _GRegion(session, rid, token, size, offset, path, ident, False, watch)
            ro = bell = -1
            aid = 0
            with self._lock:
                if conn in self._gclients and session.up and not region.released:
                    try:
                        ro = os.open(region.path, os.O_RDONLY | os.O_CLOEXEC)
                        bell = os.dup(region.doorbell)
                    except OSError as exc:
                        log.warning("attach: cannot hand out region %d: %s", rid, exc)
                        memfd.close_fds([x for x in (ro, bell) if x >= 0])
                        ro = bell = -1
                    else:
                        if created:
                            session.regions[rid] = region
                            self._held.add(region)
                            self._io.call_soon(functools.partial(self._watch_io, region))
                        aid = self._add_attachment(conn, region)
            if not aid:
                if created:  # plugged for us and mapped by nobody: unplug it now
                    memfd.close_fds((region.doorbell,))
                    region.doorbell = -1
                    self._forget_quietly(session, "detach", rid, deadline)
                raise DeviceGone("the connection or the host link went away during attach: "
                                 "fall back to TCP")
        return {"attachment": aid, "size": size, "offset": offset}, [ro, bell]

    def _forget_quietly(self, session: _Session, op: str, rid: int, deadline: float) -> None:
        try:
            self._call(session, op, max(deadline, time.monotonic() + self.link_timeout), _EMPTY,
                       region=rid)
        except IsmError as exc:
            log.info("could not tell the host %s of region %d: %s", op, rid, exc)

    def _g_detach(self, conn: ControlConn, request: proto.Request, fds: list[int]) -> Reply:
        aid = request.fields["attachment"]
        region = self._gclients[conn].attachments.pop(aid, None)
        if region is None:
            raise UnknownToken("unknown attachment: already detached")
        region.attachments.pop(aid, None)
        if self._release_due(region):
            self._submit(functools.partial(self._release_job, region))
        return {}, []

    def _g_free(self, conn: ControlConn, request: proto.Request, fds: list[int]) -> Reply:
        token = request.fields["token"]      # keep=true is treated as false: never pooled
        region = self._gclients[conn].owned.pop(token, None)
        if region is None:
            raise UnknownToken("unknown region token (not yours, wrong, or already freed)")
        if self._live_tokens.get(token) is region:
            del self._live_tokens[token]
        region.freed = True
        region.owner = None
        if self._release_due(region):
            self._submit(functools.partial(self._release_job, region))
        return {}, []

    def _owned_live(self, conn: ControlConn, token: bytes) -> _GRegion:
        region = self._live_tokens.get(token)
        if region is None or region.owner is not conn:
            raise UnknownToken("unknown region token (not yours, wrong, or already freed)")
        return region

    def _g_grant(self, conn: ControlConn, request: proto.Request, fds: list[int]) -> Reply:
        f = request.fields
        self._owned_live(conn, f["token"]).rights.grant(f["uid"], f["access"])
        return {}, []

    def _g_revoke(self, conn: ControlConn, request: proto.Request, fds: list[int]) -> Reply:
        f = request.fields
        self._owned_live(conn, f["token"]).rights.revoke(f["uid"])
        return {}, []

    # --- releasing BARs ---

    @staticmethod
    def _release_due(region: _GRegion) -> bool:
        """Nothing of this guest holds the region any more (its mappings are checked next)."""
        return not region.released and not region.attachments and (
            not region.owned or region.freed)

    def _mapped_by(self, region: _GRegion) -> int | None:
        """A process of this guest that still maps the BAR (it was handed to it), or None."""
        with self._lock:
            pids = sorted(region.pids)
        for pid in pids:
            found = _maps(pid, region.ident)
            if found:
                return pid
            if found is None:
                with self._lock:
                    region.pids.discard(pid)
        return None

    def _release_job(self, region: _GRegion) -> None:
        """Tell the host a region is no longer used here (``detach``, or ``free`` for ours),
        once no process maps it; until then it lingers and is checked again every tick."""
        if region.owned:
            self._release(region, self._deadline())
            return
        deadline = self._deadline()
        try:
            with self._token_lock(region.token, deadline):
                self._release(region, deadline)
        except DeviceGone:
            with self._lock:        # busy with an attach: try again at the next tick
                if self._release_due(region):
                    self._lingering.add(region)

    def _release(self, region: _GRegion, deadline: float) -> None:
        pid = self._mapped_by(region)
        with self._lock:
            if not self._release_due(region):
                self._lingering.discard(region)
                return
            if pid is not None:
                if region not in self._lingering:
                    log.info("region %d is released but pid %d still maps it: the host is told "
                             "once it unmapped it", region.id, pid)
                    self._lingering.add(region)
                return
            self._lingering.discard(region)
            region.released = True
            session = region.session
            if session.regions.get(region.id) is region:
                del session.regions[region.id]
            self._held.discard(region)
            self._close_region_fds_locked(region)
            tell = session.up
        if tell:
            op = "free" if region.owned else "detach"
            try:
                self._call(session, op, max(deadline, time.monotonic() + self.link_timeout),
                           _EMPTY, region=region.id)
            except IsmError as exc:
                log.info("could not tell the host %s of region %d: %s", op, region.id, exc)
                if not region.owned:
                    self.bars.retire(region.ident, region.id)

    def _close_region_fds_locked(self, region: _GRegion, now: bool = False) -> None:
        fd, region.doorbell = region.doorbell, -1
        if fd < 0:
            return
        if region.owned or now:
            os.close(fd)            # host rings of it are delivered under the same lock
        else:
            self._io.call_soon(functools.partial(self._unwatch_io, fd))

    def _tick(self) -> None:
        """I/O thread, every linger interval: released BARs still mapped are checked again."""
        with self._lock:
            regions = list(self._lingering)
        for region in regions:
            self._submit(functools.partial(self._release_job, region))

    # --- doorbells (I/O thread) ---

    def _watch_io(self, region: _GRegion) -> None:
        fd = region.doorbell
        if fd < 0:
            return
        self._io.sel.register(fd, selectors.EVENT_READ,
                              functools.partial(self._rung_io, region, fd))

    def _unwatch_io(self, fd: int) -> None:
        try:
            self._io.sel.unregister(fd)
        except (KeyError, ValueError):
            pass
        os.close(fd)

    def _rung_io(self, region: _GRegion, fd: int, events: int) -> None:
        """A local attacher rang the doorbell of another guest's region: forward it."""
        memfd.drain(fd)
        session = region.session
        link = session.link
        if session.up and not region.released and link is not None:
            try:
                link.notify("ring", region=region.id)
            except IsmError:
                pass  # the link ended: its end closes everything

    # --- process ops: listener lookups and claims ---

    def _g_find_remote_listener(self, conn: ControlConn, request: proto.Request,
                                fds: list[int]) -> HandlerResult:
        f = request.fields
        client = self.clients[conn]
        sock = self._socket_from(fds, "find_remote_listener")
        keep = False
        try:
            found = self._match_remote(sock, f["host"], f["port"])  # this guest's namespaces
            if found is not None:
                advert, client_ns, server_ns = found
                inode = sockets.socket_inode(sock)
                if inode in self.remote_claims:
                    self._forget_claim(inode)
                self._entries(client)
                self.remote_claims[inode] = _RemoteClaim(inode, sock, conn, client_ns, server_ns,
                                                         advert.facts.inode)
                client.claims.add(inode)
                keep = True
                return advert.reply(), []
            query = self._find_query(sock, f["host"], f["port"])
            session = self.session
            if query is None or session is None or conn.endpoint_id is None:
                return dict(_NOT_FOUND), []
            self._g_entries(conn)
            deferred = self._defer(conn, request, functools.partial(
                self._find_job, conn, session, sock, query, conn.endpoint_id))
            keep = True                  # the job owns the socket now
            return deferred
        finally:
            if not keep:
                sock.close()

    def _find_query(self, sock: socket.socket, host: str,
                    port: int) -> tuple[int, str, int, str, int] | None:
        """(family, src, sport, dst, dport) to ask the host, or None: the destination is in
        this guest, or not an address, or the socket is in another namespace of this guest
        (its addresses are not the guest's)."""
        try:
            name = sock.getsockname()
            if self._own_netns is not None and sockets.socket_netns(sock) not in (
                    None, self._own_netns):
                return None
            dfam, dst = sockets.normalize_address(host)
            sfam, src = sockets.normalize_address(name[0])
        except (OSError, ValueError):
            return None
        if dfam != sfam or src in ("0.0.0.0", "::") or "%" in src or "%" in dst:
            return None
        try:
            if sockets.diag().is_local(dst):
                return None             # this guest's own address: not another guest's
        except (OSError, ValueError):
            return None
        return (4 if sfam == socket.AF_INET else 6), src, name[1], dst, port

    def _find_job(self, conn: ControlConn, session: _Session, sock: socket.socket,
                  query: tuple[int, str, int, str, int], endpoint_id: bytes) -> Reply:
        keep = False
        try:
            family, src, sport, dst, dport = query
            try:
                reply = self._call(session, "find", self._deadline(), _FIND_REPLY,
                                   family=family, src=src, sport=sport, dst=dst, dport=dport,
                                   endpoint_id=endpoint_id)
            except IsmError as exc:
                log.debug("find failed: %s", exc)
                return dict(_NOT_FOUND), []
            if not reply["found"] or reply["claim"] < 1:
                return dict(_NOT_FOUND), []
            inode = sockets.socket_inode(sock)
            old: _XClaim | None = None
            with self._lock:
                g = self._gclients.get(conn)
                if g is not None and session.up:
                    old = self._forget_xclaim(inode)  # the same socket asked again
                    self._xclaims[inode] = _XClaim(inode, sock, conn, endpoint_id,
                                                   reply["claim"], session)
                    g.xclaims.add(inode)
                    keep = True
            if old is not None:
                self._submit(functools.partial(self._release_claim_job, old))
            if not keep:
                self._submit(functools.partial(self._release_claim_job, _XClaim(
                    inode, sock, conn, endpoint_id, reply["claim"], session)))
                return dict(_NOT_FOUND), []
            return {"found": True, "endpoint_id": reply["endpoint_id"],
                    "hub_id": reply["hub_id"], "pid": reply["pid"], "uid": reply["uid"]}, []
        finally:
            if not keep:
                sock.close()

    def _forget_xclaim(self, inode: int) -> _XClaim | None:
        """(Under ``_lock``.) Drop a cross-guest claim; returns it (for a host ``release``)."""
        claim = self._xclaims.pop(inode, None)
        if claim is None:
            return None
        g = self._gclients.get(claim.conn)
        if g is not None:
            g.xclaims.discard(inode)
        claim.sock.close()
        return claim

    def _release_claim_job(self, claim: _XClaim) -> None:
        if claim.session.up:
            self._call(claim.session, "release", self._deadline(), _EMPTY, claim=claim.claim)

    def _accepted_tuple(self, sock: socket.socket) -> tuple[int, str, int, str, int] | None:
        """(family, local, lport, peer, pport) of an accepted socket of this guest's namespace."""
        try:
            if not _inet_stream(sock):
                return None
            if self._own_netns is not None and sockets.socket_netns(sock) not in (
                    None, self._own_netns):
                return None
            local, lport = _endpoint(sock.getsockname())
            peer, pport = _endpoint(sock.getpeername())
            family = sockets.normalize_address(local)[0]
        except (OSError, ValueError):
            return None
        return (4 if family == socket.AF_INET else 6), local, lport, peer, pport

    def _g_verify_remote_peer(self, conn: ControlConn, request: proto.Request,
                              fds: list[int]) -> HandlerResult:
        f = request.fields
        sock = self._socket_from(fds, "verify_remote_peer")
        keep = False
        try:
            claim = self.remote_claims.get(f["inode"])      # a client of this guest
            if (claim is not None and claim.conn.endpoint_id == f["endpoint_id"]
                    and self._verify(claim, sock)):
                self._forget_claim(claim.inode)
                return {"verified": True}, []
            session = self.session
            tup = self._accepted_tuple(sock)
            if session is None or tup is None:
                return {"verified": False}, []
            family, local, lport, peer, pport = tup
            claim_id = self._take_match(session, (family, peer, pport, local, lport))
            if claim_id is None:
                log.debug("verify: the host named no claim for %s:%d -> %s:%d", peer, pport,
                          local, lport)
                return {"verified": False}, []
            deferred = self._defer(conn, request, functools.partial(
                self._verify_job, session, sock, claim_id, f["inode"], f["endpoint_id"], tup))
            keep = True                  # the job owns the socket now
            return deferred
        finally:
            if not keep:
                sock.close()

    @staticmethod
    def _take_match(session: _Session, key: tuple[int, str, int, str, int]) -> int | None:
        entry = session.matches.pop(key, None)
        if entry is None or entry[1] < time.monotonic():
            return None
        return entry[0]

    def _verify_job(self, session: _Session, sock: socket.socket, claim_id: int, inode: int,
                    endpoint_id: bytes, tup: tuple[int, str, int, str, int]) -> Reply:
        family, local, lport, peer, pport = tup
        try:
            reply = self._call(session, "verify", self._deadline(), _VERIFY_REPLY, claim=claim_id,
                               inode=inode, endpoint_id=endpoint_id, family=family, local=local,
                               lport=lport, peer=peer, pport=pport)
        except IsmError as exc:
            log.debug("verify failed: %s", exc)
            return {"verified": False}, []
        finally:
            sock.close()
        return {"verified": reply["verified"]}, []

    def _g_release_remote_claim(self, conn: ControlConn, request: proto.Request,
                                fds: list[int]) -> Reply:
        inode = request.fields["inode"]
        if inode in self.clients[conn].claims:
            self._forget_claim(inode)
        if inode in self._gclients[conn].xclaims:
            claim = self._forget_xclaim(inode)
            if claim is not None:
                self._submit(functools.partial(self._release_claim_job, claim))
        return {}, []

    # --- process ops: endpoints and peer channels ---

    def _g_serve_endpoint(self, conn: ControlConn, request: proto.Request,
                          fds: list[int]) -> Reply:
        g = self._gclients[conn]
        if g.owned or g.attachments or g.xclaims:
            raise IsmError("an endpoint channel must be a connection of its own: open another")
        out = self._op_serve_endpoint(conn, self.clients[conn], request.fields, fds)
        assert conn.endpoint_id is not None  # _op_serve_endpoint checked it
        self._queue_endpoint(conn.endpoint_id, True)
        return out

    def _queue_endpoint(self, endpoint_id: bytes, up: bool) -> None:
        """Tell the host (in order, on one thread) that a local endpoint came or went."""
        try:
            fut = self._ep_queue.submit(self._endpoint_job, endpoint_id, up)
        except RuntimeError:
            return  # stopping
        if up:
            with self._lock:
                self._endpoint_ready[endpoint_id] = fut

    def _endpoint_job(self, endpoint_id: bytes, up: bool) -> None:
        session = self.session
        if session is None:
            return  # registered at the next hello
        try:
            self._call(session, "endpoint", self._deadline(), _EMPTY, endpoint_id=endpoint_id,
                       up=up)
        except DeviceGone as exc:   # the link ended: a new session registers what is left
            log.debug("endpoint %s... %s not registered: %s", endpoint_id.hex()[:8],
                      "up" if up else "down", exc)
        except IsmError as exc:
            log.warning("the host refused endpoint %s... %s: %s", endpoint_id.hex()[:8],
                        "up" if up else "down", exc)

    def _g_connect_endpoint(self, conn: ControlConn, request: proto.Request,
                            fds: list[int]) -> HandlerResult:
        target_id = request.fields["endpoint_id"]
        target = self.endpoints.get(target_id)
        if target is not None and not target.closed:
            return self._op_connect_endpoint(conn, self.clients[conn], request.fields, fds)
        requester = self._endpoint_of(conn, "connect_endpoint")
        if self.session is None:
            raise DeviceGone(f"no process of this guest serves endpoint {target_id.hex()[:8]}..., "
                             f"and {NO_HOST}")
        session = self.session
        return self._defer(conn, request, functools.partial(
            self._connect_job, conn, session, requester, target_id))

    def _connect_job(self, conn: ControlConn, session: _Session, requester: bytes,
                     target_id: bytes) -> Reply:
        deadline = self._deadline()
        with self._lock:
            ready = self._endpoint_ready.get(requester)
        if ready is not None:  # the host must know our endpoint before it accepts `connect`
            with contextlib.suppress(Exception):
                ready.result(max(0.0, deadline - time.monotonic()))
        if len(session.relays) >= MAX_RELAYS:
            raise QuotaExceeded(f"this guest has {MAX_RELAYS} peer channels to other guests: "
                                "close some")
        reply = self._call(session, "connect", deadline, _CONNECT_REPLY, from_endpoint=requester,
                           to_endpoint=target_id, pid=conn.pid, uid=conn.uid, gid=conn.gid)
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        ours.setblocking(False)
        self._io.call_soon(functools.partial(self._relay_open_io, session, reply["chan"], ours))
        return {"pid": reply["pid"], "uid": reply["uid"], "gid": reply["gid"]}, [theirs.detach()]

    # --- the link: host requests (link workers) and notifications (link reader) ---

    def _on_request(self, session: _Session, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        if op == "match":
            return self._host_match(session, fields)
        if op == "check":
            return self._host_check(session, fields)
        if op == "take":
            return self._host_take(session, fields)
        raise DeviceProtocolError(f"{op[:32]!r} is not a request the guest agent serves "
                                  "(match, check, take: docs/vm.md 3)")

    def _host_match(self, session: _Session, fields: dict[str, Any]) -> dict[str, Any]:
        """Does an advertised listener of this guest get a SYN from src:sport to dst:dport?"""
        with_claim = "claim" in fields
        f = vmlink.check(fields, _MATCH_CLAIM if with_claim else _MATCH)
        try:
            sfam, src = sockets.normalize_address(f["src"])
            dfam, dst = sockets.normalize_address(f["dst"])
        except ValueError:
            raise DeviceProtocolError("match: src and dst must be address literals") from None
        if sfam != dfam or (f["family"] == 4 and sfam != socket.AF_INET):
            return dict(_NOT_FOUND)
        try:
            diag = sockets.diag()
            if not diag.is_local(dst):
                return dict(_NOT_FOUND)
            hit = diag.lookup(sfam, (dst, f["dport"]), (src, f["sport"]))
        except (OSError, ValueError):
            return dict(_NOT_FOUND)
        if hit is None or hit.state != sockets.TCP_LISTEN:
            return dict(_NOT_FOUND)
        with self._lock:
            advert = self._sole(hit.inode)
            if advert is None or advert.facts.netns not in (None, self._own_netns):
                return dict(_NOT_FOUND)
            if with_claim:
                key = (4 if sfam == socket.AF_INET else 6, src, f["sport"], dst, f["dport"])
                session.matches[key] = (f["claim"], time.monotonic() + MATCH_TTL)
                session.matches.move_to_end(key)
                while len(session.matches) > MAX_MATCHES:
                    session.matches.popitem(last=False)
            return advert.reply()

    def _host_check(self, session: _Session, fields: dict[str, Any]) -> dict[str, Any]:
        """Is the claim of this endpoint for socket ``inode`` live, with that 4-tuple?"""
        f = vmlink.check(fields, _CHECK)
        try:
            want_local = (sockets.normalize_address(f["local"])[1], f["lport"])
            want_peer = (sockets.normalize_address(f["peer"])[1], f["pport"])
        except ValueError:
            return {"verified": False}
        with self._lock:
            claim = self._xclaims.get(f["inode"])
            if (claim is None or claim.session is not session
                    or claim.endpoint_id != f["endpoint_id"]):
                return {"verified": False}
            try:
                ok = (_endpoint(claim.sock.getsockname()) == want_local
                      and _endpoint(claim.sock.getpeername()) == want_peer)
            except (OSError, ValueError):
                ok = False
            if ok:
                self._forget_xclaim(f["inode"])  # spent (the host forgets it too)
        return {"verified": ok}

    def _host_take(self, session: _Session, fields: dict[str, Any]) -> dict[str, Any]:
        """Hand a local endpoint a peer channel from another guest's endpoint."""
        f = vmlink.check(fields, _TAKE)
        server = self.server
        with self._lock:
            target = self.endpoints.get(f["to_endpoint"])
            if target is None or target.closed or server is None:
                raise DeviceGone(f"no process of this guest serves endpoint "
                                 f"{f['to_endpoint'].hex()[:8]}... (it exited)")
        if len(session.relays) >= MAX_RELAYS:
            raise QuotaExceeded(f"this guest has {MAX_RELAYS} peer channels to other guests")
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        ours.setblocking(False)
        self._io.call_soon(functools.partial(self._relay_open_io, session, f["chan"], ours))
        server.call_soon(functools.partial(self._send_take_peer, target, theirs.detach(), f))
        # (docs/vm.md says {}: the taker's credentials let the host answer `connect` with them,
        # as ismd's connect_endpoint does locally.)
        return {"pid": target.pid, "uid": target.uid, "gid": target.gid}

    def _send_take_peer(self, target: ControlConn, fd: int, f: dict[str, Any]) -> None:
        """Serving thread: ``take_peer`` on the endpoint channel (the fd is handed over)."""
        server = self.server
        if server is None:
            os.close(fd)
            return
        try:
            server.send_request(target, "take_peer", [fd], endpoint_id=f["from_endpoint"],
                                pid=f["pid"], uid=f["uid"], gid=f["gid"])
        except ValueError as exc:  # (the fd was closed: the relay sees EOF and says close)
            log.info("take_peer not sent: %s", exc)

    def _on_notify(self, session: _Session, op: str, fields: dict[str, Any]) -> None:
        if op == "ring":
            rid = vmlink.check(fields, _RING)["region"]
            with self._lock:
                region = session.regions.get(rid)
                if (region is not None and region.owned and not region.released
                        and region.doorbell >= 0):
                    memfd.ring(region.doorbell)
        elif op == "data":
            f = vmlink.check(fields, _DATA)
            if len(f["rec"]) > proto.MAX_RECORD or not f["rec"]:
                self._io.call_soon(functools.partial(self._relay_close_io, session, f["chan"],
                                                     True))
                raise DeviceProtocolError(f"data record of {len(f['rec'])} bytes: channel closed")
            self._io.call_soon(functools.partial(self._relay_push_io, session, f["chan"],
                                                 f["rec"]))
        elif op == "close":
            chan = vmlink.check(fields, _CLOSE)["chan"]
            self._io.call_soon(functools.partial(self._relay_close_io, session, chan, False))
        else:
            raise DeviceProtocolError(f"unknown notification {op[:32]!r} (ring, data, close)")

    # --- relays (I/O thread) ---

    def _relay_open_io(self, session: _Session, chan: int, sock: socket.socket) -> None:
        if not session.up or chan in session.relays or session.chan_refused(chan):
            if chan in session.relays:
                log.warning("the host reused channel id %d: refusing the second one", chan)
            sock.close()                 # the process's end sees EOF
            return
        relay = session.relays[chan] = _Relay(session, chan, sock)
        self._relay_update_io(relay)

    def _relay_update_io(self, relay: _Relay) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if relay.outq else 0)
        if events == relay.events:
            return
        if relay.events:
            self._io.sel.modify(relay.sock, events, functools.partial(self._relay_ready_io, relay))
        else:
            self._io.sel.register(relay.sock, events,
                                  functools.partial(self._relay_ready_io, relay))
        relay.events = events

    def _relay_ready_io(self, relay: _Relay, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self._relay_flush_io(relay)
        if not events & selectors.EVENT_READ or relay.session.relays.get(relay.chan) is not relay:
            return
        link = relay.session.link
        for _ in range(32):
            try:
                record, fds, truncated = memfd.recv_msg(relay.sock, proto.MAX_RECORD)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._relay_end_io(relay, tell=True)
                return
            if fds or truncated or not record:
                memfd.close_fds(fds)     # EOF, or what a peer channel never carries
                self._relay_end_io(relay, tell=True)
                return
            if link is None or not relay.session.up:
                self._relay_end_io(relay, tell=False)
                return
            try:
                link.notify("data", chan=relay.chan, rec=vmlink.b64(record))
            except (IsmError, ValueError):
                self._relay_end_io(relay, tell=False)
                return

    def _relay_push_io(self, session: _Session, chan: int, record: bytes) -> None:
        relay = session.relays.get(chan)
        if relay is None:
            return                       # closed here already (our close is on its way)
        if len(relay.outq) >= MAX_RELAY_QUEUE:
            log.info("channel %d: the process does not read, closing it", chan)
            self._relay_end_io(relay, tell=True)
            return
        relay.outq.append(record)
        self._relay_flush_io(relay)

    def _relay_flush_io(self, relay: _Relay) -> None:
        while relay.outq:
            try:
                relay.sock.send(relay.outq[0], socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._relay_end_io(relay, tell=True)
                return
            relay.outq.popleft()
        if relay.session.relays.get(relay.chan) is relay:
            self._relay_update_io(relay)

    def _relay_close_io(self, session: _Session, chan: int, tell: bool) -> None:
        relay = session.relays.get(chan)
        if relay is None:
            # Not open yet (a close overtaking our connect's reply): refuse it when it comes.
            session.chan_closed(chan)
            return
        self._relay_flush_io(relay)      # what already arrived is delivered, if it fits
        if session.relays.get(chan) is relay:
            self._relay_end_io(relay, tell=tell)

    def _relay_end_io(self, relay: _Relay, tell: bool) -> None:
        session = relay.session
        if session.relays.get(relay.chan) is not relay:
            return
        del session.relays[relay.chan]
        if relay.events:
            try:
                self._io.sel.unregister(relay.sock)
            except (KeyError, ValueError):
                pass
        relay.sock.close()
        link = session.link
        if tell and session.up and link is not None:
            try:
                link.notify("close", chan=relay.chan)
            except IsmError:
                pass

    def _relays_drop_io(self, session: _Session) -> None:
        for relay in list(session.relays.values()):
            self._relay_end_io(relay, tell=False)

    # --- the link's life ---

    def _supervise(self) -> None:
        failures = 0
        last = ""
        while not self._stopping.is_set():
            if self.session is None:
                why = self._connect_once()
                if why is None:
                    failures = 0
                    last = ""
                else:
                    failures += 1
                    if failures == 1 or why != last or failures % 60 == 0:
                        log.warning("not linked to the ISM host: %s (retrying every %g s%s)",
                                    why, self.retry_interval,
                                    f", {failures} attempts" if failures > 1 else "")
                    last = why
            self._changed.wait(self.retry_interval)
            self._changed.clear()

    def _connect_once(self) -> str | None:
        """One attempt: a session whose ``hello`` the host answered; else why not."""
        try:
            fd = self.transport.open()
        except OSError as exc:
            return f"{self.transport.describe()}: {exc.strerror or exc}"
        if fd is None:
            return self.transport.why
        self._serial += 1
        session = _Session(self._serial)
        link = vmlink.Link(fd, lambda _l, op, f: self._on_request(session, op, f),
                           lambda _l, op, f: self._on_notify(session, op, f),
                           lambda _l: self._session_ended(session), name="vmguest-link")
        session.link = link
        link.start()
        try:
            info = vmlink.check(link.call("hello", self.link_timeout, version=vmlink.VERSION),
                                _HELLO_REPLY)
        except IsmError as exc:
            self._close_session(session)
            return f"hello failed: {exc}"
        with self._lock:
            if link.closed:
                return "the link ended right after hello"
            session.up = True
            session.name, session.quota, session.ports = info["name"], info["quota"], info["ports"]
            self.session = session
            endpoints = [eid for eid, conn in self.endpoints.items() if not conn.closed]
        for eid in endpoints:
            self._queue_endpoint(eid, True)
        log.info("linked to the ISM host as guest %r (quota %d bytes, %d ports, %s)",
                 session.name, session.quota, session.ports, self.transport.describe())
        return None

    def _close_session(self, session: _Session) -> None:
        """End a session from our side. ``Link.close`` must run once only (a second one
        would close the fd number again, by then maybe someone else's), and it does not run
        ``on_close``: the session's end is handled here."""
        with self._lock:
            if session.closed:
                return
            session.closed = True
        if session.link is not None:
            session.link.close()
        self._session_ended(session)

    def _session_ended(self, session: _Session) -> None:
        """The link ended (link reader thread, or ``_close_session``): everything that crossed
        it is dropped."""
        with self._lock:
            if session.ended:
                return
            session.ended = True
            was_up = session.up
            session.up = False
            if self.session is session:
                self.session = None
            for inode, claim in list(self._xclaims.items()):
                if claim.session is session:
                    self._forget_xclaim(inode)
            session.matches.clear()
            # The host forgets what it plugged here; the BARs stay until QEMU goes: local
            # bookkeeping goes on (freeing and detaching are then local only, and a lingering
            # BAR's fds are closed here once unmapped).
        self._io.call_soon(functools.partial(self._relays_drop_io, session))
        self._close_session(session)     # (the link's fd: vmlink closes it only in close())
        self._changed.set()
        if was_up and not self._stopping.is_set():
            log.warning("the link to the ISM host ended: cross-guest requests fail until it is "
                        "back (retrying every %g s)", self.retry_interval)

    # --- status ---

    def _guest_status(self, viewer: ControlConn | None) -> dict[str, Any]:
        session = self.session
        held = list(self._held)
        out: dict[str, Any] = {
            "link": "up" if session is not None else "down",
            "transport": self.transport.describe(),
            "sessions": self._serial,
            "host": ({"name": session.name, "quota": session.quota, "ports": session.ports}
                     if session is not None else None),
            "regions": {
                "owned": sum(1 for r in held if r.owned),
                "attached": sum(1 for r in held if not r.owned),
                "stale": sum(1 for r in held if not r.session.up),
                "lingering": len(self._lingering)},
            "attachments": sum(len(r.attachments) for r in held),
            "channels": len(session.relays) if session is not None else 0,
            "claims": len(self._xclaims),
            "matches": len(session.matches) if session is not None else 0,
            "truncated": False,
        }
        full = viewer is None or viewer.uid in (0, os.geteuid())
        if full:
            rows = [{"region": r.id, "state": r.state(), "size": r.size, "owned": r.owned,
                     "attachments": len(r.attachments), "pids": sorted(r.pids)[:8],
                     "bar": os.path.basename(os.path.dirname(r.path))} for r in held]
            out["region_list"], out["truncated"] = proto.fit_list(rows, 1000)
        return out


# --- process entry points ------------------------------------------------------------------

def _transport(args: argparse.Namespace) -> Transport:
    if args.link_fd is not None:
        return FdTransport(args.link_fd)
    if args.link_socket:
        return SocketTransport(args.link_socket)
    return PortTransport(args.port, args.sysfs_root)


def serve(args: argparse.Namespace) -> int:
    """``vmguest serve``: bind the socket, link to the host, serve until a signal."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="smcish-guest: %(message)s", stream=sys.stderr)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    path = os.path.abspath(args.socket)
    listener = bind_listener(path, args.socket_mode)
    listener_ino = os.stat(path).st_ino
    agent = GuestAgent(_transport(args), sysfs_root=args.sysfs_root, socket_path=path,
                       allow_uids=set(args.allow_uid), allow_gids=set(args.allow_gid),
                       max_entries=args.max_entries, max_regions=args.max_regions,
                       link_timeout=args.link_timeout, bar_timeout=args.bar_timeout)
    server = ControlServer(listener, agent)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: None)
    agent.start(server)
    log.info("serving %s (pid %d), linking to the host through %s", path, os.getpid(),
             agent.transport.describe())
    try:
        server.serve(wake_r)
    finally:
        try:
            if os.stat(path).st_ino == listener_ino:
                os.unlink(path)
        except OSError:
            pass
        server.close()
        agent.close()
        log.info("stopped")
    return 0


def _uint(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The guest agent's command line."""
    parser = argparse.ArgumentParser(prog="python -m ism_backend.vmguest",
                                     description="smcish guest agent (ismd guest mode, in a VM)")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("serve", help="run the agent (default)")
    run.add_argument("--socket", default=GUEST_SOCKET_PATH,
                     help=f"ismd socket to serve (default {GUEST_SOCKET_PATH}, where processes "
                          "of a guest look by default)")
    link = run.add_mutually_exclusive_group()
    link.add_argument("--port", help=f"the virtio-serial port's device node (default: the port "
                                     f"named {GUEST_PORT_NAME}, found in sysfs)")
    link.add_argument("--link-fd", type=_uint, help="a connected stream socket to the host "
                                                    "(tests; one session)")
    link.add_argument("--link-socket", help="a Unix stream socket to connect to the host "
                                            "through (tests, reconnects)")
    run.add_argument("--sysfs-root", default="/sys",
                     help="where PCI devices and virtio ports are looked for (tests)")
    run.add_argument("--allow-uid", type=_uint, action="append", default=[],
                     help="uid allowed to connect (repeatable; root always is)")
    run.add_argument("--allow-gid", type=_uint, action="append", default=[],
                     help="primary gid allowed to connect (repeatable)")
    run.add_argument("--max-entries", type=_uint, default=4096,
                     help="attachments + advertisements + claims per connection")
    run.add_argument("--max-regions", type=_uint, default=4096, help="regions per connection")
    run.add_argument("--link-timeout", type=float, default=LINK_TIMEOUT,
                     help=f"bound on one request to the host (default {LINK_TIMEOUT:g} s)")
    run.add_argument("--bar-timeout", type=float, default=BAR_TIMEOUT,
                     help=f"bound on finding a plugged BAR (default {BAR_TIMEOUT:g} s)")
    run.add_argument("--socket-mode", type=lambda s: int(s, 8), default=0o666,
                     help="socket file mode, octal (default 666: the uid policy decides)")
    run.add_argument("-v", "--verbose", action="store_true")
    st = sub.add_parser("status", help="print the agent's state as JSON")
    st.add_argument("--socket", default=GUEST_SOCKET_PATH)
    st.add_argument("--timeout", type=float, default=2.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI: ``vmguest [serve] [options]`` or ``vmguest status [--socket PATH]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve", "status", "-h", "--help"):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    if args.command == "status":
        return status_command(args)
    try:
        return serve(args)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EADDRINUSE, errno.ENAMETOOLONG):
            raise SystemExit(f"smcish-guest: cannot serve {args.socket}: {exc.strerror}") from None
        raise


if __name__ == "__main__":
    sys.exit(main())
