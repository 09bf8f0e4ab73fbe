"""The life of SmcTransport and HandshakeProtocol as state machines (docs/design.md 4.1).

- every move outside the tables is refused, and the state stays where it was;
- docs/design.md holds exactly the tables the code renders;
- real connections, on asyncio and uvloop, go through every move of the tables: each scenario
  below asserts the path its connection took, and ``test_the_scenarios_cover_every_move`` checks
  that those paths together make up the tables.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import struct
import sys
from typing import Any

import pytest

import smcish
import smcish.loop
from conftest import ROOT, Env, new_loop
from smcish import protocol as _protocol
from smcish import ring as _ring
from smcish import transport as _transport
from smcish.protocol import HandshakeProtocol, HandshakeState
from smcish.transport import SmcInfo, SmcTransport, TransportState
from test_optimistic import ThreadServer

HOST = "127.0.0.1"
S = TransportState
H = HandshakeState
KiB = 1 << 10
SMALL_RING = {"ring_size": 16 * KiB, "max_ring_size": 16 * KiB}    # fills at once, never grows
BULK = os.urandom(200 * KiB)                                          # > the ring: bytes stay buffered

# ----------------------------------------------------------------- the paths the scenarios take

# Each scenario's connection goes exactly this way (client side unless named otherwise).
FALLBACK = [S.SETUP, S.TCP]                                    # client and server
CLOSE_BUFFERED = [S.SETUP, S.OPTIMISTIC, S.ISM, S.CLOSING, S.CLOSED, S.LINGERING, S.RELEASED]
CLOSE_BUFFERED_SERVER = [S.SETUP, S.ISM, S.CLOSING, S.CLOSED, S.RELEASED]
ABORT = [S.SETUP, S.OPTIMISTIC, S.ISM, S.CLOSED, S.LINGERING, S.RELEASED]
MIGRATED = [S.SETUP, S.OPTIMISTIC, S.TCP]
MIGRATED_CLOSING = [S.SETUP, S.OPTIMISTIC, S.OPTIMISTIC_CLOSING, S.TCP]
CLOSED_THEN_MIGRATED = [S.SETUP, S.OPTIMISTIC, S.OPTIMISTIC_CLOSING, S.OPTIMISTIC_CLOSED, S.RELEASED]
CLOSED_THEN_ACCEPTED = [S.SETUP, S.OPTIMISTIC, S.OPTIMISTIC_CLOSING, S.OPTIMISTIC_CLOSED, S.CLOSED]
CLOSING_THEN_ACCEPTED = [S.SETUP, S.OPTIMISTIC, S.OPTIMISTIC_CLOSING, S.CLOSING, S.CLOSED]
ABORTED_OPTIMISTIC = [S.SETUP, S.OPTIMISTIC, S.OPTIMISTIC_ABORTED, S.RELEASED]
ABORTED_CLOSING = [S.SETUP, S.OPTIMISTIC, S.OPTIMISTIC_CLOSING, S.OPTIMISTIC_ABORTED, S.RELEASED]
FAILED_OPTIMISTIC = [S.SETUP, S.OPTIMISTIC, S.RELEASED]
FAILED_CLOSING = [S.SETUP, S.OPTIMISTIC, S.OPTIMISTIC_CLOSING, S.RELEASED]
OPTIMISTIC_STATES = {S.OPTIMISTIC, S.OPTIMISTIC_CLOSING, S.OPTIMISTIC_CLOSED, S.OPTIMISTIC_ABORTED}
TRANSPORT_PATHS = [FALLBACK, CLOSE_BUFFERED, CLOSE_BUFFERED_SERVER, ABORT, MIGRATED, MIGRATED_CLOSING,
                   CLOSED_THEN_MIGRATED, CLOSED_THEN_ACCEPTED, CLOSING_THEN_ACCEPTED, ABORTED_OPTIMISTIC,
                   ABORTED_CLOSING, FAILED_OPTIMISTIC, FAILED_CLOSING]

HS_FALLBACK = [H.NEW, H.FELL_BACK]                             # client and server
HS_CLIENT_ISM = [H.NEW, H.ESTABLISHED]
HS_SERVER_ISM = [H.NEW, H.DECIDING, H.ESTABLISHED]
HS_SERVER_FINAL_TCP = [H.NEW, H.DECIDING, H.FELL_BACK]
HS_SERVER_RESET = [H.NEW, H.DECIDING, H.FAILED]
HANDSHAKE_PATHS = [HS_FALLBACK, HS_CLIENT_ISM, HS_SERVER_ISM, HS_SERVER_FINAL_TCP, HS_SERVER_RESET]


def moves(paths: list[list[Any]]) -> set[tuple[Any, Any]]:
    return {(a, b) for path in paths for a, b in itertools.pairwise(path)}


def table_moves(table: dict[Any, frozenset[Any]]) -> set[tuple[Any, Any]]:
    return {(a, b) for a, nexts in table.items() for b in nexts}


# ----------------------------------------------------------------- the tables themselves

def bare_transport() -> SmcTransport:
    class Loop:            # _FlowControlMixin only keeps it; __del__ asks
        def is_closed(self):
            return True
    return SmcTransport(Loop(), None, SmcInfo("client"))


def bare_handshake() -> HandshakeProtocol:
    class Config:
        poll_us = 0.0
    return HandshakeProtocol(None, "client", None, Config())


def test_every_illegal_transport_move_is_refused():
    table = _transport._TRANSITIONS
    assert set(table) == set(S), "every state has a row"
    refused = 0
    for old, new in itertools.product(S, S):
        t = bare_transport()
        t._state = old
        if new in table[old]:
            t._set_state(new)
            assert t._state is new
            continue
        with pytest.raises(RuntimeError, match=f"cannot go from {old.name} to {new.name}"):
            t._set_state(new)
        assert t._state is old
        refused += 1
    assert refused == len(S) ** 2 - len(table_moves(table))


def test_every_illegal_handshake_move_is_refused():
    table = _protocol._TRANSITIONS
    assert set(table) == set(H)
    for old, new in itertools.product(H, H):
        h = bare_handshake()
        h._state = old
        if new in table[old]:
            h._set_state(new)
            assert h._state is new
            continue
        with pytest.raises(RuntimeError, match=f"cannot go from {old.name} to {new.name}"):
            h._set_state(new)
        assert h._state is old


def test_a_new_transport_and_handshake_start_at_the_start():
    t = bare_transport()
    assert t._state is S.SETUP and t._info.mode == "tcp" and not t.is_closing()
    assert bare_handshake()._state is H.NEW
    # nothing leads back to the start states
    assert not any(S.SETUP in nexts for nexts in _transport._TRANSITIONS.values())
    assert not any(H.NEW in nexts for nexts in _protocol._TRANSITIONS.values())


def test_mode_and_conn_lost_follow_the_state():
    """The public mode is set by the moves into TCP, OPTIMISTIC and ISM only; asyncio's
    ``_conn_lost`` counter starts exactly when a lost state is entered; the one-compare
    predicates the per-message paths use match the states' meanings."""
    closing = {S.OPTIMISTIC_CLOSING, S.CLOSING, S.OPTIMISTIC_CLOSED, S.OPTIMISTIC_ABORTED, S.CLOSED,
               S.LINGERING, S.RELEASED}
    lost = closing - {S.OPTIMISTIC_CLOSING, S.CLOSING}
    assert {s for s in S if s >= _transport._CLOSING_FROM} == closing
    assert {s for s in S if s >= _transport._LOST_FROM} == lost
    for path in TRANSPORT_PATHS:
        t = bare_transport()
        for new in path[1:]:
            t._set_state(new)
            assert t._info.mode == ("tcp" if new in (S.SETUP, S.TCP) else "ism"), path
            assert (t._conn_lost > 0) == (new in lost), path
            assert t.is_closing() == (new in closing), path


def test_design_doc_holds_the_tables_the_code_renders():
    with open(os.path.join(ROOT, "docs", "design.md"), encoding="utf-8") as f:
        doc = f.read()
    for table in (_transport.state_table(), _protocol.state_table()):
        assert "\n" + table + "\n" in doc, "docs/design.md 4.1 is stale: paste the output of " \
            "smcish.transport.state_table() / smcish.protocol.state_table()\n" + table
    # each row names the moves of the code's table
    for state, nexts in _transport._TRANSITIONS.items():
        row = next(line for line in doc.splitlines() if line.startswith(f"| {state.name} |"))
        named = row.split("|")[2].strip()
        assert named == (", ".join(s.name for s in S if s in nexts) or "(final)")


def test_the_scenarios_cover_every_move():
    assert moves(TRANSPORT_PATHS) == table_moves(_transport._TRANSITIONS)
    assert moves(HANDSHAKE_PATHS) == table_moves(_protocol._TRANSITIONS)


# ----------------------------------------------------------------- real connections

class Recorder:
    """Records every move of every transport and handshake protocol (any thread), and checks
    what must hold after each transport move."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: dict[Any, list[Any]] = {}
        self.problems: list[str] = []
        for cls in (SmcTransport, HandshakeProtocol):
            monkeypatch.setattr(cls, "_set_state", self._wrap(cls._set_state))

    def _wrap(self, set_state: Any) -> Any:
        def recorded(obj: Any, new: Any) -> None:
            old = obj._state
            set_state(obj, new)
            self.paths.setdefault(obj, [old]).append(new)
            if isinstance(obj, SmcTransport):
                if obj._info.mode != _transport._MODES[new]:
                    self.problems.append(f"{old.name}->{new.name}: mode {obj._info.mode}")
                if (obj._conn_lost > 0) != (new >= _transport._LOST_FROM):
                    self.problems.append(f"{old.name}->{new.name}: _conn_lost {obj._conn_lost}")
                if new not in OPTIMISTIC_STATES and obj._setup is not None:
                    self.problems.append(f"{old.name}->{new.name}: the set-up still pending")
        return recorded

    def path(self, obj: Any) -> list[Any]:
        return self.paths.get(obj, [obj._state])

    def new_since(self, before: set[Any], kind: type, role: str) -> list[Any]:
        def role_of(o: Any) -> str:
            return o._info.role if isinstance(o, SmcTransport) else o._role
        return [o for o in list(self.paths) if o not in before and isinstance(o, kind) and role_of(o) == role]

    def check(self) -> None:
        assert not self.problems, self.problems


@pytest.fixture
def rec(monkeypatch):
    r = Recorder(monkeypatch)
    yield r
    r.check()


async def until(predicate: Any, what: str, timeout: float = 15.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def settled(rec: Recorder, transport: Any) -> list[Any]:
    """The transport's path once its life is over (TCP, or the slot given back)."""
    await until(lambda: transport._state in (S.TCP, S.RELEASED), f"the end of {rec.path(transport)}")
    return rec.path(transport)


def test_fallback(rec, loop_kind):
    """No shared memory on the client (device "none"): both sides go TCP at once."""
    async def main():
        async def handle(reader, writer):
            writer.write(await reader.readexactly(3))
            writer.close()

        server = await smcish.start_server(handle, HOST, 0)
        async with server:
            before = set(rec.paths)
            reader, writer = await smcish.open_connection(HOST, server.sockets[0].getsockname()[1],
                                                          device="none")
            writer.write(b"abc")
            assert await reader.readexactly(3) == b"abc"
            writer.close()
            await until(lambda: rec.new_since(before, SmcTransport, "server"), "the server's transport")
            [srv] = rec.new_since(before, SmcTransport, "server")
            [hs_client] = rec.new_since(before, HandshakeProtocol, "client")
            [hs_server] = rec.new_since(before, HandshakeProtocol, "server")
            assert rec.path(writer.transport) == FALLBACK
            assert rec.path(srv) == FALLBACK
            assert rec.path(hs_client) == rec.path(hs_server) == HS_FALLBACK
            assert writer.get_extra_info("smcish").mode == "tcp"

    Env(loop_kind, "ism").run(main())


def same_loop_server_case(rec: Recorder, loop_kind: str, client_does: Any, expected: list[Any]) -> None:
    """A server on the same loop that reads only when told and closes only when told: the
    client's ring stays full until then, and the client lingers after its close until the server
    closes too."""
    async def main():
        read, close = asyncio.Event(), asyncio.Event()
        got = []

        async def handle(reader, writer):
            await read.wait()
            got.append(await reader.read())
            await close.wait()
            writer.close()

        server = await smcish.start_server(handle, HOST, 0, **SMALL_RING)
        async with server:
            before = set(rec.paths)
            _, writer = await smcish.open_connection(HOST, server.sockets[0].getsockname()[1],
                                                     **SMALL_RING)
            t = writer.transport
            await until(lambda: t._state is S.ISM, "the server's answer")
            [srv] = rec.new_since(before, SmcTransport, "server")
            data = await client_does(t, read)
            await until(lambda: t._state is S.LINGERING, "the client's linger")
            close.set()
            assert await settled(rec, t) == expected
            assert await settled(rec, srv) == CLOSE_BUFFERED_SERVER
            assert got == [data]
            [hs_client] = rec.new_since(before, HandshakeProtocol, "client")
            [hs_server] = rec.new_since(before, HandshakeProtocol, "server")
            assert rec.path(hs_client) == HS_CLIENT_ISM
            assert rec.path(hs_server) == HS_SERVER_ISM
            assert writer.get_extra_info("smcish").mode == "ism"

    Env(loop_kind, "ism").run(main())


def test_close_with_bytes_buffered_then_linger(rec, loop_kind):
    """ISM, the ring full: close() keeps the rest buffered (CLOSING) until the server reads it,
    then lingers (the server has not closed) until the server closes."""
    async def client_does(t, read):
        t.write(BULK)
        assert t.get_write_buffer_size() > 0
        t.close()
        assert t._state is S.CLOSING and t.is_closing()
        read.set()
        return BULK

    same_loop_server_case(rec, loop_kind, client_does, CLOSE_BUFFERED)


def test_abort_then_linger(rec, loop_kind):
    async def client_does(t, read):
        t.write(b"x")         # (into the ring at once: nothing buffered)
        t.abort()             # nothing unread by us: graceful, as a TCP socket's close()
        assert t._state is S.CLOSED
        read.set()
        return b"x"

    same_loop_server_case(rec, loop_kind, client_does, ABORT)


# ----------------------------------------------------------------- optimistic (a stalled server)

def optimistic_case(rec: Recorder, loop_kind: str, stall: float, timeout: float, client_does: Any,
                    expected: list[Any], arrives: bytes | None, before_connect: Any = None) -> None:
    """A server on its own loop (thread), stalled for ``stall`` s once its link group with us is
    open: our connection's claim is answered after the stall (``stall < timeout``), or withdrawn
    at ``timeout`` first (the server then serves plain TCP). ``arrives``: what the server's
    application must receive (None: not checked)."""
    got: list[bytes | None] = []

    async def record(reader, writer):
        try:
            got.append(await reader.read())
        except ConnectionError:
            got.append(None)
        finally:
            writer.close()

    srv = ThreadServer(loop_kind, record, **SMALL_RING)
    try:
        async def main():
            _, writer = await smcish.open_connection(HOST, srv.port)         # opens the group
            writer.close()
            await writer.wait_closed()
            await until(lambda: len(got) == 1, "the first connection")
            if before_connect is not None:
                before_connect()
            srv.stall(stall)
            await asyncio.sleep(0.05)
            _, writer = await smcish.open_connection(HOST, srv.port, handshake_timeout=timeout,
                                                     **SMALL_RING)
            t = writer.transport
            assert t._state is S.OPTIMISTIC
            await client_does(t)
            path = await settled(rec, t)
            assert path[:len(expected)] == expected, path
            if expected[-1] in (S.TCP, S.RELEASED):
                assert path == expected
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
            if arrives is not None:
                await until(lambda: len(got) == 2, "the server's application")
                assert got[1] == arrives

        Env(loop_kind, "ism").run(main())
    finally:
        srv.close()


def test_optimistic_migrates_to_tcp(rec, loop_kind):
    async def client_does(t):
        t.write(b"early")
        await until(lambda: t._state is S.TCP, "the withdrawal")
        assert t.get_extra_info("smcish").mode == "tcp"
        t.write(b" late")
        t.write_eof()

    optimistic_case(rec, loop_kind, 1.5, 0.3, client_does, MIGRATED, b"early late")


def test_optimistic_closing_with_bytes_buffered_migrates_to_tcp(rec, loop_kind):
    async def client_does(t):
        t.write(BULK)
        assert t.get_write_buffer_size() > 0
        t.close()
        assert t._state is S.OPTIMISTIC_CLOSING

    optimistic_case(rec, loop_kind, 1.5, 0.3, client_does, MIGRATED_CLOSING, BULK)


def test_optimistic_closed_then_declined_sends_over_tcp(rec, loop_kind):
    async def client_does(t):
        t.write(b"last words")
        t.close()
        assert t._state is S.OPTIMISTIC_CLOSED

    optimistic_case(rec, loop_kind, 1.5, 0.3, client_does, CLOSED_THEN_MIGRATED, b"last words")


def test_optimistic_closed_then_accepted(rec, loop_kind):
    async def client_does(t):
        t.write(b"last words")
        t.close()
        assert t._state is S.OPTIMISTIC_CLOSED

    optimistic_case(rec, loop_kind, 0.5, 5.0, client_does, CLOSED_THEN_ACCEPTED, b"last words")


def test_optimistic_closing_with_bytes_buffered_then_accepted(rec, loop_kind):
    async def client_does(t):
        t.write(BULK)
        t.close()
        assert t._state is S.OPTIMISTIC_CLOSING

    optimistic_case(rec, loop_kind, 0.5, 5.0, client_does, CLOSING_THEN_ACCEPTED, BULK)


def test_optimistic_aborted(rec, loop_kind):
    async def client_does(t):
        t.write(b"x")
        t.abort()
        assert t._state is S.RELEASED      # through OPTIMISTIC_ABORTED: the set-up let go at once

    optimistic_case(rec, loop_kind, 1.0, 5.0, client_does, ABORTED_OPTIMISTIC, None)


def test_optimistic_closing_then_aborted(rec, loop_kind):
    async def client_does(t):
        t.write(BULK)
        t.close()
        t.abort()
        assert t._state is S.RELEASED

    optimistic_case(rec, loop_kind, 1.0, 5.0, client_does, ABORTED_CLOSING, None)


def unusable_block(monkeypatch: pytest.MonkeyPatch) -> Any:
    """From now on, the server's ring block in its ACCEPTED is one we cannot attach."""
    def attach_rx(self, *args):
        raise ValueError("test: an unusable ring block")
    return lambda: monkeypatch.setattr(_ring.Ring, "attach_rx", attach_rx)


def test_optimistic_accepted_with_an_unusable_block_fails(rec, loop_kind, monkeypatch):
    """The server took the claim as established: neither ring nor TCP can carry the connection."""
    lost = []

    async def client_does(t):
        protocol = t.get_protocol()
        connection_lost = protocol.connection_lost

        def record(exc):
            lost.append(exc)
            connection_lost(exc)

        protocol.connection_lost = record
        t.write(b"x")

    optimistic_case(rec, loop_kind, 0.5, 5.0, client_does, FAILED_OPTIMISTIC, None,
                    unusable_block(monkeypatch))
    assert len(lost) == 1 and isinstance(lost[0], ConnectionResetError), lost


def test_optimistic_closing_accepted_with_an_unusable_block_fails(rec, loop_kind, monkeypatch):
    async def client_does(t):
        t.write(BULK)
        t.close()
        assert t._state is S.OPTIMISTIC_CLOSING

    optimistic_case(rec, loop_kind, 0.5, 5.0, client_does, FAILED_CLOSING, None,
                    unusable_block(monkeypatch))


# ----------------------------------------------------------------- the server's set-up decides

def claimed_socket_case(rec: Recorder, loop_kind: str, client_does: Any, expected: list[Any]) -> None:
    """aiohttp's way: the installed loop's sock_connect claims (CLAIMED, held until the socket is
    handed to create_connection); the server, DECIDING, waits for the client's final word."""
    async def main():
        loop = asyncio.get_running_loop()
        got = []

        async def handle(reader, writer):
            try:
                got.append(await reader.read())
            except ConnectionError:
                got.append(None)
            writer.close()

        server = await smcish.start_server(handle, HOST, 0)
        async with server:
            before = set(rec.paths)
            sock = socket.socket()
            sock.setblocking(False)
            try:
                await loop.sock_connect(sock, (HOST, server.sockets[0].getsockname()[1]))

                def deciding():
                    return [h for h in rec.new_since(before, HandshakeProtocol, "server")
                            if h._state is H.DECIDING]
                await until(deciding, "the server's set-up")
                [hs] = deciding()
                await until(lambda: hs._machine.state.name == "WAIT_FINAL", "the server's ACCEPTED")
                arrives = await client_does(loop, sock)
            finally:
                sock.close()
            await until(lambda: hs._state is not H.DECIDING, "the server's decision")
            sys.modules["smcish.loop"]._finalise_preclaim(sock)   # (a claim left: let it go now)
            assert rec.path(hs) == expected
            if arrives is not None:
                await until(lambda: got, "the server's application")
                assert got == [arrives]

    loop = smcish.install(new_loop(loop_kind))
    errors = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
    try:
        loop.run_until_complete(asyncio.wait_for(main(), 60))
    finally:
        loop.close()
    assert not errors, errors


def test_server_falls_back_on_the_clients_final_tcp(rec, loop_kind):
    """The caller uses its pre-claimed socket directly: the claim ends FINAL_TCP."""
    async def client_does(loop, sock):
        await loop.sock_sendall(sock, b"plain")
        sock.shutdown(socket.SHUT_WR)
        return b"plain"

    claimed_socket_case(rec, loop_kind, client_does, HS_SERVER_FINAL_TCP)


def test_server_set_up_fails_when_the_connection_is_reset(rec, loop_kind):
    async def client_does(loop, sock):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # (returns None: the close that follows resets the connection, nothing arrives)

    claimed_socket_case(rec, loop_kind, client_does, HS_SERVER_RESET)
