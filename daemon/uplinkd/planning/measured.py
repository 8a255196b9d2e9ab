"""The measured methods' choices: overflow, least-used, lowest-latency (pure, with hysteresis).

Each picks one link for a rule's new connections from what was measured; the previous choice
is an input, so a choice only moves when another link is clearly better, and equal links do not
make the datapath oscillate.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .. import const
from ..config.model import LinkConfig


@dataclass(frozen=True)
class LinkMeasure:
    rx_bps: float = 0.0  # received, smoothed
    tx_bps: float = 0.0  # sent, smoothed
    hop_latency_ms: float | None = None  # smoothed RTT to the 2nd/3rd hop; None: unknown


def utilisation(link: LinkConfig, measure: LinkMeasure) -> float:
    """The busier direction's share of its configured capacity (0 when none is configured)."""
    shares = [
        bps / (mbps * 1e6)
        for bps, mbps in (
            (measure.rx_bps, link.bandwidth_down_mbps),
            (measure.tx_bps, link.bandwidth_up_mbps),
        )
        if mbps
    ]
    return max(shares, default=0.0)


def free_bps(link: LinkConfig, measure: LinkMeasure) -> float:
    """Download capacity left, in bit/s (upload when only that is configured): new connections
    mostly fetch, and a small uplink must not make an idle link look full."""
    if link.bandwidth_down_mbps:
        return link.bandwidth_down_mbps * 1e6 - measure.rx_bps
    if link.bandwidth_up_mbps:
        return link.bandwidth_up_mbps * 1e6 - measure.tx_bps
    return 0.0


def choose_overflow(
    candidates: Sequence[LinkConfig],
    measures: Mapping[str, LinkMeasure],
    previous: str | None,
    saturation_percent: int,
) -> str | None:
    """The first link in priority order below saturation; a link that was chosen stays chosen
    until it crosses the threshold, and one it spilled from is taken back only once it is
    OVERFLOW_HYSTERESIS_PERCENT below it. When all are saturated: the least utilised."""
    if not candidates:
        return None
    ordered = sorted(candidates, key=lambda link: link.priority)
    threshold = saturation_percent / 100
    for link in ordered:
        use = utilisation(link, measures.get(link.name, LinkMeasure()))
        limit = threshold if link.name == previous else threshold - const.OVERFLOW_HYSTERESIS
        if use < limit:
            return link.name
    return min(
        ordered, key=lambda link: utilisation(link, measures.get(link.name, LinkMeasure()))
    ).name


def choose_least_used(
    candidates: Sequence[LinkConfig], measures: Mapping[str, LinkMeasure], previous: str | None
) -> str | None:
    """The link with the most free capacity; the previous one keeps its place unless another
    has LEAST_USED_MARGIN_BPS more free."""
    if not candidates:
        return None
    free = {
        link.name: free_bps(link, measures.get(link.name, LinkMeasure())) for link in candidates
    }
    best = max(candidates, key=lambda link: (free[link.name], -link.priority)).name
    if previous in free and free[best] - free[previous] < const.LEAST_USED_MARGIN_BPS:
        return previous
    return best


def choose_lowest_latency(
    candidates: Sequence[LinkConfig], measures: Mapping[str, LinkMeasure], previous: str | None
) -> str | None:
    """The link with the lowest hop latency; the previous one keeps its place unless another is
    faster by LATENCY_MARGIN_MS and LATENCY_MARGIN_RATIO. Links not measured yet come last."""
    if not candidates:
        return None

    def latency(link: LinkConfig) -> float:
        value = measures.get(link.name, LinkMeasure()).hop_latency_ms
        return float("inf") if value is None else value

    best = min(candidates, key=lambda link: (latency(link), link.priority))
    current = next((link for link in candidates if link.name == previous), None)
    if current is not None:
        gain = latency(current) - latency(best)
        if gain < max(const.LATENCY_MARGIN_MS, const.LATENCY_MARGIN_RATIO * latency(best)):
            return current.name
    return best.name
