"""One FUSE request queue: a /dev/fuse fd served by one AioContext's loop (the hot path).

Every wake-up of the fd reader drains the fd until EAGAIN into one preallocated buffer.
READ and WRITE requests that the block layer can finish at once (``read_nowait`` /
``write_nowait``) are answered right there with one ``writev``: no task, no future, no
copy of write data.  Only requests that really have to wait become tasks; they copy what
they need out of the shared buffer first, because the next read overwrites it.  When the
fd runs dry the queue keeps polling it for a short adaptive window (the iothread's
poll-max-ns), because a sleeping loop's wake-up costs more than a whole request.

Threading: everything here runs in the queue's own loop thread, except ``pause()`` /
``resume()`` and the flags the drain hooks read (plain attributes under the GIL).  The kernel
hands each request to whichever queue reads it first and expects the reply on that fd.
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import select
from collections.abc import Awaitable, Callable
from time import perf_counter_ns
from typing import TYPE_CHECKING, Final

from qsd.export.fuse import protocol as P
from qsd.export.fuse.ops import MAX_READ_BYTES, MAX_WRITE_BYTES, FuseFile, error_report

if TYPE_CHECKING:
    from qsd.aio import AioContext

# A whole WRITE request (headers plus max_write bytes) must fit: the kernel refuses reads
# into anything smaller than that (and than FUSE_MIN_READ_BUFFER).
BUFFER_SIZE: Final = (P.WRITE_DATA_OFFSET + MAX_WRITE_BYTES + 4095) & ~4095
assert BUFFER_SIZE >= P.FUSE_MIN_READ_BUFFER

# Below this a shrinking poll window stops; after this many wake-ups without polling, one
# full-length poll probes whether the workload has become synchronous again.
POLL_MIN_NS: Final = 1000
POLL_PROBE_INTERVAL: Final = 64

_EMPTY_REPLY_SIZE: Final = P.OUT_HEADER_SIZE
_WRITE_REPLY_SIZE: Final = P.WRITE_REPLY.size


class FuseQueue:
    """Reads requests from one /dev/fuse fd in one context and answers them there."""

    def __init__(self, file: FuseFile, ctx: AioContext, fd: int,
                 on_halt: Callable[[], None], *, exclusive: bool) -> None:
        self.file = file
        self.ctx = ctx
        self.fd = fd
        self._on_halt = on_halt
        # All fds of one connection become readable together, so every queue's loop
        # would wake for each request and all but one would read EAGAIN.  With several
        # queues, watch the fd through an epoll of our own registered EPOLLEXCLUSIVE:
        # the kernel then wakes one queue per request.
        self._epoll: select.epoll | None = None
        self._watch_fd = fd
        self._callback = self._on_readable
        if exclusive:
            self._epoll = select.epoll()
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
            self._watch_fd = self._epoll.fileno()
            self._callback = self._on_wake
        self._buf = bytearray(BUFFER_SIZE)
        self._view = memoryview(self._buf)
        # FileIO.readinto returns None on EAGAIN: cheaper than catching BlockingIOError.
        self._reader = io.FileIO(fd, "rb", closefd=False)
        self._tasks: set[asyncio.Task[None]] = set()
        # Requests being processed by tasks (in_use(); shutdown waits for them).
        self.in_flight = 0
        # Whether the fd reader is registered in ctx.loop (changed in ctx's thread only).
        self.attached = False
        # Set and cleared by the drain hooks from any thread: stop taking requests even
        # before the reader is gone, and do not attach while set.
        self.paused = False
        # Shutdown or halt: never attach again.
        self.stopped = False
        # Adaptive polling (see _keep_polling); the limit is ctx's poll-max-ns, read
        # each time so that a change (qom-set) applies at once.
        self._poll_ns = 0
        self._unpolled_wakeups = 0

    # -- reader management (in ctx's thread) --------------------------------------------

    def attach(self) -> None:
        if self.attached or self.paused or self.stopped or self.file.halted:
            return
        self._poll_ns = self.ctx.poll_max_ns
        self.ctx.loop.add_reader(self._watch_fd, self._callback)
        self.attached = True

    def detach(self) -> None:
        if self.attached:
            self.ctx.loop.remove_reader(self._watch_fd)
            self.attached = False

    def pause(self) -> None:
        """From any thread: stop taking requests now, detach the reader in ctx's loop."""
        self.paused = True
        self._in_ctx(self.detach)

    def resume(self) -> None:
        """From any thread: re-attach the reader in ctx's loop (unless paused again by
        the time that runs: the flag is what counts, not the order of callbacks)."""
        self.paused = False
        self._in_ctx(self.attach)

    def _in_ctx(self, fn: Callable[[], None]) -> None:
        if self.ctx.in_this_thread():
            fn()
        else:
            self.ctx.call_soon(fn)

    async def stop(self) -> None:
        """In ctx's loop: stop reading for good and wait for every request in flight."""
        self.stopped = True
        self.detach()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        """Releases the queue's own epoll (the /dev/fuse fd belongs to the export)."""
        if self._epoll is not None:
            self._epoll.close()

    # -- the request loop ------------------------------------------------------------------

    def _on_wake(self) -> None:
        # Consume the epoll's (level-triggered) event so that it re-arms, then drain.
        assert self._epoll is not None
        self._epoll.poll(0)
        self._on_readable()

    def _keep_polling(self, poll_start: int) -> bool:
        """Whether to retry the empty fd instead of returning to the loop.

        Going to sleep costs a wake-up for the next request, which dominates synchronous
        I/O (one request in flight: psync 4 KiB went from ~14k to ~45k IOPS with polling).
        Like QEMU's adaptive polling (iothread poll-max-ns): poll up to the current window;
        a poll that catches a request restores the full window, one that times out halves
        it, and with the window closed an occasional full-length probe checks again.
        """
        if self._poll_ns:
            if perf_counter_ns() - poll_start < min(self._poll_ns, self.ctx.poll_max_ns):
                return True
            self._poll_ns = self._poll_ns // 2 if self._poll_ns >= 2 * POLL_MIN_NS else 0
            return False
        self._unpolled_wakeups += 1
        if self._unpolled_wakeups >= POLL_PROBE_INTERVAL:
            self._unpolled_wakeups = 0
            self._poll_ns = self.ctx.poll_max_ns
        return False

    def _on_readable(self) -> None:
        readinto = self._reader.readinto
        buf = self._buf
        view = self._view
        fd = self.fd
        file = self.file
        blk = file.blk
        head = P.IN_HEADER_HEAD.unpack_from
        offset_size = P.RW_OFFSET_SIZE.unpack_from
        out_header = P.OUT_HEADER.pack
        write_reply = P.WRITE_REPLY.pack
        writev = os.writev
        write = os.write
        poll_start = 0
        while not self.paused:
            try:
                n = readinto(buf)
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                self._read_failed(e)
                return
            if n is None:
                if not poll_start:
                    poll_start = perf_counter_ns()
                if self._keep_polling(poll_start):
                    continue
                return
            if poll_start:
                # Polling caught the next request before the loop would have slept.
                self._poll_ns = self.ctx.poll_max_ns
                poll_start = 0
            if n < P.IN_HEADER_SIZE:
                self._halt(f"Incomplete read from FUSE device, expected at least "
                           f"{P.IN_HEADER_SIZE} bytes, read {n} bytes; cannot trust "
                           "subsequent requests, halting the export")
                return
            length, opcode, unique = head(buf, 0)
            if length != n:
                self._halt(f"Number of bytes read from FUSE device does not match request "
                           f"size, expected {length} bytes, read {n} bytes; cannot trust "
                           "subsequent requests, halting the export")
                return
            try:
                if opcode == P.READ and n >= P.WRITE_DATA_OFFSET:
                    offset, size = offset_size(buf, P.IN_HEADER_SIZE)
                    if size <= MAX_READ_BYTES and offset + size <= blk.length():
                        data = blk.read_nowait(offset, size)
                        if data is not None:
                            try:
                                writev(fd, (out_header(_EMPTY_REPLY_SIZE + size, 0, unique),
                                            data))
                            except OSError as e:
                                _write_failed(e)
                            continue
                    self._spawn(unique, file.read(offset, size))
                elif opcode == P.WRITE and n >= P.WRITE_DATA_OFFSET:
                    offset, size = offset_size(buf, P.IN_HEADER_SIZE)
                    end = P.WRITE_DATA_OFFSET + size
                    if n < end:
                        error_report(f"FUSE WRITE truncated; received "
                                     f"{n - P.WRITE_DATA_OFFSET} bytes of {size}")
                        self._reply_error(unique, errno.EINVAL)
                        continue
                    if (file.writable and size <= MAX_WRITE_BYTES
                            and offset + size <= blk.length()
                            and blk.write_nowait(offset, view[P.WRITE_DATA_OFFSET:end])):
                        try:
                            write(fd, write_reply(_WRITE_REPLY_SIZE, 0, unique, size, 0))
                        except OSError as e:
                            _write_failed(e)
                        continue
                    self._spawn(unique, file.write(offset, bytes(buf[P.WRITE_DATA_OFFSET:end])))
                else:
                    self._dispatch(opcode, unique, n)
            except OSError as e:
                self._reply_error(unique, e.errno or errno.EIO)
            except Exception as e:  # noqa: BLE001 - the kernel must get an answer regardless
                error_report(f"FUSE request {opcode} failed: {e!r}")
                self._reply_error(unique, errno.EIO)

    def _dispatch(self, opcode: int, unique: int, n: int) -> None:
        """Everything but the READ/WRITE fast path (QEMU's fuse_co_process_request)."""
        need = P.OP_HEADER_SIZE.get(opcode)
        if need is None:
            self._reply_error(unique, errno.ENOSYS)
            return
        if n < P.IN_HEADER_SIZE + need:
            error_report(f"FUSE request truncated, expected {P.IN_HEADER_SIZE + need} bytes, "
                         f"read {n} bytes")
            self._reply_error(unique, errno.EINVAL)
            return
        file = self.file
        if opcode == P.GETATTR:
            self._reply(unique, file.getattr())
        elif opcode == P.OPEN:
            self._reply(unique, file.open())
        elif opcode in (P.RELEASE, P.DESTROY):
            self._reply(unique, b"")
        elif opcode == P.LOOKUP:
            # There is no node but the root node.
            self._reply_error(unique, errno.ENOENT)
        elif opcode in (P.FORGET, P.BATCH_FORGET):
            # No reply, nothing to do.
            pass
        elif opcode == P.INIT:
            self._reply(unique, file.init(self._view[P.IN_HEADER_SIZE:n]))
        elif opcode == P.STATFS:
            self._reply(unique, file.statfs())
        else:
            # Requests that wait for the block layer; their task owns a copy of the body.
            body = bytes(self._buf[P.IN_HEADER_SIZE:n])
            if opcode == P.SETATTR:
                self._spawn(unique, file.setattr(body))
            elif opcode == P.FALLOCATE:
                self._spawn(unique, file.fallocate(body))
            elif opcode == P.LSEEK:
                self._spawn(unique, file.lseek(body))
            else:  # FSYNC, FLUSH
                self._spawn(unique, file.flush())

    # -- requests that wait ----------------------------------------------------------------

    def _spawn(self, unique: int, work: Awaitable[bytes | None]) -> None:
        self.in_flight += 1
        task = self.ctx.loop.create_task(self._answer(unique, work))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self.in_flight -= 1

    async def _answer(self, unique: int, work: Awaitable[bytes | None]) -> None:
        try:
            payload = await work
        except OSError as e:
            self._reply_error(unique, e.errno or errno.EIO)
        except Exception as e:  # noqa: BLE001 - the kernel must get an answer regardless
            error_report(f"FUSE request failed: {e!r}")
            self._reply_error(unique, errno.EIO)
        else:
            self._reply(unique, payload or b"")

    # -- replies ------------------------------------------------------------------------------

    def _reply(self, unique: int, payload: bytes) -> None:
        header = P.OUT_HEADER.pack(P.OUT_HEADER_SIZE + len(payload), 0, unique)
        try:
            os.writev(self.fd, (header, payload))
        except OSError as e:
            _write_failed(e)

    def _reply_error(self, unique: int, code: int) -> None:
        try:
            os.write(self.fd, P.OUT_HEADER.pack(P.OUT_HEADER_SIZE, -code, unique))
        except OSError as e:
            _write_failed(e)

    # -- failures ------------------------------------------------------------------------------

    def _read_failed(self, e: OSError) -> None:
        """The connection is gone (ENODEV: unmounted or aborted) or broken: stop reading
        from this fd instead of spinning on an fd that stays readable."""
        if e.errno != errno.ENODEV:
            error_report(f"Failed to read from FUSE device: {os.strerror(e.errno or 0)}")
        self.stopped = True
        self.detach()

    def _halt(self, message: str) -> None:
        error_report(message)
        self._on_halt()


def _write_failed(e: OSError) -> None:
    """A reply the kernel no longer wants (ENOENT: the request was interrupted; ENODEV:
    the connection was aborted) is fine; anything else is worth a line on stderr."""
    if e.errno not in (errno.ENOENT, errno.ENODEV):
        error_report(f"Failed to write to FUSE device: {os.strerror(e.errno or 0)}")
