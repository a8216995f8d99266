"""Socket addresses, listening and connecting, with QEMU's rules and error texts.

One address type: the QAPI ``SocketAddress`` union. Commands that take the older form
with ``data`` wrappers (nbd-server-start, chardev-add) flatten it on entry, as QEMU's
socket_address_flatten() does.

One listener: ``Listener`` is QEMU's QIONetListener, shared by socket chardevs and the
NBD server. It listens on every address a host name resolves to, accepts on the main
loop while a client callback is set (so its owner can pause accepting), and removes its
unix socket file when it is closed.

File descriptor addresses name a descriptor the daemon inherited. QEMU only resolves
them on the command line; a QMP command naming one gets the storage daemon's refusal
(``qsd.qmp.session`` tells the two apart, as QEMU's monitor_cur() does).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import socket
from collections.abc import Callable
from typing import Any

from qsd import qapi
from qsd.errors import QMPError
from qsd.qapi.generated import (
    SocketAddress,
    SocketAddressLegacy,
    SocketAddressVariantFd,
    SocketAddressVariantInet,
    SocketAddressVariantUnix,
    SocketAddressVariantVsock,
)
from qsd.qmp.session import in_monitor_command

ClientFunc = Callable[[socket.socket], None]
Sockaddr = tuple[Any, ...] | str | bytes

_SUN_PATH_SIZE = 108
_UINT32_MAX = 0xFFFFFFFF
_INT_MAX = 0x7FFFFFFF
# strtoull()/strtoll() in base 10 as QEMU's parse_uint_full()/qemu_strtoi() use them.
_UNSIGNED = re.compile(r"[ \t\n\v\f\r]*\+?([0-9]+)\Z")
_SIGNED = re.compile(r"[ \t\n\v\f\r]*([+-]?[0-9]+)\Z")


def _error(message: str, exc: OSError | None = None) -> QMPError:
    """QEMU's error_setg_errno(): the message, then ': ' and strerror when errno is set."""
    if exc is not None and exc.errno:
        message += f": {os.strerror(exc.errno)}"
    return QMPError(message)


def flatten(addr: SocketAddressLegacy) -> SocketAddress:
    """The legacy ``{"type": ..., "data": {...}}`` form as a flat SocketAddress."""
    wire = qapi.to_wire(addr)
    result: SocketAddress = qapi.parse_type("SocketAddress",
                                            {"type": wire["type"], **wire["data"]})
    return result


def _parse_fd(text: str) -> int:
    """QEMU's socket_get_fd(): a descriptor number that must name a socket."""
    if in_monitor_command():
        raise QMPError("only QEMU supports file descriptor passing")
    match = _SIGNED.match(text)
    if match is None:
        raise QMPError(f"Unable to parse FD number {text}")
    fd = int(match.group(1))
    if not -_INT_MAX - 1 <= fd <= _INT_MAX:
        raise _error(f"Unable to parse FD number {text}", OSError(errno.ERANGE, ""))
    try:
        socket.socket(fileno=fd).detach()
    except OSError:
        raise QMPError(f"File descriptor '{text}' is not a socket") from None
    return fd


def _fd_socket(addr: SocketAddressVariantFd) -> socket.socket:
    return socket.socket(fileno=_parse_fd(addr.str))


def _vsock_address(addr: SocketAddressVariantVsock) -> tuple[int, int]:
    """QEMU's vsock_parse_vaddr_to_sockaddr()."""
    values = []
    for name, text in (("cid", addr.cid), ("port", addr.port)):
        match = _UNSIGNED.match(text)
        if match is None or int(match.group(1)) > _UINT32_MAX:
            raise QMPError(f"Failed to parse {name} '{text}'")
        values.append(int(match.group(1)))
    return values[0], values[1]


def _inet_family(addr: SocketAddressVariantInet) -> int:
    """QEMU's inet_ai_family_from_address(): which families getaddrinfo() may return."""
    ipv4, ipv6 = addr.ipv4, addr.ipv6
    if ipv4 is False and ipv6 is False:
        raise QMPError("Cannot disable IPv4 and IPv6 at same time")
    if ipv4 and ipv6:
        return socket.AF_INET6 if not addr.host else socket.AF_UNSPEC
    if ipv6 or ipv4 is False:
        return socket.AF_INET6
    if ipv4 or ipv6 is False:
        return socket.AF_INET
    return socket.AF_UNSPEC


def _unix_sockaddr(path: str, abstract: bool, tight: bool) -> str | bytes:
    raw = path.encode()
    if len(raw) > _SUN_PATH_SIZE or (abstract and len(raw) > _SUN_PATH_SIZE - 1):
        limit = _SUN_PATH_SIZE - 1 if abstract else _SUN_PATH_SIZE
        raise QMPError(f"UNIX socket path '{path}' is too long",
                       hint=f"Path must be less than {limit} bytes")
    if not abstract:
        return path
    name = b"\0" + raw
    return name if tight else name.ljust(_SUN_PATH_SIZE, b"\0")


# -- listening ---------------------------------------------------------------------


def _listen_unix(addr: SocketAddressVariantUnix, backlog: int, mode: int | None
                 ) -> socket.socket:
    """QEMU's unix_listen_saddr(); ``mode`` narrows the file's permissions before anyone
    can connect (nobody can before listen())."""
    abstract = bool(addr.abstract)
    path = addr.path
    if not path and not abstract:
        import tempfile  # rarely needed, and slow to import

        # QEMU makes up a path in the temporary directory, like mkstemp().
        fd, path = tempfile.mkstemp(prefix="qemu-socket-")
        os.close(fd)
    sockaddr = _unix_sockaddr(path, abstract, addr.tight is not False)
    if not abstract:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _error(f"Failed to unlink socket {path}", exc) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    chmod = None if mode is None or abstract else (lambda: os.chmod(path, mode))
    return _bind_and_listen(sock, sockaddr, backlog, f"Failed to bind socket to {path}", chmod)


def _bind_and_listen(sock: socket.socket, sockaddr: Sockaddr, backlog: int, bind_error: str,
                     before_listen: Callable[[], None] | None = None) -> socket.socket:
    """bind() and listen() with QEMU's texts; the socket is closed if either fails."""
    try:
        try:
            sock.bind(sockaddr)
        except OSError as exc:
            raise _error(bind_error, exc) from None
        if before_listen is not None:
            before_listen()
        try:
            sock.listen(backlog)
        except OSError as exc:
            raise _error("Failed to listen on socket", exc) from None
    except BaseException:
        sock.close()
        raise
    return sock


def _resolve_passive(addr: SocketAddressVariantInet) -> list[tuple[int, tuple[str, int]]]:
    """QEMU's qio_dns_resolver_lookup_sync(): every local address to listen on."""
    family = _inet_family(addr)
    flags = socket.AI_PASSIVE
    if addr.numeric:
        flags |= socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
    try:
        infos = socket.getaddrinfo(addr.host or None, addr.port or None, family,
                                   socket.SOCK_STREAM, 0, flags)
    except socket.gaierror as exc:
        raise QMPError(f"address resolution failed for {addr.host}:{addr.port}: "
                       f"{exc.strerror}") from None
    return [(info[0], (str(info[4][0]), int(info[4][1]))) for info in infos]


def _try_bind(sock: socket.socket, family: int, sockaddr: Sockaddr,
              addr: SocketAddressVariantInet) -> None:
    """QEMU's try_bind(): IPv6 sockets take IPv4 too unless the user chose families."""
    v6only = not ((addr.ipv4 is None and addr.ipv6 is None) or (addr.ipv4 and addr.ipv6))
    while True:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
        try:
            sock.bind(sockaddr)
            return
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno == errno.EADDRINUSE and not v6only:
                v6only = True
                continue
            raise


def _listen_inet(addr: SocketAddressVariantInet, family: int, host: str, port: int,
                 backlog: int) -> socket.socket:
    """QEMU's inet_listen_saddr() for one resolved address: the first free port of the
    range ``port``..``to``."""
    last = port if addr.to is None else addr.to
    created = False
    failure: OSError | None = None
    for candidate in range(port, last + 1):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:
            if candidate == port:
                failure = exc
                continue
            raise _error("Failed to recreate failed listening socket", exc) from None
        created = True
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                _try_bind(sock, family, (host, candidate), addr)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise _error("Failed to bind socket", exc) from None
                failure = exc
                sock.close()
                continue
            try:
                sock.listen(backlog)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise _error("Failed to listen on socket", exc) from None
                failure = exc
                sock.close()
                continue
            _set_keep_alive(sock, addr)
        except BaseException:
            sock.close()
            raise
        return sock
    raise _error("Failed to find an available port" if created else "Failed to create a socket",
                 failure)


def _set_keep_alive(sock: socket.socket, addr: SocketAddressVariantInet) -> None:
    """QEMU's inet_set_sockopts(): the TCP options apply only with keep-alive on, and
    only when given and not 0 (the kernel's range check answers out-of-range values)."""
    if not addr.keep_alive:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    except OSError as exc:
        raise _error("Unable to set keep-alive option on socket", exc) from None
    for value, option, what in ((addr.keep_alive_count, socket.TCP_KEEPCNT, "count"),
                                (addr.keep_alive_idle, socket.TCP_KEEPIDLE, "idle"),
                                (addr.keep_alive_interval, socket.TCP_KEEPINTVL, "interval")):
        if value:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, option, value)
            except OSError as exc:
                raise _error(f"Unable to set TCP keep-alive {what} option on socket",
                             exc) from None


def _listen_vsock(addr: SocketAddressVariantVsock, backlog: int) -> socket.socket:
    """QEMU's vsock_listen_saddr()."""
    sockaddr = _vsock_address(addr)
    try:
        sock = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as exc:
        raise _error("Failed to create socket", exc) from None
    return _bind_and_listen(sock, sockaddr, backlog, "Failed to bind socket")


def _listen_fd(addr: SocketAddressVariantFd, backlog: int) -> socket.socket:
    sock = _fd_socket(addr)
    try:
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise _error("Failed to listen on fd socket", exc) from None
    return sock


def _open_listeners(addr: SocketAddress, backlog: int, unix_mode: int | None
                    ) -> list[socket.socket]:
    """QEMU's qio_net_listener_open_sync(): succeeds if any resolved address listens,
    and reports the first address's error otherwise."""
    if isinstance(addr, SocketAddressVariantInet):
        socks: list[socket.socket] = []
        first_error: QMPError | None = None
        for family, (host, port) in _resolve_passive(addr):
            try:
                socks.append(_listen_inet(addr, family, host, port, backlog))
            except QMPError as exc:
                first_error = first_error or exc
        if not socks:
            assert first_error is not None
            raise first_error
        return socks
    if isinstance(addr, SocketAddressVariantUnix):
        return [_listen_unix(addr, backlog, unix_mode)]
    if isinstance(addr, SocketAddressVariantVsock):
        return [_listen_vsock(addr, backlog)]
    assert isinstance(addr, SocketAddressVariantFd)
    return [_listen_fd(addr, backlog)]


def local_address(sock: socket.socket) -> SocketAddress:
    """QEMU's socket_local_address(): where a socket is bound, as a SocketAddress."""
    name = sock.getsockname()
    wire: dict[str, object]
    if sock.family == socket.AF_UNIX:
        if isinstance(name, bytes) and name.startswith(b"\0"):
            wire = {"type": "unix", "path": name[1:].split(b"\0")[0].decode(errors="replace"),
                    "abstract": True, "tight": len(name) < _SUN_PATH_SIZE}
        else:
            path = name.decode(errors="replace") if isinstance(name, bytes) else name
            wire = {"type": "unix", "path": path}
    elif sock.family == socket.AF_VSOCK:
        wire = {"type": "vsock", "cid": str(name[0]), "port": str(name[1])}
    else:
        host, port = socket.getnameinfo(name, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
        family = "ipv4" if sock.family == socket.AF_INET else "ipv6"
        wire = {"type": "inet", "host": host, "port": port, family: True}
    result: SocketAddress = qapi.parse_type("SocketAddress", wire)
    return result


def _unlink_listening_path(sock: socket.socket) -> None:
    """QEMU's socket_listen_cleanup(): a unix listener's file goes when it closes."""
    if sock.family != socket.AF_UNIX:
        return
    with contextlib.suppress(OSError):
        name = sock.getsockname()
        if isinstance(name, str) and name:
            os.unlink(name)


class Listener:
    """Listening sockets that hand each accepted connection to a client callback."""

    def __init__(self, socks: list[socket.socket]) -> None:
        self.sockets = socks
        self._loop = asyncio.get_running_loop()
        self._client_func: ClientFunc | None = None
        self._closed = False
        for sock in socks:
            sock.setblocking(False)

    @classmethod
    def open(cls, addr: SocketAddress, backlog: int, *, unix_mode: int | None = None
             ) -> Listener:
        """Listens on ``addr``; a unix socket file gets ``unix_mode`` if given."""
        return cls(_open_listeners(addr, backlog, unix_mode))

    def local_address(self) -> SocketAddress:
        return local_address(self.sockets[0])

    def set_client_func(self, func: ClientFunc | None) -> None:
        """Accepts and hands over connections while ``func`` is set; None pauses."""
        if self._closed:
            return
        if self._client_func is not None:
            for sock in self.sockets:
                self._loop.remove_reader(sock.fileno())
        self._client_func = func
        if func is not None:
            for sock in self.sockets:
                self._loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError:
            return  # out of descriptors and the like: QEMU drops the attempt too
        sock.setblocking(False)
        assert self._client_func is not None
        self._client_func(sock)

    async def wait_client(self) -> socket.socket:
        """The next connection, whatever the client callback (QEMU's wait=on)."""
        waiter: asyncio.Future[socket.socket] = self._loop.create_future()
        previous = self._client_func

        def take(sock: socket.socket) -> None:
            if waiter.done():
                sock.close()
            else:
                waiter.set_result(sock)

        self.set_client_func(take)
        try:
            return await waiter
        finally:
            self.set_client_func(previous)

    def close(self) -> None:
        self.set_client_func(None)
        self._closed = True
        for sock in self.sockets:
            _unlink_listening_path(sock)
            sock.close()


# -- connecting --------------------------------------------------------------------


async def _sock_connect(sock: socket.socket, sockaddr: Sockaddr) -> None:
    """A non-blocking connect() for any family (the loop's own resolves host names)."""
    try:
        sock.connect(sockaddr)
        return
    except (BlockingIOError, InterruptedError):
        pass
    loop = asyncio.get_running_loop()
    writable = loop.create_future()

    def ready() -> None:
        if not writable.done():
            writable.set_result(None)

    loop.add_writer(sock.fileno(), ready)
    try:
        await writable
    finally:
        loop.remove_writer(sock.fileno())
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))


async def _connect_inet(addr: SocketAddressVariantInet) -> socket.socket:
    """QEMU's inet_connect_saddr(): every resolved address in turn, the last error wins."""
    loop = asyncio.get_running_loop()
    flags = socket.AI_CANONNAME | socket.AI_ADDRCONFIG | socket.AI_V4MAPPED
    try:
        infos = await loop.getaddrinfo(addr.host, addr.port, family=_inet_family(addr),
                                       type=socket.SOCK_STREAM, flags=flags)
    except socket.gaierror as exc:
        raise QMPError(f"address resolution failed for {addr.host}:{addr.port}: "
                       f"{exc.strerror}") from None
    failure: QMPError | None = None
    for family, kind, proto, _, sockaddr in infos:
        try:
            sock = socket.socket(family, kind, proto)
        except OSError as exc:
            failure = _error(f"Failed to create socket family {family}", exc)
            continue
        sock.setblocking(False)
        try:
            await _sock_connect(sock, sockaddr)
        except OSError as exc:
            sock.close()
            failure = _error(f"Failed to connect to '{addr.host}:{addr.port}'", exc)
            continue
        except BaseException:
            sock.close()
            raise
        try:
            _set_keep_alive(sock, addr)
        except QMPError:
            sock.close()
            raise
        return sock
    assert failure is not None
    raise failure


async def _connect_to(family: int, sockaddr: Sockaddr, where: str, create_error: str
                     ) -> socket.socket:
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise _error(create_error, exc) from None
    sock.setblocking(False)
    try:
        await _sock_connect(sock, sockaddr)
    except OSError as exc:
        sock.close()
        raise _error(f"Failed to connect to '{where}'", exc) from None
    except BaseException:
        sock.close()
        raise
    return sock


async def connect(addr: SocketAddress) -> socket.socket:
    """QEMU's socket_connect(), without blocking the loop: a connected socket."""
    if isinstance(addr, SocketAddressVariantInet):
        return await _connect_inet(addr)
    if isinstance(addr, SocketAddressVariantUnix):
        abstract = bool(addr.abstract)
        sockaddr = _unix_sockaddr(addr.path, abstract, addr.tight is not False)
        return await _connect_to(socket.AF_UNIX, sockaddr, addr.path, "Failed to create socket")
    if isinstance(addr, SocketAddressVariantVsock):
        return await _connect_to(socket.AF_VSOCK, _vsock_address(addr), f"{addr.cid}:{addr.port}",
                                 f"Failed to create socket family {socket.AF_VSOCK}")
    assert isinstance(addr, SocketAddressVariantFd)
    sock = _fd_socket(addr)
    sock.setblocking(False)
    return sock
