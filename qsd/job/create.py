"""blockdev-create: making a new image is a job (QEMU's block/create.c).

The driver's creation function does the work (see registry.py); the job only reports
progress 0 of 1 until it is done, as QEMU's does.  It runs in the main loop, is
finalized automatically and waits for job-dismiss.
"""

from __future__ import annotations

from typing import Any

from qsd.aio import main_context
from qsd.block import registry
from qsd.block.graph import BlockGraph
from qsd.errors import QMPError
from qsd.job.core import Job, JobRegistry


class CreateJob(Job):
    job_type = "create"

    def __init__(self, jobs: JobRegistry, job_id: str, create: registry.Creator,
                 options: Any, graph: BlockGraph) -> None:
        super().__init__(jobs, job_id, main_context(), auto_dismiss=False)
        self._create = create
        self._options = options
        self._graph = graph

    async def run(self) -> None:
        self.progress_set_remaining(1)
        try:
            await self._create(self._options, self._graph)
        finally:
            self.progress_update(1)


async def blockdev_create(jobs: JobRegistry, graph: BlockGraph, job_id: str,
                          options: Any) -> None:
    """Checks the driver as QEMU does, then starts the job."""
    name = str(options.driver.value)
    driver = registry.lookup(name)
    if driver is None:
        raise QMPError(f"Block driver '{name}' not found or not supported")
    if driver.create is None:
        raise QMPError("Driver does not support blockdev-create")
    await CreateJob(jobs, job_id, driver.create, options, graph).start()
