"""Child processes beside the event loop: time-boxed, output bounded, killed with their group.

Hook code (the `.py` hooks' children, the command lines of pre-run/, routes/ and post-run/) runs
through `run_bounded`: the process gets its own session (so whatever it starts is in its process
group), its output is read as it comes and only the first bytes are kept (a runaway print costs
no memory), and at the time limit, or when the caller is cancelled, the whole group is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass
class _Capture:
    """The first `limit` bytes of a stream, and how many more were read and dropped."""

    limit: int
    kept: bytearray
    dropped: int = 0

    async def drain(self, stream: asyncio.StreamReader | None) -> None:
        while stream is not None and (chunk := await stream.read(65536)):
            room = max(0, self.limit - len(self.kept))
            self.kept += chunk[:room]
            self.dropped += len(chunk) - min(room, len(chunk))


@dataclass(frozen=True)
class Finished:
    """How a child process ended. `returncode` is None when it was killed at the time limit."""

    returncode: int | None
    stdout: bytes  # at most the stdout limit
    stdout_dropped: int  # bytes of stdout read beyond the limit and dropped
    output: str  # stderr (or both streams, merged) on one line, cut at the output limit

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def one_line(capture: bytes, dropped: int) -> str:
    """Output as one log line: non-empty lines joined by " | ", with what was dropped."""
    text = " | ".join(
        line for line in capture.decode(errors="replace").splitlines() if line.strip()
    )
    return text + (f" ... ({dropped} more bytes)" if dropped else "")


async def kill_group(process: asyncio.subprocess.Process) -> None:
    """Kill a process started in its own session, and whatever it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


async def _feed(process: asyncio.subprocess.Process, data: bytes | None) -> None:
    if process.stdin is None or data is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # it need not read it
        process.stdin.write(data)
        await process.stdin.drain()
    process.stdin.close()


async def run_bounded(
    argv: Sequence[str],
    *,
    timeout: float,
    output_limit: int,
    stdout_limit: int | None = None,
    stdin: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> Finished:
    """Run argv to its end or the time limit. With `stdout_limit`, stdout is kept apart (up to
    that many bytes: a result); without, stdout and stderr are merged into `output`."""
    separate = stdout_limit is not None
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE if separate else asyncio.subprocess.STDOUT,
        env=dict(env) if env is not None else None,
        start_new_session=True,  # its own process group, killed whole at the time limit
    )
    result = _Capture(stdout_limit or 0, bytearray())
    output = _Capture(output_limit, bytearray())
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(
                _feed(process, stdin),
                (result if separate else output).drain(process.stdout),
                output.drain(process.stderr),
            )
            returncode: int | None = await process.wait()
    except TimeoutError:
        await kill_group(process)
        returncode = None
    except asyncio.CancelledError:
        await kill_group(process)
        raise
    return Finished(
        returncode, bytes(result.kept), result.dropped, one_line(bytes(output.kept), output.dropped)
    )
