"""A group member's state as guests see it: the VMI mapped to the Nova-shaped `MemberState`
of PROTOCOL.md §5. Pure functions; the mapping is the table `STATE_TABLE` below.

Guests written for OpenStack read Nova's vocabulary: `state`/`vm_state` (`active`,
`paused`, `stopped`, `error`, `building`, `deleted`), `power_state` (`running`, `paused`,
`shutdown`, `crashed`, `nostate`) and `task_state` (an action in progress: `migrating`,
`deleting`, or none). KubeVirt says the same things with a VMI's phase, its conditions,
its migration state and its deletion timestamp; the table translates, row by row:

| the VMI shows                                         | state    | power_state | task_state |
|-------------------------------------------------------|----------|-------------|------------|
| `metadata.deletionTimestamp` set                      |          |             | deleting   |
| `status.migrationState` running (not completed/failed)|          |             | migrating  |
| phase Running and condition `Paused` True             | paused   | paused      |            |
| phase Running                                         | active   | running     |            |
| phase Succeeded                                       | stopped  | shutdown    |            |
| phase Failed                                          | error    | crashed     |            |
| phase Unknown (the node does not report)              | unknown  | nostate     |            |
| phase Pending, Scheduling, Scheduled, WaitingForSync  | building | nostate     |            |
|   or none yet                                         |          |             |            |
| (the VMI is gone, or left the group)                  | deleted  | nostate     |            |

For each column the first row that matches and has a value wins; a column no row fills
keeps its default (`unknown`, `nostate`, no task). `vm_state` always equals `state`.

The other keys: `instance_id` = the VMI's uid; `display_name` = its name; `hostname` =
`spec.hostname`, else the name (what KubeVirt gives the guest); `host` and `node` =
`status.nodeName`; `launched_at` = when it entered phase Running; `metadata` = its labels
(cut to `MAX_METADATA_BYTES`); `namespace`; `phase` = KubeVirt's own phase; `ready` =
Running with condition `Ready` True; `heartbeat` = the agent's `vmha.io/heartbeat`
annotation (`healthy`; `unhealthy` or `failed` → `unhealthy`; anything else, or written
on another node than the VMI's, → `unknown`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from vmha_node_agent.annotations import parse_annotation
from vmha_node_agent.kubevirt import (
    is_deleting,
    key_of,
    labels_of,
    migration_in_progress,
    node_of,
    uid_of,
)
from vmha_protocol.server_group import HeartbeatSummary, MemberState

Obj = Mapping[str, Any]

# A status response must fit in a frame (8 KiB) whatever labels a VMI carries.
MAX_METADATA_BYTES: Final = 2048
STARTING_PHASES: Final = frozenset({"", "Pending", "Scheduling", "Scheduled", "WaitingForSync"})
DELETED: Final = "deleted"


@dataclass(frozen=True)
class Row:
    """One line of the table: when `matches`, the columns it sets (None: not this row's)."""

    shows: str
    matches: Callable[[Obj], bool]
    state: str | None = None
    power_state: str | None = None
    task_state: str | None = None


def _phase(vmi: Obj) -> str:
    return str((vmi.get("status") or {}).get("phase") or "")


def _condition(vmi: Obj, kind: str) -> bool:
    for condition in (vmi.get("status") or {}).get("conditions") or ():
        if condition.get("type") == kind:
            return str(condition.get("status")) == "True"
    return False


def _in_phase(*phases: str) -> Callable[[Obj], bool]:
    return lambda vmi: _phase(vmi) in phases


STATE_TABLE: Final[tuple[Row, ...]] = (
    Row("metadata.deletionTimestamp set", is_deleting, task_state="deleting"),
    Row(
        "status.migrationState running",
        lambda vmi: migration_in_progress(vmi) is not None,
        task_state="migrating",
    ),
    Row(
        "phase Running, condition Paused True",
        lambda vmi: _phase(vmi) == "Running" and _condition(vmi, "Paused"),
        state="paused",
        power_state="paused",
    ),
    Row("phase Running", _in_phase("Running"), state="active", power_state="running"),
    Row("phase Succeeded", _in_phase("Succeeded"), state="stopped", power_state="shutdown"),
    Row("phase Failed", _in_phase("Failed"), state="error", power_state="crashed"),
    Row("phase Unknown", _in_phase("Unknown"), state="unknown", power_state="nostate"),
    Row(
        "phase Pending, Scheduling, Scheduled, WaitingForSync or none",
        lambda vmi: _phase(vmi) in STARTING_PHASES,
        state="building",
        power_state="nostate",
    ),
)

_HEARTBEAT: Final[dict[str, HeartbeatSummary]] = {
    "healthy": "healthy",
    "unhealthy": "unhealthy",
    "failed": "unhealthy",
}


def _column(vmi: Obj, column: str) -> str | None:
    for row in STATE_TABLE:
        value: str | None = getattr(row, column)
        if value is not None and row.matches(vmi):
            return value
    return None


def member_state(vmi: Obj) -> MemberState:
    """The state guests see for this VMI."""
    namespace, name = key_of(vmi)
    state = _column(vmi, "state") or "unknown"
    node = node_of(vmi)
    # Built without validation: every value comes from here and has the model's type.
    return MemberState.model_construct(
        instance_id=uid_of(vmi),
        display_name=name,
        hostname=str((vmi.get("spec") or {}).get("hostname") or name),
        state=state,
        vm_state=state,
        power_state=_column(vmi, "power_state") or "nostate",
        task_state=_column(vmi, "task_state"),
        host=node,
        node=node,
        launched_at=_launched_at(vmi),
        metadata=bounded_labels(labels_of(vmi)),
        namespace=namespace,
        phase=_phase(vmi),
        ready=_phase(vmi) == "Running" and _condition(vmi, "Ready"),
        heartbeat=heartbeat_summary(vmi),
    )


def deleted_state(last: MemberState) -> MemberState:
    """The final state of a member that is gone (deleted, or no longer in the group)."""
    return last.model_copy(
        update={
            "state": DELETED,
            "vm_state": DELETED,
            "power_state": "nostate",
            "task_state": None,
            "ready": False,
            "heartbeat": "unknown",
        }
    )


def heartbeat_summary(vmi: Obj) -> HeartbeatSummary:
    shown = parse_annotation(vmi)
    if shown is None or shown.get("node") not in (None, node_of(vmi)):
        return "unknown"  # written by the agent of a node the VMI has left
    return _HEARTBEAT.get(str(shown.get("state")), "unknown")


def bounded_labels(labels: Mapping[str, Any]) -> dict[str, str]:
    """The labels, in key order, as many as fit in `MAX_METADATA_BYTES` of JSON."""
    kept: dict[str, str] = {}
    size = 2
    for key in sorted(labels):
        value = str(labels[key])
        entry = len(json.dumps({key: value}, ensure_ascii=False).encode()) - 1
        if size + entry > MAX_METADATA_BYTES:
            break
        kept[key] = value
        size += entry
    return kept


def _launched_at(vmi: Obj) -> str | None:
    for entry in (vmi.get("status") or {}).get("phaseTransitionTimestamps") or ():
        if entry.get("phase") == "Running" and entry.get("phaseTransitionTimestamp"):
            return str(entry["phaseTransitionTimestamp"])
    return None
