"""Per-caller request rate limit: a token bucket per API key (or client address), in memory.

Each API process limits on its own, so N replicas allow N times the rate; that is the usual
trade-off for not putting a Redis round trip in front of every request.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

# Beyond this many callers (e.g. many client addresses on an open API), idle buckets are dropped.
MAX_TRACKED_CALLERS = 10_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    def __init__(self, per_minute: int) -> None:
        self._capacity = float(per_minute)
        self._refill_per_s = per_minute / 60.0
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, caller: str) -> float:
        """Take one request from `caller`'s bucket; 0.0 when allowed, else seconds to wait."""
        now = time.monotonic()
        if len(self._buckets) > MAX_TRACKED_CALLERS:
            self._forget_idle(now)
        bucket = self._buckets.setdefault(caller, _Bucket(self._capacity, now))
        bucket.tokens = min(self._capacity, bucket.tokens + (now - bucket.updated) * self._refill_per_s)
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self._refill_per_s

    def _forget_idle(self, now: float) -> None:
        """Drop buckets that have refilled completely: they hold no state worth keeping."""
        full_after_s = 60.0  # a bucket holds one minute of requests
        self._buckets = {
            caller: bucket for caller, bucket in self._buckets.items() if now - bucket.updated < full_after_s
        }


def retry_after_header(wait_s: float) -> dict[str, str]:
    return {"Retry-After": str(max(1, math.ceil(wait_s)))}
