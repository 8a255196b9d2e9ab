"""Per-link traffic rates from the kernel's interface counters (netlink IFLA_STATS64)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from pyroute2 import AsyncIPRoute

# Weight of a new sample in the moving average: about a 5-sample memory at one sample a second.
SMOOTHING = 0.4


@dataclass
class Rate:
    rx_bps: float = 0.0
    tx_bps: float = 0.0


@dataclass
class _Last:
    at: float
    rx_bytes: int
    tx_bytes: int


class RateMeter:
    """Feed it counter readings; it keeps smoothed bits-per-second rates per device."""

    def __init__(self) -> None:
        self.rates: dict[str, Rate] = {}
        self._last: dict[str, _Last] = {}

    def sample(self, device: str, rx_bytes: int, tx_bytes: int, now: float) -> Rate:
        rate = self.rates.setdefault(device, Rate())
        last = self._last.get(device)
        self._last[device] = _Last(now, rx_bytes, tx_bytes)
        # A counter going backwards means the device was re-created: start again from it.
        if last is None or now <= last.at or rx_bytes < last.rx_bytes or tx_bytes < last.tx_bytes:
            return rate
        seconds = now - last.at
        rx = (rx_bytes - last.rx_bytes) * 8 / seconds
        tx = (tx_bytes - last.tx_bytes) * 8 / seconds
        rate.rx_bps += SMOOTHING * (rx - rate.rx_bps)
        rate.tx_bps += SMOOTHING * (tx - rate.tx_bps)
        return rate


def _stats(msg: Any) -> tuple[int, int] | None:
    stats = msg.get_attr("IFLA_STATS64") or msg.get_attr("IFLA_STATS")
    if not stats:
        return None
    return int(stats["rx_bytes"]), int(stats["tx_bytes"])


async def read(ipr: AsyncIPRoute, devices: Collection[str]) -> dict[str, tuple[int, int]]:
    """rx and tx byte counters of the named devices that exist."""
    found: dict[str, tuple[int, int]] = {}
    async for msg in await ipr.link("dump"):
        name = msg.get_attr("IFLA_IFNAME")
        if name in devices and (stats := _stats(msg)) is not None:
            found[name] = stats
    return found
