"""Block queries and option checks, byte for byte as QEMU 11.1.3's daemon answers them.

``tests/golden/block_queries.txt`` holds 11.1.3's replies to STEPS (one line each, the
temporary directory written as @TMP@ and generated node names as #blockN).  It was
recorded by running this file as a script against QEMU's daemon::

    python3 -m tests.test_block_compat --record -- qemu-storage-daemon

The steps cover null-co/null-aio sizes and latencies at and past their limits, raw's
offset and size range checks, the virtual size of a 1000-byte image (QEMU counts in
sectors), json: filenames of nested and filtered nodes, ``children`` and
``image.limits`` in query-named-block-nodes, ``flat`` for query-named-block-nodes and
query-block, and the debug graph.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import QSD, replay

if __name__ != "__main__":
    from tests.conftest import QsdFactory

GOLDEN = Path(__file__).parent / "golden" / "block_queries.txt"
MAX_LENGTH = 2**63 - 2**30      # the largest image length QEMU's block layer allows


def steps(tmp: str) -> list[tuple[str, dict[str, object]]]:
    image = f"{tmp}/f1000.raw"
    return [
        ("blockdev-add", {"driver": "null-co", "node-name": "n1"}),
        ("blockdev-add", {"driver": "null-aio", "node-name": "n2", "size": 1000,
                          "read-zeroes": True, "latency-ns": 5}),
        ("blockdev-add", {"driver": "null-aio", "node-name": "n3", "latency-ns": 1000000}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n4", "read-zeroes": False}),
        ("blockdev-add", {"driver": "null-co", "node-name": "e1", "size": 2**63 - 1}),
        ("blockdev-add", {"driver": "null-co", "node-name": "e2", "latency-ns": -1}),
        ("blockdev-add", {"driver": "null-co", "node-name": "e3", "latency-ns": 2**63}),
        ("blockdev-add", {"driver": "null-co", "node-name": "n5", "size": MAX_LENGTH}),
        ("blockdev-add", {"driver": "null-co", "node-name": "e4", "size": MAX_LENGTH + 1}),
        ("blockdev-add", {"driver": "raw", "node-name": "e5", "offset": -1, "file": "n1"}),
        ("blockdev-add", {"driver": "raw", "node-name": "e6", "size": -512, "file": "n1"}),
        ("blockdev-add", {"driver": "raw", "node-name": "e7", "offset": -512, "size": -1,
                          "file": "n1"}),
        ("blockdev-add", {"driver": "file", "node-name": "f1", "filename": image}),
        ("blockdev-add", {"driver": "raw", "node-name": "r1", "file": "f1"}),
        ("blockdev-add", {"driver": "raw", "node-name": "r2", "offset": 512,
                          "file": {"driver": "file", "filename": image, "locking": "off"}}),
        ("blockdev-add", {"driver": "raw", "node-name": "r3", "size": 512,
                          "file": {"driver": "raw", "offset": 0,
                                   "file": {"driver": "file", "filename": image,
                                            "locking": "off", "aio": "threads"}}}),
        ("blockdev-add", {"driver": "raw", "node-name": "r4", "size": 512,
                          "file": {"driver": "raw",
                                   "file": {"driver": "file", "filename": image,
                                            "locking": "off"}}}),
        ("blockdev-add", {"driver": "raw", "node-name": "r5", "offset": 512,
                          "file": {"driver": "null-co", "size": 4096}}),
        ("blockdev-add", {"driver": "raw", "node-name": "r6", "read-only": True,
                          "file": "f1"}),
        ("query-named-block-nodes", {}),
        ("query-named-block-nodes", {"flat": True}),
        ("query-block", {}),
        ("query-block", {"flat": True}),
        ("x-debug-query-block-graph", {}),
        ("blockdev-del", {"node-name": "r4"}),
        ("query-named-block-nodes", {"flat": False}),
    ]


def normalise(line: str, tmp: str) -> str:
    return re.sub(r"#block\d+", "#blockN", line.replace(tmp, "@TMP@"))


def play(argv: list[str], tmp: str) -> list[str]:
    return [normalise(line, tmp) for line in replay(argv, tmp, steps(tmp))]


@pytest.fixture
def tmp() -> Iterator[str]:
    """A short private directory (the socket path must fit in 108 bytes)."""
    path = tempfile.mkdtemp(prefix="qsd-blkq-", dir="/tmp")
    with open(os.path.join(path, "f1000.raw"), "wb") as f:
        f.write(os.urandom(1000))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_block_queries_match_qemu(tmp: str) -> None:
    golden = GOLDEN.read_text().splitlines()
    ours = play(QSD, tmp)
    assert len(ours) == len(golden)
    for step, (expected, got) in enumerate(zip(golden, ours, strict=True)):
        assert got == expected, (step, steps(tmp)[step])


def test_negative_null_size(start_qsd: QsdFactory) -> None:
    """11.1.3 aborts on a negative null-co size (its QemuOpts range check fails in an
    &error_abort path); qsd refuses it with that check's text instead."""
    daemon = start_qsd()
    monitor = daemon.connect_raw()
    try:
        monitor.negotiate()
        for size in (-1, -(2**63)):
            reply = monitor.command(json.dumps({
                "execute": "blockdev-add",
                "arguments": {"driver": "null-co", "node-name": "n", "size": size}}).encode())
            assert reply == (b'{"error": {"class": "GenericError", "desc": "Value \''
                             + str(size).encode() + b'\' is out of range for parameter '
                             b'\'size\'"}}')
        assert monitor.command(b'{"execute": "query-named-block-nodes"}') == b'{"return": []}'
    finally:
        monitor.close()


if __name__ == "__main__":
    if sys.argv[1:3] != ["--record", "--"] or len(sys.argv) < 4:
        sys.exit(f"usage: {sys.argv[0]} --record -- DAEMON [ARGS...]")
    directory = tempfile.mkdtemp(prefix="qsd-blkq-", dir="/tmp")
    try:
        with open(os.path.join(directory, "f1000.raw"), "wb") as image_file:
            image_file.write(os.urandom(1000))
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text("".join(line + "\n" for line in play(sys.argv[3:], directory)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
