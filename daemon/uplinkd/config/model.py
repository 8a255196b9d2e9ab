"""The configuration as plain, validated data (read by tomlconf.py and balanceconf.py)."""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from .. import const


class Method(enum.StrEnum):
    WEIGHTED = "weighted"
    PRIORITY = "priority"
    OVERFLOW = "overflow"
    PERSISTENCE = "persistence"
    LEAST_USED = "least-used"
    LOWEST_LATENCY = "lowest-latency"
    ENFORCED = "enforced"
    FASTEST_RESPONSE = "fastest-response"


# The methods that choose from measured traffic or latency, and those needing link bandwidths.
MEASURED_METHODS = frozenset({Method.OVERFLOW, Method.LEAST_USED, Method.LOWEST_LATENCY})
BANDWIDTH_METHODS = frozenset({Method.OVERFLOW, Method.LEAST_USED})


class HashBy(enum.StrEnum):
    SOURCE = "source"
    DESTINATION = "destination"
    SOURCE_DESTINATION = "source+destination"


class Nat(enum.StrEnum):
    MASQUERADE = "masquerade"
    SNAT = "snat"
    NONE = "none"


@dataclass(frozen=True)
class Monitor:
    """Link monitoring settings: foolsm's names and meanings, uplinkd's faster defaults.

    The comments give what Net-ISP-Balance ran foolsm with: the lsm.conf load_balance.pl 1.33
    writes (its documentation quotes foolsm's compiled-in 1000/1000/15/7/5/10, which lsm.conf
    overrides). foolsm takes the percentages over its last 100 probes, uplinkd over its last
    const.LOSS_WINDOW_ROUNDS rounds, so equal numbers recover at different speeds (README.md,
    "Link monitoring")."""

    interval_ms: int = 200  # Net-ISP-Balance: 1000
    timeout_ms: int = 300  # 500; rounds overlap, so this does not slow the cadence
    max_packet_loss: int = 20  # percent of the window; 20 (of foolsm's 100 probes)
    max_successive_pkts_lost: int = 3  # 7
    min_packet_loss: int = 10  # percent of the window; 10 (of foolsm's 100 probes)
    min_successive_pkts_rcvd: int = 5  # 5
    long_down_time: int = 60  # seconds; 120
    warn_email: str = ""


@dataclass(frozen=True)
class LinkConfig:
    name: str
    device: str
    gateway: ipaddress.IPv4Address | None = None  # None: discover
    weight: int = 1
    priority: int = 1  # 1 = first choice for priority rules
    # Addresses, and host names resolved while the daemon runs (monitor/resolver.py); empty: probe
    # the link's gateway.
    targets: tuple[ipaddress.IPv4Address | str, ...] = ()
    reliability: int = 1
    bandwidth_down_mbps: float | None = None
    bandwidth_up_mbps: float | None = None
    nat: Nat = Nat.MASQUERADE
    monitor: Monitor = field(default_factory=Monitor)
    line: int = 0  # where it was defined, for error messages


@dataclass(frozen=True)
class LanConfig:
    name: str
    device: str
    line: int = 0  # where it was defined: errors and the warning for a device that is missing


@dataclass(frozen=True)
class PortRange:
    first: int
    last: int

    def __str__(self) -> str:
        return str(self.first) if self.first == self.last else f"{self.first}-{self.last}"


@dataclass(frozen=True)
class Match:
    """A traffic class; empty fields match anything."""

    src: tuple[ipaddress.IPv4Network, ...] = ()
    dst: tuple[ipaddress.IPv4Network, ...] = ()
    proto: str | None = None  # tcp | udp | icmp
    sport: tuple[PortRange, ...] = ()
    dport: tuple[PortRange, ...] = ()
    iif: tuple[str, ...] = ()  # input devices

    def is_empty(self) -> bool:
        return not (self.src or self.dst or self.proto or self.sport or self.dport or self.iif)


@dataclass(frozen=True)
class Rule:
    name: str
    method: Method
    match: Match = field(default_factory=Match)
    links: tuple[str, ...] = ()  # empty: every link
    by: HashBy = HashBy.SOURCE  # persistence only
    line: int = 0
    saturation_percent: int = const.DEFAULT_SATURATION_PERCENT  # overflow only
    cache_seconds: int = const.DEFAULT_FASTEST_CACHE_S  # fastest-response only
    # fastest-response only: new destinations raced per second (more use the weighted buckets);
    # 20 races through 2 links are 40 connections a second from the router, whatever a LAN
    # client does.
    races_per_second: int = 20
    # fastest-response only: destinations kept at most (in the kernel's map and the daemon);
    # 4096 entries are about 1 MB in the daemon and 0.5 MB in the kernel.
    max_learned: int = 4096
    # fastest-response only: also race destinations that are not globally reachable (private,
    # shared, loopback, link-local, multicast, documentation, reserved ranges).
    race_private: bool = False


@dataclass(frozen=True)
class PortForward:
    port: PortRange
    host: ipaddress.IPv4Address
    host_port: int | None = None  # None: same port
    proto: str = "tcp"
    links: tuple[str, ...] = ()  # empty: arriving on any link
    line: int = 0  # where it was defined, for error messages


@dataclass(frozen=True)
class Firewall:
    """Net-ISP-Balance's restrictive firewall; off unless asked for."""

    enabled: bool = False
    # Each group lists link and LAN names whose members may forward to each other.
    forwarding_groups: tuple[tuple[str, ...], ...] = ()
    ssh_from_lan: bool = True
    icmp_rate_per_second: int = 10


@dataclass(frozen=True)
class MailSettings:
    """[mail]: how state-change alerts reach each link's warn_email (see publish/mail.py)."""

    smtp_server: str = ""  # "host" or "host:port" (25; 465 is implicit TLS); "": local sendmail
    sender: str = ""  # "": uplinkd@<hostname>
    starttls: bool = False
    username: str = ""  # with password: SMTP login (after STARTTLS when starttls is set)
    password: str = ""
    max_per_hour: int = 10  # per link; later changes are counted and summarized in the next mail
    timeout_s: float = 10.0  # each SMTP connect, read and write; a whole sendmail run


@dataclass(frozen=True)
class Config:
    """One configuration, validated, whichever file format it came from (uplinkd.toml or
    balance.conf): links, LANs, rules, forwards, firewall, mail and the kernel shape's numbers."""

    path: Path
    format: str  # "toml" | "balance.conf"
    links: tuple[LinkConfig, ...]
    lans: tuple[LanConfig, ...] = ()
    rules: tuple[Rule, ...] = ()  # ordered, first match wins; excludes the default
    default: Rule = field(default_factory=lambda: Rule(name="default", method=Method.WEIGHTED))
    forwards: tuple[PortForward, ...] = ()
    firewall: Firewall = field(default_factory=Firewall)
    mail: MailSettings = field(default_factory=MailSettings)
    mark_mask: int = const.DEFAULT_MARK_MASK
    table_base: int = const.DEFAULT_TABLE_BASE
    rule_priority: int = const.DEFAULT_RULE_PRIORITY
    backend: str = "nftables"
    stop_removes_datapath: bool = False  # on SIGTERM; default keeps traffic flowing

    @property
    def hook_root(self) -> Path:
        """Where the hook directories are: beside an uplinkd.toml; for a balance.conf in
        `balance/` beside it, Net-ISP-Balance's own layout (/etc/network/balance/firewall/...)."""
        if self.format == "balance.conf":
            return self.path.parent / "balance"
        return self.path.parent

    def link(self, name: str) -> LinkConfig:
        for link in self.links:
            if link.name == name:
                return link
        raise KeyError(name)

    # A link's number is its place in the configuration, from 1, so that a link left out of a
    # plan renumbers no other; its mark and routing table follow from it, and from nothing else.
    def link_id(self, name: str) -> int:
        for index, link in enumerate(self.links):
            if link.name == name:
                return index + 1
        raise KeyError(name)

    def link_mark(self, name: str) -> int:
        """The link's connection mark: its number, in the bits of mark_mask."""
        shift = (self.mark_mask & -self.mark_mask).bit_length() - 1
        return self.link_id(name) << shift

    def link_table(self, name: str) -> int:
        return self.table_base + self.link_id(name)
