"""Fault class "hooks": hooks that hang, fail, flood or were planted, with carrier-loss failover
measured while they do (issue 12, defects 1-3).

Each case is a fresh daemon in a directory of its own (the hook directories sit beside the
configuration) with uplinkd's defaults in failover mode; the hook is set going, then ISP1's
carrier is cut (failover.py's trial) while it runs, twice per daemon. Cases:

- ``py-sleep``: post-run/10.slow.py sleeps 30 s; added while the daemon runs (seen within
  HOOK_RESCAN_S), run again on each apply, killed at HOOK_TIMEOUT_S (the case waits for it);
- ``py-syntax``: firewall/10.forward.py gets a syntax error while the daemon runs;
- ``routes-sleep``: a routes/ line `sleep 29.5; true`, run after each rebuild (a reload that
  adds or removes a rule, before each trial);
- ``post-run-300MB``: a post-run/ line printing 300 MB, set going the same way;
- ``symlink-updir``: a world-writable up.d holding a symbolic link `nobody` planted (to a
  recording script of root's), and a root-owned down.d holding a symbolic link and a real hook;
- ``foreign-owned``: in root's up.d, down.d and post-run/, files owned by `nobody` or writable
  by group or others, beside root's own hooks; pre-run/ owned by `nobody`, holding a root-owned
  file. Then, while the daemon runs, its configuration file given to `nobody`, made group-
  writable, and given an SMTP password others may read, each with a SIGHUP; and `--once` with a
  configuration file `nobody` owns;
- ``writable-root``: the hook root (the configuration's directory, the parent of up.d, post-run/
  ...) world-writable with the sticky bit, holding only root's own hooks.

The planted cases record every hook run in a file (each hook appends its own name), so runs of
hooks that must be refused are counted (must be 0) apart from runs of root's own hooks beside
them (must be more than 0: refusing one file does not stop the others).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from uplinkd import const
from uplinkd_lab.lab import Lab

from .failover import TrialError
from .fault_kit import (
    AS_NOBODY,
    Case,
    Watched,
    carrier_trials,
    closed_case,
    processes,
    wait_until,
)
from .fault_process import reload_with
from .monitors import LINKS

# A rule more: the ruleset's structure changes, so a reload rebuilds it and runs routes/, post-run/.
EXTRA_RULE = '\n[[rule]]\nname = "extra"\nmatch = { dport = [9] }\nmethod = "weighted"\n'
RECORD = '#!/bin/sh\necho "$0 $1 $2" >> {out}\n'
NOBODY = "nobody:nogroup"
# A configuration that holds an SMTP password (no link has warn_email: no mail is ever sent).
WITH_PASSWORD = (
    LINKS + '\n[mail]\nsmtp_server = "192.0.2.25"\nusername = "uplinkd"\npassword = "s3cret"\n'
)
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


def _always(watched: Watched, case: Case) -> tuple[None, Callable[[], bool]]:
    """Planted cases: the fault is there from the start and stays."""
    return None, lambda: True


@dataclass
class Planted:
    """Recording hooks planted in a case's directory: each run appends its own path to `out`.
    Paths are relative to the directory: `refused` must never run, `kept` (root's own, beside
    them) must; `named` are the files or directories a refusal line must name."""

    workdir: Path
    refused: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    named: list[str] = field(default_factory=list)

    @property
    def out(self) -> Path:
        return self.workdir / "hooks.out"

    def executable(self, relative: str, *, refused: bool, mode: int = 0o755) -> Path:
        """An up.d/down.d hook: a script appending its name and arguments."""
        (self.refused if refused else self.kept).append(relative)
        return _hook(self.workdir, relative, RECORD.format(out=self.out), mode)

    def line(self, relative: str, *, refused: bool, mode: int = 0o644) -> Path:
        """A pre-run/ or post-run/ file: one shell line appending the file's name."""
        (self.refused if refused else self.kept).append(relative)
        text = f"echo {self.workdir / relative} >> {self.out}\n"
        return _hook(self.workdir, relative, text, mode)

    def runs(self) -> tuple[int, dict[str, int]]:
        """Runs of refused hooks, and runs of each kept one."""
        lines = self.out.read_text().splitlines() if self.out.exists() else []
        ran = [line.split()[0] for line in lines if line.strip()]

        def of(relative: str) -> int:
            return sum(path == str(self.workdir / relative) for path in ran)

        return sum(of(r) for r in self.refused), {r: of(r) for r in self.kept}

    def named_in(self, text: str) -> int:
        """How many of `named` a refusal line of the log names."""
        return sum(f"{self.workdir / relative}: refused: " in text for relative in self.named)


def _plant_symlinks(workdir: Path) -> Planted:
    planted = Planted(workdir)
    record = _hook(workdir, "record.sh", RECORD.format(out=planted.out), 0o755)
    up_d = workdir / "up.d"
    up_d.mkdir()
    up_d.chmod(0o777)
    planted.executable("up.d/10-root", refused=True)  # refused with its directory
    subprocess.run([*AS_NOBODY, "ln", "-s", str(record), str(up_d / "zz")], check=True)
    planted.refused.append("up.d/zz")
    (workdir / "down.d").mkdir(mode=0o755)
    (workdir / "down.d" / "50-link").symlink_to(record)
    planted.refused.append("down.d/50-link")
    planted.executable("down.d/99-record", refused=False)
    planted.named += ["up.d", "down.d/50-link"]
    return planted


def _plant_foreign(workdir: Path) -> Planted:
    planted = Planted(workdir)
    planted.executable("up.d/10-root", refused=False)
    shutil.chown(planted.executable("up.d/20-nobody", refused=True), *NOBODY.split(":"))
    planted.executable("up.d/30-group-writable", refused=True, mode=0o775)
    planted.executable("down.d/40-world-writable", refused=True, mode=0o757)
    planted.executable("down.d/99-root", refused=False)
    planted.line("post-run/10-root", refused=False)
    shutil.chown(planted.line("post-run/20-nobody", refused=True), *NOBODY.split(":"))
    planted.line("post-run/30-world-writable", refused=True, mode=0o646)
    planted.line("pre-run/10-root", refused=True)  # root's file, in nobody's directory
    shutil.chown(workdir / "pre-run", *NOBODY.split(":"))
    planted.named += [*planted.refused[:-1], "pre-run"]
    return planted


def _plant_writable_root(workdir: Path) -> Planted:
    planted = Planted(workdir)
    planted.executable("up.d/10-root", refused=True)
    planted.executable("down.d/99-root", refused=True)
    planted.line("post-run/10-root", refused=True)
    workdir.chmod(0o1777)  # the sticky bit does not help: anyone may still add up.d
    planted.named.append(".")
    return planted


# The hook files present when the daemon starts.
HOOK_FILES: dict[str, list[tuple[str, str]]] = {
    "py-syntax": [("firewall/10.forward.py", 'B.forward(8080, "192.168.10.35")\n')],
    "routes-sleep": [("routes/01.slow", f"{SLEEP}; true\n")],
    "post-run-300MB": [("post-run/01.loud", f"{LOUD} | tr '\\0' x\n")],
}
# Cases whose hooks are planted in a directory of their own that `nobody` can reach (not under
# the bench's 0700 tmp), recording their runs.
PLANTS: dict[str, Callable[[Path], Planted]] = {
    "symlink-updir": _plant_symlinks,
    "foreign-owned": _plant_foreign,
    "writable-root": _plant_writable_root,
}
CASES: dict[str, tuple[str, Setup]] = {
    "py-sleep": ("post-run/ .py hook sleeping 30 s, added while running", _py_sleep),
    "py-syntax": ("firewall/ .py hook given a syntax error while running", _py_syntax),
    "routes-sleep": ("routes/ line `sleep 29.5; true`, run by a rebuild", _routes_sleep),
    "post-run-300MB": ("post-run/ line printing 300 MB, run by a rebuild", _post_run_loud),
    "symlink-updir": (
        "world-writable up.d with nobody's symlink; root's down.d with a symlink",
        _always,
    ),
    "foreign-owned": (
        "hooks owned by nobody or group/world-writable beside root's, pre-run/ owned by"
        " nobody; the configuration file given to nobody, group-writable, with a readable"
        " password",
        _always,
    ),
    "writable-root": (
        "hook root (the configuration's directory) mode 1777, only root's hooks in it",
        _always,
    ),
}


@dataclass
class Tally:
    """Counts over a case's repeats, shown as n/m."""

    counts: dict[str, list[int]] = field(default_factory=dict)

    def add(self, label: str, good: bool | int, out_of: int = 1) -> None:
        pair = self.counts.setdefault(label, [0, 0])
        pair[0] += int(good)
        pair[1] += out_of

    def into(self, case: Case) -> None:
        for label, (good, total) in self.counts.items():
            case.note(label, f"{good}/{total}")


REFUSED_CONFIG = (
    "configuration file given to nobody or made group-writable: SIGHUP refused naming it"
)
REFUSED_CONFIG_KERNEL = "kernel unchanged by those SIGHUPs"


def _config_checks(watched: Watched, tally: Tally) -> None:
    """While the daemon runs: its configuration file given to nobody, then made group-writable,
    each with a SIGHUP (refused naming the file, the kernel as it was); then one holding an SMTP
    password that others may read (used, with a warning naming the file)."""
    config = watched.config
    before = watched.runner.kernel_state()

    def group_writable() -> None:
        shutil.chown(config, 0, 0)
        config.chmod(0o664)

    changes: list[tuple[Callable[[], None], str]] = [
        (lambda: shutil.chown(config, *NOBODY.split(":")), "owned by uid"),
        (group_writable, "writable by group"),
    ]
    try:
        for change, needle in changes:
            change()
            mark, _ = reload_with(watched, LINKS)
            refusal = [x for x in watched.daemon.log.lines[mark:] if "reload refused" in x]
            named = bool(refusal) and f"{config}: refused: " in refusal[0] and needle in refusal[0]
            tally.add(REFUSED_CONFIG, named)
            tally.add(REFUSED_CONFIG_KERNEL, before == _kernel(watched))
    finally:
        shutil.chown(config, 0, 0)
        config.chmod(0o644)
    mark, _ = reload_with(watched, WITH_PASSWORD)
    warned = any(
        f"{config}: holds the [mail] password and others may read it" in line
        for line in watched.daemon.log.lines[mark:]
    )
    used = watched.count("reload refused", mark) == 0
    tally.add(
        "configuration with a password others may read: used, a warning naming it", used and warned
    )
    reload_with(watched, LINKS)


def _kernel(watched: Watched) -> str:
    return watched.runner.kernel_state()


def _start_check(watched: Watched, tally: Tally) -> None:
    """`--once` with a configuration file nobody owns: refused naming it, the kernel as it was."""
    config = watched.config
    before = _kernel(watched)
    shutil.chown(config, *NOBODY.split(":"))
    try:
        result = watched.runner.run(config, "--once", check=False)
    finally:
        shutil.chown(config, 0, 0)
    named = result.returncode != 0 and f"{config}: refused: owned by uid" in result.stderr
    tally.add(
        "--once with it owned by nobody: refused naming it, kernel unchanged",
        named and before == _kernel(watched),
    )


def one_case(lab: Lab, tmp: Path, name: str, trials: int) -> Case:
    tried, setup = CASES[name]
    case = Case("hooks", name, tried, repeats=0)
    left_over = 0
    hook_lines = 0
    tally = Tally()
    for index in range(-(-trials // 2)):
        plant = PLANTS.get(name)
        workdir = (
            Path(tempfile.mkdtemp(prefix="uplinkd-faults-")) if plant else tmp / f"{name}{index}"
        )
        watched: Watched | None = None
        try:
            workdir.mkdir(exist_ok=True)
            workdir.chmod(0o755)
            planted = plant(workdir) if plant else None
            for relative, text in HOOK_FILES.get(name, []):
                _hook(workdir, relative, text)
            watched = Watched(lab, workdir)
            since = watched.mark()
            before, active = setup(watched, case)
            carrier_trials(watched, case, min(2, trials - 2 * index), active, before)
            case.repeats += 1
            if name in ("py-sleep", "routes-sleep"):  # the trials end before the time limit
                watched.daemon.log.wait_for(": killed after", const.HOOK_TIMEOUT_S + 5)
            healthy_down = watched.count("link ISP2: up -> ")
            if name == "foreign-owned":
                _config_checks(watched, tally)
            hook_lines += sum(str(workdir) in line for line in watched.daemon.log.lines)
            closed_case(case, watched, since)
            if name == "foreign-owned":
                _start_check(watched, tally)
            needle = {"py-sleep": "10.slow.py", "routes-sleep": SLEEP, "post-run-300MB": LOUD}
            if name in needle:
                left_over += len(processes(needle[name]))
            case.add_figure("healthy link went down", healthy_down)
            _case_figures(case, name, watched)
            if planted is not None:
                _planted_figures(case, tally, planted, watched.log_text)
        except (TrialError, OSError, subprocess.SubprocessError, AssertionError) as exc:
            case.errors.append(str(exc).splitlines()[0])
        finally:
            if watched is not None:
                watched.stop()
                watched.runner.run(watched.config, "--stop", check=False)
            lab.set_link(1, up=True)
            if plant:
                shutil.rmtree(workdir, ignore_errors=True)
    case.add_figure("hook log lines", hook_lines)
    if name in ("py-sleep", "routes-sleep", "post-run-300MB"):
        case.add_figure("hook processes left after stop", left_over)
    tally.into(case)
    return case


def _case_figures(case: Case, name: str, watched: Watched) -> None:
    text = watched.log_text
    if name in ("py-sleep", "routes-sleep"):
        case.add_figure("killed at the time limit", text.count(": killed after"))
    if name == "py-syntax":
        case.add_figure("syntax error logged", text.count(": syntax error"))
        case.add_figure("apply failed", text.count("apply failed"))
        case.add_figure("previous result kept", int("its previous result is kept" in text))
    if name == "post-run-300MB":
        case.add_figure("output cut (more bytes)", int("more bytes" in text))


def _planted_figures(case: Case, tally: Tally, planted: Planted, text: str) -> None:
    refused_runs, kept_runs = planted.runs()
    case.add_figure("runs of hooks that must be refused", refused_runs)
    for relative, runs in kept_runs.items():
        case.add_figure(f"runs of root's {relative} beside them", runs)
    case.add_figure("refusal lines logged", text.count(": refused: "))
    tally.add("refusals naming the file or directory", planted.named_in(text), len(planted.named))


def run(lab: Lab, tmp: Path, trials: int, log: Callable[[str], None]) -> list[Case]:
    cases = []
    for name in CASES:
        case = one_case(lab, tmp, name, trials)
        log(f"  hooks/{name}: {case.describe()}")
        cases.append(case)
    return cases
