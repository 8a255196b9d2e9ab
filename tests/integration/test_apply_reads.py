"""One apply reads the kernel's netfilter state once, and what it reads does not grow with the
destinations fastest-response learned (issue 12: 4,600 learned destinations made each carrier
failover 0.5 s late, three listings of every set and map per apply; issue 13: one read).

The backends run in a namespace of the lab's router, through a worker script that records the
reads each apply makes (its own calls to libnftables, or the iptables backend's read_back).
"""

from __future__ import annotations

import json
import sys

import pytest
from uplinkd_lab.lab import Lab

from .conftest import TWO_LINKS, legacy_usable, needs_root

pytestmark = [needs_root, pytest.mark.lab]

CONFIG = TWO_LINKS.format(w1=1, w2=1) + '\n[default]\nmethod = "fastest-response"\n'

WORKER = r"""
import ipaddress, json, sys, tempfile
from pathlib import Path
from uplinkd.config import loading
from uplinkd.planning import planner
from uplinkd.datapath.backends import get_backend, ipt_ruleset, nft_ruleset
from uplinkd.datapath.backends.base import Learned
from uplinkd.planning.plan import LinkFacts

backend_name, text, learned = sys.argv[1], sys.argv[2], int(sys.argv[3])
ruleset = {"nftables": nft_ruleset, "iptables": ipt_ruleset}
with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "uplinkd.toml"
    path.write_text(text)
    config = loading.load(path)
facts = [
    LinkFacts(link.name, link.device, ipaddress.IPv4Interface(f"10.0.{i}.2/24"),
              ipaddress.IPv4Address(f"10.0.{i}.1"))
    for i, link in enumerate(config.links, start=1)
]
names = {link.name for link in config.links}
reads = []

def spied(backend):
    if backend.name == "nftables":
        run_json = backend.nft_json.run_json
        def recorded(command):
            reads.append(command)
            return run_json(command)
        backend.nft_json.run_json = recorded
    else:
        read_back = backend.read_back
        def recorded_back():
            reads.append("read_back")
            return read_back()
        backend.read_back = recorded_back
    return backend

def apply(backend, up):
    reads.clear()
    plan = planner.plan(config, facts, up, planner.Extras())
    transaction = backend.prepare(plan)
    transaction.check()
    kind = str(transaction.commit())
    held = get_backend(backend_name).read_back()  # read afresh: what the kernel holds now
    wanted = ruleset[backend_name].map_targets(plan)
    return {"kind": kind, "reads": list(reads), "holds_the_plan": held.maps == wanted}

backend = spied(get_backend(backend_name))
out = {"first": apply(backend, names)}
if learned:
    base = int(ipaddress.IPv4Address("198.18.0.0"))
    entries = {ipaddress.IPv4Address(base + i): Learned(1 + i % 2, 600) for i in range(learned)}
    backend.learn("rule_default", entries, replace=True)
out["down"] = apply(backend, names - {"ISP1"})
out["same"] = apply(backend, names - {"ISP1"})
restarted = spied(get_backend(backend_name))  # a daemon started again adopts the table
out["restart"] = apply(restarted, names)
out["after"] = apply(restarted, names - {"ISP2"})
backend.remove()
print(json.dumps(out))
"""


def applies(
    lab: Lab, backend: str, learned: int, text: str = CONFIG
) -> dict[str, dict[str, object]]:
    done = lab.run(lab.ns_router, sys.executable, "-c", WORKER, backend, text, str(learned))
    result: dict[str, dict[str, object]] = json.loads(done.stdout)
    return result


def test_nftables_reads_its_state_set_alone_whatever_was_learned(lab2: Lab) -> None:
    state = ["list set inet uplinkd uplinkd_state"]
    seen = applies(lab2, "nftables", learned=4000)
    assert all(step.pop("holds_the_plan") for step in seen.values()), seen  # maps as planned
    assert seen["first"] == {"kind": "full", "reads": state}  # no table yet: rebuilt
    assert seen["down"] == {"kind": "maps", "reads": state}  # before: 6 listings of everything
    assert seen["same"] == {"kind": "none", "reads": state}
    # A restart lists the maps once to adopt them (the learned ones with them), then not again.
    assert seen["restart"]["kind"] == "maps"
    assert seen["restart"]["reads"] == [*state, "list sets inet", "list maps inet"]
    assert seen["after"] == {"kind": "maps", "reads": state}


def test_iptables_reads_back_once_per_apply(lab2: Lab) -> None:
    legacy_usable(lab2)
    seen = applies(lab2, "iptables", learned=0, text=TWO_LINKS.format(w1=1, w2=1))
    for step in ("first", "down", "same", "restart", "after"):
        assert seen[step]["reads"] == ["read_back"], (step, seen)  # before: 3
        assert seen[step]["holds_the_plan"], (step, seen)
    assert [seen[step]["kind"] for step in ("first", "down", "same")] == ["full", "maps", "none"]


ROUTING = r"""
import asyncio, ipaddress, json, subprocess, sys, tempfile
from pathlib import Path
from pyroute2 import AsyncIPRoute
from uplinkd.config import loading
from uplinkd.datapath.apply import Datapath
from uplinkd.datapath.backends import get_backend
from uplinkd.facts import discovery
from uplinkd.planning import planner

text = sys.argv[1]

def ours():
    shown = subprocess.run(["ip", "-4", "route", "show", "table", "all", "proto", "213"],
                           capture_output=True, text=True, check=True).stdout
    rules = subprocess.run(["ip", "-4", "rule", "show"], capture_output=True, text=True,
                           check=True).stdout
    return sorted(shown.splitlines()), [r for r in rules.splitlines() if "proto 213" in r]

async def main():
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "uplinkd.toml"
        path.write_text(text)
        config = loading.load(path)
    names = {link.name for link in config.links}
    async with AsyncIPRoute() as ipr:
        facts, _ = await discovery.discover(ipr, config.links)
        def plan(up):
            return planner.plan(config, facts, up, planner.Extras())
        datapath = Datapath(get_backend("nftables"))
        steps = []
        for up in (names, names - {"ISP1"}, {"ISP1"}, names):
            report = await datapath.apply(ipr, plan(up))
            steps.append([report.routing.routes_added, report.routing.routes_removed, ours()])
        fresh = Datapath(get_backend("nftables"))  # the last plan put in by a full sync
        await fresh.remove(ipr)
        await fresh.apply(ipr, plan(names))
        whole = ours()
        await fresh.remove(ipr)
    print(json.dumps({"steps": steps, "whole": whole}))

asyncio.run(main())
"""


def test_a_link_state_change_writes_only_the_routes_that_move(lab2: Lab) -> None:
    """After the first apply, a link state change writes the routes that differ (table base+0
    follows the first link up: ISP2 alone, ISP1 alone, both again) without reading every route
    back, and leaves the kernel as a whole sync would (a first version left a stale connected
    route in table 200: its delete did not match)."""
    text = TWO_LINKS.format(w1=1, w2=1)
    done = lab2.run(lab2.ns_router, sys.executable, "-c", ROUTING, text)
    seen = json.loads(done.stdout)
    first, *changes = seen["steps"]
    assert first[0] >= 6  # the first apply put every route in
    # Table 200 moves to the first link up: its connected route and default route, and the
    # old connected route goes when the subnet differs.
    assert [(added, removed) for added, removed, _ in changes] == [(2, 1), (2, 1), (0, 0)]
    assert changes[-1][2] == seen["whole"]  # what a full sync of the same plan leaves
