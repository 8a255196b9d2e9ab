"""One uplinkd instance: load, plan and apply (one-shot modes), or run the daemon.

The one-shot modes (`-d`, `--once`) treat the links the command line names as up (all of them
when it names none), like Net-ISP-Balance's `load_balance.pl CABLE DSL`; the daemon lets link
monitoring decide, and a command line naming links keeps the others administratively down.
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
from . import const, discovery, hooks, planner
from .backends import get_backend
from .bus import BusService
from .coordinator import Coordinator
from .datapath import Datapath
from .errors import ConfigError, DiscoveryError, UplinkdError
from .events import EventHooks
from .fastest import LearnedDestination
from .model import Config
from .notify import Mailer
from .plan import LinkFacts, Plan
from .status import Snapshot

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


async def prepare(
    ipr: AsyncIPRoute, config: Config, services: Collection[str] = (), *, dry_run: bool = False
) -> Prepared:
    facts, warnings = await discovery.discover(ipr, config.links)
    for warning in warnings:
        log.warning("%s", warning)
    if not facts:
        # Applying would refuse every new connection; better to leave the kernel as it is.
        raise DiscoveryError(f"{config.path}: no link has a usable device; nothing applied")
    up = frozenset(services) if services else frozenset(link.name for link in config.links)
    found = hooks.load(config, facts, up, dry_run=dry_run)  # a dry run runs no .py hook
    plan = planner.plan(config, facts, up, found.extras)
    return Prepared(config, tuple(facts), up, found, plan)


class Daemon:
    """The foreground daemon: the coordinator, the D-Bus service and signal handling.

    It is also the controller the D-Bus adapter calls (bus.Controller).
    """

    def __init__(
        self, config_path: Path, services: Sequence[str] = (), *, dbus: bool = True
    ) -> None:
        self.config_path = config_path
        self.services = tuple(services)
        config = load_config(config_path, services)
        self.datapath = Datapath(get_backend(config.backend))
        self.coordinator = Coordinator(
            config,
            self.datapath,
            services=self.services,
            events=EventHooks(config.hook_root, const.EVENT_HOOK_TIMEOUT_S),
            mailer=Mailer(config.mail),
        )
        self.use_dbus = dbus
        self.bus: BusService | None = None
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()

    # --- the controller the D-Bus adapter calls ---
    def snapshot(self) -> Snapshot:
        return self.coordinator.snapshot()

    def set_enabled(self, name: str, enabled: bool) -> None:
        self.coordinator.set_enabled(name, enabled)

    def notify_device(self, device: str, action: str) -> None:
        self.coordinator.notify_device(device, action)

    def dry_run(self) -> str:
        return self.coordinator.dry_run()

    def learned(self) -> list[LearnedDestination]:
        return self.coordinator.fastest.destinations()

    async def reload(self) -> None:
        """Load the configuration again; a bad one is refused (raised) and the running one stays."""
        config = load_config(self.config_path, self.services)
        await self.coordinator.reconfigure(config)
        if self.coordinator.publisher.mailer is not None:
            self.coordinator.publisher.mailer.configure(config.mail)
        if self.bus is not None:
            self.bus.refresh_links()

    # --- life cycle ---
    async def _start_bus(self) -> None:
        if not self.use_dbus:
            return
        bus = BusService(self)
        try:
            await bus.start()
        except (UplinkdError, OSError) as exc:
            log.warning("D-Bus unavailable, running without it: %s", exc)
            return
        self.bus = bus
        self.coordinator.listeners.append(bus.on_transition)
        self.coordinator.plan_listeners.append(bus.on_plan_applied)
        log.info("on the system bus as %s", const.BUS_NAME)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        async with AsyncIPRoute() as ipr:
            await self.coordinator.start(ipr)
            await self._start_bus()
            links = len(self.coordinator.config.links)
            log.info("running with %d link(s); SIGHUP reloads, SIGTERM stops", links)
            while not self._stop.is_set():
                reload_wait = asyncio.create_task(self._reload.wait())
                stop_wait = asyncio.create_task(self._stop.wait())
                await asyncio.wait({reload_wait, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
                reload_wait.cancel()
                stop_wait.cancel()
                if self._reload.is_set() and not self._stop.is_set():
                    self._reload.clear()
                    log.info("SIGHUP: reloading %s", self.config_path)
                    try:
                        await self.reload()
                    except UplinkdError as exc:
                        log.error("reload refused, keeping the running configuration: %s", exc)
            if self.bus is not None:
                await self.bus.stop()
            await self.coordinator.stop()
            if self.coordinator.config.stop_removes_datapath:
                await self.datapath.remove(ipr)
                log.info("stopped; datapath removed (stop_removes_datapath)")
            else:
                log.info("stopped; datapath left in place, traffic keeps flowing")
