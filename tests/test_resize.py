"""block_resize through a real daemon: qcow2 and raw images grown and shrunk under a
FUSE export that then shows the new size, with the data kept and the image consistent;
QEMU 11.1.3's errors (an NBD export does not share resizing)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import QsdFactory
from tests.harness import Monitor, wait_for_mount

MiB = 1 << 20


def seen_size(path: Path, size: int) -> int:
    """The size stat() reports, once the kernel's attribute cache (1 s, as QEMU's FUSE
    export asks) let the new one through."""
    deadline = time.monotonic() + 10
    while os.stat(path).st_size != size and time.monotonic() < deadline:
        time.sleep(0.1)
    return os.stat(path).st_size


@pytest.mark.parametrize("fmt", ["qcow2", "raw"])
def test_resize_under_a_fuse_export(start_qsd: QsdFactory, fuse_dir: Path, fmt: str) -> None:
    image, mnt = fuse_dir / f"disk.{fmt}", fuse_dir / "mnt"
    subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(image), "4M"], check=True)
    mnt.touch()
    daemon = start_qsd("--blockdev", f"file,node-name=f0,filename={image}",
                       "--blockdev", f"{fmt},node-name=d0,file=f0",
                       "--export", f"fuse,id=e0,node-name=d0,mountpoint={mnt},writable=on")
    qmp = Monitor(daemon)
    wait_for_mount(mnt, daemon)
    with open(mnt, "r+b") as disk:
        disk.seek(3 * MiB)
        disk.write(b"\xaa" * MiB)
    for size in (16 * MiB, 2 * MiB, 5 * MiB):
        assert qmp.ok("block_resize", size=size, **{"node-name": "d0"}) == {}
        assert seen_size(mnt, size) == size
    with open(mnt, "rb") as disk:
        assert disk.read(2 * MiB) == bytes(2 * MiB)
        assert disk.read() == bytes(3 * MiB)    # what was cut off does not come back
    qmp.ok("block-export-del", id="e0")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    qmp.ok("blockdev-del", **{"node-name": "d0"})
    qmp.ok("blockdev-del", **{"node-name": "f0"})
    if fmt == "qcow2":
        subprocess.run(["qemu-img", "check", "-q", str(image)], check=True)
    info = subprocess.run(["qemu-img", "info", str(image)], capture_output=True, text=True,
                          check=True).stdout
    assert "virtual size: 5 MiB (5242880 bytes)" in info


def test_resize_errors(start_qsd: QsdFactory, tmp_path: Path) -> None:
    raw, sock = tmp_path / "r.img", tmp_path / "nbd.sock"
    raw.write_bytes(bytes(4 * MiB))
    qcow2 = tmp_path / "q.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "4M"], check=True)
    qmp = Monitor(start_qsd(
        "--blockdev", f"file,node-name=qf,filename={qcow2}",
        "--blockdev", "qcow2,node-name=q0,file=qf",
        "--blockdev", f"file,node-name=f0,filename={raw}",
        "--blockdev", "raw,node-name=r0,file=f0",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "nbd,id=e0,node-name=r0,writable=on"))
    unnamed = "an unnamed block device (uses node 'r0' as 'root' child)"
    cases = [
        ({"node-name": "r0", "size": 8 * MiB}, "Permission conflict on node 'r0': "
         f"permissions 'resize' are both required by {unnamed} and unshared by {unnamed}."),
        ({"node-name": "f0", "size": 2 * MiB}, "Permission conflict on node 'f0': "
         "permissions 'resize' are both required by an unnamed block device (uses node "
         "'f0' as 'root' child) and unshared by node 'r0' (uses node 'f0' as 'file' "
         "child)."),
        ({"node-name": "q0", "size": 1000}, "The new size must be a multiple of 512"),
        ({"node-name": "q0", "size": (1 << 63) - 1},
         "offset(9223372036854775807) exceeds maximum(9223372035781033984)"),
        ({"node-name": "q0", "size": -1}, "Parameter 'size' expects a >0 size"),
        ({"node-name": "nope", "size": 512}, "Cannot find device='' nor node-name='nope'"),
        ({"device": "e0", "size": 512}, "Cannot find device='e0' nor node-name=''"),
    ]
    for args, error in cases:
        assert qmp.err("block_resize", **args) == error
    assert qmp.ok("block_resize", device="x", size=8 * MiB, **{"node-name": "q0"}) == {}
