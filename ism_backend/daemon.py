"""ismd, the host ISM daemon: device memory, grants and socket-bound discovery for several users and
containers, plus brokered peer channels; and its command line.

``python -m ism_backend.daemon [serve] --socket PATH ...`` (or ``python -m ism_backend``, or the
``ismd`` console script) runs the daemon; ``... status --socket PATH`` prints its state as JSON.
The daemon is single-threaded: one ``control.ControlServer`` loop serves every connection, so
its state needs no locks and a slow or hostile client can only delay its own replies. It owns
the device memory (each region a fresh sealed memfd, accounted against the total and the owner
uid's quota until freed *and* unmapped), the advertisements (read from the listening sockets
themselves, which it closes at once), the remote claims (copies of client sockets it keeps
until verified), and the endpoint channels it hands brokered peer channels to. Everything a
connection holds dies with it. Cross-namespace discovery runs the kernel's socket lookup inside
the server's namespace (docs/design.md section 3.4; docs/device.md section 4).
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import logging
import os
import resource
import secrets
import signal
import socket
import stat
import sys
from collections.abc import Callable, Iterable
from typing import Any

from . import memfd, proto, sockets
from .contract import ID_SIZE, MAX_REGION_SIZE, ZERO_ID
from .control import ControlClient, ControlConn, ControlServer, HandlerResult, Reply
from .errors import DeviceGone, DeviceProtocolError, IsmError, PermissionDenied, QuotaExceeded, UnknownToken
from .policy import AttachRights, UidPolicy, check_daemon_uid, check_entries

__all__ = ["Ismd", "bind_listener", "build_parser", "check_socket_dir", "default_socket_path",
           "main", "parse_bytes"]

log = logging.getLogger("ism_backend.daemon")

_NOT_FOUND = {"found": False, "endpoint_id": ZERO_ID, "hub_id": ZERO_ID, "pid": 0, "uid": 0}


class _Region:
    __slots__ = ("attachments", "charged", "doorbell", "id", "keep", "memfd", "owner", "pid",
                 "rights", "size", "token", "uid")

    def __init__(self, region_id: int, owner: ControlConn, size: int, fd: int,
                 doorbell: int) -> None:
        self.id = region_id
        self.token: bytes | None = secrets.token_bytes(16)
        self.owner: ControlConn | None = owner
        self.uid = owner.uid
        self.pid = owner.pid
        self.size = size
        self.charged = memfd.page_round(size)
        self.memfd = fd
        self.doorbell = doorbell
        self.keep = False
        self.rights = AttachRights()
        self.attachments: dict[int, ControlConn] = {}

    def state(self) -> str:
        if self.token is not None:
            return "live"
        if self.owner is None:
            return "orphaned"
        return "pooled" if self.keep else "freed"


class _Advert:
    """An advertised listener, as read from the socket itself (which ismd closed at once)."""

    __slots__ = ("conn", "endpoint_id", "facts", "handle", "hub_id", "pid", "uid")

    def __init__(self, handle: int, conn: ControlConn, hub_id: bytes,
                 facts: sockets.ListenerFacts) -> None:
        self.handle = handle
        self.conn = conn
        self.endpoint_id = conn.endpoint_id or ZERO_ID
        self.hub_id = hub_id
        self.pid = conn.pid
        self.uid = conn.uid
        self.facts = facts

    def reply(self) -> dict[str, Any]:
        return {"found": True, "endpoint_id": self.endpoint_id, "hub_id": self.hub_id,
                "pid": self.pid, "uid": self.uid}


class _RemoteClaim:
    """A client socket ismd keeps (a dup) after finding its listener in another namespace."""

    __slots__ = ("client_netns", "conn", "inode", "listener", "server_netns", "sock")

    def __init__(self, inode: int, sock: socket.socket, conn: ControlConn, client_netns: int,
                 server_netns: int, listener: int) -> None:
        self.inode = inode
        self.sock = sock
        self.conn = conn
        self.client_netns = client_netns
        self.server_netns = server_netns
        self.listener = listener


class _Netns:
    """A network namespace some advertisement lives in: an fd to it, and its diag socket."""

    __slots__ = ("diag", "fd", "inode", "owned", "refs")

    def __init__(self, inode: int, fd: int, owned: bool) -> None:
        self.inode = inode
        self.fd = fd
        self.owned = owned          # owned by ismd's own user namespace (the policy)
        self.refs = 0
        self.diag: sockets.Diag | None = None


class _Client:
    __slots__ = ("adverts", "attachments", "claims", "owned")

    def __init__(self) -> None:
        self.owned: dict[int, _Region] = {}
        self.attachments: dict[int, _Region] = {}
        self.adverts: dict[int, _Advert] = {}
        self.claims: set[int] = set()


# An op's method: (conn, its client state, the validated request fields, request fds) -> reply.
_Op = Callable[[ControlConn, _Client, dict[str, Any], list[int]], Reply]


def _endpoint(name: tuple[Any, ...]) -> tuple[str, int]:
    """A socket name normalised for comparison (v4-mapped folded, zone kept)."""
    return sockets.normalize_address(name[0])[1], name[1]


def _inet_stream(sock: socket.socket) -> bool:
    return (sock.family in (socket.AF_INET, socket.AF_INET6)
            and sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE) == socket.SOCK_STREAM)


class Ismd:
    """The daemon's request handler (a ``ControlServer`` handler). See the module docstring.

    Args:
        total_memory: bytes of region memory the device may hand out.
        quota: bytes one uid may hold.
        allow_uids, allow_gids: who may connect besides root and ismd's own uid.
        max_regions: regions per uid (each costs ismd two fds).
        max_entries: attachments + advertisements + remote claims per connection.
        gid: the device gid (random by default).
        socket_path: for status output.
        max_connections: control connections per uid (each costs ismd an fd).
    """

    def __init__(self, *, total_memory: int, quota: int, allow_uids: Iterable[int] = frozenset(),
                 allow_gids: Iterable[int] = frozenset(), max_regions: int = 4096,
                 max_entries: int = 4096, gid: bytes | None = None, socket_path: str = "",
                 max_connections: int = 1024) -> None:
        self.total_memory = total_memory
        self.quota = quota
        self.policy = UidPolicy(allow_uids, allow_gids,
                                fix="restart ismd with --allow-uid {uid} or --allow-gid {gid}")
        self.max_regions = max_regions
        self.max_entries = max_entries
        self.gid = gid or secrets.token_bytes(ID_SIZE)
        self.socket_path = socket_path
        self.max_connections = max_connections
        self.server: ControlServer | None = None
        self.userns = sockets.own_userns()
        self.connections_by_uid: collections.Counter[int] = collections.Counter()
        self.used = 0
        self.used_by_uid: collections.Counter[int] = collections.Counter()
        self.regions_by_uid: collections.Counter[int] = collections.Counter()
        self.regions: dict[bytes, _Region] = {}     # live tokens
        self.by_id: dict[int, _Region] = {}         # every region not yet reclaimed
        self.adverts: dict[int, dict[int, _Advert]] = {}   # listener inode -> handle -> advert
        self.ports: dict[int, set[int]] = {}               # port -> advertised listener inodes
        self.remote_claims: dict[int, _RemoteClaim] = {}   # client socket inode -> claim
        self.netns: dict[int, _Netns] = {}
        self.endpoints: dict[bytes, ControlConn] = {}      # endpoint id -> endpoint channel
        # endpoint id -> [pid, uid, connections saying it]: an id belongs to one process.
        self.endpoint_owners: dict[bytes, list[int]] = {}
        self.clients: dict[ControlConn, _Client] = {}
        self._next = 0
        self._ops: dict[str, _Op] = {
            op: getattr(self, "_op_" + op) for op in proto.REQUESTS if hasattr(self, "_op_" + op)
        }

    def bind(self, server: ControlServer) -> None:
        """The server whose connections this handler serves (for ``send_request``)."""
        self.server = server

    def _id(self) -> int:
        self._next += 1
        return self._next

    # --- ControlServer handler ---

    def allowed(self, uid: int, gid: int) -> bool:
        """May a client with these credentials connect (``--allow-uid``/``--allow-gid``)?"""
        return self.policy.allowed(uid, gid)

    def accept(self, conn: ControlConn) -> IsmError | None:
        refusal = self.policy.check(conn.uid, conn.gid)
        if refusal is not None:
            log.info("refused pid %d uid %d gid %d (policy)", conn.pid, conn.uid, conn.gid)
            return refusal
        if self.connections_by_uid[conn.uid] >= self.max_connections:
            return QuotaExceeded(f"uid {conn.uid} already has {self.max_connections} ismd "
                                 "connections: close some or raise ismd --max-connections")
        self.connections_by_uid[conn.uid] += 1
        self.clients[conn] = _Client()
        return None

    def handle(self, conn: ControlConn, request: proto.Request, fds: list[int]) -> HandlerResult:
        # (Ismd itself always answers at once; a subclass may answer later: DEFERRED.)
        fn = self._ops.get(request.op)
        if fn is None:
            if request.op in proto.PEER_OPS:
                raise IsmError(f"{request.op} is a peer op: send it to the peer's endpoint "
                               "(Device.peer_request), not to ismd")
            raise IsmError(f"{request.op} is not served by ismd")
        return fn(conn, self.clients[conn], request.fields, fds)

    def reply(self, conn: ControlConn, op: str, result: dict[str, Any] | IsmError) -> None:
        """A reply on an endpoint channel (to our ``take_peer``)."""
        if isinstance(result, IsmError):
            log.info("pid %d refused %s: %s", conn.pid, op, result)

    def disconnect(self, conn: ControlConn) -> None:
        client = self.clients.pop(conn, None)
        if client is None:
            return
        self.connections_by_uid[conn.uid] -= 1
        if not self.connections_by_uid[conn.uid]:
            del self.connections_by_uid[conn.uid]
        for aid, region in client.attachments.items():
            region.attachments.pop(aid, None)
            self._maybe_reclaim(region)
        for region in list(client.owned.values()):
            if region.token is not None:
                self.regions.pop(region.token, None)
                region.token = None
            region.owner = None
            region.keep = False
            self._maybe_reclaim(region)
        for advert in list(client.adverts.values()):
            self._remove_advert(advert)
        client.adverts.clear()
        for inode in list(client.claims):
            self._forget_claim(inode)
        eid = conn.endpoint_id
        if eid is not None:
            if self.endpoints.get(eid) is conn:
                del self.endpoints[eid]
            owner = self.endpoint_owners.get(eid)
            if owner is not None:
                owner[2] -= 1
                if owner[2] <= 0:
                    del self.endpoint_owners[eid]

    def close(self) -> None:
        """Release every fd the daemon holds (after the server closed its connections)."""
        for region in list(self.by_id.values()):
            memfd.close_fds((region.memfd, region.doorbell))
        self.by_id.clear()
        self.regions.clear()
        for claim in self.remote_claims.values():
            claim.sock.close()
        self.remote_claims.clear()
        for ns in self.netns.values():
            self._close_netns(ns)
        self.netns.clear()

    # --- helpers ---

    def _maybe_reclaim(self, region: _Region) -> None:
        if region.token is not None or region.attachments:
            return
        if region.owner is not None and region.keep:
            return  # in the owner's pool, reusable once asked for
        if self.by_id.pop(region.id, None) is None:
            return
        owner = self.clients.get(region.owner) if region.owner is not None else None
        if owner is not None:
            owner.owned.pop(region.id, None)
        memfd.close_fds((region.memfd, region.doorbell))
        self.used -= region.charged
        self.used_by_uid[region.uid] -= region.charged
        self.regions_by_uid[region.uid] -= 1
        if not self.used_by_uid[region.uid]:
            del self.used_by_uid[region.uid]
        if not self.regions_by_uid[region.uid]:
            del self.regions_by_uid[region.uid]

    def _owned(self, conn: ControlConn, token: bytes) -> _Region:
        region = self.regions.get(token)
        if region is None or region.owner is not conn:
            raise UnknownToken("unknown region token (not yours, wrong, or already freed)")
        return region

    def _entries(self, client: _Client) -> None:
        check_entries(len(client.attachments) + len(client.adverts) + len(client.claims),
                      self.max_entries, "detach, withdraw or release some (or raise ismd "
                      "--max-entries)")

    @staticmethod
    def _endpoint_of(conn: ControlConn, op: str) -> bytes:
        if conn.endpoint_id is None:
            raise PermissionDenied(f"{op} needs this connection's endpoint id: send hello with "
                                   "a non-zero endpoint_id first")
        return conn.endpoint_id

    @staticmethod
    def _socket_from(fds: list[int], op: str) -> socket.socket:
        fd = fds.pop()
        try:
            return socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            raise PermissionDenied(f"{op} must carry a socket") from None

    def _netns_of(self, sock: socket.socket) -> _Netns | None:
        """The namespace entry of ``sock`` (created unreferenced), None where SIOCGSKNS is
        refused (ismd is not root: cross-namespace discovery is unsupported)."""
        fd = sockets.socket_netns_fd(sock)
        if fd is None:
            return None
        inode = os.fstat(fd).st_ino
        entry = self.netns.get(inode)
        if entry is not None:
            os.close(fd)
            return entry
        owner = sockets.netns_owner(fd)
        entry = self.netns[inode] = _Netns(inode, fd, owner is not None and owner == self.userns)
        return entry

    def _unref_netns(self, inode: int | None) -> None:
        if inode is None:
            return
        entry = self.netns.get(inode)
        if entry is not None:
            entry.refs -= 1
            if entry.refs <= 0:
                self._close_netns(self.netns.pop(inode))

    @staticmethod
    def _close_netns(entry: _Netns) -> None:
        if entry.diag is not None:
            entry.diag.close()
            entry.diag = None
        memfd.close_fds((entry.fd,))
        entry.fd = -1

    def _diag(self, entry: _Netns) -> sockets.Diag | None:
        if entry.diag is None:
            try:
                entry.diag = sockets.diag_in_netns(entry.fd)
            except OSError as exc:
                log.warning("no diag socket in netns %d: %s", entry.inode, exc)
                return None
        return entry.diag

    def _remove_advert(self, advert: _Advert) -> None:
        inode = advert.facts.inode
        table = self.adverts.get(inode)
        if table is None or table.pop(advert.handle, None) is None:
            return
        if not table:
            del self.adverts[inode]
            inodes = self.ports.get(advert.facts.port)
            if inodes is not None:
                inodes.discard(inode)
                if not inodes:
                    del self.ports[advert.facts.port]
        self._unref_netns(advert.facts.netns)

    def _sole(self, inode: int) -> _Advert | None:
        """The advertiser of ``inode``, if only one hub advertises it. A listening socket
        several hubs advertise (a pre-fork server's workers share one) names nobody: any of
        them may accept a connection, and a claim reaches only the one named."""
        table = self.adverts.get(inode)
        if not table:
            return None
        adverts = iter(table.values())
        first = next(adverts)
        for other in adverts:
            if other.conn is not first.conn or other.hub_id != first.hub_id:
                return None
        return first

    def _forget_claim(self, inode: int) -> None:
        claim = self.remote_claims.pop(inode, None)
        if claim is None:
            return
        client = self.clients.get(claim.conn)
        if client is not None:
            client.claims.discard(inode)
        claim.sock.close()

    # --- ops: identity, regions ---

    def _op_hello(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                  fds: list[int]) -> Reply:
        endpoint_id = f["endpoint_id"]
        if endpoint_id != ZERO_ID:
            if conn.endpoint_id is not None and conn.endpoint_id != endpoint_id:
                raise DeviceProtocolError("a connection cannot change its endpoint id")
            if conn.endpoint_id is None:
                owner = self.endpoint_owners.get(endpoint_id)
                if owner is not None and (owner[0], owner[1]) != (conn.pid, conn.uid):
                    raise PermissionDenied("that endpoint id belongs to another process: "
                                           "endpoint ids are random per device; open a new one")
                if owner is None:
                    owner = self.endpoint_owners[endpoint_id] = [conn.pid, conn.uid, 0]
                owner[2] += 1
                conn.endpoint_id = endpoint_id
        return {"kind": "daemon", "gid": self.gid, "endpoint_id": ZERO_ID, "pid": os.getpid(),
                "uid": conn.uid}, []

    def _op_ping(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                 fds: list[int]) -> Reply:
        return {}, []

    def _op_alloc(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                  fds: list[int]) -> Reply:
        size = f["size"]
        if size > MAX_REGION_SIZE:
            raise QuotaExceeded(f"region of {size} bytes exceeds the maximum {MAX_REGION_SIZE}")
        charged = memfd.page_round(size)
        uid = conn.uid
        if self.used_by_uid[uid] + charged > self.quota:
            raise QuotaExceeded(
                f"ismd quota exceeded: uid {uid} uses {self.used_by_uid[uid]} of {self.quota} "
                f"bytes and asked for {charged}: free regions or raise ismd --quota")
        if self.used + charged > self.total_memory:
            raise QuotaExceeded(
                f"ismd device memory exhausted ({self.used} of {self.total_memory} bytes in use): "
                "free regions or raise ismd --total-memory")
        if self.regions_by_uid[uid] >= self.max_regions:
            raise QuotaExceeded(f"uid {uid} holds {self.max_regions} regions: free some or raise "
                                "ismd --max-regions")
        fd = memfd.create_memory(size, "ismd-region")
        try:
            doorbell = memfd.new_doorbell()
        except OSError:
            os.close(fd)
            raise
        region = _Region(self._id(), conn, size, fd, doorbell)
        assert region.token is not None  # a new region is live
        self.regions[region.token] = region
        self.by_id[region.id] = region
        client.owned[region.id] = region
        self.used += charged
        self.used_by_uid[uid] += charged
        self.regions_by_uid[uid] += 1
        return ({"token": region.token, "region": region.id, "size": size, "offset": 0},
                [os.dup(fd), os.dup(doorbell)])

    def _op_reuse(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                  fds: list[int]) -> Reply:
        for region in client.owned.values():
            if (region.token is None and region.keep and not region.attachments
                    and region.size == f["size"]):
                break
        else:
            raise UnknownToken("no freed region of that size is ready for reuse")
        doorbell = memfd.new_doorbell()
        os.close(region.doorbell)
        region.doorbell = doorbell
        region.token = secrets.token_bytes(16)
        region.keep = False
        region.rights.reset()
        self.regions[region.token] = region
        return ({"token": region.token, "region": region.id, "size": region.size, "offset": 0},
                [os.dup(doorbell)])

    def _op_attach(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                   fds: list[int]) -> Reply:
        region = self.regions.get(f["token"])
        if region is None:
            raise UnknownToken("unknown region token: wrong, or freed by its owner; fall back to "
                               "TCP")
        region.rights.check(conn.uid, f["access"])
        seals = memfd.get_seals(region.memfd)
        if seals & memfd.ATTACH_SEALS != memfd.ATTACH_SEALS:
            raise DeviceProtocolError("the owner has not sealed this region (F_SEAL_FUTURE_WRITE)"
                                      ": it is not attachable")
        self._entries(client)
        ro, doorbell = memfd.attacher_fds(region.memfd, region.doorbell)
        region.rights.record()
        aid = self._id()
        region.attachments[aid] = conn
        client.attachments[aid] = region
        return {"attachment": aid, "size": region.size, "offset": 0}, [ro, doorbell]

    def _op_detach(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                   fds: list[int]) -> Reply:
        region = client.attachments.pop(f["attachment"], None)
        if region is None:
            raise UnknownToken("unknown attachment: already detached")
        region.attachments.pop(f["attachment"], None)
        self._maybe_reclaim(region)
        return {}, []

    def _op_free(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                 fds: list[int]) -> Reply:
        region = self._owned(conn, f["token"])
        assert region.token is not None  # _owned found it live, by its token
        del self.regions[region.token]
        region.token = None
        region.keep = f["keep"]
        self._maybe_reclaim(region)
        return {}, []

    def _op_release(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                    fds: list[int]) -> Reply:
        region = client.owned.get(f["region"])
        if region is None or region.token is not None:
            raise UnknownToken("unknown pooled region")
        region.keep = False
        self._maybe_reclaim(region)
        return {}, []

    def _op_grant(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                  fds: list[int]) -> Reply:
        self._owned(conn, f["token"]).rights.grant(f["uid"], f["access"])
        return {}, []

    def _op_revoke(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                   fds: list[int]) -> Reply:
        self._owned(conn, f["token"]).rights.revoke(f["uid"])
        return {}, []

    # --- ops: socket-bound discovery ---

    def _op_advertise(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                      fds: list[int]) -> Reply:
        self._endpoint_of(conn, "advertise")
        self._entries(client)
        sock = self._socket_from(fds, "advertise")
        netns: _Netns | None = None
        try:
            try:
                facts = sockets.listener_facts(sock)
            except ValueError as exc:
                raise PermissionDenied(f"advertise takes the listening TCP socket itself: {exc}") \
                    from None
            netns = self._netns_of(sock)
        finally:
            sock.close()  # ismd never keeps a listener open: its owner's close() must close it
        facts = facts._replace(netns=netns.inode if netns is not None else None)
        if netns is not None:
            netns.refs += 1
        advert = _Advert(self._id(), conn, f["hub_id"], facts)
        self.adverts.setdefault(facts.inode, {})[advert.handle] = advert
        self.ports.setdefault(facts.port, set()).add(facts.inode)
        client.adverts[advert.handle] = advert
        return {"handle": advert.handle}, []

    def _op_withdraw(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                     fds: list[int]) -> Reply:
        advert = client.adverts.pop(f["handle"], None)
        if advert is None:
            raise UnknownToken("unknown advertisement handle")
        self._remove_advert(advert)
        return {}, []

    def _op_find_listener(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                          fds: list[int]) -> Reply:
        advert = self._sole(f["inode"])
        return (advert.reply() if advert is not None else dict(_NOT_FOUND)), []

    def _op_find_remote_listener(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                                 fds: list[int]) -> Reply:
        sock = self._socket_from(fds, "find_remote_listener")
        keep = False
        try:
            found = self._match_remote(sock, f["host"], f["port"])
            if found is None:
                return dict(_NOT_FOUND), []
            advert, client_ns, server_ns = found
            inode = sockets.socket_inode(sock)
            if inode in self.remote_claims:
                self._forget_claim(inode)  # the same socket asked again: the newer answer wins
            self._entries(client)
            self.remote_claims[inode] = _RemoteClaim(inode, sock, conn, client_ns, server_ns,
                                                     advert.facts.inode)
            client.claims.add(inode)
            keep = True
            return advert.reply(), []
        finally:
            if not keep:
                sock.close()

    def _match_remote(self, sock: socket.socket, host: str,
                      port: int) -> tuple[_Advert, int, int] | None:
        """The one advertised listener of another namespace that the kernel's lookup inside
        that namespace names for ``sock -> (host, port)``; None if none, several, or the
        namespace policy fails."""
        try:
            if not _inet_stream(sock) or sock.getsockopt(socket.SOL_SOCKET,
                                                         sockets.SO_ACCEPTCONN):
                raise PermissionDenied("find_remote_listener takes the client's bound TCP socket")
            name = sock.getsockname()
        except OSError:
            raise PermissionDenied("find_remote_listener takes the client's bound TCP socket") \
                from None
        if name[1] == 0:
            raise PermissionDenied("bind the client socket to its source address and port first")
        try:
            host_family, host_addr = sockets.normalize_address(host)
            client_family, client_addr = sockets.normalize_address(name[0])
        except ValueError:
            return None  # a name: ismd resolves nothing
        if host_family != client_family or client_addr in ("0.0.0.0", "::"):
            return None
        client_ns = self._netns_of(sock)
        if client_ns is None:
            return None
        try:
            if not client_ns.owned:
                return None
            matches: dict[int, _Advert] = {}
            for inode in list(self.ports.get(port, ())):
                advert = self._sole(inode)
                if advert is None or advert.facts.netns is None:
                    continue
                ns = self.netns.get(advert.facts.netns)
                if ns is None or ns.inode == client_ns.inode or not ns.owned:
                    continue
                diag = self._diag(ns)
                if diag is None:
                    continue
                try:
                    if not diag.is_local(host_addr):
                        continue  # a wildcard listener there would match, but no segment to
                        # an address that namespace does not own ever reaches it
                    hit = diag.lookup(host_family, (host_addr, port), (client_addr, name[1]))
                except (OSError, ValueError):
                    continue
                if hit is not None and hit.state == sockets.TCP_LISTEN and hit.inode == inode:
                    matches[inode] = advert
            if len(matches) != 1:
                return None  # nothing, or ambiguous (overlapping namespaces): stay TCP
            advert = next(iter(matches.values()))
            assert advert.facts.netns is not None  # matched through its namespace above
            return advert, client_ns.inode, advert.facts.netns
        finally:
            if client_ns.refs <= 0:  # not an advertised namespace: do not keep its fd
                self._close_netns(self.netns.pop(client_ns.inode))

    def _op_verify_remote_peer(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                               fds: list[int]) -> Reply:
        sock = self._socket_from(fds, "verify_remote_peer")
        try:
            claim = self.remote_claims.get(f["inode"])
            # the claim must be the asking group peer's: another endpoint could post a claim
            # naming somebody else's socket inode in its own group with this server
            verified = (claim is not None and claim.conn.endpoint_id == f["endpoint_id"]
                        and self._verify(claim, sock))
            if verified and claim is not None:
                self._forget_claim(claim.inode)
            return {"verified": verified}, []
        finally:
            sock.close()  # the accepted socket stays the server's alone

    def _verify(self, claim: _RemoteClaim, sock: socket.socket) -> bool:
        try:
            if not _inet_stream(sock):
                return False
            local, peer = sock.getsockname(), sock.getpeername()
            claim_local, claim_peer = claim.sock.getsockname(), claim.sock.getpeername()
            same = (_endpoint(claim_local) == _endpoint(peer)
                    and _endpoint(claim_peer) == _endpoint(local))
        except (OSError, ValueError):
            return False
        if not same:
            return False
        ns = self._netns_of(sock)
        if ns is None:
            return False
        try:
            return ns.owned and ns.inode == claim.server_netns
        finally:
            if ns.refs <= 0:
                self._close_netns(self.netns.pop(ns.inode))

    def _op_release_remote_claim(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                                 fds: list[int]) -> Reply:
        if f["inode"] in client.claims:
            self._forget_claim(f["inode"])
        return {}, []

    # --- ops: endpoints and brokered peer channels ---

    def _op_serve_endpoint(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                           fds: list[int]) -> Reply:
        endpoint_id = self._endpoint_of(conn, "serve_endpoint")
        current = self.endpoints.get(endpoint_id)
        if current is not None and not current.closed:
            raise PermissionDenied("this endpoint already has an endpoint channel")
        if client.owned or client.attachments or client.adverts or client.claims:
            raise IsmError("an endpoint channel must be a connection of its own: open another")
        self.endpoints[endpoint_id] = conn
        conn.outbound = True  # from now on ismd sends the requests (take_peer) on it
        conn.state = "endpoint"
        return {}, []

    def _op_connect_endpoint(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                             fds: list[int]) -> Reply:
        requester = self._endpoint_of(conn, "connect_endpoint")
        target = self.endpoints.get(f["endpoint_id"])
        if target is None or target.closed or self.server is None:
            raise DeviceGone(f"no process serves endpoint {f['endpoint_id'].hex()[:8]}... through "
                             "this ismd (it exited, or uses another device): fall back to TCP")
        ours, theirs = socket.socketpair(socket.AF_UNIX,
                                         socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        ours_fd, theirs_fd = ours.detach(), theirs.detach()
        try:
            self.server.send_request(target, "take_peer", [theirs_fd], endpoint_id=requester,
                                     pid=conn.pid, uid=conn.uid, gid=conn.gid)
        except BaseException:
            os.close(ours_fd)
            raise
        return {"pid": target.pid, "uid": target.uid, "gid": target.gid}, [ours_fd]

    def _op_take_peer(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                      fds: list[int]) -> Reply:
        raise IsmError("take_peer is sent by ismd to endpoint channels, not to it")

    def _op_info(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                 fds: list[int]) -> Reply:
        raise IsmError("info is served by embedded endpoints; ask ismd for status")

    def _op_status(self, conn: ControlConn, client: _Client, f: dict[str, Any],
                   fds: list[int]) -> Reply:
        return {"status": self.status(conn)}, []

    # --- status ---

    def status(self, viewer: ControlConn | None = None) -> dict[str, Any]:
        """State as JSON-able dict. Non-root viewers see totals plus their own uid's entries.

        Tokens are never shown (they are capabilities); regions are named by id.
        """
        viewer_uid = viewer.uid if viewer is not None else None
        full = viewer_uid is None or viewer_uid in (0, os.geteuid())

        def visible(uid: int) -> bool:
            return full or uid == viewer_uid

        regions = [{"id": r.id, "state": r.state(), "size": r.size, "owner_pid": r.pid,
                    "owner_uid": r.uid, "attachments": len(r.attachments)}
                   for r in self.by_id.values() if visible(r.uid)]
        attachments = [{"id": aid, "region": r.id, "pid": c.pid, "uid": c.uid}
                       for r in self.by_id.values() for aid, c in r.attachments.items()
                       if visible(c.uid)]
        adverts = [{"inode": a.facts.inode, "addr": a.facts.addr, "port": a.facts.port,
                    "v6only": a.facts.v6only, "netns": a.facts.netns, "pid": a.pid, "uid": a.uid}
                   for table in self.adverts.values() for a in table.values() if visible(a.uid)]
        claims = [{"inode": c.inode, "pid": c.conn.pid, "uid": c.conn.uid,
                   "client_netns": c.client_netns, "server_netns": c.server_netns,
                   "listener": c.listener}
                  for c in self.remote_claims.values() if visible(c.conn.uid)]
        endpoints = [{"endpoint_id": eid.hex(), "pid": c.pid, "uid": c.uid}
                     for eid, c in self.endpoints.items() if visible(c.uid)]
        clients = [{"pid": conn.pid, "uid": conn.uid, "gid": conn.gid,
                    "endpoint_id": conn.endpoint_id.hex() if conn.endpoint_id else None,
                    "endpoint_channel": conn.state == "endpoint",
                    "regions": len(client.owned), "attachments": len(client.attachments),
                    "adverts": len(client.adverts), "remote_claims": len(client.claims)}
                   for conn, client in self.clients.items() if visible(conn.uid)]
        out: dict[str, Any] = {
            "kind": "daemon", "pid": os.getpid(), "gid": self.gid.hex(), "socket": self.socket_path,
            "total_memory": self.total_memory, "used": self.used, "quota": self.quota,
            "cross_netns": self.userns is not None and os.geteuid() == 0,
            "counts": {"regions": len(self.by_id), "live_tokens": len(self.regions),
                       "clients": len(self.clients),
                       "attachments": sum(len(r.attachments) for r in self.by_id.values()),
                       "adverts": sum(len(t) for t in self.adverts.values()),
                       "remote_claims": len(self.remote_claims),
                       "endpoint_channels": len(self.endpoints), "netns": len(self.netns)},
            "truncated": False,
        }
        lists = (("regions", regions), ("attachments", attachments), ("adverts", adverts),
                 ("remote_claims", claims), ("endpoint_channels", endpoints),
                 ("clients", clients))
        budget = (proto.MAX_BODY - 2048) // len(lists)
        for name, items in lists:
            out[name], cut = proto.fit_list(items, budget)
            out["truncated"] |= cut
        return out


# --- process entry points ------------------------------------------------------------------

def parse_bytes(text: str) -> int:
    """``"64M"`` -> 67108864; plain integers, and K/M/G/T suffixes (powers of 1024)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    raw = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = units.get(raw[-1:], 1)
    if mult != 1:
        raw = raw[:-1]
    try:
        value = int(raw) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte count: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def _private_default_dir() -> str:
    return f"/tmp/smcish-{os.getuid()}"


def default_socket_path() -> str:
    """``/run/smcish/ismd.sock`` as root; else ``$XDG_RUNTIME_DIR/ismd.sock``, else
    ``/tmp/smcish-<uid>/ismd.sock`` (that directory created 0700)."""
    if os.geteuid() == 0:
        return "/run/smcish/ismd.sock"
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return os.path.join(os.path.abspath(xdg), "ismd.sock")
    return os.path.join(_private_default_dir(), "ismd.sock")


def check_socket_dir(directory: str) -> None:
    """Create the socket's directory if missing, and refuse one another user could tamper with.

    Refused: not a real directory (a symlink), owned by neither ismd's euid nor root, or
    writable by group/others (anyone who can write there can replace the socket and answer
    clients in ismd's name). The non-root default ``/tmp/smcish-<uid>`` must be ours and 0700.

    Raises:
        SystemExit: with a message naming the fix.
    """
    private = directory == _private_default_dir() and os.geteuid() != 0
    try:
        os.makedirs(directory, 0o700 if private else 0o755, exist_ok=True)
        st = os.lstat(directory)
    except OSError as exc:
        raise SystemExit(f"ismd: cannot create the socket directory {directory} "
                         f"({exc.strerror}): choose another --socket") from None
    euid = os.geteuid()
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISDIR(st.st_mode):
        raise SystemExit(f"ismd: refusing the socket directory {directory}: not a directory "
                         "(a symlink?); remove it or choose another --socket")
    if st.st_uid not in ((euid,) if private else (euid, 0)):
        raise SystemExit(f"ismd: refusing the socket directory {directory}: it is owned by uid "
                         f"{st.st_uid}, not by ismd's uid {euid}"
                         f"{'' if private else ' or root'}, so that user could replace the "
                         "socket; remove it or choose another --socket")
    if private and mode & 0o077:
        raise SystemExit(f"ismd: refusing the socket directory {directory}: mode {mode:o}, it "
                         f"must be private (chmod 700 {directory}) or choose another --socket")
    if mode & 0o022:
        raise SystemExit(f"ismd: refusing the socket directory {directory}: mode {mode:o} lets "
                         "group/others replace the socket; chmod go-w it (e.g. 755) or choose "
                         "another --socket")


def clear_stale_socket(path: str, sock_type: int, who: str, flag: str) -> None:
    """Remove ``path`` if it is a Unix socket nobody listens on (a previous run's), before binding.

    Raises:
        SystemExit: a non-socket is in the way, or a live process serves ``path``.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SystemExit(f"{who}: {path} exists and is not a socket: remove it or choose "
                         f"another {flag}")
    probe = socket.socket(socket.AF_UNIX, sock_type | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: nobody listens
    else:
        raise SystemExit(f"{who}: another process is already serving {path}: choose another "
                         f"{flag}")
    finally:
        probe.close()


def bind_listener(path: str, mode: int) -> socket.socket:
    """Bind the daemon socket in a checked directory, replacing a stale socket but never a live
    daemon's.

    Raises:
        SystemExit: an unsafe directory, a non-socket in the way, or a live ismd.
    """
    check_socket_dir(os.path.dirname(path) or ".")
    clear_stale_socket(path, socket.SOCK_SEQPACKET, "ismd", "--socket")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(path)
    os.chmod(path, mode)  # who may connect is decided by SO_PEERCRED + --allow-uid/--allow-gid
    listener.listen(128)
    return listener


def serve(args: argparse.Namespace) -> int:
    """``ismd serve``: bind the socket (after the directory check) and run until a signal."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="ismd: %(message)s", stream=sys.stderr)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    path = os.path.abspath(args.socket)
    listener = bind_listener(path, args.socket_mode)
    listener_ino = os.stat(path).st_ino
    daemon = Ismd(total_memory=args.total_memory, quota=args.quota,
                  allow_uids=set(args.allow_uid), allow_gids=set(args.allow_gid),
                  max_regions=args.max_regions, max_entries=args.max_entries,
                  gid=bytes.fromhex(args.gid) if args.gid else None, socket_path=path,
                  max_connections=args.max_connections)
    server = ControlServer(listener, daemon)
    daemon.bind(server)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    # The handlers only need to exist: the wake-up fd makes the loop stop. (A signal handler
    # must take no lock.)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: None)
    log.info("serving %s (pid %d, total %d bytes, quota %d bytes per uid, cross-namespace "
             "discovery %s)", path, os.getpid(), args.total_memory, args.quota,
             "on" if os.geteuid() == 0 else "off (not root)")
    try:
        server.serve(wake_r)
    finally:
        try:
            if os.stat(path).st_ino == listener_ino:
                os.unlink(path)
        except OSError:
            pass
        server.close()
        daemon.close()
        log.info("stopped")
    return 0


def status_command(args: argparse.Namespace) -> int:
    """``ismd status``: print the daemon's state as JSON (a daemon we do not trust is refused)."""
    path = os.path.abspath(args.socket)
    try:
        conn = ControlClient(path, timeout=args.timeout, what="ismd")
    except OSError as exc:
        print(f"ismd not reachable at {args.socket}: {exc.strerror}: start ismd", file=sys.stderr)
        return 1
    try:
        check_daemon_uid(conn.credentials()[1], path)
        reply, _ = conn.request("status")
    except (IsmError, OSError) as exc:
        print(f"ismd status failed: {exc}", file=sys.stderr)
        return 1
    finally:
        conn.close()
    try:
        json.dump(reply["status"], sys.stdout, indent=2, sort_keys=True)
        print()
        sys.stdout.flush()
    except BrokenPipeError:  # `ismd status | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _uint(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ismd command line."""
    parser = argparse.ArgumentParser(prog="ismd", description="smcish host ISM device daemon")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("serve", help="run the daemon (default)")
    run.add_argument("--socket", default=default_socket_path(),
                     help="control socket path (its directory must not be writable by others)")
    run.add_argument("--total-memory", type=parse_bytes, default=parse_bytes("1G"),
                     help="bytes of region memory the device may hand out (default 1G)")
    run.add_argument("--quota", type=parse_bytes, default=parse_bytes("256M"),
                     help="bytes one uid may hold (default 256M)")
    run.add_argument("--allow-uid", type=_uint, action="append", default=[],
                     help="uid allowed to connect (repeatable; root and ismd's uid always are)")
    run.add_argument("--allow-gid", type=_uint, action="append", default=[],
                     help="primary gid allowed to connect (repeatable)")
    run.add_argument("--max-regions", type=_uint, default=4096, help="regions per uid")
    run.add_argument("--max-connections", type=_uint, default=1024,
                     help="control connections per uid (a device uses two)")
    run.add_argument("--max-entries", type=_uint, default=4096,
                     help="attachments + advertisements + remote claims per connection")
    run.add_argument("--socket-mode", type=lambda s: int(s, 8), default=0o666,
                     help="socket file mode, octal (default 666: the uid policy decides)")
    run.add_argument("--gid", help="fixed device gid, 32 hex digits (default: random per start)")
    run.add_argument("-v", "--verbose", action="store_true")
    st = sub.add_parser("status", help="print the daemon's state as JSON")
    st.add_argument("--socket", default=default_socket_path())
    st.add_argument("--timeout", type=float, default=2.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """CLI: ``ismd [serve] [options]`` or ``ismd status [--socket PATH]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve", "status", "-h", "--help"):
        argv.insert(0, "serve")
    args = build_parser().parse_args(argv)
    if args.command == "status":
        return status_command(args)
    if args.gid is not None and (len(args.gid) != 2 * ID_SIZE
                                 or any(c not in "0123456789abcdef" for c in args.gid)):
        raise SystemExit("ismd: --gid must be 32 lowercase hex digits")
    try:
        return serve(args)
    except OSError as exc:
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EADDRINUSE, errno.ENAMETOOLONG):
            raise SystemExit(f"ismd: cannot serve {args.socket}: {exc.strerror}") from None
        raise


if __name__ == "__main__":
    sys.exit(main())
