"""Transparent mode against a plain server: an unchanged redis-py program under `python -m smcish run`
talking to a real redis-server. It works, and the server receives exactly the bytes it would have
received without smcish (recorded by a TCP proxy in between)."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import threading
import time

import pytest

from benchmarks.children import Child
from conftest import program

from . import PYTHON, ROOT, child_env, example, free_port, run_json

pytest.importorskip("redis", reason="redis-py not installed (pip install '.[integration]')")
pytestmark = [
    pytest.mark.integration, pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("redis-server") is None,
                       reason="redis-server not installed (apt-get install redis-server)"),
]

CLIENT = example("redis_client.py")
MAGIC = (b"SMCi", b"iCMS")      # smcish's handshake frames begin and end with these


def _redis_info(port: int) -> dict:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"*2\r\n$4\r\nINFO\r\n$3\r\nall\r\n")
        data = b""
        while True:
            data += sock.recv(65536)
            header, _, body = data.partition(b"\r\n")
            if header.startswith(b"$") and len(body) >= int(header[1:]):
                break
    info = {}
    for line in body.decode().splitlines():
        if ":" in line and not line.startswith("#"):
            key, _, value = line.partition(":")
            info[key] = value
    return info


@pytest.fixture(scope="module")
def redis_port(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("redis")
    for _ in range(5):
        port = free_port()
        server = Child(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                        "--appendonly", "no", "--dir", str(workdir)], stdin=None,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while server.alive() and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                _redis_info(port)
                break
            time.sleep(0.05)
        else:
            server.stop(5, signal.SIGKILL)
            continue                                   # lost the port race: try another
        with server:                                   # stopped at the end: SIGTERM, then SIGKILL
            yield port
        return
    pytest.fail("could not start redis-server")


class RecordingProxy:
    """A plain TCP proxy (threads and sockets, no asyncio, no smcish) recording both directions
    of every connection it relays."""

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections: list[dict] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target, timeout=10)
            record = {"c2s": bytearray(), "s2c": bytearray()}
            with self._lock:
                self.connections.append(record)
            for src, dst, buf in ((client, upstream, record["c2s"]), (upstream, client, record["s2c"])):
                thread = threading.Thread(target=self._pump, args=(src, dst, buf), daemon=True)
                thread.start()
                self._threads.append(thread)

    @staticmethod
    def _pump(src, dst, buf) -> None:
        try:
            while data := src.recv(65536):
                buf += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def take(self) -> list[dict]:
        """Wait for the relayed connections to finish; return their records and start afresh."""
        for thread in self._threads:
            thread.join(10)
        with self._lock:
            records, self.connections, self._threads = self.connections, [], []
        return records

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def proxy(redis_port):
    p = RecordingProxy(redis_port)
    yield p
    p.close()


def test_unchanged_redis_program_under_smcish_run(redis_port):
    """The exact command a user runs, straight at redis-server."""
    before = _redis_info(redis_port)
    result = run_json([PYTHON, "-m", "smcish", "run", CLIENT, "--port", str(redis_port),
                       "--prefix", "direct"])
    assert result["ok"], result
    after = _redis_info(redis_port)
    assert int(after["total_connections_received"]) > int(before["total_connections_received"])


def _run_lines(argv) -> list[dict]:
    proc = subprocess.run(argv, capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_wire_bytes_are_untouched(redis_port, proxy):
    args = [CLIENT, "--port", str(proxy.port), "--prefix", "wire"]
    # 1. Baseline: the program without smcish.
    info0 = _redis_info(redis_port)
    plain = _run_lines([PYTHON, *args])
    plain_wire = proxy.take()
    # 2. The same program under `smcish run` (plus a stats report at exit).
    info1 = _redis_info(redis_port)
    accelerated = _run_lines([PYTHON, program("smcish_run_with_stats.py"), *args])
    smc_wire = proxy.take()
    info2 = _redis_info(redis_port)

    assert plain[0]["ok"] and accelerated[0]["ok"], (plain, accelerated)
    # smcish was in the path: it saw every connection (commands, pub/sub...) and left each TCP
    # because redis-server is not an smcish listener.
    n = len(smc_wire)
    assert n == len(plain_wire) >= 2, (len(plain_wire), n)
    stats = accelerated[-1]["smcish_stats"]
    assert stats["connections_ism"] == 0 and stats["connections_tcp"] == n, stats
    assert stats["fallbacks"] == {"PEER_NOT_ADVERTISED": n}, stats
    assert stats["handshake_aborts"] == 0, stats
    # The server received byte for byte what the plain program sent, and no handshake byte.
    for record in smc_wire:
        for magic in MAGIC:
            assert magic not in record["c2s"] and magic not in record["s2c"]
    assert sorted(bytes(r["c2s"]) for r in smc_wire) == sorted(bytes(r["c2s"]) for r in plain_wire)
    assert sum(len(r["c2s"]) for r in smc_wire) > 3 << 20      # the 3 MiB SET went through
    # Same replies and the same error count on the server for both runs (redis-py probes a few
    # commands redis 7.0 may not know, e.g. CLIENT SETINFO: equal counts, not zero).
    # Each window also holds one INFO connection of ours: the same in both.
    def delta(a, b, key):
        return int(b.get(key, 0)) - int(a.get(key, 0))
    for key in ("total_error_replies", "total_commands_processed", "total_connections_received"):
        assert delta(info0, info1, key) == delta(info1, info2, key), key
