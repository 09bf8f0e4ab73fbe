#!/usr/bin/env python3
"""A gRPC service and client on grpclib (pure-Python gRPC over HTTP/2), accelerated by smcish.

    python examples/grpc_service.py server --port 50051
    python examples/grpc_service.py client --port 50051

grpclib opens its connections with ``loop.create_connection`` / ``loop.create_server``, so the
program only has to run on an smcish loop: ``asyncio.Runner(loop_factory=smcish.loop_factory())``
(or run it unchanged with ``python -m smcish run examples/grpc_service.py ...``). ``--plain``
runs on a stock loop (plain TCP, for comparison).

Messages are JSON objects carried by a custom grpclib codec (content type
``application/grpc+json``), so there is no code generation step: a handler receives and returns
dicts. Methods of ``smcish.examples.Echo``:

- ``Unary`` (unary-unary): ``{"text"}`` -> ``{"text", "mode"}``
- ``Count`` (unary-stream): ``{"n", "size"}`` -> n x ``{"i", "payload"}``
- ``Sum`` (stream-unary): stream of ``{"value"}`` -> ``{"sum", "count"}``
- ``Chat`` (stream-stream): echoes every message, tagged with its index
- ``Info`` (unary-unary): the server's view of this call's connection (smcish mode) and counters

The transport under a grpclib stream is reachable through ``stream.peer`` (grpclib's ``Peer``,
which keeps the connection's transport): ``transport_info(stream)`` reads
``get_extra_info("smcish")`` from it, on either end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import grpclib.client
import grpclib.const
import grpclib.server
from grpclib.encoding.base import CodecBase

SERVICE = "smcish.examples.Echo"


class JsonCodec(CodecBase):
    """grpclib codec: messages are JSON-serialisable objects (``message_type`` is ignored)."""

    __content_subtype__ = "json"

    def encode(self, message, message_type) -> bytes:
        return json.dumps(message, separators=(",", ":")).encode()

    def decode(self, data: bytes, message_type):
        return json.loads(data)


def transport_info(stream) -> dict:
    """smcish's view of the connection under a grpclib stream (server or client side)."""
    peer = getattr(stream, "peer", None)
    transport = getattr(peer, "_transport", None)          # grpclib.protocol.Peer keeps it
    info = transport.get_extra_info("smcish") if transport is not None else None
    return {"mode": info.mode if info else "plain",         # "plain": not an smcish transport
            "reason": getattr(getattr(info, "reason", None), "name", None)}


class EchoService:
    """The server side; grpclib asks ``__mapping__`` for the method table."""

    async def unary(self, stream) -> None:
        request = await stream.recv_message()
        await stream.send_message({"text": request["text"], "mode": transport_info(stream)["mode"]})

    async def count(self, stream) -> None:
        request = await stream.recv_message()
        payload = "x" * request.get("size", 0)
        for i in range(request["n"]):
            await stream.send_message({"i": i, "payload": payload})

    async def sum(self, stream) -> None:
        total = count = 0
        async for message in stream:
            total += message["value"]
            count += 1
        await stream.send_message({"sum": total, "count": count})

    async def chat(self, stream) -> None:
        index = 0
        async for message in stream:
            await stream.send_message({"index": index, **message})
            index += 1

    async def info(self, stream) -> None:
        await stream.recv_message()
        stats = None
        try:
            import smcish

            stats = smcish.stats()
        except ImportError:
            pass
        await stream.send_message({**transport_info(stream), "stats": stats})

    def __mapping__(self):
        card = grpclib.const.Cardinality
        H = grpclib.const.Handler
        return {
            f"/{SERVICE}/Unary": H(self.unary, card.UNARY_UNARY, dict, dict),
            f"/{SERVICE}/Count": H(self.count, card.UNARY_STREAM, dict, dict),
            f"/{SERVICE}/Sum": H(self.sum, card.STREAM_UNARY, dict, dict),
            f"/{SERVICE}/Chat": H(self.chat, card.STREAM_STREAM, dict, dict),
            f"/{SERVICE}/Info": H(self.info, card.UNARY_UNARY, dict, dict),
        }


class EchoStub:
    """The client side (what protoc's grpclib plugin would generate)."""

    def __init__(self, channel: grpclib.client.Channel) -> None:
        c = grpclib.client
        self.Unary = c.UnaryUnaryMethod(channel, f"/{SERVICE}/Unary", dict, dict)
        self.Count = c.UnaryStreamMethod(channel, f"/{SERVICE}/Count", dict, dict)
        self.Sum = c.StreamUnaryMethod(channel, f"/{SERVICE}/Sum", dict, dict)
        self.Chat = c.StreamStreamMethod(channel, f"/{SERVICE}/Chat", dict, dict)
        self.Info = c.UnaryUnaryMethod(channel, f"/{SERVICE}/Info", dict, dict)


def make_server() -> grpclib.server.Server:
    return grpclib.server.Server([EchoService()], codec=JsonCodec())


def make_channel(host: str, port: int) -> grpclib.client.Channel:
    return grpclib.client.Channel(host, port, codec=JsonCodec())


# --------------------------------------------------------------------------- command line
def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


async def run_server(args) -> None:
    server = make_server()
    await server.start(args.host, args.port)
    port = server._server.sockets[0].getsockname()[1]         # grpclib has no public accessor
    emit(event="listening", host=args.host, port=port)
    try:
        await server.wait_closed()
    finally:
        server.close()


async def run_client(args) -> int:
    channel = make_channel(args.host, args.port)
    stub = EchoStub(channel)
    checks = {}
    try:
        # Unary, through a stream object so we can look at the connection under it.
        async with stub.Unary.open() as stream:
            await stream.send_message({"text": "hello"}, end=True)
            reply = await stream.recv_message()
            client_side = transport_info(stream)
        checks["unary"] = reply["text"] == "hello"
        server_mode = reply["mode"]
        # Unary-stream: many messages, some bigger than an HTTP/2 frame.
        replies = await stub.Count({"n": args.messages, "size": 20000})
        checks["server_stream"] = [r["i"] for r in replies] == list(range(args.messages)) and all(
            len(r["payload"]) == 20000 for r in replies)
        # Stream-unary.
        async with stub.Sum.open() as stream:
            for value in range(args.messages):
                await stream.send_message({"value": value})
            await stream.end()
            reply = await stream.recv_message()
        checks["client_stream"] = reply == {"sum": sum(range(args.messages)), "count": args.messages}
        # Stream-stream, lock-step: each message is answered before the next is sent.
        async with stub.Chat.open() as stream:
            ok = True
            for i in range(args.messages):
                await stream.send_message({"text": f"m{i}"})
                answer = await stream.recv_message()
                ok = ok and answer == {"index": i, "text": f"m{i}"}
            await stream.end()
            ok = ok and await stream.recv_message() is None
        checks["bidi_stream"] = ok
        # Sequential unary latency.
        start = time.perf_counter()
        for i in range(args.calls):
            await stub.Unary({"text": str(i)})
        per_call_us = (time.perf_counter() - start) / max(args.calls, 1) * 1e6
        info = await stub.Info({})
    finally:
        channel.close()
    ok = all(checks.values())
    emit(mode=client_side["mode"], reason=client_side["reason"], server_mode=server_mode,
         server_info_mode=info["mode"], ok=ok, checks=checks, unary_call_us=round(per_call_us, 1),
         server_connections_ism=(info["stats"] or {}).get("connections_ism"))
    return 0 if ok else 1


def run(coro, plain: bool = False, loop: str = "asyncio"):
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
    parser = argparse.ArgumentParser(description="grpclib service and client over smcish")
    parser.add_argument("role", choices=("server", "client"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=50051, help="server: 0 picks a free port")
    parser.add_argument("--messages", type=int, default=50, help="client: messages per stream")
    parser.add_argument("--calls", type=int, default=200, help="client: sequential unary calls")
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
