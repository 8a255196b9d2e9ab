"""Host names of probe targets, resolved while the daemon runs, never when reading the file.

A router often starts before its DNS works (the resolver may even sit behind the uplinks uplinkd
is about to set up), so a name that does not resolve is no configuration error: its link waits
in `init` while the name is retried with backoff. Resolution runs in a thread of its own with a
timeout (getaddrinfo blocks), so a slow DNS server never delays probing or failover of the other
links, nor the daemon's stop. A name that resolved keeps its address for the life of the
daemon, as foolsm kept the checkip it resolved at start.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Final

from ..background import in_daemon_thread

log = logging.getLogger("uplinkd")

# glibc tries each name server for 5 s, twice: 10 s bounds one attempt with one server.
RESOLVE_TIMEOUT_S: Final = 10.0
# Retries start fast (DNS often comes up seconds after the links) and back off to a pace that
# costs nothing while a name stays unresolvable (a typo, or DNS down for good).
RETRY_FIRST_S: Final = 1.0
RETRY_MAX_S: Final = 30.0

ResolveFn = Callable[[str], Awaitable[ipaddress.IPv4Address]]


async def resolve_ipv4(host: str, timeout: float = RESOLVE_TIMEOUT_S) -> ipaddress.IPv4Address:
    """The first IPv4 address of host; raises OSError (also on timeout) when there is none."""

    def lookup() -> list[tuple[Any, ...]]:
        return socket.getaddrinfo(host, None, family=socket.AF_INET, type=socket.SOCK_DGRAM)

    try:
        found = await asyncio.wait_for(in_daemon_thread(lookup, "uplinkd-resolve"), timeout)
    except TimeoutError:
        raise OSError(f"no answer within {timeout:g} s") from None
    return ipaddress.IPv4Address(found[0][4][0])


def describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


class Resolver:
    """The addresses of host names: known at once once resolved, else resolved in a task that
    retries until it succeeds or the name is no longer wanted.

    `on_change(host)` is called when a name resolves, and when the reason it does not changes
    (so that what waits for it can say why)."""

    def __init__(
        self,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
        on_change: Callable[[str], None],
        *,
        resolve: ResolveFn = resolve_ipv4,
        wanted: Callable[[str], bool] = lambda host: True,
    ) -> None:
        self._spawn = spawn
        self._on_change = on_change
        self._resolve = resolve
        self._wanted = wanted
        self._addresses: dict[str, ipaddress.IPv4Address] = {}
        self._errors: dict[str, str] = {}  # host -> why it does not resolve (yet)
        self._running: set[str] = set()  # hosts with a resolving task

    def address(self, host: str) -> ipaddress.IPv4Address | None:
        """The address host resolved to; None while it does not (resolving starts, if needed)."""
        address = self._addresses.get(host)
        if address is None and host not in self._running:
            self._running.add(host)
            self._spawn(self._resolve_until_found(host))
        return address

    def error(self, host: str) -> str | None:
        """Why host has no address yet; None when it has one or no attempt has ended yet."""
        return self._errors.get(host)

    async def _resolve_until_found(self, host: str) -> None:
        delay = RETRY_FIRST_S
        try:
            while self._wanted(host):
                try:
                    address = await self._resolve(host)
                except (OSError, ValueError, UnicodeError) as exc:
                    why = describe(exc)
                    if self._errors.get(host) != why:
                        self._errors[host] = why
                        log.warning(
                            "probe target %s does not resolve (%s); retrying, at most every %g s",
                            host,
                            why,
                            RETRY_MAX_S,
                        )
                        self._on_change(host)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX_S)
                    continue
                self._addresses[host] = address
                self._errors.pop(host, None)
                log.info("probe target %s resolves to %s", host, address)
                self._on_change(host)
                return
        finally:
            self._running.discard(host)
