"""Traffic in the lab: the who-am-I server and the client that connects to it from inside a
namespace (run there through `python -m uplinkd_lab.lab serve|connect|wait`), and what a
connection run found, by source address and by ISP.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import selectors
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .lab import Lab

_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)


@dataclass
class ConnectResult:
    """Per source address (``"default"`` when unbound), in order, what the server reported seeing
    as the client's address, or None for a failed connection; ``errors`` counts failures by kind."""

    results: dict[str, list[str | None]]
    errors: dict[str, int]
    elapsed_s: float
    lab: Lab | None = field(default=None, repr=False, compare=False)
    # the same shape: how long each connect() took (SYN to SYN-ACK, ms), None if it failed
    connect_ms: dict[str, list[float | None]] = field(default_factory=dict)

    @property
    def seen(self) -> dict[str, list[str]]:
        return {src: [a for a in out if a is not None] for src, out in self.results.items()}

    @property
    def addresses(self) -> list[str]:
        return [a for out in self.seen.values() for a in out]

    @property
    def ok(self) -> int:
        return len(self.addresses)

    def median_connect_ms(self, source: str | None = None) -> float | None:
        """Median connect time of the successful connections (of one source, or all)."""
        times = [
            t
            for src, out in self.connect_ms.items()
            if source is None or src == source
            for t in out
            if t is not None
        ]
        return statistics.median(times) if times else None

    @property
    def failed(self) -> int:
        return sum(a is None for out in self.results.values() for a in out)

    def counts_by_isp(self, lab: Lab | None = None, source: str | None = None) -> dict[str, int]:
        """Successful connections per ISP name (every ISP listed, zeros included); addresses no
        ISP owns are counted under ``"other"`` (present only if any)."""
        lab = lab or self.lab
        if lab is None:
            raise ValueError("counts_by_isp needs the Lab that produced the result")
        counts = dict.fromkeys(lab.isp_names, 0)
        addrs = self.addresses if source is None else self.seen.get(source, [])
        for addr in addrs:
            isp = lab.isp_of(addr) or "other"
            counts[isp] = counts.get(isp, 0) + 1
        return counts

    def shares(self, lab: Lab | None = None, source: str | None = None) -> dict[str, float]:
        """Fraction of the successful connections per ISP (all zeros if none succeeded)."""
        counts = self.counts_by_isp(lab, source)
        total = sum(counts.values())
        return {isp: (n / total if total else 0.0) for isp, n in counts.items()}


class Server:
    """A who-am-I server process inside a namespace; ``Lab`` stops it on cleanup."""

    def __init__(
        self, proc: subprocess.Popen[str], ns: str, address: str, ports: list[int]
    ) -> None:
        self.proc, self.ns, self.address, self.ports = proc, ns, address, ports

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.running:
            self.proc.terminate()
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(2.0)
        if self.proc.stderr:
            self.proc.stderr.close()


def serve(address: str, ports: Sequence[int]) -> None:
    """Accept on every port; tell each peer its IPv4 address and a newline, then close."""
    sel = selectors.DefaultSelector()
    for port in ports:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((address, port))
        lsock.listen(4096)
        lsock.settimeout(0.0)  # non-blocking
        sel.register(lsock, selectors.EVENT_READ)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        for key, _ in sel.select():
            listener: socket.socket = key.fileobj  # type: ignore[assignment]
            while True:
                try:
                    conn, peer = listener.accept()
                except OSError:  # BlockingIOError (queue drained), ECONNABORTED
                    break
                with conn, contextlib.suppress(OSError):
                    conn.sendall(f"{peer[0]}\n".encode())


def _error_kind(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _connect_once(
    dst: str, port: int, source: str | None, timeout: float, took: list[float]
) -> str:
    end = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # An RST on close: no TIME_WAIT, so thousands of connections never run out of ports.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if source:
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        sock.settimeout(timeout)
        start = time.monotonic()
        sock.connect((dst, port))
        took.append((time.monotonic() - start) * 1000.0)
        data = b""
        while not data.endswith(b"\n"):
            sock.settimeout(max(0.001, end - time.monotonic()))
            chunk = sock.recv(64)
            if not chunk:
                break
            data += chunk
    text = data.decode(errors="replace").strip()
    ipaddress.IPv4Address(text)  # ValueError: not a who-am-I server
    return text


def connect(
    dst: str, port: int, count: int, *, sources: Sequence[str], timeout: float, deadline: float
) -> dict[str, object]:
    start = time.monotonic()
    keys = list(sources) or ["default"]
    results: dict[str, list[str | None]] = {k: [] for k in keys}
    times: dict[str, list[float | None]] = {k: [] for k in keys}
    errors: Counter[str] = Counter()
    for _ in range(count):
        for key in keys:
            left = start + deadline - time.monotonic()
            seen: str | None = None
            took: list[float] = []
            if left <= 0:
                errors["deadline"] += 1
            else:
                try:
                    src = key if sources else None
                    seen = _connect_once(dst, port, src, min(timeout, left), took)
                except OSError as exc:
                    errors[_error_kind(exc)] += 1
                except ValueError:
                    errors["garbled"] += 1
            results[key].append(seen)
            times[key].append(took[0] if seen is not None else None)
    elapsed = time.monotonic() - start
    return {"results": results, "errors": dict(errors), "elapsed_s": elapsed, "connect_ms": times}


def wait_listening(address: str, ports: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        with contextlib.suppress(OSError), socket.create_connection((address, pending[0]), 0.2):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
