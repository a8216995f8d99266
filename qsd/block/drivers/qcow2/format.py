"""The qcow2 on-disk format: header, header extensions, tables and their entries.

Pure layout code without I/O, shared by the driver and by image creation
(``blockdev-create``).  Everything here follows QEMU's docs/interop/qcow2.txt; where
QEMU's writer makes a choice the format leaves open (the order of header extensions,
the feature name table, where a new image puts its first tables) this module makes the
same one, so that images compare byte for byte with QEMU's.

The API other modules rely on:

- ``Header.unpack(buf)`` / ``Header.pack()``: the fixed header fields;
- ``parse_extensions(buf, start, end)`` and ``build_header_cluster(...)``: the header
  cluster with its extensions and backing file name, as QEMU's qcow2_update_header()
  writes it;
- ``new_image(...)``: the bytes of an empty image (header, refcount table, one refcount
  block), which the driver then grows to its size with a truncate, as QEMU's create does;
- entry masks and flags (``L1E_OFFSET_MASK``, ``OFLAG_*``), ``get_refcount`` /
  ``set_refcount`` for every refcount width, ``refcount_metadata_size`` and
  ``prealloc_size`` (what ``qemu-img measure`` computes).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import struct

MAGIC = 0x514649FB                 # "QFI\xfb"
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
DEFAULT_CLUSTER_SIZE = 65536
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104
V3_HEADER_LENGTH = 112             # 104 + compression_type + padding
MAX_BACKING_FILE_NAME = 1023

# Implementation limits QEMU enforces when opening (qcow2.h).
MAX_L1_SIZE = 0x2000000            # bytes
MAX_REFTABLE_SIZE = 0x800000       # bytes
MAX_SNAPSHOTS = 65536
SNAPSHOT_HEADER_SIZE = 40
MAX_BITMAPS = 65535
MAX_BITMAP_DIRECTORY_SIZE = 1024 * MAX_BITMAPS

# Header extension magics.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_CRYPTO_HEADER = 0x0537BE77
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441

# Feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_MASK = 0x1F
COMPAT_LAZY_REFCOUNTS = 1 << 0
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1
AUTOCLEAR_MASK = 0x3

FEAT_INCOMPATIBLE, FEAT_COMPATIBLE, FEAT_AUTOCLEAR = 0, 1, 2
# QEMU's feature name table, in its order (written for v3 with clusters > 4 KiB).
FEATURE_NAMES = (
    (FEAT_INCOMPATIBLE, 0, "dirty bit"),
    (FEAT_INCOMPATIBLE, 1, "corrupt bit"),
    (FEAT_INCOMPATIBLE, 2, "external data file"),
    (FEAT_INCOMPATIBLE, 3, "compression type"),
    (FEAT_INCOMPATIBLE, 4, "extended L2 entries"),
    (FEAT_COMPATIBLE, 0, "lazy refcounts"),
    (FEAT_AUTOCLEAR, 0, "bitmaps"),
    (FEAT_AUTOCLEAR, 1, "raw external data"),
)
FEATURE_ENTRY = struct.Struct(">BB46s")

CRYPT_NONE, CRYPT_AES, CRYPT_LUKS = 0, 1, 2
COMPRESSION_ZLIB, COMPRESSION_ZSTD = 0, 1
COMPRESSION_TYPES = {"zlib": COMPRESSION_ZLIB, "zstd": COMPRESSION_ZSTD}

# Table entries.
L1E_SIZE = 8
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1 << 0
L2E_SIZE_NORMAL = 8
L2E_SIZE_EXTENDED = 16
SUBCLUSTERS = 32                   # per cluster with extended L2 entries
BITMAP_ALL_ALLOC = (1 << 32) - 1
BITMAP_ALL_ZEROES = BITMAP_ALL_ALLOC << 32
REFTABLE_ENTRY_SIZE = 8



def c_hex(value: int) -> str:
    """``value`` as C's ``%#x`` prints it in QEMU's messages: zero without ``0x``."""
    return f"{value:#x}" if value else "0"


_HEADER_V2 = struct.Struct(">IIQIIQIIQQIIQ")
_HEADER_V3 = struct.Struct(">QQQII")
_EXT_HEAD = struct.Struct(">II")
BITMAPS_EXT = struct.Struct(">IIQQ")


class FormatError(ValueError):
    """An image whose layout cannot be what qcow2 allows (QEMU's text in args[0])."""


@dataclasses.dataclass
class Header:
    """The fixed-size fields of the qcow2 header (all versions)."""

    version: int = 3
    backing_file_offset: int = 0
    backing_file_size: int = 0
    cluster_bits: int = 16
    size: int = 0
    crypt_method: int = 0
    l1_size: int = 0
    l1_table_offset: int = 0
    refcount_table_offset: int = 0
    refcount_table_clusters: int = 0
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_HEADER_LENGTH
    compression_type: int = 0
    # Header fields after the ones this module knows, kept when the header is rewritten.
    unknown_fields: bytes = b""
    magic: int = MAGIC

    @classmethod
    def unpack(cls, buf: bytes) -> Header:
        """The header in ``buf`` (at least the first V3_HEADER_LENGTH bytes of the
        image); v2 images get the v3 fields' implied values.  No validation beyond
        what is needed to read the fields (see the driver for QEMU's checks)."""
        if len(buf) < V3_HEADER_LENGTH:
            buf = bytes(buf) + bytes(V3_HEADER_LENGTH - len(buf))
        (magic, version, backing_file_offset, backing_file_size, cluster_bits, size,
         crypt_method, l1_size, l1_table_offset, refcount_table_offset,
         refcount_table_clusters, nb_snapshots, snapshots_offset) = _HEADER_V2.unpack_from(buf)
        hdr = cls(version, backing_file_offset, backing_file_size, cluster_bits, size,
                  crypt_method, l1_size, l1_table_offset, refcount_table_offset,
                  refcount_table_clusters, nb_snapshots, snapshots_offset)
        hdr.magic = magic
        if version == 2:
            hdr.incompatible_features = hdr.compatible_features = 0
            hdr.autoclear_features = 0
            hdr.refcount_order = 4
            hdr.header_length = V2_HEADER_LENGTH
        else:
            (hdr.incompatible_features, hdr.compatible_features, hdr.autoclear_features,
             hdr.refcount_order, hdr.header_length) = _HEADER_V3.unpack_from(buf, 72)
            hdr.compression_type = buf[104] if hdr.header_length > 104 else 0
        return hdr

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    def pack(self) -> bytes:
        """The header fields as QEMU writes them: 72 bytes for v2; for v3 the 112-byte
        structure (with ``header_length`` counting any unknown fields that follow)."""
        v2 = _HEADER_V2.pack(MAGIC, self.version, self.backing_file_offset,
                             self.backing_file_size, self.cluster_bits, self.size,
                             self.crypt_method, self.l1_size, self.l1_table_offset,
                             self.refcount_table_offset, self.refcount_table_clusters,
                             self.nb_snapshots, self.snapshots_offset)
        if self.version == 2:
            return v2
        v3 = _HEADER_V3.pack(self.incompatible_features, self.compatible_features,
                             self.autoclear_features, self.refcount_order,
                             V3_HEADER_LENGTH + len(self.unknown_fields))
        return v2 + v3 + bytes([self.compression_type]) + bytes(7) + self.unknown_fields


def parse_extensions(buf: bytes, start: int, end: int) -> list[tuple[int, bytes]]:
    """The header extensions between ``start`` and ``end`` of the header cluster
    ``buf``, in image order, up to (not including) the end marker."""
    out: list[tuple[int, bytes]] = []
    offset = start
    while offset < end:
        if offset + _EXT_HEAD.size > len(buf):
            raise FormatError("Header extension too large")
        magic, length = _EXT_HEAD.unpack_from(buf, offset)
        offset += _EXT_HEAD.size
        if offset > end or length > end - offset:
            raise FormatError("Header extension too large")
        if magic == EXT_END:
            break
        out.append((magic, bytes(buf[offset:offset + length])))
        offset += (length + 7) & ~7
    return out


def feature_table() -> bytes:
    return b"".join(FEATURE_ENTRY.pack(kind, bit, name.encode())
                    for kind, bit, name in FEATURE_NAMES)


def feature_names(table: bytes, kind: int, mask: int) -> str:
    """QEMU's report_unsupported_feature() text for the bits in ``mask``."""
    names: list[str] = []
    for pos in range(0, len(table) - FEATURE_ENTRY.size + 1, FEATURE_ENTRY.size):
        ftype, bit, raw = FEATURE_ENTRY.unpack_from(table, pos)
        if not raw[:1].strip(b"\0"):
            break
        if ftype == kind and mask & (1 << bit):
            names.append(raw.split(b"\0", 1)[0].decode("utf-8", "replace"))
            mask &= ~(1 << bit)
    if mask:
        names.append(f"Unknown incompatible feature: {mask:x}")
    return ", ".join(names)


def _ext(magic: int, data: bytes) -> bytes:
    return _EXT_HEAD.pack(magic, len(data)) + data + bytes(-len(data) % 8)


def build_header_cluster(header: Header, *, backing_file: str | None = None,
                         backing_format: str | None = None, data_file: str | None = None,
                         bitmaps: bytes | None = None,
                         unknown_extensions: list[tuple[int, bytes]] | None = None,
                         crypto_header: bytes | None = None) -> bytes:
    """The whole first cluster as QEMU's qcow2_update_header() writes it: header,
    extensions (backing format, data file, crypto header, feature table, bitmaps,
    unknown ones), end marker, backing file name, zero padding.  Updates
    ``header.backing_file_offset``/``_size``.  OSError(ENOSPC) if it does not fit."""
    cluster_size = header.cluster_size
    parts: list[bytes] = []
    if backing_format:
        parts.append(_ext(EXT_BACKING_FORMAT, backing_format.encode()))
    if data_file and header.incompatible_features & INCOMPAT_DATA_FILE:
        parts.append(_ext(EXT_DATA_FILE, data_file.encode()))
    if crypto_header is not None:
        parts.append(_ext(EXT_CRYPTO_HEADER, crypto_header))
    if header.version >= 3 and cluster_size > 4096:
        parts.append(_ext(EXT_FEATURE_TABLE, feature_table()))
    if bitmaps is not None:
        parts.append(_ext(EXT_BITMAPS, bitmaps))
    for magic, data in unknown_extensions or ():
        parts.append(_ext(magic, data))
    parts.append(_ext(EXT_END, b""))
    fixed_len = len(header.pack())
    body = b"".join(parts)
    name = backing_file.encode() if backing_file else b""
    if backing_file:
        header.backing_file_offset = fixed_len + len(body)
        header.backing_file_size = len(name)
    else:
        header.backing_file_offset = header.backing_file_size = 0
    out = header.pack() + body + name
    if len(out) > cluster_size:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return out + bytes(cluster_size - len(out))


# ---- refcounts ---------------------------------------------------------------------------


def get_refcount(block: bytes | bytearray, index: int, order: int) -> int:
    """Entry ``index`` of a refcount block with entries of 2**order bits."""
    if order == 4:
        return (block[2 * index] << 8) | block[2 * index + 1]
    if order < 3:
        bits = 1 << order
        per_byte = 8 >> order
        byte = block[index // per_byte]
        return (byte >> ((index % per_byte) * bits)) & ((1 << bits) - 1)
    width = 1 << (order - 3)
    return int.from_bytes(block[index * width:(index + 1) * width], "big")


def set_refcount(block: bytearray, index: int, order: int, value: int) -> None:
    if order == 4:
        block[2 * index] = value >> 8
        block[2 * index + 1] = value & 0xFF
        return
    if order < 3:
        bits = 1 << order
        per_byte = 8 >> order
        shift = (index % per_byte) * bits
        mask = ((1 << bits) - 1) << shift
        pos = index // per_byte
        block[pos] = (block[pos] & ~mask) | ((value << shift) & mask)
        return
    width = 1 << (order - 3)
    block[index * width:(index + 1) * width] = value.to_bytes(width, "big")


def refcount_metadata_size(clusters: int, cluster_size: int, refcount_order: int,
                           generous_increase: bool = False) -> tuple[int, int]:
    """(bytes of refcount blocks and table, number of blocks) needed to count
    ``clusters`` clusters plus the refcount structures themselves (a fixed point)."""
    blocks_per_table_cluster = cluster_size // REFTABLE_ENTRY_SIZE
    refcounts_per_block = cluster_size * 8 // (1 << refcount_order)
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // refcounts_per_block)
        table = -(-blocks // blocks_per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous_increase:
            clusters += -(-table // 2)
            n = 0
            generous_increase = False
            continue
        if n == last:
            return (blocks + table) * cluster_size, blocks


def prealloc_size(total_size: int, cluster_size: int, refcount_order: int,
                  extended_l2: bool) -> int:
    """Bytes a fully allocated image of ``total_size`` takes (QEMU's
    qcow2_calc_prealloc_size)."""
    aligned = -(-total_size // cluster_size) * cluster_size
    l2e = L2E_SIZE_EXTENDED if extended_l2 else L2E_SIZE_NORMAL
    meta = cluster_size
    nl2e = aligned // cluster_size
    nl2e = -(-nl2e // (cluster_size // l2e)) * (cluster_size // l2e)
    meta += nl2e * l2e
    nl1e = nl2e * l2e // cluster_size
    nl1e = -(-nl1e // (cluster_size // L1E_SIZE)) * (cluster_size // L1E_SIZE)
    meta += nl1e * L1E_SIZE
    meta += refcount_metadata_size((meta + aligned) // cluster_size, cluster_size,
                                   refcount_order)[0]
    return meta + aligned


# ---- geometry ------------------------------------------------------------------------------


def l2_entry_size(extended_l2: bool) -> int:
    return L2E_SIZE_EXTENDED if extended_l2 else L2E_SIZE_NORMAL


def l1_entries_for(size: int, cluster_bits: int, extended_l2: bool) -> int:
    """L1 entries needed to map ``size`` bytes (QEMU's size_to_l1)."""
    l2_bits = cluster_bits - (4 if extended_l2 else 3)
    shift = cluster_bits + l2_bits
    return -(-size // (1 << shift))


def new_image(*, cluster_size: int = DEFAULT_CLUSTER_SIZE, version: int = 3,
              refcount_bits: int = 16, lazy_refcounts: bool = False,
              extended_l2: bool = False, compression_type: str = "zlib",
              backing_file: str | None = None, backing_format: str | None = None,
              data_file: str | None = None, data_file_raw: bool = False) -> bytes:
    """An empty (0-byte) image: header cluster, refcount table cluster and one
    refcount block counting the three, as QEMU's qcow2_co_create() writes first.

    Callers validate the options (QEMU's texts live with blockdev-create); then they
    open the image with the qcow2 driver and truncate it to its size, with the
    preallocation mode asked for, as QEMU does.
    """
    cluster_bits = cluster_size.bit_length() - 1
    refcount_order = refcount_bits.bit_length() - 1
    hdr = Header(version=version, cluster_bits=cluster_bits, size=0,
                 refcount_table_offset=cluster_size, refcount_table_clusters=1,
                 refcount_order=refcount_order,
                 header_length=V3_HEADER_LENGTH if version >= 3 else V2_HEADER_LENGTH)
    if lazy_refcounts:
        hdr.compatible_features |= COMPAT_LAZY_REFCOUNTS
    if extended_l2:
        hdr.incompatible_features |= INCOMPAT_EXTL2
    if data_file is not None:
        hdr.incompatible_features |= INCOMPAT_DATA_FILE
        if data_file_raw:
            hdr.autoclear_features |= AUTOCLEAR_DATA_FILE_RAW
    ctype = COMPRESSION_TYPES[compression_type]
    if ctype != COMPRESSION_ZLIB:
        hdr.incompatible_features |= INCOMPAT_COMPRESSION
        hdr.compression_type = ctype
    first = build_header_cluster(hdr, backing_file=backing_file,
                                 backing_format=backing_format, data_file=data_file)
    table = bytearray(cluster_size)
    table[0:8] = (2 * cluster_size).to_bytes(8, "big")
    block = bytearray(cluster_size)
    for index in range(3):
        set_refcount(block, index, refcount_order, 1)
    return first + bytes(table) + bytes(block)
