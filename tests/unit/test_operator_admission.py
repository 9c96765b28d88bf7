"""The refusal rules: each refusal names the group and the rule."""

from __future__ import annotations

from typing import Any

from vmha_operator import admission
from vmha_operator.api import VMGroup


def group(name: str = "web", **spec: Any) -> VMGroup:
    return VMGroup.from_body(
        {
            "metadata": {"name": name, "namespace": "prod"},
            "spec": {"policy": "anti-affinity", **spec},
        }
    )


def test_joining_a_missing_group_is_refused() -> None:
    verdict = admission.join(vm="vm-a", namespace="prod", group_name="web", group=None, members=[])
    assert not verdict.allowed
    assert 'VMGroup "web" does not exist in namespace "prod"' in verdict.message
    assert "rule: a VirtualMachine can only join an existing group" in verdict.message


def test_joining_a_full_group_is_refused() -> None:
    verdict = admission.join(
        vm="vm-c",
        namespace="prod",
        group_name="web",
        group=group(maxMembers=2),
        members=["vm-b", "vm-a"],
    )
    assert verdict == admission.Verdict(
        False,
        'VMGroup "web" is full (rule: maxMembers is 2; members: vm-a, vm-b): '
        'VirtualMachine "vm-c" cannot join',
    )


def test_joining_with_room_or_without_limit_is_allowed() -> None:
    limited = group(maxMembers=2)
    assert admission.join(
        vm="vm-b", namespace="prod", group_name="web", group=limited, members=["vm-a"]
    ).allowed
    # The VM itself is not counted against the limit (e.g. a re-created VM).
    assert admission.join(
        vm="vm-b", namespace="prod", group_name="web", group=limited, members=["vm-a", "vm-b"]
    ).allowed
    assert admission.join(
        vm="x", namespace="prod", group_name="web", group=group(), members=["a"] * 50
    ).allowed


def test_deleting_a_group_with_members_is_refused() -> None:
    verdict = admission.delete_group(group_name="web", members=["vm-a", "vm-b"])
    assert not verdict.allowed
    assert verdict.message.startswith('VMGroup "web" still has 2 member(s): vm-a, vm-b')
    assert "rule: a VMGroup with members cannot be deleted" in verdict.message
    assert admission.delete_group(group_name="web", members=[]).allowed


def test_long_member_lists_are_shortened() -> None:
    verdict = admission.delete_group(group_name="web", members=[f"vm-{i:02}" for i in range(12)])
    assert "vm-09 and 2 more" in verdict.message


def test_changing_policy_with_members_is_refused() -> None:
    old, new = group(), group(policy="affinity")
    verdict = admission.update_group(old=old, new=new, members=["vm-a"])
    assert not verdict.allowed
    assert "rule: the policy cannot change while the group has members" in verdict.message
    assert 'VMGroup "web"' in verdict.message
    assert admission.update_group(old=old, new=new, members=[]).allowed
    assert admission.update_group(old=old, new=group(bestEffort=True), members=["vm-a"]).allowed


def test_lowering_max_members_below_the_count_is_refused() -> None:
    verdict = admission.update_group(old=group(), new=group(maxMembers=1), members=["a", "b"])
    assert not verdict.allowed and "rule: maxMembers cannot go below" in verdict.message
    # An unrelated update of an already overfull group (admission was bypassed) still passes.
    overfull = group(maxMembers=1)
    assert admission.update_group(old=overfull, new=overfull, members=["a", "b"]).allowed


def test_migrating_a_strict_affinity_member_is_refused() -> None:
    verdict = admission.migrate(vmi="vm-a", group=group("db", policy="affinity"))
    assert not verdict.allowed
    assert 'VMGroup "db" has policy affinity' in verdict.message
    assert "rule: members of a strict affinity group cannot live-migrate" in verdict.message
    assert 'migration of "vm-a" refused' in verdict.message


def test_best_effort_turns_the_migration_refusal_into_a_warning() -> None:
    verdict = admission.migrate(vmi="vm-a", group=group("db", policy="affinity", bestEffort=True))
    assert verdict.allowed and not verdict.message
    assert len(verdict.warnings) == 1 and "allowed because bestEffort" in verdict.warnings[0]


def test_migrating_other_members_is_allowed() -> None:
    for policy in ("anti-affinity", "soft-affinity", "soft-anti-affinity"):
        assert admission.migrate(vmi="x", group=group(policy=policy)) == admission.ALLOW
    assert admission.migrate(vmi="x", group=None) == admission.ALLOW
