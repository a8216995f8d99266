"""blockdev-backup: a point-in-time copy of a node while it is in use (QEMU's
block/backup.c and the backup half of blockdev.c).

The job puts a copy-before-write filter above the source, so from that moment every
write to the source first copies the clusters it overwrites to the target; the job
copies the other clusters in the background through the filter's BlockCopyState, each
cluster once, whoever comes first.  What is copied depends on ``sync``: everything
(full), what the source's top layer allocates (top: the clusters it does not are dropped
first), the dirty clusters of a bitmap (bitmap; ``incremental`` is bitmap with
on-success), or nothing but what writes push (none: the target then serves as a
fleecing image until the job is cancelled).

A bitmap used by the job is frozen while it runs (a successor records the writes) and
afterwards, by ``bitmap-mode``, becomes the successor (on-success and the job succeeded,
or always), or takes the successor's bits back (never, or on-success and the job
failed); with ``always`` a failed job also leaves the clusters it did not copy dirty.

Pausing cancels the background copy (what is in flight finishes) and resuming starts a
new one, so a drained source sees no requests from the job.  Errors follow
on-source-error / on-target-error.  When the job ends the filter goes and the source's
users use it directly again.
"""

from __future__ import annotations

import asyncio
import errno
import os
from dataclasses import dataclass
from typing import Any

from qsd.block import dirty_bitmap, drain
from qsd.block.block_copy import BlockCopyState, CopyCall
from qsd.block.dirty_bitmap import DirtyBitmap
from qsd.block.drivers.copy_before_write import CopyBeforeWriteNode, cbw_append
from qsd.block.graph import BlockGraph, check_op_blocker
from qsd.block.limits import INT_MAX
from qsd.block.node import BlockNode
from qsd.block.permissions import PERM_ALL
from qsd.errors import QMPError
from qsd.job.block_job import BlockJob
from qsd.job.core import JobRegistry, JobTxn


@dataclass
class BackupPerf:
    """QEMU's BackupPerf (x-perf): how the background copy runs."""

    max_workers: int = 64
    max_chunk: int = 0
    min_cluster_size: int = 0


class BackupJob(BlockJob):
    job_type = "backup"

    def __init__(self, jobs: JobRegistry, job_id: str | None, graph: BlockGraph,
                 cbw: CopyBeforeWriteNode, target: BlockNode, *, sync: str,
                 sync_bitmap: DirtyBitmap | None, bitmap_mode: str | None,
                 on_source_error: str, on_target_error: str, perf: BackupPerf,
                 speed: int, auto_finalize: bool, auto_dismiss: bool,
                 txn: JobTxn | None) -> None:
        self.cbw = cbw
        self.bcs: BlockCopyState = cbw.bcs
        self._call: CopyCall | None = None
        self._call_task: asyncio.Task[None] | None = None
        super().__init__(jobs, job_id, graph, cbw, 0, PERM_ALL, speed=speed,
                         auto_finalize=auto_finalize, auto_dismiss=auto_dismiss, txn=txn)
        self.target = target
        self.sync = sync
        self.sync_bitmap = sync_bitmap
        self.bitmap_mode = bitmap_mode
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.perf = perf
        self.length = cbw.bcs.length
        self.bcs.progress = self
        # QEMU sets the estimate as the job starts to run; set here, it is there before
        # the command replies whichever thread the job runs in.
        self.progress_set_remaining(self.bcs.dirty_count())
        self.add_node("target", target, 0, PERM_ALL)

    # ---- the work ---------------------------------------------------------------------------

    async def run(self) -> None:
        if self.sync == "top":
            offset = 0
            while offset < self.length:
                if self.is_cancelled():
                    return
                await self.pause_point()
                if self.is_cancelled():
                    return
                offset += await self.bcs.reset_unallocated(offset)
            self.bcs.skip_unallocated = False
        if self.sync == "none":
            # Only the filter's copies before writes: wait to be cancelled.
            while not self.is_cancelled():
                await self.yield_()
            return
        await self._copy_loop()

    async def _copy_loop(self) -> None:
        """QEMU's backup_loop(): one background copy of everything dirty, again after a
        pause or an ignored error, until it succeeds, fails or the job is cancelled."""
        size = self.bcs.cluster_size
        end = -(-self.length // size) * size
        while True:
            call = CopyCall(0, end, limit=self.limit, max_workers=self.perf.max_workers,
                            max_chunk=self.perf.max_chunk, on_done=self.enter)
            self._call = call
            self._call_task = asyncio.get_running_loop().create_task(self.bcs.copy(call))
            try:
                while not call.finished and not self.is_cancelled():
                    await self.yield_()
                if not call.finished:
                    call.cancel()
                    await self._call_task
                    return
            finally:
                self._call = self._call_task = None
            if self.is_cancelled() or call.succeeded():
                return
            if call.cancelled:
                continue      # paused meanwhile: copy what is left
            error = call.error
            assert error is not None
            code = error.errno or errno.EIO
            policy = self.on_source_error if call.error_is_read else self.on_target_error
            action = self.error_action(policy, call.error_is_read, code)
            if action == "report":
                raise OSError(code, os.strerror(code))
            if action == "stop":
                await self.pause_point()

    async def driver_pause(self) -> None:
        """QEMU's backup_pause(): the background copy stops before the job does."""
        call, task = self._call, self._call_task
        if call is not None and task is not None and not call.finished:
            call.cancel()
            await task

    def driver_set_speed(self, speed: int) -> None:
        call = getattr(self, "_call", None)
        if call is not None:
            call.kick()

    # ---- completion ----------------------------------------------------------------------------

    def _cleanup_sync_bitmap(self, ok: bool) -> None:
        """QEMU's backup_cleanup_sync_bitmap()."""
        bitmap = self.sync_bitmap
        assert bitmap is not None
        mode = self.bitmap_mode
        if (ok or mode == "always") and mode != "never":
            kept = bitmap.abdicate()
        else:
            kept = bitmap.reclaim()
        if not ok and mode == "always":
            kept.merge(self.bcs.bitmap)

    def commit(self) -> None:
        if self.sync_bitmap is not None:
            self._cleanup_sync_bitmap(True)

    def abort(self) -> None:
        if self.sync_bitmap is not None:
            self._cleanup_sync_bitmap(False)

    async def clean(self) -> None:
        self.remove_all_nodes()
        await self.graph.drop_filter(self.cbw)


# ---- blockdev-backup ----------------------------------------------------------------------------


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def _check_common(args: Any, source: BlockNode) -> tuple[str, DirtyBitmap | None,
                                                          str | None, BackupPerf]:
    """QEMU's do_backup_common() checks, in its order: the sync mode, the bitmap, its
    mode; returns them with the x-perf settings."""
    sync = str(_value(args.sync))
    bitmap_mode = _value(args.bitmap_mode)
    perf = BackupPerf()
    if args.x_perf is not None:
        if args.x_perf.max_workers is not None:
            perf.max_workers = args.x_perf.max_workers
        if args.x_perf.max_chunk is not None:
            perf.max_chunk = args.x_perf.max_chunk
        if args.x_perf.min_cluster_size is not None:
            perf.min_cluster_size = args.x_perf.min_cluster_size
    if sync in ("bitmap", "incremental") and args.bitmap is None:
        raise QMPError(f"must provide a valid bitmap name for '{sync}' sync mode")
    if sync == "incremental":
        if bitmap_mode is not None and bitmap_mode != "on-success":
            raise QMPError("Bitmap sync mode must be 'on-success' when using sync mode "
                           f"'{sync}'")
        sync, bitmap_mode = "bitmap", "on-success"
    bitmap = None
    if args.bitmap is not None:
        bitmap = dirty_bitmap.find(source, args.bitmap)
        if bitmap is None:
            raise QMPError(f"Bitmap '{args.bitmap}' could not be found")
        if bitmap_mode is None:
            raise QMPError("Bitmap sync mode must be given when providing a bitmap")
        bitmap.check(dirty_bitmap.ALLOW_RO)
        if sync == "none":
            raise QMPError(f"sync mode '{sync}' does not produce meaningful bitmap outputs")
        if bitmap_mode == "never" and sync != "bitmap":
            raise QMPError(f"Bitmap sync mode '{bitmap_mode}' has no meaningful effect "
                           f"when combined with sync mode '{sync}'")
    if args.bitmap is None and bitmap_mode is not None:
        raise QMPError("Cannot specify bitmap sync mode without a bitmap")
    return sync, bitmap, bitmap_mode, perf


async def create_backup_job(jobs: JobRegistry, graph: BlockGraph, args: Any,
                            txn: JobTxn | None = None) -> tuple[BackupJob, drain.Section]:
    """QEMU's blockdev_backup_action() up to the job (created, not started): the nodes,
    the target moved to the source's iothread, then with the source drained the
    checks of do_backup_common() and backup_job_create().

    The source stays drained until the caller ends the returned section with
    ``end_prepared`` once it started the job or gave up on it (QEMU's .clean of the
    action), and the job, a user of the drained source, is paused meanwhile: it starts
    paused and runs once the section ends, as QEMU's does."""
    source = graph.find_node(args.device)
    if source is None:
        raise QMPError(f"Cannot find device='{args.device}' nor node-name='{args.device}'")
    target = graph.find_node(args.target)
    if target is None:
        raise QMPError(f"Cannot find device='{args.target}' nor node-name='{args.target}'")
    await graph.set_aio_context(target, source.ctx)
    section = await drain.drained_begin(graph.lock, [source])
    try:
        sync, bitmap, bitmap_mode, perf = _check_common(args, source)
        job = await _backup_job_create(jobs, graph, args, source, target, sync, bitmap,
                                       bitmap_mode, perf, txn)
    except BaseException:
        drain.drained_end(section)
        raise
    job.pause()
    return job, section


async def end_prepared(job: BackupJob, section: drain.Section) -> None:
    """The end of the drained section of ``create_backup_job``: the job runs.  QEMU
    enters a job of the main loop at once when it resumes, so it is running again
    before the command that started it replies."""
    drain.drained_end(section)
    job.resume()
    await job.settle()


async def _backup_job_create(jobs: JobRegistry, graph: BlockGraph, args: Any,
                             source: BlockNode, target: BlockNode, sync: str,
                             bitmap: DirtyBitmap | None, bitmap_mode: str | None,
                             perf: BackupPerf, txn: JobTxn | None) -> BackupJob:
    """QEMU's backup_job_create()."""
    if source is target:
        raise QMPError("Source and target cannot be the same")
    if args.compress:
        # No driver of qsd writes compressed clusters (QEMU's bdrv_supports_compressed_
        # writes() is false for every node), and a daemon's node has no device name.
        raise QMPError("Compression is not supported for this drive ")
    check_op_blocker(source, "backup-source")
    check_op_blocker(target, "backup-target")
    if not 1 <= perf.max_workers <= INT_MAX:
        raise QMPError(f"max-workers must be between 1 and {INT_MAX}")
    if perf.max_chunk < 0:
        raise QMPError("max-chunk must be zero (which means no limit) or positive")
    if bitmap is not None:
        if bitmap_mode != "never":
            bitmap.check(dirty_bitmap.DEFAULT)
        bitmap.create_successor()
    cbw: CopyBeforeWriteNode | None = None
    try:
        if target.length() != source.length():
            raise QMPError("Source and target image have different sizes")

        def prepare(node: CopyBeforeWriteNode) -> None:
            """The copy bitmap, set up before the filter takes its first write."""
            bcs = node.bcs
            if sync == "bitmap":
                assert bitmap is not None
                bcs.bitmap.clear()
                bcs.bitmap.merge(bitmap)
            elif sync == "top":
                bcs.skip_unallocated = True

        cbw = await cbw_append(graph, source, target, args.filter_node_name,
                               bool(args.discard_source), perf.min_cluster_size,
                               str(_value(args.on_cbw_error) or "break-guest-write"),
                               prepare)
        cluster_size = cbw.bcs.cluster_size
        if perf.max_chunk and perf.max_chunk < cluster_size:
            raise QMPError(f"Required max-chunk ({perf.max_chunk}) is less than backup "
                           f"cluster size ({cluster_size})")
        return BackupJob(
            jobs, args.job_id, graph, cbw, target, sync=sync, sync_bitmap=bitmap,
            bitmap_mode=bitmap_mode,
            on_source_error=str(_value(args.on_source_error) or "report"),
            on_target_error=str(_value(args.on_target_error) or "report"),
            perf=perf, speed=args.speed or 0,
            auto_finalize=args.auto_finalize is not False,
            auto_dismiss=args.auto_dismiss is not False, txn=txn)
    except BaseException:
        if bitmap is not None:
            bitmap.reclaim()
        if cbw is not None:
            await graph.drop_filter(cbw)
        raise
