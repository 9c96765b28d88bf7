"""A VM's heartbeat policy (agent ← VMGroup ← annotations), who is watched, the corrective
action narrowed by the guest, the action limits, and a policy applied to a running monitor."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from pydantic import BaseModel

from vmha_node_agent.config import HeartbeatPolicy
from vmha_node_agent.corrective import ActionLimiter, narrow
from vmha_node_agent.heartbeat import HeartbeatMonitor, HeartbeatState, Transition
from vmha_node_agent.policy import GroupHeartbeat, effective_policy, wants_heartbeat
from vmha_protocol.heartbeat import (
    ActionNotify,
    ActionResponse,
    Challenge,
    ChallengeResponse,
    CorrectiveAction,
    Init,
)
from vmha_testbed.manualclock import ManualClock

AGENT = HeartbeatPolicy(
    min_interval_ms=100, max_interval_ms=60_000, missed_threshold=3, corrective_action="log"
)


def group(**heartbeat: Any) -> GroupHeartbeat:
    return GroupHeartbeat.from_group({"spec": {"policy": "affinity", "heartbeat": heartbeat}})


# --- merging ----------------------------------------------------------------------------------


def test_without_group_or_annotations_the_agents_policy_applies() -> None:
    result = effective_policy(AGENT, None, {})
    assert result.policy == AGENT
    assert result.problems == ()


def test_the_group_overrides_the_agent_and_annotations_override_the_group() -> None:
    spec = group(minIntervalMs=400, maxIntervalMs=5000, missedThreshold=1, correctiveAction="stop")
    assert effective_policy(AGENT, spec, {}).policy == HeartbeatPolicy(
        min_interval_ms=400, max_interval_ms=5000, missed_threshold=1, corrective_action="stop"
    )
    annotations = {
        "vmha.io/heartbeat-min-interval-ms": "1000",
        "vmha.io/heartbeat-missed-threshold": " 4 ",
        "vmha.io/corrective-action": "reboot",
    }
    result = effective_policy(AGENT, spec, annotations)
    assert result.policy == HeartbeatPolicy(
        min_interval_ms=1000, max_interval_ms=5000, missed_threshold=4, corrective_action="reboot"
    )
    assert result.problems == ()


def test_fields_the_group_leaves_out_keep_the_agents_values() -> None:
    result = effective_policy(AGENT, group(missedThreshold=5), {})
    assert result.policy == AGENT.model_copy(update={"missed_threshold": 5})


@pytest.mark.parametrize(
    ("annotations", "problem"),
    [
        ({"vmha.io/heartbeat-min-interval-ms": "fast"}, "not an integer in 100.."),
        ({"vmha.io/heartbeat-min-interval-ms": "10"}, "not an integer in 100.."),
        ({"vmha.io/heartbeat-missed-threshold": "0"}, "not an integer in 1..100"),
        ({"vmha.io/corrective-action": "explode"}, "is not one of none, reboot, stop, log"),
    ],
)
def test_an_invalid_annotation_is_ignored_and_reported(
    annotations: dict[str, str], problem: str
) -> None:
    spec = group(missedThreshold=2)
    result = effective_policy(AGENT, spec, annotations)
    assert result.policy == effective_policy(AGENT, spec, {}).policy
    [reported] = result.problems
    assert problem in reported


def test_annotations_that_cross_the_groups_bounds_are_ignored_as_a_whole() -> None:
    spec = group(minIntervalMs=400, maxIntervalMs=1000)
    result = effective_policy(
        AGENT,
        spec,
        {"vmha.io/heartbeat-min-interval-ms": "5000", "vmha.io/heartbeat-missed-threshold": "7"},
    )
    assert result.policy == effective_policy(AGENT, spec, {}).policy
    [problem] = result.problems
    assert "ignoring the VM's annotations" in problem
    assert "min_interval_ms is greater than max_interval_ms" in problem


def test_an_unreadable_group_spec_means_no_overrides() -> None:
    broken = GroupHeartbeat.from_group({"spec": {"heartbeat": {"missedThreshold": "many"}}})
    assert effective_policy(AGENT, broken, {}).policy == AGENT


# --- who is watched ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("labels", "annotations", "spec", "watched"),
    [
        ({}, {}, None, False),
        ({"vmha.io/group": "web"}, {}, None, True),  # a group not seen (yet)
        ({"vmha.io/group": "web"}, {}, group(enabled=True), True),
        ({"vmha.io/group": "web"}, {}, group(enabled=False), False),
        ({}, {"vmha.io/heartbeat-enabled": "true"}, None, True),
        (
            {"vmha.io/group": "web"},
            {"vmha.io/heartbeat-enabled": "true"},
            group(enabled=False),
            True,
        ),
        ({"vmha.io/group": "web"}, {"vmha.io/heartbeat-enabled": "False"}, group(), False),
        ({"vmha.io/group": "web"}, {"vmha.io/heartbeat-enabled": "maybe"}, group(), True),
    ],
)
def test_members_and_opted_in_vmis_want_heartbeat(
    labels: dict[str, str],
    annotations: dict[str, str],
    spec: GroupHeartbeat | None,
    watched: bool,
) -> None:
    assert wants_heartbeat(labels, annotations, spec) is watched


# --- narrowing --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("configured", "guest", "taken"),
    [
        ("reboot", "log", "log"),
        ("reboot", "none", "none"),
        ("stop", "log", "log"),
        ("log", "none", "none"),
        ("log", "reboot", "log"),  # a guest cannot ask for more
        ("none", "stop", "none"),
        ("reboot", "stop", "reboot"),  # nor swap one disruptive action for the other
        ("stop", "reboot", "stop"),
        ("reboot", "reboot", "reboot"),
        ("stop", None, "stop"),  # no registration: the configured action
    ],
)
def test_a_guest_may_only_narrow_the_configured_action(
    configured: CorrectiveAction, guest: CorrectiveAction | None, taken: CorrectiveAction
) -> None:
    assert narrow(configured, guest) == taken


# --- limits -----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_one_action_per_vm_per_interval() -> None:
    clock = Clock()
    limiter = ActionLimiter(
        per_vm_interval_s=600, per_node_limit=10, per_node_window_s=60, clock=clock
    )
    assert limiter.take("a") is None
    clock.now += 599
    assert limiter.take("a") == "vm"
    assert limiter.take("b") is None  # other VMs are not held back
    clock.now += 1
    assert limiter.take("a") is None


def test_a_burst_on_the_node_is_capped_within_the_window() -> None:
    clock = Clock()
    limiter = ActionLimiter(
        per_vm_interval_s=0, per_node_limit=2, per_node_window_s=60, clock=clock
    )
    assert [limiter.take(vm) for vm in "abcde"] == [None, None, "node", "node", "node"]
    clock.now += 30
    assert limiter.take("c") == "node"
    clock.now += 30  # the first two leave the window
    assert limiter.take("c") is None
    assert limiter.take("d") is None
    assert limiter.take("e") == "node"


def test_a_refused_action_does_not_use_up_the_budget() -> None:
    clock = Clock()
    limiter = ActionLimiter(
        per_vm_interval_s=100, per_node_limit=2, per_node_window_s=60, clock=clock
    )
    assert limiter.take("a") is None
    assert limiter.take("a") == "vm"
    assert limiter.take("a") == "vm"
    assert limiter.take("b") is None  # the refusals for a took nothing


def test_a_node_limit_of_zero_allows_no_disruptive_action() -> None:
    limiter = ActionLimiter(per_vm_interval_s=0, per_node_limit=0, per_node_window_s=60)
    assert limiter.take("a") == "node"


# --- a new policy for a running session -------------------------------------------------------


@dataclass
class Guest:
    """Records what the monitor sends and sees; answers nothing by itself."""

    sent: list[tuple[float, BaseModel]] = field(default_factory=list)
    transitions: list[Transition] = field(default_factory=list)
    clock: ManualClock = field(default_factory=ManualClock)

    def send(self, address: str, message: BaseModel) -> bool:
        self.sent.append((self.clock.now, message))
        return True

    def challenges(self) -> list[tuple[float, Challenge]]:
        return [(t, m) for t, m in self.sent if isinstance(m, Challenge)]

    def challenge_sent(self) -> None: ...
    def response_received(self, health: str, rtt_s: float) -> None: ...
    def challenge_missed(self, consecutive: int) -> None: ...
    def late_response(self) -> None: ...
    def action_response(self, message: ActionResponse) -> None: ...

    def transition(self, change: Transition) -> None:
        self.transitions.append(change)


def registered_monitor(
    policy: HeartbeatPolicy, interval_ms: int = 200
) -> tuple[HeartbeatMonitor, Guest]:
    guest = Guest()
    monitor = HeartbeatMonitor(policy, guest.send, guest, guest.clock, wall_clock=lambda: 0.0)
    monitor.handle(
        "vmha.heartbeat",
        Init(
            invocation_id=7,
            name="app",
            heartbeat_interval_ms=interval_ms,
            vote_secs=0,
            shutdown_notice_secs=12,
            suspend_notice_secs=3,
            resume_notice_secs=4,
            restart_secs=30,
            corrective_action="reboot",
        ),
    )
    return monitor, guest


def answer_last(monitor: HeartbeatMonitor, guest: Guest) -> None:
    _, challenge = guest.challenges()[-1]
    monitor.handle(
        "vmha.heartbeat",
        ChallengeResponse(
            invocation_id=7,
            heartbeat_response=challenge.heartbeat_challenge,
            heartbeat_health="healthy",
            corrective_action="reboot",
        ),
    )


def test_a_new_minimum_interval_applies_from_the_next_challenge() -> None:
    policy = HeartbeatPolicy(min_interval_ms=100, missed_threshold=3)
    monitor, guest = registered_monitor(policy, interval_ms=200)
    for _ in range(3):
        answer_last(monitor, guest)
        guest.clock.advance(0.2)
    monitor.update_policy(policy.model_copy(update={"min_interval_ms": 1000}))
    assert monitor.registration is not None
    assert monitor.registration.interval_ms == 1000
    assert monitor.registration.requested_interval_ms == 200
    for _ in range(4):
        answer_last(monitor, guest)
        guest.clock.advance(1.0)
    times = [t for t, _ in guest.challenges()]
    gaps = [round(b - a, 3) for a, b in itertools.pairwise(times)]
    # The challenge already scheduled keeps its time; then the new interval.
    assert gaps == [0.2, 0.2, 0.2, 0.2, 1.0, 1.0, 1.0]
    monitor.update_policy(policy)  # back: the guest's own 200 ms again
    assert monitor.registration.interval_ms == 200


def test_a_lower_threshold_makes_the_next_miss_a_fault() -> None:
    policy = HeartbeatPolicy(min_interval_ms=100, missed_threshold=5)
    monitor, guest = registered_monitor(policy, interval_ms=100)
    guest.clock.advance(0.25)  # two misses, far from 5
    assert monitor.state is HeartbeatState.HEALTHY
    monitor.update_policy(policy.model_copy(update={"missed_threshold": 2}))
    guest.clock.advance(0.1)
    assert monitor.state is HeartbeatState.FAILED
    assert guest.transitions[-1].detail == "3 consecutive challenges unanswered"


def test_notify_action_tells_a_registered_guest_with_its_notice() -> None:
    monitor, guest = registered_monitor(HeartbeatPolicy())
    assert monitor.registration is not None
    assert monitor.registration.notice_secs("reboot") == 12  # shutdown notice
    assert monitor.registration.notice_secs("stop") == 12
    assert monitor.registration.notice_secs("pause") == 3
    assert monitor.notify_action("reboot", 12_000)
    _, notice = guest.sent[-1]
    assert isinstance(notice, ActionNotify)
    assert (notice.event_type, notice.notification_type, notice.timeout_ms) == (
        "reboot",
        "irrevocable",
        12_000,
    )
    assert notice.invocation_id == 7


def test_notify_action_needs_a_registration() -> None:
    guest = Guest()
    monitor = HeartbeatMonitor(HeartbeatPolicy(), guest.send, guest, guest.clock)
    assert not monitor.notify_action("stop", 1000)
    assert guest.sent == []
