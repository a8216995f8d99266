"""Dirty bitmaps: which parts of a node were written since a point in time.

QEMU's BdrvDirtyBitmap (block/dirty-bitmap.c).  A bitmap covers the node's length in
granules of ``granularity`` bytes (a power of two, at least 512); a set bit means some
write, zero-write or discard touched that granule while the bitmap was enabled.  The
request path marks every enabled bitmap of a node after the request has been done (failed
ones too, as QEMU does), in ``qsd.block.io`` and on BlockBackend's inline write path, so a
reader that clears bits and then copies never loses a write that lands meanwhile.

Bits are packed eight to a byte, the first granule in the lowest bit of byte 0: QEMU's
serialisation and the qcow2 bitmaps extension's layout, so ``to_bytes``/``load_bytes``
are the bytes a qcow2 image stores.  Searching for the next dirty or clean granule runs
in C (a regular expression over the byte array), counting is one ``int.bit_count``.

The bits are changed from any thread (requests complete in iothreads): every change and
every read that needs a consistent view takes the bitmap's lock.  Everything else (the
list of bitmaps, the flags, successors) is changed in the main loop only.

A node keeps its bitmaps in ``node.dirty_bitmaps``, newest first as QEMU lists them; a
node without bitmaps pays one empty-list test per write.  ``create``/``release`` change
that list and tell the node's users to bind their inline paths again.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from typing import Protocol

from qsd.errors import QMPError

# QEMU's BDRV_BITMAP_MAX_NAME_SIZE.
MAX_NAME_SIZE = 1023
DEFAULT_GRANULARITY = 65536

# What bdrv_dirty_bitmap_check() refuses (QEMU's BDRV_BITMAP_* flags).
BUSY = 1
READONLY = 2
INCONSISTENT = 4
DEFAULT = BUSY | READONLY | INCONSISTENT
ALLOW_RO = BUSY | INCONSISTENT

_NOT_CLEAN = re.compile(rb"[^\x00]")
_NOT_FULL = re.compile(rb"[^\xff]")


class BitmapOwner(Protocol):
    """What a bitmap needs of its node (``qsd.block.node.BlockNode``)."""

    node_name: str
    read_only: bool
    dirty_bitmaps: list[DirtyBitmap]

    def length(self) -> int: ...

    def notify_changed(self) -> None: ...

    def has_info(self) -> bool: ...

    def get_info(self) -> dict[str, object]: ...


def _lowest_bit(value: int) -> int:
    return (value & -value).bit_length() - 1


class DirtyBitmap:
    """One bitmap of ``node``: its bits, its name (None for the anonymous ones jobs and
    merges use) and QEMU's flags: ``disabled`` (writes are not recorded), ``busy`` (an
    operation uses it: a job, an NBD export), ``readonly`` (loaded from an image opened
    read-only), ``inconsistent`` (stored with the in-use flag: only removal is allowed),
    ``persistent`` (stored in the image when it is closed)."""

    def __init__(self, node: BitmapOwner, granularity: int, name: str | None) -> None:
        self.node = node
        self.name = name
        self.granularity = granularity
        self._shift = granularity.bit_length() - 1
        self.size = node.length()
        self._granules = -(-self.size >> self._shift)
        self._bits = bytearray(-(-self._granules // 8))
        self._lock = threading.Lock()
        self.disabled = False
        self.busy = False
        self.readonly = False
        self.persistent = False
        self.inconsistent = False
        # Set while the image must not store this bitmap (QEMU's skip_store: a removal
        # whose image update is still to come).
        self.skip_store = False
        self.successor: DirtyBitmap | None = None

    # ---- state ---------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        return not self.disabled

    @property
    def recording(self) -> bool:
        """Whether writes are recorded here or in the successor (query: recording)."""
        return not self.disabled or (self.successor is not None
                                     and not self.successor.disabled)

    @property
    def stored(self) -> bool:
        """Whether the image keeps this bitmap when it is closed (QEMU's persistence
        getter: persistent and not being removed)."""
        return self.persistent and not self.skip_store

    def check(self, flags: int) -> None:
        """QEMU's bdrv_dirty_bitmap_check(): QMPError if the bitmap is in a state that
        ``flags`` (BUSY, READONLY, INCONSISTENT) rules out."""
        if flags & BUSY and self.busy:
            raise QMPError(f"Bitmap '{self.name}' is currently in use by another operation "
                           "and cannot be used")
        if flags & READONLY and self.readonly:
            raise QMPError(f"Bitmap '{self.name}' is readonly and cannot be modified")
        if flags & INCONSISTENT and self.inconsistent:
            raise QMPError(f"Bitmap '{self.name}' is inconsistent and cannot be used",
                           hint="Try block-dirty-bitmap-remove to delete this bitmap from "
                                "disk\n")

    def info(self) -> dict[str, object]:
        """QAPI BlockDirtyInfo."""
        info: dict[str, object] = {}
        if self.name is not None:
            info["name"] = self.name
        info.update({"recording": self.recording, "persistent": self.persistent,
                     "busy": self.busy, "count": self.count(),
                     "granularity": self.granularity})
        if self.inconsistent:
            info["inconsistent"] = True
        return info

    # ---- bits ----------------------------------------------------------------------------

    def _range(self, offset: int, length: int) -> tuple[int, int]:
        """The granules [first, end) that bytes [offset, offset + length) touch, within
        the bitmap."""
        first = offset >> self._shift
        end = min((offset + length + self.granularity - 1) >> self._shift, self._granules)
        return first, end

    def _fill(self, first: int, end: int, value: bool) -> None:
        bits = self._bits
        lo, hi = first >> 3, end >> 3
        head = 0xFF & (0xFF << (first & 7))
        tail = (1 << (end & 7)) - 1
        if lo == hi:
            mask = head & tail
            bits[lo] = bits[lo] | mask if value else bits[lo] & ~mask
            return
        if first & 7:
            bits[lo] = bits[lo] | head if value else bits[lo] & ~head
            lo += 1
        if hi > lo:
            bits[lo:hi] = (b"\xff" if value else b"\x00") * (hi - lo)
        if tail:
            bits[hi] = bits[hi] | tail if value else bits[hi] & ~tail

    def set(self, offset: int, length: int) -> None:
        """Marks the granules that bytes [offset, offset + length) touch.

        The write path's case, a request within one granule, costs a bit test when the
        granule is dirty already and takes the lock only to set the bit."""
        shift = self._shift
        first = offset >> shift
        if first == (offset + length - 1) >> shift and first < self._granules and length:
            bits = self._bits
            index = first >> 3
            bit = 1 << (first & 7)
            if not bits[index] & bit:
                with self._lock:
                    bits[index] |= bit
            return
        first, end = self._range(offset, length)
        if first < end:
            with self._lock:
                self._fill(first, end, True)

    def reset(self, offset: int, length: int) -> None:
        """Clears the granules that bytes [offset, offset + length) touch (jobs clear
        what they are about to copy)."""
        first, end = self._range(offset, length)
        if first < end:
            with self._lock:
                self._fill(first, end, False)

    def clear(self) -> bytes:
        """Clears every bit; returns the old bits for ``restore`` (transactions)."""
        with self._lock:
            old = bytes(self._bits)
            self._bits[:] = bytes(len(self._bits))
        return old

    def restore(self, bits: bytes) -> None:
        """Puts back bits that ``clear``, ``merge`` or ``to_bytes`` returned."""
        with self._lock:
            self._bits[:] = bits

    def get(self, offset: int) -> bool:
        """Whether the granule holding byte ``offset`` is dirty."""
        granule = offset >> self._shift
        if granule >= self._granules:
            return False
        return bool(self._bits[granule >> 3] >> (granule & 7) & 1)

    def count(self) -> int:
        """Dirty bytes, whole granules (QEMU's bdrv_get_dirty_count)."""
        with self._lock:
            ones = int.from_bytes(self._bits, "little").bit_count()
        return ones << self._shift

    def _next(self, offset: int, end: int, dirty: bool) -> int:
        """The first byte offset in [offset, end) whose granule is ``dirty`` (or clean),
        -1 if none."""
        end = min(end, self.size)
        if offset >= end:
            return -1
        granule = offset >> self._shift
        bits = self._bits
        index = granule >> 3
        byte = bits[index] if dirty else ~bits[index] & 0xFF
        byte &= 0xFF << (granule & 7)
        if not byte:
            last = ((end - 1) >> self._shift) >> 3
            found = (_NOT_CLEAN if dirty else _NOT_FULL).search(bits, index + 1, last + 1)
            if found is None:
                return -1
            index = found.start()
            byte = bits[index] if dirty else ~bits[index] & 0xFF
        at = max(((index << 3) + _lowest_bit(byte)) << self._shift, offset)
        return at if at < end else -1

    def next_dirty(self, offset: int, end: int) -> int:
        """The first dirty byte offset in [offset, end), or -1."""
        return self._next(offset, end, True)

    def next_clean(self, offset: int, end: int) -> int:
        """The first clean byte offset in [offset, end), or -1."""
        return self._next(offset, end, False)

    def extents(self, offset: int, length: int) -> Iterator[tuple[int, int, bool]]:
        """(start, length, dirty) runs that cover [offset, offset + length) within the
        bitmap, alternating between dirty and clean (NBD's qemu:dirty-bitmap context)."""
        end = min(offset + length, self.size)
        pos = offset
        while pos < end:
            dirty = self.get(pos)
            following = self.next_clean(pos, end) if dirty else self.next_dirty(pos, end)
            if following < 0:
                following = end
            yield pos, following - pos, dirty
            pos = following

    def dirty_areas(self, offset: int = 0, length: int = -1) -> Iterator[tuple[int, int]]:
        """(start, length) of the dirty runs in [offset, offset + length); the whole
        bitmap by default.  Runs end at the bitmap's size."""
        end = self.size if length < 0 else min(offset + length, self.size)
        for start, count, dirty in self.extents(offset, end - offset):
            if dirty:
                yield start, count

    # ---- whole bitmaps --------------------------------------------------------------------

    def merge(self, src: DirtyBitmap) -> bytes:
        """ORs ``src``'s bits into this bitmap (different granularities too); returns the
        old bits for ``restore``.  The caller checks states and sizes (``merge_checked``)."""
        with self._lock:
            old = bytes(self._bits)
        if src.granularity == self.granularity:
            with src._lock:
                theirs = int.from_bytes(src._bits, "little")
            with self._lock:
                mine = int.from_bytes(self._bits, "little") | theirs
                self._bits[:] = mine.to_bytes(len(self._bits), "little")
        else:
            for start, count in src.dirty_areas():
                self.set(start, count)
        return old

    def to_bytes(self) -> bytes:
        """The packed bits as qcow2 stores them (ceil(granules / 8) bytes)."""
        with self._lock:
            return bytes(self._bits)

    def load_bytes(self, data: bytes) -> None:
        """Takes bits in the layout ``to_bytes`` gives (shorter data: the rest is
        clean); bits past the last granule are dropped."""
        with self._lock:
            n = len(self._bits)
            self._bits[:] = data[:n].ljust(n, b"\x00")
            spare = self._granules & 7
            if spare and n:
                self._bits[-1] &= (1 << spare) - 1

    def resize(self, size: int) -> None:
        """Follows the node to a new length; a grown part is clean (QEMU's
        hbitmap_truncate)."""
        granules = -(-size >> self._shift)
        with self._lock:
            nbytes = -(-granules // 8)
            del self._bits[nbytes:]
            self._bits.extend(bytes(nbytes - len(self._bits)))
            spare = granules & 7
            if spare and nbytes and granules < self._granules:
                self._bits[-1] &= (1 << spare) - 1
            self.size, self._granules = size, granules

    # ---- successors: how a job freezes a bitmap while it runs ----------------------------

    def create_successor(self) -> DirtyBitmap:
        """Freezes this bitmap for an operation: an anonymous successor records the
        writes from now on (enabled if this one was), this one is disabled and busy."""
        self.check(BUSY)
        if self.successor is not None:
            raise QMPError("Cannot create a successor for a bitmap that already has one")
        child = create(self.node, self.granularity, None)
        child.disabled = self.disabled
        self.disabled = True
        self.successor = child
        self.busy = True
        return child

    def abdicate(self) -> DirtyBitmap:
        """The operation succeeded: the successor takes this bitmap's name and
        persistence, this one goes (QEMU's bdrv_dirty_bitmap_abdicate)."""
        successor = self.successor
        if successor is None:
            raise QMPError("Cannot relinquish control if there's no successor present")
        successor.name, self.name = self.name, None
        successor.persistent, self.persistent = self.persistent, False
        self.successor = None
        self.busy = False
        release(self)
        return successor

    def reclaim(self) -> DirtyBitmap:
        """The operation failed: the successor's bits go back into this bitmap, which
        records again if the successor did (QEMU's bdrv_reclaim_dirty_bitmap)."""
        successor = self.successor
        if successor is None:
            raise QMPError("Cannot reclaim a successor when none is present")
        self.merge(successor)
        self.disabled = successor.disabled
        self.busy = False
        self.successor = None
        release(successor)
        return self

    def __repr__(self) -> str:
        return (f"<DirtyBitmap {self.name!r} of {self.node.node_name!r} "
                f"granularity={self.granularity}>")


# ---- the bitmaps of a node -----------------------------------------------------------------


def find(node: BitmapOwner, name: str) -> DirtyBitmap | None:
    for bitmap in node.dirty_bitmaps:
        if bitmap.name == name:
            return bitmap
    return None


def create(node: BitmapOwner, granularity: int, name: str | None) -> DirtyBitmap:
    """A new enabled, empty bitmap at the head of the node's list (QEMU's
    bdrv_create_dirty_bitmap, its texts); main loop."""
    if name is not None:
        if find(node, name) is not None:
            raise QMPError(f"Bitmap already exists: {name}")
        if len(name.encode()) > MAX_NAME_SIZE:
            raise QMPError(f"Bitmap name too long: {name}")
    bitmap = DirtyBitmap(node, granularity, name)
    node.dirty_bitmaps.insert(0, bitmap)
    if len(node.dirty_bitmaps) == 1:
        node.notify_changed()
    return bitmap


def release(bitmap: DirtyBitmap) -> None:
    """Drops a bitmap from its node (not from the image: see the driver)."""
    node = bitmap.node
    node.dirty_bitmaps.remove(bitmap)
    if not node.dirty_bitmaps:
        node.notify_changed()


def set_dirty(bitmaps: list[DirtyBitmap], offset: int, length: int) -> None:
    """Marks a finished write in every enabled bitmap of a node (QEMU's bdrv_set_dirty);
    callers test the list for emptiness first, so nodes without bitmaps pay nothing."""
    for bitmap in bitmaps:
        if not bitmap.disabled:
            bitmap.set(offset, length)


def default_granularity(node: BitmapOwner) -> int:
    """The cluster size clamped to [4 KiB, 64 KiB], else 64 KiB (QEMU's
    bdrv_get_default_bitmap_granularity)."""
    cluster = 0
    if node.has_info():
        size = node.get_info().get("cluster-size", 0)
        cluster = size if isinstance(size, int) else 0
    if cluster > 0:
        return min(65536, max(4096, cluster))
    return DEFAULT_GRANULARITY


def merge_checked(dest: DirtyBitmap, src: DirtyBitmap) -> bytes:
    """QEMU's bdrv_merge_dirty_bitmap(): state checks and texts, then ``merge``; returns
    the old bits of ``dest``."""
    dest.check(DEFAULT)
    src.check(ALLOW_RO)
    if src.size != dest.size:
        raise QMPError(f"Bitmaps are of different sizes (destination size is {dest.size}, "
                       f"source size is {src.size}) and can't be merged")
    return dest.merge(src)
