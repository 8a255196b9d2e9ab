"""A private dbus-daemon that is a system bus in all but name, with uplinkd's own policy file.

The socket is a path in a world-reachable temporary directory (not under pytest's 0700
tmp_path): `nobody` can reach it, and so can a process in another network namespace, which an
abstract socket would not allow.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .conftest import first_line

REPO = Path(__file__).resolve().parents[2]
POLICY = REPO / "dbus" / "org.uplinkd.Uplinkd1.conf"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0

# Debian's system.conf without the daemon-wide parts (user, fork, pid file, activation): deny by
# default, so only what the policy directory allows gets through. The reply limit is raised from
# the system bus default (128 pending per connection) for test_bus.py's 1000 calls in flight.
BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <deny send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"
          send_member="UpdateActivationEnvironment"/>
  </policy>
  <limit name="max_replies_per_connection">4096</limit>
  <includedir>{policy_dir}</includedir>
</busconfig>
"""


@dataclass(frozen=True)
class PrivateBus:
    address: str  # as dbus-daemon printed it: unix:path=<tmp>/bus,guid=...
    pid: int  # dbus-daemon's


@contextmanager
def private_bus(admin_group: str | None = None) -> Iterator[PrivateBus]:
    """A running dbus-daemon; stopped and its directory removed on exit.

    `admin_group` rewrites the policy's administrators' group, as meson's admin_group option
    does at install; otherwise the policy is an exact copy of dbus/org.uplinkd.Uplinkd1.conf.
    """
    tmp = Path(tempfile.mkdtemp(prefix="uplinkd-bus-"))
    proc: subprocess.Popen[str] | None = None
    try:
        tmp.chmod(0o755)
        (policy_dir := tmp / "system.d").mkdir()
        policy = POLICY.read_text()
        if admin_group is not None:
            policy = policy.replace('group="netdev"', f'group="{admin_group}"')
        (policy_dir / POLICY.name).write_text(policy)
        config = tmp / "bus.conf"
        config.write_text(BUS_CONFIG.format(socket=tmp / "bus", policy_dir=policy_dir))
        proc = subprocess.Popen(
            ["dbus-daemon", f"--config-file={config}", "--nofork", "--print-address=1"],
            stdout=subprocess.PIPE,
            text=True,
        )
        address = first_line(proc, START_TIMEOUT_S).strip()
        assert address.startswith("unix:"), f"dbus-daemon did not start: {address!r}"
        (tmp / "bus").chmod(0o666)
        yield PrivateBus(address, proc.pid)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT_S)
            if proc.stdout is not None:
                proc.stdout.close()
        shutil.rmtree(tmp, ignore_errors=True)
