"""L2 tables in memory and what their entries say about each (sub)cluster.

An L2 table is held as an ``array('Q')`` of host-order 64-bit words: one word per
entry, or two (entry, subcluster bitmap) with extended L2 entries.  ``Geometry`` knows
the image's sizes and turns an entry into a subcluster type (QEMU's
QCow2SubclusterType) and a host offset.
"""

from __future__ import annotations

import sys
from array import array

from qsd.block.drivers.qcow2 import format as fmt

# Subcluster types (QEMU's QCOW2_SUBCLUSTER_*).
NORMAL = 0
COMPRESSED = 1
ZERO_PLAIN = 2
ZERO_ALLOC = 3
UNALLOCATED_PLAIN = 4
UNALLOCATED_ALLOC = 5
INVALID = 6

_SWAP = sys.byteorder == "little"


def decode(raw: bytes) -> array[int]:
    table = array("Q")
    table.frombytes(raw)
    if _SWAP:
        table.byteswap()
    return table


def encode(table: array[int]) -> bytes:
    if not _SWAP:
        return table.tobytes()
    copy = array("Q", table)
    copy.byteswap()
    return copy.tobytes()


class Geometry:
    """Sizes of one image and the decoding of its L2 entries."""

    def __init__(self, header: fmt.Header) -> None:
        self.version = header.version
        self.cluster_bits = header.cluster_bits
        self.cluster_size = 1 << header.cluster_bits
        self.extended = bool(header.incompatible_features & fmt.INCOMPAT_EXTL2)
        self.words = 2 if self.extended else 1          # 64-bit words per L2 entry
        self.l2_bits = self.cluster_bits - (4 if self.extended else 3)
        self.l2_size = 1 << self.l2_bits
        self.subclusters = fmt.SUBCLUSTERS if self.extended else 1
        self.subcluster_size = self.cluster_size // self.subclusters
        self.subcluster_bits = self.subcluster_size.bit_length() - 1
        self.csize_shift = 62 - (self.cluster_bits - 8)
        self.csize_mask = (1 << (self.cluster_bits - 8)) - 1
        self.coffset_mask = (1 << self.csize_shift) - 1

    def l1_index(self, offset: int) -> int:
        return offset >> (self.cluster_bits + self.l2_bits)

    def l2_index(self, offset: int) -> int:
        return (offset >> self.cluster_bits) & (self.l2_size - 1)

    def compressed(self, entry: int) -> tuple[int, int]:
        """(host offset, byte count) of a compressed cluster's data."""
        offset = entry & self.coffset_mask
        sectors = ((entry >> self.csize_shift) & self.csize_mask) + 1
        return offset, sectors * 512 - (offset & 511)

    def subcluster_type(self, entry: int, bitmap: int, sc: int) -> int:
        """The type of subcluster ``sc`` (0 without extended L2 entries)."""
        if entry & fmt.OFLAG_COMPRESSED:
            return COMPRESSED
        host = entry & fmt.L2E_OFFSET_MASK
        if self.extended:
            alloc = (bitmap >> sc) & 1
            zero = (bitmap >> (32 + sc)) & 1
            if alloc and zero:
                return INVALID
            if zero:
                return ZERO_ALLOC if host else ZERO_PLAIN
            if alloc:
                return NORMAL if host else INVALID
            return UNALLOCATED_ALLOC if host else UNALLOCATED_PLAIN
        if entry & fmt.OFLAG_ZERO:
            if self.version < 3:
                return INVALID
            return ZERO_ALLOC if host else ZERO_PLAIN
        if host or entry & fmt.OFLAG_COPIED:
            return NORMAL
        return UNALLOCATED_PLAIN

    def run(self, table: array[int], index: int, sc: int, limit: int) -> tuple[int, int]:
        """(type, subclusters) of the run that starts at subcluster ``sc`` of entry
        ``index``: following subclusters of the same type, stopping at the end of the
        table or after ``limit`` subclusters.  Normal data must also be contiguous on
        the host; compressed clusters always end a run."""
        words = self.words
        entry = table[index * words]
        bitmap = table[index * words + 1] if words == 2 else 0
        kind = self.subcluster_type(entry, bitmap, sc)
        if kind in (COMPRESSED, INVALID):
            return kind, min(limit, self.subclusters - sc)
        mapped = kind in (NORMAL, ZERO_ALLOC, UNALLOCATED_ALLOC)
        count = 0
        expect = -1
        while index < self.l2_size and count < limit:
            entry = table[index * words]
            bitmap = table[index * words + 1] if words == 2 else 0
            if count and entry & fmt.OFLAG_COMPRESSED:
                break
            host = entry & fmt.L2E_OFFSET_MASK
            if mapped and expect >= 0 and host != expect:
                break
            for s in range(sc, self.subclusters):
                if self.subcluster_type(entry, bitmap, s) != kind:
                    return kind, count
                count += 1
                if count >= limit:
                    return kind, count
            sc = 0
            index += 1
            expect = host + self.cluster_size
        return kind, count
