"""The D-Bus contract as uplinkd serves it (dbus/org.uplinkd.Uplinkd1.xml): names, error names,
the Controller the objects call, and the manager and link objects with their properties,
methods and signals.

Thin by design: every method delegates to the controller, which knows nothing of D-Bus; this module
only converts values, maps exceptions to the contract's error names (`dbus_error`, the one place),
and keeps the published properties equal to the controller's snapshot, signalling what changed.
Who may call what is the bus policy's business (dbus/org.uplinkd.Uplinkd1.conf): dbus-fast does
not tell a handler who called it.
"""

import enum
import functools
import inspect
import logging
import string
from collections.abc import Callable, Mapping
from typing import (
    Annotated,
    Any,
    ClassVar,
    Final,
    Generic,
    Protocol,
    TypeVar,
)

from dbus_fast import DBusError, PropertyAccess
from dbus_fast import introspection as intr
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


class Service(Protocol):
    """What the manager object needs of the service that exports it."""

    controller: Controller

    def publish(self) -> None: ...


class ManagerInterface(_Published[Snapshot]):
    def __init__(self, service: "Service", snapshot: Snapshot) -> None:
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
