"""The NBD transmission phase: the per-request hot path, one protocol object per client.

It runs in the export's AioContext. Requests are parsed straight out of the receive
buffer; a READ or WRITE the block layer can serve without blocking is answered before
``data_received`` returns, everything else becomes a task, so a connection serves up to
MAX_NBD_REQUESTS requests at once (QEMU's limit) and stops reading beyond that, while
the reply buffer is full, and while the export's node is drained.

Validation follows QEMU's ``nbd_co_receive_request()``: a bad request gets an EINVAL
reply whatever the reason (QEMU's behaviour), a request whose payload cannot be consumed
is answered and then the connection is dropped.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, cast

from qsd.aio import wait_tasks
from qsd.block.node import BLOCK_DATA, BLOCK_ZERO
from qsd.errors import error_report
from qsd.nbd.protocol import (
    COMPACT_REQUEST,
    EXTENDED_CHUNK,
    EXTENDED_REQUEST,
    MAX_NBD_REQUESTS,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_CACHE,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_DF,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_PAYLOAD_LEN,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EXTENDED_REPLY_MAGIC,
    NBD_EXTENDED_REQUEST_MAGIC,
    NBD_FLAG_READ_ONLY,
    NBD_MAX_BLOCK_STATUS_EXTENTS,
    NBD_MAX_BUFFER_SIZE,
    NBD_META_ID_ALLOCATION_DEPTH,
    NBD_META_ID_BASE_ALLOCATION,
    NBD_META_ID_DIRTY_BITMAP,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
    NBD_REPLY_TYPE_ERROR,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STATE_DIRTY,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    NBD_STRUCTURED_REPLY_MAGIC,
    SIMPLE_REPLY,
    STRUCTURED_CHUNK,
    MetaContexts,
    Mode,
    SocketCarrier,
    cmd_name,
    nbd_errno,
)

if TYPE_CHECKING:
    from qsd.aio import AioContext
    from qsd.block.backend import BlockBackend
    from qsd.block.dirty_bitmap import DirtyBitmap

_EINVAL = 22
_EXTENT32 = struct.Struct(">II")
_EXTENT64 = struct.Struct(">QQ")


class ClientExport(Protocol):
    """What a client's transmission phase reads from its export (``server.ServedExport``)."""

    @property
    def blk(self) -> BlockBackend: ...

    @property
    def size(self) -> int: ...

    @property
    def nbdflags(self) -> int: ...

    @property
    def bitmaps(self) -> list[DirtyBitmap]: ...


class _Request:
    __slots__ = ("flags", "type", "cookie", "offset", "length", "data", "contexts")

    def __init__(self, flags: int, rtype: int, cookie: int, offset: int, length: int) -> None:
        self.flags = flags
        self.type = rtype
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.data: bytes | None = None
        self.contexts: MetaContexts | None = None


class _Disconnect(Exception):
    """Sending or reading failed in a way after which QEMU drops the client."""


class NbdClient(SocketCarrier):
    """One negotiated client connection; lives in (and is only touched from) one loop,
    except for ``quiescing``/``inflight``, which the drain hooks use from the main thread.

    When the export's node moves to another iothread the connection moves along, while
    drained: ``detach`` takes the socket out of the old loop (a duplicate of its fd keeps
    it open while the old transport is dropped), ``adopt`` serves it in the new one.
    ``carrier`` is the protocol on the socket: the client itself, or the TLS layer that
    decrypts for it; either hands over its socket transport with ``release_transport``.
    """

    def __init__(self, export: ClientExport, ctx: AioContext, mode: int,
                 contexts: MetaContexts, on_finished: Callable[[NbdClient], None]) -> None:
        self.ctx = ctx
        self.carrier: SocketCarrier = self
        self.blk = export.blk
        self.size = export.size
        self.bitmaps = export.bitmaps
        self.read_only = bool(export.nbdflags & NBD_FLAG_READ_ONLY)
        self.mode = mode
        self.structured = mode >= Mode.STRUCTURED
        self.extended = mode >= Mode.EXTENDED
        self.contexts = contexts
        self.on_finished = on_finished
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.tasks: set[asyncio.Task[None]] = set()
        self.lock = threading.Lock()
        self.inflight = 0
        self.quiescing = False
        self.write_paused = False
        self.reading_paused = False
        self.disconnecting = False
        self.closing = False
        self.processing = False
        # Transports dropped by detach(): their connection_lost is no disconnect.
        self._dropped = 0
        self.finished: asyncio.Future[None] = self.loop.create_future()
        if self.extended:
            self._header = EXTENDED_REQUEST
            self._magic = NBD_EXTENDED_REQUEST_MAGIC
        else:
            self._header = COMPACT_REQUEST
            self._magic = NBD_REQUEST_MAGIC

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        if self.closing:
            self.transport.abort()
            return
        # A fresh transport reads; a moved client may still have to wait for drain's end.
        self.reading_paused = False
        self._update_reading()

    def data_received(self, data: bytes) -> None:
        if self.disconnecting or self.closing:
            return
        self.buf += data
        self._process()

    def eof_received(self) -> bool:
        if self.buf:
            error_report("Disconnect client, due to: "
                         "Unexpected end-of-file before all data were read")
        self._begin_disconnect()
        return True

    def pause_writing(self) -> None:
        self.write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self._kick()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._dropped:
            self._dropped -= 1
            return
        self.closing = True
        self.buf.clear()
        self.loop.create_task(self._finish())

    async def _finish(self) -> None:
        await wait_tasks(self.tasks)
        if not self.finished.done():
            self.finished.set_result(None)
        self.on_finished(self)

    # -- flow control and drain ----------------------------------------------------

    def _may_dispatch(self) -> bool:
        return not (self.quiescing or self.write_paused or self.disconnecting or self.closing
                    or self.inflight >= MAX_NBD_REQUESTS)

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.closing:
            return
        if self._may_dispatch():
            if self.reading_paused:
                self.reading_paused = False
                transport.resume_reading()
        elif not self.reading_paused:
            self.reading_paused = True
            transport.pause_reading()

    def _kick(self) -> None:
        """Consumes what is already buffered and reopens the socket if allowed."""
        if self.buf:
            self._process()
        else:
            self._update_reading()

    def quiesce(self) -> None:
        """drained_begin (any thread): no new request starts after this returns."""
        with self.lock:
            self.quiescing = True
        self.loop.call_soon_threadsafe(self._update_reading)

    def unquiesce(self) -> None:
        """drained_end (any thread)."""
        with self.lock:
            self.quiescing = False
        self.loop.call_soon_threadsafe(self._kick)

    def release_transport(self) -> asyncio.Transport | None:
        transport, self.transport = self.transport, None
        return transport

    async def detach(self) -> socket.socket | None:
        """In this client's loop, drained: takes the connection out of the loop.

        Replies still buffered go out first.  Returns a socket on a duplicate of the
        connection's fd, or None if the client is gone already.
        """
        transport = self.transport
        if transport is None or self.closing:
            return None
        while transport.get_write_buffer_size() and not self.closing:
            await asyncio.sleep(0.001)
        raw = None if self.closing else self.carrier.release_transport()
        if raw is None:
            return None
        fd = os.dup(raw.get_extra_info("socket").fileno())
        self._dropped += 1
        raw.abort()
        return socket.socket(fileno=fd)

    async def adopt(self, ctx: AioContext, sock: socket.socket) -> None:
        """In ``ctx``'s loop: serves the connection ``detach`` handed over from here on."""
        self.ctx = ctx
        self.loop = asyncio.get_running_loop()
        self.finished = self.loop.create_future()
        sock.setblocking(False)
        try:
            await self.loop.connect_accepted_socket(lambda: self.carrier, sock)
        except OSError:
            sock.close()
            self.closing = True
            self.loop.create_task(self._finish())

    def abort(self) -> None:
        """Hard removal: drop the connection now; requests in flight still complete."""
        self.closing = True
        if self.transport is not None:
            self.transport.abort()

    def gone(self) -> bool:
        """The client has left (disconnect, EOF or error) and has nothing in flight."""
        return (self.disconnecting or self.closing) and self.inflight == 0

    def _begin_disconnect(self) -> None:
        """Stops reading; the socket closes once the requests in flight are answered."""
        self.disconnecting = True
        self._update_reading()
        if self.inflight == 0 and self.transport is not None:
            self.transport.close()

    def _fail(self, message: str) -> None:
        error_report(f"Disconnect client, due to: {message}")
        self.buf.clear()
        self._begin_disconnect()

    # -- request parsing -----------------------------------------------------------

    def _process(self) -> None:
        self.processing = True
        try:
            self._parse()
        finally:
            self.processing = False
        self._update_reading()

    def _parse(self) -> None:
        buf = self.buf
        header = self._header
        hsize = header.size
        while len(buf) >= hsize and self._may_dispatch():
            magic, flags, rtype, cookie, offset, length = header.unpack_from(buf)
            if magic != self._magic:
                self._fail(f"invalid magic (got 0x{magic:x}, expected 0x{self._magic:x})")
                return
            if rtype == NBD_CMD_DISC:
                buf.clear()
                self._begin_disconnect()
                return
            req = _Request(flags, rtype, cookie, offset, length)
            error, payload_len, fatal = self._check_header(req)
            if fatal:
                # The payload cannot be consumed: answer, then drop the client.
                self._start()
                self._reply_error_now(req, error or "")
                self._fail("Request handling failed in intermediate state")
                self._finish_request()
                return
            end = hsize + payload_len
            if len(buf) < end:
                break
            with self.lock:
                if self.quiescing:
                    break
                self.inflight += 1
            payload = bytes(buf[hsize:end]) if payload_len else b""
            del buf[:end]
            if req.type == NBD_CMD_WRITE:
                req.data = payload          # a write of 0 bytes succeeds, as in QEMU
            elif payload_len and req.type == NBD_CMD_BLOCK_STATUS:
                self._parse_status_payload(req, payload)
            if error is None:
                error = self._check_request(req)
            if error is not None:
                self._reply_error_now(req, error)
                self._finish_request()
            else:
                self._dispatch(req)

    def _start(self) -> None:
        with self.lock:
            self.inflight += 1

    def _check_header(self, req: _Request) -> tuple[str | None, int, bool]:
        """(error found before the payload, payload bytes to consume, fatal)."""
        rtype, length = req.type, req.length
        with_payload = self.extended and bool(req.flags & NBD_CMD_FLAG_PAYLOAD_LEN)
        payload_len = length if with_payload else 0
        check_length = with_payload
        if rtype in (NBD_CMD_READ, NBD_CMD_CACHE):
            check_length = True
        elif rtype == NBD_CMD_WRITE:
            payload_len = length
            check_length = True
        elif rtype == NBD_CMD_BLOCK_STATUS and with_payload:
            check_length = True
        if check_length and length > NBD_MAX_BUFFER_SIZE:
            return (f"len ({length}) is larger than max len ({NBD_MAX_BUFFER_SIZE})",
                    payload_len, payload_len > 0)
        if payload_len and rtype not in (NBD_CMD_WRITE, NBD_CMD_BLOCK_STATUS):
            req.length = 0  # an unsupported payload is skipped; the flag check fails later
        return None, payload_len, False

    def _parse_status_payload(self, req: _Request, payload: bytes) -> None:
        """QEMU's nbd_co_block_status_payload_read(); invalid ones select no context."""
        mine = self.contexts
        selected = MetaContexts(mine.export, len(mine.bitmaps))
        req.contexts = selected
        req.length = 0
        size = len(payload)
        if size % 4 or size < 8 or size > 8 + 4 * mine.count:
            return
        ids = struct.unpack_from(f">{(size - 8) // 4}I", payload, 8)
        for context_id in ids:
            if context_id == NBD_META_ID_BASE_ALLOCATION:
                if not mine.base_allocation or selected.base_allocation:
                    return
                selected.base_allocation = True
            elif context_id == NBD_META_ID_ALLOCATION_DEPTH:
                if not mine.allocation_depth or selected.allocation_depth:
                    return
                selected.allocation_depth = True
            elif 0 <= context_id - NBD_META_ID_DIRTY_BITMAP < len(mine.bitmaps):
                index = context_id - NBD_META_ID_DIRTY_BITMAP
                if not mine.bitmaps[index] or selected.bitmaps[index]:
                    return
                selected.bitmaps[index] = True
            else:
                return
        (req.length,) = struct.unpack_from(">Q", payload)
        selected.count = len(ids)

    def _check_request(self, req: _Request) -> str | None:
        rtype = req.type
        valid = NBD_CMD_FLAG_FUA
        rofs = False
        if rtype == NBD_CMD_READ:
            if self.structured:
                valid |= NBD_CMD_FLAG_DF
        elif rtype == NBD_CMD_WRITE:
            if self.extended:
                valid |= NBD_CMD_FLAG_PAYLOAD_LEN
            rofs = True
        elif rtype == NBD_CMD_TRIM:
            rofs = True
        elif rtype == NBD_CMD_WRITE_ZEROES:
            valid |= NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO
            rofs = True
        elif rtype == NBD_CMD_BLOCK_STATUS:
            if req.contexts is None:
                req.contexts = self.contexts
            else:
                valid |= NBD_CMD_FLAG_PAYLOAD_LEN
            valid |= NBD_CMD_FLAG_REQ_ONE
        if rofs and self.read_only:
            return "Export is read-only"
        if req.offset > self.size or req.length > self.size - req.offset:
            return (f"operation past EOF; From: {req.offset}, Len: {req.length}, "
                    f"Size: {self.size}")
        if req.flags & ~valid:
            return f"unsupported flags for command {cmd_name(rtype)} (got 0x{req.flags:x})"
        return None

    # -- dispatch ------------------------------------------------------------------

    def _dispatch(self, req: _Request) -> None:
        rtype = req.type
        try:
            if rtype == NBD_CMD_READ and not req.flags & NBD_CMD_FLAG_FUA and req.length and (
                    not self.structured or req.flags & NBD_CMD_FLAG_DF):
                data = self.blk.read_nowait(req.offset, req.length)
                if data is not None:
                    self._send_read(req, data)
                    self._finish_request()
                    return
            elif rtype == NBD_CMD_WRITE:
                assert req.data is not None
                if self.blk.write_nowait(req.offset, req.data,
                                         bool(req.flags & NBD_CMD_FLAG_FUA)):
                    self._send_generic(req, 0, "")
                    self._finish_request()
                    return
        except OSError as exc:
            message = "reading from file failed" if rtype == NBD_CMD_READ else \
                "writing to file failed"
            self._send_generic(req, exc.errno or _EINVAL, message)
            self._finish_request()
            return
        task = self.loop.create_task(self._handle(req))
        self.tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self._fail(f"Failed to send reply: {exc}")
        self._finish_request()

    def _finish_request(self) -> None:
        with self.lock:
            self.inflight -= 1
        if self.disconnecting:
            if self.inflight == 0 and self.transport is not None:
                self.transport.close()
        elif not self.closing and not self.processing:
            self._kick()

    async def _handle(self, req: _Request) -> None:
        blk = self.blk
        rtype, flags = req.type, req.flags
        fua = bool(flags & NBD_CMD_FLAG_FUA)
        if rtype == NBD_CMD_READ:
            await self._do_read(req)
            return
        if rtype == NBD_CMD_CACHE:
            await self._generic(req, self._cache(req), "caching data failed")
        elif rtype == NBD_CMD_WRITE:
            assert req.data is not None
            await self._generic(req, blk.write(req.offset, req.data, fua=fua),
                                "writing to file failed")
        elif rtype == NBD_CMD_WRITE_ZEROES:
            await self._generic(
                req, blk.write_zeroes(req.offset, req.length,
                                      may_unmap=not flags & NBD_CMD_FLAG_NO_HOLE,
                                      no_fallback=bool(flags & NBD_CMD_FLAG_FAST_ZERO),
                                      fua=fua),
                "writing to file failed")
        elif rtype == NBD_CMD_FLUSH:
            await self._generic(req, blk.flush(), "flush failed")
        elif rtype == NBD_CMD_TRIM:
            await self._generic(req, self._trim(req, fua), "discard failed")
        elif rtype == NBD_CMD_BLOCK_STATUS:
            await self._block_status(req)
        else:
            self._send_generic(req, _EINVAL, f"invalid request type ({rtype}) received")

    async def _generic(self, req: _Request, op: Any, message: str) -> None:
        try:
            await op
        except OSError as exc:
            self._send_generic(req, exc.errno or _EINVAL, message)
            return
        self._send_generic(req, 0, "")

    async def _cache(self, req: _Request) -> None:
        if req.length:
            await self.blk.read(req.offset, req.length)

    async def _trim(self, req: _Request, fua: bool) -> None:
        await self.blk.discard(req.offset, req.length)
        if fua:
            await self.blk.flush()

    async def _do_read(self, req: _Request) -> None:
        if req.flags & NBD_CMD_FLAG_FUA:
            try:
                await self.blk.flush()
            except OSError as exc:
                self._send_generic(req, exc.errno or _EINVAL, "flush failed")
                return
        if self.structured and not req.flags & NBD_CMD_FLAG_DF and req.length:
            await self._sparse_read(req)
            return
        try:
            data = await self._read(req.offset, req.length)
        except OSError as exc:
            self._send_generic(req, exc.errno or _EINVAL, "reading from file failed")
            return
        self._send_read(req, data)

    async def _read(self, offset: int, length: int) -> bytes:
        if not length:
            return b""
        data: bytes | None = self.blk.read_nowait(offset, length)
        if data is None:
            data = await self.blk.read(offset, length)
        return data

    async def _sparse_read(self, req: _Request) -> None:
        """Data and hole chunks as the block status says (QEMU's nbd_co_send_sparse_read)."""
        offset, size, progress = req.offset, req.length, 0
        while progress < size:
            try:
                status, pnum = await self.blk.block_status(offset + progress, size - progress)
            except OSError as exc:
                err = exc.errno or _EINVAL
                self._send_error_chunk(req, err,
                                       f"unable to check for holes: {os.strerror(err)}")
                return
            pnum = min(pnum, size - progress)
            if pnum <= 0:
                raise _Disconnect("block status made no progress")
            final = progress + pnum == size
            done = NBD_REPLY_FLAG_DONE if final else 0
            if status & BLOCK_ZERO:
                self._send_chunk(req, done, NBD_REPLY_TYPE_OFFSET_HOLE,
                                 struct.pack(">QI", offset + progress, pnum))
            else:
                try:
                    data = await self._read(offset + progress, pnum)
                except OSError as exc:
                    raise _Disconnect(
                        f"reading from file failed: {os.strerror(exc.errno or _EINVAL)}"
                    ) from None
                self._send_chunk(req, done, NBD_REPLY_TYPE_OFFSET_DATA,
                                 struct.pack(">Q", offset + progress), data)
            progress += pnum

    async def _block_status(self, req: _Request) -> None:
        contexts = req.contexts
        assert contexts is not None
        if not contexts.count:
            if self.contexts.count:
                message = "CMD_BLOCK_STATUS payload not valid"
            else:
                message = "CMD_BLOCK_STATUS not negotiated"
            self._send_generic(req, _EINVAL, message)
            return
        if not req.length:
            self._send_generic(req, _EINVAL, "need non-zero length")
            return
        one = bool(req.flags & NBD_CMD_FLAG_REQ_ONE)
        remaining = contexts.count
        for wanted, context_id in ((contexts.base_allocation, NBD_META_ID_BASE_ALLOCATION),
                                   (contexts.allocation_depth, NBD_META_ID_ALLOCATION_DEPTH)):
            if not wanted:
                continue
            remaining -= 1
            try:
                extents = await self._extents(req.offset, req.length, one, context_id)
            except OSError as exc:
                self._send_error_chunk(req, exc.errno or _EINVAL, "can't get block status")
                return
            self._send_extents(req, extents, context_id, remaining == 0)
        for index, wanted in enumerate(contexts.bitmaps):
            if wanted:
                remaining -= 1
                self._send_extents(req, self._dirty_extents(index, req.offset, req.length, one),
                                   NBD_META_ID_DIRTY_BITMAP + index, remaining == 0)

    async def _extents(self, offset: int, length: int, one: bool,
                       context_id: int) -> list[list[int]]:
        limit = 1 if one else NBD_MAX_BLOCK_STATUS_EXTENTS
        wide = self.extended
        extents: list[list[int]] = []
        while length:
            status, num, depth = await self.blk.block_status_depth(offset, length)
            num = min(num, length)
            if num <= 0:
                raise _Disconnect("block status made no progress")
            if context_id == NBD_META_ID_BASE_ALLOCATION:
                flags = (0 if status & BLOCK_DATA else NBD_STATE_HOLE) | (
                    NBD_STATE_ZERO if status & BLOCK_ZERO else 0)
            else:
                flags = depth
            if extents and extents[-1][1] == flags and (
                    wide or extents[-1][0] + num <= 0xFFFFFFFF):
                extents[-1][0] += num
            elif len(extents) >= limit:
                break
            else:
                extents.append([num, flags])
            offset += num
            length -= num
        return extents

    def _dirty_extents(self, index: int, offset: int, length: int,
                       one: bool) -> list[list[int]]:
        """QEMU's bitmap_to_extents(): dirty and clean runs of the export's bitmap
        ``index``, dirty ones cut at INT32_MAX without extended headers, neighbours with
        the same flags merged while they fit."""
        limit = 1 if one else NBD_MAX_BLOCK_STATUS_EXTENTS
        wide = self.extended
        bound = 2**63 - 1 if wide else 2**31 - 1
        extents: list[list[int]] = []
        end = offset + length
        pos = offset
        bitmap = self.bitmaps[index]
        for start, count, dirty in bitmap.extents(offset, length):
            pieces = [count] if not dirty else [min(bound, count - done)
                                               for done in range(0, count, bound)]
            for num in pieces:
                flags = NBD_STATE_DIRTY if dirty else 0
                if extents and extents[-1][1] == flags and (
                        wide or extents[-1][0] + num <= 0xFFFFFFFF):
                    extents[-1][0] += num
                elif len(extents) >= limit:
                    return extents
                else:
                    extents.append([num, flags])
                pos = start + count
        if pos < end:
            if extents and extents[-1][1] == 0:
                extents[-1][0] += end - pos
            elif len(extents) < limit:
                extents.append([end - pos, 0])
        return extents

    # -- replies -------------------------------------------------------------------

    def _write(self, *parts: bytes) -> None:
        if not self.closing and self.transport is not None:
            if len(parts) == 1:
                self.transport.write(parts[0])
            else:
                self.transport.writelines(parts)

    def _chunk_header(self, req: _Request, flags: int, ctype: int, length: int) -> bytes:
        if self.extended:
            return EXTENDED_CHUNK.pack(NBD_EXTENDED_REPLY_MAGIC, flags, ctype, req.cookie,
                                       req.offset, length)
        return STRUCTURED_CHUNK.pack(NBD_STRUCTURED_REPLY_MAGIC, flags, ctype, req.cookie,
                                     length)

    def _send_chunk(self, req: _Request, flags: int, ctype: int, head: bytes,
                    data: bytes = b"") -> None:
        header = self._chunk_header(req, flags, ctype, len(head) + len(data))
        if data:
            self._write(header + head, data)
        else:
            self._write(header + head)

    def _send_error_chunk(self, req: _Request, err: int, message: str) -> None:
        msg = message.encode()
        self._send_chunk(req, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR,
                         struct.pack(">IH", nbd_errno(err), len(msg)) + msg)

    def _send_generic(self, req: _Request, err: int, message: str) -> None:
        """QEMU's nbd_send_generic_reply(): no payload, or an error."""
        if self.structured and err:
            self._send_error_chunk(req, err, message)
        elif self.extended:
            self._send_chunk(req, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, b"")
        else:
            self._write(SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, nbd_errno(err), req.cookie))

    def _reply_error_now(self, req: _Request, message: str) -> None:
        self._send_generic(req, _EINVAL, message)

    def _send_read(self, req: _Request, data: bytes) -> None:
        if self.structured:
            if data:
                self._send_chunk(req, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_OFFSET_DATA,
                                 struct.pack(">Q", req.offset), data)
            else:
                self._send_chunk(req, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, b"")
        else:
            self._write(SIMPLE_REPLY.pack(NBD_SIMPLE_REPLY_MAGIC, 0, req.cookie), data)

    def _send_extents(self, req: _Request, extents: list[list[int]], context_id: int,
                      last: bool) -> None:
        flags = NBD_REPLY_FLAG_DONE if last else 0
        if self.extended:
            head = struct.pack(">II", context_id, len(extents))
            body = b"".join(_EXTENT64.pack(n, f) for n, f in extents)
            self._send_chunk(req, flags, NBD_REPLY_TYPE_BLOCK_STATUS_EXT, head + body)
        else:
            head = struct.pack(">I", context_id)
            body = b"".join(_EXTENT32.pack(n, f) for n, f in extents)
            self._send_chunk(req, flags, NBD_REPLY_TYPE_BLOCK_STATUS, head + body)
