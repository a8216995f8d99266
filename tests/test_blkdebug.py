"""The blkdebug filter inside the block layer: the limits it announces shape requests
(read-modify-write, splitting, the zero-write fallback), events arm rules, and rules
from a config file behave like those given as options."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

from qsd import qapi
from qsd.block.backend import BlockBackend
from qsd.block.drivers.blkdebug import BlkdebugNode
from qsd.block.graph import BlockGraph
from qsd.block.permissions import PERM_ALL, PERM_CONSISTENT_READ, PERM_RESIZE, PERM_WRITE

RW = PERM_CONSISTENT_READ | PERM_WRITE
SHARED = PERM_ALL & ~PERM_RESIZE
SIZE = 1 << 20


async def _stack(graph: BlockGraph, tmp_path: Path, **blkdebug: Any
                 ) -> tuple[BlockBackend, BlkdebugNode, Path]:
    """file -> blkdebug -> raw, the raw node used through a BlockBackend."""
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(range(256)) * (SIZE // 256))
    for options in ({"driver": "file", "node-name": "file0", "filename": str(image)},
                    {"driver": "blkdebug", "node-name": "dbg", "image": "file0", **blkdebug},
                    {"driver": "raw", "node-name": "disk", "file": "dbg"}):
        await graph.blockdev_add(qapi.parse_command_args("blockdev-add", options))
    node = graph.find_node("dbg")
    assert isinstance(node, BlkdebugNode)
    disk = graph.find_node("disk")
    assert disk is not None
    return BlockBackend(graph, disk, perm=RW, shared=SHARED), node, image


async def test_limits_shape_requests(graph: BlockGraph, tmp_path: Path) -> None:
    """With align=4096 an unaligned write is a read-modify-write whose head read the
    pwritev_rmw_head event can make fail; zero-writes below opt-write-zero become writes."""
    blk, node, image = await _stack(graph, tmp_path, align=4096, **{
        "max-transfer": 8192, "opt-write-zero": 8192,
        "inject-error": [{"event": "pwritev_rmw_head", "iotype": "read", "once": True}]})
    assert (node.bl.request_alignment, node.bl.max_transfer) == (4096, 8192)
    await blk.write(8192, b"\x01" * 4096)               # aligned: no read-modify-write
    with pytest.raises(OSError) as error:
        await blk.write(100, b"\x02" * 10)              # the head read fails
    assert error.value.errno == errno.EIO
    await blk.write(4096, b"\x03" * 10)                 # once: the rule is gone
    data = image.read_bytes()
    assert data[8192:12288] == b"\x01" * 4096
    assert data[:4096] == bytes(range(256)) * 16       # the failed write changed nothing
    assert data[4096:4106] == b"\x03" * 10 and data[4106:8192] == (bytes(range(256)) * 16)[10:]
    # zero-writes below the zero-write alignment fall back to writes of zeroes
    await blk.write_zeroes(16384 + 512, 1024)
    assert image.read_bytes()[16384 + 512:16384 + 1536] == bytes(1024)
    blk.detach()


async def test_sector_rule_on_split_reads(graph: BlockGraph, tmp_path: Path) -> None:
    blk, _, _ = await _stack(graph, tmp_path, **{
        "max-transfer": 8192,
        "inject-error": [{"event": "read_aio", "sector": 40, "iotype": "read",
                          "errno": errno.ENOSPC}]})
    assert len(await blk.read(0, 16384)) == 16384         # pieces 0-8k and 8k-16k
    with pytest.raises(OSError) as error:
        await blk.read(16384, 8192)                       # sector 40 is at 20480
    assert error.value.errno == errno.ENOSPC
    blk.detach()


async def test_config_file_rules(graph: BlockGraph, tmp_path: Path) -> None:
    """A config file's rules, with a state machine: the first write moves the node to
    state 2, where flushes fail once; the option's rule is checked after the file's."""
    config = tmp_path / "rules.conf"
    config.write_text(
        "# blkdebug rules\n"
        '[set-state]\nevent = "write_aio"\nstate = "1"\nnew_state = "2"\n\n'
        '[inject-error]\nevent = "flush_to_disk"\nstate = "2"\nerrno = "28"\n'
        'once = "on"\nimmediately = "on"\n')
    blk, node, _ = await _stack(graph, tmp_path, config=str(config), **{
        "inject-error": [{"event": "read_aio", "errno": errno.EROFS, "iotype": "write"}]})
    await blk.flush()                                    # state 1: nothing armed
    await blk.write(0, b"x" * 512)
    assert node.state == 2
    with pytest.raises(OSError) as error:
        await blk.flush()
    assert error.value.errno == errno.ENOSPC
    await blk.flush()                                    # once: gone
    assert await blk.read(0, 1) == b"x"                  # a read arms a write rule
    with pytest.raises(OSError) as error:
        await blk.write(0, b"y")
    assert error.value.errno == errno.EROFS
    blk.detach()
