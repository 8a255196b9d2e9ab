"""The documents agree with the code and with each other: the packages the scripts install, the
balance.conf path, the D-Bus members, the figures quoted for Net-ISP-Balance's link monitoring and
what uplinkd's own window makes of them."""

from __future__ import annotations

import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

from uplinkd import const
from uplinkd.config.model import Monitor
from uplinkd.monitor.link import Link, LinkState

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
MAN = ROOT / "data" / "man"

# What load_balance.pl writes into foolsm's lsm.conf when balance.conf sets none of these keys:
# Net::ISP::Balance 1.33, lsm_config_text(). (Its POD and example balance.conf still show foolsm's
# compiled-in 15/7/5/10 and a 1000 ms timeout, which lsm.conf overrides.)
NET_ISP_BALANCE = {
    "interval_ms": 1000,
    "timeout_ms": 500,
    "max_packet_loss": 20,
    "max_successive_pkts_lost": 7,
    "min_packet_loss": 10,
    "min_successive_pkts_rcvd": 5,
    "long_down_time": 120,
}
FOOLSM_WINDOW = 100  # FOLLOWED_PKTS in foolsm's defs.h: the percentages are counts of these


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


# --- Net-ISP-Balance's monitoring figures ----------------------------------------------------


def assignments(text: str) -> dict[str, int]:
    """Every `key=N` for the monitoring keys in text (later ones win)."""
    keys = "|".join(NET_ISP_BALANCE)
    return {key: int(value) for key, value in re.findall(rf"\b({keys})=(\d+)", text)}


def test_readme_quotes_net_isp_balance_figures() -> None:
    section = readme_section("Link monitoring")
    table = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| (\d+) \|", section, re.M))
    assert {key: int(table[key]) for key in NET_ISP_BALANCE} == NET_ISP_BALANCE
    assert assignments(section) == NET_ISP_BALANCE  # the settings to keep its timing


def test_uplinkd_toml_5_quotes_net_isp_balance_figures() -> None:
    text = man_text("uplinkd.toml.5")
    keys_section = text.split("\n.SH KEYS\n", 1)[1].split("\n.SH ", 1)[0]
    monitor = keys_section.split('.SS "[monitor]', 1)[1].split("\n.SS ", 1)[0]
    bracketed = {}
    for entry in monitor.split("\n.TP\n")[1:]:
        name = re.match(r"\\fB(\w+)\\fR", entry)
        value = re.search(r"\[(\d+)", entry)
        if name and value:
            bracketed[name.group(1)] = int(value.group(1))
    assert bracketed == NET_ISP_BALANCE
    migration = text.split('\n.SH "MIGRATING FROM BALANCE.CONF"\n', 1)[1].split("\n.SH ", 1)[0]
    assert assignments(migration) == NET_ISP_BALANCE


def test_example_balance_conf_and_model_quote_net_isp_balance_figures() -> None:
    example = (ROOT / "data" / "examples" / "balance.conf").read_text()
    commented = assignments("\n".join(re.findall(r"^#(\w+=\d+)", example, re.M)))
    given = assignments("\n".join(re.findall(r"^(\w+=\d+)", example, re.M)))
    assert commented | given == NET_ISP_BALANCE
    model = (ROOT / "daemon" / "uplinkd" / "config" / "model.py").read_text()
    in_comments = {
        key: int(value)
        for key, value in re.findall(r"^    (\w+): int = \d+  #\D*(\d+)", model, re.M)
        if key in NET_ISP_BALANCE
    }
    assert in_comments == NET_ISP_BALANCE


def rounds_to_recover(monitor: Monitor) -> int:
    """Answered rounds a link needs to come back after an outage that filled the loss window."""
    link = Link("ISP1", monitor, ["192.0.2.1"], 1, now=0.0)
    now = 0.0
    step = monitor.interval_ms / 1000
    for answered in [True] * 30 + [False] * 2 * const.LOSS_WINDOW_ROUNDS:
        now += step
        link.probe_round({"192.0.2.1": 5.0 if answered else None}, now)
    assert link.state is LinkState.DOWN
    for count in range(1, 1000):
        now += step
        if link.probe_round({"192.0.2.1": 5.0}, now):
            assert link.state is LinkState.UP
            return count
    raise AssertionError("the link never came back")


def test_the_recovery_times_the_docs_give_are_link_pys_and_foolsms() -> None:
    """Net-ISP-Balance's numbers over uplinkd's 20-round window and over foolsm's 100 probes."""
    monitor = Monitor(**NET_ISP_BALANCE)
    uplinkd_rounds = rounds_to_recover(monitor)
    foolsm_probes = FOOLSM_WINDOW * (100 - monitor.min_packet_loss) // 100
    assert (const.LOSS_WINDOW_ROUNDS, uplinkd_rounds, foolsm_probes) == (20, 18, 90)
    interval_s = monitor.interval_ms // 1000
    lost_to_go_down = monitor.max_packet_loss * const.LOSS_WINDOW_ROUNDS // 100
    claims = [
        f"{uplinkd_rounds} rounds in a row",
        f"{(uplinkd_rounds - 1) * interval_s} s after the first answer",
        f"up to {uplinkd_rounds * interval_s} s after the path returned",
        f"{foolsm_probes} probes",
        f"{(foolsm_probes - 1) * interval_s} s after the first answer",
        f"up to {(foolsm_probes + 1) * interval_s} s after the path returned",
        f"{lost_to_go_down} lost rounds among the last {const.LOSS_WINDOW_ROUNDS}",
    ]
    readme = " ".join(readme_section("Link monitoring").split())
    migration = man_text("uplinkd.toml.5").split('\n.SH "MIGRATING FROM BALANCE.CONF"\n', 1)[1]
    migration = " ".join(migration.split("\n.SH ", 1)[0].split())
    for claim in claims:
        assert claim in readme, f"README: {claim}"
        assert claim in migration, f"uplinkd.toml(5): {claim}"
