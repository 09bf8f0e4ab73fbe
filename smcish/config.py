"""Settings for smcish connections: defaults, environment overrides, per-call overrides."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

_NEGOTIATE_MODES = ("auto", "always", "never")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw, 0)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an integer") from None


@dataclasses.dataclass(frozen=True)
class Config:
    """What an smcish connection or listener does.

    Attributes:
        device: device spec, ``"embedded"`` | ``"unix:/path/ismd.sock"`` | ``"none"``
            (env ``SMCISH_DEVICE``; ``None`` means the environment or ``embedded``).
        negotiate: ``"auto"`` claims shared memory when the listener that will accept the
            connection is an smcish one on our device; ``"never"`` stays TCP (env
            ``SMCISH_NEGOTIATE``). ``"always"`` is accepted for compatibility and means ``"auto"``:
            since v2 a client never speaks to a listener that is not proven to be smcish.
        ring_size: capacity in bytes a connection's send ring starts with, and shrinks back to
            when idle (power of two, 4 KiB..1 GiB; env ``SMCISH_RING_SIZE``).
        max_ring_size: the largest a bulk flow's send ring grows to (power of two; env
            ``SMCISH_MAX_RING_SIZE``; a ``ring_size`` above it wins).
        poll_us: busy-poll budget in microseconds a sender spends waiting for a reply before
            it sleeps; 0 disables polling (env ``SMCISH_POLL_US``).
        handshake_timeout: seconds a handshake step may take (env ``SMCISH_HANDSHAKE_TIMEOUT``).
    """

    device: str | None = None
    negotiate: str = "auto"
    ring_size: int = 64 << 10
    max_ring_size: int = 4 << 20
    poll_us: float = 50.0
    handshake_timeout: float = 2.0

    def __post_init__(self) -> None:
        if self.negotiate not in _NEGOTIATE_MODES:
            raise ValueError(f"negotiate must be one of {_NEGOTIATE_MODES}, not {self.negotiate!r}")
        for name in ("ring_size", "max_ring_size"):
            size = getattr(self, name)
            if size < 4096 or size > (1 << 30) or size & (size - 1):
                raise ValueError(f"{name} must be a power of two between 4096 and 1 GiB, not {size}")
        if self.poll_us < 0:
            raise ValueError("poll_us must be >= 0")
        if self.handshake_timeout <= 0:
            raise ValueError("handshake_timeout must be > 0")

    @classmethod
    def from_env(cls, **overrides: Any) -> Config:
        """Build a Config from ``SMCISH_*`` environment variables, then apply ``overrides``."""
        values: dict[str, Any] = {
            "device": os.environ.get("SMCISH_DEVICE") or None,
            "negotiate": os.environ.get("SMCISH_NEGOTIATE") or "auto",
            "ring_size": _env_int("SMCISH_RING_SIZE", cls.ring_size),
            "max_ring_size": _env_int("SMCISH_MAX_RING_SIZE", cls.max_ring_size),
            "poll_us": _env_float("SMCISH_POLL_US", cls.poll_us),
            "handshake_timeout": _env_float("SMCISH_HANDSHAKE_TIMEOUT", cls.handshake_timeout),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def current(cls) -> Config:
        """``from_env()``, cached on the values of the ``SMCISH_*`` variables (read per connection)."""
        # os.environ keeps its values in a dict of encoded keys: reading that directly costs a
        # fraction of Mapping.get's path (this runs on every connection).
        data = getattr(os.environ, "_data", None)
        if data is not None:
            key = tuple(map(data.get, _ENV_KEYS))
        else:  # pragma: no cover - another os.environ implementation
            key = tuple(map(os.environ.get, _ENV_NAMES))
        cached = _env_cache.get(key)
        if cached is None:
            cached = cls.from_env()
            if len(_env_cache) > 16:
                _env_cache.clear()
            _env_cache[key] = cached
        return cached

    def replace(self, **changes: Any) -> Config:
        """A copy with ``changes`` applied (keywords whose value is None are ignored)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


_ENV_NAMES = ("SMCISH_DEVICE", "SMCISH_NEGOTIATE", "SMCISH_RING_SIZE", "SMCISH_MAX_RING_SIZE",
              "SMCISH_POLL_US", "SMCISH_HANDSHAKE_TIMEOUT")
_ENV_KEYS = tuple(os.environ.encodekey(name) for name in _ENV_NAMES)
# key: the raw values of _ENV_NAMES (encoded bytes from os.environ._data, else str), None if unset
_env_cache: dict[tuple[bytes | str | None, ...], Config] = {}
