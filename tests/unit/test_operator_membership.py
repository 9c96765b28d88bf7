"""The VM mutation: label, placement terms and channel hook added, kept idempotent, removed."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from vmha_operator.api import CHANNEL_PATH_ANNOTATION, GROUP_LABEL, VMGroupSpec
from vmha_operator.channel import HOOK_CONFIGMAP, HOOK_SIDECARS_ANNOTATION, with_hook_sidecar
from vmha_operator.membership import (
    ChannelSettings,
    apply_membership,
    group_of,
    remove_membership,
)

USER_NODE_AFFINITY = {
    "requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "gpu", "operator": "Exists"}]}]
    }
}
USER_POD_TERM = {"labelSelector": {"matchLabels": {"app": "db"}}, "topologyKey": "zone"}
USER_SIDECAR = {"image": "example/smbios-hook:1", "args": ["--version", "v1alpha2"]}


def vm(**template_spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "vm-a", "namespace": "prod", "labels": {GROUP_LABEL: "web"}},
        "spec": {
            "runStrategy": "Always",
            "template": {
                "metadata": {"labels": {"kubevirt.io/domain": "vm-a"}},
                "spec": {"domain": {"devices": {}}, **template_spec},
            },
        },
    }


def spec(policy: str = "anti-affinity", **fields: object) -> VMGroupSpec:
    return VMGroupSpec.model_validate({"policy": policy, **fields})


def template(body: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = body["spec"]["template"]
    return result


def test_member_gets_label_terms_and_channel() -> None:
    body = vm()
    apply_membership(body, "web", spec())
    tpl = template(body)
    assert tpl["metadata"]["labels"] == {"kubevirt.io/domain": "vm-a", GROUP_LABEL: "web"}
    anti = tpl["spec"]["affinity"]["podAntiAffinity"]
    assert anti["requiredDuringSchedulingIgnoredDuringExecution"] == [
        {
            "labelSelector": {"matchLabels": {GROUP_LABEL: "web"}},
            "topologyKey": "kubernetes.io/hostname",
        }
    ]
    annotations = tpl["metadata"]["annotations"]
    sidecars = json.loads(annotations[HOOK_SIDECARS_ANNOTATION])
    assert sidecars == [
        {
            "args": ["--version", "v1alpha3"],
            "configMap": {
                "name": HOOK_CONFIGMAP,
                "key": "onDefineDomain",
                "hookPath": "/usr/bin/onDefineDomain",
            },
        }
    ]
    assert annotations[CHANNEL_PATH_ANNOTATION] == "/var/run/kubevirt-private/vmha"


def test_applying_twice_changes_nothing() -> None:
    body = vm()
    apply_membership(body, "web", spec("anti-affinity", maxPerNode=2))
    once = copy.deepcopy(body)
    apply_membership(body, "web", spec("anti-affinity", maxPerNode=2))
    assert body == once


def test_user_terms_and_sidecars_are_kept() -> None:
    body = vm(
        affinity={
            "nodeAffinity": USER_NODE_AFFINITY,
            "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [USER_POD_TERM]},
        }
    )
    template(body)["metadata"]["annotations"] = {
        HOOK_SIDECARS_ANNOTATION: json.dumps([USER_SIDECAR])
    }
    apply_membership(body, "db", spec("affinity"))
    affinity = template(body)["spec"]["affinity"]
    assert affinity["nodeAffinity"] == USER_NODE_AFFINITY
    required = affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    assert required[0] == USER_POD_TERM and len(required) == 2
    sidecars = json.loads(template(body)["metadata"]["annotations"][HOOK_SIDECARS_ANNOTATION])
    assert sidecars[0] == USER_SIDECAR and sidecars[1]["configMap"]["name"] == HOOK_CONFIGMAP

    remove_membership(body)
    affinity = template(body)["spec"]["affinity"]
    assert affinity == {
        "nodeAffinity": USER_NODE_AFFINITY,
        "podAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [USER_POD_TERM]},
    }
    annotations = template(body)["metadata"]["annotations"]
    assert json.loads(annotations[HOOK_SIDECARS_ANNOTATION]) == [USER_SIDECAR]
    assert CHANNEL_PATH_ANNOTATION not in annotations


def test_policy_change_replaces_our_terms() -> None:
    body = vm()
    apply_membership(body, "web", spec("anti-affinity"))
    apply_membership(body, "web", spec("soft-affinity"))
    affinity = template(body)["spec"]["affinity"]
    assert "podAntiAffinity" not in affinity
    preferred = affinity["podAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert [p["weight"] for p in preferred] == [100]


def test_spread_constraint_for_max_per_node_and_its_removal() -> None:
    body = vm(topologySpreadConstraints=[{"maxSkew": 1, "topologyKey": "zone"}])
    apply_membership(body, "web", spec("anti-affinity", maxPerNode=2))
    constraints = template(body)["spec"]["topologySpreadConstraints"]
    assert [c["maxSkew"] for c in constraints] == [1, 2]
    remove_membership(body)
    assert template(body)["spec"]["topologySpreadConstraints"] == [
        {"maxSkew": 1, "topologyKey": "zone"}
    ]


def test_removal_leaves_no_empty_shells() -> None:
    body = vm()
    original = copy.deepcopy(body)
    apply_membership(body, "web", spec("affinity"))
    remove_membership(body)
    assert body == original
    bare: dict[str, Any] = {"spec": {"template": {"metadata": {"labels": {GROUP_LABEL: "g"}}}}}
    remove_membership(bare)
    assert bare == {"spec": {"template": {"metadata": {}}}}


def test_no_channel_when_messaging_and_heartbeat_are_off() -> None:
    body = vm()
    apply_membership(body, "web", spec(messaging=False, heartbeat={"enabled": False}))
    assert "annotations" not in template(body)["metadata"]
    body = vm()
    apply_membership(body, "web", spec(messaging=False))  # heartbeat alone needs the channel
    assert HOOK_SIDECARS_ANNOTATION in template(body)["metadata"]["annotations"]


def test_hook_image_and_channel_path_settings() -> None:
    body = vm()
    settings = ChannelSettings(hook_image="registry.local/shim:1", channel_path="/var/run/x/y")
    apply_membership(body, "web", spec(), settings)
    annotations = template(body)["metadata"]["annotations"]
    assert json.loads(annotations[HOOK_SIDECARS_ANNOTATION])[0]["image"] == "registry.local/shim:1"
    assert annotations[CHANNEL_PATH_ANNOTATION] == "/var/run/x/y"


def test_a_vm_without_template_gets_one() -> None:
    body: dict[str, Any] = {"metadata": {"name": "bare"}, "spec": {}}
    apply_membership(body, "g", spec("soft-anti-affinity"))
    assert template(body)["metadata"]["labels"] == {GROUP_LABEL: "g"}
    remove_membership({"metadata": {}})  # nothing to remove, nothing breaks


def test_invalid_sidecar_annotation_is_reported() -> None:
    with pytest.raises(ValueError, match="not valid JSON"):
        with_hook_sidecar("[{", wanted=True)
    with pytest.raises(ValueError, match="must be a JSON list"):
        with_hook_sidecar('{"image": "x"}', wanted=True)


def test_group_of() -> None:
    assert group_of(vm()) == "web"
    assert group_of({"metadata": {"labels": {GROUP_LABEL: ""}}}) is None
    assert group_of({}) is None
