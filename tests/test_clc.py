"""Tests for smcish.clc: the sans-I/O handshake codec and state machine, driven in memory (no sockets)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smcish import clc
from smcish.clc import (
    MAGIC, MAX_MESSAGE, TRAILER, Aborted, Accept, AcceptReceived, ClcConnection, ClcError,
    ClcState, ClcStateError, Confirm, Decline, DeclineReason, Established, FellBack, Proposal,
    ProposalReceived, decode, encode,
)

R = DeclineReason
T = 2.0                         # handshake timeout used throughout
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ------------------------------------------------------------------------------------ helpers


def make_proposal(**kw) -> Proposal:
    fields = dict(min_version=1, max_version=1, flags=0, gid=b"G" * 16, endpoint_id=b"c" * 16,
                  token=b"C" * 16, capacity_log2=16)
    fields.update(kw)
    return Proposal(**fields)


def make_accept(**kw) -> Accept:
    fields = dict(version=1, flags=0, gid=b"G" * 16, endpoint_id=b"s" * 16, token=b"S" * 16,
                  capacity_log2=17)
    fields.update(kw)
    return Accept(**fields)


def frame(mtype: int, body: bytes, version: int = 1, length: int | None = None,
          trailer: bytes = TRAILER) -> bytes:
    """A hand-built message (possibly malformed)."""
    if length is None:
        length = 8 + len(body) + 4
    return MAGIC + struct.pack("!BBH", version, mtype, length) + body + trailer


def decode_all(data: bytes) -> list:
    """Split bytes a side sent into messages (they must all be valid)."""
    msgs, view = [], bytes(data)
    while view:
        msg, n = decode(view)
        assert msg is not None, f"incomplete message in {data!r}"
        msgs.append(msg)
        view = view[n:]
    return msgs


def events(conn: ClcConnection) -> list:
    out = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


ids = st.binary(min_size=16, max_size=16)
cap = st.integers(clc.MIN_CAPACITY_LOG2, clc.MAX_CAPACITY_LOG2)
u16 = st.integers(0, 0xFFFF)
proposals = st.integers(1, 255).flatmap(
    lambda lo: st.builds(Proposal, st.just(lo), st.integers(lo, 255), u16, ids, ids, ids, cap))
accepts = st.builds(Accept, st.integers(1, 255), u16, ids, ids, ids, cap)
declines = st.one_of(st.sampled_from(list(R)).map(Decline),
                     u16.map(lambda code: Decline(R.from_code(code), code)))
messages = st.one_of(proposals, accepts, st.just(Confirm()), declines)
local_reasons = st.sampled_from([r for r in R if r is not R.PEER_DECLINED])


class Peer:
    """A minimal shell around one ClcConnection: a policy answers events, the 'application' writes a
    greeting once on plain TCP and collects every byte it is given (replayed data, then later bytes).

    Args:
        role: "client" or "server"; None for a plain TCP peer with no smcish at all.
        decide: the answer to ProposalReceived / AcceptReceived: "ok", a DeclineReason, or None
            (no answer: the test calls accept/decline/confirm itself).
        greeting: what the application writes as soon as it is on plain TCP.
    """

    def __init__(self, role, decide="ok", greeting=b"", now=0.0, timeout=T):
        self.conn = ClcConnection(role, now, timeout) if role else None
        self.decide = decide
        self.greeting = greeting
        self.out = bytearray()          # bytes on the wire towards the other peer, not yet delivered
        self.events: list = []
        self.app_in = bytearray()
        self.app_sent = b""
        self.eof = False
        self.mode = "handshake"
        if role is None:
            self._to_tcp()

    def _to_tcp(self):
        self.mode = "tcp"
        self.app_sent = self.greeting
        self.out += self.greeting

    def pump(self, now):
        conn = self.conn
        while (ev := conn.next_event()) is not None:
            self.events.append(ev)
            if isinstance(ev, (ProposalReceived, AcceptReceived)) and self.decide is None:
                pass                            # the test answers by hand, later
            elif isinstance(ev, ProposalReceived):
                if self.decide == "ok":
                    self.out += conn.accept(make_accept(version=ev.version), now)
                else:
                    self.out += conn.decline(self.decide, now)
            elif isinstance(ev, AcceptReceived):
                if self.decide == "ok":
                    self.out += conn.confirm(now)
                else:
                    self.out += conn.decline(self.decide, now)
            elif isinstance(ev, Established):
                self.mode = "ism"
            elif isinstance(ev, FellBack):
                self.app_in += ev.data
                self._to_tcp()
            elif isinstance(ev, Aborted):
                self.mode = "aborted"
        self.out += conn.data_to_send()

    def feed(self, chunk, now):
        if self.mode == "tcp":
            self.app_in += chunk
        elif self.mode != "aborted":        # a real shell resets the connection: bytes are dropped
            self.conn.receive_data(chunk, now)
            self.pump(now)

    def timer(self, now):
        if self.conn is not None and self.mode not in ("tcp", "aborted"):
            self.out += self.conn.handle_timer(now)
            self.pump(now)

    def last(self):
        return self.events[-1] if self.events else None


def start(client: Peer, server: Peer, now=0.0, proposal=None):
    if server.conn is not None:
        server.conn.wait_proposal(now)
        server.pump(now)
    if client.conn is not None:
        client.out += client.conn.propose(proposal or make_proposal(), now)
        client.pump(now)


def deliver(src: Peer, dst: Peer, now, sizes=None, limit=None):
    """Move src's pending bytes (at most limit) to dst in chunks of the given sizes."""
    pending = bytes(src.out if limit is None else src.out[:limit])
    del src.out[:len(pending)]
    sizes = iter(sizes or ())
    while pending:
        n = max(1, next(sizes, len(pending)))
        dst.feed(pending[:n], now)
        pending = pending[n:]


def run(client: Peer, server: Peer, now=0.0, sizes=None):
    """Exchange bytes until both sides are quiet."""
    sizes = iter(sizes or ())
    for _ in range(100):
        if not client.out and not server.out:
            return
        for src, dst in ((client, server), (server, client)):
            if src.out:
                deliver(src, dst, now, [next(sizes, 1 << 20)])
    raise AssertionError("conversation did not settle")


def assert_tcp_intact(client: Peer, server: Peer):
    """Both on plain TCP, and each application got exactly what the other one wrote."""
    assert client.mode == server.mode == "tcp", (client.events, server.events)
    assert bytes(server.app_in) == client.app_sent
    assert bytes(client.app_in) == server.app_sent


# ------------------------------------------------------------------------------------ codec

@FAST
@given(messages)
def test_round_trip(msg):
    data = encode(msg)
    assert len(data) <= MAX_MESSAGE
    assert data.startswith(MAGIC) and data.endswith(TRAILER)
    assert decode(data) == (msg, len(data))
    for cut in range(len(data)):           # every proper prefix is "incomplete", never an error
        assert decode(data[:cut]) == (None, 0)


@FAST
@given(messages, st.binary(max_size=64))
def test_decode_ignores_what_follows(msg, extra):
    data = encode(msg)
    assert decode(data + extra) == (msg, len(data))
    assert decode(bytearray(data + extra)) == (msg, len(data))
    assert decode(memoryview(data + extra)) == (msg, len(data))


def _outcome(buf):
    try:
        return decode(buf)
    except ClcError as err:
        assert isinstance(err.reason, DeclineReason)
        assert not err.resync or clc.MIN_MESSAGE <= err.length <= min(len(buf), MAX_MESSAGE)
        return ("error", err.reason, err.resync, err.length, err.msg_type)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=600),
                 st.binary(max_size=80).map(lambda b: MAGIC + b),
                 st.tuples(messages, st.integers(0, 200), st.integers(0, 255), st.binary(max_size=20))
                 .map(lambda t: _mutate(encode(t[0]), t[1], t[2]) + t[3])),
       st.binary(max_size=40))
def test_decode_random_bytes(buf, extra):
    """Only ClcError; never past the input; canonical; the outcome depends only on the message's bytes."""
    result = _outcome(buf)
    if result[0] == "error":
        assert _outcome(buf + extra) == result
        return
    msg, n = result
    if msg is None:
        assert n == 0
        return
    assert 0 < n <= len(buf)
    assert encode(msg) == bytes(buf[:n])            # canonical: decoding loses nothing
    assert _outcome(buf + extra) == (msg, n)


def _mutate(data: bytes, pos: int, value: int) -> bytes:
    pos %= len(data)
    return data[:pos] + bytes([value]) + data[pos + 1:]


@pytest.mark.parametrize("buf, resync, reason", [
    (b"X", False, R.PROTOCOL_ERROR),                                        # bad magic, at once
    (b"SMCx", False, R.PROTOCOL_ERROR),
    (MAGIC + bytes([1, 3, 0, 11]), False, R.PROTOCOL_ERROR),                # length < 12
    (MAGIC + bytes([1, 3, 2, 1]), False, R.PROTOCOL_ERROR),                 # length 513 > 512
    (frame(3, b"", trailer=b"iCMX"), False, R.PROTOCOL_ERROR),              # bad trailer
    (frame(3, b"", length=13) + b"!", False, R.PROTOCOL_ERROR),             # length lies
    (frame(3, b"", version=2), True, R.VERSION_MISMATCH),                   # header version
    (frame(3, b"", version=0), True, R.VERSION_MISMATCH),
    (frame(9, b""), True, R.PROTOCOL_ERROR),                                # unknown type
    (frame(0, b""), True, R.PROTOCOL_ERROR),
    (frame(3, b"\0"), True, R.PROTOCOL_ERROR),                              # CONFIRM has no body
    (frame(4, b"\0"), True, R.PROTOCOL_ERROR),                              # DECLINE body 2 bytes
    (frame(4, b"\0\0\0"), True, R.PROTOCOL_ERROR),
    (frame(1, encode(make_proposal())[8:-4] + b"\0"), True, R.PROTOCOL_ERROR),
    (frame(2, encode(make_accept())[8:-5]), True, R.PROTOCOL_ERROR),
])
def test_decode_errors(buf, resync, reason):
    with pytest.raises(ClcError) as info:
        decode(buf)
    assert info.value.resync is resync and info.value.reason is reason
    if resync:
        assert info.value.length == len(buf)
        assert info.value.msg_type == buf[5]
    else:
        assert info.value.length == 0 and info.value.msg_type is None


def _proposal_body(min_v=1, max_v=1, flags=0, cap_log2=16):
    return struct.pack("!BBH16s16s16sB", min_v, max_v, flags, b"G" * 16, b"c" * 16, b"C" * 16, cap_log2)


def _accept_body(version=1, flags=0, cap_log2=16):
    return struct.pack("!BH16s16s16sB", version, flags, b"G" * 16, b"s" * 16, b"S" * 16, cap_log2)


@pytest.mark.parametrize("body", [
    _proposal_body(cap_log2=11), _proposal_body(cap_log2=31), _proposal_body(cap_log2=0),
    _proposal_body(min_v=2, max_v=1), _proposal_body(min_v=0, max_v=1),
])
def test_decode_bad_proposal_fields(body):
    with pytest.raises(ClcError) as info:
        decode(frame(1, body))
    assert info.value.resync and info.value.reason is R.PROTOCOL_ERROR


@pytest.mark.parametrize("body", [_accept_body(cap_log2=11), _accept_body(cap_log2=31),
                                  _accept_body(version=0)])
def test_decode_bad_accept_fields(body):
    with pytest.raises(ClcError) as info:
        decode(frame(2, body))
    assert info.value.resync and info.value.reason is R.PROTOCOL_ERROR


def test_capacity_bounds_and_unknown_flags_accepted():
    for cap_log2 in (12, 30):
        assert decode(frame(1, _proposal_body(cap_log2=cap_log2)))[0].capacity_log2 == cap_log2
    msg, _ = decode(frame(1, _proposal_body(flags=0xFFFF, min_v=1, max_v=7)))
    assert msg.flags == 0xFFFF and msg.max_version == 7         # ignored, but kept and round-tripped
    assert decode(frame(2, _accept_body(flags=0x8001)))[0].flags == 0x8001


def test_message_sizes():
    assert [len(encode(m)) for m in (make_proposal(), make_accept(), Confirm(), Decline(R.TIMEOUT))] \
        == [65, 64, 12, 14]
    assert clc.message_size(clc.MessageType.PROPOSAL) == 65


def test_message_validation():
    with pytest.raises(ValueError):
        make_proposal(gid=b"short")
    with pytest.raises(TypeError):
        make_proposal(token="not bytes")
    with pytest.raises(ValueError):
        make_proposal(capacity_log2=40)
    with pytest.raises(ValueError):
        make_accept(flags=1 << 16)
    with pytest.raises(ValueError):
        Decline(R.NO_DEVICE, code=0x0999)           # code must map to reason
    with pytest.raises(TypeError):
        encode("PROPOSAL")
    assert make_proposal(gid=bytearray(b"G" * 16)).gid == b"G" * 16
    assert Decline(R.NO_DEVICE) == Decline(0x0301) == Decline(R.NO_DEVICE, 0x0301)


def test_decline_reasons():
    codes = [int(r) for r in R]
    assert len(set(codes)) == len(codes)
    for reason in R:
        assert reason.description and reason.category != "unknown"
        assert R.from_code(int(reason)) is reason
    assert R.from_code(0x0999) is R.PEER_DECLINED
    assert R.TIMEOUT.category == "timeout" and R.QUOTA.category == "resources"
    unknown = Decline(R.PEER_DECLINED, 0x0999)
    assert decode(encode(unknown)) == (unknown, 14)
    assert decode(frame(4, b"\x07\x07"))[0] == Decline(R.PEER_DECLINED, 0x0707)


# ------------------------------------------------------------------------------------ state table

RECEIVED = [i for i in clc._Input if i.name.startswith("RECV_")] + [clc._Input.TIMER, clc._Input.EOF]


@pytest.mark.parametrize("role, state", [
    ("server", ClcState.WAIT_PROPOSAL), ("server", ClcState.WAIT_CONFIRM),
    ("server", ClcState.DRAIN_DECLINE), ("client", ClcState.WAIT_ACCEPT),
    ("client", ClcState.DECLINED_WAIT),
])
def test_table_covers_every_classification(role, state):
    """Whatever _classify can produce in a reading state has a whitelisted transition."""
    produced = {clc._Input.RECV_DECLINE, clc._Input.RECV_UNEXPECTED, clc._Input.RECV_GARBAGE,
                clc._Input.TIMER, clc._Input.EOF}
    if state is ClcState.DECLINED_WAIT:
        produced.add(clc._Input.RECV_CROSSED_DECLINE)
    produced.add(clc._Input.RECV_NOT_SMCISH if state in clc._FIRST_CONTACT else clc._Input.RECV_GARBAGE)
    expected = clc._EXPECTED[state]
    if expected is not None:
        produced.add({Proposal: clc._Input.RECV_PROPOSAL, Accept: clc._Input.RECV_ACCEPT,
                      Confirm: clc._Input.RECV_CONFIRM}[expected])
    missing = [i for i in produced if (role, state, i) not in clc._TRANSITIONS]
    assert not missing


def test_table_targets_and_timers():
    for (role, state, _inp), nxt in clc._TRANSITIONS.items():
        assert state not in clc.TERMINAL_STATES
        assert (nxt in clc._DEADLINES) or nxt in clc._KEEP_DEADLINE or nxt in clc.TERMINAL_STATES \
            or nxt is ClcState.ESTABLISHED
    # every state that waits for the peer runs a timer
    for (role, state, inp) in clc._TRANSITIONS:
        if inp is clc._Input.RECV_BYTES and state is ClcState.ESTABLISHED:
            continue
        if state is not ClcState.IDLE and inp in RECEIVED:
            assert (role, state, clc._Input.TIMER) in clc._TRANSITIONS, (role, state)


@pytest.mark.parametrize("role, call", [
    ("server", lambda c: c.propose(make_proposal(), 0)),
    ("client", lambda c: c.wait_proposal(0)),
    ("client", lambda c: c.fallback_now(R.NO_DEVICE)),
    ("client", lambda c: c.confirm(0)),
    ("client", lambda c: c.decline(R.NO_DEVICE, 0)),
    ("server", lambda c: c.accept(make_accept(), 0)),
    ("server", lambda c: c.decline(R.NO_DEVICE, 0)),
])
def test_illegal_calls_raise(role, call):
    with pytest.raises(ClcStateError):
        call(ClcConnection(role, 0.0))


def test_illegal_calls_mid_handshake():
    client = ClcConnection("client", 0.0)
    client.propose(make_proposal(), 0.0)
    with pytest.raises(ClcStateError):
        client.propose(make_proposal(), 0.0)
    with pytest.raises(ClcStateError):
        client.confirm(0.0)                         # no ACCEPT yet
    server = ClcConnection("server", 0.0)
    server.wait_proposal(0.0)
    server.receive_data(encode(make_proposal()), 0.0)
    with pytest.raises(ClcStateError):
        server.fallback_now(R.NO_DEVICE)            # a PROPOSAL was parsed: too late
    with pytest.raises(ValueError):
        server.accept(make_accept(version=2), 0.0)  # not a version in common
    with pytest.raises(ValueError):
        ClcConnection("peer", 0.0)


# ------------------------------------------------------------------------------------ conversations

def test_success():
    client, server = Peer("client"), Peer("server")
    start(client, server)
    assert client.conn.get_timer() == T and server.conn.get_timer() == T
    run(client, server)
    assert [type(e) for e in client.events] == [AcceptReceived, Established]
    assert [type(e) for e in server.events] == [ProposalReceived, Established]
    assert client.mode == server.mode == "ism"
    assert client.conn.version == server.conn.version == 1
    assert client.conn.accepted == server.conn.accepted == make_accept()
    assert server.conn.proposal == client.conn.proposal == make_proposal()
    assert client.conn.get_timer() is None and server.conn.get_timer() is None
    assert client.conn.done and server.conn.done


@pytest.mark.parametrize("reason", [r for r in R if r is not R.PEER_DECLINED])
@pytest.mark.parametrize("side", ["server", "client"])
def test_decline_every_reason(side, reason):
    client = Peer("client", decide=reason if side == "client" else "ok", greeting=b"hello from client\n")
    server = Peer("server", decide=reason if side == "server" else "ok", greeting=b"220 server ready\r\n")
    start(client, server)
    run(client, server)
    assert_tcp_intact(client, server)
    decider, other = (server, client) if side == "server" else (client, server)
    assert decider.last() == FellBack(reason, False, decider.last().data)
    assert other.last() == FellBack(reason, True, other.last().data, int(reason))
    assert decider.conn.reason is other.conn.reason is reason


def test_peer_declined_is_reserved():
    server = ClcConnection("server", 0.0)
    server.wait_proposal(0.0)
    server.receive_data(encode(make_proposal()), 0.0)
    with pytest.raises(ValueError):
        server.decline(R.PEER_DECLINED, 0.1)


def test_unknown_reason_code_from_peer():
    client = ClcConnection("client", 0.0)
    client.propose(make_proposal(), 0.0)
    client.receive_data(frame(4, b"\x09\x99") + b"app", 0.1)
    assert events(client) == [FellBack(R.PEER_DECLINED, True, b"app", 0x0999)]
    assert client.data_to_send() == b""


@pytest.mark.parametrize("min_v, max_v", [(2, 2), (2, 9), (200, 255)])
def test_version_mismatch_declined_by_codec(min_v, max_v):
    client = Peer("client", greeting=b"GET / HTTP/1.0\r\n\r\n")
    server = Peer("server", greeting=b"")
    start(client, server, proposal=make_proposal(min_version=min_v, max_version=max_v))
    run(client, server)
    assert_tcp_intact(client, server)
    assert not any(isinstance(e, ProposalReceived) for e in server.events)   # the shell never saw it
    assert server.last().reason is R.VERSION_MISMATCH and not server.last().by_peer
    assert client.last().reason is R.VERSION_MISMATCH and client.last().by_peer


def test_future_client_range_negotiates_down():
    server = ClcConnection("server", 0.0)
    server.wait_proposal(0.0)
    server.receive_data(encode(make_proposal(min_version=1, max_version=5)), 0.0)
    assert events(server) == [ProposalReceived(make_proposal(min_version=1, max_version=5), 1)]


def test_accept_with_version_not_proposed():
    client = ClcConnection("client", 0.0)
    client.propose(make_proposal(), 0.0)
    client.receive_data(encode(make_accept(version=2)) + b"rest", 0.1)
    assert events(client) == [FellBack(R.VERSION_MISMATCH, False, b"rest")]
    assert decode_all(client.data_to_send()) == [Decline(R.VERSION_MISMATCH)]


def test_plain_client_replayed():
    server = Peer("server", greeting=b"")
    client = Peer(None, greeting=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    start(client, server)
    run(client, server, sizes=[1, 2, 3])
    assert server.last() == FellBack(R.PEER_NOT_SMCISH, False, b"G")   # decided on the first byte
    assert_tcp_intact(client, server)


def test_plain_client_with_magic_prefix():
    server = ClcConnection("server", 0.0)
    server.wait_proposal(0.0)
    server.receive_data(b"SM", 0.0)
    assert events(server) == []                      # a prefix of the magic: wait
    server.receive_data(b"TP hello", 0.0)
    assert events(server) == [FellBack(R.PEER_NOT_SMCISH, False, b"SMTP hello")]
    assert server.data_to_send() == b""


def test_plain_server_first_fallback_now():
    """No intent: the server falls back at once, sends nothing, and the banner goes first."""
    server = Peer("server", greeting=b"220 smtp.example ESMTP\r\n")
    client = Peer(None, greeting=b"EHLO me\r\n")
    server.conn.fallback_now(R.PEER_NOT_SMCISH)
    server.pump(0.0)
    assert server.events == [FellBack(R.PEER_NOT_SMCISH, False, b"")]
    assert server.conn.get_timer() is None
    run(client, server)
    assert_tcp_intact(client, server)


def test_fallback_now_replays_bytes_so_far():
    server = ClcConnection("server", 0.0)
    server.receive_data(b"S", 0.0)                   # before the shell decided anything
    server.wait_proposal(0.0)
    server.receive_data(b"MC", 0.0)
    server.fallback_now(R.NO_DEVICE)
    assert events(server) == [FellBack(R.NO_DEVICE, False, b"SMC")]
    with pytest.raises(ClcStateError):
        server.receive_data(b"x", 0.1)               # the application owns the stream now


def test_negotiate_always_against_plain_server_first():
    client = Peer("client", greeting=b"unused")
    server = Peer(None, greeting=b"220 banner\r\n")
    start(client, server)
    run(client, server)
    assert client.mode == "aborted"
    assert client.last().reason is R.PEER_NOT_SMCISH


# ---- timeouts, time passed in

def test_server_timeout_wait_proposal():
    server = ClcConnection("server", 10.0)
    server.wait_proposal(10.0)
    assert server.get_timer() == 10.0 + T
    server.receive_data(b"SMCi\x01", 10.5)
    assert server.handle_timer(11.0) == b"" and events(server) == []     # early: nothing
    assert server.handle_timer(12.0) == b""
    assert events(server) == [FellBack(R.TIMEOUT, False, b"SMCi\x01")]
    assert server.get_timer() is None and server.state is ClcState.FELL_BACK


def test_server_timeout_deciding():
    """The shell takes too long: DECLINE(TIMEOUT) at half the timeout; the late accept is void."""
    server = ClcConnection("server", 0.0)
    server.wait_proposal(0.0)
    server.receive_data(encode(make_proposal()), 0.2)
    assert isinstance(server.next_event(), ProposalReceived)
    assert server.get_timer() == 0.2 + T / 2
    assert decode_all(server.handle_timer(0.2 + T / 2)) == [Decline(R.TIMEOUT)]
    assert events(server) == [FellBack(R.TIMEOUT, False, b"")]
    assert server.accept(make_accept(), 2.0) == b""                      # ignored
    assert server.decline(R.NO_MEMORY, 2.0) == b""
    assert events(server) == [] and server.state is ClcState.FELL_BACK


def test_server_timeout_wait_confirm():
    server = ClcConnection("server", 0.0)
    server.wait_proposal(0.0)
    server.receive_data(encode(make_proposal()), 0.1)
    events(server)
    server.accept(make_accept(), 0.3)
    assert server.get_timer() == 0.3 + T
    assert server.handle_timer(0.3 + T) == b""
    assert [type(e) for e in events(server)] == [Aborted]
    assert server.reason is R.TIMEOUT
    server.receive_data(b"late bytes are ignored", 5.0)
    assert events(server) == []


def test_client_timeout_then_server_answer_drained():
    client = ClcConnection("client", 0.0)
    client.propose(make_proposal(), 0.0)
    assert decode_all(client.handle_timer(T)) == [Decline(R.TIMEOUT)]
    assert client.state is ClcState.DECLINED_WAIT and client.get_timer() == 2 * T
    assert events(client) == []
    for answer in (make_accept(), Decline(R.PEER_DECLINED)):     # PEER_DECLINED: "I saw yours"
        c = ClcConnection("client", 0.0)
        c.propose(make_proposal(), 0.0)
        c.handle_timer(T)
        data = encode(answer) + b"first app bytes"
        for i in range(len(data)):                  # byte by byte
            c.receive_data(data[i:i + 1], T + 0.1)
            if c.state is ClcState.FELL_BACK:
                rest = data[i + 1:]
                break
        assert events(c) == [FellBack(R.TIMEOUT, False, b"")]
        assert rest == b"first app bytes"
        assert c.data_to_send() == b""              # no second DECLINE


@pytest.mark.parametrize("answer", [encode(Decline(R.NO_DEVICE)), encode(Decline(R.TIMEOUT)),
                                    frame(4, b"\x04")])
def test_client_timeout_crossed_by_server_decline_aborts(answer):
    """The server declined without having seen our DECLINE(TIMEOUT): it fell back and will read
    our DECLINE as application data, so the connection must be reset rather than corrupted."""
    client = _client_waiting()
    client.handle_timer(T)
    client.receive_data(answer + b"server app", T + 0.1)
    (event,) = events(client)
    assert isinstance(event, Aborted) and event.reason is R.TIMEOUT
    assert client.data_to_send() == b""


def test_client_second_timeout_aborts():
    client = ClcConnection("client", 0.0)
    client.propose(make_proposal(), 0.0)
    client.handle_timer(T)
    client.receive_data(encode(make_accept())[:10], T + 0.5)
    assert client.handle_timer(2 * T) == b""
    assert events(client) == [Aborted(R.TIMEOUT, "timed out in DECLINED_WAIT")]


def test_client_timeout_while_attaching():
    client = ClcConnection("client", 0.0)
    client.propose(make_proposal(), 0.0)
    client.receive_data(encode(make_accept()), 1.0)
    assert isinstance(client.next_event(), AcceptReceived)
    assert client.get_timer() == T                    # one budget from PROPOSAL to CONFIRM
    assert decode_all(client.handle_timer(T)) == [Decline(R.TIMEOUT)]
    assert events(client) == [FellBack(R.TIMEOUT, False, b"")]
    assert client.confirm(T + 1) == b""               # the attach finished too late: ignored


def test_client_gives_up_server_accepts_late():
    """Client timeout shorter than the server's decision budget: the client's DECLINE(TIMEOUT)
    reaches the deciding server, which still sends its ACCEPT; both drain and fall back."""
    client = Peer("client", greeting=b"client app\n", timeout=0.5)
    server = Peer("server", decide=None, greeting=b"server app\n")
    start(client, server)
    deliver(client, server, 0.0)                       # PROPOSAL
    assert isinstance(server.last(), ProposalReceived)
    client.timer(0.5)                                  # DECLINE(TIMEOUT)
    deliver(client, server, 0.5)                       # ...held by the deciding server
    server.out += server.conn.accept(make_accept(), 0.6)
    server.pump(0.6)
    run(client, server, now=0.7)
    assert_tcp_intact(client, server)
    assert client.last().reason is R.TIMEOUT and not client.last().by_peer
    assert server.last() == FellBack(R.TIMEOUT, True, server.last().data, int(R.TIMEOUT))


@pytest.mark.parametrize("split", [1, 5, 13, 14])
def test_crossing_declines_server_drains_client_decline(split):
    """The client's DECLINE(TIMEOUT) (split bytes of it) arrived before the server declined."""
    client = Peer("client", greeting=b"client app\n", timeout=0.5)
    server = Peer("server", decide=None, greeting=b"server app\n")
    start(client, server)
    deliver(client, server, 0.0)
    client.timer(0.5)
    deliver(client, server, 0.5, limit=split)
    server.out += server.conn.decline(R.GID_MISMATCH, 0.6)
    server.pump(0.6)
    assert server.conn.state is (ClcState.DRAIN_DECLINE if split < 14 else ClcState.FELL_BACK)
    assert decode(bytes(server.out))[0] == Decline(R.PEER_DECLINED)    # "yours arrived, I consume it"
    run(client, server, now=0.7)
    assert_tcp_intact(client, server)
    assert server.last().reason is R.GID_MISMATCH and not server.last().by_peer
    assert client.last().reason is R.TIMEOUT


def test_crossing_not_seen_by_server_aborts_instead_of_corrupting():
    """The client's DECLINE(TIMEOUT) is in flight when the server declines: loud, not silent."""
    client = Peer("client", greeting=b"client app\n", timeout=0.5)
    server = Peer("server", decide=None, greeting=b"server app\n")
    start(client, server)
    deliver(client, server, 0.0)
    client.timer(0.5)                                   # DECLINE(TIMEOUT), still in flight
    server.out += server.conn.decline(R.GID_MISMATCH, 0.6)
    server.pump(0.6)
    assert server.mode == "tcp"
    deliver(server, client, 0.7)
    assert client.mode == "aborted" and client.last().reason is R.TIMEOUT


def test_decision_budget_prevents_crossing_with_equal_timeouts():
    """A stuck server shell: the server declines at T/2, before the client (same T) gives up."""
    client = Peer("client", greeting=b"client app\n")
    server = Peer("server", decide=None, greeting=b"server app\n")
    start(client, server)
    deliver(client, server, 0.01)
    server.timer(0.01 + T / 2)
    run(client, server, now=0.02 + T / 2)
    assert_tcp_intact(client, server)
    assert server.last() == FellBack(R.TIMEOUT, False, b"")
    assert client.last() == FellBack(R.TIMEOUT, True, client.last().data, int(R.TIMEOUT))
    assert client.conn.get_timer() is None


@pytest.mark.parametrize("call", ["accept", "decline"])
def test_late_server_decision_loses_to_timer(call):
    server = ClcConnection("server", 0.0)
    server.wait_proposal(0.0)
    server.receive_data(encode(make_proposal()), 0.0)
    events(server)
    late = T / 2                                        # handle_timer not called yet
    out = server.accept(make_accept(), late) if call == "accept" else server.decline(R.NO_DEVICE, late)
    assert decode_all(out) == [Decline(R.TIMEOUT)]
    assert events(server) == [FellBack(R.TIMEOUT, False, b"")]


def test_late_client_confirm_loses_to_timer():
    client = _client_waiting()
    client.receive_data(encode(make_accept()), 0.1)
    events(client)
    assert decode_all(client.confirm(T)) == [Decline(R.TIMEOUT)]
    assert events(client) == [FellBack(R.TIMEOUT, False, b"")]


@pytest.mark.parametrize("then, expect", [
    ("timer", R.TIMEOUT),
    ("eof", R.PROTOCOL_ERROR),
    (encode(Decline(R.TIMEOUT))[3:6] + b"xxxxxxxxxxxx", R.PROTOCOL_ERROR),    # broken framing
    (encode(Confirm())[3:], R.PROTOCOL_ERROR),                                 # intact, not a DECLINE
])
def test_drain_decline_only_accepts_the_client_decline(then, expect):
    server = ClcConnection("server", 0.0)
    server.wait_proposal(0.0)
    server.receive_data(encode(make_proposal()) + encode(Decline(R.TIMEOUT))[:3], 0.0)
    events(server)
    assert decode_all(server.decline(R.NO_MEMORY, 0.5)) == [Decline(R.PEER_DECLINED)]
    assert server.state is ClcState.DRAIN_DECLINE and server.get_timer() == 0.5 + T
    if then == "timer":
        server.handle_timer(0.5 + T)
    elif then == "eof":
        server.receive_eof(0.6)
    else:
        server.receive_data(then, 0.6)
    assert [(type(e), e.reason) for e in events(server)] == [(Aborted, expect)]


def test_server_holds_at_most_one_message_while_deciding():
    server = ClcConnection("server", 0.0)
    server.wait_proposal(0.0)
    server.receive_data(encode(make_proposal()), 0.0)
    events(server)
    server.receive_data(b"x" * MAX_MESSAGE, 0.1)
    assert events(server) == []
    server.receive_data(b"x", 0.1)
    assert [type(e) for e in events(server)] == [Aborted]


# ---- garbage at each state

GARBAGE = {
    "non-magic": b"\x16\x03\x01 TLS hello",
    "bad-length": MAGIC + bytes([1, 1, 0x7F, 0xFF]),
    "bad-trailer": frame(3, b"", trailer=b"XXXX"),
}
INTACT_BAD = {
    "bad-field": frame(1, _proposal_body(cap_log2=40)),
    "unknown-type": frame(7, b"abc"),
    "header-v2": frame(3, b"", version=2),
}


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_wait_proposal(kind):
    server = ClcConnection("server", 0.0)
    server.wait_proposal(0.0)
    server.receive_data(GARBAGE[kind] + b"more", 0.0)
    (event,) = events(server)
    if kind == "non-magic":
        assert event == FellBack(R.PEER_NOT_SMCISH, False, GARBAGE[kind] + b"more")
    else:
        assert isinstance(event, Aborted) and event.reason is R.PROTOCOL_ERROR
    assert server.data_to_send() == b""


@pytest.mark.parametrize("kind", list(INTACT_BAD))
def test_intact_bad_message_wait_proposal_declined(kind):
    server = ClcConnection("server", 0.0)
    server.wait_proposal(0.0)
    server.receive_data(INTACT_BAD[kind] + b"app", 0.0)
    reason = R.VERSION_MISMATCH if kind == "header-v2" else R.PROTOCOL_ERROR
    assert events(server) == [FellBack(reason, False, b"app")]
    assert decode_all(server.data_to_send()) == [Decline(reason)]


def test_unexpected_message_types_wait_proposal():
    for msg in (make_accept(), Confirm()):
        server = ClcConnection("server", 0.0)
        server.wait_proposal(0.0)
        server.receive_data(encode(msg) + b"z", 0.0)
        assert events(server) == [FellBack(R.PROTOCOL_ERROR, False, b"z")]
        assert decode_all(server.data_to_send()) == [Decline(R.PROTOCOL_ERROR)]
    server = ClcConnection("server", 0.0)          # a DECLINE is never answered
    server.wait_proposal(0.0)
    server.receive_data(encode(Decline(R.NO_DEVICE)) + b"z", 0.0)
    assert events(server) == [FellBack(R.NO_DEVICE, True, b"z", 0x0301)]
    assert server.data_to_send() == b""


def _server_in_wait_confirm():
    server = ClcConnection("server", 0.0)
    server.wait_proposal(0.0)
    server.receive_data(encode(make_proposal()), 0.0)
    events(server)
    server.accept(make_accept(), 0.0)
    return server


@pytest.mark.parametrize("data", [*GARBAGE.values(), *INTACT_BAD.values(), encode(make_proposal()),
                                  encode(make_accept())])
def test_garbage_wait_confirm_aborts(data):
    server = _server_in_wait_confirm()
    server.receive_data(data, 0.1)
    (event,) = events(server)
    assert isinstance(event, Aborted) and event.reason is R.PROTOCOL_ERROR
    assert server.data_to_send() == b""             # the server already gave its one answer


def test_garbled_decline_wait_confirm_falls_back():
    server = _server_in_wait_confirm()
    server.receive_data(frame(4, b"\0\0\0\0") + b"app", 0.1)
    assert events(server) == [FellBack(R.PROTOCOL_ERROR, True, b"app")]


@pytest.mark.parametrize("data", [b"x", b"\0", encode(Decline(R.INTERNAL))])
def test_bytes_after_confirm_abort(data):
    server = _server_in_wait_confirm()
    server.receive_data(encode(Confirm()), 0.1)
    assert events(server) == [Established()]
    server.receive_data(data, 0.2)
    (event,) = events(server)
    assert isinstance(event, Aborted) and event.reason is R.PROTOCOL_ERROR
    server2 = _server_in_wait_confirm()             # in the same chunk: Established then Aborted
    server2.receive_data(encode(Confirm()) + data, 0.1)
    assert [type(e) for e in events(server2)] == [Established, Aborted]


def _client_waiting():
    client = ClcConnection("client", 0.0)
    client.propose(make_proposal(), 0.0)
    return client


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_wait_accept_aborts(kind):
    client = _client_waiting()
    client.receive_data(GARBAGE[kind], 0.1)
    (event,) = events(client)
    assert isinstance(event, Aborted)
    assert event.reason is (R.PEER_NOT_SMCISH if kind == "non-magic" else R.PROTOCOL_ERROR)
    assert client.data_to_send() == b""


@pytest.mark.parametrize("kind", list(INTACT_BAD))
def test_intact_bad_message_wait_accept_declined(kind):
    client = _client_waiting()
    client.receive_data(INTACT_BAD[kind] + b"tail", 0.1)
    reason = R.VERSION_MISMATCH if kind == "header-v2" else R.PROTOCOL_ERROR
    assert events(client) == [FellBack(reason, False, b"tail")]
    assert decode_all(client.data_to_send()) == [Decline(reason)]


def test_bad_accept_body_declined_and_server_falls_back():
    """A server whose ACCEPT is malformed gets DECLINE(PROTOCOL_ERROR) and both carry on."""
    client = _client_waiting()
    client.receive_data(frame(2, _accept_body(cap_log2=5)), 0.1)
    assert events(client) == [FellBack(R.PROTOCOL_ERROR, False, b"")]
    server = _server_in_wait_confirm()
    server.receive_data(client.data_to_send(), 0.2)
    assert events(server) == [FellBack(R.PROTOCOL_ERROR, True, b"", int(R.PROTOCOL_ERROR))]


def test_garbled_decline_wait_accept_not_answered():
    client = _client_waiting()
    client.receive_data(frame(4, b"\x01") + b"tail", 0.1)
    assert events(client) == [FellBack(R.PROTOCOL_ERROR, True, b"tail")]
    assert client.data_to_send() == b""             # the server already fell back: never answer


def test_unexpected_types_wait_accept():
    for msg in (make_proposal(), Confirm()):
        client = _client_waiting()
        client.receive_data(encode(msg), 0.1)
        assert events(client) == [FellBack(R.PROTOCOL_ERROR, False, b"")]
        assert decode_all(client.data_to_send()) == [Decline(R.PROTOCOL_ERROR)]


@pytest.mark.parametrize("data", [*GARBAGE.values(), *INTACT_BAD.values(), encode(Confirm())])
def test_garbage_declined_wait_aborts(data):
    client = _client_waiting()
    client.handle_timer(T)
    client.receive_data(data, T + 0.1)
    (event,) = events(client)
    assert isinstance(event, Aborted)
    assert client.data_to_send() == b""


def test_bytes_while_attaching_abort():
    client = _client_waiting()
    client.receive_data(encode(make_accept()) + b"!", 0.1)
    assert [type(e) for e in events(client)] == [AcceptReceived, Aborted]
    assert client.confirm(0.2) == b"" and client.decline(R.ATTACH_FAILED, 0.2) == b""


def test_client_bytes_after_established_abort():
    client = _client_waiting()
    client.receive_data(encode(make_accept()), 0.1)
    events(client)
    assert decode_all(client.confirm(0.2)) == [Confirm()]
    assert events(client) == [Established()]
    client.receive_eof(0.3)                         # TCP EOF after CONFIRM: the data path's business
    assert events(client) == []


# ---- EOF

def test_eof_wait_proposal_is_a_plain_client():
    for received in (b"", b"S", b"SMCi\x01", encode(make_proposal())[:20]):
        server = ClcConnection("server", 0.0)
        server.wait_proposal(0.0)
        server.receive_data(received, 0.0)
        server.receive_eof(0.1)
        assert events(server) == [FellBack(R.PEER_NOT_SMCISH, False, received)]
    server = ClcConnection("server", 0.0)           # EOF before the shell started
    server.receive_data(b"hi", 0.0)
    server.receive_eof(0.0)
    assert events(server) == []
    server.wait_proposal(0.0)
    assert events(server) == [FellBack(R.PEER_NOT_SMCISH, False, b"hi")]
    with pytest.raises(ClcStateError):
        server.receive_eof(0.1)


@pytest.mark.parametrize("where", ["wait-accept", "accept-received", "declined-wait",
                                   "proposal-received", "wait-confirm"])
def test_eof_mid_handshake_aborts(where):
    if where.startswith(("proposal", "wait-confirm")):
        conn = ClcConnection("server", 0.0)
        conn.wait_proposal(0.0)
        conn.receive_data(encode(make_proposal()), 0.0)
        events(conn)
        if where == "wait-confirm":
            conn.accept(make_accept(), 0.0)
    else:
        conn = _client_waiting()
        if where == "accept-received":
            conn.receive_data(encode(make_accept()), 0.0)
            events(conn)
        elif where == "declined-wait":
            conn.handle_timer(T)
    conn.receive_eof(0.5)
    (event,) = events(conn)
    assert isinstance(event, Aborted) and event.reason is R.PROTOCOL_ERROR


# ------------------------------------------------------------------------------------ chunking

chunk_sizes = st.lists(st.integers(1, 80), min_size=0, max_size=30)
app_bytes = st.binary(max_size=200)


def _feed_chunked(peer: Peer, stream: bytes, sizes, now=0.1):
    """Feed stream to peer in chunks of the given sizes (the rest in one chunk)."""
    sizes = iter(sizes)
    while stream:
        n = max(1, next(sizes, len(stream)))
        peer.feed(stream[:n], now)
        stream = stream[n:]


def _normalised(peer: Peer):
    return [FellBack(e.reason, e.by_peer, b"", e.peer_code) if isinstance(e, FellBack) else
            (type(e), e.reason) if isinstance(e, Aborted) else e for e in peer.events]


SERVER_SCRIPTS = {   # what a server receives, and the shell's answer to ProposalReceived
    "confirm": (lambda app: encode(make_proposal()) + encode(Confirm()) + app, "ok"),
    "client-declines": (lambda app: encode(make_proposal()) + encode(Decline(R.ATTACH_FAILED)) + app, "ok"),
    "plain-client": (lambda app: b"GET /" + app, "ok"),
    "version-mismatch": (lambda app: encode(make_proposal(min_version=3, max_version=4)) + app, "ok"),
    "bad-proposal": (lambda app: frame(1, _proposal_body(cap_log2=99)) + app, "ok"),
}
CLIENT_SCRIPTS = {   # what a client receives after its PROPOSAL, and its answer to AcceptReceived
    "server-declines": (lambda app: encode(Decline(R.GID_MISMATCH)) + app, "ok"),
    "accept-confirm": (lambda app: encode(make_accept()), "ok"),   # the server is silent after it
    "bad-accept": (lambda app: frame(2, _accept_body(version=0)) + app, "ok"),
    "unknown-code": (lambda app: frame(4, b"\xab\xcd") + app, "ok"),
}


@FAST
@given(st.sampled_from(sorted(SERVER_SCRIPTS)), app_bytes, chunk_sizes)
def test_server_chunking_invariant(script, app, sizes):
    make_stream, decide = SERVER_SCRIPTS[script]
    stream = make_stream(app)
    whole, chunked, bytewise = (Peer("server", decide=decide) for _ in range(3))
    for peer, cut in ((whole, [len(stream)]), (chunked, sizes), (bytewise, [1] * len(stream))):
        peer.conn.wait_proposal(0.0)
        _feed_chunked(peer, stream, cut)
    assert _normalised(whole) == _normalised(chunked) == _normalised(bytewise)
    assert whole.out == chunked.out == bytewise.out
    for peer in (whole, chunked, bytewise):
        if peer.mode == "tcp":              # replayed data + later bytes == exactly the app's bytes
            expect = stream if script == "plain-client" else app
            assert bytes(peer.app_in) == expect


@FAST
@given(st.sampled_from(sorted(CLIENT_SCRIPTS)), app_bytes, chunk_sizes)
def test_client_chunking_invariant(script, app, sizes):
    make_stream, decide = CLIENT_SCRIPTS[script]
    stream = make_stream(app)
    peers = []
    for cut in ([len(stream)], sizes, [1] * len(stream)):
        peer = Peer("client", decide=decide)
        peer.out += peer.conn.propose(make_proposal(), 0.0)
        peer.out.clear()
        _feed_chunked(peer, stream, cut)
        peers.append(peer)
    assert _normalised(peers[0]) == _normalised(peers[1]) == _normalised(peers[2])
    assert peers[0].out == peers[1].out == peers[2].out
    for peer in peers:
        if peer.mode == "tcp":
            assert bytes(peer.app_in) == app


decisions = st.one_of(st.just("ok"), local_reasons)


def test_bytes_after_accept_always_abort():
    stream = encode(make_accept()) + b"server must be silent"
    for cut in ([len(stream)], [1] * len(stream), [64, 1]):
        peer = Peer("client")
        peer.conn.propose(make_proposal(), 0.0)
        _feed_chunked(peer, stream, cut)
        assert peer.mode == "aborted" and peer.last().reason is R.PROTOCOL_ERROR


@settings(max_examples=200, deadline=None)
@given(decisions, decisions, app_bytes, app_bytes, chunk_sizes)
def test_conversation_any_decision_any_chunking(server_decides, client_decides, c_app, s_app, sizes):
    client = Peer("client", decide=client_decides, greeting=c_app)
    server = Peer("server", decide=server_decides, greeting=s_app)
    start(client, server)
    run(client, server, sizes=sizes)
    if server_decides == client_decides == "ok":
        assert client.mode == server.mode == "ism"
        return
    assert_tcp_intact(client, server)
    expected = server_decides if server_decides != "ok" else client_decides
    assert client.last().reason is server.last().reason is expected
    assert client.last().by_peer is (server_decides != "ok")
    assert server.last().by_peer is (server_decides == "ok")


# ------------------------------------------------------------------------------------ timed simulation

class Sim:
    """Discrete-event run of one connection: one-way latencies, slow shell decisions, both timers.

    Ties at one instant: deliveries first, then shell decisions, then timers.
    """

    def __init__(self, client: Peer, server: Peer, lat_cs, lat_sc, client_delay, server_delay,
                 client_policy, server_policy):
        import heapq
        self._heapq = heapq
        self.client, self.server = client, server
        self.lat = {id(client): lat_cs, id(server): lat_sc}
        self.delay = {id(client): client_delay, id(server): server_delay}
        self.policy = {id(client): client_policy, id(server): server_policy}
        self.other = {id(client): server, id(server): client}
        self.seen = {id(client): 0, id(server): 0}
        self.queue: list = []
        self.seq = 0
        self.now = 0.0

    def _push(self, when, kind, peer, payload=None):
        self.seq += 1
        self._heapq.heappush(self.queue, (when, kind, self.seq, peer, payload))

    def _after(self, peer: Peer):
        """Ship what the peer wrote, schedule the decisions its new events ask for."""
        if peer.out:
            self._push(self.now + self.lat[id(peer)], 0, self.other[id(peer)], bytes(peer.out))
            peer.out.clear()
        for ev in peer.events[self.seen[id(peer)]:]:
            if isinstance(ev, (ProposalReceived, AcceptReceived)):
                self._push(self.now + self.delay[id(peer)], 1, peer, ev)
        self.seen[id(peer)] = len(peer.events)

    def _decide(self, peer: Peer, ev):
        conn, policy = peer.conn, self.policy[id(peer)]
        if policy != "ok":
            peer.out += conn.decline(policy, self.now)
        elif isinstance(ev, ProposalReceived):
            peer.out += conn.accept(make_accept(version=ev.version), self.now)
        else:
            peer.out += conn.confirm(self.now)
        peer.pump(self.now)

    def run(self, until=60.0):
        start(self.client, self.server, now=0.0)
        for peer in (self.client, self.server):
            self._after(peer)
        while self.now < until:
            timers = [(p.conn.get_timer(), p) for p in (self.client, self.server)
                      if p.conn is not None and p.mode not in ("tcp", "aborted")
                      and p.conn.get_timer() is not None]
            nxt_timer = min(timers, key=lambda t: t[0], default=None)
            if self.queue and (nxt_timer is None or self.queue[0][0] <= nxt_timer[0]):
                when, kind, _seq, peer, payload = self._heapq.heappop(self.queue)
                self.now = max(self.now, when)
                if kind == 0:
                    peer.feed(payload, self.now)
                else:
                    self._decide(peer, payload)
            elif nxt_timer is not None:
                self.now = max(self.now, nxt_timer[0])
                nxt_timer[1].timer(self.now)
                peer = nxt_timer[1]
            else:
                return
            self._after(peer)
        raise AssertionError("simulation did not settle")


delays = st.integers(0, 60).map(lambda k: k * 0.05 + 0.003)      # 0 .. 3 s, no exact ties


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 19).map(lambda k: k * 0.02 + 0.001), st.integers(0, 19).map(lambda k: k * 0.02 + 0.002),
       delays, delays, decisions, decisions, app_bytes, app_bytes)
def test_timed_conversation_rtt_below_half_timeout(lat_cs, lat_sc, c_delay, s_delay, c_pol, s_pol,
                                                   c_app, s_app):
    """With RTT < T/2, no timing of slow shells ever aborts or corrupts: both ISM or both TCP intact."""
    client = Peer("client", decide=None, greeting=c_app)
    server = Peer("server", decide=None, greeting=s_app)
    Sim(client, server, lat_cs, lat_sc, c_delay, s_delay, c_pol, s_pol).run()
    assert "aborted" not in (client.mode, server.mode), (client.events, server.events)
    if client.mode == "ism" or server.mode == "ism":
        assert client.mode == server.mode == "ism"
        assert c_pol == s_pol == "ok"
    else:
        assert_tcp_intact(client, server)
        assert client.conn.reason is server.conn.reason
    rtt = lat_cs + lat_sc
    if s_delay < T / 2 - 0.01 and rtt + s_delay + c_delay < T - 0.01:     # everyone in time
        expected = "ism" if c_pol == s_pol == "ok" else "tcp"
        assert client.mode == expected
        if expected == "tcp":
            assert client.conn.reason is (s_pol if s_pol != "ok" else c_pol)
    if s_delay > T / 2 + 0.01 or (s_pol == "ok" and rtt + s_delay + c_delay > T + 0.01):
        assert client.mode == "tcp" and client.conn.reason is R.TIMEOUT


@settings(max_examples=200, deadline=None)
@given(delays, delays, delays, delays, decisions, decisions, app_bytes, app_bytes,
       st.sampled_from([0.5, 1.0, 2.0, 4.0]))
def test_timed_conversation_any_latency(lat_cs, lat_sc, c_delay, s_delay, c_pol, s_pol, c_app, s_app,
                                        client_timeout):
    """Any latency, any client timeout: never an exception; unless one side aborted (and so resets
    the connection), both sides agree, and on TCP each application gets exactly the other's bytes."""
    client = Peer("client", decide=None, greeting=c_app, timeout=client_timeout)
    server = Peer("server", decide=None, greeting=s_app)
    Sim(client, server, lat_cs, lat_sc, c_delay, s_delay, c_pol, s_pol).run()
    if "aborted" in (client.mode, server.mode):
        return
    assert client.mode == server.mode
    if client.mode == "tcp":
        assert_tcp_intact(client, server)
