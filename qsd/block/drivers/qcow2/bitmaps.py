"""Persistent dirty bitmaps in the qcow2 bitmaps extension (QEMU's qcow2-bitmap.c and
docs/interop/qcow2.txt).

The extension points at a bitmap directory: one entry per bitmap with its name,
granularity, flags (``in_use``: not saved correctly; ``auto``: enabled) and a bitmap
table whose entries point at clusters of bitmap data (0: all zeroes, 1: all ones).

What QEMU does, done here the same way:

- at open every bitmap becomes a persistent in-memory bitmap (disabled unless ``auto``);
  one stored with ``in_use`` is inconsistent and only removable.  An image opened for
  writing gets ``in_use`` on every bitmap it loaded, written in place with the
  ``bitmaps`` autoclear bit cleared meanwhile, so that a crash leaves them marked;
  one opened read-only has read-only bitmaps;
- when the node is inactivated (closed, or reopened read-only) each persistent bitmap
  is written out: data clusters (all-zero clusters take none), its table, then a new
  directory and the header; the old tables and directory are freed after that.  The
  bitmaps are then clean on disk (``in_use`` cleared), ``auto`` where enabled;
- block-dirty-bitmap-remove of a stored bitmap rewrites the directory at once.

The driver keeps the image's directory in ``node.bitmaps`` (what query and check read)
and calls these functions under its metadata lock where they change the image.
"""

from __future__ import annotations

import errno
import os
import struct
from typing import Any, Protocol

from qsd.block import dirty_bitmap
from qsd.block.drivers.qcow2 import format as fmt
from qsd.block.drivers.qcow2.refcount import DISCARD_OTHER, OL_BITMAP_DIRECTORY, Refcounts
from qsd.errors import QMPError


class Qcow2Node(dirty_bitmap.BitmapOwner, Protocol):
    """What this module uses of the driver (``driver.Qcow2Node``)."""

    header: fmt.Header
    bitmaps: list[dict[str, Any]]
    bitmaps_ext: bytes | None
    refcounts: Refcounts | None

    async def meta_read(self, offset: int, length: int) -> bytes: ...

    async def meta_write(self, offset: int, data: bytes, kind: int) -> None: ...

    async def sync(self) -> None: ...

    async def update_header(self) -> None: ...

    async def flush_caches(self) -> None: ...

    def set_meta(self, offset: int, clusters: int, kind: int) -> None: ...


ENTRY = struct.Struct(">QIIBBHI")
IN_USE = 1 << 0
AUTO = 1 << 1
EXTRA_DATA_COMPATIBLE = 1 << 2
TYPE_DIRTY_TRACKING = 1
# QEMU's BME_* limits.
MAX_TABLE_SIZE = 0x8000000
MAX_PHYS_SIZE = 0x20000000
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31
MAX_NAME_SIZE = 1023
TABLE_ENTRY_OFFSET_MASK = 0x00FFFFFFFFFFFE00
TABLE_ENTRY_ALL_ONES = 1


def parse_directory(raw: bytes, count: int) -> list[dict[str, Any]]:
    """The directory's entries as dicts (table_offset, table_size, flags, type,
    granularity, name, extra)."""
    entries: list[dict[str, Any]] = []
    pos = 0
    for _ in range(count):
        if pos + ENTRY.size > len(raw):
            raise QMPError("Bitmap directory is corrupted")
        (table_offset, table_size, flags, kind, gran_bits, name_size,
         extra_size) = ENTRY.unpack_from(raw, pos)
        name_at = pos + ENTRY.size + extra_size
        entries.append({"table_offset": table_offset, "table_size": table_size,
                        "flags": flags, "type": kind, "granularity": 1 << gran_bits,
                        "extra": raw[pos + ENTRY.size:name_at],
                        "name": raw[name_at:name_at + name_size].decode("utf-8",
                                                                         "replace")})
        pos = -(-(name_at + name_size) // 8) * 8
    return entries


def build_directory(entries: list[dict[str, Any]]) -> bytes:
    parts = []
    for e in entries:
        name = e["name"].encode()
        entry = ENTRY.pack(e["table_offset"], e["table_size"], e["flags"], e["type"],
                           e["granularity"].bit_length() - 1, len(name),
                           len(e["extra"])) + e["extra"] + name
        parts.append(entry + bytes(-len(entry) % 8))
    return b"".join(parts)


def _data_size(size: int, granularity: int) -> int:
    """Bytes of bitmap data for a disk of ``size`` bytes."""
    granules = -(-size // granularity)
    return -(-granules // 8)


async def load(node: Qcow2Node, writable: bool) -> None:
    """Creates the in-memory bitmaps from the image (QEMU's qcow2_load_dirty_bitmaps)
    and, on a writable image, marks them in use in the image."""
    cs = node.header.cluster_size
    size = node.header.size
    for entry in node.bitmaps:
        usable = (entry["type"] == TYPE_DIRTY_TRACKING
                  and (not entry["extra"] or entry["flags"] & EXTRA_DATA_COMPATIBLE))
        if not usable:
            continue
        bitmap = dirty_bitmap.create(node, entry["granularity"], entry["name"])
        bitmap.persistent = True
        if entry["flags"] & IN_USE:
            bitmap.inconsistent = True
            bitmap.disabled = True
            continue
        raw = await node.meta_read(entry["table_offset"], entry["table_size"] * 8)
        chunks = []
        for (value,) in struct.iter_unpack(">Q", raw):
            offset = value & TABLE_ENTRY_OFFSET_MASK
            if offset:
                chunks.append(await node.meta_read(offset, cs))
            else:
                chunks.append((b"\xff" if value & TABLE_ENTRY_ALL_ONES else b"\x00") * cs)
        bitmap.load_bytes(b"".join(chunks)[:_data_size(size, entry["granularity"])])
        if not entry["flags"] & AUTO:
            bitmap.disabled = True
        if writable:
            entry["flags"] |= IN_USE
        else:
            bitmap.readonly = True
    if writable and any(bm.persistent and not bm.inconsistent
                        for bm in node.dirty_bitmaps):
        await _rewrite_directory_in_place(node)


async def _rewrite_directory_in_place(node: Qcow2Node) -> None:
    """QEMU's update_ext_header_and_dir_in_place(): the directory changes only its
    flags, written where it is while the autoclear bit says the bitmaps are not to be
    trusted."""
    hdr = node.header
    assert node.bitmaps_ext is not None
    _, _, dir_size, dir_offset = fmt.BITMAPS_EXT.unpack(node.bitmaps_ext)
    hdr.autoclear_features &= ~fmt.AUTOCLEAR_BITMAPS
    await node.update_header()
    await node.sync()
    await node.meta_write(dir_offset, build_directory(node.bitmaps), OL_BITMAP_DIRECTORY)
    hdr.autoclear_features |= fmt.AUTOCLEAR_BITMAPS
    await node.update_header()
    await node.sync()


async def _set_directory(node: Qcow2Node, entries: list[dict[str, Any]]) -> None:
    """QEMU's update_ext_header_and_dir(): a new directory in new clusters, the header
    pointing at it, then the old directory freed."""
    rc = node.refcounts
    assert rc is not None
    old = fmt.BITMAPS_EXT.unpack(node.bitmaps_ext) if node.bitmaps_ext is not None else None
    hdr = node.header
    if entries:
        raw = build_directory(entries)
        offset = await rc.allocate_bytes(len(raw))
        node.set_meta(offset, -(-len(raw) // hdr.cluster_size), OL_BITMAP_DIRECTORY)
        await node.meta_write(offset, raw, OL_BITMAP_DIRECTORY)
        await node.flush_caches()
        await node.sync()
        node.bitmaps_ext = fmt.BITMAPS_EXT.pack(len(entries), 0, len(raw), offset)
        hdr.autoclear_features |= fmt.AUTOCLEAR_BITMAPS
    else:
        node.bitmaps_ext = None
        hdr.autoclear_features &= ~fmt.AUTOCLEAR_BITMAPS
    node.bitmaps = entries
    await node.update_header()
    await node.sync()
    if old is not None:
        _, _, old_size, old_offset = old
        node.set_meta(old_offset, -(-old_size // hdr.cluster_size), 0)
        await rc.free(old_offset, old_size, DISCARD_OTHER)


async def _free_table(node: Qcow2Node, entry: dict[str, Any]) -> None:
    """QEMU's free_bitmap_clusters(): the data clusters and the table."""
    rc = node.refcounts
    assert rc is not None
    cs = node.header.cluster_size
    if not entry["table_offset"]:
        return
    raw = await node.meta_read(entry["table_offset"], entry["table_size"] * 8)
    for (value,) in struct.iter_unpack(">Q", raw):
        offset = value & TABLE_ENTRY_OFFSET_MASK
        if offset:
            await rc.free(offset, cs, DISCARD_OTHER)
    await rc.free(entry["table_offset"], entry["table_size"] * 8, DISCARD_OTHER)


async def _write_bitmap(node: Qcow2Node, bitmap: dirty_bitmap.DirtyBitmap
                        ) -> tuple[int, int]:
    """Writes the data clusters and the table of one bitmap; (table offset, entries)."""
    rc = node.refcounts
    assert rc is not None
    cs = node.header.cluster_size
    data = bitmap.to_bytes()
    table = []
    zero = bytes(cs)
    for pos in range(0, len(data), cs):
        chunk = data[pos:pos + cs].ljust(cs, b"\x00")
        if chunk == zero:
            table.append(0)
            continue
        offset = await rc.allocate(1)
        await node.meta_write(offset, chunk, 0)
        table.append(offset)
    raw = struct.pack(f">{len(table)}Q", *table)
    offset = await rc.allocate_bytes(len(raw))
    await node.meta_write(offset, raw.ljust(-(-len(raw) // cs) * cs, b"\x00"), 0)
    return offset, len(table)


def _check_constraints(node: Qcow2Node, name: str, granularity: int) -> None:
    """QEMU's check_constraints_on_bitmap()."""
    bits = granularity.bit_length() - 1
    length = node.length()
    cs = node.header.cluster_size
    if bits < MIN_GRANULARITY_BITS:
        raise QMPError(f"Granularity exceeds minimum ({1 << MIN_GRANULARITY_BITS} bytes)")
    if bits > MAX_GRANULARITY_BITS:
        raise QMPError(f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)")
    if length > MAX_PHYS_SIZE << bits or length > (MAX_TABLE_SIZE * cs) << bits:
        raise QMPError("Too much space will be occupied by the bitmap. "
                       "Use larger granularity")
    if len(name.encode()) > MAX_NAME_SIZE:
        raise QMPError(f"Name length exceeds maximum ({MAX_NAME_SIZE} characters)")


async def can_store(node: Qcow2Node, name: str, granularity: int) -> None:
    """QEMU's qcow2_co_can_store_new_dirty_bitmap(), its texts."""
    prefix = f"Can't make bitmap '{name}' persistent in '{node.node_name}': "
    try:
        if node.header.version < 3:
            raise QMPError("Cannot store dirty bitmaps in qcow2 v2 files")
        _check_constraints(node, name, granularity)
        if not node.bitmaps:
            return
        if len(node.bitmaps) >= fmt.MAX_BITMAPS:
            raise QMPError("Maximum number of persistent bitmaps is already reached")
        dir_size = len(build_directory(node.bitmaps))
        entry_size = -(-(ENTRY.size + len(name.encode())) // 8) * 8
        if dir_size + entry_size > fmt.MAX_BITMAP_DIRECTORY_SIZE:
            raise QMPError("Not enough space in the bitmap directory")
        if any(e["name"] == name for e in node.bitmaps):
            raise QMPError("Bitmap with the same name is already stored")
    except QMPError as exc:
        raise QMPError(prefix + exc.desc) from None


async def remove(node: Qcow2Node, name: str) -> None:
    """Drops a stored bitmap from the image (QEMU's
    qcow2_co_remove_persistent_dirty_bitmap); absence is no error."""
    entry = next((e for e in node.bitmaps if e["name"] == name), None)
    if entry is None:
        return
    try:
        await _set_directory(node, [e for e in node.bitmaps if e is not entry])
    except OSError as exc:
        raise QMPError("Failed to update bitmap extension: "
                       f"{os.strerror(exc.errno or errno.EIO)}") from None
    await _free_table(node, entry)


async def store(node: Qcow2Node) -> None:
    """Writes every persistent bitmap to the image (QEMU's
    qcow2_store_persistent_dirty_bitmaps); those already stored and still in use are
    replaced, the others in the directory stay as they are.  Raises OSError or
    QMPError; the caller reports."""
    entries = [dict(e) for e in node.bitmaps]
    by_name = {e["name"]: e for e in entries}
    writes: list[tuple[dict[str, Any], dirty_bitmap.DirtyBitmap]] = []
    drop: list[dict[str, Any]] = []
    for bitmap in node.dirty_bitmaps:       # newest first: QEMU appends in list order
        if not bitmap.stored or bitmap.inconsistent or bitmap.readonly:
            continue
        assert bitmap.name is not None
        try:
            _check_constraints(node, bitmap.name, bitmap.granularity)
        except QMPError as exc:
            raise QMPError(f"Bitmap '{bitmap.name}' doesn't satisfy the constraints: "
                           f"{exc.desc}") from None
        entry = by_name.get(bitmap.name)
        if entry is None:
            entry = {"extra": b"", "type": TYPE_DIRTY_TRACKING, "name": bitmap.name}
            entries.append(entry)
            by_name[bitmap.name] = entry
        else:
            if not entry["flags"] & IN_USE:
                raise QMPError(f"Bitmap '{bitmap.name}' already exists in the image")
            drop.append(dict(entry))
        entry["flags"] = 0 if bitmap.disabled else AUTO
        entry["granularity"] = bitmap.granularity
        writes.append((entry, bitmap))
    if not writes:
        return
    if len(entries) > fmt.MAX_BITMAPS:
        raise QMPError("Too many persistent bitmaps")
    writes.sort(key=lambda pair: entries.index(pair[0]))     # directory order
    for entry, bitmap in writes:
        entry["table_offset"], entry["table_size"] = await _write_bitmap(node, bitmap)
    await _set_directory(node, entries)
    for entry in drop:
        await _free_table(node, entry)
