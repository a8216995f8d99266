"""The FUSE kernel protocol as far as a single-file export speaks it.

Layouts and numbers follow the Linux kernel's ``include/uapi/linux/fuse.h``; every
structure is native-endian with the kernel's 64-bit padding.  The ``struct.Struct``
objects are compiled once here because the request loop packs and unpacks on every
request; the hot path uses ``unpack_from``/``pack_into`` on preallocated buffers.
"""

from __future__ import annotations

import struct
from typing import Final

# Protocol version we speak.  7.39 is the first minor that knows
# FUSE_DIRECT_IO_ALLOW_MMAP; the kernel answers with min(ours, its own).
KERNEL_VERSION: Final = 7
KERNEL_MINOR_VERSION: Final = 39
# Before 7.9 fuse_attr had no blksize; QEMU refuses such kernels.
MIN_KERNEL_MINOR_VERSION: Final = 9

ROOT_ID: Final = 1

# enum fuse_opcode
LOOKUP: Final = 1
FORGET: Final = 2
GETATTR: Final = 3
SETATTR: Final = 4
OPEN: Final = 14
READ: Final = 15
WRITE: Final = 16
STATFS: Final = 17
RELEASE: Final = 18
FSYNC: Final = 20
FLUSH: Final = 25
INIT: Final = 26
INTERRUPT: Final = 36
DESTROY: Final = 38
BATCH_FORGET: Final = 42
FALLOCATE: Final = 43
LSEEK: Final = 46

# fuse_init_in/out.flags
FUSE_ASYNC_READ: Final = 1 << 0
FUSE_ATOMIC_O_TRUNC: Final = 1 << 3
FUSE_ASYNC_DIO: Final = 1 << 15
FUSE_INIT_EXT: Final = 1 << 30
# fuse_init_in/out.flags2 (the upper 32 bits of the 64-bit flag set)
FUSE_DIRECT_IO_ALLOW_MMAP_FLAGS2: Final = 1 << (36 - 32)
FUSE_OVER_IO_URING_FLAGS2: Final = 1 << (41 - 32)

# fuse_open_out.open_flags
FOPEN_DIRECT_IO: Final = 1 << 0
FOPEN_PARALLEL_DIRECT_WRITES: Final = 1 << 6

# fuse_setattr_in.valid
FATTR_MODE: Final = 1 << 0
FATTR_UID: Final = 1 << 1
FATTR_GID: Final = 1 << 2
FATTR_SIZE: Final = 1 << 3
FATTR_FH: Final = 1 << 6
FATTR_LOCKOWNER: Final = 1 << 9
FATTR_KILL_SUIDGID: Final = 1 << 11

# <linux/falloc.h>
FALLOC_FL_KEEP_SIZE: Final = 0x01
FALLOC_FL_PUNCH_HOLE: Final = 0x02
FALLOC_FL_ZERO_RANGE: Final = 0x10

# <unistd.h>
SEEK_DATA: Final = 3
SEEK_HOLE: Final = 4

# The kernel refuses to hand out a request into a buffer smaller than this.
FUSE_MIN_READ_BUFFER: Final = 8192

# ioctl(FUSE_DEV_IOC_CLONE) = _IOR(229, 0, uint32_t)
FUSE_DEV_IOC_CLONE: Final = (2 << 30) | (4 << 16) | (229 << 8) | 0

# struct fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
IN_HEADER: Final = struct.Struct("=IIQQIIIHH")
# Just len, opcode, unique: all the request loop needs from the header.
IN_HEADER_HEAD: Final = struct.Struct("=IIQ")
# struct fuse_out_header: len, error, unique
OUT_HEADER: Final = struct.Struct("=IiQ")

# struct fuse_init_in up to flags2 (older kernels send only the first four fields)
INIT_IN_COMPAT: Final = struct.Struct("=IIII")
INIT_IN_FLAGS2: Final = struct.Struct("=I")
# struct fuse_init_out: major, minor, max_readahead, flags, max_background,
# congestion_threshold, max_write, time_gran, max_pages, map_alignment, flags2, unused[7]
INIT_OUT: Final = struct.Struct("=IIIIHHIIHHI28x")
FUSE_COMPAT_22_INIT_OUT_SIZE: Final = 24

# struct fuse_setattr_in
SETATTR_IN: Final = struct.Struct("=IIQQQQQQIIIIIIII")
# struct fuse_read_in: fh, offset, size, read_flags, lock_owner, flags, padding
READ_IN: Final = struct.Struct("=QQIIQII")
# Only offset and size of fuse_read_in/fuse_write_in (they share that prefix layout)
RW_OFFSET_SIZE: Final = struct.Struct("=8xQI")
# struct fuse_write_in: fh, offset, size, write_flags, lock_owner, flags, padding
WRITE_IN: Final = struct.Struct("=QQIIQII")
# struct fuse_write_out: size, padding
WRITE_OUT: Final = struct.Struct("=II")
# A whole WRITE reply, fuse_out_header + fuse_write_out, packed in one go for the hot path
WRITE_REPLY: Final = struct.Struct("=IiQII")
# struct fuse_fallocate_in: fh, offset, length, mode, padding
FALLOCATE_IN: Final = struct.Struct("=QQQII")
# struct fuse_lseek_in: fh, offset, whence, padding
LSEEK_IN: Final = struct.Struct("=QQII")
# struct fuse_lseek_out: offset
LSEEK_OUT: Final = struct.Struct("=Q")
# struct fuse_open_out: fh, open_flags, padding
OPEN_OUT: Final = struct.Struct("=QII")
# struct fuse_attr_out: attr_valid, attr_valid_nsec, dummy, then struct fuse_attr:
# ino, size, blocks, atime, mtime, ctime, atimensec, mtimensec, ctimensec, mode, nlink,
# uid, gid, rdev, blksize, flags
ATTR_OUT: Final = struct.Struct("=QII" + "QQQQQQIIIIIIIIII")
# struct fuse_statfs_out (struct fuse_kstatfs): blocks, bfree, bavail, files, ffree,
# bsize, namelen, frsize, padding, spare[6]
STATFS_OUT: Final = struct.Struct("=QQQQQIIII24x")

IN_HEADER_SIZE: Final = IN_HEADER.size  # 40
OUT_HEADER_SIZE: Final = OUT_HEADER.size  # 16
WRITE_DATA_OFFSET: Final = IN_HEADER_SIZE + WRITE_IN.size  # 80

# Bytes of the operation's own header each supported request must carry; opcodes not
# listed here are answered with ENOSYS.  FUSE_INIT is checked against the pre-7.36 size.
OP_HEADER_SIZE: Final[dict[int, int]] = {
    INIT: INIT_IN_COMPAT.size,
    OPEN: 8,
    SETATTR: SETATTR_IN.size,
    READ: READ_IN.size,
    WRITE: WRITE_IN.size,
    FALLOCATE: FALLOCATE_IN.size,
    LSEEK: LSEEK_IN.size,
    DESTROY: 0,
    STATFS: 0,
    RELEASE: 0,
    LOOKUP: 0,
    FORGET: 0,
    BATCH_FORGET: 0,
    GETATTR: 0,
    FSYNC: 0,
    FLUSH: 0,
}

assert IN_HEADER_SIZE == 40 and OUT_HEADER_SIZE == 16
assert INIT_OUT.size == 64 and SETATTR_IN.size == 88 and ATTR_OUT.size == 104
assert READ_IN.size == 40 and WRITE_IN.size == 40 and FALLOCATE_IN.size == 32
assert STATFS_OUT.size == 80 and OPEN_OUT.size == 16 and LSEEK_IN.size == 24
