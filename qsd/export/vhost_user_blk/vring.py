"""Split and packed virtqueues in guest memory: taking requests, returning them.

A ring is used by exactly one thread (its queue's).  ``pop()`` returns the next request
as ``(id, out, in, slots)``: the buffer id to hand back, the device-readable and the
device-writable buffers as views of guest memory, and how many ring slots it took (packed
rings advance by that much).  Whatever the driver wrote is checked before use: indices
against the ring size, chains against loops, every buffer against the memory table.  A
violation raises ``RingError``; the device then needs a reset (virtio's
DEVICE_NEEDS_RESET), which for vhost-user means dropping the connection, as QEMU's back-end
does.  The texts are QEMU's.

Ordering: the driver runs on other CPUs.  x86 keeps loads and stores in program order
except that a later load may pass an earlier store; ``full_barrier()`` closes that gap
where virtio needs it (publishing the used index, then reading whether to notify;
publishing the event index, then re-reading the available index).  A field the driver
may be reading at that very moment (used index, event index, flags) is written with one
16-bit store through a ``memoryview`` cast: ``struct.pack_into`` clears its target before
it packs, and a driver that looks in between reads 0 (a used index gone back to 0 makes
it take thousands of stale entries; an event index of 0 makes it skip a kick).
"""

from __future__ import annotations

import struct
import threading
from typing import Final

from qsd.export.vhost_user_blk import protocol as P
from qsd.export.vhost_user_blk.inflight import SplitInflight
from qsd.export.vhost_user_blk.memory import BadAddress, GuestMemory

Chain = tuple[int, list[memoryview], list[memoryview], int]

_U16: Final = struct.Struct("<H")
_U16X2: Final = struct.Struct("<HH")
_USED_ELEM: Final = struct.Struct("<II")
_PACKED_USED: Final = struct.Struct("<IH")
_DESC = P.DESC
_DESC_SIZE: Final = P.DESC_SIZE
_F_NEXT: Final = P.DESC_F_NEXT
_F_WRITE: Final = P.DESC_F_WRITE
_F_INDIRECT: Final = P.DESC_F_INDIRECT
_F_AVAIL: Final = P.DESC_F_AVAIL
_F_USED: Final = P.DESC_F_USED
# More buffers than this in one request is a broken driver (QEMU's VIRTQUEUE_MAX_SIZE).
MAX_SEGMENTS: Final = 1024

_fence = threading.Lock()


def full_barrier() -> None:
    """A locked instruction (an uncontended lock's compare-and-swap): a full fence."""
    _fence.acquire()
    _fence.release()


class RingError(Exception):
    """The driver broke the virtqueue protocol; the device needs a reset."""


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event(): did the index pass ``event`` going from old to new?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


def _map(mem: GuestMemory, addr: int, length: int, out: list[memoryview]) -> None:
    """Appends the views of a buffer (several where it spans regions)."""
    if not length:
        raise RingError("virtio: zero sized buffers are not allowed")
    try:
        out.append(mem.gpa_view(addr, length))
    except BadAddress:
        try:
            out.extend(mem.gpa_views(addr, length))
        except BadAddress:
            raise RingError("virtio: invalid address for buffers") from None
    if len(out) > MAX_SEGMENTS:
        raise RingError("virtio: too many descriptors in indirect table")


def _table(mem: GuestMemory, addr: int, length: int) -> memoryview | bytes:
    """An indirect descriptor table (copied when it spans regions)."""
    if length % _DESC_SIZE or not length or length > MAX_SEGMENTS * _DESC_SIZE:
        raise RingError("Invalid size for indirect buffer table")
    try:
        return mem.gpa_view(addr, length)
    except BadAddress:
        try:
            return b"".join(mem.gpa_views(addr, length))
        except BadAddress:
            raise RingError("Invalid indirect buffer table") from None


class _Areas:
    """The three areas of a ring, found in the memory table by front-end address:
    descriptors, driver area (available ring), device area (used ring)."""

    num: int
    mem: GuestMemory
    desc16: memoryview
    used16: memoryview

    def sizes(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def remap(self, mem: GuestMemory, desc: int, avail: int, used: int,
              reason: str = "remapping queue on access") -> None:
        """Finds (again) the areas; a new memory table keeps the same addresses."""
        desc_size, avail_size, used_size = self.sizes()
        try:
            dmm, doff = mem.uva_area(desc, desc_size)
            amm, aoff = mem.uva_area(avail, avail_size)
            umm, uoff = mem.uva_area(used, used_size)
        except BadAddress:
            raise RingError(reason) from None
        self.mem = mem
        self.dmm, self.doff, self.amm, self.aoff, self.umm, self.uoff = (
            dmm, doff, amm, aoff, umm, uoff)
        # 16-bit views for the fields written while the driver may read them.
        self.desc16 = memoryview(dmm)[doff:doff + desc_size].cast("H")
        self.used16 = memoryview(umm)[uoff:uoff + used_size].cast("H")


class SplitRing(_Areas):
    """A split virtqueue: descriptor table, available ring and used ring."""

    packed = False

    def __init__(self, mem: GuestMemory, num: int, desc: int, avail: int, used: int, *,
                 event_idx: bool, notify_on_empty: bool, last_avail_idx: int,
                 inflight: SplitInflight | None) -> None:
        if not 0 < num <= P.MAX_QUEUE_SIZE or num & (num - 1):
            raise RingError(f"Invalid vring size {num}")
        self.num = num
        self.event_idx = event_idx
        self.remap(mem, desc, avail, used, "Invalid vring_addr message")
        self.notify_on_empty = notify_on_empty
        self.last_avail = last_avail_idx & 0xFFFF
        self.used_idx = _U16.unpack_from(self.umm, self.uoff + 2)[0]
        self.inuse = 0
        self.signalled_used = 0
        self.signalled_valid = False
        self.inflight = inflight
        self.resubmit: list[int] = []
        if inflight is not None:
            self.resubmit = inflight.resume(self.used_idx)
            for head in self.resubmit:
                if head >= num:
                    raise RingError(f"Guest says index {head} is available")
            self.inuse = len(self.resubmit)
            self.last_avail = (self.used_idx + self.inuse) & 0xFFFF
            self.resubmit.reverse()

    def base(self) -> int:
        """GET_VRING_BASE: the next available index to process."""
        return self.last_avail

    def sizes(self) -> tuple[int, int, int]:
        extra = 2 if self.event_idx else 0
        return self.num * _DESC_SIZE, 4 + 2 * self.num + extra, 4 + 8 * self.num + extra

    def has_work(self) -> bool:
        return bool(self.resubmit) or (
            _U16.unpack_from(self.amm, self.aoff + 2)[0] != self.last_avail)

    def pop(self) -> Chain | None:
        if self.resubmit:
            head = self.resubmit.pop()
            out, inn = self._chain(head)
            if self.inflight is not None:
                self.inflight.take(head)
            return head, out, inn, 1
        last = self.last_avail
        avail_idx = _U16.unpack_from(self.amm, self.aoff + 2)[0]
        if avail_idx == last:
            return None
        num = self.num
        if (avail_idx - last) & 0xFFFF > num:
            raise RingError(f"Guest moved used index from {last} to {avail_idx}")
        if self.inuse >= num:
            raise RingError("Virtqueue size exceeded")
        head = _U16.unpack_from(self.amm, self.aoff + 4 + 2 * (last & (num - 1)))[0]
        if head >= num:
            raise RingError(f"Guest says index {head} is available")
        self.last_avail = (last + 1) & 0xFFFF
        out, inn = self._chain(head)
        self.inuse += 1
        if self.inflight is not None:
            self.inflight.take(head)
        return head, out, inn, 1

    def _chain(self, head: int) -> tuple[list[memoryview], list[memoryview]]:
        mem = self.mem
        regions = mem.table
        descs: list[tuple[int, int, int, int]] | None = None
        limit = self.num
        addr, length, flags, nxt = _DESC.unpack_from(self.dmm, self.doff + head * _DESC_SIZE)
        if flags & _F_INDIRECT:
            descs = list(_DESC.iter_unpack(_table(mem, addr, length)))
            limit = len(descs)
            addr, length, flags, nxt = descs[0]
        out: list[memoryview] = []
        inn: list[memoryview] = []
        count = 0
        while True:
            count += 1
            if count > limit:
                raise RingError("Looped descriptor")
            if not length:
                raise RingError("virtio: zero sized buffers are not allowed")
            # The buffer inside one region (the usual case), found inline.
            end = addr + length
            for first, last, delta, view in regions:
                if first <= addr and end <= last:
                    buf = view[addr + delta:end + delta]
                    if flags & _F_WRITE:
                        inn.append(buf)
                    elif inn:
                        raise RingError("Incorrect order for descriptors")
                    else:
                        out.append(buf)
                    break
            else:
                if flags & _F_WRITE:
                    _map(mem, addr, length, inn)
                elif inn:
                    raise RingError("Incorrect order for descriptors")
                else:
                    _map(mem, addr, length, out)
            if not flags & _F_NEXT:
                if count > MAX_SEGMENTS:
                    raise RingError("virtio: too many descriptors in indirect table")
                return out, inn
            if nxt >= limit:
                raise RingError(f"Desc next is {nxt}")
            if descs is None:
                addr, length, flags, nxt = _DESC.unpack_from(
                    self.dmm, self.doff + nxt * _DESC_SIZE)
            else:
                addr, length, flags, nxt = descs[nxt]
                if flags & _F_INDIRECT:
                    raise RingError("Invalid indirect buffer table")

    def push(self, head: int, length: int, slots: int) -> None:
        """Returns one request to the driver (visible after ``flush``)."""
        _USED_ELEM.pack_into(self.umm, self.uoff + 4 + 8 * (self.used_idx & (self.num - 1)),
                             head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.inuse -= 1
        if self.inflight is not None:
            self.inflight.complete(head)

    def flush(self, count: int) -> bool:
        """Publishes the last ``count`` pushes; True if the driver wants an interrupt."""
        new = self.used_idx
        self.used16[1] = new
        if self.inflight is not None:
            self.inflight.published(new)
        if (new - self.signalled_used) & 0xFFFF < count:
            self.signalled_valid = False
        full_barrier()
        if self.notify_on_empty and not self.inuse and not self.has_work():
            return True
        if not self.event_idx:
            return not _U16.unpack_from(self.amm, self.aoff)[0] & P.AVAIL_F_NO_INTERRUPT
        valid = self.signalled_valid
        old = self.signalled_used
        self.signalled_valid = True
        self.signalled_used = new
        used_event = _U16.unpack_from(self.amm, self.aoff + 4 + 2 * self.num)[0]
        return not valid or need_event(used_event, new, old)

    def quiet(self) -> None:
        """No kicks wanted while the queue is busy anyway.  With event indices nothing
        to do: the driver kicks only when it passes the index ``want_kicks`` published."""
        if not self.event_idx:
            self.used16[0] = P.USED_F_NO_NOTIFY

    def want_kicks(self) -> bool:
        """Asks for a kick on the next request; True if one arrived meanwhile."""
        if self.event_idx:
            self.used16[2 + 4 * self.num] = self.last_avail
        else:
            self.used16[0] = 0
        full_barrier()
        return self.has_work()


class PackedRing(_Areas):
    """A packed virtqueue: one descriptor ring plus the two event suppression areas."""

    packed = True

    def __init__(self, mem: GuestMemory, num: int, desc: int, driver: int, device: int, *,
                 event_idx: bool, notify_on_empty: bool, base: int) -> None:
        if not 0 < num <= P.MAX_QUEUE_SIZE:
            raise RingError(f"Invalid vring size {num}")
        self.num = num
        self.remap(mem, desc, driver, device, "Invalid vring_addr message")
        self.event_idx = event_idx
        self.notify_on_empty = notify_on_empty
        avail, used = base & 0x7FFF, (base >> 16) & 0x7FFF
        if avail >= num or used >= num:
            raise RingError(f"Invalid vring base {base:#x}")
        self.last_avail = avail
        self.avail_wrap = bool(base & 0x8000)
        self.used_idx = used
        self.used_wrap = bool(base & 0x80000000)
        self.inuse = 0
        self.signalled_used = 0
        self.signalled_valid = False
        self.inflight = None

    def base(self) -> int:
        return (self.last_avail | self.avail_wrap << 15
                | (self.used_idx | self.used_wrap << 15) << 16)

    def sizes(self) -> tuple[int, int, int]:
        return self.num * _DESC_SIZE, 4, 4

    def has_work(self) -> bool:
        flags = _U16.unpack_from(self.dmm, self.doff + self.last_avail * _DESC_SIZE + 14)[0]
        wrap = self.avail_wrap
        return bool(flags & _F_AVAIL) == wrap and bool(flags & _F_USED) != wrap

    def pop(self) -> Chain | None:
        if not self.has_work():
            return None
        if self.inuse >= self.num:
            raise RingError("Virtqueue size exceeded")
        mem, num, dmm, doff = self.mem, self.num, self.dmm, self.doff
        pos = self.last_avail
        wrap = self.avail_wrap
        out: list[memoryview] = []
        inn: list[memoryview] = []
        slots = 0
        while True:
            addr, length, buf_id, flags = _DESC.unpack_from(dmm, doff + pos * _DESC_SIZE)
            slots += 1
            if slots > num:
                raise RingError("Looped descriptor")
            if flags & _F_INDIRECT:
                if slots > 1 or flags & _F_NEXT:
                    raise RingError("Invalid indirect buffer table")
                self._indirect(_table(mem, addr, length), out, inn)
            elif flags & _F_WRITE:
                _map(mem, addr, length, inn)
            else:
                if inn:
                    raise RingError("Incorrect order for descriptors")
                _map(mem, addr, length, out)
            pos += 1
            if pos == num:
                pos = 0
                wrap = not wrap
            if not flags & _F_NEXT:
                break
            flags = _U16.unpack_from(dmm, doff + pos * _DESC_SIZE + 14)[0]
            if bool(flags & _F_AVAIL) != wrap or bool(flags & _F_USED) == wrap:
                raise RingError("Looped descriptor")
        self.last_avail = pos
        self.avail_wrap = wrap
        self.inuse += 1
        return buf_id, out, inn, slots

    def _indirect(self, table: memoryview | bytes, out: list[memoryview],
                  inn: list[memoryview]) -> None:
        """A packed indirect table: its entries in order, no chaining flags."""
        mem = self.mem
        for addr, length, _, flags in _DESC.iter_unpack(table):
            if flags & _F_INDIRECT:
                raise RingError("Invalid indirect buffer table")
            if flags & _F_WRITE:
                _map(mem, addr, length, inn)
            else:
                if inn:
                    raise RingError("Incorrect order for descriptors")
                _map(mem, addr, length, out)

    def push(self, buf_id: int, length: int, slots: int) -> None:
        off = self.doff + self.used_idx * _DESC_SIZE
        _PACKED_USED.pack_into(self.dmm, off + 8, length, buf_id)
        flags = _F_AVAIL | _F_USED if self.used_wrap else 0
        self.desc16[self.used_idx * 8 + 7] = flags
        idx = self.used_idx + slots
        if idx >= self.num:
            idx -= self.num
            self.used_wrap = not self.used_wrap
        self.used_idx = idx
        self.inuse -= 1

    def flush(self, count: int) -> bool:
        full_barrier()
        if self.notify_on_empty and not self.inuse and not self.has_work():
            return True
        off_wrap, flags = _U16X2.unpack_from(self.amm, self.aoff)
        old = self.signalled_used
        new = self.signalled_used = self.used_idx
        valid = self.signalled_valid
        self.signalled_valid = True
        if flags == P.PACKED_EVENT_DISABLE:
            return False
        if flags == P.PACKED_EVENT_ENABLE or not self.event_idx:
            return True
        off = off_wrap & 0x7FFF
        if bool(off_wrap >> 15) != self.used_wrap:
            off -= self.num
        return not valid or need_event(off & 0xFFFF, new, old)

    def quiet(self) -> None:
        self.used16[1] = P.PACKED_EVENT_DISABLE

    def want_kicks(self) -> bool:
        self.used16[1] = P.PACKED_EVENT_ENABLE
        full_barrier()
        return self.has_work()
