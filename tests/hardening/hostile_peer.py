"""A hostile smcish peer (v2): joins a link group with a victim through the real library, then
writes garbage into memory it legitimately owns.

Runs as its own process (its own device endpoint: embedded, or an ismd client when SMCISH_DEVICE
says so; ``--setuid=N`` imports everything as root, then drops to uid/gid N) and is driven over
stdin/stdout with JSON lines (``tests/hardening/hostile_helpers.py`` has the parent side)::

    {"id": 1, "cmd": "client", "case": NAME, "port": P, "args": {...}}  # against an smcish server
    {"id": 2, "cmd": "listen", "honest": false}                         # start a hostile server
    {"id": 3, "cmd": "server", "case": NAME, "args": {...}}             # answer the victim's next claim
    {"id": 4, "cmd": "reset"}                                           # close groups, hub, servers
    {"id": 5, "cmd": "exit"}

Every command is answered by one line ``{"id": n, "ok": bool, "result": {...}}`` (``error`` and
``trace`` when the case itself failed). Every wait is bounded.

What the hostile owns and scribbles into (docs/design.md 2.2/2.3, ``smcish/_cffi/ring.h``):
its extent 0 (``LinkGroup.my_exts[0][0].mem``: control area, listener table, claim table,
notification queue, its slot headers with their set-up records) and its ring blocks. It never
writes the victim's memory (it maps it read-only and could not). It may also ring the victim's
doorbell (the eventfd it received with the victim's extent 0) and write on TCP.

Client cases take over a real ISM connection made with ``smcish.open_connection`` (removed from
the hostile's own dispatch, then driven through its ``smcish.ring.Ring``) or make the set-up by
hand (``discovery.find_acceptor`` + ``Hub.group_for``, then any set-up record and claim, then
connect). Server cases run ``smcish.create_server`` with the hub's ``find_claim`` disabled, so the
library accepts every TCP connection as plain TCP (the hostile's application records every byte
the victim sends on TCP and echoes it) while the case answers the victim's claims by hand.
"""

from __future__ import annotations

import array
import asyncio
import ctypes
import json
import os
import random
import socket
import struct
import sys
import threading
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import concurrent.futures.thread  # noqa: E402,F401 - everything is imported before a setuid drop

import ism_backend  # noqa: E402
import ism_backend.client  # noqa: E402
import ism_backend.control  # noqa: E402
import ism_backend.sockets  # noqa: E402
import smcish  # noqa: E402
from smcish import clc, discovery, linkgroup  # noqa: E402
from smcish import ring as R  # noqa: E402
from smcish.linkgroup import addr_bytes  # noqa: E402

HOST = "127.0.0.1"
OPTIMISTIC = getattr(clc, "PHASE_OPTIMISTIC", None)
WITHDRAWING = getattr(clc, "PHASE_WITHDRAWING", None)
CLAIM_PHASES = tuple(p for p in (clc.PHASE_CLAIMED, OPTIMISTIC) if p is not None)
U64 = (1 << 64) - 1
U32 = (1 << 32) - 1
HDR = R.HEADER_SIZE
RING = 64 * 1024
LOG2 = 16
NQ_MASK = R.G_NQ_ENTRIES - 1


def hdr_off(slot: int) -> int:
    return R.G_OFF_HDRS + slot * HDR


def put(mem, off: int, fmt: str, value: int) -> None:
    struct.pack_into("=" + fmt, mem, off, value & ((1 << (8 * struct.calcsize(fmt))) - 1))


def get(mem, off: int, fmt: str) -> int:
    return struct.unpack_from("=" + fmt, mem, off)[0]


def exc_info(exc: BaseException | None) -> dict | None:
    if exc is None:
        return None
    return {"type": type(exc).__name__, "msg": str(exc)[:400],
            "mro": [c.__name__ for c in type(exc).__mro__]}


class Flipper:
    """A thread writing values into our own memory until stopped (bounded by ``seconds``)."""

    def __init__(self, fn, seconds: float) -> None:
        self.fn = fn
        self.stop_at = time.monotonic() + seconds
        self.n = 0
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        rng = random.Random()
        while not self._stop and time.monotonic() < self.stop_at:
            try:
                self.fn(rng)
            except (ValueError, OSError, TypeError, struct.error):
                pass
            self.n += 1
            if self.n % 64 == 0:
                time.sleep(0)

    def stop(self) -> int:
        self._stop = True
        self.thread.join(5)
        return self.n


# ------------------------------------------------------------------ the hostile's state

class Ctx:
    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.device = ism_backend.get_device()
        self.flippers: list[Flipper] = []
        self.writers: list = []
        self.socks: list[socket.socket] = []
        self.rings: list = []
        self.server = None
        self.server_hub = None
        self.tcp: dict[int, TcpRecorder] = {}      # hostile server: victim port -> recorder
        self.answered: set = set()
        self.echo_tcp = True
        self.banner = b""
        self.timing: dict = {}
        self.used: list = []          # (group, slot) our cases wrote into: ABORTed at reset

    def hub(self) -> linkgroup.Hub:
        return linkgroup.Hub.get(self.loop, self.device)

    async def reset(self) -> dict:
        """Close everything of the last case: the peer sees its groups closed (group_close)."""
        for f in self.flippers:
            f.stop()
        self.flippers.clear()
        for ring in self.rings:
            try:
                ring.close()
            except Exception:
                pass
        self.rings.clear()
        for w in self.writers:
            try:
                w.transport.abort()
            except Exception:
                pass
        self.writers.clear()
        for s in self.socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            s.close()
        self.socks.clear()
        for rec in self.tcp.values():
            if rec.transport is not None:
                rec.transport.abort()
        self.tcp.clear()
        if self.server is not None:
            self.server.close()
            self.server = None
        self.server_hub = None
        self.answered.clear()
        # Tell the victim, as any peer would, that we will not read its rings again (ABORT in
        # each slot we used), so that it can release those slots before we close the groups.
        # (Without this a slot the victim aborted itself lingers; test_hostile_peer.py has the
        # case where the peer leaves without a word.)
        told = 0
        for group, slot in self.used:
            if group.destroyed or group.dying:
                continue
            try:
                mem = group.my_exts[0][0].mem
                h = hdr_off(slot)
                put(mem, h + R.OFF_STATE, "I", get(mem, h + R.OFF_STATE, "I") | R.STATE_ABORT)
                group.group.notify(slot)
            except Exception:  # a broken group: nothing to tell
                pass
            told += ring_doorbell(group)
        self.used.clear()
        if told:
            await asyncio.sleep(0.01)
        closed = 0
        for hub in list(getattr(self.loop, linkgroup._LOOP_ATTR, {}).values()):
            for group in list(hub.client_groups.values()) + list(hub.server_groups.values()):
                try:
                    group.close()                  # fail + group_close to the peer
                except Exception:
                    pass
                closed += 1
            hub.close()
        await asyncio.sleep(0.01)                  # let the group_close requests go out
        return {"groups_closed": closed}


# ------------------------------------------------------------------ rings driven by hand

class Holder:
    """Stands in ``group.conns`` for a slot whose rings a case drives by hand, so that the
    library closes them before it unmaps the group's memory (a ring left open over unmapped
    memory would crash the hostile itself, not the victim)."""

    def __init__(self, group, slot: int) -> None:
        self.group = group
        self.slot = slot
        self.rings: list = []
        group.conns[slot] = self

    def _smc_notify(self) -> None:
        pass

    def _smc_tick(self, now: float) -> None:
        pass

    def _smc_group_failed(self, exc: BaseException) -> None:
        for ring in self.rings:
            ring.close()
        if self.group.conns.get(self.slot) is self:
            del self.group.conns[self.slot]


def hand_ring(group, slot: int, *args):
    """``Ring.in_slot(group.group, slot, *args)``, closed by the library if the group dies."""
    holder = group.conns.get(slot)
    if not isinstance(holder, Holder):
        holder = Holder(group, slot)
    ring = R.Ring.in_slot(group.group, slot, *args)
    holder.rings.append(ring)
    return ring


# ------------------------------------------------------------------ client side: a real connection

class Conn:
    """A real ISM connection made by the library, then taken over: the hostile's own library no
    longer reads or notifies for it; the case drives its Ring and its slot header by hand."""

    def __init__(self, ctx: Ctx, reader, writer) -> None:
        t = writer.transport
        self.ctx = ctx
        self.reader, self.writer, self.t = reader, writer, t
        self.group = t._group
        self.lg = self.group.group
        self.ring = t._ring
        self.slot = t._slot
        self.gen = t._smc_gen
        self.mem = self.group.my_exts[0][0].mem
        self.peer = self.group.peer_exts[0][0].mem
        self.h = hdr_off(self.slot)
        self.port = t.get_extra_info("sockname")[1]
        ctx.used.append((self.group, self.slot))
        # Our library stops reading and notifying for it, but the transport stays bound to its
        # slot: when the group dies, the library closes the ring before unmapping the memory.
        t._smc_notify = lambda: None
        t._smc_tick = lambda now: None
        self.group.tickers.discard(t)
        t.pause_reading()

    @classmethod
    async def open(cls, ctx: Ctx, port: int, **kw) -> Conn:
        reader, writer = await asyncio.wait_for(
            smcish.open_connection(HOST, port, ring_size=RING, handshake_timeout=2.0, **kw), 10)
        ctx.writers.append(writer)
        info = writer.get_extra_info("smcish")
        if info.mode != "ism":
            raise AssertionError(f"the hostile's own connection is not ISM: {info!r}")
        # An optimistic client (the library may send before the server answered) is taken over
        # only once its set-up is complete: the victim has accepted and the ring reads too.
        t = writer.transport
        deadline = time.monotonic() + 5.0
        while getattr(t, "_setup", None) is not None or not getattr(t._ring, "rx_attached", True):
            if time.monotonic() > deadline:
                raise AssertionError("the hostile's own connection never completed its set-up")
            await asyncio.sleep(0.001)
        return cls(ctx, reader, writer)

    # our slot header (the peer reads it)
    def put(self, off: int, fmt: str, value: int) -> None:
        put(self.mem, self.h + off, fmt, value)

    def get(self, off: int, fmt: str) -> int:
        return get(self.mem, self.h + off, fmt)

    def peer_get(self, off: int, fmt: str) -> int:
        return get(self.peer, self.h + off, fmt)

    def kick(self) -> None:
        """Tell the victim to look: a legitimate notification, and its doorbell."""
        try:
            self.lg.notify(self.slot)
        except Exception:
            pass
        self.doorbell()

    def doorbell(self) -> None:
        ring_doorbell(self.group)

    async def exchange(self, payload: bytes, timeout: float = 3.0) -> bytes:
        """Write through the ring, read the victim's echo back from its ring."""
        sent = 0
        got = bytearray()
        deadline = time.monotonic() + timeout
        while len(got) < len(payload):
            if sent < len(payload):
                sent += self.ring.write(payload[sent:])
            n = self.ring.readable()
            if n:
                got += self.ring.read(n)
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"echo: {len(got)} of {len(payload)} bytes in {timeout} s")
            await asyncio.sleep(0.0005)
        return bytes(got)

    async def tcp_outcome(self, timeout: float = 3.0) -> str:
        """Wait (bounded) until our TCP connection is closed by the victim."""
        tcp = self.t._tcp
        deadline = time.monotonic() + timeout
        while not tcp.is_closing():
            if time.monotonic() > deadline:
                return "open"
            await asyncio.sleep(0.002)
        return "closed"


def ring_doorbell(group) -> bool:
    """Write the victim's extent-0 doorbell (an eventfd we received with its extent 0), while our
    group still holds it (after the victim tore the group down, ours is destroyed too)."""
    entry = group.peer_exts.get(0)
    if entry is None or group.destroyed:
        return False
    try:
        os.eventfd_write(entry[0].doorbell_fd, 1)
        return True
    except OSError:
        return False


def _victim_cons(c: Conn) -> int:
    """The victim's consumer cursor of our ring (its slot header, which we map read-only)."""
    return c.peer_get(R.OFF_CONS_PEER, "Q")


def _tx_cap(c: Conn) -> int:
    return c.ring.tx_capacity


async def _warm(c: Conn, size: int = 300) -> None:
    data = os.urandom(size)
    assert await c.exchange(data, 5.0) == data


async def _expect_reset(c: Conn, args: dict) -> dict:
    c.kick()
    t0 = time.monotonic()
    outcome = await c.tcp_outcome(args.get("wait", 3.0))
    c.ctx.timing["reset_seen"] = round(time.monotonic() - t0, 3)
    return {"port": c.port, "tcp": outcome}


async def _expect_works(c: Conn, args: dict) -> dict:
    c.kick()
    data = os.urandom(args.get("size", 5000))
    echo = await c.exchange(data, args.get("wait", 3.0))
    return {"port": c.port, "echo_ok": echo == data}


def ring_case(poke, expect=_expect_reset, warm=True):
    """A case on an established connection: optional warm-up exchange, the poke, the check."""
    async def case(ctx: Ctx, port: int, args: dict) -> dict:
        t0 = time.monotonic()
        c = await Conn.open(ctx, port)
        ctx.timing["open"] = round(time.monotonic() - t0, 3)
        if warm:
            t0 = time.monotonic()
            await _warm(c, 300 if warm is True else warm)
            ctx.timing["warm"] = round(time.monotonic() - t0, 3)
        extra = poke(c, args) or {}
        if asyncio.iscoroutine(extra):
            extra = await extra or {}
        out = await expect(c, args)
        out.update(extra)
        return out
    return case


def _poke_prod(value_fn):
    def poke(c: Conn, args: dict) -> dict:
        value = value_fn(c) & U64
        c.put(R.OFF_PROD, "Q", value)
        return {"poked_prod": value}
    return poke


def _poke_cons(value_fn):
    async def poke(c: Conn, args: dict) -> dict:
        value = value_fn(c) & U64
        c.put(R.OFF_CONS_PEER, "Q", value)
        # The victim re-reads our cons_peer when it needs room: send more than its ring holds
        # (it echoes everything) and never read.
        sent = 0
        deadline = time.monotonic() + 3.0
        while sent < 2 * RING and time.monotonic() < deadline and not c.t._tcp.is_closing():
            try:
                sent += c.ring.write(os.urandom(8192))
            except (R.RingCorrupted, ValueError):
                break
            await asyncio.sleep(0.001)
        return {"poked_cons": value, "sent_after": sent}
    return poke


def _poke_cons_when_full(value_fn):
    """Fill the victim's ring (it echoes, we do not read) so it waits for room having seen our
    cons_peer, then move cons_peer to ``value_fn(c)`` and tell it."""
    async def poke(c: Conn, args: dict) -> dict:
        sent = 0
        deadline = time.monotonic() + 3.0
        while sent < 3 * RING and time.monotonic() < deadline:
            n = c.ring.write(os.urandom(8192))
            sent += n
            await asyncio.sleep(0.001 if n else 0.005)
        value = value_fn(c) & U64
        c.put(R.OFF_CONS_PEER, "Q", value)
        return {"poked_cons": value, "sent_before": sent}
    return poke


def _poke_state(bits: int, eof_delta: int | None = None):
    def poke(c: Conn, args: dict) -> None:
        if eof_delta is not None:
            c.put(R.OFF_EOF_POS, "Q", c.get(R.OFF_PROD, "Q") + eof_delta)
        c.put(R.OFF_STATE, "I", bits)
    return poke


def _poke_switch(seq: int = 1, pos=None, off=None, ext: int = 0, log2: int = LOG2):
    """A switch descriptor: fields first, then sw_seq (as an honest producer orders them)."""
    def poke(c: Conn, args: dict) -> dict:
        prod = c.get(R.OFF_PROD, "Q")
        p = prod if pos is None else pos(c)
        o = (c.t._block.off if off is None else off(c)) & U64
        c.put(R.OFF_SW_POS, "Q", p)
        c.put(R.OFF_SW_OFF, "Q", o)
        c.put(R.OFF_SW_EXT, "I", ext)
        c.put(R.OFF_SW_LOG2, "I", log2)
        c.put(R.OFF_SW_SEQ, "I", seq)
        return {"sw": [seq, p & U64, o, ext, log2]}
    return poke


def _ext0_len(c: Conn) -> int:
    return c.group.my_exts[0][0].size


# ---- the group's control area (extent 0)

def _set_nq_prod(c: Conn, value: int) -> None:
    put(c.mem, R.G_OFF_NQ_PROD, "Q", value)
    c.lg._g.nq_prod = value & U64            # keep our own C state in step (for later notifies)


def _victim_consumed_our_queue(c: Conn) -> int:
    return get(c.peer, R.G_OFF_NQ_CONS_PEER, "Q")


async def _poke_nq_backwards(c: Conn, args: dict) -> dict:
    c.kick()                                  # at least one entry, and the victim takes it
    now = get(c.mem, R.G_OFF_NQ_PROD, "Q")
    deadline = time.monotonic() + 2.0
    while _victim_consumed_our_queue(c) != now and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    put(c.mem, R.G_OFF_NQ_PROD, "Q", now - 1)
    c.doorbell()
    return {"nq_prod": [now, now - 1], "victim_took": _victim_consumed_our_queue(c)}


def _poke_nq_far(c: Conn, args: dict) -> dict:
    value = _victim_consumed_our_queue(c) + R.G_NQ_ENTRIES + 1
    put(c.mem, R.G_OFF_NQ_PROD, "Q", value)
    c.doorbell()
    return {"nq_prod": value}


def _poke_nq_entry(c: Conn, args: dict) -> dict:
    now = get(c.mem, R.G_OFF_NQ_PROD, "Q")
    bad = c.group.max_slots + args.get("over", 7)
    put(c.mem, R.G_OFF_NQ + 4 * (now & NQ_MASK), "I", bad)
    put(c.mem, R.G_OFF_NQ_PROD, "Q", now + 1)
    c.doorbell()
    return {"entry": bad}


async def _poke_nq_flood(c: Conn, args: dict) -> dict:
    """Fill our queue to the brim with valid entries, then overflow it again and again (a
    storm of doorbells): legal, if rude. The victim rescans its connections."""
    cons = _victim_consumed_our_queue(c)
    for i in range(R.G_NQ_ENTRIES):
        put(c.mem, R.G_OFF_NQ + 4 * ((cons + i) & NQ_MASK), "I", c.slot)
    _set_nq_prod(c, cons + R.G_NQ_ENTRIES)
    over = get(c.mem, R.G_OFF_NQ_OVERFLOW, "Q")
    deadline = time.monotonic() + args.get("seconds", 0.3)
    n = 0
    while time.monotonic() < deadline:
        for _ in range(200):
            over += 1
            put(c.mem, R.G_OFF_NQ_OVERFLOW, "Q", over)
            c.doorbell()
            n += 1
        await asyncio.sleep(0)
    c.lg._g.nq_overflow = over
    return {"overflows": n}


def _poke_gstate(c: Conn, args: dict) -> None:
    put(c.mem, R.G_OFF_GSTATE, "I", args.get("gstate", U32))
    c.doorbell()


async def _flip(c: Conn, args: dict, fn, seconds: float) -> dict:
    flipper = Flipper(fn, seconds)
    c.ctx.flippers.append(flipper)
    data = os.urandom(3000)
    echoes_ok = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await c.exchange(data) == data:
            echoes_ok += 1
    return {"flips": flipper.stop(), "echoes_ok": echoes_ok}


def _flip_wants(c: Conn, args: dict):
    def fn(rng):
        c.put(R.OFF_WANT_DATA, "I", rng.getrandbits(32))
        c.put(R.OFF_WANT_SPACE, "I", rng.getrandbits(32))
    return _flip(c, args, fn, args.get("seconds", 0.2))


def _flip_want_wake(c: Conn, args: dict):
    def fn(rng):
        put(c.mem, R.G_OFF_WANT_WAKE, "I", rng.getrandbits(32))
    return _flip(c, args, fn, args.get("seconds", 0.2))


async def _doorbell_storm(c: Conn, args: dict) -> dict:
    def fn(rng):
        ring_doorbell(c.group)
    flipper = Flipper(fn, args.get("seconds", 0.25))
    c.ctx.flippers.append(flipper)
    await asyncio.sleep(args.get("seconds", 0.25))
    return {"doorbells": flipper.stop()}


async def _random_everything(c: Conn, args: dict) -> dict:
    """A thread writes random values into every field of our slot header and of our control
    area (queue cursors, entries, listeners, claims) while the victim works."""
    fields = [(R.OFF_PROD, "Q"), (R.OFF_SW_SEQ, "I"), (R.OFF_SW_LOG2, "I"), (R.OFF_SW_POS, "Q"),
              (R.OFF_SW_OFF, "Q"), (R.OFF_SW_EXT, "I"), (R.OFF_CONS_PEER, "Q"), (R.OFF_STATE, "I"),
              (R.OFF_WANT_DATA, "I"), (R.OFF_WANT_SPACE, "I"), (R.OFF_EOF_POS, "Q"),
              (R.OFF_SETUP, "Q"), (R.OFF_RELEASED, "I")]
    ctrl = [(R.G_OFF_NQ_PROD, "Q"), (R.G_OFF_NQ_OVERFLOW, "Q"), (R.G_OFF_NQ_CONS_PEER, "Q"),
            (R.G_OFF_WANT_WAKE, "I"), (R.G_OFF_GSTATE, "I"), (R.G_OFF_LISTENERS, "I")]
    def fn(rng):
        off, fmt = rng.choice(fields)
        c.put(off, fmt, rng.choice([0, 1, rng.getrandbits(8 * struct.calcsize(fmt)), U64]))
        if rng.random() < 0.2:
            off, fmt = rng.choice(ctrl)
            put(c.mem, off, fmt, rng.getrandbits(8 * struct.calcsize(fmt)))
        if rng.random() < 0.1:
            put(c.mem, R.G_OFF_NQ + 4 * rng.randrange(R.G_NQ_ENTRIES), "I", rng.getrandbits(32))
        if rng.random() < 0.05:
            ring_doorbell(c.group)
    flipper = Flipper(fn, args.get("seconds", 0.3))
    c.ctx.flippers.append(flipper)
    data = os.urandom(2000)
    errors = []
    deadline = time.monotonic() + args.get("seconds", 0.3)
    while time.monotonic() < deadline:
        try:
            await c.exchange(data, 0.5)
        except Exception as exc:  # our own view of the victim: anything goes
            errors.append(type(exc).__name__)
            await asyncio.sleep(0.01)
    n = flipper.stop()
    c.kick()
    return {"port": c.port, "flips": n, "own_errors": sorted(set(errors)),
            "tcp": await c.tcp_outcome(1.0)}


async def _tcp_bytes_after_ism(c: Conn, args: dict) -> None:
    c.t._tcp.write(b"not allowed")


class _Deaf:
    """A TCP protocol that ignores everything (our library no longer hears of the connection)."""

    def connection_made(self, transport) -> None:
        pass

    def data_received(self, data) -> None:
        pass

    def eof_received(self):
        return True

    def connection_lost(self, exc) -> None:
        pass


async def _tcp_bytes_then_vanish(c: Conn, args: dict) -> dict:
    """A byte on TCP (the victim aborts the connection), and our library never reacts: it will
    not publish ABORT/CLOSED for this slot (as a peer SIGKILLed at that moment would not)."""
    c.t._tcp.set_protocol(_Deaf())
    c.t._tcp.write(b"!")
    return {}


async def _tcp_close_without_closed(c: Conn, args: dict) -> dict:
    data = os.urandom(1000)
    c.ring.write(data)
    c.kick()
    await asyncio.sleep(0.05)
    c.t._tcp.close()
    return {"published": len(data)}


async def _honest_close(c: Conn, args: dict) -> dict:
    c.ring.set_eof()
    c.ring.set_closed()
    c.kick()
    c.t._tcp.close()
    return {}


async def _just_wait(c: Conn, args: dict) -> dict:
    out = {"port": c.port, "tcp": await c.tcp_outcome(args.get("wait", 3.0))}
    return out


async def _after_tcp_close(c: Conn, args: dict) -> dict:
    return {"port": c.port}


async def _eof_then_prod(c: Conn, args: dict) -> dict:
    prod = c.get(R.OFF_PROD, "Q")
    c.put(R.OFF_EOF_POS, "Q", prod)
    c.put(R.OFF_STATE, "I", R.STATE_EOF)
    c.put(R.OFF_PROD, "Q", prod + 10)
    c.kick()
    return {}


CLIENT_CASES = {
    # cursors of our ring (the victim's rx)
    "prod_beyond_capacity": ring_case(_poke_prod(lambda c: _victim_cons(c) + _tx_cap(c) + 1)),
    "prod_backwards": ring_case(_poke_prod(lambda c: c.get(R.OFF_PROD, "Q") - 1)),
    "prod_max": ring_case(_poke_prod(lambda c: U64)),
    "prod_half_range": ring_case(_poke_prod(lambda c: c.get(R.OFF_PROD, "Q") + (1 << 63))),
    # our consumer cursor of the victim's ring (the victim's tx)
    "cons_beyond_prod": ring_case(_poke_cons(lambda c: c.peer_get(R.OFF_PROD, "Q") + (1 << 40))),
    # (a big warm-up: the victim's ring fills, so it has seen our cons_peer far above 0)
    "cons_backwards": ring_case(_poke_cons_when_full(lambda c: 0), warm=2 * RING),
    "cons_max": ring_case(_poke_cons(lambda c: U64)),
    # state and EOF
    "eof_pos_above_prod": ring_case(_poke_state(R.STATE_EOF, eof_delta=5)),
    "eof_pos_below_prod": ring_case(_poke_state(R.STATE_EOF, eof_delta=-5)),
    "prod_moves_after_eof": ring_case(_eof_then_prod, expect=lambda c, a: _noop(c)),
    "state_abort": ring_case(_poke_state(R.STATE_ABORT)),
    "state_closed_without_eof": ring_case(_poke_state(R.STATE_CLOSED)),
    "state_unknown_bits": ring_case(_poke_state(0xFFFFFFF8), expect=_expect_works),
    "wants_flipped_by_a_thread": ring_case(_flip_wants, expect=_expect_works),
    # ring switch descriptors
    "switch_seq_jump": ring_case(_poke_switch(seq=2)),
    "switch_seq_max": ring_case(_poke_switch(seq=U32)),
    "switch_pos_behind": ring_case(_poke_switch(pos=lambda c: c.get(R.OFF_PROD, "Q") - 1)),
    "switch_pos_ahead": ring_case(_poke_switch(pos=lambda c: _victim_cons(c) + _tx_cap(c) + 1)),
    "switch_log2_40": ring_case(_poke_switch(log2=40)),
    "switch_log2_11": ring_case(_poke_switch(log2=11)),
    "switch_unknown_extent": ring_case(_poke_switch(ext=9)),
    "switch_extent_32": ring_case(_poke_switch(ext=32)),
    "switch_misaligned": ring_case(_poke_switch(off=lambda c: c.t._block.off + 4096)),
    "switch_out_of_bounds": ring_case(_poke_switch(off=lambda c: _ext0_len(c) + (1 << LOG2))),
    "switch_offset_near_2_64": ring_case(_poke_switch(off=lambda c: U64 + 1 - (1 << LOG2))),
    # the group's control area
    "nq_prod_backwards": ring_case(_poke_nq_backwards, expect=_just_wait),
    "nq_prod_too_far": ring_case(_poke_nq_far, expect=_just_wait),
    "nq_entry_beyond_max_slots": ring_case(_poke_nq_entry, expect=_just_wait),
    "nq_flood_and_overflow": ring_case(_poke_nq_flood, expect=_expect_works),
    "gstate_garbage": ring_case(_poke_gstate, expect=_expect_works),
    "want_wake_flipped_by_a_thread": ring_case(_flip_want_wake, expect=_expect_works),
    "doorbell_storm": ring_case(_doorbell_storm, expect=_expect_works),
    "random_values_by_a_thread": ring_case(_random_everything, expect=lambda c, a: _noop(c)),
    # TCP, the liveness channel
    "tcp_bytes_after_ism": ring_case(_tcp_bytes_after_ism),
    "tcp_bytes_then_vanish": ring_case(_tcp_bytes_then_vanish, expect=lambda c, a: _noop(c)),
    "tcp_closed_without_closed": ring_case(_tcp_close_without_closed, expect=lambda c, a: _noop(c)),
    "honest_close": ring_case(_honest_close, expect=lambda c, a: _noop(c)),
}


async def _noop(c: Conn) -> dict:
    return {"port": c.port}


# ------------------------------------------------------------------ client side: set-up by hand

class Manual:
    """A claim made by hand in a link group the library opened with the victim's hub."""

    def __init__(self, ctx: Ctx, group, sock: socket.socket, port: int) -> None:
        self.ctx = ctx
        self.group = group
        self.lg = group.group
        self.sock = sock
        self.vport = port
        self.mem = group.my_exts[0][0].mem
        self.local = sock.getsockname()
        self.slot = -1
        self.gen = 0
        self.block, self.ext = group.alloc_block(RING)
        self.ring = None

    @classmethod
    async def open(cls, ctx: Ctx, port: int, group=None) -> Manual:
        hub = ctx.hub()
        acc = await discovery.find_acceptor(ctx.loop, hub, socket.AF_INET, HOST, port, None)
        ctx.socks.append(acc.sock)
        if acc.reason is not None:
            raise AssertionError(f"the victim's listener is not an smcish one: {acc.reason!r}")
        if group is None:
            group = acc.group or await hub.group_for(acc.advert)
        return cls(ctx, group, acc.sock, port)

    def record(self, slot: int | None = None, gen: int | None = None, reset: bool = True,
               **fields) -> R.Setup:
        """Take a slot and a ring block (unless given), publish a set-up record (any field
        overridden) and return it."""
        if slot is None:
            slot, gen0 = self.group.take_slot()
            gen = gen if gen is not None else gen0
        self.slot = slot
        self.gen = gen if gen is not None else 1
        self.group.gens[slot] = self.gen
        self.ctx.used.append((self.group, slot))
        if self.block is None:
            self.block, self.ext = self.group.alloc_block(RING)
        ino = os.fstat(self.sock.fileno()).st_ino
        values = {"gen": self.gen, "phase": clc.PHASE_CLAIMED, "reason": 0, "family": socket.AF_INET,
                      "ring0_off": self.block.off, "ring0_ext": self.block.ext, "ring0_log2": LOG2,
                      "sock_ino": ino, "cport": self.local[1], "sport": self.vport,
                      "caddr": addr_bytes(self.local[0]), "saddr": addr_bytes(HOST)}
        values.update(fields)
        for key in ("ring0_off", "sock_ino"):
            values[key] &= U64
        for key in ("gen", "phase", "reason", "family", "ring0_ext", "ring0_log2", "cport", "sport"):
            values[key] &= U32
        setup = R.Setup(**values)
        if reset:
            self.lg.reset_slot(slot)
        self.lg.publish_setup(slot, setup)
        return setup

    def claim(self, port: int | None = None, slot: int | None = None) -> bool:
        return self.lg.post_claim(self.local[1] if port is None else port,
                                  self.slot if slot is None else slot)

    async def connect(self) -> None:
        await asyncio.wait_for(self.ctx.loop.sock_connect(self.sock, (HOST, self.vport)), 5)

    async def decision(self, timeout: float = 3.0):
        """The victim's record for our gen once it moved (ACCEPTED/DECLINED), or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                snap = self.lg.read_peer_setup(self.slot)
            except ValueError:                     # the victim closed the group
                return None
            if snap.gen == self.gen and snap.phase != clc.PHASE_NONE:
                return snap
            await asyncio.sleep(0.0005)
        return None

    def final(self, phase: int, reason: int = 0) -> None:
        self.lg.set_phase(self.slot, self.gen, phase, reason)
        self.lg.notify(self.slot)

    def build_ring(self, snap) -> None:
        self.ring = hand_ring(self.group, self.slot, self.ext, self.block.off, self.block.size,
                              snap.ring0_ext, snap.ring0_off, snap.ring0_log2)
        self.ctx.rings.append(self.ring)

    async def tcp_echo(self, payload: bytes, timeout: float = 3.0) -> dict:
        """Send on TCP, read until as many bytes came back, EOF, a reset or the bound."""
        loop = self.ctx.loop
        out = {"sent": len(payload)}
        try:
            await asyncio.wait_for(loop.sock_sendall(self.sock, payload), timeout)
        except (TimeoutError, OSError) as exc:
            out["send_error"] = type(exc).__name__
        return dict(out, **await self.tcp_read(len(payload), timeout))

    async def tcp_read(self, n: int, timeout: float = 3.0) -> dict:
        loop = self.ctx.loop
        got = bytearray()
        deadline = time.monotonic() + timeout
        end = "timeout"
        while len(got) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), left)
            except TimeoutError:
                break
            except ConnectionResetError:
                end = "rst"
                break
            if not chunk:
                end = "eof"
                break
            got += chunk
        else:
            end = "complete"
        return {"tcp_got": bytes(got).hex()[:200], "tcp_n": len(got), "tcp_end": end,
                "tcp_elapsed": round(timeout - max(0.0, deadline - time.monotonic()), 3)}

    async def tcp_fate(self, timeout: float) -> str:
        """How our TCP connection ends within ``timeout``: "rst", "eof" or "open"."""
        res = await self.tcp_read(1, timeout)
        if res["tcp_end"] == "timeout":
            return "open"
        return res["tcp_end"] if res["tcp_n"] == 0 else "data"


def _snap(s) -> dict | None:
    if s is None:
        return None
    return {"gen": s.gen, "phase": s.phase, "reason": s.reason, "ring0": [s.ring0_ext, s.ring0_off,
                                                                         s.ring0_log2]}


def setup_case(record_fields=None, then="tcp_echo", claim_port=None, mutate=None):
    """A hand-made claim. ``record_fields(m)`` overrides record fields; ``then`` what we do once
    the victim decided (or did not)."""
    async def case(ctx: Ctx, port: int, args: dict) -> dict:
        m = await Manual.open(ctx, port)
        fields = record_fields(m) if record_fields else {}
        fields.update(args.get("fields", {}))
        m.record(**fields)
        m.claim(port=claim_port(m) if claim_port else None)
        if mutate is not None:
            mutate(m, args)
        await m.connect()
        out = {"port": m.local[1], "slot": m.slot}
        out.update(await THEN[then](m, args))
        return out
    return case


async def _then_tcp_echo(m: Manual, args: dict) -> dict:
    """Whatever the victim decided, we go TCP (FINAL_TCP if it accepted) and echo on TCP."""
    snap = await m.decision(args.get("decision_wait", 1.0))
    if snap is not None and snap.phase == clc.PHASE_ACCEPTED:
        m.final(clc.PHASE_FINAL_TCP, int(clc.DeclineReason.TIMEOUT))
    payload = os.urandom(args.get("size", 2000))
    res = await m.tcp_echo(payload)
    res["echo_ok"] = res["tcp_n"] == len(payload) and res["tcp_got"] == payload.hex()[:200]
    res["victim"] = _snap(snap)
    return res


async def _then_silent(m: Manual, args: dict) -> dict:
    snap = await m.decision(args.get("decision_wait", 1.0))
    t0 = time.monotonic()
    fate = await m.tcp_fate(args.get("wait", 4.0))
    return {"victim": _snap(snap), "tcp": fate, "after": round(time.monotonic() - t0, 3)}


async def _then_bytes_then_final_tcp(m: Manual, args: dict) -> dict:
    """TCP bytes while the victim waits for our final word, then FINAL_TCP: replayed."""
    snap = await m.decision(args.get("decision_wait", 1.0))
    payload = os.urandom(3000)
    await m.ctx.loop.sock_sendall(m.sock, payload)
    await asyncio.sleep(0.02)
    if snap is not None and snap.phase == clc.PHASE_ACCEPTED:
        m.final(clc.PHASE_FINAL_TCP, int(clc.DeclineReason.TIMEOUT))
    res = await m.tcp_read(len(payload))
    res["echo_ok"] = res["tcp_n"] == len(payload) and res["tcp_got"] == payload.hex()[:200]
    res["victim"] = _snap(snap)
    return res


async def _then_final_ism_and_tcp_bytes(m: Manual, args: dict) -> dict:
    snap = await m.decision(args.get("decision_wait", 1.0))
    if snap is None or snap.phase != clc.PHASE_ACCEPTED:
        return {"victim": _snap(snap), "tcp": "no accept"}
    m.build_ring(snap)
    m.final(clc.PHASE_FINAL_ISM)
    await asyncio.sleep(0.05)
    await m.ctx.loop.sock_sendall(m.sock, b"bytes on TCP after FINAL_ISM")
    return {"victim": _snap(snap), "tcp": await m.tcp_fate(3.0)}


async def _then_final_ism_echo(m: Manual, args: dict) -> dict:
    """An honest FINAL_ISM and an echo through the rings (the control case of hand-made set-ups)."""
    snap = await m.decision(args.get("decision_wait", 1.0))
    if snap is None or snap.phase != clc.PHASE_ACCEPTED:
        return {"victim": _snap(snap)}
    m.build_ring(snap)
    m.final(clc.PHASE_FINAL_ISM)
    data = os.urandom(4000)
    sent = 0
    got = bytearray()
    deadline = time.monotonic() + 3
    while len(got) < len(data) and time.monotonic() < deadline:
        if sent < len(data):
            sent += m.ring.write(data[sent:])
        n = m.ring.readable()
        if n:
            got += m.ring.read(n)
        else:
            await asyncio.sleep(0.0005)
    return {"victim": _snap(snap), "echo_ok": bytes(got) == data}


async def _then_gen_moves_on(m: Manual, args: dict) -> dict:
    """After ACCEPTED, our record names the next gen: the victim must treat it as us giving up."""
    snap = await m.decision(args.get("decision_wait", 1.0))
    payload = os.urandom(1500)
    await m.ctx.loop.sock_sendall(m.sock, payload)
    m.lg.set_phase(m.slot, m.gen + 1, clc.PHASE_CLAIMED)
    m.lg.notify(m.slot)
    res = await m.tcp_read(len(payload))
    res["echo_ok"] = res["tcp_n"] == len(payload) and res["tcp_got"] == payload.hex()[:200]
    res["victim"] = _snap(snap)
    return res


async def _then_flip_record(m: Manual, args: dict) -> dict:
    """A thread flips our whole set-up record (word, ring0, 4-tuple, inode) while the victim
    decides and waits for our final word; then we stop and watch how the connection ends."""
    h = hdr_off(m.slot)
    good = bytes(m.mem[h + R.OFF_SETUP:h + R.OFF_SETUP + 80])

    def fn(rng):
        choice = rng.random()
        if choice < 0.4:
            put(m.mem, h + R.OFF_SETUP, "Q", (rng.randrange(0, 4) << 32) | rng.randrange(0, 6))
        elif choice < 0.7:
            off = rng.randrange(0, 80, 4)
            put(m.mem, h + R.OFF_SETUP + off, "I", rng.getrandbits(32))
        else:
            m.mem[h + R.OFF_SETUP:h + R.OFF_SETUP + 80] = good
        if rng.random() < 0.05:
            try:
                m.lg.notify(m.slot)
            except Exception:  # the loop thread uses the group too: best effort
                pass
    flipper = Flipper(fn, args.get("seconds", 0.25))
    m.ctx.flippers.append(flipper)
    await asyncio.sleep(args.get("seconds", 0.25))
    n = flipper.stop()
    m.lg.notify(m.slot)
    payload = os.urandom(500)
    res = await m.tcp_echo(payload, args.get("wait", 3.0))
    res["flips"] = n
    return res


async def _then_opt_echo(m: Manual, args: dict) -> dict:
    """Our optimistic record came with bytes already in our block (0-RTT): the victim accepts,
    reads them from position 0 and echoes; we complete our ring and read the echo."""
    snap = await m.decision(args.get("decision_wait", 1.0))
    if snap is None or snap.phase != clc.PHASE_ACCEPTED:
        return {"victim": _snap(snap)}
    m.build_ring(snap)
    m.final(clc.PHASE_FINAL_ISM)
    want = args["_sent"]
    got = bytearray()
    deadline = time.monotonic() + 3
    while len(got) < len(want) and time.monotonic() < deadline:
        n = m.ring.readable()
        if n:
            got += m.ring.read(n)
        else:
            await asyncio.sleep(0.0005)
    return {"victim": _snap(snap), "echo_ok": bytes(got) == want}


THEN = {
    "opt_echo": _then_opt_echo,
    "tcp_echo": _then_tcp_echo, "silent": _then_silent,
    "bytes_then_final_tcp": _then_bytes_then_final_tcp,
    "final_ism_then_tcp_bytes": _then_final_ism_and_tcp_bytes,
    "final_ism_echo": _then_final_ism_echo, "gen_moves_on": _then_gen_moves_on,
    "flip_record": _then_flip_record,
}


async def _case_slot_in_use(ctx: Ctx, port: int, args: dict) -> dict:
    """Claim the slot our live ISM connection uses on the victim's side, for a new socket."""
    c = await Conn.open(ctx, port)
    await _warm(c)
    m = await Manual.open(ctx, port, group=c.group)
    m.record(slot=c.slot, gen=c.gen + 1, reset=False)   # (the live connection's cursors stay)
    m.claim()
    await m.connect()
    out = {"port": m.local[1], "live_port": c.port}
    out.update(await _then_tcp_echo(m, args))
    # the live connection is untouched (its slot header was reset by our record, its cursors
    # are ours to keep: the victim validated nothing new)
    return out


async def _case_claim_table_garbage(ctx: Ctx, port: int, args: dict) -> dict:
    """Every claim entry garbage (slots >= max_slots, slot 0 "+1" = 0, random ports), then one
    honest hand-made claim among them: the victim finds exactly ours."""
    m = await Manual.open(ctx, port)
    rng = random.Random(args.get("seed", 7))
    base = R.G_OFF_CLAIMS
    max_slots = m.group.max_slots
    for i in range(R.G_CLAIM_ENTRIES):
        kind = rng.random()
        if kind < 0.3:
            value = (m.local[1] << 32) | rng.randrange(max_slots + 1, 1 << 32)   # our port, bad slot
        elif kind < 0.4:
            value = m.local[1] << 32                                               # slot+1 == 0
        else:
            value = rng.getrandbits(64)
        put(m.mem, base + 8 * i, "Q", value)
    m.record()
    # our honest entry: overwrite one entry of our port's probe window
    home = ((m.local[1] * 2654435761) & U32) >> 19 & (R.G_CLAIM_ENTRIES - 1)
    put(m.mem, base + 8 * ((home + 17) % R.G_CLAIM_ENTRIES), "Q", (m.local[1] << 32) | (m.slot + 1))
    await m.connect()
    out = {"port": m.local[1]}
    out.update(await _then_final_ism_echo(m, args))
    return out


async def _case_nq_cons_garbage_at_setup(ctx: Ctx, port: int, args: dict) -> dict:
    """Before the victim's first notification in a fresh group, our consumption of its queue
    (nq_cons_peer, which it validates when its queue looks full) is garbage and we stop taking
    from its queue. Then a valid claim: the victim's ACCEPTED notification fails validation."""
    hub = ctx.hub()
    acc = await discovery.find_acceptor(ctx.loop, hub, socket.AF_INET, HOST, port, None)
    ctx.socks.append(acc.sock)
    group = acc.group or await hub.group_for(acc.advert)
    group._dispatch = lambda: False             # never take (nor publish our consumption) again
    put(group.my_exts[0][0].mem, R.G_OFF_NQ_CONS_PEER, "Q", args.get("value", 1 << 62))
    m = Manual(ctx, group, acc.sock, port)
    m.record()
    m.claim()
    await m.connect()
    t0 = time.monotonic()
    snap = await m.decision(1.0)
    fate = await m.tcp_fate(args.get("wait", 4.0))
    return {"port": m.local[1], "victim": _snap(snap), "tcp": fate,
            "after": round(time.monotonic() - t0, 3)}


async def _case_extent_add_garbage(ctx: Ctx, port: int, args: dict) -> dict:
    """Peer ops with garbage: extent_add with a random token, with a token of ours but a lying
    size, for index 0, twice for one index; extent_remove of extent 0 and of unknown ones. Each is
    refused (or harmless) and the connection keeps working."""
    c = await Conn.open(ctx, port)
    await _warm(c)
    dev = ctx.device
    g = c.group
    answers = {}

    def ask(name, op, **fields):
        try:
            answers[name] = ("ok", str(dev.peer_request(g.peer_endpoint, op, group_id=g.id,
                                                        side=g.peer_side, **fields))[:120])
        except Exception as exc:
            answers[name] = (type(exc).__name__, str(exc)[:160])

    region = dev.alloc(1 << 16)
    try:
        loop = ctx.loop
        await loop.run_in_executor(None, lambda: ask("random_token", "extent_add", index=5,
                                                     token=os.urandom(16), size=1 << 16))
        await loop.run_in_executor(None, lambda: ask("size_lie", "extent_add", index=6,
                                                     token=region.token, size=1 << 30))
        await loop.run_in_executor(None, lambda: ask("index_0", "extent_add", index=0,
                                                     token=os.urandom(16), size=1 << 16))
        await loop.run_in_executor(None, lambda: ask("remove_0", "extent_remove", index=0))
        await loop.run_in_executor(None, lambda: ask("remove_unknown", "extent_remove", index=7))
    finally:
        dev.free(region)
    data = os.urandom(4000)
    echo = await c.exchange(data)
    return {"port": c.port, "answers": answers, "echo_ok": echo == data}


def opt_case(prod_fn=None, then="opt_echo", size: int = 3000):
    """An OPTIMISTIC hand-made claim, as the library makes them, with ``size`` bytes already in
    our block (and our prod, or ``prod_fn(m, size)``) before we connect."""
    async def case(ctx: Ctx, port: int, args: dict) -> dict:
        m = await Manual.open(ctx, port)
        data = os.urandom(size)
        m.record(phase=OPTIMISTIC)
        mem = m.group.my_exts[m.block.ext][0].mem
        mem[m.block.off:m.block.off + size] = data
        h = hdr_off(m.slot)
        put(m.mem, h + R.OFF_PROD, "Q", size if prod_fn is None else prod_fn(m, size))
        m.claim()
        await m.connect()
        out = {"port": m.local[1], "slot": m.slot}
        out.update(await THEN[then](m, dict(args, _sent=data)))
        return out
    return case


if OPTIMISTIC is not None:
    CLIENT_CASES.update({
        "opt_claim_echo": opt_case(),
        "opt_claim_prod_beyond_block": opt_case(lambda m, n: m.block.size + 1, then="silent"),
        "opt_claim_prod_max": opt_case(lambda m, n: U64, then="silent"),
        "opt_claim_then_silent": opt_case(size=0, then="silent"),
    })

CLIENT_CASES.update({
    "claim_silent": setup_case(then="silent"),
    "claim_bytes_then_final_tcp": setup_case(then="bytes_then_final_tcp"),
    "claim_final_ism_echo": setup_case(then="final_ism_echo"),
    "claim_final_ism_then_tcp_bytes": setup_case(then="final_ism_then_tcp_bytes"),
    "claim_ring0_log2_40": setup_case(lambda m: {"ring0_log2": 40}),
    "claim_ring0_log2_11": setup_case(lambda m: {"ring0_log2": 11}),
    "claim_ring0_unknown_extent": setup_case(lambda m: {"ring0_ext": 9}),
    "claim_ring0_misaligned": setup_case(lambda m: {"ring0_off": m.block.off + 4096}),
    "claim_ring0_out_of_bounds": setup_case(
        lambda m: {"ring0_off": m.group.my_exts[0][0].size + (1 << LOG2)}),
    "claim_ring0_offset_near_2_64": setup_case(lambda m: {"ring0_off": U64 + 1 - (1 << LOG2)}),
    "claim_wrong_inode": setup_case(lambda m: {"sock_ino": os.fstat(m.sock.fileno()).st_ino + 1}),
    "claim_inode_zero": setup_case(lambda m: {"sock_ino": 0}),
    "claim_wrong_cport_in_record": setup_case(lambda m: {"cport": m.local[1] ^ 1}),
    "claim_wrong_saddr_in_record": setup_case(lambda m: {"saddr": addr_bytes("127.0.0.2")}),
    "claim_record_not_claimed": setup_case(lambda m: {"phase": clc.PHASE_FINAL_ISM}),
    "claim_record_gen_zero": setup_case(lambda m: {"gen": 0}, then="final_ism_echo"),
    "claim_record_gen_max": setup_case(lambda m: {"gen": U32}, then="final_ism_echo"),
    "claim_gen_moves_on": setup_case(then="gen_moves_on"),
    "claim_record_flipped_by_a_thread": setup_case(then="flip_record"),
    "claim_slot_in_use": _case_slot_in_use,
    "claim_table_garbage": _case_claim_table_garbage,
    "nq_cons_peer_garbage_at_setup": _case_nq_cons_garbage_at_setup,
    "extent_ops_garbage": _case_extent_add_garbage,
})


# ------------------------------------------------------------------ server side

class TcpRecorder:
    """The hostile server's application: every byte the victim sends on TCP, echoed back."""

    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.transport = None
        self.data = bytearray()
        self.info = None
        self.eof = False
        self.lost = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.info = transport.get_extra_info("smcish")
        self.ctx.tcp[transport.get_extra_info("peername")[1]] = self
        banner = self.ctx.banner
        if banner:
            transport.write(banner)

    def data_received(self, data: bytes) -> None:
        self.data += data
        if self.ctx.echo_tcp:
            self.transport.write(data)

    def eof_received(self):
        self.eof = True
        return False

    def connection_lost(self, exc) -> None:
        self.lost = exc_info(exc) or "clean"

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass


async def listen(ctx: Ctx, args: dict) -> dict:
    await ctx.reset()
    ctx.echo_tcp = True
    ctx.banner = b""
    server = await smcish.create_server(lambda: TcpRecorder(ctx), HOST, 0, ring_size=RING,
                                        handshake_timeout=2.0)
    hub = ctx.hub()
    if not args.get("honest"):
        hub.find_claim = lambda peer, local: None       # every accepted connection: plain TCP
    ctx.server, ctx.server_hub = server, hub
    sock = server.sockets[0]
    return {"port": sock.getsockname()[1], "inode": os.fstat(sock.fileno()).st_ino}


def _claims_in(group) -> list[tuple[int, int]]:
    """(port, slot) of every entry of the victim's claim table (its extent 0, read-only)."""
    peer = group.peer_exts[0][0].mem
    table = array.array("Q", bytes(peer[R.G_OFF_CLAIMS:R.G_OFF_CLAIMS + 8 * R.G_CLAIM_ENTRIES]))
    out = []
    for entry in table:
        if entry:
            slot = (entry & U32) - 1
            if 0 <= slot < group.max_slots:
                out.append((entry >> 32, slot))
    return out


async def next_claim(ctx: Ctx, timeout: float, sport: int | None = None):
    """The victim's next claim (group, slot, snapshot) in any server group of our hub."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        hub = ctx.server_hub
        for group in list(hub.server_groups.values()) if hub is not None else []:
            if group.dying:
                continue
            for port, slot in _claims_in(group):
                snap = group.group.read_peer_setup(slot)
                key = (group.id, slot, snap.gen)
                if (key in ctx.answered or snap.phase not in CLAIM_PHASES
                        or snap.cport != port):
                    continue
                if sport is not None and snap.sport != sport:
                    continue
                ctx.answered.add(key)
                return group, slot, snap
        await asyncio.sleep(0.001)
    return None


class Answer:
    """Our side (server) of one victim claim."""

    def __init__(self, ctx: Ctx, group, slot: int, snap) -> None:
        self.ctx, self.group, self.lg, self.slot, self.snap = ctx, group, group.group, slot, snap
        ctx.used.append((group, slot))
        self.mem = group.my_exts[0][0].mem
        self.h = hdr_off(slot)
        self.block = self.ext = None
        self.ring = None

    def accept(self, build: bool = True, fields_fn=None, **fields) -> None:
        self.block, self.ext = self.group.alloc_block(RING)
        if fields_fn is not None:
            fields.update(fields_fn(self))
        self.lg.reset_slot(self.slot)
        if build:
            self.ring = hand_ring(self.group, self.slot, self.ext, self.block.off,
                                  self.block.size, self.snap.ring0_ext, self.snap.ring0_off,
                                  self.snap.ring0_log2)
            self.ctx.rings.append(self.ring)
        values = {"gen": self.snap.gen, "phase": clc.PHASE_ACCEPTED, "reason": 0,
                      "family": self.snap.family, "ring0_off": self.block.off, "ring0_ext": self.block.ext,
                      "ring0_log2": LOG2, "sock_ino": 0, "cport": self.snap.cport, "sport": self.snap.sport,
                      "caddr": self.snap.caddr, "saddr": self.snap.saddr}
        values.update(fields)
        values["ring0_off"] &= U64
        for key in ("gen", "phase", "reason", "ring0_ext", "ring0_log2"):
            values[key] &= U32
        self.lg.publish_setup(self.slot, R.Setup(**values))
        self.kick()

    def decline(self, reason: int, gen: int | None = None) -> None:
        self.lg.set_phase(self.slot, self.snap.gen if gen is None else gen, clc.PHASE_DECLINED,
                          reason)
        self.kick()

    def kick(self) -> None:
        try:
            self.lg.notify(self.slot)
        except Exception:
            pass
        ring_doorbell(self.group)

    async def final(self, timeout: float = 3.0) -> int | None:
        """The client's final word for its gen (FINAL_ISM / FINAL_TCP), else the last phase it
        showed for that gen when ``timeout`` ran out (an optimistic claim left standing after
        our ACCEPTED means ISM), None if its record moved to another gen."""
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            try:
                s = self.lg.read_peer_setup(self.slot)
            except ValueError:                     # the victim closed the group
                return last
            if s.gen == self.snap.gen:
                last = s.phase
                if s.phase in (clc.PHASE_FINAL_ISM, clc.PHASE_FINAL_TCP):
                    return s.phase
            await asyncio.sleep(0.0005)
        return last

    async def ring_echo(self, seconds: float) -> int:
        """Echo through the rings for up to ``seconds`` (what an honest server application
        would do), until the victim closes or aborts its side."""
        return await ring_echo(self.ring, seconds)


async def ring_echo(ring, seconds: float) -> int:
    n = 0
    deadline = time.monotonic() + seconds
    pending = b""
    while time.monotonic() < deadline:
        try:
            avail = ring.readable()
            if avail:
                pending += ring.read(avail)
            if pending:
                k = ring.write(pending)
                pending = pending[k:]
                n += k
                continue
            if ring.status() & (R.ST_EOF | R.ST_CLOSED | R.ST_ABORT):
                break
        except (R.RingCorrupted, ValueError):
            break
        await asyncio.sleep(0.0005)
    return n


async def server_case(ctx: Ctx, name: str, args: dict) -> dict:
    ctx.echo_tcp = args.get("echo_tcp", True)
    ctx.banner = bytes.fromhex(args.get("banner", ""))
    fn = SERVER_CASES[name]
    found = await next_claim(ctx, args.get("claim_wait", 8.0), args.get("sport"))
    if found is None:
        return {"claim": None}
    a = Answer(ctx, *found)
    out = {"claim": {"slot": a.slot, "gen": a.snap.gen, "cport": a.snap.cport,
                     "sport": a.snap.sport}}
    out.update(await fn(a, args) or {})
    # what the victim sent us on TCP for that connection (it must be only its application's)
    await asyncio.sleep(args.get("linger", 0.1))
    rec = ctx.tcp.get(a.snap.cport)
    out["tcp_received"] = bytes(rec.data).hex() if rec is not None else None
    out["tcp_accepted"] = rec is not None
    return out


async def _srv_silent(a: Answer, args: dict) -> dict:
    return {"final": await a.final(args.get("wait", 1.5))}


async def _srv_decline(a: Answer, args: dict) -> dict:
    a.decline(args.get("reason", 0x7777), gen=a.snap.gen + args.get("gen_delta", 0))
    return {"final": await a.final(args.get("wait", 1.5))}


def _srv_accept_fields(fields_fn):
    async def case(a: Answer, args: dict) -> dict:
        a.accept(build=False, fields_fn=fields_fn)
        final = await a.final(args.get("wait", 1.0))
        return {"final": final}
    return case


async def _srv_accept_echo(a: Answer, args: dict) -> dict:
    a.accept()
    final = await a.final(0.3)
    ism = final in (clc.PHASE_FINAL_ISM, OPTIMISTIC)
    n = await a.ring_echo(args.get("seconds", 1.0)) if ism else 0
    return {"final": final, "echoed": n}


async def _srv_accept_then_tcp_bytes(a: Answer, args: dict) -> dict:
    """Accept honestly, then write on TCP (and never answer through the ring): the victim must
    reset the connection rather than wait or hand the bytes to its application."""
    a.accept()
    final = await a.final(0.3)
    deadline = time.monotonic() + 3.0          # (the claim may come before our accept())
    while a.ctx.tcp.get(a.snap.cport) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    rec = a.ctx.tcp.get(a.snap.cport)
    if rec is not None and rec.transport is not None:
        rec.transport.write(b"bytes on TCP from the server after FINAL_ISM")
    return {"final": final, "wrote": rec is not None}


def _srv_then_poke(poke):
    async def case(a: Answer, args: dict) -> dict:
        a.accept()
        final = await a.final(0.3)
        if final not in (clc.PHASE_FINAL_ISM, OPTIMISTIC):
            return {"final": final}
        # let the victim's application write its payload; then poke our slot header
        await asyncio.sleep(args.get("before", 0.05))
        h = a.h
        poke(a, h)
        a.kick()
        await asyncio.sleep(args.get("after", 0.05))
        return {"final": final}
    return case


async def _srv_flip(a: Answer, args: dict) -> dict:
    """Accept, then flip our set-up word (gen, phase) and reason/family in a thread while the
    victim decides. (The ring block stays valid: an unusable block in ACCEPTED is a known bug,
    see test_optimistic_client_fails_on_an_unusable_accepted_block.)"""
    a.accept(build=False)
    h = a.h
    good = bytes(a.mem[h + R.OFF_SETUP:h + R.OFF_SETUP + 16])

    def fn(rng):
        r = rng.random()
        if r < 0.4:
            put(a.mem, h + R.OFF_SETUP, "Q", ((a.snap.gen + rng.randrange(-1, 2)) & U32) << 32
                | rng.randrange(0, 4))
        elif r < 0.7:
            put(a.mem, h + R.OFF_SETUP + rng.choice((8, 12)), "I", rng.getrandbits(32))
        else:
            a.mem[h + R.OFF_SETUP:h + R.OFF_SETUP + 16] = good
        if rng.random() < 0.05:
            ring_doorbell(a.group)
    flipper = Flipper(fn, args.get("seconds", 0.3))
    a.ctx.flippers.append(flipper)
    await asyncio.sleep(args.get("seconds", 0.3))
    return {"flips": flipper.stop(), "final": await a.final(0.2)}


async def _srv_nq_cons_garbage(a: Answer, args: dict) -> dict:
    """Our consumption of the victim's queue is garbage (and we stop taking from it) before its
    first notification in this group; then an honest ACCEPTED."""
    a.group._dispatch = lambda: False
    put(a.mem, R.G_OFF_NQ_CONS_PEER, "Q", args.get("value", 1 << 62))
    then = args.get("then", "accept")
    if then == "accept":
        a.accept()
    elif then == "decline":
        a.decline(int(clc.DeclineReason.NO_MEMORY))
    # "silent": nothing (the victim's own timer makes it speak)
    final = await a.final(args.get("wait", 1.5))
    ism = then == "accept" and final in (clc.PHASE_FINAL_ISM, OPTIMISTIC)
    n = await a.ring_echo(0.5) if ism else 0
    return {"final": final, "echoed": n}


async def _srv_listener_garbage(a: Answer, args: dict) -> dict:
    """Garbage listener table (count beyond the 63 entries, random inodes), then decline."""
    put(a.mem, R.G_OFF_LISTENERS, "I", args.get("count", U32))
    rng = random.Random(3)
    for i in range(R.G_MAX_LISTENERS):
        put(a.mem, R.G_OFF_LISTENERS + 8 + 8 * i, "Q", rng.getrandbits(64))
    a.decline(int(clc.DeclineReason.NO_MEMORY))
    return {"final": await a.final(1.5)}


async def _srv_released_garbage(a: Answer, args: dict) -> dict:
    """Every slot of ours says it released the 2^32-1th connection (the victim may reuse slots
    at once); then an honest accept + echo."""
    for slot in range(min(a.group.max_slots, 256)):
        put(a.mem, hdr_off(slot) + R.OFF_RELEASED, "I", U32)
    return await _srv_accept_echo(a, args)


SERVER_CASES = {
    "srv_silent": _srv_silent,
    "srv_decline_unknown_reason": _srv_decline,
    "srv_decline_other_gen": lambda a, args: _srv_decline(a, dict(args, gen_delta=1)),
    "srv_accept_echo": _srv_accept_echo,
    "srv_accept_ring0_log2_40": _srv_accept_fields(lambda a: {"ring0_log2": 40}),
    "srv_accept_ring0_unknown_extent": _srv_accept_fields(lambda a: {"ring0_ext": 9}),
    "srv_accept_ring0_misaligned": _srv_accept_fields(lambda a: {"ring0_off": a.block.off + 4096}),
    "srv_accept_ring0_offset_near_2_64": _srv_accept_fields(lambda a: {"ring0_off": U64 + 1 - (1 << LOG2)}),
    "srv_accept_ring0_out_of_bounds": _srv_accept_fields(
        lambda a: {"ring0_off": a.group.my_exts[0][0].size + (1 << LOG2)}),
    "srv_accept_other_gen": _srv_accept_fields(lambda a: {"gen": a.snap.gen + 1}),
    "srv_accept_then_tcp_bytes": _srv_accept_then_tcp_bytes,
    "srv_prod_beyond_capacity": _srv_then_poke(
        lambda a, h: put(a.mem, h + R.OFF_PROD, "Q", get(a.mem, h + R.OFF_PROD, "Q") + (1 << 20))),
    "srv_cons_beyond_prod": _srv_then_poke(
        lambda a, h: put(a.mem, h + R.OFF_CONS_PEER, "Q", U64 - 5)),
    "srv_state_abort": _srv_then_poke(lambda a, h: put(a.mem, h + R.OFF_STATE, "I", R.STATE_ABORT)),
    "srv_switch_garbage": _srv_then_poke(
        lambda a, h: (put(a.mem, h + R.OFF_SW_LOG2, "I", 40), put(a.mem, h + R.OFF_SW_SEQ, "I", 1))),
    "srv_record_flipped_by_a_thread": _srv_flip,
    "srv_nq_cons_peer_garbage_then_accept": _srv_nq_cons_garbage,
    "srv_nq_cons_peer_garbage_then_silent": lambda a, args: _srv_nq_cons_garbage(
        a, dict(args, then="silent")),
    "srv_nq_cons_peer_garbage_then_decline": lambda a, args: _srv_nq_cons_garbage(
        a, dict(args, then="decline")),
    "srv_listener_table_garbage": _srv_listener_garbage,
    "srv_released_garbage": _srv_released_garbage,
}


def publish_listeners(ctx: Ctx, inodes: list) -> dict:
    """Our listeners plus ``inodes`` (listeners we do not hold) in every server group's table."""
    hub = ctx.server_hub
    table = sorted(hub.listeners) + [int(i) for i in inodes]
    for group in hub.server_groups.values():
        group.group.set_listeners(table)
    return {"groups": len(hub.server_groups), "table": table}


async def hijack(ctx: Ctx, args: dict) -> dict:
    """Listener-table capture: publish the inode of a listener we do not hold in every server
    group's listener table (the victim's client reads it as "this hub serves that listener"),
    then answer the victim's claim for it (its TCP connection goes to that other listener) and
    echo what it writes into the ring, prefixed."""
    if args.get("inodes"):
        publish_listeners(ctx, args["inodes"])
    found = await next_claim(ctx, args.get("claim_wait", 5.0), args.get("sport"))
    if found is None:
        return {"captured": False}
    a = Answer(ctx, *found)
    a.accept()
    final = await a.final(2.0)
    stolen = b""
    if final == clc.PHASE_FINAL_ISM:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and len(stolen) < args.get("expect", 1):
            n = a.ring.readable()
            if n:
                stolen += a.ring.read(n)
            else:
                await asyncio.sleep(0.001)
        a.ring.write(b"FORGED:" + stolen)
        await asyncio.sleep(0.3)
    return {"captured": final == clc.PHASE_FINAL_ISM, "final": final,
            "stolen": stolen.hex(), "claim": {"cport": a.snap.cport, "sport": a.snap.sport}}


async def forge_claims(ctx: Ctx, port: int, args: dict) -> dict:
    """Post claims in our group with the victim (server at ``port``) for other sockets' 4-tuples:
    ``targets`` = [{cport, sport, caddr, saddr, ino}], each a record naming that socket (inode
    as given) and a claim for its port. With ``answer`` we give FINAL_ISM to any ACCEPTED."""
    if args.get("fresh", True) or not getattr(ctx, "forge_group", None):
        await Conn.open(ctx, port)                 # a group with the victim's hub, legitimately
        ctx.forge_group = ctx.writers[-1].transport._group
    group = ctx.forge_group
    lg = group.group
    posted = []
    block, ext = group.alloc_block(RING)          # one block named by every forged record
    for t in args["targets"]:
        slot, gen = group.take_slot()
        group.gens[slot] = gen
        lg.reset_slot(slot)
        lg.publish_setup(slot, R.Setup(
            gen=gen, phase=clc.PHASE_CLAIMED, family=socket.AF_INET, ring0_off=block.off,
            ring0_ext=block.ext, ring0_log2=LOG2, sock_ino=int(t.get("ino", 0)) & U64,
            cport=t["cport"], sport=t.get("sport", port), caddr=addr_bytes(t.get("caddr", HOST)),
            saddr=addr_bytes(t.get("saddr", HOST))))
        ok = lg.post_claim(t["cport"], slot)
        posted.append({"slot": slot, "gen": gen, "posted": ok, "block": [block.ext, block.off]})
        if args.get("answer"):
            ctx.loop.create_task(_forge_answer(ctx, group, slot, gen, block, ext))
    return {"posted": posted}


async def _forge_answer(ctx: Ctx, group, slot: int, gen: int, block, ext) -> None:
    deadline = time.monotonic() + 10
    lg = group.group
    while time.monotonic() < deadline and not lg.closed:
        s = lg.read_peer_setup(slot)
        if s.gen == gen and s.phase == clc.PHASE_ACCEPTED:
            ring = hand_ring(group, slot, ext, block.off, block.size, s.ring0_ext, s.ring0_off,
                             s.ring0_log2)
            ctx.rings.append(ring)
            lg.set_phase(slot, gen, clc.PHASE_FINAL_ISM)
            lg.notify(slot)
            ctx.stolen = getattr(ctx, "stolen", {})
            t_end = time.monotonic() + 2
            got = b""
            while time.monotonic() < t_end:
                try:
                    n = ring.readable()
                    if n:
                        got += ring.read(n)
                except (R.RingCorrupted, ValueError):
                    break
                await asyncio.sleep(0.002)
            ctx.stolen[slot] = got
            return
        if s.gen == gen and s.phase == clc.PHASE_DECLINED:
            return
        await asyncio.sleep(0.0005)


async def fuzz_claim(ctx: Ctx, port: int, args: dict) -> dict:
    """One hypothesis-generated hand-made set-up (test_fuzz_setup_live.py): any record, claim
    entries, then an action; returns what the victim answered and how TCP ended."""
    group = getattr(ctx, "fuzz_group", None)
    if group is not None and (group.dying or group.destroyed):
        group = None
    m = await Manual.open(ctx, port, group=group)
    ctx.fuzz_group = m.group
    rec = args["record"]
    real_ino = os.fstat(m.sock.fileno()).st_ino
    fields = {}
    for key, value in rec.items():
        if key in ("caddr", "saddr"):
            fields[key] = bytes.fromhex(value)
        elif key == "sock_ino":
            fields[key] = {"real": real_ino, "zero": 0}.get(value, value) if isinstance(value, str) \
                else value
        elif key == "cport" and value == "real":
            fields[key] = m.local[1]
        elif key == "ring0_off" and value == "real":
            pass
        else:
            fields[key] = value
    slot = args.get("slot")
    if slot is not None and not 0 <= slot < m.group.max_slots:
        slot = None
    if slot is not None and slot in m.group.conns:
        slot = None
    m.record(slot=slot, gen=fields.pop("gen", None), **fields)
    for entry in args.get("claims", []):
        if entry == "real":
            m.claim()
        else:
            put(m.mem, R.G_OFF_CLAIMS + 8 * (entry[0] % R.G_CLAIM_ENTRIES), "Q", entry[1])
    if args.get("notify"):
        m.lg.notify(m.slot)
    await m.connect()
    action = args.get("action", "silent")
    snap = await m.decision(args.get("decision_wait", 0.3))
    out = {"port": m.local[1], "slot": m.slot, "victim": _snap(snap), "action": action}
    try:
        if action == "final_ism" and snap is not None and snap.phase == clc.PHASE_ACCEPTED:
            try:
                m.build_ring(snap)
                m.final(clc.PHASE_FINAL_ISM)
            except (R.RingCorrupted, ValueError) as exc:
                out["build"] = type(exc).__name__
        elif action == "final_tcp":
            m.final(clc.PHASE_FINAL_TCP, args.get("reason", 0))
        elif action == "flip_gen":
            m.lg.set_phase(m.slot, (m.gen + 1) & U32, clc.PHASE_CLAIMED)
            m.lg.notify(m.slot)
        elif action == "rst":
            m.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            m.sock.close()
            return out
        elif action == "close":
            m.sock.close()
            return out
        if args.get("tcp_bytes"):
            try:
                await m.ctx.loop.sock_sendall(m.sock, bytes.fromhex(args["tcp_bytes"]))
            except OSError as exc:
                out["send"] = type(exc).__name__
        res = await m.tcp_read(1, args.get("tcp_wait", 0.05))
        out["tcp"] = res["tcp_end"]
    finally:
        m.sock.close()
    return out


# ------------------------------------------------------------------ main loop

def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def handle(ctx: Ctx, cmd: dict) -> dict:
    op = cmd["cmd"]
    args = cmd.get("args", {})
    if op == "client":
        ctx.timing = {}
        t0 = time.monotonic()
        if cmd.get("reset", True):
            await ctx.reset()
        ctx.timing["reset"] = round(time.monotonic() - t0, 3)
        out = await asyncio.wait_for(CLIENT_CASES[cmd["case"]](ctx, cmd["port"], args),
                                     cmd.get("timeout", 20))
        out["timing"] = ctx.timing
        return out
    if op == "listen":
        return await listen(ctx, cmd)
    if op == "server":
        return await asyncio.wait_for(server_case(ctx, cmd["case"], args), cmd.get("timeout", 20))
    if op == "listeners":
        return publish_listeners(ctx, args["inodes"])
    if op == "hijack":
        return await asyncio.wait_for(hijack(ctx, args), cmd.get("timeout", 20))
    if op == "forge":
        if cmd.get("reset", True):
            await ctx.reset()
        return await asyncio.wait_for(forge_claims(ctx, cmd["port"], args), cmd.get("timeout", 20))
    if op == "tcp_log":
        return {str(port): bytes(rec.data).hex() for port, rec in ctx.tcp.items()}
    if op == "stolen":
        return {"stolen": {str(k): v.hex() for k, v in getattr(ctx, "stolen", {}).items()}}
    if op == "fuzz":
        return await asyncio.wait_for(fuzz_claim(ctx, cmd["port"], args), cmd.get("timeout", 20))
    if op == "reset":
        ctx.fuzz_group = None
        ctx.forge_group = None
        return await ctx.reset()
    if op == "whoami":
        return {"uid": os.getuid(), "pid": os.getpid(), "device": ctx.device.kind}
    if op == "try_steal_listener":
        return _try_steal(args)
    if op == "find_listener":
        advert = await ctx.loop.run_in_executor(None, ctx.device.find_listener, args["inode"])
        return {"advert": None if advert is None else {"pid": advert.pid, "uid": advert.uid,
                                                        "endpoint": advert.endpoint_id.hex()}}
    raise ValueError(f"unknown command {op!r}")


def _try_steal(args: dict) -> dict:
    """Another uid trying to get hold of a listener it does not own (to advertise it)."""
    out = {}
    pid, fd = args["pid"], args["fd"]
    try:
        os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)
        out["proc_open"] = "OPENED"
    except OSError as exc:
        out["proc_open"] = exc.strerror
    try:
        pidfd = os.pidfd_open(pid)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            got = libc.syscall(438, pidfd, fd, 0)          # pidfd_getfd
            out["pidfd_getfd"] = "GOT" if got >= 0 else os.strerror(ctypes.get_errno())
        finally:
            os.close(pidfd)
    except OSError as exc:
        out["pidfd_getfd"] = exc.strerror
    return out


async def main() -> None:
    ctx = Ctx()
    loop = ctx.loop
    errors: list = []
    loop.set_exception_handler(lambda lp, c: errors.append(c.get("message")))
    reply({"ready": True, "pid": os.getpid(), "uid": os.getuid()})
    buf = bytearray()
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    done = loop.create_future()
    tasks = set()

    async def run(cmd: dict) -> None:
        try:
            result = await handle(ctx, cmd)
            reply({"id": cmd.get("id"), "ok": True, "result": result})
        except BaseException as exc:  # reported to the driver
            reply({"id": cmd.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500],
                   "trace": traceback.format_exc()[-2000:]})

    def ready() -> None:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return
        if not chunk:
            loop.remove_reader(fd)
            if not done.done():
                done.set_result(None)
            return
        buf.extend(chunk)
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf[:] = rest
            if not line.strip():
                continue
            cmd = json.loads(line)
            if cmd.get("cmd") == "exit":
                if not done.done():
                    done.set_result(None)
                return
            task = loop.create_task(run(cmd))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    loop.add_reader(fd, ready)
    await done
    await ctx.reset()


def _drop_privileges() -> None:
    for arg in sys.argv[1:]:
        if arg.startswith("--setuid="):
            uid = int(arg.split("=", 1)[1])
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)


if __name__ == "__main__":
    _drop_privileges()
    asyncio.run(main())
