"""A network-namespace lab: a LAN client, the router uplinkd runs in, N ISPs and an Internet host.

Used by the demo, the integration tests and the benchmarks. Every namespace it builds is named
``<prefix>-{lan,router,isp<i>,isp<i>h2,isp<i>h3,inet}`` and has no link to the host, so the
traffic it generates (always from inside those namespaces) can only reach addresses of the lab.
``Lab`` is a context manager that tears everything down, also after a half-finished setup;
``cleanup_stale()`` removes what a crashed run left behind (namespaces and the servers and delay
programs still running in them).

Topology (i = 1..N)::

    lan: eth0 192.168.10.2/24 (+ .35 LAN server, + .100.. clients), default via 192.168.10.1
    router: lan0 192.168.10.1/24, wan<i> 10.0.<i>.2/24 (no default route: uplinkd's job)
    isp<i>: down 10.0.<i>.1/24, up 100.64.<i>.2/30, default via 100.64.<i>.1; masquerades what
            leaves `up` and forwards unsolicited inbound to 100.64.<i>.2 on to the router's
            10.0.<i>.2 (so port forwards can be tested from the Internet host)
    inet: lo 203.0.113.10/32 + destinations A 203.0.113.20/32 and B .30/32, isp<i> 100.64.<i>.1/30

With ``hops=True`` two more routers per ISP stand between it and the Internet host, so that
TTL-limited probes through ISP i are answered by hop 1 10.0.<i>.1 (the ISP's box), hop 2
100.64.<i>.1 and hop 3 100.65.<i>.1 (``hop_addresses(i)``)::

    isp<i>h2: down 100.64.<i>.1/30, up 100.65.<i>.2/30, default via 100.65.<i>.1
    isp<i>h3: down 100.65.<i>.1/30, up 100.66.<i>.2/30, default via 100.66.<i>.1
    inet: isp<i> 100.66.<i>.1/30 instead, 100.64.<i>.0/30 routed via 100.66.<i>.2

Link quality (the kernel has no netem): ``latency_ms`` and ``loss_percent`` per ISP are round-trip
figures applied in the ISP namespace to everything it forwards (half the latency and the matching
share of the loss each way; see ``uplinkd_lab.delay``), so they show in every RTT through the ISP,
hops 2 and 3 included, but not in pings of the ISP's own box (hop 1, like a CPE modem).
``bandwidth_mbit`` is a tbf on both directions. ``set_destination_delay`` adds a delay to what
destination A or B (or the Internet host) sends back through a given ISP, so that A can be
faster via ISP1 and B via ISP2. ``uplinkd_lab.quality`` measures: ``ping`` (also with a TTL),
``download`` (bulk TCP), and ``connect_many`` reports connect times.

Subcommands (``python -m uplinkd_lab.lab ...``): ``serve`` (the who-am-I server), ``connect`` (the
client driver, prints JSON), ``wait`` (poll-connect until a server listens): traffic.py's;
``cleanup``, ``up``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Final, NamedTuple, Self

from .delay import DelayProgram
from .quality import DelayLinks, PingReply, PingResult, Quality, Throughput, check_quality
from .traffic import ConnectResult, Server, connect, serve, wait_listening

LAN_CLIENT = "192.168.10.2"
LAN_GATEWAY = "192.168.10.1"
LAN_SERVER = "192.168.10.35"
INET_HOST = "203.0.113.10"
DEST_A = "203.0.113.20"  # destinations for per-ISP delays (set_destination_delay)
DEST_B = "203.0.113.30"
INET_ADDRESSES = (INET_HOST, DEST_A, DEST_B)
BULK_PORT = 5001
DEFAULT_PORTS = (80, 443, 25, 8080)
# Owner files (the pid of the process that built a lab) let cleanup_stale() tell a crashed run
# from a live one running in parallel. Written before the first namespace, removed after the last.
OWNER_DIR = Path("/run/uplinkd-lab")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_NS_RE = re.compile(r"^(?P<prefix>[a-z][a-z0-9]{0,11})-(?:lan|router|inet|isp\d+(?:h[23])?)$")
_DEFAULT_PREFIX_RE = re.compile(r"^ul\d{1,4}(?:n\d{1,5})?$")
_SRC_PYTHONPATH = str(Path(__file__).resolve().parent.parent)


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


# The device events set_device_fault() makes: every kind the kernel reports, and a silent one.
DEVICE_FAULTS: Final = ("admin", "deleted", "renamed", "address", "arp", "carrier")


class WanInfo(NamedTuple):
    device: str  # in the router namespace
    address: str  # the router's address on it
    gateway: str  # the ISP's address on the other end


def _cmd(
    argv: Sequence[str], *, check: bool = True, timeout: float = 30.0, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)!r} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _netns_names() -> list[str]:
    return [line.split()[0] for line in _cmd(["ip", "netns", "list"]).stdout.splitlines() if line]


def _identity(pid: int) -> str | None:
    """``"<pid> <start time>"`` of a running process (None if gone or a zombie): an owner id
    that a reused pid does not match."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in "ZX" else f"{pid} {fields[19]}"


def _owner(prefix: str) -> str | None:
    try:
        return (OWNER_DIR / prefix).read_text().strip() or None
    except OSError:
        return None


def _alive(owner: str) -> bool:
    pid = owner.split(maxsplit=1)[0]
    return pid.isdigit() and _identity(int(pid)) == owner


def _delete_netns(name: str) -> None:
    """Kill every process left in the namespace (else it outlives `ip netns del`), then delete."""
    for pid in _cmd(["ip", "netns", "pids", name], check=False).stdout.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _cmd(["ip", "netns", "del", name], check=False)


def cleanup_stale(prefix: str | None = None, *, force: bool = False) -> list[str]:
    """Remove the namespaces of labs whose owner process is gone; return the names removed.

    With ``prefix``, only that lab's namespaces; without, every lab with an owner file and every
    ``ul<n>-*`` namespace set (the default prefix). A lab whose owner is still alive (this process
    included) is left alone unless ``force``.
    """
    groups: dict[str, list[str]] = {}
    for name in _netns_names():
        m = _NS_RE.match(name)
        if m and (prefix is None or m["prefix"] == prefix):
            groups.setdefault(m["prefix"], []).append(name)
    owned = {p.name for p in OWNER_DIR.glob("*")} if OWNER_DIR.is_dir() else set()
    candidates = {prefix} if prefix is not None else owned | set(groups)
    removed: list[str] = []
    for pfx in sorted(candidates):
        if prefix is None and pfx not in owned and not _DEFAULT_PREFIX_RE.match(pfx):
            continue  # someone else's "x-lan" namespace: never ours to delete
        owner = _owner(pfx)
        if owner is not None and _alive(owner) and not force:
            continue
        for name in groups.get(pfx, []):
            _delete_netns(name)
            removed.append(name)
        (OWNER_DIR / pfx).unlink(missing_ok=True)
    return removed


def _per_isp(value: float | Sequence[float | None] | None, isps: int, name: str) -> list[Any]:
    if value is None or isinstance(value, int | float):
        return [value] * isps
    values = list(value)
    if len(values) != isps:
        raise ValueError(f"{name} needs one entry per ISP")
    return values


class Lab:
    """``with Lab(isps=2, bandwidth_mbit=None) as lab:`` builds the lab and always removes it.

    Per ISP (a number for all, or a list): ``bandwidth_mbit`` (tbf), ``latency_ms`` and
    ``loss_percent`` (round trip, by a delay program: needs the netfilterqueue module and the
    iptables NFQUEUE target, only where non-zero); ``hops=True`` adds hops 2 and 3 per ISP.
    """

    _active: ClassVar[set[str]] = set()  # prefixes of this process's labs that are set up
    _made: ClassVar[int] = 0  # labs this process has made: the second gets a distinct prefix

    @classmethod
    def _default_prefix(cls) -> str:
        cls._made += 1
        number = "" if cls._made == 1 else f"n{cls._made}"
        return f"ul{os.getpid() % 10000}{number}"

    def __init__(
        self,
        isps: int = 2,
        bandwidth_mbit: float | Sequence[float | None] | None = None,
        prefix: str | None = None,
        *,
        latency_ms: float | Sequence[float] = 0.0,
        loss_percent: float | Sequence[float] = 0.0,
        hops: bool = False,
    ) -> None:
        if not 1 <= isps <= 250:
            raise ValueError(f"isps must be 1..250, not {isps}")
        self.prefix = prefix or self._default_prefix()
        if not _PREFIX_RE.match(self.prefix):
            raise ValueError(f"prefix {self.prefix!r} must match {_PREFIX_RE.pattern}")
        self.isps = isps
        self.hops = hops
        self.bandwidth: list[float | None] = _per_isp(bandwidth_mbit, isps, "bandwidth_mbit")
        self._quality = [
            check_quality(lat, loss)
            for lat, loss in zip(
                _per_isp(latency_ms, isps, "latency_ms"),
                _per_isp(loss_percent, isps, "loss_percent"),
                strict=True,
            )
        ]
        self.servers: list[Server] = []
        self._created: list[str] = []
        self._clients = 0
        self._links = DelayLinks(self.run, lambda ns: self._python(ns, module="uplinkd_lab.delay"))
        self._dest_delay: dict[str, dict[int, float]] = {}

    # names and addresses
    @property
    def ns_router(self) -> str:
        return f"{self.prefix}-router"

    @property
    def ns_lan(self) -> str:
        return f"{self.prefix}-lan"

    @property
    def ns_inet(self) -> str:
        return f"{self.prefix}-inet"

    def ns_isp(self, i: int) -> str:
        self._check_isp(i)
        return f"{self.prefix}-isp{i}"

    def ns_hop(self, i: int, hop: int) -> str:
        """The namespace of hop 2 or 3 beyond ISP i (``hops=True`` only)."""
        self._check_isp(i)
        if not self.hops or hop not in {2, 3}:
            raise ValueError(f"no hop {hop} namespace (hops={self.hops})")
        return f"{self.prefix}-isp{i}h{hop}"

    @property
    def namespaces(self) -> list[str]:
        numbers = range(1, self.isps + 1)
        isps = [f"{self.prefix}-isp{i}" for i in numbers]
        if self.hops:
            isps += [f"{self.prefix}-isp{i}h{h}" for i in numbers for h in (2, 3)]
        return [self.ns_lan, self.ns_router, *isps, self.ns_inet]

    def hop_addresses(self, i: int) -> list[str]:
        """Who answers a probe through ISP i with TTL 1, 2, 3 (just hop 1 without ``hops``)."""
        self._check_isp(i)
        return [f"10.0.{i}.1", f"100.64.{i}.1", f"100.65.{i}.1"][: 3 if self.hops else 1]

    @property
    def isp_names(self) -> list[str]:
        return [f"ISP{i}" for i in range(1, self.isps + 1)]

    def router_wan(self, i: int) -> WanInfo:
        self._check_isp(i)
        return WanInfo(f"wan{i}", f"10.0.{i}.2", f"10.0.{i}.1")

    def isp_of(self, address: str) -> str | None:
        """ISP name for its public address 100.64.<i>.2, or for the router's own WAN address
        10.0.<i>.2 (what a server inside an ISP namespace sees); None for anything else."""
        m = re.fullmatch(r"(?:100\.64|10\.0)\.(\d+)\.2", address)
        if m and 1 <= int(m[1]) <= self.isps:
            return f"ISP{int(m[1])}"
        return None

    def _check_isp(self, i: int) -> None:
        if not 1 <= i <= self.isps:
            raise ValueError(f"ISP index {i} out of 1..{self.isps}")

    # lifecycle
    def __enter__(self) -> Self:
        try:
            self.setup()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except LabError as err:
            if exc is None:
                raise
            exc.add_note(f"lab cleanup also failed: {err}")

    def setup(self) -> None:
        owner = _owner(self.prefix)
        busy = owner is not None and owner != _identity(os.getpid()) and _alive(owner)
        if busy or self.prefix in Lab._active:
            raise LabError(f"lab prefix {self.prefix!r} is in use by process {owner}")
        cleanup_stale(self.prefix, force=True)  # leftovers of a crashed run with our prefix
        Lab._active.add(self.prefix)
        OWNER_DIR.mkdir(parents=True, exist_ok=True)
        (OWNER_DIR / self.prefix).write_text(f"{_identity(os.getpid())}\n")
        for ns in self.namespaces:
            _cmd(["ip", "netns", "add", ns])
            self._created.append(ns)
            sysctls = ["net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
            if ns != self.ns_lan:
                sysctls.append("net.ipv4.icmp_ratelimit=0")
            if ns == self.ns_router or "-isp" in ns:
                sysctls.append("net.ipv4.ip_forward=1")
            self.run(ns, "sysctl", "-q", "-w", *sysctls)
            self._ip(ns, "link", "set", "lo", "up")
        lan, router, inet = self.ns_lan, self.ns_router, self.ns_inet
        self._veth((lan, "eth0", f"{LAN_CLIENT}/24"), (router, "lan0", f"{LAN_GATEWAY}/24"))
        self._ip(lan, "addr", "add", f"{LAN_SERVER}/24", "dev", "eth0")
        self._ip(lan, "route", "add", "default", "via", LAN_GATEWAY)
        for address in INET_ADDRESSES:
            self._ip(inet, "addr", "add", f"{address}/32", "dev", "lo")
        for i in range(1, self.isps + 1):
            isp, wan = self.ns_isp(i), self.router_wan(i)
            self._veth(
                (router, wan.device, f"{wan.address}/24"), (isp, "down", f"{wan.gateway}/24")
            )
            if self.hops:
                h2, h3 = self.ns_hop(i, 2), self.ns_hop(i, 3)
                self._veth((isp, "up", f"100.64.{i}.2/30"), (h2, "down", f"100.64.{i}.1/30"))
                self._veth((h2, "up", f"100.65.{i}.2/30"), (h3, "down", f"100.65.{i}.1/30"))
                self._veth((h3, "up", f"100.66.{i}.2/30"), (inet, f"isp{i}", f"100.66.{i}.1/30"))
                self._ip(h2, "route", "add", "default", "via", f"100.65.{i}.1")
                self._ip(h3, "route", "add", "default", "via", f"100.66.{i}.1")
                self._ip(h3, "route", "add", f"100.64.{i}.0/30", "via", f"100.65.{i}.2")
            else:
                self._veth((isp, "up", f"100.64.{i}.2/30"), (inet, f"isp{i}", f"100.64.{i}.1/30"))
            self._ip(isp, "route", "add", "default", "via", f"100.64.{i}.1")
            self._inet_source(i)
            nat = f"""table ip lab {{
                chain prerouting {{
                    type nat hook prerouting priority dstnat; policy accept;
                    iifname "up" ip daddr 100.64.{i}.2 dnat to {wan.address}
                }}
                chain postrouting {{
                    type nat hook postrouting priority srcnat; policy accept;
                    oifname "up" masquerade
                }}
            }}"""
            self.run(isp, "nft", "-f", "-", stdin=nat)
            self.set_bandwidth(i, self.bandwidth[i - 1])
            self._links.set_isp(isp, self._quality[i - 1])

    def close(self) -> None:
        """Stop the delay programs and servers, delete the namespaces; idempotent, raises LabError
        if any namespace remains."""
        self._links.stop()
        for server in self.servers:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                server.stop()
        self.servers.clear()
        for ns in reversed(self._created):
            _delete_netns(ns)
        left = [ns for ns in _netns_names() if ns in self._created]
        self._created = left
        if left:
            raise LabError(f"namespaces not removed: {left}")
        if self.prefix in Lab._active:
            Lab._active.discard(self.prefix)
            (OWNER_DIR / self.prefix).unlink(missing_ok=True)

    # commands
    def _own(self, ns: str) -> str:
        if ns not in self._created:
            raise LabError(f"{ns!r} is not a namespace of this lab")
        return ns

    def _ip(self, ns: str, *argv: str) -> None:
        _cmd(["ip", "-n", self._own(ns), *argv])

    def _veth(self, a: tuple[str, str, str], b: tuple[str, str, str]) -> None:
        """A veth pair between (namespace, device, address/len) ``a`` and ``b``, both up."""
        veth = ["name", a[1], "netns", a[0], "type", "veth", "peer", "name", b[1], "netns", b[0]]
        _cmd(["ip", "link", "add", *veth])  # created in place: no name ever in the host namespace
        for ns, dev, addr in (a, b):
            self._ip(ns, "addr", "add", addr, "dev", dev)
            self._ip(ns, "link", "set", "dev", dev, "up")

    def run(
        self,
        ns: str,
        *argv: str,
        check: bool = True,
        timeout: float = 30.0,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside one of the lab's namespaces (``ip netns exec``)."""
        return _cmd(
            ["ip", "netns", "exec", self._own(ns), *argv], check=check, timeout=timeout, stdin=stdin
        )

    def _python(self, ns: str, *argv: str, module: str = "uplinkd_lab.lab") -> list[str]:
        env = ["env", f"PYTHONPATH={_SRC_PYTHONPATH}", sys.executable, "-m", module]
        return ["ip", "netns", "exec", self._own(ns), *env, *argv]

    def add_client_addresses(self, n: int) -> list[str]:
        """Add ``n`` more secondary addresses 192.168.10.100.. to the LAN client; return them."""
        if self._clients + n > 155:
            raise ValueError("at most 155 client addresses (192.168.10.100-254)")
        addrs = [f"192.168.10.{100 + k}" for k in range(self._clients, self._clients + n)]
        batch = "".join(f"address add {a}/24 dev eth0\n" for a in addrs)
        _cmd(["ip", "-n", self._own(self.ns_lan), "-batch", "-"], stdin=batch)
        self._clients += n
        return addrs

    def set_link(self, i: int, up: bool) -> None:
        """Carrier loss on the router's wan<i>: sets the ISP-side peer ``down`` admin down/up, so
        the router's device stays admin up but goes NO-CARRIER (its routes get ``linkdown``)."""
        self._ip(self.ns_isp(i), "link", "set", "dev", "down", "up" if up else "down")

    def set_device_fault(self, i: int, kind: str, faulty: bool) -> None:
        """One of the device events a real router sees on wan<i>, or its end (`DEVICE_FAULTS`):

        - ``admin``: the router's device set administratively down (ifdown, NetworkManager
          deactivating it): the kernel deletes its routes and refuses new ones;
        - ``deleted``: the device deleted, and recreated with a new ifindex (PPP-style);
        - ``renamed``: the device renamed away (down, rename, up), and back;
        - ``address``: its address removed (DHCP lease expired), and added again;
        - ``arp``: the gateway stops answering ARP (carrier and address stay: a silent failure);
        - ``carrier``: carrier loss (NO-CARRIER), as `set_link`.
        """
        self._check_isp(i)
        router, isp, wan = self.ns_router, self.ns_isp(i), self.router_wan(i)
        present = self._devices(router)
        # Idempotent, like set_link: a repair of what is not broken changes nothing.
        if kind == "admin":
            self._ip(router, "link", "set", "dev", wan.device, "down" if faulty else "up")
        elif kind == "deleted":
            if faulty and wan.device in present:
                self._ip(router, "link", "del", "dev", wan.device)  # its ISP-side peer goes too
            elif not faulty and wan.device not in present:
                pair = (router, wan.device, f"{wan.address}/24"), (isp, "down", f"{wan.gateway}/24")
                self._veth(*pair)
                self.set_bandwidth(i, self.bandwidth[i - 1])
        elif kind == "renamed":
            old, new = (wan.device, f"{wan.device}x") if faulty else (f"{wan.device}x", wan.device)
            if old in present:
                self._ip(router, "link", "set", "dev", old, "down")
                self._ip(router, "link", "set", "dev", old, "name", new)
                self._ip(router, "link", "set", "dev", new, "up")
        elif kind == "address":
            have = f" {wan.address}/24 " in self.run(router, "ip", "-4", "addr", "show").stdout
            if have == faulty:
                verb = "del" if faulty else "add"
                self._ip(router, "addr", verb, f"{wan.address}/24", "dev", wan.device)
        elif kind == "arp":
            self._ip(isp, "link", "set", "dev", "down", "arp", "off" if faulty else "on")
            if faulty:  # forget what the router knows, as a cache entry that ages out would
                self._ip(router, "neigh", "flush", "dev", wan.device)
        elif kind == "carrier":
            self.set_link(i, up=not faulty)
        else:
            raise ValueError(f"unknown device fault {kind!r}; known: {', '.join(DEVICE_FAULTS)}")

    def _devices(self, ns: str) -> set[str]:
        listed = self.run(ns, "ip", "-o", "link", "show").stdout
        return {line.split(": ")[1].split("@")[0] for line in listed.splitlines()}

    def set_upstream(self, i: int, up: bool) -> None:
        """Silent upstream failure of ISP i: the far side of its uplink goes down (the Internet
        host's, or hop 2's), the router keeps carrier and its gateway still answers ARP, but
        nothing gets past the ISP."""
        self._check_isp(i)
        state = "up" if up else "down"
        if self.hops:
            self._ip(self.ns_hop(i, 2), "link", "set", "dev", "down", state)
            return
        self._ip(self.ns_inet, "link", "set", "dev", f"isp{i}", state)
        if up:
            self._inet_source(i)

    def _inet_source(self, i: int) -> None:
        # The Internet host speaks from 203.0.113.10, not from its link addresses.
        if self.hops:
            route = [f"100.64.{i}.0/30", "via", f"100.66.{i}.2", "dev", f"isp{i}"]
        else:
            route = [f"100.64.{i}.0/30", "dev", f"isp{i}", "scope", "link"]
        self._ip(self.ns_inet, "route", "replace", *route, "src", INET_HOST)

    def set_bandwidth(self, i: int, mbit: float | None) -> None:
        """tbf on the egress of ISP i's ``down`` (download) and ``up`` (upload); None removes it."""
        isp = self.ns_isp(i)
        for dev in ("down", "up"):
            if mbit is None:
                self.run(isp, "tc", "qdisc", "del", "dev", dev, "root", check=False)
                continue
            burst = max(4096, int(mbit * 1e6 / 8 / 100))  # bytes: 10 ms worth, at least 32 kbit
            tbf = ["tbf", "rate", f"{mbit:g}mbit", "burst", str(burst), "latency", "50ms"]
            self.run(isp, "tc", "qdisc", "replace", "dev", dev, "root", *tbf)

    # quality
    def quality(self, i: int) -> Quality:
        self._check_isp(i)
        return self._quality[i - 1]

    def set_quality(
        self, i: int, latency_ms: float | None = None, loss_percent: float | None = None
    ) -> None:
        """Change ISP i's round-trip latency and/or loss (None keeps it), effective for the
        packets that reach the ISP from the moment this returns."""
        old = self.quality(i)
        self._quality[i - 1] = check_quality(
            old.latency_ms if latency_ms is None else latency_ms,
            old.loss_percent if loss_percent is None else loss_percent,
        )
        self._links.set_isp(self.ns_isp(i), self._quality[i - 1])

    def set_destination_delay(self, address: str, delays: Mapping[int, float]) -> None:
        """Delay what ``address`` (destination A or B, or the Internet host) sends back through
        ISP i by ``delays[i]`` ms (RTT added); ISPs not named keep theirs (none at first)."""
        if address not in INET_ADDRESSES:
            raise ValueError(f"{address} is not one of the Internet host's {INET_ADDRESSES}")
        for i, ms in delays.items():
            self._check_isp(i)
            check_quality(ms, 0.0)
        for i, ms in delays.items():
            self._links.set_return_delay(self.ns_inet, address, f"isp{i}", ms)
            self._dest_delay.setdefault(address, {})[i] = ms

    def destination_delay(self, address: str) -> dict[int, float]:
        return {i: self._dest_delay.get(address, {}).get(i, 0.0) for i in range(1, self.isps + 1)}

    @property
    def delay_programs(self) -> dict[str, DelayProgram]:
        """The delay programs started (one per namespace that delays anything), by namespace."""
        return dict(self._links.programs)

    def delay_stats(self, ns: str) -> dict[str, Any] | None:
        """Packets seen, dropped and held per queue, and CPU seconds, of ``ns``'s delay program
        (None if it has none)."""
        program = self._links.programs.get(self._own(ns))
        return program.stats() if program else None

    def ping(  # noqa: PLR0917
        self,
        ns: str,
        dst: str,
        count: int = 1,
        source: str | None = None,
        ttl: int = 64,
        interval: float = 0.01,
        timeout: float = 1.0,
    ) -> PingResult:
        """``count`` ICMP echo requests from inside ``ns``, ``interval`` apart, each with ``ttl``
        (a TTL-limited probe's answer is the hop's time-exceeded); waits ``timeout`` s after the
        last. ``source`` selects the source address (and so, with a rule, the link)."""
        argv = ["ping", "--dst", dst, "--count", str(count), "--ttl", str(ttl)]
        argv += ["--interval", str(interval), "--timeout", str(timeout)]
        if source:
            argv += ["--source", source]
        bound = count * interval + timeout + 15.0
        out = _cmd(self._python(ns, *argv, module="uplinkd_lab.quality"), timeout=bound).stdout
        return PingResult([None if r is None else PingReply(**r) for r in json.loads(out)])

    def start_bulk_server(self, ns: str, address: str, port: int = BULK_PORT) -> Server:
        """A server sending zeros to every client as fast as it takes them (for ``download``)."""
        argv = ["bulk", "--address", address, "--port", str(port)]
        return self._start(
            ns, self._python(ns, *argv, module="uplinkd_lab.quality"), address, [port]
        )

    def download(  # noqa: PLR0917
        self,
        ns: str,
        dst: str,
        port: int = BULK_PORT,
        seconds: float = 2.0,
        warmup: float = 0.5,
        source: str | None = None,
    ) -> Throughput:
        """Receive from a bulk server for ``warmup + seconds``; the rate after the warm-up."""
        argv = ["download", "--dst", dst, "--port", str(port), "--seconds", str(seconds)]
        argv += ["--warmup", str(warmup)]
        if source:
            argv += ["--source", source]
        bound = seconds + warmup + 15.0
        out = _cmd(self._python(ns, *argv, module="uplinkd_lab.quality"), timeout=bound).stdout
        return Throughput(**json.loads(out))

    # servers
    def start_server(
        self, ns: str, address: str, ports: Sequence[int] = DEFAULT_PORTS, timeout: float = 5.0
    ) -> Server:
        """Start a who-am-I server and wait (poll-connect from inside ``ns``) until it listens."""
        portlist = ",".join(str(p) for p in ports)
        argv = self._python(ns, "serve", "--address", address, "--ports", portlist)
        return self._start(ns, argv, address, ports, timeout)

    def _start(
        self, ns: str, argv: list[str], address: str, ports: Sequence[int], timeout: float = 5.0
    ) -> Server:
        portlist = ",".join(str(p) for p in ports)
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        server = Server(proc, ns, address, list(ports))
        self.servers.append(server)
        probe = "127.0.0.1" if address == "0.0.0.0" else address  # noqa: S104
        deadline = time.monotonic() + timeout
        while True:
            if not server.running:
                err = proc.stderr.read() if proc.stderr else ""
                raise LabError(f"server in {ns} on {address}:{portlist} exited: {err.strip()}")
            wait = ["wait", "--address", probe, "--ports", portlist, "--timeout", "0.5"]
            if subprocess.run(self._python(ns, *wait), check=False, timeout=10).returncode == 0:
                return server
            if time.monotonic() > deadline:
                raise LabError(f"server in {ns} on {address}:{portlist} not listening")

    def connect_many(  # noqa: PLR0917 (the call shape tests use)
        self,
        ns: str,
        dst: str,
        port: int,
        count: int,
        sources: Sequence[str] | None = None,
        timeout: float = 2.0,
        deadline: float | None = None,
    ) -> ConnectResult:
        """``count`` sequential new TCP connections (per source address, round robin over the
        sources) from inside ``ns``; each bounded by ``timeout``, all by ``deadline`` seconds
        (default ``min(attempts * timeout, 120)``; attempts past it count as failed)."""
        attempts = count * max(1, len(sources or []))
        total = deadline if deadline is not None else max(timeout, min(attempts * timeout, 120.0))
        argv = ["connect", "--dst", dst, "--port", str(port), "--count", str(count)]
        argv += ["--timeout", str(timeout), "--deadline", str(total)]
        if sources:
            argv += ["--sources", ",".join(sources)]
        proc = _cmd(self._python(ns, *argv), timeout=total + 15.0)
        data = json.loads(proc.stdout)
        return ConnectResult(
            data["results"], data["errors"], data["elapsed_s"], self, data["connect_ms"]
        )


def _floats(text: str) -> float | list[float]:
    values = [float(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uplinkd_lab.lab", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    ports_arg = {"type": lambda s: [int(p) for p in s.split(",")], "default": list(DEFAULT_PORTS)}
    p = sub.add_parser("serve", help="who-am-I TCP server")
    p.add_argument("--address", default="0.0.0.0")  # noqa: S104
    p.add_argument("--ports", **ports_arg)  # type: ignore[arg-type]
    p = sub.add_parser("wait", help="poll-connect until every port accepts")
    p.add_argument("--address", required=True)
    p.add_argument("--ports", **ports_arg)  # type: ignore[arg-type]
    p.add_argument("--timeout", type=float, default=5.0)
    p = sub.add_parser("connect", help="sequential connections to a who-am-I server, JSON out")
    p.add_argument("--dst", required=True)
    p.add_argument("--port", type=int, default=80)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--sources", type=lambda s: s.split(","), default=[])
    p.add_argument("--timeout", type=float, default=2.0)
    p.add_argument("--deadline", type=float, default=120.0)
    p = sub.add_parser("cleanup", help="remove leftovers of crashed labs")
    p.add_argument("--prefix")
    p.add_argument("--force", action="store_true")
    p = sub.add_parser("up", help="build a lab with servers and hold it until interrupted")
    p.add_argument("--isps", type=int, default=2)
    p.add_argument("--bandwidth-mbit", type=float)
    each = "round trip: one for all ISPs, or a comma-separated one each"
    p.add_argument("--latency-ms", type=_floats, default=0.0, help=each)
    p.add_argument("--loss-percent", type=_floats, default=0.0, help=each)
    p.add_argument("--hops", action="store_true", help="hops 2 and 3 beyond each ISP")
    p.add_argument("--prefix")
    args = parser.parse_args(argv)
    if args.cmd == "serve":
        serve(args.address, args.ports)
    elif args.cmd == "wait":
        return 0 if wait_listening(args.address, args.ports, args.timeout) else 1
    elif args.cmd == "connect":
        opts = {"sources": args.sources, "timeout": args.timeout, "deadline": args.deadline}
        print(json.dumps(connect(args.dst, args.port, args.count, **opts)))
    elif args.cmd == "cleanup":
        print("\n".join(cleanup_stale(args.prefix, force=args.force)))
    else:
        quality = {"latency_ms": args.latency_ms, "loss_percent": args.loss_percent}
        with Lab(args.isps, args.bandwidth_mbit, args.prefix, hops=args.hops, **quality) as lab:
            lab.start_server(lab.ns_inet, INET_HOST)
            print("namespaces:", " ".join(lab.namespaces), "- Ctrl-C removes them", flush=True)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
