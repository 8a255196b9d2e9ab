"""The D-Bus service on a private system-like bus with uplinkd's own policy file.

A dbus-daemon with the system bus's default-deny policy and an exact copy of
dbus/org.uplinkd.Uplinkd1.conf; BusService over a fake controller; clients as root (dbus-fast in the
test's loop, dbus-send) and as nobody (dbus-send under setpriv: nobody cannot run this venv).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus
from uplinkd import const
from uplinkd.errors import ConfigError, UplinkdError
from uplinkd.monitor.link import LinkState, Transition
from uplinkd.publish import bus as bus_module
from uplinkd.publish.bus import BusService
from uplinkd.publish.bus_api import (
    INTERNAL_MESSAGE,
    LINK_INTERFACE,
    MANAGER_INTERFACE,
    OBJECT_MANAGER_INTERFACE,
    ErrorName,
    link_path,
)

from tests.fakes.controller import FakeController, link_status

from ..unit.test_bus_contract import contract, served_view
from .privatebus import PrivateBus, private_bus

PROPERTIES = "org.freedesktop.DBus.Properties"
ACCESS_DENIED = "org.freedesktop.DBus.Error.AccessDenied"

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="the private bus test needs root (setpriv)"),
    pytest.mark.skipif(not shutil.which("dbus-daemon"), reason="dbus-daemon is not installed"),
    pytest.mark.timeout(120),
]


@pytest.fixture(scope="module")
def bus() -> Iterator[PrivateBus]:
    with private_bus() as running:
        yield running


def controller() -> FakeController:
    """Two links up, a version and generation that only the controller can have told."""
    links = [link_status("ISP1", "wan1"), link_status("ISP2", "wan2", weight=1)]
    return FakeController(version="9.8.7", generation=3, links=links)


@dataclass
class Harness:
    service: BusService
    fake: FakeController
    client: MessageBus
    bus: PrivateBus
    signals: list[Message] = field(default_factory=list)

    async def call(
        self, path: str, interface: str, member: str, signature: str = "", *body: Any
    ) -> Message:
        message = Message(
            destination=const.BUS_NAME,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=list(body),
        )
        return await self.client.call(message)

    async def ok(self, *args: Any) -> list[Any]:
        reply = await self.call(*args)
        assert reply.message_type is MessageType.METHOD_RETURN, reply.body
        return list(reply.body)

    async def error(self, *args: Any) -> tuple[str, str]:
        reply = await self.call(*args)
        assert reply.message_type is MessageType.ERROR, reply.body
        return str(reply.error_name), str(reply.body[0])

    async def signal(self, member: str, path: str | None = None, timeout: float = 5.0) -> Message:
        async def arrived() -> Message:
            while True:
                for message in self.signals:
                    if message.member == member and (path is None or message.path == path):
                        return message
                await asyncio.sleep(0.01)

        return await asyncio.wait_for(arrived(), timeout)


def run(bus: PrivateBus, scenario: Callable[[Harness], Awaitable[None]]) -> None:
    async def main() -> None:
        fake = controller()
        service = BusService(fake)
        await service.start(bus.address)
        client = await MessageBus(bus_address=bus.address).connect()
        harness = Harness(service, fake, client, bus)
        client.add_message_handler(
            lambda m: harness.signals.append(m) if m.message_type is MessageType.SIGNAL else None
        )
        rule = f"type='signal',sender='{const.BUS_NAME}'"
        reply = await client.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[rule],
            )
        )
        assert reply.message_type is MessageType.METHOD_RETURN
        try:
            await scenario(harness)
        finally:
            client.disconnect()
            await service.stop()

    asyncio.run(asyncio.wait_for(main(), 60))


async def dbus_send(
    bus: PrivateBus, path: str, method: str, *args: str, as_nobody: bool = True
) -> tuple[int, str]:
    """dbus-send to uplinkd, as nobody:nogroup without supplementary groups unless told."""
    unprivileged = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    command = [
        *(unprivileged if as_nobody else []),
        "dbus-send",
        f"--bus={bus.address}",
        "--print-reply",
        f"--dest={const.BUS_NAME}",
        path,
        method,
        *args,
    ]
    proc = await asyncio.create_subprocess_exec(
        *command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd="/"
    )
    out, _ = await proc.communicate()
    return int(proc.returncode or 0), out.decode()


MANAGER = (const.BUS_PATH, MANAGER_INTERFACE)
ISP1 = link_path("ISP1")


def test_served_introspection_is_the_contract(bus: PrivateBus) -> None:
    async def scenario(h: Harness) -> None:
        introspectable = "org.freedesktop.DBus.Introspectable"
        [manager_xml] = await h.ok(const.BUS_PATH, introspectable, "Introspect")
        [link_xml] = await h.ok(ISP1, introspectable, "Introspect")
        assert served_view(manager_xml) == contract(MANAGER_INTERFACE, OBJECT_MANAGER_INTERFACE)
        assert served_view(link_xml, link_object=True) == contract(LINK_INTERFACE)
        [link_dir_xml] = await h.ok(const.BUS_PATH + "/link", introspectable, "Introspect")
        assert '<node name="ISP1"' in link_dir_xml
        assert '<node name="ISP2"' in link_dir_xml

    run(bus, scenario)


def test_status_properties_and_managed_objects(bus: PrivateBus) -> None:
    async def scenario(h: Harness) -> None:
        manager, links = await h.ok(*MANAGER, "GetStatus")
        assert {k: v.value for k, v in manager.items()} == {
            "Version": "9.8.7",
            "Mode": "weighted",
            "Generation": 3,
            "OverallState": "online",
            "HookProblems": [],
        }
        assert [link["Name"].value for link in links] == ["ISP1", "ISP2"]
        isp1 = links[0]
        assert isp1["Since"] == Variant("t", 1_700_000_000)
        assert isp1["Weight"] == Variant("u", 2)
        assert isp1["LatencyMs"] == Variant("d", 12.5)
        assert isp1["Address"] == Variant("s", "192.0.2.10/24")
        assert isp1["NewConnectionShare"] == Variant("d", 0.5)

        [state] = await h.ok(ISP1, PROPERTIES, "Get", "ss", LINK_INTERFACE, "State")
        assert state == Variant("s", "up")
        [generation] = await h.ok(
            const.BUS_PATH, PROPERTIES, "Get", "ss", MANAGER_INTERFACE, "Generation"
        )
        assert generation == Variant("t", 3)
        [everything] = await h.ok(ISP1, PROPERTIES, "GetAll", "s", LINK_INTERFACE)
        assert everything == isp1  # the properties and GetStatus say the same
        first = ("web", "203.0.113.20", "ISP1", 598)
        second = ("web", "203.0.113.30", "ISP2", 4000)
        assert await h.ok(*MANAGER, "GetLearned", "uu", 0, 100) == [[first, second], 2]
        assert await h.ok(*MANAGER, "GetLearned", "uu", 1, 100) == [[second], 2]  # pages
        assert await h.ok(*MANAGER, "GetLearned", "uu", 0, 0) == [[], 2]  # the count alone
        assert await h.ok(*MANAGER, "GetLearned", "uu", 7, 100) == [[], 2]  # past the end
        [plan] = await h.ok(*MANAGER, "DryRun")
        assert plan.startswith("#")

        [objects] = await h.ok(const.BUS_PATH, OBJECT_MANAGER_INTERFACE, "GetManagedObjects")
        assert set(objects) == {ISP1, link_path("ISP2")}
        assert objects[ISP1] == {LINK_INTERFACE: isp1}

        name, _ = await h.error(
            ISP1, PROPERTIES, "Set", "ssv", LINK_INTERFACE, "State", Variant("s", "x")
        )
        assert name == "org.freedesktop.DBus.Error.PropertyReadOnly"

    run(bus, scenario)


def test_policy_anyone_reads_only_root_changes(bus: PrivateBus) -> None:
    async def scenario(h: Harness) -> None:
        reads = [
            (const.BUS_PATH, f"{MANAGER_INTERFACE}.GetStatus"),
            (const.BUS_PATH, f"{MANAGER_INTERFACE}.DryRun"),
            (const.BUS_PATH, f"{MANAGER_INTERFACE}.GetLearned", "uint32:0", "uint32:100"),
            (const.BUS_PATH, f"{PROPERTIES}.Get", f"string:{MANAGER_INTERFACE}", "string:Version"),
            (ISP1, f"{PROPERTIES}.GetAll", f"string:{LINK_INTERFACE}"),
            (const.BUS_PATH, f"{OBJECT_MANAGER_INTERFACE}.GetManagedObjects"),
            (const.BUS_PATH, "org.freedesktop.DBus.Introspectable.Introspect"),
        ]
        for path, method, *args in reads:
            code, out = await dbus_send(h.bus, path, method, *args)
            assert code == 0, f"nobody: {method}: {out}"
        assert "9.8.7" in (await dbus_send(h.bus, *reads[3]))[1]

        changes = [
            (f"{MANAGER_INTERFACE}.Reload",),
            (f"{MANAGER_INTERFACE}.SetLinkEnabled", "string:ISP1", "boolean:false"),
            (f"{MANAGER_INTERFACE}.NotifyDevice", "string:wan1", "string:down"),
        ]
        for method, *args in changes:
            code, out = await dbus_send(h.bus, const.BUS_PATH, method, *args)
            assert code != 0 and ACCESS_DENIED in out, f"nobody: {method}: {out}"
        # Properties.Set is nobody's business either (and every property is read-only anyway).
        code, out = await dbus_send(
            h.bus,
            ISP1,
            f"{PROPERTIES}.Set",
            f"string:{LINK_INTERFACE}",
            "string:State",
            "variant:string:up",
        )
        assert ACCESS_DENIED in out
        assert h.fake.calls == []

        for method, *args in changes:
            code, out = await dbus_send(h.bus, const.BUS_PATH, method, *args, as_nobody=False)
            assert code == 0, f"root: {method}: {out}"
        assert h.fake.calls == [
            ("reload",),
            ("set_enabled", "ISP1", False),
            ("notify_device", "wan1", "down"),
        ]

    run(bus, scenario)


def test_policy_admin_group_may_change_state() -> None:
    """The policy's group clause, rewritten to nobody's group as meson's admin_group would."""

    async def scenario(h: Harness) -> None:
        code, out = await dbus_send(h.bus, const.BUS_PATH, f"{MANAGER_INTERFACE}.Reload")
        assert code == 0, out
        assert h.fake.calls == [("reload",)]

    with private_bus(admin_group="nogroup") as nogroup_bus:
        run(nogroup_bus, scenario)


def test_errors_have_contract_names_and_one_line(
    bus: PrivateBus, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(h: Harness) -> None:
        name, text = await h.error(*MANAGER, "SetLinkEnabled", "sb", "nope", True)
        assert (name, text) == (ErrorName.UNKNOWN_LINK, "unknown link 'nope'; links: ISP1, ISP2")
        name, text = await h.error(*MANAGER, "NotifyDevice", "ss", "wan9", "up")
        assert (name, text) == (ErrorName.UNKNOWN_LINK, "no link uses device 'wan9'")
        name, text = await h.error(*MANAGER, "NotifyDevice", "ss", "wan1", "explode")
        assert name == ErrorName.UNKNOWN_ACTION
        assert "'explode'" in text

        h.fake.refuse = ConfigError(
            "/etc/uplinkd/uplinkd.toml", "must be positive", line=7, key="weight"
        )
        name, text = await h.error(*MANAGER, "Reload")
        assert (name, text) == (ErrorName.RELOAD_FAILED, str(h.fake.refuse))
        assert "\n" not in text

        h.fake.fail = RuntimeError("secret detail in /root/uplinkd/coordinator.py")
        with caplog.at_level(logging.ERROR, logger="uplinkd"):
            name, text = await h.error(*MANAGER, "SetLinkEnabled", "sb", "ISP1", False)
        assert (name, text) == (ErrorName.INTERNAL, INTERNAL_MESSAGE)
        assert "secret" not in text and "Traceback" not in text
        assert "RuntimeError: secret detail" in caplog.text  # the traceback stays in the log
        assert "Traceback" in caplog.text

    run(bus, scenario)


def test_signals(bus: PrivateBus) -> None:
    async def scenario(h: Harness) -> None:
        h.fake.links[0] = replace(
            h.fake.links[0], state="down", since=1_700_000_100.0, usable=False
        )
        transition = Transition("ISP1", LinkState.UP, LinkState.DOWN, "lost 5 of 5 rounds", 0.0)
        h.service.on_transition(transition)
        changed = await h.signal("PropertiesChanged", ISP1)
        assert changed.body[0] == LINK_INTERFACE
        assert changed.body[1] == {
            "State": Variant("s", "down"),
            "Since": Variant("t", 1_700_000_100),
        }
        state_changed = await h.signal("LinkStateChanged", const.BUS_PATH)
        assert state_changed.body == ["ISP1", "up", "down", "lost 5 of 5 rounds"]
        assert h.signals.index(changed) < h.signals.index(state_changed)
        manager_changed = await h.signal("PropertiesChanged", const.BUS_PATH)
        assert manager_changed.body[1] == {"OverallState": Variant("s", "degraded")}

        # Nothing changed: the signal again, but no PropertiesChanged with the same values.
        h.signals.clear()
        h.service.on_transition(transition)
        await h.signal("LinkStateChanged")
        await asyncio.sleep(0.1)
        assert [m.member for m in h.signals] == ["LinkStateChanged"]

        h.fake.generation = 4
        h.service.on_plan_applied(4)
        assert (await h.signal("PlanApplied")).body == [4]
        assert (await h.signal("PropertiesChanged", const.BUS_PATH)).body[1] == {
            "Generation": Variant("t", 4)
        }

        # Measured values are published by the once-a-second check, only what changed.
        h.signals.clear()
        h.fake.links[1] = replace(h.fake.links[1], latency_ms=30.0, rx_bps=9000)
        changed = await h.signal("PropertiesChanged", link_path("ISP2"), timeout=3.0)
        assert changed.body[1] == {"LatencyMs": Variant("d", 30.0), "RxBps": Variant("t", 9000)}

    run(bus, scenario)


def test_hook_problems_are_published(bus: PrivateBus) -> None:
    """A hook failure appears in HookProblems (Get, GetStatus) with a PropertiesChanged at the
    next check, and goes away the same way when the hook works again."""
    problem = "/etc/uplinkd/firewall/10.web.py:2: syntax error: invalid syntax; it adds nothing"

    async def problems(h: Harness) -> list[str]:
        [value] = await h.ok(*MANAGER[:1], PROPERTIES, "Get", "ss", *MANAGER[1:], "HookProblems")
        assert value.signature == "as"
        return list(value.value)

    async def scenario(h: Harness) -> None:
        assert await problems(h) == []
        h.fake.hook_problems = (problem,)
        changed = await h.signal("PropertiesChanged", const.BUS_PATH, timeout=3.0)
        assert changed.body[0] == MANAGER_INTERFACE
        assert changed.body[1] == {"HookProblems": Variant("as", [problem])}
        assert await problems(h) == [problem]
        manager, _ = await h.ok(*MANAGER, "GetStatus")
        assert manager["HookProblems"] == Variant("as", [problem])

        h.signals.clear()
        h.fake.hook_problems = ()
        changed = await h.signal("PropertiesChanged", const.BUS_PATH, timeout=3.0)
        assert changed.body[1] == {"HookProblems": Variant("as", [])}
        assert await problems(h) == []

    run(bus, scenario)


def test_links_added_and_removed(bus: PrivateBus) -> None:
    async def scenario(h: Harness) -> None:
        h.fake.links = [h.fake.links[0], link_status("LTE-3", "wwan0")]
        h.service.publish()  # as after a SIGHUP reload (the plan applied, or the next poll)
        removed = await h.signal("InterfacesRemoved")
        added = await h.signal("InterfacesAdded")
        assert removed.body == [link_path("ISP2"), [LINK_INTERFACE]]
        assert added.body[0] == link_path("LTE-3") == f"{const.BUS_PATH}/link/LTE_2d3"
        assert added.body[1][LINK_INTERFACE]["Device"] == Variant("s", "wwan0")
        announcements = [m for m in h.signals if m.interface == OBJECT_MANAGER_INTERFACE]
        assert {m.path for m in announcements} == {const.BUS_PATH}  # from the manager only
        assert len(announcements) == 2

        [objects] = await h.ok(const.BUS_PATH, OBJECT_MANAGER_INTERFACE, "GetManagedObjects")
        assert set(objects) == {ISP1, link_path("LTE-3")}
        name, _ = await h.error(link_path("ISP2"), PROPERTIES, "GetAll", "s", LINK_INTERFACE)
        assert name == "org.freedesktop.DBus.Error.UnknownObject"

        # A D-Bus Reload refreshes the objects itself.
        h.signals.clear()
        h.fake.links = [h.fake.links[0]]
        await h.ok(*MANAGER, "Reload")
        assert (await h.signal("InterfacesRemoved")).body[0] == link_path("LTE-3")

    run(bus, scenario)


# A flooding client: CALLS calls in flight at once, spread over CALLS/100 connections because
# dbus-fast drops a connection whose socket buffer fills (EAGAIN, python-dbus-next issue #153) and
# 100 small calls fit in one. The service answers them all through its one connection.
FLOOD = textwrap.dedent(
    """
    import asyncio, sys
    from dbus_fast import Message, MessageType
    from dbus_fast.aio import MessageBus

    async def main(calls, address, name, path, link_path, interface, link_interface):
        calls = int(calls)
        buses = [await MessageBus(bus_address=address).connect() for _ in range(calls // 100)]
        def status():
            return Message(destination=name, path=path, interface=interface, member="GetStatus")
        def state():
            return Message(destination=name, path=link_path, member="Get", signature="ss",
                           interface="org.freedesktop.DBus.Properties",
                           body=[link_interface, "State"])
        pending = [buses[i % len(buses)].call(state() if i % 2 else status()) for i in range(calls)]
        replies = await asyncio.gather(*pending)
        print(sum(r.message_type is MessageType.METHOD_RETURN for r in replies))

    asyncio.run(main(*sys.argv[1:]))
    """
)


async def flood(h: Harness, clients: int, calls: int) -> list[int]:
    """How many of each client's calls were answered."""
    args = [h.bus.address, const.BUS_NAME, const.BUS_PATH, ISP1, MANAGER_INTERFACE, LINK_INTERFACE]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOOD, str(calls), *args, stdout=subprocess.PIPE
        )
        for _ in range(clients)
    ]
    answered = []
    for proc in procs:
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0
        answered.append(int(out))
    return answered


def test_a_flood_of_calls_does_not_stall_the_loop(bus: PrivateBus) -> None:
    """Not a benchmark: the service's loop keeps ticking while it answers 1000 calls at once."""

    async def scenario(h: Harness) -> None:
        loop = asyncio.get_running_loop()
        gaps: list[float] = []

        async def ticker() -> None:
            last = loop.time()
            while True:
                await asyncio.sleep(0.005)
                gaps.append(loop.time() - last)
                last = loop.time()

        ticking = asyncio.create_task(ticker())
        assert await flood(h, clients=1, calls=1000) == [1000]
        ticking.cancel()
        assert gaps and max(gaps) < 0.5, f"the loop stalled for {max(gaps):.3f} s"

    run(bus, scenario)


def test_a_flood_bigger_than_the_socket_buffer_keeps_the_service_on_the_bus(
    bus: PrivateBus,
) -> None:
    """Replies faster than dbus-daemon reads them fill the service's socket; it must wait for
    room, not drop the connection as dbus-fast does by itself."""

    async def scenario(h: Harness) -> None:
        assert await flood(h, clients=4, calls=2000) == [2000] * 4
        [version] = await h.ok(
            const.BUS_PATH, PROPERTIES, "Get", "ss", MANAGER_INTERFACE, "Version"
        )
        assert version == Variant("s", "9.8.7")

    run(bus, scenario)


def test_a_bus_that_reads_nothing_is_left_before_what_waits_grows_without_limit(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """dbus-daemon stopped (SIGSTOP) while the daemon goes on signalling: its messages queue
    while it waits for room; once the bus has taken nothing for BUS_STALL_S the service leaves
    it and runs on (before: the queue grew with every signal for as long as the bus was stuck)."""
    monkeypatch.setattr(bus_module, "BUS_STALL_S", 1.0)
    monkeypatch.setattr(bus_module, "PUBLISH_INTERVAL_S", 0.1)

    async def main(stuck: PrivateBus) -> None:
        service = BusService(controller())
        await service.start(stuck.address)
        os.kill(stuck.pid, signal.SIGSTOP)
        try:
            begin, sent = time.monotonic(), 0
            while service.started and time.monotonic() - begin < 10:
                for _ in range(200):
                    sent += 1
                    service.on_plan_applied(sent)
                await asyncio.sleep(0.05)
            assert not service.started, f"still on a bus that read nothing of {sent} signals"
            service.on_plan_applied(sent + 1)  # off the bus: nothing is sent, nothing raised
        finally:
            os.kill(stuck.pid, signal.SIGCONT)
            await service.stop()

    with caplog.at_level(logging.WARNING, logger="uplinkd"), private_bus() as stuck:
        asyncio.run(asyncio.wait_for(main(stuck), 30))
    assert "the bus has taken nothing uplinkd sent for 1 s; leaving it" in caplog.text
    assert "Traceback" not in caplog.text


def test_a_second_instance_cannot_own_the_name(bus: PrivateBus) -> None:
    async def scenario(h: Harness) -> None:
        second = BusService(controller())
        with pytest.raises(UplinkdError, match="owned by another process"):
            await second.start(h.bus.address)

    run(bus, scenario)
