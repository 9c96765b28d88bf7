"""Reports to a real local Doctor inspector endpoint: format, order, retries, bounds."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from vmha_node_agent.config import DoctorConfig
from vmha_node_agent.doctor import DoctorReporter
from vmha_node_agent.heartbeat import (
    HeartbeatState,
    Registration,
    Transition,
    TransitionReason,
)
from vmha_node_agent.inventory import VMRef
from vmha_node_agent.metrics import AgentMetrics
from vmha_testbed.inspector import InspectorServer

pytestmark = pytest.mark.timeout(60)
VM = VMRef(namespace="ns", name="vm-1", socket_path=__import__("pathlib").Path("/x"), uid="u-1")
REGISTRATION = Registration(
    address="vmha.heartbeat",
    invocation_id=1,
    name="app",
    requested_interval_ms=1000,
    interval_ms=1000,
    corrective_action="reboot",
    vote_secs=0,
    shutdown_notice_secs=0,
    suspend_notice_secs=0,
    resume_notice_secs=0,
    restart_secs=0,
)
S = HeartbeatState
R = TransitionReason


def change(previous: S, current: S, reason: R, detail: str = "") -> Transition:
    return Transition(previous, current, reason, detail, 1_700_000_000.5, REGISTRATION)


@pytest.fixture
async def inspector() -> AsyncIterator[InspectorServer]:
    server = InspectorServer(token="s3cret")
    await server.start()
    yield server
    await server.stop()


@contextlib.asynccontextmanager
async def running(reporter: DoctorReporter) -> AsyncIterator[None]:
    task = asyncio.create_task(reporter.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def reporter_for(url: str, **kwargs: object) -> tuple[DoctorReporter, AgentMetrics]:
    metrics = AgentMetrics()
    config = DoctorConfig.model_validate(
        {"url": url, "token": "s3cret", "retry_initial_s": 0.05, "retry_max_s": 0.2} | kwargs
    )
    return DoctorReporter(config, "node-a", metrics), metrics


async def test_fault_and_recovery_are_reported_as_a_pair(inspector: InspectorServer) -> None:
    reporter, _ = reporter_for(inspector.url)
    async with running(reporter):
        reporter.report(VM, change(S.WAITING_FOR_INIT, S.HEALTHY, R.REGISTERED))  # not a fault
        reporter.report(VM, change(S.HEALTHY, S.FAILED, R.MISSED, "3 consecutive"))
        reporter.report(VM, change(S.FAILED, S.HEALTHY, R.RECOVERED))
        down, up = await inspector.wait_for_events(2)
    assert down["type"] == "vmha.guest.heartbeat"
    assert down["time"] == "2023-11-14T22:13:20.500Z"
    assert {k: down["details"][k] for k in ("hostname", "status", "monitor")} == {
        "hostname": "node-a",
        "status": "down",
        "monitor": "vmha-node-agent",
    }
    assert down["details"]["namespace"] == "ns" and down["details"]["vm"] == "vm-1"
    assert down["details"]["instance_id"] == "u-1"
    assert down["details"]["reason"] == "missed"
    assert down["details"]["corrective_action"] == "reboot"
    assert up["details"]["status"] == "up"
    assert up["details"]["monitor_event_id"] == down["details"]["monitor_event_id"]
    assert down["id"] != up["id"]


async def test_reports_wait_for_the_inspector_and_arrive_in_order(
    inspector: InspectorServer,
) -> None:
    reporter, metrics = reporter_for(inspector.url, batch_size=3)
    inspector.fail_with = 503
    async with running(reporter):
        for i in range(10):
            state = S.FAILED if i % 2 == 0 else S.HEALTHY
            reason = R.MISSED if i % 2 == 0 else R.RECOVERED
            previous = S.HEALTHY if i % 2 == 0 else S.FAILED
            reporter.report(VM, change(previous, state, reason, detail=str(i)))
        await asyncio.sleep(0.5)
        assert inspector.events == []
        assert reporter.queued == 10
        inspector.fail_with = None
        events = await inspector.wait_for_events(10)
        async with asyncio.timeout(5):
            while reporter.queued:  # the last answer may still be on its way back
                await asyncio.sleep(0.01)
    assert [e["details"]["message"] for e in events] == [str(i) for i in range(10)]
    assert metrics.doctor_attempts_failed._value.get() >= 2


async def test_queue_overflow_drops_oldest_and_counts(inspector: InspectorServer) -> None:
    reporter, metrics = reporter_for(inspector.url, queue_size=3)
    inspector.fail_with = 503
    async with running(reporter):
        for i in range(5):
            reporter.report(VM, change(S.HEALTHY, S.UNHEALTHY, R.UNHEALTHY, detail=str(i)))
        assert metrics.doctor_dropped._value.get() == 2
        inspector.fail_with = None
        events = await inspector.wait_for_events(3)
    assert [e["details"]["message"] for e in events] == ["2", "3", "4"]


async def test_refused_reports_do_not_block_the_queue(inspector: InspectorServer) -> None:
    reporter, metrics = reporter_for(inspector.url, token="wrong")
    async with running(reporter):
        reporter.report(VM, change(S.HEALTHY, S.FAILED, R.MISSED))
        await asyncio.sleep(0.3)
        assert reporter.queued == 0
    assert metrics.doctor_reports.labels("rejected")._value.get() == 1


async def test_unreachable_inspector_is_retried_then_drained_at_shutdown(
    inspector: InspectorServer,
) -> None:
    port = inspector.port
    await inspector.stop()
    reporter, _ = reporter_for(f"http://127.0.0.1:{port}")
    async with running(reporter):
        reporter.report(VM, change(S.HEALTHY, S.FAILED, R.MISSED))
        await asyncio.sleep(0.3)
    assert reporter.queued == 1
    restarted = InspectorServer(token="s3cret", port=port)
    await restarted.start()
    try:
        await reporter.drain(timeout_s=5)
        assert len(restarted.events) == 1
    finally:
        await restarted.stop()
