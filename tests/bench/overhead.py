"""Datapath overhead (item 5): uplinkd's ruleset against plain routing and masquerade.

One lab, two setups of its router, switched back and forth:

- ``uplinkd``: the ruleset and policy routing of ``uplinkd --once`` (weights 1:1 over ISP1 and
  ISP2; the kernel forwards, no daemon runs);
- ``plain``: no uplinkd, a default route via ISP1 and one masquerade rule (what a router with
  a single uplink has; the ISPs' paths are identical, so which one carries a flow is immaterial).

Each repetition is a pair of runs, one per setup, in alternating order (uplinkd first in even
pairs, plain first in odd ones), so a drift of the machine affects both alike. A run: a warm-up
of 50 connections, bulk TCP throughput from the LAN client to the Internet host for `seconds`
(bulk.py, one flow), then the rate of `connections` sequential new connections
(lab.connect_many: connect, read the who-am-I answer, close); a shorter run before the first
pair is not counted (a fresh lab's first run is slower). Clients run on CPU 0, servers on
CPU 1 (where a single flow's two ends land otherwise swings its throughput by tens of percent).
Both setups keep the rp_filter=2 uplinkd writes on wan1/wan2 (--stop leaves sysctls), so they
differ in the ruleset and routing only. Reported per pair: uplinkd's figure divided by plain's;
over the pairs: the median ratio and its spread (min, max).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from uplinkd_lab.lab import INET_HOST, Lab

from tests.integration.conftest import Uplinkd

from .stats import summary

BULK = Path(__file__).with_name("bulk.py")
BULK_PORT = 5201
CONFIG = """
[[link]]
name = "ISP1"
device = "wan1"

[[link]]
name = "ISP2"
device = "wan2"

[[lan]]
name = "LAN"
device = "lan0"
"""
PLAIN_NAT = """table ip benchplain {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname { "wan1", "wan2" } masquerade
    }
}
"""


class Setups:
    """Switches the lab's router between the two setups."""

    def __init__(self, lab: Lab, runner: Uplinkd) -> None:
        self.lab = lab
        self.runner = runner
        self.config = runner.write_config(CONFIG)

    def enable(self, name: str) -> None:
        self.lab.run(self.lab.ns_router, "conntrack", "-F", check=False)
        if name == "uplinkd":
            self.runner.run(self.config, "--once")
        else:
            self.lab.run(self.lab.ns_router, "ip", "route", "replace", "default", "via", "10.0.1.1")
            self.lab.run(self.lab.ns_router, "nft", "-f", "-", stdin=PLAIN_NAT)

    def disable(self, name: str) -> None:
        if name == "uplinkd":
            self.runner.run(self.config, "--stop")
        else:
            self.lab.run(self.lab.ns_router, "ip", "route", "del", "default", check=False)
            self.lab.run(self.lab.ns_router, "nft", "delete", "table", "ip", "benchplain")


# Clients on one core, servers on the other: where the scheduler puts a single flow's two ends
# otherwise changes its throughput by more than any ruleset does.
CLIENT_CPU, SERVER_CPU = 0, 1
PIN = (os.cpu_count() or 1) >= 2


@contextlib.contextmanager
def _pinned(cpu: int) -> Iterator[None]:
    """Processes started inside inherit this CPU (lab.connect_many's client, for one)."""
    if not PIN:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def _bulk(lab: Lab, seconds: float) -> float:
    argv = [*_taskset(CLIENT_CPU), sys.executable, str(BULK), "send", "--dst", INET_HOST]
    argv += ["--port", str(BULK_PORT)]
    out = lab.run(lab.ns_lan, *argv, "--seconds", str(seconds), timeout=seconds + 30).stdout
    return float(json.loads(out)["bits_per_second"])


def _taskset(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if PIN else []


def _one_run(lab: Lab, seconds: float, connections: int) -> dict[str, float]:
    with _pinned(CLIENT_CPU):
        lab.connect_many(lab.ns_lan, INET_HOST, 80, 50, timeout=2.0)
        bits = _bulk(lab, seconds)
        result = lab.connect_many(lab.ns_lan, INET_HOST, 80, connections, timeout=2.0)
    if result.failed:
        raise RuntimeError(f"{result.failed} of {connections} connections failed: {result.errors}")
    return {"bits_per_second": bits, "connections_per_second": result.ok / result.elapsed_s}


def run(
    pairs: int, seconds: float, connections: int, log: Callable[[str], None]
) -> dict[str, object]:
    runs: list[dict[str, object]] = []
    with Lab(isps=2) as lab, tempfile.TemporaryDirectory(prefix="uplinkd-bench-") as tmp:
        whoami = lab.start_server(lab.ns_inet, INET_HOST, [80])
        if PIN:
            os.sched_setaffinity(whoami.proc.pid, {SERVER_CPU})
        receiver = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                lab.ns_inet,
                *_taskset(SERVER_CPU),
                sys.executable,
                str(BULK),
                "serve",
                "--address",
                INET_HOST,
                "--port",
                str(BULK_PORT),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert receiver.stdout is not None
            if receiver.stdout.readline().strip() != "listening":
                raise RuntimeError("the bulk receiver did not start")
            setups = Setups(lab, Uplinkd(lab, Path(tmp), readback=False))
            setups.enable("plain")  # a first run in a fresh lab is slower; it is not counted
            try:
                _one_run(lab, seconds / 2, connections // 4)
            finally:
                setups.disable("plain")
            for pair in range(pairs):
                order = ("uplinkd", "plain") if pair % 2 == 0 else ("plain", "uplinkd")
                for name in order:
                    setups.enable(name)
                    try:
                        figures = _one_run(lab, seconds, connections)
                    finally:
                        setups.disable(name)
                    runs.append({"pair": pair, "setup": name, **figures})
                    log(
                        f"  pair {pair} {name}: {figures['bits_per_second'] / 1e9:.2f} Gbit/s,"
                        f" {figures['connections_per_second']:.0f} connections/s"
                    )
        finally:
            receiver.kill()
            receiver.wait(timeout=10)
            if receiver.stdout is not None:
                receiver.stdout.close()
    return _ratios(runs, pairs) | {"runs": runs, "seconds": seconds, "connections": connections}


def _ratios(runs: list[dict[str, object]], pairs: int) -> dict[str, object]:
    out: dict[str, object] = {}
    for figure in ("bits_per_second", "connections_per_second"):
        ratios = []
        for pair in range(pairs):
            by_setup = {r["setup"]: float(r[figure]) for r in runs if r["pair"] == pair}  # type: ignore[arg-type]
            ratios.append(by_setup["uplinkd"] / by_setup["plain"])
        values = {
            setup: summary([float(r[figure]) for r in runs if r["setup"] == setup])  # type: ignore[arg-type]
            for setup in ("uplinkd", "plain")
        }
        out[figure] = {"ratio": summary(ratios), "ratios": ratios, **values}
    return out
