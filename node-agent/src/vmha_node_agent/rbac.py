"""The least-privilege RBAC rules the node agent needs, as data (the Helm chart mirrors them;
the integration tests run every agent under exactly these rules).

All cluster-wide (a ClusterRole bound to the DaemonSet's ServiceAccount): the VMIs on a
node can be in any namespace.
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
    ]
