"""The embedded ISM device: this process serves its own regions from an endpoint in a runtime dir.

Layout of the runtime directory (0700, owned by us; see docs/device.md):
``gid``                      the sharing domain's 16 random bytes (hex), created once, atomically
``.mutex``                   flock'ed around every create/remove below (never by lookups)
``ep-<id>.lock``             held flock(LOCK_EX) by the endpoint's process while it lives
``ep-<id>.sock``             its endpoint (SOCK_SEQPACKET), served by a daemon thread
``adv-<port>-<host>.<n>``    listener advertisement slot n, held LOCK_EX by the advertiser
``int-<lport>-<host>-<rport>.<n>``  connection intent (client claim) slot n, held by the client
``srv-<lport>-<host>-<rport>.<n>``  a server's "this client is plain TCP" decision (server claim)
A file whose lock can be taken (LOCK_SH|LOCK_NB succeeds) belongs to a dead process. Lookups open
slots 0, 1, ... until one is missing and report True at the first one they cannot lock shared.
Removal only ever takes the highest slot (lower dead slots stay as placeholders while a higher one
lives), so slots stay contiguous and a lookup never stops early except in the rare race documented
in docs/device.md (a false negative: the client just uses TCP; never a false positive).
"""

from __future__ import annotations

import collections
import fcntl
import functools
import os
import re
import secrets
import socket
import stat
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from . import memfd, proto
from .client import (
    ControlClient, Handle, check_read_access, check_size, check_token, unmap,
)
from .device import (
    DEFAULT_TIMEOUT, ID_SIZE, Device, DeviceGone, DeviceProtocolError, IsmError, NoDevice,
    PermissionDenied, Region, UnknownToken, listener_keys, normalize_host,
)

MAX_SLOTS = 16
#: How long a server's claim ("this connection stays TCP") outlives a release it never gets:
#: the TIME_WAIT scale, after which the same (client port, server) key may be a new connection.
CLAIM_TTL = 60.0
UNIX_PATH_MAX = 107
INFO_TIMEOUT = 0.5
_OPEN_RO = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_LOCK_PROBE = fcntl.LOCK_SH | fcntl.LOCK_NB
_SLOT_RE = re.compile(r"((?:adv|int|srv)-[0-9a-z\-]+)\.(\d+)")
_EP_RE = re.compile(r"ep-([0-9a-f]{32})\.(lock|sock)")


def runtime_dir() -> str:
    """``SMCISH_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/smcish``, else ``/dev/shm/smcish-<uid>``
    (tmpfs: every connection creates and removes a claim file there, 5x cheaper than on a disk
    file system such as /tmp often is), else ``/tmp/smcish-<uid>``."""
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
    """The domain gid in ``<dir>/gid``: created once with link(2), so readers never see half."""
    gid_path = os.path.join(path, "gid")
    for _ in range(3):
        try:
            with open(gid_path, "r", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as fh:
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


@functools.lru_cache(maxsize=4096)
def host_key(host: str) -> str:
    """A file-name-safe key for a normalised host (hex of the address, or of the name)."""
    import ipaddress

    try:
        return ipaddress.ip_address(host).packed.hex()
    except ValueError:
        return "n" + host.encode().hex()[:96]


def _lockable_shared(fd: int) -> bool:
    """True if nobody holds LOCK_EX: the file's owner is dead (or it is a placeholder)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


@functools.lru_cache(maxsize=4096)
def _lookup_prefixes(host: str, port: int) -> tuple[str, ...]:
    return tuple(f"adv-{int(port)}-{host_key(key)}" for key in listener_keys(host))


class _SlotFiles:
    """Slot files ``<prefix>.<n>`` for one key: liveness by flock, as in the module docstring."""

    def __init__(self, dirpath: str, mutex: Callable[[], Any]) -> None:
        self.dir = dirpath
        self.mutex = mutex
        # Lookups are on every connect: keep the per-key slot paths precomputed. Bounded small:
        # claim/intent keys are unique per connection (client port) and never hit again, and
        # 4096 entries of 16 paths held ~7 MB per process (tests/hardening/test_load.py).
        self.paths = functools.lru_cache(maxsize=256)(self._slot_paths)

    def _slot_paths(self, prefix: str) -> tuple[str, ...]:
        return tuple(os.path.join(self.dir, f"{prefix}.{slot}") for slot in range(MAX_SLOTS))

    def _path(self, prefix: str, slot: int) -> str:
        return self.paths(prefix)[slot]

    def alive(self, prefix: str, locked: bool = False) -> bool:
        """Is a live process holding any slot of ``prefix``? Cleans up if it saw dead ones.

        ``locked``: the caller holds the mutex (then dead slots are left for later).
        """
        saw_dead = False
        for path in self.paths(prefix):
            try:
                fd = os.open(path, _OPEN_RO)
            except FileNotFoundError:
                break
            except OSError:
                continue
            try:
                fcntl.flock(fd, _LOCK_PROBE)
            except BlockingIOError:
                return True  # somebody holds LOCK_EX: a live registration
            finally:
                os.close(fd)
            saw_dead = True
        if saw_dead and not locked:
            with self.mutex():
                self.compact(prefix)
        return False

    def register(self, prefix: str, locked: bool = False) -> tuple[int, str] | None:
        """Take the lowest free or dead slot, holding LOCK_EX. None if all slots are live."""
        if locked:
            return self._register_locked(prefix)
        with self.mutex():
            return self._register_locked(prefix)

    def _register_locked(self, prefix: str) -> tuple[int, str] | None:
        for slot in range(MAX_SLOTS):
            path = self._path(prefix, slot)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
                             | os.O_NOFOLLOW, 0o600)
            except FileExistsError:
                fd = self._take_dead(path)
                if fd is None:
                    continue
                return fd, path
            fcntl.flock(fd, fcntl.LOCK_EX)  # new file, under the mutex: uncontended
            return fd, path
        return None

    @staticmethod
    def _take_dead(path: str) -> int | None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            return None
        # A lookup may hold LOCK_SH for a few microseconds: retry briefly before giving up.
        for _ in range(50):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if not _lockable_shared(fd):
                    break  # a live owner holds LOCK_EX
                fcntl.flock(fd, fcntl.LOCK_UN)
                threading.Event().wait(0.0001)
        os.close(fd)
        return None

    def unregister(self, fd: int, path: str, prefix: str) -> None:
        with self.mutex():
            os.close(fd)  # our lock goes with it: the slot is now dead
            self.compact(prefix, self.paths(prefix).index(path))

    def compact(self, prefix: str, start: int = 0, full: bool = False) -> None:
        """Under the mutex: remove dead slots from the top down, stop at the first live one.

        The top is the last existing slot at or after ``start`` before a missing one (slots are
        contiguous); ``full`` scans every slot instead (startup cleanup after crashes).
        """
        paths = self.paths(prefix)
        top = start - 1
        for slot in range(start, MAX_SLOTS):
            try:
                os.lstat(paths[slot])
            except FileNotFoundError:
                if not full:
                    break
                continue
            top = slot
        for slot in range(top, -1, -1):
            path = self._path(prefix, slot)
            try:
                fd = os.open(path, _OPEN_RO)
            except FileNotFoundError:
                continue
            try:
                if not _lockable_shared(fd):
                    return
                os.unlink(path)
            finally:
                os.close(fd)


class _Owned:
    """Owner-side state of one region (mapping, fds, grants, attachment count)."""

    __slots__ = ("token", "size", "fd", "mem", "doorbell", "claimed", "grants", "revoked",
                 "attachments", "freed", "dirty")

    def __init__(self, size: int, fd: int, mem: Any, doorbell: int) -> None:
        self.token = secrets.token_bytes(16)
        self.size = size
        self.fd = fd
        self.mem = mem
        self.doorbell = doorbell
        self.claimed = False
        self.grants: dict[int, str] = {}
        self.revoked: set[int] = set()
        self.attachments = 0
        self.freed = False
        self.dirty = size                  # leading bytes that may be non-zero (zeroed on reuse)


class _Endpoint:
    """ControlServer handler of our endpoint: peers attach/detach our regions, ask for info."""

    def __init__(self, device: "EmbeddedDevice") -> None:
        self.device = device

    def accept(self, conn: Any) -> IsmError | None:
        if conn.uid not in (0, os.geteuid()):
            return PermissionDenied(f"uid {conn.uid} may not use this embedded endpoint: use ismd "
                                    "to share memory across uids")
        conn.state = {}
        return None

    def handle(self, conn: Any, request: proto.Request) -> tuple[dict, list[int]]:
        op, f = request.op, request.fields
        dev = self.device
        if op == "attach":
            return dev._serve_attach(conn, f["token"], f["access"])
        if op == "detach":
            owned = conn.state.pop(f["attachment"], None)
            if owned is None:
                raise UnknownToken("unknown attachment: already detached")
            dev._release(owned)
            return {}, []
        if op == "hello":
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

    def disconnect(self, conn: Any) -> None:
        for owned in (conn.state or {}).values():
            self.device._release(owned)
        conn.state = {}


class EmbeddedDevice(Device):
    """The in-process device (the default). See the module docstring and docs/device.md."""

    kind = "embedded"

    def __init__(self, runtime_dir_path: str | None = None, timeout: float = DEFAULT_TIMEOUT,
                 pool_per_size: int = 8, pool_bytes: int = 64 << 20) -> None:
        from .daemon import ControlServer

        self.dir = os.path.abspath(runtime_dir_path or runtime_dir())
        self.timeout = timeout
        self.pool_per_size = pool_per_size
        self.pool_bytes = pool_bytes
        prepare_runtime_dir(self.dir)
        self.gid = read_or_create_gid(self.dir)
        self.endpoint_id = secrets.token_bytes(ID_SIZE)
        self._lock = threading.RLock()
        self._regions: dict[bytes, _Owned] = {}
        self._draining: set[_Owned] = set()
        self._pool: dict[int, collections.deque[_Owned]] = collections.defaultdict(
            collections.deque)
        self._pooled_bytes = 0
        self._next_attachment = 0
        self._attached_count = 0
        self._peers: dict[bytes, ControlClient] = {}
        self._peer_refs: collections.Counter[bytes] = collections.Counter()
        self.peer_cache_max = 64
        self._zombies: list[tuple[Any, list[int], bytes, int]] = []
        self._handles: set[Handle] = set()
        self._server_claims: dict[Handle, float] = {}
        self._info_provider: Callable[[], list[dict]] | None = None
        self._closed = False
        self._mutex_thread_lock = threading.Lock()
        self._mutex_fd: int | None = None
        self._slots = _SlotFiles(self.dir, self._mutex)
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
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._server = ControlServer(listener, _Endpoint(self))
        self._thread = threading.Thread(target=self._serve, name="smcish-ism-endpoint",
                                        daemon=True)
        self._thread.start()

    # --- paths, locks ---

    def _ep_path(self, endpoint_id: bytes, kind: str) -> str:
        # Only the 16-byte id comes from a peer; the path is always built here, in our dir.
        return os.path.join(self.dir, f"ep-{endpoint_id.hex()}.{kind}")

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
            self._server.serve(self._wake_r)
        finally:
            self._server.close()

    def _cleanup_stale(self) -> None:
        """Remove the files of dead processes (their lock is free), under the mutex."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        prefixes = set()
        with self._mutex():
            for name in names:
                match = _EP_RE.fullmatch(name)
                if match and match.group(2) == "lock":
                    self._reap_endpoint_locked(bytes.fromhex(match.group(1)))
                elif match:  # a socket whose lock file is gone: its owner died mid-cleanup
                    if not os.path.lexists(self._ep_path(bytes.fromhex(match.group(1)), "lock")):
                        self._unlink(os.path.join(self.dir, name))
                elif name.startswith(".gid-"):  # a gid temp file of a crashed first start
                    path = os.path.join(self.dir, name)
                    try:
                        if time.time() - os.lstat(path).st_mtime > 60:
                            self._unlink(path)
                    except OSError:
                        pass
                else:
                    slot = _SLOT_RE.fullmatch(name)
                    if slot:
                        prefixes.add(slot.group(1))
            for prefix in prefixes:
                self._slots.compact(prefix, full=True)

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def _reap_endpoint_locked(self, endpoint_id: bytes) -> bool:
        """Under the mutex: remove a dead endpoint's socket and lock. True if it was dead."""
        lock_path = self._ep_path(endpoint_id, "lock")
        try:
            fd = os.open(lock_path, _OPEN_RO)
        except FileNotFoundError:
            self._unlink(self._ep_path(endpoint_id, "sock"))
            return True
        try:
            if not _lockable_shared(fd):
                return False
            self._unlink(self._ep_path(endpoint_id, "sock"))
            self._unlink(lock_path)
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
            pooled = self._pool.get(size)
            owned = pooled.popleft() if pooled else None
            if owned is not None:
                self._pooled_bytes -= size
        if owned is not None:
            memfd.zero(owned.mem, owned.dirty)
            owned.dirty = size
            os.close(owned.doorbell)
            owned.doorbell = memfd.new_doorbell()  # nobody else holds this one
            owned.token = secrets.token_bytes(16)
            owned.claimed = False
            owned.grants = {}
            owned.revoked = set()
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
        if written is not None:
            owned.dirty = max(0, min(owned.size, int(written)))
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
        """An attachment of ``owned`` is gone (detach or the peer's connection closed)."""
        with self._lock:
            owned.attachments -= 1
            if owned.freed and owned.attachments == 0 and owned in self._draining:
                self._draining.discard(owned)
                self._to_pool_locked(owned)

    def _to_pool_locked(self, owned: _Owned) -> None:
        size = owned.size
        if (not self._closed and len(self._pool[size]) < self.pool_per_size
                and self._pooled_bytes + size <= self.pool_bytes):
            self._pool[size].append(owned)
            self._pooled_bytes += size
        else:
            self._destroy(owned)

    @staticmethod
    def _destroy(owned: _Owned) -> None:
        unmap(owned.mem)  # if still exported, the mapping dies with its last buffer
        memfd.close_fds((owned.fd, owned.doorbell))
        owned.fd = owned.doorbell = -1

    def _serve_attach(self, conn: Any, token: bytes, access: str) -> tuple[dict, list[int]]:
        """Endpoint thread: the peer ``conn`` asks for ``token``."""
        if access != "r":
            raise PermissionDenied("writable attach is not supported: regions are sealed "
                                   "F_SEAL_FUTURE_WRITE, each side writes only its own region")
        with self._lock:
            owned = self._regions.get(token)
            if owned is None:
                raise UnknownToken("unknown region token: wrong, or freed by its owner; fall "
                                   "back to TCP")
            uid = conn.uid
            if uid in owned.revoked:
                raise PermissionDenied(f"the owner revoked uid {uid}'s access to this region: "
                                       "ask the owner to grant() it again")
            if owned.claimed and uid not in owned.grants:
                raise PermissionDenied("this token was already attached (tokens are one-shot): "
                                       f"the owner must grant(token, uid={uid})")
            ro = memfd.reopen_readonly(owned.fd)
            try:
                doorbell = os.dup(owned.doorbell)
            except OSError:
                os.close(ro)
                raise
            owned.claimed = True
            owned.attachments += 1
            self._next_attachment += 1
            aid = self._next_attachment
            conn.state[aid] = owned
        return {"attachment": aid, "size": owned.size, "offset": 0}, [ro, doorbell]

    def grant(self, token: bytes, uid: int, access: str = "r") -> None:
        check_read_access(access)
        with self._lock:
            owned = self._owned(token)
            owned.grants[uid] = access
            owned.revoked.discard(uid)

    def revoke(self, token: bytes, uid: int) -> None:
        with self._lock:
            owned = self._owned(token)
            owned.grants.pop(uid, None)
            owned.revoked.add(uid)

    def _owned(self, token: bytes) -> _Owned:
        owned = self._regions.get(check_token(token))
        if owned is None:
            raise UnknownToken("unknown region token (not ours, wrong, or already freed)")
        return owned

    # --- attacher side ---

    def _peer(self, endpoint_id: bytes) -> ControlClient:
        with self._lock:
            conn = self._peers.get(endpoint_id)
            if conn is not None and not conn.closed:
                return conn
        try:
            conn = ControlClient(self._ep_path(endpoint_id, "sock"), self.timeout,
                                 "smcish endpoint")
        except OSError as exc:
            self._reap_endpoint(endpoint_id)
            raise DeviceGone(f"the peer's ISM endpoint {endpoint_id.hex()[:8]}... is not "
                             f"reachable ({exc.strerror or exc}): its process exited or uses "
                             "another runtime dir; fall back to TCP") from None
        with self._lock:
            old = self._peers.get(endpoint_id)
            if old is not None and not old.closed:
                conn.close()
                return old
            self._peers[endpoint_id] = conn
            if len(self._peers) > self.peer_cache_max:
                self._sweep_peers_locked()
        return conn

    def _prune_dead_peers(self) -> None:
        """Drop cached connections whose endpoint hung up (its process exited), reap its files.

        Safe even with attachments left: nobody is on the other side to release them to.
        """
        with self._lock:
            dead = [ep for ep, conn in self._peers.items() if conn.closed or conn.hung_up()]
            for endpoint_id in dead:
                self._peers.pop(endpoint_id).close()
        for endpoint_id in dead:
            self._reap_endpoint(endpoint_id)

    def _drop_peer(self, endpoint_id: bytes, conn: ControlClient) -> None:
        with self._lock:
            if self._peers.get(endpoint_id) is conn:
                del self._peers[endpoint_id]
        conn.close()
        self._reap_endpoint(endpoint_id)

    def _sweep_peers_locked(self) -> None:
        """Bound the peer connection cache (peers come and go; their sockets must not pile up).

        A live connection that still carries attachments is never closed: closing it would
        release them on the owner's side while we still map the memory.
        """
        for endpoint_id, conn in list(self._peers.items()):
            if conn.closed or conn.hung_up():
                conn.close()
                del self._peers[endpoint_id]
        for endpoint_id, conn in list(self._peers.items()):  # oldest first
            if len(self._peers) <= self.peer_cache_max:
                break
            if not self._peer_refs.get(endpoint_id):
                conn.close()
                del self._peers[endpoint_id]

    def attach(self, token: bytes, endpoint_id: bytes, access: str = "r") -> Region:
        token = check_token(token)
        check_read_access(access)
        self._check_open()
        if not isinstance(endpoint_id, (bytes, bytearray)) or len(endpoint_id) != ID_SIZE:
            raise DeviceProtocolError(f"an endpoint id is {ID_SIZE} bytes")
        endpoint_id = bytes(endpoint_id)
        self._reap_zombies()
        for attempt in (0, 1):
            conn = self._peer(endpoint_id)
            try:
                reply, (fd, doorbell) = conn.request("attach", token=token, access="r")
                with self._lock:
                    self._peer_refs[endpoint_id] += 1  # dropped again in _tell_detached
                break
            except DeviceGone as exc:
                # A cached connection may have broken since its last use: reconnect once (but
                # never after a timeout, which already spent the bound).
                self._drop_peer(endpoint_id, conn)
                if attempt or getattr(exc, "timed_out", False):
                    raise
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

    def detach(self, region: Region) -> None:
        self._check_region(region, "r", "detach")
        endpoint_id, attachment = region._handle
        mem, fds = region.mem, [region.fd, region.doorbell_fd]
        region.mem = None
        region.token = b""
        region.fd = region.doorbell_fd = -1
        with self._lock:
            self._attached_count -= 1
            if not unmap(mem):
                # Still exported: keep the attachment until the mapping is really gone, so the
                # owner never reuses memory we can still read.
                self._zombies.append((mem, fds, endpoint_id, attachment))
                return
        memfd.close_fds(fds)
        self._tell_detached(endpoint_id, attachment)

    def _tell_detached(self, endpoint_id: bytes, attachment: int) -> None:
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
                if unmap(mem):
                    memfd.close_fds(fds)
                    released.append((endpoint_id, attachment))
                else:
                    still.append((mem, fds, endpoint_id, attachment))
            self._zombies = still
        # Outside our lock: the owner may be this very process (its endpoint thread needs it).
        for endpoint_id, attachment in released:
            self._tell_detached(endpoint_id, attachment)

    def _check_region(self, region: Region, access: str, what: str) -> None:
        if region._device is not self or region.access != access:
            how = "allocated" if access == "rw" else "attached"
            raise ValueError(f"{what}() takes a region {how} by this device")
        if region.closed:
            raise ValueError(f"region already {'freed' if access == 'rw' else 'detached'}")

    # --- discovery ---

    @staticmethod
    def _adv_prefix(host: str, port: int) -> str:
        return f"adv-{int(port)}-{host_key(normalize_host(host))}"

    @staticmethod
    def _intent_prefix(local_port: int, remote_host: str, remote_port: int,
                       kind: str = "int") -> str:
        return (f"{kind}-{int(local_port)}-{host_key(normalize_host(remote_host))}"
                f"-{int(remote_port)}")

    def _register(self, kind: str, prefix: str) -> Handle:
        self._check_open()
        taken = self._slots.register(prefix)
        if taken is None:
            raise IsmError(f"{MAX_SLOTS} live processes already registered {prefix}: not "
                           "registered (connections fall back to TCP)")
        handle = Handle(kind, (prefix, taken[0], taken[1]), self)
        with self._lock:
            self._handles.add(handle)
        return handle

    def _unregister(self, handle: Handle, kind: str, op: str) -> None:
        if not isinstance(handle, Handle) or handle.kind != kind or handle.device is not self:
            raise ValueError(f"{op}() takes a handle returned by this device")
        with self._lock:
            if not handle.active:
                return
            handle.active = False
            self._handles.discard(handle)
        prefix, fd, path = handle.value
        self._slots.unregister(fd, path, prefix)

    def advertise(self, host: str, port: int) -> Handle:
        return self._register("listener", self._adv_prefix(host, port))

    def withdraw(self, handle: Handle) -> None:
        self._unregister(handle, "listener", "withdraw")

    def lookup(self, host: str, port: int) -> bool:
        alive = self._slots.alive
        for prefix in _lookup_prefixes(host, port):
            if alive(prefix):
                return True
        return False

    def add_intent(self, local_port: int, remote_host: str, remote_port: int) -> Handle:
        return self._register("intent", self._intent_prefix(local_port, remote_host, remote_port))

    def remove_intent(self, handle: Handle) -> None:
        self._unregister(handle, "intent", "remove_intent")

    def has_intent(self, peer_port: int, local_host: str, local_port: int) -> bool:
        return self._slots.alive(self._intent_prefix(peer_port, local_host, local_port))

    def claim(self, client_port: int, server_host: str, server_port: int,
              role: str) -> Handle | None:
        """Atomic test-and-set of "will this client propose?" for one TCP connection.

        See ``Device.claim``. Never raises a device error: a failure answers "stay TCP".
        """
        if role not in ("client", "server"):
            raise ValueError(f"role must be 'client' or 'server', got {role!r}")
        intent = self._intent_prefix(client_port, server_host, server_port)
        marker = self._intent_prefix(client_port, server_host, server_port, "srv")
        mine, theirs = (intent, marker) if role == "client" else (marker, intent)
        try:
            self._check_open()
            self._expire_server_claims()
            with self._mutex():
                if self._slots.alive(theirs, locked=True):
                    return None
                taken = self._slots.register(mine, locked=True)
        except (IsmError, OSError):
            taken = None
        if taken is None:
            # Device trouble or every slot live. Client: None, do not propose. Server: None too,
            # "the client may propose": the server then waits for the client's first bytes, so a
            # proposal is never taken for data; a plain client costs at most the handshake timeout.
            return None
        handle = Handle("intent" if role == "client" else "server-claim",
                        (mine, taken[0], taken[1]), self)
        with self._lock:
            self._handles.add(handle)
            if role == "server":
                self._server_claims[handle] = time.monotonic() + CLAIM_TTL
        return handle

    def release_claim(self, handle: Handle) -> None:
        if not isinstance(handle, Handle) or handle.kind not in ("intent", "server-claim"):
            raise ValueError("release_claim() takes a handle returned by claim()")
        if handle.value is None:
            handle.active = False
            return
        with self._lock:
            self._server_claims.pop(handle, None)
        self._unregister(handle, handle.kind, "release_claim")

    def _expire_server_claims(self) -> None:
        # The transport keeps no reference to a server claim: they expire after CLAIM_TTL.
        if not self._server_claims:
            return
        now = time.monotonic()
        expired = []
        with self._lock:
            for handle, deadline in self._server_claims.items():  # insertion = deadline order
                if deadline > now:
                    break
                expired.append(handle)
            for handle in expired:
                del self._server_claims[handle]
        for handle in expired:
            self._unregister(handle, "server-claim", "expire")

    # --- introspection ---

    def set_info_provider(self, fn: Callable[[], list[dict]] | None) -> None:
        self._info_provider = fn

    def _own_connections(self) -> list[dict]:
        fn = self._info_provider
        if fn is None:
            return []
        try:
            return [c for c in fn() if isinstance(c, dict)]
        except Exception as exc:  # noqa: BLE001 - a broken provider must not break the endpoint
            return [{"error": f"info provider failed: {exc!r}"}]

    def peers_info(self) -> list[dict]:
        """Ask every live endpoint in the runtime dir (ourselves included) for its connections."""
        out = []
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

    def status(self) -> dict:
        self._prune_dead_peers()
        with self._lock:
            return {
                "kind": "embedded", "runtime_dir": self.dir, "gid": self.gid.hex(),
                "endpoint_id": self.endpoint_id.hex(), "pid": os.getpid(),
                "available": self.available, "regions": len(self._regions),
                "draining": len(self._draining),
                "pooled": sum(len(q) for q in self._pool.values()),
                "pooled_bytes": self._pooled_bytes,
                # fds the pool holds (memfd, doorbell, mmap's own dup on Python < 3.13)
                "pooled_fds": (2 + memfd.FDS_PER_MAPPING)
                * sum(len(q) for q in self._pool.values()),
                "served_attachments": sum(o.attachments for o in self._regions.values())
                + sum(o.attachments for o in self._draining),
                "attached": self._attached_count, "zombies": len(self._zombies),
                "peers": len(self._peers),
                "listeners": sum(1 for h in self._handles if h.kind == "listener"),
                "intents": sum(1 for h in self._handles if h.kind == "intent"),
                "server_claims": len(self._server_claims),
            }

    # --- teardown ---

    def close(self) -> None:
        """Stop the endpoint, withdraw every registration, remove our files, drop the pool.

        Regions still allocated stay mapped for their holders (peers that attached keep their
        mappings too); their tokens can no longer be attached.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            handles = list(self._handles)
            self._server_claims.clear()
        for handle in handles:
            try:
                self._unregister(handle, handle.kind, "close")
            except OSError:
                pass
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2.0)
        with self._lock:
            peers = list(self._peers.values())
            self._peers.clear()
        for conn in peers:
            conn.close()
        try:
            with self._mutex():
                self._unlink(self._sock_path)
                self._unlink(self._ep_path(self.endpoint_id, "lock"))
                os.close(self._ep_lock)
        except OSError:
            pass
        with self._lock:
            for queue in self._pool.values():
                for owned in queue:
                    self._destroy(owned)
            self._pool.clear()
            self._pooled_bytes = 0
        memfd.close_fds((self._wake_r, self._wake_w))
        with self._mutex_thread_lock:
            if self._mutex_fd is not None:
                memfd.close_fds((self._mutex_fd,))
                self._mutex_fd = None

    def _forget_after_fork(self) -> None:
        # In a forked child: the endpoint thread does not exist here. Close our copies of the
        # parent's fds without unlinking anything or releasing the parent's locks (flock locks
        # belong to the shared open file description and survive while the parent holds it).
        self._closed = True
        self._lock = threading.RLock()
        for conn in self._peers.values():
            conn.forget()
        self._peers.clear()
        for handle in self._handles:
            memfd.close_fds((handle.value[1],))
            handle.active = False
        self._handles.clear()
        self._server_claims.clear()
        try:
            self._server.listener.close()
            self._server.selector.close()
        except OSError:
            pass
        memfd.close_fds((self._ep_lock, self._wake_r, self._wake_w))
        if self._mutex_fd is not None:
            memfd.close_fds((self._mutex_fd,))  # a new OFD is opened if ever needed again
            self._mutex_fd = None
        self._mutex_thread_lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"<EmbeddedDevice {self.dir} ep={self.endpoint_id.hex()[:8]} "
                f"{'open' if self.available else 'closed'}>")
