"""NetlinkWatcher against a real kernel: veth devices whose peers live in a second namespace."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from uplinkd import const
from uplinkd.monitor.netlink import EventKind, NetEvent, NetlinkWatcher

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None,
        reason="needs root and iproute2 to create network namespaces",
    ),
]

WAIT_S = 5.0  # carrier changes reach netlink in milliseconds; this only bounds a failure


@dataclass(frozen=True)
class Pair:
    ns: str  # the namespace the watcher watches: wan1, wan2 (watched), lan0 (not watched)
    peer: str  # the other ends: wan1p, wan2p, lan0p


def ip(ns: str, *args: str) -> None:
    done = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"ip -n {ns} {' '.join(args)}: {done.stderr.strip()}")


async def aip(ns: str, *args: str, batch: str | None = None) -> None:
    """`ip` without blocking the event loop the watcher runs in."""
    argv = ["ip", "-n", ns, *(("-batch", "-") if batch is not None else args)]
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate(batch.encode() if batch is not None else None)
    assert proc.returncode == 0, f"{' '.join(argv)}: {err.decode().strip()}"


def wait_operstate_up(ns: str, devices: tuple[str, ...]) -> None:
    """The kernel's linkwatch sets the operstate up to a second after the carrier."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        shown = subprocess.run(
            ["ip", "-n", ns, "-o", "link", "show"], capture_output=True, text=True, check=True
        ).stdout
        if all(f" {dev}@" in shown and "state UP" in _line(shown, dev) for dev in devices):
            return
        time.sleep(0.05)
    raise AssertionError(f"{devices} not up in {ns} after {WAIT_S} s")


def _line(shown: str, dev: str) -> str:
    return next((line for line in shown.splitlines() if f" {dev}@" in line), "")


@pytest.fixture
def pair() -> Iterator[Pair]:
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    names = [f"upl-nl-{tag}", f"upl-nlp-{tag}"]
    try:
        for name in names:
            subprocess.run(["ip", "netns", "add", name], check=True)
        ns, peer = names
        for dev in ("wan1", "wan2", "lan0"):
            ip(ns, "link", "add", dev, "type", "veth", "peer", "name", f"{dev}p", "netns", peer)
            ip(ns, "link", "set", dev, "up")
            ip(peer, "link", "set", f"{dev}p", "up")
        ip(ns, "addr", "add", "10.0.1.2/24", "dev", "wan1")
        ip(ns, "addr", "add", "10.0.2.2/24", "dev", "wan2")
        ip(ns, "addr", "add", "192.168.9.1/24", "dev", "lan0")
        wait_operstate_up(ns, ("wan1", "wan2", "lan0"))
        yield Pair(ns, peer)
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


class Events:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[NetEvent] = asyncio.Queue()

    def __call__(self, event: NetEvent) -> None:
        self.queue.put_nowait(event)

    async def next(self, match: Callable[[NetEvent], bool], timeout: float = WAIT_S) -> NetEvent:
        """The first event that matches; the others before it are dropped."""
        seen: list[str] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    event = await self.queue.get()
                    if match(event):
                        return event
                    seen.append(event.detail)
        except TimeoutError:
            raise AssertionError(f"no matching event within {timeout} s; saw {seen}") from None

    async def settle(self) -> None:
        """Drop events until none has come for half a second."""
        while True:
            await asyncio.sleep(0.5)
            if self.queue.empty():
                return
            while not self.queue.empty():
                self.queue.get_nowait()

    async def first_of(self, kind: EventKind, device: str) -> NetEvent:
        return await self.next(lambda e: e.kind is kind and e.device == device)


@asynccontextmanager
async def watching(pair: Pair, **kwargs: Any) -> AsyncIterator[tuple[NetlinkWatcher, Events]]:
    events = Events()
    watcher = NetlinkWatcher(["wan1", "wan2"], events, netns=pair.ns, **kwargs)
    task = asyncio.create_task(watcher.run())
    try:
        async with asyncio.timeout(WAIT_S):
            await watcher.ready.wait()
        yield watcher, events
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def run(body: Callable[[], Any]) -> None:
    async def main() -> None:
        async with asyncio.timeout(60):
            await body()

    asyncio.run(main())


def test_snapshot_and_carrier_changes(pair: Pair) -> None:
    async def body() -> None:
        async with watching(pair) as (watcher, events):
            assert watcher.carrier("wan1") is True
            assert watcher.carrier("nosuchdev") is None
            assert events.queue.empty()  # the first snapshot reports nothing

            await aip(pair.peer, "link", "set", "wan1p", "down")
            lost = await events.first_of(EventKind.CARRIER, "wan1")
            assert lost.carrier is False
            assert lost.detail == "wan1: carrier lost"
            assert watcher.carrier("wan1") is False

            await aip(pair.peer, "link", "set", "wan1p", "up")
            back = await events.first_of(EventKind.CARRIER, "wan1")
            assert (back.carrier, back.detail) == (True, "wan1: carrier up")
            assert watcher.carrier("wan1") is True

            # An unwatched device says nothing; wan2 after it proves the order.
            await aip(pair.peer, "link", "set", "lan0p", "down")
            await aip(pair.peer, "link", "set", "wan2p", "down")
            event = await events.next(lambda e: e.kind is EventKind.CARRIER)
            assert event.device == "wan2"
            assert watcher.carrier("lan0") is False  # still tracked, for set_devices()

            watcher.set_devices(["wan1", "wan2", "lan0"])
            await aip(pair.peer, "link", "set", "lan0p", "up")
            event = await events.next(lambda e: e.kind is EventKind.CARRIER)
            assert (event.device, event.carrier) == ("lan0", True)

    run(body)


def test_device_removed_and_back(pair: Pair) -> None:
    async def body() -> None:
        async with watching(pair) as (watcher, events):
            await aip(pair.ns, "link", "del", "wan2")
            # The kernel takes the device down first: "carrier lost", then "device removed".
            lost = await events.first_of(EventKind.CARRIER, "wan2")
            assert (lost.carrier, lost.detail) == (False, "wan2: carrier lost")
            gone = await events.first_of(EventKind.CARRIER, "wan2")
            assert (gone.carrier, gone.detail) == (False, "wan2: device removed")
            assert watcher.carrier("wan2") is None

            await aip(pair.ns, "link", "add", "wan2", "type", "veth", "peer", "name", "wan2q")
            appeared = await events.first_of(EventKind.CARRIER, "wan2")
            assert appeared.carrier is False  # created down
            assert appeared.detail == "wan2: device appeared, no carrier"
            await aip(pair.ns, "link", "set", "wan2q", "up")
            await aip(pair.ns, "link", "set", "wan2", "up")
            up = await events.first_of(EventKind.CARRIER, "wan2")
            assert up.carrier is True

    run(body)


def test_address_changes(pair: Pair) -> None:
    async def body() -> None:
        async with watching(pair) as (_, events):
            await aip(pair.ns, "addr", "del", "10.0.1.2/24", "dev", "wan1")
            event = await events.first_of(EventKind.ADDRESS, "wan1")
            assert event.detail == "wan1: address 10.0.1.2/24 removed"

            await aip(pair.ns, "addr", "add", "10.0.1.7/24", "dev", "wan1")
            event = await events.first_of(EventKind.ADDRESS, "wan1")
            assert event.detail == "wan1: address 10.0.1.7/24 added"

            # A DHCP renew refreshing the lifetimes is not a change; lan0 is not watched.
            lifetimes = ("valid_lft", "600", "preferred_lft", "600")
            await aip(pair.ns, "addr", "change", "10.0.1.7/24", "dev", "wan1", *lifetimes)
            await aip(pair.ns, "addr", "add", "192.168.9.2/24", "dev", "lan0")
            await aip(pair.ns, "addr", "add", "10.0.2.9/24", "dev", "wan2")
            event = await events.next(lambda e: e.kind is EventKind.ADDRESS)
            assert event.detail == "wan2: address 10.0.2.9/24 added"

    run(body)


def test_gateway_changes_and_own_routes_ignored(pair: Pair) -> None:
    async def body() -> None:
        async with watching(pair) as (_, events):
            await aip(pair.ns, "route", "add", "default", "via", "10.0.1.1", "dev", "wan1")
            event = await events.first_of(EventKind.GATEWAY, "wan1")
            assert event.detail == "wan1: default via 10.0.1.1 added"

            # A DHCP renew that moves the gateway.
            await aip(pair.ns, "route", "replace", "default", "via", "10.0.1.254", "dev", "wan1")
            event = await events.first_of(EventKind.GATEWAY, "wan1")
            assert event.detail == "wan1: default via 10.0.1.254 added"

            await aip(pair.ns, "route", "del", "default", "via", "10.0.1.254", "dev", "wan1")
            event = await events.first_of(EventKind.GATEWAY, "wan1")
            assert event.detail == "wan1: default via 10.0.1.254 removed"

            # uplinkd's own routes (main table and its own tables), a connected route on a
            # watched device and a gateway route in another table: none is an event. The
            # route after them proves the order.
            own = ("proto", str(const.RTPROT_UPLINKD))
            await aip(
                pair.ns, "route", "add", "10.9.0.0/16", "via", "10.0.1.1", "dev", "wan1", *own
            )
            await aip(pair.ns, "route", "add", "default", "via", "10.0.1.1", "table", "201", *own)
            await aip(pair.ns, "route", "add", "default", "via", "10.0.1.1", "table", "77")
            await aip(pair.ns, "route", "add", "10.7.0.0/16", "dev", "wan1")
            await aip(pair.ns, "route", "add", "10.8.0.0/16", "via", "10.0.2.1", "dev", "wan2")
            event = await events.next(lambda e: e.kind is EventKind.GATEWAY)
            assert event.detail == "wan2: 10.8.0.0/16 via 10.0.2.1 added"

    run(body)


def test_overflow_resyncs_and_keeps_watching(pair: Pair) -> None:
    async def body() -> None:
        # rcvbuf=1: the kernel's minimum receive buffer holds one link message. Carrier flaps do
        # not overflow it (linkwatch coalesces them); a batch of address changes does: each
        # address brings an RTM_NEWADDR and two RTM_NEWROUTE at once.
        async with watching(pair, rcvbuf=1) as (watcher, events):
            burst = "".join(f"addr add 10.77.{i}.1/24 dev lan0\n" for i in range(100))
            burst += "".join(f"addr del 10.77.{i}.1/24 dev lan0\n" for i in range(100))
            for _ in range(5):  # an overflow is a race; in practice the first burst wins it
                await aip(pair.ns, batch=burst)
                try:
                    resync = await events.next(lambda e: e.kind is EventKind.RESYNC, timeout=2)
                    break
                except AssertionError:
                    continue
            else:
                pytest.fail("five bursts of 600 netlink messages never overflowed the socket")
            assert (resync.device, resync.carrier) == (None, None)

            # Still watching: a later carrier loss is reported (as an event, or from the
            # re-snapshot if the small buffer overflows once more).
            await events.settle()
            assert watcher.carrier("wan1") is True
            await aip(pair.peer, "link", "set", "wan1p", "down")
            lost = await events.next(
                lambda e: e.kind is EventKind.CARRIER and e.device == "wan1" and not e.carrier
            )
            assert lost.carrier is False
            assert watcher.carrier("wan1") is False

    run(body)


def test_missing_namespace_is_never_created() -> None:
    name = f"upl-nl-missing-{uuid.uuid4().hex[:6]}"

    async def body() -> None:
        watcher = NetlinkWatcher(["wan1"], lambda _: None, netns=name)
        task = asyncio.create_task(watcher.run())
        await asyncio.sleep(0.3)
        assert not task.done()  # it retries, it does not crash
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    try:
        run(body)
        assert not os.path.exists(f"/run/netns/{name}")
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


SEND = "import socket, sys; socket.socket(type=socket.SOCK_DGRAM).sendto(b'x', (sys.argv[1], 9))"


async def send_udp(ns: str, address: str) -> None:
    """One datagram from the namespace: what makes the kernel resolve the neighbour."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", ns, sys.executable, "-c", SEND, address
    )
    assert await proc.wait() == 0


def test_a_neighbour_answering_arp_again_is_reported_once(pair: Pair) -> None:
    async def body() -> None:
        async with watching(pair) as (_, events):
            for address, dev in (("10.0.1.1", "wan1p"), ("10.0.2.1", "wan2p")):
                ip(pair.peer, "addr", "add", f"{address}/24", "dev", dev)
                await send_udp(pair.ns, address)  # answers at once: nothing to report
            await events.settle()
            assert events.queue.empty()
            # The gateway goes silent and its entry goes (flushed, as one aged out would be)...
            ip(pair.peer, "addr", "del", "10.0.1.1/24", "dev", "wan1p")
            ip(pair.ns, "neigh", "flush", "dev", "wan1")
            await send_udp(pair.ns, "10.0.1.1")  # unanswered: INCOMPLETE
            await events.settle()
            # ...then answers again.
            ip(pair.peer, "addr", "add", "10.0.1.1/24", "dev", "wan1p")
            for _ in range(20):  # each datagram asks again; bounded
                await send_udp(pair.ns, "10.0.1.1")
                await asyncio.sleep(0.2)
                if not events.queue.empty():
                    break
            event = await events.first_of(EventKind.NEIGHBOUR, "wan1")
            assert event.neighbour == "10.0.1.1"
            assert event.detail == "wan1: neighbour 10.0.1.1 answers ARP again"
            await send_udp(pair.ns, "10.0.1.1")
            await events.settle()  # once: it stays resolved
            left = []
            while not events.queue.empty():
                left.append(events.queue.get_nowait())
            assert [e for e in left if e.kind is EventKind.NEIGHBOUR] == []

    run(body)
