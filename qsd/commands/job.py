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
    daemon.jobs.find(args.id).user_pause()


@command("job-resume")
async def job_resume(daemon: Daemon, args: JobResumeArgs) -> None:
    daemon.jobs.find(args.id).user_resume_command()


@command("job-cancel")
async def job_cancel(daemon: Daemon, args: JobCancelArgs) -> None:
    # job-cancel always cancels for good; block-job-cancel knows soft cancelling.
    await daemon.jobs.find(args.id).user_cancel(force=True)


@command("job-complete")
async def job_complete(daemon: Daemon, args: JobCompleteArgs) -> None:
    daemon.jobs.find(args.id).complete()


@command("job-finalize")
async def job_finalize(daemon: Daemon, args: JobFinalizeArgs) -> None:
    await daemon.jobs.find(args.id).finalize()


@command("job-dismiss")
async def job_dismiss(daemon: Daemon, args: JobDismissArgs) -> None:
    daemon.jobs.find(args.id).dismiss()


@command("query-jobs")
async def query_jobs(daemon: Daemon, args: None) -> list[dict[str, object]]:
    return [job.info() for job in daemon.jobs if job.id is not None]
