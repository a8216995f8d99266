"""BlockGraph: the one place where the block graph changes.

Every edge is linked, unlinked or moved here (``attach_child``, ``detach_child``,
``replace_child``, ``replace_node``, ``set_child_perm``), each as a transaction: the
edges change, the permissions of every node below are worked out again, and if any node
refuses (a conflict between users, a read-only node asked for write, an image lock held
by another process) every step is undone and the error is QEMU's.  On top of these:
blockdev-add (drivers from the registry, opened asynchronously), blockdev-del, moves
between iothreads and block_resize.

Everything here runs in the main loop.  Commands that change the graph in several
awaited steps take ``changing`` so that they never interleave.  Changes that can race
with I/O drain the affected nodes first and only then take the graph write lock (seed
004: never drain under the lock).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from typing import Any, Protocol

from qsd.aio import AioContext, main_context, wait_tasks
from qsd.block import drain, io, registry
from qsd.block.node import BlockNode, Child, ChildParent, NodeOptions
from qsd.block.permissions import (
    PERM_ALL,
    PERM_CONSISTENT_READ,
    PERM_RESIZE,
    PERM_WRITE,
    PERM_WRITE_UNCHANGED,
    ChildRole,
    perm_names,
)
from qsd.block.transaction import Transaction
from qsd.errors import QMPError
from qsd.ids import id_wellformed
from qsd.iothread import iothread_of
from qsd.qapi import parse_type, to_wire

NODE_NAME_MAX = 31  # QEMU's node_name[32] includes the NUL
UNNAMED = "an unnamed block device"


def _value(x: Any) -> Any:
    """An enum model's wire value, or the value itself."""
    return getattr(x, "value", x)


class GraphUser(ChildParent, Protocol):
    """A user of a node from outside the graph (a BlockBackend): the root of an edge."""

    root: Child | None

    def detach(self) -> Awaitable[None]:
        ...


class _TemporaryUser(ChildParent):
    """The short-lived user a command holds its node through (QEMU's blk_new_with_bs in
    qmp_block_resize), named in conflicts like any BlockBackend."""

    def child_description(self, child: Child) -> str:
        return UNNAMED


class BlockGraph:
    """All block nodes and BlockBackends of the daemon."""

    def __init__(self, objects: Mapping[str, object] | None = None) -> None:
        # The daemon's /objects, where drivers look up the secrets they are named.
        self.objects: Mapping[str, object] = objects if objects is not None else {}
        self.nodes: dict[str, BlockNode] = {}      # QEMU's graph_bdrv_states order
        self.backends: list[GraphUser] = []        # QEMU's block_backends order
        self.lock = drain.GraphLock()
        self.changing = asyncio.Lock()
        self._id_counter = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def keep(self, task: asyncio.Task[None]) -> None:
        """Keeps a background task referenced until it is done (close_all waits)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def find_node(self, name: str) -> BlockNode | None:
        node = self.nodes.get(name)
        return node if node is not None and node.opened else None

    def opened_nodes(self) -> list[BlockNode]:
        """Nodes in creation order, without those still opening."""
        return [node for node in self.nodes.values() if node.opened]

    # ---- edges: the only code that links, unlinks and moves them -------------------------

    def attach_child(self, parent: ChildParent, node: BlockNode, name: str, role: ChildRole,
                     perm: int = 0, shared: int = PERM_ALL) -> Child:
        """Links ``node`` below ``parent``; QMPError and no change if permissions clash."""
        child = Child(parent, name, node, role, perm, shared)
        with Transaction() as tran:
            self._link(child, tran)
            # A parent node decides what the new edge needs right away (QEMU asks the
            # parent's driver when it attaches): an opening format locks its file then.
            self._update_permissions([child.parent_node or node], tran)
        self._linked(child)
        return child

    def detach_child(self, child: Child) -> None:
        """Unlinks an edge; the node below loses the permissions it held."""
        drain.parent_drained_end(child)
        node = child.node
        with Transaction() as tran:
            self._unlink(child, tran)
        try:
            with Transaction() as tran:
                self._update_permissions([node], tran)
        except QMPError:
            pass  # giving up permissions cannot conflict; a lock error leaves them held
        self._unlinked(child)

    def replace_child(self, child: Child, new: BlockNode) -> None:
        """Points an edge at another node, atomically with the permission change."""
        self._replace([child], new)

    def replace_node(self, old: BlockNode, new: BlockNode) -> None:
        """Every user of ``old`` uses ``new`` instead (QEMU's bdrv_replace_node); edges
        from ``new`` itself stay, which is what puts a node on top of another."""
        self._replace([c for c in old.parents if c.parent_node is not new], new)

    def set_child_perm(self, child: Child, perm: int, shared: int) -> None:
        """Changes what an edge's owner needs and shares; QMPError and no change on
        conflict."""
        with Transaction() as tran:
            self._set_perm(child, perm, shared, tran)
            self._update_permissions([child.node], tran)

    def _replace(self, children: list[Child], new: BlockNode) -> None:
        for child in children:
            if child.node.ctx is not new.ctx:
                raise QMPError(f"Cannot replace node '{child.node.node_name}' with node "
                               f"'{new.node_name}' in another iothread")
        olds = list({id(c.node): c.node for c in children}.values())
        with Transaction() as tran:
            for child in children:
                old = child.node
                index = old.parents.index(child)
                del old.parents[index]
                new.parents.insert(0, child)
                child.node = new
                tran.add(abort=functools.partial(_move_back, child, old, index))
            self._update_permissions([*olds, new], tran)
        for child in children:
            if child.quiesced and not new.quiesce_counter:
                drain.parent_drained_end(child)
            self._linked(child)

    def _link(self, child: Child, tran: Transaction) -> None:
        child.node.parents.insert(0, child)
        tran.add(abort=functools.partial(child.node.parents.remove, child))
        parent = child.parent_node
        if parent is not None:
            parent.children.insert(0, child)
            tran.add(abort=functools.partial(parent.children.remove, child))

    def _unlink(self, child: Child, tran: Transaction) -> None:
        node = child.node
        index = node.parents.index(child)
        del node.parents[index]
        tran.add(abort=functools.partial(node.parents.insert, index, child))
        parent = child.parent_node
        if parent is not None:
            index = parent.children.index(child)
            del parent.children[index]
            tran.add(abort=functools.partial(parent.children.insert, index, child))

    def _linked(self, child: Child) -> None:
        """A new edge is in place: a drained node stops its new user too (QEMU's
        bdrv_replace_child_noperm), a parent node takes on the child's limits."""
        if child.node.quiesce_counter:
            drain.parent_drained_begin(child)
        parent = child.parent_node
        if parent is not None:
            parent.refresh_limits()
        child.parent.child_changed(child)

    def _unlinked(self, child: Child) -> None:
        parent = child.parent_node
        if parent is not None and not parent.closed:
            parent.refresh_limits()
            parent.notify_changed()

    def _set_perm(self, child: Child, perm: int, shared: int, tran: Transaction) -> None:
        if (child.perm, child.shared) != (perm, shared):
            tran.add(abort=functools.partial(_set_perm, child, child.perm, child.shared))
            _set_perm(child, perm, shared)

    def _update_permissions(self, roots: list[BlockNode], tran: Transaction) -> None:
        """Works out the permissions of ``roots`` and of everything below them again,
        parents before children (QEMU's bdrv_refresh_perms)."""
        for node in _top_down(roots):
            for a in node.parents:
                for b in node.parents:
                    if a is not b:
                        _check_allowed(a, b)
            perm, shared = 0, PERM_ALL
            for child in node.parents:
                perm |= child.perm
                shared &= child.shared
            if perm & (PERM_WRITE | PERM_WRITE_UNCHANGED) and node.read_only:
                raise QMPError("Block node is read-only")
            node.check_perm(perm, shared)
            tran.add(abort=node.abort_perm, commit=node.commit_perm)
            for child in node.children:
                nperm, nshared = node.child_perm(child, perm, shared)
                if child.node.force_share:
                    nshared = PERM_ALL
                self._set_perm(child, nperm, nshared, tran)

    def refresh_permissions(self, node: BlockNode) -> None:
        """Works out what ``node`` needs from its children again (its driver changed its
        mind, e.g. a job's filter that stops forwarding); QMPError and no change if that
        conflicts (QEMU's bdrv_child_refresh_perms)."""
        with Transaction() as tran:
            self._update_permissions([node], tran)

    def set_backing(self, node: BlockNode, backing: BlockNode | None) -> None:
        """Points ``node``'s backing edge at ``backing``, or drops it (QEMU's
        bdrv_set_backing_hd): the nodes between go when nobody else holds them."""
        old = node.backing
        if old is not None and backing is not None:
            self.replace_child(old, backing)
            return
        if old is not None:
            self.detach_child(old)
        if backing is not None:
            self.attach_child(node, backing, "backing", ChildRole.COW)

    # ---- blockdev-add ------------------------------------------------------------------------

    async def blockdev_add(self, opts: Any) -> BlockNode:
        """Creates a node tree from a validated BlockdevOptions model (main loop).

        Nested definitions become nodes owned by their parent; string references attach
        existing nodes.  On failure nothing created here survives.
        """
        if getattr(opts, "node_name", None) is None:
            raise QMPError("'node-name' must be specified for the root node")
        async with self.changing:
            created: list[BlockNode] = []
            try:
                node = await self.open_node(opts, None, created)
            except BaseException:
                for n in reversed(created):
                    await self._destroy(n)
                raise
            node.monitor_owned = True
            return node

    async def open_node(self, opts: Any, parent: NodeOptions | None,
                        created: list[BlockNode]) -> BlockNode:
        """Opens one node (and what it defines inline) from its options, QEMU's
        bdrv_open_inherit() order: the ``file`` child of a non-protocol driver first,
        then the common options, then the driver."""
        name = str(_value(opts.driver))
        driver = registry.lookup(name)
        if driver is None:
            raise QMPError(f"Unknown driver '{name}'")
        common = self._common(opts, parent)
        opener = _Opener(self, common, created)
        file_ref = getattr(opts, "file", None)
        if file_ref is not None and not driver.node_class.is_protocol:
            await opener.resolve(file_ref)
        node_name = self._check_common(common, getattr(opts, "node_name", None))
        ctx = opener.ctx or main_context()
        node = driver.node_class(node_name, name, common, ctx, to_wire(opts))
        self.nodes[node_name] = node
        created.append(node)
        _ref_ctx(ctx)
        await node.open(opts, opener)
        node.refresh_limits()
        try:
            node.refresh_length()
        except OSError as exc:
            raise QMPError(f"Could not refresh total sector count: "
                           f"{os.strerror(exc.errno or 0)}") from None
        with Transaction() as tran:
            self._update_permissions([node], tran)
        node.opened = True
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
        elif not id_wellformed(name):
            raise QMPError(f"Invalid node-name: '{name}'")
        if name in self.nodes:
            raise QMPError(f"Duplicate nodes with node-name='{name}'")
        if len(name) > NODE_NAME_MAX:
            raise QMPError("Node name too long")
        return name

    def _generate_name(self) -> str:
        """QEMU's id_generate(ID_BLOCK): ``#block`` + counter + two random digits."""
        import random  # here, as only unnamed nodes need it and it is slow to import

        while True:
            name = f"#block{self._id_counter}{random.randrange(100):02d}"
            self._id_counter += 1
            if name not in self.nodes:
                return name

    async def _destroy(self, node: BlockNode) -> None:
        """Unlinks and closes a node that nobody uses; children it owned go too.  The
        driver writes back its caches first, while its children are still there."""
        if node.closed:
            return
        node.closed = True
        if node.opened:
            await node.inactivate()
        for child in list(node.children):
            self.detach_child(child)
            below = child.node
            if not below.parents and not below.monitor_owned:
                await self._destroy(below)
        if self.nodes.get(node.node_name) is node:
            del self.nodes[node.node_name]
            _unref_ctx(node.ctx)
        node.close()

    @contextlib.asynccontextmanager
    async def blockdev_ref(self, ref: Any) -> AsyncIterator[BlockNode]:
        """A node to work on for a while (QEMU's bdrv_open_blockdev_ref() and the
        bdrv_unref() that ends the use): a node-name reference is looked up; a definition
        (a BlockdevOptions model, or its wire form) is opened as blockdev-add would open
        it and closed again, with what it created, when the block ends.

        A coroutine of QEMU's opens it by scheduling the open in the main loop and
        yielding until then, so a job that does this lets its command reply first."""
        await asyncio.sleep(0)
        if isinstance(ref, str):
            node = self.find_node(ref)
            if node is None:
                raise QMPError(f"Cannot find device='{ref}' nor node-name='{ref}'")
            yield node
            return
        opts = parse_type("BlockdevOptions", ref) if isinstance(ref, dict) else ref
        created: list[BlockNode] = []
        try:
            async with self.changing:
                node = await self.open_node(opts, None, created)
            yield node
        finally:
            async with self.changing:
                for n in reversed(created):
                    await self._destroy(n)

    @contextlib.contextmanager
    def temporary_user(self, node: BlockNode, perm: int, shared: int = PERM_ALL
                       ) -> Iterator[Child]:
        """An edge into ``node`` for a command's own requests while the block runs
        (QEMU's blk_new_with_bs() ... blk_unref()); QMPError if permissions clash."""
        child = self.attach_child(_TemporaryUser(), node, "root",
                                  ChildRole.FILTERED | ChildRole.PRIMARY, perm, shared)
        try:
            yield child
        finally:
            self.detach_child(child)

    # ---- blockdev-del --------------------------------------------------------------------

    async def blockdev_del(self, node_name: str) -> None:
        async with self.changing:
            node = self.find_node(node_name)
            if node is None:
                raise QMPError(f"Failed to find node with node-name='{node_name}'")
            # QEMU's bdrv_has_blk(): a BlockBackend uses it (a block job's edge is not
            # one: its op blocker answers below).
            if any(child.parent in self.backends for child in node.parents):
                raise QMPError(f"Node {node_name} is in use")
            check_op_blocker(node)
            if not node.monitor_owned:
                raise QMPError(f"Node {node_name} is not owned by the monitor")
            if node.parents:
                raise QMPError(f"Block device {node_name} is in use")
            async with drain.drained(self.lock, [node]):
                if node.parents or self.nodes.get(node_name) is not node:
                    raise QMPError(f"Node {node_name} is in use")
                with self.lock.write():
                    await self._destroy(node)

    # ---- AioContexts ---------------------------------------------------------------------

    def component(self, node: BlockNode) -> list[BlockNode]:
        """Every node connected to ``node`` through parent or child edges, or through
        a user that keeps its nodes together (a block job)."""
        seen: dict[int, BlockNode] = {}
        todo = [node]
        while todo:
            n = todo.pop()
            if id(n) in seen:
                continue
            seen[id(n)] = n
            todo.extend(c.node for c in n.children)
            for c in n.parents:
                if c.parent_node is not None:
                    todo.append(c.parent_node)
                else:
                    todo.extend(c.parent.child_peers(c))
        return list(seen.values())

    async def set_aio_context(self, node: BlockNode, ctx: AioContext) -> None:
        """Moves the node with everything connected to it (QEMU's
        bdrv_try_change_aio_context): every user outside the graph may refuse; then
        drain, change under the write lock, and tell the users (still drained)."""
        async with self.changing:
            await self._move(node, ctx)

    async def _move(self, node: BlockNode, ctx: AioContext) -> None:
        nodes = self.component(node)
        if all(n.ctx is ctx for n in nodes):
            return
        for n in nodes:
            for child in users(n):
                error = child.parent.child_aio_context_check(child, ctx)
                if error is not None:
                    raise QMPError(error)
        async with drain.drained(self.lock, nodes):
            with self.lock.write():
                for n in nodes:
                    if n.ctx is not ctx:
                        _unref_ctx(n.ctx)
                        n.ctx = ctx
                        _ref_ctx(ctx)
                        n.attach_aio_context(ctx)
            for n in nodes:
                for child in users(n):
                    await child.parent.child_aio_context_changed(child, ctx)

    # ---- blockdev-snapshot ---------------------------------------------------------------

    async def snapshot(self, node_name: str, overlay_name: str) -> None:
        """Puts the node ``overlay_name`` on top of ``node_name`` (QEMU's
        external_snapshot_action and its commit, checks and texts in its order): the node
        becomes the overlay's backing child, every user of the node uses the overlay
        instead, and the node is reopened read-only."""
        old, _, section = await self.snapshot_prepare(node_name, overlay_name)
        drain.drained_end(section)
        await self.snapshot_commit(old)

    async def snapshot_prepare(self, node_name: str, overlay_name: str
                               ) -> tuple[BlockNode, BlockNode, drain.Section]:
        """blockdev-snapshot up to the overlay being in place; (node, overlay, the
        drained section over the node, which the caller ends).  A transaction then
        finishes it with snapshot_commit or undoes it with snapshot_abort."""
        async with self.changing:
            old = self.lookup(node_name)
            section = await drain.drained_begin(self.lock, [old])
            try:
                check_op_blocker(old)
                if not old.read_only:
                    with self.temporary_user(old, 0) as child:
                        try:
                            await io.flush(child)
                        except OSError:
                            raise QMPError("An IO error has occurred") from None
                new = self.lookup(overlay_name)
                perm = 0
                for child in new.parents:
                    perm |= child.perm
                if perm & PERM_CONSISTENT_READ:
                    raise QMPError("The overlay is already in use")
                if new.is_filter:
                    raise QMPError("Filters cannot be used as overlays")
                if new.cow_child() is not None:
                    raise QMPError("The overlay already has a backing image")
                if not new.supports_backing:
                    raise QMPError("The overlay does not support backing images")
                if new.ctx is not old.ctx:
                    await self._move(new, old.ctx)
                with self.lock.write():
                    self._append(new, old)
            except BaseException:
                drain.drained_end(section)
                raise
            return old, new, section

    async def snapshot_commit(self, old: BlockNode) -> None:
        """The snapshotted node becomes read-only (QEMU's external_snapshot_commit)."""
        async with self.changing:
            await self._reopen_read_only(old)

    async def snapshot_abort(self, old: BlockNode, new: BlockNode) -> None:
        """QEMU's external_snapshot_abort(): the overlay lets go of the node and its
        users go back to it."""
        async with self.changing:
            with self.lock.write():
                backing = new.backing
                if backing is not None:
                    self.detach_child(backing)
                self.replace_node(new, old)

    def lookup(self, name: str) -> BlockNode:
        """QEMU's bdrv_lookup_bs(name, name): a daemon has no devices, only nodes."""
        node = self.find_node(name)
        if node is None:
            raise QMPError(f"Cannot find device='{name}' nor node-name='{name}'")
        return node

    def lookup_node(self, name: str) -> BlockNode:
        """QEMU's bdrv_lookup_bs(NULL, name): a node by node name only."""
        node = self.find_node(name)
        if node is None:
            raise QMPError(f"Cannot find device='' nor node-name='{name}'")
        return node

    async def release(self, node: BlockNode) -> None:
        """Closes a node that no user holds any more and that the monitor did not add
        (QEMU's last bdrv_unref of an implicitly opened node)."""
        if not node.parents and not node.monitor_owned and not node.closed:
            async with self.changing:
                await self._destroy(node)

    def _append(self, new: BlockNode, top: BlockNode) -> None:
        """QEMU's bdrv_append(): ``top`` becomes the backing child of ``new`` and every
        other user of ``top`` uses ``new``, as one change of permissions."""
        if top is new or new in _below(top):
            raise QMPError(f"Making '{top.node_name}' a backing child of "
                           f"'{new.node_name}' would create a cycle")
        role = ChildRole.FILTERED | ChildRole.PRIMARY if new.is_filter else ChildRole.COW
        backing = Child(new, "backing", top, role, 0, PERM_ALL)
        moved = [c for c in top.parents if c.parent_node is not new]
        with Transaction() as tran:
            self._link(backing, tran)
            for child in moved:
                index = top.parents.index(child)
                del top.parents[index]
                new.parents.insert(0, child)
                child.node = new
                tran.add(abort=functools.partial(_move_back, child, top, index))
            self._update_permissions([new, top], tran)
        self._linked(backing)
        for child in moved:
            if child.quiesced and not new.quiesce_counter:
                drain.parent_drained_end(child)
            self._linked(child)

    async def _reopen_read_only(self, node: BlockNode) -> None:
        """QEMU's bdrv_reopen_set_read_only(node, true): the node and the children it
        opened itself become read-only; drivers write back what they cache first (qcow2
        flushes and marks the image clean), and the permissions (file locks) follow.  A
        failure leaves the nodes writable, as QEMU ignores it too."""
        nodes = [n for n in _inheriting(node) if not n.read_only]
        async with drain.drained(self.lock, nodes):
            for n in nodes:
                await n.inactivate()
            try:
                with Transaction() as tran:
                    for n in nodes:
                        n.read_only = True
                        tran.add(abort=functools.partial(setattr, n, "read_only", False))
                    self._update_permissions(nodes, tran)
            except QMPError:
                pass

    # ---- filters that jobs put on top of a node --------------------------------------------

    def insert_filter(self, node: BlockNode, below: BlockNode) -> None:
        """Adds ``node``, a filter a job made itself (not a driver of the registry, such
        as QEMU's mirror_top), to the graph on top of ``below`` as its backing child: it
        takes over every user of ``below`` (QEMU's bdrv_new_open_driver and bdrv_append).
        QMPError and no change on a conflict; ``drop_filter`` takes it out again."""
        if node.node_name in self.nodes:
            raise QMPError(f"Duplicate nodes with node-name='{node.node_name}'")
        self.nodes[node.node_name] = node
        _ref_ctx(node.ctx)
        try:
            node.opened = True
            self._append(node, below)
            node.refresh_limits()
            node.refresh_length()
        except BaseException:
            self.nodes.pop(node.node_name, None)
            _unref_ctx(node.ctx)
            raise

    def generate_node_name(self) -> str:
        """A name for an implicit node, as QEMU's id_generate(ID_BLOCK) makes them."""
        return self._generate_name()

    async def insert_node(self, below: BlockNode, options: dict[str, object],
                          prepare: Callable[[BlockNode], None] | None = None) -> BlockNode:
        """Opens a filter from its wire options (its ``file`` naming ``below``) and puts
        it above ``below``: every user of ``below`` uses the filter instead (QEMU's
        bdrv_insert_node).  ``prepare`` sets up the opened filter first (QEMU's open
        flags).  On failure nothing it opened is left."""
        opts = parse_type("BlockdevOptions", options)
        created: list[BlockNode] = []
        async with self.changing:
            try:
                try:
                    node = await self.open_node(opts, None, created)
                except QMPError as exc:
                    raise QMPError(f"Could not create node: {exc.desc}") from None
                if prepare is not None:
                    prepare(node)
                async with drain.drained(self.lock, [below, node]):
                    with self.lock.write():
                        try:
                            self.replace_node(below, node)
                        except QMPError as exc:
                            raise QMPError(f"Could not replace node: {exc.desc}") from None
            except BaseException:
                for n in reversed(created):
                    await self._destroy(n)
                raise
        return node

    async def drop_filter(self, node: BlockNode) -> None:
        """Takes a filter out again: its users use its filtered child, and the filter,
        with the children nobody else holds, is closed (QEMU's bdrv_drop_filter and the
        bdrv_unref that follows)."""
        child = node.filtered_child()
        assert child is not None
        below = child.node
        async with self.changing:
            async with drain.drained(self.lock, [node, below]):
                with self.lock.write():
                    self.replace_node(node, below)
                    await self._destroy(node)

    # ---- block_resize ----------------------------------------------------------------------

    async def block_resize(self, device: str | None, node_name: str | None, size: int) -> None:
        node = self.find_node(node_name) if node_name is not None else None
        if node is None:
            raise QMPError(f"Cannot find device='{device or ''}' nor "
                           f"node-name='{node_name or ''}'")
        check_op_blocker(node)
        if size < 0:
            raise QMPError("Parameter 'size' expects a >0 size")
        with self.temporary_user(node, PERM_RESIZE) as child:
            async with drain.drained(self.lock, [node]):
                if node.read_only:
                    raise QMPError("Image is read-only")
                try:
                    await io.truncate(child, size, False, "off")
                except OSError as exc:
                    raise QMPError(str(exc.strerror)) from exc

    # ---- shutdown ------------------------------------------------------------------------

    async def close_all(self) -> None:
        """Detaches remaining backends and closes every node, parents before children."""
        for blk in list(self.backends):
            await blk.detach()
        await wait_tasks(self._tasks)
        for node in reversed(list(self.nodes.values())):
            if self.nodes.get(node.node_name) is node and not node.parents:
                await self._destroy(node)
        for node in list(self.nodes.values()):
            await self._destroy(node)


class _Opener:
    """What a driver's open() gets to link its children (node.ChildOpener): references
    to existing nodes, or nested definitions opened with the parent's inherited options."""

    def __init__(self, graph: BlockGraph, common: NodeOptions,
                 created: list[BlockNode]) -> None:
        self._graph = graph
        self._common = common
        self._created = created
        self._resolved: dict[int, BlockNode] = {}
        self.ctx: AioContext | None = None

    @property
    def objects(self) -> Mapping[str, object]:
        return self._graph.objects

    async def resolve(self, ref: Any) -> BlockNode:
        """A BlockdevRef: a node-name reference or a nested definition (a model, or the
        wire form a driver made up, e.g. from an image header's backing file name)."""
        node = self._resolved.get(id(ref))
        if node is not None:
            return node
        if isinstance(ref, str):
            found = self._graph.find_node(ref)
            if found is None:
                raise QMPError(f"Cannot find device='{ref}' nor node-name='{ref}'")
            node = found
        else:
            opts = parse_type("BlockdevOptions", ref) if isinstance(ref, dict) else ref
            node = await self._graph.open_node(opts, self._common, self._created)
        self._resolved[id(ref)] = node
        if self.ctx is None:
            self.ctx = node.ctx
        return node

    def find_node(self, name: str) -> BlockNode | None:
        return self._graph.find_node(name)

    async def open_child(self, parent: BlockNode, ref: Any, name: str,
                         role: ChildRole) -> Child:
        node = await self.resolve(ref)
        return self._graph.attach_child(parent, node, name, role)


def _set_perm(child: Child, perm: int, shared: int) -> None:
    child.perm, child.shared = perm, shared


def _move_back(child: Child, old: BlockNode, index: int) -> None:
    child.node.parents.remove(child)
    old.parents.insert(index, child)
    child.node = old


# The operations a backing file still allows (QEMU's bdrv_backing_attach unblocks them).
_BACKING_ALLOWS = frozenset({"commit-target", "stream", "backup-source", "backup-target"})


def check_op_blocker(node: BlockNode, op: str = "") -> None:
    """QEMU's op blockers, newest user first: a block job blocks every operation on the
    nodes it uses; a node that is the backing file of another refuses every ``op`` but
    committing into it, streaming and backing up (bdrv_backing_attach)."""
    for child in node.parents:
        reason = child.parent.child_op_blocker(child)
        if reason is None and child.parent_node is not None and child.role & ChildRole.COW:
            if op in _BACKING_ALLOWS:
                continue
            reason = f"node is used as backing hd of '{child.parent_node.node_name}'"
        if reason is not None:
            raise QMPError(f"Node '{node.node_name}' is busy: {reason}")


def _below(node: BlockNode) -> list[BlockNode]:
    """Every node under ``node``."""
    out: list[BlockNode] = []
    todo = [c.node for c in node.children]
    while todo:
        n = todo.pop()
        if n not in out:
            out.append(n)
            todo.extend(c.node for c in n.children)
    return out


def _inheriting(node: BlockNode) -> list[BlockNode]:
    """The node and the children it opened itself (not those referenced by name),
    which a reopen changes with it (QEMU's inherits_from)."""
    out = [node]
    for child in node.children:
        if not child.node.monitor_owned and child.node not in out:
            out.extend(n for n in _inheriting(child.node) if n not in out)
    return out


def users(node: BlockNode) -> list[Child]:
    """The edges into ``node`` whose owners are outside the graph (BlockBackends; QEMU's
    bdrv_has_blk() asks whether there is any)."""
    return [child for child in node.parents if child.parent_node is None]


def _check_allowed(a: Child, b: Child) -> None:
    """QEMU's bdrv_a_allow_b(): does ``a`` share everything ``b`` needs?"""
    if b.perm & a.shared == b.perm:
        return
    node = a.node.node_name
    raise QMPError(
        f"Permission conflict on node '{node}': permissions "
        f"'{perm_names(b.perm & ~a.shared)}' are both required by {b.describe()} (uses "
        f"node '{node}' as '{b.name}' child) and unshared by {a.describe()} (uses node "
        f"'{node}' as '{a.name}' child).")


def _top_down(roots: list[BlockNode]) -> list[BlockNode]:
    """``roots`` and everything below them, each node after all of its parents among
    them (a node's permissions depend on all of its parents' edges)."""
    below: dict[int, BlockNode] = {}
    todo = list(roots)
    while todo:
        node = todo.pop()
        if id(node) not in below:
            below[id(node)] = node
            todo.extend(c.node for c in node.children)
    waiting = {key: sum(1 for c in node.parents
                        if c.parent_node is not None and id(c.parent_node) in below)
               for key, node in below.items()}
    ready = [node for node in below.values() if not waiting[id(node)]]
    order: list[BlockNode] = []
    while ready:
        node = ready.pop(0)
        order.append(node)
        for child in node.children:
            waiting[id(child.node)] -= 1
            if not waiting[id(child.node)]:
                ready.append(child.node)
    return order


def _ref_ctx(ctx: AioContext) -> None:
    iothread = iothread_of(ctx)
    if iothread is not None:
        iothread.ref()


def _unref_ctx(ctx: AioContext) -> None:
    iothread = iothread_of(ctx)
    if iothread is not None:
        iothread.unref()
