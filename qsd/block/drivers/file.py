"""The ``file`` protocol driver: a regular file through an fd, like QEMU's file-posix.

Buffered reads and writes first try ``RWF_NOWAIT`` inline on the caller's loop (a page
cache hit costs one system call and no thread hop); everything else runs in the shared
pool.  With ``cache.direct`` the fd is O_DIRECT: the driver declares the probed request
alignment as its limit (the block layer pads requests to it, with read-modify-write for
partial writes) and moves the data through a page-aligned bounce buffer.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import stat
import struct
import threading
from typing import cast

from qsd.block.limits import BlockLimits
from qsd.block.locking import ImageLocks
from qsd.block.node import (
    BLOCK_DATA,
    BLOCK_OFFSET_VALID,
    BLOCK_ZERO,
    BlockNode,
    BlockStatus,
    ChildOpener,
    Data,
    NodeOptions,
    in_pool,
    strerror_oserror,
)
from qsd.block.permissions import PERM_ALL, PERM_RESIZE, PERM_WRITE
from qsd.block.registry import register
from qsd.errors import QMPError, warn_report
from qsd.qapi.generated import BlockdevCreateOptionsFile, BlockdevOptionsFile

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

# The C library is already in the process: find_library would run ldconfig to find it.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode, which the os module does not offer."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_preadv = os.preadv
_pwritev = os.pwritev
_NOWAIT = os.RWF_NOWAIT
_ZERO_CHUNK = 65536           # QEMU writes preallocated zeroes in pieces of this size
_MAX_BLOCKSIZE = 4096


_FS_IOC_FSGETXATTR = 0x801C581F   # _IOR('X', 31, struct fsxattr)
_FS_IOC_FSSETXATTR = 0x401C5820   # _IOW('X', 32, struct fsxattr)
_FSXATTR = struct.Struct("IIII4x8x")
_FS_XFLAG_EXTSIZE = 0x800
_FS_IOC_GETFLAGS = 0x80086601     # _IOR('f', 1, long)
_FS_IOC_SETFLAGS = 0x40086602     # _IOW('f', 2, long)
_FS_NOCOW_FL = 0x00800000
_LONG = struct.Struct("l")


def _allocate_first_block(fd: int, size: int) -> None:
    """Writes the first block of a new file, so that probing the alignment of an
    O_DIRECT open later reads real blocks (QEMU's allocate_first_block; failures are
    of no concern)."""
    try:
        os.pwrite(fd, bytes(512 if size < _MAX_BLOCKSIZE else _MAX_BLOCKSIZE), 0)
    except OSError:
        pass


def regular_truncate(fd: int, length: int, prealloc: str) -> None:
    """Resizes a regular file exactly to ``length``, preallocating what it adds
    (QEMU's handle_aiocb_truncate: its modes, order and texts).  Blocking."""
    if length >= 1 << 63:
        length -= 1 << 64              # a size the caller wrapped, as C's off_t sees it
    current = os.fstat(fd).st_size
    if prealloc == "falloc":
        if length != current:
            try:
                os.posix_fallocate(fd, current, length - current)
            except OSError as exc:
                raise strerror_oserror(exc, "Could not preallocate new data") from exc
            if current == 0:
                _allocate_first_block(fd, length)
        return
    if prealloc == "full":
        try:
            os.ftruncate(fd, length)
        except OSError as exc:
            raise strerror_oserror(exc, "Could not resize file") from exc
        pos, zeroes = current, bytes(_ZERO_CHUNK)
        while pos < length:
            try:
                pos += os.pwrite(fd, zeroes[:min(_ZERO_CHUNK, length - pos)], pos)
            except OSError as exc:
                raise strerror_oserror(exc, "Could not write zeros for preallocation") from exc
        try:
            os.fsync(fd)
        except OSError as exc:
            raise strerror_oserror(exc, "Could not flush file to disk") from exc
        return
    if prealloc != "off":
        raise OSError(errno.ENOTSUP, f"Unsupported preallocation mode: {prealloc}")
    try:
        os.ftruncate(fd, length)
    except OSError as exc:
        raise strerror_oserror(exc, "Could not resize file") from exc
    if current == 0 and length > 0:
        _allocate_first_block(fd, length)


def _set_nocow(fd: int) -> None:
    """Turns copy-on-write off (btrfs); only an optimisation, so errors are ignored."""
    try:
        attr = _LONG.unpack(fcntl.ioctl(fd, _FS_IOC_GETFLAGS, bytes(_LONG.size)))[0]
        fcntl.ioctl(fd, _FS_IOC_SETFLAGS, _LONG.pack(attr | _FS_NOCOW_FL))
    except OSError:
        pass


def _set_extent_size_hint(fd: int, hint: int) -> None:
    """XFS's extent size hint; OSError where the file system has none."""
    xflags, _, nextents, projid = _FSXATTR.unpack(
        fcntl.ioctl(fd, _FS_IOC_FSGETXATTR, bytes(_FSXATTR.size)))
    fcntl.ioctl(fd, _FS_IOC_FSSETXATTR,
                _FSXATTR.pack(xflags | _FS_XFLAG_EXTSIZE, hint, nextents, projid))


async def create_file(opts: BlockdevCreateOptionsFile, graph: object) -> None:
    """blockdev-create for ``file`` (QEMU's raw_co_create): an empty file of the size
    asked for, held locked meanwhile as a writer that lets nobody else resize it."""
    prealloc = opts.preallocation.value if opts.preallocation is not None else "off"
    hint = opts.extent_size_hint if opts.extent_size_hint is not None else 1 << 20
    if hint > 0xFFFFFFFF:
        raise QMPError("Extent size hint is too large")
    try:
        fd = os.open(opts.filename, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise QMPError(f"Could not create '{opts.filename}': "
                       f"{os.strerror(exc.errno or 0)}") from exc
    locks = ImageLocks(fd, opts.filename)
    try:
        locks.prepare(PERM_WRITE | PERM_RESIZE, PERM_ALL & ~PERM_RESIZE)
        locks.commit()
        await in_pool(regular_truncate, fd, 0, "off")
        if opts.nocow:
            _set_nocow(fd)
        try:
            _set_extent_size_hint(fd, hint)
        except OSError as exc:
            if opts.extent_size_hint:
                warn_report(f"Failed to set extent size hint: {os.strerror(exc.errno or 0)}")
        await in_pool(regular_truncate, fd, opts.size, prealloc)
    except OSError as exc:
        raise QMPError(exc.strerror or os.strerror(exc.errno or 0)) from exc
    finally:
        locks.release()
        os.close(fd)


class _Bounce(threading.local):
    """One page-aligned buffer per pool thread for O_DIRECT requests."""

    def __init__(self) -> None:
        self.buf = mmap.mmap(-1, 1 << 20)

    def get(self, size: int) -> mmap.mmap:
        if len(self.buf) < size:
            self.buf.close()
            self.buf = mmap.mmap(-1, (size + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1))
        return self.buf


_bounce = _Bounce()


@register("file", options=BlockdevOptionsFile, create=create_file)
class FileNode(BlockNode):
    is_protocol = True

    fd = -1
    locks: ImageLocks | None = None
    align = 1
    _filename = ""
    # Discards that reached the file (query-blockstats' driver-specific numbers).
    discard_nb_ok = 0
    discard_nb_failed = 0
    discard_bytes_ok = 0

    async def open(self, options: BlockdevOptionsFile, children: ChildOpener) -> None:
        aio = options.aio.value if options.aio is not None else "threads"
        locking = options.locking.value if options.locking is not None else "auto"
        self._filename = options.filename
        if not options.filename:
            raise QMPError("The 'file' block driver requires a file name")
        if aio == "native" and not self.opts.cache_direct:
            raise QMPError("aio=native was specified, but it requires cache.direct=on, "
                           "which was not specified.")
        self.fd = self._open(options.filename, self.opts)
        self.locks = ImageLocks(self.fd, options.filename) if locking != "off" else None
        self.align = self._probe_alignment() if self.opts.cache_direct else 1
        self._nowait_read = not self.opts.cache_direct
        # detect-zeroes has to look at every write: those take the long way.
        self._nowait_write = not self.opts.cache_direct and self.opts.detect_zeroes == "off"
        self._write_flags = _NOWAIT

    def _open(self, filename: str, opts: NodeOptions) -> int:
        flags = os.O_CLOEXEC | (os.O_DIRECT if opts.cache_direct else 0)
        try:
            try:
                fd = os.open(filename, flags | (os.O_RDONLY if opts.read_only else os.O_RDWR))
            except OSError as exc:
                if opts.read_only or not opts.auto_read_only or exc.errno not in (
                        errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                fd = os.open(filename, flags | os.O_RDONLY)
                self.read_only = True
        except OSError as exc:
            raise QMPError(f"Could not open '{filename}': {os.strerror(exc.errno or 0)}"
                           ) from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise QMPError(f"'file' driver requires '{filename}' to be a regular file")
        return fd

    def _probe_alignment(self) -> int:
        """The smallest O_DIRECT request size the file system accepts (as QEMU probes)."""
        buf = mmap.mmap(-1, 4096)
        try:
            for align in (512, 1024, 2048, 4096):
                try:
                    _preadv(self.fd, [memoryview(buf)[:align]], 0)
                    return align
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        return 4096
            return 4096
        finally:
            buf.close()

    def driver_limits(self, bl: BlockLimits) -> None:
        """O_DIRECT needs requests and buffers aligned to the probed size (buffers are
        ours to align: every O_DIRECT request goes through a page-aligned bounce)."""
        bl.request_alignment = self.align
        bl.min_mem_alignment = self.align
        bl.opt_mem_alignment = max(self.align, mmap.PAGESIZE)

    def exact_filename(self) -> str:
        return self._filename

    def get_length(self) -> int:
        return os.fstat(self.fd).st_size

    def allocated_size(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def format_specific(self) -> dict[str, object] | None:
        """file-posix's: the extent size hint where the file system has one (XFS)."""
        data: dict[str, object] = {}
        try:
            attr = fcntl.ioctl(self.fd, _FS_IOC_FSGETXATTR, bytes(_FSXATTR.size))
        except OSError:
            attr = None
        if attr is not None:
            extsize = _FSXATTR.unpack(attr)[1]
            if extsize:
                data["extent-size-hint"] = extsize
        return {"type": "file", "data": data}

    # ---- permissions: image locking ------------------------------------------------------

    def check_perm(self, perm: int, shared: int) -> None:
        if self.locks is not None:
            self.locks.prepare(perm, shared)

    def commit_perm(self) -> None:
        if self.locks is not None:
            self.locks.commit()

    def abort_perm(self) -> None:
        if self.locks is not None:
            self.locks.abort()

    # ---- fast paths ----------------------------------------------------------------------

    def read_nowait(self, offset: int, length: int) -> bytes | None:
        if not self._nowait_read:
            return None
        buf = bytearray(length)
        try:
            got = _preadv(self.fd, (buf,), offset, _NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait_read = False
                return None
            raise
        # bytearray: bytes-like without a copy into an immutable object.
        return cast(bytes, buf) if got == length else None

    def write_nowait(self, offset: int, data: Data, fua: bool = False) -> bool:
        # A growing write (a format allocating clusters at the end of its file) extends
        # the cached length as the long way does.
        if fua or not self._nowait_write:
            return False
        flags = self._write_flags  # once: another thread may clear it meanwhile
        try:
            done = _pwritev(self.fd, (data,), offset, flags)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL) and flags:
                # No buffered RWF_NOWAIT writes on this file system (ext4 before 6.x):
                # a write into the page cache is a memcpy, so it stays inline (measured
                # 171k 4 KiB writes/s inline against about 30k/s through the pool).
                self._write_flags = 0
                return self.write_nowait(offset, data, fua)
            raise
        end = offset + done
        if end > self.wr_highest_offset:
            self.wr_highest_offset = end
        if end > self._length:
            self.grew_to(end)
        return done == len(data)

    # ---- blocking primitives (run in the pool) ---------------------------------------------

    def _pread_full(self, offset: int, length: int) -> bytes:
        """Reads everything; past the end of the file reads zeroes (file-posix does too)."""
        buf = bytearray(length)
        view = memoryview(buf)
        done = 0
        while done < length:
            got = _preadv(self.fd, (view[done:],), offset + done)
            if got == 0:
                break
            done += got
        return cast(bytes, buf)

    def _pwrite_full(self, offset: int, data: Data, fua: bool) -> None:
        view = memoryview(data)
        done = 0
        while done < len(data):
            done += _pwritev(self.fd, (view[done:],), offset + done)
        self._fua(fua)

    def _direct_read(self, offset: int, length: int) -> bytes:
        """An aligned O_DIRECT read through this thread's aligned buffer."""
        view = memoryview(_bounce.get(length))[:length]
        got = 0
        while got < length:
            n = _preadv(self.fd, [view[got:]], offset + got)
            if n == 0:
                view[got:] = bytes(length - got)
                break
            got += n
        data = bytes(view)
        view.release()
        return data

    def _direct_write(self, offset: int, data: Data, fua: bool) -> None:
        """An aligned O_DIRECT write through this thread's aligned buffer."""
        length = len(data)
        view = memoryview(_bounce.get(length))[:length]
        view[:] = data
        done = 0
        while done < length:
            done += _pwritev(self.fd, [view[done:]], offset + done)
        view.release()
        self._fua(fua)

    def _fua(self, fua: bool) -> None:
        if fua and not self.opts.cache_no_flush:
            os.fdatasync(self.fd)

    def _zeroes_sync(self, offset: int, length: int, may_unmap: bool, fua: bool) -> None:
        """QEMU's order: punch a hole if unmapping is allowed, else ZERO_RANGE; ENOTSUP
        lets the block layer write zeroes instead."""
        if may_unmap and offset + length <= os.fstat(self.fd).st_size:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return self._fua(fua)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
        try:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE, offset, length)
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP)) from exc
            raise
        self._fua(fua)

    # ---- the driver's requests -------------------------------------------------------------

    async def do_read(self, offset: int, length: int) -> bytes:
        if self.align > 1:
            return await in_pool(self._direct_read, offset, length)
        return await in_pool(self._pread_full, offset, length)

    async def do_write(self, offset: int, data: Data, fua: bool) -> None:
        if self.align > 1:
            await in_pool(self._direct_write, offset, data, fua)
        else:
            await in_pool(self._pwrite_full, offset, data, fua)

    async def do_write_zeroes(self, offset: int, length: int, may_unmap: bool,
                              no_fallback: bool, fua: bool) -> None:
        await in_pool(self._zeroes_sync, offset, length, may_unmap, fua)

    async def do_discard(self, offset: int, length: int) -> None:
        # QEMU ignores -ENOTSUP from discard (the block layer does): it is only a hint.
        # Counted for query-blockstats as QEMU's raw_account_discard() does.
        try:
            await in_pool(fallocate, self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          offset, length)
        except OSError:
            self.discard_nb_failed += 1
            raise
        self.discard_nb_ok += 1
        self.discard_bytes_ok += length

    def specific_stats(self) -> dict[str, object]:
        return {"driver": "file", "discard-nb-ok": self.discard_nb_ok,
                "discard-nb-failed": self.discard_nb_failed,
                "discard-bytes-ok": self.discard_bytes_ok}

    async def do_flush(self) -> None:
        await in_pool(os.fdatasync, self.fd)

    async def do_truncate(self, length: int, exact: bool, prealloc: str) -> None:
        await in_pool(regular_truncate, self.fd, length, prealloc)

    async def do_block_status(self, want_zero: bool, offset: int, length: int) -> BlockStatus:
        """Data or hole from SEEK_DATA/SEEK_HOLE (QEMU's raw_co_block_status)."""
        if not want_zero:
            return BlockStatus(BLOCK_DATA | BLOCK_OFFSET_VALID, length, offset, self)
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:       # a trailing hole
                return BlockStatus(BLOCK_ZERO | BLOCK_OFFSET_VALID, length, offset, self)
            return BlockStatus(BLOCK_DATA | BLOCK_OFFSET_VALID, length, offset, self)
        if data > offset:
            return BlockStatus(BLOCK_ZERO | BLOCK_OFFSET_VALID, min(data - offset, length),
                               offset, self)
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            return BlockStatus(BLOCK_DATA | BLOCK_OFFSET_VALID, length, offset, self)
        count = -(-(hole - offset) // self.align) * self.align
        return BlockStatus(BLOCK_DATA | BLOCK_OFFSET_VALID, max(count, 1), offset, self)

    def close(self) -> None:
        if self.locks is not None:
            self.locks.release()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
