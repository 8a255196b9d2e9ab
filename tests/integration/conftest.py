"""Integration fixtures: the namespace lab, and uplinkd run inside its router namespace."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
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


class LogReader:
    """Collects a process's stderr in a thread so a test can wait for a line, bounded."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._proc = proc
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()

    def join(self) -> None:
        """After the process ended: wait for the last lines and close the pipe."""
        self._thread.join(timeout=10)
        if self._proc.stderr is not None:
            self._proc.stderr.close()

    @property
    def text(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 15.0) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: needle in self.text, timeout)


class Daemon:
    """A running `uplinkd` daemon process and its log."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.log = LogReader(proc)

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def send(self, number: int) -> None:
        self.proc.send_signal(number)

    def stop(self, number: int = signal.SIGTERM) -> None:
        if self.running:
            self.proc.send_signal(number)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.join()


def first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """A process's first line of output, or "" if none came within `timeout` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> bool:
    """Poll `predicate` until it holds or `timeout` seconds pass (a bound, not a benchmark)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def tracked_marks(lab: Lab, port: int = 80) -> dict[int, int]:
    """How many TCP connections to `port` the router's conntrack table holds, per mark."""
    listed = lab.run(lab.ns_router, "conntrack", "-L", "-p", "tcp", "--dport", str(port))
    marks: dict[int, int] = {}
    for line in listed.stdout.splitlines():
        mark = next((int(f[5:]) for f in line.split() if f.startswith("mark=")), 0)
        marks[mark] = marks.get(mark, 0) + 1
    return marks


LEGACY_CHECK = (
    "from uplinkd.backends.iptables import IptablesBackend; IptablesBackend().check_available()"
)


def legacy_usable(lab: Lab) -> Lab:
    """The lab, or a skip naming why the legacy iptables backend cannot work in its router."""
    result = lab.run(lab.ns_router, sys.executable, "-c", LEGACY_CHECK, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["unknown"])[-1]
        pytest.skip(f"the legacy iptables backend cannot be used here: {reason}")
    return lab


class Uplinkd:
    """Runs the uplinkd command line inside the lab's router namespace.

    With a `backend`, TOML files it writes say `backend = "..."` and the other files (a
    balance.conf has no such key) get `--backend` on the command line.
    """

    def __init__(self, lab: Lab, workdir: Path, backend: str | None = None) -> None:
        self.lab = lab
        self.workdir = workdir
        self.backend = backend
        self.daemons: list[Daemon] = []
        if backend == "iptables":
            legacy_usable(lab)

    def write_config(self, text: str, name: str = "uplinkd.toml") -> Path:
        path = self.workdir / name
        if self.backend and path.suffix == ".toml":
            text = f'backend = "{self.backend}"\n' + text
        path.write_text(text)
        return path

    def run(self, config: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        chosen = ("--backend", self.backend) if self.backend and config.suffix != ".toml" else ()
        cmd = [sys.executable, "-m", "uplinkd.cli", "--config", str(config), *chosen, *argv]
        result = self.lab.run(self.lab.ns_router, *cmd, check=False, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(
                f"uplinkd {' '.join(argv)} exited {result.returncode}:\n{result.stderr}"
            )
        return result

    def start(
        self,
        config: Path,
        *argv: str,
        ready: str | None = "applied generation",
        bus_address: str | None = None,
    ) -> Daemon:
        """The daemon in the router namespace; waits (bounded) until it applied.

        Without `bus_address` it runs with --no-dbus, so no test touches the host's system bus.
        """
        cmd = ["ip", "netns", "exec", self.lab.ns_router, sys.executable, "-m", "uplinkd.cli"]
        env = dict(os.environ)
        if bus_address is None:
            argv = ("--no-dbus", *argv)
        else:
            env["DBUS_SYSTEM_BUS_ADDRESS"] = bus_address
        proc = subprocess.Popen(
            [*cmd, "--config", str(config), *argv], stderr=subprocess.PIPE, text=True, env=env
        )
        daemon = Daemon(proc)
        self.daemons.append(daemon)
        if ready is not None and not daemon.log.wait_for(ready):
            daemon.stop()
            raise AssertionError(f"uplinkd did not get ready:\n{daemon.log.text}")
        return daemon

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
    stop_all(runner)


def stop_all(runner: Uplinkd) -> None:
    """Stop the runner's daemons and remove its backend's datapath from the lab's router."""
    for daemon in runner.daemons:
        daemon.stop()
    argv = [
        sys.executable,
        "-m",
        "uplinkd.cli",
        "--stop",
        "--backend",
        runner.backend or "nftables",
    ]
    runner.lab.run(runner.lab.ns_router, *argv, check=False)
