"""Containers: server and client in two network namespaces joined by a veth pair, sharing memory
through an ismd daemon (its socket is the only thing they share besides the veth link)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from benchmarks import children

from . import PYTHON, ROOT, child_env, example, run_json, spawn

pytestmark = [
    pytest.mark.integration, pytest.mark.root, pytest.mark.timeout(90),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces and a veth pair"),
    pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` not installed"),
]


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=15)
    if proc.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")


@pytest.fixture(scope="module")
def netns():
    """Two namespaces, server side 10.x.y.1, client side 10.x.y.2; removed afterwards."""
    tag = f"{os.getpid() % 100000}"
    server_ns, client_ns = f"smcish-it-s{tag}", f"smcish-it-c{tag}"
    server_if, client_if = f"smvs{tag}", f"smvc{tag}"              # <= 15 characters
    net = f"10.{random.randint(200, 250)}.{random.randint(0, 255)}"
    created = []
    try:
        for ns in (server_ns, client_ns):
            _ip("netns", "add", ns)
            created.append(ns)
        _ip("link", "add", server_if, "type", "veth", "peer", "name", client_if)
        for ns, ifname, addr in ((server_ns, server_if, f"{net}.1"), (client_ns, client_if, f"{net}.2")):
            _ip("link", "set", ifname, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
            _ip("-n", ns, "link", "set", ifname, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
    except RuntimeError as exc:
        for ns in created:
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", ns)
        with contextlib.suppress(RuntimeError):
            _ip("link", "del", server_if)
        pytest.skip(f"cannot create network namespaces here: {exc}")
    try:
        yield {"server_ns": server_ns, "client_ns": client_ns,
               "server_ip": f"{net}.1", "client_ip": f"{net}.2"}
    finally:
        for ns in created:                       # deleting a namespace deletes its veth end
            with contextlib.suppress(RuntimeError):
                _ip("netns", "del", ns)
        remaining = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert server_ns not in remaining and client_ns not in remaining


@pytest.fixture(scope="module")
def ismd():
    sockdir = tempfile.mkdtemp(prefix="ismd-it", dir="/tmp")
    os.chmod(sockdir, 0o755)
    path = os.path.join(sockdir, "ismd.sock")
    daemon = children.spawn_python(module="ism_backend.daemon", args=["serve", "--socket", path],
                                   env=child_env(), cwd=ROOT, stdin=None, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            assert daemon.alive(), f"ismd exited: {daemon.stderr_text(None)}"
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
                try:
                    probe.connect(path)
                    break
                except OSError:
                    assert time.monotonic() < deadline, "ismd did not come up"
                    time.sleep(0.05)
        yield path
    finally:
        daemon.stop()
        shutil.rmtree(sockdir, ignore_errors=True)


def _ismd_status(path: str) -> dict:
    proc = subprocess.run([PYTHON, "-m", "ism_backend.daemon", "status", "--socket", path],
                          capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=20)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _in(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns]


def test_echo_across_network_namespaces_through_ismd(netns, ismd):
    env = child_env(SMCISH_DEVICE=f"unix:{ismd}")
    server_ip = netns["server_ip"]
    with spawn([PYTHON, example("echo_server.py"), "--host", server_ip, "--port", "0",
                "--connections", "1"], env=env, prefix=_in(netns["server_ns"])) as server:
        port = server.read_json()["port"]
        # The listener is advertised on ismd under the server's veth address.
        adverts = _ismd_status(ismd)["adverts"]
        assert any(a["addr"] == server_ip and a["port"] == port for a in adverts), adverts
        # Only the veth link joins the namespaces: the client's own namespace has no such address.
        result = run_json([PYTHON, example("echo_client.py"), "--host", server_ip, "--port", str(port),
                           "--count", "200", "--size", "5000"], env=env, prefix=_in(netns["client_ns"]))
        closed = server.read_json()
        assert server.wait(10) == 0
    assert result["ok"] and result["mode"] == "ism", result
    assert closed["mode"] == "ism" and closed["bytes"] == 200 * 5000, closed
    assert closed["peer"].split(":")[0] == netns["client_ip"], closed


def test_grpclib_across_network_namespaces_through_ismd(netns, ismd):
    pytest.importorskip("grpclib")
    env = child_env(SMCISH_DEVICE=f"unix:{ismd}")
    grpc = example("grpc_service.py")
    with spawn([PYTHON, grpc, "server", "--host", netns["server_ip"], "--port", "0"], env=env,
               prefix=_in(netns["server_ns"])) as server:
        port = server.read_json()["port"]
        result = run_json([PYTHON, grpc, "client", "--host", netns["server_ip"], "--port", str(port),
                           "--messages", "20", "--calls", "20"], env=env, prefix=_in(netns["client_ns"]))
    assert result["ok"], result
    assert result["mode"] == "ism" and result["server_mode"] == "ism", result


def test_client_without_the_daemon_falls_back_across_namespaces(netns, ismd):
    """Control: the same client on another device (its own embedded one) stays TCP and works."""
    server_ip = netns["server_ip"]
    with spawn([PYTHON, example("echo_server.py"), "--host", server_ip, "--port", "0",
                "--connections", "1"], env=child_env(SMCISH_DEVICE=f"unix:{ismd}"),
               prefix=_in(netns["server_ns"])) as server:
        port = server.read_json()["port"]
        result = run_json([PYTHON, example("echo_client.py"), "--host", server_ip, "--port", str(port)],
                          env=child_env(), prefix=_in(netns["client_ns"]))
        closed = server.read_json()
    assert result["ok"] and result["mode"] == "tcp" and result["reason"] == "PEER_NOT_ADVERTISED", result
    assert closed["mode"] == "tcp", closed
