"""NetworkManager facts: nmcli's terse output parsed, the gateway choice, and nmcli's absence.

The outputs are what nmcli 1.42 printed for the lab's devices (tests/integration/
test_networkmanager.py runs the real thing). device_facts() runs against small fake nmcli
scripts put first on PATH.
"""

from __future__ import annotations

import asyncio
import logging
import os
from ipaddress import IPv4Address, IPv4Interface
from pathlib import Path

import pytest
from uplinkd.facts import nm
from uplinkd.facts.nm import NmDevice, parse_device, parse_terse, prefer_gateway, unescape
from uplinkd.planning.plan import LinkFacts

CONNECTED = """GENERAL.DEVICE:wan1
GENERAL.STATE:100 (connected)
GENERAL.CONNECTION:ISP1
IP4.ADDRESS[1]:10.0.1.2/24
IP4.GATEWAY:10.0.1.1
"""
UNMANAGED = """GENERAL.DEVICE:wan2
GENERAL.STATE:10 (unmanaged)
GENERAL.CONNECTION:
IP4.ADDRESS[1]:10.0.2.2/24
IP4.GATEWAY:
"""
DISCONNECTED = """GENERAL.DEVICE:wan1
GENERAL.STATE:30 (disconnected)
GENERAL.CONNECTION:
IP4.GATEWAY:
"""
FACT = LinkFacts("ISP1", "wan1", IPv4Interface("10.0.1.2/24"), IPv4Address("10.0.1.1"))


def test_connected_device() -> None:
    assert parse_device(CONNECTED) == NmDevice(
        device="wan1",
        state=100,
        connection="ISP1",
        addresses=(IPv4Interface("10.0.1.2/24"),),
        gateway=IPv4Address("10.0.1.1"),
    )


def test_unmanaged_and_disconnected_devices_are_not_connected() -> None:
    unmanaged, disconnected = parse_device(UNMANAGED), parse_device(DISCONNECTED)
    assert unmanaged is not None and not unmanaged.connected
    assert unmanaged.gateway is None and unmanaged.connection == ""
    assert disconnected is not None and not disconnected.connected
    assert disconnected.addresses == ()


def test_escapes_in_values_are_undone() -> None:
    assert unescape(r"Wired\: home \\ office") == "Wired: home \\ office"
    text = "GENERAL.DEVICE:wan1\nGENERAL.STATE:100 (connected)\nGENERAL.CONNECTION:a\\:b\\\\c\n"
    device = parse_device(text)
    assert device is not None and device.connection == "a:b\\c"


def test_numbered_fields_are_gathered_in_order() -> None:
    text = "IP4.ADDRESS[1]:10.0.1.2/24\nIP4.ADDRESS[2]:10.0.1.3/24\nIP4.DNS[1]:10.0.1.1\n"
    assert parse_terse(text) == {
        "IP4.ADDRESS": ["10.0.1.2/24", "10.0.1.3/24"],
        "IP4.DNS": ["10.0.1.1"],
    }


def test_externally_connected_state_and_junk() -> None:
    external = parse_device(CONNECTED.replace("(connected)", "(connected (externally))"))
    assert external is not None and external.connected
    assert parse_device("") is None
    assert parse_device("Error: something\n") is None
    assert parse_device("GENERAL.DEVICE:wan1\nGENERAL.STATE:activated\n") is None
    bad = parse_device(CONNECTED.replace("10.0.1.1", "fe80::1").replace("/24", "/99"))
    assert bad is not None and bad.gateway is None and bad.addresses == ()


def test_nm_gateway_preferred_when_connected() -> None:
    device = parse_device(CONNECTED.replace("10.0.1.1", "10.0.1.254"))
    fact, source = prefer_gateway(FACT, device)
    assert fact.gateway == IPv4Address("10.0.1.254")
    assert fact.address == FACT.address
    assert source == "NetworkManager (connection ISP1)"


def test_netlink_gateway_kept_otherwise() -> None:
    no_gateway = parse_device(CONNECTED.replace("IP4.GATEWAY:10.0.1.1", "IP4.GATEWAY:"))
    for device in (None, parse_device(DISCONNECTED), no_gateway):
        assert prefer_gateway(FACT, device) == (FACT, "netlink")


def fake_nmcli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> None:
    script = tmp_path / "nmcli"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(nm, "_quiet", nm._Quiet())


@pytest.mark.timeout(10)
def test_device_facts_keeps_connected_devices_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "wan1").write_text(CONNECTED)
    (tmp_path / "wan2").write_text(UNMANAGED)
    # The device is the last argument; wan3 is one NetworkManager does not know (exit 10).
    body = f'for dev; do :; done; cat "{tmp_path}/$dev" 2>/dev/null || exit 10'
    fake_nmcli(tmp_path, monkeypatch, body)
    facts = asyncio.run(nm.device_facts(["wan1", "wan2", "wan3"]))
    assert list(facts) == ["wan1"]
    assert facts["wan1"].gateway == IPv4Address("10.0.1.1")


@pytest.mark.timeout(10)
def test_no_networkmanager_is_empty_and_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    body = 'echo "Error: NetworkManager is not running." >&2; exit 8'
    fake_nmcli(tmp_path, monkeypatch, body)
    with caplog.at_level(logging.DEBUG, logger="uplinkd"):
        assert asyncio.run(nm.device_facts(["wan1", "wan2"])) == {}
        assert asyncio.run(nm.device_facts(["wan1"])) == {}
    assert len(caplog.records) == 1
    assert "(Error: NetworkManager is not running.)" in caplog.records[0].getMessage()


@pytest.mark.timeout(10)
def test_missing_nmcli_is_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(nm, "_quiet", nm._Quiet())
    with caplog.at_level(logging.DEBUG, logger="uplinkd"):
        assert asyncio.run(nm.device_facts(["wan1"])) == {}
        assert asyncio.run(nm.device_facts(["wan1"])) == {}
    assert len(caplog.records) == 1
    assert "nmcli is not installed" in caplog.records[0].getMessage()


@pytest.mark.timeout(10)
def test_hung_nmcli_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_nmcli(tmp_path, monkeypatch, "exec sleep 30")
    monkeypatch.setattr(nm, "NMCLI_TIMEOUT_S", 0.2)
    assert asyncio.run(nm.device_facts(["wan1"])) == {}
