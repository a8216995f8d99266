"""Turns one QMP request object into one reply, with QEMU's checks in QEMU's order."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from qsd import qapi
from qsd.commands.registry import HANDLERS
from qsd.errors import QMPError
from qsd.qmp.encode import qdict_order

if TYPE_CHECKING:
    from qsd.daemon import Daemon

log = logging.getLogger(__name__)

NEGOTIATION_HINT = "Expecting capabilities negotiation with 'qmp_capabilities'"


class Request:
    """A request that passed the envelope checks and is ready to run."""

    def __init__(self, command: str, arguments: dict[str, object], oob: bool) -> None:
        self.command = command
        self.arguments = arguments
        self.oob = oob


def check_envelope(message: object, oob_enabled: bool) -> Request:
    """Validates the request's own members (QEMU visits them in QDict order)."""
    if not isinstance(message, dict):
        raise QMPError("QMP input must be a JSON object")
    for key in qdict_order(message):
        value = message[key]
        if key == "execute" or (key == "exec-oob" and oob_enabled):
            if not isinstance(value, str):
                raise QMPError(f"QMP input member '{key}' must be a string")
        elif key == "arguments":
            if not isinstance(value, dict):
                raise QMPError("QMP input member 'arguments' must be an object")
        elif key != "id":
            raise QMPError(f"QMP input member '{key}' is unexpected")
    if "execute" in message and "exec-oob" in message:
        raise QMPError("QMP input member 'execute' clashes with 'exec-oob'")
    oob = "exec-oob" in message
    command = message.get("exec-oob" if oob else "execute")
    if not isinstance(command, str):
        raise QMPError("QMP input lacks member 'execute'")
    arguments = message.get("arguments", {})
    assert isinstance(arguments, dict)
    return Request(command, arguments, oob)


async def run_command(daemon: Daemon, request: Request, negotiated: bool) -> object:
    """Looks the command up, validates its arguments and runs its handler."""
    handler = HANDLERS.get(request.command)
    info = qapi.command_info(request.command)
    if not negotiated and request.command != "qmp_capabilities":
        handler = None
    if handler is None or info is None:
        if not negotiated:
            raise QMPError(NEGOTIATION_HINT, "CommandNotFound")
        raise QMPError(f"The command {request.command} has not been found", "CommandNotFound")
    if request.oob and not info.allow_oob:
        raise QMPError(f"The command {request.command} does not support OOB")
    args = qapi.parse_command_args(request.command, request.arguments)
    task = asyncio.current_task()
    if task is not None:
        daemon.running_commands.add(task)
    try:
        result = await handler(daemon, args)
    except QMPError:
        raise
    except Exception as exc:  # a handler bug must not end the monitor
        log.exception("command %s failed", request.command)
        raise QMPError(f"internal error in {request.command}: {exc}") from exc
    finally:
        daemon.running_commands.discard(task)
    return {} if result is None else result


def reply(message: object, result: object = None,
          error: QMPError | None = None) -> dict[str, object]:
    """The reply object; ``id`` is echoed whenever the request was an object carrying one."""
    response: dict[str, object] = {}
    if error is not None:
        response["error"] = error.to_qmp()
    else:
        response["return"] = result
    if isinstance(message, dict) and "id" in message:
        response["id"] = message["id"]
    return response
