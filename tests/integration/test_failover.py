"""The daemon in the lab: link monitoring, failover, recovery, and what must survive them (root).

Time bounds here are generous limits for correctness; failover times are measured by the
benchmarks in tests/bench/.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from uplinkd_lab.lab import INET_HOST, Lab

from .conftest import Daemon, Uplinkd, in_router, mail_to_admin, needs_root, wait_until

pytestmark = [needs_root, pytest.mark.lab]

# Both links probe the Internet host through themselves: a silent upstream failure (the ISP
# keeps carrier and answers ARP but forwards nothing) is visible only beyond the gateway.
MONITORED = """
[monitor]
interval_ms = 200
timeout_ms = 300

[[link]]
name = "ISP1"
device = "wan1"
targets = ["203.0.113.10"{extra_target}]
reliability = 1

[[link]]
name = "ISP2"
device = "wan2"
targets = ["203.0.113.10"]

[[lan]]
name = "LAN"
device = "lan0"
"""


@pytest.fixture
def monitored(lab2: Lab, uplinkd: Uplinkd) -> Iterator[tuple[Lab, Uplinkd, Path]]:
    config = uplinkd.write_config(MONITORED.format(extra_target=""))
    try:
        yield lab2, uplinkd, config
    finally:
        for i in (1, 2):
            lab2.set_link(i, up=True)
            lab2.set_upstream(i, up=True)


def isp_counts(lab: Lab, count: int = 40, port: int = 80) -> dict[str, int]:
    return lab.connect_many(lab.ns_lan, INET_HOST, port, count, timeout=1.0).counts_by_isp()


def only_via(lab: Lab, isp: str) -> bool:
    counts = isp_counts(lab)
    return counts[isp] == sum(counts.values()) == 40


def both_used(lab: Lab) -> bool:
    counts = isp_counts(lab)
    return sum(counts.values()) == 40 and min(counts.values()) > 0


def start(uplinkd: Uplinkd, config: Path, *argv: str) -> Daemon:
    daemon = uplinkd.start(config, *argv)
    # Both links are presumed up at start; wait for the probes' verdict before testing.
    assert daemon.log.wait_for("link ISP2: init -> up"), daemon.log.text
    return daemon


def test_carrier_loss_fails_over_and_recovery_returns(
    monitored: tuple[Lab, Uplinkd, Path],
) -> None:
    lab, uplinkd, config = monitored
    daemon = start(uplinkd, config)
    assert wait_until(lambda: both_used(lab), 10)
    lab.set_link(1, up=False)
    assert daemon.log.wait_for("link ISP1: up -> down: carrier lost", 5), daemon.log.text
    assert wait_until(lambda: only_via(lab, "ISP2"), 5)
    result = lab.connect_many(lab.ns_lan, INET_HOST, 80, 200)
    assert result.counts_by_isp() == {"ISP1": 0, "ISP2": 200}

    lab.set_link(1, up=True)
    assert daemon.log.wait_for("link ISP1: down -> up", 15), daemon.log.text
    assert wait_until(lambda: both_used(lab), 5)


def test_silent_upstream_failure_is_detected(monitored: tuple[Lab, Uplinkd, Path]) -> None:
    lab, uplinkd, config = monitored
    daemon = start(uplinkd, config)
    lab.set_upstream(1, up=False)  # carrier stays, nothing gets past ISP1
    assert daemon.log.wait_for("link ISP1: up -> down", 5), daemon.log.text
    assert "probes lost in a row" in daemon.log.text
    assert wait_until(lambda: only_via(lab, "ISP2"), 5)
    lab.set_upstream(1, up=True)
    assert daemon.log.wait_for("link ISP1: down -> up", 15), daemon.log.text
    assert wait_until(lambda: both_used(lab), 5)


def test_one_dead_target_of_two_keeps_the_link_up(lab2: Lab, uplinkd: Uplinkd) -> None:
    # 203.0.113.99 is nobody's: every probe to it is lost.
    config = uplinkd.write_config(MONITORED.format(extra_target=', "203.0.113.99"'))
    daemon = uplinkd.start(config)
    assert daemon.log.wait_for("link ISP1: init -> up", 10), daemon.log.text
    time.sleep(3)  # fifteen probe rounds with the dead target
    assert "link ISP1: up -> down" not in daemon.log.text
    assert wait_until(lambda: both_used(lab2), 5)


def test_flapping_link_causes_a_bounded_number_of_applies(
    monitored: tuple[Lab, Uplinkd, Path],
) -> None:
    lab, uplinkd, config = monitored
    daemon = start(uplinkd, config)
    applies_before = daemon.log.text.count("applied generation")
    flips = flap(lab, down_s=0.3, up_s=0.3, seconds=10)
    time.sleep(1)
    applies = daemon.log.text.count("applied generation") - applies_before
    assert flips >= 30
    # Carrier loss takes the link down at once; probes need 5 clean rounds (1 s) to bring it
    # back, which a 300 ms flap never gives: one failover, then calm.
    assert applies <= 4, daemon.log.text


def test_flap_damping_holds_a_slowly_flapping_link_down(
    monitored: tuple[Lab, Uplinkd, Path],
) -> None:
    lab, uplinkd, _ = monitored
    # Quick to recover (the losses of a blip leave a 20-round window of 100 ms rounds in 2 s),
    # so that every up period below is long enough to bring the link back.
    quick = MONITORED.format(extra_target="").replace(
        "interval_ms = 200\ntimeout_ms = 300",
        "interval_ms = 100\ntimeout_ms = 150\nmin_packet_loss = 30\nmax_packet_loss = 50",
    )
    daemon = start(uplinkd, uplinkd.write_config(quick))
    applies_before = daemon.log.text.count("applied generation")
    # Up long enough to recover each time (2 s), down briefly: a flapping cable.
    flips = flap(lab, down_s=0.3, up_s=2.0, seconds=16)
    applies = daemon.log.text.count("applied generation") - applies_before
    assert flips >= 14
    # From the third flap on the link is held down, each time twice as long.
    for hold in ("held down for 2 s", "held down for 4 s", "held down for 8 s"):
        assert hold in daemon.log.text, daemon.log.text
    # Without damping each of the 7 cycles would cost two applies.
    assert applies <= 10, daemon.log.text


def flap(lab: Lab, *, down_s: float, up_s: float, seconds: float) -> int:
    """Take ISP1's carrier down and up in a bounded loop; returns the number of changes."""
    deadline = time.monotonic() + seconds
    flips = 0
    try:
        while time.monotonic() < deadline:
            lab.set_link(1, up=False)
            time.sleep(down_s)
            lab.set_link(1, up=True)
            time.sleep(up_s)
            flips += 2
    finally:
        lab.set_link(1, up=True)
    return flips


def test_command_line_names_the_links_in_service(lab2: Lab, uplinkd: Uplinkd) -> None:
    config = uplinkd.write_config(MONITORED.format(extra_target=""))
    daemon = uplinkd.start(config, "ISP2")  # like `load_balance.pl DSL`
    assert "link ISP1: init -> disabled" in daemon.log.text
    assert wait_until(lambda: only_via(lab2, "ISP2"), 5), daemon.log.text


STREAM_SERVER = """
import hashlib, socket, sys
server = socket.create_server(("203.0.113.10", 9000))
print("listening", flush=True)
conn, peer = server.accept()
digest, total = hashlib.sha256(), 0
while chunk := conn.recv(65536):
    digest.update(chunk)
    total += len(chunk)
conn.sendall(f"{peer[0]} {total} {digest.hexdigest()}".encode())
conn.close()
"""

STREAM_CLIENT = """
import hashlib, os, socket, sys, time
seconds, chunk = float(sys.argv[1]), os.urandom(16384)
digest, total = hashlib.sha256(), 0
conn = socket.create_connection(("203.0.113.10", 9000), timeout=30)
deadline = time.monotonic() + seconds
while time.monotonic() < deadline:
    conn.sendall(chunk)
    digest.update(chunk)
    total += len(chunk)
    time.sleep(0.01)
conn.shutdown(socket.SHUT_WR)
reply = conn.recv(4096).decode().split()
print(reply[0], reply[1] == str(total), reply[2] == digest.hexdigest())
"""

PINNED_STREAM = (
    MONITORED.format(extra_target="")
    + """
[[rule]]
name = "stream"
match = { proto = "tcp", dport = [9000] }
method = "priority"
links = ["ISP2", "ISP1"]
"""
)


def _stream(lab: Lab, seconds: float) -> tuple[subprocess.Popen[str], subprocess.Popen[str]]:
    server = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns_inet, sys.executable, "-c", STREAM_SERVER],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    assert server.stdout.readline().strip() == "listening"
    client = subprocess.Popen(
        ["ip", "netns", "exec", lab.ns_lan, sys.executable, "-c", STREAM_CLIENT, str(seconds)],
        stdout=subprocess.PIPE,
        text=True,
    )
    return server, client


def test_stream_via_isp2_survives_isp1_failing_and_recovering(
    monitored: tuple[Lab, Uplinkd, Path],
) -> None:
    lab, uplinkd, _ = monitored
    daemon = start(uplinkd, uplinkd.write_config(PINNED_STREAM))
    server, client = _stream(lab, seconds=8)
    try:
        time.sleep(1)
        lab.set_link(1, up=False)
        assert daemon.log.wait_for("link ISP1: up -> down", 5)
        assert daemon.log.wait_for("forgot", 5)
        time.sleep(1)
        lab.set_link(1, up=True)
        assert daemon.log.wait_for("link ISP1: down -> up", 15), daemon.log.text
        out, _ = client.communicate(timeout=30)
    finally:
        client.kill()
        server.kill()
        server.wait()
    assert out.split() == ["100.64.2.2", "True", "True"]  # via ISP2, every byte, in order


def test_restart_after_kill_adopts_the_datapath_without_breaking_flows(
    monitored: tuple[Lab, Uplinkd, Path],
) -> None:
    lab, uplinkd, _ = monitored
    config = uplinkd.write_config(PINNED_STREAM)
    first = start(uplinkd, config)
    state = uplinkd.kernel_state()
    server, client = _stream(lab, seconds=4)
    try:
        time.sleep(0.5)
        first.stop(signal.SIGKILL)
        assert uplinkd.kernel_state() == state  # the kernel keeps forwarding without the daemon
        second = uplinkd.start(config)
        assert "adopting the datapath in place; links up in it: ISP1, ISP2" in second.log.text
        assert "netfilter: none; routes +0/-0; rules +0/-0" in second.log.text
        assert "applied generation 1, links in use: ISP1, ISP2" in second.log.text  # not 0
        out, _ = client.communicate(timeout=30)
    finally:
        client.kill()
        server.kill()
        server.wait()
    assert out.split() == ["100.64.2.2", "True", "True"]
    assert wait_until(lambda: both_used(lab), 5)


def test_sigterm_keeps_the_datapath_by_default(monitored: tuple[Lab, Uplinkd, Path]) -> None:
    lab, uplinkd, config = monitored
    daemon = start(uplinkd, config)
    daemon.stop()
    assert daemon.log.wait_for("datapath left in place")
    assert both_used(lab)
    config.write_text(config.read_text() + "\n[daemon]\nstop_removes_datapath = true\n")
    daemon = start(uplinkd, config)
    daemon.stop()
    assert daemon.log.wait_for("datapath removed")
    assert "uplinkd" not in uplinkd.kernel_state()


SMTP_SERVER = """
import asyncio, email, json, sys
from aiosmtpd.controller import Controller

class Keep:
    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content)
        record = {"to": envelope.rcpt_tos, "subject": message["Subject"],
                  "body": message.get_payload(decode=True).decode()}
        print(json.dumps(record), flush=True)
        return "250 OK"

controller = Controller(Keep(), hostname="127.0.0.1", port=int(sys.argv[1]))
controller.start()
print("ready", flush=True)
sys.stdin.read()
controller.stop()
"""

HOOK = """#!/bin/sh
echo "$@" >> {out}
echo "UPLINKD_REASON=$UPLINKD_REASON" >> {out}
"""


def test_state_change_runs_event_hooks_and_mails_the_admin(
    monitored: tuple[Lab, Uplinkd, Path],
) -> None:
    lab, uplinkd, _ = monitored
    config = uplinkd.write_config(mail_to_admin(MONITORED.format(extra_target=""), 8025))
    out = uplinkd.workdir / "hook.out"
    for state in ("down.d", "up.d"):
        hook = uplinkd.workdir / state / "10-record"
        hook.parent.mkdir()
        hook.write_text(HOOK.format(out=out))
        hook.chmod(0o755)
    with in_router(lab, SMTP_SERVER, "8025") as smtp:
        assert smtp.stdout is not None
        try:
            daemon = start(uplinkd, config)
            lab.set_link(1, up=False)
            assert daemon.log.wait_for("link ISP1: up -> down: carrier lost", 5)
            mail = json.loads(smtp.stdout.readline())  # bounded by the daemon's SMTP timeout
            assert wait_until(lambda: out.exists() and "down ISP1" in out.read_text(), 10)
        finally:
            lab.set_link(1, up=True)
    assert mail["to"] == ["noc@example.net"]
    assert mail["subject"] == "uplinkd: link ISP1 is down"
    assert "carrier lost" in mail["body"]
    assert "up" in mail["body"] and "loss" in mail["body"].lower()
    lines = out.read_text().splitlines()
    # up.d ran when the probes first found ISP1 up, before down.d (ISP2's hooks run beside
    # ISP1's, so their lines may come first)
    isp1 = [line for line in lines if line.split()[1:2] == ["ISP1"]]
    assert isp1[0].startswith("up ISP1 "), lines
    args = next(line for line in lines if line.startswith("down ")).split()
    # foolsm's order: state name checkip device warn_email ... srcip prevstate timestamp
    assert args[:5] == ["down", "ISP1", "203.0.113.10", "wan1", "noc@example.net"]
    assert args[-3:-1] == ["10.0.1.2", "up"]
    assert "UPLINKD_REASON=carrier lost" in out.read_text()


def test_address_and_gateway_changes_are_applied(monitored: tuple[Lab, Uplinkd, Path]) -> None:
    lab, uplinkd, config = monitored
    router, isp1 = lab.ns_router, lab.ns_isp(1)
    daemon = start(uplinkd, config)

    def rules() -> str:
        return lab.run(router, "ip", "rule", "show").stdout

    def table_201() -> str:
        return lab.run(router, "ip", "route", "show", "table", "201").stdout

    assert "from 10.0.1.2 lookup 201" in rules()
    try:
        # A DHCP renew hands out another address (the client drops the old one first: deleting
        # a primary address also deletes the secondaries on the device)...
        lab.run(router, "ip", "addr", "del", "10.0.1.2/24", "dev", "wan1")
        lab.run(router, "ip", "addr", "add", "10.0.1.3/24", "dev", "wan1")
        assert wait_until(lambda: "from 10.0.1.3 lookup 201" in rules(), 5), daemon.log.text
        assert "from 10.0.1.2 " not in rules()
        # ...and another gateway, put in the main table by the DHCP client.
        lab.run(isp1, "ip", "addr", "add", "10.0.1.254/24", "dev", "down")
        lab.run(router, "ip", "route", "add", "default", "via", "10.0.1.254", "dev", "wan1")
        assert wait_until(lambda: "default via 10.0.1.254 dev wan1" in table_201(), 5)
        assert wait_until(lambda: both_used(lab), 15), daemon.log.text
    finally:
        lab.run(router, "ip", "route", "del", "default", "via", "10.0.1.254", check=False)
        lab.run(isp1, "ip", "addr", "del", "10.0.1.254/24", "dev", "down", check=False)
        lab.run(router, "ip", "addr", "add", "10.0.1.2/24", "dev", "wan1", check=False)
        lab.run(router, "ip", "addr", "del", "10.0.1.3/24", "dev", "wan1", check=False)
