"""Bounded-time fuzzing of smcish.clc: arbitrary bytes, chunkings, calls and times into both roles.

Run:  PYTHONPATH=. FUZZ_SECONDS=10 python tests/fuzz_clc.py        (default 10 s; exit 1 on a failure)
      PYTHONPATH=. pytest tests/fuzz_clc.py                         (same, as one test)
      PYTHONPATH=. python tests/fuzz_clc.py --atheris [atheris args] (if atheris is installed: the same
                                                                    targets through libFuzzer)
Hypothesis generates the inputs (no extra dependency); each round runs a fresh batch of examples
until FUZZ_SECONDS have passed.

Invariants checked after every step:
- receive_data / receive_eof / handle_timer raise nothing; local calls raise only ClcStateError or
  ValueError (both documented), and only when the role/state does not allow them;
- events: Established at most once; at most one FellBack/Aborted and nothing after it (Established
  may be followed by Aborted);
- FellBack.data is exactly the unconsumed suffix of everything fed, and the consumed prefix is a
  sequence of whole, intact handshake messages (nothing half-eaten, nothing invented);
- every byte sent is a sequence of valid messages, at most one PROPOSAL (client, first), at most
  one of ACCEPT/DECLINE (server) or CONFIRM/DECLINE after the PROPOSAL (client);
- a timer runs exactly in the waiting states; buffered bytes stay bounded;
- two peers through a pipe that corrupts, inserts or drops bytes never end with one side on the
  ring and the other on TCP unless one of them aborted (forged messages injected from nowhere are
  exempt: no handshake can tell them from real ones);
- codec: decode raises only ClcError, never consumes past its input, re-encodes canonically.
"""

from __future__ import annotations

import os
import sys
import time

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from smcish import clc
from smcish.clc import (
    MAGIC, MAX_MESSAGE, Aborted, Accept, ClcConnection, ClcError, ClcState, ClcStateError, Confirm,
    Decline, DeclineReason, Established, FellBack, Proposal, decode, encode,
)

R = DeclineReason
ROUND = settings(max_examples=100, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
                 suppress_health_check=list(HealthCheck))

ids = st.binary(min_size=16, max_size=16)
caps = st.integers(clc.MIN_CAPACITY_LOG2, clc.MAX_CAPACITY_LOG2)
proposals = st.builds(lambda lo, span, *rest: Proposal(lo, min(255, lo + span), *rest),
                      st.integers(1, 3), st.integers(0, 3), st.integers(0, 0xFFFF), ids, ids, ids, caps)
accepts = st.builds(Accept, st.integers(1, 3), st.integers(0, 0xFFFF), ids, ids, ids, caps)
declines = st.integers(0, 0xFFFF).map(lambda c: Decline(R.from_code(c), c))
messages = st.one_of(proposals, accepts, st.just(Confirm()), declines)


@st.composite
def mutated(draw):
    data = bytearray(encode(draw(messages)))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.integers(0, 2))
        pos = draw(st.integers(0, len(data)))
        if kind == 0 and pos < len(data):
            data[pos] = draw(st.integers(0, 255))
        elif kind == 1:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        else:
            del data[pos:pos + draw(st.integers(1, 4))]
    return bytes(data)


# Valid version-1 messages are drawn often, so that programs get deep into the handshake.
valid = st.one_of(
    st.builds(Proposal, st.just(1), st.integers(1, 2), st.integers(0, 0xFFFF), ids, ids, ids, caps),
    st.builds(Accept, st.just(1), st.integers(0, 0xFFFF), ids, ids, ids, caps),
    st.just(Confirm()), st.sampled_from(list(R)).map(Decline),
).map(encode)
wire = st.one_of(valid, valid, valid, messages.map(encode), mutated(), st.binary(max_size=64),
                 st.integers(0, 4).map(lambda n: MAGIC[:n]), st.just(b"x" * 600))
chunking = st.lists(st.integers(1, 70), max_size=8)
reasons = st.sampled_from(list(R))
data_op = st.tuples(st.just("data"), st.lists(wire, min_size=1, max_size=3).map(b"".join), chunking)
small_dt = st.floats(0, 0.2)                      # mostly within the budgets, sometimes past them
any_dt = st.one_of(small_dt, small_dt, st.floats(0, 5))
decide_op = st.tuples(st.just("decide"), st.one_of(st.just("ok"), st.just("ok"), reasons), any_dt)
steps = st.lists(st.one_of(
    data_op, data_op, valid.map(lambda b: ("data", b, [])), decide_op, decide_op,
    st.tuples(st.just("timer"), any_dt),
    st.tuples(st.just("timer"), any_dt),
    st.tuples(st.just("eof")),
    st.tuples(st.just("fallback_now"), reasons),
), max_size=16)


def check_frames(data: bytes) -> list:
    """data must be whole intact messages; return them (None for an intact but invalid one)."""
    out = []
    while data:
        try:
            msg, n = decode(data)
        except ClcError as err:
            assert err.resync, f"consumed bytes include broken framing: {data!r}"
            out.append(None)
            data = data[err.length:]
            continue
        assert msg is not None, f"consumed bytes end in a partial message: {data!r}"
        out.append(msg)
        data = data[n:]
    return out


class Checker:
    def __init__(self, role: str, timeout: float, greeting: bytes = b""):
        self.conn = ClcConnection(role, 0.0, timeout)
        self.role = role
        self.greeting = greeting   # what the application writes once on plain TCP
        self.fed = bytearray()
        self.sent = bytearray()    # handshake bytes we sent
        self.wire = bytearray()    # everything we sent (handshake, then the application's bytes)
        self.events: list = []
        self.now = 0.0
        self.finished = False      # FellBack or Aborted seen
        self.eof = False

    def collect(self, out: bytes = b""):
        conn = self.conn
        out += conn.data_to_send()
        self.sent += out
        self.wire += out
        while (ev := conn.next_event()) is not None:
            assert not self.finished, f"event after the end: {ev!r} after {self.events!r}"
            if isinstance(ev, Established):
                assert not any(isinstance(e, Established) for e in self.events)
            if isinstance(ev, (FellBack, Aborted)):
                self.finished = True
                assert isinstance(ev.reason, DeclineReason)
            if isinstance(ev, FellBack):
                assert not any(isinstance(e, Established) for e in self.events)
                fed = bytes(self.fed)
                assert fed.endswith(ev.data), "FellBack.data is not a suffix of the input"
                check_frames(fed[:len(fed) - len(ev.data)])
                self.wire += self.greeting
            self.events.append(ev)
        self.check_state()

    def check_state(self):
        conn = self.conn
        waiting = conn.state in clc._DEADLINES or conn.state in clc._KEEP_DEADLINE
        assert (conn.get_timer() is not None) == waiting, (conn.state, conn.get_timer())
        if conn.state in clc._EXPECTED:
            assert len(conn._rx) < MAX_MESSAGE          # at most one partial message held
        if conn.state is ClcState.PROPOSAL_RECEIVED:
            assert len(conn._rx) <= MAX_MESSAGE
        msgs = check_frames(bytes(self.sent))
        assert None not in msgs, "we sent an invalid message"
        if self.role == "client":
            assert not msgs or isinstance(msgs[0], Proposal)
            tail = msgs[1:]
            assert len(tail) <= 1 and all(isinstance(m, (Confirm, Decline)) for m in tail), msgs
        else:
            assert len(msgs) <= 1 and all(isinstance(m, (Accept, Decline)) for m in msgs), msgs

    def local(self, call, *args):
        try:
            out = call(*args)
        except (ClcStateError, ValueError):
            return
        self.collect(out if isinstance(out, bytes) else b"")

    def step(self, op):
        conn, kind = self.conn, op[0]
        if kind == "data":
            if self.finished and conn.state is ClcState.FELL_BACK or self.eof:
                return                  # the application's bytes now (documented ClcStateError)
            data, sizes = op[1], list(op[2]) or [len(op[1])]
            i = 0
            while i < len(data):
                n = sizes[0] if sizes else len(data)
                sizes = sizes[1:]
                chunk = data[i:i + max(1, n)]
                i += len(chunk)
                if conn.state is ClcState.FELL_BACK:
                    return
                if conn.state is not ClcState.ABORTED:
                    self.fed += chunk
                conn.receive_data(chunk, self.now)
                self.collect()
        elif kind == "timer":
            self.now += op[1]
            self.collect(conn.handle_timer(self.now))
        elif kind == "eof":
            if conn.state is ClcState.FELL_BACK or self.eof:
                return
            self.eof = True
            conn.receive_eof(self.now)
            self.collect()
        elif kind == "fallback_now":
            self.local(conn.fallback_now, op[1])
        else:
            self.now += op[2]
            decision = op[1]
            if decision == "ok":
                if self.role == "server":
                    version = conn.version or 1
                    self.local(conn.accept, Accept(version, 0, b"g" * 16, b"e" * 16, b"t" * 16, 16), self.now)
                else:
                    self.local(conn.confirm, self.now)
            else:
                self.local(conn.decline, decision, self.now)


@ROUND
@given(st.sampled_from(["client", "server", "server-idle"]), st.sampled_from([0.5, 2.0]),
       st.one_of(st.just(Proposal(1, 1, 0, b"g" * 16, b"e" * 16, b"t" * 16, 16)), proposals), steps)
def fuzz_connection(role, timeout, proposal, program):
    checker = Checker("client" if role == "client" else "server", timeout)
    if role == "client":
        checker.collect(checker.conn.propose(proposal, 0.0))
    elif role == "server":
        checker.conn.wait_proposal(0.0)
        checker.collect()
    for op in program:
        checker.step(op)
    if role == "server-idle":                   # bytes fed before the shell started are replayed
        checker.local(checker.conn.wait_proposal, checker.now)


@ROUND
@given(st.one_of(st.binary(max_size=600), mutated(), st.binary(max_size=80).map(lambda b: MAGIC + b)),
       st.binary(max_size=32))
def fuzz_codec(buf, extra):
    try:
        msg, n = decode(buf)
    except ClcError as err:
        assert isinstance(err.reason, DeclineReason)
        if err.resync:
            assert clc.MIN_MESSAGE <= err.length <= min(len(buf), MAX_MESSAGE)
        try:
            decode(buf + extra)
        except ClcError as again:
            assert (again.reason, again.resync, again.length) == (err.reason, err.resync, err.length)
        else:
            raise AssertionError("an error became valid when bytes were appended")
        return
    if msg is None:
        assert n == 0
        return
    assert 0 < n <= len(buf)
    assert encode(msg) == buf[:n]
    assert decode(buf + extra) == (msg, n)


def _fault(chunk: bytes, fault: tuple) -> bytes:
    kind, pos, value = fault
    if not chunk or kind == "none":
        return chunk
    pos %= len(chunk)
    if kind == "flip":
        return chunk[:pos] + bytes([value]) + chunk[pos + 1:]
    if kind == "insert":
        return chunk[:pos] + bytes([value]) * (1 + value % 5) + chunk[pos:]
    return chunk[:pos] + chunk[pos + 1 + value % 8:]          # "drop"


faults = st.one_of(st.just(("none", 0, 0)),
                   st.tuples(st.sampled_from(["flip", "insert", "drop"]), st.integers(0, 600),
                             st.integers(0, 255)))
chunk_size = st.one_of(st.just(10_000), st.integers(1, 80))


def _pending_decision(peer: Checker) -> bool:
    return (peer.conn.state in (ClcState.PROPOSAL_RECEIVED, ClcState.ACCEPT_RECEIVED)
            and not peer.finished)


@ROUND
@given(st.sampled_from([0.5, 2.0]), st.sampled_from([0.5, 2.0]), st.floats(0, 0.2), st.data())
def fuzz_conversation(client_timeout, server_timeout, fault_rate, data):
    """A client and a server wired together through a pipe that may corrupt, insert or drop bytes;
    each step picks one of the actions enabled at that moment (deliver, decide, timer, EOF, stray
    bytes)."""
    client = Checker("client", client_timeout, greeting=b"<client app>")
    server = Checker("server", server_timeout, greeting=b"<server app>")
    server.conn.wait_proposal(0.0)
    server.collect()
    client.collect(client.conn.propose(Proposal(1, 1, 0, b"g" * 16, b"e" * 16, b"t" * 16, 16), 0.0))
    peers = (client, server)
    forged = False              # stray bytes were injected (an attacker on the path can forge messages)
    for _ in range(40):
        actions = []
        for i, peer in enumerate(peers):
            if peer.wire:
                actions += [("deliver", i)] * 3
            if _pending_decision(peer):
                actions += [("decide", i)] * 2
            if peer.conn.get_timer() is not None:
                actions.append(("timer", i))
            if not peer.eof:
                actions += [("eof", i), ("inject", i)]
        if not actions:
            break
        kind, i = data.draw(st.sampled_from(actions))
        me, other = peers[i], peers[1 - i]
        if kind == "deliver":
            n = data.draw(chunk_size)
            chunk = bytes(me.wire[:n])
            del me.wire[:n]
            if data.draw(st.floats(0, 1)) < fault_rate:
                chunk = _fault(chunk, data.draw(faults))
            if chunk:
                other.step(("data", chunk, []))
        elif kind == "decide":
            decision = data.draw(st.one_of(st.just("ok"), st.just("ok"), reasons))
            me.step(("decide", decision, data.draw(st.floats(0, 0.2))))
        elif kind == "inject":                            # stray bytes from nowhere (a broken peer)
            forged = True
            me.step(("data", data.draw(wire), [data.draw(st.integers(1, 80))]))
        elif kind == "timer":
            me.now = max(me.now, me.conn.get_timer() + data.draw(st.floats(0, 0.1)))
            me.step(("timer", 0.0))
        elif data.draw(st.integers(0, 9)) == 0:           # EOF: rare
            me.step(("eof",))
        client.now = server.now = max(client.now, server.now)     # one clock
    # Corruption, insertion and loss on the path must never leave one side on the ring and the
    # other on TCP without an abort; forged messages can (no handshake can tell them apart).
    if not forged and not any(isinstance(e, Aborted) for p in peers for e in p.events):
        ism = [any(isinstance(e, Established) for e in p.events) for p in peers]
        fell = [any(isinstance(e, FellBack) for e in p.events) for p in peers]
        assert not (ism[0] and fell[1]) and not (ism[1] and fell[0]), (client.events, server.events)


TARGETS = [fuzz_connection, fuzz_conversation, fuzz_codec]


def run_for(seconds: float) -> int:
    """Run rounds of every target until ``seconds`` have passed; return the number of rounds."""
    end = time.monotonic() + seconds
    rounds = 0
    while time.monotonic() < end:
        for target in TARGETS:
            target()
        rounds += 1
    return rounds


def test_fuzz_bounded():
    run_for(float(os.environ.get("FUZZ_SECONDS", "10")))


def _atheris_main(argv):
    import atheris                                   # optional: pip install atheris

    targets = [t.hypothesis.fuzz_one_input for t in TARGETS]

    def one_input(data: bytes):
        if data:
            targets[data[0] % len(targets)](data[1:])

    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def main(argv=None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if "--atheris" in argv:
        argv.remove("--atheris")
        _atheris_main(argv)
        return 0
    seconds = float(os.environ.get("FUZZ_SECONDS", "10"))
    started = time.monotonic()
    rounds = run_for(seconds)
    print(f"fuzz_clc: {rounds} rounds x {len(TARGETS)} targets x {ROUND.max_examples} examples "
          f"in {time.monotonic() - started:.1f}s: no failure")
    return 0


if __name__ == "__main__":
    sys.exit(main())
