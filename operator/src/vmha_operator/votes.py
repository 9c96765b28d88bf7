"""Votes on revocable actions: before a group member is live-migrated or stopped, its guest
is asked (the original's vote), through the node agent of the VM's node.

    admission (VMIM CREATE; VM update to runStrategy Halted / running false)
      → the VMI's node → that agent's Lease (`vmha-agent-<node>`, annotation vmha.io/endpoint)
      → POST <endpoint>/v1/votes {namespace, vm, event_type, timeout_ms}   (mutual TLS and
        the operator's ServiceAccount token, audience vmha.io/node-agent)
      → the agent sends the guest a revocable action_notify and returns its answer

A `reject` refuses the request with the guest's reason. Anything else lets it through:
the guest accepted, did not answer in time, did not register for votes, or its agent
could not be reached (then kubectl shows a warning). Votes are advisory — the platform
never waits on a broken guest — and bounded: the agent gives the guest at most
`timeout_s`, and the request to the agent gives up shortly after, well inside the
webhook's own timeout.

The Lease conventions mirror `vmha_node_agent.leases` (a unit test holds them together).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import ssl
import time
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

import aiohttp

from vmha_operator import kube

logger = logging.getLogger(__name__)

LEASE_PREFIX: Final = "vmha-agent-"
ENDPOINT_ANNOTATION: Final = "vmha.io/endpoint"
VOTES_PATH: Final = "/v1/votes"
LEASES: Final = kube.Resource("coordination.k8s.io", "v1", "leases")
MIGRATE: Final = "live_migrate_begin"
STOP: Final = "stop"
# How much longer than the guest's time the request to the agent may take.
REQUEST_MARGIN_S: Final = 1.5


def lease_name(node: str) -> str:
    """The Lease of the agent of `node` (as `vmha_node_agent.leases.lease_name`)."""
    name = LEASE_PREFIX + node
    if len(name) <= 253:
        return name
    digest = hashlib.sha256(node.encode()).hexdigest()[:16]
    return f"{name[:236]}-{digest}"


@dataclasses.dataclass(frozen=True)
class VoteSettings:
    """How to reach the agents; votes are off unless every file is given."""

    agent_namespace: str = "vmha-system"
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    token_file: str | None = None
    # The most a guest gets to answer (the webhook must answer within its own timeout).
    timeout_s: float = 7.0

    @property
    def enabled(self) -> bool:
        return None not in (self.ca_file, self.cert_file, self.key_file, self.token_file)


@dataclasses.dataclass(frozen=True)
class Ballot:
    result: Literal["accept", "reject"]
    reason: str = ""
    asked: bool = False  # the guest was asked
    reached: bool = True  # the agent answered (False: accepted without asking anyone)


def stops(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether a VirtualMachine update stops it: `spec.runStrategy` becomes `Halted`, or
    `spec.running` becomes false."""
    if old is None:
        return False
    before, after = old.get("spec") or {}, new.get("spec") or {}
    if after.get("runStrategy") == "Halted" and before.get("runStrategy") != "Halted":
        return True
    return after.get("running") is False and before.get("running") is not False


def by_node_agent(userinfo: Mapping[str, Any] | None, agent_namespace: str) -> bool:
    """Whether the request comes from a ServiceAccount of the agents' namespace: a node
    agent taking its corrective action, which is irrevocable (the agent notifies the guest;
    nobody votes on it)."""
    username = str((userinfo or {}).get("username") or "")
    return username.startswith(f"system:serviceaccount:{agent_namespace}:")


def running_node(vmi: Mapping[str, Any] | None) -> str | None:
    """The node of a VMI that runs (a guest that can be asked), if any."""
    if vmi is None:
        return None
    status = vmi.get("status") or {}
    if status.get("phase") != "Running":
        return None
    node = status.get("nodeName")
    return str(node) if node else None


def endpoint_of(lease: Mapping[str, Any] | None, now: float) -> str | None:
    """The agent's URL, if its Lease is fresh."""
    if lease is None:
        return None
    spec = lease.get("spec") or {}
    url = ((lease.get("metadata") or {}).get("annotations") or {}).get(ENDPOINT_ANNOTATION)
    try:
        renewed = datetime.fromisoformat(str(spec.get("renewTime")).replace("Z", "+00:00"))
    except ValueError:
        return None
    duration = float(spec.get("leaseDurationSeconds") or 0)
    if not url or now - renewed.timestamp() > duration:
        return None
    return str(url)


class AgentVotes:
    """Asks the agent of a node for its guest's vote."""

    def __init__(self, settings: VoteSettings, client: kube.KubeClient) -> None:
        self._settings = settings
        self._client = client
        self._http: aiohttp.ClientSession | None = None

    async def ask(self, namespace: str, vm: str, node: str, event_type: str) -> Ballot:
        settings = self._settings
        if not settings.enabled:
            return Ballot("accept", "votes are not configured", reached=False)
        lease = await self._client.get(LEASES.path(settings.agent_namespace, lease_name(node)))
        url = endpoint_of(lease, time.time())
        if url is None:
            return Ballot("accept", f"no live vmha agent on node {node}", reached=False)
        body = {
            "namespace": namespace,
            "vm": vm,
            "event_type": event_type,
            "timeout_ms": int(settings.timeout_s * 1000),
        }
        try:
            answer = await self._post(url + VOTES_PATH, body)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as error:
            logger.warning("vote on %s of %s/%s: agent %s: %s", event_type, namespace, vm, url,
                           error or type(error).__name__)  # fmt: skip
            return Ballot("accept", f"the vmha agent on node {node} did not answer", reached=False)
        reason, asked = str(answer.get("reason") or ""), bool(answer.get("asked"))
        if answer.get("result") == "reject":
            return Ballot("reject", reason, asked)
        return Ballot("accept", reason, asked)

    async def _post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        settings = self._settings
        assert settings.token_file is not None
        token = (await asyncio.to_thread(Path(settings.token_file).read_text)).strip()
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        async with self._session().post(url, data=json.dumps(body), headers=headers) as response:
            text = await response.text()
            if response.status != 200:
                raise ValueError(f"HTTP {response.status}: {text[:200]}")
            answer: dict[str, Any] = json.loads(text)
            return answer

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            settings = self._settings
            context = ssl.create_default_context(cafile=settings.ca_file)
            context.check_hostname = False  # agents share one certificate; the CA is the check
            assert settings.cert_file is not None
            context.load_cert_chain(settings.cert_file, settings.key_file)
            timeout = aiohttp.ClientTimeout(total=settings.timeout_s + REQUEST_MARGIN_S)
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context), timeout=timeout
            )
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
