"""Keep one VMGroup current: its status, its Events, its members' templates, its hook ConfigMap.

Everything is read from the API on each pass, so an operator that restarts picks up exactly
where the last one stopped: the previous status tells which members were known and which
condition was already reported, and nothing is reported twice.

Passes for one group never overlap; a burst of watch events for the same group collapses into
at most one waiting pass, which reads the latest state when it runs.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import aiohttp

from vmha_operator import kube
from vmha_operator.api import GROUP_LABEL, VMGroup, VMGroupStatus
from vmha_operator.channel import HOOK_CONFIGMAP, hook_configmap
from vmha_operator.membership import ChannelSettings, apply_membership, group_of, remove_membership
from vmha_operator.status import GroupEvent, compute_status, group_events, status_body

logger = logging.getLogger(__name__)

REPORTING_COMPONENT = "vmha-operator"
RETRIES = 4
RETRY_DELAY_SECONDS = 0.5
# How long a verified hook ConfigMap is trusted before it is checked again.
CONFIGMAP_RECHECK_SECONDS = 60.0

GroupKey = tuple[str, str]


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`."""
    patch: dict[str, Any] = {}
    for key in old.keys() - new.keys():
        patch[key] = None
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            inner = merge_patch(before, value)
            if inner:
                patch[key] = inner
        elif key not in old or before != value:
            patch[key] = copy.deepcopy(value)
    return patch


@dataclasses.dataclass
class _ConfigMapCheck:
    fingerprint: str
    at: float


class GroupReconciler:
    """Reconciles VMGroups on demand; one instance per operator process."""

    def __init__(
        self,
        client: kube.KubeClient,
        channel: ChannelSettings,
        instance: str,
    ) -> None:
        self._client = client
        self._channel = channel
        self._instance = instance
        self._locks: dict[GroupKey, asyncio.Lock] = {}
        self._waiting: set[GroupKey] = set()
        self._configmaps: dict[str, _ConfigMapCheck] = {}

    async def request(self, namespace: str, name: str) -> None:
        """Reconcile the group now, or let an already waiting pass cover this request."""
        key = (namespace, name)
        if key in self._waiting:
            return
        self._waiting.add(key)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            self._waiting.discard(key)
            await self._reconcile_with_retries(namespace, name)

    async def _reconcile_with_retries(self, namespace: str, name: str) -> None:
        """Transient API trouble (timeouts, 5xx, 409, 429) gets a few quick retries: a
        watch event handler is not retried by kopf, and the next event may be far off."""
        for attempt in range(RETRIES):
            try:
                await self._reconcile(namespace, name)
                return
            except (kube.ApiError, aiohttp.ClientError, TimeoutError) as error:
                permanent = isinstance(error, kube.ApiError) and not error.transient
                if permanent or attempt == RETRIES - 1:
                    raise
                logger.warning("VMGroup %s/%s: retrying after %s", namespace, name, error)
                await asyncio.sleep(RETRY_DELAY_SECONDS * 2**attempt)

    async def _reconcile(self, namespace: str, name: str) -> None:
        raw = await self._client.get(kube.VMGROUPS.path(namespace, name))
        if raw is None:
            self._locks.pop((namespace, name), None)
            return
        group = VMGroup.from_body(raw)
        vms = await self._client.list_objects(
            kube.VIRTUAL_MACHINES.path(namespace), f"{GROUP_LABEL}={name}"
        )
        vmis = await self._member_vmis(namespace, name, vms)
        status = compute_status(group, vms, vmis, now=datetime.now(UTC).replace(microsecond=0))
        if status != group.status:
            await self._write_status(group, status)
            for event in group_events(group.status, status):
                await self.post_event(group, event)
        if group.spec.needs_channel:
            await self.ensure_hook_configmap(namespace)
        await self._update_member_templates(group, vms)
        await self._release_leavers(group, group.status, status)

    async def _member_vmis(
        self, namespace: str, name: str, vms: Sequence[Mapping[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """Members' VMIs by name: labelled ones in one list, the rest (started before the VM
        joined, so without the label) one by one."""
        labelled = await self._client.list_objects(
            kube.VIRTUAL_MACHINE_INSTANCES.path(namespace), f"{GROUP_LABEL}={name}"
        )
        by_name = {vmi["metadata"]["name"]: vmi for vmi in labelled}
        wanted = [vm["metadata"]["name"] for vm in vms]
        for vm_name in wanted:
            if vm_name not in by_name:
                vmi = await self._client.get(
                    kube.VIRTUAL_MACHINE_INSTANCES.path(namespace, vm_name)
                )
                if vmi is not None:
                    by_name[vm_name] = vmi
        return {vm_name: by_name[vm_name] for vm_name in wanted if vm_name in by_name}

    async def _write_status(self, group: VMGroup, status: VMGroupStatus) -> None:
        path = kube.VMGROUPS.path(group.metadata.namespace, group.metadata.name, "status")
        await self._client.merge_patch(path, {"status": status_body(status)})
        logger.info(
            "VMGroup %s/%s: %d member(s), %d ready",
            group.metadata.namespace,
            group.metadata.name,
            status.member_count,
            status.ready_members,
        )

    async def post_event(self, group: VMGroup, event: GroupEvent) -> None:
        """A core/v1 Event on the VMGroup, as `kubectl describe vmgroup` shows them."""
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        namespace = group.metadata.namespace
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{group.metadata.name}.", "namespace": namespace},
            "involvedObject": group.reference(),
            "type": event.type,
            "reason": event.reason,
            "message": event.message[:1024],
            "source": {"component": REPORTING_COMPONENT},
            "reportingComponent": REPORTING_COMPONENT,
            "reportingInstance": self._instance,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await self._client.create(kube.EVENTS.path(namespace), body)
        except kube.ApiError as error:
            # An Event is a courtesy; never fail the reconciliation over one.
            logger.warning(
                "could not post Event %s on VMGroup %s/%s: %s",
                event.reason,
                namespace,
                group.metadata.name,
                error,
            )

    async def ensure_hook_configmap(self, namespace: str) -> None:
        """The hook script ConfigMap exists, is current and is owned by every group here."""
        groups = await self._client.list_objects(kube.VMGROUPS.path(namespace))
        owners = [_owner_reference(g) for g in sorted(groups, key=lambda g: g["metadata"]["name"])]
        desired = hook_configmap(namespace, owners)
        fingerprint = hashlib.sha256(repr(desired).encode()).hexdigest()
        checked = self._configmaps.get(namespace)
        fresh = checked and time.monotonic() - checked.at < CONFIGMAP_RECHECK_SECONDS
        if checked and fresh and checked.fingerprint == fingerprint:
            return
        path = kube.CONFIGMAPS.path(namespace, HOOK_CONFIGMAP)
        current = await self._client.get(path)
        if current is None:
            try:
                await self._client.create(kube.CONFIGMAPS.path(namespace), desired)
            except kube.ApiError as error:
                if not error.conflict:
                    raise
                current = await self._client.get(path)
        if current is not None:
            wanted = {"metadata": desired["metadata"], "data": desired["data"]}
            have = {"metadata": current.get("metadata") or {}, "data": current.get("data") or {}}
            patch = _only_wanted(have, wanted)
            if patch:
                await self._client.merge_patch(path, patch)
        self._configmaps[namespace] = _ConfigMapCheck(fingerprint, time.monotonic())

    async def _update_member_templates(
        self, group: VMGroup, vms: Sequence[Mapping[str, Any]]
    ) -> None:
        """Bring members' templates up to date (VMs created while the webhook was away, or a
        group spec change); the change takes effect when the VMI next starts."""
        for vm in vms:
            desired = copy.deepcopy(dict(vm))
            apply_membership(desired, group.metadata.name, group.spec, self._channel)
            await self._patch_spec(vm, desired)

    async def _release_leavers(
        self, group: VMGroup, before: VMGroupStatus, after: VMGroupStatus
    ) -> None:
        """VMs that left without the webhook seeing it lose the group's terms and hook."""
        namespace = group.metadata.namespace
        for vm_name in {m.vm for m in before.members} - {m.vm for m in after.members}:
            vm = await self._client.get(kube.VIRTUAL_MACHINES.path(namespace, vm_name))
            if vm is None or group_of(vm) is not None:
                continue  # deleted, or in another group whose pass sets its template
            desired = copy.deepcopy(vm)
            remove_membership(desired, self._channel)
            await self._patch_spec(vm, desired)

    async def _patch_spec(self, vm: Mapping[str, Any], desired: Mapping[str, Any]) -> None:
        patch = merge_patch(vm.get("spec") or {}, desired.get("spec") or {})
        if not patch:
            return
        metadata = vm["metadata"]
        path = kube.VIRTUAL_MACHINES.path(metadata["namespace"], metadata["name"])
        body = {"metadata": {"resourceVersion": metadata.get("resourceVersion")}, "spec": patch}
        try:
            await self._client.merge_patch(path, body)
            logger.info("updated the template of VirtualMachine %s", metadata["name"])
        except kube.ApiError as error:
            if not (error.conflict or error.not_found):
                raise
            # Changed or gone meanwhile: its watch event brings another pass.


def _owner_reference(group: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": group.get("apiVersion", "vmha.io/v1alpha1"),
        "kind": group.get("kind", "VMGroup"),
        "name": group["metadata"]["name"],
        "uid": group["metadata"]["uid"],
    }


def _only_wanted(have: Mapping[str, Any], wanted: Mapping[str, Any]) -> dict[str, Any]:
    """A merge patch that sets `wanted`'s fields without removing anything else."""
    patch: dict[str, Any] = {}
    for key, value in wanted.items():
        before = have.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            inner = _only_wanted(before, value)
            if inner:
                patch[key] = inner
        elif before != value:
            patch[key] = copy.deepcopy(value)
    return patch
