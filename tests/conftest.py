"""Fixtures shared by the tests."""

from __future__ import annotations

import asyncio
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


class QsdFactory(Protocol):
    def __call__(self, *args: str, monitor: bool = True, pretty: bool = False) -> Qsd: ...


@pytest.fixture
def start_qsd(tmp_path: Path) -> Iterator[QsdFactory]:
    """Starts qsd processes in ``tmp_path``; every one is stopped by PID at teardown."""
    started: list[Qsd] = []

    def start(*args: str, monitor: bool = True, pretty: bool = False) -> Qsd:
        daemon = Qsd(tmp_path, list(args), monitor=monitor, pretty=pretty)
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
