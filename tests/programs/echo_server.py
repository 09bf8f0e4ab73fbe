"""``python echo_server.py smcish|plain``: an echo server on 127.0.0.1 (an ephemeral port) with
smcish.start_server or plain asyncio.start_server; prints the port, serves until killed.
For tests/test_doctor.py (what doctor predicts, checked against real connections)."""

import asyncio
import sys

import smcish


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
    writer.close()


async def main() -> None:
    start = smcish.start_server if sys.argv[1] == "smcish" else asyncio.start_server
    server = await start(echo, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)


asyncio.run(main())
