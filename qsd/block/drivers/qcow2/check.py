"""Repair of an image opened with the dirty bit set (QEMU's qcow2_co_check_locked with
BDRV_FIX_ERRORS | BDRV_FIX_LEAKS on open).

Lazy refcounts let L2 references reach the disk before the refcounts that account for
them; after a crash the refcounts are rebuilt from what references each cluster: the
header, the L1 tables (active and snapshots') and the L2 tables and data clusters they
map, the refcount structures, the snapshot table and the bitmaps.
"""

from __future__ import annotations

import struct
from collections import Counter
from typing import TYPE_CHECKING

from qsd.block.drivers.qcow2 import format as fmt
from qsd.block.drivers.qcow2 import l2

if TYPE_CHECKING:
    from qsd.block.drivers.qcow2.driver import Qcow2Node



async def referenced_clusters(node: Qcow2Node) -> Counter[int]:
    """How many references each host cluster has."""
    hdr, geo, rc = node.header, node.geo, node.refcounts
    assert geo is not None and rc is not None
    bits = hdr.cluster_bits
    cs = hdr.cluster_size
    refs: Counter[int] = Counter()

    def add(offset: int, length: int) -> None:
        if length <= 0:
            return
        for cluster in range(offset >> bits, ((offset + length - 1) >> bits) + 1):
            refs[cluster] += 1

    external = node.data_child is not node.file
    add(0, cs)
    l1_tables = [(node.l1, hdr.l1_table_offset, hdr.l1_size)]
    for l1_offset, l1_size in node.snapshots:
        raw = await node.meta_read(l1_offset, l1_size * 8)
        l1_tables.append((list(struct.unpack(f">{l1_size}Q", raw)), l1_offset, l1_size))
    if hdr.nb_snapshots:
        add(hdr.snapshots_offset, cs)
    for table, offset, size in l1_tables:
        add(offset, size * 8)
        for entry in table:
            l2_offset = entry & fmt.L1E_OFFSET_MASK
            if not l2_offset:
                continue
            add(l2_offset, cs)
            cached = node.l2_cache.peek(l2_offset) if node.l2_cache is not None else None
            l2_table = cached if cached is not None else l2.decode(
                await node.meta_read(l2_offset, cs))
            for index in range(geo.l2_size):
                l2e = l2_table[index * geo.words]
                if l2e & fmt.OFLAG_COMPRESSED:
                    coffset, csize = geo.compressed(l2e)
                    start = coffset & ~511
                    add(start, coffset + csize - start)
                elif l2e & fmt.L2E_OFFSET_MASK and not external:
                    add(l2e & fmt.L2E_OFFSET_MASK, cs)
    add(rc.table_offset, rc.table_clusters * cs)
    for entry in rc.table:
        if entry & fmt.REFT_OFFSET_MASK:
            add(entry & fmt.REFT_OFFSET_MASK, cs)
    if node.bitmaps_ext is not None:
        _, _, size, offset = fmt.BITMAPS_EXT.unpack(node.bitmaps_ext)
        add(offset, size)
        for bm in node.bitmaps:
            add(bm["table_offset"], bm["table_size"] * 8)
            raw = await node.meta_read(bm["table_offset"], bm["table_size"] * 8)
            for (entry,) in struct.iter_unpack(">Q", raw):
                if entry & fmt.L1E_OFFSET_MASK:
                    add(entry & fmt.L1E_OFFSET_MASK, cs)
    return refs


async def repair_refcounts(node: Qcow2Node) -> None:
    """Sets every refcount to the number of references, then clears the dirty bit."""
    rc = node.refcounts
    assert rc is not None
    async with node.lock:
        refs = await referenced_clusters(node)
        end = max(refs) + 1 if refs else 1
        file_clusters = -(-node.file_end() // node.header.cluster_size)
        covered = len(rc.table) << rc.block_bits
        rc.allocate_from = max(end, file_clusters)
        try:
            for cluster in range(max(end, min(file_clusters, covered))):
                await rc.set(cluster, refs.get(cluster, 0))
            await node.flush_caches()
            await node.sync()
        finally:
            rc.allocate_from = 0
        rc.flushed()
        await node.mark_clean()
