"""The coordinator with the fakes (issue 13): a fake backend behind the real datapath's
netfilter step, fixed facts, no kernel. Events in, transitions out, the kernel's state as the
backend holds it; the lab tests run the same paths for real."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, cast

import pytest
from pyroute2 import AsyncIPRoute
from uplinkd.config.model import Config
from uplinkd.datapath import conntrack
from uplinkd.datapath.backends import ApplyKind
from uplinkd.datapath.backends.base import Transaction
from uplinkd.errors import ApplyError, UnknownLinkError, UplinkdError
from uplinkd.monitor.link import LinkState, Transition
from uplinkd.planning.plan import Plan
from uplinkd.runtime.coordinator import Coordinator

from tests.fakes.backend import FakeBackend
from tests.fakes.facts import FixedFacts
from tests.fakes.probers import SilentProbers

from .test_prerun import FACTS, NetfilterOnly, config

__all__ = ["config"]  # the fixture

NO_SOCKET = cast(AsyncIPRoute, object())  # FixedFacts and NetfilterOnly never use it


class RefusingBackend(FakeBackend):
    """The fake backend whose kernel refuses every commit while `refuse` is set."""

    refuse = False

    def prepare(self, plan: Plan) -> Transaction:
        prepared = super().prepare(plan)
        if not self.refuse:
            return prepared

        def refused() -> None:
            raise ApplyError("nftables refused the transaction (nothing was applied): test")

        return Transaction(prepared.kind, _commit=refused)


@pytest.fixture(autouse=True)
def no_conntrack(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The marks whose connections were forgotten (no conntrack command in a unit test)."""
    forgotten: list[int] = []

    async def forget(mark: int, mask: int) -> int:
        forgotten.append(mark)
        return 0

    monkeypatch.setattr(conntrack, "forget_mark", forget)
    return forgotten


def run(
    config: Config,
    scenario: Callable[[Coordinator, RefusingBackend, list[Transition]], Awaitable[None]],
) -> None:
    backend = RefusingBackend()

    async def main() -> None:
        coordinator = Coordinator(config, NetfilterOnly(backend), fact_finder=FixedFacts(FACTS))
        coordinator._ipr = NO_SOCKET
        real = coordinator.probers
        coordinator.probers = SilentProbers(
            coordinator._on_round, real._on_hop_latency, coordinator._spawn, coordinator._retarget
        )
        seen: list[Transition] = []
        coordinator.listeners.append(seen.append)
        await coordinator._discover()
        coordinator._build_links({"DSL", "LTE"})
        await coordinator._apply()
        try:
            await asyncio.wait_for(scenario(coordinator, backend, seen), 10)
        finally:
            await coordinator.stop()

    asyncio.run(main())


async def applied(backend: FakeBackend, count: int) -> None:
    """Until the backend has committed `count` transactions (the coordinator coalesces)."""
    while len(backend.applies) < count:
        await asyncio.sleep(0.01)


def up_links(backend: FakeBackend) -> set[int]:
    assert backend.state is not None
    return set(backend.state.up_links)


def test_first_apply_puts_every_presumed_link_in_use(config: Config) -> None:
    async def scenario(c: Coordinator, backend: RefusingBackend, seen: list[Any]) -> None:
        assert backend.applies == [ApplyKind.FULL]
        assert up_links(backend) == {1, 2}
        assert c.generation == 1
        assert c.usable() == {"DSL", "LTE"}

    run(config, scenario)


def test_a_device_going_down_takes_its_link_out_and_forgets_its_connections(
    config: Config, no_conntrack: list[int]
) -> None:
    async def scenario(c: Coordinator, backend: RefusingBackend, seen: list[Any]) -> None:
        c.notify_device("wan2", "down")
        await applied(backend, 2)
        assert backend.applies[-1] is ApplyKind.MAPS
        assert up_links(backend) == {1}
        assert [(t.link, t.new) for t in seen] == [("LTE", LinkState.DOWN)]
        assert no_conntrack == [config.link_mark("LTE")]
        with pytest.raises(UnknownLinkError, match="no link uses device 'wan9'"):
            c.notify_device("wan9", "down")

    run(config, scenario)


def test_disabling_and_enabling_a_link(config: Config) -> None:
    async def scenario(c: Coordinator, backend: RefusingBackend, seen: list[Any]) -> None:
        c.set_enabled("DSL", False)
        await applied(backend, 2)
        assert c.links["DSL"].state is LinkState.DISABLED
        assert up_links(backend) == {2}
        c.set_enabled("DSL", True)  # back to init: its probes decide (none here)
        assert c.links["DSL"].state is LinkState.INIT
        with pytest.raises(UnknownLinkError, match="unknown link 'ADSL'"):
            c.set_enabled("ADSL", True)

    run(config, scenario)


def test_a_reload_removing_a_link_plans_without_it(config: Config) -> None:
    async def scenario(c: Coordinator, backend: RefusingBackend, seen: list[Any]) -> None:
        await c.reconfigure(replace(config, links=config.links[:1]))
        assert set(c.links) == {"DSL"}
        assert c.plan is not None
        assert [link.name for link in c.plan.links] == ["DSL"]
        assert backend.applies[-1] is ApplyKind.FULL  # one link fewer: a new structure

    run(config, scenario)


def test_a_reload_the_kernel_refuses_keeps_the_running_configuration(config: Config) -> None:
    async def scenario(c: Coordinator, backend: RefusingBackend, seen: list[Any]) -> None:
        generation = c.generation
        backend.refuse = True
        with pytest.raises(UplinkdError, match="nftables refused"):
            await c.reconfigure(replace(config, links=config.links[:1]))
        assert c.config is config
        assert set(c.links) == {"DSL", "LTE"}
        assert c.generation == generation
        assert isinstance(c.probers, SilentProbers)
        assert c.probers.probing == {"DSL", "LTE"}  # probing again, as before the reload
        backend.refuse = False
        c.set_enabled("LTE", False)  # the running configuration still applies
        await applied(backend, 2)
        assert up_links(backend) == {1}

    run(config, scenario)


def test_a_failed_apply_is_retried_until_the_kernel_takes_it(config: Config) -> None:
    async def scenario(c: Coordinator, backend: RefusingBackend, seen: list[Any]) -> None:
        backend.refuse = True
        c.set_enabled("LTE", False)
        await asyncio.sleep(0.3)  # the first attempt failed, retries wait APPLY_RETRY_S
        assert up_links(backend) == {1, 2}
        backend.refuse = False
        await applied(backend, 2)
        assert up_links(backend) == {1}

    run(config, scenario)
