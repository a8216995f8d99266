"""Throttle groups, the throttle filter and qom-* on them, byte for byte as QEMU 11.1.3's
daemon answers: every error path (bad limits, unknown group, group in use, unknown
property, wrong type) and the listings around them.

``tests/golden/throttle_qom.txt`` holds 11.1.3's replies to STEPS, one line each. It was
recorded by running this file against QEMU's daemon::

    python3 -m tests.test_throttle_compat --record -- qemu-storage-daemon
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import QSD, replay

GOLDEN = Path(__file__).parent / "golden" / "throttle_qom.txt"


def _group(group_id: str, **props: Any) -> tuple[str, dict[str, Any]]:
    return "object-add", {"qom-type": "throttle-group", "id": group_id, **props}


def _throttle(node: str, **options: Any) -> tuple[str, dict[str, Any]]:
    return "blockdev-add", {"driver": "throttle", "node-name": node, **options}


def _qom_set(path: str, prop: str, value: Any) -> tuple[str, dict[str, Any]]:
    return "qom-set", {"path": path, "property": prop, "value": value}


def _qom_get(path: str, prop: str) -> tuple[str, dict[str, Any]]:
    return "qom-get", {"path": path, "property": prop}


STEPS: list[tuple[str, dict[str, Any]]] = [
    ("object-add", {"qom-type": "iothread", "id": "io0"}),
    # bad limits, each refused before the group joins /objects
    _group("bad", **{"x-bps-total": -1}),
    _group("bad", **{"x-bps-total": 5, "x-bps-read": 5}),
    _group("bad", **{"x-iops-total-max-length": 1 << 32}),
    _group("bad", limits={"iops-write-max-length": 1 << 32}),
    _group("bad", **{"x-bps-total-max-length": 0}),
    _group("bad", **{"x-iops-size": 10}),
    _group("bad", **{"x-bps-total": 10 ** 15 + 1}),
    _group("bad", limits={"bps-total": -4}),
    _group("bad", limits={"iops-read-max-length": 5}),
    _group("bad", limits={"bps-total": 1, "bps-total-max": 2, "bps-total-max-length": -1}),
    _group("bad", limits={"iops-total-max": 100}),
    _group("bad", limits={"bps-write": 200, "bps-write-max": 100}),
    # unknown properties and wrong types
    _group("bad", nope=1),
    _group("bad", limits={"nope": 1}),
    _group("bad", limits="x"),
    _group("bad", **{"x-bps-total": "x"}),
    _group("bad", limits={"iops-total": 1.5}),
    ("object-add", {"qom-type": "throttle-group"}),
    _group("io0"),
    # good groups, in both spellings
    _group("tg", limits={"iops-total": 100, "bps-read": 4096, "iops-size": 512}),
    _group("tg2", **{"x-iops-total": 50, "x-iops-total-max": 100,
                     "x-iops-total-max-length": 3}),
    ("qom-list", {"path": "/objects"}),
    ("qom-list", {"path": "/objects/tg"}),
    _qom_get("/objects/tg", "limits"),
    _qom_get("tg2", "limits"),
    _qom_get("tg", "x-bps-read"),
    _qom_get("/objects/tg", "nope"),
    _qom_get("/objects/nope", "limits"),
    ("qom-list-get", {"paths": ["/objects/tg2"]}),
    ("qom-list-properties", {"typename": "throttle-group"}),
    # qom-set of the limits: checked as a whole, refusals keep the old ones
    _qom_set("/objects/tg", "nope", 1),
    _qom_set("/objects/tg", "type", "x"),
    _qom_set("/objects/tg", "limits", "x"),
    _qom_set("/objects/tg", "limits", {"iops-total": "x"}),
    _qom_set("/objects/tg", "limits", {"nope": 5}),
    _qom_set("/objects/tg", "limits", {"bps-total": 5, "bps-read": 5}),
    _qom_set("/objects/tg", "limits", {"iops-total": 10, "iops-total-max": 5}),
    _qom_set("/objects/tg", "x-iops-total", 5),
    _qom_get("/objects/tg", "limits"),
    _qom_set("/objects/tg", "limits", {"iops-total": 200, "iops-total-max": 400}),
    _qom_get("/objects/tg", "limits"),
    # the filter: unknown group, missing options, a group in use
    ("blockdev-add", {"driver": "null-co", "node-name": "n0"}),
    ("blockdev-add", {"driver": "null-co", "node-name": "n1"}),
    _throttle("t0", **{"throttle-group": "nope", "file": "n0"}),
    _throttle("t0", **{"throttle-group": "io0", "file": "n0"}),
    _throttle("t0", file="n0"),
    _throttle("t0", **{"throttle-group": "tg"}),
    _throttle("t0", **{"throttle-group": 5, "file": "n0"}),
    _throttle("t0", **{"throttle-group": "tg", "file": "n0", "limits": {}}),
    _throttle("t0", **{"throttle-group": "tg", "file": "n0"}),
    _throttle("t1", **{"throttle-group": "tg", "file": "n1"}),
    ("query-named-block-nodes", {"flat": True}),
    ("query-named-block-nodes", {}),
    ("x-debug-query-block-graph", {}),
    ("object-del", {"id": "tg"}),
    ("blockdev-del", {"node-name": "t0"}),
    ("object-del", {"id": "tg"}),
    ("blockdev-del", {"node-name": "t1"}),
    ("object-del", {"id": "tg"}),
    ("object-del", {"id": "tg"}),
    # iothread properties while it runs
    _qom_set("/objects/io0", "poll-max-ns", -1),
    _qom_set("/objects/io0", "poll-max-ns", "x"),
    _qom_set("/objects/io0", "poll-weight", 64),
    _qom_set("/objects/io0", "thread-pool-min", 100),
    _qom_set("/objects/io0", "poll-max-ns", 50000),
    _qom_get("/objects/io0", "poll-max-ns"),
    ("qom-list-get", {"paths": ["/objects/io0"]}),
]


def play(argv: list[str], tmp: str) -> list[str]:
    return replay(argv, tmp, STEPS)


@pytest.fixture
def tmp() -> Iterator[str]:
    """A short private directory (the socket path must fit in 108 bytes)."""
    path = tempfile.mkdtemp(prefix="qsd-thrq-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_throttle_and_qom_match_qemu(tmp: str) -> None:
    golden = GOLDEN.read_text().splitlines()
    ours = play(QSD, tmp)
    assert len(ours) == len(golden)
    for step, (expected, got) in enumerate(zip(golden, ours, strict=True)):
        assert got == expected, (step, STEPS[step])


if __name__ == "__main__":
    if sys.argv[1:3] != ["--record", "--"] or len(sys.argv) < 4:
        sys.exit(f"usage: {sys.argv[0]} --record -- DAEMON [ARGS...]")
    directory = tempfile.mkdtemp(prefix="qsd-thrq-", dir="/tmp")
    try:
        GOLDEN.write_text("".join(line + "\n" for line in play(sys.argv[3:], directory)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
