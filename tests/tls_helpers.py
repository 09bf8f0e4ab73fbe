"""Helpers for tests/test_tls.py: trustme certificates, an API switch (plain asyncio vs smcish),
a loop runner that collects unhandled loop exceptions, line protocols and the SMTP-like exchange."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import ssl

import trustme

import smcish
from conftest import new_loop

HOST = "127.0.0.1"
SERVER_NAME = "localhost"
CLIENT_CN = "smcish test client"


class Certs:
    """A CA, a server cert for localhost/127.0.0.1 and a client cert; files under ``directory``."""

    def __init__(self, directory: str) -> None:
        self.ca = trustme.CA()
        self.server = self.ca.issue_cert(SERVER_NAME, HOST)
        self.client = self.ca.issue_cert("client.example", common_name=CLIENT_CN)
        self.cafile = os.path.join(directory, "ca.pem")
        self.ca.cert_pem.write_to_path(self.cafile)
        self.server_pem = os.path.join(directory, "server.pem")
        self.server.private_key_and_cert_chain_pem.write_to_path(self.server_pem)

    def server_ctx(self, require_client_cert: bool = False, tls_max=None) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(ctx)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(ctx)
        if tls_max is not None:
            ctx.maximum_version = tls_max
        return ctx

    def client_ctx(self, with_cert: bool = False, tls_max=None) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        if with_cert:
            self.client.configure_cert(ctx)
        if tls_max is not None:
            ctx.maximum_version = tls_max
        return ctx


def client_hello(ctx: ssl.SSLContext) -> bytes:
    """The bytes of a real TLS ClientHello for ``ctx``."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=SERVER_NAME)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def run_collect(loop_kind: str, coro, timeout: float):
    """Run ``coro`` on a fresh loop of ``loop_kind``; return (result, unhandled loop exceptions)."""
    loop = new_loop(loop_kind)
    errors: list[dict] = []
    loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
    try:
        result = loop.run_until_complete(asyncio.wait_for(coro, timeout))
        loop.run_until_complete(asyncio.sleep(0.05))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
        gc.collect()            # finalisers run here, not at a random later point
    return result, errors


class _NoTransport:
    """Stands in for the transport of a StreamWriter that came back without one, so that its
    __del__ stays quiet: run by the cyclic GC inside pytest's ast.parse, the unraisable
    AttributeError (formatted with ast.parse again) trips CPython 3.11.7's "AST constructor
    recursion depth mismatch" and pytest's report crashes (INTERNALERROR)."""

    def is_closing(self) -> bool:
        return True

    def close(self) -> None:
        pass


def defuse(writer):
    """A writer whose transport is None (the failure under test): make it harmless to keep."""
    if writer is not None and writer.transport is None:
        writer._transport = _NoTransport()
    return None


def describe_errors(errors: list[dict]) -> list[str]:
    return [f"{ctx.get('message')}: {type(ctx.get('exception')).__name__}" for ctx in errors]


class Api:
    """The same calls through plain asyncio (``smc=False``) or smcish (with the env's keywords)."""

    def __init__(self, smc: bool, kw: dict | None = None) -> None:
        self.smc = smc
        self.kw = dict(kw or {})

    def __repr__(self) -> str:
        return f"Api(smcish, {self.kw})" if self.smc else "Api(asyncio)"

    async def open_connection(self, *args, **kwargs):
        if self.smc:
            return await smcish.open_connection(*args, **self.kw, **kwargs)
        return await asyncio.open_connection(*args, **kwargs)

    async def start_server(self, *args, **kwargs):
        if self.smc:
            return await smcish.start_server(*args, **self.kw, **kwargs)
        return await asyncio.start_server(*args, **kwargs)

    async def create_connection(self, *args, **kwargs):
        if self.smc:
            return await smcish.create_connection(*args, **self.kw, **kwargs)
        return await asyncio.get_running_loop().create_connection(*args, **kwargs)

    async def create_server(self, *args, **kwargs):
        if self.smc:
            return await smcish.create_server(*args, **self.kw, **kwargs)
        return await asyncio.get_running_loop().create_server(*args, **kwargs)


def mode_of(obj) -> str | None:
    """The smcish mode of a transport or StreamWriter, None when it has no smcish info."""
    info = obj.get_extra_info("smcish")
    return None if info is None else info.mode


def reason_of(obj):
    info = obj.get_extra_info("smcish")
    return None if info is None else info.reason


def tls_summary(obj, ctx: ssl.SSLContext) -> dict:
    """What a TLS transport (or writer) answers for the TLS extra infos, in comparable form."""
    ssl_object = obj.get_extra_info("ssl_object")
    peercert = obj.get_extra_info("peercert")
    cipher = obj.get_extra_info("cipher")
    sslcontext = obj.get_extra_info("sslcontext")
    return {
        "ssl_object": type(ssl_object).__name__,
        "ssl_object_version": ssl_object.version() if ssl_object is not None else None,
        "peercert": None if peercert is None else dict(x[0] for x in peercert.get("subject", ())),
        "cipher": cipher,
        "sslcontext_is_ctx": sslcontext is ctx,
        "sslcontext": type(sslcontext).__name__,
        "peername": obj.get_extra_info("peername") is not None,
        "sockname": obj.get_extra_info("sockname") is not None,
    }


def subject_cn(peercert) -> str | None:
    if not peercert:
        return None
    for rdn in peercert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return None


class LineProtocol(asyncio.Protocol):
    """A Protocol with awaitable reads (for loop.start_tls tests, no streams)."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.transport = None
        self.buf = bytearray()
        self.eof = False
        self.lost = self.loop.create_future()
        self._waiter = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data) -> None:
        self.buf += data
        self._wake()

    def eof_received(self):
        self.eof = True
        self._wake()
        return None

    def connection_lost(self, exc) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def read_exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if self.eof or self.lost.done():
                raise EOFError(f"closed with {len(self.buf)} of {n} bytes")
            self._waiter = self.loop.create_future()
            await self._waiter
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def read_line(self) -> bytes:
        while b"\n" not in self.buf:
            if self.eof or self.lost.done():
                raise EOFError(f"closed before a line: {bytes(self.buf)!r}")
            self._waiter = self.loop.create_future()
            await self._waiter
        i = self.buf.index(b"\n") + 1
        out = bytes(self.buf[:i])
        del self.buf[:i]
        return out


# ------------------------------------------------------------------ the SMTP-like exchange

BODY_LINES = 2000          # lines of the DATA body (~140 KiB)


def body_line(i: int) -> bytes:
    return b"line %06d " % i + b"x" * 60 + b"\r\n"


async def smtp_server(reader, writer, ctx: ssl.SSLContext, record: dict) -> None:
    """Server-first: greet, EHLO, STARTTLS, upgrade, EHLO/MAIL/RCPT/DATA over TLS, QUIT."""
    try:
        record["pre_mode"] = mode_of(writer)
        writer.write(b"220 localhost ESMTP smcish-test\r\n")
        assert await reader.readline() == b"EHLO client\r\n"
        writer.write(b"250-localhost\r\n250 STARTTLS\r\n")
        assert await reader.readline() == b"STARTTLS\r\n"
        writer.write(b"220 go ahead\r\n")
        await writer.drain()
        await writer.start_tls(ctx)
        record["tls"] = tls_summary(writer, ctx)
        record["post_mode"] = mode_of(writer)
        while True:
            line = await reader.readline()
            if not line:
                record["eof_before_quit"] = True
                break
            if line.startswith(b"EHLO"):
                writer.write(b"250-localhost\r\n250 SIZE 1000000\r\n")
            elif line.startswith((b"MAIL FROM:", b"RCPT TO:")):
                writer.write(b"250 OK\r\n")
            elif line == b"DATA\r\n":
                writer.write(b"354 end with .\r\n")
                digest = hashlib.sha256()
                while (data := await reader.readline()) != b".\r\n":
                    assert data, "EOF inside DATA"
                    digest.update(data)
                writer.write(b"250 queued " + digest.hexdigest().encode() + b"\r\n")
            elif line == b"QUIT\r\n":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"500 what\r\n")
        writer.close()
        await writer.wait_closed()
        record["done"] = True
    except BaseException as exc:   # reported to the test
        record["error"] = repr(exc)
        writer.close()
        raise


async def read_reply(reader) -> list[bytes]:
    """An SMTP reply: lines until one whose 4th byte is a space."""
    lines = []
    while True:
        line = await reader.readline()
        assert line, f"EOF in reply after {lines!r}"
        lines.append(line)
        if line[3:4] == b" ":
            return lines


async def smtp_client(reader, writer, ctx: ssl.SSLContext, record: dict) -> None:
    record["pre_mode"] = mode_of(writer)
    assert (await read_reply(reader))[0].startswith(b"220 ")
    writer.write(b"EHLO client\r\n")
    assert b"250 STARTTLS\r\n" in await read_reply(reader)
    writer.write(b"STARTTLS\r\n")
    assert await read_reply(reader) == [b"220 go ahead\r\n"]
    await writer.start_tls(ctx, server_hostname=SERVER_NAME)
    record["tls"] = tls_summary(writer, ctx)
    record["post_mode"] = mode_of(writer)
    writer.write(b"EHLO client\r\n")
    assert (await read_reply(reader))[-1].startswith(b"250 ")
    writer.write(b"MAIL FROM:<a@example.org>\r\n")
    assert await read_reply(reader) == [b"250 OK\r\n"]
    writer.write(b"RCPT TO:<b@example.org>\r\n")
    assert await read_reply(reader) == [b"250 OK\r\n"]
    writer.write(b"DATA\r\n")
    assert (await read_reply(reader))[0].startswith(b"354")
    digest = hashlib.sha256()
    for i in range(BODY_LINES):
        line = body_line(i)
        digest.update(line)
        writer.write(line)
        if i % 256 == 0:
            await writer.drain()
    writer.write(b".\r\n")
    assert await read_reply(reader) == [b"250 queued " + digest.hexdigest().encode() + b"\r\n"]
    writer.write(b"QUIT\r\n")
    assert await read_reply(reader) == [b"221 bye\r\n"]
    record["after_quit"] = await reader.read()          # the server closes: EOF
    writer.close()
    await writer.wait_closed()
    record["done"] = True
