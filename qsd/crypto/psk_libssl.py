"""TLS-PSK server sessions through libssl for Pythons whose ``ssl`` has no PSK callbacks
(before 3.13).

It binds the few public, ABI-stable OpenSSL 3 calls a memory-BIO server session needs,
with ctypes, and offers the same ``TlsEngine`` interface as ``engine.SslObjectEngine``.
Only the PSK key exchange uses it; certificates always go through ``ssl``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import ssl
import threading
from ctypes import POINTER, c_char_p, c_int, c_long, c_size_t, c_ubyte, c_uint, c_void_p
from typing import Any

from qsd.crypto.engine import PSK_CIPHERS, KeyLookup, TlsClosed, TlsFailure, Versions

_SSL_ERROR_SSL = 1
_SSL_ERROR_WANT_READ = 2
_SSL_ERROR_ZERO_RETURN = 6
_SSL_CTRL_SET_MIN_PROTO_VERSION = 123
_SSL_CTRL_SET_MAX_PROTO_VERSION = 124
_READ_CHUNK = 1 << 20

_PskCallback = ctypes.CFUNCTYPE(c_uint, c_void_p, c_char_p, POINTER(c_ubyte), c_uint)


class _Lib:
    """The libssl/libcrypto functions, loaded once."""

    def __init__(self) -> None:
        ssl_lib = ctypes.CDLL(ctypes.util.find_library("ssl") or "libssl.so.3")
        crypto = ctypes.CDLL(ctypes.util.find_library("crypto") or "libcrypto.so.3")

        def bind(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> Any:
            fn = getattr(lib, name)
            fn.restype = restype
            fn.argtypes = list(argtypes)
            return fn

        self.TLS_server_method = bind(ssl_lib, "TLS_server_method", c_void_p)
        self.SSL_CTX_new = bind(ssl_lib, "SSL_CTX_new", c_void_p, c_void_p)
        self.SSL_CTX_free = bind(ssl_lib, "SSL_CTX_free", None, c_void_p)
        self.SSL_CTX_ctrl = bind(ssl_lib, "SSL_CTX_ctrl", c_long, c_void_p, c_int, c_long,
                                 c_void_p)
        self.SSL_CTX_set_cipher_list = bind(ssl_lib, "SSL_CTX_set_cipher_list", c_int,
                                            c_void_p, c_char_p)
        self.SSL_CTX_set_psk_server_callback = bind(
            ssl_lib, "SSL_CTX_set_psk_server_callback", None, c_void_p, _PskCallback)
        self.SSL_new = bind(ssl_lib, "SSL_new", c_void_p, c_void_p)
        self.SSL_free = bind(ssl_lib, "SSL_free", None, c_void_p)
        self.SSL_set_bio = bind(ssl_lib, "SSL_set_bio", None, c_void_p, c_void_p, c_void_p)
        self.SSL_set_accept_state = bind(ssl_lib, "SSL_set_accept_state", None, c_void_p)
        self.SSL_do_handshake = bind(ssl_lib, "SSL_do_handshake", c_int, c_void_p)
        self.SSL_read_ex = bind(ssl_lib, "SSL_read_ex", c_int, c_void_p, c_void_p, c_size_t,
                                POINTER(c_size_t))
        self.SSL_write_ex = bind(ssl_lib, "SSL_write_ex", c_int, c_void_p, c_char_p,
                                 c_size_t, POINTER(c_size_t))
        self.SSL_get_error = bind(ssl_lib, "SSL_get_error", c_int, c_void_p, c_int)
        self.BIO_s_mem = bind(crypto, "BIO_s_mem", c_void_p)
        self.BIO_new = bind(crypto, "BIO_new", c_void_p, c_void_p)
        self.BIO_write = bind(crypto, "BIO_write", c_int, c_void_p, c_char_p, c_int)
        self.BIO_read = bind(crypto, "BIO_read", c_int, c_void_p, c_void_p, c_int)
        self.BIO_ctrl_pending = bind(crypto, "BIO_ctrl_pending", c_size_t, c_void_p)
        self.ERR_get_error = bind(crypto, "ERR_get_error", ctypes.c_ulong)
        self.ERR_clear_error = bind(crypto, "ERR_clear_error", None)
        self.ERR_reason_error_string = bind(crypto, "ERR_reason_error_string", c_char_p,
                                            ctypes.c_ulong)


_lib: _Lib | None = None
_lib_lock = threading.Lock()


def _load() -> _Lib:
    global _lib
    with _lib_lock:
        if _lib is None:
            _lib = _Lib()
        return _lib


_PROTO = {ssl.TLSVersion.TLSv1_2: 0x0303, ssl.TLSVersion.TLSv1_3: 0x0304}


class LibsslPskEngine:
    """One PSK server session (its own SSL_CTX, whose callback knows this engine)."""

    def __init__(self, keys: KeyLookup, versions: Versions) -> None:
        lib = self._lib = _load()
        self._keys = keys
        self.identity: str | None = None
        self._callback = _PskCallback(self._find_key)
        self._ctx = lib.SSL_CTX_new(lib.TLS_server_method())
        self._ssl = None
        if not self._ctx:
            raise TlsFailure("Cannot initialize TLS session")
        lib.SSL_CTX_set_cipher_list(self._ctx, PSK_CIPHERS.encode())
        if versions is not None:
            lib.SSL_CTX_ctrl(self._ctx, _SSL_CTRL_SET_MIN_PROTO_VERSION,
                             _PROTO[versions[0]], None)
            lib.SSL_CTX_ctrl(self._ctx, _SSL_CTRL_SET_MAX_PROTO_VERSION,
                             _PROTO[versions[1]], None)
        lib.SSL_CTX_set_psk_server_callback(self._ctx, self._callback)
        self._ssl = lib.SSL_new(self._ctx)
        self._rbio = lib.BIO_new(lib.BIO_s_mem())
        self._wbio = lib.BIO_new(lib.BIO_s_mem())
        lib.SSL_set_bio(self._ssl, self._rbio, self._wbio)
        lib.SSL_set_accept_state(self._ssl)
        self._buf = ctypes.create_string_buffer(_READ_CHUNK)
        self._done = c_size_t()

    def __del__(self) -> None:
        lib = getattr(self, "_lib", None)
        if lib is not None:
            if self._ssl:
                lib.SSL_free(self._ssl)
            if self._ctx:
                lib.SSL_CTX_free(self._ctx)

    def _find_key(self, _ssl: int | None, identity: bytes | None, psk: Any,
                  max_len: int) -> int:
        """OpenSSL's psk_server_callback; 0 refuses the client."""
        try:
            name = (identity or b"").decode("utf-8", "replace")
            self.identity = name
            key = self._keys().get(name, b"")
        except Exception:  # an exception must not cross the C callback
            return 0
        if not key or len(key) > max_len:
            return 0
        ctypes.memmove(psk, key, len(key))
        return len(key)

    def _error(self, ret: int) -> int:
        return int(self._lib.SSL_get_error(self._ssl, ret))

    def _failure(self) -> TlsFailure:
        code = self._lib.ERR_get_error()
        self._lib.ERR_clear_error()
        text = self._lib.ERR_reason_error_string(code) if code else None
        return TlsFailure(text.decode() if text else "TLS session failed")

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            chunk = bytes(view[:1 << 30])
            n = self._lib.BIO_write(self._rbio, chunk, len(chunk))
            if n <= 0:
                raise TlsFailure("Cannot buffer TLS input")
            view = view[n:]

    def take_output(self) -> bytes:
        size = self._lib.BIO_ctrl_pending(self._wbio)
        if not size:
            return b""
        out = ctypes.create_string_buffer(size)
        n = self._lib.BIO_read(self._wbio, out, size)
        return out.raw[:max(n, 0)]

    def do_handshake(self) -> bool:
        ret = self._lib.SSL_do_handshake(self._ssl)
        if ret == 1:
            return True
        if self._error(ret) == _SSL_ERROR_WANT_READ:
            return False
        raise self._failure()

    def read(self) -> bytes:
        chunks = []
        while True:
            ok = self._lib.SSL_read_ex(self._ssl, self._buf, _READ_CHUNK,
                                       ctypes.byref(self._done))
            if ok == 1:
                chunks.append(self._buf.raw[:self._done.value])
                continue
            err = self._error(ok)
            if err == _SSL_ERROR_WANT_READ:
                break
            if err == _SSL_ERROR_ZERO_RETURN and not chunks:
                raise TlsClosed()
            if err == _SSL_ERROR_ZERO_RETURN:
                break
            raise self._failure()
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def write(self, data: bytes) -> None:
        if not data:
            return
        ok = self._lib.SSL_write_ex(self._ssl, data, len(data),
                                    ctypes.byref(self._done))
        if ok != 1 or self._done.value != len(data):
            raise self._failure()

    def peer_certificate(self) -> bytes | None:
        return None

    def psk_identity(self) -> str | None:
        return self.identity
