"""libblkio as the vhost-user-blk front-end: QEMU's qemu-io (its virtio-blk-vhost-user
driver) and, for several queues, libblkio itself (tests/blkio_queues.py).

libblkio is in Debian sid, not Debian 12: these run where qemu-io has the driver (the
suite inside the sid chroot), or on the host through ``scripts/sid-chroot run`` once that
chroot is built, or through the command named by QSD_SID_RUN.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from tests.conftest import QsdFactory
from tests.harness import wait_for_listener

ROOT = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


def _has_blkio(prefix: list[str]) -> bool:
    try:
        result = subprocess.run(
            [*prefix, "qemu-io", "--image-opts",
             "driver=virtio-blk-vhost-user,path=/nonexistent,cache.direct=on", "-c", "quit"],
            capture_output=True, text=True, timeout=60, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return False
    # With the driver, connecting to nowhere fails in libblkio; without, the driver is
    # unknown.
    return "blkio" in result.stderr


@cache
def blkio_prefix() -> list[str] | None:
    """How to run a command where libblkio and a qemu-io with its driver are."""
    candidates = []
    if os.environ.get("QSD_SID_RUN"):
        candidates.append(shlex.split(os.environ["QSD_SID_RUN"]))
    if shutil.which("qemu-io"):
        candidates.append([])
    if (ROOT / "scripts" / "sid-chroot").exists():
        candidates.append([str(ROOT / "scripts" / "sid-chroot"), "run"])
    for prefix in candidates:
        if _has_blkio(prefix):
            return prefix
    return None


pytestmark = pytest.mark.skipif(blkio_prefix() is None,
                                reason="no qemu-io with libblkio's virtio-blk-vhost-user")


def blkio_run(*cmd: str, timeout: float = 120) -> str:
    prefix = blkio_prefix()
    assert prefix is not None
    result = subprocess.run([*prefix, *cmd], capture_output=True, text=True,
                            timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qsd-blkio-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def qemu_io(sock: Path, *commands: str, read_only: bool = False) -> str:
    args = ["-r"] if read_only else []
    for command in commands:
        args += ["-c", command]
    return blkio_run("qemu-io", "--image-opts",
                     f"driver=virtio-blk-vhost-user,path={sock},cache.direct=on", *args)


def test_qemu_io_patterns(workdir: Path, start_qsd: QsdFactory) -> None:
    img = workdir / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    sock = workdir / "vu.sock"
    daemon = start_qsd("--blockdev", f"file,node-name=disk,filename={img},discard=unmap",
                       "--export", f"vhost-user-blk,id=e0,node-name=disk,addr.type=unix,"
                                   f"addr.path={sock},writable=on")
    wait_for_listener(sock, daemon.proc)
    out = qemu_io(sock, "write -P 0x5a 0 1M", "write -P 0xa5 1M 64k", "write -z 2M 128k",
                  "read -P 0x5a 0 1M", "read -P 0xa5 1M 64k", "read -P 0 2M 128k",
                  "aio_write -P 0x11 4M 4k", "aio_write -P 0x22 5M 4k", "aio_flush",
                  "read -P 0x11 4M 4k", "read -P 0x22 5M 4k", "discard 0 512k",
                  "read -P 0 0 512k", "read -P 0x5a 512k 512k", "flush")
    assert "Pattern verification failed" not in out
    data = img.read_bytes()
    assert data[512 * 1024:MiB] == b"\x5a" * (512 * 1024)
    assert data[MiB:MiB + 65536] == b"\xa5" * 65536
    assert data[4 * MiB:4 * MiB + 4096] == b"\x11" * 4096
    assert data[:512 * 1024] == bytes(512 * 1024)
    # Again, in a new connection: the export outlives its front-ends.
    assert "Pattern verification failed" not in qemu_io(sock, "read -P 0xa5 1M 64k")


def test_read_only_export(workdir: Path, start_qsd: QsdFactory) -> None:
    img = workdir / "disk.img"
    img.write_bytes(b"\x77" * MiB)
    sock = workdir / "vu.sock"
    daemon = start_qsd("--blockdev", f"file,node-name=disk,filename={img}",
                       "--export", f"vhost-user-blk,id=e0,node-name=disk,addr.type=unix,"
                                   f"addr.path={sock}")
    wait_for_listener(sock, daemon.proc)
    out = qemu_io(sock, "read -P 0x77 0 1M", read_only=True)
    assert "Pattern verification failed" not in out
    # The device says it is read-only (VIRTIO_BLK_F_RO): libblkio refuses to write.
    prefix = blkio_prefix()
    assert prefix is not None
    result = subprocess.run([*prefix, "qemu-io", "--image-opts",
                             f"driver=virtio-blk-vhost-user,path={sock},cache.direct=on",
                             "-c", "write -P 1 0 4k"], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert "Device is read-only" in result.stderr
    assert img.read_bytes() == b"\x77" * MiB


def _cpu_ticks(pid: int) -> dict[str, int]:
    ticks: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks[name] = ticks.get(name, 0) + int(fields[11]) + int(fields[12])
    return ticks


def test_four_queues_over_two_iothreads(workdir: Path, start_qsd: QsdFactory) -> None:
    """libblkio with 4 queues: queue i is served by iothread io(i % 2) and by no other
    thread, as the per-thread CPU time in /proc/PID/task shows while each queue works;
    then qemu-io's patterns on the same export."""
    img = workdir / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    sock = workdir / "vu.sock"
    daemon = start_qsd("--object", "iothread,id=io0", "--object", "iothread,id=io1",
                       "--blockdev", f"file,node-name=disk,filename={img}",
                       "--export", f"vhost-user-blk,id=e0,node-name=disk,addr.type=unix,"
                                   f"addr.path={sock},writable=on,num-queues=4,"
                                   "iothread.0=io0,iothread.1=io1")
    wait_for_listener(sock, daemon.proc)
    assert {"io0", "io1"} <= set(_cpu_ticks(daemon.pid))     # thread names: the ids
    for queue in range(4):
        before = _cpu_ticks(daemon.pid)
        out = blkio_run("python3", "tests/blkio_queues.py", str(sock), "4", str(queue),
                        "4000", str(queue))
        assert out.startswith("ok 67108864"), out
        after = _cpu_ticks(daemon.pid)
        own, other = f"io{queue % 2}", f"io{1 - queue % 2}"
        busy = after[own] - before[own]
        idle = after[other] - before[other]
        assert busy >= 5 and idle <= busy // 5, (queue, before, after)
    # QEMU's blkio driver uses one queue of the four; the patterns hold through it too.
    out = qemu_io(sock, "write -P 0x3c 0 1M", "aio_write -P 0xc3 8M 64k", "aio_flush",
                  "read -P 0x3c 0 1M", "read -P 0xc3 8M 64k")
    assert "Pattern verification failed" not in out
    assert img.read_bytes()[8 * MiB:8 * MiB + 65536] == b"\xc3" * 65536
