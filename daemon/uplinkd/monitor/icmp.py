"""Link probing: rounds of ICMP echoes that leave through their link.

A probe leaves through its link because its raw socket is bound to the link's address and carries
the link's mark (SO_MARK): `ip rule fwmark <mark>/<mask> lookup <table>` then routes it through the
link's own table even when the main table has no default route via that link, and uplinkd's output
chain leaves packets alone whose socket already set a mark. Neither depends on the link's state in
uplinkd's maps, so a link that is "down" keeps being probed through itself.

icmplib builds, binds and sends the echo requests (`ICMPv4Socket`, `ICMPRequest`). Replies are
read by one `loop.add_reader` callback per socket, not icmplib's `AsyncSocket.receive`: that method
registers and removes a reader for every packet (so concurrent calls on one socket cancel each
other's readers) and throws away whatever it reads that does not match the one request it waits
for. Here one callback drains the socket and matches each echo reply by ICMP id (distinct per
Prober), sequence number (distinct per echo) and source address, so probers never take each other's
replies: every raw ICMP socket gets its own copy of each reply, and a bound socket only those sent
to its address.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import struct
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address

from icmplib import ICMPLibError, ICMPRequest, ICMPv4Socket

from .. import const

log = logging.getLogger("uplinkd")

SOL_RAW = 255
ICMP_FILTER = 1  # linux/icmp.h: a bitmask of ICMP types the raw socket must NOT receive
ICMP_ECHO_REPLY = 0
_ONLY_ECHO_REPLIES = struct.pack("=I", 0xFFFFFFFF & ~(1 << ICMP_ECHO_REPLY))
_PAYLOAD = b"uplinkd probe".ljust(56, b".")  # fixed: icmplib's default is random bytes per echo
_RECV_SIZE = 2048
# ICMP identifiers: distinct per Prober of this process, from a random base so that two processes
# (two daemons, a ping running next to us) are unlikely to share one.
_idents = itertools.count(int.from_bytes(os.urandom(2), "big"))


@dataclass(frozen=True)
class ProbeRound:
    link: str
    replies: dict[str, float | None]  # target address -> RTT in ms, None if no reply in time
    at: float  # time.monotonic() when the round completed


def _check_targets(targets: Sequence[str]) -> tuple[str, ...]:
    """Targets must be literal IPv4 addresses: a name would make icmplib resolve it (blocking)."""
    return tuple(dict.fromkeys(str(IPv4Address(t)) for t in targets))


def _cause(err: BaseException) -> str:
    """icmplib re-raises OSErrors as its own exceptions (EPERM becomes "broadcast not allowed");
    name the original error instead."""
    inner = err.__context__
    return str(inner) if isinstance(inner, OSError) else str(err)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


@dataclass
class _Round:
    replies: dict[str, float | None]
    deadline: float  # loop time: started + timeout
    seqs: set[int] = field(default_factory=set)  # its echoes still awaited
    at: float | None = None  # time.monotonic() when it completed; None while in flight


class Prober:
    """Probes one link's targets every interval; reports each round through a callback.

    Rounds start on a fixed schedule (start + k * interval) whatever the timeout: several may be in
    flight at once, each complete when all its targets answered or at its own deadline (its start
    + timeout). They are reported in the order they started, so a round that completed early
    waits for the earlier ones (which complete by their deadlines, no later than its own)."""

    def __init__(  # noqa: PLR0917 (the call shape the coordinator uses)
        self,
        link: str,
        targets: Sequence[str],
        source: str,
        mark: int,
        interval_ms: int,
        timeout_ms: int,
        on_round: Callable[[ProbeRound], None],
    ) -> None:
        """`source` is the link's address ("" leaves the source to the route); `mark` its mark."""
        if interval_ms <= 0 or timeout_ms <= 0:
            raise ValueError("interval_ms and timeout_ms must be positive")
        self.link = link
        self._targets = _check_targets(targets)
        self._source = str(IPv4Address(source)) if source else ""
        self._mark = mark
        self._interval = interval_ms / 1000
        self._timeout = timeout_ms / 1000
        self._on_round = on_round
        self._ident = next(_idents) & 0xFFFF
        self._seq = 0
        self._icmp: ICMPv4Socket | None = None
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stale = False  # the socket no longer matches source/mark: re-create next round
        self._rounds: deque[_Round] = deque()  # in flight or waiting to be reported, oldest first
        self._pending: dict[int, tuple[_Round, str, float]] = {}  # seq -> (round, target, sent)
        self._wait: asyncio.Future[None] | None = None  # what run() is waiting on
        self._running = False
        self._stopping = False
        self._last_error = ""

    @property
    def ident(self) -> int:
        """The ICMP identifier of this prober's echo requests."""
        return self._ident

    def update(
        self,
        *,
        targets: Sequence[str] | None = None,
        source: str | None = None,
        mark: int | None = None,
    ) -> None:
        """Address/gateway changed. Takes effect at the next round (rounds in flight keep their
        targets; a new source loses the replies they still wait for)."""
        if targets is not None:
            self._targets = _check_targets(targets)
        if source is not None:
            source = str(IPv4Address(source)) if source else ""
            self._stale |= source != self._source
            self._source = source
        if mark is not None:
            self._stale |= mark != self._mark
            self._mark = mark

    def stop(self) -> None:
        """Make run() return soon (without reporting the rounds in flight) and free the socket."""
        self._stopping = True
        if self._wait is not None:
            _settle(self._wait)
        if not self._running:
            self._close()

    async def run(self) -> None:
        """Loop until cancelled or stopped. Slots of the schedule missed while the event loop was
        blocked are skipped, not made up in a burst."""
        if self._running:
            raise RuntimeError(f"prober {self.link} is already running")
        loop = asyncio.get_running_loop()
        self._running, self._stopping, self._loop = True, False, loop
        try:
            start = loop.time()
            slot = 0
            while not self._stopping:
                now = loop.time()
                if now >= start + slot * self._interval:
                    self._start_round(loop, now)
                    slot = max(slot + 1, int((now - start) / self._interval) + 1)
                for rnd in self._rounds:  # deadlines grow with the rounds' start times
                    if rnd.deadline > now:
                        break
                    self._complete(rnd)
                self._report()
                wake = start + slot * self._interval
                if self._rounds and self._rounds[0].at is None:
                    wake = min(wake, self._rounds[0].deadline)
                await self._wait_until(loop, wake)
        finally:
            self._running = False
            self._rounds.clear()
            self._pending.clear()
            self._close()

    async def _wait_until(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        """Sleep until `when` (loop time), or until stop() or the oldest round completes."""
        if self._stopping:
            return
        fut: asyncio.Future[None] = loop.create_future()
        timer = loop.call_at(when, _settle, fut)
        self._wait = fut
        try:
            await fut
        finally:
            timer.cancel()
            self._wait = None

    def _start_round(self, loop: asyncio.AbstractEventLoop, now: float) -> None:
        rnd = _Round(dict.fromkeys(self._targets), now + self._timeout)
        self._rounds.append(rnd)
        try:
            self._send(rnd, loop)
        except Exception:  # a bug must not end the link's probing: count a lost round
            log.exception("%s: probe round failed", self.link)
            self._close()
            self._complete(rnd)
        if not rnd.seqs:  # nothing sent: lost at once, not at the deadline
            self._complete(rnd)

    def _send(self, rnd: _Round, loop: asyncio.AbstractEventLoop) -> None:
        icmp = self._ensure_socket(loop)
        if icmp is None:
            return
        failed = False
        for target in rnd.replies:
            self._seq = (self._seq + 1) & 0xFFFF
            self._pending[self._seq] = (rnd, target, time.monotonic())
            rnd.seqs.add(self._seq)
            try:
                icmp.send(ICMPRequest(target, self._ident, self._seq, payload=_PAYLOAD))
            except (ICMPLibError, OSError) as err:
                del self._pending[self._seq]
                rnd.seqs.discard(self._seq)
                self._note_error(f"sending to {target} failed: {_cause(err)}")
                failed = True
        if not failed:
            self._note_error("")
        elif not self._pending:  # re-create the socket next round: the error may have been its
            self._close()  # state (not while replies to it are awaited: those show it works)

    def _complete(self, rnd: _Round, now: float | None = None) -> None:
        """The round is over: answered by all its targets, past its deadline, or abandoned."""
        if rnd.at is not None:
            return
        rnd.at = time.monotonic() if now is None else now
        for seq in rnd.seqs:
            self._pending.pop(seq, None)
        rnd.seqs.clear()
        if rnd is self._rounds[0] and self._wait is not None:
            _settle(self._wait)  # run() reports it (and the completed rounds behind it)

    def _report(self) -> None:
        """Report the completed rounds at the head of the queue, in the order they started."""
        while self._rounds and (at := self._rounds[0].at) is not None and not self._stopping:
            rnd = self._rounds.popleft()
            try:
                self._on_round(ProbeRound(self.link, rnd.replies, at))
            except Exception:
                log.exception("%s: probe round handler failed", self.link)

    def _note_error(self, message: str) -> None:
        """Log at debug level, once per change: a dead link fails the same way every round."""
        if message != self._last_error:
            if message:
                log.debug("%s: probe %s", self.link, message)
            else:
                log.debug("%s: probes are sent again", self.link)
            self._last_error = message

    def _ensure_socket(self, loop: asyncio.AbstractEventLoop) -> ICMPv4Socket | None:
        if self._stale:
            self._close()
        if self._icmp is not None:
            return self._icmp
        self._stale = False
        try:
            icmp = ICMPv4Socket(address=self._source or None, privileged=True)
        except (ICMPLibError, OSError) as err:
            self._note_error(f"socket from {self._source or 'any'} failed: {_cause(err)}")
            return None
        try:
            sock = _kernel_socket(icmp)
            sock.setsockopt(socket.SOL_SOCKET, const.SO_MARK, self._mark)
            sock.setsockopt(SOL_RAW, ICMP_FILTER, _ONLY_ECHO_REPLIES)
            sock.settimeout(0.0)  # non-blocking
            loop.add_reader(sock.fileno(), self._on_readable)
        except OSError as err:
            icmp.close()
            self._note_error(f"socket setup (mark {self._mark:#x}) failed: {err}")
            return None
        self._icmp, self._sock = icmp, sock
        return icmp

    def _close(self) -> None:
        if self._sock is not None and self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        if self._icmp is not None:
            self._icmp.close()
        self._icmp = self._sock = None

    def _on_readable(self) -> None:
        """Drain the socket (non-blocking) and record the replies to the echoes in flight."""
        sock = self._sock
        while sock is not None:
            try:
                packet, (source, _) = sock.recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:  # re-create the socket; the echoes in flight are lost
                self._note_error(f"receive failed: {err}")
                self._close()
                for rnd in self._rounds:
                    self._complete(rnd)
                return
            self._match(packet, source, time.monotonic())

    def _match(self, packet: bytes, source: str, now: float) -> None:
        ihl = (packet[0] & 0x0F) * 4  # a raw IPv4 socket returns the IP header
        if len(packet) < ihl + 8 or packet[ihl] != ICMP_ECHO_REPLY:
            return
        ident, seq = struct.unpack_from("!HH", packet, ihl + 4)
        if ident != self._ident:
            return
        entry = self._pending.get(seq)
        if entry is None or entry[1] != source:  # late (round over) or not from the target
            return
        del self._pending[seq]
        rnd, target, sent = entry
        rnd.replies[target] = (now - sent) * 1000
        rnd.seqs.discard(seq)
        if not rnd.seqs:
            self._complete(rnd, now)


def _kernel_socket(icmp: ICMPv4Socket) -> socket.socket:
    """The kernel socket under an icmplib socket, to set what icmplib has no parameter for (the
    mark, the ICMP type filter). `sock` is icmplib's public property for exactly that purpose."""
    sock = icmp.sock
    if not isinstance(sock, socket.socket):
        raise OSError("icmplib socket is closed")
    return sock
