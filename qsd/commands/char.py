"""chardev-add, chardev-remove, query-chardev."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qsd.chardev.builder import create_chardev
from qsd.commands.registry import command
from qsd.errors import QMPError
from qsd.qapi.generated import ChardevAddArgs, ChardevRemoveArgs

if TYPE_CHECKING:
    from qsd.daemon import Daemon


@command("chardev-add")
async def chardev_add(daemon: Daemon, args: ChardevAddArgs) -> None:
    if args.id in daemon.chardevs:
        raise QMPError(f"Chardev with id '{args.id}' already exists")
    try:
        chardev = await create_chardev(args.id, args.backend,
                                       objects=daemon.objects)
        if args.id in daemon.chardevs:  # added meanwhile, while this one waited for a client
            await chardev.close()
            raise QMPError(f"attempt to add duplicate property '{args.id}' to object "
                           "(type 'container')")
    except QMPError as exc:
        raise QMPError(f"Failed to add chardev '{args.id}': {exc.desc}") from None
    daemon.chardevs.add_child(args.id, chardev)


@command("chardev-remove")
async def chardev_remove(daemon: Daemon, args: ChardevRemoveArgs) -> None:
    chardev = daemon.chardevs.get(args.id)
    if chardev is None:
        raise QMPError(f"Chardev '{args.id}' not found")
    if chardev.frontend is not None:
        raise QMPError(f"Chardev '{args.id}' is busy")
    daemon.chardevs.remove_child(args.id)
    await chardev.close()


@command("query-chardev")
async def query_chardev(daemon: Daemon, args: None) -> list[dict[str, object]]:
    """QEMU builds the list by prepending while it walks /chardevs: the reverse of the
    container's order."""
    names = [name for name, _ in daemon.chardevs.qom_children()]
    return [{"label": name, "filename": daemon.chardevs[name].filename(),
             "frontend-open": daemon.chardevs[name].frontend is not None}
            for name in reversed(names)]
