"""What heartbeat news is worth as Kubernetes Events and annotations, and how repeats
aggregate into a series instead of a storm."""

from __future__ import annotations

import dataclasses
import json

import pytest

from vmha_node_agent.annotations import (
    annotation_value,
    parse_annotation,
    reregister_within_s,
    same_state,
)
from vmha_node_agent.events import MISSED, is_reattach, transition_event
from vmha_node_agent.eventseries import EventKey, SeriesBook
from vmha_node_agent.heartbeat import HeartbeatState, Registration, Transition, TransitionReason

S = HeartbeatState
R = TransitionReason
KEY = EventKey("ns", "vm-1", "uid-1", "Warning", "HeartbeatMissed", "Heartbeat", "note")
OTHER = EventKey("ns", "vm-2", "uid-2", "Warning", "HeartbeatMissed", "Heartbeat", "note")


def change(previous: S, current: S, reason: R, detail: str = "d") -> Transition:
    return Transition(previous, current, reason, detail, 1_767_225_600.25, None)


# --- series -----------------------------------------------------------------------------------


def test_the_first_occurrence_makes_an_event_and_repeats_only_count() -> None:
    book = SeriesBook(window_s=600, update_interval_s=10, max_entries=100)
    assert book.observe(KEY, 0.0)
    assert not book.observe(KEY, 1.0)
    assert not book.observe(KEY, 2.0)
    series = book.get(KEY)
    assert series is not None
    assert (series.count, series.first_seen, series.last_seen) == (3, 0.0, 2.0)
    assert book.due(2.0) == []  # not created yet: the create will carry the count


def test_a_created_event_gets_its_series_updated_at_most_once_per_interval() -> None:
    book = SeriesBook(window_s=600, update_interval_s=10, max_entries=100)
    book.observe(KEY, 0.0)
    book.written(KEY, "vm-1.abc", 1, 0.0)
    assert book.due(0.0) == []  # nothing new
    for t in range(1, 30):
        book.observe(KEY, float(t))
    assert book.due(9.0) == []  # news, but the last write is too recent
    assert book.due(10.0) == [KEY]
    assert book.next_due() == 10.0
    book.written(KEY, "vm-1.abc", 30, 29.0)
    assert book.due(30.0) == []  # up to date
    book.observe(KEY, 31.0)
    assert book.due(38.0) == []
    assert book.due(38.0, flush=True) == [KEY]  # at shutdown, whatever the age
    assert book.due(39.0) == [KEY]


def test_a_repeat_after_a_quiet_window_starts_a_new_event() -> None:
    book = SeriesBook(window_s=60, update_interval_s=10, max_entries=100)
    book.observe(KEY, 0.0)
    book.written(KEY, "vm-1.abc", 1, 0.0)
    assert not book.observe(KEY, 60.0)
    assert book.observe(KEY, 121.0)  # more than a window after the last one
    series = book.get(KEY)
    assert series is not None
    assert (series.count, series.name) == (1, None)


def test_an_expired_event_is_created_again_with_the_whole_count() -> None:
    book = SeriesBook(window_s=600, update_interval_s=0, max_entries=100)
    book.observe(KEY, 0.0)
    book.written(KEY, "vm-1.abc", 1, 0.0)
    book.observe(KEY, 1.0)
    book.lost(KEY)
    series = book.get(KEY)
    assert series is not None
    assert (series.name, series.written_count, series.count) == (None, 0, 2)
    assert book.due(5.0) == []  # a create, not an update, is what it needs


def test_the_book_forgets_the_least_recently_seen_beyond_its_size() -> None:
    book = SeriesBook(window_s=600, update_interval_s=0, max_entries=2)
    keys = [EventKey("ns", f"vm-{i}", f"u{i}", "Warning", "R", "A", "n") for i in range(3)]
    book.observe(keys[0], 0.0)
    book.observe(keys[1], 1.0)
    book.observe(keys[0], 2.0)  # seen again: the most recent
    book.observe(keys[2], 3.0)
    assert book.get(keys[1]) is None
    assert book.get(keys[0]) is not None
    assert len(book) == 2


def test_different_objects_or_notes_are_different_events() -> None:
    book = SeriesBook(window_s=600, update_interval_s=0, max_entries=100)
    assert book.observe(KEY, 0.0)
    assert book.observe(OTHER, 0.0)
    assert not book.observe(dataclasses.replace(KEY), 0.0)  # equal: the same Event
    assert book.observe(dataclasses.replace(KEY, note="other"), 0.0)
    assert book.observe(dataclasses.replace(KEY, regarding_uid="a new VMI"), 0.0)


# --- which transitions are Events -------------------------------------------------------------


@pytest.mark.parametrize(
    ("transition", "type_", "reason"),
    [
        (change(S.WAITING_FOR_INIT, S.HEALTHY, R.REGISTERED), "Normal", "HeartbeatRegistered"),
        (change(S.HEALTHY, S.FAILED, R.MISSED), "Warning", "HeartbeatFailed"),
        (change(S.HEALTHY, S.UNHEALTHY, R.UNHEALTHY), "Warning", "HeartbeatUnhealthy"),
        (change(S.UNHEALTHY, S.FAILED, R.MISSED), "Warning", "HeartbeatFailed"),
        (change(S.FAILED, S.HEALTHY, R.RECOVERED), "Normal", "HeartbeatRecovered"),
        (change(S.FAILED, S.HEALTHY, R.REGISTERED), "Normal", "HeartbeatRegistered"),
        (change(S.HEALTHY, S.DEREGISTERED, R.DEREGISTERED), "Normal", "HeartbeatDeregistered"),
    ],
)
def test_each_transition_has_its_event(transition: Transition, type_: str, reason: str) -> None:
    spec = transition_event(transition)
    assert spec is not None
    assert (spec.type, spec.reason, spec.action) == (type_, reason, "Heartbeat")
    assert spec.note.endswith(": d")


def test_leaving_the_node_is_silent_and_a_miss_is_a_warning_of_its_own() -> None:
    assert transition_event(change(S.FAILED, S.DEREGISTERED, R.REMOVED)) is None
    assert (MISSED.type, MISSED.reason) == ("Warning", "HeartbeatMissed")


def test_a_registration_after_an_agent_restart_is_recognised() -> None:
    again = change(S.WAITING_FOR_INIT, S.HEALTHY, R.REGISTERED)
    healthy_here = {"state": "healthy", "node": "node-a"}
    assert is_reattach(again, healthy_here, "node-a")
    assert not is_reattach(again, {"state": "healthy", "node": "node-b"}, "node-a")  # moved
    assert not is_reattach(again, {"state": "failed", "node": "node-a"}, "node-a")
    assert not is_reattach(again, None, "node-a")
    restarted_daemon = change(S.DEREGISTERED, S.HEALTHY, R.REGISTERED)
    assert not is_reattach(restarted_daemon, healthy_here, "node-a")


# --- the annotation ---------------------------------------------------------------------------


def test_the_annotation_carries_state_reason_since_and_node() -> None:
    value = annotation_value(change(S.HEALTHY, S.FAILED, R.MISSED, "x" * 500), "node-a")
    assert value["state"] == "failed"
    assert value["reason"] == "missed"
    assert value["since"] == "2026-01-01T00:00:00Z"
    assert value["node"] == "node-a"
    assert len(value["detail"]) == 256


def test_the_annotation_tells_the_next_agent_how_soon_to_expect_a_registration() -> None:
    registration = Registration(
        address="vmha.heartbeat", invocation_id=1, name="app", requested_interval_ms=5000,
        interval_ms=5000, corrective_action="log", vote_secs=0, shutdown_notice_secs=0,
        suspend_notice_secs=0, resume_notice_secs=0, restart_secs=0,
    )  # fmt: skip
    registered = Transition(S.WAITING_FOR_INIT, S.HEALTHY, R.REGISTERED, "", 0.0, registration)
    value = annotation_value(registered, "node-a")
    assert value["interval_ms"] == "5000"

    def vmi(shown: dict[str, str] | str) -> dict[str, object]:
        raw = shown if isinstance(shown, str) else json.dumps(shown)
        return {"metadata": {"annotations": {"vmha.io/heartbeat": raw}}}

    assert reregister_within_s(vmi(value), grace_s=30) == 60  # 12 intervals of 5 s
    assert reregister_within_s(vmi(value | {"interval_ms": "100"}), grace_s=30) == 30
    assert reregister_within_s(vmi("failed"), grace_s=30) == 30  # was registered: hung
    for never in ("waiting_for_init", "deregistered"):
        assert reregister_within_s(vmi({"state": never}), grace_s=30) is None
    assert reregister_within_s({"metadata": {}}, grace_s=30) is None


def test_the_annotation_is_read_back_as_json_or_a_bare_state() -> None:
    def vmi(raw: str) -> dict[str, object]:
        return {"metadata": {"annotations": {"vmha.io/heartbeat": raw}}}

    assert parse_annotation(vmi(json.dumps({"state": "healthy", "node": "n"}))) == {
        "state": "healthy",
        "node": "n",
    }
    assert parse_annotation(vmi("unhealthy")) == {"state": "unhealthy"}
    assert parse_annotation({"metadata": {}}) is None
    assert parse_annotation(None) is None


def test_only_a_change_of_state_or_node_needs_a_write() -> None:
    wanted = {"state": "healthy", "node": "node-a", "since": "later", "reason": "registered"}
    shown = {"state": "healthy", "node": "node-a", "since": "earlier", "reason": "recovered"}
    assert same_state(shown, wanted)
    assert not same_state({**shown, "node": "node-b"}, wanted)
    assert not same_state({**shown, "state": "failed"}, wanted)
    assert not same_state(None, wanted)
