"""The daemon's hooks, run beside its event loop: the loop never waits for a hook.

- Each apply uses the last result the hooks gave (`state`): the firewall/ lines, what the .py
  hooks asked for, the command lines.
- The hooks run again in the background, one run at a time, when what they see changes: the
  links in use, the links' addresses and gateways, the configuration, or the hook files
  themselves (the directories are looked at with stat every HOOK_RESCAN_S). A result that
  differs from the one in force schedules an apply.
- At start, the first apply waits for one run (each hook bounded by its time limit), so that a
  restarted daemon does not take the hooks' part out of the kernel and put it back a moment
  later. A reload does not wait: it applies with the last result and runs the hooks again.
- A .py hook that fails (syntax error, exception, a call the Balancer refuses, its time limit, its
  child process dying) keeps its previous good result, if it had one, else adds nothing. A
  refused file (owner, mode, link, size) adds nothing. Either is logged once per distinct failure
  with the file (and line), and listed in the status (`problems`) until it works again.
- firewall/ lines (and B.nft lines) that the kernel refuses: the apply is made again at once
  without that file's lines, which stay out until the file changes or a reload.
- Command lines: routes/ and post-run/ run after an apply that rebuilt the ruleset, in the
  background (in order, one run at a time, a newer run replacing one that has not started).
  pre-run/ lines run before a rebuild, also in the background (`start_pre_run`): the rebuild
  waits for them, but no apply does, and no lock is held meanwhile (the coordinator keeps the
  structure in the kernel, so a failover is still a map update); their end schedules an apply.
  Each line is time-boxed, its output cut short (stages.run_command).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from .. import const
from ..config.model import Config
from ..errors import HookError
from ..planning.plan import HookLine, LinkFacts
from ..planning.planner import Extras
from . import stages

log = logging.getLogger("uplinkd")

# The stages whose command lines run after an apply that rebuilt the ruleset.
AFTER_STAGES = frozenset({"routes", "post-run"})

_Key = tuple[str, str]  # (kind, the file or file:line): one problem per key
_Stamp = tuple[int, ...]


class Problems:
    """Hook failures now in force, each logged once when it appears (or changes)."""

    def __init__(self) -> None:
        self._by_key: dict[_Key, str] = {}

    def report(self, key: _Key, message: str, *, logged: bool = False) -> None:
        if self._by_key.get(key) != message and not logged:
            log.error("%s", message)
        self._by_key[key] = message

    def solved(self, key: _Key) -> None:
        if self._by_key.pop(key, None) is not None and key[0] != "refused":
            log.info("%s: works again", key[1])

    def keep_only(self, kind: str, keys: Collection[str]) -> None:
        """Forget the problems of this kind whose file (or line) is gone."""
        for key in [key for key in self._by_key if key[0] == kind and key[1] not in keys]:
            del self._by_key[key]

    def messages(self) -> tuple[str, ...]:
        return tuple(self._by_key[key] for key in sorted(self._by_key))


def _stamp(info: os.stat_result) -> _Stamp:
    return (
        info.st_dev,
        info.st_ino,
        info.st_size,
        info.st_mtime_ns,
        info.st_ctime_ns,  # changes with chmod and chown too
        info.st_mode,
        info.st_uid,
    )


def _directory_stamp(info: os.stat_result) -> _Stamp:
    # Not its times: a file written beside the hook directories (a hook's own output, say) is
    # no change of the hooks; a hook file added or removed shows in the listing.
    return (info.st_dev, info.st_ino, info.st_mode, info.st_uid)


def fingerprint(root: Path) -> tuple[object, ...]:
    """What the hook directories look like to stat: a change of it means the hooks must be read
    again. Cheap (no file is opened); blocking, so the daemon runs it in a thread."""
    seen: list[object] = []
    for name in ("", *const.HOOK_DIRS):  # "": the hook root, whose mode and owner count too
        directory = root / name if name else root
        try:
            own, followed = _directory_stamp(directory.lstat()), directory.stat()
        except OSError:
            seen.append((name, None))
            continue
        entries: list[tuple[str, _Stamp]] = []
        if name and stat.S_ISDIR(followed.st_mode):
            with contextlib.suppress(OSError), os.scandir(directory) as listing:
                for entry in listing:
                    with contextlib.suppress(OSError):
                        entries.append((entry.name, _stamp(entry.stat(follow_symlinks=False))))
        seen.append((name, own, _directory_stamp(followed), tuple(sorted(entries))))
    return tuple(seen)


@dataclass(frozen=True)
class _Inputs:
    """What the hooks see: a run with other inputs may give another result."""

    config: Config
    facts: tuple[LinkFacts, ...]
    up: frozenset[str]


class HookRunner:
    def __init__(self, on_change: Callable[[], None]) -> None:
        self.state = stages.Hooks()  # the last result: what the next apply uses
        self._on_change = on_change  # a new result differs: schedule an apply
        self._problems = Problems()
        self._files = stages.HookFiles()
        self._results: dict[str, Extras] = {}  # .py hook path -> its last good result
        self._nft_refused: dict[str, tuple[HookLine, ...]] = {}  # path -> lines left out
        self._wanted: _Inputs | None = None
        self._seen: tuple[_Inputs, object] | None = None  # the inputs and files of `state`
        self._wake = asyncio.Event()
        self._run_lock = asyncio.Lock()
        self._watch_task: asyncio.Task[None] | None = None
        self._commands_task: asyncio.Task[None] | None = None
        self._pending: list[stages.CommandLine] | None = None
        # The pre-run/ lines last run to their end (or time limit) since the last rebuild.
        self._pre_run_done: tuple[stages.CommandLine, ...] | None = None
        self._pre_run_task: asyncio.Task[None] | None = None
        self.stopped = False

    @property
    def problems(self) -> tuple[str, ...]:
        """The hook failures in force, one line each naming the file (and line)."""
        return self._problems.messages()

    # --- running the hooks ---

    def want(self, config: Config, facts: Sequence[LinkFacts], up: Collection[str]) -> None:
        """The inputs of the next run; the hooks run again (in the background) if they changed."""
        inputs = _Inputs(config, tuple(sorted(facts, key=lambda f: f.name)), frozenset(up))
        if inputs != self._wanted:
            self._wanted = inputs
            self._wake.set()

    async def refresh(
        self, config: Config, facts: Sequence[LinkFacts], up: Collection[str]
    ) -> None:
        """Run the hooks now for these inputs, unless the result in force is theirs (start)."""
        self.want(config, facts, up)
        await self._run_if_changed()

    def reload(self, config: Config, facts: Sequence[LinkFacts], up: Collection[str]) -> None:
        """A reload: run the hooks again in the background, trying refused firewall lines again."""
        self._nft_refused.clear()
        self._seen = None
        self.want(config, facts, up)
        self._wake.set()

    def start(self) -> None:
        self._watch_task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        """Stop watching; a hook or command still running is killed with its process group."""
        self.stopped = True
        running = (self._watch_task, self._commands_task, self._pre_run_task)
        tasks = [task for task in running if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._run_if_changed()
            except Exception:
                log.exception("internal error while running the hooks")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(const.HOOK_RESCAN_S):
                    await self._wake.wait()

    async def _run_if_changed(self) -> None:
        async with self._run_lock:
            wanted = self._wanted
            if wanted is None:
                return
            files = await asyncio.to_thread(fingerprint, wanted.config.hook_root)
            if self._seen == (wanted, files):
                return
            await self._run(wanted)
            self._seen = (wanted, files)

    async def _run(self, inputs: _Inputs) -> None:
        files = await asyncio.to_thread(stages.read_files, inputs.config.hook_root)
        self._problems.keep_only("refused", files.refused)
        for reason in files.refused:
            self._problems.report(("refused", reason), reason, logged=True)  # trust.py logs
        results: dict[str, Extras] = {}
        for hook in files.python:
            key = ("python", hook.path)
            try:
                results[hook.path] = await stages.run_python(
                    hook, inputs.config, inputs.facts, inputs.up
                )
            except HookError as error:
                previous = self._results.get(hook.path)
                if previous is not None:
                    results[hook.path] = previous
                    self._problems.report(key, f"{error}; its previous result is kept")
                else:
                    self._problems.report(key, f"{error}; it adds nothing until it works")
            else:
                self._problems.solved(key)
        self._problems.keep_only("python", [hook.path for hook in files.python])
        self._problems.keep_only("command", [f"{c.path}:{c.line}" for c in files.commands])
        self._files, self._results = files, results
        state = self._compose()
        if state != self.state:
            self.state = state
            self._on_change()

    def _compose(self) -> stages.Hooks:
        """The hooks' result from the files read and the .py hooks' results, without the
        firewall lines the kernel refused (while they are what it refused)."""
        order = [hook.path for hook in self._files.python if hook.path in self._results]
        combined = stages.combine(self._files, [self._results[path] for path in order])
        lines = combined.extras.nft_lines
        for path, refused in list(self._nft_refused.items()):
            if tuple(line for line in lines if line.path == path) != refused:
                del self._nft_refused[path]  # changed: tried again
                self._problems.solved(("nft", path))
        kept = tuple(line for line in lines if line.path not in self._nft_refused)
        return replace(combined, extras=replace(combined.extras, nft_lines=kept))

    def refuse_nft(self, error: HookError) -> bool:
        """The kernel refused a hook's nftables line: leave that file's lines out of `state`.
        False when no line of that file is in it (the error is not about hook lines)."""
        path = str(error.path)
        lines = tuple(line for line in self.state.extras.nft_lines if line.path == path)
        if not lines:
            return False
        self._nft_refused[path] = lines
        message = f"{error}; applied without this file's nftables lines until it changes"
        self._problems.report(("nft", path), message)
        self.state = self._compose()
        return True

    # --- command lines ---

    def _pre_run_lines(self) -> tuple[stages.CommandLine, ...]:
        return tuple(command for command in self.state.commands if command.stage == "pre-run")

    def pre_run_ready(self) -> bool:
        """Whether a rebuild may go in: the pre-run/ lines in force (if any) have run since the
        last rebuild. A line that failed or was killed at its limit has run (and is a problem)."""
        lines = self._pre_run_lines()
        return not lines or lines == self._pre_run_done

    def start_pre_run(self) -> None:
        """Run the pre-run/ lines in the background, unless they are running; when they are
        done, an apply is scheduled (the rebuild that waited for them)."""
        if not self.stopped and (self._pre_run_task is None or self._pre_run_task.done()):
            lines = len(self._pre_run_lines())
            log.info("pre-run/: %d line(s) run before the rebuild; until then, maps only", lines)
            self._pre_run_task = asyncio.create_task(self._run_pre_run())

    async def _run_pre_run(self) -> None:
        while not self.pre_run_ready():  # the lines changed while they ran: the new ones
            lines = self._pre_run_lines()
            self._record(await stages.run_commands(lines, {"pre-run"}))
            self._pre_run_done = lines
        self._on_change()

    async def pre_run_finished(self) -> None:
        """Wait until the pre-run/ lines started last are done (each line time-boxed)."""
        if self._pre_run_task is not None:
            await asyncio.wait([self._pre_run_task])  # a waiter cancelled leaves the run alone

    def after_apply(self) -> None:
        """After a rebuild: routes/ and post-run/ lines, in the background; the next rebuild
        runs the pre-run/ lines again first, as Net-ISP-Balance ran them at every rebuild."""
        self._pre_run_done = None
        commands = [command for command in self.state.commands if command.stage in AFTER_STAGES]
        if not commands:
            return
        self._pending = commands  # replaces a run that has not started
        if self._commands_task is None or self._commands_task.done():
            self._commands_task = asyncio.create_task(self._run_pending())

    async def _run_pending(self) -> None:
        while self._pending is not None:
            commands, self._pending = self._pending, None
            self._record(await stages.run_commands(commands, AFTER_STAGES))

    def _record(self, outcomes: Sequence[stages.CommandOutcome]) -> None:
        for outcome in outcomes:
            key = ("command", f"{outcome.command.path}:{outcome.command.line}")
            if outcome.problem is None:
                self._problems.solved(key)
            else:
                self._problems.report(key, outcome.problem)
