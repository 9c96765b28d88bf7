"""The node agent in a cluster: two agent processes (node-a, node-b) against the real
apiserver, each with its own fake kubelet pod directory, and simulated guests listening
where each agent will look (`<root>/pods/<pod uid>/volumes/kubernetes.io~empty-dir/private/
vmha`). The tests play KubeVirt (VMs, VMIs with `status.nodeName`, virt-launcher Pods) and
assert through the API: Events and their series, the `vmha.io/heartbeat` annotation,
corrective actions, rate limits, agent restart, migration and an API outage.

Every agent runs as a ServiceAccount bound to exactly `vmha_node_agent.rbac` (what the
chart grants), with a real token: a missing permission fails the tests.

The guests run on an event loop in a thread of their own, so that the test's blocking API
calls never make a guest late.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmha_protocol.heartbeat import ActionNotify, Challenge, HeartbeatNack
from vmha_protocol.nack import NackReason, nack_reason
from vmha_testbed.agentproc import AgentProcess
from vmha_testbed.cluster import (
    AGENT_ACCOUNT,
    FAST_AGENT_CONFIG,
    admin_api,
    merged,
    service_accounts,
)
from vmha_testbed.controlplane import ControlPlane
from vmha_testbed.guestloop import GuestLoop
from vmha_testbed.kubevirt import Kubelets, KubeVirt
from vmha_testbed.polling import eventually
from vmha_testbed.simguest import Behaviour, SimulatedGuest, acked

pytestmark = pytest.mark.timeout(300)

# Long enough that a busy machine (two shared cores) does not make a guest miss by itself.
INTERVAL_MS = 400
AGENT_NAMESPACE = "vmha-system"
FAULT_REASONS = {"HeartbeatFailed", "HeartbeatMissed", "HeartbeatUnhealthy"}

# The testbed's fast settings; a lower threshold so that faults come sooner.
AGENT_CONFIG = merged(
    FAST_AGENT_CONFIG,
    {"heartbeat": {"missed_threshold": 2}, "events": {"series_update_s": 0.5}},
)


class PausableProxy:
    """A TCP forwarder on loopback in front of the apiserver, which a test can cut off
    (connections refused, open ones reset) and restore: an API outage for one agent."""

    def __init__(self, loop: GuestLoop, target_port: int) -> None:
        self._loop = loop
        self._target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def start(self) -> None:
        self._loop.call(self._listen())

    def pause(self) -> None:
        self._loop.call(self._close())

    def resume(self) -> None:
        self._loop.call(self._listen())

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target_port)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        await asyncio.gather(
            self._pipe(reader, up_writer), self._pipe(up_reader, writer), return_exceptions=True
        )

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


# --- the cluster, as KubeVirt would make it ----------------------------------------------------


@dataclass
class VMHandle:
    name: str
    node: str
    vmi_uid: str
    guest: SimulatedGuest


class World:
    """Plays KubeVirt in one namespace (`vmha_testbed.kubevirt`: VMGroups, VMs, VMIs on
    nodes, launcher Pods), with a simulated guest behind each VMI's channel socket on its
    node."""

    def __init__(
        self, control_plane: ControlPlane, namespace: str, kubelets: Kubelets, guests: GuestLoop
    ) -> None:
        self.guests = guests
        self.api = admin_api(control_plane)
        self.kubevirt = KubeVirt(self.api, namespace, kubelets)
        self.vms: dict[str, VMHandle] = {}

    def kubelet_root(self, node: str) -> Path:
        return self.kubevirt.kubelets.root_of(node)

    # -- objects --

    def group(self, name: str, heartbeat: dict[str, Any]) -> None:
        self.kubevirt.create_group(name, heartbeat=heartbeat)

    def patch_group(self, name: str, heartbeat: dict[str, Any]) -> None:
        self.kubevirt.patch_group(name, {"heartbeat": heartbeat})

    def start_vm(
        self,
        name: str,
        node: str,
        *,
        group: str | None = None,
        annotations: dict[str, str] | None = None,
        corrective_action: str = "reboot",
    ) -> VMHandle:
        """A VirtualMachine, its running VMI on `node`, the launcher Pod, and the guest
        (asking for `corrective_action`: by default the most, so the group's applies)."""
        self.kubevirt.create_vm(name, group, annotations=annotations)
        member = self.kubevirt.start_vmi(name, node)
        guest = self._guest(name, member.socket, corrective_action)
        self.vms[name] = VMHandle(name, node, member.vmi_uid, guest)
        return self.vms[name]

    def _guest(self, name: str, socket: Path, corrective_action: str) -> SimulatedGuest:
        return self.guests.start_guest(
            socket, name=name, interval_ms=INTERVAL_MS, corrective_action=corrective_action
        )

    def set_vmi_status(self, name: str, status: dict[str, Any]) -> None:
        self.kubevirt.set_vmi_status(name, status)

    def migrate(self, name: str, target: str) -> VMHandle:
        """Live migration as KubeVirt does it: the state says it runs (the source lets go),
        a target launcher starts, the source QEMU ends, the VMI moves to the target node."""
        source = self.vms[name]
        migration = {
            "migrationUid": secrets.token_hex(8),
            "sourceNode": source.node,
            "targetNode": target,
            "startTimestamp": "2026-01-01T00:00:00Z",
        }
        self.set_vmi_status(name, {"migrationState": migration})
        launcher = self.kubevirt.create_launcher(name, target)
        target_vm = VMHandle(
            name, target, source.vmi_uid, self._guest(name, launcher.socket, "reboot")
        )
        eventually(lambda: not source.guest.connected, "the source agent letting go")
        self.guests.close_guest(source.guest)
        self.set_vmi_status(
            name,
            {
                "nodeName": target,
                "migrationState": {**migration, "completed": True, "targetNodeAddress": "x"},
            },
        )
        self.vms[name] = target_vm
        return target_vm

    # -- reading --

    def vmi(self, name: str) -> dict[str, Any] | None:
        return self.kubevirt.vmi(name)

    def vm(self, name: str) -> dict[str, Any]:
        return self.kubevirt.vm(name)

    def heartbeat(self, name: str) -> dict[str, Any] | None:
        return self.kubevirt.heartbeat(name)

    def events(self, name: str, reason: str | None = None) -> list[dict[str, Any]]:
        return self.kubevirt.events(name, reason)

    def reasons(self, name: str) -> list[str]:
        return sorted(event["reason"] for event in self.events(name))

    def wait_events(self, name: str, reason: str) -> list[dict[str, Any]]:
        return eventually(lambda: self.events(name, reason), f"{reason} about {name}")

    def wait_count(self, name: str, reason: str, count: int) -> None:
        eventually(lambda: self.count(name, reason) == count, f"{count} of {reason} on {name}")

    def count(self, name: str, reason: str) -> int:
        """Occurrences of `reason` about `name`: Events and their series."""
        return self.kubevirt.count(name, reason)

    def close(self) -> None:
        for handle in self.vms.values():
            with contextlib.suppress(Exception):
                self.guests.close_guest(handle.guest)
        self.kubevirt.delete_all()
        self.api.close()


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def agent_kubeconfig(control_plane: ControlPlane) -> Iterator[Path]:
    """The agents' ServiceAccount with exactly the agent's documented rules, and a token."""
    with service_accounts(control_plane, namespace=AGENT_NAMESPACE, rbac_prefix="vmha-agent-test"):
        yield control_plane.kubeconfig_for_service_account(AGENT_NAMESPACE, AGENT_ACCOUNT)


@pytest.fixture
def guests() -> Iterator[GuestLoop]:
    loop = GuestLoop()
    yield loop
    loop.stop()


@pytest.fixture
def world(control_plane: ControlPlane, namespace: str, guests: GuestLoop) -> Iterator[World]:
    kubelets = Kubelets()  # short: the guests bind their sockets through links under it
    w = World(control_plane, namespace, kubelets, guests)
    yield w
    w.close()
    kubelets.close()


class Agents:
    """Agent processes, one per node, stopped at the end of the test."""

    def __init__(self, world: World, kubeconfig: Path, logs: Path) -> None:
        self._world = world
        self._kubeconfig = kubeconfig
        self._logs = logs
        self.started: dict[str, AgentProcess] = {}

    def start(
        self, node: str, config: dict[str, Any] | None = None, kubeconfig: Path | None = None
    ) -> AgentProcess:
        agent = AgentProcess(
            self._logs / f"{node}.log",
            merged(AGENT_CONFIG, config or {}),
            node_name=node,
            kubeconfig=kubeconfig or self._kubeconfig,
            kubelet_root=self._world.kubelet_root(node),
        )
        self.started[node] = agent.start()
        return agent

    def stop(self) -> None:
        for agent in self.started.values():
            agent.stop()


@pytest.fixture
def agents(world: World, agent_kubeconfig: Path, tmp_path: Path) -> Iterator[Agents]:
    running = Agents(world, agent_kubeconfig, tmp_path)
    yield running
    running.stop()
    for node, agent in running.started.items():
        # Shown by pytest when the test failed.
        print(f"--- {node} ---\n{agent.log_tail(60)}")


def registered(guest: SimulatedGuest) -> bool:
    return guest.connected and acked(guest)


def wait_registered(world: World, *names: str) -> None:
    for name in names:
        wait_guest(world.vms[name].guest, registered, f"{name} registered")


def wait_guest(
    guest: SimulatedGuest, condition: Callable[[SimulatedGuest], bool], what: str
) -> None:
    eventually(lambda: condition(guest), what)


def reregistered(old_invocation: int) -> Callable[[SimulatedGuest], bool]:
    return lambda guest: guest.invocation_id != old_invocation and registered(guest)


def challenged(at_least: int) -> Callable[[SimulatedGuest], bool]:
    return lambda guest: guest.count(Challenge) >= at_least


def wait_state(world: World, name: str, state: str, node: str | None = None) -> dict[str, Any]:
    return world.kubevirt.wait_heartbeat(name, state, node=node)


# --- discovery and reporting ------------------------------------------------------------------


def test_members_and_opted_in_vmis_on_each_node_are_attached_and_reported(
    world: World, agents: Agents
) -> None:
    world.group("web", {"minIntervalMs": 100, "missedThreshold": 2})
    agents.start("node-a")
    agents.start("node-b")
    world.start_vm("a1", "node-a", group="web")
    world.start_vm("b1", "node-b", group="web")
    world.start_vm("solo", "node-a", annotations={"vmha.io/heartbeat-enabled": "true"})
    world.start_vm("plain", "node-a")  # neither a member nor opted in
    world.start_vm("out", "node-a", group="web", annotations={"vmha.io/heartbeat-enabled": "false"})
    wait_registered(world, "a1", "b1", "solo")
    for name, node in (("a1", "node-a"), ("b1", "node-b"), ("solo", "node-a")):
        value = wait_state(world, name, "healthy", node)
        assert value["reason"] == "registered"
        assert value["since"].endswith("Z")
        [event] = world.wait_events(name, "HeartbeatRegistered")
        assert event["type"] == "Normal"
        assert event["reportingController"] == "vmha.io/node-agent"
        assert event["reportingInstance"] == node
        assert event["action"] == "Heartbeat"
        assert event["regarding"]["uid"] == world.vms[name].vmi_uid
        assert event["regarding"]["kind"] == "VirtualMachineInstance"
    # Challenged at the guest's interval (the group allows 100 ms and up).
    a1 = world.vms["a1"].guest
    eventually(lambda: a1.count(Challenge) >= 5, "challenges to a1")
    assert world.vms["plain"].guest.connections == 0
    # "out" opted out of heartbeat but is a group member: attached for server group
    # messaging only; its registration is refused and it is never challenged.
    out = world.vms["out"].guest
    wait_guest(out, lambda g: g.count(HeartbeatNack) >= 1, "out's init refused")
    [refusal] = [m for m in out.received if isinstance(m, HeartbeatNack)][:1]
    assert nack_reason(refusal.log_msg) is NackReason.UNAVAILABLE
    assert out.count(Challenge) == 0
    for ignored in ("plain", "out"):
        assert world.heartbeat(ignored) is None
    assert agents.started["node-a"].metric("vmha_vms") == 3.0
    assert agents.started["node-b"].metric("vmha_vms") == 1.0
    assert agents.started["node-a"].metric("vmha_discovery_vmis", state="attached") == 3.0


def test_hang_unhealthy_and_recovery_become_events_and_annotations(
    world: World, agents: Agents
) -> None:
    world.group("web", {"minIntervalMs": 100, "missedThreshold": 2, "correctiveAction": "log"})
    agent = agents.start("node-a")
    vm = world.start_vm("a1", "node-a", group="web")
    wait_registered(world, "a1")
    wait_state(world, "a1", "healthy")

    for episode in (1, 2):
        vm.guest.behaviour = Behaviour.SILENT
        failed = wait_state(world, "a1", "failed")
        assert failed["reason"] == "missed"
        assert failed["detail"] == "2 consecutive challenges unanswered"
        world.wait_count("a1", "HeartbeatFailed", episode)
        vm.guest.behaviour = Behaviour.HEALTHY
        recovered = wait_state(world, "a1", "healthy")
        assert recovered["reason"] == "recovered"
        world.wait_count("a1", "HeartbeatRecovered", episode)
    # Repeats are one Event each, with a series: two misses before each failure.
    eventually(lambda: world.count("a1", "HeartbeatMissed") >= 4, "the missed series")
    [missed] = world.events("a1", "HeartbeatMissed")
    assert missed["type"] == "Warning"
    assert missed["series"]["lastObservedTime"] > missed["eventTime"]
    [failed_event] = world.events("a1", "HeartbeatFailed")
    assert failed_event["type"] == "Warning"
    assert "2 consecutive challenges unanswered" in failed_event["note"]
    assert failed_event["series"]["count"] == 2
    # The group's action is `log`: an Event per fault, nothing done to the VM.
    [action] = world.wait_events("a1", "CorrectiveAction")
    assert action["action"] == "Log"
    assert world.vm("a1")["spec"]["runStrategy"] == "Always"

    vm.guest.behaviour, vm.guest.log_msg = Behaviour.UNHEALTHY, "check db failed"
    unhealthy = wait_state(world, "a1", "unhealthy")
    assert unhealthy["reason"] == "unhealthy"
    [event] = eventually(lambda: world.events("a1", "HeartbeatUnhealthy"), "HeartbeatUnhealthy")
    assert "check db failed" in event["note"]
    vm.guest.behaviour = Behaviour.HEALTHY
    wait_state(world, "a1", "healthy")
    world.wait_count("a1", "HeartbeatRecovered", 3)
    world.wait_count("a1", "CorrectiveAction", 3)  # one `log` action per fault
    assert agent.metric("vmha_kube_events_dropped_total") == 0.0
    assert agent.metric("vmha_corrective_actions_total", action="log", outcome="taken") == 3.0


def test_group_defaults_and_vm_annotations_apply_to_running_sessions(
    world: World, agents: Agents
) -> None:
    world.group("web", {"minIntervalMs": 100, "missedThreshold": 2, "correctiveAction": "log"})
    agents.start("node-a")
    a = world.start_vm("a", "node-a", group="web")
    b = world.start_vm(
        "b",
        "node-a",
        group="web",
        annotations={
            "vmha.io/heartbeat-missed-threshold": "4",
            "vmha.io/corrective-action": "none",
        },
    )
    wait_registered(world, "a", "b")

    # The group's minimum interval rises: the running session slows down to it.
    stamps: list[float] = []
    a.guest.on_challenge = lambda _: stamps.append(time.monotonic())
    world.patch_group("web", {"minIntervalMs": 1000})

    def slowed_down() -> bool:
        gaps = [later - earlier for earlier, later in itertools.pairwise(stamps[-4:])]
        return len(gaps) == 3 and min(gaps) >= 0.9

    eventually(slowed_down, "challenges a second apart")
    world.patch_group("web", {"minIntervalMs": 100})

    a.guest.behaviour = b.guest.behaviour = Behaviour.SILENT
    assert wait_state(world, "a", "failed")["detail"] == "2 consecutive challenges unanswered"
    assert wait_state(world, "b", "failed")["detail"] == "4 consecutive challenges unanswered"
    eventually(lambda: world.events("a", "CorrectiveAction"), "a's action")
    assert world.events("b", "CorrectiveAction") == []  # `none` by annotation


def test_agent_restart_reattaches_without_a_false_fault(world: World, agents: Agents) -> None:
    world.group("web", {"minIntervalMs": 100, "missedThreshold": 3})
    agent = agents.start("node-a")
    names = ["a", "b", "c"]
    for name in names:
        world.start_vm(name, "node-a", group="web")
    wait_registered(world, *names)
    before = {name: wait_state(world, name, "healthy") for name in names}
    invocations = {name: world.vms[name].guest.invocation_id for name in names}

    agent.stop()
    eventually(lambda: not any(world.vms[n].guest.connected for n in names), "disconnects")
    agent.start()
    for name in names:
        guest = world.vms[name].guest
        wait_guest(guest, reregistered(invocations[name]), f"{name} registered again")
    for name in names:
        guest = world.vms[name].guest
        wait_guest(guest, challenged(guest.count(Challenge) + 5), f"{name} challenged")
    for name in names:
        assert world.heartbeat(name) == before[name]  # not even rewritten
        assert FAULT_REASONS.isdisjoint(world.reasons(name))
        assert world.count(name, "HeartbeatRegistered") == 1


def test_a_guest_that_hung_while_no_agent_watched_is_found_after_the_restart(
    world: World, agents: Agents
) -> None:
    world.group("web", {"minIntervalMs": 100, "missedThreshold": 3})
    agent = agents.start("node-a", {"heartbeat": {"reregister_grace_s": 2.0}})
    world.start_vm("a", "node-a", group="web")
    wait_registered(world, "a")
    wait_state(world, "a", "healthy")

    agent.stop()
    guest = world.vms["a"].guest
    eventually(lambda: not guest.connected, "disconnect")
    guest.register, guest.behaviour = False, Behaviour.SILENT  # hung: it will never register
    agent.start()
    failed = wait_state(world, "a", "failed", node="node-a")
    assert failed["reason"] == "missed"
    assert "not again within" in failed["detail"]
    eventually(lambda: world.count("a", "HeartbeatFailed") == 1, "HeartbeatFailed Event")

    guest.register, guest.behaviour = True, Behaviour.HEALTHY

    async def comes_back() -> None:  # on the guests' loop: registered, the fault ends
        guest.send_init()

    world.guests.call(comes_back())
    wait_state(world, "a", "healthy", node="node-a")


def test_a_vmi_moved_from_node_a_to_node_b_is_followed_without_a_fault(
    world: World, agents: Agents
) -> None:
    world.group("web", {"minIntervalMs": 100, "missedThreshold": 3})
    agent_a = agents.start("node-a")
    agent_b = agents.start("node-b")
    world.start_vm("m", "node-a", group="web")
    wait_registered(world, "m")
    wait_state(world, "m", "healthy", "node-a")

    target = world.migrate("m", "node-b")
    eventually(lambda: registered(target.guest), "registered on node-b")
    value = wait_state(world, "m", "healthy", "node-b")
    assert value["reason"] == "registered"
    eventually(lambda: target.guest.count(Challenge) >= 5, "challenges on node-b")
    assert FAULT_REASONS.isdisjoint(world.reasons("m"))
    registrations = {e["reportingInstance"] for e in world.events("m", "HeartbeatRegistered")}
    assert registrations == {"node-a", "node-b"}
    assert agent_a.metric("vmha_vms") == 0.0
    assert agent_b.metric("vmha_vms") == 1.0
    assert agent_a.metric("vmha_heartbeat_faults_total", vm="m") is None


# --- corrective actions -----------------------------------------------------------------------


def test_reboot_deletes_the_vmi_after_the_guests_notice(world: World, agents: Agents) -> None:
    world.group("web", {"minIntervalMs": 100, "missedThreshold": 2, "correctiveAction": "reboot"})
    agent = agents.start("node-a")
    vm = world.start_vm("r", "node-a", group="web")
    wait_registered(world, "r")
    vm.guest.behaviour = Behaviour.SILENT

    eventually(lambda: vm.guest.count(ActionNotify) == 1, "action_notify")
    noticed = time.monotonic()
    [notice] = [m for m in vm.guest.received if isinstance(m, ActionNotify)]
    assert (notice.event_type, notice.notification_type) == ("reboot", "irrevocable")
    assert notice.timeout_ms == 5000  # the guest's shutdown_notice_secs
    eventually(lambda: world.vmi("r") is None, "the VMI deleted")
    assert time.monotonic() - noticed >= 3.0  # the notice (5 s) was honoured
    [event] = eventually(lambda: world.events("r", "CorrectiveAction"), "CorrectiveAction")
    assert event["action"] == "Reboot"
    assert "VMI deleted" in event["note"]
    assert world.vm("r")["spec"]["runStrategy"] == "Always"
    assert agent.metric("vmha_corrective_actions_total", action="reboot", outcome="taken") == 1.0


def test_stop_halts_the_vm_and_a_guest_may_only_narrow_the_action(
    world: World, agents: Agents
) -> None:
    world.group("web", {"minIntervalMs": 100, "missedThreshold": 2, "correctiveAction": "stop"})
    agent = agents.start("node-a")
    halted = world.start_vm("s", "node-a", group="web", corrective_action="reboot")
    mild = world.start_vm("m", "node-a", group="web", corrective_action="log")
    wait_registered(world, "s", "m")
    for guest in (halted.guest, mild.guest):
        guest.behaviour, guest.log_msg = Behaviour.UNHEALTHY, "disk full"

    eventually(lambda: world.vm("s")["spec"].get("runStrategy") == "Halted", "VM s halted")
    [event] = world.events("s", "CorrectiveAction")
    assert event["action"] == "Stop"
    assert "runStrategy Halted" in event["note"]
    # m's guest asked for `log` only: narrowed, the VM keeps running.
    [logged] = eventually(lambda: world.events("m", "CorrectiveAction"), "m's action")
    assert logged["action"] == "Log"
    assert world.vm("m")["spec"]["runStrategy"] == "Always"
    assert mild.guest.count(ActionNotify) == 0

    # The VMI is still there (no KubeVirt here to stop it): a second fault on the same VM
    # within the per-VM interval is not acted on again.
    halted.guest.behaviour = Behaviour.HEALTHY
    wait_state(world, "s", "healthy")
    halted.guest.behaviour = Behaviour.UNHEALTHY
    [skipped] = eventually(lambda: world.events("s", "CorrectiveActionSkipped"), "skipped")
    assert "at most one action per VM" in skipped["note"]
    assert (
        agent.metric(
            "vmha_corrective_actions_total", action="stop", outcome="skipped_rate_limit_vm"
        )
        == 1.0
    )


def test_rate_limits_hold_under_a_burst_of_faults(world: World, agents: Agents) -> None:
    world.group("web", {"minIntervalMs": 100, "missedThreshold": 2, "correctiveAction": "reboot"})
    agent = agents.start("node-a", {"corrective_actions": {"per_node_limit": 2, "max_notice_s": 0}})
    names = [f"v{i}" for i in range(5)]
    for name in names:
        world.start_vm(name, "node-a", group="web")
    wait_registered(world, *names)
    for name in names:
        world.vms[name].guest.behaviour = Behaviour.SILENT

    def outcomes() -> tuple[int, int] | None:
        deleted = sum(world.vmi(name) is None for name in names)
        skipped = sum(len(world.events(name, "CorrectiveActionSkipped")) for name in names)
        return (deleted, skipped) if deleted + skipped == len(names) else None

    assert eventually(outcomes, "every fault decided") == (2, 3)
    notes = [e["note"] for n in names for e in world.events(n, "CorrectiveActionSkipped")]
    assert all("at most 2 actions on node node-a" in note for note in notes)
    time.sleep(2)  # nothing more happens
    assert sum(world.vmi(name) is None for name in names) == 2
    assert (
        agent.metric(
            "vmha_corrective_actions_total", action="reboot", outcome="skipped_rate_limit_node"
        )
        == 3.0
    )


def test_an_action_is_skipped_for_a_vmi_that_is_migrating(world: World, agents: Agents) -> None:
    world.group("web", {"minIntervalMs": 100, "missedThreshold": 2, "correctiveAction": "reboot"})
    agents.start("node-a")
    vm = world.start_vm("x", "node-a", group="web")
    wait_registered(world, "x")
    vm.guest.behaviour = Behaviour.SILENT
    eventually(lambda: vm.guest.count(ActionNotify) == 1, "action_notify")
    # During the notice the VMI starts moving (to a node no agent runs on).
    world.set_vmi_status(
        "x",
        {"migrationState": {"sourceNode": "node-a", "targetNode": "node-c", "migrationUid": "u"}},
    )
    [skipped] = eventually(lambda: world.events("x", "CorrectiveActionSkipped"), "skipped")
    assert "being migrated" in skipped["note"]
    assert world.vmi("x") is not None


# --- API outage -------------------------------------------------------------------------------


@dataclass
class Proxied:
    proxy: PausableProxy
    kubeconfig: Path


@pytest.fixture
def proxied(
    control_plane: ControlPlane, guests: GuestLoop, agent_kubeconfig: Path, tmp_path: Path
) -> Iterator[Proxied]:
    """The agent's credentials, pointed at the apiserver through a proxy the test controls."""
    proxy = PausableProxy(guests, int(control_plane.server_url.rsplit(":", 1)[1]))
    proxy.start()
    config = yaml.safe_load(agent_kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    path = tmp_path / "proxied.kubeconfig"
    path.touch(mode=0o600)
    path.write_text(yaml.safe_dump(config))
    yield Proxied(proxy, path)
    proxy.pause()


def test_an_api_outage_loses_no_queued_event(
    world: World, agents: Agents, proxied: Proxied
) -> None:
    world.group("web", {"minIntervalMs": 100, "missedThreshold": 2, "correctiveAction": "none"})
    proxy = proxied.proxy
    agent = agents.start("node-a", kubeconfig=proxied.kubeconfig)
    vm = world.start_vm("o", "node-a", group="web")
    wait_registered(world, "o")
    wait_state(world, "o", "healthy")

    proxy.pause()
    vm.guest.behaviour = Behaviour.SILENT
    eventually(lambda: agent.metric("vmha_heartbeat_state", vm="o", state="failed") == 1.0, "fail")
    vm.guest.behaviour = Behaviour.HEALTHY
    eventually(lambda: agent.metric("vmha_heartbeat_state", vm="o", state="healthy") == 1.0, "ok")
    queued = agent.metric("vmha_kube_events_queue_length") or 0
    assert queued >= 3  # missed, failed, recovered: all waiting
    assert world.events("o", "HeartbeatFailed") == []
    assert (agent.metric("vmha_kube_requests_total", code="0") or 0) > 0

    proxy.resume()
    eventually(lambda: world.events("o", "HeartbeatRecovered"), "the recovery Event")
    for reason in ("HeartbeatFailed", "HeartbeatMissed"):
        assert world.events("o", reason), reason
    failed = world.events("o", "HeartbeatFailed")[0]
    recovered = world.events("o", "HeartbeatRecovered")[0]
    assert failed["eventTime"] < recovered["eventTime"]  # when it happened, not when sent
    assert world.heartbeat("o")["state"] == "healthy"  # type: ignore[index]
    assert agent.metric("vmha_kube_events_dropped_total") == 0.0
    eventually(lambda: agent.metric("vmha_kube_events_queue_length") == 0.0, "queue empty")
