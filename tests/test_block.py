"""Block layer in-process: data through the layer checked with qemu-img/qemu-io, QEMU's
error texts, and image locking compared with Debian's qemu-storage-daemon."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qsd import qapi
from qsd.block import query
from qsd.block.backend import BlockBackend
from qsd.block.graph import BlockGraph
from qsd.block.locking import LockError
from qsd.block.node import BLOCK_DATA, BLOCK_ZERO
from qsd.block.permissions import (
    PERM_ALL,
    PERM_CONSISTENT_READ,
    PERM_RESIZE,
    PERM_WRITE,
)
from qsd.errors import QMPError
from tests.harness import wait_for_listener

RW = PERM_CONSISTENT_READ | PERM_WRITE
EXPORT_SHARED = PERM_ALL & ~PERM_RESIZE   # what QEMU's non-growable exports share

needs_qemu = pytest.mark.skipif(shutil.which("qemu-storage-daemon") is None,
                                reason="Debian's qemu-storage-daemon is not installed")


def opts(**kwargs: Any) -> Any:
    """A validated BlockdevOptions model from wire-style keyword arguments."""
    wire = {k.replace("_", "-"): v for k, v in kwargs.items()}
    return qapi.parse_command_args("blockdev-add", wire)


def make_image(path: Path, size: int, fill: bytes | None = None) -> Path:
    subprocess.run(["qemu-img", "create", "-q", "-f", "raw", str(path), str(size)], check=True)
    if fill is not None:
        path.write_bytes(fill)
    return path


def qemu_io(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-io", *args], capture_output=True, text=True)


# ---- data ------------------------------------------------------------------------------------


async def test_read_write_checked_by_qemu(graph: BlockGraph, tmp_path: Path) -> None:
    img = make_image(tmp_path / "a.raw", 1 << 20)
    ref = bytearray(1 << 20)
    await graph.blockdev_add(opts(driver="file", node_name="f0", filename=str(img)))
    node = await graph.blockdev_add(opts(driver="raw", node_name="r0", file="f0"))
    blk = BlockBackend(graph, node, perm=RW, shared=EXPORT_SHARED)
    assert blk.length() == 1 << 20
    for i in range(64):
        data = bytes([i + 1]) * 4096
        off = i * 8192 + 100
        if not blk.write_nowait(off, data):
            await blk.write(off, data)
        ref[off:off + 4096] = data
    await blk.write(700_000, memoryview(b"\x55" * 3000))
    ref[700_000:703_000] = b"\x55" * 3000
    await blk.flush()
    assert bytes(await blk.read(0, 1 << 20)) == bytes(ref)
    fast = blk.read_nowait(100, 4096)
    assert fast is None or bytes(fast) == b"\x01" * 4096
    (tmp_path / "ref.raw").write_bytes(ref)
    res = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", str(img),
                          str(tmp_path / "ref.raw")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr
    res = qemu_io("-U", "-r", "-f", "raw", "-c", "read -P 0x55 700000 3000", str(img))
    assert "Pattern verification failed" not in res.stdout, res.stdout


async def test_raw_window(graph: BlockGraph, tmp_path: Path) -> None:
    img = make_image(tmp_path / "w.raw", 64 * 1024, b"\xaa" * 64 * 1024)
    node = await graph.blockdev_add(opts(driver="raw", node_name="r0", offset=8192, size=16384,
                                   file={"driver": "file", "filename": str(img)}))
    blk = BlockBackend(graph, node, perm=RW, shared=EXPORT_SHARED)
    assert blk.length() == 16384
    await blk.write(0, b"\x11" * 16384)
    with pytest.raises(OSError):
        await blk.write(16000, b"\x22" * 1000)
    with pytest.raises(OSError):
        await blk.read(16384, 1)
    assert bytes(await blk.read(4096, 4096)) == b"\x11" * 4096
    for cmd in ("read -P 0xaa 0 8192", "read -P 0x11 8192 16384", "read -P 0xaa 24576 40960"):
        res = qemu_io("-U", "-r", "-f", "raw", "-c", cmd, str(img))
        assert "verification failed" not in res.stdout, (cmd, res.stdout)
    info = query.query_named_block_nodes(graph)[0]
    assert info["file"].startswith("json:{")  # type: ignore[union-attr]
    assert info["image"]["virtual-size"] == 16384  # type: ignore[index]


async def test_odirect_unaligned(graph: BlockGraph, tmp_path: Path) -> None:
    data = os.urandom(256 * 1024)
    img = make_image(tmp_path / "d.raw", len(data), data)
    ref = bytearray(data)
    node = await graph.blockdev_add(opts(driver="file", node_name="f0", filename=str(img),
                                   cache={"direct": True}, aio="native"))
    assert node.bl.request_alignment in (512, 1024, 2048, 4096)
    blk = BlockBackend(graph, node, perm=RW, shared=EXPORT_SHARED)
    assert blk.read_nowait(0, 512) is None    # O_DIRECT always waits for the disk
    writes = [(1, 10), (4095, 3), (5000, 9000), (131071, 2), (200_000, 50_000)]

    async def one(off: int, n: int) -> None:
        payload = os.urandom(n)
        ref[off:off + n] = payload
        await blk.write(off, payload)

    await asyncio.gather(*(one(o, n) for o, n in writes))
    for off, n in [(0, 1 << 18), (3, 7), (4097, 12345)]:
        assert bytes(await blk.read(off, n)) == bytes(ref[off:off + n])
    await blk.write_zeroes(777, 1000)
    ref[777:1777] = bytes(1000)
    (tmp_path / "ref.raw").write_bytes(ref)
    res = subprocess.run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "raw", str(img),
                          str(tmp_path / "ref.raw")], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


async def test_zeroes_discard_status(graph: BlockGraph, tmp_path: Path) -> None:
    img = make_image(tmp_path / "z.raw", 1 << 20, b"\x77" * (1 << 20))
    node = await graph.blockdev_add(opts(driver="file", node_name="f0", filename=str(img),
                                   discard="unmap", detect_zeroes="unmap"))
    blk = BlockBackend(graph, node, perm=RW, shared=EXPORT_SHARED)
    flags, n = await blk.block_status(0, 1 << 20)
    assert flags & BLOCK_DATA and n == 1 << 20
    await blk.write_zeroes(65536, 65536, may_unmap=True)
    await blk.discard(262144, 65536)
    await blk.write(524288, bytes(65536))          # detect-zeroes=unmap punches a hole
    before = blk.allocated_size()
    flags, n = await blk.block_status(65536, 1 << 20)
    assert flags & BLOCK_ZERO and n == 65536
    flags, n = await blk.block_status(524288, 4096)
    assert flags & BLOCK_ZERO
    assert before < 1 << 20
    for cmd in ("read -P 0 65536 65536", "read -P 0 262144 65536", "read -P 0x77 0 65536",
                "read -P 0 524288 65536"):
        res = qemu_io("-U", "-r", "-f", "raw", "-c", cmd, str(img))
        assert "verification failed" not in res.stdout, (cmd, res.stdout)
    await blk.truncate(2 << 20)
    assert blk.length() == 2 << 20


async def test_null(graph: BlockGraph) -> None:
    node = await graph.blockdev_add(opts(driver="null-co", node_name="n0", size=12345,
                                   read_zeroes=True))
    blk = BlockBackend(graph, node, perm=RW, shared=PERM_ALL)
    assert blk.length() == 12800
    assert blk.read_nowait(0, 4096) == bytes(4096)
    assert blk.write_nowait(0, b"x" * 512)
    with pytest.raises(QMPError, match="Image format driver does not support resize"):
        await graph.block_resize(None, "n0", 1 << 20)
    info = query.query_named_block_nodes(graph)[0]
    assert info["file"] == 'json:{"read-zeroes": true, "driver": "null-co", "size": 12345}'
    slow = await graph.blockdev_add(opts(driver="null-aio", node_name="n1", latency_ns=1_000_000))
    blk2 = BlockBackend(graph, slow, perm=RW, shared=PERM_ALL)
    assert blk2.read_nowait(0, 512) is None
    assert await blk2.read(0, 512) == bytes(512)
    # latency-ns changes no data, so it is no strong option (11.1.3 answers the same).
    assert query.query_named_block_nodes(graph)[0]["file"] == "null-aio://"
    assert query.block_device_info(graph.nodes["n0"])["image"] == {
        "filename": info["file"], "format": "null-co", "actual-size": 0,
        "virtual-size": 12800,
        "limits": {"request-alignment": 1, "max-iov": 1024, "min-mem-alignment": 512,
                   "opt-mem-alignment": 4096}}


# ---- errors and permissions ----------------------------------------------------------------


async def test_permission_conflict_texts(graph: BlockGraph, tmp_path: Path) -> None:
    img = make_image(tmp_path / "p.raw", 1 << 20)
    await graph.blockdev_add(opts(driver="file", node_name="f0", filename=str(img)))
    node = await graph.blockdev_add(opts(driver="raw", node_name="r0", file="f0"))
    BlockBackend(graph, node, perm=RW, shared=EXPORT_SHARED)
    with pytest.raises(QMPError) as err:
        await graph.block_resize(None, "r0", 2 << 20)
    assert err.value.desc == (
        "Permission conflict on node 'r0': permissions 'resize' are both required by an "
        "unnamed block device (uses node 'r0' as 'root' child) and unshared by an unnamed "
        "block device (uses node 'r0' as 'root' child).")
    with pytest.raises(QMPError) as err:
        BlockBackend(graph, graph.nodes["f0"], perm=PERM_CONSISTENT_READ, shared=PERM_RESIZE)
    assert err.value.desc == (
        "Permission conflict on node 'f0': permissions 'consistent read, write' are both "
        "required by node "
        "'r0' (uses node 'f0' as 'file' child) and unshared by an unnamed block device "
        "(uses node 'f0' as 'root' child).")
    ro = await graph.blockdev_add(opts(driver="null-co", node_name="n0", read_only=True))
    with pytest.raises(QMPError, match="^Block node is read-only$"):
        BlockBackend(graph, ro, perm=RW, shared=PERM_ALL)
    graph_info = query.x_debug_query_block_graph(graph)
    assert graph_info["edges"][0] == {  # type: ignore[index]
        "parent": 2, "child": 3, "name": "file", "perm": ["write", "consistent-read"],
        "shared-perm": ["write-unchanged", "write", "consistent-read"]}


class DebianQsd:
    """Debian's qemu-storage-daemon with a QMP socket: the behaviour oracle."""

    def __init__(self, tmp: Path) -> None:
        self.path = tmp / f"qmp-{time.monotonic_ns()}.sock"
        self.proc = subprocess.Popen(
            ["qemu-storage-daemon", "--chardev",
             f"socket,id=m,path={self.path},server=on,wait=off", "--monitor", "chardev=m"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Listening, not only bound: a connect between bind and listen is refused.
        wait_for_listener(self.path, self.proc, timeout=30)
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(self.path))
        self.file = self.sock.makefile("rw")
        self.file.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: Any) -> dict[str, Any]:
        self.file.write(json.dumps({"execute": name, "arguments": args}) + "\n")
        self.file.flush()
        while True:
            reply: dict[str, Any] = json.loads(self.file.readline())
            if "event" not in reply:
                return reply

    def close(self) -> None:
        self.sock.close()
        self.proc.terminate()
        self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def debian(tmp_path: Path) -> Iterator[DebianQsd]:
    d = DebianQsd(tmp_path)
    yield d
    d.close()


async def _qsd_cmd(graph: BlockGraph, name: str, args: dict[str, Any]) -> dict[str, Any]:
    try:
        if name == "blockdev-add":
            await graph.blockdev_add(qapi.parse_command_args(name, args))
        elif name == "blockdev-del":
            await graph.blockdev_del(args["node-name"])
        else:
            await graph.block_resize(args.get("device"), args.get("node-name"), args["size"])
    except QMPError as exc:
        return {"error": exc.desc}
    return {"return": {}}


@needs_qemu
async def test_error_texts_match_qemu(graph: BlockGraph, tmp_path: Path,
                                      debian: DebianQsd) -> None:
    img = str(make_image(tmp_path / "e.raw", 1 << 20))
    seq: list[tuple[str, dict[str, Any]]] = [
        ("blockdev-add", {"driver": "file", "filename": img, "node-name": "f0"}),
        ("blockdev-add", {"driver": "file", "filename": img, "node-name": "f0"}),
        ("blockdev-add", {"driver": "file", "filename": img}),
        ("blockdev-add", {"driver": "file", "filename": img + ".nope", "node-name": "f1"}),
        ("blockdev-add", {"driver": "file", "filename": str(tmp_path), "node-name": "f2"}),
        ("blockdev-add", {"driver": "raw", "file": "nosuch", "node-name": "r1"}),
        ("blockdev-add", {"driver": "raw", "file": "f0", "node-name": "bad name"}),
        ("blockdev-add", {"driver": "null-co", "node-name": "#block5"}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n0", "force-share": True}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n0", "detect-zeroes": "unmap"}),
        ("blockdev-add", {"driver": "file", "filename": img, "node-name": "f3",
                          "aio": "native"}),
        ("blockdev-add", {"driver": "raw", "file": "f0", "node-name": "r9", "offset": 2 << 20}),
        ("blockdev-add", {"driver": "raw", "file": "f0", "node-name": "r9", "offset": 512,
                          "size": 1 << 20}),
        ("blockdev-add", {"driver": "raw", "file": "f0", "node-name": "r9", "size": 1000}),
        ("blockdev-add", {"driver": "raw", "file": "f0", "node-name": "r0"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r2", "offset": 512, "size": 4096,
                          "file": {"driver": "file", "filename": img, "node-name": "f9"}}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n1", "read-only": True,
                          "force-share": True}),
        ("block_resize", {"node-name": "r2", "size": 1 << 20}),
        ("block_resize", {"node-name": "n1", "size": 1 << 20}),
        ("block_resize", {"node-name": "nosuch", "size": 1 << 20}),
        ("block_resize", {"device": "dev", "size": 1 << 20}),
        ("block_resize", {"node-name": "r0", "size": -1}),
        ("blockdev-del", {"node-name": "f0"}),
        ("blockdev-del", {"node-name": "f9"}),
        ("blockdev-del", {"node-name": "nosuch"}),
        ("blockdev-del", {"node-name": "r2"}),
        ("blockdev-del", {"node-name": "f9"}),
        ("blockdev-del", {"node-name": "r0"}),
        ("blockdev-del", {"node-name": "f0"}),
    ]
    for name, args in seq:
        theirs = debian.cmd(name, **args)
        expected = ({"error": theirs["error"]["desc"]} if "error" in theirs
                    else {"return": {}})
        assert await _qsd_cmd(graph, name, args) == expected, (name, args)


# ---- image locking -------------------------------------------------------------------------

PROBES = {
    "io-write": ["qemu-io", "-f", "raw", "-c", "write 0 512"],
    "io-read": ["qemu-io", "-f", "raw", "-r", "-c", "read 0 512"],
    "io-truncate": ["qemu-io", "-f", "raw", "-c", "truncate 1M"],
    "img-resize": ["qemu-img", "resize", "-q", "-f", "raw"],
    "img-info": ["qemu-img", "info"],
}


def probe(img: str) -> dict[str, tuple[int, str]]:
    result = {}
    for name, cmd in PROBES.items():
        args = cmd + [img] + (["1M"] if name == "img-resize" else [])
        res = subprocess.run(args, capture_output=True, text=True)
        lock = [line for line in res.stderr.splitlines() if "lock" in line]
        result[name] = (res.returncode, lock[0].split(": ")[-1] if lock else "")
    return result


SCENARIOS: dict[str, tuple[list[dict[str, Any]], dict[str, Any] | None]] = {
    "alone": ([{"driver": "file", "node-name": "f0"}], None),
    "raw-alone": ([{"driver": "file", "node-name": "f0"},
                   {"driver": "raw", "node-name": "r0", "file": "f0"}], None),
    "writable-backend": ([{"driver": "file", "node-name": "f0"},
                          {"driver": "raw", "node-name": "r0", "file": "f0"}],
                         {"node-name": "r0", "writable": True}),
    "readonly-backend": ([{"driver": "file", "node-name": "f0", "read-only": True}],
                         {"node-name": "f0", "writable": False}),
    "force-share": ([{"driver": "file", "node-name": "f0", "read-only": True,
                      "force-share": True},
                     {"driver": "raw", "node-name": "r0", "file": "f0", "read-only": True}],
                    {"node-name": "r0", "writable": False}),
    "raw-window": ([{"driver": "file", "node-name": "f0"},
                    {"driver": "raw", "node-name": "r0", "file": "f0", "offset": 4096}],
                   {"node-name": "r0", "writable": True}),
    "locking-off": ([{"driver": "file", "node-name": "f0", "locking": "off"}],
                    {"node-name": "f0", "writable": True}),
}


@needs_qemu
@pytest.mark.parametrize("scenario", list(SCENARIOS))
async def test_locking_like_qemu(graph: BlockGraph, tmp_path: Path, scenario: str) -> None:
    img = str(make_image(tmp_path / "l.raw", 1 << 20))
    nodes, export = SCENARIOS[scenario]
    debian = DebianQsd(tmp_path)
    try:
        for spec in nodes:
            spec = dict(spec, filename=img) if spec["driver"] == "file" else spec
            assert "error" not in debian.cmd("blockdev-add", **spec)
        if export is not None:
            debian.cmd("nbd-server-start", addr={"type": "unix",
                                                 "data": {"path": str(tmp_path / "n.sock")}})
            assert "error" not in debian.cmd("block-export-add", type="nbd", id="e0", **export)
        theirs = probe(img)
    finally:
        debian.close()
    for spec in nodes:
        spec = dict(spec, filename=img) if spec["driver"] == "file" else spec
        await graph.blockdev_add(qapi.parse_command_args("blockdev-add", spec))
    if export is not None:
        perm = RW if export["writable"] else PERM_CONSISTENT_READ
        BlockBackend(graph, graph.nodes[export["node-name"]], perm=perm, shared=EXPORT_SHARED)
    ours = await asyncio.get_running_loop().run_in_executor(None, probe, img)
    assert ours == theirs


@needs_qemu
async def test_refuses_image_locked_elsewhere(graph: BlockGraph, tmp_path: Path,
                                              debian: DebianQsd) -> None:
    img = str(make_image(tmp_path / "x.raw", 1 << 20))
    debian.cmd("blockdev-add", driver="file", filename=img, **{"node-name": "f0"})
    debian.cmd("nbd-server-start", addr={"type": "unix",
                                         "data": {"path": str(tmp_path / "n.sock")}})
    assert "error" not in debian.cmd("block-export-add", type="nbd", id="e0",
                                     **{"node-name": "f0", "writable": True})
    node = await graph.blockdev_add(opts(driver="file", node_name="f0", filename=img))
    with pytest.raises(LockError) as err:
        await graph.block_resize(None, "f0", 2 << 20)
    assert err.value.desc == 'Failed to get "resize" lock'
    assert err.value.hint == f"Is another process using the image [{img}]?"
    # A user QEMU conflicts with is refused; the node stays usable without it.
    with pytest.raises(LockError, match='Failed to get shared "write" lock'):
        BlockBackend(graph, node, perm=PERM_CONSISTENT_READ, shared=PERM_CONSISTENT_READ)
    BlockBackend(graph, node, perm=RW, shared=EXPORT_SHARED)


# ---- graph, iothreads, drain -----------------------------------------------------------------


async def test_generated_names_and_ownership(graph: BlockGraph, tmp_path: Path) -> None:
    img = str(make_image(tmp_path / "g.raw", 1 << 20))
    await graph.blockdev_add(opts(driver="raw", node_name="r0",
                            file={"driver": "file", "filename": img}))
    names = list(graph.nodes)
    assert names[0].startswith("#block") and names[1] == "r0"
    with pytest.raises(QMPError, match=f"^Node {names[0]} is not owned by the monitor$"):
        await graph.blockdev_del(names[0])
    await graph.blockdev_del("r0")
    assert graph.nodes == {}
    assert query.query_named_block_nodes(graph) == []
