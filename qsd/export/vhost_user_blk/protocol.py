"""The vhost-user wire format (QEMU's docs/interop/vhost-user.rst) and virtio numbers.

Pure data: message types, flag and feature bits, payload layouts.  Everything is in the
machine's byte order on the socket and little-endian in guest memory (virtio 1.0).
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final


class Request(IntEnum):
    """Front-end message types."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SET_BACKEND_REQ_FD = 21
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


# Header: request, flags, payload size (u32 each).
HEADER: Final = struct.Struct("=III")
HEADER_SIZE: Final = HEADER.size
FLAG_VERSION: Final = 0x1
FLAG_VERSION_MASK: Final = 0x3
FLAG_REPLY: Final = 0x4
FLAG_NEED_REPLY: Final = 0x8
# The largest payload QEMU's back-end library accepts (its payload union), and the most
# file descriptors one message may carry.
MAX_PAYLOAD: Final = 272
MAX_FDS: Final = 8

U64: Final = struct.Struct("=Q")
VRING_STATE: Final = struct.Struct("=II")                  # index, num
VRING_ADDR: Final = struct.Struct("=IIQQQQ")               # index, flags, desc, used, avail, log
MEM_REGION: Final = struct.Struct("=QQQQ")                 # gpa, size, user addr, mmap offset
MEMORY_HEADER: Final = struct.Struct("=II")                # nregions, padding
MEM_REG_MSG: Final = struct.Struct("=Q")                   # padding before one region
CONFIG_HEADER: Final = struct.Struct("=III")               # offset, size, flags
INFLIGHT: Final = struct.Struct("=QQHH4x")                 # mmap size, offset, queues, size
VRING_IDX_MASK: Final = 0xFF
VRING_NOFD_MASK: Final = 0x100
CONFIG_TYPE_FRONTEND: Final = 0
MAX_CONFIG_SIZE: Final = 256
# What GET_MAX_MEM_SLOTS reports (QEMU's back-end library's limit).
MAX_MEM_SLOTS: Final = 509

# Virtio feature bits common to every device.
F_NOTIFY_ON_EMPTY: Final = 24
F_LOG_ALL: Final = 26
F_PROTOCOL_FEATURES: Final = 30
F_INDIRECT_DESC: Final = 28
F_EVENT_IDX: Final = 29
F_VERSION_1: Final = 32
F_RING_PACKED: Final = 34

# Protocol feature bits.
PF_MQ: Final = 0
PF_REPLY_ACK: Final = 3
PF_BACKEND_REQ: Final = 5
PF_CONFIG: Final = 9
PF_INFLIGHT_SHMFD: Final = 12
PF_RESET_DEVICE: Final = 13
PF_INBAND_NOTIFICATIONS: Final = 14
PF_CONFIGURE_MEM_SLOTS: Final = 15
PF_STATUS: Final = 16

# Virtio device status bits (SET_STATUS/GET_STATUS).
STATUS_DRIVER_OK: Final = 0x04
STATUS_NEEDS_RESET: Final = 0x40

# Virtio-blk feature bits.
BLK_F_SEG_MAX: Final = 2
BLK_F_RO: Final = 5
BLK_F_BLK_SIZE: Final = 6
BLK_F_FLUSH: Final = 9
BLK_F_TOPOLOGY: Final = 10
BLK_F_CONFIG_WCE: Final = 11
BLK_F_MQ: Final = 12
BLK_F_DISCARD: Final = 13
BLK_F_WRITE_ZEROES: Final = 14

# Virtio-blk requests and statuses.
BLK_T_IN: Final = 0
BLK_T_OUT: Final = 1
BLK_T_FLUSH: Final = 4
BLK_T_GET_ID: Final = 8
BLK_T_DISCARD: Final = 11
BLK_T_WRITE_ZEROES: Final = 13
BLK_T_BARRIER: Final = 0x80000000
BLK_S_OK: Final = 0
BLK_S_IOERR: Final = 1
BLK_S_UNSUPP: Final = 2
BLK_WRITE_ZEROES_FLAG_UNMAP: Final = 1
BLK_ID_BYTES: Final = 20
BLK_OUTHDR: Final = struct.Struct("<IIQ")                  # type, ioprio, sector
BLK_DISCARD_WZ: Final = struct.Struct("<QII")              # sector, num_sectors, flags
SECTOR_BITS: Final = 9
SECTOR_SIZE: Final = 1 << SECTOR_BITS
MAX_DISCARD_SECTORS: Final = 32768
MAX_WRITE_ZEROES_SECTORS: Final = 32768
# QEMU's BDRV_REQUEST_MAX_SECTORS: the largest request the block layer takes at once.
MAX_REQUEST_SECTORS: Final = (2**31 - 1) // SECTOR_SIZE
SEG_MAX: Final = 128 - 2
# The virtio_blk_config structure up to and including the zoned characteristics.
BLK_CONFIG_SIZE: Final = 96

# Ring layouts (guest memory, little-endian).
DESC: Final = struct.Struct("<QIHH")                       # addr, len, flags, next / id
DESC_SIZE: Final = 16
DESC_F_NEXT: Final = 1
DESC_F_WRITE: Final = 2
DESC_F_INDIRECT: Final = 4
DESC_F_AVAIL: Final = 1 << 7
DESC_F_USED: Final = 1 << 15
AVAIL_F_NO_INTERRUPT: Final = 1
USED_F_NO_NOTIFY: Final = 1
PACKED_EVENT_ENABLE: Final = 0
PACKED_EVENT_DISABLE: Final = 1
PACKED_EVENT_DESC: Final = 2
MAX_QUEUE_SIZE: Final = 32768


def blk_config(capacity_sectors: int, blk_size: int, num_queues: int, wce: int) -> bytes:
    """The virtio-blk configuration space, with the values QEMU 11.1's export reports."""
    head = struct.pack("<QIIHBBIBBHIBBH", capacity_sectors, 0, SEG_MAX, 0, 0, 0, blk_size,
                       0, 0, 0, 0, wce, 0, num_queues)
    limits = struct.pack("<IIIIIB3x", MAX_DISCARD_SECTORS, 1, blk_size >> SECTOR_BITS,
                         MAX_WRITE_ZEROES_SECTORS, 1, 0)
    return (head + limits).ljust(BLK_CONFIG_SIZE, b"\0")


WCE_OFFSET: Final = 32
