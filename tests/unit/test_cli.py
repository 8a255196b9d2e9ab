"""The uplinkd command line without a kernel: option combinations it refuses."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from uplinkd import cli
from uplinkd.runtime import instance


@pytest.mark.parametrize("part", ["nft", "ip", "all"])
# Not --stop: were the check gone, it would remove a datapath from this host (the lab test
# tests/integration/test_instance.py covers it inside a namespace).
@pytest.mark.parametrize("mode", [[], ["--once"]])
def test_part_without_dry_run_is_a_usage_error(
    part: str, mode: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "uplinkd.toml"  # absent: a usage error must come first
    with pytest.raises(SystemExit) as exited:
        cli.main(["--config", str(config), "--no-dbus", *mode, "--part", part])
    assert exited.value.code == cli.EXIT_BAD_INPUT == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: uplinkd")
    assert err.endswith("uplinkd: error: --part is an option of -d (dry run)\n")


def test_part_with_dry_run_is_accepted() -> None:
    assert cli.parser().parse_args(["-d", "--part", "nft"]).part == "nft"
    assert cli.parser().parse_args(["-d"]).part is None  # all


@pytest.mark.parametrize(
    ("holder", "advice"),
    [
        (
            "daemon",
            "the uplinkd daemon (pid {pid}) is running in this network namespace and would apply "
            "its plan again; stop it first (systemctl stop uplinkd), then run --stop",
        ),
        (
            "once",
            "uplinkd --once (pid {pid}) is running in this network namespace; run --stop when it "
            "has finished",
        ),
    ],
)
def test_stop_beside_another_instance_says_what_to_do(
    holder: str, advice: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPLINKD_RUN_DIR", str(tmp_path / "run"))
    held = instance.acquire(holder)
    try:
        with pytest.raises(instance.AlreadyRunningError) as refused:
            cli._lock("stop")
        assert str(refused.value) == "--stop refused: " + advice.format(pid=os.getpid())
        with pytest.raises(instance.AlreadyRunningError, match="is already running"):
            cli._lock("once")
    finally:
        held.release()
