"""The echo examples in this process, for the pytest plugin's dogfood run (not collected by default).

tests/integration/test_echo_examples_plugin.py runs this module as
``python -m pytest --smcish=both --smcish-strict``: each test once on shared memory and once with no
device, and the plugin fails an ``[smcish-ism]`` test whose connections fell back to TCP. The
examples' own tests (test_echo_examples.py) run them as separate processes, where the plugin,
which counts this process's connections, would see nothing; here server and clients share the
test's event loop. Without ``--smcish`` every test skips.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json

import pytest

from . import example

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_example", example(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


echo_server = _load("echo_server")
echo_client = _load("echo_client")


@pytest.fixture(autouse=True)
def _under_the_plugin(smcish_mode):
    if smcish_mode is None:
        pytest.skip("run with `pytest --smcish=...` (see test_echo_examples_plugin.py)")


async def _with_example_server(monkeypatch, connections: int, client):
    """Run examples/echo_server.py's main() on this loop, then ``client(port)`` against it."""
    events: list[dict] = []
    listening = asyncio.Event()

    def emit(**fields):
        events.append(fields)
        if fields.get("event") == "listening":
            listening.set()

    monkeypatch.setattr(echo_server, "emit", emit)
    args = echo_server.parse(["--port", "0", "--connections", str(connections)])
    server = asyncio.create_task(echo_server.main(args))
    ready = asyncio.create_task(listening.wait())
    await asyncio.wait({server, ready}, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    if not listening.is_set():
        ready.cancel()
        server.cancel()
        raise AssertionError(f"echo_server did not listen: {events}")
    result = await client(events[0]["port"])
    await asyncio.wait_for(server, 10)
    return result, [e for e in events if e.get("event") == "closed"]


def test_echo_example_server_and_client(monkeypatch, capsys, smcish_mode):
    async def client(port):
        code = await echo_client.main(echo_client.parse(
            ["--port", str(port), "--count", "50", "--size", "100000"]))
        assert code == 0
        return json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    result, closed = asyncio.run(_with_example_server(monkeypatch, 1, client))
    assert result["ok"] and result["bytes"] == 50 * 100_000, result
    assert result["mode"] == smcish_mode and closed[0]["mode"] == smcish_mode, (result, closed)
    if smcish_mode == "tcp":
        assert result["reason"] == "NO_DEVICE", result


async def _stock_client(port: int) -> tuple[str, object]:
    """An unchanged asyncio client (no smcish call): accelerated by the plugin's transparent mode."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    info = writer.get_extra_info("smcish")
    for size in (1, 4096, 300_000):                # the last wraps a 64 KiB ring several times
        message = bytes(i % 251 for i in range(size))
        writer.write(message)
        await writer.drain()
        assert await reader.readexactly(size) == message
    writer.write_eof()
    assert await reader.read() == b""
    writer.close()
    await writer.wait_closed()
    return info.mode, info.reason


def test_unchanged_asyncio_client_against_the_echo_example(monkeypatch, smcish_mode):
    (mode, reason), closed = asyncio.run(_with_example_server(monkeypatch, 1, _stock_client))
    assert mode == smcish_mode and closed[0]["mode"] == smcish_mode, (mode, reason, closed)


def test_unchanged_client_and_echo_example_on_uvloop(monkeypatch, smcish_mode):
    uvloop = pytest.importorskip("uvloop")
    (mode, reason), closed = uvloop.run(_with_example_server(monkeypatch, 1, _stock_client))
    assert mode == smcish_mode and closed[0]["mode"] == smcish_mode, (mode, reason, closed)
