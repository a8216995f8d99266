"""blockdev-snapshot through a real daemon: an overlay put on top of a node that an NBD
export writes to, data read through the chain, the old node read-only afterwards, and
QEMU 11.1.3's errors."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QsdFactory
from tests.harness import Monitor

MiB = 1 << 20


def qemu_io(target: str, command: str, *opts: str) -> str:
    result = subprocess.run(["qemu-io", *opts, "-c", command, target], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "error" not in result.stdout.lower(), (
        result.stdout + result.stderr)
    return result.stdout


def qcow2(path: Path, *opts: str) -> None:
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *opts, str(path), "4M"],
                   check=True)


def add_qcow2(qmp: Monitor, name: str, path: Path, **extra: Any) -> None:
    qmp.ok("blockdev-add", driver="qcow2", **{"node-name": name}, **extra,
           file={"driver": "file", "filename": str(path), "node-name": f"{name}-file"})


@pytest.fixture
def chain(start_qsd: QsdFactory, tmp_path: Path) -> tuple[Monitor, Path]:
    """A daemon with node 'base' (a qcow2 image with 0xaa in its first MiB) exported
    writable over NBD as 'e0', and 'ov' (an empty overlay naming base in its header,
    opened without a backing node).  Returns the monitor and the NBD socket."""
    base, overlay = tmp_path / "base.qcow2", tmp_path / "overlay.qcow2"
    qcow2(base)
    qemu_io(str(base), f"write -P 0xaa 0 {MiB}")
    qcow2(overlay, "-F", "qcow2", "-b", str(base))
    qmp = Monitor(start_qsd())
    add_qcow2(qmp, "base", base)
    sock = tmp_path / "nbd.sock"
    qmp.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.ok("block-export-add", type="nbd", id="e0", name="e0", writable=True,
           **{"node-name": "base"})
    add_qcow2(qmp, "ov", overlay, backing=None)
    return qmp, sock


def nodes(qmp: Monitor) -> dict[str, dict[str, Any]]:
    return {n["node-name"]: n for n in qmp.ok("query-named-block-nodes")}


def test_snapshot_moves_the_export_to_the_overlay(chain: tuple[Monitor, Path],
                                                  tmp_path: Path) -> None:
    qmp, sock = chain
    nbd = f"nbd+unix:///e0?socket={sock}"
    qemu_io(nbd, f"write -P 0xbb {MiB} {MiB}", "-f", "raw")
    assert qmp.ok("blockdev-snapshot", node="base", overlay="ov") == {}
    assert [e["node-name"] for e in qmp.ok("query-block-exports")] == ["ov"]
    qemu_io(nbd, f"write -P 0xcc {2 * MiB} {MiB}", "-f", "raw")
    # Reads fall through to base where the overlay has nothing; new data stays on top.
    qemu_io(nbd, f"read -P 0xaa 0 {MiB}", "-f", "raw")
    qemu_io(nbd, f"read -P 0xbb {MiB} {MiB}", "-f", "raw")
    qemu_io(nbd, f"read -P 0xcc {2 * MiB} {MiB}", "-f", "raw")
    qemu_io(str(tmp_path / "base.qcow2"), f"read -P 0 {2 * MiB} {MiB}", "-U", "-r")
    info = nodes(qmp)
    assert info["ov"]["backing_file"] == str(tmp_path / "base.qcow2")
    assert info["ov"]["backing_file_depth"] == 1
    assert info["ov"]["children"] == [{"child": "backing", "node-name": "base"},
                                      {"child": "file", "node-name": "ov-file"}]
    assert info["base"]["ro"] is True and info["base-file"]["ro"] is True
    assert info["ov"]["ro"] is False
    busy = "Node 'base' is busy: node is used as backing hd of 'ov'"
    assert qmp.err("blockdev-del", **{"node-name": "base"}) == busy
    assert qmp.err("block_resize", size=MiB, **{"node-name": "base"}) == busy
    assert qmp.err("blockdev-snapshot", node="base", overlay="ov") == busy
    qmp.ok("block-export-del", id="e0")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    qmp.ok("blockdev-del", **{"node-name": "ov"})
    qmp.ok("blockdev-del", **{"node-name": "base"})
    subprocess.run(["qemu-img", "check", "-q", str(tmp_path / "overlay.qcow2")], check=True)
    subprocess.run(["qemu-img", "check", "-q", str(tmp_path / "base.qcow2")], check=True)


def test_snapshot_errors(chain: tuple[Monitor, Path], tmp_path: Path) -> None:
    qmp, _ = chain
    other = tmp_path / "other.qcow2"
    qcow2(other)
    add_qcow2(qmp, "other", other)
    qmp.ok("blockdev-add", driver="null-co", **{"node-name": "null"})
    chained, below = tmp_path / "chained.qcow2", tmp_path / "below.qcow2"
    qcow2(below)
    qcow2(chained, "-F", "qcow2", "-b", str(below))
    add_qcow2(qmp, "chained", chained)
    cases = [
        ("nope", "ov", "Cannot find device='nope' nor node-name='nope'"),
        ("base", "nope", "Cannot find device='nope' nor node-name='nope'"),
        ("base", "base", "The overlay is already in use"),
        ("base", "base-file", "The overlay is already in use"),
        ("base", "null", "The overlay does not support backing images"),
        ("ov", "base", "The overlay is already in use"),
        ("null", "chained", "The overlay already has a backing image"),
        ("other", "other", "Making 'other' a backing child of 'other' would create a cycle"),
    ]
    for node, overlay, error in cases:
        assert qmp.err("blockdev-snapshot", node=node, overlay=overlay) == error
    qmp.ok("blockdev-del", **{"node-name": "chained"})
    assert qmp.ok("blockdev-snapshot", node="base", overlay="ov") == {}
    assert qmp.err("blockdev-snapshot", node="base", overlay="other") == (
        "Node 'base' is busy: node is used as backing hd of 'ov'")
    assert qmp.err("blockdev-snapshot", node="other", overlay="ov") == (
        "The overlay is already in use")
    assert qmp.ok("blockdev-snapshot", node="ov", overlay="other") == {}
    assert nodes(qmp)["other"]["backing_file_depth"] == 2
