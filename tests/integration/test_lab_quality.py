"""The lab's link quality: per-ISP latency and loss (the NFQUEUE delay link), hops 2 and 3,
per-destination delays in the Internet namespace, and tbf bandwidth together with the delay.

Plain routing in the router namespace: LAN client address .100 and the router's 10.0.1.2 go out
through ISP1, .101 and 10.0.2.2 through ISP2 (a rule and a table per ISP), masqueraded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from uplinkd_lab.delay import DelayError, per_direction_loss, unsupported
from uplinkd_lab.lab import DEST_A, DEST_B, INET_HOST, Lab, LabError, cleanup_stale

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft", "tc", "iptables")),
        reason="needs root and iproute2, nftables, iptables to build network namespaces",
    ),
]

LATENCY = {1: 60.0, 2: 10.0}
ROUTER_NAT = """table ip labtest {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname { "wan1", "wan2" } masquerade
    }
}
"""


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [ln.split()[0] for ln in out.stdout.splitlines() if ln.startswith(f"{prefix}-")]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids: list[int], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while any(_running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not any(_running(p) for p in pids)


@pytest.fixture(scope="module")
def delay_link() -> None:
    reason = unsupported()
    if reason:
        pytest.skip(reason)


class QLab:
    """The module's lab and the LAN client address that leaves through each ISP."""

    def __init__(self, lab: Lab, sources: dict[int, str]) -> None:
        self.lab, self.sources = lab, sources

    def connect_ms(self, dst: str, count: int = 20) -> dict[int, float]:
        """Median TCP connect time from the LAN client to ``dst`` through each ISP."""
        res = self.lab.connect_many(
            self.lab.ns_lan, dst, 80, count, sources=list(self.sources.values())
        )
        assert res.failed == 0, res.errors
        medians = {i: res.median_connect_ms(src) for i, src in self.sources.items()}
        assert all(m is not None for m in medians.values())
        return {i: float(m or 0.0) for i, m in medians.items()}


@pytest.fixture(scope="module")
def qlab(delay_link: None) -> Iterator[QLab]:
    latency = [LATENCY[1], LATENCY[2]]
    with Lab(isps=2, prefix=f"tq{os.getpid() % 10000}", latency_ms=latency, hops=True) as lab:
        router = lab.ns_router
        clients = lab.add_client_addresses(2)
        for i in (1, 2):
            wan = lab.router_wan(i)
            lab.run(router, "ip", "route", "add", "default", "via", wan.gateway, "table", str(i))
            for src in (clients[i - 1], wan.address):
                lab.run(router, "ip", "rule", "add", "from", src, "table", str(i))
        lab.run(router, "nft", "-f", "-", stdin=ROUTER_NAT)
        for address in (INET_HOST, DEST_A, DEST_B):
            lab.start_server(lab.ns_inet, address, [80])
        lab.start_bulk_server(lab.ns_inet, INET_HOST)
        yield QLab(lab, {1: clients[0], 2: clients[1]})


def test_latency_per_isp_and_at_run_time(qlab: QLab) -> None:
    lab = qlab.lab
    assert sorted(lab.delay_programs) == sorted([lab.ns_isp(1), lab.ns_isp(2)])
    assert lab.quality(1) == (60.0, 0.0)
    res = lab.connect_many(lab.ns_lan, INET_HOST, 80, 5, sources=list(qlab.sources.values()))
    assert res.counts_by_isp() == {"ISP1": 5, "ISP2": 5}  # both NATs (router's, ISP's) work

    ms = qlab.connect_ms(INET_HOST)
    assert abs((ms[1] - ms[2]) - 50.0) <= 15.0, ms
    assert 8.0 <= ms[2] <= 20.0, ms

    lab.set_quality(2, latency_ms=40.0)
    try:
        ms = qlab.connect_ms(INET_HOST)
        assert abs((ms[1] - ms[2]) - 20.0) <= 15.0, ms
        assert 38.0 <= ms[2] <= 50.0, ms
    finally:
        lab.set_quality(2, latency_ms=LATENCY[2])


def test_port_forward_through_the_delay(qlab: QLab) -> None:
    """The ISP's DNAT of unsolicited inbound still works with its packets held on the way."""
    lab = qlab.lab
    server = lab.start_server(lab.ns_router, lab.router_wan(1).address, [8080])
    try:
        res = lab.connect_many(lab.ns_inet, "100.64.1.2", 8080, 5)
        assert res.failed == 0, res.errors
        assert set(res.addresses) == {INET_HOST}
        median = res.median_connect_ms()
        assert median is not None
        assert LATENCY[1] - 2 <= median <= LATENCY[1] + 15
    finally:
        server.stop()


def test_loss(qlab: QLab) -> None:
    lab = qlab.lab
    assert abs(per_direction_loss(20.0) - 10.557) < 0.01  # (1 - 0.10557)^2 = 0.8
    before = lab.delay_stats(lab.ns_isp(1))
    assert before is not None
    lab.set_quality(1, loss_percent=20.0)
    try:
        # A burst: 200 echo requests 5 ms apart, each at most ~60 ms in flight.
        lossy = lab.ping(lab.ns_router, INET_HOST, 200, source="10.0.1.2", interval=0.005)
        clean = lab.ping(lab.ns_router, INET_HOST, 200, source="10.0.2.2", interval=0.005)
    finally:
        lab.set_quality(1, loss_percent=0.0)
    after = lab.delay_stats(lab.ns_isp(1))
    assert after is not None
    assert 0.10 <= lossy.loss_fraction <= 0.30, lossy.loss_fraction
    assert clean.lost == 0
    dropped = after["queues"]["0"]["dropped"] - before["queues"]["0"]["dropped"]
    assert dropped >= lossy.lost  # requests and answers dropped, by the delay program only
    assert lab.ping(lab.ns_router, INET_HOST, 50, source="10.0.1.2", interval=0.005).lost == 0


def test_hops_two_and_three_answer_with_the_isps_latency(qlab: QLab) -> None:
    lab = qlab.lab
    hops = {i: lab.hop_addresses(i) for i in (1, 2)}
    assert hops[1] == ["10.0.1.1", "100.64.1.1", "100.65.1.1"]
    assert len({a for addrs in hops.values() for a in addrs}) == 6
    for i in (1, 2):
        for ttl, hop in enumerate(hops[i], start=1):
            res = lab.ping(
                lab.ns_router, INET_HOST, 10, source=f"10.0.{i}.2", ttl=ttl, interval=0.01
            )
            assert res.lost == 0, (i, ttl)
            assert res.sources == {hop}
            assert {r.kind for r in res.answered} == {"time-exceeded"}
            median = res.median_ms
            assert median is not None
            if ttl == 1:  # the ISP's own box, like a CPE modem: not behind the delay
                assert median < 5.0, (i, ttl, median)
            else:
                assert LATENCY[i] - 2 <= median <= LATENCY[i] + 10, (i, ttl, median)
        end = lab.ping(lab.ns_router, INET_HOST, 5, source=f"10.0.{i}.2", ttl=4)
        assert end.sources == {INET_HOST}
        assert {r.kind for r in end.answered} == {"reply"}

    lab.set_upstream(1, up=False)  # with hops: cut between the ISP and hop 2
    try:
        for ttl, answers in ((1, 3), (2, 0), (64, 0)):
            res = lab.ping(lab.ns_router, INET_HOST, 3, source="10.0.1.2", ttl=ttl, timeout=0.3)
            assert len(res.answered) == answers, ttl
    finally:
        lab.set_upstream(1, up=True)
    assert lab.ping(lab.ns_router, INET_HOST, 3, source="10.0.1.2").lost == 0


def test_destination_delay_orders_the_isps_per_destination(qlab: QLab) -> None:
    lab = qlab.lab
    lab.set_quality(1, latency_ms=20.0)
    lab.set_quality(2, latency_ms=20.0)
    lab.set_destination_delay(DEST_A, {2: 40.0})  # A: faster via ISP1
    lab.set_destination_delay(DEST_B, {1: 40.0, 2: 0.0})  # B: faster via ISP2
    try:
        assert lab.destination_delay(DEST_A) == {1: 0.0, 2: 40.0}
        assert lab.destination_delay(INET_HOST) == {1: 0.0, 2: 0.0}
        a, b, host = (
            qlab.connect_ms(dst, n) for dst, n in ((DEST_A, 12), (DEST_B, 12), (INET_HOST, 8))
        )
        assert a[1] < a[2]
        assert b[2] < b[1]
        assert abs((a[2] - a[1]) - 40.0) <= 15.0, a
        assert abs((b[1] - b[2]) - 40.0) <= 15.0, b
        assert abs(host[1] - host[2]) <= 10.0, host  # the Internet host: no extra delay
        burst = lab.ping(lab.ns_router, DEST_A, 50, source="10.0.2.2", interval=0.005)
        assert burst.lost == 0  # held answers of one ICMP id: nothing lost
        assert burst.median_ms is not None
        assert 58.0 <= burst.median_ms <= 75.0
    finally:
        lab.set_destination_delay(DEST_A, {1: 0.0, 2: 0.0})
        lab.set_destination_delay(DEST_B, {1: 0.0, 2: 0.0})
        lab.set_quality(1, latency_ms=LATENCY[1])
        lab.set_quality(2, latency_ms=LATENCY[2])
    a = qlab.connect_ms(DEST_A, 10)
    assert abs((a[1] - a[2]) - 50.0) <= 15.0, a  # back to the ISPs' own latency only


def test_bandwidth_with_delay(qlab: QLab) -> None:
    lab = qlab.lab
    lab.set_bandwidth(1, 20)
    try:
        got = lab.download(lab.ns_lan, INET_HOST, seconds=2.0, source=qlab.sources[1])
    finally:
        lab.set_bandwidth(1, None)
    assert 15.0 <= got.mbit_s <= 21.0, got


def test_delay_program_cost(qlab: QLab) -> None:
    """Rough figures for the report (pytest -s shows them): the ceiling of an unshaped link
    through the delay program, and the CPU the program spent on it."""
    lab = qlab.lab
    before = lab.delay_stats(lab.ns_isp(2))
    got = lab.download(lab.ns_lan, INET_HOST, seconds=2.0, source=qlab.sources[2])
    after = lab.delay_stats(lab.ns_isp(2))
    assert before is not None
    assert after is not None
    cpu = after["cpu_s"] - before["cpu_s"]
    packets = after["queues"]["0"]["packets"] - before["queues"]["0"]["packets"]
    print(
        f"\ndelay link, {LATENCY[2]:g} ms, no shaper: {got.mbit_s:.0f} Mbit/s, "
        f"{packets} packets, {cpu:.2f} s CPU ({cpu / 2.5 * 100:.0f} % of a core), "
        f"{cpu / max(packets, 1) * 1e6:.1f} us/packet, held at most "
        f"{after['queues']['0']['max_held']}"
    )
    assert got.mbit_s >= 50.0


def test_quality_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="one entry per ISP"):
        Lab(isps=2, latency_ms=[10.0])
    with pytest.raises(ValueError, match="loss"):
        Lab(isps=1, loss_percent=120.0)
    lab = Lab(isps=1)
    with pytest.raises(ValueError, match="no hop"):
        lab.ns_hop(1, 2)
    assert lab.hop_addresses(1) == ["10.0.1.1"]
    with pytest.raises(ValueError, match="not one of"):
        lab.set_destination_delay("203.0.113.99", {1: 10.0})


def test_delay_programs_and_hops_removed_when_body_raises(delay_link: None) -> None:
    prefix = f"tr{os.getpid() % 10000}"
    programs = []

    def body() -> None:
        with Lab(isps=1, prefix=prefix, latency_ms=20.0, hops=True) as lab:
            assert sorted(_namespaces(prefix)) == sorted(lab.namespaces)
            assert len(lab.namespaces) == 6
            lab.set_destination_delay(DEST_A, {1: 10.0})
            programs.extend(lab.delay_programs.values())
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        body()
    assert _namespaces(prefix) == []
    assert len(programs) == 2
    assert not any(p.running for p in programs)


def test_cleanup_stale_after_crash_with_delay_programs(delay_link: None) -> None:
    prefix = f"ts{os.getpid() % 10000}"
    script = (
        "import time\n"
        "from uplinkd_lab.lab import Lab\n"
        f"lab = Lab(isps=1, prefix={prefix!r}, latency_ms=20.0, hops=True).__enter__()\n"
        "print(*(p.proc.pid for p in lab.delay_programs.values()), flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 1
        assert _running(pids[0])
        proc.kill()
        proc.wait(5)
        assert _wait_gone(pids)  # end of its input: the delay program goes with its lab
        names = _namespaces(prefix)
        assert len(names) == 6
        assert sorted(cleanup_stale(prefix)) == sorted(names)
    finally:
        proc.kill()
        proc.wait(5)
        cleanup_stale(prefix, force=True)
    assert _namespaces(prefix) == []


def test_a_dead_delay_program_is_an_error(delay_link: None) -> None:
    """No bypass: with its program gone the link is dead and changing it fails loudly, rather
    than carrying on undelayed."""
    with Lab(isps=1, prefix=f"tu{os.getpid() % 10000}", latency_ms=10.0) as lab:
        program = lab.delay_programs[lab.ns_isp(1)]
        program.proc.kill()
        program.proc.wait(5)
        with pytest.raises(DelayError, match="not running"):
            lab.set_quality(1, latency_ms=20.0)
        with pytest.raises(LabError, match="not a namespace of this lab"):
            lab.delay_stats("not-ours")
