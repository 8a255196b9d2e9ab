"""Prober against a real kernel: probes leave through their link (SO_MARK + bound source).

Topology (namespaces made here, always deleted):

    isp1: eth0 10.0.1.1/24, lo 198.51.100.1/32  ---  router: wan1 10.0.1.2/24
    isp2: eth0 10.0.2.1/24, lo 198.51.100.1/32  ---  router: wan2 10.0.2.2/24

The router has no default route in main; tables 201/202 hold `default via 10.0.X.1 dev wanX` and
only `fwmark 0x100/0xff00 lookup 201`, `fwmark 0x200/0xff00 lookup 202` lead to them. So a probe
reaches the common target 198.51.100.1 only by its mark, and which ISP answers shows which link it
took. The probers run in the router namespace in a thread that entered it with setns(2).
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import pytest
from uplinkd.monitor.icmp import Prober, ProbeRound

pytestmark = [
    pytest.mark.lab,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("nft") is None,
        reason="needs root, iproute2 and nft to build network namespaces",
    ),
]

T = TypeVar("T")
TARGET = "198.51.100.1"  # owned by both ISPs
DEAD = "192.0.2.99"  # owned by nobody
CLONE_NEWNET = 0x40000000
INTERVAL_MS = 200
TIMEOUT_MS = 150
LINKS = {"1": ("10.0.1.2", 0x100), "2": ("10.0.2.2", 0x200)}  # link -> (source, mark)


def sh(*argv: str, stdin: str | None = None) -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


@dataclass(frozen=True)
class Topo:
    router: str
    isp1: str
    isp2: str

    def nft(self, ns: str, ruleset: str) -> None:
        sh("ip", "netns", "exec", ns, "nft", "-f", "-", stdin=ruleset)

    def drop_echo(self, ns: str, match: str = "") -> None:
        """Drop echo requests (optionally only those matching `match`) arriving at an ISP."""
        self.nft(
            ns,
            "table inet probetest {\n"
            "  chain input {\n"
            "    type filter hook input priority 0; policy accept;\n"
            f"    icmp type echo-request {match} drop\n"
            "  }\n"
            "}\n",
        )

    def undrop(self, ns: str) -> None:
        sh("ip", "netns", "exec", ns, "nft", "flush", "ruleset")


@pytest.fixture(scope="module")
def topo() -> Iterator[Topo]:
    prefix = f"upl-pr-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    t = Topo(f"{prefix}-r", f"{prefix}-i1", f"{prefix}-i2")
    made: list[str] = []
    try:
        for ns in (t.router, t.isp1, t.isp2):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "netns", "exec", t.router, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
        sh("ip", "netns", "exec", t.router, "sysctl", "-qw", "net.ipv4.conf.default.rp_filter=0")
        for n, isp in ((1, t.isp1), (2, t.isp2)):
            wan = f"wan{n}"
            sh("ip", "-n", t.router, "link", "add", wan, "type", "veth", "peer", "name", "eth0",
               "netns", isp)  # fmt: skip
            sh("ip", "-n", t.router, "addr", "add", f"10.0.{n}.2/24", "dev", wan)
            sh("ip", "-n", t.router, "link", "set", wan, "up")
            sh("ip", "-n", isp, "addr", "add", f"10.0.{n}.1/24", "dev", "eth0")
            sh("ip", "-n", isp, "addr", "add", f"{TARGET}/32", "dev", "lo")
            sh("ip", "-n", isp, "link", "set", "eth0", "up")
            table = str(200 + n)
            sh("ip", "-n", t.router, "route", "add", "default", "via", f"10.0.{n}.1", "dev", wan,
               "table", table)  # fmt: skip
            sh(
                "ip",
                "-n",
                t.router,
                "rule",
                "add",
                "fwmark",
                f"{n << 8:#x}/0xff00",
                "lookup",
                table,
            )
        assert "default" not in sh("ip", "-n", t.router, "route", "show", "table", "main")
        yield t
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], check=False)


@pytest.fixture
def lab(topo: Topo) -> Iterator[Topo]:
    """The shared topology, put back as it was after each test."""
    yield topo
    for isp in (topo.isp1, topo.isp2):
        topo.undrop(isp)
        sh("ip", "-n", isp, "link", "set", "eth0", "up")


_libc = ctypes.CDLL(None, use_errno=True)


def enter_netns(ns: str) -> None:
    """Move the calling thread (only it) into `ns`."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
    finally:
        os.close(fd)


def in_netns(ns: str, body: Callable[[], Awaitable[T]]) -> T:
    """Run an asyncio body in a fresh thread that has entered `ns` (only that thread moves)."""

    def thread() -> T:
        enter_netns(ns)

        async def main() -> T:
            return await body()

        return asyncio.run(main())

    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(thread).result(timeout=120)


class Recorder:
    def __init__(self) -> None:
        self.rounds: list[ProbeRound] = []

    def __call__(self, done: ProbeRound) -> None:
        self.rounds.append(done)

    def between(self, start: float, end: float) -> list[ProbeRound]:
        """Rounds that began after `start` (the round lasts at most the timeout) and ended
        before `end`."""
        return [r for r in self.rounds if r.at - TIMEOUT_MS / 1000 > start and r.at <= end]

    def rtts(self, start: float, end: float, target: str = TARGET) -> list[float | None]:
        return [r.replies[target] for r in self.between(start, end)]


def prober(
    link: str,
    rec: Recorder,
    targets: tuple[str, ...] = (TARGET,),
    source: str | None = None,
    mark: int | None = None,
) -> Prober:
    src, mrk = LINKS[link]
    src = src if source is None else source
    mrk = mrk if mark is None else mark
    return Prober(link, targets, src, mrk, INTERVAL_MS, TIMEOUT_MS, rec)


class Running:
    """Probers running as tasks; phases are delimited with monotonic timestamps."""

    def __init__(self, *probers: Prober) -> None:
        self.probers = probers
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Running:
        self.tasks = [asyncio.create_task(p.run()) for p in self.probers]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self.tasks:
            assert not task.done(), f"prober loop ended: {task}"
        for p in self.probers:
            p.stop()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 2)

    @staticmethod
    async def phase(seconds: float) -> tuple[float, float]:
        start = time.monotonic()
        await asyncio.sleep(seconds)
        return start, time.monotonic()


async def shell(*argv: str) -> None:
    await asyncio.to_thread(sh, *argv)


def all_replied(rtts: list[float | None]) -> bool:
    return len(rtts) >= 3 and all(r is not None and 0 <= r < TIMEOUT_MS for r in rtts)


def all_lost(rtts: list[float | None]) -> bool:
    return len(rtts) >= 3 and all(r is None for r in rtts)


def test_each_link_probes_through_itself(lab: Topo) -> None:
    r1, r2, r0 = Recorder(), Recorder(), Recorder()

    async def body() -> None:
        unmarked = prober("1", r0, mark=0)  # right source, no mark: no route (no main default)
        async with Running(prober("1", r1), prober("2", r2), unmarked) as run:
            both = await run.phase(1.0)
            await asyncio.to_thread(lab.drop_echo, lab.isp2)
            isp2_drops = await run.phase(1.2)
            await asyncio.to_thread(lab.undrop, lab.isp2)
            again = await run.phase(1.0)
        assert all_replied(r1.rtts(*both)) and all_replied(r2.rtts(*both))
        # Only link 2's probes cross isp2: link 1 keeps its replies while link 2 loses all.
        assert all_replied(r1.rtts(*isp2_drops)), r1.rtts(*isp2_drops)
        assert all_lost(r2.rtts(*isp2_drops)), r2.rtts(*isp2_drops)
        assert all_replied(r1.rtts(*again)) and all_replied(r2.rtts(*again))
        assert all_lost(r0.rtts(both[0], again[1]))  # the mark is what routes the probes

    in_netns(lab.router, body)


def test_dead_target_is_lost_in_the_same_round(lab: Topo) -> None:
    rec = Recorder()

    async def body() -> None:
        async with Running(prober("1", rec, targets=(TARGET, DEAD))) as run:
            span = await run.phase(1.2)
        rounds = rec.between(*span)
        assert len(rounds) >= 4
        for r in rounds:
            assert list(r.replies) == [TARGET, DEAD]
            assert r.replies[TARGET] is not None and r.replies[DEAD] is None

    in_netns(lab.router, body)


def test_carrier_loss_and_return(lab: Topo) -> None:
    rec = Recorder()

    async def body() -> None:
        async with Running(prober("1", rec)) as run:
            before = await run.phase(0.8)
            await shell("ip", "-n", lab.isp1, "link", "set", "eth0", "down")
            await asyncio.sleep(0.3)  # the carrier change reaches wan1
            down = await run.phase(1.2)
            await shell("ip", "-n", lab.isp1, "link", "set", "eth0", "up")
            await asyncio.sleep(1.5)  # carrier, then ARP again
            after = await run.phase(1.0)
        assert all_replied(rec.rtts(*before))
        assert all_lost(rec.rtts(*down)), rec.rtts(*down)
        assert all_replied(rec.rtts(*after)), rec.rtts(*after)

    in_netns(lab.router, body)


def test_missing_source_address_then_update(lab: Topo) -> None:
    """A link whose address is not there yet is lost, not fatal; update() moves the prober."""
    rec = Recorder()

    async def body() -> None:
        p = prober("1", rec, source="10.0.1.3")
        async with Running(p) as run:
            absent = await run.phase(0.8)
            await shell("ip", "-n", lab.router, "addr", "add", "10.0.1.3/24", "dev", "wan1")
            try:
                present = await run.phase(1.0)
            finally:
                await shell("ip", "-n", lab.router, "addr", "del", "10.0.1.3/24", "dev", "wan1")
            p.update(source=LINKS["2"][0], mark=LINKS["2"][1])
            await asyncio.to_thread(lab.drop_echo, lab.isp1)
            moved = await run.phase(1.0)
        assert all_lost(rec.rtts(*absent))
        assert all_replied(rec.rtts(*present)), rec.rtts(*present)
        assert all_replied(rec.rtts(*moved)), rec.rtts(*moved)  # now through isp2

    in_netns(lab.router, body)


def test_firewall_refusal_is_a_loss(lab: Topo, caplog: pytest.LogCaptureFixture) -> None:
    """An output firewall dropping link 2's probes (EPERM on send) costs only those probes."""
    caplog.set_level(logging.DEBUG, logger="uplinkd")
    r1, r2 = Recorder(), Recorder()

    async def body() -> None:
        async with Running(prober("1", r1), prober("2", r2)) as run:
            await asyncio.to_thread(
                lab.nft,
                lab.router,
                "table inet probetest {\n"
                "  chain output {\n"
                "    type filter hook output priority 0; policy accept;\n"
                "    meta mark & 0xff00 == 0x200 drop\n"
                "  }\n"
                "}\n",
            )
            try:
                refused = await run.phase(1.0)
            finally:
                await asyncio.to_thread(lab.undrop, lab.router)
            allowed = await run.phase(1.0)
        assert all_lost(r2.rtts(*refused)), r2.rtts(*refused)
        assert all_replied(r1.rtts(*refused)), r1.rtts(*refused)
        assert all_replied(r2.rtts(*allowed)), r2.rtts(*allowed)

    in_netns(lab.router, body)
    # icmplib reports EPERM as "broadcast not allowed"; the log names the real error.
    assert "Operation not permitted" in caplog.text


def test_probers_do_not_take_each_others_replies(lab: Topo) -> None:
    ra, rb, rc = Recorder(), Recorder(), Recorder()

    async def body() -> None:
        # a and b share a link (same source, same mark) and target: their sockets both see
        # every reply; only the ICMP id tells them apart. c probes the same target over link 2.
        a, b, c = prober("1", ra), prober("1", rb), prober("2", rc)
        assert len({a.ident, b.ident, c.ident}) == 3
        async with Running(a, b, c) as run:
            together = await run.phase(1.0)
            await asyncio.to_thread(lab.drop_echo, lab.isp1, f"icmp id {a.ident}")
            await asyncio.sleep(0.2)
            a_dropped = await run.phase(1.2)
        for rec in (ra, rb, rc):
            assert all_replied(rec.rtts(*together)), rec.rtts(*together)
        assert all_lost(ra.rtts(*a_dropped)), ra.rtts(*a_dropped)
        assert all_replied(rb.rtts(*a_dropped)), rb.rtts(*a_dropped)
        assert all_replied(rc.rtts(*a_dropped)), rc.rtts(*a_dropped)

    in_netns(lab.router, body)


def test_rounds_keep_the_interval(lab: Topo) -> None:
    fast, slow = Recorder(), Recorder()

    async def body() -> None:
        # A dead target makes every round last the whole timeout (150 ms < 200 ms interval).
        p = prober("1", fast, targets=(TARGET, DEAD))
        # Timeout 350 ms > interval 100 ms: rounds overlap, the cadence stays the interval.
        q = Prober("slow", [DEAD], "10.0.1.2", 0x100, 100, 350, slow)
        async with Running(p, q):
            t0 = time.monotonic()
            await asyncio.sleep(2.0)
            t1 = time.monotonic()
        n = len([r for r in fast.rounds if t0 <= r.at <= t1])
        assert 8 <= n <= 12, n
        assert 16 <= len([r for r in slow.rounds if t0 <= r.at <= t1]) <= 24, slow.rounds
        ats = [r.at for r in slow.rounds]
        assert 0.34 <= ats[0] - t0 <= 0.45, ats[0] - t0  # the first round waited its timeout
        gaps = [b - a for a, b in itertools.pairwise(ats)]
        assert all(0.05 <= g <= 0.15 for g in gaps), gaps  # in order, each round once
        assert all(r.replies == {DEAD: None} for r in slow.rounds)

    in_netns(lab.router, body)


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class ReversingResponder:
    """Answers, in `ns`, the echo requests with ICMP id `ident` to TARGET in bursts: it holds
    them until `burst` have arrived, then answers them newest first. The kernel's own echo
    replies are switched off in `ns` meanwhile."""

    def __init__(self, ns: str, ident: int, burst: int) -> None:
        self.ns, self.ident, self.burst = ns, ident, burst
        self.answered: list[list[int]] = []  # sequence numbers of each burst, in reply order
        self._ready, self._stop = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> ReversingResponder:
        sh("ip", "netns", "exec", self.ns, "sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=1")
        self._thread.start()
        assert self._ready.wait(5), "responder did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        sh("ip", "netns", "exec", self.ns, "sysctl", "-qw", "net.ipv4.icmp_echo_ignore_all=0")

    def _serve(self) -> None:
        enter_netns(self.ns)
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
            sock.bind((TARGET, 0))  # only requests to TARGET; replies come from it
            sock.settimeout(0.05)
            self._ready.set()
            held: list[tuple[str, bytes]] = []
            while not self._stop.is_set():
                try:
                    packet, (source, _) = sock.recvfrom(2048)
                except TimeoutError:
                    continue
                icmp = packet[(packet[0] & 0x0F) * 4 :]
                if icmp[0] != 8 or struct.unpack_from("!H", icmp, 4)[0] != self.ident:
                    continue
                held.append((source, icmp))
                if len(held) < self.burst:
                    continue
                for source, request in reversed(held):
                    reply = b"\0\0\0\0" + request[4:]  # type 0 (echo reply), code 0, checksum 0
                    reply = reply[:2] + struct.pack("!H", _checksum(reply)) + reply[4:]
                    sock.sendto(reply, (source, 0))
                self.answered.append([struct.unpack_from("!H", r, 6)[0] for _, r in held[::-1]])
                held.clear()


def test_replies_out_of_order_are_reported_in_round_order(lab: Topo) -> None:
    """Rounds that complete out of order (a later round answered first) are reported in the
    order they started, each with its own replies."""
    rec = Recorder()
    p = Prober("1", [TARGET], *LINKS["1"], 100, 350, rec)

    async def body() -> None:
        async with Running(p):
            await asyncio.sleep(1.65)

    with ReversingResponder(lab.isp1, p.ident, burst=3) as responder:
        in_netns(lab.router, body)
    bursts = len(responder.answered)
    assert bursts >= 4, responder.answered
    assert all(seqs == sorted(seqs, reverse=True) for seqs in responder.answered)
    rounds = rec.rounds
    assert len(rounds) == 3 * bursts, rounds  # the rounds of the last, partial burst are dropped
    rtts = [r.replies[TARGET] for r in rounds]
    assert all(rtt is not None and rtt < 350 for rtt in rtts), rtts
    sent = [r.at - (rtt or 0) / 1000 for r, rtt in zip(rounds, rtts, strict=True)]
    gaps = [b - a for a, b in itertools.pairwise(sent)]
    assert all(0.05 <= g <= 0.15 for g in gaps), gaps  # in the order sent, each round once
    for i in range(0, len(rounds), 3):  # each burst: the newest round completed first
        assert rounds[i].at > rounds[i + 1].at > rounds[i + 2].at, rounds[i : i + 3]


def test_stop_returns_promptly(lab: Topo) -> None:
    rec = Recorder()

    async def body() -> float:
        p = prober("1", rec, targets=(DEAD,))
        task = asyncio.create_task(p.run())
        await asyncio.sleep(0.5)
        t = time.monotonic()
        p.stop()
        await asyncio.wait_for(task, 1)
        return time.monotonic() - t

    assert in_netns(lab.router, body) < 0.05
    assert rec.rounds
