"""Fault class "mail": the SMTP server is silent (accepts, never answers) or refuses, while every
link transition sends a mail; carrier-loss failover measured meanwhile, then SIGTERM while the
mails hang (issue 12, defect 6: the stop took 59.5 s). One fresh daemon per case and repeat, two
carrier-loss trials each; the SMTP server listens on the router's loopback (the daemon's
namespace), `timeout_s = 60` so that only the stop's own bound can end a hung send.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

from uplinkd_lab.lab import Lab

from tests.integration.conftest import SILENT_SMTP, in_router, mail_to_admin

from .failover import TrialError
from .fault_kit import Case, Watched, carrier_trials, closed_case
from .monitors import LINKS

SILENT_PORT = 8026
REFUSING_PORT = 8027  # nothing listens there: the connect is refused


def config(port: int) -> str:
    return mail_to_admin("[monitor]\n\n" + LINKS, port, "timeout_s = 60\n")


class SilentSmtp:
    """The silent server, counting the connections it accepted."""

    def __init__(self, lab: Lab) -> None:
        self._running = ExitStack()
        self.proc = self._running.enter_context(in_router(lab, SILENT_SMTP, str(SILENT_PORT)))
        self.connections = 0
        self._thread = threading.Thread(target=self._count, daemon=True)
        self._thread.start()

    def _count(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.connections += line.strip() == "connected"

    def stop(self) -> None:
        self._running.close()


CASES = {
    "smtp-silent": "SMTP server accepting and never answering; SIGTERM while mails hang",
    "smtp-refused": "SMTP server refusing connections",
}


def one_case(lab: Lab, tmp: Path, name: str, trials: int) -> Case:
    case = Case("mail", name, CASES[name], repeats=0)
    connections = 0
    for index in range(-(-trials // 2)):
        smtp: SilentSmtp | None = None
        watched: Watched | None = None
        try:
            smtp = SilentSmtp(lab) if name == "smtp-silent" else None
            port = SILENT_PORT if smtp is not None else REFUSING_PORT
            watched = Watched(lab, tmp / f"{name}{index}", config(port))
            since = watched.mark()
            carrier_trials(watched, case, min(2, trials - 2 * index))
            in_flight = smtp.connections if smtp is not None else 0
            closed_case(case, watched, since)
            case.repeats += 1
            text = watched.log_text
            case.add_figure("mails not sent (logged)", text.count(" not sent: "))
            case.add_figure("mails sent", text.count(" sent through "))
            if smtp is not None:
                connections += smtp.connections
                case.add_figure("mails hanging at SIGTERM", in_flight)
                case.add_figure("cut by the stop (logged)", text.count("not sent: stopping"))
        except (TrialError, OSError, subprocess.SubprocessError, AssertionError) as exc:
            case.errors.append(str(exc).splitlines()[0])
        finally:
            if watched is not None:
                watched.stop()
                watched.runner.run(watched.config, "--stop", check=False)
            if smtp is not None:
                smtp.stop()
            lab.set_link(1, up=True)
    if name == "smtp-silent":
        case.add_figure("SMTP connections accepted", connections)
    return case


def run(lab: Lab, tmp: Path, trials: int, log: Callable[[str], None]) -> list[Case]:
    cases = []
    for name in CASES:
        case = one_case(lab, tmp, name, trials)
        log(f"  mail/{name}: {case.describe()}")
        cases.append(case)
    return cases
