"""Events for applications: who subscribed to what, and a bounded outbox per application.

The daemon must never wait for an application. Each connected application has an
`Outbox`: replies to its own requests (bounded by the requests it may have in flight)
and events (bounded by `capacity`; when full the oldest is dropped and counted, and the
application is told how many it missed before the next event it gets).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vmha_guest.local_protocol import Topic, dropped_event

log = logging.getLogger(__name__)


class Outbox:
    """What is waiting to be written to one application, replies first."""

    def __init__(self, name: str, capacity: int) -> None:
        self.name = name
        self.topics: frozenset[Topic] = frozenset()
        self._capacity = capacity
        self._replies: collections.deque[dict[str, Any]] = collections.deque()
        self._events: collections.deque[dict[str, Any]] = collections.deque()
        self._missed = 0  # dropped since the application was last told
        self.dropped = 0  # dropped in total
        self._closing = False
        self._ready = asyncio.Event()
        self._reply_taken = asyncio.Event()

    def offer(self, event: dict[str, Any]) -> None:
        """Queue an event; drops the oldest when full. Never waits."""
        if len(self._events) >= self._capacity:
            self._events.popleft()
            self._missed += 1
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("application %s is not reading: %d event(s) dropped", *self.stats())
        self._events.append(event)
        self._ready.set()

    def reply(self, message: dict[str, Any]) -> None:
        self._replies.append(message)
        self._ready.set()

    async def room_for_replies(self, limit: int) -> None:
        """Wait until fewer than `limit` replies are unwritten: a client that sends
        requests without reading the answers is simply not read from meanwhile."""
        while len(self._replies) >= limit:
            self._reply_taken.clear()
            await self._reply_taken.wait()

    def close(self) -> None:
        """Write the replies still queued, then nothing more (`next` returns None)."""
        self._closing = True
        self._ready.set()

    async def next(self) -> dict[str, Any] | None:
        """The next message to write: a reply, else a count of missed events, else an event."""
        while not (self._replies or self._missed or self._events or self._closing):
            self._ready.clear()
            await self._ready.wait()
        if self._replies:
            self._reply_taken.set()
            return self._replies.popleft()
        if self._closing:
            return None
        if self._missed:
            missed, self._missed = self._missed, 0
            return dropped_event(missed)
        return self._events.popleft()

    def stats(self) -> tuple[str, int]:
        return self.name, self.dropped


@dataclass
class HubStats:
    published: int = 0
    delivered: int = 0


class EventHub:
    """The connected applications and their topics."""

    def __init__(self) -> None:
        self._outboxes: set[Outbox] = set()
        self.stats = HubStats()

    def add(self, outbox: Outbox) -> None:
        self._outboxes.add(outbox)

    def remove(self, outbox: Outbox) -> None:
        self._outboxes.discard(outbox)

    def subscribed(self, *topics: Topic) -> list[Outbox]:
        """The applications subscribed to any of `topics`, each once."""
        wanted = frozenset(topics)
        return [outbox for outbox in self._outboxes if outbox.topics & wanted]

    def publish(self, topics: Iterable[Topic], event: dict[str, Any]) -> int:
        """Offer `event` to every application subscribed to any of `topics`, once each."""
        outboxes = self.subscribed(*topics)
        for outbox in outboxes:
            outbox.offer(event)
        self.stats.published += 1
        self.stats.delivered += len(outboxes)
        return len(outboxes)
