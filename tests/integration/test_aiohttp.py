"""aiohttp over smcish: server and client session in separate processes, a 20 MiB FileResponse,
a websocket, and `wrk` (which knows nothing of smcish) against the same smcish server."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import urllib.request

import pytest

import smcish

from . import PYTHON, ROOT, example, run_json, spawn

aiohttp = pytest.importorskip("aiohttp", reason="aiohttp not installed (pip install '.[integration]')")
pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

APP = example("aiohttp_app.py")
FILE_SIZE = 20 << 20
HELLO = b"hello from aiohttp over smcish\n" * 8          # examples/aiohttp_app.py HELLO


def _server(loop: str):
    with spawn([PYTHON, APP, "server", "--port", "0", "--file-size", str(FILE_SIZE),
                "--loop", loop]) as server:
        yield server.read_json(30)


@pytest.fixture(scope="module")
def uvloop_server():
    pytest.importorskip("uvloop")
    yield from _server("uvloop")


@pytest.fixture(scope="module")
def asyncio_server():
    yield from _server("asyncio")


def _server_stats(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as resp:
        return json.load(resp)


def test_server_and_client_session_over_shared_memory(uvloop_server):
    port = uvloop_server["port"]
    assert uvloop_server["file_size"] == FILE_SIZE
    result = run_json([PYTHON, APP, "client", "--port", str(port), "--messages", "30"], timeout=90)
    assert result["checks"] == {"hello": True, "echo": True, "file": True, "websocket": True}, result
    assert result["mode"] == "ism" and result["server_mode"] == "ism", result
    assert result["ws_client"] == "ism" and result["ws_server"] == "ism", result
    # Every connection this client opened negotiated shared memory.
    assert result["client_connections"]["tcp"] == 0 and result["client_connections"]["ism"] >= 1, result


def test_default_loop_server_without_file_response(asyncio_server):
    port = asyncio_server["port"]
    result = run_json([PYTHON, APP, "client", "--port", str(port), "--no-file"], timeout=60)
    assert result["ok"] and result["mode"] == "ism" and result["server_mode"] == "ism", result
    assert result["ws_client"] == "ism" and result["ws_server"] == "ism", result


def test_default_loop_server_file_response(asyncio_server):
    port = asyncio_server["port"]
    result = run_json([PYTHON, APP, "client", "--port", str(port)], timeout=60)
    assert result["ok"] and result["checks"]["file"], result


@pytest.mark.parametrize("path", ["ism", "tcp"])
def test_loop_sendfile_on_an_smcish_transport(tmp_path, path):
    """loop.sendfile() on an SmcTransport (what FileResponse uses on the default loop), both paths."""
    data = os.urandom(300_000)
    src = tmp_path / "f.bin"
    src.write_bytes(data)
    kw = {"device": "none"} if path == "tcp" else {}

    async def main():
        sent = asyncio.get_running_loop().create_future()

        async def handle(reader, writer):
            try:
                with open(src, "rb") as f:
                    sent.set_result(await asyncio.get_running_loop().sendfile(writer.transport, f))
            except Exception as exc:
                sent.set_exception(exc)
            finally:
                writer.close()

        server = await smcish.start_server(handle, "127.0.0.1", 0, **kw)
        async with server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await smcish.open_connection("127.0.0.1", port, **kw)
            assert writer.get_extra_info("smcish").mode == path
            got = await reader.read()
            writer.close()
            await writer.wait_closed()
            assert await sent == len(data)       # raises the server's exception, if any
            return got

    with asyncio.Runner() as runner:
        assert runner.run(asyncio.wait_for(main(), 20)) == data


def _parse_wrk(out: str) -> dict:
    stats = {"requests": int(re.search(r"(\d+) requests in", out)[1]), "non2xx": 0, "socket_errors": 0}
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        stats["non2xx"] = int(m[1])
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        stats["socket_errors"] = sum(int(x) for x in m.groups())
    m = re.search(r"CHECK good=(\d+) bad=(\d+)", out)
    stats["good"], stats["bad"] = int(m[1]), int(m[2])
    return stats


WRK_CHECK = r'''
local expected = string.rep("hello from aiohttp over smcish\n", 8)
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) good = 0; bad = 0 end
function response(status, headers, body)
  if status == 200 and body == expected then good = good + 1 else bad = bad + 1 end
end
function done(summary, latency, requests)
  local g, b = 0, 0
  for _, t in ipairs(threads) do g = g + t:get("good"); b = b + t:get("bad") end
  io.write(string.format("CHECK good=%d bad=%d\n", g, b))
end
'''


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed (apt-get install wrk)")
def test_wrk_against_the_smcish_server_every_response_correct(asyncio_server, tmp_path):
    port = asyncio_server["port"]
    script = tmp_path / "check.lua"
    script.write_text(WRK_CHECK)
    before = _server_stats(port)
    proc = subprocess.run(["wrk", "-t2", "-c50", "-d3s", "--timeout", "5s", "-s", str(script),
                           f"http://127.0.0.1:{port}/hello"],
                          capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    stats = _parse_wrk(proc.stdout)
    after = _server_stats(port)
    assert stats["non2xx"] == 0 and stats["socket_errors"] == 0, proc.stdout
    assert stats["bad"] == 0 and stats["good"] >= 1000, proc.stdout   # every body checked by Lua
    assert stats["good"] >= stats["requests"], proc.stdout
    # wrk's 50 connections took the TCP fallback path on the server, none shared memory.
    assert after["connections_tcp"] - before["connections_tcp"] >= 50, (before, after)
    assert after["connections_ism"] == before["connections_ism"], (before, after)
    assert (after["fallbacks"].get("PEER_NOT_SMCISH", 0)
            - before["fallbacks"].get("PEER_NOT_SMCISH", 0)) >= 50, (before, after)
    # And the server still serves smcish clients over shared memory afterwards.
    result = run_json([PYTHON, APP, "client", "--port", str(port), "--no-file", "--messages", "3"])
    assert result["ok"] and result["mode"] == "ism" and result["server_mode"] == "ism", result


def test_stock_client_session_on_an_smcish_loop_is_correct(uvloop_server):
    """Transparent mode with aiohttp's own connector: correct whichever path it takes."""
    port = uvloop_server["port"]
    result = run_json([PYTHON, APP, "client", "--port", str(port), "--transparent", "--no-file"])
    assert result["ok"], result
    assert result["mode"] == result["server_mode"], result


async def _stock_sessions(port: int, n: int) -> tuple[int, int]:
    before = smcish.stats()
    for _ in range(n):
        async with aiohttp.ClientSession() as session, \
                session.get(f"http://127.0.0.1:{port}/hello") as resp:
            assert await resp.read() == HELLO
    after = smcish.stats()
    return (after["connections_ism"] - before["connections_ism"],
            after["connections_tcp"] - before["connections_tcp"])


def test_stock_client_session_on_an_smcish_loop_negotiates_shared_memory(uvloop_server):
    port = uvloop_server["port"]
    with asyncio.Runner(loop_factory=smcish.loop_factory()) as runner:
        ism, tcp = runner.run(asyncio.wait_for(_stock_sessions(port, 10), 30))
    assert (ism, tcp) == (10, 0)
