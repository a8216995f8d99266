"""Fixtures shared by the tests."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Protocol

import pytest

from qsd.aio import set_main_context
from qsd.block.graph import BlockGraph
from tests.harness import Qsd, fuse_mounts

ROOT = Path(__file__).resolve().parent.parent
CEPH_PROGRAMS = ("ceph-mon", "ceph-mgr", "ceph-osd", "ceph", "rbd")


class QsdFactory(Protocol):
    def __call__(self, *args: str, monitor: bool = True, pretty: bool = False,
                 netns: str | None = None) -> Qsd: ...


@pytest.fixture
def start_qsd(tmp_path: Path) -> Iterator[QsdFactory]:
    """Starts qsd processes in ``tmp_path``; every one is stopped by PID at teardown."""
    started: list[Qsd] = []

    def start(*args: str, monitor: bool = True, pretty: bool = False,
              netns: str | None = None) -> Qsd:
        daemon = Qsd(tmp_path, list(args), monitor=monitor, pretty=pretty, netns=netns)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


@pytest.fixture
def fuse_dir() -> Iterator[Path]:
    """Images and mountpoints, outside pytest's shared basetemp: other pytest sessions on
    the machine rename old basetemp directories, which must not happen under a live mount.
    Whatever a failed test left mounted here is lazily unmounted."""
    path = Path(tempfile.mkdtemp(prefix="qsd-fuse-test-"))
    yield path
    for mount in fuse_mounts():
        if mount.startswith(f"{path}/"):
            subprocess.run(["umount", "-l", mount], check=False)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def graph() -> AsyncIterator[BlockGraph]:
    """A block graph of its own in the test's loop (the main context), closed at the end."""
    set_main_context(asyncio.get_running_loop())
    g = BlockGraph()
    yield g
    await g.close_all()


@dataclasses.dataclass(frozen=True)
class CephCluster:
    """A running test cluster: clients name ``conf``; the pool ``rbd`` exists."""

    conf: Path

    def rbd(self, *args: str) -> str:
        """Runs Ceph's rbd tool against the cluster; its stdout."""
        return subprocess.run(["rbd", "-c", str(self.conf), *args], check=True,
                              capture_output=True, text=True, timeout=120).stdout


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    """One single-node Ceph cluster for the session (scripts/ceph-test-cluster), where
    Debian's Ceph packages and Python bindings are installed; stopped by PID at the end."""
    missing = [name for name in CEPH_PROGRAMS if shutil.which(name) is None]
    missing += [name for name in ("rados", "rbd") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"Ceph is not installed here (missing {', '.join(missing)})")
    path = Path(tempfile.mkdtemp(prefix="qsd-ceph-", dir="/tmp"))
    script = ROOT / "scripts" / "ceph-test-cluster"
    try:
        subprocess.run([script, "start", path], check=True, timeout=300)
        yield CephCluster(path / "ceph.conf")
    finally:
        subprocess.run([script, "stop", path], check=False, timeout=120)
        shutil.rmtree(path, ignore_errors=True)
