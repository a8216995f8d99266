"""blockdev-create through a real daemon: images made over QMP (qemu.qmp's QMPClient),
the job's events in QEMU's order, and the images checked with qemu-img."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from tests.conftest import QsdFactory


class Session:
    """A QMPClient with every event it received, in order."""

    def __init__(self, client: QMPClient, listener: EventListener) -> None:
        self.client = client
        self.listener = listener
        self.events: list[dict[str, Any]] = []

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return await self.client.execute(command, args)

    async def error(self, command: str, args: dict[str, Any]) -> str:
        with pytest.raises(ExecuteError) as info:
            await self.client.execute(command, args)
        return str(info.value.error.error.desc)

    async def job_statuses(self, job_id: str, until: str) -> list[str]:
        """The job's JOB_STATUS_CHANGE statuses, waiting for ``until``."""
        def statuses() -> list[str]:
            return [e["data"]["status"] for e in self.events
                    if e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job_id]
        while until not in statuses():
            self.events.append(await asyncio.wait_for(self.listener.get(), 30))
        return statuses()

    async def create(self, job_id: str, options: dict[str, Any]) -> dict[str, Any]:
        """Runs blockdev-create to its end; the job's query-jobs entry, then dismissed."""
        await self.execute("blockdev-create", {"job-id": job_id, "options": options})
        await self.job_statuses(job_id, "concluded")
        info = [j for j in await self.execute("query-jobs") if j["id"] == job_id]
        await self.execute("job-dismiss", {"id": job_id})
        assert (await self.job_statuses(job_id, "null"))[-1] == "null"
        return dict(info[0])


@pytest.fixture
async def qmp(start_qsd: QsdFactory) -> AsyncIterator[Session]:
    daemon = start_qsd()
    client = QMPClient("test")
    await client.connect(str(daemon.qmp_path))
    listener = EventListener()
    with client.listen(listener):
        try:
            yield Session(client, listener)
        finally:
            await client.disconnect()


def img_info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "-U", "--output=json", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return dict(json.loads(out))


async def test_file_create_events_and_image(qmp: Session, tmp_path: Path) -> None:
    path = tmp_path / "a.img"
    info = await qmp.create("j0", {"driver": "file", "filename": str(path),
                                   "size": 1 << 20})
    assert info == {"id": "j0", "type": "create", "status": "concluded",
                    "current-progress": 1, "total-progress": 1}
    assert await qmp.job_statuses("j0", "null") == [
        "created", "running", "waiting", "pending", "concluded", "null"]
    assert img_info(path)["virtual-size"] == 1 << 20
    assert path.read_bytes() == bytes(1 << 20)
    assert oct(path.stat().st_mode & 0o777) == "0o644"


@pytest.mark.parametrize("prealloc,allocated", [("off", False), ("falloc", True),
                                                ("full", True)])
async def test_file_preallocation(qmp: Session, tmp_path: Path, prealloc: str,
                                  allocated: bool) -> None:
    path = tmp_path / f"{prealloc}.img"
    size = 4 << 20
    info = await qmp.create("j0", {"driver": "file", "filename": str(path), "size": size,
                                   "preallocation": prealloc, "nocow": True})
    assert "error" not in info
    st = os.stat(path)
    assert st.st_size == size
    assert (st.st_blocks * 512 >= size) == allocated
    assert img_info(path)["actual-size"] == st.st_blocks * 512


async def test_file_create_errors(qmp: Session, tmp_path: Path) -> None:
    cases = [
        ({"filename": str(tmp_path / "no" / "x.img"), "size": 0},
         f"Could not create '{tmp_path}/no/x.img': No such file or directory"),
        ({"filename": str(tmp_path), "size": 0},
         f"Could not create '{tmp_path}': Is a directory"),
        ({"filename": str(tmp_path / "b.img"), "size": 0, "extent-size-hint": 1 << 32},
         "Extent size hint is too large"),
        ({"filename": str(tmp_path / "c.img"), "size": 1 << 20, "preallocation": "metadata"},
         "Unsupported preallocation mode: metadata"),
        ({"filename": str(tmp_path / "d.img"), "size": -1},
         "Could not resize file: Invalid argument"),
        ({"filename": str(tmp_path / "e.img"), "size": (1 << 63) - 1},
         "Could not resize file: File too large"),
    ]
    for number, (options, error) in enumerate(cases):
        info = await qmp.create(f"e{number}", {"driver": "file", **options})
        assert info["error"] == error
        assert await qmp.job_statuses(f"e{number}", "null") == [
            "created", "running", "aborting", "concluded", "null"]
    assert await qmp.error("blockdev-create", {"job-id": "x", "options": {
        "driver": "raw"}}) == "Driver does not support blockdev-create"
    assert await qmp.error("blockdev-create", {"job-id": "x", "options": {
        "driver": "null-co"}}) == "Driver does not support blockdev-create"
    assert await qmp.error("blockdev-create", {"job-id": "x", "options": {
        "driver": "raw", "filename": "f"}}) == "Parameter 'options.filename' is unexpected"
    assert await qmp.error("blockdev-create", {"job-id": "1x", "options": {
        "driver": "file", "filename": "f", "size": 0}}) == "Invalid job ID '1x'"


async def test_job_commands_on_a_concluded_create(qmp: Session, tmp_path: Path) -> None:
    await qmp.execute("blockdev-create", {"job-id": "j0", "options": {
        "driver": "file", "filename": str(tmp_path / "a.img"), "size": 0}})
    await qmp.job_statuses("j0", "concluded")
    for command, verb in (("job-cancel", "cancel"), ("job-pause", "pause"),
                          ("job-complete", "complete"), ("job-finalize", "finalize")):
        assert await qmp.error(command, {"id": "j0"}) == (
            f"Job 'j0' in state 'concluded' cannot accept command verb '{verb}'")
    assert await qmp.error("job-resume", {"id": "j0"}) == (
        "Can't resume a job that was not paused")
    assert await qmp.error("blockdev-create", {"job-id": "j0", "options": {
        "driver": "file", "filename": str(tmp_path / "b.img"), "size": 0}}) == (
        "Job ID 'j0' already in use")
    assert await qmp.execute("query-block-jobs") == []
    await qmp.execute("job-dismiss", {"id": "j0"})
    assert await qmp.error("job-dismiss", {"id": "j0"}) == "Job not found"
    assert await qmp.execute("query-jobs") == []
