"""Writes, zero-writes, discards and resizes through qsd leave consistent qcow2 images.

For each image kind: fio with --verify=crc32c over the FUSE export (concurrent random
writes of mixed sizes, read back and checked by fio), then a random sequence of
writes, zero-writes (with and without unmap) and discards over NBD, a grow and a shrink
with block_resize; a raw image receives the same changes.  After qsd exits,
``qemu-img check`` must find no errors and no leaks, and ``qemu-img compare`` must find
the qcow2 image identical to the raw one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Monitor, Qsd, fuse_mounts, wait_for_listener, wait_for_mount
from tests.qcow2_images import RECIPES, Recipe, build, run

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="FUSE exports need root and /dev/fuse")

# A representative set in every run; all of them with QSD_STRESS=1 (make stress).
QUICK = {"v3-64k", "v2-64k", "v3-512", "refcount-1", "extl2-16k", "backing-qcow2",
         "backing-extl2", "data-file", "snapshot", "zstd"}
WRITE_RECIPES = [r for r in RECIPES if r.name in QUICK or os.environ.get("QSD_STRESS") and (
    r.name in {"v3-2m", "refcount-64", "refcount-1-512", "extl2-64k", "lazy-refcounts",
               "zlib-v2-4k", "backing-v2", "backing-chain", "data-file-raw",
               "prealloc-metadata", "prealloc-extl2-backing", "converted-zlib"})]


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qsd-qcow2w-"))
    yield path
    for mount in fuse_mounts():
        if mount.startswith(f"{path}/"):
            subprocess.run(["umount", "-l", mount], check=False)
    shutil.rmtree(path, ignore_errors=True)


def qmp(daemon: Qsd, command: str, **args: object) -> dict[str, object]:
    """The command's reply; events before it (BLOCK_EXPORT_DELETED) are passed over."""
    mon = Monitor(daemon)
    try:
        return mon.cmd(command, **args)
    finally:
        mon.raw.close()


def resize(daemon: Qsd, export: str, size: int) -> None:
    """block_resize between taking the NBD export away and adding it again."""
    assert qmp(daemon, "block-export-del", id=export) == {"return": {}}
    deadline = time.monotonic() + 20
    while qmp(daemon, "query-block-exports")["return"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert qmp(daemon, "block_resize", **{"node-name": "disk", "size": size}) == {
        "return": {}}
    assert qmp(daemon, "block-export-add", type="nbd", id=export, **{"node-name": "disk"},
               writable=True) == {"return": {}}


def random_ops(rng: random.Random, size: int, cluster: int, discards: bool) -> list[str]:
    """qemu-io commands: pattern writes of any alignment, zero-writes with and without
    unmap, and cluster-aligned discards (unaligned ones are hints qcow2 may ignore)."""
    ops = []
    for _ in range(60):
        kind = rng.choice(["write", "write", "write", "zero", "zero-unmap", "discard"])
        offset = rng.randrange(0, size - 1)
        length = min(rng.choice([512, 4096, 5000, cluster, 3 * cluster + 700]), size - offset)
        if kind == "write":
            ops.append(f"write -P {rng.randrange(1, 255)} {offset} {length}")
        elif kind == "zero":
            ops.append(f"write -z {offset} {length}")
        elif kind == "zero-unmap":
            ops.append(f"write -z -u {offset} {length}")
        elif discards:
            start = offset - offset % cluster
            count = max(1, length // cluster) * cluster
            if start + count <= size:
                ops.append(f"discard {start} {count}")
    return ops


def qemu_io_ops(target: str, fmt: str, ops: list[str], cwd: Path) -> None:
    args = ["qemu-io", "-f", fmt]
    for op in ops:
        args += ["-c", op]
    out = subprocess.run([*args, target], capture_output=True, text=True, timeout=300,
                         cwd=cwd)
    assert out.returncode == 0 and "failed" not in out.stdout + out.stderr, (
        out.stdout + out.stderr)


@pytest.mark.parametrize("recipe", WRITE_RECIPES, ids=[r.name for r in WRITE_RECIPES])
def test_writes_keep_image_consistent(recipe: Recipe, workdir: Path) -> None:
    image = build(recipe, workdir)
    mirror = workdir / "mirror.raw"
    run("qemu-img", "convert", "-O", "raw", str(image), str(mirror), cwd=workdir)
    size = recipe.size
    mountpoint = workdir / "mnt"
    mountpoint.touch()
    sock = workdir / "nbd.sock"
    daemon = Qsd(workdir, [
        "--blockdev", f"driver=qcow2,node-name=disk,discard=unmap,file.driver=file,"
                      f"file.filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", f"type=fuse,id=fuse0,node-name=disk,mountpoint={mountpoint},writable=on"])
    try:
        wait_for_listener(sock, daemon.proc)
        wait_for_mount(mountpoint, daemon)
        fio = subprocess.run(
            ["fio", "--name=t", f"--filename={mountpoint}", "--direct=1", "--ioengine=libaio",
             "--iodepth=16", "--rw=randwrite", "--bsrange=512-128k", "--blockalign=512",
             f"--size={size}", f"--io_size={min(size, 8 << 20)}", "--verify=crc32c",
             "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
             "--randseed=1234", "--output-format=terse"],
            capture_output=True, text=True, timeout=300)
        assert fio.returncode == 0, fio.stdout + fio.stderr
        mirror.write_bytes(mountpoint.read_bytes())
        # Two writable exports of one node would conflict: NBD takes over from FUSE.
        assert qmp(daemon, "block-export-del", id="fuse0") == {"return": {}}
        while str(mountpoint) in fuse_mounts():
            time.sleep(0.01)
        assert qmp(daemon, "block-export-add", type="nbd", id="nbd0",
                   **{"node-name": "disk"}, writable=True) == {"return": {}}
        rng = random.Random(recipe.name)
        discards = not (recipe.compat == "0.10" and recipe.backing)
        ops = random_ops(rng, size, recipe.cluster_size, discards)
        uri = f"nbd+unix:///disk?socket={sock}"
        qemu_io_ops(uri, "raw", ops, workdir)
        qemu_io_ops(str(mirror), "raw", ops, workdir)
        # Resizes with no export attached (exports do not share the resize permission).
        grown = size + 3 * recipe.cluster_size + 512
        resize(daemon, "nbd0", grown)
        os.truncate(mirror, grown)
        tail = [f"write -P 0x5e {size - 700} 2000", f"write -z {grown - 1024} 512"]
        qemu_io_ops(uri, "raw", tail, workdir)
        qemu_io_ops(str(mirror), "raw", tail, workdir)
        shrunk = size // 2 + 512
        resize(daemon, "nbd0", shrunk)
        os.truncate(mirror, shrunk)
        nbd_raw = workdir / "nbd.raw"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(nbd_raw))
        assert nbd_raw.read_bytes() == mirror.read_bytes()
    finally:
        assert daemon.stop() == 0, daemon.stderr.decode()
    check = subprocess.run(["qemu-img", "check", "--output=json", str(image)],
                           capture_output=True, text=True, timeout=120, cwd=workdir)
    result = json.loads(check.stdout)
    assert check.returncode == 0, check.stdout + check.stderr
    assert result.get("corruptions", 0) == 0 and result.get("leaks", 0) == 0, result
    compare = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(image),
                              str(mirror)], capture_output=True, text=True, timeout=120,
                             cwd=workdir)
    assert compare.returncode == 0, compare.stdout + compare.stderr
