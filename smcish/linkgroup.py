"""Link groups: one shared-memory region pair per pair of event loops, and its connections' slots.

Why this shape (docs/design.md section 2): v1 gave every connection its own pair of regions, so
every connection paid device round trips, two memfds and two eventfds. Like SMC's link group,
connections between the same two *hubs* (one hub per event loop and device) now share one group:
each side's extents (device regions, written only by their owner, mapped read-only by the peer),
one doorbell per direction, and a notification queue of slot indices. A connection takes a slot
(two 512-byte headers) and a ring block per side; nothing per connection touches the device.

Threads: every object here is used on its hub's loop thread only. The device's endpoint thread
serves the peer's requests (group_open, extent_add, ...) and hands them over with
``call_soon_threadsafe``, waiting a bounded time for the loop; blocking device calls made on our
own behalf run in the device thread pool. Nothing here runs from a finaliser or GC callback:
groups, slots and rings are released by explicit calls (close, connection_lost, the maintenance
tick), never by garbage collection.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import concurrent.futures.thread  # (imported now: at EMFILE a lazy import fails)
import errno
import functools
import heapq
import logging
import os
import resource
import secrets
import socket
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import ism_backend
from ism_backend import sockets

from . import clc
from . import ring as _ring
from .alloc import Block, BuddyAllocator
from .stats import group_closed as _group_closed

log = logging.getLogger("smcish")
R = clc.DeclineReason

GROUP_VERSION = 1
MAINTENANCE_S = 1.0              # maintenance tick while a hub has groups
EXTENT_IDLE_S = 10.0             # an empty extent (other than 0) is returned after this long
GROUP_IDLE_S = 60.0              # a client group without connections is closed after this long
QUARANTINE_S = 10.0              # an abandoned slot the server may have seen is reused only after this
OPEN_FAILURE_S = 2.0             # after a failed group_open, fall back at once for this long
MAX_GROUPS_PER_HUB = 1024        # server groups a hub accepts (each costs an extent 0 on our side)
MAX_GROUPS_PER_PEER = 8          # server groups one peer endpoint may open with a hub
_LISTENER_CACHE_MAX = 4096      # listener inodes whose advertiser the device told us
LISTENER_CACHE_S = 1.0         # how long a find_listener answer is reused (see group_serving)
HANDOVER_TIMEOUT = 2.0           # endpoint thread -> loop hand-over bound
_HANDOVER_GUEST = 5.0            # the same on a guest (docs/vm.md 5)
_MAX_BACKOFF = 10                # a missed group poll skips up to 2**10 - 1 later chances
_TAKE_MAX = 4096


def ext0_size(max_slots: int, heap: int) -> int:
    """Bytes of an extent 0 with ``max_slots`` headers and a ``heap`` of ring blocks."""
    return _ring.heap0(max_slots) + heap


# Defaults per device kind: (max_slots, extent 0 heap bytes). ismd charges quotas by region size,
# so its groups start smaller (docs/design.md 2.2).
# A guest's regions are PCI BARs (powers of two) with a 4 KiB header page before the region
# (docs/vm.md 2): its sizes are a power of two less that page, so nothing is rounded up twice.
_GEOMETRY = {"embedded": (16384, (16 << 20) - _ring.heap0(16384)),
             "daemon": (2048, (4 << 20) - _ring.heap0(2048)),
             "guest": (2048, (4 << 20) - _ring.heap0(2048) - 4096)}
#: Bytes a device of each geometry adds in front of a region (the guest's BAR header page).
_REGION_HEADER = {"guest": 4096}
#: Seconds a first connection waits for its link group to open, at least (each side's extent 0
#: is a PCI hot-plug into a guest: 0.2-1 s each under emulation, docs/vm.md 5); else the
#: handshake timeout.
_OPEN_WAIT = {"guest": 8.0}
#: The group poll budget in microseconds at least, unless SMCISH_POLL_US says otherwise: a
#: doorbell between guests crosses two agents and the host (~5 ms under TCG, docs/vm.md 5),
#: so a guest's hub polls for the next message long enough to keep a conversation off them.
_POLL_FLOOR_US = {"guest": 10_000.0}


def first_extent_size(kind: str) -> int:
    """Bytes of the first extent a new link group allocates on a device of ``kind`` (each side)."""
    return ext0_size(*_GEOMETRY.get(kind, _GEOMETRY["embedded"]))


_EXTENT_MIN = 16 << 20
_EXTENT_MAX = 64 << 20


# --------------------------------------------------------------------------- device threads

_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def device_pool() -> concurrent.futures.ThreadPoolExecutor:
    """Threads for device calls that may wait on a peer (group open, extents): never on the loop."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=8, thread_name_prefix="smcish-device")
    return _pool


def in_pool(fn: Callable[..., Any], *args: Any) -> None:
    """Run ``fn(*args)`` in the device pool, or here if the interpreter is shutting down."""
    try:
        device_pool().submit(_quiet, fn, *args)
    except RuntimeError:
        _quiet(fn, *args)


def _quiet(fn: Callable[..., Any], *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001 - the device may be gone; memory goes with the process
        log.debug("smcish: device clean-up failed: %r", exc)


# --------------------------------------------------------------------------- registries

_reg_lock = threading.Lock()
# Weak: a hub lives as long as its loop references it (through _hub_for and its readers), so a
# loop dropped without close() takes its hub, groups and transports with it, and an unclosed
# transport warns as the loop's own would.
_hubs: weakref.WeakValueDictionary[bytes, Hub] = weakref.WeakValueDictionary()
# (group id, side): both sides of a group share its id, and one process may hold both.
_groups: weakref.WeakValueDictionary[tuple[bytes, str], LinkGroup] = weakref.WeakValueDictionary()
_LOOP_ATTR = "_smcish_hubs"                          # loop attribute: {device: hub}
_handled_devices: weakref.WeakSet[Any] = weakref.WeakSet()


def _after_fork() -> None:
    global _pool, _pool_lock, _reg_lock
    _pool = None
    _pool_lock = threading.Lock()
    _reg_lock = threading.Lock()
    _hubs.clear()
    _groups.clear()


os.register_at_fork(after_in_child=_after_fork)


def error_reason(exc: BaseException, default: R = R.ATTACH_FAILED) -> R:
    """The decline reason a device or OS error stands for."""
    if isinstance(exc, ism_backend.QuotaExceeded):
        return R.QUOTA
    if isinstance(exc, ism_backend.NoDevice):
        return R.NO_DEVICE
    if isinstance(exc, OSError) and exc.errno in (24, 23):       # EMFILE, ENFILE
        return R.NO_FD
    if isinstance(exc, (MemoryError,)) or (isinstance(exc, OSError) and exc.errno == 12):
        return R.NO_MEMORY
    return default


GROUP_FDS = 8                   # about what a link group holds open on each side


def check_fd_headroom(server: bool) -> None:
    """Raise EMFILE (-> NO_FD, TCP at once) if a new link group would leave this process short
    of file descriptors: groups cost about GROUP_FDS each. A server keeps a reserve for the TCP
    connections plain asyncio would have accepted (an eighth of the soft limit, at least 16); a
    client only needs the group's own fds."""
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        return
    if soft == resource.RLIM_INFINITY or soft > 1 << 20:
        return
    try:
        used = len(os.listdir("/proc/self/fd")) - 1      # (less the fd listdir itself used)
    except OSError:
        return
    reserve = max(16, soft // 8) if server else 0
    if soft - used < GROUP_FDS + reserve:
        raise OSError(errno.EMFILE, f"smcish: {soft - used} file descriptors left of {soft}: "
                                    "no new link group (the connection stays TCP)")


def live_hubs() -> list[Hub]:
    with _reg_lock:
        return list(_hubs.values())


_last_sweep = [0.0]


def _give_back_at_close(loop: Any) -> None:
    """Wrap ``loop.close`` (on the instance) so that closing the loop gives back its hubs' idle
    link groups first, through the peer and the device, while the loop can still run callbacks.

    Without it a loop closed and then dropped (what asyncio.run() does) takes its hubs to the
    garbage collector before any sweep sees the loop closed, and their groups' regions stayed
    allocated and attached for the life of the process (docs/reliability.md, finding 17).
    Groups that still carry a connection the application left open are not touched: its
    transports end as plain asyncio's would (ResourceWarning when collected), and the sweep
    tears the rest down if the loop object lives on.
    """
    orig_close = loop.close

    def close() -> None:
        if not loop.is_running() and not loop.is_closed():
            for hub in list((getattr(loop, _LOOP_ATTR, None) or {}).values()):
                try:
                    hub.give_back_idle()
                except Exception as exc:  # noqa: BLE001 - closing the loop must not fail
                    log.debug("smcish: giving back link groups at loop close failed: %r", exc)
        orig_close()

    try:
        loop.close = close
    except (AttributeError, TypeError):  # pragma: no cover - a loop class without a __dict__
        pass


def sweep_hubs() -> None:
    """Tear down hubs whose loop was closed (ordinary entry points call this; the sweep itself
    runs at most every 0.1 s)."""
    now = time.monotonic()
    if now - _last_sweep[0] < 0.1:
        return
    _last_sweep[0] = now
    with _reg_lock:
        dead = [hub for hub in _hubs.values() if hub.loop.is_closed()]
    for hub in dead:
        hub.close()


class _EndpointHandler:
    """Serves the peer ops of docs/design.md section 5 for every hub of this process.

    Runs on the device's endpoint thread: it may block (bounded) on device calls, and hands the
    group state changes to the owning hub's loop.
    """

    def handle(self, peer: Any, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        if op == "group_open":
            with _reg_lock:
                hub = _hubs.get(fields["hub_id"])
            if hub is None or hub.closed:
                raise ism_backend.UnknownToken("no such smcish hub (its event loop closed?)")
            return hub.serve_group_open(peer, fields)
        with _reg_lock:
            group = _groups.get((fields["group_id"], fields["side"]))
        if group is None:
            if op in ("group_close", "extent_remove"):
                return {}
            raise ism_backend.UnknownToken("no such link group")
        if group.peer_endpoint != peer.endpoint_id:
            raise ism_backend.PermissionDenied("this link group belongs to another peer")
        if op == "extent_add":
            return group.serve_extent_add(fields)
        if op == "extent_remove":
            group.hub.call_threadsafe(group.peer_extent_removed, fields["index"])
            return {}
        if op == "group_close":
            group.hub.call_threadsafe(group.peer_closed)
            return {}
        raise ism_backend.IsmError(f"{op} is not a link-group op")

    def peer_gone(self, peer: Any) -> None:
        with _reg_lock:
            groups = [g for g in _groups.values() if g.peer_endpoint == peer.endpoint_id]
        for group in groups:
            group.hub.call_threadsafe(group.peer_closed)


_HANDLER = _EndpointHandler()


# --------------------------------------------------------------------------- hub

class Hub:
    """One event loop's link groups on one device: dispatch, polls, maintenance, listeners."""

    def __init__(self, loop: Any, device: Any) -> None:
        self.loop = loop
        self.device = device
        self.id = secrets.token_bytes(16)
        kind = getattr(device, "geometry", device.kind)
        kind = kind if kind in _GEOMETRY else "embedded"
        self.max_slots, self.ext0_heap = _GEOMETRY[kind]
        self.region_header = _REGION_HEADER.get(kind, 0)
        self.open_wait = _OPEN_WAIT.get(kind, 0.0)
        # An emulated guest's loop can be busy for seconds (a peer op waits to be handed over
        # to it): within the peer's request bound (8 s on a guest), not the usual 2 s.
        self.handover_timeout = _HANDOVER_GUEST if kind == "guest" else HANDOVER_TIMEOUT
        self.poll_floor_us = (0.0 if os.environ.get("SMCISH_POLL_US")
                              else _POLL_FLOOR_US.get(kind, 0.0))
        # Between guests a peer's death never reaches its TCP connections (a killed VM sends
        # no FIN nor RST): the device channel closing is the only news, so it ends them (after
        # delivering what the peer published). On one kernel the TCP connection tells, and a
        # device hiccup (ismd restarted) must not end connections that still work.
        self.peer_death_ends_connections = kind == "guest"
        self.client_groups: dict[tuple[bytes, bytes | None], LinkGroup] = {}
        self._listener_owner: dict[int, tuple[bytes, bytes, float]] = {}  # inode -> (endpoint, hub, until)
        self.server_groups: dict[bytes, LinkGroup] = {}
        self.listeners: set[int] = set()
        self.closed = False
        self._opening: dict[tuple[bytes, bytes], Any] = {}
        self._open_failed: dict[tuple[bytes, bytes], tuple[float, R]] = {}
        self._timer: Any = None
        with _reg_lock:
            _hubs[self.id] = self
        if device not in _handled_devices:
            device.set_endpoint_handler(_HANDLER)
            _handled_devices.add(device)

    @classmethod
    def get(cls, loop: Any, device: Any) -> Hub:
        """The hub of ``loop`` on ``device``, created on first use."""
        # On the loop itself (not a WeakKeyDictionary, whose values would keep the loop alive
        # through hub.loop): a loop dropped without close() is collected with its hub.
        per_loop = getattr(loop, _LOOP_ATTR, None)
        if per_loop is None:
            per_loop = {}
            setattr(loop, _LOOP_ATTR, per_loop)
            _give_back_at_close(loop)
        hub = per_loop.get(device)
        if hub is None or hub.closed:
            sweep_hubs()
            hub = per_loop[device] = cls(loop, device)
        return hub

    def call_threadsafe(self, fn: Callable[..., Any], *args: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:       # loop closed
            pass

    def run_on_loop(self, fn: Callable[[], Any]) -> Any:
        """From another thread: run ``fn`` on the loop and wait (bounded) for its result."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def run() -> None:
            if box.get("abandoned"):
                return
            try:
                box["result"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed back to the waiting thread
                box["error"] = exc
            done.set()

        self.call_threadsafe(run)
        if not done.wait(self.handover_timeout):
            box["abandoned"] = True
            raise ism_backend.DeviceGone("the peer's event loop did not answer in time")
        if "error" in box:
            raise box["error"]
        return box.get("result")

    # ------------------------------------------------------------------ listeners
    # (The ring layer can publish a hub's listener inodes in its groups' shared memory; v2 does
    # not: a client must not take a peer's word for which sockets it serves, see group_serving.)
    def add_listener(self, inode: int) -> None:
        self.listeners.add(inode)

    def remove_listener(self, inode: int) -> None:
        self.listeners.discard(inode)

    def group_serving(self, inode: int) -> LinkGroup | None:
        """The live client group toward the hub that the *device* said serves listener
        ``inode`` (an answer of ``find_listener`` remembered by ``remember_listener``).

        The listener table a server hub publishes in its group's shared memory is not trusted
        for this: a hostile server could list the inode of a socket it does not hold and so
        capture our connections to it. Only the device knows who advertised a socket (ismd reads
        it from the socket passed to it). An inode names one live socket (sock_diag only ever
        returns live ones, and inode numbers are not reused before 2^32 sockets), so the answer
        stays true while the oracle keeps returning that inode, except for who else serves it:
        a second hub advertising the same socket (a pre-fork server's workers) makes it shared,
        so an answer is remembered for ``LISTENER_CACHE_S`` only.
        """
        owner = self._listener_owner.get(inode)
        if owner is None:
            return None
        if owner[2] < time.monotonic():
            del self._listener_owner[inode]
            return None
        group = self.client_groups.get(owner[:2])
        if group is not None and group.usable():
            return group
        return None

    def remember_listener(self, inode: int, advert: Any) -> None:
        """``find_listener(inode)`` answered ``advert``: later connections to it skip the device."""
        if len(self._listener_owner) >= _LISTENER_CACHE_MAX:
            self._listener_owner.clear()
        self._listener_owner[inode] = (advert.endpoint_id, advert.hub_id,
                                       time.monotonic() + LISTENER_CACHE_S)

    # ------------------------------------------------------------------ client groups
    async def group_for(self, advert: Any) -> LinkGroup:
        """The client group toward ``advert``'s hub, opened on first use (device round trips).

        Raises:
            GroupUnavailable: with the decline reason (quota, no memory, device trouble, ...).
        """
        key = (advert.endpoint_id, advert.hub_id)
        group = self.client_groups.get(key)
        if group is not None and group.usable():
            return group
        failed = self._open_failed.get(key)
        if failed is not None and time.monotonic() < failed[0]:
            raise GroupUnavailable(failed[1], "link group set-up failed moments ago")
        pending = self._opening.get(key)
        if pending is None:
            try:
                task = self.loop.run_in_executor(device_pool(), self._open_client_blocking, advert)
            except Exception as exc:  # noqa: BLE001 - no thread (EMFILE, shutdown...): TCP now
                reason = error_reason(exc, R.INTERNAL)
                self._open_failed[key] = (time.monotonic() + OPEN_FAILURE_S, reason)
                raise GroupUnavailable(reason, f"link group set-up failed: {exc}") from None
            pending = self._opening[key] = self.loop.create_future()
            task.add_done_callback(lambda fut, key=key, advert=advert: self._opened(key, advert, fut))
        return await asyncio.shield(pending)

    def _open_client_blocking(self, advert: Any) -> tuple[Any, ...]:
        device = self.device
        check_fd_headroom(server=False)
        group_id = secrets.token_bytes(16)
        mine = device.alloc(ext0_size(self.max_slots, self.ext0_heap))
        try:
            reply = device.peer_request(
                advert.endpoint_id, "group_open", group_id=group_id, hub_id=advert.hub_id,
                token=mine.token, size=mine.size, max_slots=self.max_slots, version=GROUP_VERSION)
            max_slots = reply["max_slots"]
            if not (_ring.MIN_SLOTS <= max_slots <= self.max_slots and max_slots & (max_slots - 1) == 0):
                raise ism_backend.DeviceProtocolError(f"peer chose max_slots {max_slots}")
            peer = device.attach(reply["token"], advert.endpoint_id)
        except BaseException:
            in_pool(device.free, mine)
            raise
        if peer.size < _ring.heap0(max_slots) or peer.size != reply["size"]:
            in_pool(device.detach, peer)
            in_pool(device.free, mine)
            raise ism_backend.DeviceProtocolError("peer extent 0 is smaller than announced")
        return group_id, mine, peer, max_slots

    def _opened(self, key: tuple[bytes, bytes], advert: Any, fut: Any) -> None:
        pending = self._opening.pop(key)
        if fut.cancelled() or fut.exception() is not None:
            exc = fut.exception() if not fut.cancelled() else ConnectionError("cancelled")
            reason = error_reason(exc)
            log.debug("smcish: link group to %s failed: %r", advert.endpoint_id.hex()[:8], exc)
            self._open_failed[key] = (time.monotonic() + OPEN_FAILURE_S, reason)
            if not pending.done():
                pending.set_exception(GroupUnavailable(reason, f"link group set-up failed: {exc}"))
            return
        group_id, mine, peer, max_slots = fut.result()
        if self.closed:
            in_pool(self.device.detach, peer)
            in_pool(self.device.free, mine)
            pending.set_exception(GroupUnavailable(R.INTERNAL, "hub closed"))
            return
        try:
            group = LinkGroup(self, "client", group_id, advert.endpoint_id, advert.hub_id,
                              advert.uid, advert.pid, mine, peer, max_slots)
        except Exception as exc:  # noqa: BLE001 - a broken peer extent: no group
            in_pool(self.device.detach, peer)
            in_pool(self.device.free, mine)
            pending.set_exception(GroupUnavailable(R.ATTACH_FAILED, f"link group set-up failed: {exc}"))
            return
        self.client_groups[key] = group
        self._open_failed.pop(key, None)
        pending.set_result(group)

    # ------------------------------------------------------------------ server groups
    def serve_group_open(self, peer: Any, fields: dict[str, Any]) -> dict[str, Any]:
        """Endpoint thread: a client hub opens a group with us (attach, alloc, install on the loop)."""
        if fields["version"] != GROUP_VERSION:
            raise ism_backend.IsmError(f"link group version {fields['version']} is not {GROUP_VERSION}: "
                                       "upgrade smcish on both sides")
        with _reg_lock:
            mine_count = len(self.server_groups)
            per_peer = sum(1 for g in self.server_groups.values() if g.peer_endpoint == peer.endpoint_id)
        check_fd_headroom(server=True)
        if mine_count >= MAX_GROUPS_PER_HUB or per_peer >= MAX_GROUPS_PER_PEER:
            raise ism_backend.QuotaExceeded("too many link groups on this hub: connections stay TCP")
        max_slots = min(fields["max_slots"], self.max_slots)
        if max_slots < _ring.MIN_SLOTS or max_slots & (max_slots - 1):
            raise ism_backend.IsmError(f"bad max_slots {fields['max_slots']}")
        device = self.device
        theirs = device.attach(fields["token"], peer.endpoint_id)
        try:
            if theirs.size != fields["size"] or theirs.size < _ring.heap0(max_slots):
                raise ism_backend.DeviceProtocolError("client extent 0 is smaller than announced")
            mine = device.alloc(ext0_size(max_slots, self.ext0_heap if max_slots == self.max_slots
                                          else _EXTENT_MIN))
        except BaseException:
            _quiet(device.detach, theirs)
            raise

        def install() -> None:
            if self.closed:
                raise ism_backend.UnknownToken("hub closed")
            group = LinkGroup(self, "server", fields["group_id"], peer.endpoint_id, None,
                              peer.uid, peer.pid, mine, theirs, max_slots)
            self.server_groups[group.id] = group

        try:
            self.run_on_loop(install)
        except BaseException:
            _quiet(device.detach, theirs)
            _quiet(device.free, mine)
            raise
        return {"token": mine.token, "size": mine.size, "max_slots": max_slots}

    def find_claim(self, peer_addr: tuple[Any, ...], local_addr: tuple[Any, ...]
                   ) -> tuple[LinkGroup, int, Any] | None:
        """Server, at accept: a client claim in one of our groups matching this 4-tuple exactly.

        Several claims may name the same 4-tuple (a peer may post forged ones, in its own group
        or ours): then the kernel says which socket is really at the other end, and the claim
        naming that socket's inode wins (the caller still verifies it); else the first.
        """
        if not self.server_groups:
            return None
        port = peer_addr[1]
        found = []
        for group in self.server_groups.values():
            if group.dying:
                continue
            for slot in group.group.find_claims(port):
                setup = group.group.read_peer_setup(slot)
                if (setup.phase in (clc.PHASE_CLAIMED, clc.PHASE_OPTIMISTIC) and setup.cport == port
                        and setup.sport == local_addr[1]
                        and _addr_bytes(peer_addr[0]) == setup.caddr
                        and _addr_bytes(local_addr[0]) == setup.saddr):
                    found.append((group, slot, setup))
        if len(found) <= 1:
            return found[0] if found else None
        try:
            family = socket.AF_INET6 if len(peer_addr) == 4 else socket.AF_INET
            hit = sockets.diag().lookup(family, (peer_addr[0], peer_addr[1]),
                                        (local_addr[0], local_addr[1]))
        except OSError:
            hit = None
        if hit is not None and hit.inode:
            for entry in found:
                if entry[2].sock_ino == hit.inode:
                    return entry
        return found[0]

    # ------------------------------------------------------------------ maintenance
    def ensure_timer(self) -> None:
        if self._timer is None and not self.closed:
            self._timer = self.loop.call_later(MAINTENANCE_S, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.closed or self.loop.is_closed():
            return
        now = time.monotonic()
        for group in list(self.client_groups.values()) + list(self.server_groups.values()):
            try:
                group.maintain(now)
            except Exception as exc:  # noqa: BLE001 - one group's trouble must not stop the others
                log.debug("smcish: maintenance of a link group failed: %r", exc)
        for key, (until, _) in list(self._open_failed.items()):
            if now >= until:
                del self._open_failed[key]
        if self.client_groups or self.server_groups:
            self.ensure_timer()

    def forget(self, group: LinkGroup) -> None:
        if group.role == "client":
            key = (group.peer_endpoint, group.peer_hub)
            if self.client_groups.get(key) is group:
                del self.client_groups[key]
        else:
            self.server_groups.pop(group.id, None)

    def close(self) -> None:
        """Tear every group down (the loop closed, or the process exits)."""
        if self.closed:
            return
        self.closed = True
        with _reg_lock:
            _hubs.pop(self.id, None)
        for group in list(self.client_groups.values()) + list(self.server_groups.values()):
            group.destroy()
        self.client_groups.clear()
        self.server_groups.clear()
        if self._timer is not None and not self.loop.is_closed():
            self._timer.cancel()
        self._timer = None

    def give_back_idle(self) -> None:
        """The loop is about to close: close every group none of whose connections is still
        open on our side (the peer is told; our regions go back through the device threads).
        The hub closes too once no group is left."""
        if self.closed:
            return
        for group in list(self.client_groups.values()) + list(self.server_groups.values()):
            if not any(getattr(conn, "_conn_lost", 1) == 0 for conn in group.conns.values()):
                group.close()
        if not self.client_groups and not self.server_groups:
            self.close()

    def stats(self) -> dict[str, Any]:
        groups = list(self.client_groups.values()) + list(self.server_groups.values())
        return {"link_groups": len(groups),
                "slots": sum(len(g.conns) for g in groups),
                "doorbells": sum(g.group.doorbells for g in groups if not g.group.closed),
                "notifications": sum(g.group.queued for g in groups if not g.group.closed),
                "group_polls_hit": sum(g.group.spin_hits for g in groups if not g.group.closed),
                "group_polls_missed": sum(g.group.spin_misses for g in groups if not g.group.closed),
                "group_polls_colocated": sum(g.group.spin_colocated for g in groups
                                             if not g.group.closed)}


class GroupUnavailable(ConnectionError):
    """No link group toward that hub right now; ``reason`` says why (the connection stays TCP)."""

    def __init__(self, reason: R, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@functools.lru_cache(maxsize=1024)
def _addr_bytes(addr: str) -> bytes:
    """16 bytes of an address as slot records store it (IPv4 in the first 4, v4-mapped folded)."""
    import ipaddress

    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.packed.ljust(16, b"\0")


addr_bytes = _addr_bytes


# --------------------------------------------------------------------------- link group

class LinkGroup:
    """One side of a link group: its extents, its slots' connections, dispatch and polling."""

    def __init__(self, hub: Hub, role: str, group_id: bytes, peer_endpoint: bytes,
                 peer_hub: bytes | None, peer_uid: int, peer_pid: int, my_ext0: Any,
                 peer_ext0: Any, max_slots: int) -> None:
        self.hub = hub
        self.loop = hub.loop
        self.role = role
        self.peer_side = "server" if role == "client" else "client"
        self.id = group_id
        self.peer_endpoint = peer_endpoint
        self.peer_hub = peer_hub
        self.peer_uid = peer_uid
        self.peer_pid = peer_pid
        self.max_slots = max_slots
        self.dying = False
        self.destroyed = False
        self.conns: dict[int, Any] = {}
        self.lingering: set[int] = set()     # slots of closed connections still bound (no spin for them)
        # Transports that drained their ring and left want_data unarmed: the group poll watches
        # their rings directly and arms them before the hub sleeps (docs/design.md 2.7).
        self.hot: list[Any] = []
        self.hot_rings: list[Any] = []
        self.read_soon = False               # a connection's read is queued: the poll waits for it
        self.error: BaseException | None = None
        # extents: index -> (Region, Extent)
        self.my_exts: dict[int, tuple[Any, _ring.Extent]] = {}
        self.peer_exts: dict[int, tuple[Any, _ring.Extent]] = {}
        self._peer_removals: set[int] = set()
        self._empty_since: dict[int, float] = {}
        self.alloc = BuddyAllocator()
        mine_ext = _ring.Extent(my_ext0.mem, writable=True)
        theirs_ext = _ring.Extent(peer_ext0.mem, writable=False)
        self.group = _ring.Group(mine_ext, theirs_ext, peer_ext0.doorbell_fd,
                                 _ring.ROLE_CLIENT if role == "client" else _ring.ROLE_SERVER,
                                 max_slots)
        self.my_exts[0] = (my_ext0, mine_ext)
        self.peer_exts[0] = (peer_ext0, theirs_ext)
        self.alloc.add_extent(0, _ring.heap0(max_slots), my_ext0.size)
        self._growing: Any = None
        self._next_extent_size = _EXTENT_MIN
        # slots (client: allocation; both: last gen seen per slot)
        self.gens: dict[int, int] = {}
        self._free_slots: list[int] = []
        self._next_unused = 0
        self._awaiting: dict[int, tuple[int, float]] = {}     # slot -> (gen, reusable-after)
        # (free-after, block)
        self._block_quarantine: collections.deque[tuple[float, Block]] = collections.deque()
        self._idle_since = time.monotonic()
        # dispatch
        self._doorbell_fd = my_ext0.doorbell_fd
        self._poll_scheduled = False
        self._rx_level = self._rx_skip = 0
        self._skipped_at = 0.0                  # loop time we slept after skipping a poll (backoff)
        self._asleep = False                    # we published want_wake and no poll runs
        self.poll_us = 0.0                      # the largest poll budget of its connections
        self.tickers: set[Any] = set()          # connections that want the 1 s maintenance tick
        self.loop.add_reader(self._doorbell_fd, self._on_doorbell)
        with _reg_lock:
            _groups[(group_id, role)] = self
        hub.ensure_timer()
        # Invariant: while no poll of this group is scheduled, its want_wake is set (producers
        # then ring the doorbell). A new group starts asleep.
        if self.group.prepare_sleep():
            self.schedule_poll()
        else:
            self._asleep = True

    def __repr__(self) -> str:
        state = "dying" if self.dying else "live"
        return f"<LinkGroup {self.role} {self.id.hex()[:8]} {state} conns={len(self.conns)}>"

    # ------------------------------------------------------------------ memory
    def alloc_block(self, size: int) -> tuple[Block, _ring.Extent] | None:
        """A ring block of ``size`` bytes in our extents, or None (call ``grow`` and retry)."""
        if self.dying:
            return None
        block = self.alloc.alloc(size)
        if block is None:
            return None
        self._empty_since.pop(block.ext, None)
        return block, self.my_exts[block.ext][1]

    def free_block(self, block: Block) -> None:
        if self.destroyed:
            return
        self.alloc.free(block)
        if block.ext and not self.alloc.used(block.ext):
            self._empty_since[block.ext] = time.monotonic()

    def free_block_later(self, block: Block) -> None:
        """Free ``block`` after the quarantine (the peer may be about to read it once)."""
        self._block_quarantine.append((time.monotonic() + QUARANTINE_S, block))

    def _free_quarantined(self, now: float) -> None:
        while self._block_quarantine and self._block_quarantine[0][0] <= now:
            self.free_block(self._block_quarantine.popleft()[1])

    async def alloc_block_growing(self, size: int, timeout: float) -> tuple[Block, _ring.Extent] | None:
        """``alloc_block``, growing the extents as long as needed (bounded by ``timeout`` and the
        extent count): a burst of set-ups shares each growth, and those the new extent cannot
        hold grow again instead of giving up."""
        deadline = self.loop.time() + timeout
        for _ in range(_ring.MAX_EXTENTS):
            got = self.alloc_block(size)
            if got is not None or self.dying or self.loop.time() >= deadline:
                return got
            try:
                grown = await asyncio.wait_for(self.grow(size), max(0.0, deadline - self.loop.time()))
            except TimeoutError:
                grown = False
            if not grown:
                return self.alloc_block(size)      # freed meanwhile, perhaps
        return self.alloc_block(size)

    async def grow(self, size: int) -> bool:
        """Add an extent big enough for a ``size`` block (device round trips in the pool).

        Concurrent callers share one growth. Returns False if that is impossible now (quota,
        extents exhausted, peer gone). The extent is installed when the device answers, whether
        or not a caller still waits (a cancelled caller leaks nothing).
        """
        if self.dying:
            return False
        if self._growing is None:
            index = next((i for i in range(1, _ring.MAX_EXTENTS) if i not in self.my_exts), None)
            if index is None:
                return False
            ext_size = self._fit(max(self._next_extent_size, size))
            fut = self.loop.run_in_executor(device_pool(), self._grow_blocking, index, ext_size)
            self._growing = fut
            fut.add_done_callback(self._grown)
        fut = self._growing
        try:
            await asyncio.shield(fut)
        except Exception:  # noqa: BLE001 - logged by _grown: the caller falls back or waits
            return False
        return not self.destroyed

    def _grown(self, fut: Any) -> None:
        if self._growing is fut:
            self._growing = None
        if fut.cancelled():
            return
        exc = fut.exception()
        if exc is not None:
            log.debug("smcish: link group growth failed: %r", exc)
            return
        index, region = fut.result()
        if self.destroyed:
            in_pool(self.hub.device.free, region)
            return
        self.my_exts[index] = (region, _ring.Extent(region.mem, writable=True))
        self.alloc.add_extent(index, 0, region.size)
        self._empty_since[index] = time.monotonic()     # until its first block
        self._next_extent_size = self._fit(min(_EXTENT_MAX, region.size * 2))

    def _fit(self, size: int) -> int:
        """``size`` as the device lays regions out: on a guest, the largest size whose BAR (a
        power of two holding a header page and the region) is the one ``size`` needs anyway."""
        header = self.hub.region_header
        if not header:
            return size
        return (1 << (size + header - 1).bit_length()) - header

    def _grow_blocking(self, index: int, size: int) -> tuple[int, Any]:
        device = self.hub.device
        region = device.alloc(size)
        try:
            device.peer_request(self.peer_endpoint, "extent_add", group_id=self.id,
                                side=self.peer_side, index=index, token=region.token,
                                size=region.size)
        except BaseException:
            _quiet(device.free, region)
            # The peer may have installed the extent and only answered too late: tell it to
            # let go (best effort; a peer that never got it ignores the index).
            _quiet(lambda: device.peer_request(self.peer_endpoint, "extent_remove",
                                               group_id=self.id, side=self.peer_side, index=index))
            raise
        return index, region

    def serve_extent_add(self, fields: dict[str, Any]) -> dict[str, Any]:
        """Endpoint thread: the peer added an extent; attach it read-only, install on the loop."""
        index = fields["index"]
        device = self.hub.device
        region = device.attach(fields["token"], self.peer_endpoint)

        def install() -> None:
            if self.destroyed or index in self.peer_exts:
                raise ism_backend.IsmError(f"extent {index} cannot be added now")
            ext = _ring.Extent(region.mem, writable=False)
            self.group.add_peer_extent(index, ext)
            self.peer_exts[index] = (region, ext)

        try:
            self.hub.run_on_loop(install)
        except BaseException:
            _quiet(device.detach, region)
            raise
        return {}

    def peer_extent_removed(self, index: int) -> None:
        """Loop: the peer returned an extent; detach once no ring of ours reads it."""
        if index in self.peer_exts and index != 0:
            self._peer_removals.add(index)
            self._detach_removed_extents()

    def _detach_removed_extents(self) -> None:
        if not self._peer_removals:
            return
        in_use: set[int] = set()
        for conn in self.conns.values():
            ring = getattr(conn, "_ring", None)
            if ring is not None and not ring.closed:
                in_use.update(ring.rx_extents)
        for index in list(self._peer_removals):
            if index in in_use:
                continue
            self._peer_removals.discard(index)
            region, ext = self.peer_exts.pop(index)
            self.group.remove_peer_extent(index)
            ext.release()
            in_pool(self.hub.device.detach, region)

    def _return_idle_extents(self, now: float) -> None:
        for index, since in list(self._empty_since.items()):
            if now - since < EXTENT_IDLE_S or self.alloc.used(index) or index not in self.my_exts:
                continue
            del self._empty_since[index]
            written = self.alloc.high_water(index)
            self.alloc.remove_extent(index)
            region, ext = self.my_exts.pop(index)
            ext.release()
            device = self.hub.device

            def give_back(region: Any = region, index: int = index, written: int = written,
                          device: Any = device) -> None:
                try:
                    device.peer_request(self.peer_endpoint, "extent_remove", group_id=self.id,
                                        side=self.peer_side, index=index)
                finally:
                    device.free(region, written)

            in_pool(give_back)

    # ------------------------------------------------------------------ slots (client)
    def take_slot(self) -> tuple[int, int] | None:
        """A slot free on both sides and the gen of its next connection, or None."""
        if self.dying:
            return None
        if not self._free_slots and self._awaiting:
            self._reap_awaiting(time.monotonic())
        if self._free_slots:
            slot = heapq.heappop(self._free_slots)
        elif self._next_unused < self.max_slots:
            slot = self._next_unused
            self._next_unused += 1
        else:
            return None
        return slot, self.gens.get(slot, 0) + 1

    def _reap_awaiting(self, now: float) -> None:
        for slot, (gen, after) in list(self._awaiting.items()):
            released = self.group.peer_released(slot)
            if released >= gen or (now >= after and self.group.read_peer_setup(slot).gen < gen):
                del self._awaiting[slot]
                heapq.heappush(self._free_slots, slot)

    def slot_done(self, slot: int, gen: int, quarantine: bool = False) -> None:
        """Our side of connection ``gen`` in ``slot`` is finished (blocks freed by the caller)."""
        if self.destroyed:
            return
        self.group.release_slot(slot, gen)
        conn = self.conns.get(slot)
        if conn is not None and getattr(conn, "_smc_gen", gen) == gen:
            del self.conns[slot]
            self.lingering.discard(slot)
            self.tickers.discard(conn)
        if not self.conns:
            self._idle_since = time.monotonic()
        if self.role == "client":
            after = time.monotonic() + (QUARANTINE_S if quarantine else 0.0)
            self._awaiting[slot] = (gen, after if quarantine else float("inf"))
        if self.dying and not self.conns:
            self.destroy()

    def bind(self, slot: int, conn: Any, poll_us: float = 0.0) -> None:
        """Route ``slot``'s notifications to ``conn`` (a set-up or a transport)."""
        self.conns[slot] = conn
        self.lingering.discard(slot)
        if poll_us and poll_us < self.hub.poll_floor_us:
            poll_us = self.hub.poll_floor_us
        if poll_us > self.poll_us:
            self.poll_us = poll_us

    # ------------------------------------------------------------------ dispatch
    def _on_doorbell(self) -> None:
        _ring.drain_doorbell(self._doorbell_fd)
        if self.dying and self.group.closed:
            return
        if self._skipped_at and self.loop.time() - self._skipped_at < 2e-6 * self.poll_us:
            # Woken within the poll budget after a poll we skipped (backoff): polling would have
            # caught it. Trust polling again, or a ping-pong stays stuck on doorbells.
            self._rx_level = self._rx_skip = 0
        self._skipped_at = 0.0
        self._asleep = False
        self.group.clear_wake()
        self._dispatch()
        self.schedule_poll()

    def _dispatch(self, taken: tuple[list[int], bool] | None = None) -> None:
        """Run the handlers of the connections the peer notified (take them if not given)."""
        if taken is None:
            try:
                taken = self.group.take(_TAKE_MAX)
            except _ring.GroupCorrupted as exc:
                self.fail(exc, abort=True)
                return
        slots, overflow = taken
        conns = self.conns
        if overflow:
            slots = list(conns)
        for slot in slots:
            conn = conns.get(slot)
            if conn is None:
                continue                       # a stale notification (connection gone)
            try:
                conn._smc_notify()
            except Exception as exc:  # noqa: BLE001 - one connection's bug must not stop the group
                self.loop.call_exception_handler({
                    "message": "smcish: notification handler failed", "exception": exc})

    def schedule_poll(self, wake: bool = False) -> None:
        """Queue one group poll (after the application's callbacks of this loop iteration).

        ``wake``: stop the peer ringing our doorbell meanwhile (we are about to poll anyway);
        the poll ends by announcing sleep again, so "awake" never outlasts a scheduled poll.
        """
        if not self._poll_scheduled and not self.destroyed:
            if wake and self._asleep:
                self._asleep = False
                self.group.clear_wake()
            self._poll_scheduled = True
            _queued[0] += 1
            self.loop.call_soon(self._poll)

    def _poll(self) -> None:
        """Busy-poll the peer's queue briefly (only if no other poll is queued), then sleep."""
        self._poll_scheduled = False
        _queued[0] -= 1
        if self.destroyed:
            return
        if self.read_soon:
            # A connection's read was queued after this poll: let it run first (it drains its
            # ring and becomes hot, or arms), else we would spin for bytes already there.
            self.read_soon = False
            self.schedule_poll()
            return
        try:
            group = self.group
            poll_us = self.poll_us
            self._skipped_at = 0.0
            if not poll_us or _queued[0] or len(self.lingering) >= len(self.conns):
                # one look (spin(0) checks once): polling is off, another group polls, or every
                # connection here is closed (what is left to come is the peer's CLOSED)
                budget = 0.0
            elif self._rx_skip:
                self._rx_skip -= 1
                self._skipped_at = self.loop.time()
                budget = 0.0
            else:
                budget = poll_us
            hot = self.hot
            if hot:
                try:
                    got = group.poll_hot(budget, self.hot_rings)
                except ValueError:             # a hot ring closed under us: forget those
                    self._prune_hot()
                    hot = self.hot
                    got = group.poll_hot(budget, self.hot_rings)
                if isinstance(got, int):
                    if budget:
                        self._rx_level = 0
                    conn = hot.pop(got)
                    del self.hot_rings[got]
                    conn._hot_fired = True
                    conn._smc_notify()
                    self.schedule_poll()
                    return
                if got is not None:
                    if budget:
                        self._rx_level = 0
                    indices, taken = got
                    if indices:
                        rings = self.hot_rings
                        fired = []
                        for i in reversed(indices):
                            fired.append(hot.pop(i))
                            del rings[i]
                        for conn in reversed(fired):
                            conn._hot_fired = True
                            conn._smc_notify()
                    if taken is not None:
                        self._dispatch(taken)
                    self.schedule_poll()
                    return
                taken = None
            else:
                taken = group.poll(budget)
            if taken is not None:
                if budget:
                    self._rx_level = 0
                self._dispatch(taken)
                self.schedule_poll()
                return
            if budget:
                self._rx_level = min(self._rx_level + 1, _MAX_BACKOFF)
                self._rx_skip = (1 << self._rx_level) - 1
            if hot and self._arm_hot():
                self.schedule_poll()
                return
            if group.prepare_sleep():
                self._dispatch()
                self.schedule_poll()
            else:
                self._asleep = True
        except _ring.GroupCorrupted as exc:
            self.fail(exc, abort=True)

    def add_hot(self, conn: Any, ring: Any) -> bool:
        """A transport drained ``ring``: watch it in the group poll instead of arming it. False
        if the poll cannot take it (full, or no poll coming): the caller arms it itself."""
        if len(self.hot) >= _ring.HOT_MAX or self.destroyed:
            return False
        if conn not in self.hot:
            self.hot.append(conn)
            self.hot_rings.append(ring)
        if not self._poll_scheduled:
            self.schedule_poll(wake=True)
        return True

    def _prune_hot(self) -> None:
        keep = [(c, r) for c, r in zip(self.hot, self.hot_rings, strict=False)
                if c._ring is r and not r.closed and not c._conn_lost]
        self.hot = [c for c, _ in keep]
        self.hot_rings = [r for _, r in keep]

    def drop_hot(self, conn: Any) -> None:
        """``conn`` lets its ring go: stop watching it (its ring is about to close)."""
        try:
            i = self.hot.index(conn)
        except ValueError:
            return
        del self.hot[i]
        del self.hot_rings[i]

    def _arm_hot(self) -> bool:
        """Before sleeping: arm every hot ring (want_data, fence, re-check). True if one had news
        meanwhile (its handler ran)."""
        hot = self.hot
        self.hot = []
        self.hot_rings = []
        news = False
        for conn in hot:
            if conn._hot_arm():
                news = True
        return news

    # ------------------------------------------------------------------ life
    def maintain(self, now: float) -> None:
        if self.destroyed:
            return
        if not self.dying and not self.hub.device.peer_alive(self.peer_endpoint):
            self.fail(ConnectionResetError("smcish: the peer process of this link group is gone"),
                      abort=False, tell_peer=False, peer_gone=True)
        for conn in list(self.tickers):
            try:
                conn._smc_tick(now)
            except Exception as exc:  # noqa: BLE001
                log.debug("smcish: connection maintenance failed: %r", exc)
        if self.destroyed:
            return
        if self._awaiting:
            self._reap_awaiting(now)
        if self._block_quarantine:
            self._free_quarantined(now)
        self._detach_removed_extents()
        self._return_idle_extents(now)
        if (self.role == "client" and not self.conns and not self.dying
                and now - self._idle_since > GROUP_IDLE_S):
            self.close()

    def notify_or_fail(self, slot: int) -> None:
        """``group.notify(slot)`` for the set-up paths: a peer that corrupted its queue cursors
        makes it raise GroupCorrupted; then the group fails (after the current call, so the
        set-up in progress finishes its own steps first) instead of the set-up hanging."""
        try:
            self.group.notify(slot)
        except _ring.GroupCorrupted as exc:
            self.loop.call_soon(self.fail, exc, True)
        except ValueError:               # the group closed under us
            pass

    def fail(self, exc: BaseException, abort: bool, tell_peer: bool = True,
             peer_gone: bool = False) -> None:
        """The group cannot take new connections; with ``abort`` its live connections fail now.

        Without ``abort`` (the peer process went away) each connection ends by itself through
        its TCP connection, delivering everything the peer published first; the group's memory
        stays mapped until the last one is done. ``peer_gone``: the device says the peer is gone
        (its channel closed); between guests that ends the connections here, after delivering.
        """
        if self.destroyed:
            return
        if not self.dying:
            log.debug("smcish: %r failing: %s", self, exc)
            self.dying = True
            self.error = exc
            self.hub.forget(self)
            # Tell the peer: the CLOSING bit in shared memory (seen at its next look) and a
            # group_close through the device, so its side stops taking connections too.
            try:
                self.group.set_closing()
            except Exception:  # noqa: BLE001 - a closed group: nothing to tell
                pass
            if tell_peer:
                device, peer, gid, side = self.hub.device, self.peer_endpoint, self.id, self.peer_side
                in_pool(lambda: device.peer_request(peer, "group_close", group_id=gid, side=side))
        if abort:
            for conn in list(self.conns.values()):
                try:
                    conn._smc_group_failed(exc)
                except Exception as err:  # noqa: BLE001
                    log.debug("smcish: failing a connection failed: %r", err)
        else:
            # Connections already closed on our side were lingering for the peer's CLOSED: a
            # dying group's peer reads nothing more, let them go now (the hub forgot this group,
            # so no maintenance tick would retry them). Set-ups still in progress will never get
            # their answer: end them now instead of at their timer.
            peer_gone = peer_gone and self.hub.peer_death_ends_connections
            for conn in list(self.conns.values()):
                try:
                    if not hasattr(conn, "_conn_lost"):          # a set-up (either side)
                        conn._smc_group_failed(exc)
                    elif conn._conn_lost:
                        conn._try_release()
                    elif peer_gone:
                        conn._smc_peer_gone()   # deliver what the peer published, then reset
                except Exception as err:  # noqa: BLE001
                    log.debug("smcish: ending a connection of a dead group failed: %r", err)
        if not self.conns:
            self.destroy()

    def peer_closed(self) -> None:
        """Loop: the peer closed the group or its channel broke."""
        self.fail(ConnectionResetError("smcish: the peer closed the link group"), abort=False,
                  tell_peer=False, peer_gone=True)

    def close(self) -> None:
        """Close an idle group on purpose (tell the peer)."""
        self.fail(ConnectionResetError("smcish: link group closed"), abort=True)

    def usable(self) -> bool:
        """Can this group take a new connection? (Not dying, and the peer did not mark it closing.)"""
        if self.dying:
            return False
        if self.group.peer_closing:
            self.fail(ConnectionResetError("smcish: the peer is closing the link group"),
                      abort=False, tell_peer=False)
            return False
        return True

    def destroy(self) -> None:
        """Unmap and give everything back. Every ring of the group must be closed."""
        if self.destroyed:
            return
        self.destroyed = True
        self.dying = True
        self.hub.forget(self)
        _group_closed(self.group)          # its doorbell/poll counts outlive it
        with _reg_lock:
            if _groups.get((self.id, self.role)) is self:
                del _groups[(self.id, self.role)]
        for conn in list(self.conns.values()):
            try:
                conn._smc_group_failed(self.error or ConnectionResetError("smcish: link group gone"))
            except Exception:  # noqa: BLE001
                pass
        self.conns.clear()
        self.tickers.clear()
        if not self.loop.is_closed():
            try:
                self.loop.remove_reader(self._doorbell_fd)
            except Exception:  # noqa: BLE001 - a closing loop
                pass
        self.group.close()
        device = self.hub.device
        for _index, (region, ext) in list(self.peer_exts.items()):
            ext.release()
            in_pool(device.detach, region)
        for index, (region, ext) in list(self.my_exts.items()):
            ext.release()
            written = self.alloc.high_water(index) if index in self.alloc.extents else None
            in_pool(device.free, region, written)
        self.peer_exts.clear()
        self.my_exts.clear()


_queued = [0]       # group polls queued in this process (spin only when ours is the only one)
