"""Device selection: ``open_device``/``get_device`` by spec, the ``none`` device, and process
lifetime (every device closed at exit; a forked child drops its parent's devices untouched).

Inside a VM guest that has the smcish port (``client.GUEST_PORT_NAME``, docs/vm.md) the default
device is the guest agent's socket instead of ``embedded``; ``SMCISH_DEVICE=guest`` names it too.
"""

from __future__ import annotations

import atexit
import os
import socket
import threading
import weakref
from collections.abc import Callable
from typing import Any, cast

from .client import GUEST_SOCKET_PATH, DaemonDevice, find_guest_port
from .contract import Advert, Device, EndpointHandler, Handle, Region
from .embedded import EmbeddedDevice
from .errors import IsmError, NoDevice

__all__ = ["NoneDevice", "get_device", "open_device"]


class NoneDevice(Device):
    """No device: every connection stays plain TCP."""

    kind = "none"
    geometry = "none"

    def __init__(self) -> None:
        self._info_provider: Callable[[], list[dict[str, Any]]] | None = None

    @staticmethod
    def _refuse() -> NoDevice:
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

    def advertise(self, sock: socket.socket, hub_id: bytes) -> Handle:
        return Handle("advert", None, self)

    def withdraw(self, handle: Handle) -> None:
        if isinstance(handle, Handle):
            handle.active = False

    def find_listener(self, inode: int) -> Advert | None:
        return None

    def set_endpoint_handler(self, handler: EndpointHandler | None) -> None:
        pass

    def peer_request(self, endpoint_id: bytes, op: str, **fields: Any) -> dict[str, Any]:
        raise self._refuse()

    def peer_alive(self, endpoint_id: bytes) -> bool:
        return False

    def set_info_provider(self, fn: Callable[[], list[dict[str, Any]]] | None) -> None:
        self._info_provider = fn

    def peers_info(self) -> list[dict[str, Any]]:
        own = self._info_provider() if self._info_provider else []
        return [{"kind": "none", "pid": os.getpid(), "connections": own}]

    def status(self) -> dict[str, Any]:
        return {"kind": "none", "available": False}

    def close(self) -> None:
        pass


_lock = threading.Lock()
_cache: dict[tuple[str | int | None, ...], Device] = {}
_all_devices: weakref.WeakSet[Device] = weakref.WeakSet()


_ENV_DATA = getattr(os.environ, "_data", None)     # os.environ's own dict of encoded keys
# typeshed declares os.environ.encodekey as str -> str; on POSIX it returns the bytes key.
_K_DEVICE, _K_RUNTIME, _K_XDG = (cast(bytes, os.environ.encodekey(k)) for k in (
    "SMCISH_DEVICE", "SMCISH_RUNTIME_DIR", "XDG_RUNTIME_DIR"))


def _env(name: str, key: bytes) -> str | None:
    """os.environ.get(name) without its Python-level mapping layers (get_device() runs on every
    connection): a plain lookup in os.environ's own dict, decoded as os.environ would."""
    if _ENV_DATA is None:  # pragma: no cover - another os.environ implementation
        return os.environ.get(name)
    raw = _ENV_DATA.get(key)
    return None if raw is None else os.environ.decodevalue(raw)


_GUEST_SPEC = "unix:" + GUEST_SOCKET_PATH
_default_spec: str | None = None     # detected once per process (it cannot change)


def _default() -> str:
    """``embedded``, or the guest agent's socket in a VM guest with the smcish port: one scan
    of /sys/class/virtio-ports, on first use only (get_device() runs on every connection)."""
    global _default_spec
    spec = _default_spec
    if spec is None:
        spec = _default_spec = _GUEST_SPEC if find_guest_port() is not None else "embedded"
    return spec


def _resolve(spec: str | None) -> str:
    if spec is None:
        spec = _env("SMCISH_DEVICE", _K_DEVICE) or _default()
    spec = spec.strip()
    return _GUEST_SPEC if spec == "guest" else spec


def open_device(spec: str | None = None) -> Device:
    """Open a new device.

    Args:
        spec: ``"embedded"`` (default; in a VM guest with the smcish port, ``"guest"``),
            ``"unix:/path/to/ismd.sock"``, ``"guest"`` (the guest agent's socket,
            ``client.GUEST_SOCKET_PATH``) or ``"none"``; None reads ``SMCISH_DEVICE``.
    Returns:
        A Device; the caller owns it (close it, or let the atexit hook do it).
    Raises:
        NoDevice: unknown spec, ismd unreachable or untrusted, or an unsafe runtime directory.
        PermissionDenied, QuotaExceeded: ismd refused the connection.
    """
    resolved = _resolve(spec)
    device: Device
    if resolved == "none":
        device = NoneDevice()
    elif resolved == "embedded":
        device = EmbeddedDevice()
    elif resolved.startswith("unix:") and len(resolved) > len("unix:"):
        device = DaemonDevice(resolved[len("unix:"):])
    else:
        raise NoDevice(f"unknown ISM device spec {resolved!r}: use 'embedded', "
                       "'unix:/path/to/ismd.sock', 'guest' or 'none' (SMCISH_DEVICE)")
    _all_devices.add(device)
    return device


def _cache_key(resolved: str) -> tuple[str | int | None, ...]:
    # The embedded device's runtime dir depends only on these variables (and the uid): keying on
    # them keeps get_device() free of syscalls on every connection.
    if resolved == "embedded":
        return (resolved, _env("SMCISH_RUNTIME_DIR", _K_RUNTIME), _env("XDG_RUNTIME_DIR", _K_XDG),
                os.getuid())
    return (resolved,)


def get_device(spec: str | None = None) -> Device:
    """The per-process device for ``spec`` (see ``open_device``), opened on first use.

    A cached device that was closed or whose daemon went away is closed and reopened.

    Raises:
        NoDevice, PermissionDenied, QuotaExceeded: as ``open_device``.
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
    # The child must not share the parent's control connections, threads or locks: drop every
    # device without side effects on the parent's (no unlink, no LOCK_UN, no close messages),
    # so the next get_device() opens fresh ones. The registries are emptied first: one device
    # failing to forget must not leave the parent's devices cached for the child.
    global _lock
    _lock = threading.Lock()
    devices = list(_all_devices)
    _all_devices.clear()
    _cache.clear()
    for device in devices:
        forget = getattr(device, "_forget_after_fork", None)
        if forget is not None:
            try:
                forget()
            except Exception:  # noqa: BLE001 - an at-fork hook must not fail the child
                pass


atexit.register(_close_all)
os.register_at_fork(after_in_child=_after_fork_in_child)
