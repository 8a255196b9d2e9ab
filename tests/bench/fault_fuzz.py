"""Fault class "fuzzing": mutated uplinkd.toml and balance.conf files through `uplinkd -d` and
`uplinkd --once` in the lab's router namespace (issue 12, "fuzzing").

Each set starts from a valid file for the lab (BASE_TOML, BASE_CONF: the base itself is case 0
and must be accepted) and mutates it 1-3 times with a fixed seed: a line deleted, duplicated or
swapped with another; a value replaced by a hostile token; a garbage line inserted; the file
cut short; a character replaced; a key misspelt. Every file goes through -d (the kernel must not
change) and --once (a refused file must leave the kernel as it was; an accepted one, run again,
must find nothing to change), in one process per set and mode (fault_fuzz_driver.py); a sample
also goes through separate `uplinkd -d` processes, whose exit statuses must agree.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from uplinkd_lab.lab import INET_HOST, Lab

from .fault_kit import Case

REPO = Path(__file__).resolve().parents[2]
SEED = 0x0F022
SEPARATE_SAMPLE = 20  # files per set also run as separate processes

BASE_TOML = f"""[monitor]
interval_ms = 200
timeout_ms = 300
max_packet_loss = 20
long_down_time = 60

[[link]]
name = "ISP1"
device = "wan1"
weight = 3
priority = 1
targets = ["{INET_HOST}"]
bandwidth_mbps = {{ down = 100, up = 20 }}

[[link]]
name = "ISP2"
device = "wan2"
weight = 1
priority = 2
targets = ["{INET_HOST}"]

[[lan]]
name = "LAN"
device = "lan0"

[[rule]]
name = "banking"
match = {{ proto = "tcp", dport = [443], dst = ["203.0.113.0/24"] }}
method = "persistence"
by = "source"
links = ["ISP1", "ISP2"]

[[rule]]
name = "voip"
match = {{ proto = "udp", dport = [5060, "10000-20000"], iif = ["lan0"] }}
method = "priority"

[[rule]]
name = "web"
match = {{ proto = "tcp", dport = [8443] }}
method = "fastest-response"
cache_seconds = 600

[default]
method = "weighted"

[[forward]]
port = 2222
to = "192.168.10.35:22"
links = ["ISP1"]

[firewall]
enabled = false
forwarding_groups = [["LAN", ":isp"]]

[kernel]
mark_mask = 0x0000ff00
table_base = 200
rule_priority = 10000
"""

BASE_CONF = f"""ISP1          wan1     isp      {INET_HOST}       2       default
ISP2          wan2     isp      {INET_HOST}       1       default
LAN           lan0     lan
mode=balanced
forwarding_group=LAN :isp
long_down_time=120
"""

TOKENS = [
    "-1",
    "0",
    "4294967296",
    "99999999999999999999999",
    "1e309",
    "nan",
    "inf",
    "1.5",
    '"',
    '""',
    "[]",
    "{}",
    "true",
    '"wan9"',
    '"ISP1"',
    '"lan0"',
    '"../../etc/passwd"',
    "0x",
    "\u00e9\u00e9",
    '"300.1.1.1"',
    '"203.0.113.0/33"',
    '"::1"',
    "[1, 2, 3]",
    '["x"]',
    "{ a = 1 }",
    '"' + "A" * 300 + '"',
    "'single'",
    "=",
    "\\",
    "\t",
]
GARBAGE = [
    "[[link]]",
    "[monitor",
    "name = ",
    "=",
    "\t\t",
    "#",
    "x" * 5000,
    "[[rule]]",
    'method = "fastest-response"',
    "ISP3 wan3 isp 1.2.3.4 1 default",
    "mode=",
    "forwarding_group=LAN :nothing",
    "LAN lan0 lan",
    "ISP1 wan1 isp",
    "[default]",
    '[[lan]]\nname = "LAN"\ndevice = "lan0"',
    "\x00",
    "\ufeff",
    "debug=8",
    "long_down_time=-5",
]


def _replace_value(lines: list[str], rnd: random.Random) -> None:
    i = rnd.randrange(len(lines))
    token = rnd.choice(TOKENS)
    line = lines[i]
    if "=" in line:
        lines[i] = line.split("=", 1)[0] + "= " + token
    elif line.split():
        words = line.split()
        words[rnd.randrange(len(words))] = token
        lines[i] = " ".join(words)


def _misspell(lines: list[str], rnd: random.Random) -> None:
    i = rnd.randrange(len(lines))
    line = lines[i]
    if len(line) > 2:
        j = rnd.randrange(len(line) - 1)
        lines[i] = line[:j] + line[j + 1] + line[j] + line[j + 2 :]


def mutate(text: str, rnd: random.Random) -> str:
    lines = text.splitlines()
    for _ in range(rnd.randint(1, 3)):
        if not lines:
            lines = [rnd.choice(GARBAGE)]
        op = rnd.randrange(8)
        i = rnd.randrange(len(lines))
        if op == 0:
            del lines[i]
        elif op == 1:
            lines.insert(i, lines[i])
        elif op == 2:
            j = rnd.randrange(len(lines))
            lines[i], lines[j] = lines[j], lines[i]
        elif op == 3:
            _replace_value(lines, rnd)
        elif op == 4:
            lines.insert(i, rnd.choice(GARBAGE))
        elif op == 5:
            joined = "\n".join(lines)
            lines = joined[: rnd.randrange(len(joined) + 1)].splitlines()
        elif op == 6:
            line = lines[i]
            if line:
                j = rnd.randrange(len(line))
                lines[i] = line[:j] + rnd.choice("\"'[]{}=#,.\\\x00 9-é") + line[j + 1 :]
        else:
            _misspell(lines, rnd)
    return "\n".join(lines) + "\n"


def write_set(
    directory: Path, base: str, suffix: str, count: int, rnd: random.Random
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = directory / f"{index:04d}{suffix}"
        path.write_text(base if index == 0 else mutate(base, rnd), errors="surrogateescape")
        path.chmod(0o644)
        paths.append(path)
    return paths


def drive(lab: Lab, mode: str, paths: list[Path]) -> list[dict[str, object]]:
    argv = ["env", f"PYTHONPATH={REPO}", sys.executable, "-m", "tests.bench.fault_fuzz_driver"]
    done = lab.run(
        lab.ns_router, *argv, "--mode", mode, *map(str, paths), timeout=60 + 2 * len(paths)
    )
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def separate(lab: Lab, paths: list[Path]) -> list[int]:
    argv = [sys.executable, "-m", "uplinkd.cli"]
    return [
        lab.run(lab.ns_router, *argv, "--config", str(p), "-d", check=False).returncode
        for p in paths
    ]


def one_set(lab: Lab, tmp: Path, name: str, base: str, count: int) -> Case:
    suffix = ".toml" if name == "toml" else ".conf"
    case = Case(
        "fuzzing",
        name,
        f"{count} {'uplinkd.toml' if name == 'toml' else 'balance.conf'}"
        f" files (the base and {count - 1} mutants), -d and --once",
        1,
    )
    paths = write_set(tmp / "fuzz" / name, base, suffix, count, random.Random(f"{SEED}{name}"))  # noqa: S311 - reproducible mutants
    dry = drive(lab, "d", paths)
    once = drive(lab, "once", paths)
    lab.run(lab.ns_router, sys.executable, "-m", "uplinkd.cli", "--stop", check=False)
    sample = paths[:SEPARATE_SAMPLE]
    codes = separate(lab, sample)
    by_file = {r["file"]: r for r in dry}
    agree = sum(
        by_file.get(p.name, {}).get("exit") == c for p, c in zip(sample, codes, strict=True)
    )
    for mode, records in (("-d", dry), ("--once", once)):
        exits = Counter(str(r["exit"]) for r in records)
        refused = [r for r in records if r["exit"] == 2]
        case.note(f"{mode}: files run", len(records))
        case.note(f"{mode}: exit statuses", dict(sorted(exits.items())))
        case.note(f"{mode}: tracebacks", sum(bool(r["traceback"]) for r in records))
        case.note(
            f"{mode}: refusals naming file:line",
            f"{sum(bool(r['names_line']) for r in refused)}/{len(refused)}",
        )
        unnamed = Counter(_pattern(str(r["error"])) for r in refused if not r["names_line"])
        case.note(f"{mode}: refusals without a line, by message", dict(unnamed.most_common(8)))
    case.note("-d: kernel changed", sum(bool(r["kernel_changed"]) for r in dry))
    refused_changed = sum(bool(r["kernel_changed"]) for r in once if r["exit"] == 2)
    case.note("--once: refused and kernel changed", refused_changed)
    applied = [r for r in once if r["exit"] == 0]
    whole = sum(bool(r["again_unchanged"]) for r in applied)
    case.note(
        "--once: applied, and a second run found nothing to change", f"{whole}/{len(applied)}"
    )
    case.note(
        "base file accepted",
        f"-d {dry[0]['exit'] if dry else '?'}, --once {once[0]['exit'] if once else '?'}",
    )
    case.note("separate `uplinkd -d` processes agree", f"{agree}/{len(sample)}")
    case.note("tracebacks (examples)", [r["error"] for r in dry + once if r["traceback"]][:5])
    return case


def _pattern(message: str) -> str:
    """A refusal's message with the file and the numbers left out, to count kinds of messages."""
    text = re.sub(r"\S*/\d{4}\.(?:toml|conf)", "FILE", message).removeprefix("uplinkd: error: ")
    return re.sub(r"\d+", "N", text)[:200]


def run(lab: Lab, tmp: Path, count: int, log: Callable[[str], None]) -> list[Case]:
    cases = []
    for name, base in (("toml", BASE_TOML), ("balance.conf", BASE_CONF)):
        try:
            case = one_set(lab, tmp, name, base, count)
        except (OSError, subprocess.SubprocessError, ValueError, RuntimeError) as exc:
            case = Case("fuzzing", name, f"{count} mutated files")
            case.errors.append(str(exc).splitlines()[0])
        log(f"  fuzzing/{name}: {case.describe()}")
        cases.append(case)
    return cases
