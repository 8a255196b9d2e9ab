"""The README's benchmark tables (markdown), rendered from the results JSON alone.

`python -m tests.bench --report tests/bench/results/latest.json` renders them again without
running anything, so the README's tables can always be traced to the raw figures.
"""

from __future__ import annotations

from typing import Any

from .stats import fmt_ms

# Rows come in these orders (the JSON's keys are sorted, so its order is not the run's).
FAULT_NAMES = {"silent": "silent upstream failure", "carrier": "carrier loss"}
MONITOR_NAMES = {
    "uplinkd": "uplinkd defaults",
    "foolsm": "Net-ISP-Balance's foolsm settings",
    "mwan3": "mwan3's defaults (model)",
}
# The targets: failover with uplinkd's defaults, judged on the p95; overhead on the median.
FAILOVER_TARGETS_S = {"carrier": 0.100, "silent": 1.0}
OVERHEAD_TARGET = 0.95


def _pair(figures: dict[str, float], fmt: Any = fmt_ms) -> str:
    return f"{fmt(figures['median'])} / {fmt(figures['p95'])}"


def _count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _counts(figures: dict[str, float]) -> str:
    return f"{_count(figures['median'])} / {_count(figures['p95'])}"


def targets(results: dict[str, Any]) -> list[str]:
    rows = ["| target | measured | met |", "|---|---|---|"]
    summary = results.get("failover", {}).get("summary", {})
    for fault, limit in FAILOVER_TARGETS_S.items():
        figures = summary.get(f"uplinkd/{fault}")
        if figures is None:
            continue
        failover = figures["failover_s"]
        met = "yes" if failover["p95"] < limit else "**no**"
        rows.append(
            f"| {FAULT_NAMES[fault]}, uplinkd defaults: failover under {fmt_ms(limit)} (p95)"
            f" | median {fmt_ms(failover['median'])}, p95 {fmt_ms(failover['p95'])} | {met} |"
        )
    overhead = results.get("overhead")
    if overhead:
        for figure, name in (
            ("bits_per_second", "throughput"),
            ("connections_per_second", "connection rate"),
        ):
            ratio = overhead[figure]["ratio"]
            met = "yes" if ratio["median"] >= OVERHEAD_TARGET else "**no**"
            rows.append(
                f"| datapath {name}: uplinkd / plain >= {OVERHEAD_TARGET} (median)"
                f" | {ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f}) | {met} |"
            )
    return rows


def failover(results: dict[str, Any]) -> list[str]:
    summary = results["summary"]
    rows = [
        "| probe settings | fault | trials | failover | failed attempts | daemon saw it"
        " | recovery | failed attempts |",
        "|---|---|---|---|---|---|---|---|",
    ]
    order = [f"{m}/{f}" for m in MONITOR_NAMES for f in FAULT_NAMES]
    for key, figures in sorted(summary.items(), key=lambda item: order.index(item[0])):
        monitor, fault = key.split("/")
        trials = f"{figures['trials'] - figures['failed_trials']}/{figures['trials']}"
        rows.append(
            f"| {MONITOR_NAMES[monitor]} | {FAULT_NAMES[fault]} | {trials}"
            f" | {_pair(figures['failover_s'])} | {_counts(figures['failed_failover'])}"
            f" | {_pair(figures['detected_s'])} | {_pair(figures['recovery_s'])}"
            f" | {_counts(figures['failed_recovery'])} |"
        )
    return rows


def apply_latency(results: dict[str, Any]) -> list[str]:
    rows = [
        "| links x rules | plan | apply (map rewrite) | n | full build | rebuild | n"
        " | start to first apply | n |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def size(item: tuple[str, Any]) -> tuple[int, ...]:
        return tuple(int(n) for n in item[0].split("x"))

    for name, figures in sorted(results.items(), key=size):
        links, rules = name.split("x")
        rows.append(
            f"| {links} x {rules} | {_pair(figures['plan_s'])} | {_pair(figures['apply_s'])}"
            f" | {figures['apply_s']['n']} | {fmt_ms(figures['raw']['first_full_s'])}"
            f" | {_pair(figures['rebuild_s'])} | {figures['rebuild_s']['n']}"
            f" | {_pair(figures['start_s'])} | {figures['start_s']['n']} |"
        )
    return rows


def balance(results: dict[str, Any]) -> list[str]:
    rows = [
        "| weights | connections | shares (configured) | max deviation | chi-square p |",
        "|---|---|---|---|---|",
    ]
    for name, figures in sorted(results.items()):
        shares = ", ".join(
            f"{100 * s:.2f} % ({100 * e:.2f} %)"
            for s, e in zip(figures["shares"], figures["expected"], strict=True)
        )
        rows.append(
            f"| {name} | {figures['succeeded']} of {figures['connections']} | {shares}"
            f" | {figures['max_deviation_points']:.2f} points | {figures['p_value']:.3f} |"
        )
    return rows


def overhead(results: dict[str, Any]) -> list[str]:
    rows = [
        "| figure | uplinkd (median) | plain routing + masquerade (median)"
        " | ratio: median (min-max) over pairs |",
        "|---|---|---|---|",
    ]
    for figure, name, scale, unit in (
        ("bits_per_second", "bulk TCP throughput, one flow", 1e9, "{:.2f} Gbit/s"),
        ("connections_per_second", "new connections, sequential", 1, "{:.0f} /s"),
    ):
        data = results[figure]
        ratio = data["ratio"]
        rows.append(
            f"| {name} | {unit.format(data['uplinkd']['median'] / scale)}"
            f" | {unit.format(data['plain']['median'] / scale)}"
            f" | {ratio['median']:.3f} ({ratio['min']:.3f}-{ratio['max']:.3f}), n = {ratio['n']} |"
        )
    return rows


def footprint(results: dict[str, Any]) -> list[str]:
    rows = [
        "| links | loops running | probe rounds/s | CPU (% of one core) | CPU per link | RSS |"
        " peak RSS |",
        "|---|---|---|---|---|---|---|",
    ]
    for figures in sorted(
        results.values(), key=lambda f: (int(f["links"]), bool(f.get("hop_probes")))
    ):
        loops = "probes, rates"
        if figures.get("hop_probes"):
            loops += ", hop latency (lowest-latency)"
        per_link = figures.get("cpu_percent_per_link", figures["cpu_percent"] / figures["links"])
        rows.append(
            f"| {figures['links']} | {loops} | {figures['probe_rounds_per_s']:.0f}"
            f" | {figures['cpu_percent']:.1f} % | {per_link:.2f} % | {figures['rss_mib']:.1f} MiB"
            f" | {figures['peak_rss_mib']:.1f} MiB |"
        )
    return rows


DEVICE_EVENT_NAMES = {
    "admin": "admin down, then up",
    "deleted": "deleted, recreated (new ifindex)",
    "renamed": "renamed away and back",
    "address": "address removed, re-added",
    "arp": "gateway silent on ARP",
    "carrier": "carrier loss (baseline)",
}


def device_events(results: dict[str, Any]) -> list[str]:
    method = results["method"]
    budgets, back_budget = method["budget_s"], method["return_budget_s"]
    rows = [
        "| event | link | trials | failover | failed attempts | p95 / carrier-loss p95"
        f" | failover budget (p95) | used again after | back within {fmt_ms(back_budget)} (p95) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    summary = results["summary"]
    for kind, name in DEVICE_EVENT_NAMES.items():
        for isp in (1, 2):
            figures = summary.get(f"{kind}/ISP{isp}")
            if figures is None:
                continue
            trials = f"{figures['trials'] - figures['failed_trials']} of {figures['trials']}"
            over, back = figures["failover_s"], figures["recovery_s"]
            if over["p95"] is None or back["p95"] is None:
                rows.append(f"| {name} | ISP{isp} | {trials} | n/a | | | **no** | | **no** |")
                continue
            base = summary.get(f"carrier/ISP{isp}", {}).get("failover_s", {}).get("p95")
            ratio = f"{over['p95'] / base:.2f}" if base else "n/a"
            budget = budgets[kind]
            over_met = "yes" if over["p95"] <= budget else "**no**"
            back_met = "yes" if back["p95"] <= back_budget else "**no**"
            rows.append(
                f"| {name} | ISP{isp} | {trials} | {_pair(over)}"
                f" | {_counts(figures['failed_failover'])} | {ratio}"
                f" | {fmt_ms(budget)}: {over_met} | {_pair(back)} | {back_met} |"
            )
    return rows


def _figure(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in value.items()) or "none"
    if isinstance(value, list):
        return "; ".join(str(v) for v in value) or "none"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def _optional(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)


def faults(results: dict[str, Any]) -> list[str]:
    budget = results["method"]["failover_budget_s"]
    rows = [
        "| class | case: what was tried | runs | carrier-loss failover meanwhile (median / p95, n)"
        f" | p95 / baseline p95 | p95 within {fmt_ms(budget)} | connections failed / made"
        " | applies | daemon CPU (all runs) | peak RSS | SIGTERM to exit (longest)"
        " | other figures |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cases = results["cases"]
    base = next((c for c in cases if c["fault_class"] == "baseline"), None)
    base_p95 = base["failover"]["failover_s"]["p95"] if base and base["failover"] else None
    for case in cases:
        over = (case["failover"] or {}).get("failover_s")
        if over and over["p95"] is not None:
            trials = case["failover"]["trials"]
            n = f"{over['n']} of {trials}" if over["n"] != trials else str(trials)
            active = case["active_at_cut"]
            if active and not all(active):
                n += f", fault active at {sum(active)}"
            failover_cell = f"{_pair(over)}, {n}"
            ratio = f"{over['p95'] / base_p95:.2f}" if base_p95 else "n/a"
            met = "yes" if over["p95"] <= budget else "**no**"
        else:
            failover_cell, ratio, met = "n/a", "", ""
        failed = (
            f"{case['failed_connections']} / {case['attempts']}"
            if case["attempts"] is not None
            else "n/a"
        )
        other = "; ".join(f"{label}: {_figure(value)}" for label, value in case["outcome"])
        if case["errors"]:
            other += ("; " if other else "") + "**errors**: " + "; ".join(case["errors"])
        applies = _optional(case["applies"], "{:.0f}")
        cpu = _optional(case["cpu_s"], "{:.1f} s")
        rss = _optional(case["peak_rss_mib"], "{:.0f} MiB")
        rows.append(
            f"| {case['fault_class']} | {case['case']}: {case['tried']} | {case['repeats']}"
            f" | {failover_cell} | {ratio} | {met} | {failed} | {applies} | {cpu} | {rss}"
            f" | {fmt_ms(case['stop_s'])} | {other.replace('|', '/')} |"
        )
    return rows


SECTIONS = {
    "failover": ("Failover and recovery (median / p95)", failover),
    "devices": ("Device events on each link (median / p95)", device_events),
    "apply": ("Apply latency (median / p95)", apply_latency),
    "balance": ("Balance accuracy", balance),
    "overhead": ("Datapath overhead", overhead),
    "footprint": ("Footprint", footprint),
    "faults": ("Fault suite", faults),
}


def render(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    lines = [
        f"Run {meta.get('date', '?')} on {meta.get('cpu', '?')} ({meta.get('cores', '?')} cores),"
        f" Linux {meta.get('kernel', '?')}, Python {meta.get('python', '?')},"
        f" uplinkd {meta.get('uplinkd', '?')} ({meta.get('commit', '?')});"
        f" {meta.get('duration_s', 0) / 60:.1f} min; load average before/after:"
        f" {meta.get('load_before', '?')} / {meta.get('load_after', '?')}.",
        "",
        *targets(results),
    ]
    for key, (title, table) in SECTIONS.items():
        if key in results:
            lines += ["", f"**{title}**", "", *table(results[key])]
    return "\n".join(lines) + "\n"
