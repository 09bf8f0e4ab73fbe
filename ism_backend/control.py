"""Control connections: the client (``ControlClient``), the serving loop (``ControlServer``) and the
thread peer ops are handled on (``PeerDispatcher``).

Every device conversation is one of these: a process and ismd, a process and a peer's embedded
endpoint, ismd and a process's *endpoint channel*, two processes over a peer channel ismd
brokered. One request at a time per client connection, every reply validated by ``proto``, every
wait bounded; a connection that timed out or broke is closed and reported as ``DeviceGone``.

``ControlServer`` is a single-threaded ``selectors`` loop: it owns no device state, a slow or
hostile client can only delay its own replies (bounded output queue, then disconnect), and no
record can stop it. A handler may answer later (``DEFERRED`` + ``complete()``, from any thread):
the connection is not read meanwhile. It can also *send* requests on a connection
(``send_request``; ismd -> endpoint channels) and route the replies back to its handler.
"""

from __future__ import annotations

import collections
import enum
import errno
import logging
import os
import queue
import select
import selectors
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any, Final, Literal, Protocol

from . import memfd, proto
from .contract import EndpointHandler, PeerInfo
from .errors import DeviceGone, DeviceProtocolError, IsmError, QuotaExceeded

__all__ = ["DEFERRED", "MAX_OUT_QUEUE", "RECORDS_PER_WAKEUP", "ControlClient", "ControlConn",
           "ControlServer", "HandlerResult", "PeerDispatcher", "Reply", "ServerHandler"]

log = logging.getLogger("ism_backend.control")

MAX_OUT_QUEUE = 64       # records queued to a peer that does not read; then it is dropped
RECORDS_PER_WAKEUP = 32  # fairness between connections


class _Deferred(enum.Enum):
    """The type of ``DEFERRED`` (an enum member, so a type checker can tell it apart)."""

    DEFERRED = "DEFERRED"


#: Returned by a handler's ``handle`` that will answer later with ``ControlServer.complete``.
DEFERRED: Final = _Deferred.DEFERRED

#: What a handler's ``handle`` returns: (reply fields, reply fds), or DEFERRED.
Reply = tuple[dict[str, Any], list[int]]
HandlerResult = Reply | Literal[_Deferred.DEFERRED]


# --- client side ----------------------------------------------------------------------------

class ControlClient:
    """A persistent control connection (to ismd, an embedded endpoint, or a peer channel).

    Args:
        path: the SOCK_SEQPACKET socket to connect to (ignored when ``sock`` is given).
        timeout: bound in seconds on each request.
        what: how error messages name the other side.
        sock: an already connected SOCK_SEQPACKET socket to use instead (a brokered channel).
    Raises:
        OSError: from the constructor, if the socket cannot be connected.
    """

    def __init__(self, path: str = "", timeout: float = 2.0, what: str = "ismd",
                 sock: socket.socket | None = None) -> None:
        self.path = path
        self.what = what
        self.timeout = timeout
        self._lock = threading.Lock()
        self._next_id = 0
        if sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            sock.settimeout(timeout)
            try:
                sock.connect(path)
            except BaseException:
                sock.close()
                raise
        else:
            sock.settimeout(timeout)
        self.sock: socket.socket | None = sock

    @property
    def closed(self) -> bool:
        """True once closed (by us, or after a failure)."""
        return self.sock is None

    def set_timeout(self, timeout: float) -> None:
        """Change the bound on each later request."""
        with self._lock:
            self.timeout = timeout
            if self.sock is not None:
                self.sock.settimeout(timeout)

    def credentials(self) -> tuple[int, int, int]:
        """SO_PEERCRED (pid, uid, gid) of the other side.

        Raises:
            OSError: the connection is closed.
        """
        sock = self.sock
        if sock is None:
            raise OSError("connection closed")
        return memfd.peer_credentials(sock)

    def close(self) -> None:
        """Close the connection (waits for a request in flight)."""
        with self._lock:
            self._close_locked()

    def hung_up(self) -> bool:
        """True if an idle connection was closed by the other side (EOF, error, stray data).

        Never blocks: a connection with a request in flight is reported alive.
        """
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self.sock is None:
                return True
            poller = select.poll()
            poller.register(self.sock, select.POLLIN | select.POLLHUP | select.POLLERR)
            return bool(poller.poll(0))
        finally:
            self._lock.release()

    def detach_socket(self) -> socket.socket:
        """Hand the socket over to someone else (a ControlServer); this client is closed after.

        Raises:
            OSError: already closed.
        """
        with self._lock:
            sock, self.sock = self.sock, None
        if sock is None:
            raise OSError("connection closed")
        return sock

    def forget(self) -> None:
        """After fork, in the child: drop our copy of the socket (the parent's stays open)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _close_locked(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _gone(self, message: str, delivered: bool, timed_out: bool = False) -> DeviceGone:
        self._close_locked()
        gone = DeviceGone(message)
        gone.delivered = delivered
        gone.timed_out = timed_out
        return gone

    def request(self, op: str, fds: Iterable[int] = (), **fields: Any) -> Reply:
        """Send one request (with ``fds`` if ``op`` takes them) and wait, bounded, for its reply.

        Returns:
            (validated result fields, fds passed with the reply: exactly
            ``proto.REPLY_FDS[op]``, now owned by the caller).
        Raises:
            ValueError: invalid fields (nothing was sent).
            The IsmError subclass the other side answered with; DeviceGone (closed, broken or
            timed out: the connection is then closed; ``delivered`` and ``timed_out`` say
            whether a retry is safe); DeviceProtocolError (bad reply; the connection is closed).
        """
        with self._lock:
            sock = self.sock
            if sock is None:
                gone = DeviceGone(f"{self.what} connection {self.path} is closed: fall back to "
                                  "TCP (a new device will reconnect)")
                gone.delivered = False
                raise gone
            self._next_id += 1
            req_id = self._next_id
            data = proto.encode_request(op, req_id, **fields)
            send_failed = False
            try:
                try:
                    memfd.send_msg(sock, data, fds)
                except (BrokenPipeError, ConnectionResetError):
                    send_failed = True  # a refusal (uid policy) may still be queued for us
                try:
                    record, got_fds, truncated = memfd.recv_msg(sock, proto.MAX_RECORD)
                except ConnectionResetError:
                    # The kernel reports the reset before records still queued for us (such
                    # as a refusal sent just before the server closed): read once more.
                    send_failed = True
                    record, got_fds, truncated = memfd.recv_msg(sock, proto.MAX_RECORD)
            except TimeoutError:
                # The bound is spent: callers must not retry.
                raise self._gone(f"{self.what} {self.path} did not answer {op} within "
                                 f"{self.timeout:g} s: fall back to TCP", not send_failed,
                                 timed_out=True) from None
            except OSError as exc:
                raise self._gone(f"{self.what} {self.path} is gone ({exc.strerror or exc}): "
                                 "fall back to TCP", not send_failed) from None
            if not record or truncated:
                memfd.close_fds(got_fds)
                if not record:
                    raise self._gone(f"{self.what} {self.path} closed the connection: fall "
                                     "back to TCP", not send_failed)
                self._close_locked()
                raise DeviceProtocolError(f"{self.what} sent an oversized reply to {op}")
            try:
                reply = proto.decode_reply(record, op, req_id)
            except IsmError as exc:
                memfd.close_fds(got_fds)
                if send_failed or type(exc) is DeviceProtocolError:
                    self._close_locked()
                raise
            if send_failed:
                self._close_locked()
            expected = proto.REPLY_FDS.get(op, 0)
            if len(got_fds) != expected:
                memfd.close_fds(got_fds)
                self._close_locked()
                raise DeviceProtocolError(f"{self.what} passed {len(got_fds)} fds with the {op} "
                                          f"reply, expected {expected}")
            return reply, got_fds


def request_retrying_once(connect: Callable[[], ControlClient],
                          drop: Callable[[ControlClient], None], op: str,
                          fds: Iterable[int] = (), **fields: Any) -> Reply:
    """``connect().request(op, ...)``, retried once on a fresh connection when the first one
    failed before the request provably arrived (a cached connection that broke since its last
    use); never after a timeout or a delivered request. ``drop(conn)`` runs for every
    connection that failed (not for one that carried a DeviceGone answer). Returns and raises
    as ``ControlClient.request``."""
    for attempt in (0, 1):
        conn = connect()
        try:
            return conn.request(op, fds, **fields)
        except DeviceGone as exc:
            if not conn.closed:
                # The other side *answered* DeviceGone (a peer whose event loop did not take
                # the request in time): the connection is sound and stays.
                raise
            drop(conn)
            if attempt or exc.timed_out or exc.delivered:
                raise
    raise AssertionError("unreachable")


# --- server side ----------------------------------------------------------------------------

class ControlConn:
    """One served control connection: its credentials and what the handler keeps about it.

    Attributes:
        pid, uid, gid: SO_PEERCRED at connect, or the credentials ismd stated for a brokered
            peer channel.
        endpoint_id: the peer's endpoint as it said in ``hello`` (or as ismd stated), else None.
        state: the handler's.
        outbound: True when we send requests on it and read replies (ismd -> endpoint channel).
    """

    __slots__ = ("busy", "closed", "endpoint_id", "events", "fd", "gid", "outbound", "outq",
                 "pending", "pid", "sock", "state", "uid", "want_write")

    def __init__(self, sock: socket.socket, creds: tuple[int, int, int] | None = None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.pid, self.uid, self.gid = creds if creds is not None else memfd.peer_credentials(sock)
        self.endpoint_id: bytes | None = None
        self.outq: collections.deque[tuple[bytes, list[int]]] = collections.deque()
        self.state: object = None
        self.closed = False
        self.want_write = False
        self.outbound = False
        self.pending: collections.OrderedDict[int, str] = collections.OrderedDict()
        self.busy = False
        self.events = 0

    @property
    def peer(self) -> PeerInfo | None:
        """PeerInfo once the endpoint id is known."""
        if self.endpoint_id is None:
            return None
        return PeerInfo(self.endpoint_id, self.pid, self.uid, self.gid)


class ServerHandler(Protocol):
    """What ``ControlServer`` serves its connections with (see ``ControlServer``); an optional
    ``reply(conn, op, result)`` is looked up with getattr."""

    def accept(self, conn: ControlConn) -> IsmError | None:
        """A new connection: the refusal to send, or None to serve it."""

    def handle(self, conn: ControlConn, request: proto.Request, fds: list[int]) -> HandlerResult:
        """Serve one request: (fields, fds) or DEFERRED; raise IsmError to refuse."""

    def disconnect(self, conn: ControlConn) -> None:
        """The connection closed (or was dropped)."""


class ControlServer:
    """A selectors loop serving control connections (a listener's, and sockets handed to ``add``).

    ``handler`` provides ``accept(conn) -> IsmError | None`` (a refusal is sent, then the
    connection closed), ``handle(conn, request, fds) -> (fields, fds) | DEFERRED`` raising
    IsmError to refuse (request ``fds`` left in the list are closed after it returns; take one by
    popping it; reply ``fds`` are handed over and closed once sent), and ``disconnect(conn)``;
    optionally ``reply(conn, op, result)`` for replies to ``send_request`` (``result`` is the
    fields or the IsmError). No record can stop the loop: malformed ones get an error reply,
    unexpected handler exceptions are logged and answered as internal errors.
    """

    def __init__(self, listener: socket.socket | None, handler: ServerHandler) -> None:
        self.listener = listener
        self.handler = handler
        self.conns: dict[int, ControlConn] = {}
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # Other threads write to the wake pipe: it must never be closed under them (a reused fd
        # number would get our byte).
        self._wake_lock = threading.Lock()
        self.selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        if listener is not None:
            listener.setblocking(False)
            self.selector.register(listener, selectors.EVENT_READ, "listener")
        self._completions: collections.deque[
            tuple[ControlConn, int, str, dict[str, Any] | None, IsmError | None, list[int]]
        ] = collections.deque()
        self._callbacks: collections.deque[Callable[[], None]] = collections.deque()
        self._stop = False
        self._accept_paused = False
        self._next_out_id = 0
        # One fd held in reserve for the listener: at EMFILE it is given up to accept the
        # pending connection and close it at once, so the peer fails fast instead of waiting
        # for its request timeout (and the listener does not spin on a connection it cannot take).
        self._spare_fd = -1
        if listener is not None:
            try:
                self._spare_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                self._spare_fd = -1

    # --- thread-safe ---

    def stop(self) -> None:
        """Make ``serve`` return (from any thread)."""
        self._stop = True
        self._wake()

    def complete(self, conn: ControlConn, req_id: int, op: str,
                 fields: dict[str, Any] | None = None, error: IsmError | None = None,
                 fds: Iterable[int] = ()) -> None:
        """Answer a DEFERRED request (from any thread): ``fields`` (with ``fds``, handed over:
        closed once sent, or at once if the connection is gone) or ``error``."""
        self._completions.append((conn, req_id, op, fields, error, list(fds)))
        self._wake()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn()`` on the serving thread (from any thread), after the completions queued
        before it; exceptions are logged. The serving thread's APIs (``send_request``, ``add``,
        ``drop``) are not thread-safe: this is how another thread uses them."""
        self._callbacks.append(fn)
        self._wake()

    def _wake(self) -> None:
        with self._wake_lock:
            if self._wake_w < 0:
                return  # closed: stopping
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass  # full pipe: a wake-up is pending anyway

    def _close_wake(self) -> None:
        with self._wake_lock:
            memfd.close_fds((self._wake_r, self._wake_w))
            self._wake_r = self._wake_w = -1

    # --- serving thread only ---

    def serve(self, wakeup_fd: int | None = None) -> None:
        """Run until ``stop()`` or until ``wakeup_fd`` (a signal wake-up pipe) becomes readable."""
        if wakeup_fd is not None:
            self.selector.register(wakeup_fd, selectors.EVENT_READ, "stop")
        try:
            while not self._stop:
                for key, events in self.selector.select():
                    data = key.data
                    if data == "wake":
                        self._drain_wake()
                    elif data == "stop":
                        self._stop = True
                    elif data == "listener":
                        self._accept()
                    else:
                        if events & selectors.EVENT_WRITE and not data.closed:
                            self._flush(data)
                        if events & selectors.EVENT_READ and not data.closed:
                            self._read(data)
        finally:
            if wakeup_fd is not None:
                self.selector.unregister(wakeup_fd)

    def add(self, sock: socket.socket,
            creds: tuple[int, int, int] | None = None) -> ControlConn | None:
        """Serve an already connected socket (call before ``serve`` or on its thread).

        Returns:
            The connection, or None if the handler refused it (the socket is then closed).
        """
        sock.setblocking(False)
        try:
            conn = ControlConn(sock, creds)
        except OSError:
            sock.close()
            return None
        return conn if self._admit(conn) else None

    def send_request(self, conn: ControlConn, op: str, fds: list[int] | None = None,
                     **fields: Any) -> None:
        """Send a request on ``conn`` (its replies go to ``handler.reply``); ``fds`` are handed
        over (closed once sent, or at once if the connection is gone).

        Raises:
            ValueError: invalid fields (the fds are closed).
        """
        fds = list(fds or ())
        self._next_out_id += 1
        try:
            data = proto.encode_request(op, self._next_out_id, **fields)
        except ValueError:
            memfd.close_fds(fds)
            raise
        conn.pending[self._next_out_id] = op
        self._send(conn, data, fds)

    def drop(self, conn: ControlConn) -> None:
        """Close a connection (the handler's ``disconnect`` runs)."""
        self._drop(conn)

    def _refuse_one(self) -> bool:
        """Out of fds: accept the pending connection with our spare fd and close it (the peer
        sees the connection reset now). False if there is no spare fd to give up."""
        if self._spare_fd < 0:
            return False
        assert self.listener is not None  # only _accept calls this (a spare fd means a listener)
        os.close(self._spare_fd)
        self._spare_fd = -1
        try:
            sock, _ = self.listener.accept()
            sock.close()
            log.warning("out of file descriptors: refused a device connection")
        except OSError:
            pass
        try:
            self._spare_fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._spare_fd = -1
        return True

    def _close_spare(self) -> None:
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
            self._spare_fd = -1

    def close(self) -> None:
        """Drop every connection and close the listener and the loop's own fds."""
        for conn in list(self.conns.values()):
            self._drop(conn)
        while self._completions:
            memfd.close_fds(self._completions.popleft()[5])
        self._callbacks.clear()
        self.selector.close()
        if self.listener is not None:
            self.listener.close()
        self._close_spare()
        self._close_wake()

    def forget(self) -> None:
        """After fork, in the child: close our copies of every fd, telling nobody anything."""
        for conn in self.conns.values():
            conn.closed = True
            conn.sock.close()
            while conn.outq:
                memfd.close_fds(conn.outq.popleft()[1])
        self.conns.clear()
        self.selector.close()
        if self.listener is not None:
            self.listener.close()
        self._close_spare()
        self._wake_lock = threading.Lock()
        self._close_wake()

    # --- internals ---

    def _admit(self, conn: ControlConn) -> bool:
        try:
            refusal = self.handler.accept(conn)
        except Exception:  # the loop must survive handler bugs (logged)
            log.exception("accept handler failed")
            refusal = IsmError("internal error at connect")
        if refusal is not None:
            try:
                memfd.send_msg(conn.sock, proto.encode_error(0, refusal))
            except OSError:
                pass
            conn.sock.close()
            return False
        self.conns[conn.fd] = conn
        self._update(conn)
        return True

    def _update(self, conn: ControlConn) -> None:
        events = (0 if conn.busy else selectors.EVENT_READ) | (
            selectors.EVENT_WRITE if conn.want_write else 0)
        if events == conn.events or conn.closed:
            return
        if conn.events == 0:
            self.selector.register(conn.sock, events, conn)
        elif events == 0:
            self.selector.unregister(conn.sock)
        else:
            self.selector.modify(conn.sock, events, conn)
        conn.events = events

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
        while self._completions:
            conn, req_id, op, fields, error, fds = self._completions.popleft()
            if conn.closed:
                memfd.close_fds(fds)
                continue
            conn.busy = False
            if error is None:
                try:
                    record = proto.encode_result(op, req_id, fields or {})
                except ValueError as exc:
                    log.error("invalid %s reply: %s", op, exc)
                    record = proto.encode_error(req_id, IsmError(f"internal error in {op}: {exc}"))
                    memfd.close_fds(fds)
                    fds = []
            else:
                record = proto.encode_error(req_id, error)
                memfd.close_fds(fds)
                fds = []
            self._send(conn, record, fds)
            if not conn.closed:
                self._update(conn)
        while self._callbacks:
            fn = self._callbacks.popleft()
            try:
                fn()
            except Exception:
                log.exception("call_soon callback failed")

    def _accept(self) -> None:
        assert self.listener is not None
        for _ in range(RECORDS_PER_WAKEUP):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and self._refuse_one():
                    continue
                # Still no fd: the pending connection stays pending and the listener stays
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
            self._admit(conn)

    def _read(self, conn: ControlConn) -> None:
        for _ in range(RECORDS_PER_WAKEUP):
            if conn.busy or conn.closed:
                return
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
            if conn.outbound:
                self._reply_received(conn, record, fds, truncated)
            elif truncated:
                memfd.close_fds(fds)
                self._send(conn, proto.encode_error(0, DeviceProtocolError(
                    f"request larger than {proto.MAX_RECORD} bytes")), [])
            else:
                self._dispatch(conn, record, fds)

    def _reply_received(self, conn: ControlConn, record: bytes, fds: list[int],
                        truncated: bool) -> None:
        memfd.close_fds(fds)  # nothing we send requests for is answered with fds
        if fds or truncated or not conn.pending:
            log.info("dropping pid %d: unexpected record on an outbound connection", conn.pid)
            self._drop(conn)
            return
        req_id, op = conn.pending.popitem(last=False)
        try:
            result: dict[str, Any] | IsmError = proto.decode_reply(record, op, req_id)
        except DeviceProtocolError as exc:
            log.info("dropping pid %d: %s", conn.pid, exc)
            self._drop(conn)
            return
        except IsmError as exc:
            result = exc
        on_reply: Callable[[ControlConn, str, dict[str, Any] | IsmError], None] | None = getattr(
            self.handler, "reply", None)
        if on_reply is not None:
            try:
                on_reply(conn, op, result)
            except Exception:
                log.exception("reply handler failed")

    def _dispatch(self, conn: ControlConn, record: bytes, fds: list[int]) -> None:
        try:
            request = proto.decode_request(record)
        except proto.ProtoError as exc:
            memfd.close_fds(fds)
            self._send(conn, proto.encode_error(exc.req_id, DeviceProtocolError(str(exc))), [])
            return
        expected = proto.REQUEST_FDS.get(request.op, 0)
        if len(fds) != expected:
            memfd.close_fds(fds)
            self._send(conn, proto.encode_error(request.id, DeviceProtocolError(
                f"{request.op} requests carry {expected} file descriptors, got {len(fds)}")), [])
            return
        out_fds: list[int] = []
        try:
            result = self.handler.handle(conn, request, fds)
            if result is DEFERRED:
                conn.busy = True
                self._update(conn)
                return
            fields, out_fds = result
            reply = proto.encode_result(request.op, request.id, fields)
        except IsmError as exc:
            memfd.close_fds(out_fds)
            out_fds = []
            reply = proto.encode_error(request.id, exc)
        except OSError as exc:  # resource exhaustion (EMFILE, ENOMEM): refuse, keep serving
            memfd.close_fds(out_fds)
            out_fds = []
            log.warning("%s failed: %s", request.op, exc)
            reply = proto.encode_error(request.id, QuotaExceeded(
                f"the device could not serve {request.op} ({exc.strerror or exc}): retry later "
                "or free resources"))
        except Exception:  # never let one request take the server down (logged)
            log.exception("%s handler failed", request.op)
            memfd.close_fds(out_fds)
            out_fds = []
            reply = proto.encode_error(request.id, IsmError(f"internal error in {request.op}"))
        finally:
            memfd.close_fds(fds)  # whatever the handler did not take
            fds.clear()
        self._send(conn, reply, out_fds)

    def _send(self, conn: ControlConn, data: bytes, fds: list[int]) -> None:
        if conn.closed:
            memfd.close_fds(fds)
            return
        if len(conn.outq) >= MAX_OUT_QUEUE:
            memfd.close_fds(fds)
            log.info("dropping pid %d: %d records unread", conn.pid, len(conn.outq))
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
                    self._update(conn)
                return
            except OSError:
                self._drop(conn)
                return
            conn.outq.popleft()
            memfd.close_fds(fds)
        if conn.want_write:
            conn.want_write = False
            self._update(conn)

    def _drop(self, conn: ControlConn) -> None:
        if conn.closed:
            return
        if conn.events:
            try:
                self.selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
            conn.events = 0
        conn.closed = True
        self.conns.pop(conn.fd, None)
        while conn.outq:
            memfd.close_fds(conn.outq.popleft()[1])
        conn.sock.close()
        try:
            self.handler.disconnect(conn)
        except Exception:
            log.exception("disconnect handler failed")
        if self._accept_paused and self.listener is not None:
            self._accept_paused = False
            self.selector.register(self.listener, selectors.EVENT_READ, "listener")


# --- the endpoint handler's thread ----------------------------------------------------------

_NO_HUB = ("no smcish hub in this process: it set no endpoint handler (its application uses "
           "no smcish server or client yet); fall back to TCP")


# PeerDispatcher's queue: a peer op from a connection, a call from this process, a peer gone.
_Job = (tuple[Literal["request"], ControlServer, ControlConn, proto.Request, PeerInfo]
        | tuple[Literal["call"], PeerInfo, proto.Request, threading.Event,
                list[dict[str, Any] | BaseException]]
        | tuple[Literal["gone"], PeerInfo])


class PeerDispatcher:
    """Runs the endpoint handler (``Device.set_endpoint_handler``) on a thread of its own.

    Peer ops arrive on the endpoint thread (which also serves attach/detach); they are queued
    here and answered through ``ControlServer.complete`` when the handler returns. One handler
    call at a time, in arrival order; ``peer_gone`` notifications go through the same queue.
    The thread starts on first use.
    """

    def __init__(self, name: str, timeout: float) -> None:
        self.name = name
        self.timeout = timeout
        self.handler: EndpointHandler | None = None
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False

    def set_handler(self, handler: EndpointHandler | None) -> None:
        """Install (or with None remove) the handler."""
        self.handler = handler

    def submit(self, server: ControlServer, conn: ControlConn, request: proto.Request,
               peer: PeerInfo) -> Literal[_Deferred.DEFERRED]:
        """Queue a peer op from ``conn``; the reply goes out through ``server.complete``.

        Returns:
            DEFERRED (for the ControlServer).
        """
        self._put(("request", server, conn, request, peer))
        return DEFERRED

    def gone(self, peer: PeerInfo) -> None:
        """Queue ``handler.peer_gone(peer)``."""
        self._put(("gone", peer))

    def call(self, peer: PeerInfo, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        """A peer op this process sends itself: encoded, validated and handled exactly like a
        remote one, on the handler thread (or inline when already on it).

        Raises:
            ValueError: invalid op or fields; DeviceGone: the handler did not answer within the
            timeout; the IsmError the handler raised.
        """
        request = proto.decode_request(proto.encode_request(op, 1, **fields))
        if self._closed:
            raise DeviceGone("this device was closed: get_device() opens a new one")
        if threading.current_thread() is self._thread:
            fields_out = self._run(peer, request)
        else:
            done = threading.Event()
            box: list[dict[str, Any] | BaseException] = []
            self._put(("call", peer, request, done, box))
            if not done.wait(self.timeout):
                gone = DeviceGone(f"this process's endpoint handler did not answer {op} within "
                                  f"{self.timeout:g} s: fall back to TCP")
                gone.timed_out = True
                raise gone
            if isinstance(box[0], BaseException):
                raise box[0]
            fields_out = box[0]
        return proto.decode_reply(proto.encode_result(op, 1, fields_out), op, 1)

    def close(self) -> None:
        """Stop the thread after the queued jobs (bounded wait)."""
        self._closed = True
        thread = self._thread
        if thread is not None:
            self._jobs.put(None)
            if thread is not threading.current_thread():
                thread.join(self.timeout)

    def forget(self) -> None:
        """After fork, in the child: the thread does not exist here."""
        self._closed = True
        self._thread = None
        self._jobs = queue.SimpleQueue()
        self._start_lock = threading.Lock()

    # --- internals ---

    def _put(self, job: _Job) -> None:
        if self._thread is None and not self._closed:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._loop, name=self.name,
                                                    daemon=True)
                    self._thread.start()
        self._jobs.put(job)

    def _run(self, peer: PeerInfo, request: proto.Request) -> dict[str, Any]:
        handler = self.handler
        if handler is None:
            raise IsmError(_NO_HUB)
        try:
            result = handler.handle(peer, request.op, dict(request.fields))
        except IsmError:
            raise
        except Exception as exc:  # reported to the peer, logged here
            log.exception("endpoint handler failed on %s", request.op)
            raise IsmError(f"the peer's endpoint handler failed on {request.op}: "
                           f"{type(exc).__name__}") from None
        if not isinstance(result, dict):
            raise IsmError(f"the peer's endpoint handler returned no dict for {request.op}")
        try:
            proto.check_reply(request.op, result)
        except ValueError as exc:
            log.error("endpoint handler returned an invalid reply: %s", exc)
            raise IsmError(f"the peer's endpoint handler returned an invalid reply: {exc}") \
                from None
        return result

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job[0] == "request":
                _, server, conn, request, peer = job
                try:
                    server.complete(conn, request.id, request.op, fields=self._run(peer, request))
                except IsmError as exc:
                    server.complete(conn, request.id, request.op, error=exc)
            elif job[0] == "call":
                _, peer, request, done, box = job
                try:
                    box.append(self._run(peer, request))
                except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller
                    box.append(exc)
                done.set()
            else:
                _, peer = job
                notify = getattr(self.handler, "peer_gone", None)
                if notify is not None:
                    try:
                        notify(peer)
                    except Exception:
                        log.exception("endpoint handler peer_gone failed")
