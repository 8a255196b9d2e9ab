"""The legacy iptables backend's rules (iptables.py applies them): the same Plan as the
nftables ruleset, over three tables of the legacy x_tables.

mangle: per link a chain setting MARK and CONNMARK within the mark mask, and one restoring the
mark; per rule a dispatch chain, cascading `statistic --mode random` over the links holding its
buckets (random buckets are interchangeable, so they are grouped by link), or HMARK with the plan's
bucket count and seed and one `--mark` rule per bucket (HMARK writes the whole packet mark, so a
hashed connection keeps only its link's bits). nat: MASQUERADE/SNAT per link, DNAT for forwards.
filter: the optional firewall (its drop policy is a final DROP) and, since REJECT exists only
there, the refusal of connections that mangle marked with the refuse id (the mask's highest id
below the all-ones one kept for other tools). Chains end in goto or RETURN, never ACCEPT, so later
rules of other tools in a built-in chain still get their say, as a second nftables base chain
would.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections import Counter
from dataclasses import dataclass, field, replace
from itertools import product

from ...config.model import Match, Nat, PortRange
from ...config.validate import FASTEST_NEEDS_NFTABLES
from ...errors import ApplyError, BackendUnavailableError
from ...planning.plan import UNREACHABLE, Dispatch, Plan, Selector

log = logging.getLogger("uplinkd")

TABLES = ("mangle", "nat", "filter")
_ARG = re.compile(r'"([^"]*)"|(\S+)')
_PART = re.compile(r"@(\w+)")  # a chain of the same generation, in the rules below
VIA = "new connections via "
_NEW = "-m conntrack --ctstate NEW"
_HMARK_TUPLE = {
    Selector.HASH_SOURCE: "src",
    Selector.HASH_DESTINATION: "dst",
    Selector.HASH_SOURCE_DESTINATION: "src,dst",
}


@dataclass
class Ruleset:
    """Per table its chains (by part name: "@PART" in a rule names another) and built-in jumps."""

    chains: dict[str, dict[str, list[str]]] = field(default_factory=lambda: {t: {} for t in TABLES})
    jumps: dict[str, dict[str, str]] = field(default_factory=lambda: {t: {} for t in TABLES})

    def add(self, table: str, part: str, *rules: str) -> None:
        self.chains[table].setdefault(part, []).extend(rules)

    def jump(self, table: str, builtin: str, part: str, comment: str = "uplinkd") -> None:
        self.jumps[table][builtin] = f"{_c(comment)} -j @{part}"


def named(rule: str, gen: int) -> str:
    return _PART.sub(rf"UPLINKD-{gen}-\1", rule)


def split(rule: str) -> list[str]:
    """A rule's arguments (shlex is slow, and only comments are quoted here)."""
    return [quoted or plain for quoted, plain in _ARG.findall(rule)]


def _c(text: str) -> str:
    return f'-m comment --comment "{text}"'


def refuse_mark(mask: int) -> int:
    """The mark of connections with no usable link: the highest id below the all-ones one."""
    return mask - (mask & -mask)


def _range(ports: PortRange) -> str:
    return str(ports.first) if ports.first == ports.last else f"{ports.first}:{ports.last}"


def _ports(proto: str, match: Match) -> str:
    sides = (("sport", match.sport), ("dport", match.dport))
    single = "".join(f" --{side} {_range(p[0])}" for side, p in sides if len(p) == 1)
    many = [
        f"-m multiport --{side}s {','.join(map(_range, p))} " for side, p in sides if len(p) > 1
    ]
    return (f"-m {proto}{single} " if single else "") + "".join(many)


def match_args(match: Match) -> list[str]:
    """A Match as iptables matches: one per device, network and protocol (iptables has no sets)."""
    ported = bool(match.sport or match.dport)
    protos = [match.proto] if match.proto else (["tcp", "udp"] if ported else [None])
    variants = []
    devices, sources, destinations = match.iif or [None], match.src or [None], match.dst or [None]
    for iif, src, dst, proto in product(devices, sources, destinations, protos):
        parts = [
            f"-i {iif} " if iif else "",
            f"-s {src} " if src else "",
            f"-d {dst} " if dst else "",
        ]
        if proto:
            parts += [f"-p {proto} ", _ports(proto, match) if ported else ""]
        variants.append("".join(parts))
    return variants


def _dispatch(rs: Ruleset, dispatch: Dispatch, part: str) -> None:
    name, buckets = dispatch.name, dispatch.buckets
    if dispatch.selector is Selector.RANDOM:
        counts, left = Counter(dispatch.targets), buckets
        for index, target in enumerate(sorted(counts)):
            chance = ""
            if index < len(counts) - 1:  # cascaded: each link's share of what is left
                chance = f" -m statistic --mode random --probability {counts[target] / left:.11f}"
            left -= counts[target]
            link = f"L{target}" if target else "NOLINK"
            rs.add("mangle", part, f"{_c(f'{name} {counts[target]}/{buckets}')}{chance} -g @{link}")
        return
    hmark = f"--hmark-tuple {_HMARK_TUPLE[dispatch.selector]} --hmark-mod {buckets}"
    hmark += f" --hmark-rnd 0x{dispatch.seed:08x} --hmark-proto-mask 0"  # addresses only
    rs.add("mangle", part, f"{_c(f'{name} {buckets} by {dispatch.selector}')} -j HMARK {hmark}")
    rs.add(
        "mangle", part, *(f"-m mark --mark {b} -g @H{t}" for b, t in enumerate(dispatch.targets))
    )
    rs.add("mangle", part, f"-g @H{dispatch.targets[0]}")  # HMARK found no header to hash


def _mangle(rs: Ruleset, plan: Plan) -> None:
    mask, refuse = plan.mark_mask, refuse_mark(plan.mark_mask)
    if not refuse or any(link.mark == refuse for link in plan.links):
        raise ApplyError(
            f"the iptables backend needs link id {refuse:#x} of mark_mask {mask:#x} to mark "
            "refused connections; widen [kernel] mark_mask"
        )
    clear = "-j MARK --set-xmark 0x0/0xffffffff"  # HMARK's bucket number
    for link in plan.links:
        xmark = f"--set-xmark {link.mark:#x}/{mask:#x}"
        rs.add("mangle", f"L{link.id}", f"{_c(VIA + link.name)} -j MARK {xmark}")
        rs.add("mangle", f"L{link.id}", f"-j CONNMARK {xmark}")
        rs.add("mangle", f"R{link.id}", f"-j MARK {xmark}")
        rs.add("mangle", f"H{link.id}", clear, f"-g @L{link.id}")
    never = _c("no usable link for this rule: refused in filter, never sent elsewhere")
    rs.add("mangle", "NOLINK", f"{never} -j MARK --set-xmark {refuse:#x}/{mask:#x}")
    rs.add("mangle", "H0", clear, "-g @NOLINK")
    for index, dispatch in enumerate(plan.dispatches):
        rule = f"{_c('rule ' + dispatch.rule)} -g @D{index}"
        rs.add("mangle", "CLASSIFY", *(match + rule for match in match_args(dispatch.match)))
        _dispatch(rs, dispatch, f"D{index}")
    restore = [f"-m connmark --mark {link.mark:#x}/{mask:#x} -g @R{link.id}" for link in plan.links]
    # A connection arriving from an ISP belongs to that ISP: replies must leave the same way.
    arriving = [f"-i {link.device} {_NEW} -g @L{link.id}" for link in plan.links]
    local = f"{_NEW} -m addrtype --dst-type LOCAL -j RETURN"
    rs.add("mangle", "PRE", *restore, *arriving, local, f"{_NEW} -g @CLASSIFY")
    chosen = f"-m mark ! --mark 0x0/{mask:#x} -j RETURN"  # the socket chose (SO_MARK)
    inside = [f"-o {device} -j RETURN" for device in ("lo", *plan.lan_devices)]
    rs.add("mangle", "OUT", *restore, chosen, *inside, f"{_NEW} -g @CLASSIFY")
    rs.jump("mangle", "OUTPUT", "OUT")


def _nat(rs: Ruleset, plan: Plan) -> None:
    rs.add("nat", "SNAT")
    for link in plan.links:
        if link.nat is Nat.MASQUERADE:
            rs.add("nat", "SNAT", f"-o {link.device} -j MASQUERADE")
        elif link.nat is Nat.SNAT:
            rs.add("nat", "SNAT", f"-o {link.device} -j SNAT --to-source {link.address.ip}")
    rs.add("nat", "DNAT")
    for forward in plan.forwards:
        target = str(forward.host) + (f":{forward.host_port}" if forward.host_port else "")
        port = f"-p {forward.proto} -m {forward.proto} --dport {_range(forward.port)}"
        for link in plan.links:
            if not forward.links or link.name in forward.links:
                rs.add("nat", "DNAT", f"-i {link.device} {port} -j DNAT --to-destination {target}")
    rs.jump("nat", "PREROUTING", "DNAT")
    rs.jump("nat", "POSTROUTING", "SNAT")


def _filter(rs: Ruleset, plan: Plan) -> None:
    refused = f"-m mark --mark {refuse_mark(plan.mark_mask):#x}/{plan.mark_mask:#x} -j @REFUSE"
    reset, unreachable = "-p tcp -j REJECT --reject-with tcp-reset", "-j REJECT"
    rs.add("filter", "REFUSE", reset, f"{unreachable} --reject-with icmp-host-unreachable")
    rs.add("filter", "FOUT", refused)
    rs.add("filter", "FWD", refused)
    rs.jump("filter", "OUTPUT", "FOUT")
    rs.jump("filter", "FORWARD", "FWD")
    fw = plan.firewall
    if not fw.enabled:
        return
    state = "-m conntrack --ctstate"
    common = [f"{state} RELATED,ESTABLISHED -j RETURN", f"{state} INVALID -j DROP"]
    echo = "-p icmp -m icmp --icmp-type echo-request"
    limit = f"-m limit --limit {fw.icmp_rate_per_second}/second"
    # Before the established rule: a flood reuses one echo id, one "established" connection.
    rs.add("filter", "IN", "-i lo -j RETURN", f"{echo} {limit} -j RETURN", f"{echo} -j DROP")
    rs.add("filter", "IN", *common, "-p udp -m udp --sport 67 --dport 68 -j RETURN")
    for lan in plan.lan_devices:  # what a LAN needs from its router: DNS, DHCP, NTP; maybe ssh
        rs.add("filter", "IN", f"-i {lan} -p udp -m multiport --dports 53,67,123 -j RETURN")
        for port in ("53", "22") if fw.ssh_from_lan else ("53",):
            rs.add("filter", "IN", f"-i {lan} -p tcp -m tcp --dport {port} -j RETURN")
    rs.add("filter", "IN", "-j DROP")
    rs.jump("filter", "INPUT", "IN")
    rs.add("filter", "FWD", *common, "-m conntrack --ctstate DNAT -j RETURN")
    for group in plan.firewall_groups:
        for device in set(group) & set(plan.lan_devices):
            others = [other for other in group if other != device]
            rs.add("filter", "FWD", *(f"-i {device} -o {other} -j RETURN" for other in others))
    rs.add("filter", "FWD", "-j DROP")


def build(plan: Plan, state: str = "uplinkd") -> Ruleset:
    for dispatch in plan.dispatches:
        if dispatch.cache_s is not None:
            raise BackendUnavailableError(f"rule {dispatch.rule}: {FASTEST_NEEDS_NFTABLES}")
    rs = Ruleset()
    _mangle(rs, plan)
    rs.jump("mangle", "PREROUTING", "PRE", state)
    _nat(rs, plan)
    _filter(rs, plan)
    return rs


def restore_text(rs: Ruleset, gen: int) -> str:
    lines = []
    for table in TABLES:
        chains = rs.chains[table]
        lines += [f"*{table}", *(f":UPLINKD-{gen}-{part} - [0:0]" for part in chains)]
        lines += [f"-A @{part} {rule}" for part, rules in chains.items() for rule in rules]
        lines += [f"-I {builtin} 1 {rule}" for builtin, rule in rs.jumps[table].items()]
        lines.append("COMMIT")
    return named("".join(line + "\n" for line in lines), gen)


def structure_digest(plan: Plan) -> str:
    """Digest of the ruleset with every bucket emptied: what only a configuration change alters."""
    blank = [replace(d, targets=(UNREACHABLE,) * d.buckets) for d in plan.dispatches]
    text = restore_text(build(replace(plan, dispatches=tuple(blank))), 0)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def state_comment(plan: Plan) -> str:
    up = sum(1 << link.id for link in plan.links if link.up)
    return f"uplinkd structure={structure_digest(plan)} up={up:#x}"


def map_targets(plan: Plan) -> dict[str, tuple[int, ...]]:
    """Per rule its bucket targets as read back: random buckets grouped by link."""
    return {
        d.name: tuple(sorted(d.targets)) if d.selector is Selector.RANDOM else d.targets
        for d in plan.dispatches
    }


def render(plan: Plan) -> str:
    return (
        "# uplinkd, legacy iptables backend: input for `iptables-legacy-restore --noflush` (check\n"
        "# it with --test). uplinkd builds these chains under a new generation number, then\n"
        "# switches the one jump per built-in chain and deletes the previous generation.\n"
        + restore_text(build(plan, state_comment(plan)), 1)
    )
