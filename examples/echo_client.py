#!/usr/bin/env python3
"""Echo client on smcish streams: sends messages, checks every echoed byte, reports the path.

    python examples/echo_client.py --port 8888
    python examples/echo_client.py --port 8888 --count 1000 --size 4096

Prints one JSON line: ``mode`` (``"ism"`` = shared memory, ``"tcp"`` = fallback), ``reason``,
messages and bytes checked, and the median round-trip time. Exit status 1 if an echo differed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time

import smcish


async def main(args) -> int:
    reader, writer = await smcish.open_connection(args.host, args.port)
    info = writer.get_extra_info("smcish")
    rtts = []
    ok = True
    try:
        for i in range(args.count):
            # Each message differs (its index is stamped in), so a misplaced byte is caught.
            stamp = f"{i:08d}".encode()
            message = (stamp * (args.size // len(stamp) + 1))[:args.size]
            start = time.perf_counter()
            writer.write(message)
            await writer.drain()
            echoed = await reader.readexactly(len(message))
            rtts.append(time.perf_counter() - start)
            if echoed != message:
                ok = False
                break
        writer.write_eof()                         # half-close: the server sees EOF and closes
        rest = await reader.read()
        ok = ok and rest == b""
    finally:
        writer.close()
        await writer.wait_closed()
    print(json.dumps({
        "mode": info.mode, "reason": getattr(info.reason, "name", None), "ok": ok,
        "messages": len(rtts), "bytes": len(rtts) * args.size,
        "rtt_p50_us": round(statistics.median(rtts) * 1e6, 1) if rtts else None,
    }), flush=True)
    return 0 if ok else 1


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--count", type=int, default=100, help="messages to send")
    parser.add_argument("--size", type=int, default=64, help="bytes per message")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
