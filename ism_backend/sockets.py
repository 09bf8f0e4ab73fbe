"""Socket facts and the kernel oracle: which socket of a network namespace receives a TCP 4-tuple.

``Diag.lookup`` asks the kernel itself, through ``NETLINK_SOCK_DIAG`` with an *exact*
``inet_diag_req_v2`` (not a dump): the kernel runs its receive-side lookup
(``inet_diag_find_one_icsk`` -> ``inet_lookup``: established and time-wait sockets first, then
listeners with their v6only, specific-over-wildcard, SO_REUSEPORT-by-hash and sk_lookup rules)
and describes the socket a segment from ``remote`` to ``local`` would reach: state, inode, uid.
An address match ("is something advertised at this host:port?") cannot be made exact (v6only,
several addresses per name, stale and forged records all misdirected it); this can. No
privilege is needed; a lookup costs about 7 us from Python (docs/device.md, "Measured costs").

Namespace facts come from ioctls: ``SIOCGSKNS`` (the network namespace of a socket; needs
CAP_NET_ADMIN over it, so unprivileged callers get None) and ``NS_GET_USERNS`` (the user
namespace that owns a namespace). ``diag_in_netns`` builds a diag socket inside another network
namespace from a short-lived helper thread that ``setns()``s (through ctypes: Python 3.11 has
no ``os.setns``); a netlink socket stays bound to the namespace it was created in.

``Diag.is_local`` (NETLINK_ROUTE, the answer of ``ip route get``: a ``local`` route) completes
the oracle: the socket lookup matches a wildcard listener whatever the destination address,
but a segment sent to an address the namespace does not own never reaches it.
"""

from __future__ import annotations

import atexit
import ctypes
import errno
import fcntl
import functools
import ipaddress
import os
import select
import socket
import struct
import threading
import weakref
from typing import NamedTuple, TypedDict

__all__ = [
    "TCP_CLOSE", "TCP_CLOSE_WAIT", "TCP_CLOSING", "TCP_ESTABLISHED", "TCP_FIN_WAIT1",
    "TCP_FIN_WAIT2", "TCP_LAST_ACK", "TCP_LISTEN", "TCP_NEW_SYN_RECV", "TCP_SYN_RECV",
    "TCP_SYN_SENT", "TCP_TIME_WAIT", "Diag", "DiagHit", "ListenerFacts", "diag", "diag_in_netns",
    "listener_facts", "netns_inode", "netns_owner", "normalize_address", "own_userns",
    "route_source", "socket_inode", "socket_netns", "socket_netns_fd",
]

# include/net/tcp_states.h
TCP_ESTABLISHED = 1
TCP_SYN_SENT = 2
TCP_SYN_RECV = 3
TCP_FIN_WAIT1 = 4
TCP_FIN_WAIT2 = 5
TCP_TIME_WAIT = 6
TCP_CLOSE = 7
TCP_CLOSE_WAIT = 8
TCP_LAST_ACK = 9
TCP_LISTEN = 10
TCP_CLOSING = 11
TCP_NEW_SYN_RECV = 12

SIOCGSKNS = 0x894C          # linux/sockios.h: fd of the socket's network namespace
NS_GET_USERNS = 0xB701      # linux/nsfs.h _IO(0xb7, 0x1): fd of the owning user namespace
CLONE_NEWNET = 0x40000000
SO_DOMAIN = getattr(socket, "SO_DOMAIN", 39)
SO_PROTOCOL = getattr(socket, "SO_PROTOCOL", 38)
SO_ACCEPTCONN = getattr(socket, "SO_ACCEPTCONN", 30)

NETLINK_ROUTE = 0
NETLINK_SOCK_DIAG = 4
RTM_NEWROUTE = 24
RTM_GETROUTE = 26
RTN_LOCAL = 2
RTA_DST = 1
SOCK_DIAG_BY_FAMILY = 20
NLMSG_ERROR = 2
NLM_F_REQUEST = 1
INET_DIAG_NOCOOKIE = 0xFFFFFFFF

# nlmsghdr (len, type, flags, seq, pid) + inet_diag_req_v2 (family, protocol, ext, pad, states)
# + inet_diag_sockid (sport, dport big-endian; src, dst 16 bytes each; if; cookie[2]).
_REQUEST = struct.Struct("=IHHII BBBBI 2s2s16s16s III")
# nlmsghdr + inet_diag_msg (family, state, timer, retrans, sockid, expires, rqueue, wqueue,
# uid, inode); attributes may follow (INET_DIAG_SHUTDOWN is always appended): ignored.
_REPLY = struct.Struct("=IHHII BBBB 2s2s16s16s III IIIII")
_NLMSG_ERR = struct.Struct("=IHHIIi")
# nlmsghdr + rtmsg (family, dst_len, src_len, tos, table, protocol, scope, type, flags) + the
# RTA_DST attribute header; the address follows.
_ROUTE_REQUEST = struct.Struct("=IHHII BBBBBBBBI HH")
_RTM_TYPE_OFFSET = 16 + 7
_RECV_SIZE = 8192


def socket_inode(sock: socket.socket | int) -> int:
    """The socket's inode number (``fstat(fileno).st_ino``): names it host-wide while it lives."""
    fd = sock if isinstance(sock, int) else sock.fileno()
    return os.fstat(fd).st_ino


def normalize_address(address: str) -> tuple[int, str]:
    """``(family, canonical text)`` of an address literal; v4-mapped IPv6 becomes IPv4.

    A zone (``fe80::1%eth0``) is kept on the text. Raises ValueError for a name or garbage.
    """
    text, _, zone = address.partition("%")
    ip = ipaddress.ip_address(text)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return socket.AF_INET, str(ip.ipv4_mapped)
    if ip.version == 4:
        return socket.AF_INET, str(ip)
    return socket.AF_INET6, str(ip) + (f"%{zone}" if zone else "")


class ListenerFacts(NamedTuple):
    """What a listening socket is, read from the socket itself."""

    family: int
    addr: str
    port: int
    v6only: bool
    inode: int
    netns: int | None


def listener_facts(sock: socket.socket) -> ListenerFacts:
    """Read a listening TCP socket's facts (``netns`` is None where SIOCGSKNS is refused).

    Raises:
        ValueError: not a listening SOCK_STREAM TCP socket of AF_INET/AF_INET6 (SO_ACCEPTCONN).
    """
    try:
        family = sock.getsockopt(socket.SOL_SOCKET, SO_DOMAIN)
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        if family not in (socket.AF_INET, socket.AF_INET6) or kind != socket.SOCK_STREAM:
            raise ValueError("not a TCP socket (AF_INET/AF_INET6, SOCK_STREAM)")
        if sock.getsockopt(socket.SOL_SOCKET, SO_PROTOCOL) != socket.IPPROTO_TCP:
            raise ValueError("not a TCP socket")
        if not sock.getsockopt(socket.SOL_SOCKET, SO_ACCEPTCONN):
            raise ValueError("not listening (call listen() first)")
        name = sock.getsockname()
        v6only = bool(family == socket.AF_INET6
                      and sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
        inode = socket_inode(sock)
    except OSError as exc:
        raise ValueError(f"not a usable socket ({exc.strerror or exc})") from None
    return ListenerFacts(family, name[0], name[1], v6only, inode, socket_netns(sock))


class DiagHit(NamedTuple):
    """The socket the kernel's lookup names: TCP state, inode (0 for TIME_WAIT), uid, cookie."""

    state: int
    inode: int
    uid: int
    cookie: int


_V4_MAPPED = bytes(10) + b"\xff\xff"


@functools.lru_cache(maxsize=1024)
def _packed(address: str) -> tuple[int, bytes, int]:
    """(family, 16-byte packed address, ifindex) of a literal; v4-mapped IPv6 folds to IPv4."""
    text, _, zone = address.partition("%")
    try:
        return socket.AF_INET, socket.inet_pton(socket.AF_INET, text).ljust(16, b"\0"), 0
    except OSError:
        pass
    try:
        packed = socket.inet_pton(socket.AF_INET6, text)
    except OSError:
        raise ValueError(f"not an IP address literal: {address!r}") from None
    if packed.startswith(_V4_MAPPED):
        return socket.AF_INET, packed[12:].ljust(16, b"\0"), 0
    try:
        ifindex = int(zone) if zone.isdigit() else (socket.if_nametoindex(zone) if zone else 0)
    except OSError:
        raise ValueError(f"unknown interface in {address!r}") from None
    return socket.AF_INET6, packed, ifindex


def _new_diag_sockets() -> tuple[socket.socket, socket.socket]:
    # Blocking: the kernel answers these requests synchronously, inside send(); the lookups
    # receive with MSG_DONTWAIT and only poll (bounded) if an answer were ever late.
    diag_sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                              NETLINK_SOCK_DIAG)
    try:
        route_sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC,
                                   NETLINK_ROUTE)
    except BaseException:
        diag_sock.close()
        raise
    return diag_sock, route_sock


class Diag:
    """The kernel's socket and route lookups of one network namespace: a NETLINK_SOCK_DIAG and
    a NETLINK_ROUTE socket (not thread-safe: use ``diag()``)."""

    def __init__(self, socks: tuple[socket.socket, socket.socket] | None = None) -> None:
        sock, route = socks if socks is not None else _new_diag_sockets()
        self._sock: socket.socket | None = sock
        self._route: socket.socket | None = route
        self._seq = 0
        self._buf = bytearray(_RECV_SIZE)
        self.pid = os.getpid()

    @property
    def closed(self) -> bool:
        """True once ``close()`` ran (``diag()`` then makes a new one)."""
        return self._sock is None

    def _receive(self, sock: socket.socket, seq: int) -> int:
        """Receive the reply to ``seq`` into ``self._buf``; returns its length."""
        for _ in range(8):  # skip stale answers to a request that timed out earlier
            try:
                n = sock.recv_into(self._buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if not select.select([sock], [], [], 1.0)[0]:
                    raise OSError(errno.ETIMEDOUT, "netlink did not answer") from None
                continue
            if n < _NLMSG_ERR.size:
                raise OSError(errno.EPROTO, "short netlink reply")
            if _NLMSG_ERR.unpack_from(self._buf)[3] == seq:
                return n
        raise OSError(errno.EPROTO, "netlink replies out of sequence")

    def is_local(self, address: str) -> bool:
        """Is ``address`` one of this namespace's own (a ``local`` route: RTN_LOCAL)?

        The socket lookup matches a wildcard listener whatever the destination address; a
        segment to an address that is not local never reaches it. Costs about 6 us.

        Raises:
            ValueError: not an address literal. OSError: the socket is closed.
        """
        route = self._route
        if route is None:
            raise OSError(errno.EBADF, "this Diag is closed: use sockets.diag()")
        family, packed, _ = _packed(address)
        raw = packed[:4] if family == socket.AF_INET else packed
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        route.send(_ROUTE_REQUEST.pack(
            _ROUTE_REQUEST.size + len(raw), RTM_GETROUTE, NLM_F_REQUEST, seq, 0,
            family, 8 * len(raw), 0, 0, 0, 0, 0, 0, 0, 4 + len(raw), RTA_DST) + raw)
        n = self._receive(route, seq)
        kind = _NLMSG_ERR.unpack_from(self._buf)[1]
        return kind == RTM_NEWROUTE and n > _RTM_TYPE_OFFSET and \
            self._buf[_RTM_TYPE_OFFSET] == RTN_LOCAL

    def lookup(self, family: int, local: tuple[str, int],
               remote: tuple[str, int]) -> DiagHit | None:
        """The socket of this network namespace that would receive a TCP segment sent from
        ``remote`` to ``local``: the kernel's own lookup (established and time-wait first, then
        listeners with v6only, specific-over-wildcard, SO_REUSEPORT-by-hash).

        Args:
            family: AF_INET or AF_INET6; v4-mapped IPv6 addresses are looked up as AF_INET.
            local: (address literal, port) the segment is sent to.
            remote: (address literal, port) it is sent from.
        Returns:
            The DiagHit, or None when no socket would receive it (ENOENT).
        Raises:
            ValueError: malformed addresses, ports or a family mismatch.
            OSError: any other kernel error (or the socket is closed).
        """
        sock = self._sock
        if sock is None:
            raise OSError(errno.EBADF, "this Diag is closed: use sockets.diag()")
        lfam, src, ifindex = _packed(local[0])
        rfam, dst, _ = _packed(remote[0])
        if lfam != rfam:
            raise ValueError(f"address families differ: {local[0]!r} vs {remote[0]!r}")
        if family != lfam and (family != socket.AF_INET6 or lfam != socket.AF_INET):
            raise ValueError(f"family {family!r} does not match {local[0]!r}")
        family = lfam
        lport, rport = local[1], remote[1]
        if type(lport) is not int or type(rport) is not int or not (
                0 <= lport <= 65535 and 0 <= rport <= 65535):
            raise ValueError("ports must be ints in 0..65535")
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        request = _REQUEST.pack(
            _REQUEST.size, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, seq, 0,
            family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF,
            lport.to_bytes(2, "big"), rport.to_bytes(2, "big"), src, dst, ifindex,
            INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
        sock.send(request)
        n = self._receive(sock, seq)
        _, kind, _, _, _, err = _NLMSG_ERR.unpack_from(self._buf)
        if kind == NLMSG_ERROR:
            if err == -errno.ENOENT:
                return None
            raise OSError(-err, f"sock_diag: {os.strerror(-err)}")
        if kind != SOCK_DIAG_BY_FAMILY or n < _REPLY.size:
            raise OSError(errno.EPROTO, f"unexpected sock_diag reply type {kind}")
        fields = _REPLY.unpack_from(self._buf)
        state, cookie0, cookie1, uid, inode = (fields[6], fields[14], fields[15], fields[19],
                                               fields[20])
        return DiagHit(state, inode, uid, cookie0 | (cookie1 << 32))

    def close(self) -> None:
        """Close the netlink sockets (idempotent)."""
        sock, self._sock = self._sock, None
        route, self._route = self._route, None
        for s in (sock, route):
            if s is not None:
                s.close()

    def __repr__(self) -> str:
        return f"<Diag {'closed' if self.closed else 'open'}>"


_local = threading.local()
_all_diags: weakref.WeakSet[Diag] = weakref.WeakSet()


def diag() -> Diag:
    """This thread's Diag for the current network namespace (recreated after fork or close).

    A forked child never uses its parent's netlink socket (replies would interleave).
    """
    current: Diag | None = getattr(_local, "diag", None)
    if current is not None and not current.closed and current.pid == os.getpid():
        return current
    if current is not None and current.pid != os.getpid():
        current.close()  # our copy of the parent's socket: closing it leaves the parent's open
    current = _local.diag = Diag()
    _all_diags.add(current)
    return current


def _close_diags() -> None:
    """At exit: close every thread's netlink sockets (no ResourceWarning, no fd left behind)."""
    for d in list(_all_diags):
        if d.pid == os.getpid():
            d.close()


atexit.register(_close_diags)


# --- namespaces ---------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def _setns(fd: int, nstype: int) -> None:
    if _libc.setns(fd, nstype) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"setns: {os.strerror(code)}")


def netns_inode(pid: str | int = "self") -> int | None:
    """Inode of a process's network namespace (``/proc/<pid>/ns/net``), None if unreadable."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def socket_netns_fd(sock: socket.socket | int) -> int | None:
    """A new fd (close-on-exec) of the socket's network namespace; None if refused (SIOCGSKNS
    needs CAP_NET_ADMIN over that namespace) or unsupported."""
    fd = sock if isinstance(sock, int) else sock.fileno()
    try:
        return fcntl.ioctl(fd, SIOCGSKNS)
    except OSError:
        return None


def socket_netns(sock: socket.socket | int) -> int | None:
    """Inode of the socket's network namespace, None where SIOCGSKNS is refused."""
    fd = socket_netns_fd(sock)
    if fd is None:
        return None
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


def netns_owner(ns_fd: int) -> int | None:
    """Inode of the user namespace that owns the namespace ``ns_fd`` (NS_GET_USERNS), or None."""
    try:
        user_fd = fcntl.ioctl(ns_fd, NS_GET_USERNS)
    except OSError:
        return None
    try:
        return os.fstat(user_fd).st_ino
    finally:
        os.close(user_fd)


def own_userns() -> int | None:
    """Inode of this process's user namespace."""
    try:
        return os.stat("/proc/self/ns/user").st_ino
    except OSError:
        return None


class _SetnsResult(TypedDict, total=False):
    socks: tuple[socket.socket, socket.socket]
    error: OSError


def diag_in_netns(ns_fd: int, timeout: float = 5.0) -> Diag:
    """A Diag whose netlink sockets live in the network namespace ``ns_fd``.

    A helper thread ``setns(CLONE_NEWNET)``s into it, creates the socket, switches back and
    exits (a thread's namespace is its own: the caller's is never touched).

    Raises:
        OSError: setns refused (needs CAP_SYS_ADMIN over the namespace) or the thread hung.
    """
    result: _SetnsResult = {}

    def run() -> None:
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(ns_fd, CLONE_NEWNET)
                try:
                    result["socks"] = _new_diag_sockets()
                finally:
                    _setns(own, CLONE_NEWNET)
            finally:
                os.close(own)
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, name="ism-setns", daemon=True)
    thread.start()
    thread.join(timeout)
    if "socks" in result:
        return Diag(result["socks"])
    error = result.get("error")
    if isinstance(error, OSError):
        raise error
    raise OSError(errno.ETIMEDOUT, "creating a diag socket in another namespace hung")


def route_source(family: int, addr: str) -> str | None:
    """The source address the kernel would use toward ``addr`` (a UDP connect() probe, no packet
    is sent), or None on any error (no route, bad address)."""
    probe = None
    try:
        probe = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        probe.connect((addr, 9))
        source: str = probe.getsockname()[0]  # (host, port[, flowinfo, scope_id]) of AF_INET*
        return source
    except (OSError, ValueError, OverflowError):
        return None
    finally:
        if probe is not None:
            probe.close()
