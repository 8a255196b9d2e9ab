"""The lab's delay link: latency and loss without netem, by holding NFQUEUE'd packets.

The kernel here has no netem, so the lab sends the packets it wants delayed to a netfilter queue
(iptables ``-j NFQUEUE --queue-num N``, in the namespace that owns the link) and this program,
running in that namespace, holds each one for the queue's delay before its ``accept`` verdict,
or drops it with the queue's loss probability. The packet itself is never copied to user space
(``COPY_META``): only its id, so the cost is two small netlink messages per packet. Packets of
one queue leave in the order they came (a lowered delay lets new packets wait behind the older
ones once, as on a real link); the queue numbers belong to the namespace.

Run by the lab as ``python -m uplinkd_lab.delay [--queue N --delay-ms D --loss P]`` under ``ip
netns exec``. It prints ``ready`` once its first queue is bound, then reads commands, one a line,
on stdin and answers each with one line on stdout:

- ``queue N DELAY_MS LOSS_PERCENT``: bind queue N (if new) or change its delay and loss -> ``ok N``
- ``stats``: JSON: per queue the settings, packets seen, dropped, held now and at most, and the
  process's CPU seconds

It exits on end of input (so it never outlives the lab process that started it) or on SIGTERM.
``DelayProgram`` is the lab's handle on one such process.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from netfilterqueue import NetfilterQueue, Packet

MAX_HELD = 20_000  # packets the kernel keeps per queue awaiting a verdict (~1 Gbit/s for 240 ms)
_COPY_META = 1  # netfilterqueue.COPY_META: the verdict needs the id only


class DelayError(RuntimeError):
    """The delay program failed to start, or did not answer in time."""


def unsupported() -> str | None:
    """Why the delay link cannot work on this machine (None if it can): the netfilterqueue module
    and an iptables with the NFQUEUE target. The target is tried in a throw-away namespace."""
    try:
        import netfilterqueue  # noqa: F401, PLC0415 (optional: only the lab needs it)
    except ImportError as exc:
        return f"the netfilterqueue module is missing ({exc}); pip install NetfilterQueue"
    if not shutil.which("iptables") or not shutil.which("unshare"):
        return "iptables and unshare are needed for the NFQUEUE delay link"
    rule = ["iptables", "-w", "-A", "FORWARD", "-j", "NFQUEUE", "--queue-num", "0"]
    proc = subprocess.run(
        ["unshare", "--net", *rule], capture_output=True, text=True, timeout=10, check=False
    )
    if proc.returncode != 0:
        return f"iptables -j NFQUEUE does not work here: {proc.stderr.strip()}"
    return None


def per_direction_loss(round_trip_percent: float) -> float:
    """The loss (percent) to apply in each direction so that a request and its answer, each
    crossing once, fail together with ``round_trip_percent``: 1 - (1 - q)^2 = p."""
    if not 0 <= round_trip_percent <= 100:
        raise ValueError(f"loss must be 0..100 %, not {round_trip_percent}")
    return 100.0 * (1.0 - math.sqrt(1.0 - round_trip_percent / 100.0))


# The program.
@dataclass
class _Queue:
    number: int
    delay_s: float
    loss: float  # probability 0..1
    nfq: NetfilterQueue
    owner: _Delayer
    held: collections.deque[tuple[float, Packet]] = field(default_factory=collections.deque)
    packets: int = 0
    dropped: int = 0
    max_held: int = 0

    def on_packet(self, pkt: Packet) -> None:
        # Releasing here too: under a steady stream nfq.run() may not return for a while.
        now = self.owner.release(time.monotonic())
        self.packets += 1
        if self.loss and random.random() < self.loss:  # noqa: S311 (emulation, not crypto)
            self.dropped += 1
            pkt.drop()
        elif self.delay_s <= 0 and not self.held:
            pkt.accept()
        else:
            self.held.append((now + self.delay_s, pkt))
            self.max_held = max(self.max_held, len(self.held))

    def release(self, now: float) -> float | None:
        """Accept every packet that is due; return when the next one is (None if none held)."""
        held = self.held
        while held and held[0][0] <= now:
            held.popleft()[1].accept()
        return held[0][0] if held else None

    def stats(self) -> dict[str, float]:
        return {
            "delay_ms": self.delay_s * 1000.0,
            "loss_percent": self.loss * 100.0,
            "packets": self.packets,
            "dropped": self.dropped,
            "held": len(self.held),
            "max_held": self.max_held,
        }


class _Delayer:
    def __init__(self) -> None:
        self.queues: dict[int, _Queue] = {}
        self.by_fd: dict[int, _Queue] = {}
        self.next_due: float | None = None

    def set_queue(self, number: int, delay_ms: float, loss_percent: float) -> None:
        if delay_ms < 0 or not 0 <= loss_percent <= 100:
            raise ValueError("delay must be >= 0 ms and loss 0..100 %")
        queue = self.queues.get(number)
        if queue is None:
            from netfilterqueue import NetfilterQueue  # noqa: PLC0415 (see unsupported())

            nfq = NetfilterQueue()
            queue = _Queue(number, delay_ms / 1000.0, loss_percent / 100.0, nfq, self)
            nfq.bind(number, queue.on_packet, max_len=MAX_HELD, mode=_COPY_META)
            self.queues[number] = queue
            self.by_fd[nfq.get_fd()] = queue
        queue.delay_s, queue.loss = delay_ms / 1000.0, loss_percent / 100.0

    def release(self, now: float) -> float:
        """Accept what is due in every queue; return ``now``. Sets ``next_due``."""
        due = [t for q in self.queues.values() if (t := q.release(now)) is not None]
        self.next_due = min(due) if due else None
        return now

    def stats(self) -> dict[str, Any]:
        cpu = os.times()
        return {
            "queues": {str(n): q.stats() for n, q in self.queues.items()},
            "cpu_s": cpu.user + cpu.system,
        }

    def command(self, line: str) -> str:
        words = line.split()
        try:
            if words[:1] == ["queue"] and len(words) == 4:
                self.set_queue(int(words[1]), float(words[2]), float(words[3]))
                return f"ok {int(words[1])}"
            if words == ["stats"]:
                return json.dumps(self.stats())
        except (ValueError, OSError, RuntimeError) as exc:
            return f"error {exc}"
        return f"error unknown command {line.strip()!r}"

    def run(self, control: int) -> None:
        """Serve the queues and the commands on fd ``control`` until it reaches end of input."""
        pending = b""
        while True:
            now = self.release(time.monotonic())
            timeout = None if self.next_due is None else max(0.0, self.next_due - now)
            # select, not poll/epoll: microsecond timeouts (those round up to a millisecond).
            ready, _, _ = select.select([control, *self.by_fd], [], [], timeout)
            for fd in ready:
                if fd != control:
                    self.by_fd[fd].nfq.run(block=False)  # every message waiting, then EAGAIN
                    continue
                data = os.read(control, 4096)
                if not data:
                    return
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if line.strip():
                        print(self.command(line.decode()), flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uplinkd_lab.delay", description=__doc__)
    parser.add_argument("--queue", type=int, help="NFQUEUE number to bind at start")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="hold each packet this long")
    parser.add_argument("--loss", type=float, default=0.0, help="drop this %% of the packets")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    delayer = _Delayer()
    if args.queue is not None:
        delayer.set_queue(args.queue, args.delay_ms, args.loss)
    print("ready", flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        delayer.run(sys.stdin.fileno())
    return 0


# The lab's side.
class DelayProgram:
    """One delay program running in a namespace, driven over its stdin and stdout."""

    def __init__(self, argv: Sequence[str], timeout: float = 10.0) -> None:
        """Start ``argv`` (``ip netns exec NS python -m uplinkd_lab.delay``) and wait, bounded,
        for its ``ready``."""
        self.queues: dict[int, tuple[float, float]] = {}  # number -> (delay ms, loss %)
        self._buffer = b""
        self.proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        try:
            line = self._line(timeout)
        except BaseException:
            self.stop()
            raise
        if line != "ready":
            message = line or self._stderr()
            self.stop()
            raise DelayError(f"delay program did not start: {message}")

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def set_queue(self, number: int, delay_ms: float, loss_percent: float) -> None:
        """Bind (once) or reconfigure queue ``number``; returns when the program took it."""
        answer = self.request(f"queue {number} {delay_ms:.6g} {loss_percent:.6g}")
        if answer != f"ok {number}":
            raise DelayError(f"delay program refused queue {number}: {answer}")
        self.queues[number] = (delay_ms, loss_percent)

    def stats(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.request("stats"))
        return data

    def request(self, line: str, timeout: float = 5.0) -> str:
        if not self.running or self.proc.stdin is None:
            raise DelayError(f"delay program is not running: {self._stderr()}")
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except OSError as exc:
            raise DelayError(f"delay program gone: {exc}") from exc
        return self._line(timeout)

    def _line(self, timeout: float) -> str:
        if self.proc.stdout is None:
            raise DelayError("delay program has no stdout")
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise DelayError(f"delay program did not answer within {timeout:g} s")
            data = os.read(fd, 65536)
            if not data:
                raise DelayError(f"delay program exited: {self._stderr()}")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode().strip()

    def _stderr(self) -> str:
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(1.0)  # its stdout ended: it is exiting
        if self.running or self.proc.stderr is None or self.proc.stderr.closed:
            return "(no error output)"
        return self.proc.stderr.read().decode(errors="replace").strip()

    def stop(self) -> None:
        """End of input, then SIGTERM, then SIGKILL: each bounded."""
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        for step in (self.proc.terminate, self.proc.kill):
            try:
                self.proc.wait(1.0)
                break
            except subprocess.TimeoutExpired:
                step()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(2.0)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


if __name__ == "__main__":
    sys.exit(main())
