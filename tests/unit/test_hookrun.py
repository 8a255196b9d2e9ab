"""Hooks beside the event loop: the child protocol, replay, time limits, bounded output, and the
daemon's policy for a failing hook (hookchild, stages.run_python, subproc, hookrunner)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from uplinkd import background, const, ctl
from uplinkd.config.model import Config, LanConfig, LinkConfig
from uplinkd.datapath.apply import Datapath
from uplinkd.errors import HookError
from uplinkd.hooks import stages
from uplinkd.hooks.runner import HookRunner
from uplinkd.planning.plan import HookLine, LinkFacts
from uplinkd.publish.status import Snapshot
from uplinkd.runtime.coordinator import Coordinator

from tests.fakes.backend import FakeBackend

FACTS = [
    LinkFacts(
        "DSL", "wan1", ipaddress.IPv4Interface("10.0.1.2/24"), ipaddress.IPv4Address("10.0.1.1")
    ),
    LinkFacts(
        "LTE", "wan2", ipaddress.IPv4Interface("10.0.2.2/24"), ipaddress.IPv4Address("10.0.2.1")
    ),
]
PACKAGE_ROOT = str(Path(stages.__file__).resolve().parent.parent)


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(
        path=tmp_path / "uplinkd.toml",
        format="toml",
        links=(LinkConfig("DSL", "wan1"), LinkConfig("LTE", "wan2", priority=2)),
        lans=(LanConfig("LAN", "lan0"),),
    )


@pytest.fixture
def short_limit(monkeypatch: pytest.MonkeyPatch) -> float:
    # Room for a child Python to start and run a short hook on a loaded machine.
    monkeypatch.setattr(const, "HOOK_TIMEOUT_S", 1.5)
    return 1.5


def write(root: Path, relative: str, text: str) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o644)
    return path


def alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie waiting for its parent."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def wait_for_pid(path: Path, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.02)
    raise AssertionError(f"{path} never got a pid")


# --- the child protocol ------------------------------------------------------------------


def run_child(request: dict[str, object]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uplinkd.hooks.child", str(request["path"])],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        env={**os.environ, "PYTHONPATH": PACKAGE_ROOT},
    )


SNAPSHOT = {
    "isp": [["DSL", "wan1", "10.0.1.2", "10.0.1.0/24", "10.0.1.1"]],
    "lan": [["LAN", "lan0"]],
    "up": ["DSL"],
}


def test_child_answers_queries_from_the_snapshot_and_records_calls_with_their_lines() -> None:
    source = "\n".join(
        [
            'print("to the log, not the answer")',
            'assert B.services() == ["DSL", "LAN"] and B.up() == ["DSL"]',
            'assert (B.dev("DSL"), B.ip("DSL"), B.net("DSL"), B.gw("DSL"), B.role("LAN")) == '
            '("wan1", "10.0.1.2", "10.0.1.0/24", "10.0.1.1", "lan")',
            "def helper():",
            '    B.forward(80, "192.168.10.35", "tcp", "udp")',
            "helper()",
            'B.force_route("DSL", dport=25, fallback=True)',
            'B.nft("add table inet mine")',
        ]
    )
    done = run_child({"path": "/hooks/10.x.py", "source": source, "snapshot": SNAPSHOT})
    answer = json.loads(done.stdout)
    assert answer["error"] is None
    assert [(c["method"], c["args"], c["line"]) for c in answer["calls"]] == [
        ("forward", [80, "192.168.10.35", "tcp", "udp"], 5),
        ("force_route", ["DSL"], 7),
        ("nft", ["add table inet mine"], 8),
    ]
    assert answer["calls"][1]["kwargs"]["dport"] == 25
    assert answer["calls"][1]["kwargs"]["fallback"] is True
    assert "to the log, not the answer" in done.stderr


@pytest.mark.parametrize(
    ("source", "message", "line"),
    [
        ("x = 1\ndef broken(:\n", "syntax error", 2),
        ("x = 1\nB.dev('NOPE')\n", "KeyError", 2),
        ("B.forward(80)\n", "TypeError", 1),  # Balancer's signature, checked in the child
        ("import sys\nsys.exit(3)\n", "SystemExit: 3", 2),
    ],
)
def test_child_reports_a_failing_hook_with_its_line(source: str, message: str, line: int) -> None:
    done = run_child({"path": "/hooks/10.x.py", "source": source, "snapshot": SNAPSHOT})
    error = json.loads(done.stdout)["error"]
    assert message in error["message"]
    assert error["line"] == line


def test_a_hook_that_exits_0_early_has_its_calls() -> None:
    source = 'B.nft("add table inet a")\nimport sys\nsys.exit()\nB.nft("never")\n'
    done = run_child({"path": "/hooks/10.x.py", "source": source, "snapshot": SNAPSHOT})
    answer = json.loads(done.stdout)
    assert answer["error"] is None
    assert [c["args"] for c in answer["calls"]] == [["add table inet a"]]


# --- replay into the real Balancer -----------------------------------------------------------


def test_replay_checks_arguments_and_names_the_line_of_the_call(config: Config) -> None:
    calls = [
        {"method": "forward", "args": [80, "192.168.10.35"], "kwargs": {}, "line": 3},
        {"method": "forward", "args": [81, "not-an-ip"], "kwargs": {}, "line": 9},
    ]
    with pytest.raises(HookError) as caught:
        stages.replay("/h/10.x.py", calls, stages.Balancer(config, FACTS, {"DSL"}))
    assert str(caught.value).startswith("/h/10.x.py:9: ")
    assert "not-an-ip" in str(caught.value)


def test_replay_makes_rule_names_from_the_recorded_lines(config: Config) -> None:
    calls = [
        {"method": "force_route", "args": ["LTE"], "kwargs": {"dport": 25}, "line": 4},
        {"method": "nft", "args": ["add table inet x"], "kwargs": {}, "line": 6},
    ]
    extras = stages.replay("/h/10.x.py", calls, stages.Balancer(config, FACTS, {"DSL"}))
    assert [rule.name for rule in extras.rules] == ["10.x.py:4"]
    assert extras.nft_lines == (HookLine("/h/10.x.py", 6, "add table inet x"),)


@pytest.mark.parametrize(
    "calls",
    [
        "not a list",
        [{"method": "__init__", "args": [], "kwargs": {}, "line": 1}],  # only the actions
        [{"method": "nft", "args": "add table", "kwargs": {}, "line": 1}],
        [{"method": "nft"}],
    ],
)
def test_replay_refuses_a_malformed_answer(config: Config, calls: object) -> None:
    with pytest.raises(HookError, match="malformed"):
        stages.replay("/h/10.x.py", calls, stages.Balancer(config, FACTS, {"DSL"}))


# --- time limits and bounds ----------------------------------------------------------------


def python_hook(path: Path) -> stages.PythonHook:
    return stages.PythonHook("post-run", str(path), path.read_text())


def test_a_hook_past_its_time_limit_is_killed_with_what_it_started(
    config: Config, tmp_path: Path, short_limit: float
) -> None:
    pids = tmp_path / "pids"
    hook = write(
        tmp_path,
        "post-run/10.hang.py",
        "import os, subprocess, time\n"
        'child = subprocess.Popen(["sleep", "30"])\n'
        f'open("{pids}", "w").write(f"{{os.getpid()}} {{child.pid}}")\n'
        "time.sleep(30)\n",
    )
    begin = time.monotonic()
    with pytest.raises(HookError, match=r"killed after 1\.5 s, its time limit"):
        asyncio.run(stages.run_python(python_hook(hook), config, FACTS, {"DSL"}))
    assert time.monotonic() - begin < 10  # the limit, not the hook's 30 s
    for pid in map(int, pids.read_text().split()):
        assert not alive(pid), pid


def test_a_command_past_its_time_limit_is_killed_with_its_group(
    tmp_path: Path, short_limit: float
) -> None:
    pid_file = tmp_path / "pid"
    command = stages.CommandLine(
        "routes", "/h/routes/01", 4, f"sleep 30 & echo $! > {pid_file}; wait"
    )
    outcome = asyncio.run(stages.run_command(command))
    assert outcome.problem is not None
    assert outcome.problem.startswith("/h/routes/01:4: killed after 1.5 s, its time limit")
    assert not alive(wait_for_pid(pid_file))


def test_output_is_read_to_the_end_but_only_its_start_is_kept() -> None:
    finished = asyncio.run(
        background.run_bounded(
            ["sh", "-c", "head -c 50000000 /dev/zero | tr '\\0' x; echo; echo tail >&2"],
            timeout=30,
            output_limit=100,
        )
    )
    assert finished.returncode == 0
    assert finished.output.startswith("x" * 100)
    assert len(finished.output) < 200
    assert "more bytes" in finished.output


def test_a_failing_command_is_named_with_its_output(tmp_path: Path) -> None:
    command = stages.CommandLine("post-run", "/h/post-run/01", 2, "echo oops >&2; exit 3")
    outcome = asyncio.run(stages.run_command(command))
    assert outcome.problem == "/h/post-run/01:2: exit 3: echo oops >&2; exit 3: oops"


def test_an_answer_beyond_the_result_limit_is_refused(
    config: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(const, "HOOK_RESULT_LIMIT", 10_000)
    hook = write(tmp_path, "firewall/10.many.py", 'for i in range(10000):\n    B.nft("x")\n')
    with pytest.raises(HookError, match="more than 10000 bytes"):
        asyncio.run(stages.run_python(python_hook(hook), config, FACTS, {"DSL"}))


# --- the daemon's policy ---------------------------------------------------------------------


class Runner:
    """A HookRunner driven step by step, counting the applies it asks for."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.changes = 0
        self.runner = HookRunner(self._changed)

    def _changed(self) -> None:
        self.changes += 1

    async def run(self, up: set[str] | None = None) -> stages.Hooks:
        self.runner.want(self.config, FACTS, up or {"DSL", "LTE"})
        await self.runner._run_if_changed()
        return self.runner.state


def forwarded_ports(state: stages.Hooks) -> list[int]:
    return [forward.port.first for forward in state.extras.forwards]


def touch_later(path: Path, text: str) -> None:
    """Rewrite a file so that its stat changes even within one clock tick."""
    path.write_text(text)
    stamp = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


def test_a_broken_hook_keeps_its_previous_result_and_is_reported_once(
    config: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    hook = write(tmp_path, "firewall/10.fw.py", 'B.forward(80, "192.168.10.35")\n')

    async def scenario() -> None:
        runner = Runner(config)
        assert forwarded_ports(await runner.run()) == [80]
        assert runner.changes == 1
        touch_later(hook, 'B.forward(81, "192.168.10.35")\ndef broken(:\n')
        with caplog.at_level(logging.ERROR):
            assert forwarded_ports(await runner.run()) == [80]  # the previous good result
            assert forwarded_ports(await runner.run({"LTE"})) == [80]  # run again: other links
        assert runner.changes == 1  # nothing new to apply
        (problem,) = runner.runner.problems
        assert problem.startswith(f"{hook}:2: syntax error")
        assert problem.endswith("its previous result is kept")
        assert caplog.text.count(f"{hook}:2: syntax error") == 1  # once, not at every run

        touch_later(hook, 'B.forward(82, "192.168.10.35")\n')
        assert forwarded_ports(await runner.run()) == [82]
        assert runner.runner.problems == ()
        assert runner.changes == 2

    asyncio.run(scenario())


def test_a_hook_without_a_good_result_adds_nothing_and_a_removed_one_is_dropped(
    config: Config, tmp_path: Path, short_limit: float
) -> None:
    write(tmp_path, "firewall/10.hang.py", "import time\ntime.sleep(30)\n")
    good = write(tmp_path, "firewall/20.good.py", 'B.forward(80, "192.168.10.35")\n')

    async def scenario() -> None:
        runner = Runner(config)
        assert forwarded_ports(await runner.run()) == [80]  # the other hook still counts
        (problem,) = runner.runner.problems
        assert "10.hang.py: killed after 1.5 s" in problem
        assert problem.endswith("it adds nothing until it works")
        good.unlink()
        assert forwarded_ports(await runner.run()) == []

    asyncio.run(scenario())


def test_unchanged_inputs_and_files_run_nothing(config: Config, tmp_path: Path) -> None:
    marker = tmp_path / "runs"
    write(tmp_path, "firewall/10.count.py", f'open("{marker}", "a").write("x")\n')

    async def scenario() -> None:
        runner = Runner(config)
        await runner.run()
        await runner.run()
        assert marker.read_text() == "x"
        await runner.run({"DSL"})  # the links in use changed: B.up() may answer otherwise
        assert marker.read_text() == "xx"

    asyncio.run(scenario())


def test_refused_firewall_lines_are_left_out_until_their_file_changes(
    config: Config, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = write(tmp_path, "firewall/01.bad", "add table inet a\nbogus line\n")
    write(tmp_path, "firewall/02.good", "add table inet b\n")

    async def scenario() -> None:
        runner = Runner(config)
        await runner.run()
        refused = HookError(bad, "nft refused it", line=2)
        with caplog.at_level(logging.ERROR):
            assert runner.runner.refuse_nft(refused)
            kept = [line.text for line in runner.runner.state.extras.nft_lines]
            assert kept == ["add table inet b"]
            assert not runner.runner.refuse_nft(refused)  # none of its lines is left
            await runner.run({"DSL"})  # run again with the same file: still left out
            kept = [line.text for line in runner.runner.state.extras.nft_lines]
            assert kept == ["add table inet b"]
        (problem,) = runner.runner.problems
        assert problem.startswith(f"{bad}:2: nft refused it; applied without")
        assert caplog.text.count("nft refused it") == 1
        touch_later(bad, "add table inet a\n")
        texts = [line.text for line in (await runner.run()).extras.nft_lines]
        assert texts == ["add table inet a", "add table inet b"]
        assert runner.runner.problems == ()

        assert runner.runner.refuse_nft(HookError(bad, "refused again", line=1))
        runner.runner.reload(config, FACTS, {"DSL", "LTE"})  # a reload tries them again
        await runner.runner._run_if_changed()
        assert len(runner.runner.state.extras.nft_lines) == 2

    asyncio.run(scenario())


def test_commands_after_an_apply_run_in_order_and_a_newer_run_replaces_a_pending_one(
    config: Config, tmp_path: Path
) -> None:
    log_file = tmp_path / "ran"

    def state(*texts: str) -> stages.Hooks:
        lines = [stages.CommandLine("post-run", "/h/p", n, t) for n, t in enumerate(texts, 1)]
        return stages.Hooks(commands=lines)

    async def scenario() -> None:
        runner = HookRunner(lambda: None)
        started = tmp_path / "started"
        runner.state = state(f"touch {started}; sleep 1; echo first >> {log_file}")
        runner.after_apply()
        while not started.exists():  # the first run is under way
            await asyncio.sleep(0.01)
        runner.state = state(f"echo second >> {log_file}")
        runner.after_apply()
        runner.state = state(f"echo third >> {log_file}", "exit 4")
        runner.after_apply()
        await asyncio.wait_for(runner._commands_task, 10)  # type: ignore[arg-type]
        assert runner.problems == ("/h/p:2: exit 4: exit 4",)
        await runner.stop()

    asyncio.run(scenario())
    assert log_file.read_text().split() == ["first", "third"]


def test_stopping_kills_a_command_still_running(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"

    async def scenario() -> int:
        runner = HookRunner(lambda: None)
        command = stages.CommandLine("routes", "/h/r", 1, f"sleep 30 & echo $! > {pid_file}; wait")
        runner.state = stages.Hooks(commands=[command])
        runner.after_apply()
        pid = await asyncio.to_thread(wait_for_pid, pid_file)
        await asyncio.wait_for(runner.stop(), 5)
        return pid

    assert not alive(asyncio.run(scenario()))


def test_uplinkctl_status_lists_hook_problems() -> None:
    manager = {"Version": "1", "OverallState": "online", "Generation": 3, "Mode": "weighted"}
    manager["HookProblems"] = ["/etc/uplinkd/post-run/10.x.py:2: syntax error: invalid syntax"]
    text = ctl.status_table((manager, []), time.time())
    assert "hook problem: /etc/uplinkd/post-run/10.x.py:2: syntax error" in text


def test_the_status_snapshot_lists_hook_problems(config: Config, tmp_path: Path) -> None:
    broken = write(tmp_path, "post-run/10.broken.py", "x = 1\nB.forward(80, 'not-an-ip')\n")

    async def scenario() -> Snapshot:
        coordinator = Coordinator(config, Datapath(FakeBackend()))
        coordinator._build_links(set())
        await coordinator.hook_runner.refresh(config, FACTS, {"DSL"})
        return coordinator.snapshot()

    (problem,) = asyncio.run(scenario()).hook_problems
    assert problem.startswith(f"{broken}:2: ValueError: forward() host")
