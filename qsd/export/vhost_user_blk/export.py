"""``block-export-add type=vhost-user-blk``: QEMU's vu_blk_exp_create() checks, a listener,
one front-end at a time.

The export listens on its socket for as long as it exists.  A front-end that connects is
served until it disconnects (or breaks the protocol); then the next one is accepted, so a
VM that reboots or a QEMU that is restarted finds the export where it left it.  Further
front-ends wait in the listen backlog meanwhile, as with QEMU.

Virtqueue ``i`` is served by ``contexts[i % len(contexts)]``: with a list of iothreads the
queues are spread round-robin over them, each queue only ever in its own thread; in the
single-thread forms all queues follow the node's AioContext.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING, Any

from qsd.errors import QMPError
from qsd.export.base import BlockExport, ExportHost
from qsd.export.vhost_user_blk import protocol as P
from qsd.export.vhost_user_blk.device import BlkDevice, Connection
from qsd.export.vhost_user_blk.queue import Disk
from qsd.iothread import IOThread, iothread_of
from qsd.qapi.generated import (
    SocketAddress,
    SocketAddressVariantFd,
    SocketAddressVariantUnix,
)
from qsd.sockets import Listener

if TYPE_CHECKING:
    from qsd.aio import AioContext
    from qsd.block.backend import BlockBackend

MIN_BLOCK_SIZE = 512
MAX_BLOCK_SIZE = 2 * 1024 * 1024


def _check_block_size(value: int) -> None:
    """QEMU's check_block_size() for logical-block-size (0 passes: "unset")."""
    if value and (value < MIN_BLOCK_SIZE or value > MAX_BLOCK_SIZE or value & (value - 1)):
        raise QMPError(f"parameter logical-block-size must be a power of 2 between "
                       f"{MIN_BLOCK_SIZE} and {MAX_BLOCK_SIZE}")


def _listen(addr: SocketAddress) -> Listener:
    if not isinstance(addr, SocketAddressVariantUnix | SocketAddressVariantFd):
        raise QMPError("Only socket address types 'unix' and 'fd' are supported")
    return Listener.open(addr, 1)


class VhostUserBlkExport(BlockExport):
    type = "vhost-user-blk"
    supports_multithread = True
    deleted_before_reply = True

    def __init__(self, daemon: ExportHost, export_id: str, node_name: str, blk: BlockBackend,
                 contexts: list[AioContext], device: BlkDevice, listener: Listener,
                 follow_aio_context: bool) -> None:
        super().__init__(daemon, export_id, node_name, blk, contexts)
        self.device = device
        self.listener = listener
        self.follow_aio_context = follow_aio_context
        self.connection: Connection | None = None
        self.quiesced = False
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def create(cls, daemon: ExportHost, opts: Any, blk: BlockBackend,
                     contexts: list[AioContext]) -> VhostUserBlkExport:
        block_size = P.SECTOR_SIZE if opts.logical_block_size is None else opts.logical_block_size
        _check_block_size(block_size)
        # 11.1.3 takes 0 as the block size itself and dies of a division by zero at the
        # first request; 0 means the default here.
        block_size = block_size or P.SECTOR_SIZE
        num_queues = 1 if opts.num_queues is None else opts.num_queues
        if num_queues == 0:
            raise QMPError("num-queues must be greater than 0")
        try:
            disk = Disk(blk, block_size, bool(opts.writable))
        except OSError as exc:
            raise QMPError(f"Failed to get the length of the exported node: "
                           f"{os.strerror(exc.errno or 0)}") from None
        exp = cls(daemon, opts.id, opts.node_name, blk, contexts,
                  BlkDevice(disk, num_queues, list(contexts)), _listen(opts.addr),
                  follow_aio_context=not isinstance(opts.iothread, list))
        blk.set_dev_ops(exp._drained_begin, exp._drained_end, exp._drained_poll)
        if exp.follow_aio_context:
            blk.add_aio_context_notifier(exp._aio_context_changed)
        for iothread in exp._fixed_iothreads():
            iothread.ref()
        exp._task = asyncio.get_running_loop().create_task(exp._accept_loop())
        return exp

    def _fixed_iothreads(self) -> list[IOThread]:
        """A list of iothreads is the export's own (object-del refuses them meanwhile)."""
        if self.follow_aio_context:
            return []
        threads = (iothread_of(ctx) for ctx in self.contexts)
        return [thread for thread in threads if thread is not None]

    async def _accept_loop(self) -> None:
        while not self.shutting_down:
            sock = await self.listener.wait_client()
            connection = Connection(sock, self.device, paused=self.quiesced)
            self.connection = connection
            try:
                await connection.serve()
            finally:
                self.connection = None

    def in_use(self) -> bool:
        connection = self.connection
        return connection is not None and connection.in_use()

    async def shutdown(self) -> None:
        task = self._task
        connection = self.connection
        if connection is not None:
            connection.close()
        if task is not None:
            if connection is None:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.listener.close()
        for iothread in self._fixed_iothreads():
            iothread.unref()

    # -- drain hooks (main loop) -----------------------------------------------------------

    def _drained_begin(self) -> None:
        self.quiesced = True
        if self.connection is not None:
            self.connection.pause()

    def _drained_end(self) -> None:
        self.quiesced = False
        if self.connection is not None:
            self.connection.resume()

    def _aio_context_changed(self, ctx: AioContext) -> None:
        """The node moved (single-thread forms): every queue follows.  Still drained, so
        no kick reader is left in the old loop; drained_end attaches them in ``ctx``."""
        self.contexts = [ctx]
        self.device.contexts = [ctx]
        if self.connection is not None:
            for queue in self.connection.queues:
                queue.ctx = ctx

    def _drained_poll(self) -> bool:
        return self.connection is not None and self.connection.attached()
