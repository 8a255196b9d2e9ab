"""`uplinkctl`: look at what uplinkd installed in the kernel here (the D-Bus client comes later).

`uplinkctl status` reads uplinkd's nft maps and says, per rule, which links new connections
currently go to and in what share; `uplinkctl dry-run` is `uplinkd -d`.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Sequence

from .backends import NftablesBackend
from .cli import main as uplinkd_main
from .errors import UplinkdError
from .plan import UNREACHABLE


def status(as_json: bool) -> int:
    state = NftablesBackend().read_back()
    if state is None:
        print(
            "uplinkctl: uplinkd has no datapath installed in this network namespace",
            file=sys.stderr,
        )
        return 3
    rules = {}
    for name, targets in state.maps.items():
        counts = Counter(targets)
        rules[name] = {
            (
                "unreachable" if link == UNREACHABLE else state.link_names.get(link, f"link {link}")
            ): round(100 * n / len(targets), 1)
            for link, n in sorted(counts.items())
        }
    if as_json:
        print(json.dumps({"structure": state.structure, "rules": rules}, indent=2))
        return 0
    print(f"uplinkd datapath installed (structure {state.structure})")
    for name, shares in rules.items():
        text = ", ".join(f"{target} {share}%" for target, share in shares.items())
        print(f"  {name:<28} {text}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="uplinkctl", description="Inspect uplinkd.")
    sub = p.add_subparsers(dest="command", required=True)
    st = sub.add_parser("status", help="where new connections go, per rule (shares of buckets)")
    st.add_argument("--json", action="store_true")
    dry = sub.add_parser("dry-run", help="print what uplinkd would apply (uplinkd -d)")
    dry.add_argument("-c", "--config", required=True)
    args = p.parse_args(argv)
    try:
        if args.command == "status":
            return status(args.json)
        return uplinkd_main(["-d", "--config", args.config])
    except UplinkdError as exc:
        print(f"uplinkctl: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
