"""Nova policies → scheduling terms, and violations detected from actual placement."""

from __future__ import annotations

import pytest

from vmha_operator.api import GROUP_LABEL, Policy, VMGroupSpec
from vmha_operator.placement import (
    HOSTNAME_TOPOLOGY,
    describe_policy,
    find_violations,
    scheduling_plan,
    selects_a_group,
)

TERM = {"labelSelector": {"matchLabels": {GROUP_LABEL: "g"}}, "topologyKey": HOSTNAME_TOPOLOGY}
WEIGHTED = {"weight": 100, "podAffinityTerm": TERM}


def spec(policy: str, **fields: object) -> VMGroupSpec:
    return VMGroupSpec.model_validate({"policy": policy, **fields})


def test_strict_policies_are_required_terms() -> None:
    assert scheduling_plan("g", spec("affinity")).required_affinity == (TERM,)
    plan = scheduling_plan("g", spec("anti-affinity"))
    assert plan.required_anti_affinity == (TERM,)
    assert not plan.preferred_anti_affinity and not plan.spread_constraints


@pytest.mark.parametrize(
    ("policy", "field"),
    [("soft-affinity", "preferred_affinity"), ("soft-anti-affinity", "preferred_anti_affinity")],
)
def test_soft_policies_are_preferred_terms(policy: str, field: str) -> None:
    plan = scheduling_plan("g", spec(policy))
    assert getattr(plan, field) == (WEIGHTED,)
    assert not plan.required_affinity and not plan.required_anti_affinity


def test_best_effort_makes_strict_policies_preferred() -> None:
    plan = scheduling_plan("g", spec("affinity", bestEffort=True))
    assert plan.preferred_affinity == (WEIGHTED,) and not plan.required_affinity


def test_max_per_node_uses_a_spread_constraint_as_the_closest_equivalent() -> None:
    plan = scheduling_plan("g", spec("anti-affinity", maxPerNode=3))
    assert plan.spread_constraints == (
        {
            "maxSkew": 3,
            "topologyKey": HOSTNAME_TOPOLOGY,
            "whenUnsatisfiable": "DoNotSchedule",
            "labelSelector": {"matchLabels": {GROUP_LABEL: "g"}},
        },
    )
    assert plan.preferred_anti_affinity == (WEIGHTED,) and not plan.required_anti_affinity
    # maxPerNode 1 is exactly required anti-affinity.
    assert scheduling_plan("g", spec("anti-affinity", maxPerNode=1)).required_anti_affinity


def test_selects_a_group_recognises_our_terms_only() -> None:
    assert selects_a_group(TERM) and selects_a_group(WEIGHTED)
    assert selects_a_group({"labelSelector": {"matchExpressions": [{"key": GROUP_LABEL}]}})
    assert not selects_a_group({"labelSelector": {"matchLabels": {"app": "db"}}})
    assert not selects_a_group({"weight": 5, "podAffinityTerm": {"topologyKey": "zone"}})


def test_anti_affinity_violation_names_the_node() -> None:
    violations = find_violations(spec("anti-affinity"), {"a": "n1", "b": "n1", "c": "n2"})
    assert [v.node for v in violations] == ["n1"]
    assert violations[0].members == ("a", "b")
    assert violations[0].detail == "2 members on node n1 (a, b), at most 1 allowed"


def test_max_per_node_violation_only_beyond_the_limit() -> None:
    two = spec("anti-affinity", maxPerNode=2)
    assert find_violations(two, {"a": "n1", "b": "n1", "c": "n2"}) == []
    assert [v.node for v in find_violations(two, {"a": "n1", "b": "n1", "c": "n1"})] == ["n1"]


def test_affinity_violation_names_the_nodes_away_from_the_majority() -> None:
    violations = find_violations(spec("affinity"), {"a": "n1", "b": "n1", "c": "n2", "d": "n3"})
    assert [v.node for v in violations] == ["n2", "n3"]
    assert "away from the group's node n1" in violations[0].detail
    assert find_violations(spec("affinity"), {"a": "n1", "b": "n1"}) == []
    assert find_violations(spec("soft-affinity"), {}) == []


def test_describe_policy() -> None:
    assert describe_policy(spec("anti-affinity", maxPerNode=2)) == (
        "anti-affinity (at most 2 per node)"
    )
    assert describe_policy(spec("affinity", bestEffort=True)) == "affinity, best effort"
    assert Policy("soft-affinity").is_affinity and not Policy("soft-affinity").is_strict
