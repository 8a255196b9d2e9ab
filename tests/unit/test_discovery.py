"""Discovery's pure choices: address, gateway and the warnings for unusable links."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path

import pytest
from uplinkd import const
from uplinkd.config.model import Config, LanConfig, LinkConfig
from uplinkd.errors import ConfigError
from uplinkd.facts import discovery
from uplinkd.facts.discovery import (
    AddressInfo,
    DeviceInfo,
    RouteInfo,
    choose_address,
    choose_gateway,
    first_host,
    gateway_from_routes,
    link_facts,
    select,
)
from uplinkd.planning.plan import LinkFacts

A = IPv4Address
DEFAULT = IPv4Network("0.0.0.0/0")
WAN1 = AddressInfo(local=A("10.0.1.2"), prefixlen=24)


def device(
    *addresses: AddressInfo, routes: tuple[RouteInfo, ...] = (), p2p: bool = False
) -> DeviceInfo:
    return DeviceInfo(name="wan1", pointopoint=p2p, addresses=addresses, routes=routes)


def test_explicit_gateway_wins_over_routes_and_peer() -> None:
    routes = [RouteInfo(254, DEFAULT, A("10.0.1.254"))]
    p2p = AddressInfo(local=A("10.9.0.1"), prefixlen=32, peer=A("10.9.0.2"))
    assert choose_gateway(A("10.0.1.9"), WAN1, routes) == A("10.0.1.9")
    assert choose_gateway(A("10.9.0.9"), p2p, routes, pointopoint=True) == A("10.9.0.9")


def test_gateway_from_default_route_in_main() -> None:
    routes = [
        RouteInfo(254, IPv4Network("192.0.2.0/24"), A("10.0.1.50")),
        RouteInfo(201, DEFAULT, A("10.0.1.60")),
        RouteInfo(254, DEFAULT, A("10.0.1.70"), metric=200),
        RouteInfo(254, DEFAULT, A("10.0.1.254"), metric=100),
    ]
    assert choose_gateway(None, WAN1, routes) == A("10.0.1.254")


def test_gateway_from_default_route_in_another_table_then_main_route() -> None:
    other_table = [
        RouteInfo(254, IPv4Network("192.0.2.0/24"), A("10.0.1.50")),
        RouteInfo(100, DEFAULT, A("10.0.1.60")),
    ]
    assert gateway_from_routes(other_table) == A("10.0.1.60")
    assert gateway_from_routes(other_table[:1]) == A("10.0.1.50")
    # a specific route in another table says nothing about the link's gateway
    assert gateway_from_routes([RouteInfo(100, IPv4Network("192.0.2.0/24"), A("10.0.1.5"))]) is None


def test_own_routes_and_dev_only_routes_are_ignored() -> None:
    routes = [
        RouteInfo(201, DEFAULT, A("10.0.1.99"), protocol=const.RTPROT_UPLINKD),
        RouteInfo(254, DEFAULT, None),
    ]
    assert gateway_from_routes(routes) is None
    assert choose_gateway(None, WAN1, routes) == A("10.0.1.1")


def test_point_to_point_peer() -> None:
    p2p = AddressInfo(local=A("10.9.0.1"), prefixlen=32, peer=A("10.9.0.2"))
    assert choose_gateway(None, p2p, [], pointopoint=True) == A("10.9.0.2")
    facts = link_facts(LinkConfig("LTE", "ppp0"), device(p2p, p2p=True))
    assert facts == LinkFacts(
        "LTE", "ppp0", IPv4Interface("10.9.0.1/32"), A("10.9.0.2"), peer=A("10.9.0.2")
    )


def test_point_to_point_without_peer_has_no_gateway() -> None:
    lone = AddressInfo(local=A("100.64.0.7"), prefixlen=32)
    assert choose_gateway(None, lone, [], pointopoint=True) is None


def test_first_host_fallback() -> None:
    assert choose_gateway(None, WAN1, []) == A("10.0.1.1")
    assert first_host(IPv4Interface("192.168.8.100/24")) == A("192.168.8.1")
    assert first_host(IPv4Interface("198.51.100.77/29")) == A("198.51.100.73")


def test_first_host_equal_to_own_address_takes_the_next() -> None:
    own_first = AddressInfo(local=A("10.0.1.1"), prefixlen=24)
    assert choose_gateway(None, own_first, []) == A("10.0.1.2")


@pytest.mark.parametrize(
    ("interface", "expected"),
    [("10.0.0.0/31", "10.0.0.1"), ("10.0.0.1/31", "10.0.0.0"), ("10.0.0.5/32", None)],
)
def test_first_host_of_tiny_subnets(interface: str, expected: str | None) -> None:
    assert first_host(IPv4Interface(interface)) == (A(expected) if expected else None)


def test_address_choice_prefers_primary_global() -> None:
    link_local = AddressInfo(local=A("169.254.3.3"), prefixlen=16, scope=253)
    secondary = AddressInfo(local=A("10.0.1.3"), prefixlen=24, secondary=True)
    assert choose_address([link_local, secondary, WAN1]) == WAN1
    assert choose_address([link_local]) == link_local
    assert choose_address([]) is None


def test_no_ipv4_address_is_left_out_with_a_warning() -> None:
    links = [LinkConfig("ISP1", "wan1"), LinkConfig("ISP2", "wan2"), LinkConfig("ISP3", "wan3")]
    devices = {"wan1": device(WAN1), "wan2": DeviceInfo("wan2", False, (), ())}
    facts, warnings = select(links, devices)
    assert [f.name for f in facts] == ["ISP1"]
    assert facts[0].address == IPv4Interface("10.0.1.2/24")
    assert facts[0].gateway == A("10.0.1.1")
    assert warnings == [
        "link ISP2: device wan2 has no IPv4 address; left out",
        "link ISP3: device wan3 does not exist; left out",
    ]


def test_missing_lan_devices_are_named_with_their_line() -> None:
    path = Path("/etc/network/balance.conf")
    lans = (LanConfig("LAN", "lan0", line=3), LanConfig("GUEST", "lan9", line=4))
    config = Config(path, "balance.conf", links=(), lans=lans)
    assert discovery.check_lans(config, {"lo", "lan0", "wan1"}) == [
        f"{path}:4: lan.device: device 'lan9' of LAN GUEST does not exist (yet); "
        "its traffic is served once it does"
    ]
    with pytest.raises(ConfigError) as caught:
        discovery.check_lans(config, {"lo", "wan1"})
    assert (caught.value.line, caught.value.key) == (3, "lan.device")
    assert "no LAN device exists ('lan0', 'lan9')" in str(caught.value)
    assert discovery.check_lans(Config(path, "toml", links=()), {"lo"}) == []  # no LAN: a host
