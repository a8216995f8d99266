"""The guest's memory as the front-end shares it: file descriptors mapped into qsd.

Every access to guest memory goes through a Python ``mmap`` (bounds-checked by the
runtime), so a bad address from the front-end can only fail a lookup here, never touch
memory outside a region.  What the runtime cannot check is a file that is shorter than
the mapping (SIGBUS on access): a region must lie inside its file when it is mapped, and
a memfd that the front-end could still shrink is sealed against shrinking.

A ``GuestMemory`` is immutable: a new memory table builds a new one, and the queues pick
it up in their own threads.  A region that is dropped while a request still holds a view
of it stays mapped until that view is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import stat
from typing import Final

_PAGE: Final = mmap.PAGESIZE


class BadAddress(Exception):
    """An address range that no region covers (the front-end's fault)."""


class MapError(Exception):
    """A region that cannot be mapped; the text is what QEMU's back-end would report."""


class Region:
    """One mapped region: guest physical and front-end (user) address ranges."""

    __slots__ = ("gpa", "size", "uva", "mm", "view", "base")

    def __init__(self, gpa: int, size: int, uva: int, mm: mmap.mmap, base: int) -> None:
        self.gpa = gpa
        self.size = size
        self.uva = uva
        self.mm = mm
        # ``base``: where the region starts in the mapping (the fd offset rounded down).
        self.base = base
        self.view = memoryview(mm)

    def same(self, gpa: int, size: int, uva: int) -> bool:
        return self.gpa == gpa and self.size == size and self.uva == uva

    def close(self) -> None:
        """Unmaps unless a request still holds part of it (then when that is released)."""
        self.view.release()
        with contextlib.suppress(BufferError):
            self.mm.close()


def _seal_against_shrinking(fd: int) -> None:
    """A memfd the front-end could still truncate would make our accesses fault."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return  # not a memfd: nothing to seal
    if not seals & fcntl.F_SEAL_SHRINK and not seals & fcntl.F_SEAL_SEAL:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)


def map_fd(fd: int, offset: int, size: int) -> tuple[mmap.mmap, int]:
    """Maps ``size`` bytes of ``fd`` from ``offset``; returns the mapping and where the
    requested range starts in it.  Raises MapError with QEMU's text on failure."""
    if size <= 0:
        raise MapError("region mmap error: Invalid argument")
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise MapError("region mmap error: No such device")
        _seal_against_shrinking(fd)
        if offset + size > os.fstat(fd).st_size:
            raise MapError("region mmap error: region exceeds its file")
        align = os.fstatvfs(fd).f_bsize
        if align < _PAGE or align & (align - 1):
            align = _PAGE
        start = offset - offset % align
        mm = mmap.mmap(fd, size + offset - start, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
    except OSError as exc:
        raise MapError(f"region mmap error: {os.strerror(exc.errno or 0)}") from None
    except OverflowError:
        raise MapError("region mmap error: Invalid argument") from None
    with contextlib.suppress(OSError, AttributeError):
        mm.madvise(mmap.MADV_DONTDUMP)
    return mm, offset - start


class GuestMemory:
    """The regions of one memory table, ordered by guest physical address."""

    __slots__ = ("regions", "table")

    def __init__(self, regions: tuple[Region, ...] = ()) -> None:
        self.regions = regions
        # For the data path: (first gpa, end gpa, gpa -> view offset, view) per region.
        self.table = tuple((r.gpa, r.gpa + r.size, r.base - r.gpa, r.view) for r in regions)

    def __len__(self) -> int:
        return len(self.regions)

    # ---- building new tables (control path) -----------------------------------------

    def with_region(self, gpa: int, size: int, uva: int, mmap_offset: int,
                    fd: int) -> GuestMemory:
        """A table with one more region, mapped from ``fd`` (which the caller closes)."""
        if gpa + size > 1 << 64 or uva + size > 1 << 64:
            raise MapError("region mmap error: Invalid argument")
        for r in self.regions:
            if gpa < r.gpa + r.size and r.gpa < gpa + size:
                raise MapError("regions with overlapping guest physical addresses")
        mm, base = map_fd(fd, mmap_offset, size)
        region = Region(gpa, size, uva, mm, base)
        return GuestMemory(tuple(sorted((*self.regions, region), key=lambda r: r.gpa)))

    def without_region(self, gpa: int, size: int, uva: int) -> tuple[GuestMemory, Region]:
        for r in self.regions:
            if r.same(gpa, size, uva):
                return GuestMemory(tuple(x for x in self.regions if x is not r)), r
        raise MapError("Specified region not found\n")

    def close(self) -> None:
        for r in self.regions:
            r.close()

    # ---- lookups (data path) --------------------------------------------------------

    def gpa_view(self, gpa: int, length: int) -> memoryview:
        """A view of guest physical ``[gpa, gpa + length)`` inside one region."""
        end = gpa + length
        for first, last, delta, view in self.table:
            if first <= gpa and end <= last:
                return view[gpa + delta:end + delta]
        raise BadAddress(gpa)

    def gpa_views(self, gpa: int, length: int) -> list[memoryview]:
        """The views covering ``[gpa, gpa + length)``, split where regions meet."""
        views = []
        while length:
            for r in self.regions:
                off = gpa - r.gpa
                if 0 <= off < r.size:
                    n = min(length, r.size - off)
                    start = r.base + off
                    views.append(r.view[start:start + n])
                    gpa += n
                    length -= n
                    break
            else:
                raise BadAddress(gpa)
        return views

    def has_uva(self, uva: int) -> bool:
        return any(0 <= uva - r.uva < r.size for r in self.regions)

    def uva_area(self, uva: int, length: int) -> tuple[mmap.mmap, int]:
        """The mapping and offset of front-end address range ``[uva, uva + length)``,
        which must lie inside one region (a ring: read with struct at that offset)."""
        for r in self.regions:
            off = uva - r.uva
            if 0 <= off and off + length <= r.size:
                return r.mm, r.base + off
        raise BadAddress(uva)

