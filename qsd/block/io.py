"""The request path: every request to a node enters here, through a child edge.

QEMU's block/io.c.  A request addressed to a node through one of its parent edges is
counted in flight on that node from its first step to its last (drain waits for the
count, whoever sent the request: an export through its BlockBackend, or a format driver
reading its own metadata through its ``file`` edge).  On the way to the driver it is
shaped to the node's limits:

- reads and writes are padded to ``request_alignment``; an unaligned write reads the
  blocks it touches, patches them and writes them back (read-modify-write), serialised
  against every overlapping request (tracking.py);
- reads past the end of the node read zeroes; requests larger than ``max_transfer`` are
  split;
- zero-writes and discards are cut at their own alignments and maxima; a driver without
  an efficient zero-write gets a buffer of zeroes instead (unless the caller forbids that
  fallback);
- detect-zeroes turns writes of zeroes into zero-writes, the ``discard`` option decides
  whether unmapping is allowed at all;
- before-write hooks run before any write, zero-write or discard reaches the driver;
  once it is done (failed or not, as in QEMU) the node's enabled dirty bitmaps mark it;
- a write past the end grows the node's cached length, a truncate refreshes it.

The inline ``*_nowait`` fast paths do not come through here: BlockBackend binds them to
the driver once, for nodes that need no shaping (see BlockBackend).
"""

from __future__ import annotations

import errno
import os

from qsd.block.dirty_bitmap import set_dirty
from qsd.block.limits import (
    BDRV_MAX_LENGTH,
    INT64_MAX,
    INT_MAX,
    MAX_BOUNCE_BUFFER,
    min_non_zero,
)
from qsd.block.node import (
    BLOCK_ALLOCATED,
    BLOCK_DATA,
    BLOCK_EOF,
    BLOCK_OFFSET_VALID,
    BLOCK_RAW,
    BLOCK_RECURSE,
    BLOCK_ZERO,
    BlockNode,
    BlockStatus,
    Child,
    Data,
    is_zero,
)
from qsd.block.permissions import PERM_WRITE, PERM_WRITE_UNCHANGED
from qsd.block.tracking import TrackedRequest


def _error(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _check(offset: int, length: int) -> None:
    """QEMU's bdrv_check_request(): EIO for requests no image can hold."""
    if offset < 0 or length < 0 or offset > BDRV_MAX_LENGTH - length:
        raise _error(errno.EIO)


def _align_down(value: int, align: int) -> int:
    return value - value % align


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


# ---- read ------------------------------------------------------------------------------------


async def read(child: Child, offset: int, length: int) -> bytes:
    """Reads ``length`` bytes; past the end of the node they read as zeroes."""
    node = child.node
    _check(offset, length)
    next(node.requests_started)
    try:
        align = node.bl.request_alignment
        if align == 1 and not node.copy_on_read:
            return await _aligned_read(node, offset, length, 1)
        start = _align_down(offset, align)
        end = _align_up(offset + length, align)
        tracker = node.tracker
        req = tracker.begin(start, end)
        try:
            await tracker.wait(req)
            data = await _aligned_read(node, start, end - start, align)
        finally:
            tracker.end(req)
        if start == offset and end == offset + length:
            return data
        return bytes(memoryview(data)[offset - start:offset - start + length])
    finally:
        next(node.requests_done)


async def _aligned_read(node: BlockNode, offset: int, length: int, align: int) -> bytes:
    """QEMU's bdrv_aligned_preadv(): zeroes past the end, pieces of max_transfer."""
    max_bytes = _align_up(max(0, node.length() - offset), align)
    max_transfer = _align_down(min_non_zero(node.bl.max_transfer, INT_MAX), align)
    if length <= max_bytes and length <= max_transfer:
        return await node.do_read(offset, length)
    parts: list[bytes] = []
    pos, remaining = offset, length
    while remaining:
        if max_bytes:
            num = min(remaining, max_bytes, max_transfer)
            parts.append(await node.do_read(pos, num))
            max_bytes -= num
        else:
            num = remaining
            parts.append(bytes(num))
        pos += num
        remaining -= num
    return b"".join(parts)


# ---- write -----------------------------------------------------------------------------------


async def write(child: Child, offset: int, data: Data, fua: bool = False) -> None:
    node = child.node
    length = len(data)
    _check(offset, length)
    next(node.requests_started)
    try:
        align = node.bl.request_alignment
        if align == 1 and not node.copy_on_read:
            await _aligned_write(node, offset, data, fua)
            return
        tracker = node.tracker
        req = tracker.begin(offset, offset + length)
        try:
            head = offset % align
            tail = (offset + length) % align
            if head or tail:
                tracker.serialise(req, align)
                await tracker.wait(req)
                start = offset - head
                buf = await _padded(node, start, _align_up(offset + length, align), align,
                                    bool(head), bool(tail))
                buf[head:head + length] = data
                await _aligned_write(node, start, buf, fua)
            else:
                await tracker.wait(req)
                await _aligned_write(node, offset, data, fua)
        finally:
            tracker.end(req)
    finally:
        next(node.requests_done)


async def _padded(node: BlockNode, start: int, end: int, align: int, head: bool,
                  tail: bool) -> bytearray:
    """The aligned range [start, end) with its first and last block read from the node
    (what an unaligned write keeps around its own bytes); the read-modify-write events
    mark the reads of a partial head and tail."""
    buf = bytearray(end - start)
    single = end - start == align
    if head:
        node.debug_event("pwritev_rmw_head")
    if single and tail:
        node.debug_event("pwritev_rmw_tail")
    buf[:align] = await _aligned_read(node, start, align, align)
    if head:
        node.debug_event("pwritev_rmw_after_head")
    if single and tail:
        node.debug_event("pwritev_rmw_after_tail")
    if not single:
        if tail:
            node.debug_event("pwritev_rmw_tail")
        buf[-align:] = await _aligned_read(node, end - align, align, align)
        if tail:
            node.debug_event("pwritev_rmw_after_tail")
    return buf


async def _prepare_write(node: BlockNode, offset: int, length: int) -> None:
    """QEMU's bdrv_co_write_req_prepare(): read-only nodes refuse, hooks run."""
    if node.read_only:
        raise _error(errno.EPERM)
    for hook in node.before_write:
        await hook(node, offset, length)


async def _aligned_write(node: BlockNode, offset: int, data: Data, fua: bool) -> None:
    """QEMU's bdrv_aligned_pwritev(): hooks, detect-zeroes, pieces of max_transfer."""
    length = len(data)
    try:
        await _prepare_write(node, offset, length)
        detect = node.opts.detect_zeroes
        if detect != "off" and is_zero(data):
            node.debug_event("pwritev_zero")
            await _zeroes(node, offset, length, detect == "unmap", False, fua)
        else:
            node.debug_event("pwritev")
            align = node.bl.request_alignment
            max_transfer = _align_down(min_non_zero(node.bl.max_transfer, INT_MAX), align)
            if length <= max_transfer:
                await node.do_write(offset, data, fua)
            else:
                view = memoryview(data)
                for pos in range(0, length, max_transfer):
                    await node.do_write(offset + pos, view[pos:pos + max_transfer], fua)
    finally:
        node.debug_event("pwritev_done")
        node.wrote_to(offset + length)     # failed requests too, as in QEMU
        if node.dirty_bitmaps:
            set_dirty(node.dirty_bitmaps, offset, length)
    node.grew_to(offset + length)


# ---- zero-write --------------------------------------------------------------------------


async def write_zeroes(child: Child, offset: int, length: int, may_unmap: bool = False,
                       no_fallback: bool = False, fua: bool = False) -> None:
    """Zeroes a range; ``may_unmap`` lets the node deallocate it (only with discard=unmap),
    ``no_fallback`` fails with ENOTSUP instead of writing a buffer of zeroes."""
    node = child.node
    _check(offset, length)
    if node.opts.discard != "unmap":
        may_unmap = False
    next(node.requests_started)
    try:
        align = node.bl.request_alignment
        if align == 1 and not node.copy_on_read:
            await _zero_write(node, offset, length, may_unmap, no_fallback, fua)
            return
        tracker = node.tracker
        req = tracker.begin(offset, offset + length)
        try:
            await _unaligned_zero_write(node, req, offset, length, align, may_unmap,
                                        no_fallback, fua)
        finally:
            tracker.end(req)
    finally:
        next(node.requests_done)


async def _unaligned_zero_write(node: BlockNode, req: TrackedRequest, offset: int,
                                length: int, align: int, may_unmap: bool, no_fallback: bool,
                                fua: bool) -> None:
    """QEMU's bdrv_co_do_zero_pwritev(): partial blocks at either end are read, zeroed in
    part and written back; the aligned middle is a zero-write."""
    head = offset % align
    if head or (offset + length) % align:
        node.tracker.serialise(req, align)
    await node.tracker.wait(req)
    if head:
        start = offset - head
        block = bytearray(await _aligned_read(node, start, align, align))
        done = min(length, align - head)
        block[head:head + done] = bytes(done)
        await _aligned_write(node, start, block, fua)
        offset += done
        length -= done
    middle = _align_down(length, align)
    if middle:
        await _zero_write(node, offset, middle, may_unmap, no_fallback, fua)
        offset += middle
        length -= middle
    if length:
        block = bytearray(await _aligned_read(node, offset, align, align))
        block[:length] = bytes(length)
        await _aligned_write(node, offset, block, fua)


async def _zero_write(node: BlockNode, offset: int, length: int, may_unmap: bool,
                      no_fallback: bool, fua: bool) -> None:
    try:
        await _prepare_write(node, offset, length)
        node.debug_event("pwritev_zero")
        await _zeroes(node, offset, length, may_unmap, no_fallback, fua)
    finally:
        node.debug_event("pwritev_done")
        node.wrote_to(offset + length)
        if node.dirty_bitmaps:
            set_dirty(node.dirty_bitmaps, offset, length)
    node.grew_to(offset + length)


async def _zeroes(node: BlockNode, offset: int, length: int, may_unmap: bool,
                  no_fallback: bool, fua: bool) -> None:
    """QEMU's bdrv_co_do_pwrite_zeroes(): pieces at the zero-write alignment and maximum,
    each falling back to a buffer of zeroes where the driver has no zero-write."""
    bl = node.bl
    align = max(bl.pwrite_zeroes_alignment, bl.request_alignment)
    max_zeroes = _align_down(min_non_zero(bl.max_pwrite_zeroes, INT64_MAX), align)
    max_transfer = min_non_zero(bl.max_transfer, MAX_BOUNCE_BUFFER)
    head = offset % align
    tail = (offset + length) % align
    while length > 0:
        num = length
        if head:
            num = min(length, max_transfer, align - head)
            head = (head + num) % align
        elif tail and num > align:
            num -= tail
        num = min(num, max_zeroes)
        try:
            await node.do_write_zeroes(offset, num, may_unmap, no_fallback, fua)
        except OSError as exc:
            if exc.errno != errno.ENOTSUP or no_fallback:
                raise
            num = min(num, max_transfer)
            await node.do_write(offset, bytes(num), fua)
        offset += num
        length -= num


# ---- discard ---------------------------------------------------------------------------------


async def discard(child: Child, offset: int, length: int) -> None:
    """An advisory deallocation; nothing at all unless the node has discard=unmap."""
    node = child.node
    _check(offset, length)
    if node.opts.discard != "unmap":
        return
    next(node.requests_started)
    try:
        if node.bl.request_alignment == 1 and not node.copy_on_read:
            await _discard(node, offset, length)
            return
        tracker = node.tracker
        req = tracker.begin(offset, offset + length)
        try:
            await tracker.wait(req)
            await _discard(node, offset, length)
        finally:
            tracker.end(req)
    finally:
        next(node.requests_done)


async def _discard(node: BlockNode, offset: int, length: int) -> None:
    """QEMU's bdrv_co_pdiscard() loop: small pieces up to the discard alignment, then
    aligned pieces of at most max_pdiscard; drivers may refuse any piece (ENOTSUP)."""
    try:
        await _prepare_write(node, offset, length)
        await _discard_pieces(node, offset, length)
    finally:
        if node.dirty_bitmaps:
            set_dirty(node.dirty_bitmaps, offset, length)


async def _discard_pieces(node: BlockNode, offset: int, length: int) -> None:
    bl = node.bl
    request_align = bl.request_alignment
    align = max(bl.pdiscard_alignment, request_align)
    head = offset % align
    tail = (offset + length) % align
    max_discard = _align_down(min_non_zero(bl.max_pdiscard, INT64_MAX), align)
    while length > 0:
        num = length
        if head:
            num = min(length, align - head)
            if num % request_align:
                num %= request_align
            head = (head + num) % align
        elif tail:
            if num > align:
                num -= tail
            elif tail % request_align and tail > request_align:
                tail %= request_align
                num -= tail
        num = min(num, max_discard)
        try:
            await node.do_discard(offset, num)
        except OSError as exc:
            if exc.errno != errno.ENOTSUP:
                raise
        offset += num
        length -= num


# ---- flush and truncate ------------------------------------------------------------------


async def flush(child: Child) -> None:
    await flush_node(child.node)


async def flush_node(node: BlockNode) -> None:
    """Writes back the node (unless cache.no-flush) and then every child it writes to."""
    next(node.requests_started)
    try:
        if node.read_only:
            return
        primary = node.primary_child()
        if primary is not None:
            primary.node.debug_event("flush_to_os")
        if not node.opts.cache_no_flush:
            if primary is not None:
                primary.node.debug_event("flush_to_disk")
            await node.do_flush()
        for child in list(node.children):
            if child.perm & (PERM_WRITE | PERM_WRITE_UNCHANGED):
                await flush_node(child.node)
    finally:
        next(node.requests_done)


async def truncate(child: Child, length: int, exact: bool = False,
                   prealloc: str = "off") -> None:
    """Resizes the node; its cached length and its parents' follow."""
    node = child.node
    if length < 0:
        raise OSError(errno.EINVAL, "Image size cannot be negative")
    if length > BDRV_MAX_LENGTH:
        raise OSError(errno.EINVAL, f"offset({length}) exceeds maximum({BDRV_MAX_LENGTH})")
    if node.read_only:
        raise OSError(errno.EACCES, "Image is read-only")
    next(node.requests_started)
    try:
        await node.do_truncate(length, exact, prealloc)
        node.refresh_length()
    finally:
        next(node.requests_done)


# ---- copy-on-read ----------------------------------------------------------------------------


async def copy_on_read(child: Child, offset: int, length: int, cluster: int) -> None:
    """Copies into ``child.node`` what its backing chain shows in the parts of the range
    the node does not allocate itself (QEMU's copy-on-read prefetch: the work of
    block-stream).  The request covers whole clusters and is serialising, so no other
    request to them runs between reading the chain and writing the copy; the node must
    have ``copy_on_read`` raised, which makes every request to it tracked."""
    node = child.node
    _check(offset, length)
    next(node.requests_started)
    try:
        align = max(cluster, node.bl.request_alignment)
        start = _align_down(offset, align)
        end = min(_align_up(offset + length, align), node.length())
        tracker = node.tracker
        req = tracker.begin(start, end)
        try:
            tracker.serialise(req, align)
            await tracker.wait(req)
            pos = start
            while pos < end:
                status = await node_block_status(node, False, pos, end - pos)
                if not status.length:
                    break
                if not status.flags & BLOCK_ALLOCATED:
                    data = await _aligned_read(node, pos, status.length,
                                               node.bl.request_alignment)
                    if is_zero(data):
                        await _zero_write(node, pos, status.length, False, False, False)
                    else:
                        await _aligned_write(node, pos, data, False)
                pos += status.length
        finally:
            tracker.end(req)
    finally:
        next(node.requests_done)


# ---- block status ----------------------------------------------------------------------------


# How much data at the start of an image ``is_all_zeroes`` reads to check it (QEMU's
# MAX_ZERO_CHECK_BUFFER): images made by blockdev-create often begin with a little data.
_ZERO_CHECK_HEAD = 128 * 1024


async def is_all_zeroes(child: Child) -> bool:
    """Whether the whole node, with its backing chain, reads as zeroes, as far as block
    status tells cheaply (QEMU's bdrv_co_is_all_zeroes)."""
    length = child.node.length()
    offset = 0
    head = 0
    while offset < length:
        status, _ = await block_status_above(child, offset, length - offset)
        if not status.length:
            break
        if not status.flags & BLOCK_ZERO:
            if offset or status.length > _ZERO_CHECK_HEAD:
                return False
            head = status.length
        offset += status.length
    return not head or is_zero(await read(child, 0, head))


async def is_allocated_above(top: BlockNode, base: BlockNode | None, include_base: bool,
                             offset: int, length: int) -> tuple[bool, int]:
    """Whether some layer from ``top`` down to ``base`` (``base`` itself only with
    ``include_base``; the whole chain when ``base`` is None) allocates the range's start,
    and for how many bytes that answer holds (QEMU's bdrv_is_allocated_above)."""
    count = length
    node: BlockNode | None = top
    while node is not None and (include_base or node is not base):
        status = await node_block_status(node, False, offset, length)
        if status.flags & BLOCK_ALLOCATED:
            return True, status.length
        if count > status.length and (node is top or offset + status.length < node.length()):
            count = status.length
        if node is base:
            break
        below = node.filter_or_cow_child()
        node = below.node if below is not None else None
    return False, count




async def block_status(child: Child, offset: int, length: int,
                       want_zero: bool = True) -> BlockStatus:
    """What ``[offset, offset + length)`` is: BLOCK_* flags, and with BLOCK_OFFSET_VALID
    where the data is (``offset`` in node ``file``).  ``want_zero`` asks for exact zero
    and mapping information rather than the largest answer."""
    return await node_block_status(child.node, want_zero, offset, length)


async def block_status_above(child: Child, offset: int, length: int,
                             want_zero: bool = True) -> tuple[BlockStatus, int]:
    """The status of the whole chain below ``child`` (QEMU's
    bdrv_co_common_block_status_above with no base): where the top layer does not
    allocate a range, the filtered or backing node below answers for it.  Returns the
    status and the depth of the layer that allocates it (1 for the top; 0 if none)."""
    node = child.node
    status = await node_block_status(node, want_zero, offset, length)
    depth = 1
    if not status.length or status.flags & BLOCK_ALLOCATED:
        return status, depth if status.flags & BLOCK_ALLOCATED else 0
    eof = offset + status.length if status.flags & BLOCK_EOF else -1
    length = status.length
    below = node.filter_or_cow_child()
    while below is not None:
        layer = below.node
        status = await node_block_status(layer, want_zero, offset, length)
        depth += 1
        if not status.length:
            # Past the end of a shorter layer: zeroes, as if allocated there.
            status = BlockStatus(BLOCK_ZERO | BLOCK_ALLOCATED, length, 0, layer)
            break
        if status.flags & BLOCK_ALLOCATED:
            status = status._replace(flags=status.flags & ~BLOCK_EOF)
            break
        length = status.length
        below = layer.filter_or_cow_child()
    if not status.flags & BLOCK_ALLOCATED:
        depth = 0
    if offset + status.length == eof:
        status = status._replace(flags=status.flags | BLOCK_EOF)
    return status, depth


async def node_block_status(node: BlockNode, want_zero: bool, offset: int,
                            length: int) -> BlockStatus:
    """QEMU's bdrv_co_do_block_status() for one node and what it maps onto."""
    total = node.length()
    if offset >= total:
        return BlockStatus(BLOCK_EOF, 0)
    if not length:
        return BlockStatus(0, 0)
    length = min(length, total - offset)
    next(node.requests_started)
    try:
        align = node.bl.request_alignment
        start = _align_down(offset, align)
        status = await node.do_block_status(want_zero, start,
                                            _align_up(offset + length, align) - start)
        flags, count, mapping, file = status
        count = min(count - (offset - start), length)
        if count <= 0:
            raise OSError(errno.EIO, f"block status of {node.node_name} made no progress")
        if flags & BLOCK_OFFSET_VALID:
            mapping += offset - start
        if flags & BLOCK_RAW:
            assert file is not None
            flags, count, mapping, file = await node_block_status(file, want_zero, mapping,
                                                                  count)
        else:
            if flags & (BLOCK_DATA | BLOCK_ZERO):
                flags |= BLOCK_ALLOCATED
            elif node.supports_backing:
                cow = node.cow_child()
                if cow is None:
                    flags |= BLOCK_ZERO
                elif want_zero and offset >= cow.node.length():
                    flags |= BLOCK_ZERO
            if (want_zero and flags & BLOCK_RECURSE and file is not None and file is not node
                    and flags & BLOCK_DATA and not flags & BLOCK_ZERO
                    and flags & BLOCK_OFFSET_VALID):
                try:
                    below = await node_block_status(file, want_zero, mapping, count)
                except OSError:
                    below = None     # only extra information: ignore errors
                if below is not None:
                    if below.flags & BLOCK_EOF and (not below.length
                                                    or below.flags & BLOCK_ZERO):
                        # A format may read past the end of its file: zeroes.
                        flags |= BLOCK_ZERO
                    else:
                        count = below.length
                        flags |= below.flags & BLOCK_ZERO
        if offset + count == total:
            flags |= BLOCK_EOF
        return BlockStatus(flags & ~BLOCK_RECURSE, count, mapping, file)
    finally:
        next(node.requests_done)


# ---- the snapshot-access API -------------------------------------------------------------


async def read_snapshot(child: Child, offset: int, length: int) -> bytes:
    """Reads the point-in-time view the node below ``child`` keeps (QEMU's
    bdrv_co_preadv_snapshot); ENOTSUP where the driver has none."""
    node = child.node
    next(node.requests_started)
    try:
        return await node.do_read_snapshot(offset, length)
    finally:
        next(node.requests_done)


async def snapshot_block_status(node: BlockNode, want_zero: bool, offset: int,
                                length: int) -> BlockStatus:
    """The status of the point-in-time view (QEMU's bdrv_co_snapshot_block_status)."""
    next(node.requests_started)
    try:
        return await node.do_snapshot_block_status(want_zero, offset, length)
    finally:
        next(node.requests_done)


async def discard_snapshot(node: BlockNode, offset: int, length: int) -> None:
    """Gives up a range of the point-in-time view (QEMU's bdrv_co_pdiscard_snapshot)."""
    next(node.requests_started)
    try:
        await node.do_discard_snapshot(offset, length)
    finally:
        next(node.requests_done)
