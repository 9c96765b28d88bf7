"""The VMGroup CRD in crds/ is generated from the pydantic models and must match them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from vmha_operator import api, crdgen

REPO_ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = REPO_ROOT / "crds" / f"{api.CRD_NAME}.yaml"


def _schema_nodes(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.get("properties", {}).values():
            yield from _schema_nodes(value)
        if "items" in node:
            yield from _schema_nodes(node["items"])


def _root_schema() -> dict[str, Any]:
    crd = crdgen.vmgroup_crd()
    schema: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def test_crds_directory_matches_the_models() -> None:
    expected = crdgen.render_crd_yaml()
    actual = CRD_FILE.read_text()
    assert actual == expected, (
        f"{CRD_FILE.relative_to(REPO_ROOT)} is out of date with vmha_operator/api.py: "
        "run `python -m vmha_operator.crdgen` from the repository root"
    )


def test_check_mode_reports_a_stale_file(tmp_path: Path) -> None:
    stale = tmp_path / "crd.yaml"
    stale.write_text("stale: true\n")
    assert crdgen.main(["--check", "--output", str(stale)]) == 1
    assert crdgen.main(["--output", str(stale)]) == 0
    assert crdgen.main(["--check", "--output", str(stale)]) == 0
    assert yaml.safe_load(stale.read_text())["metadata"]["name"] == "vmgroups.vmha.io"


def test_schema_is_structural() -> None:
    for node in _schema_nodes(_root_schema()):
        assert "type" in node, node
        for forbidden in ("$ref", "anyOf", "oneOf", "allOf", "title", "additionalProperties"):
            assert forbidden not in node, (forbidden, node)
        assert node.get("default", "set") is not None, node


def test_names_columns_and_status_subresource() -> None:
    crd = crdgen.vmgroup_crd()
    names = crd["spec"]["names"]
    version = crd["spec"]["versions"][0]
    assert (names["kind"], names["plural"], names["shortNames"]) == ("VMGroup", "vmgroups", ["vmg"])
    assert crd["spec"]["scope"] == "Namespaced"
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c]
    assert columns == ["Policy", "Members", "Ready", "Age"]


def test_defaults_and_rules_come_from_the_models() -> None:
    spec = _root_schema()["properties"]["spec"]
    assert spec["required"] == ["policy"]
    assert spec["properties"]["policy"]["enum"] == [p.value for p in api.Policy]
    assert spec["properties"]["messaging"]["default"] is True
    assert spec["properties"]["heartbeat"]["default"] == {
        "enabled": True,
        "minIntervalMs": 400,
        "maxIntervalMs": 60000,
        "missedThreshold": 3,
        "correctiveAction": "log",
    }
    heartbeat = spec["properties"]["heartbeat"]["properties"]
    defaults = api.HeartbeatSpec()
    assert heartbeat["minIntervalMs"]["default"] == defaults.min_interval_ms
    assert heartbeat["correctiveAction"]["enum"] == ["none", "reboot", "stop", "log"]
    messages = [rule["message"] for rule in spec["x-kubernetes-validations"]]
    assert any("maxPerNode applies only to policy anti-affinity" in m for m in messages)
    members = _root_schema()["properties"]["status"]["properties"]["members"]
    assert members["x-kubernetes-list-map-keys"] == ["vm"]


def test_unsupported_constructs_fail_loudly() -> None:
    class Ambiguous(BaseModel):
        value: int | str

    with pytest.raises(crdgen.SchemaConversionError, match="Optional"):
        crdgen.openapi_schema(Ambiguous)


def test_models_round_trip_through_the_api_shape() -> None:
    body = {
        "apiVersion": "vmha.io/v1alpha1",
        "kind": "VMGroup",
        "metadata": {"name": "web", "namespace": "prod", "uid": "u-1", "generation": 3},
        "spec": {"policy": "anti-affinity", "maxPerNode": 2, "maxMembers": 4},
        "status": {"members": [{"vm": "a", "phase": "Running", "node": "n1"}]},
    }
    group = api.VMGroup.from_body(body)
    assert group.spec.policy is api.Policy.ANTI_AFFINITY
    assert group.spec.node_limit == 2 and group.spec.needs_channel
    assert group.status.members[0].heartbeat == "unknown"
    dumped = group.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert dumped["maxPerNode"] == 2 and dumped["heartbeat"]["correctiveAction"] == "log"
