"""The NBD server: listening sockets, connection limit, handshake, hand-off to exports.

Like QEMU's ``blockdev-nbd.c`` there is one server per daemon. Accepting and the option
phase run on the main loop; a client that reaches the transmission phase moves to its
export's AioContext, where ``transmission.NbdClient`` serves it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from qsd.errors import error_report
from qsd.nbd.handshake import Negotiated, Negotiation, NegotiationError, TlsPolicy
from qsd.nbd.transmission import NbdClient
from qsd.sockets import Listener

if TYPE_CHECKING:
    from qsd.aio import AioContext
    from qsd.block.dirty_bitmap import DirtyBitmap
    from qsd.qapi.generated import SocketAddress


class ServedExport:
    """What the NBD server knows of one export: its handshake data, backend and clients.

    The export driver (``qsd.export.nbd``) creates it and registers it by name; the
    drain hooks here are what it installs with ``blk.set_dev_ops``, and
    ``aio_context_changed`` what it registers for moves of the node to another iothread:
    new clients are then served in the new context and connected ones move there.
    """

    def __init__(self, name: str, description: str | None, size: int, nbdflags: int,
                 allocation_depth: bool, blk: Any, ctx: AioContext,
                 bitmaps: list[tuple[str, DirtyBitmap]] | None = None) -> None:
        self.name = name
        self.description = description
        self.size = size
        self.nbdflags = nbdflags
        self.allocation_depth = allocation_depth
        # The exported dirty bitmaps and the names their contexts carry.
        self.bitmap_names = [name for name, _ in bitmaps or ()]
        self.bitmaps = [bitmap for _, bitmap in bitmaps or ()]
        self.blk = blk
        self.ctx = ctx
        self.closed = False
        # Touched from the export's loop (attach) and the main loop (everything else).
        self._lock = threading.Lock()
        self._clients: list[NbdClient] = []
        self._pending = 0  # negotiated, on their way to the export's context
        # Main loop: a move of the clients and closing them never interleave.
        self._switching = asyncio.Lock()

    def clients(self) -> list[NbdClient]:
        with self._lock:
            return list(self._clients)

    def in_use(self) -> bool:
        """A client that has said goodbye (or failed) with nothing in flight no longer
        counts: QEMU lets go of it as it reads NBD_CMD_DISC, so an export may be deleted
        the moment its client has exited, whichever socket the loop serves first."""
        with self._lock:
            return any(not c.gone() for c in self._clients) or self._pending > 0

    def reserve(self) -> bool:
        """Counts a just-negotiated client as a user; False if the export is closing."""
        with self._lock:
            if self.closed:
                return False
            self._pending += 1
            return True

    def drained_begin(self) -> None:
        for client in self.clients():
            client.quiesce()

    def drained_end(self) -> None:
        for client in self.clients():
            client.unquiesce()

    def drained_poll(self) -> bool:
        return any(client.inflight for client in self.clients())

    async def aio_context_changed(self, ctx: AioContext) -> None:
        """The node moved to ``ctx`` (main loop, node drained): so do the clients.

        New clients go to ``ctx`` from now on; those still on their way are waited for,
        then every connected client leaves its loop and is adopted by ``ctx``'s.
        """
        async with self._switching:
            self.ctx = ctx
            while self.pending():
                await asyncio.sleep(0.001)
            for client in self.clients():
                if client.ctx is not ctx:
                    sock = await client.ctx.call(client.detach())
                    if sock is not None:
                        await ctx.call(client.adopt(ctx, sock))

    def pending(self) -> int:
        with self._lock:
            return self._pending

    async def attach(self, ctx: AioContext, sock: socket.socket,
                     negotiated: Negotiated[ServedExport],
                     on_finished: Callable[[NbdClient], None]) -> None:
        """Runs in ``ctx``, the export's context: starts serving a negotiated client."""
        loop = asyncio.get_running_loop()
        client = NbdClient(self, ctx, negotiated.mode, negotiated.contexts, on_finished)
        if negotiated.channel is not None:
            from qsd.nbd.tls import TlsTransport  # loaded by the handshake already

            client.carrier = TlsTransport(negotiated.channel, client)
        protocol = client.carrier
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock)
        except BaseException:
            with self._lock:
                self._pending -= 1
            sock.close()
            on_finished(client)
            raise
        with self._lock:
            self._pending -= 1
            if not self.closed:
                self._clients.append(client)
                return
        transport.abort()

    def forget(self, client: NbdClient) -> None:
        with self._lock:
            if client in self._clients:
                self._clients.remove(client)

    async def close(self) -> None:
        """Drops every client (QEMU's client_close) and waits until their requests end."""
        async with self._switching:
            with self._lock:
                self.closed = True
                clients = list(self._clients)
            # Each in its own loop: one that was closing when the node moved stayed.
            for ctx in {id(c.ctx): c.ctx for c in clients}.values():
                await ctx.call(_abort_all([c for c in clients if c.ctx is ctx]))


async def _abort_all(clients: list[NbdClient]) -> None:
    for client in clients:
        client.abort()
    await asyncio.gather(*(client.finished for client in clients))


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class NbdServer:
    """The daemon's NBD server (``daemon.nbd_server``)."""

    def __init__(self, addr: SocketAddress, max_connections: int, handshake_max_seconds: int
                 ) -> None:
        self.tls: TlsPolicy | None = None
        self.max_connections = max_connections
        self.handshake_max_seconds = handshake_max_seconds
        self.exports: dict[str, ServedExport] = {}
        self._listener = Listener.open(addr, socket.SOMAXCONN)
        self._loop = asyncio.get_running_loop()
        self._connections = 0
        self._handshakes: set[asyncio.Task[None]] = set()
        self._update_watch()

    def can_multi_conn(self) -> bool:
        """QEMU advertises multi-conn unless the server allows a single connection."""
        return self.max_connections != 1

    def _update_watch(self) -> None:
        """Accepts only below max-connections, as QEMU's nbd_update_server_watch()."""
        if not self.max_connections or self._connections < self.max_connections:
            self._listener.set_client_func(self._accepted)
        else:
            self._listener.set_client_func(None)

    def _accepted(self, sock: socket.socket) -> None:
        self._connections += 1
        self._update_watch()
        task = self._loop.create_task(self._serve(sock))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def _connection_closed(self) -> None:
        self._connections -= 1
        self._update_watch()

    async def _serve(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        negotiated: Negotiated[ServedExport] | None = None
        attaching = False
        timer = None
        if self.handshake_max_seconds:
            # Like QEMU's handshake timer: shutting the socket down fails the negotiation.
            timer = self._loop.call_later(self.handshake_max_seconds, _shutdown, sock)
        try:
            try:
                negotiated = await Negotiation(sock, self.exports, self.tls).run()
            except NegotiationError as exc:
                error_report(f"option negotiation failed: {exc}")
            finally:
                if timer is not None:
                    timer.cancel()
            # No await between the final reply and reserve(): a QMP command cannot see
            # a client that has its export but does not count as using it.
            if negotiated is None or not negotiated.export.reserve():
                sock.close()
                self._connection_closed()
                return
            export = negotiated.export
            main = asyncio.get_running_loop()

            def finished(client: NbdClient) -> None:
                main.call_soon_threadsafe(self._client_finished, export, client)

            attaching = True
            ctx = export.ctx
            await ctx.call(export.attach(ctx, sock, negotiated, finished))
        except asyncio.CancelledError:
            if not attaching:  # once attached, the client's own close accounts for it
                sock.close()
                self._connection_closed()
            raise

    def _client_finished(self, export: ServedExport, client: NbdClient) -> None:
        export.forget(client)
        self._connection_closed()

    async def stop(self) -> None:
        """Closes the listener (its unix socket file goes too) and drops connections
        still negotiating."""
        self._listener.close()
        for task in list(self._handshakes):
            task.cancel()
        await asyncio.gather(*self._handshakes, return_exceptions=True)
