"""Zero-copy against the copy path, 64 KiB to 16 MiB messages (a stand-alone benchmark).

    python -m benchmarks.zerocopy                          # 64K,1M,16M; asyncio and uvloop; 3 rounds of 1.5 s
    python -m benchmarks.zerocopy --sizes 64K --loops uvloop --duration 0.3 --rounds 1   # a quick look
    python -m benchmarks.zerocopy --out results.json       # default: bench-results/zerocopy-<UTC time>.json

One sender process streams messages of one size to one receiver process for a fixed time; every
configuration runs on the default asyncio loop and on uvloop:

- ``smcish-copy``: smcish over shared memory; the sender ``transport.write(message)`` (honouring
  pause_writing/resume_writing, yielding to the loop every MiB), the receiver an
  ``asyncio.BufferedProtocol`` copying into a preallocated 256 KiB buffer (get_buffer/buffer_updated);
- ``smcish-zc``: smcish over shared memory; the sender fills ring space with
  ``transport.reserve(n)`` / ``commit(k)`` from a preallocated source buffer (one memoryview slice
  assignment: the single copy a producer makes anyway; the loop and flow control of
  ``smcish.send_buffer``), the receiver an ``smcish.ZeroCopyProtocol`` that samples three bytes of each
  view, counts it and ``release_view()``s it;
- ``tcp-copy``: plain TCP on 127.0.0.1 (``loop.create_connection`` / ``create_server``), as smcish-copy.

A measurement is one fresh connection of the configuration after a warm-up connection (0.3 s): the
sender records ``getrusage`` and the time once the receiver's greeting line arrived (so the set-up is
complete on both sides), sends for ``--duration`` seconds, half-closes,
and stops the clock when the receiver's report arrives (bytes, checks, mismatches and its own
``getrusage`` from connection_made to EOF). Byte ``i`` of every stream is ``i % 251``; the receiver checks
the first, middle and last byte of every buffer or view and the total count: any mismatch, a wrong
count, or a connection in the wrong mode (smcish: ``ism`` on both sides) fails the run. MB/s is 10^6
bytes/s; CPU is sender + receiver user+sys seconds per GiB moved. Rounds are interleaved (every
configuration of a size once per round, the order rotating between rounds); figures are the median
[min-max] over rounds. ``smcish-zc`` also reports the share of bytes that ``reserve()`` had to hand out
as a private buffer (ring full, or bytes still queued) and ``commit()`` then copied like a write.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

from .children import ChildError, python_env, spawn_python

PERIOD = 251                    # byte i of a stream is i % PERIOD
RECV_BUFFER = 256 * 1024        # the BufferedProtocol receivers' preallocated buffer
YIELD_EVERY = 1 << 20           # senders yield to the loop after this many bytes when never paused
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "1073741824"}  # as the harness
CONFIGS = {                     # name: (transport, sender, receiver)
    "tcp-copy": ("tcp", "write", "buffered"),
    "smcish-copy": ("smcish", "write", "buffered"),
    "smcish-zc": ("smcish", "reserve", "zerocopy"),
}
LOOPS = ("asyncio", "uvloop")
Json = dict[str, Any]
GREETING = b"ready\n"           # the receiver's first line: the sender starts the clock once it has it
MEASURE_SLACK_S = 60.0          # a connection may take this long beyond its sending time before it fails


# --- shared by benchmarks.sendfile -------------------------------------------------------------------------

def cpu_now() -> float:
    """User + sys CPU seconds of this process, all threads."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop
        return uvloop.new_event_loop
    return asyncio.new_event_loop


def emit(message: Json) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def parse_size(text: str) -> int:
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text.rstrip("KMG")) * scale)


def size_name(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def mode_of(transport: Any) -> str:
    info = transport.get_extra_info("smcish")
    return "plain" if info is None else str(info.mode)


READY_TIMEOUT_S = 60.0          # a peer's ready line (imports, a listening server)
STOP_GRACE_S = 10.0             # a peer exits at EOF on stdin: this long, then SIGTERM, then SIGKILL


def _ready_line(line: str) -> bool:
    message = json.loads(line)
    return isinstance(message, dict) and "ready" in message


class Peer:
    """A child process speaking JSON lines on stdin/stdout (a `children.Child`; stderr passes through, the
    working directory is ours): its ready line within READY_TIMEOUT_S, every answer within the time
    given. Failures are RuntimeErrors."""

    def __init__(self, module: str, spec: Json) -> None:
        env = python_env()
        for key, value in MALLOC_ENV.items():
            env.setdefault(key, value)
        env.update(spec.get("env", {}))
        self.spec = spec
        try:
            self.child = spawn_python(module=module, args=["--child", json.dumps(spec)], env=env, cwd=None,
                                      stderr=None, name=f"{module} {spec.get('role')}",
                                      handshake=_ready_line, handshake_timeout=READY_TIMEOUT_S)
        except ChildError as exc:
            raise RuntimeError(f"peer {spec} did not start: {exc}") from None
        assert self.child.hello is not None  # the handshake matched it
        self.ready = self._checked(json.loads(self.child.hello))

    def _checked(self, message: Json) -> Json:
        if message.get("ok") is False or message.get("ready") is False:
            raise RuntimeError(f"peer {self.spec} failed:\n{message.get('error')}")
        return message

    def read(self, timeout: float) -> Json:
        try:
            line = self.child.read_line(timeout)
        except ChildError as exc:
            raise RuntimeError(f"peer {self.spec}: {exc}") from None
        message: Json = json.loads(line)
        return self._checked(message)

    def ask(self, command: Json, timeout: float) -> Json:
        """Send ``command``, return the answer (at most ``timeout`` s)."""
        try:
            self.child.send_json(command)
        except OSError as exc:  # BrokenPipeError: it is gone
            raise RuntimeError(f"peer {self.spec}: {exc!r}: {self.child.describe()}") from None
        return self.read(timeout)

    def stop(self) -> None:
        self.child.finish(STOP_GRACE_S, STOP_GRACE_S)


def summary(values: list[float]) -> Json:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def fmt(s: Json | None, digits: int = 0) -> str:
    if not s:
        return "-"
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}-{s['max']:.{digits}f}]"


def environment() -> Json:
    env: Json = {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
           "loadavg_start": os.getloadavg(), "malloc_env": MALLOC_ENV,
           "smcish_env": {k: v for k, v in os.environ.items() if k.startswith("SMCISH_")}}
    try:
        import uvloop
        env["uvloop"] = uvloop.__version__  # type: ignore[attr-defined]
    except ImportError:
        env["uvloop"] = None
    try:
        import smcish
        env["smcish"] = smcish.__version__
        env["smcish_config"] = dict(vars(smcish.Config.from_env()))
    except Exception as exc:  # noqa: BLE001 - recorded, the run fails later if it matters
        env["smcish"] = repr(exc)
    return env


def default_out(name: str) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return os.path.join("bench-results", f"{name}-{stamp}.json")


def write_json(path: str, data: Json) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


# --- receiver -----------------------------------------------------------------------------------------------

class _Check:
    """Count and sampled pattern check of the received stream."""

    __slots__ = ("checks", "cpu0", "first_bad", "mismatches", "offset", "transport")

    def __init__(self) -> None:
        self.offset = self.checks = self.mismatches = 0
        self.first_bad: int | None = None
        self.cpu0 = 0.0
        self.transport: Any = None  # from start()

    def start(self, transport: Any) -> None:
        self.transport = transport
        self.cpu0 = cpu_now()
        transport.write(GREETING)

    def span(self, buf: bytearray | memoryview, n: int) -> None:
        offset, last, mid = self.offset, n - 1, n >> 1
        if not (buf[0] == offset % PERIOD and buf[mid] == (offset + mid) % PERIOD
                and buf[last] == (offset + last) % PERIOD):
            self.mismatches += 1
            if self.first_bad is None:
                self.first_bad = offset
        self.checks += 1
        self.offset = offset + n

    def report(self) -> None:
        cpu = cpu_now() - self.cpu0
        transport = self.transport
        transport.write(json.dumps({"bytes": self.offset, "checks": self.checks,
                                    "mismatches": self.mismatches, "first_bad": self.first_bad, "cpu": cpu,
                                    "mode": mode_of(transport)}).encode() + b"\n")


class BufferedReceiver(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.buf = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buf)
        self.check = _Check()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.check.start(transport)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        self.check.span(self.buf, nbytes)

    def eof_received(self) -> bool:
        self.check.report()
        return False                    # close once the report is written


def _zerocopy_receiver() -> type[asyncio.BaseProtocol]:
    import smcish

    class ZeroCopyReceiver(smcish.ZeroCopyProtocol):
        def __init__(self) -> None:
            self.check = _Check()

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.check.start(transport)

        def view_received(self, view: memoryview) -> None:
            self.check.span(view, len(view))
            self.release_view()

        def view_eof_received(self) -> bool | None:
            self.check.report()
            return None

    return ZeroCopyReceiver


async def _receive(spec: Json) -> None:
    loop = asyncio.get_running_loop()
    factory: type[asyncio.BaseProtocol] = (_zerocopy_receiver() if spec["receiver"] == "zerocopy"
                                           else BufferedReceiver)
    if spec["transport"] == "tcp":
        server = await loop.create_server(factory, "127.0.0.1", 0)
    else:
        import smcish
        server = await smcish.create_server(factory, "127.0.0.1", 0, **spec.get("smcish", {}))
    emit({"ready": True, "port": server.sockets[0].getsockname()[1], "pid": os.getpid()})
    await loop.run_in_executor(None, sys.stdin.read)        # until the parent closes our stdin
    server.close()


# --- sender -------------------------------------------------------------------------------------------------

class SenderProtocol(asyncio.Protocol):
    """Flow control (pause/resume_writing), the receiver's greeting line and its one-line report."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.paused = False
        self.resume_waiter: asyncio.Future[None] | None = None
        self.inbox = bytearray()
        self.greeting: asyncio.Future[bytes] = loop.create_future()
        self.reply: asyncio.Future[Json] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        waiter, self.resume_waiter = self.resume_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_writable(self) -> None:
        if self.paused:
            self.resume_waiter = asyncio.get_running_loop().create_future()
            await self.resume_waiter

    def data_received(self, data: bytes) -> None:
        self.inbox += data
        while b"\n" in self.inbox:
            end = self.inbox.index(b"\n") + 1
            line = bytes(self.inbox[:end])
            del self.inbox[:end]
            if not self.greeting.done():
                self.greeting.set_result(line)
            elif not self.reply.done():
                self.reply.set_result(json.loads(line))

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        futures: tuple[asyncio.Future[Any] | None, ...] = (self.resume_waiter, self.greeting, self.reply)
        for fut in futures:
            if fut is not None and not fut.done():
                fut.set_exception(exc or ConnectionError("connection closed before the receiver's report"))
        if not self.lost.done():
            self.lost.set_result(None)


async def connect(spec: Json, port: int,
                  factory: Callable[[], SenderProtocol] = SenderProtocol) -> tuple[Any, SenderProtocol]:
    loop = asyncio.get_running_loop()
    if spec["transport"] == "tcp":
        return await loop.create_connection(factory, "127.0.0.1", port)
    import smcish
    pair: tuple[Any, SenderProtocol] = await smcish.create_connection(factory, "127.0.0.1", port,
                                                                      **spec.get("smcish", {}))
    return pair


def expected_mode(spec: Json) -> str:
    return spec.get("expect_mode") or ("plain" if spec["transport"] == "tcp" else "ism")


def check_mode(spec: Json, transport: Any, side: str, mode: str | None = None) -> None:
    mode = mode_of(transport) if mode is None else mode
    if mode != expected_mode(spec):
        info = transport.get_extra_info("smcish") if transport is not None else None
        raise RuntimeError(f"{side} connection is in mode {mode!r}, not {expected_mode(spec)!r} "
                           f"(reason {getattr(info, 'reason', None)!r})")


async def _send_write(transport: Any, proto: SenderProtocol, src: memoryview, size: int, deadline: float,
                      stats: Json) -> int:
    write, clock = transport.write, time.perf_counter
    offset = unyielded = 0
    while clock() < deadline:
        phase = offset % PERIOD
        write(src[phase:phase + size])
        offset += size
        if proto.paused:
            await proto.wait_writable()
            unyielded = 0
        else:
            unyielded += size
            if unyielded >= YIELD_EVERY:
                unyielded = 0
                await asyncio.sleep(0)
    return offset


async def _send_reserve(transport: Any, proto: SenderProtocol, src: memoryview, size: int, deadline: float,
                        stats: Json) -> int:
    """smcish.send_buffer's loop (wait for ring space, reserve, one slice copy, commit; wait while
    paused), with counters."""
    reserve, commit, buffered = transport.reserve, transport.commit, transport.get_write_buffer_size
    wait_reservable = transport.wait_reservable
    clock = time.perf_counter
    offset = unyielded = private = reserves = 0
    while clock() < deadline:
        phase = offset % PERIOD
        msg = src[phase:phase + size]
        pos = 0
        while pos < size:
            await wait_reservable()
            view = reserve(size - pos)
            n = len(view)
            if isinstance(view.obj, bytearray):     # not ring space: commit() copies it like a write
                private += n
            view[:] = msg[pos:pos + n]
            commit(n)
            reserves += 1
            pos += n
            if buffered() and proto.paused:
                await proto.wait_writable()
                unyielded = 0
        offset += size
        unyielded += size
        if unyielded >= YIELD_EVERY:
            unyielded = 0
            await asyncio.sleep(0)
    stats["private_bytes"] = private
    stats["reserves"] = reserves
    return offset


async def _measure(spec: Json, port: int, size: int, duration: float, src: memoryview,
                   mismatch: bool) -> Json:
    transport, proto = await connect(spec, port)
    check_mode(spec, transport, "sender")
    await proto.greeting         # the receiver has the connection (smcish: the set-up is confirmed)
    send = _send_reserve if spec["sender"] == "reserve" else _send_write
    stats: Json = {}
    if mismatch:                 # check the check: every message one byte off the pattern
        src = src[1:]
    cpu0, t0 = cpu_now(), time.perf_counter()
    try:
        sent = await send(transport, proto, src, size, t0 + duration, stats)
        ring = getattr(transport, "_ring", None)
        stats["tx_ring_capacity"] = getattr(ring, "tx_capacity", None) if ring is not None else None
        transport.write_eof()
        report = await proto.reply
        seconds = time.perf_counter() - t0
        cpu = cpu_now() - cpu0
    finally:
        transport.close()
    await proto.lost
    check_mode(spec, transport, "receiver", report["mode"])
    if report["bytes"] != sent or report["mismatches"]:
        raise RuntimeError(f"receiver saw {report['bytes']} bytes with {report['mismatches']} mismatching "
                           f"buffers (first at stream offset {report['first_bad']}); sender wrote {sent}")
    return {"bytes": sent, "seconds": seconds, "cpu_sender": cpu, "cpu_receiver": report["cpu"],
            "receiver_checks": report["checks"], **stats}


def _child(spec: Json) -> None:
    runner = asyncio.Runner(loop_factory=loop_factory(spec["loop"]))
    with runner:
        if spec["role"] == "receiver":
            runner.run(_receive(spec))
            return
        src = memoryview(bytes(range(PERIOD)) * ((spec["max_size"] + PERIOD) // PERIOD + 1))
        emit({"ready": True, "pid": os.getpid()})
        for line in sys.stdin:
            cmd = json.loads(line)
            try:
                runner.run(asyncio.wait_for(
                    _measure(spec, spec["port"], cmd["size"], cmd["warmup"], src, False),
                    cmd["warmup"] + MEASURE_SLACK_S))
                result = runner.run(asyncio.wait_for(
                    _measure(spec, spec["port"], cmd["size"], cmd["duration"], src,
                             cmd.get("mismatch", False)),
                    cmd["duration"] + MEASURE_SLACK_S))
            except BaseException as exc:  # noqa: BLE001 - reported to the parent, which stops the run
                emit({"ok": False, "error": "".join(traceback.format_exception(exc))})
            else:
                emit({"ok": True, "result": result})


# --- parent -------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(json.loads(argv[1]))
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.zerocopy", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="64K,1M,16M", help="message sizes (default 64K,1M,16M)")
    ap.add_argument("--loops", default=",".join(LOOPS))
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"from {','.join(CONFIGS)}")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=1.5, help="seconds of sending per measurement")
    ap.add_argument("--warmup", type=float, default=0.3, help="seconds of the warm-up connection before each")
    ap.add_argument("--out", help="JSON file (default bench-results/zerocopy-<UTC time>.json)")
    ap.add_argument("--inject-mismatch", action="store_true",
                    help="send every message one byte off the pattern: the run must fail (checks the check)")
    args = ap.parse_args(argv)
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    loops = args.loops.split(",")
    configs = args.configs.split(",")
    for name in configs:
        if name not in CONFIGS:
            ap.error(f"unknown configuration {name!r}")
    out = args.out or default_out("zerocopy")
    pairs = [(c, lp) for c in configs for lp in loops]
    data: Json = {"benchmark": "zerocopy", "argv": sys.argv, "environment": environment(),
            "settings": {"sizes": sizes, "rounds": args.rounds, "duration_s": args.duration,
                         "warmup_s": args.warmup, "recv_buffer": RECV_BUFFER, "pattern_period": PERIOD,
                         "configs": {c: Json(zip(("transport", "sender", "receiver"), CONFIGS[c],
                                                 strict=True))
                                     for c in configs}},
            "measurements": []}
    # the sender bounds the warm-up and the measured connection at their time + MEASURE_SLACK_S each
    answer_timeout = args.warmup + args.duration + 3 * MEASURE_SLACK_S
    peers: dict[tuple[str, str], tuple[Peer, Peer | None]] = {}
    try:
        for config, loop in pairs:
            transport, sender, receiver = CONFIGS[config]
            spec = {"loop": loop, "transport": transport, "sender": sender, "receiver": receiver,
                    "max_size": max(sizes)}
            recv = Peer("benchmarks.zerocopy", {**spec, "role": "receiver"})
            peers[config, loop] = (recv, None)
            send = Peer("benchmarks.zerocopy", {**spec, "role": "sender", "port": recv.ready["port"]})
            peers[config, loop] = (recv, send)
        for rnd in range(args.rounds):
            for size in sizes:
                shift = rnd % len(pairs)
                for config, loop in pairs[shift:] + pairs[:shift]:
                    sending = peers[config, loop][1]
                    assert sending is not None  # started with its receiver above
                    answer = sending.ask({"size": size, "duration": args.duration, "warmup": args.warmup,
                                          "mismatch": args.inject_mismatch}, answer_timeout)
                    r = answer["result"]
                    r.update(round=rnd, size=size, config=config, loop=loop)
                    data["measurements"].append(r)
                    mbs = r["bytes"] / r["seconds"] / 1e6
                    cpu = (r["cpu_sender"] + r["cpu_receiver"]) / (r["bytes"] / (1 << 30))
                    print(f"  round {rnd + 1} {size_name(size):>7} {loop:8} {config:12} {mbs:8.0f} MB/s "
                          f"{cpu:6.2f} CPU s/GiB", file=sys.stderr, flush=True)
    except RuntimeError as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        data["error"] = str(exc)
        write_json(out, data)
        return 1
    finally:
        for receiving, sending in peers.values():
            for child in (sending, receiving):
                if child is not None:
                    child.stop()
    data["environment"]["loadavg_end"] = os.getloadavg()
    data["summary"] = _summarise(data["measurements"], sizes, pairs)
    write_json(out, data)
    _print(data["summary"], sizes, pairs, args)
    print(f"\nJSON: {out}")
    return 0


def _summarise(ms: list[Json], sizes: list[int], pairs: list[tuple[str, str]]) -> Json:
    out: Json = {}
    for size in sizes:
        for config, loop in pairs:
            rows = [m for m in ms if m["size"] == size and m["config"] == config and m["loop"] == loop]
            gib = [m["bytes"] / (1 << 30) for m in rows]
            entry = {
                "mb_s": summary([m["bytes"] / m["seconds"] / 1e6 for m in rows]),
                "cpu_s_per_gib": summary([(m["cpu_sender"] + m["cpu_receiver"]) / g
                                          for m, g in zip(rows, gib, strict=True)]),
                "cpu_sender_s_per_gib": summary([m["cpu_sender"] / g
                                                 for m, g in zip(rows, gib, strict=True)]),
                "cpu_receiver_s_per_gib": summary([m["cpu_receiver"] / g
                                                   for m, g in zip(rows, gib, strict=True)]),
                "bytes_per_receive": summary([m["bytes"] / max(1, m["receiver_checks"]) for m in rows]),
            }
            if all("private_bytes" in m for m in rows):
                entry["private_pct"] = summary([100 * m["private_bytes"] / m["bytes"] for m in rows])
            out[f"{size}/{loop}/{config}"] = entry
        for loop in {lp for _, lp in pairs}:
            for a, b in (("smcish-zc", "smcish-copy"), ("smcish-copy", "tcp-copy"),
                         ("smcish-zc", "tcp-copy")):
                ra = sorted((m for m in ms if m["size"] == size and m["loop"] == loop and m["config"] == a),
                            key=lambda m: m["round"])
                rb = sorted((m for m in ms if m["size"] == size and m["loop"] == loop and m["config"] == b),
                            key=lambda m: m["round"])
                if ra and len(ra) == len(rb):
                    out[f"{size}/{loop}/{a}:{b}"] = {
                        "mb_s_ratio": summary([(x["bytes"] / x["seconds"]) / (y["bytes"] / y["seconds"])
                                               for x, y in zip(ra, rb, strict=True)]),
                        "cpu_ratio": summary([((x["cpu_sender"] + x["cpu_receiver"]) / x["bytes"])
                                              / ((y["cpu_sender"] + y["cpu_receiver"]) / y["bytes"])
                                              for x, y in zip(ra, rb, strict=True)])}
    return out


def _print(s: Json, sizes: list[int], pairs: list[tuple[str, str]], args: argparse.Namespace) -> None:
    print(f"\nzero-copy against the copy path: {args.rounds} interleaved rounds x {args.duration} s per "
          "measurement; median [min-max] over rounds. MB/s = 10^6 B/s; CPU = user+sys seconds per GiB "
          "(sender + receiver).")
    print(f"{'size':>7} {'loop':8} {'config':12} {'MB/s':>20} {'CPU s/GiB':>18} {'sender':>7} {'recv':>6}"
          f" {'B/recv':>8} {'private %':>10}")
    for size in sizes:
        for config, loop in sorted(pairs, key=lambda p: (p[1], list(CONFIGS).index(p[0]))):
            e = s[f"{size}/{loop}/{config}"]
            print(f"{size_name(size):>7} {loop:8} {config:12} {fmt(e['mb_s']):>20} "
                  f"{fmt(e['cpu_s_per_gib'], 2):>18} "
                  f"{e['cpu_sender_s_per_gib']['median']:7.2f} {e['cpu_receiver_s_per_gib']['median']:6.2f} "
                  f"{e['bytes_per_receive']['median'] / 1024:7.0f}K "
                  f"{fmt(e.get('private_pct'), 1) if 'private_pct' in e else '':>10}")
    print("\nratios per round (median [min-max]): throughput, CPU per GiB")
    for size in sizes:
        for loop in sorted({lp for _, lp in pairs}):
            for key in ("smcish-zc:smcish-copy", "smcish-copy:tcp-copy", "smcish-zc:tcp-copy"):
                e = s.get(f"{size}/{loop}/{key}")
                if e:
                    print(f"{size_name(size):>7} {loop:8} {key.replace(':', ' / '):26} "
                          f"{fmt(e['mb_s_ratio'], 2):>18} x   CPU {fmt(e['cpu_ratio'], 2):>18} x")


if __name__ == "__main__":
    sys.exit(main())
