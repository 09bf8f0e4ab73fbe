#!/usr/bin/env python3
"""RPC benchmark: grpclib and aiohttp, smcish (shared memory) vs plain TCP.

    python benchmarks/bench_rpc.py                       # both frameworks, 3 s per phase
    python benchmarks/bench_rpc.py --quick               # 0.5 s per phase (a smoke run)
    python benchmarks/bench_rpc.py --frameworks grpc --loop uvloop --concurrency 32 --json out.json

Client and server are separate processes (started by this script, killed when it ends; every
wait is bounded). For each framework and transport:

- latency: one caller, sequential requests for ``--duration`` seconds: p50 and p99 per request;
- throughput: ``--concurrency`` callers for ``--duration`` seconds: requests per second (grpclib:
  one channel = one HTTP/2 connection multiplexing the calls; aiohttp: a keep-alive pool of up to
  ``--concurrency`` connections).

Transports: ``ism`` = both processes on smcish loops (``smcish.loop_factory``, the aiohttp client
with ``examples/aiohttp_app.SmcConnector``), and the run is checked to have used shared memory on
both ends; ``tcp`` = both on stock loops, no smcish at all. The services are the ones in
``examples/`` (grpclib ``Echo/Unary`` with the JSON codec; aiohttp ``GET /hello``, 248 bytes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
for _path in (ROOT, EXAMPLES):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from benchmarks.children import DEVNULL, Child, spawn_python  # noqa: E402 - needs ROOT on sys.path

FRAMEWORKS = ("grpc", "aiohttp")
TRANSPORTS = ("ism", "tcp")


def _loop_factory(transport: str, loop: str) -> Callable[[], asyncio.AbstractEventLoop]:
    base = asyncio.new_event_loop
    if loop == "uvloop":
        import uvloop

        base = uvloop.new_event_loop
    if transport == "ism":
        import smcish

        base = smcish.loop_factory(base)
    return base


def _emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


# --------------------------------------------------------------------------- server process
async def _serve(framework: str) -> None:
    if framework == "grpc":
        import grpc_service  # type: ignore[import-not-found]  # examples/, on sys.path above

        server = grpc_service.make_server()
        await server.start("127.0.0.1", 0)
        _emit(port=server._server.sockets[0].getsockname()[1])
        await server.wait_closed()
        return
    import aiohttp_app  # type: ignore[import-not-found]  # examples/, on sys.path above
    from aiohttp import web

    with tempfile.NamedTemporaryFile(prefix="bench-rpc-") as tmp:
        runner = web.AppRunner(aiohttp_app.make_app(tmp.name, ""), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        _emit(port=runner.addresses[0][1])
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


# --------------------------------------------------------------------------- client process
def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _phases(call: Callable[[], Awaitable[None]], duration: float, concurrency: int) -> dict[str, Any]:
    # Warm-up: connections, caches, the server's first-call paths.
    warm_until = time.perf_counter() + min(0.3, duration / 2)
    while time.perf_counter() < warm_until:
        await call()
    # Latency: one caller.
    samples = []
    end = time.perf_counter() + duration
    while True:
        start = time.perf_counter()
        if start >= end:
            break
        await call()
        samples.append(time.perf_counter() - start)
    # Throughput: `concurrency` callers.
    counts = [0] * concurrency
    end = time.perf_counter() + duration

    async def worker(i: int) -> None:
        while time.perf_counter() < end:
            await call()
            counts[i] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"p50_us": round(statistics.median(samples) * 1e6, 1),
            "p99_us": round(_percentile(samples, 0.99) * 1e6, 1),
            "sequential_calls": len(samples),
            "rps": round(sum(counts) / elapsed, 1), "concurrent_calls": sum(counts)}


async def _client(framework: str, transport: str, port: int, duration: float,
                  concurrency: int) -> dict[str, Any]:
    if framework == "grpc":
        import grpc_service

        channel = grpc_service.make_channel("127.0.0.1", port)
        stub = grpc_service.EchoStub(channel)
        try:
            async with stub.Unary.open() as stream:
                await stream.send_message({"text": "hello"}, end=True)
                reply = await stream.recv_message()
                client_mode = grpc_service.transport_info(stream)["mode"]
            server_mode = reply["mode"]
            message = {"text": "x" * 64}

            async def call() -> None:
                reply = await stub.Unary(message)
                if reply["text"] != message["text"]:
                    raise AssertionError("wrong reply")

            result = await _phases(call, duration, concurrency)
        finally:
            channel.close()
    else:
        import aiohttp_app

        kind = "smcish" if transport == "ism" else "stock"
        async with aiohttp_app.make_session(kind, limit=concurrency) as session:
            url = f"http://127.0.0.1:{port}/hello"
            async with session.get(f"http://127.0.0.1:{port}/mode") as resp:
                server_mode = (await resp.json())["mode"]

            async def call() -> None:
                async with session.get(url) as resp:
                    body = await resp.read()
                    if resp.status != 200 or body != aiohttp_app.HELLO:
                        raise AssertionError("wrong response")

            result = await _phases(call, duration, concurrency)
        client_mode = "plain"
        if transport == "ism":
            import smcish

            stats = smcish.stats()
            client_mode = "ism" if stats["connections_ism"] and not stats["connections_tcp"] else "tcp"
    return {"client_mode": client_mode, "server_mode": server_mode, **result}


# --------------------------------------------------------------------------- driver
SERVER_READY_S = 30.0  # the server's port line
STOP_S = 5.0  # SIGTERM, then SIGKILL: this long each


def _spawn(*args: object) -> Child:
    """This script in a child process (stderr kept for errors; its stdout read by the bounded helpers)."""
    return spawn_python(script=os.path.abspath(__file__), args=args, stdin=DEVNULL,
                        name=f"bench_rpc {args[0]} {args[1]}")


def _json_line(child: Child, timeout: float) -> dict[str, Any]:
    """The child's next JSON line (other lines skipped), within ``timeout`` s (ChildError otherwise)."""
    message: dict[str, Any] = child.read_json(timeout, skip_other=True)
    return message


def run_case(framework: str, transport: str, loop: str, duration: float, concurrency: int) -> dict[str, Any]:
    server = _spawn("_server", framework, "--transport", transport, "--loop", loop)
    try:
        port = _json_line(server, SERVER_READY_S)["port"]
        client = _spawn("_client", framework, "--transport", transport, "--loop", loop, "--port", port,
                        "--duration", duration, "--concurrency", concurrency)
        try:
            result = _json_line(client, 3 * duration + 30)
        finally:
            client.stop(STOP_S)
    finally:
        server.stop(STOP_S)
    expected = "ism" if transport == "ism" else "plain"
    result["verified"] = (result["client_mode"] == expected
                          and result["server_mode"] == ("ism" if transport == "ism" else "plain"))
    return {"framework": framework, "transport": transport, "loop": loop,
            "concurrency": concurrency, "duration_s": duration, **result}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("_server", "_client"):
        parser = argparse.ArgumentParser()
        parser.add_argument("role")
        parser.add_argument("framework", choices=FRAMEWORKS)
        parser.add_argument("--transport", choices=TRANSPORTS, required=True)
        parser.add_argument("--loop", default="asyncio")
        parser.add_argument("--port", type=int)
        parser.add_argument("--duration", type=float, default=3.0)
        parser.add_argument("--concurrency", type=int, default=16)
        args = parser.parse_args(argv)
        with asyncio.Runner(loop_factory=_loop_factory(args.transport, args.loop)) as runner:
            if args.role == "_server":
                try:
                    runner.run(_serve(args.framework))
                except KeyboardInterrupt:
                    pass
            else:
                _emit(**runner.run(_client(args.framework, args.transport, args.port,
                                           args.duration, args.concurrency)))
        return 0

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per phase")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="0.5 s per phase")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    duration = 0.5 if args.quick else args.duration
    results = []
    print(f"{'framework':<9} {'transport':<9} {'loop':<8} {'p50 us':>9} {'p99 us':>9} "
          f"{'req/s c=' + str(args.concurrency):>13}  verified", flush=True)
    for framework in args.frameworks.split(","):
        for transport in TRANSPORTS:
            r = run_case(framework, transport, args.loop, duration, args.concurrency)
            results.append(r)
            print(f"{framework:<9} {transport:<9} {args.loop:<8} {r['p50_us']:>9.1f} {r['p99_us']:>9.1f} "
                  f"{r['rps']:>13.0f}  {'yes' if r['verified'] else 'NO'}", flush=True)
    by = {(r["framework"], r["transport"]): r for r in results}
    for framework in args.frameworks.split(","):
        ism, tcp = by.get((framework, "ism")), by.get((framework, "tcp"))
        if ism and tcp:
            print(f"{framework}: smcish/tcp  p50 latency x{ism['p50_us'] / tcp['p50_us']:.2f}  "
                  f"throughput x{ism['rps'] / tcp['rps']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": results, "cpus": os.cpu_count(), "python": sys.version.split()[0]},
                      f, indent=2)
    return 0 if all(r["verified"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
