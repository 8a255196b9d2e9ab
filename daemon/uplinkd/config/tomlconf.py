"""uplinkd's native TOML configuration format (see data/examples/uplinkd.toml).

tomllib reads the text; _TomlReader turns its data into a model.Config with the checks of
validate.py, so an error reads as it does for balance.conf: file, line, key, what is allowed.
tomllib reports no positions, so _Locator finds the line of a table or key in the source text
(and, for tomllib's syntax errors, which give a line but no key, the key written on that line).
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from .. import const
from ..errors import ConfigError
from .model import (
    Config,
    Firewall,
    HashBy,
    LanConfig,
    LinkConfig,
    MailSettings,
    Match,
    Method,
    Monitor,
    Nat,
    PortForward,
    PortRange,
    Rule,
)
from .validate import (
    BACKENDS,
    MAIL_KEYS,
    MAX_ICMP_RATE,
    MONITOR_KEYS,
    MONITOR_LIMITS,
    At,
    AtFn,
    check_device,
    check_forward,
    check_kernel,
    check_link,
    check_mail,
    check_monitor,
    check_name,
    check_range,
    check_rule,
    expand_group,
    listing,
    parse_by,
    parse_forward_target,
    parse_ipv4,
    parse_method,
    parse_network,
    parse_port_range,
    parse_target,
    validate,
)

BOM = "\ufeff"  # editors on Windows start UTF-8 files with it; TOML itself does not allow it

# The top-level keys and tables; config.parse() also uses them to recognise a TOML configuration.
ROOT_KEYS = (
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
    "mail",
)


def parse_toml(text: str, path: Path) -> Config:
    """Parse uplinkd's native TOML format (see data/examples/uplinkd.toml)."""
    text = text.removeprefix(BOM)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise _syntax_error(error, text, path) from None
    config = _TomlReader(text, path).config(data)
    validate(config)
    return config


def _syntax_error(error: tomllib.TOMLDecodeError, text: str, path: Path) -> ConfigError:
    """tomllib's message with its line, and the key written at that line (or the table)."""
    where = re.search(r"\(at line (\d+), column (\d+)\)", str(error))
    message = re.sub(r"\s*\(at [^)]*\)$", "", str(error))
    if where:
        line, column = int(where.group(1)), int(where.group(2))
        message += f" (column {column})"
    else:  # "at end of document": what was left open started on an earlier line
        line = len(text.splitlines())
        message += " (at the end of the file: something is left open)"
    key = _Locator(text).key_at(line)
    return ConfigError(path, f"malformed TOML: {message}", line=line, key=key)


# --- line numbers --------------------------------------------------------------------------------

_HEADER = re.compile(r"\s*\[\[?\s*([\w.\-\"' ]+?)\s*\]\]?\s*(?:#.*)?")
_KEY = re.compile(r"\s*([\w\-]+(?:\s*\.\s*[\w\-]+)*|\"[^\"]*\")\s*=")
_OPEN_HEADER = re.compile(r"\s*\[\[?\s*([\w.\-]+)")  # also "[link" without its ']'
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

    def key_at(self, line: int) -> str:
        """The dotted key (with its table) written at or last before `line`, for errors that
        have a line but no key; "" when there is none."""
        if not 1 <= line <= len(self.lines):
            return ""
        header = _OPEN_HEADER.match(self.lines[line - 1])
        if header:
            return header.group(1)
        table = next((h for n, h in reversed(self.headers) if n < line), "")
        start = next((n for n, _ in reversed(self.headers) if n < line), 0)
        for number in range(line, start, -1):
            found = _KEY.match(self.lines[number - 1])
            if found:
                key = ".".join(p.strip(' "') for p in found.group(1).split("."))
                return ".".join(p for p in (table, key) if p)
        return table

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


# --- reading ------------------------------------------------------------------------------------


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
# fastest-response's own keys (see validate.FASTEST_LIMITS for their bounds).
_FASTEST_KEYS = ("cache_seconds", "races_per_second", "max_learned", "race_private")
RULE_KEYS = ("name", "match", "method", "by", "links", "saturation_percent", *_FASTEST_KEYS)
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
                message = f"unknown key '{key}' in {where}; allowed: {listing(allowed)}"
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
        self.allow(root, *ROOT_KEYS)
        backend = self.text(root, "backend", "nftables")
        if backend not in BACKENDS:
            allowed = listing(BACKENDS)
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
        self.allow(default, *RULE_KEYS[2:])
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
            mail=self.mail(self.sub(root, "mail")),
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

    def mail(self, table: _Table) -> MailSettings:
        self.allow(table, *MAIL_KEYS)
        timeout = self.get(table, "timeout_s", (int, float), "a number of seconds")
        defaults = MailSettings()
        mail = MailSettings(
            smtp_server=self.text(table, "smtp_server", defaults.smtp_server),
            sender=self.text(table, "sender", defaults.sender),
            starttls=self.flag(table, "starttls", default=defaults.starttls),
            username=self.text(table, "username", defaults.username),
            password=self.text(table, "password", defaults.password),
            max_per_hour=self.integer(table, "max_per_hour", defaults.max_per_hour),
            timeout_s=float(timeout) if isinstance(timeout, int | float) else defaults.timeout_s,
        )
        check_mail(mail, self.at_fn(table))
        return mail

    def link(self, table: _Table, monitor: Monitor) -> LinkConfig:
        self.allow(table, *_LINK_KEYS, *_LINK_KEYS_MORE)
        gateway = self.text(table, "gateway", "auto")
        bandwidth = self.sub(table, "bandwidth_mbps")
        self.allow(bandwidth, "down", "up")
        down, up = (self.get(bandwidth, k, (int, float), "a number") for k in ("down", "up"))
        nat = self.text(table, "nat", Nat.MASQUERADE.value)
        if nat not in tuple(Nat):
            raise self.at(table, "nat").error(f"unknown nat '{nat}'; allowed: {listing(Nat)}")
        targets = self.strings(table, "targets")
        link = LinkConfig(
            name=self.text(table, "name"),
            device=self.text(table, "device"),
            gateway=None
            if gateway == "auto"
            else parse_ipv4(gateway, self.at(table, "gateway"), 'an IPv4 address or "auto"'),
            weight=self.integer(table, "weight", 1),
            priority=self.integer(table, "priority", (table.element or 0) + 1),
            targets=tuple(parse_target(t, self.at(table, "targets", t)) for t in targets),
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
            self.allow(table, *RULE_KEYS)
            name = self.text(table, "name", f"rule{(table.element or 0) + 1}")
            check_name(name, self.at(table, "name"))
            method = self.text(table, "method")
        parsed = parse_method(self.text(table, "method", method), self.at(table, "method"))
        if "by" in table.data and parsed is not Method.PERSISTENCE:
            raise self.at(table, "by").error("'by' applies only to method 'persistence'")
        by = parse_by(self.text(table, "by", HashBy.SOURCE.value), self.at(table, "by"))
        if "saturation_percent" in table.data and parsed is not Method.OVERFLOW:
            raise self.at(table, "saturation_percent").error(
                "'saturation_percent' applies only to method 'overflow'"
            )
        saturation = self.integer(table, "saturation_percent", const.DEFAULT_SATURATION_PERCENT)
        for key in _FASTEST_KEYS:
            if key in table.data and parsed is not Method.FASTEST_RESPONSE:
                raise self.at(table, key).error(
                    f"'{key}' applies only to method 'fastest-response'"
                )
        cache = self.integer(table, "cache_seconds", const.DEFAULT_FASTEST_CACHE_S)
        defaults = Rule(name, parsed)
        match = self.match(self.sub(table, "match"))
        rule = Rule(
            name,
            parsed,
            match,
            self.strings(table, "links"),
            by,
            self.at(table).line,
            saturation_percent=saturation,
            cache_seconds=cache,
            races_per_second=self.integer(table, "races_per_second", defaults.races_per_second),
            max_learned=self.integer(table, "max_learned", defaults.max_learned),
            race_private=self.flag(table, "race_private", default=defaults.race_private),
        )
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
        check_range(rate, 1, MAX_ICMP_RATE, self.at(table, "icmp_rate_per_second"))
        return Firewall(
            enabled=self.flag(table, "enabled", default=False),
            forwarding_groups=groups,
            ssh_from_lan=self.flag(table, "ssh_from_lan", default=True),
            icmp_rate_per_second=rate,
        )
