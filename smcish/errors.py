"""Exceptions smcish raises to applications (all are built-in exception subclasses)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from smcish.clc import DeclineReason


class SmcError(ConnectionError):
    """Base class of smcish connection errors."""


class HandshakeError(SmcError, ConnectionResetError):
    """The handshake failed in a way that could not fall back to TCP (the connection is reset)."""

    def __init__(self, reason: DeclineReason, message: str = "") -> None:
        self.reason = reason
        super().__init__(message or f"smcish handshake failed: {getattr(reason, 'name', reason)}")


class PeerReset(SmcError, ConnectionResetError):
    """The peer died or aborted; everything it had published was delivered first."""
