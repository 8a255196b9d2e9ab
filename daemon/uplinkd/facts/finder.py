"""The links' facts as the daemon uses them: what discovery reads from the kernel, with
NetworkManager's gateway for links whose configuration names none."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from pyroute2 import AsyncIPRoute

from ..config.model import LinkConfig
from ..planning.plan import LinkFacts
from . import discovery, nm

log = logging.getLogger("uplinkd")


class FactFinder:
    """Reads the links' facts; logs each link's gateway and its source whenever they change."""

    def __init__(self, *, quiet: bool = False) -> None:
        """`quiet`: each link's gateway and its source at debug level (a one-shot run's output
        is its result; the daemon's log says where each gateway came from)."""
        self._gateways_logged: dict[str, str] = {}  # link -> its gateway and source, as logged
        self._level = logging.DEBUG if quiet else logging.INFO

    async def find(
        self, ipr: AsyncIPRoute, links: Sequence[LinkConfig], ipr_lock: asyncio.Lock
    ) -> dict[str, LinkFacts]:
        """The facts of the links whose device has an address, by link name. `ipr_lock` is held
        while `ipr` dumps: the kernel refuses a second dump on a socket (EBUSY)."""
        # nmcli runs outside that lock, so a slow one never delays whoever else uses `ipr`.
        async with ipr_lock:
            facts, warnings = await discovery.discover(ipr, links)
        for warning in warnings:
            log.warning("%s", warning)
        facts = await self._prefer_nm_gateways(links, facts)
        return {fact.name: fact for fact in facts}

    async def _prefer_nm_gateways(
        self, links: Sequence[LinkConfig], facts: list[LinkFacts]
    ) -> list[LinkFacts]:
        """Links without a configured gateway take NetworkManager's when it runs their device."""
        auto = {link.name for link in links if link.gateway is None}
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
                log.log(self._level, "link %s: %s", fact.name, said)
            merged.append(fact)
        return merged
