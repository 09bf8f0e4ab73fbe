"""Drop-in entry points on a loop: create_connection / create_server, install(), loop_factory().

A client claims a slot in a link group only when the kernel names, for its exact 4-tuple, a
listener socket that an smcish hub advertises (docs/design.md section 3); the claim and the
server's decision travel through the group's shared memory, never on the TCP connection.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import logging
import os
import select
import socket
from typing import Any

import ism_backend

from . import clc, discovery, policy, tls
from . import stats as _stats
from .config import Config
from .linkgroup import GroupUnavailable, Hub, device_pool, error_reason, sweep_hubs
from .protocol import ClientSetup, HandshakeProtocol
from .transport import SmcTransport

log = logging.getLogger("smcish")
R = clc.DeclineReason

_PATCHED = "_smcish_originals"
_EXTRAS = "_smcish_extras"
# Set-ups claimed by a patched loop.sock_connect() before connecting a caller's socket (aiohttp's
# connector connects its own sockets), waiting for create_connection(sock=...) to pick them up.
# Keyed by id(socket object): the entry holds the socket, so the id cannot be reused meanwhile.
_preclaims: dict[int, tuple[Any, Any]] = {}   # (socket, ClientSetup or the DeclineReason)
_described: set[int] = set()          # ids of devices that know our info provider
# Connection-establishment arguments we handle ourselves on the accelerated client path.
_CONNECT_ONLY = ("family", "proto", "flags", "local_addr", "happy_eyeballs_delay", "interleave",
                 "all_errors")
_CONNECT_TRIES = 3            # fresh client ports tried when the kernel refuses a recycled 4-tuple
_NO_TLS_KEYS = frozenset(("server_hostname", "ssl_handshake_timeout", "ssl_shutdown_timeout"))
_CONFIG_KEYS = ("device", "negotiate", "ring_size", "max_ring_size", "poll_us", "handshake_timeout")


def _config(config: Config | None, kwargs: dict[str, Any]) -> Config:
    """The Config for one call: ``config`` (or the environment), then smcish keywords in kwargs."""
    overrides = {key: kwargs.pop(key) for key in _CONFIG_KEYS if key in kwargs}
    base = config if config is not None else Config.current()
    return base.replace(**overrides) if overrides else base


def _device_for(config: Config) -> tuple[Any, R | None]:
    """Return (device, reason) where device is None when this connection must stay TCP."""
    if config.negotiate == "never":
        return None, R.DISABLED_BY_POLICY
    if config.device == "none":
        return None, R.NO_DEVICE
    try:
        device = ism_backend.get_device(config.device)
    except Exception as exc:  # noqa: BLE001 - no device: TCP, with the reason visible
        log.debug("smcish: no device: %r", exc)
        return None, error_reason(exc, R.NO_DEVICE)
    if not device.available:
        return None, R.NO_DEVICE
    if id(device) not in _described:
        # `python -m smcish stat` asks each process's device endpoint for its connections.
        device.set_info_provider(_stats.connections)
        _described.add(id(device))
    return device, None


def _originals(loop: Any) -> tuple[Any, Any, Any]:
    """The loop's own create_connection/create_server/sock_connect (before install())."""
    saved: tuple[Any, Any, Any] | None = getattr(loop, _PATCHED, None)
    if saved is not None:
        return saved
    return loop.create_connection, loop.create_server, loop.sock_connect


@functools.lru_cache(maxsize=1024)
def _is_ip(host: Any) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


async def _resolve(loop: Any, host: Any, port: Any, family: int,
                   flags: int) -> list[tuple[int, tuple[Any, ...]]]:
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


async def create_connection(protocol_factory: Any, host: Any = None, port: Any = None, *,
                            config: Config | None = None, loop: Any = None, **kwargs: Any) -> Any:
    """Open a connection like ``loop.create_connection``, over shared memory when possible.

    Args:
        protocol_factory: any asyncio ``Protocol`` or ``BufferedProtocol`` factory.
        host, port: where to connect (or pass ``sock=`` a connected socket).
        config: a ``Config``; smcish keywords in kwargs (device, negotiate, ring_size,
            max_ring_size, poll_us, handshake_timeout) override it.
        **kwargs: everything ``loop.create_connection`` accepts; with ``ssl=`` the connection is
            set up first (shared memory or TCP), then TLS runs over it (docs/design.md section 7).

    Returns:
        ``(transport, protocol)``; ``transport.get_extra_info("smcish")`` says which path it took.

    Raises:
        OSError: as ``loop.create_connection`` would.
    """
    loop = loop or asyncio.get_running_loop()
    patch_loop(loop)
    ssl = kwargs.pop("ssl", None)
    if ssl is not None or not _NO_TLS_KEYS.isdisjoint(kwargs):
        opts = tls.check_client_args(ssl, host, kwargs)
    if ssl:
        # Shared memory (or TCP) first, then asyncio's TLS over it (docs/design.md section 7).
        waiter = loop.create_future()
        factory = tls.client_factory(loop, protocol_factory, ssl, opts, waiter)
        transport, protocol = await create_connection(factory, host, port, config=config, loop=loop,
                                                      **kwargs)
        return await tls.finish_client(transport, protocol, waiter)
    orig_connect, _, _ = _originals(loop)
    cfg = _config(config, kwargs)
    sock = kwargs.pop("sock", None)
    pre = _preclaims.pop(id(sock), None) if sock is not None else None
    device, skip = _device_for(cfg)
    if sock is not None:
        for key in _CONNECT_ONLY:
            kwargs.pop(key, None)
        setup = None
        if pre is not None and isinstance(pre[1], R):
            skip = pre[1]                # the policy said TCP when the socket connected
        elif pre is not None:
            setup = pre[1]
            setup.release_hold()
            await setup.wait()
        elif skip is None:
            # Connected before smcish saw it: the server decided at accept, without a claim.
            skip = R.PEER_NOT_ADVERTISED
        return await _hand_over(loop, orig_connect, protocol_factory, cfg, sock, setup, skip, kwargs)
    if skip is not None:
        return await _plain(loop, orig_connect, protocol_factory, cfg, host, port, skip, kwargs)
    sweep_hubs()
    hub = Hub.get(loop, device)
    infos = await _resolve(loop, host, port, kwargs.get("family", 0), kwargs.get("flags", 0))
    skips = [policy.decide("client", addr[0], addr[1]) for _, addr in infos]
    if skips and all(skips):
        # The policy keeps every address on TCP: the loop's own create_connection, every
        # argument as given (happy eyeballs, local_addr, ...).
        return await _plain(loop, orig_connect, protocol_factory, cfg, host, port, skips[0] or R.INTERNAL,
                            kwargs)
    local_addr = kwargs.get("local_addr")
    for key in _CONNECT_ONLY:
        kwargs.pop(key, None)
    errors: list[OSError] = []
    for (family, addr), skip in zip(infos, skips, strict=True):
        try:
            if skip is not None:
                return await _plain_sock(loop, orig_connect, _originals(loop)[2], protocol_factory,
                                         cfg, family, addr, skip, kwargs, local_addr)
            return await _connect_one(loop, hub, orig_connect, protocol_factory, cfg, family, addr,
                                      local_addr, kwargs)
        except OSError as exc:
            errors.append(exc)
    if len(errors) == 1:
        raise errors[0]
    raise OSError(f"Multiple exceptions: {', '.join(str(e) for e in errors)}")


async def _plain(loop: Any, orig_connect: Any, protocol_factory: Any, cfg: Config, host: Any,
                 port: Any, reason: R, kwargs: dict[str, Any]) -> Any:
    waiter = loop.create_future()
    factory = functools.partial(HandshakeProtocol, loop, "client", protocol_factory, cfg,
                                skip_reason=reason, waiter=waiter)
    await orig_connect(factory, host, port, **kwargs)
    return await waiter


def _connect_done(fut: Any) -> None:
    if not fut.done():
        fut.set_result(None)


async def _sock_connect(loop: Any, sock: socket.socket, addr: tuple[Any, ...]) -> None:
    """``loop.sock_connect`` for our own non-blocking socket, without a loop iteration when the
    kernel completes the handshake at once (loopback and veth do, within connect(): it returns
    EINPROGRESS and the socket is writable right after). Errors as ``loop.sock_connect``."""
    err = sock.connect_ex(addr)
    if err == errno.EINPROGRESS:
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        if not poller.poll(0):
            fut = loop.create_future()
            fd = sock.fileno()
            loop.add_writer(fd, _connect_done, fut)
            try:
                await fut
            finally:
                loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, f"Connect call failed {addr}")


async def _plain_sock(loop: Any, orig_connect: Any, orig_sock_connect: Any, protocol_factory: Any,
                     cfg: Config, family: int, addr: tuple[Any, ...], reason: R, kwargs: dict[str, Any],
                     local_addr: Any = None) -> Any:
    """connect() a socket the kernel binds (or bound to ``local_addr``), as plain TCP would: TCP."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if local_addr:
            sock.bind(local_addr)
        await orig_sock_connect(sock, addr)
    except BaseException:
        sock.close()
        raise
    return await _hand_over(loop, orig_connect, protocol_factory, cfg, sock, None, reason, kwargs)


async def _claim(loop: Any, hub: Hub, cfg: Config, acceptor: discovery.Acceptor,
                 family: int, addr: tuple[Any, ...],
                 hold: bool = False) -> tuple[ClientSetup | None, R | None]:
    """Claim a slot for the acceptor's socket, opening the link group if needed."""
    if acceptor.reason is not None:
        return None, acceptor.reason
    group = acceptor.group
    if group is None:
        try:
            # Bounded like the rest of the set-up: a server whose loop is stalled cannot install
            # the group, and TCP alone would not wait for it (the group still opens meanwhile,
            # for the next connections).
            group = await asyncio.wait_for(hub.group_for(acceptor.advert),
                                           max(cfg.handshake_timeout, hub.open_wait))
        except GroupUnavailable as exc:
            return None, exc.reason
        except TimeoutError:
            return None, R.TIMEOUT
    setup = ClientSetup(loop, hub, group, cfg, remote=acceptor.remote, hold=hold)
    try:
        reason = await setup.start(acceptor.sock, family, addr)
    except OSError as exc:
        return None, error_reason(exc, R.INTERNAL)
    return (None, reason) if reason is not None else (setup, None)


async def _connect_one(loop: Any, hub: Hub, orig_connect: Any, protocol_factory: Any, cfg: Config,
                       family: int, addr: tuple[Any, ...], local_addr: Any, kwargs: dict[str, Any]) -> Any:
    _, _, orig_sock_connect = _originals(loop)
    for attempt in range(_CONNECT_TRIES):
        acceptor = await discovery.find_acceptor(loop, hub, family, addr[0], addr[1], local_addr)
        sock = acceptor.sock
        setup: ClientSetup | None = None
        try:
            setup, reason = await _claim(loop, hub, cfg, acceptor, family, addr)
            try:
                await _sock_connect(loop, sock, addr)
            except OSError as exc:
                if setup is not None:
                    setup.abandon(R.INTERNAL)
                # EADDRNOTAVAIL: the port we bound still carries this 4-tuple (our own TIME_WAIT,
                # which the oracle cannot see from here): a fresh port, or plain connect() last.
                if exc.errno == errno.EADDRNOTAVAIL and not local_addr:
                    sock.close()
                    if attempt + 1 < _CONNECT_TRIES:
                        continue
                    return await _plain_sock(loop, orig_connect, orig_sock_connect, protocol_factory,
                                             cfg, family, addr, R.NO_PORT, kwargs)
                raise
            except BaseException:
                if setup is not None:
                    setup.abandon(R.INTERNAL)
                raise
            if setup is not None:
                setup.connected()
                await setup.wait()
                if setup.mode == "failed":       # accepted with an unusable ring block
                    raise setup.error or ConnectionResetError("smcish set-up failed")
        except BaseException:
            sock.close()
            raise
        return await _hand_over(loop, orig_connect, protocol_factory, cfg, sock, setup, reason, kwargs)
    raise AssertionError("unreachable")


async def _hand_over(loop: Any, orig_connect: Any, protocol_factory: Any, cfg: Config, sock: Any,
                     setup: ClientSetup | None, skip: R | None, kwargs: dict[str, Any]) -> Any:
    """Wrap the connected socket in the loop's transport with our protocol on top."""
    waiter = loop.create_future()
    factory = functools.partial(HandshakeProtocol, loop, "client", protocol_factory, cfg,
                                setup=setup, skip_reason=skip, waiter=waiter)
    try:
        await orig_connect(factory, sock=sock, **kwargs)
    except BaseException:
        if setup is not None:
            setup.discard()
        sock.close()
        raise
    return await waiter


async def create_server(protocol_factory: Any, host: Any = None, port: Any = None, *,
                        config: Config | None = None, loop: Any = None, **kwargs: Any) -> Any:
    """Listen like ``loop.create_server``; accepted connections use shared memory when the client can.

    The listening sockets are advertised on the device until ``close()``. Plain TCP clients are
    served unaltered, without added delay.

    Returns:
        the loop's own ``Server`` (uvloop's wrapped in ``discovery.ServerProxy``, whose ``close``
        withdraws the advertisement before closing).
    """
    loop = loop or asyncio.get_running_loop()
    patch_loop(loop)
    ssl = kwargs.pop("ssl", None)
    opts = tls.check_server_args(ssl, kwargs)
    if ssl is not None:
        # Each accepted connection: shared memory (or TCP) first, then asyncio's TLS over it.
        protocol_factory = tls.server_factory(loop, protocol_factory, ssl, opts)
    _, orig_serve, _ = _originals(loop)
    cfg = _config(config, kwargs)
    device, skip = _device_for(cfg)
    hub = None
    if device is not None:
        sweep_hubs()
        hub = Hub.get(loop, device)
        policy.current()         # a malformed policy raises here, before we listen
    # Without a hub every connection is plain TCP from its first byte: a server parses nothing.
    factory = _ServerFactory(loop, protocol_factory, cfg, hub, skip)
    server = await orig_serve(factory, host, port, **kwargs)
    if hub is None:
        return server
    # The policy by listening address and port (known only now when port is 0): a socket it
    # keeps on TCP is not advertised, so no client claims a connection through it.
    allowed = set()
    for sock in server.sockets or ():
        name = sock.getsockname()
        if not isinstance(name, tuple) or policy.decide("server", name[0], name[1]) is None:
            allowed.add(sock.fileno())
    if server.sockets and not allowed:
        factory.skip = R.DISABLED_BY_POLICY
        factory.hub = None
        return server
    return discovery.advertise(server, hub, allowed)


class _ServerFactory:
    """The listener's protocol factory; the policy may turn it to TCP once the sockets exist."""

    __slots__ = ("app_factory", "cfg", "hub", "loop", "skip")

    def __init__(self, loop: Any, app_factory: Any, cfg: Config, hub: Hub | None,
                 skip: R | None) -> None:
        self.loop, self.app_factory, self.cfg, self.hub, self.skip = loop, app_factory, cfg, hub, skip

    def __call__(self) -> HandshakeProtocol:
        return HandshakeProtocol(self.loop, "server", self.app_factory, self.cfg, hub=self.hub,
                                 skip_reason=self.skip)


# --------------------------------------------------------------------------- transparent mode

async def _claim_before_connect(loop: Any, sock: Any, address: Any, config: Config | None) -> None:
    """Patched sock_connect's half: claim a slot if the socket goes to an smcish listener.

    The socket must be a fresh TCP socket; it is bound here (to the source the kernel would use)
    if the caller did not bind it. Any trouble: no claim (the connection stays plain TCP).
    """
    if (sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6)
            or not isinstance(address, tuple)):
        return
    cfg = _config(config, {})
    device, skip = _device_for(cfg)
    if device is None:
        return
    from ism_backend import sockets

    host, port = address[0], address[1]
    if not discovery.is_local(host):
        return                      # (the cross-namespace path needs create_connection itself)
    skip = policy.decide("client", host, port)
    if skip is not None:
        # create_connection(sock=) reports the policy's reason rather than "not advertised".
        _preclaims[id(sock)] = (sock, skip)
        loop.call_later(cfg.handshake_timeout * 2 + 1.0, _drop_preclaim, id(sock), skip)
        return
    if sock.getsockname()[1] == 0:
        src = discovery.source_address(sock.family, host)
        if src is None:
            return
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # see discovery.bound_socket
        if not discovery._bind_ephemeral(sock, src, dest=(sock.family, host, port)):
            return
    bound = sock.getsockname()
    hit = sockets.diag().lookup(sock.family, (host, port), (bound[0], bound[1]))
    if hit is not None and hit.state == sockets.TCP_TIME_WAIT:
        hit = discovery._listener_behind(sock.family, host, port, bound)
    if hit is None or hit.state != sockets.TCP_LISTEN:
        return
    hub = Hub.get(loop, device)
    group = hub.group_serving(hit.inode)
    advert = None
    if group is None:
        if device.kind == "daemon":
            advert = await loop.run_in_executor(device_pool(), device.find_listener, hit.inode)
        else:
            advert = device.find_listener(hit.inode)
        if advert is None:
            return
        hub.remember_listener(hit.inode, advert)
    acceptor = discovery.Acceptor(sock, group, advert, False, None)
    setup, _reason = await _claim(loop, hub, cfg, acceptor, sock.family, (host, port), hold=True)
    if setup is not None:
        _preclaims[id(sock)] = (sock, setup)
        # Never handed to create_connection(sock=) within the set-up timeout: the client's timer
        # finalises TCP by itself; this drops our reference afterwards (no finaliser involved).
        loop.call_later(cfg.handshake_timeout * 2 + 1.0, _drop_preclaim, id(sock), setup)


def _drop_preclaim(key: int, setup: Any) -> None:
    entry = _preclaims.get(key)
    if entry is not None and entry[1] is setup:
        del _preclaims[key]
        if isinstance(setup, R):
            return
        if not setup.machine.done:
            setup.abandon(R.TIMEOUT)
        setup.discard()


def _finalise_preclaim(sock: Any) -> None:
    """The caller uses its socket directly (sock_sendall, ...): the connection is plain TCP."""
    entry = _preclaims.pop(id(sock), None)
    if entry is not None and not isinstance(entry[1], R):
        setup = entry[1]
        if not setup.machine.done:
            setup.abandon(R.DISABLED_BY_POLICY)
        setup.discard()


def patch_loop(loop: Any) -> None:
    """Make ``loop.start_tls`` (and ``loop.sendfile``) accept smcish transports, once per loop.

    uvloop's ``start_tls`` accepts only its own transports, and asyncio's would put TLS on our
    fallen-back transport instead of the TCP transport underneath; both are wrapped here. Any
    other transport goes to the loop's own method unchanged.
    """
    if getattr(loop, _EXTRAS, False):
        return
    orig_tls, orig_sendfile = loop.start_tls, loop.sendfile
    try:
        setattr(loop, _EXTRAS, True)
        loop.start_tls = functools.partial(tls.start_tls, loop, orig_tls)
        loop.sendfile = functools.partial(_sendfile, loop, orig_sendfile)
    except (AttributeError, TypeError):
        # A loop class without instance attributes: its own start_tls/sendfile stay (asyncio's
        # accept our transport through _start_tls_compatible / the sendfile fallback).
        log.debug("smcish: cannot wrap start_tls/sendfile on %r", loop)


async def _sendfile(loop: Any, orig: Any, transport: Any, file: Any, offset: int = 0,
                    count: int | None = None, *, fallback: bool = True) -> int:
    """``loop.sendfile``: a fallen-back connection gets the loop's own (the kernel's sendfile(2)
    on asyncio's loop), a shared-memory one reads the file into its ring in C."""
    if not isinstance(transport, SmcTransport):
        sent: int = await orig(transport, file, offset, count, fallback=fallback)
        return sent
    if transport._info.mode == "tcp":
        sent = await orig(transport._tcp, file, offset, count, fallback=fallback)
        return sent
    try:
        file.fileno()
    except (AttributeError, OSError, ValueError):
        sent = await orig(transport, file, offset, count, fallback=fallback)
        return sent
    if "b" not in getattr(file, "mode", "b"):
        raise ValueError("file should be opened in binary mode")
    if count is not None:
        if not isinstance(count, int):
            raise TypeError(f"count must be a positive integer (got {count!r})")
        if count <= 0:
            raise ValueError(f"count must be a positive integer (got {count!r})")
    if not isinstance(offset, int):
        raise TypeError(f"offset must be a non-negative integer (got {offset!r})")
    if offset < 0:
        raise ValueError(f"offset must be a non-negative integer (got {offset!r})")
    if transport.is_closing():
        raise RuntimeError("Transport is closing")
    sent = await transport._sendfile_ism(file, offset, count)
    if transport._info.mode == "tcp" and (count is None or sent < count):
        # An optimistic set-up fell through to TCP midway: the rest goes over TCP, from where the
        # ring stopped (the ring's bytes were resent there first).
        rest = None if count is None else count - sent
        try:
            sent += await orig(transport._tcp, file, offset + sent, rest, fallback=fallback)
        except NotImplementedError:
            # uvloop has no loop.sendfile; the caller must not start over (part of the file is
            # sent): copy the rest ourselves.
            sent += await _copy_file(loop, transport, file, offset + sent, rest)
    return sent


async def _copy_file(loop: Any, transport: Any, file: Any, offset: int, count: int | None) -> int:
    """asyncio's sendfile fallback loop, writing immutable chunks (uvloop's transport keeps a
    reference to what it could not send at once, so a reused buffer would be overwritten)."""
    from asyncio.base_events import _SendfileFallbackProtocol  # type: ignore[attr-defined]  # private

    fd = file.fileno()
    total = 0
    proto = _SendfileFallbackProtocol(transport)
    try:
        while count is None or total < count:
            size = 256 * 1024 if count is None else min(256 * 1024, count - total)
            data = await loop.run_in_executor(None, os.pread, fd, size, offset + total)
            if not data:
                break
            await proto.drain()
            transport.write(data)
            total += len(data)
        return total
    finally:
        if total:
            file.seek(offset + total)
        await proto.restore()


def install(loop: Any = None, config: Config | None = None) -> Any:
    """Patch one loop so its create_connection/create_server go through smcish.

    Also its ``sock_connect`` (clients that connect their own socket and pass it as ``sock=``,
    as aiohttp does), ``start_tls`` and ``sendfile``. ``ssl=`` calls are accelerated as with
    ``create_connection``; unix-socket calls (``create_unix_connection``/``_server``) are not
    touched. Returns the loop.
    """
    loop = loop or asyncio.get_event_loop()
    if getattr(loop, _PATCHED, None) is not None:
        return loop
    originals = (loop.create_connection, loop.create_server, loop.sock_connect)

    async def patched_connection(protocol_factory: Any, host: Any = None, port: Any = None,
                                 **kwargs: Any) -> Any:
        return await create_connection(protocol_factory, host, port, config=config, loop=loop, **kwargs)

    async def patched_server(protocol_factory: Any, host: Any = None, port: Any = None, **kwargs: Any) -> Any:
        return await create_server(protocol_factory, host, port, config=config, loop=loop, **kwargs)

    orig_sock_connect = loop.sock_connect

    async def patched_sock_connect(sock: Any, address: Any) -> Any:
        # Callers that connect their own socket (aiohttp) then pass it as sock=: claim first.
        try:
            await _claim_before_connect(loop, sock, address, config)
        except Exception as exc:  # noqa: BLE001 - no claim: plain TCP
            log.debug("smcish: no claim before sock_connect: %r", exc)
        try:
            result = await orig_sock_connect(sock, address)
        except BaseException:
            entry = _preclaims.pop(id(sock), None)
            if entry is not None and not isinstance(entry[1], R):
                entry[1].abandon(R.INTERNAL)
            raise
        entry = _preclaims.get(id(sock))
        if entry is not None and not isinstance(entry[1], R):
            entry[1].connected()
        return result

    def patch_sock_io(name: str) -> None:
        orig = getattr(loop, name)

        def patched(sock: Any, *args: Any, **kwargs: Any) -> Any:
            if _preclaims:
                _finalise_preclaim(sock)
            return orig(sock, *args, **kwargs)

        setattr(loop, name, patched)

    setattr(loop, _PATCHED, originals)
    patch_loop(loop)
    loop.create_connection = patched_connection
    loop.create_server = patched_server
    loop.sock_connect = patched_sock_connect
    for name in ("sock_sendall", "sock_recv", "sock_recv_into", "sock_sendfile"):
        if hasattr(loop, name):
            patch_sock_io(name)
    orig_accepted = loop.connect_accepted_socket

    def patched_accepted(protocol_factory: Any, sock: Any, **kwargs: Any) -> Any:
        # A pre-claimed socket wrapped as an accepted one is used as plain TCP from now on.
        if _preclaims:
            _finalise_preclaim(sock)
        return orig_accepted(protocol_factory, sock, **kwargs)

    loop.connect_accepted_socket = patched_accepted
    return loop


def loop_factory(base: Any = None, config: Config | None = None) -> Any:
    """Return a factory for ``asyncio.run(main, loop_factory=...)`` / ``asyncio.Runner``.

    Args:
        base: the loop factory to wrap (``uvloop.new_event_loop``, ``asyncio.new_event_loop``...);
            default: asyncio's.
    """
    base = base or asyncio.new_event_loop

    def factory() -> Any:
        return install(base(), config)

    return factory
