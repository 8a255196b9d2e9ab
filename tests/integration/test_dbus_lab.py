"""uplinkd in the lab's router namespace on a private bus: a carrier loss, as its clients see it.

The daemon runs in the router's network namespace, its clients in the test's; the bus socket is
a path in the filesystem, which network namespaces do not separate. Three clients watch ISP1 go
down: `uplinkctl monitor`, a PropertiesChanged subscriber and busctl. busctl polls the property:
`busctl monitor` needs BecomeMonitor, which this bus denies even to root (privatebus.py leaves out
the clause of Debian's system.conf that lets root monitor).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus
from uplinkd import const
from uplinkd.publish.bus_api import LINK_INTERFACE, MANAGER_INTERFACE, link_path
from uplinkd_lab.lab import Lab

from .conftest import Uplinkd, first_line, needs_root, wait_until
from .privatebus import PrivateBus, private_bus
from .test_failover import MONITORED

pytestmark = [
    needs_root,
    pytest.mark.lab,
    pytest.mark.skipif(
        not shutil.which("dbus-daemon") or not shutil.which("busctl"),
        reason="the bus lab test needs dbus-daemon and busctl",
    ),
    pytest.mark.timeout(180),
]

ISP1 = link_path("ISP1")
PROPERTIES = "org.freedesktop.DBus.Properties"
# Generous bounds: a carrier loss is seen at once, the rest is one bus round trip.
SEEN_WITHIN_S = 10.0


@pytest.fixture
def bus() -> Iterator[PrivateBus]:
    with private_bus() as running:
        yield running


def busctl(bus: PrivateBus, *argv: str) -> Any:
    """busctl's answer from uplinkd, as JSON data."""
    done = subprocess.run(
        ["busctl", f"--address={bus.address}", "--json=short", *argv],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    assert done.returncode == 0, f"busctl {' '.join(argv)}: {done.stderr}"
    return json.loads(done.stdout)["data"]


def isp1_state(bus: PrivateBus) -> str:
    return str(busctl(bus, "get-property", const.BUS_NAME, ISP1, LINK_INTERFACE, "State"))


def overall_state(bus: PrivateBus) -> str:
    manager, _ = busctl(bus, "call", const.BUS_NAME, const.BUS_PATH, MANAGER_INTERFACE, "GetStatus")
    return str(manager["OverallState"]["data"])


@contextmanager
def uplinkctl_monitor(bus: PrivateBus, *argv: str) -> Iterator[subprocess.Popen[str]]:
    """`uplinkctl monitor`, yielded once it has subscribed (its first line, the snapshot)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "uplinkd.ctl", "--bus-address", bus.address, "monitor", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = first_line(proc, SEEN_WITHIN_S)
        assert ": online, generation " in first, f"uplinkctl monitor began with {first!r}"
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


class Subscriber:
    """The PropertiesChanged signals of one object, as a dbus-fast client receives them."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.changes: list[dict[str, Any]] = []
        self._arrived = threading.Condition()

    async def subscribe(self, address: str) -> MessageBus:
        bus = await MessageBus(bus_address=address).connect()
        bus.add_message_handler(self._on_message)
        rule = (
            f"type='signal',sender='{const.BUS_NAME}',path='{self.path}',"
            f"interface='{PROPERTIES}',member='PropertiesChanged'"
        )
        bus_driver = ("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus")
        reply = await bus.call(Message(*bus_driver, "AddMatch", signature="s", body=[rule]))
        assert reply is not None and reply.message_type is MessageType.METHOD_RETURN, reply
        return bus

    def _on_message(self, message: Message) -> None:
        if message.message_type is MessageType.SIGNAL and message.path == self.path:
            with self._arrived:
                self.changes.append({key: v.value for key, v in message.body[1].items()})
                self._arrived.notify_all()

    def saw_state(self, state: str, timeout: float) -> bool:
        return self.saw(lambda changes: any(c.get("State") == state for c in changes), timeout)

    def saw(self, what: Callable[[list[dict[str, Any]]], bool], timeout: float) -> bool:
        """Whether the changes received so far satisfy `what`, waiting at most `timeout`."""
        with self._arrived:
            return self._arrived.wait_for(lambda: what(self.changes), timeout)


async def disconnect(connection: MessageBus) -> None:
    connection.disconnect()
    await asyncio.wait_for(connection.wait_for_disconnect(), 10)


@contextmanager
def properties_changed(bus: PrivateBus, path: str) -> Iterator[Subscriber]:
    """A Subscriber on its own event loop in a thread, subscribed before it is yielded."""
    subscriber = Subscriber(path)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    connection: MessageBus | None = None
    try:
        subscribing = asyncio.run_coroutine_threadsafe(subscriber.subscribe(bus.address), loop)
        connection = subscribing.result(timeout=SEEN_WITHIN_S)
        yield subscriber
    finally:
        if connection is not None:
            closing = asyncio.run_coroutine_threadsafe(disconnect(connection), loop)
            closing.result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        if not thread.is_alive():
            loop.close()


@contextmanager
def carrier_lost(lab: Lab, isp: int) -> Iterator[None]:
    lab.set_link(isp, up=False)
    try:
        yield
    finally:
        lab.set_link(isp, up=True)


def test_cutting_isp1_is_seen_by_every_client(bus: PrivateBus, lab2: Lab, uplinkd: Uplinkd) -> None:
    config = uplinkd.write_config(MONITORED.format(extra_target=""))
    daemon = uplinkd.start(config, bus_address=bus.address)
    for line in (
        f"on the system bus as {const.BUS_NAME}",
        "link ISP1: init -> up",
        "link ISP2: init -> up",
    ):
        assert daemon.log.wait_for(line), daemon.log.text
    assert (isp1_state(bus), overall_state(bus)) == ("up", "online")

    with (
        uplinkctl_monitor(bus, "--count", "1") as monitor,
        properties_changed(bus, ISP1) as subscriber,
        carrier_lost(lab2, 1),
    ):
        assert daemon.log.wait_for("link ISP1: up -> down: carrier lost", SEEN_WITHIN_S), (
            daemon.log.text
        )
        assert subscriber.saw_state("down", SEEN_WITHIN_S), subscriber.changes
        assert wait_until(lambda: isp1_state(bus) == "down", SEEN_WITHIN_S)
        assert overall_state(bus) == "degraded"
        out, err = monitor.communicate(timeout=SEEN_WITHIN_S)

    assert (monitor.returncode, err) == (0, ""), out
    printed = [line.split("  ", 1)[1] for line in out.splitlines()]  # after the time stamp
    assert [line for line in printed if " -> " in line] == ["ISP1: up -> down (carrier lost)"], out


def hook_problems(bus: PrivateBus) -> list[str]:
    value = busctl(
        bus, "get-property", const.BUS_NAME, const.BUS_PATH, MANAGER_INTERFACE, "HookProblems"
    )
    return [str(line) for line in value]


def uplinkctl_status(bus: PrivateBus) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "uplinkd.ctl", "--bus-address", bus.address, "status"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, ""), done.stdout
    return done.stdout


def test_a_broken_hook_is_named_on_the_bus_until_it_is_fixed(
    bus: PrivateBus, lab2: Lab, uplinkd: Uplinkd
) -> None:
    """A .py hook with a syntax error, added while the daemon runs: HookProblems (busctl) and
    `uplinkctl status` name its file and line, with a PropertiesChanged; fixed, it goes away."""
    config = uplinkd.write_config(MONITORED.format(extra_target=""))
    daemon = uplinkd.start(config, bus_address=bus.address)
    assert daemon.log.wait_for(f"on the system bus as {const.BUS_NAME}"), daemon.log.text
    assert hook_problems(bus) == []
    assert "hook problem" not in uplinkctl_status(bus)

    firewall = uplinkd.workdir / "firewall"
    firewall.mkdir(exist_ok=True)
    broken = firewall / "10.web.py"
    with properties_changed(bus, const.BUS_PATH) as subscriber:
        broken.write_text('B.forward(8080, "192.168.10.35")\ndef broken(:\n')
        broken.chmod(0o644)
        # Seen by the hook runner (stat, every HOOK_RESCAN_S), published at the next check.
        within = const.HOOK_RESCAN_S + SEEN_WITHIN_S
        assert wait_until(lambda: bool(hook_problems(bus)), within), daemon.log.text
        [problem] = hook_problems(bus)
        assert problem.startswith(f"{broken}:2: syntax error"), problem
        assert f"hook problem: {problem}\n" in uplinkctl_status(bus)
        assert subscriber.saw(
            lambda changes: any(c.get("HookProblems") == [problem] for c in changes),
            SEEN_WITHIN_S,
        ), subscriber.changes

        broken.write_text('B.forward(8080, "192.168.10.35")\n')
        assert wait_until(lambda: hook_problems(bus) == [], within), daemon.log.text
        assert "hook problem" not in uplinkctl_status(bus)
        assert subscriber.saw(
            lambda changes: any(c.get("HookProblems") == [] for c in changes), SEEN_WITHIN_S
        ), subscriber.changes
    ruleset = ("nft", "list", "ruleset")
    assert wait_until(lambda: "dport 8080" in lab2.run(lab2.ns_router, *ruleset).stdout, 5)
