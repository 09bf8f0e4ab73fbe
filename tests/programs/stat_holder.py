"""A process holding smcish connections for the `smcish stat` tests (tests/test_metrics.py,
tests/test_transparent.py): a server and a client in one process, 12,345 bytes sent over shared
memory; with ``--with-tcp`` also a forced-TCP connection (10 bytes) and all 12,345 bytes received.

Prints ``ready PORT`` when all that is done, then holds everything until stdin closes.
"""

import asyncio
import sys

import smcish

WITH_TCP = "--with-tcp" in sys.argv[1:]


async def main():
    async def handle(reader, writer):
        await reader.read()
    server = await smcish.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _reader, writer = await smcish.open_connection("127.0.0.1", port)
    writer.write(b"y" * 12345)
    await writer.drain()
    if WITH_TCP:
        _r2, w2 = await smcish.open_connection("127.0.0.1", port, device="none")
        w2.write(b"z" * 10)
        await w2.drain()
        while smcish.stats()["bytes_received"] < 12345:
            await asyncio.sleep(0.01)
    print("ready", port, flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
asyncio.run(main())
