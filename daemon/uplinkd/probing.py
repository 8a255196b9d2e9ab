"""The probers a configuration runs: one Prober per link that can be probed, and, while a rule
picks by lowest latency, one HopProber per such link beside it.

They follow the links' addresses and gateways; what they report goes to callbacks (the link
machines' rounds, the measurements' hop latencies), never to decisions of their own.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Coroutine, Mapping
from typing import Any

from . import planner
from .hops import HopProber
from .model import Config, LinkConfig, Method
from .plan import LinkFacts
from .probe import Prober, ProbeRound

log = logging.getLogger("uplinkd")


def prober_mark(config: Config, link_id: int) -> int:
    return planner.link_mark(link_id, config.mark_mask)


def probe_targets(link: LinkConfig, fact: LinkFacts | None) -> list[str]:
    """The configured targets, else the gateway (foolsm's checkip defaulted to it as well)."""
    if link.targets:
        return [str(target) for target in link.targets]
    if fact is not None and fact.gateway is not None:
        return [str(fact.gateway)]
    return []


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
    ) -> None:
        """`spawn` runs a prober's loop as a task its owner cancels when it stops."""
        self._on_round = on_round
        self._on_hop_latency = on_hop_latency
        self._spawn = spawn
        self._probers: dict[str, Prober] = {}
        self._hop_probers: dict[str, HopProber] = {}

    def start(
        self,
        config: Config,
        facts: Mapping[str, LinkFacts],
        only: Collection[str] | None = None,
    ) -> None:
        """Start a prober for every link (or those in `only`) that has none and can be probed."""
        names = [link.name for link in config.links]
        for link_config in config.links:
            if link_config.name in self._probers or (
                only is not None and link_config.name not in only
            ):
                continue
            fact = facts.get(link_config.name)
            targets = probe_targets(link_config, fact)
            if fact is None or not targets:
                if fact is not None:
                    log.warning(
                        "link %s: no probe target (no targets and no gateway); judged by carrier",
                        link_config.name,
                    )
                continue
            mark = prober_mark(config, names.index(link_config.name) + 1)
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
        targets = probe_targets(config.link(name), fact)
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
