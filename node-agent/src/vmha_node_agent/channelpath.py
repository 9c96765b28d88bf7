"""Where a VM's channel socket is on the host, from its VMI and virt-launcher Pod.

QEMU listens on the socket inside the launcher Pod, at the path the VMI's
`vmha.io/channel-path` annotation names (the operator sets it; the default is KubeVirt's
private directory). That directory is a volume of the Pod's `compute` container; for an
emptyDir the kubelet keeps it on the host at
`<kubelet root>/pods/<pod uid>/volumes/kubernetes.io~empty-dir/<volume>/`, which is where
the agent connects (as virt-handler reaches the same directory).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any, Final

from vmha_node_agent.kubevirt import annotations_of, metadata

CHANNEL_PATH_ANNOTATION: Final = "vmha.io/channel-path"
DEFAULT_CHANNEL_PATH: Final = "/var/run/kubevirt-private/vmha"
COMPUTE_CONTAINER: Final = "compute"
EMPTY_DIR_PLUGIN: Final = "kubernetes.io~empty-dir"


class Unresolved(Exception):
    """The socket's host path cannot be worked out (the message says why)."""


def channel_path(vmi: Mapping[str, Any]) -> PurePosixPath:
    """The socket's path inside the launcher Pod."""
    raw = annotations_of(vmi).get(CHANNEL_PATH_ANNOTATION) or DEFAULT_CHANNEL_PATH
    path = PurePosixPath(raw)
    if not path.is_absolute() or ".." in path.parts or len(path.parts) < 3:
        raise Unresolved(f"{CHANNEL_PATH_ANNOTATION} {raw!r} is not an absolute file path")
    return path


def host_socket_path(pod: Mapping[str, Any], in_pod: PurePosixPath, kubelet_root: Path) -> Path:
    """The host path of `in_pod` in the Pod's `compute` container, which must lie in an
    emptyDir volume."""
    spec = pod.get("spec") or {}
    container = next(
        (c for c in spec.get("containers") or () if c.get("name") == COMPUTE_CONTAINER), None
    )
    if container is None:
        raise Unresolved(f"the Pod has no {COMPUTE_CONTAINER!r} container")
    mount = _enclosing_mount(container.get("volumeMounts") or (), in_pod.parent)
    if mount is None:
        raise Unresolved(f"no volume of the {COMPUTE_CONTAINER!r} container holds {in_pod}")
    volume_name = str(mount.get("name"))
    volume = next((v for v in spec.get("volumes") or () if v.get("name") == volume_name), None)
    if volume is None or "emptyDir" not in volume:
        raise Unresolved(f"volume {volume_name!r} holding {in_pod} is not an emptyDir")
    if mount.get("subPathExpr"):
        raise Unresolved(f"volume {volume_name!r} is mounted with a subPathExpr")
    pod_uid = str(metadata(pod).get("uid") or "")
    if not pod_uid:
        raise Unresolved("the Pod has no uid")
    inside = in_pod.relative_to(str(mount.get("mountPath")))
    sub_path = PurePosixPath(str(mount.get("subPath") or ""))
    if sub_path.is_absolute() or ".." in sub_path.parts:
        raise Unresolved(f"volume {volume_name!r} has an unusable subPath {sub_path}")
    volume_dir = kubelet_root / "pods" / pod_uid / "volumes" / EMPTY_DIR_PLUGIN / volume_name
    return volume_dir / sub_path / inside


def _enclosing_mount(mounts: Any, directory: PurePosixPath) -> Mapping[str, Any] | None:
    """The mount whose path is `directory` or its nearest ancestor (the innermost mount is
    the one the container sees)."""
    best: Mapping[str, Any] | None = None
    best_depth = -1
    for mount in mounts:
        mount_path = PurePosixPath(str(mount.get("mountPath") or ""))
        if not mount_path.is_absolute():
            continue
        if directory == mount_path or mount_path in directory.parents:
            depth = len(mount_path.parts)
            if depth > best_depth:
                best, best_depth = mount, depth
    return best
