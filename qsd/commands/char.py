"""chardev-add, chardev-remove, query-chardev."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qsd.chardev import Chardev, NullChardev, SocketChardev, SocketSpec, StdioChardev
from qsd.commands.registry import command
from qsd.errors import QMPError
from qsd.qapi.generated import ChardevAddArgs, ChardevRemoveArgs

if TYPE_CHECKING:
    from qsd.daemon import Daemon


def socket_spec_from_legacy(addr: Any, server: bool, wait: bool) -> SocketSpec:
    """A SocketAddressLegacy (``{"type": ..., "data": {...}}``) as a SocketSpec."""
    kind = getattr(addr.type, "value", addr.type)
    data = addr.data.data if hasattr(addr.data, "data") else addr.data
    if kind == "unix":
        return SocketSpec("unix", path=data.path, server=server, wait=wait)
    if kind == "inet":
        return SocketSpec("inet", host=data.host, port=data.port, server=server, wait=wait)
    if kind == "fd":
        return SocketSpec("fd", fd=data.str, server=server, wait=wait)
    raise QMPError(f"socket address type '{kind}' is not supported")


def chardev_from_backend(chardev_id: str, backend: Any) -> Chardev:
    kind = getattr(backend.type, "value", backend.type)
    if kind == "socket":
        sock = backend.data
        server = True if sock.server is None else bool(sock.server)
        wait = server if sock.wait is None else bool(sock.wait)
        return SocketChardev(chardev_id, socket_spec_from_legacy(sock.addr, server, wait))
    if kind == "stdio":
        return StdioChardev(chardev_id)
    if kind == "null":
        return NullChardev(chardev_id)
    raise QMPError(f"chardev backend '{kind}' is not supported")


async def add_chardev(daemon: Daemon, chardev: Chardev) -> None:
    if chardev.id in daemon.chardevs:
        raise QMPError(f"Chardev with id '{chardev.id}' already exists")
    await chardev.open()
    daemon.chardevs[chardev.id] = chardev


@command("chardev-add")
async def chardev_add(daemon: Daemon, args: ChardevAddArgs) -> None:
    await add_chardev(daemon, chardev_from_backend(args.id, args.backend))


@command("chardev-remove")
async def chardev_remove(daemon: Daemon, args: ChardevRemoveArgs) -> None:
    chardev = daemon.chardevs.get(args.id)
    if chardev is None:
        raise QMPError(f"Chardev '{args.id}' not found")
    if chardev.frontend is not None:
        raise QMPError(f"Chardev '{args.id}' is busy")
    del daemon.chardevs[args.id]
    await chardev.close()


@command("query-chardev")
async def query_chardev(daemon: Daemon, args: None) -> list[dict[str, object]]:
    return [{"label": c.id, "filename": c.filename(), "frontend-open": c.frontend is not None}
            for c in daemon.chardevs.values()]
