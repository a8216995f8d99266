"""A QMP monitor: one per ``--monitor``, serving whichever client its chardev connects.

In-band commands run one after another in arrival order, as QEMU's dispatcher does;
``exec-oob`` requests (once negotiated) skip the queue.  Replies and events share one
writer, so a message is never interleaved with another.
"""

from __future__ import annotations

import asyncio
import logging
from operator import attrgetter
from typing import TYPE_CHECKING

import qsd
from qsd.errors import QMPError
from qsd.qapi.generated import MonitorQMPCloseAction
from qsd.qmp.dispatch import Request, check_envelope, reply, run_command
from qsd.qmp.encode import encode_message
from qsd.qmp.jsonstream import JSONParseError, JSONStreamParser
from qsd.qmp.session import current_session
from qsd.qom.model import Property, QOMObject, read_enum, read_string, store

if TYPE_CHECKING:
    from qsd.chardev.base import Chardev, Connection
    from qsd.daemon import Daemon

log = logging.getLogger(__name__)

# How long the parser may run before the loop gets a turn: a request of many megabytes
# must not hold up the other monitors, exports and jobs on the main loop.
_PARSE_BUDGET = 0.002


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

    @property
    def answering(self) -> bool:
        return self.monitor.daemon.accepting_commands

    async def serve(self) -> None:
        self.send(greeting())
        worker = asyncio.create_task(self._run_in_band())
        parser = JSONStreamParser()
        try:
            # At EOF QEMU drops the connection with its parser: an unfinished request
            # is neither run nor answered.
            while self.answering and (data := await self.conn.read()):
                parser = await self._parse(parser, data)
            await self.queue.join()
        finally:
            worker.cancel()
            await asyncio.gather(worker, return_exceptions=True)

    async def _parse(self, parser: JSONStreamParser, data: bytes) -> JSONStreamParser:
        """Feeds ``data`` to the parser a slice of time at a time; returns the parser to
        go on with (a new one after a parser bug)."""
        while True:
            try:
                items = parser.feed(data, _PARSE_BUDGET)
            except Exception:  # a parser bug must not silently end the session
                log.exception("JSON parser failed; the message in progress is lost")
                return JSONStreamParser()
            for item in items:
                self._accept(item)
            if not parser.backlog or not self.answering:
                return parser
            data = b""
            await asyncio.sleep(0)

    def _accept(self, item: object) -> None:
        if not self.answering:
            return
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
                if not self.answering:
                    continue
                if request is None:
                    self.send(reply(message, error=error))
                else:
                    await self._execute(message, request)
            except Exception:  # a bug: log it and go on with the next request
                log.exception("request %.200r was not answered", message)
            finally:
                self.queue.task_done()

    async def _execute(self, message: object, request: Request) -> None:
        token = current_session.set(self)
        try:
            result = await run_command(self.monitor.daemon, request, self.negotiated)
            response = reply(message, result)
        except QMPError as exc:
            response = reply(message, error=exc)
        finally:
            current_session.reset(token)
        try:
            self.send(response)
        except Exception as exc:  # an unencodable result is a bug: say so, keep serving
            log.exception("cannot send the reply to %s", request.command)
            self.send(reply(message, error=QMPError(
                f"internal error in {request.command}: {exc}")))

    def negotiate(self, enable: list[str]) -> None:
        if self.negotiated:
            raise QMPError("Capabilities negotiation is already complete, command ignored",
                           "CommandNotFound")
        self.negotiated = True
        self.oob_enabled = "oob" in enable

    def emit(self, message: object) -> None:
        if self.negotiated:
            self.send(message)


class MonitorBase(QOMObject, qom_type="monitor", abstract=True,
                  interfaces=("user-creatable",), properties=(
                      Property("chardev", "str", get=read_string("chardev_id"),
                               set=store("chardev_id")),)):
    """What QEMU's monitors share: the chardev they serve (looked up on completion;
    changing the property later does not move the monitor)."""

    chardev_id = ""


class Monitor(MonitorBase, qom_type="monitor-qmp", properties=(
        Property("pretty", "bool", get=attrgetter("pretty"), set=store("pretty")),
        Property("close-action", "MonitorQMPCloseAction", get=read_enum("close_action"),
                 set=store("close_action")))):
    """A QMP monitor (``--monitor``), in /objects: owns its chardev's frontend and the
    current session, if any. close-action is kept but, as in QEMU, only what it was when
    the monitor was created counts: always ``none`` for a ``--monitor``."""

    def __init__(self, daemon: Daemon, chardev_id: str, pretty: bool) -> None:
        self.daemon = daemon
        self.chardev_id = chardev_id
        self.pretty = pretty
        self.close_action = MonitorQMPCloseAction.none
        self.chardev: Chardev | None = None
        self.session: MonitorSession | None = None
        # Once deleted: the chardev being released (a connection to close).
        self.released: asyncio.Task[None] | None = None

    def complete(self) -> None:
        chardev = self.daemon.chardevs.get(self.chardev_id)
        if chardev is None:
            raise QMPError(f'chardev "{self.chardev_id}" not found')
        if chardev.frontend is not None:
            raise QMPError(f"chardev '{self.chardev_id}' is already in use")
        chardev.attach(self.serve_connection)
        self.chardev = chardev
        self.daemon.monitors.append(self)

    def check_delete(self) -> None:
        session = current_session.get(None)
        if isinstance(session, MonitorSession) and session.monitor is self:
            raise QMPError("Cannot delete the current QMP monitor")

    def finalize(self) -> None:
        """Stops serving: the chardev is free again. The client's connection ends (QEMU
        keeps it open and no longer answers, which leaves the client hanging)."""
        if self in self.daemon.monitors:
            self.daemon.monitors.remove(self)
        chardev, self.chardev = self.chardev, None
        if chardev is not None:
            self.released = asyncio.get_running_loop().create_task(chardev.detach())

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
