#!/usr/bin/env python3
"""JSON-RPC 2.0 over smcish, on the Protocol and BufferedProtocol APIs.

    python examples/jsonrpc.py server --port 7777
    python examples/jsonrpc.py client --port 7777              # a demo: calls, a burst, a big blob

Wire format: each JSON-RPC object is one frame, a 4-byte big-endian length followed by that many
bytes of UTF-8 JSON. A byte stream may cut frames anywhere (a read can end inside the length
prefix, inside the body, or carry several frames); ``FrameDecoder`` reassembles them, and the
server's ``BufferedProtocol`` receives straight into its own buffer (on the shared-memory path that
is one copy, ring to buffer).

- ``RpcServerProtocol`` (``asyncio.BufferedProtocol``): decodes requests, runs the method (plain or
  ``async``; async calls run concurrently and may answer out of order: responses carry the id).
- ``RpcClientProtocol`` (``asyncio.Protocol``): matches responses to waiting calls by id.
- ``serve()`` / ``connect()`` use ``smcish.create_server`` / ``smcish.create_connection``: the
  connection moves through shared memory when both ends are smcish, plain TCP otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import struct
import sys
import time
import zlib

import smcish

HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20          # refuse frames above 64 MiB (a corrupt or hostile length prefix)

# JSON-RPC 2.0 error codes
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = (
    -32700, -32600, -32601, -32602, -32603)


class FrameError(Exception):
    """The byte stream is not a sequence of frames (e.g. a length above MAX_FRAME)."""


def encode_frame(obj) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return HEADER.pack(len(body)) + body


class FrameDecoder:
    """Reassemble length-prefixed frames from arbitrary chunks of a byte stream.

    Two ways to feed it: ``feed(data)`` (a Protocol's ``data_received``), or ``get_buffer`` /
    ``buffer_updated`` (a BufferedProtocol: the transport writes into our buffer). Both return the
    complete frame bodies now available, in order, and keep any partial frame for later.

    The buffer is never resized while a view of it may be alive (a transport holds the view it got
    from ``get_buffer`` while it calls ``buffer_updated``): it is compacted with equal-length slice
    copies, and replaced by a bigger one only inside ``get_buffer``.
    """

    def __init__(self, initial: int = 64 * 1024) -> None:
        self._buf = bytearray(initial)
        self._start = 0       # first unconsumed byte
        self._end = 0         # end of received bytes

    def pending(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return self._end - self._start

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        want = max(sizehint, 4096) if sizehint and sizehint > 0 else 64 * 1024
        # Room for at least the rest of the frame being received, when its length is known.
        if self.pending() >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buf, self._start)
            want = max(want, HEADER.size + length - self.pending())
        if len(self._buf) - self._end < want:
            self._make_room(want)
        return memoryview(self._buf)[self._end:]

    def buffer_updated(self, nbytes: int) -> list[bytes]:
        self._end += nbytes
        return self._frames()

    def feed(self, data) -> list[bytes]:
        n = len(data)
        if len(self._buf) - self._end < n:
            self._make_room(n)
        self._buf[self._end:self._end + n] = data
        self._end += n
        return self._frames()

    def _make_room(self, want: int) -> None:
        pending = self.pending()
        if self._start and len(self._buf) - pending >= want:
            # Slide the partial frame to the front: equal-length copy, no resize.
            self._buf[0:pending] = self._buf[self._start:self._end]
        else:
            size = len(self._buf)
            while size - pending < want:
                size *= 2
            new = bytearray(size)
            new[0:pending] = self._buf[self._start:self._end]
            self._buf = new
        self._start, self._end = 0, pending

    def _frames(self) -> list[bytes]:
        frames = []
        buf, start, end = self._buf, self._start, self._end
        while end - start >= HEADER.size:
            (length,) = HEADER.unpack_from(buf, start)
            if length > MAX_FRAME:
                raise FrameError(f"frame length {length} exceeds {MAX_FRAME}")
            if end - start - HEADER.size < length:
                break
            frames.append(bytes(buf[start + HEADER.size:start + HEADER.size + length]))
            start += HEADER.size + length
        if start == end:
            start = end = 0
        self._start, self._end = start, end
        return frames


# --------------------------------------------------------------------------- server
class RpcServerProtocol(asyncio.BufferedProtocol):
    """Serve JSON-RPC 2.0 requests; ``methods`` maps names to functions or coroutine functions."""

    def __init__(self, methods: dict) -> None:
        self._methods = methods
        self._decoder = FrameDecoder()
        self._transport = None
        self._tasks: set[asyncio.Task] = set()

    def connection_made(self, transport) -> None:
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        try:
            frames = self._decoder.buffer_updated(nbytes)
        except FrameError:
            self._transport.abort()
            return
        for frame in frames:
            self._handle(frame)

    def eof_received(self):
        return False          # the client is done: close once our responses are written

    def connection_lost(self, exc) -> None:
        for task in self._tasks:
            task.cancel()

    def _reply(self, obj) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(encode_frame(obj))

    def _handle(self, frame: bytes) -> None:
        try:
            request = json.loads(frame)
        except ValueError:
            self._reply({"jsonrpc": "2.0", "id": None,
                         "error": {"code": PARSE_ERROR, "message": "parse error"}})
            return
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            self._reply({"jsonrpc": "2.0", "id": None,
                         "error": {"code": INVALID_REQUEST, "message": "invalid request"}})
            return
        rid = request.get("id")
        notification = "id" not in request
        method = self._methods.get(request["method"])
        if method is None:
            if not notification:
                self._reply({"jsonrpc": "2.0", "id": rid, "error": {
                    "code": METHOD_NOT_FOUND, "message": f"no method {request['method']!r}"}})
            return
        params = request.get("params", [])
        args, kwargs = (params, {}) if isinstance(params, list) else ([], params)
        try:
            result = method(self, *args, **kwargs)
        except TypeError as exc:
            self._error(rid, notification, INVALID_PARAMS, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a method's error goes back to the caller (JSON-RPC -32603)
            self._error(rid, notification, INTERNAL_ERROR, exc)
            return
        if asyncio.iscoroutine(result):
            task = asyncio.ensure_future(self._finish(rid, notification, result))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif not notification:
            self._reply({"jsonrpc": "2.0", "id": rid, "result": result})

    async def _finish(self, rid, notification, coro) -> None:
        try:
            result = await coro
        except Exception as exc:  # noqa: BLE001 - a method's error goes back to the caller (JSON-RPC -32603)
            self._error(rid, notification, INTERNAL_ERROR, exc)
            return
        if not notification:
            self._reply({"jsonrpc": "2.0", "id": rid, "result": result})

    def _error(self, rid, notification, code, exc) -> None:
        if not notification:
            self._reply({"jsonrpc": "2.0", "id": rid,
                         "error": {"code": code, "message": f"{type(exc).__name__}: {exc}"}})


# The demo service. Each method gets the protocol first (to reach its transport), then params.
def _echo(proto, value):
    return value


def _add(proto, a, b):
    return a + b


def _blob(proto, size: int, seed: int = 0):
    """A string of ``size`` bytes (to send frames larger than a ring or a socket buffer)."""
    unit = f"{seed:x}-0123456789abcdef/"
    return (unit * (size // len(unit) + 1))[:size]


def _crc(proto, text: str):
    return zlib.crc32(text.encode())


async def _sleep(proto, seconds: float, value=None):
    await asyncio.sleep(seconds)
    return value


def _transport_info(proto):
    info = proto._transport.get_extra_info("smcish")
    return {"mode": info.mode if info else None,
            "reason": getattr(getattr(info, "reason", None), "name", None)}


def _stats(proto):
    return smcish.stats()


METHODS = {"echo": _echo, "add": _add, "blob": _blob, "crc": _crc, "sleep": _sleep,
           "transport_info": _transport_info, "stats": _stats}


async def serve(host: str = "127.0.0.1", port: int = 0, methods: dict | None = None, **kw):
    """Start a JSON-RPC server (``kw``: smcish keywords, e.g. ``device="none"``)."""
    methods = METHODS if methods is None else methods
    return await smcish.create_server(lambda: RpcServerProtocol(methods), host, port, **kw)


# --------------------------------------------------------------------------- client
class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class RpcClientProtocol(asyncio.Protocol):
    """A JSON-RPC 2.0 client connection: ``await proto.call("add", 1, 2)``; calls may overlap."""

    def __init__(self) -> None:
        self._decoder = FrameDecoder()
        self._transport = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._closed = asyncio.get_running_loop().create_future()

    @property
    def transport(self):
        return self._transport

    def connection_made(self, transport) -> None:
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            self._transport.abort()
            self._fail_all(exc)
            return
        for frame in frames:
            response = json.loads(frame)
            future = self._waiting.pop(response.get("id"), None)
            if future is None or future.done():
                continue
            if "error" in response:
                error = response["error"]
                future.set_exception(RpcError(error.get("code"), error.get("message")))
            else:
                future.set_result(response.get("result"))

    def connection_lost(self, exc) -> None:
        self._fail_all(exc or ConnectionResetError("JSON-RPC connection closed"))
        if not self._closed.done():
            self._closed.set_result(None)

    def _fail_all(self, exc) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(exc)

    def call(self, method: str, *args, **kwargs) -> asyncio.Future:
        """Send a request; return a future for its result (RpcError on an error response)."""
        if self._transport is None or self._transport.is_closing():
            raise ConnectionResetError("JSON-RPC connection closed")
        rid = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        params = kwargs if kwargs else list(args)
        self._transport.write(encode_frame({"jsonrpc": "2.0", "id": rid, "method": method,
                                            "params": params}))
        return future

    def notify(self, method: str, *args) -> None:
        self._transport.write(encode_frame({"jsonrpc": "2.0", "method": method,
                                            "params": list(args)}))

    async def close(self) -> None:
        self._transport.close()
        await self._closed


async def connect(host: str, port: int, **kw) -> RpcClientProtocol:
    """Open a JSON-RPC client connection (``kw``: smcish keywords)."""
    _, proto = await smcish.create_connection(RpcClientProtocol, host, port, **kw)
    return proto


# --------------------------------------------------------------------------- command line
def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def run_server(args) -> None:
    server = await serve(args.host, args.port)
    emit(event="listening", host=args.host, port=server.sockets[0].getsockname()[1])
    async with server:
        await server.serve_forever()


async def run_client(args) -> int:
    rpc = await connect(args.host, args.port)
    info = rpc.transport.get_extra_info("smcish")
    checks = {}
    checks["add"] = await rpc.call("add", 2, 40) == 42
    checks["kwargs"] = await rpc.call("add", a="x", b="y") == "xy"
    unicode = {"text": "smcish – 共有メモリ ✓", "n": [1, 2.5, None, True]}
    checks["echo"] = await rpc.call("echo", unicode) == unicode
    try:
        await rpc.call("no_such_method")
        checks["error"] = False
    except RpcError as exc:
        checks["error"] = exc.code == METHOD_NOT_FOUND
    # Out of order: the slow call answers last, every response finds its caller by id.
    slow = rpc.call("sleep", 0.05, "slow")
    fast = [rpc.call("add", i, i) for i in range(args.calls)]
    checks["burst"] = await asyncio.gather(*fast) == [2 * i for i in range(args.calls)]
    checks["out_of_order"] = await slow == "slow"
    # A frame larger than the ring: it arrives in many partial reads, both ways.
    blob = await rpc.call("blob", args.blob, 7)
    checks["blob"] = len(blob) == args.blob and await rpc.call("crc", blob) == zlib.crc32(blob.encode())
    start = time.perf_counter()
    for i in range(args.calls):
        await rpc.call("add", i, 1)
    rtt_us = (time.perf_counter() - start) / max(args.calls, 1) * 1e6
    server = await rpc.call("transport_info")
    await rpc.close()
    ok = all(checks.values())
    emit(mode=info.mode, reason=getattr(info.reason, "name", None), server_mode=server["mode"],
         ok=ok, checks=checks, sequential_call_us=round(rtt_us, 1))
    return 0 if ok else 1


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="JSON-RPC 2.0 over smcish (Protocol API)")
    parser.add_argument("role", choices=("server", "client"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7777, help="server: 0 picks a free port")
    parser.add_argument("--calls", type=int, default=200, help="client: calls per phase")
    parser.add_argument("--blob", type=int, default=3 << 20, help="client: big frame size in bytes")
    args = parser.parse_args(argv)
    if args.role == "server":
        try:
            asyncio.run(run_server(args))
        except KeyboardInterrupt:
            return 130
        return 0
    return asyncio.run(run_client(args))


if __name__ == "__main__":
    sys.exit(main())
