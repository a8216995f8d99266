"""Damaged qcow2 images get QEMU 11.1.3's errors, events and resulting bytes.

Each scenario patches bytes of an image made by qemu-img (the corrupt bit, an unknown
incompatible feature, a truncated file, L1, L2 and refcount entries that point past the
end, at metadata or off cluster boundaries, refcounts that call metadata free, compressed
clusters that do not decompress), then a daemon opens it and qemu-io reads and writes
through an NBD export.  What the daemon answers (blockdev-add, every request, the
BLOCK_IMAGE_CORRUPTED event, what query-named-block-nodes then says) and the md5 of the
image file afterwards must match what QEMU 11.1.3's daemon did with the same image.
Images with one damaged header field each (magic, version, cluster size, size, header
length, refcount order and table, L1 and snapshot tables, backing file name, encryption
and compression types, feature bits) are offered to one daemon, which must accept or
refuse each as QEMU does.  The transcripts are in ``tests/test_qcow2_corruption.json``.
A refused image is not written at all; an image marked corrupt gets only its header
rewritten with the corrupt bit, as QEMU does.

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
from contextlib import contextmanager
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


def _field(offset: int, width: int, value: int) -> Callable[[Path], None]:
    """Sets one big-endian field of the image: a header field, a table entry."""
    return lambda p: _patch(p, offset, value.to_bytes(width, "big"))


def _fields(*patches: Callable[[Path], None]) -> Callable[[Path], None]:
    def patch_all(p: Path) -> None:
        for patch in patches:
            patch(p)
    return patch_all


REFTABLE, L1, L2, DATA = 0x10000, 0x30000, 0x40000, 0x50000
COPIED = 1 << 63
COMPRESSED = 1 << 62        # 64 KiB clusters: sectors - 1 from bit 54, the offset below


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
    "l2-table-unaligned": (_field(L1, 8, COPIED | L2 + 0x200),
                           ["read 0 4k", "write -P 0x55 0 4k"]),
    "data-cluster-unaligned": (_field(L2, 8, COPIED | DATA + 0x200),
                               ["read 0 4k", "write -P 0x55 0 4k"]),
    "data-cluster-past-end": (_field(L2, 8, COPIED | 0x1000000),
                              ["read -P 0 0 4k", "write -P 0x55 0 4k", "read -P 0x55 0 4k"]),
    "data-cluster-on-l1": (_field(L2, 8, COPIED | L1), ["write -P 0x55 0 4k"]),
    "compressed-garbage": (_field(L2 + 8, 8, COMPRESSED | DATA),
                           ["read 64k 4k", "write -P 0x55 66k 1k", "read -P 0x11 0 4k"]),
    "compressed-past-end": (_field(L2 + 8, 8, COMPRESSED | 3 << 54 | 0x1000000),
                            ["read 64k 4k", "write -P 0x55 64k 64k", "read -P 0x55 64k 4k"]),
    "refcount-block-unaligned": (_field(REFTABLE, 8, 0x20200),
                                 ["read -P 0x11 0 4k", "write -P 0x55 1M 4k"]),
    "refcount-block-past-end": (_field(REFTABLE, 8, 0x1000000),
                                ["read -P 0x11 0 4k", "write -P 0x55 1M 4k"]),
}

# One damaged header field each (offsets from qcow2.txt); opened read-write unless the
# name says read-only.
HEADERS: dict[str, Callable[[Path], None]] = {
    "bad-magic": _field(0, 4, 0x514649FA),
    "version-1": _field(4, 4, 1),
    "version-4": _field(4, 4, 4),
    "backing-offset-past-cluster": _fields(_field(8, 8, 0x10008), _field(16, 4, 4)),
    "backing-name-past-cluster": _fields(_field(8, 8, 0xFF00), _field(16, 4, 0x200)),
    "cluster-bits-8": _field(20, 4, 8),
    "cluster-bits-22": _field(20, 4, 22),
    "size-huge": _field(24, 8, 1 << 62),
    "crypt-method-3": _field(32, 4, 3),
    "l1-size-zero": _field(36, 4, 0),
    "l1-size-huge": _field(36, 4, 0x4000000),
    "l1-offset-unaligned": _field(40, 8, L1 + 0x200),
    "reftable-offset-unaligned": _field(48, 8, REFTABLE + 0x200),
    "reftable-clusters-zero": _field(56, 4, 0),
    "reftable-clusters-huge": _field(56, 4, 0x1000000),
    "snapshots-offset-unaligned": _fields(_field(60, 4, 1), _field(64, 8, REFTABLE + 0x200)),
    "snapshots-too-many": _fields(_field(60, 4, 70000), _field(64, 8, REFTABLE)),
    "compression-bit-with-zlib": _field(72, 8, 8),
    "zstd-without-compression-bit": _field(104, 1, 1),
    "compression-type-2": _fields(_field(72, 8, 8), _field(104, 1, 2)),
    "unknown-compatible-feature": _field(80, 8, 1 << 40),
    "unknown-autoclear-feature": _field(88, 8, 1 << 40),
    "refcount-order-7": _field(96, 4, 7),
    "header-length-short": _field(100, 4, 96),
    "header-length-past-cluster": _field(100, 4, 0x10008),
    "corrupt-bit-read-only": corrupt_bit,
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


@contextmanager
def session(workdir: Path, daemon: list[str]) -> Iterator[tuple[Qmp, list[str]]]:
    """A daemon (``daemon`` is its argv) and its monitor; ends with ``quit``.  The
    list it yields gets the daemon's qcow2 lines of stderr once it has ended."""
    qmp_path = workdir / "qmp.sock"
    proc = subprocess.Popen([*daemon, "--chardev",
                             f"socket,id=m,path={qmp_path},server=on,wait=off",
                             "--monitor", "chardev=m"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, cwd=workdir)
    stderr: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while not qmp_path.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.1)
        qmp = Qmp(qmp_path)
        yield qmp, stderr
        qmp.cmd("quit")
        qmp.close()
        proc.wait(30)
        out = proc.stderr.read().decode() if proc.stderr else ""
        stderr += [line for line in out.splitlines() if "qcow2" in line]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _file_state(image: Path, before: bytes) -> str:
    after = image.read_bytes()
    return "unchanged" if after == before else hashlib.md5(after).hexdigest()


def run_scenario(name: str, workdir: Path, daemon: list[str]) -> dict[str, Any]:
    """Plays one scenario against ``daemon`` (an argv); returns its transcript."""
    patch, ops = SCENARIOS[name]
    image = workdir / "disk.qcow2"
    _image(image)
    patch(image)
    before = image.read_bytes()
    nbd_path = workdir / "nbd.sock"
    result: dict[str, Any] = {}
    with session(workdir, daemon) as (qmp, stderr):
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
    result["events"] = qmp.events
    result["stderr"] = stderr
    result["file"] = _file_state(image, before)
    return result


def run_headers(workdir: Path, daemon: list[str]) -> dict[str, Any]:
    """Offers every damaged header to one daemon; per image: the blockdev-add reply, the
    format-specific information of an accepted one, the file afterwards."""
    images = {}
    for name, patch in HEADERS.items():
        images[name] = image = workdir / f"{name}.qcow2"
        _image(image)
        patch(image)
    befores = {name: image.read_bytes() for name, image in images.items()}
    results: dict[str, Any] = {}
    with session(workdir, daemon) as (qmp, stderr):
        for name, image in images.items():
            reply = qmp.cmd("blockdev-add", driver="qcow2", **{"node-name": "d"},
                            **{"read-only": name.endswith("read-only")},
                            file={"driver": "file", "filename": str(image)})
            results[name] = {"blockdev-add": reply}
            if "return" in reply:
                query = qmp.cmd("query-named-block-nodes", flat=True)
                results[name]["query"] = query["return"][0]["image"]["format-specific"]
                qmp.cmd("blockdev-del", **{"node-name": "d"})
    for name, image in images.items():
        results[name]["file"] = _file_state(image, befores[name])
    results["events"] = qmp.events
    results["stderr"] = stderr
    return results


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


def test_damaged_headers(workdir: Path) -> None:
    expected = json.loads(GOLDEN.read_text())["headers"]
    got = json.loads(json.dumps(run_headers(workdir, QSD)))
    for name in expected:
        assert (name, got[name]) == (name, expected[name])


def record() -> None:
    """Plays every scenario against QEMU 11.1.3's daemon and stores the transcripts."""
    sid = [*SID_RUN, "qemu-storage-daemon"]
    golden = {}
    workdir = Path(tempfile.mkdtemp(prefix="qsd-qcow2x-", dir="/tmp"))
    try:
        golden["headers"] = run_headers(workdir, sid)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    for name in sorted(SCENARIOS):
        workdir = Path(tempfile.mkdtemp(prefix="qsd-qcow2x-", dir="/tmp"))
        try:
            golden[name] = run_scenario(name, workdir, sid)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        print(name, json.dumps(golden[name])[:200], file=sys.stderr)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__" and "--record" in sys.argv:
    record()
