"""Drained sections and the graph lock.

A request counts as in flight on the BlockBackend it entered through from its first
instruction to its last (two C-level ``itertools.count`` steps, atomic under the GIL, no
lock on the hot path).  ``drained_begin`` quiesces every BlockBackend at or above the
drained nodes (their owners' ``drained_begin`` hooks stop new requests; requests that slip
in wait in ``BlockBackend`` until ``drained_end``) and then polls from the main loop,
without blocking it, until nothing is in flight across all threads.

The graph write lock is what a graph change holds after draining (QEMU's order, seed 004:
never drain while holding it).  I/O holds the read side implicitly: a request is in flight
on a non-quiesced backend, and the writer only touches nodes whose backends are quiesced
and idle, so readers never see a half-made change and the read side costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qsd.block.backend import BlockBackend
    from qsd.block.node import BlockNode

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
        todo.extend(e.parent_node for e in node.parents if e.parent_node is not None)
    return list(seen.values())


async def wait_idle(backends: list[BlockBackend]) -> None:
    """Polls until no backend has requests in flight and no owner reports pending work."""
    delay = 0.0
    while any(blk.busy() for blk in backends):
        await asyncio.sleep(delay)
        delay = min(_POLL_MAX, delay * 2 + 0.00005)


class Section:
    """What one drained_begin() quiesced, so drained_end() undoes exactly that."""

    def __init__(self, nodes: list[BlockNode], backends: list[BlockBackend]) -> None:
        self.nodes = nodes
        self.backends = backends


async def drained_begin(lock: GraphLock, nodes: Iterable[BlockNode]) -> Section:
    """Quiesces everything that can send requests to ``nodes`` and waits until idle."""
    if lock.held:
        raise RuntimeError("drain while holding the graph write lock")
    section = Section(ancestors(nodes), [])
    for node in section.nodes:
        node.quiesce_counter += 1
    section.backends = [blk for node in section.nodes for blk in node.backends]
    for blk in section.backends:
        blk.drained_begin()
    try:
        await wait_idle(section.backends)
    except BaseException:
        drained_end(section)
        raise
    return section


def drained_end(section: Section) -> None:
    """Resumes what drained_begin() quiesced, in reverse order."""
    for blk in reversed(section.backends):
        blk.drained_end()
    for node in section.nodes:
        node.quiesce_counter -= 1


@contextlib.asynccontextmanager
async def drained(lock: GraphLock, nodes: Iterable[BlockNode]) -> AsyncIterator[None]:
    """A drained section over ``nodes`` and everything above them."""
    section = await drained_begin(lock, nodes)
    try:
        yield
    finally:
        drained_end(section)
