"""64 B Protocol ping-pong between two processes, optionally pinned to CPUs (a diagnostic).

    python -m benchmarks.pingpong                       # let the scheduler place both
    python -m benchmarks.pingpong --pin 0,0             # client and server on CPU 0 (co-located)
    python -m benchmarks.pingpong --pin 0,1 --runs 5    # one CPU each, 5 fresh pairs of processes
    python -m benchmarks.pingpong --transport tcp       # the same over plain asyncio TCP

Prints one p50 per run (fresh processes each time: the scheduler's placement differs between
runs, which is the point of --runs) and smcish's poll counters of the client. This is how the
spin policy of docs/design.md 2.7 was chosen; the quoted figures come from `python -m benchmarks`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Callable, Coroutine
from typing import Any

from .children import DEVNULL, ChildError, python_env, spawn_python

SERVER_READY_S = 30.0  # the server's port line
CLIENT_TIMEOUT_S = 120.0  # a client run (it stops measuring after 60 s)


def _port_line(line: str) -> bool:
    return int(line) > 0


def _api(transport: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    if transport == "smcish":
        import smcish
        return smcish.create_server, smcish.create_connection
    loop = asyncio.get_running_loop()
    return loop.create_server, loop.create_connection


async def _server() -> None:
    class Echo(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t: Any = transport

        def data_received(self, data: bytes) -> None:
            self.t.write(data)

    create_server, _ = _api(os.environ["PP_TRANSPORT"])
    server = await create_server(Echo, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(float(os.environ.get("PP_LIFETIME", "120")))


async def _client(port: int, count: int, warmup: int) -> None:
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[bytes] | None = None

    class Client(asyncio.Protocol):
        def data_received(self, data: bytes) -> None:
            if waiter is not None and not waiter.done():
                waiter.set_result(data)

    _, create_connection = _api(os.environ["PP_TRANSPORT"])
    transport, _ = await create_connection(Client, "127.0.0.1", port)
    samples = []
    payload = b"x" * 64
    deadline = time.monotonic() + 60
    for i in range(count + warmup):
        waiter = loop.create_future()
        t0 = time.perf_counter_ns()
        transport.write(payload)
        await waiter
        if i >= warmup:
            samples.append(time.perf_counter_ns() - t0)
        if time.monotonic() > deadline:
            break
    line = f"p50 {statistics.median(samples) / 1000:.2f} us over {len(samples)}"
    if os.environ["PP_TRANSPORT"] == "smcish":
        import smcish
        st = smcish.stats()
        line += (f"  mode={transport.get_extra_info('smcish').mode} polls hit/miss/colocated "
                 f"{st['poll_hits']}/{st['poll_misses']}/{st['poll_colocated']} "
                 f"doorbells {st['doorbells']}")
    print(line, flush=True)
    transport.close()


def _run_loop(coro_fn: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
    if os.environ.get("PP_LOOP", "uvloop") == "uvloop":
        import uvloop
        uvloop.run(coro_fn(*args))
    else:
        asyncio.run(coro_fn(*args))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pin", help="CLIENT,SERVER CPU numbers (taskset)")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--count", type=int, default=10000)
    ap.add_argument("--transport", choices=["smcish", "tcp"], default="smcish")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--role", choices=["server", "client"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("PP_TRANSPORT", args.transport)
    os.environ.setdefault("PP_LOOP", args.loop)
    if args.role == "server":
        _run_loop(_server)
        return
    if args.role == "client":
        _run_loop(_client, args.port, args.count, min(2000, args.count // 5))
        return
    cpus = args.pin.split(",") if args.pin else None
    env = python_env(PP_TRANSPORT=args.transport, PP_LOOP=args.loop)
    module = "benchmarks.pingpong"
    for _ in range(args.runs):
        pre_s = ["taskset", "-c", cpus[1]] if cpus else []
        pre_c = ["taskset", "-c", cpus[0]] if cpus else []
        # stderr ours, and the client's stdout (its p50 line)
        with spawn_python(module=module, args=["--role", "server"], prefix=pre_s, env=env, stdin=DEVNULL,
                          stderr=None, name="pingpong server", handshake=_port_line,
                          handshake_timeout=SERVER_READY_S) as server:
            assert server.hello is not None  # the handshake matched it
            with spawn_python(module=module, args=["--role", "client", "--port", int(server.hello),
                                                   "--count", args.count],
                              prefix=pre_c, env=env, stdin=DEVNULL, stdout=None, stderr=None,
                              name="pingpong client") as client:
                status = client.wait(CLIENT_TIMEOUT_S)
                if status != 0:
                    raise ChildError(f"client exited with status {status}: {client.describe()}")


if __name__ == "__main__":
    main()
