"""block-stream, block-commit and blockdev-mirror through a real daemon: a 3-image qcow2
chain streamed and committed (checked against the flattened chain with qemu-img compare,
every image checked with qemu-img check), a stream while fio writes the image; a mirror
of an NBD export under fio load switched to the target while fio writes, a write-blocking
mirror, a mirror held to its speed and one that follows an iothread move."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from tests.conftest import QsdFactory
from tests.harness import Monitor, Qsd, wait_for_mount

MiB = 1 << 20


def img(*args: object) -> str:
    return subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True,
                          text=True, timeout=120).stdout


def qemu_io(path: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    result = subprocess.run([*argv, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "error" not in result.stdout.lower(), (
        result.stdout + result.stderr)


def make_chain(d: Path) -> tuple[Path, Path, Path]:
    """base <- mid <- top, 8 MiB, each layer with data of its own, zeroes written over
    lower data, and writes that cover clusters only in part."""
    base, mid, top = d / "base.qcow2", d / "mid.qcow2", d / "top.qcow2"
    img("create", "-q", "-f", "qcow2", base, "8M")
    qemu_io(base, "write -P 0x11 0 4M", "write -P 0x12 6M 1M")
    img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, mid)
    qemu_io(mid, "write -P 0x21 1M 2M", "write -z 6M 512k", "write -P 0x22 3588k 4k")
    img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", mid, top)
    qemu_io(top, "write -P 0x31 2M 1M", "write -P 0x32 7M 64k", "write -z 0 64k",
            "write -P 0x33 5000k 3k")
    return base, mid, top


def flatten(image: Path, out: Path) -> None:
    img("convert", "-O", "raw", image, out)


def same(image: Path, reference: Path) -> None:
    """The image (through its chain) reads as the raw reference, byte for byte."""
    subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", str(image), str(reference)],
                   check=True, timeout=120)


def check(*images: Path) -> None:
    for image in images:
        subprocess.run(["qemu-img", "check", "-q", str(image)], check=True, timeout=60)


def backing_of(image: Path) -> str | None:
    info = json.loads(img("info", "--output=json", "-U", image))
    value = info.get("full-backing-filename")
    return str(value) if value is not None else None


def add_chain(qmp: Monitor, base: Path, mid: Path, top: Path) -> None:
    """Each layer as a node of its own, all writable."""
    for name, path, backing in (("base", base, None), ("mid", mid, "base"),
                                ("top", top, "mid")):
        qmp.ok("blockdev-add", driver="qcow2", **{"node-name": name}, backing=backing,
               file={"driver": "file", "filename": str(path),
                     "node-name": f"{name}-file"})


def node_names(qmp: Monitor) -> list[str]:
    return [n["node-name"] for n in qmp.ok("query-named-block-nodes")]


def wait_done(qmp: Monitor, job: str, timeout: float = 120) -> dict[str, Any]:
    event = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout)
    assert event["data"]["device"] == job
    assert "error" not in event["data"], event
    return event


def quit_daemon(daemon: Qsd, qmp: Monitor) -> None:
    """quit, and wait until the daemon has closed its images (and let go of their
    locks) and exited."""
    qmp.ok("quit")
    assert daemon.wait() == 0


def exported_chain(start_qsd: QsdFactory, chain: tuple[Path, Path, Path, Path],
                   sock: Path) -> tuple[Qsd, Monitor]:
    """A daemon with the chain's nodes and 'top' exported writable over NBD at ``sock``
    (export name 'top')."""
    base, mid, top, _ = chain
    daemon = start_qsd()
    qmp = Monitor(daemon)
    add_chain(qmp, base, mid, top)
    qmp.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.ok("block-export-add", type="nbd", id="e0", **{"node-name": "top"}, writable=True)
    return daemon, qmp


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    base, mid, top = make_chain(tmp_path)
    reference = tmp_path / "flat.raw"
    flatten(top, reference)
    return base, mid, top, reference


def test_stream_to_a_base(chain: tuple[Path, Path, Path, Path],
                          start_qsd: QsdFactory) -> None:
    base, mid, top, reference = chain
    daemon = start_qsd()
    qmp = Monitor(daemon)
    add_chain(qmp, base, mid, top)
    qmp.ok("block-stream", **{"job-id": "s0", "device": "top", "base-node": "base"})
    event = wait_done(qmp, "s0")
    assert event["data"]["type"] == "stream"
    assert event["data"]["offset"] == event["data"]["len"] == 8 * MiB
    nodes = {n["node-name"]: n for n in qmp.ok("query-named-block-nodes")}
    assert nodes["top"]["backing_file"] == str(base)
    assert {"child": "backing", "node-name": "base"} in nodes["top"]["children"]
    assert qmp.ok("query-block-jobs") == []
    quit_daemon(daemon, qmp)
    assert backing_of(top) == str(base)
    same(top, reference)
    check(base, mid, top)


def test_stream_the_whole_chain(chain: tuple[Path, Path, Path, Path],
                                start_qsd: QsdFactory) -> None:
    """The top image opens its chain from its header (backing files read-only); after
    the stream it stands alone and the nodes below are gone."""
    base, mid, top, reference = chain
    daemon = start_qsd()
    qmp = Monitor(daemon)
    qmp.ok("blockdev-add", driver="qcow2", **{"node-name": "top"},
           file={"driver": "file", "filename": str(top)})
    assert len(node_names(qmp)) == 6
    qmp.ok("block-stream", **{"job-id": "s0", "device": "top", "speed": 0})
    wait_done(qmp, "s0")
    deadline = time.monotonic() + 10
    while len(node_names(qmp)) != 2:
        assert time.monotonic() < deadline, node_names(qmp)
        time.sleep(0.05)
    quit_daemon(daemon, qmp)
    assert backing_of(top) is None
    same(top, reference)
    check(base, mid, top)


def fio_nbd(sock: Path, export: str, *args: str) -> list[str]:
    """fio through an NBD export of the daemon (fio's nbd engine, libnbd)."""
    return ["fio", "--name=t", "--ioengine=nbd",
            f"--uri=nbd+unix:///{export}?socket={sock}", "--bs=4k", "--iodepth=8",
            "--verify_state_save=0", "--output-format=terse", *args]


def test_stream_under_writes(chain: tuple[Path, Path, Path, Path], tmp_path: Path,
                             start_qsd: QsdFactory) -> None:
    """fio writes the top image through NBD while the stream copies into it: every
    block fio wrote reads back as written (no copy of the chain lands over it)."""
    base, mid, top, _ = chain
    sock = tmp_path / "nbd.sock"
    daemon, qmp = exported_chain(start_qsd, chain, sock)
    # 2048 random 4 KiB writes at 500 a second, each block once, then read back.
    load = subprocess.Popen(fio_nbd(sock, "top", "--rw=randwrite", "--size=8M",
                                    "--verify=crc32c", "--rate_iops=500", "--do_verify=1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        qmp.ok("block-stream", **{"job-id": "s0", "device": "top", "base-node": "base",
                                  "speed": 2 * MiB})
        wait_done(qmp, "s0")
        assert load.poll() is None, "fio ended before the stream did"
        out, err = load.communicate(timeout=120)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert load.returncode == 0, err
    fields = out.split(";")
    assert fields[4] == "0" and int(fields[5]) == 8 * 1024, out   # no error, all verified
    qmp.ok("block-export-del", id="e0")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    quit_daemon(daemon, qmp)
    assert backing_of(top) == str(base)
    check(base, mid, top)


def test_commit_an_intermediate_image(chain: tuple[Path, Path, Path, Path],
                                      start_qsd: QsdFactory) -> None:
    base, mid, top, reference = chain
    mid_reference = base.parent / "mid.raw"
    flatten(mid, mid_reference)
    daemon = start_qsd()
    qmp = Monitor(daemon)
    add_chain(qmp, base, mid, top)
    qmp.ok("block-commit", **{"job-id": "c0", "device": "top", "top-node": "mid",
                              "base-node": "base"})
    event = wait_done(qmp, "c0")
    assert event["data"]["type"] == "commit"
    nodes = {n["node-name"]: n for n in qmp.ok("query-named-block-nodes")}
    assert nodes["top"]["backing_file"] == str(base)
    quit_daemon(daemon, qmp)
    assert backing_of(top) == str(base)
    same(top, reference)
    same(base, mid_reference)    # the base holds what mid showed
    check(base, mid, top)


def test_commit_the_active_layer(chain: tuple[Path, Path, Path, Path], tmp_path: Path,
                                 start_qsd: QsdFactory) -> None:
    """Active commit is a mirror into the base: ready, then job-complete moves the NBD
    export from the top image to the base, which reads as the whole chain did."""
    base, mid, top, reference = chain
    sock = tmp_path / "nbd.sock"
    daemon, qmp = exported_chain(start_qsd, chain, sock)
    qmp.ok("block-commit", **{"job-id": "c0", "device": "top", "base-node": "base"})
    ready = qmp.wait_event("BLOCK_JOB_READY", 60)
    assert ready["data"]["type"] == "commit"
    qmp.ok("job-complete", id="c0")
    wait_done(qmp, "c0")
    assert [e["node-name"] for e in qmp.ok("query-block-exports")] == ["base"]
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw",
                    f"nbd+unix:///top?socket={sock}", str(reference)], check=True,
                   timeout=120)
    qmp.ok("block-export-del", id="e0")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    quit_daemon(daemon, qmp)
    same(base, reference)
    check(base, mid, top)


# ---- blockdev-mirror ---------------------------------------------------------------------------


class MirrorDisk(NamedTuple):
    daemon: Qsd
    qmp: Monitor
    sock: Path
    src: Path
    dst: Path


@pytest.fixture
def mirror_disk(fuse_dir: Path, start_qsd: QsdFactory) -> MirrorDisk:
    """A daemon exporting 'src' (a 128 MiB qcow2 image, all written) writable
    over NBD as 'e0' (socket ``nbd.sock``), and 'dst', an empty qcow2 image of the same
    size.  (A writable FUSE export takes the resize permission, which a mirror does not
    share: QEMU 11.1.3 refuses to mirror one, and so does qsd.)"""
    src, dst = fuse_dir / "src.qcow2", fuse_dir / "dst.qcow2"
    img("create", "-q", "-f", "qcow2", src, "128M")
    qemu_io(src, "write -P 0x5a 0 128M")
    img("create", "-q", "-f", "qcow2", dst, "128M")
    daemon = start_qsd()
    qmp = Monitor(daemon)
    for name, path in (("src", src), ("dst", dst)):
        qmp.ok("blockdev-add", driver="qcow2", **{"node-name": name},
               file={"driver": "file", "filename": str(path)})
    sock = fuse_dir / "nbd.sock"
    qmp.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.ok("block-export-add", type="nbd", id="e0", **{"node-name": "src"}, writable=True)
    return MirrorDisk(daemon, qmp, sock, src, dst)


def test_mirror_of_a_writable_fuse_export_is_refused(fuse_dir: Path,
                                                      start_qsd: QsdFactory) -> None:
    src = fuse_dir / "src.qcow2"
    img("create", "-q", "-f", "qcow2", src, "1M")
    daemon = start_qsd()
    qmp = Monitor(daemon)
    qmp.ok("blockdev-add", driver="qcow2", **{"node-name": "src"},
           file={"driver": "file", "filename": str(src), "node-name": "src-file"})
    qmp.ok("blockdev-add", driver="null-co", **{"node-name": "dst"}, size=MiB)
    mountpoint = fuse_dir / "disk"
    mountpoint.touch()
    qmp.ok("block-export-add", type="fuse", id="e0", **{"node-name": "src"},
           mountpoint=str(mountpoint), writable=True)
    wait_for_mount(mountpoint, daemon)
    error = qmp.err("blockdev-mirror", **{"job-id": "m0", "device": "src",
                                          "target": "dst", "sync": "full"})
    node = re.fullmatch(r"Permission conflict on node '(#block\d+)': .*", error)
    assert node is not None, error
    name = node.group(1)
    assert error == (f"Permission conflict on node '{name}': permissions 'resize' are both "
                     f"required by an unnamed block device (uses node '{name}' as 'root' "
                     f"child) and unshared by mirror job 'm0' (uses node '{name}' as 'main "
                     "node' child).")
    assert set(node_names(qmp)) == {"src-file", "src", "dst"}
    assert qmp.ok("query-jobs") == []


def test_mirror_under_fio_switches_the_export(
        mirror_disk: MirrorDisk) -> None:
    """fio writes (and afterwards verifies) through the export while the mirror copies,
    becomes ready and is completed: no request fails, the export ends on the target and
    every block fio wrote reads back from it."""
    daemon, qmp, sock, src, dst = mirror_disk
    # 16384 random 4 KiB writes at 2000 a second, each block once, then read back.
    load = subprocess.Popen(fio_nbd(sock, "src", "--rw=randwrite", "--size=64M",
                                    "--verify=crc32c", "--rate_iops=2000", "--do_verify=1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        qmp.ok("blockdev-mirror", **{"job-id": "m0", "device": "src", "target": "dst",
                                     "sync": "full"})
        ready = qmp.wait_event("BLOCK_JOB_READY", 60)
        assert ready["data"]["device"] == "m0"
        assert load.poll() is None, "fio ended before the mirror was ready"
        qmp.ok("job-complete", id="m0")
        wait_done(qmp, "m0")
        assert [e["node-name"] for e in qmp.ok("query-block-exports")] == ["dst"]
        out, err = load.communicate(timeout=120)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert load.returncode == 0, err
    fields = out.split(";")
    assert fields[2] == "t" and fields[4] == "0", out      # job name, fio's error
    assert int(fields[5]) == 64 * 1024, out                # KiB read back and verified
    drivers = {n["node-name"]: n["drv"] for n in qmp.ok("query-named-block-nodes")}
    assert "mirror_top" not in drivers.values() and "src" in drivers, drivers
    qmp.ok("block-export-del", id="e0")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    quit_daemon(daemon, qmp)
    check(src, dst)


def test_write_blocking_mirror_equals_its_source(
        mirror_disk: MirrorDisk) -> None:
    """In write-blocking mode a ready mirror stays in sync (actively-synced) while fio
    writes; after fio ends and the job completes, qemu-img compare finds the images
    equal."""
    daemon, qmp, sock, src, dst = mirror_disk
    qmp.ok("blockdev-mirror", **{"job-id": "m0", "device": "src", "target": "dst",
                                 "sync": "full", "copy-mode": "write-blocking"})
    qmp.wait_event("BLOCK_JOB_READY", 60)
    subprocess.run(fio_nbd(sock, "src", "--rw=randwrite", "--size=64M", "--time_based",
                           "--runtime=3"), check=True, capture_output=True, timeout=120)
    [info] = qmp.ok("query-block-jobs")
    assert info["ready"] is True and info["actively-synced"] is True, info
    qmp.ok("job-complete", id="m0")
    wait_done(qmp, "m0")
    qmp.ok("block-export-del", id="e0")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    quit_daemon(daemon, qmp)
    subprocess.run(["qemu-img", "compare", "-q", str(src), str(dst)], check=True,
                   timeout=120)
    check(src, dst)


def test_mirror_speed(mirror_disk: MirrorDisk) -> None:
    """A mirror with speed set copies at that rate (within 10%), measured by its
    progress between two queries seconds apart; block-job-set-speed changes it."""
    qmp = mirror_disk.qmp
    speed = 4 * MiB
    qmp.ok("blockdev-mirror", **{"job-id": "m0", "device": "src", "target": "dst",
                                 "sync": "full", "speed": speed})

    def rate(seconds: float) -> float:
        [first] = qmp.ok("query-block-jobs")
        start = time.monotonic()
        time.sleep(seconds)
        [second] = qmp.ok("query-block-jobs")
        return (second["offset"] - first["offset"]) / (time.monotonic() - start)

    time.sleep(0.5)
    measured = rate(5)
    assert abs(measured - speed) <= speed * 0.1, (measured, speed)
    qmp.ok("block-job-set-speed", device="m0", speed=2 * speed)
    time.sleep(0.3)
    measured = rate(4)
    assert abs(measured - 2 * speed) <= 2 * speed * 0.1, (measured, 2 * speed)
    qmp.ok("job-cancel", id="m0")
    event = qmp.wait_event("BLOCK_JOB_CANCELLED", 60)
    assert event["data"]["speed"] == 2 * speed


def test_mirror_follows_an_iothread_move(fuse_dir: Path, start_qsd: QsdFactory) -> None:
    """Moving the source to an iothread while the mirror runs drains the job's nodes and
    moves them all (filter, source, target); the job goes on there and completes."""
    src, dst = fuse_dir / "src.qcow2", fuse_dir / "dst.qcow2"
    img("create", "-q", "-f", "qcow2", src, "16M")
    qemu_io(src, "write -P 0x6b 0 16M")
    img("create", "-q", "-f", "qcow2", dst, "16M")
    daemon = start_qsd("--object", "iothread,id=io0")
    qmp = Monitor(daemon)
    for name, path in (("src", src), ("dst", dst)):
        qmp.ok("blockdev-add", driver="qcow2", **{"node-name": name},
               file={"driver": "file", "filename": str(path)})
    qmp.ok("blockdev-mirror", **{"job-id": "m0", "device": "src", "target": "dst",
                                 "sync": "full", "speed": 4 * MiB})
    time.sleep(0.5)
    qmp.ok("x-blockdev-set-iothread", **{"node-name": "src"}, iothread="io0", force=True)
    [job] = qmp.ok("query-block-jobs")
    assert job["status"] == "running" and 0 < job["offset"] < 16 * MiB, job
    qmp.ok("block-job-set-speed", device="m0", speed=0)
    qmp.wait_event("BLOCK_JOB_READY", 60)
    qmp.ok("job-complete", id="m0")
    wait_done(qmp, "m0")
    quit_daemon(daemon, qmp)
    subprocess.run(["qemu-img", "compare", "-q", str(src), str(dst)], check=True,
                   timeout=120)
    check(src, dst)
