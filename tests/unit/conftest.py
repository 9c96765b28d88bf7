"""Fixtures of the guest daemon's tests (`vmha_testbed.guesthost`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vmha_testbed.guesthost import Pty, short_tempdir


@pytest.fixture
def pty() -> Iterator[Pty]:
    """A pty pair for the daemon's port; hung up after the test."""
    pair = Pty()
    yield pair
    pair.hang_up()


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    """A short directory for unix sockets."""
    with short_tempdir() as path:
        yield path
