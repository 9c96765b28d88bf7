"""The heartbeat state machine, driven by a manual clock so every step is deterministic."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from pydantic import BaseModel

from vmha_node_agent.config import HeartbeatPolicy
from vmha_node_agent.heartbeat import (
    HeartbeatMonitor,
    HeartbeatState,
    Transition,
    TransitionReason,
)
from vmha_protocol import ProtocolError
from vmha_protocol.heartbeat import (
    ActionResponse,
    Challenge,
    ChallengeResponse,
    Exit,
    Init,
    InitAck,
)
from vmha_protocol.nack import NackReason, nack_reason
from vmha_testbed.manualclock import ManualClock

ADDRESS = "cgcs.heartbeat"


@dataclass
class Recorder:
    sent: list[tuple[str, BaseModel]] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    misses: list[int] = field(default_factory=list)
    responses: list[tuple[str, float]] = field(default_factory=list)
    late: int = 0
    challenges: int = 0
    actions: list[ActionResponse] = field(default_factory=list)
    channel_up: bool = True

    def send(self, address: str, message: BaseModel) -> bool:
        self.sent.append((address, message))
        return self.channel_up

    def challenge_sent(self) -> None:
        self.challenges += 1

    def response_received(self, health: str, rtt_s: float) -> None:
        self.responses.append((health, rtt_s))

    def challenge_missed(self, consecutive: int) -> None:
        self.misses.append(consecutive)

    def late_response(self) -> None:
        self.late += 1

    def action_response(self, message: ActionResponse) -> None:
        self.actions.append(message)

    def transition(self, change: Transition) -> None:
        self.transitions.append(change)

    def last_challenge(self) -> Challenge:
        challenges = [m for _, m in self.sent if isinstance(m, Challenge)]
        return challenges[-1]


def make_init(invocation_id: int = 1, interval_ms: int = 1000, **overrides: object) -> Init:
    fields: dict[str, object] = {
        "invocation_id": invocation_id,
        "name": "app",
        "heartbeat_interval_ms": interval_ms,
        "vote_secs": 10,
        "shutdown_notice_secs": 5,
        "suspend_notice_secs": 5,
        "resume_notice_secs": 5,
        "restart_secs": 60,
        "corrective_action": "reboot",
    } | overrides
    return Init.model_validate(fields)


def answer(
    recorder: Recorder, health: str = "healthy", invocation_id: int = 1, log_msg: str = ""
) -> ChallengeResponse:
    return ChallengeResponse.model_validate(
        {
            "invocation_id": invocation_id,
            "heartbeat_response": recorder.last_challenge().heartbeat_challenge,
            "heartbeat_health": health,
            "corrective_action": "reboot",
            "log_msg": log_msg,
        }
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def monitor(clock: ManualClock, recorder: Recorder) -> HeartbeatMonitor:
    policy = HeartbeatPolicy(min_interval_ms=100, max_interval_ms=5000, missed_threshold=3)
    return HeartbeatMonitor(policy, recorder.send, recorder, clock, wall_clock=lambda: 1e9)


def states(recorder: Recorder) -> list[tuple[str, str, str]]:
    return [(t.previous, t.current, t.reason) for t in recorder.transitions]


def test_init_is_acknowledged_and_challenged_at_once(
    monitor: HeartbeatMonitor, recorder: Recorder
) -> None:
    assert monitor.state is HeartbeatState.WAITING_FOR_INIT
    monitor.handle(ADDRESS, make_init())
    assert monitor.state is HeartbeatState.HEALTHY
    (addr1, ack), (addr2, challenge) = recorder.sent
    assert isinstance(ack, InitAck) and ack.invocation_id == 1
    assert isinstance(challenge, Challenge) and challenge.invocation_id == 1
    assert addr1 == addr2 == ADDRESS  # answered on the name the guest used
    assert ack.sequence < challenge.sequence
    assert states(recorder) == [("waiting_for_init", "healthy", "registered")]


def test_challenges_follow_the_guest_interval(
    monitor: HeartbeatMonitor, recorder: Recorder, clock: ManualClock
) -> None:
    monitor.handle(ADDRESS, make_init(interval_ms=500))
    for _ in range(10):
        monitor.handle(ADDRESS, answer(recorder))
        clock.advance(0.5)
    assert recorder.challenges == 11
    assert recorder.misses == []
    assert len(recorder.responses) == 10
    assert monitor.state is HeartbeatState.HEALTHY


@pytest.mark.parametrize(("asked", "used"), [(10, 100), (1000, 1000), (60_000, 5000)])
def test_interval_is_clamped_to_policy(
    monitor: HeartbeatMonitor, recorder: Recorder, clock: ManualClock, asked: int, used: int
) -> None:
    monitor.handle(ADDRESS, make_init(interval_ms=asked))
    assert monitor.registration is not None
    assert monitor.registration.interval_ms == used
    clock.advance(used / 1000 - 0.001)
    assert recorder.challenges == 1
    clock.advance(0.002)
    assert recorder.challenges == 2


def test_fault_after_threshold_consecutive_misses_and_recovery(
    monitor: HeartbeatMonitor, recorder: Recorder, clock: ManualClock
) -> None:
    monitor.handle(ADDRESS, make_init())
    clock.advance(2.0)
    assert recorder.misses == [1, 2]
    assert monitor.state is HeartbeatState.HEALTHY
    clock.advance(1.0)
    assert recorder.misses == [1, 2, 3]
    assert monitor.state is HeartbeatState.FAILED
    fault = recorder.transitions[-1]
    assert fault.reason is TransitionReason.MISSED and fault.is_fault
    clock.advance(1.0)  # still failed: no second fault for the same episode
    assert [t.reason for t in recorder.transitions].count(TransitionReason.MISSED) == 1
    monitor.handle(ADDRESS, answer(recorder))
    assert monitor.state is HeartbeatState.HEALTHY
    assert recorder.transitions[-1].reason is TransitionReason.RECOVERED
    assert recorder.transitions[-1].clears_fault
    assert monitor.missed == 0


def test_detection_time_is_bounded_by_interval_times_threshold_plus_one(
    monitor: HeartbeatMonitor, recorder: Recorder, clock: ManualClock
) -> None:
    monitor.handle(ADDRESS, make_init(interval_ms=1000))
    monitor.handle(ADDRESS, answer(recorder))
    clock.advance(0.999)  # the guest hangs just before the next challenge
    hang_at = clock.now
    while monitor.state is not HeartbeatState.FAILED:
        clock.advance(0.01)
    assert clock.now - hang_at <= 1.0 * (3 + 1)


def test_a_miss_streak_broken_by_a_response_does_not_fault(
    monitor: HeartbeatMonitor, recorder: Recorder, clock: ManualClock
) -> None:
    monitor.handle(ADDRESS, make_init())
    clock.advance(2.0)  # two misses, then an answer
    monitor.handle(ADDRESS, answer(recorder))
    for _ in range(5):
        clock.advance(3.0)  # a fresh challenge, then two misses, then an answer
        monitor.handle(ADDRESS, answer(recorder))
    assert monitor.state is HeartbeatState.HEALTHY
    assert recorder.misses == [1, 2] * 6


def test_unhealthy_response_is_a_fault_and_healthy_recovers(
    monitor: HeartbeatMonitor, recorder: Recorder, clock: ManualClock
) -> None:
    monitor.handle(ADDRESS, make_init())
    monitor.handle(ADDRESS, answer(recorder, "unhealthy", log_msg="db down"))
    assert monitor.state is HeartbeatState.UNHEALTHY
    change = recorder.transitions[-1]
    assert change.is_fault and change.reason is TransitionReason.UNHEALTHY
    assert change.detail == "db down"
    clock.advance(1.0)
    monitor.handle(ADDRESS, answer(recorder, "unhealthy"))
    assert len(recorder.transitions) == 2  # no repeat while it stays unhealthy
    clock.advance(1.0)
    monitor.handle(ADDRESS, answer(recorder, "healthy"))
    assert states(recorder)[-1] == ("unhealthy", "healthy", "recovered")


def test_unhealthy_then_silent_becomes_failed(
    monitor: HeartbeatMonitor, recorder: Recorder, clock: ManualClock
) -> None:
    monitor.handle(ADDRESS, make_init())
    monitor.handle(ADDRESS, answer(recorder, "unhealthy"))
    clock.advance(4.0)
    assert states(recorder)[-1] == ("unhealthy", "failed", "missed")


def test_exit_deregisters_without_fault_and_stops_challenges(
    monitor: HeartbeatMonitor, recorder: Recorder, clock: ManualClock
) -> None:
    monitor.handle(ADDRESS, make_init())
    monitor.handle(ADDRESS, Exit(invocation_id=1, log_msg="shutting down"))
    assert monitor.state is HeartbeatState.DEREGISTERED
    assert not recorder.transitions[-1].is_fault
    sent = len(recorder.sent)
    clock.advance(10.0)
    assert len(recorder.sent) == sent
    assert recorder.misses == []


def test_exit_from_a_stranger_is_ignored(monitor: HeartbeatMonitor) -> None:
    monitor.handle(ADDRESS, Exit(invocation_id=5))
    assert monitor.state is HeartbeatState.WAITING_FOR_INIT
    monitor.handle(ADDRESS, make_init(invocation_id=1))
    monitor.handle(ADDRESS, Exit(invocation_id=2))
    assert monitor.state is HeartbeatState.HEALTHY


def test_new_init_re_registers_a_failed_guest(
    monitor: HeartbeatMonitor, recorder: Recorder, clock: ManualClock
) -> None:
    monitor.handle(ADDRESS, make_init(invocation_id=1))
    clock.advance(3.0)
    assert monitor.state is HeartbeatState.FAILED
    monitor.handle("vmha.heartbeat", make_init(invocation_id=2, interval_ms=200))
    assert monitor.state is HeartbeatState.HEALTHY
    change = recorder.transitions[-1]
    assert change.reason is TransitionReason.REGISTERED and change.clears_fault
    assert recorder.sent[-1][0] == "vmha.heartbeat"
    assert monitor.registration is not None and monitor.registration.interval_ms == 200


def test_repeated_init_with_same_invocation_is_re_acked_only(
    monitor: HeartbeatMonitor, recorder: Recorder
) -> None:
    monitor.handle(ADDRESS, make_init())
    monitor.handle(ADDRESS, make_init())
    assert [type(m).__name__ for _, m in recorder.sent] == ["InitAck", "Challenge", "InitAck"]
    assert len(recorder.transitions) == 1


def test_wrong_challenge_value_is_an_error_and_a_late_one_is_counted(
    monitor: HeartbeatMonitor, recorder: Recorder, clock: ManualClock
) -> None:
    monitor.handle(ADDRESS, make_init())
    stale = answer(recorder)
    clock.advance(1.0)  # a new challenge replaces the old one
    monitor.handle(ADDRESS, stale)
    assert recorder.late == 1
    wrong = stale.model_copy(update={"heartbeat_response": (stale.heartbeat_response + 1) % 2**32})
    if wrong.heartbeat_response in (recorder.last_challenge().heartbeat_challenge,):
        pytest.skip("random collision")
    with pytest.raises(ProtocolError, match="does not match"):
        monitor.handle(ADDRESS, wrong)


def test_a_resumed_guest_answering_every_queued_challenge_is_not_nacked(
    monitor: HeartbeatMonitor, recorder: Recorder, clock: ManualClock
) -> None:
    monitor.handle(ADDRESS, make_init())
    clock.advance(30.0)  # paused for 30 intervals: 30 challenges queued in the guest
    assert monitor.state is HeartbeatState.FAILED
    queued = [m for _, m in recorder.sent if isinstance(m, Challenge)]
    for challenge in queued:  # answered in order once it runs again
        response = answer(recorder).model_copy(
            update={"heartbeat_response": challenge.heartbeat_challenge}
        )
        monitor.handle(ADDRESS, response)  # raises ProtocolError if called wrong
    assert recorder.late == len(queued) - 1
    assert monitor.state is HeartbeatState.HEALTHY


@pytest.mark.parametrize("registered", [False, True])
def test_response_without_matching_registration_is_an_error(
    monitor: HeartbeatMonitor, recorder: Recorder, registered: bool
) -> None:
    if registered:
        monitor.handle(ADDRESS, make_init(invocation_id=1))
    response = ChallengeResponse(
        invocation_id=9, heartbeat_response=1, heartbeat_health="healthy", corrective_action="none"
    )
    with pytest.raises(ProtocolError) as caught:
        monitor.handle(ADDRESS, response)
    assert caught.value.nackable
    assert caught.value.invocation_id == 9
    # The nack text starts with the reason code the guest daemon acts on (register again).
    code = NackReason.UNKNOWN_INVOCATION if registered else NackReason.NOT_REGISTERED
    assert nack_reason(caught.value.reason) is code


def test_challenges_continue_while_the_channel_is_down(
    monitor: HeartbeatMonitor, recorder: Recorder, clock: ManualClock
) -> None:
    monitor.handle(ADDRESS, make_init())
    recorder.channel_up = False  # QEMU killed: sends fail, challenges still go unanswered
    clock.advance(3.0)
    assert monitor.state is HeartbeatState.FAILED


def test_stop_when_vm_removed_ends_the_fault_silently_otherwise(
    monitor: HeartbeatMonitor, recorder: Recorder, clock: ManualClock
) -> None:
    monitor.handle(ADDRESS, make_init())
    clock.advance(3.0)
    monitor.stop(vm_removed=False)
    assert monitor.state is HeartbeatState.FAILED  # left for the next agent to judge
    monitor.stop(vm_removed=True)
    assert states(recorder)[-1] == ("failed", "deregistered", "removed")
    assert recorder.transitions[-1].clears_fault


def test_response_narrows_the_corrective_action(
    monitor: HeartbeatMonitor, recorder: Recorder
) -> None:
    monitor.handle(ADDRESS, make_init())
    response = answer(recorder).model_copy(update={"corrective_action": "log"})
    monitor.handle(ADDRESS, response)
    assert monitor.registration is not None
    assert monitor.registration.corrective_action == "log"


def test_action_response_needs_registration(monitor: HeartbeatMonitor, recorder: Recorder) -> None:
    vote = ActionResponse(
        invocation_id=1,
        event_type="stop",
        notification_type="revocable",
        vote_result="accept",
    )
    with pytest.raises(ProtocolError):
        monitor.handle(ADDRESS, vote)
    monitor.handle(ADDRESS, make_init())
    monitor.handle(ADDRESS, vote)
    assert recorder.actions == [vote]


def test_a_stalled_loop_does_not_burst_challenges(
    monitor: HeartbeatMonitor, recorder: Recorder, clock: ManualClock
) -> None:
    monitor.handle(ADDRESS, make_init())
    clock.now += 10.0  # the loop was blocked for 10 intervals
    clock.advance(0.0)
    assert recorder.challenges == 2


def test_a_guest_registered_before_must_register_again_in_time(
    monitor: HeartbeatMonitor, recorder: Recorder, clock: ManualClock
) -> None:
    monitor.expect_registration(30.0)
    clock.advance(29.0)
    assert monitor.state is HeartbeatState.WAITING_FOR_INIT
    clock.advance(2.0)  # it hung while no agent watched it
    assert states(recorder) == [("waiting_for_init", "failed", "missed")]
    assert recorder.transitions[-1].is_fault
    monitor.handle(ADDRESS, make_init())  # it comes back
    assert states(recorder)[-1] == ("failed", "healthy", "registered")
    assert recorder.transitions[-1].clears_fault


def test_a_guest_that_registers_again_in_time_is_no_fault(
    monitor: HeartbeatMonitor, recorder: Recorder, clock: ManualClock
) -> None:
    monitor.expect_registration(30.0)
    clock.advance(1.0)
    monitor.handle(ADDRESS, make_init())
    for _ in range(60):  # past the 30 s: the registration cancelled the deadline
        monitor.handle(ADDRESS, answer(recorder))
        clock.advance(1.0)
    assert [t.reason for t in recorder.transitions].count(TransitionReason.MISSED) == 0
    assert monitor.state is HeartbeatState.HEALTHY
