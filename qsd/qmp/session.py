"""The QMP session a command is running for, if any: QEMU's ``cur_mon``.

The monitor sets it around each command it runs. ``qmp_capabilities`` negotiates on it,
and lower layers that must tell a QMP command from the command line ask
``in_monitor_command()`` (a socket address naming a file descriptor is one: QEMU's
daemon resolves those only on its command line).
"""

from __future__ import annotations

import contextvars
from typing import Protocol


class Session(Protocol):
    def negotiate(self, enable: list[str]) -> None:
        """qmp_capabilities: leaves capabilities negotiation mode, enabling ``enable``."""


current_session: contextvars.ContextVar[Session] = contextvars.ContextVar("current_session")


def in_monitor_command() -> bool:
    return current_session.get(None) is not None
