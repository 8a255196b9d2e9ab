"""Fault class "hooks": hooks that hang, fail, flood or were planted, with carrier-loss failover
measured while they do (issue 12, defects 1-3).

Each case is a fresh daemon in a directory of its own (the hook directories sit beside the
configuration) with uplinkd's defaults in failover mode; the hook is set going, then ISP1's
carrier is cut (failover.py's trial) while it runs, twice per daemon. Cases:

- ``py-sleep``: post-run/10.slow.py sleeps 30 s; added while the daemon runs (seen within
  HOOK_RESCAN_S), run again on each apply, killed at HOOK_TIMEOUT_S;
- ``py-syntax``: firewall/10.forward.py gets a syntax error while the daemon runs;
- ``routes-sleep``: a routes/ line `sleep 29.5; true`, run after each rebuild (a reload that
  adds or removes a rule, before each trial);
- ``post-run-300MB``: a post-run/ line printing 300 MB, set going the same way;
- ``symlink-updir``: a world-writable up.d holding a symbolic link `nobody` planted (to a
  recording script of root's), and a root-owned down.d holding a symbolic link and a real hook.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from uplinkd import const
from uplinkd.lab import Lab

from .failover import TrialError
from .fault_kit import Case, Watched, carrier_trials, closed_case, processes, wait_until
from .monitors import LINKS

# A rule more: the ruleset's structure changes, so a reload rebuilds it and runs routes/, post-run/.
EXTRA_RULE = '\n[[rule]]\nname = "extra"\nmatch = { dport = [9] }\nmethod = "weighted"\n'
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
RECORD = '#!/bin/sh\necho "$0 $1 $2" >> {out}\n'
SLEEP = "sleep 29.5"
LOUD = "head -c 300000000 /dev/zero"


def _hook(workdir: Path, relative: str, text: str, mode: int = 0o644) -> Path:
    path = workdir / relative
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


class Rebuilder:
    """Reloads that add or remove EXTRA_RULE: each one rebuilds the ruleset."""

    def __init__(self, watched: Watched) -> None:
        self.watched = watched
        self.extra = False

    def __call__(self) -> None:
        self.extra = not self.extra
        self.watched.config.write_text(LINKS + (EXTRA_RULE if self.extra else ""))
        mark = self.watched.mark()
        self.watched.daemon.send(signal.SIGHUP)
        if not wait_until(lambda: self.watched.applies(mark) > 0, 10):
            raise TrialError("the reload was not applied within 10 s")


Setup = Callable[[Watched, Case], tuple[Callable[[], None] | None, Callable[[], bool]]]


def _py_sleep(watched: Watched, case: Case) -> tuple[Callable[[], None], Callable[[], bool]]:
    slow = _hook(watched.runner.workdir, "post-run/10.slow.py", "import time\ntime.sleep(30)\n")

    def running() -> bool:
        return bool(processes(str(slow)))

    def before() -> None:
        if not wait_until(running, const.HOOK_RESCAN_S + 5):
            case.errors.append("the hook was not running before the cut")

    return before, running


def _py_syntax(watched: Watched, case: Case) -> tuple[None, Callable[[], bool]]:
    fw = watched.runner.workdir / "firewall" / "10.forward.py"
    fw.write_text(fw.read_text() + "def broken(:\n")
    if not watched.daemon.log.wait_for(f"{fw}:2: syntax error", const.HOOK_RESCAN_S + 5):
        case.errors.append("the syntax error was never reported with file:line")
    return None, lambda: True


def _routes_sleep(watched: Watched, case: Case) -> tuple[Callable[[], None], Callable[[], bool]]:
    rebuild = Rebuilder(watched)

    def running() -> bool:
        return bool(processes(SLEEP))

    def before() -> None:
        rebuild()
        if not wait_until(running, 5):
            case.errors.append("the routes/ line was not running before the cut")

    return before, running


def _post_run_loud(watched: Watched, case: Case) -> tuple[Callable[[], None], Callable[[], bool]]:
    rebuild = Rebuilder(watched)

    def running() -> bool:
        return bool(processes(LOUD))

    def before() -> None:
        rebuild()
        wait_until(running, 5)  # it may be over by then: the cut says whether it ran

    return before, running


def _symlinks(watched: Watched, case: Case) -> tuple[None, Callable[[], bool]]:
    return None, lambda: True


# The hook files present when the daemon starts.
HOOK_FILES: dict[str, list[tuple[str, str]]] = {
    "py-syntax": [("firewall/10.forward.py", 'B.forward(8080, "192.168.10.35")\n')],
    "routes-sleep": [("routes/01.slow", f"{SLEEP}; true\n")],
    "post-run-300MB": [("post-run/01.loud", f"{LOUD} | tr '\\0' x\n")],
}
CASES: dict[str, tuple[str, Setup]] = {
    "py-sleep": ("post-run/ .py hook sleeping 30 s, added while running", _py_sleep),
    "py-syntax": ("firewall/ .py hook given a syntax error while running", _py_syntax),
    "routes-sleep": ("routes/ line `sleep 29.5; true`, run by a rebuild", _routes_sleep),
    "post-run-300MB": ("post-run/ line printing 300 MB, run by a rebuild", _post_run_loud),
    "symlink-updir": (
        "world-writable up.d with nobody's symlink; root's down.d with a symlink",
        _symlinks,
    ),
}


def _plant(workdir: Path) -> Path:
    """The symlink case's directories; returns the file the recording hooks write to."""
    out = workdir / "hooks.out"
    record = _hook(workdir, "record.sh", RECORD.format(out=out), 0o755)
    up_d = workdir / "up.d"
    up_d.mkdir()
    up_d.chmod(0o777)
    _hook(workdir, "up.d/10-root", RECORD.format(out=out), 0o755)
    subprocess.run([*AS_NOBODY, "ln", "-s", str(record), str(up_d / "zz")], check=True)
    down_d = workdir / "down.d"
    down_d.mkdir(mode=0o755)
    (down_d / "50-link").symlink_to(record)
    _hook(workdir, "down.d/99-record", RECORD.format(out=out), 0o755)
    return out


def one_case(lab: Lab, tmp: Path, name: str, trials: int) -> Case:
    tried, setup = CASES[name]
    case = Case("hooks", name, tried, repeats=0)
    left_over = 0
    hook_lines = 0
    for index in range(-(-trials // 2)):
        # The symlink case needs a directory nobody can reach: not under the bench's 0700 tmp.
        shared = name == "symlink-updir"
        workdir = (
            Path(tempfile.mkdtemp(prefix="uplinkd-faults-")) if shared else tmp / f"{name}{index}"
        )
        watched: Watched | None = None
        try:
            workdir.mkdir(exist_ok=True)
            workdir.chmod(0o755)
            out = _plant(workdir) if shared else None
            for relative, text in HOOK_FILES.get(name, []):
                _hook(workdir, relative, text)
            watched = Watched(lab, workdir)
            since = watched.mark()
            before, active = setup(watched, case)
            carrier_trials(watched, case, min(2, trials - 2 * index), active, before)
            case.repeats += 1
            healthy_down = watched.count("link ISP2: up -> ")
            hook_lines += sum(str(workdir) in line for line in watched.daemon.log.lines)
            closed_case(case, watched, since)
            needle = {"py-sleep": "10.slow.py", "routes-sleep": SLEEP, "post-run-300MB": LOUD}
            if name in needle:
                left_over += len(processes(needle[name]))
            case.add_figure("healthy link went down", healthy_down)
            _case_figures(case, name, watched, out)
        except (TrialError, OSError, subprocess.SubprocessError, AssertionError) as exc:
            case.errors.append(str(exc).splitlines()[0])
        finally:
            if watched is not None:
                watched.stop()
                watched.runner.run(watched.config, "--stop", check=False)
            lab.set_link(1, up=True)
            if shared:
                shutil.rmtree(workdir, ignore_errors=True)
    case.add_figure("hook log lines", hook_lines)
    if name in ("py-sleep", "routes-sleep", "post-run-300MB"):
        case.add_figure("hook processes left after stop", left_over)
    return case


def _case_figures(case: Case, name: str, watched: Watched, out: Path | None) -> None:
    text = watched.log_text
    if name in ("py-sleep", "routes-sleep"):
        case.add_figure("killed at the time limit", text.count(": killed after"))
    if name == "py-syntax":
        case.add_figure("syntax error logged", text.count(": syntax error"))
        case.add_figure("apply failed", text.count("apply failed"))
        case.add_figure("previous result kept", int("its previous result is kept" in text))
    if name == "post-run-300MB":
        case.add_figure("output cut (more bytes)", int("more bytes" in text))
    if name == "symlink-updir" and out is not None:
        lines = out.read_text().splitlines() if out.exists() else []
        planted = [
            line for line in lines if line.split()[0].endswith(("/zz", "/50-link", "/10-root"))
        ]
        case.add_figure("runs of hooks in up.d or through a symlink", len(planted))
        case.add_figure("runs of down.d/99-record (root's)", len(lines) - len(planted))
        case.add_figure("refusals logged", text.count(": refused: "))


def run(lab: Lab, tmp: Path, trials: int, log: Callable[[str], None]) -> list[Case]:
    cases = []
    for name in CASES:
        case = one_case(lab, tmp, name, trials)
        log(f"  hooks/{name}: {case.describe()}")
        cases.append(case)
    return cases
