"""Footprint (item 6): the daemon's memory and CPU while it probes and measures its links.

A lab with 4 ISPs, then one with 32 (the lab builds 32 ISP namespaces in a few seconds, so every
link is a real ISP whose Internet host answers the probes through it). The daemon runs with
uplinkd's default monitoring (5 probe rounds a second per link) and every link probing the
Internet host; once every link is up and a settling second has passed, its CPU time (utime +
stime from /proc/PID/stat) is read over `seconds`, and its resident memory (VmRSS, and the peak
VmHWM) at the end. CPU is given as a percentage of one core.

Each size runs twice: with the weighted method, where the measurement loops are the probes and
the traffic-rate sampling (interface counters once a second), and with the lowest-latency method
in a lab whose ISPs have 2nd and 3rd hops, which adds the TTL-limited hop probes of every link.
The difference is what the measured methods' loops cost (issue 6, item 8).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from uplinkd.config.model import Monitor
from uplinkd_lab.lab import INET_HOST, Lab

from tests.integration.conftest import Uplinkd

SIZES = (4, 32)


METHODS = ("weighted", "lowest-latency")


def config_text(links: int, method: str = "weighted") -> str:
    parts = [
        f'[[link]]\nname = "ISP{i}"\ndevice = "wan{i}"\ntargets = ["{INET_HOST}"]\n'
        for i in range(1, links + 1)
    ]
    lan = '[[lan]]\nname = "LAN"\ndevice = "lan0"\n'
    return "\n".join([*parts, lan, f'[default]\nmethod = "{method}"\n'])


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _memory_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def measure(links: int, seconds: float, method: str = "weighted") -> dict[str, object]:
    begin = time.monotonic()
    hops = method == "lowest-latency"
    with (
        Lab(isps=links, hops=hops) as lab,
        tempfile.TemporaryDirectory(prefix="uplinkd-bench-") as tmp,
    ):
        built = time.monotonic() - begin
        lab.start_server(lab.ns_inet, INET_HOST, [80])
        runner = Uplinkd(lab, Path(tmp), readback=False)
        config = runner.write_config(config_text(links, method))
        daemon = runner.start(config)
        try:
            pid = daemon.proc.pid  # `ip netns exec` execs the command: this is the daemon
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"uplinkd.cli" not in cmdline:
                raise RuntimeError(f"pid {pid} is not the daemon: {cmdline!r}")
            for i in range(1, links + 1):
                if not daemon.log.wait_for(f"link ISP{i}: init -> up", 20):
                    raise RuntimeError(f"ISP{i} did not come up:\n{daemon.log.text}")
            time.sleep(1.0)
            cpu0, t0 = _cpu_seconds(pid), time.monotonic()
            time.sleep(seconds)
            cpu1, t1 = _cpu_seconds(pid), time.monotonic()
            memory = _memory_kib(pid)
            transitions = daemon.log.text.count(" -> ")
        finally:
            daemon.stop()
            runner.run(config, "--stop", check=False)
    cpu_percent = 100 * (cpu1 - cpu0) / (t1 - t0)
    return {
        "links": links,
        "method": method,
        "hop_probes": hops,
        "lab_build_s": built,
        "window_s": t1 - t0,
        "cpu_percent": cpu_percent,
        "cpu_percent_per_link": cpu_percent / links,
        "rss_mib": memory["VmRSS"] / 1024,
        "peak_rss_mib": memory["VmHWM"] / 1024,
        "probe_rounds_per_s": links * 1000 / Monitor().interval_ms,
        "transitions": transitions,  # init -> up once per link; more would mean a flapping link
    }


def run(seconds: float, log: Callable[[str], None]) -> dict[str, object]:
    out: dict[str, object] = {}
    for links in SIZES:
        for method in METHODS:
            figures = measure(links, seconds, method)
            out[f"{links} {method}"] = figures
            log(
                f"  {links} links, {method}: CPU {figures['cpu_percent']:.1f} % of a core,"
                f" RSS {figures['rss_mib']:.1f} MiB (lab built in {figures['lab_build_s']:.1f} s)"
            )
    return out
