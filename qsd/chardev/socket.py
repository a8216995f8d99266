"""QEMU's socket chardev: listens or connects, and carries one connection at a time.

A server listens through the shared ``qsd.sockets.Listener`` and stops accepting while it
has a client; with ``wait`` it waits for the first client before it is ready. A client
connects at once, or, with ``reconnect-ms``, in the background and again after every
failure or disconnection, reporting the first failure of a series on stderr.

``query-chardev`` shows ``disconnected:<address>`` or the connection itself, computed
when it was made (QEMU's qemu_chr_compute_filename()).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
from collections.abc import Callable

from qsd import qapi, sockets
from qsd.chardev.base import Chardev, ChardevLog, StreamConnection, serve_once
from qsd.errors import QMPError, error_report, info_report
from qsd.qapi.generated import (
    SocketAddress,
    SocketAddressVariantFd,
    SocketAddressVariantInet,
    SocketAddressVariantUnix,
    SocketAddressVariantVsock,
)
from qsd.qom.model import Property


def _unix_name(name: str | bytes) -> str:
    """A unix socket name as C's "%s" prints sun_path: abstract names print empty."""
    if isinstance(name, bytes):
        return "" if name.startswith(b"\0") else name.decode(errors="replace")
    return name


def connection_name(sock: socket.socket, listening: bool) -> str:
    """QEMU's qemu_chr_compute_filename() for a connected socket."""
    server = ",server=on" if listening else ""
    if sock.family == socket.AF_UNIX:
        if listening:
            return f"unix:{_unix_name(sock.getsockname())}{server}"
        try:
            peer = sock.getpeername()
        except OSError:
            peer = ""
        return f"unix:{_unix_name(peer)}"
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        left, right = ("[", "]") if sock.family == socket.AF_INET6 else ("", "")
        local, peer = sock.getsockname(), sock.getpeername()
        return (f"tcp:{left}{local[0]}{right}:{local[1]}{server} <-> "
                f"{left}{peer[0]}{right}:{peer[1]}")
    return "unknown"


def address_text(addr: SocketAddress, listening: bool) -> str:
    """QEMU's qemu_chr_socket_address(): the address a disconnected chardev shows."""
    server = ",server=on" if listening else ""
    if isinstance(addr, SocketAddressVariantInet):
        return f"tcp:{addr.host}:{addr.port}{server}"
    if isinstance(addr, SocketAddressVariantUnix):
        flags = ""
        if addr.abstract:
            flags = ",abstract=on" + (",tight=on" if addr.tight else "")
        return f"unix:{addr.path}{flags}{server}"
    if isinstance(addr, SocketAddressVariantFd):
        return f"fd:{addr.str}{server}"
    assert isinstance(addr, SocketAddressVariantVsock)
    return f"vsock:{addr.cid}:{addr.port}"


class _HangupWatch:
    """Calls back once the peer has hung up, without reading a byte (QEMU's G_IO_HUP
    watch): an epoll set with an empty event mask reports only hang-ups and errors."""

    def __init__(self, sock: socket.socket, callback: Callable[[], None]) -> None:
        self._epoll = select.epoll()
        self._epoll.register(sock.fileno(), 0)
        self._callback = callback
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._epoll.fileno(), self._ready)

    def _ready(self) -> None:
        if self._epoll.poll(0):
            self.cancel()
            self._callback()

    def cancel(self) -> None:
        if not self._epoll.closed:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()


def _read_addr(chardev: SocketChardev) -> object:
    return qapi.to_wire(chardev.addr)


def _read_connected(chardev: SocketChardev) -> bool:
    return chardev.connected


class SocketChardev(Chardev, qom_type="chardev-socket", properties=(
        Property("addr", "SocketAddress", get=_read_addr),
        Property("connected", "bool", get=_read_connected))):
    def __init__(self, chardev_id: str, addr: SocketAddress, *, server: bool, wait: bool,
                 reconnect_ms: int, nodelay: bool, log: ChardevLog | None) -> None:
        super().__init__(chardev_id, log)
        self.addr = addr
        self.server = server
        self.wait = wait
        self.reconnect_ms = reconnect_ms
        self.nodelay = nodelay
        self._loop = asyncio.get_running_loop()
        self._listener: sockets.Listener | None = None
        self._sock: socket.socket | None = None
        self._connected_name = ""
        self._started = False
        self._closing = False
        self._serving: asyncio.Task[None] | None = None
        self._hangup: _HangupWatch | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._error_reported = False

    def filename(self) -> str:
        if self._sock is not None:
            return self._connected_name
        return "disconnected:" + address_text(self.addr, self.server)

    @property
    def connected(self) -> bool:
        return self._sock is not None

    async def open(self) -> None:
        if self.server:
            await self._open_server()
        elif self.reconnect_ms > 0:
            self._connect_in_background()
        else:
            self._new_client(await sockets.connect(self.addr))

    async def _open_server(self) -> None:
        # An fd address with an empty name listens nowhere (QEMU keeps it for hand-overs).
        if isinstance(self.addr, SocketAddressVariantFd) and not self.addr.str:
            return
        # A monitor is a control channel: only the daemon's owner may connect to it.
        self._listener = sockets.Listener.open(self.addr, 1, unix_mode=0o600)
        self.addr = self._listener.local_address()
        if self.wait:
            info_report(f"QEMU waiting for connection on: {self.filename()}")
            self._new_client(await self._listener.wait_client())
        else:
            self._listener.set_client_func(self._new_client)

    def _new_client(self, sock: socket.socket) -> None:
        if self._listener is not None:
            self._listener.set_client_func(None)
        sock.setblocking(False)
        if self.nodelay and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock = sock
        self._connected_name = connection_name(sock, self.server)
        if self._started:
            self._serve(sock)
        else:
            self._hangup = _HangupWatch(sock, self._hung_up)

    def start(self) -> None:
        self._started = True
        if self._sock is not None:
            if self._hangup is not None:
                self._hangup.cancel()
                self._hangup = None
            self._serve(self._sock)

    def _serve(self, sock: socket.socket) -> None:
        assert self.frontend is not None
        frontend = self.frontend

        async def run() -> None:
            try:
                await serve_once(frontend, await StreamConnection.from_socket(sock, self.log))
            finally:
                sock.close()
                self._disconnected()

        self._serving = self._loop.create_task(run())

    def _hung_up(self) -> None:
        self._hangup = None
        if self._sock is not None:
            self._sock.close()
        self._disconnected()

    def _disconnected(self) -> None:
        """QEMU's tcp_chr_disconnect(): listen again, or reconnect later."""
        self._sock = None
        self._serving = None
        if self._closing:
            return
        if self._listener is not None:
            self._listener.set_client_func(self._new_client)
        if self.reconnect_ms > 0 and self._timer is None:
            self._schedule_reconnect()

    def _connect_in_background(self) -> None:
        self._connecting = self._loop.create_task(self._try_connect())

    async def _try_connect(self) -> None:
        try:
            sock = await sockets.connect(self.addr)
        except QMPError as exc:
            if not self._error_reported:
                error_report(f"Unable to connect character device {self.id}: {exc.desc}")
                self._error_reported = True
            self._schedule_reconnect()
            return
        finally:
            self._connecting = None
        self._error_reported = False
        self._new_client(sock)

    def _schedule_reconnect(self) -> None:
        self._timer = self._loop.call_later(self.reconnect_ms / 1000, self._reconnect_due)

    def _reconnect_due(self) -> None:
        self._timer = None
        if self._sock is None and self._connecting is None and not self._closing:
            self._connect_in_background()

    async def detach(self) -> None:
        """The frontend's connection ends; a server listens again, and a client that
        comes before the next frontend is accepted but not read (as with no frontend)."""
        self._started = False
        if self._serving is not None:
            self._serving.cancel()
            await asyncio.gather(self._serving, return_exceptions=True)
        await super().detach()

    async def close(self) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
        if self._hangup is not None:
            self._hangup.cancel()
        for task in (self._connecting, self._serving):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        if self._listener is not None:
            self._listener.close()
        await super().close()
