"""The legacy iptables backend: the same Plan in the legacy x_tables, written with python-iptables.

The nftables backend's shape over three tables. mangle: per link a chain setting MARK and CONNMARK
within the mark mask, and one restoring the mark; per rule a dispatch chain, cascading `statistic
--mode random` over the links holding its buckets (random buckets are interchangeable, so they are
grouped by link), or HMARK with the plan's bucket count and seed and one `--mark` rule per bucket
(HMARK writes the whole packet mark, so a hashed connection keeps only its link's bits). nat:
MASQUERADE/SNAT per link, DNAT for forwards. filter: the optional firewall (its drop policy is a
final DROP) and, since REJECT exists only there, the refusal of connections that mangle marked
with the refuse id (the mask's highest id below the all-ones one kept for other tools). Chains
end in goto or RETURN, never ACCEPT, so later rules of other tools in a built-in chain still get
their say, as a second nftables base chain would.

Applies are atomic for traffic: libiptc replaces one whole table per commit; a new generation's
chains (UPLINKD-<gen>-...) are built in every table while nothing jumps to them, so the kernel
accepts or refuses all of them first; then one commit per table switches the single jump in each
built-in chain and deletes older generations. The state (structure digest, links up) is the
comment of mangle PREROUTING's jump. python-iptables takes no xtables lock; uplinkd does.

It refuses to run where the nf_tables variant of iptables (iptables-nft) manages rules in the
network namespace: legacy rules would be invisible to `iptables`/`iptables-save` and evaluated
beside the nf_tables ones. The rule: a `table ip filter|nat|mangle|raw|security` with a base chain
named like an iptables built-in chain (PREROUTING, INPUT, FORWARD, OUTPUT, POSTROUTING: what
iptables-nft creates; native nftables rulesets name their own) holds a rule or a drop policy. It
is read through libnftables, else from `iptables-nft-save`; empty tables (`iptables -L` leaves
them) do not count. uplinkd's own `inet uplinkd` table also refuses it: both would mark traffic.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from itertools import product
from typing import Any

from ... import const
from ...config.model import Match, Nat, PortRange
from ...config.validate import FASTEST_NEEDS_NFTABLES
from ...errors import ApplyError, BackendUnavailableError, HookError
from ...planning.plan import UNREACHABLE, Dispatch, Plan, Selector
from ..nftlib import Nft, NftError
from .base import AppliedState, ApplyKind, Learned, Transaction

log = logging.getLogger("uplinkd")

TABLES = ("mangle", "nat", "filter")
XT_TABLES = frozenset({"filter", "nat", "mangle", "raw", "security"})
XT_BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
XTABLES_LOCK = "/run/xtables.lock"
_LOCK_WAIT_S = 3.0  # like `iptables -w 3`; longer would stall the daemon's event loop
_MAX_GEN = 99999  # keeps chain names well within iptables' 28 characters
CHAIN = re.compile(r"UPLINKD-(\d+)-(\w+)")
_ARG = re.compile(r'"([^"]*)"|(\S+)')
_PART = re.compile(r"@(\w+)")  # a chain of the same generation, in the rules below
_VIA = "new connections via "
_NEW = "-m conntrack --ctstate NEW"
_HMARK_TUPLE = {
    Selector.HASH_SOURCE: "src",
    Selector.HASH_DESTINATION: "dst",
    Selector.HASH_SOURCE_DESTINATION: "src,dst",
}
_ADVICE = 'use backend = "nftables" (or "auto") in the configuration, or uplinkd --backend nftables'


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
        rs.add("mangle", f"L{link.id}", f"{_c(_VIA + link.name)} -j MARK {xmark}")
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


def _state(plan: Plan) -> str:
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
        + restore_text(build(plan, _state(plan)), 1)
    )


def iptables_nft_tables(items: Iterable[dict[str, Any]]) -> list[str]:
    """The tables of an nft JSON listing that iptables-nft manages and that hold rules."""
    created: set[str] = set()
    rules: Counter[str] = Counter()
    for item in items:
        chain, rule = item.get("chain", {}), item.get("rule", {})
        if chain.get("family") == "ip" and chain.get("table") in XT_TABLES and "hook" in chain:
            if chain.get("name") in XT_BUILTIN_CHAINS:
                created.add(chain["table"])
            rules[chain["table"]] += chain.get("policy") == "drop"
        if rule.get("family") == "ip":
            rules[rule.get("table", "")] += 1
    return [f"table ip {name} (rules: {rules[name]})" for name in sorted(created) if rules[name]]


def _iptables_nft_save() -> list[str]:
    """The same rule read from `iptables-nft-save`, for hosts where libnftables does not load."""
    program = shutil.which("iptables-nft-save")
    if program is None:
        return []
    out = subprocess.run([program], capture_output=True, text=True, timeout=10, check=False)
    table, rules = "", Counter[str]()
    for line in out.stdout.splitlines():
        table = line[1:] if line.startswith("*") else table
        rules[table] += line.startswith("-A ") or (line.startswith(":") and " DROP " in line)
    return [f"table ip {name} (rules: {count})" for name, count in sorted(rules.items()) if count]


def nft_conflict() -> str | None:
    """Why legacy rules must not be added in this network namespace; None when they may."""
    try:
        with Nft(json_output=True) as nft:
            tables = [item["table"] for item in nft.run_json("list tables") if "table" in item]
            ours = (const.NFT_FAMILY, const.NFT_TABLE)
            if any((t["family"], t["name"]) == ours for t in tables):
                return (
                    f"uplinkd's nftables ruleset (table {' '.join(ours)}) is installed here and "
                    "would mark the same traffic; remove it: uplinkd --stop --backend nftables"
                )
            candidates = [t["name"] for t in tables if t["family"] == "ip"]
            items = [
                i for n in candidates if n in XT_TABLES for i in nft.run_json(f"list table ip {n}")
            ]
        found = iptables_nft_tables(items)
    except (BackendUnavailableError, NftError):
        found = _iptables_nft_save()
    if not found:
        return None
    return (
        f"the nf_tables variant of iptables manages rules in this network namespace "
        f"({', '.join(found)}); python-iptables writes the legacy tables, whose rules `iptables` "
        "here would not show and which the kernel would evaluate beside the nf_tables ones, "
        f"each unaware of the other; {_ADVICE}"
    )


def legacy_tables() -> set[str]:
    """The legacy tables in this network namespace (opening one that is absent creates it)."""
    try:
        with open("/proc/net/ip_tables_names") as names:
            return set(names.read().split()) & set(TABLES)
    except OSError:
        return set()


@contextlib.contextmanager
def xtables_lock() -> Iterator[None]:
    """The lock iptables commands take, so that neither commits over the other's change."""
    try:  # read-only is enough for flock, and all a ProtectSystem=strict /run allows
        fd = os.open(XTABLES_LOCK, os.O_RDONLY | os.O_CREAT, 0o600)
    except OSError as exc:
        log.debug("%s: %s; going on without the xtables lock", XTABLES_LOCK, exc)
        fd = -1
    deadline = time.monotonic() + _LOCK_WAIT_S
    try:
        while fd >= 0 and not _locked(fd):
            if time.monotonic() > deadline:
                raise ApplyError(f"another program holds {XTABLES_LOCK}")
            time.sleep(0.01)
        yield
    finally:
        if fd >= 0:
            os.close(fd)


def _locked(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _iptc_rule(iptc: Any, args: Sequence[str]) -> Any:
    """A rule's iptables arguments as a python-iptables Rule."""
    rule = iptc.Rule()
    fields = {"-s": "src", "-d": "dst", "-i": "in_interface", "-o": "out_interface"}
    module: Any = None
    invert, index = "", 0
    while index < len(args):
        arg, value = args[index], args[index + 1] if index + 1 < len(args) else ""
        index += 2
        if arg == "!":
            invert, index = "!", index - 1
        elif arg in fields or arg == "-p":
            setattr(rule, fields.get(arg, "protocol"), value)
        elif arg == "-m":
            module = rule.create_match(value)
        elif arg in ("-j", "-g"):
            module = rule.create_target(value, goto=arg == "-g")
        else:  # an option of the last match or target; a flag (--restore-mark) has no value
            if value.startswith("-") or value == "!":
                value, index = "", index - 1
            module.set_parameter(arg.removeprefix("--"), invert + value)
            invert = ""
    return rule


def _comment_of(rule: Any) -> str:
    return next((str(m.comment) for m in rule.matches if m.name == "comment"), "")


def _link_id(chain: str) -> int:
    part = chain.rsplit("-", 1)[-1]  # L<id>, H<id>, or NOLINK
    return int(part[1:]) if part[1:].isdigit() else UNREACHABLE


class IptablesBackend:
    name = "iptables"

    def __init__(self) -> None:
        self._iptc: Any = None

    def _lib(self) -> Any:
        if self._iptc is None:
            try:
                import iptc  # noqa: PLC0415 - only this backend needs libiptc
            except Exception as exc:
                raise BackendUnavailableError(
                    f"python-iptables cannot be loaded ({exc}); it needs libip4tc2, libip6tc2 "
                    f"and libxtables12 (Debian package iptables); or {_ADVICE}"
                ) from exc
            self._iptc = iptc
        return self._iptc

    def _table(self, name: str) -> Any:
        table = self._lib().Table(name, autocommit=False)
        table.refresh()  # a fresh copy of the kernel's: a commit replaces the whole table
        return table

    def check_available(self) -> None:
        iptc = self._lib()
        if conflict := nft_conflict():
            raise BackendUnavailableError(f"the iptables backend refuses to start: {conflict}")
        try:
            for name in TABLES:
                self._table(name)
        except iptc.IPTCError as exc:
            raise BackendUnavailableError(
                f"the legacy iptables tables cannot be used here ({exc}); the kernel needs "
                f"ip_tables, iptable_mangle, iptable_nat and iptable_filter; or {_ADVICE}"
            ) from exc

    def render(self, plan: Plan) -> str:
        return render(plan)

    def read_back(self) -> AppliedState | None:
        if "mangle" not in legacy_tables():
            return None
        try:
            table = self._table("mangle")
        except BackendUnavailableError:
            return None
        prerouting = self._lib().Chain(table, "PREROUTING").rules
        jumps = [rule for rule in prerouting if CHAIN.fullmatch(rule.target.name)]
        if not jumps:
            return None
        state = {k: v for k, _, v in (i.partition("=") for i in _comment_of(jumps[0]).split())}
        gen = jumps[0].target.name.split("-")[1]
        names, maps = {}, {}
        for chain in table.chains:
            part = CHAIN.fullmatch(chain.name)
            if not part or part[1] != gen or part[2][0] not in "LD":
                continue
            # Decoding a whole rule is slow in python-iptables: only the comments needed.
            entries, entry = [], table.first_rule(chain.name)
            while entry:
                entries.append(entry)
                entry = table.next_rule(entry)
            targets = [_link_id(table.get_target(entry).decode()) for entry in entries]

            def comment(entry: Any, chain: Any = chain) -> str:
                return _comment_of(table.create_rule(entry, chain))

            if part[2][0] == "L":
                names[int(part[2][1:])] = comment(entries[0]).removeprefix(_VIA)
                continue
            name, count, *by = comment(entries[0]).split()
            if by:  # hashed: after HMARK, one rule per bucket in bucket order
                maps[name] = tuple(targets[1 : 1 + int(count)])
            else:  # random: per link holding buckets, "<rule> <count>/<buckets>"
                held = [int(comment(e).split()[1].split("/")[0]) for e in entries]
                maps[name] = tuple(t for t, n in zip(targets, held, strict=True) for _ in range(n))
        up = int(state.get("up", "0"), 16)
        ids = frozenset(i for i in range(up.bit_length()) if up >> i & 1)
        return AppliedState(state.get("structure", ""), maps, names, ids)

    def _refuse_hook_lines(self, plan: Plan) -> None:
        if plan.nft_hook_lines:
            line = plan.nft_hook_lines[0]
            message = "nftables commands need the nftables backend (iptables ones go in post-run/)"
            raise HookError(line.path, message, line=line.line)

    def prepare(self, plan: Plan) -> Transaction:
        self._refuse_hook_lines(plan)
        self.check_available()
        current = self.read_back()
        same = current is not None and current.structure == structure_digest(plan)
        up = frozenset(link.id for link in plan.links if link.up)
        if same and current and (current.maps, current.up_links) == (map_targets(plan), up):
            return Transaction(ApplyKind.NONE)
        rules = build(plan, _state(plan))
        kind = ApplyKind.MAPS if same else ApplyKind.FULL
        return Transaction(kind, lambda: self._try(rules), lambda: self._commit(rules, kind))

    def _try(self, rules: Ruleset) -> None:
        """Build the new generation beside the one in force, then drop it: what the kernel
        refuses, it refuses here (python-iptables has no check-only mode)."""
        with xtables_lock():
            gen = self._next_gen()
            self._build(rules, gen)
            self._drop(TABLES, gen)

    def _commit(self, rules: Ruleset, kind: ApplyKind) -> None:
        with xtables_lock():
            gen = self._next_gen()
            self._build(rules, gen)
            self._switch(rules, gen)
        if kind is ApplyKind.FULL and "nft" in os.path.basename(
            os.path.realpath(shutil.which("iptables") or "")
        ):
            log.info(
                "`iptables` is the nf_tables variant here: iptables-legacy-save shows uplinkd's"
            )

    def _next_gen(self) -> int:
        tables = [self._table(name) for name in legacy_tables()]
        gens = {int(p[1]) for t in tables for c in t.chains if (p := CHAIN.fullmatch(c.name))}
        gen = max(gens, default=0) % _MAX_GEN + 1
        while gen in gens:
            gen = gen % _MAX_GEN + 1
        return gen

    def _build(self, rs: Ruleset, gen: int) -> None:
        """Add a generation's chains, which nothing jumps to yet: in all tables, or none."""
        iptc, built = self._lib(), []
        try:
            for name, chains in rs.chains.items():
                table = self._table(name)
                for part in chains:
                    table.create_chain(f"UPLINKD-{gen}-{part}")
                for part, rules in chains.items():
                    chain = iptc.Chain(table, f"UPLINKD-{gen}-{part}")
                    for rule in rules:
                        chain.append_rule(_iptc_rule(iptc, split(named(rule, gen))))
                table.commit()
                built.append(name)
        except (iptc.IPTCError, iptc.XTablesError, ValueError, AttributeError) as exc:
            self._drop(built, gen)
            raise ApplyError(
                f"the kernel refused uplinkd's iptables rules (none applied): {exc}"
            ) from exc

    def _drop(self, tables: Iterable[str], gen: int) -> None:
        for name in tables:
            table = self._table(name)
            self._delete(table, lambda other: other == gen)
            table.commit()

    def _delete(self, table: Any, which: Callable[[int], bool]) -> bool:
        """Delete the built-in chains' jumps to, and the chains of, the generations picked."""

        def picked(chain: str) -> bool:
            return bool((part := CHAIN.fullmatch(chain)) and which(int(part[1])))

        jumps = [
            (chain, rule)
            for chain in table.chains
            if table.builtin_chain(chain.name)
            for rule in chain.rules
            if picked(rule.target.name)
        ]
        for chain, rule in jumps:
            chain.delete_rule(rule)
        ours = [chain.name for chain in table.chains if picked(chain.name)]
        for name in ours:
            table.flush_entries(name)  # first: chains of a generation jump to each other
        for name in ours:
            table.delete_chain(name)
        return bool(jumps or ours)

    def _switch(self, rs: Ruleset, gen: int) -> None:
        """Per table one commit: each built-in chain's jump to the new generation; old ones go."""
        iptc = self._lib()
        for name in TABLES:
            table = self._table(name)
            for builtin, rule in rs.jumps[name].items():
                chain = iptc.Chain(table, builtin)
                ours = [i for i, r in enumerate(chain.rules) if CHAIN.fullmatch(r.target.name)]
                jump = _iptc_rule(iptc, split(named(rule, gen)))
                jump.final_check()
                if ours:  # in place: it keeps its position among other tools' rules
                    chain.replace_rule(jump, ours[0])
                else:
                    chain.insert_rule(jump, 0)
            self._delete(table, lambda other: other != gen)
            table.commit()

    def learn(
        self,
        dispatch: str,
        entries: Mapping[IPv4Address, Learned],
        *,
        replace: bool,
        forget: Collection[IPv4Address] = (),
    ) -> None:
        raise BackendUnavailableError(FASTEST_NEEDS_NFTABLES)

    def remove(self) -> bool:
        try:
            tables = [self._table(name) for name in sorted(legacy_tables())]
        except BackendUnavailableError as exc:
            log.warning("cannot look for uplinkd's legacy iptables rules: %s", exc)
            return False
        removed = False
        with xtables_lock():
            for table in tables:
                table.refresh()
                if self._delete(table, lambda _gen: True):
                    table.commit()
                    removed = True
        return removed
