"""One uplinkd at a time per network namespace, and the privilege it needs to change the kernel.

Two daemons, or a daemon and `--once` or `--stop`, would overwrite each other's plan (or remove
it under the daemon's feet). So every mode that changes the kernel holds an flock on a file in
the run directory; the kernel releases it when the process dies, however it dies, so a lock
never outlives its holder. The file holds the holder's pid and mode, for the refusal message.

The run directory and the lock file are opened without following symbolic links and checked,
because the file is truncated and written as root.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from contextlib import suppress
from pathlib import Path

from .. import const
from ..errors import UplinkdError

STATUS_PATH = Path("/proc/self/status")
NETNS_PATH = Path("/proc/self/ns/net")
# How often a lock file unlinked by its previous holder between our open and flock is reopened.
OPEN_ATTEMPTS = 3


class NotPrivilegedError(UplinkdError):
    """The process lacks CAP_NET_ADMIN, so every change to routes and nftables would fail."""


class AlreadyRunningError(UplinkdError):
    """Another uplinkd holds this network namespace's lock."""

    def __init__(self, message: str, pid: int | None, mode: str) -> None:
        super().__init__(message)
        self.pid = pid
        self.mode = mode


class LockFileError(UplinkdError):
    """The run directory or the lock file is unsafe to use (a symlink, foreign, writable)."""


def effective_capabilities(status: Path = STATUS_PATH) -> int:
    for line in status.read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def require_net_admin(status: Path = STATUS_PATH) -> None:
    """Refuse early, in one line, instead of failing on the first netlink request."""
    if not effective_capabilities(status) >> const.CAP_NET_ADMIN_BIT & 1:
        raise NotPrivilegedError(
            "run as root (or with CAP_NET_ADMIN): changing routes and nftables needs it"
        )


def run_dir() -> Path:
    return Path(os.environ.get(const.RUN_DIR_ENV) or const.RUN_DIR)


def lock_name() -> str:
    return const.LOCK_NAME.format(netns=NETNS_PATH.stat().st_ino)


def describe(pid: int | None, mode: str) -> str:
    """The holder as the message names it: "the uplinkd daemon (pid 812)"."""
    who = "the uplinkd daemon" if mode == "daemon" else f"uplinkd --{mode}" if mode else "uplinkd"
    return f"{who} (pid {pid if pid is not None else 'unknown'})"


class InstanceLock:
    """The held lock; `release` unlinks the file while still holding it, then closes it."""

    def __init__(self, fd: int, dir_fd: int, name: str, path: Path) -> None:
        self.fd = fd
        self.dir_fd = dir_fd
        self.name = name
        self.path = path

    def release(self) -> None:
        # Unlinked first: whoever opened this file meanwhile sees it gone and opens a new one.
        with suppress(FileNotFoundError):
            os.unlink(self.name, dir_fd=self.dir_fd)
        os.close(self.fd)
        os.close(self.dir_fd)


def _open_run_dir(directory: Path) -> int:
    try:
        os.mkdir(directory, 0o755)
    except FileExistsError:
        pass
    except OSError as exc:
        raise LockFileError(f"cannot create {directory}: {exc.strerror}") from None
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        reason = "a symbolic link" if os.path.islink(directory) else exc.strerror
        raise LockFileError(f"unsafe run directory {directory}: {reason}") from None
    info = os.fstat(dir_fd)
    problem = ""
    if info.st_uid not in {0, os.geteuid()}:
        problem = f"owned by uid {info.st_uid}"
    elif info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"writable by group or others (mode {stat.filemode(info.st_mode)})"
    if problem:
        os.close(dir_fd)
        raise LockFileError(f"unsafe run directory {directory}: {problem}")
    return dir_fd


def _open_lock_file(name: str, dir_fd: int, path: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(name, flags, 0o644, dir_fd=dir_fd)
    except OSError as exc:
        linked = exc.errno == errno.ELOOP  # what O_NOFOLLOW answers for a symbolic link
        reason = "a symbolic link; not followed, remove it" if linked else exc.strerror
        raise LockFileError(f"unsafe lock file {path}: {reason}") from None
    info = os.fstat(fd)
    # A hard link to another file would be truncated below; a FIFO or device is no lock file.
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1 or info.st_uid != os.geteuid():
        os.close(fd)
        raise LockFileError(f"unsafe lock file {path}: not a regular file of ours; remove it")
    return fd


def _holder(fd: int) -> tuple[int | None, str]:
    words = os.pread(fd, 64, 0).decode(errors="replace").split()
    pid = int(words[0]) if words and words[0].isdigit() else None
    return pid, words[1] if len(words) > 1 else ""


def _still_linked(fd: int, name: str, dir_fd: int) -> bool:
    try:
        linked = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    opened = os.fstat(fd)
    return (linked.st_dev, linked.st_ino) == (opened.st_dev, opened.st_ino)


def acquire(mode: str, directory: Path | None = None) -> InstanceLock:
    """Take this network namespace's lock for `mode` (daemon, once, stop), or raise naming the
    process that holds it."""
    directory = directory or run_dir()
    name = lock_name()
    path = directory / name
    dir_fd = _open_run_dir(directory)
    try:
        for _ in range(OPEN_ATTEMPTS):
            fd = _open_lock_file(name, dir_fd, path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, held_by = _holder(fd)
                os.close(fd)
                raise AlreadyRunningError(
                    f"{describe(pid, held_by)} is already running in this network namespace "
                    f"(lock {path})",
                    pid,
                    held_by,
                ) from None
            if _still_linked(fd, name, dir_fd):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n{mode}\n".encode(), 0)
                return InstanceLock(fd, dir_fd, name, path)
            os.close(fd)  # its holder unlinked it on release: open the new one
    except BaseException:
        os.close(dir_fd)
        raise
    os.close(dir_fd)
    raise LockFileError(f"{path} keeps being replaced; is something removing it?")
