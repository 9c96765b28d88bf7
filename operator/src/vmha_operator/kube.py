"""A small asyncio client for the few Kubernetes API calls the operator makes.

kopf watches and serves admission; this client reads and writes the objects the handlers
need (VMGroups, VMs, VMIs, ConfigMaps, Events) with plain JSON over aiohttp, so nothing blocks
the event loop. Credentials come from the official client's loaders (kubeconfig or in-cluster
service account), the same way kopf logs in; the bearer token is re-read through the loader's
refresh hook on every request, so rotated service-account tokens keep working.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
from collections.abc import Mapping
from typing import Any, Final
from urllib.parse import quote

import aiohttp
import kubernetes.client
import kubernetes.config

MERGE_PATCH: Final = "application/merge-patch+json"
REQUEST_TIMEOUT_SECONDS: Final = 20.0


class ApiError(Exception):
    """A non-2xx answer from the apiserver."""

    def __init__(self, status: int, body: Any, method: str, path: str) -> None:
        self.status = status
        self.body = body
        message = body.get("message") if isinstance(body, Mapping) else str(body)
        super().__init__(f"{method} {path}: {status} {message}")

    @property
    def not_found(self) -> bool:
        return self.status == 404

    @property
    def conflict(self) -> bool:
        return self.status == 409

    @property
    def transient(self) -> bool:
        """Worth retrying: a conflict, throttling, or trouble on the server's side."""
        return self.status in (409, 429) or self.status >= 500


@dataclasses.dataclass(frozen=True)
class Resource:
    """A namespaced resource type: where its objects live in the REST API."""

    group: str
    version: str
    plural: str

    def path(self, namespace: str, name: str | None = None, subresource: str | None = None) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        path = f"{base}/namespaces/{quote(namespace)}/{self.plural}"
        if name is not None:
            path += f"/{quote(name)}"
        if subresource is not None:
            path += f"/{subresource}"
        return path


VMGROUPS: Final = Resource("vmha.io", "v1alpha1", "vmgroups")
VIRTUAL_MACHINES: Final = Resource("kubevirt.io", "v1", "virtualmachines")
VIRTUAL_MACHINE_INSTANCES: Final = Resource("kubevirt.io", "v1", "virtualmachineinstances")
CONFIGMAPS: Final = Resource("", "v1", "configmaps")
EVENTS: Final = Resource("", "v1", "events")


def load_configuration(kubeconfig: str | None = None) -> kubernetes.client.Configuration:
    """Connection settings: an explicit kubeconfig, else in-cluster, else the default one."""
    configuration = kubernetes.client.Configuration()
    if kubeconfig:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, client_configuration=configuration
        )
        return configuration
    try:
        kubernetes.config.load_incluster_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(  # type: ignore[no-untyped-call]
            client_configuration=configuration
        )
    return configuration


class KubeClient:
    """JSON requests against the apiserver; create it inside the running event loop."""

    def __init__(self, configuration: kubernetes.client.Configuration) -> None:
        self._configuration = configuration
        self._server = str(configuration.host).rstrip("/")
        connector = aiohttp.TCPConnector(ssl=self._ssl_context())
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_SECONDS)
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)

    def _ssl_context(self) -> ssl.SSLContext | bool:
        config = self._configuration
        if not self._server.startswith("https"):
            return False
        context = ssl.create_default_context(cafile=config.ssl_ca_cert or None)
        if not config.verify_ssl:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        if config.cert_file and config.key_file:
            context.load_cert_chain(config.cert_file, config.key_file)
        return context

    def _headers(self, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        config = self._configuration
        token = config.get_api_key_with_prefix("BearerToken") or config.get_api_key_with_prefix(
            "authorization"
        )
        if token:
            headers["Authorization"] = token if " " in token else f"Bearer {token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def close(self) -> None:
        await self._session.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        data = None if body is None else json.dumps(body)
        headers = self._headers(content_type if data is not None else None)
        async with self._session.request(
            method, self._server + path, data=data, params=params, headers=headers
        ) as response:
            text = await response.text()
            payload: Any = json.loads(text) if text else None
            if response.status >= 400:
                raise ApiError(response.status, payload or text, method, path)
            return payload

    async def get(self, path: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            result: dict[str, Any] = await self.request("GET", path)
        except ApiError as error:
            if error.not_found:
                return None
            raise
        return result

    async def list_objects(
        self, path: str, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        params = {"labelSelector": label_selector} if label_selector else None
        result = await self.request("GET", path, params=params)
        return list(result.get("items") or [])

    async def create(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("POST", path, body=dict(body))
        return result

    async def merge_patch(self, path: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "PATCH", path, body=dict(patch), content_type=MERGE_PATCH
        )
        return result
