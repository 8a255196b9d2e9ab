"""What uplinkd reports about itself: plain data for the D-Bus adapter, uplinkctl and logs, and
how it is taken from the coordinator's state."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from .. import __version__

if TYPE_CHECKING:
    from ..config.model import Config
    from ..monitor.link import Link
    from ..planning.measured import LinkMeasure
    from ..planning.plan import LinkFacts, Plan


class Overall(enum.StrEnum):
    ONLINE = "online"  # every link in service is usable
    DEGRADED = "degraded"  # some, not all, usable
    OFFLINE = "offline"  # none usable


@dataclass(frozen=True)
class LinkStatus:
    name: str
    device: str
    state: str  # init | up | down | long_down | disabled
    since: float  # wall-clock time (seconds since the epoch) of the last state change
    usable: bool  # new connections may use it
    weight: int
    priority: int
    gateway: str  # "" when unknown
    address: str  # "address/prefix", "" when the device has none
    latency_ms: float  # mean probe RTT over the window; -1 when nothing answered
    hop_latency_ms: float  # smoothed RTT to the 2nd/3rd hop (lowest-latency); -1 when unmeasured
    loss_percent: float  # probe rounds lost over the window
    rx_bps: int  # received bits per second, smoothed
    tx_bps: int  # transmitted bits per second, smoothed
    new_connection_share: float  # fraction (0..1) of new connections of the default rule


@dataclass(frozen=True)
class Snapshot:
    version: str
    mode: str  # the default rule's method
    generation: int
    overall: Overall
    links: tuple[LinkStatus, ...]
    # Hook failures in force (hooks/runner.py), one line each naming the file and line; the plan is
    # applied without what they would have added (or with their previous result).
    hook_problems: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["overall"] = str(self.overall)
        return data


def overall(links: tuple[LinkStatus, ...]) -> Overall:
    in_service = [link for link in links if link.state != "disabled"]
    usable = [link for link in in_service if link.usable]
    if not usable:
        return Overall.OFFLINE
    return Overall.ONLINE if len(usable) == len(in_service) else Overall.DEGRADED


def snapshot(
    config: Config,
    machines: Mapping[str, Link],
    *,
    usable: Collection[str],
    facts: Mapping[str, LinkFacts],
    measures: Mapping[str, LinkMeasure],
    plan: Plan | None,
    generation: int,
    clock: Callable[[], float],
    hook_problems: tuple[str, ...] = (),
) -> Snapshot:
    """Everything a status display shows, as of now. `machines` are the links' state machines,
    whose times come from `clock`; `measures` has every configured link."""
    wall_offset = time.time() - clock()
    shares = default_shares(plan)
    links = []
    for link_config in config.links:
        machine = machines[link_config.name]
        stats = machine.stats()
        fact = facts.get(link_config.name)
        measure = measures[link_config.name]
        links.append(
            LinkStatus(
                name=link_config.name,
                device=link_config.device,
                state=str(machine.state),
                since=machine.since + wall_offset,
                usable=link_config.name in usable,
                weight=link_config.weight,
                priority=link_config.priority,
                gateway=str(fact.gateway) if fact and fact.gateway else "",
                address=str(fact.address) if fact else "",
                latency_ms=-1.0 if stats.latency_ms is None else stats.latency_ms,
                hop_latency_ms=-1.0
                if measure.hop_latency_ms is None
                else round(measure.hop_latency_ms, 2),
                loss_percent=stats.loss_percent,
                rx_bps=round(measure.rx_bps),
                tx_bps=round(measure.tx_bps),
                new_connection_share=shares.get(link_config.name, 0.0),
            )
        )
    return Snapshot(
        version=__version__,
        mode=str(config.default.method),
        generation=generation,
        overall=overall(tuple(links)),
        links=tuple(links),
        hook_problems=hook_problems,
    )


def default_shares(plan: Plan | None) -> dict[str, float]:
    """Each link's share of the default rule's buckets in the applied plan."""
    if plan is None:
        return {}
    names = {link.id: link.name for link in plan.links}
    default = plan.dispatches[-1]
    return {
        names[link_id]: default.targets.count(link_id) / default.buckets
        for link_id in set(default.targets)
        if link_id in names
    }


@dataclass(frozen=True)
class LearnedDestination:
    """One destination a fastest-response rule learned, as uplinkctl and D-Bus show it."""

    rule: str
    address: str
    link: str
    seconds_left: int
