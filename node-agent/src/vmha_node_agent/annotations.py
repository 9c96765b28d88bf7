"""The `vmha.io/heartbeat` annotation on the VMI: the VM's heartbeat state for the operator
(which folds it into VMGroup.status) and for people (`kubectl get vmi -o yaml`).

    vmha.io/heartbeat: '{"state":"failed","reason":"missed","since":"2026-…Z",
                         "node":"node-a","detail":"3 consecutive challenges unanswered"}'

Written on state changes only, never per beat, and only when the state differs from what
the VMI already shows (an agent restart re-registers guests without a write). Each write
is a JSON patch that first tests the VMI's uid and `status.nodeName`: an agent never writes
to a VMI that has moved to another node (the other agent owns it now) or to a new VMI of the
same name. While the API is unreachable the latest state per VMI waits and is retried; only
the latest matters, so this needs no bound beyond the number of VMs.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from vmha_node_agent.backoff import Backoff
from vmha_node_agent.config import AgentConfig
from vmha_node_agent.heartbeat import Transition, TransitionReason
from vmha_node_agent.inventory import KUBERNETES, VMRef
from vmha_node_agent.kubeapi import JSON_PATCH, VMIS, KubeApi, KubeError
from vmha_node_agent.kubevirt import Key, annotations_of, metadata, node_of, uid_of
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.timefmt import rfc3339

log = logging.getLogger(__name__)

HEARTBEAT_ANNOTATION: Final = "vmha.io/heartbeat"
MAX_DETAIL_CHARS: Final = 256
_POINTER: Final = "/metadata/annotations/" + HEARTBEAT_ANNOTATION.replace("~", "~0").replace(
    "/", "~1"
)

VMILookup = Callable[[Key], Mapping[str, Any] | None]


def annotation_value(change: Transition, node: str) -> dict[str, str]:
    value = {
        "state": change.current.value,
        "reason": change.reason.value,
        "since": rfc3339(change.wall_time),
        "node": node,
        "detail": change.detail[:MAX_DETAIL_CHARS],
    }
    if change.registration is not None:
        # Lets the next agent (after a restart or a migration) know how soon to expect the
        # guest to register again.
        value["interval_ms"] = str(change.registration.interval_ms)
    return value


REGISTERED_STATES_SHOWN: Final = frozenset({"healthy", "unhealthy", "failed"})


def reregister_within_s(vmi: Mapping[str, Any], grace_s: float) -> float | None:
    """How long the guest of `vmi` may take to register with a new agent, when its
    annotation says it was registered; None when it was not (or nothing is known)."""
    shown = parse_annotation(vmi)
    if shown is None or shown.get("state") not in REGISTERED_STATES_SHOWN:
        return None
    try:
        interval_s = int(shown.get("interval_ms", 0)) / 1000
    except (TypeError, ValueError):
        interval_s = 0.0
    return max(grace_s, 12 * interval_s)


def parse_annotation(vmi: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The annotation on `vmi` as a dict (a bare state becomes {"state": ...})."""
    if vmi is None:
        return None
    raw = annotations_of(vmi).get(HEARTBEAT_ANNOTATION)
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return {"state": str(raw).strip()}
    return value if isinstance(value, dict) else {"state": str(value)}


def same_state(shown: Mapping[str, Any] | None, wanted: Mapping[str, Any]) -> bool:
    return (
        shown is not None
        and shown.get("state") == wanted["state"]
        and shown.get("node") == wanted["node"]
    )


class _Outcome(enum.Enum):
    PATCHED = "patched"
    DROPPED = "dropped"  # gone, or not ours any more
    RETRY = "failed"


@dataclass(frozen=True)
class _Write:
    namespace: str
    name: str
    uid: str
    value: dict[str, str]


class HeartbeatAnnotations:
    """TransitionSink writing the annotation, and the service delivering the writes."""

    def __init__(
        self, api: KubeApi, config: AgentConfig, metrics: AgentMetrics, vmis: VMILookup
    ) -> None:
        self._api = api
        self._node = config.node_name
        self._metrics = metrics
        self._vmis = vmis
        self._retry = (config.kubernetes.retry_initial_s, config.kubernetes.retry_max_s)
        self._pending: dict[Key, _Write] = {}
        self._written: dict[Key, _Write] = {}
        self._wake = asyncio.Event()

    # -- TransitionSink ----------------------------------------------------------------

    def report(self, vm: VMRef, change: Transition) -> None:
        if vm.origin != KUBERNETES or not vm.uid:
            return
        write = _Write(vm.namespace, vm.name, vm.uid, annotation_value(change, self._node))
        if vm.key not in self._pending and same_state(self._shown(vm), write.value):
            return
        self._pending[vm.key] = write
        self._metrics.kube_annotations_pending.set(len(self._pending))
        self._wake.set()

    def _shown(self, vm: VMRef) -> Mapping[str, Any] | None:
        """What the VMI shows now: what we wrote, else what the watch saw (after a restart)."""
        written = self._written.get(vm.key)
        if written is not None and written.uid == vm.uid:
            return written.value
        vmi = self._vmis(vm.key)
        if vmi is None or uid_of(vmi) != vm.uid:
            return None
        return parse_annotation(vmi)

    # -- delivery ----------------------------------------------------------------------

    async def run(self) -> None:
        backoff = Backoff(*self._retry)
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            if await self._deliver_next():
                backoff.reset()
            else:
                await asyncio.sleep(backoff.next())

    async def drain(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while self._pending:
                    if not await self._deliver_next():
                        await asyncio.sleep(self._retry[0])
        if self._pending:
            log.error("%d heartbeat annotations unwritten at shutdown", len(self._pending))

    async def _deliver_next(self) -> bool:
        key, write = next(iter(self._pending.items()))
        outcome = await self._write(write)
        self._metrics.kube_annotation_patches.labels(outcome.value).inc()
        if outcome is _Outcome.RETRY:
            # To the back of the line, so that one VMI the API refuses cannot hold up others.
            self._pending[key] = self._pending.pop(key)
            return False
        if self._pending.get(key) is write:  # not replaced by a newer state meanwhile
            del self._pending[key]
        if outcome is _Outcome.PATCHED and write.value["reason"] != TransitionReason.REMOVED:
            self._written[key] = write
        else:  # gone, or no longer ours: what the watch shows will do if it comes back
            self._written.pop(key, None)
        self._metrics.kube_annotations_pending.set(len(self._pending))
        return True

    async def _write(self, write: _Write) -> _Outcome:
        path = VMIS.path(write.namespace, write.name)
        value = json.dumps(write.value, separators=(",", ":"))
        guards = [
            {"op": "test", "path": "/metadata/uid", "value": write.uid},
            {"op": "test", "path": "/status/nodeName", "value": self._node},
        ]
        try:
            await self._patch(path, [*guards, {"op": "add", "path": _POINTER, "value": value}])
            return _Outcome.PATCHED
        except KubeError as error:
            if error.transient:
                return _Outcome.RETRY
            if error.not_found:
                return _Outcome.DROPPED
            first_error = error
        # A guard failed, or the VMI has no annotations at all: look at it.
        try:
            vmi = await self._api.request("get", VMIS, path)
        except KubeError as error:
            return _Outcome.DROPPED if error.not_found else _Outcome.RETRY
        if uid_of(vmi) != write.uid or node_of(vmi) != self._node:
            return _Outcome.DROPPED
        if metadata(vmi).get("annotations"):
            log.error("%s/%s: cannot write its heartbeat annotation: %s",
                      write.namespace, write.name, first_error)  # fmt: skip
            return _Outcome.DROPPED if first_error.status in (401, 403) else _Outcome.RETRY
        version = {"op": "test", "path": "/metadata/resourceVersion"}
        version["value"] = str(metadata(vmi).get("resourceVersion"))
        create = {
            "op": "add",
            "path": "/metadata/annotations",
            "value": {HEARTBEAT_ANNOTATION: value},
        }
        try:
            await self._patch(path, [*guards, version, create])
            return _Outcome.PATCHED
        except KubeError as error:
            return _Outcome.DROPPED if error.not_found else _Outcome.RETRY

    async def _patch(self, path: str, operations: list[dict[str, Any]]) -> None:
        await self._api.request("patch", VMIS, path, body=operations, content_type=JSON_PATCH)
