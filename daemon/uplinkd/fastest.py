"""fastest-response: race a new destination over the rule's links; the first answer wins.

The kernel reports (NFLOG) the first TCP connection to a destination the rule has not learned
and meanwhile sends it by the rule's weighted buckets. The daemon then connects to the same
address and port through each of the rule's links in use, at once (SO_MARK selects the link's
routing table, the link's address is the source). The first link to be answered, by a SYN-ACK
or a reset (either shows the destination is reachable that way, and how fast), is written into
the rule's map of learned destinations with the rule's `cache_seconds` as timeout, and new
connections to that destination follow it. The kernel forgets the entry by itself: a daemon that
dies leaves a datapath that falls back to the buckets.

A link still silent LOSER_GRACE_S after the winner answered is taken as unable to reach the
destination: a client's connection attempt that went that way and is still unanswered is deleted
from conntrack, so its next SYN (TCP retries after 1 s) is classified again and takes the winner.

When links come and go, the learned destinations of a link no longer in use are dropped from the
kernel with the next apply; a rebuilt ruleset gets the still valid ones back.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import struct
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Any, Final

from . import conntrack, const
from .backends.base import ApplyKind, Backend, Learned
from .errors import UplinkdError
from .nflog import LoggedPacket, NflogError, NflogListener
from .plan import Dispatch, Plan

log = logging.getLogger("uplinkd")

SO_MARK: Final = getattr(socket, "SO_MARK", 36)
# How long the other links may still answer after the first did before they count as silent.
LOSER_GRACE_S: Final = 0.5
# Races at once; a destination reported beyond this is left to the buckets (and reported again
# after FASTEST_PENDING_S), so a scan of many addresses cannot make the daemon open sockets
# without bound.
MAX_RACES: Final = 64

Spawn = Callable[[Coroutine[Any, Any, None]], None]


@dataclass(frozen=True)
class Contender:
    name: str
    mark: int
    source: IPv4Address


@dataclass(frozen=True)
class RaceResult:
    answered: dict[str, float]  # link name -> seconds until its answer

    @property
    def winner(self) -> str | None:
        return min(self.answered, key=self.answered.__getitem__, default=None)


async def race(
    address: IPv4Address,
    port: int,
    contenders: Sequence[Contender],
    *,
    timeout: float = const.FASTEST_RACE_TIMEOUT_S,
    grace: float = LOSER_GRACE_S,
) -> RaceResult:
    """Connect to address:port through every contender at once; wait for the first answer,
    then up to `grace` for the others (all within `timeout`)."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    answered: dict[str, float] = {}

    async def attempt(contender: Contender) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(0.0)  # non-blocking, for asyncio
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, contender.mark)
            # Close with a reset: the race must not leave connections in TIME_WAIT behind.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.bind((str(contender.source), 0))
            with contextlib.suppress(ConnectionRefusedError):  # a reset is an answer too
                await loop.sock_connect(sock, (str(address), port))
            answered[contender.name] = loop.time() - start
        except OSError:
            pass  # unreachable that way (or no longer usable): no answer
        finally:
            sock.close()

    tasks = {asyncio.create_task(attempt(contender)) for contender in contenders}
    deadline = start + timeout
    pending = tasks
    try:
        while pending and not answered and loop.time() < deadline:
            _, pending = await asyncio.wait(
                pending, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
            )
        if pending and answered:
            _, pending = await asyncio.wait(
                pending, timeout=max(0.0, min(grace, deadline - loop.time()))
            )
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return RaceResult(dict(answered))


@dataclass(frozen=True)
class LearnedDestination:
    """One destination a rule learned, as uplinkctl and D-Bus show it."""

    rule: str
    address: str
    link: str
    seconds_left: int


@dataclass(frozen=True)
class Entry:
    link: str
    expires: float  # on the clock


class FastestResponse:
    """Hears of new destinations, races them and keeps what each fastest-response rule learned."""

    def __init__(
        self,
        backend: Backend,
        spawn: Spawn,
        *,
        clock: Callable[[], float] = time.monotonic,
        group: int = const.FASTEST_NFLOG_GROUP,
    ) -> None:
        self.backend = backend
        self.spawn = spawn
        self.clock = clock
        self.group = group
        self.plan: Plan | None = None
        self.learned: dict[str, dict[IPv4Address, Entry]] = {}  # rule's dispatch name -> ...
        self.racing: set[tuple[str, IPv4Address]] = set()
        self.listener: NflogListener | None = None

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def on_apply(self, plan: Plan, kind: ApplyKind) -> None:
        """Follow an applied plan: listen while a rule needs it, drop what a link no longer in
        use won, and give a rebuilt ruleset the destinations still valid."""
        self.plan = plan
        rules = {d.name: d for d in plan.dispatches if d.cache_s is not None}
        if rules and self.listener is None:
            self._listen()
        elif not rules:
            self.close()
        self.learned = {name: self.learned.get(name, {}) for name in rules}
        if kind is ApplyKind.NONE:
            return
        now = self.clock()
        for name, dispatch in rules.items():
            live = {link.name: link.id for link in plan.links if link.id in dispatch.live}
            kept = {
                address: entry
                for address, entry in self.learned[name].items()
                if entry.expires > now and entry.link in live
            }
            self.learned[name] = kept
            entries = {a: Learned(live[e.link], e.expires - now) for a, e in kept.items()}
            try:
                self.backend.learn(name, entries, replace=True)
            except UplinkdError as exc:
                log.error("rule %s: cannot restore its learned destinations: %s", name, exc)

    def destinations(self) -> list[LearnedDestination]:
        """What each rule has learned and not yet forgotten, by rule then address."""
        now, plan = self.clock(), self.plan
        rules = {d.name: d.rule for d in plan.dispatches} if plan else {}
        found = [
            LearnedDestination(
                rules.get(name, name), str(address), e.link, math.ceil(e.expires - now)
            )
            for name, entries in self.learned.items()
            for address, e in sorted(entries.items())
            if e.expires > now
        ]
        return sorted(found, key=lambda d: d.rule)

    def _listen(self) -> None:
        listener = NflogListener(self.group, self.on_packet)
        try:
            listener.open()
        except NflogError as exc:
            log.error(
                "fastest-response cannot hear of new destinations (%s); its rules use their "
                "weighted fallback",
                exc,
            )
            return
        self.listener = listener
        self.spawn(listener.run())

    def on_packet(self, packet: LoggedPacket) -> None:
        """A rule's first connection to a destination it has not learned: race it."""
        name = packet.prefix.removeprefix(const.FASTEST_LOG_PREFIX)
        plan = self.plan
        dispatch = next((d for d in plan.dispatches if d.name == name), None) if plan else None
        if plan is None or dispatch is None or dispatch.cache_s is None or not packet.dport:
            return
        key = (name, packet.dst)
        if key in self.racing or len(self.racing) >= MAX_RACES:
            return
        self.racing.add(key)
        self.spawn(self._race(plan, dispatch, packet.dst, packet.dport))

    async def _race(self, plan: Plan, dispatch: Dispatch, address: IPv4Address, port: int) -> None:
        try:
            links = [link for link in plan.links if link.id in dispatch.live]
            if len(links) < 2:
                return  # nothing to choose: the buckets already send it the only way there is
            contenders = [Contender(link.name, link.mark, link.address.ip) for link in links]
            result = await race(address, port, contenders)
            self._learn(dispatch, address, result)
            for link in links if result.winner else []:
                if link.name not in result.answered:
                    await conntrack.forget_unanswered(str(address), port, link.mark, plan.mark_mask)
        except UplinkdError as exc:
            log.error("rule %s: racing %s:%d failed: %s", dispatch.rule, address, port, exc)
        finally:
            self.racing.discard((dispatch.name, address))

    def _learn(self, dispatch: Dispatch, address: IPv4Address, result: RaceResult) -> None:
        times = ", ".join(
            f"{name} {s * 1000:.0f} ms" for name, s in sorted(result.answered.items())
        )
        winner = result.winner
        plan = self.plan
        current = (
            next((d for d in plan.dispatches if d.name == dispatch.name), None) if plan else None
        )
        if winner is None or plan is None or current is None or current.cache_s is None:
            log.debug("rule %s: no link answered %s", dispatch.rule, address)
            return
        link = next((link for link in plan.links if link.name == winner), None)
        if link is None or link.id not in current.live:  # went down (or away) while racing
            return
        seconds = float(current.cache_s)
        self.backend.learn(dispatch.name, {address: Learned(link.id, seconds)}, replace=False)
        self.learned.setdefault(dispatch.name, {})[address] = Entry(winner, self.clock() + seconds)
        log.debug("rule %s: %s via %s (%s)", dispatch.rule, address, winner, times)
