"""VMGroup status from the member VMs and their VMIs, and the Events its changes call for.

A pure function of what the API holds: the group (with its previous status), the member
VirtualMachines and their VMIs. Timestamps carry over from the previous status while nothing
changes, so recomputing after an operator restart gives the same status and the same (no)
Events.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Literal, get_args

from vmha_operator.api import (
    HEARTBEAT_ANNOTATION,
    Condition,
    HeartbeatState,
    Member,
    VMGroup,
    VMGroupStatus,
)
from vmha_operator.placement import describe_policy, find_violations

READY: str = "Ready"
POLICY_SATISFIED: str = "PolicySatisfied"
# VMI phases in which the VMI is bound to its node.
PLACED_PHASES = frozenset({"Scheduled", "Running"})
NO_VMI_PHASE = "Stopped"

EventType = Literal["Normal", "Warning"]


@dataclasses.dataclass(frozen=True)
class GroupEvent:
    type: EventType
    reason: str
    message: str


def compute_status(
    group: VMGroup,
    vms: Sequence[Mapping[str, Any]],
    vmis: Mapping[str, Mapping[str, Any]],
    now: datetime | None = None,
) -> VMGroupStatus:
    """The status for `group` given its member VMs and {name: VMI} of their instances."""
    now = now or datetime.now(UTC)
    previous = {m.vm: m for m in group.status.members}
    members = [
        _member(name, vmis.get(name), previous.get(name), now)
        for name in sorted(_name(vm) for vm in vms)
    ]
    conditions = [
        _ready_condition(group, members),
        _policy_condition(group, members),
    ]
    return VMGroupStatus(
        observed_generation=group.metadata.generation,
        member_count=len(members),
        ready_members=sum(m.ready for m in members),
        members=members,
        conditions=[_carry_transition(group.status, c, now) for c in conditions],
    )


def _name(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {})["name"])


def _member(
    name: str, vmi: Mapping[str, Any] | None, previous: Member | None, now: datetime
) -> Member:
    if vmi is None:
        phase, node, ready, heartbeat, since = NO_VMI_PHASE, None, False, "unknown", None
    else:
        status = vmi.get("status") or {}
        phase = str(status.get("phase") or "Pending")
        node = status.get("nodeName") or None
        ready = phase == "Running" and _condition_true(status, "Ready")
        heartbeat = heartbeat_state(vmi)
        since = _phase_since(status, phase)
    if since is None:
        same_phase = previous is not None and previous.phase == phase
        since = previous.since if same_phase and previous is not None else now
    return Member(vm=name, node=node, phase=phase, ready=ready, heartbeat=heartbeat, since=since)


def _condition_true(status: Mapping[str, Any], type_: str) -> bool:
    return any(
        c.get("type") == type_ and c.get("status") == "True" for c in status.get("conditions") or ()
    )


def _phase_since(status: Mapping[str, Any], phase: str) -> datetime | None:
    """KubeVirt records when the VMI entered each phase."""
    stamps = [
        entry.get("phaseTransitionTimestamp")
        for entry in status.get("phaseTransitionTimestamps") or ()
        if entry.get("phase") == phase and entry.get("phaseTransitionTimestamp")
    ]
    if not stamps:
        return None
    try:
        return datetime.fromisoformat(str(stamps[-1]).replace("Z", "+00:00"))
    except ValueError:
        return None


FAULTY_HEARTBEATS = frozenset({"unhealthy", "failed"})


def heartbeat_state(vmi: Mapping[str, Any]) -> HeartbeatState:
    """The node agent's annotation: a bare state, or JSON with a "state" key."""
    raw = ((vmi.get("metadata") or {}).get("annotations") or {}).get(HEARTBEAT_ANNOTATION)
    if not raw:
        return "unknown"
    value: Any = raw
    if raw.lstrip().startswith("{"):
        try:
            value = json.loads(raw).get("state")
        except (ValueError, AttributeError):
            return "unknown"
    value = str(value).strip().lower()
    for state in get_args(HeartbeatState):
        if value == state:
            return state  # type: ignore[no-any-return]
    return "unknown"


def _ready_condition(group: VMGroup, members: Sequence[Member]) -> Condition:
    if not members:
        return Condition(
            type=READY,
            status="False",
            reason="NoMembers",
            message=f"no VirtualMachine is labelled vmha.io/group={group.metadata.name}",
        )
    not_ready = [f"{m.vm} ({m.phase})" for m in members if not m.ready]
    unhealthy = [m.vm for m in members if m.heartbeat in FAULTY_HEARTBEATS]
    summary = f"{len(members) - len(not_ready)} of {len(members)} members ready"
    if not not_ready and not unhealthy:
        return Condition(type=READY, status="True", reason="AllMembersReady", message=summary)
    parts = [summary]
    if not_ready:
        parts.append("not ready: " + ", ".join(not_ready))
    if unhealthy:
        parts.append("unhealthy heartbeat: " + ", ".join(unhealthy))
    reason = "MembersNotReady" if not_ready else "HeartbeatUnhealthy"
    return Condition(type=READY, status="False", reason=reason, message="; ".join(parts))


def _policy_condition(group: VMGroup, members: Sequence[Member]) -> Condition:
    spec = group.spec
    placement = {m.vm: m.node for m in members if m.node and m.phase in PLACED_PHASES}
    problems = [v.detail for v in find_violations(spec, placement)]
    if spec.max_members is not None and len(members) > spec.max_members:
        problems.append(f"{len(members)} members, maxMembers is {spec.max_members}")
    policy = describe_policy(spec)
    if not problems:
        message = f"placement honours {policy}" if placement else f"{policy}: no member placed yet"
        return Condition(type=POLICY_SATISFIED, status="True", reason="Satisfied", message=message)
    if not spec.policy.is_strict:
        reason = "PreferenceNotMet"
    elif spec.best_effort:
        reason = "BestEffortViolation"
    else:
        reason = "PolicyViolated"
    return Condition(
        type=POLICY_SATISFIED,
        status="False",
        reason=reason,
        message=f"{policy} not satisfied: " + "; ".join(problems),
    )


def _carry_transition(previous: VMGroupStatus, condition: Condition, now: datetime) -> Condition:
    old = previous.condition(condition.type)
    changed = old is None or old.status != condition.status
    stamp = now if changed or old is None else old.last_transition_time or now
    return condition.model_copy(update={"last_transition_time": stamp})


def group_events(previous: VMGroupStatus, current: VMGroupStatus) -> list[GroupEvent]:
    """Events for what changed between two statuses: joins, leaves, violations, recovery."""
    old_names = {m.vm for m in previous.members}
    new_names = {m.vm for m in current.members}
    events = [
        GroupEvent("Normal", "MemberJoined", f"VirtualMachine {vm} joined the group")
        for vm in sorted(new_names - old_names)
    ]
    events += [
        GroupEvent("Normal", "MemberLeft", f"VirtualMachine {vm} left the group")
        for vm in sorted(old_names - new_names)
    ]
    events += _policy_events(previous.condition(POLICY_SATISFIED), current)
    return events


def _policy_events(old: Condition | None, current: VMGroupStatus) -> list[GroupEvent]:
    new = current.condition(POLICY_SATISFIED)
    if new is None:
        return []
    if new.status == "False":
        if old is not None and old.status == "False" and old.message == new.message:
            return []
        kind: EventType = "Normal" if new.reason == "PreferenceNotMet" else "Warning"
        return [GroupEvent(kind, new.reason, new.message)]
    if old is not None and old.status == "False":
        return [GroupEvent("Normal", "PolicySatisfied", new.message)]
    return []


def status_body(status: VMGroupStatus) -> dict[str, Any]:
    """The status as the API stores it (camelCase, no nulls)."""
    return status.model_dump(mode="json", by_alias=True, exclude_none=True)
