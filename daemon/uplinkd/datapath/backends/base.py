"""The interface every netfilter backend implements (and the fake one for unit tests)."""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Protocol

from ...planning.plan import Plan


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


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class Transaction:
    """Bringing the kernel to one plan, as prepared from one read of what it holds: `kind` says
    what committing changes. check() has the kernel validate a rebuild without committing it
    (a map update needs none); commit() applies it, all or nothing (raises if refused)."""

    kind: ApplyKind
    _check: Callable[[], None] = _nothing
    _commit: Callable[[], None] = _nothing

    def check(self) -> None:
        if self.kind is ApplyKind.FULL:
            self._check()

    def commit(self) -> ApplyKind:
        if self.kind is not ApplyKind.NONE:
            self._commit()
        return self.kind


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

    def prepare(self, plan: Plan) -> Transaction:
        """The transaction that brings the kernel to the plan: what the kernel holds is read
        (once), what must change is rendered (once); nothing is changed yet."""

    def read_back(self) -> AppliedState | None:
        """What uplinkd's ruleset in the kernel currently holds (all of it: a daemon starting
        adopts it); None if there is none."""

    def learn(
        self,
        dispatch: str,
        entries: Mapping[IPv4Address, Learned],
        *,
        replace: bool,
        forget: Collection[IPv4Address] = (),
    ) -> None:
        """Add destinations to a fastest-response rule's learned map (with replace: make them
        its whole content), after deleting those in `forget`; ApplyError if the kernel refuses
        (one of `forget` not in the map, say: it timed out there)."""

    def remove(self) -> bool:
        """Remove everything this backend added; True if there was something to remove."""
