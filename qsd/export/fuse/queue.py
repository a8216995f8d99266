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
from typing import TYPE_CHECKING, Final, Protocol

from qsd.aio import wait_tasks
from qsd.errors import error_report
from qsd.export.fuse import protocol as P
from qsd.export.fuse.ops import MAX_READ_BYTES, MAX_WRITE_BYTES, FuseFile

if TYPE_CHECKING:
    from qsd.aio import AioContext

class QueueRing(Protocol):
    """What a queue asks of its io_uring (uring_queue.FuseRing, which serves the queue:
    the dependency goes that way only)."""

    def register(self) -> None: ...
    def attach(self) -> None: ...
    def detach(self) -> None: ...
    def reap(self) -> None: ...
    def close(self) -> None: ...


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

# How a request that is answered later gets its answer out: (payload, 0) or (None, errno).
Done = Callable[[bytes | None, int], None]


class QueueGroup:
    """What the /dev/fuse queues of one export know of each other.

    Every request makes all the connection's fds readable, and every queue that wakes
    for it needs the GIL.  A queue that wakes while enough siblings are draining the
    shared request queue would only take the GIL from them (and, polling, again and
    again) for requests that they read anyway: it parks instead, with its reader removed,
    and the last sibling to stop draining re-arms the parked ones.  "Enough" is one per
    two CPUs (the clients need the others): one on a two-CPU machine.  Counters and the
    list change under the GIL only.
    """

    def __init__(self) -> None:
        self.max_draining = max(1, (os.cpu_count() or 1) // 2)
        self.draining = 0
        self.parked: list[FuseQueue] = []

    def unpark(self) -> None:
        parked, self.parked = self.parked, []
        for queue in parked:
            queue.run_in_ctx(queue.attach)


class FuseQueue:
    """Reads requests from one /dev/fuse fd in one context and answers them there."""

    def __init__(self, file: FuseFile, ctx: AioContext, fd: int,
                 on_halt: Callable[[], None], on_init: Callable[[], None], *,
                 group: QueueGroup | None) -> None:
        self.file = file
        self.ctx = ctx
        self.fd = fd
        self._on_halt = on_halt
        self._on_init = on_init
        # FUSE over io_uring: set up by the export; requests come through it once the
        # kernel has agreed in INIT and every queue has registered its entries.
        self.ring: QueueRing | None = None
        self.ring_active = False
        # All fds of one connection become readable together, so every queue's loop
        # would wake for each request and all but one would read EAGAIN.  With several
        # queues, watch the fd through an epoll of our own registered EPOLLEXCLUSIVE:
        # the kernel then wakes one queue per request.
        self._epoll: select.epoll | None = None
        self._watch_fd = fd
        self._callback = self._on_readable
        self._group = group
        if group is not None:
            self._epoll = select.epoll()
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLEXCLUSIVE)
            self._watch_fd = self._epoll.fileno()
            self._callback = self._on_wake
        self._buf = bytearray(BUFFER_SIZE)
        self._view = memoryview(self._buf)
        # FileIO.readinto returns None on EAGAIN: cheaper than catching BlockingIOError.
        self._reader = io.FileIO(fd, "rb", closefd=False)
        # Requests being processed by tasks; shutdown and drains wait for them.
        self.tasks: set[asyncio.Task[None]] = set()
        # Requests whose answer has not gone out yet (in_use()).  It drops before the
        # answer is sent: once the client has its answer, a block-export-del it sends
        # next must not find the request still counted.
        self.in_flight = 0
        # Whether the fd reader is registered in ctx.loop (changed in ctx's thread only).
        self.attached = False
        # Set and cleared by the drain hooks from any thread: stop taking requests even
        # before the reader is gone, and do not attach while set.
        self.paused = False
        # Shutdown or halt: never attach again.
        self.stopped = False
        # Adaptive polling (see keep_polling); the limit is ctx's poll-max-ns, read
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
        if self.ring_active and self.ring is not None:
            self.ring.attach()

    def detach(self) -> None:
        if self.attached:
            self.ctx.loop.remove_reader(self._watch_fd)
            self.attached = False
        if self.ring is not None:
            self.ring.detach()

    def start_ring(self) -> None:
        """In ctx's thread, after INIT agreed on io_uring: register the ring's entries
        and serve its completions from now on."""
        ring = self.ring
        if ring is None or self.stopped:
            return
        try:
            ring.register()
        except OSError as e:
            error_report(f"Failed to register FUSE ring entries: {e.strerror}")
            return
        self.ring_active = True
        if self.attached:
            ring.attach()

    def pause(self) -> None:
        """From any thread: stop taking requests now, detach the reader in ctx's loop."""
        self.paused = True
        self.run_in_ctx(self.detach)

    def resume(self) -> None:
        """From any thread: re-attach the reader in ctx's loop (unless paused again by
        the time that runs: the flag is what counts, not the order of callbacks)."""
        self.paused = False
        self.run_in_ctx(self.attach)

    def run_in_ctx(self, fn: Callable[[], None]) -> None:
        if self.ctx.in_this_thread():
            fn()
        else:
            self.ctx.call_soon(fn)

    async def stop(self) -> None:
        """In ctx's loop: stop reading for good and wait for every request in flight.
        A ring goes on being entered until the unmount is over (FuseRing.reap)."""
        self.stopped = True
        self.detach()
        if self.ring is not None:
            self.ring.reap()
        await wait_tasks(self.tasks)

    async def close_ring(self) -> None:
        """In ctx's loop (the ring's thread, whose loop watches it), after the unmount."""
        if self.ring is not None:
            self.ring.close()
            self.ring = None
            self.ring_active = False

    def close(self) -> None:
        """Releases the queue's own epoll (the /dev/fuse fd belongs to the export)."""
        if self._epoll is not None:
            self._epoll.close()

    # -- the request loop ------------------------------------------------------------------

    def _on_wake(self) -> None:
        """A queue of several: drain unless a sibling already does (see QueueGroup)."""
        assert self._epoll is not None and self._group is not None
        # Consume the epoll's (level-triggered) event so that it re-arms.
        self._epoll.poll(0)
        group = self._group
        if group.draining >= group.max_draining:
            self.detach()
            group.parked.append(self)
            return
        group.draining += 1
        try:
            self._on_readable()
        finally:
            group.draining -= 1
            if not group.draining and group.parked:
                group.unpark()

    def keep_polling(self, poll_start: int) -> bool:
        """Whether to retry the empty fd instead of returning to the loop.

        Going to sleep costs a wake-up for the next request, which dominates synchronous
        I/O (one request in flight: psync 4 KiB went from ~14k to ~45k IOPS with polling).
        Like QEMU's adaptive polling (iothread poll-max-ns): poll up to the current window;
        a poll that catches a request restores the full window, one that times out halves
        it, and with the window closed an occasional full-length probe checks again.
        """
        # Called for every look at the empty fd: no method call until the window closes.
        if self._poll_ns:
            if perf_counter_ns() - poll_start < min(self._poll_ns, self.ctx.poll_max_ns):
                return True
            self.poll_missed()
            return False
        self._count_unpolled()
        return False

    def poll_window(self) -> int:
        """How long (ns) to look for the next request before the loop sleeps; 0 when the
        window is closed (which counts towards the next probe)."""
        if self._poll_ns:
            return min(self._poll_ns, self.ctx.poll_max_ns)
        self._count_unpolled()
        return 0

    def _count_unpolled(self) -> None:
        self._unpolled_wakeups += 1
        if self._unpolled_wakeups >= POLL_PROBE_INTERVAL:
            self._unpolled_wakeups = 0
            self._poll_ns = self.ctx.poll_max_ns

    def poll_missed(self) -> None:
        """A whole window passed without a request: halve it (close it below the minimum)."""
        self._poll_ns = self._poll_ns // 2 if self._poll_ns >= 2 * POLL_MIN_NS else 0

    def poll_caught(self) -> None:
        """Polling caught the next request before the loop would have slept."""
        self._poll_ns = self.ctx.poll_max_ns

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
                # With the ring serving, this fd carries no requests worth polling for.
                if self.ring_active:
                    return
                if not poll_start:
                    poll_start = perf_counter_ns()
                if self.keep_polling(poll_start):
                    continue
                return
            if poll_start:
                self.poll_caught()
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
                    self.spawn(file.read(offset, size), self._replier(unique))
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
                    self.spawn(file.write(offset, bytes(buf[P.WRITE_DATA_OFFSET:end])),
                               self._replier(unique))
                elif opcode == P.INIT:
                    if self._init(unique, n):
                        # Requests come through the ring from now on: leave this fd
                        # alone unless the kernel still sends something here.
                        return
                else:
                    self._dispatch(opcode, unique, n)
            except OSError as e:
                self._reply_error(unique, e.errno or errno.EIO)
            except Exception as e:  # noqa: BLE001 - the kernel must get an answer regardless
                error_report(f"FUSE request {opcode} failed: {e!r}")
                self._reply_error(unique, errno.EIO)

    def _init(self, unique: int, n: int) -> bool:
        """FUSE_INIT, which only ever comes through /dev/fuse; True once the ring took
        over (the other queues start theirs through the export's hook)."""
        if n < P.IN_HEADER_SIZE + P.INIT_IN_COMPAT.size:
            self._dispatch(P.INIT, unique, n)
            return False
        self._reply(unique, self.file.init(self._view[P.IN_HEADER_SIZE:n]))
        if self.file.uring_agreed:
            self._on_init()
        return self.ring_active

    def _dispatch(self, opcode: int, unique: int, n: int) -> None:
        """A /dev/fuse request other than the READ/WRITE fast path."""
        need = P.OP_HEADER_SIZE.get(opcode)
        if need is None:
            self._reply_error(unique, errno.ENOSYS)
            return
        if n < P.IN_HEADER_SIZE + need:
            error_report(f"FUSE request truncated, expected {P.IN_HEADER_SIZE + need} bytes, "
                         f"read {n} bytes")
            self._reply_error(unique, errno.EINVAL)
            return
        self.dispatch(opcode, self._view[P.IN_HEADER_SIZE:n], self._replier(unique))

    def dispatch(self, opcode: int, body: memoryview, done: Done) -> None:
        """Everything but READ/WRITE and INIT, from either path (QEMU's
        fuse_co_process_request); ``body`` is the opcode's header and what follows."""
        file = self.file
        if opcode == P.GETATTR:
            done(file.getattr(), 0)
        elif opcode == P.OPEN:
            done(file.open(), 0)
        elif opcode in (P.RELEASE, P.DESTROY):
            done(b"", 0)
        elif opcode == P.LOOKUP:
            # There is no node but the root node.
            done(None, errno.ENOENT)
        elif opcode in (P.FORGET, P.BATCH_FORGET):
            # No reply, nothing to do.
            pass
        elif opcode == P.STATFS:
            done(file.statfs(), 0)
        elif opcode not in P.OP_HEADER_SIZE or opcode == P.INIT:
            done(None, errno.ENOSYS)
        else:
            # Requests that wait for the block layer; their task owns a copy of the body.
            data = bytes(body)
            if opcode == P.SETATTR:
                self.spawn(file.setattr(data), done)
            elif opcode == P.FALLOCATE:
                self.spawn(file.fallocate(data), done)
            elif opcode == P.LSEEK:
                self.spawn(file.lseek(data), done)
            else:  # FSYNC, FLUSH
                self.spawn(file.flush(), done)

    # -- requests that wait ----------------------------------------------------------------

    def spawn(self, work: Awaitable[bytes | None], done: Done) -> None:
        self.in_flight += 1
        task = self.ctx.loop.create_task(self._answer(work, done))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _answer(self, work: Awaitable[bytes | None], done: Done) -> None:
        payload: bytes | None = None
        code = 0
        try:
            payload = await work
        except OSError as e:
            code = e.errno or errno.EIO
        except Exception as e:  # noqa: BLE001 - the kernel must get an answer regardless
            error_report(f"FUSE request failed: {e!r}")
            code = errno.EIO
        self.in_flight -= 1
        done(None if code else payload or b"", code)

    # -- replies ------------------------------------------------------------------------------

    def _replier(self, unique: int) -> Done:
        def reply(payload: bytes | None, code: int) -> None:
            if code or payload is None:
                self._reply_error(unique, code or errno.EIO)
            else:
                self._reply(unique, payload)
        return reply

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
