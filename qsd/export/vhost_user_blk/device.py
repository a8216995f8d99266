"""One vhost-user connection: the back-end side of the protocol (control path).

Messages are read and answered on the main loop, one at a time.  They configure the
device (features, memory table, inflight buffer, config space) and its virtqueues, which
run in their own AioContexts: anything that touches a running queue (starting it,
stopping it, new call fds, a new memory table) is handed to the queue's thread.

A front-end that breaks the protocol gets QEMU's treatment: the reason goes to stderr as
``vu_panic: ...`` (QEMU's texts) and the connection is closed; the export stays and waits
for the next front-end.  Every file descriptor received is either kept by the device or
closed before the next message.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import mmap
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from qsd.aio import main_context
from qsd.errors import error_report
from qsd.export.vhost_user_blk import protocol as P
from qsd.export.vhost_user_blk.inflight import SplitInflight, queue_region_size
from qsd.export.vhost_user_blk.memory import GuestMemory, MapError, map_fd
from qsd.export.vhost_user_blk.protocol import Request as R
from qsd.export.vhost_user_blk.queue import Disk, Ring, VirtQueue
from qsd.export.vhost_user_blk.vring import PackedRing, RingError, SplitRing

if TYPE_CHECKING:
    from qsd.aio import AioContext

T = TypeVar("T")

_FD_SPACE = socket.CMSG_SPACE((P.MAX_FDS + 1) * 4)


class Panic(Exception):
    """The front-end broke the protocol: report and drop the connection."""


class Message:
    """One front-end message and the descriptors it carried (closed unless taken)."""

    __slots__ = ("request", "flags", "payload", "fds")

    def __init__(self, request: int, flags: int, payload: bytes, fds: list[int]) -> None:
        self.request = request
        self.flags = flags
        self.payload = payload
        self.fds = fds

    def take_fd(self) -> int:
        return self.fds.pop(0)

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()

    def u64(self) -> int:
        if len(self.payload) < 8:
            return 0
        return int(P.U64.unpack_from(self.payload)[0])

    def state(self) -> tuple[int, int]:
        index, num = P.VRING_STATE.unpack_from(self.payload.ljust(P.VRING_STATE.size, b"\0"))
        return index, num


async def _run(fn: Callable[..., T], *args: Any) -> T:
    return fn(*args)


class BlkDevice:
    """The device the export presents: identity, features and configuration space."""

    def __init__(self, disk: Disk, num_queues: int, contexts: list[AioContext]) -> None:
        self.disk = disk
        self.num_queues = num_queues
        self.contexts = contexts
        self.wce = 0

    def features(self) -> int:
        bits = [P.BLK_F_SEG_MAX, P.BLK_F_BLK_SIZE, P.BLK_F_FLUSH, P.BLK_F_TOPOLOGY,
                P.BLK_F_CONFIG_WCE, P.BLK_F_MQ, P.BLK_F_DISCARD, P.BLK_F_WRITE_ZEROES,
                P.F_NOTIFY_ON_EMPTY, P.F_INDIRECT_DESC, P.F_EVENT_IDX,
                P.F_PROTOCOL_FEATURES, P.F_VERSION_1, P.F_RING_PACKED]
        if not self.disk.writable:
            bits.append(P.BLK_F_RO)
        return sum(1 << bit for bit in bits)

    def config(self) -> bytes:
        try:
            sectors = self.disk.blk.length() >> P.SECTOR_BITS
        except OSError:
            sectors = self.disk.sectors
        return P.blk_config(sectors, self.disk.blk_size, self.num_queues, self.wce)

    def set_wce(self, wce: int) -> None:
        self.wce = wce
        self.disk.blk.set_writethrough(not wce)


PROTOCOL_FEATURES = sum(1 << bit for bit in (
    P.PF_MQ, P.PF_REPLY_ACK, P.PF_CONFIG, P.PF_INFLIGHT_SHMFD, P.PF_RESET_DEVICE,
    P.PF_CONFIGURE_MEM_SLOTS, P.PF_STATUS))


class Connection:
    """A connected front-end and the per-connection state of the device."""

    def __init__(self, sock: socket.socket, device: BlkDevice, paused: bool) -> None:
        self.sock = sock
        self.device = device
        self.loop = asyncio.get_running_loop()
        self.features = 0
        self.protocol_features = 0
        self.status = 0
        self.mem = GuestMemory()
        self.inflight: mmap.mmap | None = None
        self.inflight_base = 0
        self.inflight_queues = 0
        self.inflight_queue_size = 0
        self.closing = False
        # Descriptors that go out with the reply being built (then closed here).
        self._reply_fds: list[int] = []
        self.queues = [VirtQueue(i, device.contexts[i % len(device.contexts)], device.disk,
                                 self._queue_broken)
                       for i in range(device.num_queues)]
        for queue in self.queues:
            queue.paused = paused
        self._handlers: dict[int, Callable[[Message], Awaitable[bytes | None]]] = {
            R.GET_FEATURES: self._get_features,
            R.SET_FEATURES: self._set_features,
            R.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            R.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            R.SET_OWNER: self._nothing,
            R.RESET_OWNER: self._reset_owner,
            R.SET_MEM_TABLE: self._set_mem_table,
            R.SET_VRING_NUM: self._set_vring_num,
            R.SET_VRING_ADDR: self._set_vring_addr,
            R.SET_VRING_BASE: self._set_vring_base,
            R.GET_VRING_BASE: self._get_vring_base,
            R.SET_VRING_KICK: self._set_vring_kick,
            R.SET_VRING_CALL: self._set_vring_call,
            R.SET_VRING_ERR: self._set_vring_err,
            R.GET_QUEUE_NUM: self._get_queue_num,
            R.SET_VRING_ENABLE: self._set_vring_enable,
            R.GET_CONFIG: self._get_config,
            R.SET_CONFIG: self._set_config,
            R.GET_INFLIGHT_FD: self._get_inflight_fd,
            R.SET_INFLIGHT_FD: self._set_inflight_fd,
            R.RESET_DEVICE: self._reset_device,
            R.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            R.ADD_MEM_REG: self._add_mem_reg,
            R.REM_MEM_REG: self._rem_mem_reg,
            R.SET_STATUS: self._set_status,
            R.GET_STATUS: self._get_status,
        }

    # ---- connection lifetime ----------------------------------------------------------------

    async def serve(self) -> None:
        """Answers messages until the front-end goes or breaks the protocol, then stops
        every queue (requests in flight finish first) and releases the guest's memory."""
        try:
            while not self.closing:
                msg = await self._read()
                if msg is None:
                    break
                try:
                    await self._dispatch(msg)
                except Panic as exc:
                    error_report(f"vu_panic: {exc}")
                    break
                finally:
                    msg.close_fds()
        except OSError:
            pass
        except Exception as exc:  # noqa: BLE001 - a bug must not end the export
            error_report(f"vhost-user-blk: dropping the front-end after {exc!r}")
        finally:
            await self._teardown()

    def close(self) -> None:
        """From the main loop: make ``serve`` end (the export is going away)."""
        self.closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def in_use(self) -> bool:
        return any(queue.tasks for queue in self.queues)

    def pause(self) -> None:
        for queue in self.queues:
            queue.pause()

    def resume(self) -> None:
        for queue in self.queues:
            queue.resume()

    def attached(self) -> bool:
        return any(queue.attached for queue in self.queues)

    def _queue_broken(self, reason: str) -> None:
        """A queue found the driver broke the ring (any thread): like QEMU's vu_panic."""
        main_context().call_soon(self._panic, reason)

    def _panic(self, reason: str) -> None:
        if not self.closing:
            error_report(f"vu_panic: {reason}")
            self.close()

    async def _teardown(self) -> None:
        for queue in self.queues:
            await queue.ctx.call(queue.stop())
        self.mem.close()
        self.mem = GuestMemory()
        if self.inflight is not None:
            with contextlib.suppress(BufferError):
                self.inflight.close()
            self.inflight = None
        self.sock.close()

    # ---- reading and answering -----------------------------------------------------------

    async def _readable(self) -> None:
        fut: asyncio.Future[None] = self.loop.create_future()

        def ready() -> None:
            if not fut.done():
                fut.set_result(None)

        self.loop.add_reader(self.sock.fileno(), ready)
        try:
            await fut
        finally:
            self.loop.remove_reader(self.sock.fileno())

    async def _recv_exactly(self, size: int, fds: list[int] | None) -> bytes | None:
        data = b""
        while len(data) < size:
            try:
                if fds is None:
                    chunk = self.sock.recv(size - len(data))
                else:
                    chunk, ancdata, msg_flags, _ = self.sock.recvmsg(
                        size - len(data), _FD_SPACE, socket.MSG_CMSG_CLOEXEC)
                    for level, kind, payload in ancdata:
                        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                            count = len(payload) // 4
                            fds.extend(struct.unpack(f"={count}i", payload[:count * 4]))
                    if msg_flags & socket.MSG_CTRUNC and len(fds) <= P.MAX_FDS:
                        fds.append(-1)  # more than fit: the kernel closed the rest
            except BlockingIOError:
                await self._readable()
                continue
            if not chunk:
                return None
            data += chunk
        return data

    async def _read(self) -> Message | None:
        fds: list[int] = []
        try:
            header = await self._recv_exactly(P.HEADER_SIZE, fds)
            if header is None:
                return None
            if len(fds) > P.MAX_FDS:
                error_report(f"A maximum of {P.MAX_FDS} fds are allowed, however got "
                             f"{len(fds)} fds now")
                return None
            request, flags, size = P.HEADER.unpack(header)
            if size > P.MAX_PAYLOAD:
                error_report(f"Error: too big message request: {request}, size: vmsg->size: "
                             f"{size}, while sizeof(vmsg->payload) = {P.MAX_PAYLOAD}")
                return None
            payload = await self._recv_exactly(size, None) if size else b""
            if payload is None:
                return None
            msg = Message(request, flags, payload, fds)
            fds = []
            return msg
        finally:
            Message(0, 0, b"", [fd for fd in fds if fd >= 0]).close_fds()

    async def _dispatch(self, msg: Message) -> None:
        if msg.request == R.NONE:
            # QEMU's export reports this as a panic but keeps the connection.
            error_report("vu_panic: disconnect")
            return
        handler = self._handlers.get(msg.request)
        if handler is None:
            raise Panic(f"Unhandled request: {msg.request}")
        need_reply = bool(msg.flags & P.FLAG_NEED_REPLY)
        try:
            reply = await handler(msg)
        except Panic:
            if need_reply:
                self._send(msg.request, P.U64.pack(1))
            raise
        if reply is not None:
            fds, self._reply_fds = self._reply_fds, []
            try:
                self._send(msg.request, reply, fds)
            finally:
                Message(0, 0, b"", fds).close_fds()
        elif need_reply:
            self._send(msg.request, P.U64.pack(0))

    def _send(self, request: int, payload: bytes, fds: list[int] | None = None) -> None:
        data = P.HEADER.pack(request, P.FLAG_VERSION | P.FLAG_REPLY, len(payload)) + payload
        ancdata = []
        if fds:
            ancdata = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"={len(fds)}i", *fds))]
        try:
            sent = self.sock.sendmsg([data], ancdata)
        except BlockingIOError:
            sent = 0
        if sent < len(data):
            # Replies are small and the front-end reads each before its next request.
            self.sock.setblocking(True)
            try:
                self.sock.sendall(data[sent:] if sent else data)
            finally:
                self.sock.setblocking(False)

    # ---- helpers --------------------------------------------------------------------------

    def _queue(self, index: int, what: str) -> VirtQueue:
        if index >= len(self.queues):
            raise Panic(f"Invalid {what} index: {index}")
        return self.queues[index]

    def _has(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    def _has_protocol(self, bit: int) -> bool:
        return bool(self.protocol_features >> bit & 1)

    async def _in_queue(self, queue: VirtQueue, fn: Callable[..., T], *args: Any) -> T:
        return await queue.ctx.call(_run(fn, *args))

    async def _memory_changed(self, new: GuestMemory) -> None:
        self.mem = new
        for queue in self.queues:
            await self._in_queue(queue, queue.set_memory, new)

    # ---- features ---------------------------------------------------------------------------

    async def _nothing(self, msg: Message) -> bytes | None:
        return None

    async def _get_features(self, msg: Message) -> bytes | None:
        return P.U64.pack(self.device.features())

    async def _set_features(self, msg: Message) -> bytes | None:
        self.features = msg.u64()
        if not self._has(P.F_VERSION_1):
            raise Panic("virtio legacy devices aren't supported by libvhost-user")
        if not self._has(P.F_PROTOCOL_FEATURES):
            for queue in self.queues:
                queue.enabled = True
        return None

    async def _get_protocol_features(self, msg: Message) -> bytes | None:
        return P.U64.pack(PROTOCOL_FEATURES)

    async def _set_protocol_features(self, msg: Message) -> bytes | None:
        self.protocol_features = msg.u64()
        if self._has_protocol(P.PF_INBAND_NOTIFICATIONS) and not (
                self._has_protocol(P.PF_BACKEND_REQ) and self._has_protocol(P.PF_REPLY_ACK)):
            raise Panic("F_IN_BAND_NOTIFICATIONS requires F_BACKEND_REQ && F_REPLY_ACK")
        return None

    async def _get_queue_num(self, msg: Message) -> bytes | None:
        return P.U64.pack(len(self.queues))

    async def _get_max_mem_slots(self, msg: Message) -> bytes | None:
        return P.U64.pack(P.MAX_MEM_SLOTS)

    async def _set_status(self, msg: Message) -> bytes | None:
        self.status = msg.u64() & 0xFF
        return None

    async def _get_status(self, msg: Message) -> bytes | None:
        return P.U64.pack(self.status)

    async def _reset_owner(self, msg: Message) -> bytes | None:
        for queue in self.queues:
            queue.enabled = False
        return None

    async def _reset_device(self, msg: Message) -> bytes | None:
        for queue in self.queues:
            await queue.ctx.call(queue.stop())
            queue.enabled = False
            queue.base = 0
        self.status = 0
        return None

    # ---- memory -----------------------------------------------------------------------------

    async def _set_mem_table(self, msg: Message) -> bytes | None:
        payload = msg.payload
        if len(payload) < P.MEMORY_HEADER.size:
            raise Panic(f"Invalid mem table message size: {len(payload)}")
        count = P.MEMORY_HEADER.unpack_from(payload)[0]
        if (count > P.MAX_FDS or count != len(msg.fds)
                or len(payload) < P.MEMORY_HEADER.size + count * P.MEM_REGION.size):
            raise Panic(f"Invalid mem table message: {count} regions, {len(msg.fds)} fds, "
                        f"{len(payload)} bytes")
        new = GuestMemory()
        try:
            for i in range(count):
                gpa, size, uva, offset = P.MEM_REGION.unpack_from(
                    payload, P.MEMORY_HEADER.size + i * P.MEM_REGION.size)
                new = new.with_region(gpa, size, uva, offset, msg.fds[i])
        except MapError as exc:
            new.close()
            raise Panic(str(exc)) from None
        old = self.mem
        await self._memory_changed(new)
        old.close()
        return None

    def _mem_reg(self, msg: Message, name: str, fds_ok: Callable[[int], bool],
                 expected: str) -> tuple[int, int, int, int]:
        """The region of an ADD_MEM_REG/REM_MEM_REG message, with QEMU's checks."""
        if not fds_ok(len(msg.fds)):
            raise Panic(f"VHOST_USER_{name}_MEM_REG received {len(msg.fds)} fds - {expected} "
                        "should be sent for this message type")
        # QEMU's minimum is one region without the padding before it; what is missing of
        # the region then reads as zeroes (its message buffer starts zeroed).
        if len(msg.payload) < P.MEM_REGION.size:
            raise Panic(f"VHOST_USER_{name}_MEM_REG requires a message size of at least "
                        f"{P.MEM_REGION.size} bytes and only {len(msg.payload)} bytes were "
                        "received")
        payload = msg.payload.ljust(P.MEM_REG_MSG.size + P.MEM_REGION.size, b"\0")
        gpa, length, uva, offset = P.MEM_REGION.unpack_from(payload, P.MEM_REG_MSG.size)
        return gpa, length, uva, offset

    async def _add_mem_reg(self, msg: Message) -> bytes | None:
        gpa, length, uva, offset = self._mem_reg(msg, "ADD", lambda n: n == 1,
                                                 "only 1 fd")
        if len(self.mem) >= P.MAX_MEM_SLOTS:
            raise Panic("failing attempt to hot add memory via VHOST_USER_ADD_MEM_REG message "
                        "because the backend has no free ram slots available")
        try:
            new = self.mem.with_region(gpa, length, uva, offset, msg.fds[0])
        except MapError as exc:
            raise Panic(str(exc)) from None
        await self._memory_changed(new)
        return None

    async def _rem_mem_reg(self, msg: Message) -> bytes | None:
        gpa, length, uva, _ = self._mem_reg(msg, "REM", lambda n: n <= 1, "at most 1 fd")
        try:
            new, region = self.mem.without_region(gpa, length, uva)
        except MapError as exc:
            raise Panic(str(exc)) from None
        await self._memory_changed(new)
        region.close()
        return None

    # ---- virtqueues -------------------------------------------------------------------------

    async def _set_vring_num(self, msg: Message) -> bytes | None:
        index, num = msg.state()
        self._queue(index, "vring_num").num = num
        return None

    async def _set_vring_addr(self, msg: Message) -> bytes | None:
        index, _, desc, used, avail, _ = P.VRING_ADDR.unpack_from(
            msg.payload.ljust(P.VRING_ADDR.size, b"\0"))
        queue = self._queue(index, "vring_addr")
        queue.addrs = (desc, avail, used)
        if not (self.mem.has_uva(desc) and self.mem.has_uva(avail) and self.mem.has_uva(used)):
            raise Panic("Invalid vring_addr message")
        if queue.ring is not None:
            await self._in_queue(queue, queue.set_memory, self.mem)
        return None

    async def _set_vring_base(self, msg: Message) -> bytes | None:
        index, num = msg.state()
        self._queue(index, "vring_base").base = num
        return None

    async def _get_vring_base(self, msg: Message) -> bytes | None:
        index, _ = msg.state()
        queue = self._queue(index, "vring_base")
        base = await queue.ctx.call(queue.stop())
        return P.VRING_STATE.pack(index, base)

    def _vring_fd(self, msg: Message) -> tuple[VirtQueue, int]:
        value = msg.u64()
        index = value & P.VRING_IDX_MASK
        if index >= len(self.queues):
            raise Panic(f"Invalid queue index: {index}")
        if value & P.VRING_NOFD_MASK:
            return self.queues[index], -1
        if len(msg.fds) != 1:
            raise Panic(f"Invalid fds in request: {msg.request}")
        fd = msg.take_fd()
        os.set_blocking(fd, False)
        return self.queues[index], fd

    async def _set_vring_kick(self, msg: Message) -> bytes | None:
        queue, fd = self._vring_fd(msg)
        await queue.ctx.call(queue.halt())
        try:
            ring = self._ring(queue)
        except RingError as exc:
            if fd >= 0:
                os.close(fd)
            raise Panic(str(exc)) from None
        await self._in_queue(queue, queue.start, ring, fd)
        return None

    def _ring(self, queue: VirtQueue) -> Ring:
        desc, avail, used = queue.addrs
        notify_on_empty = self._has(P.F_NOTIFY_ON_EMPTY)
        event_idx = self._has(P.F_EVENT_IDX)
        if self._has(P.F_RING_PACKED):
            return PackedRing(self.mem, queue.num, desc, avail, used, event_idx=event_idx,
                              notify_on_empty=notify_on_empty, base=queue.base)
        inflight = None
        if (self.inflight is not None and self._has_protocol(P.PF_INFLIGHT_SHMFD)
                and queue.index < self.inflight_queues):
            if queue.num > self.inflight_queue_size:
                raise RingError(f"Failed to check inflights for vq: {queue.index}\n")
            stride = queue_region_size(self.inflight_queue_size)
            start = self.inflight_base + queue.index * stride
            view = memoryview(self.inflight)[start:start + stride]
            inflight = SplitInflight(view, queue.num)
        try:
            return SplitRing(self.mem, queue.num, desc, avail, used, event_idx=event_idx,
                             notify_on_empty=notify_on_empty, last_avail_idx=queue.base,
                             inflight=inflight)
        except (struct.error, ValueError, IndexError) as exc:
            raise RingError(f"Failed to check inflights for vq: {queue.index}\n") from exc

    async def _set_vring_call(self, msg: Message) -> bytes | None:
        queue, fd = self._vring_fd(msg)
        if fd >= 0:
            # A call right away, as QEMU's back-end does: a request completed while the
            # front-end was away must not wait for the next one.
            with contextlib.suppress(OSError):
                os.write(fd, (1).to_bytes(8, "little"))
        await self._in_queue(queue, queue.set_call_fd, fd)
        return None

    async def _set_vring_err(self, msg: Message) -> bytes | None:
        queue, fd = self._vring_fd(msg)
        await self._in_queue(queue, queue.set_err_fd, fd)
        return None

    async def _set_vring_enable(self, msg: Message) -> bytes | None:
        index, enable = msg.state()
        self._queue(index, "vring_enable").enabled = bool(enable)
        return None

    # ---- configuration space ---------------------------------------------------------------

    async def _get_config(self, msg: Message) -> bytes | None:
        payload = msg.payload
        if len(payload) < P.CONFIG_HEADER.size:
            return b""
        offset, size, flags = P.CONFIG_HEADER.unpack_from(payload)
        config = self.device.config()
        if (size > P.MAX_CONFIG_SIZE or len(payload) < P.CONFIG_HEADER.size + size
                or offset + size > len(config)):
            return b""
        return P.CONFIG_HEADER.pack(offset, size, flags) + config[offset:offset + size]

    async def _set_config(self, msg: Message) -> bytes | None:
        payload = msg.payload
        if len(payload) >= P.CONFIG_HEADER.size + 1:
            offset, size, flags = P.CONFIG_HEADER.unpack_from(payload)
            if flags == P.CONFIG_TYPE_FRONTEND and offset == P.WCE_OFFSET and size == 1:
                self.device.set_wce(payload[P.CONFIG_HEADER.size])
                return None
        raise Panic("Set virtio configuration space failed")

    # ---- inflight buffer ------------------------------------------------------------------

    async def _get_inflight_fd(self, msg: Message) -> bytes | None:
        if len(msg.payload) != P.INFLIGHT.size:
            raise Panic(f"Invalid get_inflight_fd message:{len(msg.payload)}")
        _, _, num_queues, queue_size = P.INFLIGHT.unpack(msg.payload)
        if not 0 < num_queues <= len(self.queues) or not 0 < queue_size <= P.MAX_QUEUE_SIZE:
            raise Panic("Failed to alloc vhost inflight area")
        size = queue_region_size(queue_size) * num_queues
        fd = os.memfd_create("vhost-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS,
                        fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
            self._use_inflight(mmap.mmap(fd, size), num_queues, queue_size)
        except BaseException:
            os.close(fd)
            raise
        self._reply_fds = [fd]
        return P.INFLIGHT.pack(size, 0, num_queues, queue_size)

    async def _set_inflight_fd(self, msg: Message) -> bytes | None:
        if len(msg.fds) != 1 or len(msg.payload) != P.INFLIGHT.size:
            raise Panic(f"Invalid set_inflight_fd message size:{len(msg.payload)} "
                        f"fds:{len(msg.fds)}")
        size, offset, num_queues, queue_size = P.INFLIGHT.unpack(msg.payload)
        if (not 0 < num_queues <= len(self.queues) or not 0 < queue_size <= P.MAX_QUEUE_SIZE
                or size < queue_region_size(queue_size) * num_queues):
            raise Panic(f"Invalid set_inflight_fd message size:{len(msg.payload)} "
                        f"fds:{len(msg.fds)}")
        try:
            mm, base = map_fd(msg.fds[0], offset, size)
        except MapError as exc:
            raise Panic(f"set_inflight_fd mmap error: {exc}") from None
        self._use_inflight(mm, num_queues, queue_size, base)
        return None

    def _use_inflight(self, mm: mmap.mmap, num_queues: int, queue_size: int,
                      base: int = 0) -> None:
        if self.inflight is not None:
            with contextlib.suppress(BufferError):
                self.inflight.close()
        self.inflight = mm
        self.inflight_base = base
        self.inflight_queues = num_queues
        self.inflight_queue_size = queue_size
