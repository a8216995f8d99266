"""Write-back caches of metadata clusters (L2 tables, refcount blocks), QEMU's qcow2-cache.c.

A cache keeps up to ``capacity`` tables by their offset in the image file, least
recently used first out.  Tables are changed in memory and marked dirty; they reach
the file when evicted or flushed.  The order in which the two caches reach the file
is what keeps a killed daemon's image consistent (at worst leaked clusters):

- a new reference (an L2 entry pointing at a newly allocated cluster) must not be on
  disk before the refcount that accounts for it: the L2 cache *depends on* the refcount
  cache, whose blocks are written and synced first;
- a dropped reference must be on disk before the refcount that no longer counts it:
  the refcount cache depends on the L2 cache;
- what a write copied into a new cluster (copy-on-write) must be on disk before an L2
  table that points at it: the L2 cache *depends on a flush* (``depends_on_flush``),
  which a refcount dependency's flush satisfies too.

Only one direction can be pending at a time; asking for the other one flushes first
(QEMU's qcow2_cache_set_dependency).  All of this runs under the node's metadata lock.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

T = TypeVar("T")

Writer = Callable[[int, bytes], Awaitable[None]]


class CachedTable(Generic[T]):
    __slots__ = ("offset", "table", "dirty", "used")

    def __init__(self, offset: int, table: T) -> None:
        self.offset = offset
        self.table = table
        self.dirty = False
        self.used = time.monotonic()


class TableCache(Generic[T]):
    """Tables of one kind; ``encode`` turns a table back into the cluster's bytes."""

    def __init__(self, name: str, capacity: int, encode: Callable[[T], bytes]) -> None:
        self.name = name
        self.capacity = max(capacity, 2)
        self.encode = encode
        self.entries: collections.OrderedDict[int, CachedTable[T]] = collections.OrderedDict()
        # Set by Caches: what must be on disk before this cache's tables are written.
        self.depends: TableCache[Any] | None = None
        self.depends_on_flush = False

    def peek(self, offset: int) -> T | None:
        """The cached table at ``offset`` without I/O (any thread; no LRU update)."""
        entry = self.entries.get(offset)
        return entry.table if entry is not None else None

    def lookup(self, offset: int) -> CachedTable[T] | None:
        entry = self.entries.get(offset)
        if entry is not None:
            self.entries.move_to_end(offset)
            entry.used = time.monotonic()
        return entry

    def insert(self, offset: int, table: T) -> CachedTable[T]:
        entry = CachedTable(offset, table)
        self.entries[offset] = entry
        return entry

    def victims(self) -> list[CachedTable[T]]:
        """Entries to evict so that one more fits (oldest first)."""
        excess = len(self.entries) + 1 - self.capacity
        return list(self.entries.values())[:excess] if excess > 0 else []

    def drop(self, offset: int) -> None:
        self.entries.pop(offset, None)

    def dirty_entries(self) -> list[CachedTable[T]]:
        return [e for e in self.entries.values() if e.dirty]

    def clean_unused(self, older_than: float) -> None:
        """Forgets clean tables not used since ``older_than`` (cache-clean-interval)."""
        for offset, entry in list(self.entries.items()):
            if not entry.dirty and entry.used < older_than:
                del self.entries[offset]


class Caches:
    """The L2 table and refcount block caches and the order between them."""

    def __init__(self, l2: TableCache[Any], refblocks: TableCache[Any],
                 write: Writer, sync: Callable[[], Awaitable[None]]) -> None:
        self.l2 = l2
        self.refblocks = refblocks
        self._write = write
        self._sync = sync

    async def set_dependency(self, cache: TableCache[Any],
                             dependency: TableCache[Any]) -> None:
        """``cache`` may be written only once ``dependency`` is on disk.  A pending
        dependency the other way round is resolved first by flushing, so the two caches
        never wait for each other (QEMU's qcow2_cache_set_dependency)."""
        if dependency.depends is not None:
            await self._flush_dependency(dependency)
        if cache.depends is not None and cache.depends is not dependency:
            await self._flush_dependency(cache)
        cache.depends = dependency

    async def _flush_dependency(self, cache: TableCache[Any]) -> None:
        assert cache.depends is not None
        await self.flush(cache.depends)
        cache.depends = None
        cache.depends_on_flush = False

    async def write_entry(self, cache: TableCache[Any], entry: CachedTable[object]) -> None:
        if not entry.dirty:
            return
        if cache.depends is not None:
            await self._flush_dependency(cache)
        elif cache.depends_on_flush:
            await self._sync()
            cache.depends_on_flush = False
        await self._write(entry.offset, cache.encode(entry.table))
        entry.dirty = False

    async def write_all(self, cache: TableCache[Any]) -> None:
        for entry in sorted(cache.dirty_entries(), key=lambda e: e.offset):
            await self.write_entry(cache, entry)

    async def flush(self, cache: TableCache[Any]) -> None:
        """Writes every dirty table of ``cache`` (after its dependencies) and syncs."""
        await self.write_all(cache)
        await self._sync()

    async def evict_for(self, cache: TableCache[Any]) -> None:
        """Makes room for one more table, writing back dirty victims first."""
        for entry in cache.victims():
            await self.write_entry(cache, entry)
            cache.drop(entry.offset)
