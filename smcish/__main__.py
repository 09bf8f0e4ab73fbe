"""Command line: `python -m smcish run|stat|demo|bench`."""

from __future__ import annotations

import argparse
import json
import sys


def _stat(args) -> int:
    import ism_backend

    device = ism_backend.get_device(args.device)
    if not device.available:
        print(f"no ISM device ({device.kind}): set SMCISH_DEVICE or start ismd", file=sys.stderr)
        return 1
    rows = []
    for proc in device.peers_info():
        for conn in proc.get("connections", []):
            rows.append({"pid": proc.get("pid"), **conn})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = ("pid", "role", "mode", "local", "peer", "bytes_sent", "bytes_received", "reason")
    print("  ".join(f"{c:>14}" for c in cols))
    for row in rows:
        print("  ".join(f"{str(row.get(c, '')):>14}" for c in cols))
    print(f"{len(rows)} connection(s) on device {device.kind} {device.gid.hex()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "run":
        from .run import run_script

        run_script(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m smcish")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run", help="run an unchanged asyncio program accelerated: run script.py [args]")
    p_stat = sub.add_parser("stat", help="list live smcish connections of processes on the device")
    p_stat.add_argument("--device", default=None, help="device spec (default: SMCISH_DEVICE or embedded)")
    p_stat.add_argument("--json", action="store_true")
    p_demo = sub.add_parser("demo", help="smcish vs plain TCP, two processes, side by side")
    p_demo.add_argument("--quick", action="store_true", help="shorter run")
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "stat":
        return _stat(args)
    if args.cmd == "demo":
        from .demo import main as demo_main

        return demo_main(["--quick"] if args.quick else [])
    parser.error(f"unknown command {args.cmd}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
