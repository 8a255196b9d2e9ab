"""What stop waits for: hooks and mail cut after a grace, together; a bus that never answers.

Everything here is real (processes, sockets, dbus-fast's client); the bounds are generous limits
for correctness, the figures are what the lab test (tests/integration/test_stopping.py) reports.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from uplinkd import const
from uplinkd.background import Background
from uplinkd.config.model import MailSettings
from uplinkd.hooks.events import EventHooks
from uplinkd.monitor.link import LinkState
from uplinkd.publish.bus import BusError, BusService
from uplinkd.publish.mail import Mailer
from uplinkd.publish.publisher import Publisher

from .test_events import event, hook

DOWN = LinkState.DOWN


def test_drain_does_not_wait_for_work_that_ignores_the_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def stubborn() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(30)  # a bug: it goes on after it was cancelled

    async def main() -> tuple[bool, float]:
        background = Background()
        background.start("DSL", stubborn(), "never logged: it started")
        await asyncio.sleep(0.05)
        started = time.monotonic()
        finished = await background.drain(0.1)
        return finished, time.monotonic() - started

    with caplog.at_level(logging.ERROR, logger="uplinkd.hooks.events"):
        finished, took = asyncio.run(asyncio.wait_for(main(), 10))
    assert not finished
    assert took < 0.1 + const.SHUTDOWN_CUT_S + 1.0, f"drain took {took:.1f} s"
    assert "1 background task(s) did not end when cut; not waiting" in caplog.text


def test_hooks_not_started_at_stop_are_named(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hook(tmp_path, "up.d/10-hang", "sleep 30\n")
    hook(tmp_path, "down.d/10-record", f"echo ran > {tmp_path}/ran\n")

    async def main() -> bool:
        hooks = EventHooks(tmp_path, timeout_s=60)
        hooks.fire(event())
        hooks.fire(event(LinkState.UP, DOWN))  # waits for up.d: same link
        await asyncio.sleep(0.2)
        return await hooks.drain(0.2)

    with caplog.at_level(logging.WARNING, logger="uplinkd.hooks.events"):
        assert asyncio.run(main()) is False
    assert "10-hang: link DSL init -> up: killed at shutdown" in caplog.text
    assert "down.d hooks for link DSL up -> down not run: stopping" in caplog.text
    assert not (tmp_path / "ran").exists()


def test_hooks_and_mail_get_their_grace_together_not_one_after_the_other(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hook(tmp_path, "down.d/10-hang", "sleep 30\n")
    sendmail = tmp_path / "sendmail"
    sendmail.write_text("#!/bin/sh\ncat > /dev/null\nsleep 30\n")
    sendmail.chmod(0o755)
    grace = 1.0

    async def main() -> float:
        publisher = Publisher(
            EventHooks(tmp_path, timeout_s=60), Mailer(MailSettings(), sendmail=sendmail)
        )
        assert publisher.events is not None and publisher.mailer is not None
        publisher.events.fire(event(LinkState.UP, DOWN))
        publisher.mailer.notify(event(LinkState.UP, DOWN))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await publisher.drain(grace)
        return time.monotonic() - started

    with caplog.at_level(logging.WARNING):
        took = asyncio.run(main())
    assert "10-hang: link DSL up -> down: killed at shutdown" in caplog.text
    assert f"not sent: stopping ({sendmail} had not taken it)" in caplog.text
    assert took < 2 * grace - 0.2, f"drain took {took:.2f} s with {grace} s of grace"


@pytest.fixture
def silent_bus(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    """A unix socket that accepts connections (its backlog does) and never says a word."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(tmp_path / "bus"))
        listener.listen()
        yield f"unix:path={tmp_path / 'bus'}", listener


def closed_by_client(listener: socket.socket) -> bool:
    """The pending connection was closed by uplinkd (EOF after what it sent), not left open."""
    connection, _ = listener.accept()
    with connection:
        connection.settimeout(2.0)
        while chunk := connection.recv(4096):
            del chunk
    return True


class NoController:
    """start() must give up before it asks the controller for anything."""

    def __getattr__(self, name: str) -> object:
        raise AssertionError(f"the controller was asked for {name} before the bus answered")


def test_bus_that_never_answers_is_given_up_after_the_time_limit(
    silent_bus: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    address, listener = silent_bus
    monkeypatch.setattr(const, "BUS_START_TIMEOUT_S", 0.3)

    async def main() -> float:
        started = time.monotonic()
        with pytest.raises(BusError) as refused:
            await BusService(NoController()).start(address)  # type: ignore[arg-type]
        assert str(refused.value) == f"cannot connect to {address}: no answer within 0.3 s"
        return time.monotonic() - started

    took = asyncio.run(asyncio.wait_for(main(), 10))
    assert took < 2.0, f"start took {took:.1f} s"
    assert closed_by_client(listener)


def test_bus_connect_can_be_cut_and_leaves_nothing_open(
    silent_bus: tuple[str, socket.socket],
) -> None:
    address, listener = silent_bus

    async def main() -> None:
        start = asyncio.create_task(BusService(NoController()).start(address))  # type: ignore[arg-type]
        await asyncio.sleep(0.2)
        assert not start.done()
        start.cancel()
        with pytest.raises(asyncio.CancelledError):
            await start

    asyncio.run(asyncio.wait_for(main(), 10))
    assert closed_by_client(listener)


STUCK_LOOKUP = r"""
import asyncio, socket, sys, time
from uplinkd.monitor import resolver

def stuck(*args, **kwargs):  # a DNS server that never answers: glibc can block this long
    time.sleep(30)
    raise socket.gaierror("never")

socket.getaddrinfo = stuck

async def main():
    try:
        await resolver.resolve_ipv4("isp.example", timeout=0.2)
    except OSError as exc:
        print(exc, flush=True)

asyncio.run(main())
"""


def test_a_name_lookup_stuck_at_stop_does_not_hold_up_the_exit() -> None:
    """The lookup gave up after its time limit; the process then exits at once, not when the
    blocked getaddrinfo returns (before: 30 s, the default executor was joined at exit)."""
    begin = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", STUCK_LOOKUP],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    took = time.monotonic() - begin
    assert done.returncode == 0, done.stderr
    assert "no answer within 0.2 s" in done.stdout
    assert took < 10, took
