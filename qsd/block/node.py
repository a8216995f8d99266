"""BlockNode and Child: a node of the block graph and the edges below it.

QEMU's BlockDriverState and BdrvChild.  A node is an instance of a driver class (one
module under ``drivers/`` that registers itself, see registry.py); it owns the driver's
state, its ``children`` (the edges to the nodes it uses) and knows its ``parents`` (the
edges of its users: parent nodes, BlockBackends, later jobs).  Each edge is a ``Child``
with a name, a role and the permissions its parent holds; whoever owns an edge is a
``ChildParent`` and hears about what happens below it (drain, iothread moves, resizes).

Requests never call a driver directly: they enter ``qsd.block.io`` through a child edge,
which counts them, shapes them to the node's limits and calls the driver's ``do_*``
primitives.  The inline ``*_nowait`` paths are the exception, bound once by BlockBackend
for requests that complete at once.

Only the graph module (graph.py) links and unlinks edges.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import itertools
import json
import os
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple, Protocol, TypeVar

from qsd.block.limits import BDRV_MAX_LENGTH, BDRV_SECTOR_SIZE, BlockLimits
from qsd.block.permissions import PERM_ALL, ChildRole, default_child_perm
from qsd.block.tracking import RequestTracker
from qsd.errors import QMPError
from qsd.qapi.hashorder import qdict_order

if TYPE_CHECKING:
    from qsd.aio import AioContext
    from qsd.block.dirty_bitmap import DirtyBitmap

T = TypeVar("T")

# What write requests accept: any contiguous byte buffer (a FUSE request's memoryview).
Data = bytes | bytearray | memoryview

# BDRV_BLOCK_* flags of block_status(), QEMU's values.
BLOCK_DATA = 0x01
BLOCK_ZERO = 0x02
BLOCK_OFFSET_VALID = 0x04
BLOCK_RAW = 0x08
BLOCK_ALLOCATED = 0x10
BLOCK_EOF = 0x20
BLOCK_RECURSE = 0x40      # ask the file below whether the data are zeroes

# Measured on the 2-CPU target with 32 concurrent 4 KiB requests: page-cache preads reach
# 37.8k/s with 16 workers, 32.2k/s with 4, 22.7k/s with 32 and 21.1k/s with 64 (GIL
# hand-offs grow with the pool); O_DIRECT random reads are 6.6-7.3k/s for any size.
POOL_WORKERS = 16
_pool: concurrent.futures.ThreadPoolExecutor | None = None


def io_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The thread pool shared by every node for system calls that may block."""
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(POOL_WORKERS, "qsd-io")
    return _pool


async def in_pool(fn: Callable[..., T], *args: Any) -> T:
    """Runs a blocking call in the pool and awaits it from whatever loop is running."""
    return await asyncio.get_running_loop().run_in_executor(io_pool(), fn, *args)


def count_value(counter: itertools.count[int]) -> int:
    """The next value an itertools.count would return, read without advancing it.

    Requests are counted with two counts (started, done): ``next()`` is one C call,
    atomic under the GIL from any thread, so the hot path needs no lock.  ``repr`` is a
    count's only public view of its state (``__reduce__`` is gone in 3.14); the counts
    start at 0 with step 1, so the repr is always ``count(N)``.
    """
    return int(repr(counter)[6:-1])


class BlockStatus(NamedTuple):
    """One block-status answer: ``flags`` (BLOCK_*) hold for ``length`` bytes; with
    BLOCK_OFFSET_VALID the data lives at ``offset`` in node ``file``."""

    flags: int
    length: int
    offset: int = 0
    file: BlockNode | None = None


class NodeOptions:
    """The options common to every driver (QAPI BlockdevOptions base), after defaults."""

    def __init__(self, *, read_only: bool = False, auto_read_only: bool = False,
                 force_share: bool = False, detect_zeroes: str = "off",
                 discard: str = "ignore", cache_direct: bool = False,
                 cache_no_flush: bool = False) -> None:
        self.read_only = read_only
        self.auto_read_only = auto_read_only
        self.force_share = force_share
        self.detect_zeroes = detect_zeroes
        self.discard = discard
        self.cache_direct = cache_direct
        self.cache_no_flush = cache_no_flush


class ChildParent(Protocol):
    """Whoever owns a child edge: a parent node, a BlockBackend, later a job.

    QEMU's BdrvChildClass.  The graph and drain code call these on the owner of every
    edge into a node they work on; implementations must be quick and must not change
    the graph.  Owners subclass this to start from the defaults: nothing to stop, nothing
    pending, any iothread is fine, nothing to follow.
    """

    def child_description(self, child: Child) -> str:
        """How permission errors name the owner: ``node 'x'``, ``an unnamed block
        device``."""
        ...

    def child_drained_begin(self, child: Child) -> None:
        """Stop sending new requests to ``child`` until child_drained_end (main loop)."""
        return None

    def child_drained_end(self, child: Child) -> None:
        return None

    def child_drained_poll(self, child: Child) -> bool:
        """Whether requests of this owner are still on their way (drain waits)."""
        return False

    def child_aio_context_check(self, child: Child, ctx: AioContext) -> str | None:
        """Why the node below must not move to ``ctx`` (an error text), or None."""
        return None

    async def child_aio_context_changed(self, child: Child, ctx: AioContext) -> None:
        """The node below moved to ``ctx`` (main loop, drained, graph unlocked)."""
        return None

    def child_resized(self, child: Child) -> None:
        """The node below changed its length (any thread)."""
        return None

    def child_changed(self, child: Child) -> None:
        """Something below changed that bindings to its fast paths depend on."""
        return None

    def child_peers(self, child: Child) -> list[BlockNode]:
        """Other nodes that must stay in the AioContext of the node below (a job's
        nodes move between iothreads together, QEMU's child_job_change_aio_ctx)."""
        return []

    def child_op_blocker(self, child: Child) -> str | None:
        """Why operations on the node below are refused while this owner uses it (QEMU's
        op blockers: a block job's), or None."""
        return None


class ChildOpener(Protocol):
    """What a driver's ``open`` uses to get its children (implemented by the graph), the
    daemon's ``objects`` (by id) for the secrets a driver is named, and the other nodes."""

    @property
    def objects(self) -> Mapping[str, object]: ...

    def find_node(self, name: str) -> BlockNode | None:
        """An opened node by name (options that name nodes besides children)."""
        ...

    async def open_child(self, parent: BlockNode, ref: Any, name: str,
                         role: ChildRole) -> Child:
        """Links the node that ``ref`` names or defines below ``parent``."""
        ...


class Child:
    """One edge of the graph: ``parent`` uses ``node`` as its ``name`` child (QEMU's
    BdrvChild).  ``parent_node`` is the parent when it is a node, else None."""

    __slots__ = ("parent", "parent_node", "name", "node", "role", "perm", "shared",
                 "quiesced")

    def __init__(self, parent: ChildParent, name: str, node: BlockNode, role: ChildRole,
                 perm: int = 0, shared: int = PERM_ALL) -> None:
        self.parent = parent
        self.parent_node = parent if isinstance(parent, BlockNode) else None
        self.name = name
        self.node = node
        self.role = role
        self.perm = perm
        self.shared = shared
        # Whether the parent was told to stop for a drain of ``node`` (QEMU's
        # quiesced_parent): keeps begin/end balanced when edges come and go meanwhile.
        self.quiesced = False

    def describe(self) -> str:
        return self.parent.child_description(self)

    def __repr__(self) -> str:
        return f"<Child {self.name!r} of {self.describe()} -> {self.node.node_name!r}>"


# A before-write hook: awaited with (node, offset, length) before any write, zero-write
# or discard reaches the node's driver (dirty bitmaps, copy-before-write).
BeforeWrite = Callable[["BlockNode", int, int], Awaitable[None]]


def _qdict_json(value: object) -> object:
    if isinstance(value, dict):
        return {key: _qdict_json(value[key]) for key in qdict_order(value)}
    return value


class BlockNode(ChildParent):
    """Driver-independent state of a node and the interface every driver implements.

    A driver subclass declares itself with class attributes and ``@register`` (see
    registry.py), sets itself up in ``open`` and implements the ``do_*`` primitives it
    supports; the ones it leaves alone keep the defaults here, which behave like QEMU's
    absent callbacks.
    """

    # -- what a driver declares ------------------------------------------------------------
    is_filter: ClassVar[bool] = False         # presents its file/backing child unchanged
    is_format: ClassVar[bool] = False         # interprets its file child's bytes
    is_protocol: ClassVar[bool] = False       # data lives in the node itself (a file, ...)
    supports_backing: ClassVar[bool] = False  # may have a COW ("backing") child
    strong_options: ClassVar[tuple[str, ...]] = ()  # options that change the data seen

    def __init__(self, node_name: str, driver: str, opts: NodeOptions, ctx: AioContext,
                 explicit: dict[str, object]) -> None:
        self.node_name = node_name
        self.driver = driver
        self.opts = opts
        self.read_only = opts.read_only
        self.force_share = opts.force_share
        self.ctx = ctx
        # The options as given (wire names), for json: filenames of strong options.
        self.explicit = explicit
        self.parents: list[Child] = []       # newest first, like QEMU's lists
        self.children: list[Child] = []      # newest first
        self.monitor_owned = False
        # QEMU's bs->drv == NULL: a driver gave up on the node (a qcow2 image found
        # corrupt); its requests fail and queries refuse it.
        self.ejected = False
        self.opened = False     # set by the graph once open() and its checks succeeded
        self.closed = False
        self.quiesce_counter = 0
        self.bl = BlockLimits()
        # The backing file the image header records (QEMU's bs->backing_file) and its
        # format; formats with backing files fill them in when they open.
        self.backing_file = ""
        self.backing_format = ""
        self.before_write: list[BeforeWrite] = []
        # Newest first; qsd.block.io marks them after each write (dirty_bitmap.py).
        self.dirty_bitmaps: list[DirtyBitmap] = []
        # While positive (a stream job copies into the node), every request is tracked,
        # so that copy-on-read can serialise against it (QEMU's bs->copy_on_read).
        self.copy_on_read = 0
        self._length = 0
        # The end of the highest write request so far (query-blockstats).
        self.wr_highest_offset = 0
        # Requests in flight, counted by qsd.block.io (see count_value).
        self.requests_started = itertools.count()
        self.requests_done = itertools.count()
        self.tracker = RequestTracker()

    # ---- the driver's part: open and describe -------------------------------------------

    async def open(self, options: Any, children: ChildOpener) -> None:
        """Opens the driver from its validated options model; links children through
        ``children``.  Raise QMPError with QEMU's text on failure."""

    async def inactivate(self) -> None:
        """Writes back what the driver caches, before its children go (QEMU's
        bdrv_inactivate as part of bdrv_close); errors are the driver's to report."""

    def close(self) -> None:
        """Releases the driver's resources (fds, locks); the node is unlinked already."""

    def get_length(self) -> int:
        """The driver's idea of the node's length in bytes (before sector rounding)."""
        child = self.filtered_child()
        if child is None:
            raise NotImplementedError
        return child.node.length()

    def driver_limits(self, bl: BlockLimits) -> None:
        """Adjusts the limits inherited from the children (QEMU's bdrv_refresh_limits)."""

    def exact_filename(self) -> str:
        """A plain filename that opens this very node again, "" if there is none.

        By default a format without strong options of its own takes the filename of its
        primary child when that is a protocol node (QEMU's bdrv_refresh_filename()).
        """
        primary = self.primary_child()
        if (primary is not None and not self.is_filter and primary.node.is_protocol
                and not self.has_strong_options() and not self.backing_overridden()):
            return primary.node.exact_filename()
        return ""

    def backing_overridden(self) -> bool:
        """Whether the backing child is not the one the image header names."""
        cow = self.cow_child()
        if cow is None:
            return bool(self.backing_file)
        return cow.node.filename != self.full_backing_filename()

    def full_backing_filename(self) -> str:
        """The header's backing file name resolved against this image's directory."""
        if not self.backing_file or os.path.isabs(self.backing_file):
            return self.backing_file
        return os.path.join(self.dirname(), self.backing_file)

    def dirname(self) -> str:
        """The directory relative backing file names start from (QEMU's bdrv_dirname):
        the primary child's, down to the protocol node's file."""
        primary = self.primary_child()
        if primary is not None:
            return primary.node.dirname()
        return os.path.dirname(self.exact_filename())

    def allocated_size(self) -> int:
        """Bytes the image occupies on its storage (query: actual-size), or a negative
        errno where the storage cannot tell (QEMU's -ENOTSUP: no actual-size then)."""
        primary = self.primary_child()
        return primary.node.allocated_size() if primary is not None else 0

    def has_info(self) -> bool:
        """Whether the driver answers QEMU's bdrv_get_info (the query's dirty-flag):
        formats pass the question on to their file child, protocols answer."""
        primary = self.primary_child()
        return primary.node.has_info() if primary is not None else self.is_protocol

    def get_info(self) -> dict[str, object]:
        """QEMU's bdrv_get_info() as query-named-block-nodes shows it (BlockNodeInfo's
        ``cluster-size`` and ``dirty-flag``), for drivers that answer it (``has_info``)."""
        return {"dirty-flag": False}

    def format_specific(self) -> dict[str, object] | None:
        """QAPI ImageInfoSpecific, for drivers that have something to say."""
        return None

    def snapshot_list(self) -> list[dict[str, object]]:
        """The image's internal snapshots as QAPI SnapshotInfo (query: snapshots)."""
        return []

    def specific_stats(self) -> dict[str, object] | None:
        """QAPI BlockStatsSpecific (query-blockstats), for drivers that count more."""
        return None

    async def can_store_bitmap(self, name: str, granularity: int) -> None:
        """QMPError unless the image can keep a new persistent dirty bitmap (QEMU's
        bdrv_can_store_new_dirty_bitmap); formats that store bitmaps override it."""
        raise QMPError(f"Can't store persistent bitmaps to {self.node_name}: "
                       f"{os.strerror(errno.ENOTSUP)}")

    async def remove_persistent_bitmap(self, name: str) -> None:
        """Drops a stored bitmap from the image; absence is no error (one added since
        the image was opened is not stored yet)."""

    def wrote_to(self, end: int) -> None:
        """A write request to this node ended at ``end`` (QEMU's wr_highest_offset)."""
        if end > self.wr_highest_offset:
            self.wr_highest_offset = end

    # ---- the driver's part: permissions --------------------------------------------------

    def child_perm(self, child: Child, perm: int, shared: int) -> tuple[int, int]:
        """What this node needs from ``child`` given what its own parents need."""
        return default_child_perm(child.role, perm, shared, not self.read_only)

    def check_perm(self, perm: int, shared: int) -> None:
        """Prepares the driver for new cumulative permissions (file locks)."""

    def commit_perm(self) -> None:
        pass

    def abort_perm(self) -> None:
        pass

    # ---- the driver's part: requests (called by qsd.block.io only) ---------------------

    async def do_read(self, offset: int, length: int) -> bytes:
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    async def do_write(self, offset: int, data: Data, fua: bool) -> None:
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    async def do_write_zeroes(self, offset: int, length: int, may_unmap: bool,
                              no_fallback: bool, fua: bool) -> None:
        """ENOTSUP makes the block layer write a buffer of zeroes instead (unless the
        caller asked for ``no_fallback``, which a filter passes on to its child)."""
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    async def do_discard(self, offset: int, length: int) -> None:
        """Discard is advisory: ENOTSUP is ignored."""
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    async def do_flush(self) -> None:
        """Writes back this node's own caches; the block layer flushes the children."""

    async def do_truncate(self, length: int, exact: bool, prealloc: str) -> None:
        raise OSError(errno.ENOTSUP, "Image format driver does not support resize")

    async def change_backing_file(self, filename: str, backing_format: str) -> None:
        """Records another backing file (``""``: none) in the image's own metadata, as
        QEMU's bdrv_change_backing_file() does when a job changed the chain."""
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    async def do_block_status(self, want_zero: bool, offset: int, length: int) -> BlockStatus:
        """Status of this layer only, for an aligned range within the node.

        Filters point at their filtered child (BLOCK_RAW: ask there); protocols have
        everything allocated at the same offset in themselves; anything else is data.
        """
        child = self.filtered_child()
        if child is not None:
            return BlockStatus(BLOCK_RAW | BLOCK_OFFSET_VALID, length, offset, child.node)
        if self.is_protocol:
            return BlockStatus(BLOCK_DATA | BLOCK_OFFSET_VALID, length, offset, self)
        return BlockStatus(BLOCK_DATA, length)

    # The snapshot-access API (QEMU's bdrv_co_*_snapshot): a point-in-time view of the
    # data that a filter (copy-before-write) keeps while its users go on writing.

    async def do_read_snapshot(self, offset: int, length: int) -> bytes:
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    async def do_snapshot_block_status(self, want_zero: bool, offset: int,
                                       length: int) -> BlockStatus:
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    async def do_discard_snapshot(self, offset: int, length: int) -> None:
        """The snapshot's reader no longer needs the range: what was kept may go."""
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        """The data if it can be had without blocking, else None."""
        return None

    def write_nowait(self, offset: int, data: Data, fua: bool = False) -> bool:
        """True if written without blocking; False means nothing to rely on, use write()."""
        return False

    def nowait_next(self) -> BlockNode | None:
        """The node whose fast paths stand for this one's (pass-through filters), else
        None.  BlockBackend follows these links once when it binds its fast paths."""
        return None

    def debug_event(self, event: str) -> None:
        """A BlkdebugEvent happened on this node (QEMU's bdrv_debug_event): the block
        layer and the drivers above raise them as requests pass; blkdebug acts on them."""

    def drained_begin(self) -> None:
        """Stops the driver's own request sources (timers) for a drained section."""

    def drained_end(self) -> None:
        pass

    def attach_aio_context(self, ctx: AioContext) -> None:
        """The node now runs in ``ctx`` (drained; re-arm timers or fd handlers there)."""

    # ---- node state ------------------------------------------------------------------------

    def describe(self) -> str:
        """How QEMU names this node as a parent in permission errors."""
        return f"node '{self.node_name}'"

    def length(self) -> int:
        """The cached length, a multiple of 512 as in QEMU (its total_sectors)."""
        return self._length

    def refresh_length(self) -> None:
        """Asks the driver again (open, truncate, a child resized); OSError(EFBIG) past
        the block layer's maximum."""
        total = -(-self.get_length() // BDRV_SECTOR_SIZE) * BDRV_SECTOR_SIZE
        if total > BDRV_MAX_LENGTH:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG))
        if total != self._length:
            self._length = total
            for bitmap in self.dirty_bitmaps:
                bitmap.resize(total)
            for child in list(self.parents):
                child.parent.child_resized(child)

    def grew_to(self, end: int) -> None:
        """A write reached ``end``: a growing write extends the cached length."""
        if end > self._length:
            self._length = -(-end // BDRV_SECTOR_SIZE) * BDRV_SECTOR_SIZE
            for bitmap in self.dirty_bitmaps:
                bitmap.resize(self._length)
            for child in list(self.parents):
                child.parent.child_resized(child)

    def refresh_limits(self) -> None:
        """Limits from the data, filtered and COW children, then the driver's say."""
        bl = BlockLimits()
        inherited = False
        for child in self.children:
            if child.role & (ChildRole.DATA | ChildRole.FILTERED | ChildRole.COW):
                bl.merge(child.node.bl)
                inherited = True
        if not inherited:
            bl.set_leaf_defaults()
        self.driver_limits(bl)
        self.bl = bl

    def in_flight(self) -> int:
        """Requests on this node (counted by qsd.block.io) not finished yet."""
        done = count_value(self.requests_done)
        return count_value(self.requests_started) - done

    def start_background(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Runs a driver's own work (metadata updates) as a task in the running loop,
        counted in flight from now until it ends, so that drain waits for it."""
        next(self.requests_started)
        task = asyncio.get_running_loop().create_task(coro)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[None]) -> None:
        next(self.requests_done)

    def add_before_write(self, hook: BeforeWrite) -> None:
        self.before_write.append(hook)
        self.notify_changed()

    def remove_before_write(self, hook: BeforeWrite) -> None:
        self.before_write.remove(hook)
        self.notify_changed()

    def writes_inline(self) -> bool:
        """Whether a parent's inline write path may write here directly: no hook runs
        before a write and no bitmap records it."""
        return not self.before_write and not self.dirty_bitmaps

    def notify_changed(self) -> None:
        """Tells every owner above that fast-path bindings must be made again."""
        for child in list(self.parents):
            child.parent.child_changed(child)

    # ---- children --------------------------------------------------------------------------

    def child(self, name: str) -> Child | None:
        for child in self.children:
            if child.name == name:
                return child
        return None

    @property
    def file(self) -> Child | None:
        return self.child("file")

    @property
    def backing(self) -> Child | None:
        return self.child("backing")

    def filtered_child(self) -> Child | None:
        """The child a filter driver presents (QEMU's bdrv_filter_child)."""
        if not self.is_filter:
            return None
        return self.backing or self.file

    def cow_child(self) -> Child | None:
        """The backing child of a format with a backing file (QEMU's bdrv_cow_child)."""
        backing = self.backing
        if backing is not None and backing.role & ChildRole.COW:
            return backing
        return None

    def filter_or_cow_child(self) -> Child | None:
        return self.filtered_child() or self.cow_child()

    def primary_child(self) -> Child | None:
        for child in self.children:
            if child.role & ChildRole.PRIMARY:
                return child
        return None

    # ---- filenames ---------------------------------------------------------------------------

    def has_strong_options(self) -> bool:
        return any(key in self.explicit for key in self.strong_options)

    def full_open_options(self) -> dict[str, object]:
        """The options that recreate this node's data: the driver, its strong options
        and its children's (QEMU's full_open_options)."""
        opts: dict[str, object] = {"driver": self.driver}
        for key in ("filename", *self.strong_options):
            if key in self.explicit:
                opts[key] = self.explicit[key]
        for child in self.children:
            if child is self.cow_child() and not self.backing_overridden():
                continue
            opts[child.name] = child.node.full_open_options()
        if self.cow_child() is None and self.backing_overridden():
            opts["backing"] = None
        return opts

    @property
    def filename(self) -> str:
        """The exact filename, or a ``json:`` filename of the full open options."""
        exact = self.exact_filename()
        if exact:
            return exact
        return "json:" + json.dumps(_qdict_json(self.full_open_options()))

    # ---- as the owner of its children edges (a drain of a child covers this node too:
    # drain.py quiesces every ancestor; the graph moves connected nodes together) -------

    def child_description(self, child: Child) -> str:
        return self.describe()

    def child_resized(self, child: Child) -> None:
        self.refresh_length()

    def child_changed(self, child: Child) -> None:
        self.notify_changed()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node_name!r}>"


def is_zero(data: Data) -> bool:
    """Whether a write only carries zeroes (detect-zeroes); one allocation and a memcmp."""
    return data == bytes(len(data))


def strerror_oserror(exc: OSError, prefix: str) -> OSError:
    """An OSError with the same errno whose text is QEMU's ``prefix: strerror``."""
    return OSError(exc.errno, f"{prefix}: {os.strerror(exc.errno or 0)}")
