"""examples/ applied as a user would (`kubectl apply -f examples/`) with the operator running,
so the examples never rot: the group is created, both VMs join and get their placement."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vmha_testbed.controlplane import ControlPlane
from vmha_testbed.kubectl import Kubectl

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_examples_are_yaml_with_a_group_and_its_vms() -> None:
    documents = [
        doc
        for path in sorted(EXAMPLES.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]
    kinds = [doc["kind"] for doc in documents]
    assert kinds == ["VMGroup", "VirtualMachine", "VirtualMachine"]
    group = documents[0]["metadata"]["name"]
    assert all(d["metadata"]["labels"]["vmha.io/group"] == group for d in documents[1:])


@pytest.mark.usefixtures("operator")
def test_examples_apply_and_the_vms_join(control_plane: ControlPlane, namespace: str) -> None:
    kubectl = Kubectl(control_plane, namespace)
    applied = kubectl.ok("apply", "-f", str(EXAMPLES))
    assert applied.split("\n")[:3] == [
        "vmgroup.vmha.io/web created",
        "virtualmachine.kubevirt.io/web-1 created",
        "virtualmachine.kubevirt.io/web-2 created",
    ]
    for name in ("web-1", "web-2"):
        template = kubectl.get("vm", name)["spec"]["template"]
        assert template["metadata"]["labels"] == {"app": "web", "vmha.io/group": "web"}
        anti = template["spec"]["affinity"]["podAntiAffinity"]
        assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == (
            "kubernetes.io/hostname"
        )
        assert "hooks.kubevirt.io/hookSidecars" in template["metadata"]["annotations"]
    kubectl.eventually(
        lambda: kubectl.get("vmg", "web").get("status", {}).get("memberCount") == 2,
        "the example group reporting two members",
    )
    # Applying again is a no-op: the webhook's changes do not fight the manifests.
    again = kubectl.ok("apply", "-f", str(EXAMPLES))
    assert "configured" not in again, again
