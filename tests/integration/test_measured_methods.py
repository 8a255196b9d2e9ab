"""The measured methods on measured traffic and latency in the lab (root, netfilterqueue).

Bounds are generous limits for correctness: a choice must move within a bounded number of
measurement rounds (rates and hop latencies are sampled about once a second and smoothed).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from uplinkd_lab.delay import unsupported
from uplinkd_lab.lab import DEST_A, INET_HOST, Lab

from .conftest import Daemon, Uplinkd, needs_root, wait_until
from .privatebus import PrivateBus, private_bus
from .test_ctl import uplinkctl

pytestmark = [needs_root, pytest.mark.lab]


@pytest.fixture(scope="module", autouse=True)
def delay_link() -> None:
    """The lab's latency emulation (and its tbf caps) need the NFQUEUE delay link."""
    reason = unsupported()
    if reason:
        pytest.skip(reason)


LINKS = """
[monitor]
interval_ms = 200
timeout_ms = 300

[[link]]
name = "ISP1"
device = "wan1"
targets = ["203.0.113.10"]
{bandwidth1}

[[link]]
name = "ISP2"
device = "wan2"
targets = ["203.0.113.10"]
{bandwidth2}

[[lan]]
name = "LAN"
device = "lan0"

[default]
method = "{method}"
"""


def via(lab: Lab, count: int = 20) -> dict[str, int]:
    return lab.connect_many(lab.ns_lan, INET_HOST, 80, count, timeout=2.0).counts_by_isp()


def only(lab: Lab, isp: str) -> bool:
    counts = via(lab)
    return counts[isp] == sum(counts.values()) == 20


def start(
    lab: Lab, tmp_path: Path, text: str, bus_address: str | None = None
) -> tuple[Uplinkd, Daemon]:
    runner = Uplinkd(lab, tmp_path)
    daemon = runner.start(runner.write_config(text), bus_address=bus_address)
    assert daemon.log.wait_for("link ISP2: init -> up", 15), daemon.log.text
    assert daemon.log.wait_for("link ISP1: init -> up", 15), daemon.log.text
    return runner, daemon


@pytest.fixture
def latency_lab() -> Iterator[Lab]:
    with Lab(isps=2, latency_ms=[60, 10], hops=True) as lab:
        lab.start_server(lab.ns_inet, INET_HOST, [80])
        yield lab


def hop_latencies(bus: PrivateBus) -> dict[str, float]:
    """Each link's HopLatencyMs, as `uplinkctl status --json` shows it."""
    shown = uplinkctl(bus.address, "status", "--json")
    assert shown.returncode == 0, shown.stderr
    return {link["Name"]: link["HopLatencyMs"] for link in json.loads(shown.stdout)["links"]}


def test_lowest_latency_follows_the_faster_link(latency_lab: Lab, tmp_path: Path) -> None:
    lab = latency_lab
    text = LINKS.format(bandwidth1="", bandwidth2="", method="lowest-latency")
    with private_bus() as bus:
        runner, daemon = start(lab, tmp_path, text, bus.address)
        try:
            assert wait_until(lambda: only(lab, "ISP2"), 15), daemon.log.text  # 10 beats 60 ms
            # What lowest-latency compares is published: the hop RTTs include each ISP's delay.
            hops = hop_latencies(bus)
            assert hops["ISP1"] >= 55 and 0 <= hops["ISP2"] < 40, hops
            lab.set_quality(1, latency_ms=10)
            lab.set_quality(2, latency_ms=60)
            assert wait_until(lambda: only(lab, "ISP1"), 20), daemon.log.text
        finally:
            daemon.stop()
            runner.run(runner.workdir / "uplinkd.toml", "--stop", check=False)


def test_equal_links_do_not_make_lowest_latency_oscillate(tmp_path: Path) -> None:
    with Lab(isps=2, latency_ms=[20, 20], hops=True) as lab:
        lab.start_server(lab.ns_inet, INET_HOST, [80])
        text = LINKS.format(bandwidth1="", bandwidth2="", method="lowest-latency")
        runner, daemon = start(lab, tmp_path, text)
        try:
            assert wait_until(lambda: "applied generation" in daemon.log.text, 5)
            before = daemon.log.text.count("applied generation")
            threading.Event().wait(8)  # eight measurement rounds with equal latencies
            assert daemon.log.text.count("applied generation") - before <= 1, daemon.log.text
        finally:
            daemon.stop()
            runner.run(runner.workdir / "uplinkd.toml", "--stop", check=False)


def _bulk(lab: Lab, seconds: float) -> threading.Thread:
    """A bulk download from the Internet host to the LAN client, in the background."""
    thread = threading.Thread(
        target=lab.download, args=(lab.ns_lan, INET_HOST), kwargs={"seconds": seconds}
    )
    thread.start()
    return thread


def test_overflow_spills_to_the_next_link_while_the_first_is_saturated(tmp_path: Path) -> None:
    with Lab(isps=2, bandwidth_mbit=[20, None]) as lab:
        lab.start_server(lab.ns_inet, INET_HOST, [80])
        lab.start_bulk_server(lab.ns_inet, INET_HOST)
        text = LINKS.format(
            bandwidth1="bandwidth_mbps = { down = 20, up = 20 }",
            bandwidth2="bandwidth_mbps = { down = 100, up = 100 }",
            method="overflow",
        )
        runner, daemon = start(lab, tmp_path, text)
        try:
            assert only(lab, "ISP1")  # idle: the first link in priority order
            bulk = _bulk(lab, seconds=10)  # starts on ISP1 and fills its 20 Mbit/s
            assert wait_until(lambda: only(lab, "ISP2"), 8), daemon.log.text
            bulk.join(timeout=30)
            assert wait_until(lambda: only(lab, "ISP1"), 10), daemon.log.text
        finally:
            daemon.stop()
            runner.run(runner.workdir / "uplinkd.toml", "--stop", check=False)


def test_least_used_prefers_the_link_with_more_free_capacity(tmp_path: Path) -> None:
    # ISP1: 100 Mbit/s configured, 70 in use (a tbf at 70 filled by a download); ISP2: 50 idle.
    with Lab(isps=2, bandwidth_mbit=[70, None]) as lab:
        lab.start_server(lab.ns_inet, INET_HOST, [80])
        lab.start_bulk_server(lab.ns_inet, INET_HOST)
        text = LINKS.format(
            bandwidth1="bandwidth_mbps = { down = 100 }",
            bandwidth2="bandwidth_mbps = { down = 50 }",
            method="least-used",
        )
        runner, daemon = start(lab, tmp_path, text)
        try:
            assert only(lab, "ISP1")  # idle: 100 free beats 50 free
            bulk = _bulk(lab, seconds=10)
            assert wait_until(lambda: only(lab, "ISP2"), 8), daemon.log.text  # 30 free < 50
            bulk.join(timeout=30)
            assert wait_until(lambda: only(lab, "ISP1"), 10), daemon.log.text
        finally:
            daemon.stop()
            runner.run(runner.workdir / "uplinkd.toml", "--stop", check=False)


COMPOSED = (
    LINKS.format(bandwidth1="", bandwidth2="", method="weighted")
    + """
[[rule]]
name = "https"
match = { proto = "tcp", dport = [443] }
method = "persistence"
by = "source"

[[rule]]
name = "voip"                      # a TCP stand-in for the RTP range: the lab's server is TCP
match = { proto = "tcp", dport = ["8000-8100"] }
method = "lowest-latency"

[[rule]]
name = "mail"
match = { proto = "tcp", dport = [25], dst = ["203.0.113.20"] }
method = "enforced"
links = ["ISP1"]
"""
)


def test_four_methods_at_once_each_on_its_traffic(latency_lab: Lab, tmp_path: Path) -> None:
    lab = latency_lab
    lab.start_server(lab.ns_inet, INET_HOST, [443, 8080])
    lab.start_server(lab.ns_inet, DEST_A, [25])
    sources = lab.add_client_addresses(10)
    runner, daemon = start(lab, tmp_path, COMPOSED)
    try:
        # lowest-latency: the VoIP range follows the faster ISP2 once hop latencies are known.
        def voip_via_isp2() -> bool:
            counts = lab.connect_many(lab.ns_lan, INET_HOST, 8080, 20).counts_by_isp()
            return counts["ISP2"] == sum(counts.values()) == 20

        assert wait_until(voip_via_isp2, 15), daemon.log.text
        # enforced: mail to the mail host always leaves by ISP1, although ISP1 is slower.
        mail = lab.connect_many(lab.ns_lan, DEST_A, 25, 30)
        assert mail.counts_by_isp() == {"ISP1": 30, "ISP2": 0}
        # persistence: every source keeps one link for https.
        https = lab.connect_many(lab.ns_lan, INET_HOST, 443, 10, sources=sources)
        for source in sources:
            used = {isp for isp, n in https.counts_by_isp(source=source).items() if n}
            assert len(used) == 1, (source, used)
        # weighted: everything else is shared 1:1.
        web = lab.connect_many(lab.ns_lan, INET_HOST, 80, 400).counts_by_isp()
        assert min(web.values()) > 140, web
    finally:
        daemon.stop()
        runner.run(runner.workdir / "uplinkd.toml", "--stop", check=False)
