"""Run the benchmarks: ``python -m tests.bench`` from the repository root, as root.

Runs each section in turn (they never overlap: the figures of one would disturb the other's),
prints progress, writes every raw figure to a JSON file (default tests/bench/results/latest.json)
and prints the markdown tables of README.md's "Benchmarks" section, rendered from that JSON.
``--report FILE`` renders the tables of an earlier run without running anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import uplinkd

from . import apply_latency, balance, device_events, failover, faults, footprint, overhead, report

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "latest.json"


def _log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _sections(args: argparse.Namespace) -> dict[str, Callable[[], dict[str, Any]]]:
    return {
        "failover": lambda: failover.run(args.trials, args.labs, _log),
        "devices": lambda: device_events.run(args.device_trials, _log),
        "apply": lambda: apply_latency.run((10, 3, 3), args.apply_budget, _log),
        "balance": lambda: balance.run(args.connections, _log),
        "overhead": lambda: overhead.run(args.pairs, args.seconds, args.rate_connections, _log),
        "footprint": lambda: footprint.run(args.footprint_seconds, _log),
        "faults": lambda: faults.run(args.fault_trials, args.fuzz_files, args.fault_classes, _log),
    }


def _git(*argv: str) -> str:
    result = subprocess.run(["git", *argv], cwd=HERE, capture_output=True, text=True, check=False)
    return result.stdout.strip()


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def meta(argv: list[str]) -> dict[str, Any]:
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no", "--", "daemon"))
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": " ".join(["python -m tests.bench", *argv]),
        "commit": commit + ("+changes" if dirty else ""),
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "uplinkd": uplinkd.__version__,
        "load_before": _load(),
    }


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench", description=__doc__)
    p.add_argument(
        "--only",
        default="",
        help="comma-separated sections: "
        + ", ".join(["failover", "devices", "apply", "balance", "overhead", "footprint", "faults"]),
    )
    p.add_argument("--trials", type=int, default=10, help="failover trials per setting and fault")
    p.add_argument("--device-trials", type=int, default=6, help="trials per device event and link")
    p.add_argument("--labs", type=int, default=10, help="labs running the slow baselines at once")
    p.add_argument(
        "--apply-budget",
        type=float,
        default=10.0,
        help="seconds of state changes per size before fewer samples are taken",
    )
    p.add_argument("--connections", type=int, default=10_000, help="per weight set (balance)")
    p.add_argument("--pairs", type=int, default=8, help="alternating pairs (overhead)")
    p.add_argument("--seconds", type=float, default=2.0, help="of bulk transfer per run")
    p.add_argument("--rate-connections", type=int, default=4000, help="per run (overhead)")
    p.add_argument("--footprint-seconds", type=float, default=10.0)
    p.add_argument(
        "--fault-trials",
        type=int,
        default=4,
        help="faults: carrier-loss trials per case (two per daemon), and kill -9 repeats",
    )
    p.add_argument("--fuzz-files", type=int, default=500, help="faults: files per fuzzing set")
    p.add_argument(
        "--fault-classes",
        default="",
        help="faults: comma-separated classes (default all): " + ", ".join(faults.CLASSES),
    )
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--report", type=Path, help="only render the tables of this results file")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.report is not None:
        print(report.render(json.loads(args.report.read_text())), end="")
        return 0
    if os.geteuid() != 0:
        _log("tests.bench: run as root (network namespaces, nftables)")
        return 2
    # SIGTERM unwinds like Ctrl-C, so every lab, namespace and process is still removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sections = _sections(args)
    chosen = [s for s in args.only.split(",") if s] or list(sections)
    unknown = set(chosen) - set(sections)
    if unknown:
        _log(f"tests.bench: unknown section(s): {', '.join(sorted(unknown))}")
        return 2
    results: dict[str, Any] = {"meta": meta(argv)}
    durations: dict[str, float] = {}
    begin = time.monotonic()
    for name in chosen:
        _log(f"== {name}")
        started = time.monotonic()
        results[name] = sections[name]()
        durations[name] = time.monotonic() - started
        _log(f"== {name}: {durations[name]:.0f} s")
    results["meta"] |= {
        "duration_s": time.monotonic() - begin,
        "section_durations_s": durations,
        "load_after": _load(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    _log(f"raw figures: {args.out}")
    print(report.render(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
