"""Fuzzing the set-up in one process: the sans-I/O state machine, the claim lookup over arbitrary
claim tables and records, and the real server-side set-up path fed arbitrary peer records.

- ``SetupMachine`` (hypothesis, any sequence of local calls, peer records, timers, withdrawals
  for the three kinds of machines: classic client, optimistic client, server): only
  ``SetupStateError`` from a refused local call, at most one outcome and nothing written after
  it, only the phases of its role written, every deadline within the role's bound, ISM only
  after the peer's word for our gen, and a timer always ends the set-up (bounded).
- ``Hub.find_claim`` over a real link group whose client side holds arbitrary claim entries and
  set-up records: never raises, returns only an exact 4-tuple match in a claim phase with a slot
  below max_slots, and finds one whenever one exists.
- The real server (``smcish.create_server``) and a link group toward it from this process's own
  hub: each example writes an arbitrary record and claim entries into the client side, connects
  a real socket, optionally gives a final word and TCP bytes; the server decides within its
  bound, never raises anything but connection errors, echoes TCP bytes exactly when it served
  TCP, and afterwards holds no slot and serves ordinary clients.

Bounded and deterministic by default (what CI runs, a few seconds): a fixed number of examples per
target, derandomized (the same examples on every run, no example database), so a run cannot fail
on an input the previous one did not see. To fuzz for long by hand, set SMCISH_FUZZ_EXAMPLES: that
many fresh random examples per target, e.g.

    SMCISH_FUZZ_EXAMPLES=200000 python -m pytest tests/hardening/test_fuzz_setup.py -k machine

(These succeed tests/fuzz_clc.py, which fuzzed the v1 handshake codec and went with it in v2.)
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import sys
import time
import types
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ism_backend
import smcish
from smcish import clc, discovery, linkgroup
from smcish import ring as R
from smcish.linkgroup import addr_bytes

from .hostile_helpers import HOST, ROOT, plain_client

sys.path.insert(0, os.path.join(ROOT, "tests"))
from slot_helpers import GroupPair, hdr

S = clc.SetupState
LONG_RUN = int(os.environ.get("SMCISH_FUZZ_EXAMPLES", "0"))


def fuzz_settings(examples: int, **kw) -> settings:
    """``examples`` derandomized examples, or SMCISH_FUZZ_EXAMPLES random ones (see above)."""
    if LONG_RUN:
        return settings(max_examples=LONG_RUN, deadline=None, derandomize=False, **kw)
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None, **kw)


T = 2.0
U32 = (1 << 32) - 1
OPTIMISTIC = getattr(clc, "PHASE_OPTIMISTIC", None)
WITHDRAWING = getattr(clc, "PHASE_WITHDRAWING", None)
CLAIM_PHASES = tuple(p for p in (clc.PHASE_CLAIMED, OPTIMISTIC) if p is not None)
CLIENT_WRITES = {p for p in (clc.PHASE_FINAL_ISM, clc.PHASE_FINAL_TCP, WITHDRAWING) if p is not None}
SERVER_WRITES = {clc.PHASE_DECLINED}

# ------------------------------------------------------------------ the state machine

OPS = ["observe", "settle", "timer", "confirm", "decline", "abandon", "withdraw", "peer_gone",
       "connected", "accept"]
phase_st = st.one_of(st.integers(0, 6), st.integers(0, U32))
gen_st = st.sampled_from([0, -1, 1, 2]) | st.integers(0, U32)
op_st = st.tuples(st.sampled_from(OPS), gen_st, phase_st, st.integers(0, U32),
                  st.floats(0, 3 * T, allow_nan=False))


@fuzz_settings(400)
@given(kind=st.sampled_from(["client", "optimistic", "server"]), gen=st.integers(1, U32),
       ops=st.lists(op_st, max_size=16))
def test_setup_machine_any_inputs(kind, gen, ops):
    role = "server" if kind == "server" else "client"
    m = clc.SetupMachine(role, 0.0, T)
    now = 0.0
    if role == "client":
        if kind == "optimistic" and OPTIMISTIC is not None:
            m.claim(gen, now, optimistic=True)
        else:
            m.claim(gen, now)
    else:
        m.accept(gen, now)
    outcomes = []
    saw_peer_ism = False          # the peer's word for our gen that allows ISM

    def drain():
        write = m.take_write()
        if write is not None:
            assert not outcomes, f"wrote {write} after the outcome {outcomes}"
            allowed = CLIENT_WRITES if role == "client" else SERVER_WRITES
            assert write[0] in allowed and 0 <= write[1] <= U32, write
        while True:
            event = m.next_event()
            if event is None:
                break
            outcomes.append(event)
            if isinstance(event, clc.FellBack):
                assert isinstance(event.reason, clc.DeclineReason)
            if isinstance(event, clc.Established):
                assert saw_peer_ism, "ISM without the peer's word for our gen"
        assert len(outcomes) <= 1, outcomes
        if outcomes:
            assert m.done
        if m.deadline is not None and not m.done:
            bound = T if role == "client" else 2 * T
            assert m.deadline <= now + bound + 1e-9, (m.deadline, now, m.state)

    for op, dgen, phase, reason, dt in ops:
        now += dt
        g = gen + dgen if dgen in (-1, 0, 1, 2) and dgen < 3 else dgen
        g &= U32
        if op in ("observe", "settle") and g == gen:
            if role == "client" and phase == clc.PHASE_ACCEPTED:
                saw_peer_ism = True
            if role == "server" and phase in (clc.PHASE_FINAL_ISM, OPTIMISTIC):
                saw_peer_ism = True
        try:
            if op == "observe":
                m.observe(g, phase, reason, now)
            elif op == "settle" and hasattr(m, "settle"):
                m.settle(g, phase, reason, now)
            elif op == "timer":
                m.handle_timer(now)
            elif op == "confirm":
                m.confirm(now)
            elif op == "decline":
                m.decline(clc.DeclineReason.PROTOCOL_ERROR, now,
                          gen=gen if role == "server" else None)
            elif op == "abandon" and role == "client":
                m.abandon(clc.DeclineReason.INTERNAL, now)
            elif op == "withdraw" and hasattr(m, "withdraw"):
                m.withdraw(clc.DeclineReason.PEER_NOT_SMCISH, now)
            elif op == "peer_gone":
                m.peer_gone(now)
            elif op == "connected" and hasattr(m, "connected"):
                m.connected(now)
            elif op == "accept" and role == "server":
                m.accept(gen, now)
        except clc.SetupStateError:
            assert op in ("confirm", "decline", "abandon", "accept"), op
        drain()
    # Bounded: whatever happened, the timer (and, for a withdrawal, the server's silence) ends it.
    for _ in range(3):
        if m.done:
            break
        if m.deadline is not None:
            now = max(now, m.deadline)
            m.handle_timer(now)
        if m.state.name == "WITHDRAWING":
            m.settle(gen + 7, 0, 0, now)
        elif m.state is S.ACCEPTED_SEEN:
            (m.confirm if role == "client" else m.handle_timer)(now)
        drain()
    assert m.done, m.state


# ------------------------------------------------------------------ find_claim over arbitrary tables

@pytest.fixture(scope="module")
def pair():
    p = GroupPair(max_slots=128)
    yield p
    p.close()


record_st = st.fixed_dictionaries({
    "slot": st.integers(0, 127),
    "gen": st.integers(0, U32),
    "phase": st.one_of(st.sampled_from([0, 1, 2, 3, 4, 5]), st.integers(0, U32)),
    "cport": st.sampled_from([40000, 40001, 0, 65535]) | st.integers(0, U32),
    "sport": st.sampled_from([5000, 5001]) | st.integers(0, U32),
    "caddr": st.sampled_from(["127.0.0.1", "127.0.0.2", "::1", "10.0.0.1"]),
    "saddr": st.sampled_from(["127.0.0.1", "127.0.0.3"]),
})
entry_st = st.tuples(st.integers(0, R.G_CLAIM_ENTRIES - 1),
                     st.one_of(st.integers(0, (1 << 64) - 1),
                               st.tuples(st.sampled_from([40000, 40001, 7]),
                                         st.integers(0, 300)).map(lambda t: (t[0] << 32) | t[1])))


@fuzz_settings(300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(records=st.lists(record_st, max_size=12), entries=st.lists(entry_st, max_size=40),
       honest=st.booleans())
def test_find_claim_any_claim_table_and_records(pair, records, entries, honest):
    a = pair.a.ext0
    a.rw[R.G_OFF_CLAIMS:R.G_OFF_CLAIMS + 8 * R.G_CLAIM_ENTRIES] = bytes(8 * R.G_CLAIM_ENTRIES)
    for k in range(128):
        a.rw[hdr(k) + R.OFF_SETUP:hdr(k) + R.HEADER_SIZE] = bytes(R.HEADER_SIZE - R.OFF_SETUP)
    for r in records:
        pair.ga.publish_setup(r["slot"], R.Setup(
            gen=r["gen"], phase=r["phase"], cport=r["cport"] & U32, sport=r["sport"] & U32,
            caddr=addr_bytes(r["caddr"]), saddr=addr_bytes(r["saddr"])))
    for index, value in entries:
        struct.pack_into("<Q", a.rw, R.G_OFF_CLAIMS + 8 * index, value)
    if honest:       # an honest claim among the garbage
        pair.ga.publish_setup(5, R.Setup(gen=3, phase=CLAIM_PHASES[-1], cport=40000, sport=5000,
                                         caddr=addr_bytes("127.0.0.1"),
                                         saddr=addr_bytes("127.0.0.1")))
        pair.ga.post_claim(40000, 5)
    group = types.SimpleNamespace(dying=False, group=pair.gb, max_slots=128)
    hub = types.SimpleNamespace(server_groups={b"g": group})
    peer, local = ("127.0.0.1", 40000), ("127.0.0.1", 5000)
    found = linkgroup.Hub.find_claim(hub, peer, local)
    # every exact match the table really holds (window of 32 from the port's home)
    home = ((40000 * 2654435761) & U32) >> 19 & (R.G_CLAIM_ENTRIES - 1)
    window = [struct.unpack_from("<Q", a.rw, R.G_OFF_CLAIMS + 8 * ((home + i) % R.G_CLAIM_ENTRIES))[0]
              for i in range(R.G_CLAIM_PROBE)]
    valid = []
    for value in window:
        if value >> 32 == 40000 and 1 <= (value & U32) <= 128:
            slot = (value & U32) - 1
            s = pair.gb.read_peer_setup(slot)
            if (s.phase in CLAIM_PHASES and s.cport == 40000 and s.sport == 5000
                    and s.caddr == addr_bytes("127.0.0.1") and s.saddr == addr_bytes("127.0.0.1")):
                valid.append(slot)
    if found is None:
        assert not valid, valid
    else:
        g, slot, setup = found
        assert g is group and 0 <= slot < 128 and slot in valid, (slot, valid)
        assert setup.phase in CLAIM_PHASES and setup.cport == 40000 and setup.sport == 5000


# ------------------------------------------------------------------ the real server path

TS = 0.1            # the in-process server's handshake_timeout: a silent claim costs 2 x TS


class _App:
    records: dict = {}

    def connection_made(self, t):
        self.t = t
        info = t.get_extra_info("smcish")
        self.rec = {"mode": info.mode, "reason": getattr(info.reason, "name", None), "lost": None}
        _App.records[t.get_extra_info("peername")[1]] = self.rec

    def data_received(self, data):
        self.t.write(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc):
        self.rec["lost"] = exc if exc is not None else "clean"

    def pause_writing(self):
        pass

    def resume_writing(self):
        pass


class InProcess:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.errors: list = []
        self.loop.set_exception_handler(lambda lp, ctx: self.errors.append(ctx))
        self.run(self._start())

    def run(self, coro, timeout: float = 20.0):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    async def _start(self) -> None:
        _App.records = {}
        self.server = await smcish.create_server(_App, HOST, 0, handshake_timeout=TS)
        self.port = self.server.sockets[0].getsockname()[1]
        self.hub = linkgroup.Hub.get(self.loop, ism_backend.get_device())
        acc = await discovery.find_acceptor(self.loop, self.hub, socket.AF_INET, HOST, self.port,
                                            None)
        acc.sock.close()
        self.group = await self.hub.group_for(acc.advert)
        self.server_group = self.hub.server_groups[self.group.id]
        self.block, self.ext = self.group.alloc_block(4096)

    def close(self) -> None:
        async def stop():
            self.server.close()
            await self.server.wait_closed()
        self.run(stop())
        self.loop.run_until_complete(asyncio.sleep(0.05))
        self.hub.close()
        self.loop.close()


@pytest.fixture(scope="module")
def inproc():
    h = InProcess()
    yield h
    h.close()


spec_st = st.fixed_dictionaries({
    "slot": st.integers(0, 200),
    "gen": st.sampled_from([0, 1, U32]) | st.integers(0, U32),
    "phase": st.sampled_from([0, 1, 1, 2, 3, 4, 4, 5]) | st.integers(0, U32),
    "ring0": st.sampled_from(["ok", "log2", "ext", "misaligned", "oob"]),
    "ino": st.sampled_from(["real", "real", "other", "zero"]),
    "cport": st.sampled_from(["real", "real", "real", "other"]),
    "sport": st.sampled_from(["real", "real", "other"]),
    "claim": st.sampled_from(["real", "real", "none", "bad_slot"]),
    "garbage": st.lists(st.tuples(st.integers(0, R.G_CLAIM_ENTRIES - 1), st.integers(0, (1 << 64) - 1)),
                        max_size=4),
    "action": st.sampled_from(["none", "final_ism", "final_tcp", "flip_gen"]),
    "tcp": st.binary(max_size=64),
})


@fuzz_settings(40, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=spec_st)
def test_server_setup_path_with_arbitrary_peer_records(inproc, spec):
    h = inproc
    g = h.group
    lg = g.group
    slot = spec["slot"] % g.max_slots
    if slot in g.conns or slot in h.server_group.conns:
        slot = (slot + 300) % g.max_slots
    sock = socket.socket()
    sock.setblocking(False)
    sock.bind((HOST, 0))
    cport = sock.getsockname()[1]
    ino = os.fstat(sock.fileno()).st_ino
    log2 = 12
    off, ext = h.block.off, h.block.ext
    off = {"misaligned": off + 1024, "oob": g.my_exts[0][0].size + 4096}.get(spec["ring0"], off)
    ext = 9 if spec["ring0"] == "ext" else ext
    log2 = 40 if spec["ring0"] == "log2" else log2
    setup = R.Setup(gen=spec["gen"], phase=spec["phase"] & U32, family=socket.AF_INET,
                    ring0_off=off, ring0_ext=ext, ring0_log2=log2,
                    sock_ino={"real": ino, "other": ino + 1, "zero": 0}[spec["ino"]],
                    cport=cport if spec["cport"] == "real" else cport ^ 1,
                    sport=h.port if spec["sport"] == "real" else h.port ^ 1,
                    caddr=addr_bytes(HOST), saddr=addr_bytes(HOST))
    lg.reset_slot(slot)
    lg.publish_setup(slot, setup)
    mem = g.my_exts[0][0].mem
    posted = []
    for index, value in spec["garbage"]:
        struct.pack_into("<Q", mem, R.G_OFF_CLAIMS + 8 * index, value)
        posted.append(index)
    if spec["claim"] == "real":
        lg.post_claim(cport, slot)
    elif spec["claim"] == "bad_slot":
        struct.pack_into("<Q", mem, R.G_OFF_CLAIMS + 8 * 100, (cport << 32) | (g.max_slots + 5))
        posted.append(100)
    errors_before = len(h.errors)

    async def one():
        loop = h.loop
        await loop.sock_connect(sock, (HOST, h.port))
        ring = None
        deadline = loop.time() + 0.05          # the server decides at accept (same loop)
        snap = None
        while loop.time() < deadline:
            s = lg.read_peer_setup(slot)
            if s.gen == setup.gen and s.phase != 0:
                snap = s
                break
            await asyncio.sleep(0.002)
        try:
            if spec["action"] == "final_ism" and snap is not None and snap.phase == clc.PHASE_ACCEPTED:
                try:
                    ring = R.Ring.in_slot(lg, slot, h.ext, h.block.off, h.block.size,
                                          snap.ring0_ext, snap.ring0_off, snap.ring0_log2)
                except (R.RingCorrupted, ValueError):
                    ring = None
                lg.set_phase(slot, setup.gen, clc.PHASE_FINAL_ISM)
                lg.notify(slot)
            elif spec["action"] == "final_tcp":
                lg.set_phase(slot, setup.gen, clc.PHASE_FINAL_TCP, 0x201)
                lg.notify(slot)
            elif spec["action"] == "flip_gen":
                lg.set_phase(slot, (setup.gen + 1) & U32, clc.PHASE_CLAIMED)
                lg.notify(slot)
            data = spec["tcp"]
            got = b""
            end = "none"
            if data:
                await loop.sock_sendall(sock, data)
            waiting = (snap is not None and snap.phase == clc.PHASE_ACCEPTED
                       and spec["action"] == "none" and setup.phase == clc.PHASE_CLAIMED)
            # a server waiting for our final word resets us within 2 x TS (that bound is checked)
            deadline = loop.time() + (2 * TS + 0.3 if data or waiting else 0.02)
            while loop.time() < deadline and len(got) < max(1, len(data)):
                try:
                    chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096),
                                                   max(0.01, deadline - loop.time()))
                except TimeoutError:
                    break
                except ConnectionResetError:
                    end = "rst"
                    break
                if not chunk:
                    end = "eof"
                    break
                got += chunk
            if waiting and not data:
                assert end in ("eof", "rst"), "the server did not end a set-up left without a word"
            return snap, got, end
        finally:
            if ring is not None:
                ring.close()

    try:
        _snap, got, end = h.run(one(), 10)
    finally:
        sock.close()
        lg.clear_claim(cport, slot)
        for index in posted:
            struct.pack_into("<Q", mem, R.G_OFF_CLAIMS + 8 * index, 0)
        lg.set_phase(slot, 0, 0)
    rec = _App.records.get(cport)
    if rec is not None and rec["mode"] == "tcp" and spec["tcp"] and end == "none":
        assert got == spec["tcp"], (spec, rec, got)
    if rec is not None and rec["mode"] == "ism":
        assert end in ("none", "eof", "rst")      # TCP bytes on an ISM connection: it resets
    new = h.errors[errors_before:]
    bad = [c for c in new if not isinstance(c.get("exception"), ConnectionError)]
    assert not bad, bad


def test_server_is_clean_and_serves_after_the_fuzzing(inproc):
    """After the examples above: every connection the server had ended (no set-up pending, no
    connection open; a closed one may still hold its slot while it waits for the peer's
    CLOSED/ABORT, which this fake peer never publishes: the slot is never reused before that),
    and both an smcish client (ISM) and a plain client (TCP, at once) are served."""
    h = inproc

    def unfinished():
        return {slot: c for slot, c in h.server_group.conns.items()
                if not getattr(c, "_conn_lost", 0)}

    async def after():
        deadline = time.monotonic() + 5
        while unfinished() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert not unfinished(), h.server_group.conns
        r, w = await smcish.open_connection(HOST, h.port, handshake_timeout=2.0)
        w.write(b"ping" * 100)
        assert await r.readexactly(400) == b"ping" * 100
        mode = w.get_extra_info("smcish").mode
        w.close()
        return mode

    assert h.run(after()) == "ism"
    payload = os.urandom(1000)
    out = h.loop.run_until_complete(h.loop.run_in_executor(None, plain_client, h.port, payload))
    assert out["got"] == payload and out["first_byte_s"] < 0.5, out
    assert zlib.crc32(out["got"]) == zlib.crc32(payload)
