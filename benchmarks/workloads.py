"""The workloads, written once: client and server halves of every case over any transport's `Api`.

Wire format (after the transport's own handshake): the client opens every data connection with
`HEADER` (magic, kind, flags, size) so one server process serves every case:
- KIND_ECHO: fixed-size messages echoed back (latency, rate).
- KIND_SETUP: one message echoed, then the server waits for EOF and closes (connection setup).
- KIND_STREAM: segments `u64 length` + `length` pattern bytes; after each segment the server answers one
  JSON line with its running byte count and verification result; a zero length ends the stream.
- KIND_HOLD: one message echoed, then the server holds the connection idle until the control channel says
  `release`, and closes it first (scale cases: the TIME_WAIT remnants stay on the server's port, not on
  the client's ephemeral ports).
TLS cases (`tls.*`) run the same wire format inside TLS, on a second streams listener of the server (addrs
"streams_tls") that only the harness's --tls-dir starts; the client verifies the server's certificate.
Stream byte i is `i % PERIOD`. The receiver checks the first, middle and last byte of every chunk it
receives against that (or, with verify "full", every byte), and counts bytes; the client fails the case
unless the final count equals what it sent and nothing mismatched, so a transport that drops, repeats,
reorders or corrupts data cannot produce a fast, wrong figure.
"""

from __future__ import annotations

import asyncio
import json
import math
import resource
import ssl
import struct
import time
import traceback
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, cast

from . import transports
from .cases import CaseParams

HEADER = struct.Struct("!4sBBxxI")  # magic, kind, flags, size
MAGIC = b"SBnc"
KIND_ECHO, KIND_SETUP, KIND_STREAM, KIND_HOLD = 1, 2, 3, 4
FLAG_FULL_VERIFY = 1
TLS_ROLE_SUFFIX = "_tls"  # addrs[role + TLS_ROLE_SUFFIX]: the server's TLS listener for `role`
SEGMENT = struct.Struct("!Q")

PERIOD = 251  # prime, so the pattern never lines up with power-of-two writes, reads or ring sizes
READ_SIZE = 256 * 1024  # StreamReader.read(n) size and BufferedProtocol buffer size
WRITE_BATCH = 1 << 20  # the Protocol sender yields to the loop after this many bytes
MAX_WRITE = 1 << 20
_PATTERN = bytes(range(PERIOD)) * (max(MAX_WRITE, READ_SIZE) // PERIOD + 2)
PATTERN = memoryview(_PATTERN)

SETTINGS = {
    "stream_read_size": READ_SIZE,
    "bufproto_buffer_size": READ_SIZE,
    "protocol_sender_batch": WRITE_BATCH,
    "pattern_period": PERIOD,
    "streams_limit": "asyncio default (64 KiB)",
}


# What a workload returns (JSON, to the harness): "metrics" (the figures), "cpu", "elapsed_s", "raw"
# (histograms, segments...), and from run_case "modes", "smcish_info", "loop_class"...
Result = dict[str, Any]
Workload = Callable[["ClientContext", CaseParams], Awaitable[Result]]


class ModeMismatch(RuntimeError):
    """An smcish connection did not get the mode the case requires: its figure would be a lie.

    `partial`: what the case measured anyway (scale cases), shown with the failure, never in a figure.
    """

    def __init__(self, message: str, partial: Result | None = None) -> None:
        super().__init__(message)
        self.partial = partial


class TlsMismatch(RuntimeError):
    """A TLS case's connection is not TLS on both sides (or a plain case's is): its figure would be a lie."""


class DataMismatch(RuntimeError):
    """The receiver did not get exactly the bytes the sender wrote."""


def cpu_now() -> tuple[float, float]:
    """(user, sys) CPU seconds of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def loop_name() -> str:
    loop = asyncio.get_running_loop()
    return f"{type(loop).__module__}.{type(loop).__qualname__}"


def format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)).strip()


# --- verification ----------------------------------------------------------------------------------------

class PatternCheck:
    """Counts received stream bytes and checks them against the sender's pattern."""

    __slots__ = ("checks", "first_bad", "full", "mismatches", "offset")

    def __init__(self, full: bool = False) -> None:
        self.offset = 0
        self.checks = 0
        self.mismatches = 0
        self.first_bad: int | None = None
        self.full = full

    def span(self, buf: bytes | bytearray, start: int, n: int) -> None:
        """Account for `buf[start:start + n]`, the next `n` bytes of the stream."""
        offset = self.offset
        if self.full:  # in-place memcmp (no copies): about 25 GB/s
            phase = offset % PERIOD
            ok = buf.startswith(PATTERN[phase:phase + n], start)
        else:
            last = n - 1
            mid = n >> 1
            ok = (buf[start] == offset % PERIOD and buf[start + last] == (offset + last) % PERIOD
                  and buf[start + mid] == (offset + mid) % PERIOD)
        self.checks += 1
        if not ok:
            self.mismatches += 1
            if self.first_bad is None:
                self.first_bad = offset
        self.offset = offset + n

    def report_line(self) -> bytes:
        return json.dumps({"bytes": self.offset, "checks": self.checks, "mismatches": self.mismatches,
                           "first_bad": self.first_bad}).encode() + b"\n"


# --- server side -----------------------------------------------------------------------------------------

class ServerState:
    """What the server process reports over the control channel: CPU, connection modes, errors."""

    def __init__(self) -> None:
        self.modes: Counter[str] = Counter()
        self.info: dict[str, Any] | None = None
        self.tls: Counter[str] = Counter()  # "TLSv1.3 TLS_AES_256_GCM_SHA384": connections; "none": plain
        self.errors: list[str] = []
        self.held = 0  # KIND_HOLD connections waiting for `release`
        self._release: asyncio.Event | None = None

    @property
    def release_event(self) -> asyncio.Event:
        if self._release is None:
            self._release = asyncio.Event()
        return self._release

    def release(self) -> int:
        """Let every held connection close (server side first); returns how many were held."""
        held, self.held = self.held, 0
        if self._release is not None:
            self._release.set()
            self._release = None
        return held

    def note(self, obj: Any) -> None:
        mode, _reason = transports.mode_of(obj)
        self.modes[mode] += 1
        if self.info is None and mode != "none":
            self.info = transports.describe_info(obj)
        self.tls[_tls_key(transports.tls_of(obj))] += 1

    def error(self, what: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(what)

    def snapshot(self, reset: bool) -> dict[str, Any]:
        user, sys_ = cpu_now()
        snap = {"cpu": [user, sys_], "modes": dict(self.modes), "info": self.info,
                "errors": list(self.errors), "tls": dict(self.tls), "loop": loop_name(),
                "smcish_stats": transports.smcish_stats()}
        if reset:
            self.modes.clear()
            self.info = None
            self.tls.clear()
            self.errors.clear()
        return snap


def _tls_key(tls: dict[str, Any] | None) -> str:
    return f"{tls['version']} {tls['cipher']}" if tls else "none"


async def serve_ctrl(state: ServerState, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Control channel, one JSON line per command: `snap` / `reset` (the client brackets measured phases with
    it), `mem` (this process's fds, shared memory, RSS: scale cases), `release` (close the held
    connections)."""
    try:
        while line := await reader.readline():
            command = line.strip()
            if command == b"mem":
                from . import scale  # only the scale cases ask

                answer = scale.server_snapshot(state)
            elif command == b"release":
                answer = {"released": state.release()}
            else:
                answer = state.snapshot(reset=command == b"reset")
            writer.write(json.dumps(answer).encode() + b"\n")
    finally:
        writer.close()


async def serve_streams(state: ServerState, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter) -> None:
    """Server half on the streams API: echo, setup and StreamReader.read sink."""
    try:
        magic, kind, flags, size = HEADER.unpack(await reader.readexactly(HEADER.size))
        state.note(writer)  # after the first bytes: an smcish server is "pending" until they decide
        if magic != MAGIC:
            raise ValueError(f"bad benchmark header magic {magic!r}")
        if kind == KIND_ECHO:
            read, write = reader.readexactly, writer.write
            while True:
                try:
                    data = await read(size)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        raise
                    break
                write(data)
        elif kind == KIND_SETUP:
            writer.write(await reader.readexactly(size))
            if await reader.read(1):
                raise ValueError("setup client sent more than one request")
        elif kind == KIND_HOLD:
            release = state.release_event
            writer.write(await reader.readexactly(size))
            state.held += 1
            await release.wait()  # no read pending: an idle connection costs only what the transport holds
        elif kind == KIND_STREAM:
            check = PatternCheck(bool(flags & FLAG_FULL_VERIFY))
            read = reader.read
            while (length := SEGMENT.unpack(await reader.readexactly(SEGMENT.size))[0]):
                remaining = length
                while remaining:
                    chunk = await read(READ_SIZE if remaining > READ_SIZE else remaining)
                    if not chunk:
                        raise ConnectionError(f"EOF with {remaining} bytes of a {length}-byte segment "
                                              "missing")
                    n = len(chunk)
                    check.span(chunk, 0, n)
                    remaining -= n
                writer.write(check.report_line())
            await reader.read()  # the client closes after the end marker
        else:
            raise ValueError(f"unknown benchmark kind {kind}")
    except Exception as exc:  # noqa: BLE001 - reported to the client through the control channel
        state.error(f"streams server: {format_exception(exc)}")
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except Exception:  # noqa: BLE001 - the connection's error, if any, is reported above
            pass


class EchoProtocol(asyncio.Protocol):
    """Server half on the Protocol API: echoes fixed-size messages (latency)."""

    transport: asyncio.Transport  # from connection_made

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.size = 0
        self.buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        size = self.size
        if size and len(data) == size and not self.buf:  # the common case: one message per delivery
            self.transport.write(data)
            return
        buf = self.buf
        buf += data
        if not size:
            if len(buf) < HEADER.size:
                return
            magic, kind, _flags, size = HEADER.unpack_from(buf)
            if magic != MAGIC or kind != KIND_ECHO or not size:
                self.state.error(f"echo protocol: bad header {bytes(buf[:HEADER.size])!r}")
                self.transport.abort()
                return
            self.size = size
            del buf[:HEADER.size]
            self.state.note(self.transport)
        while len(buf) >= size:
            self.transport.write(bytes(buf[:size]))
            del buf[:size]

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.state.error(f"echo protocol: connection lost: {exc!r}")


class SinkProtocol(asyncio.BufferedProtocol):
    """Server half of the BufferedProtocol throughput cases: counts and checks, answers per segment."""

    transport: asyncio.Transport  # from connection_made

    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.buf = bytearray(READ_SIZE)
        self.view = memoryview(self.buf)
        self.acc = bytearray()  # a header or segment length being assembled
        self.need = HEADER.size
        self.remaining = 0  # payload bytes left in the current segment
        self.header_seen = False
        self.check = PatternCheck()  # replaced by the header's (its flags say how to verify)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        remaining = self.remaining
        if nbytes <= remaining:  # hot path: the whole delivery is payload
            self.check.span(self.buf, 0, nbytes)
            self.remaining = remaining - nbytes
            if nbytes == remaining:
                self.transport.write(self.check.report_line())
            return
        try:
            self._parse(nbytes)
        except Exception as exc:  # noqa: BLE001 - reported to the client through the control channel
            self.state.error(f"sink protocol: {format_exception(exc)}")
            self.transport.abort()

    def _parse(self, nbytes: int) -> None:
        pos = 0
        while pos < nbytes:
            if self.remaining:
                take = min(self.remaining, nbytes - pos)
                self.check.span(self.buf, pos, take)
                pos += take
                self.remaining -= take
                if not self.remaining:
                    self.transport.write(self.check.report_line())
                continue
            take = min(self.need - len(self.acc), nbytes - pos)
            self.acc += self.view[pos:pos + take]
            pos += take
            if len(self.acc) < self.need:
                continue
            if not self.header_seen:
                magic, kind, flags, _size = HEADER.unpack(self.acc)
                if magic != MAGIC or kind != KIND_STREAM:
                    raise ValueError(f"bad stream header {bytes(self.acc)!r}")
                self.header_seen = True
                self.check = PatternCheck(bool(flags & FLAG_FULL_VERIFY))
                self.need = SEGMENT.size
                self.state.note(self.transport)
            else:
                (length,) = SEGMENT.unpack(self.acc)
                if length == 0 and pos < nbytes:
                    raise ValueError("data after the end marker")
                self.remaining = length
            self.acc.clear()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.state.error(f"sink protocol: connection lost: {exc!r}")


# --- client side -----------------------------------------------------------------------------------------

class ClientContext:
    """What a client workload needs from its process: the Api, the server's addresses, the control channel."""

    def __init__(self, api: transports.Api, addrs: dict[str, list[Any]], transport: transports.Transport,
                 ctrl_path: str) -> None:
        self.api = api
        self.addrs = addrs
        self.transport = transport
        self.ctrl_path = ctrl_path
        self.ctrl_reader: asyncio.StreamReader | None = None
        self.ctrl_writer: asyncio.StreamWriter | None = None
        self.modes: Counter[str] = Counter()
        self.info: dict[str, Any] | None = None
        self.tls: Counter[str] = Counter()  # as ServerState.tls
        self.client_ssl: ssl.SSLContext | None = None  # for the tls.* cases (peers.py, from --tls-dir)
        self.loop_errors: list[str] = []

    async def start(self) -> None:
        self.ctrl_reader, self.ctrl_writer = await asyncio.open_unix_connection(self.ctrl_path)
        asyncio.get_running_loop().set_exception_handler(self._loop_exception)

    def _loop_exception(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        text = context.get("message", "")
        if exc is not None:
            text += ": " + format_exception(exc)
        if len(self.loop_errors) < 20:
            self.loop_errors.append(text)

    async def close(self) -> None:
        if self.ctrl_writer is not None:
            self.ctrl_writer.close()

    def addr(self, role: str) -> list[Any]:
        return self.addrs[role]

    def endpoint(self, role: str, p: CaseParams) -> tuple[list[Any], dict[str, Any]]:
        """(addr, keywords) to connect to the server's `role` listener for case `p`: for a TLS case its TLS
        listener, with the client's context (CA of the run) and the name its certificate must carry."""
        if not p.tls:
            return self.addrs[role], {}
        if self.client_ssl is None or role + TLS_ROLE_SUFFIX not in self.addrs:
            raise TlsMismatch(f"a TLS case, but the peers have no TLS {role!r} listener (started without "
                              "--tls-dir)")
        return self.addrs[role + TLS_ROLE_SUFFIX], {"ssl": self.client_ssl,
                                                    "server_hostname": transports.TLS_HOSTNAME}

    def note(self, obj: Any) -> None:
        """Record a connection's mode; a smcish connection in the wrong mode fails the case at once."""
        mode, reason = transports.mode_of(obj)
        self.modes[mode] += 1
        if self.info is None and mode != "none":
            self.info = transports.describe_info(obj)
        self.tls[_tls_key(transports.tls_of(obj))] += 1
        expect = self.transport.expect_mode
        if expect is not None and mode != expect:
            what = "the TCP fallback" if mode == "tcp" else f"mode {mode!r}"
            raise ModeMismatch(
                f"{self.transport.name}: connection negotiated mode {mode!r} (reason={reason!r}), expected "
                f"{expect!r}; this case would have measured {what}, so it is refused. Check SMCISH_DEVICE "
                f"(now {transports.smcish_env().get('SMCISH_DEVICE', 'unset')!r}) and the ISM device.")

    async def snap(self, reset: bool = False) -> dict[str, Any]:
        return await self.ctrl("reset" if reset else "snap")

    async def ctrl(self, command: str) -> dict[str, Any]:
        """One command on the server's control channel (see serve_ctrl) and its JSON answer."""
        if self.ctrl_writer is None or self.ctrl_reader is None:
            raise RuntimeError("ClientContext.start() was not called")
        self.ctrl_writer.write(command.encode() + b"\n")
        answer: dict[str, Any] = json.loads(await self.ctrl_reader.readline())
        return answer


class Window:
    """A measured phase: wall time and CPU (user+sys) of both processes."""

    async def start(self, ctx: ClientContext) -> Window:
        snap = await ctx.snap()
        self.server0, self.server_stats0 = snap["cpu"], snap["smcish_stats"]
        self.client_stats0 = transports.smcish_stats()
        self.client0 = cpu_now()
        self.t0 = time.perf_counter_ns()
        return self

    async def stop(self, ctx: ClientContext) -> Window:
        self.t1 = time.perf_counter_ns()
        self.client1 = cpu_now()
        self.client_stats1 = transports.smcish_stats()
        snap = await ctx.snap()
        self.server1, self.server_stats1 = snap["cpu"], snap["smcish_stats"]
        return self

    @property
    def elapsed_s(self) -> float:
        return (self.t1 - self.t0) / 1e9

    def cpu(self) -> dict[str, Any]:
        client = {"user": self.client1[0] - self.client0[0], "sys": self.client1[1] - self.client0[1]}
        server = {"user": self.server1[0] - self.server0[0], "sys": self.server1[1] - self.server0[1]}
        total = client["user"] + client["sys"] + server["user"] + server["sys"]
        return {"client": client, "server": server, "total_s": total}

    def result(self, metrics: dict[str, float], raw: dict[str, Any]) -> Result:
        result: Result = {"metrics": metrics, "cpu": self.cpu(), "elapsed_s": self.elapsed_s, "raw": raw}
        client = transports.stats_delta(self.client_stats0, self.client_stats1)
        server = transports.stats_delta(self.server_stats0, self.server_stats1)
        if client or server:
            result["smcish_stats"] = {"client": client, "server": server}  # over the measured phase
        return result


async def run_case(ctx: ClientContext, p: CaseParams) -> Result:
    """Run one measurement of case `p` (Case.params()) and return its metrics and raw data."""
    leftover = ctx.loop_errors + (await ctx.snap(reset=True))["errors"]
    if leftover:  # raised after the previous measurement had reported: a transport bug worth failing on
        ctx.loop_errors.clear()
        raise RuntimeError("unhandled errors after the previous measurement finished:\n"
                           + "\n".join(leftover))
    ctx.modes.clear()
    ctx.info = None
    ctx.tls.clear()
    workload = WORKLOADS[p.kind, p.api]
    result = await workload(ctx, p)
    await asyncio.sleep(0.002)  # let both sides finish closing, so their errors land in this measurement
    server = await ctx.snap(reset=True)
    expect = ctx.transport.expect_mode
    if expect is not None:
        wrong = {m: n for m, n in server["modes"].items() if m != expect}
        if wrong:
            raise ModeMismatch(f"{ctx.transport.name}: server side saw connections in modes {wrong}, "
                               f"expected only {expect!r}")
        if ctx.transport.name == "smcish-nopoll":
            polls = {**transports.poll_fields(transports.smcish_config()), **transports.poll_fields(ctx.info)}
            if any(polls.values()):
                raise ModeMismatch(f"smcish-nopoll: busy-poll still on ({polls}); set the right variable "
                                   f"with --nopoll-env")
            if not polls:
                result.setdefault("warnings", []).append(
                    "could not verify that busy-poll is off: neither smcish.Config.from_env() nor "
                    "get_extra_info('smcish') has a *poll* field")
    for side, seen in (("client", dict(ctx.tls)), ("server", server.get("tls", {}))):
        plain = seen.get("none", 0)
        if p.tls and (plain or not seen):
            raise TlsMismatch(f"TLS case, but the {side} saw {plain} plain connection(s) ({seen})")
        if not p.tls and len(seen) > plain:
            raise TlsMismatch(f"a plain case, but the {side} saw TLS connections ({seen})")
    errors = ctx.loop_errors + server["errors"]
    ctx.loop_errors.clear()
    if errors:
        raise RuntimeError("unhandled errors during the case (client loop, then server):\n"
                           + "\n".join(errors))
    result["modes"] = {"client": dict(ctx.modes), "server": server["modes"]}
    result["smcish_info"] = {"client": ctx.info, "server": server["info"]}
    if p.tls:
        result["tls"] = {"client": dict(ctx.tls), "server": server["tls"]}  # "version cipher": connections
    result["loop_class"] = {"client": loop_name(), "server": server["loop"]}
    config = transports.smcish_config()
    if config is not None:
        result["smcish_config"] = config
    return result


def request_header(kind: int, size: int, flags: int = 0) -> bytes:
    return HEADER.pack(MAGIC, kind, flags, size)


# latency -----------------------------------------------------------------------------------------------

def _latency_result(rtts: list[int], window: Window, bad: int, warmup_ops: int) -> Result:
    if bad:
        raise DataMismatch(f"{bad} of {len(rtts)} echoed messages differ from what was sent")
    s = sorted(rtts)
    n = len(s)

    def pct(q: float) -> float:
        return s[min(n - 1, max(0, math.ceil(q * n) - 1))] / 1000

    cpu = window.cpu()
    metrics = {
        "p50_us": pct(0.50), "p90_us": pct(0.90), "p99_us": pct(0.99), "p999_us": pct(0.999),
        "min_us": s[0] / 1000, "max_us": s[-1] / 1000, "mean_us": sum(s) / n / 1000,
        "ops": n, "cpu_us_per_op": cpu["total_s"] * 1e6 / n,
    }
    return window.result(metrics, {"rtt_hist_ns": log_histogram(s), "warmup_ops": warmup_ops})


def log_histogram(sorted_ns: list[int], growth: float = 1.02) -> list[list[int]]:
    """[[bucket lower bound ns, count], ...] with 2 % wide buckets: compact, and enough for any percentile."""
    scale = 1 / math.log(growth)
    counts: Counter[int] = Counter(int(math.log(max(v, 1)) * scale) for v in sorted_ns)
    return [[round(growth ** b), c] for b, c in sorted(counts.items())]


async def latency_streams(ctx: ClientContext, p: CaseParams) -> Result:
    size = p.size
    msg = bytes(PATTERN[:size])
    addr, kw = ctx.endpoint("streams", p)
    reader, writer = await ctx.api.open_connection(*addr, **kw)
    try:
        ctx.note(writer)
        writer.write(request_header(KIND_ECHO, size))
        write, read, clock = writer.write, reader.readexactly, time.perf_counter_ns
        warm_end = clock() + int(p.warmup_s * 1e9)
        warm = 0
        while warm < p.max_ops:
            write(msg)
            await read(size)
            warm += 1
            if clock() >= warm_end:
                break
        window = await Window().start(ctx)
        deadline = clock() + int(p.duration_s * 1e9)
        rtts: list[int] = []
        bad = 0
        for _ in range(p.max_ops):
            t0 = clock()
            write(msg)
            reply = await read(size)
            t1 = clock()
            rtts.append(t1 - t0)
            if reply != msg:
                bad += 1
            if t1 >= deadline:
                break
        await window.stop(ctx)
    finally:
        writer.close()
        await writer.wait_closed()
    return _latency_result(rtts, window, bad, warm)


class _PingProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.inbox = bytearray()
        self.need = 0
        self.waiter: asyncio.Future[None] | None = None
        self.lost: asyncio.Future[Exception | None] = loop.create_future()

    def data_received(self, data: bytes) -> None:
        self.inbox += data
        waiter = self.waiter
        if waiter is not None and len(self.inbox) >= self.need:
            self.waiter = None
            waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionResetError("connection closed during a round trip"))
        if not self.lost.done():
            self.lost.set_result(exc)


async def latency_protocol(ctx: ClientContext, p: CaseParams) -> Result:
    size = p.size
    msg = bytes(PATTERN[:size])
    loop = asyncio.get_running_loop()
    transport, proto = await ctx.api.create_connection(_PingProtocol, *ctx.addr("protocol"))
    try:
        ctx.note(transport)
        transport.write(request_header(KIND_ECHO, size))
        proto.need = size
        write, inbox = transport.write, proto.inbox
        clock, new_future = time.perf_counter_ns, loop.create_future
        warm_end = clock() + int(p.warmup_s * 1e9)
        warm = 0
        while warm < p.max_ops:
            proto.waiter = fut = new_future()
            write(msg)
            await fut
            del inbox[:size]
            warm += 1
            if clock() >= warm_end:
                break
        window = await Window().start(ctx)
        deadline = clock() + int(p.duration_s * 1e9)
        rtts: list[int] = []
        bad = 0
        for _ in range(p.max_ops):
            t0 = clock()
            proto.waiter = fut = new_future()
            write(msg)
            await fut
            t1 = clock()
            rtts.append(t1 - t0)
            if inbox[:size] != msg:
                bad += 1
            del inbox[:size]
            if t1 >= deadline:
                break
        await window.stop(ctx)
    finally:
        transport.close()
        await proto.lost
    return _latency_result(rtts, window, bad, warm)


# rate --------------------------------------------------------------------------------------------------

async def rate_streams(ctx: ClientContext, p: CaseParams) -> Result:
    size, conns = p.size, p.conns
    msg = bytes(PATTERN[:size])
    pairs = []
    try:
        for _ in range(conns):
            reader, writer = await ctx.api.open_connection(*ctx.addr("streams"))
            pairs.append((reader, writer))
            ctx.note(writer)
            writer.write(request_header(KIND_ECHO, size))
        bad = 0

        async def worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, deadline: float) -> int:
            nonlocal bad
            write, read, clock = writer.write, reader.readexactly, time.perf_counter
            done = 0
            while done < p.max_ops:
                write(msg)
                if await read(size) != msg:
                    bad += 1
                done += 1
                if clock() >= deadline:
                    break
            return done

        warm = sum(await asyncio.gather(*(worker(r, w, time.perf_counter() + p.warmup_s) for r, w in pairs)))
        window = await Window().start(ctx)
        deadline = time.perf_counter() + p.duration_s
        ops = sum(await asyncio.gather(*(worker(r, w, deadline) for r, w in pairs)))
        await window.stop(ctx)
    finally:
        for _, writer in pairs:
            writer.close()
        for _, writer in pairs:
            await writer.wait_closed()
    if bad:
        raise DataMismatch(f"{bad} echoed messages differ from what was sent")
    cpu = window.cpu()
    metrics = {"msgs_per_s": ops / window.elapsed_s, "ops": ops, "cpu_us_per_msg": cpu["total_s"] * 1e6 / ops}
    return window.result(metrics, {"warmup_ops": warm})


# connection setup --------------------------------------------------------------------------------------

async def setup_streams(ctx: ClientContext, p: CaseParams) -> Result:
    size = p.size
    msg = bytes(PATTERN[:size])
    request = request_header(KIND_SETUP, size) + msg
    open_connection, addr = ctx.api.open_connection, ctx.addr("streams")

    async def one() -> None:
        reader, writer = await open_connection(*addr)
        try:
            ctx.note(writer)
            writer.write(request)
            if await reader.readexactly(size) != msg:
                raise DataMismatch("setup: the echoed request differs from what was sent")
        finally:
            writer.close()
            await writer.wait_closed()

    async def phase(seconds: float) -> int:
        deadline = time.perf_counter() + seconds
        done = 0
        while done < p.max_conns:
            await one()
            done += 1
            if time.perf_counter() >= deadline:
                break
        return done

    warm = await phase(p.warmup_s)
    window = await Window().start(ctx)
    conns = await phase(p.duration_s)
    await window.stop(ctx)
    cpu = window.cpu()
    metrics = {"conns_per_s": conns / window.elapsed_s, "conns": conns,
               "cpu_us_per_conn": cpu["total_s"] * 1e6 / conns}
    return window.result(metrics, {"warmup_conns": warm})


# throughput --------------------------------------------------------------------------------------------

class _StreamsSender:
    """Sends through StreamWriter.write + drain (the receiver is the streams server)."""

    role = "streams"

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, ctx: ClientContext, p: CaseParams) -> _StreamsSender:
        addr, kw = ctx.endpoint(cls.role, p)
        reader, writer = await ctx.api.open_connection(*addr, **kw)
        ctx.note(writer)
        return cls(reader, writer)

    def write(self, data: bytes) -> None:
        self.writer.write(data)

    async def send(self, offset: int, nbytes: int, size: int) -> None:
        write, drain, pattern = self.writer.write, self.writer.drain, PATTERN
        end = offset + nbytes
        while offset < end:
            phase = offset % PERIOD
            write(pattern[phase:phase + size])
            await drain()
            offset += size

    async def reply(self) -> dict[str, Any]:
        line = await self.reader.readline()
        if not line.endswith(b"\n"):
            raise ConnectionError("server closed the connection before answering a segment")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


class _SendProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.paused = False
        self.resume_waiter: asyncio.Future[None] | None = None
        self.inbox = bytearray()
        self.line_waiter: asyncio.Future[None] | None = None
        self.lost: asyncio.Future[Exception | None] = loop.create_future()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.resume_waiter is not None and not self.resume_waiter.done():
            self.resume_waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.inbox += data
        if self.line_waiter is not None and b"\n" in self.inbox and not self.line_waiter.done():
            self.line_waiter.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        error = exc or ConnectionResetError("connection closed")
        for waiter in (self.resume_waiter, self.line_waiter):
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
        if not self.lost.done():
            self.lost.set_result(exc)


class _ProtocolSender:
    """Sends through transport.write, honouring pause_writing/resume_writing (receiver: BufferedProtocol)."""

    role = "bufproto"

    def __init__(self, transport: asyncio.Transport, proto: _SendProtocol) -> None:
        self.transport, self.proto = transport, proto

    @classmethod
    async def open(cls, ctx: ClientContext, p: CaseParams) -> _ProtocolSender:
        addr, kw = ctx.endpoint(cls.role, p)
        transport, proto = await ctx.api.create_connection(_SendProtocol, *addr, **kw)
        ctx.note(transport)
        return cls(transport, proto)

    def write(self, data: bytes) -> None:
        self.transport.write(data)

    async def send(self, offset: int, nbytes: int, size: int) -> None:
        write, proto, pattern = self.transport.write, self.proto, PATTERN
        loop = asyncio.get_running_loop()
        end = offset + nbytes
        batch = max(WRITE_BATCH, size)
        while offset < end:
            if proto.paused:
                proto.resume_waiter = loop.create_future()
                await proto.resume_waiter
            batch_end = min(end, offset + batch)
            while offset < batch_end:
                phase = offset % PERIOD
                write(pattern[phase:phase + size])
                offset += size
                if proto.paused:
                    break
            else:
                await asyncio.sleep(0)

    async def reply(self) -> dict[str, Any]:
        proto = self.proto
        if b"\n" not in proto.inbox:
            proto.line_waiter = asyncio.get_running_loop().create_future()
            await proto.line_waiter
        end = proto.inbox.index(b"\n") + 1
        line = bytes(proto.inbox[:end])
        del proto.inbox[:end]
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def close(self) -> None:
        self.transport.close()
        await self.proto.lost


async def _throughput(ctx: ClientContext, p: CaseParams,
                      sender_cls: type[_StreamsSender] | type[_ProtocolSender]) -> Result:
    """Probe, warm-up and measured segments; each sized from the previous one's rate to fit its time
    budget."""
    size = p.size
    flags = FLAG_FULL_VERIFY if p.verify == "full" else 0
    sender = await sender_cls.open(ctx, p)
    sent = 0
    segments = []

    async def segment(nbytes: int, window: Window | None = None) -> float:
        nonlocal sent
        if window is not None:
            await window.start(ctx)
        t0 = time.perf_counter_ns()
        sender.write(SEGMENT.pack(nbytes))
        await sender.send(sent, nbytes, size)
        sent += nbytes
        report = await sender.reply()
        seconds = (time.perf_counter_ns() - t0) / 1e9
        if window is not None:
            await window.stop(ctx)
        if report["bytes"] != sent or report["mismatches"]:
            raise DataMismatch(f"receiver saw {report['bytes']} bytes with {report['mismatches']} "
                               f"mismatching chunks (first at stream offset {report['first_bad']}); sender "
                               f"wrote {sent}")
        segments.append({"bytes": nbytes, "seconds": seconds, "phase": "measured" if window else "warm-up",
                         "receiver_checks": report["checks"]})
        return nbytes / seconds

    def plan(rate: float, seconds: float) -> int:
        nbytes = int(rate * seconds) // size * size
        return max(16 * size, min(nbytes, p.max_bytes // size * size))

    try:
        sender.write(request_header(KIND_STREAM, size, flags))
        rate = await segment(max(16 * size, (256 * 1024) // size * size))
        rate = await segment(plan(rate, p.warmup_s))
        window = Window()
        await segment(plan(rate, p.duration_s), window)
        sender.write(SEGMENT.pack(0))
    finally:
        await sender.close()
    measured = segments[-1]
    cpu = window.cpu()
    metrics = {"MBps": measured["bytes"] / measured["seconds"] / 1e6, "bytes": measured["bytes"],
               "seconds": measured["seconds"], "cpu_s_per_GiB": cpu["total_s"] / (measured["bytes"] / 2**30)}
    return window.result(metrics, {"segments": segments, "verify": p.verify})


async def throughput_streams(ctx: ClientContext, p: CaseParams) -> Result:
    return await _throughput(ctx, p, _StreamsSender)


async def throughput_protocol(ctx: ClientContext, p: CaseParams) -> Result:
    return await _throughput(ctx, p, _ProtocolSender)


WORKLOADS: dict[tuple[str, str], Workload] = {
    ("latency", "streams"): latency_streams,
    ("latency", "protocol"): latency_protocol,
    ("throughput", "streams"): throughput_streams,
    ("throughput", "bufproto"): throughput_protocol,
    ("rate", "streams"): rate_streams,
    ("setup", "streams"): setup_streams,
}


from .scale import scale_streams  # noqa: E402 - scale.py builds on this module

WORKLOADS[("scale", "streams")] = scale_streams
