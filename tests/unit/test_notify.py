"""Mail alerts: a real SMTP server on loopback (aiosmtpd), rate limit, dead servers, sendmail."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from uplinkd.config.model import MailSettings
from uplinkd.hooks.events import LinkEvent, ProbeCounters, TargetFigures
from uplinkd.monitor.link import LinkState, Transition
from uplinkd.publish.mail import Mailer

UP, DOWN = LinkState.UP, LinkState.DOWN


@dataclass
class Inbox:
    """An aiosmtpd handler keeping what it received."""

    mails: list[tuple[list[str], EmailMessage]] = field(default_factory=list)
    logins: list[tuple[str, bytes, bytes]] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        self.mails.append((list(envelope.rcpt_tos), message))
        return "250 OK"

    def authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        self.logins.append((mechanism, data.login, data.password))
        return AuthResult(success=data.password == b"secret")

    def bodies(self) -> list[str]:
        return [str(message.get_content()).replace("\r\n", "\n") for _, message in self.mails]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def server() -> Iterator[tuple[str, Inbox]]:
    inbox = Inbox()
    port = free_port()
    controller = Controller(
        inbox,
        hostname="127.0.0.1",
        port=port,
        authenticator=inbox.authenticate,
        auth_require_tls=False,  # loopback only; real servers want STARTTLS first
    )
    controller.start()
    yield f"127.0.0.1:{port}", inbox
    controller.stop()


def event(
    old: LinkState = UP,
    new: LinkState = DOWN,
    *,
    link: str = "DSL",
    warn_email: str = "root@localhost",
    reason: str = "3 rounds lost in a row",
) -> LinkEvent:
    return LinkEvent(
        Transition(link, old, new, reason, at=5.0),
        device="wan1",
        check_ip="1.1.1.1",
        source_ip="10.0.1.2",
        warn_email=warn_email,
        loss_percent=40.0,
        latency_ms=23.5,
        counters=ProbeCounters(replied=6, timeout=4, cons_miss=3, avg_rtt_us=23500),
        targets=(TargetFigures("1.1.1.1", 20.0, 23.5), TargetFigures("9.9.9.9", 100.0, None)),
        wall_time=1_700_000_000.0,
    )


async def ticking(work: Any, ticks: list[int]) -> float:
    """Run work (which calls notify and drains) beside a ticker; returns how long notify took."""

    async def ticker() -> None:
        while True:
            await asyncio.sleep(0.01)
            ticks[0] += 1

    task = asyncio.create_task(ticker())
    try:
        return float(await work())
    finally:
        task.cancel()


def test_mail_over_smtp_names_link_states_reason_and_figures(server: tuple[str, Inbox]) -> None:
    address, inbox = server
    mailer = Mailer(MailSettings(smtp_server=address, timeout_s=5), hostname="router")

    async def main() -> None:
        mailer.notify(event(warn_email="ops@example.net, root@example.net"))
        assert await mailer.drain(10)

    asyncio.run(main())
    [(recipients, message)] = inbox.mails
    assert recipients == ["ops@example.net", "root@example.net"]
    assert message["Subject"] == "uplinkd: link DSL is down"
    assert message["From"] == "uplinkd@router"
    body = inbox.bodies()[0]
    for line in (
        "Link DSL changed from up to down at 2023-11-",
        "Reason: 3 rounds lost in a row",
        "Old state:  up",
        "New state:  down",
        "Device:     wan1",
        "Loss:       40 %",
        "Latency:    23.5 ms",
        "  1.1.1.1          loss  20.0 %   latency 23.5 ms",
        "  9.9.9.9          loss 100.0 %   latency - (no replies)",
        "avg_rtt 23500 us",
    ):
        assert line in body


def test_smtp_login(server: tuple[str, Inbox]) -> None:
    address, inbox = server
    settings = MailSettings(smtp_server=address, username="router", password="secret")  # noqa: S106

    async def drained() -> None:
        mailer = Mailer(settings)
        mailer.notify(event())
        assert await mailer.drain(10)

    asyncio.run(drained())
    assert [login for _, login, _ in inbox.logins] == [b"router"]
    assert len(inbox.mails) == 1


def test_rate_limit_counts_the_changes_over_it_and_lists_them_in_the_next_mail(
    server: tuple[str, Inbox], caplog: pytest.LogCaptureFixture
) -> None:
    address, inbox = server
    now = [1000.0]
    mailer = Mailer(MailSettings(smtp_server=address, max_per_hour=10), clock=lambda: now[0])

    async def main() -> None:
        for number in range(13):  # 10 mailed, 3 over the limit
            old, new = (UP, DOWN) if number % 2 == 0 else (DOWN, UP)
            mailer.notify(event(old, new, reason=f"change {number + 1}"))
            now[0] += 60
        mailer.notify(event(link="LTE"))  # another link has its own budget
        assert await mailer.drain(10)
        assert len(inbox.mails) == 11
        now[0] = 1000.0 + 3600.0  # the first mail of the hour has left the window
        mailer.notify(event(reason="change 14"))
        assert await mailer.drain(10)

    with caplog.at_level(logging.INFO, logger="uplinkd"):
        asyncio.run(main())
    assert len(inbox.mails) == 12
    dsl = [body for body in inbox.bodies() if "Link DSL" in body]
    assert [body.split("Reason: ")[1].split("\n")[0] for body in dsl] == [
        *(f"change {n}" for n in range(1, 11)),
        "change 14",
    ]
    assert "more state change" not in "".join(dsl[:10])
    last = dsl[-1]
    assert "3 more state changes were not mailed (at most 10 mails per link and hour):" in last
    assert "up -> down: change 11" in last
    assert "down -> up: change 12" in last
    assert "up -> down: change 13" in last
    assert caplog.text.count("not mailed: 10 mails in the last hour") == 3


def test_unreachable_server_logs_and_never_blocks(caplog: pytest.LogCaptureFixture) -> None:
    closed = free_port()  # nothing listens there
    mailer = Mailer(MailSettings(smtp_server=f"127.0.0.1:{closed}", timeout_s=2))
    ticks = [0]

    async def work() -> float:
        started = time.monotonic()
        mailer.notify(event())
        took = time.monotonic() - started
        await asyncio.sleep(0.2)
        assert await mailer.drain(10)
        return took

    with caplog.at_level(logging.INFO, logger="uplinkd"):
        took = asyncio.run(ticking(work, ticks))
    assert took < 0.1
    assert ticks[0] >= 5
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.getMessage() == (
        "link DSL: mail about up -> down to root@localhost not sent: "
        f"SMTP server 127.0.0.1:{closed}: Connection refused"
    )


def test_server_that_never_answers_times_out_while_the_loop_runs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog does) and says nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        mailer = Mailer(MailSettings(smtp_server=f"127.0.0.1:{port}", timeout_s=0.5))
        ticks = [0]

        async def work() -> float:
            started = time.monotonic()
            mailer.notify(event())
            took = time.monotonic() - started
            assert await mailer.drain(10)
            return took

        with caplog.at_level(logging.INFO, logger="uplinkd"):
            took = asyncio.run(ticking(work, ticks))
    assert took < 0.1
    assert ticks[0] >= 10  # about 50 in the half second the server kept it waiting
    [error] = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert f"not sent: SMTP server 127.0.0.1:{port}: " in error
    assert "timed out" in error


def test_local_sendmail_reads_the_message_from_stdin(tmp_path: Path) -> None:
    sendmail = tmp_path / "sendmail"
    sendmail.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\ncat > {tmp_path}/stdin\n')
    sendmail.chmod(0o755)
    mailer = Mailer(MailSettings(), sendmail=sendmail, hostname="router")

    async def main() -> None:
        mailer.notify(event(DOWN, LinkState.LONG_DOWN))
        assert await mailer.drain(10)

    asyncio.run(main())
    assert (tmp_path / "args").read_text() == "-t -oi\n"
    message = email.message_from_bytes(
        (tmp_path / "stdin").read_bytes(), policy=email.policy.default
    )
    assert message["To"] == "root@localhost"
    assert message["From"] == "uplinkd@router"
    assert message["Subject"] == "uplinkd: link DSL is long_down"


def test_failing_or_missing_sendmail_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    failing = tmp_path / "sendmail"
    failing.write_text("#!/bin/sh\ncat > /dev/null\necho 'no route to smarthost'\nexit 75\n")
    failing.chmod(0o755)

    async def main() -> None:
        for path in (failing, tmp_path / "missing"):
            mailer = Mailer(MailSettings(), sendmail=path)
            mailer.notify(event())
            assert await mailer.drain(10)

    with caplog.at_level(logging.WARNING, logger="uplinkd"):
        asyncio.run(main())
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        "link DSL: mail about up -> down to root@localhost not sent: "
        f"{failing}: exit 75: no route to smarthost",
        "link DSL: mail about up -> down to root@localhost not sent: "
        f"no [mail] smtp_server and no {tmp_path / 'missing'}",
    ]


def test_no_mail_without_warn_email_or_for_a_link_found_up(tmp_path: Path) -> None:
    sendmail = tmp_path / "sendmail"
    sendmail.write_text(f"#!/bin/sh\ncat >> {tmp_path}/mails\n")
    sendmail.chmod(0o755)
    mailer = Mailer(MailSettings(), sendmail=sendmail)

    async def main() -> None:
        mailer.notify(event(warn_email=""))
        mailer.notify(event(warn_email="-"))  # foolsm's default_script: no mail
        mailer.notify(event(LinkState.INIT, UP))  # found up at start: no news
        assert await mailer.drain(10)

    asyncio.run(main())
    assert not (tmp_path / "mails").exists()


def mail_threads_gone(timeout: float) -> bool:
    """No send thread left after `timeout` s: a cut send ends, it is not left blocked."""
    deadline = time.monotonic() + timeout
    while any(t.name == "uplinkd-mail" for t in threading.enumerate()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_stop_cuts_a_mail_the_server_never_answers_and_names_what_was_lost(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog does) and says nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        mailer = Mailer(MailSettings(smtp_server=f"127.0.0.1:{port}", timeout_s=30))

        async def main() -> bool:
            mailer.notify(event())
            mailer.notify(event(DOWN, UP, reason="back"))  # waits for the first: same link
            await asyncio.sleep(0.3)
            return await mailer.drain(0.2)

        started = time.monotonic()
        with caplog.at_level(logging.INFO, logger="uplinkd"):
            assert asyncio.run(main()) is False
        took = time.monotonic() - started  # asyncio.run's exit included: nothing joins the send
        assert mail_threads_gone(2.0)
        connection, _ = silent.accept()
        with connection:
            connection.settimeout(2.0)
            assert connection.recv(100) == b""  # the daemon's end was shut, not left open
    assert took < 5.0, f"stopping took {took:.1f} s"
    lost = sorted(r.getMessage() for r in caplog.records if "stopping" in r.getMessage())
    assert lost == [
        "link DSL: mail about down -> up to root@localhost not sent: stopping",  # not started
        "link DSL: mail about up -> down to root@localhost not sent: stopping "
        f"(SMTP server 127.0.0.1:{port} had not taken it)",
    ]


def test_stop_cuts_a_mail_still_connecting() -> None:
    with socket.socket() as full, socket.socket() as queued:
        full.bind(("127.0.0.1", 0))
        full.listen(0)  # one connection fills the queue; later connects wait for a SYN answer
        queued.connect(full.getsockname())
        port = full.getsockname()[1]
        mailer = Mailer(MailSettings(smtp_server=f"127.0.0.1:{port}", timeout_s=30))

        async def main() -> bool:
            mailer.notify(event())
            await asyncio.sleep(0.3)
            return await mailer.drain(0.1)

        started = time.monotonic()
        assert asyncio.run(main()) is False
        took = time.monotonic() - started  # asyncio.run's exit included: nothing joins the send
        assert mail_threads_gone(2.0)
    assert took < 5.0, f"stopping took {took:.1f} s"


def process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"  # killed, not reaped yet by its parent


def test_stop_kills_a_sendmail_that_hangs_with_what_it_started(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pids = tmp_path / "pids"
    sendmail = tmp_path / "sendmail"
    sendmail.write_text(f"#!/bin/sh\nsleep 60 &\necho $$ $! > {pids}\ncat > /dev/null\nwait\n")
    sendmail.chmod(0o755)
    mailer = Mailer(MailSettings(timeout_s=30), sendmail=sendmail)

    async def main() -> bool:
        mailer.notify(event())
        await asyncio.sleep(0.5)
        return await mailer.drain(0.2)

    with caplog.at_level(logging.WARNING, logger="uplinkd"):
        assert asyncio.run(main()) is False
    started = [int(pid) for pid in pids.read_text().split()]
    try:
        deadline = time.monotonic() + 2.0
        while not all(process_gone(pid) for pid in started) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(process_gone(pid) for pid in started), "sendmail or its child still runs"
    finally:
        for pid in started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert f"not sent: stopping ({sendmail} had not taken it)" in caplog.text
