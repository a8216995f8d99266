"""Errors a user sees: the exception that becomes a QMP error reply or a command-line
error, and QEMU's error_report()/warn_report()/info_report() for what only the daemon's
stderr can tell.

Each report line starts with the program name and, while a command-line option is being
applied, with that option, as QEMU's "current location" does:
``qsd: --chardev socket,...: info: QEMU waiting for connection on: ...``.  Only the task
applying the option reports with its location: what the option sets going in the
background (a listener, a reconnecting client) reports later without one, as in QEMU,
where such work runs from the main loop once the command line is done.
"""

import asyncio
import contextlib
import sys
from collections.abc import Iterator


class QMPError(Exception):
    """An error a user sees: QEMU's error class and its human-readable text.

    ``hint`` is QEMU's ``error_append_hint()``: extra lines the command line prints after
    the message and QMP never sends.
    """

    def __init__(self, desc: str, error_class: str = "GenericError",
                 hint: str | None = None) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class
        self.hint = hint

    def to_qmp(self) -> dict[str, str]:
        return {"class": self.error_class, "desc": self.desc}


PROGRAM = "qsd"

# The option being applied and the task applying it.
_location: tuple[asyncio.Task[object] | None, str] | None = None


def _current_task() -> asyncio.Task[object] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:
        return None  # no loop running in this thread


@contextlib.contextmanager
def location(text: str) -> Iterator[None]:
    """Names the command-line option that messages inside the block belong to."""
    global _location
    previous, _location = _location, (_current_task(), text)
    try:
        yield
    finally:
        _location = previous


def _emit(message: str) -> None:
    where = None
    if _location is not None and _location[0] is _current_task():
        where = _location[1]
    prefix = f"{PROGRAM}: " if where is None else f"{PROGRAM}: {where}: "
    sys.stderr.write(prefix + message + "\n")
    sys.stderr.flush()


def error_report(message: str) -> None:
    """QEMU's error_report(): one line on stderr, where operators look; serving goes on."""
    _emit(message)


def warn_report(message: str) -> None:
    _emit("warning: " + message)


def info_report(message: str) -> None:
    _emit("info: " + message)


def print_hint(text: str) -> None:
    """A line QEMU prints after a message as is (error_printf(), error hints)."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
