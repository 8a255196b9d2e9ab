"""Loading the configuration: format detection, the native TOML format, and the shared checks.

Both formats (TOML here, Net-ISP-Balance's balance.conf in balanceconf.py) build one model.Config
and pass the same checks, so an error reads the same in either: file, line, key, what is allowed.
tomllib reports no positions, so _Locator finds the line of a table or key in the source text.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from . import const
from .errors import ConfigError
from .model import (
    PLANNED_METHODS,
    Config,
    Firewall,
    HashBy,
    LanConfig,
    LinkConfig,
    Match,
    Method,
    Monitor,
    Nat,
    PortForward,
    PortRange,
    Rule,
)

PROTOCOLS = ("tcp", "udp", "icmp")
FORWARD_PROTOCOLS = ("tcp", "udp")
BACKENDS = ("nftables", "iptables")
MONITOR_KEYS = tuple(f.name for f in fields(Monitor))
# Lowest and highest value of each numeric Monitor key (None: no upper bound).
MONITOR_LIMITS: Mapping[str, tuple[int, int | None]] = {
    "interval_ms": (10, None),
    "timeout_ms": (1, None),
    "max_packet_loss": (0, 100),
    "max_successive_pkts_lost": (1, None),
    "min_packet_loss": (0, 100),
    "min_successive_pkts_rcvd": (1, None),
    "long_down_time": (0, None),
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,31}")
_DEVICE = re.compile(r"[^\s/]{1,15}")  # the kernel's IFNAMSIZ; ':' allowed for alias labels
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


def _listing(values: Iterable[str]) -> str:
    return ", ".join(f"'{v}'" for v in values)


# --- value parsers shared by both formats --------------------------------------------------------


def check_name(name: str, at: At) -> None:
    if not _NAME.fullmatch(name):
        raise at.error(
            f"invalid name '{name}': use 1-32 letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )


def check_device(device: str, at: At) -> None:
    if not device:
        raise at.error("a device is required, e.g. 'eth0'")
    if device in {".", ".."} or not _DEVICE.fullmatch(device):
        raise at.error(f"invalid device name '{device}': 1-15 characters, no '/' or spaces")


def parse_ipv4(text: str, at: At, what: str = "an IPv4 address") -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise at.error(f"'{text}' is not {what}") from None


def parse_network(text: str, at: At) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(text)
    except ValueError:
        try:
            loose = ipaddress.IPv4Network(text, strict=False)
        except ValueError:
            raise at.error(f"'{text}' is not an IPv4 address or prefix like 10.0.0.0/8") from None
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


def parse_method(text: str, at: At) -> Method:
    try:
        method = Method(text)
    except ValueError:
        raise at.error(
            f"unknown method '{text}'; the methods are {_listing(m.value for m in Method)}"
        ) from None
    if method not in PLANNED_METHODS:
        available = _listing(m.value for m in Method if m in PLANNED_METHODS)
        raise at.error(
            f"method '{text}' is not available yet in this version; available now: {available}"
        )
    return method


def parse_by(text: str, at: At) -> HashBy:
    try:
        return HashBy(text)
    except ValueError:
        raise at.error(f"unknown value '{text}'; allowed: {_listing(HashBy)}") from None


def expand_group(
    tokens: Sequence[str], links: Sequence[str], lans: Sequence[str], at: AtFn
) -> tuple[str, ...]:
    """A forwarding group: link and LAN names, ':isp' for every link, ':lan' for every LAN."""
    members: list[str] = []
    for member in tokens:
        if member not in {":isp", ":lan", *links, *lans}:
            known = _listing([*links, *lans, ":isp", ":lan"])
            message = f"unknown name '{member}' in a forwarding group; known: {known}"
            raise at("forwarding_groups", member).error(message)
        names = links if member == ":isp" else lans if member == ":lan" else [member]
        members += [name for name in names if name not in members]
    if not members:
        raise at("forwarding_groups").error("a forwarding group needs at least one member")
    return tuple(members)


# --- checks of one object, shared by both parsers and by validate() -------------------------------


def check_range(value: int, low: int, high: int | None, at: At) -> None:
    if value < low or (high is not None and value > high):
        allowed = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise at.error(f"{value} is out of range; it must be {allowed}")


def check_monitor(monitor: Monitor, at: AtFn) -> None:
    for key, (low, high) in MONITOR_LIMITS.items():
        check_range(getattr(monitor, key), low, high, at(key))
    if monitor.max_packet_loss <= monitor.min_packet_loss:
        raise at("max_packet_loss").error(
            f"must be greater than min_packet_loss ({monitor.min_packet_loss}), "
            "or the link would flap between up and down"
        )


def check_link(link: LinkConfig, at: AtFn) -> None:
    check_name(link.name, at("name"))
    check_device(link.device, at("device"))
    check_range(link.weight, 1, None, at("weight"))
    check_range(link.priority, 1, None, at("priority"))
    for target in link.targets:
        if target.is_unspecified or target.is_multicast or target == _BROADCAST:
            raise at("targets", target).error(f"{target} cannot be a probe target")
        if link.targets.count(target) > 1:
            raise at("targets", target).error(f"{target} is listed twice")
    check_range(link.reliability, 1, None, at("reliability"))
    # No targets: the link's gateway is the one probe target.
    if link.reliability > max(1, len(link.targets)):
        raise at("reliability").error(
            f"{link.reliability} targets must answer but the link has only "
            f"{max(1, len(link.targets))}; reliability is at most the number of targets"
        )
    for which, mbps in (("down", link.bandwidth_down_mbps), ("up", link.bandwidth_up_mbps)):
        if mbps is not None and not mbps > 0:
            raise at(f"bandwidth_mbps.{which}").error("must be a positive number of Mbit/s")
    check_monitor(link.monitor, lambda key, value=None: at(f"monitor.{key}", value))


def check_rule(rule: Rule, links: Sequence[str], at: AtFn) -> None:
    parse_method(rule.method.value, at("method"))
    for name in rule.links:
        if name not in links:
            raise at("links", name).error(f"unknown link '{name}'; the links are {_listing(links)}")
        if rule.links.count(name) > 1:
            raise at("links", name).error(f"link '{name}' is listed twice")
    if rule.method is Method.ENFORCED and len(rule.links) != 1:
        raise at("links").error(
            f"method 'enforced' needs exactly one link in 'links' (found {len(rule.links)})"
        )
    match = rule.match
    if match.proto is not None and match.proto not in PROTOCOLS:
        raise at("match.proto").error(
            f"unknown protocol '{match.proto}'; allowed: {_listing(PROTOCOLS)}"
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
            raise at("links", name).error(f"unknown link '{name}'; the links are {_listing(links)}")


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
    kernel = line_at(path, 0, "kernel")
    check_kernel(config.mark_mask, config.table_base, config.rule_priority, len(links), kernel)
    if config.backend not in BACKENDS:
        allowed = _listing(BACKENDS)
        raise At(path, 0, "backend").error(
            f"unknown backend '{config.backend}'; allowed: {allowed}"
        )


def _check_unique(config: Config) -> None:
    """Link and LAN names share one namespace (forwarding groups use both), and so do devices."""
    seen: dict[tuple[str, str], int] = {}
    items = [("link", i.name, i.device, i.line) for i in config.links]
    items += [("lan", i.name, i.device, i.line) for i in config.lans]
    for kind, name, device, line in items:
        for key, value in (("name", name), ("device", device)):
            if (key, value) in seen:
                message = f"duplicate {key} '{value}' (already used at line {seen[key, value]})"
                raise At(config.path, line, f"{kind}.{key}").error(message)
            seen[key, value] = line
    rules: dict[str, int] = {config.default.name: config.default.line}
    for rule in config.rules:
        if rule.name in rules:
            at = At(config.path, rule.line, "rule.name")
            raise at.error(f"duplicate rule name '{rule.name}' ('default' is the [default] rule)")
        rules[rule.name] = rule.line


# --- loading -------------------------------------------------------------------------------------

_TOML_ROOT_KEYS = (
    "backend",
    "monitor",
    "link",
    "lan",
    "rule",
    "default",
    "forward",
    "firewall",
    "kernel",
    "daemon",
)


def load(path: Path) -> Config:
    """Read a configuration file, TOML or balance.conf, told apart by content."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(path, f"cannot read the configuration: {error}") from None
    return parse(text, path)


def parse(text: str, path: Path) -> Config:
    """Parse configuration text of either format, told apart by content, not by file name."""
    # balanceconf builds on this module's checks, so it is imported here, not at the top.
    from . import balanceconf  # noqa: PLC0415

    try:
        data: dict[str, object] | None = tomllib.loads(text)
        toml_error = ""
    except tomllib.TOMLDecodeError as error:
        data, toml_error = None, str(error)
    tables = data is not None and any(isinstance(v, dict | list) for v in data.values())
    if data is not None and (tables or set(data) & set(_TOML_ROOT_KEYS)):
        return parse_toml(text, path)
    if balanceconf.has_service_table(text):
        return balanceconf.parse_balance_conf(text, path)
    if data is None and re.search(r"^\s*\[", text, re.MULTILINE):
        return parse_toml(text, path)  # meant as TOML: report tomllib's error and line
    if balanceconf.is_balance_conf(text):
        return balanceconf.parse_balance_conf(text, path)  # options only: "no isp service"
    reason = f"not valid TOML ({toml_error})" if toml_error else "TOML without a [[link]] table"
    raise ConfigError(
        path,
        f"neither an uplinkd TOML configuration ({reason}) nor a Net-ISP-Balance balance.conf "
        "(no service table lines 'NAME DEVICE isp|lan PING-IP')",
    )


def parse_toml(text: str, path: Path) -> Config:
    """Parse uplinkd's native TOML format (see data/examples/uplinkd.toml)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        where = re.search(r"\(at line (\d+), column \d+\)", str(error))
        message = re.sub(r"\s*\(at [^)]*\)$", "", str(error))
        line = int(where.group(1)) if where else 0
        raise ConfigError(path, f"malformed TOML: {message}", line=line) from None
    config = _TomlReader(text, path).config(data)
    validate(config)
    return config


# --- TOML -----------------------------------------------------------------------------------------

_HEADER = re.compile(r"\s*\[\[?\s*([\w.\-\"' ]+?)\s*\]\]?\s*(?:#.*)?")
_STRING = re.compile(r"\"(?:[^\"\\]|\\.)*\"|'[^']*'")


class _Locator:
    """Finds the line of a table, key or value in TOML text (tomllib gives no positions)."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.headers: list[tuple[int, str]] = []  # (line, dotted name) of [t] and [[t]] alike
        depth = 0  # inside a multi-line array, "[...]" lines are values, not headers
        for number, raw in enumerate(self.lines, 1):
            header = _HEADER.fullmatch(raw)
            if depth == 0 and header:
                parts = header.group(1).split(".")
                self.headers.append((number, ".".join(p.strip(" \"'") for p in parts)))
                continue
            code = _STRING.sub("", raw).split("#", 1)[0]
            depth += sum(code.count(c) for c in "[{") - sum(code.count(c) for c in "]}")
            depth = max(depth, 0)

    def _span(self, name: str, index: int | None, within: tuple[int, int]) -> tuple[int, int]:
        """(header line, last line) of table name, or of element index of an array of tables."""
        count = -1
        for position, (line, header) in enumerate(self.headers):
            if header != name or not within[0] <= line <= within[1]:
                continue
            count += 1
            if index is None or count == index:
                rest = self.headers[position + 1 :]
                end = next((n - 1 for n, h in rest if not h.startswith(name + ".")), within[1])
                return line, min(end, within[1])
        return 0, 0

    def _key(self, start: int, end: int, key: str) -> int:
        strict = re.compile(rf"\s*(?:{re.escape(key)}|\"{re.escape(key)}\")\s*=")
        loose = re.compile(rf"(?<![\w-]){re.escape(key)}\s*=")
        numbers = range(start + 1, end + 1)
        found = [n for n in numbers if strict.match(self.lines[n - 1])]
        return (found or [n for n in numbers if loose.search(self.lines[n - 1])] or [0])[0]

    def line(self, table: str, index: int | None, key: str, value: object = None) -> int:
        """Line of key (dotted: through sub-tables) in table, or of value in it; 0: not found."""
        top_end = self.headers[0][0] - 1 if self.headers else len(self.lines)
        start, end = (0, top_end) if not table else self._span(table, index, (0, len(self.lines)))
        line = start
        if table and not start and (found := self._key(0, top_end, table)):
            line, start, end = found, found - 1, top_end  # a top-level inline table: t = {...}
        for part in key.split(".") if key else []:
            name = f"{table}.{part}" if table else part
            sub = self._span(name, None, (start, end) if table else (0, len(self.lines)))
            if sub[0]:
                line, (start, end), table = sub[0], sub, name
                continue
            found = self._key(start, end, part)
            if not found:
                return line
            line, start = found, found - 1  # an inline table's keys are on this line or after
        if value is not None:
            text = str(value)
            return next((n for n in range(line, end + 1) if text in self.lines[n - 1]), line)
        return line


class _Table(NamedTuple):
    """A TOML table being read: its data, its table (and array index), its path inside that."""

    data: Mapping[str, object]
    name: str = ""
    element: int | None = None  # index in an array of tables
    prefix: str = ""  # e.g. "monitor" for [link.monitor] or "match" for a rule's match = {...}

    def key(self, key: str = "") -> str:
        return ".".join(part for part in (self.prefix, key) if part)


_LINK_KEYS = ("name", "device", "gateway", "weight", "priority", "targets", "reliability")
_LINK_KEYS_MORE = ("bandwidth_mbps", "nat", "monitor")
_FIREWALL_KEYS = ("enabled", "forwarding_groups", "ssh_from_lan", "icmp_rate_per_second")


class _TomlReader:
    def __init__(self, text: str, path: Path) -> None:
        self.path = path
        self.locator = _Locator(text)

    def at(self, table: _Table, key: str = "", value: object = None) -> At:
        line = self.locator.line(table.name, table.element, table.key(key), value)
        return At(self.path, line, ".".join(p for p in (table.name, table.key(key)) if p))

    def at_fn(self, table: _Table) -> AtFn:
        return lambda key, value=None: self.at(table, key, value)

    def allow(self, table: _Table, *allowed: str) -> None:
        for key in table.data:
            if key not in allowed:
                where = f"[{'.'.join(p for p in (table.name, table.prefix) if p)}]"
                where = "the top level" if where == "[]" else where
                message = f"unknown key '{key}' in {where}; allowed: {_listing(allowed)}"
                raise self.at(table, key).error(message)

    def get(self, table: _Table, key: str, kinds: tuple[type, ...], what: str) -> object:
        value = table.data.get(key)
        is_bool = isinstance(value, bool)
        if value is not None and (not isinstance(value, kinds) or is_bool != (bool in kinds)):
            raise self.at(table, key).error(f"must be {what}, not {value!r}")
        return value

    def text(self, table: _Table, key: str, default: str | None = None) -> str:
        value = self.get(table, key, (str,), "a string")
        if value is None and default is None:
            raise self.at(table, key).error("is required")
        return str(value if value is not None else default)

    def integer(self, table: _Table, key: str, default: int) -> int:
        value = self.get(table, key, (int,), "an integer")
        return value if isinstance(value, int) else default

    def flag(self, table: _Table, key: str, *, default: bool) -> bool:
        value = self.get(table, key, (bool,), "true or false")
        return value if isinstance(value, bool) else default

    def items(self, table: _Table, key: str, kinds: tuple[type, ...] = (str,)) -> list[object]:
        """A list, or one value standing for a list of one."""
        value = table.data.get(key, [])
        values = value if isinstance(value, list) else [value]
        for item in values:
            if not isinstance(item, kinds) or isinstance(item, bool):
                what = "strings" if kinds == (str,) else "ports or port ranges"
                raise self.at(table, key, item).error(f"must be a list of {what}, not {item!r}")
        return values

    def strings(self, table: _Table, key: str) -> tuple[str, ...]:
        return tuple(str(item) for item in self.items(table, key))

    def sub(self, table: _Table, key: str) -> _Table:
        value = table.data.get(key, {})
        if not isinstance(value, dict):
            raise self.at(table, key).error(f"must be a table, not {value!r}")
        if not table.name:
            return _Table(value, key)
        return _Table(value, table.name, table.element, table.key(key))

    def array(self, data: Mapping[str, object], name: str) -> list[_Table]:
        value = data.get(name, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            at = At(self.path, self.locator.line(name, None, ""), name)
            raise at.error(f"write [[{name}]] tables (an array of tables)")
        return [_Table(element, name, index) for index, element in enumerate(value)]

    def config(self, data: Mapping[str, object]) -> Config:
        root = _Table(data)
        self.allow(root, *_TOML_ROOT_KEYS)
        backend = self.text(root, "backend", "nftables")
        if backend not in BACKENDS:
            allowed = _listing(BACKENDS)
            raise self.at(root, "backend").error(f"unknown backend '{backend}'; allowed: {allowed}")
        monitor = self.monitor(self.sub(root, "monitor"), Monitor())
        links = tuple(self.link(table, monitor) for table in self.array(data, "link"))
        lans = tuple(self.lan(table) for table in self.array(data, "lan"))
        names = [link.name for link in links]
        rules = tuple(self.rule(table, names) for table in self.array(data, "rule"))
        forwards = tuple(
            f for table in self.array(data, "forward") for f in self.forward(table, names)
        )
        default, kernel, daemon = (self.sub(root, key) for key in ("default", "kernel", "daemon"))
        self.allow(default, "method", "by", "links")
        self.allow(kernel, "mark_mask", "table_base", "rule_priority")
        self.allow(daemon, "stop_removes_datapath")
        mask = self.integer(kernel, "mark_mask", const.DEFAULT_MARK_MASK)
        base = self.integer(kernel, "table_base", const.DEFAULT_TABLE_BASE)
        priority = self.integer(kernel, "rule_priority", const.DEFAULT_RULE_PRIORITY)
        check_kernel(mask, base, priority, len(links), self.at_fn(kernel))
        return Config(
            path=self.path,
            format="toml",
            links=links,
            lans=lans,
            rules=rules,
            default=self.rule(default, names),
            forwards=forwards,
            firewall=self.firewall(self.sub(root, "firewall"), names, [lan.name for lan in lans]),
            mark_mask=mask,
            table_base=base,
            rule_priority=priority,
            backend=backend,
            stop_removes_datapath=self.flag(daemon, "stop_removes_datapath", default=False),
        )

    def monitor(self, table: _Table, base: Monitor) -> Monitor:
        self.allow(table, *MONITOR_KEYS)
        changes: dict[str, Any] = {
            key: self.integer(table, key, 0) for key in MONITOR_LIMITS if key in table.data
        }
        if "warn_email" in table.data:
            changes["warn_email"] = self.text(table, "warn_email")
        monitor = replace(base, **changes)
        check_monitor(monitor, self.at_fn(table))
        return monitor

    def link(self, table: _Table, monitor: Monitor) -> LinkConfig:
        self.allow(table, *_LINK_KEYS, *_LINK_KEYS_MORE)
        gateway = self.text(table, "gateway", "auto")
        bandwidth = self.sub(table, "bandwidth_mbps")
        self.allow(bandwidth, "down", "up")
        down, up = (self.get(bandwidth, k, (int, float), "a number") for k in ("down", "up"))
        nat = self.text(table, "nat", Nat.MASQUERADE.value)
        if nat not in tuple(Nat):
            raise self.at(table, "nat").error(f"unknown nat '{nat}'; allowed: {_listing(Nat)}")
        targets = self.strings(table, "targets")
        link = LinkConfig(
            name=self.text(table, "name"),
            device=self.text(table, "device"),
            gateway=None
            if gateway == "auto"
            else parse_ipv4(gateway, self.at(table, "gateway"), 'an IPv4 address or "auto"'),
            weight=self.integer(table, "weight", 1),
            priority=self.integer(table, "priority", (table.element or 0) + 1),
            targets=tuple(parse_ipv4(t, self.at(table, "targets", t)) for t in targets),
            reliability=self.integer(table, "reliability", 1),
            bandwidth_down_mbps=float(down) if isinstance(down, int | float) else None,
            bandwidth_up_mbps=float(up) if isinstance(up, int | float) else None,
            nat=Nat(nat),
            monitor=self.monitor(self.sub(table, "monitor"), monitor),
            line=self.at(table).line,
        )
        check_link(link, self.at_fn(table))
        return link

    def lan(self, table: _Table) -> LanConfig:
        self.allow(table, "name", "device")
        lan = LanConfig(self.text(table, "name"), self.text(table, "device"), self.at(table).line)
        check_name(lan.name, self.at(table, "name"))
        check_device(lan.device, self.at(table, "device"))
        return lan

    def rule(self, table: _Table, links: Sequence[str]) -> Rule:
        """A [[rule]], or the [default] rule."""
        name, method = "default", Method.WEIGHTED.value
        if table.name == "rule":
            self.allow(table, "name", "match", "method", "by", "links")
            name = self.text(table, "name", f"rule{(table.element or 0) + 1}")
            check_name(name, self.at(table, "name"))
            method = self.text(table, "method")
        parsed = parse_method(self.text(table, "method", method), self.at(table, "method"))
        if "by" in table.data and parsed is not Method.PERSISTENCE:
            raise self.at(table, "by").error("'by' applies only to method 'persistence'")
        by = parse_by(self.text(table, "by", HashBy.SOURCE.value), self.at(table, "by"))
        match = self.match(self.sub(table, "match"))
        rule = Rule(name, parsed, match, self.strings(table, "links"), by, self.at(table).line)
        check_rule(rule, links, self.at_fn(table))
        return rule

    def match(self, table: _Table) -> Match:
        self.allow(table, "proto", "src", "dst", "sport", "dport", "iif")
        proto = self.get(table, "proto", (str,), "a string")
        nets: dict[str, tuple[ipaddress.IPv4Network, ...]] = {}
        ports: dict[str, tuple[PortRange, ...]] = {}
        for key in ("src", "dst"):
            texts = self.strings(table, key)
            nets[key] = tuple(parse_network(n, self.at(table, key, n)) for n in texts)
        for key in ("sport", "dport"):
            values = self.items(table, key, (int, str))
            ports[key] = tuple(parse_port_range(p, self.at(table, key, p)) for p in values)
        return Match(
            src=nets["src"],
            dst=nets["dst"],
            proto=str(proto) if proto is not None else None,
            sport=ports["sport"],
            dport=ports["dport"],
            iif=self.strings(table, "iif"),
        )

    def forward(self, table: _Table, links: Sequence[str]) -> list[PortForward]:
        self.allow(table, "port", "to", "proto", "links")
        if "port" not in table.data:
            raise self.at(table, "port").error("is required")
        port = parse_port_range(table.data["port"], self.at(table, "port"))
        host, host_port = parse_forward_target(self.text(table, "to"), self.at(table, "to"))
        line, via = self.at(table).line, self.strings(table, "links")
        protos = self.strings(table, "proto") or ("tcp",)
        forwards = [PortForward(port, host, host_port, proto, via, line) for proto in protos]
        for forward in forwards:
            check_forward(forward, links, self.at_fn(table))
        return forwards

    def firewall(self, table: _Table, links: Sequence[str], lans: Sequence[str]) -> Firewall:
        if not table.data:
            return Firewall()
        self.allow(table, *_FIREWALL_KEYS)
        raw = table.data.get("forwarding_groups", [[":lan", ":isp"]])  # Net-ISP-Balance's default
        if not isinstance(raw, list) or not all(isinstance(group, list) for group in raw):
            example = 'e.g. [["LAN", ":isp"]]'
            raise self.at(table, "forwarding_groups").error(f"must be a list of lists, {example}")
        at = self.at_fn(table)
        groups = tuple(expand_group([str(m) for m in group], links, lans, at) for group in raw)
        rate = self.integer(table, "icmp_rate_per_second", 10)
        check_range(rate, 1, None, self.at(table, "icmp_rate_per_second"))
        return Firewall(
            enabled=self.flag(table, "enabled", default=False),
            forwarding_groups=groups,
            ssh_from_lan=self.flag(table, "ssh_from_lan", default=True),
            icmp_rate_per_second=rate,
        )
