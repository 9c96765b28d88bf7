"""Timestamps as the Kubernetes API writes them."""

from __future__ import annotations

from datetime import UTC, datetime


def micro_time(wall_time: float) -> str:
    """RFC 3339 with microseconds (a MicroTime, e.g. an Event's eventTime)."""
    return datetime.fromtimestamp(wall_time, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def rfc3339(wall_time: float) -> str:
    """RFC 3339 to the second (a Time, as in conditions and our annotation)."""
    return datetime.fromtimestamp(wall_time, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> float | None:
    """Unix time of an RFC 3339 timestamp (a Time or a MicroTime); None if unreadable."""
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
