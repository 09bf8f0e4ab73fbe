"""Drop-in entry points on a loop: create_connection / create_server, install(), loop_factory().

A client proposes only to a listener advertised on its device (or with ``negotiate="always"``): it
binds its socket, claims the connection on the device, then connects, so an smcish server can tell at
once, even for server-speaks-first protocols, that this client will propose (docs/design.md §3).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import socket
import weakref

import ism_backend

from . import clc
from . import stats as _stats
from .config import Config
from .protocol import HandshakeProtocol

log = logging.getLogger("smcish")
R = clc.DeclineReason

_PATCHED = "_smcish_originals"
# Claims made by a patched loop.sock_connect() before connecting a caller's socket (aiohttp's
# connector connects its own sockets), waiting for create_connection(sock=...) to pick them up.
_preclaims: dict = {}
_described: "weakref.WeakSet" = weakref.WeakSet()     # devices that know our info provider
# Connection-establishment arguments we handle ourselves on the accelerated client path.
_CONNECT_ONLY = ("family", "proto", "flags", "local_addr", "happy_eyeballs_delay", "interleave",
                 "all_errors")


_CONFIG_KEYS = ("device", "negotiate", "ring_size", "poll_us", "handshake_timeout")


def _config(config: Config | None, kwargs: dict) -> Config:
    """The Config for one call: ``config`` (or the environment), then smcish keywords in kwargs."""
    overrides = {key: kwargs.pop(key) for key in _CONFIG_KEYS if key in kwargs}
    base = config if config is not None else Config.current()
    return base.replace(**overrides) if overrides else base


def _device_for(config: Config):
    """Return (device, reason) where device is None when this connection must stay TCP."""
    if config.negotiate == "never":
        return None, R.DISABLED_BY_POLICY
    if config.device == "none":
        return None, R.NO_DEVICE
    try:
        device = ism_backend.get_device(config.device)
    except Exception as exc:
        log.debug("smcish: no device: %r", exc)
        return None, R.NO_DEVICE
    if not device.available:
        return None, R.NO_DEVICE
    if device not in _described:
        # `python -m smcish stat` asks each process's device endpoint for its connections.
        device.set_info_provider(_stats.connections)
        _described.add(device)
    return device, None


def _originals(loop):
    """The loop's own create_connection/create_server (before install() patched them)."""
    saved = getattr(loop, _PATCHED, None)
    if saved is not None:
        return saved
    return loop.create_connection, loop.create_server


def _is_ip(host) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


async def _resolve(loop, host, port, family, flags):
    if isinstance(host, str) and _is_ip(host.split("%", 1)[0]):
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        if family and family != fam:
            raise OSError(f"address {host!r} does not match family {family}")
        if fam == socket.AF_INET6:
            return [(fam, (host, port, 0, 0))]
        return [(fam, (host, port))]
    infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM, flags=flags)
    if not infos:
        raise OSError(f"getaddrinfo({host!r}) returned empty list")
    return [(info[0], info[4]) for info in infos]


async def create_connection(protocol_factory, host=None, port=None, *, config: Config | None = None,
                            loop=None, **kwargs):
    """Open a connection like ``loop.create_connection``, over shared memory when possible.

    Args:
        protocol_factory: any asyncio ``Protocol`` or ``BufferedProtocol`` factory.
        host, port: where to connect (or pass ``sock=`` a connected socket).
        config: a ``Config``; smcish keywords in kwargs (device, negotiate, ring_size, poll_us,
            handshake_timeout) override it.
        **kwargs: everything ``loop.create_connection`` accepts (``ssl=`` passes through untouched).

    Returns:
        ``(transport, protocol)``; ``transport.get_extra_info("smcish")`` says which path it took.

    Raises:
        OSError: as ``loop.create_connection`` would; ``HandshakeError`` if a handshake with an
            smcish peer broke in a way that could not fall back.
    """
    loop = loop or asyncio.get_running_loop()
    orig_connect, _ = _originals(loop)
    cfg = _config(config, kwargs)
    preclaim = _take_preclaim(kwargs.get("sock"))
    if kwargs.get("ssl"):
        if preclaim is not None:
            preclaim[1].release_claim(preclaim[0])
        return await orig_connect(protocol_factory, host, port, **kwargs)
    dev, skip = _device_for(cfg)
    sock = kwargs.pop("sock", None)
    claim = None
    if dev is not None and sock is None:
        infos = None
        if cfg.negotiate != "always":
            infos = await _resolve(loop, host, port, kwargs.get("family", 0), kwargs.get("flags", 0))
            if not any(dev.lookup(addr[0], addr[1]) for _, addr in infos):
                skip = R.PEER_NOT_ADVERTISED
        if skip is None:
            if infos is None:
                infos = await _resolve(loop, host, port, kwargs.get("family", 0), kwargs.get("flags", 0))
            sock, claim = await _connect_claimed(loop, dev, infos, kwargs.get("local_addr"))
            if claim is None:
                # The server side already took this connection as plain TCP (a plain client used
                # our port moments ago) or the device failed: proposing would put handshake bytes
                # into the server application's stream.
                skip = R.PEER_NOT_SMCISH
    elif dev is not None and preclaim is not None and preclaim[1] is dev:
        claim = preclaim[0]         # our sock_connect() claimed it before connecting
    elif dev is not None:
        # A socket connected by the caller: claim now; if the server already decided, stay TCP.
        try:
            peer = sock.getpeername()
            local = sock.getsockname()
            if cfg.negotiate != "always" and not dev.lookup(peer[0], peer[1]):
                skip = R.PEER_NOT_ADVERTISED
            else:
                claim = dev.claim(local[1], peer[0], peer[1], "client")
                if claim is None:
                    skip = R.PEER_NOT_SMCISH
        except OSError as exc:
            log.debug("smcish: cannot negotiate on the given socket: %r", exc)
            skip = R.INTERNAL
    waiter = loop.create_future()
    factory = functools.partial(HandshakeProtocol, loop, "client", protocol_factory, cfg,
                                dev, skip_reason=skip, waiter=waiter, claim=claim)
    if sock is not None:
        for key in _CONNECT_ONLY:
            kwargs.pop(key, None)
        try:
            await orig_connect(factory, sock=sock, **kwargs)
        except BaseException:
            if claim is not None:
                dev.release_claim(claim)
            sock.close()
            raise
    else:
        await orig_connect(factory, host, port, **kwargs)
    return await waiter


async def _connect_claimed(loop, dev, infos, local_addr):
    """Bind, claim (client_port, server) on the device, then connect; try each address in turn."""
    errors = []
    for family, addr in infos:
        sock = socket.socket(family, socket.SOCK_STREAM)
        claim = None
        try:
            sock.setblocking(False)
            sock.bind(local_addr or (("::", 0, 0, 0) if family == socket.AF_INET6 else ("0.0.0.0", 0)))
            claim = dev.claim(sock.getsockname()[1], addr[0], addr[1], "client")
            await loop.sock_connect(sock, addr)
            return sock, claim           # None: the server already decided plain TCP for us
        except OSError as exc:
            errors.append(exc)
        except BaseException:
            if claim is not None:
                dev.release_claim(claim)
            sock.close()
            raise
        if claim is not None:
            dev.release_claim(claim)
        sock.close()
    if len(errors) == 1:
        raise errors[0]
    raise OSError(f"Multiple exceptions: {', '.join(str(e) for e in errors)}")


async def create_server(protocol_factory, host=None, port=None, *, config: Config | None = None,
                        loop=None, **kwargs):
    """Listen like ``loop.create_server``; accepted connections use shared memory when the client can.

    The listener is advertised on the device for as long as it is open. Plain TCP clients are
    served unaltered, without added delay.

    Returns:
        the loop's own ``Server`` object.
    """
    loop = loop or asyncio.get_running_loop()
    _, orig_serve = _originals(loop)
    cfg = _config(config, kwargs)
    if kwargs.get("ssl"):
        return await orig_serve(protocol_factory, host, port, **kwargs)
    dev, skip = _device_for(cfg)
    # A server reads a handshake only from clients that claimed the connection on its device:
    # without a device every connection is plain TCP from its first byte (a plain client's data
    # may begin with anything, our magic included).
    factory = functools.partial(HandshakeProtocol, loop, "server", protocol_factory, cfg, dev,
                                skip_reason=skip)
    server = await orig_serve(factory, host, port, **kwargs)
    if dev is not None:
        _advertise(loop, server, dev)
    return server


def _advertise(loop, server, dev) -> None:
    handles = []
    for sock in server.sockets:
        addr = sock.getsockname()
        handles.append(dev.advertise(addr[0], addr[1]))

    def withdraw(handles=handles) -> None:
        while handles:
            try:
                dev.withdraw(handles.pop())
            except Exception as exc:
                log.debug("smcish: withdraw failed: %r", exc)

    orig_close = server.close
    try:
        def close():
            withdraw()
            orig_close()
        server.close = close
        return
    except (AttributeError, TypeError):
        pass
    # A Server we cannot patch (C class): watch it, withdraw within a second of its closing.
    ref = weakref.ref(server)

    def watch() -> None:
        srv = ref()
        if srv is None or not srv.is_serving():
            withdraw()
        elif not loop.is_closed():
            loop.call_later(1.0, watch)

    loop.call_later(1.0, watch)
    weakref.finalize(server, withdraw)


def _take_preclaim(sock):
    if sock is None or not _preclaims:
        return None
    try:
        key = (sock.getsockname()[1],) + tuple(sock.getpeername()[:2])
    except (OSError, IndexError, TypeError):
        return None
    return _preclaims.pop(key, None)


def _release_preclaim(key) -> None:
    entry = _preclaims.pop(key, None)
    if entry is not None:
        try:
            entry[1].release_claim(entry[0])
        except Exception as exc:
            log.debug("smcish: releasing claim failed: %r", exc)


def _claim_before_connect(sock, address, config) -> None:
    """Patched sock_connect's half: bind and claim the connection if it goes to an smcish listener."""
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    cfg = _config(config, {})
    dev, _ = _device_for(cfg)
    if dev is None:
        return
    host, port = address[0], address[1]
    if cfg.negotiate != "always" and not dev.lookup(host, port):
        return
    if sock.getsockname()[1] == 0:
        sock.bind(("::", 0, 0, 0) if sock.family == socket.AF_INET6 else ("0.0.0.0", 0))
    key = (sock.getsockname()[1], host, port)
    claim = dev.claim(key[0], host, port, "client")
    if claim is not None:
        _preclaims[key] = (claim, dev)
        weakref.finalize(sock, _release_preclaim, key)   # never handed to create_connection


def install(loop=None, config: Config | None = None):
    """Patch one loop so its create_connection/create_server go through smcish.

    Calls with ``ssl=`` or to unix sockets pass through untouched. Returns the loop.
    """
    loop = loop or asyncio.get_event_loop()
    if getattr(loop, _PATCHED, None) is not None:
        return loop
    originals = (loop.create_connection, loop.create_server)

    async def patched_connection(protocol_factory, host=None, port=None, **kwargs):
        return await create_connection(protocol_factory, host, port, config=config, loop=loop, **kwargs)

    async def patched_server(protocol_factory, host=None, port=None, **kwargs):
        return await create_server(protocol_factory, host, port, config=config, loop=loop, **kwargs)

    orig_sock_connect = loop.sock_connect

    async def patched_sock_connect(sock, address):
        # Callers that connect their own socket (aiohttp) then pass it as sock=: claim first.
        try:
            _claim_before_connect(sock, address, config)
        except Exception as exc:
            log.debug("smcish: no claim before sock_connect: %r", exc)
        return await orig_sock_connect(sock, address)

    setattr(loop, _PATCHED, originals)
    loop.create_connection = patched_connection
    loop.create_server = patched_server
    loop.sock_connect = patched_sock_connect
    return loop


def loop_factory(base=None, config: Config | None = None):
    """Return a factory for ``asyncio.run(main, loop_factory=...)`` / ``asyncio.Runner``.

    Args:
        base: the loop factory to wrap (``uvloop.new_event_loop``, ``asyncio.new_event_loop``...);
            default: asyncio's.
    """
    base = base or asyncio.new_event_loop

    def factory():
        return install(base(), config)

    return factory
