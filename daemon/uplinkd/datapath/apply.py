"""Bring the kernel to a Plan (sysctls, policy routing, netfilter) and take it away.

Order matters for "nothing half-applied": the netfilter transaction is checked by the kernel first
(a refused ruleset or hook line stops everything before any change), then routes and rules go in
(so marked traffic always has a table), then the ruleset in one transaction.

A device that refuses its routes (administratively down, deleted, renamed, its gateway no longer
reachable) costs only its own link: the others' routes go in all the same. If the plan sends
traffic to such a link, the ruleset is not switched to it (LinkRoutesError names the links, and
the caller plans again without them); if the link is already out of use, the apply goes on and the
report names the device, so the caller keeps retrying it on its own.

Hook command lines are the caller's: `pre_run` is awaited before a rebuild (the ruleset's
structure changes), and the report says whether there was one (routes/ and post-run/ follow it).
The daemon passes none: it runs pre-run/ beside the loop before asking for the rebuild
(coordinator, hooks/runner.py), so that no apply waits for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from pyroute2 import AsyncIPRoute

from ..errors import ApplyError, LinkRoutesError
from ..planning.plan import Plan
from . import routing
from .backends import ApplyKind, Backend

log = logging.getLogger("uplinkd")


# How long an apply trusts that the routes and rules it put in are still there when no kernel
# event said otherwise (an admin's `ip route del` in uplinkd's tables, say).
ROUTES_RECHECK_S: Final = 10.0


@dataclass(frozen=True)
class ApplyReport:
    netfilter: ApplyKind
    routing: routing.RoutingChanges
    sysctls: tuple[str, ...]
    rebuilt: bool  # the ruleset was built anew: routes/ and post-run/ lines run after it

    @property
    def unroutable(self) -> dict[str, str]:
        """Devices whose routes the kernel refused, with the reason."""
        return self.routing.failed

    def describe(self) -> str:
        r = self.routing
        return (
            f"netfilter: {self.netfilter}; routes +{r.routes_added}/-{r.routes_removed}; "
            f"rules +{r.rules_added}/-{r.rules_removed}; sysctls changed: {len(self.sysctls)}"
        )

    @property
    def changed(self) -> bool:
        return bool(self.netfilter is not ApplyKind.NONE or self.routing.total or self.sysctls)


class Datapath:
    """Brings the kernel to a Plan in one apply: the backend's transaction, prepared from one read
    of what the kernel holds, and the policy routes and sysctls around it; also renders a plan
    (-d, DryRun) and removes everything uplinkd added."""

    def __init__(
        self,
        backend: Backend,
        proc_sys: Path = Path("/proc/sys"),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.proc_sys = proc_sys
        self.clock = clock
        # The plan whose routing went in whole, the devices' indexes then, and when: the next
        # apply writes only what differs from it (a link state change moves table base+0 and
        # nothing else) instead of reading every route and rule back, two thirds of a map
        # update's time. Forgotten when a kernel event may have moved routes
        # (routes_may_have_changed), on any failure, and after ROUTES_RECHECK_S.
        self._routing_in: tuple[Plan, dict[str, int], float] | None = None

    def routes_may_have_changed(self) -> None:
        """A device, address or route changed: the next apply reads routes and rules back."""
        self._routing_in = None

    def _write_sysctls(self, plan: Plan) -> tuple[str, ...]:
        changed = []
        for key, value in plan.sysctls:
            path = self.proc_sys / key
            if not path.exists():
                log.warning("sysctl %s does not exist here; skipped", key)
                continue
            if path.read_text().strip() != value:
                path.write_text(value + "\n")
                changed.append(f"{key}={value}")
        return tuple(changed)

    async def apply(
        self,
        ipr: AsyncIPRoute,
        plan: Plan,
        *,
        pre_run: Callable[[], Awaitable[object]] | None = None,
    ) -> ApplyReport:
        transaction = self.backend.prepare(plan)
        transaction.check()
        rebuild = transaction.kind is ApplyKind.FULL
        if rebuild and pre_run is not None:
            await pre_run()
        routes, sysctls = await self._apply_routing(ipr, plan)
        kind = transaction.commit()
        return ApplyReport(kind, routes, sysctls, rebuilt=rebuild)

    async def _apply_routing(
        self, ipr: AsyncIPRoute, plan: Plan
    ) -> tuple[routing.RoutingChanges, tuple[str, ...]]:
        """Sysctls, then routes and rules; raises LinkRoutesError if a link in use lost its
        routes (the netfilter side is then left as it is)."""
        sysctls = self._write_sysctls(plan)
        known, self._routing_in = self._routing_in, None
        now = self.clock()
        if known is not None and now - known[2] < ROUTES_RECHECK_S:
            old, devices, since = known
            if routing.changes_from(old, plan):
                try:
                    routes = await routing.sync_from(ipr, old, plan, devices)
                except ApplyError as exc:  # read it all back and place what can go in
                    log.info("routes: the kernel refused a change (%s); syncing them whole", exc)
                else:
                    self._routing_in = (plan, devices, since)
                    return routes, sysctls
        routes = await routing.sync(ipr, plan)
        if not routes.failed and not routes.conflicts:
            self._routing_in = (plan, await routing.device_indexes(ipr), now)
        refused = {
            link.name: routes.failed[link.device]
            for link in plan.links
            if link.up and link.device in routes.failed
        }
        if refused:
            raise LinkRoutesError(refused)
        for device, why in routes.failed.items():
            if device not in {link.device for link in plan.links}:
                log.warning("device %s: hook routes refused: %s", device, why)
        return routes, sysctls

    def render(self, plan: Plan, part: str = "all") -> str:
        """What applying the plan means, as `nft -f` and `ip -batch` input (part: all, nft, ip)."""
        nft = self.backend.render(plan)
        ip_batch = routing.render_ip_batch(plan)
        if part == "nft":
            return nft
        if part == "ip":
            return ip_batch
        settings = "".join(f"#   {k.replace('/', '.')} = {v}\n" for k, v in plan.sysctls)
        feed = {
            "iptables": "iptables-legacy-restore --noflush",
        }.get(self.backend.name, "nft -f")
        return (
            f"# ===== {self.backend.name}: feed to `{feed}` "
            f"(or: uplinkd -d --part nft | {feed} -) =====\n"
            + nft
            + "\n# ===== policy routing: feed to `ip -batch` "
            "(or: uplinkd -d --part ip | ip -batch -) =====\n"
            + ip_batch
            + ("\n# ===== sysctls uplinkd sets =====\n" + settings if settings else "")
        )

    async def remove(self, ipr: AsyncIPRoute) -> bool:
        self._routing_in = None
        had_rules = self.backend.remove()
        changes = await routing.remove_all(ipr)
        return had_rules or bool(changes.total)
