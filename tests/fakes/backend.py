"""A backend that keeps the applied state in memory, for unit tests of everything above it."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from ipaddress import IPv4Address

from uplinkd.datapath.backends.base import AppliedState, ApplyKind, Learned, Transaction
from uplinkd.datapath.backends.nft_ruleset import map_targets, structure_digest, up_link_ids
from uplinkd.errors import ApplyError
from uplinkd.planning.plan import Plan


class FakeBackend:
    name = "fake"

    def __init__(self) -> None:
        self.state: AppliedState | None = None
        self.applies: list[ApplyKind] = []
        self.learned: dict[str, dict[IPv4Address, Learned]] = {}

    def check_available(self) -> None:
        return None

    def render(self, plan: Plan) -> str:
        return f"# fake ruleset {structure_digest(plan)}\n"

    def prepare(self, plan: Plan) -> Transaction:
        wanted = AppliedState(
            structure_digest(plan),
            map_targets(plan),
            {link.id: link.name for link in plan.links},
            up_link_ids(plan),
        )
        if self.state is None or self.state.structure != wanted.structure:
            kind = ApplyKind.FULL
        elif (self.state.maps, self.state.up_links) != (wanted.maps, wanted.up_links):
            kind = ApplyKind.MAPS
        else:
            kind = ApplyKind.NONE

        def commit() -> None:
            self.state = wanted
            self.applies.append(kind)

        return Transaction(kind, _commit=commit)

    def read_back(self) -> AppliedState | None:
        return self.state

    def learn(
        self,
        dispatch: str,
        entries: Mapping[IPv4Address, Learned],
        *,
        replace: bool,
        forget: Collection[IPv4Address] = (),
    ) -> None:
        if replace:
            self.learned[dispatch] = {}
        held = self.learned.setdefault(dispatch, {})
        if any(address not in held for address in forget):
            raise ApplyError(f"cannot forget destinations of rule {dispatch}: not in its map")
        for address in forget:
            del held[address]
        self.learned.setdefault(dispatch, {}).update(entries)

    def remove(self) -> bool:
        had = self.state is not None
        self.state = None
        return had
