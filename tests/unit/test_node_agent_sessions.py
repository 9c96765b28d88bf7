"""The node agent against simulated guests on real unix sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest

from vmha_node_agent.agent import NodeAgent
from vmha_node_agent.config import AgentConfig
from vmha_node_agent.heartbeat import HeartbeatState
from vmha_node_agent.inventory import VMAdded, VMRef, VMRemoved
from vmha_protocol import encode_frame
from vmha_protocol.heartbeat import Challenge, HeartbeatNack, InitAck
from vmha_protocol.limits import MAX_FRAME_BYTES
from vmha_protocol.nack import NackReason, nack_reason
from vmha_protocol.server_group import ServerGroupNack
from vmha_testbed.promtext import metric_value
from vmha_testbed.simguest import Behaviour, SimulatedGuest, acked
from vmha_testbed.vmsource import QueueSource

pytestmark = pytest.mark.timeout(60)
INTERVAL_MS = 100


def agent_config(**overrides: object) -> AgentConfig:
    base: dict[str, object] = {
        "node_name": "node-a",
        "heartbeat": {"min_interval_ms": 50, "missed_threshold": 3},
        "channel": {"reconnect_initial_s": 0.05, "reconnect_max_s": 0.2},
        "metrics": {"port": 0},
    }
    return AgentConfig.model_validate(base | overrides)


class Harness:
    def __init__(self, tmp: Path, config: AgentConfig) -> None:
        self.tmp = tmp
        self.source = QueueSource()
        self.agent = NodeAgent(config, [self.source])
        self.guests: dict[str, SimulatedGuest] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self.agent.run())
        await wait_until(lambda: self.agent.metrics_port is not None)

    async def add_guest(self, name: str, **kwargs: object) -> SimulatedGuest:
        guest = SimulatedGuest(
            self.tmp / f"{name}.sock",
            name=name,
            interval_ms=INTERVAL_MS,
            **kwargs,  # type: ignore[arg-type]
        )
        await guest.start()
        self.guests[name] = guest
        await self.source.queue.put(VMAdded(self.vm(name)))
        return guest

    def vm(self, name: str) -> VMRef:
        return VMRef(
            namespace="ns", name=name, socket_path=self.tmp / f"{name}.sock", uid=f"uid-{name}"
        )

    def state(self, name: str) -> HeartbeatState | None:
        session = self.agent.sessions.get(("ns", name))
        return session.state if session else None

    async def scrape(self) -> str:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{self.agent.metrics_port}/metrics"
            async with http.get(url) as response:
                return await response.text()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for guest in self.guests.values():
            await guest.close()


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path, agent_config())
    await h.start()
    yield h
    await h.stop()


async def test_guests_register_and_are_challenged_every_interval(harness: Harness) -> None:
    a = await harness.add_guest("a")
    b = await harness.add_guest("b", address="cgcs.heartbeat")
    await a.wait_for(acked)
    await b.wait_for(acked)
    await a.wait_for(lambda g: g.count(Challenge) >= 10)
    assert harness.state("a") is HeartbeatState.HEALTHY
    assert harness.agent.sessions[("ns", "a")].heartbeat.missed == 0
    assert b.errors == []  # replies came on cgcs.heartbeat, decodable by an original guest
    text = await harness.scrape()
    assert metric_value(text, "vmha_heartbeat_state", vm="a", state="healthy") == 1.0
    assert metric_value(text, "vmha_heartbeat_state", vm="a", state="failed") == 0.0
    assert (metric_value(text, "vmha_heartbeat_challenges_total", vm="a") or 0) >= 10
    assert (
        metric_value(text, "vmha_heartbeat_responses_total", vm="a", health="healthy") or 0
    ) >= 9
    assert metric_value(text, "vmha_heartbeat_rtt_seconds_count", vm="a") is not None
    assert (metric_value(text, "vmha_heartbeat_last_healthy_timestamp_seconds", vm="a") or 0) > 0
    assert metric_value(text, "vmha_channel_connected", vm="b") == 1.0


async def test_hang_is_detected_and_the_other_guest_is_unaffected(harness: Harness) -> None:
    a = await harness.add_guest("a")
    b = await harness.add_guest("b")
    await a.wait_for(acked)
    await b.wait_for(acked)
    a.behaviour = Behaviour.SILENT
    loop = asyncio.get_running_loop()
    hung_at = loop.time()
    await wait_until(lambda: harness.state("a") is HeartbeatState.FAILED)
    detected_after = loop.time() - hung_at
    assert detected_after <= INTERVAL_MS / 1000 * (3 + 1) + 0.5
    assert harness.state("b") is HeartbeatState.HEALTHY
    a.behaviour = Behaviour.HEALTHY
    await wait_until(lambda: harness.state("a") is HeartbeatState.HEALTHY)
    text = await harness.scrape()
    assert metric_value(text, "vmha_heartbeat_faults_total", vm="a", reason="missed") == 1.0
    assert metric_value(text, "vmha_heartbeat_faults_total", vm="b", reason="missed") is None
    assert (metric_value(text, "vmha_heartbeat_missed_total", vm="a") or 0) >= 3


async def test_unhealthy_guest_is_a_fault_until_healthy(harness: Harness) -> None:
    a = await harness.add_guest("a")
    await a.wait_for(acked)
    a.behaviour, a.log_msg = Behaviour.UNHEALTHY, "check db failed"
    await wait_until(lambda: harness.state("a") is HeartbeatState.UNHEALTHY)
    a.behaviour = Behaviour.HEALTHY
    await wait_until(lambda: harness.state("a") is HeartbeatState.HEALTHY)
    text = await harness.scrape()
    assert metric_value(text, "vmha_heartbeat_faults_total", vm="a", reason="unhealthy") == 1.0


async def test_crashed_channel_is_a_fault_and_a_restarted_guest_registers_again(
    harness: Harness,
) -> None:
    a = await harness.add_guest("a")
    await a.wait_for(acked)
    first = a.invocation_id
    await a.close()  # QEMU gone: the socket disappears
    await wait_until(lambda: harness.state("a") is HeartbeatState.FAILED)
    await a.start()  # a new QEMU on the same path; the agent reconnects and it registers
    await a.wait_for(lambda g: g.invocation_id != first and acked(g))
    await wait_until(lambda: harness.state("a") is HeartbeatState.HEALTHY)
    assert harness.agent.sessions[("ns", "a")].channel.connects == 2


async def test_exit_deregisters_without_a_fault(harness: Harness) -> None:
    a = await harness.add_guest("a")
    await a.wait_for(acked)
    a.send_exit()
    await wait_until(lambda: harness.state("a") is HeartbeatState.DEREGISTERED)
    challenges = a.count(Challenge)
    await asyncio.sleep(0.5)
    assert a.count(Challenge) == challenges
    text = await harness.scrape()
    assert metric_value(text, "vmha_heartbeat_faults_total", vm="a", reason="missed") is None


async def test_hostile_input_is_counted_nacked_and_harmless(harness: Harness) -> None:
    a = await harness.add_guest("a")
    b = await harness.add_guest("b")
    await a.wait_for(acked)
    a.send_raw(b"\x00\xffnot json at all\n")
    a.send_raw(b'{"version":1,"dest_addr":"vmha.heartbeat","data":{"msg_type":"init"}}\n')
    a.send_raw(b"x" * (MAX_FRAME_BYTES * 3) + b"\n")
    a.send_raw(
        encode_frame(
            {
                "version": 1,
                "dest_addr": "vmha.server_group",
                "data": {"version": 1, "msg_type": "status_query", "seq": 1},
            }
        )
    )
    await a.wait_for(lambda g: g.count(HeartbeatNack) >= 1 and g.count(ServerGroupNack) >= 1)
    text = await harness.scrape()
    assert metric_value(text, "vmha_guest_frames_total", vm="a", result="garbage") == 1.0
    assert metric_value(text, "vmha_guest_frames_total", vm="a", result="oversize") == 1.0
    # The init without its fields is invalid; the status query is a valid frame, refused
    # by the messenger (this VM is in no group) and counted there.
    assert metric_value(text, "vmha_guest_frames_total", vm="a", result="invalid") == 1.0
    [refusal] = [m for m in a.received if isinstance(m, ServerGroupNack)]
    assert refusal.orig_msg_type == "status_query"
    assert nack_reason(refusal.log_msg) is NackReason.MESSAGING_DISABLED
    [heartbeat_refusal] = [m for m in a.received if isinstance(m, HeartbeatNack)]
    assert nack_reason(heartbeat_refusal.log_msg) is NackReason.INVALID
    assert (
        metric_value(
            text,
            "vmha_messaging_guest_messages_total",
            type="status_query",
            result="messaging_disabled",
        )
        == 1.0
    )
    # A flood: the guest's own budget drops it; the agent and the other guest carry on.
    a.send_raw(encode_frame({"version": 1, "dest_addr": "vmha.heartbeat", "data": {}}) * 2000)
    stats = harness.agent.sessions[("ns", "a")].stats
    await wait_until(lambda: stats.frames["rate_limited"] > 0)
    assert harness.state("b") is HeartbeatState.HEALTHY
    await b.wait_for(lambda g: g.count(Challenge) >= 5)


async def test_vm_removed_ends_session_and_its_series(harness: Harness) -> None:
    a = await harness.add_guest("a")
    await harness.add_guest("b")
    await a.wait_for(acked)
    await harness.source.queue.put(VMRemoved(("ns", "a")))
    await wait_until(lambda: ("ns", "a") not in harness.agent.sessions)
    await a.wait_for(lambda g: not g.connected)
    text = await harness.scrape()
    assert 'vm="a"' not in text
    assert 'vm="b"' in text


async def test_init_ack_reaches_a_guest_that_registers_late(harness: Harness) -> None:
    a = await harness.add_guest("a", register=False)
    await wait_until(lambda: a.connected)
    await asyncio.sleep(0.3)
    assert harness.state("a") is HeartbeatState.WAITING_FOR_INIT
    assert a.count(Challenge) == 0  # nobody registered: nothing to challenge, no fault
    a.send_init()
    await a.wait_for(lambda g: g.count(InitAck) == 1)
    await wait_until(lambda: harness.state("a") is HeartbeatState.HEALTHY)
