"""The quick-start demo: uplinkd in the namespace lab, balancing a LAN client's connections.

Builds the lab (a LAN client, a router, two ISPs, an Internet host), runs the uplinkd daemon in
the router namespace with weights 1:3, opens connections from the LAN client, and prints how they
were shared per ISP; then marks ISP1 down (`uplinkd --once ISP2`) and shows the failover; then
stops uplinkd and removes the lab.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .lab import INET_HOST, Lab

CONFIG = """\
# uplinkd demo: two ISPs weighted 1:3, one LAN
[[link]]
name = "ISP1"
device = "wan1"
weight = 1

[[link]]
name = "ISP2"
device = "wan2"
weight = 3

[[lan]]
name = "LAN"
device = "lan0"

[default]
method = "weighted"
"""


def _uplinkd(lab: Lab, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", lab.ns_router, sys.executable, "-m", "uplinkd.cli", *argv]


def _wait_installed(lab: Lab, daemon: subprocess.Popen[str], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if daemon.poll() is not None:
            raise RuntimeError(f"uplinkd exited with {daemon.returncode}")
        status = lab.run(lab.ns_router, sys.executable, "-m", "uplinkd.ctl", "status", check=False)
        if status.returncode == 0:
            return
        time.sleep(0.2)
    raise RuntimeError("uplinkd did not install its datapath in time")


def _report(title: str, lab: Lab, counts: dict[str, int], failed: int) -> None:
    total = sum(counts.values())
    print(f"\n{title}")
    print(f"  {'ISP':<6} {'connections':>11} {'share':>7}")
    for isp, n in counts.items():
        share = 100 * n / total if total else 0.0
        print(f"  {isp:<6} {n:>11} {share:>6.1f}%")
    print(f"  failed connections: {failed}")


def run(connections: int) -> int:
    with Lab(isps=2) as lab, tempfile.TemporaryDirectory(prefix="uplinkd-demo-") as tmp:
        config = Path(tmp) / "uplinkd.toml"
        config.write_text(CONFIG)
        print(f"lab {lab.prefix}: LAN client -> router (uplinkd) -> ISP1, ISP2 -> {INET_HOST}")
        print(
            f"configuration ({config}):\n" + "".join(f"  {line}\n" for line in CONFIG.splitlines())
        )
        lab.start_server(lab.ns_inet, INET_HOST, [80])
        daemon = subprocess.Popen(_uplinkd(lab, "--config", str(config)), text=True)
        try:
            _wait_installed(lab, daemon)
            result = lab.connect_many(lab.ns_lan, INET_HOST, 80, connections)
            _report(
                f"{connections} new TCP connections from the LAN client (weights ISP1:ISP2 = 1:3):",
                lab,
                result.counts_by_isp(lab),
                result.failed,
            )
            subprocess.run(_uplinkd(lab, "--config", str(config), "--once", "ISP2"), check=True)
            result = lab.connect_many(lab.ns_lan, INET_HOST, 80, connections // 2)
            _report(
                "ISP1 marked down (uplinkd --once ISP2: a map update, no rebuild);"
                " new connections:",
                lab,
                result.counts_by_isp(lab),
                result.failed,
            )
        finally:
            daemon.terminate()
            daemon.wait(10)
            subprocess.run(_uplinkd(lab, "--config", str(config), "--stop"), check=False)
    print("\nuplinkd stopped, its datapath removed, the lab deleted.")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="uplinkd-demo", description=__doc__)
    p.add_argument("--connections", type=int, default=1000)
    args = p.parse_args(argv)
    return run(args.connections)


if __name__ == "__main__":
    sys.exit(main())
