"""Scale cases (`scale.<N>`): N concurrent connections held idle, and what each one costs a process.

One measurement runs in its own fresh server and client processes (the harness starts them with
`--scale`, which raises RLIMIT_NOFILE to the hard limit and gives the listener a deep backlog), so the
baseline is a process that never had a connection:

1. both processes measure themselves (`process_snapshot`): open fds, the memfd mappings in
   /proc/self/smaps (shared memory: mapped = sum of their sizes, resident = their Rss and Pss), VmRSS;
2. the client opens N connections, at most `inflight` set-ups at a time, each sending one 64 B request
   that the server echoes (`KIND_HOLD`); every connection must be in the transport's required mode on
   both sides (smcish: "ism"), or the case fails (after measuring: the failure record keeps the figures
   as `partial`, outside every summary), with the count of each mode and decline reason;
3. all N sit idle for `idle_s` (smcish's 1 s maintenance runs meanwhile); both processes measure again;
4. the server closes its side first (`release`; the TIME_WAIT remnants stay on the server's port, not on
   the client's ephemeral ports), the client waits for every EOF and closes.

Per-connection figures are (after - baseline) / N, so a link group's fixed cost (its extent 0, doorbells,
peer channel) is spread over the N connections it serves. Every phase is bounded in time.
"""

from __future__ import annotations

import asyncio
import gc
import os
import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from . import transports
from .cases import CaseParams
from .workloads import (
    KIND_HOLD,
    PATTERN,
    ClientContext,
    DataMismatch,
    ModeMismatch,
    Result,
    ServerState,
    Window,
    cpu_now,
    request_header,
)

# /proc/self/status fields reported (kB)
STATUS_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmSize", "Threads")
NOFILE_MARGIN = 256  # fds a peer needs besides its connections (stdio, listeners, control, device, groups)


def open_bound_s(conns: int) -> float:
    """How long the client may take to open all `conns` connections before the case fails."""
    return 30.0 + 0.01 * conns


def close_bound_s(conns: int) -> float:
    return 10.0 + 0.002 * conns


def timeout_s(conns: int, idle_s: float) -> float:
    """The harness's bound for the whole measurement (process start-up excluded)."""
    return open_bound_s(conns) + close_bound_s(conns) + idle_s + 60.0


# --- measuring a process ---------------------------------------------------------------------------------

def raise_nofile() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard one (and the hard one, if allowed, to fs.nr_open)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            nr_open = int(f.read())
        if hard != resource.RLIM_INFINITY and hard < nr_open:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nr_open, nr_open))
    except (OSError, ValueError):
        pass  # not privileged (no CAP_SYS_RESOURCE): keep the hard limit
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def _fd_kind(target: str) -> str:
    if target.startswith("socket:"):
        return "socket"
    if target.startswith("/memfd:"):
        return "memfd"
    if target.startswith("anon_inode:"):
        return target[len("anon_inode:"):].strip("[]") or "anon_inode"
    if target.startswith("pipe:"):
        return "pipe"
    return "file"


def fd_counts() -> tuple[int, dict[str, int]]:
    """(open fds, {kind: count}) of this process, from /proc/self/fd."""
    kinds: dict[str, int] = {}
    names = os.listdir("/proc/self/fd")
    for name in names:
        try:
            kind = _fd_kind(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:  # the fd of listdir itself, closed since
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
    return sum(kinds.values()), kinds


def memfd_mappings(smaps_path: str = "/proc/self/smaps") -> dict[str, Any]:
    """Shared memory mapped by this process: the memfd mappings' sizes, Rss and Pss (KiB), by memfd name."""
    total: dict[str, Any] = {"mappings": 0, "size_kib": 0, "rss_kib": 0, "pss_kib": 0}
    by_name: dict[str, dict[str, int]] = {}
    current = None
    with open(smaps_path) as f:
        for line in f:
            first, _, rest = line.partition(" ")
            if "-" in first and not first.endswith(":"):  # a mapping's header line
                fields = rest.split(None, 4)
                path = fields[4].strip() if len(fields) == 5 else ""
                if path.startswith("/memfd:"):
                    name = path[len("/memfd:"):].removesuffix(" (deleted)")
                    current = by_name.setdefault(name, {"mappings": 0, "size_kib": 0, "rss_kib": 0,
                                                        "pss_kib": 0})
                    current["mappings"] += 1
                    total["mappings"] += 1
                else:
                    current = None
            elif current is not None and first in ("Size:", "Rss:", "Pss:"):
                key = first[:-1].lower() + "_kib"
                value = int(rest.split()[0])
                current[key] += value
                total[key] += value
    total["by_name"] = by_name
    return total


def status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_FIELDS:
                out[key] = int(value.split()[0])
    return out


def process_snapshot() -> dict[str, Any]:
    """What one process holds now: fds (by kind), memfd mappings, RSS, RLIMIT_NOFILE, smcish.stats()."""
    gc.collect()
    fds, kinds = fd_counts()
    stats = transports.smcish_stats() or {}
    return {"pid": os.getpid(), "time": time.time(), "fds": fds, "fd_kinds": kinds, "shm": memfd_mappings(),
            "status_kib": status_kib(), "nofile": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
            "cpu": list(cpu_now()),
            "smcish": {k: stats[k] for k in ("link_groups", "slots", "live", "connections_ism",
                                              "connections_tcp", "fallbacks") if k in stats}}


def server_snapshot(state: ServerState) -> dict[str, Any]:
    """The server's answer to `mem`: its process snapshot plus the connections it saw and holds."""
    snap = process_snapshot()
    snap.update(modes=dict(state.modes), held=state.held, errors=list(state.errors))
    return snap


def per_conn(before: dict[str, Any], after: dict[str, Any], conns: int) -> dict[str, Any]:
    """Per-connection deltas and absolute totals of one process between two snapshots."""
    def delta(get: Callable[[dict[str, Any]], float]) -> float:
        return (get(after) - get(before)) / conns

    out: dict[str, Any] = {
        "fds_per_conn": delta(lambda s: s["fds"]),
        "shm_mapped_KiB_per_conn": delta(lambda s: s["shm"]["size_kib"]),
        "shm_rss_KiB_per_conn": delta(lambda s: s["shm"]["rss_kib"]),
        "shm_pss_KiB_per_conn": delta(lambda s: s["shm"]["pss_kib"]),
        "rss_KiB_per_conn": delta(lambda s: s["status_kib"]["VmRSS"]),
        "anon_KiB_per_conn": delta(lambda s: s["status_kib"].get("RssAnon", 0)),
        "rss_MiB": after["status_kib"]["VmRSS"] / 1024,
        "shm_mapped_MiB": after["shm"]["size_kib"] / 1024,
        "shm_rss_MiB": after["shm"]["rss_kib"] / 1024,
        "fds": after["fds"],
        "link_groups": after["smcish"].get("link_groups", 0),
        "slots": after["smcish"].get("slots", 0),
    }
    kinds = set(before["fd_kinds"]) | set(after["fd_kinds"])
    out["fd_kinds_delta"] = {k: after["fd_kinds"].get(k, 0) - before["fd_kinds"].get(k, 0)
                             for k in sorted(kinds)
                             if after["fd_kinds"].get(k, 0) != before["fd_kinds"].get(k, 0)}
    return out


# --- the client workload ---------------------------------------------------------------------------------

def _check_nofile(where: str, nofile: list[int], conns: int) -> None:
    soft = nofile[0]
    if soft != resource.RLIM_INFINITY and soft < conns + NOFILE_MARGIN:
        raise RuntimeError(f"{where}: RLIMIT_NOFILE is {soft}, {conns} connections need at least "
                           f"{conns + NOFILE_MARGIN}; raise the hard limit (ulimit -Hn) before running")


async def scale_streams(ctx: ClientContext, p: CaseParams) -> Result:
    """`scale.<N>`: open N connections (<= inflight set-ups at a time), one 64 B request/response each, hold
    them idle, and measure fds, shared memory and RSS per connection in both processes."""
    conns, size = p.conns, p.size
    inflight = p.inflight or conns
    idle_s = p.idle_s
    msg = bytes(PATTERN[:size])
    request = request_header(KIND_HOLD, size) + msg
    open_connection, addr = ctx.api.open_connection, ctx.addr("streams")
    expect = ctx.transport.expect_mode

    base_server = await ctx.ctrl("mem")
    base_client = process_snapshot()
    _check_nofile("client", base_client["nofile"], conns)
    _check_nofile("server", base_server["nofile"], conns)

    pairs: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    seen: Counter[tuple[str, Any]] = Counter()  # (mode, decline reason) of every client connection
    latencies: list[float] = []
    gate = asyncio.Semaphore(inflight)
    clock = time.perf_counter

    async def one() -> None:
        async with gate:
            t0 = clock()
            reader, writer = await open_connection(*addr)
            pairs.append((reader, writer))
            mode, reason = transports.mode_of(writer)
            seen[mode, getattr(reason, "name", reason)] += 1
            ctx.modes[mode] += 1
            if ctx.info is None and mode != "none":
                ctx.info = transports.describe_info(writer)
            writer.write(request)
            if await reader.readexactly(size) != msg:
                raise DataMismatch("scale: an echoed request differs from what was sent")
            latencies.append(clock() - t0)

    window = await Window().start(ctx)
    started = clock()
    tasks = [asyncio.ensure_future(one()) for _ in range(conns)]
    try:
        done, pending = await asyncio.wait(tasks, timeout=open_bound_s(conns),
                                           return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            exc = task.exception()
            if exc is not None:
                raise exc
        if pending:
            raise TimeoutError(f"scale: {len(latencies)} of {conns} connections opened within "
                               f"{open_bound_s(conns):.0f} s")
        open_s = clock() - started
        await window.stop(ctx)
        wrong_modes = None
        if expect is not None and {mode for mode, _ in seen} != {expect}:
            counts = ", ".join(f"{n} {mode} ({reason})" for (mode, reason), n in seen.most_common())
            wrong_modes = (f"{ctx.transport.name}: of {conns} connections: {counts}; expected every one in "
                           f"mode {expect!r}, so the figures are not shared memory's")
        opened_server = await ctx.ctrl("mem")
        opened_client = process_snapshot()
        if opened_server["held"] != conns:
            raise RuntimeError(f"scale: the server holds {opened_server['held']} connections, "
                               f"expected {conns}")
        if expect is not None and wrong_modes is None:
            wrong = {m: n for m, n in opened_server["modes"].items() if m != expect}
            if wrong or opened_server["modes"].get(expect) != conns:
                wrong_modes = (f"{ctx.transport.name}: the server saw modes {opened_server['modes']} for "
                               f"{conns} connections, expected all {expect!r}")
        await asyncio.sleep(idle_s)
        idle_server = await ctx.ctrl("mem")
        idle_client = process_snapshot()
    except BaseException:
        await _teardown(ctx, tasks, pairs, conns, quiet=True)
        raise
    close_s = await _teardown(ctx, tasks, pairs, conns, quiet=False)

    server = per_conn(base_server, idle_server, conns)
    client = per_conn(base_client, idle_client, conns)
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1e3

    metrics = {
        "rss_KiB_per_conn": server["rss_KiB_per_conn"],
        "fds_per_conn": server["fds_per_conn"],
        "shm_mapped_KiB_per_conn": server["shm_mapped_KiB_per_conn"],
        "shm_rss_KiB_per_conn": server["shm_rss_KiB_per_conn"],
        "client_rss_KiB_per_conn": client["rss_KiB_per_conn"],
        "client_fds_per_conn": client["fds_per_conn"],
        "client_shm_mapped_KiB_per_conn": client["shm_mapped_KiB_per_conn"],
        "client_shm_rss_KiB_per_conn": client["shm_rss_KiB_per_conn"],
        "open_s": open_s,
        "conns": conns,
        "open_cpu_us_per_conn": window.cpu()["total_s"] * 1e6 / conns,
        "open_conns_per_s": conns / open_s,
        "open_p50_ms": pct(0.5),
        "open_p99_ms": pct(0.99),
        "close_s": close_s,
        "server_rss_MiB": server["rss_MiB"],
        "server_shm_mapped_MiB": server["shm_mapped_MiB"],
        "server_shm_rss_MiB": server["shm_rss_MiB"],
        "client_rss_MiB": client["rss_MiB"],
        "client_shm_mapped_MiB": client["shm_mapped_MiB"],
        "client_shm_rss_MiB": client["shm_rss_MiB"],
        "server_link_groups": server["link_groups"],
        "server_slots": server["slots"],
        "client_link_groups": client["link_groups"],
        "client_slots": client["slots"],
    }
    raw = {"inflight": inflight, "idle_s": idle_s,
           "client_modes": {f"{mode} ({reason})": n for (mode, reason), n in seen.items()},
           "per_conn": {"server": server, "client": client},
           "after_open": {"server": per_conn(base_server, opened_server, conns),
                          "client": per_conn(base_client, opened_client, conns)},
           "snapshots": {"server": {"baseline": base_server, "opened": opened_server, "idle": idle_server},
                         "client": {"baseline": base_client, "opened": opened_client, "idle": idle_client}}}
    result = window.result(metrics, raw)  # CPU and smcish.stats() deltas cover the open phase
    if wrong_modes is not None:
        # fail loudly, but keep what was measured: the failure record shows it (never a summary or ratio)
        raise ModeMismatch(wrong_modes, partial=result)
    return result


async def _teardown(ctx: ClientContext, tasks: Sequence[asyncio.Future[None]],
                    pairs: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], conns: int,
                    quiet: bool) -> float | None:
    """Cancel unfinished set-ups, let the server close first, wait for every EOF, close ours (bounded).

    Returns the seconds it took; with `quiet` (the case already failed) its own errors are swallowed so
    the first error is the one reported.
    """
    started = time.perf_counter()
    try:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.wait_for(ctx.ctrl("release"), close_bound_s(conns))
        try:
            await asyncio.wait_for(asyncio.gather(*(reader.read() for reader, _ in pairs),
                                                  return_exceptions=True), close_bound_s(conns))
        finally:
            for _, writer in pairs:
                writer.close()
            await asyncio.wait_for(asyncio.gather(*(writer.wait_closed() for _, writer in pairs),
                                                  return_exceptions=True), close_bound_s(conns))
    except Exception:
        if not quiet:
            raise
        return None
    return time.perf_counter() - started
