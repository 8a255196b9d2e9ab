"""A backend that keeps the applied state in memory, for unit tests of everything above it."""

from __future__ import annotations

from collections.abc import Mapping
from ipaddress import IPv4Address

from ..plan import Plan
from .base import AppliedState, ApplyKind, Learned
from .nftables import map_targets, structure_digest, up_link_ids


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

    def needs_rebuild(self, plan: Plan) -> bool:
        return self.state is None or self.state.structure != structure_digest(plan)

    def check(self, plan: Plan) -> None:
        return None

    def apply(self, plan: Plan) -> ApplyKind:
        wanted = AppliedState(
            structure_digest(plan),
            map_targets(plan),
            {link.id: link.name for link in plan.links},
            up_link_ids(plan),
        )
        if self.state is None or self.state.structure != wanted.structure:
            kind = ApplyKind.FULL
        elif self.state.maps != wanted.maps:
            kind = ApplyKind.MAPS
        else:
            kind = ApplyKind.NONE
        self.state = wanted
        self.applies.append(kind)
        return kind

    def read_back(self) -> AppliedState | None:
        return self.state

    def learn(
        self, dispatch: str, entries: Mapping[IPv4Address, Learned], *, replace: bool
    ) -> None:
        if replace:
            self.learned[dispatch] = {}
        self.learned.setdefault(dispatch, {}).update(entries)

    def remove(self) -> bool:
        had = self.state is not None
        self.state = None
        return had
