"""Server group messaging across two nodes, against the real apiserver: two agent processes
(node-a, node-b) that find each other through their Leases and talk over HTTPS with mutual
TLS (certificates made here with the testbed's CA helpers) and pod-bound ServiceAccount
tokens (TokenRequest with `boundObjectRef` to an agent Pod on each node, checked by the
receiving agent through TokenReview); simulated guests behind each VMI's channel socket.
The tests play KubeVirt (VMs, VMIs with status, virt-launcher Pods) and, for votes, run the
operator with its webhooks.

A group `web` of three VMs: a1 and a2 on node-a, b1 on node-b.

Every agent runs as a ServiceAccount with exactly `vmha_node_agent.rbac`'s rules (its
ClusterRole and the Role in the agents' namespace); the operator likewise with
`vmha_operator.rbac`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmha_node_agent.kubeapi import LEASES, MERGE_PATCH, VMIS, VMS, KubeApi, KubeError, load_client
from vmha_node_agent.leases import lease_name
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.ratelimit import TokenBucket
from vmha_protocol.limits import MAX_BROADCAST_BYTES
from vmha_protocol.nack import NackReason, nack_reason
from vmha_protocol.server_group import MemberState
from vmha_testbed.cluster import (
    FAST_AGENT_CONFIG,
    Credentials,
    LocalCluster,
    agent_credentials,
    post_to_agent,
    request_token,
)
from vmha_testbed.controlplane import ControlPlane
from vmha_testbed.guestloop import GuestLoop
from vmha_testbed.kubevirt import ready_conditions
from vmha_testbed.operatorproc import OperatorProcess
from vmha_testbed.polling import eventually
from vmha_testbed.simguest import SimulatedGuest, acked

pytestmark = pytest.mark.timeout(300)

SETTLE_TIMEOUT = 60.0
AGENTS_NAMESPACE = "vmha-messaging"


@pytest.fixture(scope="module")
def credentials(control_plane: ControlPlane) -> Iterator[Credentials]:
    """The agents' and the operator's ServiceAccounts, RBAC, certificates and tokens."""
    with agent_credentials(
        control_plane, namespace=AGENTS_NAMESPACE, rbac_prefix="vmha-messaging-test"
    ) as made:
        yield made


# --- the cluster, with simulated guests ----------------------------------------------------------


class World(LocalCluster):
    """Both nodes' agents and (for votes) the operator; the test plays KubeVirt in one
    namespace and runs a simulated guest behind each VMI's channel socket."""

    def __init__(
        self,
        control_plane: ControlPlane,
        namespace: str,
        guests: GuestLoop,
        credentials: Credentials,
        *,
        workdir: Path,
    ) -> None:
        super().__init__(control_plane, credentials, namespace, workdir=workdir,
                         agent_config=FAST_AGENT_CONFIG)  # fmt: skip
        self.guests = guests
        self.vms: dict[str, SimulatedGuest] = {}

    def group(self, name: str = "web", *, messaging: bool = True) -> None:
        self.kubevirt.create_group(name, messaging=messaging, heartbeat={"minIntervalMs": 100})

    def start_vm(self, name: str, node: str, group: str = "web", **guest: Any) -> SimulatedGuest:
        self.kubevirt.create_vm(name, group)
        member = self.kubevirt.start_vmi(name, node)
        self.vms[name] = self.guests.start_guest(member.socket, name=name, interval_ms=400, **guest)
        return self.vms[name]

    def set_status(self, name: str, status: dict[str, Any]) -> None:
        self.kubevirt.set_vmi_status(name, status)

    def delete_vmi(self, name: str) -> None:
        self.kubevirt.delete_vmi(name)

    # -- guests --

    def wait_registered(self, *names: str) -> None:
        for name in names:
            guest = self.vms[name]
            eventually(lambda g=guest: g.connected and acked(g), f"{name} registered")  # type: ignore[misc]

    def broadcast(self, name: str, data: str) -> None:
        guest = self.vms[name]
        self.guests.do(lambda: guest.send_broadcast(data))

    def status(self, name: str) -> list[MemberState]:
        guest = self.vms[name]
        return self.guests.call(guest.query_status(timeout=20))

    def close(self) -> None:
        self.stop_processes()
        for guest in self.vms.values():
            with contextlib.suppress(Exception):
                self.guests.close_guest(guest)
        super().close()


@pytest.fixture
def world(
    control_plane: ControlPlane, namespace: str, credentials: Credentials, tmp_path: Path
) -> Iterator[World]:
    guests = GuestLoop()
    w = World(control_plane, namespace, guests, credentials, workdir=tmp_path)
    yield w
    w.close()
    guests.stop()
    print(w.log_tails(60))  # shown by pytest when the test failed


@pytest.fixture
def web(world: World) -> World:
    """The group `web`: a1, a2 on node-a, b1 on node-b, every guest registered."""
    world.group()
    world.start_agents()
    world.start_vm("a1", "node-a")
    world.start_vm("a2", "node-a")
    world.start_vm("b1", "node-b")
    world.wait_registered("a1", "a2", "b1")
    return world


def broadcasts_from(guest: SimulatedGuest, source: str) -> list[str]:
    return [b.data for b in guest.broadcasts() if b.source_instance == source]


def nack_codes(guest: SimulatedGuest) -> list[NackReason | None]:
    return [nack_reason(n.log_msg) for n in guest.nacks()]


# --- broadcast --------------------------------------------------------------------------------


def test_a_broadcast_reaches_the_other_members_on_both_nodes(web: World) -> None:
    a1, a2, b1 = (web.vms[n] for n in ("a1", "a2", "b1"))
    source_a1 = f"{web.namespace}/a1"
    web.broadcast("a1", "a1 is active")
    for guest in (a2, b1):
        eventually(lambda g=guest: broadcasts_from(g, source_a1), "the copy")  # type: ignore[misc]
        assert broadcasts_from(guest, source_a1) == ["a1 is active"]
    web.broadcast("b1", "b1 is standby")
    for guest in (a1, a2):
        eventually(lambda g=guest: broadcasts_from(g, f"{web.namespace}/b1"), "the copy")  # type: ignore[misc]
    time.sleep(0.3)
    assert broadcasts_from(a1, source_a1) == [] and broadcasts_from(b1, f"{web.namespace}/b1") == []
    agent_a, agent_b = web.agents["node-a"], web.agents["node-b"]
    assert agent_b.metric("vmha_messaging_deliveries_total", path="peer") == 1.0
    assert agent_a.metric("vmha_messaging_deliveries_total", path="peer") == 2.0
    assert agent_a.metric("vmha_messaging_deliveries_total", path="local") == 1.0
    assert (agent_a.metric("vmha_peer_refused_total") or 0.0) == 0.0


def test_an_oversize_or_flooding_sender_is_refused_without_hurting_the_others(
    web: World,
) -> None:
    a1, a2, b1 = (web.vms[n] for n in ("a1", "a2", "b1"))
    oversize = (
        b'\n{"version":1,"source_addr":"vmha.server_group","dest_addr":"vmha.server_group",'
        b'"data":{"version":1,"msg_type":"broadcast","data":"' + b"x" * 4000 + b'"}}\n'
    )
    web.guests.do(lambda: a1.send_raw(oversize))
    eventually(lambda: NackReason.TOO_LARGE in nack_codes(a1), "too-large nack")
    web.broadcast("a1", "y" * MAX_BROADCAST_BYTES)
    eventually(lambda: broadcasts_from(b1, f"{web.namespace}/a1"), "the largest legal one")

    def flood() -> None:
        for i in range(80):
            a1.send_broadcast(f"flood {i}")

    web.guests.do(flood)
    eventually(lambda: NackReason.RATE_LIMITED in nack_codes(a1), "rate-limited nacks")
    time.sleep(0.5)
    flooded = len(broadcasts_from(b1, f"{web.namespace}/a1")) - 1
    assert 10 <= flooded <= 30  # the VM's burst (20) and what refilled meanwhile
    # The others are unharmed.
    web.broadcast("b1", "still here")
    eventually(lambda: "still here" in broadcasts_from(a2, f"{web.namespace}/b1"), "b1 → a2")
    assert nack_codes(b1) == [] and nack_codes(a2) == []


# --- notifications and status -----------------------------------------------------------------


def notices_about(guest: SimulatedGuest, name: str) -> list[MemberState]:
    return [n for n in guest.notifications() if n.display_name == name]


def test_pause_unpause_and_deletion_are_notified_to_the_others(web: World) -> None:
    a1, a2, b1 = (web.vms[n] for n in ("a1", "a2", "b1"))
    latencies: list[float] = []

    def change(status: dict[str, Any], state: str) -> MemberState:
        """Change b1; a1 and a2 hear of it (other news about b1, e.g. its heartbeat
        annotation appearing, may come first)."""
        seen = {guest.name: len(notices_about(guest, "b1")) for guest in (a1, a2)}
        changed = time.monotonic()
        if status:
            web.set_status("b1", status)
        else:
            web.delete_vmi("b1")
        for guest in (a1, a2):

            def told(g: SimulatedGuest = guest) -> MemberState | None:
                news = notices_about(g, "b1")[seen[g.name] :]
                return next((n for n in news if n.state == state), None)

            notice = eventually(told, f"{guest.name} told b1 is {state}", timeout=10)
            latencies.append(time.monotonic() - changed)
        return notice

    paused = change({"conditions": ready_conditions(paused=True)}, "paused")
    assert (paused.power_state, paused.node) == ("paused", "node-b")
    assert paused.namespace == web.namespace
    assert change({"conditions": ready_conditions()}, "active").power_state == "running"
    assert change({}, "deleted").display_name == "b1"
    assert notices_about(b1, "b1") == []  # never about itself
    print(f"VMI change → notification at the guests: {[f'{s:.3f}' for s in latencies]} s")
    # The watch delivers the change; nothing polls (a 1 s bound with room for a busy machine).
    assert max(latencies) < 5.0


def test_status_lists_every_member_with_its_state(web: World) -> None:
    web.set_status("b1", {"conditions": ready_conditions(paused=True)})
    eventually(lambda: notices_about(web.vms["a1"], "b1"), "the pause seen")
    for name in ("a1", "b1"):
        members = web.status(name)
        assert [(m.display_name, m.node, m.state) for m in members] == [
            ("a1", "node-a", "active"),
            ("a2", "node-a", "active"),
            ("b1", "node-b", "paused"),
        ]
        assert all(m.ready for m in members)


def test_messaging_off_is_a_nack_naming_the_group(world: World) -> None:
    world.group("quiet", messaging=False)
    world.start_agents()
    guest = world.start_vm("q1", "node-a", group="quiet")
    world.start_vm("q2", "node-a", group="quiet")
    world.wait_registered("q1", "q2")
    world.broadcast("q1", "hello?")
    world.guests.do(guest.send_status_query)
    eventually(lambda: len(guest.nacks()) == 2, "two nacks")
    for nack in guest.nacks():
        assert nack_reason(nack.log_msg) is NackReason.MESSAGING_DISABLED
        assert "group quiet" in nack.log_msg
    assert world.vms["q2"].broadcasts() == []


# --- agent to agent: spoofing and outages -------------------------------------------------------


def test_spoofed_agent_requests_are_refused_and_counted(web: World) -> None:
    creds = web.credentials
    agent_b = web.agents["node-b"]
    url = web.endpoint("node-b") + "/v1/broadcast"
    uid = {
        name: web.api.call("get", VMIS, VMIS.path(web.namespace, name))["metadata"]["uid"]
        for name in ("a1", "b1")
    }

    def batch(source: str, targets: list[str], data: str) -> dict[str, Any]:
        src = {"namespace": web.namespace, "name": source, "uid": uid[source]}
        return {"messages": [{"source": src, "targets": targets, "data": data}]}

    token_a = creds.agent_tokens["node-a"].read_text()
    other_token = request_token(web.api, web.namespace, "default")  # a valid token, not an agent's

    def refused(reason: str) -> float:
        return agent_b.metric("vmha_peer_refused_total", reason=reason) or 0.0

    # The real thing first: node-a's agent token, a1 (on node-a) to b1 (on node-b).
    legit = batch("a1", ["b1"], "from a1, by hand")
    assert post_to_agent(url, legit, ca_file=creds.ca_file, cert=creds.agent_client,
                         token=token_a)[0] == 200  # fmt: skip
    eventually(lambda: "from a1, by hand" in broadcasts_from(web.vms["b1"], f"{web.namespace}/a1"),
               "the legitimate copy")  # fmt: skip

    cases: list[tuple[str, tuple[Path, Path] | None, str | None, dict[str, Any]]] = [
        ("no_client_cert", None, token_a, legit),
        ("bad_token", creds.agent_client, "not-a-token", legit),
        ("wrong_service_account", creds.agent_client, other_token, legit),
        # node-a's agent speaking for b1, which runs on node-b.
        ("not_source_node", creds.agent_client, token_a, batch("b1", ["b1"], "spoofed")),
        # ... or for a target that is not on node-b.
        ("target_not_local", creds.agent_client, token_a, batch("a1", ["a2"], "misrouted")),
    ]
    for reason, cert, token, body in cases:
        before = refused(reason)
        status, answer = post_to_agent(url, body, ca_file=creds.ca_file, cert=cert, token=token)
        assert (status, answer["error"]) == (403, reason)
        assert refused(reason) == before + 1
    # A certificate from another CA does not even finish the handshake.
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        post_to_agent(url, legit, ca_file=creds.ca_file, cert=creds.outsider_client, token=token_a)
    time.sleep(0.3)
    assert broadcasts_from(web.vms["b1"], f"{web.namespace}/b1") == []
    assert [b.data for b in web.vms["b1"].broadcasts()] == ["from a1, by hand"]


def test_an_agent_down_does_not_stop_the_others(web: World) -> None:
    a2, b1 = web.vms["a2"], web.vms["b1"]
    agent_a, agent_b = web.agents["node-a"], web.agents["node-b"]
    assert agent_b.pid is not None
    os.kill(agent_b.pid, signal.SIGKILL)  # no goodbye: its Lease stays until it is stale
    for i in range(5):
        web.broadcast("a1", f"after the crash {i}")
    eventually(lambda: len(broadcasts_from(a2, f"{web.namespace}/a1")) == 5, "local copies")
    members = web.status("a1")
    assert [m.display_name for m in members] == ["a1", "a2", "b1"]
    dropped = eventually(
        lambda: sum(
            agent_a.metric("vmha_messaging_dropped_total", reason=r) or 0.0
            for r in ("peer_unreachable", "peer_down", "peer_timeout")
        ),
        "copies for node-b dropped and counted",
    )
    assert dropped == 5.0
    # The Lease goes stale: node-b is known to be down.
    eventually(lambda: agent_a.metric("vmha_peer_agents", state="live") == 0.0, "stale Lease")
    # node-b's agent comes back: copies flow again.
    agent_b.restart()  # stop() only tidies up after the killed process
    eventually(lambda: agent_a.metric("vmha_peer_agents", state="live") == 1.0, "live again")
    eventually(lambda: b1.connected and acked(b1), "b1 registered again")
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while "back" not in broadcasts_from(b1, f"{web.namespace}/a1"):
        assert time.monotonic() < deadline, "no copy after the restart"
        web.broadcast("a1", "back")
        time.sleep(1.0)


def test_a_clean_stop_removes_the_agents_lease(web: World) -> None:
    web.agents["node-b"].stop()
    with pytest.raises(KubeError) as gone:
        web.api.call("get", LEASES, LEASES.path(AGENTS_NAMESPACE, lease_name("node-b")))
    assert gone.value.not_found
    agent_a = web.agents["node-a"]
    eventually(lambda: agent_a.metric("vmha_peer_agents", state="live") == 0.0, "node-b gone")
    web.broadcast("a1", "b is gone")
    eventually(
        lambda: agent_a.metric("vmha_messaging_dropped_total", reason="peer_down") == 1.0,
        "the copy for b1 dropped at once",
    )


# --- votes on revocable actions ---------------------------------------------------------------


@pytest.fixture
def operator(web: World) -> Iterator[OperatorProcess]:
    """The operator with votes on (a guest gets at most 3 s), as its ServiceAccount."""
    yield web.start_operator(vote_timeout_s=3)
    print(web.log_tails(40))


def test_a_revocable_migration_is_put_to_the_guest(
    web: World, operator: OperatorProcess, control_plane: ControlPlane
) -> None:
    a1 = web.vms["a1"]
    a1.vote_result, a1.vote_log_msg = "reject", "primary: replication in progress"
    refused = web.create_migration("a1", "m1")
    assert refused.returncode != 0
    assert 'admission webhook "validate-migration.' in refused.stderr
    assert (
        'VirtualMachineInstance "a1": its guest rejected live_migrate_begin: '
        "primary: replication in progress"
    ) in refused.stderr
    [notify] = a1.action_notifies()
    assert (notify.event_type, notify.notification_type) == ("live_migrate_begin", "revocable")
    assert notify.timeout_ms == 3000  # the guest's 5 s, capped by the operator's 3 s

    a1.vote_result = "accept"
    accepted = web.create_migration("a1", "m2")
    assert accepted.returncode == 0, accepted.stderr

    a1.vote_result = None  # a guest that never answers: allowed once its time is up
    started = time.monotonic()
    silent = web.create_migration("a1", "m3")
    assert silent.returncode == 0, silent.stderr
    assert time.monotonic() - started >= 2.5
    agent_a = web.agents["node-a"]
    for result in ("reject", "accept", "timeout"):
        assert agent_a.metric("vmha_votes_total", result=result) == 1.0


def test_stopping_a_member_is_put_to_its_guest(
    web: World, operator: OperatorProcess, control_plane: ControlPlane
) -> None:
    b1 = web.vms["b1"]
    b1.vote_result, b1.vote_log_msg = "reject", "standby: taking over"

    def halt() -> Any:
        patch = json.dumps({"spec": {"runStrategy": "Halted"}})
        return control_plane.kubectl(
            "-n", web.namespace, "patch", "vm", "b1", "--type=merge", "-p", patch, check=False
        )

    refused = halt()
    assert refused.returncode != 0
    assert 'VirtualMachine "b1": its guest rejected stop: standby: taking over' in refused.stderr
    # A dry run asks nobody.
    notices = len(b1.action_notifies())
    dry = control_plane.kubectl(
        "-n", web.namespace, "patch", "vm", "b1", "--type=merge", "--dry-run=server",
        "-p", json.dumps({"spec": {"runStrategy": "Halted"}}), check=False,
    )  # fmt: skip
    assert dry.returncode == 0, dry.stderr
    assert len(b1.action_notifies()) == notices
    b1.vote_result = "accept"
    assert halt().returncode == 0


def test_the_agents_corrective_stop_is_not_put_to_a_vote(
    web: World, operator: OperatorProcess
) -> None:
    """The heartbeat's corrective action is irrevocable: when a node agent (its
    ServiceAccount) halts a VM, the operator asks no guest, even one that would object."""
    a2 = web.vms["a2"]
    a2.vote_result, a2.vote_log_msg = "reject", "would object"
    # What the agent's `stop` sends, with the agent's credentials (it may only patch VMs).
    as_agent = KubeApi(
        load_client(web.credentials.agent_kubeconfig),
        AgentMetrics(),
        timeout_s=30.0,
        write_budget=TokenBucket(10.0, 10),
    )
    body = {"spec": {"runStrategy": "Halted", "running": None}}
    try:
        as_agent.call("patch", VMS, VMS.path(web.namespace, "a2"), body=body,
                      content_type=MERGE_PATCH)  # fmt: skip
    finally:
        as_agent.close()
    assert a2.action_notifies() == []
    assert web.kubevirt.vm("a2")["spec"]["runStrategy"] == "Halted"
