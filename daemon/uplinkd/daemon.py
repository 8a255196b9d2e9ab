"""One uplinkd instance: load a configuration, plan, apply; reload on SIGHUP, stop on SIGTERM.

Link monitoring feeds `set_up()` later; today the set of usable links is what the command line
names (all links when it names none), like Net-ISP-Balance's `load_balance.pl CABLE DSL`.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import AsyncIPRoute

from . import config as config_loader
from . import discovery, hooks, planner
from .backends import get_backend
from .datapath import ApplyReport, Datapath
from .errors import ConfigError, DiscoveryError, UplinkdError
from .model import Config
from .plan import LinkFacts, Plan

log = logging.getLogger("uplinkd")


@dataclass(frozen=True)
class Prepared:
    """Everything computed before touching the kernel."""

    config: Config
    facts: tuple[LinkFacts, ...]
    up: frozenset[str]
    hooks: hooks.Hooks
    plan: Plan


def load_config(path: Path, services: Sequence[str] = ()) -> Config:
    config = config_loader.load(path)
    names = [link.name for link in config.links]
    for service in services:
        if service not in names:
            raise ConfigError(
                path, f"unknown service {service!r} on the command line; known: {', '.join(names)}"
            )
    return config


async def prepare(ipr: AsyncIPRoute, config: Config, services: Collection[str] = ()) -> Prepared:
    facts, warnings = await discovery.discover(ipr, config.links)
    for warning in warnings:
        log.warning("%s", warning)
    if not facts:
        # Applying would refuse every new connection; better to leave the kernel as it is.
        raise DiscoveryError(f"{config.path}: no link has a usable device; nothing applied")
    up = frozenset(services) if services else frozenset(link.name for link in config.links)
    found = hooks.load(config, facts, up)
    plan = planner.plan(config, facts, up, found.extras)
    return Prepared(config, tuple(facts), up, found, plan)


def describe(report: ApplyReport) -> str:
    r = report.routing
    return (
        f"netfilter: {report.netfilter}; routes +{r.routes_added}/-{r.routes_removed}; "
        f"rules +{r.rules_added}/-{r.rules_removed}; sysctls changed: {len(report.sysctls)}"
    )


class Daemon:
    def __init__(self, config_path: Path, services: Sequence[str] = ()) -> None:
        self.config_path = config_path
        self.services = tuple(services)
        self.config = load_config(config_path, services)
        self.datapath = Datapath(get_backend(self.config.backend))
        self.generation = 0
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()

    async def apply(self, ipr: AsyncIPRoute, config: Config) -> ApplyReport:
        """Plan and apply `config`; it becomes the running one only if the kernel took it."""
        prepared = await prepare(ipr, config, self.services)
        report = await self.datapath.apply(ipr, prepared.plan, prepared.hooks)
        self.config = config
        if report.changed:
            self.generation += 1
        log.info("applied generation %d (%s)", self.generation, describe(report))
        return report

    async def reload(self, ipr: AsyncIPRoute) -> None:
        """Load the configuration again; a bad one is refused and the running one stays."""
        try:
            await self.apply(ipr, load_config(self.config_path, self.services))
        except UplinkdError as exc:
            log.error("reload refused, keeping the running configuration: %s", exc)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        async with AsyncIPRoute() as ipr:
            await self.apply(ipr, self.config)
            log.info(
                "running with %d link(s); SIGHUP reloads, SIGTERM stops", len(self.config.links)
            )
            while not self._stop.is_set():
                reload_wait = asyncio.create_task(self._reload.wait())
                stop_wait = asyncio.create_task(self._stop.wait())
                await asyncio.wait({reload_wait, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                reload_wait.cancel()
                stop_wait.cancel()
                if self._reload.is_set() and not self._stop.is_set():
                    self._reload.clear()
                    log.info("SIGHUP: reloading %s", self.config_path)
                    await self.reload(ipr)
            if self.config.stop_removes_datapath:
                await self.datapath.remove(ipr)
                log.info("stopped; datapath removed (stop_removes_datapath)")
            else:
                log.info("stopped; datapath left in place, traffic keeps flowing")
