"""FUSE over io_uring: requests flow through the rings, data survives, deletion cleans up.

The kernel offers FUSE over io_uring to new connections only while the fuse module's
``enable_uring`` parameter is Y; the ``uring_param`` fixture sets it for the test and puts
back what it found.  Where the kernel has no such parameter the tests are skipped.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import mmap
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import QsdFactory
from tests.harness import fd_numbers, fuse_mounts
from tests.test_fuse import (
    MiB,
    arun,
    files_on,
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


async def test_two_rings_in_one_iothread(fuse_dir: Path, start_qsd: QsdFactory,
                                         uring_param: Path) -> None:
    """One iothread serves the rings of two exports: one under steady fio load, the other
    added, used and deleted again and again.  The loaded ring must not keep the thread
    to itself (with a long poll window its load never lets the ring run dry), and a
    deletion must end even when the kernel hands the stopping export a request late
    (the RELEASE of the client's close): the unmount waits for it."""
    images = {name: fuse_dir / f"{name}.raw" for name in ("load", "churn")}
    for img in images.values():
        run("truncate", "-s", "16M", img)
    load_mp = fuse_dir / "load.fuse"
    churn_mp = fuse_dir / "churn.fuse"
    load_mp.touch()
    churn_mp.touch()
    daemon = start_qsd(*iothread_args(1),
                       *(arg for name, img in images.items()
                         for arg in ("--blockdev", f"file,node-name={name},filename={img}")))
    # The list form: a ring whose thread never changes defers its task work to that
    # thread's own io_uring_enter calls.
    ring_opts = {"writable": True, "iothread": ["io0"], "io-uring": "on"}
    async with session(daemon) as s:
        assert await s.cmd("qom-set", path="/objects/io0", property="poll-max-ns",
                           value=20_000_000) == {}
        await s.add_fuse("load", "load", load_mp, **ring_opts)
        # fio's job as a thread, so that a SIGINT to fio ends it (and its requests).
        load = await asyncio.create_subprocess_exec(
            *fio(load_mp, "--ioengine=psync", "--rw=randrw", "--size=16M", "--thread",
                 runtime=120), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            dev = os.stat(load_mp).st_dev
            while not files_on(load.pid, dev):
                assert load.returncode is None, "fio ended before it opened the export"
                await asyncio.sleep(0.05)

            def exercise() -> None:
                fd = os.open(churn_mp, os.O_RDWR)
                try:
                    assert os.pwrite(fd, b"\x5a" * 4096, 4096) == 4096
                    assert os.pread(fd, 4096, 4096) == b"\x5a" * 4096
                finally:
                    os.close(fd)

            cycles = 0
            deadline = asyncio.get_running_loop().time() + 15
            while asyncio.get_running_loop().time() < deadline:
                await s.add_fuse("churn", "churn", churn_mp, **ring_opts)
                await asyncio.wait_for(asyncio.to_thread(exercise), 20)
                # At once: the RELEASE of the close above may still be on its way.
                await s.delete("churn")
                cycles += 1
            assert load.returncode is None, "fio failed on the loaded export"
            assert cycles >= 5
        finally:
            if load.returncode is None:
                load.send_signal(signal.SIGINT)
            # It ends (128, for the signal) once its request in flight is answered.
            try:
                await asyncio.wait_for(load.wait(), 30)
            except TimeoutError:
                load.kill()
                raise AssertionError("fio did not end: its requests went unanswered") from None
        await s.delete("load")


async def test_release_while_deleting(fuse_dir: Path, start_qsd: QsdFactory,
                                      uring_param: Path) -> None:
    """A request the kernel hands a stopping export's ring, here the RELEASE of a file
    whose last reference goes while the deletion drains the node: with the ring's task
    work deferred to its thread only that thread's io_uring_enter moves it into its
    entry, whose teardown the unmount waits for.  The deletion ends all the same."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    ring_mp = fuse_dir / "ring.fuse"
    slow_mp = fuse_dir / "slow.fuse"
    ring_mp.touch()
    slow_mp.touch()
    # Every read of the node takes 2 s: a read through the second export keeps the
    # deletion's drain waiting meanwhile.
    daemon = start_qsd(*iothread_args(1), "--blockdev",
                       "null-co,node-name=slow,size=1048576,latency-ns=2000000000")
    async with session(daemon) as s:
        await s.add_fuse("ring", "slow", ring_mp, iothread=["io0"], **{"io-uring": "on"})
        await s.add_fuse("slow", "slow", slow_mp, **{"io-uring": "off"})
        # A mapping holds the file without a file descriptor: its munmap drops the last
        # reference with a RELEASE and no FLUSH (which close(2) would wait for).
        fd = os.open(ring_mp, os.O_RDONLY)
        addr = libc.mmap(None, 4096, mmap.PROT_READ, mmap.MAP_PRIVATE, fd, 0)
        os.close(fd)
        assert addr not in (None, ctypes.c_void_p(-1).value), ctypes.get_errno()

        def slow_read() -> int:
            fd = os.open(slow_mp, os.O_RDONLY)
            try:
                return len(os.pread(fd, 4096, 0))
            finally:
                os.close(fd)

        read = asyncio.ensure_future(asyncio.to_thread(slow_read))
        await asyncio.sleep(0.5)
        deletion = asyncio.ensure_future(s.cmd("block-export-del", id="ring"))
        await asyncio.sleep(0.5)
        assert not deletion.done()
        assert libc.munmap(addr, 4096) == 0
        assert await asyncio.wait_for(read, 20) == 4096
        assert await asyncio.wait_for(deletion, 20) == {}
        event = await asyncio.wait_for(s.deleted.get(), 20)
        assert event["data"] == {"id": "ring"}
        assert str(ring_mp) not in fuse_mounts()
        await s.delete("slow")
