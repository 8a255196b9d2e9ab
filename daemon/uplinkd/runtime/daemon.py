"""One uplinkd instance: load, plan and apply (one-shot modes), or run the daemon.

The one-shot modes (`-d`, `--once`) treat the links the command line names as up (all of them
when it names none), like Net-ISP-Balance's `load_balance.pl CABLE DSL`; the daemon lets link
monitoring decide, and a command line naming links keeps the others administratively down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Collection, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute

from .. import const
from ..config import loading
from ..config.model import Config
from ..config.validate import same_name
from ..datapath.apply import Datapath
from ..datapath.backends import get_backend
from ..errors import ConfigError, DiscoveryError, UplinkdError
from ..facts import discovery
from ..facts.finder import FactFinder
from ..hooks import stages
from ..hooks.events import EventHooks
from ..monitor import resolver
from ..planning import planner
from ..planning.plan import LinkFacts, Plan
from ..publish.bus import BusService
from ..publish.mail import Mailer
from ..publish.publisher import Publisher
from ..publish.status import LearnedDestination, Snapshot
from .coordinator import Coordinator

log = logging.getLogger("uplinkd")

# At daemon start a LAN device may still be on its way (a bridge the network service is
# creating alongside uplinkd): wait this long for one before refusing the configuration.
LAN_WAIT_S = 10.0
# -d and --once try each probe target name once, to warn; the daemon keeps trying.
ONE_SHOT_RESOLVE_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Prepared:
    """Everything computed before touching the kernel."""

    config: Config
    facts: tuple[LinkFacts, ...]
    up: frozenset[str]
    hooks: stages.Hooks
    plan: Plan


def load_config(path: Path, services: Sequence[str] = ()) -> Config:
    config = loading.load(path)
    service_names(config, services)
    return config


def service_names(config: Config, services: Collection[str]) -> tuple[str, ...]:
    """The links the command line names, spelled as configured: names are case-insensitive,
    as load_balance.pl upper-cased them (`load_balance.pl cable` meant CABLE)."""
    names = [link.name for link in config.links]
    found = []
    for service in services:
        name = same_name(service, names)
        if name is None:
            raise ConfigError(
                config.path,
                f"unknown service {service!r} on the command line; known: {', '.join(names)}",
            )
        found.append(name)
    return tuple(found)


async def check_lans(ipr: AsyncIPRoute, config: Config, wait_s: float = 0.0) -> None:
    """Warn of missing LAN devices; refuse (ConfigError) when none exists after `wait_s`."""
    deadline = asyncio.get_running_loop().time() + wait_s
    while True:
        try:
            warnings = discovery.check_lans(config, await discovery.device_names(ipr))
        except ConfigError as exc:
            if asyncio.get_running_loop().time() >= deadline:
                raise
            log.warning("%s; waiting up to %g s for one", exc, wait_s)
            wait_s = 0.0  # said once
            await asyncio.sleep(1.0)
            continue
        for warning in warnings:
            log.warning("%s", warning)
        return


async def warn_unresolved(config: Config) -> None:
    """-d and --once: say which probe target names do not resolve now (the daemon retries)."""
    hosts = [(t, link) for link in config.links for t in link.targets if isinstance(t, str)]
    results = await asyncio.gather(
        *(resolver.resolve_ipv4(host, ONE_SHOT_RESOLVE_TIMEOUT_S) for host, _ in hosts),
        return_exceptions=True,
    )
    for (host, link), result in zip(hosts, results, strict=True):
        if isinstance(result, BaseException):
            log.warning(
                "%s:%d: link.targets: %s of link %s does not resolve now (%s); the daemon "
                "keeps the link in init and retries",
                config.path,
                link.line,
                host,
                link.name,
                resolver.describe(result),
            )


async def prepare(
    ipr: AsyncIPRoute, config: Config, services: Collection[str] = (), *, dry_run: bool = False
) -> Prepared:
    """Discover, then plan with the links `services` names up (all when it names none). The
    facts come the daemon's way (FactFinder: NetworkManager's gateway where it runs a link),
    so `-d` and `--once` show and apply what the daemon would."""
    found = await FactFinder(quiet=True).find(ipr, config.links, asyncio.Lock())
    facts = list(found.values())
    if not facts:
        # Applying would refuse every new connection; better to leave the kernel as it is.
        raise DiscoveryError(f"{config.path}: no link has a usable device; nothing applied")
    await check_lans(ipr, config)
    await warn_unresolved(config)
    named = service_names(config, services)
    up = named or [link.name for link in config.links]
    return await plan_with(config, facts, up, dry_run=dry_run)


async def plan_with(
    config: Config, facts: Sequence[LinkFacts], up: Collection[str], *, dry_run: bool = False
) -> Prepared:
    """The plan (and the hooks' part of it) for these facts with exactly `up` up. The .py hooks
    run in their child processes, time-boxed; the first that fails is raised (HookError)."""
    found = await stages.load(config, facts, up, dry_run=dry_run)  # a dry run runs no .py hook
    plan = planner.plan(config, facts, up, found.extras)
    return Prepared(config, tuple(facts), frozenset(up), found, plan)


class Daemon:
    """The foreground daemon: the coordinator, the D-Bus service and signal handling.

    It is also the controller the D-Bus adapter calls (bus.Controller).
    """

    def __init__(
        self,
        config_path: Path,
        services: Sequence[str] = (),
        *,
        dbus: bool = True,
        backend: str | None = None,
    ) -> None:
        """Everything the daemon runs with is built here, once. `backend` (--backend) overrides
        the configuration's for the life of the daemon."""
        self.config_path = config_path
        config = load_config(config_path, services)
        self.services = service_names(config, services)
        self.backend_override = backend
        self.datapath = Datapath(get_backend(backend or config.backend))
        events = EventHooks(config.hook_root, const.EVENT_HOOK_TIMEOUT_S)
        publisher = Publisher(events, Mailer(config.mail))
        self.coordinator = Coordinator(config, self.datapath, publisher, services=self.services)
        self.use_dbus = dbus
        self.bus: BusService | None = None
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        # One reload at a time (SIGHUP and D-Bus callers alike): a refused reload puts back the
        # configuration it found, which must not be another reload's half-made one.
        self._reloading = asyncio.Lock()

    # --- the controller the D-Bus adapter calls ---
    def snapshot(self) -> Snapshot:
        return self.coordinator.snapshot()

    def set_enabled(self, name: str, enabled: bool) -> None:
        self.coordinator.set_enabled(name, enabled)

    def notify_device(self, device: str, action: str) -> None:
        self.coordinator.notify_device(device, action)

    def dry_run(self) -> str:
        return self.coordinator.dry_run()

    def learned(self, offset: int, limit: int) -> tuple[list[LearnedDestination], int]:
        return self.coordinator.fastest.page(offset, limit)

    async def reload(self) -> None:
        """Load the configuration again; a bad one is refused (logged and raised, for the D-Bus
        caller) and the running one stays."""
        async with self._reloading:
            try:
                config = load_config(self.config_path, self.services)
                self._check_backend(config)
                async with AsyncIPRoute() as ipr:  # the coordinator's socket may be mid-dump
                    await check_lans(ipr, config)
                await self.coordinator.reconfigure(config)
            except UplinkdError as exc:
                log.error("reload refused, keeping the running configuration: %s", exc)
                raise

    def _check_backend(self, config: Config) -> None:
        """A reload keeps the backend: switching means removing one ruleset and building the
        other, which a restart does (and the datapath keeps forwarding meanwhile)."""
        wanted = self.backend_override or config.backend
        running = self.datapath.backend.name
        if wanted not in (running, "auto") and self.backend_override is None:
            raise ConfigError(
                config.path,
                f"{wanted!r}, but the daemon runs the {running} backend; a reload cannot switch"
                " it: restart uplinkd (systemctl restart uplinkd)",
                key="backend",
            )

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

    def _on_stop_signal(self, name: str) -> None:
        if not self._stop.is_set():
            log.info("%s: stopping", name)
        self._stop.set()

    async def _unless_stopped(self, work: Coroutine[Any, Any, None]) -> bool:
        """Run work to its end, or until SIGTERM/SIGINT cuts it (False: it was cancelled).

        For start-up steps that wait on something outside (a LAN device, the bus) and may be
        given up safely; the first apply is not one of them."""
        if self._stop.is_set():
            work.close()
            return False
        task = asyncio.ensure_future(work)
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({task, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_wait.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return False
        task.result()  # its error, if any
        return True

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT, stop within const.STOP_BOUND_S.

        The signal handlers come first, so a stop during start-up is seen at once: waiting for
        a LAN device or for a bus that does not answer is cut; the first apply is completed.
        """
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._on_stop_signal, "SIGTERM")
        loop.add_signal_handler(signal.SIGINT, self._on_stop_signal, "SIGINT")
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        async with AsyncIPRoute() as ipr:
            lans = check_lans(ipr, self.coordinator.config, LAN_WAIT_S)
            if not await self._unless_stopped(lans):
                log.info("stopped before the first apply; nothing changed")
                return
            await self.coordinator.start(ipr)
            if not await self._unless_stopped(self._start_bus()):
                log.info("D-Bus: connecting cut short by the stop")
            if not self._stop.is_set():
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
                    with contextlib.suppress(UplinkdError):  # logged by reload()
                        await self.reload()
            # Each step is bounded: the bus by BUS_STOP_TIMEOUT_S, hooks and mail by
            # SHUTDOWN_DRAIN_S + SHUTDOWN_CUT_S; together less than STOP_BOUND_S.
            stopping = loop.time()
            if self.bus is not None:
                await self.bus.stop()
            await self.coordinator.stop()
            if self.coordinator.config.stop_removes_datapath:
                await self.datapath.remove(ipr)
                outcome = "datapath removed (stop_removes_datapath)"
            else:
                outcome = "datapath left in place, traffic keeps flowing"
            log.info("stopped in %.1f s; %s", loop.time() - stopping, outcome)
