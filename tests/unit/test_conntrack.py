"""Forgetting links' tracked connections: one helper, one error policy, for the daemon and
`--once` alike (the lab tests run the real conntrack; here it is missing from PATH)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from uplinkd.datapath import conntrack


def test_each_link_is_tried_and_each_failure_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no conntrack command
    with caplog.at_level(logging.INFO, logger="uplinkd"):
        failed = asyncio.run(conntrack.forget_links({"LTE": 0x200, "DSL": 0x100}, 0xFF00))
    assert list(failed) == ["DSL", "LTE"]  # both tried, in name order
    assert all("install the conntrack package" in why for why in failed.values())
    assert "forgot" not in caplog.text


def test_nothing_to_forget_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert asyncio.run(conntrack.forget_links({}, 0xFF00)) == {}
