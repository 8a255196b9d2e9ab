"""An admin's first debugging commands work on what uplinkd applies (root; conftest.needs_root).

Debian 12's nft 1.0.6 segfaulted (exit 139) listing a map declared `typeof jhash ...`, the
persistence method's map: `nft list ruleset`, `list table`, `list maps`, `-a` and `-s` all
crashed, only `nft -j` worked. For each method (persistence by each hash), with the firewall and
port forwards, after a full apply and after a map update, every listing must work and load back
with `nft -c -f -` (check mode: nothing is committed), after `flush ruleset` as a saved
/etc/nftables.conf would and on top of the ruleset in force. conftest's Uplinkd checks `nft list
ruleset` the same way after every run and every daemon apply of the other tests.
"""

from __future__ import annotations

import json

import pytest
from uplinkd_lab.lab import INET_HOST, Lab

from .conftest import Uplinkd, check_nft_readback, needs_root, wait_until

pytestmark = [needs_root, pytest.mark.lab]

LINKS = """
[[link]]
name = "ISP1"
device = "wan1"
weight = 1
bandwidth_mbps = { down = 100, up = 100 }

[[link]]
name = "ISP2"
device = "wan2"
weight = 3
bandwidth_mbps = { down = 100, up = 100 }

[[lan]]
name = "LAN"
device = "lan0"

[firewall]
enabled = true
forwarding_groups = [["LAN", "ISP1", "ISP2"]]

[[forward]]
port = 8080
to = "192.168.10.35:80"

[[forward]]
port = 2222
to = "192.168.10.35:22"
links = ["ISP2"]
"""

# case -> the method and the other keys its rules need
METHODS = {
    "weighted": ("weighted", ""),
    "priority": ("priority", ""),
    "overflow": ("overflow", ""),
    "persistence-source": ("persistence", 'by = "source"'),
    "persistence-destination": ("persistence", 'by = "destination"'),
    "persistence-source+destination": ("persistence", 'by = "source+destination"'),
    "least-used": ("least-used", ""),
    "lowest-latency": ("lowest-latency", ""),
    "enforced": ("enforced", 'links = ["ISP1"]'),
    "fastest-response": ("fastest-response", "cache_seconds = 60"),
}

# What an admin types first. The whole listings must load back into an empty ruleset too; the
# partial ones (maps and sets without the chains their verdicts name) only beside the rest.
WHOLE = (
    ("list", "ruleset"),
    ("-a", "list", "ruleset"),
    ("-s", "list", "ruleset"),
    ("list", "table", "inet", "uplinkd"),
)
PARTIAL = (("list", "maps"), ("list", "sets"))


def method_keys(case: str) -> str:
    method, keys = METHODS[case]
    return f'method = "{method}"\n{keys}\n'


def rule(name: str, case: str, port: int) -> str:
    match = f'match = {{ proto = "tcp", dport = [{port}] }}'
    return f'\n[[rule]]\nname = "{name}"\n{match}\n{method_keys(case)}'


def config_for(case: str) -> str:
    """The links, firewall and forwards, a rule for port 80 and the default rule by one case."""
    return LINKS + rule("web", case, 80) + f"\n[default]\n{method_keys(case)}"


def check_every_listing(lab: Lab, *, stable: bool = True) -> None:
    """Each listing works. The whole ones load back after `flush ruleset`; with `stable` (no
    daemon that could change a map meanwhile), all also load on top of the ruleset in force."""
    for listing in WHOLE:
        check_nft_readback(lab, *listing)
    for listing in (*WHOLE, *PARTIAL):
        check_nft_readback(lab, *listing, live=True, load=stable)
    assert json.loads(lab.run(lab.ns_router, "nft", "-j", "list", "ruleset").stdout)["nftables"]


def test_the_configurations_are_what_they_claim() -> None:
    text = config_for("persistence-source+destination")
    assert text.count('method = "persistence"') == 2
    assert text.count('by = "source+destination"') == 2
    assert config_for("enforced").count('links = ["ISP1"]') == 2


@pytest.mark.parametrize("case", METHODS)
def test_nft_lists_and_reloads_what_each_method_applies(
    lab2: Lab, uplinkd: Uplinkd, case: str
) -> None:
    config = uplinkd.write_config(config_for(case))
    uplinkd.run(config, "--once")  # a full apply
    assert "table inet uplinkd" in lab2.run(lab2.ns_router, "nft", "list", "tables").stdout
    check_every_listing(lab2)
    web = lab2.connect_many(lab2.ns_lan, INET_HOST, 80, 10)
    assert web.failed == 0, web.errors  # the maps as declared still pick the links
    uplinkd.run(config, "--once", "ISP2")  # ISP1 marked down: only the maps are rewritten
    check_every_listing(lab2)


def test_nft_lists_what_a_daemon_applies_and_learns(lab2: Lab, uplinkd: Uplinkd) -> None:
    """Every method in one configuration, in the daemon: checked after each apply (conftest),
    and once fastest-response has learned destinations (elements with timeouts)."""
    rules = "".join(rule(f"r{i}", case, 9000 + i) for i, case in enumerate(METHODS))
    # race_private: the lab's Internet host has a documentation address (203.0.113.10).
    default = 'method = "fastest-response"\ncache_seconds = 60\nrace_private = true\n'
    text = LINKS + rules + "\n[default]\n" + default
    daemon = uplinkd.start(uplinkd.write_config(text), "-v")
    assert daemon.log.wait_for("link ISP1: init -> up", 15), daemon.log.text
    assert daemon.log.wait_for("link ISP2: init -> up", 15), daemon.log.text
    check_every_listing(lab2, stable=False)

    def learned() -> bool:
        lab2.connect_many(lab2.ns_lan, INET_HOST, 80, 3, timeout=2.0)
        listed = lab2.run(
            lab2.ns_router, "nft", "-j", "list", "map", "inet", "uplinkd", "fr_rule_default"
        )
        items = json.loads(listed.stdout)["nftables"]
        return bool(next(item["map"] for item in items if "map" in item).get("elem"))

    assert wait_until(learned, 20, step=0.5), daemon.log.text
    check_every_listing(lab2, stable=False)
    daemon.stop()  # raises what the checks after each apply found
