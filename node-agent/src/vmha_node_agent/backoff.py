"""Exponential backoff with jitter, for retries against the Kubernetes API."""

from __future__ import annotations

import random


class Backoff:
    def __init__(self, initial_s: float, maximum_s: float) -> None:
        self._initial = initial_s
        self._maximum = max(initial_s, maximum_s)
        self._next = initial_s

    def next(self) -> float:
        """The delay before the next attempt; each call doubles the one after, up to the max."""
        delay = self._next
        self._next = min(self._next * 2, self._maximum)
        # Jitter, so that agents on every node do not retry in step after an API outage.
        return delay * random.uniform(0.8, 1.2)

    def reset(self) -> None:
        self._next = self._initial
