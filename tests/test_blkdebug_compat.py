"""The blkdebug driver's options, errors and query output, byte for byte as QEMU 11.1.3's
daemon answers: limits and their constraint errors, QemuOpts range errors, rules given as
options and in a config file (its syntax errors included), permissions taken and unshared,
and the filenames, limits and graph the queries show.

``tests/golden/blkdebug.txt`` holds 11.1.3's replies to ``steps()``, one line each, with
the test's directory written as ``$TMP``. It was recorded against QEMU's daemon::

    python3 -m tests.test_blkdebug_compat --record -- qemu-storage-daemon
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

GOLDEN = Path(__file__).parent / "golden" / "blkdebug.txt"
Step = tuple[str, dict[str, Any]]

CONFIGS = {
    "rules.conf": '[inject-error]\nevent = "read_aio"\nerrno = "28"\nonce = "on"\n\n'
                  '# a comment\n[set-state]\nevent = "write_aio"\nstate = "1"\n'
                  'new_state = "2"\n',
    "bad-event.conf": '[inject-error]\nevent = "nope"\n',
    "no-event.conf": '[inject-error]\nerrno = "5"\n',
    "no-equals.conf": "[inject-error]\nevent read_aio\n",
    "unknown-key.conf": '[inject-error]\nevent = "read_aio"\nbogus = "1"\n',
    "unknown-group.conf": '[nope]\nevent = "read_aio"\n',
    "bad-number.conf": '[inject-error]\nevent = "read_aio"\nerrno = "5x"\n',
    "bad-bool.conf": '[inject-error]\nevent = "read_aio"\nonce = "maybe"\n',
    "bad-iotype.conf": '[inject-error]\nevent = "read_aio"\niotype = "nope"\n',
    "no-group.conf": 'event = "read_aio"\n',
    "blank.conf": "[set-state]\n   \n",
}


def steps(workdir: str) -> list[Step]:
    for name, text in CONFIGS.items():
        Path(workdir, name).write_text(text)
    count = 0

    def blkdebug(name: str, **options: Any) -> list[Step]:
        """A blkdebug node over a null-co node of its own."""
        nonlocal count
        count += 1
        image = f"i{count}"
        return [("blockdev-add", {"driver": "null-co", "node-name": image, "size": 1 << 20}),
                ("blockdev-add", {"driver": "blkdebug", "node-name": name, "image": image,
                                  **options})]

    def config(name: str) -> str:
        return str(Path(workdir, name))

    groups = [
        blkdebug("b1", align=4096, **{"max-transfer": 65536, "opt-write-zero": 8192,
                                      "max-write-zero": 16384, "opt-discard": 4096,
                                      "max-discard": 1 << 20}),
        blkdebug("b2", **{"inject-error": [{"event": "read_aio", "errno": 5, "sector": 8,
                                             "once": True}],
                          "set-state": [{"event": "write_aio", "new_state": 2}]}),
        blkdebug("b3", config=config("rules.conf")),
        [("blockdev-add", {"driver": "null-co", "node-name": "plain"}),
         ("blockdev-add", {"driver": "blkdebug", "node-name": "b4", "image": "plain"}),
         ("blockdev-add", {"driver": "blkdebug", "node-name": "b5", "image": "plain",
                           "config": config("rules.conf")}),
         ("blockdev-add", {"driver": "raw", "node-name": "r0", "file": "b2"}),
         ("blockdev-add", {"driver": "blkdebug", "node-name": "b6", "image": "b4",
                           "align": 0})],
        blkdebug("e1", align=3),
        blkdebug("e2", align=1 << 31),
        blkdebug("e3", align=-1),
        blkdebug("e4", align=512, **{"max-transfer": 1000}),
        blkdebug("e5", **{"max-transfer": 1 << 31}),
        blkdebug("e6", **{"max-transfer": -512}),
        blkdebug("e7", **{"opt-write-zero": 100}),
        blkdebug("e8", **{"opt-write-zero": 1024, "max-write-zero": 1536}),
        blkdebug("e9", **{"opt-discard": 100}),
        blkdebug("e10", **{"opt-discard": 1024, "max-discard": 1536}),
        blkdebug("e11", **{"inject-error": [{"event": "nope"}]}),
        blkdebug("e12", **{"inject-error": [{"errno": 5}]}),
        blkdebug("e13", **{"inject-error": [{"event": "read_aio", "iotype": "x"}]}),
        blkdebug("e14", **{"inject-error": [{"event": "read_aio", "errno": -5}]}),
        blkdebug("e15", **{"inject-error": [{"event": "read_aio", "sector": -2}]}),
        blkdebug("e16", **{"inject-error": [{"event": "read_aio", "state": -1}]}),
        blkdebug("e17", **{"set-state": [{"event": "read_aio"}]}),
        blkdebug("e18", **{"set-state": [{"event": "read_aio", "new_state": -3}]}),
        blkdebug("e19", config=config("missing.conf")),
        *(blkdebug(f"c{i}", config=config(name)) for i, name in enumerate(CONFIGS)),
        [("blockdev-add", {"driver": "blkdebug", "node-name": "e25"})],
        blkdebug("e26", image="nope"),
        blkdebug("e27", **{"take-child-perms": ["resize"]}),
        blkdebug("e28", **{"unshare-child-perms": ["write"]}),
        blkdebug("e29", align=65536, **{"max-transfer": 4096}),
        blkdebug("e30", **{"inject-error": [{"event": "read_aio", "delay-ns": -1}]}),
        blkdebug("e31", config=config("rules.conf"),
                 **{"inject-error": [{"event": "read_aio", "errno": 5, "iotype": "flush",
                                      "immediately": False}]}),
        [("query-named-block-nodes", {"flat": True}),
         ("query-named-block-nodes", {}),
         ("x-debug-query-block-graph", {}),
         ("blockdev-del", {"node-name": "b6"}),
         ("blockdev-del", {"node-name": "b4"}),
         ("blockdev-del", {"node-name": "plain"}),
         ("blockdev-del", {"node-name": "b5"}),
         ("blockdev-del", {"node-name": "plain"})],
    ]
    return [step for group in groups for step in group]


def play(argv: list[str], workdir: str) -> list[str]:
    return [line.replace(workdir, "$TMP") for line in replay(argv, workdir, steps(workdir))]


@pytest.fixture
def tmp() -> Iterator[str]:
    """A short private directory (the socket path must fit in 108 bytes)."""
    path = tempfile.mkdtemp(prefix="qsd-bdq-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_blkdebug_matches_qemu(tmp: str) -> None:
    golden = GOLDEN.read_text().splitlines()
    ours = play(QSD, tmp)
    assert len(ours) == len(golden)
    for step, (expected, got) in enumerate(zip(golden, ours, strict=True)):
        assert got == expected, (step, steps(tmp)[step])


if __name__ == "__main__":
    if sys.argv[1:3] != ["--record", "--"] or len(sys.argv) < 4:
        sys.exit(f"usage: {sys.argv[0]} --record -- DAEMON [ARGS...]")
    directory = tempfile.mkdtemp(prefix="qsd-bdq-", dir="/tmp")
    try:
        GOLDEN.write_text("".join(line + "\n" for line in play(sys.argv[3:], directory)))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
