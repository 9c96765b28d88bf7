"""The heartbeat monitor: one state machine per VM (PROTOCOL.md §4).

    waiting_for_init ──init──▶ healthy ◀──────▶ unhealthy
                                  │  ▲               │
                        misses ≥ threshold      (any valid response)
                                  ▼  │               │
                                 failed ◀────────────┘ misses ≥ threshold
    any registered state ──exit──▶ deregistered ──init──▶ healthy

The monitor only decides; sending goes through `send`, and everything worth reporting goes
to a `HeartbeatObserver`. Time comes from a `Scheduler` (the event loop in production).
"""

from __future__ import annotations

import enum
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

from pydantic import BaseModel

from vmha_node_agent.config import HeartbeatPolicy
from vmha_protocol import AppGroup, ProtocolError
from vmha_protocol.heartbeat import (
    ActionNotify,
    ActionResponse,
    Challenge,
    ChallengeResponse,
    CorrectiveAction,
    EventType,
    Exit,
    GuestHeartbeatMessage,
    Init,
    InitAck,
    NotificationType,
)
from vmha_protocol.limits import HEARTBEAT_MAX_LOG_BYTES
from vmha_protocol.nack import NackReason, nack_text


class HeartbeatState(enum.StrEnum):
    WAITING_FOR_INIT = "waiting_for_init"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"
    FAILED = "failed"
    DEREGISTERED = "deregistered"


REGISTERED_STATES = frozenset(
    {HeartbeatState.HEALTHY, HeartbeatState.UNHEALTHY, HeartbeatState.FAILED}
)
FAULT_STATES = frozenset({HeartbeatState.UNHEALTHY, HeartbeatState.FAILED})


class TransitionReason(enum.StrEnum):
    REGISTERED = "registered"
    MISSED = "missed"
    UNHEALTHY = "unhealthy"
    RECOVERED = "recovered"
    DEREGISTERED = "deregistered"
    REMOVED = "removed"  # the VM left the node; the agent stopped watching it


@dataclass(frozen=True)
class Registration:
    address: str
    invocation_id: int
    name: str
    requested_interval_ms: int
    interval_ms: int
    corrective_action: CorrectiveAction
    vote_secs: int
    shutdown_notice_secs: int
    suspend_notice_secs: int
    resume_notice_secs: int
    restart_secs: int

    def notice_secs(self, event_type: EventType) -> int:
        """The notice the guest asked for before `event_type` (stop and reboot both shut the
        guest down; the original host used the shutdown notice for both)."""
        if event_type in ("stop", "reboot"):
            return self.shutdown_notice_secs
        if event_type in ("suspend", "pause"):
            return self.suspend_notice_secs
        if event_type in ("resume", "unpause"):
            return self.resume_notice_secs
        return 0


@dataclass(frozen=True)
class Transition:
    previous: HeartbeatState
    current: HeartbeatState
    reason: TransitionReason
    detail: str
    wall_time: float
    registration: Registration | None

    @property
    def is_fault(self) -> bool:
        """A new fault, or a fault whose reason changed (unhealthy → failed)."""
        return self.current in FAULT_STATES

    @property
    def clears_fault(self) -> bool:
        return self.previous in FAULT_STATES and self.current not in FAULT_STATES


class HeartbeatObserver(Protocol):
    def challenge_sent(self) -> None: ...
    def response_received(self, health: str, rtt_s: float) -> None: ...
    def challenge_missed(self, consecutive: int) -> None: ...
    def late_response(self) -> None: ...
    def action_response(self, message: ActionResponse) -> None: ...
    def transition(self, change: Transition) -> None: ...


class TimerHandle(Protocol):
    def cancel(self) -> None: ...


class Scheduler(Protocol):
    def time(self) -> float: ...
    def call_at(self, when: float, callback: Callable[[], object], /) -> TimerHandle: ...


Send = Callable[[str, BaseModel], bool]


@dataclass(frozen=True)
class _Outstanding:
    value: int
    sent_at: float


# How many past challenges are remembered as "late, not wrong" (64 intervals of silence).
RECENT_CHALLENGES = 64


class HeartbeatMonitor:
    def __init__(
        self,
        policy: HeartbeatPolicy,
        send: Send,
        observer: HeartbeatObserver,
        scheduler: Scheduler,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._policy = policy
        self._send = send
        self._observer = observer
        self._scheduler = scheduler
        self._wall_clock = wall_clock
        self._random = random.Random()
        self.state = HeartbeatState.WAITING_FOR_INIT
        self.registration: Registration | None = None
        self.missed = 0
        self._outstanding: _Outstanding | None = None
        # Values of recent challenges, to tell a late answer from a wrong one: a guest that
        # was paused answers every challenge queued meanwhile when it resumes.
        self._recent: deque[int] = deque(maxlen=RECENT_CHALLENGES)
        self._timer: TimerHandle | None = None
        self._next_tick = 0.0
        self._sequence = 0

    # -- input from the guest -------------------------------------------------------

    def handle(self, address: str, message: GuestHeartbeatMessage) -> None:
        """Apply one message; raise ProtocolError for one that is wrong in this state."""
        match message:
            case Init():
                self._on_init(address, message)
            case ChallengeResponse():
                self._on_response(address, message)
            case Exit():
                self._on_exit(message)
            case ActionResponse():
                self._require_registered(address, message.msg_type, message.invocation_id)
                self._observer.action_response(message)

    def stop(self, *, vm_removed: bool) -> None:
        """Stop challenging. When the VM left the node, that also ends any fault; when only
        the agent stops, the VM's state is left for the next agent to find."""
        self._cancel_timer()
        if vm_removed and self.state in REGISTERED_STATES:
            self._enter(HeartbeatState.DEREGISTERED, TransitionReason.REMOVED, "VM removed")

    def expect_registration(self, within_s: float) -> None:
        """The guest was registered before this monitor existed (the agent restarted, or the
        VM migrated here): unless it registers within `within_s`, it is failed."""
        if self.state is HeartbeatState.WAITING_FOR_INIT:
            when = self._scheduler.time() + within_s
            self._timer = self._scheduler.call_at(
                when, lambda: self._registration_overdue(within_s)
            )

    def _registration_overdue(self, within_s: float) -> None:
        self._timer = None
        if self.state is HeartbeatState.WAITING_FOR_INIT:
            detail = f"registered before, but not again within {within_s:.0f} s of reattaching"
            self._enter(HeartbeatState.FAILED, TransitionReason.MISSED, detail)

    def update_policy(self, policy: HeartbeatPolicy) -> None:
        """Apply new bounds and threshold to the running session. The challenge already
        scheduled keeps its time; the new interval counts from the next challenge, the new
        threshold from the next miss."""
        if policy == self._policy:
            return
        self._policy = policy
        registration = self.registration
        if registration is not None:
            interval_ms = policy.clamp_interval_ms(registration.requested_interval_ms)
            if interval_ms != registration.interval_ms:
                self.registration = replace(registration, interval_ms=interval_ms)

    def notify_action(
        self,
        event_type: EventType,
        timeout_ms: int,
        notification_type: NotificationType = "irrevocable",
    ) -> bool:
        """Tell a registered guest that `event_type` is coming in `timeout_ms` (irrevocable),
        or ask for its vote within `timeout_ms` (revocable). False when it is not registered
        or the message could not be sent."""
        if self.registration is None or self.state not in REGISTERED_STATES:
            return False
        notice = ActionNotify(
            invocation_id=self.registration.invocation_id,
            sequence=self._seq(),
            event_type=event_type,
            notification_type=notification_type,
            timeout_ms=timeout_ms,
        )
        return self._send(self.registration.address, notice)

    @property
    def policy(self) -> HeartbeatPolicy:
        return self._policy

    def narrow_action(self, action: CorrectiveAction) -> None:
        """Record the corrective action the guest now asks for (sent with each response)."""
        if self.registration is not None and self.registration.corrective_action != action:
            self.registration = replace(self.registration, corrective_action=action)

    # -- transitions -------------------------------------------------------------------

    def _on_init(self, address: str, message: Init) -> None:
        current = self.registration
        if (
            current is not None
            and self.state in REGISTERED_STATES
            and current.invocation_id == message.invocation_id
        ):
            self._reply(InitAck(invocation_id=message.invocation_id, sequence=self._seq()))
            return  # the guest did not get our ack; same registration
        interval_ms = self._policy.clamp_interval_ms(message.heartbeat_interval_ms)
        self.registration = Registration(
            address=address,
            invocation_id=message.invocation_id,
            name=message.name,
            requested_interval_ms=message.heartbeat_interval_ms,
            interval_ms=interval_ms,
            corrective_action=message.corrective_action,
            vote_secs=message.vote_secs,
            shutdown_notice_secs=message.shutdown_notice_secs,
            suspend_notice_secs=message.suspend_notice_secs,
            resume_notice_secs=message.resume_notice_secs,
            restart_secs=message.restart_secs,
        )
        self.missed = 0
        self._outstanding = None
        self._recent.clear()
        self._reply(InitAck(invocation_id=message.invocation_id, sequence=self._seq()))
        detail = f"{message.name!r} every {interval_ms} ms"
        if interval_ms != message.heartbeat_interval_ms:
            detail += f" (asked for {message.heartbeat_interval_ms} ms)"
        self._enter(HeartbeatState.HEALTHY, TransitionReason.REGISTERED, detail)
        self._cancel_timer()
        self._next_tick = self._scheduler.time()
        self._tick()

    def _on_response(self, address: str, message: ChallengeResponse) -> None:
        self._require_registered(address, message.msg_type, message.invocation_id)
        outstanding = self._outstanding
        if outstanding is None or message.heartbeat_response != outstanding.value:
            if message.heartbeat_response in self._recent:
                self._observer.late_response()
                return
            raise self._error(
                nack_text(
                    NackReason.INVALID,
                    "heartbeat_response does not match the challenge",
                    HEARTBEAT_MAX_LOG_BYTES,
                ),
                message,
            )
        self._outstanding = None
        self.missed = 0
        self._observer.response_received(
            message.heartbeat_health, self._scheduler.time() - outstanding.sent_at
        )
        self.narrow_action(message.corrective_action)
        if message.heartbeat_health == "unhealthy":
            if self.state is not HeartbeatState.UNHEALTHY:
                detail = message.log_msg or "guest reported unhealthy"
                self._enter(HeartbeatState.UNHEALTHY, TransitionReason.UNHEALTHY, detail)
        elif self.state is not HeartbeatState.HEALTHY:
            self._enter(HeartbeatState.HEALTHY, TransitionReason.RECOVERED, "healthy response")

    def _on_exit(self, message: Exit) -> None:
        registration = self.registration
        if registration is None or registration.invocation_id != message.invocation_id:
            return  # nothing to deregister; a nack would only make the guest re-register
        if self.state in REGISTERED_STATES:
            self._cancel_timer()
            self._outstanding = None
            detail = message.log_msg or "guest daemon exited"
            self._enter(HeartbeatState.DEREGISTERED, TransitionReason.DEREGISTERED, detail)

    def _tick(self) -> None:
        self._timer = None
        if self.state not in REGISTERED_STATES or self.registration is None:
            return
        if self._outstanding is not None:
            self.missed += 1
            self._observer.challenge_missed(self.missed)
            if self.missed >= self._policy.missed_threshold and (
                self.state is not HeartbeatState.FAILED
            ):
                detail = f"{self.missed} consecutive challenges unanswered"
                self._enter(HeartbeatState.FAILED, TransitionReason.MISSED, detail)
        self._challenge()
        self._schedule_next(self.registration.interval_ms / 1000)

    def _challenge(self) -> None:
        assert self.registration is not None
        value = self._random.getrandbits(32)
        self._outstanding = _Outstanding(value, self._scheduler.time())
        self._recent.append(value)
        message = Challenge(
            invocation_id=self.registration.invocation_id,
            heartbeat_challenge=value,
            sequence=self._seq(),
        )
        # A challenge that cannot be sent (channel down) is still outstanding: a crashed
        # QEMU is detected by the same misses as a hung one.
        self._reply(message)
        self._observer.challenge_sent()

    def _schedule_next(self, interval_s: float) -> None:
        now = self._scheduler.time()
        self._next_tick += interval_s
        if self._next_tick <= now:  # we fell behind (stalled loop): do not burst to catch up
            self._next_tick = now + interval_s
        self._timer = self._scheduler.call_at(self._next_tick, self._tick)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _enter(self, state: HeartbeatState, reason: TransitionReason, detail: str) -> None:
        change = Transition(
            previous=self.state,
            current=state,
            reason=reason,
            detail=detail,
            wall_time=self._wall_clock(),
            registration=self.registration,
        )
        self.state = state
        self._observer.transition(change)

    # -- helpers -------------------------------------------------------------------------

    def _reply(self, message: BaseModel) -> None:
        assert self.registration is not None
        self._send(self.registration.address, message)

    def _seq(self) -> int:
        self._sequence += 1
        return self._sequence

    def _require_registered(self, address: str, msg_type: str, invocation_id: int) -> None:
        registration = self.registration
        if registration is None or self.state not in REGISTERED_STATES:
            raise ProtocolError(
                nack_text(NackReason.NOT_REGISTERED, "send init first", HEARTBEAT_MAX_LOG_BYTES),
                group=AppGroup.HEARTBEAT,
                address=address,
                msg_type=msg_type,
                invocation_id=invocation_id,
            )
        if registration.invocation_id != invocation_id:
            raise ProtocolError(
                nack_text(
                    NackReason.UNKNOWN_INVOCATION,
                    f"invocation_id {invocation_id}; registered as {registration.invocation_id}",
                    HEARTBEAT_MAX_LOG_BYTES,
                ),
                group=AppGroup.HEARTBEAT,
                address=address,
                msg_type=msg_type,
                invocation_id=invocation_id,
            )

    def _error(self, reason: str, message: ChallengeResponse) -> ProtocolError:
        assert self.registration is not None
        return ProtocolError(
            reason,
            group=AppGroup.HEARTBEAT,
            address=self.registration.address,
            msg_type=message.msg_type,
            invocation_id=message.invocation_id,
        )
