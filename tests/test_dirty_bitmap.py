"""The in-memory dirty bitmap (qsd.block.dirty_bitmap) and how the request path marks
it: through qsd.block.io and through BlockBackend's inline write path, on real nodes."""

from __future__ import annotations

import concurrent.futures
import os
import random
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qsd import qapi
from qsd.block import dirty_bitmap
from qsd.block.backend import BlockBackend
from qsd.block.graph import BlockGraph
from qsd.block.node import BlockNode
from qsd.block.permissions import PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE
from qsd.errors import QMPError
from tests.conftest import QsdFactory
from tests.harness import Monitor, wait_for_mount

MiB = 1 << 20


async def _add(graph: BlockGraph, **wire: object) -> BlockNode:
    return await graph.blockdev_add(qapi.parse_command_args("blockdev-add", wire))


async def _null(graph: BlockGraph, size: int = 64 * MiB) -> BlockNode:
    return await _add(graph, **{"driver": "null-co", "node-name": "n0", "size": size})


def _model_runs(bits: list[bool], gran: int, size: int) -> list[tuple[int, int, bool]]:
    runs: list[tuple[int, int, bool]] = []
    for g, bit in enumerate(bits):
        start, end = g * gran, min((g + 1) * gran, size)
        if runs and runs[-1][2] == bit:
            runs[-1] = (runs[-1][0], end - runs[-1][0], bit)
        else:
            runs.append((start, end - start, bit))
    return runs


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_bits_match_a_plain_model(data: st.DataObject) -> None:
    """set/reset/count/extents/next_* agree with a list of booleans, for granule counts
    that are and are not multiples of 8."""
    class Node:
        """Just what a bitmap asks of its node."""

        node_name = "m"

        def __init__(self) -> None:
            self.dirty_bitmaps: list[dirty_bitmap.DirtyBitmap] = []

        def length(self) -> int:
            return size

        def notify_changed(self) -> None:
            pass

    gran = 1 << data.draw(st.integers(9, 12))
    size = data.draw(st.integers(1, 40)) * gran - data.draw(st.sampled_from([0, 512]))
    size = max(size, 512)
    bm = dirty_bitmap.create(Node(), gran, "b")  # type: ignore[arg-type]
    granules = -(-size // gran)
    model = [False] * granules
    for _ in range(data.draw(st.integers(1, 12))):
        offset = data.draw(st.integers(0, size - 1))
        length = data.draw(st.integers(1, size - offset))
        value = data.draw(st.booleans())
        (bm.set if value else bm.reset)(offset, length)
        for g in range(offset // gran, (offset + length - 1) // gran + 1):
            model[g] = value
    assert bm.count() == sum(model) * gran
    assert list(bm.extents(0, size)) == _model_runs(model, gran, size)
    start = data.draw(st.integers(0, size - 1))
    dirty = [g for g in range(granules) if model[g] and (g + 1) * gran > start]
    clean = [g for g in range(granules) if not model[g] and (g + 1) * gran > start]
    assert bm.next_dirty(start, size) == (max(dirty[0] * gran, start) if dirty else -1)
    assert bm.next_clean(start, size) == (max(clean[0] * gran, start) if clean else -1)
    packed = bm.to_bytes()
    assert len(packed) == -(-granules // 8)
    assert all((packed[g // 8] >> (g % 8) & 1) == model[g] for g in range(granules))
    copy = dirty_bitmap.DirtyBitmap(Node(), gran, None)  # type: ignore[arg-type]
    copy.load_bytes(packed)
    assert copy.to_bytes() == packed


async def test_merge_successor_and_checks(graph: BlockGraph) -> None:
    node = await _null(graph)
    a = dirty_bitmap.create(node, 65536, "a")
    b = dirty_bitmap.create(node, 4096, "b")
    assert [bm.name for bm in node.dirty_bitmaps] == ["b", "a"]   # newest first
    with pytest.raises(QMPError, match="Bitmap already exists: a"):
        dirty_bitmap.create(node, 512, "a")
    b.set(70000, 1)
    old = dirty_bitmap.merge_checked(a, b)
    assert list(a.dirty_areas()) == [(65536, 65536)]
    a.restore(old)
    assert a.count() == 0
    a.busy = True
    with pytest.raises(QMPError, match="^Bitmap 'a' is currently in use by another "
                                       "operation and cannot be used$"):
        dirty_bitmap.merge_checked(a, b)
    a.busy = False
    succ = a.create_successor()
    assert a.busy and a.disabled and not succ.disabled and a.recording
    succ.set(0, 1)
    assert a.reclaim() is a and a.count() == 65536 and not a.busy and a.enabled
    succ = a.create_successor()
    succ.set(MiB, 1)
    new = a.abdicate()
    assert new.name == "a" and list(new.dirty_areas()) == [(MiB, 65536)]
    assert dirty_bitmap.find(node, "a") is new
    dirty_bitmap.release(new)
    dirty_bitmap.release(b)
    assert node.dirty_bitmaps == []


async def test_request_path_marks_enabled_bitmaps(graph: BlockGraph, tmp_path: Path) -> None:
    """Writes, zero-writes and discards through io and through the inline write path
    mark every enabled bitmap of the node; a disabled bitmap records nothing; nodes
    below a format are marked by their own requests."""
    img = tmp_path / "a.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    await _add(graph, **{"driver": "file", "node-name": "f0", "filename": str(img),
                         "discard": "unmap"})
    node = await _add(graph, **{"driver": "qcow2", "node-name": "q0", "file": "f0",
                                "discard": "unmap"})
    blk = BlockBackend(graph, node, perm=PERM_CONSISTENT_READ | PERM_WRITE, shared=0x1f)
    try:
        assert dirty_bitmap.default_granularity(node) == 65536
        on = dirty_bitmap.create(node, 65536, "on")
        off = dirty_bitmap.create(node, 65536, "off")
        off.disabled = True
        await blk.write(0, b"x" * 4096)                 # allocates: through io
        assert blk.write_nowait(512, b"y" * 512)        # allocated: the inline path
        await blk.write(5 * MiB + 100, b"z")            # unaligned
        await blk.write_zeroes(10 * MiB, 3 * 65536)
        await blk.discard(20 * MiB, 65536)
        assert list(on.dirty_areas()) == [(0, 65536), (5 * MiB, 65536),
                                          (10 * MiB, 3 * 65536), (20 * MiB, 65536)]
        assert off.count() == 0
        # A bitmap on the file below: qcow2 no longer writes there inline, and the
        # file node's own requests mark it.
        below = dirty_bitmap.create(graph.nodes["f0"], 4096, "below")
        assert not blk.write_nowait(1024, b"w" * 512)
        await blk.write(1024, b"w" * 512)
        assert below.count() == 4096
        dirty_bitmap.release(below)
        assert blk.write_nowait(1024, b"w" * 512)
        on.reset(0, 65536)
        off.disabled = False
        dirty_bitmap.release(on)
        assert blk.write_nowait(2048, b"v" * 512)
        assert list(off.dirty_areas()) == [(0, 65536)]
        dirty_bitmap.release(off)
        assert blk.write_nowait(2048, b"v" * 512)
    finally:
        await blk.detach()


async def test_bitmap_follows_resize(graph: BlockGraph, tmp_path: Path) -> None:
    img = tmp_path / "r.raw"
    img.write_bytes(bytes(MiB))
    node = await _add(graph, **{"driver": "file", "node-name": "f0", "filename": str(img)})
    blk = BlockBackend(graph, node, perm=PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
                       shared=0x1f)
    try:
        bm = dirty_bitmap.create(node, 65536, "r")
        bm.set(0, MiB)
        await blk.truncate(MiB // 2 + 512)
        assert bm.size == MiB // 2 + 512 and bm.count() == 9 * 65536
        await blk.truncate(2 * MiB)
        assert bm.size == 2 * MiB and list(bm.dirty_areas()) == [(0, 9 * 65536)]
        rng = random.Random(1)
        for _ in range(50):
            offset = rng.randrange(0, 2 * MiB - 4096)
            await blk.write(offset, b"q" * 4096)
            assert bm.get(offset) and bm.get(offset + 4095)
    finally:
        await blk.detach()


def test_writes_through_fuse_in_iothreads(fuse_dir: Path, start_qsd: QsdFactory) -> None:
    """Writes from several threads through a FUSE export served by two iothreads (the
    inline write path) dirty exactly the granules they touch, as an NBD client reads
    the bitmap (nbdinfo --map=qemu:dirty-bitmap:b)."""
    img = fuse_dir / "img.raw"
    img.write_bytes(b"")
    os.truncate(img, 64 * MiB)
    mp = fuse_dir / "img.fuse"
    mp.touch()
    sock = fuse_dir / "nbd.sock"
    daemon = start_qsd("--object", "iothread,id=io0", "--object", "iothread,id=io1",
                       "--blockdev", f"file,node-name=f,filename={img}",
                       "--nbd-server", f"addr.type=unix,addr.path={sock}")
    mon = Monitor(daemon)
    mon.ok("block-dirty-bitmap-add", node="f", name="b", granularity=65536)
    mon.ok("block-export-add", type="fuse", id="e", **{"node-name": "f"},
           mountpoint=str(mp), writable=True, iothread=["io0", "io1"])
    wait_for_mount(mp, daemon)
    rng = random.Random(7)
    offsets = [rng.randrange(0, 64 * MiB - 8192) for _ in range(400)]
    fd = os.open(mp, os.O_WRONLY)
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda off: os.pwrite(fd, b"d" * 3000, off), offsets))
        os.fsync(fd)
    finally:
        os.close(fd)
    dirty = {g for off in offsets for g in range(off >> 16, ((off + 2999) >> 16) + 1)}
    [info] = [n["dirty-bitmaps"] for n in mon.ok("query-named-block-nodes")
              if n["node-name"] == "f"]
    assert info == [{"name": "b", "recording": True, "persistent": False, "busy": False,
                     "granularity": 65536, "count": len(dirty) * 65536}]
    mon.ok("block-export-del", id="e")
    mon.wait_event("BLOCK_EXPORT_DELETED")
    mon.ok("block-export-add", type="nbd", id="n", **{"node-name": "f"}, bitmaps=["b"],
           writable=True)
    out = subprocess.run(["nbdinfo", "--map=qemu:dirty-bitmap:b",
                          f"nbd+unix:///f?socket={sock}"], capture_output=True, text=True,
                         check=True).stdout
    mapped = set()
    for line in out.splitlines():
        start, length, kind = (int(x) for x in line.split()[:3])
        if kind:
            mapped |= set(range(start >> 16, (start + length) >> 16))
    assert mapped == dirty
