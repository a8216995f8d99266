"""The client side of NBD: the handshake and the request/reply layout (QEMU's nbd/client.c).

``negotiate()`` runs the option phase over a connected stream the way QEMU's client does:
STARTTLS when credentials are given, extended headers or else structured replies when the
server offers them, one meta context (``base:allocation`` or what ``x-dirty-bitmap``
names), then NBD_OPT_GO asking for block sizes, falling back to NBD_OPT_LIST and
NBD_OPT_EXPORT_NAME for older servers, or the oldstyle greeting. Its failures are
``QMPError``s with QEMU's texts, as ``blockdev-add`` reports them. The block driver
(``qsd.block.drivers.nbd``) owns connections, reconnection and the requests in flight.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import os
import struct
from collections.abc import Awaitable, Callable

from qsd.errors import QMPError
from qsd.nbd.protocol import (
    NBD_FLAG_C_FIXED_NEWSTYLE,
    NBD_FLAG_C_NO_ZEROES,
    NBD_FLAG_FIXED_NEWSTYLE,
    NBD_FLAG_NO_ZEROES,
    NBD_INFO_BLOCK_SIZE,
    NBD_INFO_EXPORT,
    NBD_INIT_MAGIC,
    NBD_MAX_BUFFER_SIZE,
    NBD_MAX_STRING_SIZE,
    NBD_OPT_ABORT,
    NBD_OPT_EXPORT_NAME,
    NBD_OPT_EXTENDED_HEADERS,
    NBD_OPT_GO,
    NBD_OPT_LIST,
    NBD_OPT_SET_META_CONTEXT,
    NBD_OPT_STARTTLS,
    NBD_OPT_STRUCTURED_REPLY,
    NBD_OPTS_MAGIC,
    NBD_REP_ACK,
    NBD_REP_ERR,
    NBD_REP_ERR_BLOCK_SIZE_REQD,
    NBD_REP_ERR_INVALID,
    NBD_REP_ERR_PLATFORM,
    NBD_REP_ERR_POLICY,
    NBD_REP_ERR_SHUTDOWN,
    NBD_REP_ERR_TLS_REQD,
    NBD_REP_ERR_UNKNOWN,
    NBD_REP_ERR_UNSUP,
    NBD_REP_INFO,
    NBD_REP_MAGIC,
    NBD_REP_META_CONTEXT,
    NBD_REP_SERVER,
    OPTION_REPLY,
    Mode,
    opt_name,
)

NBD_CLIENT_MAGIC = 0x0000420281861253     # the oldstyle greeting
OLDSTYLE = -1                             # QEMU's NBD_MODE_OLDSTYLE, below EXPORT_NAME

_OPTION = struct.Struct(">QII")           # magic, option, length
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_INFO_EXPORT = struct.Struct(">QH")       # size, transmission flags
_INFO_BLOCK_SIZE = struct.Struct(">III")  # minimum, preferred, maximum

_REP_NAMES = {
    NBD_REP_ACK: "ack",
    NBD_REP_SERVER: "server",
    NBD_REP_INFO: "info",
    NBD_REP_META_CONTEXT: "meta context",
    NBD_REP_ERR_UNSUP: "unsupported",
    NBD_REP_ERR_POLICY: "denied by policy",
    NBD_REP_ERR_INVALID: "invalid",
    NBD_REP_ERR_PLATFORM: "platform lacks support",
    NBD_REP_ERR_TLS_REQD: "TLS required",
    NBD_REP_ERR_UNKNOWN: "export unknown",
    NBD_REP_ERR_SHUTDOWN: "server shutting down",
    NBD_REP_ERR_BLOCK_SIZE_REQD: "block size required",
    NBD_REP_ERR | 9: "option too big",
    NBD_REP_ERR | 10: "extended headers required",
}

_NBD_TO_ERRNO = {1: errno.EPERM, 5: errno.EIO, 12: errno.ENOMEM, 28: errno.ENOSPC,
                 75: errno.EOVERFLOW, 95: errno.ENOTSUP, 108: errno.ESHUTDOWN}


def rep_name(rep: int) -> str:
    return _REP_NAMES.get(rep, "<unknown>")


def system_errno(nbd_error: int) -> int:
    """QEMU's nbd_errno_to_system_errno(): anything unknown is EINVAL."""
    return 0 if nbd_error == 0 else _NBD_TO_ERRNO.get(nbd_error, errno.EINVAL)


@dataclasses.dataclass
class ExportInfo:
    """What the handshake learnt about the export (QEMU's NBDExportInfo)."""

    size: int = 0
    flags: int = 0
    min_block: int = 0
    opt_block: int = 0
    max_block: int = 0
    mode: int = Mode.EXTENDED
    base_allocation: bool = False
    context_id: int = 0


class Stream:
    """A connected stream: the reader and writer of one connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self, size: int, desc: str | None) -> bytes:
        """Exactly ``size`` bytes; failures in QEMU's nbd_read() words."""
        try:
            return await self.reader.readexactly(size)
        except asyncio.IncompleteReadError:
            reason = "Unexpected end-of-file before all data were read"
        except OSError as exc:
            reason = f"Unable to read from socket: {os.strerror(exc.errno or errno.EIO)}"
        raise QMPError(f"Failed to read {desc}: {reason}" if desc else reason)

    async def write(self, data: bytes, what: str) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except OSError as exc:
            raise QMPError(f"{what}: Unable to write to socket: "
                           f"{os.strerror(exc.errno or errno.EIO)}") from None

    def close(self) -> None:
        self.writer.close()


# A function that turns a plain stream into a TLS one after STARTTLS was accepted.
StartTls = Callable[[Stream], Awaitable[Stream]]


class _Negotiation:
    def __init__(self, stream: Stream, name: str, context: str | None) -> None:
        self.stream = stream
        self.name = name.encode()
        self.context = context
        self.info = ExportInfo()

    # -- option requests and replies -------------------------------------------------

    async def send_option(self, option: int, data: bytes = b"") -> None:
        try:
            self.stream.writer.write(_OPTION.pack(NBD_OPTS_MAGIC, option, len(data)) + data)
            await self.stream.writer.drain()
        except OSError as exc:
            raise QMPError("Failed to send option request header: Unable to write to "
                           f"socket: {os.strerror(exc.errno or errno.EIO)}") from None

    def abort(self) -> None:
        """NBD_OPT_ABORT as a courtesy; nothing is waited for."""
        try:
            self.stream.writer.write(_OPTION.pack(NBD_OPTS_MAGIC, NBD_OPT_ABORT, 0))
        except OSError:
            pass

    def fail(self, message: str, hint: str | None = None) -> QMPError:
        self.abort()
        return QMPError(message, hint=hint)

    async def option_reply(self, option: int) -> tuple[int, int]:
        """QEMU's nbd_receive_option_reply(): the reply's type and payload length."""
        try:
            raw = await self.stream.read(OPTION_REPLY.size, "option reply")
        except QMPError:
            self.abort()
            raise
        magic, got, kind, length = OPTION_REPLY.unpack(raw)
        if magic != NBD_REP_MAGIC:
            raise self.fail("Unexpected option reply magic")
        if got != option:
            raise self.fail(f"Unexpected option type {got} ({opt_name(got)}), expected "
                            f"{option} ({opt_name(option)})")
        return kind, length

    async def reply_error(self, option: int, kind: int, length: int, strict: bool) -> bool:
        """QEMU's nbd_handle_reply_err(): False for an error the caller may fall back
        from (unsupported, or any error when not ``strict``); raises for the others."""
        if not kind & NBD_REP_ERR:
            return True
        message = None
        if length:
            if length > NBD_MAX_BUFFER_SIZE:
                raise self.fail(f"server error {kind} ({rep_name(kind)}) message is too long")
            try:
                message = (await self.stream.read(length, None)).decode(errors="replace")
            except QMPError as exc:
                raise self.fail(f"Failed to read option error {kind} ({rep_name(kind)}) "
                                f"message: {exc.desc}") from None
        if kind == NBD_REP_ERR_UNSUP or not strict:
            return False
        what = f"option {option} ({opt_name(option)})"
        hint = None
        if kind == NBD_REP_ERR_POLICY:
            text = f"Denied by server for {what}"
        elif kind == NBD_REP_ERR_INVALID:
            text = f"Invalid parameters for {what}"
        elif kind == NBD_REP_ERR_PLATFORM:
            text = f"Server lacks support for {what}"
        elif kind == NBD_REP_ERR_TLS_REQD:
            text = f"TLS negotiation required before {what}"
            hint = "Did you forget a valid tls-creds?"
        elif kind == NBD_REP_ERR_UNKNOWN:
            text = "Requested export not available"
        elif kind == NBD_REP_ERR_SHUTDOWN:
            text = f"Server shutting down before {what}"
        elif kind == NBD_REP_ERR_BLOCK_SIZE_REQD:
            text = f"Server requires INFO_BLOCK_SIZE for {what}"
        else:
            text = f"Unknown error code when asking for {what}"
        if message is not None:
            hint = (hint + "\n" if hint else "") + f"server reported: {message}"
        raise self.fail(text, hint)

    async def simple_option(self, option: int, strict: bool) -> bool:
        """QEMU's nbd_request_simple_option(): True when the server acknowledged."""
        await self.send_option(option)
        kind, length = await self.option_reply(option)
        if not await self.reply_error(option, kind, length, strict):
            return False
        if kind != NBD_REP_ACK:
            raise self.fail(f"Server answered option {option} ({opt_name(option)}) with "
                            f"unexpected reply {kind} ({rep_name(kind)})")
        if length:
            raise self.fail(f"Option {option} ('{opt_name(option)}') response length is "
                            f"{length} (it should be zero)")
        return True

    # -- the phases ----------------------------------------------------------------------

    async def start(self, start_tls: StartTls | None) -> tuple[int, bool]:
        """QEMU's nbd_start_negotiate(): the mode the server allows, and whether it
        sends the 124 zero bytes after NBD_OPT_EXPORT_NAME."""
        magic = _U64.unpack(await self.stream.read(8, "initial magic"))[0]
        if magic != NBD_INIT_MAGIC:
            raise QMPError(f"Bad initial magic received: 0x{magic:x}")
        magic = _U64.unpack(await self.stream.read(8, "server magic"))[0]
        if magic == NBD_CLIENT_MAGIC:
            if start_tls is not None:
                raise QMPError("Server does not support STARTTLS")
            return OLDSTYLE, True
        if magic != NBD_OPTS_MAGIC:
            raise QMPError(f"Bad server magic received: 0x{magic:x}")
        server_flags = _U16.unpack(await self.stream.read(2, "server flags"))[0]
        fixed = bool(server_flags & NBD_FLAG_FIXED_NEWSTYLE)
        zeroes = not server_flags & NBD_FLAG_NO_ZEROES
        client_flags = (NBD_FLAG_C_FIXED_NEWSTYLE if fixed else 0) | \
                       (0 if zeroes else NBD_FLAG_C_NO_ZEROES)
        await self.stream.write(_U32.pack(client_flags), "Failed to send clientflags field")
        if start_tls is not None:
            if not fixed:
                raise QMPError("Server does not support STARTTLS")
            if not await self.simple_option(NBD_OPT_STARTTLS, True):
                raise self.fail("Server don't support STARTTLS option")
            self.stream = await start_tls(self.stream)
        if not fixed:
            return Mode.EXPORT_NAME, zeroes
        if await self.simple_option(NBD_OPT_EXTENDED_HEADERS, False):
            return Mode.EXTENDED, zeroes
        if await self.simple_option(NBD_OPT_STRUCTURED_REPLY, False):
            return Mode.STRUCTURED, zeroes
        return Mode.SIMPLE, zeroes

    async def meta_context(self) -> bool:
        """QEMU's nbd_negotiate_simple_meta_context(): whether the server selected the
        one context asked for (its id goes to ``info.context_id``)."""
        context = self.context or "base:allocation"
        query = context.encode()
        await self.send_option(NBD_OPT_SET_META_CONTEXT,
                               _U32.pack(len(self.name)) + self.name + _U32.pack(1)
                               + _U32.pack(len(query)) + query)
        received = False
        while True:
            kind, length = await self.option_reply(NBD_OPT_SET_META_CONTEXT)
            if not await self.reply_error(NBD_OPT_SET_META_CONTEXT, kind, length, False):
                return received
            if kind == NBD_REP_ACK:
                if length:
                    raise self.fail("Unexpected length to ACK response")
                return received
            if kind != NBD_REP_META_CONTEXT:
                raise self.fail(f"Unexpected reply type {kind} ({rep_name(kind)}), expected "
                                f"{NBD_REP_META_CONTEXT} ({rep_name(NBD_REP_META_CONTEXT)})")
            if length <= 4 or length > NBD_MAX_BUFFER_SIZE:
                raise self.fail("Failed to negotiate meta context, server answered with "
                                f"unexpected length {length}")
            if received:
                raise self.fail("Server answered with more than one context")
            context_id = _U32.unpack(await self.stream.read(4, "context id"))[0]
            name = (await self.stream.read(length - 4, "context name")).decode(
                errors="replace")
            if name != context:
                raise self.fail(f"Failed to negotiate meta context '{context}', server "
                                f"answered with different context '{name}'")
            self.info.context_id = context_id
            received = True

    async def go(self) -> bool:
        """QEMU's nbd_opt_info_or_go() for NBD_OPT_GO: False if the server does not
        know the option (then the old way is tried)."""
        info = self.info
        info.flags = 0
        await self.send_option(NBD_OPT_GO, _U32.pack(len(self.name)) + self.name
                               + _U16.pack(1) + _U16.pack(NBD_INFO_BLOCK_SIZE))
        while True:
            kind, length = await self.option_reply(NBD_OPT_GO)
            if not await self.reply_error(NBD_OPT_GO, kind, length, True):
                return False
            if kind == NBD_REP_ACK:
                if length:
                    raise QMPError("server sent invalid NBD_REP_ACK")
                if not info.flags:
                    raise QMPError("broken server omitted NBD_INFO_EXPORT")
                return True
            if kind != NBD_REP_INFO:
                raise self.fail(f"unexpected reply type {kind} ({rep_name(kind)}), "
                                f"expected {NBD_REP_INFO} ({rep_name(NBD_REP_INFO)})")
            if length < 2:
                raise self.fail(f"NBD_REP_INFO length {length} is too short")
            info_type = _U16.unpack(await self.stream.read(2, "info type"))[0]
            length -= 2
            if info_type == NBD_INFO_EXPORT:
                if length != _INFO_EXPORT.size:
                    raise self.fail(f"remaining export info len {length} is unexpected size")
                info.size, info.flags = _INFO_EXPORT.unpack(
                    await self.stream.read(length, "info size"))
                if info.min_block and info.size % info.min_block:
                    raise self.fail(f"export size {info.size} is not multiple of minimum "
                                    f"block size {info.min_block}")
            elif info_type == NBD_INFO_BLOCK_SIZE:
                if length != _INFO_BLOCK_SIZE.size:
                    raise self.fail(f"remaining export info len {length} is unexpected size")
                low, preferred, high = _INFO_BLOCK_SIZE.unpack(
                    await self.stream.read(length, "info minimum block size"))
                if low & (low - 1) or not low:
                    raise self.fail(f"server minimum block size {low} is not a power of two")
                if preferred & (preferred - 1) or preferred < low:
                    raise self.fail(f"server preferred block size {preferred} is not valid")
                if high < low:
                    raise self.fail(f"server maximum block size {high} is not valid")
                info.min_block, info.opt_block, info.max_block = low, preferred, high
            else:
                await self.stream.read(length, "info payload")

    async def query_exports(self) -> None:
        """QEMU's nbd_receive_query_exports(): a clear error for a missing export."""
        await self.send_option(NBD_OPT_LIST)
        names: list[bytes] = []
        while True:
            kind, length = await self.option_reply(NBD_OPT_LIST)
            if not await self.reply_error(NBD_OPT_LIST, kind, length, True):
                return
            if kind == NBD_REP_ACK:
                if length:
                    raise self.fail("length too long for option end")
                break
            if kind != NBD_REP_SERVER:
                raise self.fail(f"Unexpected reply type {kind} ({rep_name(kind)}), expected "
                                f"{NBD_REP_SERVER} ({rep_name(NBD_REP_SERVER)})")
            if length < 4 or length > NBD_MAX_BUFFER_SIZE:
                raise self.fail(f"incorrect option length {length}")
            payload = await self.stream.read(length, "option name length")
            size = _U32.unpack_from(payload)[0]
            if size > length - 4 or size > NBD_MAX_STRING_SIZE:
                raise self.fail("incorrect name length in server's list response")
            names.append(payload[4:4 + size])
        if names and self.name not in names:
            raise self.fail(f"No export with name '{self.name.decode(errors='replace')}' "
                            "available")

    async def export_name(self, zeroes: bool) -> None:
        await self.stream.write(_OPTION.pack(NBD_OPTS_MAGIC, NBD_OPT_EXPORT_NAME,
                                             len(self.name)) + self.name,
                                "Failed to send option request header")
        self.info.size = _U64.unpack(await self.stream.read(8, "export length"))[0]
        self.info.flags = _U16.unpack(await self.stream.read(2, "export flags"))[0]
        if zeroes:
            await self.stream.read(124, "reserved block")

    async def oldstyle(self) -> None:
        if self.name:
            raise QMPError("Server does not support non-empty export names")
        self.info.size = _U64.unpack(await self.stream.read(8, "export length"))[0]
        flags = _U32.unpack(await self.stream.read(4, "export flags"))[0]
        if flags & ~0xFFFF:
            raise QMPError(f"Unexpected export flags {flags:x}")
        self.info.flags = flags
        await self.stream.read(124, "reserved block")


async def negotiate(stream: Stream, name: str, context: str | None,
                    start_tls: StartTls | None) -> tuple[Stream, ExportInfo]:
    """QEMU's nbd_receive_negotiate(): the handshake up to the transmission phase. The
    stream returned is the TLS one when STARTTLS was used."""
    neg = _Negotiation(stream, name, context)
    mode, zeroes = await neg.start(start_tls)
    neg.info.mode = mode
    if mode == OLDSTYLE:
        await neg.oldstyle()
    elif mode == Mode.EXPORT_NAME:
        await neg.export_name(zeroes)
    else:
        if mode >= Mode.STRUCTURED:
            neg.info.base_allocation = await neg.meta_context()
        if not await neg.go():
            await neg.query_exports()
            await neg.export_name(zeroes)
    return neg.stream, neg.info
