"""Character devices that monitors sit on: listening or connecting sockets, and stdio.

A listening socket serves one client at a time, like QEMU's socket chardev: the next
client waits in the listen backlog until the current one disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import stat
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from qsd.errors import QMPError

Frontend = Callable[["Connection"], Awaitable[None]]


class Connection:
    """One client stream; writes are buffered by asyncio and never block the loop."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def read(self) -> bytes:
        try:
            return await self.reader.read(65536)
        except ConnectionError:
            return b""

    def write(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def close(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


@dataclass
class SocketSpec:
    """Where a socket chardev listens or connects, independent of how it was written."""

    kind: str  # "unix", "inet" or "fd"
    path: str = ""
    host: str = ""
    port: str = ""
    fd: str = ""
    server: bool = True
    wait: bool = True

    def describe(self) -> str:
        if self.kind == "unix":
            where = f"unix:{self.path}"
        elif self.kind == "inet":
            where = f"tcp:{self.host}:{self.port}"
        else:
            where = f"fd:{self.fd}"
        return where + (",server=on" if self.server else "")


class Chardev:
    """Base: an id, an optional frontend, and the text ``query-chardev`` shows."""

    def __init__(self, chardev_id: str) -> None:
        self.id = chardev_id
        self.frontend: Frontend | None = None

    def filename(self) -> str:
        raise NotImplementedError

    async def open(self) -> None:
        """Acquires the underlying resource; errors are QMPErrors."""

    def attach(self, frontend: Frontend) -> None:
        """Claims the chardev; serving starts with ``start`` once start-up is complete."""
        self.frontend = frontend

    def start(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class SocketChardev(Chardev):
    def __init__(self, chardev_id: str, spec: SocketSpec) -> None:
        super().__init__(chardev_id)
        self.spec = spec
        self.listener: socket.socket | None = None
        self.pending: Connection | None = None
        self.connection: Connection | None = None
        self.peer = ""
        self.task: asyncio.Task[None] | None = None

    def filename(self) -> str:
        if self.connection is None:
            return "disconnected:" + self.spec.describe()
        return self.peer

    async def open(self) -> None:
        sock = self._make_socket()
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            sock.setblocking(False)
            self.listener = sock
            if self.spec.kind == "inet":
                self.spec.port = str(sock.getsockname()[1])
            if self.spec.wait:
                print(f"qsd: QEMU waiting for connection on: {self.filename()}",
                      file=sys.stderr)
                self.pending = await self._accept()
        else:
            self.pending = await self._wrap(sock)

    def _make_socket(self) -> socket.socket:
        spec = self.spec
        try:
            if spec.kind == "fd":
                return self._inherited_socket()
            if spec.kind == "unix":
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                address: object = spec.path
            else:
                family = socket.AF_INET6 if ":" in spec.host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                address = (spec.host, int(spec.port or 0))
            try:
                if spec.server:
                    self._listen(sock, address)
                else:
                    sock.connect(address)  # type: ignore[arg-type]
            except BaseException:
                sock.close()
                raise
            return sock
        except OSError as exc:
            verb = "bind" if spec.server else "connect"
            if spec.kind == "unix":
                raise QMPError(f"Failed to {verb} socket to {spec.path}: "
                               f"{os.strerror(exc.errno or 0)}") from exc
            raise QMPError(f"Failed to {verb} socket: {os.strerror(exc.errno or 0)}") from exc

    def _listen(self, sock: socket.socket, address: object) -> None:
        if self.spec.kind == "unix":
            path = self.spec.path
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.stat(path).st_mode):
                    os.unlink(path)
            # The monitor socket is a control channel: only its owner may connect.
            old = os.umask(0o177)
            try:
                sock.bind(path)
            finally:
                os.umask(old)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)  # type: ignore[arg-type]
        sock.listen(1)

    def _inherited_socket(self) -> socket.socket:
        try:
            fd = int(self.spec.fd)
        except ValueError as exc:
            raise QMPError(f"Unable to parse FD number {self.spec.fd}") from exc
        try:
            return socket.socket(fileno=fd)
        except OSError as exc:
            raise QMPError(f"File descriptor '{fd}' is not a socket") from exc

    async def _wrap(self, sock: socket.socket) -> Connection:
        sock.setblocking(False)
        if sock.family == socket.AF_UNIX:
            reader, writer = await asyncio.open_unix_connection(sock=sock)
        else:
            reader, writer = await asyncio.open_connection(sock=sock)
        self.peer = self._describe_peer(sock)
        return Connection(reader, writer)

    def _describe_peer(self, sock: socket.socket) -> str:
        server = ",server=on" if self.spec.server else ""
        if sock.family == socket.AF_UNIX:
            name = sock.getsockname() if self.spec.server else sock.getpeername()
            return f"unix:{name}{server}"
        local, peer = sock.getsockname(), sock.getpeername()
        return f"tcp:{local[0]}:{local[1]}{server} <-> {peer[0]}:{peer[1]}"

    async def _accept(self) -> Connection:
        assert self.listener is not None
        sock, _ = await asyncio.get_running_loop().sock_accept(self.listener)
        return await self._wrap(sock)

    def start(self) -> None:
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        assert self.frontend is not None
        while True:
            conn = self.pending
            self.pending = None
            if conn is None:
                if self.listener is None:
                    return
                conn = await self._accept()
            self.connection = conn
            try:
                await self.frontend(conn)
            finally:
                self.connection = None
                await conn.close()

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        for conn in (self.connection, self.pending):
            if conn is not None:
                await conn.close()
        if self.listener is not None:
            self.listener.close()
            if self.spec.kind == "unix":
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.spec.path)


class StdioChardev(Chardev):
    """The daemon's own stdin/stdout, for a monitor driven through a pipe."""

    def __init__(self, chardev_id: str) -> None:
        super().__init__(chardev_id)
        self.task: asyncio.Task[None] | None = None

    def filename(self) -> str:
        return "stdio"

    def start(self) -> None:
        self.task = asyncio.create_task(self._serve())

    async def _serve(self) -> None:
        assert self.frontend is not None
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, sys.stdout)
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        await self.frontend(Connection(reader, writer))

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)


class NullChardev(Chardev):
    def filename(self) -> str:
        return "null"

    def start(self) -> None:
        pass

    async def close(self) -> None:
        pass
