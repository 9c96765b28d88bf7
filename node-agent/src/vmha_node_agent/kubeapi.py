"""The Kubernetes API as the agent uses it: JSON over the official client's connection.

The `kubernetes` package provides the credentials (kubeconfig, or the pod's service account
with token refresh) and the connection pool; requests and responses stay plain JSON, so
custom resources (VMIs, VMGroups) and built-in ones are handled alike. The client is
synchronous: `request` runs a call in a worker thread, watches run in threads of their own
(`watch.py`). Every request is counted by verb, resource and status.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import kubernetes.client
import kubernetes.config
import urllib3
from kubernetes.client.exceptions import ApiException

from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.ratelimit import TokenBucket

JSON_PATCH: Final = "application/json-patch+json"
MERGE_PATCH: Final = "application/merge-patch+json"
CONNECT_TIMEOUT_S: Final = 5.0

_METHODS: Final = {
    "get": "GET",
    "list": "GET",
    "watch": "GET",
    "create": "POST",
    "update": "PUT",
    "patch": "PATCH",
    "delete": "DELETE",
    # TokenReview: a POST that writes nothing, so it stays out of the write budget.
    "review": "POST",
}
_WRITES: Final = frozenset({"create", "update", "patch", "delete"})


@dataclass(frozen=True)
class Resource:
    """A resource type and where its objects live in the REST API."""

    group: str
    version: str
    plural: str

    def path(self, namespace: str | None = None, name: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        if namespace is not None:
            base += f"/namespaces/{quote(namespace, safe='')}"
        base += f"/{self.plural}"
        if name is not None:
            base += f"/{quote(name, safe='')}"
        return base


PODS: Final = Resource("", "v1", "pods")
VMIS: Final = Resource("kubevirt.io", "v1", "virtualmachineinstances")
VMS: Final = Resource("kubevirt.io", "v1", "virtualmachines")
VMGROUPS: Final = Resource("vmha.io", "v1alpha1", "vmgroups")
EVENTS: Final = Resource("events.k8s.io", "v1", "events")
LEASES: Final = Resource("coordination.k8s.io", "v1", "leases")
TOKENREVIEWS: Final = Resource("authentication.k8s.io", "v1", "tokenreviews")


class KubeError(Exception):
    """A request that did not succeed: `status` is the HTTP status, 0 when none came."""

    def __init__(self, status: int, message: str, body: Any = None) -> None:
        super().__init__(f"{status or 'no answer'}: {message}")
        self.status = status
        self.body = body

    @property
    def transient(self) -> bool:
        """Worth retrying: the API was unreachable, overloaded or failed on its side."""
        return self.status in (0, 429) or self.status >= 500

    @property
    def not_found(self) -> bool:
        return self.status == 404


def load_client(kubeconfig: Path | None) -> kubernetes.client.ApiClient:
    """A client from `kubeconfig`, else from the pod's service account (in-cluster)."""
    configuration = kubernetes.client.Configuration()
    if kubeconfig is not None:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=str(kubeconfig), client_configuration=configuration
        )
    else:
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    # One quick retry for a pooled connection the server closed; our callers retry the rest
    # with backoff.
    configuration.retries = 1
    return kubernetes.client.ApiClient(configuration)


class KubeApi:
    def __init__(
        self,
        client: kubernetes.client.ApiClient,
        metrics: AgentMetrics,
        *,
        timeout_s: float,
        write_budget: TokenBucket,
    ) -> None:
        self._client = client
        self._metrics = metrics
        self._timeout_s = timeout_s
        self._write_budget = write_budget

    def close(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]

    async def request(
        self,
        verb: str,
        resource: Resource,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> Any:
        """One request, in a worker thread; the parsed JSON answer. Writes wait for the
        shared write budget first. Raises KubeError."""
        if verb in _WRITES:
            delay = self._write_budget.take_debt(1)
            if delay > 0:
                await asyncio.sleep(delay)
        return await asyncio.to_thread(
            self.call, verb, resource, path, query=query, body=body, content_type=content_type
        )

    def call(
        self,
        verb: str,
        resource: Resource,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
    ) -> Any:
        """The same, blocking (for threads)."""
        response = self._send(
            verb, resource, path, query=query, body=body, content_type=content_type,
            read_timeout_s=self._timeout_s,
        )  # fmt: skip
        try:
            data = response.read()
        except (urllib3.exceptions.HTTPError, OSError) as error:
            raise KubeError(0, f"{verb} {path}: {error}") from None
        finally:
            response.release_conn()
        try:
            return json.loads(data) if data else None
        except ValueError:
            raise KubeError(response.status, f"{verb} {path}: not JSON") from None

    def open_watch(
        self, resource: Resource, path: str, query: Mapping[str, str], read_timeout_s: float
    ) -> urllib3.BaseHTTPResponse:
        """Start a watch; the caller reads the stream of events (one JSON object a line)."""
        return self._send("watch", resource, path, query=query, read_timeout_s=read_timeout_s)

    def _send(
        self,
        verb: str,
        resource: Resource,
        path: str,
        *,
        query: Mapping[str, str] | None,
        body: Any = None,
        content_type: str | None = None,
        read_timeout_s: float,
    ) -> urllib3.BaseHTTPResponse:
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type or "application/json"
        method, url, headers, body, _ = self._client.param_serialize(
            method=_METHODS[verb],
            resource_path=path,
            query_params=list((query or {}).items()),
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        started = time.monotonic()
        try:
            rest = self._client.call_api(
                method,
                url,
                header_params=headers,
                body=body,
                _request_timeout=(CONNECT_TIMEOUT_S, read_timeout_s),
            )
        except (ApiException, urllib3.exceptions.HTTPError, OSError) as error:
            self._count(verb, resource, 0, started)
            raise KubeError(0, f"{verb} {path}: {error}") from None
        response: urllib3.BaseHTTPResponse = rest.response
        self._count(verb, resource, response.status, started)
        if response.status >= 300:
            raise _error(verb, path, response)
        return response

    def _count(self, verb: str, resource: Resource, status: int, started: float) -> None:
        self._metrics.kube_requests.labels(verb, resource.plural, str(status)).inc()
        self._metrics.kube_request_seconds.labels(verb).observe(time.monotonic() - started)


def _error(verb: str, path: str, response: urllib3.BaseHTTPResponse) -> KubeError:
    try:
        raw = response.read()
    except (urllib3.exceptions.HTTPError, OSError):
        raw = b""
    finally:
        response.release_conn()
    body: Any
    try:
        body = json.loads(raw)
        message = str(body.get("message", "")) if isinstance(body, dict) else str(body)
    except ValueError:
        body, message = raw.decode(errors="replace")[:500], ""
    return KubeError(response.status, f"{verb} {path}: {message or response.reason}", body)
