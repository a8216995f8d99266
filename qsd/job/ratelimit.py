"""A block job's speed limit (QEMU's ratelimit.h): a byte quota per time slice.

A job accounts the bytes it moved; once a slice's quota is used up, the delay it gets
back stretches the slice by as many slices as the excess amounts to, so the average
rate stays at the speed asked for however large each piece of work is.  Any thread.
"""

from __future__ import annotations

import threading
import time

SLICE_NS = 100_000_000   # QEMU's BLOCK_JOB_SLICE_TIME: 100 ms


class RateLimit:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slice_start = 0
        self._slice_end = 0
        self._slice_quota = 0     # bytes per slice; 0: no limit
        self._slice_ns = 0
        self._dispatched = 0

    def set_speed(self, speed: int, slice_ns: int = SLICE_NS) -> None:
        """``speed`` bytes per second; 0 lifts the limit."""
        with self._lock:
            self._slice_ns = slice_ns
            self._slice_quota = 0 if speed == 0 else max(int(speed * slice_ns / 1e9), 1)

    def calculate_delay(self, n: int) -> int:
        """Accounts ``n`` bytes; how many nanoseconds to wait before the next piece."""
        now = time.monotonic_ns()
        with self._lock:
            if not self._slice_quota:
                return 0
            if self._slice_end < now:
                # The previous (maybe stretched) slice is over: start counting anew.
                self._slice_start = now
                self._slice_end = now + self._slice_ns
                self._dispatched = 0
            self._dispatched += n
            if self._dispatched < self._slice_quota:
                return 0
            slices = self._dispatched / self._slice_quota
            self._slice_end = self._slice_start + int(slices * self._slice_ns)
            return self._slice_end - now
