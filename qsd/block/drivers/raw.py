"""The ``raw`` format driver: a window (offset, size) onto its ``file`` child.

Without offset and size it behaves like a filter, and its fast paths are the child's own
(the BlockBackend binds them directly, saving a Python call per request).
"""

from __future__ import annotations

import errno
import json
from typing import TYPE_CHECKING, Any

from qsd.block.node import BLOCK_EOF, BlockNode, Data, NodeOptions
from qsd.block.permissions import PERM_RESIZE, PERM_WRITE, PERM_WRITE_UNCHANGED, Edge
from qsd.errors import QMPError

if TYPE_CHECKING:
    from qsd.aio import AioContext


class RawNode(BlockNode):
    driver = "raw"
    format_name = "raw"

    def __init__(self, node_name: str, opts: NodeOptions, ctx: AioContext, *,
                 offset: int | None = None, size: int | None = None) -> None:
        super().__init__(node_name, opts, ctx)
        self.offset = offset or 0
        self.size = size
        self._explicit = (offset, size)
        self.file: BlockNode | None = None

    def attach_file(self, child: BlockNode) -> None:
        """Links the child and applies QEMU's checks of offset/size against its length."""
        length = child.length()
        if self.size is not None and self.size % 512:
            raise QMPError("Specified size is not multiple of 512")
        if self.offset > length:
            raise QMPError(f"Offset ({self.offset}) cannot be greater than size of the "
                           f"containing file ({length})")
        if self.size is not None and self.offset + self.size > length:
            raise QMPError(f"The sum of offset ({self.offset}) and size ({self.size}) has to "
                           f"be smaller or equal to the  actual size of the containing file "
                           f"({length})")
        self.add_child("file", child)
        self.file = child

    @property
    def is_filter(self) -> bool:
        """QEMU treats raw without offset and size as a filter (BDRV_CHILD_FILTERED)."""
        return not self.offset and self.size is None

    def nowait_target(self) -> BlockNode:
        if self.is_filter and not self._detect and self.file is not None:
            return self.file.nowait_target()
        return self

    @property
    def filename(self) -> str:
        assert self.file is not None
        if self.is_filter:
            return self.file.filename
        spec: dict[str, object] = {}
        if self._explicit[0] is not None:
            spec["offset"] = self._explicit[0]
        spec["driver"] = "raw"
        if self._explicit[1] is not None:
            spec["size"] = self._explicit[1]
        spec["file"] = {"driver": self.file.driver, "filename": self.file.filename}
        return "json:" + json.dumps(spec)

    def child_perm(self, child: Edge, perm: int, shared: int) -> tuple[int, int]:
        if self.is_filter:
            return perm, shared
        # bdrv_default_perms() for a data child, then raw_child_perm()'s correction.
        nperm, nshared = perm, shared & ~PERM_RESIZE
        if nperm & PERM_WRITE_UNCHANGED:
            nperm |= PERM_WRITE
        if nperm & PERM_WRITE:
            nperm |= PERM_RESIZE
        nperm = (nperm & ~(PERM_WRITE | PERM_RESIZE)) | (perm & (PERM_WRITE | PERM_RESIZE))
        return nperm, nshared

    def _child(self) -> BlockNode:
        assert self.file is not None
        return self.file

    def length(self) -> int:
        if self.size is not None:
            return self.size
        return max(self._child().length() - self.offset, 0)

    def _check(self, offset: int, length: int, write: bool) -> None:
        if self.size is not None and (offset > self.size or length > self.size - offset):
            # Never touch bytes outside the window (QEMU's raw_adjust_offset()).
            code = errno.ENOSPC if write else errno.EINVAL
            raise OSError(code, "Request outside of the raw window")

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        self._check(offset, length, False)
        return self._child().read_nowait(offset + self.offset, length)

    def write_nowait(self, offset: int, data: Data, fua: bool = False) -> bool:
        if self._detect:
            return False
        self._check(offset, len(data), True)
        return self._child().write_nowait(offset + self.offset, data, fua)

    async def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length, False)
        return await self._child().read(offset + self.offset, length)

    async def _write(self, offset: int, data: Data, fua: bool) -> None:
        self._check(offset, len(data), True)
        await self._child().write(offset + self.offset, data, fua)

    async def _write_zeroes(self, offset: int, length: int, may_unmap: bool,
                            no_fallback: bool, fua: bool) -> None:
        self._check(offset, length, True)
        await self._child().write_zeroes(offset + self.offset, length, may_unmap,
                                         no_fallback, fua)

    async def _discard(self, offset: int, length: int) -> None:
        self._check(offset, length, True)
        await self._child().discard(offset + self.offset, length)

    async def flush(self) -> None:
        await self._child().flush()

    async def truncate(self, length: int, exact: bool = False, prealloc: str = "off") -> None:
        if self.size is not None:
            raise OSError(errno.ENOTSUP, "Cannot resize fixed-size raw disks")
        await self._child().truncate(length + self.offset, exact, prealloc)

    async def block_status(self, offset: int, length: int) -> tuple[int, int]:
        size = self.length()
        length = min(length, max(size - offset, 0))
        flags, count = await self._child().block_status(offset + self.offset, length)
        count = min(count, length)
        flags &= ~BLOCK_EOF
        if offset + count >= size:
            flags |= BLOCK_EOF
        return flags, count

    def allocated_size(self) -> int:
        return self._child().allocated_size()


def open_raw(node_name: str, opts: NodeOptions, ctx: AioContext, args: Any) -> RawNode:
    """Builds the node (without its child) from a BlockdevOptionsRaw model."""
    return RawNode(node_name, opts, ctx, offset=getattr(args, "offset", None),
                   size=getattr(args, "size", None))
