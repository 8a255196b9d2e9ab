"""routing.sync / remove_all / render_ip_batch and discovery against a real kernel, in a netns."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from pathlib import Path
from typing import TypeVar

import pytest
from pyroute2 import AsyncIPRoute
from uplinkd import const
from uplinkd.config.model import Firewall, LinkConfig
from uplinkd.datapath import routing
from uplinkd.facts import discovery
from uplinkd.planning.plan import Plan, RouteSpec, RuleAction, RuleSpec

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="needs root and iproute2 to create network namespaces",
    ),
]

T = TypeVar("T")
A = IPv4Address
NET = IPv4Network
DEFAULT = NET("0.0.0.0/0")
PROTO = str(const.RTPROT_UPLINKD)


def ip(ns: str, *args: str, check: bool = True) -> str:
    done = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"ip -n {ns} {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


def ipc(ns: str, command: str) -> str:
    """`ip` with its arguments written as one line."""
    return ip(ns, *command.split())


def _new_namespace() -> str:
    name = f"upl-rt-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    return name


@pytest.fixture
def ns() -> Iterator[str]:
    """wan1 10.0.1.2/24, wan2 10.0.2.2/24 (with a foreign default route), wan3 without address."""
    name = _new_namespace()
    try:
        ip(name, "link", "set", "lo", "up")
        for dev in ("wan1", "wan2", "wan3"):
            ip(name, "link", "add", dev, "type", "veth", "peer", "name", f"{dev}p")
            ip(name, "link", "set", dev, "up")
            ip(name, "link", "set", f"{dev}p", "up")
        ip(name, "addr", "add", "10.0.1.2/24", "dev", "wan1")
        ip(name, "addr", "add", "10.0.2.2/24", "dev", "wan2")
        ip(name, "route", "add", "default", "via", "10.0.2.254", "dev", "wan2", "metric", "100")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def run(ns: str, body: Callable[[AsyncIPRoute], Awaitable[T]]) -> T:
    async def main() -> T:
        async with AsyncIPRoute(netns=ns) as ipr:
            return await body(ipr)

    return asyncio.run(main())


ROUTES = (
    RouteSpec(201, DEFAULT, "wan1", A("10.0.1.1")),
    RouteSpec(201, NET("10.0.1.0/24"), "wan1", src=A("10.0.1.2"), scope_link=True),
    RouteSpec(202, DEFAULT, "wan2", A("10.0.2.1")),
    RouteSpec(202, NET("10.0.2.0/24"), "wan2", src=A("10.0.2.2"), scope_link=True),
    RouteSpec(200, DEFAULT, "wan1", A("10.0.1.1")),
)
RULES = (
    RuleSpec(10000, table=254, suppress_prefixlength=0),
    RuleSpec(10010, RuleAction.UNREACHABLE, fwmark=0xFF00, fwmask=0xFF00),
    RuleSpec(10101, table=201, fwmark=0x100, fwmask=0xFF00),
    RuleSpec(10102, table=202, fwmark=0x200, fwmask=0xFF00),
    RuleSpec(10301, table=201, src=NET("10.0.1.2/32")),
    RuleSpec(10302, table=202, src=NET("10.0.2.2/32")),
    RuleSpec(10601, table=201, oif="wan1"),
    RuleSpec(10602, table=202, oif="wan2"),
    RuleSpec(10900, table=200),
)
PLAN = Plan(
    links=(),
    dispatches=(),
    lan_devices=(),
    forwards=(),
    firewall=Firewall(),
    firewall_groups=(),
    mark_mask=0xFF00,
    routes=ROUTES,
    rules=RULES,
    tables=(200, 201, 202),
)
EXPECTED_RULES = """\
0:\tfrom all lookup local
10000:\tfrom all lookup main suppress_prefixlength 0 proto 213
10010:\tfrom all fwmark 0xff00/0xff00 unreachable proto 213
10101:\tfrom all fwmark 0x100/0xff00 lookup 201 proto 213
10102:\tfrom all fwmark 0x200/0xff00 lookup 202 proto 213
10301:\tfrom 10.0.1.2 lookup 201 proto 213
10302:\tfrom 10.0.2.2 lookup 202 proto 213
10601:\tfrom all oif wan1 lookup 201 proto 213
10602:\tfrom all oif wan2 lookup 202 proto 213
10900:\tfrom all lookup 200 proto 213
32766:\tfrom all lookup main
32767:\tfrom all lookup default
"""


def ours(ns: str) -> tuple[list[str], list[str]]:
    """uplinkd's rules and IPv4 routes, as `ip` prints them (filtering drops "proto 213")."""
    rules = [ln for ln in ip(ns, "rule").splitlines() if ln.endswith(f"proto {PROTO}")]
    routes = ip(ns, "-4", "route", "show", "table", "all", "proto", PROTO).splitlines()
    return rules, routes


def foreign(ns: str) -> tuple[list[str], list[str]]:
    """Everything else: rules and routes (both families) not carrying our protocol."""
    rules = [ln for ln in ip(ns, "rule").splitlines() if not ln.endswith(f"proto {PROTO}")]
    routes = [
        ln
        for ln in ip(ns, "route", "show", "table", "all").splitlines()
        + ip(ns, "-6", "route", "show", "table", "all").splitlines()
        if f"proto {PROTO} " not in f"{ln} "
    ]
    return rules, routes


def test_sync_is_idempotent_and_remove_all_leaves_foreign_state(ns: str) -> None:
    first = run(ns, lambda ipr: routing.sync(ipr, PLAN))
    assert (first.routes_added, first.rules_added) == (5, 9)
    assert (first.routes_removed, first.rules_removed) == (0, 0)
    assert ip(ns, "rule") == EXPECTED_RULES
    assert ip(ns, "route", "show", "table", "201").splitlines() == [
        "default via 10.0.1.1 dev wan1 proto 213 ",
        "10.0.1.0/24 dev wan1 proto 213 scope link src 10.0.1.2 ",
    ]
    assert ip(ns, "route", "show", "table", "200") == "default via 10.0.1.1 dev wan1 proto 213 \n"

    again = run(ns, lambda ipr: routing.sync(ipr, PLAN))
    assert again.total == 0

    ip(ns, "rule", "add", "priority", "500", "from", "192.0.2.0/24", "lookup", "77")
    ip(ns, "rule", "add", "priority", "10101", "fwmark", "0x100/0xff00", "lookup", "201")
    ip(ns, "route", "add", "198.51.100.0/24", "via", "10.0.1.1", "dev", "wan1", "table", "77")
    ip(ns, "route", "add", "203.0.113.0/24", "via", "10.0.2.1", "dev", "wan2")
    ip(ns, "route", "add", "203.0.113.0/25", "via", "10.0.1.1", "dev", "wan1", "table", "201")
    before = foreign(ns)
    assert run(ns, lambda ipr: routing.sync(ipr, PLAN)).total == 0  # foreign state is no change

    removed = run(ns, routing.remove_all)
    assert (removed.routes_removed, removed.rules_removed) == (5, 9)
    assert ours(ns) == ([], [])
    assert foreign(ns) == before
    assert "10101:\tfrom all fwmark 0x100/0xff00 lookup 201" in ip(ns, "rule")


def test_sync_follows_plan_changes_make_before_break(ns: str) -> None:
    run(ns, lambda ipr: routing.sync(ipr, PLAN))
    moved = dataclasses.replace(ROUTES[0], gateway=A("10.0.1.254"))
    smaller = dataclasses.replace(
        PLAN,
        routes=(moved, ROUTES[1]),
        rules=(*RULES[:3], RULES[4], RULES[6]),
        tables=(201,),
    )
    changes = run(ns, lambda ipr: routing.sync(ipr, smaller))
    assert (changes.routes_added, changes.routes_removed) == (1, 3)
    assert (changes.rules_added, changes.rules_removed) == (0, 4)
    rules, routes = ours(ns)
    assert [ln.split(":")[0] for ln in rules] == ["10000", "10010", "10101", "10301", "10601"]
    assert sorted(routes) == [
        "10.0.1.0/24 dev wan1 table 201 scope link src 10.0.1.2 ",
        "default via 10.0.1.254 dev wan1 table 201 ",
    ]
    assert run(ns, lambda ipr: routing.sync(ipr, smaller)).total == 0


def test_a_rule_of_ours_differing_in_one_field_is_replaced(ns: str) -> None:
    ipc(ns, f"rule add priority 10101 fwmark 0x100/0xffff lookup 201 protocol {PROTO}")
    changes = run(ns, lambda ipr: routing.sync(ipr, PLAN))
    assert (changes.rules_added, changes.rules_removed) == (9, 1)
    assert ip(ns, "rule") == EXPECTED_RULES


def test_a_refused_device_is_named_and_costs_only_its_own_routes(ns: str) -> None:
    ok = RouteSpec(202, DEFAULT, "wan2", A("10.0.2.1"))
    gone = dataclasses.replace(PLAN, routes=(RouteSpec(201, DEFAULT, "wan9", A("10.0.1.1")), ok))
    changes = run(ns, lambda ipr: routing.sync(ipr, gone))
    assert changes.failed == {"wan9": "device does not exist"}
    assert "default via 10.0.2.1 dev wan2" in ip(ns, "route", "show", "table", "202")
    far = dataclasses.replace(PLAN, routes=(RouteSpec(201, DEFAULT, "wan1", A("192.0.2.9")), ok))
    changes = run(ns, lambda ipr: routing.sync(ipr, far))
    assert re.fullmatch(
        r"route default via 192\.0\.2\.9 dev wan1 table 201 .*reach.*", changes.failed["wan1"]
    )
    assert "default via 10.0.2.1 dev wan2" in ip(ns, "route", "show", "table", "202")
    ip(ns, "link", "set", "wan1", "down")  # administratively down: the kernel refuses routes
    try:
        changes = run(ns, lambda ipr: routing.sync(ipr, PLAN))
        assert "administratively down" in changes.failed["wan1"]
        assert "wan2" not in changes.failed
        assert "default via 10.0.2.1 dev wan2" in ip(ns, "route", "show", "table", "202")
    finally:
        ip(ns, "link", "set", "wan1", "up")
    assert run(ns, lambda ipr: routing.sync(ipr, PLAN)).failed == {}
    run(ns, routing.remove_all)


def test_ip_batch_output_gives_the_same_state(ns: str, tmp_path: Path) -> None:
    text = routing.render_ip_batch(PLAN)
    assert text.startswith("# ")
    assert "rule add priority 10000 lookup main suppress_prefixlength 0 protocol 213\n" in text
    assert "rule add priority 10010 fwmark 0xff00/0xff00 unreachable protocol 213\n" in text
    assert "rule add priority 10101 fwmark 0x100/0xff00 lookup 201 protocol 213\n" in text
    assert "route replace default via 10.0.1.1 dev wan1 table 201 proto 213" in text

    run(ns, lambda ipr: routing.sync(ipr, PLAN))
    by_sync = ours(ns)
    run(ns, routing.remove_all)
    assert ours(ns) == ([], [])

    batch = tmp_path / "routing.batch"
    batch.write_text(text)
    ip(ns, "-batch", str(batch))
    assert ours(ns) == by_sync
    assert run(ns, lambda ipr: routing.sync(ipr, PLAN)).total == 0


def test_discovery_on_real_devices(ns: str) -> None:
    ip(ns, "route", "add", "default", "via", "10.0.1.77", "dev", "wan1", "table", "100")
    links = [
        LinkConfig("ISP1", "wan1"),
        LinkConfig("ISP2", "wan2"),
        LinkConfig("ISP3", "wan3"),
        LinkConfig("ISP4", "wan4"),
        LinkConfig("ISP5", "wan2", gateway=A("10.0.2.9")),
    ]
    facts, warnings = run(ns, lambda ipr: discovery.discover(ipr, links))
    by_name = {f.name: f for f in facts}
    assert sorted(by_name) == ["ISP1", "ISP2", "ISP5"]
    assert by_name["ISP1"].address == IPv4Interface("10.0.1.2/24")
    assert by_name["ISP1"].gateway == A("10.0.1.77")  # a default route in another table
    assert by_name["ISP2"].gateway == A("10.0.2.254")  # the main table's default route
    assert by_name["ISP5"].gateway == A("10.0.2.9")
    assert warnings == [
        "link ISP3: device wan3 has no IPv4 address; left out",
        "link ISP4: device wan4 does not exist; left out",
    ]

    ip(ns, "route", "del", "default", "via", "10.0.1.77", "dev", "wan1", "table", "100")
    ip(ns, "addr", "add", "10.9.0.1", "peer", "10.9.0.2/32", "dev", "wan3")
    facts, warnings = run(ns, lambda ipr: discovery.discover(ipr, links[:3]))
    assert warnings == []
    assert [f.gateway for f in facts] == [A("10.0.1.1"), A("10.0.2.254"), A("10.9.0.2")]
    assert facts[2].peer == A("10.9.0.2")
    assert facts[2].address == IPv4Interface("10.9.0.1/32")


def test_discovery_reads_multipath_default_routes(ns: str) -> None:
    """A predecessor's `default nexthop via ... nexthop via ...` in main names both gateways."""
    ipc(
        ns,
        "route add default metric 50 nexthop via 10.0.1.5 dev wan1 nexthop via 10.0.2.5 dev wan2",
    )
    links = [LinkConfig("ISP1", "wan1"), LinkConfig("ISP2", "wan2")]
    facts, _ = run(ns, lambda ipr: discovery.discover(ipr, links))
    assert [f.gateway for f in facts] == [A("10.0.1.5"), A("10.0.2.5")]


def test_unresolved_neighbours_of_a_device_are_flushed(ns: str) -> None:
    ip(ns, "neigh", "add", "10.0.1.8", "lladdr", "02:00:00:00:00:01", "dev", "wan1")
    ip(ns, "neigh", "add", "10.0.2.8", "lladdr", "02:00:00:00:00:02", "dev", "wan2")
    send = (
        "import socket, sys; socket.socket(type=socket.SOCK_DGRAM).sendto(b'x', (sys.argv[1], 9))"
    )
    for address in ("10.0.1.9", "10.0.2.9"):  # nobody answers: INCOMPLETE, then FAILED
        subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", send, address], check=True)
    assert "10.0.1.9 dev wan1" in ip(ns, "neigh", "show")

    assert run(ns, lambda ipr: routing.flush_unresolved_neighbours(ipr, "wan1")) == 1

    neighbours = ip(ns, "neigh", "show")
    assert "10.0.1.9 " not in neighbours
    assert "10.0.1.8 dev wan1 lladdr 02:00:00:00:00:01 PERMANENT" in neighbours
    assert "10.0.2.9 dev wan2" in neighbours  # another device's: untouched
    assert run(ns, lambda ipr: routing.flush_unresolved_neighbours(ipr, "wan9")) == 0
