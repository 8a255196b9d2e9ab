"""Event hooks (up.d/, down.d/, long_down.d/): order, foolsm's arguments, refusals, timeouts."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

import pytest
from uplinkd.hooks import events
from uplinkd.hooks.events import EventHooks, LinkEvent, ProbeCounters, TargetFigures
from uplinkd.monitor.link import LinkState, LinkStats, TargetStats, Transition

ROOT = os.geteuid() == 0


def event(
    old: LinkState = LinkState.INIT, new: LinkState = LinkState.UP, link: str = "DSL"
) -> LinkEvent:
    return LinkEvent(
        Transition(link, old, new, "5 replies in a row", at=12.5),
        device="wan1",
        check_ip="1.1.1.1",
        source_ip="10.0.1.2",
        warn_email="root@localhost",
        loss_percent=12.5,
        latency_ms=23.25,
        counters=ProbeCounters(9, 1, 1, 0, 5, 1, 0, 23250),
        targets=(TargetFigures("1.1.1.1", 12.5, 23.25),),
        wall_time=1_700_000_000.7,
    )


def hook(root: Path, relative: str, body: str, mode: int = 0o755) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)  # 0755 whatever the umask
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(mode)
    return path


def test_hooks_run_in_name_order_with_foolsm_arguments_and_environment(tmp_path: Path) -> None:
    out = tmp_path / "out"
    record = (
        f'{{ echo "$(basename "$0")"; printf "%s\\n" "$@"; env | grep ^UPLINKD_ | sort; }}'
        f" >> {out}\n"
    )
    hook(tmp_path, "up.d/20-second", record)
    hook(tmp_path, "up.d/10-first", record)
    for skipped in ("10-first~", "10-first.bak", ".hidden"):
        hook(tmp_path, f"up.d/{skipped}", f"echo {skipped} >> {out}\n")
    hook(tmp_path, "down.d/10-other-state", f"echo down >> {out}\n")

    async def main() -> None:
        hooks_ = EventHooks(tmp_path, timeout_s=5)
        hooks_.fire(event())
        assert await hooks_.drain(10)

    asyncio.run(main())
    arguments = [
        "up",
        "DSL",
        "1.1.1.1",
        "wan1",
        "root@localhost",
        *("9", "1", "1", "0", "5", "1", "0", "23250"),
        "10.0.1.2",
        "unknown",  # foolsm's name for a link not yet decided
        "1700000000",
    ]
    environment = [
        "UPLINKD_DEVICE=wan1",
        "UPLINKD_LATENCY_MS=23.25",
        "UPLINKD_LINK=DSL",
        "UPLINKD_LOSS_PERCENT=12.5",
        "UPLINKD_PREVSTATE=init",
        "UPLINKD_REASON=5 replies in a row",
        "UPLINKD_STATE=up",
    ]
    one = [*arguments, *environment]
    assert out.read_text().splitlines() == ["10-first", *one, "20-second", *one]


def test_long_down_passes_the_time_the_link_went_down() -> None:
    down = event(LinkState.DOWN, LinkState.LONG_DOWN)
    later = LinkEvent(down.transition, "wan1", wall_time=2000.0, down_since=1880.0)
    assert events.foolsm_arguments(later)[0] == "long_down"
    assert events.foolsm_arguments(later)[-2:] == ["down", "1880"]
    assert events.EVENT_DIRS["long_down"] == "long_down.d"


def test_from_transition_takes_foolsms_figures_from_link_stats() -> None:
    transition = Transition("LTE", LinkState.UP, LinkState.DOWN, "3 rounds lost in a row", 7.0)
    stats = LinkStats(
        state=LinkState.DOWN,
        since=7.0,
        rounds=10,
        loss_percent=30.0,
        latency_ms=40.0,
        targets=(
            TargetStats("8.8.8.8", 10, 7, 30.0, 40.0),
            TargetStats("9.9.9.9", 10, 0, 100.0, None),
        ),
        consecutive_lost=3,
        consecutive_received=0,
        flaps=0,
        held_until=None,
    )
    made = LinkEvent.from_transition(
        transition, device="wan2", source="10.0.2.2", warn_email="ops@example.net", stats=stats
    )
    assert events.foolsm_arguments(made)[:14] == [
        *("down", "LTE", "8.8.8.8", "wan2", "ops@example.net"),
        *("7", "0", "3", "0", "0", "0", "3", "40000"),
        "10.0.2.2",
    ]
    assert made.targets[1] == TargetFigures("9.9.9.9", 100.0, None)
    assert (made.loss_percent, made.latency_ms, made.reason) == (
        30.0,
        40.0,
        "3 rounds lost in a row",
    )


def test_refused_files_are_logged_by_name_once_and_not_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    open_ = hook(tmp_path, "down.d/10-open", f"echo open >> {out}\n", mode=0o755)
    open_.chmod(0o666)  # group and others may write it
    plain = hook(tmp_path, "down.d/20-plain", f"echo plain >> {out}\n", mode=0o644)
    hook(tmp_path, "down.d/30-good", f"echo good >> {out}\n")

    async def main() -> None:
        hooks_ = EventHooks(tmp_path, timeout_s=5)
        hooks_.fire(event(LinkState.UP, LinkState.DOWN))
        hooks_.fire(event(LinkState.UP, LinkState.DOWN))
        assert await hooks_.drain(10)

    with caplog.at_level(logging.WARNING, logger="uplinkd.hooks.events"):
        asyncio.run(main())
    assert out.read_text().splitlines() == ["good", "good"]
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals == [
        f"{open_}: refused: writable by group or others (mode -rw-rw-rw-)",
        f"{plain}: refused: not executable",
    ]


@pytest.mark.skipif(not ROOT, reason="needs root to give a hook file to another owner")
def test_hook_owned_by_another_user_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    foreign = hook(tmp_path, "up.d/10-nobody", f"echo nobody >> {out}\n")
    os.chown(foreign, 65534, 65534)

    async def main() -> None:
        hooks_ = EventHooks(tmp_path, timeout_s=5)
        hooks_.fire(event())
        assert await hooks_.drain(10)

    with caplog.at_level(logging.WARNING, logger="uplinkd.hooks.events"):
        asyncio.run(main())
    assert not out.exists()
    assert f"{foreign}: refused: owned by uid 65534, not root" in caplog.text


def fire_and_drain(root: Path, *transitions: tuple[LinkState, LinkState]) -> None:
    async def main() -> None:
        hooks_ = EventHooks(root, timeout_s=5)
        for old, new in transitions:
            hooks_.fire(event(old, new))
        assert await hooks_.drain(10)

    asyncio.run(main())


@pytest.fixture
def touch_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where /usr/bin/touch, run as a hook, would leave files named after its arguments."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


def test_a_link_to_a_root_program_is_not_run(
    tmp_path: Path, touch_cwd: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`ln -s /usr/bin/touch up.d/zz` passed a check that followed the link to its target."""
    out = tmp_path / "out"
    hook(tmp_path, "up.d/10-good", f"echo good >> {out}\n")
    link = tmp_path / "up.d" / "zz"
    link.symlink_to("/usr/bin/touch")
    with caplog.at_level(logging.WARNING):
        fire_and_drain(tmp_path, (LinkState.INIT, LinkState.UP), (LinkState.DOWN, LinkState.UP))
    assert out.read_text() == "good\ngood\n"
    assert list(touch_cwd.iterdir()) == []
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refusals == [
        f"{link}: refused: a symbolic link (to /usr/bin/touch); hooks must be files"
    ]


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o775])
def test_a_directory_others_may_write_runs_nothing(
    tmp_path: Path, touch_cwd: Path, caplog: pytest.LogCaptureFixture, mode: int
) -> None:
    """A world-writable (even sticky) or group-writable up.d: anyone in it may add a hook."""
    out = tmp_path / "out"
    hook(tmp_path, "up.d/10-root-wrote-this", f"echo ran >> {out}\n")
    (tmp_path / "up.d").chmod(mode)
    with caplog.at_level(logging.WARNING):
        fire_and_drain(tmp_path, (LinkState.INIT, LinkState.UP), (LinkState.DOWN, LinkState.UP))
    assert not out.exists()
    refusals = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refusals) == 1
    assert refusals[0].startswith(
        f"{tmp_path / 'up.d'}: refused: directory writable by group or others (mode d"
    )


@pytest.mark.skipif(not ROOT, reason="needs root to give a directory to another owner")
def test_a_directory_owned_by_another_user_runs_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "out"
    hook(tmp_path, "down.d/10-root-wrote-this", f"echo ran >> {out}\n")
    os.chown(tmp_path / "down.d", 65534, 65534)
    with caplog.at_level(logging.WARNING):
        fire_and_drain(tmp_path, (LinkState.UP, LinkState.DOWN))
    assert not out.exists()
    assert (
        f"{tmp_path / 'down.d'}: refused: directory owned by uid 65534, not root; "
        "its hooks are not used"
    ) in caplog.text


def test_hanging_and_failing_hooks_never_stall_the_loop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pid_file, out = tmp_path / "sleeper.pid", tmp_path / "out"
    hook(tmp_path, "down.d/10-hang", f"sleep 30 &\necho $! > {pid_file}\nwait\n")
    hook(tmp_path, "down.d/20-fail", "echo something broke\nexit 1\n")
    hook(tmp_path, "down.d/30-after", f"echo after >> {out}\n")

    async def main() -> tuple[int, float]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        hooks_ = EventHooks(tmp_path, timeout_s=0.5)
        started = time.monotonic()
        hooks_.fire(event(LinkState.UP, LinkState.DOWN))
        fired_in = time.monotonic() - started
        assert await hooks_.drain(10)
        ticking.cancel()
        return ticks, fired_in

    with caplog.at_level(logging.INFO, logger="uplinkd.hooks.events"):
        ticks, fired_in = asyncio.run(main())
    assert fired_in < 0.1  # fire() only schedules
    assert ticks >= 10  # the loop went on while the hook hung (about 50 ticks in 0.5 s)
    assert out.read_text() == "after\n"  # the hooks after the bad ones still ran
    text = caplog.text
    assert "10-hang: link DSL up -> down: killed after 0.5 s" in text
    assert "20-fail: link DSL up -> down: exit 1: something broke" in text
    # The hook's own child went with it: its process group was killed.
    stat = Path(f"/proc/{pid_file.read_text().strip()}/stat")
    assert not stat.exists() or stat.read_text().split(") ")[1].startswith("Z")


def test_events_of_one_link_run_in_order(tmp_path: Path) -> None:
    out = tmp_path / "out"
    hook(tmp_path, "down.d/10-slow", f"sleep 0.3\necho down >> {out}\n")
    hook(tmp_path, "up.d/10-fast", f"echo up >> {out}\n")

    async def main() -> None:
        hooks_ = EventHooks(tmp_path, timeout_s=5)
        hooks_.fire(event(LinkState.UP, LinkState.DOWN))
        hooks_.fire(event(LinkState.DOWN, LinkState.UP))
        assert await hooks_.drain(10)

    asyncio.run(main())
    assert out.read_text().splitlines() == ["down", "up"]


def test_no_hooks_for_other_states_and_drain_kills_at_shutdown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hook(tmp_path, "up.d/10-hang", "sleep 30\n")

    async def main() -> bool:
        hooks_ = EventHooks(tmp_path, timeout_s=60)
        hooks_.fire(event(LinkState.UP, LinkState.DISABLED))  # no directory for it
        hooks_.fire(event())
        await asyncio.sleep(0.2)
        return await hooks_.drain(0.2)

    with caplog.at_level(logging.WARNING, logger="uplinkd.hooks.events"):
        assert asyncio.run(main()) is False
    assert "10-hang: link DSL init -> up: killed at shutdown" in caplog.text
