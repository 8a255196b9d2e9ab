"""Link quality in the lab: emulating it (``DelayLinks``) and measuring it.

``DelayLinks`` keeps a lab's delay programs (``uplinkd_lab.delay``, one per namespace that delays
anything) and the iptables rules that hand them packets. The measuring programs run inside a lab
namespace (``python -m uplinkd_lab.quality ping|bulk|download``, started by ``Lab.ping``,
``Lab.start_bulk_server`` and ``Lab.download``) and print JSON; the result types are what the
lab hands back.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from .delay import DelayProgram, per_direction_loss

# What an ISP's delay program holds: whatever it will forward, both ways, taken before conntrack
# (the raw table). Queued later (FORWARD), a burst of pings sharing one ICMP id, so one conntrack
# tuple, lost all but the first in flight: each made an unconfirmed entry that clashed with the
# first one's on confirmation. Not held: what is for the ISP's box itself or expires there.
_RAW_IN = ["-t", "raw", "PREROUTING", "-i"]
_EXPIRES_LATER = ["-m", "ttl", "--ttl-gt", "1"]
ISP_DELAY_RULES = [
    [*_RAW_IN, "down", *_EXPIRES_LATER, "-m", "addrtype", "!", "--dst-type", "LOCAL"],
    [*_RAW_IN, "up", *_EXPIRES_LATER],  # from upstream all is forwarded (the NAT: to the router)
]
ECHO_REPLY, DEST_UNREACHABLE, TIME_EXCEEDED = 0, 3, 11
_KINDS = {ECHO_REPLY: "reply", DEST_UNREACHABLE: "unreachable", TIME_EXCEEDED: "time-exceeded"}


@dataclass(frozen=True)
class PingReply:
    source: str  # who answered: the destination, or the hop where the TTL ran out
    kind: str  # "reply", "time-exceeded", "unreachable" or "icmp-<type>"
    rtt_ms: float


@dataclass(frozen=True)
class PingResult:
    """One entry per echo request sent, in order: its answer, or None if none came in time."""

    replies: list[PingReply | None]

    @property
    def answered(self) -> list[PingReply]:
        return [r for r in self.replies if r is not None]

    @property
    def lost(self) -> int:
        return sum(r is None for r in self.replies)

    @property
    def loss_fraction(self) -> float:
        return self.lost / len(self.replies) if self.replies else 0.0

    @property
    def sources(self) -> set[str]:
        return {r.source for r in self.answered}

    @property
    def rtts_ms(self) -> list[float]:
        return [r.rtt_ms for r in self.answered]

    @property
    def median_ms(self) -> float | None:
        rtts = self.rtts_ms
        return statistics.median(rtts) if rtts else None


@dataclass(frozen=True)
class Throughput:
    bytes: int  # received in the measured window (after the warm-up)
    seconds: float

    @property
    def mbit_s(self) -> float:
        return self.bytes * 8 / self.seconds / 1e6 if self.seconds > 0 else 0.0


class Quality(NamedTuple):
    latency_ms: float  # round trip, added by the ISP
    loss_percent: float  # round trip: a request or its answer lost


def check_quality(latency_ms: float, loss_percent: float) -> Quality:
    if not 0 <= latency_ms <= 10_000 or not 0 <= loss_percent <= 100:
        raise ValueError(
            f"latency must be 0..10000 ms and loss 0..100 %: {latency_ms}, {loss_percent}"
        )
    return Quality(float(latency_ms), float(loss_percent))


class DelayLinks:
    """A lab's delay programs and the iptables rules that feed them.

    ``run(ns, *argv)`` runs a command in a lab namespace, ``program_argv(ns)`` is the command
    line of the delay program there. Each program starts on first use; a queue's rules are added
    only once its program has bound it (a queue nobody reads drops everything).
    """

    def __init__(
        self, run: Callable[..., object], program_argv: Callable[[str], list[str]]
    ) -> None:
        self._run, self._program_argv = run, program_argv
        self.programs: dict[str, DelayProgram] = {}
        self._return_queues: dict[tuple[str, str], int] = {}  # (address, device) -> queue

    def set_isp(self, ns: str, quality: Quality) -> None:
        """An ISP's round-trip latency and loss: queue 0 of its namespace, half each way."""
        if ns in self.programs or quality.latency_ms or quality.loss_percent:
            loss = per_direction_loss(quality.loss_percent)
            self._queue(ns, 0, quality.latency_ms / 2, loss, ISP_DELAY_RULES)

    def set_return_delay(self, ns: str, address: str, device: str, delay_ms: float) -> None:
        """Delay what ``ns`` sends from ``address`` out of ``device`` (one queue per pair)."""
        key = (address, device)
        if key in self._return_queues or delay_ms:
            queue = self._return_queues.setdefault(key, len(self._return_queues) + 1)
            self._queue(ns, queue, delay_ms, 0.0, [["OUTPUT", "-s", address, "-o", device]])

    def _queue(
        self, ns: str, queue: int, delay_ms: float, loss_percent: float, rules: list[list[str]]
    ) -> None:
        program = self.programs.get(ns)
        if program is None:
            program = self.programs[ns] = DelayProgram(self._program_argv(ns))
        new = queue not in program.queues
        program.set_queue(queue, delay_ms, loss_percent)
        for rule in rules if new else []:
            table = rule[:2] if rule[0] == "-t" else []
            chain, match = rule[len(table)], rule[len(table) + 1 :]
            nfqueue = ["-j", "NFQUEUE", "--queue-num", str(queue)]
            self._run(ns, "iptables", "-w", "5", *table, "-A", chain, *match, *nfqueue)

    def stop(self) -> None:
        """Stop every delay program (bounded); the rules go with the namespaces."""
        for program in self.programs.values():
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                program.stop()
        self.programs.clear()


# The programs run inside the namespaces.
def ping(
    dst: str,
    count: int,
    *,
    source: str | None,
    ttl: int,
    interval: float,
    timeout: float,
) -> list[dict[str, object] | None]:
    """``count`` echo requests ``interval`` apart, answers collected meanwhile; stops ``timeout``
    seconds after the last request (or when all are answered). RTTs are measured here, on the
    monotonic clock, from the send to the receipt of the first answer to each request."""
    from icmplib import ICMPLibError, ICMPRequest, ICMPv4Socket  # noqa: PLC0415

    ident = os.getpid() & 0xFFFF
    sent: dict[int, float] = {}
    answers: dict[int, dict[str, object]] = {}
    with contextlib.closing(ICMPv4Socket(source, privileged=True)) as sock:
        start = time.monotonic()
        end = start + (count - 1) * interval + timeout
        seq = 0
        while len(answers) < count:
            now = time.monotonic()
            if seq < count and now >= start + seq * interval:
                sock.send(ICMPRequest(dst, ident, seq, ttl=ttl))
                sent[seq] = time.monotonic()
                seq += 1
                continue
            wake = start + seq * interval if seq < count else end
            if now >= end:
                break
            # Wait here, not in receive(): it discards what comes in after its own timeout.
            if not select.select([sock.sock], [], [], max(0.0, min(wake, end) - now))[0]:
                continue
            try:
                reply = sock.receive(None, max(0.05, end - now))
            except ICMPLibError:  # TimeoutExceeded: it was not an answer after all
                continue
            got = time.monotonic()
            if reply.id != ident or reply.sequence not in sent or reply.sequence in answers:
                continue  # someone else's, or a duplicate
            answers[reply.sequence] = {
                "source": reply.source,
                "kind": _KINDS.get(reply.type, f"icmp-{reply.type}"),
                "rtt_ms": (got - sent[reply.sequence]) * 1000.0,
            }
    return [answers.get(k) for k in range(count)]


def serve_bulk(address: str, port: int) -> None:
    """Send zeros to every client as fast as it takes them, until it goes away."""
    chunk = bytes(65536)

    def pour(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            while True:
                conn.sendall(chunk)

    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((address, port))
    lsock.listen(64)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=pour, args=(conn,), daemon=True).start()


def download(
    dst: str, port: int, *, seconds: float, warmup: float, timeout: float, source: str | None
) -> dict[str, float]:
    """Read from a bulk server for ``warmup + seconds``; count only what came after the warm-up
    (slow start and the shaper's burst): from the end of the first read after it."""
    bind = (source, 0) if source else None
    with socket.create_connection((dst, port), timeout=timeout, source_address=bind) as sock:
        sock.settimeout(timeout)
        measured_from = time.monotonic() + warmup
        end = measured_from + seconds
        counted, first = 0, None
        while (now := time.monotonic()) < end:
            n = len(sock.recv(262144))
            if not n:
                break
            if first is not None:
                counted += n
            elif now >= measured_from:
                first = time.monotonic()
        return {"bytes": counted, "seconds": (time.monotonic() - first) if first else 0.0}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uplinkd_lab.quality", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("ping", help="echo requests, JSON list of answers out")
    p.add_argument("--dst", required=True)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--source")
    p.add_argument("--ttl", type=int, default=64)
    p.add_argument("--interval", type=float, default=0.01)
    p.add_argument("--timeout", type=float, default=1.0)
    p = sub.add_parser("bulk", help="bulk TCP sender")
    p.add_argument("--address", default="0.0.0.0")  # noqa: S104
    p.add_argument("--port", type=int, default=5001)
    p = sub.add_parser("download", help="bulk TCP receiver, JSON bytes and seconds out")
    p.add_argument("--dst", required=True)
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--warmup", type=float, default=0.5)
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--source")
    args = parser.parse_args(argv)
    if args.cmd == "ping":
        opts = {"source": args.source, "ttl": args.ttl, "interval": args.interval}
        print(json.dumps(ping(args.dst, args.count, timeout=args.timeout, **opts)))
    elif args.cmd == "bulk":
        serve_bulk(args.address, args.port)
    else:
        opts = {"seconds": args.seconds, "warmup": args.warmup, "timeout": args.timeout}
        out = download(args.dst, args.port, source=args.source, **opts)
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
