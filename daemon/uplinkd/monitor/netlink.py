"""Kernel events for the links' devices: carrier, IPv4 addresses, gateway routes, neighbours.

`NetlinkWatcher` subscribes first and snapshots second (STYLE rule 6), so no change can fall
between the two: messages that arrive during the dumps wait in the monitor socket's queue.

How pyroute2 0.9.7 delivers broadcasts (read from its source, checked in a namespace):

- `AsyncIPRoute(groups=...)` + `await ipr.bind()` joins the multicast groups; asyncio then reads
  the socket into an unbounded queue keyed by sequence number. `ipr.get()` yields the messages of
  one datagram and ends, so it is awaited in a loop; an empty round means the socket was closed.
- A broadcast carries the sequence number of the request that caused it (`ip addr add` from
  another process), and lands in a pending request's queue if the numbers collide. So the
  monitor socket never sends requests: the dumps go through a second, unsubscribed socket.
- ENOBUFS: the kernel reports a receive-buffer overflow as the error of the next recvmsg().
  asyncio hands it to the protocol's `error_received()`, which poisons the pyroute2 object (every
  later call re-raises it) and queues a fake NLMSG_ERROR, so the pending `get()` raises
  `OSError(ENOBUFS)` (not NetlinkError). The only way out is a new socket: reopen, subscribe,
  re-snapshot, and emit RESYNC so the coordinator re-reads everything.
- `AsyncIPRoute(netns=NAME)` creates a missing namespace unless `flags=0` is passed.

Tests force an overflow with `rcvbuf=1`: the kernel raises it to its minimum (2304 bytes), which
holds a single link message, so a burst such as 30 peer flaps from one `ip -batch` overflows it.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import logging
import socket
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Final

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import (
    RTM_DELADDR,
    RTM_DELLINK,
    RTM_DELNEIGH,
    RTM_DELROUTE,
    RTM_NEWADDR,
    RTM_NEWLINK,
    RTM_NEWNEIGH,
    RTM_NEWROUTE,
    RTMGRP_IPV4_IFADDR,
    RTMGRP_IPV4_ROUTE,
    RTMGRP_LINK,
    RTMGRP_NEIGH,
)

from .. import const

# discovery's route parser, so that both read "a route via the device" the same way.
from ..facts.discovery import DEFAULT_ROUTE, route_infos

log = logging.getLogger("uplinkd")

IFF_LOWER_UP: Final = 0x10000
# Operational states in which a device with carrier can carry traffic (RFC 2863; UNKNOWN is what
# drivers without operstate support, ppp and tun report).
USABLE_OPERSTATES: Final = frozenset({"UP", "UNKNOWN", None})
GROUPS: Final = RTMGRP_LINK | RTMGRP_IPV4_IFADDR | RTMGRP_IPV4_ROUTE | RTMGRP_NEIGH
# Neighbour states that say the address does not answer ARP (yet): resolving, or given up.
NUD_UNRESOLVED: Final = 0x01 | 0x20  # NUD_INCOMPLETE | NUD_FAILED
# A dump that takes longer than this is stuck (a healthy one takes milliseconds): reopen.
SNAPSHOT_TIMEOUT_S: Final = 10.0
# Back-off after an unexpected error, doubling up to the maximum; ENOBUFS reopens at once.
RETRY_DELAY_S: Final = 0.5
RETRY_DELAY_MAX_S: Final = 30.0


class EventKind(enum.StrEnum):
    CARRIER = "carrier"
    ADDRESS = "address"
    GATEWAY = "gateway"
    NEIGHBOUR = "neighbour"  # a neighbour that did not answer ARP answers again
    RESYNC = "resync"


@dataclass(frozen=True)
class NetEvent:
    kind: EventKind
    device: str | None  # None for RESYNC
    carrier: bool | None  # for CARRIER: the new state (False when the device is removed)
    detail: str  # for people: "wan1: carrier lost"
    neighbour: str | None = None  # for NEIGHBOUR: its address


def link_carrier(msg: Any) -> bool:
    """Carrier of an RTM_NEWLINK message: IFF_LOWER_UP and an operstate that carries traffic."""
    operstate = msg.get_attr("IFLA_OPERSTATE")
    return bool(msg["flags"] & IFF_LOWER_UP) and operstate in USABLE_OPERSTATES


def is_overflow(exc: BaseException) -> bool:
    """True for ENOBUFS however pyroute2 surfaces it (OSError from get(), NetlinkError code)."""
    if isinstance(exc, NetlinkError):
        return bool(exc.code == errno.ENOBUFS)
    return isinstance(exc, OSError) and exc.errno == errno.ENOBUFS


class NetlinkWatcher:
    """Reports carrier, address and gateway changes of the watched devices to `on_event`.

    The state of every device is kept, so `set_devices()` after a reload needs no re-read.
    `ready` is set once the first snapshot is in: from then on `carrier()` answers.
    """

    def __init__(
        self,
        devices: Collection[str],
        on_event: Callable[[NetEvent], None],
        *,
        netns: str | None = None,
        rcvbuf: int | None = None,  # the monitor socket's SO_RCVBUF; tiny in overflow tests
    ) -> None:
        self._devices = frozenset(devices)
        self._on_event = on_event
        self._netns = netns
        self._rcvbuf = rcvbuf
        self._names: dict[int, str] = {}  # ifindex -> device name
        self._carrier: dict[str, bool] = {}
        self._addresses: dict[str, set[str]] = {}
        # (device, neighbour) failed or gone from the neighbour table: not known to answer ARP
        self._unresolved: set[tuple[str, str]] = set()
        self._snapshots = 0  # completed snapshots; from the second on, a snapshot is a resync
        self.ready = asyncio.Event()

    def carrier(self, device: str) -> bool | None:
        """Last known carrier of the device; None if it does not exist (or before `ready`)."""
        return self._carrier.get(device)

    def set_devices(self, devices: Collection[str]) -> None:
        self._devices = frozenset(devices)

    async def run(self) -> None:
        """Watch until cancelled; socket failures reopen and resync, they never end the loop."""
        delay = RETRY_DELAY_S
        while True:
            snapshots = self._snapshots
            try:
                await self._session()
            except Exception as exc:  # noqa: BLE001 - the watcher must outlive any socket error
                worked = self._snapshots != snapshots
                if worked:
                    delay = RETRY_DELAY_S
                if worked and is_overflow(exc):
                    log.warning("netlink monitor overflowed (ENOBUFS); re-reading the devices")
                    continue
                # Also an overflow during the snapshot itself: a storm, let it pass first.
                log.error("netlink monitor failed (%r); reopening in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_DELAY_MAX_S)

    # --- one socket's life ------------------------------------------------------------------

    def _open(self, **kwargs: Any) -> AsyncIPRoute:
        # flags=0: never create the namespace (pyroute2's default O_CREAT would).
        return (
            AsyncIPRoute(netns=self._netns, flags=0, **kwargs)
            if self._netns
            else AsyncIPRoute(**kwargs)
        )

    async def _session(self) -> None:
        extra = {"rcvbuf": self._rcvbuf} if self._rcvbuf is not None else {}
        monitor = self._open(groups=GROUPS, **extra)
        try:
            await monitor.bind()  # subscribe first ...
            async with asyncio.timeout(SNAPSHOT_TIMEOUT_S):
                await self._snapshot()  # ... then snapshot
            while True:
                received = False
                async for msg in monitor.get():
                    received = True
                    self._handle(msg)
                if not received:
                    raise ConnectionError("the netlink monitor socket was closed")
        finally:
            monitor.close()

    async def _snapshot(self) -> None:
        names: dict[int, str] = {}
        carrier: dict[str, bool] = {}
        addresses: dict[str, set[str]] = {}
        async with self._open() as ipr:
            async for msg in await ipr.link("dump"):
                name = msg.get_attr("IFLA_IFNAME")
                names[int(msg["index"])] = name
                carrier[name] = link_carrier(msg)
            async for msg in await ipr.addr("dump", family=socket.AF_INET):
                name = names.get(int(msg["index"]))
                if name is not None:
                    addresses.setdefault(name, set()).add(_address_text(msg))
        resync = self._snapshots > 0
        self._snapshots += 1
        previous, self._carrier = self._carrier, carrier
        self._names, self._addresses = names, addresses
        self.ready.set()
        if not resync:
            return
        # A carrier change lost in the overflow is still a transition the state machines need.
        for device in sorted(self._devices):
            if previous.get(device) != carrier.get(device):
                self._carrier_event(device, previous.get(device), carrier.get(device), " (resync)")
        self._emit(NetEvent(EventKind.RESYNC, None, None, "netlink resync: re-read everything"))

    # --- messages ---------------------------------------------------------------------------

    def _handle(self, msg: Any) -> None:
        kind = msg["header"]["type"]
        if kind in (RTM_NEWLINK, RTM_DELLINK) and msg["family"] == socket.AF_UNSPEC:
            # AF_BRIDGE link messages describe bridge ports; their DELLINK removes a port only.
            self._on_link(msg, deleted=kind == RTM_DELLINK)
        elif kind in (RTM_NEWADDR, RTM_DELADDR) and msg["family"] == socket.AF_INET:
            self._on_address(msg, deleted=kind == RTM_DELADDR)
        elif kind in (RTM_NEWROUTE, RTM_DELROUTE) and msg["family"] == socket.AF_INET:
            self._on_route(msg, deleted=kind == RTM_DELROUTE)
        elif kind in (RTM_NEWNEIGH, RTM_DELNEIGH) and msg["family"] == socket.AF_INET:
            self._on_neighbour(msg, deleted=kind == RTM_DELNEIGH)

    def _on_link(self, msg: Any, *, deleted: bool) -> None:
        index = int(msg["index"])
        name = msg.get_attr("IFLA_IFNAME") or self._names.get(index)
        old = self._names.pop(index, None)
        if old is not None and (deleted or old != name):
            self._forget(old)
        if deleted or name is None:
            return
        self._names[index] = name
        before = self._carrier.get(name)
        self._carrier[name] = link_carrier(msg)
        if before != self._carrier[name]:
            self._carrier_event(name, before, self._carrier[name])

    def _forget(self, name: str) -> None:
        before = self._carrier.pop(name, None)
        self._addresses.pop(name, None)
        self._unresolved = {key for key in self._unresolved if key[0] != name}
        if before is not None:
            self._carrier_event(name, before, None)

    def _carrier_event(
        self, name: str, before: bool | None, now: bool | None, note: str = ""
    ) -> None:
        if name not in self._devices:
            return
        if now is None:
            text = "device removed"
        elif before is None:
            text = f"device appeared, {'carrier up' if now else 'no carrier'}"
        else:
            text = "carrier up" if now else "carrier lost"
        self._emit(NetEvent(EventKind.CARRIER, name, bool(now), f"{name}: {text}{note}"))

    def _on_address(self, msg: Any, *, deleted: bool) -> None:
        label = msg.get_attr("IFA_LABEL") or ""
        name = self._names.get(int(msg["index"]), label.split(":")[0])
        if not name:
            return
        address = _address_text(msg)
        known = self._addresses.setdefault(name, set())
        # A DHCP client refreshing the lifetimes re-sends RTM_NEWADDR: only a real change counts.
        if (address in known) != deleted:
            return
        if deleted:
            known.discard(address)
        else:
            known.add(address)
        if name in self._devices:
            verb = "removed" if deleted else "added"
            self._emit(NetEvent(EventKind.ADDRESS, name, None, f"{name}: address {address} {verb}"))

    def _on_route(self, msg: Any, *, deleted: bool) -> None:
        for index, route in route_infos(msg):
            name = self._names.get(index)
            if (
                name not in self._devices
                or route.table != const.RT_TABLE_MAIN
                or route.protocol == const.RTPROT_UPLINKD  # our own applies must not echo back
                or (route.gateway is None and route.dst != DEFAULT_ROUTE)
            ):
                continue
            dst = "default" if route.dst == DEFAULT_ROUTE else str(route.dst)
            via = f"via {route.gateway}" if route.gateway else "without gateway"
            verb = "removed" if deleted else "added"
            self._emit(NetEvent(EventKind.GATEWAY, name, None, f"{name}: {dst} {via} {verb}"))

    def _on_neighbour(self, msg: Any, *, deleted: bool) -> None:
        """A neighbour of a watched device that stopped answering ARP (a gateway gone silent)
        and then answers again: the end of a fault the probes could only see as loss.

        The kernel reports a neighbour that failed to resolve (FAILED) and one whose entry went
        (deleted, e.g. flushed or aged out), but not one still resolving (INCOMPLETE): after
        either, the next valid state means it answered ARP again."""
        name = self._names.get(int(msg["ifindex"]))
        address = msg.get_attr("NDA_DST")
        if name not in self._devices or address is None:
            return
        key = (name, str(address))
        if deleted or msg["state"] & NUD_UNRESOLVED:
            self._unresolved.add(key)
        elif key in self._unresolved:
            self._unresolved.discard(key)
            text = f"{name}: neighbour {address} answers ARP again"
            self._emit(NetEvent(EventKind.NEIGHBOUR, name, None, text, neighbour=str(address)))

    def _emit(self, event: NetEvent) -> None:
        log.debug("netlink event: %s", event.detail)
        try:
            self._on_event(event)
        except Exception:  # a bug in the consumer must not stop the watcher
            log.exception("netlink event handler failed on %s", event.detail)


def _address_text(msg: Any) -> str:
    local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
    return f"{local}/{int(msg['prefixlen'])}"
