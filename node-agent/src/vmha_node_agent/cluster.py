"""The agent's Kubernetes side, wired together: discovery, Events, the heartbeat annotation,
corrective actions, and server group messaging (the group directory, the messenger, and —
with TLS and a token configured — the other agents: Leases, the HTTPS endpoint, the
sender), sharing one API client."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

from vmha_node_agent.actions import CorrectiveActor
from vmha_node_agent.agent import Service
from vmha_node_agent.annotations import HeartbeatAnnotations
from vmha_node_agent.config import AgentConfig, ConfigError, MessagingConfig
from vmha_node_agent.discovery import KubernetesVMSource
from vmha_node_agent.events import EventRecorder, HeartbeatEvents
from vmha_node_agent.kubeapi import KubeApi, load_client
from vmha_node_agent.kubevirt import Key
from vmha_node_agent.leases import AgentLeases
from vmha_node_agent.members import GroupDirectory
from vmha_node_agent.messenger import GroupMessenger
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.peerclient import PeerSender
from vmha_node_agent.peerserver import PeerServer, PeerService
from vmha_node_agent.ratelimit import TokenBucket
from vmha_node_agent.reporting import TransitionSink
from vmha_node_agent.session import VMSession
from vmha_node_agent.tls import RotatingContexts
from vmha_node_agent.tokens import TokenFile, TokenReviewer
from vmha_node_agent.votes import VoteBox


@dataclass(frozen=True)
class Cluster:
    api: KubeApi
    source: KubernetesVMSource
    events: EventRecorder
    sinks: list[TransitionSink]
    services: list[Service]
    messenger: GroupMessenger


def connect(
    config: AgentConfig, metrics: AgentMetrics, sessions: Mapping[Key, VMSession]
) -> Cluster:
    """Everything the agent needs to work in the cluster; ConfigError when there are no
    usable credentials (no kubeconfig, not in a pod) or the messaging setup is unusable."""
    kube = config.kubernetes
    try:
        client = load_client(kube.kubeconfig)
    except Exception as error:  # the loaders raise several types for one thing: no config
        where = kube.kubeconfig or "the in-cluster service account"
        raise ConfigError(f"no Kubernetes credentials from {where}: {error}") from None
    api = KubeApi(
        client,
        metrics,
        timeout_s=kube.request_timeout_s,
        write_budget=TokenBucket(kube.write_qps, kube.write_burst),
    )
    directory = GroupDirectory()
    source = KubernetesVMSource(api, config, metrics, listeners=[directory])
    recorder = EventRecorder(api, config, metrics)
    annotations = HeartbeatAnnotations(api, config, metrics, source.vmi)
    actor = CorrectiveActor(api, config, metrics, recorder, sessions)
    # Order matters: a fault's Event is queued before the Event of the action it causes.
    sinks: list[TransitionSink] = [
        HeartbeatEvents(recorder, source.vmi, config.node_name),
        annotations,
        actor,
    ]
    services: list[Service] = [source, recorder, annotations, actor]
    if not config.messaging.peer_transport:
        messenger = GroupMessenger(config, metrics, directory, sessions)
        return Cluster(api, source, recorder, sinks, services, messenger)
    messenger, peer_services = _peers(config, metrics, api, directory, sessions)
    return Cluster(api, source, recorder, sinks, services + peer_services, messenger)


def _peers(
    config: AgentConfig,
    metrics: AgentMetrics,
    api: KubeApi,
    directory: GroupDirectory,
    sessions: Mapping[Key, VMSession],
) -> tuple[GroupMessenger, list[Service]]:
    """The messenger with its way to the other agents, and the services that make it."""
    messaging = config.messaging
    assert messaging.token_file is not None
    try:
        contexts = RotatingContexts(messaging.tls)
    except (OSError, ValueError) as error:  # ssl.SSLError is an OSError
        raise ConfigError(f"messaging.tls: {error}") from None
    reviewer = TokenReviewer(
        api,
        messaging.token_audience,
        metrics,
        cache_max_s=messaging.token_cache_max_s,
        reviews_per_second=messaging.token_reviews_per_second,
        review_burst=messaging.token_review_burst,
    )
    # The Lease publishes the endpoint's URL once it listens (late-bound: made below).
    leases = AgentLeases(api, config, metrics, lambda: service.url())  # noqa: PLW0108
    sender = PeerSender(
        messaging,
        metrics,
        leases.endpoint,
        TokenFile(messaging.token_file),
        lambda: contexts.client,
    )
    messenger = GroupMessenger(config, metrics, directory, sessions, sender)
    server = PeerServer(messaging, metrics, reviewer, messenger, VoteBox(config, metrics, sessions))
    service = PeerService(server, messaging, contexts, _advertised(messaging))
    return messenger, [service, leases, sender]


def _advertised(messaging: MessagingConfig) -> str:
    address = messaging.advertise_address or messaging.address
    try:
        unspecified = ipaddress.ip_address(address).is_unspecified
    except ValueError:
        unspecified = False  # a host name
    if unspecified:
        raise ConfigError(
            f"messaging: listening on {address}, set advertise_address (the chart passes "
            "$POD_IP) so that other agents can reach this one"
        )
    return address
