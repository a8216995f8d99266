"""block-stream: the data of a backing chain moves up into the image on top of it
(QEMU's block/stream.c and qmp_block_stream).

The job walks the image in pieces of 512 KiB; where the top image does not allocate a
piece and a layer between it and the base does, it copies the piece up with a
copy-on-read request (``io.copy_on_read``: serialising, so a write to the same clusters
never lands between the read of the chain and the copy).  Once done, the top image's
backing edge points at the base (or at nothing when the whole chain was streamed), its
header names the base, and the layers in between are dropped.

Unlike QEMU the job inserts no copy-on-read filter node, so guest reads do not help it
along and no implicit node shows in the queries while it runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qsd.block import chain, drain, io
from qsd.block.graph import BlockGraph, check_op_blocker
from qsd.block.node import BlockNode
from qsd.block.permissions import PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED
from qsd.errors import QMPError, error_report
from qsd.job.block_job import BlockJob
from qsd.job.core import JobRegistry

if TYPE_CHECKING:
    from qsd.qapi.generated import BlockStreamArgs

STREAM_CHUNK = 512 * 1024
_BASIC = PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED


def cluster_of(node: BlockNode) -> int:
    """The unit copies into ``node`` are made in: its cluster size where it has one."""
    size = node.get_info().get("cluster-size", 0) if node.has_info() else 0
    return max(size if isinstance(size, int) else 0, node.bl.request_alignment)


def backing_format(base: BlockNode, mask_protocol: bool) -> str:
    """The format an image header records for ``base`` (``raw`` for a protocol node
    when the caller masks protocols, as backing-mask-protocol asks)."""
    if mask_protocol and base.is_protocol:
        return "raw"
    return base.driver


class StreamJob(BlockJob):
    job_type = "stream"

    def __init__(self, jobs: JobRegistry, job_id: str | None, graph: BlockGraph,
                 node: BlockNode, base_overlay: BlockNode, above_base: BlockNode,
                 backing_file: str | None, mask_protocol: bool, on_error: str, speed: int,
                 auto_finalize: bool, auto_dismiss: bool) -> None:
        # Writes of the data that is already there; nobody may resize the image, as its
        # length is read once at the start.
        super().__init__(jobs, job_id, graph, node, _BASIC, _BASIC | PERM_WRITE,
                         speed=speed, auto_finalize=auto_finalize,
                         auto_dismiss=auto_dismiss)
        self.node = node
        self.base_overlay = base_overlay
        self.above_base = above_base
        self.backing_file = backing_file
        self.mask_protocol = mask_protocol
        self.on_error = on_error
        # The layers that disappear from the chain: nobody may write them meanwhile.
        base = chain.filter_or_cow(above_base)
        try:
            below = chain.filter_or_cow(node)
            while below is not None and below is not base:
                self.add_node("intermediate node", below, 0, _BASIC)
                below = chain.filter_or_cow(below)
        except QMPError:
            self.remove_all_nodes()
            self.early_fail()
            raise
        node.copy_on_read += 1
        node.notify_changed()     # its users give up their inline writes

    async def run(self) -> None:
        top = chain.skip_filters(self.node)
        if top is self.base_overlay:
            return      # nothing to stream
        length = self.node.length()
        self.progress_set_remaining(length)
        below = chain.filter_or_cow(top)
        cluster = cluster_of(top)
        error: OSError | None = None
        offset = 0
        while offset < length:
            await self.ratelimit_sleep()
            if self.is_cancelled():
                break
            copy = False
            try:
                allocated, n = await io.is_allocated_above(top, top, True, offset,
                                                           STREAM_CHUNK)
                if not allocated and below is not None:
                    copy, n = await io.is_allocated_above(below, self.base_overlay, True,
                                                          offset, n)
                    if not copy and not n:
                        n = length - offset      # past the end of the backing chain
                if copy:
                    await io.copy_on_read(self.main, offset, n, cluster)
            except OSError as exc:
                action = self.error_action(self.on_error, True, exc.errno or 0)
                if action == "stop":
                    continue
                error = error or exc
                if action == "report":
                    break
            self.progress_update(n)
            if copy:
                self.ratelimit_processed_bytes(n)
            offset += n
        if error is not None:
            raise error     # an ignored error still keeps the backing file

    async def prepare(self) -> int:
        """The top image's backing edge and header name the base now."""
        top = chain.skip_filters(self.node)
        old = top.cow_child()
        if old is None:
            return 0
        base = chain.filter_or_cow(self.above_base)
        base_id = base_fmt = ""
        if base is not None:
            unfiltered = chain.skip_filters(base)
            base_id = self.backing_file or unfiltered.filename
            base_fmt = backing_format(unfiltered, self.mask_protocol)
        graph = self.graph
        async with drain.drained(graph.lock, [old.node]):
            below: BlockNode | None = old.node
            while below is not None and below is not base:
                self.dropped.append(below)
                below = chain.filter_or_cow(below)
            with graph.lock.write():
                try:
                    graph.set_backing(top, base)
                except QMPError as exc:
                    self.dropped.clear()
                    error_report(exc.desc)
                    return -1
        try:
            await top.change_backing_file(base_id, base_fmt)
        except OSError as exc:
            return -(exc.errno or 5)
        return 0

    async def clean(self) -> None:
        self.node.copy_on_read -= 1
        self.node.notify_changed()


async def block_stream(jobs: JobRegistry, graph: BlockGraph, args: BlockStreamArgs) -> None:
    """qmp_block_stream(): the checks in QEMU's order, then the job."""
    if args.base is not None and args.base_node is not None:
        raise QMPError("'base' and 'base-node' cannot be specified at the same time")
    if args.base is not None and args.bottom is not None:
        raise QMPError("'base' and 'bottom' cannot be specified at the same time")
    if args.bottom is not None and args.base_node is not None:
        raise QMPError("'bottom' and 'base-node' cannot be specified at the same time")
    on_error = args.on_error.value if args.on_error is not None else "report"
    node = graph.lookup(args.device)
    base: BlockNode | None = None
    bottom: BlockNode | None = None
    if args.base is not None:
        base = chain.find_backing_image(node, args.base)
        if base is None:
            raise QMPError(f"Can't find '{args.base}' in the backing chain")
    if args.base_node is not None:
        base = graph.lookup_node(args.base_node)
        if base is node or not chain.chain_contains(node, base):
            raise QMPError(f"Node '{args.base_node}' is not a backing image of "
                           f"'{args.device}'")
    if args.bottom is not None:
        bottom = graph.lookup_node(args.bottom)
        if bottom.is_filter:
            raise QMPError(f"Node '{args.bottom}' is a filter, use a non-filter node as "
                           "'bottom'")
        if not chain.chain_contains(node, bottom):
            raise QMPError(f"Node '{args.bottom}' is not in a chain starting from "
                           f"'{args.device}'")
    end = chain.filter_or_cow(bottom) if bottom is not None else base
    current: BlockNode | None = node
    while current is not None and current is not end:
        check_op_blocker(current, "stream")
        current = chain.filter_or_cow(current)
    if base is None and args.backing_file is not None:
        raise QMPError("backing file specified, but streaming the entire chain")
    if bottom is not None:
        base_overlay = bottom
    else:
        found = (chain.find_overlay(node, base) if base is not None
                 else chain.find_base(node))
        if found is None:
            assert base is not None
            raise QMPError(f"'{base.node_name}' is not in the backing chain of "
                           f"'{node.node_name}'")
        base_overlay = found
    above_base = _above(base_overlay, base)
    speed = args.speed or 0
    async with drain.drained(graph.lock, [node]):
        job = StreamJob(jobs, args.job_id, graph, node, base_overlay, above_base,
                        args.backing_file, bool(args.backing_mask_protocol), on_error, speed,
                        args.auto_finalize is not False, args.auto_dismiss is not False)
    await job.start()


def _above(base_overlay: BlockNode, base: BlockNode | None) -> BlockNode:
    """The node right above ``base`` (filters between the base's overlay and the base
    included), or the base's overlay itself when streaming the whole chain."""
    above = base_overlay
    if base is None:
        return above
    cow = above.cow_child()
    if cow is not None and cow.node is not base:
        above = cow.node
        while (below := chain.filter_or_cow(above)) is not None and below is not base:
            above = below
    return above
