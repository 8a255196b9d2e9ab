"""The D-Bus adapter: a Controller published on the bus as dbus/org.uplinkd.Uplinkd1.xml says.

Thin by design: every method delegates to the controller, which knows nothing of D-Bus; this module
only converts values, maps exceptions to the contract's error names (`dbus_error`, the one place),
and keeps the published properties equal to the controller's snapshot, signalling what changed.
Who may call what is the bus policy's business (dbus/org.uplinkd.Uplinkd1.conf): dbus-fast does
not tell a handler who called it.
"""

import asyncio
import contextlib
import enum
import functools
import inspect
import logging
import socket
import string
import time
from collections.abc import Callable, Mapping
from typing import (
    Annotated,
    Any,
    ClassVar,
    Concatenate,
    Final,
    Generic,
    ParamSpec,
    Protocol,
    TypeVar,
)

from dbus_fast import BusType, DBusError, Message, NameFlag, PropertyAccess, RequestNameReply
from dbus_fast import introspection as intr
from dbus_fast.aio import MessageBus
from dbus_fast.annotations import (
    DBusBool,
    DBusDouble,
    DBusSignature,
    DBusStr,
    DBusUInt32,
    DBusUInt64,
)
from dbus_fast.errors import DBusFastError
from dbus_fast.service import ServiceInterface, dbus_method, dbus_property, dbus_signal
from dbus_fast.signature import Variant

from .. import const
from ..errors import UnknownLinkError, UplinkdError
from ..monitor.link import Transition
from .status import LearnedDestination, LinkStatus, Snapshot

log = logging.getLogger("uplinkd")

MANAGER_INTERFACE: Final = "org.uplinkd.Uplinkd1.Manager"
LINK_INTERFACE: Final = "org.uplinkd.Uplinkd1.Link"
OBJECT_MANAGER_INTERFACE: Final = "org.freedesktop.DBus.ObjectManager"
LINK_PATH_PREFIX: Final = f"{const.BUS_PATH}/link/"
# Measured values (latency, loss, rates) move with every probe round and counter sample; they are
# compared with what was last published as often as the counters are sampled.
PUBLISH_INTERVAL_S: Final = const.RATE_SAMPLE_S
# A bus that reads nothing of ours for this long is stuck (a hung or stopped dbus-daemon): what
# uplinkd sends meanwhile would queue without limit, so it leaves the bus and runs on without it.
# A bus merely slow under a flood of calls keeps taking bytes and is never left.
BUS_STALL_S: Final = 30.0


class ErrorName(enum.StrEnum):
    UNKNOWN_LINK = "org.uplinkd.Uplinkd1.Error.UnknownLink"
    UNKNOWN_ACTION = "org.uplinkd.Uplinkd1.Error.UnknownAction"
    INVALID_ARGUMENT = "org.uplinkd.Uplinkd1.Error.InvalidArgument"
    RELOAD_FAILED = "org.uplinkd.Uplinkd1.Error.ReloadFailed"
    INTERNAL = "org.uplinkd.Uplinkd1.Error.Internal"


# The one mapping from uplinkd's exceptions to the contract's error names; where an exception
# means something particular to one method, that method's entry says so. The exception's most
# specific class found wins; anything not listed is a bug and answered as Internal.
_ERROR_NAMES: Final[Mapping[type[Exception], ErrorName]] = {
    UnknownLinkError: ErrorName.UNKNOWN_LINK,
    UplinkdError: ErrorName.INVALID_ARGUMENT,
}
_METHOD_ERROR_NAMES: Final[Mapping[str, Mapping[type[Exception], ErrorName]]] = {
    "Reload": {UplinkdError: ErrorName.RELOAD_FAILED},  # the new configuration was refused
    "NotifyDevice": {ValueError: ErrorName.UNKNOWN_ACTION},  # from link.Link.notify
}
INTERNAL_MESSAGE: Final = "internal error in uplinkd; the daemon's log has the details"


class BusError(UplinkdError):
    """The bus cannot be reached, or uplinkd's name on it cannot be owned."""


def dbus_error(exc: Exception, member: str = "") -> DBusError:
    """What a caller of `member` gets for `exc`: a contract error name and one clear line."""
    if isinstance(exc, DBusError):
        return exc
    names = {**_ERROR_NAMES, **_METHOD_ERROR_NAMES.get(member, {})}
    if not isinstance(exc, DBusFastError):  # the library's ValueErrors are bugs, not refusals
        for cls in type(exc).__mro__:
            if cls in names:
                text = " ".join(str(exc).split()) or type(exc).__name__
                return DBusError(names[cls].value, text)
    log.error("internal error answering D-Bus %s", member or "call", exc_info=exc)
    return DBusError(ErrorName.INTERNAL.value, INTERNAL_MESSAGE)


def _bus_method(member: str) -> Callable[[Callable[..., Any]], Callable[..., None]]:
    """dbus_method(member), every exception answered through dbus_error."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., None]:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def call_async(*args: Any) -> Any:
                try:
                    return await fn(*args)
                except Exception as exc:
                    raise dbus_error(exc, member) from exc

            return dbus_method(member)(call_async)

        @functools.wraps(fn)
        def call(*args: Any) -> Any:
            try:
                return fn(*args)
            except Exception as exc:
                raise dbus_error(exc, member) from exc

        return dbus_method(member)(call)

    return decorate


def object_path_label(name: str) -> str:
    """`name` as one object path element, escaped like systemd's bus_label_escape().

    ASCII letters stay, digits too except in first place; every other byte of the UTF-8 encoding
    (including "_") becomes "_" and two lowercase hex digits, so names never collide. "" is "_".
    """
    label = []
    for i, byte in enumerate(name.encode()):
        char = chr(byte)
        kept = char in string.ascii_letters or (i > 0 and char in string.digits)
        label.append(char if kept else f"_{byte:02x}")
    return "".join(label) or "_"


def link_path(name: str) -> str:
    return LINK_PATH_PREFIX + object_path_label(name)


class Controller(Protocol):
    """What the adapter needs from the daemon."""

    def snapshot(self) -> Snapshot: ...
    def set_enabled(self, name: str, enabled: bool) -> None: ...
    def notify_device(self, device: str, action: str) -> None: ...
    async def reload(self) -> None: ...  # raises errors.UplinkdError when the config is refused
    def dry_run(self) -> str: ...
    # At most `limit` learned destinations from `offset`, and how many there are in all.
    def learned(self, offset: int, limit: int) -> tuple[list[LearnedDestination], int]: ...


_S = TypeVar("_S", Snapshot, LinkStatus)
_P = ParamSpec("_P")
_READ: Final = PropertyAccess.READ
# GetLearned answers at most this many destinations a call, so a call costs the same however
# many destinations are learned; callers page through with offset (uplinkctl learned does).
# In the lab, 16 callers back to back added about 50 ms to a carrier failover with pages of
# 100 (a call about 0.4 ms), 0.4-0.6 s with pages of 500.
LEARNED_PAGE_MAX: Final = 100
LearnedReply = Annotated[tuple[list[tuple[str, str, str, int]], int], DBusSignature("a(sssu)u")]
StatusReply = Annotated[
    tuple[dict[str, Variant], list[dict[str, Variant]]], DBusSignature("a{sv}aa{sv}")
]
LinkStateChangedArgs = Annotated[tuple[str, str, str, str], DBusSignature("ssss")]
StringList = Annotated[list[str], DBusSignature("as")]


class _Published(ServiceInterface, Generic[_S]):
    """Properties read from the controller's latest value (`source`); changes are signalled.

    The property getters are the one conversion from uplinkd's values to D-Bus values.
    """

    # D-Bus property name -> (getter attribute, signature), from the subclass's annotations
    properties: ClassVar[dict[str, tuple[str, str]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.properties = {
            prop.name: (attribute, prop.signature)
            for attribute, member in vars(cls).items()
            if isinstance(prop := getattr(member, "introspection", None), intr.Property)
        }

    def __init__(self, name: str, source: _S) -> None:
        super().__init__(name)
        self.source: _S = source

    def values(self) -> dict[str, Any]:
        return {name: getattr(self, attribute) for name, (attribute, _) in self.properties.items()}

    def variants(self) -> dict[str, Variant]:
        values = self.values()
        return {name: Variant(sig, values[name]) for name, (_, sig) in self.properties.items()}

    def publish(self, source: _S) -> None:
        old = self.values()
        self.source = source
        changed = {name: value for name, value in self.values().items() if old[name] != value}
        if changed:
            self.emit_properties_changed(changed)


class LinkInterface(_Published[LinkStatus]):
    def __init__(self, status: LinkStatus) -> None:
        super().__init__(LINK_INTERFACE, status)

    @dbus_property(_READ, "Name")
    def link_name(self) -> DBusStr:  # not `name`: that is ServiceInterface's interface name
        return self.source.name

    @dbus_property(_READ, "Device")
    def device(self) -> DBusStr:
        return self.source.device

    @dbus_property(_READ, "State")
    def state(self) -> DBusStr:
        return self.source.state

    @dbus_property(_READ, "Since")
    def since(self) -> DBusUInt64:
        return max(0, int(self.source.since))

    @dbus_property(_READ, "Weight")
    def weight(self) -> DBusUInt32:
        return self.source.weight

    @dbus_property(_READ, "Priority")
    def priority(self) -> DBusUInt32:
        return self.source.priority

    @dbus_property(_READ, "Gateway")
    def gateway(self) -> DBusStr:
        return self.source.gateway

    @dbus_property(_READ, "Address")
    def address(self) -> DBusStr:
        return self.source.address

    @dbus_property(_READ, "LatencyMs")
    def latency_ms(self) -> DBusDouble:
        return float(self.source.latency_ms)

    @dbus_property(_READ, "HopLatencyMs")
    def hop_latency_ms(self) -> DBusDouble:
        return float(self.source.hop_latency_ms)

    @dbus_property(_READ, "LossPercent")
    def loss_percent(self) -> DBusDouble:
        return float(self.source.loss_percent)

    @dbus_property(_READ, "RxBps")
    def rx_bps(self) -> DBusUInt64:
        return max(0, self.source.rx_bps)

    @dbus_property(_READ, "TxBps")
    def tx_bps(self) -> DBusUInt64:
        return max(0, self.source.tx_bps)

    @dbus_property(_READ, "NewConnectionShare")
    def new_connection_share(self) -> DBusDouble:
        return float(self.source.new_connection_share)


class ManagerInterface(_Published[Snapshot]):
    def __init__(self, service: "BusService", snapshot: Snapshot) -> None:
        super().__init__(MANAGER_INTERFACE, snapshot)
        self._service = service

    @_bus_method("Reload")
    async def reload(self) -> None:
        await self._service.controller.reload()
        self._service.publish()  # the links it added or removed are on the bus by the reply

    @_bus_method("SetLinkEnabled")
    def set_link_enabled(self, name: DBusStr, enabled: DBusBool) -> None:
        self._service.controller.set_enabled(name, enabled)

    @_bus_method("NotifyDevice")
    def notify_device(self, device: DBusStr, action: DBusStr) -> None:
        self._service.controller.notify_device(device, action)

    @_bus_method("GetStatus")
    def get_status(self) -> StatusReply:
        snapshot = self._service.controller.snapshot()
        manager = ManagerInterface(self._service, snapshot).variants()
        return manager, [LinkInterface(status).variants() for status in snapshot.links]

    @_bus_method("DryRun")
    def dry_run(self) -> DBusStr:
        return self._service.controller.dry_run()

    @_bus_method("GetLearned")
    def get_learned(self, offset: DBusUInt32, limit: DBusUInt32) -> LearnedReply:
        page, total = self._service.controller.learned(offset, min(limit, LEARNED_PAGE_MAX))
        # Not dataclasses.astuple: it copies each field deeply, 7 us an entry.
        return [(e.rule, e.address, e.link, e.seconds_left) for e in page], total

    @dbus_signal("LinkStateChanged")
    def link_state_changed(self, transition: Transition) -> LinkStateChangedArgs:
        return transition.link, str(transition.old), str(transition.new), transition.reason

    @dbus_signal("PlanApplied")
    def plan_applied(self, generation: int) -> DBusUInt64:
        return generation

    @dbus_property(_READ, "Version")
    def version(self) -> DBusStr:
        return self.source.version

    @dbus_property(_READ, "Mode")
    def mode(self) -> DBusStr:
        return self.source.mode

    @dbus_property(_READ, "Generation")
    def generation(self) -> DBusUInt64:
        return self.source.generation

    @dbus_property(_READ, "OverallState")
    def overall_state(self) -> DBusStr:
        return str(self.source.overall)

    @dbus_property(_READ, "HookProblems")
    def hook_problems(self) -> StringList:
        return list(self.source.hook_problems)


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
