"""The link between ismd's guest mode on the host (``vmhost``) and the agent in each guest
(``vmguest``): framing, request/reply/notification, strict field validation (docs/vm.md 3).

The link runs over a byte stream: on the host the Unix socket of the guest's virtio-serial
chardev, in the guest the port's character device. Nothing else carries it, so the host knows a
guest by the channel it talks on, never by what it says.

Frame: ``u32 big-endian length | UTF-8 JSON object`` (length at most ``MAX_FRAME``).

- request:      ``{"id": n, "op": name, <fields>}``; answered by exactly one reply
- reply:        ``{"re": n, "ok": true, <fields>}`` or
                ``{"re": n, "ok": false, "error": <errors.ERRORS name>, "message": text}``
- notification: ``{"op": name, <fields>}`` (no id, never answered; delivered in order)

Either side sends requests. Requests run on a small pool of worker threads (a handler may itself
call across another link without stalling this one); notifications run on the reader thread in
the order they arrived, so they must not block. Every ``call`` is bounded by its timeout; a broken
or malformed stream ends the link (``on_close`` runs once) and fails every call waiting on it.
"""

from __future__ import annotations

import base64
import binascii
import concurrent.futures
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from .errors import ERRORS, DeviceGone, DeviceProtocolError, IsmError

__all__ = ["MAX_FRAME", "Link", "LinkClosed", "b64", "check", "unb64"]

log = logging.getLogger("ism_backend.vmlink")

VERSION = 1
MAX_FRAME = 1 << 20
_HEADER = struct.Struct(">I")
_MAX_MESSAGE = 1024


class LinkClosed(DeviceGone):
    """The link broke (EOF, a malformed frame, closed locally)."""


def b64(data: bytes) -> str:
    """Binary payload as it travels in a frame."""
    return base64.b64encode(data).decode("ascii")


def unb64(text: Any, limit: int = MAX_FRAME) -> bytes:
    """Decode a payload field; ValueError if it is not base64 or longer than ``limit`` bytes."""
    if not isinstance(text, str) or len(text) > (limit + 2) // 3 * 4:
        raise ValueError("payload must be a base64 string within the frame limit")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise ValueError("payload is not base64") from None


# --- validation ------------------------------------------------------------------------------

def _hex16(value: Any) -> bytes:
    if not isinstance(value, str) or len(value) != 32:
        raise ValueError("must be 32 lowercase hex digits")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise ValueError("must be 32 lowercase hex digits") from None
    if raw.hex() != value:
        raise ValueError("must be 32 lowercase hex digits")
    return raw


def check(fields: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    """Validate ``fields`` against ``schema`` ({name: kind}); returns the decoded values.

    Kinds: ``"id16"`` (32 hex digits -> 16 bytes), ``"bool"``, ``"str"`` (at most 256 chars),
    ``"data"`` (base64 -> bytes), ``(lo, hi)`` (an int in that range). Every field is required;
    nothing else is allowed (``id``/``op``/``re``/``ok`` are the frame's, not fields).

    Raises:
        DeviceProtocolError: a missing, unknown or ill-typed field.
    """
    got = {k: v for k, v in fields.items() if k not in ("id", "op", "re", "ok")}
    if set(got) != set(schema):
        missing, extra = sorted(set(schema) - set(got)), sorted(set(got) - set(schema))
        raise DeviceProtocolError(f"fields: missing {missing}, unexpected {extra}")
    out: dict[str, Any] = {}
    for name, kind in schema.items():
        value = got[name]
        try:
            if kind == "id16":
                out[name] = _hex16(value)
            elif kind == "bool":
                if type(value) is not bool:
                    raise ValueError("must be a boolean")
                out[name] = value
            elif kind == "str":
                if not isinstance(value, str) or len(value) > 256:
                    raise ValueError("must be a string of at most 256 characters")
                out[name] = value
            elif kind == "data":
                out[name] = unb64(value)
            else:
                lo, hi = kind
                if type(value) is not int or not lo <= value <= hi:
                    raise ValueError(f"must be an integer in [{lo}, {hi}]")
                out[name] = value
        except ValueError as exc:
            raise DeviceProtocolError(f"field {name!r}: {exc}") from None
    return out


def _encode(obj: dict[str, Any]) -> bytes:
    body = json.dumps({k: (v.hex() if isinstance(v, bytes) else v) for k, v in obj.items()},
                      separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ValueError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _HEADER.pack(len(body)) + body


# --- the link --------------------------------------------------------------------------------

#: A request handler: (link, op, fields as sent) -> reply fields; raise IsmError to refuse.
Handler = Callable[["Link", str, dict[str, Any]], dict[str, Any]]
#: A notification handler: (link, op, fields as sent); runs on the reader thread.
Notify = Callable[["Link", str, dict[str, Any]], None]


class Link:
    """One end of a host <-> guest link over a blocking stream file descriptor.

    Args:
        fd: the stream (a connected socket's fd or a virtio-serial port); the link owns it.
        on_request, on_notify: handlers (see ``Handler``/``Notify``); ``on_close(link)`` runs
            once when the link ends.
        name: for logs and errors.
        workers: threads answering requests.
    """

    def __init__(self, fd: int, on_request: Handler, on_notify: Notify,
                 on_close: Callable[[Link], None] | None = None, name: str = "link",
                 workers: int = 4) -> None:
        self.fd = fd
        self.name = name
        self._on_request = on_request
        self._on_notify = on_notify
        self._on_close = on_close
        self._wlock = threading.Lock()
        self._lock = threading.Lock()
        self._next_id = 0
        self._waiting: dict[int, concurrent.futures.Future[dict[str, Any]]] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, f"{name}-req")
        self.closed = False
        self._ended = False
        self._close_called = False
        self._fd_closed = False
        self._thread = threading.Thread(target=self._run, name=f"{name}-reader", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # --- sending ---

    def _write(self, frame: bytes) -> None:
        with self._wlock:
            if self.closed:
                raise LinkClosed(f"{self.name}: link closed")
            view = memoryview(frame)
            try:
                while view:
                    n = os.write(self.fd, view)
                    view = view[n:]
            except OSError as exc:
                raise LinkClosed(f"{self.name}: write failed ({exc.strerror})") from None

    def call(self, op: str, timeout: float, **fields: Any) -> dict[str, Any]:
        """Send a request and wait for its reply (bounded by ``timeout`` seconds).

        Raises:
            IsmError: the other side refused (its error class), or ``DeviceGone`` (timed out,
                link closed).
        """
        fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()
        with self._lock:
            self._next_id += 1
            req_id = self._next_id
            self._waiting[req_id] = fut
        try:
            self._write(_encode({"id": req_id, "op": op, **fields}))
            try:
                return fut.result(timeout)
            except concurrent.futures.TimeoutError:
                gone = DeviceGone(f"{self.name}: no answer to {op} within {timeout:.1f} s")
                gone.timed_out = True
                raise gone from None
        finally:
            with self._lock:
                self._waiting.pop(req_id, None)

    def notify(self, op: str, **fields: Any) -> None:
        """Send a notification (raises LinkClosed if the link is down)."""
        self._write(_encode({"op": op, **fields}))

    # --- receiving ---

    def _read_exact(self, n: int) -> bytes:
        chunks = []
        while n:
            data = os.read(self.fd, min(n, 1 << 16))
            if not data:
                raise EOFError
            chunks.append(data)
            n -= len(data)
        return b"".join(chunks)

    def _run(self) -> None:
        why = "closed"
        try:
            while not self.closed:
                (length,) = _HEADER.unpack(self._read_exact(_HEADER.size))
                if length > MAX_FRAME:
                    raise DeviceProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME}")
                try:
                    msg = json.loads(self._read_exact(length))
                except (ValueError, UnicodeDecodeError):
                    raise DeviceProtocolError("frame is not a JSON object") from None
                if not isinstance(msg, dict):
                    raise DeviceProtocolError("frame is not a JSON object")
                self._dispatch(msg)
        except EOFError:
            why = "end of stream"
        except OSError as exc:
            why = f"read failed ({exc.strerror})"
        except DeviceProtocolError as exc:
            why = f"protocol error: {exc}"
            log.warning("%s: %s", self.name, why)
        finally:
            self._end(why)
            if self._close_called:
                self._close_fd()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        if "re" in msg:
            req_id = msg["re"]
            with self._lock:
                fut = self._waiting.pop(req_id, None) if type(req_id) is int else None
            if fut is None:
                return  # an answer to a call that timed out
            if msg.get("ok") is True:
                fut.set_result(msg)
            else:
                cls = ERRORS.get(str(msg.get("error")), DeviceProtocolError)
                fut.set_exception(cls(str(msg.get("message", ""))[:_MAX_MESSAGE]))
            return
        op = msg.get("op")
        if not isinstance(op, str):
            raise DeviceProtocolError("frame without op or re")
        if "id" not in msg:
            try:
                self._on_notify(self, op, msg)
            except IsmError as exc:
                log.info("%s: notification %s refused: %s", self.name, op, exc)
            except Exception:
                log.exception("%s: notification %s failed", self.name, op)
            return
        req_id = msg["id"]
        if type(req_id) is not int:
            raise DeviceProtocolError("request id must be an integer")
        try:
            self._pool.submit(self._answer, req_id, op, msg)
        except RuntimeError:
            pass  # shutting down

    def _answer(self, req_id: int, op: str, msg: dict[str, Any]) -> None:
        try:
            result = self._on_request(self, op, msg)
            reply = {"re": req_id, "ok": True, **result}
        except IsmError as exc:
            reply = {"re": req_id, "ok": False, "error": type(exc).__name__,
                     "message": str(exc)[:_MAX_MESSAGE]}
        except Exception as exc:
            log.exception("%s: request %s failed", self.name, op)
            reply = {"re": req_id, "ok": False, "error": "IsmError",
                     "message": f"internal error in {op}: {exc}"[:_MAX_MESSAGE]}
        try:
            self._write(_encode(reply))
        except (LinkClosed, ValueError):
            pass

    def _end(self, why: str) -> None:
        with self._wlock:
            self.closed = True
        with self._lock:
            already, self._ended = self._ended, True
        with self._lock:
            waiting = list(self._waiting.values())
            self._waiting.clear()
        for fut in waiting:
            if not fut.done():
                fut.set_exception(LinkClosed(f"{self.name}: link ended ({why})"))
        if not already:
            log.info("%s: link ended (%s)", self.name, why)
            if self._on_close is not None:
                try:
                    self._on_close(self)
                except Exception:
                    log.exception("%s: close handler failed", self.name)

    def _close_fd(self) -> None:
        with self._lock:
            if self._fd_closed:
                return
            self._fd_closed = True
        try:
            os.close(self.fd)
        except OSError:
            pass

    def close(self) -> None:
        """End the link; idempotent (``on_close`` runs once, whoever ends the link first).

        A socket is shut down, which wakes the reader; the fd is closed exactly once, by the
        reader when it stops (or here, once it has stopped), so its number is never closed
        while a read may still use it."""
        with self._lock:
            if self._close_called:
                return
            self._close_called = True
        dup = -1
        try:
            dup = os.dup(self.fd)
            sock = socket.socket(fileno=dup)
            dup = -1                     # the socket object owns it now
            sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        except OSError:
            pass                         # not a socket: the owner of the stream ends it
        finally:
            if dup >= 0:
                os.close(dup)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._end("closed locally")
        reader = self._thread
        if reader.ident is None:
            self._close_fd()             # never started
        elif reader is not threading.current_thread():
            reader.join(1.0)
            if not reader.is_alive():
                self._close_fd()
