"""Prometheus metrics of the node agent (`vmha_*`; per-VM series carry namespace and vm).

Per-VM numbers are plain counters in a `VMStats` per session, turned into metric families
only when Prometheus scrapes: a challenge costs a few integer additions, not a dozen locked
metric updates. A VM's series disappear with its session, so a node's scrape only ever
shows the VMs it runs.
"""

from __future__ import annotations

import bisect
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from vmha_node_agent.heartbeat import HeartbeatState
from vmha_node_agent.inventory import VMRef

VM_LABELS = ["namespace", "vm"]
RTT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
FRAME_RESULTS = ("accepted", "garbage", "oversize", "invalid", "rate_limited")


@dataclass
class RttHistogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(RTT_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(RTT_BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        running, out = 0, []
        for bound, count in zip((*RTT_BUCKETS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), float(running)))
        return out


@dataclass
class VMStats:
    """Everything the agent counts about one VM."""

    state: HeartbeatState = HeartbeatState.WAITING_FOR_INIT
    challenges: int = 0
    healthy_responses: int = 0
    unhealthy_responses: int = 0
    missed: int = 0
    late: int = 0
    rtt: RttHistogram = field(default_factory=RttHistogram)
    last_healthy: float | None = None
    faults: Tally[str] = field(default_factory=Tally)
    frames: Tally[str] = field(default_factory=Tally)
    connected: bool = False
    connects: int = 0
    writes_dropped: int = 0


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self._vms: dict[tuple[str, str], tuple[VMRef, VMStats]] = {}
        self.registry.register(_VMCollector(self._vms))
        r = self.registry
        self.doctor_reports = Counter(
            "vmha_doctor_reports",
            "Reports to the Doctor inspector, by result (sent, rejected)",
            ["result"],
            registry=r,
        )
        self.doctor_attempts_failed = Counter(
            "vmha_doctor_request_failures",
            "Failed requests to the inspector (retried)",
            registry=r,
        )
        self.doctor_dropped = Counter(
            "vmha_doctor_reports_dropped",
            "Reports dropped because the queue was full while the inspector was unreachable",
            registry=r,
        )
        self.doctor_queue = Gauge(
            "vmha_doctor_queue_length", "Reports waiting for the inspector", registry=r
        )
        self._kubernetes_metrics(r)
        self._messaging_metrics(r)

    def _kubernetes_metrics(self, r: CollectorRegistry) -> None:
        self.kube_requests = Counter(
            "vmha_kube_requests",
            "Requests to the Kubernetes API, by verb, resource and HTTP status (0: no answer)",
            ["verb", "resource", "code"],
            registry=r,
        )
        self.kube_request_seconds = Histogram(
            "vmha_kube_request_duration_seconds",
            "Duration of Kubernetes API requests (watches: until the first byte)",
            ["verb"],
            registry=r,
        )
        self.kube_watch_events = Counter(
            "vmha_kube_watch_events",
            "Changes received from Kubernetes watches",
            ["resource"],
            registry=r,
        )
        self.kube_relists = Counter(
            "vmha_kube_relists",
            "Full lists of a resource: initial, expired (410 Gone), error",
            ["resource", "reason"],
            registry=r,
        )
        self.kube_watch_errors = Counter(
            "vmha_kube_watch_errors",
            "Watch requests that failed (retried with backoff)",
            ["resource"],
            registry=r,
        )
        self.discovery_vmis = Gauge(
            "vmha_discovery_vmis",
            "VMIs on this node that want heartbeat, by discovery state (attached, "
            "waiting_for_socket, unresolved)",
            ["state"],
            registry=r,
        )
        self.kube_events = Counter(
            "vmha_kube_events",
            "Writes of Kubernetes Events: created, series_updated, rejected",
            ["result"],
            registry=r,
        )
        self.kube_events_recorded = Counter(
            "vmha_kube_events_recorded",
            "Occurrences recorded as Events, repeats included (they aggregate into series)",
            ["reason"],
            registry=r,
        )
        self.kube_events_dropped = Counter(
            "vmha_kube_events_dropped",
            "Events dropped because the queue was full while the API was unreachable",
            registry=r,
        )
        self.kube_events_queue = Gauge(
            "vmha_kube_events_queue_length", "Events waiting to be created", registry=r
        )
        self.kube_annotation_patches = Counter(
            "vmha_kube_annotation_patches",
            "Heartbeat annotation writes on VMIs: patched, dropped (the VMI is gone or on "
            "another node), failed (retried)",
            ["result"],
            registry=r,
        )
        self.kube_annotations_pending = Gauge(
            "vmha_kube_annotations_pending",
            "VMIs whose heartbeat annotation waits to be written",
            registry=r,
        )
        self.corrective_actions = Counter(
            "vmha_corrective_actions",
            "Corrective actions by action and outcome (taken, failed, skipped_*)",
            ["action", "outcome"],
            registry=r,
        )

    def _messaging_metrics(self, r: CollectorRegistry) -> None:
        self.messaging_messages = Counter(
            "vmha_messaging_guest_messages",
            "Server group messages from guests, by type and result (accepted, "
            "messaging_disabled, rate_limited, too_large, invalid, busy)",
            ["type", "result"],
            registry=r,
        )
        self.messaging_notifications = Counter(
            "vmha_messaging_notifications",
            "Notifications of a member's new state written to the other members' guests",
            registry=r,
        )
        self.messaging_deliveries = Counter(
            "vmha_messaging_deliveries",
            "Broadcast copies written to guests on this node, by where they came from "
            "(local: a guest on this node; peer: another node's agent)",
            ["path"],
            registry=r,
        )
        self.messaging_dropped = Counter(
            "vmha_messaging_dropped",
            "Broadcast copies dropped, by reason",
            ["reason"],
            registry=r,
        )
        self.peer_queue = Gauge(
            "vmha_peer_queue_length",
            "Broadcast copies waiting to be sent to other nodes' agents",
            registry=r,
        )
        self.peer_requests = Counter(
            "vmha_peer_requests",
            "Requests to other agents, by result (ok, refused, error, timeout)",
            ["result"],
            registry=r,
        )
        self.peer_served = Counter(
            "vmha_peer_served",
            "Requests received from other agents and the operator, by path and HTTP status",
            ["path", "code"],
            registry=r,
        )
        self.peer_refused = Counter(
            "vmha_peer_refused",
            "Requests or broadcast copies refused, by reason (no_client_cert, bad_token, "
            "wrong_service_account, no_node, not_source_node, unknown_source, "
            "messaging_disabled, target_not_local, malformed)",
            ["reason"],
            registry=r,
        )
        self.peer_agents = Gauge(
            "vmha_peer_agents",
            "Other nodes' agents known from their Leases, by state (live, stale)",
            ["state"],
            registry=r,
        )
        self.token_reviews = Counter(
            "vmha_token_reviews",
            "Checks of callers' tokens: valid, invalid, cached, error, rate_limited",
            ["result"],
            registry=r,
        )
        self.votes = Counter(
            "vmha_votes",
            "Revocable actions put to guests, by result (accept, reject, and accepted "
            "without an answer: timeout, not_registered, no_votes, not_here)",
            ["result"],
            registry=r,
        )

    def track(self, vm: VMRef) -> VMStats:
        stats = VMStats()
        self._vms[vm.key] = (vm, stats)
        return stats

    def stats(self, key: tuple[str, str]) -> VMStats | None:
        entry = self._vms.get(key)
        return entry[1] if entry else None

    def forget(self, vm: VMRef) -> None:
        """The VM left the node: its series go with it."""
        self._vms.pop(vm.key, None)


class _VMCollector(Collector):
    def __init__(self, vms: dict[tuple[str, str], tuple[VMRef, VMStats]]) -> None:
        self._vms = vms

    def collect(self) -> Iterator[Metric]:
        vms = list(self._vms.values())
        yield from _state_families(vms)
        yield from _counter_families(vms)
        yield from _channel_families(vms)
        yield _rtt_family(vms)


def _state_families(vms: list[tuple[VMRef, VMStats]]) -> Iterator[Metric]:
    count = GaugeMetricFamily("vmha_vms", "VMs the agent has a session for")
    count.add_metric([], len(vms))
    yield count
    state = GaugeMetricFamily(
        "vmha_heartbeat_state",
        "1 for the heartbeat state the VM is in, 0 for the others",
        labels=[*VM_LABELS, "state"],
    )
    last = GaugeMetricFamily(
        "vmha_heartbeat_last_healthy_timestamp_seconds",
        "Unix time of the last healthy response",
        labels=VM_LABELS,
    )
    for vm, stats in vms:
        for candidate in HeartbeatState:
            state.add_metric([vm.namespace, vm.name, candidate.value], candidate is stats.state)
        if stats.last_healthy is not None:
            last.add_metric([vm.namespace, vm.name], stats.last_healthy)
    yield state
    yield last


def _counter_families(vms: list[tuple[VMRef, VMStats]]) -> Iterator[Metric]:
    simple = {
        "challenges": ("vmha_heartbeat_challenges", "Challenges sent"),
        "missed": ("vmha_heartbeat_missed", "Challenges not answered in time"),
        "late": (
            "vmha_heartbeat_late_responses",
            "Responses to a challenge that had already been counted as missed",
        ),
    }
    for attribute, (name, text) in simple.items():
        family = CounterMetricFamily(name, text, labels=VM_LABELS)
        for vm, stats in vms:
            family.add_metric([vm.namespace, vm.name], getattr(stats, attribute))
        yield family
    responses = CounterMetricFamily(
        "vmha_heartbeat_responses",
        "Valid challenge responses, by reported health",
        labels=[*VM_LABELS, "health"],
    )
    faults = CounterMetricFamily(
        "vmha_heartbeat_faults", "Faults, by reason", labels=[*VM_LABELS, "reason"]
    )
    frames = CounterMetricFamily(
        "vmha_guest_frames",
        "Frames from the guest, by result (" + ", ".join(FRAME_RESULTS) + ")",
        labels=[*VM_LABELS, "result"],
    )
    for vm, stats in vms:
        ids = [vm.namespace, vm.name]
        responses.add_metric([*ids, "healthy"], stats.healthy_responses)
        responses.add_metric([*ids, "unhealthy"], stats.unhealthy_responses)
        for reason, count in stats.faults.items():
            faults.add_metric([*ids, reason], count)
        for result in FRAME_RESULTS:
            frames.add_metric([*ids, result], stats.frames[result])
    yield from (responses, faults, frames)


def _channel_families(vms: list[tuple[VMRef, VMStats]]) -> Iterator[Metric]:
    connected = GaugeMetricFamily(
        "vmha_channel_connected", "1 while the VM's channel socket is connected", labels=VM_LABELS
    )
    connects = CounterMetricFamily(
        "vmha_channel_connects", "Successful connections to the channel socket", labels=VM_LABELS
    )
    dropped = CounterMetricFamily(
        "vmha_channel_writes_dropped",
        "Messages not sent: channel down or the guest not reading",
        labels=VM_LABELS,
    )
    for vm, stats in vms:
        ids = [vm.namespace, vm.name]
        connected.add_metric(ids, stats.connected)
        connects.add_metric(ids, stats.connects)
        dropped.add_metric(ids, stats.writes_dropped)
    yield from (connected, connects, dropped)


def _rtt_family(vms: list[tuple[VMRef, VMStats]]) -> Metric:
    family = HistogramMetricFamily(
        "vmha_heartbeat_rtt_seconds", "Time from a challenge to its response", labels=VM_LABELS
    )
    for vm, stats in vms:
        family.add_metric(
            [vm.namespace, vm.name], stats.rtt.cumulative(), sum_value=stats.rtt.total
        )
    return family
