"""What every class of the fault suite (faults.py) shares: a fresh daemon with its process
figures, carrier-loss trials taken while a fault is active, and the case record.

A case's figures come from three sources: the daemon's log (applies are its `applied
generation` lines), /proc of the daemon process (CPU seconds: utime + stime; peak resident
memory: VmHWM) and the churn client (churn.py: a new TCP connection every 5 ms, each naming the
ISP that carried it). The carrier-loss trials are failover.py's `one_fault` (same definitions of
failover time and failed attempts), with uplinkd's defaults in failover mode (ISP1 primary).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from uplinkd_lab.lab import INET_HOST, Lab

from tests.integration.conftest import APPLIED, Daemon, Uplinkd

from .churn_client import ChurnClient, Record
from .failover import CLIENT, Trial, TrialError, _require, group_summary, one_fault
from .monitors import LINKS

# D-Bus callers run the distribution's python3 with dbus-python: `nobody` may run it (the
# checkout's venv lies under /root).
SYSTEM_PYTHON = "/usr/bin/python3"
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
# Two carrier losses per daemon at most: a third up->down within 60 s meets flap damping.
TRIALS_PER_DAEMON = 2
STOP_WAIT_S = 15.0  # SIGTERM to exit is measured; past this the daemon is killed (and it shows)
UP_WITHIN_S = 15.0


def daemon_pid(daemon: Daemon) -> int:
    """The daemon's own PID: `ip netns exec` execs its command, so normally the Popen's; if a
    wrapper stayed in between, its child running uplinkd.cli."""
    pid = daemon.proc.pid
    for _ in range(3):
        if b"uplinkd.cli" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if not children:
            break
        pid = int(children[0])
    raise RuntimeError(f"no uplinkd.cli process under pid {daemon.proc.pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


def processes(needle: str) -> list[int]:
    """PIDs whose command line holds `needle` (zombies left out)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError, UnicodeDecodeError):
            continue
        if needle in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@dataclass
class Case:
    """One fault case: what was tried, how often, and its figures (None: not measured)."""

    fault_class: str
    case: str
    tried: str
    repeats: int = 1
    failed_connections: int | None = None
    attempts: int | None = None
    applies: int | None = None
    cpu_s: float | None = None
    peak_rss_mib: float | None = None  # the highest of the repeats
    stop_s: float | None = None  # SIGTERM to exit, the longest of the repeats
    # Carrier-loss trials taken while the fault was active (failover.py's Trial, as dicts).
    trials: list[dict[str, Any]] = field(default_factory=list)
    # How many of those trials found the fault still active at the cut.
    active_at_cut: list[bool] = field(default_factory=list)
    # Class-specific figures, in the order the table shows them: [label, value] pairs.
    outcome: list[list[Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def add_figure(self, label: str, value: float) -> None:
        """A class-specific count, summed over repeats."""
        for pair in self.outcome:
            if pair[0] == label:
                pair[1] += value
                return
        self.outcome.append([label, value])

    def note(self, label: str, value: object) -> None:
        """A class-specific figure that is not summed (a rate, a list, a yes/no)."""
        self.outcome.append([label, value])

    def describe(self) -> str:
        good = [t["failover_s"] for t in self.trials if not t["error"]]
        over = f"failover {max(good) * 1000:.0f} ms at most" if good else "no failover figure"
        figures = ", ".join(f"{label} {value}" for label, value in self.outcome)
        errors = f"; ERRORS: {'; '.join(self.errors)}" if self.errors else ""
        return (
            f"{over}, {self.failed_connections} failed connections, {self.applies} applies,"
            f" stop {self.stop_s}; {figures}{errors}"
        )

    def add(self, name: str, value: float | None) -> None:
        """Add a per-run figure: summed over repeats, but for the peak memory and the stop
        time, where the highest counts."""
        if value is None:
            return
        current = getattr(self, name)
        if name in ("peak_rss_mib", "stop_s"):
            setattr(self, name, value if current is None else max(current, value))
        else:
            setattr(self, name, value if current is None else current + value)

    def record(self) -> dict[str, Any]:
        out = asdict(self)
        good = [Trial(**t) for t in self.trials]
        out["failover"] = group_summary(good) if good else None
        return out


class Watched:
    """A fresh daemon (its datapath and conntrack cleared first) in `workdir`, both links up."""

    def __init__(
        self,
        lab: Lab,
        workdir: Path,
        config_text: str = LINKS,
        *,
        bus_address: str | None = None,
        clean: bool = True,
        wait_up: bool = True,
    ) -> None:
        self.lab = lab
        workdir.mkdir(parents=True, exist_ok=True)
        self.runner = Uplinkd(lab, workdir, readback=False)
        self.config = self.runner.write_config(config_text)
        if clean:
            self.runner.run(self.config, "--stop", check=False)
            lab.run(lab.ns_router, "conntrack", "-F", check=False)
        self.started = time.monotonic()
        self.daemon = self.runner.start(self.config, bus_address=bus_address)
        self.ready_s = time.monotonic() - self.started
        self.pid = daemon_pid(self.daemon)
        self.cpu_s: float | None = None
        self.peak_rss_mib: float | None = None
        self.stop_s: float | None = None
        for isp in ("ISP1", "ISP2") if wait_up else ():
            up = self.daemon.log.wait_for(f"link {isp}: init -> up", UP_WITHIN_S)
            if not up:
                self.stop()
                raise TrialError(f"{isp} never came up")

    @property
    def log_text(self) -> str:
        return self.daemon.log.text

    def applies(self, since: int = 0) -> int:
        return sum(APPLIED in line for line in self.daemon.log.lines[since:])

    def count(self, needle: str, since: int = 0) -> int:
        return sum(needle in line for line in self.daemon.log.lines[since:])

    def mark(self) -> int:
        """A position in the log, for counting what came after it."""
        return len(self.daemon.log.lines)

    def sample(self) -> None:
        """CPU seconds and peak memory so far (kept: the process may be gone when read next)."""
        try:
            self.cpu_s = cpu_seconds(self.pid)
            self.peak_rss_mib = peak_rss_mib(self.pid)
        except OSError:
            pass

    def stop(self, number: int = signal.SIGTERM) -> float | None:
        """Stop the daemon; the seconds from the signal to its exit (None if it had to be
        killed after STOP_WAIT_S, or had exited before)."""
        if self.stop_s is not None or not self.daemon.running:
            self.daemon.log.join()
            return self.stop_s
        self.sample()
        begin = time.monotonic()
        self.daemon.send(number)
        try:
            self.daemon.proc.wait(timeout=STOP_WAIT_S)
            self.stop_s = time.monotonic() - begin
        except subprocess.TimeoutExpired:
            self.daemon.proc.kill()
            self.daemon.proc.wait(timeout=10)
        self.daemon.log.join()
        return self.stop_s

    def kill(self) -> None:
        """kill -9: the process goes, the datapath it applied stays."""
        self.sample()
        self.daemon.send(signal.SIGKILL)
        self.daemon.proc.wait(timeout=10)
        self.daemon.log.join()

    def into(self, case: Case, since: int = 0) -> None:
        """Add this daemon's applies, CPU, peak memory and stop time to `case`."""
        case.add("applies", self.applies(since))
        case.add("cpu_s", self.cpu_s)
        case.add("peak_rss_mib", self.peak_rss_mib)
        case.add("stop_s", self.stop_s)


def carrier_trials(
    watched: Watched,
    case: Case,
    count: int,
    active: Callable[[], bool] | None = None,
    before: Callable[[], None] | None = None,
) -> None:
    """`count` (at most TRIALS_PER_DAEMON) carrier-loss trials of ISP1 on this daemon, added
    to `case`; `before` runs before each (to set the fault going again), `active` is asked
    right after the cut whether the fault was still going on."""
    for _ in range(min(count, TRIALS_PER_DAEMON)):
        trial = Trial("uplinkd", case.case)
        seen: list[bool] = []

        def cut(lab: Lab, isp: int, up: bool, seen: list[bool] = seen) -> None:
            lab.set_link(isp, up=up)
            if not up and active is not None:
                seen.append(active())

        try:
            if before is not None:
                before()
            one_fault(watched.lab, watched.daemon, trial, cut)
        except (TrialError, OSError, subprocess.SubprocessError, RuntimeError) as exc:
            trial.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        case.trials.append(asdict(trial))
        if active is not None:
            case.active_at_cut.append(bool(seen and seen[0]))
        if trial.error:
            case.errors.append(f"carrier trial: {trial.error}")
        else:
            failed = (trial.failed_failover or 0) + (trial.late_failures or 0)
            failed += trial.failed_recovery or 0
            case.add("failed_connections", failed)
            case.add("attempts", trial.attempts)


class Load:
    """The churn client as background traffic through a whole phase: its failures counted."""

    def __init__(self, lab: Lab) -> None:
        self.client = ChurnClient(lab, INET_HOST, **CLIENT)
        first = self.client.wait_for(lambda r: r.ok, 10)
        _require(first, "the churn client never got through")

    def between(self, begin: float, end: float | None = None) -> list[Record]:
        stop = end if end is not None else time.monotonic()
        return [r for r in list(self.client.records) if begin <= r.start < stop]

    def failed(self, begin: float, end: float | None = None) -> int:
        return sum(not r.ok for r in self.between(begin, end))

    def by_isp(self, begin: float, end: float | None = None) -> dict[str, int]:
        counts: dict[str, int] = {}
        for r in self.between(begin, end):
            key = r.isp if r.ok and r.isp else "failed"
            counts[key] = counts.get(key, 0) + 1
        return counts

    def stop(self) -> list[Record]:
        return self.client.stop()


def closed_case(case: Case, watched: Watched | None, since: int = 0) -> Case:
    """Stop the daemon (if still running) and add its figures."""
    if watched is not None:
        watched.stop()
        watched.into(case, since)
    return case


class BusCallers:
    """`count` processes running `script` on the bus at `address` (as `nobody` unless
    `as_root`), with the arguments: address, the stop file, then `args`. Each prints "ready"
    once connected, works until the stop file appears (or its own limit), and prints one JSON
    line of results; stop() collects them."""

    def __init__(
        self,
        what: str,
        script: str,
        address: str,
        directory: Path,
        count: int,
        *,
        args: Sequence[str] = (),
        as_root: bool = False,
    ) -> None:
        directory.mkdir(exist_ok=True)
        self.what = what
        self.stop_file = directory / "stop"
        self.stop_file.unlink(missing_ok=True)
        path = directory / "caller.py"
        path.write_text(script)
        path.chmod(0o644)
        user = () if as_root else AS_NOBODY
        argv = [*user, SYSTEM_PYTHON, str(path), address, str(self.stop_file), *args]
        self.procs = [
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(count)
        ]
        self.results: list[dict[str, Any]] = []
        self.seconds = 0.0
        for proc in self.procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                self.stop()
                raise TrialError(f"a {what} did not connect to the bus")
        self.began = time.monotonic()

    def running(self) -> bool:
        return all(proc.poll() is None for proc in self.procs)

    def stop(self) -> list[dict[str, Any]]:
        self.stop_file.touch()
        for proc in self.procs:
            try:
                out, err = proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate(timeout=10)
            last = out.strip().splitlines()[-1:] if out else []
            if last and last[0].startswith("{"):
                self.results.append(json.loads(last[0]))
            elif err.strip():
                raise TrialError(f"{self.what}: {err.strip().splitlines()[-1]}")
        self.seconds = time.monotonic() - getattr(self, "began", time.monotonic())
        return self.results
