"""Both backends render the same Plan: the same facts are read out of the nftables text and the
iptables-restore text (marks, NAT, rules and their buckets, forwards, firewall). No kernel needed.
"""

from __future__ import annotations

import ipaddress
import math
import re
import shlex
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from uplinkd.config.model import (
    Firewall,
    HashBy,
    Match,
    Method,
    Nat,
    PortForward,
    PortRange,
    Rule,
)
from uplinkd.datapath.backends import ipt_ruleset, iptables, nft_ruleset
from uplinkd.datapath.backends.ipt_ruleset import refuse_mark
from uplinkd.datapath.backends.iptables import IptablesBackend, iptables_nft_tables
from uplinkd.errors import ApplyError, BackendUnavailableError, HookError
from uplinkd.planning import planner
from uplinkd.planning.plan import UNREACHABLE, HookLine, Plan, Selector
from uplinkd.runtime.fastest import MAX_RACES

from .test_planner import config, facts

IP = ipaddress.IPv4Address
NET = ipaddress.IPv4Network


@dataclass
class Facts:
    marks: dict[str, int] = field(default_factory=dict)  # link name -> mark
    nat: dict[str, str] = field(default_factory=dict)  # device -> "masquerade" | "snat <ip>"
    order: list[str] = field(default_factory=list)  # rules (dispatch names) as classified
    # rule -> (selector, bucket count, hash seed, targets: per bucket, or sorted where random)
    buckets: dict[str, tuple[str, int, int, tuple[int, ...]]] = field(default_factory=dict)
    forwards: set[tuple[str, str, str, str]] = field(default_factory=set)  # dev, proto, port, to
    firewall: bool = False
    services: set[tuple[str, str, int]] = field(default_factory=set)  # LAN device, proto, port
    pairs: set[tuple[str, str]] = field(default_factory=set)  # forwarding allowed in -> out
    icmp_rate: int = 0


def expected(plan: Plan) -> Facts:
    """The facts read straight from the Plan."""
    found = Facts(marks={link.name: link.mark for link in plan.links})
    found.nat = {
        link.device: "masquerade" if link.nat is Nat.MASQUERADE else f"snat {link.address.ip}"
        for link in plan.links
        if link.nat is not Nat.NONE
    }
    for d in plan.dispatches:
        found.order.append(d.name)
        hashed = d.selector is not Selector.RANDOM
        targets = d.targets if hashed else tuple(sorted(d.targets))
        found.buckets[d.name] = (d.selector.value, d.buckets, d.seed if hashed else 0, targets)
    for fw in plan.forwards:
        to = str(fw.host) + (f":{fw.host_port}" if fw.host_port else "")
        for link in plan.links:
            if not fw.links or link.name in fw.links:
                found.forwards.add((link.device, fw.proto, str(fw.port), to))
    if plan.firewall.enabled:
        found.firewall, found.icmp_rate = True, plan.firewall.icmp_rate_per_second
        ssh = [("tcp", 22)] if plan.firewall.ssh_from_lan else []
        for lan in plan.lan_devices:
            wanted = [("udp", 53), ("udp", 67), ("udp", 123), ("tcp", 53), *ssh]
            found.services |= {(lan, proto, port) for proto, port in wanted}
        for group in plan.firewall_groups:
            for device in set(group) & set(plan.lan_devices):
                found.pairs |= {(device, other) for other in group if other != device}
    return found


def _chain(text: str, name: str) -> str:
    return text.split(f"\tchain {name} {{\n", 1)[1].split("\n\t}", 1)[0] if name in text else ""


def _names(text: str) -> list[str]:
    return re.findall(r'"([^"]+)"', text) if "{" in text else [text.strip('"')]


_NFT_SELECTORS = {
    "numgen random": "random",
    "jhash ip saddr": "source",
    "jhash ip daddr": "destination",
    "jhash ip saddr . ip daddr": "source+destination",
}


def nft_facts(plan: Plan) -> Facts:
    text = nft_ruleset.render(plan)
    found = Facts()
    for name, mark in re.findall(
        r'chain link_\d+ \{\n\t\tcomment "new connections via (\S+)"\n'
        r"\t\tmeta mark set meta mark and 0x\w+ or (0x\w+)",
        text,
    ):
        found.marks[name] = int(mark, 16)
    for device, action in re.findall(r'oifname "(\S+)" (masquerade|snat ip to \S+)', text):
        found.nat[device] = action.replace("snat ip to", "snat")
    elements = dict(re.findall(r"add element inet uplinkd (\w+) \{ ([^}]*) \}", text))
    for selector, count, seed, map_name, name in re.findall(
        r'(numgen random|jhash [^\n]*?) mod (\d+)(?: seed (0x\w+))? vmap @(\w+) comment "(\w+)"',
        _chain(text, "classify"),
    ):
        found.order.append(name)
        pairs = [item.split(" : goto ") for item in elements[map_name].split(", ")]
        by_bucket = {int(b): 0 if c == "no_link" else int(c.split("_")[1]) for b, c in pairs}
        targets = tuple(by_bucket[b] for b in sorted(by_bucket))
        kind = _NFT_SELECTORS[selector.strip()]
        targets = tuple(sorted(targets)) if kind == "random" else targets
        found.buckets[name] = (kind, int(count), int(seed or "0", 16), targets)
    for devices, proto, port, to in re.findall(
        r"iifname (\S+|\{ [^}]+ \}) (tcp|udp) dport (\S+) dnat ip to (\S+)",
        _chain(text, "nat_prerouting"),
    ):
        found.forwards |= {(device, proto, port, to) for device in _names(devices)}
    found.firewall = "policy drop" in _chain(text, "filter_input")
    for device, proto, ports in re.findall(
        r'iifname "(\S+)" (tcp|udp) dport (\{ [^}]+ \}|\d+) accept', _chain(text, "filter_input")
    ):
        found.services |= {(device, proto, int(p)) for p in re.findall(r"\d+", ports)}
    for device, others in re.findall(
        r'iifname "(\S+)" oifname (\S+|\{ [^}]+ \}) accept', _chain(text, "filter_forward")
    ):
        found.pairs |= {(device, other) for other in _names(others)}
    rate = re.search(r"limit rate (\d+)/second", text)
    found.icmp_rate = int(rate.group(1)) if rate else 0
    return found


def ipt_rules(text: str) -> dict[str, list[list[str]]]:
    """iptables-restore text as chain -> rules (arguments), per table "table/chain"."""
    chains: dict[str, list[list[str]]] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith(":"):
            chains[f"{table}/{line[1:].split()[0]}"] = []
        elif line.startswith(("-A ", "-I ")):
            args = shlex.split(line)
            chain = f"{table}/{args[1]}"
            chains.setdefault(chain, []).append(args[3:] if args[0] == "-I" else args[2:])
    return chains


def _opt(args: list[str], name: str) -> str:
    return args[args.index(name) + 1] if name in args else ""


def _link(chain: str) -> int:
    part = chain.rsplit("-", 1)[1]
    return int(part[1:]) if part[1:].isdigit() else UNREACHABLE


_HMARK = {"src": "source", "dst": "destination", "src,dst": "source+destination"}


def _ipt_buckets(found: Facts, chains: dict[str, list[list[str]]]) -> None:
    """Rules in classification order, and the buckets each dispatch chain picks from."""
    for args in chains["mangle/UPLINKD-1-CLASSIFY"]:
        rules = chains["mangle/" + _opt(args, "-g")]
        name = _opt(rules[0], "--comment").split()[0]
        if name in found.buckets:
            continue  # one rule of several iptables rules for one match
        found.order.append(name)
        if "HMARK" in rules[0]:
            count = int(_opt(rules[0], "--hmark-mod"))
            assert _opt(rules[0], "--hmark-proto-mask") == "0"  # addresses only, like jhash
            for bucket, rule in enumerate(rules[1 : 1 + count]):
                assert _opt(rule, "--mark") == str(bucket)
            targets = tuple(_link(_opt(rule, "-g")) for rule in rules[1 : 1 + count])
            seed = int(_opt(rules[0], "--hmark-rnd"), 16)
            found.buckets[name] = (_HMARK[_opt(rules[0], "--hmark-tuple")], count, seed, targets)
            continue
        count = int(_opt(rules[0], "--comment").split()[1].split("/")[1])
        held: list[int] = []
        left = 1.0  # what the earlier rules of the cascade left
        for rule in rules:
            chance = float(_opt(rule, "--probability") or 1)
            held += [_link(_opt(rule, "-g"))] * round(left * chance * count)
            left *= 1 - chance
        found.buckets[name] = ("random", count, 0, tuple(sorted(held)))


def ipt_facts(plan: Plan) -> Facts:
    chains = ipt_rules(ipt_ruleset.render(plan))
    found = Facts()
    for chain, rules in chains.items():
        if re.fullmatch(r"mangle/UPLINKD-1-L\d+", chain):
            name = _opt(rules[0], "--comment").removeprefix("new connections via ")
            found.marks[name] = int(_opt(rules[0], "--set-xmark").split("/")[0], 16)
    for args in chains["nat/UPLINKD-1-SNAT"]:
        target = _opt(args, "-j").lower()
        found.nat[_opt(args, "-o")] = (
            f"snat {_opt(args, '--to-source')}" if target == "snat" else target
        )
    _ipt_buckets(found, chains)
    for args in chains["nat/UPLINKD-1-DNAT"]:
        port = _opt(args, "--dport").replace(":", "-")
        found.forwards.add(
            (_opt(args, "-i"), _opt(args, "-p"), port, _opt(args, "--to-destination"))
        )
    inbound = chains.get("filter/UPLINKD-1-IN", [])
    found.firewall = bool(inbound) and inbound[-1] == ["-j", "DROP"]
    for args in inbound:
        ports = _opt(args, "--dport") or _opt(args, "--dports")
        if _opt(args, "-i") not in ("", "lo") and args[-1] == "RETURN":
            proto = _opt(args, "-p")
            found.services |= {(_opt(args, "-i"), proto, int(p)) for p in ports.split(",")}
        if "--limit" in args:
            found.icmp_rate = int(_opt(args, "--limit").split("/")[0])
    for args in chains["filter/UPLINKD-1-FWD"]:
        if "-o" in args and args[-1] == "RETURN":
            found.pairs.add((_opt(args, "-i"), _opt(args, "-o")))
    return found


RENDERERS: dict[str, Callable[[Plan], Facts]] = {"nftables": nft_facts, "iptables": ipt_facts}


def weighted() -> Plan:
    cfg = config({"ISP1": 1, "ISP2": 3})
    return planner.plan(cfg, facts("ISP1", "ISP2"), {"ISP1", "ISP2"})


def weighted_three_one_down() -> Plan:
    cfg = config({"ISP1": 1, "ISP2": 3, "ISP3": 2})
    return planner.plan(cfg, facts("ISP1", "ISP2", "ISP3"), {"ISP1", "ISP3"})


def priority_and_enforced_down() -> Plan:
    mail = Rule("mail", Method.ENFORCED, Match(proto="tcp", dport=(PortRange(25, 25),)), ("ISP2",))
    cfg = config({"ISP1": 1, "ISP2": 1}, rules=(mail,), default=Rule("default", Method.PRIORITY))
    return planner.plan(cfg, facts("ISP1", "ISP2"), {"ISP1"})


def persistence(by: HashBy) -> Callable[[], Plan]:
    def build() -> Plan:
        web = Match(src=(NET("192.168.10.0/24"),), dport=(PortRange(443, 443), PortRange(80, 89)))
        rule = Rule("sticky", Method.PERSISTENCE, web, by=by)
        cfg = config({"ISP1": 1, "ISP2": 3, "ISP3": 2}, rules=(rule,))
        return planner.plan(cfg, facts("ISP1", "ISP2", "ISP3"), {"ISP1", "ISP3"})

    return build


def nat_forwards_firewall() -> Plan:
    cfg = config(
        {"ISP1": 1, "ISP2": 1, "ISP3": 1},
        forwards=(
            PortForward(PortRange(80, 80), IP("192.168.10.35")),
            PortForward(PortRange(2222, 2222), IP("192.168.10.35"), host_port=22, links=("ISP2",)),
            PortForward(PortRange(6000, 6010), IP("192.168.10.36"), proto="udp"),
        ),
        firewall=Firewall(
            enabled=True, forwarding_groups=(("LAN", "ISP1", "ISP2"),), icmp_rate_per_second=5
        ),
    )
    nats = (Nat.MASQUERADE, Nat.SNAT, Nat.NONE)
    links = tuple(replace(link, nat=nat) for link, nat in zip(cfg.links, nats, strict=True))
    return planner.plan(replace(cfg, links=links), facts("ISP1", "ISP2", "ISP3"), {"ISP1"})


def firewall_without_ssh() -> Plan:
    cfg = config({"ISP1": 1}, firewall=Firewall(enabled=True, ssh_from_lan=False))
    return planner.plan(cfg, facts("ISP1"), {"ISP1"})


def shared_maps() -> Plan:
    """Rules that pick buckets alike share a map: web and mail with the default (one map),
    the two persistence rules (another), the two priority rules over the links in their
    priority order (a third); the rule over two links of three, and the priority rule with its
    own order, have their own."""
    sticky = Rule("sticky", Method.PERSISTENCE, Match(proto="udp"), by=HashBy.SOURCE)
    rules = (
        Rule("web", Method.WEIGHTED, Match(proto="tcp", dport=(PortRange(443, 443),))),
        sticky,
        Rule("mail", Method.WEIGHTED, Match(proto="tcp", dport=(PortRange(25, 25),))),
        replace(sticky, name="sticky2", match=Match(proto="icmp")),
        Rule("pair", Method.WEIGHTED, Match(proto="tcp"), links=("ISP1", "ISP3")),
        Rule("voip", Method.PRIORITY, Match(proto="udp", dport=(PortRange(5060, 5060),))),
        Rule("sip", Method.PRIORITY, Match(proto="tcp", dport=(PortRange(5060, 5060),))),
        Rule("other", Method.PRIORITY, Match(proto="gre"), links=("ISP3", "ISP1")),
    )
    cfg = config({"ISP1": 1, "ISP2": 3, "ISP3": 2}, rules=rules)
    return planner.plan(cfg, facts("ISP1", "ISP2", "ISP3"), {"ISP1", "ISP3"})


PLANS: dict[str, Callable[[], Plan]] = {
    "weighted": weighted,
    "weighted-three-one-down": weighted_three_one_down,
    "priority-and-enforced-down": priority_and_enforced_down,
    **{f"persistence-{by.value}": persistence(by) for by in HashBy},
    "nat-forwards-firewall": nat_forwards_firewall,
    "firewall-without-ssh": firewall_without_ssh,
    "shared-maps": shared_maps,
}


@pytest.mark.parametrize("backend", RENDERERS)
@pytest.mark.parametrize("case", PLANS)
def test_rendered_facts_are_the_plans(backend: str, case: str) -> None:
    plan = PLANS[case]()
    assert RENDERERS[backend](plan) == expected(plan)


def test_rules_that_pick_alike_share_one_nftables_map() -> None:
    plan = shared_maps()
    owners = {d.name: d.map_name for d in plan.dispatches}
    assert owners == {
        "rule_0_web": "rule_0_web",
        "rule_1_sticky": "rule_1_sticky",
        "rule_2_mail": "rule_0_web",
        "rule_3_sticky2": "rule_1_sticky",
        "rule_4_pair": "rule_4_pair",
        "rule_5_voip": "rule_5_voip",
        "rule_6_sip": "rule_5_voip",
        "rule_7_other": "rule_7_other",
        "rule_default": "rule_0_web",
    }
    owners = {"rule_0_web", "rule_1_sticky", "rule_4_pair", "rule_5_voip", "rule_7_other"}
    assert set(nft_ruleset.map_targets(plan)) == owners
    assert nft_ruleset.map_targets(plan)["rule_7_other"] == (3,)  # ISP2 is down
    assert nft_ruleset.map_targets(plan)["rule_5_voip"] == (1,)
    text = nft_ruleset.render(plan)
    assert len(re.findall(r"^\tmap rule_", text, re.M)) == 5
    assert 'comment "rule web and 2 more"' in text
    assert len(re.findall(r"^add element inet uplinkd rule_", text, re.M)) == 5


def test_the_cases_cover_what_they_claim() -> None:
    three = expected(weighted_three_one_down())
    assert three.buckets["rule_default"][1] == 60
    assert Counter(three.buckets["rule_default"][3]) == {1: 20, 3: 40}
    down = expected(priority_and_enforced_down())
    assert down.buckets["rule_0_mail"][3] == (UNREACHABLE,)
    nat = expected(nat_forwards_firewall())
    assert nat.nat == {"wan1": "masquerade", "wan2": "snat 10.0.2.2"}
    assert ("wan2", "tcp", "2222", "192.168.10.35:22") in nat.forwards
    assert ("wan1", "tcp", "2222", "192.168.10.35:22") not in nat.forwards


# --- what the distribution's nft can list -------------------------------------------------------


def every_method() -> Plan:
    """A rule of each method (persistence by each hash), port forwards and the firewall."""
    rules: list[Rule] = []
    for method in Method:
        for by in HashBy if method is Method.PERSISTENCE else (HashBy.SOURCE,):
            port = PortRange(1000 + len(rules), 1000 + len(rules))
            links = ("ISP2",) if method is Method.ENFORCED else ()
            name = method.value + (f"-by-{by.name.lower()}" if method is Method.PERSISTENCE else "")
            rules.append(Rule(name, method, Match(proto="tcp", dport=(port,)), links, by=by))
    cfg = config(
        {"ISP1": 1, "ISP2": 3},
        rules=tuple(rules),
        forwards=(PortForward(PortRange(80, 80), IP("192.168.10.35")),),
        firewall=Firewall(enabled=True, forwarding_groups=(("LAN", "ISP1", "ISP2"),)),
    )
    return planner.plan(cfg, facts("ISP1", "ISP2"), {"ISP1", "ISP2"})


# The declarations Debian 12's nft 1.0.6 lists back (checked in the lab: test_nft_readback). A
# map declared `typeof jhash ...` loads, then makes `nft list ruleset` (and `list table`, `list
# maps`, -a, -s) crash with a segfault; `type mark` and `typeof meta mark` are refused for a
# jhash or numgen key, and `type integer` is "unqualified".
_LISTABLE_KEYS = re.compile(
    r"type mark|type ipv4_addr|type ipv4_addr : verdict|typeof numgen random mod (\d+) : verdict"
)


@pytest.mark.parametrize("case", [*PLANS, "fastest", "every-method"])
def test_every_set_and_map_is_declared_with_a_key_nft_can_list(case: str) -> None:
    plan = {**PLANS, "fastest": fastest, "every-method": every_method}[case]()
    text = nft_ruleset.render(plan)
    declared = dict(re.findall(r"^\t(?:map|set) (\w+) \{\n\t\t(type[^\n]*)\n", text, re.M))
    assert declared and len(declared) == len(re.findall(r"^\t(?:map|set) ", text, re.M))
    assert "typeof jhash" not in text
    for name, key in declared.items():
        assert _LISTABLE_KEYS.fullmatch(key), f"{case}: {name} is declared {key!r}"
    # Every bucket lookup, jhash or numgen, goes to a map of its own modulus.
    lookups = re.findall(r"(numgen random|jhash [^\n]*?) mod (\d+)(?: seed \w+)? vmap @(\w+)", text)
    assert len(lookups) == len(plan.dispatches)
    for _, modulus, name in lookups:
        assert declared[name] == f"typeof numgen random mod {modulus} : verdict"


def test_every_method_case_covers_each_method_and_hash() -> None:
    plan = every_method()
    names = {d.rule for d in plan.dispatches}
    assert all(any(name.startswith(method.value) for name in names) for method in Method)
    assert {d.selector for d in plan.dispatches} == set(Selector)
    assert any(d.cache_s is not None for d in plan.dispatches)  # fastest-response learns
    assert plan.forwards and plan.firewall.enabled


# --- the iptables rendering on its own ------------------------------------------------------------


def test_iptables_chains_are_declared_named_within_limits_and_one_generation() -> None:
    for case in PLANS.values():
        text = ipt_ruleset.render(case())
        declared = set(re.findall(r"^:(\S+) ", text, re.M))
        used = set(re.findall(r"-[jg] (UPLINKD-\S+)", text))
        assert used <= declared
        assert all(len(name) <= 28 and name.startswith("UPLINKD-1-") for name in declared)
        assert text.count("COMMIT\n") == 3 and "ACCEPT" not in text  # goto/RETURN, never ACCEPT


def test_iptables_cascade_probabilities_give_the_exact_shares() -> None:
    chains = ipt_rules(ipt_ruleset.render(weighted_three_one_down()))
    (dispatch,) = (rules for name, rules in chains.items() if name.endswith("-D0"))
    left, shares = 1.0, {}
    for rule in dispatch:
        chance = float(_opt(rule, "--probability") or 1)
        shares[_opt(rule, "-g")] = left * chance
        left *= 1 - chance
    assert [round(s, 9) for s in shares.values()] == [round(1 / 3, 9), round(2 / 3, 9)]
    assert math.isclose(sum(shares.values()), 1.0)


def test_iptables_structure_is_independent_of_link_state() -> None:
    cfg = config({"ISP1": 1, "ISP2": 3})
    f = facts("ISP1", "ISP2")
    both, one = (planner.plan(cfg, f, up) for up in ({"ISP1", "ISP2"}, {"ISP2"}))
    assert ipt_ruleset.structure_digest(both) == ipt_ruleset.structure_digest(one)
    assert ipt_ruleset.render(both) != ipt_ruleset.render(one)
    assert ipt_ruleset.map_targets(one) == {"rule_default": (2,) * 12}
    changed = planner.plan(config({"ISP1": 1, "ISP2": 2}), f, {"ISP1", "ISP2"})
    assert ipt_ruleset.structure_digest(changed) != ipt_ruleset.structure_digest(both)


def test_refused_connections_have_their_own_mark_within_the_mask() -> None:
    assert refuse_mark(0x0000FF00) == 0xFE00  # id 254; 255 stays free for other tools
    assert refuse_mark(0x00F00000) == 0xE00000
    cfg = config({"ISP1": 1, "ISP2": 1}, mark_mask=0x00000300)  # ids 1, 2 (3 is all-ones)
    plan = planner.plan(cfg, facts("ISP1", "ISP2"), {"ISP1", "ISP2"})
    with pytest.raises(ApplyError, match="mark_mask"):
        ipt_ruleset.render(plan)


def test_iptables_backend_refuses_nftables_hook_lines() -> None:
    plan = weighted()
    hooked = replace(plan, nft_hook_lines=(HookLine("/f/01", 3, "add x"),))
    with pytest.raises(HookError, match="/f/01:3: nftables commands need the nftables backend"):
        IptablesBackend().prepare(hooked)


def _nft(kind: str, **fields: Any) -> dict[str, Any]:
    return {kind: {"family": "ip", **fields}}


def test_iptables_nft_detection_needs_its_chain_names_and_a_rule_or_drop_policy() -> None:
    hook = {"hook": "forward", "type": "filter", "prio": 0}
    managed = [
        _nft("table", name="filter"),
        _nft("chain", table="filter", name="FORWARD", policy="accept", **hook),
        _nft("rule", table="filter", chain="FORWARD", expr=[]),
        _nft("chain", table="nat", name="POSTROUTING", policy="accept", **hook),  # empty
        _nft("chain", table="raw", name="PREROUTING", policy="drop", **hook),
    ]
    assert iptables_nft_tables(managed) == ["table ip filter (rules: 1)", "table ip raw (rules: 1)"]
    native = [  # nft's own style: lower-case chain names, even in a table called filter
        _nft("chain", table="filter", name="forward", policy="drop", **hook),
        _nft("rule", table="filter", chain="forward", expr=[]),
    ]
    assert iptables_nft_tables(native) == []
    inet = [{**item, "chain": {**item["chain"], "family": "inet"}} for item in managed[1:2]]
    assert iptables_nft_tables(inet) == []


def test_iptables_rule_arguments_become_python_iptables_calls() -> None:
    calls: list[tuple[str, ...]] = []

    class Module:
        def __init__(self, kind: str, name: str) -> None:
            self.kind, self.name = kind, name

        def set_parameter(self, name: str, value: str) -> None:
            calls.append((self.kind, self.name, name, value))

    class FakeRule:
        def __setattr__(self, name: str, value: str) -> None:
            calls.append(("rule", name, value))

        def create_match(self, name: str) -> Module:
            return Module("match", name)

        def create_target(self, name: str, *, goto: bool) -> Module:
            calls.append(("target", name, "goto" if goto else "jump"))
            return Module("target", name)

    class Lib:
        Rule = FakeRule

    args = "-i lan0 -p tcp -m mark ! --mark 0x0/0xff00 -m comment --comment 'a b'"
    iptables._iptc_rule(Lib, [*shlex.split(args), "-j", "CONNMARK", "--restore-mark"])
    iptables._iptc_rule(Lib, ["-g", "UPLINKD-1-L1"])
    assert calls == [
        ("rule", "in_interface", "lan0"),
        ("rule", "protocol", "tcp"),
        ("match", "mark", "mark", "!0x0/0xff00"),
        ("match", "comment", "comment", "a b"),
        ("target", "CONNMARK", "jump"),
        ("target", "CONNMARK", "restore-mark", ""),
        ("target", "UPLINKD-1-L1", "goto"),
    ]


# --- fastest-response -----------------------------------------------------------------------------


def fastest() -> Plan:
    web = Rule("web", Method.FASTEST_RESPONSE, Match(proto="tcp"), cache_seconds=120)
    cfg = config({"ISP1": 1, "ISP2": 3}, rules=(web,))
    return planner.plan(cfg, facts("ISP1", "ISP2"), {"ISP1", "ISP2"})


def test_fastest_response_learns_in_nftables_before_its_weighted_buckets() -> None:
    plan = fastest()
    web = plan.dispatches[0]
    assert (web.cache_s, web.selector, web.buckets, web.live) == (120, Selector.RANDOM, 12, {1, 2})
    assert plan.dispatches[1].cache_s is None  # the default rule
    text = nft_ruleset.render(plan)
    assert re.search(
        r"map fr_rule_0_web \{\n\t\ttype ipv4_addr : verdict\n\t\tsize 4096\n\t\tflags timeout\n",
        text,
    )
    assert re.search(
        r"set frp_rule_0_web \{\n\t\ttype ipv4_addr\n\t\tsize 200\n"
        r"\t\tflags dynamic,timeout\n\t\ttimeout 10s\n",
        text,
    )
    classify = text[text.index("chain classify") :].splitlines()[1:3]
    assert [line.strip() for line in classify] == [
        "meta l4proto tcp ip daddr vmap @fr_rule_0_web",
        'meta l4proto tcp numgen random mod 12 vmap @rule_0_web comment "rule_0_web"',
    ]
    weighted_web = replace(plan, dispatches=(replace(web, cache_s=None), *plan.dispatches[1:]))
    assert nft_ruleset.structure_digest(plan) != nft_ruleset.structure_digest(weighted_web)


def chain(text: str, name: str) -> list[str]:
    body = text[text.index(f"chain {name} {{") :]
    return [line.strip() for line in body[: body.index("\n\t}")].splitlines()[1:]]


def test_fastest_response_reports_only_what_the_forward_filters_let_through() -> None:
    """New destinations are reported after every forward filter (and for the router's own
    connections before classify), never from classify, which runs before the filters."""
    plan = fastest()
    text = nft_ruleset.render(plan)
    assert "log prefix" not in "\n".join(chain(text, "classify"))
    assert chain(text, "fr_forward") == [
        "type filter hook forward priority filter + 100; policy accept;",
        "ct state != new return",
        "ct status dnat return",  # port forwards and hairpins: classify saw another address
        'iifname { "wan1", "wan2" } return',  # from an ISP: never classified
        "jump fr_report",
    ]
    # First match wins, as in classify: a learned or already reported destination is not
    # reported; rules after the last fastest-response rule are not looked at.
    assert chain(text, "fr_report") == [
        "meta l4proto tcp ip daddr @fr_rule_0_web return",
        "meta l4proto tcp ip daddr != @frp_rule_0_web add @frp_rule_0_web "
        '{ ip daddr } log prefix "uplinkd-fr rule_0_web" group 21301',
        "meta l4proto tcp return",
    ]
    output = chain(text, "mark_output")
    assert output.index("ct state new jump fr_report") + 1 == output.index(
        "ct state new jump classify"
    )
    weighted = planner.plan(config({"ISP1": 1, "ISP2": 3}), facts("ISP1", "ISP2"), {"ISP1", "ISP2"})
    assert "fr_report" not in nft_ruleset.render(weighted)


def test_a_rule_before_the_fastest_one_keeps_its_connections_unreported() -> None:
    mail = Rule("mail", Method.WEIGHTED, Match(proto="tcp", dport=(PortRange(25, 25),)))
    web = Rule("web", Method.FASTEST_RESPONSE, Match(), cache_seconds=120)
    cfg = config({"ISP1": 1, "ISP2": 1}, rules=(mail,), default=web)
    text = nft_ruleset.render(planner.plan(cfg, facts("ISP1", "ISP2"), {"ISP1", "ISP2"}))
    assert chain(text, "fr_report") == [
        "tcp dport 25 return",
        "ip daddr @fr_rule_default return",
        "meta l4proto tcp ip daddr != @frp_rule_default add @frp_rule_default "
        '{ ip daddr } log prefix "uplinkd-fr rule_default" group 21301',
        "return",
    ]


def test_the_learned_map_and_the_pending_set_are_bounded_in_the_kernel() -> None:
    web = Rule(
        "web",
        Method.FASTEST_RESPONSE,
        Match(proto="tcp"),
        races_per_second=50,
        max_learned=100,
    )
    cfg = config({"ISP1": 1, "ISP2": 1}, rules=(web,))
    plan = planner.plan(cfg, facts("ISP1", "ISP2"), {"ISP1", "ISP2"})
    text = nft_ruleset.render(plan)
    assert re.search(r"map fr_rule_0_web \{[^}]*\n\t\tsize 100\n", text)
    assert re.search(r"set frp_rule_0_web \{[^}]*\n\t\tsize 500\n", text)  # 50/s for 10 s
    slow = replace(plan.dispatches[0], races_per_second=1)
    assert nft_ruleset.pending_size(slow) == nft_ruleset.PENDING_MIN == MAX_RACES


def test_iptables_refuses_fastest_response() -> None:
    with pytest.raises(BackendUnavailableError, match="rule web: method 'fastest-response' needs"):
        ipt_ruleset.render(fastest())
