"""Smoke test of benchmarks/bench_rpc.py: a tiny run, both frameworks, both transports.

No figure is asserted beyond "measured, positive, and on the path it claims": performance is
measured by running the script, never in a timed test.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from . import PYTHON, ROOT, child_env

pytest.importorskip("grpclib")
pytest.importorskip("aiohttp")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_bench_rpc_smoke(tmp_path):
    out = tmp_path / "rpc.json"
    proc = subprocess.run([PYTHON, os.path.join(ROOT, "benchmarks", "bench_rpc.py"), "--duration", "0.2",
                           "--concurrency", "4", "--json", str(out)],
                          capture_output=True, text=True, env=child_env(), cwd=str(tmp_path), timeout=100)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())["results"]
    assert {(r["framework"], r["transport"]) for r in results} == {
        (f, t) for f in ("grpc", "aiohttp") for t in ("ism", "tcp")}
    for r in results:
        assert r["verified"], r                  # ism: shared memory on both ends; tcp: no smcish
        assert r["rps"] > 0 and r["p50_us"] > 0 and r["sequential_calls"] > 0, r
    assert "smcish/tcp" in proc.stdout
