"""``null-co`` / ``null-aio``: a device of a given size that drops writes.

Used to measure the export stack without storage behind it, so reads answer inline on the
caller's loop unless an emulated latency asks for a real wait.
"""

from __future__ import annotations

import asyncio

from qsd.block.node import (
    BLOCK_OFFSET_VALID,
    BLOCK_ZERO,
    BlockNode,
    BlockStatus,
    ChildOpener,
    Data,
)
from qsd.block.registry import register
from qsd.errors import QMPError
from qsd.qapi.generated import BlockdevOptionsNull

DEFAULT_SIZE = 1 << 30
INT64_MAX = 2**63 - 1


@register("null-co", "null-aio", options=BlockdevOptionsNull)
class NullNode(BlockNode):
    is_protocol = True
    strong_options = ("size", "read-zeroes")

    size = DEFAULT_SIZE
    latency = 0.0
    read_zeroes = False
    _inline_writes = True

    async def open(self, options: BlockdevOptionsNull, children: ChildOpener) -> None:
        """QEMU's null_open(): the size is a QemuOpts size (a negative one is out of its
        range; 11.1.3 aborts there), the latency an int64 (what wraps is invalid)."""
        if options.size is not None:
            if options.size < 0:
                raise QMPError(f"Value '{options.size}' is out of range for parameter 'size'")
            self.size = options.size
        latency = options.latency_ns or 0
        if not 0 <= latency <= INT64_MAX:
            raise QMPError("latency-ns is invalid")
        self.latency = latency / 1e9
        self.read_zeroes = bool(options.read_zeroes)
        self._inline_writes = not latency and self.opts.detect_zeroes == "off"

    def has_info(self) -> bool:
        return False

    def exact_filename(self) -> str:
        """``null-co://`` unless a strong option makes it a json: filename."""
        return "" if self.has_strong_options() else f"{self.driver}://"

    def get_length(self) -> int:
        return self.size

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        return None if self.latency else bytes(length)

    def write_nowait(self, offset: int, data: Data, fua: bool = False) -> bool:
        return self._inline_writes

    async def _wait(self) -> None:
        if self.latency:
            await asyncio.sleep(self.latency)

    async def do_read(self, offset: int, length: int) -> bytes:
        await self._wait()
        return bytes(length)

    async def do_write(self, offset: int, data: Data, fua: bool) -> None:
        await self._wait()

    async def do_write_zeroes(self, offset: int, length: int, may_unmap: bool,
                              no_fallback: bool, fua: bool) -> None:
        await self._wait()

    async def do_discard(self, offset: int, length: int) -> None:
        await self._wait()

    async def do_flush(self) -> None:
        await self._wait()

    async def do_block_status(self, want_zero: bool, offset: int, length: int) -> BlockStatus:
        """read-zeroes=on is a sparse image of zeroes; off leaves the data undefined,
        neither data nor zero (what 11.1.3's NBD map shows as a hole)."""
        flags = BLOCK_OFFSET_VALID | (BLOCK_ZERO if self.read_zeroes else 0)
        return BlockStatus(flags, length, offset, self)
