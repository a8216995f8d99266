"""Tracked requests: overlapping requests wait for read-modify-write cycles.

QEMU's BdrvTrackedRequest.  On a node that needs aligned requests, a write that does not
cover whole blocks reads the blocks it touches, patches them and writes them back; a
second write to the same block in the meantime would be lost.  Such a request becomes
*serialising* over its whole blocks: it waits for every request overlapping it, and
every overlapping request waits for it.  A request that is already waiting is not waited
for in turn (QEMU's rule), so two serialising requests never wait for each other.

Requests come from any thread's loop, so the list is guarded by a lock and a waiter is
woken in its own loop.
"""

from __future__ import annotations

import asyncio
import threading


class TrackedRequest:
    __slots__ = ("start", "end", "serialising", "waiting_for", "waiters")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.serialising = False
        self.waiting_for: TrackedRequest | None = None
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class RequestTracker:
    """The tracked requests of one node."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: list[TrackedRequest] = []

    def begin(self, start: int, end: int) -> TrackedRequest:
        req = TrackedRequest(start, end)
        with self._lock:
            self._requests.append(req)
        return req

    def end(self, req: TrackedRequest) -> None:
        with self._lock:
            self._requests.remove(req)
            waiters, req.waiters = req.waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_wake, fut)

    def serialise(self, req: TrackedRequest, align: int) -> None:
        """Widens ``req`` to whole blocks of ``align`` and makes it serialising."""
        with self._lock:
            req.start -= req.start % align
            req.end = -(-req.end // align) * align
            req.serialising = True

    def _conflict(self, req: TrackedRequest) -> TrackedRequest | None:
        for other in self._requests:
            if other is req or not (other.serialising or req.serialising):
                continue
            if other.start < req.end and req.start < other.end and other.waiting_for is None:
                return other
        return None

    def overlapping(self, start: int, end: int) -> bool:
        """Whether any tracked request overlaps [start, end)."""
        with self._lock:
            return any(r.start < end and start < r.end for r in self._requests)

    def shrink(self, req: TrackedRequest, end: int) -> None:
        """The request gave up its tail: whoever waited for it looks again."""
        with self._lock:
            req.end = end
            waiters, req.waiters = req.waiters, []
        for loop, fut in waiters:
            loop.call_soon_threadsafe(_wake, fut)

    async def wait(self, req: TrackedRequest) -> bool:
        """Returns once no conflicting request overlaps ``req``; whether it waited."""
        waited = False
        while True:
            with self._lock:
                other = self._conflict(req)
                if other is None:
                    return waited
                waited = True
                loop = asyncio.get_running_loop()
                fut: asyncio.Future[None] = loop.create_future()
                other.waiters.append((loop, fut))
                req.waiting_for = other
            try:
                await fut
            finally:
                req.waiting_for = None
