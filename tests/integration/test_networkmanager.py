"""A real NetworkManager owning the router's wan1, and uplinkd following it (root).

NetworkManager runs in the lab's router namespace inside its own mount namespace (unshare -m):
a tmpfs on /run, /sys read-only so it works without udev, private /etc/NetworkManager and
/var/lib/NetworkManager, and /usr/lib/NetworkManager/dispatcher.d masked so only the project's
shim (dispatcher/90-uplinkd, in the private /etc/NetworkManager/dispatcher.d) runs. It talks to a
private system bus that uplinkd uses too; /run/dbus/system_bus_socket in the mount namespace points
at that bus, because nm-dispatcher gives its scripts a clean environment (no
DBUS_SYSTEM_BUS_ADDRESS), just as on a real system. nm-dispatcher is started by hand: it cannot be
bus-activated there. Everything mounted vanishes with the unshare'd process.

NetworkManager manages wan1 only (ISP1: 10.0.1.2/24, gateway 10.0.1.1); wan2 stays the lab's.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from uplinkd_lab.lab import Lab

from .conftest import Daemon, Uplinkd, needs_root, wait_until
from .privatebus import PrivateBus, private_bus
from .test_failover import MONITORED

REPO = Path(__file__).resolve().parents[2]
SHIM = REPO / "dispatcher" / "90-uplinkd"
NM_DISPATCHER = Path("/usr/lib/NetworkManager/nm-dispatcher")
NM_POLICIES = ("org.freedesktop.NetworkManager.conf", "nm-dispatcher.conf")
SYSTEM_POLICY_DIR = Path("/usr/share/dbus-1/system.d")
STOP_TIMEOUT_S = 10.0


def _missing() -> list[str]:
    tools = ("NetworkManager", "nmcli", "dbus-daemon", "dbus-send", "unshare")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    missing += [str(path) for path in (NM_DISPATCHER,) if not path.exists()]
    missing += [name for name in NM_POLICIES if not (SYSTEM_POLICY_DIR / name).exists()]
    return missing


pytestmark = [
    needs_root,
    pytest.mark.lab,
    pytest.mark.skipif(
        bool(os.geteuid() == 0 and _missing()),
        reason=f"needs NetworkManager (apt-get install network-manager); missing: {_missing()}",
    ),
    pytest.mark.timeout(180),
]

NM_CONF = """[main]
plugins=keyfile
no-auto-default=*
dns=none
auth-polkit=false
hostname-mode=none

[keyfile]
unmanaged-devices=except:interface-name:wan1

[connectivity]
enabled=false

[logging]
level=INFO
"""

ISP1_CONNECTION = """[connection]
id=ISP1
uuid={uuid}
type=ethernet
interface-name=wan1

[ipv4]
method=manual
address1=10.0.1.2/24,10.0.1.1

[ipv6]
method=ignore
"""

# Runs as `unshare -mu --propagation private sh -c NM_SCRIPT` in the router namespace, so every
# mount below is private to NetworkManager and nm-dispatcher and goes away with them.
# nm-dispatcher must own its name before NetworkManager dispatches the first event.
NM_SCRIPT = """set -e
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir /run/dbus
ln -s "$BUS_SOCKET" /run/dbus/system_bus_socket
mount -o remount,bind,ro /sys
mount --bind "$STATE/etc" /etc/NetworkManager
mount --bind "$STATE/lib" /var/lib/NetworkManager
mount --bind "$STATE/empty" /usr/lib/NetworkManager/dispatcher.d
/usr/lib/NetworkManager/nm-dispatcher --persist --debug &
for _ in $(seq 50); do
    dbus-send --system --print-reply --dest=org.freedesktop.DBus /org/freedesktop/DBus \
        org.freedesktop.DBus.NameHasOwner string:org.freedesktop.nm_dispatcher \
        | grep -q 'boolean true' && break
    sleep 0.1
done
exec NetworkManager --no-daemon --debug
"""

# uplinkd judges ISP1 by its own probes through the link to the Internet host, and takes its
# gateway from wherever discovery finds it (the point: from NetworkManager).
CONFIG = MONITORED.format(extra_target="")

NEW_GATEWAY = "10.0.1.254"


@dataclass
class NetworkManager:
    lab: Lab
    bus: PrivateBus
    proc: subprocess.Popen[bytes]
    log: Path

    def nmcli(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": self.bus.address, "LC_ALL": "C"}
        cmd = ["ip", "netns", "exec", self.lab.ns_router, "nmcli", *argv]
        result = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=30, check=False
        )
        if check and result.returncode != 0:
            raise AssertionError(f"nmcli {' '.join(argv)}: {result.stderr}\n{self.describe()}")
        return result

    def wan1_state(self) -> str:
        result = self.nmcli("-g", "GENERAL.STATE", "device", "show", "wan1", check=False)
        return result.stdout.strip()

    def describe(self) -> str:
        running = "running" if self.proc.poll() is None else f"exited {self.proc.returncode}"
        return f"NetworkManager ({running}) log:\n{self.log.read_text()}"


def bus_socket(bus: PrivateBus) -> Path:
    """The socket path in the bus's address (unix:path=<dir>/bus,guid=...)."""
    for part in bus.address.removeprefix("unix:").split(","):
        key, _, value = part.partition("=")
        if key == "path":
            return Path(value)
    raise AssertionError(f"no socket path in the bus address {bus.address!r}")


def _add_nm_policies(bus: PrivateBus) -> None:
    """Let NetworkManager and nm-dispatcher own their names on the private bus."""
    policy_dir = bus_socket(bus).parent / "system.d"  # privatebus.py: <dir>/bus, <dir>/system.d
    assert policy_dir.is_dir(), f"privatebus.py keeps its policies elsewhere than {policy_dir}"
    for name in NM_POLICIES:
        shutil.copy(SYSTEM_POLICY_DIR / name, policy_dir / name)
    bus_call(
        bus, "org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus.ReloadConfig"
    )


def bus_call(bus: PrivateBus, dest: str, path: str, method: str, *args: str) -> str:
    env = {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": bus.address}
    cmd = ["dbus-send", "--system", "--print-reply", f"--dest={dest}", path, method, *args]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=10, check=True)
    return result.stdout


def _state_dir(root: Path) -> Path:
    for sub in ("etc/system-connections", "etc/dispatcher.d", "lib", "empty"):
        (root / sub).mkdir(parents=True)
    (root / "etc" / "NetworkManager.conf").write_text(NM_CONF)
    connection = root / "etc" / "system-connections" / "ISP1.nmconnection"
    connection.write_text(ISP1_CONNECTION.format(uuid=uuid.uuid4()))
    connection.chmod(0o600)  # the keyfile plugin ignores connections others can read
    shim = root / "etc" / "dispatcher.d" / SHIM.name
    shutil.copyfile(SHIM, shim)
    shim.chmod(0o755)  # nm-dispatcher runs only scripts that only their owner (root) can write
    return root


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """NetworkManager and nm-dispatcher: the unshare'd process's group, which this test started."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # whatever of the group outlived NetworkManager
    proc.wait(timeout=STOP_TIMEOUT_S)


def _restore_wan1(lab: Lab) -> None:
    """wan1 as the lab made it: NetworkManager's address and routes replaced by the lab's."""
    router, isp1 = lab.ns_router, lab.ns_isp(1)
    lab.run(router, "ip", "-4", "addr", "flush", "dev", "wan1", check=False)
    lab.run(router, "ip", "-4", "route", "flush", "dev", "wan1", "proto", "static", check=False)
    lab.run(router, "ip", "addr", "add", "10.0.1.2/24", "dev", "wan1", check=False)
    lab.run(isp1, "ip", "addr", "del", f"{NEW_GATEWAY}/24", "dev", "down", check=False)


@pytest.fixture(scope="module")
def networkmanager(lab2: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetworkManager]:
    with private_bus() as bus:
        _add_nm_policies(bus)
        state = _state_dir(tmp_path_factory.mktemp("nm"))
        # NetworkManager owns wan1's address: no address of the lab's to adopt or fight over.
        lab2.run(lab2.ns_router, "ip", "-4", "addr", "flush", "dev", "wan1")
        env = {
            **os.environ,
            "DBUS_SYSTEM_BUS_ADDRESS": bus.address,
            "BUS_SOCKET": str(bus_socket(bus)),
            "STATE": str(state),
        }
        unshare = ["unshare", "-mu", "--propagation", "private", "sh", "-c", NM_SCRIPT]
        log = state / "NetworkManager.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", lab2.ns_router, *unshare],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        manager = NetworkManager(lab2, bus, proc, log)
        try:
            connected = wait_until(lambda: manager.wan1_state().startswith("100"), 20, 0.2)
            assert connected, manager.describe()
            yield manager
        finally:
            _stop(proc)
            _restore_wan1(lab2)


def start_uplinkd(uplinkd: Uplinkd, manager: NetworkManager) -> Daemon:
    if not manager.wan1_state().startswith("100"):  # an earlier test failed half-way
        manager.nmcli("connection", "up", "ISP1")
    daemon = uplinkd.start(uplinkd.write_config(CONFIG), bus_address=manager.bus.address)
    for line in ("on the system bus as", "link ISP1: init -> up", "link ISP2: init -> up"):
        assert daemon.log.wait_for(line, 15), daemon.log.text
    return daemon


def table_201(lab: Lab) -> str:
    return lab.run(lab.ns_router, "ip", "-4", "route", "show", "table", "201").stdout


def test_connection_down_and_up_reach_uplinkd_through_the_dispatcher(
    networkmanager: NetworkManager, uplinkd: Uplinkd
) -> None:
    daemon = start_uplinkd(uplinkd, networkmanager)
    text = daemon.log.text
    assert "link ISP1: gateway 10.0.1.1, from NetworkManager (connection ISP1)" in text
    assert "link ISP2: gateway 10.0.2.1, from netlink" in text

    started = time.monotonic()
    networkmanager.nmcli("connection", "down", "ISP1")
    reason = "(dispatcher action 'down') (NetworkManager: down)"
    assert daemon.log.wait_for(reason, 10), daemon.log.text + networkmanager.describe()
    elapsed = time.monotonic() - started
    print(f"nmcli connection down -> uplinkd's link down: {elapsed * 1000:.0f} ms")
    first_down = next(line for line in daemon.log.lines if "link ISP1: up -> down" in line)
    assert reason in first_down, daemon.log.text  # the dispatcher, not lost probes, took it down

    networkmanager.nmcli("connection", "up", "ISP1")
    assert daemon.log.wait_for("link ISP1: down -> up", 15), daemon.log.text
    # The address came back with the connection; the re-apply that restores table 201 follows
    # the address event, which may come after the probes already found the link up.
    lab = networkmanager.lab
    assert wait_until(lambda: "via 10.0.1.1 dev wan1" in table_201(lab), 10), daemon.log.text


def test_changed_gateway_is_picked_up(networkmanager: NetworkManager, uplinkd: Uplinkd) -> None:
    lab = networkmanager.lab
    lab.run(lab.ns_isp(1), "ip", "addr", "add", f"{NEW_GATEWAY}/24", "dev", "down")
    daemon = start_uplinkd(uplinkd, networkmanager)
    try:
        networkmanager.nmcli("connection", "modify", "ISP1", "ipv4.gateway", NEW_GATEWAY)
        networkmanager.nmcli("connection", "up", "ISP1")
        expected = f"default via {NEW_GATEWAY} dev wan1"
        assert wait_until(lambda: expected in table_201(lab), 10), table_201(lab) + daemon.log.text
        line = f"link ISP1: gateway {NEW_GATEWAY}, from NetworkManager (connection ISP1)"
        assert line in daemon.log.text
        # Re-activating is a "down" then an "up" for the dispatcher; probes through the new
        # gateway bring the link back.
        assert daemon.log.wait_for("(NetworkManager: down)", 10), daemon.log.text
        assert daemon.log.wait_for("link ISP1: down -> up", 15), daemon.log.text
    finally:
        networkmanager.nmcli("connection", "modify", "ISP1", "ipv4.gateway", "10.0.1.1")
        networkmanager.nmcli("connection", "up", "ISP1", check=False)
