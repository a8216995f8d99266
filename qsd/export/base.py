"""The driver-independent part of a block export, and what it needs from the daemon."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

if TYPE_CHECKING:
    from qsd.aio import AioContext
    from qsd.block.backend import BlockBackend
    from qsd.block.graph import BlockGraph
    from qsd.iothread import IOThread
    from qsd.nbd.server import NbdServer


class ExportHost(Protocol):
    """The daemon as exports see it (``qsd.daemon.Daemon`` is one): exports sit below the
    daemon, which holds them, so they know it only by this description."""

    @property
    def graph(self) -> BlockGraph: ...

    @property
    def iothreads(self) -> Mapping[str, IOThread]: ...

    @property
    def nbd_server(self) -> NbdServer | None: ...

    def emit_event(self, name: str, data: dict[str, object] | None = None) -> None: ...


class BlockExport:
    """One export: its id, its BlockBackend and the driver's serving machinery.

    The registry (registry.py) performs every check common to all export types and owns
    the lifecycle; a driver only knows how to serve and how to stop serving.
    """

    type: ClassVar[str]
    supports_multithread: ClassVar[bool] = False
    # QEMU's vhost-user-blk export stops its server inside block-export-del (a nested
    # event loop that also runs the deletion), so there the event precedes the reply.
    deleted_before_reply: ClassVar[bool] = False

    def __init__(self, daemon: ExportHost, export_id: str, node_name: str, blk: BlockBackend,
                 contexts: list[AioContext]) -> None:
        self.daemon = daemon
        self.id = export_id
        self.node_name = node_name
        self.blk = blk
        self.contexts = contexts
        self.shutting_down = False

    @classmethod
    def extra_perm(cls, opts: Any) -> int:
        """Permissions beyond read (and write when writable) that this type needs."""
        return 0

    @classmethod
    async def create(cls, daemon: ExportHost, opts: Any, blk: BlockBackend,
                     contexts: list[AioContext]) -> BlockExport:
        """Starts serving; on failure everything acquired so far is released."""
        raise NotImplementedError

    def in_use(self) -> bool:
        """True while clients are connected (``mode=safe`` deletion refuses then)."""
        return False

    async def shutdown(self) -> None:
        """Stops serving and drops clients; releases mounts, fds and sockets."""
        raise NotImplementedError
