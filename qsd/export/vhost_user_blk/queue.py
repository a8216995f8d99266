"""One virtqueue of a vhost-user-blk export, served in one AioContext (the hot path).

A kick (the front-end's eventfd) wakes the queue's loop; it takes every available
request and answers those the block layer can finish at once (``read_nowait`` /
``write_nowait``) right there, copying straight between guest memory and the file, then
publishes them with one used-index update and at most one call (the interrupt eventfd).
Requests that must wait become tasks; their completion is published on its own.  After a
batch the queue keeps polling the ring for a short adaptive window (the iothread's
poll-max-ns), because a sleeping loop's wake-up costs more than a whole request.

The ring belongs to the queue's thread; ``lock`` also orders the rare case of a
completion finishing in another loop while the export moves between iothreads.  The
virtio-blk request semantics and their checks are QEMU's (block/export/virtio-blk-handler.c).
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable, Coroutine
from time import perf_counter_ns
from typing import TYPE_CHECKING, Any, Final

from qsd.aio import wait_tasks
from qsd.errors import error_report
from qsd.export.vhost_user_blk import protocol as P
from qsd.export.vhost_user_blk.memory import GuestMemory
from qsd.export.vhost_user_blk.vring import PackedRing, RingError, SplitRing
from qsd.iothread import iothread_of

if TYPE_CHECKING:
    from qsd.aio import AioContext
    from qsd.block.backend import BlockBackend

Ring = SplitRing | PackedRing

_OUTHDR: Final = P.BLK_OUTHDR
_ONE: Final = (1).to_bytes(8, "little")
_T_IN: Final = P.BLK_T_IN
_T_OUT: Final = P.BLK_T_OUT
_S_OK: Final = P.BLK_S_OK
_S_IOERR: Final = P.BLK_S_IOERR
_S_UNSUPP: Final = P.BLK_S_UNSUPP
_MAX_SECTORS: Final = P.MAX_REQUEST_SECTORS
_SECTOR_BITS: Final = P.SECTOR_BITS
_SECTOR_MASK: Final = P.SECTOR_SIZE - 1
_MAX_BYTES: Final = P.MAX_REQUEST_SECTORS << P.SECTOR_BITS
_TYPE_MASK: Final = ~P.BLK_T_BARRIER
SERIAL: Final = b"vhost_user_blk"
# Polling, as in the FUSE queues: the main loop has no poll-max-ns of its own.
POLL_MAX_NS_DEFAULT: Final = 32768
POLL_MIN_NS: Final = 1000


class Disk:
    """What every queue of one export needs to know about the exported node."""

    def __init__(self, blk: BlockBackend, blk_size: int, writable: bool) -> None:
        self.blk = blk
        self.blk_size = blk_size
        self.writable = writable
        self.sectors = blk.length() >> P.SECTOR_BITS

    def quick_range_ok(self, sector: int, size: int) -> bool:
        """The usual case of range_ok(), against the size known so far."""
        return (not size & _SECTOR_MASK and size <= _MAX_BYTES
                and sector + (size >> _SECTOR_BITS) <= self.sectors
                and not (sector << _SECTOR_BITS) % self.blk_size)

    def range_ok(self, sector: int, size: int) -> bool:
        """QEMU's virtio_blk_sect_range_ok(); the size is re-read when it looks too small,
        so that a grown image is seen without a system call per request."""
        if size % P.SECTOR_SIZE:
            return False
        count = size >> P.SECTOR_BITS
        if count > _MAX_SECTORS or (sector << P.SECTOR_BITS) % self.blk_size:
            return False
        if sector > self.sectors or count > self.sectors - sector:
            try:
                self.sectors = self.blk.length() >> P.SECTOR_BITS
            except OSError:
                return False
            return sector <= self.sectors and count <= self.sectors - sector
        return True


def _copy_into(views: list[memoryview], data: bytes | bytearray | memoryview) -> None:
    if len(views) == 1:
        views[0][:] = data
        return
    src = memoryview(data)
    pos = 0
    for view in views:
        n = len(view)
        view[:] = src[pos:pos + n]
        pos += n


def _joined(views: list[memoryview]) -> bytes | memoryview:
    return views[0] if len(views) == 1 else b"".join(views)


class VirtQueue:
    """A virtqueue's configuration (from vhost-user messages) and its request loop."""

    def __init__(self, index: int, ctx: AioContext, disk: Disk,
                 on_broken: Callable[[str], None]) -> None:
        self.index = index
        self.ctx = ctx
        self.disk = disk
        self._read_nowait = disk.blk.read_nowait
        self._write_nowait = disk.blk.write_nowait
        self._on_broken = on_broken
        self.lock = threading.Lock()
        # Set by control messages before the ring starts.
        self.num = 0
        self.addrs = (0, 0, 0)
        self.base = 0
        self.enabled = False
        self.kick_fd = -1
        self.call_fd = -1
        self.err_fd = -1
        self.ring: Ring | None = None
        self.attached = False
        self.paused = False
        self.stopping = False
        self.mem = GuestMemory()
        self.unmapped = False
        self.tasks: set[asyncio.Task[None]] = set()
        self._poll_max_ns = 0
        self._poll_ns = 0

    # ---- control (each runs in ctx's thread; the device calls them through ctx) ---------

    def start(self, ring: Ring, kick_fd: int) -> None:
        """SET_VRING_KICK: the ring is in place; serve it (without a kick fd only what is
        there now: no polling mode)."""
        with self.lock:
            self.ring = ring
            self.mem = ring.mem
            self.unmapped = False
            self.kick_fd = kick_fd
        self.attach()
        self._serve()

    async def halt(self) -> None:
        """Stops taking requests and finishes those taken; the ring's position becomes
        ``base`` (a new ring starts from there).  The kick fd goes with the ring."""
        self.stopping = True
        self.detach()
        await self.idle()
        with self.lock:
            ring, self.ring = self.ring, None
        self.stopping = False
        if ring is not None:
            self.base = ring.base()
        if self.kick_fd >= 0:
            os.close(self.kick_fd)
            self.kick_fd = -1

    async def stop(self) -> int:
        """GET_VRING_BASE (and disconnection): halt, drop the call and error fds too."""
        await self.halt()
        self.set_call_fd(-1)
        self.set_err_fd(-1)
        return self.base

    async def idle(self) -> None:
        """Waits until no request of this queue is being processed."""
        await wait_tasks(self.tasks)

    def set_call_fd(self, fd: int) -> None:
        old, self.call_fd = self.call_fd, fd
        if old >= 0:
            os.close(old)

    def set_err_fd(self, fd: int) -> None:
        old, self.err_fd = self.err_fd, fd
        if old >= 0:
            os.close(old)

    def set_memory(self, mem: GuestMemory) -> None:
        """A new memory table: find the running ring in it.  A ring whose memory is gone
        waits (the front-end may add it back) and is only an error when it is used."""
        with self.lock:
            self.mem = mem
            if self.ring is not None:
                try:
                    self.ring.remap(mem, *self.addrs)
                    self.unmapped = False
                except RingError:
                    self.unmapped = True

    def attach(self) -> None:
        if (self.attached or self.paused or self.stopping or self.ring is None
                or self.kick_fd < 0):
            return
        iothread = iothread_of(self.ctx)
        self._poll_max_ns = POLL_MAX_NS_DEFAULT if iothread is None else iothread.poll_max_ns
        self._poll_ns = self._poll_max_ns
        self.ctx.loop.add_reader(self.kick_fd, self._kicked)
        self.attached = True

    def detach(self) -> None:
        if self.attached:
            self.ctx.loop.remove_reader(self.kick_fd)
            self.attached = False

    def pause(self) -> None:
        """From any thread (drain): take no more requests; detach in ctx's loop."""
        self.paused = True
        self._in_ctx(self.detach)

    def resume(self) -> None:
        self.paused = False
        self._in_ctx(self._resume)

    def _resume(self) -> None:
        self.attach()
        if self.attached:
            self._serve()

    def _in_ctx(self, fn: Callable[[], None]) -> None:
        if self.ctx.in_this_thread():
            fn()
        else:
            self.ctx.call_soon(fn)

    # ---- the request loop -----------------------------------------------------------------

    def _kicked(self) -> None:
        try:
            os.read(self.kick_fd, 8)
        except BlockingIOError:
            pass
        except OSError as exc:
            with self.lock:
                self._fail(f"kick eventfd_read(): {os.strerror(exc.errno or 0)}")
            return
        self._serve()

    def _serve(self) -> None:
        """Takes requests until the ring stays empty for the poll window.  Kicks stay off
        meanwhile (the driver need not make a system call for a queue that is looking
        anyway); they are asked for again, and the ring checked once more, only before
        the loop goes back to sleep."""
        while not self.paused and not self.stopping:
            with self.lock:
                ring = self.ring
                if ring is None:
                    return
                try:
                    if self.unmapped:
                        ring.remap(self.mem, *self.addrs)
                        self.unmapped = False
                    ring.quiet()
                    done = self._take(ring)
                    if done:
                        self._publish(ring, done)
                except RingError as exc:
                    self._fail(str(exc))
                    return
            if self._poll(ring):
                continue
            with self.lock:
                if self.ring is not ring:
                    return
                try:
                    if not ring.want_kicks():
                        return
                except RingError as exc:
                    self._fail(str(exc))
                    return

    def _fail(self, reason: str) -> None:
        """The driver broke the ring (lock held): stop serving it, report."""
        self.ring = None
        self.detach()
        self._on_broken(reason)

    def _poll(self, ring: Ring) -> bool:
        """Watches the ring for the poll window; True if a request arrived.  The window
        grows while polling pays off and shrinks while it does not."""
        window = self._poll_ns
        if not window:
            return False
        has_work = ring.has_work
        deadline = perf_counter_ns() + window
        while perf_counter_ns() < deadline:
            if has_work():
                self._poll_ns = min(window * 2, self._poll_max_ns)
                return True
        self._poll_ns = max(window // 2, POLL_MIN_NS)
        return False

    def _take(self, ring: Ring) -> int:
        """Takes every available request; returns how many completed at once."""
        pop = ring.pop
        push = ring.push
        done = 0
        while (chain := pop()) is not None:
            head, out, inn, slots = chain
            length = self._request(head, out, inn, slots)
            if length >= 0:
                push(head, length, slots)
                done += 1
        return done

    def _publish(self, ring: Ring, count: int) -> None:
        if ring.flush(count) and self.call_fd >= 0:
            try:
                os.write(self.call_fd, _ONE)
            except BlockingIOError:
                pass
            except OSError as exc:
                raise RingError(f"Error writing eventfd: {os.strerror(exc.errno or 0)}"
                                ) from None

    def _request(self, head: int, out: list[memoryview], inn: list[memoryview],
                 slots: int) -> int:
        """Serves one request; returns the length written to the driver if it completed,
        -1 if a task will complete it or it is dropped.  A request without its headers is
        reported and dropped, never completed, as QEMU does: the device keeps serving."""
        if not out or not inn:
            error_report("virtio-blk request missing headers")
            return -1
        hdr = out[0]
        if len(hdr) == 16:
            rtype, _, sector = _OUTHDR.unpack(hdr)
            data_out = out[1:]
        else:
            joined = b"".join(out)
            if len(joined) < 16:
                error_report("virtio-blk request outhdr too short")
                return -1
            rtype, _, sector = _OUTHDR.unpack_from(joined)
            data_out = [memoryview(joined)[16:]] if len(joined) > 16 else []
        in_len = sum(map(len, inn))
        status = inn[-1]
        if len(status) == 1:
            data_in = inn[:-1]
        else:
            data_in = [*inn[:-1], status[:-1]]
            status = status[-1:]
        rtype &= _TYPE_MASK
        disk = self.disk
        if rtype == _T_IN:
            size = sum(map(len, data_in))
            if not disk.quick_range_ok(sector, size) and not disk.range_ok(sector, size):
                status[0] = _S_IOERR
                return in_len
            offset = sector << _SECTOR_BITS
            try:
                data = self._read_nowait(offset, size)
            except OSError:
                status[0] = _S_IOERR
                return in_len
            if data is None:
                self._spawn(self._read(offset, size, data_in), head, slots, status, in_len)
                return -1
            if len(data_in) == 1:
                data_in[0][:] = data
            else:
                _copy_into(data_in, data)
            status[0] = _S_OK
            return in_len
        if rtype == _T_OUT:
            size = sum(map(len, data_out))
            if not disk.writable or (not disk.quick_range_ok(sector, size)
                                     and not disk.range_ok(sector, size)):
                status[0] = _S_IOERR
                return in_len
            offset = sector << _SECTOR_BITS
            payload = _joined(data_out) if data_out else b""
            try:
                if self._write_nowait(offset, payload):
                    status[0] = _S_OK
                    return in_len
            except OSError:
                status[0] = _S_IOERR
                return in_len
            self._spawn(disk.blk.write(offset, payload), head, slots, status, in_len)
            return -1
        return self._other(rtype, data_out, data_in, head, slots, status, in_len)

    def _other(self, rtype: int, data_out: list[memoryview], data_in: list[memoryview],
               head: int, slots: int, status: memoryview, in_len: int) -> int:
        disk = self.disk
        if rtype == P.BLK_T_FLUSH:
            self._spawn(disk.blk.flush(), head, slots, status, in_len)
            return -1
        if rtype == P.BLK_T_GET_ID:
            room = 0
            for view in data_in:
                room += len(view)
            _copy_into_prefix(data_in, (SERIAL + b"\0")[:min(room, P.BLK_ID_BYTES)])
            status[0] = _S_OK
            return in_len
        if rtype in (P.BLK_T_DISCARD, P.BLK_T_WRITE_ZEROES):
            if not disk.writable:
                status[0] = _S_IOERR
                return in_len
            code, coro = self._discard_or_zeroes(rtype, data_out)
            if coro is None:
                status[0] = code
                return in_len
            self._spawn(coro, head, slots, status, in_len)
            return -1
        status[0] = _S_UNSUPP
        return in_len

    def _discard_or_zeroes(self, rtype: int, data_out: list[memoryview]
                           ) -> tuple[int, Coroutine[Any, Any, None] | None]:
        size = 0
        for view in data_out:
            size += len(view)
        if size > P.BLK_DISCARD_WZ.size:
            return _S_UNSUPP, None
        if size != P.BLK_DISCARD_WZ.size:
            error_report(f"Invalid size {size}, expected {P.BLK_DISCARD_WZ.size}")
            return _S_IOERR, None
        sector, count, flags = P.BLK_DISCARD_WZ.unpack(b"".join(data_out))
        zeroes = rtype == P.BLK_T_WRITE_ZEROES
        if count > (P.MAX_WRITE_ZEROES_SECTORS if zeroes else P.MAX_DISCARD_SECTORS):
            return _S_IOERR, None
        size = count << P.SECTOR_BITS
        if not self.disk.range_ok(sector, size):
            return _S_IOERR, None
        if flags & ~P.BLK_WRITE_ZEROES_FLAG_UNMAP:
            return _S_UNSUPP, None
        offset = sector << P.SECTOR_BITS
        blk = self.disk.blk
        if zeroes:
            return _S_OK, blk.write_zeroes(offset, size,
                                           may_unmap=bool(flags & P.BLK_WRITE_ZEROES_FLAG_UNMAP))
        if flags & P.BLK_WRITE_ZEROES_FLAG_UNMAP:
            return _S_UNSUPP, None
        return _S_OK, blk.discard(offset, size)

    async def _read(self, offset: int, size: int, data_in: list[memoryview]) -> None:
        _copy_into(data_in, await self.disk.blk.read(offset, size))

    # ---- requests that wait -----------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None], head: int, slots: int,
               status: memoryview, in_len: int) -> None:
        task = asyncio.get_running_loop().create_task(
            self._finish_later(coro, head, slots, status, in_len))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _finish_later(self, coro: Coroutine[Any, Any, None], head: int, slots: int,
                            status: memoryview, in_len: int) -> None:
        try:
            await coro
            code = _S_OK
        except OSError:
            code = _S_IOERR
        except Exception as exc:  # noqa: BLE001 - a bug must not take the device down
            error_report(f"vhost-user-blk request failed: {exc!r}")
            code = _S_IOERR
        status[0] = code
        if self.ctx.in_this_thread():
            self._complete(head, slots, in_len)
        else:
            self.ctx.call_soon(self._complete, head, slots, in_len)

    def _complete(self, head: int, slots: int, in_len: int) -> None:
        with self.lock:
            ring = self.ring
            if ring is None:
                return
            try:
                ring.push(head, in_len, slots)
                self._publish(ring, 1)
            except RingError as exc:
                self._fail(str(exc))


def _copy_into_prefix(views: list[memoryview], data: bytes) -> None:
    """Copies ``data`` into the start of ``views`` (which may hold more)."""
    pos = 0
    for view in views:
        if pos >= len(data):
            return
        n = min(len(view), len(data) - pos)
        view[:n] = data[pos:pos + n]
        pos += n

