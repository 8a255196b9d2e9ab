"""Fault class "scan": a LAN client drives fastest-response, and a local user reads what it
learned, while ISP1's carrier is cut (issue 12, defects 4 and 5).

The daemon runs fastest-response as its default rule; the churn client's Internet host has a
priority rule of its own (ISP1 first), so that the carrier-loss trials (failover.py's
`one_fault`) measure the same failover as the other classes. The scans use
tests/integration/test_fastest_response.py's approach and helpers: 198.18.0.0/16 on the
Internet namespace's loopback answers every address with a reset, and nothing leaves the lab;
the router's own SYNs (a race connects through every link) are counted by destination in a
table of its namespace. That range is special-purpose (benchmarking, not globally reachable),
which fastest-response races only with `race_private = true`: the cases that race set it.
Cases:

- ``scan``: before each trial a LAN client starts opening connections to SCAN_COUNT new
  destinations at SCAN_RATE a second (a fresh range each time) and the carrier is cut about a
  second into it; the daemon's defaults for races_per_second and max_learned. Figures:
  destinations scanned, races the router made, races per second (over the scans' time, and the
  most within one second: the destinations raced in the last second, sampled every
  RATE_SAMPLE_S), the learned map's largest size (sampled every LEARNED_SAMPLE_S) against
  max_learned;
- ``scan-not-global``: the same scan once, with race_private left false: races made (0 expected:
  the range is not global), no carrier trial;
- ``getlearned``: a large learned table (races_per_second = 1000 and max_learned = 8192, so
  that one scan fills it; scanned again before a trial whenever it holds fewer than
  LARGE_TABLE: a carrier loss forgets ISP1's half), then CALLERS processes as `nobody` on a
  private bus with the project's policy (as fault_bus.py) calling GetLearned back to back over
  every page, through the trial. Figures: learned entries before each trial, calls made, calls
  per second, slowest reply;
- ``large-table``: the control for getlearned: the same table and trials with no caller, on one
  daemon (CONTROL_TRIALS), so that what the callers add shows apart from what the table costs.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from uplinkd.config.model import Method, Rule
from uplinkd_lab.lab import INET_HOST, Lab, LabError

from tests.integration.privatebus import private_bus
from tests.integration.test_fastest_response import SCAN, SCAN_NET, count_races, learned, raced

from .failover import TrialError, _require
from .fault_bus import _available
from .fault_kit import BusCallers, Case, Watched, carrier_trials, closed_case, wait_until
from .monitors import LINKS

SCAN_COUNT = 5000
SCAN_RATE = 1000.0  # new destinations a second
SCAN_TAIL_S = 0.5  # the scan script waits this long after its last connection
INTO_SCAN_S = 1.0  # the scan has been going this long when a trial starts
RATE_SAMPLE_S = 0.2
LEARNED_SAMPLE_S = 0.5
LARGE_TABLE = 3000
FILL_WITHIN_S = 20.0
CALLERS = 16
PAGE = 100  # GetLearned answers at most 100 entries a call
CONTROL_TRIALS = 2  # the large table without callers: one daemon
CALLER_SECONDS = 60.0  # a caller stops by itself after this, whatever happens
# The daemon's own defaults, for the figures' labels (races_per_second, max_learned).
DEFAULT_RULE = Rule(name="default", method=Method.FASTEST_RESPONSE)

# The churn client's host keeps ISP1 first, as in every class; everything else is raced.
CHURN_RULE = f"""
[[rule]]
name = "churn"
match = {{ dst = ["{INET_HOST}"] }}
method = "priority"
"""
# The router's SYNs to the scan range in the last second: a race connects through every link.
RECENT = f"""table ip labscanrate {{
 set recent {{
  type ipv4_addr
  size 65535
  flags dynamic,timeout
  timeout 1s
 }}
 chain out {{
  type filter hook output priority 0; policy accept;
  ip daddr {SCAN_NET} tcp flags & (syn | ack) == syn add @recent {{ ip daddr }}
 }}
}}
"""
# Every page of GetLearned, back to back, until the stop file appears.
CALLER = r"""
import json, os, sys, time
import dbus, dbus.bus
address, stop_file, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])
NAME, PATH = "org.uplinkd.Uplinkd1", "/org/uplinkd/Uplinkd1"
MANAGER = "org.uplinkd.Uplinkd1.Manager"
bus = dbus.bus.BusConnection(address)
print("ready", flush=True)
calls, slowest, largest, offset, errors = 0, 0.0, 0, 0, {}
end = time.monotonic() + seconds
while time.monotonic() < end and not os.path.exists(stop_file):
    begin = time.monotonic()
    try:
        page, total = bus.call_blocking(
            NAME, PATH, MANAGER, "GetLearned", "uu", (dbus.UInt32(offset), dbus.UInt32(100)),
            timeout=10)
    except dbus.exceptions.DBusException as exc:
        name = exc.get_dbus_name() or "error"
        errors[name] = errors.get(name, 0) + 1
        page, total = [], 0
    slowest = max(slowest, time.monotonic() - begin)
    calls += 1
    largest = max(largest, int(total))
    offset = offset + len(page) if page and offset + len(page) < total else 0
print(json.dumps({"calls": calls, "slowest_s": slowest, "largest_total": largest,
                  "errors": errors}), flush=True)
"""


def config(*settings: str) -> str:
    """monitors.LINKS with fastest-response as the default rule and `settings` in it."""
    links, found, _ = LINKS.partition("[default]")
    if not found:
        raise RuntimeError("monitors.LINKS has no [default] table")
    lines = "".join(f"{line}\n" for line in settings)
    return f'{links}{CHURN_RULE}\n[default]\nmethod = "fastest-response"\n{lines}'


@contextmanager
def counting(lab: Lab) -> Iterator[None]:
    """The scan range answering in the Internet namespace and the router's races counted;
    removed again on exit (the lab goes on to other classes)."""
    count_races(lab)
    try:
        lab.run(lab.ns_router, "nft", "-f", "-", stdin=RECENT)
        yield
    finally:
        for table in ("labraces", "labscanrate"):
            lab.run(lab.ns_router, "nft", "delete", "table", "ip", table, check=False)
        lab.run(lab.ns_inet, "ip", "address", "del", str(SCAN_NET), "dev", "lo", check=False)


def _set_size(lab: Lab, table: str, name: str) -> int:
    listed = lab.run(lab.ns_router, "nft", "-j", "list", "set", "ip", table, name)
    items = json.loads(listed.stdout)["nftables"]
    return len(next(item["set"] for item in items if "set" in item).get("elem", []))


def _learned_size(lab: Lab) -> int | None:
    try:
        return len(learned(lab))
    except (LabError, OSError, subprocess.SubprocessError, ValueError, KeyError, StopIteration):
        return None  # no map (yet): the daemon has not applied


class Scan:
    """SCAN_COUNT new destinations from the LAN, starting at the `block`th SCAN_COUNT of the
    scan range; meanwhile the races of the last second and the learned map's size sampled."""

    def __init__(self, lab: Lab, block: int, *, sample: bool = True) -> None:
        self.lab = lab
        self.first = SCAN_NET[block * SCAN_COUNT]
        self.last = SCAN_NET[(block + 1) * SCAN_COUNT - 1]
        lab.run(lab.ns_router, "nft", "flush", "set", "ip", "labraces", "raced")
        lab.run(lab.ns_router, "nft", "flush", "set", "ip", "labscanrate", "recent")
        self.finished = False
        self.most_in_a_second = 0
        self.most_learned = 0
        self.seconds = 0.0
        self.races = 0
        self._done = threading.Event()
        argv = [sys.executable, "-c", SCAN, str(self.first), str(SCAN_COUNT), str(SCAN_RATE)]
        self.began = time.monotonic()
        self.proc = subprocess.Popen(["ip", "netns", "exec", lab.ns_lan, *argv])
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        if sample:
            self._sampler.start()

    def _sample(self) -> None:
        next_learned = 0.0
        while not self._done.is_set():
            try:
                size = _set_size(self.lab, "labscanrate", "recent")
                self.most_in_a_second = max(self.most_in_a_second, size)
            except (LabError, OSError, subprocess.SubprocessError, ValueError, StopIteration):
                pass
            if time.monotonic() >= next_learned:
                self.most_learned = max(self.most_learned, _learned_size(self.lab) or 0)
                next_learned = time.monotonic() + LEARNED_SAMPLE_S
            self._done.wait(RATE_SAMPLE_S)

    def running(self) -> bool:
        return self.proc.poll() is None

    def finish(self) -> None:
        """Wait for the scan's end; count the destinations of its range the router raced."""
        if self.finished:
            return
        self.finished = True
        try:
            self.proc.wait(timeout=SCAN_COUNT / SCAN_RATE + 30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise TrialError("the scan did not end in time") from None
        finally:
            self.seconds = time.monotonic() - self.began - SCAN_TAIL_S
            time.sleep(0.2)  # the last races' SYNs
            self._done.set()
            if self._sampler.is_alive():
                self._sampler.join(timeout=10)
        _require(self.proc.returncode == 0, f"the scan exited with {self.proc.returncode}")
        first, last = self.first, self.last
        self.races = sum(first <= ipaddress.IPv4Address(a) <= last for a in raced(self.lab))
        self.most_learned = max(self.most_learned, _learned_size(self.lab) or 0)


class Tally:
    """A case's scan figures over its scans."""

    def __init__(self) -> None:
        self.scanned = self.races = self.most_in_a_second = self.most_learned = 0
        self.seconds = 0.0

    def add(self, scan: Scan) -> None:
        """`scan`'s figures, once it is over."""
        scan.finish()
        self.scanned += SCAN_COUNT
        self.races += scan.races
        self.seconds += scan.seconds
        self.most_in_a_second = max(self.most_in_a_second, scan.most_in_a_second)
        self.most_learned = max(self.most_learned, scan.most_learned)

    def into(self, case: Case, races_per_second: int, max_learned: int) -> None:
        case.note("destinations scanned", self.scanned)
        case.note("races made", self.races)
        mean = round(self.races / self.seconds, 1) if self.seconds else None
        case.note(f"races per second (limit {races_per_second})", mean)
        case.note("most races within 1 s", self.most_in_a_second)
        case.note(f"largest learned map (cap {max_learned})", self.most_learned)


def _cleanup(watched: Watched | None, lab: Lab) -> None:
    if watched is not None:
        watched.stop()
        watched.runner.run(watched.config, "--stop", check=False)
    lab.set_link(1, up=True)


def scan_case(lab: Lab, tmp: Path, trials: int) -> Case:
    tried = f"{SCAN_COUNT:,} new destinations at {SCAN_RATE:,.0f}/s from the LAN (race_private)"
    case = Case("scan", "scan", tried, repeats=0)
    tally = Tally()
    text = config("race_private = true")
    for index in range(-(-trials // 2)):
        watched: Watched | None = None
        scans: list[Scan] = []

        def before(scans: list[Scan] = scans) -> None:
            if scans:  # one scan at a time, each counted on its own
                tally.add(scans[-1])
            scans.append(Scan(lab, len(scans)))
            time.sleep(INTO_SCAN_S)
            _require(scans[-1].running(), "the scan was over before the cut")

        def scanning(scans: list[Scan] = scans) -> bool:
            return bool(scans) and scans[-1].running()

        try:
            watched = Watched(lab, tmp / f"scan{index}", text)
            since = watched.mark()
            carrier_trials(watched, case, min(2, trials - 2 * index), scanning, before)
            if scans:
                tally.add(scans[-1])
            closed_case(case, watched, since)
            case.repeats += 1
            case.add_figure("tracebacks in the log", watched.log_text.count("Traceback"))
        except (TrialError, LabError, OSError, subprocess.SubprocessError) as exc:
            case.errors.append(str(exc).splitlines()[0])
        finally:
            for scan in scans:
                if scan.running():
                    scan.proc.kill()
                    scan.proc.wait(timeout=10)
            _cleanup(watched, lab)
    tally.into(case, DEFAULT_RULE.races_per_second, DEFAULT_RULE.max_learned)
    return case


def not_global_case(lab: Lab, tmp: Path) -> Case:
    tried = "the same scan once, race_private false (the range is not global); no carrier trial"
    case = Case("scan", "scan-not-global", tried, repeats=0)
    tally = Tally()
    watched: Watched | None = None
    try:
        watched = Watched(lab, tmp / "scan-not-global", config())
        since = watched.mark()
        tally.add(Scan(lab, 0))
        closed_case(case, watched, since)
        case.repeats += 1
    except (TrialError, LabError, OSError, subprocess.SubprocessError) as exc:
        case.errors.append(str(exc).splitlines()[0])
    finally:
        _cleanup(watched, lab)
    case.note("destinations scanned", tally.scanned)
    case.note("races made", tally.races)
    case.note("largest learned map", tally.most_learned)
    return case


class Callers(BusCallers):
    """`count` processes as nobody reading every page of GetLearned, until `stop`."""

    def __init__(self, address: str, directory: Path, count: int) -> None:
        args = (str(CALLER_SECONDS),)
        super().__init__("GetLearned caller", CALLER, address, directory, count, args=args)


def table_case(lab: Lab, tmp: Path, trials: int, callers: int) -> Case:
    """A large learned table and `callers` GetLearned callers (none: the control)."""
    table = f"{LARGE_TABLE:,}+ learned (max_learned 8192)"
    if callers:
        tried = f"{callers} callers as nobody reading every page of GetLearned, {table}"
        case = Case("scan", "getlearned", tried, repeats=0)
    else:
        tried = f"{table}, no caller (the control for getlearned)"
        case = Case("scan", "large-table", tried, repeats=0)
    missing = _available()
    if missing:
        case.errors.append(f"not run: {missing}")
        return case
    text = config("race_private = true", "races_per_second = 1000", "max_learned = 8192")
    sizes: list[int] = []
    calls, seconds, slowest, largest = 0, 0.0, 0.0, 0
    errors: dict[str, int] = {}
    directory = Path(tempfile.mkdtemp(prefix="uplinkd-getlearned-"))
    directory.chmod(0o755)
    try:
        for index in range(-(-trials // 2)):
            with private_bus() as bus:
                watched: Watched | None = None
                try:
                    workdir = tmp / f"{case.case}{index}"
                    watched = Watched(lab, workdir, text, bus_address=bus.address)
                    named = watched.daemon.log.wait_for("on the system bus as", 10)
                    _require(named, "the daemon did not take its bus name")
                    since = watched.mark()
                    for block in range(min(2, trials - 2 * index)):
                        sizes.append(_fill(lab, block))
                        calling = Callers(bus.address, directory, callers)
                        try:
                            carrier_trials(watched, case, 1, calling.running)
                        finally:
                            calling.stop()
                        seconds += calling.seconds
                        for result in calling.results:
                            calls += int(result["calls"])
                            slowest = max(slowest, float(result["slowest_s"]))
                            largest = max(largest, int(result["largest_total"]))
                            for name, count in result["errors"].items():
                                errors[name] = errors.get(name, 0) + count
                    closed_case(case, watched, since)
                    case.repeats += 1
                    case.add_figure("tracebacks in the log", watched.log_text.count("Traceback"))
                except (TrialError, LabError, OSError, subprocess.SubprocessError) as exc:
                    case.errors.append(str(exc).splitlines()[0])
                finally:
                    _cleanup(watched, lab)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    spread = f"{min(sizes):,} to {max(sizes):,}" if sizes else None
    case.note("learned before each trial", spread)
    if callers:
        case.note("largest total a caller saw", largest)
        case.note("calls made", calls)
        case.note("calls per second", round(calls / seconds) if seconds else None)
        case.note("slowest reply", f"{slowest * 1000:.0f} ms")
        case.note("error replies", errors)
    return case


def _fill(lab: Lab, block: int) -> int:
    """Scan the `block`th range if fewer than LARGE_TABLE are learned; how many are then."""
    if (_learned_size(lab) or 0) < LARGE_TABLE:
        Scan(lab, block, sample=False).finish()
        full = wait_until(lambda: (_learned_size(lab) or 0) >= LARGE_TABLE, FILL_WITHIN_S, 0.5)
        _require(full, f"fewer than {LARGE_TABLE} learned after a scan")
    return _learned_size(lab) or 0


def run(lab: Lab, tmp: Path, trials: int, log: Callable[[str], None]) -> list[Case]:
    def logged(case: Case) -> Case:
        log(f"  scan/{case.case}: {case.describe()}")
        return case

    with counting(lab):
        return [
            logged(scan_case(lab, tmp, trials)),
            logged(not_global_case(lab, tmp)),
            logged(table_case(lab, tmp, min(trials, CONTROL_TRIALS), 0)),
            logged(table_case(lab, tmp, trials, CALLERS)),
        ]
