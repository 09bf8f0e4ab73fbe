"""Throughput of the shared-memory ring alone (smcish.ring), producer and consumer in two processes.

    python benchmarks/ring_bench.py            # full matrix, about 1 minute
    python benchmarks/ring_bench.py --quick    # 4 MiB ring only, < 20 s

Modes: 64 B messages through writev (gather of --batch messages a call) and through one write()
a message; 4 KiB, 64 KiB and 1 MiB write() chunks. Ring sizes 256 KiB .. 16 MiB. Each run streams
for --seconds, then the producer publishes EOF; throughput is the consumer's bytes over its time
from "go" to EOF. CPU seconds per GiB add user+sys of both processes. Runs are interleaved
(every config once, then again) and reported as median [min-max] of --reps runs.

The consumer reads with read_into() into a reused 256 KiB buffer; when the ring is empty it spins
for --spin-us, then sleeps on its eventfd (the full sleep protocol); a producer facing a full ring
sleeps on its eventfd. Processes are not pinned. Payload bytes are the same in-cache buffers
every time, so these are upper bounds for the ring, not for an application.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import pathlib
import resource
import select
import statistics
import sys
import time
from typing import Any

try:
    from smcish import ring as _ring
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from smcish import ring as _ring
try:
    from benchmarks.children import Child, ChildError, spawn_python
except ImportError:  # run as a script with an installed smcish: the checkout is not on sys.path yet
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from benchmarks.children import Child, ChildError, spawn_python

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
BACK_CAP = 4096  # the consumer's own (unused) ring
READ_BUF = 256 * KiB
MODES = ["64B-writev", "64B-write", "4KiB", "64KiB", "1MiB"]
RINGS = [256 * KiB, 1 * MiB, 4 * MiB, 16 * MiB]
MAX_RING = max(RINGS)
READY_TIMEOUT_S = 30.0  # a worker's "ready" after a run command
RESULT_SLACK_S = 60.0  # a worker's result: the streaming time plus this
STOP_S = 10.0  # a worker told to quit: this long to exit, then SIGTERM, then SIGKILL (this long each)


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ------------------------------------------------------------------------------------ workers

def wait_fd(fd: int, timeout: float = 5.0) -> None:
    ready, _, _ = select.select([fd], [], [], timeout)
    if not ready:
        raise TimeoutError("no doorbell within 5 s: lost wake-up")
    _ring.drain_doorbell(fd)


SLEEPS = [0]


def produce(r: _ring.Ring, wait_efd: int, mode: str, seconds: float, batch: int, spin_us: float) -> int:
    """Stream until the time is up; return bytes sent."""
    sent = 0
    write, writev = r.write, r.writev
    end = time.perf_counter() + seconds

    def wait_space() -> None:
        if spin_us and r.spin_tx(spin_us):
            return
        if r.prepare_sleep_tx() == 0:
            SLEEPS[0] += 1
            wait_fd(wait_efd)
            r.clear_wants()

    if mode == "64B-writev":
        msgs = [bytes([i & 0xFF]) * 64 for i in range(batch)]
        total = 64 * batch
        while time.perf_counter() < end:
            for _ in range(16):
                n = writev(msgs)
                sent += n
                if n < total:
                    rest = memoryview(b"".join(msgs))[n:]
                    while rest:
                        k = write(rest)
                        sent += k
                        rest = rest[k:]
                        if rest and k == 0:
                            wait_space()
    elif mode == "64B-write":
        msg = b"m" * 64
        while time.perf_counter() < end:
            for _ in range(256):
                while not write(msg):
                    wait_space()
            sent += 64 * 256
    else:
        size = {"4KiB": 4 * KiB, "64KiB": 64 * KiB, "1MiB": MiB}[mode]
        chunk = os.urandom(size)
        while time.perf_counter() < end:
            n = write(chunk)
            sent += n
            if n < size:
                rest = memoryview(chunk)[n:]
                while rest:
                    if not r.tx_space():
                        wait_space()
                    k = write(rest)
                    sent += k
                    rest = rest[k:]
    r.set_eof()
    return sent


def consume(r: _ring.Ring, wait_efd: int, spin_us: float) -> int:
    """Read until EOF; return bytes received."""
    buf = memoryview(bytearray(READ_BUF))
    got = 0
    read_into, spin = r.read_into, r.spin
    while True:
        n = read_into(buf)
        if n:
            got += n
            continue
        bits = spin(spin_us) if spin_us else 0
        if not bits:
            bits = r.prepare_sleep_rx()
            if bits == 0:
                SLEEPS[0] += 1
                wait_fd(wait_efd)
                r.clear_wants()
                continue
        if bits & _ring.ST_EOF and not bits & _ring.ST_DATA:
            return got


def worker(role: str, my_fd: int, peer_fd: int, my_efd: int, peer_efd: int) -> None:
    """Serve runs for the orchestrator: lines of JSON on stdin, results on stdout."""
    my_size = _ring.region_size(MAX_RING if role == "producer" else BACK_CAP)
    peer_size = _ring.region_size(BACK_CAP if role == "producer" else MAX_RING)
    mine = mmap.mmap(my_fd, my_size)
    peer = mmap.mmap(peer_fd, peer_size, prot=mmap.PROT_READ)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        cap = cmd["cap"]
        tx_cap, rx_cap = (cap, BACK_CAP) if role == "producer" else (BACK_CAP, cap)
        # a fresh connection: zero our own header, forget stale doorbells
        mine[:_ring.HEADER_SIZE] = bytes(_ring.HEADER_SIZE)
        _ring.drain_doorbell(my_efd)
        print("ready", flush=True)
        assert sys.stdin.readline().strip() == "go"
        my_view = memoryview(mine)[:_ring.region_size(tx_cap)]
        peer_view = memoryview(peer)[:_ring.region_size(rx_cap)]
        r = _ring.Ring(my_view, peer_view, tx_cap, rx_cap, peer_efd)
        cpu0, t0 = cpu_seconds(), time.perf_counter()
        SLEEPS[0] = 0
        if role == "producer":
            nbytes = produce(r, my_efd, cmd["mode"], cmd["seconds"], cmd["batch"], cmd["spin_us"])
        else:
            nbytes = consume(r, my_efd, cmd["spin_us"])
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        result = {"bytes": nbytes, "wall": wall, "cpu": cpu, "doorbells": r.doorbells,
                  "sleeps": SLEEPS[0], "spin_hits": r.spin_hits + r.tx_spin_hits,
                  "spin_misses": r.spin_misses + r.tx_spin_misses}
        r.close()
        my_view.release()
        peer_view.release()
        print(json.dumps(result), flush=True)


# ------------------------------------------------------------------------------- orchestrator

class Pair:
    """The two worker processes and their shared regions."""

    def __init__(self, verbose: bool = False) -> None:
        self.verbose = verbose
        fds = []
        for size in (_ring.region_size(MAX_RING), _ring.region_size(BACK_CAP)):
            fd = os.memfd_create("ring-bench", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, size)
            fcntl_seal(fd)
            fds.append(fd)
        self.prod_fd, self.cons_fd = fds
        self.prod_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.cons_efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        # the workers import the smcish.ring this process imported (an installed one, or the checkout's)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [os.path.dirname(os.path.dirname(os.path.abspath(_ring.__file__))),
                          env.get("PYTHONPATH")]))
        all_fds = [self.prod_fd, self.cons_fd, self.prod_efd, self.cons_efd]

        def spawn(role: str, my_fd: int, peer_fd: int, my_efd: int, peer_efd: int) -> Child:
            # stderr and the working directory are ours, as before the shared helper
            return spawn_python(script=os.path.abspath(__file__),
                                args=["--worker", role, my_fd, peer_fd, my_efd, peer_efd], env=env,
                                cwd=None, stderr=None, pass_fds=all_fds, name=f"ring_bench {role}")

        self.workers: list[Child] = []
        try:
            self.producer = spawn("producer", self.prod_fd, self.cons_fd, self.prod_efd, self.cons_efd)
            self.workers.append(self.producer)
            self.consumer = spawn("consumer", self.cons_fd, self.prod_fd, self.cons_efd, self.prod_efd)
            self.workers.append(self.consumer)
        except BaseException:
            self.close()
            raise

    def run(self, cap: int, mode: str, seconds: float, spin_us: float, batch: int) -> dict[str, float]:
        cmd = {"cmd": "run", "cap": cap, "mode": mode, "seconds": seconds, "spin_us": spin_us, "batch": batch}
        procs = (self.producer, self.consumer)
        for p in procs:
            p.send_json(cmd)
        for p in procs:
            line = p.read_line(READY_TIMEOUT_S)
            if line.strip() != "ready":
                raise ChildError(f"expected 'ready', got {line!r} from {p.describe()}")
        for p in (self.consumer, self.producer):
            p.send_line("go")
        # the producer streams for `seconds`, then the consumer reads to EOF (a lost wake-up: 5 s)
        timeout = seconds + RESULT_SLACK_S
        prod: dict[str, Any] = self.producer.read_json(timeout)
        cons: dict[str, Any] = self.consumer.read_json(timeout)
        assert prod["bytes"] == cons["bytes"], (prod, cons)
        if self.verbose:
            print(f"  {fmt_size(cap)} {mode}: {cons['bytes'] / cons['wall'] / 1e6:.0f} MB/s "
                  f"producer {prod} consumer {cons}", flush=True)
        return {"mbps": cons["bytes"] / cons["wall"] / 1e6,
                "cpu_per_gib": (prod["cpu"] + cons["cpu"]) / (cons["bytes"] / GiB),
                "doorbells": prod["doorbells"] + cons["doorbells"]}

    def close(self) -> None:
        """Tell the workers to quit, at most STOP_S each to exit (then SIGTERM, SIGKILL); close the fds."""
        try:
            for p in self.workers:
                with contextlib.suppress(OSError):  # BrokenPipeError: it is gone already
                    p.send_json({"cmd": "quit"})
            for p in self.workers:
                p.finish(STOP_S, STOP_S)
        finally:
            for fd in (self.prod_fd, self.cons_fd, self.prod_efd, self.cons_efd):
                os.close(fd)


def fcntl_seal(fd: int) -> None:
    import fcntl

    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)


def fmt_size(n: int) -> str:
    return f"{n // MiB} MiB" if n >= MiB else f"{n // KiB} KiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 MiB ring only, shorter runs (< 20 s)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=None, help="streaming time per run")
    ap.add_argument("--spin-us", type=float, default=50.0,
                    help="busy-poll budget before sleeping (consumer: data, producer: space)")
    ap.add_argument("--batch", type=int, default=256, help="64 B messages per writev call")
    ap.add_argument("--json", metavar="PATH", help="also write the raw results here")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every run")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        role, *fds = args.worker
        worker(role, *map(int, fds))
        return

    rings = [4 * MiB] if args.quick else RINGS
    seconds = args.seconds or (0.25 if args.quick else 0.4)
    configs = [(cap, mode) for cap in rings for mode in MODES]
    print(f"ring_bench: {len(configs)} configs x {args.reps} reps x {seconds} s, "
          f"spin {args.spin_us} us, writev batch {args.batch} x 64 B, read buffer {READ_BUF // KiB} KiB, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs", flush=True)
    results: dict[tuple[int, str], list[dict[str, float]]] = {c: [] for c in configs}
    pair = Pair(args.verbose)
    t0 = time.perf_counter()
    try:
        pair.run(1 * MiB, "64KiB", 0.1, args.spin_us, args.batch)  # warm-up
        for _ in range(args.reps):  # interleaved: every config once per round
            for cap, mode in configs:
                results[(cap, mode)].append(pair.run(cap, mode, seconds, args.spin_us, args.batch))
    finally:
        pair.close()

    header = f"| ring | {' | '.join(MODES)} |"
    print(f"\nMB/s, median [min-max] of {args.reps}; below: CPU s per GiB (both processes)\n")
    print(header)
    print("|" + "---|" * (len(MODES) + 1))
    for cap in rings:
        cells = []
        for mode in MODES:
            runs = results[(cap, mode)]
            mbps = sorted(r["mbps"] for r in runs)
            cpu = statistics.median(r["cpu_per_gib"] for r in runs)
            cells.append(f"{statistics.median(mbps):.0f} [{mbps[0]:.0f}-{mbps[-1]:.0f}] ({cpu:.2f})")
        print(f"| {fmt_size(cap)} | {' | '.join(cells)} |")
    print(f"\n(total {time.perf_counter() - t0:.1f} s)")

    best64k = max(statistics.median(r["mbps"] for r in results[(c, "64KiB")]) for c in rings)
    best64 = max(statistics.median(r["mbps"] for r in results[(c, "64B-writev")]) for c in rings)
    print(f"target 64 KiB >= 8000 MB/s: best {best64k:.0f} MB/s -> {'met' if best64k >= 8000 else 'MISSED'}")
    print(f"target 64 B gather >= 100 MB/s: best {best64:.0f} MB/s -> {'met' if best64 >= 100 else 'MISSED'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump([{"ring": c, "mode": m, "runs": results[(c, m)]} for c, m in configs], f, indent=1)


if __name__ == "__main__":
    main()
