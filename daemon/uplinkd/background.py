"""Work beside the event loop, each kind bounded: tasks, child processes, blocking calls.

- Background: tasks kept referenced, run in turn per key, their errors logged, cut at stop.
- run_bounded: child processes (hooks, sendmail) in their own session (whatever they start is in
  their process group), output read as it comes and only its first bytes kept (a runaway print
  costs no memory); at the time limit, or when the caller is cancelled, the whole group is
  killed.
- in_daemon_thread: a blocking call (a name lookup, an SMTP session) in a thread of its own.
  asyncio.to_thread and loop.getaddrinfo use the loop's default executor, whose threads the
  process joins at exit: a lookup stuck on a silent DNS server (glibc: 5 s per server and
  attempt) or a send stuck on a silent SMTP server would hold up the daemon's stop long after
  the caller gave up on it. A daemon thread is not waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from . import const

log = logging.getLogger("uplinkd")
T = TypeVar("T")


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


class Background:
    """Tasks beside the daemon's loop: kept referenced, their errors logged, cut at stop."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[None]] = set()
        self._locks: dict[str, asyncio.Lock] = {}

    def start(self, key: str, work: Coroutine[Any, Any, None], unstarted: str) -> None:
        """Run work after the earlier work of the same key (a link: its events stay in order).

        `unstarted` is logged if the daemon stops before the work's turn came; work cut while
        it runs says itself what was lost.
        """
        task = asyncio.get_running_loop().create_task(self._in_turn(key, work, unstarted))
        self._tasks.add(task)
        task.add_done_callback(self._finished)

    async def _in_turn(self, key: str, work: Coroutine[Any, Any, None], unstarted: str) -> None:
        started = False
        try:
            async with self._locks.setdefault(key, asyncio.Lock()):
                started = True
                await work
        except asyncio.CancelledError:
            if not started:
                log.warning("%s", unstarted)
            raise
        finally:
            work.close()  # work cancelled before its turn never started; closing it says so

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("background task failed: %s", error, exc_info=error)

    async def drain(self, timeout: float) -> bool:
        """Wait for the running work; cut what is left after timeout. True: all finished.

        Cut work (cancelled: it kills its processes, shuts its connections) gets
        SHUTDOWN_CUT_S to end; the daemon does not wait longer for anything that ignores it.
        """
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            _, stuck = await asyncio.wait(pending, timeout=const.SHUTDOWN_CUT_S)
            if stuck:
                log.error("%d background task(s) did not end when cut; not waiting", len(stuck))
        return not pending


async def in_daemon_thread(work: Callable[[], T], name: str) -> T:
    """work() run in a new daemon thread, its result (or exception) delivered to the loop.
    Cancelling the await abandons the thread: its outcome is dropped when it ends."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if done.done():  # cancelled: nobody waits for the outcome any more
            return
        if error is None:
            done.set_result(result)  # type: ignore[arg-type]  # T when no error was raised
        else:
            done.set_exception(error)

    def run() -> None:
        result: T | None = None
        error: BaseException | None = None
        try:
            result = work()
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            error = exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon has stopped
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done
