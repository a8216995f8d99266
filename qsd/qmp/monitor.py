"""A QMP monitor: one per ``--monitor``, serving whichever client its chardev connects.

In-band commands run one after another in arrival order, as QEMU's dispatcher does;
``exec-oob`` requests (once negotiated) skip the queue.  Replies and events share one
writer, so a message is never interleaved with another.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import qsd
from qsd.errors import QMPError
from qsd.qmp.dispatch import Request, check_envelope, reply, run_command
from qsd.qmp.encode import encode_message
from qsd.qmp.jsonstream import JSONParseError, JSONStreamParser
from qsd.qmp.session import current_session

if TYPE_CHECKING:
    from qsd.chardev.base import Connection
    from qsd.daemon import Daemon

def greeting() -> dict[str, object]:
    major, minor, micro = qsd.QEMU_VERSION
    return {"QMP": {"version": {"qemu": {"major": major, "minor": minor, "micro": micro},
                                "package": qsd.PACKAGE},
                    "capabilities": ["oob"]}}


class MonitorSession:
    """One connected client of a monitor."""

    def __init__(self, monitor: Monitor, conn: Connection) -> None:
        self.monitor = monitor
        self.conn = conn
        self.negotiated = False
        self.oob_enabled = False
        self.queue: asyncio.Queue[tuple[object, Request | None, QMPError | None]] = (
            asyncio.Queue())

    def send(self, message: object) -> None:
        self.conn.write(encode_message(message, self.monitor.pretty))

    async def serve(self) -> None:
        self.send(greeting())
        worker = asyncio.create_task(self._run_in_band())
        parser = JSONStreamParser()
        try:
            while True:
                data = await self.conn.read()
                if not data:
                    break
                for item in parser.feed(data):
                    self._accept(item)
            for item in parser.feed_eof():
                self._accept(item)
            await self.queue.join()
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    def _accept(self, item: object) -> None:
        if isinstance(item, JSONParseError):
            self.queue.put_nowait((None, None, QMPError(item.desc)))
            return
        try:
            request = check_envelope(item, self.oob_enabled)
        except QMPError as exc:
            self.queue.put_nowait((item, None, exc))
            return
        if request.oob:
            asyncio.create_task(self._execute(item, request))
        else:
            self.queue.put_nowait((item, request, None))

    async def _run_in_band(self) -> None:
        while True:
            message, request, error = await self.queue.get()
            try:
                if request is None:
                    self.send(reply(message, error=error))
                else:
                    await self._execute(message, request)
            finally:
                self.queue.task_done()

    async def _execute(self, message: object, request: Request) -> None:
        token = current_session.set(self)
        try:
            result = await run_command(self.monitor.daemon, request, self.negotiated)
        except QMPError as exc:
            self.send(reply(message, error=exc))
        else:
            self.send(reply(message, result))
        finally:
            current_session.reset(token)

    def negotiate(self, enable: list[str]) -> None:
        if self.negotiated:
            raise QMPError("Capabilities negotiation is already complete, command ignored",
                           "CommandNotFound")
        self.negotiated = True
        self.oob_enabled = "oob" in enable

    def emit(self, message: object) -> None:
        if self.negotiated:
            self.send(message)


class Monitor:
    """A ``--monitor``: owns its chardev's frontend and the current session, if any."""

    def __init__(self, daemon: Daemon, monitor_id: str | None, pretty: bool) -> None:
        self.daemon = daemon
        self.id = monitor_id
        self.pretty = pretty
        self.session: MonitorSession | None = None

    async def serve_connection(self, conn: Connection) -> None:
        session = MonitorSession(self, conn)
        self.session = session
        try:
            await session.serve()
        finally:
            self.session = None

    def emit(self, message: object) -> None:
        if self.session is not None:
            self.session.emit(message)
