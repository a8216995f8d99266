"""FUSE over io_uring for one queue: the hot path when the kernel carries requests in rings.

The kernel keeps one FUSE ring queue per possible CPU and hands a request to the queue of
the CPU its caller runs on.  Each qsd queue (one per AioContext) owns one io_uring and
registers ring entries for its share of those CPU queues (``FUSE_IO_URING_CMD_REGISTER``).
An entry is a header buffer (``struct fuse_uring_req_header``: the in/out header, the
opcode's own header, the entry's payload size and commit id) and a payload buffer.  A
request arrives as a completion of the entry's command; the answer is written into the
same buffers and handed back with ``FUSE_IO_URING_CMD_COMMIT_AND_FETCH``, which also puts
the entry back in line for the next request.  One ``io_uring_enter`` per batch commits
every answer of the batch and picks up the requests that arrived meanwhile, where the
/dev/fuse path needs a ``read`` and a ``write`` per request.

Everything here runs in the queue's loop thread, like queue.py.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
from collections.abc import Callable
from time import perf_counter_ns
from typing import TYPE_CHECKING, Final

from qsd.errors import error_report
from qsd.export.fuse import protocol as P
from qsd.export.fuse.io_uring import (
    IORING_SQ_TASKRUN,
    SQE_CMD_OFFSET,
    SQE_SIZE,
    Ring,
    uring_cmd_sqe,
)
from qsd.export.fuse.ops import MAX_WRITE_BYTES

if TYPE_CHECKING:
    from qsd.export.fuse.queue import FuseQueue

# enum fuse_uring_cmd
FUSE_IO_URING_CMD_REGISTER: Final = 1
FUSE_IO_URING_CMD_COMMIT_AND_FETCH: Final = 2

# struct fuse_uring_req_header: in_out[128], op_in[128], struct fuse_uring_ent_in_out
# (flags, commit_id, payload_sz, padding, reserved)
HEADER_OP_IN: Final = 128
HEADER_ENT_IN_OUT: Final = 256
HEADER_SIZE: Final = 256 + 32
ENT_PAYLOAD_SZ: Final = HEADER_ENT_IN_OUT + 16
# Header buffers are laid out at this stride, so that each starts on a cache line.
HEADER_STRIDE: Final = 320

# The kernel refuses entries whose payload buffer is smaller than its largest request:
# max(FUSE_MIN_READ_BUFFER, max_write, max_pages * PAGE_SIZE).  We never negotiate
# FUSE_MAX_PAGES, so max_pages stays at the kernel's default of 32.
PAYLOAD_SIZE: Final = max(P.FUSE_MIN_READ_BUFFER, MAX_WRITE_BYTES, 32 * 4096)

# Ring entries per CPU queue: enough for fio's iodepth 16 from two jobs on one CPU.
ENTRIES_PER_QID: Final = 32

# How long one turn of serving a ring may keep its loop before the loop's other work
# (a sibling ring of the same thread, callbacks from other threads) runs.
TURN_NS: Final = 1_000_000

# struct fuse_uring_cmd_req: flags, commit_id, qid
_CMD_REQ: Final = struct.Struct("=QQH6x")
_U32: Final = struct.Struct("=I")
_U64: Final = struct.Struct("=Q")
_IOVEC2: Final = struct.Struct("=QQQQ")
OUT_HEADER_SIZE: Final = P.OUT_HEADER_SIZE
_WRITE_OUT_SIZE: Final = P.WRITE_OUT.size
_WRITE_REPLY_SIZE: Final = P.OUT_HEADER_SIZE + P.WRITE_OUT.size

# The request loop reads and writes the buffers through u32 and u64 views.  Entry e's
# header buffer starts at u32 index e * _H32 (u64 index e * _H64); in it: the in/out
# header's len and opcode/error (u32 0 and 1: the reply's len and error are one
# little-endian u64 store) and unique (u64 1, where the reply's unique goes as well),
# READ/WRITE's offset (u64 17) and size (u32 36), and the entry's payload_sz (u32 68).
# In an SQE (u64 stride 16): the command's commit_id.
_H32: Final = HEADER_STRIDE // 4
_H64: Final = HEADER_STRIDE // 8
_OPCODE: Final = 1
_UNIQUE: Final = 1
_RW_OFFSET: Final = (HEADER_OP_IN + 8) // 8
_RW_SIZE: Final = (HEADER_OP_IN + 16) // 4
_PAYLOAD_SZ: Final = ENT_PAYLOAD_SZ // 4
_SQE64: Final = SQE_SIZE // 8
# Not an opcode: see _entry_failed.
_REARMED: Final = 0xFFFFFFFF
_COMMIT_ID: Final = (SQE_CMD_OFFSET + 8) // 8


def possible_cpus() -> int:
    """The kernel's number of FUSE ring queues: num_possible_cpus()."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return 1
    count = 0
    for part in text.split(","):
        first, _, last = part.partition("-")
        count += int(last or first) - int(first) + 1
    return count


class FuseRing:
    """One queue's io_uring and the ring entries it registered for the CPU queues ``qids``.

    SQE slot ``e`` holds entry e's ``COMMIT_AND_FETCH`` command and slot ``n + e`` its
    ``REGISTER`` command, written once: answering a request queues its slot and patches
    the commit id (the request's unique) into it.
    """

    def __init__(self, queue: FuseQueue, qids: list[int], *, single_issuer: bool,
                 shares_gil: bool) -> None:
        self.queue = queue
        self.qids = qids
        n = len(qids) * ENTRIES_PER_QID
        self.entries = n
        # A queue whose thread never changes lets the kernel defer the ring's task work
        # to our own io_uring_enter calls (no interrupt per request); one that follows
        # its node between threads must let any thread submit.  With sibling queues in
        # other threads, io_uring_enter (the kernel's share of a whole batch) runs
        # without the GIL so that they can serve meanwhile; alone, the hand-off would
        # only cost.
        self.ring = Ring(1 << (2 * n - 1).bit_length(), single_issuer=single_issuer,
                         release_gil=shares_gil)
        # All buffers in one anonymous mapping: header buffers, payload buffers, and
        # the two iovecs per entry that tell the kernel where they are.
        self._payload_base = n * HEADER_STRIDE
        iov_base = self._payload_base + n * PAYLOAD_SIZE
        self._mem = mmap.mmap(-1, iov_base + n * _IOVEC2.size)
        # Holds the mapping's address for the kernel (and keeps it exported until close).
        self._anchor = ctypes.c_char.from_buffer(self._mem)
        base = ctypes.addressof(self._anchor)
        self.view = memoryview(self._mem)
        self._mem32 = self.view.cast("I")
        self._mem64 = self.view.cast("Q")
        fd = queue.fd
        for e in range(n):
            iov = iov_base + e * _IOVEC2.size
            _IOVEC2.pack_into(self._mem, iov, base + e * HEADER_STRIDE, HEADER_SIZE,
                              base + self._payload_base + e * PAYLOAD_SIZE, PAYLOAD_SIZE)
            req = _CMD_REQ.pack(0, 0, qids[e // ENTRIES_PER_QID])
            self.ring.put(e, uring_cmd_sqe(fd, FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
                                           base + iov, 2, e, req))
            self.ring.put(n + e, uring_cmd_sqe(fd, FUSE_IO_URING_CMD_REGISTER, base + iov,
                                               2, e, req))
        # Entries the kernel still holds or that hold a request; failed ones drop out.
        self.live = 0
        self.attached = False
        # From the queue's stop until close: the ring is only entered (see reap).
        self.reaping = False
        # The ring defers its task work to our io_uring_enter calls (no interrupts while
        # we run), so its fd does not wake a sleeping loop: this eventfd does.
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    # -- set-up and tear-down (in the queue's thread, except close) ------------------------

    def register(self) -> None:
        """Hands every entry to the kernel; requests flow through the ring once every
        CPU queue of the connection has an entry."""
        ring = self.ring
        ring.enable()
        ring.register_eventfd(self._wake_fd)
        for e in range(self.entries):
            ring.queue(self.entries + e)
        ring.submit()
        self.live = self.entries

    def attach(self) -> None:
        if not self.attached:
            loop = self.queue.ctx.loop
            loop.add_reader(self._wake_fd, self._on_wake)
            self.attached = True
            # Requests that arrived while detached may have signalled the eventfd
            # before: look at the ring once instead of waiting for the next signal.
            loop.call_soon(self._on_ready)

    def detach(self) -> None:
        if self.attached:
            self.queue.ctx.loop.remove_reader(self._wake_fd)
            self.attached = False

    def reap(self) -> None:
        """When the queue stops, in its thread: keep entering the ring, dropping what
        comes back, until it is closed.

        Requests still reach the entries after the queue stopped serving (a RELEASE the
        kernel sends after the client's close, requests that came as the drain began).
        With deferred task work the kernel copies such a request into its entry only
        when this thread enters the ring, and until then the request counts as waiting
        for the connection: the unmount's abort ends requests that are in an entry, but
        the unmount then waits for every one (fuse_wait_aborted), and the ring used to
        be closed only after the unmount.  Entered here, the request reaches its entry
        unanswered, like an unread request on /dev/fuse, and the abort ends it.
        """
        if self.reaping or self.live == 0 or self.ring.fd < 0:
            return
        self.reaping = True
        self.queue.ctx.loop.add_reader(self._wake_fd, self._on_reap_wake)
        # Work that came while the eventfd was silent is not signalled: look now.
        self.ring.arm_eventfd()
        self._reap()

    def _on_reap_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        self._reap()

    def _reap(self) -> None:
        ring = self.ring
        cq32 = ring.cq32
        cqe_s32 = ring.cqe_s32
        while True:
            try:
                ring.submit()
            except OSError as err:
                error_report(f"Failed to enter the FUSE ring while stopping: {err.strerror}")
                return
            head = cq32[ring.cq_head_i]
            tail = cq32[ring.cq_tail_i]
            if head == tail:
                return
            for index in range(head, tail if tail >= head else tail + 0x100000000):
                if cqe_s32[4 * (index & ring.cq_mask) + 2] < 0:
                    self.live -= 1
            cq32[ring.cq_head_i] = tail

    def close(self) -> None:
        """Closes the ring (the kernel cancels the entries waiting for requests) and
        releases the buffers (once, in the queue's thread, after the unmount)."""
        if self.ring.fd < 0:
            return
        self.detach()
        if self.reaping:
            self.queue.ctx.loop.remove_reader(self._wake_fd)
            self.reaping = False
        self.ring.close()
        os.close(self._wake_fd)
        self._mem32.release()
        self._mem64.release()
        self.view.release()
        del self._anchor
        self._mem.close()

    # -- the request loop ------------------------------------------------------------------

    def _on_wake(self) -> None:
        try:
            os.eventfd_read(self._wake_fd)
        except BlockingIOError:
            pass
        self._on_ready()

    def _on_ready(self) -> None:
        """Serves the ring until it runs dry (and the poll window closes) or its turn
        ends.

        While it serves, the eventfd stays silent: the loop enters the kernel anyway.
        When the ring runs dry the loop polls for up to the poll window (the adaptive
        window of queue.py), then arms the eventfd again and returns to the event loop
        unless work came meanwhile.
        """
        if not self.attached:
            # A look scheduled by attach() (or by a turn that ended) that a detach
            # overtook.
            return
        ring = self.ring
        ring.silence_eventfd()
        try:
            turn_over = self._serve_batches()
        finally:
            pending = ring.arm_eventfd()
        # Work that came while the eventfd was silent will not be signalled, and a turn
        # that ended early has work left: look again after the loop's other work.
        if (turn_over or pending) and self.attached and not self.queue.paused:
            self.queue.ctx.loop.call_soon(self._on_ready)

    def _serve_batches(self) -> bool:
        """The loop of _on_ready: one io_uring_enter per batch commits the answers of
        the last batch and runs the task work that copies newly arrived requests into
        their entries.  READ and WRITE that the block layer finishes at once are
        answered inline with everything in locals, through the u32/u64 views: this
        loop is the whole per-request cost in Python.  The rest goes through
        ``_serve``.

        True when the turn ended (TURN_NS) with the ring still busy: under steady load
        the ring never runs dry for a whole poll window, and the loop's other work (a
        sibling ring in the same thread, a pause or stop from another thread) would
        wait for as long as the load lasts."""
        queue = self.queue
        ring = self.ring
        mem = self.view
        mem32 = self._mem32
        mem64 = self._mem64
        sqe64 = ring.sqe64
        sq32 = ring.sq32
        sq_array_i = ring.sq_array_i
        sq_mask = ring.sq_mask
        cq32 = ring.cq32
        cq_head_i = ring.cq_head_i
        cq_tail_i = ring.cq_tail_i
        cq_mask = ring.cq_mask
        cqe64 = ring.cqe64
        cqe_s32 = ring.cqe_s32
        submit = ring.submit
        sq_flags_i = ring.sq_flags_i
        release_gil = ring.release_gil
        file = queue.file
        blk = file.blk
        length = blk.length
        read_nowait = blk.read_nowait
        write_nowait = blk.write_nowait
        payload_base = self._payload_base
        READ = P.READ
        WRITE = P.WRITE
        TASKRUN = IORING_SQ_TASKRUN
        polled = False
        turn_end = perf_counter_ns() + TURN_NS
        submit()
        while True:
            if queue.paused:
                # Paused (drain, deletion): every answer is out, new requests stay in
                # the completion ring until the queue resumes.
                return False
            head = cq32[cq_head_i]
            tail = cq32[cq_tail_i]
            if head == tail:
                if not polled and (window := queue.poll_window()):
                    polled = True
                    if release_gil:
                        # Sibling queues want the GIL: sleep in the kernel until the
                        # next request (it wakes us) or the window closes.
                        ring.wait(window)
                    else:
                        # Alone: spin on the shared memory, where deferred task work
                        # shows in the SQ flags, and enter the kernel only once
                        # something came (the wake-up of a sleeping thread costs tens
                        # of µs on a VM).
                        deadline = perf_counter_ns() + window
                        while perf_counter_ns() < deadline:
                            if cq32[cq_tail_i] != tail or sq32[sq_flags_i] & TASKRUN:
                                submit()
                                break
                    continue
                if polled:
                    queue.poll_missed()
                    polled = False
                if not ring.arm_eventfd():
                    return False
                # Work came before the eventfd was armed: it will not be signalled.
                ring.silence_eventfd()
                submit()
                continue
            if polled:
                queue.poll_caught()
                polled = False
            sq_tail = ring.sq_tail
            for index in range(head, tail if tail >= head else tail + 0x100000000):
                i = index & cq_mask
                e = cqe64[i + i]
                if cqe_s32[4 * i + 2] >= 0:
                    h32 = e * _H32
                    h64 = e * _H64
                    opcode = mem32[h32 + _OPCODE]
                    # The inline paths raise what the driver raised (ENOSPC from a full
                    # file system, EIO): the kernel must get it as the answer.
                    try:
                        if opcode == READ:
                            offset = mem64[h64 + _RW_OFFSET]
                            size = mem32[h32 + _RW_SIZE]
                            if size <= PAYLOAD_SIZE and offset + size <= length():
                                data = read_nowait(offset, size)
                                if data is not None:
                                    p = payload_base + e * PAYLOAD_SIZE
                                    size = len(data)
                                    mem[p:p + size] = data
                                    # len and error (0) in one store; the unique
                                    # is where the request had it.
                                    mem64[h64] = OUT_HEADER_SIZE + size
                                    mem32[h32 + _PAYLOAD_SZ] = size
                                    sqe64[e * _SQE64 + _COMMIT_ID] = mem64[h64 + _UNIQUE]
                                    sq32[sq_array_i + (sq_tail & sq_mask)] = e
                                    sq_tail = (sq_tail + 1) & 0xFFFFFFFF
                                    continue
                        elif opcode == WRITE and file.writable:
                            offset = mem64[h64 + _RW_OFFSET]
                            size = mem32[h32 + _RW_SIZE]
                            p = payload_base + e * PAYLOAD_SIZE
                            if (size <= MAX_WRITE_BYTES and offset + size <= length()
                                    and write_nowait(offset, mem[p:p + size])):
                                # fuse_write_out in the payload (size, padding 0)
                                # and the out header's len and error.
                                mem64[p >> 3] = size
                                mem64[h64] = _WRITE_REPLY_SIZE
                                mem32[h32 + _PAYLOAD_SZ] = _WRITE_OUT_SIZE
                                sqe64[e * _SQE64 + _COMMIT_ID] = mem64[h64 + _UNIQUE]
                                sq32[sq_array_i + (sq_tail & sq_mask)] = e
                                sq_tail = (sq_tail + 1) & 0xFFFFFFFF
                                continue
                    except OSError as err:
                        ring.sq_tail = sq_tail
                        self._commit_error(e, mem64[h64 + _UNIQUE], err.errno or errno.EIO)
                        sq_tail = ring.sq_tail
                        continue
                    # Anything else may queue SQEs of its own through the ring.
                    ring.sq_tail = sq_tail
                    self._serve(e)
                else:
                    ring.sq_tail = sq_tail
                    self._entry_failed(e, -cqe_s32[4 * i + 2])
                sq_tail = ring.sq_tail
            ring.sq_tail = sq_tail
            cq32[cq_head_i] = tail
            submit()
            if perf_counter_ns() > turn_end:
                # The batch's answers are out; what came meanwhile waits one turn of
                # the loop.
                return True

    def _serve(self, e: int) -> None:
        """A request in entry ``e`` that the inline fast path did not answer: READ and
        WRITE that wait for the block layer, and every other opcode."""
        mem = self.view
        h = e * HEADER_STRIDE
        p = self._payload_base + e * PAYLOAD_SIZE
        _length, opcode, unique = P.IN_HEADER_HEAD.unpack_from(mem, h)
        queue = self.queue
        file = queue.file
        try:
            if opcode == P.READ:
                offset, size = P.RW_OFFSET_SIZE.unpack_from(mem, h + HEADER_OP_IN)
                if size > PAYLOAD_SIZE:
                    raise OSError(errno.EINVAL, "READ larger than the ring's buffer")
                queue.spawn(file.read(offset, size), self._replier(e, unique))
            elif opcode == P.WRITE:
                offset, size = P.RW_OFFSET_SIZE.unpack_from(mem, h + HEADER_OP_IN)
                queue.spawn(file.write(offset, bytes(mem[p:p + size])),
                            self._replier(e, unique))
            else:
                # The opcode's header is in op_in, anything after it in the payload.
                (payload_sz,) = _U32.unpack_from(mem, h + ENT_PAYLOAD_SZ)
                body = bytes(mem[h + HEADER_OP_IN:h + HEADER_ENT_IN_OUT]) + bytes(
                    mem[p:p + payload_sz])
                queue.dispatch(opcode, memoryview(body), self._replier(e, unique))
        except OSError as err:
            self._commit_error(e, unique, err.errno or errno.EIO)
        except Exception as err:  # noqa: BLE001 - the kernel must get an answer regardless
            error_report(f"FUSE request {opcode} failed: {err!r}")
            self._commit_error(e, unique, errno.EIO)

    # -- replies --------------------------------------------------------------------------------

    def _commit_reply(self, e: int, h: int, unique: int, size: int) -> None:
        mem = self.view
        P.OUT_HEADER.pack_into(mem, h, P.OUT_HEADER_SIZE + size, 0, unique)
        _U32.pack_into(mem, h + ENT_PAYLOAD_SZ, size)
        self._push_commit(e, unique)

    def _commit_error(self, e: int, unique: int, code: int) -> None:
        h = e * HEADER_STRIDE
        P.OUT_HEADER.pack_into(self.view, h, P.OUT_HEADER_SIZE, -code, unique)
        _U32.pack_into(self.view, h + ENT_PAYLOAD_SZ, 0)
        self._push_commit(e, unique)

    def _push_commit(self, e: int, unique: int) -> None:
        ring = self.ring
        ring.sqe64[e * _SQE64 + _COMMIT_ID] = unique
        ring.queue(e)

    def _replier(self, e: int, unique: int) -> Callable[[bytes | None, int], None]:
        """The answer of a request that did not finish in the batch that took it: commit
        it on its own (its entry stays ours until then, buffers included)."""
        def reply(payload: bytes | None, code: int) -> None:
            if code or payload is None:
                self._commit_error(e, unique, code or errno.EIO)
            else:
                p = self._payload_base + e * PAYLOAD_SIZE
                self.view[p:p + len(payload)] = payload
                self._commit_reply(e, e * HEADER_STRIDE, unique, len(payload))
            try:
                self.ring.submit()
            except OSError as err:
                error_report(f"Failed to commit FUSE replies to the ring: {err.strerror}")
        return reply

    def _entry_failed(self, e: int, code: int) -> None:
        """A command that ended without a request: the connection is going away, the
        thread that registered the entry has ended (the queue followed its node to another
        thread), or the kernel refused the entry.  Registering it again from this thread
        keeps the kernel's queue supplied; where the connection is gone that fails, too,
        and the entry is dropped."""
        # An entry registered again is marked in its header buffer, where the opcode of
        # its next request (and then our answer's error) overwrites the mark: a second
        # failure in a row finds it and drops the entry for good.
        at = e * _H32 + _OPCODE
        if self._mem32[at] != _REARMED and not self.queue.stopped:
            self._mem32[at] = _REARMED
            self.ring.queue(self.entries + e)
            return
        self.live -= 1
        if code not in (errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED, errno.ENODEV):
            error_report(f"FUSE ring entry {e} failed: {errno.errorcode.get(code, code)}")

