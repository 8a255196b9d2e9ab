"""One state machine per ISP link: probes, carrier, NetworkManager and admin in, transitions out.

Pure decision logic: no I/O and no clock. Every input carries `now` (monotonic seconds) and returns
the transitions it caused; the coordinator acts on them (plan, D-Bus, hooks, email) afterwards.

Loss is measured over the last `const.LOSS_WINDOW_ROUNDS` probe rounds. A round succeeds when at
least `reliability` of the link's targets answered within `timeout_ms`. The loss-percentage rule
for going down only counts once the window is full, so a fresh link is judged on its first rounds
by `max_successive_pkts_lost` alone; recovery may use a partial window (the consecutive-replies
rule guards it).
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from transitions import Machine

from .. import const
from ..config.model import Monitor


class LinkState(enum.StrEnum):
    INIT = "init"
    UP = "up"
    DOWN = "down"
    LONG_DOWN = "long_down"
    DISABLED = "disabled"


@dataclass(frozen=True)
class Transition:
    link: str
    old: LinkState
    new: LinkState
    reason: str  # one sentence with the numbers that decided it, for logs and email
    at: float  # monotonic time of the input that caused it


@dataclass(frozen=True)
class TargetStats:
    """One probe target over the current window."""

    target: str
    sent: int
    received: int
    loss_percent: float
    latency_ms: float | None  # mean RTT of the replies in the window; None without replies


@dataclass(frozen=True)
class LinkStats:
    state: LinkState
    since: float
    rounds: int  # probe rounds in the window (up to const.LOSS_WINDOW_ROUNDS)
    loss_percent: float  # failed rounds in the window
    latency_ms: float | None  # mean of the replying targets' latencies
    targets: tuple[TargetStats, ...]
    consecutive_lost: int  # failed rounds in a row
    consecutive_received: int  # successful rounds in a row
    flaps: int  # up->down changes since the link was last stable for const.FLAP_WINDOW_S
    held_until: float | None  # flap damping: no recovery before this time


# The NetworkManager dispatcher actions the shim forwards. Only "down" decides anything; the rest
# make the coordinator re-read the real state.
NM_DOWN: Final = "down"
NM_HINTS: Final = frozenset({"up", "dhcp4-change", "dhcp6-change", "connectivity-change"})


class _Edge(NamedTuple):
    trigger: str
    source: tuple[LinkState, ...]
    dest: LinkState
    conditions: tuple[str, ...] = ()
    unless: tuple[str, ...] = ()


_S = LinkState
# The state graph. Conditions name Link methods that only read counters; triggers are private so
# the public inputs below stay the only way in.
_GRAPH: Final = (
    _Edge("_fail", (_S.INIT, _S.UP), _S.DOWN, conditions=("_failing",)),
    _Edge("_drop", (_S.INIT, _S.UP), _S.DOWN),  # carrier lost, NetworkManager down, no routes
    _Edge("_recover", (_S.INIT, _S.DOWN, _S.LONG_DOWN), _S.UP, ("_healthy",), ("_blocked",)),
    _Edge("_expire", (_S.DOWN,), _S.LONG_DOWN, conditions=("_long_down_due",)),
    _Edge("_disable", (_S.INIT, _S.UP, _S.DOWN, _S.LONG_DOWN), _S.DISABLED),
    _Edge("_enable", (_S.DISABLED,), _S.INIT),
)
# Checked before firing, so an input that does not apply in the current state skips transitions'
# event processing (and its "can't trigger" error) entirely.
_SOURCES: Final = {edge.trigger: frozenset(edge.source) for edge in _GRAPH}
_MACHINE_GRAPH: Final = [
    {
        "trigger": e.trigger,
        "source": list(e.source),
        "dest": e.dest,
        "conditions": list(e.conditions),
        "unless": list(e.unless),
    }
    for e in _GRAPH
]


class Link:
    """The health of one ISP link, decided from its inputs (thresholds: uplinkd.toml(5))."""

    _state: LinkState  # written by the transitions machine
    _rounds: deque[bool]  # the window, newest last; True = failed round
    _lost_in_window: int
    _lost_in_row: int
    _received_in_row: int

    def __init__(
        self, name: str, monitor: Monitor, targets: Sequence[str], reliability: int, now: float
    ) -> None:
        self.name = name
        self.monitor = monitor
        self.since = now  # time of the last state change
        self.held_until: float | None = None
        self._carrier = True
        self._nm_down = False
        self._routes_missing = False  # the kernel refused the link's routes (device admin-down...)
        self._hold_s: float | None = None  # the hold-down this down spell started with
        self._flaps = 0
        self._targets: dict[str, deque[float | None]] = {}
        self._reliability = 1
        self._lost_in_flight_until = now  # see _reset_counters
        self._reset_counters()
        self.retarget(targets, reliability)
        # One machine per link: the machine holds the state on this model and nothing global.
        self._machine = Machine(
            model=self,
            states=LinkState,
            transitions=_MACHINE_GRAPH,
            initial=LinkState.INIT,
            auto_transitions=False,
            model_attribute="_state",
        )

    @property
    def state(self) -> LinkState:
        return self._state

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(self._targets)

    # Inputs

    def probe_round(self, replies: Mapping[str, float | None], now: float) -> list[Transition]:
        """One probe round: target -> RTT in ms, or None (a target missing from replies is a loss;
        replies from targets this link no longer probes are ignored)."""
        answered = sum(replies.get(target) is not None for target in self._targets)
        failed = answered < self._reliability
        if failed and now < self._lost_in_flight_until:
            return self._evaluate(now)  # sent before the reset (see _reset_counters)
        for target, history in self._targets.items():
            history.append(replies.get(target))
        if len(self._rounds) == const.LOSS_WINDOW_ROUNDS:
            self._lost_in_window -= self._rounds.popleft()
        self._rounds.append(failed)
        self._lost_in_window += failed
        if failed:
            self._lost_in_row += 1
            self._received_in_row = 0
        else:
            self._received_in_row += 1
            self._lost_in_row = 0
        return self._evaluate(now)

    def carrier(self, up: bool, now: float) -> list[Transition]:
        """Carrier from netlink. Loss goes down at once; its return only lets probing decide again,
        from clean counters (rounds lost while the cable was out say nothing about the path)."""
        if up:
            if not self._carrier:
                self._reset_counters(now)
            self._carrier = True
            self._nm_down = False
            return []
        self._carrier = False
        self._received_in_row = 0
        return self._fire("_drop", now, lambda: "carrier lost")

    def gateway_back(self, now: float) -> list[Transition]:
        """The gateway, silent on ARP, answers again: the rounds it lost say nothing about the
        path from now on, so a link that is not up is judged from clean counters, as after a
        carrier loss (probing still decides)."""
        if self._state is not LinkState.UP:
            self._reset_counters(now)
        return []

    def routes_installed(self, now: float) -> list[Transition]:
        """The link's routes are in the kernel (again): probing decides, from clean counters (the
        probes sent while they were missing had no route through the link)."""
        if self._routes_missing:
            self._routes_missing = False
            self._reset_counters(now)
        return []

    def routes_refused(self, now: float, reason: str) -> list[Transition]:
        """The kernel refused the link's routes (device administratively down, gone mid-apply,
        gateway unreachable): it cannot carry traffic, down at once, no recovery until they
        are in."""
        self._routes_missing = True
        self._received_in_row = 0
        return self._fire("_drop", now, lambda: f"its routes cannot be installed: {reason}")

    @property
    def routes_missing(self) -> bool:
        return self._routes_missing

    def notify(self, action: str, now: float) -> list[Transition]:
        """A NetworkManager dispatcher action for this link's device."""
        if action == NM_DOWN:
            self._nm_down = True
            self._received_in_row = 0
            reason = "NetworkManager took the connection down (dispatcher action 'down')"
            return self._fire("_drop", now, lambda: reason)
        if action not in NM_HINTS:
            allowed = ", ".join(sorted({NM_DOWN, *NM_HINTS}))
            raise ValueError(
                f"link {self.name}: unknown NetworkManager dispatcher action {action!r}"
                f" (allowed: {allowed})"
            )
        if action == "up" and self._nm_down:
            # NetworkManager brought it back: probing decides again, from clean counters.
            self._nm_down = False
            self._reset_counters(now)
        return []

    def set_enabled(self, enabled: bool, now: float) -> list[Transition]:
        """Admin enable/disable. Enabling starts over in init with fresh counters."""
        if not enabled:
            return self._fire("_disable", now, lambda: "disabled by the administrator")
        done = self._fire("_enable", now, lambda: "enabled by the administrator")
        if done:
            self._reset_counters(now)
            self._flaps = 0
            self.held_until = self._hold_s = None
        return done

    def tick(self, now: float) -> list[Transition]:
        """Timers: down -> long_down, the end of a flap hold-down, flap count decay."""
        return self._evaluate(now)

    def retarget(self, targets: Sequence[str], reliability: int) -> None:
        """New probe targets (e.g. the gateway changed). State and round counters stay; targets
        kept from before keep their history. `reliability` is capped at the number of targets;
        a link without targets has nothing to prove it works and cannot come up."""
        if reliability < 1:
            raise ValueError(f"link {self.name}: reliability must be at least 1, not {reliability}")
        old = self._targets
        self._targets = {
            t: old.get(t, deque(maxlen=const.LOSS_WINDOW_ROUNDS)) for t in dict.fromkeys(targets)
        }
        self._reliability = max(1, min(reliability, len(self._targets)))

    def stats(self) -> LinkStats:
        targets = tuple(_target_stats(t, h) for t, h in self._targets.items())
        latencies = [t.latency_ms for t in targets if t.latency_ms is not None]
        return LinkStats(
            state=self._state,
            since=self.since,
            rounds=len(self._rounds),
            loss_percent=_percent(self._lost_in_window, len(self._rounds)),
            latency_ms=sum(latencies) / len(latencies) if latencies else None,
            targets=targets,
            consecutive_lost=self._lost_in_row,
            consecutive_received=self._received_in_row,
            flaps=self._flaps,
            held_until=self.held_until,
        )

    # Decisions

    def _evaluate(self, now: float) -> list[Transition]:
        if self.held_until is not None and now >= self.held_until:
            self.held_until = None
        if self._state is LinkState.UP and now - self.since >= const.FLAP_WINDOW_S:
            self._flaps = 0
        return (
            self._fire("_expire", now, lambda: self._long_down_reason(now))
            + self._fire("_fail", now, self._failure_reason)
            + self._fire("_recover", now, self._recovery_reason)
        )

    def _fire(self, trigger: str, now: float, reason: Callable[[], str | None]) -> list[Transition]:
        old = self._state
        if old not in _SOURCES[trigger] or not self._machine.events[trigger].trigger(self, now=now):
            return []
        text = reason() or trigger
        if old is LinkState.UP and self._state is LinkState.DOWN:
            text += self._register_flap(now)
        elif self._state is LinkState.UP:
            self._hold_s = None
        self.since = now
        return [Transition(self.name, old, self._state, text, now)]

    def _register_flap(self, now: float) -> str:
        """Count an up->down change; from the FLAP_DAMPING_FROM-th on, hold recovery back."""
        if now - self.since >= const.FLAP_WINDOW_S:
            self._flaps = 0  # the link had been stable: this is a fresh failure, not a flap
        self._flaps += 1
        if self._flaps < const.FLAP_DAMPING_FROM:
            return ""
        doublings = min(self._flaps - const.FLAP_DAMPING_FROM, 30)  # 30: far past the cap
        hold = min(const.FLAP_HOLD_MIN_S * 2.0**doublings, const.FLAP_HOLD_MAX_S)
        self.held_until = now + hold
        self._hold_s = hold
        return (
            f"; flap damping: {self._flaps} flaps without {const.FLAP_WINDOW_S:g} s up in between,"
            f" held down for {hold:g} s"
        )

    # Conditions named in _GRAPH (transitions passes the trigger's now= to each).

    def _failing(self, now: float) -> bool:
        return self._failure_reason() is not None

    def _healthy(self, now: float) -> bool:
        m = self.monitor
        return (
            self._received_in_row >= m.min_successive_pkts_rcvd
            and self._lost_in_window * 100 <= m.min_packet_loss * len(self._rounds)
        )

    def _blocked(self, now: float) -> bool:
        held = self.held_until is not None and now < self.held_until
        return held or not self._carrier or self._nm_down or self._routes_missing

    def _long_down_due(self, now: float) -> bool:
        return now - self.since >= self.monitor.long_down_time

    # Reasons

    def _failure_reason(self) -> str | None:
        m = self.monitor
        if self._lost_in_row >= m.max_successive_pkts_lost:
            if len(self._targets) <= 1:
                what = f"{self._lost_in_row} probes lost in a row"
            else:
                what = (
                    f"{self._lost_in_row} probe rounds in a row with fewer than"
                    f" {self._reliability} of {len(self._targets)} targets answering"
                )
            return f"{what} (max_successive_pkts_lost {m.max_successive_pkts_lost})"
        rounds = len(self._rounds)
        if rounds == const.LOSS_WINDOW_ROUNDS and (
            self._lost_in_window * 100 >= m.max_packet_loss * rounds
        ):
            loss = _percent(self._lost_in_window, rounds)
            return (
                f"{loss:.0f}% of the last {rounds} probe rounds lost"
                f" (max_packet_loss {m.max_packet_loss}%)"
            )
        return None

    def _recovery_reason(self) -> str:
        m = self.monitor
        rounds = len(self._rounds)
        loss = _percent(self._lost_in_window, rounds)
        text = (
            f"{self._received_in_row} probe rounds answered in a row (min_successive_pkts_rcvd"
            f" {m.min_successive_pkts_rcvd}), {loss:.0f}% lost over the last {rounds} rounds"
            f" (min_packet_loss {m.min_packet_loss}%)"
        )
        if self._hold_s is not None:
            text += f"; the {self._hold_s:g} s flap hold-down is over"
        return text

    def _long_down_reason(self, now: float) -> str:
        return f"down for {now - self.since:.0f} s (long_down_time {self.monitor.long_down_time} s)"

    def _reset_counters(self, now: float | None = None) -> None:
        """Start judging afresh (at `now`: a carrier, a connection or routes came back). Rounds
        in flight were sent before: a loss among them, reported within one probe timeout, is
        no verdict on the path now, and would hold recovery back until the window drained."""
        if now is not None:
            self._lost_in_flight_until = now + self.monitor.timeout_ms / 1000
        self._rounds = deque()
        self._lost_in_window = 0
        self._lost_in_row = 0
        self._received_in_row = 0
        for history in self._targets.values():
            history.clear()


def _percent(part: int, whole: int) -> float:
    return 100.0 * part / whole if whole else 0.0


def _target_stats(target: str, history: deque[float | None]) -> TargetStats:
    rtts = [rtt for rtt in history if rtt is not None]
    return TargetStats(
        target=target,
        sent=len(history),
        received=len(rtts),
        loss_percent=_percent(len(history) - len(rtts), len(history)),
        latency_ms=sum(rtts) / len(rtts) if rtts else None,
    )
