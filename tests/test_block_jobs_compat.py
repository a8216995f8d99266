"""Block jobs' events, replies and argument errors, in QEMU 11.1.3's order and words.

``tests/golden/block_jobs.txt`` is 11.1.3's transcript of ``steps()``: every line the
daemon sent, replies and events in the order they arrived (timestamps dropped, the
temporary directory as @TMP@, generated node names as #blockN, progress figures and
allocated sizes as N, a run of identical BLOCK_JOB_ERROR events as one).  The steps
cover the argument
errors of block-stream, block-commit and blockdev-mirror; a mirror paused, resumed and
cancelled; a ready mirror paused (standby) and cancelled without switching; a target
that runs out of space (a 2 MiB tmpfs) with on-target-error=stop and with report;
the mirror of a writable FUSE export refused (it holds the resize permission);
stream and active commit to the end; a mirror with manual finalize and dismiss.  It was
recorded inside the sid chroot (tmpfs mounted there) with::

    python3 -m tests.test_block_jobs_compat --record -- qemu-storage-daemon
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.harness import QSD, RawMonitor, wait_for_listener

if __name__ != "__main__":
    import pytest

GOLDEN = Path(__file__).parent / "golden" / "block_jobs.txt"
MiB = 1 << 20

Step = tuple[str, dict[str, Any]]


def prepare(tmp: str) -> None:
    """The images: src (16 MiB of data), dst (empty), a chain base <- mid <- top, and
    'full' on a 2 MiB tmpfs."""
    def run(*argv: str) -> None:
        subprocess.run(argv, check=True, capture_output=True, timeout=60)

    run("qemu-img", "create", "-q", "-f", "qcow2", f"{tmp}/src.qcow2", "16M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 16M", f"{tmp}/src.qcow2")
    run("qemu-img", "create", "-q", "-f", "qcow2", f"{tmp}/dst.qcow2", "16M")
    run("qemu-img", "create", "-q", "-f", "qcow2", f"{tmp}/base.qcow2", "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 2M", f"{tmp}/base.qcow2")
    for name, below in (("mid", "base"), ("top", "mid")):
        run("qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
            f"{tmp}/{below}.qcow2", f"{tmp}/{name}.qcow2")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x22 1M 1M", f"{tmp}/mid.qcow2")
    open(f"{tmp}/mp", "w").close()
    os.mkdir(f"{tmp}/small")
    run("mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", f"{tmp}/small")
    run("qemu-img", "create", "-q", "-f", "qcow2", f"{tmp}/small/full.qcow2", "16M")


def qcow2(name: str, path: str, **extra: Any) -> Step:
    return ("blockdev-add", {"driver": "qcow2", "node-name": name, **extra,
                             "file": {"driver": "file", "filename": path}})


def wait(event: str, **data: Any) -> Step:
    return ("wait", {"event": event, **data})


def steps(tmp: str) -> list[Step]:
    mirror = {"device": "src", "target": "dst", "sync": "full"}
    return [
        qcow2("src", f"{tmp}/src.qcow2"),
        qcow2("dst", f"{tmp}/dst.qcow2"),
        qcow2("full", f"{tmp}/small/full.qcow2"),
        qcow2("base", f"{tmp}/base.qcow2", backing=None),
        qcow2("mid", f"{tmp}/mid.qcow2", backing="base"),
        qcow2("top", f"{tmp}/top.qcow2", backing="mid"),
        # block-stream's argument errors
        ("block-stream", {"job-id": "s0", "device": "nope"}),
        ("block-stream", {"job-id": "s0", "device": "top", "base": "x", "base-node": "y"}),
        ("block-stream", {"job-id": "s0", "device": "top", "base": "x", "bottom": "y"}),
        ("block-stream", {"job-id": "s0", "device": "top", "bottom": "x",
                          "base-node": "y"}),
        ("block-stream", {"job-id": "s0", "device": "top", "base": "nope.qcow2"}),
        ("block-stream", {"job-id": "s0", "device": "top", "base-node": "nope"}),
        ("block-stream", {"job-id": "s0", "device": "top", "base-node": "top"}),
        ("block-stream", {"job-id": "s0", "device": "top", "base-node": "src"}),
        ("block-stream", {"job-id": "s0", "device": "top", "bottom": "src"}),
        ("block-stream", {"job-id": "s0", "device": "top", "backing-file": "x"}),
        ("block-stream", {"job-id": "s0", "device": "top", "speed": -1}),
        ("block-stream", {"job-id": "1s", "device": "top"}),
        ("block-stream", {"device": "top", "base-node": "base"}),
        # block-commit's
        ("block-commit", {"job-id": "c0", "device": "nope"}),
        ("block-commit", {"job-id": "c0", "device": "mid"}),
        ("block-commit", {"job-id": "c0", "device": "src"}),
        ("block-commit", {"job-id": "c0", "device": "top", "top": "x", "top-node": "y"}),
        ("block-commit", {"job-id": "c0", "device": "top", "top-node": "src"}),
        ("block-commit", {"job-id": "c0", "device": "top", "top": "nope.qcow2"}),
        ("block-commit", {"job-id": "c0", "device": "top", "base": "x", "base-node": "y"}),
        ("block-commit", {"job-id": "c0", "device": "top", "base-node": "src"}),
        ("block-commit", {"job-id": "c0", "device": "top", "base": "nope.qcow2"}),
        ("block-commit", {"job-id": "c0", "device": "top", "top-node": "base",
                          "base-node": "base"}),
        ("block-commit", {"job-id": "c0", "device": "top", "backing-file": "x"}),
        ("block-commit", {"device": "top", "base-node": "base"}),
        # blockdev-mirror's
        ("blockdev-mirror", {"job-id": "m0", "device": "nope", "target": "dst",
                             "sync": "full"}),
        ("blockdev-mirror", {"job-id": "m0", "device": "mid", "target": "dst",
                             "sync": "full"}),
        ("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "nope",
                             "sync": "full"}),
        ("blockdev-mirror", {"job-id": "m0", "device": "src", "target": "src",
                             "sync": "full"}),
        ("blockdev-mirror", {"job-id": "m0", **mirror, "granularity": 256}),
        ("blockdev-mirror", {"job-id": "m0", **mirror, "granularity": 3000}),
        ("blockdev-mirror", {"job-id": "m0", **mirror, "buf-size": -1}),
        ("blockdev-mirror", {"job-id": "m0", **mirror, "sync": "incremental"}),
        ("blockdev-mirror", {"job-id": "m0", **mirror, "replaces": "nope"}),
        ("blockdev-mirror", {"job-id": "m0", **mirror, "replaces": "dst"}),
        ("blockdev-mirror", {"job-id": "1m", **mirror}),
        ("blockdev-mirror", mirror),
        ("blockdev-mirror", {"job-id": "m0", **mirror, "speed": -1}),
        ("block-job-set-speed", {"device": "nope", "speed": 1}),
        ("job-pause", {"id": "nope"}),
        # a mirror paused, resumed and cancelled before it is ready
        ("blockdev-mirror", {"job-id": "m1", **mirror, "speed": MiB}),
        ("job-pause", {"id": "m1"}),
        wait("JOB_STATUS_CHANGE", status="paused"),
        ("query-jobs", {}),
        ("job-pause", {"id": "m1"}),
        ("job-complete", {"id": "m1"}),
        ("job-resume", {"id": "m1"}),
        ("blockdev-mirror", {"job-id": "m1", **mirror}),
        ("blockdev-mirror", {"job-id": "m2", **mirror}),
        ("job-cancel", {"id": "m1"}),
        wait("JOB_STATUS_CHANGE", status="null"),
        # a ready mirror: standby while paused, cancelled without switching
        ("blockdev-mirror", {"job-id": "m1", **mirror}),
        wait("BLOCK_JOB_READY"),
        ("job-pause", {"id": "m1"}),
        wait("JOB_STATUS_CHANGE", status="standby"),
        ("job-resume", {"id": "m1"}),
        wait("JOB_STATUS_CHANGE", status="ready"),
        ("block-job-cancel", {"device": "m1"}),
        wait("JOB_STATUS_CHANGE", status="null"),
        # out of space on the target: stop, then report
        ("blockdev-mirror", {"job-id": "m3", "device": "src", "target": "full",
                             "sync": "full", "buf-size": 65536, "granularity": 65536,
                             "on-target-error": "stop"}),
        wait("JOB_STATUS_CHANGE", status="paused"),
        ("query-block-jobs", {}),
        ("block-job-cancel", {"device": "m3"}),
        ("job-cancel", {"id": "m3"}),
        wait("JOB_STATUS_CHANGE", status="null"),
        ("blockdev-mirror", {"job-id": "m4", "device": "src", "target": "full",
                             "sync": "full", "buf-size": 65536, "granularity": 65536}),
        wait("JOB_STATUS_CHANGE", status="null"),
        # stream and active commit to their end
        ("block-stream", {"job-id": "s1", "device": "top", "base-node": "base"}),
        wait("JOB_STATUS_CHANGE", status="null"),
        ("block-commit", {"job-id": "c1", "device": "top", "base-node": "base"}),
        wait("BLOCK_JOB_READY"),
        ("job-complete", {"id": "c1"}),
        wait("JOB_STATUS_CHANGE", status="null"),
        # manual finalize and dismiss
        ("blockdev-mirror", {"job-id": "m5", **mirror, "auto-finalize": False,
                             "auto-dismiss": False}),
        wait("BLOCK_JOB_READY"),
        ("job-complete", {"id": "m5"}),
        wait("BLOCK_JOB_PENDING"),
        ("query-block-jobs", {}),
        ("job-finalize", {"id": "m5"}),
        ("job-dismiss", {"id": "m5"}),
        # (the image on the full tmpfs goes first: its file's length after ENOSPC is
        # the qcow2 driver's business, not the jobs')
        ("blockdev-del", {"node-name": "full"}),
        ("query-named-block-nodes", {"flat": True}),
        # a writable FUSE export takes the resize permission, which a mirror unshares
        ("block-export-add", {"type": "fuse", "id": "e0", "node-name": "dst",
                              "mountpoint": f"{tmp}/mp", "writable": True}),
        ("blockdev-mirror", {"job-id": "m0", "device": "dst", "target": "src",
                             "sync": "full"}),
    ]


_NUMBERS = re.compile(r'"(offset|len|current-progress|total-progress|actual-size)": \d+')


def normalise(line: str, tmp: str) -> str:
    message = json.loads(line)
    message.pop("timestamp", None)
    text = json.dumps(message)
    text = _NUMBERS.sub(r'"\1": "N"', text.replace(tmp, "@TMP@"))
    return re.sub(r"#block\d+", "#blockN", text)


def _matches(message: dict[str, Any], want: dict[str, Any]) -> bool:
    if message.get("event") != want["event"]:
        return False
    data = message.get("data", {})
    return all(data.get(key) == value for key, value in want.items() if key != "event")


def play(argv: list[str], tmp: str) -> list[str]:
    """Runs the steps against a daemon; every line it sent, normalised."""
    path = Path(tmp) / "qmp.sock"
    proc = subprocess.Popen([*argv, "--chardev", f"socket,id=m,path={path},server=on,"
                             "wait=off", "--monitor", "chardev=m"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    lines: list[str] = []
    try:
        wait_for_listener(path, proc, timeout=20)
        monitor = RawMonitor(path)
        monitor.sock.settimeout(20)
        try:
            monitor.negotiate()
            unseen: list[dict[str, Any]] = []
            for command, args in steps(tmp):
                try:
                    _step(monitor, command, args, lines, unseen, tmp)
                except TimeoutError:
                    lines.append(json.dumps({"timeout": [command, args]}).replace(tmp, "@TMP@"))
                    break
        finally:
            monitor.close()
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()
    out: list[str] = []
    for line in lines:
        if out and line == out[-1] and '"BLOCK_JOB_ERROR"' in line:
            continue
        out.append(line)
    return out


def _step(monitor: RawMonitor, command: str, args: dict[str, Any], lines: list[str],
          unseen: list[dict[str, Any]], tmp: str) -> None:
    """Sends a command and keeps every line up to its reply, or (``wait``) every line
    up to the event it names (which may have come already: ``unseen`` holds the events
    since the last wait)."""
    if command == "wait":
        for index, message in enumerate(unseen):
            if _matches(message, args):
                del unseen[:index + 1]
                return
        unseen.clear()
        while True:
            raw = monitor.recv_line()
            lines.append(normalise(raw.decode(), tmp))
            if _matches(json.loads(raw), args):
                return
    monitor.send(json.dumps({"execute": command, "arguments": args}).encode() + b"\n")
    while True:
        raw = monitor.recv_line()
        lines.append(normalise(raw.decode(), tmp))
        if not raw.startswith(b'{"timestamp"'):
            return
        unseen.append(json.loads(raw))


def _cleanup(tmp: str) -> None:
    subprocess.run(["umount", f"{tmp}/small"], check=False, capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ != "__main__":
    @pytest.fixture
    def tmp() -> Iterator[str]:
        """A short private directory (the socket path must fit in 108 bytes)."""
        path = tempfile.mkdtemp(prefix="qsd-jobs-", dir="/tmp")
        try:
            prepare(path)
            yield path
        finally:
            _cleanup(path)

    def test_block_jobs_match_qemu(tmp: str) -> None:
        golden = GOLDEN.read_text().splitlines()
        ours = play(QSD, tmp)
        for index, (expected, got) in enumerate(zip(golden, ours, strict=False)):
            assert got == expected, (index, golden[max(0, index - 3):index + 1])
        assert len(ours) == len(golden)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--record"] or "--" not in sys.argv:
        sys.exit("usage: python3 -m tests.test_block_jobs_compat --record -- DAEMON...")
    directory = tempfile.mkdtemp(prefix="qsd-jobs-", dir="/tmp")
    try:
        prepare(directory)
        GOLDEN.write_text("\n".join(play(sys.argv[sys.argv.index("--") + 1:], directory))
                          + "\n")
    finally:
        _cleanup(directory)
