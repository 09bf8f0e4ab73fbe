#!/usr/bin/env python3
"""An aiohttp web server and client session over smcish.

    python examples/aiohttp_app.py server --port 8080 --file-size 20M
    python examples/aiohttp_app.py client --port 8080
    wrk -t2 -c50 -d3s http://127.0.0.1:8080/hello         # a plain client: served over TCP

Server: aiohttp's ``AppRunner``/``TCPSite`` on an smcish loop
(``asyncio.Runner(loop_factory=smcish.loop_factory())``): aiohttp calls ``loop.create_server``, so
the listener is advertised on the device, smcish clients get shared memory and every other client
(curl, wrk, a browser) gets the ordinary TCP path, unaltered. Routes:

- ``GET /hello``: a fixed body (``HELLO``), what the load test checks
- ``POST /echo``: the request body back
- ``GET /file``: ``web.FileResponse`` of a large file (asyncio's ``loop.sendfile``: on an smcish
  transport its fallback path, chunks written through the transport); ``GET /file/sha256``
- ``GET /ws``: websocket echo (text and binary); the first message is ``{"mode": ...}``
- ``GET /mode``: the smcish mode of this request's connection; ``GET /stats``: ``smcish.stats()``

Client: an ``aiohttp.ClientSession`` with ``SmcConnector``, which opens each connection with
``smcish.create_connection(host, port)``. aiohttp's own ``TCPConnector`` connects the socket itself
(aiohappyeyeballs, ``loop.sock_connect``) and hands it to ``loop.create_connection(sock=...)``; on an
smcish loop the patched ``sock_connect`` claims the connection before connecting (docs/design.md
3.3), so the stock connector gets shared memory too (``--transparent``); ``--plain`` uses a stock
loop (no smcish at all).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import re
import sys
import tempfile
import time

import aiohttp
from aiohttp import web

HELLO = b"hello from aiohttp over smcish\n" * 8


# --------------------------------------------------------------------------- server
def _smc_info(transport) -> dict:
    info = transport.get_extra_info("smcish") if transport is not None else None
    return {"mode": info.mode if info is not None else "plain",
            "reason": getattr(getattr(info, "reason", None), "name", None)}


def _stats() -> dict | None:
    try:
        import smcish
    except ImportError:
        return None
    return smcish.stats()


def make_file(path: str, size: int) -> str:
    """Write ``size`` deterministic, non-repeating-looking bytes; return their sha256."""
    digest = hashlib.sha256()
    block = hashlib.sha256(b"smcish").digest() * 2048              # 64 KiB
    with open(path, "wb") as fh:
        written = 0
        i = 0
        while written < size:
            chunk = (i.to_bytes(8, "big") + block)[:size - written]
            fh.write(chunk)
            digest.update(chunk)
            written += len(chunk)
            i += 1
    return digest.hexdigest()


def make_app(file_path: str, file_sha256: str) -> web.Application:
    routes = web.RouteTableDef()

    @routes.get("/hello")
    async def hello(request):
        return web.Response(body=HELLO, content_type="text/plain")

    @routes.post("/echo")
    async def echo(request):
        return web.Response(body=await request.read(), content_type="application/octet-stream")

    @routes.get("/file")
    async def file(request):
        return web.FileResponse(file_path)

    @routes.get("/file/sha256")
    async def file_sha(request):
        return web.json_response({"sha256": file_sha256, "size": os.path.getsize(file_path)})

    @routes.get("/mode")
    async def mode(request):
        return web.json_response(_smc_info(request.transport))

    @routes.get("/stats")
    async def stats(request):
        return web.json_response(_stats())

    @routes.get("/ws")
    async def websocket(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json(_smc_info(request.transport))
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                if msg.data == "close":
                    break
                await ws.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        await ws.close()
        return ws

    app = web.Application(client_max_size=64 << 20)
    app.add_routes(routes)
    return app


async def run_server(args) -> None:
    tmpdir = None
    if args.file:
        path = args.file
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        sha = digest.hexdigest()
    else:
        tmpdir = tempfile.mkdtemp(prefix="smcish-aiohttp-")
        path = os.path.join(tmpdir, "big.bin")
        sha = make_file(path, args.file_size)
    runner = web.AppRunner(make_app(path, sha), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, args.host, args.port, backlog=1024)
    await site.start()
    port = runner.addresses[0][1]                            # the real port when --port 0
    print(json.dumps({"event": "listening", "host": args.host, "port": port,
                      "file_size": os.path.getsize(path), "sha256": sha}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
        if tmpdir:
            os.unlink(path)
            os.rmdir(tmpdir)


# --------------------------------------------------------------------------- client
class SmcConnector(aiohttp.TCPConnector):
    """A TCPConnector whose plain-HTTP connections are opened by ``smcish.create_connection``.

    aiohttp's stock path connects a socket itself, then passes it as ``sock=``; this one lets
    smcish connect (bind, claim, connect), so a connection to an smcish server always negotiates
    shared memory. ``https`` connections keep aiohttp's own path. ``smcish_kw`` are smcish keywords
    (``device=``, ``ring_size=``...). Uses aiohttp's ``_wrap_create_connection`` hook (aiohttp 3.9+).
    """

    def __init__(self, *args, smcish_kw: dict | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._smcish_kw = smcish_kw or {}

    async def _wrap_create_connection(self, *args, addr_infos, req, timeout,
                                      client_error=aiohttp.ClientConnectorError, **kwargs):
        if kwargs.get("ssl"):
            return await super()._wrap_create_connection(
                *args, addr_infos=addr_infos, req=req, timeout=timeout,
                client_error=client_error, **kwargs)
        import smcish

        kwargs.pop("ssl", None)
        kwargs.pop("server_hostname", None)
        family, _, _, _, sockaddr = addr_infos[0]      # aiohttp pops this one and retries on error
        try:
            async with asyncio.timeout(timeout.sock_connect):
                return await smcish.create_connection(*args, host=sockaddr[0], port=sockaddr[1],
                                                      family=family, **self._smcish_kw, **kwargs)
        except OSError as exc:
            if exc.errno is None and isinstance(exc, asyncio.TimeoutError):
                raise
            raise client_error(req.connection_key, exc) from exc


def make_session(connector: str = "smcish", **kw) -> aiohttp.ClientSession:
    """``connector``: ``"smcish"`` (SmcConnector) or ``"stock"`` (aiohttp's TCPConnector)."""
    conn = SmcConnector(**kw) if connector == "smcish" else aiohttp.TCPConnector(**kw)
    return aiohttp.ClientSession(connector=conn)


def response_info(resp) -> dict:
    """The smcish view of a response's connection. Only while aiohttp holds the connection for
    the response: a small body arrives with the headers and the connection goes back to the pool
    at once (then this says ``"released"``); a streamed body keeps it until read."""
    if resp.connection is None or resp.connection.transport is None:
        return {"mode": "released", "reason": None}
    return _smc_info(resp.connection.transport)


async def run_client(args) -> int:
    base = f"http://{args.host}:{args.port}"
    checks = {}
    out = {}
    before = _stats() if not args.plain else None
    async with make_session("stock" if args.transparent or args.plain else "smcish") as session:
        async with session.get(f"{base}/hello") as resp:
            checks["hello"] = resp.status == 200 and await resp.read() == HELLO
        async with session.get(f"{base}/mode") as resp:
            out["server"] = await resp.json()
        payload = os.urandom(3 << 20)
        async with session.post(f"{base}/echo", data=payload) as resp:
            checks["echo"] = await resp.read() == payload
        if args.file_download:
            async with session.get(f"{base}/file/sha256") as resp:
                expected = await resp.json()
            start = time.perf_counter()
            digest = hashlib.sha256()
            size = 0
            async with session.get(f"{base}/file") as resp:
                out["client"] = response_info(resp)      # held: the body is still streaming
                async for block in resp.content.iter_chunked(1 << 20):
                    digest.update(block)
                    size += len(block)
            elapsed = time.perf_counter() - start
            checks["file"] = digest.hexdigest() == expected["sha256"] and size == expected["size"]
            out["file_mib_s"] = round(size / elapsed / (1 << 20), 1)
        async with session.get(f"{base}/file/sha256") as resp:
            out.setdefault("client", response_info(resp))  # "released" if the body came at once
            await resp.read()
        async with session.ws_connect(f"{base}/ws") as ws:
            info = ws.get_extra_info("smcish")
            out["ws_client"] = info.mode if info is not None else "plain"
            out["ws_server"] = (await ws.receive_json())["mode"]
            ok = True
            for i in range(args.messages):
                await ws.send_str(f"text {i}")
                ok = ok and (await ws.receive_str()) == f"text {i}"
                blob = os.urandom(1000 + i * 997)
                await ws.send_bytes(blob)
                ok = ok and (await ws.receive_bytes()) == blob
            await ws.send_str("close")
            msg = await ws.receive()
            ok = ok and msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            checks["websocket"] = ok
    if before is not None:
        after = _stats()
        out["client_connections"] = {
            mode: after[f"connections_{mode}"] - before[f"connections_{mode}"] for mode in ("ism", "tcp")}
    ok = all(checks.values())
    if out["client"]["mode"] == "released":                # fall back on the websocket's view
        out["client"] = {"mode": out["ws_client"], "reason": None}
    print(json.dumps({"mode": out["client"]["mode"], "reason": out["client"]["reason"],
                      "server_mode": out["server"]["mode"], "ok": ok, "checks": checks, **out}),
          flush=True)
    return 0 if ok else 1


def _size(text: str) -> int:
    """``20M``, ``512k``, ``1GiB``, ``4096`` -> bytes."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmg]?)(?:i?b)?", text.strip().lower())
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}")
    return int(float(match[1]) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[match[2]])


def run(coro, plain: bool, loop: str = "asyncio"):
    """Run ``coro`` on an smcish loop (a stock one when ``plain``); ``loop``: asyncio | uvloop."""
    base = asyncio.new_event_loop
    if loop == "uvloop":
        import uvloop

        base = uvloop.new_event_loop
    if not plain:
        import smcish

        base = smcish.loop_factory(base)
    with asyncio.Runner(loop_factory=base) as runner:
        return runner.run(coro)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="aiohttp server and client session over smcish")
    parser.add_argument("role", choices=("server", "client"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="server: 0 picks a free port")
    parser.add_argument("--file", help="server: file served at /file (default: a generated one)")
    parser.add_argument("--file-size", type=_size, default=20 << 20,
                        help="server: size of the generated file (e.g. 20M)")
    parser.add_argument("--messages", type=int, default=20, help="client: websocket round trips")
    parser.add_argument("--no-file", dest="file_download", action="store_false",
                        help="client: skip the large file download")
    parser.add_argument("--transparent", action="store_true",
                        help="client: aiohttp's stock connector on an smcish loop")
    parser.add_argument("--plain", action="store_true", help="stock loop, no smcish")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    args = parser.parse_args(argv)
    if args.role == "server":
        try:
            run(run_server(args), args.plain, args.loop)
        except KeyboardInterrupt:
            return 130
        return 0
    return run(run_client(args), args.plain, args.loop)


if __name__ == "__main__":
    sys.exit(main())
