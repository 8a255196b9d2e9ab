"""Policy routing: apply and remove the routes and ip rules of a Plan, touching nothing foreign.

Everything uplinkd adds carries protocol RTPROT_UPLINKD; that number is how it recognises its own
routes and rules, so only those are ever deleted. `sync` is a diff: reading the kernel, then making
only the changes needed, in an order that never leaves marked traffic without a route:
routes first (connected before via-gateway), new rules, then old rules, then old routes.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

from .. import const
from ..errors import ApplyError
from ..planning.plan import IPv4Address, IPv4Network, Plan, RouteSpec, RuleAction, RuleSpec

RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
FR_ACT_TO_TBL = 1
FR_ACT_UNREACHABLE = 7
U32_UNSET = 0xFFFFFFFF  # how the kernel reports an unset suppress_prefixlength / suppress_ifgroup
MARK_ALL = 0xFFFFFFFF  # the mask the kernel gives a fwmark without one
FIB_RULE_INVERT = 0x2  # "not": the only rule flag that changes the match (others are status)

_ACTIONS = {FR_ACT_TO_TBL: RuleAction.LOOKUP, FR_ACT_UNREACHABLE: RuleAction.UNREACHABLE}
# The rule attributes RuleSpec expresses; a rule of ours with any other is never "wanted".
_MODELLED_RULE_ATTRS = frozenset(
    {"FRA_PRIORITY", "FRA_TABLE", "FRA_FWMARK", "FRA_FWMASK", "FRA_SRC", "FRA_OIFNAME"}
    | {"FRA_SUPPRESS_PREFIXLEN", "FRA_SUPPRESS_IFGROUP", "FRA_PROTOCOL", "FRA_PAD"}
)
# Attributes that cannot be passed back as they were dumped (compound values or padding).
_UNECHOED_RULE_ATTRS = frozenset({"FRA_PAD", "FRA_UID_RANGE", "FRA_SPORT_RANGE", "FRA_DPORT_RANGE"})


@dataclass
class RoutingChanges:
    """What one sync or remove_all changed (a replaced route counts as added)."""

    routes_added: int = 0
    routes_removed: int = 0
    rules_added: int = 0
    rules_removed: int = 0
    # Planned routes left out because a foreign route holds the same place outside our tables.
    conflicts: list[str] = field(default_factory=list)
    # Devices whose routes the kernel refused (down, gone, gateway unreachable), with the reason;
    # their other planned routes were not tried and their routes in the kernel were kept.
    failed: dict[str, str] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.routes_added + self.routes_removed + self.rules_added + self.rules_removed


# --- text forms (ip -batch, messages) -------------------------------------------------------


def _table_name(table: int) -> str:
    return "main" if table == const.RT_TABLE_MAIN else str(table)


def route_scope_link(spec: RouteSpec) -> bool:
    """A route without gateway is on-link, as `ip route` would make it."""
    return spec.scope_link or spec.gateway is None


def route_text(spec: RouteSpec) -> str:
    """The route in `ip route` words, without the command."""
    words = ["default" if spec.dst.prefixlen == 0 else str(spec.dst)]
    if spec.gateway is not None:
        words += ["via", str(spec.gateway)]
    words += ["dev", spec.device, "table", _table_name(spec.table)]
    words += ["proto", str(const.RTPROT_UPLINKD)]
    words += ["scope", "link" if route_scope_link(spec) else "global"]
    if spec.src is not None:
        words += ["src", str(spec.src)]
    return " ".join(words)


def canonical_rule(spec: RuleSpec) -> RuleSpec:
    """The rule as the kernel reports it back, so specs and dumps compare equal."""
    mark = spec.fwmark or 0
    mask = spec.fwmask if spec.fwmask is not None else (MARK_ALL if mark else 0)
    src = spec.src if spec.src is not None and spec.src.prefixlen > 0 else None
    return replace(
        spec,
        table=0 if spec.action == RuleAction.UNREACHABLE else spec.table,
        fwmark=mark if mark or mask else None,
        fwmask=mask if mark or mask else None,
        src=src,
        oif=spec.oif or None,
    )


def rule_text(spec: RuleSpec) -> str:
    """The rule in `ip rule` words, without the command."""
    rule = canonical_rule(spec)
    words = ["priority", str(rule.priority)]
    if rule.src is not None:
        words += ["from", str(rule.src)]
    if rule.fwmark is not None:
        words += ["fwmark", f"{rule.fwmark:#x}/{rule.fwmask or 0:#x}"]
    if rule.oif is not None:
        words += ["oif", rule.oif]
    if rule.action == RuleAction.UNREACHABLE:
        words.append("unreachable")
    else:
        words += ["lookup", _table_name(rule.table)]
    if rule.suppress_prefixlength is not None:
        words += ["suppress_prefixlength", str(rule.suppress_prefixlength)]
    words += ["protocol", str(const.RTPROT_UPLINKD)]
    return " ".join(words)


def ordered_routes(routes: Iterable[RouteSpec]) -> list[RouteSpec]:
    """Connected routes before routes via a gateway, so every gateway is reachable when added."""
    return sorted(routes, key=lambda r: (r.gateway is not None, r.table))


def render_ip_batch(plan: Plan) -> str:
    """The routing part of the plan as an `ip -batch` file (for a host without uplinkd state)."""
    lines = [
        f"# uplinkd routing plan: tables {', '.join(map(str, plan.tables)) or '(none)'}",
        f"# every route and rule carries protocol {const.RTPROT_UPLINKD}",
        "# apply with: ip -batch FILE",
    ]
    lines += [f"route replace {route_text(r)}" for r in ordered_routes(plan.routes)]
    lines += [f"rule add {rule_text(r)}" for r in sorted(plan.rules, key=lambda r: r.priority)]
    return "\n".join(lines) + "\n"


# --- kernel reads ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelRoute:
    """A route of ours as dumped; `state` is comparable with a planned route's."""

    table: int
    dst: IPv4Network
    tos: int
    metric: int
    scope: int
    rtype: int
    oif: int | None
    gateway: IPv4Address | None
    prefsrc: IPv4Address | None
    multipath: bool
    protocol: int

    @property
    def key(self) -> tuple[int, IPv4Network, int, int]:
        """What the kernel identifies an IPv4 route by (a replace overwrites the holder)."""
        return (self.table, self.dst, self.tos, self.metric)

    @property
    def state(self) -> tuple[Any, ...] | None:
        if self.multipath or self.rtype != RTN_UNICAST or self.tos or self.metric:
            return None
        return (self.table, self.dst, self.oif, self.gateway, self.prefsrc, self.scope)


def _kernel_route(msg: Any) -> KernelRoute:
    table = msg.get_attr("RTA_TABLE")
    gateway = msg.get_attr("RTA_GATEWAY")
    prefsrc = msg.get_attr("RTA_PREFSRC")
    oif = msg.get_attr("RTA_OIF")
    return KernelRoute(
        table=int(table if table is not None else msg["table"]),
        dst=IPv4Network((msg.get_attr("RTA_DST") or 0, int(msg["dst_len"]))),
        tos=int(msg["tos"]),
        metric=int(msg.get_attr("RTA_PRIORITY") or 0),
        scope=int(msg["scope"]),
        rtype=int(msg["type"]),
        oif=int(oif) if oif is not None else None,
        gateway=IPv4Address(gateway) if gateway else None,
        prefsrc=IPv4Address(prefsrc) if prefsrc else None,
        multipath=msg.get_attr("RTA_MULTIPATH") is not None,
        protocol=int(msg["proto"]),
    )


def rule_from_message(msg: Any) -> RuleSpec | None:
    """The dumped rule as a canonical RuleSpec; None when RuleSpec cannot express it."""
    action = _ACTIONS.get(int(msg["action"]))
    if action is None or msg["tos"] or msg["flags"] & FIB_RULE_INVERT or msg["dst_len"]:
        return None
    if any(nla[0] not in _MODELLED_RULE_ATTRS for nla in msg["attrs"]):
        return None
    if msg.get_attr("FRA_SUPPRESS_IFGROUP") not in (None, U32_UNSET):
        return None
    src = msg.get_attr("FRA_SRC")
    table = msg.get_attr("FRA_TABLE")
    suppress = msg.get_attr("FRA_SUPPRESS_PREFIXLEN")
    mark = msg.get_attr("FRA_FWMARK") or 0
    mask = msg.get_attr("FRA_FWMASK") or 0
    return canonical_rule(
        RuleSpec(
            priority=int(msg.get_attr("FRA_PRIORITY") or 0),
            action=action,
            table=int(table if table is not None else msg["table"]),
            fwmark=mark if mark or mask else None,
            fwmask=mask if mark or mask else None,
            src=IPv4Network(f"{src}/{msg['src_len']}") if src else None,
            oif=msg.get_attr("FRA_OIFNAME"),
            suppress_prefixlength=None if suppress in (None, U32_UNSET) else int(suppress),
        )
    )


async def _our_rules(ipr: AsyncIPRoute) -> list[Any]:
    return [
        msg
        async for msg in await ipr.rule("dump", family=socket.AF_INET)
        if msg.get_attr("FRA_PROTOCOL") == const.RTPROT_UPLINKD
    ]


async def _routes(ipr: AsyncIPRoute) -> list[KernelRoute]:
    return [_kernel_route(msg) async for msg in await ipr.route("dump", family=socket.AF_INET)]


async def device_indexes(ipr: AsyncIPRoute) -> dict[str, int]:
    """Device name -> ifindex, as the kernel has them now."""
    return {msg.get_attr("IFLA_IFNAME"): int(msg["index"]) async for msg in await ipr.link("dump")}


# --- kernel writes -----------------------------------------------------------------------------


def _rule_args(spec: RuleSpec) -> dict[str, Any]:
    rule = canonical_rule(spec)
    args: dict[str, Any] = {
        "family": socket.AF_INET,
        "priority": rule.priority,
        "protocol": const.RTPROT_UPLINKD,
    }
    if rule.action == RuleAction.UNREACHABLE:
        args["action"] = FR_ACT_UNREACHABLE
    else:
        args["action"] = FR_ACT_TO_TBL
        args["table"] = rule.table
    if rule.fwmark is not None:
        args["fwmark"] = rule.fwmark
        args["fwmask"] = rule.fwmask
    if rule.src is not None:
        args["src"] = str(rule.src.network_address)
        args["src_len"] = rule.src.prefixlen
    if rule.oif is not None:
        args["oifname"] = rule.oif
    if rule.suppress_prefixlength is not None:
        args["suppress_prefixlen"] = rule.suppress_prefixlength
    return args


def _raw_rule_args(msg: Any) -> dict[str, Any]:
    """Everything that identifies a dumped rule, to delete exactly it."""
    args: dict[str, Any] = {
        "family": socket.AF_INET,
        "action": int(msg["action"]),
        "tos": int(msg["tos"]),
        "src_len": int(msg["src_len"]),
        "dst_len": int(msg["dst_len"]),
        "priority": 0,
    }
    for nla in msg["attrs"]:
        name, value = nla[0], nla[1]
        if name.startswith("FRA_") and name not in _UNECHOED_RULE_ATTRS and value != U32_UNSET:
            args[name[len("FRA_") :].lower()] = value
    if "table" not in args:
        args["table"] = int(msg["table"])
    return args


def _route_args(spec: RouteSpec, oif: int) -> dict[str, Any]:
    args: dict[str, Any] = {
        "family": socket.AF_INET,
        "table": spec.table,
        "dst": str(spec.dst),
        "oif": oif,
        "proto": const.RTPROT_UPLINKD,
        "type": RTN_UNICAST,
        "scope": RT_SCOPE_LINK if route_scope_link(spec) else RT_SCOPE_UNIVERSE,
    }
    if spec.gateway is not None:
        args["gateway"] = str(spec.gateway)
    if spec.src is not None:
        args["prefsrc"] = str(spec.src)
    return args


def _route_state(spec: RouteSpec, oif: int) -> tuple[Any, ...]:
    scope = RT_SCOPE_LINK if route_scope_link(spec) else RT_SCOPE_UNIVERSE
    return (spec.table, spec.dst, oif, spec.gateway, spec.src, scope)


def _reason(exc: NetlinkError) -> str:
    reason = {
        errno.ENETUNREACH: "gateway not reachable from the device (or device gone)",
        errno.ENODEV: "device does not exist",
        errno.ENETDOWN: "device is administratively down",
        errno.EINVAL: "invalid for the kernel",
    }.get(exc.code, exc.args[1] if len(exc.args) > 1 else str(exc))
    return f"{reason} (netlink error {exc.code})"


def _failure(what: str, exc: NetlinkError) -> ApplyError:
    return ApplyError(f"{what}: {_reason(exc)}")


async def _delete_route(ipr: AsyncIPRoute, route: KernelRoute) -> bool:
    table, dst, tos, metric = route.key
    try:
        await ipr.route(
            "del",
            family=socket.AF_INET,
            table=table,
            dst=str(dst),
            tos=tos,
            priority=metric,
            scope=route.scope,
            type=route.rtype,
            proto=route.protocol,
        )
    except NetlinkError as exc:
        if exc.code == errno.ESRCH:  # already gone (its device vanished)
            return False
        raise _failure(f"route del {dst} table {table}", exc) from exc
    return True


async def _delete_rule(ipr: AsyncIPRoute, msg: Any) -> bool:
    try:
        await ipr.rule("del", **_raw_rule_args(msg))
    except NetlinkError as exc:
        if exc.code == errno.ENOENT:
            return False
        spec = rule_from_message(msg)
        raise _failure(f"rule del {rule_text(spec) if spec else msg}", exc) from exc
    return True


def _gateway_last(routes: Sequence[KernelRoute]) -> list[KernelRoute]:
    """Deletion order: routes via a gateway before the connected routes they rely on."""
    return sorted(routes, key=lambda r: r.gateway is None)


# --- public operations -------------------------------------------------------------------------


async def _place_routes(
    ipr: AsyncIPRoute, plan: Plan, routes: list[KernelRoute], changes: RoutingChanges
) -> set[tuple[int, IPv4Network, int, int]]:
    """Replace the planned routes that differ; return the kernel keys to keep.

    A device that refuses a route (administratively down, gone since discovery, gateway not
    reachable) costs only its own routes: the rest of them are skipped, what the kernel still
    holds in their place is kept, and the device is named in `changes.failed`. The other
    devices' routes go in regardless, so one link's device never blocks the others.
    """
    devices = await device_indexes(ipr)
    wanted: dict[tuple[int, IPv4Network], RouteSpec] = {}
    for spec in ordered_routes(plan.routes):
        if (spec.table, spec.dst) in wanted:
            raise ApplyError(f"route {route_text(spec)}: the plan holds two routes for it")
        wanted[(spec.table, spec.dst)] = spec

    our_states = {r.state for r in routes if r.protocol == const.RTPROT_UPLINKD}
    foreign_keys = {r.key for r in routes if r.protocol != const.RTPROT_UPLINKD}
    placed: set[tuple[int, IPv4Network, int, int]] = set()
    for (table, dst), spec in wanted.items():
        key = (table, dst, 0, 0)
        if table not in plan.tables and key in foreign_keys:
            # Outside our tables a route of someone else's stays; replacing it would make it ours.
            changes.conflicts.append(f"route {route_text(spec)}: a foreign route holds its place")
            continue
        placed.add(key)  # placed now, or failed: then what the kernel holds there stays
        if spec.device in changes.failed:
            continue
        oif = devices.get(spec.device)
        if oif is None:
            changes.failed[spec.device] = "device does not exist"
            continue
        if _route_state(spec, oif) in our_states:
            continue
        try:
            await ipr.route("replace", **_route_args(spec, oif))
        except NetlinkError as exc:
            changes.failed[spec.device] = f"route {route_text(spec)}: {_reason(exc)}"
            continue
        changes.routes_added += 1
    return placed


async def _sync_rules(ipr: AsyncIPRoute, plan: Plan, changes: RoutingChanges) -> None:
    """Add the missing rules, then delete the unwanted ones: make before break."""
    current = await _our_rules(ipr)
    present = {rule_from_message(msg) for msg in current}
    wanted = {canonical_rule(r) for r in plan.rules}
    for rule in sorted(wanted - {r for r in present if r is not None}, key=lambda r: r.priority):
        try:
            await ipr.rule("add", **_rule_args(rule))
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:  # EEXIST: someone added it meanwhile
                raise _failure(f"rule {rule_text(rule)}", exc) from exc
        else:
            changes.rules_added += 1
    kept: set[RuleSpec] = set()
    for msg in current:
        found = rule_from_message(msg)
        if found is not None and found in wanted and found not in kept:
            kept.add(found)
        elif await _delete_rule(ipr, msg):  # unwanted, or a duplicate of a kept one
            changes.rules_removed += 1


async def sync(ipr: AsyncIPRoute, plan: Plan) -> RoutingChanges:
    """Make the kernel's routes and rules of protocol RTPROT_UPLINKD exactly the plan's.

    Order: planned routes (connected first), new rules, old rules, old routes; so a rule never
    points at a table still missing its routes and no route goes while a rule still uses it.
    """
    changes = RoutingChanges()
    routes = await _routes(ipr)
    placed = await _place_routes(ipr, plan, routes, changes)
    await _sync_rules(ipr, plan, changes)
    stale = [r for r in routes if r.protocol == const.RTPROT_UPLINKD and r.key not in placed]
    for route in _gateway_last(stale):
        if await _delete_route(ipr, route):
            changes.routes_removed += 1
    return changes


def changes_from(old: Plan, new: Plan) -> bool:
    """Whether `new`'s routing can be reached from `old`'s by changes inside uplinkd's own
    tables alone (no foreign route to look out for): what sync_from needs."""
    if old.tables != new.tables:
        return False
    before = {(r.table, r.dst): r for r in old.routes}
    after = {(r.table, r.dst): r for r in new.routes}
    moved = [key for key in before.keys() | after.keys() if before.get(key) != after.get(key)]
    return all(table in new.tables for table, _ in moved)


async def sync_from(
    ipr: AsyncIPRoute, old: Plan, new: Plan, devices: Mapping[str, int]
) -> RoutingChanges:
    """Bring the kernel from `old`'s routing, known to be in place whole, to `new`'s, writing
    only what differs (a link state change: table base+0 follows the first link up) and reading
    nothing back. Same order as sync. A refusal is raised: the caller falls back to sync."""
    changes = RoutingChanges()
    before = {(r.table, r.dst): r for r in old.routes}
    for spec in ordered_routes(new.routes):
        if before.get((spec.table, spec.dst)) != spec:
            await _replace_known(ipr, spec, devices)
            changes.routes_added += 1
    old_rules = {canonical_rule(r) for r in old.rules}
    new_rules = {canonical_rule(r) for r in new.rules}
    changes.rules_added = await _rules_known(ipr, "add", new_rules - old_rules, errno.EEXIST)
    changes.rules_removed = await _rules_known(ipr, "del", old_rules - new_rules, errno.ENOENT)
    after = {(r.table, r.dst) for r in new.routes}
    gone = [r for r in old.routes if (r.table, r.dst) not in after]
    for spec in sorted(gone, key=lambda r: r.gateway is None):  # via a gateway first
        oif = devices.get(spec.device)
        if oif is None:  # its device went, and its routes with it
            continue
        try:
            await ipr.route("del", **_route_args(spec, oif))
        except NetlinkError as exc:
            if exc.code != errno.ESRCH:
                raise _failure(f"route del {route_text(spec)}", exc) from exc
            continue  # already gone
        changes.routes_removed += 1
    return changes


async def _rules_known(ipr: AsyncIPRoute, verb: str, rules: set[RuleSpec], harmless: int) -> int:
    """Add or delete these rules in priority order (`harmless`: the error meaning it is done)."""
    for rule in sorted(rules, key=lambda r: r.priority):
        try:
            await ipr.rule(verb, **_rule_args(rule))
        except NetlinkError as exc:
            if exc.code != harmless:
                raise _failure(f"rule {verb} {rule_text(rule)}", exc) from exc
    return len(rules)


async def _replace_known(ipr: AsyncIPRoute, spec: RouteSpec, devices: Mapping[str, int]) -> None:
    oif = devices.get(spec.device)
    if oif is None:
        raise ApplyError(f"route {route_text(spec)}: device does not exist")
    try:
        await ipr.route("replace", **_route_args(spec, oif))
    except NetlinkError as exc:
        raise _failure(f"route {route_text(spec)}", exc) from exc


NUD_INCOMPLETE = 0x01
NUD_FAILED = 0x20


async def flush_unresolved_neighbours(ipr: AsyncIPRoute, device: str) -> int:
    """Delete the device's neighbour entries still resolving or failed; return how many.

    Packets sent while a device had no carrier leave its gateway's entry INCOMPLETE (or FAILED):
    once the carrier is back, the next packet waits for the next ARP retransmission, up to a
    second (retrans_time_ms). Without the entry, the next packet asks at once.
    """
    devices = await device_indexes(ipr)
    index = devices.get(device)
    if index is None:
        return 0
    stale = [
        msg.get_attr("NDA_DST")
        async for msg in await ipr.neigh("dump", family=socket.AF_INET, ifindex=index)
        if msg["state"] & (NUD_INCOMPLETE | NUD_FAILED) and msg["ifindex"] == index
    ]
    deleted = 0
    for dst in stale:
        try:
            await ipr.neigh("del", family=socket.AF_INET, ifindex=index, dst=dst)
        except NetlinkError as exc:
            if exc.code != errno.ENOENT:
                raise _failure(f"neigh del {dst} dev {device}", exc) from exc
        else:
            deleted += 1
    return deleted


async def remove_all(ipr: AsyncIPRoute, tables: Iterable[int] | None = None) -> RoutingChanges:
    """Delete every ip rule of protocol RTPROT_UPLINKD, then every such route.

    `tables` limits which tables' routes go (None: every table); rules always all go, first, so
    traffic falls back to the main table before the link tables empty.
    """
    changes = RoutingChanges()
    for msg in await _our_rules(ipr):
        if await _delete_rule(ipr, msg):
            changes.rules_removed += 1
    only = None if tables is None else set(tables)
    ours = [
        r
        for r in await _routes(ipr)
        if r.protocol == const.RTPROT_UPLINKD and (only is None or r.table in only)
    ]
    for route in _gateway_last(ours):
        if await _delete_route(ipr, route):
            changes.routes_removed += 1
    return changes
