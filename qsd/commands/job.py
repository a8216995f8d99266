"""QEMU's job area: job-pause/-resume/-cancel/-complete/-finalize/-dismiss, query-jobs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qsd.commands.registry import command
from qsd.qapi.generated import (
    JobCancelArgs,
    JobCompleteArgs,
    JobDismissArgs,
    JobFinalizeArgs,
    JobPauseArgs,
    JobResumeArgs,
)

if TYPE_CHECKING:
    from qsd.daemon import Daemon


@command("job-pause")
async def job_pause(daemon: Daemon, args: JobPauseArgs) -> None:
    job = daemon.jobs.find(args.id)
    job.user_pause()
    await job.settle()


@command("job-resume")
async def job_resume(daemon: Daemon, args: JobResumeArgs) -> None:
    job = daemon.jobs.find(args.id)
    job.user_resume_command()
    await job.settle()


@command("job-cancel")
async def job_cancel(daemon: Daemon, args: JobCancelArgs) -> None:
    # job-cancel always cancels for good; block-job-cancel knows soft cancelling.
    job = daemon.jobs.find(args.id)
    await job.user_cancel(force=True)
    await job.settle()


@command("job-complete")
async def job_complete(daemon: Daemon, args: JobCompleteArgs) -> None:
    job = daemon.jobs.find(args.id)
    job.complete()
    await job.settle()


@command("job-finalize")
async def job_finalize(daemon: Daemon, args: JobFinalizeArgs) -> None:
    await daemon.jobs.find(args.id).finalize()


@command("job-dismiss")
async def job_dismiss(daemon: Daemon, args: JobDismissArgs) -> None:
    daemon.jobs.find(args.id).dismiss()


@command("query-jobs")
async def query_jobs(daemon: Daemon, args: None) -> list[dict[str, object]]:
    return [job.info() for job in daemon.jobs if job.id is not None]
