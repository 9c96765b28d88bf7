"""List, then watch, one resource in a thread of its own, feeding the event loop.

The `kubernetes` client blocks, so each `Watcher` runs list+watch in a dedicated thread and
hands every result to the loop with `call_soon_threadsafe`, in order. A watch that ends
(server timeout, dropped connection, API outage) resumes from the last resourceVersion seen
(bookmarks keep it fresh); only when the API says that version is gone (410) does the
watcher list everything again, and the consumer then gets the whole set (`Listed`) and
reconciles. Failures are retried with backoff, for as long as the agent runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import urllib3

from vmha_node_agent.backoff import Backoff
from vmha_node_agent.kubeapi import KubeApi, KubeError, Resource
from vmha_node_agent.metrics import AgentMetrics

log = logging.getLogger(__name__)

LIST_PAGE_SIZE = 500
# The client gives up on a silent watch this long after the server should have ended it.
READ_TIMEOUT_MARGIN_S = 30.0


@dataclass(frozen=True)
class Listed:
    """Every object there is now: replace what you knew."""

    objects: list[dict[str, Any]]


@dataclass(frozen=True)
class Changed:
    kind: Literal["ADDED", "MODIFIED", "DELETED"]
    object: dict[str, Any]


WatchUpdate = Listed | Changed


class _Expired(Exception):
    """The resourceVersion we would resume from is too old (410 Gone): list again."""


class Watcher:
    def __init__(
        self,
        api: KubeApi,
        resource: Resource,
        deliver: Callable[[WatchUpdate], None],
        metrics: AgentMetrics,
        *,
        field_selector: str | None = None,
        label_selector: str | None = None,
        namespace: str | None = None,
        timeout_s: int = 300,
        retry_initial_s: float = 0.5,
        retry_max_s: float = 30.0,
        optional: bool = False,
    ) -> None:
        """`deliver` is called in the event loop, for each update, in order. `optional`: the
        resource may not exist (a CRD not installed); until it does, it lists as empty.
        `namespace`: watch one namespace (default: the whole cluster)."""
        self._api = api
        self._resource = resource
        self._path = resource.path(namespace)
        self._deliver = deliver
        self._metrics = metrics
        self._selectors = {
            key: value
            for key, value in (("fieldSelector", field_selector), ("labelSelector", label_selector))
            if value
        }
        self._timeout_s = timeout_s
        self._backoff = Backoff(retry_initial_s, retry_max_s)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._response: urllib3.BaseHTTPResponse | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._optional = optional
        self._listed_absent = False

    @property
    def name(self) -> str:
        return self._resource.plural

    async def run(self) -> None:
        """Watch until cancelled."""
        self._loop = asyncio.get_running_loop()
        thread = threading.Thread(target=self._main, name=f"watch {self.name}", daemon=True)
        thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            self.stop()
            await asyncio.to_thread(thread.join, 5.0)

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            response = self._response
        if response is not None:
            _interrupt(response)

    # -- the thread --------------------------------------------------------------------

    def _main(self) -> None:
        resource_version: str | None = None
        reason = "initial"
        while not self._stop.is_set():
            try:
                if resource_version is None:
                    resource_version = self._list(reason)
                resource_version = self._watch(resource_version)
                self._backoff.reset()
            except _Expired:
                resource_version, reason = None, "expired"
            except KubeError as error:
                self._metrics.kube_watch_errors.labels(self.name).inc()
                if resource_version is None:
                    reason = "error"
                    if error.not_found and self._optional and not self._listed_absent:
                        self._listed_absent = True
                        self._emit(Listed([]))
                log.warning("watch of %s failed, retrying: %s", self.name, error)
                self._stop.wait(self._backoff.next())
            except Exception:
                self._metrics.kube_watch_errors.labels(self.name).inc()
                log.exception("watch of %s failed, retrying", self.name)
                self._stop.wait(self._backoff.next())

    def _list(self, reason: str) -> str:
        objects: list[dict[str, Any]] = []
        query = {**self._selectors, "limit": str(LIST_PAGE_SIZE)}
        path = self._path
        while True:
            page = self._api.call("list", self._resource, path, query=query)
            objects.extend(page.get("items") or [])
            metadata = page.get("metadata") or {}
            if not metadata.get("continue"):
                break
            query["continue"] = metadata["continue"]
        self._metrics.kube_relists.labels(self.name, reason).inc()
        self._emit(Listed(objects))
        return str(metadata.get("resourceVersion") or "")

    def _watch(self, resource_version: str) -> str:
        """Follow changes from `resource_version` until the server ends the watch; return
        the version to resume from."""
        query = {
            **self._selectors,
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(self._timeout_s),
        }
        response = self._api.open_watch(
            self._resource,
            self._path,
            query,
            read_timeout_s=self._timeout_s + READ_TIMEOUT_MARGIN_S,
        )
        with self._lock:
            self._response = response
        if self._stop.is_set():
            _interrupt(response)
        try:
            for event in watch_events(response):
                resource_version = self._handle(event, resource_version)
        except (urllib3.exceptions.HTTPError, OSError) as error:
            if not self._stop.is_set():
                raise KubeError(0, f"watch {self.name}: {error}") from None
        finally:
            with self._lock:
                self._response = None
            response.release_conn()
        return resource_version

    def _handle(self, event: Mapping[str, Any], resource_version: str) -> str:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            code = int(obj.get("code") or 0)
            if code == 410:
                raise _Expired
            raise KubeError(code, f"watch {self.name}: {obj.get('message', '')}")
        version = str((obj.get("metadata") or {}).get("resourceVersion") or resource_version)
        if kind in ("ADDED", "MODIFIED", "DELETED"):
            self._metrics.kube_watch_events.labels(self.name).inc()
            self._emit(Changed(kind, obj))
        return version  # BOOKMARK: only the version moves on

    def _emit(self, update: WatchUpdate) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(self._deliver, update)
        except RuntimeError:  # the loop is closed: the agent is gone
            self._stop.set()


def watch_events(response: urllib3.BaseHTTPResponse) -> Iterator[dict[str, Any]]:
    """The JSON objects of a watch stream, one per line, however the chunks fall."""
    pending = b""
    for chunk in response.stream(64 * 1024):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)
    if pending.strip():
        yield json.loads(pending)


def _interrupt(response: urllib3.BaseHTTPResponse) -> None:
    """Unblock a thread reading `response` (urllib3 ≥ 2.3 can do this from another thread)."""
    shutdown = getattr(response, "shutdown", None)
    try:
        if shutdown is not None:
            shutdown()
        else:
            response.close()
    except Exception:  # already closed: nothing left to unblock
        log.debug("closing a watch response failed", exc_info=True)
