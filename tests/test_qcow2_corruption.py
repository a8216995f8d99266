"""Damaged qcow2 images get QEMU 11.1.3's errors, events and resulting bytes.

Each scenario patches bytes of an image made by qemu-img (the corrupt bit, an unknown
incompatible feature, a truncated file, an L1 entry past the end, refcounts that call
metadata free), then a daemon opens it and qemu-io writes through an NBD export.  What
the daemon answers (blockdev-add, every request, the BLOCK_IMAGE_CORRUPTED event, what
query-named-block-nodes then says) and the md5 of the image file afterwards must match
what QEMU 11.1.3's daemon did with the same image, recorded in
``tests/test_qcow2_corruption.json``.  A refused image is not written at all; an image marked
corrupt gets only its header rewritten with the corrupt bit, as QEMU does.

    python -m tests.test_qcow2_corruption --record   # re-record with 11.1.3 (sid chroot)

(``scripts/sid-chroot`` builds the chroot; ``QSD_SID_RUN`` names another runner.)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import QSD

GOLDEN = Path(__file__).with_suffix(".json")
# QSD_SID_RUN: another command that runs its arguments in a chroot with QEMU 11.1.
SID_RUN = (os.environ["QSD_SID_RUN"].split() if os.environ.get("QSD_SID_RUN") else
           [str(Path(__file__).resolve().parent.parent / "scripts" / "sid-chroot"), "run"])


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _image(path: Path) -> None:
    """16 MiB, 64 KiB clusters: header 0, refcount table 0x10000, refcount block 0x20000,
    L1 table 0x30000, L2 table 0x40000, the first two data clusters after it."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), "16M"], check=True)
    subprocess.run(["qemu-io", "-c", "write -P 0x11 0 128k", str(path)], check=True,
                   stdout=subprocess.DEVNULL)


def corrupt_bit(p: Path) -> None:
    _patch(p, 72, (2).to_bytes(8, "big"))


def unknown_feature(p: Path) -> None:
    _patch(p, 72, (0x30).to_bytes(8, "big"))


def named_unknown_feature(p: Path) -> None:
    """Bit 40 set, and named in the feature name table (which 64 KiB images carry)."""
    _patch(p, 72, (1 << 40).to_bytes(8, "big"))
    _patch(p, 112 + 8 + 48 * 7, bytes([0, 40]) + b"future feature".ljust(46, b"\0"))


def truncated_in_refcounts(p: Path) -> None:
    os.truncate(p, 70000)


def truncated_after_l1(p: Path) -> None:
    os.truncate(p, 200000)


def l1_past_end(p: Path) -> None:
    _patch(p, 0x30000, ((1 << 63) | 0x10000000).to_bytes(8, "big"))


def l1_table_past_end(p: Path) -> None:
    _patch(p, 40, (0x1000000).to_bytes(8, "big"))


def refcount_says_l1_free(p: Path) -> None:
    _patch(p, 0x20000 + 2 * 3, bytes(2))


def refcount_block_on_l1(p: Path) -> None:
    """The refcount table's first entry points at the L1 table."""
    _patch(p, 0x10000, (0x30000).to_bytes(8, "big"))


SCENARIOS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "corrupt-bit": (corrupt_bit, ["read -P 0x11 0 4k", "write -P 0x55 0 4k"]),
    "unknown-feature": (unknown_feature, ["write -P 0x55 0 4k"]),
    "named-unknown-feature": (named_unknown_feature, ["write -P 0x55 0 4k"]),
    "truncated-in-refcounts": (truncated_in_refcounts,
                               ["read -P 0x11 0 4k", "write -P 0x55 0 4k",
                                "write -P 0x55 1M 4k", "read 0 4k"]),
    "truncated-after-l1": (truncated_after_l1,
                           ["read -P 0x11 0 4k", "write -P 0x55 0 4k",
                            "write -P 0x55 1M 4k"]),
    "l1-entry-past-end": (l1_past_end, ["read -P 0 0 4k", "write -P 0x55 0 4k",
                                        "write -P 0x55 1M 4k"]),
    "l1-table-past-end": (l1_table_past_end, ["read -P 0 0 4k", "write -P 0x55 0 4k",
                                              "write -P 0x55 1M 4k"]),
    "refcount-says-l1-free": (refcount_says_l1_free,
                              ["write -P 0x55 1M 4k", "write -P 0x66 2M 4k",
                               "read -P 0x11 0 4k"]),
    "refcount-block-on-l1": (refcount_block_on_l1,
                             ["write -P 0x55 1M 4k", "write -P 0x66 2M 4k"]),
}


class Qmp:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rwb")
        self.events: list[dict[str, Any]] = []
        self.file.readline()
        self.cmd("qmp_capabilities")

    def cmd(self, name: str, **args: Any) -> dict[str, Any]:
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        while True:
            reply: dict[str, Any] = json.loads(self.file.readline())
            if "event" not in reply:
                return reply
            reply.pop("timestamp", None)
            if reply["event"] == "BLOCK_IMAGE_CORRUPTED":
                self.events.append(reply)

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def run_scenario(name: str, workdir: Path, daemon: list[str]) -> dict[str, Any]:
    """Plays one scenario against ``daemon`` (an argv); returns its transcript."""
    patch, ops = SCENARIOS[name]
    image = workdir / "disk.qcow2"
    _image(image)
    patch(image)
    before = image.read_bytes()
    qmp_path, nbd_path = workdir / "qmp.sock", workdir / "nbd.sock"
    proc = subprocess.Popen([*daemon, "--chardev",
                             f"socket,id=m,path={qmp_path},server=on,wait=off",
                             "--monitor", "chardev=m"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=workdir)
    result: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 30
        while not qmp_path.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.1)
        qmp = Qmp(qmp_path)
        reply = qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": "d"},
                        file={"driver": "file", "filename": str(image)})
        result["blockdev-add"] = reply
        if "return" in reply:
            qmp.cmd("nbd-server-start", addr={"type": "unix", "data": {"path": str(nbd_path)}})
            qmp.cmd("block-export-add", type="nbd", id="e", **{"node-name": "d"},
                    writable=True)
            uri = f"nbd+unix:///d?socket={nbd_path}"
            result["io"] = []
            for op in ops:
                out = subprocess.run(["qemu-io", "-f", "raw", "-c", op, uri],
                                     capture_output=True, text=True, timeout=60)
                result["io"].append((out.stdout + out.stderr).splitlines()[0])
            query = qmp.cmd("query-named-block-nodes", flat=True)
            result["query"] = (query["error"] if "error" in query else
                               query["return"][0]["image"]["format-specific"])
            qmp.cmd("block-export-del", id="e")
        qmp.cmd("quit")
        result["events"] = qmp.events
        qmp.close()
        proc.wait(30)
        stderr = proc.stderr.read().decode() if proc.stderr else ""
        result["stderr"] = [line for line in stderr.splitlines() if "qcow2" in line]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
    after = image.read_bytes()
    result["file"] = "unchanged" if after == before else hashlib.md5(after).hexdigest()
    return result


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qsd-qcow2x-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_damaged_image(name: str, workdir: Path) -> None:
    expected = json.loads(GOLDEN.read_text())[name]
    got = json.loads(json.dumps(run_scenario(name, workdir, QSD)))
    assert got == expected


def record() -> None:
    """Plays every scenario against QEMU 11.1.3's daemon and stores the transcripts."""
    golden = {}
    for name in sorted(SCENARIOS):
        workdir = Path(tempfile.mkdtemp(prefix="qsd-qcow2x-", dir="/tmp"))
        try:
            golden[name] = run_scenario(name, workdir, [*SID_RUN, "qemu-storage-daemon"])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print(name, json.dumps(golden[name])[:200], file=sys.stderr)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__" and "--record" in sys.argv:
    record()
