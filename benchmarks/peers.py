"""Benchmark peer processes: `python -m benchmarks.peers server|client|probe --transport T --loop L`.

The harness starts one server and one client process per (loop, transport) configuration and keeps them
for the whole run, so measurements of different configurations can be interleaved without paying process
start-up each time. Both speak JSON lines to the harness on the stdout they were started with (fd 1 is
then pointed at stderr, so a stray print cannot corrupt the protocol):
- server: prints {"ready": true, "addrs": {...}, "ctrl": path} once listening, serves until stdin closes;
- client: prints {"ready": true}, then for each {"cmd": "run", "case": {...}} line on stdin prints
  {"ok": true, "result": {...}} or {"ok": false, "error": "..."};
- probe: prints whether smcish is importable and what one loopback connection negotiated.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import json
import os
import shutil
import sys
import tempfile
import threading
from typing import Any, TextIO

from . import transports, workloads
from .cases import CaseParams


def _protocol_stream() -> TextIO:
    """A private line-buffered copy of stdout for the harness protocol; fd 1 then goes to stderr."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _emit(out: TextIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


# --- server ----------------------------------------------------------------------------------------------

SCALE_BACKLOG = 4096  # listen backlog of a --scale server (capped by net.core.somaxconn)


async def _serve(transport: transports.Transport, out: TextIO, scale: bool = False,
                 tls_dir: str | None = None) -> None:
    loop = asyncio.get_running_loop()
    state = workloads.ServerState()

    def on_loop_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        state.error(context.get("message", "") + (": " + workloads.format_exception(exc) if exc else ""))

    loop.set_exception_handler(on_loop_error)
    tmpdir = tempfile.mkdtemp(prefix="smcish-bench-")
    servers = []
    try:
        api = transport.api()
        streams = await api.start_server(functools.partial(workloads.serve_streams, state),
                                         *transports.bind_args(transport, tmpdir, "streams"),
                                         **({"backlog": SCALE_BACKLOG} if scale else {}))
        protocol = await api.create_server(lambda: workloads.EchoProtocol(state),
                                           *transports.bind_args(transport, tmpdir, "protocol"))
        bufproto = await api.create_server(lambda: workloads.SinkProtocol(state),
                                           *transports.bind_args(transport, tmpdir, "bufproto"))
        servers = [streams, protocol, bufproto]
        addrs = {"streams": transports.connect_args(transport, streams),
                 "protocol": transports.connect_args(transport, protocol),
                 "bufproto": transports.connect_args(transport, bufproto)}
        if tls_dir:  # the tls.* cases: the same streams server behind the transport's own TLS
            streams_tls = await api.start_server(functools.partial(workloads.serve_streams, state),
                                                 *transports.bind_args(transport, tmpdir, "streams-tls"),
                                                 ssl=transports.server_ssl_context(tls_dir))
            servers.append(streams_tls)
            addrs["streams" + workloads.TLS_ROLE_SUFFIX] = transports.connect_args(transport, streams_tls)
        ctrl_path = os.path.join(tmpdir, "ctrl.sock")
        ctrl = await asyncio.start_unix_server(functools.partial(workloads.serve_ctrl, state), ctrl_path)
        servers.append(ctrl)
        stop = asyncio.Event()

        def wait_for_stdin_eof() -> None:
            sys.stdin.read()
            loop.call_soon_threadsafe(stop.set)

        threading.Thread(target=wait_for_stdin_eof, daemon=True).start()
        _emit(out, {"ready": True, "pid": os.getpid(), "loop": workloads.loop_name(), "ctrl": ctrl_path,
                    "addrs": addrs})
        await stop.wait()
    finally:
        for server in servers:
            server.close()
        for server in servers:
            try:
                await asyncio.wait_for(server.wait_closed(), 2)
            except Exception:  # noqa: BLE001 - shutting down: nothing left to report to
                pass
        shutil.rmtree(tmpdir, ignore_errors=True)


def _scale_setup(args: argparse.Namespace) -> None:
    if args.scale:
        from . import scale

        scale.raise_nofile()


def server_main(args: argparse.Namespace, out: TextIO) -> int:
    transport = transports.build_transports(_nopoll_env())[args.transport]
    try:
        _scale_setup(args)
        with asyncio.Runner(loop_factory=transports.loop_factory(args.loop)) as runner:
            runner.run(_serve(transport, out, args.scale, args.tls_dir))
    except BaseException as exc:  # noqa: BLE001 - the harness reads why from the ready line
        _emit(out, {"ready": False, "error": workloads.format_exception(exc)})
        return 1
    return 0


# --- client ----------------------------------------------------------------------------------------------

async def _client_start(transport: transports.Transport, server: dict[str, Any],
                        tls_dir: str | None = None) -> workloads.ClientContext:
    ctx = workloads.ClientContext(transport.api(), server["addrs"], transport, server["ctrl"])
    if tls_dir:
        ctx.client_ssl = transports.client_ssl_context(tls_dir)
    await ctx.start()
    return ctx


def client_main(args: argparse.Namespace, out: TextIO) -> int:
    transport = transports.build_transports(_nopoll_env())[args.transport]
    server = json.loads(args.server)
    _scale_setup(args)
    with asyncio.Runner(loop_factory=transports.loop_factory(args.loop)) as runner:
        try:
            ctx = runner.run(_client_start(transport, server, args.tls_dir))
        except BaseException as exc:  # noqa: BLE001 - the harness reads why from the ready line
            _emit(out, {"ready": False, "error": workloads.format_exception(exc)})
            return 1
        _emit(out, {"ready": True, "pid": os.getpid(), "loop": runner.get_loop().__class__.__module__})
        for line in sys.stdin:
            command = json.loads(line)
            if command.get("cmd") != "run":
                break
            try:
                params = CaseParams.from_json(command["case"])
                result = runner.run(asyncio.wait_for(workloads.run_case(ctx, params),
                                                     command.get("timeout_s")))
            except TimeoutError:
                _emit(out, {"ok": False, "error": f"timed out after {command.get('timeout_s')} s"})
            except Exception as exc:  # noqa: BLE001 - the measurement failed: the answer says why
                answer = {"ok": False, "error": workloads.format_exception(exc)}
                partial = getattr(exc, "partial", None)
                # figures measured despite the failure (scale); asyncio's IncompleteReadError has
                # a `partial` of its own (the bytes read), which is not one
                if isinstance(partial, dict):
                    answer["partial"] = partial
                _emit(out, answer)
            else:
                _emit(out, {"ok": True, "result": result})
        runner.run(ctx.close())
    return 0


# --- probe -----------------------------------------------------------------------------------------------

def smcish_importable() -> tuple[bool, str, str | None]:
    """(available, why not, version): smcish imports and has the four entry points."""
    try:
        smcish = importlib.import_module("smcish")
    except Exception as exc:  # noqa: BLE001 - any import failure makes the smcish transports unavailable
        return False, f"import smcish failed: {exc!r}", None
    missing = [name for name in transports.SMCISH_FUNCTIONS if not callable(getattr(smcish, name, None))]
    if missing:
        return False, f"smcish has no {', '.join(missing)} yet", None
    return True, "", str(getattr(smcish, "__version__", "unknown"))


async def _probe_connection(transport: transports.Transport) -> dict[str, Any]:
    api = transport.api()

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    server = await api.start_server(echo, "127.0.0.1", 0)
    try:
        host, port = server.sockets[0].getsockname()[:2]
        reader, writer = await asyncio.wait_for(api.open_connection(host, port), 10)
        try:
            mode, reason = transports.mode_of(writer)
            info = transports.describe_info(writer)
            writer.write(b"ping")
            ok = await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
        finally:
            writer.close()
    finally:
        server.close()
    return {"mode": mode, "reason": repr(reason) if reason is not None else None, "info": info, "echo_ok": ok}


def probe_main(args: argparse.Namespace, out: TextIO) -> int:
    transport = transports.build_transports(_nopoll_env())[args.transport]
    report = {"transport": transport.name, "loop": args.loop, "env": transports.smcish_env()}
    available, why, version = smcish_importable() if transport.needs_smcish else (True, "", None)
    report.update(available=available, reason=why, version=version, config=transports.smcish_config())
    if available:
        try:
            with asyncio.Runner(loop_factory=transports.loop_factory(args.loop)) as runner:
                report.update(runner.run(asyncio.wait_for(_probe_connection(transport), 20)))
        except Exception as exc:  # noqa: BLE001 - the harness prints it and the cases then fail
            report["error"] = workloads.format_exception(exc)
    _emit(out, report)
    return 0


def _nopoll_env() -> dict[str, str] | None:
    raw = os.environ.get("SMCISH_BENCH_NOPOLL_ENV")  # set by the harness from --nopoll-env
    return json.loads(raw) if raw else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=("server", "client", "probe"))
    parser.add_argument("--transport", required=True, choices=sorted(transports.TRANSPORTS))
    parser.add_argument("--loop", default="asyncio", choices=transports.LOOPS)
    parser.add_argument("--server", help="client: the server's ready message (JSON)")
    parser.add_argument("--scale", action="store_true",
                        help="a scale-case peer: RLIMIT_NOFILE raised to the hard limit, deep listen backlog")
    parser.add_argument("--tls-dir",
                        help="the run's TLS files (transports.write_tls_files): the server adds a TLS "
                             "streams listener, the client trusts the CA in it (tls.* cases)")
    args = parser.parse_args(argv)
    out = _protocol_stream()
    return {"server": server_main, "client": client_main, "probe": probe_main}[args.role](args, out)


if __name__ == "__main__":
    sys.exit(main())
