"""The probers a configuration runs: one Prober per link that can be probed, and, while a rule
picks by lowest latency, one HopProber per such link beside it.

They follow the links' addresses and gateways; what they report goes to callbacks (the link
machines' rounds, the measurements' hop latencies), never to decisions of their own.

Targets given as host names are resolved here, while the daemon runs (monitor/resolver.py): a link
probes the names that resolved so far, and has no targets (so it stays `init`) while fewer
than its `reliability` did. When a name resolves, `on_targets(link)` tells the owner, which
retargets the link's machine and calls follow().
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Collection, Coroutine, Mapping
from typing import Any

from ..config.model import Config, LinkConfig, Method
from ..planning.plan import LinkFacts
from .hops import HopProber
from .icmp import Prober, ProbeRound
from .resolver import ResolveFn, Resolver, resolve_ipv4

log = logging.getLogger("uplinkd")


def probe_targets(
    link: LinkConfig,
    fact: LinkFacts | None,
    address: Callable[[str], ipaddress.IPv4Address | None] = lambda host: None,
) -> list[str]:
    """The configured targets, else the gateway (foolsm's checkip defaulted to it as well).

    Host names count with the `address` they resolved to; none are probed while fewer than the
    link's `reliability` targets have an address, as probing fewer would judge the link on less
    than it asks for."""
    if link.targets:
        found = [
            target if not isinstance(target, str) else address(target) for target in link.targets
        ]
        usable = [str(target) for target in found if target is not None]
        enough = len(usable) >= min(link.reliability, len(link.targets))
        return list(dict.fromkeys(usable)) if enough else []  # two names may share an address
    if fact is not None and fact.gateway is not None:
        return [str(fact.gateway)]
    return []


def host_names(config: Config) -> set[str]:
    return {t for link in config.links for t in link.targets if isinstance(t, str)}


def wants_hop_latency(config: Config) -> bool:
    rules = (*config.rules, config.default)
    return any(rule.method is Method.LOWEST_LATENCY for rule in rules)


class Probers:
    """The running probers, by link name. The configuration and facts are given on every call,
    so they are always the caller's current ones."""

    def __init__(
        self,
        on_round: Callable[[ProbeRound], None],
        on_hop_latency: Callable[[str, float | None], None],
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        on_targets: Callable[[str], None] = lambda link: None,
        *,
        resolve: ResolveFn = resolve_ipv4,
    ) -> None:
        """`spawn` runs a prober's loop (and a name's resolution) as a task its owner cancels
        when it stops; `on_targets(link)` says that targets() of the link may have changed."""
        self._on_round = on_round
        self._on_hop_latency = on_hop_latency
        self._spawn = spawn
        self._on_targets = on_targets
        self._probers: dict[str, Prober] = {}
        self._hop_probers: dict[str, HopProber] = {}
        self._hosts: set[str] = set()  # the host names of the configuration last started
        self._users: dict[str, set[str]] = {}  # host name -> links that asked for it
        self._waiting_logged: dict[str, str] = {}  # link -> why it waits, as last logged
        self._resolver = Resolver(
            spawn, self._resolved, resolve=resolve, wanted=lambda host: host in self._hosts
        )

    def targets(self, link: LinkConfig, fact: LinkFacts | None) -> list[str]:
        """What the link probes now: probe_targets() with the host names resolved so far.
        Resolution of the others starts (or goes on) in the background; while the link has no
        targets because of them, why is logged once per change."""
        names = [target for target in link.targets if isinstance(target, str)]
        for host in names:
            self._hosts.add(host)
            self._users.setdefault(host, set()).add(link.name)
        targets = probe_targets(link, fact, self._resolver.address)
        unresolved = [host for host in names if self._resolver.address(host) is None]
        waiting = ""
        if not targets and unresolved:
            reasons = [
                f"{host} ({self._resolver.error(host) or 'resolving'})" for host in unresolved
            ]
            waiting = f"probe target names do not resolve yet: {', '.join(reasons)}"
        if self._waiting_logged.get(link.name, "") != waiting:
            self._waiting_logged[link.name] = waiting
            if waiting:
                log.warning("link %s: stays init, %s", link.name, waiting)
            else:
                log.info("link %s: probing %s", link.name, ", ".join(targets) or "nothing")
        return targets

    def _resolved(self, host: str) -> None:
        for name in sorted(self._users.get(host, ())):
            self._on_targets(name)

    def start(
        self,
        config: Config,
        facts: Mapping[str, LinkFacts],
        only: Collection[str] | None = None,
    ) -> None:
        """Start a prober for every link (or those in `only`) that has none and can be probed."""
        if only is None:
            self._hosts = host_names(config)  # names no longer configured stop being retried
        for link_config in config.links:
            if link_config.name in self._probers or (
                only is not None and link_config.name not in only
            ):
                continue
            fact = facts.get(link_config.name)
            targets = self.targets(link_config, fact)
            if fact is None or not targets:
                if fact is not None and not link_config.targets:
                    log.warning(
                        "link %s: no probe target (no targets and no gateway); judged by carrier",
                        link_config.name,
                    )
                continue
            mark = config.link_mark(link_config.name)
            prober = Prober(
                link_config.name,
                targets,
                str(fact.address.ip),
                mark,
                link_config.monitor.interval_ms,
                link_config.monitor.timeout_ms,
                self._on_round,
            )
            self._probers[link_config.name] = prober
            self._spawn(prober.run())
            if wants_hop_latency(config):
                hop_prober = HopProber(
                    link_config.name,
                    targets[0],
                    str(fact.address.ip),
                    mark,
                    self._on_hop_latency,
                )
                self._hop_probers[link_config.name] = hop_prober
                self._spawn(hop_prober.run())

    def follow(self, config: Config, facts: Mapping[str, LinkFacts], name: str) -> None:
        """Point a link's probers at its new targets and address; start them if it had none."""
        fact = facts.get(name)
        targets = self.targets(config.link(name), fact)
        prober = self._probers.get(name)
        if prober is not None and fact is not None:
            prober.update(targets=targets, source=str(fact.address.ip))
        hop_prober = self._hop_probers.get(name)
        if hop_prober is not None and fact is not None and targets:
            hop_prober.update(target=targets[0], source=str(fact.address.ip))
        elif prober is None:
            self.start(config, facts, {name})

    def stop(self) -> None:
        for prober in self._probers.values():
            prober.stop()
        for hop_prober in self._hop_probers.values():
            hop_prober.stop()
        self._probers.clear()
        self._hop_probers.clear()
