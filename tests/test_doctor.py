"""`python -m smcish doctor`: each verdict against what a real connection actually does."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import pytest

from benchmarks.children import DEVNULL, spawn_python
from device_helpers import Ismd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 20

PROGRAMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "programs")
ECHO_SERVER = os.path.join(PROGRAMS, "echo_server.py")
MODE_CLIENT = os.path.join(PROGRAMS, "mode_client.py")
COUNTING_SERVER = os.path.join(PROGRAMS, "counting_server.py")


def _env(**changes):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _low_nofile():
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))


def doctor(*args, env=None, preexec_fn=None):
    """Run `python -m smcish doctor --json ARGS`: (exit status, parsed report)."""
    proc = subprocess.run([sys.executable, "-m", "smcish", "doctor", "--json", *args],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT,
                          env=env or _env(), preexec_fn=preexec_fn)
    report = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, report


def connect(port, env=None, preexec_fn=None):
    """A real smcish.open_connection from a child: (mode, reason name or None)."""
    proc = subprocess.run([sys.executable, MODE_CLIENT, str(port)], capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=ROOT, env=env or _env(),
                          preexec_fn=preexec_fn)
    assert proc.returncode == 0, proc.stderr
    mode, reason = proc.stdout.split()
    return mode, None if reason == "None" else reason


def check(report, name):
    return [c for c in report["checks"] if c["name"] == name]


@pytest.fixture(scope="module")
def servers():
    """An smcish and a plain echo server (real processes), by kind: their ports."""
    with contextlib.ExitStack() as stack:
        ports = {}
        for kind in ("smcish", "plain"):
            child = stack.enter_context(spawn_python(script=ECHO_SERVER, args=[kind], env=_env(),
                                                     stdin=DEVNULL, handshake=str.isdigit))
            ports[kind] = int(child.hello)
        yield ports


def test_bad_arguments():
    assert doctor("not-a-target")[0] == 2
    assert doctor("127.0.0.1:99999")[0] == 2
    proc = subprocess.run([sys.executable, "-m", "smcish", "doctor", "--bogus"], cwd=ROOT,
                          env=_env(), capture_output=True, timeout=TIMEOUT)
    assert proc.returncode == 2


def test_device_ok_no_target():
    code, report = doctor()
    assert code == 0, report
    assert report["verdict"] == {"mode": "ism", "reason": None, "remedy": None}
    assert check(report, "device")[0]["status"] == "OK"


def test_no_device(servers):
    env = _env(SMCISH_DEVICE="none")
    code, report = doctor(f"127.0.0.1:{servers['smcish']}", env=env)
    assert code == 1
    assert report["verdict"]["mode"] == "tcp"
    assert report["verdict"]["reason"] == "NO_DEVICE"
    assert report["verdict"]["remedy"]
    assert connect(servers["smcish"], env=env) == ("tcp", "NO_DEVICE")


@pytest.mark.parametrize("squat", ["group_writable", "foreign_owner"])
def test_squatted_runtime_dir(servers, squat):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rt")
        os.mkdir(path, 0o700)
        if squat == "group_writable":
            os.chmod(path, 0o770)
            expected = "accessible by group/others"
        else:
            if os.geteuid() != 0:
                pytest.skip("chown to another uid needs root")
            os.chown(path, 65534, 65534)
            expected = "owned by uid 65534"
        env = _env(SMCISH_RUNTIME_DIR=path)
        code, report = doctor(f"127.0.0.1:{servers['smcish']}", env=env)
        assert code == 1
        (device,) = check(report, "device")
        assert device["status"] == "FAIL"
        assert expected in device["detail"]
        assert device["reason"] == "NO_DEVICE"
        assert check(report, "runtime dir")[0]["status"] == "WARN"
        assert report["verdict"]["reason"] == "NO_DEVICE"
        assert connect(servers["smcish"], env=env) == ("tcp", "NO_DEVICE")


def test_ismd_unreachable(servers):
    env = _env(SMCISH_DEVICE="unix:/nonexistent")
    code, report = doctor(env=env)
    assert code == 1
    (device,) = check(report, "device")
    assert device["status"] == "FAIL" and "not reachable" in device["detail"]
    assert report["verdict"]["reason"] == "NO_DEVICE"
    assert connect(servers["smcish"], env=env) == ("tcp", "NO_DEVICE")


def test_ismd_quota(tmp_path):
    """A running ismd: the quota line, and with the uid's quota nearly used up, a FAIL (QUOTA) that
    a real connection from a new process agrees with; with room, shared memory again."""
    from ism_backend.client import DaemonDevice

    daemon = Ismd("--quota", "12M", "--total-memory", "64M")
    try:
        env = _env(SMCISH_DEVICE=daemon.spec)
        with spawn_python(script=ECHO_SERVER, args=["smcish"], env=env, stdin=DEVNULL,
                          handshake=str.isdigit) as server:
            port = int(server.hello)
            code, report = doctor(f"127.0.0.1:{port}", env=env)
            (quota,) = check(report, "quota")
            assert quota["status"] in ("OK", "WARN") and "ismd quota 12582912 bytes" in quota["detail"]
            assert code == 0 and report["verdict"]["mode"] == "ism", report
            assert connect(port, env=env) == ("ism", None)
            # hold the rest of this uid's quota (the server's group holds its first extent)
            holder = DaemonDevice(daemon.path)
            try:
                held = []
                for _ in range(12):
                    try:
                        held.append(holder.alloc(1 << 20))
                    except Exception:
                        break
                code, report = doctor(f"127.0.0.1:{port}", env=env)
                (quota,) = check(report, "quota")
                assert quota["status"] == "FAIL" and quota["reason"] == "QUOTA", quota
                assert code == 1 and report["verdict"]["reason"] == "QUOTA", report
                mode, reason = connect(port, env=env)
                assert mode == "tcp" and reason in ("QUOTA", "NO_MEMORY"), (mode, reason)
            finally:
                holder.close()
    finally:
        daemon.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run ismd as another uid")
def test_ismd_of_another_user(servers):
    daemon = Ismd(setuid=4321)
    try:
        env = _env(SMCISH_DEVICE=daemon.spec)
        code, report = doctor(env=env)
        (device,) = check(report, "device")
        assert device["status"] == "FAIL" and "SMCISH_DAEMON_UID=4321" in device["detail"], device
        assert code == 1 and report["verdict"]["reason"] == "NO_DEVICE", report
        assert connect(servers["smcish"], env=env) == ("tcp", "NO_DEVICE")
        trusted = _env(SMCISH_DEVICE=daemon.spec, SMCISH_DAEMON_UID="4321")
        code, report = doctor(env=trusted)
        assert check(report, "device")[0]["status"] == "OK", report
    finally:
        daemon.stop()


def test_smcish_listener(servers):
    code, report = doctor(f"127.0.0.1:{servers['smcish']}")
    assert code == 0, report
    assert report["verdict"]["mode"] == "ism"
    assert check(report, "listener")[0]["status"] == "OK"
    assert check(report, "advert")[0]["status"] == "OK"
    assert connect(servers["smcish"]) == ("ism", None)


@pytest.mark.parametrize("rules, mode", [
    ("tcp port={port}", "tcp"), ("tcp address=10.0.0.0/8; tcp port=1-1023", "ism"),
    ("ism port={port}; tcp", "ism"), ("tcp side=client", "tcp")])
def test_policy_verdict_matches_a_real_connection(servers, rules, mode):
    port = servers["smcish"]
    env = _env(SMCISH_POLICY=rules.format(port=port))
    code, report = doctor(f"127.0.0.1:{port}", env=env)
    policy_checks = check(report, "policy")
    assert policy_checks[0]["status"] == "INFO" and "SMCISH_POLICY" in policy_checks[0]["detail"]
    if mode == "tcp":
        assert code == 1 and report["verdict"]["reason"] == "DISABLED_BY_POLICY", report
        assert policy_checks[1]["status"] == "FAIL" and "SMCISH_POLICY rule" in policy_checks[1]["detail"]
        assert connect(port, env=env) == ("tcp", "DISABLED_BY_POLICY")
    else:
        assert code == 0 and report["verdict"]["mode"] == "ism", report
        assert policy_checks[1]["status"] == "OK"
        assert connect(port, env=env) == ("ism", None)


def test_malformed_policy_is_reported_and_connections_raise(servers):
    env = _env(SMCISH_POLICY="tcp port=http")
    code, report = doctor(f"127.0.0.1:{servers['smcish']}", env=env)
    assert code == 1 and report["verdict"]["reason"] == "POLICY_ERROR", report
    assert "port 'http'" in check(report, "policy")[0]["detail"]
    proc = subprocess.run([sys.executable, MODE_CLIENT, str(servers["smcish"])], capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=ROOT, env=env)
    assert proc.returncode != 0 and "PolicyError" in proc.stderr and "port 'http'" in proc.stderr


def test_smcish_listener_text_output(servers):
    proc = subprocess.run([sys.executable, "-m", "smcish", "doctor",
                           f"localhost:{servers['smcish']}"], capture_output=True, text=True,
                          timeout=TIMEOUT, cwd=ROOT, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "verdict: shared memory"


def test_plain_listener(servers):
    code, report = doctor(f"127.0.0.1:{servers['plain']}")
    assert code == 1
    assert report["verdict"]["reason"] == "PEER_NOT_ADVERTISED"
    assert check(report, "advert")[0]["status"] == "FAIL"
    assert connect(servers["plain"]) == ("tcp", "PEER_NOT_ADVERTISED")


def test_nothing_listens():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # bound, not listening
        code, report = doctor(f"127.0.0.1:{port}")
    assert code == 1
    assert check(report, "listener")[0]["status"] == "FAIL"


def test_low_nofile_warns(servers):
    code, report = doctor(f"127.0.0.1:{servers['smcish']}", preexec_fn=_low_nofile)
    (limit,) = check(report, "RLIMIT_NOFILE")
    assert limit["status"] == "WARN", limit
    assert "soft 64" in limit["detail"]
    assert limit["remedy"] and "RLIMIT_NOFILE" in limit["remedy"]
    # a client still has room for a link group: the verdict stays, and a real connection agrees
    assert code == 0 and report["verdict"]["mode"] == "ism"
    assert connect(servers["smcish"], preexec_fn=_low_nofile) == ("ism", None)


# ------------------------------------------------------------------------------ --probe



def probe(*args, env=None):
    """`python -m smcish doctor --probe --json ARGS`: (exit status, report, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "smcish", "doctor", "--probe", "--json", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env=env or _env())
    report = json.loads(proc.stdout) if proc.stdout.strip() else None
    return proc.returncode, report, proc.stderr


def embedded_gid(report):
    (device,) = check(report, "device")
    assert device["status"] == "OK" and device["detail"].startswith("embedded, gid "), device
    return device["detail"].split()[2].rstrip(",")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_probe_local_pair(loop):
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    code, report, err = probe("--seconds", "0.5", "--size", "100", "--loop", loop)
    assert code == 0, (report, err)
    assert report["exit"] == 0 and report["verdict"]["mode"] == "ism"
    (line,) = check(report, "probe")
    assert line["status"] == "OK", line
    p = report["probe"]
    assert p["kind"] == "local-pair" and p["loop"] == loop and p["size"] == 100
    assert p["rounds"] >= 2 and p["measured"] is True
    assert p["server"]["loop"] == loop and p["server"]["pid"] != os.getpid()
    # the smcish side really went through shared memory, on the embedded device
    assert p["smcish"]["mode"] == "ism" and p["smcish"]["reason"] is None
    assert p["smcish"]["device"] == embedded_gid(report)
    assert p["tcp"]["mode"] == "tcp"
    for side in ("smcish", "tcp"):
        rtt, bulk = p[side]["rtt"], p[side]["throughput"]
        assert rtt["count"] > 0 and len(rtt["round_p50_us"]) == p["rounds"]
        assert all(rtt[k] > 0 for k in ("p50_us", "p10_us", "p90_us", "p99_us"))
        assert bulk["mb_per_s"] > 0 and bulk["bytes"] > 0
        assert len(bulk["round_mb_per_s"]) == p["rounds"]
    assert p["ratio"]["rtt_p50"] > 0 and p["ratio"]["mb_per_s"] > 0
    # the doctor reaped its child echo server before it exited
    assert not os.path.exists(f"/proc/{p['server']['pid']}")


def test_probe_local_pair_text_output():
    proc = subprocess.run([sys.executable, "-m", "smcish", "doctor", "--probe", "--seconds", "0.3"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[-1] == "verdict: shared memory"
    assert any(line.startswith("PROBE 64 B request/response") for line in lines), lines
    assert any("smcish/TCP p50" in line for line in lines), lines


def test_probe_local_pair_no_device():
    code, report, err = probe("--seconds", "0.3", env=_env(SMCISH_DEVICE="none"))
    assert code == 1, (report, err)
    assert report["verdict"]["reason"] == "NO_DEVICE"
    (line,) = check(report, "probe")
    assert line["status"] == "FAIL" and line["reason"] == "NO_DEVICE" and line["remedy"]
    p = report["probe"]
    assert p["smcish"]["mode"] == "tcp" and p["smcish"]["reason"] == "NO_DEVICE"
    assert p["smcish"]["remedy"] and p["measured"] is False
    assert "rtt" not in p["smcish"]          # no "gain" between two TCP connections


def test_probe_target_smcish_listener(servers):
    code, report, err = probe(f"127.0.0.1:{servers['smcish']}", "--seconds", "0.5")
    assert code == 0, (report, err)
    p = report["probe"]
    assert p["kind"] == "target" and "local-pair probe" in p["note"]
    smc, tcp = p["smcish"], p["tcp"]
    assert smc["count"] > 0 and tcp["count"] > 0
    assert smc["p50_us"] > 0 and tcp["p50_us"] > 0 and p["ratio"]["setup_p50"] > 0
    assert smc["modes"] == {"ism": smc["count"] + 1} and smc["reasons"] == {}
    assert smc["devices"] == [embedded_gid(report)]
    assert check(report, "probe")[0]["status"] == "OK"


def test_probe_target_plain_listener_gets_no_byte():
    with spawn_python(script=COUNTING_SERVER, env=_env(), handshake=str.isdigit) as server:
        port = int(server.hello)
        code, report, err = probe(f"127.0.0.1:{port}", "--seconds", "0.5")
        assert code == 1, (report, err)
        p = report["probe"]
        smc = p["smcish"]
        assert smc["modes"] == {"tcp": smc["count"] + 1}
        assert smc["reasons"] == {"PEER_NOT_ADVERTISED": smc["count"] + 1}
        assert smc["p50_us"] > 0 and p["tcp"]["p50_us"] > 0
        (line,) = check(report, "probe")
        assert line["status"] == "FAIL" and line["reason"] == "PEER_NOT_ADVERTISED"
        assert report["verdict"]["reason"] == "PEER_NOT_ADVERTISED"
        connections = smc["count"] + 1 + p["tcp"]["count"] + 1
        for _ in range(100):                 # the server's handlers see every close (bounded)
            server.send_line("?")
            counts = server.read_json(TIMEOUT)
            if counts["closed"] >= connections:
                break
            time.sleep(0.05)
        assert counts["accepted"] == connections, counts
        assert counts["closed"] == connections, counts
        assert counts["bytes"] == 0, counts


@pytest.mark.parametrize("output", ["json", "text"])
def test_probe_target_refused(output):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]          # bound, not listening: refused
        cmd = [sys.executable, "-m", "smcish", "doctor", "--probe", f"127.0.0.1:{port}",
               "--seconds", "0.3"] + (["--json"] if output == "json" else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT,
                              env=_env())
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    if output == "json":
        report = json.loads(proc.stdout)
        assert report["exit"] == 2
        assert "cannot connect" in report["probe"]["error"]
        assert "Connection refused" in report["probe"]["error"]
    else:
        assert "FAIL probe: cannot connect to 127.0.0.1" in proc.stdout
        assert "Connection refused" in proc.stdout


def test_probe_bad_arguments():
    for args in (["--size", "10"], ["--probe", "--size", "0"], ["--probe", "--seconds", "0"],
                 ["--probe", "--size", "10", "127.0.0.1:1"], ["--probe", "--loop", "trio"]):
        proc = subprocess.run([sys.executable, "-m", "smcish", "doctor", *args], cwd=ROOT,
                              env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr
