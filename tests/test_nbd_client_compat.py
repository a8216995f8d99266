"""The nbd block driver's options, errors and query output, byte for byte as QEMU 11.1.3.

``tests/golden/nbd_client_queries.txt`` holds 11.1.3's replies to ``steps()`` (one line
each, the temporary directory written as @TMP@). The daemon serves its own image over NBD
and opens it again with ``driver=nbd``: missing sockets and exports, refused ports,
TLS credentials that do not exist, meta contexts the server lacks, a read-only export
opened for writing (with and without auto-read-only), ``open-timeout`` against a closed
port, the filenames of unix and inet addresses (URI or json:), limits, and resizing.
(The raw node on top of an nbd node is not deleted: 11.1.3 hangs draining a client of its
own server there.) It
was recorded by running this file as a script against QEMU's daemon::

    python3 tests/test_nbd_client_compat.py --record -- qemu-storage-daemon
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import replay  # noqa: E402
from tests.test_block_compat import normalise  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "nbd_client_queries.txt"


def steps(tmp: str) -> list[tuple[str, dict[str, object]]]:
    sock = f"{tmp}/nbd.sock"
    unix = {"type": "unix", "path": sock}
    return [
        ("blockdev-add", {"driver": "file", "node-name": "f", "filename": f"{tmp}/img.raw"}),
        ("nbd-server-start", {"addr": {"type": "unix", "data": {"path": sock}}}),
        ("block-export-add", {"type": "nbd", "id": "w", "node-name": "f", "writable": True}),
        ("block-export-add", {"type": "nbd", "id": "r", "node-name": "f", "name": "ro"}),
        ("blockdev-add", {"driver": "nbd", "node-name": "c1", "server": unix, "export": "f"}),
        ("blockdev-add", {"driver": "nbd", "node-name": "e1",
                          "server": {"type": "unix", "path": f"{tmp}/none.sock"}}),
        ("blockdev-add", {"driver": "nbd", "node-name": "e2", "server": unix,
                          "export": "zz"}),
        ("blockdev-add", {"driver": "nbd", "node-name": "e3", "server": unix}),
        ("blockdev-add", {"driver": "nbd", "node-name": "e4",
                          "server": {"type": "inet", "host": "127.0.0.1", "port": "1"}}),
        ("blockdev-add", {"driver": "nbd", "node-name": "e5", "server": unix, "export": "f",
                          "tls-creds": "nope"}),
        ("blockdev-add", {"driver": "nbd", "node-name": "e6", "server": unix, "export": "f",
                          "x-dirty-bitmap": "qemu:dirty-bitmap:b0"}),
        ("blockdev-add", {"driver": "nbd", "node-name": "e7", "server": unix, "export": "ro"}),
        ("blockdev-add", {"driver": "nbd", "node-name": "e8", "server": unix,
                          "export": "f" * 4097}),
        ("blockdev-add", {"driver": "nbd", "node-name": "e9",
                          "server": {"type": "inet", "host": "127.0.0.1", "port": "1"},
                          "open-timeout": 1}),
        ("blockdev-add", {"driver": "nbd", "node-name": "e10", "server": unix,
                          "reconnect-delay": -1}),
        ("blockdev-add", {"driver": "nbd", "node-name": "e11", "server": {"type": "unix"}}),
        ("blockdev-add", {"driver": "nbd", "node-name": "c2", "server": unix, "export": "ro",
                          "auto-read-only": True, "reconnect-delay": 5, "open-timeout": 3}),
        ("blockdev-add", {"driver": "nbd", "node-name": "c3", "server": unix, "export": "ro",
                          "read-only": True}),
        ("blockdev-add", {"driver": "raw", "node-name": "c4",
                          "file": {"driver": "nbd", "server": unix, "export": "f"}}),
        ("query-named-block-nodes", {}),
        ("block_resize", {"node-name": "c1", "size": 1048576}),
        ("block_resize", {"node-name": "c1", "size": 134217728}),
        ("blockdev-del", {"node-name": "c1"}),
        ("blockdev-del", {"node-name": "c2"}),
        ("blockdev-del", {"node-name": "c3"}),
        ("query-named-block-nodes", {"flat": True}),
    ]


@pytest.fixture
def tmp() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="qsd-nbdc-", dir="/tmp")
    with open(os.path.join(path, "img.raw"), "wb") as f:
        f.truncate(4 << 20)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_nbd_client_matches_qemu(tmp: str) -> None:
    from tests.harness import QSD

    golden = GOLDEN.read_text().splitlines()
    ours = [normalise(line, tmp) for line in replay(QSD, tmp, steps(tmp))]
    assert len(ours) == len(golden)
    for step, (expected, got) in enumerate(zip(golden, ours, strict=True)):
        assert got == expected, (step, steps(tmp)[step][0])


if __name__ == "__main__":
    if sys.argv[1:2] != ["--record"] or sys.argv[2:3] != ["--"]:
        sys.exit(__doc__)
    directory = tempfile.mkdtemp(prefix="qsd-nbdc-", dir="/tmp")
    try:
        with open(os.path.join(directory, "img.raw"), "wb") as image:
            image.truncate(4 << 20)
        replies = replay(sys.argv[3:], directory, steps(directory))
        GOLDEN.write_text("".join(normalise(line, directory) + "\n" for line in replies))
    finally:
        shutil.rmtree(directory, ignore_errors=True)
