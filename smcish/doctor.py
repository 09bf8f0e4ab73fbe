"""`python -m smcish doctor [HOST:PORT]`: would a connection from here use shared memory?

Checks, one line each (OK / WARN / FAIL, and for a FAIL or WARN the one-line remedy of
``stats.REMEDIES``): the configuration (SMCISH_NEGOTIATE), the device (the embedded runtime dir:
where, who owns it, its mode; or ismd: reachable, trusted, its quota), the limits (RLIMIT_NOFILE
and the fds in use, /dev/shm) and, for a target, which listening socket the kernel would hand a
connection from this host to (the same sock_diag oracle a real connection asks, through
``discovery.find_acceptor``) and whether that socket is advertised on our device. Nothing is sent
to the target: no connection is made (but by ``--probe``, which still sends no byte).

``--probe`` measures instead of predicting. Without a target: a local pair, an echo server in a
child process (one smcish listener, one plain asyncio listener) and, in this process, round
trips of ``--size`` bytes and a one-way 64 KiB throughput figure over both, interleaved in
rounds within ``--seconds``. With a target: only connection set-up (connect, wait until the
set-up is decided, close without sending a byte), smcish against plain asyncio, since an unknown
service's protocol cannot be spoken. Either way the smcish connections' real mode is reported,
with the fallback reason and remedy when it is TCP.

Exit status: 0 when acceleration is possible (toward the target if one is given, else through
the device; with ``--probe``, when the probe's smcish connections used shared memory), 1 when
not, 2 on bad arguments or when the probe could not run (the target refused the connection).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import select
import socket
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .clc import DeclineReason as R
from .stats import REMEDIES

OK, WARN, FAIL, INFO = "OK", "WARN", "FAIL", "INFO"

SHM_LOW = 64 << 20          # /dev/shm free below this: WARN (a few max-size rings)
NOFILE_LOW = 1024           # a soft RLIMIT_NOFILE below this: WARN


@dataclass
class Check:
    name: str
    status: str
    detail: str
    reason: str | None = None          # the DeclineReason a FAIL stands for
    remedy: str | None = None


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    mode: str = "ism"                  # what a connection would do: "ism" or "tcp"
    reason: str | None = None
    remedy: str | None = None
    target: str | None = None
    probe: dict[str, Any] | None = None   # --probe: the measurements (as_dict()["probe"])
    probe_lines: list[str] = field(default_factory=list)   # --probe: its text, before the verdict
    error: str | None = None           # the probe could not run: exit 2

    def add(self, name: str, status: str, detail: str, reason: R | str | None = None,
            remedy: str | None = None) -> Check:
        rname = reason.name if isinstance(reason, R) else reason
        if remedy is None and rname is not None:
            remedy = REMEDIES.get(rname)
        check = Check(name, status, detail, rname, remedy)
        self.checks.append(check)
        if status == FAIL and rname is not None and self.mode == "ism":
            self.mode, self.reason, self.remedy = "tcp", rname, remedy
        return check

    @property
    def exit_code(self) -> int:
        if self.error is not None:
            return 2
        return 0 if self.mode == "ism" else 1

    def as_dict(self) -> dict[str, Any]:
        out = {"target": self.target, "checks": [asdict(c) for c in self.checks],
               "verdict": {"mode": self.mode, "reason": self.reason, "remedy": self.remedy},
               "exit": self.exit_code}
        if self.probe is not None:
            out["probe"] = self.probe
        return out

    def text(self) -> str:
        lines = []
        for c in self.checks:
            line = f"{c.status:<4} {c.name}: {c.detail}"
            if c.status in (WARN, FAIL) and c.remedy:
                line += f"\n       remedy: {c.remedy}"
            lines.append(line)
        lines.extend(self.probe_lines)
        if self.mode == "ism":
            lines.append("verdict: shared memory")
        else:
            lines.append(f"verdict: TCP ({self.reason}): {self.remedy}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------ checks

def _check_config(report: Report, spec: str | None) -> tuple[Any, str]:
    from .config import Config

    config = Config.from_env()
    if spec is not None:
        config = config.replace(device=spec)
    if config.negotiate == "never":
        report.add("config", FAIL, "SMCISH_NEGOTIATE=never: shared memory is off",
                   R.DISABLED_BY_POLICY)
    else:
        report.add("config", OK, f"negotiate={config.negotiate}")
    _check_policy(report)
    resolved = (config.device or os.environ.get("SMCISH_DEVICE") or "embedded").strip()
    return config, resolved


def _check_policy(report: Report) -> None:
    from . import policy

    try:
        p = policy.current()
    except policy.PolicyError as exc:
        report.add("policy", FAIL, f"{exc}: until it is fixed, smcish's create_connection, "
                                   "open_connection, create_server and start_server raise "
                                   "ValueError", "POLICY_ERROR",
                   remedy="fix SMCISH_POLICY / the config file (docs/policy.md)")
        return
    learned = policy.learned()
    report.add("policy", INFO,
               f"{p.source}: {len(p.rules)} rule(s), default {p.default}; learned: declines after "
               f"{p.decline_after} for {p.decline_ttl:g} s, short-lived "
               + (f"< {p.short_lived_ms:g} ms x{p.short_lived_count}" if p.short_lived_ms else "off")
               + (f"; {len(learned)} destination(s) skipped now" if learned else ""))


def _describe_dir(path: str) -> tuple[str, bool]:
    """What is at ``path`` (before the device creates it), and whether it looks refusable."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "does not exist yet (created 0700 on first use)", False
    except OSError as exc:
        return f"cannot stat ({exc.strerror})", True
    mode = stat.S_IMODE(st.st_mode)
    kind = "dir" if stat.S_ISDIR(st.st_mode) else "not a directory"
    bad = (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or bool(mode & 0o077))
    return f"{kind}, owner uid {st.st_uid}, mode {mode:o}", bad


def _check_device(report: Report, resolved: str) -> Any:
    """Open the device as a connection would; return it, or None."""
    import ism_backend

    from .linkgroup import error_reason

    if resolved == "none":
        report.add("device", FAIL, "SMCISH_DEVICE=none: no ISM device, every connection is TCP",
                   R.NO_DEVICE)
        return None
    if resolved == "embedded":
        from ism_backend.embedded import runtime_dir

        path = os.path.abspath(runtime_dir())
        where, bad = _describe_dir(path)
        report.add("runtime dir", WARN if bad else OK, f"{path}: {where}")
    elif resolved.startswith("unix:") and len(resolved) > len("unix:"):
        path = resolved[len("unix:"):]
        try:
            st = os.stat(path)
            where = (f"{'socket' if stat.S_ISSOCK(st.st_mode) else 'not a socket'}, "
                     f"owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o}")
        except OSError as exc:
            where = f"cannot stat ({exc.strerror})"
        report.add("ismd socket", INFO, f"{path}: {where}")
    try:
        device = ism_backend.open_device(resolved)
    except Exception as exc:  # noqa: BLE001 - every refusal is a finding
        reason = error_reason(exc, R.NO_DEVICE)
        report.add("device", FAIL, f"{resolved}: {exc}", reason,
                   remedy=_own_remedy(exc) or REMEDIES.get(reason.name))
        return None
    if not device.available:
        report.add("device", FAIL, f"{resolved}: opened but not available", R.NO_DEVICE)
        return device
    if device.kind == "embedded":
        report.add("device", OK, f"embedded, gid {device.gid.hex()}, runtime dir "
                                 f"{getattr(device, 'dir', '?')} (ours, private)")
    else:
        report.add("device", OK, f"ismd pid {getattr(device, 'daemon_pid', '?')} at "
                                 f"{getattr(device, 'path', '?')}, gid {device.gid.hex()}, "
                                 f"trusted (SO_PEERCRED), our uid {getattr(device, 'uid', '?')}")
    return device


def _own_remedy(exc: BaseException) -> str | None:
    """The fix the device's own message names (its text after the last ': '), if any."""
    text = str(exc)
    if ": " in text:
        tail = text.rsplit(": ", 1)[1].strip()
        if any(w in tail for w in ("set ", "start ", "remove ", "chmod ", "raise ")):
            return tail
    return None


def _check_quota(report: Report, device: Any) -> None:
    if device is None or device.kind != "daemon":
        if device is not None:
            report.add("quota", OK, "embedded device: no device quota (memfd memory counts "
                                    "against the process's memory limits)")
        return
    try:
        status = device.status()
    except Exception as exc:  # noqa: BLE001
        report.add("quota", WARN, f"ismd status failed: {exc}")
        return
    from .linkgroup import first_extent_size

    quota, total, used = status.get("quota"), status.get("total_memory"), status.get("used")
    mine = sum(r.get("size", 0) for r in status.get("regions", [])
               if r.get("owner_uid") == os.geteuid())
    detail = (f"ismd quota {quota} bytes per uid (we hold {mine}), device "
              f"{used}/{total} bytes used")
    # A connection from a process with no link group to its peer yet opens one: its first
    # extent, on each side, from that side's uid's quota.
    need = first_extent_size("daemon")
    left = [value for value in ((quota - mine) if isinstance(quota, int) else None,
                                (total - used) if isinstance(total, int) and isinstance(used, int)
                                else None) if value is not None]
    if left and min(left) < need:
        report.add("quota", FAIL, f"{detail}: {min(left)} bytes left, a new link group needs "
                                  f"{need} on each side (connections in groups already open may "
                                  "still use shared memory)", R.QUOTA)
    elif left and min(left) < 4 * need:
        report.add("quota", WARN, f"{detail}: room for {min(left) // need} more link group "
                                  "side(s)", remedy=REMEDIES["QUOTA"])
    else:
        report.add("quota", OK, detail)


def _check_limits(report: Report, device: Any) -> None:
    from .linkgroup import GROUP_FDS

    soft: int | None
    hard: int | None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError) as exc:
        report.add("RLIMIT_NOFILE", WARN, f"cannot read: {exc}")
        soft = hard = None
    if soft is not None:
        try:
            used = len(os.listdir("/proc/self/fd")) - 1
        except OSError:
            used = 0
        unlimited = soft == resource.RLIM_INFINITY or soft > 1 << 20
        shown = "unlimited" if soft == resource.RLIM_INFINITY else str(soft)
        reserve = max(16, soft // 8) if not unlimited else 0
        groups = (soft - used - reserve) // GROUP_FDS if not unlimited else None
        detail = (f"soft {shown}, hard {'unlimited' if hard == resource.RLIM_INFINITY else hard}, "
                  f"{used} in use here; a link group costs about {GROUP_FDS} fds each side")
        if not unlimited and soft - used < GROUP_FDS:
            report.add("RLIMIT_NOFILE", FAIL, detail + ": no room for a link group", R.NO_FD)
        elif not unlimited and soft < NOFILE_LOW:
            report.add("RLIMIT_NOFILE", WARN,
                       detail + f": low; a server keeping its reserve of {reserve} has room for "
                                f"about {max(groups or 0, 0)} link groups, then connections "
                                "stay TCP (NO_FD)", remedy=REMEDIES["NO_FD"])
        else:
            report.add("RLIMIT_NOFILE", OK, detail)
    try:
        st = os.statvfs("/dev/shm")
    except OSError as exc:
        report.add("/dev/shm", WARN, f"not available ({exc.strerror}): shared memory comes from "
                                     "memfd; the runtime dir falls back to /tmp")
    else:
        size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
        detail = f"{size >> 20} MiB, {free >> 20} MiB free (shmem is shared with memfd regions)"
        if free < SHM_LOW:
            report.add("/dev/shm", WARN, detail + f": under {SHM_LOW >> 20} MiB free",
                       remedy=REMEDIES["NO_MEMORY"])
        else:
            report.add("/dev/shm", OK, detail)
    _check_quota(report, device)


def _parse_target(target: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` -> (host, port). Raises ValueError."""
    if target.startswith("["):
        host, sep, rest = target[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad target {target!r}: use [ADDR]:PORT for IPv6")
        port_text = rest[1:]
    else:
        host, sep, port_text = target.rpartition(":")
        if not sep or not host:
            raise ValueError(f"bad target {target!r}: use HOST:PORT")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"bad port {port_text!r}")
    return host, port


async def _acceptor(device: Any, family: int, host: str, port: int) -> tuple[Any, Any]:
    """discovery.find_acceptor as a connection would call it; also the oracle's own answer."""
    from ism_backend import sockets

    from . import discovery
    from .linkgroup import Hub

    loop = asyncio.get_running_loop()
    hub = Hub.get(loop, device)
    acceptor = await discovery.find_acceptor(loop, hub, family, host, port, None)
    hit = None
    try:
        bound = acceptor.sock.getsockname()
        if bound[1] and discovery.is_local(host):
            hit = sockets.diag().lookup(family, (host, port), (bound[0], bound[1]))
            if hit is not None and hit.state == sockets.TCP_TIME_WAIT:
                hit = discovery._listener_behind(family, host, port, bound)
    except OSError:
        pass
    finally:
        acceptor.sock.close()
    return acceptor, hit


def _check_target(report: Report, device: Any, target: str) -> None:
    from . import discovery

    host, port = _parse_target(target)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        report.add("target", FAIL, f"{target}: cannot resolve ({exc.strerror})",
                   R.PEER_NOT_ADVERTISED, remedy="check the host name")
        return
    family, addr = infos[0][0], infos[0][4]
    ip = str(addr[0])
    local = discovery.is_local(ip)
    netns = os.readlink("/proc/self/ns/net") if os.path.exists("/proc/self/ns/net") else "?"
    where = "an address of this network namespace" if local else "not an address of this namespace"
    report.add("target", INFO, f"{target} -> {ip} port {port}; {where} ({netns})")
    if device is None:
        return
    from . import policy

    try:
        skip, why = policy.explain("client", ip, port)
    except policy.PolicyError:
        return                      # reported by the policy check
    if skip is not None:
        report.add("policy", FAIL, f"connections to {ip}:{port} stay TCP: {why}", skip)
        return
    report.add("policy", OK, f"connections to {ip}:{port} may use shared memory: {why}")
    if not local and device.kind != "daemon":
        report.add("listener", FAIL, f"{ip} is not local to this namespace: the embedded device "
                                     "only reaches listeners in the same namespace",
                   R.PEER_NOT_ADVERTISED,
                   remedy="connect to a local address, or use ismd (SMCISH_DEVICE=unix:...) "
                          "across namespaces")
        return
    try:
        acceptor, hit = asyncio.run(_acceptor(device, family, ip, port))
    except Exception as exc:  # noqa: BLE001
        from .linkgroup import error_reason

        reason = error_reason(exc, R.INTERNAL)
        report.add("listener", FAIL, f"discovery failed: {exc!r}", reason)
        return
    if hit is not None:
        report.add("listener", OK, f"the kernel would hand a connection to listening socket "
                                   f"inode {hit.inode} (uid {hit.uid})")
    elif local:
        report.add("listener", FAIL, f"nothing listens on {ip}:{port} (a connection would be "
                                     "refused)", R.PEER_NOT_ADVERTISED,
                   remedy="start the server, or check HOST:PORT")
        return
    if acceptor.reason is None:
        advert = acceptor.advert
        who = (f"pid {advert.pid} uid {advert.uid}" if advert is not None
               else "a hub we already share a link group with")
        report.add("advert", OK, f"advertised on our device by {who}"
                                 f"{' (across namespaces, via ismd)' if acceptor.remote else ''}")
    else:
        name = acceptor.reason.name
        detail = {"PEER_NOT_ADVERTISED": "that socket is not advertised on our device: not an "
                                         "smcish listener, or one on another device/namespace",
                  "NO_PORT": "no client port free toward that address"}.get(name, name)
        report.add("advert", FAIL, detail, acceptor.reason)


# ------------------------------------------------------------------------------ probe

PROBE_HOST = "127.0.0.1"
PROBE_ROUNDS = 4                # A/B rounds: smcish and TCP alternate which goes first
RTT_SHARE = 0.75                # of --seconds: round trips; the rest: the throughput figure
BULK_MIN_SECONDS = 0.2          # a budget below this measures round trips only
BULK_MESSAGE = 64 << 10         # the throughput figure's message size
BULK_BURST = 16                 # messages written per drain
MAX_ROUND_TRIPS = 200_000       # per phase (one transport, one round)
MAX_BURSTS = 20_000             # per phase
WARMUP_SHARE = 0.1              # of --seconds: warm-up (bulk grows the rings), not measured
TARGET_MAX_CONNECTIONS = 250    # per side: a probe is not a load test of someone's service
CONNECT_TIMEOUT = 5.0           # one connect (a target that drops SYNs)
SERVER_START_TIMEOUT = 20.0     # the child echo server's handshake line
SIZE_MAX = 64 << 20
SECONDS_MIN, SECONDS_MAX = 0.05, 600.0
LOOPS = ("asyncio", "uvloop")
_FRAME = 9                      # the throughput frames: 1 byte op + 8 bytes big-endian argument

_SERVER_CODE = ("import sys; from smcish.doctor import _probe_server_main; "
                "sys.exit(_probe_server_main(sys.argv[1:]))")


class ProbeError(Exception):
    """The probe could not run (its message is the report): exit status 2."""


def _new_loop_factory(kind: str) -> Any:
    if kind == "uvloop":
        try:
            import uvloop
        except ImportError:
            raise ProbeError("--loop uvloop: uvloop is not installed (pip install "
                             "'smcish[uvloop]')") from None
        return uvloop.new_event_loop
    return asyncio.new_event_loop


def _loop_name() -> str:
    return "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") \
        else "asyncio"


class _ProbePeer(asyncio.Protocol):
    """The child's side of one probe connection. The first byte says what it is: ``E``, echo
    every byte back (round trips); ``T``, frames of 9 bytes: ``D`` + n, then n bytes to count,
    or ``A`` + 8 bytes, answered with the count since the last ``A`` (throughput)."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.echo = False
        self.kind: int | None = None
        self.frame = bytearray()
        self.left = 0
        self.count = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.echo:
            self.transport.write(data)
            return
        i, n = 0, len(data)
        if self.kind is None:
            self.kind, i = data[0], 1
            if self.kind == 0x45:                    # b"E"
                self.echo = True
                if n > 1:
                    self.transport.write(data[1:])
                return
            if self.kind != 0x54:                    # b"T"
                self.transport.close()
                return
        while i < n:
            if self.left:
                take = min(self.left, n - i)
                self.left -= take
                self.count += take
                i += take
                continue
            take = min(_FRAME - len(self.frame), n - i)
            self.frame += data[i:i + take]
            i += take
            if len(self.frame) < _FRAME:
                return
            op, arg = self.frame[0], int.from_bytes(self.frame[1:], "big")
            self.frame.clear()
            if op == 0x44:                           # b"D"
                self.left = arg
            elif op == 0x41:                         # b"A"
                self.transport.write(self.count.to_bytes(8, "big"))
                self.count = 0
            else:
                self.transport.close()
                return


async def _probe_serve(out: Any, lifetime: float) -> None:
    """Listen twice (smcish, plain asyncio), say where on ``out``, serve until stdin closes
    (the doctor ended or died) or ``lifetime`` seconds passed."""
    import smcish

    loop = asyncio.get_running_loop()
    smc = await smcish.create_server(_ProbePeer, PROBE_HOST, 0)
    tcp = await loop.create_server(_ProbePeer, PROBE_HOST, 0)
    stop = loop.create_future()
    fd = sys.stdin.fileno()

    def on_stdin() -> None:
        try:
            data = os.read(fd, 4096)
        except OSError:
            data = b""
        if not data and not stop.done():
            stop.set_result(None)

    loop.add_reader(fd, on_stdin)
    out.write(json.dumps({"smcish": smc.sockets[0].getsockname()[1],
                          "tcp": tcp.sockets[0].getsockname()[1],
                          "pid": os.getpid(), "loop": _loop_name()}) + "\n")
    out.flush()
    try:
        await asyncio.wait_for(stop, lifetime)
    except TimeoutError:
        pass
    finally:
        loop.remove_reader(fd)
        smc.close()
        tcp.close()


def _probe_server_main(argv: list[str]) -> int:
    """The child: ``LOOP LIFETIME``. Its handshake goes on a private copy of stdout; fd 1 then
    points at stderr, so a stray print cannot corrupt it."""
    kind, lifetime = argv[0], float(argv[1])
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    with asyncio.Runner(loop_factory=_new_loop_factory(kind)) as runner:
        runner.run(_probe_serve(out, lifetime))
    return 0


class _EchoServerProcess:
    """The local pair's server: a child process (this interpreter, this smcish), killed and
    reaped on exit."""

    def __init__(self, loop_kind: str, device_spec: str | None, lifetime: float) -> None:
        self.loop_kind = loop_kind
        self.device_spec = device_spec
        self.lifetime = lifetime
        self.proc: subprocess.Popen[bytes] | None = None
        self._err: Any = None
        self.info: dict[str, Any] = {}

    def __enter__(self) -> dict[str, Any]:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                    else "")
        if self.device_spec is not None:
            env["SMCISH_DEVICE"] = self.device_spec
        self._err = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _SERVER_CODE, self.loop_kind, f"{self.lifetime:.1f}"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, env=env, cwd=root,
            bufsize=0)
        try:
            self.info = self._handshake()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self.info

    def _handshake(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while b"\n" not in buf and len(buf) < 4096:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProbeError(f"the probe's echo server did not start within "
                                 f"{SERVER_START_TIMEOUT:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
                raise ProbeError(f"the probe's echo server exited (status "
                                 f"{self.proc.returncode}): {self._stderr_tail()}")
            buf += chunk
        try:
            info: dict[str, Any] = json.loads(buf.split(b"\n", 1)[0])
        except ValueError:
            raise ProbeError(f"the probe's echo server said {buf[:200]!r}") from None
        return info

    def _stderr_tail(self) -> str:
        try:
            self._err.seek(0)
            lines = self._err.read().decode(errors="replace").strip().splitlines()
        except (OSError, ValueError):
            return "?"
        return lines[-1] if lines else "no message"

    def __exit__(self, *exc: Any) -> None:
        proc = self.proc
        if proc is not None:
            try:
                if proc.stdin is not None:
                    proc.stdin.close()           # its cue to close its listeners and exit
            except OSError:
                pass
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass
            if proc.stdout is not None:
                proc.stdout.close()
        if self._err is not None:
            self._err.close()


def _mode_of(transport: Any) -> dict[str, Any]:
    info = transport.get_extra_info("smcish")
    if info is None:
        return {"mode": "tcp", "reason": None, "remedy": None, "device": None}
    reason = getattr(info.reason, "name", info.reason)
    return {"mode": info.mode, "reason": reason,
            "remedy": REMEDIES.get(reason) if reason else None, "device": info.device}


async def _settle(transport: Any, timeout: float) -> None:
    """Until an optimistic set-up has the server's answer (ACCEPTED, or TCP after all). The
    application could write before it; the probe wants the final mode, and the set-up time to
    it. Each turn runs the loop once (the answer's doorbell is handled as it comes) and yields
    the CPU: a server on this CPU must run to answer (a pure spin measured the scheduler's time
    slice, milliseconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while getattr(transport, "_setup", None) is not None and loop.time() < deadline:
        os.sched_yield()
        await asyncio.sleep(0)


def _us(ns: float) -> float:
    return round(ns / 1000, 2)


def _spread(samples: list[int]) -> dict[str, Any]:
    """Percentiles (microseconds) of ``samples`` (nanoseconds)."""
    ordered = sorted(samples)
    n = len(ordered)

    def pct(q: float) -> float:
        return _us(ordered[min(n - 1, int(q * n))])

    return {"count": n, "p50_us": _us(statistics.median(ordered)), "p10_us": pct(0.10),
            "p90_us": pct(0.90), "p99_us": pct(0.99)}


async def _round_trips(reader: Any, writer: Any, msg: bytes, end_ns: int, limit: int) -> list[int]:
    """Request/response of ``msg`` until ``end_ns`` (at least one) or ``limit`` of them."""
    clock = time.perf_counter_ns
    size = len(msg)
    samples: list[int] = []
    while len(samples) < limit:
        t0 = clock()
        if t0 >= end_ns and samples:
            break
        writer.write(msg)
        await reader.readexactly(size)
        samples.append(clock() - t0)
    return samples


async def _bulk(reader: Any, writer: Any, chunk: bytes, end_ns: int, limit: int) -> tuple[int, int]:
    """64 KiB messages one way until ``end_ns`` (at least one burst) or ``limit`` bursts, then
    the peer's count of them: (bytes, nanoseconds from the first write to the count)."""
    clock = time.perf_counter_ns
    burst = len(chunk) * BULK_BURST
    frame = b"D" + burst.to_bytes(8, "big")
    sent = bursts = 0
    t0 = clock()
    while bursts < limit and (bursts == 0 or clock() < end_ns):
        writer.write(frame)
        for _ in range(BULK_BURST):
            writer.write(chunk)
        await writer.drain()
        sent += burst
        bursts += 1
    writer.write(b"A" + bytes(8))
    got = int.from_bytes(await reader.readexactly(8), "big")
    elapsed = clock() - t0
    if got != sent:
        raise ProbeError(f"the echo server counted {got} bytes of {sent}")
    return sent, elapsed


async def _close(writer: Any) -> None:
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), 2)
    except (TimeoutError, OSError):
        pass


async def _local_pair(ports: dict[str, Any], size: int, seconds: float, device_spec: str | None,
                      settle_timeout: float) -> dict[str, Any]:
    """The A/B against the child's two listeners (see ``probe_local``)."""
    import smcish

    kw: dict[str, Any] = {"device": device_spec} if device_spec is not None else {}
    opened: list[Any] = []
    conns: dict[str, dict[str, tuple[Any, Any]]] = {"smcish": {}, "tcp": {}}
    result: dict[str, Any] = {"loop": _loop_name()}
    bulk = seconds >= BULK_MIN_SECONDS
    try:
        for purpose, first in (("rtt", b"E"), ("bulk", b"T")):
            if purpose == "bulk" and not bulk:
                continue
            for kind in ("smcish", "tcp"):
                if kind == "smcish":
                    pair = await asyncio.wait_for(
                        smcish.open_connection(PROBE_HOST, ports["smcish"], **kw), CONNECT_TIMEOUT)
                    opened.append(pair[1])
                    await _settle(pair[1].transport, settle_timeout)
                else:
                    pair = await asyncio.wait_for(
                        asyncio.open_connection(PROBE_HOST, ports["tcp"]), CONNECT_TIMEOUT)
                    opened.append(pair[1])
                pair[1].write(first)
                conns[kind][purpose] = pair
        # The smcish side must really be shared memory, or there is no gain to measure.
        smc_modes = {p: _mode_of(w.transport) for p, (_, w) in conns["smcish"].items()}
        mode = next((m for m in smc_modes.values() if m["mode"] != "ism"), smc_modes["rtt"])
        result["smcish"] = dict(mode)
        result["tcp"] = {"mode": "tcp"}
        if mode["mode"] != "ism":
            result["measured"] = False
            return result
        result["measured"] = True
        msg = bytes(size)
        chunk = b"\xa5" * BULK_MESSAGE
        limit_ns = int(seconds * 1e9)
        # Warm-up (not counted): bulk first (rings grow, pages are touched), then round trips
        # (the last thing before round 1, as each round's round trips follow a bulk phase's).
        warm_ns = int(limit_ns * WARMUP_SHARE / 4)
        measured_ns = limit_ns - 4 * warm_ns
        warm_started = time.perf_counter()
        for purpose in (("bulk", "rtt") if bulk else ("rtt",)):
            for kind in ("smcish", "tcp"):
                reader, writer = conns[kind][purpose]
                end = time.perf_counter_ns() + warm_ns
                if purpose == "bulk":
                    await _bulk(reader, writer, chunk, end, MAX_BURSTS)
                else:
                    await _round_trips(reader, writer, msg, end, MAX_ROUND_TRIPS)
        rtt_slice = int(measured_ns * (RTT_SHARE if bulk else 1.0) / (2 * PROBE_ROUNDS))
        bulk_slice = int(measured_ns * (1 - RTT_SHARE) / (2 * PROBE_ROUNDS))
        samples: dict[str, list[int]] = {"smcish": [], "tcp": []}
        round_p50: dict[str, list[float]] = {"smcish": [], "tcp": []}
        round_mbs: dict[str, list[float]] = {"smcish": [], "tcp": []}
        moved: dict[str, int] = {"smcish": 0, "tcp": 0}
        before = smcish.stats()
        started = time.perf_counter()
        result["warmup_s"] = round(started - warm_started, 3)
        for rnd in range(PROBE_ROUNDS):
            order = ("smcish", "tcp") if rnd % 2 == 0 else ("tcp", "smcish")
            for kind in order:
                reader, writer = conns[kind]["rtt"]
                got = await _round_trips(reader, writer, msg, time.perf_counter_ns() + rtt_slice,
                                         MAX_ROUND_TRIPS)
                samples[kind].extend(got)
                round_p50[kind].append(_us(statistics.median(got)))
            if bulk:
                for kind in order:
                    reader, writer = conns[kind]["bulk"]
                    sent, elapsed = await _bulk(reader, writer, chunk,
                                                time.perf_counter_ns() + bulk_slice, MAX_BURSTS)
                    moved[kind] += sent
                    round_mbs[kind].append(round(sent / elapsed * 1e3, 1))   # bytes/ns -> MB/s
        result["elapsed_s"] = round(time.perf_counter() - started, 3)
        after = smcish.stats()
        # this process's busy-polls during the rounds: "colocated" ones found the peer on our
        # CPU (scheduler placement: round trips then cost a yield or a doorbell each)
        result["smcish"]["polls"] = {name: after.get(key, 0) - before.get(key, 0) for name, key in
                                     (("hits", "poll_hits"), ("misses", "poll_misses"),
                                      ("colocated", "poll_colocated"), ("doorbells", "doorbells"))}
        for kind in ("smcish", "tcp"):
            side = result[kind]
            side["rtt"] = dict(_spread(samples[kind]), round_p50_us=round_p50[kind])
            if bulk:
                side["throughput"] = {"mb_per_s": round(statistics.median(round_mbs[kind]), 1),
                                      "round_mb_per_s": round_mbs[kind], "bytes": moved[kind]}
        smc, tcp = result["smcish"], result["tcp"]
        result["ratio"] = {"rtt_p50": round(smc["rtt"]["p50_us"] / tcp["rtt"]["p50_us"], 3)}
        if bulk:
            result["ratio"]["mb_per_s"] = round(
                smc["throughput"]["mb_per_s"] / tcp["throughput"]["mb_per_s"], 3)
        return result
    finally:
        for writer in opened:
            await _close(writer)


def probe_local(report: Report, size: int, seconds: float, loop_kind: str,
                device_spec: str | None) -> None:
    """``--probe`` without a target: the echo server in a child process, smcish against plain
    asyncio TCP over the same loop, request/response of ``size`` bytes and a throughput figure
    (64 KiB messages one way), interleaved in rounds within about ``seconds``."""
    from .config import Config

    settle_timeout = Config.from_env().handshake_timeout + 1.0
    probe: dict[str, Any] = {"kind": "local-pair", "loop": loop_kind, "size": size,
                             "seconds": seconds, "rounds": PROBE_ROUNDS, "host": PROBE_HOST}
    report.probe = probe
    try:
        factory = _new_loop_factory(loop_kind)
        with _EchoServerProcess(loop_kind, device_spec, seconds * 4 + 60) as server:
            probe["server"] = {"pid": server.get("pid"), "loop": server.get("loop"),
                               "smcish_port": server.get("smcish"), "tcp_port": server.get("tcp")}
            with asyncio.Runner(loop_factory=factory) as runner:
                probe.update(runner.run(asyncio.wait_for(
                    _local_pair(server, size, seconds, device_spec, settle_timeout),
                    seconds * 3 + 30)))
    except ProbeError as exc:
        _probe_failed(report, probe, str(exc))
        return
    except TimeoutError:
        _probe_failed(report, probe,
                      f"the local pair did not finish within {seconds * 3 + 30:.0f} s")
        return
    except (OSError, EOFError) as exc:     # EOFError: asyncio.IncompleteReadError
        _probe_failed(report, probe, f"the local pair failed: {exc!r}")
        return
    smc = probe["smcish"]
    where = (f"local pair (echo server in child pid {probe['server']['pid']}, "
             f"{probe['server']['loop']} loop there, {probe['loop']} here)")
    if smc["mode"] != "ism":
        report.add("probe", FAIL, f"{where}: the smcish connection is TCP ({smc['reason']}): "
                                  "no gain to measure", smc["reason"] or "INTERNAL",
                   remedy=smc["remedy"])
        return
    report.add("probe", OK, f"{where}: smcish connections in mode ism, device {smc['device']}")
    report.probe_lines.extend(_local_lines(probe))


def _local_lines(p: dict[str, Any]) -> list[str]:
    smc, tcp, ratio = p["smcish"], p["tcp"], p["ratio"]
    rs, rt = smc["rtt"], tcp["rtt"]
    r = ratio["rtt_p50"]
    gain = f"{1 / r:.2f}x faster" if r <= 1 else f"{r:.2f}x slower"
    lines = [f"PROBE {p['size']} B request/response, {p['loop']} loop, {p['rounds']} rounds with "
             f"smcish and TCP interleaved, {p['elapsed_s']:.2f} s measured after "
             f"{p['warmup_s']:.2f} s of warm-up (--seconds {p['seconds']:g})"]

    def rtt_line(name: str, s: dict[str, Any]) -> str:
        rounds = s["round_p50_us"]
        return (f"      {name:<6} round trip p50 {s['p50_us']:8.1f} us  (p10 {s['p10_us']:.1f}, "
                f"p90 {s['p90_us']:.1f}, p99 {s['p99_us']:.1f}; {s['count']} round trips; "
                f"round p50s {min(rounds):.1f}-{max(rounds):.1f})")

    lines += [rtt_line("smcish", rs), rtt_line("TCP", rt),
              f"      smcish/TCP p50 {r:.2f}: {gain}"]
    polls = smc.get("polls")
    if polls:
        lines.append(f"      smcish busy-polls here: {polls['hits']} hit, {polls['misses']} "
                     f"missed, {polls['colocated']} with the peer on this CPU; "
                     f"{polls['doorbells']} doorbells")
        if polls["colocated"] * 4 > polls["hits"] + polls["misses"]:
            lines.append("      (the scheduler often ran both processes on one CPU: smcish round "
                         "trips are then slower than apart, docs/design.md 2.7; another run may "
                         "be placed differently)")
    if "mb_per_s" in ratio:
        ts, tt = smc["throughput"], tcp["throughput"]

        def bulk_line(name: str, t: dict[str, Any]) -> str:
            rounds = t["round_mb_per_s"]
            return (f"      {name:<6} {t['mb_per_s']:8.0f} MB/s  (rounds {min(rounds):.0f}-"
                    f"{max(rounds):.0f}; {t['bytes'] / 1e6:.0f} MB)")

        lines += [f"PROBE {BULK_MESSAGE // 1024} KiB messages one way, acked per round",
                  bulk_line("smcish", ts), bulk_line("TCP", tt),
                  f"      smcish/TCP {ratio['mb_per_s']:.2f}"]
    return lines


def _probe_failed(report: Report, probe: dict[str, Any], message: str) -> None:
    probe["error"] = message
    report.error = message
    report.add("probe", FAIL, message)


class _Quiet(asyncio.Protocol):
    """A target connection's protocol: never writes; whatever the server says is ignored."""

    def __init__(self) -> None:
        self.lost = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)


async def _one_setup(kind: str, ip: str, port: int, kw: dict[str, Any],
                     settle_timeout: float) -> tuple[int, int, dict[str, Any]]:
    """Connect, wait until established (smcish: the set-up's final answer), close; never a byte
    written. (nanoseconds to connect's return, nanoseconds to established, mode)."""
    import smcish

    loop = asyncio.get_running_loop()
    t0 = time.perf_counter_ns()
    if kind == "smcish":
        transport, proto = await asyncio.wait_for(smcish.create_connection(_Quiet, ip, port, **kw),
                                                  CONNECT_TIMEOUT)
        t1 = time.perf_counter_ns()
        await _settle(transport, settle_timeout)
        t2 = time.perf_counter_ns()
        mode = _mode_of(transport)
    else:
        transport, proto = await asyncio.wait_for(loop.create_connection(_Quiet, ip, port),
                                                  CONNECT_TIMEOUT)
        t1 = t2 = time.perf_counter_ns()
        mode = {"mode": "tcp"}
    transport.close()
    try:
        await asyncio.wait_for(proto.lost, 2)
    except TimeoutError:
        pass
    return t1 - t0, t2 - t0, mode


async def _target_setups(ip: str, port: int, seconds: float, device_spec: str | None,
                         settle_timeout: float) -> dict[str, Any]:
    kw: dict[str, Any] = {"device": device_spec} if device_spec is not None else {}
    times: dict[str, list[int]] = {"smcish": [], "tcp": []}
    connect_ns: list[int] = []
    modes: dict[str, int] = {}
    reasons: dict[str, int] = {}
    devices: set[str] = set()
    end = time.perf_counter() + seconds
    started = time.perf_counter()
    i = 0
    # at least two of each (the first is reported apart), at most TARGET_MAX_CONNECTIONS
    while i < TARGET_MAX_CONNECTIONS and (i < 2 or time.perf_counter() < end):
        for kind in (("smcish", "tcp") if i % 2 == 0 else ("tcp", "smcish")):
            try:
                connected, established, mode = await _one_setup(kind, ip, port, kw,
                                                                settle_timeout)
            except (TimeoutError, OSError) as exc:
                if isinstance(exc, TimeoutError):
                    what = f"no answer within {CONNECT_TIMEOUT:g} s"
                else:
                    what = os.strerror(exc.errno) if exc.errno else str(exc)
                raise ProbeError(f"cannot connect to {ip} port {port} ({kind}, connection "
                                 f"{i + 1}): {what}") from None
            times[kind].append(established)
            if kind == "smcish":
                connect_ns.append(connected)
                modes[mode["mode"]] = modes.get(mode["mode"], 0) + 1
                if mode["reason"]:
                    reasons[mode["reason"]] = reasons.get(mode["reason"], 0) + 1
                if mode["device"]:
                    devices.add(mode["device"])
        i += 1
    out: dict[str, Any] = {"loop": _loop_name(),
                           "elapsed_s": round(time.perf_counter() - started, 3)}
    for kind in ("smcish", "tcp"):
        out[kind] = dict(_spread(times[kind][1:]), first_us=_us(times[kind][0]))
    out["smcish"]["connect_p50_us"] = _us(statistics.median(connect_ns[1:]))
    out["smcish"].update(modes=modes, reasons=reasons, devices=sorted(devices))
    out["ratio"] = {"setup_p50": round(out["smcish"]["p50_us"] / out["tcp"]["p50_us"], 3)}
    return out


def probe_target(report: Report, target: str, seconds: float, loop_kind: str,
                 device_spec: str | None) -> None:
    """``--probe HOST:PORT``: connection set-up only, smcish against plain asyncio, interleaved;
    nothing is ever written to the target (its protocol is unknown)."""
    from .config import Config

    settle_timeout = Config.from_env().handshake_timeout + 1.0
    probe: dict[str, Any] = {
        "kind": "target", "target": target, "loop": loop_kind, "seconds": seconds,
        "note": "connection set-up only (no byte is sent to a target); data-path gains are "
                "measured by the local-pair probe (doctor --probe without a target)"}
    report.probe = probe
    try:
        factory = _new_loop_factory(loop_kind)
        host, port = _parse_target(target)
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise ProbeError(f"cannot resolve {host} ({exc.strerror})") from None
        ip = str(infos[0][4][0])
        probe["address"] = [ip, port]
        with asyncio.Runner(loop_factory=factory) as runner:
            probe.update(runner.run(asyncio.wait_for(
                _target_setups(ip, port, seconds, device_spec, settle_timeout),
                seconds * 3 + 30)))
    except ProbeError as exc:
        _probe_failed(report, probe, str(exc))
        return
    except TimeoutError:
        _probe_failed(report, probe, f"the probe of {target} did not finish within "
                                     f"{seconds * 3 + 30:.0f} s")
        return
    smc, tcp = probe["smcish"], probe["tcp"]
    n = smc["count"] + 1
    tcp_n = smc["modes"].get("tcp", 0)
    if tcp_n:
        reason = max(smc["reasons"], key=smc["reasons"].get) if smc["reasons"] else "INTERNAL"
        reasons = ", ".join(f"{k} x{v}" for k, v in smc["reasons"].items())
        report.add("probe", FAIL, f"{target}: {tcp_n} of {n} smcish connections ended in mode "
                                  f"tcp ({reasons})", reason)
    else:
        report.add("probe", OK, f"{target}: all {n} smcish connections in mode ism, device "
                                f"{', '.join(smc['devices']) or '?'}")
    r = probe["ratio"]["setup_p50"]

    def line(name: str, s: dict[str, Any]) -> str:
        return (f"      {name:<6} set-up p50 {s['p50_us']:8.1f} us  (p10 {s['p10_us']:.1f}, "
                f"p90 {s['p90_us']:.1f}; {s['count']} connections after the first, which took "
                f"{s['first_us']:.1f} us)")

    report.probe_lines.extend([
        f"PROBE connection set-up to {target} ({probe['address'][0]} port "
        f"{probe['address'][1]}): connect, wait until established, close; no byte sent; "
        f"{probe['loop']} loop, smcish and plain asyncio interleaved, {probe['elapsed_s']:.2f} s",
        line("smcish", smc) + f"; connect returned at p50 {smc['connect_p50_us']:.1f} us",
        line("TCP", tcp),
        f"      smcish/TCP set-up p50 {r:.2f}",
        "      data-path gains are measured by the local-pair probe: python -m smcish doctor "
        "--probe (no target)"])


def diagnose(target: str | None = None, device_spec: str | None = None, *, probe: bool = False,
             size: int | None = None, seconds: float | None = None,
             loop: str | None = None) -> Report:
    """Run every check, then (``probe``) the measurements. Raises ValueError for a malformed
    target or probe option."""
    if target is not None:
        _parse_target(target)
    if not probe and (size is not None or seconds is not None or loop is not None):
        raise ValueError("--size, --seconds and --loop go with --probe")
    size_b = 64 if size is None else size
    budget = 2.0 if seconds is None else seconds
    loop_kind = loop or "asyncio"
    if probe:
        if size is not None and target is not None:
            raise ValueError("--size is for the local-pair probe: nothing is sent to a target")
        if not 0 < size_b <= SIZE_MAX:
            raise ValueError(f"--size must be 1..{SIZE_MAX} bytes")
        if not SECONDS_MIN <= budget <= SECONDS_MAX:
            raise ValueError(f"--seconds must be {SECONDS_MIN:g}..{SECONDS_MAX:g}")
        if loop_kind not in LOOPS:
            raise ValueError(f"--loop must be one of {', '.join(LOOPS)}")
    report = Report(target=target)
    _config, resolved = _check_config(report, device_spec)
    device = _check_device(report, resolved)
    _check_limits(report, device)
    if target is not None:
        _check_target(report, device, target)
    if probe:
        if target is None:
            probe_local(report, size_b, budget, loop_kind, device_spec)
        else:
            probe_target(report, target, budget, loop_kind, device_spec)
    return report


def main(args: Any) -> int:
    try:
        report = diagnose(args.target, args.device, probe=getattr(args, "probe", False),
                          size=getattr(args, "size", None), seconds=getattr(args, "seconds", None),
                          loop=getattr(args, "loop", None))
    except ValueError as exc:
        print(f"smcish doctor: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.text())
    return report.exit_code
