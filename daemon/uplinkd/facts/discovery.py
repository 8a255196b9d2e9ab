"""Discovery: what each link's device really has (address, prefix, gateway, point-to-point peer).

The choices are pure functions over plain data (`AddressInfo`, `RouteInfo`) so they can be tested
without root; `discover()` only reads the kernel through netlink and feeds them.
"""

from __future__ import annotations

import socket
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pyroute2 import AsyncIPRoute

from .. import const
from ..config.model import Config, LinkConfig
from ..errors import ConfigError
from ..planning.plan import IPv4Address, IPv4Interface, IPv4Network, LinkFacts

IFA_F_SECONDARY = 0x01
IFF_POINTOPOINT = 0x10
RT_SCOPE_UNIVERSE = 0
DEFAULT_ROUTE = IPv4Network("0.0.0.0/0")


@dataclass(frozen=True)
class AddressInfo:
    """One IPv4 address of a device, as netlink reports it."""

    local: IPv4Address  # IFA_LOCAL: the device's own address
    prefixlen: int
    peer: IPv4Address | None = None  # IFA_ADDRESS when it differs from IFA_LOCAL
    secondary: bool = False
    scope: int = RT_SCOPE_UNIVERSE

    @property
    def interface(self) -> IPv4Interface:
        return IPv4Interface(f"{self.local}/{self.prefixlen}")


@dataclass(frozen=True)
class RouteInfo:
    """One IPv4 route leaving through the device in question."""

    table: int
    dst: IPv4Network
    gateway: IPv4Address | None
    metric: int = 0
    protocol: int = 0


@dataclass(frozen=True)
class DeviceInfo:
    """Everything discovery needs to know about one device."""

    name: str
    pointopoint: bool
    addresses: tuple[AddressInfo, ...]
    routes: tuple[RouteInfo, ...]


def choose_address(addresses: Sequence[AddressInfo]) -> AddressInfo | None:
    """The device's first usable IPv4 address: a primary global one if any, else the first one."""
    for addr in addresses:
        if not addr.secondary and addr.scope == RT_SCOPE_UNIVERSE:
            return addr
    return addresses[0] if addresses else None


def first_host(address: IPv4Interface) -> IPv4Address | None:
    """The conventional gateway of a subnet: its first host, or the second one if that is us.

    A /31 has no network address (RFC 3021): the other end is the gateway. A /32 has none.
    """
    net = address.network
    if net.prefixlen == 32:
        return None
    if net.prefixlen == 31:
        low = net.network_address
        return low + 1 if address.ip == low else low
    candidate = net.network_address + 1
    return candidate + 1 if candidate == address.ip else candidate


def gateway_from_routes(routes: Iterable[RouteInfo]) -> IPv4Address | None:
    """The gateway the system already uses for the device.

    In order: a default route via the device in main (lowest metric), a default route via the
    device in any other table, then any other route via a gateway in main. uplinkd's own routes
    are ignored so a stale gateway never confirms itself.
    """
    ranked: list[tuple[int, int, int, IPv4Address]] = []
    for route in routes:
        if route.gateway is None or route.protocol == const.RTPROT_UPLINKD:
            continue
        if route.dst == DEFAULT_ROUTE:
            group = 0 if route.table == const.RT_TABLE_MAIN else 1
        elif route.table == const.RT_TABLE_MAIN:
            group = 2
        else:
            continue
        ranked.append((group, route.metric, route.table, route.gateway))
    return min(ranked)[3] if ranked else None


def choose_gateway(
    configured: IPv4Address | None,
    address: AddressInfo,
    routes: Iterable[RouteInfo],
    pointopoint: bool = False,
) -> IPv4Address | None:
    """Configured gateway, else the one routes use, else the p2p peer, else the first host.

    A point-to-point device without a peer has no gateway: its routes go "dev" only.
    """
    if configured is not None:
        return configured
    from_routes = gateway_from_routes(routes)
    if from_routes is not None:
        return from_routes
    if address.peer is not None:
        return address.peer
    if pointopoint:
        return None
    return first_host(address.interface)


def link_facts(link: LinkConfig, device: DeviceInfo | None) -> LinkFacts | str:
    """Facts for one link, or the warning explaining why it is left out."""
    if device is None:
        return f"link {link.name}: device {link.device} does not exist; left out"
    address = choose_address(device.addresses)
    if address is None:
        return f"link {link.name}: device {link.device} has no IPv4 address; left out"
    gateway = choose_gateway(link.gateway, address, device.routes, device.pointopoint)
    return LinkFacts(
        name=link.name,
        device=link.device,
        address=address.interface,
        gateway=gateway,
        peer=address.peer,
    )


def select(
    links: Sequence[LinkConfig], devices: dict[str, DeviceInfo]
) -> tuple[list[LinkFacts], list[str]]:
    """Facts for the usable links and warnings for the others, in configuration order."""
    facts: list[LinkFacts] = []
    warnings: list[str] = []
    for link in links:
        result = link_facts(link, devices.get(link.device))
        if isinstance(result, str):
            warnings.append(result)
        else:
            facts.append(result)
    return facts, warnings


def check_lans(config: Config, devices: Collection[str]) -> list[str]:
    """Warnings (file:line) for LAN devices the kernel does not have; a ConfigError when it has
    none of them, since the ruleset would then serve no LAN at all (with the firewall on, every
    LAN connection is dropped). A device that is missing may still come (a VPN's tun0 does)."""
    missing = [lan for lan in config.lans if lan.device not in devices]
    if missing and len(missing) == len(config.lans):
        first = missing[0]
        names = ", ".join(repr(lan.device) for lan in missing)
        raise ConfigError(
            config.path,
            f"no LAN device exists ({names}); a typo would cut every LAN client off, so "
            "nothing is applied",
            line=first.line,
            key="lan.device",
        )
    return [
        f"{config.path}:{lan.line}: lan.device: device {lan.device!r} of LAN {lan.name} does not "
        "exist (yet); its traffic is served once it does"
        for lan in missing
    ]


# --- netlink reads ---------------------------------------------------------------------------


async def device_names(ipr: AsyncIPRoute) -> set[str]:
    """The names of every device the kernel has now."""
    return {msg.get_attr("IFLA_IFNAME") async for msg in await ipr.link("dump")}


def _address_info(msg: Any) -> AddressInfo | None:
    local = msg.get_attr("IFA_LOCAL")
    remote = msg.get_attr("IFA_ADDRESS")
    own = local if local is not None else remote
    if own is None:
        return None
    flags = msg.get_attr("IFA_FLAGS")
    if flags is None:
        flags = msg["flags"]
    peer = remote if local is not None and remote is not None and remote != local else None
    return AddressInfo(
        local=IPv4Address(own),
        prefixlen=int(msg["prefixlen"]),
        peer=IPv4Address(peer) if peer is not None else None,
        secondary=bool(flags & IFA_F_SECONDARY),
        scope=int(msg["scope"]),
    )


def route_infos(msg: Any) -> list[tuple[int, RouteInfo]]:
    """(output ifindex, route) per next hop of a unicast route; a multipath route gives several."""
    if msg["type"] != 1:  # RTN_UNICAST
        return []
    table = msg.get_attr("RTA_TABLE")
    dst = IPv4Network((msg.get_attr("RTA_DST") or 0, int(msg["dst_len"])), strict=False)
    hops = [(msg.get_attr("RTA_OIF"), msg.get_attr("RTA_GATEWAY"))]
    hops += [(nh["oif"], nh.get_attr("RTA_GATEWAY")) for nh in msg.get_attr("RTA_MULTIPATH") or ()]
    return [
        (
            int(oif),
            RouteInfo(
                table=int(table if table is not None else msg["table"]),
                dst=dst,
                gateway=IPv4Address(gateway) if gateway else None,
                metric=int(msg.get_attr("RTA_PRIORITY") or 0),
                protocol=int(msg["proto"]),
            ),
        )
        for oif, gateway in hops
        if oif
    ]


async def read_devices(ipr: AsyncIPRoute, names: Iterable[str]) -> dict[str, DeviceInfo]:
    """Addresses and routes of the named devices that exist, read in three dumps."""
    wanted = set(names)
    by_index: dict[int, tuple[str, bool]] = {}
    async for msg in await ipr.link("dump"):
        name = msg.get_attr("IFLA_IFNAME")
        if name in wanted:
            by_index[int(msg["index"])] = (name, bool(msg["flags"] & IFF_POINTOPOINT))
    addresses: dict[int, list[AddressInfo]] = {index: [] for index in by_index}
    async for msg in await ipr.addr("dump", family=socket.AF_INET):
        index = int(msg["index"])
        info = _address_info(msg) if index in by_index else None
        if info is not None:
            addresses[index].append(info)
    routes: dict[int, list[RouteInfo]] = {index: [] for index in by_index}
    async for msg in await ipr.route("dump", family=socket.AF_INET):
        for index, route in route_infos(msg):
            if index in by_index:
                routes[index].append(route)
    return {
        name: DeviceInfo(name, p2p, tuple(addresses[index]), tuple(routes[index]))
        for index, (name, p2p) in by_index.items()
    }


async def discover(
    ipr: AsyncIPRoute, links: Sequence[LinkConfig]
) -> tuple[list[LinkFacts], list[str]]:
    """Facts for the links whose device exists and has an IPv4 address; warnings for the rest."""
    devices = await read_devices(ipr, (link.device for link in links))
    return select(links, devices)
