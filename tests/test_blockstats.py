"""query-blockstats through a real daemon: what QEMU 11.1.3's daemon reports after I/O
through an NBD export (its numbers were recorded from the same workload)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import QsdFactory
from tests.harness import Monitor

WORKLOAD = ("write -P 0xaa 0 64k", "write -z 1M 64k", "discard 0 64k", "write -P 1 3M 4k",
            "read 0 128k", "flush")


def test_blockstats_after_nbd_io(start_qsd: QsdFactory, tmp_path: Path) -> None:
    image, sock = tmp_path / "r.img", tmp_path / "nbd.sock"
    image.write_bytes(bytes(4 << 20))
    qmp = Monitor(start_qsd(
        "--blockdev", f"file,node-name=f0,filename={image},discard=unmap",
        "--blockdev", "raw,node-name=r0,file=f0,discard=unmap",
        "--nbd-server", f"addr.type=unix,addr.path={sock}",
        "--export", "nbd,id=e0,node-name=r0,writable=on,name=e0"))
    assert qmp.ok("query-blockstats") == []
    assert qmp.ok("query-blockstats", **{"query-nodes": False}) == []
    before = qmp.ok("query-blockstats", **{"query-nodes": True})
    assert [s["stats"]["wr_highest_offset"] for s in before] == [0, 0]
    for command in WORKLOAD:
        subprocess.run(["qemu-io", "-f", "raw", "-c", command,
                        f"nbd+unix:///e0?socket={sock}"], check=True, capture_output=True)
    file_stats, raw_stats = qmp.ok("query-blockstats", **{"query-nodes": True})
    counters = {k: v for k, v in file_stats["stats"].items()
                if k not in ("wr_highest_offset", "account_invalid", "account_failed",
                             "timed_stats")}
    assert set(counters.values()) == {0} and len(counters) == 28
    assert file_stats["stats"]["timed_stats"] == []
    assert file_stats["node-name"] == "f0"
    assert file_stats["stats"]["wr_highest_offset"] == (3 << 20) + 4096
    assert file_stats["driver-specific"] == {"driver": "file", "discard-nb-ok": 1,
                                             "discard-nb-failed": 0,
                                             "discard-bytes-ok": 65536}
    assert "parent" not in file_stats
    assert raw_stats["node-name"] == "r0"
    assert raw_stats["stats"]["wr_highest_offset"] == (3 << 20) + 4096
    assert "driver-specific" not in raw_stats
    assert raw_stats["parent"] == file_stats
