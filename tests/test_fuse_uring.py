"""FUSE over io_uring: requests flow through the rings, data survives, deletion cleans up.

The kernel offers FUSE over io_uring to new connections only while the fuse module's
``enable_uring`` parameter is Y; the ``uring_param`` fixture sets it for the test and puts
back what it found.  Where the kernel has no such parameter the tests are skipped.
"""

from __future__ import annotations

import asyncio
import errno
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import QsdFactory
from tests.harness import fd_numbers, fuse_mounts
from tests.test_fuse import (
    MiB,
    arun,
    fio,
    fio_load,
    fuse_fds,
    load_ended,
    run,
    session,
    thread_ids,
    threads_beyond,
)

ENABLE_URING = Path("/sys/module/fuse/parameters/enable_uring")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                       reason="FUSE export tests mount with mount(2) and need root and "
                              "/dev/fuse"),
    pytest.mark.skipif(not ENABLE_URING.exists(),
                       reason="this kernel has no FUSE over io_uring (no fuse module "
                              "parameter enable_uring)"),
]

@pytest.fixture
def uring_param() -> Iterator[Path]:
    """Lets new FUSE connections use io_uring; restores the parameter afterwards."""
    before = ENABLE_URING.read_text().strip()
    ENABLE_URING.write_text("Y")
    yield ENABLE_URING
    ENABLE_URING.write_text(before)


def io_uring_fds(pid: int) -> int:
    return len(fd_numbers(pid, "anon_inode:[io_uring]"))


def io_uring_mappings(pid: int) -> int:
    """Mappings of io_uring rings: each holds the ring's file open, fd closed or not."""
    with open(f"/proc/{pid}/maps") as maps:
        return sum("anon_inode:[io_uring]" in line for line in maps)


def iothread_args(n: int) -> list[str]:
    return [arg for i in range(n) for arg in ("--object", f"iothread,id=io{i}")]


async def test_requests_flow_through_the_ring(fuse_dir: Path, start_qsd: QsdFactory,
                                              uring_param: Path) -> None:
    """After INIT not one read of /dev/fuse: every request came through io_uring."""
    mp = fuse_dir / "t.fuse"
    mp.touch()
    daemon = start_qsd(*iothread_args(2), "--blockdev", "null-co,node-name=null,size=67108864")
    async with session(daemon) as s:
        await s.add_fuse("export", "null", mp, writable=True, iothread=["io0", "io1"],
                         **{"io-uring": "on"})
        # INIT is answered once the first request needs the connection.
        assert os.stat(mp).st_size == 64 * MiB
        fuse = fd_numbers(daemon.pid, "/dev/fuse")
        assert len(fuse) == 2
        assert io_uring_fds(daemon.pid) >= 2
        trace = fuse_dir / "strace"
        tracer = subprocess.Popen(
            ["strace", "-f", "-qq", "-e", "trace=read,readv,io_uring_enter", "-o", str(trace),
             "-p", str(daemon.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            await asyncio.sleep(1)
            out = await arun(*fio(mp, "--ioengine=libaio", "--iodepth=16", "--rw=randrw",
                                  "--numjobs=2", "--size=64M", runtime=2))
            assert out.returncode == 0
            assert await arun("dd", f"if={mp}", "of=/dev/null", "bs=64k", "iflag=direct")
        finally:
            tracer.terminate()
            tracer.wait(10)
        calls = trace.read_text().splitlines()
        fuse_reads = [c for c in calls
                      if (m := re.search(r"\breadv?\((\d+),", c)) and int(m[1]) in fuse]
        assert fuse_reads == []
        assert sum("io_uring_enter(" in c for c in calls) > 100
        await s.delete("export")


@pytest.mark.parametrize("nr_iothreads", [1, 2])
async def test_verified_writes_over_the_ring(fuse_dir: Path, start_qsd: QsdFactory,
                                             uring_param: Path, nr_iothreads: int) -> None:
    img = fuse_dir / "t.raw"
    run("truncate", "-s", "64M", img)
    mp = fuse_dir / "t.fuse"
    mp.touch()
    daemon = start_qsd(*iothread_args(nr_iothreads),
                       "--blockdev", f"file,node-name=file,filename={img}")
    async with session(daemon) as s:
        await s.add_fuse("export", "file", mp, writable=True,
                         iothread=[f"io{i}" for i in range(nr_iothreads)],
                         **{"io-uring": "on"})
        await arun(*fio(mp, "--ioengine=libaio", "--iodepth=16", "--rw=randwrite",
                        "--numjobs=2", "--size=32M", "--offset_increment=32M",
                        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", runtime=None),
                   timeout=180)
        await arun(*fio(mp, "--ioengine=psync", "--rw=write", "--bs=64k", "--size=16M",
                        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", runtime=None),
                   timeout=180)
        # Requests that go through the block layer's slow path, too.
        run("truncate", "-s", "48M", mp)
        assert os.stat(mp).st_size == 48 * MiB
        assert os.stat(img).st_size == 48 * MiB
        with open(mp, "r+b") as f:
            os.fsync(f.fileno())
        await s.delete("export")


@pytest.mark.parametrize("io_uring", ["on", "off"])
async def test_delete_under_load_leaves_nothing(fuse_dir: Path, start_qsd: QsdFactory,
                                                uring_param: Path, io_uring: str) -> None:
    """block-export-del with fio's requests in flight: the daemon holds nothing of the
    export when it is done (rings, their mappings, fds, threads, the mount), and every
    request the kernel still had fails at once, so that fio ends with an error."""
    mp = fuse_dir / "t.fuse"
    mp.touch()
    daemon = start_qsd(*iothread_args(2), "--blockdev", "null-co,node-name=null,size=67108864")
    async with session(daemon) as s:
        # The event loops open io_urings and threads of their own on first use: count
        # against what is there after a first round.
        baseline: tuple[int, int] | None = None
        baseline_threads: set[int] = set()
        for _ in range(3):
            await s.add_fuse("export", "null", mp, writable=True, iothread=["io0", "io1"],
                             **{"io-uring": io_uring})
            async with fio_load(mp, "--ioengine=libaio", "--iodepth=16", "--rw=randrw",
                                "--size=64M", jobs=2) as load:
                if baseline is not None and io_uring == "on":
                    assert io_uring_fds(daemon.pid) > baseline[0]
                    assert io_uring_mappings(daemon.pid) > baseline[1]
                await asyncio.sleep(0.5)
                await s.delete("export")
                assert str(mp) not in fuse_mounts()
                assert fuse_fds(daemon.pid) == 0
                state = (io_uring_fds(daemon.pid), io_uring_mappings(daemon.pid))
                if baseline is not None:
                    assert state == baseline
                    assert await threads_beyond(daemon.pid, baseline_threads) == set()
                baseline = state
                baseline_threads = thread_ids(daemon.pid)
                assert await load_ended(load, 30) != 0
        assert await s.cmd("query-block-exports") == []


async def test_forcing_either_path(fuse_dir: Path, start_qsd: QsdFactory,
                                   uring_param: Path) -> None:
    mp = fuse_dir / "t.fuse"
    mp.touch()
    daemon = start_qsd("--blockdev", "null-co,node-name=null,size=1048576")
    async with session(daemon) as s:
        # off: /dev/fuse only, even though the kernel would offer the ring
        await s.add_fuse("export", "null", mp, **{"io-uring": "off"})
        baseline_rings = io_uring_fds(daemon.pid)
        assert os.stat(mp).st_size == MiB
        assert io_uring_fds(daemon.pid) == baseline_rings
        await s.delete("export")
        # on, where the kernel does not offer it: a clear error and nothing left behind
        uring_param.write_text("N")
        desc = await s.error("block-export-add", type="fuse", id="export",
                             **{"node-name": "null", "io-uring": "on"}, mountpoint=str(mp))
        assert desc == ("Cannot use FUSE over io_uring: it is disabled (fuse module "
                        "parameter enable_uring)")
        assert str(mp) not in fuse_mounts()
        assert fuse_fds(daemon.pid) == 0
        # auto falls back to /dev/fuse
        await s.add_fuse("export", "null", mp)
        assert os.stat(mp).st_size == MiB
        assert io_uring_fds(daemon.pid) == baseline_rings
        await s.delete("export")


@pytest.mark.parametrize("io_uring", ["on", "off"])
async def test_a_full_file_system_answers_enospc(fuse_dir: Path, start_qsd: QsdFactory,
                                                uring_param: Path, io_uring: str) -> None:
    """A write the file driver fails inline (ENOSPC on a full file system) is answered
    with that errno on both paths; the ring's inline path once left it unanswered and the
    writer hung."""
    store = fuse_dir / "small"
    store.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", store)
    try:
        img = store / "t.raw"
        run("truncate", "-s", "4M", img)
        mp = fuse_dir / "t.fuse"
        mp.touch()
        daemon = start_qsd("--object", "iothread,id=io0",
                           "--blockdev", f"file,node-name=file,filename={img}")
        async with session(daemon) as s:
            await s.add_fuse("export", "file", mp, writable=True, iothread="io0",
                             **{"io-uring": io_uring})

            def fill() -> int:
                fd = os.open(mp, os.O_WRONLY)
                try:
                    for offset in range(0, 4 * MiB, 64 * 1024):
                        os.pwrite(fd, b"\xa5" * 65536, offset)
                except OSError as err:
                    return err.errno or 0
                finally:
                    os.close(fd)
                return 0

            assert await asyncio.wait_for(asyncio.to_thread(fill), 30) == errno.ENOSPC
            assert await s.cmd("query-block-exports") != []
            await s.delete("export")
    finally:
        run("umount", "-l", store)
