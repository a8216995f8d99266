"""Reference counts: the refcount table, refcount blocks, cluster allocation and freeing.

QEMU's qcow2-refcount.c, for the parts a running image needs.  Refcount blocks live in
the write-back cache (cache.py); the refcount table is kept in memory and written
through.  Everything here runs under the node's metadata lock.

Crash safety, in the order things reach the file:

- a new refcount block is written and synced before the table entry that points at it;
- a grown refcount table (new blocks and table at the end of the image) is written and
  synced, with every refcount that accounts for it, before the header points at it; the
  old table is freed only afterwards;
- a cluster whose refcount dropped to 0 is not handed out again before the next flush
  has written the tables that dropped it (``flushed()``), so a reference to it that is
  still on disk never meets new data;
- a freed cluster the file is told to discard is discarded before the update that freed
  it returns (QEMU's qcow2_process_discards, under the lock): a discard left running
  could punch a hole into the cluster's next data once the flush made it free again.
"""

from __future__ import annotations

import errno
import os
import sys
from typing import Protocol

from qsd.block.drivers.qcow2 import format as fmt
from qsd.block.drivers.qcow2.cache import Caches, TableCache

# Metadata kinds, QEMU's QCOW2_OL_* bits (overlap checks and their messages).
OL_MAIN_HEADER = 1 << 0
OL_ACTIVE_L1 = 1 << 1
OL_ACTIVE_L2 = 1 << 2
OL_REFCOUNT_TABLE = 1 << 3
OL_REFCOUNT_BLOCK = 1 << 4
OL_SNAPSHOT_TABLE = 1 << 5
OL_INACTIVE_L1 = 1 << 6
OL_INACTIVE_L2 = 1 << 7
OL_BITMAP_DIRECTORY = 1 << 8
OL_NAMES = ("qcow2_header", "active L1 table", "active L2 table", "refcount table",
            "refcount block", "snapshot table", "inactive L1 table", "inactive L2 table",
            "bitmap directory")

# Discard types (which of pass-discard-* decides whether freed space is discarded).
DISCARD_NEVER, DISCARD_ALWAYS, DISCARD_REQUEST, DISCARD_SNAPSHOT, DISCARD_OTHER = range(5)


class ImageIO(Protocol):
    """What the refcount code needs from the node: the image file, and the map of
    metadata clusters (for overlap checks)."""

    @property
    def cluster_bits(self) -> int: ...

    async def meta_read(self, offset: int, length: int) -> bytes: ...

    async def meta_write(self, offset: int, data: bytes, kind: int) -> None: ...

    async def sync(self) -> None: ...

    def file_end(self) -> int: ...

    def set_meta(self, offset: int, clusters: int, kind: int) -> None: ...

    async def discard_freed(self, offset: int, length: int, kind: int) -> None: ...

    def corruption(self, message: str, offset: int = -1, size: int = -1,
                   fatal: bool = True) -> OSError: ...


class Refcounts:
    """The refcount structures of one image."""

    def __init__(self, image: ImageIO, caches: Caches, header: fmt.Header,
                 table: list[int]) -> None:
        self.image = image
        self.caches = caches
        self.cache: TableCache[bytearray] = caches.refblocks
        self.cluster_bits = header.cluster_bits
        self.cluster_size = 1 << header.cluster_bits
        self.order = header.refcount_order
        self.max = (1 << (1 << self.order)) - 1
        self.block_bits = self.cluster_bits + 3 - self.order    # entries per block, log2
        self.table = table
        self.table_offset = header.refcount_table_offset
        self.table_clusters = header.refcount_table_clusters
        self.free_cluster_index = 0
        # One past the highest cluster ever handed out: data may not have reached the
        # file yet, so the file's end does not say where free space begins.
        self.allocated_end = 0
        # Clusters freed since the last flush: not handed out again before it.
        self.unflushed_frees: set[int] = set()
        # Set while repairing: new structures go past everything the image uses.
        self.allocate_from: int = 0

    # ---- reading ------------------------------------------------------------------------

    async def _block(self, table_index: int) -> bytearray | None:
        """The refcount block for ``table_index``, through the cache; None if absent."""
        if table_index >= len(self.table):
            return None
        offset = self.table[table_index] & fmt.REFT_OFFSET_MASK
        if not offset:
            return None
        entry = self.cache.lookup(offset)
        if entry is not None:
            return entry.table
        if offset & (self.cluster_size - 1):
            raise self.image.corruption(
                f"Refblock offset {fmt.c_hex(offset)} unaligned "
                f"(reftable index: {fmt.c_hex(table_index)})")
        await self.caches.evict_for(self.cache)
        block = bytearray(await self.image.meta_read(offset, self.cluster_size))
        self.cache.insert(offset, block)
        return block

    async def get(self, cluster: int) -> int:
        block = await self._block(cluster >> self.block_bits)
        if block is None:
            return 0
        return fmt.get_refcount(block, cluster & ((1 << self.block_bits) - 1), self.order)

    # ---- changing -----------------------------------------------------------------------

    async def update(self, offset: int, length: int, addend: int,
                     discard: int = DISCARD_NEVER) -> None:
        """Adds ``addend`` to the refcount of every cluster in [offset, offset+length)."""
        if length <= 0:
            return
        if addend < 0:
            await self.caches.set_dependency(self.caches.refblocks, self.caches.l2)
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        freed: list[tuple[int, int]] = []
        freed_start = -1
        for cluster in range(first, last + 1):
            block = await self._block(cluster >> self.block_bits)
            if block is None:
                if addend < 0:
                    raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
                block = await self._new_block(cluster)
            index = cluster & ((1 << self.block_bits) - 1)
            value = fmt.get_refcount(block, index, self.order) + addend
            if value < 0 or value > self.max:
                raise OSError(errno.EINVAL if value < 0 else errno.ERANGE,
                              os.strerror(errno.EINVAL if value < 0 else errno.ERANGE))
            fmt.set_refcount(block, index, self.order, value)
            self._mark_dirty(cluster)
            if value == 0:
                self.unflushed_frees.add(cluster)
                if freed_start < 0:
                    freed_start = cluster
            elif freed_start >= 0:
                self._freed(freed_start, cluster, freed)
                freed_start = -1
        if freed_start >= 0:
            self._freed(freed_start, last + 1, freed)
        # Once all of them are counted, as QEMU does; not at all after a failure.
        for start, end in freed:
            await self.image.discard_freed(start << self.cluster_bits,
                                           (end - start) << self.cluster_bits, discard)

    def _freed(self, start: int, end: int, freed: list[tuple[int, int]]) -> None:
        self.image.set_meta(start << self.cluster_bits, end - start, 0)
        freed.append((start, end))

    def _mark_dirty(self, cluster: int) -> None:
        offset = self.table[cluster >> self.block_bits] & fmt.REFT_OFFSET_MASK
        entry = self.cache.lookup(offset)
        assert entry is not None
        entry.dirty = True

    async def set(self, cluster: int, value: int) -> None:
        """Sets one refcount to ``value`` (repairs)."""
        current = await self.get(cluster)
        if current != value:
            await self.update(cluster << self.cluster_bits, 1, value - current)

    def has_freed(self) -> bool:
        return bool(self.unflushed_frees)

    async def last_used(self) -> int:
        """The highest cluster with a refcount (-1 if none)."""
        per_block = 1 << self.block_bits
        for index in range(len(self.table) - 1, -1, -1):
            block = await self._block(index)
            if block is None:
                continue
            for pos in range(per_block - 1, -1, -1):
                if fmt.get_refcount(block, pos, self.order):
                    return (index << self.block_bits) + pos
        return -1

    def flushed(self) -> None:
        """The refcounts are on disk: clusters freed before may be handed out again."""
        if self.unflushed_frees:
            self.free_cluster_index = min(self.free_cluster_index, min(self.unflushed_frees))
            self.unflushed_frees.clear()

    # ---- allocation ---------------------------------------------------------------------

    async def _find_free(self, count: int) -> int:
        """The first run of ``count`` clusters with refcount 0 from free_cluster_index
        (QEMU's alloc_clusters_noref); the refcounts are not changed yet."""
        cluster = max(self.free_cluster_index, self.allocate_from)
        per_block = 1 << self.block_bits
        run = 0
        while run < count:
            block = await self._block((cluster + run) >> self.block_bits)
            if block is None:
                # A whole block range without a block: all free.
                step = per_block - ((cluster + run) & (per_block - 1))
                run += step
                continue
            index = (cluster + run) & (per_block - 1)
            if fmt.get_refcount(block, index, self.order) or cluster + run in self.unflushed_frees:
                cluster += run + 1
                run = 0
            else:
                run += 1
        if cluster << self.cluster_bits > fmt.L2E_OFFSET_MASK:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        return cluster

    async def allocate(self, count: int) -> int:
        """Allocates ``count`` contiguous clusters; returns the offset of the first.

        The refcount blocks for the run are made first; a new block may take a cluster
        of the run itself, and then the search starts again (QEMU retries on EAGAIN).
        """
        while True:
            cluster = await self._find_free(count)
            made = False
            for index in range(cluster >> self.block_bits,
                               ((cluster + count - 1) >> self.block_bits) + 1):
                if await self._block(index) is None:
                    await self._new_block(index << self.block_bits)
                    made = True
            if not made:
                break
        await self.update(cluster << self.cluster_bits, count << self.cluster_bits, 1)
        # The search passed over used clusters only (QEMU's alloc_clusters_noref).
        self.free_cluster_index = max(self.free_cluster_index, cluster + count)
        self.allocated_end = max(self.allocated_end, cluster + count)
        return cluster << self.cluster_bits

    def free_cached(self, limit: int = 64) -> int:
        """The cluster ``allocate(1)`` would hand out, if finding it needs no I/O (its
        refcount block cached, within ``limit`` steps); -1 otherwise.  Nothing changes:
        ``claim`` takes it."""
        cluster = max(self.free_cluster_index, self.allocate_from)
        per_block = 1 << self.block_bits
        for _ in range(limit):
            index = cluster >> self.block_bits
            offset = self.table[index] & fmt.REFT_OFFSET_MASK if index < len(self.table) else 0
            entry = self.cache.entries.get(offset) if offset else None
            if entry is None:
                return -1
            if fmt.get_refcount(entry.table, cluster & (per_block - 1), self.order) or (
                    cluster in self.unflushed_frees):
                cluster += 1
                continue
            return cluster if cluster << self.cluster_bits <= fmt.L2E_OFFSET_MASK else -1
        return -1

    def claim(self, cluster: int) -> None:
        """Takes the cluster ``free_cached`` found (lock held since): refcount 1 in its
        cached block, as ``allocate(1)`` would leave it."""
        block = self.cache.lookup(self.table[cluster >> self.block_bits]
                                  & fmt.REFT_OFFSET_MASK)
        assert block is not None
        fmt.set_refcount(block.table, cluster & ((1 << self.block_bits) - 1), self.order, 1)
        block.dirty = True
        self.free_cluster_index = max(self.free_cluster_index, cluster + 1)
        self.allocated_end = max(self.allocated_end, cluster + 1)

    async def allocate_bytes(self, size: int) -> int:
        return await self.allocate(-(-size // self.cluster_size))

    async def free(self, offset: int, length: int, discard: int) -> None:
        """QEMU's qcow2_free_clusters(): a failure is reported and the clusters leak;
        the request that freed them goes on."""
        try:
            await self.update(offset, length, -1, discard)
        except OSError as exc:
            print(f"qcow2_free_clusters failed: {os.strerror(exc.errno or errno.EIO)}",
                  file=sys.stderr, flush=True)

    # ---- new refcount blocks and a bigger table ---------------------------------------

    async def _new_block(self, cluster: int) -> bytearray:
        """Creates the refcount block that counts ``cluster`` (QEMU's
        alloc_refcount_block); grows the table when it has no room."""
        table_index = cluster >> self.block_bits
        if table_index >= len(self.table):
            await self._grow_table(table_index)
            block = await self._block(table_index)
            assert block is not None
            return block
        new = await self._find_free(1)
        if new == 0:
            raise self.image.corruption(
                "Preventing invalid allocation of refcount block at offset 0")
        block = bytearray(self.cluster_size)
        if new >> self.block_bits == table_index:
            fmt.set_refcount(block, new & ((1 << self.block_bits) - 1), self.order, 1)
        else:
            await self.update(new << self.cluster_bits, self.cluster_size, 1)
            # That may have created this very block (it counts itself): use it.
            if self.table[table_index]:
                return await self._block(table_index) or block
        offset = new << self.cluster_bits
        self.free_cluster_index = max(self.free_cluster_index, new + 1)
        self.allocated_end = max(self.allocated_end, new + 1)
        self.image.set_meta(offset, 1, OL_REFCOUNT_BLOCK)
        await self.caches.evict_for(self.cache)
        entry = self.cache.insert(offset, block)
        entry.dirty = True
        await self.caches.flush(self.caches.refblocks)
        await self.image.meta_write(self.table_offset + 8 * table_index,
                                    offset.to_bytes(8, "big"), OL_REFCOUNT_TABLE)
        await self.image.sync()
        self.table[table_index] = offset
        return block

    async def _grow_table(self, needed_index: int) -> None:
        """A bigger refcount table with new blocks for itself, at the end of the image
        (QEMU's qcow2_refcount_area), published by one synced header write."""
        cs = self.cluster_size
        per_block = 1 << self.block_bits
        per_table_cluster = cs // 8
        start = max(-(-self.image.file_end() // cs), self.allocate_from,
                    self.free_cluster_index, self.allocated_end)
        entries = max(needed_index + 1, len(self.table) * 3 // 2)
        while True:
            table_clusters = -(-entries // per_table_cluster)
            new_blocks: list[int] = []
            area_end = start + table_clusters
            while True:
                missing = [i for i in range(start // per_block, (area_end - 1) // per_block + 1)
                           if i >= len(self.table) or not self.table[i]]
                if start + len(missing) + table_clusters == area_end:
                    new_blocks = missing
                    break
                area_end = start + len(missing) + table_clusters
            if (area_end - 1) // per_block < table_clusters * per_table_cluster:
                break
            entries = (area_end - 1) // per_block + 1
        table = self.table + [0] * (table_clusters * per_table_cluster - len(self.table))
        blocks: dict[int, bytearray] = {}
        for n, index in enumerate(new_blocks):
            table[index] = (start + n) << self.cluster_bits
            blocks[index] = bytearray(cs)
        table_start = start + len(new_blocks)
        for cluster in range(start, area_end):
            index = cluster >> self.block_bits
            if index in blocks:
                fmt.set_refcount(blocks[index], cluster & (per_block - 1), self.order, 1)
            else:
                await self.update(cluster << self.cluster_bits, cs, 1)
        for n, index in enumerate(new_blocks):
            await self.image.meta_write((start + n) << self.cluster_bits,
                                        bytes(blocks[index]), OL_REFCOUNT_BLOCK)
        raw = b"".join(e.to_bytes(8, "big") for e in table)
        await self.image.meta_write(table_start << self.cluster_bits, raw, OL_REFCOUNT_TABLE)
        await self.caches.flush(self.caches.refblocks)
        old_offset, old_clusters = self.table_offset, self.table_clusters
        await self.image.meta_write(
            48, (table_start << self.cluster_bits).to_bytes(8, "big")
            + table_clusters.to_bytes(4, "big"), OL_MAIN_HEADER)
        await self.image.sync()
        self.table = table
        self.table_offset = table_start << self.cluster_bits
        self.table_clusters = table_clusters
        self.image.set_meta(old_offset, old_clusters, 0)
        self.image.set_meta(start << self.cluster_bits, len(new_blocks), OL_REFCOUNT_BLOCK)
        self.image.set_meta(self.table_offset, table_clusters, OL_REFCOUNT_TABLE)
        if self.free_cluster_index >= start:
            self.free_cluster_index = area_end
        self.allocated_end = max(self.allocated_end, area_end)
        await self.free(old_offset, old_clusters * cs, DISCARD_OTHER)

