"""BlockBackend: how exports and commands use a node (QEMU's BlockBackend).

It owns a ``root`` edge into the node with the user's permissions and is that edge's
parent: it hears about drains (its owner's ``set_dev_ops`` hooks stop the request
sources; requests that arrive anyway wait here until the drain ends) and about moves of
the node to another iothread (``add_aio_context_notifier``).  It counts its requests in
flight, checks them against the node's length and sends them down ``qsd.block.io``.

Its fast paths are bound once (and again whenever something below changes) straight to
the driver of the node that will answer them, skipping pass-through filters, so that
``read_nowait``/``write_nowait`` are two counter steps, one flag test and the driver
call.  Nodes that need aligned requests get no fast path, nodes that run before-write
hooks or copy on read (a stream job) no inline write path; the dirty bitmaps of the
nodes a request passes are marked by a wrapper bound only while there are any, so that
a node without bitmaps pays nothing for them.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import itertools
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, NoReturn

from qsd.block import drain, io
from qsd.block.dirty_bitmap import set_dirty
from qsd.block.limits import BlockLimits
from qsd.block.node import BlockNode, Child, ChildParent, Data, count_value
from qsd.block.permissions import PERM_WRITE, PERM_WRITE_UNCHANGED, ChildRole

if TYPE_CHECKING:
    from qsd.aio import AioContext
    from qsd.block.graph import BlockGraph

UNNAMED = "an unnamed block device"

# Told of a move of the node to another AioContext (main loop, node drained).
AioContextNotifier = Callable[["AioContext"], Awaitable[None] | None]


def _no_medium() -> NoReturn:
    raise OSError(errno.ENOMEDIUM, "No medium found")


def _no_medium_read(offset: int, length: int) -> bytes | None:
    _no_medium()


def _no_medium_write(offset: int, data: Data, fua: bool = False) -> bool:
    _no_medium()


def _no_write(offset: int, data: Data, fua: bool = False) -> bool:
    raise OSError(errno.EPERM, "Operation not permitted")


def _read_waits(offset: int, length: int) -> bytes | None:
    return None


def _write_waits(offset: int, data: Data, fua: bool = False) -> bool:
    return False


def _marking(write: Callable[[int, Data, bool], bool], nodes: tuple[BlockNode, ...]
             ) -> Callable[[int, Data, bool], bool]:
    """``write`` that marks the dirty bitmaps of ``nodes`` once it wrote (or failed)."""
    lists = tuple(node.dirty_bitmaps for node in nodes)   # live: bitmaps come and go

    def write_nowait(offset: int, data: Data, fua: bool = False) -> bool:
        done = False
        try:
            done = write(offset, data, fua)
        except OSError:
            done = True
            raise
        finally:
            if done:
                for bitmaps in lists:
                    set_dirty(bitmaps, offset, len(data))
        return done
    return write_nowait


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class BlockBackend(ChildParent):
    """A user's handle on a node; see docs/ARCHITECTURE.md for the contract."""

    def __init__(self, graph: BlockGraph, node: BlockNode, *, perm: int, shared: int,
                 owner: str = "") -> None:
        self.graph = graph
        self.node: BlockNode | None = node
        self.owner = owner
        self.perm = perm
        self.shared = shared
        self.allow_aio_context_change = True
        self.writethrough = False
        self.request_queuing = True
        self._started = itertools.count()
        self._done = itertools.count()
        self._quiesce = 0
        self._quiesced = False
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._dev_begin: Callable[[], None] | None = None
        self._dev_end: Callable[[], None] | None = None
        self._dev_poll: Callable[[], bool] | None = None
        self._aio_notifiers: list[AioContextNotifier] = []
        self._detach_future: asyncio.Future[None] | None = None
        self._rd_nowait: Callable[[int, int], bytes | None] = _read_waits
        self._wr_nowait: Callable[[int, Data, bool], bool] = _write_waits
        self._wr_chain: tuple[BlockNode, ...] = ()
        self.root: Child | None = None
        self.root = graph.attach_child(self, node, "root",
                                       ChildRole.FILTERED | ChildRole.PRIMARY, perm, shared)
        graph.backends.append(self)
        self._bind()

    # ---- configuration ---------------------------------------------------------------------

    def set_dev_ops(self, drained_begin: Callable[[], None] | None,
                    drained_end: Callable[[], None] | None,
                    drained_poll: Callable[[], bool] | None = None) -> None:
        """The owner's drain hooks: stop/resume its request sources; poll: still busy?"""
        self._dev_begin, self._dev_end, self._dev_poll = drained_begin, drained_end, drained_poll

    def add_aio_context_notifier(self, notifier: AioContextNotifier) -> None:
        """Calls (and awaits, if it returns an awaitable) ``notifier(ctx)`` whenever the
        node moves to another AioContext; runs in the main loop while the node is still
        drained, so the owner can move its request sources before they resume."""
        self._aio_notifiers.append(notifier)

    def set_writethrough(self, writethrough: bool) -> None:
        """Every write completes only once on stable storage (QEMU's writethrough mode)."""
        self.writethrough = writethrough

    def set_allow_aio_context_change(self, allow: bool) -> None:
        """Whether x-blockdev-set-iothread/graph moves may move this backend's node."""
        self.allow_aio_context_change = allow

    def disable_request_queuing(self) -> None:
        """Requests no longer wait for the end of a drained section (QEMU's
        blk_set_disable_request_queuing): for an owner whose drain hooks stop its own
        request sources and whose drained_poll counts what it has already taken, which
        must be able to finish inside the section (a deletion waits for it there)."""
        self.request_queuing = False

    def set_perm(self, perm: int, shared: int) -> None:
        """Changes this user's permissions; QMPError and no change on conflict."""
        if self.root is None:
            _no_medium()
        self.graph.set_child_perm(self.root, perm, shared)
        self.perm, self.shared = perm, shared
        self._bind()

    def _bind(self) -> None:
        """Binds the fast paths to the driver that answers them (see the module doc);
        again whenever something below changed, the root edge's node included."""
        if self.root is None:
            return
        node = self.node = self.root.node
        target = node
        # Before-write hooks and copy-on-read (whose serialising copies only tracked
        # requests wait for) need every write to come through qsd.block.io.
        hooks = bool(node.before_write) or node.copy_on_read > 0
        chain = [node]
        following = node.nowait_next()
        while following is not None:
            target = following
            chain.append(target)
            hooks = hooks or bool(target.before_write) or target.copy_on_read > 0
            following = target.nowait_next()
        self._wr_chain = tuple(chain)
        if target.bl.request_alignment > 1:
            self._rd_nowait, self._wr_nowait = _read_waits, _write_waits
            return
        self._rd_nowait = target.read_nowait
        if not self.perm & (PERM_WRITE | PERM_WRITE_UNCHANGED):
            self._wr_nowait = _no_write
        elif hooks:
            self._wr_nowait = _write_waits
        else:
            marked = tuple(n for n in chain if n.dirty_bitmaps)
            self._wr_nowait = (_marking(target.write_nowait, marked) if marked
                               else target.write_nowait)

    # ---- hot paths -------------------------------------------------------------------------

    def length(self) -> int:
        node = self.node
        if node is None:
            _no_medium()
        return node.length()

    def limits(self) -> BlockLimits:
        """The node's block limits (request alignment and sizes; QEMU's blk_get_*)."""
        node = self.node
        if node is None:
            _no_medium()
        return node.bl

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        next(self._started)
        try:
            if self._quiesced:
                return None
            return self._rd_nowait(offset, length)
        finally:
            next(self._done)

    def write_nowait(self, offset: int, data: Data, fua: bool = False) -> bool:
        next(self._started)
        try:
            if self._quiesced or self.writethrough:
                return False
            if not self._wr_nowait(offset, data, fua):
                return False
            end = offset + len(data)
            for node in self._wr_chain:       # the nodes the request passed (blockstats)
                if end > node.wr_highest_offset:
                    node.wr_highest_offset = end
            return True
        finally:
            next(self._done)

    # ---- asynchronous requests -------------------------------------------------------------

    async def _wait_while_drained(self) -> None:
        """Parks a request that arrived during a drained section until drained_end()."""
        while self._quiesced and self.request_queuing:
            next(self._done)
            try:
                loop = asyncio.get_running_loop()
                fut: asyncio.Future[None] = loop.create_future()
                with self._lock:
                    if not self._quiesced:
                        continue
                    self._waiters.append((loop, fut))
                await fut
            finally:
                next(self._started)

    def _checked(self, offset: int, length: int) -> Child:
        """The root edge, after QEMU's blk_check_byte_request(): EIO outside the node."""
        root = self.root
        if root is None:
            _no_medium()
        size = root.node.length()
        if offset < 0 or length < 0 or offset > size or size - offset < length:
            raise OSError(errno.EIO, "Input/output error")
        return root

    def _writable(self) -> None:
        if not self.perm & (PERM_WRITE | PERM_WRITE_UNCHANGED):
            raise OSError(errno.EPERM, "Operation not permitted")

    async def read(self, offset: int, length: int) -> bytes:
        next(self._started)
        try:
            if self._quiesced:
                await self._wait_while_drained()
            return await io.read(self._checked(offset, length), offset, length)
        finally:
            next(self._done)

    async def write(self, offset: int, data: Data, fua: bool = False) -> None:
        next(self._started)
        try:
            if self._quiesced:
                await self._wait_while_drained()
            root = self._checked(offset, len(data))
            self._writable()
            await io.write(root, offset, data, fua or self.writethrough)
        finally:
            next(self._done)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                           no_fallback: bool = False, fua: bool = False) -> None:
        next(self._started)
        try:
            if self._quiesced:
                await self._wait_while_drained()
            root = self._checked(offset, length)
            self._writable()
            await io.write_zeroes(root, offset, length, may_unmap, no_fallback,
                                  fua or self.writethrough)
        finally:
            next(self._done)

    async def discard(self, offset: int, length: int) -> None:
        next(self._started)
        try:
            if self._quiesced:
                await self._wait_while_drained()
            root = self._checked(offset, length)
            self._writable()
            await io.discard(root, offset, length)
        finally:
            next(self._done)

    async def flush(self) -> None:
        next(self._started)
        try:
            if self._quiesced:
                await self._wait_while_drained()
            if self.root is None:
                _no_medium()
            await io.flush(self.root)
        finally:
            next(self._done)

    async def truncate(self, length: int, exact: bool = False, prealloc: str = "off") -> None:
        next(self._started)
        try:
            if self._quiesced:
                await self._wait_while_drained()
            if self.root is None:
                _no_medium()
            await io.truncate(self.root, length, exact, prealloc)
        finally:
            next(self._done)

    async def block_status(self, offset: int, length: int) -> tuple[int, int]:
        """(BLOCK_* flags, bytes they hold for) of the whole backing chain; see
        io.block_status_above."""
        flags, count, _ = await self.block_status_depth(offset, length)
        return flags, count

    async def block_status_depth(self, offset: int, length: int) -> tuple[int, int, int]:
        """(BLOCK_* flags, bytes, depth of the allocating layer: 1 for the node itself,
        0 where no layer allocates the range)."""
        next(self._started)
        try:
            if self._quiesced:
                await self._wait_while_drained()
            if self.root is None:
                _no_medium()
            status, depth = await io.block_status_above(self.root, offset, length)
            return status.flags, status.length, depth
        finally:
            next(self._done)

    def allocated_size(self) -> int:
        node = self.node
        if node is None:
            _no_medium()
        return node.allocated_size()

    # ---- drain -------------------------------------------------------------------------------

    def in_flight(self) -> int:
        """Requests started and not finished, summed across all threads."""
        done = count_value(self._done)
        return count_value(self._started) - done

    def busy(self) -> bool:
        return self.in_flight() > 0 or (self._dev_poll is not None and self._dev_poll())

    def drained_begin(self) -> None:
        """Main loop: stop new requests (owner's hook first time), nested like QEMU's."""
        self._quiesce += 1
        if self._quiesce == 1:
            with self._lock:
                self._quiesced = True
            if self._dev_begin is not None:
                self._dev_begin()

    def drained_end(self) -> None:
        self._quiesce -= 1
        if self._quiesce == 0:
            with self._lock:
                self._quiesced = False
                waiters, self._waiters = self._waiters, []
            for loop, fut in waiters:
                loop.call_soon_threadsafe(_wake, fut)
            if self._dev_end is not None:
                self._dev_end()

    @property
    def quiesced(self) -> bool:
        return self._quiesced

    # ---- as the owner of the root edge -------------------------------------------------------

    def child_description(self, child: Child) -> str:
        return UNNAMED

    def child_drained_begin(self, child: Child) -> None:
        self.drained_begin()

    def child_drained_end(self, child: Child) -> None:
        self.drained_end()

    def child_drained_poll(self, child: Child) -> bool:
        return self.busy()

    def child_aio_context_check(self, child: Child, ctx: AioContext) -> str | None:
        if self.allow_aio_context_change:
            return None
        return "Cannot change iothread of active block backend"

    async def child_aio_context_changed(self, child: Child, ctx: AioContext) -> None:
        for notifier in list(self._aio_notifiers):
            result = notifier(ctx)
            if inspect.isawaitable(result):
                await result

    def child_changed(self, child: Child) -> None:
        self._bind()

    # ---- detach ------------------------------------------------------------------------------

    def detach(self) -> asyncio.Future[None]:
        """Main loop: new requests fail at once; the edge goes when the last one finished.

        Like QEMU's blk_remove_bs() the node stays in use until in-flight requests are
        done (drain first, then change the graph).  Callers may await the returned future
        to wait for that; not awaiting it is fine too.
        """
        loop = asyncio.get_running_loop()
        if self._detach_future is not None:
            return self._detach_future
        fut: asyncio.Future[None] = loop.create_future()
        self._detach_future = fut
        self._rd_nowait = _no_medium_read
        self._wr_nowait = _no_medium_write
        self._dev_begin = self._dev_end = self._dev_poll = None
        self._aio_notifiers.clear()
        root, self.root = self.root, None
        with self._lock:
            self._quiesced = False
            waiters, self._waiters = self._waiters, []
        for wloop, wfut in waiters:
            wloop.call_soon_threadsafe(_wake, wfut)
        if self.in_flight() == 0:
            self._remove(root)
            fut.set_result(None)
        else:
            task = loop.create_task(self._remove_when_idle(root))
            self.graph.keep(task)
        return fut

    async def _remove_when_idle(self, root: Child | None) -> None:
        await drain.poll_while(lambda: self.in_flight() > 0)
        self._remove(root)
        if self._detach_future is not None and not self._detach_future.done():
            self._detach_future.set_result(None)

    def _remove(self, root: Child | None) -> None:
        if self.node is None:
            return
        self.node = None
        if root is not None:
            with self.graph.lock.write():
                self.graph.detach_child(root)
        self.graph.backends.remove(self)

    def __repr__(self) -> str:
        name = self.node.node_name if self.node is not None else None
        return f"<BlockBackend {self.owner or UNNAMED} on {name!r}>"
