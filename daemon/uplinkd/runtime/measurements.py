"""What the measured methods see of each link: traffic rates sampled from the interface counters,
and the hop latencies the hop probers report. The choices made from them are in measured.py."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Iterable, Mapping

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .. import const
from ..config.model import MEASURED_METHODS, Config, LinkConfig
from ..monitor import traffic
from ..planning import planner
from ..planning.measured import LinkMeasure
from ..planning.plan import LinkFacts, Plan

log = logging.getLogger("uplinkd")


class Measurements:
    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.rates = traffic.RateMeter()  # by device
        self.hop_latency: dict[str, float | None] = {}  # by link name

    def on_hop_latency(self, link: str, latency_ms: float | None) -> None:
        self.hop_latency[link] = latency_ms

    def of(self, links: Iterable[LinkConfig]) -> dict[str, LinkMeasure]:
        """What the measured methods see of each of `links` now, by link name."""
        found = {}
        for link_config in links:
            rate = self.rates.rates.get(link_config.device, traffic.Rate())
            found[link_config.name] = LinkMeasure(
                rx_bps=rate.rx_bps,
                tx_bps=rate.tx_bps,
                hop_latency_ms=self.hop_latency.get(link_config.name),
            )
        return found

    def move_choices(
        self,
        config: Config,
        facts: Mapping[str, LinkFacts],
        usable: Collection[str],
        plan: Plan | None,
    ) -> bool:
        """Whether, measured as now, the measured methods would pick other links than `plan`
        (the plan in force) does."""
        rules = (*config.rules, config.default)
        if plan is None or not any(rule.method in MEASURED_METHODS for rule in rules):
            return False
        fresh = planner.plan(
            config,
            list(facts.values()),
            usable,
            measures=self.of(config.links),
            previous=plan.choices,
        )
        return fresh.choices != plan.choices

    async def sample(
        self, devices: Callable[[], Collection[str]], sampled: Callable[[], None]
    ) -> None:
        """Sample the interface counters of `devices()` for their traffic rates, calling
        `sampled` after each sample, until cancelled.

        On a netlink socket of its own: the kernel refuses a second dump on a socket that is
        still dumping (EBUSY), and discovery and applies use the coordinator's.
        """
        async with AsyncIPRoute() as ipr:
            while True:
                wanted = devices()
                try:
                    readings = await traffic.read(ipr, wanted)
                except (OSError, NetlinkError) as exc:
                    log.debug("reading interface counters failed: %s", exc)
                    readings = {}
                now = self.clock()
                for device, (rx, tx) in readings.items():
                    self.rates.sample(device, rx, tx, now)
                sampled()
                await asyncio.sleep(const.RATE_SAMPLE_S)
