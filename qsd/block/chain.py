"""Walking a backing chain: the questions the block jobs ask about one.

A chain runs from a node down through filtered children (filters) and COW children
(backing files).  These are QEMU's helpers of the same names; they only read the graph.
"""

from __future__ import annotations

import os

from qsd.block.node import BlockNode


def filter_or_cow(node: BlockNode) -> BlockNode | None:
    """The next node down the chain (QEMU's bdrv_filter_or_cow_bs)."""
    child = node.filter_or_cow_child()
    return child.node if child is not None else None


def skip_filters(node: BlockNode) -> BlockNode:
    """The first node at or below ``node`` that is not a filter."""
    while True:
        child = node.filtered_child()
        if child is None:
            return node
        node = child.node


def backing_chain_next(node: BlockNode) -> BlockNode | None:
    """The next image below ``node``, filters skipped on both sides."""
    cow = skip_filters(node).cow_child()
    return skip_filters(cow.node) if cow is not None else None


def chain_contains(top: BlockNode, base: BlockNode) -> bool:
    """Whether ``base`` is ``top`` or below it in ``top``'s chain."""
    node: BlockNode | None = top
    while node is not None:
        if node is base:
            return True
        node = filter_or_cow(node)
    return False


def find_overlay(active: BlockNode, node: BlockNode) -> BlockNode | None:
    """The image in ``active``'s chain right above ``node`` (QEMU's bdrv_find_overlay)."""
    wanted = skip_filters(node)
    current: BlockNode | None = skip_filters(active)
    while current is not None:
        below = backing_chain_next(current)
        if below is wanted:
            return current
        current = below
    return None


def find_base(node: BlockNode) -> BlockNode:
    """The bottom image of the chain (the node itself without a backing file; QEMU's
    bdrv_find_base)."""
    current = node
    while (below := backing_chain_next(current)) is not None:
        current = below
    return current


def _has_protocol(name: str) -> bool:
    """Whether ``name`` starts with ``protocol:`` (a colon before any slash)."""
    for char in name:
        if char in ":/":
            return char == ":"
    return False


def _realpath(path: str) -> str | None:
    return os.path.realpath(path) if os.path.exists(path) else None


def find_backing_image(node: BlockNode, name: str) -> BlockNode | None:
    """The image of ``node``'s chain that ``name`` names as a backing file, compared as
    QEMU's bdrv_find_backing_image() compares: with the backing node's filename where
    the chain was put together by hand, else as the header's name or the canonical path
    it resolves to relative to the image above."""
    current = skip_filters(node)
    while current.cow_child() is not None:
        below = backing_chain_next(current)
        assert below is not None
        if current.backing_overridden():
            if name == below.filename:
                return below
        elif _has_protocol(name) or _has_protocol(current.backing_file):
            if name == current.backing_file:
                return below
        else:
            wanted = name if os.path.isabs(name) else os.path.join(current.dirname(), name)
            full = _realpath(wanted)
            recorded = _realpath(current.full_backing_filename())
            if full is not None and full == recorded:
                return below
        current = below
    return None
