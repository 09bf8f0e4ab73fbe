"""The embedded ISM device: this process serves its own regions and peer ops from an endpoint in a
runtime directory shared by the processes of one uid.

Layout of the runtime directory (0700, owned by us; see docs/device.md section 3):
``gid``               the sharing domain's 16 random bytes (hex), created once, atomically
``.mutex``            flock'ed around creating/removing the files below (never by readers)
``ep-<id>.lock``      held flock(LOCK_EX) by the endpoint's process while it lives
``ep-<id>.sock``      its endpoint (SOCK_SEQPACKET), served by the device's endpoint thread
``adv-<inode>``       the advertisement of the listening socket with that inode:
                      ``endpoint_id_hex hub_id_hex pid uid``, held LOCK_EX by the advertiser
A file whose lock can be taken (``LOCK_SH|LOCK_NB`` succeeds) belongs to a dead process and is
removed (at device open, and by readers that meet it). An advertisement is written to a temp
name, locked, then renamed in place: a reader never sees it half-written, and the latest
advertiser of an inode wins.

Threads: the *endpoint thread* runs the ``ControlServer`` (attach, detach, hello, info: never
blocking); peer ops go to the ``PeerDispatcher``'s handler thread. Attaching one of our own
regions never goes through the endpoint socket (same accounting, done in the caller's thread).
"""

from __future__ import annotations

import collections
import errno
import fcntl
import mmap
import os
import re
import secrets
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

from . import memfd, proto, sockets
from .contract import (
    DEFAULT_TIMEOUT,
    ID_SIZE,
    ZERO_ID,
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
from .errors import DeviceGone, DeviceProtocolError, IsmError, NoDevice, PermissionDenied, UnknownToken
from .policy import AttachRights, FreedPool, UidPolicy, dirty_bytes

__all__ = ["EmbeddedDevice", "prepare_runtime_dir", "read_or_create_gid", "runtime_dir"]

UNIX_PATH_MAX = 107
INFO_TIMEOUT = 0.5
TEMP_MAX_AGE = 60.0   # seconds after which a temp file of a crashed process is removed
_OPEN_RO = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_LOCK_PROBE = fcntl.LOCK_SH | fcntl.LOCK_NB
_EP_RE = re.compile(r"ep-([0-9a-f]{32})\.(lock|sock)")
_ADV_RE = re.compile(r"adv-([1-9][0-9]{0,19})")
_ADV_CONTENT = re.compile(rb"([0-9a-f]{32}) ([0-9a-f]{32}) ([0-9]{1,10}) ([0-9]{1,10})\n")
_ADV_SHARED = b"shared\n"     # a listener several live hubs advertise: nobody is named


def runtime_dir() -> str:
    """``SMCISH_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/smcish``, else ``/dev/shm/smcish-<uid>``
    (tmpfs), else ``/tmp/smcish-<uid>``."""
    explicit = os.environ.get("SMCISH_RUNTIME_DIR")
    if explicit:
        return os.path.abspath(explicit)
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(os.path.abspath(xdg), "smcish")
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
        return f"/dev/shm/smcish-{os.getuid()}"
    return f"/tmp/smcish-{os.getuid()}"


def prepare_runtime_dir(path: str) -> None:
    """Create ``path`` 0700 if needed; refuse it unless it is a real dir, ours, and private.

    Raises:
        NoDevice: naming the fix.
    """
    try:
        os.makedirs(path, 0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError as exc:
        raise NoDevice(f"cannot create the smcish runtime dir {path} ({exc.strerror}): set "
                       "SMCISH_RUNTIME_DIR to a writable directory") from None
    if not stat.S_ISDIR(st.st_mode):
        raise NoDevice(f"smcish runtime dir {path} is not a directory (symlink?): remove it or "
                       "set SMCISH_RUNTIME_DIR")
    if st.st_uid != os.geteuid():
        raise NoDevice(f"smcish runtime dir {path} is owned by uid {st.st_uid}, not us "
                       f"({os.geteuid()}): remove it or set SMCISH_RUNTIME_DIR")
    if st.st_mode & 0o077:
        raise NoDevice(f"smcish runtime dir {path} is accessible by group/others "
                       f"(mode {stat.S_IMODE(st.st_mode):o}): chmod 700 it or set "
                       "SMCISH_RUNTIME_DIR")


def read_or_create_gid(path: str) -> bytes:
    """The domain gid in ``<dir>/gid``: created once with link(2), so readers never see half.

    Raises:
        NoDevice: the file is corrupt or cannot be created.
    """
    gid_path = os.path.join(path, "gid")
    for _ in range(3):
        try:
            with open(gid_path, opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as fh:
                text = fh.read(64).strip()
        except FileNotFoundError:
            tmp = os.path.join(path, f".gid-{secrets.token_hex(8)}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, (secrets.token_bytes(ID_SIZE).hex() + "\n").encode())
            finally:
                os.close(fd)
            try:
                os.link(tmp, gid_path)
            except FileExistsError:
                pass  # another process won the race: read theirs
            except FileNotFoundError:
                pass  # our temp file was cleaned up under us: try again
            finally:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass
            continue
        if re.fullmatch(r"[0-9a-f]{32}", text):
            return bytes.fromhex(text)
        raise NoDevice(f"{gid_path} is corrupt: remove it (all processes using this runtime dir "
                       "must restart)")
    raise NoDevice(f"cannot create {gid_path}")


def _lockable_shared(fd: int) -> bool:
    """True if nobody holds LOCK_EX: the file's owner is dead (or it never locked it)."""
    try:
        fcntl.flock(fd, _LOCK_PROBE)
    except BlockingIOError:
        return False
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class _Owned:
    """Owner-side state of one region (mapping, fds, attach rights, attachment count)."""

    __slots__ = ("attachments", "dirty", "doorbell", "fd", "freed", "mem", "rights", "size",
                 "token")

    def __init__(self, size: int, fd: int, mem: mmap.mmap, doorbell: int) -> None:
        self.token = secrets.token_bytes(16)
        self.size = size
        self.fd = fd
        self.mem = mem
        self.doorbell = doorbell
        self.rights = AttachRights()
        self.attachments = 0
        self.freed = False
        self.dirty = size                  # leading bytes that may be non-zero (zeroed on reuse)


def _attachments(conn: ControlConn) -> dict[int, _Owned]:
    """A peer connection's attachments of our regions: its ``state``, the dict
    ``_Endpoint.accept`` put there before the connection was served."""
    return cast("dict[int, _Owned]", conn.state)


class _Endpoint:
    """ControlServer handler of our endpoint: peers attach/detach our regions, send peer ops,
    ask for info. Runs on the endpoint thread; never blocks (peer ops are deferred)."""

    def __init__(self, device: EmbeddedDevice) -> None:
        self.device = device
        self.policy = UidPolicy(fix="use ismd to share memory across uids")

    def accept(self, conn: ControlConn) -> IsmError | None:
        conn.state = {}
        return self.policy.check(conn.uid, conn.gid)

    def handle(self, conn: ControlConn, request: proto.Request, fds: list[int]) -> HandlerResult:
        op, f = request.op, request.fields
        dev = self.device
        if op in proto.PEER_OPS:
            peer = conn.peer
            if peer is None:
                raise PermissionDenied(f"{op} needs the sender's endpoint id: send hello first")
            return dev._dispatcher.submit(dev._server, conn, request, peer)
        if op == "attach":
            return dev._serve_attach(conn, f["token"], f["access"])
        if op == "detach":
            owned = _attachments(conn).pop(f["attachment"], None)
            if owned is None:
                raise UnknownToken("unknown attachment: already detached")
            dev._release(owned)
            return {}, []
        if op == "hello":
            endpoint_id = f["endpoint_id"]
            if endpoint_id != ZERO_ID:
                if conn.endpoint_id is None:
                    conn.endpoint_id = endpoint_id
                    dev._count_served(endpoint_id, +1)
                elif conn.endpoint_id != endpoint_id:
                    raise DeviceProtocolError("a connection cannot change its endpoint id")
            return {"kind": "embedded", "gid": dev.gid, "endpoint_id": dev.endpoint_id,
                    "pid": os.getpid(), "uid": conn.uid}, []
        if op == "ping":
            return {}, []
        if op == "info":
            budget = proto.MAX_BODY - 512
            connections, _ = proto.fit_list(dev._own_connections(), budget)
            return {"pid": os.getpid(), "endpoint_id": dev.endpoint_id,
                    "connections": connections}, []
        raise IsmError(f"{op} is not served by an embedded endpoint (only by ismd)")

    def disconnect(self, conn: ControlConn) -> None:
        dev = self.device
        for owned in (_attachments(conn) or {}).values():
            dev._release(owned)
        conn.state = {}
        peer = conn.peer  # not None exactly when conn.endpoint_id is set
        if (peer is not None and dev._count_served(peer.endpoint_id, -1) == 0
                and dev._dispatcher.handler):
            dev._dispatcher.gone(peer)


class EmbeddedDevice(Device):
    """The in-process device (the default). See the module docstring and docs/device.md.

    Args:
        runtime_dir_path: the shared runtime dir (default ``runtime_dir()``).
        timeout: bound on attach and peer requests.
        pool_per_size, pool_bytes: bounds of the pool of freed regions.
    Raises:
        NoDevice: an unsafe or unusable runtime dir.
    """

    kind = "embedded"
    geometry = "embedded"

    def __init__(self, runtime_dir_path: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 pool_per_size: int = 8, pool_bytes: int = 64 << 20) -> None:
        self.dir = os.path.abspath(runtime_dir_path or runtime_dir())
        self.timeout = timeout
        prepare_runtime_dir(self.dir)
        self.gid = read_or_create_gid(self.dir)
        self.endpoint_id = secrets.token_bytes(ID_SIZE)
        self._lock = threading.RLock()
        self._regions: dict[bytes, _Owned] = {}
        self._draining: set[_Owned] = set()
        self._pool: FreedPool[_Owned] = FreedPool(pool_per_size, pool_bytes)
        self._next_attachment = 0
        self._attached_count = 0
        self._peers: dict[bytes, ControlClient] = {}
        self._peer_refs: collections.Counter[bytes] = collections.Counter()
        self._pinned: set[bytes] = set()     # peers we sent peer ops to: never evicted
        # Peer ops go on a connection of their own per peer, never the one attach/detach use:
        # a peer op holds its connection until the answer, and the peer's handler may attach
        # our memory to answer it (extent_add) while our handler does the same for the peer's
        # op. On one shared connection each handler would wait for the lock the other side's
        # requester holds: a deadlock until the timeout, which then closed the connection.
        self._peer_ops: dict[bytes, ControlClient] = {}
        self._served: collections.Counter[bytes] = collections.Counter()
        self.peer_cache_max = 64
        # detached mappings still exported: (mem, fds, owner's endpoint id, attachment)
        self._zombies: list[tuple[mmap.mmap, list[int], bytes, int | _Owned]] = []
        self._adverts: set[Handle] = set()
        self._info_provider: Callable[[], list[dict[str, Any]]] | None = None
        self._dispatcher = PeerDispatcher("smcish-ism-handler", timeout)
        self._closed = False
        self._mutex_thread_lock = threading.Lock()
        self._mutex_fd: int | None = None
        self._cleanup_stale()

        self._sock_path = self._ep_path(self.endpoint_id, "sock")
        if len(self._sock_path) > UNIX_PATH_MAX:
            raise NoDevice(f"smcish runtime dir path {self.dir} is too long for a unix socket: "
                           "set SMCISH_RUNTIME_DIR to a shorter path")
        lock_path = self._ep_path(self.endpoint_id, "lock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        with self._mutex():
            self._ep_lock = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                                    | os.O_NOFOLLOW, 0o600)
            fcntl.flock(self._ep_lock, fcntl.LOCK_EX)
            try:
                listener.bind(self._sock_path)
                listener.listen(64)
            except OSError as exc:
                listener.close()
                os.close(self._ep_lock)
                os.unlink(lock_path)
                raise NoDevice(f"cannot serve the embedded endpoint in {self.dir} "
                               f"({exc.strerror}): set SMCISH_RUNTIME_DIR") from None
        self._server = ControlServer(listener, _Endpoint(self))
        self._thread = threading.Thread(target=self._serve, name="smcish-ism-endpoint",
                                        daemon=True)
        self._thread.start()

    # --- paths, locks ---

    def _ep_path(self, endpoint_id: bytes, kind: str) -> str:
        # Only the 16-byte id comes from a peer; the path is always built here, in our dir.
        return os.path.join(self.dir, f"ep-{endpoint_id.hex()}.{kind}")

    def _adv_path(self, inode: int) -> str:
        return os.path.join(self.dir, f"adv-{inode}")

    @contextmanager
    def _mutex(self) -> Iterator[None]:
        # flock excludes other processes; the thread lock the other threads of this one (they
        # share our open file description, which flock does not tell apart).
        with self._mutex_thread_lock:
            if self._mutex_fd is None:
                self._mutex_fd = os.open(os.path.join(self.dir, ".mutex"),
                                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                                         0o600)
            fcntl.flock(self._mutex_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._mutex_fd, fcntl.LOCK_UN)

    def _serve(self) -> None:
        try:
            self._server.serve()
        finally:
            self._server.close()

    def _cleanup_stale(self) -> None:
        """Remove the files of dead processes (their lock is free), under the mutex."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        now = time.time()
        with self._mutex():
            for name in names:
                path = os.path.join(self.dir, name)
                match = _EP_RE.fullmatch(name)
                if match and match.group(2) == "lock":
                    self._reap_endpoint_locked(bytes.fromhex(match.group(1)))
                elif match:  # a socket whose lock file is gone: its owner died mid-cleanup
                    if not os.path.lexists(self._ep_path(bytes.fromhex(match.group(1)), "lock")):
                        _unlink(path)
                elif _ADV_RE.fullmatch(name):
                    try:
                        fd = os.open(path, _OPEN_RO)
                    except OSError:
                        continue
                    try:
                        if _lockable_shared(fd):
                            _unlink(path)
                    finally:
                        os.close(fd)
                elif name.startswith((".gid-", ".adv-")):  # temp files of a crashed process
                    try:
                        if now - os.lstat(path).st_mtime > TEMP_MAX_AGE:
                            _unlink(path)
                    except OSError:
                        pass

    def _reap_endpoint_locked(self, endpoint_id: bytes) -> bool:
        """Under the mutex: remove a dead endpoint's socket and lock. True if it was dead."""
        lock_path = self._ep_path(endpoint_id, "lock")
        try:
            fd = os.open(lock_path, _OPEN_RO)
        except FileNotFoundError:
            _unlink(self._ep_path(endpoint_id, "sock"))
            return True
        try:
            if not _lockable_shared(fd):
                return False
            _unlink(self._ep_path(endpoint_id, "sock"))
            _unlink(lock_path)
            return True
        finally:
            os.close(fd)

    def _reap_endpoint(self, endpoint_id: bytes) -> None:
        try:
            with self._mutex():
                self._reap_endpoint_locked(endpoint_id)
        except OSError:
            pass

    def _endpoint_alive(self, endpoint_id: bytes) -> bool:
        try:
            fd = os.open(self._ep_path(endpoint_id, "lock"), _OPEN_RO)
        except OSError:
            return False
        try:
            return not _lockable_shared(fd)
        finally:
            os.close(fd)

    @property
    def available(self) -> bool:
        return not self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise DeviceGone("this embedded device was closed: get_device() opens a new one")

    # --- owner side ---

    def alloc(self, size: int) -> Region:
        check_size(size)
        self._check_open()
        self._reap_zombies()
        with self._lock:
            owned = self._pool.take(size)
        if owned is not None:
            FreedPool.scrub(owned)
            os.close(owned.doorbell)
            owned.doorbell = memfd.new_doorbell()  # a former peer may still hold the old one
            owned.token = secrets.token_bytes(16)
            owned.rights.reset()
            owned.freed = False
        else:
            fd = memfd.create_memory(size, "smcish-region")
            try:
                mem = memfd.map_owner(fd, size)
                doorbell = memfd.new_doorbell()
            except BaseException:
                os.close(fd)
                raise
            owned = _Owned(size, fd, mem, doorbell)
        with self._lock:
            self._regions[owned.token] = owned
        return Region(owned.token, size, "rw", owned.mem, owned.doorbell, owned.fd, 0, self, owned)

    def free(self, region: Region, written: int | None = None) -> None:
        self._check_region(region, "rw", "free")
        owned: _Owned = region._handle
        owned.dirty = dirty_bytes(owned.size, written)
        with self._lock:
            self._regions.pop(owned.token, None)  # the token is dead from here on
            owned.freed = True
            region.mem = None
            region.token = b""
            region.fd = region.doorbell_fd = -1
            if owned.attachments:
                self._draining.add(owned)
            else:
                self._to_pool_locked(owned)

    def _release(self, owned: _Owned) -> None:
        """An attachment of ``owned`` is gone (detach, or the peer's connection closed)."""
        with self._lock:
            owned.attachments -= 1
            if owned.freed and owned.attachments == 0 and owned in self._draining:
                self._draining.discard(owned)
                self._to_pool_locked(owned)

    def _to_pool_locked(self, owned: _Owned) -> None:
        if self._closed or not self._pool.offer(owned):
            self._destroy(owned)

    @staticmethod
    def _destroy(owned: _Owned) -> None:
        memfd.unmap(owned.mem)  # if still exported, the mapping dies with its last buffer
        memfd.close_fds((owned.fd, owned.doorbell))
        owned.fd = owned.doorbell = -1

    def _grant_attachment(self, token: bytes, uid: int, access: str) -> tuple[_Owned, int, int]:
        """Under our lock: check ``uid`` may attach ``token``; returns (owned, ro fd, doorbell dup)
        with the attachment counted. Shared by the endpoint and the local short-circuit."""
        owned = self._regions.get(token)
        if owned is None:
            raise UnknownToken("unknown region token: wrong, or freed by its owner; fall back to "
                               "TCP")
        owned.rights.check(uid, access)
        ro, doorbell = memfd.attacher_fds(owned.fd, owned.doorbell)
        owned.rights.record()
        owned.attachments += 1
        return owned, ro, doorbell

    def _serve_attach(self, conn: ControlConn, token: bytes, access: str) -> Reply:
        """Endpoint thread: the peer ``conn`` asks for ``token``."""
        with self._lock:
            owned, ro, doorbell = self._grant_attachment(token, conn.uid, access)
            self._next_attachment += 1
            aid = self._next_attachment
            _attachments(conn)[aid] = owned
        return {"attachment": aid, "size": owned.size, "offset": 0}, [ro, doorbell]

    def grant(self, token: bytes, uid: int, access: str = "r") -> None:
        with self._lock:
            self._owned(token).rights.grant(uid, access)

    def revoke(self, token: bytes, uid: int) -> None:
        with self._lock:
            self._owned(token).rights.revoke(uid)

    def _owned(self, token: bytes) -> _Owned:
        owned = self._regions.get(check_token(token))
        if owned is None:
            raise UnknownToken("unknown region token (not ours, wrong, or already freed)")
        return owned

    # --- attacher side ---

    def _connect_peer(self, endpoint_id: bytes) -> ControlClient:
        """A new connection to a peer's endpoint, introduced with our endpoint id."""
        try:
            conn = ControlClient(self._ep_path(endpoint_id, "sock"), self.timeout,
                                 "smcish endpoint")
        except OSError as exc:
            self._reap_endpoint(endpoint_id)
            gone = DeviceGone(f"the peer's ISM endpoint {endpoint_id.hex()[:8]}... is not "
                              f"reachable ({exc.strerror or exc}): its process exited or uses "
                              "another runtime dir; fall back to TCP")
            gone.delivered = False
            raise gone from None
        try:
            hello, _ = conn.request("hello", endpoint_id=self.endpoint_id)
            if hello["endpoint_id"] != endpoint_id:
                raise DeviceProtocolError("the endpoint socket answered with another endpoint "
                                          "id: the runtime dir is corrupt; fall back to TCP")
        except BaseException:
            conn.close()
            raise
        return conn

    def _peer_ops_conn(self, endpoint_id: bytes) -> ControlClient:
        """The cached connection for peer ops to ``endpoint_id`` (see ``_peer_ops``)."""
        with self._lock:
            conn = self._peer_ops.get(endpoint_id)
            if conn is not None and not conn.closed:
                return conn
            if len(self._peer_ops) >= self.peer_cache_max:
                for eid, other in list(self._peer_ops.items()):
                    if other.closed or other.hung_up():
                        other.close()
                        del self._peer_ops[eid]
        conn = self._connect_peer(endpoint_id)
        with self._lock:
            old = self._peer_ops.get(endpoint_id)
            if old is not None and not old.closed:
                conn.close()
                return old
            self._peer_ops[endpoint_id] = conn
            self._pinned.add(endpoint_id)
        return conn

    def _drop_peer_ops(self, endpoint_id: bytes, conn: ControlClient) -> None:
        with self._lock:
            if self._peer_ops.get(endpoint_id) is conn:
                del self._peer_ops[endpoint_id]
        conn.close()

    def _peer(self, endpoint_id: bytes, pin: bool = False) -> ControlClient:
        """The cached connection to a peer's endpoint for attach/detach, opened if needed."""
        with self._lock:
            conn = self._peers.get(endpoint_id)
            if conn is not None and not conn.closed:
                if pin:
                    self._pinned.add(endpoint_id)
                return conn
        conn = self._connect_peer(endpoint_id)
        with self._lock:
            old = self._peers.get(endpoint_id)
            if old is not None and not old.closed:
                conn.close()
                conn = old
            else:
                self._peers[endpoint_id] = conn
                if len(self._peers) > self.peer_cache_max:
                    self._sweep_peers_locked()
            if pin:
                self._pinned.add(endpoint_id)
        return conn

    def _prune_dead_peers(self) -> None:
        """Drop cached connections whose endpoint hung up (its process exited), reap its files."""
        with self._lock:
            dead = [ep for ep, conn in self._peers.items() if conn.closed or conn.hung_up()]
            for endpoint_id in dead:
                self._peers.pop(endpoint_id).close()
                self._pinned.discard(endpoint_id)
            for endpoint_id, conn in list(self._peer_ops.items()):
                if conn.closed or conn.hung_up():
                    del self._peer_ops[endpoint_id]
                    conn.close()
                    self._pinned.discard(endpoint_id)
                    if endpoint_id not in dead:
                        dead.append(endpoint_id)
        for endpoint_id in dead:
            self._reap_endpoint(endpoint_id)

    def _drop_peer(self, endpoint_id: bytes, conn: ControlClient) -> None:
        with self._lock:
            if self._peers.get(endpoint_id) is conn:
                del self._peers[endpoint_id]
                self._pinned.discard(endpoint_id)
        conn.close()
        self._reap_endpoint(endpoint_id)

    def _sweep_peers_locked(self) -> None:
        """Bound the peer connection cache. Never closed while alive: a connection carrying
        attachments (closing it would release them on the owner's side while we still map the
        memory) or one we sent peer ops on (the peer would take it for our death)."""
        for endpoint_id, conn in list(self._peers.items()):
            if conn.closed or conn.hung_up():
                conn.close()
                del self._peers[endpoint_id]
                self._pinned.discard(endpoint_id)
        for endpoint_id, conn in list(self._peers.items()):  # oldest first
            if len(self._peers) <= self.peer_cache_max:
                break
            if not self._peer_refs.get(endpoint_id) and endpoint_id not in self._pinned:
                conn.close()
                del self._peers[endpoint_id]

    def attach(self, token: bytes, endpoint_id: bytes, access: str = "r") -> Region:
        token = check_token(token)
        check_read_access(access)
        self._check_open()
        try:
            endpoint_id = check_id(endpoint_id)
        except ValueError as exc:
            raise DeviceProtocolError(str(exc)) from None
        self._reap_zombies()
        if endpoint_id == self.endpoint_id:
            return self._attach_local(token)
        reply, (fd, doorbell) = request_retrying_once(
            lambda: self._peer(endpoint_id), lambda conn: self._drop_peer(endpoint_id, conn),
            "attach", token=token, access="r")
        with self._lock:
            self._peer_refs[endpoint_id] += 1  # dropped again in _tell_detached
        try:
            mem = memfd.map_readonly(fd, reply["size"], reply["offset"])
        except BaseException:
            memfd.close_fds((fd, doorbell))
            self._tell_detached(endpoint_id, reply["attachment"])
            raise
        with self._lock:
            self._attached_count += 1
        return Region(token, reply["size"], "r", mem, doorbell, fd, reply["offset"], self,
                      (endpoint_id, reply["attachment"]))

    def _attach_local(self, token: bytes) -> Region:
        """Attach our own region without the endpoint socket (whose thread may be the caller,
        or busy): the same permission check and attachment accounting as a peer's attach."""
        with self._lock:
            owned, ro, doorbell = self._grant_attachment(token, os.geteuid(), "r")
        try:
            mem = memfd.map_readonly(ro, owned.size, 0)
        except BaseException:
            memfd.close_fds((ro, doorbell))
            self._release(owned)
            raise
        with self._lock:
            self._attached_count += 1
        return Region(token, owned.size, "r", mem, doorbell, ro, 0, self,
                      (self.endpoint_id, owned))

    def detach(self, region: Region) -> None:
        self._check_region(region, "r", "detach")
        # an attacher's handle: (owner's endpoint id, attachment id, or _Owned if attached locally)
        handle: tuple[bytes, int | _Owned] = region._handle
        endpoint_id, attachment = handle
        mem, fds = region.mem, [region.fd, region.doorbell_fd]
        assert mem is not None  # _check_region refused a detached region
        region.mem = None
        region.token = b""
        region.fd = region.doorbell_fd = -1
        with self._lock:
            self._attached_count -= 1
            if not memfd.unmap(mem):
                # Still exported: keep the attachment until the mapping is really gone, so the
                # owner never reuses memory we can still read.
                self._zombies.append((mem, fds, endpoint_id, attachment))
                return
        memfd.close_fds(fds)
        self._tell_detached(endpoint_id, attachment)

    def _tell_detached(self, endpoint_id: bytes, attachment: int | _Owned) -> None:
        if isinstance(attachment, _Owned):  # one of our own regions (local attach)
            self._release(attachment)
            return
        with self._lock:
            conn = self._peers.get(endpoint_id)
            self._peer_refs[endpoint_id] -= 1
            if self._peer_refs[endpoint_id] <= 0:
                del self._peer_refs[endpoint_id]
        if conn is None or conn.closed:
            if conn is not None:
                self._drop_peer(endpoint_id, conn)
            else:
                self._reap_endpoint(endpoint_id)
            return  # the connection is gone, and with it every attachment it held
        try:
            conn.request("detach", attachment=attachment)
        except DeviceGone:
            self._drop_peer(endpoint_id, conn)
        except UnknownToken:
            pass

    def _reap_zombies(self) -> None:
        """Retry unmapping detached-but-exported mappings; tell their owners once unmapped."""
        if not self._zombies:
            return
        released = []
        with self._lock:
            still = []
            for mem, fds, endpoint_id, attachment in self._zombies:
                if memfd.unmap(mem):
                    memfd.close_fds(fds)
                    released.append((endpoint_id, attachment))
                else:
                    still.append((mem, fds, endpoint_id, attachment))
            self._zombies = still
        for endpoint_id, attachment in released:  # outside our lock: may be a round trip
            self._tell_detached(endpoint_id, attachment)

    def _check_region(self, region: Region, access: str, what: str) -> None:
        if region._device is not self or region.access != access:
            how = "allocated" if access == "rw" else "attached"
            raise ValueError(f"{what}() takes a region {how} by this device")
        if region.closed:
            raise ValueError(f"region already {'freed' if access == 'rw' else 'detached'}")

    # --- socket-bound discovery ---

    def advertise(self, sock: socket.socket, hub_id: bytes) -> Handle:
        hub_id = check_id(hub_id, "hub id")
        facts = sockets.listener_facts(sock)
        self._check_open()
        content = (f"{self.endpoint_id.hex()} {hub_id.hex()} {os.getpid()} {os.getuid()}\n"
                   .encode())
        path = self._adv_path(facts.inode)
        tmp = os.path.join(self.dir, f".adv-{facts.inode}-{secrets.token_hex(6)}")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # before it has its name: nobody can see it unlocked
            with self._mutex():
                # A listening socket another live hub advertises too (a pre-fork server's
                # workers share one): any of them may accept a connection, and a claim reaches
                # only the one named, so the others would leave it unanswered (a stall of the
                # set-up timeout, and the client's first bytes in memory that hub maps). Such a
                # listener is advertised as shared: its clients stay plain TCP.
                current = self._live_advert(path)
                if current is not None and current[:2] != (self.endpoint_id, hub_id):
                    content = _ADV_SHARED
                os.write(fd, content)
                os.rename(tmp, path)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        handle = Handle("advert", (facts.inode, fd, path), self)
        with self._lock:
            self._adverts.add(handle)
        return handle

    def withdraw(self, handle: Handle) -> None:
        if not isinstance(handle, Handle) or handle.kind != "advert" or handle.device is not self:
            raise ValueError("withdraw() takes a handle returned by this device's advertise()")
        with self._lock:
            if not handle.active:
                return
            handle.active = False
            self._adverts.discard(handle)
        self._remove_advert(handle)

    def _remove_advert(self, handle: Handle) -> None:
        _, fd, path = handle.value
        try:
            with self._mutex():
                try:
                    if os.lstat(path).st_ino == os.fstat(fd).st_ino:
                        os.unlink(path)  # still ours (not replaced by a later advertiser)
                except FileNotFoundError:
                    pass
        except OSError:
            pass
        finally:
            os.close(fd)  # our lock goes with it

    def _live_advert(self, path: str) -> tuple[bytes, bytes] | tuple[str, None] | None:
        """Under the mutex: (endpoint_id, hub_id) of the live advertisement at ``path``,
        ("shared", None) for a shared one, None if there is none alive."""
        try:
            fd = os.open(path, _OPEN_RO)
        except OSError:
            return None
        try:
            if _lockable_shared(fd):
                return None
            data = os.pread(fd, 128, 0)
        except OSError:
            return None
        finally:
            os.close(fd)
        if data == _ADV_SHARED:
            return ("shared", None)
        match = _ADV_CONTENT.fullmatch(data)
        if match is None:
            return ("shared", None)
        return bytes.fromhex(match.group(1).decode()), bytes.fromhex(match.group(2).decode())

    def find_listener(self, inode: int) -> Advert | None:
        if type(inode) is not int or inode <= 0:
            raise ValueError(f"a socket inode is a positive int, got {inode!r}")
        path = self._adv_path(inode)
        try:
            fd = os.open(path, _OPEN_RO)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
                raise                   # not "not advertised": the caller reports why
            return None
        try:
            if _lockable_shared(fd):
                self._reap_advert(path, fd)
                return None
            data = os.pread(fd, 128, 0)
        except OSError:
            return None
        finally:
            os.close(fd)
        match = _ADV_CONTENT.fullmatch(data)
        if match is None:
            return None
        endpoint_id, hub_id, pid, uid = match.groups()
        return Advert(bytes.fromhex(endpoint_id.decode()), bytes.fromhex(hub_id.decode()),
                      int(pid), int(uid))

    def _reap_advert(self, path: str, fd: int) -> None:
        """A dead advertisement (we hold its lock shared): remove it unless replaced meanwhile."""
        try:
            with self._mutex():
                if os.lstat(path).st_ino == os.fstat(fd).st_ino:
                    os.unlink(path)
        except OSError:
            pass

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

    def peer_request(self, endpoint_id: bytes, op: str, **fields: Any) -> dict[str, Any]:
        endpoint_id = check_id(endpoint_id)
        if op not in proto.PEER_OPS:
            raise ValueError(f"{op!r} is not a peer op (proto.PEER_OPS: {sorted(proto.PEER_OPS)})")
        proto.encode_request(op, 0, **fields)  # ValueError before anything is sent
        self._check_open()
        if endpoint_id == self.endpoint_id:
            me = PeerInfo(self.endpoint_id, os.getpid(), os.geteuid(), os.getegid())
            return self._dispatcher.call(me, op, fields)
        reply, _ = request_retrying_once(
            lambda: self._peer_ops_conn(endpoint_id),
            lambda conn: self._drop_peer_ops(endpoint_id, conn), op, **fields)
        return reply

    def peer_alive(self, endpoint_id: bytes) -> bool:
        endpoint_id = check_id(endpoint_id)
        if endpoint_id == self.endpoint_id:
            return not self._closed
        with self._lock:
            conn = self._peers.get(endpoint_id)
        if conn is not None and (conn.closed or conn.hung_up()):
            return False
        return self._endpoint_alive(endpoint_id)

    # --- introspection ---

    def set_info_provider(self, fn: Callable[[], list[dict[str, Any]]] | None) -> None:
        self._info_provider = fn

    def _own_connections(self) -> list[dict[str, Any]]:
        fn = self._info_provider
        if fn is None:
            return []
        try:
            return [c for c in fn() if isinstance(c, dict)]
        except Exception as exc:  # noqa: BLE001 - a broken provider must not break the endpoint
            return [{"error": f"info provider failed: {exc!r}"}]

    def peers_info(self) -> list[dict[str, Any]]:
        """Ask every live endpoint in the runtime dir (ourselves included) for its connections."""
        out: list[dict[str, Any]] = []
        try:
            names = sorted(os.listdir(self.dir))
        except OSError:
            names = []
        for name in names:
            match = _EP_RE.fullmatch(name)
            if not match or match.group(2) != "lock":
                continue
            endpoint_id = bytes.fromhex(match.group(1))
            if endpoint_id == self.endpoint_id:
                out.append({"pid": os.getpid(), "endpoint_id": endpoint_id.hex(), "self": True,
                            "connections": self._own_connections()})
                continue
            if not self._endpoint_alive(endpoint_id):
                self._reap_endpoint(endpoint_id)
                continue
            try:
                conn = ControlClient(self._ep_path(endpoint_id, "sock"), INFO_TIMEOUT,
                                     "smcish endpoint")
            except OSError:
                continue
            try:
                reply, _ = conn.request("info")
                out.append({"pid": reply["pid"], "endpoint_id": reply["endpoint_id"].hex(),
                            "self": False, "connections": reply["connections"]})
            except IsmError as exc:
                out.append({"endpoint_id": endpoint_id.hex(), "error": str(exc)})
            finally:
                conn.close()
        return out

    def status(self) -> dict[str, Any]:
        self._prune_dead_peers()
        with self._lock:
            return {
                "kind": "embedded", "runtime_dir": self.dir, "gid": self.gid.hex(),
                "endpoint_id": self.endpoint_id.hex(), "pid": os.getpid(),
                "available": self.available, "regions": len(self._regions),
                "draining": len(self._draining),
                "pooled": self._pool.count,
                "pooled_bytes": self._pool.bytes,
                # fds the pool holds (memfd, doorbell, mmap's own dup on Python < 3.13)
                "pooled_fds": (2 + memfd.FDS_PER_MAPPING) * self._pool.count,
                "served_attachments": sum(o.attachments for o in self._regions.values())
                + sum(o.attachments for o in self._draining),
                "attached": self._attached_count, "zombies": len(self._zombies),
                # connections (each one fd): ours to peers' endpoints (attach and peer-op
                # connections), and peers' to ours
                "peers": len(self._peers) + len(self._peer_ops),
                "peer_channels": len(self._pinned),
                "served_peers": sum(self._served.values()),
                "adverts": len(self._adverts),
                "handler": self._dispatcher.handler is not None,
            }

    # --- teardown ---

    def close(self) -> None:
        """Stop the endpoint, withdraw every advertisement, remove our files, drop the pool.

        Regions still allocated stay mapped for their holders (peers that attached keep their
        mappings too); their tokens can no longer be attached.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            adverts = list(self._adverts)
            self._adverts.clear()
        for handle in adverts:
            handle.active = False
            self._remove_advert(handle)
        self._dispatcher.close()
        self._server.stop()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        with self._lock:
            peers = list(self._peers.values()) + list(self._peer_ops.values())
            self._peers.clear()
            self._peer_ops.clear()
            self._pinned.clear()
        for conn in peers:
            conn.close()
        try:
            with self._mutex():
                _unlink(self._sock_path)
                _unlink(self._ep_path(self.endpoint_id, "lock"))
                os.close(self._ep_lock)
                self._ep_lock = -1
        except OSError:
            pass
        with self._lock:
            for owned in self._pool.drain():
                self._destroy(owned)
        with self._mutex_thread_lock:
            if self._mutex_fd is not None:
                memfd.close_fds((self._mutex_fd,))
                self._mutex_fd = None

    def _forget_after_fork(self) -> None:
        # In a forked child: the endpoint and handler threads do not exist here. Close our
        # copies of the parent's fds without unlinking anything or releasing the parent's locks
        # (flock locks belong to the shared open file description and survive while the parent
        # holds it). A device the parent had closed holds only stale fd numbers, which may name
        # other objects' fds by now: touch nothing.
        if self._closed:
            return
        self._closed = True
        self._lock = threading.RLock()
        for conn in list(self._peers.values()) + list(self._peer_ops.values()):
            conn.forget()
        self._peers.clear()
        self._peer_ops.clear()
        self._pinned.clear()
        for handle in self._adverts:
            memfd.close_fds((handle.value[1],))
            handle.active = False
        self._adverts.clear()
        self._dispatcher.forget()
        self._server.forget()
        memfd.close_fds((self._ep_lock,))
        if self._mutex_fd is not None:
            memfd.close_fds((self._mutex_fd,))  # a new OFD is opened if ever needed again
            self._mutex_fd = None
        self._mutex_thread_lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"<EmbeddedDevice {self.dir} ep={self.endpoint_id.hex()[:8]} "
                f"{'open' if self.available else 'closed'}>")
