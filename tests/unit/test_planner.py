"""The pure planner and bucket arithmetic: no root, milliseconds."""

from __future__ import annotations

import ipaddress
import itertools
from collections import Counter
from pathlib import Path

import pytest
from uplinkd.config.model import (
    Config,
    Firewall,
    HashBy,
    LanConfig,
    LinkConfig,
    Match,
    Method,
    PortForward,
    PortRange,
    Rule,
)
from uplinkd.datapath.backends.nft_ruleset import render, render_match
from uplinkd.planning import planner
from uplinkd.planning.buckets import Weighted, assign, exact_bucket_count
from uplinkd.planning.plan import UNREACHABLE, LinkFacts, Selector

from tests.fakes.backend import FakeBackend

IP = ipaddress.IPv4Address


def facts(*names: str) -> list[LinkFacts]:
    return [
        LinkFacts(name, f"wan{i}", ipaddress.IPv4Interface(f"10.0.{i}.2/24"), IP(f"10.0.{i}.1"))
        for i, name in enumerate(names, start=1)
    ]


def config(weights: dict[str, int], **kwargs: object) -> Config:
    links = tuple(
        LinkConfig(name, f"wan{i}", weight=w, priority=i)
        for i, (name, w) in enumerate(weights.items(), start=1)
    )
    return Config(
        path=Path("/etc/uplinkd/uplinkd.toml"),
        format="toml",
        links=links,
        lans=(LanConfig("LAN", "lan0"),),
        **kwargs,  # type: ignore[arg-type]
    )


def shares(targets: tuple[int, ...]) -> dict[int, int]:
    return dict(Counter(targets))


@pytest.mark.parametrize(
    ("weights", "expected"),
    [([1, 3], 12), ([1, 3, 2], 60), ([1, 1], 2), ([5], 5)],
)
def test_bucket_count_splits_every_subset_exactly(weights: list[int], expected: int) -> None:
    count = exact_bucket_count(weights)
    assert count == expected
    for size in range(1, len(weights) + 1):
        for subset in itertools.combinations(weights, size):
            assert count % sum(subset) == 0


def test_weighted_split_is_exact_and_survivors_keep_their_buckets() -> None:
    members = [Weighted(1, "A", 1), Weighted(2, "B", 3), Weighted(3, "C", 2)]
    count = exact_bucket_count([1, 3, 2])
    full = assign(count, members, {1, 2, 3}, "seed")
    assert shares(full) == {1: 10, 2: 30, 3: 20}
    without_b = assign(count, members, {1, 3}, "seed")
    assert shares(without_b) == {1: 20, 3: 40}  # exactly 1:2 among survivors
    moved = [
        i for i, (before, after) in enumerate(zip(full, without_b, strict=True)) if before != after
    ]
    assert all(full[i] == 2 for i in moved)  # only B's buckets moved
    assert assign(count, members, set(), "seed") == (None,) * count


def test_weighted_plan_ratio_and_failover_map_only() -> None:
    cfg = config({"ISP1": 1, "ISP2": 3})
    both = planner.plan(cfg, facts("ISP1", "ISP2"), {"ISP1", "ISP2"})
    (default,) = both.dispatches
    assert default.selector is Selector.RANDOM
    assert shares(default.targets) == {1: 3, 2: 9}
    one = planner.plan(cfg, facts("ISP1", "ISP2"), {"ISP2"})
    assert set(one.dispatches[0].targets) == {2}
    backend = FakeBackend()
    assert [
        backend.prepare(both).commit(),
        backend.prepare(both).commit(),
        backend.prepare(one).commit(),
    ] == [
        "full",
        "none",
        "maps",
    ]


def test_priority_picks_highest_priority_healthy_link() -> None:
    cfg = config({"ISP1": 1, "ISP2": 1, "ISP3": 1}, default=Rule("default", Method.PRIORITY))
    f = facts("ISP1", "ISP2", "ISP3")
    assert planner.plan(cfg, f, {"ISP1", "ISP2", "ISP3"}).dispatches[0].targets == (1,)
    assert planner.plan(cfg, f, {"ISP2", "ISP3"}).dispatches[0].targets == (2,)
    assert planner.plan(cfg, f, set()).dispatches[0].targets == (UNREACHABLE,)


def test_priority_rule_listing_links_uses_their_order() -> None:
    backup_first = Rule("backup", Method.PRIORITY, links=("ISP3", "ISP1"))
    cfg = config({"ISP1": 1, "ISP2": 1, "ISP3": 1}, rules=(backup_first,))
    f = facts("ISP1", "ISP2", "ISP3")
    assert planner.plan(cfg, f, {"ISP1", "ISP2", "ISP3"}).dispatches[0].targets == (3,)
    assert planner.plan(cfg, f, {"ISP1", "ISP2"}).dispatches[0].targets == (1,)
    assert planner.plan(cfg, f, {"ISP2"}).dispatches[0].targets == (UNREACHABLE,)


def test_enforced_never_leaks_to_another_link() -> None:
    mail = Rule(
        "mail",
        Method.ENFORCED,
        Match(proto="tcp", dport=(PortRange(25, 25),)),
        links=("ISP2",),
    )
    cfg = config({"ISP1": 1, "ISP2": 1}, rules=(mail,))
    f = facts("ISP1", "ISP2")
    assert planner.plan(cfg, f, {"ISP1", "ISP2"}).dispatches[0].targets == (2,)
    assert planner.plan(cfg, f, {"ISP1"}).dispatches[0].targets == (UNREACHABLE,)


@pytest.mark.parametrize("by", list(HashBy))
def test_persistence_moves_only_the_failed_links_buckets(by: HashBy) -> None:
    rule = Rule("sticky", Method.PERSISTENCE, by=by)
    cfg = config({"ISP1": 1, "ISP2": 3, "ISP3": 2}, rules=(rule,))
    f = facts("ISP1", "ISP2", "ISP3")
    before = planner.plan(cfg, f, {"ISP1", "ISP2", "ISP3"}).dispatches[0]
    after = planner.plan(cfg, f, {"ISP1", "ISP3"}).dispatches[0]
    assert before.selector.value == by.value
    assert before.buckets >= 64
    for old, new in zip(before.targets, after.targets, strict=True):
        assert old in (new, 2)
    assert 2 not in after.targets


def test_structure_is_independent_of_link_state() -> None:
    cfg = config({"ISP1": 1, "ISP2": 3})
    f = facts("ISP1", "ISP2")
    text_up = render(planner.plan(cfg, f, {"ISP1", "ISP2"}))
    text_down = render(planner.plan(cfg, f, {"ISP2"}))
    structure = lambda text: text.split("add element")[0]  # noqa: E731
    assert structure(text_up) == structure(text_down)
    assert text_up != text_down


def test_kernel_shape_rules_routes_marks() -> None:
    cfg = config({"ISP1": 1, "ISP2": 1})
    plan = planner.plan(cfg, facts("ISP1", "ISP2"), {"ISP1", "ISP2"})
    assert [link.mark for link in plan.links] == [0x100, 0x200]
    fwmark = [r for r in plan.rules if r.fwmark in (0x100, 0x200)]
    assert [(r.fwmark, r.table) for r in fwmark] == [(0x100, 201), (0x200, 202)]
    assert plan.rules[0].suppress_prefixlength == 0
    defaults = [r for r in plan.routes if r.dst.prefixlen == 0]
    assert {(r.table, str(r.gateway)) for r in defaults} == {
        (201, "10.0.1.1"),
        (202, "10.0.2.1"),
        (200, "10.0.1.1"),  # the router's own first lookup: highest-priority link up
    }


def test_link_left_out_by_discovery_keeps_other_ids() -> None:
    cfg = config({"ISP1": 1, "ISP2": 1, "ISP3": 1})
    f = [fact for fact in facts("ISP1", "ISP2", "ISP3") if fact.name != "ISP2"]
    plan = planner.plan(cfg, f, {"ISP1", "ISP2", "ISP3"})
    assert [(link.name, link.id) for link in plan.links] == [("ISP1", 1), ("ISP3", 3)]
    assert set(plan.dispatches[0].targets) == {1, 3}


def test_nat_forwards_and_firewall_render() -> None:
    cfg = config(
        {"ISP1": 1, "ISP2": 1},
        forwards=(
            PortForward(PortRange(80, 80), IP("192.168.10.35")),
            PortForward(PortRange(23, 23), IP("192.168.10.35"), host_port=22),
        ),
        firewall=Firewall(enabled=True, forwarding_groups=(("LAN", "ISP1", "ISP2"),)),
    )
    text = render(planner.plan(cfg, facts("ISP1", "ISP2"), {"ISP1", "ISP2"}))
    assert 'oifname "wan1" masquerade' in text
    assert 'iifname { "wan1", "wan2" } tcp dport 80 dnat ip to 192.168.10.35\n' in text
    assert "tcp dport 23 dnat ip to 192.168.10.35:22" in text
    assert "policy drop" in text
    assert 'iifname "lan0" oifname { "wan1", "wan2" } accept' in text
    assert "icmp type echo-request limit rate 10/second accept" in text
    assert 'iifname "lan0" tcp dport 22 accept' in text


def test_match_rendering() -> None:
    match = Match(
        src=(ipaddress.IPv4Network("192.168.10.0/24"),),
        dst=(ipaddress.IPv4Network("203.0.113.0/24"), ipaddress.IPv4Network("198.51.100.7/32")),
        proto="tcp",
        dport=(PortRange(443, 443), PortRange(8000, 8080)),
        iif=("lan0",),
    )
    assert render_match(match) == (
        'iifname "lan0" ip saddr 192.168.10.0/24 ip daddr { 203.0.113.0/24, 198.51.100.7/32 } '
        "tcp dport { 443, 8000-8080 }"
    )
    any_proto = render_match(Match(dport=(PortRange(53, 53),)))
    assert any_proto == "meta l4proto { tcp, udp } th dport 53"
    assert render_match(Match()) == ""
