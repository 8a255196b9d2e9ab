"""Integration fixtures: the namespace lab, and uplinkd run inside its router namespace."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from uplinkd.lab import Lab

TWO_LINKS = """
[[link]]
name = "ISP1"
device = "wan1"
weight = {w1}

[[link]]
name = "ISP2"
device = "wan2"
weight = {w2}

[[lan]]
name = "LAN"
device = "lan0"
"""


ROOT_REASON = "integration tests need root, ip and nft (network namespaces, nftables)"
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("nft"), reason=ROOT_REASON
)


class Uplinkd:
    """Runs the uplinkd command line inside the lab's router namespace."""

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir

    def write_config(self, text: str, name: str = "uplinkd.toml") -> Path:
        path = self.workdir / name
        path.write_text(text)
        return path

    def run(self, config: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "uplinkd.cli", "--config", str(config), *argv]
        result = self.lab.run(self.lab.ns_router, *cmd, check=False, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(
                f"uplinkd {' '.join(argv)} exited {result.returncode}:\n{result.stderr}"
            )
        return result

    def kernel_state(self) -> str:
        """Everything uplinkd could have touched, as text to compare before/after."""
        parts = []
        for argv in (
            ("nft", "list", "ruleset"),
            # IPv4 only: the kernel adds IPv6 link-local routes whenever DAD completes.
            ("ip", "-4", "rule", "show"),
            ("ip", "-4", "route", "show", "table", "all"),
        ):
            parts.append(self.lab.run(self.lab.ns_router, *argv).stdout)
        return "\n".join(parts)


@pytest.fixture(scope="module")
def lab2() -> Iterator[Lab]:
    with Lab(isps=2) as lab:
        lab.start_server(lab.ns_inet, "203.0.113.10")
        yield lab


@pytest.fixture
def uplinkd(lab2: Lab, tmp_path: Path) -> Iterator[Uplinkd]:
    runner = Uplinkd(lab2, tmp_path)
    yield runner
    subprocess.run(
        ["ip", "netns", "exec", lab2.ns_router, sys.executable, "-m", "uplinkd.cli", "--stop"],
        check=False,
        capture_output=True,
    )
