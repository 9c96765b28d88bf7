"""Where the copies of a broadcast go (ARCHITECTURE.md data flow 3). Pure decisions.

A guest's broadcast goes to every *other* member of its group:

- a member on this node: straight to its guest (`local`);
- a member on another node whose agent is up (its Lease is fresh): to that agent, one
  request per node naming the members there (`remote`);
- anything else is dropped with a reason, counted in `vmha_messaging_dropped_total`:
  `not_running` (no node yet), `no_peer_transport` (this agent has no mTLS setup),
  `peer_down` (no fresh Lease for that node).

An agent receiving copies from another agent decides with `accept_from_peer`: the source
must be a member that runs on the sending agent's node (per the receiver's own VMI watch),
in a group with messaging on, and the targets members of the same group on the receiver's
node (others named are left out and counted). Both sides decide from their own caches:
while a VMI moves they can disagree for a moment, and the copy is refused and counted
rather than misdelivered.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from vmha_node_agent.kubevirt import Key
from vmha_node_agent.members import Member


class Drop(enum.StrEnum):
    NOT_RUNNING = "not_running"
    NO_PEER_TRANSPORT = "no_peer_transport"
    PEER_DOWN = "peer_down"


@dataclass(frozen=True)
class Route:
    local: tuple[Member, ...] = ()
    remote: dict[str, tuple[Member, ...]] = field(default_factory=dict)
    dropped: tuple[tuple[Member, Drop], ...] = ()


def route_broadcast(
    source: Key,
    members: Iterable[Member],
    local_node: str,
    *,
    peer_transport: bool,
    peer_up: Callable[[str], bool],
) -> Route:
    """Where each copy of a broadcast from `source` goes."""
    local: list[Member] = []
    remote: dict[str, list[Member]] = {}
    dropped: list[tuple[Member, Drop]] = []
    for member in members:
        if member.key == source:
            continue
        node = member.node
        if node is None:
            dropped.append((member, Drop.NOT_RUNNING))
        elif node == local_node:
            local.append(member)
        elif not peer_transport:
            dropped.append((member, Drop.NO_PEER_TRANSPORT))
        elif not peer_up(node):
            dropped.append((member, Drop.PEER_DOWN))
        else:
            remote.setdefault(node, []).append(member)
    return Route(tuple(local), {node: tuple(ms) for node, ms in remote.items()}, tuple(dropped))


class Refusal(enum.StrEnum):
    """Why an agent refused a request from another agent or the operator (HTTP 403)."""

    NO_CLIENT_CERT = "no_client_cert"
    BAD_TOKEN = "bad_token"
    WRONG_SERVICE_ACCOUNT = "wrong_service_account"
    NO_NODE = "no_node"  # an agent token not bound to a pod on a node
    NOT_SOURCE_NODE = "not_source_node"  # an agent speaking for a VM it does not host
    UNKNOWN_SOURCE = "unknown_source"  # not a group member (or a stale uid)
    MESSAGING_DISABLED = "messaging_disabled"
    TARGET_NOT_LOCAL = "target_not_local"
    MALFORMED = "malformed"


@dataclass(frozen=True)
class Accepted:
    source: Member
    targets: tuple[Member, ...]
    stray: int = 0  # targets named that are not members of the group on this node


def accept_from_peer(
    sender_node: str,
    *,
    source: Member | None,
    source_uid: str,
    targets: Sequence[Member | None],
    local_node: str,
    messaging_enabled: Callable[[tuple[str, str]], bool],
) -> Accepted | Refusal:
    """Whether a broadcast that the agent of `sender_node` forwards may be delivered here.

    `source` and `targets` are the receiver's own view of the members the request names
    (None: not a member here). Targets that are not members of the source's group on this
    node are left out and counted; when none is left the copy is refused."""
    if source is None or source.uid != source_uid:
        return Refusal.UNKNOWN_SOURCE
    if source.node != sender_node:
        return Refusal.NOT_SOURCE_NODE
    if not messaging_enabled(source.group):
        return Refusal.MESSAGING_DISABLED
    valid = tuple(
        target
        for target in targets
        if target is not None
        and target.group == source.group
        and target.node == local_node
        and target.key != source.key
    )
    if not valid:
        return Refusal.TARGET_NOT_LOCAL
    return Accepted(source, valid, stray=len(targets) - len(valid))
