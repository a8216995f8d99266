"""nbd-server-start/-stop, the deprecated nbd-server-add/-remove, and ``--nbd-server``.

Texts and order of checks are QEMU's ``blockdev-nbd.c``: the listener opens before the
TLS credentials are looked up, and stopping the server first deletes every NBD export.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd import qapi
from qsd.commands.registry import command
from qsd.errors import QMPError
from qsd.nbd.protocol import NBD_DEFAULT_HANDSHAKE_MAX_SECS, NBD_DEFAULT_MAX_CONNECTIONS
from qsd.qapi.generated import (
    NbdServerAddOptions,
    NbdServerOptions,
    NbdServerOptionsBase,
    NbdServerRemoveArgs,
    NbdServerStartArgs,
    SocketAddress,
)
from qsd.sockets import flatten

if TYPE_CHECKING:
    from qsd.daemon import Daemon


async def _start(daemon: Daemon, addr: SocketAddress, args: NbdServerOptionsBase) -> None:
    if daemon.nbd_server is not None:
        raise QMPError("NBD server already running")
    from qsd.nbd.handshake import TlsPolicy  # the NBD server loads when it first starts
    from qsd.nbd.server import NbdServer
    max_connections = args.max_connections
    handshake = args.handshake_max_seconds
    server = NbdServer(
        addr,
        NBD_DEFAULT_MAX_CONNECTIONS if max_connections is None else max_connections,
        NBD_DEFAULT_HANDSHAKE_MAX_SECS if handshake is None else handshake)
    if args.tls_creds is not None:
        from qsd.crypto.tlscreds import find_tls_creds  # only TLS needs cryptography
        try:
            creds = find_tls_creds(daemon.objects, args.tls_creds, server=True)
        except QMPError:
            await server.stop()
            raise
        # The server keeps these credentials even if object-del removes their id, as
        # QEMU's server keeps its reference.
        server.tls = TlsPolicy(creds, args.tls_authz, daemon.objects)
    daemon.nbd_server = server


async def nbd_server_start_options(daemon: Daemon, opts: NbdServerOptions) -> None:
    """``--nbd-server``: the same as nbd-server-start with a flat SocketAddress."""
    await _start(daemon, opts.addr, opts)


@command("nbd-server-start")
async def nbd_server_start(daemon: Daemon, args: NbdServerStartArgs) -> None:
    await _start(daemon, flatten(args.addr), args)


@command("nbd-server-stop")
async def nbd_server_stop(daemon: Daemon, args: None) -> None:
    server = daemon.nbd_server
    if server is None:
        raise QMPError("NBD server not running")
    await daemon.exports.close_all("nbd")
    await server.stop()
    daemon.nbd_server = None


@command("nbd-server-add")
async def nbd_server_add(daemon: Daemon, args: NbdServerAddOptions) -> None:
    node = daemon.graph.find_node(args.device)
    if node is None:
        raise QMPError(f"Cannot find device='{args.device}' nor node-name='{args.device}'")
    name = args.device if args.name is None else args.name
    opts: dict[str, Any] = {
        "type": "nbd",
        "id": name,
        "node-name": args.device,
        "name": name,
        # nbd-server-add quietly downgrades a read-only node instead of failing.
        "writable": bool(args.writable) and not node.read_only,
    }
    if args.description is not None:
        opts["description"] = args.description
    if args.bitmap is not None:
        opts["bitmaps"] = [args.bitmap]
    await daemon.exports.add(qapi.parse_type("BlockExportOptions", opts))


@command("nbd-server-remove")
async def nbd_server_remove(daemon: Daemon, args: NbdServerRemoveArgs) -> None:
    exp = daemon.exports.find(args.name)
    if exp is not None and exp.type != "nbd":
        raise QMPError(f"Block export '{args.name}' is not an NBD export")
    await daemon.exports.delete(args.name, "safe" if args.mode is None else args.mode.value)
