"""Guest heartbeat end to end: real QEMU guests running vmha-guest, one node agent process,
a real local HTTP server as the OPNFV Doctor inspector.

The tests run in order against one pair of guests (booting under TCG is the slow part):
registration, a hang and its recovery, an unhealthy check, a daemon restart, and last a
killed QEMU. Throughout, the guest that is not being tested must see no miss and no fault.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pytest
import pytest_asyncio

from vmha_testbed.agentproc import AgentProcess
from vmha_testbed.guestimage import GuestImage
from vmha_testbed.inspector import InspectorServer
from vmha_testbed.qemu import GuestVM, boot_guests

INTERVAL_S = 1.0
MISSED_THRESHOLD = 3
# A hang is detected at most interval * (threshold + 1) after it began (docs/node-agent.md).
# The margin covers scheduling on a loaded 2-core machine running two TCG guests.
DETECTION_BOUND_S = INTERVAL_S * (MISSED_THRESHOLD + 1)
MARGIN_S = 1.5
NAMESPACE = "e2e"
HEALTH_FLAG = "/var/lib/vmha-test/healthy"

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(900),
]


def guest_config(name: str) -> str:
    return f"""
[heartbeat]
name = "{name}"
interval_ms = {int(INTERVAL_S * 1000)}
corrective_action = "log"

[[checks]]
name = "app-ready"
type = "file"
path = "{HEALTH_FLAG}"
interval_ms = 300
timeout_ms = 500
"""


@dataclass
class Bench:
    a: GuestVM
    b: GuestVM
    agent: AgentProcess
    inspector: InspectorServer

    # The agent's blocking calls, off the event loop (the inspector serves on it).

    async def metric(self, name: str, **labels: str) -> float | None:
        return await asyncio.to_thread(self.agent.metric, name, **labels)

    async def state(self, vm: str) -> str | None:
        return await asyncio.to_thread(self.agent.state, vm, NAMESPACE)

    async def wait_state(self, vm: str, state: str, timeout: float) -> None:
        await asyncio.to_thread(self.agent.wait_state, vm, state, timeout, NAMESPACE)

    async def counters(self, vm: str) -> tuple[float, float]:
        """(missed challenges, faults) of one VM so far."""
        missed = await self.metric("vmha_heartbeat_missed_total", vm=vm) or 0.0
        faults = 0.0
        for name, labels, value in await asyncio.to_thread(self.agent.samples):
            if name == "vmha_heartbeat_faults_total" and labels.get("vm") == vm:
                faults += value
        return missed, faults

    def doctor_events(self, vm: str, status: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.inspector.events
            if e["details"]["vm"] == vm and e["details"]["status"] == status
        ]

    async def next_doctor(self, vm: str, status: str, timeout: float) -> dict[str, Any]:
        """The next report with this status for this VM (after those already received)."""
        seen = len(self.doctor_events(vm, status))
        async with asyncio.timeout(timeout):
            while len(self.doctor_events(vm, status)) == seen:
                await asyncio.sleep(0.05)
        return self.doctor_events(vm, status)[seen]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def bench(
    guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Bench]:
    workdir = tmp_path_factory.mktemp("heartbeat-e2e")
    a, b = await asyncio.to_thread(
        boot_guests,
        guest_image,
        workdir / "guests",
        [guest_config("guest-a"), guest_config("guest-b")],
        names=["guest-a", "guest-b"],
        files={HEALTH_FLAG: ""},
    )
    inspector = InspectorServer(token="e2e-token")
    await inspector.start()
    agent = AgentProcess(
        workdir / "agent" / "agent.log",
        {
            "node_name": "e2e-node",
            "heartbeat": {"min_interval_ms": 100, "missed_threshold": MISSED_THRESHOLD},
            "doctor": {"url": inspector.url, "token": "e2e-token", "retry_initial_s": 0.2},
            "vms": [
                {"name": vm.name, "namespace": NAMESPACE, "socket": str(vm.channel_socket)}
                for vm in (a, b)
            ],
        },
    )
    await asyncio.to_thread(agent.start)
    try:
        yield Bench(a, b, agent, inspector)
    finally:
        assert await asyncio.to_thread(agent.stop) == 0  # SIGTERM is a clean stop
        await inspector.stop()
        for vm in (a, b):
            await asyncio.to_thread(vm.close)


def event_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()


async def test_guests_register_and_heartbeat_without_a_miss(bench: Bench) -> None:
    # The daemon starts a few seconds after the boot marker (Python under TCG).
    for vm in ("guest-a", "guest-b"):
        await bench.wait_state(vm, "healthy", timeout=120)
    before = await bench.metric("vmha_heartbeat_challenges_total", vm="guest-a") or 0
    await asyncio.sleep(INTERVAL_S * 8)
    after = await bench.metric("vmha_heartbeat_challenges_total", vm="guest-a") or 0
    assert after - before >= 7
    for vm in ("guest-a", "guest-b"):
        assert await bench.counters(vm) == (0, 0)
        healthy = await bench.metric("vmha_heartbeat_responses_total", vm=vm, health="healthy")
        assert healthy is not None and healthy >= 7
    assert bench.inspector.events == []


async def test_hang_is_detected_in_bound_and_reported_to_doctor(bench: Bench) -> None:
    b_before = await bench.counters("guest-b")
    hung_at = time.time()
    reported = asyncio.create_task(bench.next_doctor("guest-a", "down", DETECTION_BOUND_S + 30))
    await asyncio.to_thread(bench.a.pause)  # SIGSTOP of the QEMU process
    down = await reported
    arrived_at = time.time()
    detected_after = event_time(down) - hung_at
    assert detected_after <= DETECTION_BOUND_S + MARGIN_S, detected_after
    assert arrived_at - hung_at <= DETECTION_BOUND_S + MARGIN_S + 2.0
    assert down["type"] == "vmha.guest.heartbeat"
    assert down["details"]["hostname"] == "e2e-node"
    assert down["details"]["reason"] == "missed"
    assert down["details"]["namespace"] == NAMESPACE
    assert await bench.state("guest-a") == "failed"
    assert await bench.counters("guest-b") == b_before


async def test_sigcont_recovers(bench: Bench) -> None:
    b_before = await bench.counters("guest-b")
    downs = len(bench.doctor_events("guest-a", "down"))
    recovered = asyncio.create_task(bench.next_doctor("guest-a", "up", timeout=30))
    await asyncio.to_thread(bench.a.resume)
    up = await recovered
    down = bench.doctor_events("guest-a", "down")[-1]
    assert up["details"]["monitor_event_id"] == down["details"]["monitor_event_id"]
    await bench.wait_state("guest-a", "healthy", timeout=10)
    await asyncio.sleep(INTERVAL_S * 3)
    # No echo of the pause: the guest's clock jumped, but its checks did not call that a fault.
    assert len(bench.doctor_events("guest-a", "down")) == downs
    assert await bench.state("guest-a") == "healthy"
    assert await bench.counters("guest-b") == b_before


async def test_failing_health_check_makes_the_guest_unhealthy(bench: Bench) -> None:
    b_before = await bench.counters("guest-b")
    reported = asyncio.create_task(bench.next_doctor("guest-a", "down", timeout=30))
    await bench.a.check_async(f"rm {HEALTH_FLAG}")
    down = await reported
    assert down["details"]["reason"] == "unhealthy"
    assert "app-ready" in down["details"]["message"]  # the guest names the failing check
    assert await bench.state("guest-a") == "unhealthy"
    recovered = asyncio.create_task(bench.next_doctor("guest-a", "up", timeout=30))
    await bench.a.check_async(f"touch {HEALTH_FLAG}")
    await recovered
    await bench.wait_state("guest-a", "healthy", timeout=10)
    assert await bench.counters("guest-b") == b_before


async def test_restarted_guest_daemon_registers_again(bench: Bench) -> None:
    b_before = await bench.counters("guest-b")
    a_before = await bench.counters("guest-a")
    registrations = sum(t["reason"] == "registered" for t in bench.agent.transitions("guest-a"))
    await bench.a.check_async("/etc/init.d/vmha-guest restart", timeout=120)
    async with asyncio.timeout(120):
        while sum(t["reason"] == "registered" for t in bench.agent.transitions("guest-a")) == (
            registrations
        ):
            await asyncio.sleep(0.2)
    reasons = [t["reason"] for t in bench.agent.transitions("guest-a")]
    assert "deregistered" in reasons[-2:]  # the daemon said `exit` on SIGTERM: not a fault
    await bench.wait_state("guest-a", "healthy", timeout=30)
    assert await bench.counters("guest-a") == a_before
    assert await bench.counters("guest-b") == b_before


async def test_killed_qemu_is_a_fault_and_the_other_guest_carries_on(bench: Bench) -> None:
    a_before = await bench.counters("guest-a")
    killed_at = time.time()
    reported = asyncio.create_task(bench.next_doctor("guest-b", "down", DETECTION_BOUND_S + 30))
    await asyncio.to_thread(bench.b.kill)
    down = await reported
    assert event_time(down) - killed_at <= DETECTION_BOUND_S + MARGIN_S
    assert await bench.state("guest-b") == "failed"
    assert await bench.metric("vmha_channel_connected", vm="guest-b") == 0
    await asyncio.sleep(INTERVAL_S * 3)
    assert await bench.state("guest-a") == "healthy"
    assert await bench.counters("guest-a") == a_before
