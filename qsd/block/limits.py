"""Block limits: what a node can take per request (QEMU's BlockLimits).

Every request passes through ``qsd.block.io``, which shapes it to the limits of the node
it is addressed to: it pads to ``request_alignment`` (read-modify-write for writes),
splits at ``max_transfer``, and cuts zero-writes and discards at their own alignments and
maxima.  A driver only ever sees requests that fit, the way QEMU's drivers do.
"""

from __future__ import annotations

import mmap

INT64_MAX = 2**63 - 1
INT_MAX = 2**31 - 1
BDRV_SECTOR_SIZE = 512
# Image lengths stay below this, so that any aligned request size still fits in an int64
# (QEMU's BDRV_MAX_LENGTH, INT64_MAX aligned down to BDRV_MAX_ALIGNMENT).
BDRV_MAX_ALIGNMENT = 1 << 30
BDRV_MAX_LENGTH = INT64_MAX & ~(BDRV_MAX_ALIGNMENT - 1)
# Bounce buffers for zero-writes that fall back to plain writes (QEMU's MAX_BOUNCE_BUFFER).
MAX_BOUNCE_BUFFER = 32768 * BDRV_SECTOR_SIZE
IOV_MAX = 1024


def min_non_zero(a: int, b: int) -> int:
    """QEMU's MIN_NON_ZERO: 0 means "no limit"."""
    if a and b:
        return min(a, b)
    return a or b


class BlockLimits:
    """Sizes in bytes; 0 means "no limit" or "no preference", as in QEMU.

    A plain class: as a dataclass its creation was a noticeable part of every start.
    """

    def __init__(self) -> None:
        self.request_alignment = 1
        self.max_pdiscard = 0
        self.pdiscard_alignment = 0
        self.max_pwrite_zeroes = 0
        self.pwrite_zeroes_alignment = 0
        self.opt_transfer = 0
        self.max_transfer = 0
        self.max_hw_transfer = 0
        self.max_iov = 0
        self.max_hw_iov = 0
        self.min_mem_alignment = 0
        self.opt_mem_alignment = 0

    def merge(self, child: BlockLimits) -> None:
        """Takes on what a data, filtered or COW child imposes (QEMU's bdrv_merge_limits)."""
        self.opt_transfer = max(self.opt_transfer, child.opt_transfer)
        self.max_transfer = min_non_zero(self.max_transfer, child.max_transfer)
        self.max_hw_transfer = min_non_zero(self.max_hw_transfer, child.max_hw_transfer)
        self.opt_mem_alignment = max(self.opt_mem_alignment, child.opt_mem_alignment)
        self.min_mem_alignment = max(self.min_mem_alignment, child.min_mem_alignment)
        self.max_iov = min_non_zero(self.max_iov, child.max_iov)
        self.max_hw_iov = min_non_zero(self.max_hw_iov, child.max_hw_iov)

    def set_leaf_defaults(self) -> None:
        """What a node without data children gets before its driver adjusts it."""
        self.min_mem_alignment = BDRV_SECTOR_SIZE
        self.opt_mem_alignment = mmap.PAGESIZE
        self.max_iov = IOV_MAX

    def info(self) -> dict[str, object]:
        """QAPI BlockLimitsInfo: the optional members only where a limit exists."""
        out: dict[str, object] = {"request-alignment": self.request_alignment}
        for key, value in (("max-discard", self.max_pdiscard),
                           ("discard-alignment", self.pdiscard_alignment),
                           ("max-write-zeroes", self.max_pwrite_zeroes),
                           ("write-zeroes-alignment", self.pwrite_zeroes_alignment),
                           ("opt-transfer", self.opt_transfer),
                           ("max-transfer", self.max_transfer),
                           ("max-hw-transfer", self.max_hw_transfer)):
            if value:
                out[key] = value
        out["max-iov"] = self.max_iov
        if self.max_hw_iov:
            out["max-hw-iov"] = self.max_hw_iov
        out["min-mem-alignment"] = self.min_mem_alignment
        out["opt-mem-alignment"] = self.opt_mem_alignment
        return out
