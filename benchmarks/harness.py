"""Runs the benchmark: starts peer processes, interleaves configurations, repeats, and writes the reports.

Order of work: for each case, for each round, every configuration (loop x transport) once, A B C ... then
A B C again, so slow drifts of a shared machine hit every configuration alike. One server and one client
process per configuration live for the whole run (started lazily, restarted after a failure).

`main` is three steps: `make_plan` (the command line -> a `Plan`: the measurements in order, as `RunSpec`s),
`run_plan` (a `Plan` -> a `RunResult`: probes, peer processes, `Measurement`s; the only step that starts
processes) and `write_report` (a `RunResult` -> results.json, summary.md, plots, the printed summary).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from . import report, workloads
from .cases import CASES, FULL, QUICK, Case, CaseParams, Timing, Verify, select_cases
from .children import DEVNULL, ChildError, ChildExited, ChildTimeout, spawn_python
from .transports import DEFAULT_NOPOLL_ENV, LOOPS, Transport, build_transports, write_tls_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "smcish-bench/1"
READY_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 40.0
MAX_CONSECUTIVE_FAILURES = 3
# Scale cases: set-ups in flight at a time. All N at once overflows the listen backlog (SYN retransmits after
# 1 s) and, with smcish v2, the link group's extent growth (docs/benchmarks.md, "Scale cases").
SCALE_INFLIGHT = 128
ORDER = "for each case: for each round: every configuration in turn (A B C ... A B C)"


class PeerError(RuntimeError):
    """A measurement failed: `summary` is one line for tables, `detail` the traceback and peer log tails."""

    def __init__(self, summary: str, detail: str = "", partial: dict[str, Any] | None = None) -> None:
        super().__init__(summary)
        self.summary = summary
        self.detail = detail
        self.partial = partial  # figures the client measured although the case failed (scale: wrong modes)


# --- the records: plan -> run -> report --------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """A configuration: both peers on `loop`, connected through `transport`."""

    loop: str
    transport: Transport

    @property
    def name(self) -> str:
        return f"{self.loop}/{self.transport.name}"


@dataclass(frozen=True)
class RunSpec:
    """One measurement to make: `case` on `config` in round `round`, with the client running `params`."""

    case: Case
    config: Config
    round: int
    params: CaseParams
    timeout_s: float  # how long the harness waits for the client's answer before declaring the peers hung

    def __post_init__(self) -> None:
        if self.round < 0 or self.timeout_s <= 0:
            raise ValueError(f"run spec {self.case.name} on {self.config.name}: round {self.round}, "
                             f"timeout {self.timeout_s} s")
        if self.params.name != self.case.name:
            raise ValueError(f"run spec {self.case.name}: parameters of {self.params.name!r}")


@dataclass(frozen=True)
class Plan:
    """What a run does (`make_plan`): the measurements in order (`specs`) and the settings they share."""

    argv: tuple[str, ...]  # the command line, for results.json
    cases: tuple[Case, ...]
    transports: tuple[Transport, ...]  # the chosen ones, in --transports order
    loops: tuple[str, ...]
    configs: tuple[Config, ...]  # every transport x loop
    specs: tuple[RunSpec, ...]  # for each case: for each round: every configuration that runs the case
    timing: Timing
    quick: bool
    repeat: int
    verify: Verify
    scale_inflight: int
    nopoll_env: dict[str, str]  # environment of the smcish-nopoll peers (--nopoll-env)
    malloc_mode: str  # --malloc: "pinned" or "default"
    malloc_env: dict[str, str]  # what --malloc sets in every peer
    out_dir: str
    plots: bool
    quiet: bool

    @property
    def log_dir(self) -> str:
        return os.path.join(self.out_dir, "logs")

    def specs_of(self, case: Case) -> list[RunSpec]:
        return [spec for spec in self.specs if spec.case is case]


Status = Literal["ok", "failed", "unavailable"]


@dataclass(frozen=True)
class Measurement:
    """One measurement's record (a results.json "measurements" entry): its figures, or why it has none."""

    case: str
    config: str
    loop: str
    transport: str
    round: int
    status: Status = "ok"
    error: str | None = None  # one line: why it failed or is unavailable
    metrics: dict[str, float] = field(default_factory=dict)  # the case's figures (status "ok")
    details: dict[str, Any] = field(default_factory=dict)  # the rest of the client's answer: cpu, raw...
    error_detail: str | None = None  # a failure's traceback and the peers' log tails
    partial: dict[str, Any] | None = None  # what a failed case measured anyway (scale: wrong modes)
    wall_s: float | None = None  # the harness's wall time for it (None: not run)

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"case": self.case, "config": self.config, "loop": self.loop,
                                  "transport": self.transport, "round": self.round, "status": self.status,
                                  "error": self.error, "metrics": self.metrics}
        record.update(self.details)
        if self.error_detail is not None:
            record["error_detail"] = self.error_detail
        if self.partial is not None:
            record["partial"] = self.partial
        if self.wall_s is not None:
            record["wall_s"] = self.wall_s
        return record


@dataclass(frozen=True)
class RunResult:
    """What `run_plan` measured, and on what."""

    machine: dict[str, Any]  # describe_machine() at the start, plus "loadavg_end"
    probes: dict[str, dict[str, Any]]  # smcish transports: what a probe connection negotiated
    tls: dict[str, Any] | None  # the TLS certificate made (write_tls_files), {"unavailable": why}, or None
    measurements: tuple[Measurement, ...]
    interrupted: bool  # Ctrl-C: the measurements are those made until then
    duration_s: float

    @property
    def failures(self) -> list[Measurement]:
        return [m for m in self.measurements if m.status == "failed"]

    @property
    def exit_status(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failures else 0


# --- peer processes --------------------------------------------------------------------------------------

# glibc malloc, pinned in every peer process (--malloc pinned, the default). By default glibc adapts its
# mmap threshold and trims the top of the heap as a process runs, so whether the 64 KiB-1 MiB buffers of the
# receive path (asyncio's recv(256 KiB) result, uvloop's bytes per read, StreamReader's bytearray) come
# from reused heap memory, or from brk/mmap with fresh pages that fault in on every read, depends on
# where earlier allocations happened to land: a per-process lottery, fixed for a process's lifetime. A
# server that loses it spends its time in the kernel (2 brk per recv, 44 instead of 17 us per recv in
# strace) at 1/2 to 1/4 of the throughput, and since each configuration has its own long-lived processes,
# a whole configuration came out 2-4x slower (`smcish-fallback` 0.22x of `tcp`, or `tcp` 0.5x of
# `smcish-fallback`, depending on the code revision and the run). Fixed thresholds (no trimming, mmap only
# above 32 MiB) give every configuration the reused-heap behaviour. Variables already set are kept.
PINNED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 * 1024 * 1024), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def malloc_env(mode: str) -> dict[str, str]:
    """The malloc variables the peers get for --malloc `mode` ("pinned" or "default"), after os.environ."""
    if mode == "default":
        return {}
    return {k: os.environ.get(k, v) for k, v in PINNED_MALLOC_ENV.items()}


def _peer_env(transport: Transport, nopoll_env: dict[str, str],
              malloc: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(malloc_env("pinned") if malloc is None else malloc)
    env.update(transport.env)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["SMCISH_BENCH_NOPOLL_ENV"] = json.dumps(nopoll_env)
    return env


def _ready_line(line: str) -> bool:
    """A peer's ready line (benchmarks.peers): {"ready": true, ...}, or {"ready": false, "error": ...}."""
    message = json.loads(line)
    return isinstance(message, dict) and "ready" in message


class _Peer:
    """One peer process (a `children.Child`): started, its ready line read (the handshake, at most
    READY_TIMEOUT_S), then JSON lines both ways, every read bounded. Its stderr is appended to its log
    file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: str) -> None:
        self.role = args[0]
        self.log_path = log_path
        self.log = open(log_path, "ab")  # noqa: SIM115 - the peer's stderr while it lives; closed in stop()
        try:
            self.child = spawn_python(module="benchmarks.peers", args=args, env=env, stderr=self.log,
                                      name=f"benchmarks.peers {self.role}", handshake=_ready_line,
                                      handshake_timeout=READY_TIMEOUT_S)
        except ChildError as exc:  # the child is stopped already
            self.log.close()
            summary = (f"{self.role}: no ready line within {READY_TIMEOUT_S:.0f} s (hung?)"
                       if isinstance(exc, ChildTimeout) else f"{self.role} exited before its ready line")
            raise PeerError(summary, f"{exc}\n{self.log_tail()}") from None
        except BaseException:
            self.log.close()
            raise
        assert self.child.hello is not None  # the handshake matched it
        self.ready: dict[str, Any] = json.loads(self.child.hello)

    def read(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.child.read_line(timeout)
        except ChildTimeout:
            raise PeerError(f"{self.role}: no answer within {timeout:.0f} s (hung?)",
                            self.log_tail()) from None
        except ChildExited:
            with contextlib.suppress(ChildTimeout):
                self.child.wait(5)
            raise PeerError(f"{self.role} exited with status {self.child.proc.returncode}",
                            self.log_tail()) from None
        message: dict[str, Any] = json.loads(line)
        return message

    def send(self, message: dict[str, Any]) -> None:
        self.child.send_json(message)

    def log_tail(self, limit: int = 1500) -> str:
        if not self.log.closed:
            self.log.flush()
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - limit))
                tail = f.read().decode(errors="replace").strip()
        except OSError:
            return ""
        return f"--- {os.path.basename(self.log_path)} (tail) ---\n{tail}" if tail else ""

    def stop(self) -> None:
        """Close its stdin (a peer's signal to end), at most 5 s to exit, then SIGTERM, SIGKILL (5 s each)."""
        try:
            self.child.finish(grace=5.0, timeout=5.0)
        finally:
            self.log.close()


class PeerPair:
    """The server and client processes of one configuration."""

    def __init__(self, config: Config, log_dir: str, nopoll_env: dict[str, str],
                 malloc: dict[str, str] | None = None, extra_args: tuple[str, ...] = (),
                 log_tag: str = "") -> None:
        self.config = config
        self.log_dir = log_dir
        self.env = _peer_env(config.transport, nopoll_env, malloc)
        self.extra_args = list(extra_args)  # e.g. ["--scale"]: both peers
        self.log_tag = log_tag
        self.server: _Peer | None = None
        self.client: _Peer | None = None

    def start(self) -> None:
        base = ["--transport", self.config.transport.name, "--loop", self.config.loop, *self.extra_args]
        stem = os.path.join(self.log_dir, self.config.name.replace("/", "-") + self.log_tag)
        self.server = _Peer(["server", *base], self.env, stem + ".server.log")
        ready = self.server.ready
        if not ready.get("ready"):
            raise PeerError("server did not start: " + _last_line(ready.get("error")),
                            ready.get("error") or "")
        self.client = _Peer(["client", *base, "--server", json.dumps(ready)], self.env, stem + ".client.log")
        ready = self.client.ready
        if not ready.get("ready"):
            raise PeerError("client did not start: " + _last_line(ready.get("error")),
                            ready.get("error") or "")

    def run(self, params: CaseParams, timeout_s: float) -> dict[str, Any]:
        """One measurement: the client's result (workloads.run_case), or PeerError."""
        if self.client is None or self.server is None:
            raise PeerError("the peers are not running (PeerPair.start() first)")
        self.client.send({"cmd": "run", "case": params.to_json(), "timeout_s": max(1.0, timeout_s - 5)})
        answer = self.client.read(timeout_s)
        if not answer["ok"]:
            raise PeerError(_last_line(answer["error"]), answer["error"] + "\n" + self.server.log_tail(),
                            answer.get("partial"))
        result: dict[str, Any] = answer["result"]
        return result

    def stop(self) -> None:
        client, server = self.client, self.server
        self.client = self.server = None
        try:
            if client is not None:
                client.stop()
        finally:
            if server is not None:
                server.stop()


def _last_line(text: str | None) -> str:
    """The exception line of a traceback (its last non-empty line)."""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown error"


# --- machine and availability ----------------------------------------------------------------------------

def describe_machine() -> dict[str, Any]:
    cpu_model, flags = "unknown", ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and cpu_model == "unknown":
                    cpu_model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = value
    except OSError:
        pass
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = None
    return {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "virtualized": "hypervisor" in flags.split(),
        "memory_gib": round(mem_gib, 1) if mem_gib else None,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "uvloop": _version("uvloop"),
        "matplotlib": _version("matplotlib"),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "git": _git_revision(),
        "source": _source_state(),
    }


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+dirty" if dirty else "")) or None


def _source_state() -> dict[str, Any] | None:
    """Which uncommitted code of smcish/ and ism_backend/ was measured: changed files and a hash of the diff
    (the tree may be edited while a run goes on; two runs with the same hash measured the same code)."""
    try:
        diff = subprocess.run(["git", "-C", ROOT, "diff", "HEAD", "--", "smcish", "ism_backend"],
                              capture_output=True, timeout=10).stdout
        names = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "smcish", "ism_backend"],
                               capture_output=True, text=True, timeout=10).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"diff_sha256": hashlib.sha256(diff).hexdigest()[:16] if diff else None,
            "changed": [line[3:] for line in names if line.strip()]}


def probe_transports(chosen: list[Transport], nopoll_env: dict[str, str]) -> dict[str, dict[str, Any]]:
    """For smcish transports: is smcish importable, and what does one loopback connection negotiate?
    The probes run at the same time, each given PROBE_TIMEOUT_S from when its answer is awaited."""
    results = {}
    with contextlib.ExitStack() as stack:
        probes = {}
        for transport in chosen:
            if transport.needs_smcish:
                probes[transport.name] = stack.enter_context(spawn_python(
                    module="benchmarks.peers", args=["probe", "--transport", transport.name],
                    env=_peer_env(transport, nopoll_env), stdin=DEVNULL, name=f"probe {transport.name}"))
        for name, probe in probes.items():
            try:
                _, out = probe.output(PROBE_TIMEOUT_S)
                results[name] = json.loads(out.strip().splitlines()[-1])
            except ChildTimeout:
                results[name] = {"available": True, "error": f"probe timed out ({PROBE_TIMEOUT_S:g} s)"}
            except (ValueError, IndexError):
                results[name] = {"available": False,
                                 "reason": f"probe crashed: {probe.stderr_text(None).strip()[-500:]}"}
            finally:
                probe.stop()  # killed if it timed out; reaped either way
    return results


def unavailable_reason(config: Config, probes: dict[str, dict[str, Any]]) -> str | None:
    """Why `config` cannot run at all (uvloop missing, smcish unavailable), or None."""
    if config.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        return "uvloop is not installed (pip install uvloop)"
    probe = probes.get(config.transport.name)
    if probe is not None and not probe.get("available"):
        return probe.get("reason") or "smcish unavailable"
    return None


# --- progress --------------------------------------------------------------------------------------------

class Progress:
    def __init__(self, total: int, quiet: bool) -> None:
        self.total, self.done, self.quiet = total, 0, quiet
        self.start = time.monotonic()

    def line(self, spec: RunSpec, repeat: int, measurement: Measurement) -> None:
        self.done += 1
        if self.quiet:
            return
        case = spec.case
        if measurement.status == "ok":
            metrics = measurement.metrics
            shown = "  ".join(f"{m.label} {report.fmt(metrics[m.key])}" for m in case.metrics[:2])
            mode = measurement.details["modes"]["client"]
            if set(mode) != {"none"}:
                shown += f"  mode {','.join(mode)}"
        else:
            shown = f"{measurement.status.upper()}: {(measurement.error or '')[:100]}"
        elapsed = time.monotonic() - self.start
        print(f"[{self.done:>4}/{self.total} {elapsed:6.1f}s] {case.name:<28} r{spec.round + 1}/{repeat} "
              f"{spec.config.name:<22} {shown}", file=sys.stderr, flush=True)


# --- plan ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="smcish against asyncio TCP and Unix sockets, on asyncio and uvloop.")
    parser.add_argument("--cases",
                        help="comma-separated case names, prefixes or globs (default: all); see --list")
    parser.add_argument("--transports",
                        help="comma-separated, default: tcp,unix,smcish,smcish-fallback,smcish-nopoll"
                             " (smcish-nopoll runs latency cases only unless named here)")
    parser.add_argument("--loops", default=",".join(LOOPS),
                        help="comma-separated: asyncio,uvloop (default both)")
    parser.add_argument("--quick", action="store_true",
                        help="short phases: every case in under a minute (noisy)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="interleaved rounds per measurement (default 3)")
    parser.add_argument("--out", help="output directory (default bench-results/<UTC time>)")
    parser.add_argument("--verify", choices=("sample", "full"), default="sample",
                        help="stream receivers check 3 bytes per received chunk (sample) or every byte "
                             "(full)")
    parser.add_argument("--nopoll-env", action="append", metavar="VAR=VALUE",
                        help="environment that turns smcish busy-poll off for smcish-nopoll (default "
                             + " ".join(f"{k}={v}" for k, v in DEFAULT_NOPOLL_ENV.items()) + ")")
    parser.add_argument("--malloc", choices=("pinned", "default"), default="pinned",
                        help="pinned (default): fixed glibc malloc thresholds in every peer ("
                             + " ".join(f"{k}={v}" for k, v in PINNED_MALLOC_ENV.items())
                             + "), so no configuration loses the heap-layout lottery; default: glibc's "
                               "adaptive ones")
    parser.add_argument("--scale-inflight", type=int, default=SCALE_INFLIGHT, metavar="N",
                        help="scale cases: connection set-ups in flight at a time "
                             f"(default {SCALE_INFLIGHT}; 0: all N at once)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", "-q", action="store_true", help="no per-measurement progress lines")
    parser.add_argument("--list", action="store_true", help="list cases and transports, then exit")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.scale_inflight < 0:
        parser.error("--scale-inflight must be 0 (all at once) or more")
    return args


def nopoll_env_of(args: argparse.Namespace) -> dict[str, str]:
    """--nopoll-env VAR=VALUE ... as a dict (default DEFAULT_NOPOLL_ENV).

    Raises:
        ValueError: an item without "=".
    """
    if not args.nopoll_env:
        return dict(DEFAULT_NOPOLL_ENV)
    env = {}
    for item in args.nopoll_env:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--nopoll-env {item!r}: expected VAR=VALUE")
        env[name] = value
    return env


def list_text(transports: dict[str, Transport]) -> str:
    """--list: every case and transport, one a line."""
    lines = []
    for case in CASES:
        note = "  [opt-in: --cases scale]" if case.opt_in else ""
        lines.append(f"{case.name:<30} {case.title}{note}")
    lines.append("")
    lines += [f"{t.name:<30} {t.description}" for t in transports.values()]
    return "\n".join(lines)


def runs_case(config: Config, case: Case, explicit: set[str]) -> bool:
    """Whether `config` measures `case`: always if its transport was named in --transports (`explicit`),
    otherwise if the case runs on the transport and the transport runs cases of that kind by default."""
    if config.transport.name in explicit:
        return True
    if case.transports is not None and config.transport.name not in case.transports:
        return False
    kinds = config.transport.kinds
    return kinds is None or case.kind in kinds


def make_plan(args: argparse.Namespace, argv: list[str] | None = None) -> Plan:
    """The command line (`parse_args`) -> the run's measurements in order and its settings. Starts nothing.

    `argv`: the command line as given, for results.json (default sys.argv[1:]).

    Raises:
        ValueError: an unknown case, transport or loop, or a bad --nopoll-env.
    """
    nopoll_env = nopoll_env_of(args)
    all_transports = build_transports(nopoll_env)
    cases = select_cases(args.cases)
    names = [n.strip() for n in (args.transports or ",".join(all_transports)).split(",") if n.strip()]
    unknown = [n for n in names + args.loops.split(",") if n not in all_transports and n not in LOOPS]
    if unknown:
        raise ValueError(f"unknown transport or loop {', '.join(unknown)}; see --list")
    loops = [n.strip() for n in args.loops.split(",") if n.strip()]
    explicit = set(names) if args.transports else set()
    timing = QUICK if args.quick else FULL
    verify: Verify = "full" if args.verify == "full" else "sample"
    configs = [Config(loop, all_transports[name]) for name in names for loop in loops]
    specs: list[RunSpec] = []
    for case in cases:
        params = case.params(timing, verify, args.scale_inflight)
        timeout_s = case.timeout_s(timing)
        for rnd in range(args.repeat):
            specs += [RunSpec(case, config, rnd, params, timeout_s) for config in configs
                      if runs_case(config, case, explicit)]
    out_dir = os.path.abspath(args.out or os.path.join(
        "bench-results", dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")))
    return Plan(argv=tuple(sys.argv[1:] if argv is None else argv), cases=tuple(cases),
                transports=tuple(all_transports[name] for name in names), loops=tuple(loops),
                configs=tuple(configs), specs=tuple(specs), timing=timing, quick=args.quick,
                repeat=args.repeat, verify=verify, scale_inflight=args.scale_inflight, nopoll_env=nopoll_env,
                malloc_mode=args.malloc, malloc_env=malloc_env(args.malloc), out_dir=out_dir,
                plots=not args.no_plots, quiet=args.quiet)


# --- run -------------------------------------------------------------------------------------------------

def run_plan(plan: Plan) -> RunResult:
    """Make the plan's measurements: probe the smcish transports, make the TLS certificate if a TLS case runs,
    then every `RunSpec` in order on the configurations' peer processes (started when first needed, stopped
    at the end). Prints the header, progress and each case's table to stderr. Ctrl-C ends the run early
    (`RunResult.interrupted`) with what was measured."""
    os.makedirs(plan.log_dir, exist_ok=True)
    machine = describe_machine()
    # one connection each: malloc settings do not matter
    probes = probe_transports(list(plan.transports), plan.nopoll_env)
    unavailable = {c.name: why for c in plan.configs if (why := unavailable_reason(c, probes)) is not None}
    # TLS cases: one CA and server certificate per run, made here and handed to the peers by path
    tls_dir, tls_settings, tls_error = None, None, None
    if any(spec.case.tls and spec.config.name not in unavailable for spec in plan.specs):
        tls_dir = tempfile.mkdtemp(prefix="smcish-bench-tls-")
        try:
            tls_settings = write_tls_files(tls_dir)
        except ImportError as exc:
            tls_error = f"TLS cases need trustme (pip install trustme, or -e '.[bench]'): {exc}"
            shutil.rmtree(tls_dir, ignore_errors=True)
            tls_dir = None
    runnable = [spec for spec in plan.specs
                if spec.config.name not in unavailable and not (spec.case.tls and tls_error)]
    estimate = sum(spec.case.estimate_s(plan.timing) for spec in runnable) + 0.6 * len(plan.configs)
    _print_header(plan, machine, probes, unavailable, estimate)
    if tls_error:
        print(f"  TLS cases unavailable: {tls_error}\n", file=sys.stderr, flush=True)
    elif tls_settings:
        print(f"  TLS cases: certificate for {tls_settings['server_hostname']!r} "
              f"({tls_settings['key_type']}, {tls_settings['generator']}, in {tls_dir}), verified by the "
              "client\n", file=sys.stderr, flush=True)

    session = _Session(plan, unavailable, tls_dir, tls_error)
    progress = Progress(len(runnable), plan.quiet)
    measurements: list[Measurement] = []
    interrupted = False
    started = time.monotonic()
    try:
        for case in plan.cases:
            for spec in plan.specs_of(case):
                measurement = session.measure(spec)
                if measurement is None:
                    continue
                measurements.append(measurement)
                if measurement.status != "unavailable":
                    progress.line(spec, plan.repeat, measurement)
            if not plan.quiet:
                summary = report.summarize_cases([case.name], [m.to_json() for m in measurements])
                print("\n" + report.case_table(case, summary[case.name]) + "\n", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing what was measured so far", file=sys.stderr)
    finally:
        session.close()
        if tls_dir:
            shutil.rmtree(tls_dir, ignore_errors=True)
    duration_s = round(time.monotonic() - started, 1)
    machine["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return RunResult(machine=machine, probes=probes,
                     tls=tls_settings or ({"unavailable": tls_error} if tls_error else None),
                     measurements=tuple(measurements), interrupted=interrupted, duration_s=duration_s)


class _Session:
    """run_plan's peer processes and each configuration's health."""

    def __init__(self, plan: Plan, unavailable: dict[str, str], tls_dir: str | None,
                 tls_error: str | None) -> None:
        self.plan = plan
        self.unavailable = unavailable  # config name: why it cannot run at all
        self.tls_dir = tls_dir
        self.tls_error = tls_error
        self.pairs: dict[str, PeerPair] = {}
        self.dead: dict[str, str] = {}  # config name: why the rest of its measurements are skipped
        self.failures_in_a_row: Counter[str] = Counter()

    def measure(self, spec: RunSpec) -> Measurement | None:
        """One measurement; None for a configuration that is unavailable, after its first round."""
        case, config = spec.case, spec.config
        record = Measurement(case.name, config.name, config.loop, config.transport.name, spec.round)
        unavailable = self.unavailable.get(config.name) or (self.tls_error if case.tls else None)
        if unavailable:
            if spec.round:
                return None  # one "unavailable" entry per case is enough
            return dataclasses.replace(record, status="unavailable", error=unavailable)
        dead = self.dead.get(config.name)
        if dead is not None:
            return dataclasses.replace(
                record, status="failed", error=f"not run: this configuration kept failing ({dead[:80]})")
        t0 = time.monotonic()
        try:
            result = self._run(spec)
        except (PeerError, OSError, ValueError) as exc:
            summary = exc.summary if isinstance(exc, PeerError) else repr(exc)
            partial = exc.partial if isinstance(exc, PeerError) else None
            self._failed(spec, summary)
            return dataclasses.replace(record, status="failed", error=summary,
                                       error_detail=exc.detail if isinstance(exc, PeerError) else "",
                                       partial=partial or None, wall_s=round(time.monotonic() - t0, 3))
        self.failures_in_a_row[config.name] = 0
        metrics = result.pop("metrics", record.metrics)
        return dataclasses.replace(record, metrics=metrics, details=result,
                                   wall_s=round(time.monotonic() - t0, 3))

    def _run(self, spec: RunSpec) -> dict[str, Any]:
        config, plan = spec.config, self.plan
        if spec.case.kind == "scale":
            # fresh processes: the baseline is a process that never had a connection, and a run of
            # 10,000 connections leaves nothing behind for the next measurement
            fresh = PeerPair(config, plan.log_dir, plan.nopoll_env, plan.malloc_env, extra_args=("--scale",),
                             log_tag=".scale")
            try:
                fresh.start()
                return fresh.run(spec.params, spec.timeout_s)
            finally:
                fresh.stop()
        pair = self.pairs.get(config.name)
        if pair is None:
            pair = self.pairs[config.name] = PeerPair(
                config, plan.log_dir, plan.nopoll_env, plan.malloc_env,
                extra_args=("--tls-dir", self.tls_dir) if self.tls_dir else ())
            pair.start()
        return pair.run(spec.params, spec.timeout_s)

    def _failed(self, spec: RunSpec, summary: str) -> None:
        name = spec.config.name
        pair = self.pairs.pop(name, None)
        if pair is not None:
            pair.stop()  # start fresh: a failed case can leave connections or the loop in a bad state
        self.failures_in_a_row[name] += 1
        # A wrong mode means the configuration is broken (no device...), except in a scale case (fresh
        # processes each time), where a few connections out of thousands falling back is a finding about that
        # case and round, not about the configuration: the other rounds still run.
        if "ModeMismatch" in summary and spec.case.kind == "scale":
            self.failures_in_a_row[name] -= 1
        elif "ModeMismatch" in summary or self.failures_in_a_row[name] >= MAX_CONSECUTIVE_FAILURES:
            self.dead[name] = summary

    def close(self) -> None:
        for pair in self.pairs.values():
            pair.stop()


def _print_header(plan: Plan, machine: dict[str, Any], probes: dict[str, dict[str, Any]],
                  unavailable: dict[str, str], estimate: float) -> None:
    err = sys.stderr
    all_transports_expect = {c.transport.name: c.transport.expect_mode for c in plan.configs}
    print(f"smcish benchmarks: {machine['cpu_model']}, {machine['cores']} cores, Linux {machine['kernel']}, "
          f"Python {machine['python']}, uvloop {machine['uvloop']}, "
          f"load {machine['loadavg_start'][0]:.2f}", file=err)
    mode = "QUICK (short phases, noisy: for development only)" if plan.quick else "full"
    print(f"mode {mode}; {len(plan.cases)} cases x {plan.repeat} rounds; warm-up {plan.timing.warmup_s} s + "
          f"{plan.timing.duration_s} s per measurement; about {estimate:.0f} s; output {plan.out_dir}",
          file=err)
    malloc = plan.malloc_env
    if malloc:
        shown = f"({' '.join(f'{k}={v}' for k, v in malloc.items())})"
    else:
        shown = "(glibc's adaptive thresholds)"
    print(f"  peers' malloc: {plan.malloc_mode} {shown}", file=err)
    for name, probe in probes.items():
        if not probe.get("available"):
            print(f"  {name}: unavailable ({probe.get('reason')})", file=err)
        elif probe.get("error"):
            print(f"  {name}: probe connection FAILED, its cases will fail: {_last_line(probe['error'])}",
                  file=err)
        else:
            expect = all_transports_expect.get(name)
            warn = "" if probe.get("mode") == expect else f"  <-- expected {expect!r}: its cases will FAIL"
            print(f"  {name}: smcish {probe.get('version')}, probe connection mode {probe.get('mode')!r}"
                  f" (reason {probe.get('reason')}){warn}", file=err)
            print(f"      config {probe.get('config')}", file=err)
    runnable = [c.name for c in plan.configs if c.name not in unavailable]
    print(f"  configurations: {', '.join(runnable) or 'none'}", file=err)
    skipped = [c.name for c in plan.configs if c.name in unavailable]
    if skipped:
        print(f"  unavailable: {', '.join(skipped)}", file=err)
    print(file=err, flush=True)


# --- report ----------------------------------------------------------------------------------------------

def results_document(plan: Plan, result: RunResult) -> dict[str, Any]:
    """results.json without "plots": the plan's settings, what was measured, the summary and the target
    verdicts."""
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "argv": list(plan.argv),
        "machine": result.machine,
        "settings": {"quick": plan.quick, "repeat": plan.repeat, "verify": plan.verify,
                     "scale_inflight": plan.scale_inflight,
                     "timing": dataclasses.asdict(plan.timing),
                     "workload": dict(workloads.SETTINGS), "loops": list(plan.loops),
                     "transports": [t.name for t in plan.transports],
                     "malloc": {"mode": plan.malloc_mode, "env": plan.malloc_env},
                     "tls": result.tls,
                     "order": ORDER},
        "transports": {t.name: {"description": t.description, "env": t.env, "expect_mode": t.expect_mode,
                                "probe": result.probes.get(t.name)} for t in plan.transports},
        "cases": [{"name": c.name, "kind": c.kind, "api": c.api, "size": c.size, "conns": c.conns,
                   "tls": c.tls, "title": c.title, "metrics": [m.key for m in c.metrics],
                   "primary": c.primary.key, "higher_is_better": c.primary.higher_is_better}
                  for c in plan.cases],
        "measurements": [m.to_json() for m in result.measurements],
        "interrupted": result.interrupted,
        "duration_s": result.duration_s,
    }
    doc["summary"] = report.summarize(doc)
    doc["targets"] = report.evaluate_targets(doc)
    return doc


def write_report(plan: Plan, result: RunResult) -> dict[str, Any]:
    """Write results.json, summary.md and the plots to the plan's output directory, print the tables, the
    targets and the failures to stdout. Returns the results.json document."""
    doc = results_document(plan, result)
    out_dir = plan.out_dir
    plot_files, plot_note = report.plots(doc, out_dir) if plan.plots else ([], "plots skipped (--no-plots)")
    doc["plots"] = plot_files
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(report.markdown(doc, plot_files))

    print(report.final_text(doc))
    failures = [m.to_json() for m in result.failures]
    if failures:
        print(f"\nFAILED: {len(failures)} measurement(s) failed; they are NOT in the figures above:")
        for error, where in report.group_errors(failures).items():
            print(f"  {report.where_text(where)}:\n    {error}")
        print(f"  full errors: {os.path.join(out_dir, 'results.json')}, peer logs: {plan.log_dir}")
    if plot_note:
        print(plot_note)
    print(f"\nwrote {out_dir}/results.json, summary.md{''.join(', ' + p for p in plot_files)} "
          f"in {doc['duration_s']} s")
    return doc


# --- main ------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.list:
            print(list_text(build_transports(nopoll_env_of(args))))
            return 0
        plan = make_plan(args, argv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = run_plan(plan)
    write_report(plan, result)
    return result.exit_status
