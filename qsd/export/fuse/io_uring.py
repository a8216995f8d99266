"""A minimal io_uring: the three system calls through ctypes and the rings as mmaps.

Only what FUSE over io_uring needs: 128-byte SQEs carrying ``IORING_OP_URING_CMD``
commands, submitted in batches, and 16-byte CQEs read straight from the shared
completion ring.  SQEs stay where they were written: the user owns the SQE slots and
submits one by putting its number into the submission ring's index array, so that a
command that is sent again and again is written once and queued with one store.  No
liburing: the wheel on PyPI stops with SIGILL on some x86 CPUs and the system has none,
and the kernel ABI used here has been stable since Linux 5.19.

Memory ordering: the kernel and this process share the ring indices.  On x86-64 (TSO)
aligned 32-bit loads and stores through a memoryview are atomic and neither loads nor
stores are reordered with one another, which is all the ring protocol needs without
SQPOLL; ``available()`` therefore refuses other architectures.  The one place that
needs a store ordered before a later load (re-arming the eventfd, then looking for work
that came while it was off) takes a lock, whose atomic read-modify-write is a full
barrier on x86.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
from typing import Final, Literal

# x86-64 system call numbers
_SYS_IO_URING_SETUP: Final = 425
_SYS_IO_URING_ENTER: Final = 426
_SYS_IO_URING_REGISTER: Final = 427

IORING_SETUP_R_DISABLED: Final = 1 << 6
IORING_SETUP_TASKRUN_FLAG: Final = 1 << 9
IORING_SETUP_SINGLE_ISSUER: Final = 1 << 12
IORING_SETUP_DEFER_TASKRUN: Final = 1 << 13
IORING_REGISTER_EVENTFD: Final = 4
IORING_REGISTER_ENABLE_RINGS: Final = 12

IORING_SETUP_SQE128: Final = 1 << 10
IORING_FEAT_SINGLE_MMAP: Final = 1 << 0
IORING_ENTER_GETEVENTS: Final = 1 << 0
IORING_ENTER_EXT_ARG: Final = 1 << 3
IORING_CQ_EVENTFD_DISABLED: Final = 1 << 0
IORING_SQ_TASKRUN: Final = 1 << 2
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
# struct io_uring_getevents_arg: sigmask, sigmask_sz, min_wait_usec, ts
_GETEVENTS_ARG: Final = struct.Struct("=QIIQ")
# Its size as the system call's size_t argument (a bare int would go as a C int, whose
# register's upper half the kernel would read as well).
_GETEVENTS_ARG_SIZE: Final = ctypes.c_size_t(_GETEVENTS_ARG.size)

# The C library is already in the process: find_library would run ldconfig (twice) at
# every start of the daemon.
_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
# The same function without releasing the GIL (Ring's release_gil).
_syscall_gil = ctypes.PyDLL(None, use_errno=True).syscall
_syscall_gil.restype = ctypes.c_long


# Taken and released for its memory barrier only (see the module's docstring).
_barrier = threading.Lock()


def available() -> str | None:
    """None if rings can be set up here, else why not (for messages and test skips)."""
    machine = os.uname().machine
    if machine != "x86_64":
        return f"io_uring rings are only driven on x86_64, not {machine}"
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            if f.read().strip() not in ("", "0"):
                return "io_uring is disabled (kernel.io_uring_disabled)"
    except OSError:
        pass
    return None


def uring_cmd_sqe(fd: int, cmd_op: int, addr: int, length: int, user_data: int,
                  cmd: bytes) -> bytes:
    """A complete 128-byte ``IORING_OP_URING_CMD`` SQE (to ``put`` into a slot)."""
    sqe = bytearray(SQE_SIZE)
    _URING_CMD_SQE.pack_into(sqe, 0, IORING_OP_URING_CMD, 0, 0, fd, cmd_op, 0, addr, length,
                             0, user_data)
    sqe[SQE_CMD_OFFSET:SQE_CMD_OFFSET + len(cmd)] = cmd
    return bytes(sqe)


class Ring:
    """One io_uring instance with 128-byte SQEs; used by one thread at a time.

    ``release_gil``: whether submitting lets other threads run meanwhile.  Submitting
    commands that only commit replies takes microseconds, less than handing the GIL to
    another thread and back, so a ring whose thread has nobody to share with keeps it.
    Waiting (``wait``) always releases it.
    """

    def __init__(self, entries: int, *, single_issuer: bool = False,
                 release_gil: bool = False) -> None:
        params = ctypes.create_string_buffer(_PARAMS.size)
        flags = IORING_SETUP_SQE128
        if single_issuer:
            flags |= (IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN
                      | IORING_SETUP_TASKRUN_FLAG | IORING_SETUP_R_DISABLED)
        self.single_issuer = single_issuer
        self.fd = self._setup(entries, params, flags)
        (sq_entries, cq_entries, _flags, _cpu, _idle, features, _wq,
         sq_head, sq_tail, sq_mask, _sq_n, sq_flags, _dropped, sq_array, _r1, _u1,
         cq_head, cq_tail, cq_mask, _cq_n, _overflow, cqes, cq_flags, _r2, _u2,
         ) = _PARAMS.unpack_from(params.raw, 0)
        self.sq_entries = sq_entries
        self.cq_entries = cq_entries
        sq_size = sq_array + sq_entries * 4
        cq_size = cqes + cq_entries * CQE_SIZE
        self._maps: list[mmap.mmap] = []
        self._views: list[memoryview] = []
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
        # Everything a request loop touches is a memoryview of the shared memory, read
        # and written by index (cheaper than struct calls): the u32 views of the rings
        # with the positions of their heads and tails, the CQEs as u64 (user_data at
        # 2*i) and as s32 (res at 4*i+2), the SQEs as u64.
        self.sq32 = self._view(sq_ring, 0, sq_size, "I")
        self.cq32 = self._view(cq_ring, 0, cq_size, "I")
        self.cqe64 = self._view(cq_ring, cqes, cq_entries * CQE_SIZE, "Q")
        self.cqe_s32 = self._view(cq_ring, cqes, cq_entries * CQE_SIZE, "i")
        self.sqe64 = self._view(self.sqes, 0, sq_entries * SQE_SIZE, "Q")
        self.sq_head_i = sq_head // 4
        self.sq_tail_i = sq_tail // 4
        self.sq_array_i = sq_array // 4
        # IORING_SQ_TASKRUN there: deferred task work (arrived requests) waits for an
        # io_uring_enter, so that a poll can look without entering the kernel.
        self.sq_flags_i = sq_flags // 4
        self.cq_head_i = cq_head // 4
        self.cq_tail_i = cq_tail // 4
        self.cq_flags_i = cq_flags // 4
        self.sq_mask: int = self.sq32[sq_mask // 4]
        self.cq_mask: int = self.cq32[cq_mask // 4]
        # Our copy of the SQ tail: slots queued up to it; ``submit`` publishes it.
        self.sq_tail: int = self.sq32[self.sq_tail_i]
        self.release_gil = release_gil
        self._enter = _syscall if release_gil else _syscall_gil
        # A ring with deferred task work runs it (copying arrived requests into their
        # buffers) only when asked to, in io_uring_enter with GETEVENTS.
        self._enter_flags = IORING_ENTER_GETEVENTS if single_issuer else 0
        # io_uring_getevents_arg and its timespec, for waits with a timeout.
        self._timeout = (ctypes.c_int64 * 2)()
        self._wait_arg = ctypes.create_string_buffer(_GETEVENTS_ARG.size)
        _GETEVENTS_ARG.pack_into(self._wait_arg, 0, 0, 0, 0, ctypes.addressof(self._timeout))

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

    def _view(self, m: mmap.mmap, offset: int, size: int,
              fmt: Literal["I", "Q", "i"]) -> memoryview:
        whole = memoryview(m)
        part = whole[offset:offset + size]
        view = part.cast(fmt)
        self._views += (view, part, whole)
        return view

    def enable(self) -> None:
        """Makes the calling thread the ring's only submitter (single_issuer rings)."""
        if self.single_issuer:
            self._register(IORING_REGISTER_ENABLE_RINGS, None, 0)

    def register_eventfd(self, fd: int) -> None:
        """Signals ``fd`` whenever completions (or, with deferred task work, work that
        makes completions) arrive: what a loop waits on when the ring fd alone would
        not wake it.  ``eventfd_enabled`` turns that off while the loop serves."""
        self._register(IORING_REGISTER_EVENTFD, ctypes.byref(ctypes.c_int(fd)), 1)

    def silence_eventfd(self) -> None:
        """While a loop serves the ring (it enters the kernel anyway), signals of the
        eventfd would only cost: the kernel's wake-up on every batch and a needless
        turn of the loop afterwards."""
        self.cq32[self.cq_flags_i] |= IORING_CQ_EVENTFD_DISABLED

    def arm_eventfd(self) -> bool:
        """Lets the eventfd signal again; True if work came while it was silent, which
        it will not signal: completions, or deferred task work that makes them (a
        ``submit`` runs it)."""
        cq32 = self.cq32
        cq32[self.cq_flags_i] &= ~IORING_CQ_EVENTFD_DISABLED
        # The kernel adds work, sets IORING_SQ_TASKRUN, then reads the CQ flags; we
        # store the CQ flags, then read IORING_SQ_TASKRUN: one of us must see the
        # other's store, which takes a full barrier between our store and our load.
        with _barrier:
            pass
        return bool(self.sq32[self.sq_flags_i] & IORING_SQ_TASKRUN
                    or cq32[self.cq_head_i] != cq32[self.cq_tail_i])

    def _register(self, opcode: int, arg: object, nr_args: int) -> None:
        ret = _syscall(_SYS_IO_URING_REGISTER, self.fd, opcode, arg, nr_args)
        if ret < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"io_uring_register: {os.strerror(err)}")

    # -- submission ------------------------------------------------------------------------

    def put(self, slot: int, sqe: bytes) -> None:
        """Writes a whole SQE into ``slot`` (the caller's: none is in flight there)."""
        at = slot * SQE_SIZE
        self.sqes[at:at + SQE_SIZE] = sqe

    def queue(self, slot: int) -> None:
        """Queues the SQE in ``slot``; the kernel takes it at the next ``submit``."""
        tail = self.sq_tail
        self.sq32[self.sq_array_i + (tail & self.sq_mask)] = slot
        self.sq_tail = (tail + 1) & 0xFFFFFFFF

    def submit(self) -> int:
        """Publishes the queued SQEs and enters the kernel once, which also runs the
        deferred task work of completions that arrived meanwhile."""
        sq32 = self.sq32
        tail = self.sq_tail
        sq32[self.sq_tail_i] = tail
        ret = self._enter(_SYS_IO_URING_ENTER, self.fd,
                          (tail - sq32[self.sq_head_i]) & 0xFFFFFFFF, 0, self._enter_flags,
                          None, 0)
        if ret < 0:
            err = ctypes.get_errno()
            if err == errno.EINTR:
                return self.submit()
            raise OSError(err, f"io_uring_enter: {os.strerror(err)}")
        return int(ret)

    def wait(self, timeout_ns: int) -> None:
        """Submits what is queued and sleeps, without the GIL, until a completion is
        there or ``timeout_ns`` has passed (the caller looks at the ring afterwards)."""
        sq32 = self.sq32
        tail = self.sq_tail
        sq32[self.sq_tail_i] = tail
        timeout = self._timeout
        timeout[0], timeout[1] = divmod(timeout_ns, 1_000_000_000)
        ret = _syscall(_SYS_IO_URING_ENTER, self.fd, (tail - sq32[self.sq_head_i]) & 0xFFFFFFFF,
                       1, IORING_ENTER_GETEVENTS | IORING_ENTER_EXT_ARG, self._wait_arg,
                       _GETEVENTS_ARG_SIZE)
        if ret < 0:
            err = ctypes.get_errno()
            if err not in (errno.ETIME, errno.EINTR):
                raise OSError(err, f"io_uring_enter: {os.strerror(err)}")

    def close(self) -> None:
        """Unmaps the rings and closes the fd: the kernel cancels whatever is in flight."""
        for view in self._views:
            view.release()
        self._views.clear()
        for m in self._maps:
            m.close()
        self._maps.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
