"""Failover and recovery time in the namespace lab (items 1 and 2 of the benchmarks).

The router runs uplinkd in failover mode (monitors.py: ISP1 carries every new connection, ISP2
is the standby), so every new connection names the link in use. Each daemon is fresh (its
datapath removed and conntrack flushed first) and serves two trials, a silent upstream failure
and then a carrier loss, each with a churn client of its own (churn.py: a new TCP connection
every 5 ms, each given 300 ms). Two faults never meet uplinkd's flap damping, which holds a link
down from its third up->down within 60 s (a trial fails if the log mentions damping); and the
carrier loss comes second because netlink reports it at once and its return clears the probe
counters, so nothing left from the first trial can shorten or lengthen it. One trial:

1. wait until both links are up (the log: `init -> up`, or the previous trial's recovery), start
   the client and wait for 10 successes via ISP1;
2. wait a random part of a probe interval (faults come at any phase of the probing); the fault
   at t_fault, taken just before calling lab.set_upstream / lab.set_link, so the figure includes
   that call (a few ms, in `fault_call_s`) and never flatters;
3. wait for the first attempt started at or after t_fault that succeeds via ISP2;
4. 1 s and another random part of an interval later the repair at t_repair; wait for the first
   attempt started after it that succeeds via ISP1 again.

Per trial: failover = the end of that first ISP2 success - t_fault; failed attempts = the attempts
started in [t_fault, the start of that success) that did not succeed (timed out, reset,
unreachable: anything but the server's answer within 300 ms); recovery and its failed attempts
likewise from t_repair; `late_failures`, failures between the failover and the repair (0 unless
something is wrong; `failure_kinds` counts every failure of the trial by kind, and
`last_late_s` is when the last late one started); `detected_s` / `recovered_s`, when the daemon
logged the link's `up -> down` / `down -> up` (its decision, before the apply); `forgot_s`, when
it logged forgetting the link's tracked connections (after the apply).
"""

from __future__ import annotations

import itertools
import queue
import random
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import TypeVar

from uplinkd_lab.lab import INET_HOST, Lab, LabError

from tests.integration.conftest import Daemon, Uplinkd

from .churn_client import ChurnClient, Record, first_success
from .monitors import SETTINGS, config_text, describe, interval_s
from .stats import summary

Fault = Callable[[Lab, int, bool], None]  # (lab, ISP number, up): break or repair that ISP
FAULTS: dict[str, Fault] = {
    "silent": lambda lab, i, up: lab.set_upstream(i, up=up),  # forwards nothing, carrier stays
    "carrier": lambda lab, i, up: lab.set_link(i, up=up),  # the cable: NO-CARRIER on wan<i>
}
HOLD_S = 1.0  # from the failover the client saw to the repair (plus a random phase)
CLIENT = {"interval_ms": 5.0, "timeout_ms": 300.0}
_phase = random.Random(0x5EED)  # noqa: S311 - spreads faults over the probe interval, no secret
T = TypeVar("T")


class TrialError(RuntimeError):
    """A trial missed one of its time bounds; it is reported, and left out of the figures."""


@dataclass
class Trial:
    monitor: str
    fault: str
    isp: int = 1  # the ISP that fails: the primary (failover mode), the other is the standby
    failover_s: float | None = None
    failed_failover: int | None = None
    recovery_s: float | None = None
    failed_recovery: int | None = None
    late_failures: int | None = None
    last_late_s: float | None = None
    forgot_s: float | None = None
    detected_s: float | None = None
    recovered_s: float | None = None
    fault_call_s: float | None = None
    attempts: int = 0
    failure_kinds: dict[str, int] = field(default_factory=dict)
    error: str = ""


FIGURES = [
    f.name
    for f in fields(Trial)
    if f.name not in ("monitor", "fault", "isp", "failure_kinds", "error")
]


def _require(value: T | None, failure: str) -> T:
    if not value:
        raise TrialError(failure)
    return value


def _stamp(daemon: Daemon, needle: str, timeout: float) -> Callable[[], float | None]:
    """When a line with `needle` is next logged (a thread polls every 2 ms, bounded)."""
    seen: list[float] = []
    start = len(daemon.log.lines)

    def wait() -> None:
        deadline = time.monotonic() + timeout
        while not seen and time.monotonic() < deadline:
            if any(needle in line for line in daemon.log.lines[start:]):
                seen.append(time.monotonic())
            time.sleep(0.002)

    threading.Thread(target=wait, daemon=True).start()
    return lambda: seen[0] if seen else None


def analyse(trial: Trial, records: list[Record], t_fault: float, t_repair: float) -> None:
    """Fill in the trial's figures from the client's records (the definitions above)."""
    primary, standby = f"ISP{trial.isp}", f"ISP{3 - trial.isp}"
    over = _require(first_success(records, standby, t_fault), f"no {standby} success")
    back = _require(first_success(records, primary, t_repair), f"no {primary} success")
    trial.failover_s = over.end - t_fault
    trial.failed_failover = sum(not r.ok for r in records if t_fault <= r.start < over.start)
    late = [r for r in records if over.start <= r.start < t_repair and not r.ok]
    trial.late_failures = len(late)
    trial.last_late_s = max((r.start - t_fault for r in late), default=None)
    failures = [r.outcome for r in records if not r.ok and t_fault <= r.start < back.start]
    trial.failure_kinds = dict(Counter(failures))
    trial.recovery_s = back.end - t_repair
    trial.failed_recovery = sum(not r.ok for r in records if t_repair <= r.start < back.start)
    trial.attempts = len(records)


def one_fault(lab: Lab, daemon: Daemon, trial: Trial, fault: Fault | None = None) -> None:
    """One trial (the module's steps) of `fault`, by default FAULTS[trial.fault]."""
    interval = interval_s(trial.monitor)
    break_link = fault or FAULTS[trial.fault]
    primary, standby = f"ISP{trial.isp}", f"ISP{3 - trial.isp}"
    client = ChurnClient(lab, INET_HOST, **CLIENT)
    try:
        via_primary = itertools.count(1)
        warm = client.wait_for(lambda r: r.isp == primary and next(via_primary) >= 10, 10)
        _require(warm, f"the client never got through {primary}")
        detected = _stamp(daemon, f"link {primary}: up -> down", interval * 13 + 10)
        forgot = _stamp(daemon, f"link {primary}: forgot", interval * 13 + 20)
        time.sleep(_phase.uniform(0, interval))
        t_fault = time.monotonic()
        break_link(lab, trial.isp, False)
        trial.fault_call_s = time.monotonic() - t_fault
        over = client.wait_for(
            lambda r: r.isp == standby and r.start >= t_fault, interval * 12 + 10
        )
        _require(over, f"no failover to {standby} within the bound")
        time.sleep(HOLD_S + _phase.uniform(0, interval))
        recovered = _stamp(daemon, f"link {primary}: down -> up", interval * 25 + 10)
        t_repair = time.monotonic()
        break_link(lab, trial.isp, True)
        back = client.wait_for(
            lambda r: r.isp == primary and r.start >= t_repair, interval * 25 + 10
        )
        _require(back, f"{primary} not back in use within the bound")
        time.sleep(0.2)
        analyse(trial, client.stop(), t_fault, t_repair)
        trial.detected_s = _since(detected(), t_fault)
        trial.forgot_s = _since(forgot(), t_fault)
        trial.recovered_s = _since(recovered(), t_repair)
    finally:
        client.stop()
        break_link(lab, trial.isp, True)


def _since(stamp: float | None, start: float) -> float | None:
    return None if stamp is None else stamp - start


def one_daemon(lab: Lab, runner: Uplinkd, monitor: str) -> list[Trial]:
    """A fresh daemon with `monitor`'s settings and its two trials (silent, then carrier)."""
    trials = [Trial(monitor, fault) for fault in FAULTS]
    return fresh_daemon_trials(lab, runner, config_text(monitor), trials)


def fresh_daemon_trials(
    lab: Lab, runner: Uplinkd, text: str, trials: list[Trial], fault: Fault | None = None
) -> list[Trial]:
    """Run `trials` in turn (with `fault`, else each trial's own) on a fresh daemon configured
    by `text`: its datapath removed and conntrack flushed first. A failure marks every trial."""
    config = runner.write_config(text)
    runner.run(config, "--stop", check=False)
    lab.run(lab.ns_router, "conntrack", "-F", check=False)
    daemon = runner.start(config)
    try:
        for isp in ("ISP1", "ISP2"):
            wait = interval_s(trials[0].monitor) * 8 + 10
            _require(daemon.log.wait_for(f"link {isp}: init -> up", wait), f"{isp} never came up")
        for trial in trials:
            one_fault(lab, daemon, trial, fault)
        _require("flap damping" not in daemon.log.text, "flap damping interfered")
    except (TrialError, LabError, AssertionError, OSError, subprocess.SubprocessError) as exc:
        for trial in trials:
            trial.error = trial.error or str(exc).splitlines()[0]
    finally:
        daemon.stop()
    return trials


def run_daemons(monitors: list[str], labs: int, log: Callable[[str], None]) -> list[Trial]:
    """One daemon per entry of `monitors`, on `labs` labs at once, each lab taking the next."""
    todo: queue.Queue[str] = queue.Queue()
    for monitor in monitors:
        todo.put(monitor)
    done: list[Trial] = []
    lock = threading.Lock()

    def worker(lab: Lab, runner: Uplinkd) -> None:
        while True:
            try:
                monitor = todo.get_nowait()
            except queue.Empty:
                return
            trials = one_daemon(lab, runner, monitor)
            with lock:
                for trial in trials:
                    done.append(trial)
                    log(f"  {len(done)}/{2 * len(monitors)} {_describe(trial)}")

    with ExitStack() as stack:
        tmp = Path(stack.enter_context(TemporaryDirectory(prefix="uplinkd-bench-")))
        threads = []
        for index in range(min(labs, len(monitors))):
            lab = stack.enter_context(Lab(isps=2))
            lab.start_server(lab.ns_inet, INET_HOST, [80])
            (tmp / str(index)).mkdir()
            runner = Uplinkd(lab, tmp / str(index), readback=False)
            threads.append(threading.Thread(target=worker, args=(lab, runner)))
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return done


def _describe(trial: Trial) -> str:
    if trial.error:
        return f"{trial.monitor}/{trial.fault}: FAILED: {trial.error}"
    return (
        f"{trial.monitor}/{trial.fault}: failover {trial.failover_s:.3f} s"
        f" ({trial.failed_failover} failed), recovery {trial.recovery_s:.3f} s"
    )


def group_summary(mine: list[Trial]) -> dict[str, object]:
    """One group of trials: how many, how many failed, and each figure over the good ones."""
    good = [t for t in mine if not t.error]
    return {
        "trials": len(mine),
        "failed_trials": len(mine) - len(good),
        **{
            name: summary([getattr(t, name) for t in good if getattr(t, name) is not None])
            for name in FIGURES
        },
    }


def summarize(trials: list[Trial]) -> dict[str, object]:
    out: dict[str, object] = {}
    for monitor, fault in itertools.product(SETTINGS, FAULTS):
        mine = [t for t in trials if t.monitor == monitor and t.fault == fault]
        if mine:
            out[f"{monitor}/{fault}"] = group_summary(mine)
    return out


def run(trials: int, labs: int, log: Callable[[str], None]) -> dict[str, object]:
    """uplinkd's defaults first, alone on one lab (their figures are milliseconds); then the
    baselines, whose figures are seconds, on `labs` labs at once (their clients load the
    machine, which adds milliseconds at most), mwan3's long trials first."""
    log(f"failover: uplinkd defaults, {trials} daemons x 2 trials on one lab")
    results = run_daemons(["uplinkd"] * trials, 1, log)
    log(f"failover: baselines, {2 * trials} daemons x 2 trials on {labs} labs at once")
    results += run_daemons(["mwan3"] * trials + ["foolsm"] * trials, labs, log)
    return {
        "method": {
            "client": CLIENT,
            "hold_s": HOLD_S,
            "monitors": describe(),
            "parallel_labs": labs,
        },
        "summary": summarize(results),
        "trials": [asdict(t) for t in results],
    }
