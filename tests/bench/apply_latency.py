"""Apply latency (item 3): planner and datapath called directly, in a namespace of veth links.

For each size (2, 8, 32 links x 10, 100, 1000 rules) a fresh pair of namespaces is built: the
router side, where this module's worker runs (``python -m tests.bench.apply_latency --worker``),
holds wan1..wanN and lan0; the other side holds each veth's peer with the link's gateway
address. The worker then

- applies the plan with every link up: a full build from nothing, timed once (``first_full_s``);
- link state changes: plans with link L1 down and applies, then plans with it up again and
  applies, and so on (``plan_s``: planner.plan; ``apply_s``: Datapath.apply, which reads the
  table back, checks, syncs routes and rules and commits the map rewrite; every one must report
  `maps`, else the run fails);
- rebuilds: applies a configuration with one more rule, then the original, and so on; each is a
  full rebuild of the table in one transaction, as on a reload (``rebuild_s``);
- starts: removes the datapath and runs ``uplinkd --config ... --no-dbus``, timing from the
  process start to its first "applied generation" log line (``start_s``).

Each kind is repeated up to its count, but stops taking samples once it has spent the size's
time budget (half of it for rebuilds and starts), after at least one: the largest sizes take
tens of seconds per sample, which a 15-minute suite cannot repeat. `n` says how many there were.
Rules cycle through the methods weighted, persistence and priority and match one TCP port each;
every rule lists every link, so a link going down changes every map: the worst case. Links
have weight 1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .stats import summary

SIZES = [(links, rules) for links in (2, 8, 32) for rules in (10, 100, 1000)]
METHODS = ("weighted", "persistence", "priority")
REPO = Path(__file__).resolve().parents[2]


def config_text(links: int, rules: int) -> str:
    parts = [
        f'[[link]]\nname = "L{i}"\ndevice = "wan{i}"\ngateway = "10.1.{i}.1"\n'
        for i in range(1, links + 1)
    ]
    parts.append('[[lan]]\nname = "LAN"\ndevice = "lan0"\n')
    for k in range(rules):
        match = f'{{ proto = "tcp", dport = [{10000 + k}] }}'
        method = METHODS[k % len(METHODS)]
        parts.append(f'[[rule]]\nname = "r{k}"\nmatch = {match}\nmethod = "{method}"\n')
    return "\n".join(parts)


# --- the worker, inside the router namespace ---------------------------------------------------


def sampled(limit: int, budget: float) -> Iterator[int]:
    """0, 1, ... up to `limit` samples, fewer once `budget` seconds are spent (at least one)."""
    begin = time.perf_counter()
    for i in range(limit):
        if i and time.perf_counter() - begin > budget:
            return
        yield i


async def _measure(path: Path, reps: int, full_reps: int, budget: float) -> dict[str, object]:
    from pyroute2 import AsyncIPRoute  # noqa: PLC0415 - the worker alone needs the daemon's modules
    from uplinkd.config import loading  # noqa: PLC0415
    from uplinkd.datapath.apply import Datapath  # noqa: PLC0415
    from uplinkd.datapath.backends import ApplyKind, NftablesBackend  # noqa: PLC0415
    from uplinkd.facts import discovery  # noqa: PLC0415
    from uplinkd.hooks import stages  # noqa: PLC0415
    from uplinkd.planning import planner  # noqa: PLC0415

    config = loading.load(path)
    bigger = path.with_name("bigger.toml")
    bigger.write_text(
        path.read_text() + '\n[[rule]]\nname = "extra"\nmatch = { dport = [9] }\n'
        'method = "weighted"\n'
    )
    config_b = loading.load(bigger)
    names = {link.name for link in config.links}
    datapath = Datapath(NftablesBackend())
    timings: dict[str, list[float]] = {"plan_s": [], "apply_s": [], "rebuild_s": []}
    async with AsyncIPRoute() as ipr:
        facts, _ = await discovery.discover(ipr, config.links)
        found = await stages.load(config, facts, names)

        async def apply(cfg: object, up: set[str], kind: ApplyKind, key: str | None) -> None:
            begin = time.perf_counter()
            plan = planner.plan(cfg, facts, up, found.extras)  # type: ignore[arg-type]
            planned = time.perf_counter()
            report = await datapath.apply(ipr, plan)
            done = time.perf_counter()
            if report.netfilter is not kind:
                raise RuntimeError(f"expected a {kind} apply, got {report.netfilter}")
            if key is not None:
                timings[key].append(done - planned)
                if key == "apply_s":
                    timings["plan_s"].append(planned - begin)

        begin = time.perf_counter()
        await apply(config, names, ApplyKind.FULL, None)
        first_full = time.perf_counter() - begin
        for i in sampled(2 * reps, budget):  # link L1 down, then up again, ...
            await apply(config, names - {"L1"} if i % 2 == 0 else names, ApplyKind.MAPS, "apply_s")
        for i in sampled(2 * full_reps, budget / 2):  # one more rule, then the original, ...
            await apply(config_b if i % 2 == 0 else config, names, ApplyKind.FULL, "rebuild_s")
        await datapath.remove(ipr)
    return {"first_full_s": first_full, **timings}


def _start_time(path: Path, bound: float = 60.0) -> float:
    """Seconds from starting `uplinkd --config` to its first "applied generation" line."""
    argv = [sys.executable, "-m", "uplinkd.cli", "--config", str(path), "--no-dbus"]
    begin = time.perf_counter()
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    assert proc.stderr is not None
    try:
        while time.perf_counter() - begin < bound:
            ready, _, _ = select.select([proc.stderr], [], [], 1.0)
            line = proc.stderr.readline() if ready else ""
            if "applied generation" in line:
                return time.perf_counter() - begin
            if ready and not line:
                break
        raise RuntimeError(f"uplinkd did not apply within {bound} s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        proc.stderr.close()
        stop = [sys.executable, "-m", "uplinkd.cli", "--config", str(path), "--stop"]
        subprocess.run(stop, check=True, capture_output=True, timeout=60)


def worker(
    links: int, rules: int, counts: tuple[int, int, int], budget: float
) -> dict[str, object]:
    reps, full_reps, starts = counts
    with tempfile.TemporaryDirectory(prefix="uplinkd-apply-") as tmp:
        path = Path(tmp) / "uplinkd.toml"
        path.write_text(config_text(links, rules))
        result = asyncio.run(_measure(path, reps, full_reps, budget))
        result["start_s"] = [_start_time(path) for _ in sampled(starts, budget / 2)]
    return result


# --- the orchestrator ------------------------------------------------------------------------


def _ip(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(["ip", *argv], input=stdin, text=True, check=True, capture_output=True)


def _namespaces(links: int) -> tuple[str, str]:
    router, peers = f"ulbench{os.getpid() % 10000}r", f"ulbench{os.getpid() % 10000}p"
    for ns in (router, peers):
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        _ip("netns", "add", ns)
    veths = [("lan0", "lanp", "192.168.50.1/24", "192.168.50.2/24")]
    veths += [
        (f"wan{i}", f"gw{i}", f"10.1.{i}.2/24", f"10.1.{i}.1/24") for i in range(1, links + 1)
    ]
    _ip(
        "-batch",
        "-",
        stdin="".join(
            f"link add {a} netns {router} type veth peer name {b} netns {peers}\n"
            for a, b, _, _ in veths
        ),
    )
    for ns, side in ((router, 0), (peers, 1)):
        lines = ["link set lo up\n"]
        for veth in veths:
            lines.append(f"address add {veth[2 + side]} dev {veth[side]}\n")
            lines.append(f"link set {veth[side]} up\n")
        _ip("-n", ns, "-batch", "-", stdin="".join(lines))
    return router, peers


def run(
    counts: tuple[int, int, int], budget: float, log: Callable[[str], None]
) -> dict[str, object]:
    """`counts`: state change pairs, rebuild pairs, starts; fewer once a size has spent `budget`
    seconds on its state changes (half that on rebuilds and on starts), at least one each."""
    results: dict[str, object] = {}
    reps, full_reps, starts = counts
    for links, rules in SIZES:
        router, peers = _namespaces(links)
        try:
            argv = ["--worker", "--links", str(links), "--rules", str(rules), "--reps", str(reps)]
            argv += [
                "--full-reps",
                str(full_reps),
                "--starts",
                str(starts),
                "--budget",
                str(budget),
            ]
            cmd = ["ip", "netns", "exec", router, sys.executable, "-m", "tests.bench.apply_latency"]
            out = subprocess.run(
                [*cmd, *argv], cwd=REPO, check=True, capture_output=True, text=True, timeout=600
            )
        finally:
            for ns in (router, peers):
                subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        raw = json.loads(out.stdout)
        sized = {"raw": raw} | {
            key: summary(raw[key]) for key in ("plan_s", "apply_s", "rebuild_s", "start_s")
        }
        results[f"{links}x{rules}"] = sized
        apply_s, rebuild_s = sized["apply_s"], sized["rebuild_s"]
        log(
            f"  {links} links x {rules} rules: state change {apply_s['median'] * 1000:.1f} ms"
            f" (p95 {apply_s['p95'] * 1000:.1f}), rebuild {rebuild_s['median'] * 1000:.0f} ms"
        )
    return results


def main() -> int:
    p = argparse.ArgumentParser(description="apply latency worker (run inside its namespace)")
    p.add_argument("--worker", action="store_true", required=True)
    for name in ("links", "rules", "reps", "full-reps", "starts"):
        p.add_argument(f"--{name}", type=int, required=True)
    p.add_argument("--budget", type=float, required=True)
    args = p.parse_args()
    counts = (args.reps, args.full_reps, args.starts)
    result = worker(args.links, args.rules, counts, args.budget)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
