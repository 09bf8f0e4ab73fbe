"""Smoke tests of the benchmark harness: a tiny --quick run, its JSON, and the verification logic.

No figure is asserted beyond "measured and positive": performance belongs in `python -m benchmarks`,
never in a timed unit test.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
import time

import pytest

from benchmarks import harness, peers, report, scale, transports, workloads
from benchmarks.cases import CASES, TARGETS, select_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE_CASES = "latency.64B.streams,throughput.64KiB.bufproto"
TLS_CASES = ["tls.latency.64B.streams", "tls.throughput.64KiB.streams", "tls.throughput.1MiB.streams"]


def run_harness(out_dir, *args: str, timeout: float = 60) -> tuple[subprocess.CompletedProcess, dict, float]:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--no-plots", "-q",
                           "--out", str(out_dir), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    elapsed = time.monotonic() - started
    path = os.path.join(out_dir, "results.json")
    assert os.path.exists(path), f"no results.json\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    with open(path) as f:
        return proc, json.load(f), elapsed


@pytest.fixture(scope="module")
def tcp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc, doc, elapsed = run_harness(out, "--cases", SMOKE_CASES, "--transports", "tcp",
                                     "--loops", "asyncio,uvloop", "--repeat", "2")
    return out, proc, doc, elapsed


@pytest.mark.timeout(90)
def test_quick_tcp_run_structure(tcp_run):
    out, proc, doc, elapsed = tcp_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert elapsed < 20, f"the smoke subset took {elapsed:.1f} s"
    assert doc["schema"] == "smcish-bench/1"
    for key in ("cpu_model", "cores", "kernel", "python", "uvloop", "date"):
        assert doc["machine"][key], key
    assert doc["settings"]["quick"] is True and doc["settings"]["repeat"] == 2
    assert [c["name"] for c in doc["cases"]] == SMOKE_CASES.split(",")
    ms = doc["measurements"]
    assert len(ms) == 2 * 2 * 2  # cases x configurations x rounds
    assert all(m["status"] == "ok" for m in ms), [m["error"] for m in ms]
    # interleaved: within a case and round, every configuration runs before the next round starts
    order = [(m["case"], m["round"], m["config"]) for m in ms]
    assert order[:4] == [("latency.64B.streams", 0, "asyncio/tcp"), ("latency.64B.streams", 0, "uvloop/tcp"),
                         ("latency.64B.streams", 1, "asyncio/tcp"), ("latency.64B.streams", 1, "uvloop/tcp")]
    for m in ms:
        assert m["loop"] == m["config"].split("/")[0] and m["transport"] == "tcp"
        for side in ("client", "server"):
            assert ("uvloop" in m["loop_class"][side]) == (m["loop"] == "uvloop"), m["loop_class"]
        assert m["modes"]["client"] == {"none": 1} and m["modes"]["server"] == {"none": 1}
        cpu = m["cpu"]
        assert cpu["total_s"] > 0 and cpu["client"]["user"] + cpu["client"]["sys"] > 0
        assert cpu["server"]["user"] + cpu["server"]["sys"] > 0
        metrics = m["metrics"]
        if m["case"].startswith("latency."):
            assert 0 < metrics["min_us"] <= metrics["p50_us"] <= metrics["p99_us"] <= metrics["max_us"]
            assert metrics["ops"] > 10 and metrics["cpu_us_per_op"] > 0
            assert sum(count for _, count in m["raw"]["rtt_hist_ns"]) == metrics["ops"]
        else:
            assert metrics["MBps"] > 0 and metrics["cpu_s_per_GiB"] > 0 and metrics["bytes"] > 0
            measured = [s for s in m["raw"]["segments"] if s["phase"] == "measured"]
            assert len(measured) == 1 and measured[0]["bytes"] == metrics["bytes"]
    summary = doc["summary"]["throughput.64KiB.bufproto"]["uvloop/tcp"]
    assert summary["status"] == "ok" and summary["metrics"]["MBps"]["n"] == 2
    assert summary["ratios"]["vs_uvloop_tcp"]["median"] == pytest.approx(1.0)
    assert any(t["status"] == "SKIP" for t in doc["targets"])
    md = (out / "summary.md").read_text()
    assert "## Round-trip latency" in md and "asyncio/tcp" in md
    assert "latency.64B.streams" in proc.stdout and "Targets" in proc.stdout


def test_plots_from_smoke_results(tcp_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, doc, _ = tcp_run
    written, why = report.plots(doc, str(tmp_path))
    assert why is None
    assert set(written) == {"latency.png", "throughput.png", "cpu_per_gib.png"}
    assert all((tmp_path / name).stat().st_size > 1000 for name in written)


# --- smcish: only where it imports and a loopback connection really gets shared memory -----------------

def _smcish_probe() -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.peers", "probe", "--transport", "smcish"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"available": False, "reason": proc.stderr[-300:]}


@pytest.mark.timeout(120)
def test_quick_smcish_run(tmp_path):
    probe = _smcish_probe()
    if not probe.get("available") or probe.get("mode") != "ism":
        error = (probe.get("error") or "").strip().splitlines()
        why = probe.get("reason") or (error[-1] if error
                                      else f"mode {probe.get('mode')!r} ({probe.get('reason')})")
        pytest.skip(f"smcish does not negotiate shared memory here: {why}")
    proc, doc, _ = run_harness(tmp_path, "--cases", SMOKE_CASES, "--transports", "tcp,smcish,smcish-fallback",
                               "--loops", "asyncio", "--repeat", "1")
    ms = {(m["case"], m["transport"]): m for m in doc["measurements"]}
    for case in SMOKE_CASES.split(","):
        ism, fallback = ms[case, "smcish"], ms[case, "smcish-fallback"]
        assert ism["status"] == "ok", ism["error"]
        assert fallback["status"] == "ok", fallback["error"]
        assert set(ism["modes"]["client"]) == {"ism"} and set(ism["modes"]["server"]) == {"ism"}
        assert set(fallback["modes"]["client"]) == {"tcp"}
        assert ism["metrics"][report.CASES_BY_NAME[case].primary.key] > 0
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_smcish_missing_is_unavailable_not_fatal(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "smcish", None)  # `import smcish` raises ImportError
    available, why, _ = peers.smcish_importable()
    assert not available and "import smcish failed" in why

    monkeypatch.setattr(harness, "probe_transports", lambda chosen, env: {
        t.name: {"available": False, "reason": why} for t in chosen if t.needs_smcish})
    status = harness.main(["--quick", "--no-plots", "-q", "--cases", "latency.64B.protocol", "--repeat", "1",
                           "--transports", "tcp,smcish", "--loops", "asyncio", "--out", str(tmp_path)])
    assert status == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    by_config = {m["config"]: m for m in doc["measurements"]}
    assert by_config["asyncio/tcp"]["status"] == "ok"
    assert by_config["asyncio/smcish"]["status"] == "unavailable"
    assert doc["summary"]["latency.64B.protocol"]["asyncio/smcish"]["status"] == "unavailable"


# --- TLS cases: tcp on both loops, and smcish where it negotiates shared memory --------------------------

@pytest.mark.timeout(120)
def test_quick_tls_run(tmp_path):
    pytest.importorskip("trustme")
    probe = _smcish_probe()
    smcish_ok = probe.get("available") and probe.get("mode") == "ism"
    chosen = ["tcp", "smcish"] if smcish_ok else ["tcp"]
    proc, doc, _ = run_harness(tmp_path, "--cases", "tls", "--transports", ",".join(chosen),
                               "--loops", "asyncio,uvloop", "--repeat", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert [c["name"] for c in doc["cases"]] == TLS_CASES and all(c["tls"] for c in doc["cases"])
    tls_settings = doc["settings"]["tls"]
    assert tls_settings["server_hostname"] == "localhost" and tls_settings["client_verifies"]
    ms = doc["measurements"]
    assert len(ms) == len(TLS_CASES) * 2 * len(chosen)
    expect_mode = {"tcp": "none", "smcish": "ism"}
    for m in ms:
        assert m["status"] == "ok", m["error"]
        for side in ("client", "server"):
            assert set(m["modes"][side]) == {expect_mode[m["transport"]]}, m["modes"]
            assert m["tls"][side] and all(k.startswith("TLS") for k in m["tls"][side]), m["tls"]
        assert m["metrics"][report.CASES_BY_NAME[m["case"]].primary.key] > 0
        if m["case"].startswith("tls.throughput."):
            assert m["raw"]["segments"][-1]["phase"] == "measured"
    md = (tmp_path / "summary.md").read_text()
    assert "## TLS" in md and all(name in md for name in TLS_CASES)
    assert all(name in proc.stdout for name in TLS_CASES)
    # no target for TLS (the issue asks for the comparison only)
    assert not any(t.case.startswith("tls.") for t in TARGETS)
    assert not any(str(v.get("case", "")).startswith("tls.") for v in doc["targets"])


def test_tls_without_trustme_is_unavailable_not_fatal(monkeypatch, tmp_path):
    def no_trustme(directory):
        raise ImportError("No module named 'trustme'")

    monkeypatch.setattr(harness, "write_tls_files", no_trustme)
    status = harness.main(["--quick", "--no-plots", "-q", "--cases", "tls.latency.64B.streams",
                           "--repeat", "1", "--transports", "tcp", "--loops", "asyncio",
                           "--out", str(tmp_path)])
    assert status == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    (m,) = doc["measurements"]
    assert m["status"] == "unavailable" and "trustme" in m["error"]
    assert "trustme" in doc["settings"]["tls"]["unavailable"]


def test_tls_client_verifies_the_server_certificate(tmp_path):
    pytest.importorskip("trustme")
    run, other = tmp_path / "run", tmp_path / "other"
    run.mkdir()
    other.mkdir()
    transports.write_tls_files(str(run))
    transports.write_tls_files(str(other))  # another CA: its certificate must not be trusted

    async def main():
        async def echo(reader, writer):
            try:
                writer.write(await reader.readexactly(2))
                await writer.drain()
            finally:
                writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=transports.server_ssl_context(str(run)))
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=transports.client_ssl_context(str(run)),
                server_hostname=transports.TLS_HOSTNAME)
            writer.write(b"hi")
            assert await reader.readexactly(2) == b"hi"
            assert transports.tls_of(writer)["version"].startswith("TLS")
            writer.close()
            for directory, hostname in ((other, transports.TLS_HOSTNAME),
                                        (run, "not-" + transports.TLS_HOSTNAME)):
                with pytest.raises(ssl.SSLCertVerificationError):
                    await asyncio.open_connection(
                        "127.0.0.1", port, ssl=transports.client_ssl_context(str(directory)),
                        server_hostname=hostname)

    asyncio.run(main())


# --- the pieces that make a wrong figure impossible (no sockets) ---------------------------------------

def _stream(offset: int, n: int) -> bytes:
    return bytes((offset + i) % workloads.PERIOD for i in range(n))


@pytest.mark.parametrize("full", [False, True])
def test_pattern_check_catches_loss_and_corruption(full):
    good = workloads.PatternCheck(full)
    good.span(_stream(0, 1000), 0, 1000)
    good.span(b"xx" + _stream(1000, 500), 2, 500)
    assert (good.offset, good.mismatches) == (1500, 0)

    lost = workloads.PatternCheck(full)
    lost.span(_stream(0, 1000), 0, 1000)
    lost.span(_stream(1001, 500), 0, 500)  # one byte dropped
    assert lost.mismatches == 1 and lost.first_bad == 1000

    corrupt = workloads.PatternCheck(full)
    data = bytearray(_stream(0, 1001))
    data[500] ^= 0xFF  # the middle byte: caught by both modes
    corrupt.span(data, 0, 1001)
    assert corrupt.mismatches == 1


class _FakeTransport:
    def __init__(self):
        self.written = bytearray()
        self.aborted = False

    def write(self, data):
        self.written += data

    def abort(self):
        self.aborted = True

    def get_extra_info(self, name, default=None):
        return default


def _feed(proto, data: bytes, step: int) -> None:
    for i in range(0, len(data), step):
        chunk = data[i:i + step]
        buf = proto.get_buffer(len(chunk))
        buf[:len(chunk)] = chunk
        proto.buffer_updated(len(chunk))


@pytest.mark.parametrize("step", [1, 7, 4096, 1 << 20])
def test_sink_protocol_segments_at_any_split(step):
    state = workloads.ServerState()
    proto = workloads.SinkProtocol(state)
    transport = _FakeTransport()
    proto.connection_made(transport)
    wire = (workloads.HEADER.pack(workloads.MAGIC, workloads.KIND_STREAM, 0, 64)
            + workloads.SEGMENT.pack(3000) + _stream(0, 3000)
            + workloads.SEGMENT.pack(5000) + _stream(3000, 5000) + workloads.SEGMENT.pack(0))
    _feed(proto, wire, step)
    lines = [json.loads(line) for line in transport.written.splitlines()]
    assert [line["bytes"] for line in lines] == [3000, 8000]
    assert lines[-1]["mismatches"] == 0 and not transport.aborted and not state.errors


def test_sink_protocol_reports_corruption():
    state = workloads.ServerState()
    proto = workloads.SinkProtocol(state)
    transport = _FakeTransport()
    proto.connection_made(transport)
    payload = bytearray(_stream(0, 4096))
    payload[0] ^= 1
    _feed(proto, workloads.HEADER.pack(workloads.MAGIC, workloads.KIND_STREAM, 0, 64)
          + workloads.SEGMENT.pack(4096) + bytes(payload), 1024)
    assert json.loads(transport.written)["mismatches"] == 1


def test_case_selection():
    assert select_cases(None) == [c for c in CASES if not c.opt_in]
    assert [c.name for c in select_cases("latency.64B")] == ["latency.64B.streams", "latency.64B.protocol"]
    assert {c.kind for c in select_cases("throughput.*KiB.bufproto")} == {"throughput"}
    assert len(select_cases("throughput.*KiB.bufproto")) == 2
    assert [c.name for c in select_cases("tls")] == TLS_CASES
    assert not any(c.tls for c in select_cases("latency,throughput,rate,setup"))
    assert all(c.transports == ("tcp", "smcish") for c in select_cases("tls"))
    with pytest.raises(ValueError):
        select_cases("no-such-case")


def test_targets_use_paired_rounds():
    def m(config, rnd, value):
        return {"case": "setup.64B", "config": config, "round": rnd, "status": "ok", "error": None,
                "metrics": {"conns_per_s": value, "cpu_us_per_conn": 1.0}}

    doc = {"cases": [{"name": "setup.64B"}],
           "measurements": [m("uvloop/tcp", 0, 100), m("uvloop/smcish", 0, 80),
                            m("uvloop/tcp", 1, 200), m("uvloop/smcish", 1, 140),
                            m("asyncio/tcp", 0, 100), m("asyncio/smcish", 0, 50)]}
    doc["summary"] = report.summarize(doc)
    verdicts = {v["text"]: v for v in report.evaluate_targets(doc)}
    uv = verdicts["connection set-up rate >= 1.0x plain TCP (at the very least 0.75x)"]
    assert uv["status"] == "MISS" and uv["ratio"]["median"] == pytest.approx(0.75)
    assert uv["ratio"]["min"] == pytest.approx(0.7) and uv["ratio"]["max"] == pytest.approx(0.8)
    assert uv["missed_by"] == pytest.approx(1 / 0.75 - 1) and uv["floor_met"] is True
    aio = verdicts["connection setup rate (asyncio) >= 0.75x plain TCP"]
    assert aio["status"] == "MISS" and aio["missed_by"] == pytest.approx(0.5) and "floor_met" not in aio
    lines = report.target_lines(report.evaluate_targets(doc))
    assert any("floor 0.75x met" in line for line in lines)
    assert lines[0] == "link-group issue (v2):" and "issue 5 (v1), still applying:" in lines


def test_absolute_and_runs_targets():
    def m(case, config, rnd, status="ok", **metrics):
        return {"case": case, "config": config, "round": rnd, "status": status,
                "error": None if status == "ok" else "benchmarks.workloads.ModeMismatch: 3 tcp",
                "metrics": metrics}

    scale = {"rss_KiB_per_conn": 10.0, "shm_rss_KiB_per_conn": 8.0, "client_rss_KiB_per_conn": 11.0,
             "client_shm_rss_KiB_per_conn": 8.0, "open_s": 1.0, "server_rss_MiB": 100.0,
             "server_shm_mapped_MiB": 1000.0, "server_shm_rss_MiB": 80.0, "client_rss_MiB": 110.0,
             "client_shm_mapped_MiB": 1000.0, "client_shm_rss_MiB": 80.0}
    doc = {"cases": [{"name": "scale.2000"}, {"name": "scale.10000"}],
           "measurements": [
               m("scale.2000", "uvloop/smcish", 0, fds_per_conn=1.02, client_fds_per_conn=1.3,
                 shm_mapped_KiB_per_conn=200.0, client_shm_mapped_KiB_per_conn=600.0, **scale),
               m("scale.2000", "uvloop/smcish", 1, fds_per_conn=1.04, client_fds_per_conn=1.0,
                 shm_mapped_KiB_per_conn=210.0, client_shm_mapped_KiB_per_conn=700.0, **scale),
               m("scale.10000", "uvloop/smcish", 0, fds_per_conn=1.0, client_fds_per_conn=1.0,
                 shm_mapped_KiB_per_conn=130.0, client_shm_mapped_KiB_per_conn=130.0, **scale)]}
    doc["summary"] = report.summarize(doc)
    verdicts = {v["text"]: v for v in report.evaluate_targets(doc)}
    fds = verdicts["2,000 connections: fds per shared-memory connection (server) <= 1.1"]
    assert fds["status"] == "PASS" and fds["ratio"]["median"] == pytest.approx(1.03)
    client_fds = verdicts["2,000 connections: fds per shared-memory connection (client) <= 1.1"]
    assert client_fds["status"] == "MISS" and client_fds["straddles"]  # rounds 1.3 and 1.0: median 1.15
    mapped = verdicts["2,000 connections: mapped shared memory per connection, idle (client) <= 512 KiB"]
    assert mapped["status"] == "MISS" and mapped["missed_by"] == pytest.approx(650 / 512 - 1)
    runs = verdicts["10,000 concurrent connections in one process, all shared memory"]
    assert runs["status"] == "PASS" and runs["shown"]["server_rss_MiB"]["median"] == 100.0
    lines = "\n".join(report.target_lines(report.evaluate_targets(doc)))
    assert "server RSS 100 MiB" in lines and "= 650 [600-700] KiB (target <= 512 KiB)" in lines

    doc["measurements"][-1] = m("scale.10000", "uvloop/smcish", 0, status="failed")
    doc["measurements"][-1]["partial"] = {"metrics": dict(scale, server_rss_MiB=123.0)}
    doc["summary"] = report.summarize(doc)
    runs = {v["text"]: v for v in report.evaluate_targets(doc)}[
        "10,000 concurrent connections in one process, all shared memory"]
    assert runs["status"] == "FAIL" and "ModeMismatch" in runs["why"]
    assert runs["partial"]["server_rss_MiB"]["median"] == 123.0
    # partial figures stay out of summaries
    assert doc["summary"]["scale.10000"]["uvloop/smcish"]["n_ok"] == 0
    assert any("measured anyway" in line and "server RSS 123 MiB" in line
               for line in report.target_lines(report.evaluate_targets(doc)))


def test_scale_cases_are_opt_in():
    assert not any(c.kind == "scale" for c in select_cases(None))
    assert [c.name for c in select_cases("scale")] == ["scale.2000", "scale.10000"]
    tiny = select_cases("scale.7")
    assert [(c.name, c.kind, c.conns) for c in tiny] == [("scale.7", "scale", 7)]
    assert report.CASES_BY_NAME["scale.7"] is tiny[0]
    assert len(select_cases("all")) == len(CASES)


def test_memfd_mappings_parser(tmp_path):
    smaps = tmp_path / "smaps"
    smaps.write_text(
        "7f0000000000-7f0001000000 rw-s 00000000 00:01 123 /memfd:smcish-region (deleted)\n"
        "Size:              16384 kB\nRss:                 200 kB\nPss:                 100 kB\n"
        "7f0001000000-7f0001001000 r--p 00000000 08:01 456 /usr/lib/libc.so.6\n"
        "Size:                  4 kB\nRss:                   4 kB\nPss:                   4 kB\n"
        "7f0002000000-7f0002400000 r--s 00000000 00:01 789 /memfd:smcish-region (deleted)\n"
        "Size:               4096 kB\nRss:                   8 kB\nPss:                   8 kB\n"
        "7f0003000000-7f0003001000 rw-p 00000000 00:00 0 \n"
        "Size:                  4 kB\nRss:                   4 kB\nPss:                   4 kB\n")
    got = scale.memfd_mappings(str(smaps))
    assert (got["mappings"], got["size_kib"], got["rss_kib"], got["pss_kib"]) == (2, 20480, 208, 108)
    assert got["by_name"]["smcish-region"]["mappings"] == 2


# --- scale cases with a tiny N: structure only (fds are counted, never timed) ------------------------------

@pytest.mark.timeout(120)
def test_scale_tiny_run(tmp_path):
    n = 12
    probe = _smcish_probe()
    smcish_ok = probe.get("available") and probe.get("mode") == "ism"
    transports = "tcp,smcish" if smcish_ok else "tcp"
    proc, doc, _ = run_harness(tmp_path, "--cases", f"scale.{n}", "--transports", transports,
                               "--loops", "asyncio", "--repeat", "1", "--scale-inflight", "4",
                               timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ms = {m["transport"]: m for m in doc["measurements"]}
    tcp = ms["tcp"]
    assert tcp["status"] == "ok", tcp["error"]
    assert tcp["modes"] == {"client": {"none": n}, "server": {"none": n}}
    per_conn = tcp["raw"]["per_conn"]
    for side in ("server", "client"):
        assert per_conn[side]["fd_kinds_delta"].get("socket") == n, per_conn[side]
        assert per_conn[side]["shm_mapped_KiB_per_conn"] == 0
    assert tcp["metrics"]["conns"] == n and tcp["metrics"]["open_s"] > 0
    snapshots = tcp["raw"]["snapshots"]
    assert snapshots["server"]["baseline"]["pid"] != snapshots["client"]["baseline"]["pid"]
    assert "scale.12" in proc.stdout and "2,000 connections" in proc.stdout
    if smcish_ok:
        ism = ms["smcish"]
        assert ism["status"] == "ok", ism["error"]
        assert ism["modes"] == {"client": {"ism": n}, "server": {"ism": n}}
        for side, prefix in (("server", "server_"), ("client", "client_")):
            assert ism["metrics"][prefix + "slots"] == n and ism["metrics"][prefix + "link_groups"] >= 1
            assert ism["raw"]["per_conn"][side]["shm_mapped_KiB_per_conn"] > 0
            assert ism["raw"]["per_conn"][side]["fd_kinds_delta"].get("socket", 0) >= n
