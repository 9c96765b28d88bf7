"""What the agent reads from KubeVirt's objects (plain dicts as the API returns them).

Pure functions: which node a VMI runs on, whether it is going away or moving, which
VirtualMachine owns it, and which virt-launcher Pod runs it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

VMI_KIND: Final = "VirtualMachineInstance"
VM_KIND: Final = "VirtualMachine"
KUBEVIRT_API_VERSION: Final = "kubevirt.io/v1"
# Labels KubeVirt puts on virt-launcher Pods: the VMI's uid, and the VMI's name.
CREATED_BY_LABEL: Final = "kubevirt.io/created-by"
VM_NAME_LABEL: Final = "vm.kubevirt.io/name"
FINAL_PHASES: Final = frozenset({"Succeeded", "Failed"})

Obj = Mapping[str, Any]
Key = tuple[str, str]


def metadata(obj: Obj) -> Mapping[str, Any]:
    return obj.get("metadata") or {}


def key_of(obj: Obj) -> Key:
    meta = metadata(obj)
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def uid_of(obj: Obj) -> str:
    return str(metadata(obj).get("uid") or "")


def labels_of(obj: Obj) -> Mapping[str, str]:
    return metadata(obj).get("labels") or {}


def annotations_of(obj: Obj) -> Mapping[str, str]:
    return metadata(obj).get("annotations") or {}


def is_deleting(obj: Obj) -> bool:
    return bool(metadata(obj).get("deletionTimestamp"))


def node_of(vmi: Obj) -> str | None:
    return (vmi.get("status") or {}).get("nodeName") or None


def is_final(vmi: Obj) -> bool:
    return (vmi.get("status") or {}).get("phase") in FINAL_PHASES


def migration_in_progress(vmi: Obj) -> Mapping[str, Any] | None:
    """KubeVirt's migrationState while a live migration runs (neither completed nor failed)."""
    state = (vmi.get("status") or {}).get("migrationState")
    if not isinstance(state, Mapping) or not state:
        return None
    if state.get("completed") or state.get("failed"):
        return None
    return state


def migrating_away(vmi: Obj, node: str) -> bool:
    """A live migration from `node` to another node is under way."""
    state = migration_in_progress(vmi)
    if state is None:
        return False
    target = state.get("targetNode")
    return state.get("sourceNode", node) == node and target not in (None, "", node)


def owner_vm(vmi: Obj) -> tuple[str, str] | None:
    """(name, uid) of the VirtualMachine that controls the VMI, if any."""
    for reference in metadata(vmi).get("ownerReferences") or ():
        if reference.get("kind") == VM_KIND and reference.get("controller"):
            return str(reference.get("name")), str(reference.get("uid") or "")
    return None


def launcher_of(pod: Obj) -> str | None:
    """The uid of the VMI a virt-launcher Pod runs: its created-by label or owner reference."""
    created_by = labels_of(pod).get(CREATED_BY_LABEL)
    if created_by:
        return str(created_by)
    for reference in metadata(pod).get("ownerReferences") or ():
        if reference.get("kind") == VMI_KIND:
            return str(reference.get("uid") or "") or None
    return None


def pod_alive(pod: Obj) -> bool:
    phase = (pod.get("status") or {}).get("phase")
    return not is_deleting(pod) and phase not in FINAL_PHASES


def runs_vmi(pod: Obj, vmi: Obj) -> bool:
    """Whether `pod` is the virt-launcher of `vmi`: by uid when the Pod names one, else by
    the VMI's name (an older or trimmed set of labels)."""
    if key_of(pod)[0] != key_of(vmi)[0]:
        return False
    owner = launcher_of(pod)
    if owner is not None:
        return owner == uid_of(vmi)
    return labels_of(pod).get(VM_NAME_LABEL) == key_of(vmi)[1]


def choose_launcher(vmi: Obj, pods: Iterable[Obj]) -> Obj | None:
    """The live launcher Pod of `vmi` among `pods` (this node's): the running one, else the
    newest, when there are several (a restart, a migration back)."""
    candidates = [pod for pod in pods if pod_alive(pod) and runs_vmi(pod, vmi)]
    if not candidates:
        return None

    def rank(pod: Obj) -> tuple[bool, str]:
        running = (pod.get("status") or {}).get("phase") == "Running"
        return (running, str(metadata(pod).get("creationTimestamp") or ""))

    return max(candidates, key=rank)


def reference(vmi: Obj) -> dict[str, str]:
    """An object reference to the VMI, for Events."""
    namespace, name = key_of(vmi)
    return {
        "apiVersion": KUBEVIRT_API_VERSION,
        "kind": VMI_KIND,
        "namespace": namespace,
        "name": name,
        "uid": uid_of(vmi),
    }
