"""Every group member in the cluster and its state, from the agent's VMI and VMGroup watches.

The agent already watches VMIs cluster-wide (discovery); this directory keeps the members
among them (VMIs labelled `vmha.io/group`), on any node, with their `MemberState`
(`memberstate.py`), and the groups' `spec.messaging` switch. It answers status queries,
routes broadcasts, checks what other agents claim, and reports every change of a member's
state to a `MemberListener` as it happens (no polling):

    VMI watch ──▶ GroupDirectory ──member_changed──▶ notifications to the other members

A member that is deleted, or leaves its group, is reported once more with state `deleted`.
The first list after the agent starts reports nothing (there is no earlier state to
compare with; guests ask for status when they start); a later list (after the watch
expired) reports what changed meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from vmha_node_agent.kubevirt import Key, key_of, labels_of, node_of, uid_of
from vmha_node_agent.memberstate import deleted_state, member_state
from vmha_node_agent.policy import GROUP_LABEL
from vmha_node_agent.watch import Changed, Listed, WatchUpdate
from vmha_protocol.server_group import MemberState

GroupKey = tuple[str, str]  # (namespace, group name)


@dataclass(frozen=True)
class Member:
    key: Key  # (namespace, VMI name)
    group: GroupKey
    uid: str
    node: str | None
    state: MemberState

    @property
    def name(self) -> str:
        return self.key[1]


class MemberListener(Protocol):
    def member_changed(self, group: GroupKey, member: Key, state: MemberState) -> None: ...


def group_key_of(vmi: Mapping[str, Any]) -> GroupKey | None:
    name = labels_of(vmi).get(GROUP_LABEL)
    return (key_of(vmi)[0], str(name)) if name else None


def messaging_switch(group: Mapping[str, Any]) -> bool:
    """`VMGroup.spec.messaging` (default true)."""
    value = (group.get("spec") or {}).get("messaging", True)
    return value is not False


class GroupDirectory:
    def __init__(self) -> None:
        self._members: dict[Key, Member] = {}
        self._groups: dict[GroupKey, dict[Key, Member]] = {}
        self._messaging: dict[GroupKey, bool] = {}
        self._listeners: list[MemberListener] = []
        self._listed = False

    def subscribe(self, listener: MemberListener) -> None:
        self._listeners.append(listener)

    # -- what others ask -------------------------------------------------------------------

    def member(self, key: Key) -> Member | None:
        return self._members.get(key)

    def members(self, group: GroupKey) -> list[Member]:
        """The group's members, by name."""
        return sorted(self._groups.get(group, {}).values(), key=lambda m: m.name)

    def messaging_enabled(self, group: GroupKey) -> bool:
        """Off only when the VMGroup says so (a group not seen yet: on, like heartbeat)."""
        return self._messaging.get(group, True)

    def __len__(self) -> int:
        return len(self._members)

    # -- watch updates ---------------------------------------------------------------------

    def vmis_changed(self, update: WatchUpdate) -> None:
        match update:
            case Listed(objects):
                first = not self._listed
                self._listed = True
                seen: set[Key] = set()
                for vmi in objects:
                    seen.add(key_of(vmi))
                    self._apply(vmi, quiet=first)
                for key in [k for k in self._members if k not in seen]:
                    self._remove(key)
            case Changed("DELETED", vmi):
                known = self._members.get(key_of(vmi))
                if known is not None and known.uid == uid_of(vmi):
                    self._remove(known.key)
            case Changed(_, vmi):
                self._apply(vmi, quiet=False)

    def groups_changed(self, update: WatchUpdate) -> None:
        match update:
            case Listed(objects):
                self._messaging = {key_of(g): messaging_switch(g) for g in objects}
            case Changed("DELETED", group):
                self._messaging.pop(key_of(group), None)
            case Changed(_, group):
                self._messaging[key_of(group)] = messaging_switch(group)

    # -- internals -------------------------------------------------------------------------

    def _apply(self, vmi: Mapping[str, Any], *, quiet: bool) -> None:
        key = key_of(vmi)
        group = group_key_of(vmi)
        known = self._members.get(key)
        if known is not None and (group != known.group or uid_of(vmi) != known.uid):
            self._remove(key)  # left its group, or a new VMI of that name
            known = None
        if group is None:
            return
        member = Member(key, group, uid_of(vmi), node_of(vmi), member_state(vmi))
        self._members[key] = member
        self._groups.setdefault(group, {})[key] = member
        if not quiet and (known is None or known.state != member.state):
            self._publish(group, key, member.state)

    def _remove(self, key: Key) -> None:
        member = self._members.pop(key)
        group = self._groups.get(member.group, {})
        group.pop(key, None)
        if not group:
            self._groups.pop(member.group, None)
        self._publish(member.group, key, deleted_state(member.state))

    def _publish(self, group: GroupKey, key: Key, state: MemberState) -> None:
        for listener in self._listeners:
            listener.member_changed(group, key, state)


def local_members(members: Iterable[Member], node: str) -> list[Member]:
    return [member for member in members if member.node == node]
