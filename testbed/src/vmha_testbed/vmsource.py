"""A VM source for a node agent in a test (the agent's `VMSource`): the test puts the
inventory changes on `queue` by hand, where Kubernetes discovery would find them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from vmha_node_agent.inventory import InventoryChange


class QueueSource:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[InventoryChange] = asyncio.Queue()

    async def changes(self) -> AsyncIterator[InventoryChange]:
        while True:
            yield await self.queue.get()
