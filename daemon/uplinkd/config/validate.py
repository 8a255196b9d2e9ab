"""The checks both configuration formats share, so an error reads the same in either.

The TOML reader (tomlconf.py), the balance.conf reader (balanceconf.py) and the `.py` hooks
(hooks/stages.py) parse values with the parse_* functions here and check what they built with the
check_* functions; validate() checks a whole model.Config. Every error names the file, line and
key (At).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

from .. import const
from ..errors import ConfigError
from .model import (
    BANDWIDTH_METHODS,
    Config,
    HashBy,
    LinkConfig,
    MailSettings,
    Method,
    Monitor,
    PortForward,
    PortRange,
    Rule,
)

PROTOCOLS = ("tcp", "udp", "icmp")
FORWARD_PROTOCOLS = ("tcp", "udp")
BACKENDS = ("nftables", "iptables", "auto")
MONITOR_KEYS = tuple(f.name for f in fields(Monitor))
# Lowest and highest value of each numeric Monitor key.
MONITOR_LIMITS: Mapping[str, tuple[int, int]] = {
    # 10 ms: faster rounds only measure the probe's own cost; a minute: slower ones no longer
    # watch a link (20 rounds, the loss window, would span 20 minutes).
    "interval_ms": (10, 60_000),
    # A reply later than a minute is a lost probe on any path (rounds overlap: no tie to interval).
    "timeout_ms": (1, 60_000),
    "max_packet_loss": (0, 100),  # percent
    # 1000 rounds in a row: past that, a dead link would stay up for hours even at 10 ms rounds.
    "max_successive_pkts_lost": (1, 1000),
    "min_packet_loss": (0, 100),  # percent
    "min_successive_pkts_rcvd": (1, 1000),  # as max_successive_pkts_lost
    "long_down_time": (0, 7 * 86_400),  # seconds; a week is long down by any measure
}
MAIL_KEYS = tuple(f.name for f in fields(MailSettings))
SMTP_PORT = 25
SMTPS_PORT = 465  # TLS from the first byte, so STARTTLS does not apply
# Weights become map buckets: when no exact split of at most const.MAX_EXACT_BUCKETS exists the
# map has one bucket per unit of total weight, so 1000 per link keeps it loadable (254 links).
MAX_WEIGHT = 1000
MAX_PRIORITY = 0xFFFF_FFFF  # an order only; published on D-Bus as a uint32
# 1 Tbit/s: above any uplink; rates are compared as floats in bit/s (inf and nan are refused).
MAX_BANDWIDTH_MBPS = 1_000_000.0
# iptables' limit match takes at most 10000/s (XT_LIMIT_SCALE), and both backends render it.
MAX_ICMP_RATE = 10_000
# fastest-response: races a second (1000 through 2 links is already 2000 connections a second
# from the router) and learned destinations kept (65536: about 16 MB in the daemon).
FASTEST_LIMITS: Mapping[str, tuple[int, int]] = {
    "races_per_second": (1, 1000),
    "max_learned": (16, 65_536),
}
MAX_MAILS_PER_HOUR = 3600  # one a second: more is a flood, not an alert
MAX_MAIL_TIMEOUT_S = 300.0  # an SMTP exchange stuck for 5 minutes will not recover
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_IFNAMSIZ = 16  # the kernel's limit on device names, including the terminating NUL byte
# What the kernel refuses in a device name (dev_valid_name: '/', ':', white space), and what
# cannot be written safely into the nftables ruleset or `ip -batch` input, quoted or not:
# quotes end a string, '#' starts a comment, ';' '{' '}' end statements and blocks, '$' names
# a variable, '\\' escapes and '*' is a wildcard in an interface name match.
_DEVICE_REFUSED = frozenset("/:\"'`#;{}$\\*")
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# A host name (RFC 1123 labels, at most 253 characters); all digits and dots is an address.
_HOST = re.compile(rf"(?![\d.]+$)(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
_MAIN_RULE_PRIORITY = 32766  # the kernel's "lookup main" rule; uplinkd's rules must come first
_RESERVED_TABLES = frozenset({0, 253, 254, 255})  # unspec, default, main, local
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


@dataclass(frozen=True)
class At:
    """Where a value was written, for the error that names it."""

    path: Path
    line: int = 0
    key: str = ""

    def error(self, message: str) -> ConfigError:
        return ConfigError(self.path, message, line=self.line, key=self.key)


class AtFn(Protocol):
    """Where a key (and optionally one value of it) of one configuration object was written."""

    def __call__(self, key: str, value: object = None, /) -> At: ...


def line_at(path: Path, line: int, prefix: str = "") -> AtFn:
    """Every key of one object is at its line (balance.conf rows, objects built in code)."""

    def at(key: str, value: object = None, /) -> At:
        return At(path, line, f"{prefix}.{key}" if prefix else key)

    return at


def listing(values: Iterable[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


# --- value parsers shared by both formats and the hooks -------------------------------------------


def check_name(name: str, at: At) -> None:
    if not _NAME.fullmatch(name):
        raise at.error(
            f"invalid name '{name}': use 1-32 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )


def check_device(device: str, at: At) -> None:
    """A name the kernel accepts for a device and that can be written into the ruleset."""
    if not device:
        raise at.error("a device is required, e.g. 'eth0'")
    refused = sorted({c for c in device if c in _DEVICE_REFUSED or not c.isprintable()})
    refused += sorted({c for c in device if c.isspace()} - set(refused))
    if refused or device in {".", ".."} or len(device.encode()) >= _IFNAMSIZ:
        why = f"it contains {', '.join(repr(c) for c in refused)}; " if refused else ""
        raise at.error(
            f"invalid device name {device!r}: {why}a device name is 1-15 bytes without white "
            "space or any of / : \" ' ` # ; { } $ \\ *"
        )


def parse_target(text: str, at: At) -> ipaddress.IPv4Address | str:
    """A probe target: an IPv4 address, or a host name resolved when the daemon probes
    (never here, so a router that boots before its DNS works still starts)."""
    if _HOST.fullmatch(text):
        return text
    return parse_ipv4(text, at, "an IPv4 address or a host name")


def same_name(name: str, names: Iterable[str]) -> str | None:
    """The one of names that is name, else the one that is name in another case (names are
    case-insensitive, as load_balance.pl upper-cased the services named on its command line)."""
    known = list(names)
    if name in known:
        return name
    folded = [known_name for known_name in known if known_name.casefold() == name.casefold()]
    return folded[0] if len(folded) == 1 else None


def parse_ipv4(text: str, at: At, what: str = "an IPv4 address") -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise at.error(f"'{text}' is not {what}") from None


def parse_network(text: str, at: At, *, strict: bool = True) -> ipaddress.IPv4Network:
    """A prefix; strict=False clears host bits (10.1.2.3/8 is 10.0.0.0/8), as iptables did."""
    try:
        return ipaddress.IPv4Network(text)
    except ValueError:
        try:
            loose = ipaddress.IPv4Network(text, strict=False)
        except ValueError:
            raise at.error(f"'{text}' is not an IPv4 address or prefix like 10.0.0.0/8") from None
        if not strict:
            return loose
        raise at.error(f"'{text}' has host bits set; did you mean {loose}?") from None


def parse_port_range(value: object, at: At) -> PortRange:
    """A port (443, "443") or an inclusive range ("8000-8080")."""
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    found = re.fullmatch(r"\s*(\d{1,5})\s*(?:-\s*(\d{1,5})\s*)?", text)
    if found:
        first = int(found.group(1))
        last = int(found.group(2) or first)
        if 1 <= first <= last <= 65535:
            return PortRange(first, last)
    raise at.error(f'{value!r} is not a port (1-65535) or a port range like "8000-8080"')


def parse_forward_target(text: str, at: At) -> tuple[ipaddress.IPv4Address, int | None]:
    """Net-ISP-Balance's forward() target: "192.168.10.35" or "192.168.10.35:22"."""
    host, sep, port = text.partition(":")
    address = parse_ipv4(host, at, "an IPv4 address, optionally with ':port'")
    if not sep:
        return address, None
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise at.error(f"'{text}': the port after ':' must be 1-65535")
    return address, int(port)


def parse_smtp_server(text: str, at: At) -> tuple[str, int]:
    """A mail server: "host", "host:port", "[IPv6]" or "[IPv6]:port"; port 25 by default."""
    found = re.fullmatch(r"(?:\[([0-9A-Fa-f:.]+)\]|([^\s:\[\]]+))(?::(\d{1,5}))?", text)
    port = int(found.group(3) or SMTP_PORT) if found else 0
    if not found or not 1 <= port <= 65535:
        raise at.error(f'\'{text}\' is not a mail server like "mail.example.net" or "host:587"')
    return found.group(1) or found.group(2), port


def parse_method(text: str, at: At) -> Method:
    try:
        method = Method(text)
    except ValueError:
        raise at.error(
            f"unknown method '{text}'; the methods are {listing(m.value for m in Method)}"
        ) from None
    return method


def parse_by(text: str, at: At) -> HashBy:
    try:
        return HashBy(text)
    except ValueError:
        raise at.error(f"unknown value '{text}'; allowed: {listing(HashBy)}") from None


def expand_group(
    tokens: Sequence[str], links: Sequence[str], lans: Sequence[str], at: AtFn
) -> tuple[str, ...]:
    """A forwarding group: link and LAN names, ':isp' for every link, ':lan' for every LAN."""
    members: list[str] = []
    for token in tokens:
        member = same_name(token, [":isp", ":lan", *links, *lans])
        if member is None:
            known = listing([*links, *lans, ":isp", ":lan"])
            message = f"unknown name '{token}' in a forwarding group; known: {known}"
            raise at("forwarding_groups", token).error(message)
        names = links if member == ":isp" else lans if member == ":lan" else [member]
        members += [name for name in names if name not in members]
    if not members:
        raise at("forwarding_groups").error("a forwarding group needs at least one member")
    return tuple(members)


# --- checks of one object, shared by both parsers and by validate() -------------------------------


def check_range(value: float, low: float, high: float, at: At) -> None:
    """low <= value <= high; nan is refused too (TOML has nan and inf)."""
    if not low <= value <= high:
        allowed = f"between {_number(low)} and {_number(high)}"
        raise at.error(f"{_number(value)} is out of range; it must be {allowed}")


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_monitor(monitor: Monitor, at: AtFn) -> None:
    for key, (low, high) in MONITOR_LIMITS.items():
        check_range(getattr(monitor, key), low, high, at(key))
    if monitor.max_packet_loss <= monitor.min_packet_loss:
        raise at("max_packet_loss").error(
            f"must be greater than min_packet_loss ({monitor.min_packet_loss}), "
            "or the link would flap between up and down"
        )


def check_mail(mail: MailSettings, at: AtFn) -> None:
    port = parse_smtp_server(mail.smtp_server, at("smtp_server"))[1] if mail.smtp_server else 0
    if mail.starttls and port == SMTPS_PORT:
        raise at("starttls").error("port 465 is TLS from the start; set starttls = false")
    if mail.starttls and not mail.smtp_server:
        raise at("starttls").error("applies only with smtp_server (sendmail has its own settings)")
    if mail.sender and not re.fullmatch(r"[^\s@<>,]+@[^\s@<>,]+", mail.sender):
        raise at("sender").error(f"'{mail.sender}' is not a mail address like uplinkd@example.net")
    for key, other in (("username", "password"), ("password", "username")):
        if getattr(mail, key) and not getattr(mail, other):
            raise at(key).error(f"needs {other} too (SMTP login)")
    if (mail.username or mail.password) and not mail.smtp_server:
        raise at("username").error("applies only with smtp_server")
    check_range(mail.max_per_hour, 1, MAX_MAILS_PER_HOUR, at("max_per_hour"))
    if not 0 < mail.timeout_s <= MAX_MAIL_TIMEOUT_S:
        raise at("timeout_s").error(
            f"{mail.timeout_s:g} is out of range; it must be > 0 and <= {MAX_MAIL_TIMEOUT_S:g}"
        )


def check_link(link: LinkConfig, at: AtFn) -> None:
    check_name(link.name, at("name"))
    check_device(link.device, at("device"))
    check_range(link.weight, 1, MAX_WEIGHT, at("weight"))
    check_range(link.priority, 1, MAX_PRIORITY, at("priority"))
    folded = [str(target).casefold().rstrip(".") for target in link.targets]
    for target, key in zip(link.targets, folded, strict=True):
        if isinstance(target, str):
            parse_target(target, at("targets", target))
        elif target.is_unspecified or target.is_multicast or target == _BROADCAST:
            raise at("targets", target).error(f"{target} cannot be a probe target")
        if folded.count(key) > 1:
            raise at("targets", target).error(f"{target} is listed twice")
    if link.reliability < 1:
        raise at("reliability").error(f"{link.reliability} is out of range; it must be at least 1")
    # No targets: the link's gateway is the one probe target.
    if link.reliability > max(1, len(link.targets)):
        raise at("reliability").error(
            f"{link.reliability} targets must answer but the link has only "
            f"{max(1, len(link.targets))}; reliability is at most the number of targets"
        )
    for which, mbps in (("down", link.bandwidth_down_mbps), ("up", link.bandwidth_up_mbps)):
        if mbps is not None and not 0 < mbps <= MAX_BANDWIDTH_MBPS:
            raise at(f"bandwidth_mbps.{which}").error(
                f"{mbps:g} is not a bandwidth; use a number of Mbit/s above 0 and at most "
                f"{MAX_BANDWIDTH_MBPS:g}"
            )
    check_monitor(link.monitor, lambda key, value=None: at(f"monitor.{key}", value))


def check_rule(rule: Rule, links: Sequence[str], at: AtFn) -> None:
    parse_method(rule.method.value, at("method"))
    for name in rule.links:
        if name not in links:
            raise at("links", name).error(f"unknown link '{name}'; the links are {listing(links)}")
        if rule.links.count(name) > 1:
            raise at("links", name).error(f"link '{name}' is listed twice")
    if not 1 <= rule.saturation_percent <= 100:
        raise at("saturation_percent").error(
            f"{rule.saturation_percent} is not a percentage of the bandwidth from 1 to 100"
        )
    low, high = const.FASTEST_CACHE_RANGE_S
    if not low <= rule.cache_seconds <= high:
        raise at("cache_seconds").error(
            f"{rule.cache_seconds} is not a number of seconds from {low} to {high}"
        )
    for key, (low, high) in FASTEST_LIMITS.items():
        check_range(getattr(rule, key), low, high, at(key))
    if rule.method is Method.FASTEST_RESPONSE and rule.match.proto not in (None, "tcp"):
        raise at("match.proto").error(
            "method 'fastest-response' races TCP connections to learn a destination's link; "
            f"a rule for {rule.match.proto} alone would never learn one"
        )
    if rule.method is Method.ENFORCED and len(rule.links) != 1:
        raise at("links").error(
            f"method 'enforced' needs exactly one link in 'links' (found {len(rule.links)})"
        )
    match = rule.match
    if match.proto is not None and match.proto not in PROTOCOLS:
        raise at("match.proto").error(
            f"unknown protocol '{match.proto}'; allowed: {listing(PROTOCOLS)}"
        )
    if match.proto == "icmp" and (match.sport or match.dport):
        raise at("match.proto").error("ports need proto 'tcp' or 'udp', not 'icmp'")
    for device in match.iif:
        check_device(device, at("match.iif", device))


def check_forward(forward: PortForward, links: Sequence[str], at: AtFn) -> None:
    parse_port_range(str(forward.port), at("port"))
    if forward.proto not in FORWARD_PROTOCOLS:
        raise at("proto").error(f"unknown protocol '{forward.proto}'; allowed: 'tcp', 'udp'")
    if forward.host_port is not None:
        check_range(forward.host_port, 1, 65535, at("to"))
        if forward.port.first != forward.port.last:
            raise at("to").error("a port range is forwarded to the same ports; drop the ':port'")
    host = forward.host
    if host.is_unspecified or host.is_multicast or host.is_loopback:
        raise at("to").error(f"{host} cannot receive forwarded connections")
    for name in forward.links:
        if name not in links:
            raise at("links", name).error(f"unknown link '{name}'; the links are {listing(links)}")


def check_kernel(mask: int, table_base: int, rule_priority: int, links: int, at: AtFn) -> None:
    low = mask & -mask
    if not 0 < mask <= 0xFFFFFFFF or (mask // low) & (mask // low + 1):
        raise at("mark_mask").error(
            f"{mask:#x} is not one run of set bits within 32 bits, e.g. 0x0000ff00"
        )
    room = min(const.MAX_LINKS, (1 << mask.bit_count()) - 2)
    if links > room:
        raise at("mark_mask").error(f"{mask:#010x} has room for {room} links, not {links}")
    tables = range(table_base, table_base + links + 1)
    if table_base < 1 or tables[-1] > 0xFFFFFFFF or _RESERVED_TABLES.intersection(tables):
        raise at("table_base").error(
            f"uplinkd uses tables {tables[0]}..{tables[-1]}; they must avoid 0, 253 (default), "
            "254 (main) and 255 (local) and stay below 2^32"
        )
    highest = _MAIN_RULE_PRIORITY - 1 - const.RULE_OFFSET_DEFAULT
    check_range(rule_priority, 1, highest, at("rule_priority"))


def _check_bandwidths(config: Config, rule: Rule, at: AtFn) -> None:
    """Overflow and least-used compare measured use with each link's configured capacity."""
    if rule.method not in BANDWIDTH_METHODS:
        return
    for link in config.links:
        in_rule = not rule.links or link.name in rule.links
        if in_rule and not (link.bandwidth_down_mbps or link.bandwidth_up_mbps):
            raise at("method").error(
                f"method '{rule.method}' compares use with capacity, but link "
                f"'{link.name}' has no bandwidth_mbps"
            )


def validate(config: Config) -> None:
    """Check a whole configuration; raises ConfigError naming the first problem."""
    path = config.path
    if not config.links:
        if config.format == "balance.conf":
            raise ConfigError(path, "no isp service: add a line 'NAME DEVICE isp PING-IP'")
        raise ConfigError(path, "no link defined: add a [[link]] table with name and device")
    _check_unique(config)
    for link in config.links:
        check_link(link, line_at(path, link.line, "link"))
    for lan in config.lans:
        check_name(lan.name, At(path, lan.line, "lan.name"))
        check_device(lan.device, At(path, lan.line, "lan.device"))
    links = [link.name for link in config.links]
    for index, rule in enumerate((*config.rules, config.default)):
        at = line_at(path, rule.line, "rule" if rule is not config.default else "default")
        check_rule(rule, links, at)
        _check_bandwidths(config, rule, at)
        if rule.match.is_empty() and index + 1 < len(config.rules):
            raise at("match").error(
                f"rule '{rule.name}' matches all traffic, so the rules after it never match; "
                "give it a match, or make it the [default]"
            )
    for index, forward in enumerate(config.forwards):
        at = line_at(path, forward.line, "forward")
        check_forward(forward, links, at)
        for other in config.forwards[:index]:
            shared = set(other.links or links) & set(forward.links or links)
            ports = forward.port.first <= other.port.last and other.port.first <= forward.port.last
            if other.proto == forward.proto and ports and shared:
                raise at("port").error(
                    f"{forward.proto} port {forward.port} is already forwarded "
                    f"(line {other.line}) on link '{sorted(shared)[0]}'"
                )
    lans = [lan.name for lan in config.lans]
    for group in config.firewall.forwarding_groups:
        expand_group(group, links, lans, line_at(path, 0, "firewall"))
    rate = config.firewall.icmp_rate_per_second
    check_range(rate, 1, MAX_ICMP_RATE, At(path, 0, "firewall.icmp_rate_per_second"))
    check_mail(config.mail, line_at(path, 0, "mail"))
    kernel = line_at(path, 0, "kernel")
    check_kernel(config.mark_mask, config.table_base, config.rule_priority, len(links), kernel)
    _check_backend(config)


def _check_backend(config: Config) -> None:
    if config.backend not in BACKENDS:
        allowed = listing(BACKENDS)
        raise At(config.path, 0, "backend").error(
            f"unknown backend '{config.backend}'; allowed: {allowed}"
        )
    for rule in (*config.rules, config.default):
        if rule.method is Method.FASTEST_RESPONSE and config.backend == "iptables":
            where = "rule" if rule in config.rules else "default"
            raise At(config.path, rule.line, f"{where}.method").error(FASTEST_NEEDS_NFTABLES)


FASTEST_NEEDS_NFTABLES = (
    "method 'fastest-response' needs backend 'nftables': the destinations it learns live in an "
    "nftables map with timeouts, which iptables has no equivalent for"
)


def _check_unique(config: Config) -> None:
    """Link and LAN names share one namespace (forwarding groups use both), and so do devices."""
    seen: dict[tuple[str, str], tuple[int, str]] = {}  # (key, folded value): (line, value)
    items = [("link", i.name, i.device, i.line) for i in config.links]
    items += [("lan", i.name, i.device, i.line) for i in config.lans]
    for kind, name, device, line in items:
        # Names are case-insensitive (see same_name); device names are not, as in the kernel.
        for key, value, folded in (("name", name, name.casefold()), ("device", device, device)):
            if (key, folded) in seen:
                first, spelled = seen[key, folded]
                also = f" as '{spelled}'" if spelled != value else ""
                message = f"duplicate {key} '{value}' (already used at line {first}{also})"
                raise At(config.path, line, f"{kind}.{key}").error(message)
            seen[key, folded] = (line, value)
    rules: dict[str, int] = {config.default.name: config.default.line}
    for rule in config.rules:
        if rule.name in rules:
            at = At(config.path, rule.line, "rule.name")
            raise at.error(f"duplicate rule name '{rule.name}' ('default' is the [default] rule)")
        rules[rule.name] = rule.line
