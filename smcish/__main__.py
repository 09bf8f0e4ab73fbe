"""Command line: `python -m smcish run|stat|demo|doctor|bench`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def _readable(stats: Any) -> dict[str, Any] | None:
    """metrics_json() of another process's stats(), or None if they are not all numbers."""
    from .metrics import metrics_json

    if not isinstance(stats, dict):
        return None
    try:
        metrics = metrics_json(stats)
    except (TypeError, ValueError):
        return None
    leaves = [v for value in metrics.values()
              for v in (value.values() if isinstance(value, dict) else [value])]
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in leaves):
        return metrics
    return None


def _processes(device: Any) -> list[dict[str, Any]]:
    """Every process on the device: pid, its metrics (None if it does not report them: no
    smcish connection yet, or an older version) and its connection rows."""
    out: list[dict[str, Any]] = []
    for proc in device.peers_info():
        if "pid" not in proc or proc.get("kind") == "ismd":
            if "error" in proc:
                out.append({"pid": None, "endpoint_id": proc.get("endpoint_id"),
                            "error": proc["error"]})
            continue
        record: dict[str, Any] | None = None
        rows: list[dict[str, Any]] = []
        for item in proc.get("connections", []):
            if item.get("kind") == "process":
                record = item
            else:
                rows.append({"pid": proc["pid"], **item})
        if record is None and proc.get("self") and not rows:
            continue                   # this command's own endpoint
        entry: dict[str, Any] = {"pid": proc["pid"], "endpoint_id": proc.get("endpoint_id"),
                 "metrics": None, "connections": rows}
        metrics = _readable(record.get("stats")) if record is not None else None
        if metrics is not None and record is not None:
            entry["metrics"] = metrics
            entry["stats"] = record["stats"]
            shown, total = len(rows), record.get("connections", len(rows))
            if isinstance(total, int) and total > shown:
                entry["connections_not_shown"] = total - shown   # the reply's size limit
        elif record is not None:
            entry["error"] = str(record.get("error", "counters not understood"))
        out.append(entry)
    return out


def _stat(args: argparse.Namespace) -> int:
    import ism_backend

    device = ism_backend.get_device(args.device)
    if not device.available:
        print(f"no ISM device ({device.kind}): set SMCISH_DEVICE or start ismd", file=sys.stderr)
        return 1
    procs = _processes(device)
    if args.prometheus:
        from .metrics import render_text

        sys.stdout.write(render_text([({"pid": str(p["pid"])}, p["stats"]) for p in procs
                                      if p.get("stats") is not None]))
        return 0
    rows = [row for p in procs for row in p.get("connections", [])]
    if args.json:
        if args.connections:
            print(json.dumps(rows, indent=2))
        else:
            print(json.dumps([{k: v for k, v in p.items() if k != "stats"} for p in procs],
                             indent=2))
        return 0
    cols = ("pid", "role", "mode", "local", "peer", "bytes_sent", "bytes_received", "reason")
    print("  ".join(f"{c:>14}" for c in cols))
    for row in rows:
        print("  ".join(f"{row.get(c, '')!s:>14}" for c in cols))
    print(f"{len(rows)} connection(s) on device {device.kind} {device.gid.hex()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """The ``smcish`` command (and ``python -m smcish``); returns the exit status."""
    try:
        return _main(argv)
    except BrokenPipeError:
        # Output cut short by a pager or `| head`: quiet, as other command-line tools are.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        from .run import run_script

        run_script(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m smcish")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help="run an unchanged asyncio program accelerated: run script.py [args]")
    p_stat = sub.add_parser("stat", help="live smcish connections and metrics of the processes "
                                         "on the device")
    p_stat.add_argument("--device", default=None, help="device spec (default: SMCISH_DEVICE or embedded)")
    fmt = p_stat.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true",
                     help="per process: pid, metrics (as smcish.metrics_json()) and connections")
    fmt.add_argument("--prometheus", action="store_true",
                     help="every process's metrics in Prometheus text format, with a pid label")
    p_stat.add_argument("--connections", action="store_true",
                        help="with --json: one flat row per connection (the format before metrics)")
    p_demo = sub.add_parser("demo", help="smcish vs plain TCP, two processes, side by side")
    p_demo.add_argument("--quick", action="store_true", help="shorter run")
    p_doctor = sub.add_parser("doctor", help="would a connection use shared memory? checks the "
                                             "device, the limits and a target; exit 0 if so")
    p_doctor.add_argument("target", nargs="?", default=None, metavar="HOST:PORT",
                          help="a listener to check (never connected to, except by --probe, "
                               "which sends no byte)")
    p_doctor.add_argument("--device", default=None,
                          help="device spec (default: SMCISH_DEVICE or embedded)")
    p_doctor.add_argument("--json", action="store_true", help="machine-readable output")
    p_doctor.add_argument("--probe", action="store_true",
                          help="measure: without HOST:PORT, round trips and throughput smcish vs "
                               "plain TCP against an echo server in a child process; with it, "
                               "connection set-up time only (no byte is sent)")
    p_doctor.add_argument("--size", type=int, default=None, metavar="BYTES",
                          help="--probe without a target: round-trip message size (default 64)")
    p_doctor.add_argument("--seconds", type=float, default=None, metavar="S",
                          help="--probe: time budget, split between smcish and TCP (default 2)")
    p_doctor.add_argument("--loop", choices=("asyncio", "uvloop"), default=None,
                          help="--probe: event loop on both ends (default asyncio)")
    if argv and argv[0] == "doctor":
        try:
            args = parser.parse_args(argv)
        except SystemExit as exc:
            return 2 if exc.code else 0
        from .doctor import main as doctor_main

        return doctor_main(args)
    args, _rest = parser.parse_known_args(argv)
    if args.cmd == "stat":
        return _stat(args)
    if args.cmd == "demo":
        from .demo import main as demo_main

        return demo_main(["--quick"] if args.quick else [])
    parser.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
