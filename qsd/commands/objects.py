"""object-add / object-del; iothread is the one object type qsd creates so far."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from qsd.commands.registry import command
from qsd.errors import QMPError
from qsd.iothread import IOThread
from qsd.qapi.generated import ObjectDelArgs, ObjectOptions

if TYPE_CHECKING:
    from qsd.daemon import Daemon

_IDENTIFIER = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]*\Z")


@command("object-add")
async def object_add(daemon: Daemon, args: ObjectOptions) -> None:
    if not _IDENTIFIER.match(args.id):
        raise QMPError("Parameter 'id' expects an identifier")
    if args.id in daemon.iothreads:
        raise QMPError(f"attempt to add duplicate property '{args.id}' to object "
                       "(type 'container')")
    daemon.iothreads[args.id] = IOThread.from_options(args)


@command("object-del")
async def object_del(daemon: Daemon, args: ObjectDelArgs) -> None:
    iothread = daemon.iothreads.get(args.id)
    if iothread is None:
        raise QMPError(f"object '{args.id}' not found")
    if iothread.in_use():
        raise QMPError(f"object '{args.id}' is in use, can not be deleted")
    del daemon.iothreads[args.id]
    iothread.stop()
