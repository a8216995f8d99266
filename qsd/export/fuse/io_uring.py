"""A minimal io_uring: the three system calls through ctypes and the rings as mmaps.

Only what FUSE over io_uring needs: 128-byte SQEs carrying ``IORING_OP_URING_CMD``
commands, submitted in batches, and 16-byte CQEs read straight from the shared
completion ring.  No liburing: the wheel on PyPI stops with SIGILL on some x86 CPUs and
the system has none, and the kernel ABI used here has been stable since Linux 5.19.

Memory ordering: the kernel and this process share the ring indices.  On x86-64 (TSO)
aligned 32-bit loads and stores through a memoryview are atomic and neither loads nor
stores are reordered with one another, which is all the ring protocol needs without
SQPOLL; ``available()`` therefore refuses other architectures.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import platform
import struct
from typing import Final

# x86-64 system call numbers
_SYS_IO_URING_SETUP: Final = 425
_SYS_IO_URING_ENTER: Final = 426
_SYS_IO_URING_REGISTER: Final = 427

IORING_SETUP_R_DISABLED: Final = 1 << 6
IORING_SETUP_SINGLE_ISSUER: Final = 1 << 12
IORING_SETUP_DEFER_TASKRUN: Final = 1 << 13
IORING_REGISTER_EVENTFD: Final = 4
IORING_REGISTER_ENABLE_RINGS: Final = 12

IORING_SETUP_SQE128: Final = 1 << 10
IORING_FEAT_SINGLE_MMAP: Final = 1 << 0
IORING_ENTER_GETEVENTS: Final = 1 << 0
IORING_OP_URING_CMD: Final = 46

_OFF_SQ_RING: Final = 0
_OFF_CQ_RING: Final = 0x8000000
_OFF_SQES: Final = 0x10000000

SQE_SIZE: Final = 128
CQE_SIZE: Final = 16
# Offset of the command area (80 bytes) in a 128-byte SQE.
SQE_CMD_OFFSET: Final = 48

# struct io_uring_params: sq_entries, cq_entries, flags, sq_thread_cpu, sq_thread_idle,
# features, wq_fd, resv[3], then io_sqring_offsets and io_cqring_offsets (each eight
# u32 and one u64).
_PARAMS: Final = struct.Struct("=IIIIIII12x" + "IIIIIIIIQ" + "IIIIIIIIQ")
# The head of a URING_CMD SQE: opcode, flags, ioprio, fd, cmd_op, pad, addr, len,
# uring_cmd_flags, user_data.
_URING_CMD_SQE: Final = struct.Struct("=BBHiIIQIIQ")
CQE: Final = struct.Struct("=Qi")

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
# The same function without releasing the GIL: submitting a batch that only commits
# replies takes microseconds, less than handing the GIL to another thread and back.
_syscall_gil = ctypes.PyDLL(ctypes.util.find_library("c"), use_errno=True).syscall
_syscall_gil.restype = ctypes.c_long


def available() -> str | None:
    """None if rings can be set up here, else why not (for messages and test skips)."""
    if platform.machine() != "x86_64":
        return f"io_uring rings are only driven on x86_64, not {platform.machine()}"
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            if f.read().strip() not in ("", "0"):
                return "io_uring is disabled (kernel.io_uring_disabled)"
    except OSError:
        pass
    return None


def uring_cmd_sqe(fd: int, cmd_op: int, addr: int, length: int, user_data: int,
                  cmd: bytes) -> bytes:
    """A complete 128-byte ``IORING_OP_URING_CMD`` SQE (a template to copy into the SQ)."""
    sqe = bytearray(SQE_SIZE)
    _URING_CMD_SQE.pack_into(sqe, 0, IORING_OP_URING_CMD, 0, 0, fd, cmd_op, 0, addr, length,
                             0, user_data)
    sqe[SQE_CMD_OFFSET:SQE_CMD_OFFSET + len(cmd)] = cmd
    return bytes(sqe)


class Ring:
    """One io_uring instance with 128-byte SQEs; used by one thread at a time."""

    def __init__(self, entries: int, *, single_issuer: bool = False) -> None:
        params = ctypes.create_string_buffer(_PARAMS.size)
        flags = IORING_SETUP_SQE128
        if single_issuer:
            flags |= (IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN
                      | IORING_SETUP_R_DISABLED)
        self.single_issuer = single_issuer
        self.fd = self._setup(entries, params, flags)
        (sq_entries, cq_entries, _flags, _cpu, _idle, features, _wq,
         sq_head, sq_tail, sq_mask, _sq_n, _sq_flags, _dropped, sq_array, _r1, _u1,
         cq_head, cq_tail, cq_mask, _cq_n, _overflow, cqes, _cq_flags, _r2, _u2,
         ) = _PARAMS.unpack_from(params.raw, 0)
        self.sq_entries = sq_entries
        self.cq_entries = cq_entries
        sq_size = sq_array + sq_entries * 4
        cq_size = cqes + cq_entries * CQE_SIZE
        self._maps: list[mmap.mmap] = []
        try:
            if features & IORING_FEAT_SINGLE_MMAP:
                sq_ring = cq_ring = self._map(max(sq_size, cq_size), _OFF_SQ_RING)
            else:
                sq_ring = self._map(sq_size, _OFF_SQ_RING)
                cq_ring = self._map(cq_size, _OFF_CQ_RING)
            self.sqes = self._map(sq_entries * SQE_SIZE, _OFF_SQES)
        except BaseException:
            self.close()
            raise
        self._sq_ring = sq_ring
        self.cq_ring = cq_ring
        self._sq32 = memoryview(sq_ring).cast("I")
        # The completion ring's u32 view and where its head and tail are in it, for
        # loops that read completions without a method call each.
        self.cq32 = memoryview(cq_ring).cast("I")
        self._sq_head_i = sq_head // 4
        self._sq_tail_i = sq_tail // 4
        self.cq_head_i = cq_head // 4
        self.cq_tail_i = cq_tail // 4
        self.sq_mask: int = self._sq32[sq_mask // 4]
        self.cq_mask: int = self.cq32[cq_mask // 4]
        self.cqes_offset = cqes
        # SQ slot i always holds SQE i: the indirection array is the identity.
        for i in range(sq_entries):
            self._sq32[sq_array // 4 + i] = i
        # Our copy of the SQ tail: SQEs up to it are filled in; ``submit`` publishes it.
        self.sq_tail: int = self._sq32[self._sq_tail_i]

    @staticmethod
    def _setup(entries: int, params: ctypes.Array[ctypes.c_char], flags: int) -> int:
        _PARAMS.pack_into(params, 0, 0, 0, flags, *([0] * 22))
        fd = _syscall(_SYS_IO_URING_SETUP, entries, params)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_setup: {os.strerror(err)}")
        return int(fd)

    def _map(self, size: int, offset: int) -> mmap.mmap:
        m = mmap.mmap(self.fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                      mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        self._maps.append(m)
        return m

    def enable(self) -> None:
        """Makes the calling thread the ring's only submitter (single_issuer rings)."""
        if self.single_issuer:
            self._register(IORING_REGISTER_ENABLE_RINGS, None, 0)

    def register_eventfd(self, fd: int) -> None:
        """Signals ``fd`` whenever completions (or, with deferred task work, work that
        makes completions) arrive: what a loop waits on when the ring fd alone would
        not wake it."""
        self._register(IORING_REGISTER_EVENTFD, ctypes.byref(ctypes.c_int(fd)), 1)

    def _register(self, opcode: int, arg: object, nr_args: int) -> None:
        ret = _syscall(_SYS_IO_URING_REGISTER, self.fd, opcode, arg, nr_args)
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_register: {os.strerror(err)}")

    # -- submission ------------------------------------------------------------------------

    def push(self, sqe: bytes) -> int:
        """Copies a whole SQE into the next free slot; returns the slot's byte offset (to
        patch fields in ``self.sqes``).  Visible to the kernel at the next ``submit``."""
        tail = self.sq_tail
        at = (tail & self.sq_mask) * SQE_SIZE
        self.sqes[at:at + SQE_SIZE] = sqe
        self.sq_tail = (tail + 1) & 0xFFFFFFFF
        return at

    def submit(self, wait: int = 0, *, release_gil: bool = False) -> int:
        """Publishes the pushed SQEs and enters the kernel once (also running completions'
        task work).  ``wait``: completions to block for, which always releases the GIL."""
        sq32 = self._sq32
        tail = self.sq_tail
        sq32[self._sq_tail_i] = tail
        pending = (tail - sq32[self._sq_head_i]) & 0xFFFFFFFF
        flags = IORING_ENTER_GETEVENTS if wait or self.single_issuer else 0
        call = _syscall if wait or release_gil else _syscall_gil
        while True:
            ret = call(_SYS_IO_URING_ENTER, self.fd, pending, wait, flags, None, 0)
            if ret >= 0:
                return int(ret)
            err = ctypes.get_errno()
            if err != 4:  # EINTR
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")

    # -- completion --------------------------------------------------------------------------

    def cqe(self, index: int) -> tuple[int, int]:
        """(user_data, res) of completion ``index`` (a head..tail counter value)."""
        user_data, res = CQE.unpack_from(self.cq_ring, self.cqes_offset
                                         + (index & self.cq_mask) * CQE_SIZE)
        return int(user_data), int(res)

    def close(self) -> None:
        """Unmaps the rings and closes the fd: the kernel cancels whatever is in flight."""
        for view in ("_sq32", "cq32"):
            mv = self.__dict__.pop(view, None)
            if mv is not None:
                mv.release()
        for m in self._maps:
            m.close()
        self._maps.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
