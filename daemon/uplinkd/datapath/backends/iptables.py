"""The legacy iptables backend: the same Plan in the legacy x_tables, written with python-iptables.

The rules are ipt_ruleset.py's: the nftables ruleset's shape over mangle, nat and filter.

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
import logging
import os
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from ipaddress import IPv4Address
from typing import Any

from ... import const
from ...config.validate import FASTEST_NEEDS_NFTABLES
from ...errors import ApplyError, BackendUnavailableError, HookError
from ...planning.plan import UNREACHABLE, Plan
from ..nftlib import Nft, NftError
from .base import AppliedState, ApplyKind, Learned, Transaction
from .ipt_ruleset import (
    TABLES,
    VIA,
    Ruleset,
    build,
    map_targets,
    named,
    render,
    split,
    state_comment,
    structure_digest,
)

log = logging.getLogger("uplinkd")

XT_TABLES = frozenset({"filter", "nat", "mangle", "raw", "security"})
XT_BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
XTABLES_LOCK = "/run/xtables.lock"
_LOCK_WAIT_S = 3.0  # like `iptables -w 3`; longer would stall the daemon's event loop
_MAX_GEN = 99999  # keeps chain names well within iptables' 28 characters
CHAIN = re.compile(r"UPLINKD-(\d+)-(\w+)")
_ADVICE = 'use backend = "nftables" (or "auto") in the configuration, or uplinkd --backend nftables'


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
                names[int(part[2][1:])] = comment(entries[0]).removeprefix(VIA)
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
        rules = build(plan, state_comment(plan))
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
