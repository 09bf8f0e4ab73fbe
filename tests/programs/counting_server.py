"""``python counting_server.py``: a plain asyncio server on 127.0.0.1 that counts connections
accepted and closed and bytes received; prints its port, then its counts as JSON for each line
on stdin; stops when stdin closes. For tests/test_doctor.py (a probe writes nothing)."""

import asyncio
import json
import os

counts = {"accepted": 0, "closed": 0, "bytes": 0}


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    counts["accepted"] += 1
    try:
        while data := await reader.read(65536):
            counts["bytes"] += len(data)
    finally:
        counts["closed"] += 1
        writer.close()


async def main() -> None:
    loop = asyncio.get_running_loop()
    stop = loop.create_future()
    server = await asyncio.start_server(handle, "127.0.0.1", 0)

    def ask() -> None:
        if not os.read(0, 4096):
            loop.remove_reader(0)
            if not stop.done():
                stop.set_result(None)
            return
        print(json.dumps(counts), flush=True)

    loop.add_reader(0, ask)
    print(server.sockets[0].getsockname()[1], flush=True)
    await stop


asyncio.run(main())
