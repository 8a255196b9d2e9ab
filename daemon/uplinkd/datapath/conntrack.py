"""Forget the tracked connections of a link that went down, so their clients reconnect elsewhere.

A connection whose conntrack entry still carries a dead link's mark keeps following that link
(and is blackholed) until the entry times out: up to 5 days for an established TCP connection.

Deleting goes through the `conntrack` command line (conntrack-tools), run as an asyncio
subprocess, rather than pyroute2's `AsyncConntrack`. Both dump the entries matching the mark in
the kernel and delete them one by one, but with pyroute2 0.9.7, measured in a namespace:

- `delete()` looks an entry up by its original tuple only, without its zone: entries in a
  conntrack zone other than 0 (`ct zone set` in nftables) fail with ENOENT and stay;
- one socket handles one address family (`nfgen_family`), so IPv6 needs a second pass;
- `dump(mark=0)` silently drops the mark filter (`if mark:`), and `delete()` returns a dict
  key instead of the answer: a little-used path.

`conntrack -D -m MARK/MASK` deletes IPv4 and IPv6 entries in every zone and prints the exact
count. Its cost, one process (a few milliseconds), is paid once per link that goes down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from typing import Final

from ..errors import ApplyError

log = logging.getLogger("uplinkd")

CONNTRACK: Final = "conntrack"
# Deleting even 100,000 entries takes about a second; a call still running after this is stuck.
TIMEOUT_S: Final = 30.0
# conntrack-tools prints the count on stderr, e.g.
# "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted."
DELETED = re.compile(r"(\d+) flow entries have been deleted")
# conntrack -D dumps the matching entries, then deletes them one by one; an entry that expired
# (or that another deleter took) in between makes 1.4.7 stop there with this message, exit 1 and
# no count, leaving the rest. The entry is gone, which is what was asked: run again for the rest.
VANISHED = "such conntrack doesn't exist"


def command(
    mark: int, mask: int, netns: str | None = None, filters: Sequence[str] = ()
) -> list[str]:
    """The argv that deletes every entry whose mark & mask == mark and that matches the
    conntrack `filters` (in `netns` if given)."""
    argv = [CONNTRACK, "-D", *filters, "-m", f"{mark:#x}/{mask:#x}"]
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


class VanishedEntryError(ApplyError):
    """An entry vanished between conntrack's dump and its delete; the pass stopped there."""

    deleted = 0  # entries the pass deleted before it stopped


def deleted_count(returncode: int, stderr: str) -> int:
    """How many entries the run deleted; ApplyError if it failed (VanishedEntryError if it stopped
    on an entry that was already gone).

    conntrack exits 1 when nothing matched ("0 flow entries have been deleted"): not an error.
    """
    found = DELETED.search(stderr)
    if found is not None and (returncode == 0 or int(found.group(1)) == 0):
        return int(found.group(1))
    reason = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit status {returncode}"
    if VANISHED in reason:
        raise VanishedEntryError(reason)
    raise ApplyError(f"conntrack could not delete the entries: {reason}")


async def forget_links(marks: Mapping[str, int], mask: int) -> dict[str, str]:
    """Forget the tracked connections of links that went out of use (link name -> its mark):
    they would keep following their link, and so would a new connection reusing such an
    entry's ports. One link's failure does not stop the others'. Logs what each forgot;
    returns, for the links whose entries are not forgotten, why (the caller decides whether
    to retry: the daemon does, `--once` exits 1)."""
    failed: dict[str, str] = {}
    for name, mark in sorted(marks.items()):
        try:
            count = await forget_mark(mark, mask)
        except ApplyError as exc:
            failed[name] = str(exc)
        else:
            log.info("link %s: forgot %d tracked connections", name, count)
    return failed


async def forget_unanswered(address: str, port: int, mark: int, mask: int) -> int:
    """Delete the TCP connections to address:port still waiting for an answer (SYN_SENT) via
    the link of `mark`, so that the client's next SYN is classified afresh; return the count."""
    filters = ["-p", "tcp", "-d", address, "--dport", str(port), "--state", "SYN_SENT"]
    return await forget_mark(mark, mask, filters=filters)


async def forget_mark(
    mark: int, mask: int, *, netns: str | None = None, filters: Sequence[str] = ()
) -> int:
    """Delete every conntrack entry whose mark & mask == mark (and that matches the conntrack
    `filters`); return how many were deleted.

    Entries with other marks are untouched. Never blocks the event loop.
    """
    if mark & ~mask:
        raise ValueError(f"mark {mark:#x} has bits outside the mask {mask:#x}")
    if shutil.which(CONNTRACK) is None:
        raise ApplyError(
            "the conntrack command is missing: install the conntrack package (conntrack-tools)"
        )
    argv = command(mark, mask, netns, filters)
    deleted, passes = 0, 0
    try:
        async with asyncio.timeout(TIMEOUT_S):  # all passes together
            while True:
                passes += 1
                try:
                    return deleted + await _delete(argv)
                except VanishedEntryError as exc:
                    deleted += exc.deleted  # each pass deletes what it dumped before the gap
    except TimeoutError:
        raise ApplyError(
            f"{' '.join(argv)} timed out after {TIMEOUT_S:g} s ({passes} passes, {deleted} deleted)"
        ) from None


async def _delete(argv: list[str]) -> int:
    """One conntrack -D pass: the entries it deleted (a VanishedEntryError carries them too)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,  # one line per deleted entry: counted, not kept
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "LC_ALL": "C"},
        )
    except OSError as exc:
        raise ApplyError(f"cannot run {argv[0]}: {exc}") from exc
    stdout, stderr_stream = proc.stdout, proc.stderr
    if stdout is None or stderr_stream is None:  # both are pipes above: never the case
        raise ApplyError(f"{argv[0]}: no output pipes")
    try:
        lines, stderr, _ = await asyncio.gather(
            _count_lines(stdout), stderr_stream.read(), proc.wait()
        )
    except asyncio.CancelledError:  # the caller's time is up: the process must not outlive it
        proc.kill()
        await proc.wait()
        raise
    returncode = proc.returncode if proc.returncode is not None else -1
    try:
        return deleted_count(returncode, stderr.decode(errors="replace"))
    except VanishedEntryError as exc:
        exc.deleted = lines  # the count line is missing: the lines printed say how many went
        raise


async def _count_lines(stream: asyncio.StreamReader) -> int:
    """Newlines in the stream, read in chunks so a huge table costs no memory."""
    count = 0
    while chunk := await stream.read(65536):
        count += chunk.count(b"\n")
    return count
