"""Decompression of compressed clusters (QEMU's qcow2-threads.c formats).

zlib clusters are raw deflate streams (window bits 12, no header).  zstd clusters are
one or more zstd frames; decompression stops once a whole cluster came out, since the
last sector read may hold the start of the next compressed cluster.

zstd: Python 3.14 has ``compression.zstd``; before that the standard library has no
zstd, so this calls libzstd's streaming API through ctypes.  libzstd1 is on every
Debian system already (dpkg itself depends on it), which a binding from PyPI would only
wrap again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import importlib
import os
import zlib
from types import ModuleType
from typing import Any

from qsd.block.drivers.qcow2.format import COMPRESSION_ZLIB, COMPRESSION_ZSTD


def _eio() -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO))


def decompress(kind: int, data: bytes, cluster_size: int) -> bytes:
    """One cluster's worth of data from the compressed bytes ``data``; EIO if they do
    not make a whole cluster."""
    if kind == COMPRESSION_ZLIB:
        try:
            out = zlib.decompressobj(-12).decompress(data, cluster_size)
        except zlib.error:
            raise _eio() from None
    elif kind == COMPRESSION_ZSTD:
        out = _zstd(data, cluster_size)
    else:
        raise OSError(errno.ENOTSUP, os.strerror(errno.ENOTSUP))
    if len(out) != cluster_size:
        raise _eio()
    return out


def _stdlib_zstd() -> ModuleType | None:
    try:
        return importlib.import_module("compression.zstd")
    except ImportError:
        return None


_zstd_module = _stdlib_zstd()


def _zstd(data: bytes, size: int) -> bytes:
    if _zstd_module is not None:
        return _zstd_stdlib(_zstd_module, data, size)
    return _zstd_ctypes(data, size)


def _zstd_stdlib(module: Any, data: bytes, size: int) -> bytes:
    parts: list[bytes] = []
    got = 0
    while got < size and data:
        dec = module.ZstdDecompressor()
        try:
            out = dec.decompress(data, size - got)
        except module.ZstdError:
            raise _eio() from None
        if not out and not dec.eof:
            raise _eio()
        parts.append(out)
        got += len(out)
        if not dec.eof:
            break
        data = dec.unused_data
    return b"".join(parts)


class _Buffer(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("size", ctypes.c_size_t),
                ("pos", ctypes.c_size_t)]


_lib: Any = None


def _libzstd() -> Any:
    global _lib
    if _lib is None:
        lib = ctypes.CDLL(ctypes.util.find_library("zstd") or "libzstd.so.1")
        lib.ZSTD_createDCtx.restype = ctypes.c_void_p
        lib.ZSTD_freeDCtx.argtypes = [ctypes.c_void_p]
        lib.ZSTD_decompressStream.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Buffer),
                                              ctypes.POINTER(_Buffer)]
        lib.ZSTD_decompressStream.restype = ctypes.c_size_t
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        lib.ZSTD_isError.restype = ctypes.c_uint
        _lib = lib
    return _lib


def _zstd_ctypes(data: bytes, size: int) -> bytes:
    """QEMU's qcow2_zstd_decompress(): stream until the output is full."""
    lib = _libzstd()
    src = ctypes.create_string_buffer(bytes(data), len(data))
    dst = ctypes.create_string_buffer(size)
    inp = _Buffer(ctypes.cast(src, ctypes.c_void_p), len(data), 0)
    out = _Buffer(ctypes.cast(dst, ctypes.c_void_p), size, 0)
    dctx = lib.ZSTD_createDCtx()
    if not dctx:
        raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
    try:
        ret = 0
        while out.pos < out.size:
            last_in, last_out = inp.pos, out.pos
            ret = lib.ZSTD_decompressStream(dctx, ctypes.byref(out), ctypes.byref(inp))
            if lib.ZSTD_isError(ret) or (inp.pos <= last_in and out.pos <= last_out):
                raise _eio()
        if ret > 0:
            raise _eio()
    finally:
        lib.ZSTD_freeDCtx(dctx)
    return dst.raw
