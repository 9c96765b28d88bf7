"""The vmha virtio-serial channel, wired into member VMs through a KubeVirt hook sidecar.

KubeVirt cannot declare an arbitrary virtio-serial port in a VMI spec, so the operator asks
for a hook sidecar (`hooks.kubevirt.io/hookSidecars` on the VM template) that runs the
`onDefineDomain` script in `channel_hook.py` from the ConfigMap `vmha-channel-hook`, which
the operator keeps in every namespace that has a VMGroup. The script adds a unix-socket
channel named `vmha.messaging`; QEMU listens on the socket inside the virt-launcher pod.

Where the socket lives: in the virt-launcher pod's `private` emptyDir volume, mounted at
/var/run/kubevirt-private (KubeVirt keeps its own serial console and downward-metrics channel
sockets there too). An emptyDir is visible on the node as
/var/lib/kubelet/pods/<pod uid>/volumes/kubernetes.io~empty-dir/private/..., which is how the
node agent reaches it. The file name is short on purpose: that host path is 99 characters
before the name, and a unix socket path has at most 107.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any, Final

# The script is standalone (it runs in the sidecar); its constants are the source of truth.
from vmha_operator.channel_hook import CHANNEL_NAME, DEFAULT_CHANNEL_PATH

__all__ = [
    "CHANNEL_NAME",
    "DEFAULT_CHANNEL_PATH",
    "HOOK_CONFIGMAP",
    "HOOK_PATH",
    "HOOK_SCRIPT_KEY",
    "HOOK_SIDECARS_ANNOTATION",
    "LAUNCHER_PRIVATE_DIR",
    "LAUNCHER_PRIVATE_VOLUME",
    "hook_configmap",
    "hook_script",
    "hook_sidecar",
    "is_our_sidecar",
    "with_hook_sidecar",
]

HOOK_SIDECARS_ANNOTATION: Final = "hooks.kubevirt.io/hookSidecars"
HOOK_CONFIGMAP: Final = "vmha-channel-hook"
HOOK_SCRIPT_KEY: Final = "onDefineDomain"
HOOK_PATH: Final = "/usr/bin/onDefineDomain"
# The shim's gRPC hook protocol; v1alpha3 adds a Shutdown call so the sidecar exits cleanly.
HOOK_PROTOCOL_VERSION: Final = "v1alpha3"

LAUNCHER_PRIVATE_VOLUME: Final = "private"
LAUNCHER_PRIVATE_DIR: Final = "/var/run/kubevirt-private"

MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "vmha-operator"


def hook_script() -> str:
    """The onDefineDomain script as it goes into the ConfigMap."""
    return resources.files("vmha_operator").joinpath("channel_hook.py").read_text()


def hook_sidecar(image: str | None = None) -> dict[str, Any]:
    """Our entry in the hookSidecars list; no image means KubeVirt's own sidecar-shim."""
    entry: dict[str, Any] = {
        "args": ["--version", HOOK_PROTOCOL_VERSION],
        "configMap": {"name": HOOK_CONFIGMAP, "key": HOOK_SCRIPT_KEY, "hookPath": HOOK_PATH},
    }
    if image:
        entry["image"] = image
    return entry


def is_our_sidecar(entry: Any) -> bool:
    return isinstance(entry, dict) and (entry.get("configMap") or {}).get("name") == HOOK_CONFIGMAP


def with_hook_sidecar(current: str | None, wanted: bool, image: str | None = None) -> str | None:
    """The hookSidecars annotation value with ours added or removed, others kept in order.

    Returns None when the list ends up empty (the annotation should then be removed).
    Raises ValueError when the existing value is not a JSON list.
    """
    sidecars: list[Any] = []
    if current:
        try:
            sidecars = json.loads(current)
        except ValueError as error:
            raise ValueError(
                f"annotation {HOOK_SIDECARS_ANNOTATION} is not valid JSON: {error}"
            ) from error
        if not isinstance(sidecars, list):
            raise ValueError(f"annotation {HOOK_SIDECARS_ANNOTATION} must be a JSON list")
    ours = [s for s in sidecars if is_our_sidecar(s)]
    desired = [hook_sidecar(image)] if wanted else []
    if ours == desired:
        return current
    others = [s for s in sidecars if not is_our_sidecar(s)]
    merged = others + desired
    return json.dumps(merged, separators=(",", ":")) if merged else None


def hook_configmap(namespace: str, owners: list[dict[str, Any]]) -> dict[str, Any]:
    """The ConfigMap holding the hook script, owned by the namespace's VMGroups."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": HOOK_CONFIGMAP,
            "namespace": namespace,
            "labels": {MANAGED_BY_LABEL: MANAGED_BY, "app.kubernetes.io/part-of": "vmha"},
            "ownerReferences": owners,
        },
        "data": {HOOK_SCRIPT_KEY: hook_script()},
    }
