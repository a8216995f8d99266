"""Drivers registered from the tests: the registry, the request path and the graph as a
driver author meets them.

``x-test-aligned`` stores its data in its ``file`` child but only takes 4 KiB-aligned
requests (any other request fails), so everything that reaches it unaligned - from a
BlockBackend, a FUSE mount or an NBD client - must have been padded by the block layer
with read-modify-write.  ``x-test-journal`` writes a metadata record in the background
after each write, which drain must wait for.  ``x-test-cow`` is a format with a backing
child.  None of them touches a module of qsd: registering is all it takes.
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbd
import pytest

from qsd import qapi
from qsd.aio import set_main_context
from qsd.block import drain, io, query, registry
from qsd.block.backend import BlockBackend
from qsd.block.graph import BlockGraph
from qsd.block.limits import BlockLimits
from qsd.block.node import BLOCK_DATA, BlockNode, BlockStatus, Child, ChildOpener, Data
from qsd.block.permissions import (
    PERM_ALL,
    PERM_CONSISTENT_READ,
    PERM_RESIZE,
    PERM_WRITE,
    ChildRole,
)
from qsd.daemon import Daemon
from qsd.errors import QMPError
from qsd.nbd.server import NbdServer
from qsd.qapi.base import MemberSpec, QAPIModel

ALIGN = 4096
RW = PERM_CONSISTENT_READ | PERM_WRITE


class DriverOptions(QAPIModel):
    """What blockdev-add's schema would hold for these drivers."""

    driver: str
    node_name: str | None = None
    file: Any = None
    backing: Any = None
    tag: str | None = None

    __qapi_members__ = (
        MemberSpec("driver", "driver", "str", False),
        MemberSpec("node-name", "node_name", "str", True),
        MemberSpec("file", "file", "any", True),
        MemberSpec("backing", "backing", "any", True),
        MemberSpec("tag", "tag", "str", True),
    )


@registry.register("x-test-aligned", options=DriverOptions)
class AlignedNode(BlockNode):
    """A 4 KiB-sector device over its file child that refuses anything unaligned."""

    is_format = True
    strong_options = ("tag",)
    _file: Child | None = None

    async def open(self, options: DriverOptions, children: ChildOpener) -> None:
        self._file = await children.open_child(self, options.file, "file",
                                               ChildRole.DATA | ChildRole.PRIMARY)
        self.requests: list[tuple[str, int, int]] = []

    def driver_limits(self, bl: BlockLimits) -> None:
        bl.request_alignment = ALIGN

    def get_length(self) -> int:
        assert self._file is not None
        return self._file.node.length()

    def _aligned(self, kind: str, offset: int, length: int) -> Child:
        self.requests.append((kind, offset, length))
        if offset % ALIGN or length % ALIGN:
            raise OSError(errno.EINVAL, f"unaligned {kind} at {offset}+{length}")
        assert self._file is not None
        return self._file

    async def do_read(self, offset: int, length: int) -> bytes:
        return await io.read(self._aligned("read", offset, length), offset, length)

    async def do_write(self, offset: int, data: Data, fua: bool) -> None:
        await io.write(self._aligned("write", offset, len(data)), offset, data, fua)

    async def do_write_zeroes(self, offset: int, length: int, may_unmap: bool,
                              no_fallback: bool, fua: bool) -> None:
        child = self._aligned("zero", offset, length)
        await io.write_zeroes(child, offset, length, may_unmap, no_fallback, fua)


JOURNAL = 64 * 1024     # where x-test-journal keeps its metadata record


@registry.register("x-test-journal", options=DriverOptions)
class JournalNode(BlockNode):
    """Data in its file child; after each write, a record of it at offset JOURNAL,
    written by a background task that first waits for ``gate``."""

    is_format = True
    _file: Child | None = None

    async def open(self, options: DriverOptions, children: ChildOpener) -> None:
        self._file = await children.open_child(self, options.file, "file",
                                               ChildRole.IMAGE | ChildRole.PRIMARY)
        self.gate = asyncio.Event()
        self.records = 0

    def get_length(self) -> int:
        return JOURNAL

    async def do_read(self, offset: int, length: int) -> bytes:
        assert self._file is not None
        return await io.read(self._file, offset, length)

    async def do_write(self, offset: int, data: Data, fua: bool) -> None:
        assert self._file is not None
        await io.write(self._file, offset, data, fua)
        self.start_background(self._record(offset, len(data)))

    async def _record(self, offset: int, length: int) -> None:
        await self.gate.wait()
        assert self._file is not None
        self.records += 1
        record = f"{self.records}:{offset}+{length}".encode().ljust(512, b"\0")
        await io.write(self._file, JOURNAL, record)


@registry.register("x-test-cow", options=DriverOptions)
class CowNode(BlockNode):
    """A format whose unwritten blocks come from its backing child (reads only)."""

    is_format = True
    supports_backing = True

    async def open(self, options: DriverOptions, children: ChildOpener) -> None:
        await children.open_child(self, options.file, "file",
                                  ChildRole.IMAGE | ChildRole.PRIMARY)
        if options.backing is not None:
            await children.open_child(self, options.backing, "backing", ChildRole.COW)
            self.backing_file = "base.img"
            self.backing_format = "raw"

    def get_length(self) -> int:
        assert self.file is not None
        return self.file.node.length()

    async def do_read(self, offset: int, length: int) -> bytes:
        below = self.backing or self.file
        assert below is not None
        return await io.read(below, offset, length)

    async def do_block_status(self, want_zero: bool, offset: int, length: int) -> BlockStatus:
        return BlockStatus(0 if self.backing is not None else BLOCK_DATA, length)


# ---- fixtures --------------------------------------------------------------------------------


def image(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


async def add(graph: BlockGraph, **wire: Any) -> BlockNode:
    return await graph.blockdev_add(qapi.parse_command_args("blockdev-add", wire))


async def add_test(graph: BlockGraph, **kwargs: Any) -> BlockNode:
    return await graph.blockdev_add(DriverOptions(**kwargs))


# ---- the registry ----------------------------------------------------------------------------


def test_every_schema_driver_is_registered() -> None:
    """The schema's BlockdevDriver values and the registry name the same drivers, each
    with the options struct of its BlockdevOptions branch."""
    from qsd.qapi import generated

    variants = generated.BlockdevOptions.__qapi_variants__
    drivers = registry.drivers()
    for name, variant in variants.items():
        assert name in drivers, name
        assert issubclass(variant, drivers[name].options)
    assert {n for n in drivers if not n.startswith("x-test-")} == set(variants)


async def test_driver_from_the_tests(graph: BlockGraph, fuse_dir: Path) -> None:
    img = image(fuse_dir / "a.img", 1 << 20)
    await add(graph, **{"driver": "file", "node-name": "f0", "filename": str(img)})
    node = await add_test(graph, driver="x-test-aligned", node_name="t0", file="f0", tag="x")
    assert isinstance(node, AlignedNode)
    info = query.query_named_block_nodes(graph)[0]
    assert info["node-name"] == "t0" and info["drv"] == "x-test-aligned"
    assert info["children"] == [{"child": "file", "node-name": "f0"}]
    assert info["file"] == (f'json:{{"tag": "x", "driver": "x-test-aligned", '
                            f'"file": {{"driver": "file", "filename": "{img}"}}}}')
    limits = info["image"]["limits"]  # type: ignore[index]
    assert limits["request-alignment"] == ALIGN
    assert info["image"]["virtual-size"] == 1 << 20  # type: ignore[index]
    with pytest.raises(QMPError, match="^Block device f0 is in use$"):
        await graph.blockdev_del("f0")
    await graph.blockdev_del("t0")
    await graph.blockdev_del("f0")


# ---- read-modify-write ---------------------------------------------------------------------


async def test_aligned_driver_gets_only_aligned_requests(graph: BlockGraph,
                                                         fuse_dir: Path) -> None:
    img = image(fuse_dir / "a.img", 1 << 20)
    ref = bytearray(img.read_bytes())
    node = await add_test(graph, driver="x-test-aligned", node_name="t0",
                          file={"driver": "file", "filename": str(img)})
    assert isinstance(node, AlignedNode)
    blk = BlockBackend(graph, node, perm=RW, shared=PERM_ALL)
    assert blk.read_nowait(0, ALIGN) is None      # no fast path past the alignment
    rnd = random.Random(7)
    # Disjoint writes that share blocks, all at once: without serialising, the
    # read-modify-write of one would undo the bytes of a neighbour.
    cuts = sorted(rnd.sample(range(1, 1 << 18), 127))
    writes = [(a, rnd.randbytes(b - a)) for a, b in zip([0, *cuts], [*cuts, 1 << 18],
                                                         strict=True)]
    rnd.shuffle(writes)
    await asyncio.gather(*(blk.write(off, data) for off, data in writes))
    for off, data in writes:
        ref[off:off + len(data)] = data
    await blk.write_zeroes(5000, 10000)
    ref[5000:15000] = bytes(10000)
    await blk.flush()
    assert img.read_bytes() == bytes(ref)
    for off, n in ((1, 1), (4095, 2), (12345, 54321), (0, 1 << 20)):
        assert await blk.read(off, n) == bytes(ref[off:off + n])
    assert all(o % ALIGN == 0 and n % ALIGN == 0 for _, o, n in node.requests)
    assert any(kind == "zero" for kind, _, _ in node.requests)


async def _export(daemon: Daemon, **wire: Any) -> None:
    await daemon.exports.add(qapi.parse_command_args("block-export-add", wire))


def _unaligned_io_over_fuse(path: Path, ref: bytearray, seed: int) -> None:
    rnd = random.Random(seed)
    fd = os.open(path, os.O_RDWR)
    try:
        for _ in range(40):
            off = rnd.randrange(len(ref) - 3 * ALIGN)
            data = rnd.randbytes(rnd.randrange(1, 3 * ALIGN))
            assert os.pwrite(fd, data, off) == len(data)
            ref[off:off + len(data)] = data
            n = rnd.randrange(1, 2 * ALIGN)
            roff = rnd.randrange(len(ref) - n)
            assert os.pread(fd, n, roff) == bytes(ref[roff:roff + n])
        os.fsync(fd)
    finally:
        os.close(fd)


def _unaligned_io_over_nbd(sock: Path, ref: bytearray, seed: int) -> None:
    rnd = random.Random(seed)
    client = nbd.NBD()
    client.connect_uri(f"nbd+unix:///t0?socket={sock}")
    try:
        for _ in range(40):
            off = rnd.randrange(len(ref) - 3 * ALIGN)
            data = rnd.randbytes(rnd.randrange(1, 3 * ALIGN))
            client.pwrite(data, off)
            ref[off:off + len(data)] = data
            zoff = rnd.randrange(len(ref) - 2 * ALIGN)
            zlen = rnd.randrange(1, 2 * ALIGN)
            client.zero(zlen, zoff)
            ref[zoff:zoff + zlen] = bytes(zlen)
            n = rnd.randrange(1, 2 * ALIGN)
            roff = rnd.randrange(len(ref) - n)
            assert client.pread(n, roff) == bytes(ref[roff:roff + n])
        client.flush()
    finally:
        client.shutdown()


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                    reason="the FUSE export mounts with mount(2) and needs root and /dev/fuse")
async def test_aligned_driver_over_fuse_and_nbd(fuse_dir: Path) -> None:
    """Unaligned reads, writes and zero-writes from the kernel's FUSE client and from
    libnbd reach a 4 KiB-aligned driver padded; the image holds exactly what was
    written."""
    set_main_context(asyncio.get_running_loop())
    daemon = Daemon()
    graph = daemon.graph
    img = image(fuse_dir / "a.img", 1 << 20)
    ref = bytearray(img.read_bytes())
    node = await add_test(graph, driver="x-test-aligned", node_name="t0",
                          file={"driver": "file", "filename": str(img)})
    assert isinstance(node, AlignedNode)
    mountpoint = fuse_dir / "t0.fuse"
    mountpoint.touch()
    try:
        # One after the other: a writable FUSE export resizes, NBD forbids resizing.
        await _export(daemon, type="fuse", id="fuse0", mountpoint=str(mountpoint),
                      writable=True, **{"node-name": "t0"})
        await asyncio.to_thread(_unaligned_io_over_fuse, mountpoint, ref, 1)
        await daemon.exports.delete("fuse0", "safe")
        await daemon.exports.close_all("fuse")
        addr = qapi.parse_type("SocketAddress", {"type": "unix",
                                                 "path": str(fuse_dir / "nbd.sock")})
        daemon.nbd_server = NbdServer(addr, 0, 10)
        await _export(daemon, type="nbd", id="nbd0", writable=True, **{"node-name": "t0"})
        await asyncio.to_thread(_unaligned_io_over_nbd, fuse_dir / "nbd.sock", ref, 2)
    finally:
        await daemon.shutdown()
    assert img.read_bytes() == bytes(ref)
    assert node.requests and all(o % ALIGN == 0 and n % ALIGN == 0
                                 for _, o, n in node.requests)


# ---- drain ---------------------------------------------------------------------------------


async def test_drain_waits_for_a_drivers_metadata_io(graph: BlockGraph,
                                                     fuse_dir: Path) -> None:
    img = image(fuse_dir / "j.img", 2 * JOURNAL)
    node = await add_test(graph, driver="x-test-journal", node_name="j0",
                          file={"driver": "file", "filename": str(img)})
    assert isinstance(node, JournalNode)
    blk = BlockBackend(graph, node, perm=RW, shared=PERM_ALL)
    await blk.write(4096, b"d" * 4096)
    assert node.in_flight() == 1          # the record is still to be written
    draining = asyncio.ensure_future(drain.drained_begin(graph.lock, [node]))
    await asyncio.sleep(0.1)
    assert not draining.done()
    node.gate.set()
    section = await asyncio.wait_for(draining, 10)
    try:
        with open(img, "rb") as f:
            f.seek(JOURNAL)
            assert f.read(12).rstrip(b"\0") == b"1:4096+4096"
        assert node.in_flight() == 0 and blk.quiesced
    finally:
        drain.drained_end(section)
    assert not blk.quiesced


async def test_requests_inside_a_drained_section(graph: BlockGraph, tmp_path: Path) -> None:
    """A request that arrives while drained waits for drained_end, unless its backend's
    owner disabled request queuing (exports, whose drained_poll counts what they took)."""
    img = image(tmp_path / "q.img", 1 << 20)
    node = await add(graph, driver="file", **{"node-name": "q0"}, filename=str(img))
    queuing = BlockBackend(graph, node, perm=RW, shared=PERM_ALL)
    direct = BlockBackend(graph, node, perm=RW, shared=PERM_ALL)
    direct.disable_request_queuing()
    section = await drain.drained_begin(graph.lock, [node])
    try:
        assert queuing.quiesced and direct.quiesced
        parked = asyncio.ensure_future(queuing.read(0, 4096))
        assert await asyncio.wait_for(direct.read(4096, 4096), 10) == img.read_bytes()[
            4096:8192]
        await asyncio.sleep(0.1)
        assert not parked.done()
    finally:
        drain.drained_end(section)
    assert await asyncio.wait_for(parked, 10) == img.read_bytes()[:4096]


# ---- backing chains, hooks, graph transactions ---------------------------------------------


async def test_backing_chain_in_queries(graph: BlockGraph, fuse_dir: Path) -> None:
    """QEMU's shape (11.1.3 shows it for qcow2): children newest first, the chain's
    depth, backing_file and a nested backing-image unless flat."""
    base = image(fuse_dir / "base.img", 1 << 20)
    top = image(fuse_dir / "top.img", 1 << 20)
    await add(graph, **{"driver": "raw", "node-name": "base",
                        "file": {"driver": "file", "filename": str(base)}})
    await add_test(graph, driver="x-test-cow", node_name="top", backing="base",
                   file={"driver": "file", "filename": str(top)})
    info = query.query_named_block_nodes(graph)[0]
    assert info["children"] == [{"child": "backing", "node-name": "base"},
                                {"child": "file", "node-name": info["children"][1][  # type: ignore[index]
                                    "node-name"]}]
    assert info["backing_file_depth"] == 1
    assert info["backing_file"] == str(base)
    image_info = info["image"]
    assert image_info["backing-filename"] == "base.img"  # type: ignore[index]
    assert image_info["full-backing-filename"] == str(fuse_dir / "base.img")  # type: ignore[index]
    assert image_info["backing-filename-format"] == "raw"  # type: ignore[index]
    assert image_info["backing-image"]["filename"] == str(base)  # type: ignore[index]
    flat = query.query_named_block_nodes(graph, flat=True)[0]
    assert flat["backing_file_depth"] == 0 and "backing-image" not in flat["image"]  # type: ignore[operator]
    graph_info = query.x_debug_query_block_graph(graph)
    cow_edge = [e for e in graph_info["edges"] if e["name"] == "backing"]  # type: ignore[attr-defined, index]
    assert cow_edge[0]["perm"] == [] and "write" in cow_edge[0]["shared-perm"]
    node = graph.find_node("top")
    assert node is not None
    blk = BlockBackend(graph, node, perm=PERM_CONSISTENT_READ, shared=PERM_ALL)
    assert await blk.read(0, 4096) == base.read_bytes()[:4096]
    # Unallocated in top: the chain's status is the backing file's, at depth 2.
    flags, _, depth = await blk.block_status_depth(0, 1 << 20)
    assert flags & BLOCK_DATA and depth == 2


async def test_before_write_hook(graph: BlockGraph, fuse_dir: Path) -> None:
    img = image(fuse_dir / "h.img", 1 << 20)
    node = await add(graph, **{"driver": "file", "node-name": "f0", "filename": str(img),
                               "discard": "unmap"})
    blk = BlockBackend(graph, node, perm=RW, shared=PERM_ALL)
    seen: list[tuple[int, int, bytes]] = []

    async def copy_before_write(target: BlockNode, offset: int, length: int) -> None:
        old = img.read_bytes()[offset:offset + length]
        seen.append((offset, length, old))

    original = img.read_bytes()
    assert blk.write_nowait(0, b"a" * 512)
    node.add_before_write(copy_before_write)
    assert not blk.write_nowait(512, b"b" * 512)     # hooks take the long way
    await blk.write(512, b"b" * 512)
    await blk.write_zeroes(8192, 4096)
    await blk.discard(65536, 65536)
    assert [(o, n) for o, n, _ in seen] == [(512, 512), (8192, 4096), (65536, 65536)]
    assert seen[0][2] == original[512:1024]
    node.remove_before_write(copy_before_write)
    assert blk.write_nowait(1024, b"c" * 512)


async def test_replace_child_rolls_back(graph: BlockGraph, fuse_dir: Path) -> None:
    """A replacement whose permissions clash leaves edges, permissions and image locks as
    they were."""
    a = image(fuse_dir / "a.img", 1 << 20)
    b = image(fuse_dir / "b.img", 1 << 20)
    await add(graph, **{"driver": "file", "node-name": "fa", "filename": str(a)})
    await add(graph, **{"driver": "file", "node-name": "fb", "filename": str(b)})
    raw = await add(graph, **{"driver": "raw", "node-name": "r0", "file": "fa"})
    user = BlockBackend(graph, raw, perm=RW, shared=PERM_ALL & ~PERM_RESIZE)
    fb = graph.find_node("fb")
    assert fb is not None
    BlockBackend(graph, fb, perm=PERM_CONSISTENT_READ, shared=PERM_CONSISTENT_READ)
    file_child = raw.file
    assert file_child is not None
    before = (file_child.perm, file_child.shared)
    locks = [lock_probe(a), lock_probe(b)]
    with pytest.raises(QMPError, match="^Permission conflict on node 'fb': permissions "
                                       "'write' are both required by node 'r0'"):
        graph.replace_child(file_child, fb)
    assert file_child.node.node_name == "fa" and (file_child.perm, file_child.shared) == before
    assert [c.describe() for c in fb.parents] == ["an unnamed block device"]
    assert file_child in graph.nodes["fa"].parents
    await user.write(0, b"still works")
    assert [lock_probe(a), lock_probe(b)] == locks
    assert locks[1] == [f"qemu-img: Could not open '{b}': Failed to get \"write\" lock"]


def lock_probe(img: Path) -> list[str]:
    """What qemu-img says about our image locks when it wants to write and resize."""
    res = subprocess.run(["qemu-img", "resize", "-f", "raw", str(img), "2M"],
                         capture_output=True, text=True)
    return [line for line in res.stderr.splitlines() if "lock" in line]


async def test_replace_node_puts_a_filter_on_top(graph: BlockGraph, fuse_dir: Path) -> None:
    """The users of a node move to a filter above it in one step; the filter's own edge
    to the node stays (how a filter or an overlay is put on top of a node in use)."""
    img = image(fuse_dir / "p.img", 1 << 20)
    f0 = await add(graph, **{"driver": "file", "node-name": "f0", "filename": str(img)})
    blk = BlockBackend(graph, f0, perm=RW, shared=PERM_ALL)
    top = await add(graph, **{"driver": "raw", "node-name": "top", "file": "f0"})
    graph.replace_node(f0, top)
    assert blk.node is top and [c.name for c in f0.parents] == ["file"]
    assert [c.describe() for c in top.parents] == ["an unnamed block device"]
    assert top.file is not None and top.file.perm == RW      # passed through to f0
    await blk.write(4096, b"t" * 4096)
    assert img.read_bytes()[4096:8192] == b"t" * 4096
    edges = query.x_debug_query_block_graph(graph)["edges"]
    assert sorted((e["name"], e["perm"]) for e in edges) == [  # type: ignore[attr-defined]
        ("file", ["write", "consistent-read"]), ("root", ["write", "consistent-read"])]


def test_a_lookup_loads_only_the_drivers_module() -> None:
    """A command line pays at start-up only for the drivers it names (qcow2's modules
    alone take longer to import than QEMU's daemon takes to start)."""
    probe = ("import sys; from qsd.block import registry; "
             "assert registry.lookup('null-co') is not None; "
             "print(sorted(m for m in sys.modules if m.startswith('qsd.block.drivers.')))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "['qsd.block.drivers.null']"
    probe = ("from qsd.block import registry; "
             "assert registry.lookup('no-such-driver') is None; "
             "assert {'file', 'raw', 'qcow2', 'null-aio'} <= set(registry.drivers())")
    subprocess.run([sys.executable, "-c", probe], check=True)
