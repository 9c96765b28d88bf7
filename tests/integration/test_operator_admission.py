"""The operator as a process against the real apiserver: every refusal (accepted and refused
case, with the message `kubectl` shows), and the placement terms and channel hook as the
mutating webhook applies them to VirtualMachines."""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from vmha_testbed.controlplane import ControlPlane
from vmha_testbed.kubectl import Kubectl
from vmha_testbed.operatorproc import OperatorProcess

HOSTNAME = "kubernetes.io/hostname"


class Cluster(Kubectl):
    """kubectl in the test's namespace."""

    def apply(self, manifest: str) -> subprocess.CompletedProcess[str]:
        return self.run("apply", "-f", "-", stdin=manifest)

    def vm_manifest(self, name: str, group: str | None, template_spec: str = "") -> str:
        labels = f"labels: {{vmha.io/group: {group}}}" if group else "labels: {}"
        return f"""
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: {name}
  {labels}
spec:
  runStrategy: Always
  template:
    spec:
      domain: {{devices: {{}}, resources: {{requests: {{memory: 64Mi}}}}}}
{template_spec}
"""

    def vm(self, name: str, group: str | None, template_spec: str = "") -> None:
        self.ok("apply", "-f", "-", stdin=self.vm_manifest(name, group, template_spec))


@pytest.fixture
def cluster(control_plane: ControlPlane, namespace: str, operator: OperatorProcess) -> Cluster:
    return Cluster(control_plane, namespace)


def template(vm: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = vm["spec"]["template"]
    return result


def group_term(group: str) -> dict[str, Any]:
    return {"labelSelector": {"matchLabels": {"vmha.io/group": group}}, "topologyKey": HOSTNAME}


# --- joining ---------------------------------------------------------------------------------


def test_joining_a_full_group_is_refused(cluster: Cluster) -> None:
    cluster.group("web", "{policy: anti-affinity, maxMembers: 2}")
    cluster.vm("a", "web")
    cluster.vm("b", "web")
    error = cluster.refused("apply", "-f", "-", stdin=cluster.vm_manifest("c", "web"))
    assert 'admission webhook "validate-virtualmachine.' in error
    assert (
        'denied the request: VMGroup "web" is full (rule: maxMembers is 2; members: a, b): '
        'VirtualMachine "c" cannot join'
    ) in error
    # Labelling an existing VM into the full group is joining too.
    cluster.vm("d", None)
    error = cluster.refused("label", "vm", "d", "vmha.io/group=web")
    assert 'VMGroup "web" is full' in error
    # Updating a member of the full group is not joining.
    cluster.ok("annotate", "vm", "a", "note=hello")
    # Once a member leaves there is room again.
    cluster.ok("label", "vm", "b", "vmha.io/group-")
    cluster.ok("label", "vm", "d", "vmha.io/group=web")


def test_joining_a_group_that_does_not_exist_is_refused(cluster: Cluster) -> None:
    error = cluster.refused("apply", "-f", "-", stdin=cluster.vm_manifest("a", "nosuch"))
    assert 'VMGroup "nosuch" does not exist in namespace' in error
    assert "rule: a VirtualMachine can only join an existing group" in error
    cluster.vm("b", None)  # VMs outside any group are none of our business


# --- the group itself ------------------------------------------------------------------------


def test_deleting_a_group_with_members_is_refused(cluster: Cluster) -> None:
    cluster.group("web", "{policy: soft-anti-affinity}")
    cluster.vm("a", "web")
    error = cluster.refused("delete", "vmgroup", "web")
    assert 'admission webhook "validate-vmgroup.' in error
    assert (
        'VMGroup "web" still has 1 member(s): a (rule: a VMGroup with members cannot be '
        "deleted): delete them or remove their vmha.io/group label first"
    ) in error
    cluster.ok("label", "vm", "a", "vmha.io/group-")
    cluster.ok("delete", "vmgroup", "web")


def test_changing_policy_with_members_is_refused(cluster: Cluster) -> None:
    cluster.group("web", "{policy: anti-affinity}")
    cluster.vm("a", "web")
    error = cluster.refused(
        "patch", "vmg", "web", "--type=merge", "-p", '{"spec":{"policy":"affinity"}}'
    )
    assert (
        'VMGroup "web" has 1 member(s): a (rule: the policy cannot change while the group' in error
    )
    # Other changes are fine, and so is the policy change once the group is empty.
    cluster.ok("patch", "vmg", "web", "--type=merge", "-p", '{"spec":{"maxMembers":5}}')
    cluster.ok("delete", "vm", "a")
    cluster.ok("patch", "vmg", "web", "--type=merge", "-p", '{"spec":{"policy":"affinity"}}')


def test_lowering_max_members_below_the_members_is_refused(cluster: Cluster) -> None:
    cluster.group("web", "{policy: anti-affinity}")
    cluster.vm("a", "web")
    cluster.vm("b", "web")
    error = cluster.refused(
        "patch", "vmg", "web", "--type=merge", "-p", '{"spec":{"maxMembers":1}}'
    )
    assert "rule: maxMembers cannot go below the current number of members" in error
    cluster.ok("patch", "vmg", "web", "--type=merge", "-p", '{"spec":{"maxMembers":2}}')


# --- live migration --------------------------------------------------------------------------


def migration(name: str, vmi: str) -> str:
    return f"""
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstanceMigration
metadata: {{name: {name}}}
spec: {{vmiName: {vmi}}}
"""


def start_vmi(cluster: Cluster, vm_name: str) -> None:
    """Play virt-controller: a VMI from the VM's template, owned by the VM."""
    vm = cluster.get("vm", vm_name)
    tpl = template(vm)
    vmi = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "name": vm_name,
            **tpl.get("metadata", {}),
            "ownerReferences": [
                {
                    "apiVersion": "kubevirt.io/v1",
                    "kind": "VirtualMachine",
                    "name": vm_name,
                    "uid": vm["metadata"]["uid"],
                    "controller": True,
                }
            ],
        },
        "spec": tpl["spec"],
    }
    cluster.ok("create", "-f", "-", stdin=json.dumps(vmi))


def test_migrating_a_strict_affinity_member_is_refused(cluster: Cluster) -> None:
    cluster.group("db", "{policy: affinity}")
    cluster.vm("a", "db")
    start_vmi(cluster, "a")
    error = cluster.refused("create", "-f", "-", stdin=migration("move-a", "a"))
    assert 'admission webhook "validate-migration.' in error
    assert (
        'VMGroup "db" has policy affinity (rule: members of a strict affinity group cannot' in error
    )
    assert 'migration of "a" refused; set bestEffort: true' in error


def test_best_effort_allows_the_migration_with_a_warning(cluster: Cluster) -> None:
    cluster.group("db", "{policy: affinity, bestEffort: true}")
    cluster.vm("a", "db")
    start_vmi(cluster, "a")
    result = cluster.run("create", "-f", "-", stdin=migration("move-a", "a"))
    assert result.returncode == 0, result.stderr
    assert "Warning: " in result.stderr and "allowed because bestEffort is set" in result.stderr


def test_migrating_members_of_other_policies_is_allowed(cluster: Cluster) -> None:
    cluster.group("web", "{policy: anti-affinity}")
    cluster.vm("a", "web")
    start_vmi(cluster, "a")
    cluster.ok("create", "-f", "-", stdin=migration("move-a", "a"))


def test_a_vmi_started_before_joining_is_still_recognised(cluster: Cluster) -> None:
    cluster.group("db", "{policy: affinity}")
    cluster.vm("a", None)
    start_vmi(cluster, "a")  # no group label on this VMI
    cluster.ok("label", "vm", "a", "vmha.io/group=db")
    assert 'VMGroup "db" has policy affinity' in cluster.refused(
        "create", "-f", "-", stdin=migration("move-a", "a")
    )


# --- placement terms and channel, as applied ------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected_affinity", "expected_spread"),
    [
        (
            "{policy: affinity}",
            {"podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [group_term("g")]}},
            None,
        ),
        (
            "{policy: anti-affinity}",
            {
                "podAntiAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": [group_term("g")]
                }
            },
            None,
        ),
        (
            "{policy: soft-affinity}",
            {
                "podAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 100, "podAffinityTerm": group_term("g")}
                    ]
                }
            },
            None,
        ),
        (
            "{policy: anti-affinity, bestEffort: true}",
            {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 100, "podAffinityTerm": group_term("g")}
                    ]
                }
            },
            None,
        ),
        (
            "{policy: anti-affinity, maxPerNode: 2}",
            {
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 100, "podAffinityTerm": group_term("g")}
                    ]
                }
            },
            [
                {
                    "maxSkew": 2,
                    "topologyKey": HOSTNAME,
                    "whenUnsatisfiable": "DoNotSchedule",
                    "labelSelector": {"matchLabels": {"vmha.io/group": "g"}},
                }
            ],
        ),
    ],
)
def test_placement_terms_as_applied(
    cluster: Cluster,
    spec: str,
    expected_affinity: dict[str, Any],
    expected_spread: list[dict[str, Any]] | None,
) -> None:
    cluster.group("g", spec)
    cluster.vm("a", "g")
    applied = template(cluster.get("vm", "a"))
    assert applied["metadata"]["labels"] == {"vmha.io/group": "g"}
    assert applied["spec"]["affinity"] == expected_affinity
    assert applied["spec"].get("topologySpreadConstraints") == expected_spread
    sidecars = json.loads(applied["metadata"]["annotations"]["hooks.kubevirt.io/hookSidecars"])
    assert sidecars == [
        {
            "args": ["--version", "v1alpha3"],
            "configMap": {
                "name": "vmha-channel-hook",
                "key": "onDefineDomain",
                "hookPath": "/usr/bin/onDefineDomain",
            },
        }
    ]
    assert applied["metadata"]["annotations"]["vmha.io/channel-path"] == (
        "/var/run/kubevirt-private/vmha"
    )


def test_user_terms_stay_and_leaving_removes_ours(cluster: Cluster) -> None:
    user_affinity = """      affinity:
        nodeAffinity:
          requiredDuringSchedulingIgnoredDuringExecution:
            nodeSelectorTerms:
            - matchExpressions: [{key: gpu, operator: Exists}]"""
    cluster.group("web", "{policy: anti-affinity}")
    cluster.vm("a", "web", user_affinity)
    affinity = template(cluster.get("vm", "a"))["spec"]["affinity"]
    assert set(affinity) == {"nodeAffinity", "podAntiAffinity"}
    cluster.ok("label", "vm", "a", "vmha.io/group-")
    left = template(cluster.get("vm", "a"))
    assert set(left["spec"]["affinity"]) == {"nodeAffinity"}
    assert "vmha.io/group" not in left.get("metadata", {}).get("labels", {})
    assert "hooks.kubevirt.io/hookSidecars" not in left.get("metadata", {}).get("annotations", {})


def test_no_hook_when_messaging_and_heartbeat_are_off(cluster: Cluster) -> None:
    cluster.group(
        "quiet", "{policy: soft-anti-affinity, messaging: false, heartbeat: {enabled: false}}"
    )
    cluster.vm("a", "quiet")
    applied = template(cluster.get("vm", "a"))
    assert "annotations" not in applied["metadata"]
    assert applied["spec"]["affinity"]["podAntiAffinity"]


def test_the_hook_configmap_is_created_and_owned(cluster: Cluster) -> None:
    cluster.group("web", "{policy: anti-affinity}")
    cluster.group("db", "{policy: affinity}")

    def owned_by_both() -> bool:
        result = cluster.run("get", "configmap", "vmha-channel-hook", "-o", "json")
        if result.returncode != 0:
            return False
        owners = json.loads(result.stdout)["metadata"].get("ownerReferences", [])
        return sorted(o["name"] for o in owners) == ["db", "web"]

    cluster.eventually(owned_by_both, "vmha-channel-hook owned by both groups")
    configmap = cluster.get("configmap", "vmha-channel-hook")
    script = configmap["data"]["onDefineDomain"]
    assert script.startswith("#!/usr/bin/env python3")
    assert "vmha.messaging" in script
    assert all(o["kind"] == "VMGroup" for o in configmap["metadata"]["ownerReferences"])


def test_dry_run_is_admitted_the_same_way(cluster: Cluster) -> None:
    cluster.group("web", "{policy: anti-affinity, maxMembers: 1}")
    cluster.vm("a", "web")
    error = cluster.refused(
        "apply", "--dry-run=server", "-f", "-", stdin=cluster.vm_manifest("b", "web")
    )
    assert 'VMGroup "web" is full' in error
