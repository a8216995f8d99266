"""The throttle filter under real I/O: fio through FUSE and NBD exports of throttled nodes,
qemu-io as an NBD client, and QMP while requests are held back.

Runs are short (3 s) and the rates low, so that fio keeps up on a loaded machine. The
throttle bounds the rate from above exactly, so the checks compare what fio moved with
what the group's buckets allow over the run (the average plus the burst the bucket
holds): never more than 5% above, and not far below (a loaded machine that stalls the
daemon or fio for longer than the bucket's tenth of a second loses that time, in QEMU
too). scripts/stress-throttle measures the same over 10 s, within 10%.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QsdFactory
from tests.harness import Monitor, Qsd, fuse_mounts, wait_for_mount, wait_for_path
from tests.test_nbd_daemon import QemuIo

MiB = 1 << 20
RUNTIME = 3

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="FUSE exports need root and /dev/fuse")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """Outside pytest's basetemp, which other sessions may rename under a live mount."""
    path = Path(tempfile.mkdtemp(prefix="qsd-throttle-", dir="/tmp"))
    yield path
    for mount in fuse_mounts():
        if mount.startswith(f"{path}/"):
            subprocess.run(["umount", "-l", mount], check=False)
    shutil.rmtree(path, ignore_errors=True)


def throttled_nodes(group: str, count: int = 1) -> list[str]:
    """``count`` throttle nodes t0, t1, ... in group ``tg`` over null nodes whose
    blocks read as data (so NBD cannot answer reads from block status alone)."""
    args = ["--object", f"throttle-group,id=tg,{group}"] if group else []
    for i in range(count):
        args += ["--blockdev", f"null-co,node-name=n{i},size=1073741824,read-zeroes=off",
                 "--blockdev", f"throttle,node-name=t{i},throttle-group=tg,file=n{i}"]
    return args


def fuse_export(node: str, mountpoint: Path, iothread: str = "io0") -> list[str]:
    mountpoint.touch()
    return ["--export", f"fuse,id=e-{node},node-name={node},mountpoint={mountpoint},"
            f"writable=on,iothread={iothread}"]


def fio(*jobs: list[str], runtime: float = RUNTIME, extra: tuple[str, ...] = ()
        ) -> list[dict[str, Any]]:
    """Runs fio jobs (each a list of job options) side by side; their JSON results."""
    cmd = ["fio", "--output-format=json", f"--runtime={runtime}", "--time_based"]
    cmd += list(extra)
    for job in jobs:
        cmd += job
    out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                         timeout=runtime + 60).stdout
    return list(json.loads(out[out.index("{"):])["jobs"])


def fuse_job(name: str, path: Path, rw: str, bs: str, depth: int = 4) -> list[str]:
    return [f"--name={name}", f"--filename={path}", "--direct=1", "--ioengine=libaio",
            f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}"]


def nbd_job(name: str, sock: Path, export: str, rw: str, bs: str, depth: int = 4) -> list[str]:
    return [f"--name={name}", "--ioengine=nbd", f"--uri=nbd+unix:///{export}?socket={sock}",
            f"--rw={rw}", f"--bs={bs}", f"--iodepth={depth}"]


def moved(result: dict[str, Any], direction: str) -> tuple[float, float]:
    """(bytes, operations) per second of fio's run."""
    part = result[direction]
    seconds = part["runtime"] / 1000
    return part["io_bytes"] / seconds, part["total_ios"] / seconds


def allowed(rate: float, seconds: float, burst: float = 0.0, length: int = 1) -> float:
    """What a bucket lets through in ``seconds``, per second: the average, plus the
    bucket's size (a tenth of a second without a burst rate)."""
    size = burst * length if burst else rate / 10
    return (rate * seconds + size) / seconds


def check_rate(measured: float, expected: float) -> None:
    assert 0.7 * expected <= measured <= 1.05 * expected, (measured, expected)


@pytest.mark.parametrize(("limit", "rw", "bs", "direction", "index"), [
    ("limits.bps-read=4194304", "randread", "64k", "read", 0),
    ("limits.iops-write=200", "randwrite", "4k", "write", 1),
    ("limits.bps-total=2097152", "randwrite", "32k", "write", 0),
    ("limits.iops-total=150", "randread", "4k", "read", 1),
])
def test_fuse_rate(start_qsd: QsdFactory, workdir: Path, limit: str, rw: str, bs: str,
                   direction: str, index: int) -> None:
    mnt = workdir / "disk"
    daemon = start_qsd("--object", "iothread,id=io0", *throttled_nodes(limit),
                       *fuse_export("t0", mnt))
    wait_for_mount(mnt, daemon)
    result = fio(fuse_job("j", mnt, rw, bs))[0]
    rate = int(limit.split("=")[1])
    check_rate(moved(result, direction)[index], allowed(rate, result[direction]["runtime"]
                                                        / 1000))


def nbd_daemon(start_qsd: QsdFactory, workdir: Path, *args: str) -> tuple[Qsd, Path]:
    sock = workdir / "nbd.sock"
    daemon = start_qsd("--object", "iothread,id=io0", *args,
                       "--nbd-server", f"addr.type=unix,addr.path={sock}",
                       "--export", "nbd,id=e0,node-name=t0,name=exp,writable=on,iothread=io0")
    wait_for_path(sock, daemon.proc)
    return daemon, sock


@pytest.mark.parametrize(("limit", "rw", "bs", "direction", "index"), [
    ("limits.bps-write=2097152", "randwrite", "64k", "write", 0),
    ("limits.iops-read=250", "randread", "4k", "read", 1),
])
def test_nbd_rate(start_qsd: QsdFactory, workdir: Path, limit: str, rw: str, bs: str,
                  direction: str, index: int) -> None:
    _, sock = nbd_daemon(start_qsd, workdir, *throttled_nodes(limit))
    result = fio(nbd_job("j", sock, "exp", rw, bs))[0]
    rate = int(limit.split("=")[1])
    check_rate(moved(result, direction)[index], allowed(rate, result[direction]["runtime"]
                                                        / 1000))


def test_burst(start_qsd: QsdFactory, workdir: Path) -> None:
    """1 MiB/s with bursts of 4 MiB/s for 1 s: the bucket holds 4 MiB, which the burst
    rate fills in 4/3 s; after that the average holds."""
    group = ("limits.bps-read=1048576,limits.bps-read-max=4194304,"
             "limits.bps-read-max-length=1")
    _, sock = nbd_daemon(start_qsd, workdir, *throttled_nodes(group))
    result = fio(nbd_job("j", sock, "exp", "randread", "64k"))[0]
    seconds = result["read"]["runtime"] / 1000
    check_rate(moved(result, "read")[0], allowed(MiB, seconds, 4 * MiB))


def test_two_nodes_share_a_group(start_qsd: QsdFactory, workdir: Path) -> None:
    """Both saturate: each gets half of the group's budget (within 20% of each other),
    together the whole of it."""
    mounts = [workdir / "d0", workdir / "d1"]
    daemon = start_qsd("--object", "iothread,id=io0", "--object", "iothread,id=io1",
                       *throttled_nodes("limits.iops-total=300", count=2),
                       *fuse_export("t0", mounts[0], "io0"), *fuse_export("t1", mounts[1], "io1"))
    for mnt in mounts:
        wait_for_mount(mnt, daemon)
    results = fio(fuse_job("a", mounts[0], "randread", "4k", 8),
                  fuse_job("b", mounts[1], "randread", "4k", 8))
    ops = [moved(r, "read")[1] for r in results]
    assert abs(ops[0] - ops[1]) <= 0.2 * max(ops), ops
    check_rate(sum(ops), allowed(300, RUNTIME))


def test_qom_set_applies_under_load(start_qsd: QsdFactory, workdir: Path) -> None:
    """Raising the limit while fio is throttled: within a second fio moves at the new
    rate (fio logs its bandwidth every 250 ms)."""
    mnt = workdir / "disk"
    daemon = start_qsd("--object", "iothread,id=io0",
                       *throttled_nodes("limits.bps-read=1048576"), *fuse_export("t0", mnt))
    wait_for_mount(mnt, daemon)
    mon = Monitor(daemon)
    log = workdir / "bw"
    job = fuse_job("j", mnt, "randread", "16k", 8)
    changed_at: list[float] = []

    def change() -> None:
        time.sleep(2.5)
        mon.ok("qom-set", path="/objects/tg", property="limits",
               value={"bps-read": 4 * MiB})
        changed_at.append(time.time() * 1000)

    changer = threading.Thread(target=change)
    changer.start()
    fio(job, runtime=5, extra=(f"--write_bw_log={log}", "--log_avg_msec=250",
                               "--log_unix_epoch=1"))
    changer.join()
    mon.raw.close()
    samples = [(int(line.split(",")[0]), int(line.split(",")[1]) * 1024)
               for line in Path(f"{log}_bw.1.log").read_text().splitlines()]
    # Skip the first half second (the bucket's initial burst); bandwidth samples are
    # averages over the 250 ms before their time stamp.
    before = [bw for ms, bw in samples if samples[0][0] + 500 <= ms <= changed_at[0]]
    after = [bw for ms, bw in samples if ms >= changed_at[0] + 1000]
    assert before and after, samples
    assert 0.7 * MiB <= sum(before) / len(before) <= 1.1 * MiB, samples
    assert 0.7 * 4 * MiB <= sum(after) / len(after) <= 1.1 * 4 * MiB, samples


def _thread_of_requests(pid: int) -> dict[str, float]:
    """CPU seconds per thread name of the daemon (which iothread serves requests)."""
    times: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        name = (task / "comm").read_text().strip()
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        times[name] = times.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / 100
    return times


def test_move_and_delete_while_requests_are_held(start_qsd: QsdFactory,
                                                 workdir: Path) -> None:
    """At 2 operations per second, 16 requests queue in the throttle. Moving the node to
    another iothread and deleting the export each drain it, which lets the held
    requests go at once (instead of after 8 s); I/O goes on in the new thread."""
    mnt = workdir / "disk"
    daemon = start_qsd("--object", "iothread,id=io0", "--object", "iothread,id=io1",
                       *throttled_nodes("limits.iops-total=2"), *fuse_export("t0", mnt))
    wait_for_mount(mnt, daemon)
    mon = Monitor(daemon)
    results: list[dict[str, Any]] = []
    runner = threading.Thread(target=lambda: results.extend(
        fio(fuse_job("j", mnt, "randread", "4k", 16), runtime=4)))
    runner.start()
    time.sleep(1.0)
    started = time.monotonic()
    mon.ok("x-blockdev-set-iothread", **{"node-name": "t0", "iothread": "io1",
                                         "force": True})
    assert time.monotonic() - started < 2.0
    runner.join()
    # The drain let about 16 through, the rest came at 2/s (plus the first burst).
    ops = results[0]["read"]["total_ios"]
    assert 16 <= ops <= 16 + 16 + 2 * 4 + 2, ops
    assert mon.err("object-del", id="tg") == ("Cannot delete throttle group 'tg' with "
                                             "active references")
    # Requests held again, then the export goes (hard: the kernel still waits on them).
    runner = threading.Thread(target=lambda: subprocess.run(
        ["fio", "--name=j", f"--filename={mnt}", "--direct=1", "--ioengine=libaio",
         "--rw=randread", "--bs=4k", "--iodepth=16", "--runtime=10", "--time_based"],
        capture_output=True, timeout=60))
    runner.start()
    time.sleep(1.0)
    started = time.monotonic()
    mon.ok("block-export-del", id="e-t0", mode="hard")
    mon.wait_event("BLOCK_EXPORT_DELETED")
    assert time.monotonic() - started < 3.0
    runner.join()
    mon.ok("blockdev-del", **{"node-name": "t0"})
    mon.ok("object-del", id="tg")
    mon.raw.close()


class ReconnectingClient(QemuIo):
    """qemu-io over QEMU's NBD client driver with reconnect-delay: when the server goes
    away, requests wait up to that long for it to come back."""

    def __init__(self, sock: Path, export: str, delay: int) -> None:
        opts = (f"driver=nbd,server.type=unix,server.path={sock},export={export},"
                f"reconnect-delay={delay}")
        self.proc = subprocess.Popen(["qemu-io", "--image-opts", opts], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._until_prompt()


def test_nbd_server_restart_with_a_reconnecting_client(start_qsd: QsdFactory,
                                                       workdir: Path) -> None:
    """The server stops (its exports go, the client's connection drops) and starts again
    with the export re-added; the client, still running, reconnects and is served, still
    throttled."""
    image = workdir / "disk.raw"
    image.write_bytes(bytes(1 << 20))
    daemon, sock = nbd_daemon(
        start_qsd, workdir, "--object", "throttle-group,id=tg,limits.iops-total=20",
        "--blockdev", f"file,node-name=f0,filename={image}",
        "--blockdev", "throttle,node-name=t0,throttle-group=tg,file=f0")
    mon = Monitor(daemon)
    client = ReconnectingClient(sock, "exp", 15)
    try:
        assert "wrote 4096/4096 bytes" in client.run("write -P 0x5a 0 4k")
        mon.ok("nbd-server-stop")
        assert mon.wait_event("BLOCK_EXPORT_DELETED")["data"] == {"id": "e0"}
        replies: list[str] = []
        reader = threading.Thread(
            target=lambda: replies.append(client.run("read -P 0x5a 0 4k")))
        reader.start()
        time.sleep(1.0)
        assert not replies                       # waiting for the server to come back
        mon.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
        mon.ok("block-export-add", type="nbd", id="e0", **{"node-name": "t0"}, name="exp",
               writable=True)
        reader.join(20)
        assert replies and "read 4096/4096 bytes" in replies[0], replies
        assert "verification failed" not in replies[0], replies
        started = time.monotonic()
        out = client.run("aio_write -P 0x11 0 4k") + client.run("aio_flush")
        for _ in range(40):
            out += client.run("aio_write -P 0x22 4k 4k")
        out += client.run("aio_flush")
        assert "error" not in out.lower(), out
        # 41 writes at 20/s after a burst of 2: about 2 s
        assert time.monotonic() - started >= 1.5
        out = client.run("read -P 0x22 4k 4k")
        assert "read 4096/4096 bytes" in out and "verification failed" not in out, out
    finally:
        client.close()
        mon.raw.close()
