"""The VMI → member state table (memberstate.py), row by row, and the other keys."""

from __future__ import annotations

import json
from typing import Any

import pytest

from vmha_node_agent.memberstate import (
    MAX_METADATA_BYTES,
    STATE_TABLE,
    bounded_labels,
    deleted_state,
    member_state,
)
from vmha_protocol.server_group import MemberState, StatusResponse

MIGRATING = {"sourceNode": "node-a", "targetNode": "node-b", "migrationUid": "m1"}


def vmi(
    phase: str | None = "Running",
    *,
    conditions: dict[str, str] | None = None,
    deleting: bool = False,
    migration: dict[str, Any] | None = None,
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    node: str | None = "node-a",
    **status: Any,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": "web-1",
        "namespace": "prod",
        "uid": "uid-1",
        "labels": labels if labels is not None else {"vmha.io/group": "web"},
        "annotations": annotations or {},
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    body_status: dict[str, Any] = {**status}
    if phase is not None:
        body_status["phase"] = phase
    if node is not None:
        body_status["nodeName"] = node
    if conditions:
        body_status["conditions"] = [{"type": t, "status": s} for t, s in conditions.items()]
    if migration is not None:
        body_status["migrationState"] = migration
    return {"metadata": meta, "spec": {}, "status": body_status}


@pytest.mark.parametrize(
    ("case", "state", "power_state", "task_state"),
    [
        (vmi("Running"), "active", "running", None),
        (vmi("Running", conditions={"Paused": "True"}), "paused", "paused", None),
        (vmi("Running", conditions={"Paused": "False"}), "active", "running", None),
        (vmi("Running", migration=MIGRATING), "active", "running", "migrating"),
        (vmi("Running", migration={**MIGRATING, "completed": True}), "active", "running", None),
        (vmi("Running", migration={**MIGRATING, "failed": True}), "active", "running", None),
        (vmi("Running", deleting=True), "active", "running", "deleting"),
        # Deleting wins over migrating: the first row that fills task_state.
        (vmi("Running", deleting=True, migration=MIGRATING), "active", "running", "deleting"),
        (
            vmi("Running", conditions={"Paused": "True"}, deleting=True),
            "paused",
            "paused",
            "deleting",
        ),
        (vmi("Succeeded"), "stopped", "shutdown", None),
        (vmi("Failed"), "error", "crashed", None),
        (vmi("Unknown"), "unknown", "nostate", None),
        (vmi("Pending", node=None), "building", "nostate", None),
        (vmi("Scheduling", node=None), "building", "nostate", None),
        (vmi("Scheduled"), "building", "nostate", None),
        (vmi("WaitingForSync"), "building", "nostate", None),
        (vmi(None, node=None), "building", "nostate", None),
        (vmi("SomethingNew"), "unknown", "nostate", None),  # no row: the defaults
        # Paused only counts while running (KubeVirt keeps stale conditions sometimes).
        (vmi("Failed", conditions={"Paused": "True"}), "error", "crashed", None),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
def test_the_table_row_by_row(
    case: dict[str, Any], state: str, power_state: str, task_state: str | None
) -> None:
    member = member_state(case)
    assert (member.state, member.vm_state) == (state, state)
    assert member.power_state == power_state
    assert member.task_state == task_state


def test_every_row_is_exercised_above() -> None:
    # A new row must come with its own case in the table test.
    assert len(STATE_TABLE) == 8


def test_the_other_keys() -> None:
    case = vmi(
        "Running",
        conditions={"Ready": "True"},
        labels={"vmha.io/group": "web", "tier": "db"},
        phaseTransitionTimestamps=[
            {"phase": "Pending", "phaseTransitionTimestamp": "2026-01-01T09:59:00Z"},
            {"phase": "Running", "phaseTransitionTimestamp": "2026-01-01T10:00:00Z"},
        ],
    )
    case["spec"]["hostname"] = "db-primary"
    member = member_state(case)
    assert member.instance_id == "uid-1"
    assert member.display_name == "web-1"
    assert member.hostname == "db-primary"
    assert (member.host, member.node) == ("node-a", "node-a")
    assert member.launched_at == "2026-01-01T10:00:00Z"
    assert member.metadata == {"vmha.io/group": "web", "tier": "db"}
    assert (member.namespace, member.phase, member.ready) == ("prod", "Running", True)
    assert member.heartbeat == "unknown"
    # What the guest gets is valid by the protocol's own model.
    assert MemberState.model_validate_json(member.model_dump_json()) == member


def test_hostname_defaults_to_the_name_and_ready_needs_running() -> None:
    assert member_state(vmi("Running")).hostname == "web-1"
    assert not member_state(vmi("Running")).ready  # no Ready condition
    assert not member_state(vmi("Pending", conditions={"Ready": "True"})).ready
    assert member_state(vmi("Pending")).launched_at is None


@pytest.mark.parametrize(
    ("annotation", "summary"),
    [
        (None, "unknown"),
        ({"state": "healthy", "node": "node-a"}, "healthy"),
        ({"state": "unhealthy", "node": "node-a"}, "unhealthy"),
        ({"state": "failed", "node": "node-a"}, "unhealthy"),
        ({"state": "deregistered", "node": "node-a"}, "unknown"),
        ({"state": "healthy", "node": "node-b"}, "unknown"),  # written before a move
        ({"state": "healthy"}, "healthy"),
    ],
)
def test_heartbeat_from_the_agents_annotation(
    annotation: dict[str, str] | None, summary: str
) -> None:
    annotations = {"vmha.io/heartbeat": json.dumps(annotation)} if annotation else {}
    assert member_state(vmi("Running", annotations=annotations)).heartbeat == summary


def test_a_deleted_member_keeps_its_identity() -> None:
    last = member_state(vmi("Running", conditions={"Ready": "True"}))
    gone = deleted_state(last)
    assert (gone.state, gone.vm_state, gone.power_state) == ("deleted", "deleted", "nostate")
    assert gone.task_state is None
    assert not gone.ready
    assert (gone.instance_id, gone.display_name, gone.node) == ("uid-1", "web-1", "node-a")


def test_labels_are_cut_so_that_a_status_response_fits_a_frame() -> None:
    labels = {f"example.com/label-{i:04d}": "v" * 63 for i in range(500)}
    kept = bounded_labels(labels)
    assert 0 < len(kept) < len(labels)
    assert len(json.dumps(kept, separators=(",", ":")).encode()) <= MAX_METADATA_BYTES
    assert list(kept) == sorted(labels)[: len(kept)]
    member = member_state(vmi("Running", labels=labels))
    response = StatusResponse(seq=1, data=member)
    assert len(response.model_dump_json().encode()) < 8 * 1024 - 200


def test_equal_vmis_give_equal_states_and_a_change_shows() -> None:
    assert member_state(vmi("Running")) == member_state(vmi("Running"))
    assert member_state(vmi("Running")) != member_state(
        vmi("Running", conditions={"Paused": "True"})
    )
