"""Leak counters of a running daemon, for the stress tests and the fuzzers.

A daemon started with ``Qsd(..., probe=True)`` is measured from outside (its fds in
/proc/PID/fd, its threads in /proc/PID/task, its resident memory, the FUSE mounts under
its directories) and from inside (its asyncio tasks and which threads are the I/O pool's,
tests/leak_probe.py).  The pool starts a worker when all are busy and keeps it: those
may grow up to the pool's size; every other thread is counted.  A test
measures once its workload has warmed up (first imports, first buffers), runs it, and
calls ``assert_no_leaks``: everything but memory must come back to the same count (work
that is still ending, a connection being torn down, gets time to finish; none may end
higher), and memory may not grow by more than a fraction.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import time
from typing import Any

from qsd.block.node import POOL_WORKERS
from tests.harness import Qsd, fuse_mounts

# Resident memory may grow this much over a run (the bound: 5% after warm-up).
RSS_GROWTH = 0.05


@dataclasses.dataclass(frozen=True)
class Counters:
    fds: int
    threads: int                 # but the I/O pool's workers
    mounts: int
    tasks: int
    rss_kib: int
    pool_threads: int            # started when needed, up to POOL_WORKERS, and kept
    pending: dict[str, int] = dataclasses.field(compare=False)

    def counts(self) -> tuple[int, int, int, int]:
        return self.fds, self.threads, self.mounts, self.tasks

    def within(self, before: Counters) -> bool:
        """No count grew (one may be lower: a request in flight when ``before`` was
        taken)."""
        return all(a <= b for a, b in zip(self.counts(), before.counts(), strict=True))

    def figures(self) -> dict[str, Any]:
        return {"fds": self.fds, "threads": self.threads, "io_pool_threads": self.pool_threads,
                "fuse_mounts": self.mounts, "asyncio_tasks": self.tasks,
                "rss_kib": self.rss_kib}


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _probe(qsd: Qsd) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(qsd.probe_path))
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    answer: dict[str, Any] = json.loads(data)
    return answer


def measure(qsd: Qsd) -> Counters:
    """The daemon's counters now (its probe's connection is closed before the fds are
    counted)."""
    assert qsd.proc.poll() is None, qsd.read_stderr()
    inside = _probe(qsd)
    pid = qsd.pid
    mounts = sum(m.startswith((f"{qsd.workdir}/", f"{qsd.sock_dir}/")) for m in fuse_mounts())
    pool = sum(name.startswith("qsd-io") for name in inside["threads"])
    return Counters(fds=len(os.listdir(f"/proc/{pid}/fd")),
                    threads=len(os.listdir(f"/proc/{pid}/task")) - pool, mounts=mounts,
                    tasks=inside["tasks"], rss_kib=_rss_kib(pid), pool_threads=pool,
                    pending=inside["pending"])


def settled(qsd: Qsd, timeout: float = 10.0) -> Counters:
    """The counters once they hold still (two readings 0.2 s apart agree): the baseline
    to compare with, taken after what the warm-up started (a connection's handler, a
    request's task) has ended."""
    deadline = time.monotonic() + timeout
    last = measure(qsd)
    while True:
        time.sleep(0.2)
        now = measure(qsd)
        if now.counts() == last.counts() or time.monotonic() > deadline:
            return now
        last = now


def assert_no_leaks(qsd: Qsd, before: Counters, timeout: float = 30.0) -> Counters:
    """Waits (up to ``timeout``) for every count to come back to ``before``'s; then
    checks memory.  Returns the last measurement."""
    deadline = time.monotonic() + timeout
    while True:
        after = measure(qsd)
        if after.within(before) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert after.within(before), (
        f"leak: before {before.figures()} after {after.figures()}; "
        f"unfinished tasks before {before.pending} after {after.pending}")
    assert after.pool_threads <= POOL_WORKERS, after.figures()
    limit = before.rss_kib * (1 + RSS_GROWTH)
    assert after.rss_kib <= limit, \
        f"memory grew from {before.rss_kib} KiB to {after.rss_kib} KiB (over {RSS_GROWTH:.0%})"
    return after
