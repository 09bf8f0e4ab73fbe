"""Process-wide counters: connections per mode, fallbacks per reason, bytes, doorbells, polls."""

from __future__ import annotations

import collections
import weakref

_counters: collections.Counter = collections.Counter()
_fallbacks: collections.Counter = collections.Counter()
_live: "weakref.WeakSet" = weakref.WeakSet()


def count(name: str, n: int = 1) -> None:
    _counters[name] += n


def count_fallback(reason) -> None:
    _counters["connections_tcp"] += 1
    _fallbacks[getattr(reason, "name", str(reason))] += 1


def track(transport) -> None:
    """Register a live ISM transport so stats() and `smcish stat` can see it."""
    _live.add(transport)


def stats() -> dict:
    """Return a snapshot of the counters, including live connections' byte counts.

    Returns:
        dict with ``connections_ism``, ``connections_tcp``, ``fallbacks`` (reason -> count),
        ``bytes_sent``, ``bytes_received``, ``notifications`` (slot notifications queued),
        ``doorbells`` (eventfd writes to wake a peer's link group), ``poll_hits``,
        ``poll_misses`` (link group busy-polls), ``poll_colocated`` (polls that found the peer on
        our CPU and yielded to it), ``handshake_aborts``, ``migrations`` (optimistic
        connections that moved to TCP after sending, ``migrated_bytes`` resent), ``link_groups``, ``slots``
        (connections holding a slot) and ``live`` (number of open ISM connections).
    """
    from . import linkgroup

    totals = collections.Counter(_counters)
    live = _snapshot_live()
    for transport in live:
        for key, value in transport._counters().items():
            totals[key] += value
    groups = slots = 0
    for hub in linkgroup.live_hubs():
        try:
            hub_stats = hub.stats()
        except Exception:          # a hub closing under our feet (stat from another thread)
            continue
        groups += hub_stats["link_groups"]
        slots += hub_stats["slots"]
        totals["doorbells"] += hub_stats["doorbells"]
        totals["poll_hits"] += hub_stats["group_polls_hit"]
        totals["poll_misses"] += hub_stats["group_polls_missed"]
        totals["poll_colocated"] += hub_stats["group_polls_colocated"]
    out = {key: totals.get(key, 0) for key in (
        "connections_ism", "connections_tcp", "bytes_sent", "bytes_received", "notifications",
        "doorbells", "poll_hits", "poll_misses", "poll_colocated", "handshake_aborts", "migrations",
        "migrated_bytes")}
    out["fallbacks"] = dict(_fallbacks)
    out["live"] = len(live)
    out["link_groups"] = groups
    out["slots"] = slots
    return out


def _snapshot_live() -> list:
    # The device's endpoint thread calls connections() while the loop thread adds and drops
    # transports: copying a WeakSet can then fail with "changed size"; just try again.
    for _ in range(10):
        try:
            return list(_live)
        except RuntimeError:
            continue
    return []


def connections() -> list[dict]:
    """Describe this process's live ISM connections (for `python -m smcish stat`)."""
    out = []
    for transport in _snapshot_live():
        try:
            out.append(transport._describe())
        except Exception:          # a transport closing under our feet: skip it
            continue
    return out


def reset() -> None:
    """Zero every counter (tests and benchmarks)."""
    _counters.clear()
    _fallbacks.clear()
