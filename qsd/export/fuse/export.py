"""The FUSE export: QEMU's ``block/export/fuse.c`` lifecycle over qsd's queues.

``create`` performs QEMU's checks in QEMU's order, mounts (allow_other: auto tries
``allow_other`` first), makes queue 0 from the session fd and one cloned fd per further
context, and attaches every queue's reader in its own loop.  ``shutdown`` stops all
queues, lets requests in flight finish, unmounts, and closes the fds (which aborts the
connection, failing whatever the kernel still holds).  A failing ``create`` leaves no
mount, fd or table entry behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from qsd.errors import QMPError
from qsd.export.base import BlockExport, ExportHost
from qsd.export.fuse import io_uring
from qsd.export.fuse import mount as M
from qsd.export.fuse.ops import FuseFile
from qsd.export.fuse.queue import FuseQueue, QueueGroup
from qsd.export.fuse.uring_queue import FuseRing, possible_cpus
from qsd.iothread import IOThread, iothread_of

if TYPE_CHECKING:
    from qsd.aio import AioContext
    from qsd.block.backend import BlockBackend

T = TypeVar("T")

# QEMU's `exports` hash table: the mountpoint strings of all FUSE exports of this process.
# Checked before stat(): a stat() of our own mountpoint would have to be answered by us.
_mountpoints: set[str] = set()


def _check_regular_file(path: str) -> None:
    """QEMU's is_regular_file(), with its error texts."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise QMPError(f"Failed to stat '{path}': {os.strerror(e.errno or 0)}") from e
    if not stat.S_ISREG(st.st_mode):
        raise QMPError(f"'{path}' is not a regular file")


async def _in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Runs a blocking call (stat, mount, unmount) in a thread of its own.

    Off the loop, because the path may lead into a mount this very loop serves; in a
    thread that ends with the call, so that an export leaves no thread behind.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def succeed(result: T) -> None:
        if not future.done():
            future.set_result(result)

    def fail(error: BaseException) -> None:
        if not future.done():
            future.set_exception(error)

    def run() -> None:
        try:
            result = fn(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine
            loop.call_soon_threadsafe(fail, e)
        else:
            loop.call_soon_threadsafe(succeed, result)

    thread = threading.Thread(target=run, name="fuse-mount", daemon=True)
    thread.start()
    try:
        return await future
    finally:
        thread.join()


def _enum_value(value: Any) -> str | None:
    return None if value is None else str(getattr(value, "value", value))


ENABLE_URING_PARAM = "/sys/module/fuse/parameters/enable_uring"


def uring_unavailable() -> str | None:
    """None if the kernel offers FUSE over io_uring to new connections, else why not."""
    reason = io_uring.available()
    if reason is not None:
        return reason
    try:
        with open(ENABLE_URING_PARAM) as f:
            enabled = f.read().strip()
    except OSError:
        return "this kernel has no FUSE over io_uring"
    if enabled != "Y":
        return "it is disabled (fuse module parameter enable_uring)"
    return None


class FuseExport(BlockExport):
    """A FUSE mount presenting a node as a raw image file; one queue per context."""

    type = "fuse"
    supports_multithread = True

    def __init__(self, daemon: ExportHost, export_id: str, node_name: str, blk: BlockBackend,
                 contexts: list[AioContext], fuse_mount: M.FuseMount, file: FuseFile) -> None:
        super().__init__(daemon, export_id, node_name, blk, contexts)
        self.mount = fuse_mount
        self.file = file
        self.queues: list[FuseQueue] = []
        # The single-thread forms serve in whatever context the node is in and follow it
        # when it moves (QEMU's follow_aio_context); a list of iothreads is fixed.
        self.follow_aio_context = False

    @classmethod
    def extra_perm(cls, opts: Any) -> int:
        """Writable and growable exports keep RESIZE for truncate, fallocate and growth."""
        from qsd.block.permissions import PERM_RESIZE

        return PERM_RESIZE if opts.writable or opts.growable else 0

    @classmethod
    async def create(cls, daemon: ExportHost, opts: Any, blk: BlockBackend,
                     contexts: list[AioContext]) -> FuseExport:
        mountpoint: str = opts.mountpoint
        if mountpoint in _mountpoints:
            raise QMPError(f"There already is a FUSE export on '{mountpoint}'")
        # Claimed right away so that a concurrent block-export-add sees it, too.
        _mountpoints.add(mountpoint)
        try:
            return await cls._create(daemon, opts, blk, contexts)
        except BaseException:
            _mountpoints.discard(mountpoint)
            raise

    @classmethod
    async def _create(cls, daemon: ExportHost, opts: Any, blk: BlockBackend,
                      contexts: list[AioContext]) -> FuseExport:
        mountpoint: str = opts.mountpoint
        writable = bool(opts.writable)
        await _in_thread(_check_regular_file, mountpoint)

        allow_other_opt = _enum_value(opts.allow_other) or "auto"
        if allow_other_opt == "auto":
            allow_other = True
            try:
                fuse_mount = await _in_thread(
                    M.mount, mountpoint, writable=writable, allow_other=True, quiet=True)
            except QMPError:
                allow_other = False
                fuse_mount = await _in_thread(
                    M.mount, mountpoint, writable=writable, allow_other=False, quiet=False)
        else:
            allow_other = allow_other_opt == "on"
            fuse_mount = await _in_thread(
                M.mount, mountpoint, writable=writable, allow_other=allow_other, quiet=False)

        file = FuseFile(blk, writable=writable, growable=bool(opts.growable),
                        allow_other=allow_other)
        exp = cls(daemon, opts.id, opts.node_name, blk, contexts, fuse_mount, file)
        exp.follow_aio_context = not isinstance(opts.iothread, list)
        fds: list[int] = []
        try:
            M.set_nonblocking(fuse_mount.fd)
            for _ in contexts[1:]:
                fds.append(M.clone_fd(fuse_mount.fd))
        except BaseException:
            for fd in fds:
                os.close(fd)
            await exp._unmount()
            raise
        group = QueueGroup() if len(contexts) > 1 else None
        exp.queues = [FuseQueue(file, ctx, fd, exp._halt, exp._start_rings, group=group)
                      for ctx, fd in zip(contexts, [fuse_mount.fd, *fds], strict=True)]
        try:
            exp._make_rings(_enum_value(opts.io_uring) or "auto")
        except BaseException:
            await exp._unmount()
            raise
        blk.set_dev_ops(exp._drained_begin, exp._drained_end, exp._drained_poll)
        blk.disable_request_queuing()
        if exp.follow_aio_context:
            blk.add_aio_context_notifier(exp._aio_context_changed)
        for iothread in exp._fixed_iothreads():
            iothread.ref()
        for queue in exp.queues:
            queue.resume()
        return exp

    def _make_rings(self, mode: str) -> None:
        """One ring per queue, each registering entries for its share of the kernel's
        per-CPU ring queues, so that INIT can agree to FUSE over io_uring."""
        if mode == "off":
            return
        reason = uring_unavailable()
        if reason is None:
            nr_queues = possible_cpus()
            try:
                for i, queue in enumerate(self.queues):
                    qids = list(range(i, nr_queues, len(self.queues)))
                    if qids:
                        queue.ring = FuseRing(
                            queue, qids, single_issuer=not self.follow_aio_context,
                            shares_gil=len(self.queues) > 1)
            except OSError as e:
                self._close_rings()
                reason = f"cannot set up an io_uring: {e.strerror}"
        if reason is not None:
            if mode == "on":
                raise QMPError(f"Cannot use FUSE over io_uring: {reason}")
            return
        self.file.uring_offer = True

    def _start_rings(self) -> None:
        """After INIT agreed on io_uring (from the thread that answered it): every queue
        registers its entries in its own thread, whose loop then reads the completions."""
        for queue in self.queues:
            queue.run_in_ctx(queue.start_ring)

    def _close_rings(self) -> None:
        """Rings made but never registered (set-up failed); any thread."""
        for queue in self.queues:
            if queue.ring is not None:
                queue.ring.close()
                queue.ring = None
                queue.ring_active = False

    def _fixed_iothreads(self) -> list[IOThread]:
        """The iothreads of a list of iothreads, which the export keeps in use (object-del
        refuses them); a queue that follows its node relies on the node's reference."""
        if self.follow_aio_context:
            return []
        threads = (iothread_of(queue.ctx) for queue in self.queues)
        return [thread for thread in threads if thread is not None]

    def in_use(self) -> bool:
        """Like QEMU, whose requests in flight hold a reference to the export."""
        return any(queue.in_flight for queue in self.queues)

    async def shutdown(self) -> None:
        await asyncio.gather(*(queue.ctx.call(queue.stop()) for queue in self.queues))
        await self._unmount()
        for iothread in self._fixed_iothreads():
            iothread.unref()

    async def _unmount(self) -> None:
        """Unmount first, then close every fd: closing the last one aborts the connection,
        so requests queued in the kernel fail instead of waiting for us forever."""
        await _in_thread(self.mount.unmount)
        _mountpoints.discard(self.mount.mountpoint)
        # The rings first: their commands hold the /dev/fuse files open.  Each in its
        # own thread, whose loop still enters it (FuseRing.reap) and must stop first.
        await asyncio.gather(*(queue.ctx.call(queue.close_ring()) for queue in self.queues))
        for queue in self.queues:
            queue.close()
        for queue in self.queues[1:]:
            with contextlib.suppress(OSError):
                os.close(queue.fd)
        with contextlib.suppress(OSError):
            os.close(self.mount.fd)

    # -- drain hooks (called from any thread) -----------------------------------------------

    def _drained_begin(self) -> None:
        for queue in self.queues:
            queue.pause()

    def _drained_end(self) -> None:
        for queue in self.queues:
            queue.resume()

    def _aio_context_changed(self, ctx: AioContext) -> None:
        """The node moved: the queue follows.  Still drained, so its reader is gone from
        the old loop and nothing is in flight; drained_end attaches it in ``ctx``."""
        self.queues[0].ctx = ctx

    def _drained_poll(self) -> bool:
        """Busy until every queue's reader is gone and every request it took has been
        answered.  Like QEMU's export, the BlockBackend does not park our requests while
        drained: a request taken just as the drain began must finish inside the section,
        because a deletion waits for it there."""
        return any(queue.attached or queue.tasks for queue in self.queues)

    def _halt(self) -> None:
        """After a request we could not parse nothing on the fds can be trusted: stop all
        queues (QEMU's fuse_export_halt())."""
        self.file.halted = True
        for queue in self.queues:
            queue.pause()
