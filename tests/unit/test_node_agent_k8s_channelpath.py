"""From a VMI and its virt-launcher Pod to the channel socket on the host; and the socket
reached even when its host path is longer than a unix socket address."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from vmha_node_agent.channelpath import Unresolved, channel_path, host_socket_path
from vmha_node_agent.kubevirt import choose_launcher, migrating_away, owner_vm, runs_vmi
from vmha_node_agent.transport import MAX_UNIX_PATH_BYTES, connectable_path

KUBELET = Path("/var/lib/kubelet")
POD_UID = "0b5c7d1e-2f3a-4b5c-8d9e-0f1a2b3c4d5e"
VMI_UID = "11111111-2222-3333-4444-555555555555"
EMPTY_DIR = f"/var/lib/kubelet/pods/{POD_UID}/volumes/kubernetes.io~empty-dir"


def vmi(annotations: dict[str, str] | None = None, **status: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "vm-1",
            "namespace": "ns",
            "uid": VMI_UID,
            "annotations": annotations or {},
        },
        "status": status,
    }


def pod(
    mounts: list[dict[str, Any]] | None = None,
    volumes: list[dict[str, Any]] | None = None,
    *,
    labels: dict[str, str] | None = None,
    uid: str = POD_UID,
    phase: str = "Running",
    created: str = "2026-01-01T00:00:00Z",
    container: str = "compute",
    **metadata: Any,
) -> dict[str, Any]:
    default_mounts = [{"name": "private", "mountPath": "/var/run/kubevirt-private"}]
    return {
        "metadata": {
            "name": f"virt-launcher-vm-1-{uid[:5]}",
            "namespace": "ns",
            "uid": uid,
            "creationTimestamp": created,
            "labels": {"kubevirt.io/created-by": VMI_UID} if labels is None else labels,
            **metadata,
        },
        "spec": {
            "containers": [
                {"name": "volumerootdisk", "volumeMounts": [{"name": "x", "mountPath": "/"}]},
                {"name": container, "volumeMounts": default_mounts if mounts is None else mounts},
            ],
            "volumes": [{"name": "private", "emptyDir": {}}] if volumes is None else volumes,
        },
        "status": {"phase": phase},
    }


# --- the path inside the launcher ------------------------------------------------------------


def test_the_default_channel_path_is_kubevirts_private_directory() -> None:
    assert channel_path(vmi()) == PurePosixPath("/var/run/kubevirt-private/vmha")


def test_the_operator_annotation_names_the_channel_path() -> None:
    annotated = vmi({"vmha.io/channel-path": "/var/run/kubevirt-private/x/vmha.sock"})
    assert channel_path(annotated) == PurePosixPath("/var/run/kubevirt-private/x/vmha.sock")


@pytest.mark.parametrize("bad", ["relative/vmha", "/var/run/../../etc/vmha", "/vmha"])
def test_an_unusable_channel_path_is_refused(bad: str) -> None:
    with pytest.raises(Unresolved, match="not an absolute file path"):
        channel_path(vmi({"vmha.io/channel-path": bad}))


# --- the host path ----------------------------------------------------------------------------


def test_the_socket_in_the_private_emptydir_is_under_the_kubelets_pod_directory() -> None:
    path = host_socket_path(pod(), channel_path(vmi()), KUBELET)
    assert path == Path(f"{EMPTY_DIR}/private/vmha")


def test_a_socket_in_a_subdirectory_of_the_volume_keeps_its_subdirectory() -> None:
    in_pod = PurePosixPath("/var/run/kubevirt-private/channels/vmha")
    assert host_socket_path(pod(), in_pod, Path("/k")) == Path(
        f"/k/pods/{POD_UID}/volumes/kubernetes.io~empty-dir/private/channels/vmha"
    )


def test_the_innermost_mount_holding_the_directory_wins() -> None:
    mounts = [
        {"name": "private", "mountPath": "/var/run/kubevirt-private"},
        {"name": "sockets", "mountPath": "/var/run/kubevirt-private/channels"},
    ]
    volumes = [{"name": "private", "emptyDir": {}}, {"name": "sockets", "emptyDir": {}}]
    in_pod = PurePosixPath("/var/run/kubevirt-private/channels/vmha")
    path = host_socket_path(pod(mounts, volumes), in_pod, KUBELET)
    assert path == Path(f"{EMPTY_DIR}/sockets/vmha")


def test_a_subpath_mount_maps_into_the_volume() -> None:
    mounts = [{"name": "private", "mountPath": "/var/run/kubevirt-private", "subPath": "a/b"}]
    path = host_socket_path(pod(mounts), channel_path(vmi()), KUBELET)
    assert path == Path(f"{EMPTY_DIR}/private/a/b/vmha")


def test_a_memory_backed_emptydir_is_still_an_emptydir() -> None:
    volumes = [{"name": "private", "emptyDir": {"medium": "Memory"}}]
    path = host_socket_path(pod(volumes=volumes), channel_path(vmi()), KUBELET)
    assert path == Path(f"{EMPTY_DIR}/private/vmha")


@pytest.mark.parametrize(
    ("launcher", "message"),
    [
        (pod(volumes=[{"name": "private", "hostPath": {"path": "/x"}}]), "is not an emptyDir"),
        (pod(volumes=[]), "is not an emptyDir"),
        (pod(mounts=[{"name": "private", "mountPath": "/elsewhere"}]), "no volume"),
        (pod(container="sidecar"), "no 'compute' container"),
        (
            pod(
                [
                    {
                        "name": "private",
                        "mountPath": "/var/run/kubevirt-private",
                        "subPathExpr": "$(X)",
                    }
                ]
            ),
            "subPathExpr",
        ),
        (pod(uid=""), "no uid"),
    ],
)
def test_a_pod_that_does_not_expose_the_socket_is_unresolved(
    launcher: dict[str, Any], message: str
) -> None:
    with pytest.raises(Unresolved, match=message):
        host_socket_path(launcher, channel_path(vmi()), KUBELET)


# --- which Pod runs the VMI -------------------------------------------------------------------


def test_the_launcher_is_found_by_the_created_by_label() -> None:
    mine, other = pod(), pod(labels={"kubevirt.io/created-by": "someone-else"}, uid="p2")
    assert choose_launcher(vmi(), [other, mine]) is mine


def test_the_launcher_is_found_by_its_owner_reference_without_labels() -> None:
    owned = pod(labels={}, ownerReferences=[{"kind": "VirtualMachineInstance", "uid": VMI_UID}])
    assert runs_vmi(owned, vmi())


def test_the_vm_name_label_is_a_fallback_only_when_no_uid_is_named() -> None:
    by_name = pod(labels={"vm.kubevirt.io/name": "vm-1"})
    assert runs_vmi(by_name, vmi())
    older = pod(labels={"vm.kubevirt.io/name": "vm-1", "kubevirt.io/created-by": "old-uid"})
    assert not runs_vmi(older, vmi())  # a launcher of an earlier VMI of the same name
    elsewhere = pod(labels={"vm.kubevirt.io/name": "vm-1"}, namespace="other")
    assert not runs_vmi(elsewhere, vmi())


def test_finished_or_terminating_launchers_are_not_chosen_and_running_beats_newer() -> None:
    done = pod(uid="done", phase="Succeeded")
    leaving = pod(uid="leaving", deletionTimestamp="2026-01-01T00:00:00Z")
    assert choose_launcher(vmi(), [done, leaving]) is None
    running = pod(uid="running", created="2026-01-01T00:00:00Z")
    pending = pod(uid="pending", phase="Pending", created="2026-01-02T00:00:00Z")
    assert choose_launcher(vmi(), [pending, running]) is running
    newer = pod(uid="newer", phase="Pending", created="2026-01-03T00:00:00Z")
    assert choose_launcher(vmi(), [pending, newer]) is newer


# --- other facts from KubeVirt objects ---------------------------------------------------------


def test_a_migration_in_progress_from_this_node_is_moving_away() -> None:
    state = {"sourceNode": "node-a", "targetNode": "node-b", "migrationUid": "m"}
    running = vmi(nodeName="node-a", migrationState=state)
    assert migrating_away(running, "node-a")
    assert not migrating_away(running, "node-b")
    done = vmi(nodeName="node-b", migrationState={**state, "completed": True})
    assert not migrating_away(done, "node-a")
    failed = vmi(nodeName="node-a", migrationState={**state, "failed": True})
    assert not migrating_away(failed, "node-a")
    assert not migrating_away(vmi(nodeName="node-a"), "node-a")


def test_the_owning_virtual_machine_is_the_controller_reference() -> None:
    owned = vmi()
    owned["metadata"]["ownerReferences"] = [
        {"kind": "VirtualMachine", "name": "not-controller", "uid": "x"},
        {"kind": "VirtualMachine", "name": "vm-1", "uid": "u-vm", "controller": True},
    ]
    assert owner_vm(owned) == ("vm-1", "u-vm")
    assert owner_vm(vmi()) is None


# --- long socket paths ------------------------------------------------------------------------


async def test_a_socket_whose_path_is_too_long_for_an_address_is_still_reached(
    tmp_path: Path,
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    short = tmp_path / "s"
    short.symlink_to(deep)  # QEMU's side binds through a short path
    server = await asyncio.start_unix_server(_echo, path=str(short / "vmha"))
    try:
        target = deep / "vmha"
        assert len(os.fsencode(target)) > MAX_UNIX_PATH_BYTES
        with pytest.raises(OSError):
            await asyncio.open_unix_connection(str(target))
        with connectable_path(target) as path:
            reader, writer = await asyncio.open_unix_connection(path)
        writer.write(b"ping\n")
        assert await asyncio.wait_for(reader.readline(), 5) == b"ping\n"
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(await reader.readline())
    await writer.drain()
    writer.close()
