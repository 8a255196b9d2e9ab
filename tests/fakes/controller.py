"""A fake of the daemon behind the bus adapter (bus.Controller), for BusService on a private bus."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace
from typing import Any

from uplinkd.errors import UnknownLinkError, UplinkdError
from uplinkd.monitor.link import NM_DOWN, NM_HINTS
from uplinkd.publish.status import LearnedDestination, LinkStatus, Snapshot, overall


def link_status(name: str, device: str, **changes: Any) -> LinkStatus:
    """A measured link, up since a fixed moment; `changes` set any other field."""
    status = LinkStatus(
        name=name,
        device=device,
        state="up",
        since=1_700_000_000.25,
        usable=True,
        weight=2,
        priority=1,
        gateway="192.0.2.1",
        address="192.0.2.10/24",
        latency_ms=12.5,
        hop_latency_ms=-1.0,
        loss_percent=0.0,
        rx_bps=8000,
        tx_bps=4000,
        new_connection_share=0.5,
    )
    return replace(status, **changes)


@dataclass
class FakeController:
    """What the daemon would answer, and a record of the requests that change its state."""

    version: str
    generation: int
    links: list[LinkStatus]
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    fail: Exception | None = None  # raised by set_enabled, once recorded
    refuse: UplinkdError | None = None  # raised by reload, once recorded
    hook_problems: tuple[str, ...] = ()

    def snapshot(self) -> Snapshot:
        links = tuple(self.links)
        return Snapshot(
            self.version, "weighted", self.generation, overall(links), links, self.hook_problems
        )

    def set_enabled(self, name: str, enabled: bool) -> None:
        names = [status.name for status in self.links]
        if name not in names:  # as Coordinator.set_enabled says it
            raise UnknownLinkError(f"unknown link {name!r}; links: {', '.join(names)}")
        self.calls.append(("set_enabled", name, enabled))
        if self.fail is not None:
            raise self.fail
        i = names.index(name)
        self.links[i] = replace(self.links[i], state="init" if enabled else "disabled")

    def notify_device(self, device: str, action: str) -> None:
        self.calls.append(("notify_device", device, action))
        if device not in [status.device for status in self.links]:
            raise UnknownLinkError(f"no link uses device {device!r}")
        if action != NM_DOWN and action not in NM_HINTS:  # as link.Link.notify
            raise ValueError(f"link ISP1: unknown NetworkManager dispatcher action {action!r}")

    async def reload(self) -> None:
        self.calls.append(("reload",))
        await asyncio.sleep(0)
        if self.refuse is not None:
            raise self.refuse

    def learned(self, offset: int, limit: int) -> tuple[list[LearnedDestination], int]:
        every = [
            LearnedDestination("web", "203.0.113.20", "ISP1", 598),
            LearnedDestination("web", "203.0.113.30", "ISP2", 4000),
        ]
        return every[offset : offset + limit], len(every)

    def dry_run(self) -> str:
        # A read, like the status: not recorded, so that a policy test sees only the changes.
        return (
            "# plan in force\n"
            "table inet uplinkd {\n}\n"
            "route replace default via 192.0.2.1 table 201\n"
        )
