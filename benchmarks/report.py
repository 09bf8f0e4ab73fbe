"""Turns raw measurements into summaries, ratios, target verdicts, terminal tables, Markdown and PNG plots."""

from __future__ import annotations

import os
import statistics
from collections.abc import Iterable
from typing import Any

from .cases import CASES_BY_NAME, FALLBACK_TOLERANCE, LINK_GROUPS, TARGETS, Case, Target, size_label

BASELINE = "uvloop/tcp"
Json = dict[str, Any]  # a results.json document, or a part of one


# --- numbers ---------------------------------------------------------------------------------------------

def spread(values: Iterable[float | None]) -> Json | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"median": statistics.median(present), "min": min(present), "max": max(present), "n": len(present),
            "values": present}


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    magnitude = abs(value)
    if magnitude >= 100_000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def fmt_spread(s: Json | None, ratio: bool = False) -> str:
    if s is None:
        return "-"
    suffix = "x" if ratio else ""
    if s["n"] == 1:
        return fmt(s["median"]) + suffix
    return f"{fmt(s['median'])}{suffix} [{fmt(s['min'])}-{fmt(s['max'])}]"


# --- summary ---------------------------------------------------------------------------------------------

def _by_round(measurements: list[Json], case: str, config: str, metric: str) -> dict[int, float]:
    return {m["round"]: m["metrics"][metric] for m in measurements
            if m["case"] == case and m["config"] == config and m["status"] == "ok" and metric in m["metrics"]}


def paired_ratio(measurements: list[Json], case: str, metric: str, config: str, baseline: str) -> Json | None:
    """Ratio config/baseline per round (the two were measured back to back), as median [min-max]."""
    ours = _by_round(measurements, case, config, metric)
    theirs = _by_round(measurements, case, baseline, metric)
    return spread(ours[r] / theirs[r] for r in ours if theirs.get(r))


def summarize(doc: Json) -> Json:
    """{case: {config: {status, metrics: {key: spread}, ratios, errors}}} from doc["measurements"]."""
    return summarize_cases([case_doc["name"] for case_doc in doc["cases"]], doc["measurements"])


def summarize_cases(names: Iterable[str], ms: list[Json]) -> Json:
    """`summarize` of the cases named, from measurements `ms` (results.json's "measurements" records)."""
    summary: Json = {}
    for name in names:
        case = CASES_BY_NAME[name]
        per_config: Json = {}
        configs = list(dict.fromkeys(m["config"] for m in ms if m["case"] == case.name))
        for config in configs:
            mine = [m for m in ms if m["case"] == case.name and m["config"] == config]
            ok = [m for m in mine if m["status"] == "ok"]
            statuses = {m["status"] for m in mine}
            if ok and len(ok) == len(mine):
                status = "ok"
            elif ok:
                status = "partial"
            elif statuses == {"unavailable"}:
                status = "unavailable"
            else:
                status = "failed"
            entry: Json = {
                "status": status, "n_ok": len(ok), "n": len(mine),
                "metrics": {metric.key: spread(m["metrics"][metric.key] for m in ok)
                            for metric in case.metrics},
                "errors": list(dict.fromkeys(m["error"] for m in mine if m.get("error"))),
            }
            loop = config.split("/")[0]
            primary = case.primary.key
            entry["ratios"] = {
                "vs_" + BASELINE.replace("/", "_"): paired_ratio(ms, case.name, primary, config, BASELINE),
                "vs_unix": paired_ratio(ms, case.name, primary, config, f"{loop}/unix"),
            }
            per_config[config] = entry
        summary[case.name] = per_config
    return summary


def evaluate_targets(doc: Json) -> list[Json]:
    """PASS / MISS / SKIP / FAIL for every target (cases.TARGETS), plus the fallback-costs-nothing rule."""
    ms = doc["measurements"]
    summary = doc["summary"]
    verdicts = []
    for target in TARGETS:
        verdict: Json = {"text": target.text, "case": target.case, "metric": target.metric,
                         "config": target.config, "baseline": target.baseline, "threshold": target.threshold,
                         "kind": target.kind, "group": target.group, "unit": target.unit,
                         "rule": (">=" if target.at_least else "<=")}
        if target.floor is not None:
            verdict["floor"] = target.floor
        if target.kind == "runs":
            verdict.update(_runs_verdict(ms, summary, target))
            verdicts.append(verdict)
            continue
        if target.kind == "absolute":
            value = spread(_by_round(ms, target.case, target.config, target.metric).values())
            configs: tuple[str, ...] = (target.config,)
        else:
            if target.baseline is None:
                raise ValueError(f"target {target.text!r}: a ratio needs a baseline")
            value = paired_ratio(ms, target.case, target.metric, target.config, target.baseline)
            configs = (target.config, target.baseline)
        if value is None:
            status, why = _why_missing(summary, target.case, configs)
            verdict.update(status=status, why=why)
        else:
            median: float = value["median"]
            passed = _meets(median, target.threshold, target.at_least)
            straddles = value["min"] < target.threshold < value["max"]
            verdict.update(status="PASS" if passed else "MISS", ratio=value, straddles=straddles)
            if not passed:
                if target.at_least:
                    verdict["missed_by"] = target.threshold / median - 1 if median else float("inf")
                else:
                    verdict["missed_by"] = median / target.threshold - 1
                if target.floor is not None:
                    verdict["floor_met"] = _meets(median, target.floor, target.at_least)
        verdicts.append(verdict)
    verdicts.append(_fallback_verdict(doc))
    return verdicts


def _meets(value: float, bar: float, at_least: bool) -> bool:
    return value >= bar if at_least else value <= bar


def _runs_verdict(ms: list[Json], summary: Json, target: Target) -> Json:
    """A "runs" target: the case measured on `config` in every round, with no failure (wrong mode
    included)."""
    entry = summary.get(target.case, {}).get(target.config)
    if target.case not in summary:
        return {"status": "SKIP", "why": f"case {target.case} not run"}
    if entry is None:
        return {"status": "SKIP", "why": f"{target.config} not run"}
    if entry["status"] == "unavailable":
        return {"status": "SKIP", "why": f"{target.config} unavailable"}
    shown = {key: spread(_by_round(ms, target.case, target.config, key).values()) for key in target.show}
    if entry["status"] != "ok":
        why = f"{target.config} {entry['status']} in {entry['n'] - entry['n_ok']} of {entry['n']} rounds"
        if entry["errors"]:
            why += f": {entry['errors'][0][:240]}"
        verdict: Json = {"status": "FAIL", "why": why}
        partial = [m["partial"]["metrics"] for m in ms
                   if m["case"] == target.case and m["config"] == target.config
                   and m["status"] == "failed" and (m.get("partial") or {}).get("metrics")]
        if partial:  # what the failed rounds measured anyway (e.g. a few connections on TCP among thousands)
            verdict["partial"] = {key: spread(p.get(key) for p in partial) for key in target.show}
        return verdict
    return {"status": "PASS", "rounds": entry["n_ok"], "shown": shown}


def _why_missing(summary: Json, case: str, configs: Iterable[str]) -> tuple[str, str]:
    """("SKIP" or "FAIL", why) for a target that has no paired measurement: FAIL if a configuration failed."""
    if case not in summary:
        return "SKIP", f"case {case} not run"
    for config in configs:
        entry = summary[case].get(config)
        if entry is None:
            return "SKIP", f"{config} not run"
        if not entry["n_ok"]:
            status = "SKIP" if entry["status"] == "unavailable" else "FAIL"
            return status, (f"{config} {entry['status']}"
                            + (f": {entry['errors'][0][:120]}" if entry["errors"] else ""))
    return "FAIL", "no round where both were measured"


def _fallback_verdict(doc: Json) -> Json:
    ms = doc["measurements"]
    checked, misses, skipped = [], [], []
    for case_doc in doc["cases"]:
        case = CASES_BY_NAME[case_doc["name"]]
        for loop in ("asyncio", "uvloop"):
            config, base = f"{loop}/smcish-fallback", f"{loop}/tcp"
            ratio = paired_ratio(ms, case.name, case.primary.key, config, base)
            if ratio is None:
                skipped.append(f"{case.name} ({loop})")
                continue
            # "worse" means slower: ratio below 1 for higher-is-better metrics, above 1 for latency
            worse_by = (1 - ratio["median"]) if case.primary.higher_is_better else (ratio["median"] - 1)
            item = {"case": case.name, "loop": loop, "ratio": ratio, "worse_by": worse_by}
            checked.append(item)
            if worse_by > FALLBACK_TOLERANCE:
                misses.append(item)
    verdict: Json = {"text": f"smcish forced to fallback within {FALLBACK_TOLERANCE:.0%} of plain TCP on "
                             "every case",
                     "config": "*/smcish-fallback", "baseline": "*/tcp (same loop)",
                     "threshold": FALLBACK_TOLERANCE, "checked": checked, "misses": misses}
    if not checked:
        verdict.update(status="SKIP", why="smcish-fallback not measured")
    else:
        worst = max(checked, key=lambda item: item["worse_by"])
        verdict.update(status="MISS" if misses else "PASS", worst=worst)
    return verdict


_SHOW_LABELS = {
    "server_rss_MiB": ("server RSS", "MiB"), "server_shm_mapped_MiB": ("shm mapped", "MiB"),
    "server_shm_rss_MiB": ("resident", "MiB"), "client_rss_MiB": ("client RSS", "MiB"),
    "client_shm_mapped_MiB": ("shm mapped", "MiB"), "client_shm_rss_MiB": ("resident", "MiB"),
    "open_s": ("opened in", "s"),
}


def _shown_text(shown: Json) -> str:
    parts = []
    for key, value in shown.items():
        label, suffix = _SHOW_LABELS.get(key, (key, ""))
        parts.append(f"{label} {fmt_spread(value)} {suffix}".rstrip())
    return ", ".join(parts)


def target_lines(verdicts: list[Json]) -> list[str]:
    """One line per target, under a heading per group (the link-group issue first, then issue 5)."""
    lines = []
    group = None
    for v in verdicts:
        this = v.get("group", "v1")
        if this != group:
            group = this
            lines.append("link-group issue (v2):" if group == LINK_GROUPS
                         else "issue 5 (v1), still applying:")
        if "checked" in v:  # the fallback rule
            if v["status"] == "SKIP":
                lines.append(f"  SKIP  {v['text']}: {v['why']}")
                continue
            worst = v["worst"]
            lines.append(f"  {v['status']:<5} {v['text']}: {len(v['checked']) - len(v['misses'])}/"
                         f"{len(v['checked'])} within; worst {worst['case']} ({worst['loop']}) "
                         f"{fmt_spread(worst['ratio'], True)}")
            for miss in v["misses"]:
                lines.append(f"  MISS    {miss['case']} ({miss['loop']}): fallback/tcp "
                             f"{fmt_spread(miss['ratio'], True)}, {miss['worse_by']:.1%} worse")
            continue
        head = f"  {v['status']:<5} {v['text']}"
        if v["status"] in ("SKIP", "FAIL"):
            lines.append(f"{head}: {v['why']}")
            if v.get("partial"):
                lines.append("        measured anyway in the failed rounds (not all shared memory): "
                             + _shown_text(v["partial"]))
            continue
        unit = v.get("unit", "x")
        if v.get("kind") == "runs":
            lines.append(f"{head}: {v['config']} {v['case']} ok in {v['rounds']} round(s); "
                         + _shown_text(v.get("shown", {})))
            continue
        what = (f"{v['config']} {v['metric']}" if v.get("kind") == "absolute"
                else f"{v['config']} / {v['baseline']} {v['metric']}")
        value = fmt_spread(v["ratio"]) + unit if unit != "x" else fmt_spread(v["ratio"], True)
        line = f"{head}: {what} = {value} (target {v['rule']} {fmt(v['threshold'])}{unit})"
        if v["status"] == "MISS":
            line += f", missed by {v['missed_by']:.0%}"
            if "floor_met" in v:
                line += (f"; floor {fmt(v['floor'])}{unit} met" if v["floor_met"]
                         else f"; below the floor {fmt(v['floor'])}{unit} too")
        if v.get("straddles"):
            line += " (spread crosses the target)"
        lines.append(line)
    return lines


# --- terminal --------------------------------------------------------------------------------------------

def _table(rows: list[list[str]], indent: str = "  ") -> str:
    """Aligned columns; a two-cell row under a wider header is a status line that may overflow."""
    full = [row for row in rows if len(row) == len(rows[0])]
    widths = [max(len(row[i]) for row in full) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        if len(row) == 2 and len(rows[0]) > 2:  # a status line spanning the table
            out.append(indent + row[0].ljust(widths[0]) + "  " + row[1])
        else:
            out.append(indent + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    return "\n".join(out)


def case_table(case: Case, per_config: Json) -> str:
    """The terminal table of one case: every configuration, median [min-max], ratios of the primary metric."""
    header = ["config"] + [m.label for m in case.metrics] + ["x " + BASELINE, "x unix"]
    rows = [header]
    for config, entry in per_config.items():
        if not entry["n_ok"]:
            note = entry["status"].upper() if entry["status"] != "unavailable" else "unavailable"
            rows.append([config, f"{note}: {entry['errors'][0] if entry['errors'] else ''}"[:150]])
            continue
        row = [config] + [fmt_spread(entry["metrics"][m.key]) for m in case.metrics]
        ratios = entry["ratios"]
        row += [fmt_spread(ratios["vs_" + BASELINE.replace("/", "_")], True),
                fmt_spread(ratios["vs_unix"], True)]
        if entry["status"] == "partial":
            row[0] += f" ({entry['n_ok']}/{entry['n']} ok)"
        rows.append(row)
    better = "higher" if case.primary.higher_is_better else "lower"
    return (f"{case.name}: {case.title}  ({case.primary.label}: {better} is better; ratios of "
            f"{case.primary.label} per round)\n" + _table(rows))


def final_text(doc: Json) -> str:
    parts = []
    for case_doc in doc["cases"]:
        case = CASES_BY_NAME[case_doc["name"]]
        parts.append(case_table(case, doc["summary"][case.name]))
    parts.append("Targets (ratios are per-round pairs; median [min-max] over the rounds):\n"
                 + "\n".join("  " + line for line in target_lines(doc["targets"])))
    return "\n\n".join(parts)


# --- Markdown --------------------------------------------------------------------------------------------

def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _configs(summary: Json, cases: list[str]) -> list[str]:
    return list(dict.fromkeys(c for name in cases if name in summary for c in summary[name]))


def _cell(summary: Json, case: str, config: str, key: str, second: str | None = None) -> str:
    entry = summary.get(case, {}).get(config)
    if entry is None:
        return ""
    if not entry["n_ok"]:
        status: str = entry["status"]
        return status.upper() if status == "failed" else status
    text = fmt_spread(entry["metrics"][key])
    if second and entry["metrics"].get(second):
        text += f" ({fmt(entry['metrics'][second]['median'])})"
    return text


def _primary_rows(summary: Json, names: list[str]) -> list[list[str]]:
    """Markdown rows: a configuration, then for each case its primary metric (its second one)."""
    return [[c] + [_cell(summary, n, c, CASES_BY_NAME[n].primary.key, CASES_BY_NAME[n].metrics[1].key)
                   for n in names] for c in _configs(summary, names)]


def markdown(doc: Json, plots: list[str]) -> str:
    summary, machine, settings = doc["summary"], doc["machine"], doc["settings"]
    names = [c["name"] for c in doc["cases"]]
    quick = "Quick run (--quick): short phases, noisy; for development, not for quoting. "
    out = [
        "# smcish benchmarks",
        "",
        f"{machine['date']} on {machine['cpu_model']} ({machine['cores']} cores), Linux {machine['kernel']}, "
        f"Python {machine['python']}, uvloop {machine['uvloop']}. "
        f"{quick if settings['quick'] else ''}"
        f"Median [min-max] of {settings['repeat']} interleaved rounds; client and server in separate "
        "processes.",
        "",
    ]
    lat = [n for n in names if n.startswith("latency.")]
    if lat:
        out += ["## Round-trip latency, p50 [min-max] (p99), microseconds", "",
                _md_table(["config"] + lat, [[c] + [_cell(summary, n, c, "p50_us", "p99_us") for n in lat]
                                             for c in _configs(summary, lat)]), ""]
    for api, title in (("streams", "StreamWriter.write -> StreamReader.read"),
                       ("bufproto", "transport.write -> BufferedProtocol")):
        tp = [n for n in names if n.startswith("throughput.") and n.endswith("." + api)]
        if tp:
            sizes = [size_label(CASES_BY_NAME[n].size) for n in tp]
            out += [f"## Streaming throughput, {title}: MB/s [min-max] (CPU seconds per GiB, both processes)",
                    "",
                    _md_table(["config"] + sizes,
                              [[c] + [_cell(summary, n, c, "MBps", "cpu_s_per_GiB") for n in tp]
                               for c in _configs(summary, tp)]), ""]
    other = [n for n in names if n.startswith(("rate.", "setup."))]
    if other:
        out += ["## Message rate (msg/s) and connection setup (conn/s), [min-max] (CPU us per op)", "",
                _md_table(["config"] + other, _primary_rows(summary, other)), ""]
    tls = [n for n in names if CASES_BY_NAME[n].tls]
    if tls:
        out += ["## TLS: round trip p50 us (p99), streaming MB/s (CPU seconds per GiB, both processes), "
                "[min-max]",
                "",
                "tcp: the loop's own TLS (asyncio's `SSLProtocol`, uvloop's own TLS); smcish: asyncio's "
                "`SSLProtocol` over the shared-memory transport, on both loops. The client verifies the "
                "server's certificate. No target applies.", "",
                _md_table(["config"] + tls, _primary_rows(summary, tls)), ""]
    scale = [n for n in names if n.startswith("scale.")]
    for name in scale:
        case = CASES_BY_NAME[name]
        extra = [("server_rss_MiB", "srv RSS MiB"), ("server_shm_mapped_MiB", "srv shm map MiB"),
                 ("client_rss_MiB", "cli RSS MiB"), ("client_shm_mapped_MiB", "cli shm map MiB"),
                 ("server_link_groups", "srv groups"), ("server_slots", "srv slots")]
        rows = []
        for config in _configs(summary, [name]):
            entry = summary[name][config]
            if not entry["n_ok"]:
                rows.append([config] + [entry["status"].upper()] * (len(case.metrics) + len(extra)))
                continue
            row = [config] + [fmt_spread(entry["metrics"][m.key]) for m in case.metrics]
            row += [fmt_spread(spread(_by_round(doc["measurements"], name, config, key).values()))
                    for key, _ in extra]
            rows.append(row)
        out += [f"## {name}: {case.title}", "",
                "Per connection = (idle - baseline) / N in each process (srv: server, cli: client); shm = "
                "memfd mappings (map: their size, res: their Rss); median [min-max] over the rounds.", "",
                _md_table(["config"] + [m.label for m in case.metrics] + [label for _, label in extra], rows),
                ""]
    key = "vs_" + BASELINE.replace("/", "_")
    others = [c for c in _configs(summary, names) if c != BASELINE]
    out += [f"## Ratios against {BASELINE} on the same case (same API level): median [min-max] of "
            "per-round pairs",
            "", "Latency and CPU: lower is better; throughput, rates: higher is better.", "",
            _md_table(["case (primary metric)"] + others,
                      [[f"{n} ({CASES_BY_NAME[n].primary.label})"]
                       + [fmt_spread(summary[n][c]["ratios"][key], True) if c in summary.get(n, {})
                          and summary[n][c]["n_ok"] else summary.get(n, {}).get(c, {}).get("status", "")
                          for c in others] for n in names]), ""]
    out += ["## Targets", ""]
    for line in target_lines(doc["targets"]):
        out.append(f"- {line.strip()}" if line.startswith("  ") else f"\n{line}\n")
    out.append("")
    failures = [m for m in doc["measurements"] if m["status"] == "failed"]
    if failures:
        out += ["## Failures (not in any figure above)", ""]
        for error, where in group_errors(failures).items():
            out += [f"- {where_text(where)}: `{error}`"]
        out.append("")
    if plots:
        out += ["## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots] + [""]
    smc = {name: t for name, t in doc["transports"].items() if t.get("probe")}
    out += ["## Settings", "",
            f"- phases: warm-up {settings['timing']['warmup_s']} s, measured "
            f"{settings['timing']['duration_s']} s per measurement; verify: {settings['verify']}",
            f"- workload: {', '.join(f'{k}={v}' for k, v in settings['workload'].items())}"]
    malloc = settings.get("malloc")
    if malloc:
        env = " ".join(f"{k}={v}" for k, v in malloc["env"].items())
        out.append(f"- peers' malloc: {malloc['mode']}" + (f" ({env})" if malloc["env"] else ""))
    for name, t in smc.items():
        probe = t["probe"]
        out.append(f"- {name}: env {t['env'] or '{}'}; smcish {probe.get('version')}, "
                   f"config {probe.get('config')}; probe connection mode {probe.get('mode')!r}"
                   if probe.get("available")
                   else f"- {name}: unavailable ({probe.get('reason')})")
    out.append(f"- machine: {machine['cores']} cores ({machine['usable_cores']} usable), "
               f"{'virtual machine, ' if machine.get('virtualized') else ''}load average "
               f"{machine['loadavg_start'][0]} at start, {machine.get('loadavg_end', ['?'])[0]} at end; "
               f"git {machine.get('git')}")
    source = machine.get("source") or {}
    if source.get("changed"):
        out.append(f"- uncommitted changes measured in smcish/ism_backend (diff sha256 "
                   f"{source.get('diff_sha256')}): " + ", ".join(source["changed"]))
    out.append("")
    return "\n".join(out)


def group_errors(failures: list[Json]) -> dict[str, dict[str, list[str]]]:
    """{error: {config: [cases]}} for failed measurements."""
    grouped: dict[str, dict[str, list[str]]] = {}
    for m in failures:
        cases = grouped.setdefault((m.get("error") or "?")[:300], {}).setdefault(m["config"], [])
        if m["case"] not in cases:
            cases.append(m["case"])
    return grouped


def where_text(where: dict[str, list[str]]) -> str:
    return ", ".join(f"{config} ({cases[0] if len(cases) == 1 else f'{len(cases)} cases'})"
                     for config, cases in where.items())


# --- plots -----------------------------------------------------------------------------------------------

# throughput.png and cpu_per_gib.png: one panel per (case name prefix, API) that the run measured
THROUGHPUT_PANELS = (("throughput.", "streams", "StreamReader.read"),
                     ("throughput.", "bufproto", "BufferedProtocol"),
                     ("tls.throughput.", "streams", "TLS, StreamReader.read"))


def plots(doc: Json, out_dir: str) -> tuple[list[str], str | None]:
    """Write latency.png, throughput.png and cpu_per_gib.png; (files, None) or ([], why skipped)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return [], "plots skipped: matplotlib is not installed (pip install matplotlib)"
    summary = doc["summary"]
    names = [c["name"] for c in doc["cases"]]
    written = []
    transports = list(dict.fromkeys(c.split("/", 1)[1] for n in names for c in summary.get(n, {})))
    colors = {t: plt.get_cmap("tab10")(i % 10) for i, t in enumerate(transports)}
    styles = {"uvloop": "-", "asyncio": "--"}
    subtitle = f"{doc['machine']['cpu_model']}, {doc['machine']['date'][:10]}"
    if doc["settings"]["quick"]:
        subtitle += " (quick run)"

    lat = [n for n in names if n.startswith(("latency.", "tls.latency."))]
    if lat:
        ncols = 2 if len(lat) > 1 else 1
        nrows = (len(lat) + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(6.5 * ncols, 0.4 * 12 * nrows + 1), squeeze=False)
        for ax, name in zip(axes.flat, lat, strict=False):
            configs = [c for c, e in summary[name].items() if e["n_ok"]]
            if not configs:
                ax.set_title(name)
                ax.text(0.5, 0.5, "no successful measurement", ha="center", transform=ax.transAxes)
                continue
            p50 = [summary[name][c]["metrics"]["p50_us"] for c in configs]
            p99 = [summary[name][c]["metrics"]["p99_us"] for c in configs]
            ys = list(range(len(configs)))
            for y, config, s50, s99 in zip(ys, configs, p50, p99, strict=True):
                color = colors[config.split("/", 1)[1]]
                xerr = [[s50["median"] - s50["min"]], [s50["max"] - s50["median"]]]
                ax.errorbar([s50["median"]], [y], xerr=xerr, fmt="o", color=color, capsize=3,
                            label="p50 [min-max]" if y == 0 else None)
                ax.plot([s99["median"]], [y], marker="D", mfc="none", color=color, linestyle="none",
                        label="p99" if y == 0 else None)
            ax.set_yticks(ys, configs)
            ax.invert_yaxis()
            ax.set_xscale("log")
            for axis in (ax.xaxis.set_major_formatter, ax.xaxis.set_minor_formatter):
                axis(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            ax.grid(True, axis="x", which="both", alpha=0.3)
            ax.set_xlabel("round trip, us (log scale)")
            ax.set_title(name)
            ax.legend(loc="lower right", fontsize="small")
        for ax in list(axes.flat)[len(lat):]:
            ax.axis("off")
        fig.suptitle(f"Round-trip latency, lower is better — {subtitle}")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "latency.png"), dpi=110)
        plt.close(fig)
        written.append("latency.png")

    for metric, label, filename, title in (
            ("MBps", "MB/s (log)", "throughput.png", "Streaming throughput by write size, higher is better"),
            ("cpu_s_per_GiB", "CPU s per GiB, both processes (log)", "cpu_per_gib.png",
             "CPU per GiB streamed, lower is better")):
        panels = [(prefix, api, panel_title) for prefix, api, panel_title in THROUGHPUT_PANELS
                  if any(n.startswith(prefix) and n.endswith("." + api) for n in names)]
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 5), squeeze=False)
        for ax, (prefix, api, panel_title) in zip(axes.flat, panels, strict=True):
            cases = [CASES_BY_NAME[n] for n in names if n.startswith(prefix) and n.endswith("." + api)]
            configs = _configs(summary, [c.name for c in cases])
            drawn = 0
            for config in configs:
                points = [(c.size, summary[c.name][config]["metrics"][metric]) for c in cases
                          if config in summary[c.name] and summary[c.name][config]["n_ok"]]
                if not points:
                    continue
                xs = [p[0] for p in points]
                ys = [p[1]["median"] for p in points]
                err = [[p[1]["median"] - p[1]["min"] for p in points],
                       [p[1]["max"] - p[1]["median"] for p in points]]
                loop, transport = config.split("/", 1)
                ax.errorbar(xs, ys, yerr=err, label=config, color=colors[transport],
                            linestyle=styles.get(loop, "-"), marker="o", capsize=3)
                drawn += 1
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
                axis(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
            sizes = sorted({c.size for c in cases})
            ax.set_xticks(sizes, [size_label(s) for s in sizes])
            ax.set_xlabel("write size")
            ax.set_ylabel(label)
            ax.set_title(panel_title)
            ax.grid(True, which="both", alpha=0.3)
            if drawn:
                ax.legend(fontsize="small")
            else:
                ax.text(0.5, 0.5, "no successful measurement", ha="center", transform=ax.transAxes)
        fig.suptitle(f"{title} — {subtitle}")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, filename), dpi=110)
        plt.close(fig)
        written.append(filename)
    return written, None
