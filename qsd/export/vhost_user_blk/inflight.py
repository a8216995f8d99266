"""Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD), split virtqueues.

The front-end keeps a shared buffer across back-end restarts; in it the back-end marks
which descriptor heads it has taken and not yet completed, so that a restarted qsd can
resubmit them.  The per-queue layout is the one QEMU's vhost-user.rst describes
(``QueueRegionSplit``).  The buffer belongs to the front-end, so everything read back
from it is checked like any other front-end input.
"""

from __future__ import annotations

import struct
from typing import Final

# QueueRegionSplit: features u64, version u16, desc_num u16, last_batch_head u16,
# used_idx u16; then desc_num DescStateSplit: inflight u8, padding[5], next u16,
# counter u64.
_HEADER: Final = struct.Struct("<QHHHH")
_VERSION: Final = 8
_LAST_BATCH_HEAD: Final = 12
_USED_IDX: Final = 14
_DESCS: Final = 16
_DESC_SIZE: Final = 16
_U8: Final = struct.Struct("<B")
_U16: Final = struct.Struct("<H")
_DESC_NEXT: Final = struct.Struct("<H")
_DESC_STATE: Final = struct.Struct("<B5xHQ")
_TAKEN: Final = struct.Struct("<B5x")
_COUNTER: Final = struct.Struct("<Q")
INFLIGHT_VERSION: Final = 1
_ALIGN: Final = 64


def queue_region_size(queue_size: int) -> int:
    """Bytes per queue: room for the packed layout too (32-byte header and entries),
    because the front-end asks for the buffer before it has chosen the ring layout."""
    return (32 + 32 * queue_size + _ALIGN - 1) // _ALIGN * _ALIGN


class InflightError(Exception):
    """The shared buffer contradicts the ring: the device cannot resume from it."""


class SplitInflight:
    """One queue's region of the buffer, for a split ring of ``num`` entries."""

    __slots__ = ("view", "num", "counter", "_batch")

    def __init__(self, view: memoryview, num: int) -> None:
        self.view = view
        self.num = num
        self.counter = 0
        self._batch: list[int] = []

    def resume(self, used_idx: int) -> list[int]:
        """Starts tracking; returns the heads to resubmit, oldest first.

        A fresh buffer (version 0) is initialised.  Otherwise the batch of completions
        that was being published when the old back-end stopped is settled against the
        used index in guest memory, and every head still marked is resubmitted.
        """
        view, num = self.view, self.num
        _, version, desc_num, last_head, region_used = _HEADER.unpack_from(view, 0)
        if version == 0:
            _HEADER.pack_into(view, 0, 0, INFLIGHT_VERSION, num, 0, used_idx)
            return []
        if desc_num != num:
            raise InflightError(f"inflight region holds {desc_num} descriptors, ring has {num}")
        batch = (used_idx - region_used) & 0xFFFF
        head = last_head
        for _ in range(min(batch, num)):
            if head >= num:
                raise InflightError(f"inflight batch head {head} out of range")
            _U8.pack_into(view, _DESCS + head * _DESC_SIZE, 0)
            head = _DESC_NEXT.unpack_from(view, _DESCS + head * _DESC_SIZE + 6)[0]
        _U16.pack_into(view, _USED_IDX, used_idx)
        pending = []
        for head in range(num):
            taken, _, counter = _DESC_STATE.unpack_from(view, _DESCS + head * _DESC_SIZE)
            if taken:
                pending.append((counter, head))
        pending.sort()
        self.counter = pending[-1][0] + 1 if pending else 0
        return [head for _, head in pending]

    def take(self, head: int) -> None:
        """A head was popped from the available ring (or resubmitted)."""
        off = _DESCS + head * _DESC_SIZE
        _COUNTER.pack_into(self.view, off + 8, self.counter)
        self.counter += 1
        _TAKEN.pack_into(self.view, off, 1)

    def complete(self, head: int) -> None:
        """A head is about to be published in the used ring (before the used index)."""
        view = self.view
        _DESC_NEXT.pack_into(view, _DESCS + head * _DESC_SIZE + 6,
                             _U16.unpack_from(view, _LAST_BATCH_HEAD)[0])
        _U16.pack_into(view, _LAST_BATCH_HEAD, head)
        self._batch.append(head)

    def published(self, used_idx: int) -> None:
        """The used index now covers the batch: clear its marks, then record the index."""
        view = self.view
        for head in self._batch:
            _TAKEN.pack_into(view, _DESCS + head * _DESC_SIZE, 0)
        self._batch.clear()
        _U16.pack_into(view, _USED_IDX, used_idx)
