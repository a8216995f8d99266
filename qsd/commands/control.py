"""Monitor control: negotiation, version, introspection, quit."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import qsd
from qsd import qapi
from qsd.commands.registry import HANDLERS, command
from qsd.qapi.generated import QmpCapabilitiesArgs
from qsd.qmp.session import current_session

if TYPE_CHECKING:
    from qsd.daemon import Daemon


@command("qmp_capabilities")
async def qmp_capabilities(daemon: Daemon, args: QmpCapabilitiesArgs) -> None:
    enable = [cap.value for cap in args.enable or []]
    current_session.get().negotiate(enable)


@command("query-version")
async def query_version(daemon: Daemon, args: None) -> dict[str, object]:
    major, minor, micro = qsd.QEMU_VERSION
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": qsd.PACKAGE}


@command("query-commands")
async def query_commands(daemon: Daemon, args: None) -> list[dict[str, str]]:
    # QEMU builds this list by prepending, so it comes out in reverse schema order.
    names = [name for name in qapi.command_names() if name in HANDLERS]
    return [{"name": name} for name in reversed(names)]


@command("query-qmp-schema")
async def query_qmp_schema(daemon: Daemon, args: None) -> list[dict[str, object]]:
    return qapi.schema_introspection()


@command("quit")
async def quit_(daemon: Daemon, args: None) -> None:
    # QEMU's daemon deletes its exports and cancels its jobs (sending their events) before
    # the reply goes out, and answers nothing after it, not even requests that came in the
    # same write.
    daemon.accepting_commands = False
    await daemon.close_exports()
    await daemon.jobs.cancel_all()
    asyncio.get_running_loop().call_soon(daemon.request_shutdown)
