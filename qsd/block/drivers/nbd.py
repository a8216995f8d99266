"""The ``nbd`` block driver: a node whose data is an export of an NBD server (QEMU's
block/nbd.c and nbd/client-connection.c).

The connection lives in the node's loop: requests from other loops hop there. Up to 16
requests are in flight on it; a task reads the replies (simple, structured or extended)
and completes each request from its chunks.

When the connection breaks, what requests see follows QEMU: with ``reconnect-delay``
the node is *connecting-wait*, requests wait (those in flight are sent again) while a
connector task tries to reconnect, backing off 1, 2, 4, ... 16 s between attempts; once
the delay has passed without a connection the node is *connecting-nowait*, and requests
fail with EIO at once while the connector goes on trying in the background. Without the
delay the node goes straight to *connecting-nowait*. ``open-timeout`` lets the first
connection be retried the same way for that long before ``blockdev-add`` fails.

A move to another iothread is a drained section: the connection is closed in the old
loop and a new one is made in the new loop.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import ssl
import struct
from typing import TYPE_CHECKING, Any

from qsd import sockets
from qsd.block.limits import INT_MAX, BlockLimits, min_non_zero
from qsd.block.node import (
    BLOCK_DATA,
    BLOCK_OFFSET_VALID,
    BLOCK_ZERO,
    BlockNode,
    BlockStatus,
    ChildOpener,
    Data,
)
from qsd.block.registry import register
from qsd.crypto.tlscreds import (
    TlsCreds,
    TlsCredsX509,
    certificate_matches,
    find_tls_creds,
    verify_failure_text,
)
from qsd.errors import QMPError
from qsd.nbd import client
from qsd.nbd.protocol import (
    COMPACT_REQUEST,
    EXTENDED_REQUEST,
    MAX_NBD_REQUESTS,
    NBD_CMD_BLOCK_STATUS,
    NBD_CMD_DISC,
    NBD_CMD_FLAG_FAST_ZERO,
    NBD_CMD_FLAG_FUA,
    NBD_CMD_FLAG_NO_HOLE,
    NBD_CMD_FLAG_REQ_ONE,
    NBD_CMD_FLUSH,
    NBD_CMD_READ,
    NBD_CMD_TRIM,
    NBD_CMD_WRITE,
    NBD_CMD_WRITE_ZEROES,
    NBD_EXTENDED_REPLY_MAGIC,
    NBD_EXTENDED_REQUEST_MAGIC,
    NBD_FLAG_READ_ONLY,
    NBD_FLAG_SEND_FAST_ZERO,
    NBD_FLAG_SEND_FLUSH,
    NBD_FLAG_SEND_FUA,
    NBD_FLAG_SEND_TRIM,
    NBD_FLAG_SEND_WRITE_ZEROES,
    NBD_MAX_BUFFER_SIZE,
    NBD_MAX_STRING_SIZE,
    NBD_REPLY_FLAG_DONE,
    NBD_REPLY_TYPE_BLOCK_STATUS,
    NBD_REPLY_TYPE_BLOCK_STATUS_EXT,
    NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA,
    NBD_REPLY_TYPE_OFFSET_HOLE,
    NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC,
    NBD_STATE_HOLE,
    NBD_STATE_ZERO,
    NBD_STRUCTURED_REPLY_MAGIC,
    Mode,
)
from qsd.qapi.generated import (
    BlockdevOptionsNbd,
    SocketAddress,
    SocketAddressVariantInet,
    SocketAddressVariantUnix,
)

if TYPE_CHECKING:
    from qsd.aio import AioContext

# NBDClientState, plus MOVED: the node just moved to another loop and makes a new
# connection there, which requests wait for.
CONNECTED, CONNECTING_WAIT, CONNECTING_NOWAIT, QUIT, MOVED = range(5)

_MAX_BACKOFF = 16
_U32 = struct.Struct(">I")
_SIMPLE_REST = struct.Struct(">IQ")          # error, cookie
_STRUCTURED_REST = struct.Struct(">HHQI")    # flags, type, cookie, length
_EXTENDED_REST = struct.Struct(">HHQQQ")     # flags, type, cookie, offset, length
_OFFSET = struct.Struct(">Q")
_HOLE = struct.Struct(">QI")
_EXTENT = struct.Struct(">III")              # context id, length, flags
_EXTENT_EXT = struct.Struct(">IIQQ")         # context id, count, length, flags
_ERROR = struct.Struct(">IH")


def _oserror(code: int) -> OSError:
    return OSError(code, os.strerror(code))


class _Lost(Exception):
    """The connection broke under a request: the reconnect policy decides its fate."""


class _ProtocolError(Exception):
    """The server broke the protocol: the connection is given up for good (QUIT)."""


class _Request:
    __slots__ = ("kind", "offset", "length", "future", "data", "error", "extent")

    def __init__(self, kind: int, offset: int, length: int,
                 future: asyncio.Future[None]) -> None:
        self.kind = kind
        self.offset = offset
        self.length = length
        self.future = future
        self.data: bytes | bytearray | None = None
        self.error = 0
        self.extent: tuple[int, int] | None = None     # (length, flags)


class _Connection:
    """One connection in the transmission phase, in the loop that made it."""

    def __init__(self, stream: client.Stream, info: client.ExportInfo,
                 on_lost: Any) -> None:
        self.stream = stream
        self.info = info
        self.extended = info.mode >= Mode.EXTENDED
        self.structured = info.mode >= Mode.STRUCTURED
        self.pending: dict[int, _Request] = {}
        self.cookies = list(range(MAX_NBD_REQUESTS, 0, -1))
        self.slots = asyncio.Semaphore(MAX_NBD_REQUESTS)
        self.lost: BaseException | None = None
        self._on_lost = on_lost
        self._reader = asyncio.get_running_loop().create_task(self._receive())

    async def request(self, kind: int, offset: int, length: int, flags: int = 0,
                      payload: Data | None = None) -> _Request:
        async with self.slots:
            if self.lost is not None:
                raise _Lost()
            cookie = self.cookies.pop()
            req = _Request(kind, offset, length, asyncio.get_running_loop().create_future())
            self.pending[cookie] = req
            try:
                if self.extended:
                    header = EXTENDED_REQUEST.pack(NBD_EXTENDED_REQUEST_MAGIC, flags, kind,
                                                   cookie, offset, length)
                else:
                    header = COMPACT_REQUEST.pack(NBD_REQUEST_MAGIC, flags, kind, cookie,
                                                  offset, length)
                writer = self.stream.writer
                writer.write(header)
                if payload is not None:
                    writer.write(payload)
                try:
                    await writer.drain()
                except (OSError, RuntimeError) as exc:
                    self.lose(exc)
                await req.future
                return req
            finally:
                del self.pending[cookie]
                self.cookies.append(cookie)

    def lose(self, exc: BaseException) -> None:
        """Gives the connection up: every request on it fails with ``exc``'s kind."""
        if self.lost is not None:
            return
        self.lost = exc
        failure = exc if isinstance(exc, _ProtocolError) else _Lost()
        for req in self.pending.values():
            if not req.future.done():
                req.future.set_exception(failure)
        self._reader.cancel()
        self.stream.writer.close()
        self._on_lost(self, exc)

    def disconnect(self) -> None:
        """NBD_CMD_DISC as a courtesy, then the socket goes (no requests are left)."""
        if self.lost is None:
            self.lost = ConnectionAbortedError()
            request = (EXTENDED_REQUEST.pack(NBD_EXTENDED_REQUEST_MAGIC, 0, NBD_CMD_DISC,
                                             0, 0, 0) if self.extended
                       else COMPACT_REQUEST.pack(NBD_REQUEST_MAGIC, 0, NBD_CMD_DISC,
                                                 0, 0, 0))
            try:
                self.stream.writer.write(request)
            except (OSError, RuntimeError):
                pass
            self._reader.cancel()
            self.stream.writer.close()

    # ---- replies ---------------------------------------------------------------------------

    async def _receive(self) -> None:
        read = self.stream.reader.readexactly
        try:
            while True:
                magic = _U32.unpack(await read(4))[0]
                if magic == NBD_SIMPLE_REPLY_MAGIC:
                    error, cookie = _SIMPLE_REST.unpack(await read(_SIMPLE_REST.size))
                    req = self._owner(cookie)
                    if req.kind == NBD_CMD_READ and self.structured:
                        raise _ProtocolError("simple reply when structured reply chunk "
                                             "was expected")
                    req.error = client.system_errno(error)
                    if not req.error and req.kind == NBD_CMD_READ:
                        req.data = await read(req.length)
                    req.future.set_result(None)
                    continue
                if magic == NBD_STRUCTURED_REPLY_MAGIC and self.structured:
                    flags, kind, cookie, length = _STRUCTURED_REST.unpack(
                        await read(_STRUCTURED_REST.size))
                elif magic == NBD_EXTENDED_REPLY_MAGIC and self.extended:
                    flags, kind, cookie, _, length = _EXTENDED_REST.unpack(
                        await read(_EXTENDED_REST.size))
                else:
                    raise _ProtocolError("unexpected reply magic")
                if length > NBD_MAX_BUFFER_SIZE + 8:
                    raise _ProtocolError("payload is too long")
                req = self._owner(cookie)
                await self._chunk(req, kind, length)
                if flags & NBD_REPLY_FLAG_DONE:
                    req.future.set_result(None)
                elif kind == NBD_REPLY_TYPE_NONE:
                    raise _ProtocolError("NBD_REPLY_TYPE_NONE chunk without "
                                         "NBD_REPLY_FLAG_DONE flag set")
        except asyncio.CancelledError:
            raise
        except (_ProtocolError, OSError, asyncio.IncompleteReadError) as exc:
            self.lose(exc)

    def _owner(self, cookie: int) -> _Request:
        req = self.pending.get(cookie)
        if req is None or req.future.done():
            raise _ProtocolError("unexpected cookie value")
        return req

    async def _chunk(self, req: _Request, kind: int, length: int) -> None:
        """One structured chunk of ``req`` (QEMU's nbd_co_do_receive_one_chunk and the
        parsers of READ and BLOCK_STATUS replies)."""
        read = self.stream.reader.readexactly
        if kind == NBD_REPLY_TYPE_NONE:
            if length:
                raise _ProtocolError("NBD_REPLY_TYPE_NONE chunk with nonzero length")
            return
        if kind == NBD_REPLY_TYPE_OFFSET_DATA and req.kind == NBD_CMD_READ:
            if length <= 8:
                raise _ProtocolError("invalid payload for NBD_REPLY_TYPE_OFFSET_DATA")
            offset = _OFFSET.unpack(await read(8))[0]
            size = length - 8
            start = offset - req.offset
            if offset < req.offset or size > req.length or start > req.length - size:
                raise _ProtocolError("server sent chunk exceeding requested region")
            data = await read(size)
            if req.data is None and size == req.length:
                req.data = data
            else:
                if not isinstance(req.data, bytearray):
                    req.data = bytearray(req.length) if req.data is None else \
                        bytearray(req.data)
                req.data[start:start + size] = data
            return
        payload = await read(length)
        if kind & (1 << 15):
            if length < _ERROR.size:
                raise _ProtocolError("invalid payload for structured error")
            error, size = _ERROR.unpack_from(payload)
            if not error:
                raise _ProtocolError("server sent structured error chunk with error = 0")
            if size > length - _ERROR.size:
                raise _ProtocolError("server sent structured error chunk with incorrect "
                                     "message size")
            req.error = req.error or client.system_errno(error)
        elif kind == NBD_REPLY_TYPE_OFFSET_HOLE and req.kind == NBD_CMD_READ:
            if length != _HOLE.size:
                raise _ProtocolError("invalid payload for NBD_REPLY_TYPE_OFFSET_HOLE")
            offset, size = _HOLE.unpack(payload)
            if not size or offset < req.offset or size > req.length \
                    or offset - req.offset > req.length - size:
                raise _ProtocolError("server sent chunk exceeding requested region")
            if req.data is not None and not isinstance(req.data, bytearray):
                req.data = bytearray(req.data)
            if req.data is None:
                req.data = bytearray(req.length)
            else:
                start = offset - req.offset
                req.data[start:start + size] = bytes(size)
        elif kind in (NBD_REPLY_TYPE_BLOCK_STATUS, NBD_REPLY_TYPE_BLOCK_STATUS_EXT) \
                and req.kind == NBD_CMD_BLOCK_STATUS:
            if req.extent is not None:
                raise _ProtocolError("Several BLOCK_STATUS chunks in reply")
            req.extent = self._extent(req, payload, kind == NBD_REPLY_TYPE_BLOCK_STATUS_EXT)
        else:
            raise _ProtocolError(f"Unexpected reply type: {kind}")

    def _extent(self, req: _Request, payload: bytes, wide: bool) -> tuple[int, int]:
        """QEMU's nbd_parse_blockstatus_payload(): the first extent, tolerating what
        qemu-nbd 3.1 and other imperfect servers send."""
        layout = _EXTENT_EXT if wide else _EXTENT
        if len(payload) < layout.size:
            raise _ProtocolError("invalid payload for NBD_REPLY_TYPE_BLOCK_STATUS")
        if wide:
            context_id, _, length, flags = _EXTENT_EXT.unpack_from(payload)
        else:
            context_id, length, flags = _EXTENT.unpack_from(payload)
        if context_id != self.info.context_id:
            raise _ProtocolError(f"unexpected context id {context_id}")
        if not length:
            raise _ProtocolError("server sent status chunk with zero length")
        low = self.info.min_block
        if low and length % low:
            if length > low:
                length -= length % low
            else:
                length, flags = low, 0
        return min(length, req.length), flags


class _Connector:
    """QEMU's NBDClientConnection: one attempt after another in a task of the node's
    loop (with back-off once retrying is enabled) until one succeeds."""

    def __init__(self, node: NbdNode, retry: bool) -> None:
        self._node = node
        self.retry = retry
        self.error: QMPError | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self._task

    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        backoff = 1
        while True:
            try:
                conn = await self._node.connect_once()
            except (QMPError, OSError) as exc:
                self.error = exc if isinstance(exc, QMPError) else QMPError(str(exc))
                if not self.retry:
                    return
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
                continue
            self.error = None
            self._node.adopt(conn)
            return

    async def wait(self, timeout: float | None) -> bool:
        """Waits for the attempts to end; False if ``timeout`` came first."""
        done, _ = await asyncio.wait({self.start()}, timeout=timeout)
        return bool(done)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _exact_filename(server: SocketAddress, export: str | None) -> str:
    """QEMU's nbd_refresh_filename(): a URI where the address has one."""
    host = port = path = None
    if isinstance(server, SocketAddressVariantInet):
        if server.ipv4 is None and server.ipv6 is None and server.to is None:
            host, port = server.host, server.port
    elif isinstance(server, SocketAddressVariantUnix):
        path = server.path
    if path is not None:
        name = f"nbd+unix:///{export}?socket={path}" if export is not None \
            else f"nbd+unix://?socket={path}"
    elif host is not None:
        name = f"nbd://{host}:{port}/{export}" if export is not None \
            else f"nbd://{host}:{port}"
    else:
        return ""
    return name if len(name.encode()) < 4096 else ""


@register("nbd", options=BlockdevOptionsNbd)
class NbdNode(BlockNode):
    is_protocol = True
    strong_options = ("export", "tls-creds", "tls-hostname")

    _state = QUIT
    _conn: _Connection | None = None
    _connector: _Connector | None = None
    _home: AioContext | None = None
    _delay_deadline: float | None = None
    info = client.ExportInfo(size=0)

    async def open(self, options: BlockdevOptionsNbd, children: ChildOpener) -> None:
        """QEMU's nbd_process_options() and nbd_open(): the options in QEMU's order,
        then the first connection (retried for ``open-timeout`` seconds if given)."""
        self.server: SocketAddress = options.server
        self.export = options.export
        if self.export is not None and len(self.export.encode()) > NBD_MAX_STRING_SIZE:
            raise QMPError("export name too long to send to server")
        self.creds: TlsCreds | None = None
        self.tls_hostname: str | None = None
        if options.tls_creds is not None:
            self.creds = find_tls_creds(children.objects, options.tls_creds, server=False)
            self.tls_hostname = options.tls_hostname
            if self.tls_hostname is None and isinstance(self.server, SocketAddressVariantInet):
                self.tls_hostname = self.server.host
        self.x_dirty_bitmap = options.x_dirty_bitmap
        if self.x_dirty_bitmap is not None and \
                len(self.x_dirty_bitmap.encode()) > NBD_MAX_STRING_SIZE:
            raise QMPError("x-dirty-bitmap query too long to send to server")
        self.alloc_depth = self.x_dirty_bitmap == "qemu:allocation-depth"
        self.reconnect_delay = options.reconnect_delay or 0
        open_timeout = options.open_timeout or 0
        self._home = self.ctx
        self._state = CONNECTING_WAIT
        self._connector = _Connector(self, retry=bool(open_timeout))
        if not await self._connector.wait(open_timeout or None):
            self._connector.cancel()
            raise self._connector.error or QMPError("Connection attempt cancelled by timeout")
        if self._state != CONNECTED:
            assert self._connector.error is not None
            raise self._connector.error
        self._connector.retry = True

    # ---- connections -----------------------------------------------------------------------

    async def connect_once(self) -> _Connection:
        """One attempt: connect, negotiate, check what the server offers."""
        sock = await sockets.connect(self.server)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20)
        stream = client.Stream(reader, writer)
        try:
            stream, info = await client.negotiate(
                stream, self.export or "", self.x_dirty_bitmap,
                self._start_tls if self.creds is not None else None)
            self._check_info(info)
        except BaseException:
            stream.close()
            raise
        return _Connection(stream, info, self._lost)

    async def _start_tls(self, stream: client.Stream) -> client.Stream:
        creds = self.creds
        assert creds is not None
        context = creds.client_context()
        try:
            await stream.writer.start_tls(context, server_hostname=self.tls_hostname)
        except ssl.SSLCertVerificationError as exc:
            raise QMPError(verify_failure_text(exc.verify_code)) from None
        except (ssl.SSLError, OSError) as exc:
            raise QMPError(f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}"
                           ) from None
        if isinstance(creds, TlsCredsX509) and creds.verify_peer:
            # QEMU's qcrypto_tls_session_check_certificate(), after the chain.
            if self.tls_hostname is None:
                raise QMPError("No hostname for certificate validation")
            tls = stream.writer.get_extra_info("ssl_object")
            der = tls.getpeercert(binary_form=True) if tls is not None else None
            if der is None or not certificate_matches(der, self.tls_hostname):
                raise QMPError(f"Certificate does not match the hostname {self.tls_hostname}")
        return stream

    def _check_info(self, info: client.ExportInfo) -> None:
        """QEMU's nbd_handle_updated_info(), whose errors reach blockdev-add only as an
        errno (QEMU passes no error object there)."""
        if self.x_dirty_bitmap is not None and not info.base_allocation:
            raise QMPError("Could not open image: Invalid argument")
        if info.flags & NBD_FLAG_READ_ONLY and not self.read_only:
            if not self.opts.auto_read_only:
                raise QMPError("Could not open image: Permission denied")
            self.read_only = True

    def adopt(self, conn: _Connection) -> None:
        """A new connection is ready: requests go on with it."""
        self._conn = conn
        self.info = conn.info
        self._state = CONNECTED
        self._delay_deadline = None

    def _lost(self, conn: _Connection, exc: BaseException) -> None:
        """QEMU's nbd_channel_error(): a broken connection means reconnecting, a
        protocol error means giving up."""
        if conn is not self._conn:
            return
        self._conn = None
        if isinstance(exc, _ProtocolError):
            self._state = QUIT
        elif self._state == CONNECTED:
            self._state = CONNECTING_WAIT if self.reconnect_delay else CONNECTING_NOWAIT

    async def _connection(self) -> _Connection:
        """The connection to send on, waiting for a reconnect while that is the policy;
        EIO otherwise (QEMU's nbd_co_send_request() and nbd_reconnect_attempt())."""
        loop = asyncio.get_running_loop()
        while True:
            state, connector = self._state, self._connector
            if state == CONNECTED and self._conn is not None:
                return self._conn
            if state == QUIT or connector is None:
                raise _oserror(errno.EIO)
            if state == MOVED:
                await connector.wait(None)
                if self._state == MOVED:
                    connector.retry = True
                    self._state = (CONNECTING_WAIT if self.reconnect_delay
                                   else CONNECTING_NOWAIT)
                continue
            if state == CONNECTING_NOWAIT:
                connector.start()
                raise _oserror(errno.EIO)
            if self._delay_deadline is None:
                self._delay_deadline = loop.time() + self.reconnect_delay
            if not await connector.wait(max(0.0, self._delay_deadline - loop.time())):
                if self._state == CONNECTING_WAIT:
                    self._state = CONNECTING_NOWAIT
                    self._delay_deadline = None

    async def _request(self, kind: int, offset: int, length: int, flags: int = 0,
                       payload: Data | None = None) -> _Request:
        """Sends one request and waits for its reply, again on a new connection if the
        old one broke while the node waits for reconnects."""
        while True:
            conn = await self._connection()
            try:
                req = await conn.request(kind, offset, length, flags, payload)
            except _Lost:
                if self._state in (CONNECTING_WAIT, MOVED, CONNECTED):
                    continue
                raise _oserror(errno.EIO) from None
            except _ProtocolError:
                raise _oserror(errno.EINVAL) from None
            if req.error:
                raise _oserror(req.error)
            return req

    async def _here(self, coro: Any) -> Any:
        """Runs ``coro`` in the node's loop, where the connection is."""
        if self.ctx.in_this_thread():
            return await coro
        return await self.ctx.call(coro)

    def attach_aio_context(self, ctx: AioContext) -> None:
        """Moved (drained): the old loop lets its connection go, the new one connects."""
        old, conn, connector = self._home, self._conn, self._connector
        self._home = ctx
        if self._state == QUIT or connector is None or old is None:
            return
        self._conn = None
        was_connected = self._state == CONNECTED
        new = _Connector(self, retry=not was_connected)
        self._connector = new
        self._state = MOVED if was_connected else self._state
        old.call_soon(connector.cancel)
        if conn is not None:
            old.call_soon(conn.disconnect)
        if was_connected:
            ctx.call_soon(new.start)

    def close(self) -> None:
        state, conn, connector, home = self._state, self._conn, self._connector, self._home
        self._state, self._conn, self._connector = QUIT, None, None
        if state == QUIT and conn is None and connector is None or home is None:
            return
        def teardown() -> None:
            if connector is not None:
                connector.cancel()
            if conn is not None:
                conn.disconnect()
        if home.in_this_thread():
            teardown()
        else:
            home.call_soon(teardown)

    # ---- what the node is --------------------------------------------------------------------

    def get_length(self) -> int:
        return self.info.size

    def has_info(self) -> bool:
        return False

    def allocated_size(self) -> int:
        return -errno.ENOTSUP

    def exact_filename(self) -> str:
        return _exact_filename(self.server, self.export)

    def full_open_options(self) -> dict[str, object]:
        """The strong options, with ``server`` flattened as QEMU's option dictionaries
        hold it (``server.type``, ``server.path``, ...)."""
        opts = super().full_open_options()
        server = self.explicit.get("server")
        if isinstance(server, dict):
            for key, value in server.items():
                opts[f"server.{key}"] = value
        return opts

    def driver_limits(self, bl: BlockLimits) -> None:
        """QEMU's nbd_refresh_limits()."""
        info = self.info
        low = info.min_block or (1 if info.size % 512 or info.base_allocation else 512)
        high = min_non_zero(NBD_MAX_BUFFER_SIZE, info.max_block)
        bl.request_alignment = low
        bl.max_pdiscard = INT_MAX - INT_MAX % low
        bl.max_pwrite_zeroes = high
        bl.max_transfer = high
        if info.mode >= Mode.EXTENDED:
            bl.max_pdiscard = bl.max_pwrite_zeroes = 0
        if info.opt_block > bl.opt_transfer:
            bl.opt_transfer = info.opt_block

    # ---- requests ----------------------------------------------------------------------------

    async def do_read(self, offset: int, length: int) -> bytes:
        return await self._here(self._read(offset, length))   # type: ignore[no-any-return]

    async def _read(self, offset: int, length: int) -> bytes:
        """Past the server's size (the block layer rounds it up to sectors) read zeroes."""
        size = self.info.size
        if not length or offset >= size:
            return bytes(length)
        wanted = min(length, size - offset)
        req = await self._request(NBD_CMD_READ, offset, wanted)
        data = req.data if req.data is not None else bytes(wanted)
        if wanted < length:
            return bytes(data) + bytes(length - wanted)
        return data if isinstance(data, bytes) else bytes(data)

    async def do_write(self, offset: int, data: Data, fua: bool) -> None:
        await self._here(self._write(offset, data, fua))

    async def _write(self, offset: int, data: Data, fua: bool) -> None:
        if not len(data):
            return
        native_fua = fua and bool(self.info.flags & NBD_FLAG_SEND_FUA)
        await self._request(NBD_CMD_WRITE, offset, len(data),
                            NBD_CMD_FLAG_FUA if native_fua else 0, data)
        if fua and not native_fua:
            await self._flush()

    async def do_write_zeroes(self, offset: int, length: int, may_unmap: bool,
                              no_fallback: bool, fua: bool) -> None:
        await self._here(self._write_zeroes(offset, length, may_unmap, no_fallback, fua))

    async def _write_zeroes(self, offset: int, length: int, may_unmap: bool,
                            no_fallback: bool, fua: bool) -> None:
        flags = self.info.flags
        if not flags & NBD_FLAG_SEND_WRITE_ZEROES or \
                (no_fallback and not flags & NBD_FLAG_SEND_FAST_ZERO):
            raise _oserror(errno.ENOTSUP)
        cmd_flags = (0 if may_unmap else NBD_CMD_FLAG_NO_HOLE) | \
                    (NBD_CMD_FLAG_FAST_ZERO if no_fallback else 0)
        native_fua = fua and bool(flags & NBD_FLAG_SEND_FUA)
        if native_fua:
            cmd_flags |= NBD_CMD_FLAG_FUA
        if length:
            await self._request(NBD_CMD_WRITE_ZEROES, offset, length, cmd_flags)
        if fua and not native_fua:
            await self._flush()

    async def do_discard(self, offset: int, length: int) -> None:
        if self.info.flags & NBD_FLAG_SEND_TRIM and length:
            await self._here(self._request(NBD_CMD_TRIM, offset, length))

    async def do_flush(self) -> None:
        await self._here(self._flush())

    async def _flush(self) -> None:
        if self.info.flags & NBD_FLAG_SEND_FLUSH:
            await self._request(NBD_CMD_FLUSH, 0, 0)

    async def do_truncate(self, length: int, exact: bool, prealloc: str) -> None:
        """NBD cannot resize; asking for what is there already is no error."""
        size = self.info.size
        if length != size and exact:
            raise OSError(errno.ENOTSUP, "Cannot resize NBD nodes")
        if length > size:
            raise OSError(errno.EINVAL, "Cannot grow NBD nodes")

    async def do_block_status(self, want_zero: bool, offset: int, length: int) -> BlockStatus:
        return await self._here(  # type: ignore[no-any-return]
            self._block_status(offset, length))

    async def _block_status(self, offset: int, length: int) -> BlockStatus:
        """QEMU's nbd_client_co_block_status(): one extent of base:allocation (or of
        the x-dirty-bitmap context), everything data where the server has none."""
        info = self.info
        if not info.base_allocation:
            return BlockStatus(BLOCK_DATA | BLOCK_OFFSET_VALID, length, offset, self)
        if offset >= info.size:
            return BlockStatus(BLOCK_ZERO, length)
        wanted = min(length, info.size - offset)
        if info.mode < Mode.EXTENDED:
            wanted = min(wanted, INT_MAX - INT_MAX % self.bl.request_alignment)
        req = await self._request(NBD_CMD_BLOCK_STATUS, offset, wanted,
                                  NBD_CMD_FLAG_REQ_ONE)
        if req.extent is None:
            raise _oserror(errno.EIO)
        extent_length, flags = req.extent
        if self.alloc_depth and flags > 2:
            flags = 2
        status = (0 if flags & NBD_STATE_HOLE else BLOCK_DATA) | \
                 (BLOCK_ZERO if flags & NBD_STATE_ZERO else 0) | BLOCK_OFFSET_VALID
        return BlockStatus(status, min(extent_length, length), offset, self)
