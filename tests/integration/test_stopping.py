"""Stopping and starting never wait without limit on what lies outside the daemon (root).

A mail server that accepts and never answers, event hooks that hang, a bus socket that accepts and
never speaks: SIGTERM still ends the daemon within const.STOP_BOUND_S (asserted with a generous
bound; the measured figure is printed), what was lost is logged, and a bus that never answers is
given up after const.BUS_START_TIMEOUT_S while failover works from the start.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from uplinkd import const
from uplinkd_lab.lab import Lab

from .conftest import (
    SILENT_SMTP,
    Daemon,
    Uplinkd,
    in_router,
    mail_to_admin,
    needs_root,
    wait_until,
)
from .test_failover import MONITORED, only_via, start

pytestmark = [needs_root, pytest.mark.lab]

# The bound asserted: STOP_BOUND_S plus room for a loaded test machine (a Python start, the log).
STOP_ASSERTED_S = 8.0

HANGING_HOOK = """#!/bin/sh
echo $$ > {pid}
sleep 60
"""


def stopped_within(daemon: Daemon, bound: float) -> float:
    """SIGTERM, then the time to the daemon's exit; fails past `bound` seconds."""
    started = time.monotonic()
    daemon.send(signal.SIGTERM)
    try:
        daemon.proc.wait(timeout=bound)
    except subprocess.TimeoutExpired:
        pytest.fail(f"uplinkd still ran {bound:g} s after SIGTERM:\n{daemon.log.text}")
    took = time.monotonic() - started
    daemon.log.join()
    assert daemon.proc.returncode == 0, daemon.log.text
    return took


def test_sigterm_while_a_mail_and_a_hook_hang_stops_within_the_bound(
    lab2: Lab, uplinkd: Uplinkd
) -> None:
    # timeout_s = 60: the old stop waited for the send's own time limits (59.5 s measured).
    text = mail_to_admin(MONITORED.format(extra_target=""), 8026, "timeout_s = 60\n")
    config = uplinkd.write_config(text)
    pid_file = uplinkd.workdir / "hook.pid"
    hook = uplinkd.workdir / "down.d" / "10-hang"
    hook.parent.mkdir()
    hook.write_text(HANGING_HOOK.format(pid=pid_file))
    hook.chmod(0o755)
    with in_router(lab2, SILENT_SMTP, "8026") as smtp:
        assert smtp.stdout is not None
        try:
            daemon = start(uplinkd, config)
            lab2.set_link(1, up=False)
            assert daemon.log.wait_for("link ISP1: up -> down: carrier lost", 5), daemon.log.text
            assert smtp.stdout.readline().strip() == "connected"  # the mail is in flight
            assert wait_until(pid_file.exists, 5), daemon.log.text  # and the hook runs
            hook_pid = int(pid_file.read_text())
            took = stopped_within(daemon, STOP_ASSERTED_S)
        finally:
            lab2.set_link(1, up=True)
    print(f"\nSIGTERM to exit with a mail and a hook hanging: {took:.2f} s")
    log = daemon.log.text
    assert "SIGTERM: stopping" in log
    assert (
        "link ISP1: mail about up -> down to noc@example.net not sent: stopping "
        "(SMTP server 127.0.0.1:8026 had not taken it)"
    ) in log
    assert f"{hook}: link ISP1 up -> down: killed at shutdown" in log
    assert "stopped in " in log
    assert not Path(f"/proc/{hook_pid}").exists(), "the hook outlived the daemon"


@pytest.fixture
def silent_bus() -> Iterator[str]:
    """A unix socket that accepts connections (its backlog does) and never says a word; a path
    socket, so the daemon in the router namespace reaches it."""
    directory = Path(tempfile.mkdtemp(prefix="uplinkd-silent-bus-"))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(str(directory / "bus"))
            listener.listen()
            yield f"unix:path={directory / 'bus'}"
    finally:
        shutil.rmtree(directory)


def test_a_bus_that_never_answers_is_given_up_and_failover_works(
    lab2: Lab, uplinkd: Uplinkd, silent_bus: str
) -> None:
    config = uplinkd.write_config(MONITORED.format(extra_target=""))
    daemon = uplinkd.start(config, bus_address=silent_bus)
    try:
        # The links are monitored while the bus is tried.
        assert daemon.log.wait_for("link ISP2: init -> up"), daemon.log.text
        limit = const.BUS_START_TIMEOUT_S
        given_up = (
            "D-Bus unavailable, running without it: cannot connect to the system bus: "
            f"no answer within {limit:g} s"  # the system bus is DBUS_SYSTEM_BUS_ADDRESS's
        )
        assert daemon.log.wait_for(given_up, limit + 5), daemon.log.text
        assert daemon.log.wait_for("running with 2 link(s)", 1), daemon.log.text
        lab2.set_link(1, up=False)
        assert daemon.log.wait_for("link ISP1: up -> down: carrier lost", 5), daemon.log.text
        assert wait_until(lambda: only_via(lab2, "ISP2"), 5)
    finally:
        lab2.set_link(1, up=True)
    took = stopped_within(daemon, STOP_ASSERTED_S)
    print(f"\nSIGTERM to exit after running without the bus: {took:.2f} s")


def test_sigterm_while_the_bus_connect_hangs_stops_within_the_bound(
    uplinkd: Uplinkd, silent_bus: str
) -> None:
    config = uplinkd.write_config(MONITORED.format(extra_target=""))
    daemon = uplinkd.start(config, bus_address=silent_bus)  # the first apply is done
    time.sleep(1.0)  # well inside the connect's time limit
    assert "D-Bus unavailable" not in daemon.log.text
    took = stopped_within(daemon, STOP_ASSERTED_S)
    print(f"\nSIGTERM to exit during a hung bus connect: {took:.2f} s")
    log = daemon.log.text
    assert "SIGTERM: stopping" in log
    assert "D-Bus: connecting cut short by the stop" in log
    assert "stopped in " in log
