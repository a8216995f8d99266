"""The daemon's state and its orderly shutdown.

Everything a command can create lives here, so shutdown can take it apart in QEMU's order:
exports first (their events still reach the monitors), then jobs (cancelled and waited
for), the NBD server, block nodes, the objects (iothreads stop), and last the monitors and
their chardevs.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Protocol

from qsd.block import events as block_events
from qsd.block.graph import BlockGraph
from qsd.chardev.base import Chardev
from qsd.export.registry import ExportRegistry
from qsd.iothread import IOThread
from qsd.job.core import JobRegistry
from qsd.qmp.encode import event_message
from qsd.qom.model import Container, QOMObject

if TYPE_CHECKING:
    from qsd.nbd.server import NbdServer

log = logging.getLogger(__name__)
# How long shutdown lets commands that are still running finish before it takes their
# objects down anyway (a signal must end the daemon within seconds, whatever runs).
COMMAND_GRACE_SECONDS = 2.0


class EventSink(Protocol):
    """A QMP monitor as the daemon sees it: somewhere events go."""

    def emit(self, message: object) -> None: ...


class Daemon:
    def __init__(self) -> None:
        # The QOM tree: user-creatable objects live in /objects, by id.
        self.qom_root: Container[QOMObject] = Container()
        self.objects: Container[QOMObject] = Container()
        self.chardevs: Container[Chardev] = Container()
        self.graph = BlockGraph(self.objects)
        self.exports = ExportRegistry(self)
        self.jobs = JobRegistry(self.emit_event)
        for name, container in (("objects", self.objects), ("chardevs", self.chardevs),
                                ("backend", Container()), ("audiodevs", Container())):
            self.qom_root.add_child(name, container)
        self.monitors: list[EventSink] = []
        self.unnamed_monitors = 0     # how QEMU numbers compat_monitorN
        self.nbd_server: NbdServer | None = None
        self._shutdown_requested = asyncio.Event()
        # False once quit ran: monitors answer nothing after it, as in QEMU.
        self.accepting_commands = True
        # QMP commands being executed: shutdown lets them finish first, so that an export
        # being added or deleted is not left half made (mounted, but in no list).
        self.running_commands: set[asyncio.Task[Any]] = set()
        block_events.set_sink(self.emit_event)

    @property
    def iothreads(self) -> dict[str, IOThread]:
        return {name: obj for name, obj in self.objects.items() if isinstance(obj, IOThread)}

    def start_monitors(self) -> None:
        """Like QEMU, monitors answer only once every command-line option was applied."""
        for chardev in self.chardevs.values():
            if chardev.frontend is not None:
                chardev.start()

    def emit_event(self, name: str, data: dict[str, object] | None = None) -> None:
        message = event_message(name, data)
        for monitor in self.monitors:
            monitor.emit(message)

    def request_shutdown(self) -> None:
        """quit or a signal; unlike qemu-system, the storage daemon sends no SHUTDOWN event."""
        self._shutdown_requested.set()

    async def wait_for_shutdown_request(self) -> None:
        await self._shutdown_requested.wait()

    async def close_exports(self) -> None:
        await self.exports.close_all()

    async def shutdown(self) -> None:
        """Takes everything down. Each step runs even if one before it failed (that is a
        bug, and logged): a signal must always end the daemon and unmount its exports."""
        others = self.running_commands - {asyncio.current_task()}
        if others:
            await asyncio.wait(others, timeout=COMMAND_GRACE_SECONDS)
        for step in (self.close_exports, self.jobs.cancel_all, self._stop_nbd_server,
                     self.graph.close_all,
                     self._finalize_objects, self._close_chardevs):
            try:
                await step()
            except Exception:
                log.exception("shutdown: %s failed", step.__name__)

    async def _stop_nbd_server(self) -> None:
        if self.nbd_server is not None:
            server, self.nbd_server = self.nbd_server, None
            await server.stop()

    async def _finalize_objects(self) -> None:
        """Monitors stay to the end (they go with their chardevs)."""
        for name in reversed(list(self.objects)):
            obj: object = self.objects[name]
            if obj not in self.monitors:
                self.objects.remove_child(name).finalize()

    async def _close_chardevs(self) -> None:
        chardevs = [self.chardevs.remove_child(name) for name in list(self.chardevs)]
        self.monitors.clear()
        for chardev in chardevs:
            await chardev.close()
