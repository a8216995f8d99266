"""The ``copy-before-write`` filter: before a write reaches its ``file`` child, the data
it overwrites is copied to the ``target`` child, once per cluster (QEMU's
block/copy-before-write.c).

The target so keeps the file's data as it was when the filter was put in place, for the
clusters that were written since; together with the file's clusters that were not, that
is a point-in-time view, which the snapshot-access driver reads (``do_read_snapshot``):
from the target where a cluster was copied, else from the file, while guest writes to the
clusters being read wait.  The backup job puts this filter above its source and copies
the other clusters itself through the same BlockCopyState, so each cluster is copied
once, by whoever comes first.

Three bitmaps at the copy's cluster size, anonymous and disabled on this node as QEMU
keeps them: what is still to copy (the BlockCopyState's), what was copied (``done``), and
what the view may be read at (``access``: all, or the ``bitmap`` option's dirty clusters;
the view's reader gives up ranges with a discard).  A failed copy fails the guest write
(``on-cbw-error=break-guest-write``) or, with ``break-snapshot``, lets the write go on and
fails the view from then on; ``cbw-timeout`` bounds how long a write waits for its copy.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from qsd.block import dirty_bitmap, io
from qsd.block.block_copy import BlockCopyState, CopyCall, cluster_size_for
from qsd.block.dirty_bitmap import DirtyBitmap
from qsd.block.node import BlockNode, BlockStatus, Child, ChildOpener, Data
from qsd.block.permissions import (
    PERM_ALL,
    PERM_CONSISTENT_READ,
    PERM_RESIZE,
    PERM_WRITE,
    ChildRole,
    default_child_perm,
)
from qsd.block.registry import register
from qsd.block.tracking import RequestTracker, TrackedRequest
from qsd.errors import QMPError
from qsd.qapi.generated import BlockdevOptionsCbw

if TYPE_CHECKING:
    from qsd.block.graph import BlockGraph


def _disabled_bitmap(node: BlockNode, granularity: int) -> DirtyBitmap:
    bitmap = dirty_bitmap.create(node, granularity, None)
    bitmap.disabled = True
    return bitmap


@register("copy-before-write", options=BlockdevOptionsCbw)
class CopyBeforeWriteNode(BlockNode):
    is_filter = True

    bcs: BlockCopyState
    _target: Child
    _done: DirtyBitmap
    _access: DirtyBitmap

    async def open(self, options: BlockdevOptionsCbw, children: ChildOpener) -> None:
        """QEMU's cbw_open(): children, then the bitmap option, then the copy state."""
        await children.open_child(self, options.file, "file",
                                  ChildRole.FILTERED | ChildRole.PRIMARY)
        self._target = await children.open_child(self, options.target, "target",
                                                 ChildRole.DATA)
        bitmap = None
        if options.bitmap is not None:
            bitmap = lookup_bitmap(children, options.bitmap.node, options.bitmap.name)
        self.on_cbw_error = str(getattr(options.on_cbw_error, "value", None)
                                or "break-guest-write")
        self.cbw_timeout = float(options.cbw_timeout or 0)
        # QEMU's BDRV_O_CBW_DISCARD_SOURCE: only the backup job sets it (cbw_append).
        self.discard_source = False
        min_cluster_size = int(options.min_cluster_size or 0)
        self.refresh_length()
        try:
            if min_cluster_size & (min_cluster_size - 1):
                raise QMPError("min-cluster-size needs to be a power of 2")
            cluster_size = cluster_size_for(self._target, min_cluster_size)
            self.bcs = BlockCopyState(self, self._file(), self._target, cluster_size,
                                      bitmap)
        except QMPError as exc:
            raise QMPError(f"Cannot create block-copy-state: {exc.desc}") from None
        self._done = _disabled_bitmap(self, cluster_size)
        self._access = _disabled_bitmap(self, cluster_size)
        self._access.merge(self.bcs.bitmap)
        self._lock = threading.Lock()
        self._frozen_reads = RequestTracker()
        # The first failed copy with on-cbw-error=break-snapshot (an OSError).
        self.snapshot_error: OSError | None = None

    def close(self) -> None:
        """Releases the bitmaps (those an open that failed half-way made too)."""
        for bitmap in list(self.dirty_bitmaps):
            dirty_bitmap.release(bitmap)

    def _file(self) -> Child:
        child = self.file
        assert child is not None
        return child

    def exact_filename(self) -> str:
        """The file's filename (QEMU's cbw_refresh_filename)."""
        return self._file().node.filename

    # ---- permissions ----------------------------------------------------------------------

    def child_perm(self, child: Child, perm: int, shared: int) -> tuple[int, int]:
        """QEMU's cbw_child_perm(): the target is written while others may do anything but
        resize it; once the filter has users, it reads the file consistently and lets
        nobody else write to it or resize it (writes must come through here)."""
        if not child.role & ChildRole.FILTERED:
            return PERM_WRITE, PERM_ALL & ~PERM_RESIZE
        nperm, nshared = default_child_perm(child.role, perm, shared, not self.read_only)
        if self.parents:
            nperm |= PERM_CONSISTENT_READ
            if self.discard_source:
                nperm |= PERM_WRITE
            nshared &= ~(PERM_WRITE | PERM_RESIZE)
        return nperm, nshared

    # ---- guest requests ---------------------------------------------------------------------

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """Reads pass through: the file's own inline read, if it has one."""
        return self._file().node.read_nowait(offset, length)

    async def do_read(self, offset: int, length: int) -> bytes:
        return await io.read(self._file(), offset, length)

    async def do_write(self, offset: int, data: Data, fua: bool) -> None:
        await self._copy_before_write(offset, len(data))
        await io.write(self._file(), offset, data, fua)

    async def do_write_zeroes(self, offset: int, length: int, may_unmap: bool,
                              no_fallback: bool, fua: bool) -> None:
        await self._copy_before_write(offset, length)
        await io.write_zeroes(self._file(), offset, length, may_unmap, no_fallback, fua)

    async def do_discard(self, offset: int, length: int) -> None:
        await self._copy_before_write(offset, length)
        await io.discard(self._file(), offset, length)

    async def do_truncate(self, length: int, exact: bool, prealloc: str) -> None:
        await io.truncate(self._file(), length, exact, prealloc)

    async def _copy_before_write(self, offset: int, length: int) -> None:
        """QEMU's cbw_do_copy_before_write(): copies the clusters the write touches
        (unless the view is broken already), then waits until no reader of the view
        reads them from the file any more."""
        if self.snapshot_error is not None:
            return
        size = self.bcs.cluster_size
        start = offset - offset % size
        end = -(-(offset + length) // size) * size
        # Once every cluster of the range is copied (the common case during a backup),
        # there is nothing to copy or wait for: skip the copy call.
        error = None if self.bcs.settled(start, end) else await self._copy(start, end - start)
        if error is not None and self.on_cbw_error == "break-guest-write":
            raise error
        with self._lock:
            if error is not None:
                if self.snapshot_error is None:
                    self.snapshot_error = error
            else:
                self._done.set(start, end - start)
            if not self._frozen_reads.overlapping(start, end):
                return
            probe = self._frozen_reads.begin(start, end)
            self._frozen_reads.serialise(probe, 1)
        try:
            await self._frozen_reads.wait(probe)
        finally:
            self._frozen_reads.end(probe)

    async def _copy(self, offset: int, length: int) -> OSError | None:
        """One block-copy call, bounded by cbw-timeout: a copy that takes longer goes on
        in the background (counted in flight on this node) and the write gets
        ETIMEDOUT."""
        call = CopyCall(offset, length)
        if not self.cbw_timeout:
            await self.bcs.copy(call)
            return call.error
        task = self.start_background(self.bcs.copy(call))
        try:
            await asyncio.wait_for(asyncio.shield(task), self.cbw_timeout)
        except TimeoutError:
            call.cancel()
            return OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))
        return call.error

    # ---- the snapshot-access API -------------------------------------------------------------

    def _read_lock(self, offset: int, length: int) -> tuple[Child, int, TrackedRequest | None]:
        """Where the view's next bytes at ``offset`` are (the target where copied, else
        the file, whose range is then held against guest writes) and how many
        (QEMU's cbw_snapshot_read_lock); EACCES where the view may not be read."""
        with self._lock:
            if self.snapshot_error is not None:
                raise OSError(errno.EACCES, os.strerror(errno.EACCES))
            if self._access.next_clean(offset, offset + length) >= 0:
                raise OSError(errno.EACCES, os.strerror(errno.EACCES))
            done = self._done.get(offset)
            following = (self._done.next_clean(offset, offset + length) if done
                         else self._done.next_dirty(offset, offset + length))
            count = (following if following >= 0 else offset + length) - offset
            if done:
                return self._target, count, None
            req = self._frozen_reads.begin(offset, offset + count)
            self._frozen_reads.serialise(req, 1)
            return self._file(), count, req

    def _read_unlock(self, req: TrackedRequest | None) -> None:
        if req is not None:
            self._frozen_reads.end(req)

    async def do_read_snapshot(self, offset: int, length: int) -> bytes:
        parts: list[bytes] = []
        while length:
            child, count, req = self._read_lock(offset, length)
            try:
                parts.append(await io.read(child, offset, count))
            finally:
                self._read_unlock(req)
            offset += count
            length -= count
        return b"".join(parts)

    async def do_snapshot_block_status(self, want_zero: bool, offset: int,
                                       length: int) -> BlockStatus:
        child, count, req = self._read_lock(offset, length)
        try:
            return await io.node_block_status(child.node, want_zero, offset, count)
        finally:
            self._read_unlock(req)

    async def do_discard_snapshot(self, offset: int, length: int) -> None:
        """The view's reader is done with whole clusters of the range: they may no longer
        be read, need no copy, and the target may drop them."""
        size = self.bcs.cluster_size
        start = -(-offset // size) * size
        end = (offset + length) - (offset + length) % size
        if end <= start:
            return
        with self._lock:
            self._access.reset(start, end - start)
        self.bcs.reset(start, end - start)
        await io.discard(self._target, start, end - start)


def lookup_bitmap(children: ChildOpener, node_name: str, name: str) -> DirtyBitmap:
    """QEMU's block_dirty_bitmap_lookup(), its texts."""
    node = children.find_node(node_name)
    if node is None:
        raise QMPError(f"Node '{node_name}' not found")
    bitmap = dirty_bitmap.find(node, name)
    if bitmap is None:
        raise QMPError(f"Dirty bitmap '{name}' not found")
    return bitmap


async def cbw_append(graph: BlockGraph, source: BlockNode, target: BlockNode,
                     filter_node_name: str | None, discard_source: bool,
                     min_cluster_size: int, on_cbw_error: str,
                     setup: Callable[[CopyBeforeWriteNode], None] | None = None
                     ) -> CopyBeforeWriteNode:
    """Puts a copy-before-write filter from ``source`` to ``target`` above ``source``
    (QEMU's bdrv_cbw_append, for the backup job); ``setup`` prepares the filter before
    it takes its first write."""
    options: dict[str, object] = {"driver": "copy-before-write"}
    if filter_node_name is not None:
        options["node-name"] = filter_node_name
    options.update({"file": source.node_name, "target": target.node_name,
                    "on-cbw-error": on_cbw_error, "min-cluster-size": min_cluster_size})

    def prepare(node: BlockNode) -> None:
        assert isinstance(node, CopyBeforeWriteNode)
        node.discard_source = node.bcs.discard_source = discard_source
        if setup is not None:
            setup(node)

    node = await graph.insert_node(source, options, prepare)
    assert isinstance(node, CopyBeforeWriteNode)
    return node
