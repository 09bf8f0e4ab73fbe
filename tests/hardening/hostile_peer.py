"""A hostile smcish peer: speaks our protocol well enough to get in, then misbehaves.

Runs as its own process (its own embedded device endpoint, or an ismd client when SMCISH_DEVICE
says so) and is driven over stdin/stdout with JSON lines::

    {"cmd": "client", "scenario": NAME, "port": P, "args": {...}}   # connect to an smcish server
    {"cmd": "server", "scenario": NAME, "args": {...}}              # listen for an smcish client
    {"cmd": "exit"}

It answers with event lines ``{"event": ...}`` (``listening`` with the port for server
scenarios, ``connected`` with our local port, ``proposed``, ``established`` ...) and one final
``{"done": true, "ok": bool, "result": {...}}``. Every wait is bounded (``args["timeout"]``,
default 5 s). Scenarios whose name ends in ``_and_wait`` stop half-way and block until the
process is killed (fault tests).

As a client it does what smcish does: bind, ``device.claim(port, host, port, "client")``,
connect, send a PROPOSAL carrying a region it allocated, read the ACCEPT, attach the server's
region read-only, send CONFIRM. It owns its region (a writable mmap) and can put any value into
any header field (``poke``) while the victim reads, ring the victim's doorbell, write to the TCP
control channel, or break the handshake itself (malformed, truncated, oversized, out-of-order
messages, tokens it does not own, regions smaller than announced, a lying device endpoint).

Layout (docs/ring.md): prod@0 u64, cons_peer@128 u64, state@256 u32, want_data@260 u32,
want_space@264 u32, eof_pos@272 u64, magic@384, capacity@392, ring data@512.
"""

from __future__ import annotations

import errno
import json
import os
import random
import secrets
import socket
import struct
import sys
import threading
import time
import traceback
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

import ism_backend  # noqa: E402
from ism_backend import memfd as _memfd  # noqa: E402
from smcish import clc  # noqa: E402
from smcish import ring as _ring  # noqa: E402

HEADER = _ring.HEADER_SIZE
FIELDS = {
    "prod": (_ring.OFF_PROD, "=Q"),
    "cons": (_ring.OFF_CONS_PEER, "=Q"),
    "state": (_ring.OFF_STATE, "=I"),
    "want_data": (_ring.OFF_WANT_DATA, "=I"),
    "want_space": (_ring.OFF_WANT_SPACE, "=I"),
    "eof_pos": (_ring.OFF_EOF_POS, "=Q"),
    "magic": (_ring.OFF_MAGIC, "=Q"),
    "capacity": (_ring.OFF_CAPACITY, "=Q"),
}
EOF, CLOSED, ABORT = _ring.STATE_EOF, _ring.STATE_CLOSED, _ring.STATE_ABORT
U64 = (1 << 64) - 1
MT = clc.MessageType


def raw_message(mtype: int, body: bytes = b"", *, version: int = 1, length: int | None = None,
                magic: bytes = clc.MAGIC, trailer: bytes = clc.TRAILER) -> bytes:
    """A handshake frame with any field wrong on purpose."""
    if length is None:
        length = clc.HEADER_SIZE + len(body) + len(trailer)
    return struct.pack("!4sBBH", magic, version, mtype, length & 0xFFFF) + body + trailer


def proposal_body(min_v=1, max_v=1, flags=0, gid=bytes(16), endpoint=bytes(16), token=bytes(16),
                  cap_log2=14) -> bytes:
    return struct.pack("!BBH16s16s16sB", min_v, max_v, flags, gid, endpoint, token, cap_log2)


def accept_body(version=1, flags=0, gid=bytes(16), endpoint=bytes(16), token=bytes(16),
                cap_log2=14) -> bytes:
    return struct.pack("!BH16s16s16sB", version, flags, gid, endpoint, token, cap_log2)


# --- a lying device endpoint ----------------------------------------------------------------
# Tokens listed here are served by our embedded endpoint with a lie: a size bigger than the memory
# ("size"), an unsealed memfd ("unsealed", so we could still truncate it under the victim), or a
# pipe instead of memory ("pipe"). The victim must check before mapping (docs/device.md §2).
LIES: dict[bytes, str] = {}
STALL_SECONDS = 3.0      # "stall": the endpoint answers attach only after this long


def _install_lies() -> None:
    from ism_backend.embedded import EmbeddedDevice

    original = EmbeddedDevice._serve_attach
    if getattr(original, "_hostile", False):
        return

    def serve_attach(self, conn, token, access):
        reply, fds = original(self, conn, token, access)
        lie = LIES.get(bytes(token))
        if lie == "stall":
            time.sleep(STALL_SECONDS)
        if lie == "size":
            reply = dict(reply, size=reply["size"] * 4)
        elif lie == "unsealed":
            fake = os.memfd_create("hostile-unsealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fake, _memfd.page_round(reply["size"]))
            os.close(fds[0])
            fds = [fake, fds[1]]
        elif lie == "pipe":
            r, w = os.pipe2(os.O_CLOEXEC)
            os.close(w)
            os.close(fds[0])
            fds = [r, fds[1]]
        return reply, fds

    serve_attach._hostile = True
    EmbeddedDevice._serve_attach = serve_attach


# --- one hostile connection ------------------------------------------------------------------

class Peer:
    """One connection of the hostile peer (client or server role) and the regions it holds."""

    def __init__(self, device, sock: socket.socket, role: str, ring_size: int, timeout: float):
        self.device = device
        self.sock = sock
        self.role = role
        self.ring_size = ring_size
        self.timeout = timeout
        self.buf = bytearray()
        self.mine = None          # our region (rw)
        self.theirs = None        # the victim's region (r)
        self.ring = None
        self.claim = None
        self.sent_crc = 0
        self.sent = 0
        self.got = bytearray()

    # -- TCP / handshake bytes
    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_some(self, timeout: float | None = None) -> bytes | str:
        """Bytes, or "eof", "rst", "timeout"."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            data = self.sock.recv(65536)
        except socket.timeout:
            return "timeout"
        except (ConnectionResetError, BrokenPipeError):
            return "rst"
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EPIPE):
                return "rst"
            raise
        return data if data else "eof"

    def recv_msg(self, timeout: float | None = None):
        """The next handshake message, or "eof"/"rst"/"timeout", or ("bytes", raw) if the peer
        sent something that is not one of our messages."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            if self.buf:
                try:
                    msg, n = clc.decode(self.buf)
                except clc.ClcError:
                    raw = bytes(self.buf)
                    self.buf.clear()
                    return ("bytes", raw)
                if msg is not None:
                    del self.buf[:n]
                    return msg
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            data = self.read_some(left)
            if isinstance(data, str):
                return data
            self.buf += data

    def drain_tcp(self, timeout: float) -> str:
        """Read until EOF/RST/timeout; returns how it ended ("eof", "rst", "timeout")."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout"
            data = self.read_some(left)
            if isinstance(data, str):
                return data
            self.got += data

    def echo_check(self, payload: bytes, timeout: float | None = None) -> bool:
        """Plain TCP: send payload, expect it echoed back (the victim fell back and works)."""
        self.send(payload)
        want = len(payload)
        got = bytearray(self.buf)
        self.buf.clear()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(got) < want and time.monotonic() < deadline:
            data = self.read_some(max(0.01, deadline - time.monotonic()))
            if isinstance(data, str):
                break
            got += data
        return bytes(got[:want]) == payload

    # -- regions
    def alloc(self, ring_size: int | None = None):
        size = HEADER + (ring_size or self.ring_size)
        region = self.device.alloc(size)
        return region

    def attach(self, token: bytes, endpoint_id: bytes):
        self.theirs = self.device.attach(token, endpoint_id)
        return self.theirs

    def make_ring(self, peer_cap: int) -> None:
        self.ring = _ring.Ring(self.mine.mem, self.theirs.mem, self.mine.size - HEADER, peer_cap,
                               self.theirs.doorbell_fd)

    def poke(self, field: str, value: int) -> None:
        """Write any value into a header field of OUR region (the victim reads it)."""
        off, fmt = FIELDS[field]
        mask = (1 << (8 * struct.calcsize(fmt))) - 1
        struct.pack_into(fmt, self.mine.mem, off, value & mask)

    def peek_mine(self, field: str) -> int:
        off, fmt = FIELDS[field]
        return struct.unpack_from(fmt, self.mine.mem, off)[0]

    def peek_theirs(self, field: str) -> int:
        off, fmt = FIELDS[field]
        return struct.unpack_from(fmt, self.theirs.mem, off)[0]

    def doorbell(self, times: int = 1) -> None:
        fd = self.theirs.doorbell_fd
        for _ in range(times):
            try:
                os.eventfd_write(fd, 1)
            except BlockingIOError:
                pass

    # -- honest ring traffic (to get the victim into a known state first)
    def ring_send(self, data: bytes, timeout: float | None = None) -> int:
        view = memoryview(data)
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while view and time.monotonic() < deadline:
            n = self.ring.write(view)
            self.sent_crc = zlib.crc32(view[:n], self.sent_crc)
            self.sent += n
            view = view[n:]
            if view:
                time.sleep(0.001)
        return len(data) - len(view)

    def ring_recv(self, want: int, timeout: float | None = None) -> bytes:
        out = bytearray()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(out) < want and time.monotonic() < deadline:
            n = self.ring.readable()
            if n:
                out += self.ring.read(min(n, want - len(out)))
            else:
                time.sleep(0.0005)
        return bytes(out)

    def victim_state(self) -> int:
        return self.peek_theirs("state") if self.theirs is not None and self.theirs.mem else 0

    def wait_victim(self, timeout: float) -> dict:
        """After misbehaving: how did the victim react (ABORT in its region, RST/EOF on TCP)?"""
        deadline = time.monotonic() + timeout
        tcp = "open"
        while time.monotonic() < deadline:
            state = self.victim_state()
            data = self.read_some(0.02)
            if isinstance(data, bytes):
                self.got += data
            elif data in ("eof", "rst"):
                tcp = data
                break
            if state & ABORT:
                # the TCP reset follows the flag; give it a moment
                left = deadline - time.monotonic()
                end = self.read_some(min(0.5, max(left, 0.01)))
                tcp = end if isinstance(end, str) else "open"
                break
        return {"victim_state": self.victim_state(), "tcp": tcp}

    def close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        try:
            self.sock.close()
        except OSError:
            pass
        if self.theirs is not None and not self.theirs.closed:
            try:
                self.device.detach(self.theirs)
            except Exception:  # noqa: BLE001 - the victim's endpoint may be gone: nothing leaks
                pass
        if self.mine is not None and not self.mine.closed:
            try:
                self.device.free(self.mine)
            except Exception:  # noqa: BLE001
                pass
        if self.claim is not None:
            try:
                self.device.release_claim(self.claim)
            except Exception:  # noqa: BLE001
                pass
            self.claim = None


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def block_until_killed() -> None:
    # Fault tests SIGKILL us here; a closed stdin (test gone) also ends the wait.
    sys.stdin.readline()
    os._exit(0)


# --- client role: scenarios against an smcish server ------------------------------------------

def connect(device, host: str, port: int, args: dict, claim: bool = True) -> Peer:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((host, 0))
    local = sock.getsockname()[1]
    peer = Peer(device, sock, "client", args.get("ring_size", 16384), args.get("timeout", 5.0))
    if claim:
        peer.claim = device.claim(local, host, port, "client")
        if peer.claim is None:
            raise RuntimeError("the device refused our claim")
    sock.settimeout(peer.timeout)
    sock.connect((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    emit({"event": "connected", "port": local})
    return peer


def propose(peer: Peer, **override) -> clc.Proposal:
    dev = peer.device
    if peer.mine is None and "token" not in override:
        peer.mine = peer.alloc(override.pop("region_ring", None))
    fields = dict(min_version=1, max_version=1, flags=0, gid=dev.gid,
                  endpoint_id=dev.endpoint_id,
                  token=peer.mine.token if peer.mine is not None else bytes(16),
                  capacity_log2=peer.ring_size.bit_length() - 1)
    fields.update(override)
    proposal = clc.Proposal(**fields)
    peer.send(clc.encode(proposal))
    return proposal


def handshake(peer: Peer, confirm: bool = True) -> clc.Accept:
    """PROPOSAL -> ACCEPT -> attach -> CONFIRM, as an honest smcish client would."""
    propose(peer)
    answer = peer.recv_msg()
    if not isinstance(answer, clc.Accept):
        raise RuntimeError(f"expected ACCEPT, got {answer!r}")
    peer.attach(answer.token, answer.endpoint_id)
    peer.make_ring(1 << answer.capacity_log2)
    if confirm:
        peer.send(clc.encode(clc.Confirm()))
        emit({"event": "established"})
    return answer


def answer_kind(answer) -> dict:
    if isinstance(answer, clc.Decline):
        return {"answer": "decline", "reason": answer.reason.name, "code": answer.code}
    if isinstance(answer, clc.Accept):
        return {"answer": "accept"}
    if isinstance(answer, tuple):
        return {"answer": "bytes", "raw": answer[1][:64].hex()}
    if isinstance(answer, str):
        return {"answer": answer}
    return {"answer": type(answer).__name__}


def fell_back_and_echoes(peer: Peer, payload: bytes | None = None) -> dict:
    """After a DECLINE: the connection is plain TCP; prove it by an echo."""
    payload = payload or os.urandom(3000)
    return {"echo_ok": peer.echo_check(payload)}


def c_handshake_bytes(peer: Peer, args: dict) -> dict:
    """Send raw handshake bytes (args["hex"]); report the answer, then try a plain echo."""
    data = bytes.fromhex(args["hex"])
    peer.send(data)
    if args.get("shut_wr"):
        peer.sock.shutdown(socket.SHUT_WR)
    out = {}
    if args.get("expect_decline", True):
        answer = peer.recv_msg(args.get("answer_timeout"))
        out.update(answer_kind(answer))
        if isinstance(answer, clc.Decline) and not args.get("shut_wr"):
            out.update(fell_back_and_echoes(peer))
            return out
        if isinstance(answer, tuple):
            peer.got += answer[1]
    out["end"] = peer.drain_tcp(args.get("drain", 1.0))
    out["got"] = bytes(peer.got).hex()
    return out


def c_garbage(peer: Peer, args: dict) -> dict:
    """Claimed, then not our protocol at all: the server must fall back and replay it."""
    payload = bytes.fromhex(args["hex"]) if "hex" in args else os.urandom(2048)
    ok = peer.echo_check(payload)
    return {"echo_ok": ok}


def c_silent(peer: Peer, args: dict) -> dict:
    """Claimed but never proposes: the server's timer must fall back (TIMEOUT), then echo."""
    time.sleep(args.get("sleep", 0.0))
    return fell_back_and_echoes(peer)


def c_slowloris(peer: Peer, args: dict) -> dict:
    """A PROPOSAL one byte at a time, `delay` apart."""
    dev = peer.device
    peer.mine = peer.alloc()
    data = clc.encode(clc.Proposal(1, 1, 0, dev.gid, dev.endpoint_id, peer.mine.token,
                                   peer.ring_size.bit_length() - 1))
    for i in range(len(data)):
        try:
            peer.send(data[i:i + 1])
        except OSError:
            break
        time.sleep(args.get("delay", 0.02))
    answer = peer.recv_msg(args.get("answer_timeout", 0.5))
    out = answer_kind(answer)
    if isinstance(answer, tuple):
        peer.got += answer[1]
    out["end"] = peer.drain_tcp(args.get("drain", 0.5))
    out["got"] = bytes(peer.got).hex()
    out["sent"] = data.hex()
    return out


def c_proposal_fields(peer: Peer, args: dict) -> dict:
    """A well-formed PROPOSAL whose contents are wrong (token, endpoint, gid, versions, sizes)."""
    dev = peer.device
    kind = args["kind"]
    override: dict = {}
    if kind == "unknown_token":
        peer.mine = peer.alloc()
        override["token"] = secrets.token_bytes(16)
    elif kind == "victim_endpoint_token":
        # a token "of" the victim's own endpoint: we own nothing there
        override["token"] = secrets.token_bytes(16)
        override["endpoint_id"] = bytes.fromhex(args["victim_endpoint"])
    elif kind == "bogus_endpoint":
        peer.mine = peer.alloc()
        override["endpoint_id"] = secrets.token_bytes(16)
    elif kind == "already_attached":
        # we attach our own region first: the one-shot token is spent, the victim is refused
        peer.mine = peer.alloc()
        peer.theirs = dev.attach(peer.mine.token, dev.endpoint_id)
    elif kind == "freed_token":
        region = peer.alloc()
        override["token"] = region.token
        dev.free(region)
    elif kind == "gid":
        peer.mine = peer.alloc()
        override["gid"] = secrets.token_bytes(16)
    elif kind == "version":
        peer.mine = peer.alloc()
        override.update(min_version=2, max_version=7)
    elif kind == "small_region":
        # announce a 1 MiB ring, back it with a 4 KiB one
        peer.mine = peer.alloc(4096)
        override["capacity_log2"] = 20
    elif kind == "max_capacity_small_region":
        peer.mine = peer.alloc(4096)
        override["capacity_log2"] = clc.MAX_CAPACITY_LOG2
    elif kind in ("lie_size", "lie_unsealed", "lie_pipe", "lie_stall"):
        _install_lies()
        peer.mine = peer.alloc()
        LIES[peer.mine.token] = kind[4:]
    elif kind == "zero_everything":
        override.update(gid=dev.gid, endpoint_id=bytes(16), token=bytes(16))
    else:
        raise ValueError(kind)
    propose(peer, **override)
    answer = peer.recv_msg()
    out = answer_kind(answer)
    if isinstance(answer, clc.Decline):
        out.update(fell_back_and_echoes(peer))
    else:
        out["end"] = peer.drain_tcp(1.0)
    return out


def c_out_of_order(peer: Peer, args: dict) -> dict:
    """Messages in the wrong order or twice."""
    dev = peer.device
    kind = args["kind"]
    out: dict = {}
    if kind == "confirm_first":
        peer.send(clc.encode(clc.Confirm()))
    elif kind == "accept_first":
        peer.send(clc.encode(clc.Accept(1, 0, dev.gid, dev.endpoint_id, bytes(16), 14)))
    elif kind == "decline_first":
        peer.send(clc.encode(clc.Decline(clc.DeclineReason.INTERNAL)))
        out.update(fell_back_and_echoes(peer))     # nobody answers a DECLINE: TCP at once
        return out
    elif kind == "two_proposals":
        peer.mine = peer.alloc()
        first = clc.encode(clc.Proposal(1, 1, 0, dev.gid, dev.endpoint_id, peer.mine.token, 14))
        peer.send(first + first)
        out.update(answer_kind(peer.recv_msg()))
        out["end"] = peer.drain_tcp(2.0)
        return out
    elif kind == "proposal_confirm_together":
        # CONFIRM before we saw the ACCEPT (we "know" it will come): the server handles the
        # PROPOSAL first, so this is in order from its point of view.
        peer.mine = peer.alloc()
        peer.send(clc.encode(clc.Proposal(1, 1, 0, dev.gid, dev.endpoint_id, peer.mine.token, 14))
                  + clc.encode(clc.Confirm()))
        answer = peer.recv_msg()
        out.update(answer_kind(answer))
        if isinstance(answer, clc.Accept):
            peer.attach(answer.token, answer.endpoint_id)
            peer.make_ring(1 << answer.capacity_log2)
            payload = os.urandom(5000)
            peer.ring_send(payload)
            out["ring_echo_ok"] = peer.ring_recv(len(payload)) == payload
        return out
    elif kind == "accept_after_proposal":
        peer.mine = peer.alloc()
        peer.send(clc.encode(clc.Proposal(1, 1, 0, dev.gid, dev.endpoint_id, peer.mine.token, 14)))
        out.update(answer_kind(peer.recv_msg()))
        peer.send(clc.encode(clc.Accept(1, 0, dev.gid, dev.endpoint_id, bytes(16), 14)))
        out["end"] = peer.drain_tcp(2.0)
        return out
    elif kind == "decline_after_accept":
        peer.mine = peer.alloc()
        peer.send(clc.encode(clc.Proposal(1, 1, 0, dev.gid, dev.endpoint_id, peer.mine.token, 14)))
        out.update(answer_kind(peer.recv_msg()))
        peer.send(clc.encode(clc.Decline(clc.DeclineReason.ATTACH_FAILED)))
        out.update(fell_back_and_echoes(peer))
        return out
    elif kind == "garbage_after_accept":
        peer.mine = peer.alloc()
        peer.send(clc.encode(clc.Proposal(1, 1, 0, dev.gid, dev.endpoint_id, peer.mine.token, 14)))
        out.update(answer_kind(peer.recv_msg()))
        peer.send(os.urandom(100))
        out["end"] = peer.drain_tcp(2.0)
        return out
    elif kind == "confirm_twice":
        handshake(peer, confirm=False)
        peer.send(clc.encode(clc.Confirm()) * 2)
        out["end"] = peer.drain_tcp(2.0)
        return out
    else:
        raise ValueError(kind)
    out.update(answer_kind(peer.recv_msg()))
    out.update(fell_back_and_echoes(peer))
    return out


def c_stall(peer: Peer, args: dict) -> dict:
    """PROPOSAL, read the ACCEPT, then never CONFIRM (or close instead)."""
    propose(peer)
    answer = peer.recv_msg()
    out = answer_kind(answer)
    emit({"event": "accepted"})
    if args.get("then") == "eof":
        peer.sock.shutdown(socket.SHUT_WR)
    elif args.get("then") == "rst":
        peer.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.sock.close()
        out["end"] = "rst"
        return out
    out["end"] = peer.drain_tcp(args.get("drain", 4.0))
    return out


def c_propose_and_wait(peer: Peer, args: dict) -> dict:
    """Fault tests: stop after connecting, after the PROPOSAL or after the ACCEPT, until
    SIGKILLed."""
    if args.get("stage") == "connected":
        emit({"event": "waiting"})
        block_until_killed()
    propose(peer)
    if args.get("read_accept"):
        answer = peer.recv_msg()
        emit({"event": "accepted", **answer_kind(answer)})
    else:
        emit({"event": "proposed"})
    block_until_killed()
    return {}


def c_ring(peer: Peer, args: dict) -> dict:
    """Full handshake, honest traffic, then a cursor/flag attack on our own region.

    The victim is an echo server. ``attack`` picks what we do; afterwards we report how the
    victim reacted (its ABORT flag, RST/EOF on TCP) and whether echo still works.
    """
    accept = handshake(peer)
    cap_victim = 1 << accept.capacity_log2
    cap_mine = peer.ring_size
    attack = args["attack"]
    out: dict = {"attack": attack}
    warm = os.urandom(args.get("warm", 1000))
    if warm:
        peer.ring_send(warm)
        echoed = peer.ring_recv(len(warm))
        out["warm_ok"] = echoed == warm
    prod = peer.peek_mine("prod")
    rng = random.Random(args.get("seed", 1))

    if attack == "prod_beyond_capacity":
        cons_victim = peer.sent   # the victim consumed everything it echoed
        peer.poke("prod", cons_victim + cap_mine + 1)
        peer.doorbell()
    elif attack == "prod_huge":
        peer.poke("prod", U64)
        peer.doorbell()
    elif attack == "prod_2_63":
        peer.poke("prod", 1 << 63)
        peer.doorbell()
    elif attack == "prod_regress":
        peer.poke("prod", prod - 1)
        peer.doorbell()
    elif attack == "prod_full_capacity":
        # legal: exactly one capacity ahead (a full ring of whatever our ring holds)
        peer.poke("prod", prod + cap_mine)
        peer.doorbell()
        got = peer.ring_recv(cap_mine, 3.0)
        out["echo_len"] = len(got)
        # our Ring object still has the old cursor: a new one resumes from the header
        peer.ring.close()
        peer.make_ring(cap_victim)
    elif attack == "prod_flip":
        # alternate between the real value and one byte more, without writing data, until
        # the victim notices (it may read the extra byte, then sees prod go back)
        deadline = time.monotonic() + args.get("seconds", 1.0)
        i = 0
        while time.monotonic() < deadline and not peer.victim_state() & ABORT:
            peer.poke("prod", prod + (i & 1))
            peer.doorbell()
            i += 1
            if i % 16 == 0:
                time.sleep(0.0005)
        out["flips"] = i
    elif attack in ("cons_beyond_prod", "cons_regress", "cons_huge"):
        # fill the victim's ring (we send, it echoes, we do not read), so it must re-read our
        # consumer cursor to make progress
        if attack == "cons_regress":
            chunk = os.urandom(cap_victim)
            peer.ring_send(chunk)
            peer.ring_recv(cap_victim // 2, 2.0)     # honest: consume half, cursor moves on
        peer.ring_send(os.urandom(cap_victim * 3), 2.0)
        time.sleep(0.2)                              # the victim is now waiting for space
        cons = peer.peek_mine("cons")
        if attack == "cons_beyond_prod":
            peer.poke("cons", cons + cap_victim * 8)
        elif attack == "cons_huge":
            peer.poke("cons", U64 - 5)
        else:
            peer.poke("cons", max(0, cons - 1))
        # the victim waits on want_space: ring it (a consumer's space doorbell)
        peer.doorbell()
    elif attack == "eof_pos_mismatch":
        peer.poke("eof_pos", prod + 10)
        peer.poke("state", EOF)
        peer.doorbell()
    elif attack == "eof_pos_below":
        peer.poke("eof_pos", max(prod - 1, 0))
        peer.poke("state", EOF)
        peer.doorbell()
    elif attack == "prod_after_eof":
        peer.ring.set_eof()
        time.sleep(0.2)
        peer.poke("prod", prod + 100)
        peer.doorbell()
    elif attack == "abort_flag":
        peer.poke("state", ABORT)
        peer.doorbell()
    elif attack == "closed_without_eof":
        peer.poke("state", CLOSED)
        peer.doorbell()
    elif attack == "unknown_state_bits":
        peer.poke("state", 0xFFFFFFF8)
        peer.doorbell()
    elif attack == "informational_garbage":
        peer.poke("magic", rng.getrandbits(64))
        peer.poke("capacity", U64)
        peer.doorbell()
    elif attack == "want_flags_flip":
        stop = threading.Event()

        def flipper():
            while not stop.is_set():
                peer.poke("want_data", rng.getrandbits(32))
                peer.poke("want_space", rng.getrandbits(32))

        thread = threading.Thread(target=flipper, daemon=True)
        thread.start()
        ok = True
        for _ in range(args.get("rounds", 50)):
            payload = os.urandom(rng.randrange(1, 3 * cap_victim))
            if peer.ring_send(payload) != len(payload):
                ok = False
                break
            if peer.ring_recv(len(payload)) != payload:
                ok = False
                break
        stop.set()
        thread.join()
        out["echo_during_flips_ok"] = ok
    elif attack == "doorbell_storm":
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < args.get("seconds", 1.0):
            peer.doorbell(1000)
            n += 1000
        out["doorbells"] = n
    elif attack == "random_header":
        # a thread writes random values into every header field while we keep ringing
        stop = threading.Event()
        names = list(FIELDS)

        def scribbler():
            r = random.Random(args.get("seed", 7))
            while not stop.is_set():
                name = r.choice(names)
                bits = r.choice((1, 8, 32, 64))
                value = r.getrandbits(bits)
                if name in ("prod", "cons", "eof_pos") and r.random() < 0.5:
                    value = (peer.peek_mine(name) + r.randint(-2, 2 * cap_mine)) & U64
                peer.poke(name, value)

        thread = threading.Thread(target=scribbler, daemon=True)
        thread.start()
        deadline = time.monotonic() + args.get("seconds", 1.0)
        while time.monotonic() < deadline and not peer.victim_state() & ABORT:
            peer.doorbell()
            time.sleep(0.001)
        stop.set()
        thread.join()
    elif attack == "tcp_bytes_after_confirm":
        peer.send(b"this is not allowed after CONFIRM")
    elif attack == "tcp_close_without_closed":
        data = os.urandom(args.get("tail", 6000))
        peer.ring_send(data)
        out["tail_crc"] = zlib.crc32(warm + data) if warm else zlib.crc32(data)
        out["tail_len"] = len(warm) + len(data)
        peer.sock.shutdown(socket.SHUT_RDWR)
    elif attack == "honest_close":
        data = os.urandom(args.get("tail", 6000))
        peer.ring_send(data)
        peer.ring.set_eof()
        peer.ring.set_closed()
        out["crc"] = zlib.crc32(warm + data)
        out["len"] = len(warm) + len(data)
        peer.sock.close()
        return out
    else:
        raise ValueError(attack)
    if attack in BENIGN:
        # nothing the victim must act on: the connection must still carry data both ways
        payload = os.urandom(args.get("after", 7000))
        sent = peer.ring_send(payload, 3.0)
        out["echo_after_ok"] = sent == len(payload) and peer.ring_recv(len(payload), 3.0) == payload
        out.update(peer.wait_victim(0.1))
        return out
    out.update(peer.wait_victim(args.get("wait", 3.0)))
    return out


BENIGN = {"prod_full_capacity", "unknown_state_bits", "informational_garbage", "want_flags_flip",
          "doorbell_storm"}


CLIENT_SCENARIOS = {
    "handshake_bytes": c_handshake_bytes,
    "garbage": c_garbage,
    "silent": c_silent,
    "slowloris": c_slowloris,
    "proposal_fields": c_proposal_fields,
    "out_of_order": c_out_of_order,
    "stall": c_stall,
    "propose_and_wait": c_propose_and_wait,
    "ring": c_ring,
}


# --- server role: scenarios against an smcish client ------------------------------------------

def s_reply(peer: Peer, args: dict) -> dict:
    """Read the client's PROPOSAL, answer with something hostile."""
    dev = peer.device
    proposal = peer.recv_msg()
    if not isinstance(proposal, clc.Proposal):
        return {"error": f"expected PROPOSAL, got {proposal!r}"}
    kind = args["kind"]
    emit({"event": "proposed"})
    if kind == "garbage":
        peer.send(os.urandom(64))
    elif kind == "silence":
        pass
    elif kind == "oversized":
        peer.send(raw_message(MT.ACCEPT, b"\0" * 52, length=4000))
    elif kind == "bad_trailer":
        peer.send(raw_message(MT.ACCEPT, accept_body(), trailer=b"XXXX"))
    elif kind == "truncated_then_eof":
        peer.send(raw_message(MT.ACCEPT, accept_body())[:20])
        peer.sock.shutdown(socket.SHUT_WR)
    elif kind == "bad_capacity":
        peer.send(raw_message(MT.ACCEPT, accept_body(gid=dev.gid, cap_log2=40)))
    elif kind == "unknown_token":
        peer.send(clc.encode(clc.Accept(1, 0, dev.gid, dev.endpoint_id, secrets.token_bytes(16),
                                        14)))
    elif kind == "small_region":
        peer.mine = peer.alloc(4096)
        peer.send(clc.encode(clc.Accept(1, 0, dev.gid, dev.endpoint_id, peer.mine.token, 20)))
    elif kind in ("lie_size", "lie_unsealed", "lie_pipe", "lie_stall"):
        _install_lies()
        peer.mine = peer.alloc()
        LIES[peer.mine.token] = kind[4:]
        peer.send(clc.encode(clc.Accept(1, 0, dev.gid, dev.endpoint_id, peer.mine.token, 14)))
    elif kind == "gid":
        peer.mine = peer.alloc()
        peer.send(clc.encode(clc.Accept(1, 0, secrets.token_bytes(16), dev.endpoint_id,
                                        peer.mine.token, 14)))
    elif kind == "version":
        peer.mine = peer.alloc()
        peer.send(clc.encode(clc.Accept(7, 0, dev.gid, dev.endpoint_id, peer.mine.token, 14)))
    elif kind == "decline_unknown_code":
        peer.send(clc.encode(clc.Decline(clc.DeclineReason.PEER_DECLINED, 0x7777)))
    elif kind == "proposal_back":
        peer.send(clc.encode(proposal))
    elif kind == "two_accepts":
        peer.mine = peer.alloc()
        accept = clc.encode(clc.Accept(1, 0, dev.gid, dev.endpoint_id, peer.mine.token, 14))
        peer.attach(proposal.token, proposal.endpoint_id)
        peer.send(accept + accept)
    else:
        raise ValueError(kind)
    out: dict = {}
    if args.get("expect_answer", True):
        answer = peer.recv_msg(args.get("answer_timeout", 3.0))
        out.update(answer_kind(answer))
    if args.get("echo"):
        # the client fell back: serve it as a plain echo server until it closes
        deadline = time.monotonic() + args.get("echo_seconds", 5.0)
        echoed = 0
        if peer.buf:
            peer.send(bytes(peer.buf))
            echoed += len(peer.buf)
            peer.buf.clear()
        end = "timeout"
        while time.monotonic() < deadline:
            data = peer.read_some(0.05)
            if isinstance(data, bytes):
                peer.send(data)
                echoed += len(data)
            elif data in ("eof", "rst"):
                end = data
                break
        out["echoed"] = echoed
        out["end"] = end
    else:
        out["end"] = peer.drain_tcp(args.get("drain", 3.0))
    return out


def s_ring(peer: Peer, args: dict) -> dict:
    """Complete the handshake as a server, then attack the client's reads of our region."""
    dev = peer.device
    proposal = peer.recv_msg()
    if not isinstance(proposal, clc.Proposal):
        return {"error": f"expected PROPOSAL, got {proposal!r}"}
    peer.attach(proposal.token, proposal.endpoint_id)
    peer.mine = peer.alloc()
    peer.make_ring(1 << proposal.capacity_log2)
    peer.send(clc.encode(clc.Accept(1, 0, dev.gid, dev.endpoint_id, peer.mine.token,
                                    peer.ring_size.bit_length() - 1)))
    confirm = peer.recv_msg()
    out = {"confirm": isinstance(confirm, clc.Confirm)}
    emit({"event": "established"})
    attack = args["attack"]
    # the client (victim) sends a greeting through the ring first
    greeting = peer.ring_recv(args.get("greeting", 100), 3.0)
    out["greeting_len"] = len(greeting)
    prod = peer.peek_mine("prod")
    if attack == "prod_huge":
        peer.poke("prod", U64)
    elif attack == "prod_beyond_capacity":
        peer.poke("prod", prod + peer.ring_size + 1)
    elif attack == "eof_pos_mismatch":
        peer.poke("eof_pos", prod + 3)
        peer.poke("state", EOF)
    elif attack == "abort_flag":
        peer.poke("state", ABORT)
    elif attack == "stream_then_kill_and_wait":
        pass
    else:
        raise ValueError(attack)
    peer.doorbell()
    out.update(peer.wait_victim(args.get("wait", 3.0)))
    return out


def s_accept_and_wait(peer: Peer, args: dict) -> dict:
    """Fault tests: read the PROPOSAL (and optionally answer ACCEPT), then block until killed."""
    dev = peer.device
    proposal = peer.recv_msg()
    if args.get("send_accept") and isinstance(proposal, clc.Proposal):
        peer.attach(proposal.token, proposal.endpoint_id)
        peer.mine = peer.alloc()
        peer.send(clc.encode(clc.Accept(1, 0, dev.gid, dev.endpoint_id, peer.mine.token,
                                        peer.ring_size.bit_length() - 1)))
    emit({"event": "proposed", "proposal": isinstance(proposal, clc.Proposal)})
    block_until_killed()
    return {}


SERVER_SCENARIOS = {
    "reply": s_reply,
    "ring": s_ring,
    "accept_and_wait": s_accept_and_wait,
}


def run_server(device, scenario: str, args: dict) -> dict:
    host = args.get("host", "127.0.0.1")
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, 0))
    lsock.listen(8)
    port = lsock.getsockname()[1]
    handle = device.advertise(host, port)
    peer = None
    try:
        emit({"event": "listening", "port": port})
        lsock.settimeout(args.get("timeout", 5.0))
        conn, _ = lsock.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = Peer(device, conn, "server", args.get("ring_size", 16384), args.get("timeout", 5.0))
        return SERVER_SCENARIOS[scenario](peer, args)
    finally:
        if peer is not None:
            peer.close()
        lsock.close()
        try:
            device.withdraw(handle)
        except Exception:  # noqa: BLE001
            pass


def run_client(device, scenario: str, port: int, args: dict) -> dict:
    host = args.get("host", "127.0.0.1")
    peer = connect(device, host, port, args, claim=args.get("claim", True))
    try:
        return CLIENT_SCENARIOS[scenario](peer, args)
    finally:
        peer.close()


def main() -> None:
    device = ism_backend.get_device()
    emit({"ready": True, "pid": os.getpid(), "endpoint_id": device.endpoint_id.hex(),
          "gid": device.gid.hex()})
    for line in sys.stdin:
        if not line.strip():
            continue
        cmd = json.loads(line)
        if cmd.get("cmd") == "exit":
            break
        try:
            if cmd["cmd"] == "client":
                result = run_client(device, cmd["scenario"], cmd["port"], cmd.get("args", {}))
            elif cmd["cmd"] == "server":
                result = run_server(device, cmd["scenario"], cmd.get("args", {}))
            elif cmd["cmd"] == "status":
                result = device.status()
            else:
                raise ValueError(f"unknown command {cmd!r}")
            emit({"done": True, "ok": True, "result": result})
        except Exception as exc:  # noqa: BLE001 - report, keep serving
            emit({"done": True, "ok": False, "error": f"{type(exc).__name__}: {exc}",
                  "traceback": traceback.format_exc()})


if __name__ == "__main__":
    main()
