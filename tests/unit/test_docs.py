"""The documents agree with the code and with each other: the packages the scripts install, the
balance.conf path, the D-Bus members."""

from __future__ import annotations

import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAN = ROOT / "data" / "man"


def readme_section(title: str) -> str:
    return README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def man_text(page: str) -> str:
    """A manual page's source with roff's escaped hyphens and unbreakable spaces made plain."""
    return (MAN / page).read_text().replace("\\-", "-").replace("\\~", " ").replace("\\%", "")


# --- packages --------------------------------------------------------------------------------


def script_packages() -> tuple[list[str], list[str]]:
    """quickstart.sh's DEBS, and what .ci/run installs besides."""
    quickstart = (ROOT / "quickstart.sh").read_text()
    debs = re.search(r"^DEBS=\((.*?)\)", quickstart, re.M | re.S)
    assert debs, "quickstart.sh has no DEBS=(...) array"
    ci = (ROOT / ".ci" / "run").read_text()
    ci_packages = [
        word
        for line in re.findall(r"apt-get install (.*)", ci)
        for word in shlex.split(line.split(">", 1)[0])
        if not word.startswith("-") and not word.startswith('"')
    ]
    return debs.group(1).split(), ci_packages


def test_readme_names_every_debian_package_the_scripts_install() -> None:
    debs, ci = script_packages()
    assert len(debs) > 10 and ci == ["network-manager"]  # the parsing still finds them
    quick_start = readme_section("Quick start")
    missing = [package for package in debs + ci if f"`{package}`" not in quick_start]
    assert missing == [], "name these packages in the README's Quick start"


# --- the balance.conf path -------------------------------------------------------------------


def test_unit_file_man_pages_and_readme_give_one_balance_conf_path() -> None:
    documents = [ROOT / "data" / "uplinkd.service", README, *sorted(MAN.iterdir())]
    paths = {
        path: document.name
        for document in documents
        for path in re.findall(r"/etc/[\w/.-]*balance\.conf\b", man_text_or_plain(document))
    }
    assert set(paths) == {"/etc/network/balance.conf"}, paths
    unit = (ROOT / "data" / "uplinkd.service").read_text()
    assert "ExecStart=/usr/sbin/uplinkd --config /etc/network/balance.conf\n" in unit


def man_text_or_plain(document: Path) -> str:
    return man_text(document.name) if document.parent == MAN else document.read_text()


# --- D-Bus ------------------------------------------------------------------------------------


def contract_members() -> dict[str, str]:
    """Every method, signal and property of the XML contract, with its comment."""
    contract = ROOT / "dbus" / "org.uplinkd.Uplinkd1.xml"
    parser = ET.XMLParser(target=ET.TreeBuilder(insert_comments=True))  # noqa: S314 (our file)
    root = ET.fromstring(contract.read_text(), parser)  # noqa: S314
    members = {}
    for interface in root.findall("interface"):
        comment = ""
        for child in interface:
            if child.tag is ET.Comment:
                comment = str(child.text)
            elif child.tag in ("method", "signal", "property"):
                members[str(child.get("name"))] = comment
    return members


def test_dbus_readme_names_every_member_of_the_contract() -> None:
    members = contract_members()
    assert {"GetLearned", "HopLatencyMs", "InterfacesRemoved"} <= set(members)
    readme = (ROOT / "dbus" / "README.md").read_text()
    missing = [name for name in members if not re.search(rf"`{name}\b", readme)]
    assert missing == [], "name these in dbus/README.md"


def test_dbus_readme_gives_every_sentinel_of_the_contract() -> None:
    members = contract_members().items()
    sentinels = [name for name, comment in members if re.search(r"\s-1 when", comment)]
    assert sentinels == ["LatencyMs", "HopLatencyMs"]
    readme = (ROOT / "dbus" / "README.md").read_text()
    for name in sentinels:
        row = re.search(rf"^\| `{name}` \|.*$", readme, re.M)
        assert row and "-1" in row.group(0), name
