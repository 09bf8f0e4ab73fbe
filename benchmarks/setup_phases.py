"""Where a sequential connection set-up spends its time (a diagnostic for `setup.64B`).

    python -m benchmarks.setup_phases                  # uvloop, tcp and smcish, 3 rounds of 3000
    python -m benchmarks.setup_phases --loop asyncio --conns 2000 --rounds 5

Same work as the `setup.64B` case: `open_connection`, one 64 B request echoed, `close()` +
`wait_closed()`, one connection after the other, client and server in separate processes (tcp:
`asyncio.open_connection` / `start_server`; smcish: `smcish.open_connection` / `start_server`). The client
measures, per connection, the wall time of three phases: **open** (until `open_connection` returns), **echo**
(write + readexactly: includes the server's accept-side work that is still pending) and **close**,
and its own CPU per connection (`time.process_time`). Fresh processes per round; transports
interleaved within a round; medians [min-max] over rounds. Figures quoted in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

from .children import DEVNULL, spawn_python

_REQ = b"s" * 64
SERVER_READY_S = 30.0  # the server's port line
STOP_S = 10.0  # the server at EOF on stdin: this long to exit, then SIGTERM, then SIGKILL (this long each)


def _install(loop_name: str) -> None:
    if loop_name == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve(transport: str) -> None:
    import smcish
    start_server = smcish.start_server if transport == "smcish" else asyncio.start_server

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(await reader.readexactly(len(_REQ)))
            await reader.read()            # the client's EOF
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        writer.close()

    server = await start_server(handle, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)   # until stdin closes
    server.close()


async def _client(transport: str, port: int, conns: int) -> dict[str, Any]:
    import smcish
    open_connection = smcish.open_connection if transport == "smcish" else asyncio.open_connection
    phases: dict[str, list[int]] = {"open": [], "echo": [], "close": []}
    modes: dict[str, int] = {}

    async def one(record: bool) -> None:
        t0 = time.perf_counter_ns()
        reader, writer = await open_connection("127.0.0.1", port)
        t1 = time.perf_counter_ns()
        writer.write(_REQ)
        if await reader.readexactly(len(_REQ)) != _REQ:
            raise RuntimeError("the echo differs from the request")
        t2 = time.perf_counter_ns()
        info = writer.get_extra_info("smcish")
        mode = info.mode if info is not None else "tcp"
        writer.close()
        await writer.wait_closed()
        t3 = time.perf_counter_ns()
        if record:
            phases["open"].append(t1 - t0)
            phases["echo"].append(t2 - t1)
            phases["close"].append(t3 - t2)
            modes[mode] = modes.get(mode, 0) + 1

    for _ in range(min(300, conns)):                  # warm-up: the link group, caches
        await one(False)
    c0, w0 = time.process_time(), time.perf_counter()
    for _ in range(conns):
        await one(True)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    out: dict[str, Any] = {k: statistics.fmean(v) / 1000 for k, v in phases.items()}
    out.update(rate=conns / wall, cpu_us=cpu / conns * 1e6, modes=modes)
    return out


def _child(role: str, loop_name: str, transport: str, port: int, conns: int) -> None:
    _install(loop_name)
    if role == "server":
        asyncio.run(_serve(transport))
    else:
        print(repr(asyncio.run(_client(transport, port, conns))), flush=True)


def _port_line(line: str) -> bool:
    return int(line) > 0


def _round(loop_name: str, transport: str, conns: int) -> dict[str, Any]:
    module = "benchmarks.setup_phases"
    # the server's stderr is ours; it serves until its stdin closes
    server = spawn_python(module=module, args=["--child", "server", loop_name, transport, 0, 0], stderr=None,
                          name=f"setup_phases server {transport}", handshake=_port_line,
                          handshake_timeout=SERVER_READY_S)
    try:
        assert server.hello is not None  # the handshake matched it
        port = int(server.hello)
        with spawn_python(module=module, args=["--child", "client", loop_name, transport, port, conns],
                          stdin=DEVNULL, name=f"setup_phases client {transport}") as client:
            status, out = client.output(120 + conns * 0.01)
            if status != 0:
                raise RuntimeError(f"client failed: {client.stderr_text(2000)}")
        import ast
        result: dict[str, Any] = ast.literal_eval(out.strip().splitlines()[-1])
        return result
    finally:
        server.finish(STOP_S, STOP_S)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        role, loop_name, transport, port, conns = sys.argv[2:7]
        _child(role, loop_name, transport, int(port), int(conns))
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--loop", choices=["asyncio", "uvloop"], default="uvloop")
    ap.add_argument("--conns", type=int, default=3000, help="measured connections per round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, list[dict[str, Any]]] = {"tcp": [], "smcish": []}
    for _ in range(args.rounds):
        for transport in results:
            results[transport].append(_round(args.loop, transport, args.conns))

    def fmt(values: list[float], unit: str = "") -> str:
        return f"{statistics.median(values):.0f}{unit} [{min(values):.0f}-{max(values):.0f}]"

    print(f"{args.loop}, {args.conns} sequential connections x {args.rounds} rounds "
          f"(client wall time per phase, us; median [min-max] of round means)")
    print(f"{'':8} {'conn/s':>16} {'client CPU us':>16} {'open':>14} {'echo':>14} {'close':>14}  modes")
    for transport, rounds in results.items():
        print(f"{transport:8} {fmt([r['rate'] for r in rounds]):>16} "
              f"{fmt([r['cpu_us'] for r in rounds]):>16} {fmt([r['open'] for r in rounds]):>14} "
              f"{fmt([r['echo'] for r in rounds]):>14} {fmt([r['close'] for r in rounds]):>14}  "
              f"{rounds[-1]['modes']}")
    ratios = [s["rate"] / t["rate"] for s, t in zip(results["smcish"], results["tcp"], strict=False)]
    print(f"set-up rate smcish/tcp: {statistics.median(ratios):.3f}x "
          f"[{min(ratios):.3f}-{max(ratios):.3f}] (per-round pairs)")


if __name__ == "__main__":
    main()
