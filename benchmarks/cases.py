"""What the benchmark measures: the cases, their time budgets (quick, full), their metrics, the issue's targets."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class Timing:
    """Per-measurement budget: every case is bounded both in time and in count."""

    warmup_s: float  # warm-up phase before the measured one (same connection)
    duration_s: float  # target length of the measured phase
    max_ops: int  # cap on round trips per connection (latency, rate)
    max_conns: int  # cap on connections per phase (setup)
    max_bytes: int  # cap on bytes in the measured throughput segment


# --quick: about 0.1 s per measurement, so all 384 measurements (15 cases, 10 configurations, 3 rounds;
# smcish-nopoll runs only the 4 latency cases) fit in a minute with process start-up.
QUICK = Timing(warmup_s=0.015, duration_s=0.07, max_ops=50_000, max_conns=2_000, max_bytes=4 * GiB)
# Default: about 1.25 s per measurement, about 8 minutes for everything.
FULL = Timing(warmup_s=0.2, duration_s=1.0, max_ops=1_000_000, max_conns=20_000, max_bytes=64 * GiB)


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool


@dataclass(frozen=True)
class Case:
    """One benchmark case: a workload kind at one API level and message/write size."""

    name: str
    kind: str  # "latency" | "throughput" | "rate" | "setup"
    api: str  # "streams" | "protocol" (plain Protocol) | "bufproto" (BufferedProtocol receiver)
    size: int  # message or write size in bytes
    conns: int = 1
    title: str = ""

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return METRICS[self.kind]

    @property
    def primary(self) -> Metric:
        return METRICS[self.kind][0]

    def params(self, timing: Timing, verify: str) -> dict:
        """The JSON-able parameters the client peer runs this case with."""
        return {
            "name": self.name,
            "kind": self.kind,
            "api": self.api,
            "size": self.size,
            "conns": self.conns,
            "warmup_s": timing.warmup_s,
            "duration_s": timing.duration_s,
            "max_ops": timing.max_ops,
            "max_conns": timing.max_conns,
            "max_bytes": timing.max_bytes,
            "verify": verify,
        }

    def timeout_s(self, timing: Timing) -> float:
        """How long the harness waits for one measurement before declaring the peers hung."""
        return 20.0 + 10.0 * (timing.warmup_s + timing.duration_s)


METRICS: dict[str, tuple[Metric, ...]] = {
    "latency": (
        Metric("p50_us", "p50 us", False),
        Metric("p99_us", "p99 us", False),
        Metric("cpu_us_per_op", "CPU us/rt", False),
    ),
    "throughput": (
        Metric("MBps", "MB/s", True),
        Metric("cpu_s_per_GiB", "CPU s/GiB", False),
    ),
    "rate": (
        Metric("msgs_per_s", "msg/s", True),
        Metric("cpu_us_per_msg", "CPU us/msg", False),
    ),
    "setup": (
        Metric("conns_per_s", "conn/s", True),
        Metric("cpu_us_per_conn", "CPU us/conn", False),
    ),
}


def size_label(size: int) -> str:
    if size >= MiB and size % MiB == 0:
        return f"{size // MiB}MiB"
    if size >= KiB and size % KiB == 0:
        return f"{size // KiB}KiB"
    return f"{size}B"


def _build_cases() -> list[Case]:
    cases = []
    for size in (64, 4 * KiB):
        cases.append(Case(f"latency.{size_label(size)}.streams", "latency", "streams", size,
                          title=f"round trip, {size_label(size)}, streams (write + readexactly)"))
        cases.append(Case(f"latency.{size_label(size)}.protocol", "latency", "protocol", size,
                          title=f"round trip, {size_label(size)}, Protocol (write + data_received)"))
    for api, how in (("streams", "StreamWriter.write+drain -> StreamReader.read"),
                     ("bufproto", "transport.write -> BufferedProtocol")):
        for size in (64, 4 * KiB, 64 * KiB, MiB):
            cases.append(Case(f"throughput.{size_label(size)}.{api}", "throughput", api, size,
                              title=f"streaming {size_label(size)} writes, {how}"))
    for conns in (1, 16):
        cases.append(Case(f"rate.64B.c{conns}", "rate", "streams", 64, conns=conns,
                          title=f"64 B request/response, {conns} concurrent connection(s), streams"))
    cases.append(Case("setup.64B", "setup", "streams", 64,
                      title="connect + one 64 B request/response + close, sequential, streams"))
    return cases


CASES: list[Case] = _build_cases()
CASES_BY_NAME = {case.name: case for case in CASES}


def select_cases(patterns: str | None) -> list[Case]:
    """Cases matching a comma-separated list of names, globs (`throughput.*KiB.*`) or prefixes (`latency`).

    Raises:
        ValueError: a pattern matches no case.
    """
    if not patterns:
        return list(CASES)
    chosen: list[Case] = []
    for pattern in (p.strip() for p in patterns.split(",")):
        if not pattern:
            continue
        matched = [c for c in CASES
                   if c.name == pattern or c.name.startswith(pattern + ".") or fnmatch.fnmatchcase(c.name, pattern)]
        if not matched:
            raise ValueError(f"no case matches {pattern!r}; see `python -m benchmarks --list`")
        chosen.extend(c for c in matched if c not in chosen)
    return [c for c in CASES if c in chosen]  # keep the canonical order


@dataclass(frozen=True)
class Target:
    """One target from issue 5: `config` / `baseline` on `metric` of `case`, compared with `threshold`."""

    text: str
    case: str
    metric: str
    config: str
    baseline: str
    threshold: float
    at_least: bool  # True: ratio >= threshold passes; False: ratio <= threshold passes


def _targets() -> list[Target]:
    t = []
    for size in ("64KiB", "1MiB"):
        case = f"throughput.{size}.bufproto"
        t.append(Target(f"BufferedProtocol throughput at {size} >= 4x uvloop TCP", case, "MBps",
                        "uvloop/smcish", "uvloop/tcp", 4.0, True))
        t.append(Target(f"BufferedProtocol throughput at {size} >= 1.5x uvloop Unix sockets", case, "MBps",
                        "uvloop/smcish", "uvloop/unix", 1.5, True))
    t.append(Target("streams throughput at 64 KiB >= 4x uvloop TCP streams", "throughput.64KiB.streams", "MBps",
                    "uvloop/smcish", "uvloop/tcp", 4.0, True))
    for api in ("bufproto", "streams"):
        t.append(Target(f"64 B messages streamed ({api}) >= 5x", f"throughput.64B.{api}", "MBps",
                        "uvloop/smcish", "uvloop/tcp", 5.0, True))
    for api in ("streams", "protocol"):
        t.append(Target(f"64 B round trip p50 ({api}), default poll budget <= 0.25x", f"latency.64B.{api}", "p50_us",
                        "uvloop/smcish", "uvloop/tcp", 0.25, False))
        t.append(Target(f"64 B round trip p50 ({api}), polling off <= 0.7x", f"latency.64B.{api}", "p50_us",
                        "uvloop/smcish-nopoll", "uvloop/tcp", 0.7, False))
    for api in ("bufproto", "streams"):
        t.append(Target(f"CPU per GiB at 64 KiB ({api}) <= 0.5x", f"throughput.64KiB.{api}", "cpu_s_per_GiB",
                        "uvloop/smcish", "uvloop/tcp", 0.5, False))
    for loop in ("uvloop", "asyncio"):
        t.append(Target(f"connection setup rate ({loop}) >= 0.75x plain TCP", "setup.64B", "conns_per_s",
                        f"{loop}/smcish", f"{loop}/tcp", 0.75, True))
    return t


TARGETS: list[Target] = _targets()
# "smcish forced to fallback: within 5% of plain TCP on every case": checked on every case's primary metric,
# smcish-fallback against tcp on the same loop (worse by more than this fraction is a MISS).
FALLBACK_TOLERANCE = 0.05
