"""Event hooks: executables in up.d/, down.d/ and long_down.d/ beside the configuration.

They succeed foolsm's eventscript, through which Net-ISP-Balance ran its lsm event script. When a
link changes into up, down or long_down, the executables of that directory run one after another
in name order, skipping editor backups (`~`, `.bak`) and dot files. As for the other hook files
(hooks/stages.py), only root-owned files that group and others cannot write are used.

Each gets foolsm's sixteen arguments, in the order of decide() in foolsm.c (named in its
default_script):
    state name checkip device warn_email replied waiting timeout reply_late
    cons_rcvd cons_wait cons_miss avg_rtt srcip prevstate timestamp
with avg_rtt in microseconds and timestamp in seconds since the epoch (for long_down: when the
link went down, as foolsm passed it), plus UPLINKD_* environment variables. A hook runs with
stdin closed, its output goes to the log, and it is killed at the timeout: hooks run beside the
daemon's loop and never hold it up. At stop, hooks still running after a short grace are killed
(const.SHUTDOWN_DRAIN_S) and those not started yet are not run; the log says which.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Final

from .. import background, const, trust

if TYPE_CHECKING:
    from ..monitor.link import LinkStats, Transition

log = logging.getLogger("uplinkd")

# The directory of hooks for a change into each state.
EVENT_DIRS: Final = {"up": "up.d", "down": "down.d", "long_down": "long_down.d"}
# Hook output kept for the log; enough for an error message, not for a runaway loop's output.
OUTPUT_LIMIT: Final = 2000
# foolsm's names where uplinkd's differ: a link not yet decided was "unknown" to foolsm.
_FOOLSM_STATES: Final = {"init": "unknown"}


@dataclass(frozen=True)
class ProbeCounters:
    """foolsm's counters over the recent probes of the check ip, in its argument order (from
    from_transition: uplinkd's window; cons_rcvd and cons_miss count the link's rounds in a row)."""

    replied: int = 0
    waiting: int = 0
    timeout: int = 0
    reply_late: int = 0
    cons_rcvd: int = 0
    cons_wait: int = 0
    cons_miss: int = 0
    avg_rtt_us: int = 0


@dataclass(frozen=True)
class TargetFigures:
    address: str
    loss_percent: float
    latency_ms: float | None = None  # None: no reply to measure


@dataclass(frozen=True)
class LinkEvent:
    """A transition with the link's facts and figures at that moment: what hooks and mails get."""

    transition: Transition
    device: str
    check_ip: str = ""  # the first probe target
    source_ip: str = ""
    warn_email: str = ""
    loss_percent: float = 0.0
    latency_ms: float | None = None
    counters: ProbeCounters = field(default_factory=ProbeCounters)
    targets: tuple[TargetFigures, ...] = ()
    wall_time: float = field(default_factory=time.time)
    down_since: float | None = None  # wall clock time the link went down (for long_down)

    @classmethod
    def from_transition(
        cls,
        transition: Transition,
        *,
        device: str,
        source: str = "",
        warn_email: str = "",
        stats: LinkStats | None = None,
        down_since: float | None = None,
    ) -> LinkEvent:
        """The event for a transition, with foolsm's figures taken from the link's statistics."""
        if stats is None:
            return cls(transition, device, "", source, warn_email, down_since=down_since)
        first = stats.targets[0] if stats.targets else None
        rtt = first.latency_ms if first else None
        counters = ProbeCounters(
            replied=first.received if first else 0,
            timeout=first.sent - first.received if first else 0,
            cons_rcvd=stats.consecutive_received,
            cons_miss=stats.consecutive_lost,
            avg_rtt_us=round(rtt * 1000) if rtt is not None else 0,
        )
        return cls(
            transition,
            device,
            check_ip=first.target if first else "",
            source_ip=source,
            warn_email=warn_email,
            loss_percent=stats.loss_percent,
            latency_ms=stats.latency_ms,
            counters=counters,
            targets=tuple(
                TargetFigures(t.target, t.loss_percent, t.latency_ms) for t in stats.targets
            ),
            down_since=down_since,
        )

    @property
    def link(self) -> str:
        return self.transition.link

    @property
    def old(self) -> str:
        return str(self.transition.old)

    @property
    def new(self) -> str:
        return str(self.transition.new)

    @property
    def reason(self) -> str:
        return self.transition.reason


def foolsm_state(state: str) -> str:
    return _FOOLSM_STATES.get(state, state)


def foolsm_arguments(event: LinkEvent) -> list[str]:
    """The arguments foolsm gave its event scripts, in its order."""
    since = event.down_since if event.new == "long_down" else None
    return [
        foolsm_state(event.new),
        event.link,
        event.check_ip,
        event.device,
        event.warn_email,
        *(str(number) for number in astuple(event.counters)),
        event.source_ip,
        foolsm_state(event.old),
        str(int(since if since is not None else event.wall_time)),
    ]


def hook_environment(event: LinkEvent) -> dict[str, str]:
    latency = f"{round(event.latency_ms, 3):g}" if event.latency_ms is not None else ""
    return {
        **os.environ,
        "UPLINKD_STATE": event.new,
        "UPLINKD_LINK": event.link,
        "UPLINKD_PREVSTATE": event.old,
        "UPLINKD_DEVICE": event.device,
        "UPLINKD_REASON": event.reason,
        "UPLINKD_LOSS_PERCENT": f"{event.loss_percent:g}",
        "UPLINKD_LATENCY_MS": latency,
    }


class EventHooks:
    """Runs the executables of up.d/, down.d/ and long_down.d/ on each link state change, with
    foolsm's arguments and the UPLINKD_* environment, each time-boxed, one link's in order."""

    def __init__(self, root: Path, timeout_s: float = const.HOOK_COMMAND_TIMEOUT_S) -> None:
        self.root = root
        self.timeout_s = timeout_s
        self._background = background.Background()
        self._refusals = trust.RefusalLog(log)

    def fire(self, event: LinkEvent) -> None:
        """Run the hooks of the event's new state in the background; returns at once."""
        directory = EVENT_DIRS.get(event.new)
        if directory is not None:
            unstarted = (
                f"{directory} hooks for link {event.link} {event.old} -> {event.new} not run: "
                "stopping"
            )
            self._background.start(
                event.link, self._run_all(self.root / directory, event), unstarted
            )

    async def drain(self, timeout: float) -> bool:
        return await self._background.drain(timeout)

    def executables(self, directory: Path) -> list[Path]:
        """The hooks to run from directory in name order; each refusal is logged once, when it
        appears (trust.py: links, unsafe files and unsafe directories are refused).

        A hook is exec'd by name after this check: only root or uplinkd's user, who may write
        the checked directory, could swap it in between."""
        usable: list[Path] = []
        found, refused = trust.usable_files(directory, self.root)
        for path in found:
            if os.access(path, os.X_OK):
                usable.append(path)
            else:
                refused.append(f"{path}: refused: not executable")
        self._refusals.report(directory, refused)
        return usable

    async def _run_all(self, directory: Path, event: LinkEvent) -> None:
        for path in self.executables(directory):
            await self._run(path, event)

    async def _run(self, path: Path, event: LinkEvent) -> None:
        what = f"{path}: link {event.link} {event.old} -> {event.new}"
        try:
            done = await background.run_bounded(
                [str(path), *foolsm_arguments(event)],
                timeout=self.timeout_s,
                output_limit=OUTPUT_LIMIT,
                env=hook_environment(event),
            )
        except OSError as error:
            log.error("%s: cannot run: %s", what, error.strerror or error)
            return
        except asyncio.CancelledError:  # its process group is killed by now
            log.warning("%s: killed at shutdown", what)
            raise
        if done.timed_out:
            log.error("%s: killed after %g s", what, self.timeout_s)
            return
        shown = f": {done.output}" if done.output else ""
        if done.returncode == 0:
            log.info("%s: done%s", what, shown)
        else:
            log.warning("%s: exit %s%s", what, done.returncode, shown)
