"""Errors a user sees: the exception that becomes a QMP error reply or a command-line
error, and QEMU's error_report() for what only the daemon's stderr can tell."""

import sys


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


def error_report(message: str) -> None:
    """QEMU's error_report(): one line on stderr, where operators look; serving goes on."""
    print(f"qsd: {message}", file=sys.stderr, flush=True)
