"""Kubernetes discovery as its watches report changes: which VMIs on this node are attached,
when they are let go, and when only their policy changes. The watches' updates are fed in
directly (the real watches run against the apiserver in the integration tier)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes.client
import pytest

from vmha_node_agent.config import AgentConfig
from vmha_node_agent.discovery import KubernetesVMSource
from vmha_node_agent.inventory import KUBERNETES, InventoryChange, VMAdded, VMRemoved
from vmha_node_agent.kubeapi import KubeApi
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.ratelimit import TokenBucket
from vmha_node_agent.transport import connectable_path
from vmha_node_agent.watch import Changed, Listed

pytestmark = pytest.mark.timeout(30)
NODE = "node-a"


def vmi(name: str, *, node: str = NODE, group: str | None = "web", **extra: Any) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": "ns",
        "uid": f"uid-{name}",
        "labels": {"vmha.io/group": group} if group else {},
        "annotations": extra.pop("annotations", {}),
    }
    metadata.update(extra.pop("metadata", {}))
    return {"metadata": metadata, "status": {"phase": "Running", "nodeName": node, **extra}}


def launcher(name: str, pod_uid: str, *, vmi_uid: str | None = None) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"virt-launcher-{name}",
            "namespace": "ns",
            "uid": pod_uid,
            "labels": {"kubevirt.io/created-by": vmi_uid or f"uid-{name}"},
        },
        "spec": {
            "nodeName": NODE,
            "containers": [
                {
                    "name": "compute",
                    "volumeMounts": [{"name": "private", "mountPath": "/var/run/kubevirt-private"}],
                }
            ],
            "volumes": [{"name": "private", "emptyDir": {}}],
        },
        "status": {"phase": "Running"},
    }


def group(name: str, **heartbeat: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": "ns"}, "spec": {"heartbeat": heartbeat}}


class Discovery:
    def __init__(self, root: Path) -> None:
        self.root = root
        config = AgentConfig.model_validate(
            {"node_name": NODE, "kubernetes": {"kubelet_root": str(root)}}
        )
        self.metrics = AgentMetrics()
        unused = KubeApi(
            kubernetes.client.ApiClient(),
            self.metrics,
            timeout_s=1.0,
            write_budget=TokenBucket(1.0, 1),
        )
        self.source = KubernetesVMSource(unused, config, self.metrics)
        self._changes = self.source.changes()
        self._reading: asyncio.Future[InventoryChange] | None = None
        self._sockets: list[socket.socket] = []

    def socket_for(self, pod_uid: str) -> Path:
        """QEMU's socket in the launcher's emptyDir on this node."""
        directory = self.root / "pods" / pod_uid / "volumes" / "kubernetes.io~empty-dir" / "private"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "vmha"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with connectable_path(path) as short:  # the full path may be too long to bind
            sock.bind(short)
        self._sockets.append(sock)
        return path

    def list_all(
        self,
        vmis: list[dict[str, Any]],
        pods: list[dict[str, Any]],
        groups: list[dict[str, Any]] | None = None,
    ) -> None:
        self.source.vmis_changed(Listed(vmis))
        self.source.pods_changed(Listed(pods))
        self.source.groups_changed(Listed(groups or []))

    async def next(self) -> InventoryChange:
        change = await self._take(timeout=5.0)
        assert change is not None, "no change came"
        return change

    async def nothing_more(self) -> None:
        assert await self._take(timeout=0.1) is None

    async def _take(self, timeout: float) -> InventoryChange | None:
        # A waiting read survives a timeout: cancelling it would close the stream.
        if self._reading is None:
            self._reading = asyncio.ensure_future(anext(self._changes))
        done, _ = await asyncio.wait({self._reading}, timeout=timeout)
        if not done:
            return None
        reading, self._reading = self._reading, None
        return reading.result()

    def gauge(self, state: str) -> float:
        value = self.metrics.registry.get_sample_value("vmha_discovery_vmis", {"state": state})
        return value or 0.0

    def close(self) -> None:
        if self._reading is not None:
            self._reading.cancel()
        for sock in self._sockets:
            sock.close()


@pytest.fixture
def discovery(tmp_path: Path) -> Iterator[Discovery]:
    d = Discovery(tmp_path)
    yield d
    d.close()


async def test_nothing_is_attached_until_every_watch_has_listed(discovery: Discovery) -> None:
    discovery.socket_for("p1")
    discovery.source.vmis_changed(Listed([vmi("a")]))
    discovery.source.pods_changed(Listed([launcher("a", "p1")]))
    assert not discovery.source.ready()
    await discovery.nothing_more()
    discovery.source.groups_changed(Listed([group("web", minIntervalMs=500)]))
    assert discovery.source.ready()
    added = await discovery.next()
    assert isinstance(added, VMAdded)
    assert added.vm.key == ("ns", "a")
    assert added.vm.uid == "uid-a"
    assert added.vm.origin == KUBERNETES
    assert added.vm.socket_path == (
        discovery.root / "pods/p1/volumes/kubernetes.io~empty-dir/private/vmha"
    )
    assert added.vm.policy is not None
    assert added.vm.policy.min_interval_ms == 500


async def test_only_vmis_on_this_node_that_want_heartbeat_and_have_a_socket(
    discovery: Discovery,
) -> None:
    for pod_uid in ("p1", "p2", "p3", "p4"):
        discovery.socket_for(pod_uid)
    vmis = [
        vmi("member"),
        vmi("elsewhere", node="node-b"),
        vmi("plain", group=None),
        vmi("opted-in", group=None, annotations={"vmha.io/heartbeat-enabled": "true"}),
        vmi("no-socket-yet"),
        vmi("no-pod"),
    ]
    pods = [
        launcher("member", "p1"),
        launcher("elsewhere", "p2"),
        launcher("plain", "p3"),
        launcher("opted-in", "p4"),
        launcher("no-socket-yet", "p5"),
    ]
    discovery.list_all(vmis, pods)
    added = {(await discovery.next()).vm.name for _ in range(2)}  # type: ignore[union-attr]
    assert added == {"member", "opted-in"}
    await discovery.nothing_more()
    assert discovery.gauge("attached") == 2
    assert discovery.gauge("waiting_for_socket") == 1
    assert discovery.gauge("unresolved") == 1  # no launcher Pod for no-pod


async def test_a_vmi_is_let_go_when_it_leaves_is_deleted_or_migrates(
    discovery: Discovery,
) -> None:
    names = ["moved", "deleting", "migrating", "gone", "podless", "relisted"]
    for index in range(len(names)):
        discovery.socket_for(f"p{index}")
    discovery.list_all(
        [vmi(name) for name in names], [launcher(name, f"p{i}") for i, name in enumerate(names)]
    )
    assert {(await discovery.next()).vm.name for _ in names} == set(names)  # type: ignore[union-attr]

    discovery.source.vmis_changed(Changed("MODIFIED", vmi("moved", node="node-b")))
    discovery.source.vmis_changed(
        Changed("MODIFIED", vmi("deleting", metadata={"deletionTimestamp": "2026-01-01T00:00:00Z"}))
    )
    migration = {"sourceNode": NODE, "targetNode": "node-b", "migrationUid": "m1"}
    discovery.source.vmis_changed(Changed("MODIFIED", vmi("migrating", migrationState=migration)))
    discovery.source.vmis_changed(Changed("DELETED", vmi("gone")))
    discovery.source.pods_changed(Changed("DELETED", launcher("podless", "p4")))
    removed = [await discovery.next() for _ in range(5)]
    assert removed == [
        VMRemoved(("ns", name)) for name in ("moved", "deleting", "migrating", "gone", "podless")
    ]
    # A relist that no longer has the VMI (a watch that expired and listed again).
    discovery.source.vmis_changed(Listed([vmi("migrating", migrationState=migration)]))
    assert await discovery.next() == VMRemoved(("ns", "relisted"))
    await discovery.nothing_more()

    # The migration failed: the VMI stays here, and is attached again.
    failed = {**migration, "failed": True}
    discovery.source.vmis_changed(Changed("MODIFIED", vmi("migrating", migrationState=failed)))
    again = await discovery.next()
    assert isinstance(again, VMAdded)
    assert again.vm.name == "migrating"


async def test_a_group_change_updates_the_policy_without_a_new_identity(
    discovery: Discovery,
) -> None:
    discovery.socket_for("p1")
    discovery.list_all([vmi("a")], [launcher("a", "p1")], [group("web", missedThreshold=2)])
    first = await discovery.next()
    assert isinstance(first, VMAdded)
    discovery.source.groups_changed(
        Changed("MODIFIED", group("web", missedThreshold=5, correctiveAction="reboot"))
    )
    updated = await discovery.next()
    assert isinstance(updated, VMAdded)
    assert updated.vm == first.vm  # the same session
    assert updated.vm.policy is not None
    assert (updated.vm.policy.missed_threshold, updated.vm.policy.corrective_action) == (
        5,
        "reboot",
    )
    # An unrelated status update changes nothing.
    discovery.source.vmis_changed(Changed("MODIFIED", vmi("a", conditions=[{"type": "Ready"}])))
    await discovery.nothing_more()
    # Heartbeat switched off for the group, messaging still on: a new session for
    # messaging only (the guest's registration must end).
    discovery.source.groups_changed(Changed("MODIFIED", group("web", enabled=False)))
    assert await discovery.next() == VMRemoved(("ns", "a"))
    messaging_only = await discovery.next()
    assert isinstance(messaging_only, VMAdded)
    assert not messaging_only.vm.heartbeat
    # Messaging switched off too: let go.
    off = group("web", enabled=False)
    off["spec"]["messaging"] = False
    discovery.source.groups_changed(Changed("MODIFIED", off))
    assert await discovery.next() == VMRemoved(("ns", "a"))
    await discovery.nothing_more()


async def test_a_new_launcher_pod_means_a_new_session_on_its_socket(discovery: Discovery) -> None:
    old_socket = discovery.socket_for("p1")
    discovery.list_all([vmi("a")], [launcher("a", "p1")])
    first = await discovery.next()
    assert isinstance(first, VMAdded)
    assert first.vm.socket_path == old_socket
    new_socket = discovery.socket_for("p2")
    discovery.source.pods_changed(Changed("DELETED", launcher("a", "p1")))
    discovery.source.pods_changed(Changed("ADDED", launcher("a", "p2")))
    assert await discovery.next() == VMRemoved(("ns", "a"))
    second = await discovery.next()
    assert isinstance(second, VMAdded)
    assert second.vm.socket_path == new_socket


async def test_a_vmi_of_the_same_name_with_a_new_uid_is_a_new_vm(discovery: Discovery) -> None:
    discovery.socket_for("p1")
    discovery.socket_for("p2")
    discovery.list_all([vmi("a")], [launcher("a", "p1")])
    await discovery.next()
    replacement = vmi("a", metadata={"uid": "uid-a-2"})
    discovery.source.vmis_changed(Changed("DELETED", vmi("a")))
    discovery.source.vmis_changed(Changed("ADDED", replacement))
    assert await discovery.next() == VMRemoved(("ns", "a"))
    await discovery.nothing_more()  # the old launcher does not run the new VMI
    discovery.source.pods_changed(Changed("ADDED", launcher("a", "p2", vmi_uid="uid-a-2")))
    added = await discovery.next()
    assert isinstance(added, VMAdded)
    assert added.vm.uid == "uid-a-2"
