"""Leaky buckets (qsd.throttle) with a clock the test drives, and the throttle group's
scheduler with real time in real loops: rates, fairness between members, drain."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from qsd.aio import AioContext, set_main_context
from qsd.block.throttle_groups import ThrottleGroup, ThrottleGroupMember
from qsd.errors import QMPError
from qsd.iothread import IOThread
from qsd.qom.model import Container
from qsd.throttle import NANOSECONDS_PER_SECOND, ThrottleConfig, ThrottleState

SECOND = NANOSECONDS_PER_SECOND


def state(**limits: int) -> ThrottleState:
    cfg = ThrottleConfig()
    cfg.apply_limits(limits)
    throttle = ThrottleState()
    throttle.configure(cfg, 0)
    return throttle


def run_for(throttle: ThrottleState, is_write: bool, size: int, seconds: float) -> int:
    """Requests that start within ``seconds`` when each goes as soon as it may."""
    now = started = 0
    while True:
        now += throttle.compute_wait(is_write, now)
        if now >= seconds * SECOND:
            return started
        throttle.account(is_write, size)
        started += 1


def test_average_rate() -> None:
    # A tenth of a second's worth may go at once, then the average holds.
    assert run_for(state(**{"iops-total": 100}), False, 4096, 10) == pytest.approx(1010, abs=2)
    assert run_for(state(**{"bps-write": 1 << 20}), True, 4096, 10) == pytest.approx(
        10 * 256 + 26, abs=2)
    # Reads neither wait for a write limit nor count against it.
    throttle = state(**{"bps-write": 1 << 20})
    for _ in range(10000):
        throttle.account(False, 1 << 20)
    assert throttle.compute_wait(False, 1) == 0 and throttle.compute_wait(True, 2) == 0


def test_burst_then_average() -> None:
    """iops-total-max=1000 for 2 s on top of 100/s: a burst of 2000 operations runs at
    the burst rate; after it, what leaks at the average rate."""
    throttle = state(**{"iops-total": 100, "iops-total-max": 1000,
                        "iops-total-max-length": 2})
    first = run_for(throttle, False, 512, 2)
    assert first == pytest.approx(2000, rel=0.06)
    throttle = state(**{"iops-total": 100, "iops-total-max": 1000,
                        "iops-total-max-length": 2})
    assert run_for(throttle, False, 512, 12) == pytest.approx(2000 + 100 * 12, rel=0.02)


def test_iops_size_counts_large_requests_as_several() -> None:
    small = run_for(state(**{"iops-total": 100, "iops-size": 4096}), False, 4096, 10)
    large = run_for(state(**{"iops-total": 100, "iops-size": 4096}), False, 16384, 10)
    assert large == pytest.approx(small / 4, rel=0.05)


def test_validation_keeps_the_old_configuration() -> None:
    cfg = ThrottleConfig()
    cfg.apply_limits({"bps-total": 10})
    with pytest.raises(QMPError, match="cannot be used at the same time"):
        trial = cfg.copy()
        trial.apply_limits({"bps-read": 5})
    assert cfg.limits()["bps-read"] == 0 and cfg.limits()["bps-total"] == 10


@pytest.fixture
def iothreads() -> Iterator[list[IOThread]]:
    threads = [IOThread.spawn("thr-a"), IOThread.spawn("thr-b")]
    yield threads
    for thread in threads:
        thread.stop()


def make_group(name: str, **limits: int) -> tuple[Container[ThrottleGroup], ThrottleGroup]:
    objects: Container[ThrottleGroup] = Container()
    group = ThrottleGroup()
    objects.add_child(name, group)
    group.complete()
    group.set_limits(limits)
    return objects, group


async def hammer(member: ThrottleGroupMember, ctx: AioContext, is_write: bool, size: int,
                 seconds: float, depth: int = 8) -> list[float]:
    """``depth`` requests at a time for ``seconds`` in ``ctx``; returns when each
    request was let through."""
    starts: list[float] = []

    async def worker(deadline: float) -> None:
        while time.monotonic() < deadline:
            await member.intercept(size, is_write)
            starts.append(time.monotonic())

    async def all_workers() -> None:
        deadline = time.monotonic() + seconds
        await asyncio.gather(*(worker(deadline) for _ in range(depth)))

    await ctx.call(all_workers())
    return starts


def within(starts: list[float], begin: float, seconds: float) -> int:
    return sum(begin <= t < begin + seconds for t in starts)


async def test_members_share_the_budget_fairly(iothreads: list[IOThread]) -> None:
    """Two members in different iothreads, both saturating: each gets about half of the
    group's 200 operations per second, and together no more than the limit."""
    set_main_context(asyncio.get_running_loop())
    objects, group = make_group("tg-fair", **{"iops-total": 200})
    members = [group.register(thread.ctx) for thread in iothreads]
    starts = await asyncio.gather(*(hammer(member, thread.ctx, False, 512, 2.5)
                                    for member, thread in zip(members, iothreads, strict=True)))
    for member in members:
        group.unregister(member)
    objects.remove_child("tg-fair").finalize()
    # Over the 2 s after both started: the bucket lets a tenth of a second's worth
    # through at once, then 200/s.
    begin = max(min(times) for times in starts)
    counts = [within(times, begin, 2.0) for times in starts]
    assert sum(counts) <= 20 + 2 * 200 + 1, counts
    assert sum(counts) >= 0.5 * 2 * 200, counts
    assert min(counts) >= 0.4 * sum(counts), counts


async def test_writes_and_reads_have_their_own_queues(iothreads: list[IOThread]) -> None:
    set_main_context(asyncio.get_running_loop())
    objects, group = make_group("tg-rw", **{"iops-write": 50})
    member = group.register(iothreads[0].ctx)
    writes, reads = await asyncio.gather(
        hammer(member, iothreads[0].ctx, True, 512, 1.0),
        hammer(member, iothreads[0].ctx, False, 512, 1.0, depth=1))
    group.unregister(member)
    objects.remove_child("tg-rw").finalize()
    assert within(writes, min(writes), 1.0) <= 5 + 50 + 1
    assert len(reads) > 10 * len(writes)


async def test_drain_lets_held_requests_go(iothreads: list[IOThread]) -> None:
    """With limits disabled (drain), requests waiting for a far-off turn start at once;
    new limits reconsider the ones still waiting."""
    set_main_context(asyncio.get_running_loop())
    objects, group = make_group("tg-drain", **{"iops-total": 1})
    ctx = iothreads[0].ctx
    member = group.register(ctx)

    async def start_many(count: int) -> list[asyncio.Future[None]]:
        return [asyncio.ensure_future(member.intercept(512, False)) for _ in range(count)]

    async def done(futures: list[asyncio.Future[None]]) -> int:
        await asyncio.sleep(0.2)
        return sum(f.done() for f in futures)

    futures = await ctx.call(start_many(5))
    assert await ctx.call(done(futures)) == 1     # the first goes, the rest wait ~1 s each
    member.disable_limits()
    assert await ctx.call(done(futures)) == 5
    member.enable_limits()
    more = await ctx.call(start_many(3))
    assert await ctx.call(done(more)) == 0
    group.set_limits({"iops-total": 1000})
    assert await ctx.call(done(more)) == 3
    group.unregister(member)
    objects.remove_child("tg-drain").finalize()


async def test_a_cancelled_request_passes_its_turn_on(iothreads: list[IOThread]) -> None:
    set_main_context(asyncio.get_running_loop())
    objects, group = make_group("tg-cancel", **{"iops-total": 5})
    ctx = iothreads[0].ctx
    member = group.register(ctx)

    async def scenario() -> bool:
        first = asyncio.ensure_future(member.intercept(512, False))
        waiting = [asyncio.ensure_future(member.intercept(512, False)) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert first.done() and not any(f.done() for f in waiting)
        waiting[0].cancel()
        await asyncio.wait_for(waiting[1], 2)
        return not member.has_waiting()

    assert await ctx.call(scenario())
    group.unregister(member)
    objects.remove_child("tg-cancel").finalize()


def test_group_in_use_cannot_be_deleted(iothreads: list[IOThread]) -> None:
    objects, group = make_group("tg-use")
    member = group.register(iothreads[0].ctx)
    with pytest.raises(QMPError, match="Cannot delete throttle group 'tg-use' with active "
                                       "references"):
        group.check_delete()
    group.unregister(member)
    group.check_delete()
    objects.remove_child("tg-use").finalize()
