"""A fact finder that knows fixed facts: the links' devices, addresses and gateways as a test
sets them, never read from a kernel."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from uplinkd.config.model import LinkConfig
from uplinkd.planning.plan import LinkFacts


class FixedFacts:
    def __init__(self, facts: dict[str, LinkFacts]) -> None:
        self.facts = facts  # a test may change them: the next discovery finds what is there

    async def find(
        self, ipr: object, links: Sequence[LinkConfig], ipr_lock: asyncio.Lock
    ) -> dict[str, LinkFacts]:
        return {link.name: self.facts[link.name] for link in links if link.name in self.facts}
