"""QMP commands of QEMU's block-core area: thin wrappers around qsd.block."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from qsd.aio import main_context
from qsd.block import drain, query
from qsd.block.graph import users
from qsd.commands.registry import command
from qsd.commands.transaction import Steps, action, run_single
from qsd.errors import QMPError
from qsd.job.block_job import block_jobs, find_block_job
from qsd.job.commit import block_commit as start_block_commit
from qsd.job.create import blockdev_create as start_blockdev_create
from qsd.job.mirror import blockdev_mirror as start_blockdev_mirror
from qsd.job.stream import block_stream as start_block_stream
from qsd.qapi.generated import (
    BlockCommitArgs,
    BlockdevBackup,
    BlockdevCreateArgs,
    BlockdevDelArgs,
    BlockdevMirrorArgs,
    BlockdevOptions,
    BlockdevSnapshot,
    BlockdevSnapshotArgs,
    BlockJobCancelArgs,
    BlockJobCompleteArgs,
    BlockJobDismissArgs,
    BlockJobFinalizeArgs,
    BlockJobPauseArgs,
    BlockJobResumeArgs,
    BlockJobSetSpeedArgs,
    BlockResizeArgs,
    BlockStreamArgs,
    QueryBlockArgs,
    QueryBlockstatsArgs,
    QueryNamedBlockNodesArgs,
    XBlockdevSetIothreadArgs,
)

if TYPE_CHECKING:
    from qsd.daemon import Daemon


@command("blockdev-add")
async def blockdev_add(daemon: Daemon, args: BlockdevOptions) -> None:
    await daemon.graph.blockdev_add(args)


@command("blockdev-del")
async def blockdev_del(daemon: Daemon, args: BlockdevDelArgs) -> None:
    await daemon.graph.blockdev_del(args.node_name)


@command("blockdev-create")
async def blockdev_create(daemon: Daemon, args: BlockdevCreateArgs) -> None:
    await start_blockdev_create(daemon.jobs, daemon.graph, args.job_id, args.options)


@command("blockdev-snapshot")
async def blockdev_snapshot(daemon: Daemon, args: BlockdevSnapshotArgs) -> None:
    await daemon.graph.snapshot(args.node, args.overlay)


@action("blockdev-backup", grouped=True)
async def blockdev_backup_action(daemon: Daemon, args: BlockdevBackup, steps: Steps) -> None:
    """QEMU's blockdev_backup_action(): the job is created now, started on commit,
    cancelled on abort; the source stays drained until the clean-up."""
    # Imported here: the job and its drivers are not needed until a backup starts.
    from qsd.job.backup import create_backup_job, end_prepared

    job, section = await create_backup_job(daemon.jobs, daemon.graph, args, steps.job_txn)

    async def abort() -> None:
        await job.cancel_sync(force=True)

    steps.add(commit=job.start, abort=abort,
              clean=functools.partial(end_prepared, job, section))


@command("blockdev-backup")
async def blockdev_backup(daemon: Daemon, args: BlockdevBackup) -> None:
    await run_single(daemon, "blockdev-backup", args)


@action("blockdev-snapshot")
async def blockdev_snapshot_action(daemon: Daemon, args: BlockdevSnapshot,
                                   steps: Steps) -> None:
    graph = daemon.graph
    old, new, section = await graph.snapshot_prepare(args.node, args.overlay)
    steps.add(commit=functools.partial(graph.snapshot_commit, old),
              abort=functools.partial(graph.snapshot_abort, old, new),
              clean=functools.partial(drain.drained_end, section))


@command("query-named-block-nodes")
async def query_named_block_nodes(daemon: Daemon, args: QueryNamedBlockNodesArgs) -> object:
    return query.query_named_block_nodes(daemon.graph, bool(args.flat))


@command("query-block")
async def query_block(daemon: Daemon, args: QueryBlockArgs) -> object:
    # A storage daemon has no guest devices, so no BlockBackend has a name.
    return []


@command("query-blockstats")
async def query_blockstats(daemon: Daemon, args: QueryBlockstatsArgs) -> object:
    return query.query_blockstats(daemon.graph, bool(args.query_nodes))


@command("block_resize")
async def block_resize(daemon: Daemon, args: BlockResizeArgs) -> None:
    await daemon.graph.block_resize(args.device, args.node_name, args.size)


@command("x-debug-query-block-graph")
async def x_debug_query_block_graph(daemon: Daemon, args: None) -> object:
    return query.x_debug_query_block_graph(daemon.graph, block_jobs(daemon.jobs))


@command("x-blockdev-set-iothread")
async def x_blockdev_set_iothread(daemon: Daemon, args: XBlockdevSetIothreadArgs) -> None:
    node = daemon.graph.find_node(args.node_name)
    if node is None:
        raise QMPError(f"Failed to find node with node-name='{args.node_name}'")
    if not args.force and users(node):
        raise QMPError(f"Node {args.node_name} is associated with a BlockBackend and could "
                       "be in use (use force=true to override this check)")
    if isinstance(args.iothread, str):
        iothread = daemon.iothreads.get(args.iothread)
        if iothread is None:
            raise QMPError(f"Cannot find iothread {args.iothread}")
        ctx = iothread.ctx
    else:
        ctx = main_context()
    await daemon.graph.set_aio_context(node, ctx)


# ---- block jobs (the job-* commands in commands/job.py do the same by job id) ------------


@command("block-stream")
async def block_stream(daemon: Daemon, args: BlockStreamArgs) -> None:
    await start_block_stream(daemon.jobs, daemon.graph, args)


@command("block-commit")
async def block_commit(daemon: Daemon, args: BlockCommitArgs) -> None:
    await start_block_commit(daemon.jobs, daemon.graph, args)


@command("blockdev-mirror")
async def blockdev_mirror(daemon: Daemon, args: BlockdevMirrorArgs) -> None:
    await start_blockdev_mirror(daemon.jobs, daemon.graph, args)


@command("query-block-jobs")
async def query_block_jobs(daemon: Daemon, args: None) -> object:
    return [job.query() for job in block_jobs(daemon.jobs) if job.id is not None]


@command("block-job-set-speed")
async def block_job_set_speed(daemon: Daemon, args: BlockJobSetSpeedArgs) -> None:
    job = find_block_job(daemon.jobs, args.device)
    job.set_speed(args.speed)
    await job.settle()


@command("block-job-cancel")
async def block_job_cancel(daemon: Daemon, args: BlockJobCancelArgs) -> None:
    job = find_block_job(daemon.jobs, args.device)
    force = bool(args.force)
    if job.user_paused and not force:
        raise QMPError(f"The block job for device '{args.device}' is currently paused")
    await job.user_cancel(force)
    await job.settle()


@command("block-job-pause")
async def block_job_pause(daemon: Daemon, args: BlockJobPauseArgs) -> None:
    job = find_block_job(daemon.jobs, args.device)
    job.user_pause()
    await job.settle()


@command("block-job-resume")
async def block_job_resume(daemon: Daemon, args: BlockJobResumeArgs) -> None:
    job = find_block_job(daemon.jobs, args.device)
    job.user_resume_command()
    await job.settle()


@command("block-job-complete")
async def block_job_complete(daemon: Daemon, args: BlockJobCompleteArgs) -> None:
    job = find_block_job(daemon.jobs, args.device)
    job.complete()
    await job.settle()


@command("block-job-finalize")
async def block_job_finalize(daemon: Daemon, args: BlockJobFinalizeArgs) -> None:
    await find_block_job(daemon.jobs, args.id).finalize()


@command("block-job-dismiss")
async def block_job_dismiss(daemon: Daemon, args: BlockJobDismissArgs) -> None:
    find_block_job(daemon.jobs, args.id).dismiss()
