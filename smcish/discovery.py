"""Discovery that cannot misdirect: which listener socket will accept this very connection, and is it ours?

Client side (docs/design.md 3.1): bind the socket to the source address the kernel would pick and
an ephemeral port, then ask the kernel (``NETLINK_SOCK_DIAG``) which socket would receive a segment
from that exact 4-tuple: the listener it names is the one that will accept the connection, with
every rule the kernel applies (v6only, specific-over-wildcard, SO_REUSEPORT). Only if that very
socket is advertised by an smcish hub do we claim. Server side: advertise the listening sockets by
inode, and withdraw them in ``Server.close()`` before it returns.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
import time
from typing import Any, NamedTuple

from ism_backend import sockets

from . import clc
from .linkgroup import Hub, LinkGroup, device_pool, error_reason

log = logging.getLogger("smcish")
R = clc.DeclineReason

_REBINDS = 12                    # fresh ports tried when a port's 4-tuple is in use (TIME_WAIT, ours)
_SOURCES: dict[tuple[int, str], str | None] = {}
_SOURCES_MAX = 1024
_LOCAL: dict[str, tuple[float, bool]] = {}
_LOCAL_TTL = 1.0                 # seconds an "is this address ours?" answer is reused


def is_local(host: str) -> bool:
    """Is ``host`` an address of this network namespace (cached briefly)?

    The kernel's listener lookup matches a wildcard listener whatever the destination, but a
    segment to an address that is not local never reaches it: only local destinations can be
    judged by the oracle. A stale answer costs at most one connection the set-up timeout.
    """
    now = time.monotonic()
    cached = _LOCAL.get(host)
    if cached is not None and now < cached[0]:
        return cached[1]
    try:
        local = sockets.diag().is_local(host)
    except (OSError, ValueError) as exc:
        log.debug("smcish: cannot tell whether %s is local: %r", host, exc)
        local = False
    if len(_LOCAL) >= _SOURCES_MAX:
        _LOCAL.clear()
    _LOCAL[host] = (now + _LOCAL_TTL, local)
    return local


def source_address(family: int, host: str) -> str | None:
    """The local address the kernel uses toward ``host`` (cached; routes rarely change)."""
    key = (family, host)
    try:
        return _SOURCES[key]
    except KeyError:
        pass
    src = sockets.route_source(family, host)
    if len(_SOURCES) >= _SOURCES_MAX:
        _SOURCES.clear()
    _SOURCES[key] = src
    return src


class Acceptor(NamedTuple):
    """What the client learnt about the socket that will accept its connection."""

    sock: socket.socket          # bound (and not connected) client socket to use
    group: LinkGroup | None      # the link group toward the smcish hub serving that listener
    advert: Any                  # that hub's advertisement (when no group exists yet)
    remote: bool                 # found through ismd across network namespaces
    reason: R | None             # why there is no smcish acceptor (the connection stays TCP)


def _port_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            lo, hi = (int(x) for x in fh.read().split())
        if 1024 <= lo < hi <= 65535:
            return lo, hi
    except (OSError, ValueError):
        pass
    return 32768, 60999


_PORTS = _port_range()
_RANDOM_PORT_TRIES = 8


def _bind_ephemeral(sock: socket.socket, src: str, random_tries: int = _RANDOM_PORT_TRIES,
                    dest: tuple[Any, ...] | None = None) -> bool:
    """Bind ``sock`` to ``src`` and a free ephemeral port; False if none could be had.

    bind(port 0) searches the whole range for a port without any bound socket, which takes
    milliseconds on a host with tens of thousands of connections; a random port is one hash
    lookup, and a collision (EADDRINUSE, or a 4-tuple in use caught by the caller) is rare
    (about the share of the range this host already uses toward that destination). After
    ``random_tries`` the kernel picks (bind(0) prefers ports nobody holds).

    ``dest`` = (family, host, port): skip ports where a socket of this host already holds the
    4-tuple toward it (our own TIME_WAIT: connect() would fail with EADDRNOTAVAIL). For a
    socket the caller owns, which cannot be rebound after such a failure.
    """
    lo, hi = _PORTS
    for _ in range(random_tries):
        cport = random.randint(lo, hi)
        if dest is not None:
            try:
                if sockets.diag().lookup(dest[0], (src, cport), (dest[1], dest[2])) is not None:
                    continue
            except OSError:
                pass
        try:
            sock.bind((src, cport))
            return True
        except OSError as exc:
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                break
    try:
        sock.bind((src, 0))
        return True
    except OSError as exc:
        log.debug("smcish: cannot bind a client port: %r", exc)
        return False


def bound_socket(family: int, host: str, port: int, local_addr: Any,
                 remote_ok: bool = False) -> tuple[socket.socket, Any]:
    """A non-blocking socket bound for ``host:port`` and the kernel's answer for its 4-tuple.

    Args:
        remote_ok: bind it even when ``host`` is not an address of this namespace (ismd can
            look across namespaces for a bound socket).
    Returns:
        ``(sock, hit)``: hit is the LISTEN socket that will accept a connection from ``sock``, or
        None (the destination is not local, nothing listens, every port tried carries a 4-tuple
        in use, or the source cannot be known).
    Raises:
        OSError: the socket cannot be created or bound (as a plain connect would).
    """
    local = is_local(host)
    src = local_addr[0] if local_addr else source_address(family, host)
    sock = None
    for attempt in range(_REBINDS):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            if local_addr:
                sock.bind(local_addr)
            elif src is not None and (local or remote_ok):
                # bind(0) allocates ports exclusively, unlike connect(): without SO_REUSEADDR the
                # TIME_WAIT remnants of our earlier connections would exhaust the port range long
                # before plain TCP's connect() would (a recycled 4-tuple is caught below).
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                # the last try lets the kernel pick the port
                tries = _RANDOM_PORT_TRIES if attempt + 1 < _REBINDS else 0
                if not _bind_ephemeral(sock, src, tries):   # no port: a plain connect may work
                    sock.close()
                    return socket.socket(family, socket.SOCK_STREAM), None
            else:
                return sock, None
            bound = sock.getsockname()
        except OSError:
            sock.close()
            raise
        if not local:
            return sock, None
        try:
            hit = sockets.diag().lookup(family, (host, port), (bound[0], bound[1]))
        except OSError as exc:           # no sock_diag here (seccomp, EMFILE...): stay TCP
            log.debug("smcish: sock_diag unavailable: %r", exc)
            return sock, None
        if hit is None or hit.state == sockets.TCP_LISTEN:
            return sock, hit
        if hit.state == sockets.TCP_TIME_WAIT:
            # The server closed a connection from this port first and holds its TIME_WAIT: a
            # new SYN recycles it and goes to the listener (as plain connect() relies on, which
            # picks such ports freely). Which listener: the one a neighbouring port reaches (with
            # SO_REUSEPORT the choice could differ: then our claim goes unanswered and the
            # connection moves to TCP after the set-up timeout, nothing worse).
            behind = _listener_behind(family, host, port, bound)
            if behind is not None:
                return sock, behind
        if local_addr:
            return sock, None
        sock.close()                       # a port in use: try another one
    return socket.socket(family, socket.SOCK_STREAM), None


def _listener_behind(family: int, host: str, port: int, bound: tuple[Any, ...]) -> Any:
    """The listener that a SYN from ``bound``'s address would reach, found from other ports."""
    lo, _ = _PORTS
    for _ in range(3):
        # A source port below the ephemeral range: no connection of ours (nor, most likely,
        # anyone's) uses it, so the lookup reaches the listening socket. It is only a question
        # to the kernel: nothing is bound.
        other = random.randint(1024, max(1025, lo - 1))
        try:
            hit = sockets.diag().lookup(family, (host, port), (bound[0], other))
        except OSError:
            return None
        if hit is not None and hit.state == sockets.TCP_LISTEN:
            return hit
        if hit is None:
            return None
    return None


async def find_acceptor(loop: Any, hub: Hub, family: int, host: str, port: int,
                        local_addr: Any) -> Acceptor:
    """Bind a client socket and find out whether an smcish hub will accept its connection."""
    device = hub.device
    sock, hit = bound_socket(family, host, port, local_addr, remote_ok=device.kind == "daemon")
    sock.setblocking(False)
    try:
        if hit is not None:
            group = hub.group_serving(hit.inode)
            if group is not None:
                return Acceptor(sock, group, None, False, None)
            try:
                if device.kind == "daemon":
                    advert = await loop.run_in_executor(device_pool(), device.find_listener,
                                                        hit.inode)
                else:
                    advert = device.find_listener(hit.inode)
            except Exception as exc:  # noqa: BLE001 - EMFILE, a vanished daemon...: stay TCP
                log.debug("smcish: find_listener failed: %r", exc)
                return Acceptor(sock, None, None, False, error_reason(exc, R.NO_DEVICE))
            if advert is None:
                return Acceptor(sock, None, None, False, R.PEER_NOT_ADVERTISED)
            hub.remember_listener(hit.inode, advert)
            return Acceptor(sock, None, advert, False, None)
        if device.kind == "daemon" and sock.getsockname()[1]:
            advert = await loop.run_in_executor(device_pool(), device.find_remote_listener, sock,
                                                host, port)
            if advert is not None:
                return Acceptor(sock, None, advert, True, None)
        if not sock.getsockname()[1] and is_local(host) and not local_addr:
            # bound_socket gave up: every port it tried carries a 4-tuple in use
            return Acceptor(sock, None, None, False, R.NO_PORT)
        return Acceptor(sock, None, None, False, R.PEER_NOT_ADVERTISED)
    except BaseException:
        sock.close()
        raise


# --------------------------------------------------------------------------- server side

def advertise(server: Any, hub: Hub, allowed: Any = None) -> Any:
    """Advertise ``server``'s listening sockets on the hub's device until ``server.close()``.

    ``allowed``: the file descriptors of the sockets to advertise (None: all of them; the
    acceleration policy keeps the others on TCP).

    Returns the server itself (asyncio's Server, whose ``close`` is patched on the instance) or,
    for a server class that cannot be patched (uvloop's), a ``ServerProxy`` around it.
    """
    device = hub.device
    entries = []
    waiting: list[Any] = []         # not listening yet (start_serving=False): at start_serving()
    closed = False

    def advertise_all(socks: Any) -> None:
        for sock in socks:
            if allowed is not None and sock.fileno() not in allowed:
                continue
            try:
                handle = device.advertise(sock, hub.id)
            except Exception as exc:  # noqa: BLE001 - no advertisement: clients just stay TCP
                log.debug("smcish: advertising %r failed: %r", sock, exc)
                if not _listening(sock):
                    waiting.append(sock)
                continue
            inode = sockets.socket_inode(sock)
            hub.add_listener(inode)
            entries.append((handle, inode))

    def serving() -> None:
        if waiting and not closed:
            socks = list(waiting)
            waiting.clear()
            advertise_all(socks)

    advertise_all(server.sockets)

    def withdraw() -> None:
        nonlocal closed
        closed = True
        waiting.clear()
        while entries:
            handle, inode = entries.pop()
            hub.remove_listener(inode)
            try:
                device.withdraw(handle)
            except Exception as exc:  # noqa: BLE001
                log.debug("smcish: withdraw failed: %r", exc)

    orig_close = server.close
    orig_start = server.start_serving
    orig_forever = server.serve_forever

    def close() -> None:
        withdraw()
        orig_close()

    async def start_serving() -> None:
        await orig_start()
        serving()

    async def serve_forever() -> None:
        if waiting:
            # serve_forever() starts listening before its first await: advertise right after.
            server.get_loop().call_soon(serving)
        await orig_forever()

    try:
        server.close = close
        server.start_serving = start_serving
        server.serve_forever = serve_forever
        return server
    except (AttributeError, TypeError):
        return ServerProxy(server, withdraw, serving, bool(waiting))


def _listening(sock: Any) -> bool:
    try:
        return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        return False


class ServerProxy(asyncio.AbstractServer):
    """A server whose class cannot be patched (uvloop's), with ``close()`` withdrawing first.

    Every attribute and method not defined here is the wrapped server's.
    """

    def __init__(self, server: Any, withdraw: Any, serving: Any = None, waiting: bool = False) -> None:
        self._server = server
        self._withdraw = withdraw
        self._serving = serving
        self._waiting = waiting

    def close(self) -> None:
        self._withdraw()
        self._server.close()

    def get_loop(self) -> Any:
        return self._server.get_loop()

    def is_serving(self) -> bool:
        serving: bool = self._server.is_serving()
        return serving

    async def start_serving(self) -> None:
        await self._server.start_serving()
        if self._serving is not None:
            self._serving()

    async def serve_forever(self) -> None:
        if self._serving is not None and self._waiting:
            self._server.get_loop().call_soon(self._serving)
        try:
            await self._server.serve_forever()
        finally:
            # A second serve_forever() fails at once and leaves the server serving: keep the
            # advertisement then; withdraw when serving ended (cancelled, closed).
            if not self._server.is_serving():
                self._withdraw()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()

    @property
    def sockets(self) -> Any:
        return self._server.sockets

    async def __aenter__(self) -> ServerProxy:
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()
        await self.wait_closed()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._server, name)

    def __repr__(self) -> str:
        return f"<smcish ServerProxy {self._server!r}>"
