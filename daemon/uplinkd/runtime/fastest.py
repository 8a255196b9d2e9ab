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

A LAN client decides what is reported, so every race is bounded: the kernel reports only
connections the forward filter let through (datapath/backends/nftables.py) and at most a set's
size of them per FASTEST_PENDING_S; the daemon races at most the rule's `races_per_second` (a token
bucket), MAX_RACES at once, never a destination of the links' own networks or gateways nor, unless
the rule sets `race_private`, one outside the global Internet (NON_GLOBAL); it keeps at most
`max_learned` destinations per rule, as the kernel's map does. What it declined is counted and
logged once per SUMMARY_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import struct
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Any, Final

from .. import const
from ..datapath import conntrack
from ..datapath.backends.base import ApplyKind, Backend, Learned
from ..datapath.nflog import LoggedPacket, NflogError, NflogListener
from ..errors import UplinkdError
from ..planning.plan import Dispatch, Plan
from ..publish.status import LearnedDestination

log = logging.getLogger("uplinkd")

# How long the other links may still answer after the first did before they count as silent.
LOSER_GRACE_S: Final = 0.5
# Races at once; a destination reported beyond this is left to the buckets (and reported again
# after FASTEST_PENDING_S), so a scan of many addresses cannot make the daemon open sockets
# without bound.
MAX_RACES: Final = 64
# Destinations not raced unless a rule sets race_private: the IANA special-purpose ranges that are
# not globally reachable (RFC 6890 and its updates), so a LAN client cannot make the router
# connect into its own, its ISP's or a reserved network.
NON_GLOBAL: Final = tuple(
    IPv4Network(prefix)
    for prefix in (
        "0.0.0.0/8",  # this network
        "10.0.0.0/8",  # private (RFC 1918)
        "100.64.0.0/10",  # shared address space: the ISP's carrier-grade NAT
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local
        "172.16.0.0/12",  # private
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # documentation (TEST-NET-1)
        "192.168.0.0/16",  # private
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # documentation (TEST-NET-2)
        "203.0.113.0/24",  # documentation (TEST-NET-3)
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the limited broadcast address
    )
)
# How often what was not raced (rate limit, busy, excluded, full) is summed up in the log.
SUMMARY_S: Final = 10.0
# The order of the learned destinations that GetLearned pages through is taken at most this
# often: its cost grows with the table (about 6 ms for 65536), a page's does not.
DESTINATIONS_MAX_AGE_S: Final = 1.0

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
            sock.setsockopt(socket.SOL_SOCKET, const.SO_MARK, contender.mark)
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


class TokenBucket:
    """At most `rate` a second on average and `burst` at once: take() says whether one may go."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def take(self, now: float) -> bool:
        elapsed = max(0.0, now - self.updated)  # a clock that steps back gives nothing
        self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
        self.updated = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def excluded_networks(plan: Plan, dispatch: Dispatch) -> tuple[IPv4Network, ...]:
    """What a rule never races: its links' own networks and gateways (the ISP's box), and
    NON_GLOBAL unless the rule sets race_private."""
    own = [link.address.network for link in plan.links]
    own += [IPv4Network(link.gateway) for link in plan.links if link.gateway is not None]
    return (*own, *(() if dispatch.race_private else NON_GLOBAL))


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
        # rule's dispatch name -> address -> entry, in the order learned (so, for one rule's
        # constant cache_seconds, in the order they expire)
        self.learned: dict[str, dict[IPv4Address, Entry]] = {}
        self.racing: set[tuple[str, IPv4Address]] = set()
        self.listener: NflogListener | None = None
        self.buckets: dict[str, TokenBucket] = {}  # rule's dispatch name -> its races' bucket
        self.excluded: dict[str, tuple[IPv4Network, ...]] = {}
        # (rule's configured name, why) -> destinations not raced or not learned since the last
        # summary; "raced" counts the races started.
        self.counts: Counter[tuple[str, str]] = Counter()
        self.totals: Counter[str] = Counter()  # the same since start, by why
        self._summarized = clock()
        self._order_cache: tuple[float, list[tuple[str, IPv4Address]]] | None = None

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    def on_apply(self, plan: Plan, kind: ApplyKind) -> None:
        """Follow an applied plan: listen while a rule needs it, drop what a link no longer in
        use won, and give a rebuilt ruleset the destinations still valid."""
        self.plan = plan
        if kind is not ApplyKind.NONE:  # links, or rules, changed: GetLearned's order too
            self._order_cache = None
        rules = {d.name: d for d in plan.dispatches if d.cache_s is not None}
        if rules and self.listener is None:
            self._listen()
        elif not rules:
            self.close()
        self.learned = {name: self.learned.get(name, {}) for name in rules}
        self.excluded = {name: excluded_networks(plan, d) for name, d in rules.items()}
        now = self.clock()
        buckets = {}
        for name, dispatch in rules.items():
            rate = float(dispatch.races_per_second)
            bucket = self.buckets.get(name)
            if bucket is None or bucket.rate != rate:
                bucket = TokenBucket(rate, max(1.0, rate), now)  # a second's worth at once
            buckets[name] = bucket
        self.buckets = buckets
        if kind is ApplyKind.NONE:
            return
        for name, dispatch in rules.items():
            live = {link.name: link.id for link in plan.links if link.id in dispatch.live}
            before = self.learned[name]
            valid = [
                (address, entry)
                for address, entry in before.items()
                if entry.expires > now and entry.link in live
            ]
            # A smaller max_learned after a reload keeps the most recently learned.
            kept = dict(valid[max(0, len(valid) - dispatch.max_learned) :])
            self.learned[name] = kept
            entries = {a: Learned(live[e.link], e.expires - now) for a, e in kept.items()}
            try:
                if kind is ApplyKind.FULL:  # a new table: its maps are empty
                    self.backend.learn(name, entries, replace=True)
                    continue
                # The same table: only what a link no longer in use won goes (what the kernel
                # timed out itself is not asked for), not a rewrite of the whole map.
                gone = [a for a, e in before.items() if a not in kept and e.expires > now]
                if gone:
                    try:
                        self.backend.learn(name, {}, replace=False, forget=gone)
                    except UplinkdError:  # one timed out in the kernel meanwhile
                        self.backend.learn(name, entries, replace=True)
            except UplinkdError as exc:
                log.error("rule %s: cannot restore its learned destinations: %s", name, exc)

    def destinations(self) -> list[LearnedDestination]:
        """What each rule has learned and not yet forgotten, by rule then address."""
        return self.page(0, len(self._order()))[0]

    def page(self, offset: int, limit: int) -> tuple[list[LearnedDestination], int]:
        """Up to `limit` of destinations() from `offset`, and how many there are in all.

        A page costs its length: the order is taken at most every DESTINATIONS_MAX_AGE_S (and
        after an apply that changed the kernel), so pages asked within it come from one list;
        an entry forgotten since is left out of its page.
        """
        order, now = self._order(), self.clock()
        plan = self.plan
        rules = {d.name: d.rule for d in plan.dispatches} if plan else {}
        found = []
        for name, address in order[offset : offset + limit]:
            entry = self.learned.get(name, {}).get(address)
            if entry is not None and entry.expires > now:
                left = math.ceil(entry.expires - now)
                found.append(
                    LearnedDestination(rules.get(name, name), str(address), entry.link, left)
                )
        return found, len(order)

    def _order(self) -> list[tuple[str, IPv4Address]]:
        """(rule's dispatch name, address) of every destination learned, by rule then address;
        rebuilt at most every DESTINATIONS_MAX_AGE_S."""
        now, cached = self.clock(), self._order_cache
        if cached is not None and 0 <= now - cached[0] < DESTINATIONS_MAX_AGE_S:
            return cached[1]
        plan = self.plan
        rules = {d.name: d.rule for d in plan.dispatches} if plan else {}
        order = []
        for name in sorted(self.learned, key=lambda name: rules.get(name, name)):
            live = [address for address, e in self.learned[name].items() if e.expires > now]
            live.sort(key=int)  # int keys: comparing IPv4Address objects costs more
            order += [(name, address) for address in live]
        self._order_cache = (now, order)
        return order

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
        """A rule's first connection to a destination it has not learned: race it, within the
        rule's bounds."""
        name = packet.prefix.removeprefix(const.FASTEST_LOG_PREFIX)
        plan = self.plan
        dispatch = next((d for d in plan.dispatches if d.name == name), None) if plan else None
        if plan is None or dispatch is None or dispatch.cache_s is None or not packet.dport:
            return
        key, now = (name, packet.dst), self.clock()
        learned = self.learned.get(name, {}).get(packet.dst)
        if key in self.racing or (learned is not None and learned.expires > now):
            return
        why = self._refusal(name, packet.dst, now)
        self._count(dispatch.rule, why or "raced", now)
        if why is None:
            self.racing.add(key)
            self.spawn(self._race(plan, dispatch, packet.dst, packet.dport))

    def _refusal(self, name: str, address: IPv4Address, now: float) -> str | None:
        """Why a destination reported for a rule is not raced now; None: race it."""
        if any(address in network for network in self.excluded.get(name, ())):
            return "excluded"
        if len(self.racing) >= MAX_RACES:
            return "busy"
        bucket = self.buckets.get(name)
        if bucket is None or not bucket.take(now):
            return "rate limit"
        return None

    def _count(self, rule: str, why: str, now: float) -> None:
        """Count a decision; at most every SUMMARY_S, log what was not raced or learned."""
        self.counts[rule, why] += 1
        self.totals[why] += 1
        if now - self._summarized < SUMMARY_S:
            return
        elapsed, self._summarized = now - self._summarized, now
        by_rule: dict[str, list[str]] = {}
        for (counted_rule, reason), count in sorted(self.counts.items()):
            by_rule.setdefault(counted_rule, []).append(f"{count} {reason}")
        self.counts.clear()
        for counted_rule, parts in by_rule.items():
            if parts != [p for p in parts if p.endswith(" raced")]:
                log.info(
                    "rule %s: new destinations in the last %.0f s: %s (not raced nor learned "
                    "ones use the weighted buckets)",
                    counted_rule,
                    elapsed,
                    ", ".join(parts),
                )

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
        now = self.clock()
        entries = self.learned.setdefault(dispatch.name, {})
        while entries:  # forget what expired, oldest first
            first = next(iter(entries))
            if entries[first].expires > now:
                break
            del entries[first]
        if address not in entries and len(entries) >= current.max_learned:
            self._count(dispatch.rule, "not learned: table full", now)
            return
        seconds = float(current.cache_s)
        try:
            self.backend.learn(dispatch.name, {address: Learned(link.id, seconds)}, replace=False)
        except UplinkdError as exc:
            # The kernel's map is full too (its expired entries are collected a little later
            # than the daemon's) or gone: the destination keeps using the buckets.
            entries.pop(address, None)
            self._count(dispatch.rule, "not learned: kernel refused", now)
            log.debug("rule %s: %s not learned: %s", dispatch.rule, address, exc)
            return
        entries.pop(address, None)  # learned again: it moves to the end, with its new expiry
        entries[address] = Entry(winner, self.clock() + seconds)
        log.debug("rule %s: %s via %s (%s)", dispatch.rule, address, winner, times)
