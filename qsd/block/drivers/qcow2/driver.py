"""The ``qcow2`` format driver (QEMU's block/qcow2*.c behaviour, texts and events).

Requests come from any loop.  Metadata (L1, the L2 and refcount caches, allocation) is
changed under one cross-loop mutex; guest data moves outside it.  A write that needs
new clusters is planned under the lock (clusters allocated, the copy-on-write regions
worked out, the guest clusters marked as in flight), writes its data without the lock,
and links the L2 entries under the lock again; overlapping writes wait for it.  Reads
and writes of clusters that are already allocated never take the lock once their L2
table is cached: ``read_nowait``/``write_nowait`` answer them inline.  A write into one
unallocated cluster is answered inline as well when none of its steps would wait (its
metadata cached, the lock free, the backing data in the page cache): the lock is taken
without waiting and the cluster allocated, written and linked at once.  Data moves
inline on the long way too wherever the page cache takes it (copy-on-write reads from
the backing file, the writes of new clusters at the end of the file).

What reaches the file in which order is described in cache.py and refcount.py; a killed
daemon leaves at worst leaked clusters.  Metadata that cannot be right (overlapping
writes, misaligned offsets) marks the image corrupt with QEMU's messages and the
BLOCK_IMAGE_CORRUPTED event, after which the node refuses all I/O, as QEMU's does.
"""

from __future__ import annotations

import asyncio
import errno
import os
import struct
import sys
import time
from array import array
from typing import Any, cast

from qsd.block import events, io
from qsd.block.drivers.qcow2 import bitmaps as qbitmaps
from qsd.block.drivers.qcow2 import compress, l2
from qsd.block.drivers.qcow2 import format as fmt
from qsd.block.drivers.qcow2 import options as qopts
from qsd.block.drivers.qcow2.cache import Caches, TableCache
from qsd.block.drivers.qcow2.create import create_qcow2
from qsd.block.drivers.qcow2.refcount import (
    DISCARD_ALWAYS,
    DISCARD_NEVER,
    DISCARD_OTHER,
    DISCARD_REQUEST,
    OL_ACTIVE_L1,
    OL_ACTIVE_L2,
    OL_BITMAP_DIRECTORY,
    OL_INACTIVE_L1,
    OL_INACTIVE_L2,
    OL_MAIN_HEADER,
    OL_NAMES,
    OL_REFCOUNT_BLOCK,
    OL_REFCOUNT_TABLE,
    OL_SNAPSHOT_TABLE,
    Refcounts,
)
from qsd.block.drivers.qcow2.sync import CrossLoopLock
from qsd.block.limits import BlockLimits
from qsd.block.node import (
    BLOCK_DATA,
    BLOCK_OFFSET_VALID,
    BLOCK_RECURSE,
    BLOCK_ZERO,
    BlockNode,
    BlockStatus,
    Child,
    ChildOpener,
    Data,
)
from qsd.block.permissions import ChildRole
from qsd.block.registry import register
from qsd.errors import QMPError
from qsd.qapi.generated import BlockdevOptionsQcow2

_SNAPSHOT = struct.Struct(">QIHHIIQII")


def _err(code: int) -> OSError:
    return OSError(code, os.strerror(code))


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _InFlight:
    """Guest clusters a write is changing the mapping of; others wait for it."""

    __slots__ = ("waiters",)

    def __init__(self) -> None:
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []

    def wait(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self.waiters.append((loop, fut))
        return fut

    def done(self) -> None:
        for loop, fut in self.waiters:
            loop.call_soon_threadsafe(_wake, fut)
        self.waiters.clear()


class _Piece:
    """One cluster's part of a write: where it goes and what must change."""

    __slots__ = ("guest", "start", "end", "host", "lo", "hi", "fills", "new_entry",
                 "new_bitmap", "free_entry", "cluster", "new_cluster")

    def __init__(self) -> None:
        self.guest = 0          # guest offset of the cluster
        self.start = 0          # written bytes within the cluster
        self.end = 0
        self.host = 0           # host cluster offset the data goes to
        self.lo = 0             # extent written to the host cluster (data + fills)
        self.hi = 0
        self.fills: list[tuple[int, int, int, int]] = []  # (start, end, type, entry)
        self.new_entry: int | None = None
        self.new_bitmap = 0
        self.free_entry = 0     # old L2 entry whose cluster is freed after linking
        self.cluster = 0        # guest cluster index
        self.new_cluster = False


@register("qcow2", options=BlockdevOptionsQcow2, create=create_qcow2)
class Qcow2Node(BlockNode):
    is_format = True
    supports_backing = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = CrossLoopLock()
        self.header = fmt.Header()
        self.geo: l2.Geometry | None = None
        self.l1: list[int] = []
        self.meta: dict[int, int] = {}
        self.caches: Caches | None = None
        self.l2_cache: TableCache[array[int]] | None = None
        self.refcounts: Refcounts | None = None
        self.opts_rt: qopts.RuntimeOptions | None = None
        self.data_child: Child | None = None
        self.image_data_file: str | None = None
        self.unknown_extensions: list[tuple[int, bytes]] = []
        self.bitmaps_ext: bytes | None = None
        self.bitmaps: list[dict[str, Any]] = []
        self.snapshots: list[tuple[int, int]] = []
        self.corrupt_signalled = False
        self.inflight: dict[int, _InFlight] = {}
        self.decompressed: tuple[int, bytes] = (-1, b"")
        self.metadata_preallocation: bool | None = None
        self.clean_timer: asyncio.TimerHandle | None = None
        # The inline paths' view of the image (set by _bind_fast once open).
        self._l1_shift = 0
        self._l2_mask = 0
        self._words = 1
        self._cluster_mask = 0
        self._sc_bits = 0
        self._l2_entries: dict[int, Any] = {}
        self._check_data_clusters = True
        self._fast_data: BlockNode | None = None
        self._fast_backing: BlockNode | None = None

    # ---- open ------------------------------------------------------------------------

    async def open(self, options: BlockdevOptionsQcow2, children: ChildOpener) -> None:
        file = await children.open_child(self, options.file, "file",
                                         ChildRole.IMAGE | ChildRole.PRIMARY)
        try:
            head = await io.read(file, 0, fmt.V3_HEADER_LENGTH)
        except OSError as exc:
            raise QMPError(f"Could not read qcow2 header: {os.strerror(exc.errno or 0)}"
                           ) from None
        hdr = fmt.Header.unpack(head)
        self._check_header(hdr)
        cs = hdr.cluster_size
        if hdr.header_length > fmt.V3_HEADER_LENGTH:
            hdr.unknown_fields = await io.read(file, fmt.V3_HEADER_LENGTH,
                                               hdr.header_length - fmt.V3_HEADER_LENGTH)
        if hdr.backing_file_offset > cs:
            raise QMPError("Invalid backing file offset")
        ext_end = hdr.backing_file_offset or cs
        first = await io.read(file, 0, cs)
        self.header = hdr
        if hdr.compression_type not in (fmt.COMPRESSION_ZLIB, fmt.COMPRESSION_ZSTD):
            raise QMPError(f"qcow2: unknown compression type: {hdr.compression_type}")
        if hdr.compression_type == fmt.COMPRESSION_ZLIB:
            if hdr.incompatible_features & fmt.INCOMPAT_COMPRESSION:
                raise QMPError("qcow2: Compression type incompatible feature bit must "
                               "not be set")
        elif not hdr.incompatible_features & fmt.INCOMPAT_COMPRESSION:
            raise QMPError("qcow2: Compression type incompatible feature bit must be set")
        unknown = hdr.incompatible_features & ~fmt.INCOMPAT_MASK
        if unknown:
            table = b""
            try:
                for magic, data in fmt.parse_extensions(first, hdr.header_length, ext_end):
                    if magic == fmt.EXT_FEATURE_TABLE:
                        table = data
            except fmt.FormatError:
                pass
            raise QMPError("Unsupported qcow2 feature(s): "
                           + fmt.feature_names(table, fmt.FEAT_INCOMPATIBLE, unknown))
        if hdr.incompatible_features & fmt.INCOMPAT_CORRUPT and not self.read_only:
            raise QMPError("qcow2: Image is corrupt; cannot be opened read/write")
        geo = l2.Geometry(hdr)
        if geo.subcluster_size < 512:
            raise QMPError(f"Unsupported subcluster size: {geo.subcluster_size}")
        if hdr.refcount_order > 6:
            raise QMPError("Reference count entry width too large; may not exceed 64 bits")
        if hdr.crypt_method > fmt.CRYPT_LUKS:
            raise QMPError(f"Unsupported encryption method {hdr.crypt_method}")
        if hdr.crypt_method:
            # QEMU decrypts with a key secret; qsd has no block encryption at all.
            method = "aes" if hdr.crypt_method == fmt.CRYPT_AES else "luks"
            raise QMPError(f"Encrypted qcow2 images ({method}) are not supported; "
                           "'qemu-img convert' makes an unencrypted copy")
        if options.encrypt is not None:
            encrypt_format = getattr(options.encrypt.format, "value", options.encrypt.format)
            raise QMPError("No encryption in image header, but options specified format "
                           f"'{encrypt_format}'")
        if hdr.refcount_table_clusters == 0:
            raise QMPError("Image does not contain a reference count table")
        self._validate_table(hdr.refcount_table_offset, hdr.refcount_table_clusters, cs,
                             fmt.MAX_REFTABLE_SIZE, "Reference count table")
        self._validate_table(hdr.snapshots_offset, hdr.nb_snapshots,
                             fmt.SNAPSHOT_HEADER_SIZE,
                             fmt.SNAPSHOT_HEADER_SIZE * fmt.MAX_SNAPSHOTS, "Snapshot table")
        self._validate_table(hdr.l1_table_offset, hdr.l1_size, fmt.L1E_SIZE,
                             fmt.MAX_L1_SIZE, "Active L1 table")
        l1_needed = fmt.l1_entries_for(hdr.size, hdr.cluster_bits, geo.extended)
        if l1_needed > qopts.INT_MAX:
            raise QMPError("Image is too big")
        if hdr.l1_size < l1_needed:
            raise QMPError("L1 table is too small")
        self.geo = geo
        raw_l1 = await io.read(file, hdr.l1_table_offset, hdr.l1_size * 8) if hdr.l1_size else b""
        self.l1 = list(struct.unpack(f">{hdr.l1_size}Q", raw_l1))
        self.opts_rt = rt = qopts.parse(options, hdr, hdr.size, self.opts.discard == "unmap")
        self.l2_cache = TableCache("L2", rt.l2_tables, l2.encode)
        refblock_cache: TableCache[bytearray] = TableCache("refcount", rt.refcount_blocks, bytes)
        self.caches = Caches(self.l2_cache,
                             refblock_cache,
                             self._write_cached, self.sync)
        raw_rt = await io.read(file, hdr.refcount_table_offset,
                               hdr.refcount_table_clusters * cs)
        reftable = list(struct.unpack(f">{len(raw_rt) // 8}Q", raw_rt))
        self.refcounts = Refcounts(self, self.caches, hdr, reftable)
        try:
            extensions = fmt.parse_extensions(first, hdr.header_length, ext_end)
        except fmt.FormatError as exc:
            raise QMPError(str(exc)) from None
        update_header = self._read_extensions(extensions)
        await self._open_data_file(options, children)
        if hdr.backing_file_offset:
            size = hdr.backing_file_size
            if size > min(fmt.MAX_BACKING_FILE_NAME, cs - hdr.backing_file_offset):
                raise QMPError("Backing file name too long")
            raw = first[hdr.backing_file_offset:hdr.backing_file_offset + size]
            self.backing_file = raw.decode("utf-8", "replace")
        await self._read_snapshots()
        await self._read_bitmaps()
        writable = not self.read_only
        if hdr.autoclear_features & ~fmt.AUTOCLEAR_MASK:
            update_header = True
        self._build_meta_map()
        if self.snapshots and self.opts_rt.overlap_check & OL_INACTIVE_L2:
            for l1_offset, l1_size in self.snapshots:
                raw = await io.read(file, l1_offset, l1_size * 8)
                for (entry,) in struct.iter_unpack(">Q", raw):
                    if entry & fmt.L1E_OFFSET_MASK and not self.meta.get(
                            entry >> hdr.cluster_bits):
                        self.set_meta(entry & fmt.L1E_OFFSET_MASK, 1, OL_INACTIVE_L2)
        if writable:
            hdr.autoclear_features &= fmt.AUTOCLEAR_MASK
            if update_header:
                await self.update_header()
            if hdr.incompatible_features & fmt.INCOMPAT_DIRTY:
                from qsd.block.drivers.qcow2.check import repair_refcounts
                try:
                    await repair_refcounts(self)
                except OSError as exc:
                    raise QMPError(f"Could not repair dirty image: "
                                   f"{os.strerror(exc.errno or errno.EIO)}") from None
        if self.bitmaps:
            self.refresh_length()
            await qbitmaps.load(self, writable)
        await self._open_backing(options, children)
        self._bind_fast()
        self._start_clean_timer()

    def _check_header(self, hdr: fmt.Header) -> None:
        if hdr.magic != fmt.MAGIC:
            raise QMPError("Image is not in qcow2 format")
        if hdr.version not in (2, 3):
            raise QMPError(f"Unsupported qcow2 version {hdr.version}")
        if not fmt.MIN_CLUSTER_BITS <= hdr.cluster_bits <= fmt.MAX_CLUSTER_BITS:
            raise QMPError(f"Unsupported cluster size: 2^{hdr.cluster_bits}")
        if hdr.version == 3 and hdr.header_length < fmt.V3_MIN_HEADER_LENGTH:
            raise QMPError("qcow2 header too short")
        if hdr.header_length > hdr.cluster_size:
            raise QMPError("qcow2 header exceeds cluster size")

    def _validate_table(self, offset: int, entries: int, entry_len: int, max_bytes: int,
                        name: str) -> None:
        """QEMU's qcow2_validate_table()."""
        if entries > max_bytes // entry_len:
            raise QMPError(f"{name} too large")
        if (2**63 - 1 - entries * entry_len < offset
                or offset & (self.header.cluster_size - 1)):
            raise QMPError(f"{name} offset invalid")

    def _read_extensions(self, extensions: list[tuple[int, bytes]]) -> bool:
        """Takes in what the header extensions say; True if the header must be
        rewritten (an inconsistent bitmaps extension to drop)."""
        update = False
        for magic, data in extensions:
            if magic == fmt.EXT_BACKING_FORMAT:
                if len(data) >= 16:
                    raise QMPError(f"ERROR: ext_backing_format: len={len(data)} too large "
                                   "(>=16)")
                self.backing_format = data.decode("utf-8", "replace")
            elif magic == fmt.EXT_FEATURE_TABLE:
                continue
            elif magic == fmt.EXT_CRYPTO_HEADER:
                raise QMPError("CRYPTO header extension only expected with LUKS "
                               "encryption method")
            elif magic == fmt.EXT_BITMAPS:
                if len(data) != fmt.BITMAPS_EXT.size:
                    raise QMPError("bitmaps_ext: Invalid extension length")
                if not self.header.autoclear_features & fmt.AUTOCLEAR_BITMAPS:
                    update = True
                    continue
                nb, reserved, dir_size, dir_offset = fmt.BITMAPS_EXT.unpack(data)
                if reserved:
                    raise QMPError("bitmaps_ext: Reserved field is not zero")
                if nb > fmt.MAX_BITMAPS:
                    raise QMPError(f"bitmaps_ext: Image has {nb} bitmaps, exceeding the "
                                   f"QEMU supported maximum of {fmt.MAX_BITMAPS}")
                if nb == 0:
                    raise QMPError("found bitmaps extension with zero bitmaps")
                if dir_offset & (self.header.cluster_size - 1):
                    raise QMPError("bitmaps_ext: invalid bitmap directory offset")
                if dir_size > fmt.MAX_BITMAP_DIRECTORY_SIZE:
                    raise QMPError(f"bitmaps_ext: bitmap directory size ({dir_size}) "
                                   f"exceeds the maximum supported size "
                                   f"({fmt.MAX_BITMAP_DIRECTORY_SIZE})")
                self.bitmaps_ext = data
            elif magic == fmt.EXT_DATA_FILE:
                self.image_data_file = data.decode("utf-8", "replace")
            else:
                # QEMU keeps them in a list it prepends to: rewritten in reverse.
                self.unknown_extensions.insert(0, (magic, data))
        return update

    async def _open_data_file(self, options: BlockdevOptionsQcow2,
                              children: ChildOpener) -> None:
        hdr = self.header
        has_data_file = bool(hdr.incompatible_features & fmt.INCOMPAT_DATA_FILE)
        file = self.file
        assert file is not None
        if options.data_file is not None:
            if not has_data_file:
                raise QMPError("'data-file' can only be set for images with an external "
                               "data file")
            self.data_child = await children.open_child(self, options.data_file,
                                                        "data-file", ChildRole.DATA)
        elif has_data_file:
            if not self.image_data_file:
                raise QMPError("'data-file' is required for this image")
            # QEMU opens the name as it is: a relative one from the daemon's directory.
            ref = {"driver": "file", "filename": self.image_data_file}
            self.data_child = await children.open_child(self, ref, "data-file",
                                                        ChildRole.DATA)
        if has_data_file:
            file.role = ChildRole.METADATA | ChildRole.PRIMARY
        else:
            if hdr.autoclear_features & fmt.AUTOCLEAR_DATA_FILE_RAW:
                raise QMPError("data-file-raw requires a data file")
            self.data_child = file

    async def _open_backing(self, options: BlockdevOptionsQcow2,
                            children: ChildOpener) -> None:
        """``backing``: a node name, a definition, null, or (absent) the image header's
        backing file, opened read-only relative to this image as QEMU does."""
        ref: object
        if "backing" in options.model_fields_set:
            ref = options.backing
            if ref is None:
                return
        elif self.backing_file:
            ref = await self._backing_ref()
        else:
            return
        try:
            await children.open_child(self, ref, "backing", ChildRole.COW)
        except QMPError as exc:
            raise QMPError(f"Could not open backing file: {exc.desc}",
                           exc.error_class) from None

    async def _backing_ref(self) -> dict[str, object]:
        filename = self.full_backing_filename()
        driver = self.backing_format
        if not driver:
            driver = "raw"
            try:
                with open(filename, "rb") as f:
                    if f.read(4) == b"QFI\xfb":
                        driver = "qcow2"
            except OSError:
                pass
        return {"driver": driver, "read-only": True,
                "file": {"driver": "file", "filename": filename}}

    async def _read_snapshots(self) -> None:
        """The snapshots' L1 tables (kept intact; needed for overlap checks and
        repairs)."""
        hdr = self.header
        file = self.file
        assert file is not None
        pos = hdr.snapshots_offset
        for _ in range(hdr.nb_snapshots):
            raw = await io.read(file, pos, _SNAPSHOT.size)
            (l1_offset, l1_size, id_len, name_len, _sec, _nsec, _clock, _vm,
             extra) = _SNAPSHOT.unpack(raw)
            self.snapshots.append((l1_offset, l1_size))
            pos += _SNAPSHOT.size + extra + id_len + name_len
            pos = -(-pos // 8) * 8

    async def _read_bitmaps(self) -> None:
        """The bitmap directory (``self.bitmaps``); the bitmaps themselves are loaded
        once the image is otherwise open (qcow2 bitmaps.py)."""
        if self.bitmaps_ext is None:
            return
        nb, _, size, offset = fmt.BITMAPS_EXT.unpack(self.bitmaps_ext)
        self.bitmaps = qbitmaps.parse_directory(await self.meta_read(offset, size), nb)

    async def can_store_bitmap(self, name: str, granularity: int) -> None:
        await qbitmaps.can_store(self, name, granularity)

    async def remove_persistent_bitmap(self, name: str) -> None:
        async with self.lock:
            await qbitmaps.remove(self, name)

    def _build_meta_map(self) -> None:
        """Which clusters hold which metadata (overlap checks)."""
        hdr = self.header
        cs = hdr.cluster_size
        rc = self.refcounts
        assert rc is not None
        self.set_meta(0, 1, OL_MAIN_HEADER)
        self.set_meta(hdr.l1_table_offset, -(-hdr.l1_size * 8 // cs), OL_ACTIVE_L1)
        for entry in self.l1:
            off = entry & fmt.L1E_OFFSET_MASK
            if off:
                self.set_meta(off, 1, OL_ACTIVE_L2)
        self.set_meta(hdr.refcount_table_offset, hdr.refcount_table_clusters, OL_REFCOUNT_TABLE)
        for entry in rc.table:
            off = entry & fmt.REFT_OFFSET_MASK
            if off:
                self.set_meta(off, 1, OL_REFCOUNT_BLOCK)
        if hdr.nb_snapshots:
            self.set_meta(hdr.snapshots_offset, 1, OL_SNAPSHOT_TABLE)
        for l1_offset, l1_size in self.snapshots:
            self.set_meta(l1_offset, -(-l1_size * 8 // cs), OL_INACTIVE_L1)
        if self.bitmaps_ext is not None:
            _, _, size, offset = fmt.BITMAPS_EXT.unpack(self.bitmaps_ext)
            self.set_meta(offset, -(-size // cs), OL_BITMAP_DIRECTORY)

    # ---- what refcount.py and check.py use ------------------------------------------

    @property
    def cluster_bits(self) -> int:
        return self.header.cluster_bits

    async def meta_read(self, offset: int, length: int) -> bytes:
        file = self.file
        assert file is not None
        return await io.read(file, offset, length)

    async def meta_write(self, offset: int, data: bytes, kind: int) -> None:
        """Writes metadata of ``kind`` after checking it overlaps no other metadata."""
        self.check_overlap(offset, len(data), kind)
        file = self.file
        assert file is not None
        await io.write(file, offset, data)

    async def sync(self) -> None:
        file = self.file
        assert file is not None
        await io.flush(file)

    def file_end(self) -> int:
        file = self.file
        assert file is not None
        return file.node.length()

    def set_meta(self, offset: int, clusters: int, kind: int) -> None:
        first = offset >> self.header.cluster_bits
        for cluster in range(first, first + clusters):
            if kind:
                self.meta[cluster] = kind
            else:
                self.meta.pop(cluster, None)

    async def discard_freed(self, offset: int, length: int, kind: int) -> None:
        rt = self.opts_rt
        if rt is None or not rt.discard_passthrough[kind]:
            return
        file = self.file
        assert file is not None
        await self._discard_file(file, offset, length)

    async def _discard_file(self, file: Child, offset: int, length: int) -> None:
        try:
            await io.discard(file, offset, length)
        except OSError:
            pass    # only a hint, as QEMU treats it

    def check_overlap(self, offset: int, length: int, ignore: int) -> None:
        """QEMU's qcow2_pre_write_overlap_check(): a write into metadata of another kind
        marks the image corrupt and fails with EIO."""
        rt = self.opts_rt
        mask = (rt.overlap_check if rt is not None else 0) & ~ignore
        if not mask or length <= 0:
            return
        bits = self.header.cluster_bits
        meta = self.meta
        for cluster in range(offset >> bits, ((offset + length - 1) >> bits) + 1):
            kind = meta.get(cluster, 0) & mask
            if kind:
                name = OL_NAMES[kind.bit_length() - 1]
                raise self.corruption(f"Preventing invalid write on metadata (overlaps with "
                                      f"{name})", offset, length)

    def check_data_overlap(self, offset: int, length: int) -> None:
        """Guest data in the image file must not land on metadata; an external data
        file holds no metadata."""
        if self.data_child is self.file:
            self.check_overlap(offset, length, 0)

    def corruption(self, message: str, offset: int = -1, size: int = -1,
                   fatal: bool = True) -> OSError:
        """QEMU's qcow2_signal_corruption(): tells once (stderr and the event), marks the
        image corrupt and stops all I/O when fatal; returns the EIO to raise."""
        if not (self.corrupt_signalled and (
                not fatal or self.header.incompatible_features & fmt.INCOMPAT_CORRUPT)):
            if fatal:
                text = (f"qcow2: Marking image as corrupt: {message}; further corruption "
                        "events will be suppressed")
            else:
                text = (f"qcow2: Image is corrupt: {message}; further non-fatal corruption "
                        "events will be suppressed")
            print(text, file=sys.stderr, flush=True)
            data: dict[str, object] = {"device": "", "node-name": self.node_name,
                                       "msg": message}
            if offset >= 0:
                data["offset"] = offset
            if size >= 0:
                data["size"] = size
            data["fatal"] = fatal
            events.emit("BLOCK_IMAGE_CORRUPTED", data)
            if fatal:
                self.header.incompatible_features |= fmt.INCOMPAT_CORRUPT
                self.ejected = True
                self.start_background(self._write_corrupt_bit())
            self.corrupt_signalled = True
        return _err(errno.EIO)

    async def _write_corrupt_bit(self) -> None:
        if self.read_only or self.header.version < 3:
            return
        try:
            await self.update_header()
        except OSError:
            pass

    def _check_usable(self) -> None:
        if self.ejected:
            raise OSError(errno.ENOMEDIUM, os.strerror(errno.ENOMEDIUM))

    # ---- the header --------------------------------------------------------------------

    async def update_header(self) -> None:
        """Rewrites the header cluster as QEMU's qcow2_update_header() does."""
        hdr = self.header
        rc = self.refcounts
        assert rc is not None
        hdr.refcount_table_offset = rc.table_offset
        hdr.refcount_table_clusters = rc.table_clusters
        hdr.nb_snapshots = len(self.snapshots)
        cluster = fmt.build_header_cluster(
            hdr, backing_file=self.backing_file or None,
            backing_format=self.backing_format or None, data_file=self.image_data_file,
            bitmaps=self.bitmaps_ext, unknown_extensions=self.unknown_extensions)
        file = self.file
        assert file is not None
        await io.write(file, 0, cluster)

    async def change_backing_file(self, filename: str, backing_format: str) -> None:
        """A job changed the chain: the header names the new backing file (QEMU's
        qcow2_change_backing_file, its limits)."""
        raw_data = self.header.autoclear_features & fmt.AUTOCLEAR_DATA_FILE_RAW
        if filename and (raw_data or len(filename.encode()) > fmt.MAX_BACKING_FILE_NAME):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        self.backing_file = filename
        self.backing_format = backing_format
        await self.update_header()

    async def _write_features(self, features: int) -> None:
        file = self.file
        assert file is not None
        await io.write(file, 72, features.to_bytes(8, "big"))
        await self.sync()

    async def mark_dirty(self) -> None:
        """QEMU's qcow2_mark_dirty(): lazy refcounts postpone refcount updates."""
        hdr = self.header
        if hdr.incompatible_features & fmt.INCOMPAT_DIRTY:
            return
        await self._write_features(hdr.incompatible_features | fmt.INCOMPAT_DIRTY)
        hdr.incompatible_features |= fmt.INCOMPAT_DIRTY

    async def mark_clean(self) -> None:
        hdr = self.header
        if hdr.incompatible_features & fmt.INCOMPAT_DIRTY:
            await self.flush_caches()
            await self.sync()
            hdr.incompatible_features &= ~fmt.INCOMPAT_DIRTY
            await self._write_features(hdr.incompatible_features)

    # ---- node description ------------------------------------------------------------

    def get_length(self) -> int:
        return self.header.size

    def driver_limits(self, bl: BlockLimits) -> None:
        geo = self.geo
        cs = geo.cluster_size if geo is not None else 65536
        bl.pwrite_zeroes_alignment = geo.subcluster_size if geo is not None else cs
        bl.pdiscard_alignment = cs

    def get_info(self) -> dict[str, object]:
        return {"dirty-flag": bool(self.header.incompatible_features & fmt.INCOMPAT_DIRTY),
                "cluster-size": self.header.cluster_size}

    def format_specific(self) -> dict[str, object] | None:
        hdr = self.header
        data: dict[str, object]
        ctype = "zstd" if hdr.compression_type == fmt.COMPRESSION_ZSTD else "zlib"
        if hdr.version == 2:
            data = {"compat": "0.10", "refcount-bits": 1 << hdr.refcount_order,
                    "compression-type": ctype}
        else:
            data = {"compat": "1.1"}
            if self.image_data_file is not None:
                data["data-file"] = self.image_data_file
            has_data_file = bool(hdr.incompatible_features & fmt.INCOMPAT_DATA_FILE)
            if has_data_file:
                data["data-file-raw"] = bool(hdr.autoclear_features
                                             & fmt.AUTOCLEAR_DATA_FILE_RAW)
            data["extended-l2"] = bool(hdr.incompatible_features & fmt.INCOMPAT_EXTL2)
            data["lazy-refcounts"] = bool(hdr.compatible_features & fmt.COMPAT_LAZY_REFCOUNTS)
            data["corrupt"] = bool(hdr.incompatible_features & fmt.INCOMPAT_CORRUPT)
            data["refcount-bits"] = 1 << hdr.refcount_order
            if self.bitmaps:
                data["bitmaps"] = [
                    {"name": bm["name"], "granularity": bm["granularity"],
                     "flags": [name for bit, name in ((qbitmaps.IN_USE, "in-use"),
                                                      (qbitmaps.AUTO, "auto"))
                               if bm["flags"] & bit]}
                    for bm in self.bitmaps]
            data["compression-type"] = ctype
        return {"type": "qcow2", "data": data}

    # ---- L2 tables ---------------------------------------------------------------------

    async def _load_l2(self, l1_index: int) -> array[int] | None:
        """The active L2 table for ``l1_index`` through the cache (lock held)."""
        entry = self.l1[l1_index] if l1_index < len(self.l1) else 0
        offset = entry & fmt.L1E_OFFSET_MASK
        if not offset:
            return None
        cache = self.l2_cache
        assert cache is not None and self.caches is not None
        cached = cache.lookup(offset)
        if cached is not None:
            return cached.table
        if offset & (self.header.cluster_size - 1):
            raise self.corruption(f"L2 table offset {fmt.c_hex(offset)} unaligned "
                                  f"(L1 index: {fmt.c_hex(l1_index)})")
        await self.caches.evict_for(cache)
        table = l2.decode(await self.meta_read(offset, self.header.cluster_size))
        cache.insert(offset, table)
        return table

    def _peek_l2(self, offset: int) -> array[int] | None | bool:
        """Without the lock: the cached table for a guest offset, None for no table,
        False if it is not cached."""
        geo = self.geo
        assert geo is not None
        index = geo.l1_index(offset)
        entry = self.l1[index] if index < len(self.l1) else 0
        l2_offset = entry & fmt.L1E_OFFSET_MASK
        if not l2_offset:
            return None
        cache = self.l2_cache
        assert cache is not None
        table = cache.peek(l2_offset)
        return table if table is not None else False

    async def _table_for(self, offset: int) -> array[int] | None:
        table = self._peek_l2(offset)
        if table is not False:
            return cast("array[int] | None", table)
        geo = self.geo
        assert geo is not None
        async with self.lock:
            return await self._load_l2(geo.l1_index(offset))

    async def _writable_l2(self, l1_index: int) -> array[int]:
        """The L2 table for ``l1_index``, allocated or copied if it is missing or shared
        (QEMU's l2_allocate): written and synced before the L1 entry points at it."""
        if l1_index >= len(self.l1):
            raise _err(errno.EIO)
        entry = self.l1[l1_index]
        if entry & fmt.OFLAG_COPIED and entry & fmt.L1E_OFFSET_MASK:
            table = await self._load_l2(l1_index)
            assert table is not None
            return table
        rc, caches, cache = self.refcounts, self.caches, self.l2_cache
        assert rc is not None and caches is not None and cache is not None
        old = entry & fmt.L1E_OFFSET_MASK
        if old:
            old_table = await self._load_l2(l1_index)
            assert old_table is not None
            table = array("Q", old_table)
        else:
            table = array("Q", bytes(self.header.cluster_size))
        new = await rc.allocate(1)
        if new == 0:
            raise self.corruption("Preventing invalid allocation of L2 table at offset 0")
        self.check_overlap(new, self.header.cluster_size, 0)
        self.set_meta(new, 1, OL_ACTIVE_L2)
        # The new table's refcount first, as QEMU's l2_allocate does.  Not a dependency
        # set after the table is in the cache: resolving one the other way round (a
        # pending free) would write the table, and the L1 entry follow, before it.
        await caches.flush(caches.refblocks)
        await caches.evict_for(cache)
        cached = cache.insert(new, table)
        cached.dirty = True
        await caches.flush(caches.l2)
        await self._write_l1_entry(l1_index, new | fmt.OFLAG_COPIED)
        if old:
            cache.drop(old)
            await rc.free(old, self.header.cluster_size, DISCARD_OTHER)
        return table

    async def _write_l1_entry(self, index: int, value: int) -> None:
        """QEMU's qcow2_write_l1_entry(): the aligned 512 bytes around it, synced."""
        self.l1[index] = value
        start = index - index % 64
        end = min(start + 64, len(self.l1))
        raw = struct.pack(f">{end - start}Q", *self.l1[start:end])
        offset = self.header.l1_table_offset + start * 8
        await self.meta_write(offset, raw, OL_ACTIVE_L1)
        await self.sync()

    async def _write_cached(self, offset: int, data: bytes) -> None:
        kind = self.meta.get(offset >> self.header.cluster_bits, 0)
        await self.meta_write(offset, data, kind)

    # ---- mapping -------------------------------------------------------------------

    def _map_in(self, table: array[int] | None, offset: int,
                length: int) -> tuple[int, int, int, int]:
        """(type, host offset of ``offset`` (if any), bytes, L2 entry) of the run at
        ``offset``, within one L2 table."""
        geo = self.geo
        assert geo is not None
        sc_bits = geo.subcluster_bits
        in_sc = offset & (geo.subcluster_size - 1)
        cs_left = geo.l2_size - geo.l2_index(offset)
        limit = -(-(in_sc + length) >> sc_bits)
        if table is None:
            total = (cs_left << geo.cluster_bits) - (offset & (geo.cluster_size - 1))
            return l2.UNALLOCATED_PLAIN, 0, min(length, total), 0
        index = geo.l2_index(offset)
        sc = (offset >> sc_bits) & (geo.subclusters - 1)
        kind, count = geo.run(table, index, sc, limit)
        entry = table[index * geo.words]
        nbytes = min((count << sc_bits) - in_sc, length)
        host = 0
        if kind in (l2.NORMAL, l2.ZERO_ALLOC, l2.UNALLOCATED_ALLOC):
            host = (entry & fmt.L2E_OFFSET_MASK) + (offset & (geo.cluster_size - 1))
            if host & 511 != offset & 511 or (entry & fmt.L2E_OFFSET_MASK) & (
                    geo.cluster_size - 1):
                raise self.corruption(
                    f"Cluster allocation offset {fmt.c_hex(entry & fmt.L2E_OFFSET_MASK)} "
                    f"unaligned (L2 offset: "
                    f"{fmt.c_hex(self.l1[geo.l1_index(offset)] & fmt.L1E_OFFSET_MASK)}, "
                    f"L2 index: {fmt.c_hex(index)})")
        elif kind == l2.INVALID:
            if geo.extended:
                raise self.corruption(
                    f"Invalid cluster entry found (L2 offset: "
                    f"{fmt.c_hex(self.l1[geo.l1_index(offset)] & fmt.L1E_OFFSET_MASK)}, "
                    f"L2 index: {fmt.c_hex(index)})")
            raise self.corruption(
                f"Zero cluster entry found in pre-v3 image (L2 offset: "
                f"{fmt.c_hex(self.l1[geo.l1_index(offset)] & fmt.L1E_OFFSET_MASK)}, "
                f"L2 index: {fmt.c_hex(index)})")
        return kind, host, nbytes, entry

    async def _map(self, offset: int, length: int) -> tuple[int, int, int, int]:
        return self._map_in(await self._table_for(offset), offset, length)

    # ---- reads -----------------------------------------------------------------------

    def child_changed(self, child: Child) -> None:
        self._bind_fast()
        super().child_changed(child)

    def _bind_fast(self) -> None:
        """The nodes whose inline paths stand for the data file and the backing file,
        and the image's numbers the inline paths use."""
        self._fast_data = _fast_target(self.data_child)
        self._fast_backing = _fast_target(self.cow_child(), writing=False)
        geo, cache, rt = self.geo, self.l2_cache, self.opts_rt
        if geo is None or cache is None or rt is None:
            return
        self._l1_shift = geo.cluster_bits + geo.l2_bits
        self._l2_mask = geo.l2_size - 1
        self._words = geo.words
        self._cluster_mask = geo.cluster_size - 1
        self._sc_bits = geo.subcluster_bits
        self._l2_entries = cache.entries
        self._check_data_clusters = bool(rt.overlap_check) and self.data_child is self.file

    def _fast_entry(self, offset: int, length: int) -> tuple[int, int]:
        """(L2 entry, subcluster bitmap) for a request within one cluster whose L2
        table is cached, without locks or I/O; (-1, 0) otherwise.  No L2 table: (0, 0).
        The inline paths' lookup: a few integer operations and two dict lookups."""
        bits = self.header.cluster_bits
        if ((offset + length - 1) ^ offset) >> bits or self.ejected:
            return -1, 0
        l1_index = offset >> self._l1_shift
        l1 = self.l1
        if l1_index >= len(l1):
            return -1, 0
        l2_offset = l1[l1_index] & fmt.L1E_OFFSET_MASK
        if not l2_offset:
            return 0, 0
        cached = self._l2_entries.get(l2_offset)
        if cached is None:
            return -1, 0
        index = ((offset >> bits) & self._l2_mask) * self._words
        table = cached.table
        if self._words == 1:
            return table[index], 0
        return table[index], table[index + 1]

    def _sc_mask(self, offset: int, length: int) -> int:
        """The allocation bits of the subclusters [offset, offset + length) touches."""
        sc_bits = self._sc_bits
        first = (offset >> sc_bits) & 31
        last = ((offset + length - 1) >> sc_bits) & 31
        return ((2 << last) - 1) & ~((1 << first) - 1)

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        entry, bitmap = self._fast_entry(offset, length)
        if entry < 0 or entry & fmt.OFLAG_COMPRESSED:
            return None
        host = entry & fmt.L2E_OFFSET_MASK
        if self._words == 1:
            if entry & fmt.OFLAG_ZERO:
                return None if self.header.version < 3 else bytes(length)
            if host or entry & fmt.OFLAG_COPIED:
                target = self._fast_data
                if target is None or host & self._cluster_mask:
                    return None
                return target.read_nowait(host + (offset & self._cluster_mask), length)
        else:
            mask = self._sc_mask(offset, length)
            if bitmap & mask == mask and host:
                target = self._fast_data
                if target is None or host & self._cluster_mask:
                    return None
                return target.read_nowait(host + (offset & self._cluster_mask), length)
            if (bitmap >> 32) & mask == mask:
                return bytes(length)
            if bitmap & (mask | (mask << 32)):
                return None     # mixed subclusters: the long way
        cow = self.cow_child()
        if cow is None:
            return bytes(length)
        target = self._fast_backing
        if target is None or offset + length > cow.node.length():
            return None
        return target.read_nowait(offset, length)

    async def do_read(self, offset: int, length: int) -> bytes:
        self._check_usable()
        parts: list[bytes] = []
        done = 0
        while done < length:
            kind, host, nbytes, entry = await self._map(offset + done, length - done)
            parts.append(await self._read_run(kind, host, entry, offset + done, nbytes))
            done += nbytes
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _read_run(self, kind: int, host: int, entry: int, offset: int,
                        nbytes: int) -> bytes:
        if kind == l2.NORMAL:
            data = self.data_child
            assert data is not None
            return await io.read(data, host, nbytes)
        if kind in (l2.ZERO_PLAIN, l2.ZERO_ALLOC):
            return bytes(nbytes)
        if kind == l2.COMPRESSED:
            cluster = await self._decompress(entry)
            start = offset & (self.header.cluster_size - 1)
            return cluster[start:start + nbytes]
        return await self._backing_read(offset, nbytes)

    async def _backing_read(self, offset: int, nbytes: int) -> bytes:
        cow = self.cow_child()
        if cow is None:
            return bytes(nbytes)
        return await io.read(cow, offset, nbytes)

    async def _decompress(self, entry: int) -> bytes:
        geo = self.geo
        assert geo is not None
        coffset, csize = geo.compressed(entry)
        cached_at, data = self.decompressed
        if cached_at == coffset:
            return data
        file = self.file
        assert file is not None
        raw = await io.read(file, coffset, csize)
        data = compress.decompress(self.header.compression_type, raw, geo.cluster_size)
        self.decompressed = (coffset, data)
        return data

    # ---- writes ----------------------------------------------------------------------

    def write_nowait(self, offset: int, data: Data, fua: bool = False) -> bool:
        """Overwrites allocated data clusters in place, without metadata changes."""
        length = len(data)
        entry, bitmap = self._fast_entry(offset, length)
        # Allocated, not shared (COPIED), not compressed, not zero.
        if (entry & (fmt.OFLAG_COPIED | fmt.OFLAG_COMPRESSED | fmt.OFLAG_ZERO)
                != fmt.OFLAG_COPIED) or entry < 0:
            return entry == 0 and not fua and self._allocate_nowait(offset, data)
        if self._words == 2:
            mask = self._sc_mask(offset, length)
            if bitmap & mask != mask:
                return False
        host = entry & fmt.L2E_OFFSET_MASK
        target = self._fast_data
        if target is None or host & self._cluster_mask or (
                self._check_data_clusters and self.meta.get(host >> self.header.cluster_bits)):
            return False
        return target.write_nowait(host + (offset & self._cluster_mask), data, fua)

    def _allocate_nowait(self, offset: int, data: Data) -> bool:
        """A write into one unallocated cluster, inline: what the cluster held before
        (the backing file's data, or zeroes) around the data in one write to a free
        cluster, then its refcount and its L2 entry in the caches, ordered as the long
        way orders them (the L2 table reaches the file after the refcount block and a
        flush).  False, with nothing changed, whenever a step would wait: metadata not
        cached, a cache flush due first, the lock or the cluster taken by another
        request, a backing read that would block."""
        caches, rc, rt, cache = self.caches, self.refcounts, self.opts_rt, self.l2_cache
        fast = self._fast_data
        if (self._words != 1 or fast is None or self.data_child is not self.file
                or caches is None or rc is None or rt is None or cache is None):
            return False
        if not self.lock.try_acquire():
            return False
        try:
            bits = self.header.cluster_bits
            cluster = offset >> bits
            l1, l1_index = self.l1, offset >> self._l1_shift
            if l1_index >= len(l1):
                return False
            l1_entry = l1[l1_index]
            l2_offset = l1_entry & fmt.L1E_OFFSET_MASK
            cached = cache.entries.get(l2_offset)
            if (cached is None or not l1_entry & fmt.OFLAG_COPIED or self.ejected
                    or cluster in self.inflight):
                return False
            index = cluster & self._l2_mask
            table = cached.table
            if table[index]:
                return False     # mapped meanwhile (a request of another thread)
            if rt.lazy_refcounts:
                if not self.header.incompatible_features & fmt.INCOMPAT_DIRTY:
                    return False
            elif caches.refblocks.depends is not None or caches.l2.depends not in (
                    None, caches.refblocks):
                return False
            free = rc.free_cached()
            if free < 0 or (self._check_data_clusters and self.meta.get(free)):
                return False
            cs = 1 << bits
            guest = cluster << bits
            start = offset & self._cluster_mask
            end = start + len(data)
            cow = self.cow_child()
            if (start or end < cs) and cow is not None:
                backing = self._fast_backing
                if backing is None or guest + cs > cow.node.length():
                    return False
                # QEMU's merged copy-on-write read: the whole cluster at once.
                old = backing.read_nowait(guest, cs)
                if old is None:
                    return False
                buf = bytearray(old)
            else:
                buf = bytearray(cs)
            buf[start:end] = data
            host = free << bits
            if not fast.write_nowait(host, buf):
                return False     # the cluster is still free: nothing refers to it
            rc.claim(free)
            table[index] = host | fmt.OFLAG_COPIED
            cache.lookup(l2_offset)
            cached.dirty = True
            if not rt.lazy_refcounts:
                caches.l2.depends = caches.refblocks
            if start or end < cs:
                caches.l2.depends_on_flush = True
            return True
        finally:
            self.lock.release()

    async def do_write(self, offset: int, data: Data, fua: bool) -> None:
        self._check_usable()
        view = memoryview(data)
        done = 0
        length = len(data)
        while done < length:
            done += await self._write_some(offset + done, view[done:], fua)

    async def _write_some(self, offset: int, data: memoryview, fua: bool) -> int:
        """Writes a prefix of ``data`` (within one L2 table); returns its length."""
        geo = self.geo
        assert geo is not None
        table = self._peek_l2(offset)
        if table:
            kind, host, nbytes, entry = self._map_in(cast("array[int]", table), offset,
                                                     len(data))
            if kind == l2.NORMAL and entry & fmt.OFLAG_COPIED:
                self.check_data_overlap(host, nbytes)
                await self._write_data(host, [data[:nbytes]], fua)
                return nbytes
        async with self.lock:
            pieces = await self._plan(offset, data)
        try:
            try:
                await self._write_pieces(pieces, offset, data, fua)
            except OSError:
                async with self.lock:
                    await self._unallocate(pieces)
                raise
            async with self.lock:
                await self._link(pieces)
        finally:
            for piece in pieces:
                flight = self.inflight.pop(piece.cluster, None)
                if flight is not None:
                    flight.done()
        return pieces[-1].guest + pieces[-1].end - offset

    async def _plan(self, offset: int, data: memoryview) -> list[_Piece]:
        """Works out, under the lock, where each cluster of the write goes."""
        geo = self.geo
        assert geo is not None
        cs = geo.cluster_size
        end = offset + len(data)
        pieces: list[_Piece] = []
        pos = offset
        l1_index = geo.l1_index(offset)
        while pos < end and geo.l1_index(pos) == l1_index and len(pieces) < 256:
            cluster = pos >> geo.cluster_bits
            flight = self.inflight.get(cluster)
            if flight is not None:
                if pieces:
                    break
                fut = flight.wait()
                self.lock.release()
                try:
                    await fut
                finally:
                    await self.lock.acquire()
                continue
            table = await self._writable_l2(l1_index)
            piece = await self._plan_cluster(table, cluster, pos - (cluster << geo.cluster_bits),
                                             min(cs, end - (cluster << geo.cluster_bits)))
            if piece.new_entry is not None:
                self.inflight[cluster] = _InFlight()
            pieces.append(piece)
            pos = (cluster + 1) << geo.cluster_bits
        return pieces

    async def _plan_cluster(self, table: array[int], cluster: int, start: int,
                            end: int) -> _Piece:
        geo = self.geo
        rc = self.refcounts
        assert geo is not None and rc is not None
        scs = geo.subcluster_size
        index = cluster & (geo.l2_size - 1)
        entry = table[index * geo.words]
        bitmap = table[index * geo.words + 1] if geo.extended else 0
        old_host = entry & fmt.L2E_OFFSET_MASK
        compressed = bool(entry & fmt.OFLAG_COMPRESSED)
        external = self.data_child is not self.file
        piece = _Piece()
        piece.cluster = cluster
        piece.guest = cluster << geo.cluster_bits
        piece.start, piece.end = start, end
        sa, sb = start // scs, -(-end // scs)
        types = [geo.subcluster_type(entry, bitmap, s) for s in range(geo.subclusters)]
        if any(types[s] == l2.INVALID for s in range(sa, sb)):
            self._map_in(table, piece.guest + sa * scs, scs)   # raises the corruption
        inplace = bool(old_host) and not compressed and (
            bool(entry & fmt.OFLAG_COPIED) or external)
        if inplace:
            piece.host = old_host
        elif external:
            piece.host = piece.guest
            piece.new_cluster = False
        else:
            piece.host = await rc.allocate(1)
            piece.new_cluster = True
        fills: list[tuple[int, int, int]] = []
        copy_old = not inplace and (compressed or bool(old_host)) and not external
        if copy_old:
            for s in range(geo.subclusters):
                lo, hi = s * scs, (s + 1) * scs
                if types[s] in (l2.NORMAL, l2.COMPRESSED) and not (start <= lo and hi <= end):
                    if lo < start:
                        fills.append((lo, min(hi, start), types[s]))
                    if hi > end:
                        fills.append((max(lo, end), hi, types[s]))
        for s, lo, hi in ((sa, sa * scs, start), (sb - 1, end, sb * scs)):
            if lo >= hi:
                continue
            kind = types[s]
            if inplace and kind == l2.NORMAL:
                continue
            if copy_old and kind in (l2.NORMAL, l2.COMPRESSED):
                continue    # already copied above
            fills.append((lo, hi, kind))
        piece.fills = [(lo, hi, kind, entry) for lo, hi, kind in fills]
        piece.lo = min([start] + [f[0] for f in fills])
        piece.hi = max([end] + [f[1] for f in fills])
        new_entry = piece.host | fmt.OFLAG_COPIED
        if geo.extended:
            mask = ((1 << sb) - 1) & ~((1 << sa) - 1)
            if compressed:
                new_bitmap = fmt.BITMAP_ALL_ALLOC
            else:
                new_bitmap = (bitmap | mask) & ~(mask << 32)
            if new_entry != entry or new_bitmap != bitmap:
                piece.new_entry, piece.new_bitmap = new_entry, new_bitmap
        elif new_entry != entry:
            piece.new_entry = new_entry
        if not inplace and not external and (old_host or compressed):
            piece.free_entry = entry
        # QEMU checks the guest data first, then the copy-on-write regions.
        self.check_data_overlap(piece.host + start, end - start)
        self.check_data_overlap(piece.host + piece.lo, piece.hi - piece.lo)
        return piece

    async def _write_pieces(self, pieces: list[_Piece], offset: int, data: memoryview,
                            fua: bool) -> None:
        """Writes each piece's data with its copy-on-write fills, host-contiguous
        pieces in one request (QEMU's merged COW write: head, data and tail at once)."""
        run: list[Data] = []
        run_start = -1
        run_end = -1
        for piece in pieces:
            buf = bytearray(piece.hi - piece.lo)
            for lo, hi, kind, entry in piece.fills:
                fill = self._fill_nowait(piece, lo, hi, kind, entry)
                if fill is None:
                    fill = await self._fill(piece, lo, hi, kind, entry)
                if fill:
                    buf[lo - piece.lo:hi - piece.lo] = fill
            dstart = piece.guest + piece.start - offset
            buf[piece.start - piece.lo:piece.end - piece.lo] = data[dstart:dstart
                                                                    + piece.end - piece.start]
            host = piece.host + piece.lo
            if run and host == run_end:
                run.append(buf)
                run_end += len(buf)
                continue
            if run:
                await self._write_data(run_start, run, fua)
            run, run_start, run_end = [buf], host, host + len(buf)
        if run:
            await self._write_data(run_start, run, fua)

    async def _write_data(self, host: int, run: list[Data], fua: bool) -> None:
        """Writes guest data (with its fills) to the data file: inline when the page
        cache takes it, the long way otherwise."""
        data = run[0] if len(run) == 1 else b"".join(run)
        fast = self._fast_data
        if fast is not None and fast.write_nowait(host, data, fua):
            return
        target = self.data_child
        assert target is not None
        await io.write(target, host, data, fua)

    def _fill_nowait(self, piece: _Piece, lo: int, hi: int, kind: int,
                     entry: int) -> bytes | None:
        """What ``_fill`` answers, when it can be had without waiting; b"" for zeroes
        (the buffer starts zeroed); None otherwise."""
        if kind in (l2.ZERO_PLAIN, l2.ZERO_ALLOC):
            return b""
        if kind == l2.NORMAL:
            target = self._fast_data
            if target is None:
                return None
            return target.read_nowait((entry & fmt.L2E_OFFSET_MASK) + lo, hi - lo)
        if kind == l2.COMPRESSED:
            return None
        cow = self.cow_child()
        if cow is None:
            return b""
        target = self._fast_backing
        if target is None or piece.guest + hi > cow.node.length():
            return None
        return target.read_nowait(piece.guest + lo, hi - lo)

    async def _fill(self, piece: _Piece, lo: int, hi: int, kind: int, entry: int) -> bytes:
        """What the bytes [lo, hi) of a cluster held before the write (copy-on-write)."""
        if kind == l2.NORMAL:
            data = self.data_child
            assert data is not None
            return await io.read(data, (entry & fmt.L2E_OFFSET_MASK) + lo, hi - lo)
        if kind == l2.COMPRESSED:
            return (await self._decompress(entry))[lo:hi]
        if kind in (l2.ZERO_PLAIN, l2.ZERO_ALLOC):
            return bytes(hi - lo)
        return await self._backing_read(piece.guest + lo, hi - lo)

    async def _unallocate(self, pieces: list[_Piece]) -> None:
        """Gives back the clusters of a write that failed before it was linked (QEMU's
        qcow2_alloc_cluster_abort)."""
        rc, geo = self.refcounts, self.geo
        assert rc is not None and geo is not None
        for piece in pieces:
            if piece.new_cluster:
                await rc.free(piece.host, geo.cluster_size, DISCARD_NEVER)

    async def _link(self, pieces: list[_Piece]) -> None:
        """Points the L2 entries at the written clusters, then frees what they replace."""
        geo, caches, rc = self.geo, self.caches, self.refcounts
        assert geo is not None and caches is not None and rc is not None
        changed = [p for p in pieces if p.new_entry is not None]
        if not changed:
            return
        if any(p.new_cluster for p in changed):
            await self._before_new_references()
        if any(p.fills for p in changed):
            # What was copied on write reaches the disk before an L2 table that points
            # at it, lazy refcounts or not (QEMU's perform_cow).
            caches.l2.depends_on_flush = True
        for piece in changed:
            table = await self._writable_l2(geo.l1_index(piece.guest))
            index = piece.cluster & (geo.l2_size - 1)
            assert piece.new_entry is not None
            table[index * geo.words] = piece.new_entry
            if geo.extended:
                table[index * geo.words + 1] = piece.new_bitmap
            self._l2_dirty(piece.guest)
        for piece in changed:
            if piece.free_entry:
                await self._free_entry(piece.free_entry, DISCARD_OTHER)

    async def _before_new_references(self) -> None:
        """New L2 references wait for their refcounts, unless lazy refcounts postpone
        those (then the image is marked dirty first)."""
        rt, caches = self.opts_rt, self.caches
        assert rt is not None and caches is not None
        if rt.lazy_refcounts:
            await self.mark_dirty()
        else:
            await caches.set_dependency(caches.l2, caches.refblocks)

    def _l2_dirty(self, guest: int) -> None:
        geo, cache = self.geo, self.l2_cache
        assert geo is not None and cache is not None
        offset = self.l1[geo.l1_index(guest)] & fmt.L1E_OFFSET_MASK
        entry = cache.lookup(offset)
        assert entry is not None
        entry.dirty = True

    async def _free_entry(self, entry: int, kind: int) -> None:
        """Drops the reference an (old) L2 entry held (QEMU's qcow2_free_any_cluster)."""
        rc, geo = self.refcounts, self.geo
        assert rc is not None and geo is not None
        if self.data_child is not self.file:
            if kind == DISCARD_REQUEST and entry & fmt.L2E_OFFSET_MASK:
                await self.discard_freed_data(entry & fmt.L2E_OFFSET_MASK)
            return
        if entry & fmt.OFLAG_COMPRESSED:
            coffset, csize = geo.compressed(entry)
            start = coffset & ~511
            await rc.free(start, coffset + csize - start, kind)
            if self.decompressed[0] == coffset:
                self.decompressed = (-1, b"")
        elif entry & fmt.L2E_OFFSET_MASK:
            await rc.free(entry & fmt.L2E_OFFSET_MASK, geo.cluster_size, kind)

    async def discard_freed_data(self, host: int) -> None:
        """An external data file's cluster is no longer used: discard it if asked to,
        before the request returns (the guest may write the cluster again at once)."""
        rt, data, geo = self.opts_rt, self.data_child, self.geo
        assert rt is not None and data is not None and geo is not None
        if rt.discard_passthrough[DISCARD_REQUEST]:
            await self._discard_file(data, host, geo.cluster_size)

    # ---- zero writes and discards --------------------------------------------------------

    async def do_write_zeroes(self, offset: int, length: int, may_unmap: bool,
                              no_fallback: bool, fua: bool) -> None:
        self._check_usable()
        geo = self.geo
        assert geo is not None
        if self.header.version < 3:
            raise _err(errno.ENOTSUP)
        end = offset + length
        if (offset | length) & (geo.subcluster_size - 1) and end != self.header.size:
            raise _err(errno.ENOTSUP)
        if self.header.autoclear_features & fmt.AUTOCLEAR_DATA_FILE_RAW:
            raise _err(errno.ENOTSUP)
        await self._change_clusters(offset, length, "zero-unmap" if may_unmap else "zero")

    async def do_discard(self, offset: int, length: int) -> None:
        self._check_usable()
        geo = self.geo
        assert geo is not None
        if (offset | length) & (geo.cluster_size - 1):
            if offset & (geo.cluster_size - 1) or offset + length != self.header.size:
                raise _err(errno.ENOTSUP)
        await self._change_clusters(offset, length, "discard")

    async def _change_clusters(self, offset: int, length: int, how: str) -> None:
        """Zero-writes ("zero", "zero-unmap") and discards ("discard", and "full" for
        what a shrink cuts off), one L2 table at a time under the lock."""
        geo = self.geo
        assert geo is not None
        end = offset + length
        pos = offset
        while pos < end:
            async with self.lock:
                pos = await self._change_in_table(pos, end, how)

    async def _change_in_table(self, pos: int, end: int, how: str) -> int:
        geo, rt = self.geo, self.opts_rt
        assert geo is not None and rt is not None
        cs, scs = geo.cluster_size, geo.subcluster_size
        l1_index = geo.l1_index(pos)
        discard = how in ("discard", "full")
        if discard and self._peek_l2(pos) is None and (how == "full" or self.cow_child() is None):
            # Nothing mapped under this L1 entry: nothing to discard.
            return min(end, (l1_index + 1) << (geo.cluster_bits + geo.l2_bits))
        frees: list[tuple[int, int]] = []
        table: array[int] | None = None
        while pos < end and geo.l1_index(pos) == l1_index:
            cluster = pos >> geo.cluster_bits
            flight = self.inflight.get(cluster)
            if flight is not None:
                fut = flight.wait()
                self.lock.release()
                try:
                    await fut
                finally:
                    await self.lock.acquire()
                continue
            if table is None:
                table = await self._writable_l2(l1_index)
            cstart = pos - (cluster << geo.cluster_bits)
            cend = min(cs, end - (cluster << geo.cluster_bits))
            index = cluster & (geo.l2_size - 1)
            entry = table[index * geo.words]
            bitmap = table[index * geo.words + 1] if geo.extended else 0
            new_entry, new_bitmap, free = self._changed_entry(
                entry, bitmap, cstart // scs, -(-cend // scs), how)
            if (new_entry, new_bitmap) != (entry, bitmap):
                table[index * geo.words] = new_entry
                if geo.extended:
                    table[index * geo.words + 1] = new_bitmap
                self._l2_dirty(pos)
                if free:
                    frees.append((entry, DISCARD_REQUEST if how != "full" else DISCARD_ALWAYS))
            pos = (cluster + 1) << geo.cluster_bits
        for entry, kind in frees:
            await self._free_entry(entry, kind)
        return min(pos, end)

    def _changed_entry(self, entry: int, bitmap: int, sa: int, sb: int,
                       how: str) -> tuple[int, int, bool]:
        """(new entry, new bitmap, whether the old cluster is freed) for a zero-write or
        discard of subclusters [sa, sb) (QEMU's zero_in_l2_slice, discard_in_l2_slice,
        zero_l2_subclusters)."""
        geo, rt = self.geo, self.opts_rt
        assert geo is not None and rt is not None
        host = entry & fmt.L2E_OFFSET_MASK
        compressed = bool(entry & fmt.OFLAG_COMPRESSED)
        whole = sa == 0 and sb == geo.subclusters
        kind = geo.subcluster_type(entry, bitmap, 0) if not geo.extended else -1
        if how == "full":
            return 0, 0, bool(host or compressed)
        keep = how == "zero" or (how == "discard" and rt.discard_no_unref)
        if how == "discard" and not keep:
            if kind == l2.UNALLOCATED_PLAIN and self.cow_child() is None:
                return entry, bitmap, False
            if kind == l2.ZERO_PLAIN:
                return entry, bitmap, False
            if geo.extended:
                if not host and not compressed and not (bitmap & fmt.BITMAP_ALL_ALLOC) and (
                        self.cow_child() is None):
                    return entry, bitmap, False
                if whole:
                    return 0, fmt.BITMAP_ALL_ZEROES if self.header.version >= 3 else 0, bool(
                        host or compressed)
            else:
                zero = fmt.OFLAG_ZERO if self.header.version >= 3 else 0
                return zero, 0, bool(host or compressed)
        if not geo.extended:
            if kind == l2.ZERO_PLAIN or (kind == l2.ZERO_ALLOC and keep):
                return entry, bitmap, False
            if compressed or not keep or not host:
                return fmt.OFLAG_ZERO, 0, bool(host or compressed)
            return entry | fmt.OFLAG_ZERO, 0, False
        mask = ((1 << sb) - 1) & ~((1 << sa) - 1)
        if whole:
            if compressed or not keep:
                return 0, fmt.BITMAP_ALL_ZEROES, bool(host or compressed)
            return entry, fmt.BITMAP_ALL_ZEROES, False
        if compressed:
            raise _err(errno.ENOTSUP)
        return entry, (bitmap & ~mask) | (mask << 32), False

    # ---- flush, close ---------------------------------------------------------------

    async def flush_caches(self) -> None:
        """Writes every dirty table, L2 tables and refcount blocks in their order."""
        caches = self.caches
        if caches is None:
            return
        await caches.write_all(caches.l2)
        await caches.write_all(caches.refblocks)

    async def do_flush(self) -> None:
        if self.ejected or self.caches is None:
            return
        async with self.lock:
            rc = self.refcounts
            assert rc is not None
            await self.flush_caches()
            if rc.has_freed():
                await self.sync()
                rc.flushed()

    async def inactivate(self) -> None:
        self._stop_clean_timer()
        if self.caches is None or self.read_only or self.ejected:
            return
        async with self.lock:
            try:
                await qbitmaps.store(self)
            except (OSError, QMPError) as exc:
                text = exc.desc if isinstance(exc, QMPError) else exc.strerror
                print(f"qsd: Lost persistent bitmaps during inactivation of node "
                      f"'{self.node_name}': {text}", file=sys.stderr, flush=True)
            for bitmap in self.dirty_bitmaps:
                if bitmap.stored:
                    bitmap.readonly = True
            try:
                await self.flush_caches()
                await self.mark_clean()
            except OSError as exc:
                print(f"qsd: Failed to flush the qcow2 caches of '{self.node_name}': "
                      f"{exc.strerror}", file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop_clean_timer()

    # ---- cache-clean-interval ---------------------------------------------------------

    def _start_clean_timer(self) -> None:
        rt = self.opts_rt
        if rt is None or not rt.cache_clean_interval:
            return
        self.clean_timer = self.ctx.loop.call_later(rt.cache_clean_interval, self._clean)

    def _stop_clean_timer(self) -> None:
        if self.clean_timer is not None:
            self.clean_timer.cancel()
            self.clean_timer = None

    def _clean(self) -> None:
        rt, caches = self.opts_rt, self.caches
        assert rt is not None and caches is not None
        older = time.monotonic() - rt.cache_clean_interval
        # Taken, not only tested: a request of another iothread may hold a table it
        # got from the cache (the inline allocation too) until it lets the lock go.
        if self.lock.try_acquire():
            try:
                caches.l2.clean_unused(older)
                caches.refblocks.clean_unused(older)
            finally:
                self.lock.release()
        self.clean_timer = self.ctx.loop.call_later(rt.cache_clean_interval, self._clean)

    def drained_begin(self) -> None:
        self._stop_clean_timer()

    def drained_end(self) -> None:
        if self.clean_timer is None and not self.closed:
            self.ctx.loop.call_soon_threadsafe(self._start_clean_timer)

    # ---- truncate --------------------------------------------------------------------

    async def do_truncate(self, length: int, exact: bool, prealloc: str) -> None:
        self._check_usable()
        if prealloc not in ("off", "metadata", "falloc", "full"):
            raise OSError(errno.ENOTSUP, f"Unsupported preallocation mode '{prealloc}'")
        if length % 512:
            raise OSError(errno.EINVAL, "The new size must be a multiple of 512")
        hdr = self.header
        if self.snapshots and hdr.version < 3:
            raise OSError(errno.ENOTSUP, "Can't resize a v2 image which has internal "
                          "snapshots")
        if self.bitmaps:
            raise OSError(errno.ENOTSUP, "Can't resize an image which has bitmaps")
        geo = self.geo
        assert geo is not None
        old = hdr.size
        new_l1 = fmt.l1_entries_for(length, geo.cluster_bits, geo.extended)
        if length < old:
            if prealloc != "off":
                raise OSError(errno.ENOTSUP, "Preallocation can't be used for shrinking an "
                              "image")
            cut = -(-length // geo.cluster_size) * geo.cluster_size
            if cut < old:
                try:
                    await self._change_clusters(cut, old - cut, "full")
                except OSError as exc:
                    raise OSError(exc.errno, "Failed to discard cropped clusters: "
                                  f"{os.strerror(exc.errno or 0)}") from None
            async with self.lock:
                await self._shrink_l1(new_l1)
        else:
            async with self.lock:
                try:
                    await self._grow_l1(new_l1)
                except OSError as exc:
                    raise OSError(exc.errno, "Failed to grow the L1 table: "
                                  f"{os.strerror(exc.errno or 0)}") from None
            if prealloc != "off" and length > old:
                await self._preallocate(old, length, prealloc)
        async with self.lock:
            await self.meta_write(24, length.to_bytes(8, "big"), OL_MAIN_HEADER)
            await self.sync()
            hdr.size = length
        if length < old:
            await self._cut_file_tail()

    async def _grow_l1(self, size: int) -> None:
        """QEMU's qcow2_grow_l1_table(): a new, bigger copy, synced, then the header."""
        if size <= len(self.l1):
            return
        if size > fmt.MAX_L1_SIZE // 8:
            raise _err(errno.EFBIG)
        new_size = size
        rc, hdr = self.refcounts, self.header
        assert rc is not None
        cs = hdr.cluster_size
        await self.flush_caches()
        raw_len = new_size * 8
        new_offset = await rc.allocate_bytes(raw_len)
        self.check_overlap(new_offset, raw_len, 0)
        await self.caches_flush_refcounts()
        table = self.l1 + [0] * (new_size - len(self.l1))
        raw = struct.pack(f">{new_size}Q", *table)
        await self.meta_write(new_offset, raw + bytes(-len(raw) % cs), 0)
        await self.sync()
        await self.meta_write(36, new_size.to_bytes(4, "big") + new_offset.to_bytes(8, "big"),
                              OL_MAIN_HEADER)
        await self.sync()
        old_offset, old_size = hdr.l1_table_offset, hdr.l1_size
        self.l1 = table
        hdr.l1_table_offset, hdr.l1_size = new_offset, new_size
        self.set_meta(old_offset, -(-old_size * 8 // cs), 0)
        self.set_meta(new_offset, -(-raw_len // cs), OL_ACTIVE_L1)
        if old_size:
            await rc.free(old_offset, old_size * 8, DISCARD_OTHER)

    async def caches_flush_refcounts(self) -> None:
        caches = self.caches
        assert caches is not None
        await caches.flush(caches.refblocks)

    async def _shrink_l1(self, size: int) -> None:
        """QEMU's qcow2_shrink_l1_table(): entries past ``size`` go (the L2 tables they
        point at are already empty), the table keeps its size."""
        cache, rc = self.l2_cache, self.refcounts
        assert cache is not None and rc is not None
        frees = []
        for index in range(size, len(self.l1)):
            offset = self.l1[index] & fmt.L1E_OFFSET_MASK
            if offset:
                frees.append(offset)
                await self._write_l1_entry(index, 0)
        for offset in frees:
            entry = cache.lookup(offset)
            if entry is not None:
                entry.dirty = False
                cache.drop(offset)
            await rc.free(offset, self.header.cluster_size, DISCARD_ALWAYS)

    async def _cut_file_tail(self) -> None:
        """After a shrink: the file ends after its last used cluster."""
        rc, file = self.refcounts, self.file
        assert rc is not None and file is not None
        async with self.lock:
            await self.flush_caches()
            await self.sync()
            rc.flushed()
            last = await rc.last_used()
            end = (last + 1) << self.header.cluster_bits
            if end < file.node.length():
                try:
                    await io.truncate(file, end)
                except OSError:
                    pass

    async def _preallocate(self, start: int, end: int, mode: str) -> None:
        """Allocates and maps every cluster of [start, end) (QEMU's preallocate_co and
        the falloc/full modes of qcow2_co_truncate)."""
        geo = self.geo
        assert geo is not None
        pos = start
        while pos < end:
            async with self.lock:
                cluster = pos >> geo.cluster_bits
                table = await self._writable_l2(geo.l1_index(pos))
                index = cluster & (geo.l2_size - 1)
                entry = table[index * geo.words]
                if not entry & fmt.L2E_OFFSET_MASK:
                    piece = await self._plan_cluster(table, cluster, 0, 0)
                    piece.fills = []
                    if geo.extended:
                        piece.new_bitmap = 0
                    await self._link([piece])
            pos = (cluster + 1) << geo.cluster_bits
        target = self.data_child
        assert target is not None
        async with self.lock:
            await self.flush_caches()
            rc = self.refcounts
            assert rc is not None
            end_host = (await rc.last_used() + 1) << geo.cluster_bits
            if target is not self.file:
                end_host = -(-end // geo.cluster_size) * geo.cluster_size
            if end_host > target.node.length():
                await io.truncate(target, end_host, False,
                                  "off" if mode == "metadata" else mode)

    # ---- block status ------------------------------------------------------------------

    async def do_block_status(self, want_zero: bool, offset: int, length: int) -> BlockStatus:
        self._check_usable()
        if self.metadata_preallocation is None:
            async with self.lock:
                self.metadata_preallocation = await self._detect_metadata_preallocation()
        kind, host, nbytes, _ = await self._map(offset, length)
        flags = 0
        file: BlockNode | None = None
        if kind in (l2.NORMAL, l2.ZERO_ALLOC, l2.UNALLOCATED_ALLOC):
            flags |= BLOCK_OFFSET_VALID
            data = self.data_child
            assert data is not None
            file = data.node
        if kind in (l2.ZERO_PLAIN, l2.ZERO_ALLOC):
            flags |= BLOCK_ZERO
        elif kind not in (l2.UNALLOCATED_PLAIN, l2.UNALLOCATED_ALLOC):
            flags |= BLOCK_DATA
        if self.metadata_preallocation and flags & BLOCK_DATA and flags & BLOCK_OFFSET_VALID:
            flags |= BLOCK_RECURSE
        return BlockStatus(flags, nbytes, host, file)

    async def _detect_metadata_preallocation(self) -> bool:
        """QEMU's qcow2_detect_metadata_preallocation(): far more clusters in use than
        the file has allocated means preallocated metadata."""
        rc, file = self.refcounts, self.file
        assert rc is not None and file is not None
        cs = self.header.cluster_size
        real = file.node.allocated_size() // cs
        if real < 0:
            return False         # the file cannot tell
        threshold = max(real * 10 // 9, real + 2)
        total = -(-file.node.length() // cs)
        used = 0
        for cluster in range(total):
            if await rc.get(cluster):
                used += 1
                if used >= threshold:
                    return True
        return False


def _fast_target(child: Child | None, writing: bool = True) -> BlockNode | None:
    """The node whose ``*_nowait`` answer for ``child`` (through pass-through filters),
    or None when it needs aligned requests, or (``writing``) when a node on the way
    must see each write (hooks, dirty bitmaps)."""
    if child is None:
        return None
    node = child.node
    inline = node.writes_inline()
    following = node.nowait_next()
    while following is not None:
        node = following
        inline = inline and node.writes_inline()
        following = node.nowait_next()
    if node.bl.request_alignment > 1 or (writing and not inline):
        return None
    return node
