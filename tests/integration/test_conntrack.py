"""conntrack.forget_mark against a real conntrack table, in a network namespace of its own."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from uplinkd.datapath import conntrack
from uplinkd.errors import ApplyError

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("conntrack") is None,
    reason="needs root, iproute2 and conntrack-tools (package conntrack) for a namespace",
)
MASK = 0xFF00

# (source address, extra conntrack -I arguments, mark). `--mark` goes last: conntrack-tools
# 1.4.7 lets a later `-u` overwrite it.
TCP = ("-p", "tcp", "--sport", "40000", "--dport", "443", "--state", "ESTABLISHED")
UDP = ("-p", "udp", "--sport", "40000", "--dport", "53")
ICMP = ("-p", "icmp", "--icmp-type", "8", "--icmp-code", "0", "--icmp-id", "7")
ENTRIES = [
    ("10.0.0.1", TCP, 0x100),
    ("10.0.0.2", UDP, 0x100),
    ("10.0.0.3", ICMP, 0x100),
    ("10.0.0.4", (*UDP, "--zone", "5"), 0x100),  # a conntrack zone other than 0
    ("10.0.0.5", TCP, 0x1A5),  # bits outside the mask do not matter
    ("fd00::1", UDP, 0x100),
    ("10.0.0.11", TCP, 0x200),  # another link
    ("10.0.0.12", UDP, 0x200),
    ("10.0.0.13", UDP, 0x1100),  # equal to the mark in the low bits of the mask only
    ("10.0.0.14", UDP, 0x0),  # unmarked
]


def in_ns(ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, check=True
    )


def remaining(ns: str) -> dict[str, int]:
    """Source address -> mark of every entry left (both families)."""
    listed = in_ns(ns, "conntrack", "-L").stdout
    return {
        match.group(1): int(match.group(2))
        for match in re.finditer(r"src=(\S+) .*?mark=(\d+)", listed)
    }


@pytest.fixture
def ns() -> Iterator[str]:
    name = f"upl-ct-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True)
        for src, args, mark in ENTRIES:
            dst = "fd00::2" if ":" in src else "192.0.2.1"
            in_ns(
                name,
                "conntrack",
                "-I",
                "-s",
                src,
                "-d",
                dst,
                *args,
                "-t",
                "300",
                "--mark",
                str(mark),
            )
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@needs_root
def test_forget_mark_deletes_only_that_mark(ns: str) -> None:
    before = remaining(ns)
    assert before == {src: mark for src, _, mark in ENTRIES}

    count = asyncio.run(conntrack.forget_mark(0x100, MASK, netns=ns))

    assert count == 6
    assert remaining(ns) == {src: mark for src, _, mark in ENTRIES if mark & MASK != 0x100}


@needs_root
def test_nothing_to_forget_is_not_an_error(ns: str) -> None:
    assert asyncio.run(conntrack.forget_mark(0x300, MASK, netns=ns)) == 0
    assert len(remaining(ns)) == len(ENTRIES)


@needs_root
def test_missing_namespace_is_an_apply_error() -> None:
    with pytest.raises(ApplyError, match="conntrack could not delete"):
        asyncio.run(conntrack.forget_mark(0x100, MASK, netns=f"upl-ct-none-{uuid.uuid4().hex}"))


def test_missing_binary_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conntrack, "CONNTRACK", "conntrack-not-installed")
    with pytest.raises(ApplyError, match="install the conntrack package"):
        asyncio.run(conntrack.forget_mark(0x100, MASK))


def test_deleted_count() -> None:
    banner = "conntrack v1.4.7 (conntrack-tools): "
    assert conntrack.deleted_count(0, banner + "3 flow entries have been deleted.\n") == 3
    assert conntrack.deleted_count(1, banner + "0 flow entries have been deleted.\n") == 0
    with pytest.raises(ApplyError, match="Operation not permitted"):
        conntrack.deleted_count(1, banner + "Operation failed: Operation not permitted\n")
    with pytest.raises(ApplyError, match="exit status 2"):
        conntrack.deleted_count(2, "")


@needs_root
def test_entries_vanishing_meanwhile_are_no_failure(ns: str) -> None:
    """Two deleters of one mark at once: each dumps entries the other then deletes, so conntrack
    stops with "such conntrack doesn't exist" (as when entries expire under churn)."""
    many = 20_000
    lines = "".join(
        f"-I -s 10.9.{k // 250}.{k % 250 + 1} -d 192.0.2.9 -p udp --sport 1024 --dport 53"
        f" -t 300 --mark {0x100}\n"
        for k in range(many)
    )
    subprocess.run(
        ["ip", "netns", "exec", ns, "conntrack", "-R", "-"], input=lines, text=True, check=True
    )

    async def both() -> list[int]:
        return list(
            await asyncio.gather(
                conntrack.forget_mark(0x100, MASK, netns=ns),
                conntrack.forget_mark(0x100, MASK, netns=ns),
            )
        )

    counts = asyncio.run(both())

    assert sum(counts) == many + 6  # every entry deleted once, by one of them
    assert remaining(ns) == {src: mark for src, _, mark in ENTRIES if mark & MASK != 0x100}


def test_vanished_entry_is_told_apart() -> None:
    banner = "conntrack v1.4.7 (conntrack-tools): "
    with pytest.raises(conntrack.VanishedEntryError):
        conntrack.deleted_count(1, banner + "Operation failed: such conntrack doesn't exist\n")


def test_mark_outside_mask_is_refused() -> None:
    with pytest.raises(ValueError, match="outside the mask"):
        asyncio.run(conntrack.forget_mark(0x1, MASK))
