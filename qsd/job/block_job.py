"""BlockJob: a job that works on block nodes (QEMU's blockjob.c).

A block job is a parent in the graph: it holds a child edge into every node it uses
(``add_node``: "main node" first), with the permissions it needs, so conflicts name it
("stream job 'j0'") and the graph's drains reach it: a drain pauses the job at its next
pause point and polls it until it got there (``busy``), the end of the drain resumes it.
It keeps a speed limit (``block-job-set-speed``: ``ratelimit_sleep`` between pieces of
work), an error policy (``error_action``: ``BLOCK_JOB_ERROR``, pausing on ``stop``) and
turns the job core's notifications into the BLOCK_JOB_* events.  A block job runs in
its main node's AioContext.

A job that uses a block job (mirror, stream, commit, backup) subclasses this, sets
``job_type`` and implements ``run`` with ``pause_point``/``ratelimit_sleep`` between its
pieces of work.
"""

from __future__ import annotations

import asyncio
import errno
from typing import TYPE_CHECKING

from qsd.block.node import BlockNode, Child, ChildParent
from qsd.block.permissions import ChildRole
from qsd.errors import QMPError
from qsd.job.core import Job, JobRegistry, JobTxn, job_lock
from qsd.job.ratelimit import SLICE_NS, RateLimit

if TYPE_CHECKING:
    from qsd.aio import AioContext
    from qsd.block.graph import BlockGraph


class BlockJob(Job, ChildParent):
    def __init__(self, jobs: JobRegistry, job_id: str | None, graph: BlockGraph,
                 node: BlockNode, perm: int, shared: int, *, speed: int = 0,
                 internal: bool = False, auto_finalize: bool = True,
                 auto_dismiss: bool = True, txn: JobTxn | None = None) -> None:
        """QEMU's block_job_create(): the job, its main node and its speed; on failure
        nothing is left (the job goes created -> null)."""
        if job_id is None and not internal:
            job_id = ""     # QEMU names it after the node's BlockBackend: none has a name
        super().__init__(jobs, job_id, node.ctx, internal=internal,
                         auto_finalize=auto_finalize, auto_dismiss=auto_dismiss, txn=txn)
        self.graph = graph
        self.nodes: list[Child] = []
        # Nodes the job cut out of a chain (stream, commit): closed once the job is
        # gone and nothing holds them any more.
        self.dropped: list[BlockNode] = []
        self.speed = 0
        self.limit = RateLimit()
        self.iostatus = "ok"
        try:
            self.main = self.add_node("main node", node, perm, shared)
            self.set_speed(speed)
        except QMPError:
            self.early_fail()
            raise

    # ---- nodes ------------------------------------------------------------------------------

    def add_node(self, name: str, node: BlockNode, perm: int, shared: int) -> Child:
        """Uses ``node`` with ``perm``, sharing ``shared``; QMPError on a conflict."""
        child = self.graph.attach_child(self, node, name, ChildRole(0), perm, shared)
        self.nodes.insert(0, child)
        return child

    def remove_all_nodes(self) -> None:
        """Gives up every node (a job whose work ended keeps them until it is freed)."""
        nodes, self.nodes = self.nodes, []
        for child in nodes:
            with self.graph.lock.write():
                self.graph.detach_child(child)

    def free(self) -> None:
        self.remove_all_nodes()
        if self.dropped:
            self.graph.keep(asyncio.get_running_loop().create_task(
                _release(self.graph, self.dropped)))

    # ---- speed --------------------------------------------------------------------------------

    def set_speed(self, speed: int) -> None:
        """block-job-set-speed; a lower limit applies from the next piece of work, a
        higher one wakes a job that is sleeping for the old one."""
        self.apply_verb("set-speed")
        if speed < 0:
            raise QMPError("Parameter 'speed' expects a non-negative value")
        old = self.speed
        self.limit.set_speed(speed, SLICE_NS)
        self.speed = speed
        self.driver_set_speed(speed)
        if speed and speed <= old:
            return
        self.enter(self._timer_pending)

    def driver_set_speed(self, speed: int) -> None:
        """The job's own reaction to a new speed (QEMU's .set_speed)."""

    def ratelimit_processed_bytes(self, n: int) -> None:
        self.limit.calculate_delay(n)

    async def ratelimit_sleep(self) -> None:
        """Waits as long as the speed limit asks, at least once through a pause point;
        woken early, it waits again for what is left (the speed may have changed)."""
        while True:
            delay = self.limit.calculate_delay(0)
            await self.sleep_ns(delay)
            if not delay or self.is_cancelled():
                return

    # ---- errors -------------------------------------------------------------------------------

    def error_action(self, on_err: str, is_read: bool, error: int) -> str:
        """What an I/O error ``error`` (an errno) does under policy ``on_err``
        (BlockdevOnError): 'ignore', 'report' or 'stop' (the job pauses until resumed)."""
        if on_err in ("enospc", "auto"):
            action = "stop" if error == errno.ENOSPC else "report"
        elif on_err == "stop":
            action = "stop"
        elif on_err == "report":
            action = "report"
        else:
            action = "ignore"
        if self.id is not None:
            self.jobs.emit("BLOCK_JOB_ERROR", {
                "device": self.id, "operation": "read" if is_read else "write",
                "action": action})
        if action == "stop":
            with job_lock:
                if not self.user_paused:
                    self.pause()
                    self.user_paused = True
            if self.iostatus == "ok":
                self.iostatus = "nospace" if error == errno.ENOSPC else "failed"
        return action

    def user_resume(self) -> None:
        self.iostatus = "ok"

    # ---- events and queries ------------------------------------------------------------------

    def _progress(self) -> dict[str, object]:
        return {"type": self.job_type, "device": self.id, "len": self.progress_total,
                "offset": self.progress_current, "speed": self.speed}

    def on_finalize_cancelled(self) -> None:
        if self.id is not None:
            self.jobs.emit("BLOCK_JOB_CANCELLED", self._progress())

    def on_finalize_completed(self) -> None:
        if self.id is not None:
            data = self._progress()
            if self.ret < 0 and self.err is not None:
                data["error"] = self.err
            self.jobs.emit("BLOCK_JOB_COMPLETED", data)

    def on_pending(self) -> None:
        if self.id is not None:
            self.jobs.emit("BLOCK_JOB_PENDING", {"type": self.job_type, "id": self.id})

    def on_ready(self) -> None:
        if self.id is not None:
            self.jobs.emit("BLOCK_JOB_READY", self._progress())

    def query(self) -> dict[str, object]:
        """QAPI BlockJobInfo (query-block-jobs); jobs with more to say extend it."""
        with job_lock:
            info: dict[str, object] = {
                "type": self.job_type, "device": self.id, "len": self.progress_total,
                "offset": self.progress_current, "busy": self.busy,
                "paused": self.pause_count > 0, "speed": self.speed,
                "io-status": self.iostatus, "ready": self.is_ready(),
                "status": self.status, "auto-finalize": self.auto_finalize,
                "auto-dismiss": self.auto_dismiss,
            }
            if self.err is not None:
                info["error"] = self.err
            return info

    # ---- as the owner of its edges (QEMU's child_job) ---------------------------------------

    def child_description(self, child: Child) -> str:
        return f"{self.job_type} job '{self.id}'"

    def child_drained_begin(self, child: Child) -> None:
        self.pause()

    def child_drained_end(self, child: Child) -> None:
        self.resume()

    def child_drained_poll(self, child: Child) -> bool:
        """Still on its way to a pause point: entered and not done."""
        with job_lock:
            if not self.busy or self.is_completed():
                return False
        return self.driver_drained_poll()

    def driver_drained_poll(self) -> bool:
        """Whether a busy job still has work in flight (QEMU's .drained_poll)."""
        return True

    def child_peers(self, child: Child) -> list[BlockNode]:
        """The job's nodes move between iothreads together."""
        return [c.node for c in self.nodes]

    async def child_aio_context_changed(self, child: Child, ctx: AioContext) -> None:
        self.ctx = ctx

    def child_resized(self, child: Child) -> None:
        pass

    def child_op_blocker(self, child: Child) -> str | None:
        return f"block device is in use by block job: {self.job_type}"

    def child_changed(self, child: Child) -> None:
        pass


async def _release(graph: BlockGraph, nodes: list[BlockNode]) -> None:
    for node in nodes:
        await graph.release(node)


def is_root_node(node: BlockNode) -> bool:
    """Whether only BlockBackends use ``node`` (QEMU's bdrv_is_root_node): no parent
    node and no block job."""
    return all(child.parent_node is None and not isinstance(child.parent, BlockJob)
               for child in node.parents)


def root_node(graph: BlockGraph, name: str) -> BlockNode:
    """QEMU's qmp_get_root_bs(): the node a job command names as its device, which
    only BlockBackends may use."""
    node = graph.lookup(name)
    if not is_root_node(node):
        raise QMPError("Need a root block node")
    return node


def block_jobs(jobs: JobRegistry) -> list[BlockJob]:
    """The block jobs among all jobs, newest first (QEMU's block_job_next)."""
    return [job for job in jobs if isinstance(job, BlockJob)]


def find_block_job(jobs: JobRegistry, job_id: str) -> BlockJob:
    """The block job a block-job-* command names, or QEMU's DeviceNotActive error."""
    job = jobs.get(job_id)
    if not isinstance(job, BlockJob):
        raise QMPError(f"Block job '{job_id}' not found", "DeviceNotActive")
    return job
