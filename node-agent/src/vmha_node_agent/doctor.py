"""Reports to OPNFV Doctor's inspector: `PUT {url}/events` with a JSON list of events.

Faults are reported as status "down" and their end as "up", with the same
`monitor_event_id` so the inspector can pair them. Reports leave in order; while the
inspector is unreachable they wait in a bounded queue, the oldest dropped (and counted)
when it overflows.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from vmha_node_agent.config import DoctorConfig
from vmha_node_agent.heartbeat import Transition
from vmha_node_agent.inventory import VMRef
from vmha_node_agent.metrics import AgentMetrics

log = logging.getLogger(__name__)
MONITOR_NAME = "vmha-node-agent"


@dataclass(frozen=True)
class _Queued:
    number: int
    event: dict[str, Any]


class DoctorReporter:
    def __init__(self, config: DoctorConfig, node_name: str, metrics: AgentMetrics) -> None:
        if not config.url:
            raise ValueError("DoctorReporter needs doctor.url")
        self._config = config
        self._endpoint = config.url.rstrip("/") + "/events"
        self._node = node_name
        self._metrics = metrics
        self._queue: deque[_Queued] = deque()
        self._numbers = itertools.count(1)
        self._pending = asyncio.Event()
        self._episodes: dict[tuple[str, str], str] = {}
        self._episode_numbers = itertools.count(1)

    # -- TransitionSink ---------------------------------------------------------------

    def report(self, vm: VMRef, change: Transition) -> None:
        if not (change.is_fault or change.clears_fault):
            return
        self._enqueue(self._event(vm, change))

    # -- delivery -----------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver queued reports until cancelled."""
        async with self._client() as http:
            delay = self._config.retry_initial_s
            while True:
                if not self._queue:
                    self._pending.clear()
                    await self._pending.wait()
                if await self._deliver_next_batch(http):
                    delay = self._config.retry_initial_s
                else:
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, self._config.retry_max_s)

    async def drain(self, timeout_s: float) -> None:
        """On shutdown: keep trying to deliver what is queued, for at most `timeout_s`."""
        if not self._queue:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s), self._client() as http:
                while self._queue:
                    if not await self._deliver_next_batch(http):
                        await asyncio.sleep(self._config.retry_initial_s)
        if self._queue:
            log.error("doctor: %d reports undelivered at shutdown", len(self._queue))

    def _client(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._config.timeout_s))

    async def _deliver_next_batch(self, http: aiohttp.ClientSession) -> bool:
        batch = list(itertools.islice(self._queue, self._config.batch_size))
        if not await self._deliver(http, batch):
            return False
        self._drop_delivered(batch[-1].number)
        return True

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def _deliver(self, http: aiohttp.ClientSession, batch: list[_Queued]) -> bool:
        """True when the batch is done with (accepted, or refused for good)."""
        headers = {"Content-Type": "application/json"}
        token = self._config.auth_token()
        if token:
            headers["X-Auth-Token"] = token
        body = [item.event for item in batch]
        try:
            async with http.put(self._endpoint, json=body, headers=headers) as response:
                status = response.status
                text = (await response.text())[:200]
        except (aiohttp.ClientError, TimeoutError) as exc:
            self._metrics.doctor_attempts_failed.inc()
            log.warning(
                "doctor inspector unreachable: %s",
                exc or type(exc).__name__,
                extra={"queued": len(self._queue)},
            )
            return False
        if status < 300:
            self._metrics.doctor_reports.labels("sent").inc(len(batch))
            return True
        if status == 429 or status >= 500:
            self._metrics.doctor_attempts_failed.inc()
            log.warning("doctor inspector answered %s, will retry: %s", status, text)
            return False
        # A 4xx other than 429 will not get better by retrying; keep the queue moving.
        self._metrics.doctor_reports.labels("rejected").inc(len(batch))
        log.error("doctor inspector refused %d reports with %s: %s", len(batch), status, text)
        return True

    def _enqueue(self, event: dict[str, Any]) -> None:
        if len(self._queue) >= self._config.queue_size:
            dropped = self._queue.popleft()
            self._metrics.doctor_dropped.inc()
            log.error("doctor queue full, dropped report %s", dropped.event["id"])
        self._queue.append(_Queued(next(self._numbers), event))
        self._metrics.doctor_queue.set(len(self._queue))
        self._pending.set()

    def _drop_delivered(self, last_number: int) -> None:
        # The queue may have overflowed while the batch was in flight: drop by number,
        # not by count.
        while self._queue and self._queue[0].number <= last_number:
            self._queue.popleft()
        self._metrics.doctor_queue.set(len(self._queue))

    def _event(self, vm: VMRef, change: Transition) -> dict[str, Any]:
        registration = change.registration
        details: dict[str, Any] = {
            "hostname": self._node,
            "status": "down" if change.is_fault else "up",
            "monitor": MONITOR_NAME,
            "monitor_event_id": self._episode(vm, change),
            "namespace": vm.namespace,
            "vm": vm.name,
            "instance_id": vm.uid,
            "heartbeat_state": change.current.value,
            "reason": change.reason.value,
            "message": change.detail,
        }
        if registration is not None:
            details["instance_name"] = registration.name
            details["corrective_action"] = registration.corrective_action
        return {
            "id": str(uuid.uuid4()),
            "time": datetime.fromtimestamp(change.wall_time, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "type": self._config.event_type,
            "details": details,
        }

    def _episode(self, vm: VMRef, change: Transition) -> str:
        """One id per fault episode, shared by its "down" reports and its "up"."""
        key = vm.key
        if change.clears_fault:
            return self._episodes.pop(key, f"{self._node}/{vm}/0")
        if key not in self._episodes:
            self._episodes[key] = f"{self._node}/{vm}/{next(self._episode_numbers)}"
        return self._episodes[key]
