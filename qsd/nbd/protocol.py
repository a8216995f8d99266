"""NBD wire constants and the small helpers both protocol phases share.

Values come from the NBD protocol (``doc/proto.md``) and QEMU's ``include/block/nbd.h``;
the lookup names are ``nbd/common.c``'s, because QEMU's error texts embed them.
"""

from __future__ import annotations

import asyncio
import errno
import struct

# Handshake magics.
NBD_INIT_MAGIC = 0x4E42444D41474943  # "NBDMAGIC"
NBD_OPTS_MAGIC = 0x49484156454F5054  # "IHAVEOPT"
NBD_REP_MAGIC = 0x0003E889045565A9

# Transmission magics.
NBD_REQUEST_MAGIC = 0x25609513
NBD_EXTENDED_REQUEST_MAGIC = 0x21E41C71
NBD_SIMPLE_REPLY_MAGIC = 0x67446698
NBD_STRUCTURED_REPLY_MAGIC = 0x668E33EF
NBD_EXTENDED_REPLY_MAGIC = 0x6E8A278C

# Server handshake flags / client flags.
NBD_FLAG_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_NO_ZEROES = 1 << 1
NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0
NBD_FLAG_C_NO_ZEROES = 1 << 1

# Transmission (export) flags.
NBD_FLAG_HAS_FLAGS = 1 << 0
NBD_FLAG_READ_ONLY = 1 << 1
NBD_FLAG_SEND_FLUSH = 1 << 2
NBD_FLAG_SEND_FUA = 1 << 3
NBD_FLAG_ROTATIONAL = 1 << 4
NBD_FLAG_SEND_TRIM = 1 << 5
NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6
NBD_FLAG_SEND_DF = 1 << 7
NBD_FLAG_CAN_MULTI_CONN = 1 << 8
NBD_FLAG_SEND_RESIZE = 1 << 9
NBD_FLAG_SEND_CACHE = 1 << 10
NBD_FLAG_SEND_FAST_ZERO = 1 << 11
NBD_FLAG_BLOCK_STAT_PAYLOAD = 1 << 12

# Options.
NBD_OPT_EXPORT_NAME = 1
NBD_OPT_ABORT = 2
NBD_OPT_LIST = 3
NBD_OPT_PEEK_EXPORT = 4
NBD_OPT_STARTTLS = 5
NBD_OPT_INFO = 6
NBD_OPT_GO = 7
NBD_OPT_STRUCTURED_REPLY = 8
NBD_OPT_LIST_META_CONTEXT = 9
NBD_OPT_SET_META_CONTEXT = 10
NBD_OPT_EXTENDED_HEADERS = 11

# Option replies.
NBD_REP_ACK = 1
NBD_REP_SERVER = 2
NBD_REP_INFO = 3
NBD_REP_META_CONTEXT = 4
NBD_REP_ERR = 1 << 31
NBD_REP_ERR_UNSUP = NBD_REP_ERR | 1
NBD_REP_ERR_POLICY = NBD_REP_ERR | 2
NBD_REP_ERR_INVALID = NBD_REP_ERR | 3
NBD_REP_ERR_PLATFORM = NBD_REP_ERR | 4
NBD_REP_ERR_TLS_REQD = NBD_REP_ERR | 5
NBD_REP_ERR_UNKNOWN = NBD_REP_ERR | 6
NBD_REP_ERR_SHUTDOWN = NBD_REP_ERR | 7
NBD_REP_ERR_BLOCK_SIZE_REQD = NBD_REP_ERR | 8
NBD_REP_ERR_TOO_BIG = NBD_REP_ERR | 9
NBD_REP_ERR_EXT_HEADER_REQD = NBD_REP_ERR | 10

# NBD_REP_INFO types.
NBD_INFO_EXPORT = 0
NBD_INFO_NAME = 1
NBD_INFO_DESCRIPTION = 2
NBD_INFO_BLOCK_SIZE = 3

# Commands and their flags.
NBD_CMD_READ = 0
NBD_CMD_WRITE = 1
NBD_CMD_DISC = 2
NBD_CMD_FLUSH = 3
NBD_CMD_TRIM = 4
NBD_CMD_CACHE = 5
NBD_CMD_WRITE_ZEROES = 6
NBD_CMD_BLOCK_STATUS = 7

NBD_CMD_FLAG_FUA = 1 << 0
NBD_CMD_FLAG_NO_HOLE = 1 << 1
NBD_CMD_FLAG_DF = 1 << 2
NBD_CMD_FLAG_REQ_ONE = 1 << 3
NBD_CMD_FLAG_FAST_ZERO = 1 << 4
NBD_CMD_FLAG_PAYLOAD_LEN = 1 << 5

# Structured reply chunks.
NBD_REPLY_FLAG_DONE = 1 << 0
NBD_REPLY_TYPE_NONE = 0
NBD_REPLY_TYPE_OFFSET_DATA = 1
NBD_REPLY_TYPE_OFFSET_HOLE = 2
NBD_REPLY_TYPE_BLOCK_STATUS = 5
NBD_REPLY_TYPE_BLOCK_STATUS_EXT = 6
NBD_REPLY_TYPE_ERROR = (1 << 15) + 1

# base:allocation extent flags.
NBD_STATE_HOLE = 1 << 0
NBD_STATE_ZERO = 1 << 1

# Error values on the wire.
NBD_SUCCESS = 0
NBD_EPERM = 1
NBD_EIO = 5
NBD_ENOMEM = 12
NBD_EINVAL = 22
NBD_ENOSPC = 28
NBD_EOVERFLOW = 75
NBD_ENOTSUP = 95
NBD_ESHUTDOWN = 108

# Limits (include/block/nbd.h).
NBD_MAX_BUFFER_SIZE = 32 * 1024 * 1024
NBD_MAX_STRING_SIZE = 4096
NBD_MAX_BLOCK_STATUS_EXTENTS = 1024 * 1024 // 8
MAX_NBD_REQUESTS = 16
NBD_DEFAULT_MAX_CONNECTIONS = 100
NBD_DEFAULT_HANDSHAKE_MAX_SECS = 10
BDRV_SECTOR_SIZE = 512

# Context ids as QEMU numbers them: the export's dirty bitmaps follow from 2 in order.
NBD_META_ID_BASE_ALLOCATION = 0
NBD_META_ID_ALLOCATION_DEPTH = 1
NBD_META_ID_DIRTY_BITMAP = 2
NBD_STATE_DIRTY = 1
DIRTY_BITMAP_CONTEXT = "qemu:dirty-bitmap:"

# Packed layouts (network byte order).
OPTION_REPLY = struct.Struct(">QIII")          # magic, option, type, length
COMPACT_REQUEST = struct.Struct(">IHHQQI")     # magic, flags, type, cookie, from, len
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")
SIMPLE_REPLY = struct.Struct(">IIQ")           # magic, error, cookie
STRUCTURED_CHUNK = struct.Struct(">IHHQI")     # magic, flags, type, cookie, length
EXTENDED_CHUNK = struct.Struct(">IHHQQQ")      # magic, flags, type, cookie, offset, length

_OPT_NAMES = {
    NBD_OPT_EXPORT_NAME: "export name",
    NBD_OPT_ABORT: "abort",
    NBD_OPT_LIST: "list",
    NBD_OPT_STARTTLS: "starttls",
    NBD_OPT_INFO: "info",
    NBD_OPT_GO: "go",
    NBD_OPT_STRUCTURED_REPLY: "structured reply",
    NBD_OPT_LIST_META_CONTEXT: "list meta context",
    NBD_OPT_SET_META_CONTEXT: "set meta context",
    NBD_OPT_EXTENDED_HEADERS: "extended headers",
}

_CMD_NAMES = {
    NBD_CMD_READ: "read",
    NBD_CMD_WRITE: "write",
    NBD_CMD_DISC: "disconnect",
    NBD_CMD_FLUSH: "flush",
    NBD_CMD_TRIM: "trim",
    NBD_CMD_CACHE: "cache",
    NBD_CMD_WRITE_ZEROES: "write zeroes",
    NBD_CMD_BLOCK_STATUS: "block status",
}

_ERRNO_TO_NBD = {
    0: NBD_SUCCESS,
    errno.EPERM: NBD_EPERM,
    errno.EROFS: NBD_EPERM,
    errno.EIO: NBD_EIO,
    errno.ENOMEM: NBD_ENOMEM,
    errno.EDQUOT: NBD_ENOSPC,
    errno.EFBIG: NBD_ENOSPC,
    errno.ENOSPC: NBD_ENOSPC,
    errno.EOVERFLOW: NBD_EOVERFLOW,
    errno.ENOTSUP: NBD_ENOTSUP,
    errno.EOPNOTSUPP: NBD_ENOTSUP,
    errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def opt_name(option: int) -> str:
    return _OPT_NAMES.get(option, "<unknown>")


def cmd_name(command: int) -> str:
    return _CMD_NAMES.get(command, "<unknown>")


def nbd_errno(err: int) -> int:
    """QEMU's system_errno_to_nbd_errno(): anything unlisted becomes EINVAL."""
    return _ERRNO_TO_NBD.get(err, NBD_EINVAL)


class Mode:
    """How far the client's negotiation got (QEMU's NBDMode); later modes imply earlier."""

    EXPORT_NAME = 0
    SIMPLE = 1
    STRUCTURED = 2
    EXTENDED = 3


class MetaContexts:
    """The meta contexts a client selected with NBD_OPT_SET_META_CONTEXT for one export."""

    __slots__ = ("export", "base_allocation", "allocation_depth", "bitmaps", "count")

    def __init__(self, export: object = None, nr_bitmaps: int = 0) -> None:
        self.export = export
        self.base_allocation = False
        self.allocation_depth = False
        self.bitmaps = [False] * nr_bitmaps    # by the export's bitmap index
        self.count = 0


class SocketCarrier(asyncio.Protocol):
    """The protocol object on a client's socket (the client, or TLS in between)."""

    def release_transport(self) -> asyncio.Transport | None:
        """Lets go of the socket's transport without closing anything (a move)."""
        raise NotImplementedError
