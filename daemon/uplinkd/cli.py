"""`uplinkd`: the daemon, and Net-ISP-Balance's one-shot modes (-d, --once, --stop)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pyroute2 import AsyncIPRoute

from . import __version__, const
from .datapath import conntrack
from .datapath.apply import Datapath
from .datapath.backends import BACKEND_NAMES, get_backend
from .errors import ConfigError, HookError, LinkRoutesError, UplinkdError
from .hooks import stages
from .runtime import instance
from .runtime.daemon import Daemon, load_config, plan_with, prepare

log = logging.getLogger("uplinkd")

EXIT_FAILURE = 1
EXIT_BAD_INPUT = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="uplinkd",
        description="Balance traffic across ISP uplinks and fail over (nftables + policy routing).",
    )
    p.add_argument(
        "services",
        nargs="*",
        metavar="SERVICE",
        help="links to treat as up (default: all), like load_balance.pl CABLE DSL",
    )
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        default=Path(const.DEFAULT_CONFIG_PATH),
        help="uplinkd.toml or a Net-ISP-Balance balance.conf (detected by content)",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "-d",
        "--dry-run",
        action="store_true",
        help="print what would be applied (nft -f and ip -batch input); change nothing",
    )
    mode.add_argument(
        "--once", action="store_true", help="apply the plan with the named services up, then exit"
    )
    mode.add_argument(
        "--stop",
        action="store_true",
        help="remove everything uplinkd added (its nft table, routes and rules)",
    )
    p.add_argument(
        "--part",
        choices=("all", "nft", "ip"),
        help="with -d: print only the nftables or only the ip -batch part (default: all)",
    )
    p.add_argument(
        "--backend",
        choices=BACKEND_NAMES,
        help="netfilter backend, overriding the configuration's `backend` (auto: nftables "
        "wherever libnftables works, else legacy iptables)",
    )
    p.add_argument("--no-dbus", action="store_true", help="daemon: do not use the system bus")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"uplinkd {__version__}")
    return p


async def _dry_run(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.services)
    async with AsyncIPRoute() as ipr:
        prepared = await prepare(ipr, config, args.services, dry_run=True)
    backend = get_backend(args.backend or config.backend)
    skipped = "".join(f"#   {path}\n" for path in prepared.hooks.not_run)
    if skipped:
        # A comment, so that the output still feeds `nft -f` and `ip -batch`.
        sys.stdout.write(
            "# .py hooks not run in a dry run (it changes nothing, and a hook may); "
            "what they add is missing below:\n" + skipped
        )
    sys.stdout.write(Datapath(backend).render(prepared.plan, args.part or "all"))
    return 0


async def _once(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.services)
    datapath = Datapath(get_backend(args.backend or config.backend))
    refused: dict[str, str] = {}
    async with AsyncIPRoute() as ipr:
        prepared = await prepare(ipr, config, args.services)
        outcomes: list[stages.CommandOutcome] = []

        async def pre_run() -> None:
            outcomes.extend(await stages.run_commands(prepared.hooks.commands, {"pre-run"}))

        while True:  # each refusal takes at least one link out: bounded by the links
            try:
                report = await datapath.apply(ipr, prepared.plan, pre_run=pre_run)
                break
            except LinkRoutesError as exc:
                for name, why in exc.failed.items():
                    log.error("link %s: routes refused, applied as down: %s", name, why)
                refused |= exc.failed
                prepared = await plan_with(config, prepared.facts, prepared.up - set(exc.failed))
        if report.rebuilt:  # a one-shot may wait for them: each is time-boxed all the same
            after = await stages.run_commands(prepared.hooks.commands, {"routes", "post-run"})
            outcomes.extend(after)
    failed = [outcome for outcome in outcomes if outcome.problem is not None]
    for outcome in failed:
        log.error("%s", outcome.problem)
    # As the daemon does when a link goes out of use.
    down = {link.name: link.mark for link in prepared.plan.links if not link.up}
    not_forgotten = await conntrack.forget_links(down, prepared.plan.mark_mask)
    for name, why in not_forgotten.items():
        log.error("link %s is down: its tracked connections are not forgotten: %s", name, why)
    in_use = ", ".join(sorted(prepared.up & {f.name for f in prepared.facts})) or "none"
    log.info("applied with links up: %s (%s)", in_use, report.describe())
    return EXIT_FAILURE if failed or refused or not_forgotten else 0


async def _stop(args: argparse.Namespace) -> int:
    # Stopping must work even when the configuration is gone or broken.
    backend_name = args.backend or "nftables"
    if args.config.exists() and not args.backend:
        try:
            backend_name = load_config(args.config).backend
        except ConfigError as exc:
            log.warning("%s; removing the nftables datapath", exc)
    datapath = Datapath(get_backend(backend_name))
    async with AsyncIPRoute() as ipr:
        removed = await datapath.remove(ipr)
    log.info("removed uplinkd's datapath" if removed else "nothing of uplinkd's was installed")
    return 0


def _lock(mode: str) -> instance.InstanceLock:
    """This network namespace's instance lock; --stop names the holder it must not undercut."""
    try:
        return instance.acquire(mode)
    except instance.AlreadyRunningError as exc:
        if mode != "stop":
            raise
        holder = instance.describe(exc.pid, exc.mode)
        advice = (
            " and would apply its plan again; stop it first (systemctl stop uplinkd), "
            "then run --stop"
            if exc.mode == "daemon"
            else "; run --stop when it has finished"
        )
        raise instance.AlreadyRunningError(
            f"--stop refused: {holder} is running in this network namespace{advice}",
            exc.pid,
            exc.mode,
        ) from None


async def _run(args: argparse.Namespace) -> int:
    if args.dry_run:  # reads the kernel and changes nothing: no privilege, no lock
        return await _dry_run(args)
    instance.require_net_admin()
    mode = "once" if args.once else "stop" if args.stop else "daemon"
    lock = _lock(mode)
    try:
        return await _change(args)
    finally:
        lock.release()


async def _change(args: argparse.Namespace) -> int:
    if args.once:
        return await _once(args)
    if args.stop:
        return await _stop(args)
    daemon = Daemon(args.config, args.services, dbus=not args.no_dbus, backend=args.backend)
    await daemon.run()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    cli = parser()
    args = cli.parse_args(argv)
    if args.part is not None and not args.dry_run:
        cli.error("--part is an option of -d (dry run)")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # transitions logs every state callback at INFO; uplinkd logs the transitions itself.
    logging.getLogger("transitions").setLevel(logging.WARNING)
    try:
        return asyncio.run(_run(args))
    except (ConfigError, HookError) as exc:
        print(f"uplinkd: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except UplinkdError as exc:
        print(f"uplinkd: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except PermissionError as exc:  # -d as a user who may not read a hook directory
        print(f"uplinkd: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
