"""examples/ applied as a user would (`kubectl apply -f examples/`) with the operator running,
so the examples never rot: the group is created, both VMs join and get their placement."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmha_operator.devrun import OperatorProcess
from vmha_testbed.controlplane import ControlPlane

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
SETTLE_TIMEOUT = 60.0


@pytest.fixture
def operator(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    log = tmp_path / "operator.log"
    with OperatorProcess(control_plane.kubeconfig_path, namespaces=[namespace], log_path=log) as op:
        yield op


def get(control_plane: ControlPlane, namespace: str, *what: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(
        control_plane.kubectl("-n", namespace, "get", *what, "-o", "json").stdout
    )
    return result


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
    applied = control_plane.kubectl("-n", namespace, "apply", "-f", str(EXAMPLES)).stdout
    assert applied.split("\n")[:3] == [
        "vmgroup.vmha.io/web created",
        "virtualmachine.kubevirt.io/web-1 created",
        "virtualmachine.kubevirt.io/web-2 created",
    ]
    for name in ("web-1", "web-2"):
        template = get(control_plane, namespace, "vm", name)["spec"]["template"]
        assert template["metadata"]["labels"] == {"app": "web", "vmha.io/group": "web"}
        anti = template["spec"]["affinity"]["podAntiAffinity"]
        assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["topologyKey"] == (
            "kubernetes.io/hostname"
        )
        assert "hooks.kubevirt.io/hookSidecars" in template["metadata"]["annotations"]
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while get(control_plane, namespace, "vmg", "web").get("status", {}).get("memberCount") != 2:
        assert time.monotonic() < deadline, "the example group did not report two members"
        time.sleep(0.3)
    # Applying again is a no-op: the webhook's changes do not fight the manifests.
    again = control_plane.kubectl("-n", namespace, "apply", "-f", str(EXAMPLES)).stdout
    assert "configured" not in again, again
