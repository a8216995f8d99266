"""Events that block nodes raise (BLOCK_IMAGE_CORRUPTED), delivered by the daemon.

Drivers run in any thread; the daemon installs its sink once and events reach the
monitors from the main loop, in the order they were raised.
"""

from __future__ import annotations

from collections.abc import Callable

from qsd.aio import main_context

Sink = Callable[[str, dict[str, object]], None]

_sink: Sink | None = None


def set_sink(sink: Sink | None) -> None:
    global _sink
    _sink = sink


def emit(name: str, data: dict[str, object]) -> None:
    sink = _sink
    if sink is not None:
        main_context().call_soon(sink, name, data)
