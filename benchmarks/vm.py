"""Guest-to-guest benchmark: smcish against TCP between the same two QEMU guests (docs/vm.md).

    python -m benchmarks.vm [--rounds 5] [--n 2000] [--total-mib 64] [--accel tcg|kvm|auto]
                            [--out DIR]

Boots two guests with ``ism_backend.vmharness`` (ismd guest mode on the host, the agent in each
guest), serves from guest a, and from guest b runs, per round, smcish then stock asyncio streams
over the guests' virtual NIC: a 64 B round trip (``--n`` of them, median per round) and a one-way
transfer of ``--total-mib`` MiB in 64 KiB writes. Prints medians over rounds with their spread
and the smcish/TCP ratios, labelled with the accelerator (TCG figures are emulator figures: they
say how the paths compare under it, not what KVM guests get); writes ``vm.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEER = HERE / "vm_peer.py"
PORT = 19100


def _text(out: Any) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else str(out)


def _wait_listening(pair: Any, guest: str, port: int, timeout: float = 90) -> None:
    probe = ("import socket,sys; s=socket.socket(); s.settimeout(1); "
             f"sys.exit(s.connect_ex(('127.0.0.1', {port})))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rc, _ = pair.run(guest, [sys.executable, "-c", probe], timeout=30)
        if rc == 0:
            return
        time.sleep(0.5)
    raise SystemExit(f"the benchmark server in guest {guest} did not listen in {timeout} s")


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=2000, help="64 B round trips per round")
    parser.add_argument("--total-mib", type=int, default=64, help="MiB per throughput round")
    parser.add_argument("--accel", default="tcg", choices=("tcg", "kvm", "auto"))
    parser.add_argument("--out", default=None, help="directory for vm.json")
    args = parser.parse_args(argv)

    from ism_backend.vmharness import VmPair

    ok, why = VmPair.available()
    if not ok:
        print(f"cannot run guests here: {why}", file=sys.stderr)
        return 2
    started = time.monotonic()
    with VmPair(accel=args.accel, start_host=True, agent=True) as pair:
        accel = str(getattr(pair, "accel", args.accel)).upper()
        boot_s = time.monotonic() - started
        server = pair.spawn("a", [sys.executable, str(PEER), "serve", str(PORT)])
        try:
            _wait_listening(pair, "a", PORT)
            rc, out = pair.run("b", [sys.executable, str(PEER), "client", "10.77.0.1", str(PORT),
                                     str(args.rounds), str(args.n),
                                     str(args.total_mib << 20)],
                               timeout=120 + args.rounds * (60 + args.total_mib * 2))
        finally:
            pair.kill("a", server)
            pair.wait("a", server, timeout=30)
    text = _text(out)
    if rc != 0:
        print(text, file=sys.stderr)
        return 1
    result = json.loads([ln for ln in text.splitlines() if ln.startswith("{")][-1])
    modes = {r["mode"] if r["mode"] == "ism" else f"{r['mode']} ({r.get('reason')})"
             for r in result["smcish"]}
    report: dict[str, Any] = {"accel": accel, "boot_s": round(boot_s, 1), "rounds": args.rounds,
                              "n": args.n, "total_mib": args.total_mib, "smcish_modes":
                              sorted(modes), "raw": result}
    for kind in ("smcish", "tcp"):
        report[kind] = {"rtt_p50_us": _summary([r["rtt_p50_us"] for r in result[kind]]),
                        "mb_s": _summary([r["mb_s"] for r in result[kind]]),
                        "ok": all(r["ok"] for r in result[kind])}
    pairs = list(zip(result["smcish"], result["tcp"], strict=True))
    ratios_rtt = [s["rtt_p50_us"] / t["rtt_p50_us"] for s, t in pairs]
    ratios_tp = [s["mb_s"] / t["mb_s"] for s, t in pairs]
    report["ratio_rtt"] = _summary(ratios_rtt)
    report["ratio_throughput"] = _summary(ratios_tp)

    def fmt(d: dict[str, float], unit: str, digits: int = 1) -> str:
        return (f"{d['median']:.{digits}f} {unit} [{d['min']:.{digits}f}-{d['max']:.{digits}f}]")

    print(f"guest to guest under {accel} ({args.rounds} rounds, interleaved; median [min-max]); "
          f"smcish path: {', '.join(sorted(modes))}")
    print(f"  64 B round trip p50   smcish {fmt(report['smcish']['rtt_p50_us'], 'us')}   "
          f"TCP {fmt(report['tcp']['rtt_p50_us'], 'us')}   ratio "
          f"{fmt(report['ratio_rtt'], 'x', 3)}")
    print(f"  64 KiB writes, {args.total_mib} MiB  smcish {fmt(report['smcish']['mb_s'], 'MB/s')}   "
          f"TCP {fmt(report['tcp']['mb_s'], 'MB/s')}   ratio "
          f"{fmt(report['ratio_throughput'], 'x', 2)}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "vm.json"), "w") as fh:
            json.dump(report, fh, indent=2)
    return 0 if modes == {"ism"} and report["smcish"]["ok"] and report["tcp"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
