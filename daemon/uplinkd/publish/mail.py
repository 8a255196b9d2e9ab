"""Mail alerts on link state changes, to the link's warn_email as foolsm's default_script sent them.

notify() decides at once whether a change may be mailed: at most [mail] max_per_hour mails per
link in any hour; the changes over that are counted and listed in the next mail that may go. The
mail is sent in the background, in each link's order: over SMTP when smtp_server is set (smtplib
in a thread of its own, each connect, read and write limited to timeout_s), else through the local
sendmail (`-t -oi`). A dead or slow mail server costs one log line per mail and never holds up
the daemon's loop, nor its stop: a send still running when the daemon stops is cut (its SMTP
connection shut, sendmail's process group killed) and logged as not sent, never waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import os
import re
import smtplib
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Final

from .. import background
from ..background import Background, in_daemon_thread
from ..config.model import MailSettings
from ..config.validate import SMTPS_PORT, At, parse_smtp_server
from ..errors import UplinkdError
from ..hooks.events import LinkEvent

log = logging.getLogger("uplinkd")

SENDMAIL: Final = Path("/usr/sbin/sendmail")  # where foolsm's hosts (and Debian's MTAs) have it
WINDOW_S: Final = 3600.0  # max_per_hour counts the mails of the last hour
MAX_LISTED: Final = 20  # rate-limited changes listed one by one in the next mail; the rest counted


class MailError(UplinkdError):
    """A mail that could not be handed over; the message says why."""


class _Connections:
    """The sockets one SMTP send opens, which the loop can shut while a thread is blocked on them.

    Each socket is kept as a duplicate: shutting it down ends the connection (a thread blocked
    in connect, recv or send returns at once with an error) even after smtplib wrapped the
    original in TLS. Once cut, no new connection is opened.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: list[socket.socket] = []
        self._cut = False

    def connect(self, host: str, port: int, timeout: float | None) -> socket.socket:
        """socket.create_connection, each socket watched before it connects."""
        error: OSError | None = None
        for family, kind, proto, _, address in socket.getaddrinfo(
            host, port, 0, socket.SOCK_STREAM
        ):
            sock = socket.socket(family, kind, proto)
            try:
                self._watch(sock)
                sock.settimeout(timeout)
                sock.connect(address)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise error or OSError(f"{host} has no address")

    def _watch(self, sock: socket.socket) -> None:
        with self._lock:
            if self._cut:
                raise MailError("stopping")
            self._kept.append(sock.dup())

    def cut(self) -> None:
        """End every connection (safe from any thread, also after the send ended)."""
        with self._lock:
            self._cut = True
            kept, self._kept = self._kept, []
        for sock in kept:
            with contextlib.suppress(OSError):  # not connected (yet, or any more)
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()


# The connections of the send the current thread runs (each send has a thread of its own).
_this_send = threading.local()


class _SMTP(smtplib.SMTP):
    """smtplib's client whose sockets the loop can shut (see _Connections)."""

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        connections: _Connections = _this_send.connections
        return connections.connect(host, port, timeout)  # uplinkd sets no source_address


class _SMTPS(smtplib.SMTP_SSL, _SMTP):
    """Implicit TLS over _SMTP's socket: SMTP_SSL wraps what _SMTP._get_socket connected."""


@dataclass
class _Budget:
    """One link's mails in the last hour, and the changes not mailed since its last mail."""

    sent: deque[float] = field(default_factory=deque)
    skipped: list[LinkEvent] = field(default_factory=list)


def recipients(warn_email: str) -> list[str]:
    """foolsm's warn_email: addresses apart by spaces or commas; "" or "-" for none."""
    return [address for address in re.split(r"[\s,;]+", warn_email) if address not in {"", "-"}]


class Mailer:
    """Mails each link state change to the link's warn_email, in the background and in each
    link's order, over SMTP or through sendmail, within a per-link hourly budget; what it could
    not send is logged, never retried into a flood."""

    def __init__(
        self,
        settings: MailSettings,
        *,
        sendmail: Path = SENDMAIL,
        clock: Callable[[], float] = time.monotonic,
        hostname: str | None = None,
    ) -> None:
        self.sendmail = sendmail
        self.hostname = hostname or socket.gethostname()  # no DNS lookup (unlike getfqdn)
        self.configure(settings)
        self._clock = clock
        self._budgets: dict[str, _Budget] = {}
        self._background = Background()

    def configure(self, settings: MailSettings) -> None:
        """New settings (a reload); rate-limit budgets and mails in flight are kept."""
        self.settings = settings
        self.sender = settings.sender or f"uplinkd@{self.hostname}"
        self._server = (
            parse_smtp_server(settings.smtp_server, At(Path(), 0, "mail.smtp_server"))[:2]
            if settings.smtp_server
            else None
        )

    def notify(self, event: LinkEvent) -> None:
        """Mail the change to the link's warn_email in the background; returns at once."""
        to = recipients(event.warn_email)
        # A link found up at start is no news: foolsm's default unknown_up_notify = 0 as well.
        if not to or (event.old == "init" and event.new == "up"):
            return
        budget = self._budgets.setdefault(event.link, _Budget())
        now = self._clock()
        while budget.sent and now - budget.sent[0] >= WINDOW_S:
            budget.sent.popleft()
        if len(budget.sent) >= self.settings.max_per_hour:
            budget.skipped.append(event)
            log.info(
                "link %s: %s -> %s not mailed: %d mails in the last hour (max_per_hour)",
                event.link,
                event.old,
                event.new,
                len(budget.sent),
            )
            return
        budget.sent.append(now)
        skipped, budget.skipped = budget.skipped, []
        try:
            message = self.compose(event, to, skipped)
        except (ValueError, TypeError) as error:  # e.g. an address the email package refuses
            log.error("link %s: no mail to %s: %s", event.link, ", ".join(to), error)
            return
        what = f"link {event.link}: mail about {event.old} -> {event.new} to {message['To']}"
        self._background.start(event.link, self._send(message, what), f"{what} not sent: stopping")

    async def drain(self, timeout: float) -> bool:
        return await self._background.drain(timeout)

    def compose(self, event: LinkEvent, to: list[str], skipped: list[LinkEvent]) -> EmailMessage:
        message = EmailMessage()
        message["Subject"] = f"uplinkd: link {event.link} is {event.new}"
        message["From"] = self.sender
        message["To"] = ", ".join(to)
        message["Date"] = email.utils.formatdate(event.wall_time, localtime=True)
        message["Message-ID"] = email.utils.make_msgid("uplinkd", domain=self.hostname)
        message.set_content(self.body(event, skipped))
        return message

    def body(self, event: LinkEvent, skipped: list[LinkEvent]) -> str:
        counters = event.counters
        lines = [
            f"Link {event.link} changed from {event.old} to {event.new} at {_when(event)}.",
            f"Reason: {event.reason}",
            "",
            f"Old state:  {event.old}",
            f"New state:  {event.new}",
            f"Device:     {event.device}",
            f"Source IP:  {event.source_ip or '-'}",
            f"Check IP:   {event.check_ip or '-'}",
            f"Loss:       {event.loss_percent:g} %",
            f"Latency:    {_ms(event.latency_ms)}",
        ]
        if event.targets:
            lines += ["", "Targets:"]
            lines += [
                f"  {t.address:<16} loss {t.loss_percent:5.1f} %   latency {_ms(t.latency_ms)}"
                for t in event.targets
            ]
        lines += [
            "",
            f"Probe counters: replied {counters.replied}, waiting {counters.waiting}, "
            f"timeout {counters.timeout}, reply_late {counters.reply_late}, "
            f"cons_rcvd {counters.cons_rcvd}, cons_wait {counters.cons_wait}, "
            f"cons_miss {counters.cons_miss}, avg_rtt {counters.avg_rtt_us} us",
        ]
        if skipped:
            more = (
                "1 more state change was not mailed"
                if len(skipped) == 1
                else f"{len(skipped)} more state changes were not mailed"
            )
            limit = self.settings.max_per_hour
            lines += ["", f"{more} (at most {limit} mails per link and hour):"]
            lines += [f"  {_when(e)}  {e.old} -> {e.new}: {e.reason}" for e in skipped[:MAX_LISTED]]
            if len(skipped) > MAX_LISTED:
                lines.append(f"  ... and {len(skipped) - MAX_LISTED} more")
        lines += ["", "-- ", f"uplinkd on {self.hostname}"]
        return "\n".join(lines) + "\n"

    async def _send(self, message: EmailMessage, what: str) -> None:
        if self._server is not None:
            via = f"SMTP server {self.settings.smtp_server}"
        elif os.access(self.sendmail, os.X_OK):
            via = str(self.sendmail)
        else:
            log.warning("%s not sent: no [mail] smtp_server and no %s", what, self.sendmail)
            return
        try:
            if self._server is not None:
                await self._send_smtp_cuttable(message, *self._server)
            else:
                await self._send_sendmail(message)
        except (OSError, smtplib.SMTPException, MailError) as error:
            log.error("%s not sent: %s: %s", what, via, self._reason(error))
            return
        except asyncio.CancelledError:
            log.warning("%s not sent: stopping (%s had not taken it)", what, via)
            raise
        log.info("%s sent through %s", what, via)

    async def _send_smtp_cuttable(self, message: EmailMessage, host: str, port: int) -> None:
        """_send_smtp in a thread; cancelled, it shuts the connection and returns at once."""
        connections = _Connections()

        def send() -> None:
            _this_send.connections = connections
            self._send_smtp(message, host, port)

        try:
            await in_daemon_thread(send, "uplinkd-mail")
        finally:
            connections.cut()  # after a send that ended, this only closes the duplicates

    def _send_smtp(self, message: EmailMessage, host: str, port: int) -> None:
        """Runs in its own thread: smtplib blocks, at most timeout_s per step."""
        settings = self.settings
        context = ssl.create_default_context()
        smtp = (
            _SMTPS(host, port, self.hostname, timeout=settings.timeout_s, context=context)
            if port == SMTPS_PORT
            else _SMTP(host, port, self.hostname, timeout=settings.timeout_s)
        )
        with smtp:
            if settings.starttls:
                smtp.starttls(context=context)
            if settings.username:
                smtp.login(settings.username, settings.password)
            smtp.send_message(message)

    async def _send_sendmail(self, message: EmailMessage) -> None:
        timeout = self.settings.timeout_s
        done = await background.run_bounded(  # killed with what it started (an MTA's queue runner)
            [
                str(self.sendmail),
                "-t",  # recipients from the To: header
                "-oi",  # a line with a lone "." does not end the message
            ],
            timeout=timeout,
            output_limit=500,
            stdin=message.as_bytes(),
        )
        if done.timed_out:
            raise MailError(f"no result within {timeout:g} s; killed")
        if done.returncode != 0:
            raise MailError(f"exit {done.returncode}" + (f": {done.output}" if done.output else ""))

    def _reason(self, error: BaseException) -> str:
        if isinstance(error, smtplib.SMTPResponseException):
            answer = error.smtp_error
            text = answer.decode(errors="replace") if isinstance(answer, bytes) else str(answer)
            return f"the server answered {error.smtp_code} {text}"
        if isinstance(error, TimeoutError):
            return f"no answer within {self.settings.timeout_s:g} s"
        if isinstance(error, OSError) and error.strerror:
            return error.strerror
        return str(error) or type(error).__name__


def _when(event: LinkEvent) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(event.wall_time))


def _ms(latency: float | None) -> str:
    return f"{latency:.1f} ms" if latency is not None else "- (no replies)"
