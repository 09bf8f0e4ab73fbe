"""ismd, the host ISM daemon, and the control-socket server loop it shares with embedded endpoints.

``python -m ism_backend.daemon [serve] --socket PATH ...`` runs the daemon; ``... status --socket
PATH`` prints its state as JSON. The daemon is single-threaded: one ``selectors`` loop serves every
client connection (SOCK_SEQPACKET, one request per record, replies in order), so its state needs no
locks and a slow or hostile client can only delay its own replies (bounded output queue, then
disconnect). It owns the device memory: each region is a fresh sealed memfd (so new memory is
always zero), accounted against the total and the owner uid's quota until its owner freed it (or
disconnected) *and* every attachment is gone.
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
import selectors
import signal
import socket
import stat
import sys
import time
from typing import Any, Callable

from . import memfd, proto
from .device import (
    ID_SIZE, MAX_REGION_SIZE, ZERO_ID, DeviceProtocolError, IsmError, PermissionDenied,
    QuotaExceeded, UnknownToken, listener_keys, normalize_host,
)

log = logging.getLogger("ism_backend.daemon")

CLAIM_TTL = 60.0        # seconds a server claim lives if never released (see Device.claim)
MAX_OUT_QUEUE = 64      # replies queued to a client that does not read; then it is dropped
RECORDS_PER_WAKEUP = 32  # fairness between clients


class ControlConn:
    """One accepted control connection and its peer credentials (SO_PEERCRED at connect)."""

    __slots__ = ("sock", "fd", "pid", "uid", "gid", "outq", "state", "closed", "want_write")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pid, self.uid, self.gid = memfd.peer_credentials(sock)
        self.outq: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self.state: Any = None
        self.closed = False
        self.want_write = False


class ControlServer:
    """A selectors loop serving control connections on a listening SOCK_SEQPACKET socket.

    ``handler`` provides ``accept(conn) -> IsmError | None`` (a refusal is sent, then the
    connection closed), ``handle(conn, request) -> (fields, fds)`` (``fds`` are handed over: the
    server closes them once sent) raising IsmError to refuse, and ``disconnect(conn)``.
    No request can stop the loop: malformed records get an error reply, unexpected exceptions
    are logged and answered as internal errors.
    """

    def __init__(self, listener: socket.socket, handler: Any) -> None:
        self.listener = listener
        self.handler = handler
        self.conns: dict[int, ControlConn] = {}
        self.selector = selectors.DefaultSelector()
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ, None)
        self._stop = False
        self._accept_paused = False

    def stop(self) -> None:
        self._stop = True

    def serve(self, wakeup_fd: int | None = None) -> None:
        """Run until ``stop()`` or until ``wakeup_fd`` becomes readable."""
        if wakeup_fd is not None:
            self.selector.register(wakeup_fd, selectors.EVENT_READ, "wakeup")
        try:
            while not self._stop:
                for key, events in self.selector.select():
                    if key.data == "wakeup":
                        self._stop = True
                    elif key.data is None:
                        self._accept()
                    else:
                        conn = key.data
                        if events & selectors.EVENT_WRITE and not conn.closed:
                            self._flush(conn)
                        if events & selectors.EVENT_READ and not conn.closed:
                            self._read(conn)
        finally:
            if wakeup_fd is not None:
                self.selector.unregister(wakeup_fd)

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self._drop(conn)
        self.selector.close()
        self.listener.close()

    # --- internals ---

    def _accept(self) -> None:
        for _ in range(RECORDS_PER_WAKEUP):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE/ENFILE: the pending connection stays pending and the listener stays
                # readable; stop polling it (no busy loop) until a connection closes.
                log.warning("accept failed: %s (pausing accepts)", exc)
                self.selector.unregister(self.listener)
                self._accept_paused = True
                return
            sock.setblocking(False)
            try:
                conn = ControlConn(sock)
            except OSError:
                sock.close()
                continue
            try:
                refusal = self.handler.accept(conn)
            except Exception:  # noqa: BLE001 - the loop must survive handler bugs
                log.exception("accept handler failed")
                refusal = IsmError("internal ismd error at connect")
            if refusal is not None:
                try:
                    memfd.send_msg(sock, proto.encode_error(0, refusal))
                except OSError:
                    pass
                sock.close()
                continue
            self.conns[conn.fd] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: ControlConn) -> None:
        for _ in range(RECORDS_PER_WAKEUP):
            try:
                record, fds, truncated = memfd.recv_msg(conn.sock, proto.MAX_RECORD)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self._drop(conn)
                return
            if not record and not fds:
                self._drop(conn)  # EOF (or an empty record: treated as a clean disconnect)
                return
            if fds:
                memfd.close_fds(fds)  # nothing we serve accepts fds from a client
                self._send(conn, proto.encode_error(0, DeviceProtocolError(
                    "requests must not carry file descriptors")), [])
            elif truncated:
                self._send(conn, proto.encode_error(0, DeviceProtocolError(
                    f"request larger than {proto.MAX_RECORD} bytes")), [])
            else:
                self._dispatch(conn, record)
            if conn.closed:
                return

    def _dispatch(self, conn: ControlConn, record: bytes) -> None:
        try:
            request = proto.decode_request(record)
        except proto.ProtoError as exc:
            self._send(conn, proto.encode_error(exc.req_id, DeviceProtocolError(str(exc))), [])
            return
        fds: list[int] = []
        try:
            fields, fds = self.handler.handle(conn, request)
            reply = proto.encode_reply(request.id, **fields)
        except IsmError as exc:
            memfd.close_fds(fds)
            fds = []
            reply = proto.encode_error(request.id, exc)
        except OSError as exc:  # resource exhaustion (EMFILE, ENOMEM): refuse, keep serving
            memfd.close_fds(fds)
            fds = []
            log.warning("%s failed: %s", request.op, exc)
            reply = proto.encode_error(request.id, QuotaExceeded(
                f"the device could not serve {request.op} ({exc.strerror or exc}): retry later "
                "or free resources"))
        except Exception:  # noqa: BLE001 - never let one request take the server down
            log.exception("%s handler failed", request.op)
            memfd.close_fds(fds)
            fds = []
            reply = proto.encode_error(request.id, IsmError(f"internal error in {request.op}"))
        self._send(conn, reply, fds)

    def _send(self, conn: ControlConn, data: bytes, fds: list[int]) -> None:
        if conn.closed:
            memfd.close_fds(fds)
            return
        if len(conn.outq) >= MAX_OUT_QUEUE:
            memfd.close_fds(fds)
            log.info("dropping pid %d: %d replies unread", conn.pid, len(conn.outq))
            self._drop(conn)
            return
        conn.outq.append((data, fds))
        if len(conn.outq) == 1:
            self._flush(conn)

    def _flush(self, conn: ControlConn) -> None:
        while conn.outq:
            data, fds = conn.outq[0]
            try:
                memfd.send_msg(conn.sock, data, fds)
            except (BlockingIOError, InterruptedError):
                if not conn.want_write:
                    conn.want_write = True
                    self.selector.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE,
                                         conn)
                return
            except OSError:
                self._drop(conn)
                return
            conn.outq.popleft()
            memfd.close_fds(fds)
        if conn.want_write:
            conn.want_write = False
            self.selector.modify(conn.sock, selectors.EVENT_READ, conn)

    def _drop(self, conn: ControlConn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.conns.pop(conn.fd, None)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        while conn.outq:
            memfd.close_fds(conn.outq.popleft()[1])
        conn.sock.close()
        try:
            self.handler.disconnect(conn)
        except Exception:  # noqa: BLE001
            log.exception("disconnect handler failed")
        if self._accept_paused:
            self._accept_paused = False
            self.selector.register(self.listener, selectors.EVENT_READ, None)


# --- the daemon's device state -------------------------------------------------------------

class _Region:
    __slots__ = ("id", "token", "owner", "uid", "pid", "size", "charged", "memfd", "doorbell",
                 "keep", "claimed", "grants", "revoked", "attachments")

    def __init__(self, region_id: int, owner: ControlConn, size: int, fd: int, doorbell: int):
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
        self.claimed = False
        self.grants: dict[int, str] = {}
        self.revoked: set[int] = set()
        self.attachments: dict[int, ControlConn] = {}

    def state(self) -> str:
        if self.token is not None:
            return "live"
        if self.owner is None:
            return "orphaned"
        return "pooled" if self.keep else "freed"


class _Client:
    __slots__ = ("owned", "attachments", "listeners", "intents", "server_claims")

    def __init__(self) -> None:
        self.owned: dict[int, _Region] = {}
        self.attachments: dict[int, _Region] = {}
        self.listeners: dict[int, tuple[str, int]] = {}
        self.intents: dict[int, tuple[int, str, int]] = {}
        self.server_claims: dict[int, tuple[int, str, int]] = {}


class Ismd:
    """The daemon's request handler: regions, grants, attachments, listeners, intents."""

    def __init__(self, *, total_memory: int, quota: int, allow_uids: set[int] = frozenset(),
                 allow_gids: set[int] = frozenset(), max_regions: int = 4096,
                 max_entries: int = 4096, gid: bytes | None = None, socket_path: str = "",
                 claim_ttl: float = CLAIM_TTL, max_connections: int = 1024):
        self.total_memory = total_memory
        self.quota = quota
        self.allow_uids = set(allow_uids)
        self.allow_gids = set(allow_gids)
        self.max_regions = max_regions      # per uid: each region costs the daemon two fds
        self.max_entries = max_entries      # per connection: attachments, listeners, intents
        self.gid = gid or secrets.token_bytes(ID_SIZE)
        self.socket_path = socket_path
        self.claim_ttl = claim_ttl
        self.max_connections = max_connections  # per uid: each costs ismd an fd
        self.connections_by_uid: collections.Counter[int] = collections.Counter()
        self.used = 0
        self.used_by_uid: collections.Counter[int] = collections.Counter()
        self.regions_by_uid: collections.Counter[int] = collections.Counter()
        self.regions: dict[bytes, _Region] = {}     # live tokens
        self.by_id: dict[int, _Region] = {}         # every region not yet reclaimed
        self.listeners: dict[tuple[str, int], set[int]] = collections.defaultdict(set)
        self.intents: dict[tuple[int, str, int], set[int]] = collections.defaultdict(set)
        # A server's "this connection stays TCP" decisions (see Device.claim), expiring lazily.
        self.server_claims: dict[tuple[int, str, int], set[int]] = collections.defaultdict(set)
        # handle -> (deadline, conn), in insertion order = deadline order (one TTL for all).
        self.claim_deadlines: dict[int, tuple[float, ControlConn]] = {}
        self.clients: dict[ControlConn, _Client] = {}
        self._next = 0
        self._ops: dict[str, Callable[[ControlConn, _Client, dict], tuple[dict, list[int]]]] = {
            op: getattr(self, "_op_" + op) for op in proto.REQUESTS
        }

    def _id(self) -> int:
        self._next += 1
        return self._next

    # --- ControlServer handler ---

    def allowed(self, uid: int, gid: int) -> bool:
        if uid == 0 or uid == os.geteuid():
            return True
        return uid in self.allow_uids or gid in self.allow_gids

    def accept(self, conn: ControlConn) -> IsmError | None:
        if not self.allowed(conn.uid, conn.gid):
            log.info("refused pid %d uid %d gid %d (policy)", conn.pid, conn.uid, conn.gid)
            return PermissionDenied(
                f"uid {conn.uid} / gid {conn.gid} is not allowed by ismd's policy: restart ismd "
                f"with --allow-uid {conn.uid} or --allow-gid {conn.gid}")
        if self.connections_by_uid[conn.uid] >= self.max_connections:
            return QuotaExceeded(f"uid {conn.uid} already has {self.max_connections} ismd "
                                 "connections: close some or raise ismd --max-connections")
        self.connections_by_uid[conn.uid] += 1
        self.clients[conn] = _Client()
        return None

    def handle(self, conn: ControlConn, request: proto.Request) -> tuple[dict, list[int]]:
        return self._ops[request.op](conn, self.clients[conn], request.fields)

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
        for handle, key in client.listeners.items():
            self._unregister(self.listeners, key, handle)
        for handle, key in client.intents.items():
            self._unregister(self.intents, key, handle)
        for handle, key in client.server_claims.items():
            self._unregister(self.server_claims, key, handle)
            self.claim_deadlines.pop(handle, None)

    def close(self) -> None:
        for region in list(self.by_id.values()):
            memfd.close_fds((region.memfd, region.doorbell))
        self.by_id.clear()
        self.regions.clear()

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

    @staticmethod
    def _unregister(table: dict, key: Any, handle: int) -> None:
        handles = table.get(key)
        if handles is not None:
            handles.discard(handle)
            if not handles:
                del table[key]

    def _entries(self, client: _Client) -> None:
        held = (len(client.attachments) + len(client.listeners) + len(client.intents)
                + len(client.server_claims))
        if held >= self.max_entries:
            raise QuotaExceeded(f"this connection holds {self.max_entries} attachments, listeners "
                                "and intents: detach/withdraw some (or raise --max-entries)")

    # --- ops ---

    def _op_hello(self, conn, client, f):
        return {"kind": "daemon", "gid": self.gid, "endpoint_id": ZERO_ID, "pid": os.getpid(),
                "uid": conn.uid}, []

    def _op_ping(self, conn, client, f):
        return {}, []

    def _op_alloc(self, conn, client, f):
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
        self.regions[region.token] = region
        self.by_id[region.id] = region
        client.owned[region.id] = region
        self.used += charged
        self.used_by_uid[uid] += charged
        self.regions_by_uid[uid] += 1
        return ({"token": region.token, "region": region.id, "size": size, "offset": 0},
                [os.dup(fd), os.dup(doorbell)])

    def _op_reuse(self, conn, client, f):
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
        region.claimed = False
        region.grants.clear()
        region.revoked.clear()
        self.regions[region.token] = region
        return ({"token": region.token, "region": region.id, "size": region.size, "offset": 0},
                [os.dup(doorbell)])

    def _op_attach(self, conn, client, f):
        region = self.regions.get(f["token"])
        if region is None:
            raise UnknownToken("unknown region token: wrong, or freed by its owner; fall back to "
                               "TCP")
        if f["access"] != "r":
            raise PermissionDenied("writable attach is not supported: regions are sealed "
                                   "F_SEAL_FUTURE_WRITE, each side writes only its own region")
        uid = conn.uid
        if uid in region.revoked:
            raise PermissionDenied(f"the owner revoked uid {uid}'s access to this region: ask "
                                   "the owner to grant() it again")
        if region.claimed and uid not in region.grants:
            raise PermissionDenied(f"this token was already attached (tokens are one-shot): the "
                                   f"owner must grant(token, uid={uid})")
        seals = memfd.get_seals(region.memfd)
        if seals & memfd.ATTACH_SEALS != memfd.ATTACH_SEALS:
            raise DeviceProtocolError("the owner has not sealed this region (F_SEAL_FUTURE_WRITE)"
                                      ": it is not attachable")
        self._entries(client)
        ro = memfd.reopen_readonly(region.memfd)
        try:
            doorbell = os.dup(region.doorbell)
        except OSError:
            os.close(ro)
            raise
        region.claimed = True
        aid = self._id()
        region.attachments[aid] = conn
        client.attachments[aid] = region
        return {"attachment": aid, "size": region.size, "offset": 0}, [ro, doorbell]

    def _op_detach(self, conn, client, f):
        region = client.attachments.pop(f["attachment"], None)
        if region is None:
            raise UnknownToken("unknown attachment: already detached")
        region.attachments.pop(f["attachment"], None)
        self._maybe_reclaim(region)
        return {}, []

    def _op_free(self, conn, client, f):
        region = self._owned(conn, f["token"])
        del self.regions[region.token]
        region.token = None
        region.keep = f["keep"]
        self._maybe_reclaim(region)
        return {}, []

    def _op_release(self, conn, client, f):
        region = client.owned.get(f["region"])
        if region is None or region.token is not None:
            raise UnknownToken("unknown pooled region")
        region.keep = False
        self._maybe_reclaim(region)
        return {}, []

    def _op_grant(self, conn, client, f):
        if f["access"] != "r":
            raise PermissionDenied("writable grants are not supported: regions are sealed "
                                   "F_SEAL_FUTURE_WRITE")
        region = self._owned(conn, f["token"])
        region.grants[f["uid"]] = f["access"]
        region.revoked.discard(f["uid"])
        return {}, []

    def _op_revoke(self, conn, client, f):
        region = self._owned(conn, f["token"])
        region.grants.pop(f["uid"], None)
        region.revoked.add(f["uid"])
        return {}, []

    def _op_advertise(self, conn, client, f):
        self._entries(client)
        key = (normalize_host(f["host"]), f["port"])
        handle = self._id()
        self.listeners[key].add(handle)
        client.listeners[handle] = key
        return {"handle": handle}, []

    def _op_withdraw(self, conn, client, f):
        key = client.listeners.pop(f["handle"], None)
        if key is None:
            raise UnknownToken("unknown advertisement handle")
        self._unregister(self.listeners, key, f["handle"])
        return {}, []

    def _op_lookup(self, conn, client, f):
        port = f["port"]
        found = any((host, port) in self.listeners for host in listener_keys(f["host"]))
        return {"found": found}, []

    def _op_add_intent(self, conn, client, f):
        self._entries(client)
        key = (f["local_port"], normalize_host(f["remote_host"]), f["remote_port"])
        handle = self._id()
        self.intents[key].add(handle)
        client.intents[handle] = key
        return {"handle": handle}, []

    def _op_remove_intent(self, conn, client, f):
        key = client.intents.pop(f["handle"], None)
        if key is None:
            raise UnknownToken("unknown intent handle")
        self._unregister(self.intents, key, f["handle"])
        return {}, []

    def _op_has_intent(self, conn, client, f):
        key = (f["peer_port"], normalize_host(f["local_host"]), f["local_port"])
        return {"found": key in self.intents}, []

    def _op_claim(self, conn, client, f):
        self._expire_claims()
        key = (f["local_port"], normalize_host(f["remote_host"]), f["remote_port"])
        if f["role"] == "client":
            if key in self.server_claims:
                return {"handle": 0}, []
            return self._op_add_intent(conn, client, f)
        if key in self.intents:
            return {"handle": 0}, []
        self._entries(client)
        handle = self._id()
        self.server_claims[key].add(handle)
        client.server_claims[handle] = key
        self.claim_deadlines[handle] = (time.monotonic() + self.claim_ttl, conn)
        return {"handle": handle}, []

    def _op_release_claim(self, conn, client, f):
        handle = f["handle"]
        if handle in client.intents:
            return self._op_remove_intent(conn, client, f)
        key = client.server_claims.pop(handle, None)
        if key is None:
            raise UnknownToken("unknown claim handle")
        self._unregister(self.server_claims, key, handle)
        self.claim_deadlines.pop(handle, None)
        return {}, []

    def _expire_claims(self) -> None:
        now = time.monotonic()
        expired = []
        for handle, (deadline, conn) in self.claim_deadlines.items():
            if deadline > now:
                break
            expired.append((handle, conn))
        for handle, conn in expired:
            del self.claim_deadlines[handle]
            client = self.clients.get(conn)
            key = client.server_claims.pop(handle, None) if client is not None else None
            if key is not None:
                self._unregister(self.server_claims, key, handle)

    def _op_info(self, conn, client, f):
        raise IsmError("info is served by embedded endpoints; ask ismd for status")

    def _op_status(self, conn, client, f):
        return {"status": self.status(conn)}, []

    # --- status ---

    def status(self, viewer: ControlConn | None = None) -> dict:
        """State as JSON-able dict. Non-root viewers see totals plus their own uid's entries.

        Tokens are never shown (they are capabilities); regions are named by id.
        """
        full = viewer is None or viewer.uid in (0, os.geteuid())

        def visible(uid: int) -> bool:
            return full or uid == viewer.uid

        regions = [{"id": r.id, "state": r.state(), "size": r.size, "owner_pid": r.pid,
                    "owner_uid": r.uid, "attachments": len(r.attachments)}
                   for r in self.by_id.values() if visible(r.uid)]
        attachments = [{"id": aid, "region": r.id, "pid": c.pid, "uid": c.uid}
                       for r in self.by_id.values() for aid, c in r.attachments.items()
                       if visible(c.uid)]
        listeners, intents, clients = [], [], []
        for conn, client in self.clients.items():
            if not visible(conn.uid):
                continue
            clients.append({"pid": conn.pid, "uid": conn.uid, "gid": conn.gid,
                            "regions": len(client.owned), "attachments": len(client.attachments),
                            "listeners": len(client.listeners), "intents": len(client.intents)})
            listeners += [{"host": h, "port": p, "pid": conn.pid}
                          for h, p in client.listeners.values()]
            intents += [{"local_port": lp, "remote_host": h, "remote_port": rp, "pid": conn.pid}
                        for lp, h, rp in client.intents.values()]
        out: dict[str, Any] = {
            "kind": "daemon", "pid": os.getpid(), "gid": self.gid.hex(), "socket": self.socket_path,
            "total_memory": self.total_memory, "used": self.used, "quota": self.quota,
            "counts": {"regions": len(self.by_id), "live_tokens": len(self.regions),
                       "clients": len(self.clients),
                       "attachments": sum(len(r.attachments) for r in self.by_id.values()),
                       "listeners": sum(len(h) for h in self.listeners.values()),
                       "intents": sum(len(h) for h in self.intents.values()),
                       "server_claims": sum(len(h) for h in self.server_claims.values())},
            "truncated": False,
        }
        budget = (proto.MAX_BODY - 2048) // 5
        for name, items in (("regions", regions), ("attachments", attachments),
                            ("listeners", listeners), ("intents", intents), ("clients", clients)):
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


def default_socket_path() -> str:
    if os.geteuid() == 0:
        return "/run/smcish/ismd.sock"
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/smcish-{os.getuid()}"
    return os.path.join(base, "ismd.sock")


def bind_listener(path: str, mode: int) -> socket.socket:
    """Bind the daemon socket, replacing a stale one but never a live daemon's."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, 0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise SystemExit(f"ismd: {path} exists and is not a socket: remove it or choose "
                             "another --socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens
        else:
            raise SystemExit(f"ismd: another ismd is already serving {path}")
        finally:
            probe.close()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    listener.bind(path)
    os.chmod(path, mode)  # who may connect is decided by SO_PEERCRED + --allow-uid/--allow-gid
    listener.listen(128)
    return listener


def serve(args: argparse.Namespace) -> int:
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
                  claim_ttl=args.claim_ttl, max_connections=args.max_connections)
    server = ControlServer(listener, daemon)
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: server.stop())
    log.info("serving %s (pid %d, total %d bytes, quota %d bytes per uid)", path, os.getpid(),
             args.total_memory, args.quota)
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
    from .client import ControlClient

    try:
        conn = ControlClient(os.path.abspath(args.socket), timeout=args.timeout, what="ismd")
    except OSError as exc:
        print(f"ismd not reachable at {args.socket}: {exc.strerror}: start ismd", file=sys.stderr)
        return 1
    try:
        reply, _ = conn.request("status")
    except IsmError as exc:
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
    parser = argparse.ArgumentParser(prog="ismd", description="smcish host ISM device daemon")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("serve", help="run the daemon (default)")
    run.add_argument("--socket", default=default_socket_path(), help="control socket path")
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
                     help="control connections per uid")
    run.add_argument("--max-entries", type=_uint, default=4096,
                     help="attachments + listeners + intents per connection")
    run.add_argument("--socket-mode", type=lambda s: int(s, 8), default=0o666,
                     help="socket file mode, octal (default 666: the uid policy decides)")
    run.add_argument("--claim-ttl", type=float, default=CLAIM_TTL,
                     help="seconds an unreleased server claim lasts (default 60)")
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
