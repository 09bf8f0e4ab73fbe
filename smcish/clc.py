"""Sans-I/O connection set-up through a link group: decline reasons and the claim/decision state machine.

Everything that decides what the set-up does lives here, and most of it is data:
``_TRANSITIONS`` (which input is allowed in which state and where it leads) and ``_WRITES`` (which
phase a transition publishes into our own set-up record). Nothing here touches shared memory, a
socket, a loop or a clock: the shell (smcish/protocol.py, smcish/linkgroup.py) publishes records,
feeds snapshots of the peer's record in with ``observe()``, passes ``now`` in, arms a timer at
``deadline`` and reacts to ``next_event()``.

The protocol (docs/design.md section 3.3): the client claims a slot (its ring block and the 4-tuple
of its socket) before it connects; the server, at accept, verifies the claim against the kernel's
view of the accepted socket and answers ACCEPTED (with its ring block) or DECLINED. No byte of the
set-up is ever written to the TCP connection, and the client's word decides:
- an OPTIMISTIC claim (the default) means "ISM unless I withdraw": the client hands the
  connection to its application at once and writes into its ring; a server that publishes
  ACCEPTED and then (after a fence) still reads OPTIMISTIC is established at once; a client that
  gives up (timer, or TCP bytes from a server that is not ours) publishes WITHDRAWING, and after
  a fence reads the server's record: ACCEPTED means the server got there first (ISM after all,
  FINAL_ISM), anything else FINAL_TCP (the client resends what it wrote over TCP);
- a CLAIMED claim (sockets the caller connects itself) waits for the decision and then gives a
  FINAL_ISM or FINAL_TCP word that the server waits for.
The client's timer bounds its wait; the server's (twice as long) bounds its wait for a final word.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Literal, TypeAlias

__all__ = [
    "PHASE_ACCEPTED", "PHASE_CLAIMED", "PHASE_DECLINED", "PHASE_FINAL_ISM", "PHASE_FINAL_TCP",
    "PHASE_NONE", "PHASE_OPTIMISTIC", "PHASE_WITHDRAWING", "TERMINAL_STATES", "Aborted",
    "DeclineReason", "Established", "Event", "FellBack", "Role", "SetupMachine", "SetupState",
    "SetupStateError",
]

# Set-up phases as stored in a slot header (mirror smcish/_cffi/ring.h SMC_PHASE_*; a test checks).
PHASE_NONE = 0
PHASE_CLAIMED = 1          # client
PHASE_FINAL_ISM = 2        # client
PHASE_FINAL_TCP = 3        # client
PHASE_OPTIMISTIC = 4       # client
PHASE_WITHDRAWING = 5      # client
PHASE_ACCEPTED = 1         # server
PHASE_DECLINED = 2         # server


class DeclineReason(enum.IntEnum):
    """Why a connection is not (or no longer) on shared memory; classes follow SMC's (high byte).

    Each member has ``.description`` (a human sentence) and ``.category`` (its class name).
    """

    description: str

    # The default only lets type checkers see ``DeclineReason(code)`` (a lookup by value, which
    # never calls this): every member passes a description (tests/test_clc.py checks).
    def __new__(cls, code: int, description: str = "") -> DeclineReason:
        member = int.__new__(cls, code)
        member._value_ = code
        member.description = description
        return member

    # 0x01xx resources
    NO_MEMORY = 0x0101, ("no shared memory for the connection (link group slots or extents exhausted, "
                         "or out of memory)")
    ATTACH_FAILED = 0x0102, "the peer's shared memory could not be attached"
    QUOTA = 0x0103, "the ISM device refused the memory: quota exceeded"
    NO_FD = 0x0104, "no file descriptor was available (RLIMIT_NOFILE reached)"
    NO_PORT = 0x0105, "no client port free of earlier connections to that address could be bound"
    # 0x02xx timeout
    TIMEOUT = 0x0201, "the set-up timed out"
    # 0x03xx configuration
    NO_DEVICE = 0x0301, "no ISM device is available (set SMCISH_DEVICE or start ismd)"
    DISABLED_BY_POLICY = 0x0302, "shared memory is disabled by configuration or policy"
    PEER_NOT_ADVERTISED = 0x0303, ("the listener that accepts this connection is not an smcish one on "
                                   "this device")
    GID_MISMATCH = 0x0304, "the peers are on different sharing domains (gid mismatch)"
    LEARNED_DECLINE = 0x0305, ("skipped: set-ups to this destination kept falling back for a reason of "
                               "the peer's (learned policy)")
    LEARNED_SHORT_LIVED = 0x0306, ("skipped: connections to this destination kept ending within "
                                   "short_lived_ms (learned policy)")
    # 0x04xx peer
    VERSION_MISMATCH = 0x0401, "the peers have no protocol version in common"
    PROTOCOL_ERROR = 0x0402, "the peer broke the set-up protocol"
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
        """Map a code read from a peer's record; codes this version does not know map to PEER_DECLINED."""
        try:
            return cls(code)
        except ValueError:
            return cls.PEER_DECLINED


_CATEGORIES = {1: "resources", 2: "timeout", 3: "configuration", 4: "peer", 5: "internal"}

Role = Literal["client", "server"]
CLIENT: Role = "client"
SERVER: Role = "server"


class SetupState(enum.Enum):
    """Set-up states. Terminal: ESTABLISHED, FELL_BACK, ABORTED."""

    __hash__ = object.__hash__    # members are singletons: identity hash, in C (transition lookups)

    IDLE = "idle"
    CLAIMED = "claimed"                   # client: record published, waiting for the decision
    OPTIMISTIC = "optimistic"             # client: record published, already sending: ISM unless withdrawn
    WITHDRAWING = "withdrawing"           # client: WITHDRAWING published, the server's record decides
    ACCEPTED_SEEN = "accepted-seen"       # client: the shell builds the ring, then confirm() / decline()
    WAIT_FINAL = "wait-final"             # server: ACCEPTED published, waiting for the client's final word
    ESTABLISHED = "established"
    FELL_BACK = "fell-back"
    ABORTED = "aborted"


S = SetupState
TERMINAL_STATES = frozenset({S.ESTABLISHED, S.FELL_BACK, S.ABORTED})


class _Input(enum.Enum):
    __hash__ = object.__hash__
    CLAIM = "claim()"
    CLAIM_OPTIMISTIC = "claim(optimistic=True)"
    WITHDRAW = "withdraw()"
    PEER_SILENT = "no answer from the server after our withdrawal"
    ACCEPT = "accept()"
    DECLINE = "decline()"
    CONFIRM = "confirm()"
    ABANDON = "abandon()"
    PEER_ACCEPTED = "the server's ACCEPTED"
    PEER_DECLINED = "the server's DECLINED"
    PEER_FINAL_ISM = "the client's FINAL_ISM"
    PEER_FINAL_TCP = "the client's FINAL_TCP"
    PEER_GONE = "the client moved on or vanished without a final word"
    TIMER = "timer expiry"


I = _Input  # noqa: E741 - a one-letter alias like S, to keep the transition table readable
_LOCAL = frozenset({I.CLAIM, I.CLAIM_OPTIMISTIC, I.WITHDRAW, I.ACCEPT, I.DECLINE, I.CONFIRM,
                    I.ABANDON})

# The whitelist: (role, state, input) -> next state. Anything absent is refused (local calls raise
# SetupStateError; observations that classify to an absent input are ignored, see observe()).
_TRANSITIONS: dict[tuple[Role, SetupState, _Input], SetupState] = {
    (CLIENT, S.IDLE, I.CLAIM): S.CLAIMED,
    (CLIENT, S.CLAIMED, I.PEER_ACCEPTED): S.ACCEPTED_SEEN,
    (CLIENT, S.CLAIMED, I.PEER_DECLINED): S.FELL_BACK,
    (CLIENT, S.CLAIMED, I.TIMER): S.FELL_BACK,
    (CLIENT, S.CLAIMED, I.ABANDON): S.FELL_BACK,
    (CLIENT, S.ACCEPTED_SEEN, I.CONFIRM): S.ESTABLISHED,
    (CLIENT, S.ACCEPTED_SEEN, I.DECLINE): S.FELL_BACK,
    (CLIENT, S.ACCEPTED_SEEN, I.TIMER): S.FELL_BACK,
    (CLIENT, S.ACCEPTED_SEEN, I.ABANDON): S.FELL_BACK,
    (CLIENT, S.IDLE, I.CLAIM_OPTIMISTIC): S.OPTIMISTIC,
    (CLIENT, S.OPTIMISTIC, I.PEER_ACCEPTED): S.ACCEPTED_SEEN,      # the server is established
    (CLIENT, S.OPTIMISTIC, I.PEER_DECLINED): S.FELL_BACK,           # resend over TCP
    (CLIENT, S.OPTIMISTIC, I.TIMER): S.WITHDRAWING,
    (CLIENT, S.OPTIMISTIC, I.WITHDRAW): S.WITHDRAWING,
    (CLIENT, S.OPTIMISTIC, I.ABANDON): S.FELL_BACK,                 # the connect failed
    (CLIENT, S.WITHDRAWING, I.PEER_ACCEPTED): S.ACCEPTED_SEEN,      # the server got there first
    (CLIENT, S.WITHDRAWING, I.PEER_DECLINED): S.FELL_BACK,
    (CLIENT, S.WITHDRAWING, I.PEER_SILENT): S.FELL_BACK,
    (SERVER, S.IDLE, I.ACCEPT): S.WAIT_FINAL,
    (SERVER, S.IDLE, I.DECLINE): S.FELL_BACK,
    (SERVER, S.WAIT_FINAL, I.PEER_FINAL_ISM): S.ESTABLISHED,
    (SERVER, S.WAIT_FINAL, I.PEER_FINAL_TCP): S.FELL_BACK,
    (SERVER, S.WAIT_FINAL, I.PEER_GONE): S.FELL_BACK,
    (SERVER, S.WAIT_FINAL, I.TIMER): S.ABORTED,
}

# What a transition publishes into our own record (phase), besides the shell's full publishes
# (the client's CLAIMED and the server's ACCEPTED carry ring blocks: the shell writes those).
_WRITES: dict[tuple[Role, _Input], int] = {
    (CLIENT, I.WITHDRAW): PHASE_WITHDRAWING,
    (CLIENT, I.PEER_SILENT): PHASE_FINAL_TCP,
    (CLIENT, I.PEER_DECLINED): PHASE_FINAL_TCP,
    (CLIENT, I.TIMER): PHASE_FINAL_TCP,
    (CLIENT, I.ABANDON): PHASE_FINAL_TCP,
    (CLIENT, I.DECLINE): PHASE_FINAL_TCP,
    (CLIENT, I.CONFIRM): PHASE_FINAL_ISM,
    (SERVER, I.DECLINE): PHASE_DECLINED,
}

# Timer per state, as a multiple of the set-up timeout: the client bounds its whole wait; the server
# waits longer than any honest client can, then gives up on the connection.
_DEADLINES: dict[tuple[Role, SetupState], float] = {
    (CLIENT, S.CLAIMED): 1.0,
    (CLIENT, S.OPTIMISTIC): 1.0,
    (SERVER, S.WAIT_FINAL): 2.0,
}


_SERVER_FINALS = {PHASE_FINAL_ISM: I.PEER_FINAL_ISM, PHASE_OPTIMISTIC: I.PEER_FINAL_ISM,
                  PHASE_FINAL_TCP: I.PEER_FINAL_TCP}


class SetupStateError(RuntimeError):
    """The shell called a method its role or the current state does not allow."""


@dataclass(frozen=True)
class Established:
    """Both: the ring carries the data from now on; the TCP connection must stay silent."""


@dataclass(frozen=True)
class FellBack:
    """Both: plain TCP on the same socket; ``by_peer`` when the peer's word decided it."""

    reason: DeclineReason
    by_peer: bool


@dataclass(frozen=True)
class Aborted:
    """Server: the client never gave its final word: reset the TCP connection."""

    reason: DeclineReason
    message: str


Event: TypeAlias = Established | FellBack | Aborted


class SetupMachine:
    """One side of one connection's set-up.

    Args:
        role: ``"client"`` or ``"server"``.
        now: the loop's time.
        timeout: the set-up timeout in seconds (``Config.handshake_timeout``).

    After each call, publish ``take_write()`` (a ``(phase, reason)`` or None) into our own record
    *before* acting on events, arm a timer at ``deadline`` (None: none), and drain ``next_event()``.
    """

    def __init__(self, role: Role, now: float, timeout: float) -> None:
        if role not in (CLIENT, SERVER):
            raise ValueError(f"role must be 'client' or 'server', not {role!r}")
        self.role: Role = role
        self.state = S.IDLE
        self.timeout = timeout
        self.gen = 0
        self.deadline: float | None = None
        self.reason: DeclineReason | None = None
        self.optimistic = False
        self._withdraw_reason = DeclineReason.TIMEOUT
        self._write: tuple[int, int] | None = None
        self._events: list[Event] = []

    # ------------------------------------------------------------------ local calls
    def claim(self, gen: int, now: float, optimistic: bool = False) -> None:
        """Client: our CLAIMED (or OPTIMISTIC) record for ``gen`` is published (by the shell)."""
        self.gen = gen
        self.optimistic = optimistic
        self._step(I.CLAIM_OPTIMISTIC if optimistic else I.CLAIM, now)

    def connected(self, now: float) -> None:
        """Client: the TCP connection is up. The timer of an unanswered claim restarts now: a
        slow connect (SYN retries under a full listen backlog) must not eat the server's time
        to answer, which only starts at its accept()."""
        if self.state in (S.CLAIMED, S.OPTIMISTIC):
            self.deadline = now + _DEADLINES[(self.role, self.state)] * self.timeout

    def withdraw(self, reason: DeclineReason, now: float) -> None:
        """Client, optimistic: give up (TCP bytes or EOF from a server that is not ours).

        Publish ``take_write()`` (WITHDRAWING), then read the server's record and pass it to
        ``settle()``: the server may have accepted first.
        """
        if self.state is not S.OPTIMISTIC:
            return
        self._withdraw_reason = DeclineReason(reason)
        self._step(I.WITHDRAW, now, reason)

    def settle(self, gen: int, phase: int, reason: int, now: float) -> None:
        """Client, WITHDRAWING: the server's record read after our WITHDRAWING was published."""
        if self.state is not S.WITHDRAWING:
            return
        inp = self._classify(gen, phase) or I.PEER_SILENT
        self._step(inp, now, self._withdraw_reason if inp is I.PEER_SILENT else reason)
        if inp is I.PEER_DECLINED:
            self._fall_back(DeclineReason.from_code(reason), by_peer=True)
        elif inp is I.PEER_SILENT:
            self._fall_back(self._withdraw_reason, by_peer=False)

    def accept(self, gen: int, now: float) -> None:
        """Server: our ACCEPTED record for the client's ``gen`` is published (by the shell)."""
        self.gen = gen
        self._step(I.ACCEPT, now)

    def confirm(self, now: float) -> None:
        """Client, after ACCEPTED and a ring built from the server's block: FINAL_ISM."""
        if not self.optimistic and self._late(now):
            return
        self._step(I.CONFIRM, now)
        self._events.append(Established())

    def decline(self, reason: DeclineReason, now: float, gen: int | None = None) -> None:
        """Server before accepting (``gen``: the claim's), or client after ACCEPTED: go TCP."""
        if gen is not None:
            self.gen = gen
        if self.role == CLIENT and self._late(now):
            return
        self._step(I.DECLINE, now, reason)
        self._fall_back(DeclineReason(reason), by_peer=False)

    def abandon(self, reason: DeclineReason, now: float) -> None:
        """Client: the TCP connection failed or was cancelled before a decision: FINAL_TCP."""
        if self.state in TERMINAL_STATES:
            return
        self._step(I.ABANDON, now, reason)
        self._fall_back(DeclineReason(reason), by_peer=False)

    # ------------------------------------------------------------------ peer and time
    def observe(self, gen: int, phase: int, reason: int, now: float) -> None:
        """Feed a snapshot of the peer's set-up record for this slot.

        Records for another connection (another gen), phases that do not move us and unknown
        phases are ignored, except that a server waiting for its client's final word treats a
        record that moved on to another gen as the client giving up (``PEER_GONE``).
        """
        inp = self._classify(gen, phase)
        if inp is None or (self.role, self.state, inp) not in _TRANSITIONS:
            return
        if self.role == CLIENT and inp is I.PEER_ACCEPTED and not self.optimistic and self._late(now):
            return
        self._step(inp, now, reason)
        if inp is I.PEER_DECLINED:
            self._fall_back(DeclineReason.from_code(reason), by_peer=True)
        elif inp is I.PEER_FINAL_ISM:
            self._events.append(Established())
        elif inp is I.PEER_FINAL_TCP:
            self._fall_back(DeclineReason.from_code(reason), by_peer=True)
        elif inp is I.PEER_GONE:
            self._fall_back(DeclineReason.PEER_NOT_SMCISH, by_peer=True)

    def peer_gone(self, now: float) -> None:
        """Server: the client's TCP side closed before its final word (re-read its record first)."""
        if (self.role, self.state, I.PEER_GONE) in _TRANSITIONS:
            self._step(I.PEER_GONE, now)
            self._fall_back(DeclineReason.PEER_NOT_SMCISH, by_peer=True)

    def handle_timer(self, now: float) -> None:
        """Call at (or after) ``deadline``; early calls do nothing."""
        if self.deadline is None or now < self.deadline:
            return
        before = self.state
        if before is S.OPTIMISTIC:
            self.withdraw(DeclineReason.TIMEOUT, now)    # then the shell settles it
            return
        self._step(I.TIMER, now, DeclineReason.TIMEOUT)
        if self.state is S.FELL_BACK:
            self._fall_back(DeclineReason.TIMEOUT, by_peer=False)
        else:
            self.reason = DeclineReason.TIMEOUT
            self._events.append(Aborted(DeclineReason.TIMEOUT,
                                        f"no final word from the client in {before.name}"))

    def take_write(self) -> tuple[int, int] | None:
        """The ``(phase, reason)`` to publish into our record now, if any."""
        write, self._write = self._write, None
        return write

    def next_event(self) -> Event | None:
        return self._events.pop(0) if self._events else None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL_STATES

    # ------------------------------------------------------------------ internals
    def _classify(self, gen: int, phase: int) -> _Input | None:
        if self.role == CLIENT:
            if gen != self.gen:
                return None
            return {PHASE_ACCEPTED: I.PEER_ACCEPTED, PHASE_DECLINED: I.PEER_DECLINED}.get(phase)
        if gen != self.gen:
            return I.PEER_GONE
        # OPTIMISTIC read after our ACCEPTED (and a fence) is final: a withdrawal the client
        # publishes later will see our ACCEPTED and turn back to ISM (docs/design.md 3.3).
        return _SERVER_FINALS.get(phase)

    def _late(self, now: float) -> bool:
        """A client decision at or after its deadline loses to the timer (a guarantee to the
        server, whatever order the loop runs callbacks in). True if the timer fired."""
        if self.deadline is not None and now >= self.deadline and self.state in (S.CLAIMED, S.ACCEPTED_SEEN):
            self.handle_timer(now)
            return True
        return False

    def _step(self, inp: _Input, now: float, reason: int = 0) -> None:
        key = (self.role, self.state, inp)
        nxt = _TRANSITIONS.get(key)
        if nxt is None:
            raise SetupStateError(f"{inp.value} is not allowed for a {self.role} in state {self.state.name}")
        self.state = nxt
        factor = _DEADLINES.get((self.role, nxt))
        if factor is not None:
            self.deadline = now + factor * self.timeout
        elif nxt is not S.ACCEPTED_SEEN or self.optimistic:
            # a classic ACCEPTED_SEEN keeps the claim's deadline; an optimistic client whose
            # server accepted is established already, whatever the time
            self.deadline = None
        phase = _WRITES.get((self.role, inp))
        if phase is not None:
            self._write = (phase, int(reason))

    def _fall_back(self, reason: DeclineReason, by_peer: bool) -> None:
        self.reason = reason
        self._events.append(FellBack(reason, by_peer))
