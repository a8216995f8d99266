"""Drained sections and the graph lock.

A request counts as in flight on the node it is addressed to (qsd.block.io) and on the
BlockBackend it entered through, from its first instruction to its last (two C-level
``itertools.count`` steps, atomic under the GIL, no lock on the hot path).
``drained_begin`` quiesces the drained nodes and every node above them: each owner of an
edge into them hears ``child_drained_begin`` once (exports detach their request sources;
requests that slip in wait in BlockBackend until the end), each driver its
``drained_begin``; then the main loop polls, without blocking, until no node of the
section has requests in flight and no owner reports pending work (``child_drained_poll``),
across all threads.  A driver's own background work counts as in flight too (see
``BlockNode.start_background``), so drain waits for metadata I/O.

The graph write lock is what a graph change holds after draining (QEMU's order, seed 004:
never drain while holding it).  I/O holds the read side implicitly: a request is in
flight on a node that is not drained, and the writer only touches nodes that are drained
and idle, so readers never see a half-made change and the read side costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

from qsd.block.node import BlockNode, Child

_POLL_MAX = 0.002


class GraphLock:
    """Exclusive right to change the graph; main loop only, never held across a drain."""

    def __init__(self) -> None:
        self.held = False

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        if self.held:
            raise RuntimeError("graph write lock taken recursively")
        self.held = True
        try:
            yield
        finally:
            self.held = False


def ancestors(nodes: Iterable[BlockNode]) -> list[BlockNode]:
    """The nodes and every node above them (whose requests may reach them)."""
    seen: dict[int, BlockNode] = {}
    todo = list(nodes)
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen[id(node)] = node
        todo.extend(c.parent_node for c in node.parents if c.parent_node is not None)
    return list(seen.values())


def parent_drained_begin(child: Child) -> None:
    """Tells the owner of ``child`` to stop, once per drained period of the node."""
    if not child.quiesced:
        child.quiesced = True
        child.parent.child_drained_begin(child)


def parent_drained_end(child: Child) -> None:
    if child.quiesced:
        child.quiesced = False
        child.parent.child_drained_end(child)


async def poll_while(busy: Callable[[], bool]) -> None:
    """Yields to the loop until ``busy()`` is false, backing off up to 2 ms."""
    delay = 0.0
    while busy():
        await asyncio.sleep(delay)
        delay = min(_POLL_MAX, delay * 2 + 0.00005)


def _busy(nodes: list[BlockNode]) -> bool:
    for node in nodes:
        if node.in_flight():
            return True
        for child in node.parents:
            if child.parent.child_drained_poll(child):
                return True
    return False


class Section:
    """What one drained_begin() quiesced, so drained_end() undoes exactly that."""

    def __init__(self, nodes: list[BlockNode]) -> None:
        self.nodes = nodes


async def drained_begin(lock: GraphLock, nodes: Iterable[BlockNode]) -> Section:
    """Quiesces everything that can send requests to ``nodes`` and waits until idle."""
    if lock.held:
        raise RuntimeError("drain while holding the graph write lock")
    section = Section(ancestors(nodes))
    for node in section.nodes:
        node.quiesce_counter += 1
        if node.quiesce_counter == 1:
            for child in list(node.parents):
                parent_drained_begin(child)
            node.drained_begin()
    try:
        await poll_while(lambda: _busy(section.nodes))
    except BaseException:
        drained_end(section)
        raise
    return section


def drained_end(section: Section) -> None:
    """Resumes what drained_begin() quiesced, in reverse order."""
    for node in reversed(section.nodes):
        node.quiesce_counter -= 1
        if node.quiesce_counter == 0:
            node.drained_end()
            for child in list(node.parents):
                parent_drained_end(child)


@contextlib.asynccontextmanager
async def drained(lock: GraphLock, nodes: Iterable[BlockNode]) -> AsyncIterator[None]:
    """A drained section over ``nodes`` and everything above them."""
    section = await drained_begin(lock, nodes)
    try:
        yield
    finally:
        drained_end(section)
