"""TLS on smcish connections: ``start_tls`` on any of them, and ``ssl=`` that keeps shared memory.

TLS sits above the byte stream, so it does not care what carries its records (docs/design.md
section 7): on a shared-memory connection asyncio's own ``SSLProtocol`` runs over ``SmcTransport``
and the records ride the rings; on a fallen-back connection TLS goes onto the loop's own TCP
transport, exactly as plain asyncio (or uvloop) would do it.

- ``start_tls(loop, orig, transport, protocol, sslcontext, ...)``: what the loop's ``start_tls``
  becomes on every loop smcish touches (``patch_loop``).
- ``wrap_client`` / ``wrap_server``: the protocol factories ``create_connection(ssl=...)`` and
  ``create_server(ssl=...)`` use, so that two smcish peers set up shared memory first and then run
  the TLS handshake over it; a plain TLS peer gets the same TLS it would get from asyncio.
"""

from __future__ import annotations

import ssl as _ssl
from asyncio import sslproto
from collections.abc import Callable
from typing import Any

from .transport import SmcTransport

_TLS_KEYS = ("server_hostname", "ssl_handshake_timeout", "ssl_shutdown_timeout")


def check_client_args(ssl: Any, host: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """asyncio's argument checks for ``create_connection(ssl=...)``; pops and returns the TLS
    keywords (``server_hostname`` defaulted to ``host`` as asyncio does)."""
    opts = {key: kwargs.pop(key, None) for key in _TLS_KEYS}
    if opts["server_hostname"] is not None and not ssl:
        raise ValueError("server_hostname is only meaningful with ssl")
    if opts["ssl_handshake_timeout"] is not None and not ssl:
        raise ValueError("ssl_handshake_timeout is only meaningful with ssl")
    if opts["ssl_shutdown_timeout"] is not None and not ssl:
        raise ValueError("ssl_shutdown_timeout is only meaningful with ssl")
    if ssl and opts["server_hostname"] is None:
        if not host:
            raise ValueError("You must set server_hostname when using ssl without a host")
        opts["server_hostname"] = host
    return opts


def check_server_args(ssl: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """asyncio's argument checks for ``create_server(ssl=...)``; pops the TLS keywords."""
    opts = {key: kwargs.pop(key, None) for key in _TLS_KEYS[1:]}
    if isinstance(ssl, bool):
        raise TypeError("ssl argument must be an SSLContext or None")
    if ssl is None:
        for key, value in opts.items():
            if value is not None:
                raise ValueError(f"{key} is only meaningful with ssl")
    return opts


def client_factory(loop: Any, protocol_factory: Callable[[], Any], ssl: Any, opts: dict[str, Any],
                   waiter: Any) -> Callable[[], Any]:
    """The protocol factory of a TLS client connection: asyncio's ``SSLProtocol`` around the
    application's protocol; ``waiter`` resolves when the TLS handshake is done."""
    context = None if isinstance(ssl, bool) else ssl
    return TlsFactory(loop, protocol_factory, context, waiter, False, opts["server_hostname"], opts)


def server_factory(loop: Any, protocol_factory: Callable[[], Any], context: Any,
                   opts: dict[str, Any]) -> Callable[[], Any]:
    """The protocol factory of an accepted TLS connection (as asyncio's accept path builds it:
    a failed handshake closes the connection, reported only in debug mode)."""
    return TlsFactory(loop, protocol_factory, context, None, True, None, opts)


class TlsFactory:
    """Builds the SSLProtocol of one connection: asyncio's over shared memory (any loop), the
    loop's own on a fallen-back connection (uvloop's native one on uvloop), so that TLS over TCP
    is exactly what the loop itself would have run."""

    __slots__ = ("args", "loop", "protocol_factory", "timeouts")

    def __init__(self, loop: Any, protocol_factory: Callable[[], Any], context: Any, waiter: Any,
                 server_side: bool, server_hostname: Any, opts: dict[str, Any]) -> None:
        self.loop = loop
        self.protocol_factory = protocol_factory
        self.args = (context, waiter, server_side, server_hostname)
        self.timeouts = {"ssl_handshake_timeout": opts["ssl_handshake_timeout"],
                         "ssl_shutdown_timeout": opts["ssl_shutdown_timeout"]}

    def __call__(self) -> Any:
        return sslproto.SSLProtocol(self.loop, self.protocol_factory(), *self.args, **self.timeouts)

    def for_tcp(self) -> Any:
        cls = _native_ssl_protocol(self.loop)
        context = self.args[0]
        if context is None and cls is not sslproto.SSLProtocol:
            # asyncio's SSLProtocol makes the default context itself; uvloop's wants one.
            context = sslproto._create_transport_context(self.args[2], self.args[3])
        return cls(self.loop, self.protocol_factory(), context, *self.args[1:], **self.timeouts)


def _native_ssl_protocol(loop: Any) -> Any:
    """The SSLProtocol class the loop itself uses for TLS over its TCP transports."""
    module = type(loop).__module__
    if module.startswith("uvloop"):
        try:
            from uvloop.loop import SSLProtocol  # type: ignore[attr-defined]  # not in its stubs
        except ImportError:      # pragma: no cover - uvloop without it: asyncio's works too
            return sslproto.SSLProtocol
        return SSLProtocol
    return sslproto.SSLProtocol


async def finish_client(transport: Any, protocol: Any, waiter: Any) -> tuple[Any, Any]:
    """Wait for the client's TLS handshake; returns ``(tls transport, application protocol)``."""
    try:
        await waiter
    except BaseException:
        transport.close()
        raise
    if isinstance(protocol, sslproto.SSLProtocol):
        return protocol._app_transport, protocol._app_protocol
    app_transport = protocol._get_app_transport()          # uvloop's SSLProtocol
    return app_transport, app_transport.get_protocol()


async def start_tls(loop: Any, orig: Any, transport: Any, protocol: Any, sslcontext: Any, *,
                    server_side: bool = False, server_hostname: str | None = None,
                    ssl_handshake_timeout: float | None = None,
                    ssl_shutdown_timeout: float | None = None) -> Any:
    """``loop.start_tls`` for smcish transports; any other transport goes to the loop's own."""
    kw = {"server_side": server_side, "server_hostname": server_hostname,
          "ssl_handshake_timeout": ssl_handshake_timeout}
    if ssl_shutdown_timeout is not None:
        kw["ssl_shutdown_timeout"] = ssl_shutdown_timeout
    if not isinstance(transport, SmcTransport):
        return await orig(transport, protocol, sslcontext, **kw)
    if not isinstance(sslcontext, _ssl.SSLContext):
        raise TypeError(f"sslcontext is expected to be an instance of ssl.SSLContext, "
                        f"got {sslcontext!r}")
    if transport._info.mode == "tcp":
        # Fallen back: the loop's own TCP transport goes under TLS, as in plain asyncio.
        return await orig(transport._tcp, protocol, sslcontext, **kw)
    # Shared memory: what BaseEventLoop.start_tls does, over our transport.
    waiter = loop.create_future()
    ssl_protocol = sslproto.SSLProtocol(
        loop, protocol, sslcontext, waiter, server_side, server_hostname,
        # (typeshed says int for the timeouts; asyncio takes any number of seconds)
        ssl_handshake_timeout=ssl_handshake_timeout,  # type: ignore[arg-type]
        ssl_shutdown_timeout=ssl_shutdown_timeout, call_connection_made=False)
    # Paused first, so that no data reaches the SSLProtocol before its connection_made().
    transport.pause_reading()
    transport.set_protocol(ssl_protocol)
    made = loop.call_soon(ssl_protocol.connection_made, transport)
    resume = loop.call_soon(transport.resume_reading)
    try:
        await waiter
    except BaseException:
        transport.close()
        made.cancel()
        resume.cancel()
        raise
    return ssl_protocol._app_transport
