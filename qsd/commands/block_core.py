"""QMP commands of QEMU's block-core area: thin wrappers around qsd.block."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qsd.aio import main_context
from qsd.block import query
from qsd.block.graph import users
from qsd.commands.registry import command
from qsd.errors import QMPError
from qsd.qapi.generated import (
    BlockdevDelArgs,
    BlockdevOptions,
    BlockResizeArgs,
    QueryBlockArgs,
    QueryNamedBlockNodesArgs,
    XBlockdevSetIothreadArgs,
)

if TYPE_CHECKING:
    from qsd.daemon import Daemon


@command("blockdev-add")
async def blockdev_add(daemon: Daemon, args: BlockdevOptions) -> None:
    await daemon.graph.blockdev_add(args)


@command("blockdev-del")
async def blockdev_del(daemon: Daemon, args: BlockdevDelArgs) -> None:
    await daemon.graph.blockdev_del(args.node_name)


@command("query-named-block-nodes")
async def query_named_block_nodes(daemon: Daemon, args: QueryNamedBlockNodesArgs) -> object:
    return query.query_named_block_nodes(daemon.graph, bool(args.flat))


@command("query-block")
async def query_block(daemon: Daemon, args: QueryBlockArgs) -> object:
    # A storage daemon has no guest devices, so no BlockBackend has a name.
    return []


@command("block_resize")
async def block_resize(daemon: Daemon, args: BlockResizeArgs) -> None:
    await daemon.graph.block_resize(args.device, args.node_name, args.size)


@command("x-debug-query-block-graph")
async def x_debug_query_block_graph(daemon: Daemon, args: None) -> object:
    return query.x_debug_query_block_graph(daemon.graph)


@command("x-blockdev-set-iothread")
async def x_blockdev_set_iothread(daemon: Daemon, args: XBlockdevSetIothreadArgs) -> None:
    node = daemon.graph.find_node(args.node_name)
    if node is None:
        raise QMPError(f"Failed to find node with node-name='{args.node_name}'")
    if not args.force and users(node):
        raise QMPError(f"Node {args.node_name} is associated with a BlockBackend and could "
                       "be in use (use force=true to override this check)")
    if isinstance(args.iothread, str):
        iothread = daemon.iothreads.get(args.iothread)
        if iothread is None:
            raise QMPError(f"Cannot find iothread {args.iothread}")
        ctx = iothread.ctx
    else:
        ctx = main_context()
    await daemon.graph.set_aio_context(node, ctx)
