"""ism_backend: the ISM device smcish moves connection bytes through (regions, grants, doorbells).

``open_device(spec)`` / ``get_device(spec)`` select it: ``"embedded"`` (default, in-process),
``"unix:/path/to/ismd.sock"`` (the ismd host daemon) or ``"none"`` (TCP only); ``spec=None`` reads
``SMCISH_DEVICE``. See docs/device.md. The daemon itself is ``python -m ism_backend.daemon`` (not
imported here, so running it as a module stays clean).
"""

from .device import (
    Device, DeviceGone, DeviceProtocolError, IsmError, NoDevice, NoneDevice, PermissionDenied,
    QuotaExceeded, Region, UnknownToken, get_device, open_device,
)

__all__ = [
    "Device", "DeviceGone", "DeviceProtocolError", "IsmError", "NoDevice", "NoneDevice",
    "PermissionDenied", "QuotaExceeded", "Region", "UnknownToken", "get_device", "open_device",
]
