"""Hook directories beside the configuration, as in Net-ISP-Balance.

`pre-run/`, `routes/`, `firewall/` and `post-run/` are read in that order, each in name order,
skipping editor backups (`~`) and `.bak` files. Only root-owned files that group and others
cannot write are used. Plain files hold one command per line:
- in `firewall/`: nftables commands (`nft` prefix optional), applied inside uplinkd's own
  transaction, so a bad line refuses the whole apply and a good one is re-added on every rebuild;
- elsewhere: shell commands, run after uplinkd's state is in place (`pre-run/`: before), each
  in its own process group with a time limit and its output cut short (run_commands).
`.py` files (the successors of Net-ISP-Balance's `.pl` hooks) run with the balancer object `B`,
each in a child process with a time limit (hooks/child.py; run_python replays what it asked for),
except in a dry run, which changes nothing: they are named in its output instead. How the
daemon runs all this beside its event loop is hooks/runner.py's part.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import sys
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from .. import background, const, trust
from ..config.model import Config, Match, Method, PortForward, PortRange, Rule
from ..config.validate import At, parse_forward_target, parse_ipv4, parse_network, parse_port_range
from ..errors import ConfigError, HookError
from ..planning.plan import HookLine, LinkFacts, RouteSpec
from ..planning.planner import Extras

log = logging.getLogger("uplinkd")


@dataclass(frozen=True)
class CommandLine:
    stage: str
    path: str
    line: int
    text: str


@dataclass
class Hooks:
    extras: Extras = field(default_factory=Extras)
    commands: list[CommandLine] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    not_run: list[str] = field(default_factory=list)  # .py hooks a dry run left out


refusal = trust.refusal  # why a hook file must not be used (a link, its owner, its mode)
_refusals = trust.RefusalLog(log)


def hook_files(root: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """Usable hook files as (stage, path) in run order, and the refusals (each logged once,
    when it first appears: see trust.py for what is refused)."""
    found: list[tuple[str, Path]] = []
    refused: list[str] = []
    for stage in const.HOOK_DIRS:
        usable, unsafe = trust.usable_files(root / stage, root)
        refused.extend(reason for reason in unsafe if reason not in refused)  # a refused root
        for path in usable:
            if path.suffix == ".pl":
                perl = "Perl hooks are not run; port it to a .py hook with B"
                refused.append(f"{path}: refused: {perl}")
            else:
                found.append((stage, path))
    _refusals.report(root, refused)
    return found, refused


_Value = TypeVar("_Value")
_Parsed = TypeVar("_Parsed")


def _parse(parse: Callable[[_Value, At], _Parsed], value: _Value, what: str) -> _Parsed:
    """A hook's argument, read by the configuration's own parser. Its complaint is raised as a
    ValueError naming the argument; replay adds the hook's file and line."""
    try:
        return parse(value, At(Path()))
    except ConfigError as error:
        raise ValueError(f"{what}: {error.message}") from None


def _loose_network(text: str, at: At) -> ipaddress.IPv4Network:
    # Net-ISP-Balance handed these to iptables, which clears host bits; hooks still may set them.
    return parse_network(text, at, strict=False)


def _gateway(text: str, at: At) -> ipaddress.IPv4Address:
    return parse_ipv4(text, at, "an IPv4 address or an ISP service name")


def _ports(value: int | str | Sequence[int | str] | None, what: str) -> tuple[PortRange, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, (int, str)) else list(value)
    return tuple(_parse(parse_port_range, item, what) for item in items)


def _networks(value: str | Sequence[str] | None, what: str) -> tuple[ipaddress.IPv4Network, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else list(value)
    return tuple(_parse(_loose_network, item, what) for item in items)


class Balancer:
    """The object `B` that `.py` hooks receive (Net-ISP-Balance's `$B`).

    A hook runs in a child process (hooks/child.py) with a stand-in that answers the queries from
    snapshot() and records the actions; the actions are replayed here (replay), where their
    arguments are checked.
    """

    def __init__(self, config: Config, facts: Sequence[LinkFacts], up: Collection[str]) -> None:
        self._config = config
        self._facts = {fact.name: fact for fact in facts}
        self._up = [
            link.name for link in config.links if link.name in up and link.name in self._facts
        ]
        self.rules: list[Rule] = []
        self.forwards: list[PortForward] = []
        self.routes: list[RouteSpec] = []
        self.nft_lines: list[HookLine] = []
        # The hook file and line of the call being replayed (replay sets them).
        self.current_file = ""
        self.current_line = 0

    def _where(self) -> tuple[str, int]:
        """The hook file and the line in it that called a Balancer method."""
        return self.current_file, self.current_line

    def snapshot(self) -> dict[str, Any]:
        """What the queries answer, for the child process that runs a hook (hooks/child.py)."""
        isp = [
            [name, self.dev(name), self.ip(name), self.net(name), self.gw(name)]
            for name in self.isp_services()
        ]
        lan = [[name, self.dev(name)] for name in self.lan_services()]
        return {"isp": isp, "lan": lan, "up": self.up()}

    # --- queries ---
    def services(self) -> list[str]:
        return [*self.isp_services(), *self.lan_services()]

    def isp_services(self) -> list[str]:
        return [link.name for link in self._config.links if link.name in self._facts]

    def lan_services(self) -> list[str]:
        return [lan.name for lan in self._config.lans]

    def up(self) -> list[str]:
        """ISP services currently up."""
        return list(self._up)

    def role(self, service: str) -> str:
        if service in self.isp_services():
            return "isp"
        if service in self.lan_services():
            return "lan"
        raise KeyError(f"unknown service {service!r}")

    def dev(self, service: str) -> str:
        if service in self._facts:
            return self._facts[service].device
        for lan in self._config.lans:
            if lan.name == service:
                return lan.device
        raise KeyError(f"unknown service {service!r}")

    def ip(self, service: str) -> str:
        return str(self._fact(service).address.ip)

    def net(self, service: str) -> str:
        return str(self._fact(service).address.network)

    def gw(self, service: str) -> str:
        gateway = self._fact(service).gateway
        return str(gateway) if gateway else ""

    def _fact(self, service: str) -> LinkFacts:
        if service not in self._facts:
            raise KeyError(f"unknown or absent ISP service {service!r}")
        return self._facts[service]

    # --- actions ---
    def forward(self, port: int | str, host: str, *protocols: str) -> None:
        """Forward an incoming port to a LAN host: forward(80, "192.168.10.35"),
        forward(23, "192.168.10.35:22"), forward(53, "192.168.10.2", "tcp", "udp")."""
        incoming = _ports(port, "forward() port")[0]
        address, host_port = _parse(parse_forward_target, host, "forward() host")
        for proto in protocols or ("tcp",):
            self.forwards.append(
                PortForward(port=incoming, host=address, host_port=host_port, proto=proto)
            )

    def force_route(
        self,
        service: str,
        *,
        src: str | Sequence[str] | None = None,
        dst: str | Sequence[str] | None = None,
        proto: str | None = None,
        sport: int | str | Sequence[int | str] | None = None,
        dport: int | str | Sequence[int | str] | None = None,
        iif: str | Sequence[str] | None = None,
        fallback: bool = False,
    ) -> None:
        """Send matching new connections through one ISP service. When it is down they are
        refused, unless fallback=True lets them use the other services in priority order."""
        self.role(service)
        match = Match(
            src=_networks(src, "force_route() src"),
            dst=_networks(dst, "force_route() dst"),
            proto=proto,
            sport=_ports(sport, "force_route() sport"),
            dport=_ports(dport, "force_route() dport"),
            iif=(iif,) if isinstance(iif, str) else tuple(iif or ()),
        )
        path, line = self._where()
        name = f"{Path(path).name}:{line}"
        if fallback:
            others = [s for s in self.isp_services() if s != service]
            rule = Rule(name, Method.PRIORITY, match, links=(service, *others))
        else:
            rule = Rule(name, Method.ENFORCED, match, links=(service,))
        self.rules.append(rule)

    def add_route(self, dest: str, *, via: str | None = None, dev: str | None = None) -> None:
        """Add a route to the main table (removed again by `uplinkd --stop`). `via` may be a
        gateway address or an ISP service name."""
        gateway = None
        if via in self._facts:
            dev = dev or self._facts[via].device
            gateway = self._facts[via].gateway
        elif via:
            gateway = _parse(_gateway, via, "add_route() via")
        if dev is None:
            raise ValueError("add_route needs dev= or a service name as via=")
        self.routes.append(
            RouteSpec(
                table=const.RT_TABLE_MAIN,
                dst=_parse(_loose_network, dest, "add_route() dest"),
                device=dev,
                gateway=gateway,
                scope_link=gateway is None,
            )
        )

    def nft(self, command: str) -> None:
        """Add an nftables command to uplinkd's transaction."""
        path, line = self._where()
        self.nft_lines.append(HookLine(path, line, command.removeprefix("nft ").strip()))


@dataclass(frozen=True)
class PythonHook:
    """A `.py` hook file as read (its text is what the child runs)."""

    stage: str
    path: str
    source: str


@dataclass
class HookFiles:
    """What the hook directories hold now: plain lines, `.py` hooks, refusals."""

    nft_lines: list[HookLine] = field(default_factory=list)
    commands: list[CommandLine] = field(default_factory=list)
    python: list[PythonHook] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)


def _read_hook(path: Path) -> str:
    """A hook file's text; HookError (refused) when it is too big or unsafe."""
    size = path.lstat().st_size
    if size > const.HOOK_FILE_LIMIT:
        raise HookError(path, f"refused: {size} bytes, more than {const.HOOK_FILE_LIMIT}")
    return trust.read_text(path)


def read_files(root: Path) -> HookFiles:
    """Read every hook file under root. Blocking file I/O: the daemon runs it in a thread."""
    files, refused = hook_files(root)
    found = HookFiles(refused=list(refused))
    for stage, path in files:
        try:
            text = _read_hook(path)
        except (HookError, OSError) as error:
            found.refused.append(str(error))
            continue
        if path.suffix == ".py":
            found.python.append(PythonHook(stage, str(path), text))
            continue
        for number, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if stage == "firewall":
                found.nft_lines.append(
                    HookLine(str(path), number, line.removeprefix("nft ").strip())
                )
            else:
                found.commands.append(CommandLine(stage, str(path), number, line))
    return found


# The Balancer methods a hook's recorded calls may name, and nothing else.
_ACTIONS: dict[str, Callable[..., None]] = {
    "forward": Balancer.forward,
    "force_route": Balancer.force_route,
    "add_route": Balancer.add_route,
    "nft": Balancer.nft,
}


def replay(path: str, calls: object, balancer: Balancer) -> Extras:
    """Make a hook's recorded calls on the real Balancer; what they add. A call the Balancer
    refuses is a HookError naming the hook's file and the line of the call."""
    if not isinstance(calls, list):
        raise HookError(path, "malformed answer from its child process: calls is not a list")
    for call in calls:
        line = call.get("line", 0) if isinstance(call, dict) else 0
        line = line if isinstance(line, int) else 0
        try:
            action = _ACTIONS[call["method"]]
            args, kwargs = call["args"], call["kwargs"]
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise TypeError("args or kwargs of the wrong type")  # noqa: TRY301
        except (KeyError, TypeError) as error:
            raise HookError(path, f"malformed call from its child process: {error}") from None
        balancer.current_file, balancer.current_line = path, line
        try:
            action(balancer, *args, **kwargs)
        except Exception as error:  # noqa: BLE001 - whatever a bad argument raises, named
            raise HookError(path, f"{type(error).__name__}: {error}", line=line) from None
    return Extras(
        rules=tuple(balancer.rules),
        forwards=tuple(balancer.forwards),
        routes=tuple(balancer.routes),
        nft_lines=tuple(balancer.nft_lines),
    )


def _child_environment(path: str) -> dict[str, str]:
    # The child imports uplinkd.hooks.child from where this package is, installed or not.
    package_root = str(Path(__file__).resolve().parent.parent)
    python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
    return {**os.environ, "UPLINKD_HOOK": path, "PYTHONPATH": python_path}


async def run_python(
    hook: PythonHook, config: Config, facts: Sequence[LinkFacts], up: Collection[str]
) -> Extras:
    """Run a .py hook in its child process (time limit, output bounded) and replay what it
    asked for; HookError names the file (and line) when it failed, timed out or asked for
    something the Balancer refuses."""
    snapshot = Balancer(config, facts, up).snapshot()
    request = {"path": hook.path, "source": hook.source, "snapshot": snapshot}
    try:
        finished = await background.run_bounded(
            [sys.executable, "-m", "uplinkd.hooks.child", hook.path],
            timeout=const.HOOK_TIMEOUT_S,
            output_limit=const.HOOK_OUTPUT_LIMIT,
            stdout_limit=const.HOOK_RESULT_LIMIT,
            stdin=json.dumps(request).encode(),
            env=_child_environment(hook.path),
        )
    except OSError as failure:  # no process could be started (EMFILE, EAGAIN, ...)
        raise HookError(hook.path, f"cannot start its child process: {failure}") from None
    printed = f" (output: {finished.output})" if finished.output else ""
    if finished.timed_out:
        limit = const.HOOK_TIMEOUT_S
        raise HookError(hook.path, f"killed after {limit:g} s, its time limit{printed}")
    if finished.stdout_dropped:
        raise HookError(hook.path, f"asked for more than {const.HOOK_RESULT_LIMIT} bytes of calls")
    try:
        answer = json.loads(finished.stdout)
    except ValueError:
        how = f"exit {finished.returncode}" if finished.returncode else "no answer"
        raise HookError(hook.path, f"its child process failed ({how}){printed}") from None
    if finished.output:
        log.info("%s: %s", hook.path, finished.output)
    error = answer.get("error") if isinstance(answer, dict) else None
    if isinstance(error, dict):
        line = error.get("line")
        raise HookError(
            hook.path, str(error.get("message")), line=line if isinstance(line, int) else 0
        )
    calls = answer.get("calls") if isinstance(answer, dict) else None
    return replay(hook.path, calls, Balancer(config, facts, up))


def combine(files: HookFiles, results: Sequence[Extras], *, not_run: Sequence[str] = ()) -> Hooks:
    """The hooks' part of the plan: plain files' lines first, then the .py hooks' in file order."""
    extras = Extras(
        rules=tuple(rule for result in results for rule in result.rules),
        forwards=tuple(forward for result in results for forward in result.forwards),
        routes=tuple(route for result in results for route in result.routes),
        nft_lines=(*files.nft_lines, *(line for result in results for line in result.nft_lines)),
    )
    return Hooks(extras, list(files.commands), list(files.refused), list(not_run))


async def load(
    config: Config, facts: Sequence[LinkFacts], up: Collection[str], *, dry_run: bool = False
) -> Hooks:
    """Read every hook file and run the .py hooks (one after another, each in its child
    process, time-boxed); command lines are run later (run_commands). The first .py hook that
    fails is raised (HookError): what the one-shot modes do with a bad hook.

    A dry run changes nothing, and a .py hook is the admin's code that may change something
    (write a file, run a command) besides describing state: it is listed in `not_run` instead.
    """
    files = await asyncio.to_thread(read_files, config.hook_root)
    if dry_run:
        return combine(files, [], not_run=[hook.path for hook in files.python])
    results = [await run_python(hook, config, facts, up) for hook in files.python]
    return combine(files, results)


@dataclass(frozen=True)
class CommandOutcome:
    command: CommandLine
    problem: str | None  # None: it exited 0


async def run_command(command: CommandLine) -> CommandOutcome:
    """Run one shell command line in its own process group, time-boxed, output bounded."""
    where = f"{command.path}:{command.line}"
    try:
        finished = await background.run_bounded(
            ["/bin/sh", "-c", command.text],
            timeout=const.HOOK_TIMEOUT_S,
            output_limit=const.HOOK_OUTPUT_LIMIT,
            env={**os.environ, "UPLINKD_HOOK": command.path},
        )
    except OSError as error:
        return CommandOutcome(command, f"{where}: cannot run: {error.strerror or error}")
    shown = f": {finished.output}" if finished.output else ""
    if finished.timed_out:
        limit = const.HOOK_TIMEOUT_S
        problem = f"{where}: killed after {limit:g} s, its time limit: {command.text}{shown}"
        return CommandOutcome(command, problem)
    if finished.returncode != 0:
        problem = f"{where}: exit {finished.returncode}: {command.text}{shown}"
        return CommandOutcome(command, problem)
    if finished.output:
        log.info("%s: %s", where, finished.output)
    return CommandOutcome(command, None)


async def run_commands(
    commands: Sequence[CommandLine], stages: Collection[str]
) -> list[CommandOutcome]:
    """Run the shell command lines of the given stages, one after another, in order."""
    return [await run_command(command) for command in commands if command.stage in stages]
