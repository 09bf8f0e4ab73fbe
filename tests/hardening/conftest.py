"""Helpers for the hardening suite: the hostile peer process, a victim process-in-a-loop, leak
snapshots, and small child-process runners. See docs/reliability.md.

The parent tests/conftest.py already gives every session a private embedded runtime dir
(SMCISH_RUNTIME_DIR, inherited by every child process started here).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import selectors
import signal
import subprocess
import sys
import time
import zlib

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
HOSTILE = os.path.join(HERE, "hostile_peer.py")
PYTHON = sys.executable
HOST = "127.0.0.1"

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import ism_backend  # noqa: E402
import smcish  # noqa: E402


def child_env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


# ------------------------------------------------------------------ counting what a process holds

def fd_count(pid: int | None = None) -> int:
    return len(os.listdir(f"/proc/{pid or 'self'}/fd"))


def _trim() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc malloc_trim), so RSS shows
    live memory rather than the allocator's high-water mark."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def rss_kib(pid: int | None = None) -> int:
    if pid is None:
        _trim()
    with open(f"/proc/{pid or 'self'}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def shm_listing() -> set:
    """/dev/shm entries, minus smcish runtime directories (the embedded device's default home and
    the test sessions' own, which other sessions may create meanwhile): regions never go there."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return set()
    return {n for n in names
            if not (n.startswith("smcish-") and os.path.isdir(os.path.join("/dev/shm", n)))}


def runtime_files(device=None) -> set:
    path = os.environ["SMCISH_RUNTIME_DIR"] if device is None else device.dir
    return set(os.listdir(path))


def served_connections(device) -> int:
    """Control connections peers opened to our embedded endpoint (a peer caches one per
    endpoint it talks to, up to 64): unix sockets of ours bound to the endpoint path, minus the
    listener. Counted via /proc/net/unix and our fds' inodes."""
    path = getattr(device, "_sock_path", None)
    if not path:
        return 0
    inodes = set()
    with open("/proc/net/unix") as fh:
        next(fh)
        for line in fh:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == path:
                inodes.add(parts[6])
    mine = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            mine += 1
    return max(0, mine - 1)


def snapshot(device) -> dict:
    """What this process holds on the device, and its fds net of the device's caches.

    The region pool and the cache of control connections to peers' endpoints are bounded caches,
    not leaks: fds are counted without them (``fds_net``).
    """
    st = device.status()
    if st.get("kind") == "daemon":
        pooled_fds = st.get("client", {}).get("pooled_fds", 0)
        me = next((c for c in st.get("clients", []) if c["pid"] == os.getpid()), {})
        # ismd counts pooled regions as ours: net them out
        out = {"regions": me.get("regions", 0) - st.get("client", {}).get("pooled", 0),
               "attached": me.get("attachments", 0)}
        peers = 0
    else:
        pooled_fds = st["pooled_fds"]
        peers = st["peers"]
        out = {k: st[k] for k in ("regions", "attached", "draining", "served_attachments",
                                  "zombies", "intents")}
    served = served_connections(device)
    fds = fd_count()
    out["fds"] = fds
    out["fds_net"] = fds - pooled_fds - peers - served
    return out


async def assert_device_idle(device, timeout: float = 3.0) -> None:
    """Once every connection of a test is closed, this process holds no region at all."""
    deadline = time.monotonic() + timeout
    while True:
        st = snapshot(device)
        busy = {k: v for k, v in st.items()
                if k in ("regions", "attached", "draining", "served_attachments", "zombies",
                         "intents") and v}
        if not busy:
            return
        assert time.monotonic() < deadline, f"device still holds {busy}"
        await asyncio.sleep(0.02)


def assert_no_leak(before: dict, after: dict, what: str = "") -> None:
    """Device counts back to exactly their values; fds (net of bounded caches) not above."""
    keys = [k for k in before if k not in ("fds", "fds_net")]
    diff = {k: (before[k], after.get(k)) for k in keys if before[k] != after.get(k)}
    if after.get("fds_net", 0) > before.get("fds_net", 0):
        diff["fds_net"] = (before["fds_net"], after["fds_net"])
    assert not diff, f"leak {what}: {diff} (before={before}, after={after})"


async def settle(device, before: dict, timeout: float = 3.0) -> dict:
    """Wait (bounded) until the snapshot returns to ``before``; return the last one."""
    deadline = time.monotonic() + timeout
    while True:
        now = snapshot(device)
        if (all(now.get(k) == v for k, v in before.items() if k not in ("fds", "fds_net"))
                and now["fds_net"] <= before["fds_net"]):
            return now
        if time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------ the hostile peer process

class Hostile:
    """hostile_peer.py in its own process (its own device endpoint), driven by JSON lines."""

    def __init__(self, env: dict | None = None, argv: list | None = None) -> None:
        self.proc = subprocess.Popen(argv or [PYTHON, HOSTILE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env or child_env(), cwd=ROOT)
        self.pid = self.proc.pid
        self._buf = b""
        self.hello = self.read_line(30.0)
        assert self.hello.get("ready"), self.hello

    def read_line(self, timeout: float) -> dict:
        """The next JSON line (our own buffer: a select() on a buffered file object would miss
        lines already read into Python's buffer)."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"peer process {self.pid} silent for {timeout} s")
            sel = selectors.DefaultSelector()
            sel.register(fd, selectors.EVENT_READ)
            try:
                ready = sel.select(left)
            finally:
                sel.close()
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise EOFError(f"peer process {self.pid} exited rc={self.proc.poll()}")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def send(self, cmd: dict) -> None:
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    async def run(self, cmd: dict, on_event=None, timeout: float = 30.0) -> dict:
        """Send a command; call ``on_event(event)`` for each event line; return the final line."""
        loop = asyncio.get_running_loop()
        self.send(cmd)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"hostile command {cmd} did not finish in {timeout} s"
            line = await loop.run_in_executor(None, self.read_line, left)
            if line.get("done"):
                return line
            if on_event is not None:
                res = on_event(line)
                if asyncio.iscoroutine(res):
                    await res

    async def event(self, timeout: float = 10.0) -> dict:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.read_line, timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "exit"})
                self.proc.wait(5)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


# ------------------------------------------------------------------ the victim

class EchoProto(asyncio.Protocol):
    """Server-side application of the victim: echoes, checksums, records how the connection ended."""

    registry: dict = {}

    def __init__(self, echo: bool = True) -> None:
        self.echo = echo
        self.transport = None
        self.info = None
        self.crc = 0
        self.n = 0
        self.eof = False
        self.lost = None          # None while open; the exception, or "clean"
        self.lost_at = None
        self.made_at = None
        self.done = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.info = transport.get_extra_info("smcish")
        self.made_at = time.monotonic()
        self.done = asyncio.get_running_loop().create_future()
        peer = transport.get_extra_info("peername")
        EchoProto.registry[peer[1]] = self

    def data_received(self, data) -> None:
        self.crc = zlib.crc32(data, self.crc)
        self.n += len(data)
        if self.echo:
            self.transport.write(data)

    def eof_received(self):
        self.eof = True
        return False

    def connection_lost(self, exc) -> None:
        self.lost = exc if exc is not None else "clean"
        self.lost_at = time.monotonic()
        if not self.done.done():
            self.done.set_result(self.lost)


class Healthy:
    """An ordinary smcish connection in the victim process, pinged all along (it must not notice
    anything). Each ping: random bytes, echoed, compared."""

    def __init__(self, port: int, **kw) -> None:
        self.port = port
        self.kw = kw
        self.pings = 0
        self.bytes = 0
        self.max_latency = 0.0
        self.error = None
        self._task = None
        self._stop = False

    async def start(self) -> None:
        self.reader, self.writer = await smcish.open_connection(HOST, self.port, **self.kw)
        self.mode = self.writer.get_extra_info("smcish").mode
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        rng = random.Random(self.port)
        last = time.monotonic()
        try:
            while not self._stop:
                payload = rng.randbytes(rng.randrange(1, 8192))
                self.writer.write(payload)
                got = await asyncio.wait_for(self.reader.readexactly(len(payload)), 5.0)
                if got != payload:
                    raise AssertionError("healthy connection: echo differs")
                # time since the previous ping completed: catches a frozen loop between pings too
                now = time.monotonic()
                self.max_latency = max(self.max_latency, now - last)
                last = now
                self.pings += 1
                self.bytes += len(payload)
                await asyncio.sleep(0.002)
        except Exception as exc:  # noqa: BLE001 - reported by check()
            self.error = exc

    async def check(self, min_pings: int = 1) -> None:
        before = self.pings
        deadline = time.monotonic() + 5.0
        while self.pings < before + min_pings and self.error is None:
            assert time.monotonic() < deadline, "healthy connection stopped answering"
            await asyncio.sleep(0.01)
        assert self.error is None, f"healthy connection failed: {self.error!r}"

    async def stop(self) -> None:
        self._stop = True
        try:
            if self._task is not None:
                await asyncio.wait_for(self._task, 10.0)
        finally:
            self.writer.close()
            try:
                await asyncio.wait_for(self.writer.wait_closed(), 5.0)
            except ConnectionError:
                pass
        assert self.error is None, f"healthy connection failed: {self.error!r}"


class Victim:
    """An smcish echo server plus a healthy connection to it, in this process's running loop."""

    def __init__(self, **kw) -> None:
        self.kw = dict(ring_size=16384, handshake_timeout=0.5)
        self.kw.update(kw)

    async def start(self) -> "Victim":
        EchoProto.registry = {}
        self.server = await smcish.create_server(EchoProto, HOST, 0, **self.kw)
        self.port = self.server.sockets[0].getsockname()[1]
        self.device = ism_backend.get_device(self.kw.get("device"))
        self.healthy = Healthy(self.port, **{k: v for k, v in self.kw.items()
                                             if k in ("ring_size", "device")})
        await self.healthy.start()
        assert self.healthy.mode == "ism"
        await asyncio.sleep(0.05)
        return self

    def conn(self, port: int):
        return EchoProto.registry.get(port)

    async def stop(self) -> None:
        """Close everything, then check this process holds no region at all any more."""
        try:
            await self.healthy.stop()
        finally:
            self.server.close()
            for proto in list(EchoProto.registry.values()):
                if proto.transport is not None and proto.lost is None:
                    proto.transport.abort()
            await self.server.wait_closed()
        await assert_device_idle(self.device)


def run_loop(coro, loop_kind: str = "asyncio", timeout: float = 120.0):
    """Run a coroutine on a fresh loop; unhandled loop exceptions are collected and returned
    (hostile cases legitimately produce some: ring corruption is reported through the handler)."""
    if loop_kind == "uvloop":
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    errors: list = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
    try:
        return loop.run_until_complete(asyncio.wait_for(coro, timeout)), errors
    finally:
        try:
            loop.run_until_complete(asyncio.sleep(0.01))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            loop.close()


def pytest_collection_modifyitems(config, items):
    """@pytest.mark.slow tests of this directory run only when asked: ``-m slow`` or
    SMCISH_SLOW=1 (the default run keeps their bounded versions)."""
    if os.environ.get("SMCISH_SLOW") == "1" or "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or SMCISH_SLOW=1")
    for item in items:
        if "slow" in item.keywords and str(item.fspath).startswith(HERE):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def hostile():
    peer = Hostile()
    yield peer
    peer.close()


def raise_nofile(target: int = 65536) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, target)) if hard != resource.RLIM_INFINITY else max(soft, target)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# ------------------------------------------------------------------ child processes running smcish

# A deterministic byte stream (period 1,000,003, a prime, so misplaced bytes show) for checksums.
PATTERN_SEED = 1234
PATTERN_PERIOD = 1_000_003

CHILD_COMMON = r'''
import asyncio, json, os, random, resource, signal, sys, time, zlib
import ism_backend, smcish

CFG = json.loads(sys.argv[1])
PERIOD = %(period)d
PATTERN = random.Random(%(seed)d).randbytes(PERIOD)
PATTERN2 = PATTERN + PATTERN

def pattern_at(offset, n):
    out = bytearray()
    while n:
        start = offset %% PERIOD
        take = min(n, PERIOD)
        out += PATTERN2[start:start + take]
        offset += take
        n -= take
    return bytes(out)

def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()

if CFG.get("nofile"):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (CFG["nofile"], hard))
elif CFG.get("raise_nofile"):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, CFG["raise_nofile"]), hard))

def new_loop():
    if CFG.get("loop") == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()

KW = {k: CFG[k] for k in ("ring_size", "handshake_timeout", "device", "poll_us") if k in CFG}

def fds():
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:          # EMFILE: listing needs an fd
        return -1

def rss():
    import ctypes, gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

def served(dev):
    path = getattr(dev, "_sock_path", None)
    if not path:
        return 0
    inodes = set()
    with open("/proc/net/unix") as fh:
        next(fh)
        for line in fh:
            parts = line.split()
            if len(parts) >= 8 and parts[7] == path:
                inodes.add(parts[6])
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue
        if link.startswith("socket:[") and link[8:-1] in inodes:
            n += 1
    return max(0, n - 1)

def status(extra=None):
    dev = ism_backend.get_device(CFG.get("device"))
    st = dev.status()
    if st.get("kind") == "daemon":
        c = st.get("client", {})
        net = fds() - c.get("pooled_fds", 0)
        me = next((x for x in st.get("clients", []) if x["pid"] == os.getpid()), {})
        dst = {"regions": me.get("regions", 0) - c.get("pooled", 0),
               "attached": me.get("attachments", 0)}
    else:
        net = fds() - st["pooled_fds"] - st["peers"] - served(dev)
        dst = {k: st[k] for k in ("regions", "attached", "draining", "served_attachments",
                                  "zombies", "intents", "pooled", "peers")}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {"fds": fds(), "fds_net": net, "rss": rss(), "device": dst,
           "stats": smcish.stats(), "cpu": usage.ru_utime + usage.ru_stime}
    out.update(extra or {})
    return out

def stdin_commands(loop, handler):
    buf = bytearray()
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    def ready():
        try:
            chunk = os.read(fd, 4096)
        except BlockingIOError:
            return
        if not chunk:
            loop.remove_reader(fd)
            handler("exit")
            return
        buf.extend(chunk)
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            if line.strip():
                handler(line.decode().strip())
    loop.add_reader(fd, ready)
''' % {"period": PATTERN_PERIOD, "seed": PATTERN_SEED}

SERVER_CHILD = CHILD_COMMON + r'''
MODE = CFG.get("mode", "echo")
conns = {}

class Server(asyncio.Protocol):
    def connection_made(self, t):
        self.t = t
        self.info = t.get_extra_info("smcish")
        self.crc = 0
        self.n = 0
        self.sent = 0
        self.ok = True
        self.port = t.get_extra_info("peername")[1]
        self.paused = asyncio.Event()
        self.paused.set()
        conns[self.port] = self
        if MODE == "stall":
            t.pause_reading()
        elif MODE in ("stream", "close_after"):
            asyncio.ensure_future(self.stream())
    async def stream(self):
        chunk = 65536
        limit = CFG.get("close_after")
        while not self.t.is_closing():
            n = chunk if limit is None else min(chunk, limit - self.sent)
            if n <= 0:
                self.t.close()
                emit({"event": "closed", "port": self.port, "sent": self.sent})
                return
            self.t.write(pattern_at(self.sent, n))
            self.sent += n
            published = self.sent - self.t.get_write_buffer_size()
            emit({"event": "published", "port": self.port, "n": published})
            await self.paused.wait()
            await asyncio.sleep(0)
    def pause_writing(self):
        self.paused.clear()
    def resume_writing(self):
        self.paused.set()
    def data_received(self, data):
        if MODE == "check":
            if data != pattern_at(self.n, len(data)):
                self.ok = False
        self.crc = zlib.crc32(data, self.crc)
        self.n += len(data)
        if MODE == "echo":
            self.t.write(data)
            if self.t.get_write_buffer_size() > (1 << 20):
                self.t.pause_reading()
                asyncio.get_running_loop().call_later(0.01, self.t.resume_reading)
    def eof_received(self):
        return False
    def connection_lost(self, exc):
        conns.pop(self.port, None)
        if MODE == "check":
            emit({"event": "lost", "port": self.port, "n": self.n, "ok": self.ok,
                  "exc": repr(exc)})

async def main():
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    server = await smcish.create_server(Server, "127.0.0.1", CFG.get("port", 0),
                                        backlog=CFG.get("backlog", 1024), **KW)
    def command(cmd):
        if cmd == "exit":
            if not done.done():
                done.set_result(None)
        elif cmd == "status":
            emit(status({"live": len(conns), "modes": [c.info.mode for c in conns.values()]}))
        elif cmd == "close_all":
            for c in list(conns.values()):
                c.t.close()
            emit({"event": "closed_all"})
        elif cmd == "resume":
            for c in list(conns.values()):
                c.t.resume_reading()
            emit({"event": "resumed"})
        elif cmd == "tracemalloc":          # diagnostics (run with PYTHONTRACEMALLOC=1)
            import gc, tracemalloc
            gc.collect()
            snap = tracemalloc.take_snapshot()
            prev = getattr(command, "prev", None)
            command.prev = snap
            top = snap.compare_to(prev, "lineno")[:12] if prev else snap.statistics("lineno")[:12]
            emit({"event": "tracemalloc", "top": [str(s) for s in top]})
    stdin_commands(loop, command)
    emit({"port": server.sockets[0].getsockname()[1], "pid": os.getpid()})
    await done
    server.close()

loop = new_loop()
loop.run_until_complete(main())
'''

CLIENT_CHILD = CHILD_COMMON + r'''
MODE = CFG["mode"]

async def main():
    loop = asyncio.get_running_loop()
    reader, writer = await smcish.open_connection("127.0.0.1", CFG["port"], **KW)
    info = writer.get_extra_info("smcish")
    emit({"event": "connected", "mode": info.mode, "reason": getattr(info.reason, "name", None),
          "port": writer.get_extra_info("sockname")[1]})
    if MODE in ("stream", "close_after", "close_pending"):
        sent = 0
        limit = CFG.get("close_after")
        while True:
            n = 65536 if limit is None else min(65536, limit - sent)
            if n <= 0:
                break
            writer.write(pattern_at(sent, n))
            sent += n
            if MODE != "close_pending":
                await writer.drain()
            published = sent - writer.transport.get_write_buffer_size()
            emit({"event": "published", "n": published})
        emit({"event": "closing", "sent": sent,
              "published": sent - writer.transport.get_write_buffer_size()})
        writer.close()
        if MODE == "close_pending":
            emit({"event": "close_called"})
        try:
            await writer.wait_closed()
        except Exception as exc:
            emit({"event": "close_error", "exc": repr(exc)})
        emit({"event": "closed", "sent": sent})
        await asyncio.sleep(3600)
    elif MODE == "many":
        # open connections one by one (keeping them), echo on each; report what each got
        writer.close()                     # (the first connection above is not part of it)
        await writer.wait_closed()
        await asyncio.sleep(0.1)
        fds0 = fds()
        out = []
        held = []
        for i in range(CFG["count"]):
            try:
                r, w = await smcish.open_connection("127.0.0.1", CFG["port"], **KW)
            except Exception as exc:
                import traceback
                tb = traceback.format_exc().splitlines()
                out.append({"error": repr(exc), "fds": fds(),
                            "where": [l.strip() for l in tb if l.strip().startswith("File")][-4:]})
                continue
            info = w.get_extra_info("smcish")
            payload = os.urandom(3000)
            w.write(payload)
            detail = None
            try:
                got = await asyncio.wait_for(r.readexactly(3000), 10)
                ok = got == payload
                if not ok:
                    detail = {"got": got[:48].hex(), "sent": payload[:48].hex(),
                              "same_tail": got[-2900:] == payload[-2900:],
                              "extra": len(r._buffer)}
            except Exception as exc:
                ok = repr(exc)
            out.append({"mode": info.mode, "reason": getattr(info.reason, "name", None),
                        "peer_declined": info.peer_declined, "echo": ok, "fds": fds(),
                        "port": w.get_extra_info("sockname")[1], "detail": detail})
            held.append(w)
        for w in held:
            w.close()
        for w in held:
            try:
                await w.wait_closed()
            except Exception:
                pass
        for _ in range(50):            # let the closes finish (bounded)
            await asyncio.sleep(0.02)
            st = status()
            if not st["device"].get("regions") and not st["device"].get("attached"):
                break
        emit({"event": "many", "results": out, "fds0": fds0, "fds_end": fds(),
              "status": status()})
        await asyncio.sleep(3600)
    elif MODE == "sink":
        n = 0
        ok = True
        while True:
            data = await reader.read(1 << 20)
            if not data:
                break
            if data != pattern_at(n, len(data)):
                ok = False
            n += len(data)
            emit({"event": "received", "n": n, "ok": ok})
        await asyncio.sleep(3600)

async def runner():
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    stdin_commands(loop, lambda cmd: cmd == "exit" and not done.done() and done.set_result(None))
    task = asyncio.ensure_future(main())
    await asyncio.wait([task, done], return_when=asyncio.FIRST_COMPLETED)
    task.cancel()
    if task.done() and not task.cancelled() and task.exception():
        raise task.exception()

loop = new_loop()
loop.run_until_complete(runner())
'''


class Child:
    """A child process running SERVER_CHILD or CLIENT_CHILD, JSON lines both ways."""

    def __init__(self, script: str, cfg: dict, env: dict | None = None,
                 preexec_fn=None, quiet: bool = False) -> None:
        self.proc = subprocess.Popen([PYTHON, "-c", script, json.dumps(cfg)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL if quiet else None,
                                     env=env or child_env(), cwd=ROOT, preexec_fn=preexec_fn)
        self.pid = self.proc.pid
        self._buf = b""
        self.read_line = Hostile.read_line.__get__(self)
        self.events: list = []

    def send(self, line: str) -> None:
        self.proc.stdin.write((line + "\n").encode())
        self.proc.stdin.flush()

    def wait_for(self, pred, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            line = self.read_line(max(0.01, deadline - time.monotonic()))
            self.events.append(line)
            if pred(line):
                return line

    def status(self) -> dict:
        self.send("status")
        return self.wait_for(lambda ev: "fds" in ev)

    async def astatus(self) -> dict:
        return await asyncio.get_running_loop().run_in_executor(None, self.status)

    async def await_line(self, pred, timeout: float = 10.0) -> dict:
        return await asyncio.get_running_loop().run_in_executor(None, self.wait_for, pred,
                                                                timeout)

    def kill(self) -> float:
        """SIGKILL; returns the monotonic time of the kill."""
        t = time.monotonic()
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(10)
        return t

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("exit")
                self.proc.wait(5)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


def start_server_child(quiet: bool = False, **cfg) -> tuple[Child, int]:
    child = Child(SERVER_CHILD, cfg, quiet=quiet)
    hello = child.wait_for(lambda ev: "port" in ev and "pid" in ev, 30)
    return child, hello["port"]


def pattern_at(offset: int, n: int) -> bytes:
    out = bytearray()
    while n:
        start = offset % PATTERN_PERIOD
        take = min(n, PATTERN_PERIOD)
        out += _PATTERN2[start:start + take]
        offset += take
        n -= take
    return bytes(out)


_PATTERN2 = random.Random(PATTERN_SEED).randbytes(PATTERN_PERIOD) * 2
