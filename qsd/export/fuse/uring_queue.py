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
from qsd.export.fuse.io_uring import CQE, CQE_SIZE, SQE_CMD_OFFSET, SQE_SIZE, Ring, uring_cmd_sqe
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

# struct fuse_uring_cmd_req: flags, commit_id, qid
_CMD_REQ: Final = struct.Struct("=QQH6x")
_COMMIT_ID_AT: Final = SQE_CMD_OFFSET + 8
_U32: Final = struct.Struct("=I")
_U64: Final = struct.Struct("=Q")
_IOVEC2: Final = struct.Struct("=QQQQ")
OUT_HEADER_SIZE: Final = P.OUT_HEADER_SIZE
_WRITE_OUT_SIZE: Final = P.WRITE_OUT.size
_WRITE_REPLY_SIZE: Final = P.OUT_HEADER_SIZE + P.WRITE_OUT.size


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
    """One queue's io_uring and the ring entries it registered for the CPU queues ``qids``."""

    def __init__(self, queue: FuseQueue, qids: list[int], *, single_issuer: bool,
                 shares_gil: bool) -> None:
        self.queue = queue
        self.qids = qids
        # With sibling queues in other threads, io_uring_enter (the kernel's share of a
        # whole batch) runs without the GIL so that they can serve meanwhile; alone, the
        # hand-off would only cost.
        self._release_gil = shares_gil
        n = len(qids) * ENTRIES_PER_QID
        self.entries = n
        # A queue whose thread never changes lets the kernel defer the ring's task work
        # to our own io_uring_enter calls (no interrupt per request); one that follows
        # its node between threads must let any thread submit.
        self.ring = Ring(1 << (n - 1).bit_length(), single_issuer=single_issuer)
        # All buffers in one anonymous mapping: header buffers, payload buffers, and
        # the two iovecs per entry that tell the kernel where they are.
        self._payload_base = n * HEADER_STRIDE
        iov_base = self._payload_base + n * PAYLOAD_SIZE
        self._mem = mmap.mmap(-1, iov_base + n * _IOVEC2.size)
        # Holds the mapping's address for the kernel (and keeps it exported until close).
        self._anchor = ctypes.c_char.from_buffer(self._mem)
        base = ctypes.addressof(self._anchor)
        self.view = memoryview(self._mem)
        fd = queue.fd
        self._register: list[bytes] = []
        self._commit: list[bytes] = []
        for e in range(n):
            iov = iov_base + e * _IOVEC2.size
            _IOVEC2.pack_into(self._mem, iov, base + e * HEADER_STRIDE, HEADER_SIZE,
                              base + self._payload_base + e * PAYLOAD_SIZE, PAYLOAD_SIZE)
            qid = qids[e // ENTRIES_PER_QID]
            self._register.append(uring_cmd_sqe(fd, FUSE_IO_URING_CMD_REGISTER, base + iov,
                                                2, e, _CMD_REQ.pack(0, 0, qid)))
            self._commit.append(uring_cmd_sqe(fd, FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
                                              base + iov, 2, e, _CMD_REQ.pack(0, 0, qid)))
        # Entries the kernel still holds or that hold a request; failed ones drop out.
        self.live = 0
        # Entries registered again after the kernel gave them back without a request
        # (until their next request): a second failure in a row drops them for good.
        self._rearmed = [False] * n
        self.attached = False
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
        for sqe in self._register:
            ring.push(sqe)
        ring.submit(release_gil=True)
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

    def close(self) -> None:
        """Closes the ring (the kernel cancels the entries waiting for requests) and
        releases the buffers (once; the queue closes it when it stops)."""
        if self.ring.fd < 0:
            return
        self.detach()
        self.ring.close()
        os.close(self._wake_fd)
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
        """Serves completions until the ring runs dry (and the poll window closes).

        READ and WRITE that the block layer finishes at once are answered inline with
        everything in locals, queueing the commit SQE without a method call: this loop
        is the whole per-request cost in Python.  The rest goes through ``_serve``.
        """
        if not self.attached:
            # A look scheduled by attach() that a detach overtook.
            return
        queue = self.queue
        ring = self.ring
        mem = self.view
        sqes = ring.sqes
        cq = ring.cq_ring
        cq32 = ring.cq32
        cq_head_i = ring.cq_head_i
        cq_tail_i = ring.cq_tail_i
        cq_mask = ring.cq_mask
        cqes_at = ring.cqes_offset
        sq_mask = ring.sq_mask
        commit = self._commit
        rearmed = self._rearmed
        file = queue.file
        blk = file.blk
        payload_base = self._payload_base
        unpack_cqe = CQE.unpack_from
        unpack_head = P.IN_HEADER_HEAD.unpack_from
        unpack_rw = P.RW_OFFSET_SIZE.unpack_from
        pack_out = P.OUT_HEADER.pack_into
        pack_write_out = P.WRITE_OUT.pack_into
        pack_u32 = _U32.pack_into
        pack_u64 = _U64.pack_into
        READ = P.READ
        WRITE = P.WRITE
        release_gil = self._release_gil
        poll_start = 0
        while True:
            # One system call commits the answers of the last batch and runs the task
            # work that copies newly arrived requests into their entries.
            ring.submit(release_gil=release_gil)
            if queue.paused:
                # Paused (drain, deletion): every answer is out, new requests stay in
                # the completion ring until the queue resumes.
                return
            head = cq32[cq_head_i]
            tail = cq32[cq_tail_i]
            if head == tail:
                if not poll_start:
                    poll_start = perf_counter_ns()
                if queue.keep_polling(poll_start):
                    continue
                return
            if poll_start:
                queue.poll_caught()
                poll_start = 0
            sq_tail = ring.sq_tail
            for index in range(head, tail if tail >= head else tail + 0x100000000):
                e, res = unpack_cqe(cq, cqes_at + (index & cq_mask) * CQE_SIZE)
                if res >= 0:
                    rearmed[e] = False
                    h = e * HEADER_STRIDE
                    _length, opcode, unique = unpack_head(mem, h)
                    # The inline paths raise what the driver raised (ENOSPC from a full
                    # file system, EIO): the kernel must get it as the answer.
                    try:
                        if opcode == READ:
                            offset, size = unpack_rw(mem, h + HEADER_OP_IN)
                            if size <= PAYLOAD_SIZE and offset + size <= blk.length():
                                data = blk.read_nowait(offset, size)
                                if data is not None:
                                    p = payload_base + e * PAYLOAD_SIZE
                                    size = len(data)
                                    mem[p:p + size] = data
                                    pack_out(mem, h, OUT_HEADER_SIZE + size, 0, unique)
                                    pack_u32(mem, h + ENT_PAYLOAD_SZ, size)
                                    at = (sq_tail & sq_mask) * SQE_SIZE
                                    sqes[at:at + SQE_SIZE] = commit[e]
                                    pack_u64(sqes, at + _COMMIT_ID_AT, unique)
                                    sq_tail = (sq_tail + 1) & 0xFFFFFFFF
                                    continue
                        elif opcode == WRITE and file.writable:
                            offset, size = unpack_rw(mem, h + HEADER_OP_IN)
                            p = payload_base + e * PAYLOAD_SIZE
                            if (size <= MAX_WRITE_BYTES and offset + size <= blk.length()
                                    and blk.write_nowait(offset, mem[p:p + size])):
                                pack_write_out(mem, p, size, 0)
                                pack_out(mem, h, _WRITE_REPLY_SIZE, 0, unique)
                                pack_u32(mem, h + ENT_PAYLOAD_SZ, _WRITE_OUT_SIZE)
                                at = (sq_tail & sq_mask) * SQE_SIZE
                                sqes[at:at + SQE_SIZE] = commit[e]
                                pack_u64(sqes, at + _COMMIT_ID_AT, unique)
                                sq_tail = (sq_tail + 1) & 0xFFFFFFFF
                                continue
                    except OSError as err:
                        ring.sq_tail = sq_tail
                        self._commit_error(e, unique, err.errno or errno.EIO)
                        sq_tail = ring.sq_tail
                        continue
                # Anything else may queue SQEs of its own through the ring.
                ring.sq_tail = sq_tail
                if res < 0:
                    self._entry_failed(e, -res)
                else:
                    self._serve(e)
                sq_tail = ring.sq_tail
            ring.sq_tail = sq_tail
            cq32[cq_head_i] = tail

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
        _U64.pack_into(ring.sqes, ring.push(self._commit[e]) + _COMMIT_ID_AT, unique)

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
                self.ring.submit(release_gil=self._release_gil)
            except OSError as err:
                error_report(f"Failed to commit FUSE replies to the ring: {err.strerror}")
        return reply

    def _entry_failed(self, e: int, code: int) -> None:
        """A command that ended without a request: the connection is going away, the
        thread that registered the entry has ended (the queue followed its node to another
        thread), or the kernel refused the entry.  Registering it again from this thread
        keeps the kernel's queue supplied; where the connection is gone that fails, too,
        and the entry is dropped."""
        if not self._rearmed[e] and not self.queue.stopped:
            self._rearmed[e] = True
            self.ring.push(self._register[e])
            return
        self.live -= 1
        if code not in (errno.ENOTCONN, errno.ECONNABORTED, errno.ECANCELED, errno.ENODEV):
            error_report(f"FUSE ring entry {e} failed: {errno.errorcode.get(code, code)}")

