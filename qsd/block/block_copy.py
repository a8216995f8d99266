"""Copying clusters from one node to another, each once (QEMU's block/block-copy.c).

The copy-before-write filter and the backup job share one BlockCopyState: a bitmap of
the clusters still to copy from ``source`` to ``target`` (a copied cluster's bit is
cleared as its copy starts) and the copies in flight.  A guest write makes the filter
copy the clusters it overwrites first; the backup job copies the rest in the
background.  Whoever finds a cluster's bit set copies it; whoever finds it clear but a
copy of it in flight waits for that copy, and copies again if it failed.

A copy reads from source and writes to target, or zero-writes the target where the
source reads as zeroes; it is cut at block-status boundaries so that zeroes and data
are copied apart.  In ``skip_unallocated`` mode (sync=top, before the job has scanned
the image) clusters the source's top layer does not allocate are dropped instead.

Calls come from any loop (a multi-queue FUSE export writes from several iothreads):
the bitmap and the list of copies in flight change under a thread lock that is never
held across an await, and waiters are woken in their own loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Protocol

from qsd.block import dirty_bitmap, io
from qsd.block.dirty_bitmap import DirtyBitmap
from qsd.block.limits import INT_MAX, min_non_zero
from qsd.block.node import BLOCK_ALLOCATED, BLOCK_ZERO, BlockNode, Child
from qsd.block.tracking import RequestTracker, TrackedRequest
from qsd.errors import QMPError, warn_report

CLUSTER_SIZE_DEFAULT = 1 << 16      # QEMU's BLOCK_COPY_CLUSTER_SIZE_DEFAULT
MAX_BUFFER = 1 << 20                # BLOCK_COPY_MAX_BUFFER: the chunk of one copy
MAX_WORKERS = 64                    # BLOCK_COPY_MAX_WORKERS


class Progress(Protocol):
    """Where a copy reports what it did (a job's progress)."""

    def progress_update(self, done: int) -> None: ...

    def progress_set_remaining(self, remaining: int) -> None: ...


class RateLimiter(Protocol):
    """A byte rate limit (qsd.job.ratelimit.RateLimit): nanoseconds to wait."""

    def calculate_delay(self, n: int) -> int: ...


def cluster_size_for(target: Child, min_cluster_size: int) -> int:
    """QEMU's block_copy_calculate_cluster_size(): at least the target's own cluster
    size, so that a partial copy never leaves a target cluster half written."""
    minimum = max(min_cluster_size, CLUSTER_SIZE_DEFAULT)
    node = target.node
    does_cow = node.cow_child() is not None
    if not node.has_info():
        if not does_cow:
            warn_report("The target block device doesn't provide information about the "
                        "block size and it doesn't have a backing file. The (default) "
                        f"block size of {minimum} bytes is used. If the actual block size "
                        "of the target exceeds this value, the backup may be unusable")
        return minimum
    cluster = node.get_info().get("cluster-size", 0)
    assert isinstance(cluster, int)
    return max(minimum, cluster)


class CopyCall:
    """One call of ``BlockCopyState.copy``: a range, how to pace it, how it ended."""

    def __init__(self, offset: int, length: int, *, limit: RateLimiter | None = None,
                 max_workers: int = MAX_WORKERS, max_chunk: int = 0,
                 on_done: Callable[[], None] | None = None) -> None:
        self.offset = offset
        self.length = length
        self.limit = limit
        self.max_workers = max_workers
        self.max_chunk = max_chunk
        self.on_done = on_done
        self.cancelled = False
        self.finished = False
        self.error: OSError | None = None
        self.error_is_read = False
        self._sleeper: tuple[asyncio.AbstractEventLoop, asyncio.Future[None]] | None = None

    def cancel(self) -> None:
        """Stops starting copies (those in flight finish); any thread."""
        self.cancelled = True
        self.kick()

    def kick(self) -> None:
        """Ends a wait for the rate limit early (the speed changed); any thread."""
        sleeper = self._sleeper
        if sleeper is not None:
            loop, fut = sleeper
            loop.call_soon_threadsafe(_wake, fut)

    async def sleep_ns(self, ns: int) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._sleeper = (loop, fut)
        timer = loop.call_later(ns / 1e9, _wake, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._sleeper = None

    def succeeded(self) -> bool:
        return self.finished and not self.cancelled and self.error is None


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Task:
    __slots__ = ("offset", "length", "zero", "req")

    def __init__(self, offset: int, length: int, req: TrackedRequest) -> None:
        self.offset = offset
        self.length = length
        self.zero = False
        self.req = req


class BlockCopyState:
    """What is left to copy from ``source`` to ``target`` and what is being copied."""

    def __init__(self, owner: BlockNode, source: Child, target: Child, cluster_size: int,
                 bitmap: DirtyBitmap | None = None) -> None:
        """The bitmap of what to copy is an anonymous, disabled one of ``owner`` (the
        filter), everything dirty or a copy of ``bitmap``; ``free`` releases it."""
        self.source = source
        self.target = target
        self.cluster_size = cluster_size
        self.length = source.node.length()
        # Discard on the source what was copied (the backup job's discard-source).
        self.discard_source = False
        self.skip_unallocated = False
        self.progress: Progress | None = None
        # Bytes of one copy: up to MAX_BUFFER, whole clusters within both nodes' limits.
        transfer = min_non_zero(INT_MAX, min_non_zero(source.node.bl.max_transfer,
                                                      target.node.bl.max_transfer))
        self.max_transfer = transfer - transfer % cluster_size
        self._lock = threading.Lock()
        self._in_flight_bytes = 0
        self._copies = RequestTracker()
        self.bitmap = dirty_bitmap.create(owner, cluster_size, None)
        self.bitmap.disabled = True
        if bitmap is None:
            self.bitmap.set(0, self.length)
            return
        try:
            dirty_bitmap.merge_checked(self.bitmap, bitmap)
        except QMPError as exc:
            self.free()
            raise QMPError(f"Failed to merge bitmap '{bitmap.name}' to internal "
                           f"copy-bitmap: {exc.desc}") from None

    def free(self) -> None:
        if self.bitmap in self.bitmap.node.dirty_bitmaps:
            dirty_bitmap.release(self.bitmap)

    def chunk_size(self) -> int:
        if self.max_transfer < self.cluster_size:
            return self.cluster_size
        return min(max(self.cluster_size, MAX_BUFFER), self.max_transfer)

    # ---- the bitmap ---------------------------------------------------------------------

    def reset(self, offset: int, length: int) -> None:
        """Nothing to copy in the range any more (QEMU's block_copy_reset)."""
        with self._lock:
            self.bitmap.reset(offset, length)
            remaining = self.bitmap.count() + self._in_flight_bytes
        if self.progress is not None:
            self.progress.progress_set_remaining(remaining)

    def settled(self, start: int, end: int) -> bool:
        """Whether nothing in [start, end) is left to copy or being copied: a copy call
        there would find nothing to do (no new copy can start, as none is dirty)."""
        with self._lock:
            return (self.bitmap.next_dirty(start, end) < 0
                    and not self._copies.overlapping(start, end))

    def dirty_count(self) -> int:
        with self._lock:
            return self.bitmap.count()

    async def reset_unallocated(self, offset: int) -> int:
        """Drops the clusters from ``offset`` on that the source's top layer does not
        allocate (sync=top); returns how many bytes were looked at."""
        status = await io.block_status(self.source, offset, self.length - offset,
                                       want_zero=False)
        allocated = bool(status.flags & BLOCK_ALLOCATED)
        count = max(status.length, 1)
        if allocated:
            count = -(-count // self.cluster_size) * self.cluster_size
        else:
            # Partial clusters count as allocated: only whole ones are dropped.
            count -= count % self.cluster_size
            if not count:
                return self.cluster_size
            self.reset(offset, count)
        return count

    # ---- copying ------------------------------------------------------------------------

    async def copy(self, call: CopyCall) -> None:
        """Copies what is dirty in the call's range, until nothing is, the call is
        cancelled or a copy failed (QEMU's block_copy_common); a failed copy leaves its
        clusters dirty and is ``call.error``."""
        try:
            while not call.cancelled:
                found = await self._dirty_clusters(call)
                if call.error is not None or call.cancelled:
                    break
                if found:
                    continue
                probe = self._copies.begin(call.offset, call.offset + call.length)
                self._copies.serialise(probe, 1)
                try:
                    waited = await self._copies.wait(probe)
                finally:
                    self._copies.end(probe)
                if waited:
                    continue
                with self._lock:
                    if self.bitmap.next_dirty(call.offset, call.offset + call.length) < 0:
                        break
        finally:
            call.finished = True
            if call.on_done is not None:
                call.on_done()

    def _new_task(self, call: CopyCall, offset: int, length: int) -> _Task | None:
        max_chunk = min_non_zero(self.chunk_size(), call.max_chunk)
        with self._lock:
            start = self.bitmap.next_dirty(offset, offset + length)
            if start < 0:
                return None
            limit = min(offset + length, start + max_chunk, self.length)
            stop = self.bitmap.next_clean(start, limit)
            count = (stop if stop >= 0 else limit) - start
            count = -(-count // self.cluster_size) * self.cluster_size
            self.bitmap.reset(start, min(count, self.length - start))
            self._in_flight_bytes += count
            req = self._copies.begin(start, start + count)
            self._copies.serialise(req, 1)
        return _Task(start, count, req)

    def _shrink(self, task: _Task, length: int) -> None:
        """Gives the tail of a task back to the bitmap (QEMU's block_copy_task_shrink)."""
        with self._lock:
            self._in_flight_bytes -= task.length - length
            self.bitmap.set(task.offset + length, task.length - length)
            task.length = length
        self._copies.shrink(task.req, task.offset + length)

    def _end(self, task: _Task, ok: bool) -> None:
        with self._lock:
            self._in_flight_bytes -= task.length
            if not ok:
                self.bitmap.set(task.offset, task.length)
            remaining = self.bitmap.count() + self._in_flight_bytes
        if self.progress is not None:
            self.progress.progress_set_remaining(remaining)
        self._copies.end(task.req)

    async def _status(self, offset: int, length: int) -> tuple[int, int]:
        """How much of the task is alike (all zeroes, all data, all unallocated), in
        whole clusters (QEMU's block_copy_block_status)."""
        try:
            if self.skip_unallocated:
                status = await io.block_status(self.source, offset, length)
            else:
                status, _ = await io.block_status_above(self.source, offset, length)
            flags, count = status.flags, status.length
        except OSError:
            flags, count = 0, 0
        if count < self.cluster_size:
            return BLOCK_ALLOCATED, self.cluster_size
        if offset + count == self.length:
            return flags, -(-count // self.cluster_size) * self.cluster_size
        return flags, count - count % self.cluster_size

    async def _dirty_clusters(self, call: CopyCall) -> bool:
        """Copies the dirty clusters of the call's range with up to ``max_workers``
        copies at once; whether there were any (QEMU's block_copy_dirty_clusters)."""
        offset, end = call.offset, call.offset + call.length
        found = False
        workers: set[asyncio.Task[None]] = set()
        try:
            while offset < end and call.error is None and not call.cancelled:
                task = self._new_task(call, offset, end - offset)
                if task is None:
                    break
                found = True
                flags, count = await self._status(task.offset, task.length)
                if count < task.length:
                    self._shrink(task, count)
                if self.skip_unallocated and not flags & BLOCK_ALLOCATED:
                    self._end(task, True)
                    offset = task.offset + task.length
                    continue
                task.zero = bool(flags & BLOCK_ZERO)
                if call.limit is not None:
                    delay = call.limit.calculate_delay(0)
                    if delay > 0:
                        self._end(task, False)
                        await call.sleep_ns(delay)
                        continue
                    call.limit.calculate_delay(task.length)
                offset = task.offset + task.length
                if offset >= end and not workers:
                    await self._run(call, task)
                    break
                while len(workers) >= call.max_workers:
                    _, pending = await asyncio.wait(workers,
                                                    return_when=asyncio.FIRST_COMPLETED)
                    workers = set(pending)
                workers.add(asyncio.get_running_loop().create_task(self._run(call, task)))
        finally:
            if workers:
                await asyncio.wait(workers)
        return found

    async def _run(self, call: CopyCall, task: _Task) -> None:
        """One copy (QEMU's block_copy_task_entry): reads then writes, or zero-writes;
        the first error is the call's, with the side it happened on."""
        count = min(task.offset + task.length, self.length) - task.offset
        is_read = False
        try:
            if task.zero:
                await io.write_zeroes(self.target, task.offset, count)
            else:
                is_read = True
                data = await io.read(self.source, task.offset, count)
                is_read = False
                await io.write(self.target, task.offset, data)
        except OSError as exc:
            self._end(task, False)
            if call.error is None:
                call.error = exc
                call.error_is_read = is_read
            return
        if self.progress is not None:
            self.progress.progress_update(task.length)
        self._end(task, True)
        if self.discard_source:
            try:
                await io.discard(self.source, task.offset, count)
            except OSError:
                pass    # advisory, as in QEMU
