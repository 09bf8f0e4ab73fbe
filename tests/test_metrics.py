"""Metrics: stats(), metrics_text() (Prometheus), metrics_json(), `smcish stat --json/--prometheus`
across processes, the rate-limited fallback log line and the library's NullHandler."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import itertools
import json
import logging
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

import smcish
from benchmarks.children import spawn_python
from conftest import PYTHON, new_loop, program, python_env
from smcish import DeclineReason as R

_stats = importlib.import_module("smcish.stats")
HOST = "127.0.0.1"
PAYLOAD = 50_000

COUNTERS = ("smcish_connections", "smcish_fallbacks", "smcish_bytes", "smcish_doorbells",
            "smcish_polls", "smcish_ring_full", "smcish_migrations", "smcish_handshake_aborts")
GAUGES = ("smcish_link_groups", "smcish_slots", "smcish_live_connections",
          "smcish_policy_skipped_destinations")


def parse(text: str) -> dict:
    """Family name -> (type, help, {(sample name, sorted labels): value})."""
    out = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = (fam.type, fam.documentation,
                         {(s.name, tuple(sorted(s.labels.items()))): s.value for s in fam.samples})
    return out


def value(parsed: dict, family: str, sample: str | None = None, **labels) -> float:
    return parsed[family][2][(sample or family, tuple(sorted(labels.items())))]


def check_matches_stats(parsed: dict, st: dict, **extra) -> None:
    """Every exposed sample equals the stats() snapshot it was made from."""
    def v(family, sample=None, **labels):
        return value(parsed, family, sample, **extra, **labels)

    assert v("smcish_connections", "smcish_connections_total", mode="ism") == st["connections_ism"]
    assert v("smcish_connections", "smcish_connections_total", mode="tcp") == st["connections_tcp"]
    for reason in R:
        assert (v("smcish_fallbacks", "smcish_fallbacks_total", reason=reason.name)
                == st["fallbacks"].get(reason.name, 0)), reason
    assert v("smcish_bytes", "smcish_bytes_total", direction="sent") == st["bytes_sent"]
    assert v("smcish_bytes", "smcish_bytes_total", direction="received") == st["bytes_received"]
    assert v("smcish_doorbells", "smcish_doorbells_total") == st["doorbells"]
    assert v("smcish_polls", "smcish_polls_total", result="hit") == st["poll_hits"]
    assert v("smcish_polls", "smcish_polls_total", result="miss") == st["poll_misses"]
    assert v("smcish_polls", "smcish_polls_total", result="colocated") == st["poll_colocated"]
    assert v("smcish_ring_full", "smcish_ring_full_total") == st["ring_full"]
    assert v("smcish_migrations", "smcish_migrations_total") == st["migrations"]
    assert v("smcish_handshake_aborts", "smcish_handshake_aborts_total") == st["handshake_aborts"]
    assert v("smcish_link_groups") == st["link_groups"]
    assert v("smcish_slots") == st["slots"]
    assert v("smcish_live_connections") == st["live"]
    assert v("smcish_policy_skipped_destinations") == st["policy_skipped"]


async def echo_server(**kw):
    async def handle(reader, writer):
        data = await reader.read()
        writer.write(data)
        await writer.drain()
        writer.close()

    return await smcish.start_server(handle, HOST, 0, **kw)


async def echo(port: int, size: int, **kw):
    reader, writer = await smcish.open_connection(HOST, port, **kw)
    writer.write(b"m" * size)
    writer.write_eof()
    got = await reader.read()
    assert len(got) == size
    mode = writer.get_extra_info("smcish").mode
    writer.close()
    await writer.wait_closed()
    return mode


def run(loop_kind: str, coro_fn):
    loop = new_loop(loop_kind)
    try:
        return loop.run_until_complete(asyncio.wait_for(coro_fn(), 60))
    finally:
        loop.close()


async def settle(pred, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------ API: text and JSON


def test_metrics_text_parses_and_matches_stats(loop_kind):
    """Real connections (shared memory, then forced fallback): the text exposition parses with
    prometheus_client's parser, has HELP/TYPE for every family, every DeclineReason as a label
    value, and matches stats() and the deltas the traffic made."""
    async def main():
        before = smcish.stats()
        server = await echo_server()
        port = server.sockets[0].getsockname()[1]
        assert await echo(port, PAYLOAD) == "ism"
        assert await echo(port, PAYLOAD, device="none") == "tcp"
        # Hold one open: the gauges see it.
        reader, writer = await smcish.open_connection(HOST, port)
        writer.write(b"x")
        await writer.drain()
        await settle(lambda: smcish.stats()["live"] >= 2)
        st_open = smcish.stats()
        text_open = smcish.metrics_text()
        writer.write_eof()
        await reader.read()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)
        st = smcish.stats()
        text = smcish.metrics_text()
        return before, st_open, text_open, st, text

    before, st_open, text_open, st, text = run(loop_kind, main)
    parsed = parse(text)
    for family in COUNTERS:
        assert parsed[family][0] == "counter", family
        assert parsed[family][1], family                         # HELP text
    for family in GAUGES:
        assert parsed[family][0] == "gauge", family
    assert "# TYPE smcish_connections_total counter" in text
    assert "# HELP smcish_link_groups " in text
    check_matches_stats(parsed, st)
    fallbacks = {dict(k[1])["reason"] for k in parsed["smcish_fallbacks"][2]}
    assert {r.name for r in R} <= fallbacks

    # The traffic: 2 ISM connections (both ends in this process: 4), 1 forced fallback (2 ends:
    # the client's NO_DEVICE, the server's PEER_NOT_SMCISH); bytes counted exactly once.
    assert st["connections_ism"] - before["connections_ism"] == 4
    assert st["connections_tcp"] - before["connections_tcp"] == 2
    assert st["fallbacks"]["NO_DEVICE"] - before["fallbacks"].get("NO_DEVICE", 0) == 1
    assert st["fallbacks"]["PEER_NOT_SMCISH"] - before["fallbacks"].get("PEER_NOT_SMCISH", 0) == 1
    assert st["bytes_sent"] - before["bytes_sent"] == 2 * PAYLOAD + 2
    assert st["bytes_received"] - before["bytes_received"] == 2 * PAYLOAD + 2

    parsed_open = parse(text_open)
    check_matches_stats(parsed_open, st_open)
    assert value(parsed_open, "smcish_live_connections") >= 2
    assert value(parsed_open, "smcish_link_groups") >= 2        # a client and a server group
    assert value(parsed_open, "smcish_slots") >= 2


def test_metrics_json_matches_stats(loop_kind):
    async def main():
        server = await echo_server()
        port = server.sockets[0].getsockname()[1]
        await echo(port, 1000)
        await echo(port, 1000, device="none")
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)
        return smcish.stats(), smcish.metrics_json()

    st, js = run(loop_kind, main)
    json.dumps(js)
    assert js["pid"] > 0
    assert js["connections_total"] == {"ism": st["connections_ism"], "tcp": st["connections_tcp"]}
    assert js["fallbacks_total"] == {r.name: st["fallbacks"].get(r.name, 0) for r in R}
    assert js["bytes_total"] == {"sent": st["bytes_sent"], "received": st["bytes_received"]}
    assert js["polls_total"] == {"hit": st["poll_hits"], "miss": st["poll_misses"],
                                 "colocated": st["poll_colocated"]}
    for key, stat in (("doorbells_total", "doorbells"), ("ring_full_total", "ring_full"),
                      ("migrations_total", "migrations"),
                      ("handshake_aborts_total", "handshake_aborts"),
                      ("link_groups", "link_groups"), ("slots", "slots"),
                      ("live_connections", "live"),
                      ("policy_skipped_destinations", "policy_skipped")):
        assert js[key] == st[stat], key
    assert smcish.metrics_json(st) == {k: v for k, v in js.items() if k != "pid"}


def test_stats_backwards_compatible():
    st = smcish.stats()
    for key in ("connections_ism", "connections_tcp", "fallbacks", "bytes_sent", "bytes_received",
                "notifications", "doorbells", "poll_hits", "poll_misses", "poll_colocated",
                "handshake_aborts", "migrations", "migrated_bytes", "link_groups", "slots", "live",
                "ring_full"):
        assert key in st, key


def test_counters_never_go_down(loop_kind):
    """Counters only grow: bytes of a closed connection whose ring lingers are not counted twice,
    and a link group's doorbells and polls outlive the group (torn down with its loop)."""
    from smcish import linkgroup

    samples = []

    async def main():
        server = await echo_server()
        port = server.sockets[0].getsockname()[1]
        for _ in range(3):
            await echo(port, PAYLOAD)
            samples.append(smcish.stats())
        server.close()
        await server.wait_closed()
        for _ in range(5):
            await asyncio.sleep(0.02)
            samples.append(smcish.stats())

    run(loop_kind, main)
    time.sleep(0.15)
    linkgroup.sweep_hubs()            # the loop is closed: its hub and groups go
    samples.append(smcish.stats())
    keys = ("connections_ism", "bytes_sent", "bytes_received", "doorbells", "poll_hits",
            "poll_misses", "poll_colocated", "notifications")
    for a, b in itertools.pairwise(samples):
        for key in keys:
            assert b[key] >= a[key], (key, a[key], b[key])


def test_ring_full_counted(loop_kind):
    from smcish.transport import SmcTransport

    if "ring_full" not in inspect.getsource(SmcTransport._wait_space):
        pytest.skip("transport.py's _wait_space does not call stats.count('ring_full') yet")

    async def main():
        before = smcish.stats()["ring_full"]
        gate = asyncio.Event()

        async def handle(reader, writer):
            await gate.wait()
            await reader.read()
            writer.close()

        server = await smcish.start_server(handle, HOST, 0, ring_size=4096, max_ring_size=4096)
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await smcish.open_connection(HOST, port, ring_size=4096,
                                                      max_ring_size=4096)
        assert writer.get_extra_info("smcish").mode == "ism"
        writer.write(b"f" * 100_000)
        await asyncio.sleep(0.05)
        gate.set()
        await writer.drain()
        writer.close()
        await writer.wait_closed()
        server.close()
        await server.wait_closed()
        return smcish.stats()["ring_full"] - before

    assert run(loop_kind, main) >= 1


def test_info_provider_leads_with_a_bounded_process_record():
    """`smcish stat` reads each process's record over the device: it comes first (the endpoint
    keeps the longest prefix that fits its reply limit) and stays small."""
    from ism_backend import proto

    items = _stats.connections()
    record = items[0]
    assert record["kind"] == "process" and record["schema"] == 1
    assert set(smcish.stats()) == set(record["stats"])
    assert all("kind" not in row for row in items[1:])
    assert len(json.dumps(record)) < 4096
    kept, _ = proto.fit_list(items + [{"filler": "x" * 1000}] * 200, proto.MAX_BODY - 512)
    assert kept[0]["kind"] == "process"


# ------------------------------------------------------------------ `smcish stat` across processes

@pytest.fixture
def holder():
    """tests/programs/stat_holder.py: an smcish server and client (and a TCP connection) held open."""
    with spawn_python(script=program("stat_holder.py"), args=["--with-tcp"], env=python_env(),
                      handshake="ready") as proc:
        yield proc, int(proc.hello.split()[1])
        proc.close_stdin()
        proc.wait(10)


def smcish_stat(*args: str) -> str:
    out = subprocess.run([PYTHON, "-m", "smcish", "stat", *args], env=python_env(),
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_stat_json_per_process(holder):
    proc, port = holder
    procs = json.loads(smcish_stat("--json"))
    mine = [p for p in procs if p["pid"] == proc.pid]
    assert len(mine) == 1, procs
    entry = mine[0]
    m = entry["metrics"]
    assert m["connections_total"] == {"ism": 2, "tcp": 2}
    assert m["fallbacks_total"]["NO_DEVICE"] == 1 and m["fallbacks_total"]["PEER_NOT_SMCISH"] == 1
    assert set(m["fallbacks_total"]) >= {r.name for r in R}
    assert m["bytes_total"] == {"sent": 12345, "received": 12345}
    assert m["live_connections"] == 2 and m["slots"] == 2 and m["link_groups"] == 2
    rows = entry["connections"]
    assert {r["role"] for r in rows} == {"client", "server"}
    assert all(r["mode"] == "ism" and r["pid"] == proc.pid for r in rows)
    client = next(r for r in rows if r["role"] == "client")
    assert client["peer"] == f"{HOST}:{port}" and client["bytes_sent"] == 12345

    flat = json.loads(smcish_stat("--json", "--connections"))      # the format before metrics
    assert {r["role"] for r in flat if r["pid"] == proc.pid} == {"client", "server"}

    table = smcish_stat()
    assert str(proc.pid) in table and "connection(s) on device" in table


def test_stat_prometheus_per_process(holder):
    proc, _ = holder
    text = smcish_stat("--prometheus")
    parsed = parse(text)
    pid = str(proc.pid)
    js = next(p for p in json.loads(smcish_stat("--json")) if p["pid"] == proc.pid)["metrics"]

    def v(family, sample=None, **labels):
        return value(parsed, family, sample, pid=pid, **labels)

    assert v("smcish_connections", "smcish_connections_total", mode="ism") == 2
    assert v("smcish_connections", "smcish_connections_total", mode="tcp") == 2
    for reason in R:
        assert (v("smcish_fallbacks", "smcish_fallbacks_total", reason=reason.name)
                == js["fallbacks_total"][reason.name])
    assert v("smcish_bytes", "smcish_bytes_total", direction="sent") == 12345
    assert v("smcish_bytes", "smcish_bytes_total", direction="received") == 12345
    assert v("smcish_live_connections") == 2
    assert v("smcish_link_groups") == js["link_groups"]
    assert v("smcish_slots") == js["slots"]
    assert v("smcish_ring_full", "smcish_ring_full_total") == js["ring_full_total"]
    assert v("smcish_handshake_aborts", "smcish_handshake_aborts_total") == 0
    # HELP and TYPE once per family, whatever the number of processes.
    assert text.count("# TYPE smcish_connections_total counter") == 1
    for family in COUNTERS + GAUGES:
        assert family in parsed, family


# ------------------------------------------------------------------ logging


@pytest.fixture
def fallback_log(caplog):
    with _stats._log_lock:
        _stats._logged.clear()
    caplog.set_level(logging.INFO, logger="smcish.fallback")
    yield caplog
    with _stats._log_lock:
        _stats._logged.clear()


def lines(caplog, reason: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "smcish.fallback" and r.levelno == logging.INFO and reason in r.getMessage()]


def test_fallback_logged_once_per_reason_and_peer(loop_kind, fallback_log):
    """Two forced fallbacks to the same server: one INFO line for NO_DEVICE, naming the remedy."""
    async def main():
        server = await echo_server()
        port = server.sockets[0].getsockname()[1]
        for _ in range(2):
            assert await echo(port, 10, device="none") == "tcp"
        server.close()
        await server.wait_closed()

    run(loop_kind, main)
    got = lines(fallback_log, "NO_DEVICE")
    assert len(got) == 1, got
    assert "fell back to TCP" in got[0] and "set SMCISH_DEVICE or start ismd" in got[0]
    assert len(lines(fallback_log, "PEER_NOT_SMCISH")) == 1


def test_log_fallback_rate_limit(fallback_log, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(_stats.time, "monotonic", lambda: clock[0])
    peer = ("10.0.0.1", 8080)
    assert _stats.log_fallback(R.NO_FD, peer)
    assert not _stats.log_fallback(R.NO_FD, peer)                 # same reason, same peer
    assert _stats.log_fallback(R.NO_FD, ("10.0.0.2", 8080))       # another peer
    assert _stats.log_fallback(R.TIMEOUT, peer)                   # another reason
    # A server sees clients by host (their ports are ephemeral).
    assert _stats.log_fallback(R.PEER_NOT_SMCISH, ("10.0.0.3", 40001), server=True)
    assert not _stats.log_fallback(R.PEER_NOT_SMCISH, ("10.0.0.3", 40002), server=True)
    clock[0] += _stats.LOG_WINDOW - 1
    assert not _stats.log_fallback(R.NO_FD, peer)
    clock[0] += 2
    assert _stats.log_fallback(R.NO_FD, peer)                     # the window passed
    got = lines(fallback_log, "NO_FD")
    assert len(got) == 3
    assert "10.0.0.1:8080" in got[0] and "RLIMIT_NOFILE" in got[0]
    assert "from 10.0.0.3" in lines(fallback_log, "PEER_NOT_SMCISH")[0]
    assert "SMCISH_HANDSHAKE_TIMEOUT" in lines(fallback_log, "TIMEOUT")[0]

    # count_fallback counts and logs through the same limiter.
    before = smcish.stats()["fallbacks"].get("NO_FD", 0)
    _stats.count_fallback(R.NO_FD, peer=peer)
    _stats.count_fallback(R.NO_FD, peer=("10.0.0.9", 1))
    assert smcish.stats()["fallbacks"]["NO_FD"] == before + 2
    assert len(lines(fallback_log, "NO_FD")) == 4


def test_log_fallback_table_is_bounded(fallback_log, monkeypatch):
    monkeypatch.setattr(_stats, "LOG_KEYS", 16)
    for i in range(100):
        assert _stats.log_fallback(R.NO_MEMORY, ("10.1.0.1", 1000 + i))
    assert len(_stats._logged) == 16
    assert len(lines(fallback_log, "NO_MEMORY")) == 100


def test_every_reason_has_a_remedy():
    assert set(_stats.REMEDIES) == {r.name for r in R}
    assert all(text and "\n" not in text for text in _stats.REMEDIES.values())


def test_no_log_work_when_info_is_off():
    logger = _stats.log
    saved = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with _stats._log_lock:
            _stats._logged.clear()
        assert not _stats.log_fallback(R.NO_FD, ("10.0.0.1", 1))
        assert not _stats._logged
    finally:
        logger.setLevel(saved)


def test_null_handler():
    for name in ("smcish", "ism_backend"):
        handlers = logging.getLogger(name).handlers
        assert sum(isinstance(h, logging.NullHandler) for h in handlers) == 1, name
    # Library records do not reach Python's last-resort handler (stderr) by themselves.
    out = subprocess.run(
        [PYTHON, "-c", "import logging, smcish; logging.getLogger('smcish').warning('boo')"],
        env=python_env(), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "boo" not in out.stderr


def test_stat_tolerates_other_versions_and_errors():
    """`stat` shows a process of an older version (rows, no record) with metrics null, one whose
    record it cannot read with an error, an unreachable endpoint with its error, and leaves out
    its own endpoint; --prometheus renders only the readable ones."""
    from smcish.__main__ import _processes
    from smcish.metrics import render_text

    good = {"kind": "process", "schema": 1, "stats": smcish.stats(), "connections": 3}
    row = {"mode": "ism", "role": "client", "peer": "127.0.0.1:1", "bytes_sent": 5}

    class Device:
        def peers_info(self):
            return [
                {"pid": 1, "endpoint_id": "aa", "self": True, "connections": []},
                {"pid": 2, "endpoint_id": "bb", "self": False, "connections": [good, row]},
                {"pid": 3, "endpoint_id": "cc", "self": False, "connections": [row]},
                {"pid": 4, "endpoint_id": "dd", "self": False,
                 "connections": [{"kind": "process", "stats": {"fallbacks": {"X": "many"}}}]},
                {"endpoint_id": "ee", "error": "timed out"},
            ]

    procs = {p["pid"]: p for p in _processes(Device())}
    assert set(procs) == {2, 3, 4, None}
    assert procs[2]["metrics"] == smcish.metrics_json(good["stats"])
    assert procs[2]["connections"] == [{"pid": 2, **row}]
    assert procs[2]["connections_not_shown"] == 2
    assert procs[3]["metrics"] is None and procs[3]["connections"] == [{"pid": 3, **row}]
    assert procs[4]["metrics"] is None and "error" in procs[4]
    assert procs[None]["error"] == "timed out"
    text = render_text([({"pid": str(p["pid"])}, p["stats"]) for p in procs.values()
                        if p.get("stats") is not None])
    pids = {s.labels["pid"] for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert pids == {"2"}
