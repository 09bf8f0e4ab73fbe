"""Device policy, written once for the embedded device and ismd: who may connect and attach, the
owner-side pool of freed regions, and per-connection entry limits.

- ``UidPolicy``: root, our own euid, and the uids/primary gids an administrator allowed.
- ``AttachRights``: per region: the first attacher that passes the uid policy gets a token
  (one-shot); later ones need a ``grant``; ``revoke`` refuses a uid for good (until granted
  again). Revoke cannot pull back an existing mapping.
- ``FreedPool``: freed regions kept per exact size for reuse (bounded per size and in bytes),
  zeroed on reuse only as far as the owner ever wrote (the ``written`` hint of ``free``).
- ``check_entries``: a bound on what one connection may hold (attachments, adverts, claims).
- ``trusted_daemon_uids``: which uids a client accepts as ismd (SO_PEERCRED of the daemon).
"""

from __future__ import annotations

import collections
import mmap
import os
from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

from . import memfd
from .contract import check_read_access
from .errors import NoDevice, PermissionDenied, QuotaExceeded

__all__ = ["AttachRights", "FreedPool", "PoolEntry", "UidPolicy", "check_daemon_uid",
           "check_entries", "dirty_bytes", "trusted_daemon_uids"]


class UidPolicy:
    """Which peers a device serves, by SO_PEERCRED.

    Args:
        allow_uids, allow_gids: extra uids and primary gids (root and our euid always pass).
        fix: how a refusal says to widen the policy (``{uid}``/``{gid}`` are filled in).
    """

    def __init__(self, allow_uids: Iterable[int] = (), allow_gids: Iterable[int] = (),
                 fix: str = "use ismd to share memory across uids") -> None:
        self.allow_uids = frozenset(allow_uids)
        self.allow_gids = frozenset(allow_gids)
        self.fix = fix
        self.euid = os.geteuid()

    def allowed(self, uid: int, gid: int) -> bool:
        """May a peer with these credentials use the device?"""
        return (uid == 0 or uid == self.euid or uid in self.allow_uids
                or gid in self.allow_gids)

    def check(self, uid: int, gid: int) -> PermissionDenied | None:
        """The refusal to send, or None when allowed."""
        if self.allowed(uid, gid):
            return None
        return PermissionDenied(f"uid {uid} / gid {gid} is not allowed here: "
                                + self.fix.format(uid=uid, gid=gid))


class AttachRights:
    """Who may attach one region (its owner's view); reset on pool reuse."""

    __slots__ = ("claimed", "grants", "revoked")

    def __init__(self) -> None:
        self.claimed = False
        self.grants: dict[int, str] = {}
        self.revoked: set[int] = set()

    def check(self, uid: int, access: str) -> None:
        """May ``uid`` attach now? (Call ``record`` once the attachment exists.)

        Raises:
            PermissionDenied: writable access, a revoked uid, or a spent one-shot token.
        """
        check_read_access(access)
        if uid in self.revoked:
            raise PermissionDenied(f"the owner revoked uid {uid}'s access to this region: ask "
                                   "the owner to grant() it again")
        if self.claimed and uid not in self.grants:
            raise PermissionDenied("this token was already attached (tokens are one-shot): the "
                                   f"owner must grant(token, uid={uid})")

    def record(self) -> None:
        """An attachment was made: the one-shot is spent."""
        self.claimed = True

    def grant(self, uid: int, access: str) -> None:
        """Allow ``uid`` (any number of attaches).

        Raises:
            PermissionDenied: ``access="rw"``.
        """
        check_read_access(access)
        self.grants[uid] = access
        self.revoked.discard(uid)

    def revoke(self, uid: int) -> None:
        """Refuse every future attach by ``uid`` (the first-attacher route included)."""
        self.grants.pop(uid, None)
        self.revoked.add(uid)

    def reset(self) -> None:
        """A new token for reused memory: nobody has attached it."""
        self.claimed = False
        self.grants = {}
        self.revoked = set()


def dirty_bytes(size: int, written: int | None) -> int:
    """Leading bytes of a region that may be non-zero, from the ``free(written=)`` hint."""
    if written is None:
        return size
    return max(0, min(size, int(written)))


class PoolEntry(Protocol):
    """What ``FreedPool`` needs of an entry (the owner's object for one freed region)."""

    size: int
    mem: mmap.mmap   # the owner's writable mapping
    dirty: int       # leading bytes to zero before reuse


_Entry = TypeVar("_Entry", bound=PoolEntry)


class FreedPool(Generic[_Entry]):
    """Freed regions kept for reuse, per exact size (FIFO), bounded per size and in bytes.

    Entries are the owner's objects (``PoolEntry``); they need ``size``, ``mem`` (the owner's
    writable mapping) and ``dirty`` (bytes to zero before reuse). Not thread-safe: the owner
    serialises.
    """

    def __init__(self, per_size: int = 8, max_bytes: int = 64 << 20) -> None:
        self.per_size = per_size
        self.max_bytes = max_bytes
        self._by_size: dict[int, collections.deque[_Entry]] = collections.defaultdict(
            collections.deque)
        self.count = 0
        self.bytes = 0

    def has(self, size: int) -> bool:
        """Is an entry of exactly ``size`` bytes pooled?"""
        return bool(self._by_size.get(size))

    def has_room(self, size: int) -> bool:
        """Would an entry of ``size`` bytes be kept (``offer``)?"""
        return (len(self._by_size.get(size, ())) < self.per_size
                and self.bytes + size <= self.max_bytes)

    def offer(self, entry: _Entry) -> bool:
        """Keep ``entry`` if there is room. Returns False when the caller must destroy it."""
        if not self.has_room(entry.size):
            return False
        self._by_size[entry.size].append(entry)
        self.count += 1
        self.bytes += entry.size
        return True

    def take(self, size: int) -> _Entry | None:
        """The oldest pooled entry of exactly ``size`` bytes (not yet zeroed: ``scrub`` it)."""
        queue = self._by_size.get(size)
        if not queue:
            return None
        entry = queue.popleft()
        self.count -= 1
        self.bytes -= size
        return entry

    def remove(self, entry: _Entry) -> None:
        """Take a specific entry out (ismd decided which pooled region to reuse)."""
        self._by_size[entry.size].remove(entry)
        self.count -= 1
        self.bytes -= entry.size

    def drain(self) -> list[_Entry]:
        """Empty the pool; returns the entries for the caller to destroy."""
        out = [entry for queue in self._by_size.values() for entry in queue]
        self._by_size.clear()
        self.count = 0
        self.bytes = 0
        return out

    @staticmethod
    def scrub(entry: PoolEntry) -> None:
        """Zero what may be dirty through the owner's mapping; the entry is then all dirty again
        (it is about to be handed out)."""
        memfd.zero(entry.mem, entry.dirty)
        entry.dirty = entry.size


def check_entries(held: int, limit: int, fix: str) -> None:
    """Refuse one more entry on a connection that holds ``held`` of ``limit``.

    Raises:
        QuotaExceeded: naming ``fix``.
    """
    if held >= limit:
        raise QuotaExceeded(f"this connection holds {limit} attachments, advertisements and "
                            f"remote claims: {fix}")


def trusted_daemon_uids() -> set[int]:
    """Uids a daemon may run as: root, our euid, and ``SMCISH_DAEMON_UID`` if set.

    Raises:
        NoDevice: ``SMCISH_DAEMON_UID`` is not a uid.
    """
    uids = {0, os.geteuid()}
    extra = os.environ.get("SMCISH_DAEMON_UID", "").strip()
    if extra:
        if not extra.isdigit():
            raise NoDevice(f"SMCISH_DAEMON_UID={extra!r} is not a numeric uid: fix or unset it")
        uids.add(int(extra))
    return uids


def check_daemon_uid(uid: int, path: str) -> None:
    """Refuse a daemon socket served by an untrusted uid (another user may have bound the path).

    Raises:
        NoDevice: naming ``SMCISH_DAEMON_UID``.
    """
    if uid not in trusted_daemon_uids():
        raise NoDevice(f"refusing the ismd socket {path}: it is served by uid {uid}, neither "
                       f"root nor us (uid {os.geteuid()}), so another user may be impersonating "
                       f"ismd; if you trust that daemon, set SMCISH_DAEMON_UID={uid}")
