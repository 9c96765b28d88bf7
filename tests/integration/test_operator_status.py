"""VMGroup status, conditions and Events as member VMIs change, and an operator restart
mid-way. The tests play virt-controller and virt-handler: they create VMIs from the VM
templates and set phase, node and readiness; the node agent's heartbeat annotation is set the
way the agent writes it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from vmha_testbed.controlplane import ControlPlane
from vmha_testbed.kubectl import Kubectl
from vmha_testbed.operatorproc import OperatorProcess


class Cluster(Kubectl):
    """kubectl in the test's namespace, and virt-controller's part."""

    def vm(self, name: str, group: str | None) -> None:
        labels = f"{{vmha.io/group: {group}}}" if group else "{}"
        self.ok(
            "apply",
            "-f",
            "-",
            stdin=f"""
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {{name: {name}, labels: {labels}}}
spec:
  runStrategy: Always
  template:
    spec: {{domain: {{devices: {{}}}}}}
""",
        )

    def start_vmi(self, name: str) -> None:
        """A VMI from the VM's template, as virt-controller creates it."""
        vm = self.get("vm", name)
        template = vm["spec"]["template"]
        vmi = {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {
                **template.get("metadata", {}),
                "name": name,
                "ownerReferences": [
                    {
                        "apiVersion": "kubevirt.io/v1",
                        "kind": "VirtualMachine",
                        "name": name,
                        "uid": vm["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": template["spec"],
            "status": {"phase": "Pending"},
        }
        self.ok("create", "-f", "-", stdin=json.dumps(vmi))

    def set_vmi(self, name: str, phase: str, node: str | None = None, ready: bool = False) -> None:
        """virt-controller/virt-handler's status updates (VMIs have no status subresource)."""
        status: dict[str, Any] = {"phase": phase, "nodeName": node}
        status["conditions"] = [{"type": "Ready", "status": "True" if ready else "False"}]
        self.ok("patch", "vmi", name, "--type=merge", "-p", json.dumps({"status": status}))

    def heartbeat(self, name: str, state: str) -> None:
        self.ok("annotate", "--overwrite", "vmi", name, f"vmha.io/heartbeat={state}")

    def status(self, group: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get("vmgroup", group).get("status", {})
        return result

    def events(self, reason: str | None = None) -> list[dict[str, Any]]:
        items = json.loads(self.ok("get", "events", "-o", "json"))["items"]
        return [
            e
            for e in items
            if e["involvedObject"]["kind"] == "VMGroup" and reason in (None, e["reason"])
        ]


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


def members(status: dict[str, Any]) -> list[tuple[Any, ...]]:
    return [
        (m["vm"], m.get("node"), m["phase"], m["ready"], m["heartbeat"])
        for m in status.get("members", [])
    ]


def start_operator(control_plane: ControlPlane, namespace: str, log: Path) -> OperatorProcess:
    return OperatorProcess(control_plane.kubeconfig_path, namespaces=[namespace], log_path=log)


@pytest.fixture
def cluster(control_plane: ControlPlane, namespace: str) -> Cluster:
    return Cluster(control_plane, namespace)


@pytest.mark.usefixtures("operator")
def test_status_follows_the_members_vmis(cluster: Cluster) -> None:
    cluster.group("web", "{policy: anti-affinity}")
    cluster.vm("a", "web")
    cluster.vm("b", "web")
    status = cluster.eventually(
        lambda: cluster.status("web").get("memberCount") == 2 and cluster.status("web"),
        "two members",
    )
    assert members(status) == [
        ("a", None, "Stopped", False, "unknown"),
        ("b", None, "Stopped", False, "unknown"),
    ]
    assert condition(status, "Ready")["reason"] == "MembersNotReady"

    cluster.start_vmi("a")
    cluster.start_vmi("b")
    cluster.set_vmi("a", "Running", "node-1", ready=True)
    cluster.set_vmi("b", "Running", "node-2", ready=True)
    cluster.heartbeat("a", "healthy")
    status = cluster.eventually(
        lambda: condition(s := cluster.status("web"), "Ready").get("status") == "True" and s,
        "group Ready",
    )
    assert members(status) == [
        ("a", "node-1", "Running", True, "healthy"),
        ("b", "node-2", "Running", True, "unknown"),
    ]
    assert (status["memberCount"], status["readyMembers"]) == (2, 2)
    assert condition(status, "PolicySatisfied")["status"] == "True"
    assert status["observedGeneration"] == 1
    table = cluster.ok("get", "vmg", "web", "-o", "wide").splitlines()[1].split()
    assert table[:5] == ["web", "anti-affinity", "2", "2", "True"]

    # An unhealthy heartbeat makes the group not Ready.
    cluster.heartbeat("b", "unhealthy")
    status = cluster.eventually(
        lambda: (
            condition(s := cluster.status("web"), "Ready").get("reason") == "HeartbeatUnhealthy"
            and s
        ),
        "heartbeat reported",
    )
    assert condition(status, "Ready")["message"] == ("2 of 2 members ready; unhealthy heartbeat: b")


@pytest.mark.usefixtures("operator")
def test_a_violation_names_the_node_and_raises_an_event(cluster: Cluster) -> None:
    cluster.group("web", "{policy: anti-affinity, bestEffort: true}")
    for name, node in (("a", "node-1"), ("b", "node-1")):
        cluster.vm(name, "web")
        cluster.start_vmi(name)
        cluster.set_vmi(name, "Running", node, ready=True)
    status = cluster.eventually(
        lambda: (
            condition(s := cluster.status("web"), "PolicySatisfied").get("status") == "False" and s
        ),
        "violation reported",
    )
    policy = condition(status, "PolicySatisfied")
    assert policy["reason"] == "BestEffortViolation"
    assert policy["message"] == (
        "anti-affinity, best effort not satisfied: 2 members on node node-1 (a, b), "
        "at most 1 allowed"
    )
    events = cluster.eventually(lambda: cluster.events("BestEffortViolation"), "violation Event")
    assert events[0]["type"] == "Warning" and "node node-1" in events[0]["message"]
    described = cluster.ok("describe", "vmgroup", "web")
    assert "BestEffortViolation" in described and "MemberJoined" in described

    # virt-handler moves b: the policy holds again, and that is reported too.
    cluster.set_vmi("b", "Running", "node-2", ready=True)
    cluster.eventually(
        lambda: condition(cluster.status("web"), "PolicySatisfied").get("status") == "True",
        "policy satisfied again",
    )
    cluster.eventually(lambda: cluster.events("PolicySatisfied"), "recovery Event")


@pytest.mark.usefixtures("operator")
def test_members_joining_and_leaving(cluster: Cluster) -> None:
    cluster.group("web", "{policy: soft-affinity}")
    cluster.vm("a", "web")
    cluster.vm("b", "web")
    cluster.eventually(lambda: len(cluster.events("MemberJoined")) == 2, "two MemberJoined Events")
    cluster.ok("label", "vm", "a", "vmha.io/group-")
    cluster.ok("delete", "vm", "b")
    status = cluster.eventually(
        lambda: (s := cluster.status("web")).get("memberCount") == 0 and s, "both left"
    )
    assert condition(status, "Ready")["reason"] == "NoMembers"
    left = cluster.eventually(
        lambda: len(cluster.events("MemberLeft")) == 2 and cluster.events("MemberLeft"),
        "MemberLeft Events",
    )
    assert sorted(e["message"] for e in left) == [
        "VirtualMachine a left the group",
        "VirtualMachine b left the group",
    ]
    # The VM that left keeps running as a plain VM: our template changes are gone.
    assert "affinity" not in cluster.get("vm", "a")["spec"]["template"]["spec"]


def test_operator_restart_loses_nothing(
    control_plane: ControlPlane, namespace: str, cluster: Cluster, tmp_path: Path
) -> None:
    first = start_operator(control_plane, namespace, tmp_path / "first.log").start()
    try:
        cluster.group("web", "{policy: anti-affinity}")
        cluster.vm("a", "web")
        cluster.vm("b", "web")
        cluster.start_vmi("a")
        cluster.set_vmi("a", "Running", "node-1", ready=True)
        cluster.eventually(lambda: cluster.status("web").get("readyMembers") == 1, "a ready")
    finally:
        first.stop()

    # While no operator runs: b starts on a's node, a's heartbeat fails, and a new VM joins
    # without any webhook to mutate it.
    cluster.start_vmi("b")
    cluster.set_vmi("b", "Running", "node-1", ready=True)
    cluster.heartbeat("a", "unhealthy")
    cluster.vm("c", "web")
    assert "affinity" not in cluster.get("vm", "c")["spec"]["template"]["spec"]
    joined_before = len(cluster.events("MemberJoined"))
    assert joined_before == 2

    with start_operator(control_plane, namespace, tmp_path / "second.log"):
        status = cluster.eventually(
            lambda: (
                (s := cluster.status("web")).get("memberCount") == 3
                and condition(s, "PolicySatisfied").get("status") == "False"
                and s
            ),
            "status caught up",
        )
        assert members(status) == [
            ("a", "node-1", "Running", True, "unhealthy"),
            ("b", "node-1", "Running", True, "unknown"),
            ("c", None, "Stopped", False, "unknown"),
        ]
        assert "node node-1" in condition(status, "PolicySatisfied")["message"]
        # The late joiner gets its placement terms from the reconciliation.
        cluster.eventually(
            lambda: "affinity" in cluster.get("vm", "c")["spec"]["template"]["spec"],
            "c's template updated",
        )
        cluster.eventually(lambda: cluster.events("PolicyViolated"), "violation Event")
        joined = [e["message"] for e in cluster.events("MemberJoined")]
        assert sorted(joined) == [
            "VirtualMachine a joined the group",
            "VirtualMachine b joined the group",
            "VirtualMachine c joined the group",
        ]

    # A third start changes nothing and repeats no Event: once it has handled the group
    # (its handler posts Events before it returns), status and Events are as they were.
    settled = cluster.status("web")
    events_before = len(cluster.events())
    log = tmp_path / "third.log"
    with start_operator(control_plane, namespace, log):
        cluster.eventually(
            lambda: "Handler 'vmgroup-changed' succeeded" in log.read_text(),
            "the third operator handled the group",
        )
        assert cluster.status("web") == settled
        assert len(cluster.events()) == events_before
