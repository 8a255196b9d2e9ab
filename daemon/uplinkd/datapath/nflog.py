"""Packets that nftables logs to an NFLOG group, read from the kernel's nfnetlink_log.

Rules such as `ip daddr != @seen add @seen { ip daddr } log prefix "uplinkd-fr x" group N` log
the first packet of a connection to a new destination; the daemon learns from it which rule
sent which address where. pyroute2 0.9.7 has no nfnetlink_log client, and the protocol is a few
fixed structs (linux/netfilter/nfnetlink_log.h), so this module uses a raw netlink socket.

Kernel behaviour it relies on (measured on Linux 6.x in a network namespace):

- A group belongs to one socket. Binding a group that another socket holds fails with EPERM,
  binding it twice on the same socket with EBUSY. Closing the socket frees the group.
- The kernel batches packets until `qthresh` are queued or `timeout` passes (default 100
  packets or 1 s). Threshold 1 hands over every packet at once.
- A full receive buffer drops packets; the next recv() fails with ENOBUFS. The instance's
  sequence numbers (NFULNL_CFG_F_SEQ) tell exactly how many were lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from ..errors import UplinkdError

log = logging.getLogger("uplinkd")

# Values from linux/netlink.h, linux/netfilter/nfnetlink.h and nfnetlink_log.h.
NETLINK_NETFILTER, NLMSG_ERROR, REQUEST_ACK = 12, 2, 0x1 | 0x4  # NLM_F_REQUEST | NLM_F_ACK
MSG_PACKET, MSG_CONFIG = 4 << 8 | 0, 4 << 8 | 1  # NFNL_SUBSYS_ULOG << 8 | NFULNL_MSG_*
NFULA_MARK, NFULA_PAYLOAD, NFULA_PREFIX, NFULA_SEQ = 2, 9, 10, 12
CFG_CMD, CFG_MODE, CFG_TIMEOUT, CFG_QTHRESH, CFG_FLAGS = 1, 2, 4, 5, 6  # NFULA_CFG_*
CMD_BIND, CMD_UNBIND, COPY_PACKET, CFG_F_SEQ = 1, 2, 2, 0x1  # NFULNL_*
SO_RCVBUFFORCE: Final = 33  # not exported by Python's socket module
RCVBUF: Final = 1 << 20
NLHDR: Final = struct.Struct("=IHHII")  # nlmsghdr: host byte order
NLA: Final = struct.Struct("=HH")
NLA_TYPE_MASK: Final = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER
PORTS: Final = (6, 17)  # TCP and UDP: destination port at offset 2 of the L4 header


class NflogError(UplinkdError):
    """An NFLOG group cannot be listened to (taken by another program, or no nfnetlink_log)."""


@dataclass(frozen=True)
class LoggedPacket:
    """The parts of one logged IPv4 packet that say where a new connection goes."""

    prefix: str
    protocol: int  # IP protocol number (6 tcp, 17 udp, ...)
    src: ipaddress.IPv4Address
    dst: ipaddress.IPv4Address
    dport: int | None  # TCP/UDP destination port, else None
    mark: int  # the packet mark (NFULA_MARK) or 0


def _attrs(data: bytes, start: int, end: int) -> dict[int, bytes] | None:
    """The netlink attributes in data[start:end] by type; None if one is truncated."""
    found: dict[int, bytes] = {}
    while start + NLA.size <= end:
        length, kind = NLA.unpack_from(data, start)
        if length < NLA.size or start + length > end:
            return None
        found[kind & NLA_TYPE_MASK] = data[start + NLA.size : start + length]
        start += (length + 3) & ~3
    return found


def _packet(attrs: dict[int, bytes]) -> LoggedPacket | None:
    """The packet these attributes describe; None unless the payload is a whole IPv4 header."""
    ip = attrs.get(NFULA_PAYLOAD, b"")
    ihl = (ip[0] & 0xF) * 4 if ip else 0
    if len(ip) < 20 or ip[0] >> 4 != 4 or not 20 <= ihl <= len(ip):
        return None
    protocol = ip[9]
    first_fragment = struct.unpack_from("!H", ip, 6)[0] & 0x1FFF == 0
    dport = None
    if protocol in PORTS and first_fragment and len(ip) >= ihl + 4:
        dport = struct.unpack_from("!H", ip, ihl + 2)[0]
    mark = attrs.get(NFULA_MARK, b"")
    return LoggedPacket(
        prefix=attrs.get(NFULA_PREFIX, b"").split(b"\0", 1)[0].decode("utf-8", "replace"),
        protocol=protocol,
        src=ipaddress.IPv4Address(ip[12:16]),
        dst=ipaddress.IPv4Address(ip[16:20]),
        dport=dport,
        mark=struct.unpack("!I", mark)[0] if len(mark) == 4 else 0,
    )


def _parse(data: bytes) -> list[tuple[int | None, LoggedPacket]]:
    """(sequence number if any, packet) for every IPv4 packet message in one datagram."""
    result: list[tuple[int | None, LoggedPacket]] = []
    offset = 0
    while offset + NLHDR.size <= len(data):
        length, kind = NLHDR.unpack_from(data, offset)[:2]
        if length < NLHDR.size or offset + length > len(data):
            break  # a truncated message ends the datagram: nothing after it can be located
        if kind == MSG_PACKET:
            attrs = _attrs(data, offset + NLHDR.size + 4, offset + length)  # 4: struct nfgenmsg
            packet = _packet(attrs) if attrs is not None else None
            if packet is not None and attrs is not None:
                seq = attrs.get(NFULA_SEQ, b"")
                result.append((struct.unpack("!I", seq)[0] if len(seq) == 4 else None, packet))
        offset += (length + 3) & ~3
    return result


def parse_messages(data: bytes) -> list[LoggedPacket]:
    """Every NFULNL_MSG_PACKET in one netlink datagram (others, and non-IPv4 payloads, skipped).

    Never raises: a message with a truncated attribute is skipped, a truncated message ends the
    datagram, so one malformed message cannot stop the listener.
    """
    return [packet for _, packet in _parse(data)]


def _config(group: int, seq: int, *attrs: tuple[int, bytes]) -> bytes:
    """An NFULNL_MSG_CONFIG request for `group` that asks for an ACK."""
    body = b"".join(NLA.pack(4 + len(v), k) + v + bytes(-len(v) % 4) for k, v in attrs)
    nfgenmsg = struct.pack("!BBH", socket.AF_UNSPEC, 0, group)
    size = NLHDR.size + len(nfgenmsg) + len(body)
    return NLHDR.pack(size, MSG_CONFIG, REQUEST_ACK, seq, 0) + nfgenmsg + body


class NflogListener:
    """Binds one NFLOG group and calls `callback` for every IPv4 packet logged to it."""

    def __init__(
        self, group: int, callback: Callable[[LoggedPacket], None], *, copy_range: int = 64
    ) -> None:
        self.group = group
        self.callback = callback
        self.copy_range = copy_range  # bytes copied: 64 = longest IPv4 header + the L4 ports
        self.sock: socket.socket | None = None
        self.lost = 0  # packets the kernel dropped because the receive buffer was full
        self._next_seq: int | None = None
        self._pending: list[tuple[int | None, LoggedPacket]] = []  # parsed, not yet called back

    def open(self) -> None:
        """Create the socket, bind the group and set it to deliver each packet at once.

        Does nothing if already open, so a caller can open early to report errors at start-up.
        """
        if self.sock is None:
            self.sock = self._bind()

    def _bind(self) -> socket.socket:
        """A new non-blocking socket bound to the group; NflogError if the kernel refuses."""
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as exc:
            raise NflogError(f"cannot open a netfilter netlink socket: {exc.strerror}") from exc
        try:
            sock.bind((0, 0))
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
            sock.settimeout(5.0)
            # One request: bind, copy the packet's first bytes, hand over every packet at once
            # (queue threshold 1), and number them so that losses can be counted.
            mode = struct.pack("!IBB", self.copy_range, COPY_PACKET, 0)
            bind = (CFG_CMD, bytes([CMD_BIND])), (CFG_MODE, mode), (CFG_QTHRESH, b"\0\0\0\1")
            sock.send(_config(self.group, 1, *bind, (CFG_FLAGS, struct.pack("!H", CFG_F_SEQ))))
            self._check_ack(sock, 1)
            sock.settimeout(0.0)  # non-blocking, for asyncio
        except BaseException:
            sock.close()
            raise
        return sock

    def _check_ack(self, sock: socket.socket, seq: int) -> None:
        """Wait for the answer to request `seq`, keeping packets logged meanwhile for run()."""
        while True:
            try:
                data = sock.recv(65536)
            except OSError as exc:
                raise NflogError(f"NFLOG group {self.group}: no answer: {exc}") from exc
            self._pending += _parse(data)
            offset = 0
            while offset + NLHDR.size + 4 <= len(data):
                length, kind, _, got, _ = NLHDR.unpack_from(data, offset)
                if kind == NLMSG_ERROR and got == seq:
                    error = -struct.unpack_from("=i", data, offset + NLHDR.size)[0]
                    if not error:
                        return
                    hint = (
                        "another program (ulogd, a second uplinkd?) holds it"
                        if error in (errno.EPERM, errno.EBUSY)
                        else "does the kernel have nfnetlink_log?"
                    )
                    raise NflogError(
                        f"cannot bind NFLOG group {self.group}: {os.strerror(error)}; {hint}"
                    )
                offset += max((length + 3) & ~3, NLHDR.size)

    async def run(self) -> None:
        """Call back for every packet until cancelled; the socket is closed when this returns.

        Opens the socket if open() was not called. An exception from the callback ends it.
        """
        if self.sock is None:
            self.sock = self._bind()
        sock, loop = self.sock, asyncio.get_running_loop()
        try:
            while True:
                packets, self._pending = self._pending, []
                for seq, packet in packets:
                    self._count_lost(seq)
                    self.callback(packet)
                try:
                    self._pending = _parse(await loop.sock_recv(sock, 65536))
                except OSError as exc:
                    if exc.errno != errno.ENOBUFS:
                        raise  # ENOBUFS: the gap in sequence numbers says how many were lost
        finally:
            self.close()

    def _count_lost(self, seq: int | None) -> None:
        """Log a gap in the instance's sequence numbers: packets lost to an overrun."""
        if seq is None:
            return
        if self._next_seq is not None and seq != self._next_seq:
            gap = (seq - self._next_seq) & 0xFFFFFFFF
            self.lost += gap
            log.warning(
                "NFLOG group %d: receive buffer overrun, %d logged packets lost", self.group, gap
            )
        self._next_seq = (seq + 1) & 0xFFFFFFFF

    def close(self) -> None:
        """Unbind the group and close the socket; closing alone would free the group too."""
        if self.sock is None:
            return
        sock, self.sock = self.sock, None
        with contextlib.suppress(OSError):  # the kernel frees the group on close anyway
            sock.send(_config(self.group, 2, (CFG_CMD, bytes([CMD_UNBIND]))))
        sock.close()
