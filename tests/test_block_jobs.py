"""Block jobs through a real daemon: a 3-image qcow2 chain streamed (checked against the
flattened chain with qemu-img compare, every image checked with qemu-img check)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import QsdFactory
from tests.harness import Monitor

MiB = 1 << 20


def img(*args: object) -> str:
    return subprocess.run(["qemu-img", *map(str, args)], check=True, capture_output=True,
                          text=True, timeout=120).stdout


def qemu_io(path: Path, *commands: str) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    result = subprocess.run([*argv, str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "error" not in result.stdout.lower(), (
        result.stdout + result.stderr)


def make_chain(d: Path) -> tuple[Path, Path, Path]:
    """base <- mid <- top, 8 MiB, each layer with data of its own, zeroes written over
    lower data, and writes that cover clusters only in part."""
    base, mid, top = d / "base.qcow2", d / "mid.qcow2", d / "top.qcow2"
    img("create", "-q", "-f", "qcow2", base, "8M")
    qemu_io(base, "write -P 0x11 0 4M", "write -P 0x12 6M 1M")
    img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", base, mid)
    qemu_io(mid, "write -P 0x21 1M 2M", "write -z 6M 512k", "write -P 0x22 3588k 4k")
    img("create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", mid, top)
    qemu_io(top, "write -P 0x31 2M 1M", "write -P 0x32 7M 64k", "write -z 0 64k",
            "write -P 0x33 5000k 3k")
    return base, mid, top


def flatten(image: Path, out: Path) -> None:
    img("convert", "-O", "raw", image, out)


def same(image: Path, reference: Path) -> None:
    """The image (through its chain) reads as the raw reference, byte for byte."""
    subprocess.run(["qemu-img", "compare", "-q", "-F", "raw", str(image), str(reference)],
                   check=True, timeout=120)


def check(*images: Path) -> None:
    for image in images:
        subprocess.run(["qemu-img", "check", "-q", str(image)], check=True, timeout=60)


def backing_of(image: Path) -> str | None:
    info = json.loads(img("info", "--output=json", "-U", image))
    value = info.get("full-backing-filename")
    return str(value) if value is not None else None


def add_chain(qmp: Monitor, base: Path, mid: Path, top: Path) -> None:
    """Each layer as a node of its own, all writable."""
    for name, path, backing in (("base", base, None), ("mid", mid, "base"),
                                ("top", top, "mid")):
        qmp.ok("blockdev-add", driver="qcow2", **{"node-name": name}, backing=backing,
               file={"driver": "file", "filename": str(path),
                     "node-name": f"{name}-file"})


def node_names(qmp: Monitor) -> list[str]:
    return [n["node-name"] for n in qmp.ok("query-named-block-nodes")]


def wait_done(qmp: Monitor, job: str, timeout: float = 120) -> dict[str, Any]:
    event = qmp.wait_event("BLOCK_JOB_COMPLETED", timeout)
    assert event["data"]["device"] == job
    assert "error" not in event["data"], event
    return event


def quit_daemon(qmp: Monitor) -> None:
    qmp.ok("quit")


@pytest.fixture
def chain(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    base, mid, top = make_chain(tmp_path)
    reference = tmp_path / "flat.raw"
    flatten(top, reference)
    return base, mid, top, reference


def test_stream_to_a_base(chain: tuple[Path, Path, Path, Path],
                          start_qsd: QsdFactory) -> None:
    base, mid, top, reference = chain
    daemon = start_qsd()
    qmp = Monitor(daemon)
    add_chain(qmp, base, mid, top)
    qmp.ok("block-stream", **{"job-id": "s0", "device": "top", "base-node": "base"})
    event = wait_done(qmp, "s0")
    assert event["data"]["type"] == "stream"
    assert event["data"]["offset"] == event["data"]["len"] == 8 * MiB
    nodes = {n["node-name"]: n for n in qmp.ok("query-named-block-nodes")}
    assert nodes["top"]["backing_file"] == str(base)
    assert {"child": "backing", "node-name": "base"} in nodes["top"]["children"]
    assert qmp.ok("query-block-jobs") == []
    quit_daemon(qmp)
    daemon.wait()
    assert backing_of(top) == str(base)
    same(top, reference)
    check(base, mid, top)


def test_stream_the_whole_chain(chain: tuple[Path, Path, Path, Path],
                                start_qsd: QsdFactory) -> None:
    """The top image opens its chain from its header (backing files read-only); after
    the stream it stands alone and the nodes below are gone."""
    base, mid, top, reference = chain
    daemon = start_qsd()
    qmp = Monitor(daemon)
    qmp.ok("blockdev-add", driver="qcow2", **{"node-name": "top"},
           file={"driver": "file", "filename": str(top)})
    assert len(node_names(qmp)) == 6
    qmp.ok("block-stream", **{"job-id": "s0", "device": "top", "speed": 0})
    wait_done(qmp, "s0")
    deadline = time.monotonic() + 10
    while len(node_names(qmp)) != 2:
        assert time.monotonic() < deadline, node_names(qmp)
        time.sleep(0.05)
    quit_daemon(qmp)
    daemon.wait()
    assert backing_of(top) is None
    same(top, reference)
    check(base, mid, top)


def fio_nbd(sock: Path, export: str, *args: str) -> list[str]:
    """fio through an NBD export of the daemon (fio's nbd engine, libnbd)."""
    return ["fio", "--name=t", "--ioengine=nbd",
            f"--uri=nbd+unix:///{export}?socket={sock}", "--bs=4k", "--iodepth=8",
            "--verify_state_save=0", "--output-format=terse", *args]


def test_stream_under_writes(chain: tuple[Path, Path, Path, Path], tmp_path: Path,
                             start_qsd: QsdFactory) -> None:
    """fio writes the top image through NBD while the stream copies into it: every
    block fio wrote reads back as written (no copy of the chain lands over it)."""
    base, mid, top, _ = chain
    qmp = Monitor(start_qsd())
    add_chain(qmp, base, mid, top)
    sock = tmp_path / "nbd.sock"
    qmp.ok("nbd-server-start", addr={"type": "unix", "data": {"path": str(sock)}})
    qmp.ok("block-export-add", type="nbd", id="e0", **{"node-name": "top"}, writable=True)
    # 2048 random 4 KiB writes at 500 a second, each block once, then read back.
    load = subprocess.Popen(fio_nbd(sock, "top", "--rw=randwrite", "--size=8M",
                                    "--verify=crc32c", "--rate_iops=500", "--do_verify=1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(0.3)
        qmp.ok("block-stream", **{"job-id": "s0", "device": "top", "base-node": "base",
                                  "speed": 2 * MiB})
        wait_done(qmp, "s0")
        assert load.poll() is None, "fio ended before the stream did"
        out, err = load.communicate(timeout=120)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    assert load.returncode == 0, err
    fields = out.split(";")
    assert fields[4] == "0" and int(fields[5]) == 8 * 1024, out   # no error, all verified
    qmp.ok("block-export-del", id="e0")
    qmp.wait_event("BLOCK_EXPORT_DELETED")
    qmp.ok("quit")
    assert backing_of(top) == str(base)
    check(base, mid, top)
