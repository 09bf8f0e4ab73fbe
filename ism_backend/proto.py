"""The device control protocol codec: framing, versioning and strict validation (no I/O).

Used between a client and ismd, and between embedded peers and a process's endpoint. Transport:
one request or reply per SOCK_SEQPACKET record (so fds passed with SCM_RIGHTS stay attached to
the reply they belong to, and a bad record never desynchronises the stream).

Record: ``u32 big-endian body length | body``; the length must equal the rest of the record and
be at most ``MAX_BODY`` (64 KiB). Body: a UTF-8 JSON object.
Request: ``{"v": 1, "id": <int>, "op": <name>, <fields of that op>}``.
Reply:   ``{"v": 1, "id": <same>, "ok": true, <result fields>}`` or
         ``{"v": 1, "id": <same>, "ok": false, "error": <IsmError subclass>, "message": <text>}``.
Every field of every op is declared in ``REQUESTS`` / ``REPLIES`` below: a missing, unknown,
duplicate or ill-typed field is a violation (ints are never bools or floats, binary values are
exactly 32 lowercase hex digits). Fds expected with a reply are declared in ``REPLY_FDS``.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable

from .device import ERRORS, DeviceProtocolError, IsmError

VERSION = 1
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


def _role(value: Any) -> str:
    if value not in ("client", "server") or type(value) is not str:
        raise ValueError("must be 'client' or 'server'")
    return value


def _kind(value: Any) -> str:
    if value not in ("embedded", "daemon"):
        raise ValueError("must be 'embedded' or 'daemon'")
    return value


def _dict(value: Any) -> dict:
    if type(value) is not dict:
        raise ValueError("must be an object")
    return value


def _list_of_dicts(value: Any) -> list:
    if type(value) is not list or any(type(item) is not dict for item in value):
        raise ValueError("must be a list of objects")
    return value


_size = _int(1, MAX_SIZE)
_offset = _int(0, MAX_SIZE)
_handle = _int(1, MAX_ID)
_port = _int(1, 65535)
_uid = _int(0, (1 << 32) - 2)
_pid = _int(0, (1 << 31) - 1)

# op -> {field: validator}. All fields are required; nothing else is allowed.
REQUESTS: dict[str, dict[str, Callable[[Any], Any]]] = {
    "hello": {},
    "ping": {},
    "alloc": {"size": _size},
    "reuse": {"size": _size},
    "attach": {"token": _hex16, "access": _access},
    "detach": {"attachment": _handle},
    "free": {"token": _hex16, "keep": _bool},
    "release": {"region": _handle},
    "grant": {"token": _hex16, "uid": _uid, "access": _access},
    "revoke": {"token": _hex16, "uid": _uid},
    "advertise": {"host": _host, "port": _port},
    "withdraw": {"handle": _handle},
    "lookup": {"host": _host, "port": _port},
    "add_intent": {"local_port": _port, "remote_host": _host, "remote_port": _port},
    "remove_intent": {"handle": _handle},
    "has_intent": {"peer_port": _port, "local_host": _host, "local_port": _port},
    "claim": {"local_port": _port, "remote_host": _host, "remote_port": _port, "role": _role},
    "release_claim": {"handle": _handle},
    "info": {},
    "status": {},
}

_region_reply = {"token": _hex16, "region": _handle, "size": _size, "offset": _offset}
REPLIES: dict[str, dict[str, Callable[[Any], Any]]] = {
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
    "lookup": {"found": _bool},
    "add_intent": {"handle": _handle},
    "remove_intent": {},
    "has_intent": {"found": _bool},
    "claim": {"handle": _int(0, MAX_ID)},  # 0: not claimed (None)
    "release_claim": {},
    "info": {"pid": _pid, "endpoint_id": _hex16, "connections": _list_of_dicts},
    "status": {"status": _dict},
}

# fds attached to a successful reply: (memory fd, doorbell eventfd) or just a fresh doorbell.
REPLY_FDS: dict[str, int] = {"alloc": 2, "reuse": 1, "attach": 2}


@dataclass(frozen=True)
class Request:
    op: str
    id: int
    fields: dict[str, Any]


# --- encoding ------------------------------------------------------------------------------

def _wire(value: Any) -> Any:
    return value.hex() if isinstance(value, (bytes, bytearray)) else value


def _frame(obj: dict) -> bytes:
    body = json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()
    if len(body) > MAX_BODY:
        raise ValueError(f"control message of {len(body)} bytes exceeds {MAX_BODY}")
    return HEADER.pack(len(body)) + body


def encode_request(op: str, req_id: int, **fields: Any) -> bytes:
    """Encode a request; bytes values become hex. Raises ValueError if it would be invalid."""
    schema = REQUESTS[op]
    wire = {name: _wire(value) for name, value in fields.items()}
    if set(wire) != set(schema):
        raise ValueError(f"{op} takes exactly {sorted(schema)}")
    for name, check in schema.items():
        check(wire[name])
    return _frame({"v": VERSION, "id": req_id, "op": op, **wire})


def encode_reply(req_id: int, **fields: Any) -> bytes:
    return _frame({"v": VERSION, "id": req_id, "ok": True,
                   **{name: _wire(value) for name, value in fields.items()}})


def encode_error(req_id: int, error: IsmError | str, message: str | None = None) -> bytes:
    if isinstance(error, IsmError):
        name, text = type(error).__name__, str(error)
    else:
        name, text = error, message or ""
    if name not in ERRORS:
        name = "IsmError"
    return _frame({"v": VERSION, "id": req_id, "ok": False, "error": name,
                   "message": text[:MAX_MESSAGE_TEXT]})


def fit_list(items: list, budget: int) -> tuple[list, bool]:
    """Longest prefix of ``items`` whose JSON fits in ``budget`` bytes; (prefix, truncated).

    Items come back JSON-clean (non-JSON values as their ``str``; unencodable items dropped).
    """
    out: list = []
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

def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key")
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _parse(record: bytes) -> dict:
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


def _fields(obj: dict, schema: dict, skip: tuple[str, ...], what: str, req_id: int) -> dict:
    names = set(obj) - set(skip)
    if names != set(schema):
        missing = sorted(set(schema) - names)
        unknown = sorted(names - set(schema))
        raise ProtoError(f"{what}: missing {missing} unknown {unknown[:5]}", req_id)
    out = {}
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
