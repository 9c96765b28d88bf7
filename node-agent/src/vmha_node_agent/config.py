"""Node agent configuration: a YAML file, every key with a default."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from vmha_protocol.heartbeat import CorrectiveAction


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HeartbeatPolicy(_Section):
    """Bounds the agent puts on what guests ask for, when a silence becomes a fault, and what
    to do about a fault. The agent's defaults; a VMGroup and per-VM annotations override them
    for VMs found in Kubernetes (see `policy.py`)."""

    min_interval_ms: Annotated[int, Field(ge=10)] = 100
    max_interval_ms: Annotated[int, Field(ge=10)] = 60_000
    missed_threshold: Annotated[int, Field(ge=1, le=100)] = 3
    corrective_action: CorrectiveAction = "log"
    # A VM whose annotation says it was registered (before an agent restart, or on the node it
    # migrated from) must register again within this long — or 12 of its intervals, if more —
    # or it is failed: a guest that hung while no agent watched is still found.
    reregister_grace_s: Annotated[float, Field(gt=0)] = 30.0

    @model_validator(mode="after")
    def _ordered(self) -> HeartbeatPolicy:
        if self.min_interval_ms > self.max_interval_ms:
            raise ValueError("min_interval_ms is greater than max_interval_ms")
        return self

    def clamp_interval_ms(self, requested_ms: int) -> int:
        return max(self.min_interval_ms, min(self.max_interval_ms, requested_ms))


class GuestLimits(_Section):
    """Per-VM limits on untrusted guest input (PROTOCOL.md §2: frames are at most 8 KiB)."""

    frames_per_second: Annotated[float, Field(gt=0)] = 50.0
    frame_burst: Annotated[int, Field(ge=1)] = 100
    bytes_per_second: Annotated[int, Field(ge=8192)] = 256 * 1024
    # Writes queued towards a guest that does not read (paused, hung): beyond this we drop.
    max_write_buffer_bytes: Annotated[int, Field(ge=4096)] = 64 * 1024


class ChannelPolicy(_Section):
    reconnect_initial_s: Annotated[float, Field(gt=0)] = 0.1
    reconnect_max_s: Annotated[float, Field(gt=0)] = 5.0


class DoctorConfig(_Section):
    """OPNFV Doctor inspector; reporting is off when `url` is empty."""

    url: str | None = None
    token: str | None = None
    token_file: Path | None = None
    queue_size: Annotated[int, Field(ge=1)] = 1000
    batch_size: Annotated[int, Field(ge=1)] = 50
    timeout_s: Annotated[float, Field(gt=0)] = 5.0
    retry_initial_s: Annotated[float, Field(gt=0)] = 0.5
    retry_max_s: Annotated[float, Field(gt=0)] = 30.0
    event_type: str = "vmha.guest.heartbeat"
    # On shutdown, how long to keep trying to deliver what is still queued.
    drain_timeout_s: Annotated[float, Field(ge=0)] = 5.0

    def auth_token(self) -> str | None:
        if self.token_file is not None:
            return self.token_file.read_text().strip()
        return self.token


class MetricsConfig(_Section):
    address: str = "127.0.0.1"
    port: Annotated[int, Field(ge=0, le=65535)] = 9810


class KubernetesConfig(_Section):
    """Discovery of VMs and reporting through the Kubernetes API."""

    # None: on when a kubeconfig is given or the agent runs in a pod (in-cluster config).
    enabled: bool | None = None
    kubeconfig: Path | None = None
    # Where the host's kubelet keeps its pods (the chart mounts it at the same path).
    kubelet_root: Path = Path("/var/lib/kubelet")
    # How often VMs waiting for their channel socket are looked at again (one stat each).
    socket_poll_s: Annotated[float, Field(gt=0)] = 0.5
    request_timeout_s: Annotated[float, Field(gt=0)] = 20.0
    # Server-side end of each watch request; the watch resumes from where it stopped.
    watch_timeout_s: Annotated[int, Field(ge=10)] = 300
    retry_initial_s: Annotated[float, Field(gt=0)] = 0.5
    retry_max_s: Annotated[float, Field(gt=0)] = 30.0
    # Writes (Events, annotations, actions) share one budget, so a storm of faults cannot
    # turn into a storm of requests.
    write_qps: Annotated[float, Field(gt=0)] = 10.0
    write_burst: Annotated[int, Field(ge=1)] = 50
    drain_timeout_s: Annotated[float, Field(ge=0)] = 5.0

    def wanted(self) -> bool:
        if self.enabled is not None:
            return self.enabled
        return self.kubeconfig is not None or bool(os.environ.get("KUBERNETES_SERVICE_HOST"))


class EventsConfig(_Section):
    """Kubernetes Events on the VMI (events.k8s.io/v1)."""

    # Events waiting while the API is unreachable; beyond this the oldest is dropped.
    queue_size: Annotated[int, Field(ge=1)] = 1000
    # A repeat of the same Event updates its series at most this often.
    series_update_s: Annotated[float, Field(ge=0)] = 30.0
    # A repeat after this long starts a new Event instead of extending the series.
    series_window_s: Annotated[float, Field(gt=0)] = 1800.0
    # Series remembered at most (the least recently seen are forgotten first).
    max_series: Annotated[int, Field(ge=1)] = 10_000


class CorrectiveActionsConfig(_Section):
    """Limits on disruptive corrective actions (reboot, stop); `log` is never limited."""

    # At most one action per VM in this time, whatever its faults.
    per_vm_interval_s: Annotated[float, Field(ge=0)] = 600.0
    # At most `per_node_limit` actions on this node in any `per_node_window_s`.
    per_node_limit: Annotated[int, Field(ge=0)] = 3
    per_node_window_s: Annotated[float, Field(gt=0)] = 600.0
    # The guest's notice time is honoured up to this long.
    max_notice_s: Annotated[float, Field(ge=0)] = 60.0
    # An action the API did not accept is retried for this long.
    retry_for_s: Annotated[float, Field(ge=0)] = 60.0


class PeerTLS(_Section):
    """Mutual TLS between agents (and with the operator): a CA and certificates shared by
    every agent (the chart's Secret). The client certificate defaults to the serving one
    (one certificate with both the serverAuth and clientAuth usages)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    client_cert_file: Path | None = None
    client_key_file: Path | None = None

    @property
    def complete(self) -> bool:
        return None not in (self.ca_file, self.cert_file, self.key_file)

    def client_pair(self) -> tuple[Path, Path]:
        assert self.cert_file is not None and self.key_file is not None
        if self.client_cert_file is not None and self.client_key_file is not None:
            return self.client_cert_file, self.client_key_file
        return self.cert_file, self.key_file


class MessagingConfig(_Section):
    """Server group messaging (PROTOCOL.md §5) and the agent-to-agent endpoint.

    Members on this node always talk through this agent. Members on other nodes are
    reached through their node's agent over HTTPS with mutual TLS, when `tls` and
    `token_file` are set (the chart sets both); without them remote copies are dropped and
    counted (`no_peer_transport`)."""

    enabled: bool = True
    # The agent-to-agent (and operator-to-agent) HTTPS endpoint.
    address: str = "127.0.0.1"  # the chart sets 0.0.0.0
    port: Annotated[int, Field(ge=0, le=65535)] = 9443
    # Published in this agent's Lease; default $POD_IP, else `address` (0.0.0.0: refused).
    advertise_address: str | None = Field(default_factory=lambda: os.environ.get("POD_IP"))
    # Where the agents' Leases live (the agents' own namespace).
    namespace: str = Field(default_factory=lambda: os.environ.get("POD_NAMESPACE") or "vmha-system")
    tls: PeerTLS = PeerTLS()
    # This agent's pod-bound ServiceAccount token with audience `token_audience` (a
    # projected volume), sent to other agents; re-read when it changes.
    token_file: Path | None = None
    token_audience: str = "vmha.io/node-agent"
    # ServiceAccounts (names in `namespace`, or "namespace/name") whose tokens are accepted:
    # the agents' for broadcasts, the operator's for votes.
    agent_service_account: str = "vmha-node-agent"
    operator_service_account: str = "vmha-operator"
    # Per VM: what a guest may send.
    broadcasts_per_second: Annotated[float, Field(gt=0)] = 10.0
    broadcast_burst: Annotated[int, Field(ge=1)] = 20
    status_queries_per_second: Annotated[float, Field(gt=0)] = 5.0
    status_query_burst: Annotated[int, Field(ge=1)] = 10
    # A member's changes within this time make one notification (its latest state).
    notification_delay_s: Annotated[float, Field(ge=0, le=0.5)] = 0.05
    # How long a guest that does not read may hold up its status response.
    status_write_timeout_s: Annotated[float, Field(gt=0)] = 5.0
    # Towards each other node: messages queued at most (beyond: dropped), per request,
    # and how long a request may take.
    peer_queue_size: Annotated[int, Field(ge=1)] = 1000
    peer_batch_size: Annotated[int, Field(ge=1, le=256)] = 64
    peer_timeout_s: Annotated[float, Field(gt=0)] = 2.0
    # After a failed request, copies for that node are dropped for this long (doubling).
    peer_retry_initial_s: Annotated[float, Field(gt=0)] = 0.5
    peer_retry_max_s: Annotated[float, Field(gt=0)] = 10.0
    # The Lease that publishes this agent's endpoint; older than its duration = agent down.
    lease_duration_s: Annotated[int, Field(ge=5)] = 30
    lease_renew_s: Annotated[float, Field(gt=0)] = 10.0
    # Verdicts of TokenReview are kept until the token expires, at most this long.
    token_cache_max_s: Annotated[float, Field(ge=0)] = 600.0
    token_reviews_per_second: Annotated[float, Field(gt=0)] = 20.0
    token_review_burst: Annotated[int, Field(ge=1)] = 50
    # A vote on a revocable action waits for the guest at most this long (the operator's
    # webhook must answer within its own timeout).
    max_vote_s: Annotated[float, Field(ge=0)] = 7.0

    @model_validator(mode="after")
    def _lease_renewed_in_time(self) -> MessagingConfig:
        if self.lease_renew_s * 2 > self.lease_duration_s:
            raise ValueError("lease_renew_s must be at most half of lease_duration_s")
        return self

    def account(self, name: str) -> str:
        """The user name Kubernetes gives tokens of ServiceAccount `name`."""
        namespace, _, account = name.rpartition("/")
        return f"system:serviceaccount:{namespace or self.namespace}:{account}"

    @property
    def peer_transport(self) -> bool:
        """Whether this agent can reach other agents (and be reached)."""
        return self.enabled and self.tls.complete and self.token_file is not None


class StaticVM(_Section):
    """A VM given by configuration (no Kubernetes): its identity and channel socket."""

    name: str
    namespace: str = "default"
    socket: Path
    uid: str = ""


class AgentConfig(_Section):
    node_name: str = Field(
        default_factory=lambda: os.environ.get("NODE_NAME") or socket.gethostname()
    )
    heartbeat: HeartbeatPolicy = HeartbeatPolicy()
    guest_limits: GuestLimits = GuestLimits()
    channel: ChannelPolicy = ChannelPolicy()
    doctor: DoctorConfig = DoctorConfig()
    metrics: MetricsConfig = MetricsConfig()
    kubernetes: KubernetesConfig = KubernetesConfig()
    events: EventsConfig = EventsConfig()
    corrective_actions: CorrectiveActionsConfig = CorrectiveActionsConfig()
    messaging: MessagingConfig = Field(default_factory=MessagingConfig)
    vms: list[StaticVM] = []


class ConfigError(Exception):
    pass


def load_config(path: Path | None) -> AgentConfig:
    """Read and validate the YAML file; a missing path means all defaults."""
    if path is None:
        return AgentConfig()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return AgentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {_first_errors(exc)}") from None


def _first_errors(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False)[:5]:
        where = ".".join(str(p) for p in error["loc"])
        parts.append(f"{where}: {error['msg']}")
    return "; ".join(parts)
