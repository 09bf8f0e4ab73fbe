"""A peer in its own process for tests/test_processes.py: ``serve`` streams or echoes, ``client``
connects, reports and checksums. JSON lines on stdout.

    python stream_peer.py serve LOOP ACTION            (prints {"port": ...} first)
    python stream_peer.py client LOOP ACTION PORT

LOOP: asyncio or uvloop. ACTION: checksum (read to EOF, answer mode + crc + count), stream (send
until killed), stall (never read; server only), sink (read until killed; server only).
"""

import asyncio
import json
import os
import sys
import zlib

import smcish

role, loop_kind, action = sys.argv[1], sys.argv[2], sys.argv[3]
port = int(sys.argv[4]) if len(sys.argv) > 4 else 0


def new_loop():
    if loop_kind == "uvloop":
        import uvloop
        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def serve():
    done = asyncio.Event()

    async def handle(reader, writer):
        mode = writer.get_extra_info("smcish").mode
        if action == "checksum":               # read until EOF, answer mode + crc + count
            crc = n = 0
            while data := await reader.read(1 << 20):
                crc = zlib.crc32(data, crc)
                n += len(data)
            writer.write(json.dumps({"mode": mode, "crc": crc, "n": n}).encode() + b"\n")
            await writer.drain()
            writer.close()
            done.set()
        elif action == "stream":               # send forever (until killed)
            chunk = b"s" * 65536
            print(json.dumps({"event": "streaming", "mode": mode}), flush=True)
            while True:
                writer.write(chunk)
                await writer.drain()
        elif action == "stall":                # never read (until killed)
            print(json.dumps({"event": "stalling", "mode": mode}), flush=True)
            await asyncio.sleep(3600)
        elif action == "sink":                 # read forever (until killed)
            print(json.dumps({"event": "sinking", "mode": mode}), flush=True)
            while await reader.read(1 << 20):
                pass
    server = await smcish.start_server(handle, "127.0.0.1", 0)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    async with server:
        await done.wait()


async def client():
    reader, writer = await smcish.open_connection("127.0.0.1", port)
    mode = writer.get_extra_info("smcish").mode
    if action == "checksum":
        crc = n = 0
        block = os.urandom(1 << 20)
        for i in range(64):
            chunk = block[i * 997:]
            crc = zlib.crc32(chunk, crc)
            n += len(chunk)
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        reply = json.loads(await reader.readline())
        print(json.dumps({"mode": mode, "crc": crc, "n": n, "server": reply}), flush=True)
        writer.close()
        await writer.wait_closed()
    elif action == "stream":
        print(json.dumps({"event": "streaming", "mode": mode}), flush=True)
        chunk = b"c" * 65536
        while True:
            writer.write(chunk)
            await writer.drain()


loop = new_loop()
loop.run_until_complete(serve() if role == "serve" else client())
