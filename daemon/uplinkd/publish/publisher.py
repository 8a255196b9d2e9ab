"""Where the link machines' transitions go once logged: in-process listeners (the D-Bus adapter),
event hooks and email; the last two get the link as it was at the transition."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from .. import const
from ..config.model import LinkConfig
from ..hooks.events import EventHooks, LinkEvent
from ..monitor.link import Link, Transition
from ..planning.plan import LinkFacts
from .mail import Mailer

TransitionListener = Callable[[Transition], None]


class Publisher:
    """Where the link machines' transitions go once logged: to the listeners (the D-Bus
    adapter), the event hooks and mail, none of which may hold up the caller."""

    def __init__(self, events: EventHooks | None = None, mailer: Mailer | None = None) -> None:
        self.listeners: list[TransitionListener] = []
        self.events = events
        self.mailer = mailer

    def publish(
        self,
        transition: Transition,
        link_config: LinkConfig,
        fact: LinkFacts | None,
        machine: Link,
    ) -> None:
        """Tell everyone; `machine` is the link's state machine, `fact` what it has if known."""
        for listener in self.listeners:
            listener(transition)
        if self.events is None and self.mailer is None:
            return
        event = LinkEvent.from_transition(
            transition,
            device=link_config.device,
            source=str(fact.address.ip) if fact else "",
            warn_email=link_config.monitor.warn_email,
            stats=machine.stats(),
        )
        if self.events is not None:
            self.events.fire(event)
        if self.mailer is not None:
            self.mailer.notify(event)

    async def drain(self, timeout: float = const.SHUTDOWN_DRAIN_S) -> None:
        """At stop: give the hooks and mail still running `timeout` (together) to finish, then
        cut them (background.Background.drain); the stop never waits longer than
        timeout + SHUTDOWN_CUT_S on them."""
        sinks = [sink for sink in (self.events, self.mailer) if sink is not None]
        await asyncio.gather(*(sink.drain(timeout) for sink in sinks))
