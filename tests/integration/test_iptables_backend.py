"""The legacy iptables backend on real traffic in the namespace lab: test_balancing's core tests
with `backend = "iptables"`, its atomic generations, `--stop` and its refusal beside iptables-nft.

Root only (conftest.needs_root); skipped with the reason where the legacy tables cannot be used:
python-iptables missing, the legacy x_tables modules unavailable, or iptables-nft rules present.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from uplinkd.lab import INET_HOST, LAN_SERVER, Lab

from .conftest import TWO_LINKS, Uplinkd, needs_root, wait_until
from .test_balancing import BALANCE_CONF_FAILOVER, ENFORCED, within
from .test_failover import MONITORED, both_used, only_via

pytestmark = [needs_root, pytest.mark.lab]

LEGACY = 'backend = "iptables"\n'
CHECK = "from uplinkd.backends.iptables import IptablesBackend; IptablesBackend().check_available()"
CHAIN = re.compile(r"^:(UPLINKD-(\d+)-\w+) ", re.M)


def legacy_save(lab: Lab) -> str:
    return lab.run(lab.ns_router, "iptables-legacy-save").stdout


def generations(lab: Lab) -> set[int]:
    return {int(gen) for _, gen in CHAIN.findall(legacy_save(lab))}


def foreign(text: str) -> set[tuple[str, str]]:
    """The rules and user chains in iptables-legacy-save output that are not uplinkd's."""
    found, table = set(), ""
    for line in text.splitlines():
        table = line[1:] if line.startswith("*") else table
        ours = "UPLINKD-" in line
        if not ours and (line.startswith("-A ") or (line.startswith(":") and " - [" in line)):
            found.add((table, line.split(" [")[0]))
    return found


def usable(lab: Lab) -> Lab:
    """The lab, or a skip naming why this backend cannot work in its router namespace."""
    result = lab.run(lab.ns_router, sys.executable, "-c", CHECK, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["unknown"])[-1]
        pytest.skip(f"the legacy iptables backend cannot be used here: {reason}")
    return lab


def stop(lab: Lab) -> None:
    argv = [sys.executable, "-m", "uplinkd.cli", "--stop"]
    for backend in ("iptables", "nftables"):
        lab.run(lab.ns_router, *argv, "--backend", backend, check=False)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(isps=2) as built:
        built.start_server(built.ns_inet, INET_HOST)
        yield usable(built)


@pytest.fixture
def uplinkd(lab: Lab, tmp_path: Path) -> Iterator[Uplinkd]:
    yield Uplinkd(lab, tmp_path)
    stop(lab)


def test_weights_1_3_share_connections(lab: Lab, uplinkd: Uplinkd) -> None:
    uplinkd.run(uplinkd.write_config(LEGACY + TWO_LINKS.format(w1=1, w2=3)), "--once")
    assert "table inet uplinkd" not in lab.run(lab.ns_router, "nft", "list", "tables").stdout
    result = lab.connect_many(lab.ns_lan, INET_HOST, 80, 2000)
    assert result.failed == 0
    shares = result.shares()
    assert within(shares["ISP1"], 25) and within(shares["ISP2"], 75), shares


def test_failover_mode_with_the_backend_option(lab: Lab, uplinkd: Uplinkd) -> None:
    config = uplinkd.write_config(BALANCE_CONF_FAILOVER, "balance.conf")  # has no backend key
    uplinkd.run(config, "--once", "--backend", "iptables")
    assert "UPLINKD-" in legacy_save(lab)
    result = lab.connect_many(lab.ns_lan, INET_HOST, 80, 200)
    assert result.counts_by_isp() == {"ISP1": 0, "ISP2": 200}
    uplinkd.run(config, "--once", "--backend", "iptables", "CABLE")  # DSL marked down
    result = lab.connect_many(lab.ns_lan, INET_HOST, 80, 200)
    assert result.counts_by_isp() == {"ISP1": 200, "ISP2": 0}


def test_persistence_by_source_sticks_and_only_failed_link_moves(tmp_path: Path) -> None:
    with Lab(isps=3) as lab3:
        lab3.start_server(lab3.ns_inet, INET_HOST, [80])
        runner = Uplinkd(usable(lab3), tmp_path)
        text = (
            LEGACY
            + TWO_LINKS.format(w1=1, w2=1)
            + '\n[[link]]\nname = "ISP3"\ndevice = "wan3"\n'
            + '\n[default]\nmethod = "persistence"\nby = "source"\n'
        )
        config = runner.write_config(text)
        runner.run(config, "--once")
        sources = lab3.add_client_addresses(20)
        before = lab3.connect_many(lab3.ns_lan, INET_HOST, 80, 30, sources=sources)
        assert before.failed == 0
        link_of = {}
        for source in sources:
            used = {isp for isp, n in before.counts_by_isp(source=source).items() if n}
            assert len(used) == 1, f"{source} used {used}"
            link_of[source] = used.pop()
        assert len(set(link_of.values())) == 3  # 20 sources spread over all three links

        result = runner.run(config, "--once", "ISP1", "ISP3")  # ISP2 marked down
        assert "netfilter: maps" in result.stderr
        after = lab3.connect_many(lab3.ns_lan, INET_HOST, 80, 30, sources=sources)
        assert after.failed == 0
        for source in sources:
            used = {isp for isp, n in after.counts_by_isp(source=source).items() if n}
            assert len(used) == 1, f"{source} used {used} after the failover"
            if link_of[source] == "ISP2":
                assert used != {"ISP2"}
            else:
                assert used == {link_of[source]}, f"{source} moved without need"


def test_enforced_rule_keeps_its_link_and_is_refused_when_down(lab: Lab, uplinkd: Uplinkd) -> None:
    config = uplinkd.write_config(LEGACY + ENFORCED)
    uplinkd.run(config, "--once")
    mail = lab.connect_many(lab.ns_lan, INET_HOST, 25, 100)
    assert mail.counts_by_isp() == {"ISP1": 100, "ISP2": 0}
    web = lab.connect_many(lab.ns_lan, INET_HOST, 80, 200)
    assert min(web.counts_by_isp().values()) > 50  # the default rule still balances

    uplinkd.run(config, "--once", "ISP2")
    mail = lab.connect_many(lab.ns_lan, INET_HOST, 25, 20, timeout=1.0)
    assert mail.ok == 0 and mail.failed == 20  # never leaked through ISP2
    assert mail.errors == {"refused": 20}  # refused at once (TCP reset), not left to time out
    web = lab.connect_many(lab.ns_lan, INET_HOST, 80, 100)
    assert web.counts_by_isp() == {"ISP1": 0, "ISP2": 100}


def test_router_originated_connections_are_balanced(lab: Lab, uplinkd: Uplinkd) -> None:
    uplinkd.run(uplinkd.write_config(LEGACY + TWO_LINKS.format(w1=1, w2=1)), "--once")
    result = lab.connect_many(lab.ns_router, INET_HOST, 80, 1000)
    assert result.failed == 0
    shares = result.shares()
    assert within(shares["ISP1"], 50, 5) and within(shares["ISP2"], 50, 5), shares


def test_port_forward_from_an_isp_address_reaches_the_lan_server(
    lab: Lab, uplinkd: Uplinkd
) -> None:
    lab.start_server(lab.ns_lan, LAN_SERVER, [80])
    text = (
        LEGACY
        + TWO_LINKS.format(w1=1, w2=1)
        + '\n[[forward]]\nport = 8080\nto = "192.168.10.35:80"\n'
    )
    uplinkd.run(uplinkd.write_config(text), "--once")
    for isp in (1, 2):
        result = lab.connect_many(lab.ns_inet, f"100.64.{isp}.2", 8080, 10)
        assert result.addresses == [INET_HOST] * 10, result.errors


def test_the_daemon_fails_over_and_back(lab: Lab, uplinkd: Uplinkd) -> None:
    config = uplinkd.write_config(MONITORED.format(extra_target=""))
    daemon = uplinkd.start(config, "--backend", "iptables")  # overrides the default nftables
    try:
        assert daemon.log.wait_for("link ISP2: init -> up"), daemon.log.text
        assert "UPLINKD-" in legacy_save(lab)
        assert wait_until(lambda: both_used(lab), 10)
        lab.set_upstream(1, up=False)  # carrier stays, nothing gets past ISP1
        assert daemon.log.wait_for("link ISP1: up -> down", 5), daemon.log.text
        assert wait_until(lambda: only_via(lab, "ISP2"), 5)
        lab.set_upstream(1, up=True)
        assert daemon.log.wait_for("link ISP1: down -> up", 15), daemon.log.text
        assert wait_until(lambda: both_used(lab), 5)
        assert "apply failed" not in daemon.log.text
    finally:
        lab.set_upstream(1, up=True)
        daemon.stop()
    assert len(generations(lab)) == 1  # the datapath stays after SIGTERM, one generation of it


def test_dry_run_is_iptables_legacy_restore_input(lab: Lab, uplinkd: Uplinkd) -> None:
    config = uplinkd.write_config(LEGACY + ENFORCED + "\n[firewall]\nenabled = true\n")
    text = uplinkd.run(config, "-d", "--part", "nft").stdout
    assert "*mangle\n" in text and "-j HMARK" not in text and "--probability" in text
    check = lab.run(
        lab.ns_router, "iptables-legacy-restore", "--test", "--noflush", stdin=text, check=False
    )
    assert check.returncode == 0, check.stderr
    assert "UPLINKD-" not in legacy_save(lab)  # -d changed nothing


def test_generations_switch_in_place_and_stop_leaves_foreign_rules(
    lab: Lab, uplinkd: Uplinkd
) -> None:
    router = lab.ns_router
    lab.run(
        router, "iptables-legacy", "-t", "mangle", "-A", "PREROUTING", "-p", "udp", "-j", "RETURN"
    )
    lab.run(router, "iptables-legacy", "-N", "FOREIGN")
    lab.run(router, "iptables-legacy", "-A", "FOREIGN", "-p", "tcp", "--dport", "9", "-j", "DROP")
    lab.run(router, "iptables-legacy", "-A", "FORWARD", "-j", "FOREIGN")
    before = foreign(legacy_save(lab))
    assert ("filter", ":FOREIGN -") in before
    try:
        config = uplinkd.write_config(LEGACY + TWO_LINKS.format(w1=1, w2=1))
        assert "netfilter: full" in uplinkd.run(config, "--once").stderr
        first = generations(lab)
        assert len(first) == 1
        assert "netfilter: none" in uplinkd.run(config, "--once").stderr  # read back: same
        assert "netfilter: maps" in uplinkd.run(config, "--once", "ISP1").stderr
        config.write_text(LEGACY + TWO_LINKS.format(w1=1, w2=2))
        assert "netfilter: full" in uplinkd.run(config, "--once", "ISP1").stderr
        (gen,) = generations(lab)
        assert gen == max(first) + 2  # each change built a new generation, the old one went
        saved = legacy_save(lab)
        mangle = saved.split("*mangle\n", 1)[1].split("COMMIT", 1)[0]
        assert '-A PREROUTING -m comment --comment "uplinkd structure=' in mangle
        prerouting = [line for line in mangle.splitlines() if line.startswith("-A PREROUTING")]
        assert f"UPLINKD-{gen}-PRE" in prerouting[0]  # switched in place, still first
        assert len([line for line in prerouting if "UPLINKD-" in line]) == 1
        assert foreign(saved) == before
        stopped = uplinkd.run(config, "--stop")
        assert "removed uplinkd's datapath" in stopped.stderr
        after = legacy_save(lab)
        assert "UPLINKD-" not in after
        assert foreign(after) == before  # other tools' legacy rules untouched
    finally:
        for table in ("mangle", "filter"):
            lab.run(router, "iptables-legacy", "-t", table, "-F", check=False)
        lab.run(router, "iptables-legacy", "-X", "FOREIGN", check=False)


def test_refuses_beside_iptables_nft_rules_and_auto_picks_nftables(
    lab: Lab, uplinkd: Uplinkd
) -> None:
    router = lab.ns_router
    lab.run(router, "iptables-nft", "-A", "FORWARD", "-p", "tcp", "--dport", "9", "-j", "DROP")
    try:
        config = uplinkd.write_config(LEGACY + TWO_LINKS.format(w1=1, w2=1))
        result = uplinkd.run(config, "--once", check=False)
        assert result.returncode == 1
        assert "the nf_tables variant of iptables manages rules" in result.stderr
        assert "table ip filter (rules: 1)" in result.stderr
        assert 'backend = "nftables"' in result.stderr
        assert "UPLINKD-" not in legacy_save(lab)  # refused before anything was added
        uplinkd.run(config, "--once", "--backend", "auto")
        assert "table inet uplinkd" in lab.run(router, "nft", "list", "tables").stdout
        # uplinkd's own nftables table is in the way of the legacy backend too.
        result = uplinkd.run(config, "--once", "--backend", "iptables", check=False)
        assert result.returncode == 1 and "--stop --backend nftables" in result.stderr
    finally:
        lab.run(router, "nft", "delete", "table", "ip", "filter", check=False)
