"""Event hooks a local user planted are never run by the daemon (root, the lab).

The attack found in the lab (issue 12): with a world-writable up.d, a normal user's
`ln -s /usr/bin/touch up.d/zz` passed the hook check, which looked at the link's target (root's
own /usr/bin/touch), and root ran it on the next transition, creating files named after foolsm's
arguments in its working directory.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from uplinkd_lab.lab import Lab

from .conftest import Uplinkd, needs_root, wait_until
from .test_failover import MONITORED as FAILOVER_LINKS

pytestmark = [needs_root, pytest.mark.lab]

# The failover tests' links: both probe the Internet host through themselves.
MONITORED = FAILOVER_LINKS.format(extra_target="")

RECORD = """#!/bin/sh
echo "$1 $2" >> {out}
"""

AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


@pytest.fixture
def shared_directory() -> Iterator[Path]:
    """A configuration directory `nobody` may enter (pytest's tmp_path is root's alone); like
    tmp_path it lives under the sticky world-writable /tmp, which is not checked."""
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to act as nobody")
    directory = Path(tempfile.mkdtemp(prefix="uplinkd-hooks-"))
    try:
        directory.chmod(0o755)
        yield directory
    finally:
        shutil.rmtree(directory)


def test_hooks_a_user_planted_are_not_run(
    lab2: Lab,
    uplinkd: Uplinkd,
    shared_directory: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = shared_directory / "uplinkd.toml"
    config.write_text(MONITORED)
    out = shared_directory / "hooks.out"
    # touch, run as a hook, leaves files named after its arguments where the daemon runs.
    workdir = shared_directory / "cwd"
    workdir.mkdir()
    monkeypatch.chdir(workdir)

    # up.d is world-writable: nobody adds a link to a program of root's.
    up_d = shared_directory / "up.d"
    up_d.mkdir()
    up_d.chmod(0o777)
    (up_d / "10-root").write_text(RECORD.format(out=out))
    (up_d / "10-root").chmod(0o755)
    planted = up_d / "zz"
    subprocess.run([*AS_NOBODY, "ln", "-s", "/usr/bin/touch", str(planted)], check=True)
    assert planted.lstat().st_uid == 65534
    # down.d is root's: a link in it is refused, the file after it still runs.
    down_d = shared_directory / "down.d"
    down_d.mkdir(mode=0o755)
    (down_d / "50-link").symlink_to("/usr/bin/touch")
    (down_d / "99-record").write_text(RECORD.format(out=out))
    (down_d / "99-record").chmod(0o755)

    daemon = uplinkd.start(config)
    try:
        assert daemon.log.wait_for("link ISP1: init -> up"), daemon.log.text
        assert daemon.log.wait_for(
            f"{up_d}: refused: directory writable by group or others (mode drwxrwxrwx); "
            "its hooks are not used"
        ), daemon.log.text
        lab2.set_link(1, up=False)
        assert daemon.log.wait_for("link ISP1: up -> down: carrier lost", 5), daemon.log.text
        # 99-record runs after 50-link would have: once it wrote, the down.d hooks are done.
        assert wait_until(lambda: out.exists() and "down ISP1" in out.read_text(), 10)
        link_refused = f"{down_d / '50-link'}: refused: a symbolic link (to /usr/bin/touch)"
        assert link_refused in daemon.log.text
        lab2.set_link(1, up=True)
        assert daemon.log.wait_for("link ISP1: down -> up", 15), daemon.log.text
    finally:
        lab2.set_link(1, up=True)
        daemon.stop()
    assert list(workdir.iterdir()) == []  # touch never ran
    assert out.read_text().splitlines() == ["down ISP1"]  # nor did root's hook in up.d
    assert "zz: link" not in daemon.log.text
    # Logged once, not at each of ISP1's and ISP2's transitions.
    assert daemon.log.text.count(f"{up_d}: refused:") == 1
