"""Nova server group policies as Kubernetes scheduling constraints, and their violations.

Every constraint selects the group's virt-launcher pods by the `vmha.io/group` label (which the
mutation copies into the VM template, so VMIs and their pods carry it) with the node as the
topology domain:

- affinity / anti-affinity (strict) → required pod (anti-)affinity: the scheduler will not
  place a member where the policy breaks.
- soft-affinity / soft-anti-affinity → preferred pod (anti-)affinity (weight 100).
- bestEffort on a strict policy → the preferred form: members always get placed, and a
  violation is reported instead of leaving the VM unscheduled (the original's best effort).
- anti-affinity with maxPerNode = N > 1 (Nova's max_server_per_host) has no exact equivalent.
  The closest is a topology spread constraint on the hostname with maxSkew = N and
  DoNotSchedule: placing on node X requires count(X) + 1 - min <= N, where min is the fewest
  members on any eligible node. While some eligible node holds no member (min = 0) that is
  exactly "at most N per node"; it never refuses a node that Nova would accept; it allows more
  than N only once every eligible node already holds a member. A preferred anti-affinity term
  is added so the scheduler still spreads members first. The actual placement is checked by
  `find_violations`, which the operator reports.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any, Final

from vmha_operator.api import GROUP_LABEL, Policy, VMGroupSpec

HOSTNAME_TOPOLOGY: Final = "kubernetes.io/hostname"
PREFERRED_WEIGHT: Final = 100


@dataclasses.dataclass(frozen=True)
class SchedulingPlan:
    """The scheduling terms a member's VMI template gets, by where they go in the pod spec."""

    required_affinity: tuple[dict[str, Any], ...] = ()
    preferred_affinity: tuple[dict[str, Any], ...] = ()
    required_anti_affinity: tuple[dict[str, Any], ...] = ()
    preferred_anti_affinity: tuple[dict[str, Any], ...] = ()
    spread_constraints: tuple[dict[str, Any], ...] = ()


def group_selector(group: str) -> dict[str, Any]:
    return {"matchLabels": {GROUP_LABEL: group}}


def _pod_term(group: str) -> dict[str, Any]:
    return {"labelSelector": group_selector(group), "topologyKey": HOSTNAME_TOPOLOGY}


def _weighted(group: str) -> dict[str, Any]:
    return {"weight": PREFERRED_WEIGHT, "podAffinityTerm": _pod_term(group)}


def scheduling_plan(group: str, spec: VMGroupSpec) -> SchedulingPlan:
    """The constraints that implement `spec.policy` for members of `group`."""
    preferred_only = not spec.policy.is_strict or spec.best_effort
    if spec.policy.is_affinity:
        if preferred_only:
            return SchedulingPlan(preferred_affinity=(_weighted(group),))
        return SchedulingPlan(required_affinity=(_pod_term(group),))
    per_node = spec.node_limit or 1
    if per_node > 1 and not preferred_only:
        spread = {
            "maxSkew": per_node,
            "topologyKey": HOSTNAME_TOPOLOGY,
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": group_selector(group),
        }
        return SchedulingPlan(
            preferred_anti_affinity=(_weighted(group),), spread_constraints=(spread,)
        )
    if preferred_only:
        return SchedulingPlan(preferred_anti_affinity=(_weighted(group),))
    return SchedulingPlan(required_anti_affinity=(_pod_term(group),))


def selects_a_group(term: Mapping[str, Any]) -> bool:
    """Whether a scheduling term is one of ours: it selects on the group label."""
    inner = term.get("podAffinityTerm", term)
    selector = inner.get("labelSelector") or {}
    if GROUP_LABEL in (selector.get("matchLabels") or {}):
        return True
    return any(e.get("key") == GROUP_LABEL for e in selector.get("matchExpressions") or ())


@dataclasses.dataclass(frozen=True)
class Violation:
    """A node where the actual placement breaks the policy."""

    node: str
    members: tuple[str, ...]
    detail: str


def find_violations(spec: VMGroupSpec, placement: Mapping[str, str]) -> list[Violation]:
    """Nodes that break the policy, given {vm name: node} of the placed members."""
    by_node: dict[str, list[str]] = {}
    for vm, node in sorted(placement.items()):
        by_node.setdefault(node, []).append(vm)
    if spec.policy.is_affinity:
        return _affinity_violations(by_node)
    limit = spec.node_limit or 1
    return [
        Violation(
            node=node,
            members=tuple(vms),
            detail=f"{len(vms)} members on node {node} ({', '.join(vms)}), at most {limit} allowed",
        )
        for node, vms in sorted(by_node.items())
        if len(vms) > limit
    ]


def _affinity_violations(by_node: Mapping[str, list[str]]) -> list[Violation]:
    """Affinity wants one node; every node but the one holding most members is offending."""
    if len(by_node) <= 1:
        return []
    home = _majority_node(by_node)
    return [
        Violation(
            node=node,
            members=tuple(vms),
            detail=f"{', '.join(vms)} on node {node}, away from the group's node {home}",
        )
        for node, vms in sorted(by_node.items())
        if node != home
    ]


def _majority_node(by_node: Mapping[str, Iterable[str]]) -> str:
    counts = Counter({node: len(list(vms)) for node, vms in by_node.items()})
    most = max(counts.values())
    return min(node for node, count in counts.items() if count == most)


def describe_policy(spec: VMGroupSpec) -> str:
    """A short human phrase for messages: 'anti-affinity (at most 2 per node)'."""
    text = spec.policy.value
    if spec.policy is Policy.ANTI_AFFINITY and (spec.max_per_node or 1) > 1:
        text += f" (at most {spec.max_per_node} per node)"
    if spec.best_effort:
        text += ", best effort"
    return text
