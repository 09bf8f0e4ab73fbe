"""Exceptions smcish raises to applications (all are built-in exception subclasses)."""

from __future__ import annotations


class SmcError(ConnectionError):
    """Base class of smcish connection errors."""


class HandshakeError(SmcError, ConnectionResetError):
    """The handshake failed in a way that could not fall back to TCP (the connection is reset)."""

    def __init__(self, reason, message: str = "") -> None:
        self.reason = reason
        super().__init__(message or f"smcish handshake failed: {getattr(reason, 'name', reason)}")


class PeerReset(SmcError, ConnectionResetError):
    """The peer died or aborted; everything it had published was delivered first."""
