"""Dry run, idempotent applies, --stop, and bad input against a running state (root)."""

from __future__ import annotations

import signal

import pytest
from uplinkd_lab.lab import INET_HOST, Lab

from .conftest import TWO_LINKS, Uplinkd, needs_root

pytestmark = [needs_root, pytest.mark.lab]

FOREIGN_NFT = """table inet admin {
    chain forward {
        type filter hook forward priority 10; policy accept;
        tcp dport 9999 counter accept
    }
}
"""


def _foreign_state(lab: Lab) -> str:
    r = lab.ns_router
    return "\n".join(
        [
            lab.run(r, "nft", "list", "table", "inet", "admin").stdout,
            lab.run(r, "ip", "rule", "show", "priority", "500").stdout,
            lab.run(r, "ip", "route", "show", "table", "77").stdout,
            lab.run(r, "ip", "route", "show", "table", "main").stdout,
        ]
    )


def test_apply_twice_changes_nothing_and_stop_leaves_foreign_state(
    lab2: Lab, uplinkd: Uplinkd
) -> None:
    r = lab2.ns_router
    lab2.run(r, "nft", "-f", "-", stdin=FOREIGN_NFT)
    lab2.run(r, "ip", "rule", "add", "priority", "500", "from", "192.0.2.0/24", "lookup", "77")
    lab2.run(r, "ip", "route", "add", "198.51.100.0/24", "via", "10.0.1.1", "table", "77")
    try:
        foreign = _foreign_state(lab2)
        config = uplinkd.write_config(TWO_LINKS.format(w1=1, w2=3))
        first = uplinkd.run(config, "--once")
        assert "netfilter: full" in first.stderr
        state = uplinkd.kernel_state()
        second = uplinkd.run(config, "--once")
        assert "netfilter: none; routes +0/-0; rules +0/-0; sysctls changed: 0" in second.stderr
        assert uplinkd.kernel_state() == state
        assert "table inet uplinkd" in state

        uplinkd.run(config, "--stop")
        after = uplinkd.kernel_state()
        assert "uplinkd" not in after
        assert "proto 213" not in lab2.run(r, "ip", "rule", "show").stdout
        assert lab2.run(r, "ip", "route", "show", "table", "201").stdout == ""
        assert _foreign_state(lab2) == foreign
    finally:
        lab2.run(r, "nft", "delete", "table", "inet", "admin", check=False)
        lab2.run(r, "ip", "rule", "del", "priority", "500", check=False)
        lab2.run(r, "ip", "route", "flush", "table", "77", check=False)


def test_dry_run_changes_nothing_and_its_output_applies(lab2: Lab, uplinkd: Uplinkd) -> None:
    config = uplinkd.write_config(TWO_LINKS.format(w1=1, w2=3))
    before = uplinkd.kernel_state()
    nft_text = uplinkd.run(config, "-d", "--part", "nft").stdout
    ip_text = uplinkd.run(config, "-d", "--part", "ip").stdout
    full = uplinkd.run(config, "-d").stdout
    assert uplinkd.kernel_state() == before
    assert nft_text in full and ip_text in full

    # Fed by hand to nft -f and ip -batch, the output gives the same datapath as --once.
    r = lab2.ns_router
    lab2.run(r, "nft", "-f", "-", stdin=nft_text)
    lab2.run(r, "ip", "-batch", "-", stdin=ip_text)
    by_hand = uplinkd.kernel_state()
    result = lab2.connect_many(lab2.ns_lan, INET_HOST, 80, 400)
    assert result.failed == 0 and min(result.counts_by_isp().values()) > 40
    again = uplinkd.run(config, "--once")
    assert "netfilter: none; routes +0/-0; rules +0/-0" in again.stderr
    assert uplinkd.kernel_state() == by_hand


def test_dry_run_runs_no_python_hook_and_says_so(lab2: Lab, uplinkd: Uplinkd) -> None:
    config = uplinkd.write_config(TWO_LINKS.format(w1=1, w2=3))
    marker = uplinkd.workdir / "hook-ran"
    hook = uplinkd.workdir / "post-run" / "10.side-effect.py"
    hook.parent.mkdir()
    # A hook may do more than describe state; here it leaves a file and runs a command.
    hook.write_text(
        f'open("{marker}", "w").close()\n'
        "import subprocess\n"
        'subprocess.run(["ip", "route", "add", "198.51.100.0/24", "dev", "lan0"], check=True)\n'
        'B.forward(8080, "192.168.10.35")\n'
    )
    before = uplinkd.kernel_state()
    for part in ((), ("--part", "nft"), ("--part", "ip")):
        shown = uplinkd.run(config, "-d", *part).stdout
        assert shown.startswith(
            "# .py hooks not run in a dry run (it changes nothing, and a hook may); "
            f"what they add is missing below:\n#   {hook}\n"
        )
        assert "8080" not in shown
    assert not marker.exists()
    assert uplinkd.kernel_state() == before
    # The comment keeps the output fit for the tools it feeds.
    nft_text = uplinkd.run(config, "-d", "--part", "nft").stdout
    lab2.run(lab2.ns_router, "nft", "-c", "-f", "-", stdin=nft_text)
    # Applying runs it, as before.
    uplinkd.run(config, "--once")
    assert marker.exists()
    assert "8080" in lab2.run(lab2.ns_router, "nft", "list", "table", "inet", "uplinkd").stdout
    lab2.run(lab2.ns_router, "ip", "route", "del", "198.51.100.0/24", "dev", "lan0")


BAD_CONFIGS = {
    "malformed toml": ("[[link]\nname = 'x'\n", "uplinkd.toml:1"),
    "unknown link in rule": (
        TWO_LINKS.format(w1=1, w2=1)
        + '\n[[rule]]\nname = "r"\nmethod = "priority"\nlinks = ["ISP9"]\n',
        "ISP9",
    ),
    "weight zero": (TWO_LINKS.format(w1=0, w2=1), "weight"),
    "unknown method": (
        TWO_LINKS.format(w1=1, w2=1) + '\n[default]\nmethod = "fastest"\n',
        "method",
    ),
    "duplicate names": (TWO_LINKS.format(w1=1, w2=1).replace('"ISP2"', '"ISP1"'), "ISP1"),
    "missing device": (TWO_LINKS.format(w1=1, w2=1).replace('device = "wan2"\n', ""), "device"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configuration_is_refused_and_running_state_kept(
    lab2: Lab, uplinkd: Uplinkd, case: str
) -> None:
    good = uplinkd.write_config(TWO_LINKS.format(w1=1, w2=3))
    uplinkd.run(good, "--once")
    running = uplinkd.kernel_state()
    text, named = BAD_CONFIGS[case]
    bad = uplinkd.write_config(text, "bad.toml" if case != "malformed toml" else "uplinkd.toml")
    for argv in (("--once",), ("-d",)):
        result = uplinkd.run(bad, *argv, check=False)
        assert result.returncode == 2, result.stderr
        assert str(bad) in result.stderr and named in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert uplinkd.kernel_state() == running


def test_bad_balance_conf_names_file_and_line(uplinkd: Uplinkd) -> None:
    bad = uplinkd.write_config(
        "CABLE wan1 isp 203.0.113.10 1\nDSL wan2 isp 203.0.113.10 -2\nLAN lan0 lan\n",
        "balance.conf",
    )
    result = uplinkd.run(bad, "--once", check=False)
    assert result.returncode == 2
    assert f"{bad}:2" in result.stderr and "weight" in result.stderr, result.stderr


def test_bad_python_hook_refuses_the_apply(lab2: Lab, uplinkd: Uplinkd) -> None:
    config = uplinkd.write_config(TWO_LINKS.format(w1=1, w2=3))
    uplinkd.run(config, "--once")
    running = uplinkd.kernel_state()
    post = uplinkd.workdir / "post-run"
    post.mkdir()
    (post / "10.broken.py").write_text(
        'B.forward(80, "192.168.10.35")\nB.forward(81, "not-an-ip")\n'
    )
    config.write_text(TWO_LINKS.format(w1=1, w2=1))  # a change that would rebuild
    result = uplinkd.run(config, "--once", check=False)
    assert result.returncode == 2
    assert f"{post / '10.broken.py'}:2" in result.stderr, result.stderr
    assert uplinkd.kernel_state() == running


def test_bad_nft_hook_line_is_named_and_nothing_applied(lab2: Lab, uplinkd: Uplinkd) -> None:
    config = uplinkd.write_config(TWO_LINKS.format(w1=1, w2=3))
    uplinkd.run(config, "--once")
    running = uplinkd.kernel_state()
    firewall = uplinkd.workdir / "firewall"
    firewall.mkdir()
    (firewall / "01.rules").write_text(
        "add chain inet uplinkd extra\nadd rule inet uplinkd extra tcp dport 1 bogus-verdict\n"
    )
    result = uplinkd.run(config, "--once", check=False)
    assert result.returncode == 2
    assert f"{firewall / '01.rules'}:2" in result.stderr, result.stderr
    assert uplinkd.kernel_state() == running


def test_daemon_reload_keeps_running_configuration_when_new_one_is_bad(
    lab2: Lab, uplinkd: Uplinkd
) -> None:
    config = uplinkd.write_config(TWO_LINKS.format(w1=1, w2=3))
    daemon = uplinkd.start(config)
    log = daemon.log
    try:
        assert log.wait_for("applied generation 1"), log.text
        running = uplinkd.kernel_state()
        config.write_text("[[link]\n")
        daemon.send(signal.SIGHUP)
        assert log.wait_for("reload refused, keeping the running configuration"), log.text
        assert str(config) in log.text
        assert daemon.running
        assert uplinkd.kernel_state() == running
        result = lab2.connect_many(lab2.ns_lan, INET_HOST, 80, 100)
        assert result.failed == 0

        config.write_text(TWO_LINKS.format(w1=1, w2=1))  # a good reload is applied
        daemon.send(signal.SIGHUP)
        assert log.wait_for("applied generation 2"), log.text
    finally:
        daemon.stop()
    assert log.wait_for("datapath left in place"), log.text
    assert "table inet uplinkd" in uplinkd.kernel_state()  # traffic keeps flowing after SIGTERM


def test_link_without_ipv4_address_is_left_out_with_a_warning(lab2: Lab, uplinkd: Uplinkd) -> None:
    r = lab2.ns_router
    lab2.run(r, "ip", "link", "add", "wan3", "type", "veth", "peer", "name", "wan3peer")
    try:
        text = TWO_LINKS.format(w1=1, w2=1) + '\n[[link]]\nname = "ISP3"\ndevice = "wan3"\n'
        result = uplinkd.run(uplinkd.write_config(text), "--once")
        assert "ISP3" in result.stderr and "wan3" in result.stderr, result.stderr
        assert "no IPv4 address" in result.stderr
        shares = lab2.connect_many(lab2.ns_lan, INET_HOST, 80, 200).counts_by_isp()
        assert shares["ISP1"] > 50 and shares["ISP2"] > 50, shares
    finally:
        lab2.run(r, "ip", "link", "del", "wan3", check=False)


def test_no_usable_link_applies_nothing(lab2: Lab, uplinkd: Uplinkd) -> None:
    before = uplinkd.kernel_state()
    text = (
        TWO_LINKS.format(w1=1, w2=1).replace('"wan1"', '"nowhere1"').replace('"wan2"', '"nowhere2"')
    )
    result = uplinkd.run(uplinkd.write_config(text), "--once", check=False)
    assert result.returncode == 1
    assert "no link has a usable device; nothing applied" in result.stderr
    assert "device nowhere1 does not exist" in result.stderr
    assert uplinkd.kernel_state() == before
