"""`uplinkctl`: the command-line client of uplinkd, over the D-Bus system bus.

The first half is pure formatting (durations, rates, the status table, monitor lines, the
mapping of D-Bus errors to messages and exit codes), testable without a bus; the second half
makes the calls. The client sends plain method calls instead of building proxies from
introspection: one round trip per command, and every error reply is seen and translated here.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Collection, Sequence
from typing import Any

from dbus_fast import BusType, Message, MessageFlag, MessageType
from dbus_fast.aio import MessageBus
from dbus_fast.errors import DBusFastError

from . import __version__
from .const import BUS_NAME, BUS_PATH

MANAGER_INTERFACE = f"{BUS_NAME}.Manager"
UPLINKD_ERROR = f"{BUS_NAME}.Error."
# What dbus-fast (like libdbus) connects to when DBUS_SYSTEM_BUS_ADDRESS is unset.
DEFAULT_SYSTEM_BUS = "unix:path=/var/run/dbus/system_bus_socket"
# dbus-daemon's own reply timeout: a daemon that takes longer is stuck, not busy.
CALL_TIMEOUT_S = 25.0

EXIT_OK = 0
EXIT_DAEMON_ERROR = 1
EXIT_USAGE = 2  # argparse's own
EXIT_NOT_RUNNING = 3
EXIT_ACCESS_DENIED = 4

NOT_RUNNING_ERRORS = frozenset(
    {"org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"}
)
ACCESS_DENIED_ERROR = "org.freedesktop.DBus.Error.AccessDenied"

# GetStatus's reply with the variants unwrapped: (manager dict, one dict per link).
Status = tuple[dict[str, Any], list[dict[str, Any]]]


class CtlError(Exception):
    """A failure to report as one line on stderr, with the exit code it stands for."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- formatting (pure) ---------------------------------------------------------------------


RATE_UNITS = ("kbit/s", "Mbit/s", "Gbit/s", "Tbit/s")


def human_duration(seconds: float) -> str:
    """5s, 3m12s, 2h05m, 3d4h: two units at most, as the eye reads an uptime."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def human_rate(bits_per_second: float) -> str:
    """850 bit/s, 12.3 Mbit/s: decimal (SI) prefixes, as ISPs sell bandwidth."""
    if bits_per_second < 999.5:
        return f"{max(0, round(bits_per_second))} bit/s"
    exponent = 1  # the prefix that keeps the rounded figure under 1000
    while exponent < len(RATE_UNITS) and bits_per_second / 1000**exponent >= 999.95:
        exponent += 1
    return f"{bits_per_second / 1000**exponent:.1f} {RATE_UNITS[exponent - 1]}"


def human_percent(value: float) -> str:
    return f"{value:.1f}".removesuffix(".0") + "%"


def human_latency(ms: float) -> str:
    return "-" if ms < 0 else f"{ms:.1f} ms"


def unwrap_status(body: Sequence[Any]) -> Status:
    """GetStatus's (a{sv}, aa{sv}) with the dbus-fast Variants replaced by their values."""
    manager, links = body
    return (
        {key: variant.value for key, variant in manager.items()},
        [{key: variant.value for key, variant in link.items()} for link in links],
    )


def status_header(manager: dict[str, Any]) -> str:
    return (
        f"uplinkd {manager.get('Version', '?')}: {manager.get('OverallState', '?')}, "
        f"generation {manager.get('Generation', '?')}, mode {manager.get('Mode', '?')}"
    )


TABLE_COLUMNS = ("LINK", "DEVICE", "STATE", "FOR", "LATENCY", "LOSS", "SHARE", "RX", "TX")
HOP_COLUMN = "HOP LATENCY"  # after LATENCY, when some link measures it (lowest-latency)
RIGHT_ALIGNED = frozenset({"FOR", "LATENCY", HOP_COLUMN, "LOSS", "SHARE", "RX", "TX"})


def link_row(link: dict[str, Any], now: float, *, hop: bool = False) -> list[str]:
    since = float(link.get("Since", 0))
    hop_cell = [human_latency(float(link.get("HopLatencyMs", -1)))] if hop else []
    return [
        str(link.get("Name", "?")),
        str(link.get("Device", "")) or "-",
        str(link.get("State", "?")),
        human_duration(now - since) if since > 0 else "-",
        human_latency(float(link.get("LatencyMs", -1))),
        *hop_cell,
        human_percent(float(link.get("LossPercent", 0))),
        human_percent(100 * float(link.get("NewConnectionShare", 0))),
        human_rate(float(link.get("RxBps", 0))),
        human_rate(float(link.get("TxBps", 0))),
    ]


def hook_problem_lines(manager: dict[str, Any]) -> str:
    """The hook failures in force (the manager's HookProblems, when the daemon reports them):
    one line each, naming the hook file and line."""
    problems = [str(problem) for problem in manager.get("HookProblems", ())]
    return "".join(f"hook problem: {problem}\n" for problem in problems)


def status_table(status: Status, now: float) -> str:
    """The header line, then one row per link in the daemon's (configuration) order, then the
    hook problems, if any."""
    manager, links = status
    if not links:
        return f"{status_header(manager)}\n(no links)\n" + hook_problem_lines(manager)
    hop = any(float(link.get("HopLatencyMs", -1)) >= 0 for link in links)
    columns = list(TABLE_COLUMNS)
    if hop:
        columns.insert(columns.index("LATENCY") + 1, HOP_COLUMN)
    rows = [link_row(link, now, hop=hop) for link in links]
    body = table(columns, rows, RIGHT_ALIGNED)
    return status_header(manager) + "\n" + body + hook_problem_lines(manager)


def table(columns: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[str]) -> str:
    """Columns two spaces apart, each as wide as its widest cell; `right` ones right-aligned."""
    every = [list(columns), *rows]
    widths = [max(len(row[i]) for row in every) for i in range(len(columns))]
    lines = []
    for row in every:
        cells = (
            cell.rjust(width) if column in right else cell.ljust(width)
            for column, cell, width in zip(columns, row, widths, strict=True)
        )
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


LEARNED_COLUMNS = ("RULE", "DESTINATION", "LINK", "FORGOTTEN IN")
# Entries asked for per GetLearned call: the daemon's most (bus.LEARNED_PAGE_MAX).
LEARNED_PAGE = 100


def learned_table(destinations: Sequence[Sequence[Any]]) -> str:
    """GetLearned's (rule, address, link, seconds left) entries, one row each."""
    if not destinations:
        return "(no destinations learned: no fastest-response rule, or no new destination yet)\n"
    rows = [
        [rule, address, link, human_duration(left)] for rule, address, link, left in destinations
    ]
    return table(LEARNED_COLUMNS, rows, {"FORGOTTEN IN"})


def learned_json(destinations: Sequence[Sequence[Any]]) -> str:
    keys = ("rule", "address", "link", "seconds_left")
    entries = [dict(zip(keys, entry, strict=True)) for entry in destinations]
    return json.dumps(entries, indent=2) + "\n"


# Link properties that the contract sets to -1 when nothing was measured, since D-Bus has no
# null; JSON has one, and a script should not average a -1 into its latencies.
NOT_MEASURED_WHEN_NEGATIVE = frozenset({"LatencyMs", "HopLatencyMs"})


def measured_or_null(link: dict[str, Any]) -> dict[str, Any]:
    return {
        key: None if key in NOT_MEASURED_WHEN_NEGATIVE and float(value) < 0 else value
        for key, value in link.items()
    }


def status_json(status: Status) -> str:
    """GetStatus as JSON, keys sorted, with null for a figure that is not measured."""
    manager, links = status
    data = {"manager": manager, "links": [measured_or_null(link) for link in links]}
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


def timestamp(when: float) -> str:
    local = time.localtime(when)
    return time.strftime("%Y-%m-%d %H:%M:%S", local) + f".{int(when * 1000) % 1000:03d}"


def state_change_line(when: float, name: str, old: str, new: str, reason: str) -> str:
    return f"{timestamp(when)}  {name}: {old} -> {new}" + (f" ({reason})" if reason else "")


def plan_applied_line(when: float, generation: int) -> str:
    return f"{timestamp(when)}  plan applied, generation {generation}"


def enabled_line(name: str, enabled: bool, state: str) -> str:
    """What `uplinkctl up/down NAME` did, with the state the link is in now."""
    if not enabled:
        return f"{name}: disabled (state {state}; out of service until 'uplinkctl up {name}')"
    if state == "init":
        return f"{name}: enabled (state init, probing decides)"
    return f"{name}: enabled (state {state})"


def reloaded_line(before: int, after: int) -> str:
    """What `uplinkctl reload` did: the generation of the plan now in force."""
    return f"reloaded: generation {after}" + (" (plan unchanged)" if after == before else "")


def link_state(status: Status, name: str) -> str:
    return next(
        (str(link.get("State", "?")) for link in status[1] if link.get("Name") == name), "?"
    )


def exit_code(error_name: str) -> int:
    if error_name in NOT_RUNNING_ERRORS:
        return EXIT_NOT_RUNNING
    if error_name == ACCESS_DENIED_ERROR:
        return EXIT_ACCESS_DENIED
    return EXIT_DAEMON_ERROR


def error_message(error_name: str, text: str, command: str) -> str:
    """The line for an error reply: the bus's own errors reworded, uplinkd's passed on."""
    code = exit_code(error_name)
    if code == EXIT_NOT_RUNNING:
        return f"uplinkd is not running (no owner of {BUS_NAME} on the system bus)"
    if code == EXIT_ACCESS_DENIED:
        return f"access denied: 'uplinkctl {command}' needs root or membership in the admin group"
    if error_name.startswith(UPLINKD_ERROR) and text:
        return text
    return f"{text or 'failed'} ({error_name})"


# --- the bus -------------------------------------------------------------------------------


class Client:
    """One connection to the system bus, calling uplinkd's manager for one command."""

    def __init__(self, bus: MessageBus, command: str) -> None:
        self.bus = bus
        self.command = command

    @classmethod
    async def connect(cls, address: str, command: str) -> Client:
        try:
            bus = MessageBus(bus_address=address, bus_type=BusType.SYSTEM)
            await asyncio.wait_for(bus.connect(), CALL_TIMEOUT_S)
        except (OSError, EOFError, DBusFastError, TimeoutError) as exc:
            reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or "timeout"
            raise CtlError(
                EXIT_NOT_RUNNING, f"cannot connect to the system bus at {address}: {reason}"
            ) from None
        return cls(bus, command)

    async def call(self, member: str, sig: str = "", *body: Any) -> list[Any]:
        """Call a method of uplinkd's manager; an error reply becomes a CtlError."""
        flags = MessageFlag.NO_AUTOSTART  # asking for a status must not start a daemon
        message = Message(
            BUS_NAME, BUS_PATH, MANAGER_INTERFACE, member, flags=flags, signature=sig, body=[*body]
        )
        return await self.send(message)

    async def subscribe(self, match: str) -> None:
        bus, path = "org.freedesktop.DBus", "/org/freedesktop/DBus"
        await self.send(Message(bus, path, bus, "AddMatch", signature="s", body=[match]))

    async def send(self, message: Message) -> list[Any]:
        try:
            reply = await asyncio.wait_for(self.bus.call(message), CALL_TIMEOUT_S)
        except TimeoutError:
            late = f"uplinkd did not answer {message.member} within {CALL_TIMEOUT_S:g} s"
            raise CtlError(EXIT_DAEMON_ERROR, late) from None
        except (OSError, EOFError, DBusFastError) as exc:
            raise CtlError(EXIT_NOT_RUNNING, f"lost the system bus: {exc}") from None
        if reply.message_type == MessageType.ERROR:
            error_name = reply.error_name or ""
            text = str(reply.body[0]) if reply.body else ""
            raise CtlError(exit_code(error_name), error_message(error_name, text, self.command))
        return list(reply.body)


async def monitor(client: Client, count: int | None) -> None:
    """Print state changes and applied plans until `count` state changes, SIGINT or SIGTERM."""
    # The bus's handlers only queue lines (an exception there would be logged, not raised);
    # None ends the loop, a CtlError ends it with that error.
    lines: asyncio.Queue[str | CtlError | None] = asyncio.Queue()
    changes = 0

    def on_message(message: Message) -> None:
        nonlocal changes
        now, body = time.time(), message.body
        if message.message_type != MessageType.SIGNAL:
            return
        if message.interface == MANAGER_INTERFACE and message.member == "LinkStateChanged":
            lines.put_nowait(state_change_line(now, *body[:4]))
            changes += 1
            if count is not None and changes == count:
                lines.put_nowait(None)
        elif message.interface == MANAGER_INTERFACE and message.member == "PlanApplied":
            lines.put_nowait(plan_applied_line(now, body[0]))
        elif message.member == "NameOwnerChanged" and body[0] == BUS_NAME:
            went = "is back on" if body[2] else "left"
            lines.put_nowait(f"{timestamp(now)}  uplinkd {went} the system bus")

    def on_disconnect(future: asyncio.Future[None]) -> None:
        if not future.cancelled():
            future.exception()  # retrieved: the message below says it
        lines.put_nowait(CtlError(EXIT_NOT_RUNNING, "lost the connection to the system bus"))

    loop = asyncio.get_running_loop()
    for number in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(number, lines.put_nowait, None)
    client.bus.add_message_handler(on_message)
    # Subscribe first, then take the snapshot, so no change falls between the two.
    await client.subscribe(f"type='signal',sender='{BUS_NAME}',interface='{MANAGER_INTERFACE}'")
    await client.subscribe(
        f"type='signal',sender='org.freedesktop.DBus',member='NameOwnerChanged',arg0='{BUS_NAME}'"
    )
    manager, _ = unwrap_status(await client.call("GetStatus"))
    print(f"{timestamp(time.time())}  {status_header(manager)}", flush=True)
    # dbus-fast leaves this coroutine unannotated; it ends when the bus connection does.
    disconnected = asyncio.ensure_future(client.bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
    disconnected.add_done_callback(on_disconnect)
    while (line := await lines.get()) is not None:
        if isinstance(line, CtlError):
            raise line
        print(line, flush=True)


async def all_learned(client: Client) -> list[Any]:
    """Every page of GetLearned (the daemon answers at most LEARNED_PAGE entries a call)."""
    destinations: list[Any] = []
    while True:
        page, total = await client.call("GetLearned", "uu", len(destinations), LEARNED_PAGE)
        destinations += page
        if not page or len(destinations) >= total:
            return destinations


async def run(args: argparse.Namespace) -> None:
    command = args.command if args.command not in ("up", "down") else f"{args.command} {args.name}"
    address = getattr(args, "bus_address", None) or os.environ.get("DBUS_SYSTEM_BUS_ADDRESS")
    client = await Client.connect(address or DEFAULT_SYSTEM_BUS, command)
    try:
        if args.command == "status":
            data = unwrap_status(await client.call("GetStatus"))
            sys.stdout.write(status_json(data) if args.json else status_table(data, time.time()))
        elif args.command in ("up", "down"):
            enabled = args.command == "up"
            await client.call("SetLinkEnabled", "sb", args.name, enabled)
            status = unwrap_status(await client.call("GetStatus"))
            print(enabled_line(args.name, enabled, link_state(status, args.name)))
        elif args.command == "reload":
            before, _ = unwrap_status(await client.call("GetStatus"))
            await client.call("Reload")
            after, _ = unwrap_status(await client.call("GetStatus"))
            print(reloaded_line(int(before.get("Generation", 0)), int(after.get("Generation", 0))))
        elif args.command == "learned":
            write = learned_json if args.json else learned_table
            sys.stdout.write(write(await all_learned(client)))
        elif args.command == "dry-run":
            [plan] = await client.call("DryRun")
            sys.stdout.write(plan if plan.endswith("\n") else plan + "\n")
        else:
            await monitor(client, args.count)
    finally:
        client.bus.disconnect()


EPILOG = f"""\
uplinkctl talks to uplinkd over the system bus ({BUS_NAME}) at --bus-address,
else $DBUS_SYSTEM_BUS_ADDRESS, else {DEFAULT_SYSTEM_BUS}.
Anyone may read (status, monitor, dry-run, learned); up, down and reload need root or the
administrators' group of uplinkd's bus policy.

exit status:
  0  success
  1  uplinkd refused or failed the request (unknown link, bad configuration on reload, ...)
  2  usage error
  3  uplinkd is not running, or the system bus cannot be reached
  4  access denied by the bus policy
"""


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--bus-address", metavar="ADDRESS", default=argparse.SUPPRESS, help="the bus to use"
    )
    p = argparse.ArgumentParser(
        prog="uplinkctl",
        description="Show and steer the uplinkd multi-WAN daemon.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[common],
    )
    p.add_argument("--version", action="version", version=f"uplinkctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    st = sub.add_parser("status", parents=[common], help="links, states and live figures")
    st.add_argument("--json", action="store_true", help="GetStatus's data as JSON")
    for command, verb in (("up", "enable"), ("down", "disable")):
        one = sub.add_parser(command, parents=[common], help=f"{verb} a link (admin)")
        one.add_argument("name", metavar="NAME", help="the link's name in the configuration")
    sub.add_parser("reload", parents=[common], help="re-read the configuration (admin)")
    mon = sub.add_parser("monitor", parents=[common], help="print state changes as they happen")
    mon.add_argument("--count", type=positive, metavar="N", help="stop after N state changes")
    sub.add_parser("dry-run", parents=[common], help="print what uplinkd would apply now")
    lrn = sub.add_parser(
        "learned", parents=[common], help="destinations fastest-response rules have learned"
    )
    lrn.add_argument("--json", action="store_true", help="GetLearned's data as JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        asyncio.run(run(args))
    except CtlError as exc:
        print(f"uplinkctl: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`uplinkctl monitor | head -3`): nothing more to say, nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
