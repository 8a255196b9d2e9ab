"""The child process that runs one `.py` hook: `python -m uplinkd.hooks.child PATH`.

The daemon never runs hook code in its own process: a hook that sleeps, loops or prints without
end would hold up failover. It starts this program instead, with a time limit, and writes one
JSON request on its stdin:

    {"path": "/etc/uplinkd/firewall/10.local.py", "source": "...",
     "snapshot": {"isp": [[name, device, ip, network, gateway], ...],
                  "lan": [[name, device], ...], "up": [name, ...]}}

The hook runs with `B`, a stand-in for hooks.Balancer that answers the queries from the
snapshot and records the calls that describe state (forward, force_route, add_route, nft), each
with the line of the hook that made it. The answer is one JSON object on stdout:

    {"calls": [{"method": "forward", "args": [80, "192.168.10.35"], "kwargs": {}, "line": 3}],
     "error": null}

or, when the hook failed, `"error": {"message": "...", "line": N}` (the calls are then of no use).
The daemon replays the calls into the real Balancer, which checks their arguments, so a bad
argument is still named by the hook's file and line. Whatever the hook prints (and the programs
it starts) goes to stderr, which the daemon logs, cut short.

Only the standard library is imported here: the child starts in a few tens of milliseconds.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Sequence
from typing import Any

# The Balancer methods that describe state: what the child records and the daemon replays.
ACTIONS = ("forward", "force_route", "add_route", "nft")


class RecordingBalancer:
    """The `B` a hook sees in the child: Balancer's queries and actions, with its signatures."""

    def __init__(self, snapshot: dict[str, Any], path: str) -> None:
        self._isp = {row[0]: row[1:] for row in snapshot["isp"]}  # name -> dev, ip, net, gw
        self._lan = dict(snapshot["lan"])  # name -> device
        self._up = list(snapshot["up"])
        self._path = path
        self.calls: list[dict[str, Any]] = []

    def _line(self) -> int:
        frame = sys._getframe(2)  # the caller of the Balancer method
        while frame is not None:
            if frame.f_code.co_filename == self._path:
                return frame.f_lineno
            frame = frame.f_back  # type: ignore[assignment]
        return 0

    def _record(self, method: str, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
        self.calls.append(
            {"method": method, "args": list(args), "kwargs": kwargs, "line": self._line()}
        )

    # --- queries, answered as hooks.Balancer answers them ---
    def services(self) -> list[str]:
        return [*self.isp_services(), *self.lan_services()]

    def isp_services(self) -> list[str]:
        return list(self._isp)

    def lan_services(self) -> list[str]:
        return list(self._lan)

    def up(self) -> list[str]:
        """ISP services currently up."""
        return list(self._up)

    def role(self, service: str) -> str:
        if service in self._isp:
            return "isp"
        if service in self._lan:
            return "lan"
        raise KeyError(f"unknown service {service!r}")

    def dev(self, service: str) -> str:
        if service in self._isp:
            return str(self._isp[service][0])
        if service in self._lan:
            return str(self._lan[service])
        raise KeyError(f"unknown service {service!r}")

    def ip(self, service: str) -> str:
        return str(self._fact(service)[1])

    def net(self, service: str) -> str:
        return str(self._fact(service)[2])

    def gw(self, service: str) -> str:
        return str(self._fact(service)[3])

    def _fact(self, service: str) -> list[Any]:
        if service not in self._isp:
            raise KeyError(f"unknown or absent ISP service {service!r}")
        return list(self._isp[service])

    # --- actions, recorded (the daemon checks their arguments when it replays them) ---
    def forward(self, port: Any, host: Any, *protocols: Any) -> None:
        self._record("forward", [port, host, *protocols], {})

    def force_route(
        self,
        service: Any,
        *,
        src: Any = None,
        dst: Any = None,
        proto: Any = None,
        sport: Any = None,
        dport: Any = None,
        iif: Any = None,
        fallback: Any = False,
    ) -> None:
        kwargs = {"src": src, "dst": dst, "proto": proto, "sport": sport, "dport": dport}
        kwargs |= {"iif": iif, "fallback": fallback}
        self._record("force_route", [service], kwargs)

    def add_route(self, dest: Any, *, via: Any = None, dev: Any = None) -> None:
        self._record("add_route", [dest], {"via": via, "dev": dev})

    def nft(self, command: Any) -> None:
        """Add an nftables command to uplinkd's transaction."""
        self._record("nft", [command], {})


def _error_line(error: BaseException, path: str) -> int:
    frames = traceback.extract_tb(error.__traceback__)
    return next((f.lineno or 0 for f in reversed(frames) if f.filename == path), 0)


def run(path: str, source: str, balancer: RecordingBalancer) -> dict[str, Any]:
    """Run one hook; the answer the daemon reads."""
    try:
        code = compile(source, path, "exec")
    except SyntaxError as error:
        return {
            "calls": [],
            "error": {"message": f"syntax error: {error.msg}", "line": error.lineno or 0},
        }
    try:
        # Root-owned hook files that others cannot write are the admin's own code.
        exec(code, {"B": balancer, "__file__": path, "__name__": "uplinkd_hook"})  # noqa: S102
    except SystemExit as error:
        if error.code not in (None, 0):
            message = f"SystemExit: {error.code}"
            return {"calls": [], "error": {"message": message, "line": _error_line(error, path)}}
    except Exception as error:  # noqa: BLE001 - reported to the daemon with its line
        message = f"{type(error).__name__}: {error}"
        return {"calls": [], "error": {"message": message, "line": _error_line(error, path)}}
    return {"calls": balancer.calls, "error": None}


def main() -> int:
    # stdout carries the answer alone: the hook's prints, and those of the programs it starts,
    # go to stderr (the daemon's log).
    answer = os.fdopen(os.dup(1), "w")  # os.dup: not inherited by the hook's own children
    os.dup2(2, 1)
    request = json.load(sys.stdin)
    path = str(request["path"])
    outcome = run(path, str(request["source"]), RecordingBalancer(request["snapshot"], path))
    sys.stdout.flush()
    # A value JSON cannot hold (an ip_address object, say) is sent as its text, which the
    # Balancer's own parsers then read, as they read the hook's strings.
    json.dump(outcome, answer, default=str)
    answer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
