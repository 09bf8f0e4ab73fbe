"""Runs the benchmark: starts peer processes, interleaves configurations, repeats, and writes the reports.

Order of work: for each case, for each round, every configuration (loop x transport) once, A B C ... then
A B C again, so slow drifts of a shared machine hit every configuration alike. One server and one client
process per configuration live for the whole run (started lazily, restarted after a failure).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from . import report, workloads
from .cases import CASES, FULL, QUICK, Case, Timing, select_cases
from .transports import DEFAULT_NOPOLL_ENV, LOOPS, Transport, build_transports, write_tls_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = "smcish-bench/1"
READY_TIMEOUT_S = 30.0
MAX_CONSECUTIVE_FAILURES = 3
# Scale cases: set-ups in flight at a time. All N at once overflows the listen backlog (SYN retransmits after
# 1 s) and, with smcish v2, the link group's extent growth (docs/benchmarks.md, "Scale cases").
SCALE_INFLIGHT = 128


class PeerError(RuntimeError):
    """A measurement failed: `summary` is one line for tables, `detail` the traceback and peer log tails."""

    def __init__(self, summary: str, detail: str = "", partial: dict | None = None):
        super().__init__(summary)
        self.summary = summary
        self.detail = detail
        self.partial = partial  # figures the client measured although the case failed (scale: wrong modes)


@dataclass
class Config:
    loop: str
    transport: Transport
    unavailable: str | None = None  # why this configuration cannot run at all
    dead: str | None = None  # why the rest of its measurements are skipped
    failures_in_a_row: int = 0

    @property
    def name(self) -> str:
        return f"{self.loop}/{self.transport.name}"


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


def _peer_env(transport: Transport, nopoll_env: dict[str, str], malloc: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env.update(malloc_env("pinned") if malloc is None else malloc)
    env.update(transport.env)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["SMCISH_BENCH_NOPOLL_ENV"] = json.dumps(nopoll_env)
    return env


class _Peer:
    """One peer process and a thread that turns its protocol lines into a queue."""

    def __init__(self, args: list[str], env: dict, log_path: str):
        self.role = args[0]
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "benchmarks.peers", *args], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def read(self, timeout: float) -> dict:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise PeerError(f"{self.role}: no answer within {timeout:.0f} s (hung?)", self.log_tail()) from None
        if line is None:
            self.proc.wait(5)
            raise PeerError(f"{self.role} exited with status {self.proc.returncode}", self.log_tail())
        return json.loads(line)

    def send(self, message: dict) -> None:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def log_tail(self, limit: int = 1500) -> str:
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
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by its Popen handle
            self.proc.wait(5)
        self.log.close()


class PeerPair:
    """The server and client processes of one configuration."""

    def __init__(self, config: Config, log_dir: str, nopoll_env: dict[str, str], malloc: dict[str, str] | None = None,
                 extra_args: tuple[str, ...] = (), log_tag: str = ""):
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
        ready = self.server.read(READY_TIMEOUT_S)
        if not ready.get("ready"):
            raise PeerError("server did not start: " + _last_line(ready.get("error")), ready.get("error") or "")
        self.client = _Peer(["client", *base, "--server", json.dumps(ready)], self.env, stem + ".client.log")
        ready = self.client.read(READY_TIMEOUT_S)
        if not ready.get("ready"):
            raise PeerError("client did not start: " + _last_line(ready.get("error")), ready.get("error") or "")

    def run(self, params: dict, timeout_s: float) -> dict:
        self.client.send({"cmd": "run", "case": params, "timeout_s": max(1.0, timeout_s - 5)})
        answer = self.client.read(timeout_s)
        if not answer["ok"]:
            raise PeerError(_last_line(answer["error"]), answer["error"] + "\n" + self.server.log_tail(),
                            answer.get("partial"))
        return answer["result"]

    def stop(self) -> None:
        for peer in (self.client, self.server):
            if peer is not None:
                peer.stop()
        self.client = self.server = None


def _last_line(text: str | None) -> str:
    """The exception line of a traceback (its last non-empty line)."""
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "unknown error"


# --- machine and availability ----------------------------------------------------------------------------

def describe_machine() -> dict:
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
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
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
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+dirty" if dirty else "")) or None


def _source_state() -> dict | None:
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


def probe_transports(chosen: list[Transport], nopoll_env: dict[str, str]) -> dict[str, dict]:
    """For smcish transports: is smcish importable, and what does one loopback connection negotiate?"""
    procs = {}
    for transport in chosen:
        if transport.needs_smcish:
            procs[transport.name] = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.peers", "probe", "--transport", transport.name],
                cwd=ROOT, env=_peer_env(transport, nopoll_env), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True)
    results = {}
    for name, proc in procs.items():
        try:
            out, err = proc.communicate(timeout=40)
            results[name] = json.loads(out.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            results[name] = {"available": True, "error": "probe timed out (40 s)"}
        except (ValueError, IndexError):
            results[name] = {"available": False, "reason": f"probe crashed: {err.strip()[-500:]}"}
    return results


# --- progress --------------------------------------------------------------------------------------------

class Progress:
    def __init__(self, total: int, quiet: bool):
        self.total, self.done, self.quiet = total, 0, quiet
        self.start = time.monotonic()

    def line(self, case: Case, config: str, rnd: int, repeat: int, record: dict) -> None:
        self.done += 1
        if self.quiet:
            return
        if record["status"] == "ok":
            metrics = record["metrics"]
            shown = "  ".join(f"{m.label} {report.fmt(metrics[m.key])}" for m in case.metrics[:2])
            mode = record["modes"]["client"]
            if set(mode) != {"none"}:
                shown += f"  mode {','.join(mode)}"
        else:
            shown = f"{record['status'].upper()}: {record['error'][:100]}"
        elapsed = time.monotonic() - self.start
        print(f"[{self.done:>4}/{self.total} {elapsed:6.1f}s] {case.name:<28} r{rnd + 1}/{repeat} {config:<22} {shown}",
              file=sys.stderr, flush=True)


# --- main ------------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description="smcish against asyncio TCP and Unix sockets, on asyncio and uvloop.")
    parser.add_argument("--cases", help="comma-separated case names, prefixes or globs (default: all); see --list")
    parser.add_argument("--transports", help="comma-separated, default: tcp,unix,smcish,smcish-fallback,smcish-nopoll"
                                             " (smcish-nopoll runs latency cases only unless named here)")
    parser.add_argument("--loops", default=",".join(LOOPS), help="comma-separated: asyncio,uvloop (default both)")
    parser.add_argument("--quick", action="store_true", help="short phases: every case in under a minute (noisy)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds per measurement (default 3)")
    parser.add_argument("--out", help="output directory (default bench-results/<UTC time>)")
    parser.add_argument("--verify", choices=("sample", "full"), default="sample",
                        help="stream receivers check 3 bytes per received chunk (sample) or every byte (full)")
    parser.add_argument("--nopoll-env", action="append", metavar="VAR=VALUE",
                        help="environment that turns smcish busy-poll off for smcish-nopoll (default "
                             + " ".join(f"{k}={v}" for k, v in DEFAULT_NOPOLL_ENV.items()) + ")")
    parser.add_argument("--malloc", choices=("pinned", "default"), default="pinned",
                        help="pinned (default): fixed glibc malloc thresholds in every peer ("
                             + " ".join(f"{k}={v}" for k, v in PINNED_MALLOC_ENV.items())
                             + "), so no configuration loses the heap-layout lottery; default: glibc's adaptive ones")
    parser.add_argument("--scale-inflight", type=int, default=SCALE_INFLIGHT, metavar="N",
                        help=f"scale cases: connection set-ups in flight at a time (default {SCALE_INFLIGHT}; "
                             "0: all N at once)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--quiet", "-q", action="store_true", help="no per-measurement progress lines")
    parser.add_argument("--list", action="store_true", help="list cases and transports, then exit")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.scale_inflight < 0:
        parser.error("--scale-inflight must be 0 (all at once) or more")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nopoll_env = (dict(item.split("=", 1) for item in args.nopoll_env) if args.nopoll_env else dict(DEFAULT_NOPOLL_ENV))
    all_transports = build_transports(nopoll_env)
    if args.list:
        for case in CASES:
            note = "  [opt-in: --cases scale]" if case.opt_in else ""
            print(f"{case.name:<30} {case.title}{note}")
        print()
        for t in all_transports.values():
            print(f"{t.name:<30} {t.description}")
        return 0
    try:
        cases = select_cases(args.cases)
        names = [n.strip() for n in (args.transports or ",".join(all_transports)).split(",") if n.strip()]
        unknown = [n for n in names + args.loops.split(",") if n not in all_transports and n not in LOOPS]
        if unknown:
            raise ValueError(f"unknown transport or loop {', '.join(unknown)}; see --list")
        loops = [n.strip() for n in args.loops.split(",") if n.strip()]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    explicit = set(names) if args.transports else set()
    timing = QUICK if args.quick else FULL
    out_dir = os.path.abspath(args.out or os.path.join(
        "bench-results", dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")))
    log_dir = os.path.join(out_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)

    chosen = [all_transports[n] for n in names]
    machine = describe_machine()
    malloc = malloc_env(args.malloc)
    probes = probe_transports(chosen, nopoll_env)  # one connection each: malloc settings do not matter
    configs = []
    for transport in chosen:
        for loop in loops:
            config = Config(loop, transport)
            if loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
                config.unavailable = "uvloop is not installed (pip install uvloop)"
            elif transport.name in probes and not probes[transport.name].get("available"):
                config.unavailable = probes[transport.name].get("reason") or "smcish unavailable"
            configs.append(config)

    def runs_case(config: Config, case: Case) -> bool:
        if config.transport.name in explicit:
            return True
        if case.transports is not None and config.transport.name not in case.transports:
            return False
        kinds = config.transport.kinds
        return kinds is None or case.kind in kinds

    plan = [(case, config) for case in cases for config in configs if runs_case(config, case)]
    # TLS cases: one CA and server certificate per run, made here and handed to the peers by path
    tls_dir, tls_settings, tls_error = None, None, None
    if any(case.tls and not config.unavailable for case, config in plan):
        tls_dir = tempfile.mkdtemp(prefix="smcish-bench-tls-")
        try:
            tls_settings = write_tls_files(tls_dir)
        except ImportError as exc:
            tls_error = f"TLS cases need trustme (pip install trustme, or -e '.[bench]'): {exc}"
            shutil.rmtree(tls_dir, ignore_errors=True)
            tls_dir = None
    runs = [(case, c) for case, c in plan if not c.unavailable and not (case.tls and tls_error)]
    runnable = len(runs)
    estimate = sum(case.estimate_s(timing) for case, _ in runs) * args.repeat + 0.6 * len(configs)
    _print_header(machine, configs, probes, cases, args, timing, out_dir, estimate)
    if tls_error:
        print(f"  TLS cases unavailable: {tls_error}\n", file=sys.stderr, flush=True)
    elif tls_settings:
        print(f"  TLS cases: certificate for {tls_settings['server_hostname']!r} ({tls_settings['key_type']}, "
              f"{tls_settings['generator']}, in {tls_dir}), verified by the client\n", file=sys.stderr, flush=True)

    doc = {
        "schema": SCHEMA,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "machine": machine,
        "settings": {"quick": args.quick, "repeat": args.repeat, "verify": args.verify,
                     "scale_inflight": args.scale_inflight,
                     "timing": dataclasses.asdict(timing),
                     "workload": dict(workloads.SETTINGS), "loops": loops, "transports": names,
                     "malloc": {"mode": args.malloc, "env": malloc},
                     "tls": tls_settings or ({"unavailable": tls_error} if tls_error else None),
                     "order": "for each case: for each round: every configuration in turn (A B C ... A B C)"},
        "transports": {t.name: {"description": t.description, "env": t.env, "expect_mode": t.expect_mode,
                                "probe": probes.get(t.name)} for t in chosen},
        "cases": [{"name": c.name, "kind": c.kind, "api": c.api, "size": c.size, "conns": c.conns, "tls": c.tls,
                   "title": c.title, "metrics": [m.key for m in c.metrics],
                   "primary": c.primary.key, "higher_is_better": c.primary.higher_is_better} for c in cases],
        "measurements": [],
    }
    pairs: dict[str, PeerPair] = {}
    progress = Progress(runnable * args.repeat, args.quiet)
    interrupted = False
    started = time.monotonic()
    try:
        for case in cases:
            params = case.params(timing, args.verify, args.scale_inflight)
            for rnd in range(args.repeat):
                for config in configs:
                    if not runs_case(config, case):
                        continue
                    record = _measure(case, config, rnd, params, timing, pairs, log_dir, nopoll_env, malloc,
                                      tls_dir, tls_error)
                    if record is None:
                        continue
                    doc["measurements"].append(record)
                    if record["status"] != "unavailable":
                        progress.line(case, config.name, rnd, args.repeat, record)
            if not args.quiet:
                partial = dict(doc, cases=[c for c in doc["cases"] if c["name"] == case.name])
                print("\n" + report.case_table(case, report.summarize(partial)[case.name]) + "\n",
                      file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: writing what was measured so far", file=sys.stderr)
    finally:
        for pair in pairs.values():
            pair.stop()
        if tls_dir:
            shutil.rmtree(tls_dir, ignore_errors=True)

    doc["interrupted"] = interrupted
    doc["duration_s"] = round(time.monotonic() - started, 1)
    doc["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    doc["summary"] = report.summarize(doc)
    doc["targets"] = report.evaluate_targets(doc)
    plot_files, plot_note = ([], "plots skipped (--no-plots)") if args.no_plots else report.plots(doc, out_dir)
    doc["plots"] = plot_files
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(report.markdown(doc, plot_files))

    print(report.final_text(doc))
    failures = [m for m in doc["measurements"] if m["status"] == "failed"]
    if failures:
        print(f"\nFAILED: {len(failures)} measurement(s) failed; they are NOT in the figures above:")
        for error, where in report._group_errors(failures).items():
            print(f"  {report._where(where)}:\n    {error}")
        print(f"  full errors: {os.path.join(out_dir, 'results.json')}, peer logs: {log_dir}")
    if plot_note:
        print(plot_note)
    print(f"\nwrote {out_dir}/results.json, summary.md{''.join(', ' + p for p in plot_files)} "
          f"in {doc['duration_s']} s")
    if interrupted:
        return 130
    return 1 if failures else 0


def _measure(case: Case, config: Config, rnd: int, params: dict, timing: Timing, pairs: dict,
             log_dir: str, nopoll_env: dict, malloc: dict[str, str] | None = None, tls_dir: str | None = None,
             tls_error: str | None = None) -> dict | None:
    record = {"case": case.name, "config": config.name, "loop": config.loop, "transport": config.transport.name,
              "round": rnd, "status": "ok", "error": None, "metrics": {}}
    unavailable = config.unavailable or (tls_error if case.tls else None)
    if unavailable:
        if rnd:
            return None  # one "unavailable" entry per case is enough
        record.update(status="unavailable", error=unavailable)
        return record
    if config.dead:
        record.update(status="failed", error=f"not run: this configuration kept failing ({config.dead[:80]})")
        return record
    t0 = time.monotonic()
    try:
        if case.kind == "scale":
            # fresh processes: the baseline is a process that never had a connection, and a run of
            # 10,000 connections leaves nothing behind for the next measurement
            pair = PeerPair(config, log_dir, nopoll_env, malloc, extra_args=("--scale",), log_tag=".scale")
            try:
                pair.start()
                result = pair.run(params, case.timeout_s(timing))
            finally:
                pair.stop()
        else:
            pair = pairs.get(config.name)
            if pair is None:
                pair = pairs[config.name] = PeerPair(config, log_dir, nopoll_env, malloc,
                                                     extra_args=("--tls-dir", tls_dir) if tls_dir else ())
                pair.start()
            result = pair.run(params, case.timeout_s(timing))
        record.update(result)
        config.failures_in_a_row = 0
    except (PeerError, OSError, ValueError) as exc:
        summary = exc.summary if isinstance(exc, PeerError) else repr(exc)
        record.update(status="failed", error=summary, error_detail=getattr(exc, "detail", ""))
        if getattr(exc, "partial", None):
            record["partial"] = exc.partial  # not in any summary or ratio: shown with the failure only
        pair = pairs.pop(config.name, None)
        if pair is not None:
            pair.stop()  # start fresh: a failed case can leave connections or the loop in a bad state
        config.failures_in_a_row += 1
        # A wrong mode means the configuration is broken (no device...), except in a scale case (fresh
        # processes each time), where a few connections out of thousands falling back is a finding about that
        # case and round, not about the configuration: the other rounds still run.
        if "ModeMismatch" in summary and case.kind == "scale":
            config.failures_in_a_row -= 1
        elif "ModeMismatch" in summary or config.failures_in_a_row >= MAX_CONSECUTIVE_FAILURES:
            config.dead = summary
    record["wall_s"] = round(time.monotonic() - t0, 3)
    return record


def _print_header(machine, configs, probes, cases, args, timing, out_dir, estimate) -> None:
    err = sys.stderr
    all_transports_expect = {c.transport.name: c.transport.expect_mode for c in configs}
    print(f"smcish benchmarks: {machine['cpu_model']}, {machine['cores']} cores, Linux {machine['kernel']}, "
          f"Python {machine['python']}, uvloop {machine['uvloop']}, load {machine['loadavg_start'][0]:.2f}", file=err)
    mode = "QUICK (short phases, noisy: for development only)" if args.quick else "full"
    print(f"mode {mode}; {len(cases)} cases x {args.repeat} rounds; warm-up {timing.warmup_s} s + "
          f"{timing.duration_s} s per measurement; about {estimate:.0f} s; output {out_dir}", file=err)
    malloc = malloc_env(args.malloc)
    print(f"  peers' malloc: {args.malloc}"
          + (f" ({' '.join(f'{k}={v}' for k, v in malloc.items())})" if malloc else " (glibc's adaptive thresholds)"),
          file=err)
    for name, probe in probes.items():
        if not probe.get("available"):
            print(f"  {name}: unavailable ({probe.get('reason')})", file=err)
        elif probe.get("error"):
            print(f"  {name}: probe connection FAILED, its cases will fail: {_last_line(probe['error'])}", file=err)
        else:
            expect = all_transports_expect.get(name)
            warn = "" if probe.get("mode") == expect else f"  <-- expected {expect!r}: its cases will FAIL"
            print(f"  {name}: smcish {probe.get('version')}, probe connection mode {probe.get('mode')!r}"
                  f" (reason {probe.get('reason')}){warn}", file=err)
            print(f"      config {probe.get('config')}", file=err)
    runnable = [c.name for c in configs if not c.unavailable]
    print(f"  configurations: {', '.join(runnable) or 'none'}", file=err)
    skipped = [c.name for c in configs if c.unavailable]
    if skipped:
        print(f"  unavailable: {', '.join(skipped)}", file=err)
    print(file=err, flush=True)
