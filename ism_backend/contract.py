"""The ISM device contract v2: the types and the ``Device`` interface every implementation fulfils.

Authoritative for docs/design.md section 5 and docs/device.md. Implementations: ``embedded.py``
(in-process, the default), ``client.py`` (``DaemonDevice``, a client of ismd) and
``factory.NoneDevice`` (TCP only). Nothing here does I/O except ``Region.ring``/``drain``.

Discovery is socket-bound: a listener is advertised by passing the listening socket itself (the
device reads its inode, address and namespace), and found again by the inode the kernel's own
socket lookup (``sockets.Diag``) named. Peer messaging (``set_endpoint_handler``,
``peer_request``) is the channel link groups are opened and grown over; its ops and fields are
declared in ``proto.PEER_OPS``.
"""

from __future__ import annotations

import abc
import mmap
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import PermissionDenied, UnknownToken

__all__ = [
    "ACCESS_MODES", "DEFAULT_TIMEOUT", "ID_SIZE", "MAX_REGION_SIZE", "TOKEN_SIZE", "ZERO_ID",
    "Advert", "Device", "EndpointHandler", "Handle", "PeerInfo", "Region", "check_id",
    "check_read_access", "check_size", "check_token",
]

TOKEN_SIZE = 16
ID_SIZE = 16
ZERO_ID = bytes(ID_SIZE)
ACCESS_MODES = ("r", "rw")
#: Largest region any device hands out (the ring's largest block is 1 GiB, plus headers).
MAX_REGION_SIZE = (1 << 30) + (1 << 20)
#: Bound in seconds on every blocking device request (attach, peer_request, ismd round trips).
DEFAULT_TIMEOUT = 2.0


# --- validators (shared by every implementation) ---------------------------------------------

def check_size(size: int) -> int:
    """A region size: an int in ``1..MAX_REGION_SIZE``.

    Raises:
        ValueError: anything else.
    """
    if type(size) is not int or not 0 < size <= MAX_REGION_SIZE:
        raise ValueError(f"region size must be an int in 1..{MAX_REGION_SIZE}, got {size!r}")
    return size


def check_token(token: bytes) -> bytes:
    """A region token: exactly ``TOKEN_SIZE`` bytes.

    Raises:
        UnknownToken: malformed (a wrong token names nothing, whatever its shape).
    """
    if not isinstance(token, (bytes, bytearray)) or len(token) != TOKEN_SIZE:
        raise UnknownToken(f"a region token is {TOKEN_SIZE} bytes: this one is malformed")
    return bytes(token)


def check_id(value: bytes, what: str = "endpoint id") -> bytes:
    """An endpoint, hub or group id: exactly ``ID_SIZE`` bytes.

    Raises:
        ValueError: anything else.
    """
    if not isinstance(value, (bytes, bytearray)) or len(value) != ID_SIZE:
        raise ValueError(f"an {what} is {ID_SIZE} bytes, got {value!r:.40}")
    return bytes(value)


def check_read_access(access: str) -> None:
    """Only read-only attaches exist.

    Raises:
        PermissionDenied: ``"rw"`` (regions are sealed F_SEAL_FUTURE_WRITE).
        ValueError: anything but ``"r"``/``"rw"``.
    """
    if access == "rw":
        raise PermissionDenied("writable attach is not supported: regions are sealed "
                               "F_SEAL_FUTURE_WRITE, each side writes only its own region")
    if access != "r":
        raise ValueError(f"access must be 'r' (or 'rw', refused), got {access!r}")


# --- value types --------------------------------------------------------------------------------

class Region:
    """One mapping of a region: ``fd + offset + size`` mapped into this process.

    Attributes:
        token: 16 random bytes naming the region (``b""`` once freed/detached).
        size: bytes of the mapping.
        access: ``"rw"`` for the owner, ``"r"`` for an attacher.
        mem: the ``mmap`` (buffer protocol). Writable for the owner; a ``PROT_READ`` mapping for an
            attacher, so writes through it raise ``TypeError``. ``None`` after free/detach.
        doorbell_fd: owner: its eventfd to wait on (``loop.add_reader``); attacher: the owner's
            eventfd, to write to (``ring()``) after publishing.
        fd: the memory file descriptor; offset: where the region starts in it.
    """

    __slots__ = ("__weakref__", "_device", "_handle", "access", "doorbell_fd", "fd", "mem",
                 "offset", "size", "token")

    def __init__(self, token: bytes, size: int, access: str, mem: mmap.mmap, doorbell_fd: int,
                 fd: int, offset: int, device: Device | None = None, handle: Any = None) -> None:
        self.token = token
        self.size = size
        self.access = access
        self.mem: mmap.mmap | None = mem
        self.doorbell_fd = doorbell_fd
        self.fd = fd
        self.offset = offset
        self._device = device
        self._handle = handle

    @property
    def closed(self) -> bool:
        """True once the region was freed (owner) or detached (attacher)."""
        return self.mem is None

    def ring(self) -> None:
        """Ring the doorbell: add 1 to ``doorbell_fd`` (a saturated counter is already rung)."""
        try:
            os.eventfd_write(self.doorbell_fd, 1)
        except BlockingIOError:
            pass

    def drain(self) -> int:
        """Consume pending doorbell rings (owner side, non-blocking); returns the count read."""
        try:
            return os.eventfd_read(self.doorbell_fd)
        except BlockingIOError:
            return 0

    def __repr__(self) -> str:
        # Never print the token: it is a capability.
        state = "closed" if self.closed else "mapped"
        return f"<Region {self.access} size={self.size} fd={self.fd} {state}>"


class Handle:
    """A registration (an advertisement) to pass back to ``withdraw``.

    Attributes:
        kind: what it registers (``"advert"``).
        value: implementation data; device: the device that issued it; active: False once
            withdrawn.
    """

    __slots__ = ("active", "device", "kind", "value")

    def __init__(self, kind: str, value: Any, device: Device | None) -> None:
        self.kind = kind
        self.value = value
        self.device = device
        self.active = True

    def __repr__(self) -> str:
        return f"<Handle {self.kind} {'active' if self.active else 'released'}>"


@dataclass(frozen=True)
class Advert:
    """Who advertised a listener socket: the process's endpoint, its hub, and its credentials.

    ``pid``/``uid`` are what the device knows for sure (SO_PEERCRED through ismd, our own for the
    embedded device); ``endpoint_id`` and ``hub_id`` are what that process stated.
    """

    endpoint_id: bytes
    hub_id: bytes
    pid: int
    uid: int


@dataclass(frozen=True)
class PeerInfo:
    """The process on the other side of a peer channel, as the device established it.

    ``pid``/``uid``/``gid`` are Unix credentials (SO_PEERCRED; through ismd, as ismd saw them),
    ``gid`` being the primary Unix group (not the device's sharing-domain ``Device.gid``);
    ``endpoint_id`` is the peer's device endpoint, to answer it with ``peer_request``.
    """

    endpoint_id: bytes
    pid: int
    uid: int
    gid: int


class EndpointHandler(Protocol):
    """What ``Device.set_endpoint_handler`` takes (smcish's hub registry implements it)."""

    def handle(self, peer: PeerInfo, op: str, fields: dict[str, Any]) -> dict[str, Any]:
        """Serve one peer op (``proto.PEER_OPS``); raise an IsmError subclass to refuse."""

    # Optional: ``peer_gone(peer: PeerInfo) -> None``, called once the last channel from that
    # peer closed (its process exited or closed its device).


# --- the interface ------------------------------------------------------------------------------

class Device(abc.ABC):
    """The device interface. See docs/device.md for the semantics of each operation.

    Attributes:
        kind: ``"embedded"`` | ``"daemon"`` | ``"none"``.
        gid: 16 bytes, the sharing domain; peers share memory only under the same gid.
        endpoint_id: 16 random bytes naming this device's endpoint (peers attach our regions and
            send us peer requests through it); zero bytes for ``none``.
        available: False for ``none`` and for a device that is closed or gone.
    """

    kind: str = "abstract"
    gid: bytes = ZERO_ID
    endpoint_id: bytes = ZERO_ID

    @property
    def available(self) -> bool:
        """False for ``none`` and for a device that is closed or whose daemon went away."""
        return False

    # --- regions ---

    @abc.abstractmethod
    def alloc(self, size: int) -> Region:
        """Allocate a region of ``size`` bytes, writable by us.

        Returns:
            A Region with a fresh random token, zeroed memory and its own doorbell.
        Raises:
            NoDevice, QuotaExceeded, DeviceGone, ValueError (size out of range).
        """

    @abc.abstractmethod
    def attach(self, token: bytes, endpoint_id: bytes, access: str = "r") -> Region:
        """Map the region ``token`` of the process whose endpoint is ``endpoint_id``, read-only.

        The first attacher of a token that passes the uid policy gets it (one-shot); later ones
        need a ``grant``. Blocks at most the device timeout.

        Raises:
            UnknownToken, PermissionDenied, DeviceGone, DeviceProtocolError, NoDevice.
        """

    @abc.abstractmethod
    def detach(self, region: Region) -> None:
        """Unmap an attached region, close its fds and tell the owner side.

        Raises:
            ValueError: not a region attached by this device, or already detached.
        """

    @abc.abstractmethod
    def free(self, region: Region, written: int | None = None) -> None:
        """Owner: the token is invalid at once; memory is reused only when nobody maps it.

        Args:
            written: how many leading bytes of the region we ever wrote (a hint; the pool zeroes
                only those before reuse); None means all of it.
        Raises:
            ValueError: not a region allocated by this device, or already freed.
        """

    @abc.abstractmethod
    def grant(self, token: bytes, uid: int, access: str = "r") -> None:
        """Allow ``uid`` to attach ``token`` (beyond the one-shot first attacher).

        Raises:
            UnknownToken (not our live token), PermissionDenied (``access="rw"``).
        """

    @abc.abstractmethod
    def revoke(self, token: bytes, uid: int) -> None:
        """Refuse future attaches of ``token`` by ``uid`` (existing mappings stay).

        Raises:
            UnknownToken: not our live token.
        """

    # --- socket-bound discovery ---

    @abc.abstractmethod
    def advertise(self, sock: socket.socket, hub_id: bytes) -> Handle:
        """Record that the hub ``hub_id`` of this process serves the listening socket ``sock``.

        The device reads the socket's facts itself (inode, address, port, v6only, namespace);
        through ismd the socket travels with SCM_RIGHTS, so a process can advertise only sockets
        it holds.

        Args:
            sock: a listening TCP socket (AF_INET/AF_INET6) of the caller.
            hub_id: 16 bytes naming the advertising hub.
        Returns:
            A Handle for ``withdraw``.
        Raises:
            ValueError: ``sock`` is not a listening TCP socket, or a malformed hub id.
            PermissionDenied, QuotaExceeded, DeviceGone: the device refused or is gone.
        """

    @abc.abstractmethod
    def withdraw(self, handle: Handle) -> None:
        """Remove an advertisement (idempotent; never raises a device error).

        Raises:
            ValueError: not a handle issued by this device's ``advertise``.
        """

    @abc.abstractmethod
    def find_listener(self, inode: int) -> Advert | None:
        """Who advertised the listener socket with this inode.

        Returns:
            The live advertiser's Advert, or None (nobody alive advertised it, or the device
            could not answer: never an error, the caller stays plain TCP).
        Raises:
            ValueError: ``inode`` is not a positive int.
        """

    def find_remote_listener(self, sock: socket.socket, host: str, port: int) -> Advert | None:
        """ismd only: which advertised listener of *another* network namespace receives
        ``sock``'s connection to ``(host, port)`` (docs/design.md section 3.4).

        Args:
            sock: the caller's bound, not yet connected TCP socket; ismd keeps a copy as a
                *remote claim* until ``verify_remote_peer`` succeeds, ``release_remote_claim``,
                or the caller's device connection closes.
            host: the destination address literal; port: the destination port.
        Returns:
            The Advert, or None (not found, ambiguous, policy, unsupported: stay plain TCP).
        """
        return None

    def verify_remote_peer(self, sock: socket.socket, inode: int, endpoint_id: bytes) -> bool:
        """ismd only: is the peer of the accepted socket ``sock`` the socket of a remote claim
        with inode ``inode`` that the endpoint ``endpoint_id`` made (reversed 4-tuples equal,
        namespaces owned by ismd's user namespace)? The endpoint is the link-group peer whose
        claim names that inode: a claim posted in another group (a hostile process naming
        somebody else's socket) is not this one's. A successful verification releases the claim.

        Returns:
            True only when proven; False otherwise (and for embedded/none devices).
        """
        return False

    def release_remote_claim(self, inode: int) -> None:  # noqa: B027 - optional: a no-op but for ismd
        """ismd only: drop our remote claim for socket inode ``inode`` (idempotent)."""

    # --- peer messaging ---

    @abc.abstractmethod
    def set_endpoint_handler(self, handler: EndpointHandler | None) -> None:
        """Serve peer ops (``proto.PEER_OPS``) arriving at our endpoint with ``handler``.

        ``handler.handle(peer, op, fields) -> dict`` and the optional ``handler.peer_gone(peer)``
        are called on the device's handler thread, one call at a time, never on the thread
        that serves attach/detach (so a handler that blocks cannot deadlock two processes that
        open groups toward each other). Without a handler, peers get
        ``IsmError("no smcish hub in this process")``.
        """

    @abc.abstractmethod
    def peer_request(self, endpoint_id: bytes, op: str, **fields: Any) -> dict[str, Any]:
        """Send one peer op to the process whose endpoint is ``endpoint_id``, wait for its reply.

        Returns:
            The reply fields, validated against ``proto.PEER_OPS`` (binary fields as bytes).
        Raises:
            ValueError: unknown op or invalid fields (nothing was sent).
            DeviceGone: the peer is unreachable or did not answer within the device timeout.
            IsmError subclasses: the peer's handler refused.
            NoDevice: the none device.
        """

    @abc.abstractmethod
    def peer_alive(self, endpoint_id: bytes) -> bool:
        """Is the process with this endpoint alive, as far as cheaply known (no round trip)?"""

    # --- introspection, lifetime ---

    @abc.abstractmethod
    def set_info_provider(self, fn: Callable[[], list[dict[str, Any]]] | None) -> None:
        """``fn()`` returns this process's live connections (called from a device thread)."""

    @abc.abstractmethod
    def peers_info(self) -> list[dict[str, Any]]:
        """Every reachable process's connections (embedded) or ismd's status (daemon)."""

    @abc.abstractmethod
    def status(self) -> dict[str, Any]:
        """This device's state as a JSON-able dict (tokens are never shown)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release everything (idempotent). Regions still mapped stay readable for their holders."""

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
