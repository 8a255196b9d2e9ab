"""Balance accuracy (item 4): how 10,000 new connections through the lab split by weight.

The router gets uplinkd's datapath for the weighted method (``uplinkd --once``: the ruleset the
daemon installs, without probing, so no link state change can interfere), the LAN client opens
`connections` sequential TCP connections to the Internet host (lab.connect_many), and the
who-am-I server's answers say which ISP carried each. Per weight set: each link's share against
its configured share (the largest difference, in percentage points) and Pearson's chi-square
test of the counts against the weights (p-value: the chance of a deviation at least this large
if each connection picks a link independently with exactly the configured probabilities).
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from uplinkd_lab.lab import INET_HOST, Lab

from tests.integration.conftest import Uplinkd

from .stats import chi_square

WEIGHTS = ((1, 1), (1, 3), (1, 3, 2))


def config_text(weights: tuple[int, ...]) -> str:
    links = "".join(
        f'[[link]]\nname = "ISP{i}"\ndevice = "wan{i}"\nweight = {w}\n\n'
        for i, w in enumerate(weights, start=1)
    )
    return links + '[[lan]]\nname = "LAN"\ndevice = "lan0"\n\n[default]\nmethod = "weighted"\n'


def measure(
    lab: Lab, runner: Uplinkd, weights: tuple[int, ...], connections: int
) -> dict[str, object]:
    config = runner.write_config(config_text(weights))
    lab.run(lab.ns_router, "conntrack", "-F", check=False)
    runner.run(config, "--once")
    try:
        result = lab.connect_many(lab.ns_lan, INET_HOST, 80, connections, timeout=2.0)
    finally:
        runner.run(config, "--stop", check=False)
    counts = result.counts_by_isp()
    observed = [counts[f"ISP{i}"] for i in range(1, len(weights) + 1)]
    total = sum(observed)
    shares = [n / total for n in observed] if total else [0.0] * len(observed)
    expected = [w / sum(weights) for w in weights]
    statistic, p_value = chi_square(observed, weights)
    return {
        "weights": list(weights),
        "connections": connections,
        "succeeded": result.ok,
        "failed": result.failed,
        "counts": observed,
        "other": sum(counts.values()) - total,  # addresses of no configured link: must be 0
        "shares": shares,
        "expected": expected,
        "max_deviation_points": max(abs(s - e) for s, e in zip(shares, expected, strict=True))
        * 100,
        "chi2": statistic,
        "p_value": p_value,
        "elapsed_s": result.elapsed_s,
    }


def run(connections: int, log: Callable[[str], None]) -> dict[str, object]:
    out: dict[str, object] = {}
    with Lab(isps=3) as lab, tempfile.TemporaryDirectory(prefix="uplinkd-bench-") as tmp:
        lab.start_server(lab.ns_inet, INET_HOST, [80])
        runner = Uplinkd(lab, Path(tmp), readback=False)
        for weights in WEIGHTS:
            name = ":".join(map(str, weights))
            figures = measure(lab, runner, weights, connections)
            out[name] = figures
            log(
                f"  {name}: counts {figures['counts']}, max deviation"
                f" {figures['max_deviation_points']:.2f} points, p = {figures['p_value']:.3f}"
            )
    return out
