"""Fixtures shared by the whole-daemon tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import pytest

from tests.harness import Qsd


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
