"""KubeVirt's part, played against the real apiserver: the local control plane runs no
virt-controller, virt-handler or kubelet, so tests, the demo and benchmarks do their work.

- `Kubelets`: one kubelet root per node, under one directory. A virt-launcher Pod's
  `private` emptyDir is made where that node's agent looks for QEMU's channel socket
  (`<root>/pods/<pod uid>/volumes/kubernetes.io~empty-dir/private/vmha`), and a guest
  (QEMU or simulated) binds it through a short link, because a unix socket address holds at
  most 107 bytes (the agent itself copes with long paths).
- `KubeVirt`: in one namespace, what KubeVirt would create and write — VirtualMachines
  (labelled into a VMGroup; the operator's webhooks admit and mutate them when it runs),
  VMIs made from the VM's template, their launcher Pods, and `status` as virt-handler
  writes it (phase, node, `Ready` and `Paused` conditions, `migrationState`) — and what
  vmha writes back, read through the API: the `vmha.io/heartbeat` annotation, Events,
  `VMGroup.status`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmha_node_agent.kubeapi import (
    EVENTS,
    MERGE_PATCH,
    PODS,
    VMGROUPS,
    VMIS,
    VMS,
    KubeApi,
    KubeError,
)
from vmha_testbed.polling import eventually

CHANNEL_PATH = "/var/run/kubevirt-private/vmha"
PRIVATE_MOUNT, SOCKET_NAME = CHANNEL_PATH.rsplit("/", 1)
LAUNCHER_IMAGE = "quay.io/kubevirt/virt-launcher:v1.5.0"
HEARTBEAT_ANNOTATION = "vmha.io/heartbeat"
# virt-controller's: a real VMI never lacks annotations (the agent's first write to a VMI
# without any takes another request).
OBSERVED_API_VERSION = {"kubevirt.io/latest-observed-api-version": "v1"}


def ready_conditions(*, paused: bool = False) -> list[dict[str, str]]:
    """A running VMI's conditions as virt-handler sets them (`Paused` while paused)."""
    conditions = [{"type": "Ready", "status": "True"}]
    if paused:
        conditions.append({"type": "Paused", "status": "True", "reason": "PausedByUser"})
    return conditions


def private_dir(kubelet_root: Path, pod_uid: str) -> Path:
    """Where the kubelet under `kubelet_root` keeps a Pod's `private` emptyDir, the
    directory QEMU's channel socket is in."""
    return kubelet_root / "pods" / pod_uid / "volumes" / "kubernetes.io~empty-dir" / "private"


def launcher_pod(name: str, vmi_uid: str, node: str) -> dict[str, Any]:
    """A virt-launcher Pod of VMI `name` on `node`, with the `private` emptyDir."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"virt-launcher-{name}-",
            "labels": {
                "kubevirt.io": "virt-launcher",
                "kubevirt.io/created-by": vmi_uid,
                "vm.kubevirt.io/name": name,
            },
        },
        "spec": {
            "nodeName": node,
            "automountServiceAccountToken": False,
            "containers": [
                {
                    "name": "compute",
                    "image": LAUNCHER_IMAGE,
                    "volumeMounts": [{"name": "private", "mountPath": PRIVATE_MOUNT}],
                }
            ],
            "volumes": [{"name": "private", "emptyDir": {}}],
        },
    }


class Kubelets:
    """The kubelet roots of the nodes, under `root` (a new directory in /tmp by default)."""

    def __init__(self, root: Path | None = None) -> None:
        self._owned = root is None
        # Short (/tmp/vkXXXXXXXX): the links guests bind through stay well under 107 bytes.
        self.root = root or Path(tempfile.mkdtemp(prefix="vk", dir="/tmp"))
        self._links = itertools.count(1)

    def root_of(self, node: str) -> Path:
        """`<root>/<node>`, the node's `--kubelet-root`."""
        path = self.root / node
        path.mkdir(parents=True, exist_ok=True)
        return path

    def channel_socket(self, node: str, pod_uid: str) -> Path:
        """Make the Pod's `private` emptyDir on `node`; the path to bind QEMU's socket at."""
        private = private_dir(self.root_of(node), pod_uid)
        private.mkdir(parents=True, exist_ok=True)
        link = self.root / "l" / str(next(self._links))
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(private)
        return link / SOCKET_NAME

    def close(self) -> None:
        if self._owned:
            shutil.rmtree(self.root, ignore_errors=True)


@dataclass(frozen=True)
class Launcher:
    """A virt-launcher Pod on a node, and where its QEMU binds the channel socket."""

    name: str
    uid: str
    node: str
    socket: Path


@dataclass
class Member:
    """A running VMI and its current launcher (a live migration moves it to another)."""

    name: str
    vmi_uid: str
    launcher: Launcher

    @property
    def node(self) -> str:
        return self.launcher.node

    @property
    def socket(self) -> Path:
        return self.launcher.socket


class KubeVirt:
    """Plays virt-controller and virt-handler in `namespace` through `api` (admin)."""

    def __init__(self, api: KubeApi, namespace: str, kubelets: Kubelets) -> None:
        self.api = api
        self.namespace = namespace
        self.kubelets = kubelets
        self.members: dict[str, Member] = {}

    # -- groups and VMs --

    def create_group(
        self,
        name: str,
        *,
        policy: str = "soft-anti-affinity",
        messaging: bool | None = None,
        heartbeat: dict[str, Any] | None = None,
    ) -> None:
        spec: dict[str, Any] = {"policy": policy}
        if messaging is not None:
            spec["messaging"] = messaging
        if heartbeat is not None:
            spec["heartbeat"] = heartbeat
        body = {
            "apiVersion": "vmha.io/v1alpha1",
            "kind": "VMGroup",
            "metadata": {"name": name},
            "spec": spec,
        }
        self.api.call("create", VMGROUPS, VMGROUPS.path(self.namespace), body=body)

    def patch_group(self, name: str, spec: dict[str, Any]) -> None:
        path = VMGROUPS.path(self.namespace, name)
        self.api.call("patch", VMGROUPS, path, body={"spec": spec}, content_type=MERGE_PATCH)

    def create_vm(
        self, name: str, group: str | None, *, annotations: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """A VirtualMachine labelled into `group` unless None (its template too, as the
        operator's mutating webhook would make it when it does not run), with `annotations`
        on its template."""
        labels = {"vmha.io/group": group} if group else {}
        template_metadata: dict[str, Any] = {"labels": labels}
        if annotations:
            template_metadata["annotations"] = dict(annotations)
        body = {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "runStrategy": "Always",
                "template": {"metadata": template_metadata, "spec": {"domain": {"devices": {}}}},
            },
        }
        result: dict[str, Any] = self.api.call("create", VMS, VMS.path(self.namespace), body=body)
        return result

    def start_vmi(self, name: str, node: str) -> Member:
        """virt-controller's part: the VMI from the VM's template, scheduled to `node`, its
        launcher Pod; virt-handler's part: Running and Ready."""
        vm = self.vm(name)
        template = vm["spec"]["template"]
        metadata = template.get("metadata", {})
        annotations = {**OBSERVED_API_VERSION, **(metadata.get("annotations") or {})}
        owner = {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "name": name,
            "uid": vm["metadata"]["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }
        body = {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {
                **metadata,
                "name": name,
                "annotations": annotations,
                "ownerReferences": [owner],
            },
            "spec": template["spec"],
        }
        vmi = self.api.call("create", VMIS, VMIS.path(self.namespace), body=body)
        member = Member(name, vmi["metadata"]["uid"], self.create_launcher(name, node, vmi))
        self.set_vmi_status(
            name, {"phase": "Running", "nodeName": node, "conditions": ready_conditions()}
        )
        self.members[name] = member
        return member

    def start_members(self, group: str, placement: Mapping[str, str]) -> list[Member]:
        """A VM in `group` for each name in `placement`, running on the node it maps to."""
        members = []
        for name, node in placement.items():
            self.create_vm(name, group)
            members.append(self.start_vmi(name, node))
        return members

    def create_launcher(self, name: str, node: str, vmi: dict[str, Any] | None = None) -> Launcher:
        """A virt-launcher Pod for VMI `name` on `node`, with the `private` emptyDir the
        channel lives in (a migration target is a second one)."""
        uid = (vmi or self.require_vmi(name))["metadata"]["uid"]
        body = launcher_pod(name, uid, node)
        pod = self.api.call("create", PODS, PODS.path(self.namespace), body=body)
        pod_uid = str(pod["metadata"]["uid"])
        socket = self.kubelets.channel_socket(node, pod_uid)
        return Launcher(str(pod["metadata"]["name"]), pod_uid, node, socket)

    def set_vmi_status(self, name: str, status: dict[str, Any]) -> None:
        # VMIs have no status subresource (as in KubeVirt): virt-handler patches the object.
        path = VMIS.path(self.namespace, name)
        self.api.call("patch", VMIS, path, body={"status": status}, content_type=MERGE_PATCH)

    def set_paused(self, name: str, paused: bool) -> None:
        """The VMI's `Paused` condition, as virt-handler sets and clears it."""
        self.set_vmi_status(name, {"conditions": ready_conditions(paused=paused)})

    def delete_vmi(self, name: str) -> None:
        self.api.call("delete", VMIS, VMIS.path(self.namespace, name))

    def delete_pod(self, name: str) -> None:
        self.api.call("delete", PODS, PODS.path(self.namespace, name))

    # -- reading --

    def vm(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = self.api.call("get", VMS, VMS.path(self.namespace, name))
        return result

    def vmi(self, name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.api.call("get", VMIS, VMIS.path(self.namespace, name))
        except KubeError as error:
            if error.not_found:
                return None
            raise
        return result

    def require_vmi(self, name: str) -> dict[str, Any]:
        vmi = self.vmi(name)
        if vmi is None:
            raise LookupError(f"no VMI {self.namespace}/{name}")
        return vmi

    def heartbeat(self, name: str) -> dict[str, Any] | None:
        """The agent's `vmha.io/heartbeat` annotation on the VMI, parsed."""
        vmi = self.vmi(name) or {}
        raw = ((vmi.get("metadata") or {}).get("annotations") or {}).get(HEARTBEAT_ANNOTATION)
        return json.loads(raw) if raw else None

    def wait_heartbeat(
        self, name: str, state: str, *, node: str | None = None, timeout: float = 60.0
    ) -> dict[str, Any]:
        """Wait until the heartbeat annotation shows `state` (written by `node`'s agent, if
        given); the annotation."""

        def shown() -> dict[str, Any] | None:
            value = self.heartbeat(name)
            if value is None or value["state"] != state:
                return None
            return value if node in (None, value["node"]) else None

        return eventually(shown, f"{name} annotated {state}", timeout)

    def events(self, name: str | None = None, reason: str | None = None) -> list[dict[str, Any]]:
        """Events about object `name` (any if None) with `reason` (any if None)."""
        items: list[dict[str, Any]] = self.api.call("list", EVENTS, EVENTS.path(self.namespace))[
            "items"
        ]
        return [
            event
            for event in items
            if name in (None, event["regarding"]["name"]) and reason in (None, event["reason"])
        ]

    def count(self, name: str, reason: str) -> int:
        """Occurrences of `reason` about `name`: Events and their series."""
        return sum((e.get("series") or {}).get("count", 1) for e in self.events(name, reason))

    def group_status(self, group: str) -> dict[str, Any]:
        body = self.api.call("get", VMGROUPS, VMGROUPS.path(self.namespace, group))
        status: dict[str, Any] = body.get("status") or {}
        return status

    # -- the end --

    def delete_all(self) -> None:
        """Delete the namespace's VMIs, VMs, Pods and VMGroups (without a namespace
        controller they would outlive the namespace)."""
        for resource in (VMIS, VMS, PODS, VMGROUPS):
            with contextlib.suppress(KubeError):
                items = self.api.call("list", resource, resource.path(self.namespace))["items"]
                for item in items:
                    path = resource.path(self.namespace, item["metadata"]["name"])
                    with contextlib.suppress(KubeError):
                        self.api.call("delete", resource, path)
