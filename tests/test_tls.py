"""TLS on smcish connections, on {ism, tcp} x {asyncio, uvloop}, compared with plain asyncio.

Over shared memory the TLS records ride the rings (asyncio's SSLProtocol over SmcTransport); on a
fallen-back connection start_tls puts the loop's own TCP transport under TLS (so its TLS transport
answers None for "smcish"); a plain TLS peer interoperates. Each test asserts the mode, so that
the ism runs really are shared memory, and compares what the application sees with the same
exchange run with plain asyncio on the same loop kind.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import ssl
import subprocess
import time

import pytest

import smcish
from conftest import PYTHON, ROOT, python_env
from tls_helpers import (
    CLIENT_CN,
    HOST,
    SERVER_NAME,
    Api,
    Certs,
    LineProtocol,
    client_hello,
    defuse,
    describe_errors,
    mode_of,
    reason_of,
    run_collect,
    smtp_client,
    smtp_server,
    subject_cn,
    tls_summary,
)

pytestmark = pytest.mark.timeout(120)

PROGRAM = os.path.join(ROOT, "tests", "programs", "starttls_client.py")


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return Certs(str(tmp_path_factory.mktemp("tls-certs")))


def tls_mode(env) -> str | None:
    """What a TLS transport answers for "smcish": through the SSL transport over shared memory;
    None after start_tls on a fallen-back connection (the loop's own TLS transport)."""
    return "ism" if env.path == "ism" else None


# ------------------------------------------------------------------ 1. STARTTLS, streams

async def _smtp_exchange(api: Api, certs: Certs):
    loop = asyncio.get_running_loop()
    sctx, cctx = certs.server_ctx(), certs.client_ctx()
    server_rec: dict = {}
    client_rec: dict = {}
    done = loop.create_future()

    async def handle(reader, writer):
        try:
            await smtp_server(reader, writer, sctx, server_rec)
        except BaseException as exc:  # handed to the test
            if not done.done():
                done.set_exception(exc)
        else:
            if not done.done():
                done.set_result(None)

    server = await api.start_server(handle, HOST, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await api.open_connection(HOST, port)
        await smtp_client(reader, writer, cctx, client_rec)
        await asyncio.wait_for(done, 10)
    finally:
        server.close()
        await server.wait_closed()
    return server_rec, client_rec


def test_starttls_smtp_like(env, certs):
    """Server-first STARTTLS, StreamWriter.start_tls on both sides; TLS extra infos as asyncio's."""
    (p_server, p_client), errors = run_collect(env.loop_kind, _smtp_exchange(Api(False), certs),
                                               30)
    assert not errors, describe_errors(errors)
    s_server, s_client = env.run(_smtp_exchange(Api(True, env.kw), certs), 30)

    assert s_server["pre_mode"] == s_client["pre_mode"] == env.expected_mode
    assert s_server["post_mode"] == s_client["post_mode"] == tls_mode(env)
    assert s_server["done"] and s_client["done"]
    assert s_client["after_quit"] == p_client["after_quit"] == b""
    # ssl_object, peercert, cipher, sslcontext answer as plain asyncio's on this loop kind.
    assert s_client["tls"] == p_client["tls"]
    assert s_server["tls"] == p_server["tls"]
    assert s_client["tls"]["ssl_object"] == "SSLObject"
    assert s_client["tls"]["peercert"] is not None
    assert s_client["tls"]["cipher"] is not None and s_client["tls"]["sslcontext_is_ctx"]
    assert s_server["tls"]["sslcontext_is_ctx"] and s_server["tls"]["peercert"] is None


# ------------------------------------------------------------------ 2. client certificates (mTLS)

async def _mtls(api: Api, certs: Certs, tls_max):
    sctx = certs.server_ctx(require_client_cert=True, tls_max=tls_max)
    seen: list = []

    async def handle(reader, writer):
        cn = subject_cn(writer.get_extra_info("peercert"))
        seen.append((cn, mode_of(writer)))
        line = await reader.readline()
        writer.write(b"hello " + str(cn).encode() + b" " + line)
        await writer.drain()
        writer.close()

    async def good_client(port):
        reader, writer = await api.open_connection(
            HOST, port, ssl=certs.client_ctx(with_cert=True, tls_max=tls_max),
            server_hostname=SERVER_NAME)
        mode = mode_of(writer)          # (before the server's close: then the TLS transport is gone)
        writer.write(b"ping\n")
        line = await reader.readline()
        writer.close()
        await writer.wait_closed()
        return line, mode

    server = await api.start_server(handle, HOST, 0, ssl=sctx)
    try:
        port = server.sockets[0].getsockname()[1]
        first = await good_client(port)
        stage = "connect"
        writer = None
        try:
            reader, writer = await api.open_connection(
                HOST, port, ssl=certs.client_ctx(with_cert=False, tls_max=tls_max),
                server_hostname=SERVER_NAME)
            if writer.transport is None:
                outcome = (stage, "open_connection(ssl=) returned a writer without a transport",
                           None)
                writer = defuse(writer)
            else:
                stage = "read"
                writer.write(b"ping\n")
                line = await asyncio.wait_for(reader.readline(), 5)
                outcome = (stage, "line", line)
        except (OSError, asyncio.IncompleteReadError) as exc:
            outcome = (stage, type(exc), getattr(exc, "reason", None))
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, ssl.SSLError):
                pass
        last = await good_client(port)
    finally:
        server.close()
        await server.wait_closed()
    return {"first": first, "bad": outcome, "last": last, "seen": seen}


@pytest.mark.parametrize("tls_max", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3],
                         ids=["tls12", "tls13"])
def test_client_certificate_required(env, certs, tls_max):
    """CERT_REQUIRED server: a client with a cert is seen by subject; one without fails as with
    asyncio (same stage, same exception type); the server keeps serving."""
    plain, errors = run_collect(env.loop_kind, _mtls(Api(False), certs, tls_max), 30)
    assert not errors, describe_errors(errors)
    expected_line = b"hello " + CLIENT_CN.encode() + b" ping\n"
    assert plain["seen"] == [(CLIENT_CN, None)] * 2
    assert plain["first"] == plain["last"] == (expected_line, None)
    smc, errors = run_collect(env.loop_kind, _mtls(Api(True, env.kw), certs, tls_max), 30)

    stage, kind, detail = smc["bad"]
    p_stage, p_kind, p_detail = plain["bad"]
    problems = []
    if errors:
        problems.append(f"unhandled loop exceptions: {describe_errors(errors)}")
    if smc["first"] != (expected_line, env.expected_mode) or smc["last"] != smc["first"]:
        problems.append(f"good clients: {smc['first']} / {smc['last']}")
    if smc["seen"] != [(CLIENT_CN, env.expected_mode)] * 2:
        problems.append(f"handler saw {smc['seen']}")
    same = (stage, detail) == (p_stage, p_detail) and (
        issubclass(kind, p_kind) if isinstance(kind, type) and isinstance(p_kind, type)
        else kind == p_kind)
    if not same:
        problems.append(f"client without a cert: {smc['bad']}, asyncio's: {plain['bad']}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ 3. 256 MiB over TLS

TOTAL = 256 << 20
CHUNK = 1 << 20


def _chunk(block: bytes, i: int) -> bytes:
    return i.to_bytes(8, "little") + block[8:]


async def _send_all(writer, block: bytes) -> str:
    digest = hashlib.sha256()
    for i in range(TOTAL // CHUNK):
        data = _chunk(block, i)
        digest.update(data)
        writer.write(data)
        await writer.drain()
    return digest.hexdigest()


async def _recv_all(reader) -> tuple[int, str]:
    digest = hashlib.sha256()
    n = 0
    while n < TOTAL:
        data = await reader.read(CHUNK)
        if not data:
            break
        digest.update(data)
        n += len(data)
    return n, digest.hexdigest()


async def _bulk(api: Api, certs: Certs):
    loop = asyncio.get_running_loop()
    up_block, down_block = os.urandom(CHUNK), os.urandom(CHUNK)
    server_done = loop.create_future()

    async def handle(reader, writer):
        try:
            mode = mode_of(writer)
            (n, got), sent = await asyncio.gather(_recv_all(reader), _send_all(writer, down_block))
            tail = await reader.read(1)          # the client's close: EOF
            writer.close()
            await writer.wait_closed()
            server_done.set_result((n, got, sent, tail, mode))
        except BaseException as exc:  # handed to the test
            server_done.set_exception(exc)

    server = await api.start_server(handle, HOST, 0, ssl=certs.server_ctx())
    try:
        port = server.sockets[0].getsockname()[1]
        t0 = time.perf_counter()
        reader, writer = await api.open_connection(HOST, port, ssl=certs.client_ctx(),
                                                   server_hostname=SERVER_NAME)
        mode = mode_of(writer)
        (n, got), sent = await asyncio.gather(_recv_all(reader), _send_all(writer, up_block))
        writer.close()
        await writer.wait_closed()
        s_n, s_got, s_sent, tail, s_mode = await asyncio.wait_for(server_done, 30)
        elapsed = time.perf_counter() - t0
    finally:
        server.close()
        await server.wait_closed()
    return {"mode": mode, "server_mode": s_mode, "elapsed": elapsed, "tail": tail,
            "up": (s_n, s_got, sent), "down": (n, got, s_sent)}


def test_bulk_256mib_each_way(env, certs):
    """256 MiB each way at once over ssl= (open_connection/start_server), sha256 on both ends."""
    res = env.run(_bulk(Api(True, env.kw), certs), 100)
    assert res["mode"] == res["server_mode"] == env.expected_mode
    n, received, sent = res["up"]
    assert n == TOTAL and received == sent
    n, received, sent = res["down"]
    assert n == TOTAL and received == sent
    assert res["tail"] == b""
    mbps = 2 * TOTAL / res["elapsed"] / 1e6
    print(f"\n{env}: 2 x 256 MiB over TLS in {res['elapsed']:.2f} s ({mbps:.0f} MB/s total)")


# ------------------------------------------------------------------ 4. handshake aborted midway

HS_TIMEOUT = 0.4


def _socket_fds() -> set[str]:
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:"):
            out.add(target)
    return out


async def _echo_once(api: Api, certs: Certs, port: int) -> tuple[bytes, str | None]:
    reader, writer = await api.open_connection(HOST, port, ssl=certs.client_ctx(),
                                               server_hostname=SERVER_NAME,
                                               ssl_handshake_timeout=5)
    mode = mode_of(writer)          # (before the server's close: then the TLS transport is gone)
    writer.write(b"good client\n")
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    await writer.wait_closed()
    return line, mode


async def _wait_fds_back(base: set[str], deadline: float) -> set[str]:
    loop = asyncio.get_running_loop()
    while True:
        extra = _socket_fds() - base
        if not extra or loop.time() > deadline:
            return extra
        await asyncio.sleep(0.02)


async def _client_gives_up(api: Api, certs: Certs, stall: bool):
    """A raw client sends half a ClientHello, then aborts (or stalls into the server's
    ssl_handshake_timeout); then a good client."""
    loop = asyncio.get_running_loop()
    served: list = []

    async def handle(reader, writer):
        served.append(mode_of(writer))
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server = await api.start_server(handle, HOST, 0, ssl=certs.server_ctx(),
                                    ssl_handshake_timeout=HS_TIMEOUT)
    try:
        port = server.sockets[0].getsockname()[1]
        warm = await _echo_once(api, certs, port)
        await asyncio.sleep(0.05)
        base = _socket_fds()
        hello = client_hello(certs.client_ctx())
        transport, proto = await api.create_connection(LineProtocol, HOST, port)
        raw_mode = mode_of(transport)
        transport.write(hello[:len(hello) // 2])
        t0 = loop.time()
        if not stall:
            await asyncio.sleep(0.05)            # the partial record reaches the server
            transport.abort()
        try:
            exc = await asyncio.wait_for(asyncio.shield(proto.lost), HS_TIMEOUT + 2)
        except TimeoutError:
            outcome = ("hang", None)             # the server never closed the connection
            transport.abort()
        else:
            outcome = ("eof" if proto.eof else "lost", type(exc) if exc is not None else None)
        elapsed = loop.time() - t0
        leftover = await _wait_fds_back(base, loop.time() + HS_TIMEOUT + 3)
        after = await _echo_once(api, certs, port)
    finally:
        server.close()
        await server.wait_closed()
    return {"warm": warm, "after": after, "raw_mode": raw_mode, "outcome": outcome,
            "elapsed": elapsed, "leftover": leftover, "served": served}


async def _starttls_client(api: Api, certs: Certs, port: int) -> tuple:
    """A good client of _server_gives_up's server: STARTTLS, then one line echoed over TLS."""
    reader, writer = await api.open_connection(HOST, port)
    pre_mode = mode_of(writer)
    writer.write(b"STARTTLS\n")
    assert await asyncio.wait_for(reader.readline(), 5) == b"OK\n"
    await writer.start_tls(certs.client_ctx(), server_hostname=SERVER_NAME,
                           ssl_handshake_timeout=5)
    mode = mode_of(writer)
    writer.write(b"good client\n")
    line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    await writer.wait_closed()
    return line, pre_mode, mode


async def _server_gives_up(api: Api, certs: Certs, stall: bool):
    """A raw server aborts after a whole ClientHello (or stalls into the client's
    ssl_handshake_timeout) on its first connection; later ones are served through STARTTLS
    (loop.start_tls on the server's transport)."""
    loop = asyncio.get_running_loop()
    sctx = certs.server_ctx()
    conns: list = []
    tasks: list = []

    class RawServer(LineProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            self.index = len(conns)
            self.mode = mode_of(transport)
            self.error = None
            self.upgraded = False
            conns.append(self)

        def data_received(self, data):
            super().data_received(data)
            if self.index == 0:
                if (not stall and len(self.buf) >= 5
                        and len(self.buf) >= 5 + int.from_bytes(self.buf[3:5], "big")):
                    self.transport.abort()
            elif not self.upgraded and self.buf == b"STARTTLS\n":
                self.upgraded = True
                self.buf.clear()
                self.transport.pause_reading()
                self.transport.write(b"OK\n")
                tasks.append(loop.create_task(self.serve_tls()))

        async def serve_tls(self):
            try:
                tls = await loop.start_tls(self.transport, self, sctx, server_side=True,
                                           ssl_handshake_timeout=5)
                self.tls_mode = mode_of(tls)
                tls.write(await self.read_line())
                tls.close()
            except Exception as exc:  # reported to the test
                self.error = exc

    server = await api.create_server(RawServer, HOST, 0)
    try:
        port = server.sockets[0].getsockname()[1]
        t0 = loop.time()
        try:
            _reader, writer = await asyncio.wait_for(api.open_connection(
                HOST, port, ssl=certs.client_ctx(), server_hostname=SERVER_NAME,
                ssl_handshake_timeout=HS_TIMEOUT), HS_TIMEOUT + 2)
        except TimeoutError:
            outcome = "hang: open_connection outlived its ssl_handshake_timeout"
        except Exception as exc:  # compared with asyncio's
            outcome = type(exc)
        else:
            if writer.transport is None:
                outcome = "open_connection returned a writer without a transport"
                defuse(writer)
            else:
                outcome = "connected"
                writer.close()
        elapsed = loop.time() - t0
        if conns:
            conns[0].transport.close()
        after = await _starttls_client(api, certs, port)
        await asyncio.gather(*tasks)
    finally:
        server.close()
        await server.wait_closed()
    first = conns[0]
    return {"outcome": outcome, "elapsed": elapsed, "after": after, "raw_mode": first.mode,
            "hello_bytes": len(first.buf), "errors": [c.error for c in conns],
            "tls_modes": [getattr(c, "tls_mode", None) for c in conns[1:]]}


@pytest.mark.parametrize("scenario", ["client_aborts", "client_stalls", "server_aborts",
                                      "server_stalls"])
def test_handshake_given_up(env, certs, scenario):
    """A TLS handshake abandoned midway: the other side errors (no hang) within the handshake
    timeout, no unhandled loop exception beyond asyncio's own, and the server keeps serving."""
    side, how = scenario.split("_")
    fn = _client_gives_up if side == "client" else _server_gives_up
    stall = how == "stalls"
    plain, p_errors = run_collect(env.loop_kind, fn(Api(False), certs, stall), 15)
    smc, s_errors = run_collect(env.loop_kind, fn(Api(True, env.kw), certs, stall), 15)
    limit = HS_TIMEOUT + 1.0 if stall else 1.0
    # What plain asyncio does on this loop kind (the reference).
    assert not p_errors, describe_errors(p_errors)
    assert plain["elapsed"] < limit, plain
    if side == "server":
        assert isinstance(plain["outcome"], type), plain

    problems = []

    def check(ok, what):
        if not ok:
            problems.append(what)

    extra = set(describe_errors(s_errors)) - set(describe_errors(p_errors))
    check(not extra, f"unhandled loop exceptions asyncio does not report: {sorted(extra)}")
    check(smc["raw_mode"] == env.expected_mode, f"raw connection mode {smc['raw_mode']}")
    check(smc["elapsed"] < limit, f"took {smc['elapsed']:.2f} s (limit {limit} s): {smc['outcome']}")
    if stall:
        check(smc["elapsed"] >= HS_TIMEOUT * 0.9, f"ended before the handshake timeout: {smc}")
    good = (b"good client\n", env.expected_mode)
    if side == "client":
        check(smc["warm"] == good and smc["after"] == good,
              f"good clients before/after: {smc['warm']} / {smc['after']}")
        check(smc["served"] == [env.expected_mode] * 2, f"handler calls: {smc['served']}")
        check(not smc["leftover"], f"the server kept the connection: {smc['leftover']}")
        if stall:
            # The server's handshake timeout closes the connection: the raw client sees it end
            # (asyncio: EOF; an ism abort() may show as a reset: both end the connection).
            kind = smc["outcome"]
            check(kind[0] in ("eof", "lost")
                  and (kind[1] is None or issubclass(kind[1], ConnectionError)),
                  f"raw client: {kind}, asyncio's: {plain['outcome']}")
    else:
        # (line, mode before STARTTLS, mode of the TLS transport)
        check(smc["after"] == good + (tls_mode(env),), f"good client after: {smc['after']}")
        check(smc["hello_bytes"] > 0, "no ClientHello reached the server")
        check(smc["errors"] == [None, None] and smc["tls_modes"] == [tls_mode(env)],
              f"server side: {smc['errors']} {smc['tls_modes']}")
        # The TLS client fails like asyncio's (same exception type, or a subclass of it).
        check(isinstance(smc["outcome"], type) and issubclass(smc["outcome"], plain["outcome"]),
              f"TLS client: {smc['outcome']}, asyncio's: {plain['outcome']}")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------ 5. plain TLS peers

PAYLOAD = os.urandom(1 << 20) + b"tail"


async def _sha_handler(reader, writer, record: list):
    """Reads '<n>\\n' and n bytes, answers the sha256 hex line then the n bytes back."""
    record.append((mode_of(writer), reason_of(writer)))
    n = int(await reader.readline())
    data = await reader.readexactly(n)
    writer.write(hashlib.sha256(data).hexdigest().encode() + b"\n")
    writer.write(data)
    await writer.drain()
    writer.close()


async def _sha_roundtrip(reader, writer) -> bool:
    writer.write(b"%d\n" % len(PAYLOAD))
    writer.write(PAYLOAD)
    await writer.drain()
    line = await reader.readline()
    back = await reader.readexactly(len(PAYLOAD))
    writer.close()
    await writer.wait_closed()
    return line == hashlib.sha256(PAYLOAD).hexdigest().encode() + b"\n" and back == PAYLOAD


def _blocking_client(port: int, cafile: str) -> tuple[bool, str]:
    ctx = ssl.create_default_context(cafile=cafile)
    with socket.create_connection((HOST, port), timeout=15) as raw, \
            ctx.wrap_socket(raw, server_hostname=SERVER_NAME) as tls:
            tls.sendall(b"%d\n" % len(PAYLOAD) + PAYLOAD)
            buf = bytearray()
            want = 65 + len(PAYLOAD)
            while len(buf) < want:
                data = tls.recv(1 << 20)
                if not data:
                    break
                buf += data
            ok = (bytes(buf[:65]) == hashlib.sha256(PAYLOAD).hexdigest().encode() + b"\n"
                  and bytes(buf[65:]) == PAYLOAD)
            return ok, tls.version()


async def _interop(env, certs: Certs):
    smc = Api(True, env.kw)
    plain = Api(False)
    loop = asyncio.get_running_loop()
    out = {}

    async def serve(api, ssl_ctx):
        record: list = []
        server = await api.start_server(lambda r, w: _sha_handler(r, w, record), HOST, 0,
                                        ssl=ssl_ctx)
        return server, server.sockets[0].getsockname()[1], record

    # The reasons a plain peer gives without TLS, to compare with.
    server, port, rec = await serve(smc, None)
    async with server:
        out["tcp_plain_client"] = await _sha_roundtrip(*await plain.open_connection(HOST, port))
        out["tcp_plain_client_server_info"] = rec[0]
    server, port, rec = await serve(plain, None)
    async with server:
        reader, writer = await smc.open_connection(HOST, port)
        out["tcp_plain_server_client_info"] = (mode_of(writer), reason_of(writer))
        await _sha_roundtrip(reader, writer)

    # plain asyncio TLS client -> smcish TLS server; and a blocking ssl-module client.
    server, port, rec = await serve(smc, certs.server_ctx())
    async with server:
        reader, writer = await plain.open_connection(HOST, port, ssl=certs.client_ctx(),
                                                     server_hostname=SERVER_NAME)
        out["plain_client_info"] = writer.get_extra_info("smcish")
        out["plain_client_ok"] = await _sha_roundtrip(reader, writer)
        out["blocking"] = await asyncio.wait_for(
            loop.run_in_executor(None, _blocking_client, port, certs.cafile), 20)
        out["server_infos"] = list(rec)

    # smcish TLS client -> plain asyncio TLS server.
    server, port, rec = await serve(plain, certs.server_ctx())
    async with server:
        reader, writer = await smc.open_connection(HOST, port, ssl=certs.client_ctx(),
                                                   server_hostname=SERVER_NAME)
        out["smc_client_info"] = (mode_of(writer), reason_of(writer))
        out["smc_client_cipher"] = writer.get_extra_info("cipher")
        out["smc_client_ok"] = await _sha_roundtrip(reader, writer)
    return out


def test_plain_tls_peers(env, certs):
    """A plain TLS peer against an smcish TLS peer, both ways, and a blocking ssl client:
    mode tcp with the reason the same pair reports without TLS, bytes intact."""
    out = env.run(_interop(env, certs), 40)
    server_tcp = out["tcp_plain_client_server_info"]
    client_tcp = out["tcp_plain_server_client_info"]
    assert server_tcp[0] == client_tcp[0] == "tcp" and server_tcp[1] and client_tcp[1]
    # plain TLS client -> smcish server (asyncio's client, then the blocking one)
    assert out["plain_client_info"] is None
    assert out["plain_client_ok"]
    assert out["blocking"][0], out["blocking"]
    assert out["server_infos"] == [server_tcp, server_tcp]
    # smcish TLS client -> plain TLS server
    assert out["smc_client_info"] == client_tcp
    assert out["smc_client_cipher"] is not None
    assert out["smc_client_ok"]


# ------------------------------------------------------------------ 6. an unchanged program

@pytest.mark.parametrize("server_kind", ["plain", "smcish"])
def test_unchanged_starttls_program(env, certs, server_kind):
    """`python -m smcish run` an asyncio STARTTLS client (no smcish import) against a plain or an
    smcish STARTTLS server here; the child prints its mode before and after start_tls."""
    child_env = python_env(SMCISH_DEVICE="none") if env.path == "tcp" else python_env()

    async def main():
        loop = asyncio.get_running_loop()
        api = Api(server_kind == "smcish", env.kw)
        record: dict = {}
        done = loop.create_future()

        async def handle(reader, writer):
            try:
                await smtp_server(reader, writer, certs.server_ctx(), record)
            except BaseException as exc:
                if not done.done():
                    done.set_exception(exc)
            else:
                if not done.done():
                    done.set_result(None)

        server = await api.start_server(handle, HOST, 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            cmd = [PYTHON, "-m", "smcish", "run", PROGRAM, env.loop_kind, HOST, str(port),
                   certs.cafile]
            proc = await loop.run_in_executor(None, lambda: subprocess.run(
                cmd, env=child_env, capture_output=True, text=True, timeout=30, cwd=ROOT))
            if proc.returncode == 0:
                await asyncio.wait_for(done, 5)
        return proc, record

    proc, record = env.run(main(), 45)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["queued_ok"] and out["quit"] == "221 bye"
    assert out["cipher"] and out["version"]
    if server_kind == "plain":
        assert out["before"] == "tcp"              # accelerated process, plain server: fallback
        assert out["after"] is None                # the loop's own TLS transport
        assert record["pre_mode"] is None and record["post_mode"] is None
    else:
        assert out["before"] == record["pre_mode"] == env.expected_mode
        assert out["after"] == record["post_mode"] == tls_mode(env)


# ------------------------------------------------------------------ 7. loop.start_tls, protocols

async def _loop_start_tls(env, certs: Certs):
    loop = asyncio.get_running_loop()
    api = Api(True, env.kw)
    sctx, cctx = certs.server_ctx(), certs.client_ctx()
    server_side: dict = {}
    server_done = loop.create_future()

    class Server(LineProtocol):
        def connection_made(self, transport):
            super().connection_made(transport)
            server_side["pre_mode"] = mode_of(transport)
            self.upgraded = False

        def data_received(self, data):
            super().data_received(data)
            if not self.upgraded and b"STARTTLS\n" in self.buf:
                self.upgraded = True
                del self.buf[:self.buf.index(b"STARTTLS\n") + 9]
                self.transport.pause_reading()          # nothing of the ClientHello for us
                self.transport.write(b"OK\n")
                self.upgrading = loop.create_task(self.upgrade())  # (kept: not collected)

        async def upgrade(self):
            try:
                tls = await loop.start_tls(self.transport, self, sctx, server_side=True)
                server_side["post_mode"] = mode_of(tls)
                server_side["tls"] = tls_summary(tls, sctx)
                n = int(await self.read_line())
                data = await self.read_exactly(n)
                tls.write(hashlib.sha256(data).digest() + data[::-1])
                line = await self.read_line()
                tls.write(b"bye " + line)
                tls.close()
                server_done.set_result(await self.lost)
            except BaseException as exc:  # handed to the test
                server_done.set_exception(exc)

    server = await api.create_server(Server, HOST, 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        transport, proto = await api.create_connection(LineProtocol, HOST, port)
        pre_mode = mode_of(transport)
        transport.write(b"STARTTLS\n")
        assert await proto.read_line() == b"OK\n"
        tls = await loop.start_tls(transport, proto, cctx, server_hostname=SERVER_NAME)
        summary = tls_summary(tls, cctx)
        post_mode = mode_of(tls)
        data = os.urandom(3 << 20)
        tls.write(b"%d\n" % len(data))
        for i in range(0, len(data), 200_000):
            tls.write(data[i:i + 200_000])
        reply = await proto.read_exactly(32 + len(data))
        tls.write(b"done\n")
        bye = await proto.read_line()
        lost = await asyncio.wait_for(asyncio.shield(proto.lost), 5)
        eof = proto.eof
        tls.close()
        server_lost = await asyncio.wait_for(server_done, 5)
    return {"pre_mode": pre_mode, "post_mode": post_mode, "tls": summary,
            "reply_ok": reply == hashlib.sha256(data).digest() + data[::-1], "bye": bye,
            "lost": lost, "eof": eof, "server": server_side, "server_lost": server_lost}


def test_loop_start_tls_protocols(env, certs):
    """loop.start_tls on transports of smcish.create_connection/create_server (Protocols, no
    streams), both sides; 3 MiB through after the upgrade, then a clean close."""
    res = env.run(_loop_start_tls(env, certs), 30)
    assert res["pre_mode"] == res["server"]["pre_mode"] == env.expected_mode
    assert res["post_mode"] == res["server"]["post_mode"] == tls_mode(env)
    assert res["reply_ok"] and res["bye"] == b"bye done\n"
    assert res["lost"] is None and res["eof"] and res["server_lost"] is None
    assert res["tls"]["cipher"] is not None and res["tls"]["sslcontext_is_ctx"]
    assert res["tls"]["peercert"] is not None and res["tls"]["ssl_object"] == "SSLObject"
    assert res["server"]["tls"]["sslcontext_is_ctx"] and res["server"]["tls"]["peercert"] is None


# ------------------------------------------------------------------ 8. sock=, argument errors

async def _with_sock(env, certs: Certs, installed: bool):
    loop = asyncio.get_running_loop()
    if installed:
        cfg = smcish.Config.current()
        smcish.install(loop, cfg.replace(device="none") if env.path == "tcp" else cfg)
    record: list = []
    server = await smcish.start_server(lambda r, w: _sha_handler(r, w, record), HOST, 0,
                                       ssl=certs.server_ctx(), **env.kw)
    async with server:
        port = server.sockets[0].getsockname()[1]
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        await loop.sock_connect(sock, (HOST, port))
        if installed:   # aiohttp's way: the loop's (patched) create_connection with sock=
            reader = asyncio.StreamReader()
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await loop.create_connection(
                lambda: protocol, sock=sock, ssl=certs.client_ctx(), server_hostname=SERVER_NAME)
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        else:
            reader, writer = await smcish.open_connection(
                sock=sock, ssl=certs.client_ctx(), server_hostname=SERVER_NAME, **env.kw)
        info = (mode_of(writer), reason_of(writer))
        peer_san = writer.get_extra_info("peercert").get("subjectAltName")
        ok = await _sha_roundtrip(reader, writer)
    return info, record[0], peer_san, ok


@pytest.mark.parametrize("how", ["caller_socket", "installed_loop"])
def test_ssl_with_sock(env, certs, how):
    """ssl= with sock= (a socket the caller connected itself) and server_hostname."""
    installed = how == "installed_loop"
    info, server_info, peer_san, ok = env.run(_with_sock(env, certs, installed), 20)
    assert ok and ("DNS", SERVER_NAME) in peer_san
    if installed or env.path == "tcp":
        # The patched sock_connect claims before connecting (ism); or no device (tcp).
        assert info[0] == server_info[0] == env.expected_mode
    else:
        # Connected before smcish saw it: the server decided at accept, without a claim.
        assert info == ("tcp", smcish.DeclineReason.PEER_NOT_ADVERTISED)
        assert server_info[0] == "tcp"


def _argument_cases(port: int, sock_factory):
    class P(asyncio.Protocol):
        pass

    return {
        "server_hostname without ssl": lambda api: api.create_connection(
            P, HOST, port, server_hostname=SERVER_NAME),
        "ssl_handshake_timeout without ssl": lambda api: api.create_connection(
            P, HOST, port, ssl_handshake_timeout=1),
        "ssl=True, sock=, no server_hostname": lambda api: api.create_connection(
            P, sock=sock_factory(), ssl=True),
        "ssl=context, sock=, no server_hostname": lambda api: api.create_connection(
            P, sock=sock_factory(), ssl=ssl.create_default_context()),
        "create_server(ssl=True)": lambda api: api.create_server(P, HOST, 0, ssl=True),
        "create_server ssl_handshake_timeout without ssl": lambda api: api.create_server(
            P, HOST, 0, ssl_handshake_timeout=1),
        "open_connection server_hostname without ssl": lambda api: api.open_connection(
            HOST, port, server_hostname=SERVER_NAME),
        "start_server(ssl=True)": lambda api: api.start_server(lambda r, w: None, HOST, 0,
                                                               ssl=True),
    }


async def _argument_errors(env):
    loop = asyncio.get_running_loop()
    listener = await asyncio.start_server(lambda r, w: w.close(), HOST, 0)
    port = listener.sockets[0].getsockname()[1]
    socks: list = []

    def sock_factory():
        s = socket.create_connection((HOST, port))
        s.setblocking(False)
        socks.append(s)
        return s

    results = {}
    try:
        for name, call in _argument_cases(port, sock_factory).items():
            row = []
            for api in (Api(False), Api(True, env.kw)):
                try:
                    got = await asyncio.wait_for(call(api), 5)
                except (ValueError, TypeError) as exc:
                    row.append((type(exc), str(exc)))
                else:
                    row.append(("no error", None))
                    closer = got[0] if isinstance(got, tuple) else got
                    closer.close()
            results[name] = row
    finally:
        for s in socks:
            s.close()
        listener.close()
        await listener.wait_closed()
        await asyncio.sleep(0)
    del loop
    return results


def test_ssl_argument_errors(env):
    """The errors asyncio raises for misused TLS arguments, raised alike (type; message too)."""
    results = env.run(_argument_errors(env), 30)
    mismatched = {name: row for name, row in results.items() if row[0][0] is not row[1][0]}
    assert not mismatched, mismatched
    for name, row in results.items():
        assert row[0][0] in (ValueError, TypeError), (name, row)
    if env.loop_kind == "asyncio":
        messages = {name: row for name, row in results.items() if row[0][1] != row[1][1]}
        assert not messages, messages
