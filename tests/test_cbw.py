"""The copy-before-write filter and the snapshot-access driver in the block layer: old
data reaches the target once per cluster before a write goes on, the view reads the
point in time while the file changes, permissions as QEMU's, the bitmap option, and the
view's discards."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path
from typing import Any

import pytest

from qsd import qapi
from qsd.block import dirty_bitmap, query
from qsd.block.backend import BlockBackend
from qsd.block.drivers.copy_before_write import CopyBeforeWriteNode
from qsd.block.graph import BlockGraph
from qsd.block.node import BlockNode
from qsd.block.permissions import PERM_ALL, PERM_CONSISTENT_READ, PERM_WRITE
from qsd.errors import QMPError

KiB, MiB = 1 << 10, 1 << 20
CLUSTER = 64 * KiB
RW = PERM_CONSISTENT_READ | PERM_WRITE


async def add(graph: BlockGraph, **wire: Any) -> BlockNode:
    return await graph.blockdev_add(qapi.parse_command_args("blockdev-add", wire))


def pattern(size: int) -> bytes:
    """Every 4 KiB block its own byte, so a misplaced block shows."""
    return b"".join(bytes([(i % 251) + 1]) * 4096 for i in range(size // 4096))


@pytest.fixture
async def fleece(graph: BlockGraph, tmp_path: Path) -> tuple[BlockGraph, Path, Path]:
    """Nodes 'src' (4 MiB of pattern()) and 'tgt' (4 MiB of zeroes), raw files."""
    src, tgt = tmp_path / "src.img", tmp_path / "tgt.img"
    src.write_bytes(pattern(4 * MiB))
    tgt.write_bytes(bytes(4 * MiB))
    await add(graph, driver="file", filename=str(src), **{"node-name": "src"})
    await add(graph, driver="file", filename=str(tgt), **{"node-name": "tgt"})
    return graph, src, tgt


async def test_old_data_is_copied_once_per_cluster(fleece: tuple[BlockGraph, Path, Path]
                                                   ) -> None:
    graph, src, tgt = fleece
    old = pattern(4 * MiB)
    cbw = await add(graph, driver="copy-before-write", file="src", target="tgt",
                    **{"node-name": "cbw"})
    view = await add(graph, driver="snapshot-access", file="cbw", **{"node-name": "view"})
    blk = BlockBackend(graph, cbw, perm=RW, shared=PERM_ALL)
    reader = BlockBackend(graph, view, perm=PERM_CONSISTENT_READ, shared=PERM_ALL)
    await blk.write(CLUSTER + 4096, b"\xee" * 100)
    # The whole cluster was copied first, nothing else.
    target = tgt.read_bytes()
    assert target[CLUSTER:2 * CLUSTER] == old[CLUSTER:2 * CLUSTER]
    assert target[:CLUSTER] == bytes(CLUSTER) and target[2 * CLUSTER:] == bytes(
        4 * MiB - 2 * CLUSTER)
    assert src.read_bytes()[CLUSTER + 4096:CLUSTER + 4196] == b"\xee" * 100
    # A second write to the cluster copies nothing again: the view keeps the old data.
    await blk.write(CLUSTER, b"\xdd" * CLUSTER)
    await blk.write_zeroes(3 * MiB, MiB)
    assert await reader.read(0, 4 * MiB) == old
    assert await blk.read(CLUSTER, CLUSTER) == b"\xdd" * CLUSTER
    assert tgt.read_bytes()[3 * MiB:] == old[3 * MiB:]
    # Reads pass through to the file, the filter's name is the file's.
    info = {n["node-name"]: n for n in _nodes(graph)}
    assert info["cbw"]["file"] == str(src) and info["view"]["file"] == str(src)
    assert info["cbw"]["drv"] == "copy-before-write"
    await reader.detach()
    await blk.detach()


def _nodes(graph: BlockGraph) -> list[dict[str, Any]]:
    nodes: list[dict[str, Any]] = query.query_named_block_nodes(graph)
    return nodes


async def test_concurrent_writes_and_reads(fleece: tuple[BlockGraph, Path, Path]) -> None:
    """Many writes over the same clusters at once while the view is read: every read of
    the view gives the point in time."""
    graph, src, _ = fleece
    old = pattern(4 * MiB)
    cbw = await add(graph, driver="copy-before-write", file="src", target="tgt",
                    **{"node-name": "cbw"})
    view = await add(graph, driver="snapshot-access", file="cbw", **{"node-name": "view"})
    blk = BlockBackend(graph, cbw, perm=RW, shared=PERM_ALL)
    reader = BlockBackend(graph, view, perm=PERM_CONSISTENT_READ, shared=PERM_ALL)
    rnd = os.urandom(64)
    writes = [blk.write((b * 37 * 4096) % (4 * MiB - 8192), bytes([b]) * 8192)
              for b in rnd]
    reads = [reader.read(offset, 256 * KiB) for offset in range(0, 4 * MiB, 256 * KiB)]
    results = await asyncio.gather(*writes, *reads)
    assert b"".join(results[len(writes):]) == old
    assert await reader.read(0, 4 * MiB) == old
    assert src.read_bytes() != old
    await reader.detach()
    await blk.detach()


async def test_permissions(fleece: tuple[BlockGraph, Path, Path]) -> None:
    """Once the filter has a user, nobody else may write to its file (QEMU's
    cbw_child_perm), and the target cannot be resized."""
    graph, _, _ = fleece
    src = graph.find_node("src")
    assert src is not None
    other = BlockBackend(graph, src, perm=RW, shared=PERM_ALL)
    cbw = await add(graph, driver="copy-before-write", file="src", target="tgt",
                    **{"node-name": "cbw"})
    with pytest.raises(QMPError) as err:
        await add(graph, driver="snapshot-access", file="cbw", **{"node-name": "view"})
    assert err.value.desc == (
        "Permission conflict on node 'src': permissions 'write' are both required by an "
        "unnamed block device (uses node 'src' as 'root' child) and unshared by node 'cbw' "
        "(uses node 'src' as 'file' child).")
    await other.detach()
    view = await add(graph, driver="snapshot-access", file="cbw", **{"node-name": "view"})
    assert view.length() == 4 * MiB
    edges = _graph_edges(graph)
    assert cbw.file is not None and cbw.file.perm == PERM_CONSISTENT_READ
    assert edges["cbw", "target"]["perm"] == ["write"]
    assert edges["cbw", "target"]["shared-perm"] == ["write-unchanged", "write",
                                                      "consistent-read"]
    assert edges["cbw", "file"]["shared-perm"] == ["write-unchanged", "consistent-read"]


def _graph_edges(graph: BlockGraph) -> dict[tuple[str, str], dict[str, Any]]:
    """x-debug-query-block-graph's edges by (parent node, child name)."""
    result: Any = query.x_debug_query_block_graph(graph, [])
    names = {n["id"]: n["name"] for n in result["nodes"]}
    return {(names[e["parent"]], e["name"]): e for e in result["edges"]}


async def test_bitmap_limits_copies_and_view(fleece: tuple[BlockGraph, Path, Path]) -> None:
    """With ``bitmap``, only its dirty clusters are copied and may be read in the view
    (EACCES elsewhere)."""
    graph, _, tgt = fleece
    src = graph.find_node("src")
    assert src is not None
    bitmap = dirty_bitmap.create(src, CLUSTER, "b0")
    bitmap.set(MiB, CLUSTER)
    cbw = await add(graph, driver="copy-before-write", file="src", target="tgt",
                    bitmap={"node": "src", "name": "b0"}, **{"node-name": "cbw"})
    view = await add(graph, driver="snapshot-access", file="cbw", **{"node-name": "view"})
    blk = BlockBackend(graph, cbw, perm=RW, shared=PERM_ALL)
    reader = BlockBackend(graph, view, perm=PERM_CONSISTENT_READ, shared=PERM_ALL)
    await blk.write(0, b"\x01" * (2 * MiB))
    target = tgt.read_bytes()
    assert target[MiB:MiB + CLUSTER] == pattern(4 * MiB)[MiB:MiB + CLUSTER]
    assert target.count(0) == 4 * MiB - CLUSTER
    assert await reader.read(MiB, CLUSTER) == pattern(4 * MiB)[MiB:MiB + CLUSTER]
    with pytest.raises(OSError) as err:
        await reader.read(0, 4096)
    assert err.value.errno == errno.EACCES
    await reader.detach()
    await blk.detach()


async def test_bitmap_option_errors(fleece: tuple[BlockGraph, Path, Path]) -> None:
    graph, _, _ = fleece
    for bitmap, text in (({"node": "nope", "name": "b0"}, "Node 'nope' not found"),
                         ({"node": "src", "name": "b0"}, "Dirty bitmap 'b0' not found")):
        with pytest.raises(QMPError, match=f"^{text}$"):
            await add(graph, driver="copy-before-write", file="src", target="tgt",
                      bitmap=bitmap, **{"node-name": "cbw"})
    with pytest.raises(QMPError, match="^Cannot create block-copy-state: min-cluster-size "
                                       "needs to be a power of 2$"):
        await add(graph, driver="copy-before-write", file="src", target="tgt",
                  **{"node-name": "cbw", "min-cluster-size": 100000})
    assert graph.find_node("cbw") is None
    node = await add(graph, driver="copy-before-write", file="src", target="tgt",
                     **{"node-name": "cbw", "min-cluster-size": MiB})
    assert isinstance(node, CopyBeforeWriteNode) and node.bcs.cluster_size == MiB


async def test_view_discard_gives_up_clusters(fleece: tuple[BlockGraph, Path, Path]) -> None:
    """A discard of the view drops whole clusters: they need no copy and may no longer
    be read."""
    graph, _, tgt = fleece
    cbw = await add(graph, driver="copy-before-write", file="src", target="tgt",
                    **{"node-name": "cbw"})
    view = await add(graph, driver="snapshot-access", file="cbw", discard="unmap",
                     **{"node-name": "view"})
    blk = BlockBackend(graph, cbw, perm=RW, shared=PERM_ALL)
    reader = BlockBackend(graph, view, perm=PERM_CONSISTENT_READ | PERM_WRITE,
                          shared=PERM_ALL)
    await reader.discard(CLUSTER // 2, 3 * CLUSTER)     # whole clusters 1 and 2
    await blk.write(0, b"\x02" * (4 * CLUSTER))
    target = tgt.read_bytes()
    old = pattern(4 * MiB)
    assert target[:CLUSTER] == old[:CLUSTER]
    assert target[CLUSTER:3 * CLUSTER] == bytes(2 * CLUSTER)
    assert target[3 * CLUSTER:4 * CLUSTER] == old[3 * CLUSTER:4 * CLUSTER]
    assert await reader.read(0, CLUSTER) == old[:CLUSTER]
    with pytest.raises(OSError) as err:
        await reader.read(CLUSTER, 10)
    assert err.value.errno == errno.EACCES
    with pytest.raises(OSError) as err:
        await reader.write(0, b"x" * 512)
    assert err.value.errno == errno.ENOTSUP
    await reader.detach()
    await blk.detach()
