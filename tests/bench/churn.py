"""The failover client: a new TCP connection every few milliseconds, one line per attempt.

Run inside the LAN namespace (``python churn.py --dst ADDRESS``) by tests/bench/failover.py. Every
``--interval-ms`` it starts a non-blocking connection to the who-am-I server, whatever the
attempts still in flight (the rate is bounded: a late tick is skipped, never caught up in a
burst). An attempt succeeds when the server's reply (the address it saw, that is which ISP
carried the connection) arrives within ``--timeout-ms`` of its start; anything else is a failure
named by its kind. For each attempt, in order of completion, it prints
``<start> <end> <outcome>``: CLOCK_MONOTONIC seconds (one clock for every namespace of the
machine, so they compare with the orchestrator's fault times) and the address or failure kind.
It stops on SIGTERM, on EOF of stdin (its orchestrator went away), or after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import errno
import selectors
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field

MAX_IN_FLIGHT = 1000  # a bound far above timeout/interval (60 with the defaults)


@dataclass
class Attempt:
    start: float
    deadline: float
    sock: socket.socket
    connected: bool = False
    data: bytes = field(default=b"")
    error: int = 0  # connect's own immediate failure (no route), reported at once


def _start(dst: str, port: int, timeout: float) -> Attempt:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # An RST on close: no TIME_WAIT, so tens of thousands of attempts never run out of ports.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.setblocking(False)
    start = time.monotonic()
    code = sock.connect_ex((dst, port))
    return Attempt(start, start + timeout, sock, error=0 if code == errno.EINPROGRESS else code)


def _kind(code: int) -> str:
    return {
        errno.ECONNREFUSED: "refused",
        errno.ECONNRESET: "reset",
        errno.EHOSTUNREACH: "unreachable",
        errno.ENETUNREACH: "unreachable",
    }.get(code, errno.errorcode.get(code, str(code)))


class Churn:
    """The attempts in flight and the selector that drives them."""

    def __init__(self, dst: str, port: int, timeout: float) -> None:
        self.dst, self.port, self.timeout = dst, port, timeout
        self.sel = selectors.DefaultSelector()
        self.sel.register(sys.stdin, selectors.EVENT_READ, None)
        self.in_flight: dict[socket.socket, Attempt] = {}
        self.attempts = 0
        self.stdin_closed = False

    def start(self) -> None:
        if len(self.in_flight) >= MAX_IN_FLIGHT:
            return
        attempt = _start(self.dst, self.port, self.timeout)
        self.in_flight[attempt.sock] = attempt
        self.sel.register(attempt.sock, selectors.EVENT_WRITE, attempt)
        self.attempts += 1
        if attempt.error:
            self.finish(attempt, _kind(attempt.error))

    def finish(self, attempt: Attempt, outcome: str) -> None:
        self.sel.unregister(attempt.sock)
        attempt.sock.close()
        del self.in_flight[attempt.sock]
        sys.stdout.write(f"{attempt.start:.6f} {time.monotonic():.6f} {outcome}\n")

    def poll(self, until: float) -> None:
        """Handle what happens before `until` (or the next deadline in flight)."""
        deadlines = [a.deadline for a in self.in_flight.values()]
        wait = min([until, *deadlines]) - time.monotonic()
        for key, _ in self.sel.select(max(0.0, wait)):
            if key.data is None:
                self.stdin_closed = not sys.stdin.readline()  # EOF: the orchestrator is gone
            else:
                self._progress(key.data)
        now = time.monotonic()
        for attempt in [a for a in self.in_flight.values() if a.deadline <= now]:
            self.finish(attempt, "timeout")
        sys.stdout.flush()

    def _progress(self, attempt: Attempt) -> None:
        if not attempt.connected:
            code = attempt.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                self.finish(attempt, _kind(code))
            else:
                attempt.connected = True
                self.sel.modify(attempt.sock, selectors.EVENT_READ, attempt)
            return
        try:
            chunk = attempt.sock.recv(64)
        except OSError as exc:
            self.finish(attempt, _kind(exc.errno or 0))
            return
        attempt.data += chunk
        if chunk and not attempt.data.endswith(b"\n"):
            return
        text = attempt.data.decode(errors="replace").strip()
        self.finish(attempt, text if chunk and text else "garbled")


def run(dst: str, port: int, interval: float, timeout: float, max_seconds: float) -> int:
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    churn = Churn(dst, port, timeout)
    begin = time.monotonic()
    next_start = begin
    while not stopping and not churn.stdin_closed and time.monotonic() - begin < max_seconds:
        now = time.monotonic()
        if now >= next_start:
            churn.start()
            next_start += interval
            if next_start < now:  # a late tick (a slow loop) is skipped, never caught up
                next_start = now + interval
        churn.poll(next_start)
    for attempt in list(churn.in_flight.values()):
        churn.finish(attempt, "stopped")
    sys.stdout.write(f"# attempts {churn.attempts}\n")
    sys.stdout.flush()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dst", required=True)
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--interval-ms", type=float, default=5.0)
    p.add_argument("--timeout-ms", type=float, default=300.0)
    p.add_argument("--max-seconds", type=float, default=300.0)
    args = p.parse_args()
    return run(
        args.dst, args.port, args.interval_ms / 1000, args.timeout_ms / 1000, args.max_seconds
    )


if __name__ == "__main__":
    sys.exit(main())
