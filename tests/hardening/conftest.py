"""Helpers for the hardening suite: a victim process-in-a-loop, leak snapshots, and ``Agent``: a
real smcish (or plain asyncio) process (tests/programs/smcish_agent.py) driven by JSON commands,
with hooks that stop a set-up at an exact point. See docs/reliability.md. (The security half's
hostile peer, victim and healthy processes are in hostile_helpers.py.)

The parent tests/conftest.py already gives every session a private embedded runtime dir
(SMCISH_RUNTIME_DIR, inherited by every child process started here).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import runpy
import signal
import subprocess
import sys
import time
import zlib

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
PROGRAMS = os.path.join(ROOT, "tests", "programs")
PYTHON = sys.executable
HOST = "127.0.0.1"

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import ism_backend  # noqa: E402
import smcish  # noqa: E402
from benchmarks import children  # noqa: E402

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
    per endpoint it talks to, attach and peer ops, for up to 64 endpoints): unix sockets of ours
    bound to the endpoint path, minus the listener. Counted via /proc/net/unix and our fds'
    inodes."""
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
        except Exception as exc:  # reported by check()
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
        self.kw = {"ring_size": 16384, "handshake_timeout": 0.5}
        self.kw.update(kw)

    async def start(self) -> Victim:
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


def raise_nofile(target: int = 65536) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, target)) if hard != resource.RLIM_INFINITY else max(soft, target)
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# ------------------------------------------------------------------ child processes running smcish

# The deterministic byte stream the agents send and check (tests/programs/stream_pattern.py).
_PATTERN = runpy.run_path(os.path.join(PROGRAMS, "stream_pattern.py"))
PATTERN_SEED = _PATTERN["PATTERN_SEED"]
PATTERN_PERIOD = _PATTERN["PATTERN_PERIOD"]
pattern_at = _PATTERN["pattern_at"]

# ------------------------------------------------------------------ the agent: an smcish process

AGENT = os.path.join(PROGRAMS, "smcish_agent.py")


class Agent:
    """A process running tests/programs/smcish_agent.py (an smcish client or server, or plain
    asyncio), driven by JSON commands; every call and wait is bounded.

    ``Agent(role="server", kw={"handshake_timeout": 5}, loop="uvloop", device=..., nofile=...)``
    then ``agent.call("listen")["port"]``, ``agent.call("connect", port=p, count=64)``, ...
    (see the ``cmd_*`` functions of smcish_agent.py). Events (``{"event": ...}`` lines) are kept
    in ``agent.events``; ``wait_event(pred)`` returns the first matching one. Its stderr is ours
    (pytest shows it with a failure; ``dump_stacks`` writes there), or /dev/null with ``quiet``.
    """

    def __init__(self, role: str = "server", env: dict | None = None, quiet: bool = False,
                 netns: str | int | None = None, netns_setup: tuple = (), **cfg) -> None:
        """``netns``: "new" runs the agent in a network namespace of its own (loopback up, then
        the shell commands ``netns_setup``, e.g. a sysctl); a pid runs it in that process's
        network namespace (another agent's)."""
        cfg["role"] = role
        self.role = role
        self.cfg = cfg
        prefix: list[str] = []
        if netns == "new":
            script = " && ".join(["ip link set lo up", *netns_setup, 'exec "$0" "$@"'])
            prefix = ["unshare", "--net", "--", "sh", "-c", script]
        elif netns is not None:
            prefix = ["nsenter", "-t", str(netns), "-n", "--"]
        self.child = children.spawn_python(script=AGENT, args=[json.dumps(cfg)], prefix=prefix,
                                           env=env or child_env(), cwd=ROOT,
                                           stderr=subprocess.DEVNULL if quiet else None,
                                           name=f"agent ({role})")
        self.proc = self.child.proc
        self.pid = self.child.pid
        self._next = 0
        self.events: list = []
        self._replies: dict = {}
        self.killed_at = None
        try:
            hello = self._read_until(lambda ev: ev.get("ready"), 60)
        except BaseException:
            self.kill()
            self.child.stop()
            raise
        assert hello.get("pid") == self.pid, hello

    def read_line(self, timeout: float) -> dict:
        """The next JSON line (TimeoutError / EOFError: benchmarks/children.py ChildTimeout /
        ChildExited)."""
        return json.loads(self.child.read_line(timeout))

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
        if self.child.alive():
            try:
                os.kill(self.pid, signal.SIGUSR1)
                time.sleep(0.5)
            except OSError:
                pass

    def send(self, cmd: str, **args) -> int:
        self._next += 1
        args["cmd"] = cmd
        args["id"] = self._next
        self.child.send_json(args)
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
                                 "hooks in tests/programs/smcish_agent.py)") from None

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
        if self.child.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.killed_at = t
        self.child.wait(10)
        return t

    def close(self) -> None:
        if self.child.alive():
            try:
                self.child.send_line("exit")
                self.child.wait(10)
            except (BrokenPipeError, children.ChildTimeout, OSError):
                self.kill()
        self.child.stop()

    def __enter__(self) -> Agent:
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
