"""Fault classes of the daemon process itself: kill -9, reloads, flapping (issue 12).

- ``kill9``: under churn load and one long TCP stream (a download shaped to 50 Mbit/s on ISP1),
  the daemon is killed with SIGKILL, left dead 1 s and started again with the same
  configuration; the restart must adopt the datapath in place (its first apply says
  `netfilter: none` and changes no route or rule). Connections failed from the kill to 1 s after
  the restart's first apply, whether the stream lived, then a carrier-loss trial on the
  restarted daemon.
- ``reloads``: one daemon on a private bus with the project's policy
  (tests/integration/privatebus.py), under churn load: 50 SIGHUPs 20 ms apart; four broken
  files, each with a SIGHUP (refused with file:line, the kernel unchanged); a file that changes
  the links (ISP2 made the primary, then back) and one that removes ISP2 (then back). Then the
  same through D-Bus as root (an administrator): 50 Reload calls back to back; the four broken
  files, each with a Reload whose error reply must name file:line, the kernel unchanged and
  nothing applied; the primary swapped and ISP2 removed by Reload; then two carrier-loss trials
  while RELOADERS callers call Reload back to back (the distribution's python3 with
  dbus-python, as fault_bus.py's flood).
- ``flapping``: one daemon under churn load: ISP1's carrier changed 100 times in 20 s (down and
  up every 200 ms; ``flapping-slow``: 14 times, 1.6 s apart, long enough for ISP1 to be taken
  back between losses, so that flap damping must hold it); applies, failed connections, and
  the final state: ISP2 never went down, every connection in the last 2 s succeeded, and the
  daemon's last apply uses the links whose carrier is up (ISP1 may be held by flap damping,
  which is what damping is for).
"""

from __future__ import annotations

import re
import signal
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from uplinkd.publish.bus_api import ErrorName
from uplinkd_lab.lab import BULK_PORT, INET_HOST, Lab, LabError

from tests.integration.privatebus import private_bus

from .failover import TrialError, _require
from .fault_kit import BusCallers, Case, Load, Watched, carrier_trials, wait_until
from .monitors import LINKS

STREAM_MBIT = 50
STREAM_S = 8.0
DEAD_S = 1.0
SIGHUPS = 50
SIGHUP_GAP_S = 0.020
BUS_RELOADS = 50
RELOADERS = 2  # callers calling Reload at once during the carrier-loss trials
RELOADER_MAX_S = 60.0
UP_AGAIN_S = 15.0  # a link a reload added back is up again within this
RELOAD_FAILED = ErrorName.RELOAD_FAILED.value
# (name, carrier changes, seconds between them): fast flapping, where the link never stays up
# long enough to be taken back (5 replies in a row at 200 ms), and slow flapping, where it does
# and flap damping must hold it.
FLAPPING = {"flapping": (100, 0.200), "flapping-slow": (14, 1.6)}
QUIET_S = 2.0

PRIMARY_SWAPPED = LINKS.replace("priority = 1", "priority = 9").replace(
    "priority = 2", "priority = 1"
)
WITHOUT_ISP2 = re.sub(r'\[\[link\]\]\nname = "ISP2".*?\n\n', "", LINKS, flags=re.S)
BROKEN = {
    "TOML syntax": LINKS + "\n[monitor\n",
    "unknown key": LINKS.replace('device = "wan2"', 'device = "wan2"\nwieght = 3'),
    "bad value": LINKS.replace("priority = 2", "priority = -4"),
    "no LAN device": LINKS.replace('device = "lan0"', 'device = "lan9"'),
}


class Stream:
    """One long download through the router (lab.download in a thread)."""

    def __init__(self, lab: Lab) -> None:
        self.mbit_s: float | None = None
        self.error = ""

        def receive() -> None:
            try:
                got = lab.download(lab.ns_lan, INET_HOST, BULK_PORT, seconds=STREAM_S)
                self.mbit_s = got.mbit_s
            except (LabError, OSError, subprocess.SubprocessError, ValueError) as exc:
                self.error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__

        self.thread = threading.Thread(target=receive, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(timeout=STREAM_S + 30)


def kill9(lab: Lab, tmp: Path, trials: int, log: Callable[[str], None]) -> Case:
    case = Case("process", "kill9", "kill -9 under load and a 50 Mbit/s stream; restart", 0)
    lab.start_bulk_server(lab.ns_inet, INET_HOST)
    lab.set_bandwidth(1, STREAM_MBIT)
    adopted = untouched = streams_alive = control_failed = control_made = 0
    window_failed = window_made = 0
    restart_ready: list[float] = []
    try:
        for index in range(trials):
            first = second = None
            load: Load | None = None
            try:
                first = Watched(lab, tmp / f"kill9-{index}")
                since_first = first.mark()
                load = Load(lab)
                stream = Stream(lab)
                t_load = time.monotonic()
                time.sleep(2.0)
                t_kill = time.monotonic()
                # The same load before the kill: what the shaped stream alone costs.
                control_failed += load.failed(t_load, t_kill)
                control_made += len(load.between(t_load, t_kill))
                first.kill()
                first.into(case, since_first)
                time.sleep(DEAD_S)
                begin = time.monotonic()
                second = Watched(lab, first.runner.workdir, clean=False, wait_up=False)
                t_ready = time.monotonic()
                restart_ready.append(t_ready - begin)
                time.sleep(1.0)
                window_failed += load.failed(t_kill, t_ready + 1.0)
                window_made += len(load.between(t_kill, t_ready + 1.0))
                case.add("failed_connections", load.failed(t_kill, t_ready + 1.0))
                case.add("attempts", len(load.between(t_kill, t_ready + 1.0)))
                first_apply = next(x for x in second.daemon.log.lines if "applied generation" in x)
                adopted += "adopting the datapath in place" in second.log_text
                untouched += "netfilter: none; routes +0/-0; rules +0/-0" in first_apply
                load.stop()
                load = None
                stream.join()
                if stream.mbit_s is not None:
                    streams_alive += 1
                else:
                    case.errors.append(f"stream: {stream.error}")
                since_second = second.mark()
                carrier_trials(second, case, 1)
                second.stop()
                second.into(case, since_second)
                case.repeats += 1
            except (TrialError, OSError, subprocess.SubprocessError, AssertionError) as exc:
                case.errors.append(str(exc).splitlines()[0])
            finally:
                if load is not None:
                    load.stop()
                for watched in (first, second):
                    if watched is not None:
                        watched.stop()
                if first is not None:
                    first.runner.run(first.config, "--stop", check=False)
                lab.set_link(1, up=True)
    finally:
        lab.set_bandwidth(1, None)
    case.note(
        "failed / made from the kill to 1 s after the restart", f"{window_failed} / {window_made}"
    )
    case.note(
        "failed / made in the 2 s before each kill (control)", f"{control_failed} / {control_made}"
    )
    case.note("restarts that adopted", f"{adopted}/{case.repeats}")
    case.note("first apply `netfilter: none`, no route/rule change", f"{untouched}/{case.repeats}")
    case.note("streams unbroken", f"{streams_alive}/{case.repeats}")
    if restart_ready:
        case.note("restart to first apply (max)", f"{max(restart_ready):.2f} s")
    log(f"  process/kill9: {case.describe()}")
    return case


def reload_with(watched: Watched, text: str, timeout: float = 10.0) -> tuple[int, float]:
    """Write `text`, SIGHUP; wait until the reload was applied or refused. (log mark, time)"""
    watched.config.write_text(text)
    mark = watched.mark()
    sent = time.monotonic()
    watched.daemon.send(signal.SIGHUP)
    wait_until(
        lambda: watched.applies(mark) > 0 or watched.count("reload refused", mark) > 0, timeout
    )
    return mark, sent


# Calls the Manager's Reload as root: `count` times, or until `stop_file` exists (at most
# `seconds`); prints "ready", then a JSON line with the outcomes, the error messages (the first
# few), each call's reply time and when it began (time.monotonic: CLOCK_MONOTONIC, the same
# clock in every process).
RELOADER = r"""
import json, os, sys, time
import dbus, dbus.bus
address, stop_file, count, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
stop_file = "" if count else stop_file  # a counted run makes its count
NAME, PATH = "org.uplinkd.Uplinkd1", "/org/uplinkd/Uplinkd1"
MANAGER = NAME + ".Manager"
bus = dbus.bus.BusConnection(address)
print("ready", flush=True)
outcomes, errors, replies, began = {}, [], [], []
end = time.monotonic() + seconds
while time.monotonic() < end and (
    len(replies) < count or (stop_file and not os.path.exists(stop_file))
):
    begin = time.monotonic()
    began.append(begin)
    try:
        bus.call_blocking(NAME, PATH, MANAGER, "Reload", "", (), timeout=30)
        result = "ok"
    except dbus.exceptions.DBusException as exc:
        result = exc.get_dbus_name() or "error"
        errors.append(exc.get_dbus_message())
    replies.append(time.monotonic() - begin)
    outcomes[result] = outcomes.get(result, 0) + 1
result = {"outcomes": outcomes, "errors": errors[:5], "replies_s": replies, "began": began}
print(json.dumps(result), flush=True)
"""


class Reloaders:
    """`callers` processes calling Reload as root: each `count` times, or (count 0) until
    stop(). Their results are merged: outcomes, error messages, reply times."""

    def __init__(self, address: str, directory: Path, count: int = 0, callers: int = 1) -> None:
        self.outcomes: dict[str, int] = {}
        self.errors: list[str] = []
        self.replies_s: list[float] = []
        self.began: list[float] = []
        args = (str(count), str(RELOADER_MAX_S))
        self._callers = BusCallers(
            "Reload caller", RELOADER, address, directory, callers, args=args, as_root=True
        )

    def running(self) -> bool:
        return self._callers.running()

    def stop(self) -> Reloaders:
        for result in self._callers.stop():
            for key, n in result["outcomes"].items():
                self.outcomes[key] = self.outcomes.get(key, 0) + n
            self.errors += result["errors"]
            self.replies_s += result["replies_s"]
            self.began += result["began"]
        return self

    @property
    def calls(self) -> int:
        return len(self.replies_s)

    def replies(self) -> str:
        if not self.replies_s:
            return "n/a"
        median = statistics.median(self.replies_s)
        return f"{_ms(median)} median, {_ms(max(self.replies_s))} at most"


def _bus_reloads(watched: Watched, load: Load, address: str, work: Path, case: Case) -> None:
    """The reloads case's D-Bus part (see the module's docstring)."""
    begin, mark = time.monotonic(), watched.mark()
    storm = Reloaders(address, work, BUS_RELOADS).stop()
    failed = load.failed(begin)
    ok = storm.outcomes.get("ok", 0)
    case.note(
        "D-Bus Reloads called / answered ok / applies",
        f"{storm.calls} / {ok} / {watched.applies(mark)}",
    )
    case.note("D-Bus Reload reply time", storm.replies())
    case.note("failed connections during the D-Bus Reloads", failed)
    named = unchanged = kept = 0
    example = ""
    for text in BROKEN.values():
        watched.config.write_text(text)
        before, mark, sent = watched.runner.kernel_state(), watched.mark(), time.monotonic()
        call = Reloaders(address, work, 1).stop()
        message = call.errors[0] if call.errors else ""
        refused = call.outcomes.get(RELOAD_FAILED, 0) == 1
        config_line = rf"{re.escape(str(watched.config))}:\d+"
        named += refused and re.search(config_line, message) is not None
        example = example or message
        unchanged += watched.runner.kernel_state() == before
        time.sleep(0.2)
        # Still the previous configuration: nothing applied, new connections still via ISP1.
        after = load.between(sent)
        kept += watched.applies(mark) == 0 and bool(after) and all(r.isp == "ISP1" for r in after)
    case.note("broken files refused by Reload naming file:line", f"{named}/{len(BROKEN)}")
    case.note("kernel unchanged by a refused Reload", f"{unchanged}/{len(BROKEN)}")
    case.note("previous configuration kept (no apply, ISP1 in use)", f"{kept}/{len(BROKEN)}")
    case.note("error reply, e.g.", f"{RELOAD_FAILED}: {example[:160]}")
    watched.config.write_text(PRIMARY_SWAPPED)
    swap = Reloaders(address, work, 1).stop()
    moved_in: float | None = None
    if swap.outcomes.get("ok") and swap.began:
        called = swap.began[0]
        moved = load.client.wait_for(lambda r: r.isp == "ISP2" and r.start >= called, 10)
        moved_in = moved.end - called if moved else None
    case.note("Reload: ISP2 made primary, new connections moved in (from the call)", _ms(moved_in))
    mark = watched.mark()
    for text in (WITHOUT_ISP2, LINKS):
        watched.config.write_text(text)
        Reloaders(address, work, 1).stop()
    back = wait_until(lambda: watched.count("link ISP2: init -> up", mark) > 0, UP_AGAIN_S)
    case.note("Reload: ISP2 removed and added again, applies", watched.applies(mark))
    _require(back, "ISP2 did not come up again after a Reload added it")


def reloads(lab: Lab, tmp: Path, log: Callable[[str], None]) -> Case:
    tried = (
        "50 SIGHUPs; 50 D-Bus Reloads as root; 4 broken files by each; files that change"
        f" the links by each; failover while {RELOADERS} callers Reload"
    )
    case = Case("process", "reloads", tried)
    with private_bus() as bus:
        _reloads(lab, tmp, bus.address, case)
    log(f"  process/reloads: {case.describe()}")
    return case


def _reloads(lab: Lab, tmp: Path, address: str, case: Case) -> None:
    watched = Watched(lab, tmp / "reloads", bus_address=address)
    since = watched.mark()
    load = Load(lab)
    try:
        _require(watched.daemon.log.wait_for("on the system bus as", 10), "not on the bus")
        # 50 SIGHUPs in a row (the daemon may merge those that arrive during a reload).
        mark, begin = watched.mark(), time.monotonic()
        for _ in range(SIGHUPS):
            watched.daemon.send(signal.SIGHUP)
            time.sleep(SIGHUP_GAP_S)
        time.sleep(QUIET_S)
        case.note(
            "SIGHUPs sent / reloads logged", f"{SIGHUPS}/{watched.count('SIGHUP: reloading', mark)}"
        )
        case.note("applies during the SIGHUPs", watched.applies(mark))
        case.note("failed connections during the SIGHUPs", load.failed(begin))
        # Broken files: each refused with file:line, the kernel as it was.
        named = unchanged = 0
        for text in BROKEN.values():
            before = watched.runner.kernel_state()
            mark, _ = reload_with(watched, text)
            refusal = [x for x in watched.daemon.log.lines[mark:] if "reload refused" in x]
            named += (
                bool(refusal)
                and re.search(rf"{re.escape(str(watched.config))}:\d+", refusal[0]) is not None
            )
            unchanged += watched.runner.kernel_state() == before
        reload_with(watched, LINKS)
        case.note("broken files refused naming file:line", f"{named}/{len(BROKEN)}")
        case.note("kernel unchanged by a broken file", f"{unchanged}/{len(BROKEN)}")
        # Files that change the links.
        _, sent = reload_with(watched, PRIMARY_SWAPPED)
        moved = load.client.wait_for(lambda r: r.isp == "ISP2" and r.start >= sent, 10)
        case.note(
            "ISP2 made primary: new connections moved in", _ms(moved.end - sent if moved else None)
        )
        _, sent = reload_with(watched, LINKS)
        back = load.client.wait_for(lambda r: r.isp == "ISP1" and r.start >= sent, 10)
        case.note("and back in", _ms(back.end - sent if back else None))
        mark, _ = reload_with(watched, WITHOUT_ISP2)
        reload_with(watched, LINKS)
        up = wait_until(lambda: watched.count("link ISP2: init -> up", mark) > 0, UP_AGAIN_S)
        case.note("ISP2 removed and added again: applies", watched.applies(mark))
        _require(up, "ISP2 did not come up again after a SIGHUP added it")
        _bus_reloads(watched, load, address, tmp / "reloaders", case)
        time.sleep(0.5)
        case.add("failed_connections", load.failed(begin))
        case.add("attempts", len(load.between(begin)))
        case.note("connections by ISP", load.by_isp(begin))
        load.stop()  # the trials' own client measures them
        # Carrier losses while callers Reload back to back.
        during = Reloaders(address, tmp / "reloaders", 0, RELOADERS)
        try:
            carrier_trials(watched, case, 2, during.running)
        finally:
            during.stop()
        case.note(
            "Reloads during the carrier trials: called / ok",
            f"{during.calls} / {during.outcomes.get('ok', 0)}",
        )
        case.note("their reply time", during.replies())
    except (TrialError, OSError, subprocess.SubprocessError, AssertionError) as exc:
        case.errors.append(str(exc).splitlines()[0])
    finally:
        load.stop()
        watched.stop()
        watched.into(case, since)
        watched.runner.run(watched.config, "--stop", check=False)
        lab.set_link(1, up=True)


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.0f} ms"


def flapping(lab: Lab, tmp: Path, name: str, log: Callable[[str], None]) -> Case:
    changes, gap = FLAPPING[name]
    tried = f"{changes} carrier changes of ISP1 in {changes * gap:.0f} s"
    case = Case("process", name, tried)
    watched = Watched(lab, tmp / name)
    since = watched.mark()
    load = Load(lab)
    try:
        begin = time.monotonic()
        for change in range(changes):
            lab.set_link(1, up=change % 2 == 1)  # down first, up last
            time.sleep(max(0.0, begin + (change + 1) * gap - time.monotonic()))
        ended = time.monotonic()
        time.sleep(QUIET_S + 1.0)
        case.note("flapping lasted", f"{ended - begin:.1f} s")
        transitions = [
            x for x in watched.daemon.log.lines[since:] if "link ISP1: " in x and " -> " in x
        ]
        case.note("ISP1 transitions logged", len(transitions))
        case.note("flap damping engaged", "flap damping" in watched.log_text)
        case.note("ISP2 went down", watched.count("link ISP2: up -> ", since))
        last = [x for x in watched.daemon.log.lines if "applied generation" in x][-1]
        in_use = last.split("links in use: ")[1].split(" (")[0]
        case.note("links in use at the end", in_use)
        tail = load.between(time.monotonic() - 2.0)
        case.note(
            "connections failed in the last 2 s", f"{sum(not r.ok for r in tail)}/{len(tail)}"
        )
        case.note("connections in the last 2 s by ISP", load.by_isp(time.monotonic() - 2.0))
        case.add("failed_connections", load.failed(begin))
        case.add("attempts", len(load.between(begin)))
    except (TrialError, OSError, subprocess.SubprocessError, AssertionError, IndexError) as exc:
        case.errors.append(str(exc).splitlines()[0])
    finally:
        load.stop()
        lab.set_link(1, up=True)
        watched.stop()
        watched.into(case, since)
        watched.runner.run(watched.config, "--stop", check=False)
    log(f"  process/{name}: {case.describe()}")
    return case
