"""The ``file`` protocol driver: a regular file through an fd, like QEMU's file-posix.

Buffered reads and writes first try ``RWF_NOWAIT`` inline on the caller's loop (a page
cache hit costs one system call and no thread hop); everything else runs in the shared
pool.  With ``cache.direct`` the fd is O_DIRECT and every request goes through an aligned
bounce buffer, read-modify-write for unaligned writes, serialised against overlapping
writes so that no update is lost.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import stat
import threading
from typing import TYPE_CHECKING, Any, cast

from qsd.block.locking import ImageLocks
from qsd.block.node import (
    BLOCK_ALLOCATED,
    BLOCK_DATA,
    BLOCK_EOF,
    BLOCK_OFFSET_VALID,
    BLOCK_ZERO,
    BlockNode,
    Data,
    NodeOptions,
    in_pool,
    strerror_oserror,
)
from qsd.errors import QMPError

if TYPE_CHECKING:
    from qsd.aio import AioContext

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode, which the os module does not offer."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_preadv = os.preadv
_pwritev = os.pwritev
_NOWAIT = os.RWF_NOWAIT
_ZERO_CHUNK = 1 << 20


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


class FileNode(BlockNode):
    driver = "file"
    format_name = "file"

    def __init__(self, node_name: str, opts: NodeOptions, ctx: AioContext, *, filename: str,
                 locking: str = "auto", aio: str = "threads") -> None:
        super().__init__(node_name, opts, ctx)
        self._filename = filename
        self.aio = aio
        if aio == "native" and not opts.cache_direct:
            raise QMPError("aio=native was specified, but it requires cache.direct=on, "
                           "which was not specified.")
        self.fd = self._open(filename, opts)
        self.locks = ImageLocks(self.fd, filename) if locking != "off" else None
        self.align = self._probe_alignment() if opts.cache_direct else 1
        self._nowait_read = not opts.cache_direct
        self._nowait_write = not opts.cache_direct
        self._write_flags = _NOWAIT
        self._ranges: list[tuple[int, int]] = []
        self._ranges_cond = threading.Condition()

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

    @property
    def filename(self) -> str:
        return self._filename

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

    def length(self) -> int:
        return os.fstat(self.fd).st_size

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
        if fua or self._detect or not self._nowait_write:
            return False
        try:
            done = _pwritev(self.fd, (data,), offset, self._write_flags)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL) and self._write_flags:
                # No buffered RWF_NOWAIT writes on this file system (ext4 before 6.x):
                # a write into the page cache is a memcpy, so it stays inline (measured
                # 171k 4 KiB writes/s inline against about 30k/s through the pool).
                self._write_flags = 0
                return self.write_nowait(offset, data, fua)
            raise
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
        if fua:
            self._flush_sync()

    def _direct_read(self, offset: int, length: int) -> bytes:
        start = offset - offset % self.align
        end = -(-(offset + length) // self.align) * self.align
        buf = _bounce.get(end - start)
        view = memoryview(buf)[:end - start]
        got = 0
        while got < end - start:
            n = _preadv(self.fd, [view[got:]], start + got)
            if n == 0:
                break
            got += n
        if got < end - start:
            view[got:] = bytes(end - start - got)
        data = bytes(view[offset - start:offset - start + length])
        view.release()
        return data

    def _direct_write(self, offset: int, data: Data, fua: bool) -> None:
        start = offset - offset % self.align
        end = -(-(offset + len(data)) // self.align) * self.align
        self._claim(start, end)
        try:
            buf = _bounce.get(end - start)
            view = memoryview(buf)[:end - start]
            if start != offset or end != offset + len(data):
                got = 0
                while got < end - start:
                    n = _preadv(self.fd, [view[got:]], start + got)
                    if n == 0:
                        view[got:] = bytes(end - start - got)
                        break
                    got += n
            view[offset - start:offset - start + len(data)] = data
            done = 0
            while done < end - start:
                done += _pwritev(self.fd, [view[done:]], start + done)
            view.release()
        finally:
            self._release(start, end)
        if fua:
            self._flush_sync()

    def _claim(self, start: int, end: int) -> None:
        """Waits until no other O_DIRECT write covers [start, end), then takes it."""
        with self._ranges_cond:
            while any(s < end and start < e for s, e in self._ranges):
                self._ranges_cond.wait()
            self._ranges.append((start, end))

    def _release(self, start: int, end: int) -> None:
        with self._ranges_cond:
            self._ranges.remove((start, end))
            self._ranges_cond.notify_all()

    def _flush_sync(self) -> None:
        if not self.opts.cache_no_flush:
            os.fdatasync(self.fd)

    def _zeroes_sync(self, offset: int, length: int, may_unmap: bool, no_fallback: bool,
                     fua: bool) -> None:
        """QEMU's order: punch a hole if unmapping is allowed, else ZERO_RANGE, else write."""
        size = self.length()
        if may_unmap and offset + length <= size:
            try:
                fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
                return self._fua(fua)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                    raise
        try:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE, offset, length)
            return self._fua(fua)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                raise
        if no_fallback:
            raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
        pos = offset
        while pos < offset + length:
            chunk = min(_ZERO_CHUNK, offset + length - pos)
            self._write_sync(pos, bytes(chunk), False)
            pos += chunk
        self._fua(fua)

    def _fua(self, fua: bool) -> None:
        if fua:
            self._flush_sync()

    def _write_sync(self, offset: int, data: Data, fua: bool) -> None:
        if self.opts.cache_direct:
            self._direct_write(offset, data, fua)
        else:
            self._pwrite_full(offset, data, fua)

    def _truncate_sync(self, length: int, prealloc: str) -> None:
        old = self.length()
        try:
            if prealloc == "falloc" and length > old:
                os.posix_fallocate(self.fd, old, length - old)
            elif prealloc == "full" and length > old:
                os.ftruncate(self.fd, length)
                self._zeroes_sync(old, length - old, False, False, False)
            elif prealloc not in ("off", "falloc", "full"):
                raise OSError(errno.ENOTSUP,
                              f"Preallocation mode '{prealloc}' unsupported for this storage")
            os.ftruncate(self.fd, length)
        except OSError as exc:
            if exc.strerror and exc.strerror.startswith("Preallocation"):
                raise
            raise strerror_oserror(exc, "Could not resize file") from exc

    def _status_sync(self, offset: int, length: int) -> tuple[int, int]:
        """Data or hole at ``offset`` from SEEK_DATA/SEEK_HOLE (QEMU's find_allocation)."""
        size = self.length()
        if offset >= size:
            return BLOCK_ZERO | BLOCK_OFFSET_VALID | BLOCK_ALLOCATED | BLOCK_EOF, length
        end = min(offset + length, size)
        try:
            data = os.lseek(self.fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != errno.ENXIO:
                return self._status_flags(True, offset, end - offset, size)
            data = size
        if data > offset:
            return self._status_flags(False, offset, min(data, end) - offset, size)
        try:
            hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
        except OSError:
            hole = size
        return self._status_flags(True, offset, max(min(hole, end) - offset, 1), size)

    @staticmethod
    def _status_flags(data: bool, offset: int, length: int, size: int) -> tuple[int, int]:
        flags = (BLOCK_DATA if data else BLOCK_ZERO) | BLOCK_OFFSET_VALID | BLOCK_ALLOCATED
        if offset + length >= size:
            flags |= BLOCK_EOF
        return flags, length

    # ---- asynchronous interface ------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        if self.opts.cache_direct:
            return await in_pool(self._direct_read, offset, length)
        return await in_pool(self._pread_full, offset, length)

    async def _write(self, offset: int, data: Data, fua: bool) -> None:
        await in_pool(self._write_sync, offset, data, fua)

    async def _write_zeroes(self, offset: int, length: int, may_unmap: bool,
                            no_fallback: bool, fua: bool) -> None:
        await in_pool(self._zeroes_sync, offset, length, may_unmap, no_fallback, fua)

    async def _discard(self, offset: int, length: int) -> None:
        try:
            await in_pool(fallocate, self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                          offset, length)
        except OSError as exc:
            # QEMU ignores -ENOTSUP from discard: it is only a hint.
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                raise

    async def flush(self) -> None:
        if not self.opts.cache_no_flush:
            await in_pool(os.fdatasync, self.fd)

    async def truncate(self, length: int, exact: bool = False, prealloc: str = "off") -> None:
        await in_pool(self._truncate_sync, length, prealloc)

    async def block_status(self, offset: int, length: int) -> tuple[int, int]:
        return self._status_sync(offset, length)

    def allocated_size(self) -> int:
        return os.fstat(self.fd).st_blocks * 512

    def close(self) -> None:
        if self.locks is not None:
            self.locks.release()
        os.close(self.fd)
        self.fd = -1


def open_file(node_name: str, opts: NodeOptions, ctx: AioContext, args: Any) -> FileNode:
    """Builds the node from a BlockdevOptionsFile model (or any object with its fields)."""
    locking = getattr(args, "locking", None)
    aio = getattr(args, "aio", None)
    return FileNode(node_name, opts, ctx, filename=args.filename,
                    locking=str(getattr(locking, "value", locking) or "auto"),
                    aio=str(getattr(aio, "value", aio) or "threads"))
