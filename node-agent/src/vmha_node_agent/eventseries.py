"""Aggregation of repeated Events into series (events.k8s.io/v1), without I/O.

Two occurrences are the same Event when everything a reader sees is the same: the object,
type, reason, action and note (the API forbids changing any of them afterwards). The first
occurrence creates an Event; repeats only count, and the Event's `series` (count,
lastObservedTime) is brought up to date at most once per `update_interval_s` — so a VM that
misses every challenge costs one request per interval, not one per miss. A repeat after
`window_s` of quiet starts a new Event. Time is passed in.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class EventKey:
    namespace: str
    regarding_name: str
    regarding_uid: str
    type: str
    reason: str
    action: str
    note: str


@dataclass
class Series:
    first_seen: float
    last_seen: float
    count: int = 1
    name: str | None = None  # the Event's name, once the API has it
    written_count: int = 0  # the count the API has
    written_at: float = 0.0


class SeriesBook:
    def __init__(self, window_s: float, update_interval_s: float, max_entries: int) -> None:
        self._window_s = window_s
        self._update_interval_s = update_interval_s
        self._max_entries = max_entries
        self._series: OrderedDict[EventKey, Series] = OrderedDict()

    def __len__(self) -> int:
        return len(self._series)

    def get(self, key: EventKey) -> Series | None:
        return self._series.get(key)

    def observe(self, key: EventKey, now: float) -> bool:
        """Count one occurrence; True when it needs a new Event (the caller creates it)."""
        series = self._series.get(key)
        if series is None or now - series.last_seen > self._window_s:
            self._series[key] = Series(first_seen=now, last_seen=now)
            self._series.move_to_end(key)
            while len(self._series) > self._max_entries:
                self._series.popitem(last=False)  # the least recently seen
            return True
        series.count += 1
        series.last_seen = max(series.last_seen, now)
        self._series.move_to_end(key)
        return False

    def written(self, key: EventKey, name: str, count: int, now: float) -> None:
        """The API now holds the Event `name` with `count` occurrences."""
        series = self._series.get(key)
        if series is not None:
            series.name = name
            series.written_count = max(series.written_count, count)
            series.written_at = now

    def lost(self, key: EventKey) -> None:
        """The Event is gone from the API (expired); the next write creates it again."""
        series = self._series.get(key)
        if series is not None:
            series.name = None
            series.written_count = 0

    def forget(self, key: EventKey) -> None:
        self._series.pop(key, None)

    def due(self, now: float, *, flush: bool = False) -> list[EventKey]:
        """Created Events whose series has news and whose last update is old enough
        (`flush`: regardless of age, at shutdown)."""
        return [
            key
            for key, series in self._series.items()
            if series.name is not None
            and series.count > series.written_count
            and (flush or now - series.written_at >= self._update_interval_s)
        ]

    def next_due(self) -> float | None:
        """When the earliest pending series update becomes due, if any is pending."""
        times = [
            series.written_at + self._update_interval_s
            for series in self._series.values()
            if series.name is not None and series.count > series.written_count
        ]
        return min(times, default=None)
