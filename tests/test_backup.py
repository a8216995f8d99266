"""blockdev-backup through real daemons and clients: full and top backups of a disk that
is written meanwhile equal the disk at the start; pause, speed and cancel; the target
error policies with an injected ENOSPC; bitmap backups and their bitmap modes; the
image-fleecing flow (a backup with sync=none, a snapshot-access view of its filter,
exported over NBD); QEMU 11.1.3's events and texts.

The end-to-end test is the pull-mode incremental backup a libvirt-like stack runs: fio
writes to the disk through a FUSE export the whole time; a full backup and a new
persistent bitmap are taken in one transaction; later the bitmap is frozen and a fleecing
view is exported over NBD with it; a libnbd client reads only the extents that
qemu:dirty-bitmap:NAME reports and applies them to a copy of the full backup, which then
equals the disk at that point in time, byte for byte (qemu-img compare).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbd
import pytest

from tests.conftest import QsdFactory
from tests.harness import Monitor, Qsd, fuse_mounts, wait_for_mount

MiB = 1 << 20
CLUSTER = 1 << 16


def qemu_img(*args: str) -> str:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=True,
                          timeout=120).stdout


def qemu_io(target: str, *commands: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    result = subprocess.run([*argv, target], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "error" not in result.stdout.lower(), (
        result.stdout + result.stderr)


def compare(a: str, b: str, *opts: str, same: bool = True) -> None:
    """qemu-img compare: the images are equal (``same``) or differ."""
    result = subprocess.run(["qemu-img", "compare", "-U", *opts, a, b], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == (0 if same else 1), result.stdout + result.stderr


def add_qcow2(qmp: Monitor, name: str, path: Path, **extra: Any) -> None:
    qmp.ok("blockdev-add", driver="qcow2", **{"node-name": name}, **extra,
           file={"driver": "file", "filename": str(path)})


def job_events(qmp: Monitor, job: str, last: str, timeout: float = 60) -> list[dict[str, Any]]:
    """The events of job ``job`` up to its ``last`` event (BLOCK_JOB_COMPLETED or
    BLOCK_JOB_CANCELLED) and the final JOB_STATUS_CHANGE to null, without timestamps."""
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while True:
        for event in list(qmp.events):
            data = event.get("data", {})
            if data.get("id") == job or data.get("device") == job:
                qmp.events.remove(event)
                out.append({"event": event["event"], "data": data})
                if event["event"] == "JOB_STATUS_CHANGE" and data["status"] == "null":
                    assert any(e["event"] == last for e in out), out
                    return out
        assert time.monotonic() < deadline, out
        qmp.raw.sock.settimeout(max(deadline - time.monotonic(), 0.1))
        qmp.events.append(json.loads(qmp.raw.recv_line()))


def statuses(events: list[dict[str, Any]]) -> list[str]:
    return [e["data"]["status"] if e["event"] == "JOB_STATUS_CHANGE" else e["event"]
            for e in events]


@pytest.fixture
def images() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qsd-backup-", dir="/tmp"))
    yield path
    for mount in fuse_mounts():
        if mount.startswith(f"{path}/"):
            subprocess.run(["umount", "-l", mount], check=False)
    shutil.rmtree(path, ignore_errors=True)


def disk(path: Path, size: int = 16 * MiB, *opts: str) -> Path:
    """A qcow2 image whose even MiBs hold random data (odd ones stay unallocated)."""
    qemu_img("create", "-q", "-f", "qcow2", *opts, str(path), str(size))
    raw = path.with_suffix(".fill")
    raw.write_bytes(os.urandom(MiB))
    commands = [f"write -s {raw} {offset} {MiB}" for offset in range(0, size, 2 * MiB)]
    qemu_io(str(path), *commands)
    raw.unlink()
    return path


# ---- full and top backups ----------------------------------------------------------------


@pytest.mark.parametrize("iothread", [False, True])
def test_full_backup_is_the_point_in_time(start_qsd: QsdFactory, images: Path,
                                          iothread: bool) -> None:
    """Writes during a slow full backup change the disk, not the backup; QEMU's events.
    With an iothread, the job and the filter's copies run in it (the target moves there)."""
    src = disk(images / "src.qcow2")
    ref = images / "ref.raw"
    qemu_img("convert", "-O", "raw", str(src), str(ref))
    qemu_img("create", "-q", "-f", "qcow2", str(images / "full.qcow2"), str(16 * MiB))
    sock = images / "nbd.sock"
    qmp = Monitor(start_qsd(*(["--object", "iothread,id=io0"] if iothread else [])))
    add_qcow2(qmp, "src", src)
    add_qcow2(qmp, "full", images / "full.qcow2")
    qmp.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.ok("block-export-add", type="nbd", id="e0", writable=True, **{"node-name": "src"},
           **({"iothread": "io0"} if iothread else {}))
    qmp.ok("blockdev-backup", device="src", target="full", sync="full", speed=8 * MiB,
           **{"job-id": "j0", "filter-node-name": "cbw"})
    jobs = qmp.ok("query-block-jobs")
    assert [(j["device"], j["type"], j["len"], j["speed"]) for j in jobs] == [
        ("j0", "backup", 16 * MiB, 8 * MiB)]
    # The export now writes through the filter.
    assert [e["node-name"] for e in qmp.ok("query-block-exports")] == ["cbw"]
    nodes = {n["node-name"]: n for n in qmp.ok("query-named-block-nodes")}
    assert nodes["cbw"]["drv"] == "copy-before-write"
    uri = f"nbd+unix:///src?socket={sock}"
    qemu_io(uri, *(f"write -P 0x5a {offset + 4096} 8192" for offset in range(0, 16 * MiB, MiB)),
            fmt="raw")
    events = job_events(qmp, "j0", "BLOCK_JOB_COMPLETED")
    # QEMU's order: the job starts paused while the source is drained for its start.  A
    # job in an iothread may get there only once the drain ended (11.1.3 has no answer:
    # its bdrv_insert_node() fails an assertion for a source in an iothread).
    expected = ["created", "running", "paused", "running", "waiting", "pending",
                "BLOCK_JOB_COMPLETED", "concluded", "null"]
    assert statuses(events) in ([expected, expected[:2] + expected[4:]] if iothread
                                else [expected])
    completed = events[-3]["data"]
    assert completed == {"device": "j0", "len": 16 * MiB, "offset": 16 * MiB,
                         "speed": 8 * MiB, "type": "backup"}
    assert "cbw" not in {n["node-name"] for n in qmp.ok("query-named-block-nodes")}
    qmp.ok("blockdev-del", **{"node-name": "full"})    # writes its qcow2 metadata back
    compare(str(ref), str(images / "full.qcow2"))
    qemu_io(uri, "read -P 0x5a 4096 8192", fmt="raw")


def test_top_backup_copies_only_the_top_layer(start_qsd: QsdFactory, images: Path) -> None:
    base = disk(images / "base.qcow2")
    top = images / "top.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(base), str(top))
    qemu_io(str(top), f"write -P 0x11 {3 * MiB} {MiB}", f"write -P 0x22 {8 * MiB} 4096")
    qemu_img("create", "-q", "-f", "qcow2", str(images / "t.qcow2"), str(16 * MiB))
    qmp = Monitor(start_qsd())
    add_qcow2(qmp, "top", top)
    add_qcow2(qmp, "t", images / "t.qcow2")
    qmp.ok("blockdev-backup", device="top", target="t", sync="top", **{"job-id": "j0"})
    assert statuses(job_events(qmp, "j0", "BLOCK_JOB_COMPLETED"))[-3] == "BLOCK_JOB_COMPLETED"
    qmp.ok("blockdev-del", **{"node-name": "t"})
    mapped = [(e["start"], e["length"]) for e in
              json.loads(qemu_img("map", "-U", "--output=json",
                                                str(images / "t.qcow2")))
              if e["data"]]
    assert mapped == [(3 * MiB, MiB), (8 * MiB, CLUSTER)]
    qemu_io(str(images / "t.qcow2"), f"read -P 0x11 {3 * MiB} {MiB}",
            f"read -P 0x22 {8 * MiB} 4096")


def test_discard_source(start_qsd: QsdFactory, images: Path) -> None:
    """discard-source: what was copied is discarded on the source (which must allow
    discards); the target has the data, the source reads as zeroes, as with 11.1.3."""
    src, tgt = images / "s.qcow2", images / "t.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(src), str(4 * MiB))
    qemu_io(str(src), f"write -P 7 0 {4 * MiB}")
    qemu_img("create", "-q", "-f", "qcow2", str(tgt), str(4 * MiB))
    qmp = Monitor(start_qsd())
    add_qcow2(qmp, "src", src, discard="unmap")
    add_qcow2(qmp, "tgt", tgt)
    qmp.ok("blockdev-backup", device="src", target="tgt", sync="full",
           **{"job-id": "j0", "discard-source": True})
    job_events(qmp, "j0", "BLOCK_JOB_COMPLETED")
    qmp.ok("blockdev-del", **{"node-name": "src"})
    qmp.ok("blockdev-del", **{"node-name": "tgt"})
    mapped = json.loads(qemu_img("map", "--output=json", str(src)))
    assert [(e["length"], e["zero"], e["data"]) for e in mapped] == [(4 * MiB, True, False)]
    qemu_io(str(tgt), f"read -P 7 0 {4 * MiB}")


def test_cancel_and_pause(start_qsd: QsdFactory, images: Path) -> None:
    src = disk(images / "src.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", str(images / "t.qcow2"), str(16 * MiB))
    qmp = Monitor(start_qsd())
    add_qcow2(qmp, "src", src)
    add_qcow2(qmp, "t", images / "t.qcow2")
    qmp.ok("blockdev-backup", device="src", target="t", sync="full", speed=MiB,
           **{"job-id": "j0"})
    qmp.ok("job-pause", id="j0")
    deadline = time.monotonic() + 10
    while qmp.ok("query-jobs")[0]["status"] != "paused":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert qmp.err("job-pause", id="j0") == "Job is already paused"
    qmp.ok("job-resume", id="j0")
    qmp.ok("block-job-set-speed", device="j0", speed=0)
    qmp.ok("block-job-cancel", device="j0")
    events = statuses(job_events(qmp, "j0", "BLOCK_JOB_CANCELLED"))
    assert events[:2] == ["created", "running"] and events[-3:] == [
        "BLOCK_JOB_CANCELLED", "concluded", "null"]
    # sync=none only ends when cancelled.
    qmp.ok("blockdev-backup", device="src", target="t", sync="none", **{"job-id": "j1"})
    time.sleep(0.2)
    assert qmp.ok("query-jobs")[0]["status"] == "running"
    qmp.ok("block-job-cancel", device="j1")
    assert statuses(job_events(qmp, "j1", "BLOCK_JOB_CANCELLED")) == [
        "created", "running", "paused", "running", "aborting", "BLOCK_JOB_CANCELLED",
        "concluded", "null"]
    assert {n["node-name"] for n in qmp.ok("query-named-block-nodes")} >= {"src", "t"}
    assert len(qmp.ok("query-named-block-nodes")) == 4


@pytest.mark.parametrize("policy,expected", [
    ("stop", ["BLOCK_JOB_ERROR", "paused", "running", "waiting", "pending",
              "BLOCK_JOB_COMPLETED", "concluded", "null"]),
    ("report", ["BLOCK_JOB_ERROR", "aborting", "BLOCK_JOB_COMPLETED", "concluded", "null"]),
    ("ignore", ["BLOCK_JOB_ERROR", "waiting", "pending", "BLOCK_JOB_COMPLETED",
                "concluded", "null"]),
])
def test_target_error_policies(start_qsd: QsdFactory, policy: str,
                               expected: list[str]) -> None:
    """One injected ENOSPC on the target under each on-target-error policy: QEMU
    11.1.3's events (recorded with the same graph), io-status, the error text."""
    qmp = Monitor(start_qsd("--blockdev", "null-co,node-name=src,size=4194304"))
    qmp.ok("blockdev-add", driver="raw", file={
        "driver": "blkdebug", "image": {"driver": "null-co", "size": 4 * MiB},
        "inject-error": [{"event": "write_aio", "errno": 28, "once": True}]},
        **{"node-name": "tgt"})
    qmp.ok("blockdev-backup", device="src", target="tgt", sync="full",
           **{"job-id": "j0", "on-target-error": policy})
    # The reply comes once the job runs again after its start (as in QEMU).
    assert statuses(qmp.events) == ["created", "running", "paused", "running"]
    qmp.events.clear()
    if policy == "stop":
        deadline = time.monotonic() + 10
        while (job := qmp.ok("query-block-jobs")[0])["status"] != "paused":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert (job["io-status"], job["offset"], job["paused"]) == ("nospace", 3 * MiB, True)
        qmp.ok("block-job-resume", device="j0")
    last = "BLOCK_JOB_COMPLETED"
    events = job_events(qmp, "j0", last)
    assert statuses(events) == expected
    assert events[0]["data"] == {"device": "j0", "operation": "write", "action": policy}
    completed = next(e["data"] for e in events if e["event"] == last)
    if policy == "report":
        assert completed == {"device": "j0", "len": 4 * MiB, "offset": 3 * MiB, "speed": 0,
                             "type": "backup", "error": "No space left on device"}
    else:
        assert completed["offset"] == 4 * MiB and "error" not in completed


def test_source_error_stops_and_resumes(start_qsd: QsdFactory) -> None:
    """An EIO reading the source under on-source-error=stop: 11.1.3's event and
    io-status (recorded with the same graph), then the job completes once resumed."""
    qmp = Monitor(start_qsd("--blockdev", "null-co,node-name=tgt,size=4194304"))
    qmp.ok("blockdev-add", driver="raw", file={
        "driver": "blkdebug", "image": {"driver": "null-co", "size": 4 * MiB},
        "inject-error": [{"event": "read_aio", "errno": 5, "once": True}]},
        **{"node-name": "src"})
    qmp.ok("blockdev-backup", device="src", target="tgt", sync="full",
           **{"job-id": "j0", "on-source-error": "stop"})
    assert qmp.wait_event("BLOCK_JOB_ERROR")["data"] == {
        "device": "j0", "operation": "read", "action": "stop"}
    deadline = time.monotonic() + 10
    while (job := qmp.ok("query-block-jobs")[0])["status"] != "paused":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert (job["io-status"], job["offset"]) == ("failed", 3 * MiB)
    qmp.ok("block-job-resume", device="j0")
    events = job_events(qmp, "j0", "BLOCK_JOB_COMPLETED")
    assert statuses(events)[-6:] == ["running", "waiting", "pending", "BLOCK_JOB_COMPLETED",
                                     "concluded", "null"]
    assert events[-3]["data"]["offset"] == 4 * MiB


# ---- bitmaps -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,ok,left", [
    ("on-success", True, "successor"), ("on-success", False, "both"),
    ("always", True, "successor"), ("always", False, "successor+rest"),
    ("never", True, "both"), ("never", False, "both"),
])
def test_bitmap_modes(start_qsd: QsdFactory, images: Path, mode: str, ok: bool,
                      left: str) -> None:
    """What the bitmap holds afterwards: the writes since the start (successor), or the
    old bits too (both), or with 'always' after a failure also what was not copied."""
    src = disk(images / "src.qcow2")
    qemu_img("create", "-q", "-f", "qcow2", str(images / "t.qcow2"), str(16 * MiB))
    qmp = Monitor(start_qsd())
    add_qcow2(qmp, "src", src)
    add_qcow2(qmp, "t", images / "t.qcow2")
    sock = images / "nbd.sock"
    qmp.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.ok("block-export-add", type="nbd", id="e0", writable=True, **{"node-name": "src"})
    qmp.ok("block-dirty-bitmap-add", node="src", name="b0")
    uri = f"nbd+unix:///src?socket={sock}"
    qemu_io(uri, f"write -P 1 0 {MiB}", f"write -P 2 {4 * MiB} {MiB}", fmt="raw")
    qmp.ok("blockdev-backup", device="src", target="t", sync="bitmap", bitmap="b0",
           speed=MiB // 2, **{"job-id": "j0", "bitmap-mode": mode})
    assert qmp.err("block-dirty-bitmap-clear", node="src", name="b0") == (
        "Bitmap 'b0' is currently in use by another operation and cannot be used")
    qemu_io(uri, f"write -P 3 {8 * MiB} 4096", fmt="raw")
    if ok:
        qmp.ok("block-job-set-speed", device="j0", speed=0)
        last = "BLOCK_JOB_COMPLETED"
    else:
        qmp.ok("block-job-cancel", device="j0")
        last = "BLOCK_JOB_CANCELLED"
    job_events(qmp, "j0", last)
    nodes = {n["node-name"]: n for n in qmp.ok("query-named-block-nodes")}
    [bitmap] = nodes["src"]["dirty-bitmaps"]
    assert (bitmap["name"], bitmap["busy"], bitmap["recording"]) == ("b0", False, True)
    count = bitmap["count"]
    if left == "successor":
        assert count == CLUSTER
    elif left == "both":
        assert count == 2 * MiB + CLUSTER
    else:
        assert CLUSTER < count <= 2 * MiB + CLUSTER
    if ok:
        qmp.ok("blockdev-del", **{"node-name": "t"})
        qemu_io(str(images / "t.qcow2"), f"read -P 1 0 {MiB}", f"read -P 2 {4 * MiB} {MiB}",
                f"read -P 0 {MiB} {MiB}")


# ---- transactions -------------------------------------------------------------------------


def test_transaction_events_as_qemu(start_qsd: QsdFactory) -> None:
    """Backups in transactions, events as 11.1.3 emits them (recorded with the same
    nodes): actions commit newest first, so the second job runs first; a grouped
    transaction completes its jobs together; an aborted transaction takes its job back
    before it ever ran."""
    qmp = Monitor(start_qsd("--blockdev", "null-co,node-name=src,size=4194304",
                            "--blockdev", "null-co,node-name=t1,size=4194304",
                            "--blockdev", "null-co,node-name=t2,size=4194304"))

    def backup_action(job: str, target: str) -> dict[str, Any]:
        return {"type": "blockdev-backup", "data": {"device": "src", "target": target,
                                                    "sync": "full", "job-id": job}}

    assert qmp.err("transaction", actions=[backup_action("j0", "t1"),
                                           {"type": "abort", "data": {}}]) == (
        "Transaction aborted using Abort action")
    assert [(e["data"]["id"], e["data"]["status"]) for e in qmp.events] == [
        ("j0", "created"), ("j0", "aborting"), ("j0", "concluded"), ("j0", "null")]
    qmp.events.clear()
    assert {n["node-name"] for n in qmp.ok("query-named-block-nodes")} == {"src", "t1", "t2"}
    qmp.ok("transaction", actions=[backup_action("j0", "t1"), backup_action("j1", "t2")],
           properties={"completion-mode": "grouped"})
    started = [(e["data"]["id"], e["data"]["status"]) for e in qmp.events]
    assert started == [("j0", "created"), ("j1", "created"), ("j1", "running"),
                       ("j1", "paused"), ("j0", "running"), ("j0", "paused"),
                       ("j1", "running"), ("j0", "running")]
    qmp.events.clear()
    deadline = time.monotonic() + 30
    while sum(e["event"] == "JOB_STATUS_CHANGE" and e["data"]["status"] == "null"
              for e in qmp.events) < 2:
        assert time.monotonic() < deadline, qmp.events
        qmp.events.append(json.loads(qmp.raw.recv_line()))
    done = [(e["data"].get("id") or e["data"]["device"],
             e["data"]["status"] if e["event"] == "JOB_STATUS_CHANGE" else e["event"])
            for e in qmp.events]
    assert sorted(done[:2]) == [("j0", "waiting"), ("j1", "waiting")]
    assert done[2:] == [("j1", "pending"), ("j0", "pending"),
                        ("j1", "BLOCK_JOB_COMPLETED"), ("j1", "concluded"), ("j1", "null"),
                        ("j0", "BLOCK_JOB_COMPLETED"), ("j0", "concluded"), ("j0", "null")]


# ---- image fleecing -----------------------------------------------------------------------


def test_fleecing_view_over_nbd(start_qsd: QsdFactory, images: Path) -> None:
    """QEMU's image-fleecing flow (iotest image-fleecing): a backup with sync=none keeps
    old data in a temporary image while the disk is written; a snapshot-access node over
    its filter, exported over NBD, reads the disk as it was when the job started."""
    src = disk(images / "src.qcow2")
    ref = images / "ref.raw"
    qemu_img("convert", "-O", "raw", str(src), str(ref))
    (images / "fleece.raw").write_bytes(bytes(16 * MiB))
    sock = images / "nbd.sock"
    qmp = Monitor(start_qsd())
    add_qcow2(qmp, "src", src)
    qmp.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.ok("block-export-add", type="nbd", id="disk", writable=True, **{"node-name": "src"})
    qmp.ok("blockdev-add", driver="file", filename=str(images / "fleece.raw"),
           **{"node-name": "tmp"})
    qmp.ok("blockdev-backup", device="src", target="tmp", sync="none",
           **{"job-id": "fleecing", "filter-node-name": "fl-cbw"})
    qmp.ok("blockdev-add", driver="snapshot-access", file="fl-cbw",
           **{"node-name": "fl-access"})
    qmp.ok("block-export-add", type="nbd", id="view", **{"node-name": "fl-access"})
    disk_uri = f"nbd+unix:///src?socket={sock}"
    view_uri = f"nbd+unix:///fl-access?socket={sock}"
    overwrite = [(0xab, 0, 64 << 10), (0xad, MiB - (32 << 10), 64 << 10),
                 (0xea, 8 * MiB + 4096, 4096), (0x1d, 15 * MiB, MiB)]
    qemu_io(disk_uri, *(f"write -P {p} {o} {n}" for p, o, n in overwrite), fmt="raw")
    qemu_io(disk_uri, f"write -z {3 * MiB} {MiB}", fmt="raw")
    compare(str(ref), view_uri, "-f", "raw", "-F", "raw")
    # Block status through the view: the point in time's allocation where the disk still
    # has it, the temporary image's where a cluster was copied there (MiB + 64 KiB: the
    # write at 1 MiB - 32 KiB had the cluster after 1 MiB copied too).
    mapped = json.loads(qemu_img("map", "--output=json", "-f", "raw", view_uri))
    assert [(e["start"], e["data"]) for e in mapped][:3] == [
        (0, True), (MiB + (64 << 10), False), (2 * MiB, True)]
    qmp.ok("block-export-del", id="view")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    qmp.ok("blockdev-del", **{"node-name": "fl-access"})
    qmp.ok("block-job-cancel", device="fleecing")
    assert statuses(job_events(qmp, "fleecing", "BLOCK_JOB_CANCELLED"))[-3] == (
        "BLOCK_JOB_CANCELLED")
    qmp.ok("blockdev-del", **{"node-name": "tmp"})
    for pattern, offset, length in overwrite:
        qemu_io(disk_uri, f"read -P {pattern} {offset} {length}", fmt="raw")
    # Only the clusters the writes touched were copied to the temporary image.
    copied = (images / "fleece.raw").read_bytes()
    assert copied[:64 << 10] == ref.read_bytes()[:64 << 10]
    assert copied[5 * MiB:6 * MiB] == bytes(MiB)


# ---- QEMU's texts ----------------------------------------------------------------------------


def backup(**args: Any) -> tuple[str, dict[str, Any]]:
    return "blockdev-backup", {"device": "src", "target": "tgt", "sync": "full",
                               "job-id": "j0", **args}


ERROR_STEPS: list[tuple[str, dict[str, Any]]] = [
    backup(device="nope"),
    backup(target="nope"),
    backup(target="src"),
    backup(sync="bitmap"),
    backup(sync="incremental"),
    backup(sync="incremental", bitmap="b0", **{"bitmap-mode": "never"}),
    backup(bitmap="nope"),
    backup(**{"bitmap-mode": "always"}),
    backup(compress=True),
    backup(target="small"),
    backup(**{"x-perf": {"max-workers": 0}}),
    backup(**{"x-perf": {"max-chunk": -1}}),
    backup(**{"x-perf": {"max-chunk": 4096}}),
    backup(**{"x-perf": {"min-cluster-size": 1000}}),
    backup(**{"job-id": "1x"}),
    backup(**{"filter-node-name": "src"}),
    backup(**{"filter-node-name": "1x"}),
    backup(speed=-1),
    backup(sync="nope"),
    ("blockdev-backup", {"device": "src", "sync": "full"}),
    ("query-named-block-nodes", {"flat": True}),
    ("blockdev-add", {"driver": "copy-before-write", "node-name": "c0", "file": "src",
                      "target": "tgt", "bitmap": {"node": "nope", "name": "x"}}),
    ("blockdev-add", {"driver": "copy-before-write", "node-name": "c0", "file": "src",
                      "target": "tgt", "bitmap": {"node": "src", "name": "x"}}),
    ("blockdev-add", {"driver": "copy-before-write", "node-name": "c0", "file": "src",
                      "target": "tgt", "min-cluster-size": 1000}),
    ("blockdev-add", {"driver": "copy-before-write", "node-name": "c0", "file": "src"}),
    ("blockdev-add", {"driver": "copy-before-write", "node-name": "c0", "file": "src",
                      "target": "tgt", "on-cbw-error": "x"}),
    ("blockdev-add", {"driver": "copy-before-write", "node-name": "c0", "file": "src",
                      "target": "tgt", "cbw-timeout": 5, "on-cbw-error": "break-snapshot"}),
    ("blockdev-add", {"driver": "snapshot-access", "node-name": "s0", "file": "c0"}),
    ("blockdev-add", {"driver": "snapshot-access", "node-name": "s1"}),
    ("query-named-block-nodes", {"flat": True}),
    ("x-debug-query-block-graph", {}),
    ("blockdev-del", {"node-name": "c0"}),
    ("blockdev-del", {"node-name": "s0"}),
    ("blockdev-del", {"node-name": "c0"}),
    # a running backup's nodes are busy for another one
    backup(speed=1, **{"job-id": "j1"}),
    backup(**{"job-id": "j2"}),
    backup(target="src", device="tgt", **{"job-id": "j2"}),
    ("blockdev-del", {"node-name": "tgt"}),
    ("block-job-cancel", {"device": "j1"}),
]
DAEMON_ARGS = ["--blockdev", "null-co,node-name=src,size=4194304,read-zeroes=on",
               "--blockdev", "null-co,node-name=tgt,size=4194304,read-zeroes=on",
               "--blockdev", "null-co,node-name=small,size=1048576,read-zeroes=on"]
GOLDEN = Path(__file__).parent / "golden" / "backup_errors.txt"


def test_errors_match_qemu() -> None:
    """Every refusal of blockdev-backup and of the two drivers, and the graph they
    leave (nothing), byte for byte as QEMU 11.1.3's daemon answers.  Recorded with::

        python3 -m tests.test_backup --record -- qemu-storage-daemon
    """
    from tests.harness import QSD, replay

    directory = tempfile.mkdtemp(prefix="qsd-bkq-", dir="/tmp")
    try:
        ours = replay([*QSD, *DAEMON_ARGS], directory, ERROR_STEPS)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    golden = GOLDEN.read_text().splitlines()
    assert len(ours) == len(golden)
    for step, (expected, got) in enumerate(zip(golden, ours, strict=True)):
        assert got == expected, (step, ERROR_STEPS[step])


# ---- the end-to-end pull-mode incremental backup -----------------------------------------


def fio_writer(path: Path) -> subprocess.Popen[bytes]:
    """fio random 4 KiB writes (500 a second) to a quarter of the mounted disk until
    killed, in its own process group (ended by that group's id)."""
    return subprocess.Popen(
        ["fio", "--name=w", f"--filename={path}", "--rw=randwrite", "--bs=4k",
         "--offset=16m", "--size=16m", "--rate_iops=500", "--direct=1",
         "--ioengine=libaio", "--iodepth=8", "--time_based", "--runtime=600",
         "--output-format=terse", "--randrepeat=0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def stop_fio(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    if proc.stderr is not None:
        proc.stderr.close()


def dirty_extents(uri: str, context: str) -> tuple[list[tuple[int, int]], int]:
    """The dirty extents that ``context`` reports over the export, and its size."""
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    try:
        assert h.can_meta_context(context)
        size = h.get_size()
        extents: list[tuple[int, int]] = []
        offset = 0
        while offset < size:
            found: list[int] = []

            def collect(ctx: str, start: int, entries: list[int], err: int,
                        out: list[int] = found) -> int:
                if ctx == context:
                    out.extend(entries)
                return 0

            h.block_status(min(size - offset, 1 << 30), offset, collect)
            assert found
            for length, flags in zip(found[::2], found[1::2], strict=True):
                if flags & 1:
                    extents.append((offset, length))
                offset += length
        return extents, size
    finally:
        h.shutdown()


def apply_extents(uri: str, extents: list[tuple[int, int]], restored: Path) -> int:
    """Reads each extent over NBD and writes it into the raw image; returns the bytes
    read."""
    h = nbd.NBD()
    h.connect_uri(uri)
    done = 0
    try:
        with open(restored, "r+b") as out:
            for start, length in extents:
                for pos in range(start, start + length, 4 * MiB):
                    count = min(4 * MiB, start + length - pos)
                    out.seek(pos)
                    out.write(h.pread(count, pos))
                    done += count
    finally:
        h.shutdown()
    return done


def test_incremental_backup_over_fuse_and_nbd(start_qsd: QsdFactory, images: Path) -> None:
    size = 64 * MiB
    src = disk(images / "disk.qcow2", size)
    full = images / "full.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", str(full), str(size))
    qemu_img("create", "-q", "-f", "raw", str(images / "fleece.raw"), str(size))
    mount = images / "disk.mnt"
    mount.touch()
    sock = images / "nbd.sock"
    daemon: Qsd = start_qsd(
        "--blockdev", f"driver=file,node-name=disk-file,filename={src}",
        "--blockdev", "driver=qcow2,node-name=disk,file=disk-file",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", f"fuse,id=fuse0,node-name=disk,mountpoint={mount},writable=on")
    wait_for_mount(mount, daemon)
    qmp = Monitor(daemon)
    add_qcow2(qmp, "full", full)
    writer = fio_writer(mount)
    try:
        time.sleep(1)
        assert writer.poll() is None
        # (a) the full backup and the bitmap that starts at the same point in time
        qmp.ok("transaction", actions=[
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "disk", "name": "b0", "persistent": True}},
            {"type": "blockdev-backup",
             "data": {"device": "disk", "target": "full", "sync": "full",
                      "job-id": "full0"}}])
        events = job_events(qmp, "full0", "BLOCK_JOB_COMPLETED", timeout=300)
        assert "error" not in events[-3]["data"], events
        qmp.ok("blockdev-del", **{"node-name": "full"})    # its qcow2 metadata written
        time.sleep(1)
        # (b) freeze b0, start b1 for next time, and put the fleecing view in place
        qmp.ok("blockdev-add", driver="file", filename=str(images / "fleece.raw"),
               **{"node-name": "fleece"})
        qmp.ok("transaction", actions=[
            {"type": "block-dirty-bitmap-add",
             "data": {"node": "disk", "name": "b1", "persistent": True}},
            {"type": "block-dirty-bitmap-disable", "data": {"node": "disk", "name": "b0"}},
            {"type": "blockdev-backup",
             "data": {"device": "disk", "target": "fleece", "sync": "none",
                      "job-id": "fleece0", "filter-node-name": "cbw"}}])
        qmp.ok("blockdev-add", driver="snapshot-access", file="cbw",
               **{"node-name": "view"})
        qmp.ok("block-export-add", type="nbd", id="inc", name="inc",
               bitmaps=[{"node": "disk", "name": "b0"}], **{"node-name": "view"})
        uri = f"nbd+unix:///inc?socket={sock}"
        extents, exported = dirty_extents(uri, "qemu:dirty-bitmap:b0")
        assert exported == size and extents
        restored = images / "restored.raw"
        qemu_img("convert", "-O", "raw", str(full), str(restored))
        read = apply_extents(uri, extents, restored)
        assert 0 < read < size // 2, read
        assert writer.poll() is None      # fio wrote the whole time
        # (c) full + incremental equals the disk at the point in time: the view; the
        # full backup alone does not (fio wrote in between)
        compare(str(restored), uri, "-f", "raw", "-F", "raw")
        compare(str(full), uri, "-f", "qcow2", "-F", "raw", same=False)
        qmp.ok("block-export-del", id="inc")
        qmp.wait_event("BLOCK_EXPORT_DELETED")
        qmp.ok("blockdev-del", **{"node-name": "view"})
        qmp.ok("block-job-cancel", device="fleece0")
        job_events(qmp, "fleece0", "BLOCK_JOB_CANCELLED")
        qmp.ok("blockdev-del", **{"node-name": "fleece"})
    finally:
        stop_fio(writer)
    qmp.ok("block-export-del", id="fuse0")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    assert daemon.stop() == 0
    info = qemu_img("info", "--output=json", str(src))
    bitmaps = json.loads(info)["format-specific"]["data"]["bitmaps"]
    assert sorted(b["name"] for b in bitmaps) == ["b0", "b1"]
    qemu_img("check", "-q", str(src))
    qemu_img("check", "-q", str(full))
    # fio went on writing after the point in time: the disk moved on from it
    compare(str(restored), str(src), "-f", "raw", "-F", "qcow2", same=False)


if __name__ == "__main__":
    import sys

    from tests.harness import replay

    if sys.argv[1:3] != ["--record", "--"] or len(sys.argv) < 4:
        sys.exit(f"usage: {sys.argv[0]} --record -- DAEMON [ARGS...]")
    directory = tempfile.mkdtemp(prefix="qsd-bkq-", dir="/tmp")
    try:
        lines = replay([*sys.argv[3:], *DAEMON_ARGS], directory, ERROR_STEPS)
        GOLDEN.write_text("".join(line + "\n" for line in lines))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
