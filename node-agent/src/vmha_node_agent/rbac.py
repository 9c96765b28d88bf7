"""The least-privilege RBAC rules the node agent needs, as data (the Helm chart mirrors them;
the integration tests run every agent under exactly these rules).

`node_agent_rules`: cluster-wide (a ClusterRole bound to the DaemonSet's ServiceAccount):
the VMIs on a node can be in any namespace. `node_agent_namespace_rules`: in the agents'
own namespace only (a Role): the Leases through which agents find each other.
"""

from __future__ import annotations

from typing import Any

Rule = dict[str, Any]


def node_agent_rules() -> list[Rule]:
    return [
        # Discovery of the VMIs on this node; the heartbeat annotation (JSON patch, guarded
        # by the VMI's uid and node); `reboot` deletes the VMI.
        {
            "apiGroups": ["kubevirt.io"],
            "resources": ["virtualmachineinstances"],
            "verbs": ["get", "list", "watch", "patch", "delete"],
        },
        # `stop` sets the owning VirtualMachine's runStrategy to Halted.
        {"apiGroups": ["kubevirt.io"], "resources": ["virtualmachines"], "verbs": ["patch"]},
        # The virt-launcher Pods on this node (field selector spec.nodeName), for the socket.
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list", "watch"]},
        # Each group's heartbeat defaults.
        {"apiGroups": ["vmha.io"], "resources": ["vmgroups"], "verbs": ["list", "watch"]},
        # Events on VMIs; repeats update the Event's series.
        {"apiGroups": ["events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch"]},
        # Who calls the agent's HTTPS endpoint (another agent, and on which node; the
        # operator): TokenReview of the caller's token.
        {
            "apiGroups": ["authentication.k8s.io"],
            "resources": ["tokenreviews"],
            "verbs": ["create"],
        },
    ]


def node_agent_namespace_rules() -> list[Rule]:
    """A Role in the agents' namespace (`messaging.namespace`)."""
    return [
        # Each agent publishes its endpoint in Lease vmha-agent-<node>, renews it, deletes
        # it at shutdown, and watches the others'.
        {
            "apiGroups": ["coordination.k8s.io"],
            "resources": ["leases"],
            "verbs": ["get", "list", "watch", "create", "patch", "delete"],
        },
    ]
