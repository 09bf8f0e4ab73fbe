"""Sans-I/O CLC handshake: the message codec and the per-connection state machine (bytes and time in, bytes and events out).

Everything that decides what the handshake does lives in this file, and most of it is data:
``_TRANSITIONS`` (which input is allowed in which state and where it leads), ``_DEADLINES`` (which
states run a timer and how long), ``_EXPECTED`` (which message a reading state waits for). Nothing
here touches a socket, a loop or a clock: the shell passes ``now`` in, asks ``get_timer()`` for the
next deadline, sends what ``data_to_send()`` (or a method's return value) hands it, and reacts to
``next_event()``. docs/handshake.md explains the rules and the reasons behind them.

Wire format (one message)::

    b"SMCi" | version u8 (=1) | type u8 | length u16 BE (whole message) | body | b"iCMS"
"""

from __future__ import annotations

import enum
import struct
from collections import deque
from dataclasses import dataclass
from typing import Literal, NamedTuple, Union

__all__ = [
    "PROTOCOL_VERSION", "MIN_PROTOCOL_VERSION", "FRAMING_VERSION", "MAGIC", "TRAILER", "MAX_MESSAGE",
    "HEADER_SIZE", "MIN_MESSAGE", "MIN_CAPACITY_LOG2", "MAX_CAPACITY_LOG2", "MessageType",
    "DeclineReason", "Proposal", "Accept", "Confirm", "Decline", "Message", "ClcError",
    "ClcStateError", "encode", "decode", "message_size", "ProposalReceived", "AcceptReceived",
    "Established", "FellBack", "Aborted", "Event", "ClcState", "State", "TERMINAL_STATES", "Role",
    "ClcConnection",
]

PROTOCOL_VERSION = 1
"""The highest protocol version this code speaks (negotiated in PROPOSAL/ACCEPT bodies)."""
MIN_PROTOCOL_VERSION = 1
"""The lowest protocol version this code speaks."""
FRAMING_VERSION = 1
"""The header's version byte. Fixed at 1 for every protocol version, so that any future peer can
read a PROPOSAL and answer it; protocol versions are negotiated in the bodies."""
MAGIC = b"SMCi"
TRAILER = b"iCMS"
MAX_MESSAGE = 512
HEADER_SIZE = 8
MIN_MESSAGE = HEADER_SIZE + len(TRAILER)
MIN_CAPACITY_LOG2 = 12          # 4 KiB ring
MAX_CAPACITY_LOG2 = 30          # 1 GiB ring

_HEADER = struct.Struct("!4sBBH")           # magic, framing version, type, length
_PROPOSAL = struct.Struct("!BBH16s16s16sB")  # min_version, max_version, flags, gid, endpoint_id, token, capacity_log2
_ACCEPT = struct.Struct("!BH16s16s16sB")     # version, flags, gid, endpoint_id, token, capacity_log2
_DECLINE = struct.Struct("!H")               # reason code
_ID_SIZE = 16


class MessageType(enum.IntEnum):
    """The header's type byte."""

    PROPOSAL = 1
    ACCEPT = 2
    CONFIRM = 3
    DECLINE = 4


_BODY_SIZE = {
    MessageType.PROPOSAL: _PROPOSAL.size,
    MessageType.ACCEPT: _ACCEPT.size,
    MessageType.CONFIRM: 0,
    MessageType.DECLINE: _DECLINE.size,
}


class DeclineReason(enum.IntEnum):
    """Why a connection is not (or no longer) on shared memory; classes follow SMC's (high byte).

    Each member has ``.description`` (a human sentence) and ``.category`` (its class name).
    """

    description: str

    def __new__(cls, code: int, description: str) -> DeclineReason:
        member = int.__new__(cls, code)
        member._value_ = code
        member.description = description
        return member

    # 0x01xx resources
    NO_MEMORY = 0x0101, "no shared-memory region could be allocated (pool exhausted or out of memory)"
    ATTACH_FAILED = 0x0102, "the peer's region could not be attached"
    QUOTA = 0x0103, "the ISM device refused the region: quota exceeded"
    # 0x02xx timeout
    TIMEOUT = 0x0201, "the handshake timed out"
    # 0x03xx configuration
    NO_DEVICE = 0x0301, "no ISM device is available (set SMCISH_DEVICE or start ismd)"
    DISABLED_BY_POLICY = 0x0302, "shared memory is disabled by configuration or policy"
    PEER_NOT_ADVERTISED = 0x0303, "the server is not advertised on this ISM device"
    GID_MISMATCH = 0x0304, "the peers are on different sharing domains (gid mismatch)"
    # 0x04xx peer
    VERSION_MISMATCH = 0x0401, "the peers have no protocol version in common"
    PROTOCOL_ERROR = 0x0402, "a handshake message was malformed or unexpected"
    PEER_DECLINED = 0x0403, "the peer declined with a reason this version does not know"
    PEER_NOT_SMCISH = 0x0404, "the peer does not speak smcish (plain TCP)"
    # 0x05xx internal
    INTERNAL = 0x0501, "internal error"

    @property
    def category(self) -> str:
        """The SMC-like class: resources, timeout, configuration, peer or internal."""
        return _CATEGORIES.get(self.value >> 8, "unknown")

    @classmethod
    def from_code(cls, code: int) -> DeclineReason:
        """Map a wire code to a reason; codes this version does not know map to PEER_DECLINED."""
        try:
            return cls(code)
        except ValueError:
            return cls.PEER_DECLINED


_CATEGORIES = {1: "resources", 2: "timeout", 3: "configuration", 4: "peer", 5: "internal"}


# ---------------------------------------------------------------------------------------- messages

def _check_int(name: str, value: object, low: int, high: int) -> None:
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} {value} outside [{low}, {high}]")


def _check_id(obj: object, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise TypeError(f"{name} must be {_ID_SIZE} bytes, not {type(value).__name__}")
    value = bytes(value)
    if len(value) != _ID_SIZE:
        raise ValueError(f"{name} must be {_ID_SIZE} bytes, got {len(value)}")
    object.__setattr__(obj, name, value)       # normalise to bytes so messages compare and hash


def _check_common(obj: Proposal | Accept) -> None:
    _check_int("flags", obj.flags, 0, 0xFFFF)
    for name in ("gid", "endpoint_id", "token"):
        _check_id(obj, name)
    _check_int("capacity_log2", obj.capacity_log2, MIN_CAPACITY_LOG2, MAX_CAPACITY_LOG2)


@dataclass(frozen=True)
class Proposal:
    """PROPOSAL (client -> server): what the client speaks and the region it offers.

    Args:
        min_version, max_version: the protocol versions the client speaks (1 <= min <= max <= 255).
        flags: option bits. None is defined in version 1: send 0; receivers ignore unknown bits.
        gid: the client's device gid (16 bytes); endpoint_id, token: what the server needs to
            attach the client's region (16 bytes each).
        capacity_log2: log2 of the client's ring capacity, in [12, 30].

    Raises:
        ValueError, TypeError: a field is out of range or of the wrong type.
    """

    min_version: int
    max_version: int
    flags: int
    gid: bytes
    endpoint_id: bytes
    token: bytes
    capacity_log2: int

    def __post_init__(self) -> None:
        _check_int("min_version", self.min_version, 1, 255)
        _check_int("max_version", self.max_version, 1, 255)
        if self.min_version > self.max_version:
            raise ValueError(f"min_version {self.min_version} > max_version {self.max_version}")
        _check_common(self)

    def common_version(self) -> int | None:
        """The highest version both this proposal and this code speak, or None."""
        version = min(self.max_version, PROTOCOL_VERSION)
        return version if version >= max(self.min_version, MIN_PROTOCOL_VERSION) else None


@dataclass(frozen=True)
class Accept:
    """ACCEPT (server -> client): the chosen version and the server's region.

    The server has attached the client's region before sending it. Fields as in ``Proposal``;
    ``version`` is the negotiated protocol version (within the client's range).
    """

    version: int
    flags: int
    gid: bytes
    endpoint_id: bytes
    token: bytes
    capacity_log2: int

    def __post_init__(self) -> None:
        _check_int("version", self.version, 1, 255)
        _check_common(self)


@dataclass(frozen=True)
class Confirm:
    """CONFIRM (client -> server): the client attached the server's region; the ring takes over."""


@dataclass(frozen=True)
class Decline:
    """DECLINE (either side, before CONFIRM is processed): carry on with plain TCP.

    Args:
        reason: the reason (a DeclineReason, or its int code).
        code: the raw wire code; defaults to ``int(reason)``. A received code this version does not
            know gives ``reason=PEER_DECLINED`` with the raw ``code`` kept here.

    Raises:
        ValueError: ``code`` does not map to ``reason``.
    """

    reason: DeclineReason
    code: int | None = None

    def __post_init__(self) -> None:
        reason = self.reason
        if not isinstance(reason, DeclineReason):
            _check_int("reason", reason, 0, 0xFFFF)
            reason = DeclineReason(reason)        # ValueError for an unknown code: use code=
            object.__setattr__(self, "reason", reason)
        code = self.code
        if code is None:
            object.__setattr__(self, "code", int(reason))
            return
        _check_int("code", code, 0, 0xFFFF)
        if DeclineReason.from_code(code) is not reason:
            raise ValueError(f"code {code:#06x} does not map to {reason.name}")


Message = Union[Proposal, Accept, Confirm, Decline]
_CONFIRM = Confirm()


class ClcError(Exception):
    """A received handshake message is malformed.

    Attributes:
        reason: the DeclineReason to report (PROTOCOL_ERROR, or VERSION_MISMATCH for a header
            version other than 1).
        resync: True when the framing is intact (magic, sane length, trailer where the length
            says): the bad message can be skipped and the stream stays usable.
        length: bytes to skip when ``resync`` (the message's length field), else 0.
        msg_type: the header's type byte when ``resync``, else None.
    """

    def __init__(self, reason: DeclineReason, message: str = "", *, resync: bool = False,
                 length: int = 0, msg_type: int | None = None) -> None:
        super().__init__(message or reason.description)
        self.reason = reason
        self.resync = resync
        self.length = length if resync else 0
        self.msg_type = msg_type if resync else None


class ClcStateError(RuntimeError):
    """The shell called a ClcConnection method its role or the current state does not allow."""


def encode(msg: Message) -> bytes:
    """Serialise one handshake message.

    Args:
        msg: a Proposal, Accept, Confirm or Decline (fields were validated when it was built).

    Returns:
        The message's bytes, header and trailer included.

    Raises:
        TypeError: ``msg`` is not a handshake message.
    """
    if isinstance(msg, Proposal):
        mtype = MessageType.PROPOSAL
        body = _PROPOSAL.pack(msg.min_version, msg.max_version, msg.flags, msg.gid,
                              msg.endpoint_id, msg.token, msg.capacity_log2)
    elif isinstance(msg, Accept):
        mtype = MessageType.ACCEPT
        body = _ACCEPT.pack(msg.version, msg.flags, msg.gid, msg.endpoint_id, msg.token,
                            msg.capacity_log2)
    elif isinstance(msg, Confirm):
        mtype, body = MessageType.CONFIRM, b""
    elif isinstance(msg, Decline):
        mtype, body = MessageType.DECLINE, _DECLINE.pack(msg.code)
    else:
        raise TypeError(f"not a handshake message: {type(msg).__name__}")
    length = HEADER_SIZE + len(body) + len(TRAILER)
    return _HEADER.pack(MAGIC, FRAMING_VERSION, mtype, length) + body + TRAILER


def message_size(mtype: MessageType) -> int:
    """The exact length of a message of this type."""
    return HEADER_SIZE + _BODY_SIZE[mtype] + len(TRAILER)


def _magic_ok(buf: bytes | bytearray | memoryview) -> bool:
    """Whether the first bytes are the magic or a prefix of it (so far)."""
    head = bytes(buf[:len(MAGIC)])
    return MAGIC.startswith(head)


def decode(buf: bytes | bytearray | memoryview) -> tuple[Message | None, int]:
    """Parse the handshake message at the start of ``buf``.

    Only the message's own bytes are looked at: the result never depends on what follows it.
    Errors that the bytes so far already prove (bad magic, length out of range) are raised at
    once; the other checks wait for the whole message so that the error can say how to skip it.

    Args:
        buf: received bytes, starting at a message boundary.

    Returns:
        ``(message, consumed)``, or ``(None, 0)`` when more bytes are needed.

    Raises:
        ClcError: the message is malformed (see ``ClcError.resync``).
    """
    have = len(buf)
    if not _magic_ok(buf):
        raise ClcError(DeclineReason.PROTOCOL_ERROR, "bad leading magic")
    if have < HEADER_SIZE:
        return None, 0
    _magic, version, mtype, length = _HEADER.unpack_from(buf)
    if not MIN_MESSAGE <= length <= MAX_MESSAGE:
        raise ClcError(DeclineReason.PROTOCOL_ERROR,
                       f"length field {length} outside [{MIN_MESSAGE}, {MAX_MESSAGE}]")
    if have < length:
        return None, 0
    if bytes(buf[length - len(TRAILER):length]) != TRAILER:
        raise ClcError(DeclineReason.PROTOCOL_ERROR,
                       f"no trailer where the length field ({length}) puts it")

    def bad(reason: DeclineReason, text: str) -> ClcError:
        return ClcError(reason, text, resync=True, length=length, msg_type=mtype)

    if version != FRAMING_VERSION:
        raise bad(DeclineReason.VERSION_MISMATCH, f"header version {version}, expected {FRAMING_VERSION}")
    try:
        mtype = MessageType(mtype)
    except ValueError:
        raise bad(DeclineReason.PROTOCOL_ERROR, f"unknown message type {mtype}") from None
    body = bytes(buf[HEADER_SIZE:length - len(TRAILER)])
    if len(body) != _BODY_SIZE[mtype]:
        raise bad(DeclineReason.PROTOCOL_ERROR,
                  f"{mtype.name} body is {len(body)} bytes, expected {_BODY_SIZE[mtype]}")
    msg: Message
    try:
        if mtype is MessageType.PROPOSAL:
            msg = Proposal(*_PROPOSAL.unpack(body))
        elif mtype is MessageType.ACCEPT:
            msg = Accept(*_ACCEPT.unpack(body))
        elif mtype is MessageType.CONFIRM:
            msg = _CONFIRM
        else:
            (code,) = _DECLINE.unpack(body)
            msg = Decline(DeclineReason.from_code(code), code)
    except ValueError as exc:
        raise bad(DeclineReason.PROTOCOL_ERROR, f"{mtype.name}: {exc}") from None
    return msg, length


# ------------------------------------------------------------------------------------------ events

@dataclass(frozen=True)
class ProposalReceived:
    """Server: a valid PROPOSAL with a version in common arrived.

    The shell checks gid, attaches the client's region, allocates its own, then calls
    ``accept(Accept(version=event.version, ...))`` or ``decline(reason)``.
    """

    proposal: Proposal
    version: int            # the version to put in the ACCEPT (highest in common)


@dataclass(frozen=True)
class AcceptReceived:
    """Client: the server accepted. Attach its region, then ``confirm()`` or ``decline(reason)``."""

    accept: Accept


@dataclass(frozen=True)
class Established:
    """Both: the ring carries the data from now on; no further byte may arrive on TCP."""


@dataclass(frozen=True)
class FellBack:
    """Both: carry on with plain TCP on the same socket.

    Attributes:
        reason: why.
        by_peer: True when the peer's DECLINE decided it (we sent no DECLINE of our own).
        data: the bytes received after the last handshake byte: replay them to the application,
            in order, before anything received later. If the shell saw EOF, deliver it after them.
        peer_code: the raw code of the peer's DECLINE when ``by_peer`` (kept for codes this
            version does not know, which give ``reason=PEER_DECLINED``), else None.
    """

    reason: DeclineReason
    by_peer: bool
    data: bytes
    peer_code: int | None = None


@dataclass(frozen=True)
class Aborted:
    """Both: the stream cannot be used: reset the TCP connection (transport.abort())."""

    reason: DeclineReason
    message: str


Event = Union[ProposalReceived, AcceptReceived, Established, FellBack, Aborted]


# ----------------------------------------------------------------------------------- state machine

class ClcState(enum.Enum):
    """Handshake states. Terminal: FELL_BACK, ABORTED. ESTABLISHED only moves to ABORTED."""

    IDLE = "idle"                           # both: created, nothing started
    # client
    WAIT_ACCEPT = "wait-accept"             # PROPOSAL sent
    ACCEPT_RECEIVED = "accept-received"     # the shell attaches, then confirm() or decline()
    DECLINED_WAIT = "declined-wait"         # timed out, DECLINE(TIMEOUT) sent: drain the server's answer
    # server
    WAIT_PROPOSAL = "wait-proposal"
    PROPOSAL_RECEIVED = "proposal-received"  # the shell decides: accept() or decline()
    DRAIN_DECLINE = "drain-decline"         # we declined while the client's own DECLINE was arriving
    WAIT_CONFIRM = "wait-confirm"           # ACCEPT sent
    # both
    ESTABLISHED = "established"
    FELL_BACK = "fell-back"
    ABORTED = "aborted"


State = ClcState    # short alias

Role = Literal["client", "server"]
CLIENT: Role = "client"
SERVER: Role = "server"


class _Input(enum.Enum):
    """What can happen to a connection: local calls, received bytes (classified), time, EOF."""

    PROPOSE = "propose()"
    WAIT_PROPOSAL = "wait_proposal()"
    FALLBACK_NOW = "fallback_now()"
    SEND_ACCEPT = "accept()"
    SEND_DECLINE = "decline()"
    SEND_CONFIRM = "confirm()"
    RECV_PROPOSAL = "a PROPOSAL"
    RECV_ACCEPT = "an ACCEPT"
    RECV_CONFIRM = "a CONFIRM"
    RECV_DECLINE = "a DECLINE"               # also a DECLINE whose body is malformed
    RECV_CROSSED_DECLINE = "a DECLINE that did not see ours"    # client in DECLINED_WAIT
    RECV_UNEXPECTED = "an intact message that is malformed, unacceptable or not expected here"
    RECV_GARBAGE = "bytes that break the framing"
    RECV_NOT_SMCISH = "first bytes from the peer that are not the magic"
    RECV_BYTES = "bytes while the peer must be silent"
    NOTHING_CROSSED = "no crossing DECLINE pending"
    TIMER = "timer expiry"
    EOF = "EOF"


_LOCAL = frozenset({_Input.PROPOSE, _Input.WAIT_PROPOSAL, _Input.FALLBACK_NOW,
                    _Input.SEND_ACCEPT, _Input.SEND_DECLINE, _Input.SEND_CONFIRM})

S, I = ClcState, _Input

# The whitelist: (role, state, input) -> next state. Anything absent is not allowed: a local call
# raises ClcStateError; a received input is never classified as one that is absent (tested).
_TRANSITIONS: dict[tuple[Role, ClcState, _Input], ClcState] = {
    # ---- client
    (CLIENT, S.IDLE, I.PROPOSE): S.WAIT_ACCEPT,
    (CLIENT, S.WAIT_ACCEPT, I.RECV_ACCEPT): S.ACCEPT_RECEIVED,
    (CLIENT, S.WAIT_ACCEPT, I.RECV_DECLINE): S.FELL_BACK,
    (CLIENT, S.WAIT_ACCEPT, I.RECV_UNEXPECTED): S.FELL_BACK,        # we answer DECLINE(reason)
    (CLIENT, S.WAIT_ACCEPT, I.RECV_GARBAGE): S.ABORTED,
    (CLIENT, S.WAIT_ACCEPT, I.RECV_NOT_SMCISH): S.ABORTED,          # our PROPOSAL hit a plain server
    (CLIENT, S.WAIT_ACCEPT, I.TIMER): S.DECLINED_WAIT,              # we send DECLINE(TIMEOUT)
    (CLIENT, S.WAIT_ACCEPT, I.EOF): S.ABORTED,
    (CLIENT, S.ACCEPT_RECEIVED, I.SEND_CONFIRM): S.ESTABLISHED,
    (CLIENT, S.ACCEPT_RECEIVED, I.SEND_DECLINE): S.FELL_BACK,
    (CLIENT, S.ACCEPT_RECEIVED, I.RECV_BYTES): S.ABORTED,           # the server must wait for us
    (CLIENT, S.ACCEPT_RECEIVED, I.TIMER): S.FELL_BACK,              # we send DECLINE(TIMEOUT)
    (CLIENT, S.ACCEPT_RECEIVED, I.EOF): S.ABORTED,
    (CLIENT, S.DECLINED_WAIT, I.RECV_ACCEPT): S.FELL_BACK,          # the answer we were owed
    (CLIENT, S.DECLINED_WAIT, I.RECV_DECLINE): S.FELL_BACK,         # DECLINE(PEER_DECLINED): ours was seen
    (CLIENT, S.DECLINED_WAIT, I.RECV_CROSSED_DECLINE): S.ABORTED,   # ours will land in the app stream
    (CLIENT, S.DECLINED_WAIT, I.RECV_UNEXPECTED): S.ABORTED,
    (CLIENT, S.DECLINED_WAIT, I.RECV_GARBAGE): S.ABORTED,
    (CLIENT, S.DECLINED_WAIT, I.RECV_NOT_SMCISH): S.ABORTED,
    (CLIENT, S.DECLINED_WAIT, I.TIMER): S.ABORTED,
    (CLIENT, S.DECLINED_WAIT, I.EOF): S.ABORTED,
    (CLIENT, S.ESTABLISHED, I.RECV_BYTES): S.ABORTED,
    # ---- server
    (SERVER, S.IDLE, I.WAIT_PROPOSAL): S.WAIT_PROPOSAL,
    (SERVER, S.IDLE, I.FALLBACK_NOW): S.FELL_BACK,
    (SERVER, S.WAIT_PROPOSAL, I.FALLBACK_NOW): S.FELL_BACK,
    (SERVER, S.WAIT_PROPOSAL, I.RECV_PROPOSAL): S.PROPOSAL_RECEIVED,
    (SERVER, S.WAIT_PROPOSAL, I.RECV_DECLINE): S.FELL_BACK,         # never answered
    (SERVER, S.WAIT_PROPOSAL, I.RECV_UNEXPECTED): S.FELL_BACK,      # we answer DECLINE(reason)
    (SERVER, S.WAIT_PROPOSAL, I.RECV_GARBAGE): S.ABORTED,
    (SERVER, S.WAIT_PROPOSAL, I.RECV_NOT_SMCISH): S.FELL_BACK,      # plain client: replay it all
    (SERVER, S.WAIT_PROPOSAL, I.TIMER): S.FELL_BACK,
    (SERVER, S.WAIT_PROPOSAL, I.EOF): S.FELL_BACK,                  # plain client that hung up
    (SERVER, S.PROPOSAL_RECEIVED, I.SEND_ACCEPT): S.WAIT_CONFIRM,
    (SERVER, S.PROPOSAL_RECEIVED, I.SEND_DECLINE): S.DRAIN_DECLINE,
    (SERVER, S.PROPOSAL_RECEIVED, I.RECV_BYTES): S.ABORTED,         # more than one message's worth
    (SERVER, S.PROPOSAL_RECEIVED, I.TIMER): S.DRAIN_DECLINE,        # we send DECLINE(TIMEOUT)
    (SERVER, S.PROPOSAL_RECEIVED, I.EOF): S.ABORTED,
    (SERVER, S.DRAIN_DECLINE, I.NOTHING_CROSSED): S.FELL_BACK,
    (SERVER, S.DRAIN_DECLINE, I.RECV_DECLINE): S.FELL_BACK,
    (SERVER, S.DRAIN_DECLINE, I.RECV_UNEXPECTED): S.ABORTED,
    (SERVER, S.DRAIN_DECLINE, I.RECV_GARBAGE): S.ABORTED,
    (SERVER, S.DRAIN_DECLINE, I.TIMER): S.ABORTED,
    (SERVER, S.DRAIN_DECLINE, I.EOF): S.ABORTED,
    (SERVER, S.WAIT_CONFIRM, I.RECV_CONFIRM): S.ESTABLISHED,
    (SERVER, S.WAIT_CONFIRM, I.RECV_DECLINE): S.FELL_BACK,
    (SERVER, S.WAIT_CONFIRM, I.RECV_UNEXPECTED): S.ABORTED,         # we already sent our answer
    (SERVER, S.WAIT_CONFIRM, I.RECV_GARBAGE): S.ABORTED,
    (SERVER, S.WAIT_CONFIRM, I.TIMER): S.ABORTED,
    (SERVER, S.WAIT_CONFIRM, I.EOF): S.ABORTED,
    (SERVER, S.ESTABLISHED, I.RECV_BYTES): S.ABORTED,
}

# States that parse handshake messages, and the non-DECLINE message each waits for (a DECLINE is
# always RECV_DECLINE). Any other intact message is RECV_UNEXPECTED.
_EXPECTED: dict[ClcState, type | None] = {
    S.WAIT_PROPOSAL: Proposal,
    S.WAIT_ACCEPT: Accept,
    S.DECLINED_WAIT: Accept,
    S.WAIT_CONFIRM: Confirm,
    S.DRAIN_DECLINE: None,
}
# Reading states in which the peer has not sent a handshake message yet: non-magic first bytes
# mean the peer does not speak smcish (RECV_NOT_SMCISH), not a broken stream (RECV_GARBAGE).
_FIRST_CONTACT = frozenset({S.WAIT_PROPOSAL, S.WAIT_ACCEPT, S.DECLINED_WAIT})
# States in which the peer must not send anything at all.
_SILENT = frozenset({S.ACCEPT_RECEIVED, S.ESTABLISHED})
# Entering one of these states arms the timer to now + factor * timeout. ACCEPT_RECEIVED keeps
# the deadline of WAIT_ACCEPT (one budget from PROPOSAL to CONFIRM on the client). Other states
# have no timer.
_DEADLINES: dict[ClcState, float] = {
    S.WAIT_PROPOSAL: 1.0,
    S.PROPOSAL_RECEIVED: 0.5,       # the server's decision budget: answer well before the client gives up
    S.WAIT_CONFIRM: 1.0,
    S.DRAIN_DECLINE: 1.0,
    S.WAIT_ACCEPT: 1.0,
    S.DECLINED_WAIT: 1.0,
}
_KEEP_DEADLINE = frozenset({S.ACCEPT_RECEIVED})
# States in which the shell decides (accept/confirm/decline); a decision at or after the deadline
# is void: the timer fires instead.
_DECIDING = frozenset({S.PROPOSAL_RECEIVED, S.ACCEPT_RECEIVED})
TERMINAL_STATES = frozenset({S.FELL_BACK, S.ABORTED})

del S, I


class _Frame(NamedTuple):
    """One classified unit of received bytes."""

    input: _Input
    length: int                         # bytes it occupies at the head of the buffer (0: not consumed)
    message: Message | None = None
    reason: DeclineReason | None = None
    detail: str = ""


class ClcConnection:
    """One side of one handshake, as a pure object: bytes and time in, bytes and events out.

    Outgoing bytes go to one buffer. ``data_to_send()`` drains it; ``propose``, ``accept``,
    ``decline``, ``confirm`` and ``handle_timer`` drain it too and return what they drained (so
    nothing is sent twice and order is kept). After ``receive_data``, ``receive_eof``,
    ``wait_proposal`` and ``fallback_now`` the shell calls ``data_to_send()``.

    Args:
        role: ``"client"`` or ``"server"``.
        now: the current time (the shell's ``loop.time()``), kept as ``created_at``.
        timeout: the handshake timeout in seconds (see docs/handshake.md for each state's budget).

    Attributes:
        role, state, timeout, created_at.
        proposal: the PROPOSAL sent (client) or received (server), once known.
        accepted: the ACCEPT received (client) or sent (server), once known.
        version: the negotiated protocol version, once known.
        reason: the DeclineReason of the fallback or abort, once it happened.
    """

    def __init__(self, role: Role, now: float, timeout: float = 2.0) -> None:
        if role not in (CLIENT, SERVER):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout!r}")
        self.role: Role = role
        self.state = ClcState.IDLE
        self.timeout = float(timeout)
        self.created_at = now
        self.proposal: Proposal | None = None
        self.accepted: Accept | None = None
        self.version: int | None = None
        self.reason: DeclineReason | None = None
        self._rx = bytearray()                  # received, not yet consumed
        self._tx = bytearray()                  # to send
        self._events: deque[Event] = deque()
        self._deadline: float | None = None
        self._eof = False
        self._sent_decline: DeclineReason | None = None   # the one DECLINE we sent, if any

    def __repr__(self) -> str:
        return (f"<ClcConnection {self.role} {self.state.name} rx={len(self._rx)} "
                f"tx={len(self._tx)} deadline={self._deadline}>")

    # ------------------------------------------------------------------------------ queries
    @property
    def done(self) -> bool:
        """True once the handshake has an outcome: ESTABLISHED, FELL_BACK or ABORTED."""
        return self.state is ClcState.ESTABLISHED or self.state in TERMINAL_STATES

    def next_event(self) -> Event | None:
        """Pop the oldest pending event, or None."""
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        """Drain and return the bytes to write on the TCP connection (b"" if none)."""
        out = bytes(self._tx)
        self._tx.clear()
        return out

    def get_timer(self) -> float | None:
        """The absolute time at which ``handle_timer`` must be called, or None."""
        return self._deadline

    # ------------------------------------------------------------------------------ local calls
    def propose(self, proposal: Proposal, now: float) -> bytes:
        """Client: start the handshake.

        Returns:
            The PROPOSAL bytes (plus anything already pending).

        Raises:
            ClcStateError: not a client, or already started.
        """
        if not isinstance(proposal, Proposal):
            raise TypeError(f"propose() needs a Proposal, not {type(proposal).__name__}")
        self._step(_Input.PROPOSE, now)
        self.proposal = proposal
        self._tx += encode(proposal)
        self._process(now)          # bytes that arrived before propose()
        return self.data_to_send()

    def wait_proposal(self, now: float) -> None:
        """Server: wait (at most ``timeout``) for the client's PROPOSAL.

        Raises:
            ClcStateError: not a server, or already started.
        """
        self._step(_Input.WAIT_PROPOSAL, now)
        self._process(now)

    def fallback_now(self, reason: DeclineReason) -> None:
        """Server, before any handshake message was parsed: plain TCP, nothing sent.

        Emits FellBack(reason, by_peer=False, data=every byte received so far).

        Raises:
            ClcStateError: not a server, or a PROPOSAL was already parsed.
        """
        self._step(_Input.FALLBACK_NOW, None)
        self._fall_back(DeclineReason(reason))

    def accept(self, accept: Accept, now: float) -> bytes:
        """Server, after ProposalReceived: send ACCEPT and wait for CONFIRM.

        Returns:
            The ACCEPT bytes; b"" if the handshake already ended (e.g. the decision timer fired
            first): then release whatever was prepared for this connection.

        Raises:
            ValueError: ``accept.version`` is not one both sides speak.
            ClcStateError: wrong role or state.
        """
        if not isinstance(accept, Accept):
            raise TypeError(f"accept() needs an Accept, not {type(accept).__name__}")
        if self.state in TERMINAL_STATES or self._decided_too_late(now):
            return self.data_to_send()
        if self.state is ClcState.PROPOSAL_RECEIVED:
            assert self.proposal is not None
            if not (self.proposal.min_version <= accept.version <= self.proposal.max_version
                    and MIN_PROTOCOL_VERSION <= accept.version <= PROTOCOL_VERSION):
                raise ValueError(f"ACCEPT version {accept.version} is not in common with "
                                 f"the proposal's {self.proposal.min_version}..{self.proposal.max_version}")
        self._step(_Input.SEND_ACCEPT, now)
        self.accepted = accept
        self.version = accept.version
        self._tx += encode(accept)
        self._process(now)          # the client's DECLINE(TIMEOUT) may already be here
        return self.data_to_send()

    def decline(self, reason: DeclineReason, now: float) -> bytes:
        """Server after ProposalReceived, or client after AcceptReceived: send DECLINE, plain TCP.

        Emits FellBack(reason, by_peer=False, data=bytes after the peer's last handshake message).

        Returns:
            The DECLINE bytes; b"" if the handshake already ended.

        Raises:
            ClcStateError: wrong role or state.
        """
        reason = DeclineReason(reason)
        if reason is DeclineReason.PEER_DECLINED:
            raise ValueError("PEER_DECLINED is reserved: on the wire it acknowledges the peer's own DECLINE")
        if self.state in TERMINAL_STATES or self._decided_too_late(now):
            return self.data_to_send()
        self._step(_Input.SEND_DECLINE, now)
        if self.state is ClcState.DRAIN_DECLINE:
            self._enter_drain(reason, now)
        else:
            self._send_decline(reason)
            self._fall_back(reason)
        return self.data_to_send()

    def confirm(self, now: float) -> bytes:
        """Client, after AcceptReceived and a successful attach: send CONFIRM. Emits Established.

        Returns:
            The CONFIRM bytes; b"" if the handshake already ended (timer, or the server broke
            the protocol): then release the attached region.

        Raises:
            ClcStateError: wrong role or state.
        """
        if self.state in TERMINAL_STATES or self._decided_too_late(now):
            return self.data_to_send()
        self._step(_Input.SEND_CONFIRM, now)
        self._tx += encode(_CONFIRM)
        self._events.append(Established())
        return self.data_to_send()

    # ------------------------------------------------------------------------------ peer and time
    def receive_data(self, data: bytes, now: float) -> None:
        """Feed bytes received on the TCP connection; then read events and ``data_to_send()``.

        After Established, route stray TCP bytes here too: they give Aborted(PROTOCOL_ERROR).
        After Aborted, bytes are ignored.

        Raises:
            ClcStateError: after FellBack (those bytes belong to the application) or after EOF.
        """
        if self.state is ClcState.ABORTED:
            return
        if self.state is ClcState.FELL_BACK:
            raise ClcStateError("receive_data() after FellBack: deliver the bytes to the application")
        if self._eof:
            raise ClcStateError("receive_data() after receive_eof()")
        if not data:
            return
        self._rx += data
        self._process(now)

    def receive_eof(self, now: float) -> None:
        """The peer closed its sending side.

        Server waiting for a PROPOSAL: FellBack(PEER_NOT_SMCISH, data=everything received), a
        plain client that sent its request (or nothing) and half-closed; deliver EOF to the
        application after the data. Any other handshake state: Aborted(PROTOCOL_ERROR). IDLE:
        remembered until the handshake starts. ESTABLISHED: nothing (TCP EOF is the data path's
        close/liveness signal). ABORTED: ignored.

        Raises:
            ClcStateError: after FellBack.
        """
        if self.state is ClcState.FELL_BACK:
            raise ClcStateError("receive_eof() after FellBack: deliver EOF to the application")
        self._eof = True
        self._process(now)

    def handle_timer(self, now: float) -> bytes:
        """Call at (or after) ``get_timer()``; early calls do nothing.

        Returns:
            Bytes to send (e.g. DECLINE(TIMEOUT)); events may follow.
        """
        if self._deadline is not None and now >= self._deadline:
            self._fire_timer(now)
        return self.data_to_send()

    def _decided_too_late(self, now: float) -> bool:
        """A shell decision at or after the deadline loses to the timer (the decision budget is
        a guarantee, whatever order the loop runs callbacks in). True if the timer fired."""
        if (self.state in _DECIDING and self._deadline is not None and now >= self._deadline):
            self._fire_timer(now)
            return True
        return False

    def _fire_timer(self, now: float) -> None:
        before = self.state
        after = self._step(_Input.TIMER, now)
        if before is ClcState.WAIT_PROPOSAL:
            self._fall_back(DeclineReason.TIMEOUT)
        elif before is ClcState.WAIT_ACCEPT:
            self._send_decline(DeclineReason.TIMEOUT)       # now DECLINED_WAIT, re-armed
            self._process(now)
        elif before is ClcState.ACCEPT_RECEIVED:
            self._send_decline(DeclineReason.TIMEOUT)
            self._fall_back(DeclineReason.TIMEOUT)
        elif before is ClcState.PROPOSAL_RECEIVED:
            self._enter_drain(DeclineReason.TIMEOUT, now)
        else:
            assert after is ClcState.ABORTED
            self._abort(DeclineReason.TIMEOUT, f"timed out in {before.name}")

    # ------------------------------------------------------------------------------ internals
    def _step(self, inp: _Input, now: float | None) -> ClcState:
        """Apply one whitelisted transition and (re)arm the timer for the new state."""
        key = (self.role, self.state, inp)
        nxt = _TRANSITIONS.get(key)
        if nxt is None:
            if inp in _LOCAL:
                raise ClcStateError(f"{inp.value} is not allowed for a {self.role} in state {self.state.name}")
            raise AssertionError(f"unhandled {inp.name} for a {self.role} in {self.state.name}")
        self.state = nxt
        factor = _DEADLINES.get(nxt)
        if factor is not None:
            assert now is not None
            self._deadline = now + factor * self.timeout
        elif nxt not in _KEEP_DEADLINE:
            self._deadline = None
        return nxt

    def _send_decline(self, reason: DeclineReason, wire: DeclineReason | None = None) -> None:
        """Send our one DECLINE; ``reason`` is what we report locally, ``wire`` what we send."""
        assert self._sent_decline is None, "a side sends at most one DECLINE"
        self._sent_decline = reason
        self._tx += encode(Decline(wire or reason))

    def _enter_drain(self, reason: DeclineReason, now: float) -> None:
        """Server declines (shell or decision timer), now in DRAIN_DECLINE.

        If bytes of the client's DECLINE(TIMEOUT) are already here, our DECLINE carries
        PEER_DECLINED ("yours arrived, I consume it") and we drain it before falling back. Otherwise
        we send ``reason`` and fall back at once: a client that timed out meanwhile will see a
        DECLINE other than PEER_DECLINED and abort, since we will never consume its DECLINE.
        """
        if self._rx:
            self._send_decline(reason, wire=DeclineReason.PEER_DECLINED)
            self._process(now)
        else:
            self._send_decline(reason)
            self._step(_Input.NOTHING_CROSSED, now)
            self._fall_back(reason)

    def _fall_back(self, reason: DeclineReason, *, by_peer: bool = False,
                   peer_code: int | None = None) -> None:
        if self._sent_decline is not None:      # our own DECLINE is what the peer will act on
            reason, by_peer, peer_code = self._sent_decline, False, None
        data = bytes(self._rx)
        self._rx.clear()
        self.reason = reason
        self._events.append(FellBack(reason, by_peer, data, peer_code))

    def _abort(self, reason: DeclineReason, message: str) -> None:
        self._rx.clear()
        self.reason = reason
        self._events.append(Aborted(reason, message))

    def _classify(self) -> _Frame | None:
        """Classify the bytes at the head of the buffer in a reading state (None: need more)."""
        state = self.state
        if not _magic_ok(self._rx):
            if state in _FIRST_CONTACT:
                return _Frame(_Input.RECV_NOT_SMCISH, 0, detail="first bytes are not the smcish magic")
            return _Frame(_Input.RECV_GARBAGE, 0, reason=DeclineReason.PROTOCOL_ERROR,
                          detail="bad leading magic")
        try:
            msg, length = decode(self._rx)
        except ClcError as err:
            if not err.resync:
                return _Frame(_Input.RECV_GARBAGE, 0, reason=err.reason, detail=str(err))
            if err.msg_type == MessageType.DECLINE:
                inp = _Input.RECV_CROSSED_DECLINE if state is ClcState.DECLINED_WAIT else _Input.RECV_DECLINE
                return _Frame(inp, err.length, reason=DeclineReason.PROTOCOL_ERROR, detail=str(err))
            return _Frame(_Input.RECV_UNEXPECTED, err.length, reason=err.reason, detail=str(err))
        if msg is None:
            return None
        if isinstance(msg, Decline):
            if state is ClcState.DECLINED_WAIT and msg.code != DeclineReason.PEER_DECLINED:
                return _Frame(_Input.RECV_CROSSED_DECLINE, length, msg, msg.reason,
                              f"our DECLINE(TIMEOUT) crossed the server's DECLINE({msg.reason.name}): "
                              "the server fell back before it arrived and would read it as data")
            return _Frame(_Input.RECV_DECLINE, length, msg, msg.reason)
        if not isinstance(msg, _EXPECTED[state] or ()):
            return _Frame(_Input.RECV_UNEXPECTED, length, msg, DeclineReason.PROTOCOL_ERROR,
                          f"unexpected {type(msg).__name__.upper()} in {state.name}")
        if isinstance(msg, Proposal):
            if msg.common_version() is None:
                return _Frame(_Input.RECV_UNEXPECTED, length, msg, DeclineReason.VERSION_MISMATCH,
                              f"client speaks {msg.min_version}..{msg.max_version}, we speak "
                              f"{MIN_PROTOCOL_VERSION}..{PROTOCOL_VERSION}")
            return _Frame(_Input.RECV_PROPOSAL, length, msg)
        if isinstance(msg, Accept):
            if state is ClcState.WAIT_ACCEPT and not self._accept_version_ok(msg):
                return _Frame(_Input.RECV_UNEXPECTED, length, msg, DeclineReason.VERSION_MISMATCH,
                              f"server chose version {msg.version}, not one we proposed")
            return _Frame(_Input.RECV_ACCEPT, length, msg)
        return _Frame(_Input.RECV_CONFIRM, length, msg)

    def _accept_version_ok(self, accept: Accept) -> bool:
        proposal = self.proposal
        assert proposal is not None
        return (proposal.min_version <= accept.version <= proposal.max_version
                and MIN_PROTOCOL_VERSION <= accept.version <= PROTOCOL_VERSION)

    def _process(self, now: float) -> None:
        """Consume buffered bytes as far as the state allows, then a pending EOF."""
        while self._rx:
            state = self.state
            if state in _EXPECTED:
                frame = self._classify()
                if frame is None:
                    break
                self._on_frame(frame, now)
            elif state in _SILENT:
                self._step(_Input.RECV_BYTES, now)
                self._abort(DeclineReason.PROTOCOL_ERROR,
                            f"{len(self._rx)} bytes on the TCP connection in {state.name}")
            elif state is ClcState.PROPOSAL_RECEIVED and len(self._rx) > MAX_MESSAGE:
                # Only the client's DECLINE(TIMEOUT) may cross our answer: hold at most one message.
                self._step(_Input.RECV_BYTES, now)
                self._abort(DeclineReason.PROTOCOL_ERROR,
                            "client sent more than one message before our answer")
            else:
                break               # IDLE, PROPOSAL_RECEIVED: hold; terminal: nothing to do
        if self._eof and (self.role, self.state, _Input.EOF) in _TRANSITIONS:
            before = self.state
            if self._step(_Input.EOF, now) is ClcState.FELL_BACK:
                self._fall_back(DeclineReason.PEER_NOT_SMCISH)
            else:
                self._abort(DeclineReason.PROTOCOL_ERROR,
                            f"peer closed the connection during the handshake ({before.name})")

    def _on_frame(self, frame: _Frame, now: float) -> None:
        """Consume one classified unit and apply its effects."""
        inp = frame.input
        del self._rx[:frame.length]
        nxt = self._step(inp, now)
        if inp is _Input.RECV_PROPOSAL:
            assert isinstance(frame.message, Proposal)
            self.proposal = frame.message
            self.version = frame.message.common_version()
            assert self.version is not None
            self._events.append(ProposalReceived(frame.message, self.version))
        elif inp is _Input.RECV_ACCEPT and nxt is ClcState.ACCEPT_RECEIVED:
            assert isinstance(frame.message, Accept)
            self.accepted = frame.message
            self.version = frame.message.version
            self._events.append(AcceptReceived(frame.message))
        elif inp is _Input.RECV_CONFIRM:
            self._events.append(Established())
        elif nxt is ClcState.FELL_BACK:
            if inp is _Input.RECV_UNEXPECTED:
                assert frame.reason is not None
                self._send_decline(frame.reason)
                self._fall_back(frame.reason)
            elif inp is _Input.RECV_NOT_SMCISH:
                self._fall_back(DeclineReason.PEER_NOT_SMCISH)
            else:
                assert inp in (_Input.RECV_DECLINE, _Input.RECV_ACCEPT)
                code = frame.message.code if isinstance(frame.message, Decline) else None
                self._fall_back(frame.reason or DeclineReason.PROTOCOL_ERROR,
                                by_peer=inp is _Input.RECV_DECLINE, peer_code=code)
        elif nxt is ClcState.ABORTED:
            if inp is _Input.RECV_CROSSED_DECLINE:
                self._abort(DeclineReason.TIMEOUT, frame.detail)
            elif inp is _Input.RECV_NOT_SMCISH:
                self._abort(DeclineReason.PEER_NOT_SMCISH,
                            "the server answered with non-smcish bytes (a plain server-first "
                            "protocol?); our PROPOSAL already reached it")
            else:
                self._abort(DeclineReason.PROTOCOL_ERROR, f"{frame.detail or inp.value} in {self.role} "
                            f"handshake")
        else:
            raise AssertionError(f"no effect for {inp.name} -> {nxt.name}")
