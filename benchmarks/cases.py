"""What the benchmark measures: the cases, their time budgets (quick, full), their metrics, the issue's
targets, and the parameter record the client peer runs a case with (`CaseParams`)."""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


Kind = Literal["latency", "throughput", "rate", "setup", "scale"]
ApiLevel = Literal["streams", "protocol", "bufproto"]  # streams; plain Protocol; BufferedProtocol receiver
Verify = Literal["sample", "full"]  # stream receivers check 3 bytes per received chunk, or every byte

# the API levels each kind of case has a workload for (workloads.WORKLOADS)
KIND_APIS: dict[str, tuple[str, ...]] = {
    "latency": ("streams", "protocol"),
    "throughput": ("streams", "bufproto"),
    "rate": ("streams",),
    "setup": ("streams",),
    "scale": ("streams",),
}


@dataclass(frozen=True)
class Timing:
    """Per-measurement budget: every case is bounded both in time and in count."""

    warmup_s: float  # warm-up phase before the measured one (same connection)
    duration_s: float  # target length of the measured phase
    max_ops: int  # cap on round trips per connection (latency, rate)
    max_conns: int  # cap on connections per phase (setup)
    max_bytes: int  # cap on bytes in the measured throughput segment
    scale_idle_s: float = 3.0  # scale cases: how long the N connections sit idle before the idle measurement


# --quick: about 0.1 s per measurement, so all 420 measurements (18 cases, 10 configurations, 3 rounds;
# smcish-nopoll runs only the 4 latency cases, the 3 TLS cases run on tcp and smcish only) fit in about a
# minute with process start-up.
QUICK = Timing(warmup_s=0.015, duration_s=0.07, max_ops=50_000, max_conns=2_000, max_bytes=4 * GiB,
               scale_idle_s=1.5)
# Default: about 1.25 s per measurement, about 9 minutes for everything (the TLS cases: about 45 s of it).
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
    kind: Kind
    api: ApiLevel
    size: int  # message or write size in bytes
    conns: int = 1
    title: str = ""
    opt_in: bool = False  # run only when selected by name, prefix or glob (not by default)
    transports: tuple[str, ...] | None = None  # where it runs unless named in --transports (None: all)
    tls: bool = False  # over TLS: the server's TLS listener, the client verifying its certificate (tls.*)

    @property
    def metrics(self) -> tuple[Metric, ...]:
        return METRICS[self.kind]

    @property
    def primary(self) -> Metric:
        return METRICS[self.kind][0]

    def __post_init__(self) -> None:
        _check_kind_api(self.kind, self.api)
        if self.size < 1 or self.conns < 1:
            raise ValueError(f"case {self.name!r}: size and conns must be at least 1")

    def params(self, timing: Timing, verify: Verify, scale_inflight: int = 0) -> CaseParams:
        """The parameters the client peer runs this case with."""
        scale = self.kind == "scale"
        return CaseParams(
            name=self.name, kind=self.kind, api=self.api, size=self.size, conns=self.conns,
            warmup_s=timing.warmup_s, duration_s=timing.duration_s, max_ops=timing.max_ops,
            max_conns=timing.max_conns, max_bytes=timing.max_bytes, verify=verify, tls=self.tls,
            inflight=scale_inflight if scale else 0, idle_s=timing.scale_idle_s if scale else 0.0)

    def timeout_s(self, timing: Timing) -> float:
        """How long the harness waits for one measurement before declaring the peers hung."""
        if self.kind == "scale":
            from .scale import timeout_s

            return timeout_s(self.conns, timing.scale_idle_s)
        return 20.0 + 10.0 * (timing.warmup_s + timing.duration_s)

    def estimate_s(self, timing: Timing) -> float:
        """A rough wall time of one measurement, for the run's estimate."""
        if self.kind == "scale":
            return 2.0 + timing.scale_idle_s + self.conns / 800  # fresh processes, open, idle, close
        return timing.warmup_s + timing.duration_s + 0.03


def _check_kind_api(kind: str, api: str) -> None:
    if kind not in KIND_APIS:
        raise ValueError(f"unknown case kind {kind!r}: one of {', '.join(KIND_APIS)}")
    if api not in KIND_APIS[kind]:
        raise ValueError(f"no {kind} workload on API level {api!r}: one of {', '.join(KIND_APIS[kind])}")


@dataclass(frozen=True)
class CaseParams:
    """What the client peer runs one measurement with (`Case.params()`): the case, its phases' time and count
    bounds, and how the receiver verifies. It goes to the client peer as JSON (`to_json`, `from_json`);
    the constructor checks every field, so a record that exists is one the workloads can run.
    """

    name: str
    kind: Kind
    api: ApiLevel
    size: int  # message or write size in bytes
    conns: int  # concurrent connections (rate), connections to hold (scale); 1 otherwise
    warmup_s: float  # warm-up phase before the measured one
    duration_s: float  # target length of the measured phase
    max_ops: int  # cap on round trips per connection (latency, rate)
    max_conns: int  # cap on connections per phase (setup)
    max_bytes: int  # cap on bytes in the measured throughput segment
    verify: Verify
    tls: bool  # over TLS (the server's TLS listener; the client verifies its certificate)
    inflight: int = 0  # scale: connection set-ups in flight at a time (0: all at once)
    idle_s: float = 0.0  # scale: how long the connections sit idle before the idle measurement

    def __post_init__(self) -> None:
        def bad(name: str, what: str) -> ValueError:
            return ValueError(f"case parameters: {name}={getattr(self, name)!r}: {what}")

        if not isinstance(self.name, str) or not self.name:
            raise bad("name", "not a case name")
        if not isinstance(self.tls, bool):
            raise bad("tls", "not a bool")
        for name in ("kind", "api", "verify"):
            if not isinstance(getattr(self, name), str):
                raise bad(name, "not a string")
        _check_kind_api(self.kind, self.api)
        if self.verify not in get_args(Verify):
            raise bad("verify", f"one of {', '.join(get_args(Verify))}")
        for name, least in (("size", 1), ("conns", 1), ("max_ops", 1), ("max_conns", 1), ("max_bytes", 1),
                            ("inflight", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise bad(name, f"not an integer >= {least}")
        for name, positive in (("warmup_s", False), ("duration_s", True), ("idle_s", False)):
            value = getattr(self, name)  # an int is a float here (JSON may write 1.0 as 1)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or value < 0 or (positive and not value):
                raise bad(name, "not a positive number" if positive else "not a number >= 0")

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; `from_json` makes the same record of it."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CaseParams:
        """The record `to_json` wrote.

        Raises:
            ValueError: a field is missing, unknown or invalid.
        """
        names = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"case parameters: unknown field(s) {', '.join(unknown)}")
        try:
            return cls(**data)
        except TypeError as exc:  # a missing field
            raise ValueError(f"case parameters: {exc}") from None


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
    # per connection = (idle - baseline) / N in each process; "srv" the server process, "cli" the client
    "scale": (
        Metric("rss_KiB_per_conn", "srv RSS KiB/c", False),
        Metric("fds_per_conn", "srv fds/c", False),
        Metric("shm_mapped_KiB_per_conn", "srv shm map KiB/c", False),
        Metric("shm_rss_KiB_per_conn", "srv shm res KiB/c", False),
        Metric("client_rss_KiB_per_conn", "cli RSS KiB/c", False),
        Metric("client_fds_per_conn", "cli fds/c", False),
        Metric("client_shm_mapped_KiB_per_conn", "cli shm map KiB/c", False),
        Metric("client_shm_rss_KiB_per_conn", "cli shm res KiB/c", False),
        Metric("open_s", "open all s", False),
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
    apis: tuple[tuple[ApiLevel, str], ...] = (("streams", "StreamWriter.write+drain -> StreamReader.read"),
                                             ("bufproto", "transport.write -> BufferedProtocol"))
    for api, how in apis:
        for size in (64, 4 * KiB, 64 * KiB, MiB):
            cases.append(Case(f"throughput.{size_label(size)}.{api}", "throughput", api, size,
                              title=f"streaming {size_label(size)} writes, {how}"))
    for conns in (1, 16):
        cases.append(Case(f"rate.64B.c{conns}", "rate", "streams", 64, conns=conns,
                          title=f"64 B request/response, {conns} concurrent connection(s), streams"))
    cases.append(Case("setup.64B", "setup", "streams", 64,
                      title="connect + one 64 B request/response + close, sequential, streams"))
    cases += tls_cases()
    cases += [scale_case(conns) for conns in SCALE_CONNS]
    return cases


# The transports the TLS cases run on unless others are named in --transports: TLS over shared memory against
# the loop's own TLS over TCP (the comparison). Any transport can carry them (`--transports unix`...).
TLS_TRANSPORTS = ("tcp", "smcish")


def tls_cases() -> list[Case]:
    """`tls.*`: the same workloads over TLS (streams API; the server's certificate is verified by the client).

    No target: the issue asks for the comparison, not for a ratio (cases.TARGETS has none for them).
    """
    return [
        Case("tls.latency.64B.streams", "latency", "streams", 64, transports=TLS_TRANSPORTS, tls=True,
             title="TLS round trip, 64B, streams (write + readexactly)"),
        Case("tls.throughput.64KiB.streams", "throughput", "streams", 64 * KiB, transports=TLS_TRANSPORTS,
             tls=True, title="TLS streaming 64KiB writes, StreamWriter.write+drain -> StreamReader.read"),
        Case("tls.throughput.1MiB.streams", "throughput", "streams", MiB, transports=TLS_TRANSPORTS, tls=True,
             title="TLS streaming 1MiB writes, StreamWriter.write+drain -> StreamReader.read"),
    ]


SCALE_CONNS = (2_000, 10_000)


def scale_case(conns: int) -> Case:
    """`scale.<conns>`: the listed ones, or any other N named on the command line (`--cases scale.100`)."""
    return Case(f"scale.{conns}", "scale", "streams", 64, conns=conns, opt_in=True,
                transports=("tcp", "smcish"),
                title=f"{conns:,} concurrent connections, one 64 B request/response each, then idle; "
                      "fds, shared memory and RSS per connection (fresh processes)")


CASES: list[Case] = _build_cases()
CASES_BY_NAME = {case.name: case for case in CASES}


def select_cases(patterns: str | None) -> list[Case]:
    """Cases matching a comma-separated list of names, globs (`throughput.*KiB.*`) or prefixes (`latency`).

    No pattern: every case but the opt-in ones (scale); `all`: every case.

    Raises:
        ValueError: a pattern matches no case.
    """
    if not patterns:
        return [c for c in CASES if not c.opt_in]
    chosen: list[Case] = []
    for pattern in (p.strip() for p in patterns.split(",")):
        if not pattern:
            continue
        if pattern == "all":
            matched = list(CASES)
        elif re.fullmatch(r"scale\.[1-9][0-9]*", pattern) and pattern not in CASES_BY_NAME:
            case = scale_case(int(pattern.split(".")[1]))
            CASES_BY_NAME[case.name] = case  # the report looks cases up by name
            matched = [case]
        else:
            matched = [c for c in CASES if c.name == pattern or c.name.startswith(pattern + ".")
                       or fnmatch.fnmatchcase(c.name, pattern)]
        if not matched:
            raise ValueError(f"no case matches {pattern!r}; see `python -m benchmarks --list`")
        chosen.extend(c for c in matched if c not in chosen)
    listed = [c for c in CASES if c in chosen]  # keep the canonical order
    return listed + [c for c in chosen if c not in listed]


@dataclass(frozen=True)
class Target:
    """One target: `config` / `baseline` on `metric` of `case`, compared with `threshold`.

    kind "ratio": the per-round ratio config / baseline (median of the rounds) against the threshold;
    "absolute": the config's own metric (median of the rounds; no baseline); "runs": the case must measure
    without a failure (e.g. every connection in shared memory), and the `show` metrics are printed with it.
    `floor`: a second, lower bar printed with a MISS ("at the very least").
    """

    text: str
    case: str
    metric: str
    config: str
    baseline: str | None
    threshold: float
    at_least: bool  # True: value >= threshold passes; False: value <= threshold passes
    kind: str = "ratio"  # "ratio" | "absolute" | "runs"
    group: str = "v1"  # "link groups" (the v2 issue) | "v1" (issue 5, still applying)
    floor: float | None = None
    unit: str = "x"  # printed after ratios and thresholds
    show: tuple[str, ...] = ()  # "runs": metrics printed with the verdict


LINK_GROUPS = "link groups"


def _targets() -> list[Target]:
    lg = LINK_GROUPS
    t = [
        # --- the link-group issue (v2), uvloop, client and server in separate processes, ratios from one run
        Target("connection set-up rate >= 1.0x plain TCP (at the very least 0.75x)", "setup.64B",
               "conns_per_s", "uvloop/smcish", "uvloop/tcp", 1.0, True, group=lg, floor=0.75),
        Target("16 concurrent connections, 64 B request/response >= 2x TCP", "rate.64B.c16", "msgs_per_s",
               "uvloop/smcish", "uvloop/tcp", 2.0, True, group=lg),
    ]
    for api in ("streams", "protocol"):
        t.append(Target(f"64 B round trip p50 ({api}), default poll budget <= 0.25x (no worse than v1)",
                        f"latency.64B.{api}", "p50_us", "uvloop/smcish", "uvloop/tcp", 0.25, False, group=lg))
    t.append(Target("BufferedProtocol throughput at 64KiB >= 4x uvloop TCP (no worse than v1)",
                    "throughput.64KiB.bufproto", "MBps", "uvloop/smcish", "uvloop/tcp", 4.0, True, group=lg))
    for side, prefix in (("server", ""), ("client", "client_")):
        t.append(Target(f"2,000 connections: fds per shared-memory connection ({side}) <= 1.1", "scale.2000",
                        prefix + "fds_per_conn", "uvloop/smcish", None, 1.1, False, kind="absolute", group=lg,
                        unit=""))
        t.append(Target(f"2,000 connections: mapped shared memory per connection, idle ({side}) <= 512 KiB",
                        "scale.2000", prefix + "shm_mapped_KiB_per_conn", "uvloop/smcish", None, 512, False,
                        kind="absolute", group=lg, unit=" KiB"))
    t.append(Target("10,000 concurrent connections in one process, all shared memory", "scale.10000",
                    "open_s", "uvloop/smcish", None, 0, True, kind="runs", group=lg,
                    show=("server_rss_MiB", "server_shm_mapped_MiB", "server_shm_rss_MiB", "client_rss_MiB",
                          "client_shm_mapped_MiB", "client_shm_rss_MiB", "open_s")))
    # --- issue 5 (v1) targets that still apply
    for size in ("64KiB", "1MiB"):
        case = f"throughput.{size}.bufproto"
        if size != "64KiB":  # 64 KiB against TCP is in the link-group list above
            t.append(Target(f"BufferedProtocol throughput at {size} >= 4x uvloop TCP", case, "MBps",
                            "uvloop/smcish", "uvloop/tcp", 4.0, True))
        t.append(Target(f"BufferedProtocol throughput at {size} >= 1.5x uvloop Unix sockets", case, "MBps",
                        "uvloop/smcish", "uvloop/unix", 1.5, True))
    t.append(Target("streams throughput at 64 KiB >= 4x uvloop TCP streams", "throughput.64KiB.streams",
                    "MBps", "uvloop/smcish", "uvloop/tcp", 4.0, True))
    for api in ("bufproto", "streams"):
        t.append(Target(f"64 B messages streamed ({api}) >= 5x", f"throughput.64B.{api}", "MBps",
                        "uvloop/smcish", "uvloop/tcp", 5.0, True))
    for api in ("streams", "protocol"):
        t.append(Target(f"64 B round trip p50 ({api}), polling off <= 0.7x", f"latency.64B.{api}", "p50_us",
                        "uvloop/smcish-nopoll", "uvloop/tcp", 0.7, False))
    for api in ("bufproto", "streams"):
        t.append(Target(f"CPU per GiB at 64 KiB ({api}) <= 0.5x", f"throughput.64KiB.{api}", "cpu_s_per_GiB",
                        "uvloop/smcish", "uvloop/tcp", 0.5, False))
    t.append(Target("connection setup rate (asyncio) >= 0.75x plain TCP", "setup.64B", "conns_per_s",
                    "asyncio/smcish", "asyncio/tcp", 0.75, True))
    return t


TARGETS: list[Target] = _targets()
# "smcish forced to fallback: within 5% of plain TCP on every case": checked on every case's primary metric,
# smcish-fallback against tcp on the same loop (worse by more than this fraction is a MISS).
FALLBACK_TOLERANCE = 0.05
