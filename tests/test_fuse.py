"""FUSE exports of a real qsd, checked with ordinary tools (QEMU's iotest 308 behaviours).

Every test starts qsd as a subprocess (stopped by PID in the fixture's teardown, which
also lazily unmounts whatever a failing test left mounted), drives it with qemu.qmp and
looks at the mount with coreutils, qemu-img/qemu-io and fio.
"""

from __future__ import annotations

import asyncio
import mmap
import os
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from tests.conftest import QsdFactory
from tests.harness import Qsd, fd_numbers, fuse_mounts

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="FUSE export tests mount with mount(2) and need root and /dev/fuse")

MiB = 1024 * 1024


class Session:
    """A connected QMP client and a listener for BLOCK_EXPORT_DELETED."""

    def __init__(self, daemon: Qsd, client: QMPClient, deleted: EventListener) -> None:
        self.daemon = daemon
        self.client = client
        self.deleted = deleted

    async def cmd(self, name: str, **args: Any) -> Any:
        return await self.client.execute(name, args)

    async def error(self, name: str, **args: Any) -> str:
        with pytest.raises(ExecuteError) as info:
            await self.client.execute(name, args)
        return str(info.value.error.error.desc)

    async def add_fuse(self, export_id: str, node: str, mountpoint: Path, **args: Any) -> None:
        await self.cmd("block-export-add", type="fuse", id=export_id, **{"node-name": node},
                       mountpoint=str(mountpoint), **args)

    async def delete(self, export_id: str) -> None:
        """block-export-del, then wait for the export to be really gone (its event)."""
        assert await self.cmd("block-export-del", id=export_id) == {}
        event = await asyncio.wait_for(self.deleted.get(), 20)
        assert event["data"] == {"id": export_id}


@asynccontextmanager
async def session(daemon: Qsd) -> AsyncIterator[Session]:
    client = QMPClient("fuse-test")
    await client.connect(str(daemon.qmp_path))
    deleted = EventListener("BLOCK_EXPORT_DELETED")
    client.register_listener(deleted)
    try:
        yield Session(daemon, client, deleted)
    finally:
        client.remove_listener(deleted)
        await client.disconnect()


def run(*cmd: str | Path, check: bool = True,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                            timeout=timeout, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"{cmd} failed ({result.returncode}): {result.stdout}"
                             f"{result.stderr}")
    return result


async def arun(*cmd: str | Path, check: bool = True,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``run`` off the test's loop, so the QMP client keeps receiving meanwhile."""
    return await asyncio.to_thread(run, *cmd, check=check, timeout=timeout)


def random_image(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))


def fuse_fds(pid: int) -> int:
    return len(fd_numbers(pid, "/dev/fuse"))


def thread_ids(pid: int) -> set[int]:
    return {int(tid) for tid in os.listdir(f"/proc/{pid}/task")}


async def threads_beyond(pid: int, baseline: set[int], timeout: float = 10) -> set[int]:
    """The daemon's threads that were not there at ``baseline`` and are still there after
    up to ``timeout`` seconds.  A helper thread the daemon joined has finished its Python
    part but is listed in /proc until it has left the kernel, which a loaded machine can
    delay; a thread left behind stays."""
    deadline = time.monotonic() + timeout
    while (extra := thread_ids(pid) - baseline) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return extra


def fio(filename: Path, *args: str, runtime: float | None = 1.0) -> list[str]:
    """A fio command line; ``runtime=None`` runs the job to its end (for --verify)."""
    timing = ["--time_based", f"--runtime={runtime}"] if runtime is not None else []
    return ["fio", "--name=t", f"--filename={filename}", "--direct=1", "--bs=4k",
            "--verify_state_save=0",
            "--output-format=terse", *timing, *args]


def children(pid: int) -> list[int]:
    kids = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(name))
    return kids


def process_state(pid: int) -> str:
    """The state letter in /proc (D: uninterruptible, stuck in the kernel), or "gone"."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def files_on(pid: int, dev: int) -> int:
    """How many of a process's open files live on the file system ``dev``."""
    fd_dir = f"/proc/{pid}/fd"
    count = 0
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return 0
    for name in names:
        try:
            if os.stat(f"{fd_dir}/{name}").st_dev == dev:
                count += 1
        except OSError:
            pass
    return count


@asynccontextmanager
async def fio_load(mountpoint: Path, *args: str,
                   jobs: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """fio on a mounted export in the background, handed out once each of its ``jobs``
    has the export's file open: a job that opened the mountpoint only after the export
    went away would run against the file underneath instead.  Killed by PID if it is
    still running at the end."""
    dev = os.stat(mountpoint).st_dev
    proc = await asyncio.create_subprocess_exec(
        *fio(mountpoint, f"--numjobs={jobs}", *args, runtime=60),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while sum(files_on(kid, dev) for kid in children(proc.pid)) < jobs:
            assert proc.returncode is None, "fio ended before it had the export open"
            assert time.monotonic() < deadline, "fio did not open the export"
            await asyncio.sleep(0.05)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def load_ended(proc: asyncio.subprocess.Process, timeout: float) -> int:
    """fio's exit status, once the requests it had in flight have failed."""
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        states = {pid: process_state(pid) for pid in [proc.pid, *children(proc.pid)]}
        raise AssertionError(f"fio still runs {timeout} s after the export went away "
                             f"(process states {states})") from None


# ---- 308: mountpoint checks, read-only export, export over the image --------------------


async def test_mountpoint_errors_and_read_only_export(fuse_dir: Path,
                                                      start_qsd: QsdFactory) -> None:
    img = fuse_dir / "t.raw"
    random_image(img, 64 * MiB)
    mp = fuse_dir / "t.raw.fuse"
    copy = fuse_dir / "copy.raw"
    daemon = start_qsd("--blockdev", f"file,node-name=node-protocol,filename={img}",
                       "--blockdev", "raw,node-name=node-format,file=node-protocol")
    async with session(daemon) as s:
        # Mountpoint not present
        assert await s.error("block-export-add", type="fuse", id="export-err",
                             **{"node-name": "node-format"}, mountpoint=str(mp)) == (
            f"Failed to stat '{mp}': No such file or directory")
        # Mountpoint is a directory
        mp.mkdir()
        assert await s.error("block-export-add", type="fuse", id="export-err",
                             **{"node-name": "node-format"}, mountpoint=str(mp)) == (
            f"'{mp}' is not a regular file")
        mp.rmdir()
        assert await s.cmd("query-block-exports") == []

        # Mountpoint is a regular file: a read-only export
        mp.touch()
        await s.add_fuse("export-mp", "node-format", mp)
        assert str(mp) in fuse_mounts()
        # allow-other defaults to auto: as root the allow_other attempt succeeds
        assert "allow_other" in next(line for line in open("/proc/mounts")
                                     if f" {mp} " in line)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", "-U", mp, img)
        assert run("stat", "-c", "%a", mp).stdout.strip() == "400"
        for change in ("u+w", "u+x"):
            result = run("chmod", change, mp, check=False)
            assert result.returncode != 0
            assert "Read-only file system" in result.stderr
            assert run("stat", "-c", "%a", mp).stdout.strip() == "400"
        result = run("qemu-io", "-f", "raw", "-c", "write -P 42 1M 64k", mp, check=False)
        assert result.returncode != 0
        assert "Read-only file system" in result.stdout + result.stderr

        # Mount over the image file that the node itself has open
        await s.add_fuse("export-img", "node-format", img)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", "-U", mp, img)
        run("cp", img, copy)
        assert copy.stat().st_size == 64 * MiB
        run("cmp", copy, mp)

        # Double export
        assert await s.error("block-export-add", type="fuse", id="export-err",
                             **{"node-name": "node-format"}, mountpoint=str(mp)) == (
            f"There already is a FUSE export on '{mp}'")

        # Remove the exports: the files underneath appear again
        assert "virtual size: 64 MiB" in run("qemu-img", "info", "-f", "raw", mp).stdout
        await s.delete("export-mp")
        assert str(mp) not in fuse_mounts()
        assert "virtual size: 0 B" in run("qemu-img", "info", "-f", "raw", mp).stdout
        await s.delete("export-img")
        assert str(img) not in fuse_mounts()
        assert "virtual size: 64 MiB" in run("qemu-img", "info", "-f", "raw", "-U", img).stdout
        assert fuse_fds(daemon.pid) == 0


# ---- 308: writable, growable, fallocate, truncate, write zeroes ---------------------------


async def test_writable_and_resizable_exports(fuse_dir: Path, start_qsd: QsdFactory) -> None:
    img = fuse_dir / "t.raw"
    random_image(img, 16 * MiB)
    mp = fuse_dir / "t.raw.fuse"
    mp.touch()
    daemon = start_qsd("--blockdev",
                       f"file,node-name=node-protocol,filename={img},discard=unmap")
    async with session(daemon) as s:
        await s.add_fuse("export-mp", "node-protocol", mp, writable=True)
        assert run("stat", "-c", "%a", mp).stdout.strip() == "600"
        run("qemu-io", "-f", "raw", "-c", "write -P 42 1M 64k", mp)
        with open(img, "rb") as f:
            f.seek(MiB)
            assert f.read(64 * 1024) == bytes([42]) * 64 * 1024

        # Non-growable: writing past EOF fails, reading there gives nothing
        orig_len = img.stat().st_size
        orig_usage = img.stat().st_blocks
        result = run("dd", "if=/dev/zero", f"of={mp}", "bs=1", "count=64k", f"seek={orig_len}",
                     "conv=notrunc", check=False)
        assert "No space left on device" in result.stderr
        assert mp.stat().st_size == orig_len

        # fallocate at EOF grows and allocates
        run("fallocate", "-o", str(orig_len), "-l", "64k", mp)
        assert mp.stat().st_size == orig_len + 65536
        assert img.stat().st_size == orig_len + 65536
        assert img.stat().st_blocks > orig_usage

        # Punching a hole writes zeroes with unmap (with discard=unmap the file gets
        # sparse), keeping the size;
        # zeroing a range past EOF grows the image
        usage = img.stat().st_blocks
        run("fallocate", "-p", "-o", "4M", "-l", "4M", mp)
        assert img.stat().st_blocks < usage and mp.stat().st_size == orig_len + 65536
        run("qemu-io", "-f", "raw", "-c", "read -P 0 4M 4M", "-c", "read -P 42 1M 64k", mp)
        run("fallocate", "-z", "-o", "0", "-l", "64k", mp)
        run("qemu-io", "-f", "raw", "-c", "read -P 0 0 64k", mp)
        result = run("fallocate", "-o", "0", "-l", "64k", mp, check=False)
        assert "Operation not supported" in result.stderr
        run("truncate", "-s", str(orig_len + 65536), mp)

        # Growable: dd past EOF grows the image
        await s.delete("export-mp")
        await s.add_fuse("export-mp", "node-protocol", mp, writable=True, growable=True)
        new_len = orig_len + 65536
        run("dd", "if=/dev/zero", f"of={mp}", "bs=4k", "count=16", f"seek={new_len // 4096}",
            "conv=notrunc")
        assert mp.stat().st_size == orig_len + 131072
        assert img.stat().st_size == orig_len + 131072

        # Shrink
        run("truncate", "-s", str(orig_len), mp)
        assert mp.stat().st_size == orig_len
        assert img.stat().st_size == orig_len

        # Write zeroes while unmapping, then read them back through both paths
        run("qemu-io", "-f", "raw", "-c", f"write -zu 0 {orig_len}", mp)
        run("qemu-io", "-f", "raw", "-c", f"read -P 0 0 {orig_len}", mp)
        await s.delete("export-mp")
        run("qemu-io", "-f", "raw", "-c", f"read -P 0 0 {orig_len}", img)
        assert str(mp) not in fuse_mounts()


# ---- fio on null-co and file exports ---------------------------------------------------------


async def test_fio_null_and_file(fuse_dir: Path, start_qsd: QsdFactory) -> None:
    img = fuse_dir / "t.raw"
    run("truncate", "-s", "64M", img)
    null_mp = fuse_dir / "null.fuse"
    file_mp = fuse_dir / "file.fuse"
    null_mp.touch()
    file_mp.touch()
    daemon = start_qsd("--blockdev", "null-co,node-name=null,size=67108864",
                       "--blockdev", f"file,node-name=file,filename={img}")
    async with session(daemon) as s:
        await s.add_fuse("null", "null", null_mp, writable=True)
        await s.add_fuse("file", "file", file_mp, writable=True)
        jobs = []
        for engine in ("libaio", "psync"):
            for rw in ("randread", "randwrite"):
                jobs.append(arun(*fio(null_mp, f"--ioengine={engine}", "--iodepth=16",
                                      f"--rw={rw}", "--size=64M")))
        for result in await asyncio.gather(*jobs):
            assert result.returncode == 0
        for engine in ("libaio", "psync"):
            await arun(*fio(file_mp, f"--ioengine={engine}", "--iodepth=16", "--rw=randwrite",
                            "--size=16M", "--verify=crc32c", "--do_verify=1",
                            "--verify_fatal=1", runtime=None), timeout=120)
        await s.delete("null")
        await s.delete("file")
        assert fuse_fds(daemon.pid) == 0


# ---- multi-queue ---------------------------------------------------------------------------------


async def test_multiqueue(fuse_dir: Path, start_qsd: QsdFactory) -> None:
    img = fuse_dir / "t.raw"
    run("truncate", "-s", "64M", img)
    mp = fuse_dir / "t.fuse"
    mp.touch()
    iothreads = [arg for i in range(4) for arg in ("--object", f"iothread,id=iothread{i}")]
    daemon = start_qsd(*iothreads, "--blockdev", "null-co,node-name=null",
                       "--blockdev", f"file,node-name=file,filename={img}")
    async with session(daemon) as s:
        await s.add_fuse("export", "null", mp,
                         iothread=[f"iothread{i}" for i in range(4)])
        assert fuse_fds(daemon.pid) == 4
        result = await arun("qemu-img", "bench", "-f", "raw", "-c", "75000", "-d", "64",
                            "-s", "4096", mp)
        assert "Run completed in" in result.stdout
        await s.delete("export")
        assert fuse_fds(daemon.pid) == 0

        # Two queues: random writes with verification
        await s.add_fuse("export", "file", mp, writable=True,
                         iothread=["iothread0", "iothread1"])
        assert fuse_fds(daemon.pid) == 2
        await arun(*fio(mp, "--ioengine=libaio", "--iodepth=16", "--rw=randwrite",
                        "--numjobs=2", "--size=16M", "--offset_increment=16M",
                        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", runtime=None),
                   timeout=120)

        await s.delete("export")

        # Deleting under load returns cleanly and leaves nothing behind.  (On null-co: the
        # file driver's I/O pool may grow under load and its threads outlive exports.)
        baseline_threads = thread_ids(daemon.pid)
        await s.add_fuse("export", "null", mp, writable=True,
                         iothread=["iothread0", "iothread1"])
        async with fio_load(mp, "--ioengine=libaio", "--iodepth=16", "--rw=randrw",
                            "--size=16M", jobs=2) as load:
            await asyncio.sleep(0.5)
            await s.delete("export")
            assert await load_ended(load, 30) != 0
        assert str(mp) not in fuse_mounts()
        assert fuse_fds(daemon.pid) == 0
        assert await threads_beyond(daemon.pid, baseline_threads) == set()
        # Still serving QMP
        assert await s.cmd("query-block-exports") == []


# ---- attributes, lseek, allow-other, drain and moving between iothreads -------------------


async def test_attributes_lseek_and_allow_other(fuse_dir: Path, start_qsd: QsdFactory) -> None:
    img = fuse_dir / "sparse.raw"
    run("truncate", "-s", "8M", img)
    with open(img, "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"x" * MiB)
    mp = fuse_dir / "sparse.fuse"
    mp.touch()
    daemon = start_qsd("--blockdev", f"file,node-name=file,filename={img}")
    async with session(daemon) as s:
        await s.add_fuse("e", "file", mp, writable=True, **{"allow-other": "off"})
        st = mp.stat()
        assert (st.st_mode & 0o7777, st.st_nlink, st.st_uid, st.st_gid) == (
            0o600, 1, os.getuid(), os.getgid())
        assert st.st_size == 8 * MiB and st.st_ino == 1 and st.st_blksize == 1
        assert run("stat", "-f", "-c", "%s %l", mp).stdout.split() == ["512", "255"]
        # Without allow_other, group/other bits are refused; owner bits are fine
        result = run("chmod", "g+r", mp, check=False)
        assert "Operation not permitted" in result.stderr
        run("chmod", "0700", mp)
        assert mp.stat().st_mode & 0o7777 == 0o700
        result = run("chown", "1:1", mp, check=False)
        assert result.returncode != 0
        result = run("touch", "-m", "-d", "2001-01-01", mp, check=False)
        assert result.returncode != 0
        fd = os.open(mp, os.O_RDONLY)
        try:
            assert os.lseek(fd, 0, os.SEEK_DATA) == 2 * MiB
            assert os.lseek(fd, 2 * MiB, os.SEEK_HOLE) == 3 * MiB
            assert os.lseek(fd, 7 * MiB, os.SEEK_HOLE) == 7 * MiB
            with pytest.raises(OSError) as info:
                os.lseek(fd, 4 * MiB, os.SEEK_DATA)
            assert info.value.errno == 6  # ENXIO
            # A read at EOF is short; past EOF empty
            assert len(os.pread(fd, 65536, 8 * MiB - 4096)) == 4096
            assert os.pread(fd, 4096, 9 * MiB) == b""
        finally:
            os.close(fd)
        # Shared mmap works on the direct-I/O file (FUSE_DIRECT_IO_ALLOW_MMAP)
        with open(mp, "r+b") as f, mmap.mmap(f.fileno(), 4096) as m:
            m[0:4] = b"mmap"
            m.flush()
        with open(img, "rb") as f:
            assert f.read(4) == b"mmap"
        # O_TRUNC is ignored by a non-growable export (as with libfuse)
        with open(mp, "r+b") as f, open(mp, "wb"):
            assert f.read(4) == b"mmap"
        assert mp.stat().st_size == 8 * MiB
        await s.delete("e")

        await s.add_fuse("e", "file", mp, **{"allow-other": "on"})
        assert "allow_other" in next(line for line in open("/proc/mounts")
                                     if f" {mp} " in line)
        # Read-only: +w is refused, group read is fine with allow_other
        result = run("chmod", "g+r", mp, check=False)
        assert "Read-only file system" in result.stderr
        await s.delete("e")
        assert fuse_fds(daemon.pid) == 0


async def test_drain_and_iothread_move_under_load(fuse_dir: Path,
                                                  start_qsd: QsdFactory) -> None:
    img = fuse_dir / "t.raw"
    run("truncate", "-s", "32M", img)
    mp = fuse_dir / "t.fuse"
    mp.touch()
    daemon = start_qsd("--object", "iothread,id=io0", "--object", "iothread,id=io1",
                       "--blockdev", f"file,node-name=file,filename={img}",
                       "--export", f"fuse,id=e,node-name=file,mountpoint={mp},writable=on,"
                                   "iothread.0=io0,iothread.1=io1")
    async with session(daemon) as s:
        assert fuse_fds(daemon.pid) == 2
        load = asyncio.ensure_future(arun(*fio(
            mp, "--ioengine=libaio", "--iodepth=16", "--rw=randwrite", "--size=16M",
            "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", runtime=None),
            timeout=120))
        # block_resize drains the node: the export detaches and re-attaches all queues
        for i in range(20):
            await s.cmd("block_resize", **{"node-name": "file"}, size=(32 + i % 2) * MiB)
            await asyncio.sleep(0.02)
        result = await asyncio.wait_for(load, 120)
        assert result.returncode == 0
        await s.delete("e")

        # A single-queue export follows its node into another iothread
        await s.add_fuse("e", "file", mp, writable=True)
        run("qemu-io", "-f", "raw", "-c", "write -P 7 0 1M", mp)
        await s.cmd("x-blockdev-set-iothread", **{"node-name": "file"}, iothread="io1",
                    force=True)
        run("qemu-io", "-f", "raw", "-c", "read -P 7 0 1M", "-c", "write -P 8 1M 1M", mp)
        await s.cmd("x-blockdev-set-iothread", **{"node-name": "file"}, iothread=None,
                    force=True)
        run("qemu-io", "-f", "raw", "-c", "read -P 8 1M 1M", mp)
        await s.delete("e")
        assert str(mp) not in fuse_mounts()


def test_fusermount_mount_and_unmount(fuse_dir: Path) -> None:
    """The unprivileged path (fusermount3 + fd passing) also works as root."""
    from qsd.export.fuse import mount

    mp = fuse_dir / "fm"
    mp.touch()
    session_ = mount.mount_fusermount(str(mp), writable=False, allow_other=False, quiet=False)
    try:
        assert session_.via_fusermount
        assert os.readlink(f"/proc/self/fd/{session_.fd}") == "/dev/fuse"
        line = next(line for line in open("/proc/mounts") if f" {mp} " in line)
        assert line.split()[2] == "fuse" and " ro," in line
        clone = mount.clone_fd(session_.fd)
        os.close(clone)
    finally:
        session_.unmount()
        os.close(session_.fd)
    assert str(mp) not in fuse_mounts()
