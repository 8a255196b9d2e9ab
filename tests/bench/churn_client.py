"""The orchestrator's side of the churn client (churn.py): start it in the LAN, read its records."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from uplinkd_lab.lab import Lab

CHURN = Path(__file__).with_name("churn.py")


@dataclass(frozen=True)
class Record:
    start: float  # CLOCK_MONOTONIC seconds
    end: float
    outcome: str  # the address the server saw, or the kind of failure
    isp: str | None  # the ISP that carried a successful connection

    @property
    def ok(self) -> bool:
        try:
            ipaddress.IPv4Address(self.outcome)
        except ValueError:
            return False
        return True


def first_success(records: Sequence[Record], isp: str, after: float) -> Record | None:
    """The first (by completion) attempt started at or after `after` that got through `isp`."""
    hits = [r for r in records if r.start >= after and r.isp == isp]
    return min(hits, key=lambda r: r.end, default=None)


class ChurnClient:
    """churn.py running in the lab's LAN namespace; its records arrive in a thread."""

    def __init__(
        self,
        lab: Lab,
        dst: str,
        *,
        interval_ms: float = 5,
        timeout_ms: float = 300,
        max_seconds: float = 600,
    ) -> None:
        self.lab = lab
        argv = ["--dst", dst, "--interval-ms", str(interval_ms), "--timeout-ms", str(timeout_ms)]
        argv += ["--max-seconds", str(max_seconds)]
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.ns_lan, sys.executable, str(CHURN), *argv],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.records: list[Record] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("#"):
                continue
            start, end, outcome = line.split()
            isp = self.lab.isp_of(outcome)
            with self._changed:
                self.records.append(Record(float(start), float(end), outcome, isp))
                self._changed.notify_all()

    def wait_for(self, match: Callable[[Record], bool], timeout: float) -> Record | None:
        """The first record, in arrival order, that `match`es; waits at most `timeout` seconds.

        Each record is looked at once, so a long trial (tens of thousands of them) stays cheap.
        """
        checked = 0
        found: list[Record] = []

        def scan() -> bool:
            nonlocal checked
            while checked < len(self.records) and not found:
                if match(self.records[checked]):
                    found.append(self.records[checked])
                checked += 1
            return bool(found)

        with self._changed:
            self._changed.wait_for(scan, timeout)
        return found[0] if found else None

    def stop(self) -> list[Record]:
        """Stop the client (idempotent) and return every record it wrote."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._thread.join(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        with self._changed:
            return list(self.records)
