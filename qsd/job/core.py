"""The job core: long-running operations with QEMU's job state machine (job.c).

A job is created in the main loop (by a QMP command), runs its ``run()`` coroutine in
its AioContext's loop and finishes in the main loop, where completion walks QEMU's
states: waiting, pending, concluded (and null once dismissed), or aborting and concluded
when it failed or was cancelled.  Every change of status is a ``JOB_STATUS_CHANGE``
event.  Jobs started together in a transaction (``JobTxn``) finish together: they wait
for each other, and one failure aborts them all.

Threads.  A job's state is shared by the main loop (commands, completion, drain) and the
loop its coroutine runs in.  ``job_lock`` (QEMU's job_mutex) guards it; statuses change
under it and their events are queued under it, so events leave in the order the
statuses changed, whichever thread changed them.  Nothing blocks while holding it.

The coroutine side is QEMU's: ``pause_point()`` is where a job stops while it is asked to
pause (status paused, or standby when it was ready), ``sleep_ns()`` and ``yield_()`` wait
until something enters the job again, and ``enter()`` does that from any thread.  A job
is ``busy`` from the moment it is entered until it waits again, which is what a drain of
its nodes polls.  An asyncio task cannot change loops, so when a job's nodes move to
another iothread only ``ctx`` follows them: the coroutine stays in the loop it started in
(requests to nodes may come from any loop), which stays alive while the job runs.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, ClassVar

from qsd.aio import AioContext, main_context
from qsd.errors import QMPError
from qsd.ids import id_wellformed
from qsd.iothread import iothread_of

log = logging.getLogger(__name__)

CREATED = "created"
RUNNING = "running"
PAUSED = "paused"
READY = "ready"
STANDBY = "standby"
WAITING = "waiting"
PENDING = "pending"
ABORTING = "aborting"
CONCLUDED = "concluded"
NULL = "null"

# QEMU's JobSTT: the statuses that may follow each status.
_NEXT: dict[str, frozenset[str]] = {
    "undefined": frozenset({CREATED}),
    CREATED: frozenset({RUNNING, ABORTING, NULL}),
    RUNNING: frozenset({PAUSED, READY, WAITING, ABORTING}),
    PAUSED: frozenset({RUNNING}),
    READY: frozenset({STANDBY, WAITING, ABORTING}),
    STANDBY: frozenset({READY}),
    WAITING: frozenset({PENDING, ABORTING}),
    PENDING: frozenset({ABORTING, CONCLUDED}),
    ABORTING: frozenset({ABORTING, CONCLUDED}),
    CONCLUDED: frozenset({NULL}),
    NULL: frozenset(),
}

_ACTIVE = frozenset({CREATED, RUNNING, PAUSED, READY, STANDBY})
# QEMU's JobVerbTable: the statuses in which each command verb is accepted.
_VERBS: dict[str, frozenset[str]] = {
    "cancel": _ACTIVE | {WAITING, PENDING},
    "pause": _ACTIVE,
    "resume": _ACTIVE,
    "set-speed": _ACTIVE,
    "complete": frozenset({READY, STANDBY}),
    "finalize": frozenset({PENDING}),
    "dismiss": frozenset({CONCLUDED}),
    "change": _ACTIVE,
}

_COMPLETED = frozenset({WAITING, PENDING, ABORTING, CONCLUDED, NULL})

# QEMU's job_mutex: guards the state of every job (reentrant: hooks run under it).
job_lock = threading.RLock()

EventSink = Callable[[str, dict[str, object]], None]


def _failure(exc: Exception) -> tuple[int, str]:
    """A failed run's return code and error text (QEMU's ret and errp)."""
    if isinstance(exc, QMPError):
        return -errno.EINVAL, exc.desc
    if isinstance(exc, OSError):
        code = exc.errno or errno.EIO
        return -code, exc.strerror or os.strerror(code)
    log.exception("job failed with an unexpected error")
    return -errno.EIO, f"internal error: {exc}"


class JobTxn:
    """Jobs that complete or abort together (QEMU's JobTxn); a job on its own gets one of
    its own.  Newest first, like QEMU's list."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []
        self.aborting = False


class JobRegistry:
    """Every job of the daemon by id, newest first (QEMU's global job list), and the
    ordered channel their events take to the monitors."""

    def __init__(self, sink: EventSink) -> None:
        self._jobs: list[Job] = []
        self._sink = sink
        self._events: collections.deque[tuple[str, dict[str, object]]] = collections.deque()

    def __iter__(self) -> Iterator[Job]:
        with job_lock:
            return iter(list(self._jobs))

    def get(self, job_id: str) -> Job | None:
        with job_lock:
            for job in self._jobs:
                if job.id == job_id:
                    return job
        return None

    def find(self, job_id: str) -> Job:
        """The job with this id, or QEMU's error for a QMP command naming none."""
        job = self.get(job_id)
        if job is None:
            raise QMPError("Job not found")
        return job

    def add(self, job: Job) -> None:
        with job_lock:
            self._jobs.insert(0, job)

    def remove(self, job: Job) -> None:
        with job_lock:
            if job in self._jobs:
                self._jobs.remove(job)

    def emit(self, name: str, data: dict[str, object]) -> None:
        """Queues an event (under ``job_lock``, in the order statuses change) and sends what
        is queued now from the main loop, or soon when another thread raised it."""
        self._events.append((name, data))
        main = main_context()
        if main.in_this_thread():
            self._flush()
        else:
            main.call_soon(self._flush)

    def _flush(self) -> None:
        while True:
            with job_lock:
                if not self._events:
                    return
                name, data = self._events.popleft()
            self._sink(name, data)

    async def cancel_all(self) -> None:
        """Cancels every job and waits for each to end (QEMU's job_cancel_sync_all, at
        shutdown): a concluded job is dismissed, a running one force-cancelled."""
        while True:
            with job_lock:
                if not self._jobs:
                    return
                job = self._jobs[0]
            await job.cancel_sync(force=True)


class Job:
    """One job; subclasses are the job drivers (QEMU's JobDriver callbacks as methods).

    A driver sets ``job_type`` (a QAPI JobType) and implements ``run``; the other hooks
    default to QEMU's absent callbacks.  Commands and completion run in the main loop;
    ``run`` runs in the loop of ``ctx``.
    """

    job_type: ClassVar[str] = ""
    # Whether job-complete applies (QEMU: the driver has a .complete callback).
    can_complete: ClassVar[bool] = False

    def __init__(self, jobs: JobRegistry, job_id: str | None, ctx: AioContext, *,
                 internal: bool = False, auto_finalize: bool = True,
                 auto_dismiss: bool = True, txn: JobTxn | None = None) -> None:
        """Checks the id in QEMU's order and adds the job, created; a driver that fails
        to set itself up afterwards calls ``early_fail()``."""
        if job_id is not None:
            if internal:
                raise QMPError("Cannot specify job ID for internal job")
            if not id_wellformed(job_id):
                raise QMPError(f"Invalid job ID '{job_id}'")
            if jobs.get(job_id) is not None:
                raise QMPError(f"Job ID '{job_id}' already in use")
        elif not internal:
            raise QMPError("An explicit job ID is required")
        self.jobs = jobs
        self.id = job_id
        self.ctx = ctx
        self.status = "undefined"
        self.busy = False
        self.paused = True
        self.pause_count = 1
        self.user_paused = False
        self.cancelled = False
        self.force_cancel = False
        self.deferred_to_main_loop = False
        self.auto_finalize = auto_finalize
        self.auto_dismiss = auto_dismiss
        self.ret = 0
        self.err: str | None = None
        self.progress_current = 0
        self.progress_total = 0
        # Called with the job's return code when it finalizes (QEMU's job->cb).
        self.completion_cb: Callable[[int], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None   # set once started
        self._wakeup: asyncio.Future[None] | None = None
        self._entered = False    # enter() woke the job; settle() lets it run
        self._timer: asyncio.TimerHandle | None = None
        self._runner: Any = None     # the running task or concurrent future
        with job_lock:
            self._transition(CREATED)
            jobs.add(self)
            self.txn: JobTxn | None = txn or JobTxn()
            self.txn.jobs.insert(0, self)

    # ---- the driver's part --------------------------------------------------------------

    async def run(self) -> None:
        """The job's work; raise QMPError or OSError to fail with that error."""
        raise NotImplementedError

    async def driver_pause(self) -> None:
        """At a pause point, before the job stops (QEMU's .pause: a mirror lets its
        copies in flight end)."""

    def driver_resume(self) -> None:
        """At a pause point, after the job stopped or found no need to (QEMU's .resume)."""

    def user_resume(self) -> None:
        """A user resumed the job, or cancelled it while it was paused."""

    def driver_cancel(self, force: bool) -> bool:
        """Whether a cancel request acts as a forced one (QEMU's .cancel); a job without
        a soft-cancel mode always is."""
        return True

    def driver_complete(self) -> None:
        """job-complete on a ready job (only with ``can_complete``); QMPError refuses."""

    async def prepare(self) -> int:
        """Before a transaction's jobs commit (main loop; it may do I/O, e.g. rewrite an
        image header): a negative errno aborts all of them."""
        return 0

    def commit(self) -> None:
        """The job (and its transaction) succeeded."""

    def abort(self) -> None:
        """The job failed or was cancelled, or another job in its transaction did."""

    async def clean(self) -> None:
        """After commit or abort (main loop; may change the graph, which drains)."""

    def free(self) -> None:
        """The job is gone (dismissed): release what it still holds."""

    # Notifications that block jobs turn into their events (QEMU's notifier lists).
    def on_ready(self) -> None:
        pass

    def on_pending(self) -> None:
        pass

    def on_finalize_cancelled(self) -> None:
        pass

    def on_finalize_completed(self) -> None:
        pass

    def on_idle(self) -> None:
        pass

    # ---- state -------------------------------------------------------------------------

    def _transition(self, status: str) -> None:
        old = self.status
        assert status in _NEXT[old], f"job {self.id}: {old} -> {status}"
        self.status = status
        if self.id is not None and status != old:
            self.jobs.emit("JOB_STATUS_CHANGE", {"id": self.id, "status": status})

    def apply_verb(self, verb: str) -> None:
        """QEMU's job_apply_verb(): may a command do ``verb`` in the current status?"""
        if self.status not in _VERBS[verb]:
            raise QMPError(f"Job '{self.id}' in state '{self.status}' cannot accept "
                           f"command verb '{verb}'")

    def is_completed(self) -> bool:
        return self.status in _COMPLETED

    def is_ready(self) -> bool:
        return self.status in (READY, STANDBY)

    def is_cancelled(self) -> bool:
        """Cancelled for good: a forced cancel (a soft one lets a mirror complete)."""
        return self.force_cancel

    def cancel_requested(self) -> bool:
        return self.cancelled

    def started(self) -> bool:
        return self._loop is not None

    def progress_update(self, done: int) -> None:
        self.progress_current += done

    def progress_set_remaining(self, remaining: int) -> None:
        self.progress_total = self.progress_current + remaining

    def progress_increase_remaining(self, delta: int) -> None:
        self.progress_total += delta

    def info(self) -> dict[str, object]:
        """QAPI JobInfo (query-jobs)."""
        with job_lock:
            info: dict[str, object] = {
                "id": self.id, "type": self.job_type, "status": self.status,
                "current-progress": self.progress_current,
                "total-progress": self.progress_total,
            }
            if self.err is not None:
                info["error"] = self.err
            return info

    # ---- entering and waiting (any thread / the job's loop) ------------------------------

    def enter(self, condition: Callable[[], bool] | None = None) -> None:
        """Wakes the job if it waits (QEMU's job_enter_cond); ``condition`` is checked
        under the lock first."""
        with job_lock:
            loop = self._loop
            if loop is None or self.deferred_to_main_loop or self.busy:
                return
            if condition is not None and not condition():
                return
            self.busy = True
            self._entered = True
        loop.call_soon_threadsafe(self._wake)

    async def settle(self) -> None:
        """After a command entered the job: a job of this loop runs on until it waits
        again before the command replies, as QEMU enters a job's coroutine at once (a
        resumed job's 'running' comes before the reply)."""
        with job_lock:
            entered, self._entered = self._entered, False
        if entered and self._loop is asyncio.get_running_loop():
            # One turn of the loop runs _wake, the next the job's step.
            await asyncio.sleep(0)
            await asyncio.sleep(0)

    def _wake(self) -> None:
        with job_lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            fut, self._wakeup = self._wakeup, None
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _timer_fired(self) -> None:
        with job_lock:
            self._timer = None
        self.enter()

    def _timer_pending(self) -> bool:
        return self._timer is not None

    def _prepare_yield(self, ns: int | None) -> asyncio.Future[None]:
        """Under the lock: the future the job then waits on, and the timer that enters
        it after ``ns`` nanoseconds (None: only enter() does)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._wakeup = fut
        if ns is not None:
            self._timer = loop.call_later(ns / 1e9, self._timer_fired)
        self.busy = False
        self.on_idle()
        return fut

    async def pause_point(self) -> None:
        """Stops here while the job is asked to pause (not once it is cancelled)."""
        with job_lock:
            if not self.pause_count or self.force_cancel:
                return
        await self.driver_pause()
        fut = None
        with job_lock:
            status = self.status
            if self.pause_count and not self.force_cancel:
                self._transition(STANDBY if status == READY else PAUSED)
                self.paused = True
                fut = self._prepare_yield(None)
        if fut is not None:
            await fut
            with job_lock:
                self.paused = False
                self._transition(status)
        self.driver_resume()

    async def yield_(self) -> None:
        """Waits until entered (e.g. by a completing request), then at a pause point."""
        fut = None
        with job_lock:
            if self.force_cancel:
                return
            if not self.pause_count:
                fut = self._prepare_yield(None)
        if fut is not None:
            await fut
        await self.pause_point()

    async def sleep_ns(self, ns: int) -> None:
        """Waits ``ns`` nanoseconds or until entered, then at a pause point."""
        fut = None
        with job_lock:
            if self.force_cancel:
                return
            if not self.pause_count:
                fut = self._prepare_yield(max(ns, 0))
        if fut is not None:
            await fut
        await self.pause_point()

    def transition_to_ready(self) -> None:
        """The job (a mirror) may be completed now."""
        with job_lock:
            self._transition(READY)
            self.on_ready()

    # ---- starting and running ------------------------------------------------------------

    async def start(self) -> None:
        """Runs the job (main loop).  In the main loop's own context the coroutine runs at
        once until it first waits, as QEMU enters it, so a job that fails before any I/O
        has concluded when the command that started it replies."""
        ctx = self.ctx
        with job_lock:
            assert not self.started() and self.paused
            self._loop = ctx.loop
            self.pause_count -= 1
            self.busy = True
            self.paused = False
            self._transition(RUNNING)
        if ctx is main_context():
            self._runner = asyncio.get_running_loop().create_task(self._co_entry())
            await asyncio.sleep(0)
        else:
            iothread = iothread_of(ctx)
            if iothread is not None:
                iothread.ref()
            self._runner = ctx.run(self._co_entry())
            if iothread is not None:
                self._runner.add_done_callback(lambda _: main_context().call_soon(
                    iothread.unref))

    async def _co_entry(self) -> None:
        await self.pause_point()
        ret, err = 0, None
        try:
            await self.run()
        except Exception as exc:
            ret, err = _failure(exc)
        with job_lock:
            self.ret = ret
            if err is not None and self.err is None:
                self.err = err
            self.deferred_to_main_loop = True
            self.busy = True
        main = main_context()
        if main.in_this_thread():
            await self._exit()
        else:
            main.call_soon(_spawn, self._exit())

    async def _exit(self) -> None:
        """The coroutine ended: complete the job in the main loop (QEMU's job_exit)."""
        with job_lock:
            self.busy = False
            self.on_idle()
        await self._completed()

    # ---- completion (main loop) -------------------------------------------------------------

    def _update_rc(self) -> None:
        with job_lock:
            if not self.ret and self.is_cancelled():
                self.ret = -errno.ECANCELED
            if self.ret:
                if self.err is None:
                    self.err = os.strerror(-self.ret)
                self._transition(ABORTING)

    async def _completed(self) -> None:
        assert not self.is_completed()
        self._update_rc()
        if self.ret:
            await self._txn_abort()
        else:
            await self._txn_success()

    def _txn_jobs(self) -> list[Job]:
        return list(self.txn.jobs) if self.txn is not None else []

    async def _txn_success(self) -> None:
        with job_lock:
            self._transition(WAITING)
        jobs = self._txn_jobs()
        if any(not job.is_completed() for job in jobs):
            return
        for job in jobs:
            with job_lock:
                job._transition(PENDING)
                if not job.auto_finalize:
                    job.on_pending()
        if all(job.auto_finalize for job in self._txn_jobs()):
            await self._do_finalize()

    async def _do_finalize(self) -> None:
        for job in self._txn_jobs():
            if await job._prepare():
                await self._txn_abort()
                return
        for job in self._txn_jobs():
            await job._finalize_single()

    async def _prepare(self) -> int:
        if self.ret == 0:
            self.ret = await self.prepare()
            self._update_rc()
        return self.ret

    async def _finalize_single(self) -> None:
        assert self.is_completed()
        self._update_rc()
        ret = self.ret
        if ret:
            self.abort()
        else:
            self.commit()
        await self.clean()
        if self.completion_cb is not None:
            self.completion_cb(ret)
        if self.started():
            if self.is_cancelled():
                self.on_finalize_cancelled()
            else:
                self.on_finalize_completed()
        self._txn_del()
        with job_lock:
            self._transition(CONCLUDED)
            dismiss = self.auto_dismiss or not self.started()
        if dismiss:
            self._do_dismiss()

    def _txn_del(self) -> None:
        with job_lock:
            if self.txn is not None:
                self.txn.jobs.remove(self)
                self.txn = None

    async def _txn_abort(self) -> None:
        """This job failed: every other job of its transaction is cancelled, waited for
        and finalized with it (QEMU's job_completed_txn_abort)."""
        txn = self.txn
        assert txn is not None
        if txn.aborting:
            return      # another job of the transaction handles everything
        txn.aborting = True
        for other in list(txn.jobs):
            if other is not self:
                other._cancel_async(True)
        while txn.jobs:
            other = txn.jobs[0]
            if not other.is_completed():
                await other.finish_sync(None)
            await other._finalize_single()

    def _do_dismiss(self) -> None:
        with job_lock:
            self.busy = False
            self.paused = False
            self.deferred_to_main_loop = True
        self._txn_del()
        with job_lock:
            self._transition(NULL)
        self.jobs.remove(self)
        self.free()

    def early_fail(self) -> None:
        """The driver could not set the job up: it goes away, created -> null."""
        assert self.status == CREATED
        self._do_dismiss()

    # ---- what commands do (main loop) --------------------------------------------------------

    def pause(self) -> None:
        """Asks the job to stop at its next pause point (nested, like QEMU's)."""
        with job_lock:
            self.pause_count += 1
            paused = self.paused
        if not paused:
            self.enter()

    def resume(self) -> None:
        with job_lock:
            assert self.pause_count > 0
            self.pause_count -= 1
            if self.pause_count:
                return
        self.enter(lambda: not self._timer_pending())

    def user_pause(self) -> None:
        self.apply_verb("pause")
        if self.user_paused:
            raise QMPError("Job is already paused")
        self.user_paused = True
        self.pause()

    def user_resume_command(self) -> None:
        if not self.user_paused or self.pause_count <= 0:
            raise QMPError("Can't resume a job that was not paused")
        self.apply_verb("resume")
        self.user_resume()
        self.user_paused = False
        self.resume()

    def _cancel_async(self, force: bool) -> None:
        force = self.driver_cancel(force)
        if self.user_paused:
            self.user_resume()
            with job_lock:
                self.user_paused = False
                self.pause_count -= 1
        with job_lock:
            if force or not self.deferred_to_main_loop:
                self.cancelled = True
                self.force_cancel |= force

    async def cancel(self, force: bool) -> None:
        """QEMU's job_cancel(): a concluded job is dismissed; one that never started
        completes (cancelled) at once; a running one stops at its next chance."""
        if self.status == CONCLUDED:
            self._do_dismiss()
            return
        self._cancel_async(force)
        if not self.started():
            await self._completed()
        elif self.deferred_to_main_loop:
            if self.is_cancelled():
                await self._txn_abort()
        else:
            self.enter()

    async def user_cancel(self, force: bool) -> None:
        self.apply_verb("cancel")
        await self.cancel(force)

    def complete(self) -> None:
        self.apply_verb("complete")
        if self.cancel_requested() or not self.can_complete:
            raise QMPError(f"The active block job '{self.id}' cannot be completed")
        self.driver_complete()

    async def finalize(self) -> None:
        self.apply_verb("finalize")
        await self._do_finalize()

    def dismiss(self) -> None:
        self.apply_verb("dismiss")
        self._do_dismiss()

    async def finish_sync(self, finish: Callable[[], Coroutine[Any, Any, None]] | None
                          ) -> int:
        """Runs ``finish`` and waits until the job completed (QEMU's job_finish_sync):
        its return code, -ECANCELED if it was cancelled without an error of its own."""
        if finish is not None:
            await finish()
        delay = 0.0
        while not self.is_completed():
            self.enter()
            await asyncio.sleep(delay)
            delay = min(0.002, delay * 2 + 0.00005)
        if self.is_cancelled() and self.ret == 0:
            return -errno.ECANCELED
        return self.ret

    async def cancel_sync(self, force: bool) -> int:
        return await self.finish_sync(lambda: self.cancel(force))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id!r} {self.status}>"


_background: set[asyncio.Task[None]] = set()


def _spawn(coro: Coroutine[Any, Any, None]) -> None:
    """Runs a job's completion as a task of the main loop, referenced until done."""
    task = asyncio.get_running_loop().create_task(coro)
    _background.add(task)
    task.add_done_callback(_background.discard)
