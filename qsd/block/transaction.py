"""Transaction: a graph change made of steps that all take effect or are all undone.

QEMU's ``Transaction`` (util/transactions.c): each step is done at once and records how
to undo it (``abort``) and what to finish once everything succeeded (``commit``, e.g.
dropping image locks the new permissions no longer need).  Used as a context manager, it
commits when the block ends normally and aborts, newest step first, when it raises.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType


class Transaction:
    def __init__(self) -> None:
        self._steps: list[tuple[Callable[[], None] | None, Callable[[], None] | None]] = []

    def add(self, *, abort: Callable[[], None] | None = None,
            commit: Callable[[], None] | None = None) -> None:
        self._steps.append((abort, commit))

    def commit(self) -> None:
        steps, self._steps = self._steps, []
        for _, commit in steps:
            if commit is not None:
                commit()

    def abort(self) -> None:
        steps, self._steps = self._steps, []
        for abort, _ in reversed(steps):
            if abort is not None:
                abort()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()
