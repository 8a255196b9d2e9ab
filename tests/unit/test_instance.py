"""The instance lock and the privilege check, on files in a temporary run directory (no root).

Another process holding the lock is a real process: flock conflicts between open files, and the
kernel's release when its holder is killed is what the lock relies on.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from uplinkd.runtime import instance

HOLD = """
import sys
from pathlib import Path
from uplinkd.runtime import instance
lock = instance.acquire("daemon", Path(sys.argv[1]))
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


def lock_path(run_dir: Path) -> Path:
    return run_dir / instance.lock_name()


def holder(run_dir: Path) -> subprocess.Popen[str]:
    """A process holding the lock until its stdin closes or it is killed."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline() == "held\n"
    return proc


def test_second_instance_is_refused_naming_the_holder(run_dir: Path) -> None:
    first = instance.acquire("daemon", run_dir)
    try:
        assert lock_path(run_dir).read_text() == f"{os.getpid()}\ndaemon\n"
        with pytest.raises(instance.AlreadyRunningError) as refused:
            instance.acquire("once", run_dir)
        assert (refused.value.pid, refused.value.mode) == (os.getpid(), "daemon")
        assert str(refused.value) == (
            f"the uplinkd daemon (pid {os.getpid()}) is already running in this network "
            f"namespace (lock {lock_path(run_dir)})"
        )
    finally:
        first.release()
    assert not lock_path(run_dir).exists()  # released: removed while still held
    instance.acquire("stop", run_dir).release()


def test_lock_dies_with_its_holder(run_dir: Path) -> None:
    proc = holder(run_dir)
    try:
        with pytest.raises(instance.AlreadyRunningError) as refused:
            instance.acquire("once", run_dir)
        assert refused.value.pid == proc.pid
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert lock_path(run_dir).exists()  # a kill leaves the file; the kernel dropped the flock
    lock = instance.acquire("once", run_dir)
    assert lock_path(run_dir).read_text() == f"{os.getpid()}\nonce\n"
    lock.release()


def test_lock_is_not_inherited_by_child_processes(run_dir: Path) -> None:
    lock = instance.acquire("daemon", run_dir)
    try:
        # A hook started by the daemon must not keep the lock after the daemon dies.
        assert not os.get_inheritable(lock.fd)
        assert not os.get_inheritable(lock.dir_fd)
    finally:
        lock.release()


@pytest.mark.parametrize("target_exists", [True, False])
def test_symlink_at_the_lock_path_is_not_followed(
    run_dir: Path, tmp_path: Path, target_exists: bool
) -> None:
    target = tmp_path / "precious"
    if target_exists:
        target.write_text("keep me\n")
    run_dir.mkdir(mode=0o755)
    lock_path(run_dir).symlink_to(target)
    with pytest.raises(instance.LockFileError, match="a symbolic link; not followed"):
        instance.acquire("daemon", run_dir)
    if target_exists:
        assert target.read_text() == "keep me\n"
    else:
        assert not target.exists()
    assert lock_path(run_dir).is_symlink()


def test_hard_link_at_the_lock_path_is_not_truncated(run_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    run_dir.mkdir(mode=0o755)
    os.link(target, lock_path(run_dir))
    with pytest.raises(instance.LockFileError, match="not a regular file of ours"):
        instance.acquire("daemon", run_dir)
    assert target.read_text() == "keep me\n"


def test_symlinked_run_directory_is_refused(run_dir: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o755)
    run_dir.symlink_to(elsewhere)
    with pytest.raises(instance.LockFileError, match=r"unsafe run directory .*: a symbolic link"):
        instance.acquire("daemon", run_dir)
    assert list(elsewhere.iterdir()) == []


def test_run_directory_others_can_write_is_refused(run_dir: Path) -> None:
    run_dir.mkdir()
    run_dir.chmod(0o777)
    with pytest.raises(instance.LockFileError, match=r"writable by group or others"):
        instance.acquire("daemon", run_dir)
    assert list(run_dir.iterdir()) == []


def test_run_directory_is_created_writable_by_its_owner_only(run_dir: Path) -> None:
    instance.acquire("daemon", run_dir).release()
    assert run_dir.stat().st_mode & 0o7777 == 0o755 & ~current_umask()
    assert run_dir.stat().st_uid == os.geteuid()


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_lock_name_is_per_network_namespace() -> None:
    netns = os.stat("/proc/self/ns/net").st_ino
    assert instance.lock_name() == f"uplinkd-net{netns}.lock"


def test_run_directory_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UPLINKD_RUN_DIR", raising=False)
    assert instance.run_dir() == Path("/run/uplinkd")
    monkeypatch.setenv("UPLINKD_RUN_DIR", "/tmp/elsewhere")
    assert instance.run_dir() == Path("/tmp/elsewhere")


def status_file(tmp_path: Path, cap_eff: str) -> Path:
    path = tmp_path / "status"
    path.write_text(f"Name:\tuplinkd\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff}\n")
    return path


@pytest.mark.parametrize(
    ("cap_eff", "allowed"),
    [
        ("000001ffffffffff", True),  # root
        ("0000000000001000", True),  # CAP_NET_ADMIN alone (a service user with it)
        ("0000000000003000", True),  # with CAP_NET_RAW
        ("0000000000002000", False),  # CAP_NET_RAW alone
        ("0000000000000000", False),  # a normal user
    ],
)
def test_privilege_is_the_effective_net_admin_capability(
    tmp_path: Path, cap_eff: str, allowed: bool
) -> None:
    status = status_file(tmp_path, cap_eff)
    if allowed:
        instance.require_net_admin(status)
        return
    with pytest.raises(instance.NotPrivilegedError) as refused:
        instance.require_net_admin(status)
    assert str(refused.value) == (
        "run as root (or with CAP_NET_ADMIN): changing routes and nftables needs it"
    )
