"""DryRun's text: the plan in force, rendered once per plan however often it is asked for
(any local user may call DryRun; issue 12: every bus method's cost bounded)."""

from __future__ import annotations

import asyncio

from uplinkd.config.model import Config
from uplinkd.planning.plan import Plan
from uplinkd.runtime.coordinator import Coordinator

from tests.fakes.backend import FakeBackend

from .test_prerun import FACTS, NO_SOCKET, NetfilterOnly, config

__all__ = ["config"]


class CountingBackend(FakeBackend):
    def __init__(self) -> None:
        super().__init__()
        self.renders = 0

    def render(self, plan: Plan) -> str:
        self.renders += 1
        return super().render(plan)


def test_dry_run_shows_the_plan_in_force_and_renders_each_plan_once(config: Config) -> None:
    backend = CountingBackend()

    async def scenario() -> None:
        coordinator = Coordinator(config, NetfilterOnly(backend))
        coordinator._ipr = NO_SOCKET
        assert coordinator.dry_run() == "# nothing applied yet\n"
        coordinator.facts = dict(FACTS)
        coordinator._build_links({"DSL", "LTE"})
        await coordinator._apply()
        first = coordinator.plan
        both = coordinator.dry_run()
        renders = backend.renders
        assert [coordinator.dry_run() for _ in range(100)] == [both] * 100
        assert backend.renders == renders  # asked 100 times, rendered once

        coordinator.set_enabled("LTE", False)  # a new plan: DryRun follows it
        for _ in range(500):
            if coordinator.plan is not first:
                break
            await asyncio.sleep(0.01)
        assert coordinator.plan is not None and coordinator.plan is not first
        one = coordinator.dry_run()
        assert one == coordinator.datapath.render(coordinator.plan)
        assert coordinator.dry_run() == one
        assert backend.renders == renders + 2  # once for DryRun, once just above
        await coordinator.stop()

    asyncio.run(scenario())
