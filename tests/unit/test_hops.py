"""Hop-probe packets: building echo requests and recognising the answers to them."""

from __future__ import annotations

import struct

from uplinkd.monitor.hops import ICMP_TIME_EXCEEDED, checksum, echo_request, parse_reply


def ip_header(payload_len: int) -> bytes:
    return struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + payload_len, 0, 0, 64, 1, 0, bytes(4), bytes(4)
    )


def test_echo_request_checksum_verifies() -> None:
    packet = echo_request(0x1234, 7)
    assert checksum(packet) == 0
    assert struct.unpack("!BBHHH", packet[:8])[3:] == (0x1234, 7)


def test_time_exceeded_names_the_original_request() -> None:
    original = echo_request(0x1234, 7)
    inner = ip_header(len(original)) + original
    icmp = struct.pack("!BBHI", ICMP_TIME_EXCEEDED, 0, 0, 0) + inner
    assert parse_reply(ip_header(len(icmp)) + icmp) == (0x1234, 7)


def test_echo_reply_and_junk() -> None:
    reply = struct.pack("!BBHHH", 0, 0, 0, 0x4321, 9) + b"x"
    assert parse_reply(ip_header(len(reply)) + reply) == (0x4321, 9)
    unreachable = struct.pack("!BBHI", 3, 1, 0, 0) + ip_header(8) + echo_request(1, 1)[:8]
    assert parse_reply(ip_header(len(unreachable)) + unreachable) is None
    assert parse_reply(b"short") is None
