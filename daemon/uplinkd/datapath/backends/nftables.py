"""The nftables backend: applies the ruleset nft_ruleset.py renders, in-process (libnftables),
and reads back what the kernel holds: its state set by name on each apply, every map once when
a daemon starting again adopts the table.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Mapping
from ipaddress import IPv4Address
from typing import Any

from ... import const
from ...errors import ApplyError, HookError
from ...planning.plan import UNREACHABLE, HookLine, Plan
from ..nftlib import Nft, NftError
from .base import AppliedState, ApplyKind, Learned, Transaction
from .nft_ruleset import (
    DIGEST_PREFIX,
    LEARNED_PREFIX,
    NAME_SET_PREFIX,
    NO_LINK_CHAIN,
    STATE_SET,
    TABLE,
    element_updates,
    learned_map,
    link_chain,
    map_targets,
    owners,
    render,
    structure_digest,
    table_text,
    up_link_ids,
)

log = logging.getLogger("uplinkd")


def _targets(elements: list[Any]) -> tuple[int, ...]:
    by_bucket: dict[int, int] = {}
    for key, verdict in elements:
        chain = verdict.get("goto", {}).get("target", "")
        by_bucket[int(key)] = UNREACHABLE if chain == NO_LINK_CHAIN else int(chain.split("_")[1])
    return tuple(by_bucket[bucket] for bucket in sorted(by_bucket))


class NftablesBackend:
    name = "nftables"

    def __init__(self) -> None:
        self._nft: Nft | None = None
        self._nft_json: Nft | None = None  # see STATE_SET: never mix formats in one context
        # What this process last committed: (structure digest, map name -> targets); None
        # until the first commit or read, and after a failed one (then the kernel is read).
        self._committed: tuple[str, dict[str, tuple[int, ...]]] | None = None

    @property
    def nft(self) -> Nft:
        if self._nft is None:
            self._nft = Nft()
        return self._nft

    @property
    def nft_json(self) -> Nft:
        if self._nft_json is None:
            self._nft_json = Nft(json_output=True)
        return self._nft_json

    def check_available(self) -> None:
        self.nft.run("list tables")

    def render(self, plan: Plan) -> str:
        return render(plan)

    def read_back(self) -> AppliedState | None:
        # The sets and maps only: listing the whole table also serialises every rule, which
        # took 75 ms of each read at 1000 rules against 15 ms for these two.
        try:
            items = [
                item
                for kind in ("sets", "maps")
                for item in self.nft_json.run_json(f"list {kind} {const.NFT_FAMILY}")
                if next(iter(item.values())).get("table") == const.NFT_TABLE
            ]
        except NftError:
            return None
        if not any(item.get("set", {}).get("name") == STATE_SET for item in items):
            return None  # no table of ours (or not one this version wrote): rebuild it whole
        structure = ""
        maps: dict[str, tuple[int, ...]] = {}
        names: dict[int, str] = {}
        up: frozenset[int] = frozenset()
        for item in items:
            nft_set = item.get("set", {})
            if nft_set.get("name") == STATE_SET:
                structure = nft_set.get("comment", "").removeprefix(DIGEST_PREFIX)
                up = frozenset(int(element) for element in nft_set.get("elem", []))
            elif nft_set.get("name", "").startswith(NAME_SET_PREFIX):
                names[int(nft_set["name"].removeprefix(NAME_SET_PREFIX))] = nft_set.get(
                    "comment", ""
                )
            nft_map = item.get("map")
            learned = nft_map and nft_map.get("name", "").startswith(LEARNED_PREFIX)
            if nft_map and nft_map.get("map") == "verdict" and not learned:
                maps[nft_map["name"]] = _targets(nft_map.get("elem", []))
        return AppliedState(structure, maps, names, up)

    def prepare(self, plan: Plan) -> Transaction:
        digest = structure_digest(plan)
        held = self._held(digest)
        if held is None:
            text = render(plan)
            return Transaction(
                ApplyKind.FULL,
                lambda: self._run(text, plan, check_only=True),
                lambda: self._commit(text, plan, digest),
            )
        maps, up = held
        changed = [d for d in owners(plan.dispatches) if maps.get(d.name) != d.targets]
        if not changed and up == up_link_ids(plan):
            return Transaction(ApplyKind.NONE)
        text = element_updates(plan, changed, maps)
        return Transaction(ApplyKind.MAPS, _commit=lambda: self._commit(text, plan, digest))

    def _held(self, digest: str) -> tuple[dict[str, tuple[int, ...]], frozenset[int]] | None:
        """The maps and links up that the kernel holds in this structure; None: rebuild.

        Read is the state set alone, by name: listing the sets and maps of the family would
        also list every destination fastest-response learned (135 ms with 4,600 of them, in
        the loop, on every apply). Only uplinkd writes its maps, so they are what this process
        last committed; the first time (a restart adopting the table), they are listed once.
        """
        try:
            items = self.nft_json.run_json(f"list set {TABLE} {STATE_SET}")
        except NftError:
            return None  # no table of ours (or not one this version wrote)
        state: dict[str, Any] = next((item["set"] for item in items if "set" in item), {})
        if state.get("comment", "").removeprefix(DIGEST_PREFIX) != digest:
            return None
        up = frozenset(int(element) for element in state.get("elem", []))
        if self._committed is None or self._committed[0] != digest:
            current = self.read_back()
            if current is None or current.structure != digest:
                return None
            self._committed = (digest, current.maps)
        return self._committed[1], up

    def _commit(self, text: str, plan: Plan, digest: str) -> None:
        self._committed = None  # not known until it went in
        self._run(text, plan)
        self._committed = (digest, map_targets(plan))

    def learn(
        self,
        dispatch: str,
        entries: Mapping[IPv4Address, Learned],
        *,
        replace: bool,
        forget: Collection[IPv4Address] = (),
    ) -> None:
        name = learned_map(dispatch)
        items = ", ".join(
            f"{address} timeout {max(1, round(entry.seconds))}s : goto {link_chain(entry.link)}"
            for address, entry in entries.items()
        )
        add = f"add element {TABLE} {name} {{ {items} }}\n" if entries else ""
        try:
            if forget and not replace:
                keys = ", ".join(str(address) for address in forget)
                self.nft.run(f"delete element {TABLE} {name} {{ {keys} }}\n")
            if replace:
                self.nft.run(f"flush map {TABLE} {name}\n{add}")
            elif add:
                try:
                    self.nft.run(add)
                except NftError:  # an address still there with another link: replace it
                    keys = ", ".join(str(address) for address in entries)
                    self.nft.run(f"delete element {TABLE} {name} {{ {keys} }}\n{add}")
        except NftError as exc:
            raise ApplyError(f"cannot update the destinations of rule map {name}: {exc}") from exc

    def _run(self, commands: str, plan: Plan, *, check_only: bool = False) -> None:
        try:
            self.nft.run(commands, check_only=check_only)
        except NftError as exc:
            bad = self._failing_hook_line(plan)
            if bad is not None:
                message = f"nftables refused this line: {exc}"
                raise HookError(bad.path, message, line=bad.line) from exc
            message = f"nftables refused the transaction (nothing was applied): {exc}"
            raise ApplyError(message) from exc

    def _failing_hook_line(self, plan: Plan) -> HookLine | None:
        """Find the first hook line that makes an otherwise valid transaction fail."""
        if not plan.nft_hook_lines:
            return None
        base = f"table {TABLE}\ndelete table {TABLE}\n" + table_text(plan)
        text = base
        for line in plan.nft_hook_lines:
            text += line.text + "\n"
            try:
                self.nft.run(text, check_only=True)
            except NftError:
                return line
        return None

    def remove(self) -> bool:
        # Whatever the table holds (even without a state set uplinkd could read back).
        self._committed = None
        if f"table {TABLE}\n" not in self.nft.run(f"list tables {const.NFT_FAMILY}") + "\n":
            return False
        self.nft.run(f"delete table {TABLE}")
        return True
