"""A VM's heartbeat policy: the agent's configuration, overridden by its VMGroup's
`spec.heartbeat`, overridden by annotations on the VMI.

    agent config  ◀─ VMGroup spec.heartbeat ◀─ VMI annotations (per VM)

Also: which VMIs want heartbeat at all. Pure functions of the objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, get_args

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

from vmha_node_agent.config import HeartbeatPolicy
from vmha_protocol.heartbeat import CorrectiveAction
from vmha_protocol.limits import HEARTBEAT_MAX_INTERVAL_MS

GROUP_LABEL: Final = "vmha.io/group"
# Per-VM settings (on the VM's template metadata, so every VMI carries them).
OPT_IN_ANNOTATION: Final = "vmha.io/heartbeat-enabled"  # "true" / "false"
MIN_INTERVAL_ANNOTATION: Final = "vmha.io/heartbeat-min-interval-ms"
MAX_INTERVAL_ANNOTATION: Final = "vmha.io/heartbeat-max-interval-ms"
MISSED_THRESHOLD_ANNOTATION: Final = "vmha.io/heartbeat-missed-threshold"
CORRECTIVE_ACTION_ANNOTATION: Final = "vmha.io/corrective-action"

# The VMGroup CRD's bounds; per-VM annotations are held to the same.
MIN_INTERVAL_FLOOR_MS: Final = 100
MAX_MISSED_THRESHOLD: Final = 100

_INTEGER_ANNOTATIONS: Final = {
    MIN_INTERVAL_ANNOTATION: ("min_interval_ms", MIN_INTERVAL_FLOOR_MS, HEARTBEAT_MAX_INTERVAL_MS),
    MAX_INTERVAL_ANNOTATION: ("max_interval_ms", MIN_INTERVAL_FLOOR_MS, HEARTBEAT_MAX_INTERVAL_MS),
    MISSED_THRESHOLD_ANNOTATION: ("missed_threshold", 1, MAX_MISSED_THRESHOLD),
}


class GroupHeartbeat(BaseModel):
    """`VMGroup.spec.heartbeat` as far as the agent uses it; absent fields keep the agent's
    values (the CRD normally fills in every default)."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="ignore", frozen=True
    )

    enabled: bool = True
    min_interval_ms: int | None = None
    max_interval_ms: int | None = None
    missed_threshold: int | None = None
    corrective_action: CorrectiveAction | None = None

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> GroupHeartbeat:
        """From a VMGroup object; a spec the agent cannot read counts as no overrides."""
        raw = (group.get("spec") or {}).get("heartbeat") or {}
        try:
            return cls.model_validate(raw)
        except ValidationError:
            return cls()

    def overrides(self) -> dict[str, Any]:
        return self.model_dump(exclude={"enabled"}, exclude_none=True)


@dataclass(frozen=True)
class PolicyResult:
    policy: HeartbeatPolicy
    problems: tuple[str, ...] = field(default=())


def wants_heartbeat(
    labels: Mapping[str, str], annotations: Mapping[str, str], group: GroupHeartbeat | None
) -> bool:
    """A VMI is watched when it opts in by annotation, or belongs to a group (by label)
    whose heartbeat is enabled; `vmha.io/heartbeat-enabled: "false"` opts out of either.
    A member of a group the agent has not seen (yet) is watched with the agent's policy."""
    opt_in = str(annotations.get(OPT_IN_ANNOTATION, "")).strip().lower()
    if opt_in in ("true", "false"):
        return opt_in == "true"
    if not labels.get(GROUP_LABEL):
        return False
    return group is None or group.enabled


def wants_messaging(labels: Mapping[str, str], group_messaging: bool | None) -> bool:
    """A member of a group whose `spec.messaging` is on (or not seen yet) talks to its
    group through the agent, with or without heartbeat."""
    return bool(labels.get(GROUP_LABEL)) and group_messaging is not False


def effective_policy(
    agent: HeartbeatPolicy, group: GroupHeartbeat | None, annotations: Mapping[str, str]
) -> PolicyResult:
    """The policy for one VM. An override that is invalid, or a combination that is (a
    minimum above the maximum), is left out and reported in `problems`."""
    problems: list[str] = []
    per_vm = _annotation_overrides(annotations, problems)
    group_overrides = group.overrides() if group is not None else {}
    base = agent.model_dump()
    for layers in ((group_overrides, per_vm), (group_overrides,), ()):
        merged = dict(base)
        for layer in layers:
            merged.update(layer)
        try:
            policy = HeartbeatPolicy.model_validate(merged)
        except ValidationError as error:
            problems.append(_describe(error, len(layers)))
            continue
        return PolicyResult(policy, tuple(problems))
    raise AssertionError("the agent's own policy is valid")  # pragma: no cover


def _annotation_overrides(annotations: Mapping[str, str], problems: list[str]) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for annotation, (name, low, high) in _INTEGER_ANNOTATIONS.items():
        raw = annotations.get(annotation)
        if raw is None:
            continue
        try:
            value = int(str(raw).strip())
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            problems.append(f"{annotation}: {raw!r} is not an integer in {low}..{high}")
            continue
        overrides[name] = value
    action = annotations.get(CORRECTIVE_ACTION_ANNOTATION)
    if action is not None:
        if action.strip() in get_args(CorrectiveAction):
            overrides["corrective_action"] = action.strip()
        else:
            choices = ", ".join(get_args(CorrectiveAction))
            problems.append(f"{CORRECTIVE_ACTION_ANNOTATION}: {action!r} is not one of {choices}")
    return overrides


def _describe(error: ValidationError, layers: int) -> str:
    source = "the VM's annotations" if layers == 2 else "the VMGroup's spec.heartbeat"
    messages = "; ".join(e["msg"] for e in error.errors(include_url=False)[:3])
    return f"ignoring {source}: {messages}"
