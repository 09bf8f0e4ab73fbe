"""examples/echo_server.py and examples/echo_client.py run as scripts, in separate processes."""

from __future__ import annotations

import socket

import pytest

from . import PYTHON, child_env, example, run_json, spawn

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_echo_scripts_use_shared_memory_on_both_ends():
    with spawn([PYTHON, example("echo_server.py"), "--port", "0", "--connections", "2"]) as server:
        port = server.read_json()["port"]
        small = run_json([PYTHON, example("echo_client.py"), "--port", str(port), "--count", "200"])
        # Messages larger than the ring (64 KiB ring: every message wraps it several times).
        big = run_json([PYTHON, example("echo_client.py"), "--port", str(port), "--count", "20",
                        "--size", str(300_000)], env=child_env(SMCISH_RING_SIZE=65536))
        closed = [server.read_json(), server.read_json()]
        assert server.wait(10) == 0
    for result in (small, big):
        assert result["ok"] and result["mode"] == "ism", result
    assert big["bytes"] == 20 * 300_000
    assert [c["mode"] for c in closed] == ["ism", "ism"], closed
    assert sorted(c["bytes"] for c in closed) == sorted([200 * 64, 20 * 300_000])


def test_echo_server_serves_plain_and_device_less_clients_over_tcp():
    with spawn([PYTHON, example("echo_server.py"), "--port", "0", "--connections", "2"]) as server:
        port = server.read_json()["port"]
        # A client with smcish but no device: TCP, reason NO_DEVICE.
        nodev = run_json([PYTHON, example("echo_client.py"), "--port", str(port)],
                         env=child_env(SMCISH_DEVICE="none"))
        assert nodev["ok"] and nodev["mode"] == "tcp" and nodev["reason"] == "NO_DEVICE", nodev
        # A plain socket client, starting with smcish's own magic: echoed untouched.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            payload = b"SMCi\x01\x01\x00\x10 not a handshake iCMS" * 100
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
        assert got == payload
        closed = [server.read_json(), server.read_json()]
        assert server.wait(10) == 0
    assert [c["mode"] for c in closed] == ["tcp", "tcp"], closed
    assert {c["reason"] for c in closed} == {"PEER_NOT_SMCISH"}, closed
