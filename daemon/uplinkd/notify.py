"""Mail alerts on link state changes, to the link's warn_email as foolsm's default_script sent them.

notify() decides at once whether a change may be mailed: at most [mail] max_per_hour mails per
link in any hour; the changes over that are counted and listed in the next mail that may go. The
mail is sent in the background, in each link's order: over SMTP when smtp_server is set (smtplib
in a worker thread, each connect, read and write limited to timeout_s), else through the local
sendmail (`-t -oi`). A dead or slow mail server costs one log line per mail and never holds up
the daemon's loop.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import os
import re
import smtplib
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Final

from .errors import UplinkdError
from .events import Background, LinkEvent
from .model import MailSettings
from .validate import SMTPS_PORT, At, parse_smtp_server

log = logging.getLogger(__name__)

SENDMAIL: Final = Path("/usr/sbin/sendmail")  # where foolsm's hosts (and Debian's MTAs) have it
WINDOW_S: Final = 3600.0  # max_per_hour counts the mails of the last hour
MAX_LISTED: Final = 20  # rate-limited changes listed one by one in the next mail; the rest counted


class MailError(UplinkdError):
    """A mail that could not be handed over; the message says why."""


@dataclass
class _Budget:
    """One link's mails in the last hour, and the changes not mailed since its last mail."""

    sent: deque[float] = field(default_factory=deque)
    skipped: list[LinkEvent] = field(default_factory=list)


def recipients(warn_email: str) -> list[str]:
    """foolsm's warn_email: addresses apart by spaces or commas; "" or "-" for none."""
    return [address for address in re.split(r"[\s,;]+", warn_email) if address not in {"", "-"}]


class Mailer:
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
        self._background.start(event.link, self._send(message, event))

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

    async def _send(self, message: EmailMessage, event: LinkEvent) -> None:
        what = f"link {event.link}: mail about {event.old} -> {event.new} to {message['To']}"
        if self._server is not None:
            via = f"SMTP server {self.settings.smtp_server}"
        elif os.access(self.sendmail, os.X_OK):
            via = str(self.sendmail)
        else:
            log.warning("%s not sent: no [mail] smtp_server and no %s", what, self.sendmail)
            return
        try:
            if self._server is not None:
                await asyncio.to_thread(self._send_smtp, message, *self._server)
            else:
                await self._send_sendmail(message)
        except (OSError, smtplib.SMTPException, MailError) as error:
            log.error("%s not sent: %s: %s", what, via, self._reason(error))
            return
        log.info("%s sent through %s", what, via)

    def _send_smtp(self, message: EmailMessage, host: str, port: int) -> None:
        """Runs in a worker thread: smtplib blocks, at most timeout_s per step."""
        settings = self.settings
        context = ssl.create_default_context()
        smtp = (
            smtplib.SMTP_SSL(host, port, self.hostname, timeout=settings.timeout_s, context=context)
            if port == SMTPS_PORT
            else smtplib.SMTP(host, port, self.hostname, timeout=settings.timeout_s)
        )
        with smtp:
            if settings.starttls:
                smtp.starttls(context=context)
            if settings.username:
                smtp.login(settings.username, settings.password)
            smtp.send_message(message)

    async def _send_sendmail(self, message: EmailMessage) -> None:
        process = await asyncio.create_subprocess_exec(
            str(self.sendmail),
            "-t",  # recipients from the To: header
            "-oi",  # a line with a lone "." does not end the message
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        timeout = self.settings.timeout_s
        try:
            output, _ = await asyncio.wait_for(process.communicate(message.as_bytes()), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
            raise MailError(f"no result within {timeout:g} s; killed") from None
        if process.returncode != 0:
            text = output.decode(errors="replace").strip()[:500]
            raise MailError(f"exit {process.returncode}" + (f": {text}" if text else ""))

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
