"""Token buckets: how much a guest may send us, in frames and in bytes."""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._updated = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def try_take(self, amount: float = 1.0) -> bool:
        self._refill()
        if self._tokens >= amount:
            self._tokens -= amount
            return True
        return False

    def take_debt(self, amount: float) -> float:
        """Take `amount` even if that overdraws; return seconds until the bucket is positive.

        Used for bytes already read: we cannot un-read them, but we can stop reading for
        as long as the guest is over its budget.
        """
        self._refill()
        self._tokens -= amount
        return 0.0 if self._tokens >= 0 else -self._tokens / self.rate


class LogThrottle:
    """At most one log line per `interval_s`; counts what it held back."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval_s
        self._clock = clock
        self._next = 0.0
        self._suppressed = 0

    def allow(self) -> bool:
        now = self._clock()
        if now >= self._next:
            self._next = now + self._interval
            return True
        self._suppressed += 1
        return False

    def take_suppressed(self) -> int:
        count, self._suppressed = self._suppressed, 0
        return count
