"""Configurations that meet the router's kernel: LAN devices that are not there, probe target
names that do not resolve yet (root, lab)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from uplinkd_lab.lab import INET_HOST, Lab

from .conftest import TWO_LINKS, Uplinkd, needs_root, wait_until
from .privatebus import private_bus
from .test_ctl import uplinkctl

pytestmark = [needs_root, pytest.mark.lab]

EXIT_BAD_INPUT = 2

BALANCE_CONF = f"""\
ISP1 wan1 isp {INET_HOST}
ISP2 wan2 isp {INET_HOST}
{{lans}}"""

RESOLVED_LATER = f"""
[monitor]
interval_ms = 200
timeout_ms = 300

[[link]]
name = "ISP1"
device = "wan1"
targets = ["inet.uplinkd.test"]

[[link]]
name = "ISP2"
device = "wan2"
targets = ["{INET_HOST}"]

[[lan]]
name = "LAN"
device = "lan0"
"""


def test_a_missing_lan_device_is_named_with_its_line(lab2: Lab, uplinkd: Uplinkd) -> None:
    # A typo in one LAN: warned with file:line, the other LAN is served.
    config = uplinkd.write_config(
        BALANCE_CONF.format(lans="LAN lan0 lan\nGUEST lan9 lan\n"), "balance.conf"
    )
    warning = f"{config}:4: lan.device: device 'lan9' of LAN GUEST does not exist"
    dry = uplinkd.run(config, "-d")
    assert warning in dry.stderr, dry.stderr
    once = uplinkd.run(config, "--once")
    assert warning in once.stderr, once.stderr
    assert 'iifname "lan0"' in lab2.run(lab2.ns_router, "nft", "list", "ruleset").stdout


@pytest.mark.parametrize(
    ("name", "text", "line"),
    [
        ("balance.conf", BALANCE_CONF.format(lans="LAN lan9 lan\n"), 3),
        (
            "uplinkd.toml",
            '[[link]]\nname = "ISP1"\ndevice = "wan1"\n[[lan]]\nname = "LAN"\ndevice = "lan9"\n',
            4,
        ),
    ],
)
def test_no_lan_device_at_all_is_refused_and_nothing_applied(
    uplinkd: Uplinkd, name: str, text: str, line: int
) -> None:
    config = uplinkd.write_config(text, name)
    before = uplinkd.kernel_state()
    for mode in ("-d", "--once"):
        result = uplinkd.run(config, mode, check=False)
        assert result.returncode == EXIT_BAD_INPUT, result.stderr
        assert f"{config}:{line}: lan.device: no LAN device exists ('lan9')" in result.stderr
        assert result.stdout == ""
        assert uplinkd.kernel_state() == before

    daemon = uplinkd.start(config, ready=None)
    assert daemon.log.wait_for("waiting up to 10 s for one"), daemon.log.text
    assert wait_until(lambda: not daemon.running, timeout=30)
    daemon.stop()
    assert daemon.proc.returncode == EXIT_BAD_INPUT, daemon.log.text
    assert "no LAN device exists ('lan9')" in daemon.log.text
    assert uplinkd.kernel_state() == before


def test_a_reload_without_any_lan_device_is_refused(uplinkd: Uplinkd) -> None:
    config = uplinkd.write_config(BALANCE_CONF.format(lans="LAN lan0 lan\n"), "balance.conf")
    daemon = uplinkd.start(config)
    state = uplinkd.kernel_state()
    config.write_text(BALANCE_CONF.format(lans="LAN lan9 lan\n"))
    daemon.send(signal.SIGHUP)
    assert daemon.log.wait_for("reload refused, keeping the running configuration"), daemon.log.text
    assert "no LAN device exists ('lan9')" in daemon.log.text
    assert daemon.running
    assert uplinkd.kernel_state() == state


@pytest.fixture
def router_hosts(lab2: Lab) -> Iterator[Path]:
    """/etc/hosts and resolv.conf as the lab router's processes see them: `ip netns exec` bind
    mounts /etc/netns/NAME/* over /etc/*. No name server answers (127.0.0.1 in the router
    namespace has none), so only what the test writes into this hosts file resolves."""
    netns = Path("/etc/netns")
    made_netns = not netns.exists()
    directory = netns / lab2.ns_router
    directory.mkdir(parents=True)
    (directory / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
    hosts = directory / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    try:
        yield hosts
    finally:
        shutil.rmtree(directory)
        if made_netns:
            netns.rmdir()


def test_a_target_name_that_resolves_later(lab2: Lab, uplinkd: Uplinkd, router_hosts: Path) -> None:
    config = uplinkd.write_config(RESOLVED_LATER)
    dry = uplinkd.run(config, "-d")  # a name that does not resolve is no configuration error
    assert (
        f"{config}:6: link.targets: inet.uplinkd.test of link ISP1 does not resolve" in dry.stderr
    )

    daemon = uplinkd.start(config)
    assert daemon.log.wait_for("link ISP2: init -> up"), daemon.log.text
    waiting = "link ISP1: stays init, probe target names do not resolve yet: inet.uplinkd.test ("
    assert daemon.log.wait_for(waiting), daemon.log.text
    assert daemon.log.wait_for("probe target inet.uplinkd.test does not resolve ("), daemon.log.text
    assert "link ISP1: init ->" not in daemon.log.text

    # In place (the bind mount holds this inode): the name resolves from now on.
    with router_hosts.open("w") as hosts:
        hosts.write(f"127.0.0.1 localhost\n{INET_HOST} inet.uplinkd.test\n")
    resolved = f"probe target inet.uplinkd.test resolves to {INET_HOST}"
    assert daemon.log.wait_for(resolved, timeout=45), daemon.log.text
    assert daemon.log.wait_for("link ISP1: init -> up", timeout=15), daemon.log.text
    assert daemon.log.text.count("does not resolve (") == 1  # once per change, not per retry
    result = lab2.connect_many(lab2.ns_lan, INET_HOST, 80, 40, timeout=1.0)
    assert result.failed == 0
    assert min(result.counts_by_isp().values()) > 0  # both links carry new connections


def bus_links(address: str) -> set[str]:
    """The link objects the daemon has on the bus (their names, as uplinkctl would list them)."""
    listed = subprocess.run(
        [
            *("busctl", f"--address={address}", "--json=short", "call", "org.uplinkd.Uplinkd1"),
            *("/org/uplinkd/Uplinkd1", "org.freedesktop.DBus.ObjectManager", "GetManagedObjects"),
        ],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    objects = json.loads(listed.stdout)["data"][0]
    return {path.rsplit("/", 1)[1] for path in objects}


def test_reloads_over_d_bus_and_sighup_are_logged_and_follow_the_links(
    uplinkd: Uplinkd, lab2: Lab
) -> None:
    """D-Bus Reload and SIGHUP: a refused file is logged by the daemon either way (before: a
    refused D-Bus Reload only answered its caller); links a reload removes or adds leave or join
    the bus by the time the Reload is answered, or by the next publish after a SIGHUP."""
    two = BALANCE_CONF.format(lans="LAN lan0 lan\n")
    one = two.replace(f"ISP2 wan2 isp {INET_HOST}\n", "")
    config = uplinkd.write_config(two, "balance.conf")
    with private_bus() as bus:
        daemon = uplinkd.start(config, bus_address=bus.address)
        # The first apply comes before the bus name is taken.
        assert daemon.log.wait_for("on the system bus as", 10), daemon.log.text
        assert wait_until(lambda: bus_links(bus.address) == {"ISP1", "ISP2"}, 10)

        config.write_text(two + "LAN lan0 lan\n")  # a LAN named twice
        refused = uplinkctl(bus.address, "reload")
        assert refused.returncode != 0
        assert f"{config}:4:" in refused.stderr, refused.stderr
        assert daemon.log.wait_for("reload refused, keeping the running configuration: "), (
            daemon.log.text
        )

        config.write_text(one)
        done = uplinkctl(bus.address, "reload")
        assert done.returncode == 0, done.stderr
        assert bus_links(bus.address) == {"ISP1"}  # gone by the reply

        config.write_text(two)
        daemon.send(signal.SIGHUP)
        assert wait_until(lambda: bus_links(bus.address) == {"ISP1", "ISP2"}, 5)
        daemon.stop()


def test_a_reload_that_changes_the_backend_is_refused_naming_it(uplinkd: Uplinkd) -> None:
    """The backend is chosen once, at start: a reload to another is refused with a message,
    the running datapath untouched (before: the reload went through and the change was
    silently ignored)."""
    text = TWO_LINKS.format(w1=1, w2=1)
    config = uplinkd.write_config(text)
    daemon = uplinkd.start(config)
    state = uplinkd.kernel_state()
    config.write_text('backend = "iptables"\n' + text)
    daemon.send(signal.SIGHUP)
    refused = "reload refused, keeping the running configuration: "
    assert daemon.log.wait_for(refused), daemon.log.text
    assert f"{config}: backend: 'iptables', but the daemon runs the nftables backend" in (
        daemon.log.text
    )
    assert daemon.running
    assert uplinkd.kernel_state() == state


# NetworkManager's answer stands in for nmcli's (tests/integration/test_networkmanager.py runs
# the real one; NetworkManager 1.42 reports the gateway of the kernel's default route, so a lab
# cannot make the two differ): the rest, discovery through netlink and planning, is real.
NM_SAYS = r"""
import asyncio, ipaddress, sys
from pathlib import Path
from pyroute2 import AsyncIPRoute
from uplinkd.config import loading
from uplinkd.facts import nm
from uplinkd.runtime import daemon

async def device_facts(devices):
    return {d: nm.NmDevice(d, nm.STATE_ACTIVATED, "ISP1-wired", (),
                           ipaddress.IPv4Address("10.0.1.254")) for d in devices if d == "wan1"}

nm.device_facts = device_facts

async def main():
    config = loading.load(Path(sys.argv[1]))
    async with AsyncIPRoute() as ipr:
        prepared = await daemon.prepare(ipr, config)
    print({fact.name: str(fact.gateway) for fact in prepared.facts})

asyncio.run(main())
"""


def test_dry_run_and_once_take_networkmanagers_gateway_as_the_daemon_does(
    uplinkd: Uplinkd, lab2: Lab
) -> None:
    """Where NetworkManager runs a link and names another gateway than the kernel's routes,
    -d and --once plan with NetworkManager's, as the daemon does (before: the kernel's, so -d
    could show a gateway the daemon would not use)."""
    config = uplinkd.write_config(TWO_LINKS.format(w1=1, w2=1))
    done = lab2.run(lab2.ns_router, sys.executable, "-c", NM_SAYS, str(config))
    assert done.stdout.strip() == "{'ISP1': '10.0.1.254', 'ISP2': '10.0.2.1'}", done.stderr
