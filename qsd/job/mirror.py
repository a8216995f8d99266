"""blockdev-mirror and active commit: a live copy of a node onto another, and the switch
of every user to the copy (QEMU's block/mirror.c and qmp_blockdev_mirror).

A filter node (``MirrorTop``, QEMU's implicit mirror_top) is put on top of the source,
so that every write of the source's users passes the job: in ``background`` copy mode it
marks the written range in the job's dirty bitmap once the write is done; in
``write-blocking`` mode it writes the target too before the request completes.  The job
copies dirty ranges (up to 16 copies of up to 1 MiB at a time, ``buf-size`` bytes in
flight at most) until the bitmap is clean, then is ready; ``job-complete`` drains the
source, copies what is left, and in the graph's transactions points every user of the
source (the filter's edge included) at the target and takes the filter out again.

Copies and writes that copy are serialised over whole granules (a private
RequestTracker), so two copies of one range reach the target in the order they were
made.  A copy counts as a request in flight on both nodes from start to end, so a drain
of either waits for it.

Active commit (block-commit of the active layer) is the same job with the base as the
target: ``commit_active``.
"""

from __future__ import annotations

import asyncio
import errno
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qsd.aio import main_context, wait_tasks
from qsd.block import chain, dirty_bitmap, drain, io
from qsd.block.graph import BlockGraph, check_op_blocker
from qsd.block.node import BLOCK_DATA, BLOCK_ZERO, BlockNode, Child, Data, NodeOptions
from qsd.block.permissions import (
    PERM_ALL,
    PERM_CONSISTENT_READ,
    PERM_RESIZE,
    PERM_WRITE,
    PERM_WRITE_UNCHANGED,
    default_child_perm,
)
from qsd.block.tracking import RequestTracker, TrackedRequest
from qsd.errors import QMPError, error_report
from qsd.job.block_job import BlockJob, root_node
from qsd.job.core import JobRegistry, job_lock
from qsd.job.ratelimit import SLICE_NS
from qsd.job.stream import cluster_of

if TYPE_CHECKING:
    from qsd.qapi.generated import BlockdevMirrorArgs

MAX_IN_FLIGHT = 16
MAX_IO_BYTES = 1 << 20
DEFAULT_BUF_SIZE = MAX_IN_FLIGHT * MAX_IO_BYTES


async def _in_main(fn: Callable[..., Any], *args: Any) -> Any:
    """Runs a graph or drain step in the main loop, where they belong, from the job's
    loop; like QEMU's drain from a coroutine, it yields first."""
    await asyncio.sleep(0)

    async def call() -> Any:
        result = fn(*args)
        if asyncio.iscoroutine(result):
            return await result
        return result
    return await main_context().call(call())


class MirrorTop(BlockNode):
    """The filter a mirror puts on top of its source (QEMU's mirror_top driver): reads
    pass through, writes reach the job too."""

    is_filter = True

    def __init__(self, node_name: str, source: BlockNode, is_commit: bool) -> None:
        super().__init__(node_name, "mirror_top", NodeOptions(), source.ctx, {})
        self.job: MirrorJob | None = None
        self.is_commit = is_commit
        # Set once the job lets go: the filter stops asking anything of the source.
        self.stop = False

    def exact_filename(self) -> str:
        child = self.backing
        return child.node.filename if child is not None else ""

    def child_perm(self, child: Child, perm: int, shared: int) -> tuple[int, int]:
        if self.stop:
            return 0, PERM_ALL
        nperm, nshared = default_child_perm(child.role, perm, shared, True)
        if self.is_commit:
            # The images below the top are written by the job: no consistent reads of
            # them may be asked for, and writes to the base must stay possible.
            nperm &= ~PERM_CONSISTENT_READ
            nshared |= PERM_WRITE
        return nperm, nshared

    def _below(self) -> Child:
        child = self.backing
        if child is None:
            raise OSError(errno.ENOMEDIUM, "No medium found")
        return child

    async def do_read(self, offset: int, length: int) -> bytes:
        return await io.read(self._below(), offset, length)

    async def do_write(self, offset: int, data: Data, fua: bool) -> None:
        job = self.job
        if job is not None and job.copies_writes():
            # The caller may change its buffer meanwhile; both copies must be equal.
            await job.write_blocking("copy", offset, len(data), bytes(data), fua)
            return
        try:
            await io.write(self._below(), offset, data, fua)
        finally:
            if job is not None:
                job.mark_dirty(offset, len(data))

    async def do_write_zeroes(self, offset: int, length: int, may_unmap: bool,
                              no_fallback: bool, fua: bool) -> None:
        job = self.job
        if job is not None and job.copies_writes():
            await job.write_blocking("zero", offset, length, None, fua, may_unmap)
            return
        try:
            await io.write_zeroes(self._below(), offset, length, may_unmap, no_fallback,
                                  fua)
        finally:
            if job is not None:
                job.mark_dirty(offset, length)

    async def do_discard(self, offset: int, length: int) -> None:
        job = self.job
        if job is not None and job.copies_writes():
            await job.write_blocking("discard", offset, length, None, False)
            return
        try:
            await io.discard(self._below(), offset, length)
        finally:
            if job is not None:
                job.mark_dirty(offset, length)


class MirrorJob(BlockJob):
    job_type = "mirror"
    can_complete = True

    def __init__(self, jobs: JobRegistry, job_id: str | None, graph: BlockGraph,
                 top: MirrorTop, source: BlockNode, target: BlockNode, *,
                 sync: str, zero_target: bool, base: BlockNode | None, granularity: int,
                 buf_size: int,
                 on_source_error: str, on_target_error: str, copy_mode: str,
                 replaces: str | None, speed: int, auto_finalize: bool,
                 auto_dismiss: bool) -> None:
        super().__init__(jobs, job_id, graph, top, PERM_CONSISTENT_READ,
                         PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED | PERM_WRITE,
                         speed=speed, auto_finalize=auto_finalize,
                         auto_dismiss=auto_dismiss)
        self.top = top
        self.source = source
        self.target = target
        self.sync = sync
        self.zero_target = zero_target
        self.base = base
        self.base_overlay = chain.find_overlay(source, base) if base is not None else None
        self.granularity = granularity
        self.buf_size = -(-buf_size // granularity) * granularity
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.copy_mode = copy_mode
        self.replaces = replaces
        self.to_replace: BlockNode | None = None
        self.should_complete = False
        self.actively_synced = False
        self.in_drain = False
        self.prepared = False
        self.fail: BaseException | None = None
        self.length = 0
        self.sections: list[drain.Section] = []
        self.bitmap: dirty_bitmap.DirtyBitmap | None = None
        # Copies in flight: their count and bytes, guarded for the filter's threads.
        self._lock = threading.Lock()
        self.in_flight = 0
        self.bytes_in_flight = 0
        self.active_bytes = 0
        self._ops = RequestTracker()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slot_freed: asyncio.Event | None = None
        self._next = 0
        self._last_pause = 0
        is_commit = chain.chain_contains(source, target)
        target_perm, target_shared = PERM_WRITE, PERM_WRITE_UNCHANGED
        try:
            if is_commit:
                if target.length() < source.length():
                    target_perm |= PERM_RESIZE
                target_shared |= PERM_CONSISTENT_READ | PERM_WRITE
            elif chain.chain_contains(source, chain.skip_filters(target)):
                raise QMPError("Cannot mirror to a filter on top of a node in the "
                               "source's backing chain")
            self.target_edge = self.add_node("target", target, target_perm, target_shared)
            self.add_node("source", source, 0,
                          PERM_WRITE_UNCHANGED | PERM_WRITE | PERM_CONSISTENT_READ)
            if is_commit:
                overlay = chain.find_overlay(source, target)
                assert overlay is not None
                filtered_target = chain.filter_or_cow(overlay)
                shared = PERM_WRITE_UNCHANGED | PERM_WRITE
                current = chain.filter_or_cow(source)
                while current is not None and current is not target:
                    if current is filtered_target:
                        shared |= PERM_CONSISTENT_READ
                    self.add_node("intermediate node", current, 0, shared)
                    current = chain.filter_or_cow(current)
            self.bitmap = dirty_bitmap.create(top, granularity, None)
            self.bitmap.disabled = True     # the filter marks it, not the request path
        except QMPError:
            self.remove_all_nodes()
            self.early_fail()
            raise

    # ---- what the filter asks (any thread) -----------------------------------------------

    def copies_writes(self) -> bool:
        """Whether a write goes to the target too before it completes (QEMU's
        should_copy_to_target)."""
        return (self.fail is None and not self.is_cancelled()
                and self.copy_mode == "write-blocking")

    def mark_dirty(self, offset: int, length: int) -> None:
        bitmap = self.bitmap
        if bitmap is not None:
            self.actively_synced = False
            bitmap.set(offset, length)

    def _serialised(self, offset: int, length: int) -> TrackedRequest:
        req = self._ops.begin(offset, offset + length)
        self._ops.serialise(req, self.granularity)
        return req

    async def write_blocking(self, method: str, offset: int, length: int,
                             data: bytes | None, fua: bool, may_unmap: bool = False) -> None:
        """A write of the source's users in write-blocking mode: it waits for copies of
        the same granules, writes the source, then the target (QEMU's
        bdrv_mirror_top_do_write with copy_to_target)."""
        below = self.top._below()
        req = self._serialised(offset, length)
        try:
            await self._ops.wait(req)
            if method == "copy":
                assert data is not None
                await io.write(below, offset, data, fua)
            elif method == "zero":
                await io.write_zeroes(below, offset, length, may_unmap, False, fua)
            else:
                await io.discard(below, offset, length)
            await self._sync_target_write(method, offset, length, data, may_unmap)
        finally:
            self._ops.end(req)

    async def _sync_target_write(self, method: str, offset: int, length: int,
                                 data: bytes | None, may_unmap: bool) -> None:
        """The target half of a write-blocking write: granules the write covers whole
        are clean afterwards; on failure the whole range is dirty again."""
        bitmap = self.bitmap
        assert bitmap is not None
        gran = self.granularity
        first = -(-offset // gran) * gran
        last = (offset + length) // gran * gran
        if first < last:
            bitmap.reset(first, last - first)
        with self._lock:
            self.progress_increase_remaining(length)
            self.active_bytes += length
        try:
            if method == "copy":
                assert data is not None
                await io.write(self.target_edge, offset, data)
            elif method == "zero":
                await io.write_zeroes(self.target_edge, offset, length, may_unmap)
            else:
                await io.discard(self.target_edge, offset, length)
        except OSError as exc:
            bitmap.set(offset, length)
            self.actively_synced = False
            self._error(False, exc)
        else:
            self.progress_update(length)
        finally:
            with self._lock:
                self.active_bytes -= length

    def _error(self, is_read: bool, exc: OSError) -> None:
        """An I/O error of a copy: the policy decides; 'report' fails the job."""
        self.actively_synced = False
        policy = self.on_source_error if is_read else self.on_target_error
        action = self.error_action(policy, is_read, exc.errno or errno.EIO)
        if action == "report" and self.fail is None:
            self.fail = exc

    # ---- copies (the job's loop) ------------------------------------------------------------

    def _start_copy(self) -> None:
        """Takes the next dirty run (up to the I/O size and what the buffer has left)
        out of the bitmap and copies it in a task of its own (QEMU's mirror_iteration)."""
        bitmap = self.bitmap
        assert bitmap is not None
        offset = bitmap.next_dirty(self._next, self.length)
        if offset < 0:
            offset = bitmap.next_dirty(0, self.length)
            if offset < 0:
                return
        gran = self.granularity
        offset -= offset % gran
        limit = min(max(self.buf_size // MAX_IN_FLIGHT, MAX_IO_BYTES),
                    self.buf_size - self.bytes_in_flight)
        end = offset + gran
        while end - offset < limit and end < self.length and bitmap.get(end):
            end += gran
        end = min(end, self.length)
        self._next = end
        bitmap.reset(offset, end - offset)
        req = self._serialised(offset, end - offset)
        with self._lock:
            self.in_flight += 1
            self.bytes_in_flight += end - offset
        next(self.source.requests_started)
        next(self.target.requests_started)
        task = asyncio.get_running_loop().create_task(self._copy(req, offset, end))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.ratelimit_processed_bytes(end - offset)

    async def _copy(self, req: TrackedRequest, offset: int, end: int) -> None:
        """One copy: zeroes where the source reads as zeroes in whole target clusters,
        its data elsewhere; a failed piece is dirty again."""
        bitmap = self.bitmap
        assert bitmap is not None
        source = self.top._below()
        target_cluster = cluster_of(self.target)
        pos = offset
        try:
            await self._ops.wait(req)
            while pos < end:
                try:
                    flags, count = await self._status(source, pos, end - pos)
                    count -= count % self.granularity
                    count = min(max(count, self.granularity), end - pos)
                    aligned = pos % target_cluster == 0 and (
                        (pos + count) % target_cluster == 0 or pos + count == self.length)
                    if not flags & BLOCK_DATA and aligned:
                        if flags & BLOCK_ZERO:
                            await io.write_zeroes(self.target_edge, pos, count, True)
                        else:
                            await io.discard(self.target_edge, pos, count)
                    else:
                        try:
                            data = await io.read(source, pos, count)
                        except OSError as exc:
                            bitmap.set(pos, end - pos)
                            self._error(True, exc)
                            return
                        await io.write(self.target_edge, pos, data)
                except OSError as exc:
                    bitmap.set(pos, end - pos)
                    self._error(False, exc)
                    return
                self.progress_update(count)
                pos += count
        finally:
            self._ops.end(req)
            with self._lock:
                self.in_flight -= 1
                self.bytes_in_flight -= end - offset
            next(self.source.requests_done)
            next(self.target.requests_done)
            if self._slot_freed is not None:
                self._slot_freed.set()

    async def _status(self, source: Child, offset: int, length: int) -> tuple[int, int]:
        try:
            status, _ = await io.block_status_above(source, offset, length)
        except OSError:
            return BLOCK_DATA, length    # copy what cannot be asked about
        return status.flags, status.length

    async def _wait_for_slot(self) -> None:
        """Waits until a copy ends (the job stays busy meanwhile, as in QEMU)."""
        if not self._tasks:
            return
        event = self._slot_freed = asyncio.Event()
        if self.in_flight:
            await event.wait()
        self._slot_freed = None

    async def _wait_for_all_io(self) -> None:
        await wait_tasks(self._tasks)

    async def driver_pause(self) -> None:
        """The copies in flight end before the job stops (QEMU's mirror_pause)."""
        await self._wait_for_all_io()

    async def _flush_target(self) -> bool:
        try:
            await io.flush(self.target_edge)
        except OSError as exc:
            self._error(False, exc)
            return False
        return True

    async def _drain(self) -> None:
        """Drains the source (its users with it) and the target until the job ends."""
        self.in_drain = True
        section = await _in_main(drain.drained_begin, self.graph.lock,
                                 [self.source, self.target])
        self.sections.append(section)

    async def _undrain(self) -> None:
        section = self.sections.pop()
        await _in_main(drain.drained_end, section)
        self.in_drain = False

    # ---- the job ------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            await self._run()
        finally:
            await self._wait_for_all_io()
            if not self.sections:
                await self._drain()

    async def _run(self) -> None:
        if self.is_cancelled():
            return
        self.length = self.source.length()
        target_length = self.target.length()
        if self.base is not None and self.base is self.target:
            if self.length > target_length:
                await io.truncate(self.target_edge, self.length)
        elif self.length != target_length:
            raise QMPError("Source and target image have different sizes")
        self.top.job = self
        if self.length == 0:
            self.transition_to_ready()
            self.actively_synced = True
            while not self.cancel_requested() and not self.should_complete:
                await self.yield_()
            return
        self._last_pause = time.monotonic_ns()
        if self.sync != "none":
            await self._dirty_init()
            if self.is_cancelled():
                return
        await self._copy_loop()

    async def _dirty_init(self) -> None:
        """What to copy at first: for sync=full everything, unless the target reads as
        zeroes already; else (and then) what the layers down to the base allocate."""
        bitmap = self.bitmap
        assert bitmap is not None
        if self.zero_target and not await io.is_all_zeroes(self.target_edge):
            bitmap.set(0, self.length)
            return
        offset = 0
        while offset < self.length:
            await self._throttle()
            if self.is_cancelled():
                return
            allocated, count = await io.is_allocated_above(
                self.source, self.base_overlay, True, offset, self.length - offset)
            if allocated:
                bitmap.set(offset, count)
            offset += count

    async def _throttle(self) -> None:
        """Yields now and then while setting up (QEMU's mirror_throttle)."""
        now = time.monotonic_ns()
        if now - self._last_pause > SLICE_NS:
            self._last_pause = now
            await self.sleep_ns(0)
        else:
            await self.pause_point()

    async def _copy_loop(self) -> None:
        bitmap = self.bitmap
        assert bitmap is not None
        while True:
            if self.fail is not None:
                raise self.fail
            await self.pause_point()
            if self.is_cancelled():
                return
            count = bitmap.count()
            self.progress_set_remaining(self.bytes_in_flight + count + self.active_bytes)
            delta = time.monotonic_ns() - self._last_pause
            if delta < SLICE_NS and self.iostatus == "ok":
                if (self.in_flight >= MAX_IN_FLIGHT or self.bytes_in_flight >= self.buf_size
                        or (count == 0 and self.in_flight > 0)):
                    await self._wait_for_slot()
                    continue
                if count:
                    self._start_copy()
            should_complete = False
            if self.in_flight == 0 and count == 0:
                if not self.is_ready():
                    if not await self._flush_target():
                        continue
                    self.transition_to_ready()
                if self.copy_mode != "background":
                    self.actively_synced = True
                should_complete = self.should_complete or self.cancel_requested()
                count = bitmap.count()
            if count == 0 and should_complete:
                await self._drain()
                if bitmap.count() > 0 or not await self._flush_target():
                    await self._undrain()
                    continue
                return
            if self.is_ready() and not should_complete:
                if self.in_flight == 0 and count == 0:
                    await self.sleep_ns(SLICE_NS)
            else:
                await self.ratelimit_sleep()
            self._last_pause = time.monotonic_ns()

    # ---- the driver's hooks (main loop) -------------------------------------------------------

    def driver_complete(self) -> None:
        if not self.is_ready():
            raise QMPError(f"The active block job '{self.id}' cannot be completed")
        if self.replaces is not None:
            node = self.graph.find_node(self.replaces)
            if node is None:
                raise QMPError(f"Node name '{self.replaces}' not found")
            self.to_replace = node
        self.should_complete = True
        with job_lock:
            paused = self.paused
        if not paused:
            self.enter()

    def driver_cancel(self, force: bool) -> bool:
        # Before the job is ready every cancel is a forced one.
        return force or not self.is_ready()

    def driver_drained_poll(self) -> bool:
        with job_lock:
            if not self.paused and not self.force_cancel and not self.in_drain:
                return True
        return self.in_flight > 0

    def _switch(self) -> int:
        """The job lets go of source and target and, when it completed, every user of
        the source uses the target instead (the first half of QEMU's
        mirror_exit_common; ``clean`` does the rest)."""
        if self.prepared:
            return 0
        self.prepared = True
        ret = 0
        graph = self.graph
        top = self.top
        top.job = None
        if self.bitmap is not None:
            dirty_bitmap.release(self.bitmap)
            self.bitmap = None
        with graph.lock.write():
            if self.target_edge in self.nodes:
                self.nodes.remove(self.target_edge)
                graph.detach_child(self.target_edge)
            top.stop = True
            graph.refresh_permissions(top)
            if self.should_complete and self.ret == 0:
                to_replace = self.to_replace or self.source
                try:
                    graph.replace_node(to_replace, self.target)
                except QMPError as exc:
                    error_report(exc.desc)
                    ret = -errno.EPERM
        return ret

    async def prepare(self) -> int:
        return self._switch()

    def abort(self) -> None:
        self._switch()

    async def clean(self) -> None:
        """The filter goes, and with it the drain that held the nodes since the copy
        ended."""
        self.remove_all_nodes()
        await self.graph.drop_filter(self.top)
        while self.sections:
            drain.drained_end(self.sections.pop())
        self.in_drain = False

    def query(self) -> dict[str, object]:
        info = super().query()
        if self.job_type == "mirror":     # BlockJobInfo's branch for mirror jobs only
            info["actively-synced"] = self.actively_synced
        return info


class CommitActiveJob(MirrorJob):
    """Active commit: the mirror of the active layer into its base, job type commit."""

    job_type = "commit"


def _insert_top(graph: BlockGraph, source: BlockNode, name: str | None,
                is_commit: bool) -> MirrorTop:
    top = MirrorTop(name or graph.generate_node_name(), source, is_commit)
    graph.insert_filter(top, source)
    return top


async def _start(job_class: type[MirrorJob], jobs: JobRegistry, graph: BlockGraph,
                 job_id: str | None, source: BlockNode, target: BlockNode,
                 filter_node_name: str | None, **options: Any) -> None:
    """QEMU's mirror_start_job(): the filter first, then the job on it; nothing stays
    behind on failure."""
    if chain.skip_filters(source) is chain.skip_filters(target):
        raise QMPError("Can't mirror node into itself")
    is_commit = chain.chain_contains(source, target)
    async with graph.changing, drain.drained(graph.lock, [source]):
        with graph.lock.write():
            top = _insert_top(graph, source, filter_node_name, is_commit)
        job: MirrorJob | None = None
        try:
            job = job_class(jobs, job_id, graph, top, source, target, **options)
        except QMPError as exc:
            top.stop = True
            with graph.lock.write():
                graph.refresh_permissions(top)
            error = exc
    if job is None:
        await graph.drop_filter(top)
        raise error
    await job.start()


async def blockdev_mirror(jobs: JobRegistry, graph: BlockGraph,
                          args: BlockdevMirrorArgs) -> None:
    """qmp_blockdev_mirror() and blockdev_mirror_common(): checks in QEMU's order."""
    source = root_node(graph, args.device)
    target = graph.lookup(args.target)
    sync = args.sync.value
    if target.ctx is not source.ctx:
        await graph.set_aio_context(target, source.ctx)
    granularity = args.granularity or 0
    if granularity and (granularity < 512 or granularity > 64 * 1048576):
        raise QMPError("Parameter 'granularity' expects a value in range [512B, 64MB]")
    if granularity & (granularity - 1):
        raise QMPError("Parameter 'granularity' expects a power of 2")
    check_op_blocker(source, "mirror-source")
    check_op_blocker(target, "mirror-target")
    base = chain.backing_chain_next(source)
    if base is None and sync == "top":
        sync = "full"
    replaces = args.replaces
    if replaces is not None:
        node = graph.find_node(replaces)
        if node is None:
            raise QMPError(f"Failed to find node with node-name='{replaces}'")
        check_op_blocker(node, "replace")
        if node is not source and node is not chain.skip_filters(source):
            raise QMPError(f"Cannot replace '{replaces}' by a node mirrored from "
                           f"'{source.node_name}', because it cannot be guaranteed that "
                           "doing so would not lead to an abrupt change of visible data")
        if source.length() != node.length():
            raise QMPError("cannot replace image with a mirror image of different size")
    if sync in ("incremental", "bitmap"):
        raise QMPError(f"Sync mode '{sync}' not supported")
    buf_size = args.buf_size or 0
    if buf_size < 0:
        raise QMPError("Invalid parameter 'buf-size'")
    if not granularity:
        granularity = dirty_bitmap.default_granularity(target)
    await _start(MirrorJob, jobs, graph, args.job_id, source, target, args.filter_node_name,
                 sync=sync, zero_target=sync == "full" and not args.target_is_zero,
                 base=base if sync == "top" else None, granularity=granularity,
                 buf_size=buf_size or DEFAULT_BUF_SIZE,
                 on_source_error=_policy(args.on_source_error),
                 on_target_error=_policy(args.on_target_error),
                 copy_mode=args.copy_mode.value if args.copy_mode is not None
                 else "background",
                 replaces=replaces, speed=args.speed or 0,
                 auto_finalize=args.auto_finalize is not False,
                 auto_dismiss=args.auto_dismiss is not False)


def _policy(value: Any) -> str:
    return str(value.value) if value is not None else "report"


async def commit_active(jobs: JobRegistry, graph: BlockGraph, job_id: str,
                        top: BlockNode, base: BlockNode, on_error: str, speed: int,
                        filter_node_name: str | None, auto_finalize: bool,
                        auto_dismiss: bool) -> None:
    """QEMU's commit_active_start(): a mirror of ``top`` into ``base``, everything below
    the top dirty, completed by the user."""
    await _start(CommitActiveJob, jobs, graph, job_id, top, base, filter_node_name,
                 sync="top", zero_target=False, base=base,
                 granularity=dirty_bitmap.default_granularity(base),
                 buf_size=DEFAULT_BUF_SIZE, on_source_error=on_error,
                 on_target_error=on_error, copy_mode="background", replaces=None,
                 speed=speed, auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
