"""An event loop in a thread of its own for simulated guests (`vmha_testbed.simguest`), so
that a test's blocking calls (API requests, waits) never make a guest late, and everything
a guest sends is sent from its own loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from vmha_testbed.simguest import SimulatedGuest

T = TypeVar("T")


class GuestLoop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run `coroutine` on the guests' loop; its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def do(self, action: Callable[[], T]) -> T:
        """Call `action` on the guests' loop (e.g. a guest's `send_*`)."""

        async def run() -> T:
            return action()

        return self.call(run())

    def start_guest(self, socket_path: Path, **kwargs: Any) -> SimulatedGuest:
        """A `SimulatedGuest(socket_path, **kwargs)`, listening."""

        async def start() -> SimulatedGuest:
            guest = SimulatedGuest(socket_path, **kwargs)
            await guest.start()
            return guest

        return self.call(start())

    def close_guest(self, guest: SimulatedGuest) -> None:
        self.call(guest.close())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()
