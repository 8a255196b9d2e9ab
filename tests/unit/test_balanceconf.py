"""Net-ISP-Balance's balance.conf, read unchanged (balanceconf.py)."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest
from uplinkd.config import balanceconf, loading
from uplinkd.config.model import Config, Method, Monitor
from uplinkd.errors import ConfigError
from uplinkd.runtime import daemon

from . import expect

EXAMPLES = Path(__file__).parents[2] / "data" / "examples"
PATH = Path("/etc/network/balance.conf")


@pytest.fixture(autouse=True)
def no_name_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a configuration never resolves a name (the daemon does, while it runs)."""

    def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError(f"getaddrinfo{args} called while reading a configuration")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def parse(text: str) -> Config:
    return balanceconf.parse_balance_conf(text, PATH)


def refused(text: str, line: int, key: str, *fragments: str) -> ConfigError:
    with pytest.raises(ConfigError) as caught:
        parse(text)
    expect.config_error(caught.value, PATH, line, key, *fragments)
    return caught.value


def test_example_file() -> None:
    loaded = loading.load(EXAMPLES / "balance.conf")
    assert loaded.format == "balance.conf"
    cable, dsl = loaded.links
    assert (cable.name, cable.device, cable.weight, cable.priority) == ("CABLE", "eth0", 2, 1)
    assert (dsl.name, dsl.device, dsl.weight, dsl.priority) == ("DSL", "ppp0", 1, 2)
    assert cable.targets == (ipaddress.IPv4Address("173.194.43.95"),)
    assert cable.gateway is None
    assert [(lan.name, lan.device) for lan in loaded.lans] == [("LAN", "eth1"), ("GUEST", "eth2")]
    assert loaded.default.method is Method.WEIGHTED
    assert loaded.firewall.enabled
    assert loaded.firewall.forwarding_groups == (("LAN", "CABLE", "DSL"), ("GUEST", "CABLE", "DSL"))
    assert cable.monitor == Monitor(long_down_time=120, warn_email="root@localhost")


def test_net_isp_balance_test_file() -> None:
    # Net-ISP-Balance's own t/etc/balance.conf: tabs, trailing blanks, host names, lan-only rows.
    loaded = parse(
        "#service    device   role     test-ping\n"
        "LAN\t    eth1     lan      \n"
        "VPN         tun0     lan\n"
        "SUBNET      eth3     lan\n"
        "CABLE\t    eth0     isp      www.google.ca\n"
        "DSL\t    ppp0     isp      www.google.ca\n\n\n\n"
    )
    assert [link.name for link in loaded.links] == ["CABLE", "DSL"]
    assert loaded.links[0].targets == ("www.google.ca",)  # resolved by the daemon, not here
    assert [lan.name for lan in loaded.lans] == ["LAN", "VPN", "SUBNET"]
    assert loaded.firewall.forwarding_groups == (("LAN", "VPN", "SUBNET", "CABLE", "DSL"),)
    assert loaded.links[0].monitor == Monitor()  # uplinkd's defaults when nothing is set


def test_optional_columns_and_extras() -> None:
    loaded = parse(
        "A eth0 isp 1.1.1.1 default 192.0.2.1   # trailing comment\n"
        "B eth1 isp 8.8.8.8 4 default extra columns are ignored\n"
        "C eth2 ISP 9.9.9.9\n"
        "L eth3 lan 10.0.0.1 5\n"
    )
    a, b, c = loaded.links
    assert (a.weight, a.gateway) == (1, ipaddress.IPv4Address("192.0.2.1"))
    assert (b.weight, b.gateway) == (4, None)
    assert c.weight == 1
    assert loaded.lans[0].name == "L"


def test_failover_orders_by_weight_then_file_order() -> None:
    loaded = parse(
        "A eth0 isp 1.1.1.1 1\nB eth1 isp 1.1.1.2 3\nC eth2 isp 1.1.1.3 1\nD eth3 isp 1.1.1.4 3\n"
        "mode = failover\n"
    )
    assert loaded.default.method is Method.PRIORITY
    assert loaded.default.line == 5
    assert {link.name: link.priority for link in loaded.links} == {"B": 1, "D": 2, "A": 3, "C": 4}


def test_balanced_keeps_file_order() -> None:
    loaded = parse("A eth0 isp 1.1.1.1 1\nB eth1 isp 1.1.1.2 3\nmode=balanced\n")
    assert loaded.default.method is Method.WEIGHTED
    assert [link.priority for link in loaded.links] == [1, 2]


def test_monitor_options_apply_to_every_link() -> None:
    loaded = parse(
        "interval_ms=1000\ntimeout_ms = 900\nmax_packet_loss=15\nmax_successive_pkts_lost=7\n"
        "min_packet_loss=5\nmin_successive_pkts_rcvd=10\nlong_down_time=120\n"
        "warn_email=admin@example.org\n"
        "A eth0 isp 1.1.1.1\nB eth1 isp 1.1.1.2\n"
    )
    foolsm = Monitor(1000, 900, 15, 7, 5, 10, 120, "admin@example.org")
    assert [link.monitor for link in loaded.links] == [foolsm, foolsm]


def test_known_options_are_ignored() -> None:
    ignored = "debug=8\nverbose=1\nlsm_conf_file=/etc/lsm.conf\nlog_file=/var/log/x\ndummy_data=1\n"
    ignored += "checkip=127.0.0.1\neventscript=/x\nstatus=2\nstartup_burst_pkts=3\n"
    assert len(parse(ignored + "A eth0 isp 1.1.1.1\n").links) == 1


def test_forwarding_groups() -> None:
    loaded = parse(
        "A eth0 isp 1.1.1.1\nB eth1 isp 1.1.1.2\nL1 eth2 lan\nL2 eth3 lan\n"
        "forwarding_group=L1 :isp\nforwarding_group=L2 A\nforwarding_group=:lan\n"
    )
    assert loaded.firewall.forwarding_groups == (("L1", "A", "B"), ("L2", "A"), ("L1", "L2"))


def test_has_service_table() -> None:
    assert balanceconf.has_service_table("# x\nCABLE eth0 isp 1.1.1.1\n")
    assert balanceconf.has_service_table("LAN eth1 lan\n")
    assert not balanceconf.has_service_table("#CABLE eth0 isp 1.1.1.1\nmode=balanced\n")
    assert not balanceconf.has_service_table('[[link]]\nname = "isp"\n')
    assert balanceconf.is_balance_conf("# only options\nmode=failover\n")
    assert not balanceconf.is_balance_conf('[[link]]\nname = "DSL"\n')


# --- refused -------------------------------------------------------------------------------------


def test_malformed_line() -> None:
    refused("A eth0 isp 1.1.1.1\nB eth1\n", 2, "", "malformed line 'B eth1'", "key=value")
    refused("A eth0 isp 1.1.1.1\nmax-packet-loss=3\n", 2, "", "malformed line")


def test_unknown_option() -> None:
    refused(
        "A eth0 isp 1.1.1.1\n\nbalance_mode=fast\n",
        3,
        "balance_mode",
        "unknown option 'balance_mode'",
        "interval_ms",
    )


def test_unknown_role() -> None:
    refused(
        "A eth0 isp 1.1.1.1\nB eth1 wan 1.1.1.2\n", 2, "role", "unknown role 'wan'", "'isp', 'lan'"
    )


@pytest.mark.parametrize("weight", ["0", "-1", "1.5", "two", "\u00b2", "\u0663"])
def test_bad_weight(weight: str) -> None:
    refused(
        f"A eth0 isp 1.1.1.1\nB eth1 isp 1.1.1.2 {weight}\n",
        2,
        "weight",
        f"'{weight}' is not a weight",
    )


def test_duplicates() -> None:
    refused(
        "A eth0 isp 1.1.1.1\nA eth1 isp 1.1.1.2\n",
        2,
        "service",
        "duplicate service 'A' (already used at line 1)",
    )
    refused("A eth0 isp 1.1.1.1\nL eth0 lan\n", 2, "device", "duplicate device 'eth0'")


def test_reserved_and_bad_names() -> None:
    refused("up eth0 isp 1.1.1.1\n", 1, "service", "cannot be named 'up'")
    refused("A eth0 isp 1.1.1.1\nL@N eth1 lan\n", 2, "service", "invalid name 'L@N'")
    refused("A eth/0 isp 1.1.1.1\n", 1, "device", "invalid device name")


def test_bad_addresses() -> None:
    refused(
        "A eth0 isp 1.1.1.1 1 192.0.2\n",
        1,
        "gateway",
        "'192.0.2' is not an IPv4 address or 'default'",
    )
    refused(
        "A eth0 isp 1.2.3.999\n", 1, "ping-ip", "'1.2.3.999' is not an IPv4 address or a host name"
    )
    refused("A eth0 isp -bad-.host\n", 1, "ping-ip", "not an IPv4 address or a host name")
    refused("A eth0 isp host_name\n", 1, "ping-ip", "not an IPv4 address or a host name")


def test_isp_without_ping_ip_probes_its_gateway() -> None:
    for row in ("A eth0 isp\n", "A eth0 isp default\n", "A eth0 isp default 2 10.0.0.1\n"):
        config = balanceconf.parse_balance_conf(row, Path("/etc/network/balance.conf"))
        assert config.links[0].targets == ()


def test_bad_option_values() -> None:
    refused("A eth0 isp 1.1.1.1\nmode=roundrobin\n", 2, "mode", "'balanced', 'failover'")
    refused("interval_ms=1s\nA eth0 isp 1.1.1.1\n", 1, "interval_ms", "'1s' is not a whole number")
    refused(
        "max_packet_loss=5\nmin_packet_loss=5\nA eth0 isp 1.1.1.1\n",
        1,
        "max_packet_loss",
        "greater than min_packet_loss (5)",
    )
    refused("A eth0 isp 1.1.1.1\ninterval_ms=5\n", 2, "interval_ms", "between 10 and 60000")


def test_unknown_name_in_forwarding_group() -> None:
    refused(
        "A eth0 isp 1.1.1.1\nL eth1 lan\nforwarding_group=L B\n",
        3,
        "forwarding_group",
        "unknown name 'B'",
        "':isp'",
    )
    refused("A eth0 isp 1.1.1.1\nforwarding_group=\n", 2, "forwarding_group", "at least one member")


def test_no_isp_service() -> None:
    with pytest.raises(ConfigError, match="no isp service"):
        parse("LAN eth1 lan\nmode=balanced\n")


# --- issue 11: what a real router's balance.conf brought ------------------------------------------


def test_host_names_are_kept_for_the_daemon_to_resolve() -> None:
    # Resolving when reading made an unresolvable name (DNS not up yet at boot) a fatal error.
    loaded = parse("A eth0 isp no.such.host.example\nB eth1 isp 1.1.1.1\n")
    assert loaded.links[0].targets == ("no.such.host.example",)
    assert loaded.links[1].targets == (ipaddress.IPv4Address("1.1.1.1"),)


def test_a_byte_order_mark_is_not_part_of_the_first_name(tmp_path: Path) -> None:
    path = tmp_path / "balance.conf"
    path.write_bytes(b"\xef\xbb\xbfISP1 eth0 isp 1.1.1.1\nLAN eth1 lan\n")
    loaded = loading.load(path)
    assert loaded.format == "balance.conf"
    assert [link.name for link in loaded.links] == ["ISP1"]
    assert parse("\ufeffISP1 eth0 isp 1.1.1.1\n").links[0].name == "ISP1"


def test_service_names_are_case_insensitive() -> None:
    refused(
        "CABLE eth0 isp 1.1.1.1\ncable eth1 isp 1.1.1.2\n",
        2,
        "service",
        "duplicate service 'cable' (already used at line 1 as 'CABLE')",
    )
    refused("CABLE eth0 isp 1.1.1.1\nLan eth1 lan\nLAN eth2 lan\n", 3, "service", "'Lan'")
    loaded = parse(
        "CABLE eth0 isp 1.1.1.1\nDsl eth1 isp 1.1.1.2\nLAN eth2 lan\n"
        "forwarding_group=lan cable\nforwarding_group=Lan DSL\nforwarding_group=LAN :ISP\n"
    )
    assert loaded.firewall.forwarding_groups == (
        ("LAN", "CABLE"),
        ("LAN", "Dsl"),
        ("LAN", "CABLE", "Dsl"),
    )


def test_services_on_the_command_line_are_case_insensitive() -> None:
    # load_balance.pl upper-cased its arguments: `load_balance.pl cable` brought CABLE up.
    loaded = parse("CABLE eth0 isp 1.1.1.1\nDsl eth1 isp 1.1.1.2\n")
    assert daemon.service_names(loaded, ["cable", "DSL"]) == ("CABLE", "Dsl")
    with pytest.raises(ConfigError, match="unknown service 'fibre' on the command line"):
        daemon.service_names(loaded, ["fibre"])


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('A we"1 isp 1.1.1.1\n', "device", "'\"'"),
        ("A wan;1 isp 1.1.1.1\n", "device", "';'"),
        ("A wan{1 isp 1.1.1.1\n", "device", "'{'"),
        ("A $wan isp 1.1.1.1\n", "device", "'$'"),
        ("A wan\\1 isp 1.1.1.1\n", "device", "'\\\\'"),
        ("A wan:1 isp 1.1.1.1\n", "device", "':'"),
        ("A wan* isp 1.1.1.1\n", "device", "'*'"),
        ("A eth0 isp 1.1.1.1\nL l\u00e4n-with-16-bytes lan\n", "device", "1-15 bytes"),
    ],
)
def test_device_names_the_kernel_or_the_ruleset_cannot_take(
    text: str, key: str, fragment: str
) -> None:
    line = text.count("\n")
    refused(text, line, key, "invalid device name", fragment)


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        ("interval_ms=100000000000000000000000", "between 10 and 60000"),
        ("timeout_ms=60001", "between 1 and 60000"),
        ("max_successive_pkts_lost=1001", "between 1 and 1000"),
        ("min_successive_pkts_rcvd=99999999999", "between 1 and 1000"),
        ("long_down_time=604801", "between 0 and 604800"),
        ("interval_ms=1e23", "is not a whole number"),
    ],
)
def test_numbers_are_bounded(option: str, fragment: str) -> None:
    key = option.partition("=")[0]
    refused(f"A eth0 isp 1.1.1.1\n{option}\n", 2, key, fragment)
    refused("A eth0 isp 1.1.1.1 1001\n", 1, "weight", "between 1 and 1000")
