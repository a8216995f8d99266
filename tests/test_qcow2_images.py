"""qcow2 images of every option combination read back through qsd's exports.

Each image is made by qemu-img/qemu-io (tests/qcow2_images.py); qsd opens it with the
qcow2 driver (backing files and data files from the header) and exports it over NBD and
FUSE at once; both must read byte for byte what ``qemu-img convert -O raw`` makes of the
image, and ``qemu-img map`` through the NBD export must agree with ``qemu-img map`` on
the image about what is data and what is zero.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Qsd, fuse_mounts, wait_for_listener
from tests.qcow2_images import RECIPES, Recipe, build, reference

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="FUSE exports need root and /dev/fuse")


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qsd-qcow2-"))
    yield path
    for mount in fuse_mounts():
        if mount.startswith(f"{path}/"):
            subprocess.run(["umount", "-l", mount], check=False)
    shutil.rmtree(path, ignore_errors=True)


def wait_for_mount(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while str(path) not in fuse_mounts():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        assert time.monotonic() < deadline, f"{path} was not mounted"
        time.sleep(0.01)


def _map(target: str, cwd: Path, *fmt: str) -> list[tuple[int, int, bool, bool]]:
    """(start, length, data, zero) runs of ``qemu-img map``, adjacent equal runs merged."""
    out = subprocess.run(["qemu-img", "map", "-U", "--output=json", *fmt, target],
                         check=True, capture_output=True, text=True, timeout=60,
                         cwd=cwd).stdout
    runs: list[tuple[int, int, bool, bool]] = []
    for ext in json.loads(out):
        start, length = ext["start"], ext["length"]
        data, zero = ext["data"], ext["zero"]
        if runs and runs[-1][2:] == (data, zero) and runs[-1][0] + runs[-1][1] == start:
            runs[-1] = (runs[-1][0], runs[-1][1] + length, data, zero)
        else:
            runs.append((start, length, data, zero))
    return runs


@pytest.mark.parametrize("recipe", RECIPES, ids=[r.name for r in RECIPES])
def test_image_reads_back(recipe: Recipe, workdir: Path) -> None:
    image = build(recipe, workdir)
    expected = reference(image, workdir / "expected.raw")
    mountpoint = workdir / "mnt"
    mountpoint.touch()
    sock = workdir / "nbd.sock"
    # In the images' directory: relative data file names are opened from there.
    daemon = Qsd(workdir, [
        "--blockdev", f"driver=qcow2,node-name=disk,read-only=on,file.driver=file,"
                      f"file.filename={image}",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "type=nbd,id=nbd0,node-name=disk",
        "--export", f"type=fuse,id=fuse0,node-name=disk,mountpoint={mountpoint}"],
        monitor=False)
    try:
        _check_exports(daemon, image, mountpoint, sock, expected, workdir)
    finally:
        assert daemon.stop() == 0


def _check_exports(daemon: Qsd, image: Path, mountpoint: Path, sock: Path, expected: bytes,
                   workdir: Path) -> None:
    wait_for_listener(sock, daemon.proc)
    wait_for_mount(mountpoint, daemon.proc)
    uri = f"nbd+unix:///disk?socket={sock}"
    nbd_raw = workdir / "nbd.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(nbd_raw)],
                   check=True, timeout=120)
    assert nbd_raw.read_bytes() == expected
    assert mountpoint.read_bytes() == expected
    assert _map(uri, workdir, "-f", "raw") == _map(str(image), workdir, "-f", "qcow2")
