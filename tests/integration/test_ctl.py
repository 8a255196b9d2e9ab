"""The real `uplinkctl` against BusService (with a fake controller) on a private system-like bus.

The bus runs with the system bus's default-deny policy plus the project's own policy file, so what
uplinkctl may do here is what it may do on a real host.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import pytest
from uplinkd.errors import UplinkdError
from uplinkd.monitor.link import LinkState, Transition
from uplinkd.publish.bus import BusService
from uplinkd.publish.status import LinkStatus

from tests.fakes.controller import FakeController, link_status

from .conftest import first_line
from .privatebus import REPO, private_bus

pytestmark = [
    pytest.mark.skipif(
        os.geteuid() != 0 or not shutil.which("dbus-daemon"),
        reason="uplinkctl integration tests need root and dbus-daemon (a private system bus)",
    ),
    pytest.mark.timeout(60),
]

NOT_RUNNING = (
    "uplinkctl: uplinkd is not running (no owner of org.uplinkd.Uplinkd1 on the system bus)\n"
)


@pytest.fixture
def bus_address() -> Iterator[str]:
    with private_bus() as bus:
        yield bus.address


# Ages whose display cannot change while a test runs (the shown unit is minutes or hours).
AGE_ISP1_S = 2 * 3600 + 5 * 60 + 10  # 2h05m
AGE_ISP2_S = 3 * 86400 + 4 * 3600 + 20 * 60  # 3d4h


def link(name: str, device: str, state: str, age: float, **values: Any) -> LinkStatus:
    figures: dict[str, Any] = {
        "usable": state == "up",
        "weight": 1,
        "rx_bps": 12_300_000,
        "tx_bps": 1_200_000,
        "new_connection_share": 0.75,
    }
    since = time.time() - age
    return link_status(name, device, state=state, since=since, **(figures | values))


def degraded_controller() -> FakeController:
    """One link up, one down: a degraded uplinkd, as the status table shows it."""
    down = {"latency_ms": -1.0, "loss_percent": 100.0, "rx_bps": 0, "tx_bps": 850}
    links = [
        link("ISP1", "wan1", "up", AGE_ISP1_S, weight=3),
        link("ISP2", "wan2", "down", AGE_ISP2_S, new_connection_share=0.0, **down),
    ]
    return FakeController(version="0.1.0", generation=7, links=links)


T = TypeVar("T")


class Service:
    """BusService on its own event loop in a thread, while the test runs uplinkctl processes."""

    def __init__(self, address: str, controller: FakeController) -> None:
        self.controller = controller
        self.service = BusService(controller)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.service.start(address))

    def run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=10)

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` on the service's loop, as the daemon's coordinator would."""

        async def wrapper() -> None:
            fn()

        self.run(wrapper())

    def stop(self) -> None:
        self.run(self.service.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


@pytest.fixture
def service(bus_address: str) -> Iterator[Service]:
    running = Service(bus_address, degraded_controller())
    try:
        yield running
    finally:
        running.stop()


def env_for(address: str) -> dict[str, str]:
    return {**os.environ, "DBUS_SYSTEM_BUS_ADDRESS": address, "TZ": "UTC"}


def uplinkctl(address: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uplinkd.ctl", *argv],
        env=env_for(address),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_status_table(bus_address: str, service: Service) -> None:
    done = uplinkctl(bus_address, "status")
    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    assert lines[0] == "uplinkd 0.1.0: degraded, generation 7, mode weighted"
    assert [" ".join(line.split()) for line in lines[1:]] == [
        "LINK DEVICE STATE FOR LATENCY LOSS SHARE RX TX",
        "ISP1 wan1 up 2h05m 12.5 ms 0% 75% 12.3 Mbit/s 1.2 Mbit/s",
        "ISP2 wan2 down 3d4h - 100% 0% 0 bit/s 850 bit/s",
    ]


def test_status_names_the_hook_problems(bus_address: str, service: Service) -> None:
    problem = "/etc/uplinkd/pre-run/01.modules:3: exit 1: modprobe nosuch"
    service.controller.hook_problems = (problem,)
    done = uplinkctl(bus_address, "status")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines()[4:] == [f"hook problem: {problem}"]
    data = json.loads(uplinkctl(bus_address, "status", "--json").stdout)
    assert data["manager"]["HookProblems"] == [problem]


def test_status_json(bus_address: str, service: Service) -> None:
    done = uplinkctl(bus_address, "status", "--json")
    assert (done.returncode, done.stderr) == (0, "")
    data = json.loads(done.stdout)
    assert data["manager"] == {
        "Version": "0.1.0",
        "Mode": "weighted",
        "Generation": 7,
        "OverallState": "degraded",
        "HookProblems": [],
    }
    assert [entry["Name"] for entry in data["links"]] == ["ISP1", "ISP2"]
    first = data["links"][0]
    assert " ".join(first) == (  # every key of the contract, sorted
        "Address Device Gateway HopLatencyMs LatencyMs LossPercent Name NewConnectionShare "
        "Priority RxBps "
        "Since State TxBps Weight"
    )
    assert (first["Weight"], first["Gateway"], first["Address"]) == (
        3,
        "192.0.2.1",
        "192.0.2.10/24",
    )
    assert (first["RxBps"], first["NewConnectionShare"]) == (12_300_000, 0.75)
    # Not measured: null, not the contract's -1 (D-Bus has no null); measured zeros stay zeros.
    assert (first["LatencyMs"], first["HopLatencyMs"]) == (12.5, None)
    second = data["links"][1]
    assert (second["LatencyMs"], second["HopLatencyMs"], second["RxBps"]) == (None, None, 0)


def test_up_and_down_reach_the_controller(bus_address: str, service: Service) -> None:
    runs = [
        (bus_address, "down", "ISP2"),
        (bus_address, "up", "ISP2"),
        # --bus-address wins over the environment's address
        ("unix:path=/nonexistent", "--bus-address", bus_address, "down", "ISP1"),
    ]
    said = [
        "ISP2: disabled (state disabled; out of service until 'uplinkctl up ISP2')\n",
        "ISP2: enabled (state init, probing decides)\n",
        "ISP1: disabled (state disabled; out of service until 'uplinkctl up ISP1')\n",
    ]
    for (address, *argv), line in zip(runs, said, strict=True):
        done = uplinkctl(address, *argv)
        assert (done.returncode, done.stdout, done.stderr) == (0, line, "")
    assert service.controller.calls == [
        ("set_enabled", "ISP2", False),
        ("set_enabled", "ISP2", True),
        ("set_enabled", "ISP1", False),
    ]
    assert "ISP1  wan1    disabled" in uplinkctl(bus_address, "status").stdout


def test_unknown_link(bus_address: str, service: Service) -> None:
    done = uplinkctl(bus_address, "up", "NOPE")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == "uplinkctl: unknown link 'NOPE'; links: ISP1, ISP2\n"
    assert service.controller.calls == []


def test_reload(bus_address: str, service: Service) -> None:
    done = uplinkctl(bus_address, "reload")
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        "reloaded: generation 7 (plan unchanged)\n",
        "",
    )
    service.controller.refuse = UplinkdError(
        "/etc/uplinkd/uplinkd.toml:3: link.weight: must be >= 1"
    )
    done = uplinkctl(bus_address, "reload")
    assert done.returncode == 1
    assert done.stderr == "uplinkctl: /etc/uplinkd/uplinkd.toml:3: link.weight: must be >= 1\n"
    assert service.controller.calls == [("reload",), ("reload",)]


class RebuildingController(FakeController):
    """A daemon whose reload applies a new plan."""

    async def reload(self) -> None:
        await super().reload()
        self.generation += 1


def test_reload_names_the_new_generation(bus_address: str) -> None:
    controller = RebuildingController(**vars(degraded_controller()))
    running = Service(bus_address, controller)
    try:
        done = uplinkctl(bus_address, "reload")
    finally:
        running.stop()
    assert (done.returncode, done.stdout, done.stderr) == (0, "reloaded: generation 8\n", "")


def test_dry_run(bus_address: str, service: Service) -> None:
    done = uplinkctl(bus_address, "dry-run")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == service.controller.dry_run()


def test_learned(bus_address: str, service: Service) -> None:
    done = uplinkctl(bus_address, "learned")
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout == (
        "RULE  DESTINATION   LINK  FORGOTTEN IN\n"
        "web   203.0.113.20  ISP1         9m58s\n"
        "web   203.0.113.30  ISP2         1h06m\n"
    )
    done = uplinkctl(bus_address, "learned", "--json")
    assert json.loads(done.stdout)[0] == {
        "rule": "web",
        "address": "203.0.113.20",
        "link": "ISP1",
        "seconds_left": 598,
    }


def start_monitor(address: str, *argv: str) -> subprocess.Popen[str]:
    """`uplinkctl monitor`, returned once it has subscribed (its first line, the snapshot)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "uplinkd.ctl", "monitor", *argv],
        env=env_for(address),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    first = first_line(proc, timeout=20)
    assert first.endswith("  uplinkd 0.1.0: degraded, generation 7, mode weighted\n"), first
    return proc


def test_monitor_prints_a_transition_and_stops_at_count(bus_address: str, service: Service) -> None:
    proc = start_monitor(bus_address, "--count", "1")
    controller = service.controller
    controller.links[1] = replace(controller.links[1], state="up", since=time.time())
    controller.generation = 8
    service.call(lambda: service.service.on_plan_applied(8))
    down_up = Transition("ISP2", LinkState.DOWN, LinkState.UP, "5 good rounds in a row", 0.0)
    service.call(lambda: service.service.on_transition(down_up))
    out, err = proc.communicate(timeout=20)
    assert (proc.returncode, err) == (0, "")
    lines = out.splitlines()
    assert [line.split("  ", 1)[1] for line in lines] == [
        "plan applied, generation 8",
        "ISP2: down -> up (5 good rounds in a row)",
    ]
    assert all(line[:4].isdigit() and line[10] == " " for line in lines)  # a date first


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_monitor_exits_0_on_signals(bus_address: str, service: Service, number: int) -> None:
    proc = start_monitor(bus_address)
    proc.send_signal(number)
    out, err = proc.communicate(timeout=20)
    assert (proc.returncode, out, err) == (0, "", "")


def test_monitor_says_when_uplinkd_leaves(bus_address: str, service: Service) -> None:
    proc = start_monitor(bus_address)
    service.run(service.service.stop())
    assert proc.stdout is not None
    assert proc.stdout.readline().endswith("  uplinkd left the system bus\n")
    proc.terminate()
    assert proc.wait(timeout=20) == 0


NOT_RUNNING_ARGV = ["status", "status --json", "up ISP1", "reload", "dry-run", "monitor"]


@pytest.mark.parametrize("argv", [argv.split() for argv in NOT_RUNNING_ARGV])
def test_daemon_not_running(bus_address: str, argv: list[str]) -> None:
    done = uplinkctl(bus_address, *argv)
    assert (done.returncode, done.stdout, done.stderr) == (3, "", NOT_RUNNING)


def as_nobody(address: str, *argv: str) -> subprocess.CompletedProcess[str]:
    setpriv = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    return subprocess.run(
        [*setpriv, sys.executable, "-m", "uplinkd.ctl", *argv],
        env={**env_for(address), "PYTHONPATH": str(REPO / "daemon")},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",
    )


def test_access_denied_for_an_unprivileged_user(bus_address: str, service: Service) -> None:
    if not shutil.which("setpriv"):
        pytest.skip("setpriv (util-linux) is needed to run uplinkctl as nobody")
    probe = as_nobody(bus_address, "--help")
    if probe.returncode != 0:
        pytest.skip(f"nobody cannot run this checkout's python: {probe.stderr.strip()}")
    status = as_nobody(bus_address, "status")
    assert (status.returncode, status.stderr) == (0, "")  # reading is open to everyone
    for argv, command in ((("down", "ISP1"), "down ISP1"), (("reload",), "reload")):
        done = as_nobody(bus_address, *argv)
        assert (done.returncode, done.stdout) == (4, "")
        assert done.stderr == (
            f"uplinkctl: access denied: 'uplinkctl {command}' needs root or membership in the "
            "admin group\n"
        )
    assert service.controller.calls == []
