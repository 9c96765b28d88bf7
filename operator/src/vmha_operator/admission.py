"""The refusals, as pure decisions with messages a person understands.

Each message names the VMGroup and the rule that applies. `bestEffort` turns the placement
refusal (live migration of a strict affinity member) into an admission warning; the
operator then reports the broken placement in the PolicySatisfied condition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from vmha_operator.api import GROUP_LABEL, Policy, VMGroup


@dataclasses.dataclass(frozen=True)
class Verdict:
    allowed: bool
    message: str = ""
    warnings: tuple[str, ...] = ()


ALLOW = Verdict(allowed=True)


def _names(members: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(sorted(members)[:limit])
    more = len(members) - limit
    return f"{shown} and {more} more" if more > 0 else shown


def join(
    *, vm: str, namespace: str, group_name: str, group: VMGroup | None, members: Sequence[str]
) -> Verdict:
    """A VirtualMachine takes the group label; `members` are the others already in it."""
    if group is None:
        return Verdict(
            False,
            f'VMGroup "{group_name}" does not exist in namespace "{namespace}" '
            "(rule: a VirtualMachine can only join an existing group): create the VMGroup "
            f'before labelling VirtualMachine "{vm}" with {GROUP_LABEL}={group_name}',
        )
    limit = group.spec.max_members
    others = [m for m in members if m != vm]
    if limit is not None and len(others) >= limit:
        return Verdict(
            False,
            f'VMGroup "{group_name}" is full (rule: maxMembers is {limit}; members: '
            f'{_names(others)}): VirtualMachine "{vm}" cannot join',
        )
    return ALLOW


def delete_group(*, group_name: str, members: Sequence[str]) -> Verdict:
    if members:
        return Verdict(
            False,
            f'VMGroup "{group_name}" still has {len(members)} member(s): {_names(members)} '
            "(rule: a VMGroup with members cannot be deleted): delete them or remove their "
            f"{GROUP_LABEL} label first",
        )
    return ALLOW


def update_group(*, old: VMGroup, new: VMGroup, members: Sequence[str]) -> Verdict:
    name = new.metadata.name
    if members and old.spec.policy != new.spec.policy:
        return Verdict(
            False,
            f'VMGroup "{name}" has {len(members)} member(s): {_names(members)} (rule: the '
            "policy cannot change while the group has members, their placement was made for "
            f"{old.spec.policy.value}): remove the members first to change it to "
            f"{new.spec.policy.value}",
        )
    limit = new.spec.max_members
    if limit is not None and len(members) > limit and limit != old.spec.max_members:
        return Verdict(
            False,
            f'VMGroup "{name}" has {len(members)} members: {_names(members)} (rule: maxMembers '
            f"cannot go below the current number of members): maxMembers {limit} refused",
        )
    return ALLOW


def vote_refused(*, kind: str, name: str, event_type: str, reason: str) -> Verdict:
    """The guest of a group member rejected a revocable action (its vote)."""
    return Verdict(
        False,
        f'{kind} "{name}": its guest rejected {event_type}: {reason} (rule: a guest '
        "registered for votes may refuse a live migration or a stop while it is asked; "
        "retry later, or stop the VM's guest application first)",
    )


def vote_not_asked(*, kind: str, name: str, reason: str) -> str:
    """The warning when a guest could not be asked (the action goes ahead)."""
    return f'{kind} "{name}": its guest was not asked for its vote: {reason}; allowed'


def migrate(*, vmi: str, group: VMGroup | None) -> Verdict:
    """A VirtualMachineInstanceMigration of a member's VMI."""
    if group is None or group.spec.policy is not Policy.AFFINITY:
        return ALLOW
    name = group.metadata.name
    rule = (
        "rule: members of a strict affinity group cannot live-migrate: the group's pods "
        "must share one node and the migration target cannot be the source node"
    )
    if group.spec.best_effort:
        return Verdict(
            True,
            warnings=(
                f'VMGroup "{name}" has policy affinity ({rule}); allowed because bestEffort '
                f'is set: migrating "{vmi}" separates it from the group, reported in the '
                "PolicySatisfied condition",
            ),
        )
    return Verdict(
        False,
        f'VMGroup "{name}" has policy affinity ({rule}): migration of "{vmi}" refused; '
        "set bestEffort: true on the group to allow it with a warning",
    )
