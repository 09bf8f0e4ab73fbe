"""ism_backend: the ISM device smcish moves connection bytes through (regions, grants, doorbells,
socket-bound discovery, peer messaging).

``open_device(spec)`` / ``get_device(spec)`` select it: ``"embedded"`` (default, in-process),
``"unix:/path/to/ismd.sock"`` (the ismd host daemon) or ``"none"`` (TCP only); ``spec=None`` reads
``SMCISH_DEVICE``. See docs/device.md. Modules, bottom-up (none imports a later one):
``errors`` -> ``contract`` -> ``memfd``, ``sockets`` -> ``proto`` -> ``control`` -> ``policy`` ->
``embedded``, ``daemon``, ``client`` -> ``factory``. The daemon is ``python -m ism_backend.daemon``
(not imported here, so running it as a module stays clean).
"""

from .contract import Advert, Device, Handle, PeerInfo, Region
from .errors import (
    DeviceGone,
    DeviceProtocolError,
    IsmError,
    NoDevice,
    PermissionDenied,
    QuotaExceeded,
    UnknownToken,
)
from .factory import NoneDevice, get_device, open_device

__all__ = [
    "Advert", "Device", "DeviceGone", "DeviceProtocolError", "Handle", "IsmError", "NoDevice",
    "NoneDevice", "PeerInfo", "PermissionDenied", "QuotaExceeded", "Region", "UnknownToken",
    "get_device", "open_device",
]
