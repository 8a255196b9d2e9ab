"""The probe settings the failover benchmark compares, and its lab configuration.

- ``uplinkd``: uplinkd's defaults (model.Monitor()), written as no [monitor] table at all;
- ``foolsm``: foolsm as a Net-ISP-Balance router runs it: the lsm.conf that load_balance.pl 1.33
  writes (1000 ms interval, 500 ms timeout, 20 % or 7 in a row to go down, at most 10 % and 5 in
  a row to come back, long_down_time 120; model.py names them). foolsm's compiled-in defaults
  (1000 ms timeout, 15 %, 10 in a row, 5 %), which Net-ISP-Balance's documentation quotes, are
  overridden by that file. uplinkd applies the percentages to its 20-round window, not foolsm's
  100 probes, so this models the settings, not foolsm (whose recovery after a long outage takes
  90 answered probes, up to 91 s: see the README);
- ``mwan3``: a model of mwan3 (OpenWrt) with mwan3track's defaults: a ping every 10 s
  (``interval``) with a 4 s ``timeout``, offline after 5 failures in a row (``down``), online
  after 5 successes in a row (``up``). mwan3 has no loss-percentage rules (without
  check_quality), so the model switches uplinkd's off: ``max_packet_loss`` 100 could only fire
  after 20 lost rounds (the 5-in-a-row rule fires first) and ``min_packet_loss`` 99 holds
  whenever one round of the last 20 answered (5 in a row are required anyway). It models the
  settings, not the program: mwan3track sleeps ``interval`` after each ping, so a lost ping
  stretches its cycle to 14 s where uplinkd keeps a fixed cadence; the real mwan3 is slower.

All three run in uplinkd, so uplinkd's netlink carrier watch is on in each: a carrier loss is
seen at once whatever the probe settings.
"""

from __future__ import annotations

from dataclasses import asdict, fields

from uplinkd.config.model import Monitor
from uplinkd_lab.lab import INET_HOST

SETTINGS: dict[str, Monitor] = {
    "uplinkd": Monitor(),
    "foolsm": Monitor(
        interval_ms=1000,
        timeout_ms=500,
        max_packet_loss=20,
        max_successive_pkts_lost=7,
        min_packet_loss=10,
        min_successive_pkts_rcvd=5,
        long_down_time=120,
    ),
    "mwan3": Monitor(
        interval_ms=10_000,
        timeout_ms=4000,
        max_packet_loss=100,
        max_successive_pkts_lost=5,
        min_packet_loss=99,
        min_successive_pkts_rcvd=5,
    ),
}

# Failover mode: ISP1 carries every new connection while it is up, ISP2 is the standby; both
# probe the Internet host through themselves (a silent upstream failure shows only beyond the
# gateway).
LINKS = f"""
[[link]]
name = "ISP1"
device = "wan1"
priority = 1
targets = ["{INET_HOST}"]

[[link]]
name = "ISP2"
device = "wan2"
priority = 2
targets = ["{INET_HOST}"]

[[lan]]
name = "LAN"
device = "lan0"

[default]
method = "priority"
"""


def interval_s(name: str) -> float:
    return SETTINGS[name].interval_ms / 1000


def monitor_toml(monitor: Monitor) -> str:
    if monitor == Monitor():
        return ""  # the defaults, as a user who configures nothing gets them
    values = {f.name: getattr(monitor, f.name) for f in fields(monitor)}
    lines = [f"{key} = {value}" for key, value in values.items() if isinstance(value, int)]
    return "[monitor]\n" + "\n".join(lines) + "\n"


def config_text(name: str) -> str:
    return monitor_toml(SETTINGS[name]) + LINKS


def describe() -> dict[str, dict[str, object]]:
    return {name: asdict(monitor) for name, monitor in SETTINGS.items()}
