"""The ``transaction`` command and the registry of its actions.

QEMU's qmp_transaction(): every action is done in turn ("prepare") and records how to
finish it (``commit``), how to undo it (``abort``) and what to release either way
(``clean``); when one fails, everything done so far is undone, newest first, and its
error is the reply.  Only when all succeeded are they committed.

An action is one typed handler registered with ``@action(kind)`` next to its command
(the dirty bitmap actions in dirty_bitmap.py, blockdev-snapshot in block_core.py); a
handler that starts a job takes ``steps.job_txn`` and registers with ``grouped=True``,
which is what ``completion-mode: grouped`` accepts.  The standalone commands run the same
handler through ``run_single``, so both paths share their checks and texts.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from qsd.block import drain
from qsd.commands.registry import command
from qsd.errors import QMPError
from qsd.job.core import JobTxn
from qsd.qapi.generated import TransactionArgs

if TYPE_CHECKING:
    from qsd.daemon import Daemon

Step = Callable[[], Awaitable[None] | None]


class Steps:
    """What the actions of one transaction recorded; ``job_txn`` is the job
    transaction of a grouped completion (None: each job completes on its own)."""

    def __init__(self, job_txn: JobTxn | None = None) -> None:
        self.job_txn = job_txn
        self._steps: list[tuple[Step | None, Step | None, Step | None]] = []

    def add(self, *, commit: Step | None = None, abort: Step | None = None,
            clean: Step | None = None) -> None:
        self._steps.append((commit, abort, clean))

    async def commit(self) -> None:
        """Commits, then cleans up, newest step first (QEMU's tran_commit walks its list
        from the head, where tran_add puts each step)."""
        steps, self._steps = self._steps[::-1], []
        for commit, _, _ in steps:
            await _call(commit)
        for _, _, clean in steps:
            await _call(clean)

    async def abort(self) -> None:
        steps, self._steps = self._steps[::-1], []
        for _, abort, _ in steps:
            await _call(abort)
        for _, _, clean in steps:
            await _call(clean)


async def _call(step: Step | None) -> None:
    if step is not None:
        result = step()
        if inspect.isawaitable(result):
            await result


Action = Callable[["Daemon", Any, Steps], Awaitable[None]]
A = TypeVar("A", bound=Action)

ACTIONS: dict[str, Action] = {}
GROUPED: set[str] = set()


def action(kind: str, *, grouped: bool = False) -> Callable[[A], A]:
    """Registers the handler of a TransactionAction ``kind``: awaited with the daemon,
    the action's ``data`` model and the transaction's Steps; it raises QMPError with
    QEMU's text to fail the transaction.  ``grouped``: the action starts jobs and
    joins ``steps.job_txn``."""
    def register(handler: A) -> A:
        if kind in ACTIONS:
            raise RuntimeError(f"transaction action {kind!r} registered twice")
        ACTIONS[kind] = handler
        if grouped:
            GROUPED.add(kind)
        return handler

    return register


async def run_single(daemon: Daemon, kind: str, data: Any) -> None:
    """A standalone command that is also an action: the action alone, committed."""
    steps = Steps()
    try:
        await ACTIONS[kind](daemon, data, steps)
    except BaseException:
        await steps.abort()
        raise
    await steps.commit()


def _kind(act: Any) -> str:
    return str(getattr(act.type, "value", act.type))


@command("transaction")
async def transaction(daemon: Daemon, args: TransactionArgs) -> None:
    mode = "individual"
    if args.properties is not None and args.properties.completion_mode is not None:
        mode = str(getattr(args.properties.completion_mode, "value",
                           args.properties.completion_mode))
    job_txn = None
    if mode != "individual":
        for act in args.actions:
            if _kind(act) not in GROUPED:
                raise QMPError(f"Action '{_kind(act)}' does not support transaction "
                               f"property completion-mode = {mode}")
        job_txn = JobTxn()
    # QEMU's bdrv_drain_all(): what was sent before the transaction is done first.
    graph = daemon.graph
    section = await drain.drained_begin(graph.lock, graph.opened_nodes())
    drain.drained_end(section)
    steps = Steps(job_txn)
    try:
        for act in args.actions:
            await ACTIONS[_kind(act)](daemon, getattr(act, "data", None), steps)
    except BaseException:
        await steps.abort()
        raise
    await steps.commit()


@action("abort")
async def abort_action(daemon: Daemon, data: Any, steps: Steps) -> None:
    raise QMPError("Transaction aborted using Abort action")
