"""What joining a VMGroup does to a VirtualMachine: the mutation, as pure functions on the body.

A member's VM template gets:
- the group label in `spec.template.metadata.labels` (VMIs and virt-launcher pods carry it, so
  scheduling terms can select the group's pods);
- the group's scheduling terms (`placement.scheduling_plan`) in `spec.template.spec.affinity`
  and `spec.template.spec.topologySpreadConstraints`, replacing earlier vmha terms and leaving
  the user's own terms alone;
- when the group uses messaging or heartbeat, the hook sidecar annotation and the channel
  path annotation.

A VM that leaves gets all of it removed. Applying twice changes nothing (the admission patch is
then empty), so the operator can also re-apply it to bring existing members up to date.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any

from vmha_operator.api import CHANNEL_PATH_ANNOTATION, GROUP_LABEL, VMGroupSpec
from vmha_operator.channel import DEFAULT_CHANNEL_PATH, HOOK_SIDECARS_ANNOTATION, with_hook_sidecar
from vmha_operator.placement import SchedulingPlan, scheduling_plan, selects_a_group

Body = MutableMapping[str, Any]


@dataclasses.dataclass(frozen=True)
class ChannelSettings:
    """Operator-wide settings of the channel wiring."""

    hook_image: str | None = None
    channel_path: str = DEFAULT_CHANNEL_PATH


def group_of(vm: Mapping[str, Any]) -> str | None:
    """The group a VM (or VMI) belongs to by its label, if any."""
    labels = (vm.get("metadata") or {}).get("labels") or {}
    value = labels.get(GROUP_LABEL)
    return str(value) if value else None


def apply_membership(
    vm: Body, group: str, spec: VMGroupSpec, settings: ChannelSettings | None = None
) -> None:
    """Make `vm` (in place) a member of `group` with the group's placement and channel."""
    settings = settings or ChannelSettings()
    template = _child(_child(vm, "spec"), "template")
    metadata = _child(template, "metadata")
    _child(metadata, "labels")[GROUP_LABEL] = group
    _set_scheduling(_child(template, "spec"), scheduling_plan(group, spec))
    _set_channel(metadata, spec.needs_channel, settings)


def remove_membership(vm: Body, settings: ChannelSettings | None = None) -> None:
    """Remove (in place) everything `apply_membership` added."""
    settings = settings or ChannelSettings()
    template = (vm.get("spec") or {}).get("template")
    if not isinstance(template, MutableMapping):
        return
    metadata = template.get("metadata")
    if isinstance(metadata, MutableMapping):
        _discard(metadata, "labels", GROUP_LABEL)
        _set_channel(metadata, False, settings)
    pod_spec = template.get("spec")
    if isinstance(pod_spec, MutableMapping):
        _set_scheduling(pod_spec, SchedulingPlan())


def _set_scheduling(pod_spec: Body, plan: SchedulingPlan) -> None:
    affinity = pod_spec.get("affinity")
    affinity = affinity if isinstance(affinity, MutableMapping) else {}
    sections = (
        ("podAffinity", "requiredDuringSchedulingIgnoredDuringExecution", plan.required_affinity),
        ("podAffinity", "preferredDuringSchedulingIgnoredDuringExecution", plan.preferred_affinity),
        (
            "podAntiAffinity",
            "requiredDuringSchedulingIgnoredDuringExecution",
            plan.required_anti_affinity,
        ),
        (
            "podAntiAffinity",
            "preferredDuringSchedulingIgnoredDuringExecution",
            plan.preferred_anti_affinity,
        ),
    )
    changed = False
    for kind, key, desired in sections:
        section = affinity.get(kind)
        section = section if isinstance(section, MutableMapping) else {}
        if _replace_owned(section, key, desired, selects_a_group):
            _store_or_prune(section, key, section.get(key))
            _store_or_prune(affinity, kind, section)
            changed = True
    if changed:
        _store_or_prune(pod_spec, "affinity", affinity)
    spread_owned = _replace_owned(
        pod_spec, "topologySpreadConstraints", plan.spread_constraints, selects_a_group
    )
    if spread_owned:
        _prune(pod_spec, "topologySpreadConstraints")


def _replace_owned(
    container: Body,
    key: str,
    desired: tuple[dict[str, Any], ...],
    is_owned: Callable[[Mapping[str, Any]], bool],
) -> bool:
    """Put `desired` in place of our items in `container[key]`; True when it changed."""
    items = container.get(key)
    items = list(items) if isinstance(items, list) else []
    owned = [item for item in items if isinstance(item, Mapping) and is_owned(item)]
    if owned == list(desired):
        return False
    kept = [item for item in items if not (isinstance(item, Mapping) and is_owned(item))]
    container[key] = kept + [dict(item) for item in desired]
    return True


def _set_channel(metadata: Body, wanted: bool, settings: ChannelSettings) -> None:
    annotations = metadata.get("annotations")
    annotations = annotations if isinstance(annotations, MutableMapping) else {}
    sidecars = with_hook_sidecar(
        annotations.get(HOOK_SIDECARS_ANNOTATION), wanted, settings.hook_image
    )
    changed = sidecars != annotations.get(HOOK_SIDECARS_ANNOTATION)
    if sidecars is None:
        changed = annotations.pop(HOOK_SIDECARS_ANNOTATION, None) is not None or changed
    else:
        annotations[HOOK_SIDECARS_ANNOTATION] = sidecars
    if wanted:
        changed = annotations.get(CHANNEL_PATH_ANNOTATION) != settings.channel_path or changed
        annotations[CHANNEL_PATH_ANNOTATION] = settings.channel_path
    else:
        changed = annotations.pop(CHANNEL_PATH_ANNOTATION, None) is not None or changed
    if changed:
        _store_or_prune(metadata, "annotations", annotations)


def _child(parent: Body, key: str) -> Body:
    """parent[key] as a mapping, created when missing."""
    value = parent.get(key)
    if not isinstance(value, MutableMapping):
        value = {}
        parent[key] = value
    return value


def _store_or_prune(parent: Body, key: str, value: Any) -> None:
    parent[key] = value
    _prune(parent, key)


def _prune(parent: Body, key: str) -> None:
    """Drop parent[key] when it is empty, so removing our terms leaves no empty shells."""
    if not parent.get(key):
        parent.pop(key, None)


def _discard(parent: Body, key: str, item: str) -> None:
    mapping = parent.get(key)
    if isinstance(mapping, MutableMapping) and item in mapping:
        del mapping[item]
        _prune(parent, key)
