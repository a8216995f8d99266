"""``null-co`` / ``null-aio``: a device of a given size that drops writes.

Used to measure the export stack without storage behind it, so reads answer inline on the
caller's loop unless an emulated latency asks for a real wait.
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING, Any

from qsd.block.node import BLOCK_DATA, BLOCK_OFFSET_VALID, BLOCK_ZERO, BlockNode, Data, NodeOptions

if TYPE_CHECKING:
    from qsd.aio import AioContext

DEFAULT_SIZE = 1 << 30


class NullNode(BlockNode):
    def __init__(self, node_name: str, opts: NodeOptions, ctx: AioContext, *, driver: str,
                 size: int | None = None, latency_ns: int | None = None,
                 read_zeroes: bool | None = None) -> None:
        super().__init__(node_name, opts, ctx)
        self.driver = self.format_name = driver
        # QEMU keeps a sector count, so the size it reports is rounded up to 512.
        self.size = -(-(DEFAULT_SIZE if size is None else size) // 512) * 512
        self.latency = (latency_ns or 0) / 1e9
        self.read_zeroes = bool(read_zeroes)
        explicit: dict[str, object] = {}
        if read_zeroes is not None:
            explicit["read-zeroes"] = read_zeroes
        if latency_ns is not None:
            explicit["latency-ns"] = latency_ns
        explicit["driver"] = driver
        if size is not None:
            explicit["size"] = size
        self._filename = (f"{driver}://" if len(explicit) == 1
                          else "json:" + json.dumps(explicit))

    @property
    def filename(self) -> str:
        return self._filename

    def has_dirty_flag(self) -> bool:
        return False

    def length(self) -> int:
        return self.size

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        return None if self.latency else bytes(length)

    def write_nowait(self, offset: int, data: Data, fua: bool = False) -> bool:
        return not self.latency and not self._detect

    async def _wait(self) -> None:
        if self.latency:
            await asyncio.sleep(self.latency)

    async def read(self, offset: int, length: int) -> bytes:
        await self._wait()
        return bytes(length)

    async def _write(self, offset: int, data: Data, fua: bool) -> None:
        await self._wait()

    async def _write_zeroes(self, offset: int, length: int, may_unmap: bool,
                            no_fallback: bool, fua: bool) -> None:
        await self._wait()

    async def _discard(self, offset: int, length: int) -> None:
        await self._wait()

    async def flush(self) -> None:
        await self._wait()

    async def block_status(self, offset: int, length: int) -> tuple[int, int]:
        # read-zeroes=on emulates a sparse image, off an allocated one (QEMU 10.1+).
        return (BLOCK_ZERO if self.read_zeroes else BLOCK_DATA) | BLOCK_OFFSET_VALID, length


def open_null(node_name: str, opts: NodeOptions, ctx: AioContext, args: Any,
              driver: str) -> NullNode:
    """Builds the node from a BlockdevOptionsNull model (or any object with its fields)."""
    return NullNode(node_name, opts, ctx, driver=driver, size=getattr(args, "size", None),
                    latency_ns=getattr(args, "latency_ns", None),
                    read_zeroes=getattr(args, "read_zeroes", None))
