"""BlockBackend: how exports and commands use a node (QEMU's BlockBackend).

It holds a ``root`` edge with the user's permissions, counts its requests in flight for
drain, queues requests that arrive while drained, and binds the node's fast paths once so
that ``read_nowait``/``write_nowait`` are two counter steps, one flag test and the driver
call.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn

from qsd.block import permissions
from qsd.block.node import Data
from qsd.block.permissions import PERM_WRITE, PERM_WRITE_UNCHANGED, Edge

if TYPE_CHECKING:
    from qsd.block.graph import BlockGraph
    from qsd.block.node import BlockNode

UNNAMED = "an unnamed block device"


def _count_value(counter: itertools.count[int]) -> int:
    """The next value an itertools.count would return, read without advancing it.

    ``repr`` is the count's only public view of its state (``__reduce__`` is gone in 3.14);
    the counters start at 0 with step 1, so the repr is always ``count(N)``.
    """
    return int(repr(counter)[6:-1])


def _no_medium_read(offset: int, length: int) -> bytes | None:
    raise OSError(errno.ENOMEDIUM, "No medium found")


def _no_medium_write(offset: int, data: Data, fua: bool = False) -> bool:
    raise OSError(errno.ENOMEDIUM, "No medium found")


def _no_write(offset: int, data: Data, fua: bool = False) -> bool:
    raise OSError(errno.EPERM, "Operation not permitted")


class _Detached:
    """Stands in for the node after detach(): every request fails with ENOMEDIUM."""

    @staticmethod
    def _fail() -> NoReturn:
        raise OSError(errno.ENOMEDIUM, "No medium found")

    async def read(self, offset: int, length: int) -> bytes:
        self._fail()

    async def write(self, offset: int, data: Data, fua: bool = False) -> None:
        self._fail()

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                           no_fallback: bool = False, fua: bool = False) -> None:
        self._fail()

    async def discard(self, offset: int, length: int) -> None:
        self._fail()

    async def flush(self) -> None:
        self._fail()

    async def truncate(self, length: int, exact: bool = False, prealloc: str = "off") -> None:
        self._fail()

    async def block_status(self, offset: int, length: int) -> tuple[int, int]:
        self._fail()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class BlockBackend:
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
        self._started = itertools.count()
        self._done = itertools.count()
        self._quiesce = 0
        self._quiesced = False
        self._lock = threading.Lock()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._dev_begin: Callable[[], None] | None = None
        self._dev_end: Callable[[], None] | None = None
        self._dev_poll: Callable[[], bool] | None = None
        self.edge = Edge("root", node, lambda: UNNAMED)
        node.parents.insert(0, self.edge)
        try:
            permissions.refresh(node, {self.edge: (perm, shared)})
        except BaseException:
            node.parents.remove(self.edge)
            permissions.refresh(node, {})
            raise
        node.backends.append(self)
        graph.backends.append(self)
        self._io: BlockNode | _Detached = node
        fast = node.nowait_target()
        self._rd_nowait: Callable[[int, int], bytes | None] = fast.read_nowait
        self._wr_nowait: Callable[[int, Data, bool], bool] = fast.write_nowait
        self._can_write = bool(perm & (PERM_WRITE | PERM_WRITE_UNCHANGED))
        if not self._can_write:
            self._wr_nowait = _no_write
        for _ in range(node.quiesce_counter):
            self.drained_begin()
        self._detach_future: asyncio.Future[None] | None = None

    # ---- configuration ---------------------------------------------------------------------

    def set_dev_ops(self, drained_begin: Callable[[], None] | None,
                    drained_end: Callable[[], None] | None,
                    drained_poll: Callable[[], bool] | None = None) -> None:
        """The owner's drain hooks: stop/resume its request sources; poll: still busy?"""
        self._dev_begin, self._dev_end, self._dev_poll = drained_begin, drained_end, drained_poll

    def set_writethrough(self, writethrough: bool) -> None:
        """Every write completes only once on stable storage (QEMU's writethrough mode)."""
        self.writethrough = writethrough

    def set_allow_aio_context_change(self, allow: bool) -> None:
        """Whether x-blockdev-set-iothread/graph moves may move this backend's node."""
        self.allow_aio_context_change = allow

    def set_perm(self, perm: int, shared: int) -> None:
        """Changes this user's permissions; QMPError and no change on conflict."""
        node = self.node
        if node is None:
            raise OSError(errno.ENOMEDIUM, "No medium found")
        permissions.refresh(node, {self.edge: (perm, shared)})
        self.perm, self.shared = perm, shared
        self._can_write = bool(perm & (PERM_WRITE | PERM_WRITE_UNCHANGED))
        self._wr_nowait = node.nowait_target().write_nowait if self._can_write else _no_write

    # ---- hot paths -------------------------------------------------------------------------

    def length(self) -> int:
        node = self.node
        if node is None:
            raise OSError(errno.ENOMEDIUM, "No medium found")
        return node.length()

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
            return self._wr_nowait(offset, data, fua)
        finally:
            next(self._done)

    # ---- asynchronous requests -------------------------------------------------------------

    async def _wait_while_drained(self) -> None:
        """Parks a request that arrived during a drained section until drained_end()."""
        while self._quiesced:
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

    async def read(self, offset: int, length: int) -> bytes:
        next(self._started)
        try:
            if self._quiesced:
                await self._wait_while_drained()
            return await self._io.read(offset, length)
        finally:
            next(self._done)

    async def write(self, offset: int, data: Data, fua: bool = False) -> None:
        next(self._started)
        try:
            if self._quiesced:
                await self._wait_while_drained()
            if not self._can_write:
                _no_write(offset, b"")
            await self._io.write(offset, data, fua or self.writethrough)
        finally:
            next(self._done)

    async def write_zeroes(self, offset: int, length: int, may_unmap: bool = False,
                           no_fallback: bool = False, fua: bool = False) -> None:
        next(self._started)
        try:
            if self._quiesced:
                await self._wait_while_drained()
            if not self._can_write:
                _no_write(offset, b"")
            await self._io.write_zeroes(offset, length, may_unmap, no_fallback,
                                        fua or self.writethrough)
        finally:
            next(self._done)

    async def discard(self, offset: int, length: int) -> None:
        next(self._started)
        try:
            if self._quiesced:
                await self._wait_while_drained()
            if not self._can_write:
                _no_write(offset, b"")
            await self._io.discard(offset, length)
        finally:
            next(self._done)

    async def flush(self) -> None:
        next(self._started)
        try:
            if self._quiesced:
                await self._wait_while_drained()
            await self._io.flush()
        finally:
            next(self._done)

    async def truncate(self, length: int, exact: bool = False, prealloc: str = "off") -> None:
        next(self._started)
        try:
            if self._quiesced:
                await self._wait_while_drained()
            await self._io.truncate(length, exact, prealloc)
        finally:
            next(self._done)

    async def block_status(self, offset: int, length: int) -> tuple[int, int]:
        next(self._started)
        try:
            if self._quiesced:
                await self._wait_while_drained()
            return await self._io.block_status(offset, length)
        finally:
            next(self._done)

    def allocated_size(self) -> int:
        node = self.node
        if node is None:
            raise OSError(errno.ENOMEDIUM, "No medium found")
        return node.allocated_size()

    # ---- drain -------------------------------------------------------------------------------

    def in_flight(self) -> int:
        """Requests started and not finished, summed across all threads."""
        done = _count_value(self._done)
        return _count_value(self._started) - done

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
        self._io = _Detached()
        self._rd_nowait = _no_medium_read
        self._wr_nowait = _no_medium_write
        self._dev_begin = self._dev_end = self._dev_poll = None
        with self._lock:
            self._quiesced = False
            waiters, self._waiters = self._waiters, []
        for wloop, wfut in waiters:
            wloop.call_soon_threadsafe(_wake, wfut)
        if self.in_flight() == 0:
            self._remove()
            fut.set_result(None)
        else:
            task = loop.create_task(self._remove_when_idle())
            self.graph.keep(task)
        return fut

    async def _remove_when_idle(self) -> None:
        await self.graph.wait_idle([self])
        self._remove()
        if self._detach_future is not None and not self._detach_future.done():
            self._detach_future.set_result(None)

    def _remove(self) -> None:
        node = self.node
        if node is None:
            return
        self.node = None
        with self.graph.lock.write():
            node.parents.remove(self.edge)
            node.backends.remove(self)
            self.graph.backends.remove(self)
            permissions.refresh(node, {})

    def __repr__(self) -> str:
        name = self.node.node_name if self.node is not None else None
        return f"<BlockBackend {self.owner or UNNAMED} on {name!r}>"
