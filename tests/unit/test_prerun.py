"""pre-run/ lines before a rebuild: the rebuild waits for them, a failover does not (issue 12).

The coordinator over the fake backend; the datapath's routes are left out (no kernel here), its
netfilter part and the decision to rebuild are the real ones. The lab test is
tests/integration/test_hook_isolation.py::test_a_pre_run_command_that_hangs_does_not_hold_up_failover.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest
from pyroute2 import AsyncIPRoute
from uplinkd import const
from uplinkd.config.model import Config, LanConfig, LinkConfig
from uplinkd.datapath import conntrack, routing
from uplinkd.datapath.apply import Datapath
from uplinkd.datapath.backends.base import ApplyKind
from uplinkd.hooks import stages
from uplinkd.monitor.link import LinkState
from uplinkd.planning.plan import HookLine, LinkFacts, Plan
from uplinkd.runtime.coordinator import Coordinator

from tests.fakes.backend import FakeBackend

FACTS = {
    "DSL": LinkFacts(
        "DSL", "wan1", ipaddress.IPv4Interface("10.0.1.2/24"), ipaddress.IPv4Address("10.0.1.1")
    ),
    "LTE": LinkFacts(
        "LTE", "wan2", ipaddress.IPv4Interface("10.0.2.2/24"), ipaddress.IPv4Address("10.0.2.1")
    ),
}
# Far longer than the test; killed at the command time limit, shortened to LIMIT_S here.
HANGING = "sleep 30"
LIMIT_S = 1.5
NO_SOCKET = cast(AsyncIPRoute, object())  # NetfilterOnly never uses it


class NetfilterOnly(Datapath):
    """The datapath without routes and sysctls: what a unit test can apply."""

    async def _apply_routing(
        self, ipr: AsyncIPRoute, plan: Plan
    ) -> tuple[routing.RoutingChanges, tuple[str, ...]]:
        return routing.RoutingChanges(), ()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(
        path=tmp_path / "uplinkd.toml",
        format="toml",
        links=(LinkConfig("DSL", "wan1"), LinkConfig("LTE", "wan2")),
        lans=(LanConfig("LAN", "lan0"),),
    )


def test_a_rebuild_waits_for_a_hanging_pre_run_line_and_a_failover_does_not(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def forgotten(mark: int, mask: int) -> int:
        return 0

    monkeypatch.setattr(conntrack, "forget_mark", forgotten)
    monkeypatch.setattr(const, "HOOK_TIMEOUT_S", LIMIT_S)
    backend = FakeBackend()

    async def scenario() -> None:
        coordinator = Coordinator(config, NetfilterOnly(backend))
        coordinator._ipr = NO_SOCKET
        coordinator.facts = dict(FACTS)
        coordinator._build_links({"DSL", "LTE"})
        await coordinator._apply()
        assert backend.applies == [ApplyKind.FULL]
        structure = backend.state.structure if backend.state else ""

        # A hook change that rebuilds, with a pre-run/ line that hangs.
        runner = coordinator.hook_runner
        line = HookLine("/h/firewall/01", 1, "add chain inet uplinkd mine")
        pre_run = stages.CommandLine("pre-run", "/h/pre-run/01", 1, HANGING)
        extras = replace(runner.state.extras, nft_lines=(line,))
        runner.state = stages.Hooks(extras, [pre_run])
        begin = time.monotonic()
        await asyncio.wait_for(coordinator._apply(), 0.5)  # the rebuild is left to pre-run/
        assert backend.state is not None and backend.state.structure == structure

        # Meanwhile a link is lost: its apply goes in at once, in the structure in the kernel.
        coordinator.set_enabled("LTE", False)
        assert coordinator.links["LTE"].state is LinkState.DISABLED
        while ApplyKind.MAPS not in backend.applies:
            assert time.monotonic() - begin < LIMIT_S, backend.applies
            await asyncio.sleep(0.01)
        assert backend.state.structure == structure
        assert backend.state.up_links == {1}  # DSL only
        assert not runner.pre_run_ready()  # the pre-run/ line is still running

        # Once it is done (killed at its limit), the rebuild goes in, with DSL alone.
        while backend.applies[-1] is not ApplyKind.FULL:
            assert time.monotonic() - begin < LIMIT_S + 5, backend.applies
            await asyncio.sleep(0.01)
        assert time.monotonic() - begin >= LIMIT_S
        assert backend.state.structure != structure
        assert backend.state.up_links == {1}
        assert runner.problems == (
            f"/h/pre-run/01:1: killed after {LIMIT_S:g} s, its time limit: {HANGING}",
        )
        assert not runner.pre_run_ready()  # the next rebuild runs them again
        await coordinator.stop()

    asyncio.run(scenario())


def test_at_start_the_first_ruleset_goes_in_after_the_pre_run_lines(
    config: Config, tmp_path: Path
) -> None:
    backend = FakeBackend()
    ran = tmp_path / "ran"

    async def scenario() -> None:
        coordinator = Coordinator(config, NetfilterOnly(backend))
        coordinator._ipr = NO_SOCKET
        coordinator.facts = dict(FACTS)
        coordinator._build_links({"DSL", "LTE"})
        pre_run = stages.CommandLine("pre-run", "/h/pre-run/01", 1, f"sleep 0.3; touch {ran}")
        coordinator.hook_runner.state = stages.Hooks(commands=[pre_run])
        assert await coordinator._apply() is None  # nothing in the kernel to keep meanwhile
        assert backend.applies == []
        report = await asyncio.wait_for(coordinator._rebuild_after_pre_run(), 10)
        assert ran.exists()
        assert backend.applies[0] is ApplyKind.FULL
        assert report is not None
        await coordinator.stop()

    asyncio.run(scenario())
