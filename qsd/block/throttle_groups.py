"""throttle-group objects and the members that share them (QEMU's block/throttle-groups.c).

A group holds one set of leaky buckets (``qsd.throttle``); every throttle node naming the
group is a member, and each request a member makes is let through, or held back, against
the group's buckets. Members take turns: per direction (reads, writes) one member holds
the token, and when the budget allows the next request the token passes round-robin to
the next member with requests waiting, so nodes sharing a group share its budget fairly
however many requests each one queues.

Members live in different AioContexts (iothreads), so the group has a lock of its own.
A held-back request awaits a future in the loop it was made from; the timer that lets
the next one go runs in the member's context, and any thread may arm it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from qsd import qapi
from qsd.aio import AioContext
from qsd.errors import QMPError
from qsd.qom.model import Property, QOMObject
from qsd.throttle import LIMIT_NAMES, UINT_MAX, Bucket, ThrottleState

READ, WRITE = 0, 1

# The groups that completed, by name: throttle nodes find their group here.
_groups: dict[str, ThrottleGroup] = {}


def find_group(name: str) -> ThrottleGroup | None:
    return _groups.get(name)


class _Timer:
    """A one-shot timer that fires in its member's context and that any thread may arm
    or cancel while holding the group's lock; a stale firing is recognised by its
    generation and ignored."""

    def __init__(self, fire: Callable[[int], None]) -> None:
        self._fire = fire
        self.generation = 0
        self.deadline: int | None = None

    @property
    def pending(self) -> bool:
        return self.deadline is not None

    def arm(self, ctx: AioContext, deadline_ns: int) -> None:
        self.generation += 1
        self.deadline = deadline_ns
        generation = self.generation
        if ctx.in_this_thread():
            self._schedule(ctx, generation, deadline_ns)
        else:
            ctx.call_soon(self._schedule, ctx, generation, deadline_ns)

    def _schedule(self, ctx: AioContext, generation: int, deadline_ns: int) -> None:
        delay = max(deadline_ns - time.monotonic_ns(), 0) / 1e9
        ctx.loop.call_later(delay, self._fire, generation)

    def cancel(self) -> None:
        self.generation += 1
        self.deadline = None


class _Waiter:
    """A request held back, in the loop (and so the thread) that made it."""

    __slots__ = ("loop", "thread", "future")

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.thread = threading.get_ident()
        self.future: asyncio.Future[None] = self.loop.create_future()

    def wake(self) -> None:
        if threading.get_ident() == self.thread:
            _resolve(self.future)
        else:
            self.loop.call_soon_threadsafe(_resolve, self.future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ThrottleGroupMember:
    """One throttle node's place in its group: its queues of held-back requests, one
    per direction, and the timers that release them in the node's context."""

    def __init__(self, group: ThrottleGroup, ctx: AioContext) -> None:
        self.group: ThrottleGroup | None = group
        self.ctx = ctx
        self.queues: tuple[deque[_Waiter], deque[_Waiter]] = (deque(), deque())
        # Requests that wait or were woken and have not started yet (QEMU's pending_reqs).
        self.pending = [0, 0]
        self.timers = (_Timer(lambda gen: group.timer_fired(self, READ, gen)),
                       _Timer(lambda gen: group.timer_fired(self, WRITE, gen)))
        # While drained, limits do not apply to this member (QEMU's io_limits_disabled).
        self.limits_disabled = 0

    async def intercept(self, size: int, is_write: bool) -> None:
        """Returns when a request of ``size`` bytes may start; counts it then."""
        group = self.group
        assert group is not None
        await group.intercept(self, size, WRITE if is_write else READ)

    def disable_limits(self) -> None:
        """Drain begins: let every held-back request go now, and new ones at once."""
        assert self.group is not None
        with self.group.lock:
            self.limits_disabled += 1
            first = self.limits_disabled == 1
        if first:
            self.group.restart(self)

    def enable_limits(self) -> None:
        assert self.group is not None
        with self.group.lock:
            self.limits_disabled -= 1

    def has_waiting(self) -> bool:
        return bool(self.pending[READ] or self.pending[WRITE])


def _created_only(group: ThrottleGroup) -> None:
    if group.initialized:
        raise QMPError("Property cannot be set after initialization")


def _legacy_property(name: str, bucket: Bucket | None, field: str) -> Property:
    """One ``x-`` property: readable at any time, settable only while the group is
    being created (QEMU wants limits changed together, through ``limits``)."""
    def get(group: ThrottleGroup) -> int:
        with group.lock:
            cfg = group.state.config()
        value: int = cfg.op_size if bucket is None else getattr(cfg[bucket], field)
        return value

    def set_(group: ThrottleGroup, value: int) -> None:
        if value < 0:
            raise QMPError("Property values cannot be negative")
        if bucket is None:
            group.state.cfg.op_size = value
            return
        if field == "burst_length" and value > UINT_MAX:
            raise QMPError(f"{name} value must be in therange [0, {UINT_MAX}]")
        setattr(group.state.cfg[bucket], field, value)

    return Property(name, "int", get=get, set=set_, guard=_created_only)


def _properties() -> tuple[Property, ...]:
    """In the order QEMU's class_init adds them: x-iops-*, x-bps-*, x-iops-size, limits."""
    props = []
    by_name = {name: bucket for bucket, name in LIMIT_NAMES.items()}
    for kind in ("iops", "bps"):
        for direction in ("total", "read", "write"):
            bucket = by_name[f"{kind}-{direction}"]
            for suffix, field in (("", "avg"), ("-max", "max"), ("-max-length", "burst_length")):
                props.append(_legacy_property(f"x-{kind}-{direction}{suffix}", bucket, field))
    props.append(_legacy_property("x-iops-size", None, "op_size"))

    def get_limits(group: ThrottleGroup) -> dict[str, int]:
        return group.limits()

    def set_limits(group: ThrottleGroup, limits: Any) -> None:
        group.set_limits(qapi.to_wire(limits))

    props.append(Property("limits", "ThrottleLimits", get=get_limits, set=set_limits))
    return tuple(props)


class ThrottleGroup(QOMObject, qom_type="throttle-group", properties=_properties(),
                    interfaces=("user-creatable",)):
    """``--object throttle-group,id=X,limits.bps-total=...``: the group is named by its
    id. Limits are set with ``limits`` at any time (qom-set applies them to the I/O
    being throttled at once) or, only while the object is created, with the legacy
    ``x-`` properties, one per limit."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state = ThrottleState()
        self.initialized = False
        # Round-robin order: newest member first (QEMU's QLIST_INSERT_HEAD).
        self.members: list[ThrottleGroupMember] = []
        # Per direction: the member whose turn it is, and whether a timer is armed.
        self.tokens: list[ThrottleGroupMember | None] = [None, None]
        self.any_timer_armed = [False, False]

    # -- the QOM object --------------------------------------------------------------

    def complete(self) -> None:
        if self.id in _groups:
            raise QMPError("A group with this name already exists")
        cfg = self.state.config()
        cfg.check()
        self.state.configure(cfg, time.monotonic_ns())
        _groups[self.id] = self
        self.initialized = True

    def check_delete(self) -> None:
        if self.members:
            raise QMPError(f"Cannot delete throttle group '{self.id}' with active "
                           "references")

    def finalize(self) -> None:
        if _groups.get(self.id) is self:
            del _groups[self.id]

    def limits(self) -> dict[str, int]:
        with self.lock:
            return self.state.config().limits()

    def set_limits(self, limits: dict[str, int]) -> None:
        """Validates the whole new configuration before any of it applies; requests
        held back under the old limits are reconsidered under the new ones at once."""
        with self.lock:
            cfg = self.state.config()
            cfg.apply_limits(limits)
            self.state.configure(cfg, time.monotonic_ns())
            members = list(self.members)
        for member in members:
            self.restart(member)

    # -- members ---------------------------------------------------------------------

    def register(self, ctx: AioContext) -> ThrottleGroupMember:
        member = ThrottleGroupMember(self, ctx)
        with self.lock:
            for direction in (READ, WRITE):
                if self.tokens[direction] is None:
                    self.tokens[direction] = member
            self.members.insert(0, member)
        return member

    def unregister(self, member: ThrottleGroupMember) -> None:
        """The member must have no requests held back (it was drained)."""
        with self.lock:
            assert not member.has_waiting()
            for direction in (READ, WRITE):
                member.timers[direction].cancel()
                if self.tokens[direction] is member:
                    following = self._next_member(member)
                    self.tokens[direction] = None if following is member else following
            self.members.remove(member)
            member.group = None

    def detach_context(self, member: ThrottleGroupMember) -> None:
        """Before the member's node moves to another context (drained): a timer it had
        armed hands the turn to another member instead."""
        with self.lock:
            for direction in (READ, WRITE):
                if member.timers[direction].pending:
                    member.timers[direction].cancel()
                    self.any_timer_armed[direction] = False
                    self._schedule_next(member, direction, from_request=False)

    def attach_context(self, member: ThrottleGroupMember, ctx: AioContext) -> None:
        member.ctx = ctx

    # -- the scheduler (QEMU's throttle_group_co_io_limits_intercept and friends) ------

    async def intercept(self, member: ThrottleGroupMember, size: int, direction: int
                        ) -> None:
        waiter = None
        with self.lock:
            token = self._next_token(member, direction)
            must_wait = self._schedule_timer(token, direction)
            if must_wait or member.pending[direction]:
                member.pending[direction] += 1
                waiter = _Waiter()
                member.queues[direction].append(waiter)
        if waiter is not None:
            try:
                await waiter.future
            except asyncio.CancelledError:
                self._abandon(member, direction, waiter)
                raise
        with self.lock:
            if waiter is not None:
                member.pending[direction] -= 1
            self.state.account(direction == WRITE, size)
            self._schedule_next(member, direction, from_request=True)

    def _abandon(self, member: ThrottleGroupMember, direction: int, waiter: _Waiter) -> None:
        """A held-back request was cancelled: take it out of the queue, or, if it had
        already been let go, pass that on to the next request."""
        with self.lock:
            member.pending[direction] -= 1
            try:
                member.queues[direction].remove(waiter)
            except ValueError:
                self._schedule_next(member, direction, from_request=True)

    def _next_member(self, member: ThrottleGroupMember) -> ThrottleGroupMember:
        index = self.members.index(member) + 1
        return self.members[index % len(self.members)]

    def _next_token(self, member: ThrottleGroupMember, direction: int) -> ThrottleGroupMember:
        """The member whose request goes next: the next one after the current token
        that has requests waiting, or ``member`` if none has."""
        if member.pending[direction] and member.limits_disabled:
            return member
        start = self.tokens[direction]
        assert start is not None
        token = self._next_member(start)
        while token is not start and not token.pending[direction]:
            token = self._next_member(token)
        if token is start and not token.pending[direction]:
            token = member
        return token

    def _schedule_timer(self, token: ThrottleGroupMember, direction: int) -> bool:
        """Whether the token's next request must wait; if so, and no timer of the group
        is armed for this direction, arms the token's."""
        if token.limits_disabled:
            return False
        if self.any_timer_armed[direction]:
            return True
        now = time.monotonic_ns()
        wait = self.state.compute_wait(direction == WRITE, now)
        if not wait:
            return False
        timer = token.timers[direction]
        if not timer.pending:
            timer.arm(token.ctx, now + wait)
        self.tokens[direction] = token
        self.any_timer_armed[direction] = True
        return True

    def _schedule_next(self, member: ThrottleGroupMember, direction: int, *,
                       from_request: bool) -> None:
        """After a request started: let the next waiting one go, or arm the timer that
        will. A request that just started prefers its own member's next request."""
        token = self._next_token(member, direction)
        if not token.pending[direction]:
            return
        if self._schedule_timer(token, direction):
            return
        if from_request and self._wake_first(member, direction):
            token = member
        else:
            token.timers[direction].arm(token.ctx, time.monotonic_ns())
            self.any_timer_armed[direction] = True
        self.tokens[direction] = token

    def _wake_first(self, member: ThrottleGroupMember, direction: int) -> bool:
        queue = member.queues[direction]
        if not queue:
            return False
        queue.popleft().wake()
        return True

    def timer_fired(self, member: ThrottleGroupMember, direction: int, generation: int
                    ) -> None:
        """In the member's context."""
        with self.lock:
            timer = member.timers[direction]
            if timer.generation != generation or member.group is not self:
                return
            timer.deadline = None
            self.any_timer_armed[direction] = False
        self._restart_queue(member, direction)

    def _restart_queue(self, member: ThrottleGroupMember, direction: int) -> None:
        with self.lock:
            if member.group is self and not self._wake_first(member, direction):
                self._schedule_next(member, direction, from_request=False)

    def restart(self, member: ThrottleGroupMember) -> None:
        """Reconsiders the member's held-back requests now (new limits, drain): a timer
        it had armed fires at once."""
        for direction in (READ, WRITE):
            with self.lock:
                timer = member.timers[direction]
                if timer.pending:
                    timer.cancel()
                    self.any_timer_armed[direction] = False
            if member.ctx.in_this_thread():
                self._restart_queue(member, direction)
            else:
                member.ctx.call_soon(self._restart_queue, member, direction)


