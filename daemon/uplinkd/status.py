"""What uplinkd reports about itself: plain data for the D-Bus adapter, uplinkctl and logs."""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any


class Overall(enum.StrEnum):
    ONLINE = "online"  # every link in service is usable
    DEGRADED = "degraded"  # some, not all, usable
    OFFLINE = "offline"  # none usable


@dataclass(frozen=True)
class LinkStatus:
    name: str
    device: str
    state: str  # init | up | down | long_down | disabled
    since: float  # wall-clock time (seconds since the epoch) of the last state change
    usable: bool  # new connections may use it
    weight: int
    priority: int
    gateway: str  # "" when unknown
    address: str  # "address/prefix", "" when the device has none
    latency_ms: float  # mean probe RTT over the window; -1 when nothing answered
    loss_percent: float  # probe rounds lost over the window
    rx_bps: int  # received bits per second, smoothed
    tx_bps: int  # transmitted bits per second, smoothed
    new_connection_share: float  # fraction (0..1) of new connections of the default rule


@dataclass(frozen=True)
class Snapshot:
    version: str
    mode: str  # the default rule's method
    generation: int
    overall: Overall
    links: tuple[LinkStatus, ...]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["overall"] = str(self.overall)
        return data


def overall(links: tuple[LinkStatus, ...]) -> Overall:
    in_service = [link for link in links if link.state != "disabled"]
    usable = [link for link in in_service if link.usable]
    if not usable:
        return Overall.OFFLINE
    return Overall.ONLINE if len(usable) == len(in_service) else Overall.DEGRADED
