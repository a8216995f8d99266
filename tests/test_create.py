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


# ---- qcow2 ---------------------------------------------------------------------------------

# blockdev-create options, the same image as qemu-img create -o, and what qemu-img info
# then shows in format-specific data (besides compat and the cluster size).
QCOW2_CASES: list[tuple[dict[str, Any], str, dict[str, Any]]] = [
    ({}, "", {}),
    ({"cluster-size": 512}, "cluster_size=512", {}),
    ({"cluster-size": 2 << 20}, "cluster_size=2M", {}),
    ({"version": "v2"}, "compat=0.10", {}),
    ({"version": "v2", "cluster-size": 4096}, "compat=0.10,cluster_size=4k", {}),
    ({"refcount-bits": 1}, "refcount_bits=1", {"refcount-bits": 1}),
    ({"refcount-bits": 64}, "refcount_bits=64", {"refcount-bits": 64}),
    ({"lazy-refcounts": True}, "lazy_refcounts=on", {"lazy-refcounts": True}),
    ({"extended-l2": True}, "extended_l2=on", {"extended-l2": True}),
    ({"compression-type": "zstd"}, "compression_type=zstd", {"compression-type": "zstd"}),
    ({"preallocation": "metadata"}, "preallocation=metadata", {}),
    ({"backing-file": "base.raw", "backing-fmt": "raw"},
     "backing_file=base.raw,backing_fmt=raw", {}),
    ({"backing-file": "base.raw", "backing-fmt": "raw", "extended-l2": True,
      "preallocation": "metadata"},
     "backing_file=base.raw,backing_fmt=raw,extended_l2=on,preallocation=metadata",
     {"extended-l2": True}),
]


def qemu_img_check(path: Path) -> None:
    result = subprocess.run(["qemu-img", "check", "-U", str(path)], capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors were found on the image." in result.stdout


async def create_qcow2(qmp: Session, path: Path, options: dict[str, Any]
                       ) -> dict[str, Any]:
    """An empty file, then a qcow2 image on it through its node; the job's entry."""
    info = await qmp.create("f", {"driver": "file", "filename": str(path), "size": 0})
    assert "error" not in info
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "img",
                                       "filename": str(path)})
    try:
        return await qmp.create("c", {"driver": "qcow2", "file": "img", **options})
    finally:
        await qmp.execute("blockdev-del", {"node-name": "img"})


@pytest.mark.parametrize("options,qemu_img_opts,specific", QCOW2_CASES,
                         ids=[o or "default" for _, o, _ in QCOW2_CASES])
async def test_qcow2_create_like_qemu_img(qmp: Session, tmp_path: Path,
                                          options: dict[str, Any], qemu_img_opts: str,
                                          specific: dict[str, Any]) -> None:
    """The image has what qemu-img create writes for the same options, byte for byte up
    to the end of the shorter file (qsd writes a new L1 table as a whole cluster, QEMU
    only its entries: the rest reads as zeroes either way), and passes qemu-img check."""
    size = 64 << 20
    (tmp_path / "base.raw").write_bytes(bytes(4096))
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    info = await create_qcow2(qmp, ours, {"size": size, **options})
    assert "error" not in info
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", qemu_img_opts or
                    "compat=1.1", str(theirs), str(size)], cwd=tmp_path, check=True)
    a, b = ours.read_bytes(), theirs.read_bytes()
    common = min(len(a), len(b))
    assert a[:common] == b[:common]
    assert a[common:] == bytes(len(a) - common) and b[common:] == bytes(len(b) - common)
    qemu_img_check(ours)
    image = img_info(ours)
    assert image["virtual-size"] == size
    assert image["cluster-size"] == options.get("cluster-size", 65536)
    data = image["format-specific"]["data"]
    assert data["compat"] == ("0.10" if options.get("version") == "v2" else "1.1")
    for key, value in specific.items():
        assert data[key] == value
    if "backing-file" in options:
        assert image["backing-filename"] == options["backing-file"]


@pytest.mark.parametrize("prealloc", ["falloc", "full"])
async def test_qcow2_create_preallocated(qmp: Session, tmp_path: Path,
                                         prealloc: str) -> None:
    path = tmp_path / "a.qcow2"
    size = 16 << 20
    info = await create_qcow2(qmp, path, {"size": size, "preallocation": prealloc})
    assert "error" not in info
    qemu_img_check(path)
    assert path.stat().st_size > size
    assert path.stat().st_blocks * 512 >= size
    mapping = json.loads(subprocess.run(
        ["qemu-img", "map", "-U", "--output=json", str(path)], capture_output=True,
        text=True, check=True).stdout)
    assert sum(m["length"] for m in mapping if m["data"]) == size


async def test_qcow2_create_data_file(qmp: Session, tmp_path: Path) -> None:
    data = tmp_path / "data.raw"
    await qmp.create("d", {"driver": "file", "filename": str(data), "size": 0})
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "data",
                                       "filename": str(data)})
    path = tmp_path / "a.qcow2"
    info = await create_qcow2(qmp, path, {"size": 1 << 20, "data-file": "data",
                                          "data-file-raw": True})
    assert "error" not in info
    await qmp.execute("blockdev-del", {"node-name": "data"})
    qemu_img_check(path)
    specific = img_info(path)["format-specific"]["data"]
    assert specific["data-file"] == str(data)
    assert specific["data-file-raw"] is True
    assert data.stat().st_size == 1 << 20


async def test_qcow2_create_on_a_definition(qmp: Session, tmp_path: Path) -> None:
    """A file defined inline is opened for the job and closed after it, unlocked."""
    path = tmp_path / "a.qcow2"
    await qmp.create("f", {"driver": "file", "filename": str(path), "size": 0})
    info = await qmp.create("c", {"driver": "qcow2", "size": 1 << 20, "file": {
        "driver": "file", "filename": str(path)}})
    assert "error" not in info
    assert await qmp.execute("query-named-block-nodes") == []
    subprocess.run(["qemu-img", "check", "-q", str(path)], check=True)


# Option sets that fail, and the job's error as QEMU 11.1.3 reports it.
QCOW2_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"file": "nope"}, "Cannot find device='nope' nor node-name='nope'"),
    ({"size": 1000}, "Image size must be a multiple of 512 bytes"),
    ({"cluster-size": 1000}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster-size": 4 << 20}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"cluster-size": 256}, "Cluster size must be a power of two between 512 and 2048k"),
    ({"extended-l2": True, "cluster-size": 4096},
     "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"),
    ({"extended-l2": True, "version": "v2"}, "Extended L2 entries are only supported with "
     "compatibility level 1.1 and above (use version=v3 or greater)"),
    ({"backing-file": "x", "preallocation": "metadata"}, "Backing file and preallocation "
     "can only be used at the same time if extended_l2 is on"),
    ({"backing-fmt": "raw"}, "Backing format cannot be used without backing file"),
    ({"lazy-refcounts": True, "version": "v2"}, "Lazy refcounts only supported with "
     "compatibility level 1.1 and above (use version=v3 or greater)"),
    ({"refcount-bits": 3}, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"refcount-bits": 128},
     "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"refcount-bits": 0}, "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"refcount-bits": -1},
     "Refcount width must be a power of two and may not exceed 64 bits"),
    ({"refcount-bits": 8, "version": "v2"}, "Different refcount widths than 16 bits require "
     "compatibility level 1.1 or above (use version=v3 or greater)"),
    ({"data-file-raw": True}, "data-file-raw requires data-file"),
    ({"data-file-raw": True, "data-file": "img", "backing-file": "x"},
     "Backing file and data-file-raw cannot be used at the same time"),
    ({"data-file": "img", "version": "v2"}, "External data files are only supported with "
     "compatibility level 1.1 and above (use version=v3 or greater)"),
    ({"compression-type": "zstd", "version": "v2"}, "Non-zlib compression type is only "
     "supported with compatibility level 1.1 and above (use version=v3 or greater)"),
    ({"data-file": "nope2"}, "Cannot find device='nope2' nor node-name='nope2'"),
    ({"backing-file": "a" * 1100},
     f"Could not assign backing file '{'a' * 1100}' with format '(null)': Invalid argument"),
    ({"backing-file": "a" * 1000, "backing-fmt": "raw", "cluster-size": 512},
     f"Could not assign backing file '{'a' * 1000}' with format 'raw': "
     "No space left on device"),
    ({"size": (1 << 63) - 512}, "Could not resize image: offset(9223372036854775296) "
     "exceeds maximum(9223372035781033984)"),
    ({"file": "ro"}, "Block node is read-only"),
]


async def test_qcow2_create_errors(qmp: Session, tmp_path: Path) -> None:
    path = tmp_path / "a.qcow2"
    await qmp.create("f", {"driver": "file", "filename": str(path), "size": 0})
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "img",
                                       "filename": str(path)})
    await qmp.execute("blockdev-add", {"driver": "file", "node-name": "ro",
                                       "filename": str(path), "read-only": True})
    for number, (options, error) in enumerate(QCOW2_ERRORS):
        info = await qmp.create(f"e{number}", {"driver": "qcow2", "file": "img",
                                               "size": 1 << 20, **options})
        assert info.get("error") == error, options
        assert await qmp.job_statuses(f"e{number}", "null") == [
            "created", "running", "aborting", "concluded", "null"]
    assert [n["node-name"] for n in await qmp.execute("query-named-block-nodes")] == [
        "ro", "img"]
    assert await qmp.error("blockdev-create", {"job-id": "x", "options": {
        "driver": "qcow2", "file": "img", "size": 0, "encrypt": {"format": "luks"}}}) == (
        "Parameter 'options.encrypt' is unexpected")
