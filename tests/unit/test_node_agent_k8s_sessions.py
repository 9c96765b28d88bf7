"""What the Kubernetes side asks of a running session, against a simulated guest on a real
unix socket: a new policy without a new session, and notice before a corrective action."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from vmha_node_agent.agent import NodeAgent
from vmha_node_agent.config import AgentConfig, HeartbeatPolicy
from vmha_node_agent.inventory import KUBERNETES, VMAdded, VMRef
from vmha_protocol.heartbeat import ActionNotify, ActionResponse
from vmha_testbed.simguest import SimulatedGuest, acked
from vmha_testbed.vmsource import QueueSource

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def running(tmp_path: Path) -> AsyncIterator[tuple[NodeAgent, QueueSource, Path]]:
    config = AgentConfig.model_validate(
        {
            "node_name": "node-a",
            "heartbeat": {"min_interval_ms": 50},
            "channel": {"reconnect_initial_s": 0.05, "reconnect_max_s": 0.2},
            "metrics": {"port": 0},
        }
    )
    source = QueueSource()
    agent = NodeAgent(config, [source])
    task = asyncio.create_task(agent.run())
    yield agent, source, tmp_path
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


async def attach(
    running: tuple[NodeAgent, QueueSource, Path], policy: HeartbeatPolicy | None = None
) -> tuple[SimulatedGuest, VMRef]:
    _, source, tmp = running
    guest = SimulatedGuest(tmp / "vm.sock", name="vm", interval_ms=100)
    await guest.start()
    vm = VMRef("ns", "vm", tmp / "vm.sock", uid="u1", policy=policy, origin=KUBERNETES)
    await source.queue.put(VMAdded(vm))
    await guest.wait_for(acked)
    return guest, vm


async def test_a_new_policy_is_applied_to_the_running_session(
    running: tuple[NodeAgent, QueueSource, Path],
) -> None:
    agent, source, _ = running
    guest, vm = await attach(running, HeartbeatPolicy(min_interval_ms=50))
    session = agent.sessions[vm.key]
    assert session.heartbeat.registration is not None
    assert session.heartbeat.registration.interval_ms == 100
    slower = HeartbeatPolicy(min_interval_ms=500, corrective_action="stop")
    await source.queue.put(VMAdded(VMRef("ns", "vm", vm.socket_path, uid="u1", policy=slower)))
    await until(lambda: session.policy == slower)
    assert agent.sessions[vm.key] is session  # the same session, the same connection
    assert session.heartbeat.registration.interval_ms == 500
    assert session.vm.policy == slower
    assert guest.connections == 1
    await guest.close()


async def test_the_guest_is_given_its_notice_and_may_end_it_early(
    running: tuple[NodeAgent, QueueSource, Path],
) -> None:
    agent, _, _ = running
    guest, vm = await attach(running)
    session = agent.sessions[vm.key]
    giving = asyncio.create_task(session.give_notice("reboot", max_wait_s=60.0))
    await guest.wait_for(lambda g: g.count(ActionNotify) == 1)
    [notice] = [m for m in guest.received if isinstance(m, ActionNotify)]
    assert (notice.event_type, notice.notification_type) == ("reboot", "irrevocable")
    assert notice.timeout_ms == 5000  # the simulated guest's shutdown_notice_secs
    assert not giving.done()
    guest.send(
        ActionResponse(
            invocation_id=guest.invocation_id,
            event_type="reboot",
            notification_type="irrevocable",
            vote_result="complete",
        )
    )
    result = await asyncio.wait_for(giving, 5)
    assert result.sent and result.completed
    assert result.notice_s == 5.0
    assert result.waited_s < 5.0
    await guest.close()


async def test_the_notice_is_capped_and_waited_in_full_without_an_answer(
    running: tuple[NodeAgent, QueueSource, Path],
) -> None:
    agent, _, _ = running
    guest, vm = await attach(running)
    session = agent.sessions[vm.key]
    result = await session.give_notice("stop", max_wait_s=0.3)
    assert result.sent and not result.completed
    assert result.notice_s == 0.3
    assert result.waited_s >= 0.3
    [notice] = [m for m in guest.received if isinstance(m, ActionNotify)]
    assert (notice.event_type, notice.timeout_ms) == ("stop", 300)
    await guest.close()


async def test_no_notice_for_a_guest_that_never_registered(
    running: tuple[NodeAgent, QueueSource, Path],
) -> None:
    agent, source, tmp = running
    guest = SimulatedGuest(tmp / "quiet.sock", name="quiet", register=False)
    await guest.start()
    vm = VMRef("ns", "quiet", tmp / "quiet.sock", uid="u2", origin=KUBERNETES)
    await source.queue.put(VMAdded(vm))
    await until(lambda: guest.connected)
    result = await agent.sessions[vm.key].give_notice("reboot", max_wait_s=60.0)
    assert not result.sent
    assert guest.count(ActionNotify) == 0
    await guest.close()
