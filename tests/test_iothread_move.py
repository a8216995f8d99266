"""Exports follow their node to another iothread (x-blockdev-set-iothread).

Which thread serves a client is read off the daemon's threads: a burst of requests to a
null-co node is answered inline by the thread that serves the connection, so that
thread's CPU time (``/proc/PID/task/TID/stat``) grows by far the most, and its name
(``comm``, the iothread's id) says which one it is.  CPU time, unlike wall time, does not
care how loaded the machine is.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import nbd
import pytest

from tests.conftest import QsdFactory
from tests.harness import Qsd, wait_for_listener, wait_for_mount
from tests.tls_certs import make_credentials

REQUESTS = 20000


def _thread_cpu(pid: int) -> dict[int, tuple[str, int]]:
    """Every thread's name and CPU time (utime + stime, clock ticks)."""
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except FileNotFoundError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        threads[int(tid)] = (name, int(fields[11]) + int(fields[12]))
    return threads


def serving_thread(pid: int, work: Callable[[], None]) -> str:
    """The name of the daemon thread that did (by far) most of the work of ``work()``."""
    before = _thread_cpu(pid)
    work()
    after = _thread_cpu(pid)
    deltas = sorted(((ticks - before.get(tid, (name, 0))[1], name)
                     for tid, (name, ticks) in after.items()), reverse=True)
    (top, name), (second, _) = deltas[0], deltas[1]
    assert top > 2 * second, f"no thread stands out: {deltas[:4]}"
    return name


def qmp(daemon: Qsd, command: str, **args: object) -> bytes:
    monitor = daemon.connect_raw()
    try:
        monitor.negotiate()
        return monitor.command(json.dumps({"execute": command, "arguments": args}).encode())
    finally:
        monitor.close()


def nbd_client(sock: Path, name: str, certs: Path | None) -> nbd.NBD:
    client = nbd.NBD()
    if certs is None:
        client.connect_uri(f"nbd+unix:///{name}?socket={sock}")
    else:
        client.set_uri_allow_local_file(True)
        client.connect_uri(f"nbds+unix:///{name}?socket={sock}&tls-certificates={certs}")
    return client


def reads(client: nbd.NBD) -> Callable[[], None]:
    def run() -> None:
        for i in range(REQUESTS):
            client.pread(4096, (i % 256) * 4096)
    return run


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_nbd_clients_follow_the_node(start_qsd: QsdFactory, tls: bool) -> None:
    """New clients attach in the node's new iothread; connected ones move there too,
    TLS sessions included."""
    sock_dir = Path(tempfile.mkdtemp(prefix="qsd-move-", dir="/tmp"))
    sock = sock_dir / "nbd.sock"
    try:
        args = ["--object", "iothread,id=io0", "--object", "iothread,id=io1",
                "--blockdev", "null-co,node-name=n0,size=1048576,read-zeroes=on",
                "--nbd-server", f"addr.type=unix,addr.path={sock}",
                "--export", "nbd,id=e0,node-name=n0,iothread=io0"]
        certs = None
        if tls:
            creds = make_credentials(sock_dir / "creds")
            certs = creds["client"]
            args[-3] += ",tls-creds=t0"
            args[:0] = ["--object",
                        f"tls-creds-x509,id=t0,dir={creds['server']},endpoint=server"]
        daemon = start_qsd(*args)
        wait_for_listener(sock, daemon.proc)
        old = nbd_client(sock, "n0", certs)
        try:
            assert serving_thread(daemon.pid, reads(old)) == "io0"
            assert qmp(daemon, "x-blockdev-set-iothread", iothread="io1", force=True,
                       **{"node-name": "n0"}) == b'{"return": {}}'
            new = nbd_client(sock, "n0", certs)
            try:
                assert serving_thread(daemon.pid, reads(new)) == "io1"
                assert serving_thread(daemon.pid, reads(old)) == "io1"
                assert new.pread(4096, 0) == bytes(4096)
            finally:
                new.shutdown()
            # io0 is free again: nothing runs there any more.
            assert qmp(daemon, "object-del", id="io0") == b'{"return": {}}'
            assert old.pread(512, 0) == bytes(512)
        finally:
            old.shutdown()
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/fuse"),
                    reason="FUSE export tests mount with mount(2) and need root and /dev/fuse")
def test_fuse_queue_follows_the_node(start_qsd: QsdFactory, fuse_dir: Path) -> None:
    mountpoint = fuse_dir / "n0.fuse"
    mountpoint.touch()
    daemon = start_qsd("--object", "iothread,id=io0", "--object", "iothread,id=io1",
                       "--blockdev", "null-co,node-name=n0,size=1048576,read-zeroes=on",
                       "--export", f"fuse,id=e0,node-name=n0,mountpoint={mountpoint},"
                                   "iothread=io0")
    wait_for_mount(mountpoint, daemon)

    def fuse_reads() -> None:
        fd = os.open(mountpoint, os.O_RDONLY)
        try:
            for i in range(REQUESTS):
                os.pread(fd, 4096, (i % 256) * 4096)
        finally:
            os.close(fd)

    assert serving_thread(daemon.pid, fuse_reads) == "io0"
    assert qmp(daemon, "x-blockdev-set-iothread", iothread="io1", force=True,
               **{"node-name": "n0"}) == b'{"return": {}}'
    assert serving_thread(daemon.pid, fuse_reads) == "io1"
    assert qmp(daemon, "object-del", id="io0") == b'{"return": {}}'
    with open(mountpoint, "rb") as f:
        assert f.read(4096) == bytes(4096)
