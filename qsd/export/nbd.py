"""``block-export-add type=nbd``: QEMU's ``nbd_export_create()`` checks and flags.

The serving itself is the NBD server's (``qsd.nbd``); this driver validates the NBD
options, registers the export under its NBD name and takes it away again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from qsd.block import dirty_bitmap
from qsd.block.permissions import PERM_RESIZE
from qsd.errors import QMPError
from qsd.export.base import BlockExport, ExportHost
from qsd.nbd.protocol import (
    BDRV_SECTOR_SIZE,
    NBD_FLAG_CAN_MULTI_CONN,
    NBD_FLAG_HAS_FLAGS,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_CACHE,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_MAX_STRING_SIZE,
)
from qsd.nbd.server import NbdServer, ServedExport

if TYPE_CHECKING:
    from qsd.aio import AioContext
    from qsd.block.backend import BlockBackend
    from qsd.block.dirty_bitmap import DirtyBitmap
    from qsd.block.node import BlockNode


def _export_bitmaps(daemon: ExportHost, blk: BlockBackend, items: list[Any],
                    read_only: bool) -> list[tuple[str, DirtyBitmap]]:
    """QEMU's nbd_export_create(): a name is looked up on the exported node and down its
    filtered and backing chain (where a read-only export refuses one that still records
    the writes of a writable node), a {node, name} anywhere."""
    found: list[tuple[str, DirtyBitmap]] = []
    for item in items:
        if isinstance(item, str):
            name = item
            node: BlockNode | None = blk.node
            bitmap = None
            while node is not None and bitmap is None:
                bitmap = dirty_bitmap.find(node, name)
                if bitmap is None:
                    below = node.filter_or_cow_child()
                    node = below.node if below is not None else None
            if bitmap is None:
                raise QMPError(f"Bitmap '{name}' is not found")
            if read_only and not bitmap.node.read_only and bitmap.enabled:
                raise QMPError(f"Enabled bitmap '{name}' incompatible with readonly "
                               "export")
        else:
            name = item.name
            node = daemon.graph.find_node(item.node)
            if node is None:
                raise QMPError(f"Node '{item.node}' not found")
            bitmap = dirty_bitmap.find(node, name)
            if bitmap is None:
                raise QMPError(f"Dirty bitmap '{name}' not found")
        bitmap.check(dirty_bitmap.ALLOW_RO)
        found.append((name, bitmap))
    return found


class NbdExport(BlockExport):
    type: ClassVar[str] = "nbd"
    supports_multithread: ClassVar[bool] = False

    def __init__(self, daemon: ExportHost, export_id: str, node_name: str, blk: BlockBackend,
                 contexts: list[AioContext], server: NbdServer, served: ServedExport) -> None:
        super().__init__(daemon, export_id, node_name, blk, contexts)
        self.server = server
        self.served = served

    @classmethod
    async def create(cls, daemon: ExportHost, opts: Any, blk: BlockBackend,
                     contexts: list[AioContext]) -> BlockExport:
        server = daemon.nbd_server
        if not isinstance(server, NbdServer):
            raise QMPError("NBD server not running")
        name: str = opts.name if opts.name is not None else opts.node_name
        if len(name.encode()) > NBD_MAX_STRING_SIZE:
            raise QMPError(f"export name '{name}' too long")
        description: str | None = opts.description
        if description is not None and len(description.encode()) > NBD_MAX_STRING_SIZE:
            raise QMPError(f"description '{description}' too long")
        if name in server.exports:
            raise QMPError(f"NBD server already has export named '{name}'")
        try:
            size = blk.length()
        except OSError as exc:
            raise QMPError(f"Failed to determine the NBD export's length: {exc.strerror}"
                           ) from None
        flags = NBD_FLAG_HAS_FLAGS | NBD_FLAG_SEND_FLUSH | NBD_FLAG_SEND_FUA | NBD_FLAG_SEND_CACHE
        if server.can_multi_conn():
            flags |= NBD_FLAG_CAN_MULTI_CONN
        if opts.writable:
            flags |= NBD_FLAG_SEND_TRIM | NBD_FLAG_SEND_WRITE_ZEROES | NBD_FLAG_SEND_FAST_ZERO
        else:
            flags |= NBD_FLAG_READ_ONLY
        # Resizing under connected clients would break their idea of the size.
        blk.set_perm(blk.perm, blk.shared & ~PERM_RESIZE)
        bitmaps = _export_bitmaps(daemon, blk, opts.bitmaps or [], not opts.writable)
        served = ServedExport(name, description, size - size % BDRV_SECTOR_SIZE, flags,
                              bool(opts.allocation_depth), blk, contexts[0], bitmaps)
        for _, bitmap in bitmaps:
            bitmap.busy = True
        blk.set_dev_ops(served.drained_begin, served.drained_end, served.drained_poll)
        # A request the clients already took counts until it is answered (drained_poll)
        # and may call the block layer again after a drain began (a structured read asks
        # for block status, then reads): it must go through, not wait for the drain's
        # end, or the drain waits for it forever (QEMU's nbd_export_create does the same).
        blk.disable_request_queuing()
        blk.add_aio_context_notifier(served.aio_context_changed)
        server.exports[name] = served
        return cls(daemon, opts.id, opts.node_name, blk, contexts, server, served)

    def in_use(self) -> bool:
        return self.served.in_use()

    async def shutdown(self) -> None:
        """Hides the name from new clients at once, then drops the connected ones."""
        if self.server.exports.get(self.served.name) is self.served:
            del self.server.exports[self.served.name]
        await self.served.close()
        for bitmap in self.served.bitmaps:
            bitmap.busy = False
