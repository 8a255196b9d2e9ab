"""NetworkManager's view of the links' devices, read with nmcli.

When NetworkManager has connected a link's device, its connection is where the gateway was
configured (or learnt by DHCP), so it is the better source than guessing from routes. Everything
else keeps coming from netlink. Without nmcli, or with NetworkManager not running, the answer is
simply empty: uplinkd works the same on a machine without NetworkManager.

The parsing is pure (`parse_device`), so it is tested without NetworkManager.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, replace
from ipaddress import AddressValueError, IPv4Address, IPv4Interface, NetmaskValueError
from typing import Final

from ..planning.plan import LinkFacts

log = logging.getLogger("uplinkd")

NMCLI: Final = "nmcli"
# nmcli answers in ~20 ms; a hung NetworkManager must not hold up a refresh for long.
NMCLI_TIMEOUT_S: Final = 2.0
FIELDS: Final = "GENERAL.DEVICE,GENERAL.STATE,GENERAL.CONNECTION,IP4.ADDRESS,IP4.GATEWAY"
# NM_DEVICE_STATE_ACTIVATED: the only state in which the connection's gateway is in force.
STATE_ACTIVATED: Final = 100
# nmcli's exit code for "no such device" (nmcli(1)).
EXIT_NOT_FOUND: Final = 10

_INDEX = re.compile(r"\[\d+\]$")  # IP4.ADDRESS[1] -> IP4.ADDRESS
_ESCAPE = re.compile(r"\\(.)")  # -e yes: "\:" and "\\" inside values


@dataclass(frozen=True)
class NmDevice:
    """What NetworkManager says about one device."""

    device: str
    state: int  # NMDeviceState, e.g. 100 activated, 30 disconnected, 10 unmanaged
    connection: str  # the active connection's name; "" when none
    addresses: tuple[IPv4Interface, ...]
    gateway: IPv4Address | None

    @property
    def connected(self) -> bool:
        return self.state == STATE_ACTIVATED


def unescape(value: str) -> str:
    """A terse value with nmcli's escapes (`-e yes`) undone."""
    return _ESCAPE.sub(r"\1", value)


def parse_terse(text: str) -> dict[str, list[str]]:
    """`nmcli -t -e yes -f ... device show` output as field -> values, in order.

    Each line is FIELD:VALUE; field names hold no colon, so the first one separates. Multi-valued
    fields come numbered (IP4.ADDRESS[1], [2], ...) and are gathered under the bare name.
    """
    fields: dict[str, list[str]] = {}
    for line in text.splitlines():
        name, colon, value = line.partition(":")
        if not colon:
            continue
        fields.setdefault(_INDEX.sub("", name), []).append(unescape(value))
    return fields


def _state(value: str) -> int | None:
    """`100 (connected)` -> 100."""
    number = value.split(" ", 1)[0]
    return int(number) if number.isdigit() else None


def _interface(value: str) -> IPv4Interface | None:
    try:
        return IPv4Interface(value)
    except (AddressValueError, NetmaskValueError, ValueError):
        return None


def _address(value: str) -> IPv4Address | None:
    try:
        return IPv4Address(value) if value else None
    except AddressValueError:
        return None


def parse_device(text: str) -> NmDevice | None:
    """One device from `nmcli ... device show DEV`, or None when the output makes no sense."""
    fields = parse_terse(text)
    name = fields.get("GENERAL.DEVICE", [""])[0]
    state = _state(fields.get("GENERAL.STATE", [""])[0])
    if not name or state is None:
        return None
    addresses = (_interface(value) for value in fields.get("IP4.ADDRESS", []))
    return NmDevice(
        device=name,
        state=state,
        connection=fields.get("GENERAL.CONNECTION", [""])[0],
        addresses=tuple(address for address in addresses if address is not None),
        gateway=_address(fields.get("IP4.GATEWAY", [""])[0]),
    )


def prefer_gateway(fact: LinkFacts, device: NmDevice | None) -> tuple[LinkFacts, str]:
    """The link's facts with NetworkManager's gateway when it has one, and where it came from.

    Only for links whose gateway is not configured: a configured one always wins.
    """
    if device is None or not device.connected or device.gateway is None:
        return fact, "netlink"
    return replace(fact, gateway=device.gateway), f"NetworkManager (connection {device.connection})"


class _Quiet:
    """Logs each reason for having no NetworkManager facts once, until nmcli answers again."""

    def __init__(self) -> None:
        self.said: set[str] = set()

    def debug(self, reason: str) -> None:
        if reason not in self.said:
            self.said.add(reason)
            log.debug("no NetworkManager facts (%s); gateways come from netlink", reason)

    def reset(self) -> None:
        self.said.clear()


_quiet = _Quiet()


class _NmcliError(Exception):
    """nmcli cannot talk to NetworkManager: no use asking about the other devices."""


async def _show(nmcli: str, device: str) -> NmDevice | None:
    proc = await asyncio.create_subprocess_exec(
        nmcli,
        "-t",
        "-e",
        "yes",
        "-f",
        FIELDS,
        "device",
        "show",
        device,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C"},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), NMCLI_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise _NmcliError(f"nmcli did not answer within {NMCLI_TIMEOUT_S:g} s") from None
    if proc.returncode == EXIT_NOT_FOUND:
        return None  # a device NetworkManager does not know (another namespace, not yet there)
    if proc.returncode != 0:
        message = err.decode(errors="replace").strip() or f"nmcli exited {proc.returncode}"
        raise _NmcliError(message)
    return parse_device(out.decode(errors="replace"))


async def device_facts(devices: Iterable[str]) -> dict[str, NmDevice]:
    """The devices among `devices` that NetworkManager manages and has connected.

    Empty, quietly, when nmcli is missing or cannot reach NetworkManager.
    """
    wanted = sorted(set(devices))
    nmcli = shutil.which(NMCLI)
    if not wanted or nmcli is None:
        if nmcli is None:
            _quiet.debug("nmcli is not installed")
        return {}
    shown = await asyncio.gather(
        *(_show(nmcli, device) for device in wanted), return_exceptions=True
    )
    for result in shown:
        if isinstance(result, _NmcliError | OSError):
            _quiet.debug(str(result))
            return {}
        if isinstance(result, BaseException):
            raise result
    _quiet.reset()
    return {
        device.device: device
        for device in shown
        if isinstance(device, NmDevice) and device.device in wanted and device.connected
    }
