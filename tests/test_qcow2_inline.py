"""Allocating writes answered inline (``write_nowait`` into an unallocated cluster).

In-process, on images made by qemu-img: a 4 KiB write into an unallocated cluster is
taken inline once its metadata is cached; the cluster gets the backing file's data (or
zeroes) around the write; the L2 table reaches the file only with a flush, after the
refcount that accounts for the new cluster; ``qemu-img check`` and ``qemu-img compare``
agree with what was written.  Where a step would wait (lazy refcounts before the image
is marked dirty, a backing read past the backing file's end) the inline path declines
and the long way does the write.  A cluster freed by a discard takes new data only once
the hole punched into the file for it is done.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import threading
from pathlib import Path
from typing import Any

import pytest

from qsd import qapi
from qsd.block.backend import BlockBackend
from qsd.block.drivers import file as file_driver
from qsd.block.drivers.qcow2.driver import Qcow2Node
from qsd.block.graph import BlockGraph
from qsd.block.permissions import PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE

CLUSTER = 65536
SIZE = 4 << 20


def opts(**kwargs: Any) -> Any:
    wire = {k.replace("_", "-"): v for k, v in kwargs.items()}
    return qapi.parse_command_args("blockdev-add", wire)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


async def open_image(graph: BlockGraph, path: Path) -> tuple[Qcow2Node, BlockBackend]:
    node = await graph.blockdev_add(opts(driver="qcow2", node_name="q",
                                         file={"driver": "file", "filename": str(path)}))
    assert isinstance(node, Qcow2Node)
    blk = BlockBackend(graph, node, perm=PERM_CONSISTENT_READ | PERM_WRITE,
                       shared=PERM_ALL & ~PERM_RESIZE)
    return node, blk


def l2_entry_on_disk(path: Path, guest: int) -> int:
    """The L2 entry for ``guest`` as the file holds it (0 when no L2 table is there)."""
    with open(path, "rb") as f:
        head = f.read(48)
        l1_offset = int.from_bytes(head[40:48], "big")
        f.seek(l1_offset + 8 * (guest // (CLUSTER * CLUSTER // 8)))
        l2_offset = int.from_bytes(f.read(8), "big") & 0x00FFFFFFFFFFFE00
        if not l2_offset:
            return 0
        f.seek(l2_offset + 8 * (guest // CLUSTER % (CLUSTER // 8)))
        return int.from_bytes(f.read(8), "big")


async def test_backing_cow_inline(graph: BlockGraph, tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base_data = os.urandom(SIZE)
    base.write_bytes(base_data)
    img = tmp_path / "top.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(img)).returncode == 0
    expected = bytearray(base_data)
    node, blk = await open_image(graph, img)
    # The first write makes the L2 table (the long way: it allocates metadata).
    first = b"\x11" * 4096
    assert not blk.write_nowait(CLUSTER + 512, first)
    await blk.write(CLUSTER + 512, first)
    expected[CLUSTER + 512:CLUSTER + 512 + 4096] = first
    # Unallocated clusters under that table now take the inline way.
    inline = 0
    for n, cluster in enumerate((3, 7, 8, 40)):
        offset = cluster * CLUSTER + 4096 * (n + 1)
        data = bytes([0x20 + n]) * 4096
        if blk.write_nowait(offset, data):
            inline += 1
        else:
            await blk.write(offset, data)
        expected[offset:offset + 4096] = data
    assert inline >= 3       # at most one backing read may miss the page cache
    # In place now: the inline fast path of allocated clusters.
    again = b"\x33" * 4096
    assert blk.write_nowait(7 * CLUSTER, again)
    expected[7 * CLUSTER:7 * CLUSTER + 4096] = again
    assert bytes(await blk.read(0, SIZE)) == bytes(expected)
    # Nothing of the new mapping is on disk before a flush; all of it after one.
    assert l2_entry_on_disk(img, 8 * CLUSTER) == 0
    await blk.flush()
    assert l2_entry_on_disk(img, 8 * CLUSTER) & (1 << 63)
    assert node.caches is not None and node.caches.l2.depends is None
    await graph.close_all()
    check = qemu_img("check", "--output=json", str(img))
    assert check.returncode == 0, check.stdout + check.stderr
    report = json.loads(check.stdout)
    assert not report.get("leaks") and not report.get("corruptions")
    (tmp_path / "expected.raw").write_bytes(expected)
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(img),
                   str(tmp_path / "expected.raw"))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


async def test_fresh_image_inline(graph: BlockGraph, tmp_path: Path) -> None:
    img = tmp_path / "fresh.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE)).returncode == 0
    expected = bytearray(SIZE)
    _, blk = await open_image(graph, img)
    await blk.write(0, b"\x01" * 512)
    expected[:512] = b"\x01" * 512
    for cluster in range(2, 20, 3):
        offset = cluster * CLUSTER + 8192
        data = bytes([cluster]) * 4096
        assert blk.write_nowait(offset, data)
        expected[offset:offset + 4096] = data
    # The end of the file grew with the new clusters: reads see them.
    assert bytes(await blk.read(0, SIZE)) == bytes(expected)
    await blk.flush()
    await graph.close_all()
    check = qemu_img("check", "--output=json", str(img))
    assert check.returncode == 0, check.stdout + check.stderr
    (tmp_path / "expected.raw").write_bytes(expected)
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(img),
                   str(tmp_path / "expected.raw"))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


async def test_lazy_refcounts_wait_for_dirty_bit(graph: BlockGraph, tmp_path: Path) -> None:
    img = tmp_path / "lazy.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", str(img),
                    str(SIZE)).returncode == 0
    node, blk = await open_image(graph, img)
    await blk.write(0, b"\x02" * 512)      # the L2 table; marks the image dirty
    assert node.header.incompatible_features & 1
    assert blk.write_nowait(5 * CLUSTER, b"\x05" * 4096)
    await blk.flush()
    await graph.close_all()
    # Closed cleanly: the dirty bit is gone and the refcounts are right.
    check = qemu_img("check", "--output=json", str(img))
    assert check.returncode == 0, check.stdout + check.stderr


async def test_concurrent_long_way_and_inline(graph: BlockGraph, tmp_path: Path) -> None:
    """Writes of the long way in flight (their clusters being written without the lock)
    and inline ones on other clusters, in any order: the image stays consistent."""
    base = tmp_path / "base.raw"
    base_data = os.urandom(SIZE)
    base.write_bytes(base_data)
    img = tmp_path / "top.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(img)).returncode == 0
    expected = bytearray(base_data)
    _, blk = await open_image(graph, img)
    rng = random.Random(7)

    async def one(offset: int, data: bytes) -> None:
        if not blk.write_nowait(offset, data):
            await blk.write(offset, data)

    for group in range(25):
        # Up to 8 requests at once on distinct bytes (within a group the order is
        # open); later groups overwrite earlier ones.
        taken: list[tuple[int, int]] = []
        tasks = []
        for n in range(8):
            length = rng.choice((512, 4096, 4096, 3 * CLUSTER))
            offset = rng.randrange(0, SIZE - length) // 512 * 512
            if any(offset < end and start < offset + length for start, end in taken):
                continue
            taken.append((offset, offset + length))
            data = bytes([(group * 8 + n) % 250 + 1]) * length
            expected[offset:offset + length] = data
            tasks.append(one(offset, data))
        await asyncio.gather(*tasks)
    assert bytes(await blk.read(0, SIZE)) == bytes(expected)
    await graph.close_all()
    check = qemu_img("check", "--output=json", str(img))
    assert check.returncode == 0, check.stdout + check.stderr
    (tmp_path / "expected.raw").write_bytes(expected)
    cmp = qemu_img("compare", "-f", "qcow2", "-F", "raw", str(img),
                   str(tmp_path / "expected.raw"))
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr


async def test_cache_clean_waits_for_the_lock(graph: BlockGraph, tmp_path: Path) -> None:
    """cache-clean-interval drops unused tables only while nobody holds the metadata
    lock (a request of another iothread may be using a table it got from the cache)."""
    img = tmp_path / "clean.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE)).returncode == 0
    node = await graph.blockdev_add(opts(driver="qcow2", node_name="q",
                                         cache_clean_interval=1,
                                         file={"driver": "file", "filename": str(img)}))
    assert isinstance(node, Qcow2Node) and node.l2_cache is not None
    blk = BlockBackend(graph, node, perm=PERM_CONSISTENT_READ | PERM_WRITE,
                       shared=PERM_ALL & ~PERM_RESIZE)
    await blk.write(0, b"\x07" * 4096)
    await blk.flush()
    assert node.l2_cache.entries
    assert node.lock.try_acquire()
    try:
        await asyncio.sleep(2.5)       # two clean-ups come and go
        assert node.l2_cache.entries
    finally:
        node.lock.release()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while node.l2_cache.entries and loop.time() < deadline:
        await asyncio.sleep(0.1)
    assert not node.l2_cache.entries
    assert bytes(await blk.read(0, 4096)) == b"\x07" * 4096


async def test_freed_cluster_discarded_before_reuse(graph: BlockGraph, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A cluster freed by a guest discard (pass-discard-request) is handed out again
    after the next flush; the hole punched into the file for it must be done by then.
    A punch left running in the background met the cluster's next data, written inline
    (the kill -9 rounds found blocks of zeroes).  The punch is held back here until the
    discard, a flush and a write to another cluster had their chance to finish."""
    img = tmp_path / "reuse.qcow2"
    assert qemu_img("create", "-q", "-f", "qcow2", str(img), str(SIZE)).returncode == 0
    node = await graph.blockdev_add(opts(driver="qcow2", node_name="q", discard="unmap",
                                         file={"driver": "file", "filename": str(img)}))
    assert isinstance(node, Qcow2Node)
    blk = BlockBackend(graph, node, perm=PERM_CONSISTENT_READ | PERM_WRITE,
                       shared=PERM_ALL & ~PERM_RESIZE)
    await blk.write(0, b"\x01" * CLUSTER)
    await blk.flush()
    host = l2_entry_on_disk(img, 0) & 0x00FFFFFFFFFFFE00
    punching, punched, release = threading.Event(), threading.Event(), threading.Event()
    real = file_driver.fallocate

    def held(fd: int, mode: int, offset: int, length: int) -> None:
        if mode & file_driver.FALLOC_FL_PUNCH_HOLE and offset == host:
            punching.set()
            release.wait(30)
            real(fd, mode, offset, length)
            punched.set()
            return
        real(fd, mode, offset, length)

    monkeypatch.setattr(file_driver, "fallocate", held)
    new = b"\x05" * 4096

    async def guest() -> None:
        await blk.discard(0, CLUSTER)
        await blk.flush()
        if not blk.write_nowait(5 * CLUSTER, new):
            await blk.write(5 * CLUSTER, new)

    work = asyncio.create_task(guest())
    try:
        assert await asyncio.to_thread(punching.wait, 30)
        await asyncio.wait({work}, timeout=1)
    finally:
        release.set()
    await work
    assert await asyncio.to_thread(punched.wait, 30)
    await blk.flush()
    # The new data went into the freed cluster, and the punch did not take it away.
    assert l2_entry_on_disk(img, 5 * CLUSTER) & 0x00FFFFFFFFFFFE00 == host
    assert bytes(await blk.read(5 * CLUSTER, 4096)) == new
