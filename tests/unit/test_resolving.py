"""Probe target host names, resolved while the daemon runs (monitor/resolver.py, probers.py)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import threading
from collections.abc import Coroutine
from typing import Any

import pytest
from uplinkd.config.model import LinkConfig
from uplinkd.monitor import resolver
from uplinkd.monitor.probers import Probers, probe_targets

ADDRESS = ipaddress.IPv4Address("203.0.113.10")


class Dns:
    """A resolver the test controls: a name fails with `error` until `answers` holds it."""

    def __init__(self) -> None:
        self.answers: dict[str, ipaddress.IPv4Address] = {}
        self.error = "[Errno -3] Temporary failure in name resolution"
        self.asked: list[str] = []

    async def resolve(self, host: str) -> ipaddress.IPv4Address:
        self.asked.append(host)
        await asyncio.sleep(0)
        if host not in self.answers:
            raise OSError(self.error)
        return self.answers[host]


class Tasks:
    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        self.tasks.add(asyncio.create_task(coroutine))

    async def cancel(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(resolver, "RETRY_FIRST_S", 0.001)
    monkeypatch.setattr(resolver, "RETRY_MAX_S", 0.004)


async def wait_for(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


def test_targets_count_only_resolved_names_and_wait_for_reliability() -> None:
    link = LinkConfig(
        "ISP1", "wan1", targets=("a.example", ipaddress.IPv4Address("1.1.1.1")), reliability=2
    )
    assert probe_targets(link, None) == []  # 1 of 2 has an address: the link waits in init
    assert probe_targets(link, None, {"a.example": ADDRESS}.get) == ["203.0.113.10", "1.1.1.1"]
    one = LinkConfig("ISP1", "wan1", targets=("a.example", "b.example"), reliability=1)
    assert probe_targets(one, None, {"b.example": ADDRESS}.get) == ["203.0.113.10"]
    same = {"a.example": ADDRESS, "b.example": ADDRESS}.get
    assert probe_targets(one, None, same) == ["203.0.113.10"]  # one address, probed once


def test_a_link_stays_without_targets_until_its_name_resolves(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dns = Dns()
    link = LinkConfig("ISP1", "wan1", targets=("inet.example",))
    changed: list[str] = []

    async def main() -> None:
        tasks = Tasks()
        probers = Probers(
            lambda r: None, lambda n, v: None, tasks.spawn, changed.append, resolve=dns.resolve
        )
        try:
            assert probers.targets(link, None) == []
            await wait_for(lambda: len(dns.asked) >= 3)  # retried, with backoff
            assert changed == ["ISP1"]  # the reason it waits is known: once, not per retry
            assert probers.targets(link, None) == []
            dns.answers["inet.example"] = ADDRESS
            await wait_for(lambda: len(changed) == 2)
            assert probers.targets(link, None) == ["203.0.113.10"]
            asked = len(dns.asked)
            await asyncio.sleep(0.02)
            assert len(dns.asked) == asked  # resolved: no more lookups
        finally:
            await tasks.cancel()

    with caplog.at_level("INFO", logger="uplinkd"):
        asyncio.run(main())
    said = caplog.text
    assert said.count("does not resolve (") == 1, said
    assert "inet.example does not resolve ([Errno -3] Temporary failure" in said
    assert "link ISP1: stays init, probe target names do not resolve yet: inet.example" in said
    assert "probe target inet.example resolves to 203.0.113.10" in said
    assert "link ISP1: probing 203.0.113.10" in said


def test_a_name_no_longer_configured_is_no_longer_retried() -> None:
    dns = Dns()
    wanted = {"gone.example"}

    async def main() -> None:
        tasks = Tasks()
        names = resolver.Resolver(
            tasks.spawn, lambda host: None, resolve=dns.resolve, wanted=wanted.__contains__
        )
        try:
            assert names.address("gone.example") is None
            await wait_for(lambda: len(dns.asked) >= 2)
            wanted.clear()
            await wait_for(lambda: all(task.done() for task in tasks.tasks))
        finally:
            await tasks.cancel()

    asyncio.run(main())


def test_resolution_runs_off_the_event_loop_and_times_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """getaddrinfo blocks (a DNS server that does not answer): the loop must go on meanwhile."""
    release = threading.Event()

    def stuck_getaddrinfo(*args: object, **kwargs: object) -> object:
        release.wait(10)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", stuck_getaddrinfo)

    async def main() -> int:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        task = asyncio.create_task(ticker())
        try:
            with pytest.raises(OSError, match=r"no answer within 0\.3 s"):
                await resolver.resolve_ipv4("stuck.example", timeout=0.3)
        finally:
            task.cancel()
            release.set()
        return ticks

    assert asyncio.run(main()) >= 5  # the loop ran other work while the lookup hung


def test_the_real_resolver_answers_addresses_without_dns() -> None:
    found = asyncio.run(resolver.resolve_ipv4("127.0.0.1"))
    assert found == ipaddress.IPv4Address("127.0.0.1")
