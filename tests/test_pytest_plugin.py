"""smcish.pytest_plugin: `pytest --smcish=ism|tcp|both [--smcish-strict]` on a sample project.

Each test writes a small project into tmp_path (asyncio tests that never import smcish) and runs
``python -m pytest`` on it in a subprocess (bounded), then reads its output and junit report.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

pytestmark = pytest.mark.timeout(120)

INI = """\
[pytest]
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
timeout = 30
"""

SAMPLE = '''\
import asyncio, os, socket, threading
import pytest

EXPECT_PATCHED = os.environ["SAMPLE_EXPECT_PATCHED"] == "1"


async def echo_roundtrip():
    async def handle(reader, writer):
        writer.write(await reader.read(100))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"ping")
        await writer.drain()
        data = await reader.read(100)
        writer.close()
        await writer.wait_closed()
    return data


def test_asyncio_echo():
    assert asyncio.run(echo_roundtrip()) == b"ping"


def test_uvloop_echo():
    uvloop = pytest.importorskip("uvloop")
    assert uvloop.run(echo_roundtrip()) == b"ping"


@pytest.mark.asyncio
async def test_pytest_asyncio_echo():
    assert await echo_roundtrip() == b"ping"


def patched():
    return hasattr(asyncio.get_running_loop(), "_smcish_originals")


@pytest.mark.asyncio
async def test_pytest_asyncio_loop_patched_or_not():
    assert patched() is EXPECT_PATCHED


def test_run_loops_patched_or_not():
    async def probe():
        return patched()

    assert asyncio.run(probe()) is EXPECT_PATCHED
    with asyncio.Runner() as runner:
        assert runner.run(probe()) is EXPECT_PATCHED
    uvloop = pytest.importorskip("uvloop")
    assert uvloop.run(probe()) is EXPECT_PATCHED


def plain_server():
    """A stdlib socket echo server in a thread: not an smcish listener."""
    listener = socket.create_server(("127.0.0.1", 0))

    def serve():
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1]


async def plain_roundtrip(port):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"pong")
    await writer.drain()
    data = await reader.readexactly(4)
    writer.close()
    await writer.wait_closed()
    return data


def test_plain_server_falls_back():
    assert asyncio.run(plain_roundtrip(plain_server())) == b"pong"


@pytest.mark.smcish_allow_tcp
def test_plain_server_allowed():
    assert asyncio.run(plain_roundtrip(plain_server())) == b"pong"
'''

TESTS = ["test_asyncio_echo", "test_uvloop_echo", "test_pytest_asyncio_echo",
         "test_pytest_asyncio_loop_patched_or_not", "test_run_loops_patched_or_not",
         "test_plain_server_falls_back", "test_plain_server_allowed"]
ECHO = TESTS[:3]


def run_sample(tmp_path, *args: str, patched: bool):
    """Run pytest on the sample; return (process, {test name: (outcome, properties, text)})."""
    (tmp_path / "pytest.ini").write_text(INI)
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    junit = tmp_path / "junit.xml"
    env = dict(os.environ, SAMPLE_EXPECT_PATCHED="1" if patched else "0")
    env.pop("PYTEST_ADDOPTS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-rA", f"--junitxml={junit}",
         *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    cases = {}
    if junit.exists():
        for case in ET.parse(junit).iter("testcase"):
            outcome = "passed"
            for tag in ("failure", "error", "skipped"):
                element = case.find(tag)
                if element is not None:
                    outcome = tag
                    text = (element.get("message") or "") + (element.text or "")
                    break
            else:
                text = ""
            props = {p.get("name"): p.get("value") for p in case.iter("property")}
            cases[case.get("name")] = (outcome, props, text)
    return proc, cases


def counts(props: dict) -> tuple[str, int, int, str]:
    return (props["smcish_mode"], int(props["smcish_ism"]), int(props["smcish_tcp"]),
            props["smcish_fallbacks"])


def test_without_the_option_the_plugin_does_nothing(tmp_path):
    # --strict-markers: the plugin is loaded (its marker is known), and that is all it does.
    proc, cases = run_sample(tmp_path, "--strict-markers", patched=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(cases) == sorted(TESTS)
    assert all(outcome == "passed" and not props for outcome, props, _ in cases.values()), cases
    # pytest's own header names the installed plugin ("plugins: ..., smcish-0.1.0"); nothing else.
    said = [line for line in (proc.stdout + proc.stderr).lower().splitlines()
            if "smcish" in line and not line.startswith("plugins:")]
    assert not said, proc.stdout + proc.stderr


def test_ism_runs_unchanged_asyncio_tests_on_shared_memory_and_reports_them(tmp_path):
    proc, cases = run_sample(tmp_path, "--smcish=ism", patched=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(cases) == sorted(TESTS)
    for name in ECHO:                        # asyncio.run, uvloop.run, pytest-asyncio
        assert counts(cases[name][1]) == ("ism", 2, 0, ""), (name, cases[name])
    # A stdlib server is no smcish listener: the client falls back (not strict: the test passes).
    assert counts(cases["test_plain_server_falls_back"][1]) == ("ism", 0, 1, "PEER_NOT_ADVERTISED=1")
    assert "smcish connections per test (--smcish=ism)" in proc.stdout
    assert "ism   test_sample.py::test_asyncio_echo\n" in proc.stdout, proc.stdout
    assert "test_sample.py::test_plain_server_falls_back  [PEER_NOT_ADVERTISED=1]" in proc.stdout


def test_tcp_forces_every_connection_to_fall_back(tmp_path):
    proc, cases = run_sample(tmp_path, "--smcish=tcp", patched=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in ECHO:
        assert counts(cases[name][1]) == ("tcp", 0, 2, "NO_DEVICE=2"), (name, cases[name])
    assert "smcish connections per test (--smcish=tcp)" in proc.stdout
    assert "total: 0 ism, 8 tcp (NO_DEVICE=8)" in proc.stdout, proc.stdout


def test_both_runs_each_test_twice_and_strict_fails_loopback_fallbacks(tmp_path):
    proc, cases = run_sample(tmp_path, "--smcish=both", "--smcish-strict", patched=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert sorted(cases) == sorted(f"{t}[smcish-{m}]" for t in TESTS for m in ("ism", "tcp"))
    failed = {name for name, (outcome, _, _) in cases.items() if outcome != "passed"}
    # Strict checks the shared-memory runs only, and the marker opts a test out.
    assert failed == {"test_plain_server_falls_back[smcish-ism]"}, cases
    _, props, text = cases["test_plain_server_falls_back[smcish-ism]"]
    assert counts(props) == ("ism", 0, 1, "PEER_NOT_ADVERTISED=1")
    assert "fell back to TCP" in text and "PEER_NOT_ADVERTISED" in text and "smcish_allow_tcp" in text
    for name in ECHO:
        assert counts(cases[f"{name}[smcish-ism]"][1]) == ("ism", 2, 0, "")
        assert counts(cases[f"{name}[smcish-tcp]"][1]) == ("tcp", 0, 2, "NO_DEVICE=2")
    assert "1 failed, 13 passed" in proc.stdout, proc.stdout


def test_strict_needs_a_shared_memory_mode(tmp_path):
    for args in (["--smcish-strict"], ["--smcish=tcp", "--smcish-strict"]):
        proc, cases = run_sample(tmp_path, *args, patched=False)
        assert proc.returncode == pytest.ExitCode.USAGE_ERROR and not cases, proc.stderr
        assert "--smcish-strict" in proc.stderr
