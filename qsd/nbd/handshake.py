"""Fixed-newstyle option negotiation, as QEMU's ``nbd_negotiate()`` does it.

It runs on the main loop over a raw non-blocking socket and reads exactly what each
option announces, so that no byte of the transmission phase is consumed here and the
socket can be handed to the export's loop afterwards.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Mapping
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from qsd.crypto.engine import TlsFailure
from qsd.nbd.protocol import (
    DIRTY_BITMAP_CONTEXT,
    NBD_FLAG_BLOCK_STAT_PAYLOAD,
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_FLAG_SEND_DF,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_DESCRIPTION,
    NBD_INFO_EXPORT,
    NBD_INFO_NAME,
    NBD_INIT_MAGIC,
    NBD_MAX_BUFFER_SIZE,
    NBD_MAX_STRING_SIZE,
    NBD_META_ID_ALLOCATION_DEPTH,
    NBD_META_ID_BASE_ALLOCATION,
    NBD_META_ID_DIRTY_BITMAP,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_EXTENDED_HEADERS,
    NBD_OPT_GO,
    NBD_OPT_INFO,
    NBD_OPT_LIST,
    NBD_OPT_LIST_META_CONTEXT,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_OPTS_MAGIC,
    NBD_REP_ACK,
    NBD_REP_ERR_EXT_HEADER_REQD,
    NBD_REP_ERR_INVALID,
    NBD_REP_ERR_POLICY,
    NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REP_MAGIC,
    NBD_REP_META_CONTEXT,
    NBD_REP_SERVER,
    OPTION_REPLY,
    MetaContexts,
    Mode,
    opt_name,
)

if TYPE_CHECKING:
    from qsd.crypto.tlscreds import TlsCreds
    from qsd.nbd.tls import TlsChannel


class AdvertisedExport(Protocol):
    """What the option phase tells clients about an export (``server.ServedExport``)."""

    @property
    def name(self) -> str: ...

    @property
    def description(self) -> str | None: ...

    @property
    def size(self) -> int: ...

    @property
    def nbdflags(self) -> int: ...

    @property
    def allocation_depth(self) -> bool: ...

    @property
    def bitmap_names(self) -> list[str]:
        """The names of the exported dirty bitmaps (``qemu:dirty-bitmap:NAME``)."""
        ...


E = TypeVar("E", bound=AdvertisedExport)


class NegotiationError(Exception):
    """The client broke the protocol badly enough that QEMU drops the connection."""


class _Handled(Exception):
    """The current option was answered with an error reply; go on with the next one."""


class TlsPolicy:
    """The server's tls-creds and tls-authz, and where their objects are looked up."""

    def __init__(self, creds: TlsCreds, authz_id: str | None,
                 objects: Mapping[str, object]) -> None:
        self.creds = creds
        self.authz_id = authz_id
        self.objects = objects


class Negotiated(Generic[E]):
    """What the transmission phase needs from a successful handshake."""

    def __init__(self, export: E, mode: int, contexts: MetaContexts,
                 check_align: int, channel: TlsChannel | None = None) -> None:
        self.export = export
        self.mode = mode
        self.contexts = contexts
        self.check_align = check_align
        self.channel = channel


def _sanitize(name: str) -> str:
    return name if len(name) < 80 else name[:80] + "..."


class Negotiation(Generic[E]):
    """One client's option phase; ``run()`` returns None for NBD_OPT_ABORT or a probe."""

    def __init__(self, sock: socket.socket, exports: Mapping[str, E],
                 tls: TlsPolicy | None = None) -> None:
        self.sock = sock
        self.exports = exports
        self.tls = tls
        self.channel: TlsChannel | None = None
        self.loop = asyncio.get_running_loop()
        self.mode = Mode.EXPORT_NAME
        self.contexts = MetaContexts()
        self.opt = 0
        self.optlen = 0

    # -- raw I/O -------------------------------------------------------------------

    async def _read(self, size: int, what: str | None = None) -> bytes:
        """QEMU's nbd_read(): its errors say ``what`` was being read, when it is named."""
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        try:
            while got < size:
                if self.channel is not None:
                    n = await self.channel.read_into(view[got:])
                else:
                    n = await self.loop.sock_recv_into(self.sock, view[got:])
                if n == 0:
                    break
                got += n
        except OSError as exc:
            message = f"Unable to read from socket: {os.strerror(exc.errno or 0)}"
        except TlsFailure as exc:
            message = str(exc)
        else:
            if got == size:
                return bytes(buf)
            message = "Unexpected end-of-file before all data were read"
        raise NegotiationError(message if what is None else f"Failed to read {what}: {message}")

    async def _drop(self, size: int) -> None:
        while size > 0:
            chunk = min(size, 65536)
            await self._read(chunk)
            size -= chunk

    async def _write(self, data: bytes) -> None:
        try:
            if self.channel is not None:
                await self.channel.write(data)
            else:
                await self.loop.sock_sendall(self.sock, data)
        except OSError as exc:
            raise NegotiationError(
                f"Unable to write to socket: {os.strerror(exc.errno or 0)}") from None

    async def _send_rep(self, rep_type: int, payload: bytes = b"") -> None:
        await self._write(OPTION_REPLY.pack(NBD_REP_MAGIC, self.opt, rep_type, len(payload))
                          + payload)

    async def _send_err(self, rep_type: int, message: str) -> None:
        await self._send_rep(rep_type, message.encode())

    async def _opt_drop(self, rep_type: int, message: str) -> None:
        """Skips the rest of the option and answers it with an error (nbd_opt_drop)."""
        await self._drop(self.optlen)
        self.optlen = 0
        await self._send_err(rep_type, message)

    async def _opt_invalid(self, message: str) -> _Handled:
        await self._opt_drop(NBD_REP_ERR_INVALID, message)
        return _Handled()

    async def _opt_read(self, size: int, check_nul: bool = False) -> bytes:
        if size > self.optlen:
            raise await self._opt_invalid(f"Inconsistent lengths in option {opt_name(self.opt)}")
        self.optlen -= size
        data = await self._read(size)
        if check_nul and b"\0" in data:
            raise await self._opt_invalid(
                f"Unexpected embedded NUL in option {opt_name(self.opt)}")
        return data

    async def _opt_read_name(self) -> str:
        (length,) = struct.unpack(">I", await self._opt_read(4))
        if length > NBD_MAX_STRING_SIZE:
            raise await self._opt_invalid(f"Invalid name length: {length}")
        return (await self._opt_read(length, check_nul=True)).decode("utf-8", "replace")

    async def _reject_length(self) -> None:
        await self._opt_invalid(f"option '{opt_name(self.opt)}' has unexpected length")

    # -- the option loop -----------------------------------------------------------

    async def run(self) -> Negotiated[E] | None:
        greeting = struct.pack(">QQH", NBD_INIT_MAGIC, NBD_OPTS_MAGIC,
                               NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES)
        try:
            await self._write(greeting)
            raw_flags = await self._read(4)
        except NegotiationError:
            return None  # a port probe: QEMU stays silent about it
        (flags,) = struct.unpack(">I", raw_flags)
        fixed = bool(flags & NBD_FLAG_C_FIXED_NEWSTYLE)
        no_zeroes = bool(flags & NBD_FLAG_C_NO_ZEROES)
        if fixed:
            self.mode = Mode.SIMPLE
        flags &= ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES)
        if flags:
            raise NegotiationError(f"Unknown client flags 0x{flags:x} received")

        while True:
            (magic,) = struct.unpack(">Q", await self._read(8, "opts magic"))
            if magic != NBD_OPTS_MAGIC:
                raise NegotiationError("Bad magic received")
            (option,) = struct.unpack(">I", await self._read(4, "option"))
            self.opt = option
            (length,) = struct.unpack(">I", await self._read(4, "option length"))
            self.optlen = length
            if length > NBD_MAX_BUFFER_SIZE:
                raise NegotiationError(
                    f"len ({length}) is larger than max len ({NBD_MAX_BUFFER_SIZE})")
            if self.tls is not None and self.channel is None:
                if await self._before_tls(option, length, fixed):
                    return None
                continue
            if option == NBD_OPT_EXPORT_NAME:
                return await self._export_name(no_zeroes)
            if not fixed:
                raise NegotiationError(f"Unsupported option {option} ({opt_name(option)})")
            try:
                if option == NBD_OPT_ABORT:
                    try:
                        await self._send_rep(NBD_REP_ACK)
                    except NegotiationError:
                        pass  # the client need not wait for our reply
                    return None
                result = await self._option(option, length)
            except _Handled:
                continue
            if result is not None:
                return result

    async def _before_tls(self, option: int, length: int, fixed: bool) -> bool:
        """A TLS-only server's answer to options sent in clear; True ends negotiation."""
        assert self.tls is not None
        if not fixed:
            raise NegotiationError(f"Unsupported option 0x{option:x}")
        if option == NBD_OPT_STARTTLS:
            if length:
                await self._reject_length()
                raise NegotiationError(f"option '{opt_name(option)}' has unexpected length")
            await self._send_rep(NBD_REP_ACK)
            from qsd.nbd.tls import TlsChannel  # TLS code loads with its first client

            channel = TlsChannel(self.sock, self.tls.creds, self.tls.authz_id, self.tls.objects)
            try:
                await channel.handshake()
            except TlsFailure as exc:
                raise NegotiationError(str(exc)) from None
            self.channel = channel
            return False
        if option == NBD_OPT_EXPORT_NAME:
            raise NegotiationError(f"Option 0x{option:x} not permitted before TLS")
        message = f"Option 0x{option:x} not permitted before TLS"
        try:
            await self._opt_drop(NBD_REP_ERR_TLS_REQD, message)
        except NegotiationError:
            if option != NBD_OPT_ABORT:
                raise
        return option == NBD_OPT_ABORT

    async def _option(self, option: int, length: int) -> Negotiated[E] | None:
        if option == NBD_OPT_LIST:
            if length:
                await self._reject_length()
            else:
                for exp in self.exports.values():
                    name, desc = exp.name.encode(), (exp.description or "").encode()
                    await self._send_rep(NBD_REP_SERVER,
                                         struct.pack(">I", len(name)) + name + desc)
                await self._send_rep(NBD_REP_ACK)
        elif option in (NBD_OPT_INFO, NBD_OPT_GO):
            return await self._info()
        elif option == NBD_OPT_STARTTLS:
            if length:
                await self._reject_length()
            elif self.tls is not None:
                await self._send_err(NBD_REP_ERR_INVALID, "TLS already enabled")
            else:
                await self._send_err(NBD_REP_ERR_POLICY, "TLS not configured")
        elif option == NBD_OPT_STRUCTURED_REPLY:
            if length:
                await self._reject_length()
            elif self.mode >= Mode.EXTENDED:
                await self._send_err(NBD_REP_ERR_EXT_HEADER_REQD,
                                     "extended headers already negotiated")
            elif self.mode >= Mode.STRUCTURED:
                await self._send_err(NBD_REP_ERR_INVALID, "structured reply already negotiated")
            else:
                await self._send_rep(NBD_REP_ACK)
                self.mode = Mode.STRUCTURED
        elif option in (NBD_OPT_LIST_META_CONTEXT, NBD_OPT_SET_META_CONTEXT):
            await self._meta_queries()
        elif option == NBD_OPT_EXTENDED_HEADERS:
            if length:
                await self._reject_length()
            elif self.mode >= Mode.EXTENDED:
                await self._send_err(NBD_REP_ERR_INVALID, "extended headers already negotiated")
            else:
                await self._send_rep(NBD_REP_ACK)
                self.mode = Mode.EXTENDED
        else:
            await self._opt_drop(NBD_REP_ERR_UNSUP,
                                 f"Unsupported option {option} ({opt_name(option)})")
        return None

    def _check_meta_export(self, exp: E) -> None:
        if self.contexts.export is not exp:
            self.contexts.count = 0

    def _flags(self, exp: E, payload_ok: bool) -> int:
        flags = exp.nbdflags
        if self.mode >= Mode.STRUCTURED:
            flags |= NBD_FLAG_SEND_DF
        if self.mode >= Mode.EXTENDED and payload_ok:
            flags |= NBD_FLAG_BLOCK_STAT_PAYLOAD
        return flags

    async def _export_name(self, no_zeroes: bool) -> Negotiated[E]:
        if self.mode >= Mode.EXTENDED:
            raise NegotiationError("Extended headers already negotiated")
        if self.optlen > NBD_MAX_STRING_SIZE:
            raise NegotiationError("Bad length received")
        raw_name = await self._read(self.optlen, "export name")
        name = raw_name.split(b"\0", 1)[0].decode("utf-8", "replace")
        self.optlen = 0
        exp = self.exports.get(name)
        if exp is None:
            raise NegotiationError("export not found")
        self._check_meta_export(exp)
        reply = struct.pack(">QH", exp.size, self._flags(exp, bool(self.contexts.count)))
        if not no_zeroes:
            reply += bytes(124)
        await self._write(reply)
        return Negotiated(exp, self.mode, self.contexts, 0, self.channel)

    async def _send_info(self, info: int, payload: bytes) -> None:
        await self._send_rep(NBD_REP_INFO, struct.pack(">H", info) + payload)

    async def _info(self) -> Negotiated[E] | None:
        raw_name = await self._opt_read_name()
        (requests,) = struct.unpack(">H", await self._opt_read(2))
        send_name = block_size = False
        for _ in range(requests):
            (request,) = struct.unpack(">H", await self._opt_read(2))
            if request == NBD_INFO_NAME:
                send_name = True
            elif request == NBD_INFO_BLOCK_SIZE:
                block_size = True
        if self.optlen:
            await self._reject_length()
            return None
        exp = self.exports.get(raw_name)
        if exp is None:
            await self._send_err(NBD_REP_ERR_UNKNOWN, f"export '{_sanitize(raw_name)}' not present")
            return None
        if self.opt == NBD_OPT_GO:
            self._check_meta_export(exp)
        if send_name:
            await self._send_info(NBD_INFO_NAME, raw_name.encode())
        if exp.description is not None:
            await self._send_info(NBD_INFO_DESCRIPTION, exp.description.encode())
        # Alignment 1 (what every qsd driver allows) means the minimum is 1 either way.
        check_align = 1 if (self.opt == NBD_OPT_INFO or block_size) else 0
        sizes = struct.pack(">III", 1, 4096, NBD_MAX_BUFFER_SIZE)
        await self._send_info(NBD_INFO_BLOCK_SIZE, sizes)
        payload_ok = bool(self.contexts.count) or self.opt == NBD_OPT_INFO
        await self._send_info(NBD_INFO_EXPORT,
                              struct.pack(">QH", exp.size, self._flags(exp, payload_ok)))
        await self._send_rep(NBD_REP_ACK)
        if self.opt == NBD_OPT_GO:
            return Negotiated(exp, self.mode, self.contexts, check_align, self.channel)
        return None

    async def _meta_queries(self) -> None:
        listing = self.opt == NBD_OPT_LIST_META_CONTEXT
        if not listing and self.mode < Mode.STRUCTURED:
            raise await self._opt_invalid(
                f"request option '{opt_name(self.opt)}' when structured reply is not negotiated")
        meta = MetaContexts()
        if not listing:
            self.contexts = meta  # SET replaces the selection even if it fails later
        export_name = await self._opt_read_name()
        exp = self.exports.get(export_name)
        if exp is None:
            await self._opt_drop(NBD_REP_ERR_UNKNOWN,
                                 f"export '{_sanitize(export_name)}' not present")
            return
        meta.export = exp
        meta.bitmaps = [False] * len(exp.bitmap_names)
        (queries,) = struct.unpack(">I", await self._opt_read(4))
        if listing and queries == 0:
            meta.base_allocation = True
            meta.allocation_depth = exp.allocation_depth
            meta.bitmaps = [True] * len(exp.bitmap_names)
        else:
            for _ in range(queries):
                await self._meta_query(meta, exp, listing)
        count = 0
        if meta.base_allocation:
            await self._send_context("base:allocation", NBD_META_ID_BASE_ALLOCATION, listing)
            count += 1
        if meta.allocation_depth:
            await self._send_context("qemu:allocation-depth", NBD_META_ID_ALLOCATION_DEPTH,
                                     listing)
            count += 1
        for index, name in enumerate(exp.bitmap_names):
            if meta.bitmaps[index]:
                await self._send_context(DIRTY_BITMAP_CONTEXT + name,
                                         NBD_META_ID_DIRTY_BITMAP + index, listing)
                count += 1
        await self._send_rep(NBD_REP_ACK)
        meta.count = count

    async def _send_context(self, name: str, context_id: int, listing: bool) -> None:
        await self._send_rep(NBD_REP_META_CONTEXT,
                             struct.pack(">I", 0 if listing else context_id) + name.encode())

    async def _meta_query(self, meta: MetaContexts, exp: E, listing: bool) -> None:
        (length,) = struct.unpack(">I", await self._opt_read(4))
        if length > NBD_MAX_STRING_SIZE:
            if length > self.optlen:
                raise await self._opt_invalid(
                    f"Inconsistent lengths in option {opt_name(self.opt)}")
            self.optlen -= length
            await self._drop(length)
            return
        query = (await self._opt_read(length, check_nul=True)).decode("utf-8", "replace")
        if query.startswith("base:"):
            rest = query[5:]
            if (not rest and listing) or rest == "allocation":
                meta.base_allocation = True
        elif query.startswith("qemu:"):
            rest = query[5:]
            if not rest and listing:
                meta.allocation_depth = exp.allocation_depth
                meta.bitmaps = [True] * len(exp.bitmap_names)
            elif rest == "allocation-depth":
                meta.allocation_depth = exp.allocation_depth
            elif rest.startswith("dirty-bitmap:"):
                name = rest[len("dirty-bitmap:"):]
                if not name:
                    if listing:
                        meta.bitmaps = [True] * len(exp.bitmap_names)
                elif name in exp.bitmap_names:
                    meta.bitmaps[exp.bitmap_names.index(name)] = True
