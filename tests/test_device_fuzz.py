"""Hostile control messages against a live ismd: each gets a reply or a clean disconnect."""

import json
import os
import shutil
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from device_helpers import Ismd, fd_count
from ism_backend import memfd, proto
from ism_backend.client import DaemonDevice
from ism_backend.device import ERRORS


@pytest.fixture(scope="module")
def daemon():
    ismd = Ismd("--total-memory", "16M", "--quota", "8M", "--max-regions", "64")
    yield ismd
    err = ismd.stop()
    shutil.rmtree(ismd.dir, ignore_errors=True)
    assert "Traceback" not in err, err


class FuzzClient:
    def __init__(self, path):
        self.path = path
        self.sock = None
        self.disconnects = 0
        self.replies = 0

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.settimeout(5)
        self.sock.connect(self.path)

    def exchange(self, record: bytes, with_fds: bool) -> None:
        """Send one record; require a well-formed reply or EOF within the timeout."""
        if self.sock is None:
            self.connect()
        fds = list(os.pipe()) if with_fds else []
        try:
            memfd.send_msg(self.sock, record, fds)
        except (BrokenPipeError, ConnectionResetError):
            self._reset()
            return
        finally:
            memfd.close_fds(fds)
        if not record and not with_fds:
            # an empty seqpacket record reads as EOF on the other side: ismd hangs up
            self._expect_eof()
            return
        try:
            data, got_fds, truncated = memfd.recv_msg(self.sock, proto.MAX_RECORD)
        except ConnectionResetError:
            self._reset()
            return
        except TimeoutError:
            raise AssertionError(f"no reply and no disconnect for {record[:80]!r}") from None
        memfd.close_fds(got_fds)
        if not data:
            self._reset()
            return
        assert not truncated
        (length,) = struct.unpack_from(">I", data)
        assert length == len(data) - 4
        reply = json.loads(data[4:])
        assert reply["v"] == 1 and type(reply["ok"]) is bool and type(reply["id"]) is int
        if not reply["ok"]:
            assert reply["error"] in ERRORS and isinstance(reply["message"], str)
            assert not got_fds
        self.replies += 1

    def _expect_eof(self):
        try:
            assert self.sock.recv(10) == b""
        except ConnectionResetError:
            pass
        self._reset()

    def _reset(self):
        self.disconnects += 1
        self.sock.close()
        self.sock = None


def framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


json_leaf = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
             | st.text(max_size=40) | st.sampled_from(["r", "rw", "0" * 32, "f" * 32, "::1",
                                                      "127.0.0.1", "x" * 300]))
json_value = st.recursive(json_leaf, lambda c: st.lists(c, max_size=4)
                          | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=10)
plausible = {  # values that pass validation, so the handlers themselves get exercised
    "size": st.integers(1, 12 << 20), "token": st.binary(min_size=16, max_size=16).map(bytes.hex),
    "access": st.sampled_from(["r", "rw"]), "attachment": st.integers(1, 50),
    "keep": st.booleans(), "region": st.integers(1, 50), "uid": st.integers(0, 70000),
    "host": st.sampled_from(["127.0.0.1", "::", "0.0.0.0", "a-b.example", "::ffff:10.0.0.1"]),
    "port": st.integers(1, 65535), "handle": st.integers(1, 100),
    "local_port": st.integers(1, 65535), "remote_host": st.just("127.0.0.1"),
    "remote_port": st.integers(1, 65535), "peer_port": st.integers(1, 65535),
    "local_host": st.just("127.0.0.1"), "role": st.sampled_from(["client", "server"]),
}


@st.composite
def valid_shaped(draw):
    op = draw(st.sampled_from(sorted(proto.REQUESTS)))
    fields = {name: draw(plausible[name]) for name in proto.REQUESTS[op]}
    obj = {"v": 1, "id": draw(st.integers(0, 2**53 - 1)), "op": op, **fields}
    if draw(st.booleans()):  # then break one thing about it
        key = draw(st.sampled_from(sorted(obj)))
        if draw(st.booleans()):
            obj[key] = draw(json_value)
        else:
            del obj[key]
    return framed(json.dumps(obj).encode())


records = st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=64).map(framed),
    json_value.map(lambda v: framed(json.dumps(v).encode())),
    st.dictionaries(st.sampled_from(["v", "id", "op", "size", "token", "x"]), json_value,
                    max_size=5).map(lambda d: framed(json.dumps(d).encode())),
    valid_shaped(),
    valid_shaped(),
    st.sampled_from([b"", framed(b"[" * 5000), framed(b"{}" * 3), struct.pack(">I", 2**32 - 1),
                     framed(b"x" * proto.MAX_BODY), framed(b" " * (proto.MAX_BODY + 100))]),
)


def test_hostile_messages_get_a_reply_or_a_clean_disconnect(daemon):
    baseline = fd_count(daemon.pid)
    client = FuzzClient(daemon.path)

    @settings(max_examples=1000, deadline=None, derandomize=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(record=records, with_fds=st.booleans())
    def exchange(record, with_fds):
        client.exchange(record, with_fds)
        assert daemon.alive()

    exchange()
    assert client.replies > 100 and client.disconnects >= 0
    if client.sock is not None:
        client.sock.close()
    # many hostile connections at once, abandoned mid-way
    socks = []
    for i in range(50):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect(daemon.path)
        s.send(proto.encode_request("alloc", i + 1, size=4096))
        socks.append(s)
    for s in socks:
        s.close()
    assert daemon.alive()
    # a client that never reads its replies is dropped, not buffered forever
    greedy = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    greedy.connect(daemon.path)
    greedy.settimeout(5)
    try:
        for i in range(2000):
            greedy.send(proto.encode_request("status", i + 1))
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    greedy.close()
    # ismd still serves real clients, and every hostile connection's resources are gone
    dev = DaemonDevice(daemon.path)
    region = dev.alloc(4096)
    view = dev.attach(region.token, bytes(16))
    dev.detach(view)
    dev.free(region)
    dev.close()
    deadline = time.monotonic() + 5
    while fd_count(daemon.pid) != baseline:
        assert time.monotonic() < deadline, (fd_count(daemon.pid), baseline)
        time.sleep(0.02)
    assert daemon.alive()
