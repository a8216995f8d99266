"""qcow2 images of every option combination read back through qsd's exports.

Each image is made by qemu-img/qemu-io (tests/qcow2_images.py); one qsd opens them all
with the qcow2 driver (backing files and data files from the headers) and exports each
over NBD and FUSE at once; both must read byte for byte what ``qemu-img convert -O raw``
makes of the image, and ``qemu-img map`` through the NBD export must agree with
``qemu-img map`` on the image about what is data and what is zero.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Monitor, Qsd, fuse_mounts
from tests.qcow2_images import RECIPES, Recipe, build, reference

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
    reason="FUSE exports need root and /dev/fuse")


class Served:
    """One qsd serving every image; per image its expected bytes or the open error."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.sock = root / "nbd.sock"
        self.expected: dict[str, bytes] = {}
        self.errors: dict[str, str] = {}
        self.daemon: Qsd | None = None

    def serve(self) -> None:
        # In the images' directory: relative data file names are opened from there.
        self.daemon = Qsd(self.root, ["--nbd-server",
                                      f"addr.type=unix,addr.path={self.sock}"])
        mon = Monitor(self.daemon)
        for recipe in RECIPES:
            directory = self.root / recipe.name
            image = directory / f"{recipe.name}.qcow2"
            mountpoint = directory / "mnt"
            mountpoint.touch()
            reply = mon.cmd("blockdev-add", driver="qcow2", **{"node-name": recipe.name},
                            **{"read-only": True},
                            file={"driver": "file", "filename": str(image)})
            if "error" in reply:
                self.errors[recipe.name] = reply["error"]["desc"]
                continue
            mon.ok("block-export-add", type="nbd", id=f"n-{recipe.name}",
                   **{"node-name": recipe.name})
            mon.ok("block-export-add", type="fuse", id=f"f-{recipe.name}",
                   **{"node-name": recipe.name}, mountpoint=str(mountpoint))
        mon.raw.close()


@pytest.fixture(scope="module")
def served() -> Iterator[Served]:
    root = Path(tempfile.mkdtemp(prefix="qsd-qcow2-"))
    state = Served(root)
    try:
        for recipe in RECIPES:
            directory = root / recipe.name
            directory.mkdir()
            image = build(recipe, directory, root)
            state.expected[recipe.name] = reference(image, directory / "expected.raw", root)
        state.serve()
        yield state
    finally:
        if state.daemon is not None:
            assert state.daemon.stop() == 0, state.daemon.stderr.decode()
        for mount in fuse_mounts():
            if mount.startswith(f"{root}/"):
                subprocess.run(["umount", "-l", mount], check=False)
        shutil.rmtree(root, ignore_errors=True)


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
def test_image_reads_back(recipe: Recipe, served: Served) -> None:
    assert recipe.name not in served.errors, served.errors[recipe.name]
    directory = served.root / recipe.name
    expected = served.expected[recipe.name]
    uri = f"nbd+unix:///{recipe.name}?socket={served.sock}"
    nbd_raw = directory / "nbd.raw"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(nbd_raw)],
                   check=True, timeout=120)
    assert nbd_raw.read_bytes() == expected
    assert (directory / "mnt").read_bytes() == expected
    image = directory / f"{recipe.name}.qcow2"
    assert _map(uri, served.root, "-f", "raw") == _map(str(image), served.root, "-f", "qcow2")
