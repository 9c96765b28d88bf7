"""The group messenger: the server group application layer (PROTOCOL.md §5) for the guests
on this node, from the group directory's picture of every member.

- `status_query` → one `status_response` per member of the asking VM's group (itself
  included, by name), then `status_response_done`, all with the query's `seq`; written as
  fast as the guest reads (one response at a time per VM).
- `broadcast` → checked (size by the protocol's model, the VM's rate limit), then one copy
  per other member: directly to members on this node, through their node's agent for the
  others (`routing.py`, `peerclient.py`), with `source_instance` set here to the source
  VM's `<namespace>/<name>` — never anything the guest said.
- a member's state changes (the directory tells us as the watch reports it) →
  `notification` to every other member of its group on this node; changes of one member
  within `messaging.notification_delay_s` make one notification with its latest state.
- messaging off (not a group member, `VMGroup.spec.messaging: false`, or off in the agent's
  configuration) → every server group message gets a nack `messaging-disabled: …`.

Refusals are nacks whose text starts with a `NackReason` code; every outcome is counted
(`vmha_messaging_*`). Copies are best-effort: a guest that does not read, a node whose
agent is down, a full queue — the copy is dropped and counted by reason, the sender never
waits.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Final, Protocol

from pydantic import BaseModel

from vmha_node_agent.config import AgentConfig
from vmha_node_agent.kubevirt import Key
from vmha_node_agent.members import GroupDirectory, GroupKey, Member
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.peerapi import ForwardedBroadcast, SourceRef
from vmha_node_agent.routing import Accepted, Refusal, accept_from_peer, route_broadcast
from vmha_node_agent.session import VMSession
from vmha_protocol import AppGroup, ProtocolError, limits
from vmha_protocol.nack import NackReason, nack_text
from vmha_protocol.server_group import (
    GuestBroadcast,
    GuestServerGroupMessage,
    HostBroadcast,
    MemberState,
    Notification,
    StatusQuery,
    StatusResponse,
    StatusResponseDone,
)

log = logging.getLogger(__name__)

NOT_ATTACHED: Final = "not_attached"  # a member here without a session (no socket yet)
GUEST_NOT_READING: Final = "guest_not_reading"  # its channel is down or full


class PeerLink(Protocol):
    """The way to the other nodes' agents."""

    def peer_up(self, node: str) -> bool: ...
    def send(self, node: str, message: ForwardedBroadcast) -> None: ...


def source_instance(member: Member) -> str:
    """The sender address guests see: `<namespace>/<name>`, or the VMI's uid when that
    would be longer than the protocol allows."""
    address = f"{member.key[0]}/{member.key[1]}"
    if len(address.encode()) > limits.MAX_SOURCE_INSTANCE_BYTES:
        return member.uid
    return address


class GroupMessenger:
    def __init__(
        self,
        config: AgentConfig,
        metrics: AgentMetrics,
        directory: GroupDirectory,
        sessions: Mapping[Key, VMSession],
        peers: PeerLink | None = None,
    ) -> None:
        self._config = config.messaging
        self._node = config.node_name
        self._metrics = metrics
        self._directory = directory
        self._sessions = sessions
        self._peers = peers
        self._pending: dict[tuple[GroupKey, Key], MemberState] = {}
        self._notified: dict[tuple[GroupKey, Key], MemberState] = {}
        self._flush: asyncio.TimerHandle | None = None
        self._answers: set[asyncio.Task[None]] = set()
        directory.subscribe(self)

    # -- ServerGroupHandler ----------------------------------------------------------------

    def handle(self, session: VMSession, message: GuestServerGroupMessage) -> None:
        member = self._membership(session, message.msg_type)
        match message:
            case StatusQuery():
                self._status(session, member, message)
            case GuestBroadcast():
                self._broadcast(session, member, message)

    def invalid(
        self, session: VMSession, error: ProtocolError, data: Mapping[str, Any]
    ) -> ProtocolError:
        msg_type = error.msg_type or "unknown"
        try:
            self._membership(session, msg_type)
        except ProtocolError as disabled:
            return disabled  # messaging off: that is the answer to anything
        value = data.get("data")
        if msg_type == "broadcast" and isinstance(value, str):
            size = len(value.encode("utf-8", errors="replace"))
            if size > limits.MAX_BROADCAST_BYTES:
                detail = f"broadcast of {size} bytes; at most {limits.MAX_BROADCAST_BYTES}"
                return self._refusal(session, msg_type, NackReason.TOO_LARGE, detail)
        self._count(msg_type, "invalid")
        return error

    # -- status ----------------------------------------------------------------------------

    def _status(self, session: VMSession, member: Member, query: StatusQuery) -> None:
        if not session.status_budget.try_take():
            raise self._refusal(session, query.msg_type, NackReason.RATE_LIMITED, "status query")
        if session.answering_status:
            detail = "the previous status query is still being answered"
            raise self._refusal(session, query.msg_type, NackReason.UNAVAILABLE, detail, "busy")
        self._count(query.msg_type, "accepted")
        # Built without validation: the members' states are ours, the seq was validated.
        answer: list[BaseModel] = [
            StatusResponse.model_construct(seq=query.seq, data=m.state)
            for m in self._directory.members(member.group)
        ]
        answer.append(StatusResponseDone.model_construct(seq=query.seq))
        session.answering_status = True
        task = asyncio.get_running_loop().create_task(self._answer(session, answer))
        self._answers.add(task)
        task.add_done_callback(self._answers.discard)

    async def _answer(self, session: VMSession, messages: list[BaseModel]) -> None:
        try:
            if not await session.send_server_group_paced(
                messages, self._config.status_write_timeout_s
            ):
                log.info("%s: status response not delivered (the guest is not reading)", session.vm)
        finally:
            session.answering_status = False

    # -- broadcast -------------------------------------------------------------------------

    def _broadcast(self, session: VMSession, member: Member, message: GuestBroadcast) -> None:
        if not session.broadcast_budget.try_take():
            detail = (
                f"over {self._config.broadcasts_per_second:g} broadcasts per second "
                f"(burst {self._config.broadcast_burst}); dropped"
            )
            raise self._refusal(session, message.msg_type, NackReason.RATE_LIMITED, detail)
        self._count(message.msg_type, "accepted")
        peers = self._peers
        route = route_broadcast(
            member.key,
            self._directory.members(member.group),
            self._node,
            peer_transport=peers is not None,
            peer_up=peers.peer_up if peers is not None else lambda _: False,
        )
        copy = HostBroadcast.model_construct(
            source_instance=source_instance(member), data=message.data
        )
        for target in route.local:
            self._deliver(target, copy, "local")
        for _, reason in route.dropped:
            self._metrics.messaging_dropped.labels(reason.value).inc()
        if peers is not None:
            source = SourceRef(namespace=member.key[0], name=member.name, uid=member.uid)
            for node, targets in route.remote.items():
                forwarded = ForwardedBroadcast.model_construct(
                    source=source, targets=[t.name for t in targets], data=message.data
                )
                peers.send(node, forwarded)

    def deliver_from_peer(self, sender_node: str, message: ForwardedBroadcast) -> Refusal | int:
        """A copy another agent forwards: delivered to the targets here that qualify (their
        number), or refused. Refusals are counted here."""
        namespace = message.source.namespace
        verdict = accept_from_peer(
            sender_node,
            source=self._directory.member((namespace, message.source.name)),
            source_uid=message.source.uid,
            targets=[self._directory.member((namespace, name)) for name in message.targets],
            local_node=self._node,
            messaging_enabled=self._directory.messaging_enabled,
        )
        if not isinstance(verdict, Accepted):
            self._metrics.peer_refused.labels(verdict.value).inc()
            return verdict
        if verdict.stray:
            self._metrics.peer_refused.labels(Refusal.TARGET_NOT_LOCAL.value).inc(verdict.stray)
        copy = HostBroadcast.model_construct(
            source_instance=source_instance(verdict.source), data=message.data
        )
        return sum(self._deliver(target, copy, "peer") for target in verdict.targets)

    def _deliver(self, target: Member, copy: HostBroadcast, path: str) -> bool:
        session = self._sessions.get(target.key)
        if session is None or session.vm.uid != target.uid:
            self._metrics.messaging_dropped.labels(NOT_ATTACHED).inc()
            return False
        if not session.send_server_group(copy):
            self._metrics.messaging_dropped.labels(GUEST_NOT_READING).inc()
            return False
        self._metrics.messaging_deliveries.labels(path).inc()
        return True

    # -- notifications (MemberListener) ----------------------------------------------------

    def member_changed(self, group: GroupKey, member: Key, state: MemberState) -> None:
        self._pending[(group, member)] = state
        if self._flush is None:
            loop = asyncio.get_running_loop()
            self._flush = loop.call_later(self._config.notification_delay_s, self._notify)

    def _notify(self) -> None:
        self._flush = None
        pending, self._pending = self._pending, {}
        for (group, key), state in pending.items():
            if self._notified.get((group, key)) == state:
                continue  # changed and changed back within the window
            if state.state == "deleted":
                self._notified.pop((group, key), None)
            else:
                self._notified[(group, key)] = state
            if not self._config.enabled or not self._directory.messaging_enabled(group):
                continue
            notification = Notification.model_construct(data=state)
            for other in self._directory.members(group):
                if other.node != self._node or other.key == key:
                    continue
                session = self._sessions.get(other.key)
                if (
                    session is not None
                    and session.vm.uid == other.uid
                    and session.send_server_group(notification)
                ):
                    self._metrics.messaging_notifications.inc()

    async def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None
        for task in list(self._answers):
            task.cancel()
        await asyncio.gather(*self._answers, return_exceptions=True)

    # -- helpers ---------------------------------------------------------------------------

    def _membership(self, session: VMSession, msg_type: str) -> Member:
        """The VM's membership, or the `messaging-disabled` refusal naming why."""
        vm = session.vm
        member = self._directory.member(vm.key)
        if not self._config.enabled:
            why = f"server group messaging is off on node {self._node}"
        elif member is None or member.uid != vm.uid:
            why = f"{vm} is not a member of a server group"
        elif not self._directory.messaging_enabled(member.group):
            why = f"server group messaging is off for group {member.group[1]}"
        else:
            return member
        raise self._refusal(session, msg_type, NackReason.MESSAGING_DISABLED, why)

    def _refusal(
        self,
        session: VMSession,
        msg_type: str,
        reason: NackReason,
        detail: str,
        result: str | None = None,
    ) -> ProtocolError:
        self._count(msg_type, result or reason.value.replace("-", "_"))
        return ProtocolError(
            nack_text(reason, detail, limits.SERVER_GROUP_MAX_LOG_BYTES),
            group=AppGroup.SERVER_GROUP,
            address=session.server_group_address,
            msg_type=msg_type,
        )

    def _count(self, msg_type: str, result: str) -> None:
        kind = msg_type if msg_type in ("broadcast", "status_query") else "other"
        self._metrics.messaging_messages.labels(kind, result).inc()
