"""fastest-response on real traffic in the lab (root, the NFQUEUE delay link).

Destination A answers 150 ms later through ISP2, destination B 150 ms later through ISP1, so
each has a faster link; the Internet host can be made unreachable through ISP1 alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from uplinkd.lab import DEST_A, DEST_B, INET_HOST, Lab
from uplinkd.labdelay import unsupported

from .conftest import TWO_LINKS, Daemon, Uplinkd, needs_root, wait_until
from .privatebus import PrivateBus, private_bus
from .test_ctl import uplinkctl

pytestmark = [needs_root, pytest.mark.lab]

CONFIG = (
    TWO_LINKS.format(w1=9, w2=1)
    + '\n[default]\nmethod = "fastest-response"\ncache_seconds = 60\n'
    + "\n[monitor]\ninterval_ms = 200\ntimeout_ms = 300\n"
)
# Until a destination is learned the rule uses its buckets (9:1 here, so that a first connection
# usually tries ISP1, the way the unreachable test needs).
BLOCK = "table inet labblock {\n chain f {\n  type filter hook forward priority 0;\n  %s\n }\n}\n"


@pytest.fixture(scope="module", autouse=True)
def delay_link() -> None:
    reason = unsupported()
    if reason:
        pytest.skip(reason)


@pytest.fixture
def lab() -> Iterator[Lab]:
    with Lab(isps=2) as built:
        for address in (INET_HOST, DEST_A, DEST_B):
            built.start_server(built.ns_inet, address, [80])
        built.set_destination_delay(DEST_A, {2: 150})
        built.set_destination_delay(DEST_B, {1: 150})
        yield built


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    with private_bus() as running:
        yield running


@pytest.fixture
def daemon(lab: Lab, tmp_path: Path, bus: PrivateBus) -> Iterator[Daemon]:
    runner = Uplinkd(lab, tmp_path)
    started = runner.start(runner.write_config(CONFIG), "-v", bus_address=bus.address)
    try:
        assert started.log.wait_for("link ISP1: init -> up", 15), started.log.text
        assert started.log.wait_for("link ISP2: init -> up", 15), started.log.text
        yield started
    finally:
        started.stop()
        runner.run(runner.workdir / "uplinkd.toml", "--stop", check=False)


def learned(lab: Lab) -> dict[str, str]:
    """The router's learned destinations: address -> link chain (link_1 is ISP1)."""
    listed = lab.run(
        lab.ns_router, "nft", "-j", "list", "map", "inet", "uplinkd", "fr_rule_default"
    )
    items = json.loads(listed.stdout)["nftables"]
    elements = next(item["map"] for item in items if "map" in item).get("elem", [])
    return {key["elem"]["val"]: verdict["goto"]["target"] for key, verdict in elements}


def via(lab: Lab, address: str, count: int = 20, timeout: float = 2.0) -> dict[str, int]:
    result = lab.connect_many(lab.ns_lan, address, 80, count, timeout=timeout)
    assert result.failed == 0, result.errors
    return result.counts_by_isp()


def test_each_destination_uses_the_link_that_answers_it_first(
    lab: Lab, daemon: Daemon, bus: PrivateBus
) -> None:
    assert learned(lab) == {}
    via(lab, DEST_A, 1)  # a first connection (by the buckets) starts the race
    via(lab, DEST_B, 1)
    assert wait_until(lambda: len(learned(lab)) == 2, 5), daemon.log.text
    assert learned(lab) == {DEST_A: "link_1", DEST_B: "link_2"}, daemon.log.text
    assert via(lab, DEST_A) == {"ISP1": 20, "ISP2": 0}
    assert via(lab, DEST_B) == {"ISP1": 0, "ISP2": 20}
    # What the daemon says it learned, over D-Bus, is what the kernel holds.
    shown = uplinkctl(bus.address, "learned", "--json")
    assert shown.returncode == 0, shown.stderr
    entries = json.loads(shown.stdout)
    assert [(e["rule"], e["address"], e["link"]) for e in entries] == [
        ("default", DEST_A, "ISP1"),
        ("default", DEST_B, "ISP2"),
    ]
    assert all(50 < e["seconds_left"] <= 60 for e in entries)  # cache_seconds = 60


def test_a_destination_unreachable_via_one_link_works_via_the_other(
    lab: Lab, daemon: Daemon
) -> None:
    rule = f"ip daddr {INET_HOST} tcp dport 80 drop"  # ISP1 drops it; its probes still pass
    lab.run(lab.ns_isp(1), "nft", "-f", "-", stdin=BLOCK % rule)
    # The first connection usually goes by the buckets to ISP1 and gets no answer; the race
    # finds ISP2 and deletes that attempt, so the client's SYN retry (after 1 s) takes ISP2.
    assert via(lab, INET_HOST, 20, timeout=5.0) == {"ISP1": 0, "ISP2": 20}, daemon.log.text
    assert learned(lab) == {INET_HOST: "link_2"}


def test_a_learned_link_that_goes_down_is_forgotten(lab: Lab, daemon: Daemon) -> None:
    via(lab, DEST_A, 1)
    assert wait_until(lambda: learned(lab) == {DEST_A: "link_1"}, 5), daemon.log.text
    lab.set_link(1, up=False)
    assert daemon.log.wait_for("link ISP1: up -> down", 5), daemon.log.text
    assert wait_until(lambda: learned(lab) == {}, 5), daemon.log.text
    assert via(lab, DEST_A) == {"ISP1": 0, "ISP2": 20}
