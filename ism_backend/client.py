"""``DaemonDevice``: the Device served by ismd, for processes of several users and containers.

Two connections to ismd per device: the *control connection* (every request this process makes,
one at a time) and the *endpoint channel* (``hello``, ``serve_endpoint``; then ismd hands it the
ends of brokered peer channels with ``take_peer``), served with those channels by the device's
endpoint thread; peer ops run on the ``PeerDispatcher``'s handler thread. A daemon is trusted
only if its SO_PEERCRED uid is 0, our euid, or ``SMCISH_DAEMON_UID``: another user could have
bound the socket path. Freed regions are pooled per process (``policy.FreedPool``); ismd keeps
them charged to us until reused or released.

Inside a virtual machine the same device talks to the guest agent (``ism_backend.vmguest``,
docs/vm.md), whose ``hello`` says kind ``"guest"``: regions are then PCI BARs the host plugged
into the guest (``geometry == "guest"``), mapped without memfd seals, never pooled, and unmapped
before the agent is told they are freed (the host unplugs a freed BAR: a mapping left behind
would SIGBUS).
"""

from __future__ import annotations

import collections
import mmap
import os
import secrets
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any, cast

from . import memfd, proto, sockets
from .contract import (
    DEFAULT_TIMEOUT,
    ID_SIZE,
    Advert,
    Device,
    EndpointHandler,
    Handle,
    PeerInfo,
    Region,
    check_id,
    check_read_access,
    check_size,
    check_token,
)
from .control import (
    ControlClient,
    ControlConn,
    ControlServer,
    HandlerResult,
    PeerDispatcher,
    Reply,
    request_retrying_once,
)
from .errors import DeviceGone, DeviceProtocolError, IsmError, NoDevice, QuotaExceeded, UnknownToken
from .policy import FreedPool, check_daemon_uid, dirty_bytes

__all__ = ["GUEST_PORT_NAME", "GUEST_SOCKET_PATH", "GUEST_TIMEOUT", "MAX_CHANNELS_PER_PEER",
           "MAX_SERVED_CHANNELS", "DaemonDevice", "find_guest_port"]

#: Brokered channels served per peer endpoint, and in total: a hostile peer (or a flood of
#: ``connect_endpoint``) cannot exhaust our fds; beyond, ``take_peer`` is refused.
MAX_CHANNELS_PER_PEER = 8
MAX_SERVED_CHANNELS = 4096

#: The virtio-serial port a guest's agent talks to the host on (docs/vm.md section 1).
GUEST_PORT_NAME = "org.smcish.ism.0"
#: Where the guest agent serves the ismd protocol (ismd's default socket as root).
GUEST_SOCKET_PATH = "/run/smcish/ismd.sock"
#: Bound on each request to a guest agent: alloc and attach wait for a PCI hot-plug through the
#: host (0.2-1 s under emulation); the agent bounds its own work at 6 s.
GUEST_TIMEOUT = 8.0


def find_guest_port(sysfs_root: str = "/sys") -> str | None:
    """The device node of the guest agent's virtio-serial port (``/dev/vportNpM``), or None when
    this is not a guest with that port. Reads ``<sysfs_root>/class/virtio-ports/*/name`` (no udev
    symlinks needed)."""
    base = os.path.join(sysfs_root, "class", "virtio-ports")
    try:
        entries = sorted(os.listdir(base))
    except OSError:
        return None
    want = GUEST_PORT_NAME.encode()
    for entry in entries:
        try:
            with open(os.path.join(base, entry, "name"), "rb") as fh:
                name = fh.read(256).strip()
        except OSError:
            continue
        if name == want:
            return os.path.join("/dev", entry)
    return None


class _Pooled:
    __slots__ = ("dirty", "fd", "mem", "offset", "region_id", "size")

    def __init__(self, region_id: int, size: int, offset: int, fd: int, mem: mmap.mmap,
                 dirty: int) -> None:
        self.region_id = region_id
        self.size = size
        self.offset = offset
        self.fd = fd
        self.mem = mem
        self.dirty = dirty                 # leading bytes that may be non-zero


class _Channels:
    """ControlServer handler of the device's endpoint thread: the endpoint channel to ismd
    (only ``take_peer`` arrives on it) and the brokered peer channels (peer ops)."""

    def __init__(self, device: DaemonDevice) -> None:
        self.device = device

    def accept(self, conn: ControlConn) -> IsmError | None:
        return None  # every connection here was handed over by ismd (already trusted)

    def handle(self, conn: ControlConn, request: proto.Request, fds: list[int]) -> HandlerResult:
        dev = self.device
        op, f = request.op, request.fields
        if conn.state == "ismd":
            if op == "take_peer":
                return dev._take_peer(f, fds)
            if op == "ping":
                return {}, []
            raise IsmError(f"{op} is not served on an endpoint channel")
        if op in proto.PEER_OPS:
            # A peer channel's endpoint id is set (by _take_peer) before it is served, so its
            # peer is known.
            return dev._dispatcher.submit(dev._channel_server, conn, request,
                                          cast(PeerInfo, conn.peer))
        if op == "ping":
            return {}, []
        raise IsmError(f"{op} is not served on a peer channel (only {sorted(proto.PEER_OPS)})")

    def disconnect(self, conn: ControlConn) -> None:
        dev = self.device
        if conn.state == "ismd":
            dev._endpoint_lost = True  # peers can no longer reach us: get_device() reopens
            return
        peer = conn.peer  # not None exactly when conn.endpoint_id is set
        if (peer is not None and dev._count_served(peer.endpoint_id, -1) == 0
                and dev._dispatcher.handler):
            dev._dispatcher.gone(peer)


class DaemonDevice(Device):
    """The device served by ismd at ``path``.

    Attributes:
        guest: True when ``path`` is a VM guest's agent (its hello said kind ``"guest"``).
        geometry: how regions are laid out: ``"daemon"`` (memfds) or ``"guest"`` (PCI BARs
            with a header page in front). ``kind`` stays ``"daemon"`` either way.

    Args:
        path: ismd's control socket.
        timeout: bound on every request.
        pool_per_size, pool_bytes: bounds of the pool of freed regions.
    Raises:
        NoDevice: ismd unreachable, not trusted (``SMCISH_DAEMON_UID``), or refused us.
        PermissionDenied, QuotaExceeded: ismd's uid policy or connection limit refused us.
    """

    kind = "daemon"
    geometry = "daemon"
    guest = False

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT, pool_per_size: int = 8,
                 pool_bytes: int = 64 << 20) -> None:
        self.path = path
        self.timeout = timeout
        self.endpoint_id = secrets.token_bytes(ID_SIZE)
        self._pool: FreedPool[_Pooled] = FreedPool(pool_per_size, pool_bytes)
        self._pool_by_id: dict[int, _Pooled] = {}
        # detached (or, on a guest, freed) mappings still exported: (mem, fds, the request to
        # send once they are unmapped: op and fields)
        self._zombies: list[tuple[mmap.mmap, list[int], str, dict[str, Any]]] = []
        self._info_provider: Callable[[], list[dict[str, Any]]] | None = None
        self._lock = threading.RLock()
        self._channels: dict[bytes, tuple[ControlClient, PeerInfo]] = {}
        self._served: collections.Counter[bytes] = collections.Counter()
        self._dispatcher = PeerDispatcher("smcish-ism-handler", timeout)
        self._closed = False
        self._endpoint_lost = False
        self._conn = self._connect()
        try:
            hello, _ = self._conn.request("hello", endpoint_id=self.endpoint_id)
            if hello["kind"] == "guest":
                self.guest = True
                self.geometry = "guest"
                if self.timeout < GUEST_TIMEOUT:
                    self.timeout = GUEST_TIMEOUT
                    self._conn.set_timeout(GUEST_TIMEOUT)
            self.gid = hello["gid"]
            self.uid: int = hello["uid"]
            self.daemon_pid: int = hello["pid"]
            channel = self._connect()
            try:
                channel.request("hello", endpoint_id=self.endpoint_id)
                channel.request("serve_endpoint")
                daemon_creds = channel.credentials()
                sock = channel.detach_socket()
            except BaseException:
                channel.close()
                raise
        except DeviceGone as exc:
            self._conn.close()
            raise NoDevice(f"no ISM device: {exc}") from None
        except BaseException:
            self._conn.close()
            raise
        self._channel_server = ControlServer(None, _Channels(self))
        ismd = self._channel_server.add(sock, daemon_creds)
        assert ismd is not None
        ismd.state = "ismd"
        self._thread = threading.Thread(target=self._serve, name="smcish-ism-endpoint",
                                        daemon=True)
        self._thread.start()

    def _connect(self) -> ControlClient:
        try:
            conn = ControlClient(self.path, self.timeout, "ismd")
        except OSError as exc:
            hint = (" (in a VM guest: start the guest agent, python -m ism_backend.vmguest)"
                    if self.path == GUEST_SOCKET_PATH else "")
            raise NoDevice(f"no ISM device: ismd is not reachable at {self.path} "
                           f"({exc.strerror or exc}): start ismd{hint} or set SMCISH_DEVICE") \
                from None
        try:
            check_daemon_uid(conn.credentials()[1], self.path)
        except BaseException:
            conn.close()
            raise
        return conn

    def _serve(self) -> None:
        try:
            self._channel_server.serve()
        finally:
            self._channel_server.close()

    @property
    def available(self) -> bool:
        return not self._closed and not self._conn.closed and not self._endpoint_lost

    def _request(self, op: str, fds: Iterable[int] = (), **fields: Any) -> Reply:
        if self._closed:
            gone = DeviceGone("this ismd device was closed: get_device() opens a new one")
            gone.delivered = False
            raise gone
        return self._conn.request(op, fds, **fields)

    # --- regions ---

    def alloc(self, size: int) -> Region:
        check_size(size)
        with self._lock:
            self._reap_zombies()
            if self._pool.count:
                region = self._alloc_from_pool(size)
                if region is not None:
                    return region
            try:
                return self._alloc_fresh(size)
            except QuotaExceeded:
                if not self._pool_by_id:
                    raise
                self._drain_pool()  # our own pooled memory counts against the quota
                return self._alloc_fresh(size)

    def _alloc_from_pool(self, size: int) -> Region | None:
        if not self._pool.has(size):
            return None
        try:
            reply, fds = self._request("reuse", size=size)
        except UnknownToken:
            return None  # every pooled region of that size is still mapped by someone
        entry = self._pool_by_id.pop(reply["region"], None)
        if entry is None or entry.size != size:
            memfd.close_fds(fds)
            raise DeviceProtocolError("ismd offered a region this process did not pool")
        self._pool.remove(entry)
        FreedPool.scrub(entry)
        return Region(reply["token"], size, "rw", entry.mem, fds[0], entry.fd, entry.offset,
                      self, entry.region_id)

    def _alloc_fresh(self, size: int) -> Region:
        reply, (fd, doorbell) = self._request("alloc", size=size)
        try:
            if reply["size"] != size:
                raise DeviceProtocolError(f"ismd allocated {reply['size']} bytes, asked {size}")
            if self.guest:
                mem = memfd.map_device(fd, size, reply["offset"], writable=True)
            else:
                mem = memfd.map_owner(fd, size, reply["offset"])
        except BaseException:
            memfd.close_fds((fd, doorbell))
            try:
                self._request("free", token=reply["token"], keep=False)
            except IsmError:
                pass
            raise
        return Region(reply["token"], size, "rw", mem, doorbell, fd, reply["offset"], self,
                      reply["region"])

    def free(self, region: Region, written: int | None = None) -> None:
        self._check_mine(region, "rw", "free")
        if self.guest:
            self._free_unmapped_first(region)
            return
        dirty = dirty_bytes(region.size, written)
        with self._lock:
            size = region.size
            keep = self._pool.has_room(size)
            try:
                self._request("free", token=region.token, keep=keep)
            except (DeviceGone, UnknownToken):
                keep = False  # ismd already dropped it (disconnect/restart): just clean up here
            mem, fd, doorbell = region.mem, region.fd, region.doorbell_fd
            assert mem is not None  # _check_mine refused a freed region
            self._closed_region(region)
            os.close(doorbell)
            if keep:
                entry = _Pooled(region._handle, size, region.offset, fd, mem, dirty)
                self._pool.offer(entry)
                self._pool_by_id[entry.region_id] = entry
            else:
                memfd.unmap(mem)
                os.close(fd)

    def _free_unmapped_first(self, region: Region) -> None:
        """Guest: never pooled, and unmapped before the agent hears of it (the host unplugs a
        freed BAR; a mapping still exported waits as a zombie, its token alive meanwhile)."""
        with self._lock:
            token, mem, fds = region.token, region.mem, [region.fd, region.doorbell_fd]
            assert mem is not None  # _check_mine refused a freed region
            self._closed_region(region)
            if not memfd.unmap(mem):
                self._zombies.append((mem, fds, "free", {"token": token, "keep": False}))
                return
            memfd.close_fds(fds)
            self._tell_gone("free", {"token": token, "keep": False})

    def attach(self, token: bytes, endpoint_id: bytes, access: str = "r") -> Region:
        """See ``Device.attach``; through ismd tokens are global, ``endpoint_id`` is not used."""
        token = check_token(token)
        check_read_access(access)
        with self._lock:
            self._reap_zombies()
        reply, (fd, doorbell) = self._request("attach", token=token, access="r")
        try:
            if self.guest:
                mem = memfd.map_device(fd, reply["size"], reply["offset"], writable=False)
            else:
                mem = memfd.map_readonly(fd, reply["size"], reply["offset"])
        except BaseException:
            memfd.close_fds((fd, doorbell))
            try:
                self._request("detach", attachment=reply["attachment"])
            except IsmError:
                pass
            raise
        return Region(token, reply["size"], "r", mem, doorbell, fd, reply["offset"], self,
                      reply["attachment"])

    def detach(self, region: Region) -> None:
        self._check_mine(region, "r", "detach")
        with self._lock:
            mem, fds, attachment = region.mem, [region.fd, region.doorbell_fd], region._handle
            assert mem is not None  # _check_mine refused a detached region
            self._closed_region(region)
            if not memfd.unmap(mem):
                # Still exported (a live memoryview/cffi buffer): keep the attachment until the
                # mapping is really gone, so the owner never reuses memory we still see.
                self._zombies.append((mem, fds, "detach", {"attachment": attachment}))
                return
            memfd.close_fds(fds)
            self._tell_gone("detach", {"attachment": attachment})

    def _tell_gone(self, op: str, fields: dict[str, Any]) -> None:
        try:
            self._request(op, **fields)
        except (DeviceGone, UnknownToken):
            pass  # ismd gone or restarted: the region died with the connection

    def _reap_zombies(self) -> None:
        still = []
        for mem, fds, op, fields in self._zombies:
            if memfd.unmap(mem):
                memfd.close_fds(fds)
                self._tell_gone(op, fields)
            else:
                still.append((mem, fds, op, fields))
        self._zombies = still

    def _check_mine(self, region: Region, access: str, what: str) -> None:
        if region._device is not self or region.access != access:
            how = "allocated" if access == "rw" else "attached"
            raise ValueError(f"{what}() takes a region {how} by this device")
        if region.closed:
            raise ValueError(f"region already {'freed' if access == 'rw' else 'detached'}")

    @staticmethod
    def _closed_region(region: Region) -> None:
        region.mem = None
        region.token = b""
        region.fd = -1
        region.doorbell_fd = -1

    def _drain_pool(self) -> None:
        for entry in self._pool.drain():
            try:
                self._request("release", region=entry.region_id)
            except (DeviceGone, UnknownToken):
                pass
            memfd.unmap(entry.mem)
            os.close(entry.fd)
        self._pool_by_id.clear()

    # --- permissions ---

    def grant(self, token: bytes, uid: int, access: str = "r") -> None:
        check_read_access(access)
        self._request("grant", token=check_token(token), uid=uid, access="r")

    def revoke(self, token: bytes, uid: int) -> None:
        self._request("revoke", token=check_token(token), uid=uid)

    # --- socket-bound discovery ---

    def advertise(self, sock: socket.socket, hub_id: bytes) -> Handle:
        hub_id = check_id(hub_id, "hub id")
        sockets.listener_facts(sock)  # ValueError here rather than a refusal from ismd
        reply, _ = self._request("advertise", fds=[sock.fileno()], hub_id=hub_id)
        return Handle("advert", reply["handle"], self)

    def withdraw(self, handle: Handle) -> None:
        if not isinstance(handle, Handle) or handle.kind != "advert" or handle.device is not self:
            raise ValueError("withdraw() takes a handle returned by this device's advertise()")
        if not handle.active:
            return
        handle.active = False
        try:
            self._request("withdraw", handle=handle.value)
        except (DeviceGone, UnknownToken):
            pass  # gone with the connection anyway

    @staticmethod
    def _advert(reply: dict[str, Any]) -> Advert | None:
        if not reply["found"]:
            return None
        return Advert(reply["endpoint_id"], reply["hub_id"], reply["pid"], reply["uid"])

    def find_listener(self, inode: int) -> Advert | None:
        if type(inode) is not int or inode <= 0:
            raise ValueError(f"a socket inode is a positive int, got {inode!r}")
        try:
            reply, _ = self._request("find_listener", inode=inode)
        except IsmError:
            return None  # no answer means no acceleration, never an error for the caller
        return self._advert(reply)

    def find_remote_listener(self, sock: socket.socket, host: str, port: int) -> Advert | None:
        try:
            reply, _ = self._request("find_remote_listener", fds=[sock.fileno()], host=host,
                                     port=port)
        except (IsmError, ValueError, OSError):
            return None
        return self._advert(reply)

    def verify_remote_peer(self, sock: socket.socket, inode: int, endpoint_id: bytes) -> bool:
        try:
            reply, _ = self._request("verify_remote_peer", fds=[sock.fileno()], inode=inode,
                                     endpoint_id=endpoint_id)
        except (IsmError, ValueError, OSError):
            return False
        verified: bool = reply["verified"]
        return verified

    def release_remote_claim(self, inode: int) -> None:
        try:
            self._request("release_remote_claim", inode=inode)
        except (IsmError, ValueError):
            pass  # gone with the connection anyway

    # --- peer messaging ---

    def set_endpoint_handler(self, handler: EndpointHandler | None) -> None:
        self._dispatcher.set_handler(handler)

    def _count_served(self, endpoint_id: bytes, delta: int) -> int:
        with self._lock:
            self._served[endpoint_id] += delta
            left = self._served[endpoint_id]
            if left <= 0:
                del self._served[endpoint_id]
            return left

    def _take_peer(self, f: dict[str, Any], fds: list[int]) -> Reply:
        """Endpoint thread: ismd hands us our end of a channel from the peer ``f`` describes."""
        endpoint_id = f["endpoint_id"]
        with self._lock:
            if (self._served.get(endpoint_id, 0) >= MAX_CHANNELS_PER_PEER
                    or sum(self._served.values()) >= MAX_SERVED_CHANNELS):
                raise QuotaExceeded("too many peer channels from that endpoint: refused")
        fd = fds.pop()
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            raise DeviceProtocolError("take_peer carried no socket") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
            sock.close()
            raise DeviceProtocolError("take_peer carried a socket that is not a peer channel")
        conn = self._channel_server.add(sock, (f["pid"], f["uid"], f["gid"]))
        if conn is None:
            return {}, []
        conn.endpoint_id = endpoint_id
        conn.state = "peer"
        self._count_served(endpoint_id, +1)
        return {}, []

    def _channel(self, endpoint_id: bytes) -> ControlClient:
        with self._lock:
            entry = self._channels.get(endpoint_id)
        if entry is not None and not entry[0].closed:
            return entry[0]
        reply, (fd,) = self._request("connect_endpoint", endpoint_id=endpoint_id)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            raise DeviceProtocolError("ismd's connect_endpoint reply carried no socket") from None
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_SEQPACKET:
            sock.close()
            raise DeviceProtocolError("ismd's connect_endpoint reply is not a peer channel")
        conn = ControlClient(f"(peer {endpoint_id.hex()[:8]})", self.timeout,
                             "the peer's endpoint", sock=sock)
        peer = PeerInfo(endpoint_id, reply["pid"], reply["uid"], reply["gid"])
        with self._lock:
            old = self._channels.get(endpoint_id)
            if old is not None and not old[0].closed:
                conn.close()
                return old[0]
            self._prune_channels_locked()
            self._channels[endpoint_id] = (conn, peer)
        return conn

    def _prune_channels_locked(self) -> None:
        for eid, (other, _) in list(self._channels.items()):  # peers that went away
            if other.closed or other.hung_up():
                other.close()
                del self._channels[eid]

    def _drop_channel(self, endpoint_id: bytes, conn: ControlClient) -> None:
        with self._lock:
            entry = self._channels.get(endpoint_id)
            if entry is not None and entry[0] is conn:
                del self._channels[endpoint_id]
        conn.close()

    def peer_request(self, endpoint_id: bytes, op: str, **fields: Any) -> dict[str, Any]:
        endpoint_id = check_id(endpoint_id)
        if op not in proto.PEER_OPS:
            raise ValueError(f"{op!r} is not a peer op (proto.PEER_OPS: {sorted(proto.PEER_OPS)})")
        proto.encode_request(op, 0, **fields)  # ValueError before anything is sent
        if self._closed:
            raise DeviceGone("this ismd device was closed: get_device() opens a new one")
        if endpoint_id == self.endpoint_id:
            me = PeerInfo(self.endpoint_id, os.getpid(), os.geteuid(), os.getegid())
            return self._dispatcher.call(me, op, fields)
        reply, _ = request_retrying_once(
            lambda: self._channel(endpoint_id),
            lambda conn: self._drop_channel(endpoint_id, conn), op, **fields)
        return reply

    def peer_alive(self, endpoint_id: bytes) -> bool:
        """Alive while a channel to or from that peer is open (no round trip); through ismd,
        a peer we have no channel with reads as not alive."""
        endpoint_id = check_id(endpoint_id)
        if endpoint_id == self.endpoint_id:
            return self.available
        with self._lock:
            entry = self._channels.get(endpoint_id)
            served = self._served.get(endpoint_id, 0) > 0
        if entry is not None and not entry[0].closed and not entry[0].hung_up():
            return True
        return served

    # --- introspection ---

    def set_info_provider(self, fn: Callable[[], list[dict[str, Any]]] | None) -> None:
        self._info_provider = fn

    def peers_info(self) -> list[dict[str, Any]]:
        own = {"kind": "daemon-client", "pid": os.getpid(),
               "connections": self._info_provider() if self._info_provider else []}
        try:
            return [own, {"kind": "ismd", "status": self.status()}]
        except IsmError as exc:
            return [own, {"kind": "ismd", "error": str(exc)}]

    def status(self) -> dict[str, Any]:
        reply, _ = self._request("status")
        status: dict[str, Any] = reply["status"]
        with self._lock:
            self._prune_channels_locked()
            status["client"] = {
                "pid": os.getpid(), "endpoint_id": self.endpoint_id.hex(),
                "geometry": self.geometry, "pooled": self._pool.count, "pooled_bytes": self._pool.bytes,
                "zombies": len(self._zombies),
                # memfd + mmap's own dup on Python < 3.13 (doorbells are not kept)
                "pooled_fds": (1 + memfd.FDS_PER_MAPPING) * self._pool.count,
                "peer_channels": len(self._channels), "served_peers": len(self._served),
                "handler": self._dispatcher.handler is not None,
            }
        return status

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for entry in self._pool.drain():
                memfd.unmap(entry.mem)
                os.close(entry.fd)
            self._pool_by_id.clear()
            channels = [conn for conn, _ in self._channels.values()]
            self._channels.clear()
        for conn in channels:
            conn.close()
        self._dispatcher.close()
        self._channel_server.stop()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        self._conn.close()  # ismd reclaims everything this connection owned

    def _forget_after_fork(self) -> None:
        # In a forked child: close our copies of the parent's connections (the parent's stay
        # open). A device the parent had closed holds only stale fd numbers: touch nothing.
        if self._closed:
            return
        self._closed = True
        self._conn.forget()
        for conn, _ in self._channels.values():
            conn.forget()
        self._channels.clear()
        self._channel_server.forget()
        self._dispatcher.forget()
        for entry in self._pool.drain():
            memfd.unmap(entry.mem)
            os.close(entry.fd)
        self._pool_by_id.clear()
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<DaemonDevice {self.path} {'open' if self.available else 'closed'}>"
