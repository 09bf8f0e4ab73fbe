"""The guest-side programs of ``python -m benchmarks.vm`` (run inside the guests). JSON on stdout.

    python vm_peer.py serve PORT           smcish server on PORT, stock asyncio server on PORT+1
    python vm_peer.py client HOST PORT ROUNDS N TOTAL
        Each round, smcish (to PORT) then the stock asyncio streams (TCP, to PORT+1): N round
        trips of 64 B, then TOTAL bytes in 64 KiB writes one way (the server answers the count).

Both servers: the first byte says what the connection does: ``E`` echo, ``S`` sink (read to EOF,
answer the 8-byte count).
"""

import asyncio
import json
import statistics
import struct
import sys
import time

CHUNK = 64 << 10


async def handle(reader, writer):
    kind = await reader.readexactly(1)
    try:
        if kind == b"E":
            while data := await reader.read(65536):
                writer.write(data)
        else:
            got = 0
            while data := await reader.read(1 << 20):
                got += len(data)
            writer.write(struct.pack(">Q", got))
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(port):
    import smcish

    fast = await smcish.start_server(handle, "0.0.0.0", port)
    plain = await asyncio.start_server(handle, "0.0.0.0", port + 1)
    print(json.dumps({"event": "listening", "port": port}), flush=True)
    async with fast, plain:
        await asyncio.gather(fast.serve_forever(), plain.serve_forever())


async def one_round(opener, host, port, n, total):
    reader, writer = await opener(host, port)
    writer.write(b"E")
    message = b"m" * 64
    for _ in range(min(200, n)):                      # warm-up
        writer.write(message)
        await reader.readexactly(64)
    rtts = []
    for _ in range(n):
        start = time.perf_counter()
        writer.write(message)
        await reader.readexactly(64)
        rtts.append(time.perf_counter() - start)
    info = writer.get_extra_info("smcish")
    writer.close()
    await writer.wait_closed()
    reader, writer = await opener(host, port)
    writer.write(b"S")
    block = b"x" * CHUNK
    start = time.perf_counter()
    sent = 0
    while sent < total:
        writer.write(block)
        await writer.drain()
        sent += CHUNK
    writer.write_eof()
    (got,) = struct.unpack(">Q", await reader.readexactly(8))
    seconds = time.perf_counter() - start
    writer.close()
    await writer.wait_closed()
    return {"rtt_p50_us": statistics.median(rtts) * 1e6,
            "rtt_p90_us": sorted(rtts)[int(len(rtts) * 0.9)] * 1e6,
            "mb_s": got / seconds / 1e6, "ok": got == sent,
            "mode": info.mode if info is not None else "tcp",
            "reason": getattr(getattr(info, "reason", None), "name", None)}


async def client(host, port, rounds, n, total):
    import smcish

    results = {"smcish": [], "tcp": []}
    for _ in range(rounds):
        results["smcish"].append(await one_round(smcish.open_connection, host, port, n, total))
        results["tcp"].append(await one_round(asyncio.open_connection, host, port + 1, n, total))
    print(json.dumps(results), flush=True)


def main():
    if sys.argv[1] == "serve":
        asyncio.run(serve(int(sys.argv[2])))
    else:
        host, port = sys.argv[2], int(sys.argv[3])
        rounds, n, total = (int(x) for x in sys.argv[4:7])
        asyncio.run(client(host, port, rounds, n, total))


if __name__ == "__main__":
    main()
