"""Hook files: which are used, in what order, and what `.py` hooks add to the plan."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from dataclasses import replace
from pathlib import Path

import pytest
from uplinkd import const
from uplinkd.config.model import Config, LanConfig, LinkConfig, Method
from uplinkd.errors import HookError
from uplinkd.hooks import stages
from uplinkd.planning import planner
from uplinkd.planning.plan import LinkFacts

FACTS = [
    LinkFacts(
        "DSL", "wan1", ipaddress.IPv4Interface("10.0.1.2/24"), ipaddress.IPv4Address("10.0.1.1")
    ),
    LinkFacts(
        "LTE", "wan2", ipaddress.IPv4Interface("10.0.2.2/24"), ipaddress.IPv4Address("10.0.2.1")
    ),
]


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return Config(
        path=tmp_path / "uplinkd.toml",
        format="toml",
        links=(LinkConfig("DSL", "wan1"), LinkConfig("LTE", "wan2", priority=2)),
        lans=(LanConfig("LAN", "lan0"),),
    )


def write(root: Path, relative: str, text: str, mode: int = 0o644) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)  # 0755 whatever the umask
    path.write_text(text)
    path.chmod(mode)
    return path


def test_files_are_read_by_stage_then_name_skipping_backups(tmp_path: Path) -> None:
    write(tmp_path, "post-run/01.a", "true\n")
    write(tmp_path, "firewall/02.b", "add table inet x\n")
    write(tmp_path, "firewall/01.a", "add table inet y\n")
    write(tmp_path, "routes/01.a~", "editor backup\n")
    write(tmp_path, "routes/01.a.bak", "backup\n")
    write(tmp_path, "pre-run/09.z", "true\n")
    found, refused = stages.hook_files(tmp_path)
    assert [f"{stage}/{path.name}" for stage, path in found] == [
        "pre-run/09.z",
        "firewall/01.a",
        "firewall/02.b",
        "post-run/01.a",
    ]
    assert refused == []


def test_group_or_world_writable_file_is_refused_by_name(tmp_path: Path) -> None:
    bad = write(tmp_path, "routes/01.open", "true\n", mode=0o664)
    found, refused = stages.hook_files(tmp_path)
    assert found == []
    assert refused == [f"{bad}: refused: writable by group or others (mode -rw-rw-r--)"]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_file_not_owned_by_root_is_refused_by_name(tmp_path: Path) -> None:
    bad = write(tmp_path, "firewall/01.theirs", "add table inet x\n")
    os.chown(bad, 65534, 65534)
    assert stages.hook_files(tmp_path)[1] == [f"{bad}: refused: owned by uid 65534, not root"]


def test_a_link_is_refused_even_to_a_safe_file(tmp_path: Path) -> None:
    """The check looked at a link's target: a link to any root-owned file passed it."""
    target = write(tmp_path, "elsewhere/rules", "add table inet x\n")
    link = tmp_path / "firewall" / "01.link"
    link.parent.mkdir(mode=0o755)
    link.symlink_to(target)
    found, refused = stages.hook_files(tmp_path)
    assert found == []
    assert refused == [f"{link}: refused: a symbolic link (to {target}); hooks must be files"]


@pytest.mark.parametrize(
    ("mode", "shown"), [(0o777, "drwxrwxrwx"), (0o1777, "drwxrwxrwt"), (0o775, "drwxrwxr-x")]
)
def test_a_hook_directory_others_may_write_is_refused_whole(
    tmp_path: Path, mode: int, shown: str
) -> None:
    write(tmp_path, "routes/01.routes", "ip route replace 192.0.2.0/24 dev lan0\n")
    write(tmp_path, "post-run/01.ok", "true\n")
    (tmp_path / "routes").chmod(mode)
    found, refused = stages.hook_files(tmp_path)
    assert [f"{stage}/{path.name}" for stage, path in found] == ["post-run/01.ok"]
    assert refused == [
        f"{tmp_path / 'routes'}: refused: directory writable by group or others (mode {shown}); "
        "its hooks are not used"
    ]


def test_a_configuration_directory_others_may_write_refuses_every_hook(tmp_path: Path) -> None:
    root = tmp_path / "etc"
    write(root, "pre-run/01.ok", "true\n")
    write(root, "firewall/01.ok", "add table inet x\n")
    root.chmod(0o757)
    found, refused = stages.hook_files(root)
    assert found == []
    reason = (
        f"{root}: refused: directory writable by group or others (mode drwxr-xrwx); "
        "its hooks are not used"
    )
    assert refused == [reason]  # once, not for each directory


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_hook_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "firewall/01.rules", "add table inet x\n")
    os.chown(tmp_path / "firewall", 65534, 65534)
    assert stages.hook_files(tmp_path) == (
        [],
        [
            f"{tmp_path / 'firewall'}: refused: directory owned by uid 65534, not root; "
            "its hooks are not used"
        ],
    )


def test_refusals_are_logged_once_not_at_every_apply(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = write(tmp_path, "routes/01.open", "true\n", mode=0o666)
    with caplog.at_level(logging.WARNING, logger="uplinkd.hooks.stages"):
        for _ in range(3):
            stages.hook_files(tmp_path)
    assert [r.getMessage() for r in caplog.records] == [
        f"{bad}: refused: writable by group or others (mode -rw-rw-rw-)"
    ]


def test_plain_lines_become_nft_lines_or_commands(config: Config, tmp_path: Path) -> None:
    write(
        tmp_path,
        "firewall/01.rules",
        "# comment\n\nnft add table inet mine\nadd chain inet mine c\n",
    )
    write(tmp_path, "routes/01.routes", "ip route replace 192.0.2.0/24 dev lan0\n")
    found = asyncio.run(stages.load(config, FACTS, {"DSL", "LTE"}))
    assert [(line.line, line.text) for line in found.extras.nft_lines] == [
        (3, "add table inet mine"),
        (4, "add chain inet mine c"),
    ]
    assert [(c.stage, c.line, c.text) for c in found.commands] == [
        ("routes", 1, "ip route replace 192.0.2.0/24 dev lan0")
    ]


def test_python_hook_uses_the_balancer(config: Config, tmp_path: Path) -> None:
    write(
        tmp_path,
        "firewall/01.local.py",
        "\n".join(
            [
                'assert B.isp_services() == ["DSL", "LTE"] and B.lan_services() == ["LAN"]',
                'assert B.up() == ["LTE"]',
                'assert (B.dev("DSL"), B.ip("DSL"), B.net("DSL"), B.gw("DSL")) == '
                '("wan1", "10.0.1.2", "10.0.1.0/24", "10.0.1.1")',
                'assert B.dev("LAN") == "lan0" and B.role("LAN") == "lan"',
                'B.forward(80, "192.168.10.35")',
                'B.forward(23, "192.168.10.35:22", "tcp", "udp")',
                'B.force_route("DSL", src="192.168.10.20", proto="tcp", dport=25)',
                'B.force_route("LTE", dst="198.51.100.0/24", fallback=True)',
                'B.add_route("10.20.0.0/16", via="DSL")',
                'B.nft("add table inet mine")',
            ]
        )
        + "\n",
    )
    found = asyncio.run(stages.load(config, FACTS, {"LTE"}))
    forwards = [(f.port.first, str(f.host), f.host_port, f.proto) for f in found.extras.forwards]
    assert forwards == [
        (80, "192.168.10.35", None, "tcp"),
        (23, "192.168.10.35", 22, "tcp"),
        (23, "192.168.10.35", 22, "udp"),
    ]
    enforced, fallback = found.extras.rules
    assert (enforced.method, enforced.links) == (Method.ENFORCED, ("DSL",))
    assert str(enforced.match.src[0]) == "192.168.10.20/32"
    assert (fallback.method, fallback.links) == (Method.PRIORITY, ("LTE", "DSL"))
    (route,) = found.extras.routes
    assert (str(route.dst), route.device, str(route.gateway), route.table) == (
        "10.20.0.0/16",
        "wan1",
        "10.0.1.1",
        const.RT_TABLE_MAIN,
    )
    assert [line.text for line in found.extras.nft_lines] == ["add table inet mine"]

    # Hook rules come first in the plan: DSL is down, so SMTP from .20 is refused, not leaked.
    plan = planner.plan(config, FACTS, {"LTE"}, found.extras)
    assert [d.rule for d in plan.dispatches][:2] == ["01.local.py:7", "01.local.py:8"]
    assert plan.dispatches[0].targets == (0,)
    assert plan.dispatches[1].targets == (2,)


@pytest.mark.parametrize(
    ("source", "line", "fragment"),
    [
        ("B.forward(80, '192.168.10.35')\nB.forward(81, 'not-an-ip')\n", 2, "not-an-ip"),
        ("x = 1\nB.dev('NOPE')\n", 2, "NOPE"),
        ("def broken(:\n", 1, "syntax error"),
        ("B.force_route('LTE', dport='70000')\n", 1, "70000"),
    ],
)
def test_python_hook_errors_name_file_and_line(
    config: Config, tmp_path: Path, source: str, line: int, fragment: str
) -> None:
    path = write(tmp_path, "post-run/10.hook.py", source)
    with pytest.raises(HookError) as caught:
        asyncio.run(stages.load(config, FACTS, {"DSL", "LTE"}))
    assert (caught.value.path, caught.value.line) == (path, line)
    assert str(caught.value).startswith(f"{path}:{line}: ")
    assert fragment in str(caught.value)


def test_perl_hook_is_refused_with_its_name(tmp_path: Path) -> None:
    perl = write(tmp_path, "firewall/02.accept.pl", "$B->forward(80 => '192.168.10.35');\n")
    found, refused = stages.hook_files(tmp_path)
    assert found == []
    assert refused == [f"{perl}: refused: Perl hooks are not run; port it to a .py hook with B"]


def test_balance_conf_hooks_live_in_balance_beside_it(config: Config) -> None:
    toml = replace(config, path=Path("/etc/uplinkd/uplinkd.toml"))
    legacy = replace(config, path=Path("/etc/network/balance.conf"), format="balance.conf")
    assert toml.hook_root == Path("/etc/uplinkd")
    assert legacy.hook_root == Path("/etc/network/balance")  # Net-ISP-Balance's own layout


def test_dry_run_runs_no_python_hook_and_names_it(config: Config, tmp_path: Path) -> None:
    marker = tmp_path / "hook-ran"
    hook = write(
        tmp_path,
        "post-run/10-side-effect.py",
        f'open("{marker}", "w").close()\nB.forward(80, "192.168.10.35")\n',
    )
    write(tmp_path, "firewall/01.rules", "add table inet mine\n")
    found = asyncio.run(stages.load(config, FACTS, {"DSL", "LTE"}, dry_run=True))
    assert not marker.exists()
    assert found.not_run == [str(hook)]
    assert found.extras.forwards == ()
    # Plain hook files only describe state; a dry run still shows them.
    assert [line.text for line in found.extras.nft_lines] == ["add table inet mine"]

    applied = asyncio.run(stages.load(config, FACTS, {"DSL", "LTE"}))
    assert marker.exists() and applied.not_run == [] and len(applied.extras.forwards) == 1
