"""Metrics in Prometheus text exposition format 0.0.4 and as JSON, from ``stats()``.

``metrics_text()`` and ``metrics_json()`` describe this process; ``python -m smcish stat
--prometheus`` / ``--json`` the same for every process on the device (``render_text`` with a
``pid`` label). Every value comes from one ``stats()`` snapshot: nothing here is on a data path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from typing import Any

from .clc import DeclineReason

# (name, type, help, label name or None, samples: stats -> [(label value, value)] or value)
Stats = dict[str, Any]
_Family = tuple[str, str, str, "str | None", Callable[[Stats], Any]]


def _fallbacks(st: Stats) -> list[tuple[str, int]]:
    seen = dict(st.get("fallbacks") or {})
    out = [(reason.name, int(seen.pop(reason.name, 0))) for reason in DeclineReason]
    # Reasons this version does not know (a newer peer process's stats): still shown.
    out.extend((str(name), int(value)) for name, value in sorted(seen.items()))
    return out


FAMILIES: list[_Family] = [
    ("smcish_connections_total", "counter",
     "Connections set up, by data path (ism: shared memory; tcp: fell back to TCP).", "mode",
     lambda st: [("ism", st.get("connections_ism", 0)), ("tcp", st.get("connections_tcp", 0))]),
    ("smcish_fallbacks_total", "counter",
     "Connections that went or stayed TCP, by DeclineReason.", "reason", _fallbacks),
    ("smcish_bytes_total", "counter",
     "Bytes carried through shared-memory rings (TCP fallbacks not included).", "direction",
     lambda st: [("sent", st.get("bytes_sent", 0)), ("received", st.get("bytes_received", 0))]),
    ("smcish_doorbells_total", "counter",
     "Doorbells rung (eventfd writes waking a peer's link group).", None,
     lambda st: st.get("doorbells", 0)),
    ("smcish_notifications_total", "counter",
     "Slot notifications queued to peers' link groups.", None,
     lambda st: st.get("notifications", 0)),
    ("smcish_polls_total", "counter",
     "Link group busy-polls: hit (found work), miss (budget ran out), colocated (the peer was "
     "on our CPU: yielded to it).", "result",
     lambda st: [("hit", st.get("poll_hits", 0)), ("miss", st.get("poll_misses", 0)),
                 ("colocated", st.get("poll_colocated", 0))]),
    ("smcish_ring_full_total", "counter",
     "Times a writer found its send ring full (then it grows the ring, polls or sleeps).", None,
     lambda st: st.get("ring_full", 0)),
    ("smcish_migrations_total", "counter",
     "Optimistic connections that moved to TCP after sending (their bytes were resent).", None,
     lambda st: st.get("migrations", 0)),
    ("smcish_migrated_bytes_total", "counter",
     "Bytes resent over TCP by migrated connections.", None,
     lambda st: st.get("migrated_bytes", 0)),
    ("smcish_handshake_aborts_total", "counter",
     "Set-ups aborted (the connection was reset, not fallen back).", None,
     lambda st: st.get("handshake_aborts", 0)),
    ("smcish_link_groups", "gauge",
     "Link groups open (shared memory shared with one peer process).", None,
     lambda st: st.get("link_groups", 0)),
    ("smcish_slots", "gauge",
     "Connection slots in use in link groups (closing connections included).", None,
     lambda st: st.get("slots", 0)),
    ("smcish_live_connections", "gauge",
     "Open connections on shared memory.", None,
     lambda st: st.get("live", 0)),
    ("smcish_policy_skipped_destinations", "gauge",
     "Destinations the learned policy skips now (LEARNED_DECLINE, LEARNED_SHORT_LIVED).", None,
     lambda st: st.get("policy_skipped", 0)),
]


def _snapshot(st: Stats | None) -> Stats:
    if st is None:
        from .stats import stats

        return stats()
    return st


def metrics_json(snapshot: Stats | None = None, pid: int | None = None) -> dict[str, Any]:
    """This process's metrics as a JSON-able dict (``snapshot``: a ``stats()`` dict, default
    now; ``pid``: whose, default this process's when ``snapshot`` is None, else left out).

    Keys are the Prometheus names without ``smcish_``: a number, or for a labelled family a dict
    label value -> number, e.g. ``{"pid": 42, "connections_total": {"ism": 3, "tcp": 1},
    "fallbacks_total": {"NO_MEMORY": 0, ...}, "doorbells_total": 7, ..., "slots": 2}``.
    """
    st = _snapshot(snapshot)
    if pid is None and snapshot is None:
        pid = os.getpid()
    out: dict[str, Any] = {} if pid is None else {"pid": pid}
    for name, _typ, _help, label, samples in FAMILIES:
        key = name[len("smcish_"):]
        value = samples(st)
        out[key] = dict(value) if label else value
    return out


def _escape(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int):
        return str(value)
    return repr(float(value))


def render_text(processes: Iterable[tuple[dict[str, str], Stats]]) -> str:
    """Text exposition (format 0.0.4) of several snapshots: ``(extra labels, stats() dict)``
    pairs, e.g. ``({"pid": "42"}, stats)``; each family's HELP and TYPE once."""
    processes = list(processes)
    lines: list[str] = []
    for name, typ, help_text, label, samples in FAMILIES:
        lines.append(f"# HELP {name} {_escape(help_text)}")
        lines.append(f"# TYPE {name} {typ}")
        for extra, st in processes:
            value = samples(st)
            for label_value, number in (value if label else [(None, value)]):
                labels: dict[str, Any] = dict(extra)
                if label:
                    labels[label] = label_value
                text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
                lines.append(f"{name}{{{text}}} {_format_value(number)}" if text
                             else f"{name} {_format_value(number)}")
    return "\n".join(lines) + "\n"


def metrics_text(snapshot: Stats | None = None) -> str:
    """This process's metrics in Prometheus text exposition format 0.0.4 (HELP/TYPE lines;
    ``snapshot``: a ``stats()`` dict, default now). Serve it with the content type
    ``text/plain; version=0.0.4; charset=utf-8``."""
    return render_text([({}, _snapshot(snapshot))])


CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
