"""The pure planner: (configuration, discovered facts, link health, hook additions) -> Plan.

No I/O here: the same inputs always give the same Plan, which is what makes dry runs exact and
re-applies no-ops.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field

from .. import const
from ..config.model import MEASURED_METHODS, Config, LinkConfig, Method, PortForward, Rule
from .buckets import Weighted, assign, exact_bucket_count
from .measured import LinkMeasure, choose_least_used, choose_lowest_latency, choose_overflow
from .plan import (
    UNREACHABLE,
    Dispatch,
    HookLine,
    LinkFacts,
    Plan,
    PlannedLink,
    RouteSpec,
    RuleSpec,
    Selector,
)

_DEFAULT_ROUTE = ipaddress.IPv4Network("0.0.0.0/0")


@dataclass(frozen=True)
class Extras:
    """What hook files add to the configuration's own state."""

    rules: tuple[Rule, ...] = ()  # from B.force_route(); they take precedence over config rules
    forwards: tuple[PortForward, ...] = ()
    routes: tuple[RouteSpec, ...] = ()
    nft_lines: tuple[HookLine, ...] = ()


def plan(
    config: Config,
    facts: Sequence[LinkFacts],
    up: Collection[str],
    extras: Extras = Extras(),
    *,
    measures: Mapping[str, LinkMeasure] | None = None,
    previous: Mapping[str, str] | None = None,
) -> Plan:
    """The plan for these facts and links up; `measures` feed the measured methods, and
    `previous` (rule name -> link name, from the last plan's `choices`) gives their hysteresis."""
    known = {fact.name: fact for fact in facts}
    links = tuple(
        _planned_link(config, link_config, known[link_config.name], link_config.name in up)
        for link_config in config.links
        if link_config.name in known
    )
    by_name = {link.name: link for link in links}
    rules = (*extras.rules, *config.rules, config.default)
    measured = Measured(measures or {}, previous or {})
    shared: dict[_MapKey, tuple[str, tuple[int, ...]]] = {}
    dispatches = tuple(
        _dispatch(
            config,
            rule,
            by_name,
            "rule_default" if rule is config.default else f"rule_{i}",
            measured,
            shared,
        )
        for i, rule in enumerate(rules)
    )
    lan_devices = tuple(lan.device for lan in config.lans)
    devices = {link.name: link.device for link in config.links} | {
        lan.name: lan.device for lan in config.lans
    }
    groups = tuple(
        tuple(devices[name] for name in group if name in devices)
        for group in config.firewall.forwarding_groups
    )
    sysctls = [(f"net/ipv4/conf/{link.device}/rp_filter", "2") for link in links]
    if lan_devices:
        sysctls.insert(0, ("net/ipv4/ip_forward", "1"))
    return Plan(
        links=links,
        dispatches=dispatches,
        lan_devices=lan_devices,
        forwards=(*config.forwards, *extras.forwards),
        firewall=config.firewall,
        firewall_groups=groups,
        mark_mask=config.mark_mask,
        routes=(*_routes(config, links), *extras.routes),
        rules=_ip_rules(config, links),
        tables=(config.table_base, *(link.table for link in links)),
        sysctls=tuple(sysctls),
        nft_hook_lines=extras.nft_lines,
        choices=dict(measured.choices),
    )


def _planned_link(config: Config, link: LinkConfig, fact: LinkFacts, up: bool) -> PlannedLink:
    return PlannedLink(
        name=link.name,
        id=config.link_id(link.name),
        mark=config.link_mark(link.name),
        table=config.link_table(link.name),
        device=fact.device,
        address=fact.address,
        gateway=fact.gateway,
        up=up,
        nat=link.nat,
    )


# The bucket owners depend on the links and weights only, never on the rule: see _MapKey.
_ASSIGN_SEED = "uplinkd"


def map_name(rule_name: str, index_name: str) -> str:
    """An nft identifier that still tells a person which rule it is."""
    return f"{index_name}_{re.sub(r'[^A-Za-z0-9_]', '_', rule_name)}"[:60]


@dataclass
class Measured:
    """Inputs and outputs of the measured methods within one plan() call."""

    measures: Mapping[str, LinkMeasure]
    previous: Mapping[str, str]
    choices: dict[str, str] = field(default_factory=dict)

    def choose(self, config: Config, rule: Rule, live: Sequence[PlannedLink]) -> str | None:
        candidates = [config.link(link.name) for link in live]
        before = self.previous.get(rule.name)
        if rule.method is Method.OVERFLOW:
            chosen = choose_overflow(candidates, self.measures, before, rule.saturation_percent)
        elif rule.method is Method.LEAST_USED:
            chosen = choose_least_used(candidates, self.measures, before)
        else:
            chosen = choose_lowest_latency(candidates, self.measures, before)
        if chosen is not None:
            self.choices[rule.name] = chosen
        return chosen


# Rules that pick buckets the same way (selector, bucket count, links and weights; or, for
# priority and enforced, the same links in the same order) get the same bucket owners in every
# state of the links, so they share one map: a link state change then rewrites one map per such
# group instead of one per rule.
_MapKey = tuple[object, ...]
_Shared = dict[_MapKey, tuple[str, tuple[int, ...]]]


def _share(
    shared: _Shared, key: _MapKey, name: str, targets: Callable[[], tuple[int, ...]]
) -> tuple[tuple[int, ...], str]:
    """The bucket owners of rule `name` (computed by `targets` for the first rule of its group)
    and the map it uses: "" for its own, else the first rule's."""
    if key not in shared:
        shared[key] = (name, targets())
    owner, found = shared[key]
    return found, "" if owner == name else owner


def _dispatch(  # noqa: PLR0917 (one plan() call's shared state)
    config: Config,
    rule: Rule,
    links: dict[str, PlannedLink],
    index_name: str,
    measured: Measured,
    shared: _Shared,
) -> Dispatch:
    names = rule.links or tuple(link.name for link in config.links)
    members = [links[name] for name in names if name in links]
    live = [link for link in members if link.up]
    name = index_name if index_name == "rule_default" else map_name(rule.name, index_name)
    if rule.method in MEASURED_METHODS:
        chosen = measured.choose(config, rule, live)
        target = UNREACHABLE if chosen is None else links[chosen].id
        return Dispatch(name, rule.name, rule.match, Selector.RANDOM, (target,))
    if rule.method in (Method.PRIORITY, Method.ENFORCED):
        # A rule that lists its links gives their order; otherwise the links' priorities do.
        if rule.links:
            order = {link_name: (i, 0) for i, link_name in enumerate(rule.links)}
        else:
            order = {link.name: (link.priority, i) for i, link in enumerate(config.links)}
        first = min(live, key=lambda link: order[link.name], default=None)
        target = UNREACHABLE if first is None else first.id
        ranked = tuple(link.id for link in sorted(members, key=lambda link: order[link.name]))
        targets, owner = _share(shared, ("first of", ranked), name, lambda: (target,))
        return Dispatch(name, rule.name, rule.match, Selector.RANDOM, targets, map=owner)
    weighted = [Weighted(link.id, link.name, config.link(link.name).weight) for link in members]
    if rule.method is Method.PERSISTENCE:
        selector = Selector(rule.by.value)
        minimum = const.MIN_HASH_BUCKETS
    else:
        selector = Selector.RANDOM
        minimum = 1
    count = exact_bucket_count([w.weight for w in weighted], minimum) if weighted else 1

    def owners() -> tuple[int, ...]:
        found = assign(count, weighted, {link.id for link in live}, _ASSIGN_SEED)
        return tuple(UNREACHABLE if owner is None else owner for owner in found)

    key = (selector, count, tuple((w.link_id, w.weight) for w in weighted))
    targets, owner = _share(shared, key, name, owners)
    # Each rule hashes with its own seed, so two persistence rules do not pair the same flows.
    hash_seed = int.from_bytes(hashlib.blake2b(rule.name.encode(), digest_size=4).digest(), "big")
    learned = rule.cache_seconds if rule.method is Method.FASTEST_RESPONSE else None
    return Dispatch(
        name,
        rule.name,
        rule.match,
        selector,
        targets,
        seed=hash_seed,
        cache_s=learned,
        races_per_second=rule.races_per_second if learned is not None else 0,
        max_learned=rule.max_learned if learned is not None else 0,
        race_private=rule.race_private and learned is not None,
        map=owner,
    )


def _routes(config: Config, links: Sequence[PlannedLink]) -> list[RouteSpec]:
    routes: list[RouteSpec] = []
    for link in links:
        routes.extend(_link_routes(link, link.table))
    first_up = next(
        (link for link in sorted(links, key=lambda x: config.link(x.name).priority) if link.up),
        None,
    )
    if first_up is not None:
        # Only the router's own first route lookup uses this table; the output chain then
        # classifies the connection like forwarded traffic and the mark reroutes it.
        routes.extend(_link_routes(first_up, config.table_base))
    return routes


def _link_routes(link: PlannedLink, table: int) -> list[RouteSpec]:
    connected = RouteSpec(
        table=table,
        dst=link.address.network,
        device=link.device,
        src=link.address.ip,
        scope_link=True,
    )
    routes = [connected]
    if link.gateway is None:
        routes.append(
            RouteSpec(table=table, dst=_DEFAULT_ROUTE, device=link.device, scope_link=True)
        )
        return routes
    if link.gateway not in link.address.network:
        routes.append(
            RouteSpec(
                table=table,
                dst=ipaddress.IPv4Network(link.gateway),
                device=link.device,
                src=link.address.ip,
                scope_link=True,
            )
        )
    routes.append(
        RouteSpec(table=table, dst=_DEFAULT_ROUTE, device=link.device, gateway=link.gateway)
    )
    return routes


def _ip_rules(config: Config, links: Sequence[PlannedLink]) -> tuple[RuleSpec, ...]:
    base = config.rule_priority
    rules = [
        RuleSpec(
            priority=base + const.RULE_OFFSET_MAIN_SUPPRESS,
            table=const.RT_TABLE_MAIN,
            suppress_prefixlength=0,
        ),
    ]
    for link in links:
        rules.append(
            RuleSpec(
                priority=base + const.RULE_OFFSET_FWMARK + link.id,
                table=link.table,
                fwmark=link.mark,
                fwmask=config.mark_mask,
            )
        )
        rules.append(
            RuleSpec(
                priority=base + const.RULE_OFFSET_FROM + link.id,
                table=link.table,
                src=ipaddress.IPv4Network(link.address.ip),
            )
        )
        rules.append(
            RuleSpec(
                priority=base + const.RULE_OFFSET_OIF + link.id,
                table=link.table,
                oif=link.device,
            )
        )
    rules.append(RuleSpec(priority=base + const.RULE_OFFSET_DEFAULT, table=config.table_base))
    return tuple(rules)
