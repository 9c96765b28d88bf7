"""The admission webhook configurations for production, as data (the Helm chart mirrors them).

In development kopf writes equivalent configurations itself (`--webhook-manage`); in a
cluster the chart installs these, pointing at the operator's Service. A unit test checks them
against the registered kopf handlers, so paths, resources and operations cannot drift.

The two VirtualMachine webhooks select objects carrying the group label: on UPDATE the
apiserver matches the old or the new object, so a VM that leaves its group is still seen.
The VirtualMachine and migration validators ask guests for their vote (a side effect, not
on dry runs: `NoneOnDryRun`); the guest gets at most the operator's --vote-timeout (7 s)
of the 10 s the apiserver waits.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from vmha_operator.api import GROUP_LABEL
from vmha_operator.handlers import (
    MIGRATIONS,
    MUTATE_VM,
    VALIDATE_GROUP,
    VALIDATE_MIGRATION,
    VALIDATE_VM,
    VIRTUAL_MACHINES,
    VMGROUPS,
)

WebhookKind = Literal["mutating", "validating"]
MEMBER_SELECTOR = {"matchExpressions": [{"key": GROUP_LABEL, "operator": "Exists"}]}


@dataclasses.dataclass(frozen=True)
class Webhook:
    id: str  # the URL path is /<id>
    kind: WebhookKind
    resource: tuple[str, str, str]  # group, version, plural
    operations: tuple[str, ...]
    object_selector: dict[str, Any] | None = None
    side_effects: bool = False  # NoneOnDryRun: asks guests, except for dry runs

    def configuration_entry(self, service: str, namespace: str, ca_bundle: str) -> dict[str, Any]:
        """One entry of a Mutating/ValidatingWebhookConfiguration's `webhooks` list."""
        group, version, plural = self.resource
        entry: dict[str, Any] = {
            "name": f"{self.id}.vmha.io",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "NoneOnDryRun" if self.side_effects else "None",
            "failurePolicy": "Fail",
            "matchPolicy": "Equivalent",
            "timeoutSeconds": 10,
            "clientConfig": {
                "service": {"name": service, "namespace": namespace, "path": f"/{self.id}"},
                "caBundle": ca_bundle,
            },
            "rules": [
                {
                    "apiGroups": [group],
                    "apiVersions": [version],
                    "resources": [plural],
                    "operations": list(self.operations),
                    "scope": "Namespaced",
                }
            ],
        }
        if self.object_selector is not None:
            entry["objectSelector"] = self.object_selector
        return entry


WEBHOOKS: tuple[Webhook, ...] = (
    Webhook(MUTATE_VM, "mutating", VIRTUAL_MACHINES, ("CREATE", "UPDATE"), MEMBER_SELECTOR),
    Webhook(
        VALIDATE_VM,
        "validating",
        VIRTUAL_MACHINES,
        ("CREATE", "UPDATE"),
        MEMBER_SELECTOR,
        side_effects=True,
    ),
    Webhook(VALIDATE_GROUP, "validating", VMGROUPS, ("UPDATE", "DELETE")),
    Webhook(VALIDATE_MIGRATION, "validating", MIGRATIONS, ("CREATE",), side_effects=True),
)


def webhook_configurations(
    name: str, service: str, namespace: str, ca_bundle: str
) -> list[dict[str, Any]]:
    """The MutatingWebhookConfiguration and ValidatingWebhookConfiguration objects."""
    kinds = {
        "mutating": "MutatingWebhookConfiguration",
        "validating": "ValidatingWebhookConfiguration",
    }
    return [
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": object_kind,
            "metadata": {"name": name},
            "webhooks": [
                w.configuration_entry(service, namespace, ca_bundle)
                for w in WEBHOOKS
                if w.kind == kind
            ],
        }
        for kind, object_kind in kinds.items()
    ]
