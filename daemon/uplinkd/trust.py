"""May root use this file an admin wrote? The one answer for hook files, event hooks and the
configuration file.

Whoever can change such a file, or change which file is found under its name, decides what root
runs. So uplinkd trusts only files that root, or the user uplinkd runs as (who could change what
uplinkd does anyway), alone can change:

- A hook file is a regular file, never a symbolic link (a check that followed a link looked at its
  target: a link to /usr/bin/touch passed it), owned by a trusted user and not writable by group or
  others.
- Its directory (pre-run/, routes/, firewall/, post-run/, up.d/, down.d/, long_down.d/) is a real
  directory, not a link, owned by a trusted user and not writable by group or others. The sticky bit
  does not help: in a sticky world-writable directory anyone may still add a file. A directory
  refused this way refuses all its files with one line.
- So is the hook root, the configuration's directory (for a balance.conf: balance/ beside it); it
  may be reached through a symbolic link, as /etc/uplinkd may be one.
- Directories above the hook root are not checked: they are root's on an installed system
  (/etc), and a configuration kept by a user (pytest's tmp_path under /tmp) has a sticky
  world-writable ancestor whose sticky bit keeps others from replacing what is below it.
- The configuration file (config.load) is checked on the open file for owner and mode; it may be
  a symbolic link (alternatives, configuration managers). One holding the [mail] password that
  others may read gets a warning.

Races. A hook file uplinkd reads is opened with O_NOFOLLOW and checked again on the open
descriptor (read_text), so a file swapped in between the listing and the read is refused, not
read. An executable hook is exec'd by name after the check: only someone who can write its
directory could swap the file in between, and once the directory passed the check that is root
or uplinkd's own user, who could change the hook itself.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Hashable, Iterable
from pathlib import Path

from .errors import HookError

log = logging.getLogger("uplinkd")

# What may write a file or directory besides its owner.
_SHARED_WRITE = stat.S_IWGRP | stat.S_IWOTH


def trusted_owners() -> frozenset[int]:
    """Root, and the user uplinkd runs as: a file that user owns it could change anyway."""
    return frozenset({0, os.geteuid()})


def _owners_named() -> str:
    uid = os.geteuid()
    return "root" if uid == 0 else f"root or uid {uid}"


def ownership_problem(info: os.stat_result) -> str | None:
    """Why a file or directory with this status may be changed by someone untrusted, or None."""
    if info.st_uid not in trusted_owners():
        return f"owned by uid {info.st_uid}, not {_owners_named()}"
    if info.st_mode & _SHARED_WRITE:
        return f"writable by group or others (mode {stat.filemode(info.st_mode)})"
    return None


def _link_target(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return "?"


def refusal(path: Path) -> str | None:
    """Why a hook file must not be used, or None if it may. Looks at the name itself (lstat)."""
    try:
        info = path.lstat()
    except OSError as error:
        return f"{path}: refused: {error.strerror or error}"
    if stat.S_ISLNK(info.st_mode):
        return f"{path}: refused: a symbolic link (to {_link_target(path)}); hooks must be files"
    if not stat.S_ISREG(info.st_mode):
        return f"{path}: refused: not a regular file"
    problem = ownership_problem(info)
    return f"{path}: refused: {problem}" if problem else None


def directory_refusal(directory: Path, *, follow: bool = False) -> str | None:
    """Why the hooks of a directory must not be used, or None. Links are refused unless
    `follow` (the hook root, which may be reached through one)."""
    try:
        info = directory.stat() if follow else directory.lstat()
    except OSError as error:
        return f"{directory}: refused: {error.strerror or error}; its hooks are not used"
    if stat.S_ISLNK(info.st_mode):
        target = _link_target(directory)
        return f"{directory}: refused: a symbolic link (to {target}); its hooks are not used"
    if not stat.S_ISDIR(info.st_mode):
        return f"{directory}: refused: not a directory"
    problem = ownership_problem(info)
    if problem:
        return f"{directory}: refused: directory {problem}; its hooks are not used"
    return None


def usable_files(directory: Path, root: Path) -> tuple[list[Path], list[str]]:
    """The files of a hook directory that may be used, in name order, and the refusals.

    Editor backups (`~`, `.bak`), dot files and subdirectories are skipped. Nothing is listed
    when the directory does not exist; when it or the hook root is refused, that one line."""
    if not directory.is_dir():  # follows a link, so that a linked directory is refused below
        return [], []
    for reason in (directory_refusal(root, follow=True), directory_refusal(directory)):
        if reason:
            return [], [reason]
    found: list[Path] = []
    refused: list[str] = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or path.name.endswith(("~", ".bak")):
            continue
        if path.is_dir() and not path.is_symlink():
            continue
        reason = refusal(path)
        if reason:
            refused.append(reason)
        else:
            found.append(path)
    return found, refused


class UntrustedFileError(Exception):
    """A file that must not be read; the message says why (without the file's name)."""


def read_trusted(path: Path, *, follow_links: bool) -> tuple[bytes, os.stat_result]:
    """A file's content and status, checked on the open descriptor: what is checked is what is
    read, whatever happens to the name meanwhile. Raises OSError when it cannot be opened,
    UntrustedFileError when it must not be used."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC  # O_NONBLOCK: a FIFO must not hang us
    if not follow_links:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as error:
        if not follow_links and os.path.islink(path):
            raise UntrustedFileError(f"a symbolic link (to {_link_target(path)})") from error
        raise
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(file.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise UntrustedFileError("not a regular file")
        problem = ownership_problem(info)
        if problem:
            raise UntrustedFileError(problem)
        return file.read(), info


def read_text(path: Path) -> str:
    """A hook file's text, read race-free: a link, or a file swapped in after the listing that
    is not safe, is refused (HookError naming it and why), never read."""
    try:
        content, _ = read_trusted(path, follow_links=False)
    except UntrustedFileError as error:
        raise HookError(path, f"refused: {error}") from None
    except OSError as error:
        raise HookError(path, f"cannot read: {error.strerror or error}") from None
    return content.decode(errors="replace")


class RefusalLog:
    """Logs each refusal once, when it appears, rather than at every apply or event; one fixed
    and made again is logged again. Keyed by what was checked (a directory): the refusals
    reported for a key replace those reported for it before."""

    def __init__(self, logger: logging.Logger = log) -> None:
        self._log = logger
        self._shown: dict[Hashable, frozenset[str]] = {}

    def report(self, key: Hashable, reasons: Iterable[str]) -> None:
        now = list(dict.fromkeys(reasons))
        # Shown already, under this key or another (a refused hook root, seen from each of its
        # directories): not again.
        shown = {reason for reasons in self._shown.values() for reason in reasons}
        for reason in now:
            if reason not in shown:
                self._log.warning("%s", reason)
        if now:
            self._shown[key] = frozenset(now)
        else:
            self._shown.pop(key, None)
