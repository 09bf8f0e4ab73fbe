"""The device control protocol codec: framing, versioning, op schemas, strict validation (no I/O).

Spoken between a client and ismd, between a process and a peer's embedded endpoint, and on the
peer channels ismd brokers. Transport: one request or reply per SOCK_SEQPACKET record (fds passed
with SCM_RIGHTS stay attached to the record they belong to, and a bad record never
desynchronises the stream).

Record: ``u32 big-endian body length | body``; the length must equal the rest of the record and
be at most ``MAX_BODY`` (64 KiB). Body: a UTF-8 JSON object.
Request: ``{"v": 2, "id": <int>, "op": <name>, <fields of that op>}``.
Reply:   ``{"v": 2, "id": <same>, "ok": true, <result fields>}`` or
         ``{"v": 2, "id": <same>, "ok": false, "error": <IsmError subclass>, "message": <text>}``.
Every field of every op is declared in ``REQUESTS`` / ``REPLIES`` below: a missing, unknown,
duplicate or ill-typed field is a violation (ints are never bools or floats, binary values are
exactly 32 lowercase hex digits). Fds travel only where declared: with the reply to the ops in
``REPLY_FDS`` and with the requests in ``REQUEST_FDS``; any other record carrying fds is refused.
``PEER_OPS`` are the ops one process's endpoint serves for another (link groups).
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, NoReturn

from .errors import ERRORS, DeviceProtocolError, IsmError

# 2: socket-bound discovery and peer ops (v1 had address lookups and claims).
VERSION = 2
MAX_BODY = 64 * 1024
HEADER = struct.Struct(">I")
MAX_RECORD = HEADER.size + MAX_BODY
MAX_ID = (1 << 53) - 1
MAX_SIZE = 1 << 40
MAX_MESSAGE_TEXT = 1024


class ProtoError(Exception):
    """A malformed record. ``req_id`` is the request id when it could be read (else 0)."""

    def __init__(self, message: str, req_id: int = 0) -> None:
        super().__init__(message)
        self.req_id = req_id


# --- field validators: each returns the (possibly normalised) value or raises ValueError ------

def _int(lo: int, hi: int) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if type(value) is not int or not lo <= value <= hi:
            raise ValueError(f"must be an integer in [{lo}, {hi}]")
        return value
    return check


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise ValueError("must be true or false")
    return value


_HEX16 = re.compile(r"[0-9a-f]{32}")


def _hex16(value: Any) -> bytes:
    if type(value) is not str or not _HEX16.fullmatch(value):
        raise ValueError("must be 32 lowercase hex digits")
    return bytes.fromhex(value)


def _access(value: Any) -> str:
    if value not in ("r", "rw") or type(value) is not str:
        raise ValueError("must be 'r' or 'rw'")
    return value


_HOST = re.compile(r"[0-9A-Za-z.:%_\-]{1,255}")


def _host(value: Any) -> str:
    if type(value) is not str or not _HOST.fullmatch(value):
        raise ValueError("must be an address or host name (1..255 of [0-9A-Za-z.:%_-])")
    return value


def _text(value: Any) -> str:
    if type(value) is not str or len(value) > MAX_MESSAGE_TEXT:
        raise ValueError(f"must be a string of at most {MAX_MESSAGE_TEXT} characters")
    return value


def _kind(value: Any) -> str:
    # "guest": ismd's guest agent in a virtual machine (ism_backend.vmguest, docs/vm.md)
    if type(value) is not str or value not in ("embedded", "daemon", "guest"):
        raise ValueError("must be 'embedded', 'daemon' or 'guest'")
    return value


def _side(value: Any) -> str:
    if type(value) is not str or value not in ("client", "server"):
        raise ValueError("must be 'client' or 'server'")
    return value


def _dict(value: Any) -> dict[str, Any]:
    if type(value) is not dict:
        raise ValueError("must be an object")
    return value


def _list_of_dicts(value: Any) -> list[dict[str, Any]]:
    if type(value) is not list or any(type(item) is not dict for item in value):
        raise ValueError("must be a list of objects")
    return value


_size = _int(1, MAX_SIZE)
_offset = _int(0, MAX_SIZE)
_handle = _int(1, MAX_ID)
_port = _int(1, 65535)
_uid = _int(0, (1 << 32) - 2)
_gid = _uid
_pid = _int(0, (1 << 31) - 1)
_inode = _int(1, (1 << 64) - 1)

Schema = dict[str, Callable[[Any], Any]]

# Peer ops: op -> (request fields, reply fields). Served by the endpoint handler of the process
# addressed by ``Device.peer_request``; the semantics are smcish's (docs/design.md section 2).
PEER_OPS: dict[str, tuple[Schema, Schema]] = {
    "group_open": (
        {"group_id": _hex16, "hub_id": _hex16, "token": _hex16, "size": _size,
         "max_slots": _int(1, 1 << 20), "version": _int(0, (1 << 32) - 1)},
        {"token": _hex16, "size": _size, "max_slots": _int(1, 1 << 20)}),
    # side: the RECEIVER's side of the group ("client" or "server"). Both sides of a group share
    # its id, and one process may hold both (a connection to itself).
    "extent_add": ({"group_id": _hex16, "side": _side, "index": _int(1, 31), "token": _hex16,
                    "size": _size}, {}),
    "extent_remove": ({"group_id": _hex16, "side": _side, "index": _int(1, 31)}, {}),
    "group_close": ({"group_id": _hex16, "side": _side}, {}),
}

_listener_reply = {"found": _bool, "endpoint_id": _hex16, "hub_id": _hex16, "pid": _pid,
                   "uid": _uid}

# op -> {field: validator}. All fields are required; nothing else is allowed.
REQUESTS: dict[str, Schema] = {
    "hello": {"endpoint_id": _hex16},
    "ping": {},
    "alloc": {"size": _size},
    "reuse": {"size": _size},
    "attach": {"token": _hex16, "access": _access},
    "detach": {"attachment": _handle},
    "free": {"token": _hex16, "keep": _bool},
    "release": {"region": _handle},
    "grant": {"token": _hex16, "uid": _uid, "access": _access},
    "revoke": {"token": _hex16, "uid": _uid},
    "advertise": {"hub_id": _hex16},
    "withdraw": {"handle": _handle},
    "find_listener": {"inode": _inode},
    "find_remote_listener": {"host": _host, "port": _port},
    "verify_remote_peer": {"inode": _inode, "endpoint_id": _hex16},
    "release_remote_claim": {"inode": _inode},
    "serve_endpoint": {},
    "connect_endpoint": {"endpoint_id": _hex16},
    "take_peer": {"endpoint_id": _hex16, "pid": _pid, "uid": _uid, "gid": _gid},
    "info": {},
    "status": {},
    **{op: schemas[0] for op, schemas in PEER_OPS.items()},
}

_region_reply = {"token": _hex16, "region": _handle, "size": _size, "offset": _offset}
REPLIES: dict[str, Schema] = {
    "hello": {"kind": _kind, "gid": _hex16, "endpoint_id": _hex16, "pid": _pid, "uid": _uid},
    "ping": {},
    "alloc": _region_reply,
    "reuse": _region_reply,
    "attach": {"attachment": _handle, "size": _size, "offset": _offset},
    "detach": {},
    "free": {},
    "release": {},
    "grant": {},
    "revoke": {},
    "advertise": {"handle": _handle},
    "withdraw": {},
    "find_listener": _listener_reply,
    "find_remote_listener": _listener_reply,
    "verify_remote_peer": {"verified": _bool},
    "release_remote_claim": {},
    "serve_endpoint": {},
    "connect_endpoint": {"pid": _pid, "uid": _uid, "gid": _gid},
    "take_peer": {},
    "info": {"pid": _pid, "endpoint_id": _hex16, "connections": _list_of_dicts},
    "status": {"status": _dict},
    **{op: schemas[1] for op, schemas in PEER_OPS.items()},
}

# fds attached to a successful reply: (memory fd, doorbell eventfd), a fresh doorbell, or the
# requester's end of a brokered peer channel.
REPLY_FDS: dict[str, int] = {"alloc": 2, "reuse": 1, "attach": 2, "connect_endpoint": 1}
# fds a request may carry (anything else with fds is refused): the socket the device reads its
# facts from, or (ismd -> an endpoint channel) the target's end of a brokered peer channel.
REQUEST_FDS: dict[str, int] = {"advertise": 1, "find_remote_listener": 1,
                               "verify_remote_peer": 1, "take_peer": 1}


@dataclass(frozen=True)
class Request:
    """A decoded, validated request (binary fields as bytes)."""

    op: str
    id: int
    fields: dict[str, Any]


# --- encoding ------------------------------------------------------------------------------

def _wire(value: Any) -> Any:
    return value.hex() if isinstance(value, (bytes, bytearray)) else value


def _frame(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    if len(body) > MAX_BODY:
        raise ValueError(f"control message of {len(body)} bytes exceeds {MAX_BODY}")
    return HEADER.pack(len(body)) + body


def encode_request(op: str, req_id: int, **fields: Any) -> bytes:
    """Encode a request; bytes values become hex.

    Raises:
        ValueError: unknown op, or fields that would be refused (naming the field).
    """
    schema = REQUESTS.get(op)
    if schema is None:
        raise ValueError(f"unknown op {op!r}")
    wire = {name: _wire(value) for name, value in fields.items()}
    if set(wire) != set(schema):
        raise ValueError(f"{op} takes exactly {sorted(schema)}, got {sorted(wire)}")
    for name, check in schema.items():
        try:
            check(wire[name])
        except ValueError as exc:
            raise ValueError(f"{op}: field {name!r} {exc}") from None
    return _frame({"v": VERSION, "id": req_id, "op": op, **wire})


def check_reply(op: str, fields: dict[str, Any]) -> dict[str, Any]:
    """Validate result fields about to be sent as the reply to ``op`` (bytes become hex).

    Returns:
        The wire form of the fields.
    Raises:
        ValueError: naming the offending field (a handler bug).
    """
    schema = REPLIES[op]
    wire = {name: _wire(value) for name, value in fields.items()}
    if set(wire) != set(schema):
        raise ValueError(f"reply to {op} must have exactly {sorted(schema)}, got {sorted(wire)}")
    for name, check in schema.items():
        try:
            check(wire[name])
        except ValueError as exc:
            raise ValueError(f"reply to {op}: field {name!r} {exc}") from None
    return wire


def encode_result(op: str, req_id: int, fields: dict[str, Any]) -> bytes:
    """Encode a successful reply to ``op`` after validating it (``check_reply``)."""
    return _frame({"v": VERSION, "id": req_id, "ok": True, **check_reply(op, fields)})


def encode_reply(req_id: int, **fields: Any) -> bytes:
    """Encode a successful reply without validation (tests, fakes); prefer ``encode_result``."""
    return _frame({"v": VERSION, "id": req_id, "ok": True,
                   **{name: _wire(value) for name, value in fields.items()}})


def encode_error(req_id: int, error: IsmError | str, message: str | None = None) -> bytes:
    """Encode an error reply; names outside ``ERRORS`` are sent as ``IsmError``."""
    if isinstance(error, IsmError):
        name, text = type(error).__name__, str(error)
    else:
        name, text = error, message or ""
    if name not in ERRORS:
        name = "IsmError"
    return _frame({"v": VERSION, "id": req_id, "ok": False, "error": name,
                   "message": text[:MAX_MESSAGE_TEXT]})


def fit_list(items: Iterable[object], budget: int) -> tuple[list[Any], bool]:
    """Longest prefix of ``items`` whose JSON fits in ``budget`` bytes; (prefix, truncated).

    Items come back JSON-clean (non-JSON values as their ``str``; unencodable items dropped).
    """
    out: list[Any] = []
    used = 2
    for item in items:
        try:
            text = json.dumps(item, separators=(",", ":"), default=str, allow_nan=False)
        except (ValueError, TypeError, RecursionError):
            continue
        if used + len(text) + 1 > budget:
            return out, True
        out.append(json.loads(text))
        used += len(text) + 1
    return out, False


# --- decoding ------------------------------------------------------------------------------

def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not allowed")


def _parse(record: bytes) -> dict[str, Any]:
    if len(record) < HEADER.size:
        raise ProtoError("record shorter than its length prefix")
    (length,) = HEADER.unpack_from(record)
    if length > MAX_BODY:
        raise ProtoError(f"body length {length} exceeds {MAX_BODY}")
    if length != len(record) - HEADER.size:
        raise ProtoError(f"length prefix {length} != body of {len(record) - HEADER.size} bytes")
    try:
        obj = json.loads(record[HEADER.size:].decode("utf-8"),
                         object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)
    except (ValueError, RecursionError, UnicodeDecodeError, TypeError) as exc:
        raise ProtoError(f"body is not valid JSON: {type(exc).__name__}") from None
    if type(obj) is not dict:
        raise ProtoError("body is not a JSON object")
    req_id = obj.get("id")
    if type(req_id) is not int or not 0 <= req_id <= MAX_ID:
        raise ProtoError("missing or invalid id")
    if obj.get("v") != VERSION or type(obj.get("v")) is not int:
        raise ProtoError(f"unsupported protocol version {obj.get('v')!r} (this side speaks "
                         f"{VERSION}): upgrade smcish/ismd so both match", req_id)
    return obj


def _fields(obj: dict[str, Any], schema: Schema, skip: tuple[str, ...], what: str,
            req_id: int) -> dict[str, Any]:
    names = set(obj) - set(skip)
    if names != set(schema):
        missing = sorted(set(schema) - names)
        unknown = sorted(names - set(schema))
        raise ProtoError(f"{what}: missing {missing} unknown {unknown[:5]}", req_id)
    out: dict[str, Any] = {}
    for name, check in schema.items():
        try:
            out[name] = check(obj[name])
        except ValueError as exc:
            raise ProtoError(f"{what}: field {name!r} {exc}", req_id) from None
    return out


def decode_request(record: bytes) -> Request:
    """Parse and validate one request record.

    Raises:
        ProtoError: anything malformed (``req_id`` set when the id was readable).
    """
    obj = _parse(record)
    req_id = obj["id"]
    op = obj.get("op")
    if type(op) is not str or op not in REQUESTS:
        raise ProtoError(f"unknown op {str(op)[:32]!r}", req_id)
    return Request(op, req_id, _fields(obj, REQUESTS[op], ("v", "id", "op"), op, req_id))


def decode_reply(record: bytes, op: str, req_id: int) -> dict[str, Any]:
    """Parse and validate the reply to request ``req_id`` of kind ``op``.

    Returns:
        The validated result fields (binary fields as bytes).
    Raises:
        IsmError subclass: the device refused (error reply).
        DeviceProtocolError: the reply is malformed or answers another request.
    """
    try:
        obj = _parse(record)
    except ProtoError as exc:
        raise DeviceProtocolError(f"malformed reply to {op}: {exc}") from None
    ok = obj.get("ok")
    # id 0 is a connection-level refusal (e.g. the uid policy), sent before any request was read.
    if obj["id"] != req_id and not (obj["id"] == 0 and ok is False):
        raise DeviceProtocolError(f"reply id {obj['id']} does not answer request {req_id}")
    if ok is False:
        try:
            fields = _fields(obj, {"error": _text, "message": _text}, ("v", "id", "ok"), op, req_id)
        except ProtoError as exc:
            raise DeviceProtocolError(f"malformed error reply to {op}: {exc}") from None
        raise ERRORS.get(fields["error"], DeviceProtocolError)(fields["message"])
    if ok is not True:
        raise DeviceProtocolError(f"reply to {op} lacks ok=true/false")
    try:
        return _fields(obj, REPLIES[op], ("v", "id", "ok"), op, req_id)
    except ProtoError as exc:
        raise DeviceProtocolError(f"malformed reply to {op}: {exc}") from None
