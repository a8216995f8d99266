"""What each FUSE request means for the exported image: QEMU's ``fuse_co_*()`` functions.

``FuseFile`` holds the state every queue of one export shares (the BlockBackend, the
export's flags and the attributes ``chmod``/``chown`` may change) and answers every
request except the READ/WRITE fast path, which lives in queue.py.  Errors are raised as
``OSError`` with the errno the kernel gets back; the queue turns them into replies.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import TYPE_CHECKING, Final

from qsd.errors import error_report
from qsd.export.fuse import protocol as P

if TYPE_CHECKING:
    from qsd.block.backend import BlockBackend

# QEMU's FUSE_MAX_READ_BYTES and FUSE_MAX_WRITE_BYTES
MAX_READ_BYTES: Final = 1024 * 1024
MAX_WRITE_BYTES: Final = 64 * 1024
INT64_MAX: Final = 2**63 - 1

# BDRV_BLOCK_* flags of a block status answer
BDRV_BLOCK_DATA: Final = 0x01
BDRV_BLOCK_EOF: Final = 0x20

PAGE_SIZE: Final = 4096


def _error(code: int) -> OSError:
    return OSError(code, errno.errorcode.get(code, "error"))


class FuseFile:
    """The one regular file an export presents, shared by all of its queues."""

    def __init__(self, blk: BlockBackend, *, writable: bool, growable: bool,
                 allow_other: bool) -> None:
        self.blk = blk
        self.writable = writable
        self.growable = growable
        self.allow_other = allow_other
        # Set after a request that makes the fd's byte stream untrustworthy: no queue
        # reads again (QEMU's fuse_export_halt()).
        self.halted = False
        self.st_mode = stat.S_IFREG | stat.S_IRUSR | (stat.S_IWUSR if writable else 0)
        self.st_uid = os.getuid()
        self.st_gid = os.getgid()
        # FUSE over io_uring: whether INIT may agree to it (the export has rings ready),
        # and whether it did.
        self.uring_offer = False
        self.uring_agreed = False

    # -- requests answered without waiting --------------------------------------------

    def init(self, body: memoryview) -> bytes:
        """FUSE_INIT: accept kernels from 7.9 on and offer what QEMU offers."""
        major, minor, max_readahead, flags = P.INIT_IN_COMPAT.unpack_from(body, 0)
        if major != P.KERNEL_VERSION:
            error_report(f"FUSE major version mismatch: We have {P.KERNEL_VERSION}, "
                         f"but kernel has {major}")
            raise _error(errno.EINVAL)
        if minor < P.MIN_KERNEL_MINOR_VERSION:
            error_report(f"FUSE minor version too old: {P.MIN_KERNEL_MINOR_VERSION} "
                         f"required, but kernel has {minor}")
            raise _error(errno.EINVAL)
        supported = P.FUSE_ASYNC_READ | P.FUSE_ASYNC_DIO
        if not self.growable:
            # libfuse always asked for this, so the kernel passed O_TRUNC on to the
            # export (which ignores it) instead of truncating a fixed-size image.
            supported |= P.FUSE_ATOMIC_O_TRUNC
        flags2 = 0
        if flags & P.FUSE_INIT_EXT and len(body) >= P.INIT_IN_COMPAT.size + 4:
            # Shared mmap of a direct-I/O file needs this; it lives in flags2.
            supported |= P.FUSE_INIT_EXT
            (in_flags2,) = P.INIT_IN_FLAGS2.unpack_from(body, P.INIT_IN_COMPAT.size)
            flags2 = in_flags2 & P.FUSE_DIRECT_IO_ALLOW_MMAP_FLAGS2
            if self.uring_offer:
                flags2 |= in_flags2 & P.FUSE_OVER_IO_URING_FLAGS2
        self.uring_agreed = bool(flags2 & P.FUSE_OVER_IO_URING_FLAGS2)
        out_minor = min(P.KERNEL_MINOR_VERSION, minor)
        out = P.INIT_OUT.pack(
            P.KERNEL_VERSION, out_minor, max_readahead, flags & supported,
            0xFFFF,                    # max_background: the libfuse maximum
            0xFFFF * 3 // 4,           # congestion_threshold: libfuse's default ratio
            MAX_WRITE_BYTES,
            1,                         # time_gran
            -(-MAX_WRITE_BYTES // PAGE_SIZE),  # max_pages (unused without FUSE_MAX_PAGES)
            0,                         # map_alignment (DAX only)
            flags2)
        # Before 7.23 the kernel expects the short structure.
        return out if out_minor >= 23 else out[:P.FUSE_COMPAT_22_INIT_OUT_SIZE]

    def getattr(self) -> bytes:
        """FUSE_GETATTR: the image as a regular file owned by the daemon's user."""
        length = self.blk.length()
        allocated = self.blk.allocated_size()
        blocks = -(-(allocated if allocated > 0 else length) // 512)
        now = int(time.time())
        return P.ATTR_OUT.pack(
            1, 0, 0,                   # attr_valid = 1s
            P.ROOT_ID, length, blocks, now, now, now, 0, 0, 0,
            self.st_mode, 1, self.st_uid, self.st_gid, 0, self.request_alignment(), 0)

    def request_alignment(self) -> int:
        """QEMU reports the node's ``bl.request_alignment`` as st_blksize."""
        return self.blk.limits().request_alignment

    def statfs(self) -> bytes:
        """FUSE_STATFS: just the fields libfuse fills by default, so ``df`` works."""
        bsize = max(self.request_alignment(), 512)
        return P.STATFS_OUT.pack(0, 0, 0, 0, 0, bsize, 255, 0, 0)

    @staticmethod
    def open() -> bytes:
        """FUSE_OPEN: one inode, no handles; bypass the page cache, allow parallel
        writes."""
        return P.OPEN_OUT.pack(0, P.FOPEN_DIRECT_IO | P.FOPEN_PARALLEL_DIRECT_WRITES, 0)

    # -- requests that may wait for the block layer -------------------------------------

    async def setattr(self, body: bytes) -> bytes:
        """FUSE_SETATTR: resizing and, as far as it makes sense, chmod/chown."""
        fields = P.SETATTR_IN.unpack_from(body, 0)
        valid, size, mode, uid, gid = fields[0], fields[3], fields[11], fields[13], fields[14]
        supported = (P.FATTR_SIZE | P.FATTR_MODE | P.FATTR_FH | P.FATTR_LOCKOWNER
                     | P.FATTR_KILL_SUIDGID)
        if self.allow_other:
            supported |= P.FATTR_UID | P.FATTR_GID
        if valid & ~supported:
            raise _error(errno.ENOTSUP)
        if valid & P.FATTR_MODE:
            # Without allow_other nobody but the owner can get in: refuse such bits.
            if not self.allow_other and mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise _error(errno.EPERM)
            # +w on a read-only export makes no sense.
            if not self.writable and mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
                raise _error(errno.EROFS)
        if valid & P.FATTR_SIZE:
            if not self.writable:
                raise _error(errno.EACCES)
            await self.blk.truncate(size, exact=True, prealloc="off")
        if valid & P.FATTR_MODE:
            self.st_mode = (mode & 0o7777) | stat.S_IFREG
        if valid & P.FATTR_UID:
            self.st_uid = uid
        if valid & P.FATTR_GID:
            self.st_gid = gid
        return self.getattr()

    async def read(self, offset: int, size: int) -> bytes:
        """FUSE_READ: short reads at EOF, because clients expect them."""
        if size > MAX_READ_BYTES:
            raise _error(errno.EINVAL)
        blk_len = self.blk.length()
        if offset >= blk_len:
            return b""
        size = min(size, blk_len - offset)
        return await self.blk.read(offset, size)

    async def write(self, offset: int, data: bytes) -> bytes:
        """FUSE_WRITE: grows growable exports, writes short at EOF otherwise (a zero-byte
        write past EOF, which ``dd`` reports as ENOSPC)."""
        size = len(data)
        if size > MAX_WRITE_BYTES:
            raise _error(errno.EINVAL)
        if not self.writable:
            raise _error(errno.EACCES)
        blk_len = self.blk.length()
        if offset >= blk_len and not self.growable:
            return P.WRITE_OUT.pack(0, 0)
        if offset + size > INT64_MAX:
            raise _error(errno.EINVAL)
        if offset + size > blk_len:
            if self.growable:
                await self.blk.truncate(offset + size, exact=True, prealloc="off")
            else:
                size = blk_len - offset
                data = data[:size]
        await self.blk.write(offset, data)
        return P.WRITE_OUT.pack(size, 0)

    async def fallocate(self, body: bytes) -> None:
        """FUSE_FALLOCATE: growing with preallocation at EOF, punching holes, zeroing."""
        _, offset, length, mode, _ = P.FALLOCATE_IN.unpack_from(body, 0)
        if not self.writable:
            raise _error(errno.EACCES)
        blk = self.blk
        blk_len = blk.length()
        if mode & P.FALLOC_FL_KEEP_SIZE and offset <= blk_len:
            # (QEMU compares unsigned: past EOF the length stays as it is.)
            length = min(length, blk_len - offset)
        if not mode:
            # Only at EOF, as a truncate.
            if offset < blk_len:
                raise _error(errno.EOPNOTSUPP)
            if offset > blk_len:
                await blk.truncate(offset, exact=True, prealloc="off")
            await blk.truncate(offset + length, exact=True, prealloc="falloc")
        elif mode & P.FALLOC_FL_PUNCH_HOLE:
            if not mode & P.FALLOC_FL_KEEP_SIZE:
                raise _error(errno.EINVAL)
            await self._write_zeroes(offset, length, unmap=True)
        elif mode & P.FALLOC_FL_ZERO_RANGE:
            if not mode & P.FALLOC_FL_KEEP_SIZE and offset + length > blk_len:
                # The zeroes are written below anyway.
                await blk.truncate(offset + length, exact=True, prealloc="off")
            await self._write_zeroes(offset, length, unmap=False)
        else:
            raise _error(errno.EOPNOTSUPP)

    async def _write_zeroes(self, offset: int, length: int, *, unmap: bool) -> None:
        """Hole punching must not fall back to writing explicit zeroes (fallocate()
        reports EOPNOTSUPP then); the block layer splits what is too large."""
        await self.blk.write_zeroes(offset, length, may_unmap=unmap, no_fallback=unmap)

    async def flush(self) -> None:
        """FUSE_FSYNC and FUSE_FLUSH (close()) both flush the image."""
        await self.blk.flush()

    async def lseek(self, body: bytes) -> bytes:
        """FUSE_LSEEK: SEEK_DATA/SEEK_HOLE from the block status of the image."""
        _, offset, whence, _ = P.LSEEK_IN.unpack_from(body, 0)
        if whence not in (P.SEEK_DATA, P.SEEK_HOLE):
            raise _error(errno.EINVAL)
        while True:
            blk_len = self.blk.length()
            if offset >= blk_len:
                flags, pnum = BDRV_BLOCK_EOF, 0
            else:
                flags, pnum = await self.blk.block_status(offset, blk_len - offset)
            if pnum == 0 and flags & BDRV_BLOCK_EOF:
                # Past the real end there is a hole up to the client-visible length.
                if offset > blk_len or whence == P.SEEK_DATA:
                    raise _error(errno.ENXIO)
                return P.LSEEK_OUT.pack(offset)
            if flags & BDRV_BLOCK_DATA:
                if whence == P.SEEK_DATA:
                    return P.LSEEK_OUT.pack(offset)
            elif whence == P.SEEK_HOLE:
                return P.LSEEK_OUT.pack(offset)
            if pnum == 0:
                # Safety net against looping forever.
                raise _error(errno.ENXIO)
            offset += pnum
