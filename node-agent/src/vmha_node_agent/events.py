"""Kubernetes Events (events.k8s.io/v1) on the VMI, from heartbeat transitions and actions.

`EventRecorder` is the delivery: `record()` never blocks; the first occurrence of an Event
waits in a bounded queue for its create, repeats aggregate into its series (`eventseries`),
and one writer delivers creates in order, then due series updates. While the API is
unreachable the writer retries with backoff and nothing is lost while the queue has room;
beyond `events.queue_size` the oldest waiting Event is dropped and counted. A create whose
answer was lost and is retried meets 409 (the name was fixed when queued) and counts as done.

`HeartbeatEvents` is the TransitionSink that says what each transition is worth:

| transition                      | type    | reason                 |
|---------------------------------|---------|------------------------|
| registered                      | Normal  | HeartbeatRegistered    |
| a challenge missed (not failed) | Warning | HeartbeatMissed        |
| unhealthy                       | Warning | HeartbeatUnhealthy     |
| failed (missed ≥ threshold)     | Warning | HeartbeatFailed        |
| recovered                       | Normal  | HeartbeatRecovered     |
| deregistered (guest exit)       | Normal  | HeartbeatDeregistered  |

The VM leaving this node (deleted, migrated) is silent. A guest re-registering after an
agent restart, where the VMI already shows it healthy on this node, is silent too.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from vmha_node_agent.annotations import VMILookup, parse_annotation
from vmha_node_agent.backoff import Backoff
from vmha_node_agent.config import AgentConfig
from vmha_node_agent.eventseries import EventKey, SeriesBook
from vmha_node_agent.heartbeat import HeartbeatState, Transition, TransitionReason
from vmha_node_agent.inventory import KUBERNETES, VMRef
from vmha_node_agent.kubeapi import EVENTS, MERGE_PATCH, KubeApi, KubeError
from vmha_node_agent.kubevirt import KUBEVIRT_API_VERSION, VMI_KIND, uid_of
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.timefmt import micro_time

log = logging.getLogger(__name__)

REPORTING_CONTROLLER: Final = "vmha.io/node-agent"
HEARTBEAT_ACTION: Final = "Heartbeat"
MAX_NOTE_CHARS: Final = 1024
MAX_NAME_PREFIX: Final = 200


@dataclass(frozen=True)
class EventSpec:
    """What an Event says about its object."""

    type: str  # Normal | Warning
    reason: str
    action: str
    note: str


MISSED: Final = EventSpec(
    "Warning", "HeartbeatMissed", HEARTBEAT_ACTION, "a heartbeat challenge went unanswered"
)

_TRANSITION_EVENTS: Final = {
    TransitionReason.REGISTERED: ("Normal", "HeartbeatRegistered", "guest registered: "),
    TransitionReason.UNHEALTHY: ("Warning", "HeartbeatUnhealthy", "guest reports unhealthy: "),
    TransitionReason.MISSED: ("Warning", "HeartbeatFailed", "guest not answering: "),
    TransitionReason.RECOVERED: ("Normal", "HeartbeatRecovered", "guest healthy again: "),
    TransitionReason.DEREGISTERED: ("Normal", "HeartbeatDeregistered", "guest deregistered: "),
}


def transition_event(change: Transition) -> EventSpec | None:
    """The Event a transition is worth, if any."""
    entry = _TRANSITION_EVENTS.get(change.reason)
    if entry is None:
        return None
    type_, reason, prefix = entry
    return EventSpec(type_, reason, HEARTBEAT_ACTION, prefix + change.detail)


def is_reattach(change: Transition, shown: Mapping[str, Any] | None, node: str) -> bool:
    """A registration on a new session when the VMI already shows the guest healthy on this
    node: the agent restarted, the guest did not."""
    return (
        change.reason is TransitionReason.REGISTERED
        and change.previous is HeartbeatState.WAITING_FOR_INIT
        and shown is not None
        and shown.get("state") == HeartbeatState.HEALTHY.value
        and shown.get("node") == node
    )


@dataclass(frozen=True)
class Regarding:
    namespace: str
    name: str
    uid: str

    @classmethod
    def vmi(cls, vm: VMRef) -> Regarding:
        return cls(vm.namespace, vm.name, vm.uid)


class EventRecorder:
    def __init__(
        self,
        api: KubeApi,
        config: AgentConfig,
        metrics: AgentMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self._config = config.events
        self._retry = (config.kubernetes.retry_initial_s, config.kubernetes.retry_max_s)
        self._node = config.node_name
        self._metrics = metrics
        self._clock = clock
        self._book = SeriesBook(
            config.events.series_window_s, config.events.series_update_s, config.events.max_series
        )
        self._creates: deque[tuple[EventKey, str]] = deque()
        self._names = itertools.count()
        self._wake = asyncio.Event()

    @property
    def queued(self) -> int:
        return len(self._creates)

    def record(self, regarding: Regarding, spec: EventSpec) -> None:
        """One occurrence; never blocks."""
        key = EventKey(
            regarding.namespace, regarding.name, regarding.uid,
            spec.type, spec.reason, spec.action, spec.note[:MAX_NOTE_CHARS],
        )  # fmt: skip
        self._metrics.kube_events_recorded.labels(spec.reason).inc()
        if self._book.observe(key, self._clock()):
            self._enqueue(key)
        self._wake.set()

    def _enqueue(self, key: EventKey) -> None:
        if len(self._creates) >= self._config.queue_size:
            dropped, _ = self._creates.popleft()
            self._book.forget(dropped)
            self._metrics.kube_events_dropped.inc()
            log.error("event queue full, dropped %s about %s",
                      dropped.reason, dropped.regarding_name)  # fmt: skip
        self._creates.append((key, self._event_name(key)))
        self._metrics.kube_events_queue.set(len(self._creates))

    def _event_name(self, key: EventKey) -> str:
        # Fixed when queued, so a create retried after a lost answer meets itself (409).
        stamp = f"{time.time_ns():x}{next(self._names):x}{secrets.token_hex(2)}"
        return f"{key.regarding_name[:MAX_NAME_PREFIX]}.{stamp}"

    # -- delivery ----------------------------------------------------------------------

    async def run(self) -> None:
        backoff = Backoff(*self._retry)
        while True:
            delivered = await self._deliver_one(flush=False)
            if delivered is None:
                await self._idle()
            elif delivered:
                backoff.reset()
            else:
                await asyncio.sleep(backoff.next())

    async def drain(self, timeout_s: float) -> None:
        """At shutdown: deliver what waits, series included, for at most `timeout_s`."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while (delivered := await self._deliver_one(flush=True)) is not None:
                    if not delivered:
                        await asyncio.sleep(self._retry[0])
        if self._creates:
            log.error("%d Kubernetes Events undelivered at shutdown", len(self._creates))

    async def _idle(self) -> None:
        self._wake.clear()
        due = self._book.next_due()
        timeout = None if due is None else max(0.0, due - self._clock())
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wake.wait()

    async def _deliver_one(self, *, flush: bool) -> bool | None:
        """Deliver the next create or series update: True when done with it, False to retry
        later, None when there is nothing to do."""
        if self._creates:
            key, name = self._creates[0]
            done = await self._create(key, name)
            if done:
                self._creates.popleft()
                self._metrics.kube_events_queue.set(len(self._creates))
            return done
        due = self._book.due(self._clock(), flush=flush)
        if not due:
            return None
        return await self._update_series(due[0])

    async def _create(self, key: EventKey, name: str) -> bool:
        series = self._book.get(key)
        now = self._clock()
        first, last, count = (
            (series.first_seen, series.last_seen, series.count) if series else (now, now, 1)
        )
        body: dict[str, Any] = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": key.namespace},
            "eventTime": micro_time(first),
            "reportingController": REPORTING_CONTROLLER,
            "reportingInstance": self._node,
            "action": key.action,
            "reason": key.reason,
            "type": key.type,
            "note": key.note,
            "regarding": {
                "apiVersion": KUBEVIRT_API_VERSION,
                "kind": VMI_KIND,
                "namespace": key.namespace,
                "name": key.regarding_name,
                "uid": key.regarding_uid,
            },
        }
        if count >= 2:
            body["series"] = {"count": count, "lastObservedTime": micro_time(last)}
        try:
            await self._api.request("create", EVENTS, EVENTS.path(key.namespace), body=body)
        except KubeError as error:
            if error.status != 409:  # 409: an earlier attempt got through
                refused = self._failed(key, error)
                if refused:
                    self._book.forget(key)  # the next occurrence tries a new Event
                return refused
        self._metrics.kube_events.labels("created").inc()
        self._book.written(key, name, count, now)
        return True

    async def _update_series(self, key: EventKey) -> bool:
        series = self._book.get(key)
        if series is None or series.name is None:
            return True
        count, last, now = series.count, series.last_seen, self._clock()
        body = {"series": {"count": count, "lastObservedTime": micro_time(last)}}
        path = EVENTS.path(key.namespace, series.name)
        try:
            await self._api.request("patch", EVENTS, path, body=body, content_type=MERGE_PATCH)
        except KubeError as error:
            if error.not_found:  # expired (the API keeps Events an hour): make it again
                self._book.lost(key)
                self._enqueue(key)
                return True
            if not self._failed(key, error):
                return False
            self._book.written(key, series.name, count, now)  # refused: do not insist
            return True
        self._metrics.kube_events.labels("series_updated").inc()
        self._book.written(key, series.name, count, now)
        return True

    def _failed(self, key: EventKey, error: KubeError) -> bool:
        """False: retry later. True: refused for good (counted, logged, given up)."""
        if error.transient:
            log.warning("Event %s for %s not written yet: %s", key.reason, key.regarding_name,
                        error, extra={"queued": len(self._creates)})  # fmt: skip
            return False
        self._metrics.kube_events.labels("rejected").inc()
        log.error("Event %s for %s refused: %s", key.reason, key.regarding_name, error)
        return True


class HeartbeatEvents:
    """TransitionSink (and MissSink) turning heartbeat news into Events on the VMI."""

    def __init__(self, recorder: EventRecorder, vmis: VMILookup, node: str) -> None:
        self._recorder = recorder
        self._vmis = vmis
        self._node = node

    def report(self, vm: VMRef, change: Transition) -> None:
        if vm.origin != KUBERNETES or not vm.uid:
            return
        spec = transition_event(change)
        if spec is None or is_reattach(change, self._shown(vm), self._node):
            return
        self._recorder.record(Regarding.vmi(vm), spec)

    def challenge_missed(self, vm: VMRef, consecutive: int) -> None:
        if vm.origin == KUBERNETES and vm.uid:
            self._recorder.record(Regarding.vmi(vm), MISSED)

    def _shown(self, vm: VMRef) -> Mapping[str, Any] | None:
        vmi = self._vmis(vm.key)
        if vmi is None or uid_of(vmi) != vm.uid:
            return None
        return parse_annotation(vmi)
