"""The fault suite (issue 12): the daemon running in the namespace lab with traffic flowing, and
something going wrong beside it; figures, not only pass/fail. `python -m tests.bench --only
faults` (as root) runs it; `--fault-trials N` sets the carrier-loss trials per case (two per
daemon: a third loss within 60 s meets flap damping) and the kill -9 repeats; `--fuzz-files N`
the files per fuzzing set.

Every case reports, where they apply: connections failed (the churn client: a new TCP connection
every 5 ms through the router, failures counted over the case's measured windows), carrier-loss
failover time measured while the fault was active (the key figure: the p95 must stay within
100 ms, as in the device-events benchmark; compared with the baseline, carrier losses of daemons
with no fault measured in the same run, as a ratio of p95s), applies (the daemon's `applied
generation` lines), the daemon's CPU seconds and peak resident memory (VmHWM), and the time from
SIGTERM to its exit. Classes, in order (each module says what it does): hooks (fault_hooks.py),
process: kill -9, reloads, flapping (fault_process.py), mail (fault_mail.py), dbus
(fault_bus.py), scan: a fastest-response scan from the LAN and GetLearned with a large table
(fault_scan.py), fuzzing (fault_fuzz.py). Not covered here: foreign-owned hook files, a D-Bus
Reload.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from uplinkd_lab.lab import INET_HOST, Lab

from . import fault_bus, fault_fuzz, fault_hooks, fault_mail, fault_process, fault_scan
from .failover import CLIENT, TrialError
from .fault_kit import Case, Watched, carrier_trials

CLASSES = ("hooks", "process", "mail", "dbus", "scan", "fuzzing")
FAILOVER_BUDGET_S = 0.100  # carrier loss, p95, whatever goes on beside it


def baseline(lab: Lab, tmp: Path, trials: int, log: Callable[[str], None]) -> Case:
    """Carrier losses with nothing wrong: what each fault's failover is compared with."""
    case = Case("baseline", "carrier", "carrier loss of ISP1, no fault", repeats=0)
    for index in range(-(-trials // 2)):
        watched: Watched | None = None
        try:
            watched = Watched(lab, tmp / f"baseline{index}")
            since = watched.mark()
            carrier_trials(watched, case, min(2, trials - 2 * index))
            watched.stop()
            watched.into(case, since)
            case.repeats += 1
        except (TrialError, OSError, subprocess.SubprocessError, AssertionError) as exc:
            case.errors.append(str(exc).splitlines()[0])
        finally:
            if watched is not None:
                watched.stop()
                watched.runner.run(watched.config, "--stop", check=False)
            lab.set_link(1, up=True)
    log(f"  baseline: {case.describe()}")
    return case


def run(trials: int, fuzz_files: int, classes: str, log: Callable[[str], None]) -> dict[str, Any]:
    chosen = [c for c in classes.split(",") if c] or list(CLASSES)
    unknown = set(chosen) - set(CLASSES)
    if unknown:
        raise ValueError(f"unknown fault class(es): {', '.join(sorted(unknown))}")
    trials = max(1, trials)
    cases: list[Case] = []
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(TemporaryDirectory(prefix="uplinkd-faults-")))
        lab = stack.enter_context(Lab(isps=2))
        lab.start_server(lab.ns_inet, INET_HOST, [80])
        log(f"faults: baseline and {', '.join(chosen)}; {trials} carrier-loss trials per case")
        base = baseline(lab, tmp, max(trials, 4), log)
        cases.append(base)
        if "hooks" in chosen:
            cases += fault_hooks.run(lab, tmp, trials, log)
        if "process" in chosen:
            cases.append(fault_process.kill9(lab, tmp, trials, log))
            cases.append(fault_process.reloads(lab, tmp, log))
            for name in fault_process.FLAPPING:
                cases.append(fault_process.flapping(lab, tmp, name, log))
        if "mail" in chosen:
            cases += fault_mail.run(lab, tmp, trials, log)
        if "dbus" in chosen:
            cases += fault_bus.run(lab, tmp, trials, log)
        if "scan" in chosen:
            cases += fault_scan.run(lab, tmp, trials, log)
        if "fuzzing" in chosen:
            cases += fault_fuzz.run(lab, tmp, fuzz_files, log)
    return {
        "method": {
            "client": CLIENT,
            "trials_per_case": trials,
            "fuzz_files": fuzz_files,
            "classes": chosen,
            "failover_budget_s": FAILOVER_BUDGET_S,
        },
        "cases": [case.record() for case in cases],
    }
