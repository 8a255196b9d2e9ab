"""uplinkctl without a daemon: formatting, error mapping, the command line, and no bus at all."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import uplinkd
from dbus_fast import Variant
from uplinkd import ctl
from uplinkd.publish import bus, bus_api
from uplinkd.publish.status import LinkStatus, Overall, Snapshot

NOW = 1_700_000_000.0
ROOT = Path(__file__).resolve().parents[2]


def link(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "Name": "DSL",
        "Device": "eth0",
        "State": "up",
        "Since": int(NOW) - 192,
        "Weight": 3,
        "Priority": 1,
        "Gateway": "192.0.2.1",
        "Address": "192.0.2.10/24",
        "LatencyMs": 12.34,
        "LossPercent": 0.0,
        "RxBps": 12_345_678,
        "TxBps": 1_200_000,
        "NewConnectionShare": 0.75,
    }
    return values | overrides


MANAGER = {"Version": "0.1.0", "Mode": "weighted", "Generation": 12, "OverallState": "degraded"}
LTE = link(
    Name="LTE",
    Device="wwan0",
    State="down",
    Since=int(NOW) - 5,
    LatencyMs=-1.0,
    LossPercent=100.0,
    RxBps=0,
    TxBps=850,
    NewConnectionShare=0.0,
)
STATUS: ctl.Status = (MANAGER, [link(), LTE])


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (5, "5s"),
        (59.9, "59s"),
        (60, "1m00s"),
        (192, "3m12s"),
        (3599, "59m59s"),
        (3600, "1h00m"),
        (2 * 3600 + 5 * 60 + 59, "2h05m"),
        (86399, "23h59m"),
        (3 * 86400 + 4 * 3600 + 59 * 60, "3d4h"),
        (400 * 86400, "400d0h"),
        (-3, "0s"),  # a clock stepped back: never a negative age
    ],
)
def test_human_duration(seconds: float, text: str) -> None:
    assert ctl.human_duration(seconds) == text


@pytest.mark.parametrize(
    ("bps", "text"),
    [
        (0, "0 bit/s"),
        (850, "850 bit/s"),
        (999, "999 bit/s"),
        (999.6, "1.0 kbit/s"),
        (1000, "1.0 kbit/s"),
        (12_345_678, "12.3 Mbit/s"),
        (999_949, "999.9 kbit/s"),
        (999_950, "1.0 Mbit/s"),  # never "1000.0 kbit/s"
        (2_500_000_000, "2.5 Gbit/s"),
        (5e15, "5000.0 Tbit/s"),
    ],
)
def test_human_rate(bps: float, text: str) -> None:
    assert ctl.human_rate(bps) == text


def test_percent_and_latency() -> None:
    assert [ctl.human_percent(x) for x in (0, 5, 12.5, 100, 33.333)] == [
        "0%",
        "5%",
        "12.5%",
        "100%",
        "33.3%",
    ]
    assert ctl.human_latency(-1) == "-"
    assert ctl.human_latency(0.04) == "0.0 ms"
    assert ctl.human_latency(12.34) == "12.3 ms"


def test_status_table() -> None:
    assert ctl.status_table(STATUS, NOW) == (
        "uplinkd 0.1.0: degraded, generation 12, mode weighted\n"
        "LINK  DEVICE  STATE    FOR  LATENCY  LOSS  SHARE           RX          TX\n"
        "DSL   eth0    up     3m12s  12.3 ms    0%    75%  12.3 Mbit/s  1.2 Mbit/s\n"
        "LTE   wwan0   down      5s        -  100%     0%      0 bit/s   850 bit/s\n"
    )


def test_status_table_shows_hop_latency_when_measured() -> None:
    manager, (dsl, lte) = STATUS
    measured = (manager, [{**dsl, "HopLatencyMs": 8.25}, {**lte, "HopLatencyMs": -1.0}])
    assert ctl.status_table(measured, NOW).splitlines()[1:] == [
        "LINK  DEVICE  STATE    FOR  LATENCY  HOP LATENCY  LOSS  SHARE           RX          TX",
        "DSL   eth0    up     3m12s  12.3 ms       8.2 ms    0%    75%  12.3 Mbit/s  1.2 Mbit/s",
        "LTE   wwan0   down      5s        -            -  100%     0%      0 bit/s   850 bit/s",
    ]


def test_status_table_columns_follow_the_longest_cell() -> None:
    long = link(Name="a-very-long-link-name", Device="", Since=0)
    lines = ctl.status_table((MANAGER, [long, link()]), NOW).splitlines()
    assert lines[1].index("DEVICE") == lines[2].index(" -  ") + 1 == lines[3].index("eth0")
    assert lines[2].split()[:4] == ["a-very-long-link-name", "-", "up", "-"]  # unknown since


def test_status_table_without_links() -> None:
    text = ctl.status_table(({**MANAGER, "OverallState": "offline"}, []), NOW)
    assert text == "uplinkd 0.1.0: offline, generation 12, mode weighted\n(no links)\n"


def test_status_shows_the_hook_problems_the_daemon_publishes() -> None:
    """From the daemon's snapshot through the bus adapter's GetStatus values to the table: one
    `hook problem:` line per failure, under the links; none when every hook works."""
    problem = "/etc/uplinkd/firewall/10.web.py:2: syntax error: invalid syntax; it adds nothing"
    links = (
        LinkStatus("DSL", "eth0", "up", NOW - 192, True, 3, 1, "", "", 12.34, -1.0, 0.0, 0, 0, 1.0),
    )
    for problems, expected in (((problem,), [f"hook problem: {problem}"]), ((), [])):
        snapshot = Snapshot("0.1.0", "weighted", 12, Overall.ONLINE, links, problems)
        manager = bus_api.ManagerInterface(bus.BusService(controller=None), snapshot).variants()
        link_values = [bus_api.LinkInterface(status).variants() for status in snapshot.links]
        status = ctl.unwrap_status([manager, link_values])
        lines = ctl.status_table(status, NOW).splitlines()
        assert lines[3:] == expected
        assert lines[2].startswith("DSL ")
        assert json.loads(ctl.status_json(status))["manager"]["HookProblems"] == list(problems)


def test_learned_table_and_json() -> None:
    assert ctl.learned_table([]).startswith("(no destinations learned")
    assert ctl.learned_json([]) == "[]\n"
    text = ctl.learned_table([("a-long-rule", "198.51.100.7", "ISP2", 7)])
    assert text == (
        "RULE         DESTINATION   LINK  FORGOTTEN IN\n"
        "a-long-rule  198.51.100.7  ISP2            7s\n"
    )


def test_status_table_tolerates_missing_keys() -> None:
    """An older or newer daemon may send fewer keys: the table shows what it has."""
    text = ctl.status_table(({}, [{"Name": "X"}]), NOW)
    assert text.splitlines()[0] == "uplinkd ?: ?, generation ?, mode ?"
    assert re.split(r"\s{2,}", text.splitlines()[2]) == [
        "X",
        "-",
        "?",
        "-",
        "-",
        "0%",
        "0%",
        "0 bit/s",
        "0 bit/s",
    ]


def test_unwrap_status_and_json() -> None:
    body = [
        {key: Variant("s" if isinstance(v, str) else "t", v) for key, v in MANAGER.items()},
        [{"Name": Variant("s", "DSL"), "LatencyMs": Variant("d", -1.0)}],
    ]
    status = ctl.unwrap_status(body)
    assert status == (MANAGER, [{"Name": "DSL", "LatencyMs": -1.0}])
    data = json.loads(ctl.status_json(status))
    assert data == {"manager": MANAGER, "links": [{"LatencyMs": None, "Name": "DSL"}]}
    assert list(data) == ["links", "manager"]  # sorted: stable for diffs and scripts


def test_status_json_says_null_for_what_is_not_measured() -> None:
    """D-Bus has no null: the contract's -1 for "not measured" becomes JSON's null, and only
    that; a measured figure, zeros included, is passed on as it is."""
    manager, (dsl, lte) = STATUS
    measured = {**dsl, "HopLatencyMs": 8.25, "LossPercent": 0.0, "NewConnectionShare": 0.0}
    unmeasured = {**lte, "HopLatencyMs": -1.0, "RxBps": 0}
    data = json.loads(ctl.status_json((manager, [measured, unmeasured])))
    first, second = data["links"]
    assert (first["LatencyMs"], first["HopLatencyMs"]) == (12.34, 8.25)
    assert (first["LossPercent"], first["NewConnectionShare"]) == (0.0, 0.0)
    assert (second["LatencyMs"], second["HopLatencyMs"]) == (None, None)
    assert (second["LossPercent"], second["RxBps"], second["TxBps"]) == (100.0, 0, 850)
    assert "-1" not in ctl.status_json((manager, [measured, unmeasured]))
    assert data["manager"] == MANAGER


def test_every_sentinel_of_the_contract_becomes_null() -> None:
    """The properties whose documentation in the XML gives -1 a meaning are the ones converted."""
    contract = (ROOT / "dbus" / "org.uplinkd.Uplinkd1.xml").read_text()
    sentinels = set(re.findall(r"<!--\s+(\w+):\n[^>]*?\s-1 when[^>]*?-->\s*<property", contract))
    assert sentinels == {"LatencyMs", "HopLatencyMs"}  # the regular expression still finds them
    assert sentinels == ctl.NOT_MEASURED_WHEN_NEGATIVE


def test_monitor_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    assert ctl.timestamp(NOW + 0.25) == "2023-11-14 22:13:20.250"
    assert ctl.state_change_line(NOW, "DSL", "up", "down", "3 probe rounds lost") == (
        "2023-11-14 22:13:20.000  DSL: up -> down (3 probe rounds lost)"
    )
    assert ctl.state_change_line(NOW, "DSL", "down", "up", "").endswith("DSL: down -> up")
    assert ctl.plan_applied_line(NOW, 7) == "2023-11-14 22:13:20.000  plan applied, generation 7"


@pytest.mark.parametrize(
    ("error_name", "code", "message"),
    [
        (
            "org.freedesktop.DBus.Error.ServiceUnknown",
            3,
            "uplinkd is not running (no owner of org.uplinkd.Uplinkd1 on the system bus)",
        ),
        (
            "org.freedesktop.DBus.Error.NameHasNoOwner",
            3,
            "uplinkd is not running (no owner of org.uplinkd.Uplinkd1 on the system bus)",
        ),
        (
            "org.freedesktop.DBus.Error.AccessDenied",
            4,
            "access denied: 'uplinkctl up DSL' needs root or membership in the admin group",
        ),
        ("org.uplinkd.Uplinkd1.Error.UnknownLink", 1, "the server's own words"),
        ("org.uplinkd.Uplinkd1.Error.ReloadFailed", 1, "the server's own words"),
        ("org.uplinkd.Uplinkd1.Error.Internal", 1, "the server's own words"),
        (
            "org.freedesktop.DBus.Error.UnknownMethod",
            1,
            "the server's own words (org.freedesktop.DBus.Error.UnknownMethod)",
        ),
    ],
)
def test_error_mapping(error_name: str, code: int, message: str) -> None:
    assert ctl.exit_code(error_name) == code
    assert ctl.error_message(error_name, "the server's own words", "up DSL") == message


def test_error_without_text_names_the_error() -> None:
    message = ctl.error_message("org.uplinkd.Uplinkd1.Error.Internal", "", "reload")
    assert message == "failed (org.uplinkd.Uplinkd1.Error.Internal)"


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["up"],
        ["down", "A", "B"],
        ["monitor", "--count", "0"],
        ["monitor", "--count", "x"],
        ["status", "--yaml"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        ctl.main(argv)
    assert exited.value.code == ctl.EXIT_USAGE == 2
    assert "usage: uplinkctl" in capsys.readouterr().err


def test_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        ctl.main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for line in ("0  success", "1  uplinkd refused", "2  usage", "3  uplinkd is not running"):
        assert line in out
    assert "4  access denied" in out


def test_bus_address_before_or_after_the_command() -> None:
    assert ctl.parser().parse_args(["--bus-address", "unix:path=/a", "status"]).bus_address == (
        "unix:path=/a"
    )
    assert ctl.parser().parse_args(["up", "X", "--bus-address", "unix:path=/b"]).bus_address == (
        "unix:path=/b"
    )
    assert not hasattr(ctl.parser().parse_args(["reload"]), "bus_address")


@pytest.mark.parametrize("argv", [["status"], ["status", "--json"], ["up", "DSL"], ["monitor"]])
def test_no_bus_at_all(
    argv: list[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    address = f"unix:path={tmp_path}/no-such-bus"
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", address)
    assert ctl.main(argv) == ctl.EXIT_NOT_RUNNING == 3
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"uplinkctl: cannot connect to the system bus at {address}: No such file or directory\n"
    )


def test_bus_address_option_wins_over_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/from-env")
    assert ctl.main(["--bus-address", f"unix:path={tmp_path}/from-option", "reload"]) == 3
    assert "from-option: No such file" in capsys.readouterr().err


def test_bad_bus_address_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["--bus-address", "nonsense", "status"]) == 3
    assert capsys.readouterr().err.startswith("uplinkctl: cannot connect to the system bus at ")


def test_no_bus_as_a_process_prints_no_traceback(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "uplinkd.ctl", "status"],
        env={"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/none", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 3
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        f"uplinkctl: cannot connect to the system bus at unix:path={tmp_path}/none: "
        "No such file or directory"
    ]


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        ctl.main(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"uplinkctl {uplinkd.__version__}\n"


def test_what_up_down_and_reload_say() -> None:
    assert ctl.enabled_line("ISP1", True, "init") == "ISP1: enabled (state init, probing decides)"
    assert ctl.enabled_line("ISP1", True, "up") == "ISP1: enabled (state up)"
    assert ctl.enabled_line("ISP1", False, "disabled") == (
        "ISP1: disabled (state disabled; out of service until 'uplinkctl up ISP1')"
    )
    assert ctl.reloaded_line(7, 8) == "reloaded: generation 8"
    assert ctl.reloaded_line(7, 7) == "reloaded: generation 7 (plan unchanged)"


def test_link_state_of_a_status() -> None:
    status: ctl.Status = (MANAGER, [link(State="init"), LTE])
    assert ctl.link_state(status, "DSL") == "init"
    assert ctl.link_state(status, "LTE") == "down"
    assert ctl.link_state(status, "GONE") == "?"
