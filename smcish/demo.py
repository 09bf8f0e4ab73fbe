"""The demo: a server and a client in two processes, plain TCP against smcish, side by side.

`python -m smcish demo [--quick]`: for each loop (asyncio, and uvloop if installed) and each
transport, starts a server process, runs a 64 B round-trip test and a 64 KiB streaming test from a
client process (asyncio streams API on both ends), and prints the figures and ratios. Uses the
embedded device: nothing to start or configure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _api(transport: str) -> tuple[Any, Any]:
    if transport == "smcish":
        import smcish

        return smcish.open_connection, smcish.start_server
    return asyncio.open_connection, asyncio.start_server


async def _serve(transport: str) -> None:
    _, start_server = _api(transport)
    done = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            kind = await reader.readexactly(1)
            if kind == b"E":              # echo fixed-size messages
                size = int.from_bytes(await reader.readexactly(4), "big")
                while True:
                    try:
                        msg = await reader.readexactly(size)
                    except asyncio.IncompleteReadError:
                        break
                    writer.write(msg)
            elif kind == b"S":            # sink: count bytes until EOF, answer the count
                total = 0
                while True:
                    chunk = await reader.read(1 << 20)
                    if not chunk:
                        break
                    total += len(chunk)
                writer.write(total.to_bytes(8, "big"))
                await writer.drain()
            elif kind == b"Q":
                done.set()
        finally:
            writer.close()

    server = await start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    print(json.dumps({"port": port}), flush=True)
    async with server:
        await done.wait()


async def _client(transport: str, port: int, seconds: float) -> dict[str, Any]:
    open_connection, _ = _api(transport)
    # Round trips of 64 B messages.
    reader, writer = await open_connection("127.0.0.1", port)
    info = writer.get_extra_info("smcish")
    mode = info.mode if info is not None else "tcp"
    msg = b"x" * 64
    writer.write(b"E" + len(msg).to_bytes(4, "big"))
    samples = []
    deadline = time.perf_counter() + seconds
    count = 0
    while count < 200 or (time.perf_counter() < deadline and count < 200_000):
        t0 = time.perf_counter_ns()
        writer.write(msg)
        await reader.readexactly(len(msg))
        samples.append(time.perf_counter_ns() - t0)
        count += 1
    writer.close()
    await writer.wait_closed()
    samples = samples[len(samples) // 10:]           # drop the warm-up tenth
    # Streaming 64 KiB writes.
    reader, writer = await open_connection("127.0.0.1", port)
    writer.write(b"S")
    chunk = os.urandom(64 * 1024)
    sent = 0
    started = time.perf_counter()
    deadline = started + seconds
    while time.perf_counter() < deadline:
        for _ in range(16):
            writer.write(chunk)
        sent += 16 * len(chunk)
        await writer.drain()
    writer.write_eof()
    received = int.from_bytes(await reader.readexactly(8), "big")
    elapsed = time.perf_counter() - started
    writer.close()
    if received != sent:
        raise SystemExit(f"demo: server received {received} bytes, client sent {sent}")
    _, writer = await open_connection("127.0.0.1", port)
    writer.write(b"Q")
    await writer.drain()
    writer.close()
    return {"mode": mode, "rtt_p50_us": statistics.median(samples) / 1000,
            "rtt_p99_us": sorted(samples)[int(len(samples) * 0.99)] / 1000,
            "mb_per_s": received / elapsed / 1e6}


def _role_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=("serve", "client"))
    parser.add_argument("--transport", required=True)
    parser.add_argument("--loop", default="asyncio")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=1.0)
    args = parser.parse_args(argv)
    loop = _new_loop(args.loop)
    try:
        if args.role == "serve":
            loop.run_until_complete(_serve(args.transport))
        else:
            result = loop.run_until_complete(_client(args.transport, args.port, args.seconds))
            print(json.dumps(result), flush=True)
    finally:
        loop.close()
    return 0


def _run_pair(transport: str, loop: str, seconds: float) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "smcish.demo"]
    server = subprocess.Popen(cmd + ["serve", "--transport", transport, "--loop", loop],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None          # (stdout=PIPE)
        line = server.stdout.readline()
        if not line:
            raise SystemExit(f"demo: {transport} server on {loop} failed to start")
        port = json.loads(line)["port"]
        out = subprocess.run(cmd + ["client", "--transport", transport, "--loop", loop,
                                    "--port", str(port), "--seconds", str(seconds)],
                             stdout=subprocess.PIPE, text=True, timeout=120 + 4 * seconds, check=True)
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return result
    finally:
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("serve", "client"):
        return _role_main(argv)
    parser = argparse.ArgumentParser(prog="python -m smcish demo")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    seconds = 0.5 if args.quick else 2.0
    loops = ["asyncio"]
    try:
        import uvloop  # noqa: F401

        loops.append("uvloop")
    except ImportError:
        print("(uvloop not installed: `pip install smcish[uvloop]` to compare it too)")
    print("smcish demo: client and server in separate processes, asyncio streams API, "
          "embedded ISM device\n")
    header = f"{'loop':8} {'transport':9} {'mode':5} {'64 B RTT p50':>13} {'p99':>9} {'64 KiB stream':>14}"
    print(header)
    print("-" * len(header))
    failed = False
    for loop in loops:
        results = {}
        for transport in ("tcp", "smcish"):
            res = results[transport] = _run_pair(transport, loop, seconds)
            print(f"{loop:8} {transport:9} {res['mode']:5} {res['rtt_p50_us']:10.1f} us "
                  f"{res['rtt_p99_us']:6.1f} us {res['mb_per_s']:9.0f} MB/s", flush=True)
        tcp, smc = results["tcp"], results["smcish"]
        print(f"{loop:8} {'ratio':9} {'':5} {smc['rtt_p50_us'] / tcp['rtt_p50_us']:10.2f} x  "
              f"{'':9} {smc['mb_per_s'] / tcp['mb_per_s']:9.2f} x\n")
        if smc["mode"] != "ism":
            print(f"WARNING: smcish fell back to TCP on {loop}: no shared memory was used")
            failed = True
    print("RTT ratio < 1 and throughput ratio > 1 mean smcish is faster. Single run on a shared "
          "machine: see benchmarks/ for repeated, interleaved measurements.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
