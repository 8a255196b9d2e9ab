"""Probers that send nothing: the links' targets as the real ones choose them, and a record of
which links would be probed. A unit test feeds the link machines itself."""

from __future__ import annotations

from collections.abc import Collection, Mapping

from uplinkd.config.model import Config
from uplinkd.monitor.probers import Probers
from uplinkd.planning.plan import LinkFacts


class SilentProbers(Probers):
    probing: frozenset[str] = frozenset()

    def start(
        self,
        config: Config,
        facts: Mapping[str, LinkFacts],
        only: Collection[str] | None = None,
    ) -> None:
        wanted = {link.name for link in config.links if link.name in facts}
        self.probing = frozenset(self.probing | (wanted & set(only) if only else wanted))

    def follow(self, config: Config, facts: Mapping[str, LinkFacts], name: str) -> None:
        self.start(config, facts, {name})

    def stop(self) -> None:
        self.probing = frozenset()
