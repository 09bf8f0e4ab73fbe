"""Parity with plain asyncio, in {ism, tcp fallback} x {asyncio, uvloop}.

Every scenario is written once, as a coroutine taking an ``Api`` (the connection-opening
functions: plain asyncio's, or smcish's with the env's keywords) and returning an observation:
return values, exception types (and messages where asyncio's are stable), callback order, bytes
received. Each test runs the scenario with plain asyncio and with smcish, each on a fresh loop of
the env's kind, and asserts the observations are equal. Warnings logged by asyncio/smcish and
exceptions reported to the loop's exception handler are part of the observation. The smcish side
also checks that every connection really took the env's path (``get_extra_info('smcish').mode``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import re
import socket
import sys
import time
import warnings
import weakref

import pytest

import smcish
from conftest import new_loop

HOST = "127.0.0.1"
T = 5.0                      # bound of every single wait in a scenario
BIG = 32 << 20               # more than the kernel's socket buffers and smcish's largest ring


# --------------------------------------------------------------------------- the two sides

class Plain:
    """asyncio's own functions on the running loop."""

    name = "asyncio"

    def __init__(self, env) -> None:
        self.env = env
        self.checked = 0

    async def open_connection(self, host, port, **kw):
        return await asyncio.open_connection(host, port, **kw)

    async def start_server(self, cb, host, port, **kw):
        return await asyncio.start_server(cb, host, port, **kw)

    async def create_connection(self, factory, host, port, **kw):
        return await asyncio.get_running_loop().create_connection(factory, host, port, **kw)

    async def create_server(self, factory, host, port, **kw):
        return await asyncio.get_running_loop().create_server(factory, host, port, **kw)

    def install(self, loop) -> None:
        """The loop methods smcish patches stay the loop's own."""

    def check(self, obj) -> None:
        assert obj.get_extra_info("smcish") is None
        self.checked += 1


class Smc(Plain):
    """smcish's drop-ins, forced to the env's path."""

    name = "smcish"

    async def open_connection(self, host, port, **kw):
        return await smcish.open_connection(host, port, **self.env.kw, **kw)

    async def start_server(self, cb, host, port, **kw):
        return await smcish.start_server(cb, host, port, **self.env.kw, **kw)

    async def create_connection(self, factory, host, port, **kw):
        return await smcish.create_connection(factory, host, port, **self.env.kw, **kw)

    async def create_server(self, factory, host, port, **kw):
        return await smcish.create_server(factory, host, port, **self.env.kw, **kw)

    def install(self, loop) -> None:
        smcish.install(loop, smcish.Config(device="none") if self.env.path == "tcp" else None)

    def check(self, obj) -> None:
        info = obj.get_extra_info("smcish")
        assert info is not None, obj
        assert info.mode == self.env.expected_mode, info
        self.checked += 1


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelname, record.getMessage()))


def run_side(env, api, scenario, timeout: float = 60.0):
    """Run ``scenario(api)`` on a fresh loop of the env's kind; the observation, plus what the
    loop's exception handler and the asyncio/smcish loggers got meanwhile."""

    async def main():
        loop = asyncio.get_running_loop()
        errors: list = []
        prev = loop.get_exception_handler()
        loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
        handler = _Records()
        loggers = [logging.getLogger("asyncio"), logging.getLogger("smcish")]
        for lg in loggers:
            lg.addHandler(handler)
        before = asyncio.all_tasks()
        try:
            obs = await scenario(api)
        except BaseException:
            await _cancel_leftovers(before)
            raise
        finally:
            for lg in loggers:
                lg.removeHandler(handler)
            loop.set_exception_handler(prev)
        return {"obs": obs, "logged": handler.records,
                "loop_errors": [(ctx.get("message"), kind(ctx.get("exception"))) for ctx in errors]}

    return env.run(main(), timeout=timeout)


async def _cancel_leftovers(before: set) -> None:
    """A scenario failed midway: end the tasks it left (server handlers...) while the loop
    runs, so that no coroutine is finalised later, after the loop closed, in the middle of
    another test (an unraisable exception whose report re-enters ast.parse in pytest's own
    traceback formatting: CPython 3.11's 'AST constructor recursion depth mismatch')."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me and t not in before and not t.done()]
    for t in tasks:
        t.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=T)


def compare(env, scenario, connections: bool = True):
    plain = run_side(env, Plain(env), scenario)
    smc_api = Smc(env)
    smc = run_side(env, smc_api, scenario)
    if connections:
        assert smc_api.checked > 0, "the scenario checked no smcish connection's mode"
    assert smc == plain, "smcish differs from asyncio:\n" + "\n".join(_diff(plain, smc))
    return plain


def _diff(plain, smc, path="") -> list:
    if isinstance(plain, dict) and isinstance(smc, dict):
        out = []
        for key in list(plain) + [k for k in smc if k not in plain]:
            out += _diff(plain.get(key, "<missing>"), smc.get(key, "<missing>"), f"{path}/{key}")
        return out
    if plain == smc:
        return []
    return [f"  {path}:\n    asyncio: {plain!r:.600}\n    smcish:  {smc!r:.600}"]


def xfail_if(request, cond: bool, reason: str) -> None:
    if cond:
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=reason))


# --------------------------------------------------------------------------- observation helpers

def kind(exc) -> str | None:
    """The built-in class of an exception (smcish raises built-in subclasses: PeerReset is a
    ConnectionResetError), or None."""
    if exc is None:
        return None
    for cls in type(exc).__mro__:
        if cls.__module__ == "builtins" or cls.__module__.startswith("asyncio"):
            return cls.__name__
    return type(exc).__name__


def text(exc) -> str:
    """An exception's message, object addresses blanked (they differ from run to run)."""
    return _ADDRESS.sub("0x?", str(exc))


_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")


def outcome(fn, *args, msg: bool = True, **kwargs):
    try:
        return ("ok", fn(*args, **kwargs))
    except Exception as exc:  # observed
        return ("raise", kind(exc), text(exc)) if msg else ("raise", kind(exc))


async def aoutcome(awaitable, msg: bool = True, timeout: float = T):
    try:
        return ("ok", await asyncio.wait_for(awaitable, timeout))
    except asyncio.CancelledError:
        return ("cancelled",)
    except asyncio.IncompleteReadError as exc:
        return ("raise", "IncompleteReadError", exc.partial, exc.expected)
    except asyncio.LimitOverrunError as exc:
        return ("raise", "LimitOverrunError", text(exc), exc.consumed)
    except Exception as exc:  # observed
        return ("raise", kind(exc), text(exc)) if msg else ("raise", kind(exc))


async def until(cond, timeout: float = T, what: str = "condition") -> None:
    """Wait (bounded) until ``cond()`` is true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


async def settle(seconds: float = 0.1) -> None:
    await asyncio.sleep(seconds)


class Rec(asyncio.Protocol):
    """A protocol recording its callbacks (consecutive data_received calls count once)."""

    keep_open = False

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.events: list = []
        self.data = bytearray()
        self.transport = None
        self.made = loop.create_future()
        self.lost = loop.create_future()
        self.eof = loop.create_future()

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.events.append("connection_made")
        self.made.set_result(transport)

    def data_received(self, data) -> None:
        if not self.events or self.events[-1] != "data_received":
            self.events.append("data_received")
        self.data += data

    def eof_received(self):
        self.events.append("eof_received")
        self.eof.set_result(None)
        return self.keep_open

    def connection_lost(self, exc) -> None:
        self.events.append(f"connection_lost({kind(exc)})")
        self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.events.append("pause_writing")

    def resume_writing(self) -> None:
        self.events.append("resume_writing")

    async def wait_data(self, n: int, timeout: float = T) -> None:
        await until(lambda: len(self.data) >= n, timeout, f"{n} bytes")


class KeepOpen(Rec):
    keep_open = True


class Accepts:
    """A server's protocol factory that hands out each accepted protocol."""

    def __init__(self, factory=Rec) -> None:
        self.factory = factory
        self.queue: asyncio.Queue = asyncio.Queue()

    def __call__(self):
        proto = self.factory()
        self.queue.put_nowait(proto)
        return proto

    async def next(self):
        proto = await asyncio.wait_for(self.queue.get(), T)
        await asyncio.wait_for(proto.made, T)
        return proto


async def pair(api, client=Rec, server=Rec, **kw):
    """A listening server and one connection: (server, client transport, client proto, server proto)."""
    accepts = Accepts(server)
    srv = await api.create_server(accepts, HOST, 0, **kw)
    port = srv.sockets[0].getsockname()[1]
    transport, proto = await asyncio.wait_for(api.create_connection(client, HOST, port, **kw), T)
    api.check(transport)
    peer = await accepts.next()
    api.check(peer.transport)
    return srv, transport, proto, peer


async def shut(srv, *transports) -> None:
    for t in transports:
        t.close()
    srv.close()
    await asyncio.wait_for(srv.wait_closed(), T)


async def stream_pair(api, **kw):
    """start_server + open_connection: (server, client reader, client writer, server (reader, writer))."""
    loop = asyncio.get_running_loop()
    accepted = loop.create_future()

    async def handle(reader, writer):
        accepted.set_result((reader, writer))

    srv = await api.start_server(handle, HOST, 0, **kw)
    port = srv.sockets[0].getsockname()[1]
    reader, writer = await asyncio.wait_for(api.open_connection(HOST, port, **kw), T)
    api.check(writer)
    sr, sw = await asyncio.wait_for(accepted, T)
    api.check(sw)
    return srv, reader, writer, (sr, sw)


async def stream_shut(srv, *writers) -> list:
    """Close the writers and the server; what each writer's wait_closed() gave."""
    for w in writers:
        w.close()
    closed = [await aoutcome(w.wait_closed(), msg=False) for w in writers]
    srv.close()
    await asyncio.wait_for(srv.wait_closed(), T)
    return closed


# --------------------------------------------------------------------------- transport scenarios

async def sc_extra_info(api):
    srv, t, c, s = await pair(api)
    obs = {}
    for side, tr in (("client", t), ("server", s.transport)):
        sock = tr.get_extra_info("socket")
        obs[side] = {
            "socket_type": type(sock).__name__,
            "family": sock.family, "type": sock.type,
            "sockname": tr.get_extra_info("sockname") == sock.getsockname(),
            "peername": tr.get_extra_info("peername") == sock.getpeername(),
            "peercert": tr.get_extra_info("peercert"),
            "ssl_object": tr.get_extra_info("ssl_object"),
            "sslcontext": tr.get_extra_info("sslcontext"),
            "cipher": tr.get_extra_info("cipher"),
            "default": tr.get_extra_info("no-such-key", "dflt"),
            "has_smcish_default": tr.get_extra_info("no-such-key") is None,
        }
    obs["ports"] = (t.get_extra_info("peername") == s.transport.get_extra_info("sockname"),
                    t.get_extra_info("sockname") == s.transport.get_extra_info("peername"))
    await shut(srv, t, s.transport)
    await asyncio.wait_for(c.lost, T)
    obs["after_close"] = (t.get_extra_info("sockname") is not None,
                          t.get_extra_info("peercert"))
    return obs


def test_extra_info(env):
    compare(env, sc_extra_info)


async def sc_write_eof(api):
    obs = {}
    for server in (Rec, KeepOpen):
        srv, t, c, s = await pair(api, server=server)
        o = obs[server.__name__] = {}
        o["can_write_eof"] = t.can_write_eof()
        t.write(b"hello")
        o["write_eof"] = outcome(t.write_eof)
        o["write_eof_again"] = outcome(t.write_eof)
        o["is_closing"] = t.is_closing()
        o["write"] = outcome(t.write, b"x")
        o["write_empty"] = outcome(t.write, b"")
        o["can_write_eof_after"] = t.can_write_eof()
        await asyncio.wait_for(s.eof, T)
        if server is KeepOpen:
            s.transport.write(b"bye")             # half-closed: the other direction still works
            s.transport.close()
        await asyncio.wait_for(c.lost, T)
        await asyncio.wait_for(s.lost, T)
        o["server"] = (s.events, bytes(s.data))
        o["client"] = (c.events, bytes(c.data))
        o["is_closing_end"] = t.is_closing()
        await shut(srv, t)
    return obs


def test_write_eof(env):
    compare(env, sc_write_eof)


async def sc_write_argument_types(api):
    srv, t, _c, s = await pair(api)
    obs = {}
    obs["empty"] = outcome(t.write, b"")
    obs["bytearray"] = outcome(t.write, bytearray(b"1"))
    obs["memoryview"] = outcome(t.write, memoryview(b"-2-")[1:2])
    obs["writelines"] = outcome(t.writelines, [b"3", bytearray(b"4"), memoryview(b"5")])
    obs["writelines_gen"] = outcome(t.writelines, (bytes([c]) for c in b"67"))
    obs["writelines_empty"] = outcome(t.writelines, [])
    buf = bytearray(b"8")
    t.write(buf)
    buf[:] = b"X"                                 # the transport copied what it keeps
    t.write(b".")
    await s.wait_data(9)
    await settle()
    obs["received"] = bytes(s.data)
    await shut(srv, t, s.transport)
    return obs


def test_write_argument_types(env):
    compare(env, sc_write_argument_types)


async def sc_write_type_errors(api):
    srv, t, _c, s = await pair(api)
    obs = {}
    obs["str"] = outcome(t.write, "text")
    obs["int"] = outcome(t.write, 5)
    obs["none"] = outcome(t.write, None)
    obs["writelines_bad_item"] = outcome(t.writelines, [b"8", "nine"], msg=False)
    t.write(b".")
    t.write_eof()
    obs["writelines_after_eof"] = outcome(t.writelines, [b"x"])
    obs["writelines_empty_after_eof"] = outcome(t.writelines, [], msg=False)
    await asyncio.wait_for(s.eof, T)
    obs["received"] = bytes(s.data)
    await shut(srv, t, s.transport)
    return obs


def test_write_type_errors(env, request):
    xfail_if(request, env.path == "ism" and env.loop_kind == "uvloop",
             "the ism transport checks arguments as asyncio's selector transport does; uvloop's "
             "own: TypeError 'memoryview: a bytes-like object is required, not ...' (asyncio: "
             "'data argument must be a bytes-like object, not ...'), write(None) accepted as a "
             "no-op, writelines([b'8', 'nine']) sends b'8' before raising (asyncio joins first: "
             "nothing sent), writelines() after write_eof() says 'Cannot call writelines() after "
             "write_eof()'")
    compare(env, sc_write_type_errors)


async def sc_close(api):
    obs = {}
    srv, t, c, s = await pair(api)
    obs["is_closing_open"] = t.is_closing()
    obs["get_protocol"] = t.get_protocol() is c
    t.write(b"last")
    obs["close"] = outcome(t.close)
    obs["is_closing"] = t.is_closing()
    obs["is_reading"] = t.is_reading()
    obs["close_again"] = outcome(t.close)
    obs["abort_after_close"] = outcome(t.abort)
    obs["write_eof_after_close"] = outcome(t.write_eof)
    obs["events_before_loop"] = list(c.events)
    await asyncio.wait_for(c.lost, T)
    await asyncio.wait_for(s.lost, T)
    await settle()
    obs["client"] = c.events
    obs["server"] = (s.events, bytes(s.data))
    obs["get_protocol_after_lost"] = t.get_protocol() is c
    obs["buffer_after"] = t.get_write_buffer_size()
    await shut(srv)
    return obs


def test_close(env):
    compare(env, sc_close)


async def sc_abort_states(api):
    obs = {}
    srv, t, c, s = await pair(api)
    obs["abort"] = outcome(t.abort)
    obs["is_closing"] = t.is_closing()
    obs["is_reading"] = t.is_reading()
    obs["abort_again"] = outcome(t.abort)
    obs["close_after_abort"] = outcome(t.close)
    obs["events_before_loop"] = list(c.events)
    await asyncio.wait_for(c.lost, T)
    await asyncio.wait_for(s.lost, T)
    await settle()
    obs["client"] = c.events
    obs["buffer_after"] = t.get_write_buffer_size()
    await shut(srv)
    return obs


def test_abort_states(env):
    compare(env, sc_abort_states)


async def sc_write_after_close(api):
    """Writes between close()/abort() and connection_lost: dropped silently (under asyncio's
    threshold for logging them: see sc_write_after_connection_lost)."""
    obs = {}
    for end in ("close", "abort"):
        srv, t, c, s = await pair(api)
        getattr(t, end)()
        o = obs[end] = {}
        o["writes"] = [outcome(t.write, b"x") for _ in range(3)]
        o["writelines"] = outcome(t.writelines, [b"y", b"z"])
        o["buffer"] = t.get_write_buffer_size()
        await asyncio.wait_for(c.lost, T)
        await asyncio.wait_for(s.lost, T)
        o["client"] = c.events
        o["server_data"] = bytes(s.data)
        await shut(srv)
    return obs


def test_write_after_close(env):
    compare(env, sc_write_after_close)


async def sc_write_after_connection_lost(api):
    """Writes after connection_lost (asyncio: dropped, 'socket.send() raised exception.' logged
    from the 5th write counted since close()), and past that threshold before it."""
    srv, t, c, s = await pair(api)
    t.close()
    obs = {"before_lost": [outcome(t.write, b"x") for _ in range(7)]}
    await asyncio.wait_for(c.lost, T)
    await shut(srv, s.transport)
    for end in ("close", "abort", "peer reset"):
        srv, t, c, s = await pair(api)
        if end == "peer reset":
            s.transport.pause_reading()
            t.write(b"unread")
            await settle()
            s.transport.abort()
        else:
            getattr(t, end)()
        await asyncio.wait_for(c.lost, T)
        obs[end] = {"writes": [outcome(t.write, b"x") for _ in range(6)],
                    "writelines": outcome(t.writelines, [b"y", b"z"]),
                    "write_eof": outcome(t.write_eof),
                    "buffer": t.get_write_buffer_size()}
        await asyncio.wait_for(s.lost, T)
        await shut(srv)
    srv, _reader, writer, (_sr, sw) = await stream_pair(api)
    writer.close()
    await writer.wait_closed()
    obs["stream"] = {"write": outcome(writer.write, b"x"), "drain": await aoutcome(writer.drain())}
    obs["shut"] = await stream_shut(srv, sw)
    return obs


def test_write_after_connection_lost(env, request):
    xfail_if(request, env.path == "ism" and env.loop_kind == "uvloop",
             "after connection_lost the ism transport drops writes and counts them as "
             "asyncio's selector transport does (logging 'socket.send() raised exception.' "
             "from the 5th); uvloop's own transport raises RuntimeError('unable to perform "
             "operation on <TCPTransport closed=True ...>; the handler is closed') instead, and "
             "logs nothing for writes between close() and connection_lost")
    compare(env, sc_write_after_connection_lost)


async def sc_abort_unread_data(api):
    """The aborting side holds bytes it never read: TCP resets the peer (RST)."""
    srv, t, c, s = await pair(api)
    s.transport.pause_reading()
    t.write(b"x" * 1000)
    await settle()
    s.transport.abort()
    await asyncio.wait_for(c.lost, T)
    await asyncio.wait_for(s.lost, T)
    obs = {"client": c.events, "server": s.events, "server_data": bytes(s.data)}
    await shut(srv, t)
    return obs


def test_abort_with_unread_data_resets_peer(env):
    compare(env, sc_abort_unread_data)


async def sc_abort_clean(api):
    """The aborting side read everything: the kernel sends FIN, the peer sees EOF."""
    srv, t, c, s = await pair(api)
    t.write(b"x" * 1000)
    await s.wait_data(1000)
    s.transport.abort()
    await asyncio.wait_for(c.lost, T)
    await asyncio.wait_for(s.lost, T)
    obs = {"client": c.events, "server": s.events}
    await shut(srv, t)
    return obs


def test_abort_with_nothing_unread(env, request):
    compare(env, sc_abort_clean)


async def sc_abort_pending(api):
    """abort() with bytes still buffered in user space: they are dropped; the peer ends."""
    srv, t, c, s = await pair(api)
    s.transport.pause_reading()
    t.write(b"y" * BIG)
    obs = {"buffered": t.get_write_buffer_size() > 0}
    t.abort()
    obs["buffer_after_abort"] = t.get_write_buffer_size()
    await asyncio.wait_for(c.lost, T)
    s.transport.resume_reading()
    await asyncio.wait_for(s.lost, T)
    obs["server"] = s.events
    obs["server_got_all"] = len(s.data) == BIG
    obs["client"] = c.events
    await shut(srv)
    return obs


def test_abort_with_pending_writes(env, request):
    xfail_if(request, env.path == "ism" and env.loop_kind == "uvloop",
             "uvloop's TCP transport still counts the dropped bytes in get_write_buffer_size() "
             "after abort(); smcish's ISM transport follows asyncio's (0)")
    compare(env, sc_abort_pending)


async def sc_peer_aborts_while_paused(api):
    """The peer writes, then aborts, while we do not read: what it sent before is still
    delivered once reading resumes, and the connection ends only then (the end itself, EOF or
    reset, is what test_abort_* compare)."""
    srv, t, c, s = await pair(api)
    t.pause_reading()
    s.transport.write(b"before the abort" * 64)
    await settle(0.05)
    s.transport.abort()
    await asyncio.wait_for(s.lost, T)
    await settle()
    obs = {"while_paused": (list(c.events), bytes(c.data)), "is_closing": t.is_closing()}
    t.resume_reading()
    await asyncio.wait_for(c.lost, T)
    ending = ("eof_received", "connection_lost(")
    obs["after_resume"] = ([e for e in c.events if not e.startswith(ending)],
                           bytes(c.data) == b"before the abort" * 64)
    await shut(srv)
    return obs


def test_peer_aborts_while_paused(env, request):
    compare(env, sc_peer_aborts_while_paused)


async def sc_pause_resume_reading(api):
    obs = {}
    srv, t, c, s = await pair(api)
    st = s.transport
    obs["initial"] = st.is_reading()
    obs["pause"] = outcome(st.pause_reading)
    obs["pause_twice"] = outcome(st.pause_reading)
    obs["paused"] = st.is_reading()
    t.write(b"abc")
    await settle()
    obs["while_paused"] = (list(s.events), bytes(s.data))
    obs["resume"] = outcome(st.resume_reading)
    obs["resume_twice"] = outcome(st.resume_reading)
    obs["resumed"] = st.is_reading()
    await s.wait_data(3)
    obs["after_resume"] = (list(s.events), bytes(s.data))
    st.pause_reading()
    t.write(b"def")
    t.write_eof()
    await settle()
    obs["eof_while_paused"] = (list(s.events), bytes(s.data))
    st.resume_reading()
    await asyncio.wait_for(s.lost, T)
    obs["after_eof"] = (list(s.events), bytes(s.data))
    obs["is_reading_closed"] = st.is_reading()
    obs["pause_closed"] = outcome(st.pause_reading)
    obs["resume_closed"] = outcome(st.resume_reading)
    obs["is_reading_closed_after"] = st.is_reading()
    # the client side: pausing before the peer's bytes, then closing while paused
    c_obs = obs["client"] = {}
    await asyncio.wait_for(c.lost, T)
    c_obs["events"] = c.events
    await shut(srv)
    return obs


def test_pause_resume_reading(env):
    compare(env, sc_pause_resume_reading)


async def sc_pause_close_while_paused(api):
    srv, t, c, s = await pair(api)
    t.pause_reading()
    s.transport.write(b"for a paused reader")
    s.transport.close()
    await asyncio.wait_for(s.lost, T)
    await settle()
    obs = {"paused_events": list(c.events), "paused_data": bytes(c.data)}
    t.resume_reading()
    await asyncio.wait_for(c.lost, T)
    obs["events"] = c.events
    obs["data"] = bytes(c.data)
    await shut(srv)
    return obs


def test_peer_closes_while_paused(env):
    compare(env, sc_pause_close_while_paused)


async def sc_write_buffer_limits(api):
    srv, t, c, s = await pair(api)
    obs = {}
    for kw in ({"high": 1000}, {"low": 100}, {"high": 100, "low": 100}, {"high": 0},
               {"high": 0, "low": 0}, {}, {"high": 10, "low": 20}, {"low": -1},
               {"high": -1}, {"high": 8, "low": -1}):
        obs[repr(kw)] = (outcome(t.set_write_buffer_limits, **kw), t.get_write_buffer_limits())
    obs["positional"] = (outcome(t.set_write_buffer_limits, 4000, 1000), t.get_write_buffer_limits())
    obs["size"] = t.get_write_buffer_size()
    obs["events"] = list(c.events)
    await shut(srv, t, s.transport)
    return obs


def test_write_buffer_limits(env):
    compare(env, sc_write_buffer_limits)


async def sc_default_write_buffer_limits(api):
    srv, t, _c, s = await pair(api)
    obs = {"client": t.get_write_buffer_limits(), "server": s.transport.get_write_buffer_limits()}
    await shut(srv, t, s.transport)
    return obs


def test_default_write_buffer_limits(env, request):
    xfail_if(request, env.path == "ism" and env.loop_kind == "uvloop",
             "the ism transport starts at asyncio's (low, high) = (16384, 65536); uvloop's own "
             "transport starts at (16, 65536) (its low-water default lacks the * 1024)")
    compare(env, sc_default_write_buffer_limits)


async def sc_write_buffer_size(api):
    srv, t, c, s = await pair(api)
    s.transport.pause_reading()
    payload = bytes(range(256)) * (BIG // 256)
    obs = {"empty": t.get_write_buffer_size()}
    t.set_write_buffer_limits(high=0)
    obs["high0_empty"] = list(c.events)              # nothing buffered: no pause_writing
    t.set_write_buffer_limits()
    t.write(payload)
    obs["buffered"] = t.get_write_buffer_size() > 0
    obs["at_most_all"] = t.get_write_buffer_size() <= BIG
    obs["events_after_write"] = list(c.events)
    t.set_write_buffer_limits(high=BIG * 2)           # above the buffer: no resume until it drains
    obs["events_after_raise"] = list(c.events)
    s.transport.resume_reading()
    await s.wait_data(BIG, timeout=30)
    await until(lambda: t.get_write_buffer_size() == 0, what="an empty write buffer")
    await settle(0.05)
    obs["drained"] = t.get_write_buffer_size()
    obs["events_drained"] = list(c.events)
    obs["intact"] = bytes(s.data) == payload
    await shut(srv, t, s.transport)
    return obs


def test_write_buffer_size_and_flow_control(env):
    compare(env, sc_write_buffer_size)


class Switch(Rec):
    """Hands the transport to ``new`` on its first bytes, and asks the peer for more."""

    new: Rec

    def data_received(self, data) -> None:
        super().data_received(data)
        if len(self.data) >= 3 and self.transport.get_protocol() is self:
            self.transport.set_protocol(self.new)
            self.events.append(("switched", self.transport.get_protocol() is self.new))
            self.transport.write(b"ack")


class Buffered(asyncio.BufferedProtocol):
    def __init__(self) -> None:
        self.events: list = []
        self.data = bytearray()
        self.buf = bytearray(7)

    def get_buffer(self, sizehint):
        return self.buf

    def buffer_updated(self, nbytes):
        if not self.events or self.events[-1] != "buffer_updated":
            self.events.append("buffer_updated")
        self.data += self.buf[:nbytes]

    def eof_received(self):
        self.events.append("eof_received")

    def connection_lost(self, exc):
        self.events.append(f"connection_lost({kind(exc)})")


async def sc_set_protocol(api):
    obs = {}
    for new_cls in (Rec, Buffered):
        new = new_cls()

        def client(new=new):
            proto = Switch()
            proto.new = new
            return proto

        srv, t, c, s = await pair(api, client=client, server=KeepOpen)
        s.transport.write(b"one")
        await s.wait_data(3)                      # the ack: the switch happened
        s.transport.write(b"two" * 1000)
        s.transport.close()
        await asyncio.wait_for(s.lost, T)
        await until(lambda new=new: any(str(e).startswith("connection_lost") for e in new.events),
                    what="connection_lost of the new protocol")
        obs[new_cls.__name__] = {"old": (c.events, bytes(c.data)),
                                 "new": (new.events, bytes(new.data) == b"two" * 1000),
                                 "get_protocol": t.get_protocol() is new,
                                 "server": bytes(s.data)}
        await shut(srv, t)
    return obs


def test_set_protocol_switch(env):
    compare(env, sc_set_protocol)


class Raises(Rec):
    """Raises from one of its callbacks."""

    where = "data_received"

    def data_received(self, data) -> None:
        super().data_received(data)
        if self.where == "data_received":
            raise ValueError("boom")

    def eof_received(self):
        super().eof_received()
        if self.where == "eof_received":
            raise ValueError("boom")


class RaisesOnEof(Raises):
    where = "eof_received"


class BufferedRaises(Buffered):
    def __init__(self, where) -> None:
        super().__init__()
        self.where = where
        self.lost = asyncio.get_running_loop().create_future()

    def get_buffer(self, sizehint):
        if self.where == "get_buffer":
            raise ValueError("boom")
        if self.where == "empty_buffer":
            return bytearray()
        return super().get_buffer(sizehint)

    def buffer_updated(self, nbytes):
        super().buffer_updated(nbytes)
        if self.where == "buffer_updated":
            raise ValueError("boom")

    def connection_lost(self, exc):
        super().connection_lost(exc)
        self.lost.set_result(exc)


async def sc_protocol_callback_errors(api):
    """A protocol callback raises: the loop's exception handler hears of it, with asyncio's
    message, and the transport is closed with the exception."""
    obs = {}
    for name, factory in (("data_received", Raises), ("eof_received", RaisesOnEof),
                          ("get_buffer", lambda: BufferedRaises("get_buffer")),
                          ("empty_buffer", lambda: BufferedRaises("empty_buffer")),
                          ("buffer_updated", lambda: BufferedRaises("buffer_updated"))):
        srv, t, c, s = await pair(api, client=factory)
        s.transport.write(b"data")
        if name == "eof_received":
            await c.wait_data(4)
            s.transport.write_eof()
        await asyncio.wait_for(c.lost, T)
        obs[name] = {"client": c.events, "is_closing": t.is_closing()}
        await shut(srv, s.transport)
        await asyncio.wait_for(s.lost, T)
    return obs


def test_protocol_callback_errors(env, request):
    xfail_if(request, env.path == "ism" and env.loop_kind == "uvloop",
             "the ism transport reports a failing protocol callback with asyncio's messages "
             "('Fatal error: protocol.data_received() call failed.', ...) and the callback's own "
             "exception; uvloop's own transport says 'Fatal error on transport TCPTransport' for "
             "all of them and wraps a get_buffer() error in RuntimeError")
    compare(env, sc_protocol_callback_errors)


# --------------------------------------------------------------------------- streams

async def sc_stream_writer(api):
    srv, reader, writer, (sr, sw) = await stream_pair(api)
    obs = {"transport": writer.transport.get_protocol() is not None,
           "can_write_eof": writer.can_write_eof(), "is_closing": writer.is_closing(),
           "peername": writer.get_extra_info("peername") == sw.get_extra_info("sockname")}
    writer.write(b"ping")
    writer.writelines([b"-", b"pong"])
    obs["drain"] = await aoutcome(writer.drain())
    obs["server_read"] = await aoutcome(sr.readexactly(9))
    obs["close"] = outcome(writer.close)
    obs["is_closing_after"] = writer.is_closing()
    obs["close_twice"] = outcome(writer.close)
    obs["wait_closed"] = await aoutcome(writer.wait_closed())
    obs["wait_closed_twice"] = await aoutcome(writer.wait_closed())
    obs["drain_closed"] = await aoutcome(writer.drain())
    obs["reader_after_close"] = (await aoutcome(reader.read()), reader.at_eof())
    obs["server_eof"] = (await aoutcome(sr.read()), sr.at_eof())
    obs["server_write_after_peer_closed"] = outcome(sw.write, b"late")
    obs["shut"] = await stream_shut(srv, sw)
    return obs


def test_stream_writer(env):
    compare(env, sc_stream_writer)


async def sc_stream_reader_limits(api):
    obs = {}
    srv, reader, writer, (_sr, sw) = await stream_pair(api, limit=16)
    sw.write(b"short\n" + b"x" * 40 + b"\n" + b"tail")
    sw.write_eof()
    await until(lambda: len(reader._buffer) == 51, what="51 bytes in the reader")
    await settle(0.05)
    obs["readline"] = await aoutcome(reader.readline())
    obs["readline_long"] = await aoutcome(reader.readline())
    obs["readuntil_missing"] = await aoutcome(reader.readuntil(b"!"))
    obs["at_eof"] = reader.at_eof()
    obs["read_after"] = await aoutcome(reader.read())
    obs["shut"] = await stream_shut(srv, writer, sw)

    srv, reader, writer, (_sr, sw) = await stream_pair(api, limit=16)
    sw.write(b"y" * 20)                       # over the limit, no separator yet
    await until(lambda: len(reader._buffer) == 20, what="20 bytes in the reader")
    obs["readuntil_overrun"] = await aoutcome(reader.readuntil(b"\n"))
    obs["buffer_kept"] = await aoutcome(reader.readexactly(20))
    obs["readuntil_empty_sep"] = await aoutcome(reader.readuntil(b""))
    obs["read0"] = await aoutcome(reader.read(0))
    obs["readexactly_neg"] = await aoutcome(reader.readexactly(-1))
    sw.write(b"multi\r\nsep")
    await settle()
    obs["readuntil_tuple"] = await aoutcome(reader.readuntil(b"\r\n"))
    obs["readexactly0"] = await aoutcome(reader.readexactly(0))
    sw.write(b"abcd")
    sw.write_eof()
    obs["readexactly_incomplete"] = await aoutcome(reader.readexactly(10))
    obs["at_eof2"] = reader.at_eof()
    obs["readline_eof"] = await aoutcome(reader.readline())
    obs["read_eof"] = await aoutcome(reader.read(5))
    obs["shut"] = await stream_shut(srv, writer, sw)
    return obs


def test_stream_reader_limits(env):
    compare(env, sc_stream_reader_limits)


async def sc_stream_reader_flow(api):
    """A reader with a small limit pauses its transport and resumes it as it is read."""
    srv, reader, writer, (_sr, sw) = await stream_pair(api, limit=1024)
    payload = bytes(range(256)) * 4096
    sw.write(payload)
    sw.write_eof()
    await settle()
    t = writer.transport
    obs = {"paused": not t.is_reading()}
    got = bytearray()
    for _ in range(10_000):
        chunk = await asyncio.wait_for(reader.read(3000), T)
        if not chunk:
            break
        got += chunk
    obs["intact"] = bytes(got) == payload
    obs["shut"] = await stream_shut(srv, writer, sw)
    return obs


def test_stream_reader_flow_control(env):
    compare(env, sc_stream_reader_flow)


async def sc_is_reading_after_eof(api):
    srv, t, c, s = await pair(api, server=KeepOpen)
    t.write_eof()
    await asyncio.wait_for(s.eof, T)
    obs = {"is_reading": s.transport.is_reading(), "is_closing": s.transport.is_closing()}
    s.transport.write(b"after eof")
    s.transport.close()
    await asyncio.wait_for(c.lost, T)
    obs["client"] = (c.events, bytes(c.data))
    await shut(srv)
    return obs


def test_is_reading_after_eof(env, request):
    xfail_if(request, env.path == "ism" and env.loop_kind == "uvloop",
             "after eof_received() returned True the ism transport's is_reading() stays True, "
             "as asyncio's selector transport (not paused, not closing); uvloop's own transport "
             "says False (it stopped reading)")
    compare(env, sc_is_reading_after_eof)


async def sc_stream_exceptions(api):
    obs = {}
    srv, reader, writer, (_sr, sw) = await stream_pair(api)
    reader.set_exception(ValueError("mine"))
    obs["read"] = await aoutcome(reader.read())
    obs["exception"] = kind(reader.exception())
    obs["drain"] = await aoutcome(writer.drain())
    obs["shut"] = await stream_shut(srv, writer, sw)

    # the peer resets (it aborts holding bytes it never read): read raises, so does wait_closed
    srv, reader, writer, (_sr, sw) = await stream_pair(api)
    sw.transport.pause_reading()
    writer.write(b"never read")
    await writer.drain()
    await settle()
    sw.transport.abort()
    obs["reset_read"] = await aoutcome(reader.read(), msg=False)
    obs["reset_exception"] = kind(reader.exception())
    obs["reset_at_eof"] = reader.at_eof()
    obs["reset_drain"] = await aoutcome(writer.drain(), msg=False)
    obs["reset_is_closing"] = writer.is_closing()
    obs["reset_wait_closed"] = await aoutcome(writer.wait_closed(), msg=False)
    obs["shut"] = await stream_shut(srv, writer, sw)
    return obs


def test_stream_exception_propagation(env):
    compare(env, sc_stream_exceptions)


async def sc_stream_feed_eof(api):
    """The application ends its reader itself; the peer's later bytes are then a protocol error."""
    srv, reader, writer, (_sr, sw) = await stream_pair(api)
    sw.write(b"early")
    await settle()
    reader.feed_eof()
    obs = {"at_eof_buffered": reader.at_eof(), "read": await aoutcome(reader.read()),
           "at_eof": reader.at_eof()}
    sw.write(b"late")
    await settle()
    obs["read_late"] = await aoutcome(reader.read())
    obs["is_closing"] = writer.is_closing()
    obs["shut"] = await stream_shut(srv, writer, sw)
    return obs


def test_stream_feed_eof_then_peer_data(env, request):
    xfail_if(request, env.path == "ism" and env.loop_kind == "uvloop",
             "uvloop's TCP transport reports every protocol callback error as 'Fatal error on "
             "transport TCPTransport'; smcish's ISM transport uses asyncio's messages")
    compare(env, sc_stream_feed_eof)


# --------------------------------------------------------------------------- cancellation

async def sc_cancel_reads(api):
    obs = {}
    srv, reader, writer, (_sr, sw) = await stream_pair(api)
    for name, call, first, second in (
            ("read", lambda: reader.read(100), b"", b"hello"),
            ("readexactly", lambda: reader.readexactly(10), b"12345", b"67890"),
            ("readuntil", lambda: reader.readuntil(b"\n"), b"part-", b"line\nnext"),
            ("readline", lambda: reader.readline(), b"half ", b"line\n")):
        task = asyncio.ensure_future(call())
        if first:
            sw.write(first)
        await settle(0.05)
        o = obs[name] = {"pending": not task.done()}
        task.cancel()
        o["cancelled"] = await aoutcome(task)
        o["usable"] = (writer.is_closing(), writer.transport.is_reading())
        sw.write(second)
        await sw.drain()
        o["again"] = await aoutcome(call())            # the bytes before the cancel are kept
    sw.write_eof()
    obs["eof"] = await aoutcome(reader.read())
    obs["shut"] = await stream_shut(srv, writer, sw)
    return obs


def test_cancel_reads_mid_transfer(env):
    compare(env, sc_cancel_reads)


async def sc_cancel_drain(api):
    srv, reader, writer, (sr, sw) = await stream_pair(api)
    sw.transport.pause_reading()
    payload = bytes(range(251)) * (BIG // 251)
    writer.write(payload)
    task = asyncio.ensure_future(writer.drain())
    await settle()
    obs = {"pending": not task.done()}
    task.cancel()
    obs["cancelled"] = await aoutcome(task)
    obs["is_closing"] = writer.is_closing()
    writer.write(b"tail")
    writer.write_eof()
    sw.transport.resume_reading()
    got = await aoutcome(sr.read(), timeout=30)
    obs["received"] = (got[0], got[1] == payload + b"tail" if got[0] == "ok" else got)
    obs["drain_after"] = await aoutcome(writer.drain(), timeout=30)
    sw.write(b"reply")
    sw.write_eof()
    obs["reply"] = await aoutcome(reader.read())
    obs["shut"] = await stream_shut(srv, writer, sw)
    return obs


def test_cancel_drain_mid_transfer(env):
    compare(env, sc_cancel_drain)


async def sc_cancel_protocol_reader_task(api):
    """A task cancelled while the peer streams: nothing is lost for the next reader."""
    srv, reader, writer, (_sr, sw) = await stream_pair(api, limit=4096)
    payload = bytes(range(256)) * 4096
    half = asyncio.Event()

    async def send():
        for i in range(0, len(payload), 8192):
            if i == len(payload) // 2:
                await half.wait()        # the second half only after the cancel
            sw.write(payload[i:i + 8192])
            await sw.drain()
        sw.write_eof()

    sender = asyncio.ensure_future(send())
    got = bytearray()

    async def consume():
        while True:
            chunk = await reader.read(1000)
            if not chunk:
                return
            got.extend(chunk)
            await asyncio.sleep(0)

    task = asyncio.ensure_future(consume())
    await asyncio.wait_for(until(lambda: len(got) > 10_000), T)
    task.cancel()
    obs = {"cancelled": await aoutcome(task)}
    half.set()
    for _ in range(10_000):
        chunk = await asyncio.wait_for(reader.read(5000), T)
        if not chunk:
            break
        got += chunk
    await asyncio.wait_for(sender, T)
    obs["intact"] = bytes(got) == payload
    obs["shut"] = await stream_shut(srv, writer, sw)
    return obs


def test_cancel_read_loop_while_streaming(env):
    compare(env, sc_cancel_protocol_reader_task)


# --------------------------------------------------------------------------- servers

_ECHOES: weakref.WeakSet = weakref.WeakSet()     # handler tasks of _echo still running


async def _echo(reader, writer):
    task = asyncio.current_task()
    _ECHOES.add(task)
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        _ECHOES.discard(task)
        writer.close()


async def echoes_done() -> None:
    """Every _echo handler ended (they end when their client closed)."""
    loop = asyncio.get_running_loop()
    await until(lambda: not any(t.get_loop() is loop for t in _ECHOES),
                what="the echo handlers to end")


async def _roundtrip(api, port, msg=b"ping"):
    try:
        reader, writer = await asyncio.wait_for(api.open_connection(HOST, port), T)
    except OSError as exc:
        return ("raise", kind(exc), exc.errno)
    api.check(writer)
    writer.write(msg)
    got = await aoutcome(reader.readexactly(len(msg)))
    return got, (reader, writer)


async def sc_server_lifecycle(api):
    loop = asyncio.get_running_loop()
    srv = await api.start_server(_echo, HOST, 0)
    obs = {"is_serving": srv.is_serving(), "get_loop": srv.get_loop() is loop,
           "sockets": [type(s).__name__ for s in srv.sockets]}
    port = srv.sockets[0].getsockname()[1]
    obs["sockname"] = srv.sockets[0].getsockname() == (HOST, port)
    obs["start_serving_again"] = await aoutcome(srv.start_serving())
    obs["is_serving_started"] = srv.is_serving()
    got, (reader, writer) = await _roundtrip(api, port)
    obs["connect"] = got
    obs["close"] = outcome(srv.close)
    obs["is_serving_closed"] = srv.is_serving()
    obs["sockets_closed"] = list(srv.sockets)
    obs["wait_closed"] = await aoutcome(srv.wait_closed())
    obs["close_twice"] = outcome(srv.close)
    obs["connect_closed"] = await _roundtrip(api, port)
    writer.write(b"still")                        # the accepted connection outlives the listener
    obs["existing"] = await aoutcome(reader.readexactly(5))
    writer.close()
    await writer.wait_closed()
    obs["wait_closed_after"] = await aoutcome(srv.wait_closed())
    obs["start_serving_closed"] = await aoutcome(srv.start_serving(), msg=False)
    obs["serve_forever_closed"] = await aoutcome(srv.serve_forever(), msg=False)
    await echoes_done()
    return obs


def test_server_lifecycle(env):
    compare(env, sc_server_lifecycle)


async def sc_deferred_serving(api):
    """start_serving=False, then start_serving() or serve_forever()."""
    obs = {}
    srv = await api.start_server(_echo, HOST, 0, start_serving=False)
    port = srv.sockets[0].getsockname()[1]
    obs["is_serving"] = srv.is_serving()
    obs["connect_not_serving"] = await _roundtrip(api, port)
    obs["start_serving"] = await aoutcome(srv.start_serving())
    obs["is_serving_started"] = srv.is_serving()
    obs["start_serving_twice"] = await aoutcome(srv.start_serving())
    got, (_reader, writer) = await _roundtrip(api, port)
    obs["connect"] = got
    writer.close()
    await writer.wait_closed()
    srv.close()
    await srv.wait_closed()

    srv = await api.start_server(_echo, HOST, 0, start_serving=False)
    port = srv.sockets[0].getsockname()[1]
    task = asyncio.ensure_future(srv.serve_forever())
    await settle(0.05)
    obs["serve_forever_serving"] = srv.is_serving()
    got, (_reader, writer) = await _roundtrip(api, port)
    obs["serve_forever_connect"] = got
    writer.close()
    await writer.wait_closed()
    task.cancel()
    obs["cancelled"] = await aoutcome(task)
    await echoes_done()
    return obs


def test_deferred_serving(env, request):
    compare(env, sc_deferred_serving)


async def sc_serve_forever(api):
    srv = await api.start_server(_echo, HOST, 0)
    port = srv.sockets[0].getsockname()[1]
    task = asyncio.ensure_future(srv.serve_forever())
    await settle(0.05)
    obs = {"serving": srv.is_serving(), "pending": not task.done()}
    got, (reader, writer) = await _roundtrip(api, port)
    obs["connect"] = got
    task.cancel()
    obs["cancelled"] = await aoutcome(task)
    obs["serving_after"] = srv.is_serving()
    obs["sockets_after"] = list(srv.sockets)
    obs["connect_after"] = await _roundtrip(api, port)
    writer.write(b"alive")
    obs["existing"] = await aoutcome(reader.readexactly(5))
    writer.close()
    await writer.wait_closed()
    obs["wait_closed"] = await aoutcome(srv.wait_closed())

    # serve_forever ended by close() from elsewhere
    srv = await api.start_server(_echo, HOST, 0)
    task = asyncio.ensure_future(srv.serve_forever())
    await settle(0.05)
    srv.close()
    obs["closed_elsewhere"] = await aoutcome(task)
    obs["closed_serving"] = srv.is_serving()
    await echoes_done()
    return obs


def test_serve_forever_cancelled(env):
    compare(env, sc_serve_forever)


async def sc_serve_forever_twice(api):
    srv = await api.start_server(_echo, HOST, 0)
    port = srv.sockets[0].getsockname()[1]
    task = asyncio.ensure_future(srv.serve_forever())
    await settle(0.05)
    obs = {"second": await aoutcome(srv.serve_forever(), msg=False),
           "serving": srv.is_serving(), "pending": not task.done()}
    got, (_reader, writer) = await _roundtrip(api, port)     # still served as before
    obs["connect"] = got
    writer.close()
    await writer.wait_closed()
    task.cancel()
    obs["cancelled"] = await aoutcome(task)
    await echoes_done()
    return obs


def test_serve_forever_twice(env, request):
    compare(env, sc_serve_forever_twice)


async def sc_server_async_with(api):
    async with await api.start_server(_echo, HOST, 0) as srv:
        port = srv.sockets[0].getsockname()[1]
        obs = {"serving": srv.is_serving()}
        got, (reader, writer) = await _roundtrip(api, port)
        obs["connect"] = got
    obs["serving_after"] = srv.is_serving()
    obs["connect_after"] = await _roundtrip(api, port)
    writer.write(b"alive")
    obs["existing"] = await aoutcome(reader.readexactly(5))
    writer.close()
    await writer.wait_closed()

    accepts = Accepts()
    async with await api.create_server(accepts, HOST, 0) as srv2:
        port = srv2.sockets[0].getsockname()[1]
        t, c = await asyncio.wait_for(api.create_connection(Rec, HOST, port), T)
        api.check(t)
        s = await accepts.next()
        api.check(s.transport)
    obs["protocol_server_after"] = (srv2.is_serving(), s.transport.is_closing())
    t.close()
    await asyncio.wait_for(s.lost, T)
    obs["protocol_events"] = (c.events, s.events)
    await echoes_done()
    return obs


def test_server_async_with(env):
    compare(env, sc_server_async_with)


@pytest.mark.skipif(sys.version_info < (3, 13),
                    reason="Server.close_clients/abort_clients are Python 3.13+")
@pytest.mark.parametrize("method", ["close_clients", "abort_clients"])
def test_server_close_abort_clients(env, method):
    async def scenario(api):
        accepts = Accepts()
        srv = await api.create_server(accepts, HOST, 0)
        port = srv.sockets[0].getsockname()[1]
        t, c = await asyncio.wait_for(api.create_connection(Rec, HOST, port), T)
        api.check(t)
        s = await accepts.next()
        api.check(s.transport)
        srv.close()
        getattr(srv, method)()
        await asyncio.wait_for(srv.wait_closed(), T)
        await asyncio.wait_for(c.lost, T)
        return {"client": c.events, "server": s.events}

    compare(env, scenario)


# --------------------------------------------------------------------------- resources

async def _drop_writer(api, port, payload, written):
    """Open a connection, write, and drop the reader and writer (and so the transport, as
    far as the application is concerned) without close()."""
    _reader, writer = await asyncio.wait_for(api.open_connection(HOST, port), T)
    api.check(writer)
    writer.write(payload)
    written.set()


async def sc_unclosed_writer(api):
    loop = asyncio.get_running_loop()
    obs = {}
    for name, payload in (("idle", b"dropped"), ("pending", bytes(range(256)) * (BIG // 256))):
        written = asyncio.Event()
        ended = loop.create_future()

        async def handle(reader, writer, written=written, ended=ended):
            await written.wait()
            await settle(0.05)           # (the client dropped its writer meanwhile)
            ended.set_result(await reader.read())
            writer.close()

        srv = await api.start_server(handle, HOST, 0)
        port = srv.sockets[0].getsockname()[1]
        for _ in range(3):
            gc.collect()                     # garbage of earlier tests does not count
        unraisable: list = []
        old_hook = sys.unraisablehook
        sys.unraisablehook = lambda u, unraisable=unraisable: unraisable.append(kind(u.exc_value))
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                await _drop_writer(api, port, payload, written)
                for _ in range(3):
                    gc.collect()
                    await asyncio.sleep(0.01)
                got = await aoutcome(ended, timeout=30)
                for _ in range(3):
                    gc.collect()
                    await asyncio.sleep(0.02)
        finally:
            sys.unraisablehook = old_hook
        resource = [str(w.message).split(" ", 2)[:2] for w in caught
                    if issubclass(w.category, ResourceWarning)]
        srv.close()
        await srv.wait_closed()
        obs[name] = {"resource_warnings": resource, "unraisable": unraisable,
                     "peer_got_all": got == ("ok", payload)}
    return obs


def test_unclosed_writer_warns_once(env):
    result = compare(env, sc_unclosed_writer)
    # asyncio's StreamWriter.__del__ warns once and closes; the transport then closes cleanly
    assert result["obs"]["idle"]["resource_warnings"] == [["unclosed", "<StreamWriter"]]


def _warnings_after_loop_close(env, api) -> dict:
    """A connection whose reader and writer sit in reference cycles, so that they are collected
    only after the loop closed (a program that forgot to close and ended): which
    ResourceWarnings the whole lifecycle gives."""

    async def main():
        got = asyncio.Event()

        async def handle(reader, writer):
            await reader.readexactly(4)
            got.set()
            await reader.read()
            writer.close()

        srv = await api.start_server(handle, HOST, 0)
        port = srv.sockets[0].getsockname()[1]

        async def drop():
            reader, writer = await asyncio.wait_for(api.open_connection(HOST, port), T)
            api.check(writer)
            writer.write(b"ping")
            reader.cycle, writer.cycle = reader, writer

        await drop()
        await asyncio.wait_for(got.wait(), T)
        srv.close()
        await srv.wait_closed()

    for _ in range(3):
        gc.collect()
    loop_errors: list = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loop = new_loop(env.loop_kind)
        loop.set_exception_handler(lambda lp, ctx: loop_errors.append(ctx.get("message")))
        try:
            loop.run_until_complete(asyncio.wait_for(main(), 30))
            loop.run_until_complete(asyncio.sleep(0.05))
        finally:
            loop.close()
        del loop
        for _ in range(5):         # (a device thread may hold a reference for a moment)
            gc.collect()
            time.sleep(0.02)
    resource = sorted(" ".join(str(w.message).split(" ", 2)[:2]) for w in caught
                      if issubclass(w.category, ResourceWarning))
    return {"resource_warnings": resource, "loop_errors": sorted(loop_errors)}


def test_unclosed_connection_collected_after_loop_close(env, request):
    plain = _warnings_after_loop_close(env, Plain(env))
    smc_api = Smc(env)
    smc = _warnings_after_loop_close(env, smc_api)
    assert smc_api.checked == 1
    assert smc == plain, "smcish differs from asyncio:\n" + "\n".join(_diff(plain, smc))


# --------------------------------------------------------------------------- patched loop methods



async def sc_installed_loop(api):
    """Stock code on a loop smcish installed itself on: every patched method keeps its contract."""
    loop = asyncio.get_running_loop()
    api.install(loop)
    obs = {}
    # create_server / create_connection
    accepts = Accepts()
    srv = await loop.create_server(accepts, HOST, 0)
    port = srv.sockets[0].getsockname()[1]
    t, c = await asyncio.wait_for(loop.create_connection(Rec, HOST, port), T)
    api.check(t)
    s = await accepts.next()
    api.check(s.transport)
    t.write(b"abc")
    await s.wait_data(3)
    t.close()
    await asyncio.wait_for(s.lost, T)
    obs["create"] = (c.events, s.events, bytes(s.data))

    # sock_connect + create_connection(sock=) (aiohttp's connector)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    obs["sock_connect"] = await aoutcome(loop.sock_connect(sock, (HOST, port)))
    t2, _c2 = await asyncio.wait_for(loop.create_connection(Rec, sock=sock), T)
    api.check(t2)
    s2 = await accepts.next()
    t2.write(b"via sock=")
    await s2.wait_data(9)
    obs["sock="] = bytes(s2.data)
    t2.close()
    await asyncio.wait_for(s2.lost, T)

    # a socket used directly: sock_sendall / sock_recv / sock_recv_into stay plain TCP
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    await asyncio.wait_for(loop.sock_connect(sock, (HOST, port)), T)
    s3 = await accepts.next()
    obs["sock_sendall"] = await aoutcome(loop.sock_sendall(sock, b"raw bytes"))
    await s3.wait_data(9)
    s3.transport.write(b"answer")
    obs["sock_recv"] = await aoutcome(loop.sock_recv(sock, 3))
    buf = bytearray(3)
    obs["sock_recv_into"] = (await aoutcome(loop.sock_recv_into(sock, buf)), bytes(buf))
    obs["raw"] = bytes(s3.data)
    sock.close()
    await asyncio.wait_for(s3.lost, T)
    obs["raw_events"] = s3.events

    # connect_accepted_socket
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.bind((HOST, 0))
    lsock.listen(1)
    lsock.setblocking(False)
    t4, c4 = await asyncio.wait_for(
        loop.create_connection(Rec, HOST, lsock.getsockname()[1]), T)
    conn, _ = await asyncio.wait_for(loop.sock_accept(lsock), T)
    lsock.close()
    t5, p5 = await asyncio.wait_for(loop.connect_accepted_socket(Rec, conn), T)
    t4.write(b"accepted")
    await p5.wait_data(8)
    t5.close()
    await asyncio.wait_for(c4.lost, T)
    obs["accepted"] = (bytes(p5.data), c4.events, t5.get_extra_info("smcish") is None)
    srv.close()
    await srv.wait_closed()
    return obs


def test_installed_loop_methods(env):
    compare(env, sc_installed_loop)
