"""Waiting for a condition with a bound: the one polling helper of tests, the demo and
benchmarks (the machine may be busy, so every wait has a timeout and a message)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Literal, TypeVar

T = TypeVar("T")


def eventually(
    check: Callable[[], T | Literal[False] | None],
    what: str,
    timeout: float = 60.0,
    poll: float = 0.1,
) -> T:
    """Call `check()` until it returns something truthy, and return that; AssertionError
    naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(poll)
