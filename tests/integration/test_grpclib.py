"""grpclib over smcish, both ends, in separate processes: unary and streaming calls on shared memory."""

from __future__ import annotations

import pytest

from . import PYTHON, example, run_json, spawn

pytest.importorskip("grpclib", reason="grpclib not installed (pip install '.[integration]')")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

GRPC = example("grpc_service.py")


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_grpclib_service_and_client_over_shared_memory(loop):
    with spawn([PYTHON, GRPC, "server", "--port", "0", "--loop", loop]) as server:
        port = server.read_json()["port"]
        result = run_json([PYTHON, GRPC, "client", "--port", str(port), "--loop", loop,
                           "--messages", "100", "--calls", "100"])
    assert result["ok"], result
    assert all(result["checks"].values()) and set(result["checks"]) == {
        "unary", "server_stream", "client_stream", "bidi_stream"}, result
    # The client read its transport under a grpclib stream; the server read its own in the handler.
    assert result["mode"] == "ism", result
    assert result["server_mode"] == "ism" and result["server_info_mode"] == "ism", result
    # And the server process counted it: one channel, one HTTP/2 connection, in shared memory.
    assert result["server_connections_ism"] == 1, result


def test_unchanged_grpclib_client_under_smcish_run():
    """The client on a stock loop, accelerated only by `python -m smcish run`."""
    with spawn([PYTHON, GRPC, "server", "--port", "0"]) as server:
        port = server.read_json()["port"]
        result = run_json([PYTHON, "-m", "smcish", "run", GRPC, "client", "--port", str(port),
                           "--plain", "--messages", "20", "--calls", "20"])
    assert result["ok"] and result["mode"] == "ism" and result["server_mode"] == "ism", result


def test_plain_grpclib_client_is_served_over_tcp():
    with spawn([PYTHON, GRPC, "server", "--port", "0"]) as server:
        port = server.read_json()["port"]
        result = run_json([PYTHON, GRPC, "client", "--port", str(port), "--plain",
                           "--messages", "20", "--calls", "20"])
    assert result["ok"], result
    assert result["mode"] == "plain" and result["server_mode"] == "tcp", result
    assert result["server_connections_ism"] == 0, result
