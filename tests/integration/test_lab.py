"""The namespace lab itself: reachability through one ISP, failure accounting, and clean-up."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest
from uplinkd_lab.lab import INET_HOST, Lab, LabError, cleanup_stale

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft", "tc")),
        reason="needs root and iproute2 + nftables to build network namespaces",
    ),
]

ROUTER_NAT = """table ip labtest {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "wan1" masquerade
    }
}
"""


def _namespaces(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [ln.split()[0] for ln in out.stdout.splitlines() if ln.startswith(f"{prefix}-")]


def _running(pid: str) -> bool:
    """Alive and not a zombie (an orphan's reaper may be slow, or absent in a container)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _prefix(tag: str) -> str:
    return f"t{tag}{os.getpid() % 10000}"


def test_lan_reaches_internet_through_isp1() -> None:
    prefix = _prefix("a")
    with Lab(isps=2, prefix=prefix) as lab:
        assert sorted(_namespaces(prefix)) == sorted(lab.namespaces)
        assert lab.isp_names == ["ISP1", "ISP2"]
        assert tuple(lab.router_wan(2)) == ("wan2", "10.0.2.2", "10.0.2.1")
        assert lab.isp_of("100.64.2.2") == "ISP2"
        assert lab.isp_of("10.0.1.2") == "ISP1"
        assert lab.isp_of("100.64.3.2") is None
        server = lab.start_server(lab.ns_inet, INET_HOST, [80, 25])
        wan = lab.router_wan(1)
        lab.run(lab.ns_router, "ip", "route", "add", "default", "via", wan.gateway)
        lab.run(lab.ns_router, "nft", "-f", "-", stdin=ROUTER_NAT)

        res = lab.connect_many(lab.ns_lan, INET_HOST, 80, 1000)
        assert res.failed == 0, res.errors
        assert set(res.addresses) == {"100.64.1.2"}
        assert res.counts_by_isp() == {"ISP1": 1000, "ISP2": 0}
        assert res.shares(lab) == {"ISP1": 1.0, "ISP2": 0.0}
        assert res.elapsed_s < 5.0  # thousands of connections must stay cheap

        sources = lab.add_client_addresses(3)
        assert sources == ["192.168.10.100", "192.168.10.101", "192.168.10.102"]
        res = lab.connect_many(lab.ns_lan, INET_HOST, 25, 5, sources=sources)
        assert res.failed == 0, res.errors
        assert {src: len(seen) for src, seen in res.seen.items()} == dict.fromkeys(sources, 5)
        assert res.counts_by_isp(source=sources[0]) == {"ISP1": 5, "ISP2": 0}

        res = lab.connect_many(lab.ns_lan, INET_HOST, 443, 3)  # nobody listens there
        assert (res.failed, res.errors) == (3, {"refused": 3})

        lab.set_link(1, up=False)  # carrier loss: packets vanish, each attempt times out
        start = time.monotonic()
        res = lab.connect_many(lab.ns_lan, INET_HOST, 80, 2, timeout=0.3)
        assert (res.failed, res.errors) == (2, {"timeout": 2})
        assert time.monotonic() - start < 3.0
        assert "NO-CARRIER" in lab.run(lab.ns_router, "ip", "link", "show", "wan1").stdout
        lab.set_link(1, up=True)
        res = lab.connect_many(lab.ns_lan, INET_HOST, 80, 1, timeout=2.0)
        assert res.addresses == ["100.64.1.2"]

        with pytest.raises(LabError, match="not a namespace of this lab"):
            lab.run("not-ours", "true")
        with pytest.raises(LabError, match="in use"):
            Lab(isps=1, prefix=prefix).__enter__()
        assert lab.connect_many(lab.ns_lan, INET_HOST, 80, 1).failed == 0  # untouched
    assert _namespaces(prefix) == []
    assert not server.running


def test_cleanup_when_body_raises() -> None:
    prefix = _prefix("b")
    servers = []

    def body() -> None:
        with Lab(isps=1, prefix=prefix) as lab:
            servers.append(lab.start_server(lab.ns_inet, INET_HOST, [80]))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        body()
    assert _namespaces(prefix) == []
    assert servers
    assert not servers[0].running


def test_cleanup_when_setup_fails_half_way(monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = _prefix("d")

    def broken_tc(self: Lab, i: int, mbit: float | None) -> None:
        raise LabError("tc broke")

    monkeypatch.setattr(Lab, "set_bandwidth", broken_tc)
    with pytest.raises(LabError, match="tc broke"):
        Lab(isps=2, prefix=prefix).__enter__()
    assert _namespaces(prefix) == []


def test_cleanup_stale_after_crash() -> None:
    prefix = _prefix("c")
    script = (
        "import sys, time\n"
        "from uplinkd_lab.lab import Lab, INET_HOST\n"
        f"lab = Lab(isps=1, prefix={prefix!r}).__enter__()\n"
        "lab.start_server(lab.ns_inet, INET_HOST, [80])\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "up"
        assert cleanup_stale(prefix) == []  # its owner is alive: not stale
        proc.kill()
        proc.wait(5)
        names = _namespaces(prefix)
        assert sorted(names) == sorted(f"{prefix}-{n}" for n in ("lan", "router", "isp1", "inet"))
        pids = subprocess.run(
            ["ip", "netns", "pids", f"{prefix}-inet"], capture_output=True, text=True, check=True
        ).stdout.split()
        assert pids  # the orphaned server outlived its lab
        assert sorted(cleanup_stale(prefix)) == sorted(names)
        deadline = time.monotonic() + 2.0
        while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(_running(pid) for pid in pids)
    finally:
        proc.kill()
        cleanup_stale(prefix, force=True)
    assert _namespaces(prefix) == []
