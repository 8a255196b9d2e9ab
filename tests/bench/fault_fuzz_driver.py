"""Runs uplinkd's command line (uplinkd.cli.main) on many configuration files in one process,
inside the lab's router namespace; one JSON line per file. Used by fault_fuzz.py.

One process for hundreds of files: a separate `uplinkd` costs half a second of start-up, most of
it imports; fault_fuzz.py runs a sample through separate processes too and compares. For each
file, with `--mode d` (`uplinkd -d`) or `--mode once` (`uplinkd --once`):

- the exit status, or "traceback" when an exception escaped main (what a user would see as a
  Python traceback), and whether "Traceback" appears in what it printed;
- the first error line, and whether it names the file with a line number (`path:N`);
- whether the router's kernel state (nft ruleset, IPv4 rules and routes) changed;
- with --once and exit 0: whether a second --once of the same file found nothing to change
  (`netfilter: none; routes +0/-0; rules +0/-0`), i.e. the first applied the whole plan.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import re
import subprocess
import sys
import traceback
from pathlib import Path

from uplinkd import cli

UNCHANGED = "netfilter: none; routes +0/-0; rules +0/-0"


def kernel_state() -> str:
    parts = []
    for argv in (
        ("nft", "list", "ruleset"),
        ("ip", "-4", "rule", "show"),
        ("ip", "-4", "route", "show", "table", "all"),
    ):
        parts.append(subprocess.run(argv, capture_output=True, text=True, check=False).stdout)
    return "\n".join(parts)


class Runner:
    def __init__(self) -> None:
        self.handler = logging.StreamHandler(io.StringIO())
        self.handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root = logging.getLogger()
        root.addHandler(self.handler)  # cli.main's basicConfig then leaves logging alone
        root.setLevel(logging.INFO)
        logging.getLogger("transitions").setLevel(logging.WARNING)

    def run(self, argv: list[str]) -> tuple[int | str, str]:
        err, out = io.StringIO(), io.StringIO()
        self.handler.setStream(err)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code: int | str = cli.main(argv)
            except SystemExit as exc:  # argparse's own errors
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:  # noqa: BLE001 - this is what the fuzzing looks for
                traceback.print_exc(file=err)
                code = "traceback"
        return code, err.getvalue()


def one(runner: Runner, path: Path, mode: str) -> dict[str, object]:
    before = kernel_state()
    flag = "-d" if mode == "d" else "--once"
    code, err = runner.run(["--config", str(path), flag])
    after = kernel_state()
    errors = [x for x in err.splitlines() if x.startswith(("uplinkd: error:", "ERROR"))]
    first = errors[0] if errors else ""
    record: dict[str, object] = {
        "file": path.name,
        "exit": code,
        "traceback": code == "traceback" or "Traceback" in err,
        "error": first[:300],
        "names_line": re.search(rf"{re.escape(str(path))}:\d+", first) is not None,
        "kernel_changed": after != before,
        "again_unchanged": None,
    }
    if record["traceback"]:
        record["error"] = ([x for x in err.splitlines() if x.strip()] or [""])[-1][:300]
    if mode == "once" and code == 0:
        _, again = runner.run(["--config", str(path), "--once"])
        record["again_unchanged"] = UNCHANGED in again
    return record


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--mode", choices=("d", "once"), required=True)
    p.add_argument("files", nargs="+", type=Path)
    args = p.parse_args()
    runner = Runner()
    for path in args.files:
        print(json.dumps(one(runner, path, args.mode)), file=sys.__stdout__, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
