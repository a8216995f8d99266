"""The daemon's state and its orderly shutdown.

Everything a command can create lives here, so shutdown can take it apart in QEMU's order:
exports first (their events still reach the monitors), then the NBD server, block nodes,
the objects (iothreads stop), and last the monitors and their chardevs.
"""

from __future__ import annotations

import asyncio
from typing import Any

from qsd.block.graph import BlockGraph
from qsd.chardev import Chardev
from qsd.export.registry import ExportRegistry
from qsd.iothread import IOThread
from qsd.qmp.monitor import Monitor, event_message
from qsd.qom.model import Container


class Daemon:
    def __init__(self) -> None:
        self.graph = BlockGraph()
        self.exports = ExportRegistry(self)
        # The QOM tree: user-creatable objects live in /objects, by id.
        self.qom_root = Container()
        self.objects = Container()
        for name, container in (("objects", self.objects), ("chardevs", Container()),
                                ("backend", Container()), ("audiodevs", Container())):
            self.qom_root.add_child(name, container)
        self.chardevs: dict[str, Chardev] = {}
        self.monitors: list[Monitor] = []
        self.nbd_server: Any = None
        self._shutdown_requested = asyncio.Event()
        self._shutdown_announced = False

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

    def announce_shutdown(self, reason: str) -> None:
        """Sends QEMU's SHUTDOWN event once, before anything is taken down."""
        if not self._shutdown_announced:
            self._shutdown_announced = True
            self.emit_event("SHUTDOWN", {"guest": False, "reason": reason})

    def request_shutdown(self, reason: str) -> None:
        self.announce_shutdown(reason)
        self._shutdown_requested.set()

    async def wait_for_shutdown_request(self) -> None:
        await self._shutdown_requested.wait()

    async def close_exports(self) -> None:
        await self.exports.close_all()

    async def shutdown(self) -> None:
        await self.close_exports()
        if self.nbd_server is not None:
            await self.nbd_server.stop()
            self.nbd_server = None
        await self.graph.close_all()
        for name in reversed(list(self.objects)):
            self.objects.remove_child(name).finalize()
        for chardev in self.chardevs.values():
            await chardev.close()
        self.chardevs.clear()
        self.monitors.clear()
