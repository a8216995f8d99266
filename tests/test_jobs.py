"""The job core in-process: QEMU's state machine, its events and errors, transactions,
jobs in iothreads, and block jobs as parents of their nodes (drain, permissions, speed,
error policy), driven by job drivers written for the tests."""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from qsd import qapi
from qsd.aio import AioContext, main_context, set_main_context
from qsd.block import drain, io, registry
from qsd.block.backend import BlockBackend
from qsd.block.graph import BlockGraph
from qsd.block.node import BlockNode
from qsd.block.permissions import PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE
from qsd.errors import QMPError
from qsd.iothread import IOThread
from qsd.job.block_job import BlockJob
from qsd.job.core import Job, JobRegistry, JobTxn
from qsd.qapi.base import MemberSpec, QAPIModel

TICK_NS = 2_000_000


class Events:
    """The events the registry sends, kept with a way to wait for one."""

    def __init__(self) -> None:
        self.log: list[tuple[str, dict[str, object]]] = []
        self.changed = asyncio.Event()

    def __call__(self, name: str, data: dict[str, object]) -> None:
        self.log.append((name, data))
        self.changed.set()

    def statuses(self, job_id: str) -> list[object]:
        return [d["status"] for n, d in self.log
                if n == "JOB_STATUS_CHANGE" and d["id"] == job_id]

    async def wait_for(self, job_id: str, status: str, timeout: float = 20.0) -> None:
        async def wait() -> None:
            while status not in self.statuses(job_id):
                self.changed.clear()
                await self.changed.wait()
        await asyncio.wait_for(wait(), timeout)


class StepJob(Job):
    """Works in ticks until told to stop (``finish``), with a pause point each tick;
    ``ready`` makes it wait for job-complete like a mirror."""

    job_type = "commit"
    can_complete = True

    def __init__(self, jobs: JobRegistry, job_id: str, ctx: AioContext | None = None,
                 *, fail: OSError | None = None, ready: bool = False, **kwargs: Any) -> None:
        super().__init__(jobs, job_id, ctx or main_context(), **kwargs)
        self.fail = fail
        self.become_ready = ready
        self.finished = False
        self.completed_by_user = False
        self.ticks = 0
        self.hooks: list[str] = []

    def finish(self) -> None:
        self.finished = True
        self.enter()

    async def run(self) -> None:
        self.progress_set_remaining(100)
        while not self.finished and not self.is_cancelled():
            await self.sleep_ns(TICK_NS)
            self.ticks += 1
            if self.ticks < 100:
                self.progress_update(1)
        if self.fail is not None:
            raise self.fail
        if self.become_ready and not self.is_cancelled():
            self.transition_to_ready()
            while not self.completed_by_user and not self.is_cancelled():
                await self.yield_()

    def driver_complete(self) -> None:
        self.completed_by_user = True
        self.enter()

    def commit(self) -> None:
        self.hooks.append("commit")

    def abort(self) -> None:
        self.hooks.append("abort")

    async def clean(self) -> None:
        self.hooks.append("clean")


@pytest.fixture
async def jobs() -> AsyncIterator[tuple[JobRegistry, Events]]:
    set_main_context(asyncio.get_running_loop())
    events = Events()
    registry = JobRegistry(events)
    yield registry, events
    await registry.cancel_all()


def errors_of(job: Job, *verbs: str) -> dict[str, str | None]:
    """What each verb check answers in the job's current status."""
    result: dict[str, str | None] = {}
    for verb in verbs:
        try:
            job.apply_verb(verb)
            result[verb] = None
        except QMPError as exc:
            result[verb] = exc.desc
    return result


# ---- the state machine ---------------------------------------------------------------------


async def test_ids(jobs: tuple[JobRegistry, Events]) -> None:
    registry, events = jobs
    for bad, text in (("1x", "Invalid job ID '1x'"), ("", "Invalid job ID ''"),
                      ("a b", "Invalid job ID 'a b'")):
        with pytest.raises(QMPError, match=f"^{text}$"):
            StepJob(registry, bad)
    with pytest.raises(QMPError, match="^An explicit job ID is required$"):
        Job(registry, None, main_context())
    with pytest.raises(QMPError, match="^Cannot specify job ID for internal job$"):
        Job(registry, "j", main_context(), internal=True)
    StepJob(registry, "j0")
    with pytest.raises(QMPError, match="^Job ID 'j0' already in use$"):
        StepJob(registry, "j0")
    assert events.statuses("j0") == ["created"]
    with pytest.raises(QMPError, match="^Job not found$"):
        registry.find("nope")


async def test_manual_finalize_and_dismiss(jobs: tuple[JobRegistry, Events]) -> None:
    registry, events = jobs
    job = StepJob(registry, "j0", auto_finalize=False, auto_dismiss=False)
    assert errors_of(job, "complete", "finalize", "dismiss") == {
        "complete": "Job 'j0' in state 'created' cannot accept command verb 'complete'",
        "finalize": "Job 'j0' in state 'created' cannot accept command verb 'finalize'",
        "dismiss": "Job 'j0' in state 'created' cannot accept command verb 'dismiss'"}
    await job.start()
    job.finish()
    await events.wait_for("j0", "pending")
    assert job.info() == {"id": "j0", "type": "commit", "status": "pending",
                          "current-progress": job.progress_current, "total-progress": 100}
    assert errors_of(job, "cancel", "pause", "finalize", "dismiss") == {
        "cancel": None,
        "pause": "Job 'j0' in state 'pending' cannot accept command verb 'pause'",
        "finalize": None,
        "dismiss": "Job 'j0' in state 'pending' cannot accept command verb 'dismiss'"}
    await job.finalize()
    assert job.hooks == ["commit", "clean"]
    assert errors_of(job, "cancel", "finalize", "dismiss") == {
        "cancel": "Job 'j0' in state 'concluded' cannot accept command verb 'cancel'",
        "finalize": "Job 'j0' in state 'concluded' cannot accept command verb 'finalize'",
        "dismiss": None}
    job.dismiss()
    assert events.statuses("j0") == ["created", "running", "waiting", "pending",
                                     "concluded", "null"]
    assert list(registry) == []


async def test_pause_resume(jobs: tuple[JobRegistry, Events]) -> None:
    registry, events = jobs
    job = StepJob(registry, "j0")
    with pytest.raises(QMPError, match="^Can't resume a job that was not paused$"):
        job.user_resume_command()
    await job.start()
    job.user_pause()
    with pytest.raises(QMPError, match="^Job is already paused$"):
        job.user_pause()
    await events.wait_for("j0", "paused")
    ticks = job.ticks
    await asyncio.sleep(0.05)
    assert job.ticks == ticks and job.status == "paused" and not job.busy
    job.user_resume_command()
    with pytest.raises(QMPError, match="^Can't resume a job that was not paused$"):
        job.user_resume_command()
    await events.wait_for("j0", "running")
    job.finish()
    await events.wait_for("j0", "null")
    assert events.statuses("j0") == ["created", "running", "paused", "running", "waiting",
                                     "pending", "concluded", "null"]


async def test_paused_before_start(jobs: tuple[JobRegistry, Events]) -> None:
    """A job paused while created stops at the pause point before its work starts."""
    registry, events = jobs
    job = StepJob(registry, "j0")
    job.user_pause()
    await job.start()
    await events.wait_for("j0", "paused")
    assert job.ticks == 0
    job.user_resume_command()
    job.finish()
    await events.wait_for("j0", "null")


async def test_ready_standby_complete(jobs: tuple[JobRegistry, Events]) -> None:
    registry, events = jobs
    job = StepJob(registry, "j0", ready=True)
    await job.start()
    with pytest.raises(QMPError, match="cannot accept command verb 'complete'"):
        job.complete()
    job.finish()
    await events.wait_for("j0", "ready")
    assert job.is_ready()
    job.user_pause()
    await events.wait_for("j0", "standby")
    job.user_resume_command()
    await events.wait_for("j0", "ready")
    job.complete()
    await events.wait_for("j0", "null")
    assert events.statuses("j0") == ["created", "running", "ready", "standby", "ready",
                                     "waiting", "pending", "concluded", "null"]


async def test_cancel_running_and_paused(jobs: tuple[JobRegistry, Events]) -> None:
    registry, events = jobs
    job = StepJob(registry, "j0", auto_dismiss=False)
    await job.start()
    job.user_pause()
    await events.wait_for("j0", "paused")
    await job.user_cancel(force=True)
    await events.wait_for("j0", "concluded")
    assert job.info()["error"] == "Operation canceled"
    assert job.ret == -errno.ECANCELED and job.hooks == ["abort", "clean"]
    assert events.statuses("j0") == ["created", "running", "paused", "running", "aborting",
                                     "concluded"]
    # Cancelling a concluded job dismisses it (QEMU's job_cancel; the verb refuses).
    with pytest.raises(QMPError, match="in state 'concluded' cannot accept command verb"):
        await job.user_cancel(force=True)
    await job.cancel(force=True)
    assert events.statuses("j0")[-1] == "null"


async def test_cancel_before_start(jobs: tuple[JobRegistry, Events]) -> None:
    registry, events = jobs
    job = StepJob(registry, "j0")
    await job.user_cancel(force=True)
    assert events.statuses("j0") == ["created", "aborting", "concluded", "null"]
    assert job.hooks == ["abort", "clean"]


async def test_failure(jobs: tuple[JobRegistry, Events]) -> None:
    registry, events = jobs
    job = StepJob(registry, "j0", fail=OSError(errno.ENOSPC, "No space left on device"),
                  auto_dismiss=False)
    await job.start()
    job.finish()
    await events.wait_for("j0", "concluded")
    assert job.info()["error"] == "No space left on device"
    assert events.statuses("j0") == ["created", "running", "aborting", "concluded"]


async def test_fails_before_first_wait(jobs: tuple[JobRegistry, Events]) -> None:
    """A job that fails before it ever waits has concluded when start() returns, as
    QEMU's does when the command that started it replies."""
    registry, events = jobs

    class Quick(Job):
        job_type = "create"

        async def run(self) -> None:
            raise QMPError("Could not create 'x': No such file or directory")

    job = Quick(registry, "q", main_context(), auto_dismiss=False)
    await job.start()
    assert job.status == "concluded"
    assert job.info()["error"] == "Could not create 'x': No such file or directory"


async def test_transaction(jobs: tuple[JobRegistry, Events]) -> None:
    """Jobs of one transaction wait for each other, then finalize together; when one
    fails, the others are cancelled."""
    registry, events = jobs
    txn = JobTxn()
    a = StepJob(registry, "a", txn=txn)
    b = StepJob(registry, "b", txn=txn)
    await a.start()
    await b.start()
    a.finish()
    await events.wait_for("a", "waiting")
    assert b.status == "running"
    b.finish()
    await events.wait_for("a", "null")
    await events.wait_for("b", "null")
    assert events.statuses("a") == events.statuses("b") == [
        "created", "running", "waiting", "pending", "concluded", "null"]

    txn = JobTxn()
    c = StepJob(registry, "c", txn=txn)
    d = StepJob(registry, "d", txn=txn, fail=OSError(errno.EIO, "Input/output error"))
    await c.start()
    await d.start()
    c.finish()
    await events.wait_for("c", "waiting")
    d.finish()
    await events.wait_for("c", "null")
    await events.wait_for("d", "null")
    assert events.statuses("c") == ["created", "running", "waiting", "aborting",
                                    "concluded", "null"]
    assert events.statuses("d") == ["created", "running", "aborting", "concluded", "null"]
    assert c.hooks == d.hooks == ["abort", "clean"]


async def test_job_in_iothread(jobs: tuple[JobRegistry, Events]) -> None:
    """The coroutine runs in the iothread; its status changes there still reach the
    monitors in order."""
    registry, events = jobs
    iothread = IOThread.spawn("jobthread")
    try:
        seen: list[bool] = []

        class Where(StepJob):
            async def run(self) -> None:
                seen.append(iothread.ctx.in_this_thread())
                await super().run()

        job = Where(registry, "j0", iothread.ctx)
        await job.start()
        assert iothread.in_use()
        for _ in range(5):
            job.user_pause()
            await events.wait_for("j0", "paused")
            job.user_resume_command()
            await asyncio.sleep(0.01)
        await job.user_cancel(force=True)
        await events.wait_for("j0", "null")
        assert seen == [True]
        statuses = events.statuses("j0")
        assert statuses[:2] == ["created", "running"]
        assert statuses[-3:] == ["aborting", "concluded", "null"]
        middle = statuses[2:-3]
        assert middle == ["paused", "running"] * (len(middle) // 2)
        for _ in range(100):
            if not iothread.in_use():
                break
            await asyncio.sleep(0.01)
        assert not iothread.in_use()
    finally:
        iothread.stop()


async def test_cancel_all(jobs: tuple[JobRegistry, Events]) -> None:
    registry, events = jobs
    running = StepJob(registry, "r")
    await running.start()
    manual = StepJob(registry, "m", auto_dismiss=False)
    await manual.start()
    manual.finish()
    await events.wait_for("m", "concluded")
    StepJob(registry, "n")
    await registry.cancel_all()
    assert list(registry) == []
    assert events.statuses("n")[-1] == events.statuses("m")[-1] == "null"
    assert events.statuses("r")[-1] == "null"


# ---- block jobs ------------------------------------------------------------------------------


class CopyJob(BlockJob):
    """Copies its main node to a target node in 64 KiB pieces (a test driver shaped like
    QEMU's backup), honouring the speed limit and the error policy."""

    job_type = "backup"
    CHUNK = 65536

    def __init__(self, jobs: JobRegistry, job_id: str | None, graph: BlockGraph,
                 source: BlockNode, target: BlockNode, *, on_target_error: str = "report",
                 **kwargs: Any) -> None:
        super().__init__(jobs, job_id, graph, source, PERM_CONSISTENT_READ,
                         PERM_ALL & ~PERM_WRITE, **kwargs)
        try:
            self.target = self.add_node("target", target, PERM_WRITE, PERM_ALL)
        except QMPError:
            self.early_fail()
            raise
        self.on_target_error = on_target_error
        self.copied = 0

    async def run(self) -> None:
        source = self.nodes[-1]
        length = source.node.length()
        self.progress_set_remaining(length)
        offset = 0
        while offset < length:
            await self.ratelimit_sleep()
            if self.is_cancelled():
                return
            n = min(self.CHUNK, length - offset)
            data = await io.read(source, offset, n)
            try:
                await io.write(self.target, offset, data)
            except OSError as exc:
                action = self.error_action(self.on_target_error, False, exc.errno or 0)
                if action == "report":
                    raise
                continue
            offset += n
            self.copied += n
            self.progress_update(n)
            self.ratelimit_processed_bytes(n)


class FullOptions(QAPIModel):
    """blockdev-add options of the test driver below."""

    driver: str
    node_name: str | None = None

    __qapi_members__ = (
        MemberSpec("driver", "driver", "str", False),
        MemberSpec("node-name", "node_name", "str", True),
    )


@registry.register("x-test-full", options=FullOptions)
class FullNode(BlockNode):
    """A 1 MiB device whose writes fail with ENOSPC while ``full`` is set."""

    is_protocol = True
    full = True

    def get_length(self) -> int:
        return 1 << 20

    async def do_write(self, offset: int, data: Any, fua: bool) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")


def opts(**kwargs: Any) -> Any:
    return qapi.parse_command_args("blockdev-add", {k.replace("_", "-"): v
                                                    for k, v in kwargs.items()})


@pytest.fixture
async def graph() -> AsyncIterator[BlockGraph]:
    set_main_context(asyncio.get_running_loop())
    g = BlockGraph()
    yield g
    await g.close_all()


async def two_nodes(graph: BlockGraph, tmp_path: Path, size: int = 1 << 20
                    ) -> tuple[BlockNode, BlockNode]:
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(bytes(range(256)) * (size // 256))
    dst.write_bytes(bytes(size))
    a = await graph.blockdev_add(opts(driver="file", node_name="src", filename=str(src)))
    b = await graph.blockdev_add(opts(driver="file", node_name="dst", filename=str(dst)))
    return a, b


async def test_block_job_copies_and_reports(jobs: tuple[JobRegistry, Events],
                                           graph: BlockGraph, tmp_path: Path) -> None:
    registry, events = jobs
    src, dst = await two_nodes(graph, tmp_path)
    job = CopyJob(registry, "b0", graph, src, dst, auto_finalize=False)
    assert [c.name for c in job.nodes] == ["target", "main node"]
    await job.start()
    await events.wait_for("b0", "pending")
    assert ("BLOCK_JOB_PENDING", {"type": "backup", "id": "b0"}) in events.log
    assert job.query()["status"] == "pending"
    await job.finalize()
    await events.wait_for("b0", "null")
    completed = [d for n, d in events.log if n == "BLOCK_JOB_COMPLETED"]
    assert completed == [{"type": "backup", "device": "b0", "len": 1 << 20,
                          "offset": 1 << 20, "speed": 0}]
    assert (tmp_path / "dst.img").read_bytes() == (tmp_path / "src.img").read_bytes()
    assert src.parents == [] and dst.parents == []


async def test_block_job_failures_at_creation(jobs: tuple[JobRegistry, Events],
                                              graph: BlockGraph, tmp_path: Path) -> None:
    registry, events = jobs
    src, dst = await two_nodes(graph, tmp_path)
    with pytest.raises(QMPError, match="^Invalid job ID ''$"):
        CopyJob(registry, None, graph, src, dst)
    with pytest.raises(QMPError, match="^Parameter 'speed' expects a non-negative value$"):
        CopyJob(registry, "b0", graph, src, dst, speed=-1)
    assert events.statuses("b0") == ["created", "null"]
    assert src.parents == [] and dst.parents == []
    blk = BlockBackend(graph, dst, perm=PERM_WRITE | PERM_CONSISTENT_READ,
                       shared=PERM_CONSISTENT_READ)
    with pytest.raises(QMPError) as info:
        CopyJob(registry, "b1", graph, src, dst)
    assert info.value.desc == (
        "Permission conflict on node 'dst': permissions 'write' are both required by "
        "backup job 'b1' (uses node 'dst' as 'target' child) and unshared by an unnamed "
        "block device (uses node 'dst' as 'root' child).")
    assert src.parents == [] and list(registry) == []
    await blk.detach()


async def test_block_job_paused_by_drain(jobs: tuple[JobRegistry, Events],
                                         graph: BlockGraph, tmp_path: Path) -> None:
    """A drain of a node the job uses waits for the job to stop at a pause point."""
    registry, events = jobs
    src, dst = await two_nodes(graph, tmp_path, 8 << 20)
    job = CopyJob(registry, "b0", graph, src, dst, speed=4 << 20)
    await job.start()
    await events.wait_for("b0", "running")
    async with drain.drained(graph.lock, [dst]):
        assert job.status == "paused" and not job.busy
        copied = job.copied
        await asyncio.sleep(0.1)
        assert job.copied == copied
        assert job.query()["paused"] is True
    await events.wait_for("b0", "running")
    await job.user_cancel(force=True)
    await events.wait_for("b0", "null")
    assert ("BLOCK_JOB_CANCELLED", {"type": "backup", "device": "b0", "len": 8 << 20,
                                    "offset": job.copied, "speed": 4 << 20}) in events.log


async def test_block_job_speed(jobs: tuple[JobRegistry, Events], graph: BlockGraph,
                               tmp_path: Path) -> None:
    """The copy rate follows the speed limit, and a new limit applies at once."""
    registry, events = jobs
    src, dst = await two_nodes(graph, tmp_path, 16 << 20)
    job = CopyJob(registry, "b0", graph, src, dst, speed=2 << 20)
    await job.start()
    start, copied = time.monotonic(), job.copied
    await asyncio.sleep(1.0)
    rate = (job.copied - copied) / (time.monotonic() - start)
    assert 1.5 * (1 << 20) < rate < 2.6 * (1 << 20), rate
    job.set_speed(0)
    await events.wait_for("b0", "null", timeout=60)
    assert job.copied == 16 << 20


async def test_block_job_error_policy(jobs: tuple[JobRegistry, Events],
                                      graph: BlockGraph, tmp_path: Path) -> None:
    """on-target-error=stop pauses the job on ENOSPC (io-status nospace) until it is
    resumed; report fails it with the error."""
    src, _ = await two_nodes(graph, tmp_path)
    full = await graph.blockdev_add(FullOptions(driver="x-test-full", node_name="full"))
    assert isinstance(full, FullNode)
    registry, events = jobs
    job = CopyJob(registry, "b0", graph, src, full, on_target_error="stop")
    await job.start()
    await events.wait_for("b0", "paused")
    assert ("BLOCK_JOB_ERROR", {"device": "b0", "operation": "write",
                                "action": "stop"}) in events.log
    info = job.query()
    assert info["io-status"] == "nospace" and info["paused"] is True
    with pytest.raises(QMPError, match="^Job is already paused$"):
        job.user_pause()
    full.full = False
    job.user_resume_command()
    assert job.query()["io-status"] == "ok"
    await events.wait_for("b0", "null")
    assert job.copied == 1 << 20

    full.full = True
    job = CopyJob(registry, "b1", graph, src, full, auto_dismiss=False)
    await job.start()
    await events.wait_for("b1", "concluded")
    assert job.query()["error"] == "No space left on device"
    assert ("BLOCK_JOB_ERROR", {"device": "b1", "operation": "write",
                                "action": "report"}) in events.log
    job.dismiss()
