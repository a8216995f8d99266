"""The ``file`` and ``stdio`` chardevs: a monitor driven through descriptors.

A file chardev writes to ``out`` and, if ``in`` is given, reads from it; the stdio one
uses the daemon's own stdin and stdout. Either is served once: when the input ends, the
frontend is done and the output stays open.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

from qsd.chardev.base import Chardev, ChardevLog, FdConnection, serve_once
from qsd.errors import QMPError


def _open(path: str, flags: int) -> int:
    try:
        return os.open(path, flags | os.O_CLOEXEC, 0o666)
    except OSError as exc:
        raise QMPError(f"Could not open '{path}': {os.strerror(exc.errno or 0)}") from None


class _DescriptorChardev(Chardev, qom_type="chardev-fd", abstract=True):
    def __init__(self, chardev_id: str, log: ChardevLog | None) -> None:
        super().__init__(chardev_id, log)
        self.in_fd: int | None = None
        self.out_fd = -1
        self._conn: FdConnection | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        assert self.frontend is not None
        self._conn = FdConnection(self.in_fd, self.out_fd, self.log)
        self._task = asyncio.create_task(serve_once(self.frontend, self._conn))

    async def _stop_serving(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def detach(self) -> None:
        await self._stop_serving()
        await super().detach()

    async def close(self) -> None:
        await self._stop_serving()
        await super().close()


class FileChardev(_DescriptorChardev, qom_type="chardev-file"):
    def __init__(self, chardev_id: str, out: str, in_: str | None, append: bool,
                 log: ChardevLog | None) -> None:
        super().__init__(chardev_id, log)
        self.out = out
        self.in_ = in_
        self.append = append

    def filename(self) -> str:
        return "file"

    async def open(self) -> None:
        """QEMU's qmp_chardev_open_file(): the output first, then the input."""
        flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if self.append else os.O_TRUNC)
        self.out_fd = _open(self.out, flags)
        if self.in_ is not None:
            try:
                self.in_fd = _open(self.in_, os.O_RDONLY)
            except QMPError:
                os.close(self.out_fd)
                raise

    async def close(self) -> None:
        await super().close()
        for fd in (self.in_fd, self.out_fd):
            if fd is not None and fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.in_fd, self.out_fd = None, -1


class StdioChardev(_DescriptorChardev, qom_type="chardev-stdio"):
    """The daemon's stdin and stdout; QEMU allows one such chardev at a time."""

    _in_use = False

    def filename(self) -> str:
        return "stdio"

    async def open(self) -> None:
        if StdioChardev._in_use:
            raise QMPError("cannot use stdio by multiple character devices")
        StdioChardev._in_use = True
        self.in_fd, self.out_fd = sys.stdin.fileno(), sys.stdout.fileno()

    async def close(self) -> None:
        await super().close()
        if self.out_fd >= 0:
            StdioChardev._in_use = False
            self.out_fd = -1
