"""Capped exponential backoff, for reopening the port and re-sending `init`."""

from __future__ import annotations


class Backoff:
    """Delays of `first`, then doubling up to `maximum`, until `reset()`."""

    def __init__(self, first: float, maximum: float, factor: float = 2.0) -> None:
        if not 0 < first <= maximum:
            raise ValueError(f"backoff needs 0 < first <= maximum, got {first}, {maximum}")
        self.first = first
        self.maximum = maximum
        self.factor = factor
        self._next = first

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * self.factor, self.maximum)
        return delay

    def reset(self) -> None:
        self._next = self.first
