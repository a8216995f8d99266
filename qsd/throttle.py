"""Leaky buckets for I/O limits (QEMU's util/throttle.c): the configuration, its
validation with QEMU's texts, and the arithmetic that says how long a request must wait.

Each limit is a bucket that fills with what requests do (bytes or operations) and leaks
at the configured average rate. A request may start while the bucket holds no more than
its size; otherwise it waits until enough has leaked. Without a burst rate (``*-max``)
the bucket holds a tenth of a second's worth, which smooths the rate without letting a
pause be made up later; with one it holds ``*-max`` times ``*-max-length`` seconds, and a
second bucket (``burst_level``, a tenth of a second at the burst rate) keeps the burst
itself at ``*-max``. Nothing here knows about time sources, threads or requests:
callers pass the clock in nanoseconds and hold their own lock.
"""

from __future__ import annotations

import copy
import enum
from dataclasses import dataclass, field

from qsd.errors import QMPError

NANOSECONDS_PER_SECOND = 1_000_000_000
THROTTLE_VALUE_MAX = 1_000_000_000_000_000
UINT_MAX = (1 << 32) - 1
_UINT64 = 1 << 64


class Bucket(enum.IntEnum):
    """QEMU's BucketType, in its order (the order validation reports problems in)."""

    BPS_TOTAL = 0
    BPS_READ = 1
    BPS_WRITE = 2
    OPS_TOTAL = 3
    OPS_READ = 4
    OPS_WRITE = 5


# The buckets a read (index 0) or a write (index 1) is checked and accounted against.
_BYTE_BUCKETS = ((Bucket.BPS_TOTAL, Bucket.BPS_READ), (Bucket.BPS_TOTAL, Bucket.BPS_WRITE))
_OP_BUCKETS = ((Bucket.OPS_TOTAL, Bucket.OPS_READ), (Bucket.OPS_TOTAL, Bucket.OPS_WRITE))

# ThrottleLimits' member for each bucket: "bps-total" is the average, "-max" the burst
# rate, "-max-length" the burst length in seconds.
LIMIT_NAMES = {
    Bucket.BPS_TOTAL: "bps-total", Bucket.BPS_READ: "bps-read", Bucket.BPS_WRITE: "bps-write",
    Bucket.OPS_TOTAL: "iops-total", Bucket.OPS_READ: "iops-read",
    Bucket.OPS_WRITE: "iops-write",
}


@dataclass
class LeakyBucket:
    avg: int = 0                # units per second; 0: no limit
    max: int = 0                # burst rate; 0: none
    level: float = 0.0          # what the bucket holds now
    burst_level: float = 0.0    # the same, leaking at the burst rate (bursts > 1 s only)
    burst_length: int = 1       # seconds a burst may last (a uint64, as in QEMU)

    def leak(self, delta_ns: int) -> None:
        self.level = max(self.level - self.avg * delta_ns / NANOSECONDS_PER_SECOND, 0.0)
        if self.burst_length > 1:
            self.burst_level = max(
                self.burst_level - self.max * delta_ns / NANOSECONDS_PER_SECOND, 0.0)

    def wait_ns(self) -> int:
        """How long a new request must wait for this bucket; 0 if it may go now."""
        if not self.avg:
            return 0
        if self.max:
            size, burst_size = float(self.max * self.burst_length), self.max / 10
        else:
            size, burst_size = self.avg / 10, 0.0
        extra = self.level - size
        if extra > 0:
            return int(extra * NANOSECONDS_PER_SECOND / self.avg)
        if self.burst_length > 1:
            extra = self.burst_level - burst_size
            if extra > 0:
                return int(extra * NANOSECONDS_PER_SECOND / self.max)
        return 0


@dataclass
class ThrottleConfig:
    buckets: list[LeakyBucket] = field(default_factory=lambda: [LeakyBucket() for _ in Bucket])
    op_size: int = 0            # iops-size: larger requests count as several operations

    def __getitem__(self, bucket: Bucket) -> LeakyBucket:
        return self.buckets[bucket]

    def copy(self) -> ThrottleConfig:
        return copy.deepcopy(self)

    def enabled(self) -> bool:
        return any(bucket.avg > 0 for bucket in self.buckets)

    def check(self) -> None:
        """QEMU's throttle_is_valid(): QMPError with its text for the first problem."""
        def total_and_split(attr: str, total: Bucket, read: Bucket, write: Bucket) -> bool:
            return bool(getattr(self[total], attr)) and bool(
                getattr(self[read], attr) or getattr(self[write], attr))

        if (total_and_split("avg", Bucket.BPS_TOTAL, Bucket.BPS_READ, Bucket.BPS_WRITE)
                or total_and_split("avg", Bucket.OPS_TOTAL, Bucket.OPS_READ, Bucket.OPS_WRITE)
                or total_and_split("max", Bucket.BPS_TOTAL, Bucket.BPS_READ, Bucket.BPS_WRITE)
                or total_and_split("max", Bucket.OPS_TOTAL, Bucket.OPS_READ,
                                   Bucket.OPS_WRITE)):
            raise QMPError("bps/iops/max total values and read/write values cannot be used "
                           "at the same time")
        if self.op_size and not any(self[b].avg for b in (Bucket.OPS_TOTAL, Bucket.OPS_READ,
                                                          Bucket.OPS_WRITE)):
            raise QMPError("iops size requires an iops value to be set")
        for bucket in self.buckets:
            if not (0 <= bucket.avg <= THROTTLE_VALUE_MAX
                    and 0 <= bucket.max <= THROTTLE_VALUE_MAX):
                raise QMPError(f"bps/iops/max values must be within [0, {THROTTLE_VALUE_MAX}]")
            if not bucket.burst_length:
                raise QMPError("the burst length cannot be 0")
            if bucket.burst_length > 1 and not bucket.max:
                raise QMPError("burst length set without burst rate")
            if bucket.max and bucket.burst_length > THROTTLE_VALUE_MAX // bucket.max:
                raise QMPError("burst length too high for this burst rate")
            if bucket.max and not bucket.avg:
                raise QMPError("bps_max/iops_max require corresponding bps/iops values")
            if bucket.max and bucket.max < bucket.avg:
                raise QMPError("bps_max/iops_max cannot be lower than bps/iops")

    def apply_limits(self, limits: dict[str, int]) -> None:
        """QEMU's throttle_limits_to_config(): takes the ThrottleLimits members given
        (wire names), then checks the result; on error the caller keeps its old copy."""
        for bucket, name in LIMIT_NAMES.items():
            if name in limits:
                self[bucket].avg = limits[name]
        for bucket, name in LIMIT_NAMES.items():
            if f"{name}-max" in limits:
                self[bucket].max = limits[f"{name}-max"]
        for bucket, name in LIMIT_NAMES.items():
            length = limits.get(f"{name}-max-length")
            if length is not None:
                if length > UINT_MAX:
                    raise QMPError(f"{name}-max-length value must be in the range "
                                   f"[0, {UINT_MAX}]")
                self[bucket].burst_length = length % _UINT64
        if "iops-size" in limits:
            self.op_size = limits["iops-size"]
        self.check()

    def limits(self) -> dict[str, int]:
        """QEMU's throttle_config_to_limits(): every member, as qom-get shows them."""
        result = {}
        for bucket, name in LIMIT_NAMES.items():
            result[name] = self[bucket].avg
            result[f"{name}-max"] = self[bucket].max
            result[f"{name}-max-length"] = self[bucket].burst_length
        result["iops-size"] = self.op_size
        return result


class ThrottleState:
    """The buckets of one throttle group and the time they last leaked."""

    def __init__(self) -> None:
        self.cfg = ThrottleConfig()
        self.previous_leak = 0

    def configure(self, cfg: ThrottleConfig, now_ns: int) -> None:
        """QEMU's throttle_config(): the new limits, with empty buckets."""
        self.cfg = cfg.copy()
        for bucket in self.cfg.buckets:
            bucket.level = bucket.burst_level = 0.0
        self.previous_leak = now_ns

    def config(self) -> ThrottleConfig:
        return self.cfg.copy()

    def compute_wait(self, is_write: bool, now_ns: int) -> int:
        """Leaks what the time since the last call let through and returns how long the
        next request in this direction must wait (0: it may start now)."""
        delta = now_ns - self.previous_leak
        self.previous_leak = now_ns
        if delta > 0:
            for bucket in self.cfg.buckets:
                bucket.leak(delta)
        return max(self.cfg[b].wait_ns()
                   for b in _BYTE_BUCKETS[is_write] + _OP_BUCKETS[is_write])

    def account(self, is_write: bool, size: int) -> None:
        """Counts a request that starts: its bytes, and its operations (one, or
        size/iops-size for requests larger than iops-size)."""
        op_size = self.cfg.op_size
        units = size / op_size if op_size and size > op_size else 1.0
        for index in _BYTE_BUCKETS[is_write]:
            self._fill(self.cfg[index], size)
        for index in _OP_BUCKETS[is_write]:
            self._fill(self.cfg[index], units)

    @staticmethod
    def _fill(bucket: LeakyBucket, amount: float) -> None:
        bucket.level += amount
        if bucket.burst_length > 1:
            bucket.burst_level += amount
