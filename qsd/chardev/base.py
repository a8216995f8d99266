"""What every chardev shares: an id, at most one frontend, a log file, connections.

A backend produces connections; while a frontend (a monitor) is attached and started,
each connection is handed to it until the frontend is done with it. As in QEMU, a
chardev without a frontend opens its connection but never reads from it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import socket
from collections.abc import Awaitable, Callable

from qsd.errors import QMPError
from qsd.qom.model import QOMObject

Frontend = Callable[["Connection"], Awaitable[None]]

_READ_SIZE = 65536


class ChardevLog:
    """ChardevCommon's ``logfile``: a copy of everything the frontend writes; with
    ``logtimestamp``, each line begins with the UTC time of its first byte, as 11.1.3
    writes it (``2026-12-01T19:44:02.485487Z {"return": {}}``)."""

    def __init__(self, path: str, append: bool, timestamps: bool = False) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
        try:
            self.fd = os.open(path, flags, 0o666)
        except OSError as exc:
            raise QMPError(f"Could not create '{path}': {os.strerror(exc.errno or 0)}") from None
        self._timestamps = timestamps
        self._line_start = True

    def write(self, data: bytes) -> None:
        if self._timestamps:
            data = self._stamped(data)
        # Best effort, as QEMU's qemu_chr_write_log(): a full disk must not stop the monitor.
        with contextlib.suppress(OSError):
            os.write(self.fd, data)

    def _stamped(self, data: bytes) -> bytes:
        """``data`` with a time stamp before each line that begins in it."""
        out = []
        start = 0
        while start < len(data):
            end = data.find(b"\n", start) + 1 or len(data)
            if self._line_start:
                now = datetime.datetime.now(datetime.UTC)
                out.append(now.strftime("%Y-%m-%dT%H:%M:%S.%fZ ").encode())
            out.append(data[start:end])
            self._line_start = data[end - 1:end] == b"\n"
            start = end
        return b"".join(out)

    def close(self) -> None:
        os.close(self.fd)


class Connection:
    """One open stream: what a frontend reads from and writes to."""

    def __init__(self, log: ChardevLog | None) -> None:
        self._log = log

    async def read(self) -> bytes:
        """The next bytes; empty at the end of the stream."""
        raise NotImplementedError

    def write(self, data: bytes) -> None:
        """Queues ``data``; never blocks the loop for a socket."""
        self._send(data)
        if self._log is not None:
            self._log.write(data)

    def _send(self, data: bytes) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class StreamConnection(Connection):
    """A connected socket, through asyncio's buffered streams."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 log: ChardevLog | None) -> None:
        super().__init__(log)
        self.reader = reader
        self.writer = writer

    @classmethod
    async def from_socket(cls, sock: socket.socket, log: ChardevLog | None
                          ) -> StreamConnection:
        if sock.family == socket.AF_UNIX:
            reader, writer = await asyncio.open_unix_connection(sock=sock)
        else:
            reader, writer = await asyncio.open_connection(sock=sock)
        return cls(reader, writer, log)

    async def read(self) -> bytes:
        try:
            return await self.reader.read(_READ_SIZE)
        except OSError:
            return b""

    def _send(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def close(self) -> None:
        with contextlib.suppress(OSError):
            await self.writer.drain()
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


class FdConnection(Connection):
    """Inherited or opened descriptors (stdio, files): regular files and /dev/null cannot
    be polled, so those are read directly; writes go straight to the descriptor."""

    def __init__(self, in_fd: int | None, out_fd: int, log: ChardevLog | None) -> None:
        super().__init__(log)
        self.in_fd = in_fd
        self.out_fd = out_fd
        self._loop = asyncio.get_running_loop()
        self._closed = self._loop.create_future()

    async def _readable(self) -> bool:
        """Waits until the input can be read; False when it cannot be polled at all."""
        assert self.in_fd is not None
        ready = self._loop.create_future()

        def wake() -> None:
            # The reader stays armed until this coroutine resumes and removes it, so the
            # loop may call this twice: only the first one counts.
            if not ready.done():
                ready.set_result(None)

        try:
            self._loop.add_reader(self.in_fd, wake)
        except PermissionError:
            return False
        try:
            await asyncio.wait([ready, self._closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._loop.remove_reader(self.in_fd)
        return True

    async def read(self) -> bytes:
        if self.in_fd is None:
            await asyncio.shield(self._closed)
            return b""
        if not await self._readable():
            await asyncio.sleep(0)  # let the loop breathe between direct reads
        if self._closed.done():
            return b""
        try:
            return os.read(self.in_fd, _READ_SIZE)
        except OSError:
            return b""

    def _send(self, data: bytes) -> None:
        view = memoryview(data)
        with contextlib.suppress(OSError):
            while view:
                view = view[os.write(self.out_fd, view):]

    async def close(self) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


class Chardev(QOMObject, qom_type="chardev", abstract=True):
    """Base of the backends: an id, the frontend using it and its ``query-chardev`` text.
    Chardevs are the children of the /chardevs container; the id is their name there.

    The base behaves as QEMU's null chardev: nothing to open, nothing ever arrives.
    """

    def __init__(self, chardev_id: str, log: ChardevLog | None = None) -> None:
        self.qom_name = chardev_id
        self.log = log
        self.frontend: Frontend | None = None

    def filename(self) -> str:
        return "null"

    async def open(self) -> None:
        """Acquires the backend's resources; errors are QMPErrors."""

    def attach(self, frontend: Frontend) -> None:
        """Claims the chardev; serving starts with ``start`` once start-up is complete."""
        self.frontend = frontend

    def start(self) -> None:
        """Starts handing connections to the frontend."""

    async def detach(self) -> None:
        """Releases the frontend: its connection ends, the chardev stays open."""
        self.frontend = None

    async def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


class NullChardev(Chardev, qom_type="chardev-null"):
    """``null``: everything written is dropped, nothing ever arrives."""


async def serve_once(frontend: Frontend, conn: Connection) -> None:
    """Runs ``frontend`` on ``conn`` until it is done, then closes ``conn``."""
    try:
        await frontend(conn)
    finally:
        await conn.close()
