"""VMGroup status from member VMs and VMIs, and the Events its changes call for."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from vmha_operator.api import GROUP_LABEL, HEARTBEAT_ANNOTATION, VMGroup, VMGroupStatus
from vmha_operator.status import (
    POLICY_SATISFIED,
    READY,
    compute_status,
    group_events,
    heartbeat_state,
    status_body,
)

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def group(
    policy: str = "anti-affinity", status: VMGroupStatus | None = None, **spec: Any
) -> VMGroup:
    body: dict[str, Any] = {
        "metadata": {"name": "web", "namespace": "prod", "uid": "u", "generation": 2},
        "spec": {"policy": policy, **spec},
    }
    if status is not None:
        body["status"] = status_body(status)
    return VMGroup.from_body(body)


def vm(name: str) -> dict[str, Any]:
    return {"metadata": {"name": name, "labels": {GROUP_LABEL: "web"}}}


def vmi(
    name: str,
    phase: str = "Running",
    node: str | None = "n1",
    ready: bool = True,
    heartbeat: str | None = None,
) -> dict[str, Any]:
    annotations = {HEARTBEAT_ANNOTATION: heartbeat} if heartbeat else {}
    status: dict[str, Any] = {"phase": phase}
    if node:
        status["nodeName"] = node
    if ready:
        status["conditions"] = [{"type": "Ready", "status": "True"}]
    return {"metadata": {"name": name, "annotations": annotations}, "status": status}


def condition(status: VMGroupStatus, type_: str) -> tuple[str, str, str]:
    found = status.condition(type_)
    assert found is not None
    return found.status, found.reason, found.message


def test_members_with_node_phase_heartbeat() -> None:
    vmis = {"a": vmi("a", heartbeat="healthy"), "b": vmi("b", "Scheduling", None, False)}
    status = compute_status(group(), [vm("b"), vm("a"), vm("c")], vmis, now=T0)
    assert [(m.vm, m.node, m.phase, m.ready, m.heartbeat) for m in status.members] == [
        ("a", "n1", "Running", True, "healthy"),
        ("b", None, "Scheduling", False, "unknown"),
        ("c", None, "Stopped", False, "unknown"),
    ]
    assert (status.member_count, status.ready_members, status.observed_generation) == (3, 1, 2)
    state, reason, message = condition(status, READY)
    assert (state, reason) == ("False", "MembersNotReady")
    assert message == "1 of 3 members ready; not ready: b (Scheduling), c (Stopped)"


def test_ready_when_all_members_run_and_none_is_unhealthy() -> None:
    vmis = {"a": vmi("a", node="n1"), "b": vmi("b", node="n2")}
    status = compute_status(group(), [vm("a"), vm("b")], vmis, now=T0)
    assert condition(status, READY)[:2] == ("True", "AllMembersReady")
    assert condition(status, POLICY_SATISFIED)[:2] == ("True", "Satisfied")
    vmis["b"] = vmi("b", node="n2", heartbeat="unhealthy")
    status = compute_status(group(), [vm("a"), vm("b")], vmis, now=T0)
    assert condition(status, READY) == (
        "False",
        "HeartbeatUnhealthy",
        "2 of 2 members ready; unhealthy heartbeat: b",
    )


def test_empty_group() -> None:
    status = compute_status(group(), [], {}, now=T0)
    assert condition(status, READY)[:2] == ("False", "NoMembers")
    assert condition(status, POLICY_SATISFIED) == (
        "True",
        "Satisfied",
        "anti-affinity: no member placed yet",
    )


def test_violation_names_the_offending_node() -> None:
    vmis = {"a": vmi("a", node="n1"), "b": vmi("b", node="n1"), "c": vmi("c", node="n2")}
    status = compute_status(group(), [vm("a"), vm("b"), vm("c")], vmis, now=T0)
    assert condition(status, POLICY_SATISFIED) == (
        "False",
        "PolicyViolated",
        "anti-affinity not satisfied: 2 members on node n1 (a, b), at most 1 allowed",
    )
    soft = compute_status(group("soft-anti-affinity"), [vm("a"), vm("b")], vmis, now=T0)
    assert condition(soft, POLICY_SATISFIED)[1] == "PreferenceNotMet"
    best = compute_status(group("anti-affinity", bestEffort=True), [vm("a"), vm("b")], vmis)
    assert condition(best, POLICY_SATISFIED)[1] == "BestEffortViolation"


def test_only_placed_members_count_for_placement() -> None:
    vmis = {"a": vmi("a", node="n1"), "b": vmi("b", "Succeeded", node="n1", ready=False)}
    status = compute_status(group(), [vm("a"), vm("b")], vmis, now=T0)
    assert condition(status, POLICY_SATISFIED)[0] == "True"


def test_too_many_members_is_reported() -> None:
    vmis = {"a": vmi("a", node="n1"), "b": vmi("b", node="n2")}
    status = compute_status(group(maxMembers=1), [vm("a"), vm("b")], vmis, now=T0)
    assert condition(status, POLICY_SATISFIED)[2].endswith("2 members, maxMembers is 1")


def test_recomputing_is_stable_and_keeps_timestamps() -> None:
    vmis = {"a": vmi("a", node="n1"), "b": vmi("b", node="n1")}
    first = compute_status(group(), [vm("a"), vm("b")], vmis, now=T0)
    later = T0 + timedelta(minutes=5)
    again = compute_status(group(status=first), [vm("a"), vm("b")], vmis, now=later)
    assert again == first
    assert group_events(first, again) == []


def test_transition_time_moves_only_on_status_change() -> None:
    first = compute_status(group(), [vm("a")], {"a": vmi("a")}, now=T0)
    later = T0 + timedelta(minutes=1)
    second = compute_status(group(status=first), [vm("a")], {}, now=later)
    ready = second.condition(READY)
    policy = second.condition(POLICY_SATISFIED)
    assert ready is not None and ready.last_transition_time == later
    assert policy is not None and policy.last_transition_time == T0
    assert second.members[0].since == later


def test_since_comes_from_kubevirt_phase_timestamps() -> None:
    instance = vmi("a")
    instance["status"]["phaseTransitionTimestamps"] = [
        {"phase": "Pending", "phaseTransitionTimestamp": "2026-01-01T10:00:00Z"},
        {"phase": "Running", "phaseTransitionTimestamp": "2026-01-01T10:00:07Z"},
    ]
    status = compute_status(group(), [vm("a")], {"a": instance}, now=T0)
    assert status.members[0].since == datetime(2026, 1, 1, 10, 0, 7, tzinfo=UTC)


def test_events_for_join_leave_violation_and_recovery() -> None:
    together = {"a": vmi("a", node="n1"), "b": vmi("b", node="n1")}
    empty = VMGroupStatus()
    violated = compute_status(group(), [vm("a"), vm("b")], together, now=T0)
    events = group_events(empty, violated)
    assert [(e.type, e.reason) for e in events] == [
        ("Normal", "MemberJoined"),
        ("Normal", "MemberJoined"),
        ("Warning", "PolicyViolated"),
    ]
    assert events[0].message == "VirtualMachine a joined the group"
    assert "node n1" in events[2].message
    fixed = compute_status(group(status=violated), [vm("a")], together, now=T0)
    assert [(e.type, e.reason) for e in group_events(violated, fixed)] == [
        ("Normal", "MemberLeft"),
        ("Normal", "PolicySatisfied"),
    ]


def test_heartbeat_annotation_forms() -> None:
    def state(value: str) -> str:
        return heartbeat_state({"metadata": {"annotations": {HEARTBEAT_ANNOTATION: value}}})

    assert state("healthy") == "healthy"
    assert state(" Unhealthy ") == "unhealthy"
    assert state('{"state": "unhealthy", "since": "2026-01-01T00:00:00Z"}') == "unhealthy"
    agent = '{"state": "%s", "reason": "missed", "since": "2026-01-01T00:00:00Z", "node": "n1"}'
    assert state(agent % "failed") == "failed"
    assert state(agent % "waiting_for_init") == "unknown"
    assert state(agent % "deregistered") == "unknown"
    assert state("{broken") == "unknown"
    assert state("weird") == "unknown"
    assert heartbeat_state({}) == "unknown"


def test_status_body_is_camel_case_without_nulls() -> None:
    status = compute_status(group(), [vm("a")], {}, now=T0)
    body = status_body(status)
    assert body["memberCount"] == 1 and body["readyMembers"] == 0
    assert body["members"] == [
        {
            "vm": "a",
            "phase": "Stopped",
            "ready": False,
            "heartbeat": "unknown",
            "since": "2026-01-01T12:00:00Z",
        }
    ]
    assert body["conditions"][0]["lastTransitionTime"] == "2026-01-01T12:00:00Z"
