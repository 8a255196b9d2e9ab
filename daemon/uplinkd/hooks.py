"""Hook directories beside the configuration, as in Net-ISP-Balance.

`pre-run/`, `routes/`, `firewall/` and `post-run/` are read in that order, each in name order,
skipping editor backups (`~`) and `.bak` files. Only root-owned files that group and others
cannot write are used. Plain files hold one command per line:
- in `firewall/`: nftables commands (`nft` prefix optional), applied inside uplinkd's own
  transaction, so a bad line refuses the whole apply and a good one is re-added on every rebuild;
- elsewhere: shell commands, run after uplinkd's state is in place (`pre-run/`: before).
`.py` files (the successors of Net-ISP-Balance's `.pl` hooks) run with the balancer object `B`
(except in a dry run, which changes nothing: they are named in its output instead).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import subprocess
import sys
import traceback
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TypeVar

from . import const, hookfiles
from .errors import ConfigError, HookError
from .model import Config, Match, Method, PortForward, PortRange, Rule
from .plan import HookLine, LinkFacts, RouteSpec
from .planner import MAIN_TABLE, Extras
from .validate import At, parse_forward_target, parse_ipv4, parse_network, parse_port_range

log = logging.getLogger(__name__)


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


refusal = hookfiles.refusal  # why a hook file must not be used (a link, its owner, its mode)
_refusals = hookfiles.RefusalLog(log)


def hook_files(root: Path) -> tuple[list[tuple[str, Path]], list[str]]:
    """Usable hook files as (stage, path) in run order, and the refusals (each logged once,
    when it first appears: see hookfiles for what is refused)."""
    found: list[tuple[str, Path]] = []
    refused: list[str] = []
    for stage in const.HOOK_DIRS:
        usable, unsafe = hookfiles.usable_files(root / stage, root)
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
    ValueError naming the argument; _run_python adds the hook's file and line."""
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
    """The object `B` that `.py` hooks receive (Net-ISP-Balance's `$B`)."""

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
        self.current_file = ""  # the hook file now running, set by _run_python

    def _where(self) -> tuple[str, int]:
        """The hook file and the line in it that called a Balancer method."""
        frame: FrameType | None = sys._getframe(1)  # the caller of the Balancer method
        while frame is not None:
            if frame.f_code.co_filename == self.current_file:
                return self.current_file, frame.f_lineno
            frame = frame.f_back
        return self.current_file, 0

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
                table=MAIN_TABLE,
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


def _run_python(path: Path, balancer: Balancer) -> None:
    source = path.read_text()
    try:
        code = compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise HookError(path, f"syntax error: {exc.msg}", line=exc.lineno or 0) from exc
    balancer.current_file = str(path)
    try:
        # Root-owned, not group/other-writable hook files are the admin's own code.
        exec(code, {"B": balancer, "__file__": str(path), "__name__": "uplinkd_hook"})  # noqa: S102
    except Exception as exc:
        line = next(
            (
                frame.lineno
                for frame in reversed(traceback.extract_tb(exc.__traceback__))
                if frame.filename == str(path)
            ),
            0,
        )
        raise HookError(path, f"{type(exc).__name__}: {exc}", line=line or 0) from exc


def load(
    config: Config, facts: Sequence[LinkFacts], up: Collection[str], *, dry_run: bool = False
) -> Hooks:
    """Read every hook file; .py hooks run now (they describe state), commands later.

    A dry run changes nothing, and a .py hook is the admin's code that may change something
    (write a file, run a command) besides describing state: it is listed in `not_run` instead.
    """
    files, refused = hook_files(config.hook_root)
    for reason in refused:
        log.warning("%s", reason)
    balancer = Balancer(config, facts, up)
    commands: list[CommandLine] = []
    nft_lines: list[HookLine] = []
    not_run: list[str] = []
    for stage, path in files:
        if path.suffix == ".py" and dry_run:
            not_run.append(str(path))
            continue
        if path.suffix == ".py":
            _run_python(path, balancer)
            continue
        for number, raw in enumerate(path.read_text().splitlines(), start=1):
            text = raw.strip()
            if not text or text.startswith("#"):
                continue
            if stage == "firewall":
                nft_lines.append(HookLine(str(path), number, text.removeprefix("nft ").strip()))
            else:
                commands.append(CommandLine(stage, str(path), number, text))
    extras = Extras(
        rules=tuple(balancer.rules),
        forwards=tuple(balancer.forwards),
        routes=tuple(balancer.routes),
        nft_lines=(*nft_lines, *balancer.nft_lines),
    )
    return Hooks(extras=extras, commands=commands, refused=refused, not_run=not_run)


def run_commands(commands: Sequence[CommandLine], stages: Collection[str]) -> int:
    """Run the shell command lines of the given stages; returns how many failed (each is logged)."""
    failed = 0
    for command in commands:
        if command.stage not in stages:
            continue
        try:
            result = subprocess.run(
                ["/bin/sh", "-c", command.text],
                capture_output=True,
                text=True,
                timeout=const.HOOK_COMMAND_TIMEOUT_S,
                check=False,
                env={**os.environ, "UPLINKD_HOOK": command.path},
            )
        except subprocess.TimeoutExpired:
            log.error(
                "%s:%d: timed out after %.0f s: %s",
                command.path,
                command.line,
                const.HOOK_COMMAND_TIMEOUT_S,
                command.text,
            )
            failed += 1
            continue
        if result.returncode != 0:
            log.error(
                "%s:%d: exit %d: %s: %s",
                command.path,
                command.line,
                result.returncode,
                command.text,
                result.stderr.strip(),
            )
            failed += 1
    return failed
