"""Hop latency: TTL-limited probes through a link, for the lowest-latency method.

Every interval an echo request with TTL 2 and one with TTL 3 leave through the link (its mark
and source address, like the link probes) towards its first probe target; the routers 2 and 3
hops away answer with ICMP time exceeded. Their round-trip times, averaged and smoothed, are the
link's latency as far as its ISP's network reaches, without depending on a far server.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import socket
import struct
import time
from collections.abc import Callable

from .. import const

log = logging.getLogger("uplinkd")

ICMP_ECHO_REPLY = 0
ICMP_TIME_EXCEEDED = 11
ICMP_ECHO_REQUEST = 8
HOP_TTLS = (2, 3)
# Weight of a new round in the smoothed latency: about a 4-round memory.
SMOOTHING = 0.3

_ids = itertools.count(random.randrange(0x1000, 0x8000))  # noqa: S311 - an id, not a secret


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def echo_request(ident: int, sequence: int) -> bytes:
    header = struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, 0, ident, sequence)
    payload = b"uplinkd-hop"
    return (
        struct.pack("!BBHHH", ICMP_ECHO_REQUEST, 0, checksum(header + payload), ident, sequence)
        + payload
    )


def parse_reply(packet: bytes) -> tuple[int, int] | None:
    """(ident, sequence) of the echo request an ICMP packet (with its IP header) answers."""
    if len(packet) < 20:
        return None
    icmp = packet[(packet[0] & 0x0F) * 4 :]
    if len(icmp) < 8:
        return None
    kind = icmp[0]
    if kind == ICMP_ECHO_REPLY:
        ident, sequence = struct.unpack("!HH", icmp[4:8])
        return ident, sequence
    if kind == ICMP_TIME_EXCEEDED and len(icmp) >= 8 + 20 + 8:
        inner = icmp[8:]
        original = inner[(inner[0] & 0x0F) * 4 :]
        if len(original) >= 8 and original[0] == ICMP_ECHO_REQUEST:
            ident, sequence = struct.unpack("!HH", original[4:8])
            return ident, sequence
    return None


class HopProber:
    """Reports a link's smoothed hop latency (ms, or None while nothing answers) each round."""

    def __init__(
        self,
        link: str,
        target: str,
        source: str,
        mark: int,
        on_sample: Callable[[str, float | None], None],
        *,
        interval_s: float = 1.0,
        timeout_s: float = 1.0,
    ) -> None:
        self.link, self.target, self.source, self.mark = link, target, source, mark
        self.on_sample = on_sample
        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.ident = next(_ids) & 0xFFFF
        self.latency_ms: float | None = None
        self._sequence = itertools.count(1)
        self._waiting: dict[int, tuple[float, asyncio.Future[float]]] = {}
        self._stopped = False

    def update(self, *, target: str | None = None, source: str | None = None) -> None:
        self.target = target or self.target
        self.source = source or self.source

    def stop(self) -> None:
        self._stopped = True

    def _socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        sock.setblocking(False)  # noqa: FBT003 - the socket API
        sock.setsockopt(socket.SOL_SOCKET, const.SO_MARK, self.mark)
        if self.source:
            sock.bind((self.source, 0))
        return sock

    def _on_readable(self, sock: socket.socket) -> None:
        now = time.monotonic()
        while True:
            try:
                packet = sock.recv(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.debug("link %s: hop probe receive failed: %s", self.link, exc)
                return
            answered = parse_reply(packet)
            if answered is None or answered[0] != self.ident:
                continue
            sent, future = self._waiting.pop(answered[1], (0.0, None))
            if future is not None and not future.done():
                future.set_result((now - sent) * 1000)

    async def _round(self, sock: socket.socket) -> float | None:
        loop = asyncio.get_running_loop()
        futures = []
        for ttl in HOP_TTLS:
            sequence = next(self._sequence) & 0xFFFF
            future: asyncio.Future[float] = loop.create_future()
            self._waiting[sequence] = (time.monotonic(), future)
            try:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
                sock.sendto(echo_request(self.ident, sequence), (self.target, 0))
            except OSError as exc:
                log.debug("link %s: hop probe send failed: %s", self.link, exc)
                self._waiting.pop(sequence, None)
                continue
            futures.append(future)
        rtts = []
        for future in futures:
            with contextlib.suppress(TimeoutError):
                rtts.append(await asyncio.wait_for(future, self.timeout_s))
        self._waiting.clear()
        return sum(rtts) / len(rtts) if rtts else None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        sock, bound = self._socket(), self.source
        loop.add_reader(sock.fileno(), self._on_readable, sock)
        try:
            while not self._stopped:
                started = time.monotonic()
                if bound != self.source:  # the link's address changed: bind the new one
                    loop.remove_reader(sock.fileno())
                    sock.close()
                    sock, bound = self._socket(), self.source
                    loop.add_reader(sock.fileno(), self._on_readable, sock)
                sample = await self._round(sock)
                if sample is not None:
                    previous = self.latency_ms
                    self.latency_ms = (
                        sample if previous is None else previous + SMOOTHING * (sample - previous)
                    )
                self.on_sample(self.link, self.latency_ms)
                await asyncio.sleep(max(0.0, self.interval_s - (time.monotonic() - started)))
        finally:
            loop.remove_reader(sock.fileno())
            sock.close()
