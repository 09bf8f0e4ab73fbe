"""The control protocol codec: round trips and strict rejection (no sockets)."""

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import device_helpers  # noqa: F401 - puts the repo on sys.path
from ism_backend import DeviceProtocolError, PermissionDenied, QuotaExceeded, UnknownToken, proto

TOKEN = bytes(range(16))


def framed(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def record(obj) -> bytes:
    return framed(json.dumps(obj).encode())


ID = bytes(range(16, 32))
SAMPLES = {
    "alloc": {"size": 4608}, "reuse": {"size": 4608},
    "attach": {"token": TOKEN, "access": "r"}, "detach": {"attachment": 7},
    "free": {"token": TOKEN, "keep": True}, "release": {"region": 3},
    "grant": {"token": TOKEN, "uid": 1000, "access": "r"}, "revoke": {"token": TOKEN, "uid": 5},
    "advertise": {"hub_id": ID}, "withdraw": {"handle": 9},
    "find_listener": {"inode": 123456}, "find_remote_listener": {"host": "10.0.0.2", "port": 80},
    "verify_remote_peer": {"inode": (1 << 64) - 1, "endpoint_id": ID}, "release_remote_claim": {"inode": 1},
    "serve_endpoint": {}, "connect_endpoint": {"endpoint_id": ID},
    "take_peer": {"endpoint_id": ID, "pid": 4242, "uid": 1000, "gid": 1000},
    "hello": {"endpoint_id": ID}, "ping": {}, "info": {}, "status": {},
    "group_open": {"group_id": ID, "hub_id": ID, "token": TOKEN, "size": 1 << 24,
                   "max_slots": 16384, "version": 2},
    "extent_add": {"group_id": ID, "side": "client", "index": 31, "token": TOKEN, "size": 1 << 26},
    "extent_remove": {"group_id": ID, "side": "server", "index": 1},
    "group_close": {"group_id": ID, "side": "server"},
}


def test_every_request_round_trips():
    assert set(SAMPLES) == set(proto.REQUESTS)
    for op, fields in SAMPLES.items():
        request = proto.decode_request(proto.encode_request(op, 42, **fields))
        assert (request.op, request.id, request.fields) == (op, 42, fields)


def test_peer_ops_are_requests_and_replies_declared_as_data():
    assert set(proto.PEER_OPS) == {"group_open", "extent_add", "extent_remove", "group_close"}
    for op, (request, reply) in proto.PEER_OPS.items():
        assert proto.REQUESTS[op] is request and proto.REPLIES[op] is reply
        assert op not in proto.REQUEST_FDS and op not in proto.REPLY_FDS  # no fds between peers
    assert proto.REQUEST_FDS == {"advertise": 1, "find_remote_listener": 1,
                                 "verify_remote_peer": 1, "take_peer": 1}
    assert proto.REPLY_FDS == {"alloc": 2, "reuse": 1, "attach": 2, "connect_endpoint": 1}
    reply = {"token": TOKEN, "size": 4096, "max_slots": 128}
    assert proto.decode_reply(proto.encode_result("group_open", 3, reply), "group_open", 3) == reply
    for bad in ({"token": TOKEN, "size": 4096}, {**reply, "extra": 1}, {**reply, "size": 0},
                {**reply, "token": b"short"}):
        with pytest.raises(ValueError):
            proto.check_reply("group_open", bad)
    for index in (0, 32, True):
        with pytest.raises(ValueError, match="index"):
            proto.encode_request("extent_remove", 1, group_id=ID, side="server", index=index)
    with pytest.raises(ValueError, match="side"):
        proto.encode_request("group_close", 1, group_id=ID, side="both")
    with pytest.raises(ValueError, match="unknown op"):
        proto.encode_request("lookup", 1, host="x", port=1)  # v1 ops are gone


def test_reply_round_trip_and_errors():
    data = proto.encode_reply(5, token=TOKEN, region=1, size=100, offset=0)
    assert proto.decode_reply(data, "alloc", 5)["token"] == TOKEN
    for exc in (UnknownToken("x"), PermissionDenied("y"), QuotaExceeded("z")):
        with pytest.raises(type(exc), match=str(exc)):
            proto.decode_reply(proto.encode_error(5, exc), "alloc", 5)
    # a refusal at connect (id 0) answers any request; any other id mismatch is an error
    with pytest.raises(PermissionDenied):
        proto.decode_reply(proto.encode_error(0, PermissionDenied("policy")), "hello", 1)
    with pytest.raises(DeviceProtocolError, match="does not answer"):
        proto.decode_reply(proto.encode_reply(4), "ping", 5)
    # unknown error names never become arbitrary exceptions
    bad = record({"v": 2, "id": 5, "ok": False, "error": "SystemExit", "message": "m"})
    with pytest.raises(DeviceProtocolError):
        proto.decode_reply(bad, "ping", 5)
    with pytest.raises(DeviceProtocolError, match="unknown"):
        proto.decode_reply(proto.encode_reply(5, extra=1), "ping", 5)


@pytest.mark.parametrize("raw, why", [
    (b"", "shorter"),
    (b"\x00\x00", "shorter"),
    (struct.pack(">I", 10) + b"{}", "length prefix"),
    (struct.pack(">I", proto.MAX_BODY + 1), "exceeds"),
    (record([1, 2]), "not a JSON object"),
    (struct.pack(">I", 3) + b"\xff\xfe\xfd", "not valid JSON"),
    (record({"v": 2, "op": "ping"}), "id"),
    (record({"v": 1, "id": 1, "op": "ping"}), "version"),  # a v1 peer: told to upgrade
    (record({"v": True, "id": 1, "op": "ping"}), "version"),
    (record({"v": 2, "id": 1, "op": "nope"}), "unknown op"),
    (record({"v": 2, "id": 1, "op": "lookup", "host": "a", "port": 1}), "unknown op"),
    (record({"v": 2, "id": 1, "op": "claim"}), "unknown op"),
    (record({"v": 2, "id": 1, "op": "ping", "x": 1}), "unknown"),
    (record({"v": 2, "id": 1, "op": "alloc"}), "missing"),
    (record({"v": 2, "id": 1, "op": "hello"}), "missing"),
    (record({"v": 2, "id": 1, "op": "alloc", "size": True}), "size"),
    (record({"v": 2, "id": 1, "op": "alloc", "size": 1.5}), "size"),
    (record({"v": 2, "id": 1, "op": "alloc", "size": 0}), "size"),
    (record({"v": 2, "id": 1, "op": "attach", "token": TOKEN.hex().upper(), "access": "r"}),
     "token"),
    (record({"v": 2, "id": 1, "op": "attach", "token": TOKEN.hex(), "access": "x"}), "access"),
    (record({"v": 2, "id": 1, "op": "find_remote_listener", "host": "a b", "port": 1}), "host"),
    (record({"v": 2, "id": 1, "op": "find_remote_listener", "host": "a", "port": 70000}),
     "port"),
    (record({"v": 2, "id": 1, "op": "find_listener", "inode": 0}), "inode"),
    (record({"v": 2, "id": 1, "op": "find_listener", "inode": 1 << 64}), "inode"),
    (record({"v": 2, "id": 1, "op": "take_peer", "endpoint_id": TOKEN.hex(), "pid": -1,
             "uid": 0, "gid": 0}), "pid"),
    (record({"v": 2, "id": 1, "op": "group_open", "group_id": TOKEN.hex(),
             "hub_id": TOKEN.hex(), "token": TOKEN.hex(), "size": 1, "max_slots": 0,
             "version": 1}), "max_slots"),
    (record({"v": 2, "id": 1, "op": "extent_add", "group_id": TOKEN.hex(), "side": "server",
             "index": 32,
             "token": TOKEN.hex(), "size": 1}), "index"),
    (framed(b'{"v":2,"id":1,"op":"ping","v":2}'), "not valid JSON"),  # duplicate key
    (framed(b'{"v":2,"id":NaN,"op":"ping"}'), "not valid JSON"),
    (framed(b"[" * 20000), "not valid JSON"),
    (record({"v": 2, "id": 1, "op": "alloc", "size": int("9" * 40)}), "size"),
])
def test_malformed_requests_are_rejected(raw, why):
    with pytest.raises(proto.ProtoError, match=why):
        proto.decode_request(raw)


def test_error_reply_keeps_request_id():
    with pytest.raises(proto.ProtoError) as info:
        proto.decode_request(record({"v": 2, "id": 77, "op": "alloc", "size": -1}))
    assert info.value.req_id == 77


def test_oversized_encode_is_refused():
    with pytest.raises(ValueError):
        proto.encode_reply(1, status={"x": "y" * proto.MAX_BODY})
    items, cut = proto.fit_list([{"k": "v" * 100}] * 1000, 4096)
    assert cut and 0 < len(items) < 1000
    assert len(proto.encode_reply(1, status={"items": items})) < 4096 + 64


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_the_decoder(raw):
    try:
        proto.decode_request(raw)
    except proto.ProtoError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8),
                                                                     children, max_size=4),
    max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(proto.REQUESTS)), st.dictionaries(st.text(max_size=12), json_values,
                                                                  max_size=5))
def test_arbitrary_json_never_crashes_the_decoder(op, fields):
    try:
        request = proto.decode_request(record({"v": 2, "id": 1, "op": op, **fields}))
    except proto.ProtoError:
        return
    assert set(request.fields) == set(proto.REQUESTS[op])
