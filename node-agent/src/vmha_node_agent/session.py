"""One session per VM: the channel, the base-layer demultiplexer and the application layers.

Everything a guest sends passes through here first: paced by the channel, reassembled by
the frame decoder, rate-limited per frame, validated by the protocol package, and only then
handed to an application layer: heartbeat to the session's `HeartbeatMonitor`, server
group messages to the agent's `ServerGroupHandler` (the group messenger). Anything wrong
is counted and, where the application layer is known, answered with a `nack` whose text
starts with a `NackReason` code; nothing a guest sends can raise out of this class.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel

from vmha_node_agent.config import AgentConfig, HeartbeatPolicy
from vmha_node_agent.heartbeat import (
    HeartbeatMonitor,
    HeartbeatState,
    Transition,
    TransitionReason,
)
from vmha_node_agent.inventory import VMRef
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.ratelimit import LogThrottle, TokenBucket
from vmha_node_agent.reporting import SessionSink
from vmha_node_agent.transport import GuestChannel
from vmha_protocol import (
    AppGroup,
    FrameDecoder,
    GuestMessage,
    Inbound,
    ProtocolError,
    decode_canonical_heartbeat,
    decode_from_guest,
    default_address,
    encode,
)
from vmha_protocol.addresses import ORIGINAL_ADDRESSES
from vmha_protocol.heartbeat import ActionResponse, EventType, HeartbeatNack
from vmha_protocol.limits import HEARTBEAT_MAX_LOG_BYTES, SERVER_GROUP_MAX_LOG_BYTES
from vmha_protocol.nack import NackReason, nack_reason, nack_text
from vmha_protocol.server_group import GuestServerGroupMessage, ServerGroupNack
from vmha_protocol.types import truncate_utf8

log = logging.getLogger(__name__)


class ServerGroupHandler(Protocol):
    """The server group application layer (the agent's group messenger)."""

    def handle(self, session: VMSession, message: GuestServerGroupMessage) -> None:
        """Serve one message; raise ProtocolError (its reason a nack text) to refuse it."""
        ...

    def invalid(
        self, session: VMSession, error: ProtocolError, data: Mapping[str, Any]
    ) -> ProtocolError:
        """The refusal to send for a server group message that failed validation."""
        ...


@dataclass(frozen=True)
class Vote:
    """The guest's answer to a revocable action (`answered` False: none in time)."""

    answered: bool
    result: str = "accept"
    log_msg: str = ""


@dataclass(frozen=True)
class Notice:
    """What came of telling the guest about a corrective action before taking it."""

    sent: bool
    notice_s: float = 0.0  # what the guest asked for, capped
    waited_s: float = 0.0
    completed: bool = False  # the guest said it was ready before the time was up


class VMSession:
    def __init__(
        self,
        vm: VMRef,
        config: AgentConfig,
        metrics: AgentMetrics,
        sink: SessionSink,
        server_group: ServerGroupHandler,
    ) -> None:
        self.vm = vm
        self._config = config
        self._sink = sink
        self._server_group = server_group
        # The server group address the guest used last (answers and notifications go there).
        self._server_group_address: str | None = None
        messaging = config.messaging
        self.broadcast_budget = TokenBucket(
            messaging.broadcasts_per_second, messaging.broadcast_burst
        )
        self.status_budget = TokenBucket(
            messaging.status_queries_per_second, messaging.status_query_burst
        )
        self.answering_status = False  # one status response at a time per VM
        self.stats = metrics.track(vm)
        self._decoder = FrameDecoder()
        self._frame_budget = TokenBucket(
            config.guest_limits.frames_per_second, config.guest_limits.frame_burst
        )
        self.channel = GuestChannel(vm.socket_path, self, config.channel, config.guest_limits)
        self.heartbeat = HeartbeatMonitor(
            vm.policy or config.heartbeat, self._send, self, asyncio.get_running_loop()
        )
        if vm.heartbeat and vm.reregister_within_s is not None:
            self.heartbeat.expect_registration(vm.reregister_within_s)
        self._task: asyncio.Task[None] | None = None
        self._action_done: dict[str, asyncio.Future[None]] = {}
        self._votes: dict[str, asyncio.Future[ActionResponse]] = {}
        # A guest can send many bad messages; our log must not become its megaphone.
        self._reject_log = LogThrottle(interval_s=5.0)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self.channel.run(), name=f"channel {self.vm}")

    async def stop(self, *, vm_removed: bool) -> None:
        """End the session without a fault (the VM left the node, or the agent stops)."""
        self.heartbeat.stop(vm_removed=vm_removed)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self.channel.close()

    def update(self, vm: VMRef) -> None:
        """The same VM with new details (its policy): applied without a new session."""
        self.vm = vm
        self.heartbeat.update_policy(vm.policy or self._config.heartbeat)

    @property
    def policy(self) -> HeartbeatPolicy:
        return self.heartbeat.policy

    async def give_notice(self, event_type: EventType, max_wait_s: float) -> Notice:
        """Tell a registered guest that `event_type` is coming and give it the notice time
        it asked for (at most `max_wait_s`), or less if it says it is ready (`complete`)."""
        registration = self.heartbeat.registration
        if registration is None:
            return Notice(sent=False)
        notice_s = min(float(registration.notice_secs(event_type)), max_wait_s)
        if not self.heartbeat.notify_action(event_type, int(notice_s * 1000)):
            return Notice(sent=False)
        loop = asyncio.get_running_loop()
        started = loop.time()
        done = self._action_done.setdefault(event_type, loop.create_future())
        try:
            async with asyncio.timeout(notice_s):
                await asyncio.shield(done)
            completed = True
        except TimeoutError:
            completed = False
        finally:
            self._action_done.pop(event_type, None)
        return Notice(True, notice_s, loop.time() - started, completed)

    async def put_to_vote(self, event_type: EventType, timeout_s: float) -> Vote:
        """Ask a registered guest whether `event_type` may happen (a revocable
        `action_notify`) and wait at most `timeout_s` for its `action_response`. Votes on
        the same event type at the same time share the guest's one answer."""
        loop = asyncio.get_running_loop()
        waiter = self._votes.get(event_type)
        if waiter is None:
            if not self.heartbeat.notify_action(event_type, int(timeout_s * 1000), "revocable"):
                return Vote(answered=False)
            waiter = self._votes[event_type] = loop.create_future()
            waiter.add_done_callback(lambda _: self._votes.pop(event_type, None))
            loop.call_later(timeout_s, _expire, waiter)
        try:
            answer = await asyncio.shield(waiter)
        except asyncio.CancelledError:
            if waiter.cancelled():  # expired, not our own cancellation
                return Vote(answered=False)
            raise
        return Vote(True, answer.vote_result, answer.log_msg)

    # -- server group ------------------------------------------------------------------

    @property
    def server_group_address(self) -> str:
        """The server group address to write to: the one the guest used, else the family
        of its heartbeat registration (a guest of the original knows only `cgcs.*`)."""
        if self._server_group_address is not None:
            return self._server_group_address
        registration = self.heartbeat.registration
        original = registration is not None and registration.address in ORIGINAL_ADDRESSES.values()
        return default_address(AppGroup.SERVER_GROUP, original=original)

    def send_server_group(self, message: BaseModel) -> bool:
        return self._send(self.server_group_address, message)

    async def send_server_group_paced(
        self, messages: Iterable[BaseModel], timeout_s: float
    ) -> bool:
        """Write every message, waiting while the guest's input is full; False when the
        channel went down or the guest read nothing for `timeout_s`."""
        address = self.server_group_address
        for message in messages:
            if not await self.channel.send_when_writable(encode(address, message), timeout_s):
                self.stats.writes_dropped += 1
                return False
        return True

    # -- ChannelListener -------------------------------------------------------------------

    def channel_connected(self) -> None:
        self._decoder.reset()
        self.stats.connected = True
        self.stats.connects += 1
        log.info("%s: channel connected", self.vm, extra=self._log_fields())

    def channel_lost(self, reason: str) -> None:
        self.stats.connected = False
        log.info("%s: channel lost: %s", self.vm, reason, extra=self._log_fields())

    def channel_data(self, data: bytes) -> None:
        decoder = self._decoder
        decoded = decoder.stats
        before = (decoded.garbage, decoded.oversize)
        for line in decoder.lines(data):
            # The common frame — a heartbeat message as `encode` writes it — in one pass;
            # anything else parsed and decoded with full diagnostics.
            inbound = decode_canonical_heartbeat(line)
            if inbound is not None:
                decoder.count_frame()
                if self._within_frame_budget():
                    self._handle(inbound)
            elif (obj := decoder.parse(line)) is not None and self._within_frame_budget():
                self._dispatch(obj)
        frames = self.stats.frames
        frames["garbage"] += decoded.garbage - before[0]
        frames["oversize"] += decoded.oversize - before[1]

    # -- HeartbeatObserver ----------------------------------------------------------------

    def challenge_sent(self) -> None:
        self.stats.challenges += 1

    def response_received(self, health: str, rtt_s: float) -> None:
        self.stats.rtt.observe(rtt_s)
        if health == "healthy":
            self.stats.healthy_responses += 1
            self.stats.last_healthy = time.time()
        else:
            self.stats.unhealthy_responses += 1

    def challenge_missed(self, consecutive: int) -> None:
        self.stats.missed += 1
        # Misses are news until they make the VM `failed`; after that the fault speaks for
        # them (a node of hung guests must not keep the reporters busy with every tick).
        if self.heartbeat.state is not HeartbeatState.FAILED:
            self._sink.challenge_missed(self.vm, consecutive)

    def late_response(self) -> None:
        self.stats.late += 1

    def action_response(self, message: ActionResponse) -> None:
        log.info(
            "%s: action_response %s %s: %s",
            self.vm, message.event_type, message.vote_result, message.log_msg,
            extra=self._log_fields(),
        )  # fmt: skip
        if message.notification_type == "revocable":
            vote = self._votes.get(message.event_type)
            if vote is not None and not vote.done():
                vote.set_result(message)
            return
        waiter = self._action_done.get(message.event_type)
        if message.vote_result == "complete" and waiter is not None and not waiter.done():
            waiter.set_result(None)

    def transition(self, change: Transition) -> None:
        self.stats.state = change.current
        if change.is_fault and change.reason in (
            TransitionReason.MISSED,
            TransitionReason.UNHEALTHY,
        ):
            self.stats.faults[change.reason.value] += 1
        self._sink.report(self.vm, change)

    # -- internals ------------------------------------------------------------------------

    @property
    def state(self) -> HeartbeatState:
        return self.heartbeat.state

    def _within_frame_budget(self) -> bool:
        if self._frame_budget.try_take():
            return True
        self.stats.frames["rate_limited"] += 1
        return False

    def _dispatch(self, obj: dict[str, Any]) -> None:
        try:
            inbound = decode_from_guest(obj)
        except ProtocolError as error:
            self.stats.frames["invalid"] += 1
            if error.group is AppGroup.SERVER_GROUP:
                self._server_group_address = error.address
                data = obj.get("data")
                data = data if isinstance(data, dict) else {}
                error = self._server_group.invalid(self, error, data)
            self._nack(error)
            return
        self._handle(inbound)

    def _handle(self, inbound: Inbound[GuestMessage]) -> None:
        if inbound.group is AppGroup.SERVER_GROUP:
            # A valid frame, whatever the messenger makes of it (its refusals are counted
            # in the messaging metrics).
            self.stats.frames["accepted"] += 1
            self._server_group_address = inbound.address
            try:
                self._server_group.handle(self, inbound.message)  # type: ignore[arg-type]
            except ProtocolError as error:
                self._nack(error)
            return
        try:
            if not self.vm.heartbeat:
                raise ProtocolError(
                    nack_text(
                        NackReason.UNAVAILABLE,
                        "heartbeat is not enabled for this VM",
                        HEARTBEAT_MAX_LOG_BYTES,
                    ),
                    group=inbound.group,
                    address=inbound.address,
                    msg_type=inbound.message.msg_type,
                    invocation_id=getattr(inbound.message, "invocation_id", None),
                )
            self.heartbeat.handle(inbound.address, inbound.message)  # type: ignore[arg-type]
        except ProtocolError as error:
            self.stats.frames["invalid"] += 1
            self._nack(error)
            return
        self.stats.frames["accepted"] += 1

    def _nack(self, error: ProtocolError) -> None:
        if self._reject_log.allow():
            suppressed = self._reject_log.take_suppressed()
            more = f" (+{suppressed} more not logged)" if suppressed else ""
            log.info(
                "%s: rejected guest message: %s%s", self.vm, error, more, extra=self._log_fields()
            )
        if not error.nackable or error.address is None:
            return
        # Every nack starts with a reason code; a validation error is `invalid`.
        reason = error.reason
        if nack_reason(reason) is None:
            reason = f"{NackReason.INVALID.value}: {reason}"
        nack: BaseModel
        if error.group is AppGroup.HEARTBEAT:
            nack = HeartbeatNack(
                invocation_id=error.invocation_id or 0,
                log_msg=truncate_utf8(reason, HEARTBEAT_MAX_LOG_BYTES),
            )
        else:
            nack = ServerGroupNack(
                orig_msg_type=truncate_utf8(error.msg_type or "unknown", 32),
                log_msg=truncate_utf8(reason, SERVER_GROUP_MAX_LOG_BYTES),
            )
        self._send(error.address, nack)

    def _send(self, address: str, message: BaseModel) -> bool:
        sent = self.channel.send(encode(address, message))
        if not sent:
            self.stats.writes_dropped += 1
        return sent

    def _log_fields(self) -> dict[str, str]:
        return {"namespace": self.vm.namespace, "vm": self.vm.name}


def _expire(waiter: asyncio.Future[ActionResponse]) -> None:
    if not waiter.done():
        waiter.cancel()
