"""One uplinkd per network namespace, and runs without the privilege to change the kernel (root).

A second daemon, `--once` or `--stop` beside a running daemon would overwrite (or remove) its
plan; each must exit 1 with one line naming the daemon's pid and leave the kernel as it was.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from uplinkd_lab.lab import INET_HOST, Lab

from .conftest import TWO_LINKS, Daemon, Uplinkd, needs_root, wait_until

pytestmark = [needs_root, pytest.mark.lab, pytest.mark.timeout(120)]

REPO = Path(__file__).resolve().parents[2]
NOT_ROOT = (
    "uplinkd: error: run as root (or with CAP_NET_ADMIN): changing routes and nftables needs it\n"
)


def lock_file(lab: Lab, run_dir: Path) -> Path:
    """The lock of the lab router's network namespace."""
    inode = lab.run(lab.ns_router, "stat", "-L", "-c", "%i", "/proc/self/ns/net").stdout.strip()
    return run_dir / f"uplinkd-net{inode}.lock"


def settled(uplinkd: Uplinkd, daemon: Daemon) -> str:
    """The kernel state once the daemon has both links up and stopped changing it."""
    for name in ("ISP1", "ISP2"):
        assert daemon.log.wait_for(f"link {name}: init -> up"), daemon.log.text
    states = [uplinkd.kernel_state()]

    def unchanged() -> bool:
        states.append(uplinkd.kernel_state())
        return states[-1] == states[-2]

    assert wait_until(unchanged, 10, step=0.5), daemon.log.text
    return states[-1]


def exited(daemon: Daemon, timeout: float = 20) -> int:
    """The exit status of a process expected to end by itself (a refused second instance)."""
    code = daemon.proc.wait(timeout=timeout)
    daemon.log.join()
    return code


def refusal(holder: str, pid: int, lock: Path) -> str:
    return (
        f"uplinkd: error: {holder} (pid {pid}) is already running in this network namespace "
        f"(lock {lock})\n"
    )


@pytest.fixture
def running(uplinkd: Uplinkd) -> tuple[Daemon, str]:
    """A daemon with both links up, and the kernel state it applied."""
    daemon = uplinkd.start(uplinkd.write_config(TWO_LINKS.format(w1=1, w2=3)))
    return daemon, settled(uplinkd, daemon)


def test_second_daemon_exits_1_and_the_first_keeps_its_plan(
    lab2: Lab, uplinkd: Uplinkd, running: tuple[Daemon, str]
) -> None:
    first, state = running
    # The second one would keep ISP1 out of service: a plan of its own.
    other = uplinkd.write_config(TWO_LINKS.format(w1=5, w2=1), "other.toml")
    second = uplinkd.start(other, "ISP2", ready=None)
    assert exited(second) == 1
    lock = lock_file(lab2, Path("/run/uplinkd"))
    assert second.log.text == refusal("the uplinkd daemon", first.proc.pid, lock)
    assert first.running
    assert uplinkd.kernel_state() == state
    assert lock.read_text() == f"{first.proc.pid}\ndaemon\n"
    # A dry run changes nothing, so it needs no lock.
    assert "table inet uplinkd" in uplinkd.run(other, "-d").stdout


def test_once_beside_the_daemon_is_refused(
    lab2: Lab, uplinkd: Uplinkd, running: tuple[Daemon, str]
) -> None:
    first, state = running
    done = uplinkd.run(
        uplinkd.write_config(TWO_LINKS.format(w1=5, w2=1)), "--once", "ISP2", check=False
    )
    lock = lock_file(lab2, Path("/run/uplinkd"))
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == refusal("the uplinkd daemon", first.proc.pid, lock)
    assert first.running and uplinkd.kernel_state() == state


def test_stop_beside_the_daemon_is_refused_and_the_datapath_stays(
    lab2: Lab, uplinkd: Uplinkd, running: tuple[Daemon, str]
) -> None:
    first, state = running
    done = uplinkd.run(uplinkd.workdir / "uplinkd.toml", "--stop", check=False)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"uplinkd: error: --stop refused: the uplinkd daemon (pid {first.proc.pid}) is running "
        "in this network namespace and would apply its plan again; stop it first "
        "(systemctl stop uplinkd), then run --stop\n"
    )
    assert first.running and uplinkd.kernel_state() == state
    result = lab2.connect_many(lab2.ns_lan, INET_HOST, 80, 40)
    assert result.failed == 0 and len(result.counts_by_isp()) == 2


def test_lock_is_released_when_the_daemon_is_killed(lab2: Lab, uplinkd: Uplinkd) -> None:
    config = uplinkd.write_config(TWO_LINKS.format(w1=1, w2=1))
    killed = uplinkd.start(config)
    killed.stop(signal.SIGKILL)
    assert killed.proc.returncode == -signal.SIGKILL
    # A new daemon starts, and holds the lock itself: a third instance is refused naming it.
    second = uplinkd.start(config)
    done = uplinkd.run(config, "--once", check=False)
    lock = lock_file(lab2, Path("/run/uplinkd"))
    assert (done.returncode, done.stderr) == (
        1,
        refusal("the uplinkd daemon", second.proc.pid, lock),
    )


@pytest.fixture
def private_run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o755)
    monkeypatch.setenv("UPLINKD_RUN_DIR", str(run_dir))
    return run_dir


@pytest.mark.parametrize("mode", ["daemon", "--once", "--stop"])
@pytest.mark.parametrize("target_exists", [True, False])
def test_symlink_at_the_lock_path_is_not_followed(
    lab2: Lab, uplinkd: Uplinkd, private_run_dir: Path, mode: str, target_exists: bool
) -> None:
    target = uplinkd.workdir / "precious"
    if target_exists:
        target.write_text("keep me\n")
    lock = lock_file(lab2, private_run_dir)
    lock.symlink_to(target)
    config = uplinkd.write_config(TWO_LINKS.format(w1=1, w2=1))
    before = uplinkd.kernel_state()
    if mode == "daemon":
        daemon = uplinkd.start(config, ready=None)
        code, err = exited(daemon), daemon.log.text
    else:
        done = uplinkd.run(config, mode, check=False)
        code, err = done.returncode, done.stderr
    assert (code, err) == (
        1,
        f"uplinkd: error: unsafe lock file {lock}: a symbolic link; not followed, remove it\n",
    )
    assert lock.is_symlink()
    if target_exists:
        assert target.read_text() == "keep me\n"
    else:
        assert not target.exists()
    assert uplinkd.kernel_state() == before


@pytest.fixture
def readable_config() -> Iterator[Path]:
    """A configuration `nobody` may read (pytest's tmp_path is root's alone)."""
    directory = Path(tempfile.mkdtemp(prefix="uplinkd-nobody-"))
    try:
        directory.chmod(0o755)
        config = directory / "uplinkd.toml"
        config.write_text(TWO_LINKS.format(w1=1, w2=1))
        config.chmod(0o644)
        yield config
    finally:
        shutil.rmtree(directory)


def as_nobody(lab: Lab, config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    setpriv = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
    cmd = (sys.executable, "-m", "uplinkd.cli", "--config", str(config), *argv)
    return lab.run(lab.ns_router, *setpriv, *cmd, check=False, timeout=60)


def test_unprivileged_runs_are_one_line_and_exit_1(
    lab2: Lab, uplinkd: Uplinkd, readable_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to run uplinkd as nobody")
    monkeypatch.setenv("PYTHONPATH", str(REPO / "daemon"))
    probe = as_nobody(lab2, readable_config, "--version")
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot run this checkout's python: {probe.stderr.strip()}")
    uplinkd.run(readable_config, "--once")  # something a --stop could wrongly try to remove
    before = uplinkd.kernel_state()
    for mode in (["--no-dbus"], ["--once"], ["--stop"]):  # the daemon, then the one-shot modes
        done = as_nobody(lab2, readable_config, *mode)
        assert (mode, done.returncode, done.stdout, done.stderr) == (mode, 1, "", NOT_ROOT)
    assert uplinkd.kernel_state() == before
    # A dry run only reads the kernel (netlink dumps need no privilege): it works.
    done = as_nobody(lab2, readable_config, "-d")
    assert (done.returncode, done.stderr) == (0, "")
    assert "table inet uplinkd" in done.stdout
    assert "route replace default via 10.0.1.1 dev wan1 table 201" in done.stdout


@pytest.mark.parametrize("mode", [[], ["--once"], ["--stop"]])
def test_part_without_dry_run_is_refused(uplinkd: Uplinkd, mode: list[str]) -> None:
    before = uplinkd.kernel_state()
    config = uplinkd.write_config(TWO_LINKS.format(w1=1, w2=1))
    done = uplinkd.run(config, "--no-dbus", *mode, "--part", "nft", check=False)
    assert done.returncode == 2
    assert done.stderr.endswith("uplinkd: error: --part is an option of -d (dry run)\n")
    assert uplinkd.kernel_state() == before
