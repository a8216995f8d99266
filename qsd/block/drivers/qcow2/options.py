"""The qcow2 driver's runtime options, checked as QEMU's qcow2_update_options_prepare().

Cache sizes follow QEMU's read_cache_sizes(): by default the L2 cache covers the whole
disk up to 32 MiB, the refcount cache holds at least 4 clusters, and ``cache-size``
splits between the two.  qsd caches whole L2 tables, so ``l2-cache-entry-size`` is
checked but only the total L2 cache size decides how many tables stay cached.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qsd.block.drivers.qcow2 import format as fmt
from qsd.block.drivers.qcow2.refcount import (
    DISCARD_ALWAYS,
    DISCARD_NEVER,
    DISCARD_OTHER,
    DISCARD_REQUEST,
    DISCARD_SNAPSHOT,
    OL_NAMES,
)
from qsd.errors import QMPError

DEFAULT_L2_CACHE_MAX_SIZE = 32 * 1024 * 1024
MIN_L2_CACHE_SIZE = 2            # tables
MIN_REFCOUNT_CACHE_SIZE = 4      # clusters
DEFAULT_CACHE_CLEAN_INTERVAL = 600
INT_MAX = 2**31 - 1
UINT_MAX = 2**32 - 1

# QEMU's QCOW2_OL_CONSTANT / CACHED / ALL templates.
OL_CONSTANT = 0x1 | 0x2 | 0x8 | 0x20 | 0x100
OL_CACHED = OL_CONSTANT | 0x4 | 0x10 | 0x40
OL_ALL = OL_CACHED | 0x80
_TEMPLATES = {"none": 0, "constant": OL_CONSTANT, "cached": OL_CACHED, "all": OL_ALL}
_FLAG_ATTRS = ("main_header", "active_l1", "active_l2", "refcount_table", "refcount_block",
               "snapshot_table", "inactive_l1", "inactive_l2", "bitmap_directory")
assert len(_FLAG_ATTRS) == len(OL_NAMES)


@dataclasses.dataclass
class RuntimeOptions:
    l2_tables: int
    refcount_blocks: int
    cache_clean_interval: int
    lazy_refcounts: bool
    overlap_check: int
    discard_passthrough: tuple[bool, ...]
    discard_no_unref: bool


def _value(x: Any) -> Any:
    return getattr(x, "value", x)


def parse(options: Any, header: fmt.Header, virtual_size: int, unmap: bool) -> RuntimeOptions:
    cluster_size = header.cluster_size
    extended = bool(header.incompatible_features & fmt.INCOMPAT_EXTL2)
    l2e = fmt.l2_entry_size(extended)
    max_l2_entries = -(-virtual_size // cluster_size)
    max_l2_cache = -(-(max_l2_entries * l2e) // cluster_size) * cluster_size
    combined = options.cache_size
    l2_set = options.l2_cache_size is not None
    rc_set = options.refcount_cache_size is not None
    l2_max_setting = options.l2_cache_size if l2_set else DEFAULT_L2_CACHE_MAX_SIZE
    refcount_cache = options.refcount_cache_size or 0
    entry_size = (options.l2_cache_entry_size if options.l2_cache_entry_size is not None
                  else cluster_size)
    l2_cache = min(max_l2_cache, l2_max_setting)
    min_refcount_cache = MIN_REFCOUNT_CACHE_SIZE * cluster_size
    if combined is not None:
        if l2_set and rc_set:
            raise QMPError("cache-size, l2-cache-size and refcount-cache-size may not be "
                           "set at the same time")
        if l2_set and l2_max_setting > combined:
            raise QMPError("l2-cache-size may not exceed cache-size")
        if refcount_cache > combined:
            raise QMPError("refcount-cache-size may not exceed cache-size")
        if l2_set:
            refcount_cache = combined - l2_cache
        elif rc_set:
            l2_cache = combined - refcount_cache
        elif combined >= max_l2_cache + min_refcount_cache:
            l2_cache = max_l2_cache
            refcount_cache = combined - l2_cache
        else:
            refcount_cache = min(combined, min_refcount_cache)
            l2_cache = combined - refcount_cache
    if l2_cache < max_l2_cache and options.l2_cache_entry_size is None:
        entry_size = min(cluster_size, 4096)
    if (entry_size < 512 or entry_size > cluster_size
            or entry_size & (entry_size - 1)):
        raise QMPError(f"L2 cache entry size must be a power of two between 512 and the "
                       f"cluster size ({cluster_size})")
    l2_tables = max(l2_cache // entry_size, MIN_L2_CACHE_SIZE)
    if l2_tables > INT_MAX:
        raise QMPError("L2 cache size too big")
    # Whole tables are cached: the same bytes hold fewer, bigger entries.
    l2_tables = max(l2_tables * entry_size // cluster_size, MIN_L2_CACHE_SIZE)
    refcount_blocks = max(refcount_cache // cluster_size, MIN_REFCOUNT_CACHE_SIZE)
    if refcount_blocks > INT_MAX:
        raise QMPError("Refcount cache size too big")
    interval = (options.cache_clean_interval if options.cache_clean_interval is not None
                else DEFAULT_CACHE_CLEAN_INTERVAL)
    if interval > UINT_MAX or interval < 0:
        raise QMPError("Cache clean interval too big")
    lazy = (options.lazy_refcounts if options.lazy_refcounts is not None
            else bool(header.compatible_features & fmt.COMPAT_LAZY_REFCOUNTS))
    if lazy and header.version < 3:
        raise QMPError("Lazy refcounts require a qcow2 image with at least qemu 1.1 "
                       "compatibility level")
    passthrough = [False] * 5
    passthrough[DISCARD_NEVER] = False
    passthrough[DISCARD_ALWAYS] = True
    passthrough[DISCARD_REQUEST] = (options.pass_discard_request
                                    if options.pass_discard_request is not None else unmap)
    passthrough[DISCARD_SNAPSHOT] = (options.pass_discard_snapshot
                                     if options.pass_discard_snapshot is not None else True)
    passthrough[DISCARD_OTHER] = bool(options.pass_discard_other)
    return RuntimeOptions(l2_tables, refcount_blocks, interval, lazy,
                          _overlap_checks(options.overlap_check), tuple(passthrough),
                          bool(options.discard_no_unref))


def _overlap_checks(value: Any) -> int:
    """The overlap-check alternate: a template name or flags over a template."""
    if value is None:
        return OL_CACHED
    if isinstance(_value(value), str):
        return _TEMPLATES[_value(value)]
    template = _TEMPLATES[_value(value.template) if value.template is not None else "cached"]
    result = 0
    for bit, attr in enumerate(_FLAG_ATTRS):
        flag = getattr(value, attr)
        enabled = bool(flag) if flag is not None else bool(template & (1 << bit))
        result |= enabled << bit
    return result
