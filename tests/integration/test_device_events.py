"""Every kind of device event a router sees on a WAN, for each link, the first one included (root).

The daemon runs weighted 1:1 over ISP1 and ISP2 with probes through each link. For each event
(tests/../lab.py `set_device_fault`: admin down, deleted and recreated, renamed, address removed,
gateway silent on ARP, carrier loss) on ISP1 and on ISP2: new connections go only through the
other link while it lasts, every apply succeeds (one link's device never blocks the plan for the
others), and the link is used again once the event is over. The bounds are generous limits for
correctness; the times are measured by the benchmarks (tests/bench/device_events.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from uplinkd_lab.lab import DEVICE_FAULTS, INET_HOST, Lab

from .conftest import Uplinkd, needs_root, stop_all, wait_until
from .test_failover import MONITORED, both_used, start

pytestmark = [needs_root, pytest.mark.lab]


def via_only(lab: Lab, isp: str, count: int = 20) -> bool:
    result = lab.connect_many(lab.ns_lan, INET_HOST, 80, count, timeout=1.0)
    return result.counts_by_isp().get(isp, 0) == count


# The legacy backend too, for the events whose apply path was broken (routes refused).
CASES = [
    *((kind, "nftables") for kind in DEVICE_FAULTS),
    *((kind, "iptables") for kind in ("admin", "deleted", "renamed")),
]


@pytest.fixture
def runner(request: pytest.FixtureRequest, lab2: Lab, tmp_path: Path) -> Iterator[Uplinkd]:
    runner = Uplinkd(lab2, tmp_path, request.param)
    yield runner
    stop_all(runner)


@pytest.mark.parametrize(("kind", "runner"), CASES, indirect=["runner"])
@pytest.mark.parametrize("isp", [1, 2])
def test_device_event_moves_traffic_and_the_link_returns(
    lab2: Lab, runner: Uplinkd, isp: int, kind: str
) -> None:
    name, other = f"ISP{isp}", f"ISP{3 - isp}"
    daemon = start(runner, runner.write_config(MONITORED.format(extra_target="")))
    assert wait_until(lambda: both_used(lab2), 10), daemon.log.text
    try:
        lab2.set_device_fault(isp, kind, faulty=True)
        assert daemon.log.wait_for(f"link {name}: up -> down", 10), daemon.log.text
        assert wait_until(lambda: via_only(lab2, other), 5), daemon.log.text
        assert wait_until(lambda: via_only(lab2, other), 1), daemon.log.text  # and it stays
    finally:
        lab2.set_device_fault(isp, kind, faulty=False)
    assert daemon.log.wait_for(f"link {name}: down -> up", 15), daemon.log.text
    assert wait_until(lambda: both_used(lab2), 5), daemon.log.text
    assert "apply failed" not in daemon.log.text
    assert "internal" not in daemon.log.text


@pytest.mark.parametrize("isp", [1, 2])
def test_once_with_a_device_down_applies_the_others(lab2: Lab, uplinkd: Uplinkd, isp: int) -> None:
    config = uplinkd.write_config(MONITORED.format(extra_target=""))
    lab2.set_device_fault(isp, "admin", faulty=True)
    try:
        result = uplinkd.run(config, "--once", check=False)
        assert result.returncode == 1, result.stderr
        assert f"link ISP{isp}: routes refused, applied as down" in result.stderr
        assert via_only(lab2, f"ISP{3 - isp}")
    finally:
        lab2.set_device_fault(isp, "admin", faulty=False)
    result = uplinkd.run(config, "--once", check=False)
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: both_used(lab2), 5)
