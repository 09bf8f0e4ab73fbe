"""The ISM device interface: Region, Device, the typed errors, and device selection.

This module is the contract the transport is written against (docs/design.md section 2,
docs/device.md). Implementations live in ``embedded.py`` (in-process device, the default),
``client.py`` (a client of the ``ismd`` host daemon) and here (``NoneDevice``: TCP only).
"""

from __future__ import annotations

import atexit
import functools
import ipaddress
import os
import threading
import weakref
from typing import Any, Callable

__all__ = [
    "IsmError", "NoDevice", "PermissionDenied", "UnknownToken", "QuotaExceeded", "DeviceGone",
    "DeviceProtocolError", "Region", "Device", "NoneDevice", "open_device", "get_device",
    "TOKEN_SIZE", "ID_SIZE", "ACCESS_MODES",
]

TOKEN_SIZE = 16
ID_SIZE = 16
ZERO_ID = bytes(ID_SIZE)
ACCESS_MODES = ("r", "rw")
# Largest region any device hands out (the ring's MAX_CAPACITY is 1 GiB plus a header).
MAX_REGION_SIZE = (1 << 30) + (1 << 20)
# Bound on every blocking device request (attach, alloc through ismd, ...).
DEFAULT_TIMEOUT = 2.0


@functools.lru_cache(maxsize=4096)
def normalize_host(host: str) -> str:
    """Canonical text of an address for advertisement/intent matching.

    IPv4-mapped IPv6 addresses become IPv4 (a dual-stack socket reports ``::ffff:a.b.c.d``),
    brackets and zone ids are dropped, names are lower-cased, ``""`` means ``0.0.0.0``.
    """
    text = host.strip().lower()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text:
        return "0.0.0.0"
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return text
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


@functools.lru_cache(maxsize=4096)
def listener_keys(host: str) -> tuple[str, ...]:
    """Advertised hosts that serve a connection to ``host``: itself and the wildcards."""
    exact = normalize_host(host)
    keys = [exact]
    if ":" not in exact:  # IPv4 or a name: 0.0.0.0, and :: (dual-stack listeners)
        keys.append("0.0.0.0")
    keys.append("::")
    return tuple(dict.fromkeys(keys))


class IsmError(Exception):
    """Base class of every ISM device error; the message says what to do about it."""


class NoDevice(IsmError):
    """No usable ISM device (none configured, ismd not running, unsafe runtime directory)."""


class PermissionDenied(IsmError):
    """The device refused: uid/gid policy, a token claimed by another peer, a revoked grant."""


class UnknownToken(IsmError):
    """The token names no live region (wrong, or freed by its owner)."""


class QuotaExceeded(IsmError):
    """ismd refused an allocation: per-uid quota or total device memory exhausted."""


class DeviceGone(IsmError):
    """The device (ismd or a peer's embedded endpoint) went away or did not answer in time."""


class DeviceProtocolError(IsmError):
    """The other side of a control connection sent something malformed or inconsistent."""


# Error names that may cross the control protocol; anything else decodes as DeviceProtocolError.
ERRORS: dict[str, type[IsmError]] = {
    cls.__name__: cls
    for cls in (IsmError, NoDevice, PermissionDenied, UnknownToken, QuotaExceeded, DeviceGone,
                DeviceProtocolError)
}


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

    __slots__ = ("token", "size", "access", "mem", "doorbell_fd", "fd", "offset", "_device",
                 "_handle", "__weakref__")

    def __init__(self, token: bytes, size: int, access: str, mem: Any, doorbell_fd: int, fd: int,
                 offset: int, device: "Device | None" = None, handle: Any = None) -> None:
        self.token = token
        self.size = size
        self.access = access
        self.mem = mem
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


class Device:
    """The device interface. See docs/device.md for the full semantics of each operation.

    Attributes:
        kind: ``"embedded"`` | ``"daemon"`` | ``"none"``.
        gid: 16 bytes, the sharing domain; peers share memory only under the same gid.
        endpoint_id: 16 bytes a peer needs (with a token) to attach; zero bytes for ismd.
        available: False for ``none`` and for a device that is closed or gone.
    """

    kind: str = "abstract"
    gid: bytes = ZERO_ID
    endpoint_id: bytes = ZERO_ID

    @property
    def available(self) -> bool:
        return False

    def alloc(self, size: int) -> Region:
        """Allocate a region of ``size`` bytes, writable by us.

        Returns:
            A Region with a fresh random token, zeroed memory and its own doorbell.
        Raises:
            NoDevice, QuotaExceeded, DeviceGone, ValueError (size out of range).
        """
        raise NotImplementedError

    def attach(self, token: bytes, endpoint_id: bytes, access: str = "r") -> Region:
        """Map a peer's region read-only. Blocks at most about 2 s.

        Raises:
            UnknownToken, PermissionDenied, DeviceGone, DeviceProtocolError, NoDevice.
        """
        raise NotImplementedError

    def detach(self, region: Region) -> None:
        """Unmap an attached region, close its fds and tell the owner side."""
        raise NotImplementedError

    def free(self, region: Region, written: int | None = None) -> None:
        """Owner: the token is invalid at once; memory is reused only when nobody maps it.

        Args:
            written: how many leading bytes of the region we ever wrote (a hint from the ring:
                header + bytes published, capped at the region size). The pool zeroes only
                those before reuse; None means all of it.
        """
        raise NotImplementedError

    def grant(self, token: bytes, uid: int, access: str = "r") -> None:
        """Allow ``uid`` to attach ``token`` (beyond the one-shot first attacher)."""
        raise NotImplementedError

    def revoke(self, token: bytes, uid: int) -> None:
        """Refuse future attaches of ``token`` by ``uid`` (existing mappings stay: see docs)."""
        raise NotImplementedError

    def advertise(self, host: str, port: int) -> object:
        """Register a live smcish listener at (host, port); returns a handle for ``withdraw``."""
        raise NotImplementedError

    def withdraw(self, handle: object) -> None:
        raise NotImplementedError

    def lookup(self, host: str, port: int) -> bool:
        """Is a live smcish listener advertised at (host, port) or the wildcard address?"""
        raise NotImplementedError

    def add_intent(self, local_port: int, remote_host: str, remote_port: int) -> object:
        """Client side: our socket bound to ``local_port`` is about to propose to the peer."""
        raise NotImplementedError

    def remove_intent(self, handle: object) -> None:
        raise NotImplementedError

    def has_intent(self, peer_port: int, local_host: str, local_port: int) -> bool:
        """Server side: did the client at ``peer_port`` announce a proposal to our sockname?"""
        raise NotImplementedError

    def claim(self, client_port: int, server_host: str, server_port: int,
              role: str) -> object | None:
        """Atomic test-and-set on the connection (client_port -> server_host:server_port).

        An extension of the intent operations, race-free for a client that claims only after
        connecting. ``role="client"``: registers that this client will propose (like
        ``add_intent``) and returns its handle, or None if the server already decided the
        connection is plain TCP. ``role="server"`` (``client_port`` = the peer's port,
        ``server_host/port`` = our sockname): returns None if the client claimed it (it will
        propose), else a handle recording "plain TCP" so that a later client claim gets None;
        such server claims expire by themselves (~60 s) if never released.
        Never raises a device error. Device trouble answers None for both roles: the client
        then does not propose, and the server waits for the client's first bytes (a plain client
        falls back on them, or after the handshake timeout), so handshake bytes never reach an
        application that took the connection for plain TCP.
        """
        raise NotImplementedError

    def release_claim(self, handle: object) -> None:
        """Release a handle returned by ``claim`` (idempotent)."""
        raise NotImplementedError

    def set_info_provider(self, fn: Callable[[], list[dict]] | None) -> None:
        """``fn()`` returns this process's live connections (called from a device thread)."""
        raise NotImplementedError

    def peers_info(self) -> list[dict]:
        raise NotImplementedError

    def status(self) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _NoneHandle:
    __slots__ = ()


class NoneDevice(Device):
    """No device: every connection stays plain TCP."""

    kind = "none"

    def __init__(self) -> None:
        self._info_provider: Callable[[], list[dict]] | None = None

    def _refuse(self) -> NoDevice:
        return NoDevice("no ISM device (SMCISH_DEVICE=none): set SMCISH_DEVICE=embedded or "
                        "unix:/path/to/ismd.sock to enable shared memory")

    def alloc(self, size: int) -> Region:
        raise self._refuse()

    def attach(self, token: bytes, endpoint_id: bytes, access: str = "r") -> Region:
        raise self._refuse()

    def detach(self, region: Region) -> None:
        raise self._refuse()

    def free(self, region: Region, written: int | None = None) -> None:
        raise self._refuse()

    def grant(self, token: bytes, uid: int, access: str = "r") -> None:
        raise self._refuse()

    def revoke(self, token: bytes, uid: int) -> None:
        raise self._refuse()

    def advertise(self, host: str, port: int) -> object:
        return _NoneHandle()

    def withdraw(self, handle: object) -> None:
        pass

    def lookup(self, host: str, port: int) -> bool:
        return False

    def add_intent(self, local_port: int, remote_host: str, remote_port: int) -> object:
        return _NoneHandle()

    def remove_intent(self, handle: object) -> None:
        pass

    def has_intent(self, peer_port: int, local_host: str, local_port: int) -> bool:
        return False

    def claim(self, client_port: int, server_host: str, server_port: int,
              role: str) -> object | None:
        return None if role == "client" else _NoneHandle()

    def release_claim(self, handle: object) -> None:
        pass

    def set_info_provider(self, fn: Callable[[], list[dict]] | None) -> None:
        self._info_provider = fn

    def peers_info(self) -> list[dict]:
        own = self._info_provider() if self._info_provider else []
        return [{"kind": "none", "pid": os.getpid(), "connections": own}]

    def status(self) -> dict:
        return {"kind": "none", "available": False}

    def close(self) -> None:
        pass


# --- selection -----------------------------------------------------------------------------

_lock = threading.Lock()
_cache: dict[tuple, Device] = {}
_all_devices: "weakref.WeakSet[Device]" = weakref.WeakSet()


def _resolve(spec: str | None) -> str:
    if spec is None:
        spec = os.environ.get("SMCISH_DEVICE") or "embedded"
    return spec.strip()


def open_device(spec: str | None = None) -> Device:
    """Open a new device.

    Args:
        spec: ``"embedded"`` (default), ``"unix:/path/to/ismd.sock"`` or ``"none"``; None reads
            ``SMCISH_DEVICE``.
    Returns:
        A Device; the caller owns it (close it, or let the atexit hook do it).
    Raises:
        NoDevice: unknown spec, ismd unreachable, or an unsafe runtime directory.
    """
    resolved = _resolve(spec)
    device: Device
    if resolved == "none":
        device = NoneDevice()
    elif resolved == "embedded":
        from .embedded import EmbeddedDevice
        device = EmbeddedDevice()
    elif resolved.startswith("unix:") and len(resolved) > len("unix:"):
        from .client import DaemonDevice
        device = DaemonDevice(resolved[len("unix:"):])
    else:
        raise NoDevice(f"unknown ISM device spec {resolved!r}: use 'embedded', "
                       "'unix:/path/to/ismd.sock' or 'none' (SMCISH_DEVICE)")
    _all_devices.add(device)
    return device


def _cache_key(resolved: str) -> tuple:
    # The embedded device's runtime dir depends only on these variables (and the uid): keying on
    # them keeps get_device() free of syscalls on every connection.
    if resolved == "embedded":
        env = os.environ
        return (resolved, env.get("SMCISH_RUNTIME_DIR"), env.get("XDG_RUNTIME_DIR"), os.getuid())
    return (resolved,)


def get_device(spec: str | None = None) -> Device:
    """The per-process device for ``spec`` (see ``open_device``), opened on first use.

    A cached device that was closed or whose daemon went away is reopened on the next call.
    Raises:
        NoDevice: as ``open_device``.
    """
    resolved = _resolve(spec)
    key = _cache_key(resolved)
    with _lock:
        device = _cache.get(key)
        if device is not None and (device.available or device.kind == "none"):
            return device
        if device is not None:
            _cache.pop(key, None)
            try:
                device.close()
            except IsmError:
                pass
        device = open_device(resolved)
        _cache[key] = device
        return device


def _close_all() -> None:
    for device in list(_all_devices):
        try:
            device.close()
        except Exception:  # noqa: BLE001 - interpreter exit: never raise from atexit
            pass


def _after_fork_in_child() -> None:
    # The child must not share the parent's control connections, endpoint thread or locks:
    # drop every device without side effects on the parent's (no unlink, no LOCK_UN, no close
    # messages), so the next get_device() opens fresh ones.
    global _lock
    _lock = threading.Lock()
    for device in list(_all_devices):
        forget = getattr(device, "_forget_after_fork", None)
        if forget is not None:
            forget()
    _all_devices.clear()
    _cache.clear()


atexit.register(_close_all)
os.register_at_fork(after_in_child=_after_fork_in_child)
