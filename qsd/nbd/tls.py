"""NBD over TLS: the server side of NBD_OPT_STARTTLS and the encrypted transmission phase.

``TlsChannel`` is QEMU's qio_channel_tls for one client: it runs the handshake over the
raw socket on the main loop, checks the client's credentials the way QEMU does (after
the handshake, so a refused client sees the connection close, as with QEMU), and then
carries the rest of the option phase. ``TlsTransport`` carries the transmission phase:
it sits between the socket's transport and ``NbdClient``, which sees a transport like
any other; plain clients never touch this module.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping
from typing import Any

from cryptography import x509

from qsd.authz import is_allowed_by_id
from qsd.crypto.engine import TlsClosed, TlsEngine, TlsFailure
from qsd.crypto.tlscreds import TlsCreds, TlsCredsX509, dn_string
from qsd.errors import QMPError
from qsd.nbd.protocol import SocketCarrier

_LINGER_SECONDS = 1.0


class TlsChannel:
    """One client's TLS session during the option phase."""

    def __init__(self, sock: socket.socket, creds: TlsCreds, authz_id: str | None,
                 objects: Mapping[str, object]) -> None:
        self.sock = sock
        self.creds = creds
        self.authz_id = authz_id
        self.objects = objects
        self.engine: TlsEngine = creds.new_server_engine()
        self.plain = bytearray()
        self.loop = asyncio.get_running_loop()

    async def _pull(self, what: str) -> None:
        data = await self.loop.sock_recv(self.sock, 65536)
        if not data:
            raise TlsFailure(f"{what}: The TLS connection was non-properly terminated.")
        self.engine.feed(data)

    async def _push(self) -> None:
        out = self.engine.take_output()
        if out:
            await self.loop.sock_sendall(self.sock, out)

    async def handshake(self) -> None:
        """Raises TlsFailure with QEMU's wording; on failure nothing more is sent."""
        try:
            await self._handshake()
        except TlsFailure:
            await self._linger()
            raise

    async def _linger(self) -> None:
        """Ends our side and reads what the client still sends, briefly, so that it sees
        the connection end (as after QEMU's refusal) rather than a reset for unread
        data."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            async with asyncio.timeout(_LINGER_SECONDS):
                while await self.loop.sock_recv(self.sock, 65536):
                    pass
        except (OSError, TimeoutError):
            pass

    async def _handshake(self) -> None:
        while True:
            try:
                done = self.engine.do_handshake()
            except TlsFailure as exc:
                raise TlsFailure(f"TLS handshake failed: {exc}") from None
            await self._push()
            if done:
                break
            await self._pull("TLS handshake failed")
        self._check_credentials()

    def _check_credentials(self) -> None:
        """QEMU's qcrypto_tls_session_check_credentials() for a server."""
        if not isinstance(self.creds, TlsCredsX509) or not self.creds.verify_peer:
            return
        der = self.engine.peer_certificate()
        if der is None:
            raise TlsFailure("Verify failed: No certificate was found.")
        peername = dn_string(x509.load_der_x509_certificate(der).subject)
        if self.authz_id is not None:
            try:
                allowed = is_allowed_by_id(self.objects, self.authz_id, peername)
            except QMPError as exc:
                raise TlsFailure(exc.desc) from None
            if not allowed:
                raise TlsFailure(f"TLS x509 authz check for {peername} is denied")

    async def read_into(self, view: memoryview) -> int:
        """Like sock_recv_into(), but decrypted; 0 at the end of the session."""
        while not self.plain:
            try:
                self.plain += self.engine.read()
            except TlsClosed:
                return 0
            if self.plain:
                break
            await self._push()
            try:
                await self._pull("Cannot read from TLS channel")
            except TlsFailure:
                return 0
        n = min(len(view), len(self.plain))
        view[:n] = self.plain[:n]
        del self.plain[:n]
        return n

    async def write(self, data: bytes) -> None:
        self.engine.write(data)
        await self._push()


class TlsTransport(asyncio.Transport, SocketCarrier):
    """The transmission phase over TLS: a protocol for the raw socket and a transport for
    ``NbdClient``. Records are decrypted as they arrive and handed on in one
    ``data_received`` call; replies are encrypted and written at once."""

    def __init__(self, channel: TlsChannel, inner: asyncio.Protocol) -> None:
        super().__init__()
        self._engine = channel.engine
        self._leftover = bytes(channel.plain)
        self._inner = inner
        self._raw: asyncio.Transport | None = None
        self._closing = False

    # -- protocol side (the socket) ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]
        self._inner.connection_made(self)
        if self._leftover:
            data, self._leftover = self._leftover, b""
            self._inner.data_received(data)

    def data_received(self, data: bytes) -> None:
        self._engine.feed(data)
        try:
            plain = self._engine.read()
        except TlsClosed:
            self._flush()
            self._inner.eof_received()
            return
        except TlsFailure:
            self.abort()
            return
        self._flush()  # post-handshake messages (key updates) may need answers
        if plain:
            self._inner.data_received(plain)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -- transport side (NbdClient) ------------------------------------------------

    def _flush(self) -> None:
        out = self._engine.take_output()
        if out and self._raw is not None:
            self._raw.write(out)

    def write(self, data: Any) -> None:
        if self._closing or self._raw is None:
            return
        try:
            self._engine.write(bytes(data))
        except TlsFailure:
            self.abort()
            return
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def pause_reading(self) -> None:
        if self._raw is not None:
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._raw is not None:
            self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw is not None and self._raw.is_reading()

    def close(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or (self._raw is not None and self._raw.is_closing())

    def release_transport(self) -> asyncio.Transport | None:
        """Hands the socket's transport over for a move; the session stays as it is
        and goes on on the transport the next connection_made brings."""
        raw, self._raw = self._raw, None
        return raw

    def get_write_buffer_size(self) -> int:
        return 0 if self._raw is None else self._raw.get_write_buffer_size()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default if self._raw is None else self._raw.get_extra_info(name, default)
