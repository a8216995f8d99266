"""The iteration orders of QEMU's QDict and of GLib's string-keyed GHashTable.

Both are deterministic functions of the keys and of the history of insertions and
removals, and both show on the wire: QEMU reports the first not-yet-visited member of a
struct as unexpected (a GHashTable filled in QDict order), sets an object's properties in
QDict order, and lists QOM properties and children in GHashTable order.  This module
replays QDict's bucket order and GHashTable's open addressing (including its resizes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

_QDICT_BUCKETS = 512
_MASK32 = 0xFFFFFFFF
_MIN_SHIFT = 3
_PRIME_MOD = (1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381,
              32749, 65521, 131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593,
              16777213, 33554393, 67108859, 134217689, 268435399, 536870909, 1073741789,
              2147483647)
_UNUSED, _TOMBSTONE = 0, 1


def _tdb_hash(key: bytes) -> int:
    """qdict.c's tdb_hash()."""
    value = (0x238F13AF * len(key)) & _MASK32
    for i, byte in enumerate(key):
        value = (value + (byte << (i * 5 % 24))) & _MASK32
    return (1103515243 * value + 12345) & _MASK32


def qdict_order(keys: Iterable[str]) -> list[str]:
    """The order qdict_first()/qdict_next() yield keys inserted in `keys` order."""
    buckets: dict[int, list[str]] = {}
    for key in keys:
        bucket = buckets.setdefault(_tdb_hash(key.encode()) % _QDICT_BUCKETS, [])
        if key not in bucket:
            bucket.insert(0, key)       # QLIST_INSERT_HEAD
    return [key for index in sorted(buckets) for key in buckets[index]]


def _str_hash(key: bytes) -> int:
    """GLib's g_str_hash() (djb2 over signed chars)."""
    h = 5381
    for byte in key:
        h = (h * 33 + (byte - 256 if byte >= 128 else byte)) & _MASK32
    return h


class GHashSet:
    """The parts of GLib's GHashTable (with g_str_hash) that decide iteration order."""

    def __init__(self) -> None:
        self._set_shift(_MIN_SHIFT)
        self.hashes = [_UNUSED] * self.size
        self.keys: list[str | None] = [None] * self.size
        self.nnodes = 0
        self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size = 1 << shift
        self.mod = _PRIME_MOD[shift]
        self.mask = self.size - 1

    def _index(self, hash_value: int) -> int:
        return ((hash_value * 11) & _MASK32) % self.mod

    def _lookup(self, key: str) -> tuple[int, int]:
        hash_value = max(_str_hash(key.encode()), 2)
        index = self._index(hash_value)
        step = 0
        tombstone: int | None = None
        while self.hashes[index] != _UNUSED:
            if self.hashes[index] == hash_value and self.keys[index] == key:
                return index, hash_value
            if self.hashes[index] == _TOMBSTONE and tombstone is None:
                tombstone = index
            step += 1
            index = (index + step) & self.mask
        return (tombstone if tombstone is not None else index), hash_value

    def insert(self, key: str) -> None:
        index, hash_value = self._lookup(key)
        old = self.hashes[index]
        if old >= 2:
            return
        self.hashes[index] = hash_value
        self.keys[index] = key
        self.nnodes += 1
        if old == _UNUSED:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        index, _ = self._lookup(key)
        if self.hashes[index] < 2:
            return
        self.hashes[index] = _TOMBSTONE
        self.keys[index] = None
        self.nnodes -= 1
        self._maybe_resize()

    def _maybe_resize(self) -> None:
        if ((self.size > self.nnodes * 4 and self.size > 1 << _MIN_SHIFT)
                or self.size <= self.noccupied + self.noccupied // 16):
            self._resize()

    def _resize(self) -> None:
        old_size = self.size
        wanted = int(self.nnodes * 1.333)
        shift = 0
        while wanted:
            wanted >>= 1
            shift += 1
        self._set_shift(max(shift, _MIN_SHIFT))
        if self.size > old_size:
            self.hashes += [_UNUSED] * (self.size - old_size)
            self.keys += [None] * (self.size - old_size)
        moved = [False] * max(self.size, old_size)
        for i in range(old_size):
            node_hash = self.hashes[i]
            if node_hash < 2:
                self.hashes[i] = _UNUSED
                continue
            if moved[i]:
                continue
            self.hashes[i] = _UNUSED
            key = self.keys[i]
            self.keys[i] = None
            while True:
                index = self._index(node_hash)
                step = 0
                while moved[index]:
                    step += 1
                    index = (index + step) & self.mask
                moved[index] = True
                replaced_hash, replaced_key = self.hashes[index], self.keys[index]
                self.hashes[index], self.keys[index] = node_hash, key
                if replaced_hash < 2:
                    break
                node_hash, key = replaced_hash, replaced_key
        del self.hashes[self.size:], self.keys[self.size:]
        self.noccupied = self.nnodes

    def __iter__(self) -> Iterator[str]:
        """The keys in the order g_hash_table_iter_next() yields them."""
        for node_hash, key in zip(self.hashes, self.keys, strict=True):
            if node_hash >= 2:
                assert key is not None
                yield key

    def __len__(self) -> int:
        return self.nnodes


def first_unvisited(keys: Iterable[str], visited: Iterable[str]) -> str | None:
    """The key QEMU reports as unexpected: `keys` are the struct's keys in input
    order, `visited` the members consumed, in visiting order."""
    table = GHashSet()
    for key in qdict_order(keys):
        table.insert(key)
    for key in visited:
        table.remove(key)
    return next(iter(table), None)
