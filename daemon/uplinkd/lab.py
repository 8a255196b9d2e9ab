"""A network-namespace lab: a LAN client, the router uplinkd runs in, N ISPs and an Internet host.

Used by the demo, the integration tests and the benchmarks. Every namespace it builds is named
``<prefix>-{lan,router,isp<i>,inet}`` and has no link to the host, so the traffic it generates
(always from inside those namespaces) can only reach addresses of the lab. ``Lab`` is a context
manager that tears everything down, also after a half-finished setup; ``cleanup_stale()`` removes
what a crashed run left behind (namespaces and the servers still running in them).

Topology (i = 1..N)::

    lan: eth0 192.168.10.2/24 (+ .35 LAN server, + .100.. clients), default via 192.168.10.1
    router: lan0 192.168.10.1/24, wan<i> 10.0.<i>.2/24 (no default route: uplinkd's job)
    isp<i>: down 10.0.<i>.1/24, up 100.64.<i>.2/30, default via 100.64.<i>.1; masquerades what
            leaves `up` and forwards unsolicited inbound to 100.64.<i>.2 on to the router's
            10.0.<i>.2 (so port forwards can be tested from the Internet host)
    inet: lo 203.0.113.10/32, isp<i> 100.64.<i>.1/30

Subcommands (``python -m uplinkd.lab ...``): ``serve`` (the who-am-I server), ``connect`` (the
client driver, prints JSON), ``wait`` (poll-connect until a server listens), ``cleanup``, ``up``.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import os
import re
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import ClassVar, NamedTuple, Self

LAN_CLIENT = "192.168.10.2"
LAN_GATEWAY = "192.168.10.1"
LAN_SERVER = "192.168.10.35"
INET_HOST = "203.0.113.10"
DEFAULT_PORTS = (80, 443, 25, 8080)
# Owner files (the pid of the process that built a lab) let cleanup_stale() tell a crashed run
# from a live one running in parallel. Written before the first namespace, removed after the last.
OWNER_DIR = Path("/run/uplinkd-lab")
_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_NS_RE = re.compile(r"^(?P<prefix>[a-z][a-z0-9]{0,11})-(?:lan|router|inet|isp\d+)$")
_DEFAULT_PREFIX_RE = re.compile(r"^ul\d{1,4}(?:n\d{1,5})?$")
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
_SRC_PYTHONPATH = str(Path(__file__).resolve().parent.parent)


class LabError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


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


@dataclass
class ConnectResult:
    """Per source address (``"default"`` when unbound), in order, what the server reported seeing
    as the client's address, or None for a failed connection; ``errors`` counts failures by kind."""

    results: dict[str, list[str | None]]
    errors: dict[str, int]
    elapsed_s: float
    lab: Lab | None = field(default=None, repr=False, compare=False)

    @property
    def seen(self) -> dict[str, list[str]]:
        return {src: [a for a in out if a is not None] for src, out in self.results.items()}

    @property
    def addresses(self) -> list[str]:
        return [a for out in self.seen.values() for a in out]

    @property
    def ok(self) -> int:
        return len(self.addresses)

    @property
    def failed(self) -> int:
        return sum(a is None for out in self.results.values() for a in out)

    def counts_by_isp(self, lab: Lab | None = None, source: str | None = None) -> dict[str, int]:
        """Successful connections per ISP name (every ISP listed, zeros included); addresses no
        ISP owns are counted under ``"other"`` (present only if any)."""
        lab = lab or self.lab
        if lab is None:
            raise ValueError("counts_by_isp needs the Lab that produced the result")
        counts = dict.fromkeys(lab.isp_names, 0)
        addrs = self.addresses if source is None else self.seen.get(source, [])
        for addr in addrs:
            isp = lab.isp_of(addr) or "other"
            counts[isp] = counts.get(isp, 0) + 1
        return counts

    def shares(self, lab: Lab | None = None, source: str | None = None) -> dict[str, float]:
        """Fraction of the successful connections per ISP (all zeros if none succeeded)."""
        counts = self.counts_by_isp(lab, source)
        total = sum(counts.values())
        return {isp: (n / total if total else 0.0) for isp, n in counts.items()}


class Server:
    """A who-am-I server process inside a namespace; ``Lab`` stops it on cleanup."""

    def __init__(
        self, proc: subprocess.Popen[str], ns: str, address: str, ports: list[int]
    ) -> None:
        self.proc, self.ns, self.address, self.ports = proc, ns, address, ports

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        if self.running:
            self.proc.terminate()
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(2.0)
        if self.proc.stderr:
            self.proc.stderr.close()


class Lab:
    """``with Lab(isps=2, bandwidth_mbit=None) as lab:`` builds the lab and always removes it."""

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
    ) -> None:
        if not 1 <= isps <= 250:
            raise ValueError(f"isps must be 1..250, not {isps}")
        self.prefix = prefix or self._default_prefix()
        if not _PREFIX_RE.match(self.prefix):
            raise ValueError(f"prefix {self.prefix!r} must match {_PREFIX_RE.pattern}")
        self.isps = isps
        if bandwidth_mbit is None or isinstance(bandwidth_mbit, int | float):
            self.bandwidth: list[float | None] = [bandwidth_mbit] * isps
        else:
            self.bandwidth = list(bandwidth_mbit)
            if len(self.bandwidth) != isps:
                raise ValueError("bandwidth_mbit needs one entry per ISP")
        self.servers: list[Server] = []
        self._created: list[str] = []
        self._clients = 0

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

    @property
    def namespaces(self) -> list[str]:
        isps = [f"{self.prefix}-isp{i}" for i in range(1, self.isps + 1)]
        return [self.ns_lan, self.ns_router, *isps, self.ns_inet]

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
        self._ip(inet, "addr", "add", f"{INET_HOST}/32", "dev", "lo")
        for i in range(1, self.isps + 1):
            isp, wan = self.ns_isp(i), self.router_wan(i)
            self._veth(
                (router, wan.device, f"{wan.address}/24"), (isp, "down", f"{wan.gateway}/24")
            )
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

    def close(self) -> None:
        """Stop the servers and delete the namespaces; idempotent, raises LabError if any remain."""
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

    def _python(self, ns: str, *argv: str) -> list[str]:
        env = ["env", f"PYTHONPATH={_SRC_PYTHONPATH}", sys.executable, "-m", "uplinkd.lab"]
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

    def set_upstream(self, i: int, up: bool) -> None:
        """Silent upstream failure of ISP i: the Internet side of its uplink goes down, the router
        keeps carrier and its gateway still answers ARP, but nothing gets past the ISP."""
        self._check_isp(i)
        self._ip(self.ns_inet, "link", "set", "dev", f"isp{i}", "up" if up else "down")
        if up:
            self._inet_source(i)

    def _inet_source(self, i: int) -> None:
        # The Internet host speaks from 203.0.113.10, not from its 100.64.<i>.1 link addresses.
        route = [f"100.64.{i}.0/30", "dev", f"isp{i}", "scope", "link", "src", INET_HOST]
        self._ip(self.ns_inet, "route", "replace", *route)

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

    def start_server(
        self, ns: str, address: str, ports: Sequence[int] = DEFAULT_PORTS, timeout: float = 5.0
    ) -> Server:
        """Start a who-am-I server and wait (poll-connect from inside ``ns``) until it listens."""
        portlist = ",".join(str(p) for p in ports)
        proc = subprocess.Popen(
            self._python(ns, "serve", "--address", address, "--ports", portlist),
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
        return ConnectResult(data["results"], data["errors"], data["elapsed_s"], lab=self)


# The programs run inside the namespaces.
def serve(address: str, ports: Sequence[int]) -> None:
    """Accept on every port; tell each peer its IPv4 address and a newline, then close."""
    sel = selectors.DefaultSelector()
    for port in ports:
        lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        lsock.bind((address, port))
        lsock.listen(4096)
        lsock.settimeout(0.0)  # non-blocking
        sel.register(lsock, selectors.EVENT_READ)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    while True:
        for key, _ in sel.select():
            listener: socket.socket = key.fileobj  # type: ignore[assignment]
            while True:
                try:
                    conn, peer = listener.accept()
                except OSError:  # BlockingIOError (queue drained), ECONNABORTED
                    break
                with conn, contextlib.suppress(OSError):
                    conn.sendall(f"{peer[0]}\n".encode())


def _error_kind(exc: OSError) -> str:
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return "unreachable"
    if isinstance(exc, ConnectionResetError):
        return "reset"
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _connect_once(dst: str, port: int, source: str | None, timeout: float) -> str:
    end = time.monotonic() + timeout
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # An RST on close: no TIME_WAIT, so thousands of connections never run out of ports.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if source:
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source, 0))
        sock.settimeout(timeout)
        sock.connect((dst, port))
        data = b""
        while not data.endswith(b"\n"):
            sock.settimeout(max(0.001, end - time.monotonic()))
            chunk = sock.recv(64)
            if not chunk:
                break
            data += chunk
    text = data.decode(errors="replace").strip()
    ipaddress.IPv4Address(text)  # ValueError: not a who-am-I server
    return text


def connect(
    dst: str, port: int, count: int, *, sources: Sequence[str], timeout: float, deadline: float
) -> dict[str, object]:
    start = time.monotonic()
    keys = list(sources) or ["default"]
    results: dict[str, list[str | None]] = {k: [] for k in keys}
    errors: Counter[str] = Counter()
    for _ in range(count):
        for key in keys:
            left = start + deadline - time.monotonic()
            seen: str | None = None
            if left <= 0:
                errors["deadline"] += 1
            else:
                try:
                    seen = _connect_once(dst, port, key if sources else None, min(timeout, left))
                except OSError as exc:
                    errors[_error_kind(exc)] += 1
                except ValueError:
                    errors["garbled"] += 1
            results[key].append(seen)
    return {"results": results, "errors": dict(errors), "elapsed_s": time.monotonic() - start}


def wait_listening(address: str, ports: Sequence[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    pending = list(ports)
    while pending:
        with contextlib.suppress(OSError), socket.create_connection((address, pending[0]), 0.2):
            pending.pop(0)
            continue
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m uplinkd.lab", description=__doc__)
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
        with Lab(args.isps, args.bandwidth_mbit, args.prefix) as lab:
            lab.start_server(lab.ns_inet, INET_HOST)
            print("namespaces:", " ".join(lab.namespaces), "- Ctrl-C removes them", flush=True)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    return 0


if __name__ == "__main__":
    sys.exit(main())
