"""The quick-start demo: uplinkd in the namespace lab, balancing and failing over.

Builds the lab (a LAN client, a router, two ISPs, an Internet host), runs the uplinkd daemon in
the router namespace with weights 1:3 and both links probing the Internet host, opens
connections from the LAN client and prints how they were shared per ISP; then cuts ISP1's cable
and shows the failover, plugs it back in and shows the recovery; then stops uplinkd and removes
the lab. Its traffic never leaves the lab's namespaces.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from .lab import INET_HOST, Lab

CONFIG = """\
# uplinkd demo: two ISPs weighted 1:3, one LAN; both probe the Internet host
[[link]]
name = "ISP1"
device = "wan1"
weight = 1
targets = ["203.0.113.10"]

[[link]]
name = "ISP2"
device = "wan2"
weight = 3
targets = ["203.0.113.10"]

[[lan]]
name = "LAN"
device = "lan0"

[default]
method = "weighted"
"""


def _uplinkd(lab: Lab, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", lab.ns_router, sys.executable, "-m", "uplinkd.cli", *argv]


def _until(what: str, done: Callable[[], bool], timeout: float = 20.0) -> float:
    """Poll until `done` holds; returns the seconds it took (bounded by `timeout`)."""
    start = time.monotonic()
    while not done():
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"gave up waiting: {what}")
        time.sleep(0.05)
    return time.monotonic() - start


def _report(title: str, counts: dict[str, int], failed: int) -> None:
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
        daemon = subprocess.Popen(_uplinkd(lab, "--config", str(config), "--no-dbus"), text=True)

        def counts(n: int) -> dict[str, int]:
            return lab.connect_many(lab.ns_lan, INET_HOST, 80, n, timeout=1.0).counts_by_isp()

        try:
            installed = ["nft", "list", "table", "inet", "uplinkd"]
            _until(
                "uplinkd's datapath",
                lambda: lab.run(lab.ns_router, *installed, check=False).returncode == 0,
            )
            time.sleep(1.5)  # let the probes confirm both links
            result = lab.connect_many(lab.ns_lan, INET_HOST, 80, connections)
            _report(
                f"{connections} new TCP connections from the LAN client (weights ISP1:ISP2 = 1:3):",
                result.counts_by_isp(),
                result.failed,
            )

            print("\nISP1's cable is pulled (carrier loss on the router's wan1) ...")
            lab.set_link(1, up=False)
            took = _until("failover to ISP2", lambda: counts(10)["ISP1"] == 0)
            result = lab.connect_many(lab.ns_lan, INET_HOST, 80, connections // 2)
            _report(
                f"... new connections left only by ISP2 within {took:.2f} s:",
                result.counts_by_isp(),
                result.failed,
            )

            print("\nISP1's cable is plugged back in ...")
            lab.set_link(1, up=True)
            took = _until("ISP1 back in use", lambda: counts(20)["ISP1"] > 0)
            result = lab.connect_many(lab.ns_lan, INET_HOST, 80, connections)
            _report(
                f"... ISP1 carries connections again within {took:.1f} s (once probes agree):",
                result.counts_by_isp(),
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
