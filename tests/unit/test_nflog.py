"""Parsing nfnetlink_log datagrams built by hand, laid out as the kernel lays them out."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct

import pytest
from uplinkd.datapath import nflog
from uplinkd.datapath.nflog import LoggedPacket, NflogListener, parse_messages

A, B = ipaddress.IPv4Address("10.9.0.1"), ipaddress.IPv4Address("192.0.2.7")


def attr(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + bytes(-len(value) % 4)


def ipv4(protocol: int, dport: int, *, frag: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 60, 1, frag, 64, protocol, 0, A.packed, B.packed)
    return header + struct.pack("!HH", 40000, dport) + bytes(36)  # rest of the L4 header


def message(*attrs: bytes, kind: int = nflog.MSG_PACKET, family: int = socket.AF_INET) -> bytes:
    body = struct.pack("!BBH", family, 0, 21301) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), kind, 0, 0, 0) + body


def logged(payload: bytes, prefix: bytes = b"uplinkd-fr rule_default\0", seq: int = 0) -> bytes:
    """A packet message with the attributes in the kernel's order, payload last."""
    return message(
        attr(1, struct.pack("!HBB", 0x0800, 3, 0)),  # NFULA_PACKET_HDR: IPv4, hook output
        attr(nflog.NFULA_PREFIX, prefix),
        attr(5, struct.pack("!I", 1)),  # NFULA_IFINDEX_OUTDEV
        attr(nflog.NFULA_MARK, struct.pack("!I", 0x100)),
        attr(nflog.NFULA_SEQ, struct.pack("!I", seq)),
        attr(nflog.NFULA_PAYLOAD, payload),
    )


def test_two_packets_in_one_datagram() -> None:
    data = logged(ipv4(6, 443)) + logged(ipv4(17, 53), prefix=b"uplinkd-fr x\0")
    assert parse_messages(data) == [
        LoggedPacket("uplinkd-fr rule_default", 6, A, B, 443, 0x100),
        LoggedPacket("uplinkd-fr x", 17, A, B, 53, 0x100),
    ]


def test_no_port_for_icmp_and_later_fragments_and_no_mark_attribute() -> None:
    icmp = message(attr(nflog.NFULA_PREFIX, b"p\0"), attr(nflog.NFULA_PAYLOAD, ipv4(1, 0)))
    fragment = logged(ipv4(17, 53, frag=100))
    got = parse_messages(icmp + fragment)
    assert [(p.protocol, p.dport, p.mark) for p in got] == [(1, None, 0), (17, None, 0x100)]


def test_other_messages_and_non_ipv4_payloads_are_skipped() -> None:
    ipv6 = bytes([0x60]) + bytes(63)
    done = struct.pack("=IHHIIi", 20, 3, 0, 0, 0, 0)  # NLMSG_DONE
    config = message(attr(1, b"\1"), kind=nflog.MSG_CONFIG)
    data = done + logged(ipv6) + config + logged(b"\x45short") + logged(ipv4(6, 80))
    assert [p.dport for p in parse_messages(data)] == [80]


def test_truncated_attribute_skips_its_message_only() -> None:
    bad = bytearray(logged(ipv4(6, 22)))
    # Lengthen the prefix attribute (right after nlmsghdr, nfgenmsg and the 8-byte packet
    # header attribute) past the end of the message.
    struct.pack_into("=H", bad, 16 + 4 + 8, 500)
    assert [p.dport for p in parse_messages(bytes(bad) + logged(ipv4(6, 80)))] == [80]


def test_truncated_message_ends_the_datagram_without_error() -> None:
    whole = logged(ipv4(6, 80))
    assert parse_messages(whole + whole[:-10]) == parse_messages(whole)
    assert parse_messages(b"") == []
    assert parse_messages(b"\xff" * 7) == []


def test_sequence_gap_counts_lost_packets(caplog: pytest.LogCaptureFixture) -> None:
    listener = NflogListener(21301, lambda _: None)
    for seq in (7, 8, 12, 13):
        listener._count_lost(seq)
    assert listener.lost == 3
    assert "3 logged packets lost" in caplog.text
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_close_without_open_is_harmless() -> None:
    listener = NflogListener(21301, lambda _: None)
    listener.close()
    listener.close()
    assert listener.sock is None


def test_run_calls_back_counts_losses_and_closes_when_cancelled(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """run() on a datagram socket pair standing in for the netlink socket."""

    async def main() -> list[LoggedPacket]:
        got: list[LoggedPacket] = []
        listener = NflogListener(21301, got.append)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        with theirs:
            ours.setblocking(False)
            listener.sock = ours
            early = LoggedPacket("logged before the bind ACK", 6, A, B, 1, 0)
            listener._pending = [(0, early)]
            task = asyncio.create_task(listener.run())
            theirs.send(logged(ipv4(6, 443), seq=1) + logged(ipv4(17, 53), seq=4))
            async with asyncio.timeout(5):
                while len(got) < 3:
                    await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        assert listener.sock is None
        assert ours.fileno() == -1
        assert listener.lost == 2
        return got

    got = asyncio.run(main())
    assert [(p.prefix, p.dport) for p in got] == [
        ("logged before the bind ACK", 1),
        ("uplinkd-fr rule_default", 443),
        ("uplinkd-fr rule_default", 53),
    ]
    assert "2 logged packets lost" in caplog.text
