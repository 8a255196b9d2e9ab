"""The TOML configuration, format detection and the shared checks (config, tomlconf, validate)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest
from uplinkd.config import loading
from uplinkd.config.model import (
    Config,
    HashBy,
    LinkConfig,
    MailSettings,
    Match,
    Method,
    Nat,
    PortForward,
    PortRange,
    Rule,
)
from uplinkd.errors import ConfigError

from . import expect

EXAMPLES = Path(__file__).parents[2] / "data" / "examples"
PATH = Path("/etc/uplinkd/uplinkd.toml")

# Two links on lines 1-9; the text added by each test starts at line 11.
BASE = """\
[[link]]
name = "DSL"
device = "eth0"
targets = ["1.1.1.1"]

[[link]]
name = "LTE"
device = "eth1"
targets = ["8.8.8.8", "9.9.9.9"]

"""


def parse(extra: str = "", base: str = BASE) -> Config:
    return loading.parse_toml(base + extra, PATH)


def refused(extra: str, line: int, key: str, *fragments: str, base: str = BASE) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(extra, base)
    expect.config_error(caught.value, PATH, line, key, *fragments)
    return caught.value


def test_example_file_parses() -> None:
    loaded = loading.load(EXAMPLES / "uplinkd.toml")
    assert loaded.format == "toml"
    assert [link.name for link in loaded.links] == ["DSL", "LTE"]
    dsl, lte = loaded.links
    assert (dsl.weight, dsl.priority, lte.weight, lte.priority) == (3, 1, 1, 2)
    assert dsl.gateway is None
    assert dsl.targets == (ipaddress.IPv4Address("1.1.1.1"), ipaddress.IPv4Address("9.9.9.9"))
    assert (dsl.bandwidth_down_mbps, dsl.bandwidth_up_mbps) == (100.0, 20.0)
    assert dsl.monitor.interval_ms == 200
    assert (lte.monitor.interval_ms, lte.monitor.timeout_ms) == (1000, 1500)  # [link.monitor]
    assert lte.monitor.max_successive_pkts_lost == 3  # the rest comes from [monitor]
    assert [lan.name for lan in loaded.lans] == ["LAN"]
    banking, voip, backups, fastest = loaded.rules
    assert (fastest.method, fastest.cache_seconds) == (Method.FASTEST_RESPONSE, 600)
    assert banking.method is Method.PERSISTENCE
    assert banking.by is HashBy.SOURCE
    assert banking.match.dst == (ipaddress.IPv4Network("203.0.113.0/24"),)
    assert voip.match.dport == (PortRange(5060, 5060), PortRange(10000, 20000))
    assert voip.match.iif == ("eth2",)
    assert backups.method is Method.ENFORCED
    assert backups.links == ("DSL",)
    assert loaded.default.method is Method.WEIGHTED
    web, ssh, games = loaded.forwards
    assert (web.port, web.host_port, web.proto) == (PortRange(80, 80), None, "tcp")
    assert (ssh.host_port, ssh.links) == (22, ("DSL",))
    assert (games.port, games.proto) == (PortRange(60000, 60010), "udp")
    assert loaded.firewall.forwarding_groups == (("LAN", "DSL", "LTE"),)
    assert not loaded.firewall.enabled
    assert loaded.mark_mask == 0xFF00
    assert loaded.mail == MailSettings()  # smtp_server and the rest are commented out


def test_defaults() -> None:
    loaded = parse()
    dsl, lte = loaded.links
    assert (dsl.priority, lte.priority) == (1, 2)  # definition order
    assert (dsl.weight, dsl.reliability, dsl.nat, dsl.gateway) == (1, 1, Nat.MASQUERADE, None)
    assert (dsl.line, lte.line) == (1, 6)
    assert loaded.default == Rule("default", Method.WEIGHTED)
    assert not loaded.firewall.enabled
    assert loaded.backend == "nftables"
    assert loaded.mail == MailSettings()  # "" smtp_server: the local sendmail


def test_values_are_parsed() -> None:
    loaded = parse(
        "[[rule]]\n"
        'match = { proto = "tcp", sport = "1024-65535", dport = 443, src = "10.0.0.0/8" }\n'
        'method = "persistence"\n'
        'by = "source+destination"\n'
        "[default]\n"
        'method = "priority"\n'
        'links = ["LTE", "DSL"]\n'
        "[firewall]\n"
        "enabled = true\n",
        base='backend = "iptables"\n'
        + BASE.replace('device = "eth1"', 'device = "eth1"\ngateway = "192.0.2.1"\nnat = "snat"'),
    )
    assert loaded.backend == "iptables"
    assert loaded.links[1].gateway == ipaddress.IPv4Address("192.0.2.1")
    assert loaded.links[1].nat is Nat.SNAT
    (rule,) = loaded.rules
    assert rule.name == "rule1"
    assert rule.by is HashBy.SOURCE_DESTINATION
    assert rule.match.sport == (PortRange(1024, 65535),)
    assert rule.match.src == (ipaddress.IPv4Network("10.0.0.0/8"),)
    assert loaded.default.links == ("LTE", "DSL")
    assert loaded.firewall.enabled
    assert loaded.firewall.forwarding_groups == (("DSL", "LTE"),)  # default: everything


@pytest.mark.parametrize(
    ("extra", "line", "key", "fragment"),
    [
        ("[monitor]\ninterval = 200\n", 12, "monitor.interval", "allowed: 'interval_ms'"),
        ("[kernel]\nmark = 1\n", 12, "kernel.mark", "unknown key 'mark' in [kernel]"),
        (
            '[[rule]]\nmethod = "weighted"\nmatch = { port = 80 }\n',
            13,
            "rule.match.port",
            "'dport'",
        ),
        ('[[lan]]\nname = "LAN"\ndevice = "eth2"\nvlan = 3\n', 14, "lan.vlan", "'device'"),
    ],
)
def test_unknown_keys(extra: str, line: int, key: str, fragment: str) -> None:
    refused(extra, line, key, fragment)


def test_unknown_top_level_key() -> None:
    # Top-level keys come before the first table; after it they would belong to that table.
    refused("", 1, "speed", "unknown key 'speed' in the top level", base="speed = 3\n" + BASE)
    refused("", 11, "link.speed", "unknown key 'speed' in [link]", base=BASE + "speed = 3\n")


def test_unknown_key_in_link_and_link_monitor() -> None:
    refused(
        "",
        3,
        "link.devices",
        "unknown key 'devices' in [link]",
        base=BASE.replace("device =", "devices =", 1),
    )
    refused("[link.monitor]\nintervall_ms = 1\n", 12, "link.monitor.intervall_ms", "[link.monitor]")


def test_malformed_toml_reports_tomllib_line() -> None:
    error = refused('[[rule]]\nname = "x\n', 12, "rule.name", "malformed TOML")
    assert "Unterminated string" in error.message or "Illegal character" in error.message


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("0", "must be between 1 and 1000"),
        ("-2", "must be between 1 and 1000"),
        ("1001", "must be between 1 and 1000"),
        ("1.5", "must be an integer"),
        ("true", "must be an integer"),
        ('"2"', "must be an integer"),
    ],
)
def test_bad_weight(value: str, fragment: str) -> None:
    refused(
        "",
        9,
        "link.weight",
        fragment,
        base=BASE.replace('device = "eth1"', f'device = "eth1"\nweight = {value}'),
    )


def test_bad_priority() -> None:
    refused(
        "",
        4,
        "link.priority",
        "between 1 and 4294967295",
        base=BASE.replace('device = "eth0"', 'device = "eth0"\npriority = 0'),
    )


def test_missing_device() -> None:
    refused("", 6, "link.device", "is required", base=BASE.replace('device = "eth1"\n', ""))


def test_missing_name() -> None:
    refused("", 1, "link.name", "is required", base=BASE.replace('name = "DSL"\n', ""))


def test_bad_device_name() -> None:
    refused(
        "",
        3,
        "link.device",
        "1-15 bytes",
        base=BASE.replace('"eth0"', '"a-very-long-device-name"'),
    )


def test_duplicate_link_names() -> None:
    refused(
        "",
        6,
        "link.name",
        "duplicate name 'DSL' (already used at line 1)",
        base=BASE.replace('"LTE"', '"DSL"'),
    )


def test_link_and_lan_names_share_one_namespace() -> None:
    refused('[[lan]]\nname = "LTE"\ndevice = "eth2"\n', 11, "lan.name", "duplicate name 'LTE'")


def test_duplicate_devices() -> None:
    refused("", 6, "link.device", "duplicate device 'eth0'", base=BASE.replace('"eth1"', '"eth0"'))
    refused('[[lan]]\nname = "LAN"\ndevice = "eth1"\n', 11, "lan.device", "already used at line 6")


def test_no_link_at_all() -> None:
    with pytest.raises(ConfigError, match="no link defined"):
        loading.parse_toml('[default]\nmethod = "weighted"\n', PATH)
    with pytest.raises(ConfigError, match=r"write \[\[link\]\] tables"):
        loading.parse_toml('[link]\nname = "DSL"\n', PATH)


@pytest.mark.parametrize(
    ("base_from", "base_to", "line", "key", "fragment"),
    [
        ('["1.1.1.1"]', '["1.1.1.300"]', 4, "link.targets", "'1.1.1.300' is not an IPv4 address"),
        ('["1.1.1.1"]', '["224.0.0.1"]', 4, "link.targets", "cannot be a probe target"),
        ('["1.1.1.1"]', '["1.1.1.1", "1.1.1.1"]', 4, "link.targets", "listed twice"),
        ('["1.1.1.1"]', "[]\nreliability = 2", 5, "link.reliability", "at most the number"),
        ('device = "eth0"', 'device = "eth0"\ngateway = "10.0.0"', 4, "link.gateway", '"auto"'),
        ('device = "eth0"', 'device = "eth0"\nnat = "full"', 4, "link.nat", "'masquerade'"),
        (
            'device = "eth0"',
            'device = "eth0"\nbandwidth_mbps = { down = 0 }',
            4,
            "link.bandwidth_mbps.down",
            "above 0",
        ),
    ],
)
def test_bad_link_values(base_from: str, base_to: str, line: int, key: str, fragment: str) -> None:
    refused("", line, key, fragment, base=BASE.replace(base_from, base_to, 1))


def test_multi_line_target_list_points_at_the_bad_value() -> None:
    base = BASE.replace('["8.8.8.8", "9.9.9.9"]', '[\n  "8.8.8.8",\n  "9.9.9",\n]')
    refused("", 11, "link.targets", "'9.9.9' is not an IPv4 address", base=base)


def test_reliability_above_number_of_targets() -> None:
    base = BASE.replace('device = "eth1"', 'device = "eth1"\nreliability = 3')
    refused("", 9, "link.reliability", "only 2", base=base)


def test_monitor_values() -> None:
    refused(
        "[monitor]\nmax_packet_loss = 5\n",
        12,
        "monitor.max_packet_loss",
        "greater than min_packet_loss (10)",
    )
    refused("[monitor]\ninterval_ms = 0\n", 12, "monitor.interval_ms", "between 10 and 60000")
    refused(
        "[monitor]\nmin_packet_loss = 101\n", 12, "monitor.min_packet_loss", "between 0 and 100"
    )
    refused('[link.monitor]\ntimeout_ms = "fast"\n', 12, "link.monitor.timeout_ms", "integer")


def test_fastest_response_and_its_cache_seconds() -> None:
    rule = '[[rule]]\nname = "web"\nmatch = { proto = "tcp", dport = 443 }\n'
    loaded = parse(rule + 'method = "fastest-response"\n')
    assert (loaded.rules[0].method, loaded.rules[0].cache_seconds) == (Method.FASTEST_RESPONSE, 600)
    loaded = parse('[default]\nmethod = "fastest-response"\ncache_seconds = 120\n')
    assert loaded.default.cache_seconds == 120
    refused(
        rule + 'method = "fastest-response"\ncache_seconds = 5\n',
        15,
        "rule.cache_seconds",
        "5 is not a number of seconds from 10 to 86400",
    )
    refused(
        rule + 'method = "weighted"\ncache_seconds = 60\n',
        15,
        "rule.cache_seconds",
        "'cache_seconds' applies only to method 'fastest-response'",
    )
    refused(
        rule + 'method = "fastest-response"\n',
        12,
        "rule.method",
        "method 'fastest-response' needs backend 'nftables'",
        base='backend = "iptables"\n' + BASE,
    )
    refused(
        '[[rule]]\nname = "dns"\nmatch = { proto = "udp" }\nmethod = "fastest-response"\n',
        13,
        "rule.match.proto",
        "races TCP connections to learn a destination's link; a rule for udp alone would never",
    )


def test_fastest_response_bounds_what_a_client_can_make_the_router_do() -> None:
    rule = '[[rule]]\nname = "web"\nmatch = { proto = "tcp", dport = 443 }\n'
    fastest = rule + 'method = "fastest-response"\n'
    web = parse(fastest).rules[0]
    assert (web.races_per_second, web.max_learned, web.race_private) == (20, 4096, False)
    web = parse(fastest + "races_per_second = 5\nmax_learned = 100\nrace_private = true\n")
    assert (web.rules[0].races_per_second, web.rules[0].max_learned) == (5, 100)
    assert web.rules[0].race_private
    default = parse('[default]\nmethod = "fastest-response"\nmax_learned = 16\n').default
    assert default.max_learned == 16
    for key, value, allowed in (
        ("races_per_second", 0, "between 1 and 1000"),
        ("races_per_second", 1001, "between 1 and 1000"),
        ("max_learned", 15, "between 16 and 65536"),
        ("max_learned", 65537, "between 16 and 65536"),
    ):
        refused(
            f"{fastest}{key} = {value}\n", 15, f"rule.{key}", f"{value} is out of range", allowed
        )
    refused(fastest + 'race_private = "yes"\n', 15, "rule.race_private", "true or false")
    for key, value in (("races_per_second", 5), ("max_learned", 100), ("race_private", "true")):
        refused(
            f'{rule}method = "weighted"\n{key} = {value}\n',
            15,
            f"rule.{key}",
            f"'{key}' applies only to method 'fastest-response'",
        )


@pytest.mark.parametrize("method", ["overflow", "least-used"])
def test_bandwidth_methods_need_link_bandwidths(method: str) -> None:
    refused(
        f'[[rule]]\nname = "r"\nmatch = {{ proto = "tcp" }}\nmethod = "{method}"\n',
        11,
        "rule.method",
        f"method '{method}' compares use with capacity, but link 'DSL' has no bandwidth_mbps",
    )
    with_bandwidth = BASE.replace(
        'targets = ["1.1.1.1"]', 'targets = ["1.1.1.1"]\nbandwidth_mbps = { down = 50 }'
    ).replace(
        'targets = ["8.8.8.8", "9.9.9.9"]', 'targets = ["8.8.8.8"]\nbandwidth_mbps = { up = 5 }'
    )
    loaded = parse(
        f'[[rule]]\nname = "r"\nmatch = {{ proto = "tcp" }}\nmethod = "{method}"\n', with_bandwidth
    )
    assert loaded.rules[0].method == method


def test_saturation_percent_belongs_to_overflow() -> None:
    rule = (
        '[[rule]]\nname = "r"\nmatch = {{ proto = "tcp" }}\nmethod = "{}"\n'
        "saturation_percent = {}\n"
    )
    refused(rule.format("weighted", 80), 15, "rule.saturation_percent", "only to method 'overflow'")
    bandwidth = BASE.replace(
        'targets = ["1.1.1.1"]', 'targets = ["1.1.1.1"]\nbandwidth_mbps = { down = 50 }'
    ).replace(
        'targets = ["8.8.8.8", "9.9.9.9"]', 'targets = ["8.8.8.8"]\nbandwidth_mbps = { down = 20 }'
    )
    refused(
        rule.format("overflow", 120), 17, "rule.saturation_percent", "from 1 to 100", base=bandwidth
    )
    assert parse(rule.format("overflow", 75), bandwidth).rules[0].saturation_percent == 75


def test_unknown_method_lists_the_methods() -> None:
    error = refused(
        '[default]\nmethod = "random"\n', 12, "default.method", "unknown method 'random'"
    )
    for method in Method:
        assert f"'{method.value}'" in error.message


def test_rule_needs_a_method() -> None:
    refused('[[rule]]\nname = "r"\n', 11, "rule.method", "is required")


def test_unknown_and_misplaced_by() -> None:
    refused(
        '[[rule]]\nmethod = "persistence"\nby = "port"\n', 13, "rule.by", "'source+destination'"
    )
    refused(
        '[[rule]]\nmethod = "weighted"\nby = "source"\n',
        13,
        "rule.by",
        "only to method 'persistence'",
    )


def test_unknown_link_in_rule() -> None:
    refused(
        '[[rule]]\nmethod = "priority"\nlinks = ["DSL", "CABLE"]\n',
        13,
        "rule.links",
        "unknown link 'CABLE'",
        "'DSL', 'LTE'",
    )
    refused(
        '[default]\nmethod = "weighted"\nlinks = ["LTE", "LTE"]\n',
        13,
        "default.links",
        "listed twice",
    )


def test_enforced_needs_exactly_one_link() -> None:
    refused('[[rule]]\nmethod = "enforced"\n', 11, "rule.links", "exactly one link", "found 0")
    refused('[[rule]]\nmethod = "enforced"\nlinks = ["DSL", "LTE"]\n', 13, "rule.links", "found 2")


@pytest.mark.parametrize(
    ("match", "key", "fragment"),
    [
        ('{ dst = ["203.0.113.7/24"] }', "rule.match.dst", "did you mean 203.0.113.0/24?"),
        ('{ src = ["10.0.0.0/33"] }', "rule.match.src", "not an IPv4 address or prefix"),
        ("{ dport = [0] }", "rule.match.dport", "not a port"),
        ("{ dport = [70000] }", "rule.match.dport", "not a port"),
        ('{ sport = ["20-10"] }', "rule.match.sport", "not a port"),
        ('{ dport = ["http"] }', "rule.match.dport", "not a port"),
        ('{ proto = "gre" }', "rule.match.proto", "'tcp', 'udp', 'icmp'"),
        ('{ proto = "icmp", dport = [1] }', "rule.match.proto", "ports need proto"),
        ('{ iif = ["eth/0"] }', "rule.match.iif", "invalid device name"),
    ],
)
def test_bad_match(match: str, key: str, fragment: str) -> None:
    refused(f'[[rule]]\nmethod = "weighted"\nmatch = {match}\n', 13, key, fragment)


def test_match_as_a_sub_table() -> None:
    refused(
        '[[rule]]\nmethod = "weighted"\n[rule.match]\nproto = "tcp"\ndport = [80, 0]\n',
        15,
        "rule.match.dport",
        "0",
    )


def test_catch_all_rule_before_other_rules() -> None:
    extra = '[[rule]]\nname = "all"\nmethod = "weighted"\n'
    extra += '[[rule]]\nname = "web"\nmethod = "priority"\nmatch = { dport = 80 }\n'
    refused(extra, 11, "rule.match", "matches all traffic")


def test_duplicate_rule_names() -> None:
    extra = '[[rule]]\nname = "web"\nmethod = "weighted"\nmatch = { dport = 80 }\n' * 2
    refused(extra, 15, "rule.name", "duplicate rule name 'web'")
    refused(
        '[[rule]]\nname = "default"\nmethod = "weighted"\n', 11, "rule.name", "duplicate rule name"
    )


@pytest.mark.parametrize(
    ("forward", "line", "key", "fragment"),
    [
        ('port = 80\nto = "192.168.10.300"', 13, "forward.to", "optionally with ':port'"),
        ('port = 80\nto = "192.168.10.3:0"', 13, "forward.to", "1-65535"),
        ('port = 0\nto = "192.168.10.3"', 12, "forward.port", "not a port"),
        ('port = "80-90"\nto = "192.168.10.3:22"', 13, "forward.to", "same ports"),
        ('port = 80\nto = "192.168.10.3"\nproto = "icmp"', 14, "forward.proto", "'tcp', 'udp'"),
        (
            'port = 80\nto = "192.168.10.3"\nlinks = ["DSL", "ISDN"]',
            14,
            "forward.links",
            "unknown link 'ISDN'",
        ),
        ('to = "192.168.10.3"', 11, "forward.port", "is required"),
        ('port = 80\nto = "127.0.0.1"', 13, "forward.to", "cannot receive"),
    ],
)
def test_bad_forward(forward: str, line: int, key: str, fragment: str) -> None:
    refused(f"[[forward]]\n{forward}\n", line, key, fragment)


def test_overlapping_forwards() -> None:
    extra = '[[forward]]\nport = 80\nto = "192.168.1.2"\n'
    extra += '[[forward]]\nport = "70-90"\nto = "192.168.1.3"\nlinks = ["LTE"]\n'
    refused(extra, 14, "forward.port", "already forwarded (line 11) on link 'LTE'")
    extra = extra.replace(
        'port = 80\nto = "192.168.1.2"', 'port = 80\nto = "192.168.1.2"\nlinks = ["DSL"]'
    )
    assert len(parse(extra).forwards) == 2  # different links: no overlap


def test_forwarding_groups() -> None:
    extra = '[[lan]]\nname = "LAN"\ndevice = "eth2"\n[firewall]\nenabled = true\n'
    extra += 'forwarding_groups = [["LAN", "DSL"], [":lan", ":isp"]]\n'
    assert parse(extra).firewall.forwarding_groups == (("LAN", "DSL"), ("LAN", "DSL", "LTE"))
    bad = extra.replace('["LAN", "DSL"], ', '["LAN", "WAN"], ')
    refused(bad, 16, "firewall.forwarding_groups", "unknown name 'WAN'", "':isp'")
    refused(
        extra.replace('["LAN", "DSL"], ', "[], "),
        16,
        "firewall.forwarding_groups",
        "at least one member",
    )
    refused(
        '[firewall]\nforwarding_groups = ["LAN"]\n',
        12,
        "firewall.forwarding_groups",
        "list of lists",
    )


def test_kernel_numbers() -> None:
    refused("[kernel]\nmark_mask = 0x0F0F\n", 12, "kernel.mark_mask", "one run of set bits")
    refused("[kernel]\nmark_mask = 0x2\n", 12, "kernel.mark_mask", "room for 0 links, not 2")
    refused("[kernel]\ntable_base = 252\n", 12, "kernel.table_base", "tables 252..254")
    refused("[kernel]\nrule_priority = 32000\n", 12, "kernel.rule_priority", "between 1 and 31865")
    refused(
        '[daemon]\nstop_removes_datapath = "yes"\n',
        12,
        "daemon.stop_removes_datapath",
        "true or false",
    )
    refused("", 1, "backend", "'nftables', 'iptables'", base='backend = "pf"\n' + BASE)


def test_mail_settings() -> None:
    loaded = parse(
        "[mail]\n"
        'smtp_server = "mail.example.net:587"\n'
        'sender = "router@example.net"\n'
        "starttls = true\n"
        'username = "router"\n'
        'password = "secret"\n'
        "max_per_hour = 4\n"
        "timeout_s = 2.5\n"
    )
    assert loaded.mail == MailSettings(
        "mail.example.net:587", "router@example.net", True, "router", "secret", 4, 2.5
    )
    assert parse('[mail]\nsmtp_server = "[2001:db8::25]"\n').mail.smtp_server == "[2001:db8::25]"


@pytest.mark.parametrize(
    ("mail", "line", "key", "fragment"),
    [
        ('smtp_server = "mail:99999"', 12, "mail.smtp_server", "is not a mail server like"),
        ('smtp_server = "mail example"', 12, "mail.smtp_server", "is not a mail server like"),
        ('smtp_server = "mx:465"\nstarttls = true', 13, "mail.starttls", "TLS from the start"),
        ("starttls = true", 12, "mail.starttls", "applies only with smtp_server"),
        ('sender = "uplinkd"', 12, "mail.sender", "is not a mail address"),
        ('smtp_server = "mx"\nusername = "u"', 13, "mail.username", "needs password too"),
        ('username = "u"\npassword = "p"', 12, "mail.username", "applies only with smtp_server"),
        ("max_per_hour = 0", 12, "mail.max_per_hour", "between 1 and 3600"),
        ("timeout_s = 0", 12, "mail.timeout_s", "must be > 0 and <= 300"),
        ('timeout_s = "10s"', 12, "mail.timeout_s", "a number of seconds"),
        ("starttls = 1", 12, "mail.starttls", "true or false"),
        ("relay = true", 12, "mail.relay", "unknown key 'relay' in [mail]"),
    ],
)
def test_bad_mail_settings(mail: str, line: int, key: str, fragment: str) -> None:
    refused(f"[mail]\n{mail}\n", line, key, fragment)


def test_validate_checks_configs_built_in_code() -> None:
    loaded = parse()
    loading.validate(loaded)
    forward = PortForward(
        PortRange(80, 80), ipaddress.IPv4Address("10.0.0.2"), links=("X",), line=7
    )
    with pytest.raises(ConfigError, match=r":7: forward.links: unknown link 'X'"):
        loading.validate(replace(loaded, forwards=(forward,)))
    link = LinkConfig("ISP", "eth9", weight=0, targets=(ipaddress.IPv4Address("1.1.1.1"),), line=3)
    with pytest.raises(ConfigError, match=r":3: link.weight: 0 is out of range"):
        loading.validate(replace(loaded, links=(*loaded.links, link)))
    rule = Rule("r", Method.FASTEST_RESPONSE, Match(proto="tcp"), line=5)
    with pytest.raises(ConfigError, match=r":5: rule.method: .*needs backend 'nftables'"):
        loading.validate(replace(loaded, rules=(rule,), backend="iptables"))
    rule = Rule("r", Method.OVERFLOW, Match(proto="tcp"), line=5)
    with pytest.raises(ConfigError, match=r":5: rule.method: .*'DSL' has no bandwidth_mbps"):
        loading.validate(replace(loaded, rules=(rule,)))


# --- format detection ----------------------------------------------------------------------------


def test_load_detects_the_format_by_content(tmp_path: Path) -> None:
    toml = tmp_path / "balance.conf"  # the name does not matter
    toml.write_text(BASE)
    assert loading.load(toml).format == "toml"
    conf = tmp_path / "uplinkd.toml"
    conf.write_text("CABLE eth0 isp 1.1.1.1\nLAN eth1 lan\n")
    assert loading.load(conf).format == "balance.conf"


def test_load_reports_toml_errors_for_toml_files(tmp_path: Path) -> None:
    broken = tmp_path / "uplinkd.toml"
    broken.write_text(BASE + "[[rule]\n")
    with pytest.raises(ConfigError, match="malformed TOML") as caught:
        loading.load(broken)
    assert caught.value.line == 11


@pytest.mark.parametrize("text", ["speed = 200\n", "hello world\n", "", "a b c d\n"])
def test_load_refuses_what_is_neither(tmp_path: Path, text: str) -> None:
    path = tmp_path / "x.conf"
    path.write_text(text)
    with pytest.raises(ConfigError, match="neither an uplinkd TOML configuration"):
        loading.load(path)


@pytest.mark.parametrize("text", ["mode=balanced\n", "interval_ms = 200\n"])
def test_balance_conf_options_without_services(tmp_path: Path, text: str) -> None:
    path = tmp_path / "balance.conf"
    path.write_text(text)
    with pytest.raises(ConfigError, match="no isp service"):
        loading.load(path)


def test_load_refuses_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        loading.load(tmp_path / "missing.toml")


def test_inline_top_level_table_is_located() -> None:
    refused(
        "",
        1,
        "monitor.interval_ms",
        "between 10 and 60000",
        base="monitor = { interval_ms = 1 }\n" + BASE,
    )


def test_toml_with_unknown_tables_is_read_as_toml(tmp_path: Path) -> None:
    path = tmp_path / "uplinkd.toml"
    path.write_text('[[links]]\nname = "DSL"\n')
    with pytest.raises(ConfigError, match=r":1: links: unknown key 'links' in the top level"):
        loading.load(path)


# --- issue 11: bounds, byte order marks, syntax errors, device names, host names -----------------


@pytest.mark.parametrize(
    ("extra", "key", "fragment"),
    [
        ("[monitor]\ninterval_ms = 100000000000000000000000", "monitor.interval_ms", "60000"),
        ("[monitor]\ninterval_ms = 1e23", "monitor.interval_ms", "must be an integer"),
        ("[monitor]\ntimeout_ms = 60001", "monitor.timeout_ms", "between 1 and 60000"),
        ("[monitor]\nmax_successive_pkts_lost = 1001", "monitor.max_successive_pkts_lost", "1000"),
        ("[monitor]\nmin_successive_pkts_rcvd = 2000", "monitor.min_successive_pkts_rcvd", "1000"),
        ("[monitor]\nlong_down_time = 604801", "monitor.long_down_time", "604800"),
        (
            "[firewall]\nicmp_rate_per_second = 18446744073709551616",
            "firewall.icmp_rate_per_second",
            "between 1 and 10000",
        ),
        ("[mail]\nmax_per_hour = 3601", "mail.max_per_hour", "between 1 and 3600"),
        ("[mail]\ntimeout_s = inf", "mail.timeout_s", "<= 300"),
        ("[mail]\ntimeout_s = nan", "mail.timeout_s", "<= 300"),
    ],
)
def test_every_number_is_bounded(extra: str, key: str, fragment: str) -> None:
    refused(extra + "\n", 12, key, fragment)


@pytest.mark.parametrize(
    ("setting", "key", "fragment"),
    [
        ("weight = 1001", "link.weight", "between 1 and 1000"),
        ("priority = 4294967296", "link.priority", "between 1 and 4294967295"),
        ("bandwidth_mbps = { down = inf }", "link.bandwidth_mbps.down", "at most 1e+06"),
        ("bandwidth_mbps = { up = nan }", "link.bandwidth_mbps.up", "is not a bandwidth"),
        ("bandwidth_mbps = { down = 1e7 }", "link.bandwidth_mbps.down", "is not a bandwidth"),
    ],
)
def test_every_link_number_is_bounded(setting: str, key: str, fragment: str) -> None:
    refused(
        "", 4, key, fragment, base=BASE.replace('device = "eth0"', f'device = "eth0"\n{setting}')
    )


def test_numbers_at_their_bounds_are_accepted() -> None:
    loaded = parse(
        "[monitor]\ninterval_ms = 60000\ntimeout_ms = 60000\nlong_down_time = 604800\n"
        "[firewall]\nicmp_rate_per_second = 10000\n",
        base=BASE.replace('device = "eth0"', 'device = "eth0"\nweight = 1000\npriority = 9'),
    )
    assert loaded.links[0].monitor.interval_ms == 60000
    assert (loaded.links[0].weight, loaded.firewall.icmp_rate_per_second) == (1000, 10000)


def test_a_byte_order_mark_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "uplinkd.toml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert [link.name for link in loading.load(path).links] == ["DSL", "LTE"]
    assert loading.parse_toml("\ufeff" + BASE, PATH).links[0].name == "DSL"


@pytest.mark.parametrize(
    ("extra", "line", "key", "fragment"),
    [
        ('[[lan]]\nname = "LAN"\ndevice = "eth2\n', 13, "lan.device", "Illegal character"),
        (
            "[monitor]\ninterval_ms = 100\ninterval_ms = 200\n",
            13,
            "monitor.interval_ms",
            "overwrite",
        ),
        ("[kernel]\nmark_mask = 0xZZ\n", 12, "kernel.mark_mask", "(column"),
        ('[[rule]\nname = "x"\n', 11, "rule", "array declaration"),
        ('[[rule]]\nmatch = { proto = "tcp"\n', 12, "rule.match", "inline table"),
        ('[[rule]]\nlinks = [\n  "DSL",\n  "LTE\n]\n', 14, "rule.links", "Illegal character"),
        ('[default]\nmethod = "weighted', 12, "default.method", "Unterminated string"),
        ("[[rule]]\nlinks = [1,\n", 12, "rule.links", "end of the file"),
    ],
)
def test_toml_syntax_errors_name_the_line_and_key(
    extra: str, line: int, key: str, fragment: str
) -> None:
    refused(extra, line, key, "malformed TOML", fragment)


# Where a device name is written: table, line, text ({device} is a TOML string).
DEVICE_KEYS = [
    ("link", 3, BASE.replace('"eth0"', "{device}")),
    ("lan", 13, BASE + '[[lan]]\nname = "LAN"\ndevice = {device}\n'),
    ("rule", 12, BASE + '[[rule]]\nmatch = {{ iif = [{device}] }}\nmethod = "weighted"\n'),
]


@pytest.mark.parametrize(
    "device",
    [
        'we"1',
        "we#1",
        "we;1",
        "we{1",
        "we}1",
        "$wan",
        "we\\1",
        "we:1",
        "we/1",
        "we 1",
        "we*",
        "a" * 16,
    ],
)
@pytest.mark.parametrize(("table", "line", "text"), DEVICE_KEYS)
def test_device_names_the_kernel_or_the_ruleset_cannot_take(
    device: str, table: str, line: int, text: str
) -> None:
    key = f"{table}.match.iif" if table == "rule" else f"{table}.device"
    refused("", line, key, "invalid device name", base=text.format(device=json.dumps(device)))


@pytest.mark.parametrize("device", ["eth0.100", "br-lan", "wg_0", "enp0s31f6", "a" * 15, "ppp+0"])
def test_device_names_as_they_come(device: str) -> None:
    loaded = parse(f'[[lan]]\nname = "LAN"\ndevice = "{device}"\n')
    assert loaded.lans[0].device == device


def test_target_host_names_are_kept_for_the_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("a configuration was resolved while it was read")

    monkeypatch.setattr("socket.getaddrinfo", refuse)
    base = BASE.replace('["1.1.1.1"]', '["dns.example.net", "1.1.1.1"]')
    assert parse(base=base).links[0].targets == (
        "dns.example.net",
        ipaddress.IPv4Address("1.1.1.1"),
    )
    base = BASE.replace('["1.1.1.1"]', '["dns.example.net", "DNS.example.net."]')
    refused("", 4, "link.targets", "listed twice", base=base)
    refused("", 4, "link.targets", "a host name", base=BASE.replace('"1.1.1.1"', '"dns_server"'))


def test_names_differing_only_in_case_are_one_name() -> None:
    refused(
        '[[lan]]\nname = "dsl"\ndevice = "eth2"\n',
        11,
        "lan.name",
        "duplicate name 'dsl' (already used at line 1 as 'DSL')",
    )
    groups = parse(
        '[[lan]]\nname = "LAN"\ndevice = "eth2"\n[firewall]\nforwarding_groups = [["lan", "dsl"]]\n'
    )
    assert groups.firewall.forwarding_groups == (("LAN", "DSL"),)


# --- issue 12: who may change the configuration decides what root runs ---------------------------


@pytest.mark.parametrize(("mode", "shown"), [(0o666, "-rw-rw-rw-"), (0o664, "-rw-rw-r--")])
def test_a_configuration_others_may_write_is_refused(tmp_path: Path, mode: int, shown: str) -> None:
    path = tmp_path / "uplinkd.toml"
    path.write_text(BASE)
    path.chmod(mode)
    with pytest.raises(ConfigError) as caught:
        loading.load(path)
    assert str(caught.value) == (
        f"{path}: refused: writable by group or others (mode {shown}); "
        "whoever may change it decides what root runs"
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
@pytest.mark.parametrize("name", ["uplinkd.toml", "balance.conf"])
def test_a_configuration_owned_by_another_user_is_refused(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text(BASE if name.endswith(".toml") else "CABLE eth0 isp 1.1.1.1\nLAN eth1 lan\n")
    os.chown(path, 65534, 65534)
    with pytest.raises(ConfigError) as caught:
        loading.load(path)
    assert str(caught.value) == (
        f"{path}: refused: owned by uid 65534, not root; whoever may change it decides what "
        "root runs"
    )


def test_a_linked_configuration_is_checked_where_it_points(tmp_path: Path) -> None:
    real = tmp_path / "real.toml"
    real.write_text(BASE)
    link = tmp_path / "uplinkd.toml"
    link.symlink_to(real)
    assert loading.load(link).links[0].name == "DSL"
    real.chmod(0o646)
    with pytest.raises(ConfigError, match=r"uplinkd.toml: refused: writable by group or others"):
        loading.load(link)


MAIL_LOGIN = '[mail]\nsmtp_server = "mail.example.net"\nusername = "router"\npassword = "s3cret"\n'


def test_a_password_others_may_read_is_warned_about_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "uplinkd.toml"
    path.write_text(BASE + MAIL_LOGIN)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="uplinkd"):
        for _ in range(3):  # start and two reloads
            assert loading.load(path).mail.username == "router"
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: holds the [mail] password and others may read it (mode -rw-r--r--); chmod o-r it"
    ]


@pytest.mark.parametrize(("extra", "mode"), [(MAIL_LOGIN, 0o640), ("", 0o644)])
def test_no_warning_for_a_private_password_or_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, extra: str, mode: int
) -> None:
    path = tmp_path / "uplinkd.toml"
    path.write_text(BASE + extra)
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="uplinkd"):
        loading.load(path)
    assert caplog.records == []
