"""The legacy iptables backend in the namespace lab: the daemon failing over with it, its dry
run, its atomic generations, `--stop`, and its refusal beside iptables-nft. test_balancing runs
its core traffic tests (weights, failover mode, persistence, enforced, the router's own
connections, port forwards) with both backends.

Root only (conftest.needs_root); skipped with the reason where the legacy tables cannot be used:
python-iptables missing, the legacy x_tables modules unavailable, or iptables-nft rules present.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from uplinkd_lab.lab import INET_HOST, Lab

from .conftest import TWO_LINKS, Uplinkd, legacy_usable, needs_root, wait_until
from .test_balancing import ENFORCED
from .test_failover import MONITORED, both_used, only_via

pytestmark = [needs_root, pytest.mark.lab]

LEGACY = 'backend = "iptables"\n'
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


def stop(lab: Lab) -> None:
    argv = [sys.executable, "-m", "uplinkd.cli", "--stop"]
    for backend in ("iptables", "nftables"):
        lab.run(lab.ns_router, *argv, "--backend", backend, check=False)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with Lab(isps=2) as built:
        built.start_server(built.ns_inet, INET_HOST)
        yield legacy_usable(built)


@pytest.fixture
def uplinkd(lab: Lab, tmp_path: Path) -> Iterator[Uplinkd]:
    yield Uplinkd(lab, tmp_path)
    stop(lab)


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
