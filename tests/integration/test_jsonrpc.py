"""examples/jsonrpc.py: framing under partial reads, both protocol APIs, real processes."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import random
import struct

import pytest

import smcish

from . import PYTHON, example, run_json, spawn

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

_spec = importlib.util.spec_from_file_location("jsonrpc_example", example("jsonrpc.py"))
jsonrpc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jsonrpc)

HOST = "127.0.0.1"


def _stream(n: int, seed: int) -> tuple[bytes, list[bytes]]:
    rnd = random.Random(seed)
    bodies = []
    for i in range(n):
        size = rnd.choice([0, 1, 3, 4, 5, 100, 4095, 4096, 70_000, 300_000])
        bodies.append(json.dumps({"i": i, "pad": "p" * size}).encode())
    return b"".join(struct.pack(">I", len(b)) + b for b in bodies), bodies


@pytest.mark.parametrize("api", ["feed", "buffer"])
@pytest.mark.parametrize("seed", range(4))
def test_frame_decoder_reassembles_any_split(api, seed):
    wire, bodies = _stream(40, seed)
    rnd = random.Random(1000 + seed)
    decoder = jsonrpc.FrameDecoder(initial=64)
    got, pos = [], 0
    while pos < len(wire):
        # Cut anywhere: 1 byte (inside the length prefix), a few bytes, or big slices.
        n = rnd.choice([1, 2, 3, 7, 1000, 65536, 400_000])
        chunk = wire[pos:pos + n]
        if api == "feed":
            got += decoder.feed(chunk)
        else:
            # As a transport does: ask for a buffer, write at most its size, then report; the
            # view stays alive during buffer_updated (the decoder must not resize under it).
            buf = decoder.get_buffer(len(chunk))
            k = min(len(buf), len(chunk))
            buf[:k] = chunk[:k]
            got += decoder.buffer_updated(k)
            del buf
            chunk = chunk[:k]
        pos += len(chunk)
    assert got == bodies and decoder.pending() == 0


def test_frame_decoder_rejects_a_hostile_length():
    decoder = jsonrpc.FrameDecoder()
    with pytest.raises(jsonrpc.FrameError):
        decoder.feed(struct.pack(">I", jsonrpc.MAX_FRAME + 1) + b"x")


def test_rpc_over_smcish_with_dribbled_and_coalesced_frames(env):
    """BufferedProtocol server, Protocol client, raw stream writer cutting frames everywhere:
    on shared memory and on the TCP fallback, on asyncio and uvloop."""

    async def main():
        server = await jsonrpc.serve(HOST, 0, **env.kw)
        port = server.sockets[0].getsockname()[1]
        async with server:
            rpc = await jsonrpc.connect(HOST, port, **env.kw)
            assert rpc.transport.get_extra_info("smcish").mode == env.expected_mode
            assert (await rpc.call("transport_info"))["mode"] == env.expected_mode
            assert await rpc.call("add", 1, 2) == 3
            big = await rpc.call("blob", 2_500_000, 3)         # bigger than the 1 MiB ring
            assert len(big) == 2_500_000 and await rpc.call("echo", big) == big
            results = await asyncio.gather(*(rpc.call("add", i, 1) for i in range(500)))
            assert results == [i + 1 for i in range(500)]
            with pytest.raises(jsonrpc.RpcError) as err:
                await rpc.call("add", 1)
            assert err.value.code == jsonrpc.INVALID_PARAMS
            await rpc.close()

            # A raw client writes three requests a byte at a time (draining each byte, so the
            # server's reads end inside length prefixes and bodies), then 200 in one write.
            reader, writer = await smcish.open_connection(HOST, port, **env.kw)
            wire = b"".join(jsonrpc.encode_frame({"jsonrpc": "2.0", "id": i, "method": "echo",
                                                  "params": [f"v{i}"]}) for i in range(3))
            for i in range(len(wire)):
                writer.write(wire[i:i + 1])
                await writer.drain()
                if i % 7 == 0:
                    await asyncio.sleep(0)
            writer.write(b"".join(jsonrpc.encode_frame({"jsonrpc": "2.0", "id": 100 + i,
                                                        "method": "add", "params": [i, i]})
                                  for i in range(200)))
            decoder = jsonrpc.FrameDecoder()
            responses = []
            while len(responses) < 203:
                data = await reader.read(7)                # small reads on our side too
                assert data, "server closed early"
                responses += [json.loads(f) for f in decoder.feed(data)]
            assert [r["result"] for r in responses[:3]] == ["v0", "v1", "v2"]
            assert {r["id"]: r["result"] for r in responses[3:]} == {100 + i: 2 * i for i in range(200)}
            writer.close()
            await writer.wait_closed()

    env.run(main(), timeout=60)


def test_jsonrpc_script_server_and_client():
    with spawn([PYTHON, example("jsonrpc.py"), "server", "--port", "0"]) as server:
        port = server.read_json()["port"]
        result = run_json([PYTHON, example("jsonrpc.py"), "client", "--port", str(port),
                           "--blob", str(3 << 20)])
    assert result["ok"], result
    assert result["mode"] == "ism" and result["server_mode"] == "ism", result
