"""uplinkd's nftables ruleset as text: one `inet uplinkd` table rendered from a Plan, and the
element commands of a map update. What the backend (nftables.py) applies, and what `-d` shows.

A failover only rewrites map contents (one small transaction); anything else rebuilds the table
atomically (`table` + `delete table` + the new table in one batch), so traffic never sees a
half-built ruleset and conntrack marks of live flows are kept.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

from ... import const
from ...config.model import Match, Nat
from ...planning.plan import UNREACHABLE, Dispatch, HookLine, Plan, PlannedLink, Selector

TABLE = f"{const.NFT_FAMILY} {const.NFT_TABLE}"
NO_LINK_CHAIN = "no_link"
STATE_SET = "uplinkd_state"
# uplinkd reads its table back only as JSON (libnftables 1.0.6 crashed printing a `typeof jhash`
# map as text, in-process and in the nft command; see _map_type), where table comments are
# missing: the structure digest lives in the comment of this empty set instead.
DIGEST_PREFIX = "uplinkd structure="
NAME_SET_PREFIX = "name_of_link_"
# fastest-response: per rule, the destinations learned (address -> link chain, with a timeout)
# and those reported to the daemon and waiting for their race.
LEARNED_PREFIX = "fr_"
_PENDING_PREFIX = "frp_"
# New destinations are reported from these chains, so only connections that every forward filter
# let through are (see _report): fr_forward runs after the filters of uplinkd (priority filter),
# firewalld (filter + 10) and iptables-nft (filter); a drop in any base chain is final.
_REPORT_CHAIN = "fr_report"
_REPORT_FORWARD_CHAIN = "fr_forward"
_REPORT_PRIORITY = "filter + 100"
# The pending set holds at least what fastest.MAX_RACES races at once (a test holds them equal).
PENDING_MIN = 64


def learned_map(dispatch_name: str) -> str:
    return LEARNED_PREFIX + dispatch_name


def log_prefix(dispatch_name: str) -> str:
    """The NFLOG prefix of a rule's new destinations; fastest.py reads the rule back from it."""
    return const.FASTEST_LOG_PREFIX + dispatch_name


def _set(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "{ " + ", ".join(items) + " }"


def _names(devices: Iterable[str]) -> str:
    return _set([f'"{device}"' for device in devices])


def render_match(match: Match) -> str:
    parts: list[str] = []
    if match.iif:
        parts.append(f"iifname {_names(match.iif)}")
    if match.src:
        parts.append(f"ip saddr {_set([str(n) for n in match.src])}")
    if match.dst:
        parts.append(f"ip daddr {_set([str(n) for n in match.dst])}")
    if match.sport or match.dport:
        proto = match.proto if match.proto in ("tcp", "udp") else None
        if proto is None:
            parts.append("meta l4proto { tcp, udp }")
        header = proto or "th"
        if match.sport:
            parts.append(f"{header} sport {_set([str(p) for p in match.sport])}")
        if match.dport:
            parts.append(f"{header} dport {_set([str(p) for p in match.dport])}")
    elif match.proto:
        parts.append(f"meta l4proto {match.proto}")
    return " ".join(parts)


def _selector(dispatch: Dispatch) -> str:
    mod = f"mod {dispatch.buckets}"
    seed = f"seed 0x{dispatch.seed:08x}"
    return {
        Selector.RANDOM: f"numgen random {mod}",
        Selector.HASH_SOURCE: f"jhash ip saddr {mod} {seed}",
        Selector.HASH_DESTINATION: f"jhash ip daddr {mod} {seed}",
        Selector.HASH_SOURCE_DESTINATION: f"jhash ip saddr . ip daddr {mod} {seed}",
    }[dispatch.selector]


def _map_type(dispatch: Dispatch) -> str:
    """The key of a rule's bucket map: a bucket number, 0 to buckets - 1, whatever picks it.

    nft 1.0.6 accepts no explicit `type` here: `type integer` is "unqualified", and `type mark`
    (like `typeof meta mark`) is a datatype mismatch for numgen and jhash alike. So the key is
    declared `typeof numgen random mod N` for every selector: numgen's declaration is stored
    and listed back fine, while a map declared `typeof jhash ...` makes Debian 12's `nft list
    ruleset` (and `list table`, `list maps`, -a, -s) crash with a segfault. jhash and numgen
    both give a 32-bit host-order integer, so the elements and lookups are the same; the
    modulus is only a type hint.
    """
    return f"numgen random mod {dispatch.buckets}"


def link_chain(link_id: int) -> str:
    return NO_LINK_CHAIN if link_id == UNREACHABLE else f"link_{link_id}"


def _elements(dispatch: Dispatch) -> str:
    return ", ".join(
        f"{bucket} : goto {link_chain(target)}" for bucket, target in enumerate(dispatch.targets)
    )


def _set_mark(what: str, mask: int, mark: int) -> str:
    keep = ~mask & 0xFFFFFFFF
    return f"{what} set {what} and 0x{keep:08x} or 0x{mark:08x}"


def _mark_chains(plan: Plan) -> list[str]:
    chains: list[str] = []
    for link in plan.links:
        chains.append(
            f"\tchain link_{link.id} {{\n"
            f'\t\tcomment "new connections via {link.name}"\n'
            f"\t\t{_set_mark('meta mark', plan.mark_mask, link.mark)}\n"
            f"\t\t{_set_mark('ct mark', plan.mark_mask, link.mark)}\n"
            "\t\taccept\n\t}"
        )
        chains.append(
            f"\tchain restore_{link.id} {{\n"
            f"\t\t{_set_mark('meta mark', plan.mark_mask, link.mark)}\n"
            "\t\taccept\n\t}"
        )
    # Fail fast rather than leak to another link: a TCP reset is not rate-limited like the
    # ICMP errors the kernel sends (net.ipv4.icmp_ratelimit), so clients give up at once.
    chains.append(
        f"\tchain {NO_LINK_CHAIN} {{\n"
        '\t\tcomment "no usable link for this rule: refused, never sent elsewhere"\n'
        "\t\tmeta l4proto tcp reject with tcp reset\n"
        "\t\treject with icmpx host-unreachable\n\t}"
    )
    return chains


def _restore(plan: Plan) -> list[str]:
    if not plan.links:
        return []
    entries = ", ".join(f"0x{link.mark:08x} : goto restore_{link.id}" for link in plan.links)
    return [f"ct mark and 0x{plan.mark_mask:08x} vmap {{ {entries} }}"]


def _classify(plan: Plan) -> str:
    lines = []
    for dispatch in plan.dispatches:
        match = render_match(dispatch.match)
        if dispatch.cache_s is not None:
            # A learned destination goes to its race's winner; a new one is reported (_report)
            # and meanwhile uses the buckets.
            lines.append(f"{match} ip daddr vmap @{learned_map(dispatch.name)}".strip())
        vmap = f'vmap @{dispatch.map_name} comment "{dispatch.name}"'
        lines.append(f"{match} {_selector(dispatch)} {vmap}".strip())
    return _chain("classify", [], lines)


def _fastest(plan: Plan) -> list[Dispatch]:
    return [d for d in plan.dispatches if d.cache_s is not None]


def _report(plan: Plan) -> list[str]:
    """Where a new connection's destination is reported to the daemon, for it to race.

    Not in classify (prerouting), which runs before any forward filter: a connection the
    firewall drops must not make the router connect there itself. So forwarded connections are
    reported by fr_forward, a forward chain after the filters, and the router's own (what
    mark_output classifies) before classify in mark_output. fr_report finds the rule the way
    classify does (first match wins) and reports a TCP destination that the rule has neither
    learned nor reported in the last FASTEST_PENDING_S; a full pending set reports nothing more
    until entries expire, which bounds the reports of a scan in the kernel.
    """
    fastest = _fastest(plan)
    if not fastest:
        return []
    last = plan.dispatches.index(fastest[-1])
    lines = []
    for dispatch in plan.dispatches[: last + 1]:
        match = render_match(dispatch.match)
        if dispatch.cache_s is not None:
            pending = f"@{_PENDING_PREFIX}{dispatch.name}"
            lines.append(f"{match} ip daddr @{learned_map(dispatch.name)} return".strip())
            report = f'log prefix "{log_prefix(dispatch.name)}" group {const.FASTEST_NFLOG_GROUP}'
            tcp = "" if dispatch.match.proto == "tcp" else "meta l4proto tcp "
            lines.append(
                f"{match} {tcp}ip daddr != {pending} add {pending} {{ ip daddr }} {report}".strip()
            )
        lines.append(f"{match} return".strip())
    # Connections classify did not see: from an ISP (prerouting sends them to their link) and
    # those it saw under another address (dnat happens after it: port forwards, hairpins).
    forward = ["ct state != new return", "ct status dnat return"]
    if plan.links:
        forward.append(f"iifname {_names(_wan_devices(plan.links))} return")
    forward.append(f"jump {_REPORT_CHAIN}")
    header = f"type filter hook forward priority {_REPORT_PRIORITY}; policy accept;"
    return [
        _chain(_REPORT_CHAIN, [], lines),
        _chain(_REPORT_FORWARD_CHAIN, [header], forward),
    ]


def pending_size(dispatch: Dispatch) -> int:
    """The pending set's size: what the daemon can race in FASTEST_PENDING_S, at least
    PENDING_MIN; a scan beyond it is not even reported."""
    return max(PENDING_MIN, dispatch.races_per_second * const.FASTEST_PENDING_S)


def _learning_sets(dispatch: Dispatch) -> list[str]:
    if dispatch.cache_s is None:
        return []
    comment = f'comment "rule {dispatch.rule}: destinations'
    return [
        f"\tmap {learned_map(dispatch.name)} {{\n\t\ttype ipv4_addr : verdict\n"
        f"\t\tsize {dispatch.max_learned}\n"
        f'\t\tflags timeout\n\t\t{comment} and the link that answered first"\n\t}}',
        f"\tset {_PENDING_PREFIX}{dispatch.name} {{\n\t\ttype ipv4_addr\n"
        f"\t\tsize {pending_size(dispatch)}\n"
        f"\t\tflags dynamic,timeout\n\t\ttimeout {const.FASTEST_PENDING_S}s\n"
        f'\t\t{comment} waiting for their race"\n\t}}',
    ]


def _chain(name: str, header: list[str], rules: list[str]) -> str:
    body = "".join(f"\t\t{line}\n" for line in [*header, *rules])
    return f"\tchain {name} {{\n{body}\t}}"


def _wan_devices(links: Sequence[PlannedLink]) -> list[str]:
    return [link.device for link in links]


def _prerouting(plan: Plan) -> str:
    rules = _restore(plan)
    # A connection arriving from an ISP belongs to that ISP: replies must leave the same way.
    rules += [f'iifname "{link.device}" ct state new goto link_{link.id}' for link in plan.links]
    rules.append("ct state new fib daddr type local accept")
    rules.append("ct state new jump classify")
    return _chain(
        "mark_prerouting", ["type filter hook prerouting priority mangle; policy accept;"], rules
    )


def _output(plan: Plan) -> str:
    rules = _restore(plan)
    rules.append(f"meta mark and 0x{plan.mark_mask:08x} != 0 accept")  # the socket chose (SO_MARK)
    local = ['"lo"', *(f'"{d}"' for d in plan.lan_devices)]
    rules.append(f"oifname {_set(local)} accept")
    if _fastest(plan):
        rules.append(f"ct state new jump {_REPORT_CHAIN}")
    rules.append("ct state new jump classify")
    return _chain("mark_output", ["type route hook output priority mangle; policy accept;"], rules)


def _nat(plan: Plan) -> list[str]:
    chains = []
    snat_rules = []
    for link in plan.links:
        if link.nat is Nat.MASQUERADE:
            snat_rules.append(f'oifname "{link.device}" masquerade')
        elif link.nat is Nat.SNAT:
            snat_rules.append(f'oifname "{link.device}" snat ip to {link.address.ip}')
    chains.append(
        _chain(
            "nat_postrouting",
            ["type nat hook postrouting priority srcnat; policy accept;"],
            snat_rules,
        )
    )
    dnat_rules = []
    for forward in plan.forwards:
        devices = [
            link.device for link in plan.links if not forward.links or link.name in forward.links
        ]
        if not devices:
            continue
        target = str(forward.host) + (f":{forward.host_port}" if forward.host_port else "")
        dnat_rules.append(
            f"iifname {_names(devices)} {forward.proto} dport {forward.port} dnat ip to {target}"
        )
    chains.append(
        _chain(
            "nat_prerouting",
            ["type nat hook prerouting priority dstnat; policy accept;"],
            dnat_rules,
        )
    )
    return chains


def _firewall(plan: Plan) -> list[str]:
    fw = plan.firewall
    if not fw.enabled:
        return []
    common = ["ct state established,related accept", "ct state invalid drop"]
    input_rules = [
        'iif "lo" accept',
        # Before the established rule: a flood reuses one echo id, which conntrack sees as
        # one established "connection" that would otherwise bypass the limit.
        f"icmp type echo-request limit rate {fw.icmp_rate_per_second}/second accept",
        "icmp type echo-request drop",
        *common,
        "udp sport 67 udp dport 68 accept",  # the router's own DHCP client on an ISP link
    ]
    if plan.lan_devices:
        lans = _names(plan.lan_devices)
        # What a LAN needs from its router: DNS, DHCP, NTP; ssh when the admin wants it.
        input_rules.append(f"iifname {lans} udp dport {{ 53, 67, 123 }} accept")
        input_rules.append(f"iifname {lans} tcp dport 53 accept")
        if fw.ssh_from_lan:
            input_rules.append(f"iifname {lans} tcp dport 22 accept")
    forward_rules = [*common, "ct status dnat accept"]
    lan_set = set(plan.lan_devices)
    for group in plan.firewall_groups:
        for device in group:
            others = [other for other in group if other != device]
            if device in lan_set and others:
                forward_rules.append(f'iifname "{device}" oifname {_names(others)} accept')
    return [
        _chain(
            "filter_input", ["type filter hook input priority filter; policy drop;"], input_rules
        ),
        _chain(
            "filter_forward",
            ["type filter hook forward priority filter; policy drop;"],
            forward_rules,
        ),
    ]


def _table_body(plan: Plan) -> str:
    # Link names for readers of the kernel state (uplinkctl, adoption after a restart).
    names = [
        f'\tset {NAME_SET_PREFIX}{link.id} {{\n\t\ttype mark\n\t\tcomment "{link.name}"\n\t}}'
        for link in plan.links
    ]
    maps = []
    for d in owners(plan.dispatches):
        users = [u.rule for u in plan.dispatches if u.map_name == d.name]
        comment = f"rule {d.rule}" + (f" and {len(users) - 1} more" if len(users) > 1 else "")
        maps.append(
            f'\tmap {d.name} {{\n\t\ttypeof {_map_type(d)} : verdict\n\t\tcomment "{comment}"\n\t}}'
        )
    learning = [text for d in plan.dispatches for text in _learning_sets(d)]
    parts = [
        *names,
        *maps,
        *learning,
        *_mark_chains(plan),
        _classify(plan),
        *_report(plan),
        _prerouting(plan),
        _output(plan),
        *_nat(plan),
        *_firewall(plan),
    ]
    return "\n".join(parts)


def hook_text(lines: Iterable[HookLine]) -> str:
    return "".join(f"{line.text}\n" for line in lines)


def structure_digest(plan: Plan) -> str:
    """Digest of everything but map contents: what only a configuration change alters."""
    structure = _table_body(plan) + "\n" + hook_text(plan.nft_hook_lines)
    return hashlib.sha256(structure.encode()).hexdigest()[:16]


def map_targets(plan: Plan) -> dict[str, tuple[int, ...]]:
    return {d.name: d.targets for d in owners(plan.dispatches)}


def owners(dispatches: Iterable[Dispatch]) -> list[Dispatch]:
    """The dispatches that own a map (the others use one of theirs)."""
    return [d for d in dispatches if not d.map]


def table_text(plan: Plan) -> str:
    state = (
        f"\tset {STATE_SET} {{\n\t\ttype mark\n"
        f'\t\tcomment "{DIGEST_PREFIX}{structure_digest(plan)}"\n\t}}\n'
    )
    return f"table {TABLE} {{\n{state}{_table_body(plan)}\n}}\n"


def up_link_ids(plan: Plan) -> frozenset[int]:
    return frozenset(link.id for link in plan.links if link.up)


def element_commands(plan: Plan, dispatches: Iterable[Dispatch]) -> str:
    """Map contents of a new table, and the ids of the links up, kept in the state set for a
    restart to adopt."""
    lines = [
        f"add element {TABLE} {dispatch.name} {{ {_elements(dispatch)} }}"
        for dispatch in dispatches
    ]
    if up := sorted(up_link_ids(plan)):
        lines.append(f"add element {TABLE} {STATE_SET} {{ {', '.join(map(str, up))} }}")
    return "".join(line + "\n" for line in lines)


def element_updates(
    plan: Plan, dispatches: Iterable[Dispatch], held: Mapping[str, tuple[int, ...]]
) -> str:
    """A map update from what the maps hold (`held`, by map name): only the buckets whose link
    changed are deleted and added again (a link going down moves its own buckets alone, an
    eighth of an 8-link map); the rest stay. The state set is written whole."""
    lines = []
    for dispatch in dispatches:
        before = held.get(dispatch.name)
        if before is None or len(before) != len(dispatch.targets):
            lines.append(f"flush map {TABLE} {dispatch.name}")
            lines.append(f"add element {TABLE} {dispatch.name} {{ {_elements(dispatch)} }}")
            continue
        moved = [
            b
            for b, (old, new) in enumerate(zip(before, dispatch.targets, strict=True))
            if old != new
        ]
        if not moved:
            continue
        keys = ", ".join(map(str, moved))
        items = ", ".join(f"{b} : goto {link_chain(dispatch.targets[b])}" for b in moved)
        lines.append(f"delete element {TABLE} {dispatch.name} {{ {keys} }}")
        lines.append(f"add element {TABLE} {dispatch.name} {{ {items} }}")
    lines.append(f"flush set {TABLE} {STATE_SET}")
    if up := sorted(up_link_ids(plan)):
        lines.append(f"add element {TABLE} {STATE_SET} {{ {', '.join(map(str, up))} }}")
    return "".join(line + "\n" for line in lines)


def render(plan: Plan) -> str:
    """The complete transaction of a full apply, usable as is with `nft -f`."""
    return (
        "#!/usr/sbin/nft -f\n"
        "# uplinkd: the whole ruleset in one transaction (creates the table if absent, then\n"
        "# replaces it); other tables are not touched.\n"
        f"table {TABLE}\ndelete table {TABLE}\n"
        + table_text(plan)
        + element_commands(plan, owners(plan.dispatches))
        + hook_text(plan.nft_hook_lines)
    )
