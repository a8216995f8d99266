"""A vhost-user-blk front-end written for the tests: what QEMU or libblkio do, in Python.

It shares "guest memory" (a memfd) with the back-end, lays out split or packed
virtqueues in it, and issues virtio-blk requests; or, for the error-path and fuzz tests,
sends whatever bytes and descriptors it is told to.  Everything is synchronous: the
back-end is another process.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

# Front-end messages.
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
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
GET_CONFIG = 24
SET_CONFIG = 25
GET_INFLIGHT_FD = 31
SET_INFLIGHT_FD = 32
RESET_DEVICE = 34
GET_MAX_MEM_SLOTS = 36
ADD_MEM_REG = 37
REM_MEM_REG = 38
SET_STATUS = 39
GET_STATUS = 40

NEED_REPLY = 0x8
F_NOTIFY_ON_EMPTY = 1 << 24
F_INDIRECT_DESC = 1 << 28
F_EVENT_IDX = 1 << 29
F_PROTOCOL_FEATURES = 1 << 30
F_VERSION_1 = 1 << 32
F_RING_PACKED = 1 << 34
PF_MQ = 1 << 0
PF_REPLY_ACK = 1 << 3
PF_CONFIG = 1 << 9
PF_INFLIGHT_SHMFD = 1 << 12
PF_RESET_DEVICE = 1 << 13
PF_CONFIGURE_MEM_SLOTS = 1 << 15
PF_STATUS = 1 << 16

T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4
DESC_F_AVAIL, DESC_F_USED = 1 << 7, 1 << 15
DESC = struct.Struct("<QIHH")
UVA_BASE = 0x7F00_0000_0000
GPA_BASE = 0x1_0000_0000


_fence = threading.Lock()


def full_barrier() -> None:
    """A locked instruction, so that the store before is visible before the load after."""
    _fence.acquire()
    _fence.release()


class Disconnected(Exception):
    """The back-end closed the connection."""


class Memory:
    """Guest memory: one memfd.  Rings are placed from the top down and stay; request
    buffers come from the bottom up, round and round below the rings."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.fd = os.memfd_create("guest-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        self.mm = mmap.mmap(self.fd, size)
        self.next = 0
        self.top = size

    def alloc(self, size: int, align: int = 64) -> int:
        """A guest physical address of ``size`` bytes for a request's buffer."""
        start = -(-self.next // align) * align
        if start + size > self.top:
            start = 0
        self.next = start + size
        return GPA_BASE + start

    def alloc_ring(self, size: int, align: int = 4096) -> int:
        """A guest physical address of ``size`` bytes that stay the ring's."""
        self.top = (self.top - size) // align * align
        assert self.top > self.next, "guest memory full"
        return GPA_BASE + self.top

    def off(self, gpa: int) -> int:
        return gpa - GPA_BASE

    def uva(self, gpa: int) -> int:
        return UVA_BASE + gpa - GPA_BASE

    def write(self, gpa: int, data: bytes) -> None:
        off = self.off(gpa)
        self.mm[off:off + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        off = self.off(gpa)
        return self.mm[off:off + size]

    def regions(self) -> list[tuple[int, int, int, int]]:
        """(gpa, size, uva, mmap offset) of the whole memory as one region."""
        return [(GPA_BASE, self.size, UVA_BASE, 0)]

    def close(self) -> None:
        self.mm.close()
        os.close(self.fd)


@dataclass
class Request:
    """One virtio-blk request as the driver laid it out."""

    rtype: int
    sector: int
    data: bytes = b""          # what a write sends
    read_len: int = 0          # how much a read (or GET_ID) wants
    bufs: list[tuple[int, int, bool]] = field(default_factory=list)
    status_gpa: int = 0
    data_gpa: int = 0


class SplitDriver:
    """The driver's side of a split virtqueue."""

    def __init__(self, mem: Memory, num: int, *, event_idx: bool, indirect: bool) -> None:
        self.mem = mem
        self.num = num
        self.event_idx = event_idx
        self.indirect = indirect
        self.desc = mem.alloc_ring(16 * num)
        self.avail = mem.alloc_ring(6 + 2 * num)
        self.used = mem.alloc_ring(6 + 8 * num)
        mem.write(self.desc, bytes(16 * num))
        mem.write(self.avail, bytes(6 + 2 * num))
        mem.write(self.used, bytes(6 + 8 * num))
        self.free = list(range(num))
        self.avail_idx = 0
        self.last_used = 0
        self.chains: dict[int, list[int]] = {}

    def addrs(self) -> tuple[int, int, int]:
        return self.desc, self.avail, self.used

    def add(self, bufs: list[tuple[int, int, bool]]) -> int | None:
        """Makes a chain available; the head (the request's id), or None if full."""
        mem = self.mem
        if self.indirect and len(bufs) > 1:
            if not self.free:
                return None
            table = mem.alloc(16 * len(bufs), 16)
            for i, (gpa, length, writable) in enumerate(bufs):
                flags = (DESC_F_WRITE if writable else 0) | (
                    DESC_F_NEXT if i + 1 < len(bufs) else 0)
                mem.write(table + 16 * i, DESC.pack(gpa, length, flags, i + 1))
            head = self.free.pop()
            mem.write(self.desc + 16 * head, DESC.pack(table, 16 * len(bufs),
                                                       DESC_F_INDIRECT, 0))
            used = [head]
        else:
            if len(self.free) < len(bufs):
                return None
            used = [self.free.pop() for _ in bufs]
            for i, (gpa, length, writable) in enumerate(bufs):
                flags = (DESC_F_WRITE if writable else 0) | (
                    DESC_F_NEXT if i + 1 < len(bufs) else 0)
                nxt = used[i + 1] if i + 1 < len(bufs) else 0
                mem.write(self.desc + 16 * used[i], DESC.pack(gpa, length, flags, nxt))
            head = used[0]
        self.chains[head] = used
        mem.write(self.avail + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))
        return head

    def needs_kick(self, old: int) -> bool:
        if self.event_idx:
            event = struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.num, 2))[0]
            return (self.avail_idx - event - 1) & 0xFFFF < (self.avail_idx - old) & 0xFFFF
        return not struct.unpack("<H", self.mem.read(self.used, 2))[0] & 1

    def completions(self) -> list[tuple[int, int]]:
        done = []
        while True:
            used_idx = struct.unpack("<H", self.mem.read(self.used + 2, 2))[0]
            while self.last_used != used_idx:
                head, length = struct.unpack(
                    "<II", self.mem.read(self.used + 4 + 8 * (self.last_used % self.num), 8))
                self.last_used = (self.last_used + 1) & 0xFFFF
                self.free.extend(self.chains.pop(head))
                done.append((head, length))
            if not self.event_idx:
                return done
            # Ask for a call at the next completion, then look again: one may have been
            # published before the device could see the request (virtio's
            # virtqueue_enable_cb() race).
            self.mem.write(self.avail + 4 + 2 * self.num, struct.pack("<H", self.last_used))
            full_barrier()
            if struct.unpack("<H", self.mem.read(self.used + 2, 2))[0] == self.last_used:
                return done

    def base(self) -> int:
        return self.avail_idx


class PackedDriver:
    """The driver's side of a packed virtqueue."""

    def __init__(self, mem: Memory, num: int, *, event_idx: bool, indirect: bool) -> None:
        self.mem = mem
        self.num = num
        self.event_idx = event_idx
        self.indirect = indirect
        self.ring = mem.alloc_ring(16 * num)
        self.driver_area = mem.alloc_ring(4, 16)
        self.device_area = mem.alloc_ring(4, 16)
        mem.write(self.ring, bytes(16 * num))
        mem.write(self.driver_area, bytes(4))
        mem.write(self.device_area, bytes(4))
        self.next = 0
        self.wrap = True
        self.used_pos = 0
        self.used_wrap = True
        self.free_slots = num
        self.free_ids = list(range(num))
        self.slots: dict[int, int] = {}

    def addrs(self) -> tuple[int, int, int]:
        return self.ring, self.driver_area, self.device_area

    def _flags(self, flags: int, wrap: bool) -> int:
        return flags | (DESC_F_AVAIL if wrap else DESC_F_USED)

    def add(self, bufs: list[tuple[int, int, bool]]) -> int | None:
        mem = self.mem
        if self.indirect and len(bufs) > 1:
            table = mem.alloc(16 * len(bufs), 16)
            for i, (gpa, length, writable) in enumerate(bufs):
                mem.write(table + 16 * i, DESC.pack(gpa, length, 0,
                                                    DESC_F_WRITE if writable else 0))
            descs = [(table, 16 * len(bufs), DESC_F_INDIRECT)]
        else:
            descs = [(gpa, length, DESC_F_WRITE if writable else 0)
                     for gpa, length, writable in bufs]
        if len(descs) > self.free_slots or not self.free_ids:
            return None
        buf_id = self.free_ids.pop()
        head_pos = self.next
        head_flags = 0
        for i, (gpa, length, flags) in enumerate(descs):
            if i + 1 < len(descs):
                flags |= DESC_F_NEXT
            flags = self._flags(flags, self.wrap)
            if i == 0:
                mem.write(self.ring + 16 * self.next, struct.pack("<QIH", gpa, length, buf_id))
                head_flags = flags
            else:
                mem.write(self.ring + 16 * self.next, DESC.pack(gpa, length, buf_id, flags))
            self.next += 1
            if self.next == self.num:
                self.next = 0
                self.wrap = not self.wrap
        self.free_slots -= len(descs)
        self.slots[buf_id] = len(descs)
        mem.write(self.ring + 16 * head_pos + 14, struct.pack("<H", head_flags))
        return buf_id

    def needs_kick(self, old: int) -> bool:
        flags = struct.unpack("<H", self.mem.read(self.device_area + 2, 2))[0]
        return flags != 1

    def completions(self) -> list[tuple[int, int]]:
        done = []
        while True:
            off = self.ring + 16 * self.used_pos
            length, buf_id, flags = struct.unpack("<IHH", self.mem.read(off + 8, 8))
            avail, used = bool(flags & DESC_F_AVAIL), bool(flags & DESC_F_USED)
            if avail != self.used_wrap or used != self.used_wrap:
                return done
            slots = self.slots.pop(buf_id)
            self.free_slots += slots
            self.free_ids.append(buf_id)
            self.used_pos += slots
            if self.used_pos >= self.num:
                self.used_pos -= self.num
                self.used_wrap = not self.used_wrap
            done.append((buf_id, length))

    def base(self) -> int:
        return (self.next | self.wrap << 15 | (self.used_pos | self.used_wrap << 15) << 16)


Driver = SplitDriver | PackedDriver


class Frontend:
    """A vhost-user connection: messages, and virtqueues of virtio-blk requests."""

    def __init__(self, path: str, *, timeout: float = 20.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:     # the export may still be on its way (qsd starting up)
            try:
                self.sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.mem: Memory | None = None
        self.queues: dict[int, Driver] = {}
        self.kicks: dict[int, int] = {}
        self.calls: dict[int, int] = {}
        self.requests: dict[tuple[int, int], Request] = {}
        self.features = 0

    # ---- messages -------------------------------------------------------------------------

    def send(self, request: int, payload: bytes = b"", *, flags: int = 1,
             fds: list[int] | None = None) -> None:
        data = struct.pack("=III", request, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"={len(fds)}i", *fds))
               ] if fds else []
        try:
            self.sock.sendmsg([data], anc)
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise Disconnected from exc

    def recv(self) -> tuple[int, int, bytes, list[int]]:
        """A reply: request, flags, payload, descriptors."""
        fds: list[int] = []
        header = b""
        try:
            while len(header) < 12:
                data, anc, _, _ = self.sock.recvmsg(12 - len(header), socket.CMSG_SPACE(32))
                if not data:
                    raise Disconnected
                header += data
                for level, kind, raw in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds.extend(struct.unpack(f"={len(raw) // 4}i", raw))
            request, flags, size = struct.unpack("=III", header)
            payload = b""
            while len(payload) < size:
                data = self.sock.recv(size - len(payload))
                if not data:
                    raise Disconnected
                payload += data
        except ConnectionResetError as exc:
            raise Disconnected from exc
        return request, flags, payload, fds

    def call(self, request: int, payload: bytes = b"", *, fds: list[int] | None = None
             ) -> bytes:
        self.send(request, payload, fds=fds)
        reply, flags, data, rfds = self.recv()
        assert reply == request and flags == 5, (reply, flags)
        for fd in rfds:
            os.close(fd)
        return data

    def call_fds(self, request: int, payload: bytes = b"") -> tuple[bytes, list[int]]:
        self.send(request, payload)
        reply, _, data, fds = self.recv()
        assert reply == request
        return data, fds

    def u64(self, request: int) -> int:
        return int(struct.unpack("=Q", self.call(request))[0])

    def is_closed(self, timeout: float = 10.0) -> bool:
        """Whether the back-end has closed the connection (reading what is left)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(4096):
                pass
            return True
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    # ---- set-up ---------------------------------------------------------------------------

    def negotiate(self, *, packed: bool = False, event_idx: bool = True,
                  indirect: bool = True, protocol: int | None = None) -> int:
        offered = self.u64(GET_FEATURES)
        wanted = F_VERSION_1 | F_PROTOCOL_FEATURES
        if event_idx:
            wanted |= F_EVENT_IDX
        if indirect:
            wanted |= F_INDIRECT_DESC
        if packed:
            wanted |= F_RING_PACKED
        wanted |= offered & 0xFFFFFF  # the device's own bits
        assert offered & wanted == wanted, hex(offered)
        pf = self.u64(GET_PROTOCOL_FEATURES)
        self.send(SET_PROTOCOL_FEATURES, struct.pack("=Q", pf if protocol is None
                                                     else protocol & pf))
        self.send(SET_OWNER)
        self.send(SET_FEATURES, struct.pack("=Q", wanted))
        self.features = wanted
        return offered

    def set_memory(self, mem: Memory) -> None:
        self.mem = mem
        regions = mem.regions()
        payload = struct.pack("=II", len(regions), 0) + b"".join(
            struct.pack("=QQQQ", *r) for r in regions)
        self.send(SET_MEM_TABLE, payload, fds=[mem.fd] * len(regions))

    def start_queue(self, index: int, num: int = 128, *, base: int | None = None) -> Driver:
        assert self.mem is not None
        packed = bool(self.features & F_RING_PACKED)
        kind = PackedDriver if packed else SplitDriver
        driver = kind(self.mem, num, event_idx=bool(self.features & F_EVENT_IDX),
                      indirect=bool(self.features & F_INDIRECT_DESC))
        self.send(SET_VRING_NUM, struct.pack("=II", index, num))
        start = (0x80008000 if packed else 0) if base is None else base
        self.send(SET_VRING_BASE, struct.pack("=II", index, start))
        desc, avail, used = (self.mem.uva(a) for a in driver.addrs())
        self.send(SET_VRING_ADDR, struct.pack("=IIQQQQ", index, 0, desc, used, avail, 0))
        kick = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.send(SET_VRING_CALL, struct.pack("=Q", index), fds=[call])
        self.send(SET_VRING_KICK, struct.pack("=Q", index), fds=[kick])
        self.send(SET_VRING_ENABLE, struct.pack("=II", index, 1))
        self.queues[index] = driver
        self.kicks[index] = kick
        self.calls[index] = call
        return driver

    def stop_queue(self, index: int) -> int:
        data = self.call(GET_VRING_BASE, struct.pack("=II", index, 0))
        return int(struct.unpack("=II", data)[1])

    def setup(self, queues: int = 1, *, mem_size: int = 16 << 20, num: int = 128,
              packed: bool = False, event_idx: bool = True, indirect: bool = True) -> None:
        self.negotiate(packed=packed, event_idx=event_idx, indirect=indirect)
        self.set_memory(Memory(mem_size))
        for index in range(queues):
            self.start_queue(index, num)
        # A message with a reply: everything before it has been applied.
        self.u64(GET_QUEUE_NUM)

    def close(self) -> None:
        self.sock.close()
        for fd in [*self.kicks.values(), *self.calls.values()]:
            os.close(fd)
        self.kicks.clear()
        self.calls.clear()
        if self.mem is not None:
            self.mem.close()
            self.mem = None

    # ---- virtio-blk requests ----------------------------------------------------------------

    def submit(self, queue: int, req: Request, *, kick: bool = True) -> int | None:
        """Lays out and makes available one request; its id, or None if the ring is full."""
        mem = self.mem
        assert mem is not None
        hdr = mem.alloc(16, 16)
        mem.write(hdr, struct.pack("<IIQ", req.rtype, 0, req.sector))
        bufs = [(hdr, 16, False)]
        if req.data:
            req.data_gpa = mem.alloc(len(req.data), 512)
            mem.write(req.data_gpa, req.data)
            bufs.append((req.data_gpa, len(req.data), False))
        if req.read_len:
            req.data_gpa = mem.alloc(req.read_len, 512)
            mem.write(req.data_gpa, b"\xee" * req.read_len)
            bufs.append((req.data_gpa, req.read_len, True))
        req.status_gpa = mem.alloc(1, 1)
        mem.write(req.status_gpa, b"\xff")
        bufs.append((req.status_gpa, 1, True))
        req.bufs = bufs
        driver = self.queues[queue]
        old = driver.base() & 0xFFFF
        head = driver.add(bufs)
        if head is None:
            return None
        self.requests[(queue, head)] = req
        if kick and driver.needs_kick(old):
            self.kick(queue)
        return head

    def kick(self, queue: int) -> None:
        os.write(self.kicks[queue], (1).to_bytes(8, "little"))

    def wait(self, queue: int, count: int = 1, timeout: float = 20.0
             ) -> list[tuple[Request, int]]:
        """Waits for ``count`` completions: (request, length written) each."""
        driver = self.queues[queue]
        done: list[tuple[Request, int]] = []
        call = self.calls[queue]
        while len(done) < count:
            for head, length in driver.completions():
                done.append((self.requests.pop((queue, head)), length))
            if len(done) >= count:
                break
            ready, _, _ = select.select([call, self.sock], [], [], timeout)
            if not ready:
                raise TimeoutError(f"queue {queue}: {len(done)} of {count} completions")
            if self.sock in ready:
                if not self.sock.recv(1, socket.MSG_PEEK):
                    raise Disconnected
            if call in ready:
                try:
                    os.read(call, 8)
                except BlockingIOError:
                    pass
        return done

    def status(self, req: Request) -> int:
        assert self.mem is not None
        return self.mem.read(req.status_gpa, 1)[0]

    def data(self, req: Request) -> bytes:
        assert self.mem is not None
        return self.mem.read(req.data_gpa, req.read_len)

    def io(self, queue: int, req: Request) -> Request:
        """One request, start to finish."""
        assert self.submit(queue, req) is not None
        self.wait(queue)
        return req

    def read(self, queue: int, sector: int, length: int) -> tuple[int, bytes]:
        req = self.io(queue, Request(T_IN, sector, read_len=length))
        return self.status(req), self.data(req)

    def write(self, queue: int, sector: int, data: bytes) -> int:
        return self.status(self.io(queue, Request(T_OUT, sector, data=data)))

    def discard_or_zeroes(self, queue: int, rtype: int, sector: int, count: int,
                          flags: int = 0) -> int:
        return self.status(self.io(queue, Request(
            rtype, 0, data=struct.pack("<QII", sector, count, flags))))
