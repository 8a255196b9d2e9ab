"""The Plan: the complete desired kernel state as plain data, produced by planner.plan()."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field

from ..config.model import Firewall, Match, Nat, PortForward

IPv4Address = ipaddress.IPv4Address
IPv4Network = ipaddress.IPv4Network
IPv4Interface = ipaddress.IPv4Interface


@dataclass(frozen=True)
class LinkFacts:
    """What discovery found for one link's device."""

    name: str
    device: str
    address: IPv4Interface  # address with its prefix
    gateway: IPv4Address | None  # None: point-to-point without peer, routes go "dev" only
    peer: IPv4Address | None = None  # point-to-point peer address, when the device has one


@dataclass(frozen=True)
class PlannedLink:
    name: str
    id: int  # 1..MAX_LINKS
    mark: int  # id shifted into the mark mask
    table: int
    device: str
    address: IPv4Interface
    gateway: IPv4Address | None
    up: bool
    nat: Nat


class Selector(enum.StrEnum):
    """How a connection picks its bucket."""

    RANDOM = "random"  # numgen random: weighted, priority, enforced
    HASH_SOURCE = "source"
    HASH_DESTINATION = "destination"
    HASH_SOURCE_DESTINATION = "source+destination"


UNREACHABLE = 0  # bucket target meaning: no usable link, fail the connection at once


@dataclass(frozen=True)
class Dispatch:
    """One rule as the kernel sees it: a match, a bucket selector and what each bucket maps to.

    The match, selector and bucket count make up the structure of the ruleset; the targets are
    map contents, the only thing a link state change rewrites.
    """

    name: str  # identifier usable as an nft map name
    rule: str  # the configuration's rule name
    match: Match
    selector: Selector
    targets: tuple[int, ...]  # per bucket: link id, or UNREACHABLE
    seed: int = 0
    # fastest-response: destinations are raced and the winner kept this many seconds; the
    # buckets are the fallback for a destination not learned yet (None: other methods).
    cache_s: int | None = None
    # fastest-response: races a second, learned destinations kept at most, and whether
    # destinations outside the global Internet are raced (model.Rule).
    races_per_second: int = 0
    max_learned: int = 0
    race_private: bool = False
    # The map holding the targets when another rule's (identical in every link state) is used.
    map: str = ""

    @property
    def map_name(self) -> str:
        return self.map or self.name

    @property
    def live(self) -> frozenset[int]:
        """The ids of the rule's links in use now (every one owns at least one bucket)."""
        return frozenset(self.targets) - {UNREACHABLE}

    @property
    def buckets(self) -> int:
        return len(self.targets)


@dataclass(frozen=True)
class RouteSpec:
    table: int
    dst: IPv4Network
    device: str
    gateway: IPv4Address | None = None
    src: IPv4Address | None = None
    scope_link: bool = False


class RuleAction(enum.StrEnum):
    LOOKUP = "lookup"
    UNREACHABLE = "unreachable"


@dataclass(frozen=True)
class RuleSpec:
    priority: int
    action: RuleAction = RuleAction.LOOKUP
    table: int = 0
    fwmark: int | None = None
    fwmask: int | None = None
    src: IPv4Network | None = None
    oif: str | None = None
    suppress_prefixlength: int | None = None


@dataclass(frozen=True)
class HookLine:
    """An nftables command from a firewall/ hook file, applied in uplinkd's transaction."""

    path: str
    line: int
    text: str


@dataclass(frozen=True)
class Plan:
    """Everything the kernel must hold for one configuration, the links' facts and which links
    are up: per link its mark, table and routes; the rules' dispatch maps; NAT, firewall and
    hook lines. Frozen: the planner makes it, the backends render and apply it."""

    links: tuple[PlannedLink, ...]
    dispatches: tuple[Dispatch, ...]
    lan_devices: tuple[str, ...]
    forwards: tuple[PortForward, ...]
    firewall: Firewall
    firewall_groups: tuple[tuple[str, ...], ...]  # forwarding groups resolved to device names
    mark_mask: int
    routes: tuple[RouteSpec, ...]
    rules: tuple[RuleSpec, ...]
    tables: tuple[int, ...]  # every routing table id uplinkd owns
    sysctls: tuple[tuple[str, str], ...] = ()
    nft_hook_lines: tuple[HookLine, ...] = field(default=())
    # The measured methods' picks (rule name -> link name): the next plan's hysteresis input.
    choices: dict[str, str] = field(default_factory=dict)

    def link(self, name: str) -> PlannedLink:
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(name)
