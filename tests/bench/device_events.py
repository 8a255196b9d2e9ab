"""Failover and return for every kind of device event on a WAN, on ISP1 and on ISP2.

The events are the lab's (`Lab.set_device_fault`): admin down, deleted and recreated, renamed,
address removed, gateway silent on ARP, and carrier loss, which is the baseline: netlink reports
it at once, and every other event the kernel reports should be as fast (the carrier-loss budget,
100 ms at the p95); the ARP case is a silent failure, judged on the probe budget (1 s).

Each trial is failover.py's (same churn client, same definitions of failover, recovery and failed
attempts), with uplinkd's default monitor in failover mode and the ISP under test as the primary,
so every new connection names the link in use. Each daemon is fresh and serves two trials of one
event on one ISP (a third fault within 60 s would meet flap damping).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path
from tempfile import TemporaryDirectory

from uplinkd_lab.lab import DEVICE_FAULTS, INET_HOST, Lab

from tests.integration.conftest import Uplinkd

from .failover import (
    CLIENT,
    HOLD_S,
    Fault,
    Trial,
    _describe,
    fresh_daemon_trials,
    group_summary,
)
from .monitors import LINKS

TRIALS_PER_DAEMON = 2
BUDGET_S = dict.fromkeys(DEVICE_FAULTS, 0.100) | {"arp": 1.0}  # failover, p95
RETURN_BUDGET_S = 2.0  # the link used again after the event is over, p95


def fault_of(kind: str) -> Fault:
    return lambda lab, isp, up: lab.set_device_fault(isp, kind, faulty=not up)


def config_for(isp: int) -> str:
    """monitors.LINKS (uplinkd's defaults, failover mode) with ISP `isp` as the primary."""
    if isp == 1:
        return LINKS
    swapped = {"priority = 1": "priority = 2", "priority = 2": "priority = 1"}
    return re.sub(r"priority = [12]", lambda found: swapped[found.group(0)], LINKS)


def one_daemon(lab: Lab, runner: Uplinkd, kind: str, isp: int) -> list[Trial]:
    trials = [Trial("uplinkd", kind, isp) for _ in range(TRIALS_PER_DAEMON)]
    return fresh_daemon_trials(lab, runner, config_for(isp), trials, fault_of(kind))


def summarize(trials: list[Trial]) -> dict[str, object]:
    out: dict[str, object] = {}
    for kind, isp in itertools.product(DEVICE_FAULTS, (1, 2)):
        mine = [t for t in trials if t.fault == kind and t.isp == isp]
        if mine:
            out[f"{kind}/ISP{isp}"] = group_summary(mine)
    return out


def run(trials: int, log: Callable[[str], None]) -> dict[str, object]:
    """`trials` trials of each event on each ISP, one lab, daemons one after the other."""
    daemons = max(1, -(-trials // TRIALS_PER_DAEMON))
    todo = [(kind, isp) for kind in DEVICE_FAULTS for isp in (1, 2)] * daemons
    done: list[Trial] = []
    log(f"device events: {len(todo)} daemons x {TRIALS_PER_DAEMON} trials on one lab")
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(TemporaryDirectory(prefix="uplinkd-bench-")))
        lab = stack.enter_context(Lab(isps=2))
        lab.start_server(lab.ns_inet, INET_HOST, [80])
        runner = Uplinkd(lab, tmp, readback=False)
        for kind, isp in todo:
            for trial in one_daemon(lab, runner, kind, isp):
                done.append(trial)
                log(f"  {len(done)}/{len(todo) * TRIALS_PER_DAEMON} ISP{isp} {_describe(trial)}")
    return {
        "method": {
            "client": CLIENT,
            "hold_s": HOLD_S,
            "budget_s": BUDGET_S,
            "return_budget_s": RETURN_BUDGET_S,
        },
        "summary": summarize(done),
        "trials": [asdict(t) for t in done],
    }
