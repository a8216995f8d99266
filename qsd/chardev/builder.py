"""One way to make a chardev, for ``--chardev`` and ``chardev-add`` alike.

Both arrive here as a validated ``ChardevBackend`` (the command line's QemuOpts are
converted first, see ``options``), and ``create_chardev`` does what QEMU's chardev_new()
does: open the log file, check the backend's options in QEMU's order, open the backend.
Only the caller's framing differs (chardev-add prefixes "Failed to add chardev ...").
"""

from __future__ import annotations

from collections.abc import Mapping

from qsd.chardev.base import Chardev, ChardevLog, NullChardev
from qsd.chardev.file import FileChardev, StdioChardev
from qsd.chardev.socket import SocketChardev
from qsd.errors import QMPError
from qsd.qapi.generated import (
    ChardevBackend,
    ChardevBackendVariantFile,
    ChardevBackendVariantNull,
    ChardevBackendVariantSocket,
    ChardevBackendVariantStdio,
    ChardevCommon,
    ChardevSocket,
    SocketAddress,
    SocketAddressVariantFd,
    SocketAddressVariantUnix,
    SocketAddressVariantVsock,
)
from qsd.sockets import flatten

# QEMU implements these socket options; qsd refuses them rather than ignore them.
_UNSUPPORTED_SOCKET_OPTIONS = ("telnet", "tn3270", "websocket", "tls_creds")


def _validate_socket(opts: ChardevSocket, addr: SocketAddress) -> None:
    """QEMU's qmp_chardev_validate_socket()."""
    tls = opts.tls_creds is not None
    if isinstance(addr, SocketAddressVariantFd):
        if opts.reconnect_ms is not None:
            raise QMPError("'reconnect-ms' option is incompatible with 'fd' address type")
        if tls and not opts.server:
            raise QMPError("'tls_creds' option is incompatible with 'fd' address type as "
                           "client")
    elif tls and isinstance(addr, SocketAddressVariantUnix | SocketAddressVariantVsock):
        raise QMPError(f"'tls_creds' option is incompatible with '{addr.type.value}' address "
                       "type")
    if opts.tls_authz is not None and opts.tls_creds is None:
        raise QMPError("'tls_authz' option requires 'tls_creds' option")
    if opts.server is None or opts.server:
        if opts.reconnect_ms is not None:
            raise QMPError("'reconnect-ms' option is incompatible with socket in server "
                           "listen mode")
    else:
        if opts.websocket:
            raise QMPError("Websocket client is not implemented")
        if opts.wait is not None:
            raise QMPError("'wait' option is incompatible with socket in client connect "
                           "mode")
    for name in _UNSUPPORTED_SOCKET_OPTIONS:
        if getattr(opts, name):
            raise QMPError(f"socket chardev option '{name.replace('_', '-')}' is not supported")


def _socket(chardev_id: str, opts: ChardevSocket, log: ChardevLog | None,
            objects: Mapping[str, object]) -> Chardev:
    server = opts.server is None or opts.server
    if opts.tls_creds is not None:
        from qsd.crypto.tlscreds import find_tls_creds  # only TLS needs cryptography

        find_tls_creds(objects, opts.tls_creds, server=server)
    addr = flatten(opts.addr)
    _validate_socket(opts, addr)
    return SocketChardev(chardev_id, addr, server=server, wait=bool(opts.wait),
                         reconnect_ms=opts.reconnect_ms or 0, nodelay=bool(opts.nodelay),
                         log=log)


def _common(backend: ChardevBackend) -> ChardevCommon:
    common = getattr(backend, "data", None)
    assert isinstance(common, ChardevCommon)
    return common


def _make(chardev_id: str, backend: ChardevBackend, log: ChardevLog | None,
          objects: Mapping[str, object]) -> Chardev:
    if isinstance(backend, ChardevBackendVariantSocket):
        return _socket(chardev_id, backend.data, log, objects)
    if isinstance(backend, ChardevBackendVariantFile):
        opts = backend.data
        return FileChardev(chardev_id, opts.out, opts.in_, bool(opts.append), log)
    if isinstance(backend, ChardevBackendVariantStdio):
        return StdioChardev(chardev_id, log)
    assert isinstance(backend, ChardevBackendVariantNull)
    return NullChardev(chardev_id, log)


async def create_chardev(chardev_id: str, backend: ChardevBackend,
                         objects: Mapping[str, object]) -> Chardev:
    """An open chardev; ``objects`` are the daemon's objects by id (where ``tls-creds`` is
    looked up)."""
    common = _common(backend)
    log = (ChardevLog(common.logfile, bool(common.logappend), bool(common.logtimestamp))
           if common.logfile else None)
    try:
        chardev = _make(chardev_id, backend, log, objects)
    except BaseException:
        if log is not None:
            log.close()
        raise
    try:
        await chardev.open()
    except BaseException:
        await chardev.close()
        raise
    return chardev
