"""The measured methods' choices and their hysteresis (pure)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from uplinkd.config.model import Config, LinkConfig, Method, Rule
from uplinkd.planning import planner
from uplinkd.planning.measured import (
    LinkMeasure,
    choose_least_used,
    choose_lowest_latency,
    choose_overflow,
    utilisation,
)
from uplinkd.planning.plan import UNREACHABLE, LinkFacts

ISP1 = LinkConfig("ISP1", "wan1", priority=1, bandwidth_down_mbps=20, bandwidth_up_mbps=5)
ISP2 = LinkConfig("ISP2", "wan2", priority=2, bandwidth_down_mbps=50, bandwidth_up_mbps=10)
MBIT = 1e6


def test_utilisation_is_the_busier_direction() -> None:
    assert utilisation(ISP1, LinkMeasure(rx_bps=10 * MBIT, tx_bps=4 * MBIT)) == 0.8
    assert utilisation(LinkConfig("X", "x"), LinkMeasure(rx_bps=MBIT)) == 0.0


def test_overflow_spills_when_saturated_and_returns_with_hysteresis() -> None:
    links = [ISP2, ISP1]  # order of the list does not matter: priority does
    idle = {"ISP1": LinkMeasure(rx_bps=2 * MBIT)}
    assert choose_overflow(links, idle, None, 90) == "ISP1"
    full = {"ISP1": LinkMeasure(rx_bps=19 * MBIT)}  # 95 % of 20 Mbit/s
    assert choose_overflow(links, full, "ISP1", 90) == "ISP2"
    easing = {"ISP1": LinkMeasure(rx_bps=17 * MBIT)}  # 85 %: below 90, not below 80
    assert choose_overflow(links, easing, "ISP2", 90) == "ISP2"
    assert choose_overflow(links, easing, "ISP1", 90) == "ISP1"  # the chosen keeps its place
    calm = {"ISP1": LinkMeasure(rx_bps=10 * MBIT)}
    assert choose_overflow(links, calm, "ISP2", 90) == "ISP1"
    both_full = {"ISP1": LinkMeasure(rx_bps=20 * MBIT), "ISP2": LinkMeasure(rx_bps=48 * MBIT)}
    assert choose_overflow(links, both_full, "ISP2", 90) == "ISP2"  # the least utilised
    assert choose_overflow([], idle, None, 90) is None


def test_least_used_takes_the_most_free_capacity_with_a_margin() -> None:
    links = [ISP1, ISP2]
    measures = {"ISP1": LinkMeasure(rx_bps=5 * MBIT), "ISP2": LinkMeasure(rx_bps=45 * MBIT)}
    # ISP1 has 15 Mbit/s free, ISP2 5 Mbit/s.
    assert choose_least_used(links, measures, None) == "ISP1"
    close = {"ISP1": LinkMeasure(rx_bps=10 * MBIT), "ISP2": LinkMeasure(rx_bps=37 * MBIT)}
    # ISP1 10 free, ISP2 13 free: better, but by less than 5 Mbit/s: stay.
    assert choose_least_used(links, close, "ISP1") == "ISP1"
    assert choose_least_used(links, close, None) == "ISP2"


def test_lowest_latency_with_hysteresis() -> None:
    links = [ISP1, ISP2]
    measures = {"ISP1": LinkMeasure(hop_latency_ms=60), "ISP2": LinkMeasure(hop_latency_ms=10)}
    assert choose_lowest_latency(links, measures, None) == "ISP2"
    assert choose_lowest_latency(links, measures, "ISP1") == "ISP2"
    equal = {"ISP1": LinkMeasure(hop_latency_ms=12), "ISP2": LinkMeasure(hop_latency_ms=10)}
    assert choose_lowest_latency(links, equal, "ISP1") == "ISP1"  # 2 ms is jitter, not a gain
    unknown = {"ISP1": LinkMeasure(hop_latency_ms=30)}
    assert choose_lowest_latency(links, unknown, None) == "ISP1"  # measured beats unknown


def test_planner_uses_measures_and_reports_choices() -> None:
    config = Config(
        path=Path("/etc/uplinkd/uplinkd.toml"),
        format="toml",
        links=(ISP1, ISP2),
        default=Rule("default", Method.LOWEST_LATENCY),
    )
    facts = [
        LinkFacts(
            name,
            dev,
            ipaddress.IPv4Interface(f"10.0.{i}.2/24"),
            ipaddress.IPv4Address(f"10.0.{i}.1"),
        )
        for i, (name, dev) in enumerate((("ISP1", "wan1"), ("ISP2", "wan2")), start=1)
    ]
    measures = {"ISP1": LinkMeasure(hop_latency_ms=60), "ISP2": LinkMeasure(hop_latency_ms=10)}
    first = planner.plan(config, facts, {"ISP1", "ISP2"}, measures=measures)
    assert first.dispatches[-1].targets == (2,)
    assert first.choices == {"default": "ISP2"}
    swapped = {"ISP1": LinkMeasure(hop_latency_ms=10), "ISP2": LinkMeasure(hop_latency_ms=60)}
    second = planner.plan(config, facts, {"ISP1", "ISP2"}, measures=swapped, previous=first.choices)
    assert second.dispatches[-1].targets == (1,)
    down = planner.plan(config, facts, {"ISP1"}, measures=measures, previous=first.choices)
    assert down.dispatches[-1].targets == (1,)  # only live links are candidates
    none = planner.plan(config, facts, set(), measures=measures)
    assert none.dispatches[-1].targets == (UNREACHABLE,)
