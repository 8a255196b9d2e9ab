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
from contextlib import contextmanager
from pathlib import Path

import pytest
from uplinkd_lab.lab import Lab

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
    """Collects a process's stderr in a thread so a test can wait for a line, bounded.

    `on_line` runs in that thread for each line, after waiters have seen it.
    """

    def __init__(
        self, proc: subprocess.Popen[str], on_line: Callable[[str], None] | None = None
    ) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._proc = proc
        self._on_line = on_line
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
            if self._on_line is not None:
                self._on_line(line)

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
    """A running `uplinkd` daemon process and its log.

    With `readback` (see nft_readback_problem), the datapath is checked after each apply the
    daemon logs and once more when the test stops it; what failed is in `nft_problems`, and
    `stop` raises it once the process is gone.
    """

    def __init__(
        self, proc: subprocess.Popen[str], readback: Callable[[], str | None] | None = None
    ) -> None:
        self.proc = proc
        self.nft_problems: list[str] = []
        self._readback = readback
        self.log = LogReader(proc, self._after_line if readback is not None else None)

    def _after_line(self, line: str) -> None:
        if APPLIED in line:
            self._check_readback(f"after {line.strip()!r}")

    def _check_readback(self, when: str) -> None:
        assert self._readback is not None
        try:
            problem = self._readback()
        except Exception as exc:  # noqa: BLE001 - reported by stop(), not lost in a thread
            problem = f"the check itself failed: {exc!r}"
        if problem is not None:
            self.nft_problems.append(f"{when}: {problem}")

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def send(self, number: int) -> None:
        self.proc.send_signal(number)

    def stop(self, number: int = signal.SIGTERM) -> None:
        if self.running:
            if self._readback is not None:
                self._check_readback("before the daemon was stopped")
            self.proc.send_signal(number)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.join()
        self.raise_nft_problems()

    def raise_nft_problems(self) -> None:
        problems, self.nft_problems = self.nft_problems, []  # reported once
        if problems:
            raise AssertionError(
                "the distribution's nft failed on uplinkd's datapath:\n" + "\n".join(problems)
            )


def first_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """A process's first line of output, or "" if none came within `timeout` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline() if ready else ""


# Mail servers for the daemon, on the router's loopback (where it mails from), printing "ready"
# once they listen. This one accepts every connection, says "connected" and never a word more.
SILENT_SMTP = """
import socket, sys
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", int(sys.argv[1])))
listener.listen(64)
print("ready", flush=True)
held = []
while True:
    connection, _ = listener.accept()
    held.append(connection)
    print("connected", flush=True)
"""


def mail_to_admin(text: str, port: int, extra: str = "") -> str:
    """`text` (with a [monitor] table) mailing noc@example.net through 127.0.0.1:`port`."""
    text = text.replace("[monitor]\n", '[monitor]\nwarn_email = "noc@example.net"\n', 1)
    return text + f'\n[mail]\nsmtp_server = "127.0.0.1:{port}"\n{extra}'


@contextmanager
def in_router(lab: Lab, script: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """A Python script run in the router's namespace, once it printed "ready"; killed at exit.
    Its stdout is the process's, for the lines it prints next."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns_router, sys.executable, "-c", script, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        ready = first_line(proc, 30).strip()
        assert ready == "ready", f"{script.strip().splitlines()[0]}: did not start ({ready!r})"
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stdin is not None:
            proc.stdin.close()


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
    "from uplinkd.datapath.backends.iptables import IptablesBackend\n"
    "IptablesBackend().check_available()"
)


def legacy_usable(lab: Lab) -> Lab:
    """The lab, or a skip naming why the legacy iptables backend cannot work in its router."""
    result = lab.run(lab.ns_router, sys.executable, "-c", LEGACY_CHECK, check=False)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["unknown"])[-1]
        pytest.skip(f"the legacy iptables backend cannot be used here: {reason}")
    return lab


APPLIED = "applied generation"  # the daemon's log line after each apply
SIGSEGV_EXIT = 139  # what a shell reports for a process killed by SIGSEGV


def _exit_status(returncode: int) -> str:
    if returncode < 0:  # `ip netns exec` execs nft: killed by a signal, as subprocess reports it
        returncode = 128 - returncode
    return f"{returncode} (segfault)" if returncode == SIGSEGV_EXIT else str(returncode)


def nft_readback_problem(
    lab: Lab, *listing: str, live: bool = False, load: bool = True
) -> str | None:
    """What an admin's first commands make of the router's ruleset, or None when all is well.

    The distribution's `nft` must list the ruleset (Debian 12's nft 1.0.6 segfaulted on a map
    declared `typeof jhash ...`), and the listing must load back with `nft -c -f -` (check
    mode: the kernel validates the transaction, nothing is committed). `listing` is the nft
    arguments (default: list ruleset). The listing is loaded after `flush ruleset`, as a saved
    /etc/nftables.conf would be: a daemon may change a map between the listing and the check,
    and an element added again with another verdict is refused (EEXIST). With `live`, it is
    loaded on top of the ruleset in force instead (only while nothing changes it); without
    `load`, only listed (a partial listing such as `list maps` names chains it does not hold).
    """
    argv = ("nft", *(listing or ("list", "ruleset")))
    listed = lab.run(lab.ns_router, *argv, check=False)
    if listed.returncode != 0:
        if "Cannot open network namespace" in listed.stderr:
            return None  # the lab is gone already: nothing to list
        status = _exit_status(listed.returncode)
        return f"`{' '.join(argv)}` exited {status}: {listed.stderr.strip()}"
    if not load:
        return None
    text = listed.stdout if live else "flush ruleset\n" + listed.stdout
    loaded = lab.run(lab.ns_router, "nft", "-c", "-f", "-", stdin=text, check=False)
    if loaded.returncode != 0:
        status = _exit_status(loaded.returncode)
        how = "on top of the ruleset in force" if live else "after flush ruleset"
        return (
            f"`nft -c -f -` of the output of `{' '.join(argv)}` ({how}) exited {status}: "
            f"{loaded.stderr.strip()}\n{listed.stdout}"
        )
    return None


def check_nft_readback(lab: Lab, *listing: str, live: bool = False, load: bool = True) -> None:
    problem = nft_readback_problem(lab, *listing, live=live, load=load)
    if problem is not None:
        raise AssertionError(f"the distribution's nft failed on the router's ruleset: {problem}")


class Uplinkd:
    """Runs the uplinkd command line inside the lab's router namespace.

    With a `backend`, TOML files it writes say `backend = "..."` and the other files (a
    balance.conf has no such key) get `--backend` on the command line.

    After each run and each apply of a daemon it started, the router's ruleset is checked the
    way an admin would look at it (check_nft_readback): `nft list ruleset` works and its output
    loads back with `nft -c -f -` (unless `readback` is off, as in the benchmarks).
    """

    def __init__(
        self, lab: Lab, workdir: Path, backend: str | None = None, *, readback: bool = True
    ) -> None:
        self.lab = lab
        self.workdir = workdir
        self.backend = backend
        # Off for the benchmarks: two nft processes per apply would load what they measure.
        self.readback = readback
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
        if self.readback:
            check_nft_readback(self.lab)
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
        daemon = Daemon(proc, (lambda: nft_readback_problem(self.lab)) if self.readback else None)
        self.daemons.append(daemon)
        if ready is not None and not daemon.log.wait_for(ready):
            found = ""
            try:
                daemon.stop()
            except AssertionError as exc:  # not ready comes first; what nft said, after it
                found = f"\n{exc}"
            raise AssertionError(f"uplinkd did not get ready:\n{daemon.log.text}{found}")
        return daemon

    def kernel_state(self) -> str:
        """Everything uplinkd could have touched, as text to compare before/after."""
        if self.readback:
            check_nft_readback(self.lab)
        for daemon in self.daemons:
            daemon.raise_nft_problems()
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
    """Stop the runner's daemons and remove its backend's datapath from the lab's router; then
    fail with what nft made of the datapath they applied, if anything failed."""
    problems = []
    for daemon in runner.daemons:
        try:
            daemon.stop()
        except AssertionError as exc:
            problems.append(str(exc))
    argv = [
        sys.executable,
        "-m",
        "uplinkd.cli",
        "--stop",
        "--backend",
        runner.backend or "nftables",
    ]
    runner.lab.run(runner.lab.ns_router, *argv, check=False)
    if problems:
        raise AssertionError("\n".join(problems))
