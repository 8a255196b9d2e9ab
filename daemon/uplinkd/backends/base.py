"""The interface every netfilter backend implements (and the fake one for unit tests)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Protocol

from ..plan import Plan


class ApplyKind(enum.StrEnum):
    NONE = "none"  # the kernel already held this plan
    MAPS = "maps"  # only map contents changed: a link state change
    FULL = "full"  # the ruleset's structure changed: rebuilt in one transaction


@dataclass(frozen=True)
class AppliedState:
    """What a backend reads back from the kernel."""

    structure: str  # digest of the structural part of the ruleset
    maps: dict[str, tuple[int, ...]] = field(default_factory=dict)  # map name -> per bucket link id
    link_names: dict[int, str] = field(default_factory=dict)  # link id -> name
    up_links: frozenset[int] = frozenset()  # ids of the links that were up when it was applied


@dataclass(frozen=True)
class Learned:
    """A destination fastest-response learned: the link that answered first, for how long."""

    link: int  # link id
    seconds: float  # left before the kernel forgets it


class Backend(Protocol):
    name: str

    def check_available(self) -> None:
        """Raise BackendUnavailableError with a clear reason if this backend cannot work here."""

    def render(self, plan: Plan) -> str:
        """The complete ruleset as text a person (and `nft -f`) can read."""

    def needs_rebuild(self, plan: Plan) -> bool:
        """Whether applying the plan changes more than map contents."""

    def check(self, plan: Plan) -> None:
        """Have the kernel validate the transaction without committing it; raise if refused."""

    def apply(self, plan: Plan) -> ApplyKind:
        """Bring the kernel to the plan in one transaction; all or nothing."""

    def read_back(self) -> AppliedState | None:
        """What uplinkd's ruleset in the kernel currently holds; None if there is none."""

    def learn(
        self, dispatch: str, entries: Mapping[IPv4Address, Learned], *, replace: bool
    ) -> None:
        """Add destinations to a fastest-response rule's learned map (with replace: make them
        its whole content); ApplyError if the kernel refuses."""

    def remove(self) -> bool:
        """Remove everything this backend added; True if there was something to remove."""
