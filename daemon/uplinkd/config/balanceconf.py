"""Net-ISP-Balance's balance.conf, read unchanged into a model.Config.

The format is Net-ISP-Balance 1.x's (its etc/balance.conf and Net::ISP::Balance's parser):

    ## service    device   role     ping-ip            weight  gateway
    CABLE         eth0     isp      173.194.43.95      1       default
    DSL           ppp0     isp      www.google.ca      2
    LAN           eth1     lan
    mode=balanced                     # or failover
    forwarding_group=LAN :isp         # may repeat; :isp / :lan stand for every isp / lan service
    interval_ms=1000                  # foolsm's probe settings apply to every link

Columns after the role are optional and 'default' in any of them keeps the default (weight 1, the
discovered gateway); extra trailing columns are ignored, as Net-ISP-Balance ignored them. Service
names are case-insensitive: load_balance.pl upper-cased the names on its command line, so
'cable' there meant the service CABLE; two services differing only in case are refused, and a
forwarding_group may name a service in any case. A ping-ip host name is resolved by the daemon
while it runs (monitor/resolver.py), never here, so a router that boots before DNS works starts.
Options Net-ISP-Balance or foolsm knew but uplinkd has no use for are accepted and ignored; any
other option is refused. Net-ISP-Balance always installed its restrictive firewall, with one
forwarding group of every service unless forwarding_group says otherwise, so the firewall is on
here.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

from .model import Config, Firewall, LanConfig, LinkConfig, Method, Monitor, Rule
from .validate import (
    MAX_WEIGHT,
    MONITOR_KEYS,
    MONITOR_LIMITS,
    At,
    AtFn,
    check_device,
    check_monitor,
    check_name,
    check_range,
    expand_group,
    parse_ipv4,
    parse_target,
    validate,
)

_OPTION = re.compile(r"(\w+)\s*=\s*(.*)")  # Net-ISP-Balance's own pattern for option lines
_MODES = {"balanced": Method.WEIGHTED, "failover": Method.PRIORITY}
_WHOLE_NUMBER = re.compile(r"[0-9]{1,30}")  # ASCII digits (isdigit takes "²"); int() is bounded
# Options Net-ISP-Balance or foolsm understood that uplinkd does without: accepted and ignored.
IGNORED_KEYS = frozenset(
    {
        # foolsm connection defaults: uplinkd probes by itself and runs its own event hooks
        "checkip", "debug", "eventscript", "notifyscript", "unknown_up_notify", "check_arp",
        "sourceip", "device", "ttl", "status", "queue", "long_down_email",
        "long_down_notifyscript", "long_down_eventscript", "startup_acceleration",
        "startup_burst_pkts", "startup_burst_interval",
        # Net::ISP::Balance settings for its own files and output
        "verbose", "echo_only", "lsm_conf_file", "lsm_scripts_dir", "rules_directory",
        "bal_conf_file", "log_file", "dummy_data", "keep_custom_chains", "iptables_verbose",
    }
)  # fmt: skip


def _content(raw: str) -> str:
    return raw.split("#", 1)[0].strip()


def has_service_table(text: str) -> bool:
    """Whether text has a line 'NAME DEVICE isp|lan ...', the mark of a balance.conf."""
    for raw in text.splitlines():
        row = _content(raw)
        fields = row.split()
        if len(fields) >= 3 and fields[2].lower() in {"isp", "lan"} and not _OPTION.fullmatch(row):
            return True
    return False


def is_balance_conf(text: str) -> bool:
    """A service table, or at least an option only a balance.conf has."""
    options = (_OPTION.fullmatch(_content(raw)) for raw in text.splitlines())
    known = {"mode", "forwarding_group", *MONITOR_KEYS, *IGNORED_KEYS}
    return has_service_table(text) or any(o is not None and o.group(1) in known for o in options)


class _Isp(NamedTuple):
    name: str
    device: str
    target: ipaddress.IPv4Address | str | None  # a host name is resolved later; None: gateway
    weight: int
    gateway: ipaddress.IPv4Address | None
    line: int


def parse_balance_conf(text: str, path: Path) -> Config:
    """Parse a balance.conf (ping-ip host names are kept as names, for the daemon to resolve)."""
    text = text.removeprefix("\ufeff")  # a UTF-8 byte order mark, as some editors write
    isps: list[_Isp] = []
    lans: list[LanConfig] = []
    seen: dict[tuple[str, str], tuple[int, str]] = {}  # (key, folded value): (line, value)
    options: dict[str, tuple[int, str]] = {}  # key: (line, value); the last one wins, as in Perl
    groups: list[tuple[int, list[str]]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = _content(raw)
        option = _OPTION.fullmatch(line)
        if option:
            key, value = option.group(1), option.group(2).strip()
            if key == "forwarding_group":
                groups.append((number, value.split()))
            elif key in {"mode", *MONITOR_KEYS}:
                options[key] = (number, value)
            elif key not in IGNORED_KEYS:
                raise At(path, number, key).error(
                    f"unknown option '{key}'; uplinkd reads mode, forwarding_group and foolsm's "
                    f"{', '.join(MONITOR_KEYS)} (other Net-ISP-Balance and foolsm options are "
                    "accepted and ignored)"
                )
        elif line:
            row = _service(line.split(), At(path, number))
            # Service names are case-insensitive; device names are not, as in the kernel.
            for key, value, folded in (
                ("service", row.name, row.name.casefold()),
                ("device", row.device, row.device),
            ):
                if (key, folded) in seen:
                    first, spelled = seen[key, folded]
                    also = f" as '{spelled}'" if spelled != value else ""
                    message = f"duplicate {key} '{value}' (already used at line {first}{also})"
                    raise At(path, number, key).error(message)
                seen[key, folded] = (number, value)
            if isinstance(row, LanConfig):
                lans.append(row)
            else:
                isps.append(row)

    def at(key: str, value: object = None, /) -> At:
        return At(path, options.get(key, (0, ""))[0], key)

    mode_line, mode = options.get("mode", (0, "balanced"))
    if mode.lower() not in _MODES:
        raise at("mode").error(f"unknown mode '{mode}'; allowed: 'balanced', 'failover'")
    monitor = _monitor(options, at)
    failover = _MODES[mode.lower()] is Method.PRIORITY
    # Failover uses the highest weight first, ties in file order; balanced keeps file order.
    order = sorted(range(len(isps)), key=lambda i: (-isps[i].weight, i) if failover else i)
    rank = {index: position + 1 for position, index in enumerate(order)}
    links = tuple(
        LinkConfig(
            name=isp.name,
            device=isp.device,
            gateway=isp.gateway,
            weight=isp.weight,
            priority=rank[index],
            targets=() if isp.target is None else (isp.target,),
            monitor=monitor,
            line=isp.line,
        )
        for index, isp in enumerate(isps)
    )
    link_names, lan_names = [link.name for link in links], [lan.name for lan in lans]
    forwarding = tuple(
        expand_group(tokens, link_names, lan_names, _option_at(path, number, "forwarding_group"))
        for number, tokens in groups
    )
    everything = (*lan_names, *link_names)  # Net-ISP-Balance's default group, ":lan :isp"
    config = Config(
        path=path,
        format="balance.conf",
        links=links,
        lans=tuple(lans),
        default=Rule("default", _MODES[mode.lower()], line=mode_line),
        firewall=Firewall(enabled=True, forwarding_groups=forwarding or (everything,)),
    )
    validate(config)
    return config


def _option_at(path: Path, line: int, option: str) -> AtFn:
    def at(key: str, value: object = None, /) -> At:
        return At(path, line, option)

    return at


def _service(fields: list[str], at: At) -> _Isp | LanConfig:
    """One service table row: service device role [ping-ip [weight [gateway]]] [ignored...]."""
    if len(fields) < 3:
        raise at.error(
            f"malformed line '{' '.join(fields)}': expected a service "
            "'NAME DEVICE isp|lan [PING-IP [WEIGHT [GATEWAY]]]' or an option 'key=value'"
        )
    name, device, role = fields[:3]
    where = At(at.path, at.line, "service")
    if name in {"up", "down"}:  # load_balance.pl takes them as commands, and refused them too
        raise where.error(f"a service cannot be named '{name}'")
    check_name(name, where)
    check_device(device, At(at.path, at.line, "device"))
    if role.lower() not in {"isp", "lan"}:
        raise At(at.path, at.line, "role").error(f"unknown role '{role}'; allowed: 'isp', 'lan'")
    if role.lower() == "lan":
        return LanConfig(name, device, at.line)
    ping, weight, gateway = [*fields[3:6], "default", "default", "default"][:3]
    return _Isp(
        name=name,
        device=device,
        target=None if ping == "default" else parse_target(ping, At(at.path, at.line, "ping-ip")),
        weight=_weight(weight, At(at.path, at.line, "weight")),
        gateway=None
        if gateway == "default"
        else parse_ipv4(gateway, At(at.path, at.line, "gateway"), "an IPv4 address or 'default'"),
        line=at.line,
    )


def _weight(text: str, at: At) -> int:
    if text == "default":
        return 1
    if not _WHOLE_NUMBER.fullmatch(text) or int(text) < 1:
        raise at.error(f"'{text}' is not a weight; use a positive integer (1, 2, ...) or 'default'")
    check_range(int(text), 1, MAX_WEIGHT, at)
    return int(text)


def _monitor(options: dict[str, tuple[int, str]], at: AtFn) -> Monitor:
    """The foolsm options, for every link; uplinkd's faster defaults for those not given."""
    changes: dict[str, Any] = {}
    for key in MONITOR_LIMITS:
        if key in options:
            value = options[key][1]
            if not _WHOLE_NUMBER.fullmatch(value):
                low, high = MONITOR_LIMITS[key]
                raise at(key).error(f"'{value}' is not a whole number from {low} to {high}")
            changes[key] = int(value)
    if "warn_email" in options:
        changes["warn_email"] = options["warn_email"][1]
    monitor = replace(Monitor(), **changes)
    check_monitor(monitor, at)
    return monitor
