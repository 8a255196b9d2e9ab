"""NflogListener against real nftables log rules, in a network namespace of its own.

The listener runs in a child process started with `ip netns exec` (Python 3.11 has no
os.setns), printing each packet as a JSON line; the traffic comes from a second child in the
same namespace. The rule logs only the first packet to a destination, as the daemon's rules do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from .conftest import first_line, needs_root

GROUP = 21301
RULES = f"""
table ip nflogtest {{
    set seen {{ type ipv4_addr; flags dynamic,timeout; timeout 10s; }}
    chain out {{
        type filter hook output priority 0;
        ip daddr 10.9.0.2 tcp dport 4242 ip daddr != @seen add @seen {{ ip daddr }} \\
            log prefix "uplinkd-fr x" group {GROUP}
    }}
}}
"""
LISTENER = f"""
import asyncio, json, time
from uplinkd.datapath.nflog import NflogListener

def show(p):
    print(json.dumps(dict(prefix=p.prefix, protocol=p.protocol, src=str(p.src), dst=str(p.dst),
                          dport=p.dport, mark=p.mark, at=time.monotonic())), flush=True)

listener = NflogListener({GROUP}, show)
listener.open()
print("ready", flush=True)
asyncio.run(listener.run())
"""
# Non-blocking connects: each sends one SYN (nobody answers on this lo-only network).
TRAFFIC = """
import socket, time
print(time.monotonic(), flush=True)
for port in (4242, 4242, 4243):
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(("10.9.0.2", port))
    except BlockingIOError:
        pass
    s.close()
"""
BIND_ONLY = f"""
from uplinkd.datapath.nflog import NflogError, NflogListener
try:
    NflogListener({GROUP}, print).open()
except NflogError as exc:
    print(exc)
else:
    print("bound")
"""


def in_ns(ns: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def python(ns: str, code: str) -> str:
    argv = in_ns(ns, sys.executable, "-c", code)
    return subprocess.run(argv, capture_output=True, text=True, check=True, timeout=20).stdout


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"upl-nflog-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "-n", name, "addr", "add", "10.9.0.1/24", "dev", "lo"], check=True)
        subprocess.run(in_ns(name, "nft", "-f", "-"), input=RULES, text=True, check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@pytest.fixture
def listener(ns: str) -> Iterator[subprocess.Popen[str]]:
    argv = in_ns(ns, sys.executable, "-c", LISTENER)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        if first_line(proc, 20) != "ready\n":
            proc.kill()
            pytest.fail(f"the listener did not start: {proc.communicate(timeout=10)[1]}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def stop(proc: subprocess.Popen[str]) -> list[dict[str, object]]:
    """The packets a listener printed before being stopped."""
    proc.terminate()
    out, _ = proc.communicate(timeout=10)
    return [json.loads(line) for line in out.splitlines()]


@needs_root
def test_first_packet_to_a_new_destination_is_logged_once(
    ns: str, listener: subprocess.Popen[str]
) -> None:
    sent_at = float(python(ns, TRAFFIC))
    with pytest.raises(subprocess.TimeoutExpired):
        listener.wait(timeout=1.0)  # time for a late (batched) delivery to show up
    packets = stop(listener)

    assert len(packets) == 1, packets
    packet = packets[0]
    at = packet.pop("at")
    assert packet == {
        "prefix": "uplinkd-fr x",
        "protocol": 6,
        "src": "10.9.0.1",
        "dst": "10.9.0.2",
        "dport": 4242,
        "mark": 0,
    }
    # Queue threshold 1: delivered at once, not after the kernel's default 1 s batching timeout.
    assert isinstance(at, float) and at - sent_at < 0.5


@needs_root
def test_a_bound_group_cannot_be_bound_again(ns: str, listener: subprocess.Popen[str]) -> None:
    assert python(ns, BIND_ONLY) == (
        f"cannot bind NFLOG group {GROUP}: Operation not permitted; "
        "another program (ulogd, a second uplinkd?) holds it\n"
    )
    stop(listener)
    assert python(ns, BIND_ONLY) == "bound\n"  # the kernel frees the group with the socket
