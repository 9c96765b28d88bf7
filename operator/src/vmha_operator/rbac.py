"""The least-privilege RBAC rules the operator needs, as data (the Helm chart mirrors them;
an integration test runs the operator under exactly these rules).

`operator_rules`: cluster-wide (a ClusterRole): VMGroups and their VMs can be in any
namespace. `operator_agent_namespace_rules`: a Role in the node agents' namespace, to find
an agent (its Lease) when a guest is asked for its vote. `operator_peering_namespace_rules`:
a Role in each namespace a standby-capable operator serves (`--peering` with `--namespace`).
"""

from __future__ import annotations

from typing import Any

Rule = dict[str, Any]


def operator_rules(*, manage_webhooks: bool = False, peering: bool = False) -> list[Rule]:
    """Rules for `vmha-operator`; `manage_webhooks` for --webhook-manage (development only),
    `peering` for --peering of a cluster-wide operator (no --namespace): kopf peers through
    a ClusterKopfPeering. With --namespace it peers through a KopfPeering in each served
    namespace instead, which `operator_peering_namespace_rules` grants there."""
    rules: list[Rule] = [
        # Watch groups, write their status.
        {"apiGroups": ["vmha.io"], "resources": ["vmgroups"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["vmha.io"], "resources": ["vmgroups/status"], "verbs": ["patch"]},
        # Watch members; patch their templates (placement terms and hook for VMs that joined
        # while the webhook was not reachable, or after a group change).
        {
            "apiGroups": ["kubevirt.io"],
            "resources": ["virtualmachines"],
            "verbs": ["get", "list", "watch", "patch"],
        },
        {
            "apiGroups": ["kubevirt.io"],
            "resources": ["virtualmachineinstances"],
            "verbs": ["get", "list", "watch"],
        },
        # The hook script ConfigMap in every namespace with a group; Events on groups.
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "patch"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
        # kopf follows CRD and namespace changes (it falls back to a one-time scan without).
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["list", "watch"],
        },
        {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["list", "watch"]},
    ]
    if manage_webhooks:
        rules.append(
            {
                "apiGroups": ["admissionregistration.k8s.io"],
                "resources": [
                    "mutatingwebhookconfigurations",
                    "validatingwebhookconfigurations",
                ],
                "verbs": ["get", "create", "patch"],
            }
        )
    if peering:
        rules.append(
            {
                "apiGroups": ["kopf.dev"],
                "resources": ["clusterkopfpeerings"],
                "verbs": ["get", "list", "watch", "patch"],
            }
        )
    return rules


def operator_agent_namespace_rules() -> list[Rule]:
    """A Role in the agents' namespace (`--agent-namespace`)."""
    return [
        # The agent of a VM's node publishes its endpoint in Lease vmha-agent-<node>.
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "list", "watch"],
        },
    ]


def operator_peering_namespace_rules() -> list[Rule]:
    """A Role in each namespace the operator serves (`--namespace`) when it runs with
    `--peering`: kopf keeps its replicas' keep-alives in the KopfPeering object there."""
    return [
        {
            "apiGroups": ["kopf.dev"],
            "resources": ["kopfpeerings"],
            "verbs": ["get", "list", "watch", "patch"],
        },
    ]
