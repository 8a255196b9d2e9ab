"""Fault class "dbus": an unprivileged caller floods the daemon's bus interface while ISP1's
carrier is cut (issue 12, defect 5 and "D-Bus" of the fault suite).

The daemon runs on a private system-like bus with the project's own policy file
(tests/integration/privatebus.py). Before each carrier-loss trial FLOODERS processes start as
`nobody` (setpriv), each calling, in turn and as fast as the replies come, every method and
property read of the interface (GetLearned on an empty table: no fastest-response rule), the
three an unprivileged caller must be refused (Reload, SetLinkEnabled, NotifyDevice) and one
call with malformed arguments; they run through the trial
and stop when it is over (at least MIN_CALLS calls in all: the flood goes on until then). The
callers run the distribution's python3 with dbus-python, which `nobody` may run (the checkout's
venv python lies under /root). Figures: calls made and their rate, replies by outcome (a
refused admin call is the bus's AccessDenied; anything else for those three is a hole), and
the failover during the flood.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from uplinkd_lab.lab import Lab

from tests.integration.privatebus import private_bus

from .failover import TrialError, _require
from .fault_kit import (
    AS_NOBODY,
    SYSTEM_PYTHON,
    BusCallers,
    Case,
    Watched,
    carrier_trials,
    closed_case,
)

FLOODERS = 4
MIN_CALLS = 2000
MAX_SECONDS = 60.0

FLOODER = r"""
import json, os, sys, time
import dbus, dbus.bus
address, stop_file = sys.argv[1], sys.argv[2]
seconds, at_least = float(sys.argv[3]), int(sys.argv[4])
NAME, PATH = "org.uplinkd.Uplinkd1", "/org/uplinkd/Uplinkd1"
MANAGER, PROPS = "org.uplinkd.Uplinkd1.Manager", "org.freedesktop.DBus.Properties"
U = dbus.UInt32
CALLS = [
    ("GetStatus", PATH, MANAGER, "GetStatus", "", ()),
    ("GetLearned", PATH, MANAGER, "GetLearned", "uu", (U(0), U(100))),
    ("GetLearned malformed", PATH, MANAGER, "GetLearned", "s", ("x",)),
    ("DryRun", PATH, MANAGER, "DryRun", "", ()),
    ("Get Generation", PATH, PROPS, "Get", "ss", (MANAGER, "Generation")),
    ("GetAll manager", PATH, PROPS, "GetAll", "s", (MANAGER,)),
    ("GetAll ISP1", PATH + "/link/ISP1", PROPS, "GetAll", "s", ("org.uplinkd.Uplinkd1.Link",)),
    ("GetManagedObjects", PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects", "", ()),
    ("Introspect", PATH, "org.freedesktop.DBus.Introspectable", "Introspect", "", ()),
    ("Reload (admin)", PATH, MANAGER, "Reload", "", ()),
    ("SetLinkEnabled ISP1 off (admin)", PATH, MANAGER, "SetLinkEnabled", "sb", ("ISP1", False)),
    ("NotifyDevice wan1 down (admin)", PATH, MANAGER, "NotifyDevice", "ss", ("wan1", "down")),
]
bus = dbus.bus.BusConnection(address)
print("ready", flush=True)
outcomes, slowest, calls = {}, 0.0, 0
end = time.monotonic() + seconds
while time.monotonic() < end and (calls < at_least or not os.path.exists(stop_file)):
    label, path, interface, member, signature, args = CALLS[calls % len(CALLS)]
    begin = time.monotonic()
    try:
        bus.call_blocking(NAME, path, interface, member, signature, args, timeout=10)
        result = "ok"
    except dbus.exceptions.DBusException as exc:
        result = exc.get_dbus_name() or "error"
    slowest = max(slowest, time.monotonic() - begin)
    key = label + ": " + result
    outcomes[key] = outcomes.get(key, 0) + 1
    calls += 1
print(json.dumps({"calls": calls, "outcomes": outcomes, "slowest_s": slowest}), flush=True)
"""


class Flood(BusCallers):
    """FLOODERS caller processes as nobody, until `stop` (bounded by MAX_SECONDS)."""

    def __init__(self, address: str, directory: Path) -> None:
        args = (str(MAX_SECONDS), str(-(-MIN_CALLS // FLOODERS)))
        super().__init__("flooder", FLOODER, address, directory, FLOODERS, args=args)

    @property
    def calls(self) -> int:
        return sum(int(r["calls"]) for r in self.results)


def _available() -> str:
    if not shutil.which("setpriv") or not shutil.which("dbus-daemon"):
        return "setpriv and dbus-daemon are needed"
    probe = subprocess.run(
        [*AS_NOBODY, SYSTEM_PYTHON, "-c", "import dbus.bus"],
        capture_output=True,
        text=True,
        check=False,
    )
    return "" if probe.returncode == 0 else f"nobody cannot import dbus: {probe.stderr.strip()}"


def run(lab: Lab, tmp: Path, trials: int, log: Callable[[str], None]) -> list[Case]:
    case = Case("dbus", "flood", "every method as nobody, admin calls, malformed args", 0)
    missing = _available()
    if missing:
        case.errors.append(f"not run: {missing}")
        return [case]
    outcomes: dict[str, int] = {}
    calls, seconds, slowest = 0, 0.0, 0.0
    directory = Path(tempfile.mkdtemp(prefix="uplinkd-flood-"))
    directory.chmod(0o755)
    try:
        for index in range(-(-trials // 2)):
            with private_bus() as bus:
                watched: Watched | None = None
                try:
                    watched = Watched(lab, tmp / f"dbus{index}", bus_address=bus.address)
                    named = watched.daemon.log.wait_for("on the system bus as", 10)
                    _require(named, "the daemon did not take its bus name")
                    since = watched.mark()
                    for _ in range(min(2, trials - 2 * index)):
                        flood = Flood(bus.address, directory)
                        try:
                            carrier_trials(watched, case, 1, flood.running)
                        finally:
                            flood.stop()
                        calls += flood.calls
                        seconds += flood.seconds
                        for result in flood.results:
                            for key, count in result["outcomes"].items():
                                outcomes[key] = outcomes.get(key, 0) + count
                            slowest = max(slowest, float(result["slowest_s"]))
                    closed_case(case, watched, since)
                    case.repeats += 1
                    text = watched.log_text
                    case.add_figure("links disabled by a caller", text.count("-> disabled"))
                    case.add_figure("tracebacks in the log", text.count("Traceback"))
                except (TrialError, OSError, subprocess.SubprocessError, AssertionError) as exc:
                    case.errors.append(str(exc).splitlines()[0])
                finally:
                    if watched is not None:
                        watched.stop()
                        watched.runner.run(watched.config, "--stop", check=False)
                    lab.set_link(1, up=True)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    case.note("calls made", calls)
    case.note("calls per second", round(calls / seconds) if seconds else None)
    case.note("slowest reply", f"{slowest * 1000:.0f} ms")
    admin_ok = sum(n for key, n in outcomes.items() if "(admin): ok" in key)
    case.note("admin calls answered ok", admin_ok)
    case.note("replies", dict(sorted(outcomes.items())))
    log(f"  dbus/flood: {case.describe()}")
    return [case]
