"""What qsd says about qcow2 images and backing chains, byte for byte as QEMU 11.1.3.

One daemon opens a chain (raw <- qcow2 <- qcow2 with lazy refcounts, the backing files
from the headers), images of other kinds (v2, extended L2 entries with an external raw
data file and 4-bit refcounts, zstd compression, encrypted ones), and chains given with
``backing`` as a node name and as null; then the monitor lines of blockdev-add,
query-named-block-nodes (nested and flat), query-block and the errors of bad options
must be QEMU 11.1.3's (``tests/test_qcow2_queries.json``; node names the daemon
generates, the test directory and allocated sizes masked).  Persistent bitmaps show in the image's
format-specific information and, loaded, in ``dirty-bitmaps`` (tests/test_bitmaps_qemu.py
has the rest of them).

    python -m tests.test_qcow2_queries --record   # re-record with 11.1.3 (sid chroot)
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import QSD
from tests.test_qcow2_corruption import SID_RUN

GOLDEN = Path(__file__).with_suffix(".json")


def images(d: Path) -> None:
    def run(*args: str) -> None:
        subprocess.run(args, check=True, cwd=d, stdout=subprocess.DEVNULL)

    run("qemu-img", "create", "-q", "-f", "raw", "base.raw", "8M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
        "-o", "lazy_refcounts=on", "top.qcow2")
    run("qemu-io", "-c", "write 0 64k", "top.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2",
        "other.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096",
        "v2.qcow2", "4M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o",
        f"extended_l2=on,data_file={d}/ext.data,data_file_raw=on,refcount_bits=4",
        "ext.qcow2", "4M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compression_type=zstd",
        "z.qcow2", "4M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "spare-v2.qcow2",
        "4M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "spare.qcow2", "4M")
    run("qemu-img", "create", "-q", "-f", "qcow2", "bm.qcow2", "4M")
    run("qemu-img", "bitmap", "--add", "bm.qcow2", "b1")
    run("qemu-img", "bitmap", "--add", "-g", "128k", "--disable", "bm.qcow2", "b2")
    run("qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw", "-o",
        "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10", "luks.qcow2", "4M")


def file(d: Path, name: str) -> dict[str, str]:
    return {"driver": "file", "filename": str(d / name)}


def commands(d: Path) -> list[dict[str, Any]]:
    def add(**args: Any) -> dict[str, Any]:
        return {"execute": "blockdev-add", "arguments": {"driver": "qcow2", **args}}

    return [
        add(**{"node-name": "top"}, file=file(d, "top.qcow2")),
        add(**{"node-name": "v2"}, file=file(d, "v2.qcow2")),
        add(**{"node-name": "ext", "read-only": True}, file=file(d, "ext.qcow2")),
        add(**{"node-name": "z"}, file=file(d, "z.qcow2")),
        add(**{"node-name": "nobacking", "backing": None}, file=file(d, "other.qcow2")),
        {"execute": "blockdev-del", "arguments": {"node-name": "nobacking"}},
        add(**{"node-name": "v2backing", "backing": "v2", "read-only": True},
            file=file(d, "other.qcow2")),
        {"execute": "query-named-block-nodes"},
        {"execute": "query-named-block-nodes", "arguments": {"flat": True}},
        {"execute": "query-block"},
        add(**{"node-name": "bad1"}, file=file(d, "base.raw")),
        add(**{"node-name": "bad2", "data-file": "v2"}, file=file(d, "z.qcow2")),
        add(**{"node-name": "bad3", "lazy-refcounts": True}, file=file(d, "spare-v2.qcow2")),
        add(**{"node-name": "bad4", "l2-cache-entry-size": 1000},
            file=file(d, "spare.qcow2")),
        add(**{"node-name": "bad5", "cache-size": 1000, "l2-cache-size": 2000},
            file=file(d, "spare.qcow2")),
        add(**{"node-name": "bad6", "cache-size": 100000, "l2-cache-size": 2000,
               "refcount-cache-size": 1000}, file=file(d, "spare.qcow2")),
        add(**{"node-name": "bad7", "read-only": True, "backing": "nonexist"},
            file=file(d, "other.qcow2")),
        add(**{"node-name": "bad8", "read-only": True, "overlap-check": "all",
               "encrypt": {"format": "luks", "key-secret": "s0"}}, file=file(d, "mid.qcow2")),
    ]


BITMAP_COMMANDS = [{"execute": "blockdev-add", "arguments": {
    "driver": "qcow2", "node-name": "bm", "read-only": True,
    "file": {"driver": "file", "filename": "@DIR@/bm.qcow2"}}},
    {"execute": "query-named-block-nodes", "arguments": {"flat": True}}]


def play(daemon: list[str], d: Path, cmds: list[dict[str, Any]]) -> list[str]:
    """The monitor's reply lines, with the directory and generated node names masked."""
    qmp_path = d / "qmp.sock"
    proc = subprocess.Popen([*daemon, "--chardev",
                             f"socket,id=m,path={qmp_path},server=on,wait=off",
                             "--monitor", "chardev=m"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=d)
    try:
        deadline = time.monotonic() + 30
        while not qmp_path.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.1)
        sock = socket.socket(socket.AF_UNIX)
        sock.connect(str(qmp_path))
        f = sock.makefile("rwb")
        f.readline()
        lines = []
        for cmd in [{"execute": "qmp_capabilities"}, *cmds, {"execute": "quit"}]:
            f.write(json.dumps(cmd).replace("@DIR@", str(d)).encode() + b"\n")
            f.flush()
            while True:
                line = f.readline().decode()
                if '"event"' not in line:
                    break
            # Generated node names, and allocated sizes (the file system's business).
            line = re.sub(r'"#block\d+"', '"#block"', line.replace(str(d), "@DIR@"))
            lines.append(re.sub(r'"actual-size": \d+', '"actual-size": 0', line))
        sock.close()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return lines


def transcripts(daemon: list[str], d: Path) -> dict[str, Any]:
    images(d)
    chain = play(daemon, d, commands(d))
    node = json.loads(play(daemon, d, BITMAP_COMMANDS)[2])["return"][0]
    return {"chain": chain, "bitmaps-format-specific": node["image"]["format-specific"],
            "dirty-bitmaps": node["dirty-bitmaps"]}


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="qsd-qcow2q-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_queries_and_errors_as_qemu(workdir: Path) -> None:
    expected = json.loads(GOLDEN.read_text())
    got = transcripts(QSD, workdir)
    assert got["bitmaps-format-specific"] == expected["bitmaps-format-specific"]
    assert got["dirty-bitmaps"] == expected["dirty-bitmaps"]
    for want, have in zip(expected["chain"], got["chain"], strict=True):
        assert have == want


def record() -> None:
    workdir = Path(tempfile.mkdtemp(prefix="qsd-qcow2q-", dir="/tmp"))
    try:
        golden = transcripts([*SID_RUN, "qemu-storage-daemon"], workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")


if __name__ == "__main__" and "--record" in sys.argv:
    record()
