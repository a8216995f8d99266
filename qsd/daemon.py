"""The daemon's state and its orderly shutdown.

Everything a command can create lives here, so shutdown can take it apart in QEMU's order:
exports first (their events still reach the monitors), then the NBD server, block nodes,
iothreads, and last the monitors and their chardevs.
"""

from __future__ import annotations

import asyncio
from collections import ChainMap
from collections.abc import Mapping
from typing import Any, cast

from qsd.block.graph import BlockGraph
from qsd.chardev import Chardev
from qsd.export.registry import ExportRegistry
from qsd.iothread import IOThread
from qsd.qmp.monitor import Monitor, event_message


class Daemon:
    def __init__(self) -> None:
        self.graph = BlockGraph()
        self.exports = ExportRegistry(self)
        self.iothreads: dict[str, IOThread] = {}
        # Every other user-creatable object (secrets, TLS credentials, authz), by id;
        # ids are one namespace with the iothreads'.
        self.objects: dict[str, object] = {}
        self.all_objects: Mapping[str, object] = ChainMap(
            self.objects, cast("dict[str, object]", self.iothreads))
        self.chardevs: dict[str, Chardev] = {}
        self.monitors: list[Monitor] = []
        self.nbd_server: Any = None
        self._shutdown_requested = asyncio.Event()
        self._shutdown_announced = False

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
        for iothread in self.iothreads.values():
            iothread.stop()
        self.iothreads.clear()
        for chardev in self.chardevs.values():
            await chardev.close()
        self.chardevs.clear()
        self.monitors.clear()
