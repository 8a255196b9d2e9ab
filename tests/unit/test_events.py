"""Event hooks (up.d/, down.d/, long_down.d/): order, foolsm's arguments, refusals, timeouts."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from pathlib import Path

import pytest
from uplinkd import events, hooks
from uplinkd.events import EventHooks, LinkEvent, ProbeCounters, TargetFigures
from uplinkd.link import LinkState, LinkStats, TargetStats, Transition

ROOT = os.geteuid() == 0


@pytest.fixture(autouse=True)
def trust_own_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unit tests run unprivileged too: there, the test user's files stand in for root's."""
    if ROOT:
        return
    original = hooks.refusal

    def refusal(path: Path) -> str | None:
        info = path.stat()
        if info.st_uid != os.geteuid():
            return original(path)
        if info.st_mode & 0o022:
            mode = stat.filemode(info.st_mode)
            return f"{path}: refused: writable by group or others (mode {mode})"
        return None

    monkeypatch.setattr(hooks, "refusal", refusal)


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
    path.parent.mkdir(parents=True, exist_ok=True)
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

    with caplog.at_level(logging.WARNING, logger="uplinkd.events"):
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

    with caplog.at_level(logging.WARNING, logger="uplinkd.events"):
        asyncio.run(main())
    assert not out.exists()
    assert f"{foreign}: refused: owned by uid 65534, not root" in caplog.text


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

    with caplog.at_level(logging.INFO, logger="uplinkd.events"):
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

    with caplog.at_level(logging.WARNING, logger="uplinkd.events"):
        assert asyncio.run(main()) is False
    assert "10-hang: link DSL init -> up: killed at shutdown" in caplog.text
