"""Server group messaging on one node: the agent's sessions and group messenger against
simulated guests on real unix sockets, with the group directory fed VMI updates the way
the VMI watch delivers them (the real watches and the agent-to-agent path run against the
apiserver in tests/integration/test_messaging.py)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from vmha_node_agent.agent import NodeAgent
from vmha_node_agent.config import AgentConfig
from vmha_node_agent.inventory import VMAdded, VMRef
from vmha_node_agent.members import GroupDirectory
from vmha_node_agent.messenger import GroupMessenger
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.peerapi import VoteRequest
from vmha_node_agent.votes import VoteBox
from vmha_node_agent.watch import Changed, Listed
from vmha_protocol.limits import MAX_BROADCAST_BYTES
from vmha_protocol.nack import NackReason, nack_reason
from vmha_protocol.server_group import HostBroadcast, Notification, StatusResponseDone
from vmha_testbed.simguest import SimulatedGuest, acked
from vmha_testbed.vmsource import QueueSource

pytestmark = pytest.mark.timeout(60)
NODE = "node-a"


def vmi(
    name: str, node: str | None = NODE, *, group: str | None = "web", paused: bool = False
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running" if node else "Pending"}
    if node:
        status["nodeName"] = node
    status["conditions"] = [
        {"type": "Ready", "status": "True"},
        {"type": "Paused", "status": "True" if paused else "False"},
    ]
    return {
        "metadata": {
            "name": name,
            "namespace": "ns",
            "uid": f"uid-{name}",
            "labels": {"vmha.io/group": group} if group else {},
        },
        "status": status,
    }


class Node:
    """One agent (no Kubernetes): its directory is fed by hand, its guests are simulated."""

    def __init__(self, tmp: Path, **messaging: Any) -> None:
        self.tmp = tmp
        self.config = AgentConfig.model_validate(
            {
                "node_name": NODE,
                "heartbeat": {"min_interval_ms": 50},
                "channel": {"reconnect_initial_s": 0.05, "reconnect_max_s": 0.2},
                "metrics": {"port": 0},
                "messaging": {"notification_delay_s": 0.1, **messaging},
            }
        )
        self.metrics = AgentMetrics()
        self.directory = GroupDirectory()
        self.source = QueueSource()
        self.agent = NodeAgent(self.config, [self.source], metrics=self.metrics)
        self.messenger = GroupMessenger(
            self.config, self.metrics, self.directory, self.agent.sessions
        )
        self.agent.messenger = self.messenger
        self.guests: dict[str, SimulatedGuest] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self, vmis: list[dict[str, Any]]) -> None:
        self.directory.vmis_changed(Listed(vmis))
        self._task = asyncio.create_task(self.agent.run())

    async def add_guest(self, name: str, **kwargs: Any) -> SimulatedGuest:
        guest = SimulatedGuest(self.tmp / f"{name}.sock", name=name, interval_ms=200, **kwargs)
        await guest.start()
        self.guests[name] = guest
        vm = VMRef("ns", name, self.tmp / f"{name}.sock", uid=f"uid-{name}")
        await self.source.queue.put(VMAdded(vm))
        await guest.wait_for(acked)
        return guest

    def change(self, vmi_body: dict[str, Any], kind: str = "MODIFIED") -> None:
        self.directory.vmis_changed(Changed(kind, vmi_body))  # type: ignore[arg-type]

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for guest in self.guests.values():
            await guest.close()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    n = Node(tmp_path)
    yield n
    await n.stop()


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


def nack_codes(guest: SimulatedGuest) -> list[NackReason | None]:
    return [nack_reason(n.log_msg) for n in guest.nacks()]


# --- status -----------------------------------------------------------------------------------


async def test_status_lists_every_member_the_asker_included_then_done(node: Node) -> None:
    await node.start([vmi("b"), vmi("a"), vmi("c", "node-b", paused=True), vmi("x", group="db")])
    a = await node.add_guest("a")
    seq = a.send_status_query()
    await a.wait_for(lambda g: g.status_done(seq))
    members = a.status(seq)
    assert [m.display_name for m in members] == ["a", "b", "c"]
    assert [m.state for m in members] == ["active", "active", "paused"]
    assert members[2].node == "node-b"
    # The original's chunked form: responses, then done, all with the query's seq.
    answer = [m for m in a.received if getattr(m, "seq", None) == seq]
    assert isinstance(answer[-1], StatusResponseDone)
    assert len(answer) == 4
    assert node.metric("vmha_messaging_guest_messages_total", type="status_query",
                       result="accepted") == 1.0  # fmt: skip


async def test_a_large_group_is_answered_at_the_guests_pace(node: Node) -> None:
    # ~300 members make an answer several times the agent's write buffer (64 KiB).
    names = [f"m{i:03d}" for i in range(300)]
    await node.start([vmi(name) for name in names])
    guest = await node.add_guest("m000")
    members = await guest.query_status(timeout=20)
    assert [m.display_name for m in members] == names


async def test_status_queries_are_rate_limited(node: Node) -> None:
    await node.start([vmi("a")])
    a = await node.add_guest("a")
    for _ in range(40):
        a.send_status_query()
    await eventually(lambda: NackReason.RATE_LIMITED in nack_codes(a))
    done = [m for m in a.received if isinstance(m, StatusResponseDone)]
    assert 1 <= len(done) <= 12  # the burst (10), maybe one refilled; not 40


# --- notifications ----------------------------------------------------------------------------


async def test_a_paused_member_is_notified_to_the_others_here_within_a_second(
    node: Node,
) -> None:
    await node.start([vmi("a"), vmi("b"), vmi("c", "node-b"), vmi("other", group="db")])
    a, b = await node.add_guest("a"), await node.add_guest("b")
    other = await node.add_guest("other")
    started = time.monotonic()
    node.change(vmi("c", "node-b", paused=True))
    await a.wait_for(lambda g: len(g.notifications()) == 1)
    assert time.monotonic() - started < 1.0
    for guest in (a, b):
        await guest.wait_for(lambda g: len(g.notifications()) == 1)
        [notice] = guest.notifications()
        assert (notice.display_name, notice.state, notice.power_state) == ("c", "paused", "paused")
    assert other.notifications() == []  # another group

    # b's own change goes to a, not to b itself.
    node.change(vmi("b", paused=True))
    await a.wait_for(lambda g: len(g.notifications()) == 2)
    await asyncio.sleep(0.3)
    assert [n.display_name for n in b.notifications()] == ["c"]

    node.change(vmi("c", "node-b"), kind="DELETED")
    await a.wait_for(lambda g: len(g.notifications()) == 3)
    assert (a.notifications()[-1].display_name, a.notifications()[-1].state) == ("c", "deleted")
    assert node.metric("vmha_messaging_notifications_total") == 5.0


async def test_a_burst_of_changes_makes_one_notification_with_the_latest_state(
    node: Node,
) -> None:
    await node.start([vmi("a"), vmi("b")])
    a = await node.add_guest("a")
    for paused in (True, False, True):
        node.change(vmi("b", paused=paused))
    await a.wait_for(lambda g: len(g.notifications()) == 1)
    await asyncio.sleep(0.4)
    [notice] = a.notifications()
    assert notice.state == "paused"
    # Changed and changed back within the window: nothing to tell.
    node.change(vmi("b"))
    node.change(vmi("b", paused=True))
    await asyncio.sleep(0.4)
    assert len(a.notifications()) == 1


async def test_notifications_use_the_address_family_the_guest_registered_with(
    node: Node,
) -> None:
    await node.start([vmi("a"), vmi("b")])
    a = await node.add_guest("a", address="cgcs.heartbeat")
    node.change(vmi("b", paused=True))
    await a.wait_for(lambda g: len(g.notifications()) == 1)
    index = next(i for i, m in enumerate(a.received) if isinstance(m, Notification))
    assert a.received_on[index] == "cgcs.server_grp"


# --- broadcast --------------------------------------------------------------------------------


async def test_a_broadcast_reaches_the_other_members_here_with_the_agents_source(
    node: Node,
) -> None:
    await node.start([vmi("a"), vmi("b"), vmi("c"), vmi("d", "node-b"), vmi("x", group="db")])
    a, b, c = [await node.add_guest(name) for name in "abc"]
    x = await node.add_guest("x")
    a.send_broadcast("active is a")
    for guest in (b, c):
        await guest.wait_for(lambda g: len(g.broadcasts()) == 1)
        [copy] = guest.broadcasts()
        assert (copy.source_instance, copy.data) == ("ns/a", "active is a")
    await asyncio.sleep(0.2)
    assert a.broadcasts() == [] and x.broadcasts() == []
    assert a.nacks() == []
    assert node.metric("vmha_messaging_deliveries_total", path="local") == 2.0
    # No agent-to-agent transport here: the copy for d is dropped and counted.
    assert node.metric("vmha_messaging_dropped_total", reason="no_peer_transport") == 1.0


async def test_an_oversize_or_flooding_sender_is_refused_and_the_others_carry_on(
    node: Node,
) -> None:
    await node.start([vmi("a"), vmi("b")])
    a, b = await node.add_guest("a"), await node.add_guest("b")
    a.send_raw(
        b'\n{"version":1,"source_addr":"vmha.server_group","dest_addr":"vmha.server_group",'
        b'"data":{"version":1,"msg_type":"broadcast","data":"' + b"x" * 4000 + b'"}}\n'
    )
    await a.wait_for(lambda g: NackReason.TOO_LARGE in nack_codes(g))
    [too_large] = a.nacks()
    assert too_large.orig_msg_type == "broadcast"
    assert str(MAX_BROADCAST_BYTES) in too_large.log_msg
    a.send_broadcast("x" * MAX_BROADCAST_BYTES)  # the largest legal one passes
    await b.wait_for(lambda g: len(g.broadcasts()) == 1)

    for i in range(60):
        a.send_broadcast(f"flood {i}")
    await eventually(lambda: NackReason.RATE_LIMITED in nack_codes(a))
    await asyncio.sleep(0.3)
    delivered = len(b.broadcasts()) - 1
    assert 15 <= delivered <= 25  # the burst (20, one used above) and what refilled
    assert node.metric("vmha_messaging_guest_messages_total", type="broadcast",
                       result="rate_limited") >= 30  # fmt: skip
    # b is unharmed: it still talks to the group.
    b.send_broadcast("b here")
    await a.wait_for(lambda g: any(c.data == "b here" for c in g.broadcasts()))
    assert NackReason.RATE_LIMITED not in nack_codes(b)


# --- messaging off ----------------------------------------------------------------------------


async def test_messaging_off_or_no_group_is_a_nack_naming_why(node: Node) -> None:
    await node.start([vmi("a"), vmi("loner", group=None)])
    node.directory.groups_changed(
        Listed([{"metadata": {"name": "web", "namespace": "ns"}, "spec": {"messaging": False}}])
    )
    a, loner = await node.add_guest("a"), await node.add_guest("loner")
    a.send_broadcast("hello")
    a.send_status_query()
    loner.send_status_query()
    await a.wait_for(lambda g: len(g.nacks()) == 2)
    await loner.wait_for(lambda g: len(g.nacks()) == 1)
    for nack in a.nacks():
        assert nack_reason(nack.log_msg) is NackReason.MESSAGING_DISABLED
        assert "group web" in nack.log_msg
    assert {n.orig_msg_type for n in a.nacks()} == {"broadcast", "status_query"}
    [refused] = loner.nacks()
    assert nack_reason(refused.log_msg) is NackReason.MESSAGING_DISABLED
    assert "ns/loner is not a member of a server group" in refused.log_msg
    # Also for a message the protocol would refuse anyway: messaging off is the answer.
    a.send_raw(b'\n{"version":1,"dest_addr":"vmha.server_group","data":{"msg_type":"bogus"}}\n')
    await a.wait_for(lambda g: len(g.nacks()) == 3)
    assert nack_reason(a.nacks()[-1].log_msg) is NackReason.MESSAGING_DISABLED


async def test_no_notifications_while_messaging_is_off(node: Node) -> None:
    await node.start([vmi("a"), vmi("b")])
    node.directory.groups_changed(
        Listed([{"metadata": {"name": "web", "namespace": "ns"}, "spec": {"messaging": False}}])
    )
    a = await node.add_guest("a")
    node.change(vmi("b", paused=True))
    await asyncio.sleep(0.4)
    assert a.notifications() == []


# --- votes ------------------------------------------------------------------------------------


async def test_a_revocable_action_is_put_to_the_guest(node: Node) -> None:
    await node.start([vmi("a"), vmi("quiet"), vmi("novote")])
    a = await node.add_guest("a")
    quiet = await node.add_guest("quiet")
    novote = await node.add_guest("novote", vote_secs=0)
    box = VoteBox(node.config, node.metrics, node.agent.sessions)

    def ask(vm: str, timeout_ms: int | None = None) -> VoteRequest:
        return VoteRequest(
            namespace="ns", vm=vm, event_type="live_migrate_begin", timeout_ms=timeout_ms
        )

    a.vote_result, a.vote_log_msg = "reject", "primary: sync in progress"
    answer = await box.decide(ask("a"))
    assert (answer.result, answer.reason, answer.asked) == (
        "reject",
        "primary: sync in progress",
        True,
    )
    [notify] = a.action_notifies()
    assert (notify.event_type, notify.notification_type) == ("live_migrate_begin", "revocable")
    assert notify.timeout_ms == 5000  # the guest's vote_secs

    a.vote_result = "accept"
    assert (await box.decide(ask("a"))).result == "accept"

    quiet.vote_result = None  # never answers: accepted after the (capped) time
    started = time.monotonic()
    answer = await box.decide(ask("quiet", timeout_ms=300))
    assert (answer.result, answer.asked) == ("accept", True)
    assert "no answer" in answer.reason
    assert 0.25 <= time.monotonic() - started < 3

    answer = await box.decide(ask("novote"))
    assert (answer.result, answer.asked) == ("accept", False)
    assert novote.action_notifies() == []
    answer = await box.decide(ask("elsewhere"))
    assert (answer.result, answer.asked) == ("accept", False)
    for result in ("reject", "accept", "timeout", "no_votes", "not_here"):
        assert node.metric("vmha_votes_total", result=result) == 1.0


async def test_broadcast_copies_skip_a_guest_that_has_no_session_yet(node: Node) -> None:
    await node.start([vmi("a"), vmi("b")])
    a = await node.add_guest("a")
    a.send_broadcast("anyone?")
    await eventually(
        lambda: node.metric("vmha_messaging_dropped_total", reason="not_attached") == 1
    )
    assert not any(isinstance(m, HostBroadcast) for m in a.received)
