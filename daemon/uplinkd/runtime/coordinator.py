"""The coordinator: feeds the link machines and turns their transitions into kernel applies.

Inputs (probe rounds, netlink events, NetworkManager notifications, admin requests, timers) go to
the link state machines, which only decide. Whatever they decide is logged, published (event
hooks, email, listeners such as the D-Bus adapter), and, when the set of usable links changed,
scheduled as one apply: transitions arriving within COALESCE_S share it. After an apply, the
conntrack entries of links that stopped being usable are forgotten, so their clients reconnect
through a live link; flows on live links are never touched.

What it drives lives beside it: the probers (monitor/probers.py), the traffic and latency
measurements (runtime/measurements.py), the links' addresses and gateways (facts/finder.py), the
hook files, run beside the loop (hooks/runner.py), where transitions are published
(publish/publisher.py) and the status snapshot (publish/status.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import AsyncIPRoute

from .. import const
from ..config.model import Config
from ..datapath import conntrack, routing
from ..datapath.apply import ApplyReport, Datapath
from ..datapath.backends import ApplyKind
from ..errors import ApplyError, HookError, LinkRoutesError, UnknownLinkError, UplinkdError
from ..facts.finder import FactFinder
from ..hooks.runner import HookRunner
from ..monitor.icmp import ProbeRound
from ..monitor.link import Link, LinkState, Transition
from ..monitor.netlink import EventKind, NetEvent, NetlinkWatcher
from ..monitor.probers import Probers
from ..planning import planner
from ..planning.measured import LinkMeasure
from ..planning.plan import LinkFacts, Plan
from ..planning.planner import Extras
from ..publish import status
from ..publish.publisher import Publisher, TransitionListener
from ..publish.status import Snapshot
from .fastest import FastestResponse
from .measurements import Measurements

log = logging.getLogger("uplinkd")

PlanListener = Callable[[int], None]  # called with the new generation after an apply changed it


class _RebuildWaits(Exception):  # noqa: N818 (a signal between two methods, not an error)
    """The plan needs a rebuild that waits for the pre-run/ lines, and no plan with the
    structure in the kernel can be applied meanwhile: nothing was applied."""


@dataclass
class _Pending:
    dirty: bool = False
    forget: set[str] = field(default_factory=set)  # links whose conntrack entries must go


class Coordinator:
    """The one place where events become kernel changes: it feeds the link machines (probe
    rounds, netlink, NetworkManager, admin requests), plans when one changes state, applies the
    plan through the datapath (one apply at a time, coalesced), forgets the connections of links
    gone out of use, and hands each transition to the publisher. Slow work (hooks, mail, name
    lookups) runs beside it, never in its way."""

    def __init__(
        self,
        config: Config,
        datapath: Datapath,
        publisher: Publisher | None = None,
        *,
        services: Sequence[str] = (),
        fact_finder: FactFinder | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.datapath = datapath
        self.services = tuple(services)
        # Transitions to listeners, event hooks and mail (none of them without one).
        self.publisher = publisher if publisher is not None else Publisher(None, None)
        self.clock = clock
        self.links: dict[str, Link] = {}
        self.facts: dict[str, LinkFacts] = {}
        self._fact_finder = fact_finder if fact_finder is not None else FactFinder()
        # One discovery at a time, so the last one started is the one whose facts stay; a burst
        # of events (NetworkManager's address, route and dispatcher call) starts several.
        self._discover_lock = asyncio.Lock()
        self.presumed_up: set[str] = set()  # init links treated as usable until their verdict
        self._in_use: set[str] = set()  # the usable links as of the last transition handled
        self.generation = 0
        self.applies = 0
        self.plan_listeners: list[PlanListener] = []
        self.plan: Plan | None = None  # the last plan applied
        self._rendered: tuple[Plan, str] | None = None  # DryRun's text of a plan, made once
        # What the ruleset's structure in the kernel was planned from (configuration, hooks):
        # while a rebuild waits for its pre-run/ lines, applies plan with these (maps only).
        self._in_kernel: tuple[Config, Extras] | None = None
        self._rebuild_waits = False  # the last apply left a rebuild to the pre-run/ lines' end
        self.measurements = Measurements(clock)
        self._pending = _Pending()
        self._forget_errors: dict[str, str] = {}  # link -> the last failure to forget, as logged
        self._apply_task: asyncio.Task[None] | None = None
        self._apply_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.probers = Probers(
            self._on_round, self.measurements.on_hop_latency, self._spawn, self._retarget
        )
        self._ipr: AsyncIPRoute | None = None
        self._watcher: NetlinkWatcher | None = None
        self.fastest = FastestResponse(datapath.backend, self._spawn, clock=clock)
        # Hooks run beside the loop; a new result of theirs is applied like any other change.
        self.hook_runner = HookRunner(self._schedule)

    # --- life cycle ---------------------------------------------------------------------------

    async def start(self, ipr: AsyncIPRoute) -> ApplyReport | None:
        """Discover, adopt what the kernel holds, apply, then start watching and probing."""
        self._ipr = ipr
        await self._discover()
        self._build_links(self._adopted_up())
        await self._run_hooks()
        report = await self._apply()
        if self._rebuild_waits:  # pre-run/ lines go first, as in Net-ISP-Balance
            report = await self._rebuild_after_pre_run() or report
        self.hook_runner.start()
        self._watcher = NetlinkWatcher([link.device for link in self.config.links], self._on_net)
        self._spawn(self._watcher.run())
        self._spawn(self._ticker())
        self._spawn(self.measurements.sample(self._devices, self._on_sampled))
        self.probers.start(self.config, self.facts)
        return report

    async def stop(self) -> None:
        self.probers.stop()
        self.fastest.close()
        await self.hook_runner.stop()
        tasks = [*self._tasks, *([self._apply_task] if self._apply_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        await self.publisher.drain()

    async def reconfigure(self, config: Config) -> ApplyReport | None:
        """Switch to a new configuration; on any error the running one stays in force."""
        old = (self.config, self.links, self.facts, set(self.presumed_up), set(self._in_use))
        usable = self.usable()
        self.probers.stop()
        self.config = config
        self.datapath.routes_may_have_changed()
        try:
            await self._discover()
            kept = {name: link for name, link in self.links.items() if name in self._names()}
            self._build_links(usable, keep=kept)
            # Applied with the hooks' last result; they run again beside the loop.
            self.hook_runner.reload(self.config, list(self.facts.values()), self.usable())
            report = await self._apply()
        except UplinkdError:
            self.config, self.links, self.facts, self.presumed_up, self._in_use = old
            self.hook_runner.want(self.config, list(self.facts.values()), self.usable())
            self.probers.start(self.config, self.facts)
            raise
        if self._watcher is not None:
            self._watcher.set_devices([link.device for link in config.links])
        if self.publisher.mailer is not None:
            self.publisher.mailer.configure(config.mail)
        # A rebuild left to the pre-run/ lines goes in when they end (their end schedules it):
        # the kernel has checked it, and a reload waiting for them would hold up SIGTERM.
        self.probers.start(self.config, self.facts)
        return report

    async def _rebuild_after_pre_run(self) -> ApplyReport | None:
        """Start: the rebuild that waits for the pre-run/ lines (each time-boxed), applied once
        they are done. No lock is held while they run. A failure is retried like any apply."""
        report = None
        while self._rebuild_waits and not self.hook_runner.stopped:
            await self.hook_runner.pre_run_finished()
            try:
                report = await self._apply()
            except UplinkdError:
                self._schedule()  # logged and retried there
                return None
        return report

    @property
    def listeners(self) -> list[TransitionListener]:
        """Called with every transition once it is logged (the D-Bus adapter is one)."""
        return self.publisher.listeners

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
            targets = self.probers.targets(link_config, self.facts.get(link_config.name))
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

    def _on_round(self, probe_round: ProbeRound) -> None:
        link = self.links.get(probe_round.link)
        if link is not None:
            # Rounds overlap and are reported in order, so completion times (`at`) may step
            # back; the machines get the delivery time, which never does.
            self._handle(link.probe_round(probe_round.replies, self.clock()))

    def _on_net(self, event: NetEvent) -> None:
        now = self.clock()
        self.datapath.routes_may_have_changed()  # a device, address or route moved
        if event.kind is EventKind.CARRIER and event.device is not None:
            for name in self._links_on(event.device):
                self._handle(self.links[name].carrier(bool(event.carrier), now))
            if event.carrier:
                self._spawn(self._carrier_back(event.device))
        elif event.kind is EventKind.NEIGHBOUR and event.device is not None:
            for name in self._links_on(event.device):
                fact = self.facts.get(name)
                if fact is not None and str(fact.gateway) == event.neighbour:
                    log.info("link %s: its gateway %s answers ARP again", name, event.neighbour)
                    self._handle(self.links[name].gateway_back(now))
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

    async def _carrier_back(self, device: str) -> None:
        async with self._apply_lock:  # one dump at a time on the socket (EBUSY)
            try:
                await routing.flush_unresolved_neighbours(self.ipr, device)
            except UplinkdError as exc:
                log.warning("%s: %s", device, exc)
        # The device may have come with a new address; and if it was administratively down,
        # the kernel dropped its routes: they go back in with the next apply.
        await self._refresh(reapply=self._routes_missing_on(device))

    def _routes_missing_on(self, device: str) -> bool:
        return any(self.links[name].routes_missing for name in self._links_on(device))

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
        next_route_retry = 0.0
        while True:
            await asyncio.sleep(const.TICK_S)
            now = self.clock()
            for link in list(self.links.values()):
                self._handle(link.tick(now))
            # Links whose routes the kernel refused, and connections still owed a forget, are
            # retried on their own: the apply is a diff, so for the rest it changes nothing. (A
            # link without device or address waits for netlink to report them instead.)
            refused = (x for name, x in self.links.items() if name in self.facts)
            owed = self._pending.forget or any(x.routes_missing for x in refused)
            if owed and now >= next_route_retry:
                next_route_retry = now + const.APPLY_RETRY_S
                self.datapath.routes_may_have_changed()
                self._schedule()

    def _devices(self) -> set[str]:
        return {link.device for link in self.config.links}

    def _on_sampled(self) -> None:
        if self.measurements.move_choices(self.config, self.facts, self.usable(), self.plan):
            self._schedule()  # a map update: the measured methods pick other links

    async def _refresh(self, *, reapply: bool = False) -> None:
        """Re-read addresses and gateways; probers and the plan follow the new values (with
        `reapply`, the plan is applied again even if they did not change)."""
        before = dict(self.facts)
        await self._discover()
        if self.facts == before:
            if reapply:
                self._schedule()
            return
        for link_config in self.config.links:
            self._retarget(link_config.name)
        self._schedule()

    def _retarget(self, name: str) -> None:
        """The link's probe targets may have changed (gateway, a host name resolved)."""
        if name in self.links and name in self._names():  # not a link a reload removes
            link_config = self.config.link(name)
            targets = self.probers.targets(link_config, self.facts.get(name))
            self.links[name].retarget(targets, link_config.reliability)
            self.probers.follow(self.config, self.facts, name)

    async def _run_hooks(self) -> None:
        """Start: the first apply waits for the hooks' result (each hook time-boxed), so that an
        adopted datapath keeps their part; afterwards they run in the background
        (hooks/runner.py)."""
        await self.hook_runner.refresh(self.config, list(self.facts.values()), self.usable())

    async def _discover(self) -> None:
        async with self._discover_lock:
            self.facts = await self._fact_finder.find(self.ipr, self.config.links, self._apply_lock)

    # --- decisions to actions -------------------------------------------------------------------

    def usable(self) -> set[str]:
        return {
            name
            for name, link in self.links.items()
            if link.state is LinkState.UP
            or (link.state is LinkState.INIT and name in self.presumed_up)
        }

    def measures(self) -> dict[str, LinkMeasure]:
        """What the measured methods see of each link now."""
        return self.measurements.of(self.config.links)

    def _handle(self, transitions: Sequence[Transition], context: str = "") -> None:
        if not transitions:
            return
        for transition in transitions:
            self.presumed_up.discard(transition.link)
            reason = f"{transition.reason} ({context})" if context else transition.reason
            log.info(
                "link %s: %s -> %s: %s", transition.link, transition.old, transition.new, reason
            )
            self.publisher.publish(
                transition,
                self.config.link(transition.link),
                self.facts.get(transition.link),
                self.links[transition.link],
            )
        # The machines have already moved: compare with what the last decision left in use.
        usable = self.usable()
        self._pending.forget |= self._in_use - usable
        if usable != self._in_use:
            self._in_use = usable
            self._schedule()

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
                        # Routes go in per device and the ruleset in one transaction, so what
                        # the kernel holds still forwards through links with routes.
                        log.error("apply failed: %s", exc)
                    else:
                        log.exception("internal error while applying")
                    log.info("retrying every %.0f s while it fails", const.APPLY_RETRY_S)
                last_error = repr(exc)
                await asyncio.sleep(const.APPLY_RETRY_S)

    async def _apply(self) -> ApplyReport | None:
        async with self._apply_lock:
            self._pending.dirty = False
            self._rebuild_waits = False
            if not self.facts:
                log.warning("no link has a usable device yet; the kernel stays as it is")
                return None
            forget, self._pending.forget = self._pending.forget, set()
            try:
                report = await self._apply_routable()
            except _RebuildWaits:
                self._pending.forget |= forget  # owed to the apply after the pre-run/ lines
                return None
            except BaseException:
                self._pending.forget |= forget  # still owed once an apply succeeds
                raise
            # Links that stopped being usable while applying (their routes were refused).
            forget |= self._pending.forget
            self._pending.forget = set()
            await self._forget(forget - self.usable())
            return report

    async def _apply_routable(self) -> ApplyReport:
        """Apply the plan; links whose routes the kernel refuses go down, and the plan is made
        again without them, so the ruleset never sends traffic to a link without routes."""
        for _ in range(len(self.links) + 1):  # each round takes at least one link out of use
            try:
                report = await self._apply_plan()
            except LinkRoutesError as exc:
                now = self.clock()
                for name, why in exc.failed.items():
                    log.warning("link %s: routes refused, taking it out of use: %s", name, why)
                    self._handle(self.links[name].routes_refused(now, why))
                continue
            self._follow_routes(report)
            return report
        raise ApplyError("the plan kept sending traffic to links whose routes were refused")

    def _follow_routes(self, report: ApplyReport) -> None:
        """Tell each link whether its routes are in the kernel after this apply: a link whose
        device is gone or has no address (not in the plan) has none either."""
        now = self.clock()
        for link_config in self.config.links:
            link = self.links[link_config.name]
            if link_config.name not in self.facts:
                why: str | None = f"device {link_config.device} is missing or has no IPv4 address"
            else:
                why = report.unroutable.get(link_config.device)
            if why is not None and not link.routes_missing:
                log.warning(
                    "link %s: out of use until its routes are in: %s", link_config.name, why
                )
                self._handle(link.routes_refused(now, why))
            elif why is None and link.routes_missing:
                log.info("link %s: routes installed again; probing decides", link_config.name)
                self._handle(link.routes_installed(now))

    async def _forget(self, names: set[str]) -> None:
        """Forget the tracked connections of links no longer usable. The plan is in force by
        now, so a failure is no failed apply: the link stays owed and is retried on its own
        (the ticker), and the other links' connections are forgotten all the same."""
        # A link a reload removed is left out: its mark went with it.
        marks = {name: self.config.link_mark(name) for name in names if name in self._names()}
        failed = await conntrack.forget_links(marks, self.config.mark_mask)
        for name in marks:
            why = failed.get(name)
            if why is None:
                self._forget_errors.pop(name, None)
                continue
            self._pending.forget.add(name)
            if self._forget_errors.get(name) != why:  # once per distinct failure
                log.error(
                    "link %s: its tracked connections are not forgotten yet (retrying every"
                    " %.0f s): %s",
                    name,
                    const.APPLY_RETRY_S,
                    why,
                )
            self._forget_errors[name] = why

    async def _apply_plan(self) -> ApplyReport:
        usable = self.usable()
        facts = list(self.facts.values())
        # The hooks' last result goes in now; if what they see changed, they run again in the
        # background and a different result is applied then. The loop never waits for them.
        self.hook_runner.want(self.config, facts, usable)
        while True:  # each refused hook file leaves the hooks' result: bounded by the files
            extras = self.hook_runner.state.extras
            plan = self._plan(self.config, extras, facts, usable)
            try:
                if self._waits_for_pre_run(plan):
                    plan = self._plan_in_place(facts, usable)
                report = await self.datapath.apply(self.ipr, plan)
            except HookError as exc:
                if self.hook_runner.refuse_nft(exc):
                    continue  # the plan without that file's lines, at once
                raise
            break
        if not self._rebuild_waits:
            self._in_kernel = (self.config, extras)
        if report.rebuilt:
            self.hook_runner.after_apply()
        self.applies += 1
        self.plan = plan
        self.fastest.on_apply(plan, report.netfilter)
        # A plan the kernel already held (adopted at start) is still this daemon's first
        # generation: 0 would say that nothing is in force.
        if report.changed or self.generation == 0:
            self.generation += 1
            for listener in self.plan_listeners:
                listener(self.generation)
        up = ", ".join(sorted(usable & set(self.facts))) or "none"
        log.info(
            "applied generation %d, links in use: %s (%s)", self.generation, up, report.describe()
        )
        return report

    def _plan(
        self, config: Config, extras: Extras, facts: Sequence[LinkFacts], usable: set[str]
    ) -> Plan:
        previous = self.plan.choices if self.plan else None
        return planner.plan(
            config, facts, usable, extras, measures=self.measures(), previous=previous
        )

    def _waits_for_pre_run(self, plan: Plan) -> bool:
        """Whether the plan is a rebuild that must wait for the pre-run/ lines; if so they are
        started (in the background) and the kernel has checked the plan already, so that a
        refusal is known now (a reload is refused at once), not after them."""
        if self.hook_runner.pre_run_ready():
            return False
        transaction = self.datapath.backend.prepare(plan)
        if transaction.kind is not ApplyKind.FULL:
            return False
        transaction.check()
        self.hook_runner.start_pre_run()
        self._rebuild_waits = True
        return True

    def _plan_in_place(self, facts: Sequence[LinkFacts], usable: set[str]) -> Plan:
        """While a rebuild waits for the pre-run/ lines: the plan from what the structure in
        the kernel was planned from, with the links usable now, if that is a map update (the
        same links in the same order, so marks and tables are the same). Else _RebuildWaits."""
        if self._in_kernel is None:
            raise _RebuildWaits
        config, extras = self._in_kernel
        if [link.name for link in config.links] != self._names():
            raise _RebuildWaits
        plan = self._plan(config, extras, facts, usable)
        if self.datapath.backend.prepare(plan).kind is ApplyKind.FULL:
            raise _RebuildWaits
        return plan

    def snapshot(self) -> Snapshot:
        """Everything a status display shows, as of now."""
        return status.snapshot(
            self.config,
            self.links,
            usable=self.usable(),
            facts=self.facts,
            measures=self.measures(),
            plan=self.plan,
            generation=self.generation,
            clock=self.clock,
            hook_problems=self.hook_runner.problems,
        )

    def dry_run(self) -> str:
        """What the datapath holds or is about to: the last plan as nft and ip input."""
        if self.plan is None:
            return "# nothing applied yet\n"
        # Rendered once per plan: any local user may call DryRun as often as they like.
        if self._rendered is None or self._rendered[0] is not self.plan:
            self._rendered = (self.plan, self.datapath.render(self.plan))
        return self._rendered[1]
