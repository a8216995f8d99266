"""IOThread: own thread and loop, named after its id, refcounted users, clean stop."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from qsd.iothread import IOThread, iothread_of


async def _where() -> str:
    return threading.current_thread().name


def test_iothread_runs_and_stops() -> None:
    t = IOThread.spawn("io-test", poll_max_ns=0)
    try:
        assert t.ctx.run(_where()).result(5) == "io-test"
        assert Path(f"/proc/self/task/{t.thread_id}/comm").read_text().strip() == "io-test"
        assert iothread_of(t.ctx) is t and t.poll_max_ns == 0
        assert not t.in_use()
        t.ref()
        assert t.in_use()
        t.unref()
        assert not t.in_use()
    finally:
        t.stop()
    assert not t.ctx.thread.is_alive()
    assert iothread_of(t.ctx) is None


async def test_ctx_call_from_main_loop() -> None:
    t = IOThread.spawn("io-call")
    try:
        assert await t.ctx.call(_where()) == "io-call"
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        t.ctx.call_soon(loop.call_soon_threadsafe, done.set)
        await asyncio.wait_for(done.wait(), 5)
    finally:
        t.stop()
