"""The ``raw`` format driver: a window (offset, size) onto its ``file`` child.

Without offset and size it behaves like a filter (its child's role is FILTERED), and its
fast paths are the child's own (BlockBackend binds them directly, saving a Python call
per request).
"""

from __future__ import annotations

import errno

from qsd.block import io
from qsd.block.node import (
    BLOCK_OFFSET_VALID,
    BLOCK_RAW,
    BlockNode,
    BlockStatus,
    Child,
    ChildOpener,
    Data,
)
from qsd.block.permissions import PERM_RESIZE, PERM_WRITE, ChildRole, default_child_perm
from qsd.block.registry import register
from qsd.errors import QMPError
from qsd.qapi.generated import BlockdevOptionsRaw


@register("raw", options=BlockdevOptionsRaw)
class RawNode(BlockNode):
    is_format = True
    strong_options = ("offset", "size")

    offset = 0
    size: int | None = None
    _file: Child | None = None

    async def open(self, options: BlockdevOptionsRaw, children: ChildOpener) -> None:
        """QEMU's raw_open(): the options' range checks (QemuOpts sizes), the child, then
        the window against the child's length."""
        for name, value in (("offset", options.offset), ("size", options.size)):
            if value is not None and value < 0:
                raise QMPError(f"Value '{value}' is out of range for parameter '{name}'")
        self.offset = options.offset or 0
        self.size = options.size
        role = (ChildRole.DATA if self.offset or self.size is not None
                else ChildRole.FILTERED) | ChildRole.PRIMARY
        self._file = await children.open_child(self, options.file, "file", role)
        length = self._file.node.length()
        if self.size is not None and self.size % 512:
            raise QMPError("Specified size is not multiple of 512")
        if self.offset > length:
            raise QMPError(f"Offset ({self.offset}) cannot be greater than size of the "
                           f"containing file ({length})")
        if self.size is not None and self.offset + self.size > length:
            raise QMPError(f"The sum of offset ({self.offset}) and size ({self.size}) has to "
                           f"be smaller or equal to the  actual size of the containing file "
                           f"({length})")

    def _child(self) -> Child:
        assert self._file is not None
        return self._file

    @property
    def passes_through(self) -> bool:
        """No window and nothing to look at in the data: requests go straight down."""
        return not self.offset and self.size is None and self.opts.detect_zeroes == "off"

    def nowait_next(self) -> BlockNode | None:
        return self._child().node if self.passes_through else None

    def child_perm(self, child: Child, perm: int, shared: int) -> tuple[int, int]:
        """bdrv_default_perms(), then raw_child_perm(): WRITE and RESIZE only when the
        parents need them."""
        nperm, nshared = default_child_perm(child.role, perm, shared, not self.read_only)
        keep = PERM_WRITE | PERM_RESIZE
        return (nperm & ~keep) | (perm & keep), nshared

    def get_length(self) -> int:
        if self.size is not None:
            return self.size
        return max(self._child().node.length() - self.offset, 0)

    def _check(self, offset: int, length: int, write: bool) -> None:
        if self.size is not None and (offset > self.size or length > self.size - offset):
            # Never touch bytes outside the window (QEMU's raw_adjust_offset()).
            code = errno.ENOSPC if write else errno.EINVAL
            raise OSError(code, "Request outside of the raw window")

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        below = self._child().node
        if below.bl.request_alignment > 1:
            return None
        self._check(offset, length, False)
        return below.read_nowait(offset + self.offset, length)

    def write_nowait(self, offset: int, data: Data, fua: bool = False) -> bool:
        below = self._child().node
        if self.opts.detect_zeroes != "off" or below.bl.request_alignment > 1 \
                or not below.writes_inline():
            return False
        self._check(offset, len(data), True)
        return below.write_nowait(offset + self.offset, data, fua)

    async def do_read(self, offset: int, length: int) -> bytes:
        self._check(offset, length, False)
        child = self._child()
        child.node.debug_event("read_aio")
        return await io.read(child, offset + self.offset, length)

    async def do_write(self, offset: int, data: Data, fua: bool) -> None:
        self._check(offset, len(data), True)
        child = self._child()
        child.node.debug_event("write_aio")
        await io.write(child, offset + self.offset, data, fua)

    async def do_write_zeroes(self, offset: int, length: int, may_unmap: bool,
                              no_fallback: bool, fua: bool) -> None:
        self._check(offset, length, True)
        await io.write_zeroes(self._child(), offset + self.offset, length, may_unmap,
                              no_fallback, fua)

    async def do_discard(self, offset: int, length: int) -> None:
        self._check(offset, length, True)
        await io.discard(self._child(), offset + self.offset, length)

    async def do_truncate(self, length: int, exact: bool, prealloc: str) -> None:
        if self.size is not None:
            raise OSError(errno.ENOTSUP, "Cannot resize fixed-size raw disks")
        await io.truncate(self._child(), length + self.offset, exact, prealloc)

    async def do_block_status(self, want_zero: bool, offset: int, length: int) -> BlockStatus:
        """The child answers, at the shifted offset (QEMU's raw_co_block_status)."""
        return BlockStatus(BLOCK_RAW | BLOCK_OFFSET_VALID, length, offset + self.offset,
                           self._child().node)
