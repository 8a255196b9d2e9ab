"""The coordinator: feeds the link machines and turns their transitions into kernel applies.

Inputs (probe rounds, netlink events, NetworkManager notifications, admin requests, timers) go to
the link state machines, which only decide. Whatever they decide is logged, published (event
hooks, email, listeners such as the D-Bus adapter), and, when the set of usable links changed,
scheduled as one apply: transitions arriving within COALESCE_S share it. After an apply, the
conntrack entries of links that stopped being usable are forgotten, so their clients reconnect
through a live link; flows on live links are never touched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from . import __version__, conntrack, const, counters, discovery, hooks, nm, planner
from .datapath import ApplyReport, Datapath
from .errors import UplinkdError
from .events import EventHooks, LinkEvent
from .hops import HopProber
from .link import Link, LinkState, Transition
from .measured import LinkMeasure
from .model import MEASURED_METHODS, Config, LinkConfig, Method
from .netlink import EventKind, NetEvent, NetlinkWatcher
from .notify import Mailer
from .plan import LinkFacts, Plan
from .probe import Prober, ProbeRound
from .status import LinkStatus, Snapshot, overall

log = logging.getLogger("uplinkd")

TransitionListener = Callable[[Transition], None]
PlanListener = Callable[[int], None]  # called with the new generation after an apply changed it


class UnknownLinkError(UplinkdError):
    """A request named a link or device that the configuration does not have."""


@dataclass
class _Pending:
    dirty: bool = False
    forget: set[str] = field(default_factory=set)  # links whose conntrack entries must go


def prober_mark(config: Config, link_id: int) -> int:
    return planner.link_mark(link_id, config.mark_mask)


def probe_targets(link: LinkConfig, fact: LinkFacts | None) -> list[str]:
    """The configured targets, else the gateway (foolsm's checkip defaulted to it as well)."""
    if link.targets:
        return [str(target) for target in link.targets]
    if fact is not None and fact.gateway is not None:
        return [str(fact.gateway)]
    return []


class Coordinator:
    def __init__(
        self,
        config: Config,
        datapath: Datapath,
        *,
        services: Sequence[str] = (),
        events: EventHooks | None = None,
        mailer: Mailer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.datapath = datapath
        self.services = tuple(services)
        self.events = events
        self.mailer = mailer
        self.clock = clock
        self.links: dict[str, Link] = {}
        self.facts: dict[str, LinkFacts] = {}
        self._gateways_logged: dict[str, str] = {}  # link -> its gateway and source, as logged
        # One discovery at a time, so the last one started is the one whose facts stay; a burst
        # of events (NetworkManager's address, route and dispatcher call) starts several.
        self._discover_lock = asyncio.Lock()
        self.presumed_up: set[str] = set()  # init links treated as usable until their verdict
        self._in_use: set[str] = set()  # the usable links as of the last transition handled
        self.generation = 0
        self.applies = 0
        self.listeners: list[TransitionListener] = []
        self.plan_listeners: list[PlanListener] = []
        self.plan: Plan | None = None  # the last plan applied
        self.rates = counters.RateMeter()
        self._pending = _Pending()
        self._apply_task: asyncio.Task[None] | None = None
        self._apply_lock = asyncio.Lock()
        self._probers: dict[str, Prober] = {}
        self._hop_probers: dict[str, HopProber] = {}
        self.hop_latency: dict[str, float | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._ipr: AsyncIPRoute | None = None
        self._watcher: NetlinkWatcher | None = None

    # --- life cycle ---------------------------------------------------------------------------

    async def start(self, ipr: AsyncIPRoute) -> ApplyReport | None:
        """Discover, adopt what the kernel holds, apply, then start watching and probing."""
        self._ipr = ipr
        await self._discover()
        self._build_links(self._adopted_up())
        report = await self._apply()
        self._watcher = NetlinkWatcher([link.device for link in self.config.links], self._on_net)
        self._spawn(self._watcher.run())
        self._spawn(self._ticker())
        self._spawn(self._measure())
        self._start_probers()
        return report

    async def stop(self) -> None:
        self._stop_probers()
        tasks = [*self._tasks, *([self._apply_task] if self._apply_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        for sink in (self.events, self.mailer):
            if sink is not None:
                await sink.drain(const.SHUTDOWN_DRAIN_S)

    async def reconfigure(self, config: Config) -> ApplyReport | None:
        """Switch to a new configuration; on any error the running one stays in force."""
        old = (self.config, self.links, self.facts, set(self.presumed_up))
        usable = self.usable()
        self._stop_probers()
        self.config = config
        try:
            await self._discover()
            kept = {name: link for name, link in self.links.items() if name in self._names()}
            self._build_links(usable, keep=kept)
            report = await self._apply()
        except UplinkdError:
            self.config, self.links, self.facts, self.presumed_up = old
            self._start_probers()
            raise
        if self._watcher is not None:
            self._watcher.set_devices([link.device for link in config.links])
        self._start_probers()
        return report

    @property
    def ipr(self) -> AsyncIPRoute:
        if self._ipr is None:
            raise RuntimeError("the coordinator has not been started")
        return self._ipr

    def _names(self) -> list[str]:
        return [link.name for link in self.config.links]

    def _adopted_up(self) -> set[str]:
        """Links to presume usable at start: those the kernel says were up, else all of them."""
        state = self.datapath.backend.read_back()
        if state is None or not state.link_names:
            return set(self._names())
        adopted = {state.link_names[i] for i in state.up_links if i in state.link_names}
        log.info("adopting the datapath in place; links up in it: %s", ", ".join(sorted(adopted)))
        return adopted

    def _build_links(self, presumed: set[str], keep: dict[str, Link] | None = None) -> None:
        now = self.clock()
        links: dict[str, Link] = {}
        for link_config in self.config.links:
            targets = probe_targets(link_config, self.facts.get(link_config.name))
            old = (keep or {}).get(link_config.name)
            if old is not None:
                old.retarget(targets, link_config.reliability)
                links[link_config.name] = old
                continue
            links[link_config.name] = Link(
                link_config.name, link_config.monitor, targets, link_config.reliability, now
            )
        self.links = links
        self.presumed_up = {
            name
            for name, link in links.items()
            if link.state is LinkState.INIT and name in presumed
        }
        self._in_use = self.usable()
        if self.services:
            for name, link in links.items():
                if name not in self.services and link.state is not LinkState.DISABLED:
                    self._handle(link.set_enabled(False, now), "not named on the command line")

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("internal task failed: %r", task.exception())

    # --- inputs -------------------------------------------------------------------------------

    def _start_probers(self, only: Collection[str] | None = None) -> None:
        """Start a prober for every link (or those in `only`) that has none and can be probed."""
        for link_config in self.config.links:
            if link_config.name in self._probers or (
                only is not None and link_config.name not in only
            ):
                continue
            fact = self.facts.get(link_config.name)
            targets = probe_targets(link_config, fact)
            if fact is None or not targets:
                if fact is not None:
                    log.warning(
                        "link %s: no probe target (no targets and no gateway); judged by carrier",
                        link_config.name,
                    )
                continue
            prober = Prober(
                link_config.name,
                targets,
                str(fact.address.ip),
                prober_mark(self.config, self._link_id(link_config.name)),
                link_config.monitor.interval_ms,
                link_config.monitor.timeout_ms,
                self._on_round,
            )
            self._probers[link_config.name] = prober
            self._spawn(prober.run())
            if self._wants_hop_latency():
                hop_prober = HopProber(
                    link_config.name,
                    targets[0],
                    str(fact.address.ip),
                    prober_mark(self.config, self._link_id(link_config.name)),
                    self._on_hop_latency,
                )
                self._hop_probers[link_config.name] = hop_prober
                self._spawn(hop_prober.run())

    def _stop_probers(self) -> None:
        for prober in self._probers.values():
            prober.stop()
        for hop_prober in self._hop_probers.values():
            hop_prober.stop()
        self._probers.clear()
        self._hop_probers.clear()

    def _wants_hop_latency(self) -> bool:
        rules = (*self.config.rules, self.config.default)
        return any(rule.method is Method.LOWEST_LATENCY for rule in rules)

    def _on_hop_latency(self, link: str, latency_ms: float | None) -> None:
        self.hop_latency[link] = latency_ms

    def measures(self) -> dict[str, LinkMeasure]:
        """What the measured methods see of each link now."""
        found = {}
        for link_config in self.config.links:
            rate = self.rates.rates.get(link_config.device, counters.Rate())
            found[link_config.name] = LinkMeasure(
                rx_bps=rate.rx_bps,
                tx_bps=rate.tx_bps,
                hop_latency_ms=self.hop_latency.get(link_config.name),
            )
        return found

    def _measured_choice_changed(self) -> bool:
        """Whether the measured methods would now pick other links than the plan in force."""
        if self.plan is None or not self._has_measured_rules():
            return False
        facts = list(self.facts.values())
        fresh = planner.plan(
            self.config,
            facts,
            self.usable(),
            measures=self.measures(),
            previous=self.plan.choices,
        )
        return fresh.choices != self.plan.choices

    def _has_measured_rules(self) -> bool:
        rules = (*self.config.rules, self.config.default)
        return any(rule.method in MEASURED_METHODS for rule in rules)

    def _link_id(self, name: str) -> int:
        return self._names().index(name) + 1

    def _on_round(self, probe_round: ProbeRound) -> None:
        link = self.links.get(probe_round.link)
        if link is not None:
            # Rounds overlap and are reported in order, so completion times (`at`) may step
            # back; the machines get the delivery time, which never does.
            self._handle(link.probe_round(probe_round.replies, self.clock()))

    def _on_net(self, event: NetEvent) -> None:
        now = self.clock()
        if event.kind is EventKind.CARRIER and event.device is not None:
            for name in self._links_on(event.device):
                self._handle(self.links[name].carrier(bool(event.carrier), now))
            if event.carrier:
                self._spawn(self._refresh())  # the device may have come with a new address
        elif event.kind in (EventKind.ADDRESS, EventKind.GATEWAY):
            log.info("%s: re-reading addresses and gateways", event.detail)
            self._spawn(self._refresh())
        elif event.kind is EventKind.RESYNC:
            log.warning("netlink resync (%s): re-reading every link", event.detail)
            watcher = self._watcher
            for name, link_config in ((lc.name, lc) for lc in self.config.links):
                carrier = watcher.carrier(link_config.device) if watcher else None
                if carrier is False:
                    self._handle(self.links[name].carrier(up=False, now=now))
            self._spawn(self._refresh())

    def _links_on(self, device: str) -> list[str]:
        return [link.name for link in self.config.links if link.device == device]

    def notify_device(self, device: str, action: str) -> None:
        """A NetworkManager dispatcher action for a device: a hint, checked against the kernel."""
        names = self._links_on(device)
        if not names:
            raise UnknownLinkError(f"no link uses device {device!r}")
        now = self.clock()
        for name in names:
            self._handle(self.links[name].notify(action, now), f"NetworkManager: {action}")
        self._spawn(self._refresh())

    def set_enabled(self, name: str, enabled: bool) -> None:
        if name not in self.links:
            raise UnknownLinkError(f"unknown link {name!r}; links: {', '.join(self.links)}")
        self._handle(self.links[name].set_enabled(enabled, self.clock()))

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(const.TICK_S)
            now = self.clock()
            for link in list(self.links.values()):
                self._handle(link.tick(now))

    async def _measure(self) -> None:
        """Sample the links' interface counters for their traffic rates.

        On a netlink socket of its own: the kernel refuses a second dump on a socket that is
        still dumping (EBUSY), and discovery and applies use the coordinator's.
        """
        async with AsyncIPRoute() as ipr:
            while True:
                devices = {link.device for link in self.config.links}
                try:
                    readings = await counters.read(ipr, devices)
                except (OSError, NetlinkError) as exc:
                    log.debug("reading interface counters failed: %s", exc)
                    readings = {}
                now = self.clock()
                for device, (rx, tx) in readings.items():
                    self.rates.sample(device, rx, tx, now)
                if self._measured_choice_changed():
                    self._schedule()  # a map update: the measured methods pick other links
                await asyncio.sleep(const.RATE_SAMPLE_S)

    async def _refresh(self) -> None:
        """Re-read addresses and gateways; probers and the plan follow the new values."""
        before = dict(self.facts)
        await self._discover()
        if self.facts == before:
            return
        for link_config in self.config.links:
            name = link_config.name
            fact = self.facts.get(name)
            targets = probe_targets(link_config, fact)
            self.links[name].retarget(targets, link_config.reliability)
            prober = self._probers.get(name)
            if prober is not None and fact is not None:
                prober.update(targets=targets, source=str(fact.address.ip))
            hop_prober = self._hop_probers.get(name)
            if hop_prober is not None and fact is not None and targets:
                hop_prober.update(target=targets[0], source=str(fact.address.ip))
            elif prober is None:
                self._start_probers({name})
        self._schedule()

    async def _discover(self) -> None:
        async with self._discover_lock:
            # The netlink socket is the one applies use, and the kernel refuses a second dump on
            # a socket (EBUSY); nmcli runs outside that lock, so a slow one never delays an apply.
            async with self._apply_lock:
                facts, warnings = await discovery.discover(self.ipr, self.config.links)
            for warning in warnings:
                log.warning("%s", warning)
            facts = await self._prefer_nm_gateways(facts)
            self.facts = {fact.name: fact for fact in facts}

    async def _prefer_nm_gateways(self, facts: list[LinkFacts]) -> list[LinkFacts]:
        """Links without a configured gateway take NetworkManager's when it runs their device."""
        auto = {link.name for link in self.config.links if link.gateway is None}
        managed = await nm.device_facts(fact.device for fact in facts if fact.name in auto)
        merged: list[LinkFacts] = []
        for found in facts:
            if found.name not in auto:
                merged.append(found)
                continue
            fact, source = nm.prefer_gateway(found, managed.get(found.device))
            said = f"gateway {fact.gateway}, from {source}"
            if self._gateways_logged.get(fact.name) != said:
                self._gateways_logged[fact.name] = said
                log.info("link %s: %s", fact.name, said)
            merged.append(fact)
        return merged

    # --- decisions to actions -------------------------------------------------------------------

    def usable(self) -> set[str]:
        return {
            name
            for name, link in self.links.items()
            if link.state is LinkState.UP
            or (link.state is LinkState.INIT and name in self.presumed_up)
        }

    def _handle(self, transitions: Sequence[Transition], context: str = "") -> None:
        if not transitions:
            return
        for transition in transitions:
            self.presumed_up.discard(transition.link)
            reason = f"{transition.reason} ({context})" if context else transition.reason
            log.info(
                "link %s: %s -> %s: %s", transition.link, transition.old, transition.new, reason
            )
            self._publish(transition)
        # The machines have already moved: compare with what the last decision left in use.
        usable = self.usable()
        self._pending.forget |= self._in_use - usable
        if usable != self._in_use:
            self._in_use = usable
            self._schedule()

    def _publish(self, transition: Transition) -> None:
        for listener in self.listeners:
            listener(transition)
        if self.events is None and self.mailer is None:
            return
        event = self._link_event(transition)
        if self.events is not None:
            self.events.fire(event)
        if self.mailer is not None:
            self.mailer.notify(event)

    def _link_event(self, transition: Transition) -> LinkEvent:
        link_config = self.config.link(transition.link)
        fact = self.facts.get(transition.link)
        return LinkEvent.from_transition(
            transition,
            device=link_config.device,
            source=str(fact.address.ip) if fact else "",
            warn_email=link_config.monitor.warn_email,
            stats=self.links[transition.link].stats(),
        )

    def _schedule(self) -> None:
        self._pending.dirty = True
        if self._apply_task is None or self._apply_task.done():
            self._apply_task = asyncio.create_task(self._apply_soon())

    async def _apply_soon(self) -> None:
        """Apply once the burst of transitions is over; a failed apply is retried, because the
        kernel still holds the old state (a device or address may have been mid-change)."""
        await asyncio.sleep(const.COALESCE_S)
        last_error = ""
        while self._pending.dirty:
            try:
                await self._apply()
            except Exception as exc:
                self._pending.dirty = True
                if repr(exc) != last_error:  # once per distinct failure, not every retry
                    if isinstance(exc, UplinkdError):
                        log.error("apply failed, the kernel keeps the previous state: %s", exc)
                    else:
                        log.exception("internal error while applying; the kernel keeps its state")
                    log.info("retrying every %.0f s while it fails", const.APPLY_RETRY_S)
                last_error = repr(exc)
                await asyncio.sleep(const.APPLY_RETRY_S)

    async def _apply(self) -> ApplyReport | None:
        async with self._apply_lock:
            self._pending.dirty = False
            if not self.facts:
                log.warning("no link has a usable device yet; the kernel stays as it is")
                return None
            forget, self._pending.forget = self._pending.forget, set()
            try:
                report = await self._apply_plan()
            except BaseException:
                self._pending.forget |= forget  # still owed once an apply succeeds
                raise
            usable = self.usable()
            for name in sorted(forget - usable):
                if name in self.facts:
                    mark = planner.link_mark(self._link_id(name), self.config.mark_mask)
                    count = await conntrack.forget_mark(mark, self.config.mark_mask)
                    log.info("link %s: forgot %d tracked connections", name, count)
            return report

    async def _apply_plan(self) -> ApplyReport:
        usable = self.usable()
        facts = list(self.facts.values())
        found = hooks.load(self.config, facts, usable)
        plan = planner.plan(
            self.config,
            facts,
            usable,
            found.extras,
            measures=self.measures(),
            previous=self.plan.choices if self.plan else None,
        )
        report = await self.datapath.apply(self.ipr, plan, found)
        self.applies += 1
        self.plan = plan
        if report.changed:
            self.generation += 1
            for listener in self.plan_listeners:
                listener(self.generation)
        up = ", ".join(sorted(usable & set(self.facts))) or "none"
        log.info(
            "applied generation %d, links in use: %s (%s)", self.generation, up, report.describe()
        )
        return report

    def snapshot(self) -> Snapshot:
        """Everything a status display shows, as of now."""
        usable = self.usable()
        wall_offset = time.time() - self.clock()
        shares = self._default_shares()
        links = []
        for link_config in self.config.links:
            machine = self.links[link_config.name]
            stats = machine.stats()
            fact = self.facts.get(link_config.name)
            rate = self.rates.rates.get(link_config.device, counters.Rate())
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
                    loss_percent=stats.loss_percent,
                    rx_bps=round(rate.rx_bps),
                    tx_bps=round(rate.tx_bps),
                    new_connection_share=shares.get(link_config.name, 0.0),
                )
            )
        return Snapshot(
            version=__version__,
            mode=str(self.config.default.method),
            generation=self.generation,
            overall=overall(tuple(links)),
            links=tuple(links),
        )

    def _default_shares(self) -> dict[str, float]:
        """Each link's share of the default rule's buckets in the applied plan."""
        if self.plan is None:
            return {}
        names = {link.id: link.name for link in self.plan.links}
        default = self.plan.dispatches[-1]
        return {
            names[link_id]: default.targets.count(link_id) / default.buckets
            for link_id in set(default.targets)
            if link_id in names
        }

    def dry_run(self) -> str:
        """What the datapath holds or is about to: the last plan as nft and ip input."""
        if self.plan is None:
            return "# nothing applied yet\n"
        return self.datapath.render(self.plan)
