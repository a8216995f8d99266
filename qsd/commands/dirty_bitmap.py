"""The block-dirty-bitmap-* commands and their transaction actions (QEMU's
block/monitor/bitmap-qmp-cmds.c and the bitmap actions of blockdev.c: checks in QEMU's
order, its texts).  Each command is its action run alone (transaction.run_single)."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from qsd.block import dirty_bitmap
from qsd.block.dirty_bitmap import ALLOW_RO, BUSY, DEFAULT, READONLY, DirtyBitmap
from qsd.block.node import BlockNode
from qsd.commands.registry import command
from qsd.commands.transaction import Steps, action, run_single
from qsd.errors import QMPError
from qsd.qapi.generated import (
    BlockDirtyBitmap,
    BlockDirtyBitmapAdd,
    BlockDirtyBitmapAddArgs,
    BlockDirtyBitmapClearArgs,
    BlockDirtyBitmapDisableArgs,
    BlockDirtyBitmapEnableArgs,
    BlockDirtyBitmapMerge,
    BlockDirtyBitmapMergeArgs,
    BlockDirtyBitmapRemoveArgs,
)

if TYPE_CHECKING:
    from qsd.daemon import Daemon


def lookup(daemon: Daemon, node_name: str, name: str) -> tuple[BlockNode, DirtyBitmap]:
    """QEMU's block_dirty_bitmap_lookup()."""
    node = daemon.graph.find_node(node_name)
    if node is None:
        raise QMPError(f"Node '{node_name}' not found")
    bitmap = dirty_bitmap.find(node, name)
    if bitmap is None:
        raise QMPError(f"Dirty bitmap '{name}' not found")
    return node, bitmap


@action("block-dirty-bitmap-add")
async def add_action(daemon: Daemon, args: BlockDirtyBitmapAdd, steps: Steps) -> None:
    if not args.name:
        raise QMPError("Bitmap name cannot be empty")
    node = daemon.graph.find_node(args.node)
    if node is None:
        raise QMPError(f"Cannot find device='{args.node}' nor node-name='{args.node}'")
    if args.granularity is not None:
        granularity = args.granularity
        if granularity < 512 or granularity & (granularity - 1):
            raise QMPError("Granularity must be power of 2 and at least 512")
    else:
        granularity = dirty_bitmap.default_granularity(node)
    if args.persistent:
        await node.can_store_bitmap(args.name, granularity)
    bitmap = dirty_bitmap.create(node, granularity, args.name)
    steps.add(abort=functools.partial(dirty_bitmap.release, bitmap))
    bitmap.disabled = bool(args.disabled)
    bitmap.persistent = bool(args.persistent)


@action("block-dirty-bitmap-remove")
async def remove_action(daemon: Daemon, args: BlockDirtyBitmap, steps: Steps) -> None:
    node, bitmap = lookup(daemon, args.node, args.name)
    bitmap.check(BUSY | READONLY)
    if bitmap.stored:
        await node.remove_persistent_bitmap(args.name)
    bitmap.skip_store = bitmap.busy = True

    def undo() -> None:
        bitmap.skip_store = bitmap.busy = False

    def release() -> None:
        bitmap.busy = False
        dirty_bitmap.release(bitmap)

    steps.add(abort=undo, commit=release)


@action("block-dirty-bitmap-clear")
async def clear_action(daemon: Daemon, args: BlockDirtyBitmap, steps: Steps) -> None:
    _, bitmap = lookup(daemon, args.node, args.name)
    bitmap.check(DEFAULT)
    steps.add(abort=functools.partial(bitmap.restore, bitmap.clear()))


@action("block-dirty-bitmap-enable")
async def enable_action(daemon: Daemon, args: BlockDirtyBitmap, steps: Steps) -> None:
    _, bitmap = lookup(daemon, args.node, args.name)
    bitmap.check(ALLOW_RO)
    steps.add(abort=functools.partial(setattr, bitmap, "disabled", bitmap.disabled))
    bitmap.disabled = False


@action("block-dirty-bitmap-disable")
async def disable_action(daemon: Daemon, args: BlockDirtyBitmap, steps: Steps) -> None:
    _, bitmap = lookup(daemon, args.node, args.name)
    bitmap.check(ALLOW_RO)
    steps.add(abort=functools.partial(setattr, bitmap, "disabled", bitmap.disabled))
    bitmap.disabled = True


@action("block-dirty-bitmap-merge")
async def merge_action(daemon: Daemon, args: BlockDirtyBitmapMerge, steps: Steps) -> None:
    """QEMU's block_dirty_bitmap_merge(): the sources are merged into an anonymous
    bitmap first, so that a failing source leaves the target unchanged."""
    node, target = lookup(daemon, args.node, args.target)
    anon = dirty_bitmap.create(node, target.granularity, None)
    try:
        for source in args.bitmaps:
            if isinstance(source, str):
                src = dirty_bitmap.find(node, source)
                if src is None:
                    raise QMPError(f"Dirty bitmap '{source}' not found")
            else:
                _, src = lookup(daemon, source.node, source.name)
            dirty_bitmap.merge_checked(anon, src)
        old = dirty_bitmap.merge_checked(target, anon)
    finally:
        dirty_bitmap.release(anon)
    steps.add(abort=functools.partial(target.restore, old))


@command("block-dirty-bitmap-add")
async def block_dirty_bitmap_add(daemon: Daemon, args: BlockDirtyBitmapAddArgs) -> None:
    await run_single(daemon, "block-dirty-bitmap-add", args)


@command("block-dirty-bitmap-remove")
async def block_dirty_bitmap_remove(daemon: Daemon, args: BlockDirtyBitmapRemoveArgs) -> None:
    await run_single(daemon, "block-dirty-bitmap-remove", args)


@command("block-dirty-bitmap-clear")
async def block_dirty_bitmap_clear(daemon: Daemon, args: BlockDirtyBitmapClearArgs) -> None:
    await run_single(daemon, "block-dirty-bitmap-clear", args)


@command("block-dirty-bitmap-enable")
async def block_dirty_bitmap_enable(daemon: Daemon, args: BlockDirtyBitmapEnableArgs) -> None:
    await run_single(daemon, "block-dirty-bitmap-enable", args)


@command("block-dirty-bitmap-disable")
async def block_dirty_bitmap_disable(daemon: Daemon,
                                     args: BlockDirtyBitmapDisableArgs) -> None:
    await run_single(daemon, "block-dirty-bitmap-disable", args)


@command("block-dirty-bitmap-merge")
async def block_dirty_bitmap_merge(daemon: Daemon, args: BlockDirtyBitmapMergeArgs) -> None:
    await run_single(daemon, "block-dirty-bitmap-merge", args)
