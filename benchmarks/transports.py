"""The transports and loops under test: one small function per transport binds its four entry points.

Everything transport-specific lives here, so the workloads (workloads.py) are written once against
`Api(open_connection, start_server, create_connection, create_server)` called with `*addr`, where `addr`
is `(host, port)` for inet transports and `(path,)` for Unix sockets.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import os
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple


class Api(NamedTuple):
    """A transport's entry points, with asyncio's signatures (bound to the running loop where needed)."""

    open_connection: Callable[..., Any]  # (*addr, **kw) -> (StreamReader, StreamWriter)
    start_server: Callable[..., Any]  # (client_connected_cb, *addr, **kw) -> Server
    create_connection: Callable[..., Any]  # (protocol_factory, *addr, **kw) -> (transport, protocol)
    create_server: Callable[..., Any]  # (protocol_factory, *addr, **kw) -> Server


def tcp_api() -> Api:
    loop = asyncio.get_running_loop()
    return Api(asyncio.open_connection, asyncio.start_server, loop.create_connection, loop.create_server)


def unix_api() -> Api:
    loop = asyncio.get_running_loop()
    return Api(asyncio.open_unix_connection, asyncio.start_unix_server,
               loop.create_unix_connection, loop.create_unix_server)


def smcish_api() -> Api:
    import smcish  # the harness only starts smcish peers after probe() found these four

    return Api(smcish.open_connection, smcish.start_server, smcish.create_connection, smcish.create_server)


SMCISH_FUNCTIONS = ("open_connection", "start_server", "create_connection", "create_server")

# Disables smcish's adaptive busy-poll for the "polling off" latency target (smcish.Config.poll_us, from env
# SMCISH_POLL_US); --nopoll-env overrides it. The peers check the effective value (poll_fields below).
DEFAULT_NOPOLL_ENV = {"SMCISH_POLL_US": "0"}


@dataclass(frozen=True)
class Transport:
    name: str
    api: Callable[[], Api]
    family: str  # "inet" (host, port) | "unix" (path,)
    description: str
    env: dict[str, str] = field(default_factory=dict)  # set in both peer processes
    expect_mode: str | None = None  # what get_extra_info("smcish").mode must say, or None (not smcish)
    needs_smcish: bool = False
    kinds: frozenset[str] | None = None  # case kinds it runs by default (None: all)


def build_transports(nopoll_env: dict[str, str] | None = None) -> dict[str, Transport]:
    nopoll = dict(DEFAULT_NOPOLL_ENV if nopoll_env is None else nopoll_env)
    transports = [
        Transport("tcp", tcp_api, "inet", "asyncio TCP on 127.0.0.1"),
        Transport("unix", unix_api, "unix", "asyncio Unix domain socket"),
        Transport("smcish", smcish_api, "inet", "smcish over shared memory (must negotiate mode 'ism')",
                  expect_mode="ism", needs_smcish=True),
        Transport("smcish-fallback", smcish_api, "inet", "smcish forced to TCP fallback (SMCISH_DEVICE=none)",
                  env={"SMCISH_DEVICE": "none"}, expect_mode="tcp", needs_smcish=True),
        Transport("smcish-nopoll", smcish_api, "inet",
                  "smcish over shared memory, busy-poll off ("
                  + " ".join(f"{k}={v}" for k, v in nopoll.items()) + ")",
                  env=nopoll, expect_mode="ism", needs_smcish=True, kinds=frozenset({"latency"})),
    ]
    return {t.name: t for t in transports}


TRANSPORTS = build_transports()
LOOPS = ("asyncio", "uvloop")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop factory for `asyncio.Runner(loop_factory=...)`."""
    if name == "asyncio":
        return asyncio.new_event_loop
    if name == "uvloop":
        import uvloop

        return uvloop.new_event_loop
    raise ValueError(f"unknown loop {name!r}: use one of {', '.join(LOOPS)}")


def bind_args(transport: Transport, tmpdir: str, role: str) -> tuple[str] | tuple[str, int]:
    """Where a server of `transport` listens: an ephemeral 127.0.0.1 port, or a socket path in tmpdir."""
    if transport.family == "unix":
        return (os.path.join(tmpdir, f"{role}.sock"),)
    return ("127.0.0.1", 0)


def connect_args(transport: Transport, server: asyncio.Server) -> list[Any]:
    """The `*addr` a client passes to reach `server` (JSON-able)."""
    name = server.sockets[0].getsockname()
    if transport.family == "unix":
        return [name]
    return [name[0], name[1]]


# --- TLS (the tls.* cases) ---------------------------------------------------------------------------------

TLS_HOSTNAME = "localhost"  # the name in the server's certificate; the client verifies it (server_hostname)
TLS_CA_FILE = "ca.pem"  # the test CA's certificate: what the client trusts
TLS_SERVER_FILE = "server.pem"  # the server's private key and certificate chain


def write_tls_files(directory: str) -> dict[str, Any]:
    """A throw-away CA and a certificate for `TLS_HOSTNAME` (and 127.0.0.1) signed by it, written to
    `directory` (the harness does it once per run; the peers load the files by path). Returns what was made
    (for the JSON).

    Raises:
        ImportError: trustme is not installed (pip install trustme, in the bench extra).
    """
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert(TLS_HOSTNAME, "127.0.0.1")
    ca.cert_pem.write_to_path(os.path.join(directory, TLS_CA_FILE))
    cert.private_key_and_cert_chain_pem.write_to_path(os.path.join(directory, TLS_SERVER_FILE))
    return {"generator": f"trustme {getattr(trustme, '__version__', '?')}", "server_hostname": TLS_HOSTNAME,
            "key_type": "ECDSA (trustme default)", "client_verifies": True}


def server_ssl_context(directory: str) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(os.path.join(directory, TLS_SERVER_FILE))
    return context


def client_ssl_context(directory: str) -> ssl.SSLContext:
    """Verifies the server's certificate against the run's CA and its name against `TLS_HOSTNAME`."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=os.path.join(directory, TLS_CA_FILE))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    return context


def tls_of(obj: Any) -> dict[str, Any] | None:
    """{"version", "cipher"} of a TLS StreamWriter or transport, None when it is not TLS."""
    ssl_object = obj.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    cipher = ssl_object.cipher()
    return {"version": ssl_object.version(), "cipher": cipher[0] if cipher else None}


# --- smcish connection info ------------------------------------------------------------------------------

def mode_of(obj: Any) -> tuple[str, Any]:
    """(mode, reason) of a StreamWriter or transport: "ism"/"tcp" for smcish, "none" for a plain transport."""
    info = obj.get_extra_info("smcish")
    if info is None:
        return "none", None
    return str(getattr(info, "mode", "?")), getattr(info, "reason", None)


def _jsonable(value: Any, depth: int = 0) -> Any:
    if isinstance(value, enum.Enum):
        return value.name
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if depth < 3 and isinstance(value, dict):
        return {str(k): _jsonable(v, depth + 1) for k, v in value.items()}
    if depth < 3 and isinstance(value, (list, tuple)):
        return [_jsonable(v, depth + 1) for v in value]
    if depth < 3 and dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name), depth + 1) for f in dataclasses.fields(value)}
    return repr(value)


def describe_info(obj: Any) -> dict[str, Any] | None:
    """Every public, non-callable field of `get_extra_info("smcish")` (mode, reason, ring size, poll
    budget...)."""
    info = obj.get_extra_info("smcish")
    if info is None:
        return None
    described: dict[str, Any]
    if dataclasses.is_dataclass(info):
        described = _jsonable(info)
        return described
    if hasattr(info, "_asdict"):
        described = _jsonable(info._asdict())
        return described
    if isinstance(info, dict):
        described = _jsonable(info)
        return described
    fields = {}
    for name in dir(info):
        if name.startswith("_"):
            continue
        try:
            value = getattr(info, name)
        except Exception as exc:  # noqa: BLE001 - a property that fails is worth seeing, not worth a crash
            value = f"<error: {exc!r}>"
        if not callable(value):
            fields[name] = _jsonable(value)
    return fields


def poll_fields(info: dict[str, Any] | None) -> dict[str, Any]:
    """The numeric fields of an smcish info dict that look like a poll budget."""
    if not info:
        return {}
    return {k: v for k, v in info.items() if "poll" in k.lower() and isinstance(v, (int, float))}


def smcish_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("SMCISH_")}


def smcish_stats() -> dict[str, Any] | None:
    """smcish.stats() of this process (doorbells, polls, fallbacks...), if smcish is loaded here."""
    stats = getattr(sys.modules.get("smcish"), "stats", None)
    if not callable(stats):
        return None
    try:
        described: dict[str, Any] = _jsonable(stats())
    except Exception as exc:  # noqa: BLE001 - reported in the results, never worth a failed measurement
        return {"error": repr(exc)}
    return described


def smcish_config() -> dict[str, Any] | None:
    """The effective smcish.Config.from_env() of this process (ring size, poll budget...), if smcish is
    loaded."""
    from_env = getattr(getattr(sys.modules.get("smcish"), "Config", None), "from_env", None)
    if not callable(from_env):
        return None
    try:
        described: dict[str, Any] = _jsonable(from_env())
    except Exception as exc:  # noqa: BLE001 - reported in the results (a bad SMCISH_* variable...)
        return {"error": repr(exc)}
    return described


def stats_delta(before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any] | None:
    """after - before for every numeric counter (recursively); other values as in `after`."""
    if not isinstance(before, dict) or not isinstance(after, dict):
        return None
    out: dict[str, Any] = {}
    for key, value in after.items():
        old = before.get(key)
        if isinstance(value, (int, float)) and isinstance(old, (int, float)) and not isinstance(value, bool):
            out[key] = value - old
        elif isinstance(value, dict) and isinstance(old, dict):
            out[key] = stats_delta(old, value)
        else:
            out[key] = value
    return out
