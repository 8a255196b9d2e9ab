"""The D-Bus service: the contract's objects (bus_api.py) on a connection to the system bus, with
a time limit on every wait for the bus, dbus-fast's two repairs, and the poller that publishes
the controller's state each interval.
"""

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import (
    Any,
    Concatenate,
    Final,
    ParamSpec,
)

from dbus_fast import BusType, DBusError, Message, NameFlag, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusFastError
from dbus_fast.service import ServiceInterface

from .. import const
from ..errors import UplinkdError
from ..monitor.link import Transition
from .bus_api import (
    LINK_INTERFACE,
    OBJECT_MANAGER_INTERFACE,
    Controller,
    LinkInterface,
    ManagerInterface,
    link_path,
)
from .status import LinkStatus, Snapshot

log = logging.getLogger("uplinkd")

PUBLISH_INTERVAL_S: Final = const.RATE_SAMPLE_S
# A bus that reads nothing of ours for this long is stuck (a hung or stopped dbus-daemon): what
# uplinkd sends meanwhile would queue without limit, so it leaves the bus and runs on without it.
# A bus merely slow under a flood of calls keeps taking bytes and is never left.
BUS_STALL_S: Final = 30.0


class BusError(UplinkdError):
    """The bus cannot be reached, or uplinkd's name on it cannot be owned."""


_P = ParamSpec("_P")


class _FullBufferWaits:
    """The bus socket as dbus-fast's writer sees it, but a full send buffer reads as "nothing sent
    yet", so the writer waits until the socket is writable. dbus-fast 5 drops the connection on
    that EAGAIN instead (python-dbus-next issue #153): any local user flooding GetStatus would
    take uplinkd off the bus."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.last_sent = time.monotonic()  # when the bus last took bytes from us

    def send(self, data: bytes | memoryview) -> int:
        try:
            sent = self._sock.send(data)
        except BlockingIOError:
            return 0
        self.last_sent = time.monotonic()
        return sent

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class _Bus(MessageBus):
    """dbus-fast with two repairs (both found in dbus-fast 5.2; see the tests)."""

    async def connect(self) -> "_Bus":
        await super().connect()
        writer: Any = getattr(self, "_writer", None)  # dbus-fast internals: if they move, no repair
        if isinstance(sock := getattr(writer, "sock", None), socket.socket):
            writer.sock = _FullBufferWaits(sock)
        return self

    def stalled_for(self) -> float:
        """How long messages have waited while the bus took none of our bytes (0: none wait).
        Waiting for room, the writer queues every message sent meanwhile, without limit."""
        writer: Any = getattr(self, "_writer", None)
        sock = getattr(writer, "sock", None)
        if not isinstance(sock, _FullBufferWaits):
            return 0.0
        if writer.buf is None and not writer.messages:
            return 0.0
        return time.monotonic() - sock.last_sent

    # dbus-fast announces each export with InterfacesAdded/Removed sent from the exported object's
    # own path; the specification, sd-bus and GDBus send them from the object manager's path, and
    # GDBus clients ignore any other. BusService sends them itself.
    def _emit_interface_added(self, path: str, interface: ServiceInterface) -> None:
        pass

    def _emit_interface_removed(self, path: str, removed_interfaces: list[str]) -> None:
        pass


def _hook(
    fn: Callable[Concatenate["BusService", _P], None],
) -> Callable[Concatenate["BusService", _P], None]:
    """A hook the daemon calls: nothing before start(); a failure is logged, never raised."""

    def run(self: "BusService", /, *args: _P.args, **kwargs: _P.kwargs) -> None:
        if self.started:
            try:
                fn(self, *args, **kwargs)
            except Exception:
                log.exception("D-Bus: %s failed", fn.__name__)

    return run


class BusService:
    """uplinkd on the bus: the manager object, one object per link, their signals."""

    def __init__(self, controller: Controller) -> None:
        self.controller = controller
        self._bus: _Bus | None = None
        self._manager: ManagerInterface | None = None
        self._links: dict[str, LinkInterface] = {}
        self._poller: asyncio.Task[None] | None = None

    @property
    def started(self) -> bool:
        """Exported and connected (uplinkd runs on without the bus if it goes away)."""
        return self._bus is not None and self._bus.connected and self._manager is not None

    def _objects(self) -> tuple[_Bus, ManagerInterface]:
        if self._bus is None or self._manager is None:
            raise RuntimeError("the D-Bus service is not started")
        return self._bus, self._manager

    async def start(self, address: str | None = None) -> None:
        """Connect (to `address`, else the system bus), export the objects, own the name.

        Connecting and taking the name each wait at most BUS_START_TIMEOUT_S (a bus that
        accepts and never answers is a BusError, not a hang); cancelled, it leaves nothing open.
        """
        where = address or "the system bus"
        limit = const.BUS_START_TIMEOUT_S
        bus = _Bus(bus_address=address) if address else _Bus(bus_type=BusType.SYSTEM)
        try:
            await asyncio.wait_for(bus.connect(), limit)  # dbus-fast closes the socket if cut
        except TimeoutError as exc:
            raise BusError(f"cannot connect to {where}: no answer within {limit:g} s") from exc
        except (OSError, DBusFastError) as exc:
            raise BusError(f"cannot connect to {where}: {exc}") from exc
        try:
            await self._export_and_own(bus, where)
        except BaseException:  # refused, timed out or cancelled: the name is not ours
            self._forget()
            bus.disconnect()
            raise
        self._poller = asyncio.create_task(self._poll())

    async def _export_and_own(self, bus: _Bus, where: str) -> None:
        snapshot = self.controller.snapshot()
        self._bus, self._manager = bus, ManagerInterface(self, snapshot)
        bus.export(const.BUS_PATH, self._manager)
        for status in snapshot.links:
            self._export_link(bus, status)
        limit = const.BUS_START_TIMEOUT_S
        try:
            reply = await asyncio.wait_for(
                bus.request_name(const.BUS_NAME, NameFlag.DO_NOT_QUEUE), limit
            )
        except TimeoutError as exc:
            raise BusError(
                f"cannot own {const.BUS_NAME} on {where}: no answer within {limit:g} s"
            ) from exc
        except DBusError as exc:
            raise BusError(f"cannot own {const.BUS_NAME} on {where}: {exc.text}") from exc
        if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
            raise BusError(f"{const.BUS_NAME} is owned by another process (another uplinkd?)")

    async def stop(self) -> None:
        """Release the name (waiting at most BUS_STOP_TIMEOUT_S) and disconnect."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        bus = self._forget()
        if bus is not None and bus.connected:
            with contextlib.suppress(DBusError, TimeoutError):
                await asyncio.wait_for(bus.release_name(const.BUS_NAME), const.BUS_STOP_TIMEOUT_S)
            bus.disconnect()

    def _forget(self) -> "_Bus | None":
        """Drop the objects and the poller; the bus they were on, if any."""
        bus, self._bus, self._manager, self._poller = self._bus, None, None, None
        self._links.clear()
        return bus

    @_hook
    def on_transition(self, transition: Transition) -> None:
        """coordinator.listeners: State and Since change at once, then LinkStateChanged."""
        self._publish(self.controller.snapshot()).link_state_changed(transition)

    @_hook
    def on_plan_applied(self, generation: int) -> None:
        """coordinator.plan_listeners: Generation (and the shares) change, then PlanApplied."""
        self._publish(self.controller.snapshot()).plan_applied(generation)

    @_hook
    def publish(self) -> None:
        """The controller's state as it is now (also what the poller sends each interval)."""
        self._publish(self.controller.snapshot())

    async def _poll(self) -> None:
        while self.started:
            await asyncio.sleep(PUBLISH_INTERVAL_S)
            bus = self._bus
            if bus is not None and bus.stalled_for() > BUS_STALL_S:
                log.warning(
                    "D-Bus: the bus has taken nothing uplinkd sent for %g s; leaving it",
                    BUS_STALL_S,
                )
                self._forget()
                bus.disconnect()
                break
            self.publish()
        log.warning("D-Bus: the bus connection is gone; uplinkd runs on without it")

    def _publish(self, snapshot: Snapshot) -> ManagerInterface:
        bus, manager = self._objects()
        self._export_links(bus, snapshot)
        manager.publish(snapshot)
        for status in snapshot.links:
            if (link := self._links.get(status.name)) is not None:
                link.publish(status)
        return manager

    def _export_links(self, bus: _Bus, snapshot: Snapshot) -> None:
        """One object per link of the snapshot: those a reload added are exported, those it
        removed dropped, each announced (InterfacesAdded/Removed)."""
        names = {status.name for status in snapshot.links}
        for name in [name for name in self._links if name not in names]:
            del self._links[name]
            bus.unexport(link_path(name))
            self._announce("InterfacesRemoved", "oas", [link_path(name), [LINK_INTERFACE]])
        for status in snapshot.links:
            if status.name not in self._links:
                added = {LINK_INTERFACE: self._export_link(bus, status).variants()}
                self._announce("InterfacesAdded", "oa{sa{sv}}", [link_path(status.name), added])

    def _export_link(self, bus: _Bus, status: LinkStatus) -> LinkInterface:
        link = self._links[status.name] = LinkInterface(status)
        bus.export(link_path(status.name), link)
        return link

    def _announce(self, member: str, signature: str, body: list[Any]) -> None:
        """An ObjectManager signal, sent from the manager's path as the specification says."""
        self._objects()[0].send(
            Message.new_signal(const.BUS_PATH, OBJECT_MANAGER_INTERFACE, member, signature, body)
        )
