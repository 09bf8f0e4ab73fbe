"""The typed errors of the ISM device: the leaf module every other one imports (it imports nothing).

Every message says what to do about the error ("fall back to TCP", "start ismd", the flag to add).
Only the classes in ``ERRORS`` may cross the control protocol; anything else decodes as
``DeviceProtocolError``.
"""

from __future__ import annotations

__all__ = [
    "ERRORS", "DeviceGone", "DeviceProtocolError", "IsmError", "NoDevice", "PermissionDenied",
    "QuotaExceeded", "UnknownToken",
]


class IsmError(Exception):
    """Base class of every ISM device error; the message says what to do about it."""


class NoDevice(IsmError):
    """No usable ISM device (none configured, ismd not running or not trusted, unsafe directory)."""


class PermissionDenied(IsmError):
    """The device refused: uid/gid policy, a spent one-shot token, a revoked grant, a bad socket."""


class UnknownToken(IsmError):
    """The token (or handle, attachment, pooled region) names nothing live."""


class QuotaExceeded(IsmError):
    """A limit was reached: ismd quota or memory, entries per connection, fds (EMFILE)."""


class DeviceGone(IsmError):
    """The device (ismd, or a peer's endpoint) went away or did not answer in time.

    Attributes:
        timed_out: True when the bound was spent waiting (callers must not retry).
        delivered: False when the request provably never reached the other side (it may be
            retried on a fresh connection); True when it may have been delivered.
    """

    timed_out: bool = False
    delivered: bool = True


class DeviceProtocolError(IsmError):
    """The other side of a control connection sent something malformed or inconsistent."""


# Error names that may cross the control protocol.
ERRORS: dict[str, type[IsmError]] = {
    cls.__name__: cls
    for cls in (IsmError, NoDevice, PermissionDenied, UnknownToken, QuotaExceeded, DeviceGone,
                DeviceProtocolError)
}
