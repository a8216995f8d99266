"""The ``snapshot-access`` driver: the point-in-time view that its ``file`` child keeps,
as a node of its own (QEMU's block/snapshot-access.c).

Its file is a copy-before-write filter; reads, block status and discards go to that
filter's snapshot-access API instead of its ordinary requests, so an NBD export of this
node serves the data as it was when the filter was put in place while the filter's
users go on writing (image fleecing).  The view cannot be written.
"""

from __future__ import annotations

import errno
import os

from qsd.block import io
from qsd.block.node import BlockNode, BlockStatus, Child, ChildOpener, Data
from qsd.block.permissions import PERM_ALL, ChildRole
from qsd.block.registry import register
from qsd.qapi.generated import BlockdevOptionsGenericFormat


def _not_supported() -> OSError:
    return OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))


@register("snapshot-access", options=BlockdevOptionsGenericFormat)
class SnapshotAccessNode(BlockNode):
    _file: Child

    async def open(self, options: BlockdevOptionsGenericFormat,
                   children: ChildOpener) -> None:
        self._file = await children.open_child(self, options.file, "file",
                                               ChildRole.DATA | ChildRole.PRIMARY)

    def get_length(self) -> int:
        return self._file.node.length()

    def exact_filename(self) -> str:
        """The file's filename (QEMU's snapshot_access_refresh_filename)."""
        return self._file.node.filename

    def child_perm(self, child: Child, perm: int, shared: int) -> tuple[int, int]:
        """Nothing: the snapshot-access API needs no permissions of its own."""
        return 0, PERM_ALL

    async def do_read(self, offset: int, length: int) -> bytes:
        return await io.read_snapshot(self._file, offset, length)

    async def do_block_status(self, want_zero: bool, offset: int, length: int) -> BlockStatus:
        return await io.snapshot_block_status(self._file.node, want_zero, offset, length)

    async def do_discard(self, offset: int, length: int) -> None:
        await io.discard_snapshot(self._file.node, offset, length)

    async def do_write(self, offset: int, data: Data, fua: bool) -> None:
        raise _not_supported()

    async def do_write_zeroes(self, offset: int, length: int, may_unmap: bool,
                              no_fallback: bool, fua: bool) -> None:
        raise _not_supported()
