"""The manual pages document what the code accepts: every TOML key (asked of the parser itself),
its default, every command-line option and command, and they render without groff warnings."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from uplinkd import cli, ctl
from uplinkd.config import balanceconf
from uplinkd.config.model import BANDWIDTH_METHODS, Config
from uplinkd.config.tomlconf import parse_toml
from uplinkd.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
MAN = ROOT / "data" / "man"
PAGES = ("uplinkd.8", "uplinkctl.1", "uplinkd.toml.5")
UNKNOWN = "zz_not_a_key"

# The smallest configuration the parser accepts with every array of tables present once.
MINIMAL: dict[str, Any] = {
    "link": [{"name": "A", "device": "eth0"}],
    "lan": [{"name": "L", "device": "eth9"}],
    "rule": [{"method": "persistence", "match": {"proto": "tcp"}}],
    "forward": [{"port": 80, "to": "192.0.2.1"}],
}


def roff(page: str) -> str:
    """A page's source with roff's escaped hyphens made plain."""
    return (MAN / page).read_text().replace("\\-", "-")


# --- what the parser accepts -------------------------------------------------------------------


def toml_value(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(value)  # strings and integers read the same in TOML


def parse(data: dict[str, Any]) -> Config:
    text = "".join(f"{key} = {toml_value(value)}\n" for key, value in data.items())
    return parse_toml(text, Path("probe.toml"))


def with_value(path: tuple[str, ...], value: object) -> dict[str, Any]:
    """MINIMAL with value at path; the first element stands for an array of tables."""
    data = json.loads(json.dumps(MINIMAL))
    node = data
    for key in path[:-1]:
        node = node.setdefault(key, {})
        node = node[0] if isinstance(node, list) else node
    node[path[-1]] = value
    return data


def allowed_keys(path: tuple[str, ...]) -> tuple[str, ...] | None:
    """The keys the parser allows in the table at path, or None if path is not a table."""
    probe = {UNKNOWN: 1}
    for value in (probe, [probe]):  # a table, or an array of tables
        data = with_value(path, value) if path else {**MINIMAL, UNKNOWN: 1}
        try:
            parse(data)
        except ConfigError as error:
            if f"unknown key '{UNKNOWN}'" in error.message:
                return tuple(re.findall(r"'([^']+)'", error.message.split("allowed:", 1)[1]))
        if not path:
            break
    return None


def accepted_tables() -> dict[str, tuple[str, ...]]:
    """Every table the parser reads ("" for the top level, "link.monitor", ...) and its keys."""
    tables: dict[str, tuple[str, ...]] = {}
    pending: list[tuple[str, ...]] = [()]
    while pending:
        path = pending.pop()
        keys = allowed_keys(path)
        if keys is None:
            continue
        tables[".".join(path)] = keys
        pending += [(*path, key) for key in keys]
    return tables


# --- what uplinkd.toml(5) documents ------------------------------------------------------------


def documented_keys() -> dict[str, dict[str, str]]:
    """Per table, the keys of the KEYS section and the text of their entry line.

    Each .SS names its tables in brackets ("[monitor] and [link.monitor]"; none: the top level);
    each .TP entry starts with the bold key name. "match.src" in [[rule]] is key src of
    rule.match, and one entry may name several keys ("\\fBmonitor\\fR, \\fBlink\\fR, ...").
    """
    section = roff("uplinkd.toml.5").split("\n.SH KEYS\n", 1)[1].split("\n.SH ", 1)[0]
    documented: dict[str, dict[str, str]] = {}
    tables = [""]
    lines = section.splitlines()
    for index, line in enumerate(lines):
        if line.startswith(".SS "):
            tables = re.findall(r"\[\[?([a-z_.]+)\]?\]", line) or [""]
        elif line == ".TP" and index + 1 < len(lines):
            entry = lines[index + 1]
            for name in re.findall(r"\\fB([a-z_.]+)\\fR(?=, |\s|$)", entry.split(" = ", 1)[0]):
                *sub, key = name.split(".")
                for table in tables:
                    where = ".".join(part for part in (table, *sub) if part)
                    documented.setdefault(where, {})[key] = entry
    return documented


def test_the_parser_is_asked_about_every_table() -> None:
    tables = accepted_tables()
    expected = {"", "monitor", "link", "link.monitor", "link.bandwidth_mbps", "lan", "rule"}
    expected |= {"rule.match", "default", "forward", "firewall", "kernel", "daemon", "mail"}
    assert set(tables) == expected
    assert "interval_ms" in tables["link.monitor"]


def test_every_key_the_parser_accepts_is_in_uplinkd_toml_5() -> None:
    documented = documented_keys()
    missing = [
        f"[{table}] {key}" if table else key
        for table, keys in accepted_tables().items()
        for key in keys
        if key not in documented.get(table, {})
    ]
    assert missing == [], "document these keys in data/man/uplinkd.toml.5 (section KEYS)"


def test_uplinkd_toml_5_documents_no_key_the_parser_refuses() -> None:
    accepted = accepted_tables()
    extra = [
        f"[{table}] {key}"
        for table, keys in documented_keys().items()
        for key in keys
        if key not in accepted.get(table, ())
    ]
    assert extra == []


def toml_text(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return f'"{value}"' if isinstance(value, str) else str(value)


# What the parser makes of an absent key, read from the Config of MINIMAL.
DEFAULTS: dict[tuple[str, str], Callable[[Config], object]] = {
    ("", "backend"): lambda c: c.backend,
    ("link", "gateway"): lambda c: c.links[0].gateway or "auto",
    ("link", "weight"): lambda c: c.links[0].weight,
    ("link", "reliability"): lambda c: c.links[0].reliability,
    ("link", "nat"): lambda c: c.links[0].nat.value,
    ("rule", "by"): lambda c: c.rules[0].by.value,
    ("default", "method"): lambda c: c.default.method.value,
    ("default", "by"): lambda c: c.default.by.value,
    ("forward", "proto"): lambda c: c.forwards[0].proto,
    ("kernel", "mark_mask"): lambda c: f"{c.mark_mask:#010x}",
    ("kernel", "table_base"): lambda c: c.table_base,
    ("kernel", "rule_priority"): lambda c: c.rule_priority,
    ("daemon", "stop_removes_datapath"): lambda c: c.stop_removes_datapath,
}
for _key in ("enabled", "ssh_from_lan", "icmp_rate_per_second"):
    DEFAULTS["firewall", _key] = lambda c, key=_key: getattr(c.firewall, key)
for _key in balanceconf.MONITOR_KEYS:
    for _table in ("monitor", "link.monitor"):
        DEFAULTS[_table, _key] = lambda c, key=_key: getattr(c.links[0].monitor, key)
for _key in ("smtp_server", "sender", "starttls", "username", "password", "max_per_hour"):
    DEFAULTS["mail", _key] = lambda c, key=_key: getattr(c.mail, key)
DEFAULTS["mail", "timeout_s"] = lambda c: c.mail.timeout_s


def test_documented_defaults_are_the_parsers() -> None:
    config = parse(MINIMAL)
    documented = documented_keys()
    wrong = []
    for (table, key), default in DEFAULTS.items():
        entry = documented.get(table, {}).get(key, "")
        found = re.search(r"\(default: (.*)\)$", entry)
        value = default(config)
        expected = value if isinstance(value, str) and value.startswith("0x") else toml_text(value)
        if not found or found.group(1) != expected:
            wrong.append(f"[{table}] {key}: documented {entry!r}, parser default {expected}")
    assert wrong == []


def test_bandwidth_mbps_names_the_methods_that_need_it() -> None:
    entry = roff("uplinkd.toml.5").split("\\fBbandwidth_mbps\\fR = ", 1)[1].split("\n.TP\n", 1)[0]
    missing = [str(method) for method in BANDWIDTH_METHODS if str(method) not in entry]
    assert missing == [], "say in uplinkd.toml(5) which methods need bandwidth_mbps"


def test_the_migration_section_covers_every_balance_conf_option() -> None:
    section = roff("uplinkd.toml.5").split('\n.SH "MIGRATING FROM BALANCE.CONF"\n', 1)[1]
    options = {"mode", "forwarding_group", *balanceconf.MONITOR_KEYS, *balanceconf.IGNORED_KEYS}
    missing = sorted(key for key in options if not re.search(rf"\b{key}\b", section))
    assert missing == []
    for words in ("pre-run/", "routes/", "firewall/", "post-run/", "up.d/", ".pl", ".py"):
        assert words in section


# --- the command-line pages --------------------------------------------------------------------


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_uplinkd_8_documents_every_option() -> None:
    text = roff("uplinkd.8")
    options = roff("uplinkd.8").split("\n.SH OPTIONS\n", 1)[1].split("\n.SH ", 1)[0]
    missing = [o for o in sorted(option_strings(cli.parser())) if f"\\fB{o}\\fR" not in options]
    missing = [o for o in missing if not re.search(rf"^\.BR? .*{re.escape(o)}\b", options, re.M)]
    assert missing == []
    for choice in ("all", "nft", "ip"):
        assert f"\\fB{choice}\\fR" in options
    for section in ("SYNOPSIS", "OPTIONS", "SIGNALS", "FILES", '"EXIT STATUS"', "EXAMPLES"):
        assert f"\n.SH {section}\n" in text
    assert '\n.SH "SEE ALSO"\n' in text
    for words in ("SIGHUP", "SIGTERM", "up.d/", "down.d/", "long_down.d/", "pre-run/", "post-run/"):
        assert words in text
    for code in (0, cli.EXIT_FAILURE, cli.EXIT_BAD_INPUT):
        assert f"\n.TP\n.B {code}\n" in text


def test_uplinkctl_1_documents_every_command_option_and_exit_code() -> None:
    text = roff("uplinkctl.1")
    parser = ctl.parser()
    commands = subcommands(parser)
    assert set(commands) == {"status", "up", "down", "reload", "monitor", "dry-run", "learned"}
    documented = text.split("\n.SH COMMANDS\n", 1)[1].split("\n.SH ", 1)[0]
    for command, sub in commands.items():
        assert re.search(rf"^\.BI? {re.escape(command)}\b", documented, re.M), command
        for option in option_strings(sub) | option_strings(parser):
            assert option in text, f"{command} {option}"
        # Each command has its busctl equivalent.
        assert re.search(rf"^\.BI? \"?uplinkctl {re.escape(command)}\b", text, re.M), command
    codes = [ctl.EXIT_OK, ctl.EXIT_DAEMON_ERROR, ctl.EXIT_USAGE, ctl.EXIT_NOT_RUNNING]
    for code in (*codes, ctl.EXIT_ACCESS_DENIED):
        assert f"\n.TP\n.B {code}\n" in text
    for member in ("GetStatus", "SetLinkEnabled", "Reload", "DryRun"):
        assert f"busctl call $M {member}" in text or f"call $M {member}" in text


# --- rendering -----------------------------------------------------------------------------------


@pytest.mark.skipif(not shutil.which("groff"), reason="groff is not installed (Debian: groff-base)")
@pytest.mark.parametrize("page", PAGES)
def test_the_page_renders_without_groff_warnings(page: str) -> None:
    rendered = subprocess.run(
        ["groff", "-man", "-Tutf8", "-ww", "-z", str(MAN / page)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert (rendered.returncode, rendered.stderr) == (0, "")


@pytest.mark.parametrize("page", PAGES)
def test_the_page_names_itself(page: str) -> None:
    name, section = page.rsplit(".", 1)
    assert re.search(rf"^\.TH {re.escape(name.upper())} {section} ", roff(page), re.M)
