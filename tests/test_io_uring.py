"""The FUSE export's minimal io_uring (qsd/export/fuse/io_uring.py) on its own: SQE slots
written once and queued many times, completions read through the views, waits with a
timeout, and the eventfd that can be silenced while a loop serves the ring."""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterator

import pytest

from qsd.export.fuse import io_uring
from qsd.export.fuse.io_uring import SQE_SIZE, Ring

pytestmark = pytest.mark.skipif(io_uring.available() is not None,
                                reason=str(io_uring.available()))


def nop(user_data: int) -> bytes:
    """An IORING_OP_NOP (opcode 0) SQE that completes with res 0."""
    sqe = bytearray(SQE_SIZE)
    struct.pack_into("=Q", sqe, 32, user_data)
    return bytes(sqe)


def completions(ring: Ring) -> list[tuple[int, int]]:
    """(user_data, res) of every completion there, consumed."""
    head = ring.cq32[ring.cq_head_i]
    tail = ring.cq32[ring.cq_tail_i]
    found = []
    for index in range(head, tail):
        i = index & ring.cq_mask
        found.append((ring.cqe64[2 * i], ring.cqe_s32[4 * i + 2]))
    ring.cq32[ring.cq_head_i] = tail
    return found


@pytest.fixture(params=[False, True], ids=["default", "single-issuer"])
def ring(request: pytest.FixtureRequest) -> Iterator[Ring]:
    r = Ring(8, single_issuer=request.param)
    r.enable()
    yield r
    r.close()


def test_a_slot_is_written_once_and_queued_again(ring: Ring) -> None:
    ring.put(5, nop(55))
    ring.put(2, nop(22))
    for slot in (5, 2, 5):
        ring.queue(slot)
    assert ring.submit() == 3
    assert completions(ring) == [(55, 0), (22, 0), (55, 0)]
    # Far more submissions than the ring has slots: the index array wraps around.
    for _ in range(5):
        for _ in range(ring.sq_entries):
            ring.queue(5)
        assert ring.submit() == ring.sq_entries
        assert completions(ring) == [(55, 0)] * ring.sq_entries


def test_wait_ends_at_a_completion_or_the_timeout(ring: Ring) -> None:
    start = time.monotonic()
    ring.wait(20_000_000)
    waited = time.monotonic() - start
    assert completions(ring) == []
    assert waited >= 0.019
    ring.put(0, nop(7))
    ring.queue(0)
    start = time.monotonic()
    ring.wait(10_000_000_000)
    assert time.monotonic() - start < 5
    assert completions(ring) == [(7, 0)]


def test_the_eventfd_can_be_silenced(ring: Ring) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    try:
        ring.register_eventfd(efd)
        ring.put(0, nop(1))
        ring.silence_eventfd()
        ring.queue(0)
        ring.submit()
        assert completions(ring) == [(1, 0)]
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efd)
        ring.arm_eventfd()
        ring.queue(0)
        ring.submit()
        assert completions(ring) == [(1, 0)]
        assert os.eventfd_read(efd) >= 1
    finally:
        os.close(efd)
