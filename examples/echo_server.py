#!/usr/bin/env python3
"""Echo server on smcish streams: the smallest complete smcish server.

    python examples/echo_server.py --port 8888            # serve until Ctrl-C
    python examples/echo_server.py --port 0 --connections 1   # print the port, exit after 1 client

Prints one JSON line with the listening port, then one per connection with the path it took
(``"mode": "ism"`` = shared memory, ``"tcp"`` = fallback, with the reason). Plain TCP clients
(``nc``, telnet, a program without smcish) are served too, through the fallback path.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import smcish


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def main(args) -> None:
    remaining = args.connections
    finished = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal remaining
        info = writer.get_extra_info("smcish")
        peer = writer.get_extra_info("peername")
        echoed = 0
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
                echoed += len(data)
        except ConnectionError as exc:
            emit(event="error", error=repr(exc))
        finally:
            writer.close()
            emit(event="closed", peer=f"{peer[0]}:{peer[1]}", mode=info.mode,
                 reason=getattr(info.reason, "name", None), bytes=echoed)
            if remaining:
                remaining -= 1
                if not remaining:
                    finished.set()

    server = await smcish.start_server(handle, args.host, args.port)
    emit(event="listening", host=args.host, port=server.sockets[0].getsockname()[1])
    async with server:
        if args.connections:
            await finished.wait()
        else:
            await server.serve_forever()


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8888, help="0 picks a free port")
    parser.add_argument("--connections", type=int, default=0,
                        help="exit after this many connections closed (0 = serve forever)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    try:
        asyncio.run(main(parse()))
    except KeyboardInterrupt:
        sys.exit(130)
