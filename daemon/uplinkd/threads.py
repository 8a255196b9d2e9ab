"""Blocking calls the loop hands to a thread of their own (a name lookup, an SMTP session).

asyncio.to_thread and loop.getaddrinfo use the loop's default executor, whose threads the
process joins at exit: asyncio.run waits for them, and so does the interpreter. A lookup stuck
on a silent DNS server (glibc: 5 s per server and attempt) or a send stuck on a silent SMTP
server would then hold up the daemon's stop long after the caller gave up on it. A daemon
thread is not waited for: the caller's time limit is the whole cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


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
