"""The agent's Kubernetes side, wired together: discovery, Events, the heartbeat annotation
and corrective actions, sharing one API client."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vmha_node_agent.actions import CorrectiveActor
from vmha_node_agent.agent import Service
from vmha_node_agent.annotations import HeartbeatAnnotations
from vmha_node_agent.config import AgentConfig, ConfigError
from vmha_node_agent.discovery import KubernetesVMSource
from vmha_node_agent.events import EventRecorder, HeartbeatEvents
from vmha_node_agent.kubeapi import KubeApi, load_client
from vmha_node_agent.kubevirt import Key
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.ratelimit import TokenBucket
from vmha_node_agent.reporting import TransitionSink
from vmha_node_agent.session import VMSession


@dataclass(frozen=True)
class Cluster:
    api: KubeApi
    source: KubernetesVMSource
    events: EventRecorder
    sinks: list[TransitionSink]
    services: list[Service]


def connect(
    config: AgentConfig, metrics: AgentMetrics, sessions: Mapping[Key, VMSession]
) -> Cluster:
    """Everything the agent needs to work in the cluster; ConfigError when there are no
    usable credentials (no kubeconfig, not in a pod)."""
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
    source = KubernetesVMSource(api, config, metrics)
    recorder = EventRecorder(api, config, metrics)
    annotations = HeartbeatAnnotations(api, config, metrics, source.vmi)
    actor = CorrectiveActor(api, config, metrics, recorder, sessions)
    # Order matters: a fault's Event is queued before the Event of the action it causes.
    sinks: list[TransitionSink] = [
        HeartbeatEvents(recorder, source.vmi, config.node_name),
        annotations,
        actor,
    ]
    return Cluster(api, source, recorder, sinks, [source, recorder, annotations, actor])
