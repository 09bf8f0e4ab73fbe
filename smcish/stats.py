"""Process-wide counters: connections per mode, fallbacks per reason, bytes, doorbells, polls.

Nothing here runs per message: counters are bumped when a connection is set up, falls back, ends,
when a writer finds its ring full, and when a link group goes away; byte and doorbell counts
are read from the rings and groups themselves when someone asks (``stats()``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import weakref
from typing import Any

from . import policy as _policy

_counters: collections.Counter[str] = collections.Counter()
_fallbacks: collections.Counter[str] = collections.Counter()
_live: weakref.WeakSet[Any] = weakref.WeakSet()          # SmcTransport (not imported: a cycle)

log = logging.getLogger("smcish.fallback")

# One INFO line per (reason, peer) per window; the table of keys is bounded (oldest dropped).
LOG_WINDOW = 60.0
LOG_KEYS = 1024
_logged: collections.OrderedDict[tuple[str, str | None, bool], float] = collections.OrderedDict()
_log_lock = threading.Lock()

# Per reason: what an operator can do about it (one line; the INFO log and docs/operations.md).
REMEDIES: dict[str, str] = {
    "NO_MEMORY": "shared memory ran out: raise ismd --quota/--total-memory, free /dev/shm, "
                 "or lower SMCISH_MAX_RING_SIZE",
    "ATTACH_FAILED": "the link group could not be opened or died: check that both processes "
                     "use the same device (SMCISH_DEVICE) and that the peer is alive",
    "QUOTA": "the device refused memory: raise ismd --quota (per uid) or --total-memory, or "
             "close idle connections",
    "NO_FD": "out of file descriptors: raise RLIMIT_NOFILE (ulimit -n)",
    "NO_PORT": "no client port free for that address: widen net.ipv4.ip_local_port_range or "
               "reuse connections (TIME_WAIT)",
    "TIMEOUT": "the peer's event loop was busy: raise SMCISH_HANDSHAKE_TIMEOUT or unblock the "
               "peer's loop",
    "NO_DEVICE": "no ISM device reachable: set SMCISH_DEVICE or start ismd",
    "DISABLED_BY_POLICY": "shared memory is off by configuration: SMCISH_NEGOTIATE=never, a "
                          "tcp rule or default in SMCISH_POLICY / the config file, or the "
                          "set_policy() callable (docs/policy.md)",
    "LEARNED_DECLINE": "this destination kept declining or timing out: fix the peer (its own "
                       "log names the reason), wait decline_ttl, or set decline_after = 0 in "
                       "[policy] (docs/policy.md)",
    "LEARNED_SHORT_LIVED": "connections to this destination were short-lived (short_lived_ms in "
                           "[policy]): expected; set short_lived_ms = 0 to always accelerate",
    "PEER_NOT_ADVERTISED": "the server is not an smcish listener (or not reachable through the "
                           "same device/namespace): start it with smcish or `python -m smcish run`",
    "GID_MISMATCH": "the peers use different sharing domains: give both the same device "
                    "(SMCISH_DEVICE, ismd --gid)",
    "VERSION_MISMATCH": "the peers run smcish versions with no protocol in common: upgrade "
                        "the older one",
    "PROTOCOL_ERROR": "the peer broke the set-up protocol: upgrade both sides; report it if "
                      "they match",
    "PEER_DECLINED": "the peer declined with a reason this version does not know: upgrade "
                     "this side",
    "PEER_NOT_SMCISH": "the peer is plain TCP (not smcish, or the client has no device): run "
                       "it with smcish to accelerate",
    "INTERNAL": "internal error (connect failed or cancelled during the set-up): see the "
                "DEBUG log of logger 'smcish'",
}


def count(name: str, n: int = 1) -> None:
    _counters[name] += n


def count_fallback(reason: Any, peer: Any = None, server: bool = False) -> None:
    """A connection went (or stays) TCP for ``reason``.

    ``peer``: the other end's address, ``(host, port)`` or a string, or a transport (its
    ``peername``, looked up only when logging), or None; ``server``: we
    are the accepting side (the client's port is ephemeral, so only its host names it in the
    log). Logs one INFO line per (reason, peer) per ``LOG_WINDOW`` seconds (``log_fallback``).
    """
    _counters["connections_tcp"] += 1
    _fallbacks[getattr(reason, "name", str(reason))] += 1
    if not server and reason in _policy.LEARNABLE:
        _policy.note_outcome(_address_of(peer), reason)
    log_fallback(reason, peer, server)


def _address_of(peer: Any) -> Any:
    if hasattr(peer, "get_extra_info"):
        try:
            return peer.get_extra_info("peername")
        except Exception:                     # noqa: BLE001 - a closed uvloop handle
            return None
    return peer


def _peer_text(peer: Any, server: bool) -> str | None:
    if peer is None:
        return None
    if hasattr(peer, "get_extra_info"):      # a transport: its peer's address, looked up only now
        try:
            peer = peer.get_extra_info("peername")
        except Exception:                     # noqa: BLE001 - a closed uvloop handle: no address
            return None
        if peer is None:
            return None
    if isinstance(peer, (tuple, list)) and peer:
        host = str(peer[0])
        if server or len(peer) < 2:
            return host
        return f"[{host}]:{peer[1]}" if ":" in host else f"{host}:{peer[1]}"
    return str(peer)


def log_fallback(reason: Any, peer: Any = None, server: bool = False) -> bool:
    """Log why a connection fell back to TCP and the remedy, at most once per (reason, peer)
    per ``LOG_WINDOW`` seconds on logger ``smcish.fallback`` at INFO. True if it logged."""
    if not log.isEnabledFor(logging.INFO):
        return False
    name = getattr(reason, "name", str(reason))
    where = _peer_text(peer, server)
    key = (name, where, server)
    now = time.monotonic()
    with _log_lock:
        last = _logged.get(key)
        if last is not None and now - last < LOG_WINDOW:
            return False
        _logged[key] = now
        _logged.move_to_end(key)
        while len(_logged) > LOG_KEYS:
            _logged.popitem(last=False)
    if where is None:
        side = "a connection"
    elif server:
        side = f"a connection from {where}"
    else:
        side = f"a connection to {where}"
    description = getattr(reason, "description", None)
    log.info("smcish: %s fell back to TCP: %s%s; remedy: %s [once per %.0f s per reason and peer]",
             side, name, f" ({description})" if description else "",
             REMEDIES.get(name, "see docs/handshake.md section 3"), LOG_WINDOW)
    return True


def group_closed(group: Any) -> None:
    """A link group goes away: keep its doorbell and poll counts (stats() reads live groups)."""
    try:
        if group.closed:
            return
        counts = {"doorbells": group.doorbells, "poll_hits": group.spin_hits,
                  "poll_misses": group.spin_misses, "poll_colocated": group.spin_colocated}
    except Exception:          # noqa: BLE001 - counters must never break a teardown
        return
    for key, value in counts.items():
        _counters[key] += value


def track(transport: Any) -> None:
    """Register a live ISM transport so stats() and `smcish stat` can see it."""
    _live.add(transport)


def _folded(transport: Any) -> bool:
    # The transport's ring counters were added to _counters already (transport._stats_final, at
    # connection_lost or at the ring's release, whichever came first).
    return bool(getattr(transport, "_stats_done", False))


def stats() -> dict[str, Any]:
    """Return a snapshot of the counters, including live connections' byte counts.

    Returns:
        dict with ``connections_ism``, ``connections_tcp``, ``fallbacks`` (reason -> count),
        ``bytes_sent``, ``bytes_received``, ``notifications`` (slot notifications queued),
        ``doorbells`` (eventfd writes to wake a peer's link group), ``poll_hits``,
        ``poll_misses`` (link group busy-polls), ``poll_colocated`` (polls that found the peer on
        our CPU and yielded to it), ``handshake_aborts``, ``migrations`` (optimistic
        connections that moved to TCP after sending, ``migrated_bytes`` resent), ``ring_full``
        (times a writer found its send ring full), ``link_groups``, ``slots``
        (connections holding a slot), ``live`` (number of open ISM connections) and
        ``policy_skipped`` (destinations the learned policy skips now, ``policy.learned()``).
        Every count but ``link_groups``, ``slots``, ``live`` and ``policy_skipped`` only grows.
    """
    from . import linkgroup

    totals = collections.Counter(_counters)
    live = 0
    for transport in _snapshot_live():
        if _folded(transport):
            continue
        try:
            counters = transport._counters()
        except Exception:          # noqa: BLE001 - a transport closing under our feet
            continue
        for key, value in counters.items():
            totals[key] += value
        if not getattr(transport, "_conn_lost", 0):
            live += 1
    groups = slots = 0
    for hub in linkgroup.live_hubs():
        try:
            hub_stats = hub.stats()
        except Exception:          # noqa: BLE001 - a hub closing under our feet (another thread)
            continue
        groups += hub_stats["link_groups"]
        slots += hub_stats["slots"]
        totals["doorbells"] += hub_stats["doorbells"]
        totals["poll_hits"] += hub_stats["group_polls_hit"]
        totals["poll_misses"] += hub_stats["group_polls_missed"]
        totals["poll_colocated"] += hub_stats["group_polls_colocated"]
    out: dict[str, Any] = {key: totals.get(key, 0) for key in (
        "connections_ism", "connections_tcp", "bytes_sent", "bytes_received", "notifications",
        "doorbells", "poll_hits", "poll_misses", "poll_colocated", "handshake_aborts", "migrations",
        "migrated_bytes", "ring_full")}
    out["fallbacks"] = dict(_fallbacks)
    out["live"] = live
    out["link_groups"] = groups
    out["slots"] = slots
    out["policy_skipped"] = len(_policy.learned()) if _policy._skipped else 0
    return out


def _snapshot_live() -> list[Any]:
    # The device's endpoint thread calls connections() while the loop thread adds and drops
    # transports: copying a WeakSet can then fail with "changed size"; just try again.
    for _ in range(10):
        try:
            return list(_live)
        except RuntimeError:
            continue
    return []


def connection_rows() -> list[dict[str, Any]]:
    """Describe this process's live ISM connections, one dict per connection."""
    out = []
    for transport in _snapshot_live():
        try:
            out.append(transport._describe())
        except Exception:          # noqa: BLE001 - a transport closing under our feet: skip it
            continue
    return out


def connections() -> list[dict[str, Any]]:
    """What this process tells `python -m smcish stat` (the device's info provider; called
    from the device's endpoint thread).

    The first item is this process's record, ``{"kind": "process", "schema": 1, "stats":
    stats(), "connections": N}`` (a few hundred bytes; first, so that it survives when the
    endpoint cuts the reply to its size limit); then one row per live ISM connection
    (``connection_rows()``), which carry no ``"kind"``.
    """
    rows = connection_rows()
    try:
        record: dict[str, Any] = {"kind": "process", "schema": 1, "stats": stats(),
                                  "connections": len(rows)}
    except Exception as exc:   # noqa: BLE001 - the rows are still worth having
        record = {"kind": "process", "schema": 1, "error": f"stats failed: {exc!r}"}
    return [record, *rows]


def reset() -> None:
    """Zero every counter (tests and benchmarks)."""
    _counters.clear()
    _fallbacks.clear()
    with _log_lock:
        _logged.clear()
