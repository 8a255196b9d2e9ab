"""Which files root may use (hookfiles): links, owners, modes, directories, race-free reads.

The rules are tested through their users in test_hooks.py (hook directories), test_events.py
(up.d/, down.d/, long_down.d/) and test_config.py (the configuration file); here what is the
module's own: the directory rule's limits, the race-free read and logging once.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from uplinkd import trust
from uplinkd.errors import HookError

ROOT = os.geteuid() == 0
NOBODY = 65534
needs_root = pytest.mark.skipif(not ROOT, reason="chown to another user needs root")


def write(path: Path, text: str = "true\n", mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    path.write_text(text)
    path.chmod(mode)
    return path


def test_a_safe_file_in_a_safe_directory_is_usable(tmp_path: Path) -> None:
    hook = write(tmp_path / "up.d" / "10-ok")
    assert trust.usable_files(tmp_path / "up.d", tmp_path) == ([hook], [])


def test_ancestors_above_the_hook_root_are_not_checked(tmp_path: Path) -> None:
    """A configuration kept under /tmp (pytest's tmp_path, a lab's mkdtemp) has a sticky
    world-writable ancestor; its own directory and the hook directories are what is checked."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    root = shared / "conf"
    root.mkdir(mode=0o755)
    hook = write(root / "up.d" / "10-ok")
    assert trust.usable_files(root / "up.d", root) == ([hook], [])
    # The hook root itself in such a directory: refused, as anyone may add files to it.
    write(shared / "up.d" / "10-ok")
    found, refused = trust.usable_files(shared / "up.d", shared)
    assert (found, refused) == (
        [],
        [
            f"{shared}: refused: directory writable by group or others (mode drwxrwxrwt); "
            "its hooks are not used"
        ],
    )


def test_the_hook_root_may_be_reached_through_a_link(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    hook = write(real / "up.d" / "10-ok")
    (tmp_path / "etc-uplinkd").symlink_to(real)
    linked = tmp_path / "etc-uplinkd"
    assert trust.usable_files(linked / "up.d", linked) == ([linked / "up.d" / hook.name], [])


def test_a_linked_hook_directory_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    write(elsewhere / "10-ok")
    (tmp_path / "up.d").symlink_to(elsewhere)
    assert trust.usable_files(tmp_path / "up.d", tmp_path) == (
        [],
        [f"{tmp_path / 'up.d'}: refused: a symbolic link (to {elsewhere}); its hooks are not used"],
    )


def test_subdirectories_backups_and_dot_files_are_skipped(tmp_path: Path) -> None:
    hook = write(tmp_path / "pre-run" / "10-ok")
    (tmp_path / "pre-run" / "sub").mkdir()
    write(tmp_path / "pre-run" / "10-ok~")
    write(tmp_path / "pre-run" / "10-ok.bak")
    write(tmp_path / "pre-run" / ".hidden", mode=0o666)
    assert trust.usable_files(tmp_path / "pre-run", tmp_path) == ([hook], [])


def test_read_text_reads_a_safe_file(tmp_path: Path) -> None:
    assert trust.read_text(write(tmp_path / "firewall" / "01", "add table inet x\n")) == (
        "add table inet x\n"
    )


def test_a_link_swapped_in_after_the_listing_is_not_read(tmp_path: Path) -> None:
    """The check and the read look at the same file: a link put in place between them (by
    whoever could write the directory) is refused at the read, not followed."""
    secret = write(tmp_path / "secret", "add table inet stolen\n")
    hook = write(tmp_path / "firewall" / "01.rules", "add table inet x\n")
    found, _ = trust.usable_files(tmp_path / "firewall", tmp_path)
    assert found == [hook]
    hook.unlink()
    hook.symlink_to(secret)
    with pytest.raises(HookError, match=r"01.rules: refused: a symbolic link \(to .*secret\)"):
        trust.read_text(hook)


def test_an_unsafe_file_swapped_in_after_the_listing_is_not_read(tmp_path: Path) -> None:
    hook = write(tmp_path / "routes" / "01", "ip route replace 192.0.2.0/24 dev lan0\n")
    assert trust.usable_files(tmp_path / "routes", tmp_path)[0] == [hook]
    hook.unlink()
    write(hook, "ip route replace 0.0.0.0/0 dev evil\n", mode=0o666)
    with pytest.raises(HookError, match=r"refused: writable by group or others \(mode -rw-rw-rw-"):
        trust.read_text(hook)


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    (tmp_path / "routes").mkdir(mode=0o755)
    fifo = tmp_path / "routes" / "01"
    os.mkfifo(fifo, 0o644)
    assert trust.refusal(fifo) == f"{fifo}: refused: not a regular file"
    with pytest.raises(HookError, match="not a regular file"):
        trust.read_text(fifo)


@needs_root
def test_a_foreign_file_swapped_in_is_not_read(tmp_path: Path) -> None:
    hook = write(tmp_path / "firewall" / "01", "add table inet x\n")
    os.chown(hook, NOBODY, NOBODY)
    with pytest.raises(HookError, match="refused: owned by uid 65534, not root"):
        trust.read_text(hook)


def test_each_refusal_is_logged_once_and_again_when_it_comes_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refusals = trust.RefusalLog()
    with caplog.at_level(logging.WARNING, logger="uplinkd.hooks.trust"):
        refusals.report("up.d", ["a: refused: x", "b: refused: y"])
        refusals.report("up.d", ["a: refused: x", "b: refused: y"])  # the next event: quiet
        refusals.report("up.d", ["b: refused: y"])  # a fixed
        refusals.report("up.d", ["a: refused: x", "b: refused: y"])  # a broken again
        refusals.report("down.d", ["a: refused: x", "c: refused: z"])  # a: shown for up.d
        refusals.report("up.d", [])  # up.d fixed: a is still shown for down.d
        refusals.report("down.d", ["a: refused: x"])
    assert [r.getMessage() for r in caplog.records] == [
        "a: refused: x",
        "b: refused: y",
        "a: refused: x",
        "c: refused: z",
    ]


def test_the_running_user_is_trusted_besides_root() -> None:
    assert trust.trusted_owners() == {0, os.geteuid()}
