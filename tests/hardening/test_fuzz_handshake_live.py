"""Live handshake fuzzing: hypothesis-generated handshake bytes against a running smcish server.

The server is an smcish echo server in a child process. Each example opens a TCP connection the
way an smcish client does (bind, claim the connection on the device, connect), so the server
parses our bytes as a handshake, then sends a generated sequence of valid, mutated and random
handshake messages (real region tokens included) in generated chunks, reads whatever comes back
for a few milliseconds, and ends with a close, a half-close or a reset.

Afterwards: the server process is alive, a normal smcish client gets an ISM connection and a
checksummed echo, and the server holds no region, attachment or fd beyond its starting values.
Bounded by LIVE_FUZZ_SECONDS (default 12 s).

    PYTHONPATH=. LIVE_FUZZ_SECONDS=60 python -m pytest -q tests/hardening/test_fuzz_handshake_live.py
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time
import zlib

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import ism_backend
import smcish
from smcish import clc

from . import hostile_peer as H
from .conftest import HOST, run_loop, start_server_child

MT = clc.MessageType
ROUND = settings(max_examples=40, deadline=None, database=None,
                 phases=[Phase.generate], suppress_health_check=list(HealthCheck))

ids = st.binary(min_size=16, max_size=16)
caps = st.integers(0, 40)


@st.composite
def part(draw):
    """One piece of what the fuzz client sends."""
    kind = draw(st.sampled_from(["proposal", "proposal_real", "accept", "confirm", "decline",
                                 "raw_frame", "random", "magic_prefix", "mutated_real"]))
    if kind == "proposal":
        body = H.proposal_body(draw(st.integers(0, 3)), draw(st.integers(0, 3)),
                               draw(st.integers(0, 0xFFFF)), draw(ids), draw(ids), draw(ids),
                               draw(caps))
        return ("bytes", H.raw_message(MT.PROPOSAL, body))
    if kind in ("proposal_real", "mutated_real"):
        return (kind, draw(st.integers(12, 16)), draw(st.lists(
            st.tuples(st.integers(0, 64), st.integers(0, 255)), max_size=3)))
    if kind == "accept":
        body = H.accept_body(draw(st.integers(0, 3)), 0, draw(ids), draw(ids), draw(ids),
                             draw(caps))
        return ("bytes", H.raw_message(MT.ACCEPT, body))
    if kind == "confirm":
        return ("bytes", clc.encode(clc.Confirm()))
    if kind == "decline":
        return ("bytes", H.raw_message(MT.DECLINE, struct.pack("!H", draw(st.integers(0, 0xFFFF)))))
    if kind == "raw_frame":
        return ("bytes", H.raw_message(draw(st.integers(0, 255)), draw(st.binary(max_size=80)),
                                       version=draw(st.integers(0, 3)),
                                       length=draw(st.one_of(st.none(), st.integers(0, 0xFFFF)))))
    if kind == "magic_prefix":
        return ("bytes", clc.MAGIC[:draw(st.integers(1, 4))])
    return ("bytes", draw(st.binary(min_size=1, max_size=200)))


program = st.tuples(
    st.lists(part(), min_size=1, max_size=4),
    st.lists(st.integers(1, 80), min_size=1, max_size=6),          # chunk sizes (cycled)
    st.sampled_from(["close", "shut_wr", "rst", "linger"]),
)


class Fuzzer:
    def __init__(self, port: int, device) -> None:
        self.port = port
        self.device = device
        self.examples = 0
        self.bytes_sent = 0
        self.answers = {"none": 0, "decline": 0, "accept": 0, "echo_or_other": 0, "reset": 0}

    def run(self, prog) -> None:
        parts, chunk_sizes, ending = prog
        dev = self.device
        regions = []
        data = bytearray()
        for p in parts:
            if p[0] == "bytes":
                data += p[1]
                continue
            kind, cap_log2, edits = p
            region = dev.alloc(512 + (1 << cap_log2))
            regions.append(region)
            msg = bytearray(clc.encode(clc.Proposal(1, 1, 0, dev.gid, dev.endpoint_id,
                                                    region.token, cap_log2)))
            if kind == "mutated_real":
                for pos, value in edits:
                    msg[pos % len(msg)] = value
            data += msg
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        claim = None
        try:
            sock.bind((HOST, 0))
            claim = dev.claim(sock.getsockname()[1], HOST, self.port, "client")
            sock.settimeout(2.0)
            sock.connect((HOST, self.port))
            pos = 0
            i = 0
            try:
                while pos < len(data):
                    n = chunk_sizes[i % len(chunk_sizes)]
                    sock.sendall(data[pos:pos + n])
                    pos += n
                    i += 1
                self.bytes_sent += len(data)
                if ending == "shut_wr":
                    sock.shutdown(socket.SHUT_WR)
                got = self._read(sock, 0.03 if ending != "shut_wr" else 0.6)
            except OSError:          # reset by the server (ECONNRESET, EPIPE, ENOTCONN)
                got = "reset"
            self._classify(got)
            if ending in ("rst", "linger") and got != "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        finally:
            sock.close()
            if claim is not None:
                dev.release_claim(claim)
            for region in regions:
                dev.free(region)
        self.examples += 1

    @staticmethod
    def _read(sock, window: float):
        out = bytearray()
        deadline = time.monotonic() + window
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(out)
            ready, _, _ = select.select([sock], [], [], left)
            if not ready:
                continue
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return "reset"
            if not chunk:
                return bytes(out)
            out += chunk

    def _classify(self, got) -> None:
        if got == "reset":
            self.answers["reset"] += 1
        elif not got:
            self.answers["none"] += 1
        else:
            try:
                msg, _ = clc.decode(got)
            except clc.ClcError:
                msg = None
            if isinstance(msg, clc.Decline):
                self.answers["decline"] += 1
            elif isinstance(msg, clc.Accept):
                self.answers["accept"] += 1
            else:
                self.answers["echo_or_other"] += 1


def test_live_server_survives_handshake_fuzzing():
    seconds = float(os.environ.get("LIVE_FUZZ_SECONDS", "12"))
    child, port = start_server_child(mode="echo", ring_size=16384, handshake_timeout=0.3)
    dev = ism_backend.get_device()
    try:
        base = child.status()
        fuzzer = Fuzzer(port, dev)

        @ROUND
        @given(program)
        def one_round(prog):
            fuzzer.run(prog)

        deadline = time.monotonic() + seconds
        rounds = 0
        while time.monotonic() < deadline:
            one_round()
            rounds += 1
            assert child.proc.poll() is None, "the smcish server died"
        time.sleep(0.8)                      # every pending handshake timer (0.3 s) has fired

        async def normal_client():
            reader, writer = await smcish.open_connection(HOST, port, ring_size=16384)
            mode = writer.get_extra_info("smcish").mode
            payload = os.urandom(300_000)
            writer.write(payload)
            got = await reader.readexactly(len(payload))
            writer.close()
            await writer.wait_closed()
            return mode, zlib.crc32(got) == zlib.crc32(payload)

        (mode, ok), _ = run_loop(normal_client())
        assert mode == "ism" and ok
        deadline = time.monotonic() + 5
        while True:
            now = child.status()
            if (now["device"]["regions"] == 0 and now["device"]["attached"] == 0
                    and now["fds_net"] <= base["fds_net"]):
                break
            assert time.monotonic() < deadline, (base, now)
            time.sleep(0.05)
        print(f"live fuzz: {fuzzer.examples} connections, {fuzzer.bytes_sent} bytes, "
              f"{rounds} rounds, answers {fuzzer.answers}, server fds {base['fds']}->"
              f"{now['fds']} (net {base['fds_net']}->{now['fds_net']}), "
              f"fallbacks {now['stats']['fallbacks']}, aborts {now['stats']['handshake_aborts']}")
        assert fuzzer.examples >= 50
    finally:
        child.close()
