"""TLS engines: a TLS connection as a byte-in, byte-out state machine.

The socket stays with the caller (the NBD handshake's loop, then the export's protocol),
which moves ciphertext between it and the engine. That lets a handshake that fails end
the connection without the alert OpenSSL would send, the way QEMU's GnuTLS server just
closes, and keeps TLS out of the code of clients that never start it.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Protocol

_READ_CHUNK = 1 << 20

KeyLookup = Callable[[], dict[str, bytes]]
Versions = tuple[ssl.TLSVersion, ssl.TLSVersion] | None


class TlsFailure(Exception):
    """The TLS session failed; the text is for the daemon's error report."""


class TlsClosed(Exception):
    """The peer ended the TLS session cleanly (close_notify)."""


class TlsEngine(Protocol):
    def feed(self, data: bytes) -> None:
        """Ciphertext received from the peer."""

    def take_output(self) -> bytes:
        """Ciphertext to send to the peer (may be empty)."""

    def do_handshake(self) -> bool:
        """Advances the handshake: True once complete, False when it needs input."""

    def read(self) -> bytes:
        """All plaintext available now (b"" if none)."""

    def write(self, data: bytes) -> None:
        """Encrypts ``data``; the records wait in ``take_output()``."""

    def peer_certificate(self) -> bytes | None:
        """The peer's verified certificate (DER), if it sent one."""

    def psk_identity(self) -> str | None:
        """The PSK username the client used."""


class SslObjectEngine:
    """An ``ssl.SSLObject`` over two memory BIOs."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = context.wrap_bio(self._in, self._out, server_side=True)
        self.identity: str | None = None

    def feed(self, data: bytes) -> None:
        self._in.write(data)

    def take_output(self) -> bytes:
        return self._out.read()

    def do_handshake(self) -> bool:
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLError as exc:
            raise TlsFailure(_reason(exc)) from None
        return True

    def read(self) -> bytes:
        chunks: list[bytes] = []
        try:
            while True:
                chunk = self._obj.read(_READ_CHUNK)
                if not chunk:  # close_notify, after the data read so far
                    if not chunks:
                        raise TlsClosed()
                    break
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            if not chunks:
                raise TlsClosed() from None
        except ssl.SSLError as exc:
            raise TlsFailure(_reason(exc)) from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def write(self, data: bytes) -> None:
        try:
            self._obj.write(data)
        except ssl.SSLError as exc:
            raise TlsFailure(_reason(exc)) from None

    def peer_certificate(self) -> bytes | None:
        return self._obj.getpeercert(binary_form=True)

    def psk_identity(self) -> str | None:
        return self.identity


def _reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc)


PSK_CIPHERS = "ECDHE-PSK:DHE-PSK:PSK"


def stdlib_psk_engine(keys: KeyLookup, versions: Versions) -> SslObjectEngine:
    """A PSK server session through ``SSLContext.set_psk_server_callback`` (3.13+).

    The context is made per connection so that its callback can record which user the
    client named (QEMU's authz works on it)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers(PSK_CIPHERS)
    if versions is not None:
        context.minimum_version, context.maximum_version = versions
    engine: SslObjectEngine

    def lookup(identity: str | None) -> bytes:
        engine.identity = identity
        return keys().get(identity or "", b"")

    context.set_psk_server_callback(lookup)  # type: ignore[attr-defined,unused-ignore]
    engine = SslObjectEngine(context)
    return engine
