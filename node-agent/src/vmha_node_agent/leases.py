"""How agents find each other: one `coordination.k8s.io/v1` Lease per agent.

Each agent keeps a Lease `vmha-agent-<node>` in its own namespace (`messaging.namespace`):

    metadata:
      labels: {vmha.io/component: node-agent}
      annotations: {vmha.io/endpoint: "https://10.0.3.7:9443"}
    spec: {holderIdentity: <node>, leaseDurationSeconds: 30, renewTime: <now>}

renewed every `messaging.lease_renew_s`, and deleted when the agent stops. Every agent
watches the others' Leases: a Lease not renewed within its duration (by this agent's
clock, so node clocks must be roughly in sync, as Kubernetes assumes anyway) means that
agent is down, and copies for its node are dropped at once (`peer_down`) instead of
waiting for a connection that will not come. The operator reads the same Leases to reach
the agent of a VM's node.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from vmha_node_agent.config import AgentConfig
from vmha_node_agent.kubeapi import LEASES, MERGE_PATCH, KubeApi, KubeError
from vmha_node_agent.kubevirt import annotations_of, metadata
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.timefmt import micro_time, parse_time
from vmha_node_agent.watch import Changed, Listed, Watcher, WatchUpdate

log = logging.getLogger(__name__)

LEASE_PREFIX: Final = "vmha-agent-"
ENDPOINT_ANNOTATION: Final = "vmha.io/endpoint"
COMPONENT_LABEL: Final = "vmha.io/component"
COMPONENT: Final = "node-agent"
MAX_NAME: Final = 253


def lease_name(node: str) -> str:
    """`vmha-agent-<node>`; a node name too long for that is shortened with a hash."""
    name = LEASE_PREFIX + node
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(node.encode()).hexdigest()[:16]
    return f"{name[: MAX_NAME - 17]}-{digest}"


@dataclass(frozen=True)
class PeerEndpoint:
    node: str
    url: str
    renewed_at: float  # Unix time
    duration_s: float

    def live(self, now: float) -> bool:
        return now - self.renewed_at <= self.duration_s


def endpoint_of(lease: Mapping[str, Any]) -> PeerEndpoint | None:
    """What an agent's Lease says, if it says enough."""
    spec = lease.get("spec") or {}
    node = spec.get("holderIdentity")
    url = annotations_of(lease).get(ENDPOINT_ANNOTATION)
    renewed = parse_time(str(spec.get("renewTime") or ""))
    if not node or not url or renewed is None:
        return None
    if metadata(lease).get("name") != lease_name(str(node)):
        return None  # a Lease that names another node than its own
    return PeerEndpoint(str(node), str(url), renewed, float(spec.get("leaseDurationSeconds") or 0))


class AgentLeases:
    """Publishes this agent's endpoint and follows the other agents'."""

    def __init__(
        self,
        api: KubeApi,
        config: AgentConfig,
        metrics: AgentMetrics,
        endpoint: Callable[[], str | None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self._config = config.messaging
        self._node = config.node_name
        self._metrics = metrics
        self._endpoint = endpoint
        self._clock = clock
        self._name = lease_name(config.node_name)
        self._path = LEASES.path(self._config.namespace, self._name)
        self._peers: dict[str, PeerEndpoint] = {}
        self._published = False
        kube = config.kubernetes
        self._watcher = Watcher(
            api,
            LEASES,
            self.leases_changed,
            metrics,
            namespace=self._config.namespace,
            label_selector=f"{COMPONENT_LABEL}={COMPONENT}",
            timeout_s=kube.watch_timeout_s,
            retry_initial_s=kube.retry_initial_s,
            retry_max_s=kube.retry_max_s,
        )

    # -- what others use -------------------------------------------------------------------

    def endpoint(self, node: str) -> str | None:
        """The URL of the agent of `node`, if its Lease is fresh."""
        peer = self._peers.get(node)
        return peer.url if peer is not None and peer.live(self._clock()) else None

    def peer_up(self, node: str) -> bool:
        return self.endpoint(node) is not None

    # -- the watch -------------------------------------------------------------------------

    def leases_changed(self, update: WatchUpdate) -> None:
        match update:
            case Listed(objects):
                self._peers = {}
                for lease in objects:
                    self._add(lease)
            case Changed("DELETED", lease):
                found = endpoint_of(lease)
                if found is not None:
                    self._peers.pop(found.node, None)
            case Changed(_, lease):
                self._add(lease)
        self._update_gauge()

    def _add(self, lease: Mapping[str, Any]) -> None:
        found = endpoint_of(lease)
        if found is not None and found.node != self._node:
            self._peers[found.node] = found

    def _update_gauge(self) -> None:
        now = self._clock()
        live = sum(peer.live(now) for peer in self._peers.values())
        self._metrics.peer_agents.labels("live").set(live)
        self._metrics.peer_agents.labels("stale").set(len(self._peers) - live)

    # -- publishing ------------------------------------------------------------------------

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._watcher.run(), name="watch leases")
            tasks.create_task(self._keep_renewed(), name="lease renewal")

    async def _keep_renewed(self) -> None:
        while True:
            url = self._endpoint()
            # Until the endpoint listens, look again soon: peers should not wait a period.
            delay = self._config.lease_renew_s if url is not None else 0.1
            if url is not None:
                try:
                    await self._renew(url)
                except KubeError as error:
                    log.warning("cannot renew Lease %s: %s", self._name, error)
                    delay = min(delay, self._config.lease_renew_s / 4)
            self._update_gauge()
            await asyncio.sleep(delay)

    async def _renew(self, url: str) -> None:
        now = micro_time(self._clock())
        spec = {
            "holderIdentity": self._node,
            "leaseDurationSeconds": self._config.lease_duration_s,
            "renewTime": now,
        }
        meta = {
            "labels": {COMPONENT_LABEL: COMPONENT},
            "annotations": {ENDPOINT_ANNOTATION: url},
        }
        if self._published:
            try:
                await self._api.request(
                    "patch", LEASES, self._path, body={"metadata": meta, "spec": spec},
                    content_type=MERGE_PATCH,
                )  # fmt: skip
                return
            except KubeError as error:
                if not error.not_found:
                    raise
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self._name, **meta},
            "spec": {**spec, "acquireTime": now},
        }
        try:
            await self._api.request(
                "create", LEASES, LEASES.path(self._config.namespace), body=body
            )
        except KubeError as error:
            if error.status != 409:
                raise
            # Left by this node's previous agent: take it over.
            await self._api.request(
                "patch", LEASES, self._path, body={"metadata": meta, "spec": spec},
                content_type=MERGE_PATCH,
            )  # fmt: skip
        if not self._published:
            log.info("published endpoint %s in Lease %s/%s", url, self._config.namespace,
                     self._name)  # fmt: skip
        self._published = True

    async def drain(self, timeout_s: float) -> None:
        """At shutdown: delete the Lease, so that the others stop sending at once."""
        if not self._published:
            return
        with contextlib.suppress(KubeError, TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._api.request("delete", LEASES, self._path)
                log.info("deleted Lease %s", self._name)
