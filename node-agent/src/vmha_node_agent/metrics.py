"""Prometheus metrics of the node agent (`vmha_*`; per-VM series carry namespace and vm).

Per-VM series are removed when the VM leaves the node, so a node's scrape only ever shows
the VMs it runs.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vmha_node_agent.heartbeat import HeartbeatState
from vmha_node_agent.inventory import VMRef

VM_LABELS = ("namespace", "vm")
RTT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.state = Gauge(
            "vmha_heartbeat_state",
            "1 for the heartbeat state the VM is in, 0 for the others",
            [*VM_LABELS, "state"],
            registry=r,
        )
        self.challenges = Counter(
            "vmha_heartbeat_challenges", "Challenges sent", VM_LABELS, registry=r
        )
        self.responses = Counter(
            "vmha_heartbeat_responses",
            "Valid challenge responses, by reported health",
            [*VM_LABELS, "health"],
            registry=r,
        )
        self.missed = Counter(
            "vmha_heartbeat_missed", "Challenges not answered in time", VM_LABELS, registry=r
        )
        self.late = Counter(
            "vmha_heartbeat_late_responses",
            "Responses to a challenge that had already been counted as missed",
            VM_LABELS,
            registry=r,
        )
        self.rtt = Histogram(
            "vmha_heartbeat_rtt_seconds",
            "Time from a challenge to its response",
            VM_LABELS,
            buckets=RTT_BUCKETS,
            registry=r,
        )
        self.last_healthy = Gauge(
            "vmha_heartbeat_last_healthy_timestamp_seconds",
            "Unix time of the last healthy response",
            VM_LABELS,
            registry=r,
        )
        self.faults = Counter(
            "vmha_heartbeat_faults", "Faults, by reason", [*VM_LABELS, "reason"], registry=r
        )
        self.guest_frames = Counter(
            "vmha_guest_frames",
            "Frames from the guest, by result (accepted, garbage, oversize, invalid, rate_limited)",
            [*VM_LABELS, "result"],
            registry=r,
        )
        self.channel_connected = Gauge(
            "vmha_channel_connected",
            "1 while the VM's channel socket is connected",
            VM_LABELS,
            registry=r,
        )
        self.channel_connects = Counter(
            "vmha_channel_connects",
            "Successful connections to the channel socket",
            VM_LABELS,
            registry=r,
        )
        self.writes_dropped = Counter(
            "vmha_channel_writes_dropped",
            "Messages not sent: channel down or the guest not reading",
            VM_LABELS,
            registry=r,
        )
        self.vms = Gauge("vmha_vms", "VMs the agent has a session for", registry=r)
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
        self._per_vm = (
            self.state, self.challenges, self.responses, self.missed, self.late, self.rtt,
            self.last_healthy, self.faults, self.guest_frames, self.channel_connected,
            self.channel_connects, self.writes_dropped,
        )  # fmt: skip

    def set_state(self, vm: VMRef, state: HeartbeatState) -> None:
        for candidate in HeartbeatState:
            self.state.labels(vm.namespace, vm.name, candidate.value).set(
                1 if candidate is state else 0
            )

    def forget(self, vm: VMRef) -> None:
        """Remove every series of a VM that left the node."""
        labels = {"namespace": vm.namespace, "vm": vm.name}
        for metric in self._per_vm:
            metric.remove_by_labels(labels)
