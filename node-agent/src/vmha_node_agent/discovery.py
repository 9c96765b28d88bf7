"""Kubernetes discovery: the VMIs on this node that want heartbeat, and their sockets.

Three watches feed one picture: VMIs (kept when `status.nodeName` is this node), the Pods
on this node (field selector; the virt-launchers among them), and VMGroups (for each
group's heartbeat settings). Once all three have listed, every VMI is resolved:

    on this node, not being deleted, not migrating away, wants heartbeat (group or opt-in)
      → its live virt-launcher Pod → the socket's host path (`channelpath.py`)
      → its policy (`policy.py`)
      → attached (VMAdded) as soon as the socket exists (polled, one stat per waiting VM)

A VMI that stops qualifying is let go (VMRemoved): it was deleted, left the node, started a
live migration to another node (the target's agent attaches once `status.nodeName` moves),
or its launcher Pod went away. A change of group or annotations only updates the policy of
the running session (heartbeat switched on or off for it: a new session).

Every VMI and VMGroup update is also handed, as it comes, to the `ClusterListener`s (the
group directory, which follows members on every node).
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from vmha_node_agent.annotations import reregister_within_s
from vmha_node_agent.channelpath import Unresolved, channel_path, host_socket_path
from vmha_node_agent.config import AgentConfig
from vmha_node_agent.inventory import KUBERNETES, InventoryChange, VMAdded, VMRef, VMRemoved
from vmha_node_agent.kubeapi import PODS, VMGROUPS, VMIS, KubeApi
from vmha_node_agent.kubevirt import (
    VM_NAME_LABEL,
    Key,
    annotations_of,
    choose_launcher,
    is_deleting,
    is_final,
    key_of,
    labels_of,
    launcher_of,
    migrating_away,
    migration_in_progress,
    node_of,
    uid_of,
)
from vmha_node_agent.members import messaging_switch
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.policy import (
    GROUP_LABEL,
    GroupHeartbeat,
    effective_policy,
    wants_heartbeat,
    wants_messaging,
)
from vmha_node_agent.watch import Changed, Listed, Watcher, WatchUpdate

log = logging.getLogger(__name__)
Obj = dict[str, Any]


class ClusterListener(Protocol):
    """Also told of every VMI and VMGroup update (cluster-wide), after discovery."""

    def vmis_changed(self, update: WatchUpdate) -> None: ...
    def groups_changed(self, update: WatchUpdate) -> None: ...


@dataclass(frozen=True)
class Resolution:
    """Where a VMI stands: `vm` to attach, or why not (`problem` when something is wrong
    rather than simply not ours)."""

    vm: VMRef | None
    why: str = ""
    problem: bool = False


class KubernetesVMSource:
    def __init__(
        self,
        api: KubeApi,
        config: AgentConfig,
        metrics: AgentMetrics,
        listeners: Sequence[ClusterListener] = (),
    ) -> None:
        self._config = config
        self._listeners = list(listeners)
        self._node = config.node_name
        self._kubelet_root = config.kubernetes.kubelet_root
        self._metrics = metrics
        kube = config.kubernetes
        timing: dict[str, Any] = {
            "timeout_s": kube.watch_timeout_s,
            "retry_initial_s": kube.retry_initial_s,
            "retry_max_s": kube.retry_max_s,
        }
        self._watchers = [
            Watcher(api, VMIS, self.vmis_changed, metrics, **timing),
            Watcher(
                api, PODS, self.pods_changed, metrics, field_selector=f"spec.nodeName={self._node}",
                **timing,
            ),
            # Without the VMGroup CRD (no operator) members simply get the agent's policy.
            Watcher(api, VMGROUPS, self.groups_changed, metrics, optional=True, **timing),
        ]  # fmt: skip
        self._synced: set[str] = set()
        self._vmis: dict[Key, Obj] = {}
        self._vmi_keys: dict[str, Key] = {}  # uid → key
        self._pods: dict[str, Obj] = {}  # uid → launcher Pod on this node
        # Pod uids by the VMI uid they name, or by VMI name (namespace, name) when they name
        # none: finding a VMI's launcher must not scan every Pod (500 VMs, 500 Pods).
        self._pods_by_vmi: dict[str, set[str]] = {}
        self._pods_by_name: dict[Key, set[str]] = {}
        self._groups: dict[Key, GroupHeartbeat] = {}
        self._group_messaging: dict[Key, bool] = {}
        self._waiting: dict[Key, VMRef] = {}  # resolved, socket not there yet
        self._attached: dict[Key, VMRef] = {}
        self._unresolved: dict[Key, str] = {}
        self._policy_problems: dict[Key, tuple[str, ...]] = {}
        self._changes: asyncio.Queue[InventoryChange] = asyncio.Queue()

    # -- what others use ---------------------------------------------------------------

    def ready(self) -> bool:
        """Every watch has listed once: the agent knows its VMs."""
        return len(self._synced) == len(self._watchers)

    def vmi(self, key: Key) -> Mapping[str, Any] | None:
        """The latest VMI seen for `key`, if it is on this node."""
        return self._vmis.get(key)

    async def changes(self) -> AsyncIterator[InventoryChange]:
        while True:
            yield await self._changes.get()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tasks:
            for watcher in self._watchers:
                tasks.create_task(watcher.run(), name=f"watch {watcher.name}")
            tasks.create_task(self._poll_sockets(), name="socket poll")

    # -- watch updates (called in the event loop by the watchers) ---------------------

    def vmis_changed(self, update: WatchUpdate) -> None:
        match update:
            case Listed(objects):
                before = set(self._vmis)
                self._vmis = {key_of(vmi): vmi for vmi in objects if node_of(vmi) == self._node}
                self._vmi_keys = {uid_of(vmi): key for key, vmi in self._vmis.items()}
                self._synced_once("vmis", before | set(self._vmis))
            case Changed(kind, vmi):
                key = key_of(vmi)
                previous = self._vmis.pop(key, None)
                if previous is not None:
                    self._vmi_keys.pop(uid_of(previous), None)
                if kind != "DELETED" and node_of(vmi) == self._node:
                    self._vmis[key] = vmi
                    self._vmi_keys[uid_of(vmi)] = key
                self._evaluate([key])
        for listener in self._listeners:
            listener.vmis_changed(update)

    def pods_changed(self, update: WatchUpdate) -> None:
        match update:
            case Listed(objects):
                self._pods, self._pods_by_vmi, self._pods_by_name = {}, {}, {}
                for pod in objects:
                    self._add_pod(pod)
                self._synced_once("pods", self._vmis)
            case Changed(kind, pod):
                previous = self._remove_pod(uid_of(pod))
                if kind != "DELETED":
                    self._add_pod(pod)
                self._evaluate(self._vmis_of_pods([pod, previous]))

    def groups_changed(self, update: WatchUpdate) -> None:
        match update:
            case Listed(objects):
                self._groups = {key_of(g): GroupHeartbeat.from_group(g) for g in objects}
                self._group_messaging = {key_of(g): messaging_switch(g) for g in objects}
                self._synced_once("vmgroups", self._vmis)
            case Changed(kind, group):
                key = key_of(group)
                if kind == "DELETED":
                    self._groups.pop(key, None)
                    self._group_messaging.pop(key, None)
                else:
                    self._groups[key] = GroupHeartbeat.from_group(group)
                    self._group_messaging[key] = messaging_switch(group)
                namespace, name = key
                self._evaluate(
                    k
                    for k, vmi in self._vmis.items()
                    if k[0] == namespace and labels_of(vmi).get(GROUP_LABEL) == name
                )
        for listener in self._listeners:
            listener.groups_changed(update)

    def _synced_once(self, watch: str, keys: Iterable[Key]) -> None:
        first_time = not self.ready()
        self._synced.add(watch)
        if self.ready():
            if first_time:
                log.info("discovery: listed VMIs, Pods and VMGroups; %d VMIs here", len(self._vmis))
            self._evaluate(set(keys) | set(self._attached) | set(self._waiting))

    def _add_pod(self, pod: Obj) -> None:
        if not _looks_like_launcher(pod):
            return
        uid = uid_of(pod)
        self._pods[uid] = pod
        for index, key in self._pod_index_keys(pod):
            index.setdefault(key, set()).add(uid)

    def _remove_pod(self, uid: str) -> Obj | None:
        pod = self._pods.pop(uid, None)
        if pod is not None:
            for index, key in self._pod_index_keys(pod):
                uids = index.get(key, set())
                uids.discard(uid)
                if not uids:
                    index.pop(key, None)
        return pod

    def _pod_index_keys(self, pod: Obj) -> list[tuple[dict[Any, set[str]], Any]]:
        owner = launcher_of(pod)
        if owner is not None:
            return [(self._pods_by_vmi, owner)]
        return [(self._pods_by_name, (key_of(pod)[0], labels_of(pod).get(VM_NAME_LABEL)))]

    def _launcher_candidates(self, vmi: Obj) -> list[Obj]:
        uids = self._pods_by_vmi.get(uid_of(vmi), set()) | self._pods_by_name.get(
            key_of(vmi), set()
        )
        return [self._pods[uid] for uid in uids]

    def _vmis_of_pods(self, pods: Iterable[Obj | None]) -> set[Key]:
        keys: set[Key] = set()
        for pod in pods:
            if pod is None:
                continue
            owner = launcher_of(pod)
            if owner is not None and owner in self._vmi_keys:
                keys.add(self._vmi_keys[owner])
            vm_name = labels_of(pod).get(VM_NAME_LABEL)
            if vm_name:
                keys.add((key_of(pod)[0], vm_name))
        return keys

    # -- resolution ------------------------------------------------------------------

    def _evaluate(self, keys: Iterable[Key]) -> None:
        if not self.ready():
            return  # until every watch has listed, a missing Pod or group means nothing
        for key in list(keys):
            self._apply(key, self._resolve(key))
        self._update_gauges()

    def _resolve(self, key: Key) -> Resolution:
        vmi = self._vmis.get(key)
        if vmi is None:
            return Resolution(None, "the VMI is gone or on another node")
        if is_deleting(vmi) or is_final(vmi):
            return Resolution(None, "the VMI is shutting down")
        if migrating_away(vmi, self._node):
            target = (migration_in_progress(vmi) or {}).get("targetNode")
            return Resolution(None, f"the VMI is migrating to {target}")
        labels, annotations = labels_of(vmi), annotations_of(vmi)
        group_name = labels.get(GROUP_LABEL)
        group = self._groups.get((key[0], group_name)) if group_name else None
        heartbeat = wants_heartbeat(labels, annotations, group)
        messaging = self._config.messaging.enabled and wants_messaging(
            labels, self._group_messaging.get((key[0], group_name or ""))
        )
        if not heartbeat and not messaging:
            return Resolution(None, "neither heartbeat nor messaging is enabled for it")
        try:
            in_pod = channel_path(vmi)
            pod = choose_launcher(vmi, self._launcher_candidates(vmi))
            if pod is None:
                return Resolution(None, "no live virt-launcher Pod on this node", problem=True)
            socket_path = host_socket_path(pod, in_pod, self._kubelet_root)
        except Unresolved as error:
            return Resolution(None, str(error), problem=True)
        result = effective_policy(self._config.heartbeat, group, annotations)
        self._note_policy_problems(key, result.problems)
        vm = VMRef(
            namespace=key[0],
            name=key[1],
            socket_path=socket_path,
            uid=uid_of(vmi),
            heartbeat=heartbeat,
            labels=tuple(sorted(labels.items())),
            policy=result.policy,
            origin=KUBERNETES,
            reregister_within_s=reregister_within_s(vmi, result.policy.reregister_grace_s),
        )
        return Resolution(vm)

    def _apply(self, key: Key, resolution: Resolution) -> None:
        vm = resolution.vm
        if vm is None:
            self._waiting.pop(key, None)
            self._policy_problems.pop(key, None)
            self._note_unresolved(key, resolution)
            if self._attached.pop(key, None) is not None:
                log.info("%s/%s: letting go: %s", *key, resolution.why, extra=_fields(key))
                self._changes.put_nowait(VMRemoved(key))
            return
        self._unresolved.pop(key, None)
        current = self._attached.get(key)
        if current is not None:
            if current == vm:
                if current.policy != vm.policy:
                    self._attached[key] = vm
                    self._changes.put_nowait(VMAdded(vm))  # the session takes the new policy
                return
            # Another VMI of the same name, or another launcher Pod: a new session, once
            # the new socket is there.
            del self._attached[key]
            self._changes.put_nowait(VMRemoved(key))
        self._waiting[key] = vm
        self._try_attach(key)

    def _try_attach(self, key: Key) -> None:
        vm = self._waiting[key]
        if not _is_socket(vm.socket_path):
            return
        del self._waiting[key]
        self._attached[key] = vm
        self._changes.put_nowait(VMAdded(vm))

    async def _poll_sockets(self) -> None:
        while True:
            await asyncio.sleep(self._config.kubernetes.socket_poll_s)
            if not self._waiting:
                continue
            for key in list(self._waiting):
                self._try_attach(key)
            self._update_gauges()

    # -- bookkeeping -----------------------------------------------------------------

    def _note_unresolved(self, key: Key, resolution: Resolution) -> None:
        if not resolution.problem:
            self._unresolved.pop(key, None)
            return
        if self._unresolved.get(key) != resolution.why:
            log.warning(
                "%s/%s: cannot reach its channel: %s", *key, resolution.why, extra=_fields(key)
            )
        self._unresolved[key] = resolution.why

    def _note_policy_problems(self, key: Key, problems: tuple[str, ...]) -> None:
        if problems and self._policy_problems.get(key) != problems:
            log.warning("%s/%s: %s", *key, "; ".join(problems), extra=_fields(key))
        self._policy_problems[key] = problems

    def _update_gauges(self) -> None:
        gauge = self._metrics.discovery_vmis
        gauge.labels("attached").set(len(self._attached))
        gauge.labels("waiting_for_socket").set(len(self._waiting))
        gauge.labels("unresolved").set(len(self._unresolved))


def _looks_like_launcher(pod: Mapping[str, Any]) -> bool:
    return launcher_of(pod) is not None or VM_NAME_LABEL in labels_of(pod)


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _fields(key: Key) -> dict[str, str]:
    return {"namespace": key[0], "vm": key[1]}
