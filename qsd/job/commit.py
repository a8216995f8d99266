"""block-commit: the data of images in a backing chain moves down into an image below
them (QEMU's block/commit.c and qmp_block_commit).

Committing the active layer (the image users write to) is a mirror whose target is
the base (mirror.py, ``commit_active``).  Committing an intermediate image is this job:
wherever a layer from ``top`` down to the base's overlay allocates data, it is read
through ``top`` and written into the base; then every image that used ``top`` as its
backing file uses the base instead (edge and image header), and the images between
are dropped.

Unlike QEMU the job inserts no commit_top filter above ``top``: it shares consistent
reads of the intermediate images instead (the images above still read through them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qsd.block import chain, drain, io
from qsd.block.graph import BlockGraph, check_op_blocker
from qsd.block.node import BlockNode
from qsd.block.permissions import (
    PERM_ALL,
    PERM_CONSISTENT_READ,
    PERM_RESIZE,
    PERM_WRITE,
    PERM_WRITE_UNCHANGED,
    ChildRole,
)
from qsd.errors import QMPError, error_report
from qsd.job.block_job import BlockJob, root_node
from qsd.job.core import JobRegistry
from qsd.job.mirror import commit_active
from qsd.job.stream import backing_format

if TYPE_CHECKING:
    from qsd.qapi.generated import BlockCommitArgs

COMMIT_BUFFER_SIZE = 512 * 1024


class CommitJob(BlockJob):
    job_type = "commit"

    def __init__(self, jobs: JobRegistry, job_id: str | None, graph: BlockGraph,
                 node: BlockNode, base: BlockNode, top: BlockNode,
                 backing_file: str | None, mask_protocol: bool, on_error: str, speed: int,
                 auto_finalize: bool, auto_dismiss: bool) -> None:
        if chain.skip_filters(top) is chain.skip_filters(base):
            raise QMPError("Invalid files for merge: top and base are the same")
        base_perm = PERM_CONSISTENT_READ | PERM_WRITE
        if base.length() < top.length():
            base_perm |= PERM_RESIZE
        super().__init__(jobs, job_id, graph, node, 0, PERM_ALL, speed=speed,
                         auto_finalize=auto_finalize, auto_dismiss=auto_dismiss)
        self.base = base
        self.top = top
        self.backing_file = backing_file
        self.mask_protocol = mask_protocol
        self.on_error = on_error
        found = chain.find_overlay(top, base)
        assert found is not None
        self.base_overlay = found
        try:
            # The images between disappear from the chain: nobody else may write them.
            shared = PERM_WRITE_UNCHANGED | PERM_WRITE | PERM_CONSISTENT_READ
            current: BlockNode | None = top
            while current is not None and current is not base:
                edge = self.add_node("intermediate node", current, 0, shared)
                if current is top:
                    self.top_edge = edge
                current = chain.filter_or_cow(current)
            self.base_edge = self.add_node("base", base, base_perm,
                                           PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED)
        except QMPError:
            self.remove_all_nodes()
            self.early_fail()
            raise

    async def run(self) -> None:
        length = self.top.length()
        self.progress_set_remaining(length)
        if self.base.length() < length:
            await io.truncate(self.base_edge, length)
        offset = 0
        while offset < length:
            await self.ratelimit_sleep()
            if self.is_cancelled():
                break
            copy = False
            in_source = True
            try:
                copy, n = await io.is_allocated_above(self.top, self.base_overlay, True,
                                                      offset, COMMIT_BUFFER_SIZE)
                if copy:
                    data = await io.read(self.top_edge, offset, n)
                    in_source = False
                    await io.write(self.base_edge, offset, data)
            except OSError as exc:
                if self.error_action(self.on_error, in_source, exc.errno or 0) == "report":
                    raise
                continue
            self.progress_update(n)
            if copy:
                self.ratelimit_processed_bytes(n)
            offset += n

    async def prepare(self) -> int:
        """Every image above ``top`` uses the base instead (QEMU's
        bdrv_drop_intermediate): the edges, then each image header."""
        graph = self.graph
        base = self.base
        with graph.lock.write():
            graph.detach_child(self.base_edge)
        self.nodes.remove(self.base_edge)
        name = self.backing_file or base.filename
        fmt = backing_format(chain.skip_filters(base), self.mask_protocol)
        async with drain.drained(graph.lock, [self.top]):
            users = [c for c in self.top.parents if c.parent is not self]
            current: BlockNode | None = self.top
            while current is not None and current is not base:
                self.dropped.append(current)
                current = chain.filter_or_cow(current)
            with graph.lock.write():
                try:
                    for child in users:
                        graph.replace_child(child, base)
                except QMPError as exc:
                    self.dropped.clear()
                    error_report(exc.desc)
                    return -1
        for child in users:
            overlay = child.parent_node
            if overlay is None or not child.role & ChildRole.COW:
                continue
            try:
                await overlay.change_backing_file(name, fmt)
            except OSError as exc:
                error_report(f"Could not update backing file link: {exc.strerror}")
                return -(exc.errno or 5)
        return 0


async def block_commit(jobs: JobRegistry, graph: BlockGraph, args: BlockCommitArgs) -> None:
    """qmp_block_commit(): the checks in QEMU's order; the active layer is committed by
    a mirror, an intermediate image by CommitJob."""
    on_error = args.on_error.value if args.on_error is not None else "report"
    speed = args.speed or 0
    auto_finalize = args.auto_finalize is not False
    auto_dismiss = args.auto_dismiss is not False
    # libvirt probes for the command with DeviceNotFound: the device comes first.
    try:
        node = root_node(graph, args.device)
    except QMPError:
        if graph.find_node(args.device) is None:
            raise QMPError(f"Device '{args.device}' not found", "DeviceNotFound") from None
        raise
    check_op_blocker(node, "commit-source")
    top: BlockNode | None = node
    if args.top_node is not None and args.top is not None:
        raise QMPError("'top-node' and 'top' are mutually exclusive")
    if args.top_node is not None:
        top = graph.lookup_node(args.top_node)
        if not chain.chain_contains(node, top):
            raise QMPError(f"'{args.top_node}' is not in this backing file chain")
    elif args.top is not None and node.filename != args.top:
        top = chain.find_backing_image(node, args.top)
    if top is None:
        raise QMPError(f"Top image file {args.top} not found")
    base: BlockNode | None
    if args.base_node is not None and args.base is not None:
        raise QMPError("'base-node' and 'base' are mutually exclusive")
    if args.base_node is not None:
        base = graph.lookup_node(args.base_node)
        if not chain.chain_contains(top, base):
            raise QMPError(f"'{args.base_node}' is not in this backing file chain")
    elif args.base is not None:
        base = chain.find_backing_image(top, args.base)
        if base is None:
            raise QMPError(f"Can't find '{args.base}' in the backing chain")
    else:
        base = chain.find_base(top)
    end = chain.filter_or_cow(base)
    current: BlockNode | None = top
    while current is not None and current is not end:
        check_op_blocker(current, "commit-target")
        current = chain.filter_or_cow(current)
    if top is base:
        raise QMPError("cannot commit an image into itself")
    writers = 0
    for child in top.parents:
        writers |= child.perm
    if top is node or writers & PERM_WRITE:
        if args.backing_file is not None:
            if top is node:
                raise QMPError("'backing-file' specified, but 'top' is the active layer")
            raise QMPError("'backing-file' specified, but 'top' has a writer on it")
        await commit_active(jobs, graph, args.job_id or "", top, base, on_error, speed,
                            args.filter_node_name, auto_finalize, auto_dismiss)
        return
    overlay = chain.find_overlay(node, top)
    assert overlay is not None
    check_op_blocker(overlay, "commit-target")
    job = CommitJob(jobs, args.job_id, graph, node, base, top, args.backing_file,
                    bool(args.backing_mask_protocol), on_error, speed, auto_finalize,
                    auto_dismiss)
    await job.start()
