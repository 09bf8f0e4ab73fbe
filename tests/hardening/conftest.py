"""Helpers for the hardening suite: the hostile peer process, a victim process-in-a-loop, leak
snapshots, small child-process runners, and ``Agent``: a real smcish (or plain asyncio) process
driven by JSON commands, with hooks that stop a set-up at an exact point. See docs/reliability.md.

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


# What a process holds on its device (embedded device status() keys): equal before and after.
DEVICE_COUNTS = ("regions", "attached", "draining", "served_attachments", "zombies")


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
    """Control connections peers opened to our embedded endpoint (a peer caches up to two
    per endpoint it talks to, attach and peer ops, for up to 64 endpoints): unix sockets of ours bound to the endpoint path, minus the
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
        out = {k: st.get(k, 0) for k in DEVICE_COUNTS}
    served = served_connections(device)
    fds = fd_count()
    out["fds"] = fds
    out["fds_net"] = fds - pooled_fds - peers - served
    return out


def close_idle_groups() -> int:
    """Close this loop's link groups that carry no connection (v2 keeps an idle client group for
    60 s, and its server side as long as the client keeps it): their regions and attachments are
    then given back. Returns how many were closed. Call it on the loop that owns them."""
    from smcish import linkgroup

    loop = asyncio.get_running_loop()
    closed = 0
    for hub in linkgroup.live_hubs():
        if hub.loop is not loop:
            continue
        for group in list(hub.client_groups.values()) + list(hub.server_groups.values()):
            if not group.conns and not group.dying:
                group.close()
                closed += 1
    return closed


async def assert_device_idle(device, timeout: float = 3.0) -> None:
    """Once every connection of a test is closed (and this loop's idle link groups with them),
    this process holds no region at all."""
    deadline = time.monotonic() + timeout
    while True:
        close_idle_groups()
        st = snapshot(device)
        busy = {k: v for k, v in st.items() if k in DEVICE_COUNTS and v}
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
        peer_conns = 0
    else:
        # the device's cached control connections (ours to peers, peers' to us): bounded by
        # the peers, opened when first needed (a peer-op one at a group's first growth)
        peer_conns = st["peers"] + served(dev)
        net = fds() - st["pooled_fds"] - peer_conns
        dst = {k: st.get(k, 0) for k in ("regions", "attached", "draining",
                                         "served_attachments", "zombies", "pooled", "peers",
                                         "peer_channels")}
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {"fds": fds(), "fds_net": net, "peer_conns": peer_conns, "rss": rss(), "device": dst,
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

    def wait_conns(self, n: int, timeout: float = 10.0) -> dict:
        """Wait (bounded) until this agent's application has ``n`` open connections (a server
        may accept after the client's open returned); returns the last status."""
        st = wait_until(lambda: self.call("status", trim=False), lambda st: st["conns_open"] >= n,
                        timeout)
        assert st["conns_open"] >= n, f"{self.role} has {st['conns_open']} connections, not {n}"
        return st

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

# ------------------------------------------------------------------ the agent: an smcish process

AGENT = CHILD_COMMON + r'''
import collections, faulthandler, gc, socket, traceback
faulthandler.register(signal.SIGUSR1, all_threads=True)     # `kill -USR1 <pid>`: stacks on stderr
from smcish import clc, linkgroup

ROLE = CFG.get("role", "server")
PLAIN = bool(CFG.get("plain"))          # plain asyncio (same harness, no smcish): the baseline
KW = dict(CFG.get("kw", {}))
CONNS = {}                              # key (the client's port) -> Conn, until "forget"
BEHAVIOR = {"echo": ROLE == "server", "paused": False, "verify": False, "keep_closed": True}
HELD = []                               # final words the "delay_final" hook holds back
ARMED = collections.Counter()           # one-shot hooks: name -> how many more times
FREEZE_S = {}                           # freeze hooks: name -> seconds (default: until killed)
SERVERS = []


def reply(rid, **kw):
    kw["id"] = rid
    emit(kw)


def seed_of(role, port):
    """Where the pattern a side sends on connection `port` starts (its own stream per side)."""
    return (port * 7919 + (0 if role == "client" else 500009)) % PERIOD


def take_hook(name):
    if ARMED[name] > 0:
        ARMED[name] -= 1
        return True
    return False


def reason_name(info):
    return getattr(getattr(info, "reason", None), "name", None)


class Conn(asyncio.Protocol):
    def __init__(self, role):
        self.role = role
        self.peer_role = "server" if role == "client" else "client"
        self.t = None
        self.rx = 0
        self.rx_crc = 0
        self.tx_crc = 0
        self.rx_ok = True
        self.verify = BEHAVIOR["verify"]
        self.echo = BEHAVIOR["echo"]
        self.tx = 0
        self.eof = False
        self.lost = None
        self.lost_type = None
        self.lost_at = None
        self.made_at = time.monotonic()
        self.win = None                 # [target, got, crc, future] of a request
        self.echo_paused = False
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, t):
        self.t = t
        info = t.get_extra_info("smcish")
        self.mode = getattr(info, "mode", "plain")
        self.reason = reason_name(info)
        name = "peername" if self.role == "server" else "sockname"
        self.port = t.get_extra_info(name)[1]
        self.group = None
        g = getattr(t, "_group", None)
        if g is not None:
            self.group = g.id.hex()
        CONNS[self.port] = self
        if BEHAVIOR["paused"]:
            t.pause_reading()

    def data_received(self, data):
        if self.verify and self.rx_ok:
            if data != pattern_at(seed_of(self.peer_role, self.port) + self.rx, len(data)):
                self.rx_ok = False
        self.rx += len(data)
        self.rx_crc = zlib.crc32(data, self.rx_crc)
        win = self.win
        if win is not None:
            win[1] += len(data)
            win[2] = zlib.crc32(data, win[2])
            if win[1] >= win[0] and not win[3].done():
                win[3].set_result(None)
        if self.echo:
            self.send(data)
            if not self.echo_paused and self.t.get_write_buffer_size() > (1 << 20):
                self.echo_paused = True
                self.t.pause_reading()

    def send(self, data):
        self.t.write(data)
        self.tx += len(data)
        self.tx_crc = zlib.crc32(data, self.tx_crc)

    def pause_writing(self):
        pass

    def resume_writing(self):
        if self.echo_paused:
            self.echo_paused = False
            self.t.resume_reading()

    def eof_received(self):
        self.eof = True
        return False

    def connection_lost(self, exc):
        self.lost = "clean" if exc is None else repr(exc)
        self.lost_type = None if exc is None else type(exc).__name__
        self.lost_reset = isinstance(exc, ConnectionResetError)
        self.lost_at = time.monotonic()
        win = self.win
        if win is not None and not win[3].done():
            win[3].set_exception(exc or ConnectionResetError("closed"))
        if not self.done.done():
            self.done.set_result(None)
        if not BEHAVIOR["keep_closed"] and CONNS.get(getattr(self, "port", None)) is self:
            del CONNS[self.port]

    async def request(self, payload, timeout):
        fut = asyncio.get_running_loop().create_future()
        self.win = [len(payload), 0, 0, fut]
        self.send(payload)
        try:
            await asyncio.wait_for(fut, timeout)
        finally:
            win, self.win = self.win, None
        return win[1] == len(payload) and win[2] == zlib.crc32(payload)

    def row(self):
        return {"port": self.port, "mode": self.mode, "reason": self.reason, "rx": self.rx,
                "rx_crc": self.rx_crc, "tx_crc": self.tx_crc,
                "ok": self.rx_ok, "tx": self.tx, "eof": self.eof, "lost": self.lost,
                "lost_type": self.lost_type, "lost_reset": getattr(self, "lost_reset", False),
                "lost_at": self.lost_at, "made_at": self.made_at, "group": self.group,
                "pending": None if self.t is None or self.lost else
                self.t.get_write_buffer_size(), "ring": self.ring_size()}

    def ring_size(self):
        """Capacity of our current tx ring (ISM, open), else None."""
        ring = getattr(self.t, "_ring", None)
        try:
            return None if ring is None or ring.closed else ring.tx_capacity
        except Exception:  # noqa
            return None


# ---- hooks that stop a set-up at an exact point (armed one-shot with the "arm" command)
#
# They sit where the set-up records of docs/design.md 3.3 reach shared memory (smcish.ring.Group:
# post_claim, publish_setup, set_phase, notify) and where the server looks for a claim at accept
# (linkgroup.Hub.find_claim), not in protocol.py's private methods.

from smcish import ring as _sring

_orig = {name: getattr(_sring.Group, name) for name in ("post_claim", "publish_setup",
                                                        "set_phase", "notify")}
_orig_find_claim = linkgroup.Hub.find_claim
_after_notify = {}          # id(group), slot -> hook to run after the next notify of that slot


def _freeze(hook, **info):
    emit(dict(event="hook", hook=hook, **info))
    time.sleep(FREEZE_S.get(hook, 3600))
    emit({"event": "thawed", "hook": hook})


def _post_claim(self, port, slot):
    """client: the claim record is published and in the claim table; the socket is about to
    connect. freeze_after_claim: freeze here (the server never sees the connection)."""
    ok = _orig["post_claim"](self, port, slot)
    if ok and take_hook("freeze_after_claim"):
        _freeze("freeze_after_claim", slot=slot, port=port)
    return ok


_slot_port = {}             # id(group), slot -> the client port of its connection


def _publish_setup(self, slot, setup):
    _orig["publish_setup"](self, slot, setup)
    _slot_port[(id(self), slot)] = setup.cport
    if ROLE == "server" and setup.phase == clc.PHASE_ACCEPTED and ARMED["freeze_after_accept"]:
        _after_notify[(id(self), slot)] = ("freeze_after_accept", setup.cport)


def _set_phase(self, slot, gen, phase, reason=0):
    if ROLE == "client" and phase == clc.PHASE_FINAL_ISM:
        port = _slot_port.get((id(self), slot))
        if take_hook("freeze_before_final"):
            _freeze("freeze_before_final", slot=slot, port=port)
        elif take_hook("delay_final"):
            # the final word is held back (the client itself goes on as established)
            HELD.append((self, slot, gen, phase, reason))
            emit({"event": "hook", "hook": "delay_final", "slot": slot, "port": port})
            return
        elif take_hook("freeze_after_final"):
            _after_notify[(id(self), slot)] = ("freeze_after_final", None)
    _orig["set_phase"](self, slot, gen, phase, reason)


def _notify(self, slot):
    _orig["notify"](self, slot)
    hook = _after_notify.pop((id(self), slot), None)
    if hook is not None and (hook[0] == "freeze_after_final" or take_hook(hook[0])):
        _freeze(hook[0], slot=slot, port=_slot_port.get((id(self), slot)))


def _find_claim(self, peer_addr, local_addr):
    """server, at accept: the TCP connection is accepted, its claim not looked at yet."""
    if take_hook("freeze_at_accept"):
        _freeze("freeze_at_accept", port=peer_addr[1])
    return _orig_find_claim(self, peer_addr, local_addr)


_orig_serve_extent_add = linkgroup.LinkGroup.serve_extent_add


def _serve_extent_add(self, fields):
    """endpoint thread: the peer added an extent. delay_extent_add_reply: install it, then
    answer late (as when our loop took most of the hand-over bound to run the install)."""
    out = _orig_serve_extent_add(self, fields)
    if take_hook("delay_extent_add_reply"):
        emit({"event": "hook", "hook": "delay_extent_add_reply", "index": fields["index"]})
        time.sleep(FREEZE_S.get("delay_extent_add_reply", 2.5))
    return out


linkgroup.LinkGroup.serve_extent_add = _serve_extent_add
_sring.Group.post_claim = _post_claim
_sring.Group.publish_setup = _publish_setup
_sring.Group.set_phase = _set_phase
_sring.Group.notify = _notify
linkgroup.Hub.find_claim = _find_claim


# ---- what discovery saw (why a connection was not claimed): counted, reported by "status"

ORACLE = collections.Counter()
from smcish import discovery as _discovery
_orig_bound_socket = _discovery.bound_socket


def _bound_socket(family, host, port, local_addr, remote_ok=False):
    try:
        sock, hit = _orig_bound_socket(family, host, port, local_addr, remote_ok)
    except OSError as exc:
        ORACLE["bind_error_%d" % (exc.errno or 0)] += 1
        raise
    ORACLE["no_listener" if hit is None else "state_%d" % hit.state] += 1
    if hit is None:
        ORACLE["no_listener_bound" if sock.getsockname()[1] else "no_listener_unbound"] += 1
    return sock, hit


_discovery.bound_socket = _bound_socket
from ism_backend import sockets as _isockets
_orig_lookup = _isockets.Diag.lookup


def _lookup(self, family, local, remote):
    hit = _orig_lookup(self, family, local, remote)
    ORACLE["lookup_none" if hit is None else "lookup_state_%d" % hit.state] += 1
    return hit


_isockets.Diag.lookup = _lookup




# ---- measurements

def _socket_kinds():
    kinds = {}
    for name in ("tcp", "tcp6", "udp", "udp6", "unix", "netlink"):
        try:
            with open("/proc/net/" + name) as fh:
                lines = fh.readlines()[1:]
        except OSError:
            continue
        col = {"unix": 6}.get(name, 9)
        for line in lines:
            parts = line.split()
            if len(parts) > col:
                kinds[parts[col]] = name.rstrip("6")
    return kinds


def fd_kinds():
    kinds = collections.Counter()
    socks = None
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink("/proc/self/fd/" + fd)
        except OSError:
            continue
        if link.startswith("socket:"):
            if socks is None:
                socks = _socket_kinds()
            kinds["socket_" + socks.get(link[8:-1], "other")] += 1
        elif link.startswith("/memfd:"):
            kinds["memfd"] += 1
        elif "eventfd" in link:
            kinds["eventfd"] += 1
        elif link == "/dev/null":
            kinds["devnull"] += 1
        elif link.startswith("pipe:"):
            kinds["pipe"] += 1
        elif "eventpoll" in link:
            kinds["epoll"] += 1
        else:
            kinds["other"] += 1
    return dict(kinds)


def rss_parts():
    """RssAnon (the process's own memory: what a leak grows) and RssShmem (pages of shared
    memory it maps, which come and go with a group's extents), KiB; read after rss()'s trim."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(("RssAnon:", "RssShmem:", "RssFile:")):
                key = line.split(":")[0]
                out[{"RssAnon": "rss_anon", "RssShmem": "rss_shmem", "RssFile": "rss_file"}[key]] \
                    = int(line.split()[1])
    return out


def smaps_memfd():
    """Shared memfd mappings of this process: [own (rw) KiB mapped, resident, peer (ro) ...]."""
    out = {"rw_size": 0, "rw_rss": 0, "ro_size": 0, "ro_rss": 0, "maps": 0}
    cur = None
    try:
        with open("/proc/self/smaps") as fh:
            for line in fh:
                first = line.split(None, 1)[0]
                if "-" in first and not first.endswith(":"):
                    parts = line.split()
                    path = parts[5] if len(parts) > 5 else ""
                    if path.startswith("/memfd:"):
                        cur = "rw" if parts[1].startswith("rw") else "ro"
                        out["maps"] += 1
                    else:
                        cur = None
                elif cur is not None and first in ("Size:", "Rss:"):
                    out[cur + ("_size" if first == "Size:" else "_rss")] += int(line.split()[1])
    except OSError:
        pass
    return out


def groups_info():
    """Every link group of this process not yet destroyed (dying ones included)."""
    hubs = linkgroup.live_hubs()
    groups = []
    with linkgroup._reg_lock:
        live = list(linkgroup._groups.values())
    for g in live:
        if g.destroyed:
            continue
        groups.append({"id": g.id.hex(), "role": g.role, "conns": len(g.conns),
                       "my_exts": len(g.my_exts), "peer_exts": len(g.peer_exts),
                       "dying": g.dying, "awaiting": len(g._awaiting),
                       "ext_ids": sorted(g.my_exts), "peer_ext_ids": sorted(g.peer_exts),
                       "peer_removals": sorted(getattr(g, "_peer_removals", ()))})
    return {"hubs": len(hubs), "groups": groups, "link_groups": len(groups),
            "slots": sum(g["conns"] for g in groups),
            "extents": sum(g["my_exts"] for g in groups)}


def agent_status(trim=True):
    st = {"fds": fds(), "rss": rss() if trim else None, "device": {}}
    if not PLAIN:
        try:
            st = status()
        except ism_backend.IsmError as exc:          # no device (ismd gone): no counts
            st["device_error"] = repr(exc)
            st["stats"] = smcish.stats()
    st.update(rss_parts())
    st["fd_kinds"] = fd_kinds()
    if "fds_net" in st:
        # uvloop opens /dev/null the first time it aborts a socket and keeps it for good
        st["fds_net"] -= st["fd_kinds"].get("devnull", 0)
    st["smaps"] = smaps_memfd()
    st["conns_open"] = sum(1 for c in CONNS.values() if c.lost is None)
    st["oracle"] = dict(ORACLE)
    st["conns"] = len(CONNS)
    if not PLAIN:
        st["linkgroups"] = groups_info()
        from smcish import loop as _sloop
        st["preclaims"] = len(_sloop._preclaims)
        try:
            st["raw_device"] = ism_backend.get_device(CFG.get("device")).status()
        except ism_backend.IsmError:
            st["raw_device"] = None
    return st


# ---- commands

def _connector(loop, via="create"):
    """How a client connects: smcish.create_connection (an optimistic claim), or via="sock":
    the application's own socket, connected with the (smcish-patched, CFG install) loop's
    sock_connect then handed over with create_connection(sock=) (a classic CLAIMED claim)."""
    if PLAIN:
        return lambda f, h, p: loop.create_connection(f, h, p)
    if via == "sock":
        async def connect(f, h, p):
            sock = socket.socket()
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (h, p))
            except BaseException:
                sock.close()
                raise
            return await loop.create_connection(f, sock=sock)
        return connect
    return lambda f, h, p: smcish.create_connection(f, h, p, **KW)


async def cmd_listen(rid, port=0, backlog=1024):
    loop = asyncio.get_running_loop()
    if PLAIN:
        server = await loop.create_server(lambda: Conn("server"), "127.0.0.1", port,
                                          backlog=backlog)
    else:
        server = await smcish.create_server(lambda: Conn("server"), "127.0.0.1", port,
                                            backlog=backlog, **KW)
    SERVERS.append(server)
    reply(rid, port=server.sockets[0].getsockname()[1])


async def cmd_connect(rid, port, count=1, concurrency=0, timeout=30.0, detail=True,
                      via="create"):
    loop = asyncio.get_running_loop()
    connect = _connector(loop, via)
    sem = asyncio.Semaphore(concurrency or count)
    results = [None] * count

    async def one(i):
        async with sem:
            t0 = time.monotonic()
            try:
                t, p = await asyncio.wait_for(connect(lambda: Conn("client"), "127.0.0.1", port),
                                              timeout)
            except BaseException as exc:  # noqa
                where = [f"{fr.filename.rsplit('/', 1)[-1]}:{fr.lineno} {fr.name}"
                         for fr in traceback.extract_tb(exc.__traceback__)][-3:]
                results[i] = {"error": repr(exc), "t": time.monotonic() - t0, "where": where}
                return
            results[i] = {"port": p.port, "mode": p.mode, "reason": p.reason,
                          "t": time.monotonic() - t0, "group": p.group}

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(count)))
    summary = collections.Counter()
    for r in results:
        summary["error" if "error" in r else (r["mode"] + ("/" + r["reason"] if r["reason"]
                                                           else ""))] += 1
    reply(rid, summary=dict(summary), elapsed=time.monotonic() - t0,
          max_t=max((r["t"] for r in results), default=0),
          results=results if detail else [r for r in results if "error" in r][:20],
          groups=sorted({r.get("group") for r in results if r.get("group")}))


async def cmd_behave(rid, **kw):
    BEHAVIOR.update(kw)
    for c in CONNS.values():
        c.echo = BEHAVIOR["echo"]
        c.verify = BEHAVIOR["verify"]
    reply(rid, behavior=BEHAVIOR)


async def cmd_publish(rid, limit=60000, fixed=None):
    """Write this side's pattern on every open connection (size from the port, or fixed)."""
    total = pending = 0
    for c in CONNS.values():
        if c.lost is not None:
            continue
        n = fixed or 1 + (c.port * 2654435761) % limit
        c.send(pattern_at(seed_of(ROLE, c.port) + c.tx, n))
        total += n
        pending += c.t.get_write_buffer_size()
    reply(rid, total=total, pending=pending)


async def cmd_stream(rid, chunk=65536):
    """Stream this side's pattern on every open connection until it ends; report progress."""
    async def run(c):
        while c.lost is None and not c.t.is_closing():
            c.send(pattern_at(seed_of(ROLE, c.port) + c.tx, chunk))
            while c.lost is None and c.t.get_write_buffer_size() > 4 * chunk:
                await asyncio.sleep(0.001)
            emit({"event": "published", "port": c.port,
                  "n": c.tx - (c.t.get_write_buffer_size() if c.lost is None else 0)})
            await asyncio.sleep(0)
    for c in list(CONNS.values()):
        if c.lost is None:
            asyncio.ensure_future(run(c))
    reply(rid, started=True)


async def cmd_send_close(rid, n, until_lost=True, timeout=10.0):
    """Write `n` bytes of this side's pattern on every open connection, then close() it; with
    `until_lost`, wait for connection_lost. Replies with what was pending right after close()."""
    pending = {}
    conns = [c for c in CONNS.values() if c.lost is None]
    for c in conns:
        c.send(pattern_at(seed_of(ROLE, c.port) + c.tx, n))
        c.t.close()
        pending[c.port] = c.t.get_write_buffer_size()
    deadline = time.monotonic() + timeout
    while until_lost and any(c.lost is None for c in conns) and time.monotonic() < deadline:
        await asyncio.sleep(0.005)
    reply(rid, pending=pending, lost={c.port: c.lost for c in conns})


async def cmd_pause(rid):
    BEHAVIOR["paused"] = True
    for c in CONNS.values():
        if c.lost is None:
            c.t.pause_reading()
    reply(rid)


async def cmd_resume(rid):
    BEHAVIOR["paused"] = False
    t = time.monotonic()
    for c in CONNS.values():
        if c.lost is None:
            c.t.resume_reading()
    reply(rid, at=t)


async def cmd_report(rid, wait_lost=0.0):
    deadline = time.monotonic() + wait_lost
    while wait_lost and any(c.lost is None for c in CONNS.values()):
        if time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    reply(rid, conns=[c.row() for c in CONNS.values()])


async def cmd_close_all(rid, timeout=10.0, abort=False):
    for c in list(CONNS.values()):
        if c.lost is None:
            (c.t.abort if abort else c.t.close)()
    deadline = time.monotonic() + timeout
    while any(c.lost is None for c in CONNS.values()) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    reply(rid, open=sum(1 for c in CONNS.values() if c.lost is None))


async def cmd_forget(rid):
    for k in [k for k, c in CONNS.items() if c.lost is not None]:
        del CONNS[k]
    reply(rid, left=len(CONNS))


async def cmd_echo_round(rid, rounds=1, lo=1, hi=65536, dist="uniform", seed=0, timeout=60.0):
    """Client: on every open connection at once, `rounds` random payloads echoed and CRC-checked."""
    out = collections.Counter()

    async def run(c, rng):
        for _ in range(rounds):
            if dist == "mix":           # the sizes that matter, and anything in between
                n = rng.choice((1, 17, 512, 4096, 16384, 40000, rng.randint(lo, hi)))
            elif dist == "log":
                n = min(hi, max(lo, int(2 ** rng.uniform(0, (hi).bit_length()))))
            else:
                n = rng.randint(lo, hi)
            payload = rng.randbytes(n)
            try:
                ok = await c.request(payload, timeout)
            except BaseException as exc:  # noqa
                out["error"] += 1
                emit({"event": "echo_error", "port": c.port, "exc": repr(exc)})
                return
            out["messages"] += 1
            out["bytes"] += n
            if not ok:
                out["mismatch"] += 1

    t0 = time.monotonic()
    conns = [c for c in CONNS.values() if c.lost is None]
    await asyncio.gather(*(run(c, random.Random(seed * 1000003 + c.port)) for c in conns))
    reply(rid, conns=len(conns), elapsed=time.monotonic() - t0, **out)


async def cmd_soak(rid, port, count, inflight=4, size=64, sample_every=500, timeout=30.0):
    """Short connections one after another (`inflight` at a time): connect, one echo, close."""
    loop = asyncio.get_running_loop()
    connect = _connector(loop)
    modes = collections.Counter()
    errors = []
    samples = []
    done = [0]
    payload = os.urandom(size)
    it = iter(range(count))
    t0 = time.monotonic()

    async def worker():
        for i in it:
            try:
                t, c = await asyncio.wait_for(connect(lambda: Conn("client"), "127.0.0.1", port),
                                              timeout)
                modes[c.mode + ("/" + c.reason if c.reason else "")] += 1
                ok = await c.request(payload, timeout)
                if not ok:
                    errors.append("mismatch")
                t.close()
                await asyncio.wait_for(asyncio.shield(c.done), timeout)
                CONNS.pop(c.port, None)
            except BaseException as exc:  # noqa
                errors.append(repr(exc))
            done[0] += 1
            if done[0] % sample_every == 0:
                st = agent_status()
                samples.append({"n": done[0], "t": time.monotonic() - t0, "fds": st["fds"],
                                "fds_net": st.get("fds_net"), "rss": st["rss"],
                                "rss_anon": st["rss_anon"],
                                "slots": st["linkgroups"]["slots"],
                                "groups": st["linkgroups"]["link_groups"],
                                "extents": st["linkgroups"]["extents"],
                                "regions": st["device"].get("regions")})

    await asyncio.gather(*(worker() for _ in range(inflight)))
    reply(rid, modes=dict(modes), errors=errors[:20], n_errors=len(errors), samples=samples,
          elapsed=time.monotonic() - t0)


async def cmd_clients(rid, port, count, size=1024, hold=0.0, timeout=10.0, concurrency=0):
    """`count` clients at once: connect, one echo of `size` bytes, keep it `hold` seconds, close.
    Each result: served (echo intact), mode/reason, connect and total times, or the error."""
    loop = asyncio.get_running_loop()
    connect = _connector(loop)
    sem = asyncio.Semaphore(concurrency or count)
    results = []

    async def one(i):
        async with sem:
            row = {"i": i}
            t0 = time.monotonic()
            try:
                t, c = await asyncio.wait_for(connect(lambda: Conn("client"), "127.0.0.1", port),
                                              timeout)
                row.update(mode=c.mode, reason=c.reason, t_connect=time.monotonic() - t0)
                row["served"] = await c.request(os.urandom(size), timeout)
                row["t"] = time.monotonic() - t0
                await asyncio.sleep(hold)
                t.close()
                CONNS.pop(c.port, None)
            except BaseException as exc:  # noqa
                row.update(error=repr(exc), t=time.monotonic() - t0, served=False,
                           stage="connect" if "mode" not in row else "echo")
            results.append(row)

    await asyncio.gather(*(one(i) for i in range(count)))
    modes = collections.Counter(r.get("mode", "error") + ("/" + r["reason"] if r.get("reason")
                                                          else "") for r in results)
    reply(rid, results=results, modes=dict(modes),
          served=sum(1 for r in results if r["served"] is True))


async def cmd_loops_clients(rid, port, count, size=1024, timeout=10.0, hold=True):
    """`count` clients, each on its own event loop in its own thread (so each is its own smcish
    hub, and opens its own link group with the server): connect, one echo of `size` bytes; with
    `hold`, every client keeps its connection open until all are served or have failed (all
    `count` connections are open together), then closes. Per client: served, mode/reason,
    times, or the error."""
    import threading
    results = [None] * count
    done = threading.Event()
    left = [count]
    lock = threading.Lock()

    def finished():
        with lock:
            left[0] -= 1
            if left[0] == 0:
                done.set()

    async def client(i):
        row = {"i": i}
        t0 = time.monotonic()
        try:
            if PLAIN:
                r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
            else:
                r, w = await asyncio.wait_for(smcish.open_connection("127.0.0.1", port, **KW),
                                              timeout)
        except BaseException as exc:  # noqa
            row.update(error=repr(exc), stage="connect", t=time.monotonic() - t0, served=False)
            results[i] = row
            finished()
            return
        info = w.get_extra_info("smcish")
        row.update(mode=getattr(info, "mode", "plain"), reason=reason_name(info),
                   t_connect=time.monotonic() - t0)
        try:
            payload = os.urandom(size)
            w.write(payload)
            got = await asyncio.wait_for(r.readexactly(size), timeout)
            row["served"] = got == payload
        except BaseException as exc:  # noqa
            row.update(error=repr(exc), stage="echo", served=False)
        row["t"] = time.monotonic() - t0
        results[i] = row
        finished()
        if hold:
            await asyncio.get_running_loop().run_in_executor(None, done.wait, 2 * timeout)
        w.close()
        try:
            await asyncio.wait_for(w.wait_closed(), timeout)
        except BaseException:  # noqa
            pass

    def thread_main(i):
        loop = new_loop()
        try:
            loop.run_until_complete(client(i))
        except BaseException as exc:  # noqa
            if results[i] is None:
                results[i] = {"i": i, "error": repr(exc), "stage": "loop", "served": False}
                finished()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_default_executor())
            except BaseException:  # noqa
                pass
            loop.close()

    threads = [threading.Thread(target=thread_main, args=(i,), daemon=True) for i in range(count)]
    for th in threads:
        th.start()
    loop = asyncio.get_running_loop()
    for th in threads:
        await loop.run_in_executor(None, th.join, 4 * timeout + 10)
    results = [r if r is not None else {"error": "no result", "served": False} for r in results]
    modes = collections.Counter(r.get("mode", "error") + ("/" + r["reason"] if r.get("reason")
                                                          else "") for r in results)
    reply(rid, results=results, modes=dict(modes),
          served=sum(1 for r in results if r.get("served") is True))


SPARE_FDS = []


async def cmd_exhaust_fds(rid, leave=0):
    """Take every fd this process may still open (dup of stdin), then give back `leave` of them:
    the next fds anything opens are exactly those."""
    while True:
        try:
            SPARE_FDS.append(os.dup(0))
        except OSError:
            break
    for _ in range(min(leave, len(SPARE_FDS))):
        os.close(SPARE_FDS.pop())
    reply(rid, taken=len(SPARE_FDS))


async def cmd_release_fds(rid):
    while SPARE_FDS:
        os.close(SPARE_FDS.pop())
    reply(rid)


async def cmd_status(rid, trim=True):
    reply(rid, **agent_status(trim))


async def cmd_arm(rid, hook, count=1, seconds=None):
    ARMED[hook] += count
    if seconds is not None:
        FREEZE_S[hook] = seconds
    reply(rid, armed=dict(ARMED))


async def cmd_release(rid):
    """Write the final words the delay_final hook held back."""
    held = list(HELD)
    HELD.clear()
    for group, slot, gen, phase, reason in held:
        if not group.closed:
            _orig["set_phase"](group, slot, gen, phase, reason)
            _orig["notify"](group, slot)
    reply(rid, released=len(held))


async def cmd_freeze(rid, seconds=3600.0):
    reply(rid, freezing=seconds)
    time.sleep(seconds)


async def cmd_cpu(rid, seconds=2.0):
    """CPU this process uses over `seconds` while its loop idles (or is paused on a full ring)."""
    u0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    u1 = resource.getrusage(resource.RUSAGE_SELF)
    used = (u1.ru_utime + u1.ru_stime) - (u0.ru_utime + u0.ru_stime)
    reply(rid, cpu=used, wall=time.monotonic() - t0)


async def cmd_close_servers(rid):
    for s in SERVERS:
        s.close()
    for s in SERVERS:
        await s.wait_closed()
    SERVERS.clear()
    reply(rid)


COMMANDS = {name[4:]: fn for name, fn in list(globals().items()) if name.startswith("cmd_")}


async def agent_main():
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    tasks = set()

    def handle(line):
        if line == "exit":
            if not done.done():
                done.set_result(None)
            return
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        rid = msg.pop("id", None)
        if cmd == "exit":
            if not done.done():
                done.set_result(None)
            return

        async def run():
            try:
                await COMMANDS[cmd](rid, **msg)
            except BaseException as exc:  # noqa
                reply(rid, error=repr(exc), tb=traceback.format_exc()[-2000:])
        task = loop.create_task(run())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    stdin_commands(loop, handle)
    if not PLAIN:
        # Open what smcish opens lazily once per process (the device, the kernel's socket
        # lookup: two netlink sockets), so fd baselines taken now are the steady state.
        from ism_backend import sockets as _sockets
        try:
            ism_backend.get_device(CFG.get("device"))
        except ism_backend.IsmError as exc:
            emit({"event": "no_device", "error": repr(exc)})
        _sockets.diag().is_local("127.0.0.1")
        _discovery.source_address(socket.AF_INET, "127.0.0.1")
    emit({"ready": True, "pid": os.getpid()})
    await done
    for s in SERVERS:
        s.close()


loop = new_loop()
if CFG.get("install") and not PLAIN:
    smcish.install(loop, smcish.Config.from_env(**KW))     # transparent mode (via="sock")
loop.run_until_complete(agent_main())
'''


class Agent:
    """A process running AGENT (an smcish client or server, or plain asyncio), driven by
    JSON commands; every call and wait is bounded.

    ``Agent(role="server", kw={"handshake_timeout": 5}, loop="uvloop", device=..., nofile=...)``
    then ``agent.call("listen")["port"]``, ``agent.call("connect", port=p, count=64)``, ...
    (see the ``cmd_*`` functions of AGENT). Events (``{"event": ...}`` lines) are kept in
    ``agent.events``; ``wait_event(pred)`` returns the first matching one.
    """

    def __init__(self, role: str = "server", env: dict | None = None, quiet: bool = False,
                 netns: "str | int | None" = None, netns_setup: tuple = (), **cfg) -> None:
        """``netns``: "new" runs the agent in a network namespace of its own (loopback up, then
        the shell commands ``netns_setup``, e.g. a sysctl); a pid runs it in that process's
        network namespace (another agent's)."""
        cfg["role"] = role
        self.role = role
        self.cfg = cfg
        argv = [PYTHON, "-c", AGENT, json.dumps(cfg)]
        if netns == "new":
            script = " && ".join(["ip link set lo up", *netns_setup, 'exec "$0" "$@"'])
            argv = ["unshare", "--net", "--", "sh", "-c", script, *argv]
        elif netns is not None:
            argv = ["nsenter", "-t", str(netns), "-n", "--", *argv]
        self.proc = subprocess.Popen(argv,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL if quiet else None,
                                     env=env or child_env(), cwd=ROOT)
        self.pid = self.proc.pid
        self._buf = b""
        self._next = 0
        self.events: list = []
        self._replies: dict = {}
        self.killed_at = None
        self.read_line = Hostile.read_line.__get__(self)
        try:
            hello = self._read_until(lambda ev: ev.get("ready"), 60)
        except BaseException:
            self.kill()
            raise
        assert hello.get("pid") == self.pid, hello

    def _read_until(self, pred, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.read_line(max(0.01, deadline - time.monotonic()))
            except TimeoutError:
                self.dump_stacks()
                raise
            if "id" in line:
                self._replies[line["id"]] = line
            else:
                self.events.append(line)
            if pred(line):
                return line

    def dump_stacks(self) -> None:
        """Have the agent print every thread's stack on its stderr (a hang's diagnosis)."""
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGUSR1)
                time.sleep(0.5)
            except OSError:
                pass

    def send(self, cmd: str, **args) -> int:
        self._next += 1
        args["cmd"] = cmd
        args["id"] = self._next
        self.proc.stdin.write((json.dumps(args) + "\n").encode())
        self.proc.stdin.flush()
        return self._next

    def result(self, rid: int, timeout: float = 30.0) -> dict:
        if rid not in self._replies:
            self._read_until(lambda ev: ev.get("id") == rid, timeout)
        out = self._replies.pop(rid)
        if "error" in out:
            raise AssertionError(f"agent {self.pid} ({self.role}): {out['error']}\n{out.get('tb')}")
        return out

    def try_result(self, rid: int, timeout: float) -> dict | None:
        """The reply to ``rid`` if it comes within ``timeout``, else None (no stack dump)."""
        deadline = time.monotonic() + timeout
        while rid not in self._replies:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                line = self.read_line(left)
            except TimeoutError:
                return None
            if "id" in line:
                self._replies[line["id"]] = line
            else:
                self.events.append(line)
        return self.result(rid, 0)

    def call(self, cmd: str, wait: float | None = None, **args) -> dict:
        """Run a command and return its reply. ``wait`` bounds our wait (default: 30 s more
        than the command's own ``timeout`` argument, if any)."""
        if wait is None:
            wait = 30.0 + float(args.get("timeout", 0) or 0) + float(args.get("wait_lost", 0))
        return self.result(self.send(cmd, **args), wait)

    def wait_event(self, pred, timeout: float = 10.0) -> dict:
        for ev in self.events:
            if pred(ev):
                return ev
        return self._read_until(lambda ev: "id" not in ev and pred(ev), timeout)

    def hook_event(self, hook: str, timeout: float = 10.0) -> dict:
        try:
            return self.wait_event(lambda ev: ev.get("event") == "hook" and ev.get("hook") == hook,
                                   timeout)
        except TimeoutError:
            raise AssertionError(f"hook {hook} did not fire within {timeout} s: the set-up never "
                                 "reached that point (did the set-up protocol change? see the "
                                 "hooks in conftest.AGENT)") from None

    def status(self, wait: float = 30.0) -> dict:
        return self.call("status", wait=wait)

    def wait_conns(self, n: int, timeout: float = 10.0) -> dict:
        """Wait (bounded) until this agent's application has ``n`` open connections (a server
        may accept after the client's open returned); returns the last status."""
        st = wait_until(lambda: self.call("status", trim=False), lambda st: st["conns_open"] >= n,
                        timeout)
        assert st["conns_open"] >= n, f"{self.role} has {st['conns_open']} connections, not {n}"
        return st

    def kill(self) -> float:
        """SIGKILL; returns the CLOCK_MONOTONIC time of the kill (comparable across processes)."""
        t = time.monotonic()
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.killed_at = t
        self.proc.wait(10)
        return t

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b"exit\n")
                self.proc.stdin.flush()
                self.proc.wait(10)
            except (BrokenPipeError, subprocess.TimeoutExpired, OSError):
                self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def conn_seed(role: str, port: int) -> int:
    """Where the pattern a side sends on connection ``port`` starts (as AGENT's seed_of)."""
    return (port * 7919 + (0 if role == "client" else 500009)) % PATTERN_PERIOD


def published_size(port: int, limit: int = 60000) -> int:
    """The size AGENT's ``publish`` writes on connection ``port``."""
    return 1 + (port * 2654435761) % limit


def wait_until(fn, pred, timeout: float, interval: float = 0.05):
    """Call ``fn()`` until ``pred(result)`` or the timeout; return the last result."""
    deadline = time.monotonic() + timeout
    while True:
        out = fn()
        if pred(out) or time.monotonic() > deadline:
            return out
        time.sleep(interval)


def fds_besides_memory(st: dict) -> int:
    """An agent's fds other than shared memory (memfds, mmap's dups, doorbell eventfds), which
    come and go with a link group's extents, and other than the device's cached connections
    between endpoints (``peer_conns``): sockets, pipes, epoll... must return to the start."""
    kinds = st["fd_kinds"]
    return (st["fds"] - kinds.get("memfd", 0) - kinds.get("eventfd", 0) - kinds.get("devnull", 0)
            - st.get("peer_conns", 0))


def idle_device(st: dict) -> bool:
    """An agent status with no region or attachment left (embedded or ismd)."""
    dev = st.get("device", {})
    return not dev.get("regions") and not dev.get("attached")
