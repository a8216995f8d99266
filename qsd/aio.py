"""AioContext: one OS thread and the asyncio loop it runs.

The main thread's context runs QMP and every graph change; each iothread has its own.
Code that owns an fd or a request queue runs in exactly one context and is reached from
other threads only through the thread-safe calls here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
F = TypeVar("F", bound="asyncio.Future[Any]")

# QEMU's iothread default for poll-max-ns; the main loop uses it too.
POLL_MAX_NS_DEFAULT = 32768


class AioContext:
    def __init__(self, name: str, loop: asyncio.AbstractEventLoop, thread: threading.Thread):
        self.name = name
        self.loop = loop
        self.thread = thread
        # How long whoever serves requests in this context may poll for the next one
        # before sleeping; an iothread's poll-max-ns, changeable while it runs.
        self.poll_max_ns = POLL_MAX_NS_DEFAULT

    def in_this_thread(self) -> bool:
        return threading.current_thread() is self.thread

    def run(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedules ``coro`` on this context's loop from any thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs ``coro`` in this context and awaits its result from the caller's loop."""
        if self.in_this_thread():
            return await coro
        return await asyncio.wrap_future(self.run(coro))

    def call_soon(self, fn: Callable[..., object], *args: object) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def __repr__(self) -> str:
        return f"AioContext({self.name!r})"


_main: AioContext | None = None


async def wait_tasks(tasks: set[F]) -> None:
    """Waits until ``tasks``, a set whose members remove themselves once done, is empty.
    Finished ones are dropped here too: from Python 3.14 on, gather() of tasks that are
    all done can return before their done callbacks (the removal) ran, and waiting again
    would spin without ever letting them run."""
    while tasks:
        current = list(tasks)
        await asyncio.gather(*current, return_exceptions=True)
        tasks.difference_update(current)


def set_main_context(loop: asyncio.AbstractEventLoop) -> AioContext:
    global _main
    _main = AioContext("main", loop, threading.current_thread())
    return _main


def main_context() -> AioContext:
    if _main is None:
        raise RuntimeError("the main loop is not running")
    return _main
