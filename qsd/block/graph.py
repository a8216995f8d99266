"""BlockGraph: the nodes by name, blockdev-add/-del, moves between iothreads, queries.

Everything here runs in the main loop.  Changes that can race with I/O (removing nodes,
moving them to another AioContext) drain the affected nodes first and only then take the
graph write lock (seed 004: never drain under the lock).
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from qsd.aio import AioContext, main_context
from qsd.block import drain, permissions
from qsd.block.drivers.file import open_file
from qsd.block.drivers.null import open_null
from qsd.block.drivers.raw import open_raw
from qsd.block.node import BlockNode, NodeOptions
from qsd.errors import QMPError
from qsd.iothread import iothread_of

if TYPE_CHECKING:
    from qsd.block.backend import BlockBackend

_WELL_FORMED = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*\Z")
NODE_NAME_MAX = 31  # QEMU's node_name[32] includes the NUL


def _value(x: Any) -> Any:
    """An enum model's wire value, or the value itself."""
    return getattr(x, "value", x)


class BlockGraph:
    """All block nodes and BlockBackends of the daemon."""

    def __init__(self) -> None:
        self.nodes: dict[str, BlockNode] = {}      # QEMU's graph_bdrv_states order
        self.backends: list[BlockBackend] = []     # QEMU's block_backends order
        self.lock = drain.GraphLock()
        self._id_counter = 0
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- helpers for BlockBackend ------------------------------------------------------------

    def keep(self, task: asyncio.Task[None]) -> None:
        """Keeps a background task referenced until it is done."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_idle(self, backends: list[BlockBackend]) -> None:
        await drain.wait_idle(backends)

    def find_node(self, name: str) -> BlockNode | None:
        return self.nodes.get(name)

    # ---- blockdev-add --------------------------------------------------------------------

    def blockdev_add(self, opts: Any) -> BlockNode:
        """Creates a node tree from a validated BlockdevOptions model (main loop).

        Nested definitions become nodes owned by their parent; string references attach
        existing nodes.  On failure nothing created here survives.
        """
        if getattr(opts, "node_name", None) is None:
            raise QMPError("'node-name' must be specified for the root node")
        created: list[BlockNode] = []
        try:
            node = self._open(opts, None, created)
        except BaseException:
            for n in reversed(created):
                self._destroy(n)
            raise
        node.monitor_owned = True
        return node

    def _common(self, opts: Any, parent: NodeOptions | None) -> NodeOptions:
        """The base options, with what a nested child inherits from its parent (QEMU's
        bdrv_inherited_options: read-only, auto-read-only, cache.*; discard=unmap)."""
        def pick(name: str, inherited: Any, default: Any) -> Any:
            value = getattr(opts, name, None)
            if value is not None:
                return _value(value)
            return inherited if parent is not None else default

        cache = getattr(opts, "cache", None)
        direct = getattr(cache, "direct", None) if cache is not None else None
        no_flush = getattr(cache, "no_flush", None) if cache is not None else None
        return NodeOptions(
            read_only=bool(pick("read_only", parent.read_only if parent else False, False)),
            auto_read_only=bool(pick("auto_read_only",
                                     parent.auto_read_only if parent else False, False)),
            force_share=bool(getattr(opts, "force_share", None) or False),
            detect_zeroes=str(_value(getattr(opts, "detect_zeroes", None)) or "off"),
            discard=str(pick("discard", "unmap", "ignore")),
            cache_direct=bool(direct if direct is not None
                              else (parent.cache_direct if parent else False)),
            cache_no_flush=bool(no_flush if no_flush is not None
                                else (parent.cache_no_flush if parent else False)),
        )

    def _check_common(self, common: NodeOptions, name: str | None) -> str:
        """bdrv_open_common()'s checks, in its order; returns the node name to use."""
        if common.force_share and not common.read_only:
            raise QMPError("force-share=on can only be used with read-only images")
        if common.detect_zeroes == "unmap" and common.discard != "unmap":
            raise QMPError("setting detect-zeroes to unmap is not allowed without setting "
                           "discard operation to unmap")
        if name is None:
            name = self._generate_name()
        elif not _WELL_FORMED.match(name):
            raise QMPError(f"Invalid node-name: '{name}'")
        if name in self.nodes:
            raise QMPError(f"Duplicate nodes with node-name='{name}'")
        if len(name) > NODE_NAME_MAX:
            raise QMPError("Node name too long")
        return name

    def _generate_name(self) -> str:
        """QEMU's id_generate(ID_BLOCK): ``#block`` + counter + two random digits."""
        while True:
            name = f"#block{self._id_counter}{random.randrange(100):02d}"
            self._id_counter += 1
            if name not in self.nodes:
                return name

    def _open(self, opts: Any, parent: NodeOptions | None,
              created: list[BlockNode]) -> BlockNode:
        driver = str(_value(opts.driver))
        common = self._common(opts, parent)
        ctx = main_context()
        node: BlockNode
        if driver == "raw":
            child = self._resolve_ref(opts.file, common, created)
            name = self._check_common(common, getattr(opts, "node_name", None))
            raw = open_raw(name, common, child.ctx, opts)
            raw.attach_file(child)
            node = raw
        else:
            name = self._check_common(common, getattr(opts, "node_name", None))
            if driver == "file":
                node = open_file(name, common, ctx, opts)
            elif driver in ("null-co", "null-aio"):
                node = open_null(name, common, ctx, opts, driver)
            else:
                raise QMPError(f"Unknown driver '{driver}'")
        self.nodes[name] = node
        created.append(node)
        _ref_ctx(node.ctx)
        permissions.refresh(node, {})
        return node

    def _resolve_ref(self, ref: Any, common: NodeOptions, created: list[BlockNode]
                     ) -> BlockNode:
        """A BlockdevRef: a node-name reference or a nested definition."""
        if isinstance(ref, str):
            node = self.nodes.get(ref)
            if node is None:
                raise QMPError(f"Cannot find device='{ref}' nor node-name='{ref}'")
            return node
        return self._open(ref, common, created)

    def _destroy(self, node: BlockNode) -> None:
        """Unlinks and closes a node that nobody uses; children it owned go too."""
        for edge in list(node.children):
            node.children.remove(edge)
            child = edge.node
            child.parents.remove(edge)
            permissions.refresh(child, {})
            if not child.parents and not child.monitor_owned and not child.backends:
                self._destroy(child)
        if self.nodes.get(node.node_name) is node:
            del self.nodes[node.node_name]
            _unref_ctx(node.ctx)
        node.close()

    # ---- blockdev-del --------------------------------------------------------------------

    async def blockdev_del(self, node_name: str) -> None:
        node = self.nodes.get(node_name)
        if node is None:
            raise QMPError(f"Failed to find node with node-name='{node_name}'")
        if node.backends:
            raise QMPError(f"Node {node_name} is in use")
        if not node.monitor_owned:
            raise QMPError(f"Node {node_name} is not owned by the monitor")
        if node.parents:
            raise QMPError(f"Block device {node_name} is in use")
        async with drain.drained(self.lock, [node]):
            if node.backends or node.parents or self.nodes.get(node_name) is not node:
                raise QMPError(f"Node {node_name} is in use")
            with self.lock.write():
                self._destroy(node)

    # ---- AioContexts ---------------------------------------------------------------------

    def component(self, node: BlockNode) -> list[BlockNode]:
        """Every node connected to ``node`` through parent or child edges."""
        seen: dict[int, BlockNode] = {}
        todo = [node]
        while todo:
            n = todo.pop()
            if id(n) in seen:
                continue
            seen[id(n)] = n
            todo.extend(e.node for e in n.children)
            todo.extend(e.parent_node for e in n.parents if e.parent_node is not None)
        return list(seen.values())

    async def set_aio_context(self, node: BlockNode, ctx: AioContext) -> None:
        """Moves the node with everything connected to it (QEMU's
        bdrv_try_change_aio_context): drain, then change under the write lock."""
        nodes = self.component(node)
        if all(n.ctx is ctx for n in nodes):
            return
        for n in nodes:
            for blk in n.backends:
                if not blk.allow_aio_context_change:
                    raise QMPError("Cannot change iothread of active block backend")
        async with drain.drained(self.lock, nodes):
            with self.lock.write():
                for n in nodes:
                    if n.ctx is not ctx:
                        _unref_ctx(n.ctx)
                        n.ctx = ctx
                        _ref_ctx(ctx)

    # ---- block_resize ----------------------------------------------------------------------

    async def block_resize(self, device: str | None, node_name: str | None, size: int) -> None:
        from qsd.block.backend import BlockBackend

        node = self.nodes.get(node_name) if node_name is not None else None
        if node is None:
            raise QMPError(f"Cannot find device='{device or ''}' nor "
                           f"node-name='{node_name or ''}'")
        if size < 0:
            raise QMPError("Parameter 'size' expects a >0 size")
        blk = BlockBackend(self, node, perm=permissions.PERM_RESIZE,
                           shared=permissions.PERM_ALL)
        try:
            async with drain.drained(self.lock, [node]):
                if node.read_only:
                    raise QMPError("Image is read-only")
                try:
                    await node.truncate(size, False, "off")
                except OSError as exc:
                    raise QMPError(str(exc.strerror)) from exc
        finally:
            await blk.detach()

    # ---- shutdown ------------------------------------------------------------------------

    async def close_all(self) -> None:
        """Detaches remaining backends and closes every node, parents before children."""
        for blk in list(self.backends):
            await blk.detach()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for node in reversed(list(self.nodes.values())):
            if self.nodes.get(node.node_name) is node and not node.parents:
                self._destroy(node)
        for node in list(self.nodes.values()):
            self._destroy(node)

    # ---- queries ---------------------------------------------------------------------------

    def block_device_info(self, node: BlockNode) -> dict[str, object]:
        """QAPI BlockDeviceInfo for query-named-block-nodes, members in schema order."""
        image: dict[str, object] = {
            "filename": node.filename,
            "format": node.format_name,
        }
        if node.has_dirty_flag():
            image["dirty-flag"] = False
        image["actual-size"] = node.allocated_size()
        image["virtual-size"] = node.length()
        return {
            "file": node.filename,
            "node-name": node.node_name,
            "ro": node.read_only,
            "drv": node.driver,
            "backing_file_depth": 0,
            "encrypted": False,
            "detect_zeroes": node.opts.detect_zeroes,
            "bps": 0, "bps_rd": 0, "bps_wr": 0,
            "iops": 0, "iops_rd": 0, "iops_wr": 0,
            "image": image,
            "cache": {"writeback": True, "direct": node.opts.cache_direct,
                      "no-flush": node.opts.cache_no_flush},
            "write_threshold": 0,
            "active": True,
        }

    def query_named_block_nodes(self, flat: bool = False) -> list[dict[str, object]]:
        """Newest first, like QEMU (its list is built by prepending)."""
        return [self.block_device_info(n) for n in reversed(list(self.nodes.values()))]

    def x_debug_query_block_graph(self) -> dict[str, object]:
        """XDbgBlockGraph with QEMU's numbering: backends, then nodes in creation order;
        ids are assigned on first sight and both lists come out reversed (prepended)."""
        ids: dict[int, int] = {}
        nodes: list[dict[str, object]] = []
        edges: list[dict[str, object]] = []

        def num(obj: object) -> int:
            return ids.setdefault(id(obj), len(ids) + 1)

        def add_edges(parent: object, children: Iterable[permissions.Edge]) -> None:
            for edge in children:
                edges.append({"parent": num(parent), "child": num(edge.node),
                              "name": edge.name,
                              "perm": permissions.qapi_perm_list(edge.perm),
                              "shared-perm": permissions.qapi_perm_list(edge.shared)})

        for blk in self.backends:
            nodes.append({"id": num(blk), "type": "block-backend", "name": ""})
            add_edges(blk, [blk.edge])
        for node in self.nodes.values():
            nodes.append({"id": num(node), "type": "block-driver", "name": node.node_name})
            add_edges(node, node.children)
        return {"nodes": nodes[::-1], "edges": edges[::-1]}


def _ref_ctx(ctx: AioContext) -> None:
    iothread = iothread_of(ctx)
    if iothread is not None:
        iothread.ref()


def _unref_ctx(ctx: AioContext) -> None:
    iothread = iothread_of(ctx)
    if iothread is not None:
        iothread.unref()
