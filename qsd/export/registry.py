"""block-export-add/-del bookkeeping shared by every export type, in QEMU's order of checks."""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

from qsd.aio import AioContext, wait_tasks
from qsd.block import drain
from qsd.block.backend import BlockBackend
from qsd.block.permissions import PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE
from qsd.errors import QMPError
from qsd.export.base import BlockExport, ExportHost
from qsd.ids import id_wellformed

# Export types by QAPI name: (module, class). Each is imported when first used, so an
# unused driver costs nothing at start-up.
EXPORT_DRIVERS = {
    "nbd": ("qsd.export.nbd", "NbdExport"),
    "vhost-user-blk": ("qsd.export.vhost_user_blk.export", "VhostUserBlkExport"),
    "fuse": ("qsd.export.fuse.export", "FuseExport"),
}


def export_driver(type_name: str) -> type[BlockExport] | None:
    entry = EXPORT_DRIVERS.get(type_name)
    if entry is None:
        return None
    driver: type[BlockExport] = getattr(importlib.import_module(entry[0]), entry[1])
    return driver


class ExportRegistry:
    def __init__(self, daemon: ExportHost) -> None:
        self.daemon = daemon
        # Newest first, as QEMU's list (query-block-exports shows that order).
        self.exports: list[BlockExport] = []
        self._deletions: set[asyncio.Task[None]] = set()

    def find(self, export_id: str) -> BlockExport | None:
        for exp in self.exports:
            if exp.id == export_id:
                return exp
        return None

    async def add(self, opts: Any) -> BlockExport:
        if not id_wellformed(opts.id):
            raise QMPError("Invalid block export id")
        if self.find(opts.id) is not None:
            raise QMPError(f"Block export id '{opts.id}' is already in use")
        driver = export_driver(getattr(opts.type, "value", opts.type))
        if driver is None:
            raise QMPError("No driver found for the requested export type")
        graph = self.daemon.graph
        node = graph.find_node(opts.node_name)
        if node is None:
            raise QMPError(f"Cannot find device='' nor node-name='{opts.node_name}'")
        writable = bool(opts.writable)
        if node.read_only and writable:
            raise QMPError("Cannot export read-only node as writable")
        contexts = await self._contexts(opts, driver, node)

        perm = PERM_CONSISTENT_READ | (PERM_WRITE if writable else 0) | driver.extra_perm(opts)
        blk = BlockBackend(graph, node, perm=perm, shared=PERM_ALL)
        blk.set_allow_aio_context_change(not opts.fixed_iothread)
        blk.set_writethrough(bool(opts.writethrough))
        try:
            exp = await driver.create(self.daemon, opts, blk, contexts)
        except BaseException:
            blk.detach()
            raise
        self.exports.insert(0, exp)
        return exp

    async def _contexts(self, opts: Any, driver: type[BlockExport], node: Any
                        ) -> list[AioContext]:
        """The AioContexts the export serves in; moves the node for a single iothread."""
        iothreads = self.daemon.iothreads
        if isinstance(opts.iothread, list):
            if not opts.iothread:
                raise QMPError("The set of I/O threads must not be empty")
            contexts = []
            for name in opts.iothread:
                if name not in iothreads:
                    raise QMPError(f'iothread "{name}" not found')
                contexts.append(iothreads[name].ctx)
            if opts.fixed_iothread:
                raise QMPError("Cannot use fixed-iothread for a multi-threaded export")
            if not driver.supports_multithread:
                raise QMPError(f"{driver.type.upper()} export does not support multi-threading")
            return contexts
        if opts.iothread is not None:
            iothread = iothreads.get(opts.iothread)
            if iothread is None:
                raise QMPError(f'iothread "{opts.iothread}" not found')
            try:
                await self.daemon.graph.set_aio_context(node, iothread.ctx)
            except QMPError:
                if opts.fixed_iothread:
                    raise
        return [node.ctx]

    async def delete(self, export_id: str, mode: str) -> None:
        exp = self.find(export_id)
        if exp is None:
            raise QMPError(f"Export '{export_id}' is not found")
        if exp.shutting_down:
            raise QMPError(f"Export '{export_id}' is already shutting down")
        if mode == "safe" and exp.in_use():
            raise QMPError(f"export '{export_id}' still in use")
        await self._shut_down(exp)

    async def _shut_down(self, exp: BlockExport) -> None:
        """Stops serving before the command returns, as QEMU's request_shutdown does.

        A client cut off by ``mode=hard`` must see its next request fail even if it sends
        it right after the reply.  An export nobody uses is gone before the command
        returns, so its BLOCK_EXPORT_DELETED comes first (QEMU deletes it in a bottom
        half that runs before the reply is sent); so is one whose type QEMU deletes
        inside the command (``deleted_before_reply``).  Any other export that had clients
        goes once they are, after the reply.
        """
        before_reply = type(exp).deleted_before_reply or not exp.in_use()
        try:
            await self._stop(exp)
        finally:
            if before_reply:
                await self._release(exp)
            else:
                task = asyncio.get_running_loop().create_task(self._release(exp, defer=True))
                self._deletions.add(task)
                task.add_done_callback(self._deletions.discard)

    async def _stop(self, exp: BlockExport) -> None:
        """The export stops serving.  Its node is drained meanwhile: requests a throttle
        node holds back go at once then, so that stopping does not wait for them (QEMU's
        export deletion does not)."""
        exp.shutting_down = True
        root = exp.blk.root
        if root is None:
            await exp.shutdown()
        else:
            async with drain.drained(self.daemon.graph.lock, [root.node]):
                await exp.shutdown()

    async def _release(self, exp: BlockExport, *, defer: bool = False) -> None:
        if defer:
            # Let the command's reply go out before the event, as QEMU's bottom half does.
            await asyncio.sleep(0)
        try:
            # The event promises the node is free again (locks included), so wait for it.
            await exp.blk.detach()
        finally:
            self.exports.remove(exp)
            self.daemon.emit_event("BLOCK_EXPORT_DELETED", {"id": exp.id})

    async def close_all(self, type_name: str | None = None) -> None:
        """Deletes every export (of one type) and waits until all are gone.

        The order of the events is 11.1.3's: its loop asks the exports to shut down,
        newest first; the deletions that leaves pending complete later, those of exports
        whose clients had to go first (the last asked first), then the others in the
        order asked.  A type deleted inside the command (vhost-user-blk) stops in a
        nested event loop, which completes every deletion pending by then; its own
        deletion is pending after that.
        """
        chosen = [exp for exp in self.exports
                  if (type_name is None or exp.type == type_name) and not exp.shutting_down]
        busy: list[BlockExport] = []
        pending: list[BlockExport] = []
        stopped: set[str] = set()
        for exp in chosen:
            if type(exp).deleted_before_reply:
                await self._complete(busy, pending, stopped)
                try:
                    await self._stop(exp)
                finally:
                    stopped.add(exp.id)
                    pending.append(exp)
            elif exp.in_use():
                busy.append(exp)
            else:
                pending.append(exp)
        await self._complete(busy, pending, stopped)
        await wait_tasks(self._deletions)

    async def _complete(self, busy: list[BlockExport], pending: list[BlockExport],
                        stopped: set[str]) -> None:
        """close_all's pending deletions, in 11.1.3's order; empties both lists."""
        for exp in [*reversed(busy), *pending]:
            try:
                if exp.id not in stopped:
                    await self._stop(exp)
            finally:
                await self._release(exp)
        busy.clear()
        pending.clear()

    def query(self) -> list[dict[str, object]]:
        return [{"id": exp.id, "type": exp.type, "node-name": _served_node(exp),
                 "shutting-down": exp.shutting_down} for exp in self.exports]


def _served_node(exp: BlockExport) -> str:
    """The node an export serves now: its backend follows a replacement such as a
    snapshot's overlay (QEMU names blk_bs() of the export)."""
    node = exp.blk.node
    return node.node_name if node is not None else ""
