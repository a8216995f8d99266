"""An asyncio mutex that coroutines of different event loops can share.

A qcow2 node takes requests from every loop that submits I/O to it (the exports'
queues run in several iothreads), and its metadata is changed by coroutines that await
I/O in between (QEMU's CoMutex s->lock).  asyncio.Lock belongs to one loop; this one
hands ownership to the first waiter, waking it in its own loop.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from types import TracebackType


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class CrossLoopLock:
    """FIFO mutex; ``async with lock:`` from any loop."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._held = False
        self._waiters: collections.deque[tuple[asyncio.AbstractEventLoop,
                                                asyncio.Future[None]]] = collections.deque()

    async def acquire(self) -> None:
        with self._guard:
            if not self._held:
                self._held = True
                return
            loop = asyncio.get_running_loop()
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters.append((loop, fut))
        try:
            await fut
        except BaseException:
            # Cancelled after ownership was handed over: pass it on.
            with self._guard:
                # Still queued: nobody handed us the lock.  Popped: release() did.
                handed = (loop, fut) not in self._waiters
                if not handed:
                    self._waiters.remove((loop, fut))
            if handed:
                self.release()
            raise

    def try_acquire(self) -> bool:
        """Takes the lock if it is free, without waiting (inline paths)."""
        with self._guard:
            if self._held:
                return False
            self._held = True
            return True

    def release(self) -> None:
        with self._guard:
            if self._waiters:
                # Ownership passes to the waiter: _held stays True.
                loop, fut = self._waiters.popleft()
                loop.call_soon_threadsafe(_wake, fut)
                return
            self._held = False

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.release()
