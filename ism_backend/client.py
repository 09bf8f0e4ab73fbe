"""The ismd client device, and the control connection it shares with embedded peers.

``ControlClient`` is one persistent SOCK_SEQPACKET connection: one request at a time (a lock),
every reply validated by ``proto``, every wait bounded by a timeout; a connection that timed out or
broke is closed and reported as ``DeviceGone``. ``DaemonDevice`` implements the Device interface
on top of it, plus the per-process pool of freed regions (docs/device.md, "Pooling").
"""

from __future__ import annotations

import collections
import os
import select
import socket
import threading
from typing import Any, Callable

from . import memfd, proto
from .device import (
    DEFAULT_TIMEOUT, MAX_REGION_SIZE, TOKEN_SIZE, ZERO_ID, Device, DeviceGone,
    DeviceProtocolError, IsmError, NoDevice, PermissionDenied, QuotaExceeded, Region,
    UnknownToken,
)


class ControlClient:
    """A persistent control connection to ismd or to an embedded endpoint.

    Raises OSError from the constructor if the socket cannot be connected.
    """

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT, what: str = "ismd") -> None:
        self.path = path
        self.what = what
        self.timeout = timeout
        self._lock = threading.Lock()
        self._next_id = 0
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        self.sock: socket.socket | None = sock

    @property
    def closed(self) -> bool:
        return self.sock is None

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def hung_up(self) -> bool:
        """True if an idle connection was closed by the other side (EOF, error, stray data)."""
        if not self._lock.acquire(blocking=False):
            return False  # a request is in flight: not idle
        try:
            if self.sock is None:
                return True
            poller = select.poll()
            poller.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
            return bool(poller.poll(0))
        finally:
            self._lock.release()

    def forget(self) -> None:
        """After fork, in the child: drop our copy of the socket (the parent's stays open)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _close_locked(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def request(self, op: str, **fields: Any) -> tuple[dict[str, Any], list[int]]:
        """Send one request and wait (bounded) for its validated reply.

        Returns:
            (result fields, fds passed with the reply: exactly ``proto.REPLY_FDS[op]``, ours).
        Raises:
            The IsmError subclass the other side answered with; DeviceGone (closed, broken or
            timed out: the connection is then closed); DeviceProtocolError (bad reply).
        """
        with self._lock:
            sock = self.sock
            if sock is None:
                raise DeviceGone(f"{self.what} connection at {self.path} is closed: fall back to "
                                 "TCP (a new device will reconnect)")
            self._next_id += 1
            req_id = self._next_id
            data = proto.encode_request(op, req_id, **fields)
            send_failed = False
            try:
                try:
                    memfd.send_msg(sock, data)
                except (BrokenPipeError, ConnectionResetError):
                    send_failed = True  # a refusal (uid policy) may still be queued for us
                try:
                    record, fds, truncated = memfd.recv_msg(sock, proto.MAX_RECORD)
                except ConnectionResetError:
                    # The kernel reports the reset before records still queued for us (such
                    # as a refusal sent just before the server closed): read once more.
                    send_failed = True
                    record, fds, truncated = memfd.recv_msg(sock, proto.MAX_RECORD)
            except TimeoutError:
                self._close_locked()
                gone = DeviceGone(f"{self.what} at {self.path} did not answer {op} within "
                                  f"{self.timeout:g} s: fall back to TCP")
                gone.timed_out = True  # callers must not retry: the bound is already spent
                raise gone from None
            except OSError as exc:
                self._close_locked()
                raise DeviceGone(f"{self.what} at {self.path} is gone ({exc.strerror or exc}): "
                                 "fall back to TCP") from None
            if not record or truncated:
                memfd.close_fds(fds)
                self._close_locked()
                if not record:
                    raise DeviceGone(f"{self.what} at {self.path} closed the connection: fall "
                                     "back to TCP")
                raise DeviceProtocolError(f"{self.what} sent an oversized reply to {op}")
            try:
                reply = proto.decode_reply(record, op, req_id)
            except IsmError as exc:
                memfd.close_fds(fds)
                if send_failed or type(exc) is DeviceProtocolError:
                    self._close_locked()
                raise
            if send_failed:
                self._close_locked()
            expected = proto.REPLY_FDS.get(op, 0)
            if len(fds) != expected:
                memfd.close_fds(fds)
                self._close_locked()
                raise DeviceProtocolError(f"{self.what} passed {len(fds)} fds with the {op} "
                                          f"reply, expected {expected}")
            return reply, fds


class Handle:
    """An advertisement or intent registration; pass it back to withdraw/remove_intent."""

    __slots__ = ("kind", "value", "device", "active")

    def __init__(self, kind: str, value: Any, device: Device) -> None:
        self.kind = kind
        self.value = value
        self.device = device
        self.active = True

    def __repr__(self) -> str:
        return f"<Handle {self.kind} {self.value!r} {'active' if self.active else 'released'}>"


def check_size(size: int) -> int:
    if type(size) is not int or not 0 < size <= MAX_REGION_SIZE:
        raise ValueError(f"region size must be an int in 1..{MAX_REGION_SIZE}, got {size!r}")
    return size


def check_token(token: bytes) -> bytes:
    if not isinstance(token, (bytes, bytearray)) or len(token) != TOKEN_SIZE:
        raise UnknownToken(f"a region token is {TOKEN_SIZE} bytes: this one is malformed")
    return bytes(token)


def check_read_access(access: str) -> None:
    if access == "rw":
        raise PermissionDenied("writable attach is not supported: regions are sealed "
                               "F_SEAL_FUTURE_WRITE, each side writes only its own region")
    if access != "r":
        raise ValueError(f"access must be 'r' (or 'rw', refused), got {access!r}")


def unmap(mem: Any) -> bool:
    """Close a mapping; False while buffer exports (memoryviews, cffi buffers) keep it alive."""
    try:
        mem.close()
        return True
    except BufferError:
        return False


class _Pooled:
    __slots__ = ("region_id", "size", "offset", "fd", "mem", "dirty")

    def __init__(self, region_id: int, size: int, offset: int, fd: int, mem: Any,
                 dirty: int) -> None:
        self.region_id = region_id
        self.size = size
        self.offset = offset
        self.fd = fd
        self.mem = mem
        self.dirty = dirty                 # leading bytes that may be non-zero


class DaemonDevice(Device):
    """The device served by ismd over ``path``: one control connection per device object."""

    kind = "daemon"

    def __init__(self, path: str, timeout: float = DEFAULT_TIMEOUT, pool_per_size: int = 8,
                 pool_bytes: int = 64 << 20) -> None:
        self.path = path
        self.endpoint_id = ZERO_ID
        self.pool_per_size = pool_per_size
        self.pool_bytes = pool_bytes
        self._pool: dict[int, collections.deque[_Pooled]] = collections.defaultdict(
            collections.deque)
        self._pool_by_id: dict[int, _Pooled] = {}
        self._pooled_bytes = 0
        self._zombies: list[tuple[Any, list[int], int | None]] = []
        self._info_provider: Callable[[], list[dict]] | None = None
        self._lock = threading.RLock()
        self._closed = False
        try:
            self._conn = ControlClient(path, timeout, "ismd")
        except OSError as exc:
            raise NoDevice(f"no ISM device: ismd is not reachable at {path} "
                           f"({exc.strerror or exc}): start ismd or set SMCISH_DEVICE") from None
        try:
            hello, _ = self._conn.request("hello")
        except DeviceGone as exc:
            self._conn.close()
            raise NoDevice(f"no ISM device: {exc}") from None
        except IsmError:
            self._conn.close()
            raise
        self.gid = hello["gid"]
        self.uid = hello["uid"]
        self.daemon_pid = hello["pid"]

    @property
    def available(self) -> bool:
        return not self._closed and not self._conn.closed

    def _request(self, op: str, **fields: Any) -> tuple[dict, list[int]]:
        if self._closed:
            raise DeviceGone("this ismd device was closed: get_device() opens a new one")
        return self._conn.request(op, **fields)

    # --- regions ---

    def alloc(self, size: int) -> Region:
        check_size(size)
        with self._lock:
            self._reap_zombies()
            if self._pool.get(size):
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
        try:
            reply, fds = self._request("reuse", size=size)
        except UnknownToken:
            return None  # every pooled region of that size is still mapped by someone
        entry = self._pool_by_id.pop(reply["region"], None)
        if entry is None or entry.size != size:
            memfd.close_fds(fds)
            raise DeviceProtocolError("ismd offered a region this process did not pool")
        self._pool[size].remove(entry)
        self._pooled_bytes -= size
        memfd.zero(entry.mem, entry.dirty)
        return Region(reply["token"], size, "rw", entry.mem, fds[0], entry.fd, entry.offset,
                      self, entry.region_id)

    def _alloc_fresh(self, size: int) -> Region:
        reply, (fd, doorbell) = self._request("alloc", size=size)
        try:
            if reply["size"] != size:
                raise DeviceProtocolError(f"ismd allocated {reply['size']} bytes, asked {size}")
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
        dirty = region.size if written is None else max(0, min(region.size, int(written)))
        with self._lock:
            size = region.size
            keep = (len(self._pool[size]) < self.pool_per_size
                    and self._pooled_bytes + size <= self.pool_bytes)
            try:
                self._request("free", token=region.token, keep=keep)
            except (DeviceGone, UnknownToken):
                keep = False  # ismd already dropped it (disconnect/restart): just clean up here
            mem, fd, doorbell = region.mem, region.fd, region.doorbell_fd
            self._closed_region(region)
            os.close(doorbell)
            if keep:
                entry = _Pooled(region._handle, size, region.offset, fd, mem, dirty)
                self._pool[size].append(entry)
                self._pool_by_id[entry.region_id] = entry
                self._pooled_bytes += size
            else:
                unmap(mem)
                os.close(fd)

    def attach(self, token: bytes, endpoint_id: bytes, access: str = "r") -> Region:
        token = check_token(token)
        check_read_access(access)
        with self._lock:
            self._reap_zombies()
        reply, (fd, doorbell) = self._request("attach", token=token, access="r")
        try:
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
            self._closed_region(region)
            if not unmap(mem):
                # Still exported (a live memoryview/cffi buffer): keep the attachment until the
                # mapping is really gone, so the owner never reuses memory we still see.
                self._zombies.append((mem, fds, attachment))
                return
            memfd.close_fds(fds)
            self._tell_detached(attachment)

    def _tell_detached(self, attachment: int) -> None:
        try:
            self._request("detach", attachment=attachment)
        except (DeviceGone, UnknownToken):
            pass  # ismd gone or restarted: the attachment died with the connection

    def _reap_zombies(self) -> None:
        still = []
        for mem, fds, attachment in self._zombies:
            if unmap(mem):
                memfd.close_fds(fds)
                self._tell_detached(attachment)
            else:
                still.append((mem, fds, attachment))
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
        for entry in list(self._pool_by_id.values()):
            try:
                self._request("release", region=entry.region_id)
            except (DeviceGone, UnknownToken):
                pass
            unmap(entry.mem)
            os.close(entry.fd)
        self._pool.clear()
        self._pool_by_id.clear()
        self._pooled_bytes = 0

    # --- permissions ---

    def grant(self, token: bytes, uid: int, access: str = "r") -> None:
        check_read_access(access)
        self._request("grant", token=check_token(token), uid=uid, access="r")

    def revoke(self, token: bytes, uid: int) -> None:
        self._request("revoke", token=check_token(token), uid=uid)

    # --- discovery ---

    def advertise(self, host: str, port: int) -> Handle:
        reply, _ = self._request("advertise", host=host, port=port)
        return Handle("listener", reply["handle"], self)

    def withdraw(self, handle: Handle) -> None:
        self._release_handle(handle, "listener", "withdraw")

    def lookup(self, host: str, port: int) -> bool:
        try:
            reply, _ = self._request("lookup", host=host, port=port)
        except (IsmError, ValueError):
            return False  # no answer means no acceleration, never an error for the caller
        return reply["found"]

    def add_intent(self, local_port: int, remote_host: str, remote_port: int) -> Handle:
        reply, _ = self._request("add_intent", local_port=local_port, remote_host=remote_host,
                                 remote_port=remote_port)
        return Handle("intent", reply["handle"], self)

    def remove_intent(self, handle: Handle) -> None:
        self._release_handle(handle, "intent", "remove_intent")

    def has_intent(self, peer_port: int, local_host: str, local_port: int) -> bool:
        try:
            reply, _ = self._request("has_intent", peer_port=peer_port, local_host=local_host,
                                     local_port=local_port)
        except (IsmError, ValueError):
            return False
        return reply["found"]

    def claim(self, client_port: int, server_host: str, server_port: int,
              role: str) -> Handle | None:
        """See ``Device.claim``: one round trip to ismd, which does the test-and-set."""
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', got {role!r}")
        kind = "intent" if role == "client" else "server-claim"
        try:
            reply, _ = self._request("claim", local_port=client_port, remote_host=server_host,
                                     remote_port=server_port, role=role)
        except (IsmError, ValueError):
            return None          # see EmbeddedDevice.claim: the safe answer for both roles
        if not reply["handle"]:
            return None
        return Handle(kind, reply["handle"], self)

    def release_claim(self, handle: Handle) -> None:
        if not isinstance(handle, Handle) or handle.kind not in ("intent", "server-claim"):
            raise ValueError("release_claim() takes a handle returned by claim()")
        if handle.value is None:
            handle.active = False
            return
        self._release_handle(handle, handle.kind, "release_claim")

    def _release_handle(self, handle: Handle, kind: str, op: str) -> None:
        if not isinstance(handle, Handle) or handle.kind != kind or handle.device is not self:
            raise ValueError(f"{op}() takes a handle returned by this device")
        if not handle.active:
            return
        handle.active = False
        try:
            self._request(op, handle=handle.value)
        except (DeviceGone, UnknownToken):
            pass  # gone with the connection anyway

    # --- introspection ---

    def set_info_provider(self, fn: Callable[[], list[dict]] | None) -> None:
        self._info_provider = fn

    def peers_info(self) -> list[dict]:
        own = {"kind": "daemon-client", "pid": os.getpid(),
               "connections": self._info_provider() if self._info_provider else []}
        try:
            return [own, {"kind": "ismd", "status": self.status()}]
        except IsmError as exc:
            return [own, {"kind": "ismd", "error": str(exc)}]

    def status(self) -> dict:
        reply, _ = self._request("status")
        status = reply["status"]
        status["client"] = {"pid": os.getpid(), "pooled": len(self._pool_by_id),
                            "pooled_bytes": self._pooled_bytes, "zombies": len(self._zombies),
                            # memfd + mmap's own dup on Python < 3.13 (doorbells are not kept)
                            "pooled_fds": (1 + memfd.FDS_PER_MAPPING) * len(self._pool_by_id)}
        return status

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            for entry in self._pool_by_id.values():
                unmap(entry.mem)
                os.close(entry.fd)
            self._pool.clear()
            self._pool_by_id.clear()
            self._pooled_bytes = 0
            self._closed = True
            self._conn.close()  # ismd reclaims everything this connection owned

    def _forget_after_fork(self) -> None:
        self._closed = True
        self._conn.forget()
        for entry in self._pool_by_id.values():
            unmap(entry.mem)
            os.close(entry.fd)
        self._pool.clear()
        self._pool_by_id.clear()
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"<DaemonDevice {self.path} {'open' if self.available else 'closed'}>"
