"""uplinkd's datapath on real traffic in the namespace lab (root; see conftest.needs_root)."""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from uplinkd_lab.lab import INET_HOST, LAN_SERVER, Lab

from .conftest import TWO_LINKS, Uplinkd, needs_root, stop_all, tracked_marks

pytestmark = [needs_root, pytest.mark.lab]


BACKENDS = ("nftables", "iptables")


def within(share: float, expected: float, picks: int) -> bool:
    """Whether the share of `picks` independent choices is within 4.5 standard deviations of the
    expected percentage: a false alarm once in about 150,000 checks (a fixed margin of 3 points
    was one in 500 at 2000 connections), while a wrong ratio (1:2 for 1:3) still fails."""
    p = expected / 100
    return abs(share - p) <= 4.5 * math.sqrt(p * (1 - p) / picks)


@pytest.fixture(params=BACKENDS)
def runner(request: pytest.FixtureRequest, lab2: Lab, tmp_path: Path) -> Iterator[Uplinkd]:
    """uplinkd with each netfilter backend in turn; the legacy one is skipped, with the reason,
    where its tables cannot be used."""
    runner = Uplinkd(lab2, tmp_path, request.param)
    yield runner
    stop_all(runner)


@pytest.fixture(scope="module")
def lan_server(lab2: Lab) -> None:
    lab2.start_server(lab2.ns_lan, LAN_SERVER, [80, 22])


def test_weights_1_3_share_connections(lab2: Lab, runner: Uplinkd) -> None:
    config = runner.write_config(TWO_LINKS.format(w1=1, w2=3))
    runner.run(config, "--once")
    nft_tables = lab2.run(lab2.ns_router, "nft", "list", "tables").stdout
    assert ("table inet uplinkd" in nft_tables) == (runner.backend == "nftables")
    result = lab2.connect_many(lab2.ns_lan, INET_HOST, 80, 2000)
    assert result.failed == 0
    shares = result.shares()
    assert within(shares["ISP1"], 25, 2000) and within(shares["ISP2"], 75, 2000), shares


def test_weights_1_3_2_over_three_links(tmp_path: Path) -> None:
    with Lab(isps=3) as lab:
        lab.start_server(lab.ns_inet, INET_HOST, [80])
        runner = Uplinkd(lab, tmp_path)
        text = (
            TWO_LINKS.format(w1=1, w2=3)
            + '\n[[link]]\nname = "ISP3"\ndevice = "wan3"\nweight = 2\n'
        )
        runner.run(runner.write_config(text), "--once")
        result = lab.connect_many(lab.ns_lan, INET_HOST, 80, 2000)
        assert result.failed == 0
        shares = result.shares()
        expected = {"ISP1": 100 / 6, "ISP2": 50.0, "ISP3": 100 / 3}
        assert all(within(shares[isp], pct, 2000) for isp, pct in expected.items()), shares


BALANCE_CONF_FAILOVER = """\
# Net-ISP-Balance style configuration, failover mode: the highest weight is preferred
#service    device   role     ping-ip           weight    gateway
CABLE       wan1     isp      203.0.113.10      1         default
DSL         wan2     isp      203.0.113.10      2         default
LAN         lan0     lan
mode=failover
"""


def test_failover_mode_uses_preferred_link_then_the_next(lab2: Lab, runner: Uplinkd) -> None:
    config = runner.write_config(BALANCE_CONF_FAILOVER, "balance.conf")  # --backend: no such key
    runner.run(config, "--once")
    lab2.run(lab2.ns_router, "conntrack", "-F")  # earlier tests' connections
    result = lab2.connect_many(lab2.ns_lan, INET_HOST, 80, 200)
    assert result.counts_by_isp() == {"ISP1": 0, "ISP2": 200}  # DSL (weight 2) on wan2
    marks = tracked_marks(lab2)  # the closed connections stay tracked for 10 s
    assert len(marks) == 1 and sum(marks.values()) >= 200, marks
    runner.run(config, "--once", "CABLE")  # like load_balance.pl CABLE: DSL marked down
    # DSL's entries are forgotten: a new connection reusing one's ports would follow DSL.
    assert set(tracked_marks(lab2)).isdisjoint(marks)
    result = lab2.connect_many(lab2.ns_lan, INET_HOST, 80, 200)
    assert result.counts_by_isp() == {"ISP1": 200, "ISP2": 0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_persistence_by_source_sticks_and_only_failed_link_moves(
    tmp_path: Path, backend: str
) -> None:
    with Lab(isps=3) as lab:
        lab.start_server(lab.ns_inet, INET_HOST, [80])
        runner = Uplinkd(lab, tmp_path, backend)
        text = (
            TWO_LINKS.format(w1=1, w2=1)
            + '\n[[link]]\nname = "ISP3"\ndevice = "wan3"\n'
            + '\n[default]\nmethod = "persistence"\nby = "source"\n'
        )
        config = runner.write_config(text)
        runner.run(config, "--once")
        sources = lab.add_client_addresses(20)
        before = lab.connect_many(lab.ns_lan, INET_HOST, 80, 30, sources=sources)
        assert before.failed == 0
        link_of = {}
        for source in sources:
            used = {isp for isp, n in before.counts_by_isp(source=source).items() if n}
            assert len(used) == 1, f"{source} used {used}"
            link_of[source] = used.pop()
        assert len(set(link_of.values())) == 3  # 20 sources spread over all three links

        result = runner.run(config, "--once", "ISP1", "ISP3")  # ISP2 marked down
        assert "netfilter: maps" in result.stderr
        after = lab.connect_many(lab.ns_lan, INET_HOST, 80, 30, sources=sources)
        assert after.failed == 0
        for source in sources:
            used = {isp for isp, n in after.counts_by_isp(source=source).items() if n}
            assert len(used) == 1, f"{source} used {used} after the failover"
            if link_of[source] == "ISP2":
                assert used != {"ISP2"}
            else:
                assert used == {link_of[source]}, f"{source} moved without need"


ENFORCED = (
    TWO_LINKS.format(w1=1, w2=1)
    + """
[[rule]]
name = "mail"
match = { proto = "tcp", dport = [25] }
method = "enforced"
links = ["ISP1"]
"""
)


def test_enforced_rule_keeps_its_link_and_is_refused_when_down(lab2: Lab, runner: Uplinkd) -> None:
    config = runner.write_config(ENFORCED)
    runner.run(config, "--once")
    mail = lab2.connect_many(lab2.ns_lan, INET_HOST, 25, 100)
    assert mail.counts_by_isp() == {"ISP1": 100, "ISP2": 0}
    web = lab2.connect_many(lab2.ns_lan, INET_HOST, 80, 200)
    assert min(web.counts_by_isp().values()) > 50  # the default rule still balances

    runner.run(config, "--once", "ISP2")
    mail = lab2.connect_many(lab2.ns_lan, INET_HOST, 25, 20, timeout=1.0)
    assert mail.ok == 0 and mail.failed == 20  # never leaked through ISP2
    assert mail.errors == {"refused": 20}  # refused at once (TCP reset), not left to time out
    web = lab2.connect_many(lab2.ns_lan, INET_HOST, 80, 100)
    assert web.counts_by_isp() == {"ISP1": 0, "ISP2": 100}


def test_router_originated_connections_are_balanced(lab2: Lab, runner: Uplinkd) -> None:
    runner.run(runner.write_config(TWO_LINKS.format(w1=1, w2=1)), "--once")
    result = lab2.connect_many(lab2.ns_router, INET_HOST, 80, 1000)
    assert result.failed == 0
    shares = result.shares()
    assert within(shares["ISP1"], 50, 1000) and within(shares["ISP2"], 50, 1000), shares


@pytest.mark.usefixtures("lan_server")
def test_port_forward_from_an_isp_address_reaches_the_lan_server(
    lab2: Lab, runner: Uplinkd
) -> None:
    text = (
        TWO_LINKS.format(w1=1, w2=1)
        + """
[[forward]]
port = 8080
to = "192.168.10.35:80"

[[forward]]
port = 2222
to = "192.168.10.35:22"
"""
    )
    runner.run(runner.write_config(text), "--once")
    for isp in (1, 2):
        # The Internet host connects to ISP i's public address; the ISP hands it to the router.
        result = lab2.connect_many(lab2.ns_inet, f"100.64.{isp}.2", 8080, 20)
        assert result.addresses == [INET_HOST] * 20, result.errors
    result = lab2.connect_many(lab2.ns_inet, "100.64.1.2", 2222, 5)
    assert result.addresses == [INET_HOST] * 5, result.errors


@pytest.mark.usefixtures("lan_server")
def test_hook_files_survive_reapply(lab2: Lab, uplinkd: Uplinkd) -> None:
    firewall = uplinkd.workdir / "firewall"
    firewall.mkdir()
    (firewall / "01.block-8080").write_text(
        "# LAN clients may not reach port 8080 on the Internet\n"
        "add chain inet uplinkd hook_forward { type filter hook forward priority 0; }\n"
        "nft add rule inet uplinkd hook_forward tcp dport 8080 reject with tcp reset\n"
    )
    (firewall / "02.forward.py").write_text('B.forward(8081, "192.168.10.35:80")\n')
    (firewall / "03.ignored~").write_text("this is an editor backup and must be skipped\n")
    config = uplinkd.write_config(TWO_LINKS.format(w1=1, w2=1))

    def hooks_in_force() -> None:
        blocked = lab2.connect_many(lab2.ns_lan, INET_HOST, 8080, 5)
        assert blocked.ok == 0 and blocked.errors.get("refused") == 5, blocked.errors
        allowed = lab2.connect_many(lab2.ns_lan, INET_HOST, 80, 5)
        assert allowed.ok == 5, allowed.errors
        forwarded = lab2.connect_many(lab2.ns_inet, "100.64.2.2", 8081, 5)
        assert forwarded.addresses == [INET_HOST] * 5, forwarded.errors

    uplinkd.run(config, "--once")
    hooks_in_force()
    uplinkd.run(config, "--once")  # the same plan again: nothing rebuilt, hooks still there
    hooks_in_force()
    uplinkd.run(config, "--once", "ISP2")  # a link state change: map update
    hooks_in_force()
    config.write_text(TWO_LINKS.format(w1=1, w2=2))  # a configuration change: full rebuild
    uplinkd.run(config, "--once")
    hooks_in_force()


def test_unsafe_hook_file_is_refused_with_its_name(lab2: Lab, uplinkd: Uplinkd) -> None:
    routes = uplinkd.workdir / "routes"
    routes.mkdir()
    unsafe = routes / "01.world-writable"
    unsafe.write_text("ip route add 198.51.100.0/24 dev lan0\n")
    unsafe.chmod(0o666)
    result = uplinkd.run(uplinkd.write_config(TWO_LINKS.format(w1=1, w2=1)), "--once")
    assert f"{unsafe}: refused: writable by group or others" in result.stderr
    routes_now = lab2.run(lab2.ns_router, "ip", "route", "show", "198.51.100.0/24").stdout
    assert routes_now == ""
    os.chown(unsafe, 65534, 65534)
    unsafe.chmod(0o644)
    result = uplinkd.run(uplinkd.workdir / "uplinkd.toml", "--once")
    assert f"{unsafe}: refused: owned by uid 65534, not root" in result.stderr


def test_command_hooks_run_in_stage_order_after_a_rebuild(lab2: Lab, uplinkd: Uplinkd) -> None:
    marker = uplinkd.workdir / "order"
    for stage, command in (
        ("pre-run", f"echo pre-run >> {marker}"),
        (
            "routes",
            f"ip route replace 198.51.100.0/24 dev lan0 table 77 && echo routes >> {marker}",
        ),
        ("post-run", f"echo post-run >> {marker}"),
    ):
        (uplinkd.workdir / stage).mkdir()
        (uplinkd.workdir / stage / "01.commands").write_text(f"# {stage}\n{command}\n")
    (uplinkd.workdir / "post-run" / "02.fails").write_text("exit 3\n")
    config = uplinkd.write_config(TWO_LINKS.format(w1=1, w2=1))
    try:
        result = uplinkd.run(config, "--once", check=False)
        assert result.returncode == 1  # a failing command is reported, the datapath stays applied
        assert f"{uplinkd.workdir / 'post-run' / '02.fails'}:1: exit 3" in result.stderr
        assert marker.read_text().split() == ["pre-run", "routes", "post-run"]
        table = lab2.run(lab2.ns_router, "ip", "route", "show", "table", "77").stdout
        assert "198.51.100.0/24 dev lan0" in table
        assert "table inet uplinkd" in uplinkd.kernel_state()
        uplinkd.run(config, "--once", check=False)  # nothing to rebuild: commands not run again
        assert marker.read_text().split() == ["pre-run", "routes", "post-run"]
    finally:
        lab2.run(lab2.ns_router, "ip", "route", "flush", "table", "77", check=False)


FIREWALLED = (
    TWO_LINKS.format(w1=1, w2=1)
    + """
[default]
method = "priority"

[firewall]
enabled = true
forwarding_groups = [["LAN", "ISP1"]]
ssh_from_lan = true
icmp_rate_per_second = 5
"""
)


def test_restrictive_firewall(lab2: Lab, uplinkd: Uplinkd) -> None:
    router = lab2.ns_router
    lab2.start_server(router, "0.0.0.0", [22, 80])  # the lab's own namespace
    config = uplinkd.write_config(FIREWALLED)
    uplinkd.run(config, "--once")

    assert lab2.connect_many(lab2.ns_lan, "192.168.10.1", 22, 3).ok == 3  # ssh from the LAN
    closed = lab2.connect_many(lab2.ns_lan, "192.168.10.1", 80, 2, timeout=0.5)
    assert closed.errors == {"timeout": 2}  # anything else to the router is dropped
    # From the Internet: ISP1 hands connections for its public address to the router.
    outside = lab2.connect_many(lab2.ns_inet, "100.64.1.2", 22, 2, timeout=0.5)
    assert outside.errors == {"timeout": 2}

    via_isp1 = lab2.connect_many(lab2.ns_lan, INET_HOST, 80, 20)
    assert via_isp1.counts_by_isp() == {"ISP1": 20, "ISP2": 0}  # replies pass: established
    uplinkd.run(config, "--once", "ISP2")  # ISP2 is not in the LAN's forwarding group
    via_isp2 = lab2.connect_many(lab2.ns_lan, INET_HOST, 80, 5, timeout=0.5)
    assert via_isp2.ok == 0

    flood = (
        "from icmplib import ping; "
        "print(ping('192.168.10.1', count=40, interval=0, timeout=0.02).packets_received)"
    )
    received = int(lab2.run(lab2.ns_lan, sys.executable, "-c", flood).stdout)
    assert 0 < received < 25  # echo requests are answered, at a limited rate
