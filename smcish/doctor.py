"""`python -m smcish doctor [HOST:PORT]`: would a connection from here use shared memory?

Checks, one line each (OK / WARN / FAIL, and for a FAIL or WARN the one-line remedy of
``stats.REMEDIES``): the configuration (SMCISH_NEGOTIATE), the device (the embedded runtime dir:
where, who owns it, its mode; or ismd: reachable, trusted, its quota), the limits (RLIMIT_NOFILE
and the fds in use, /dev/shm) and, for a target, which listening socket the kernel would hand a
connection from this host to (the same sock_diag oracle a real connection asks, through
``discovery.find_acceptor``) and whether that socket is advertised on our device. Nothing is sent
to the target: no connection is made.

Exit status: 0 when acceleration is possible (toward the target if one is given, else through
the device), 1 when not, 2 on bad arguments.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import socket
import stat
import sys
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

    def add(self, name: str, status: str, detail: str, reason: R | str | None = None,
            remedy: str | None = None) -> Check:
        rname = getattr(reason, "name", reason)
        if remedy is None and rname is not None:
            remedy = REMEDIES.get(rname)
        check = Check(name, status, detail, rname, remedy)
        self.checks.append(check)
        if status == FAIL and rname is not None and self.mode == "ism":
            self.mode, self.reason, self.remedy = "tcp", rname, remedy
        return check

    @property
    def exit_code(self) -> int:
        return 0 if self.mode == "ism" else 1

    def as_dict(self) -> dict:
        return {"target": self.target, "checks": [asdict(c) for c in self.checks],
                "verdict": {"mode": self.mode, "reason": self.reason, "remedy": self.remedy},
                "exit": self.exit_code}

    def text(self) -> str:
        lines = []
        for c in self.checks:
            line = f"{c.status:<4} {c.name}: {c.detail}"
            if c.status in (WARN, FAIL) and c.remedy:
                line += f"\n       remedy: {c.remedy}"
            lines.append(line)
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
    resolved = (config.device or os.environ.get("SMCISH_DEVICE") or "embedded").strip()
    return config, resolved


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
        report.add("device", OK, f"embedded, gid {device.gid.hex()}, runtime dir {device.dir} "
                                 f"(ours, private)")
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
    quota, total, used = status.get("quota"), status.get("total_memory"), status.get("used")
    mine = sum(r.get("size", 0) for r in status.get("regions", [])
               if r.get("owner_uid") == os.geteuid())
    detail = (f"ismd quota {quota} bytes per uid (we hold {mine}), device "
              f"{used}/{total} bytes used")
    if isinstance(quota, int) and quota - mine < (1 << 20) or \
            isinstance(total, int) and isinstance(used, int) and total - used < (1 << 20):
        report.add("quota", WARN, detail + ": under 1 MiB left", remedy=REMEDIES["QUOTA"])
    else:
        report.add("quota", OK, detail)


def _check_limits(report: Report, device: Any) -> None:
    from .linkgroup import GROUP_FDS

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
                                f"about {max(groups, 0)} link groups, then connections stay TCP "
                                "(NO_FD)", remedy=REMEDIES["NO_FD"])
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
    ip = addr[0]
    local = discovery.is_local(ip)
    netns = os.readlink("/proc/self/ns/net") if os.path.exists("/proc/self/ns/net") else "?"
    where = "an address of this network namespace" if local else "not an address of this namespace"
    report.add("target", INFO, f"{target} -> {ip} port {port}; {where} ({netns})")
    if device is None:
        return
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


def diagnose(target: str | None = None, device_spec: str | None = None) -> Report:
    """Run every check. Raises ValueError for a malformed target."""
    if target is not None:
        _parse_target(target)
    report = Report(target=target)
    _config, resolved = _check_config(report, device_spec)
    device = _check_device(report, resolved)
    _check_limits(report, device)
    if target is not None:
        _check_target(report, device, target)
    return report


def main(args: Any) -> int:
    try:
        report = diagnose(args.target, args.device)
    except ValueError as exc:
        print(f"smcish doctor: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(report.text())
    return report.exit_code
