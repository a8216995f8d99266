"""Maps QMP command names to their handlers.

Handlers register themselves with ``@command(name)`` when their module is imported;
``load_all`` imports every command module once so the dispatcher sees them all.
"""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from qsd.daemon import Daemon

Handler = Callable[["Daemon", Any], Awaitable[object]]
H = TypeVar("H", bound=Handler)

HANDLERS: dict[str, Handler] = {}

COMMAND_MODULES = (
    "control",
    "char",
    "qom",
    "job",
    "block_core",
    "block_export",
    "nbd",
    "transaction",
    "dirty_bitmap",
)


def command(name: str) -> Callable[[H], H]:
    def register(handler: H) -> H:
        if name in HANDLERS:
            raise RuntimeError(f"command {name!r} registered twice")
        HANDLERS[name] = handler
        return handler

    return register


def load_all() -> dict[str, Handler]:
    for module in COMMAND_MODULES:
        importlib.import_module(f"qsd.commands.{module}")
    return HANDLERS
