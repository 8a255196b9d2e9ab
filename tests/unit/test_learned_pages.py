"""GetLearned: one page per call, from a copy rebuilt at most once a second, whatever the table.

Issue 12: with 12,930 learned destinations each GetLearned cost about 100 ms in the event loop and
16 callers delayed a failover by seconds. The lab test (tests/integration/test_fastest_response.py)
measures a failover meanwhile; these check the bounds without a bus.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import ipaddress
from collections.abc import Callable, Coroutine
from typing import Any

from uplinkd import ctl
from uplinkd.datapath.backends.base import ApplyKind
from uplinkd.publish import bus, bus_api
from uplinkd.publish.status import LearnedDestination, Overall, Snapshot
from uplinkd.runtime.fastest import Entry, FastestResponse

from tests.fakes.backend import FakeBackend

from .test_fastest import WEB, Clock, plan

FIRST = ipaddress.IPv4Address("198.51.100.0")


class Controller:
    """The daemon's learned(): fastest-response's own list, over a large table."""

    def __init__(self, size: int) -> None:
        self.clock = Clock()
        spawned: list[Coroutine[Any, Any, None]] = []
        self.fastest = FastestResponse(FakeBackend(), spawned.append, clock=self.clock)
        self.fastest.listener = object()  # type: ignore[assignment]  # as if NFLOG were bound
        self.fastest.on_apply(plan({"ISP1", "ISP2"}), ApplyKind.FULL)
        expires = self.clock.now + 100
        self.fastest.learned[WEB] = {FIRST + i: Entry("ISP1", expires) for i in range(size)}
        self.built = 0

    def learned(self, offset: int, limit: int) -> tuple[list[LearnedDestination], int]:
        before = self.fastest._order_cache
        found = self.fastest.page(offset, limit)
        self.built += self.fastest._order_cache is not before
        return found


def get_learned(controller: Controller) -> Callable[[int, int], Any]:
    """The Manager's GetLearned handler (dbus-fast's wrapper gives its answer to the bus only)."""
    snapshot = Snapshot("0", "fastest-response", 0, Overall.ONLINE, ())
    manager = bus_api.ManagerInterface(bus.BusService(controller=controller), snapshot)
    handler = inspect.unwrap(bus_api.ManagerInterface.get_learned)
    return functools.partial(handler, manager)


def test_a_call_answers_one_page_however_large_the_table() -> None:
    controller = Controller(20_000)
    get = get_learned(controller)
    page, total = get(0, 0xFFFF_FFFF)
    assert (len(page), total) == (bus_api.LEARNED_PAGE_MAX, 20_000)
    assert page[0] == ("web", "198.51.100.0", "ISP1", 100)
    page, total = get(19_990, 10_000)
    assert [entry[1] for entry in page][-1] == str(FIRST + 19_999) and len(page) == 10
    assert get(20_000, 100) == ([], 20_000)
    assert get(0xFFFF_FFFF, 0xFFFF_FFFF) == ([], 20_000)
    assert get(5, 0) == ([], 20_000)  # the count alone


def test_the_list_is_rebuilt_at_most_once_a_second() -> None:
    controller = Controller(5_000)
    get = get_learned(controller)
    for _ in range(100):  # 100 callers within one second
        get(0, 100)
        controller.clock.now += 0.009
    assert controller.built == 1
    controller.clock.now += 0.2
    get(0, 100)
    assert controller.built == 2


class PagingClient:
    """What uplinkctl's Client.call does for GetLearned, served from a list of entries."""

    def __init__(self, entries: list[tuple[str, str, str, int]]) -> None:
        self.entries = entries
        self.calls: list[tuple[int, int]] = []

    async def call(self, member: str, sig: str = "", *body: Any) -> list[Any]:
        assert (member, sig) == ("GetLearned", "uu")
        offset, limit = body
        self.calls.append((offset, limit))
        end = offset + min(limit, bus_api.LEARNED_PAGE_MAX)
        return [self.entries[offset:end], len(self.entries)]


def test_uplinkctl_learned_reads_every_page() -> None:
    entries = [("web", str(FIRST + i), "ISP1", 60) for i in range(1234)]
    client = PagingClient(entries)
    assert asyncio.run(ctl.all_learned(client)) == entries  # type: ignore[arg-type]
    assert client.calls == [(offset, 100) for offset in range(0, 1300, 100)]
    empty = PagingClient([])
    assert asyncio.run(ctl.all_learned(empty)) == []  # type: ignore[arg-type]
    assert ctl.LEARNED_PAGE == bus_api.LEARNED_PAGE_MAX
