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

import asyncio
import contextlib
import json
import os
import shutil
import signal
import ssl
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vmha_node_agent.devrun import AgentProcess
from vmha_node_agent.kubeapi import (
    LEASES,
    MERGE_PATCH,
    PODS,
    VMGROUPS,
    VMIS,
    VMS,
    KubeApi,
    KubeError,
    Resource,
)
from vmha_node_agent.leases import lease_name
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.ratelimit import TokenBucket
from vmha_node_agent.rbac import node_agent_namespace_rules, node_agent_rules
from vmha_operator.devrun import OperatorProcess
from vmha_operator.rbac import operator_agent_namespace_rules, operator_rules
from vmha_protocol.limits import MAX_BROADCAST_BYTES
from vmha_protocol.nack import NackReason, nack_reason
from vmha_protocol.server_group import MemberState
from vmha_testbed.controlplane import ControlPlane
from vmha_testbed.pki import CertificateAuthority
from vmha_testbed.simguest import SimulatedGuest, acked

pytestmark = pytest.mark.timeout(300)

T = TypeVar("T")
SETTLE_TIMEOUT = 60.0
AGENTS_NAMESPACE = "vmha-messaging"
AGENT_ACCOUNT = "vmha-node-agent"
OPERATOR_ACCOUNT = "vmha-operator"
AUDIENCE = "vmha.io/node-agent"
NODES = ("node-a", "node-b")
ROLE = "vmha-messaging-test"
SERVICE_ACCOUNTS = Resource("", "v1", "serviceaccounts")

AGENT_CONFIG: dict[str, Any] = {
    "heartbeat": {"min_interval_ms": 50},
    "channel": {"reconnect_initial_s": 0.05, "reconnect_max_s": 0.5},
    "kubernetes": {
        "socket_poll_s": 0.2,
        "retry_initial_s": 0.2,
        "retry_max_s": 2.0,
        "watch_timeout_s": 60,
        "request_timeout_s": 10.0,
    },
}


def eventually(check: Callable[[], T | None], what: str, timeout: float = SETTLE_TIMEOUT) -> T:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.05)


# --- credentials: RBAC, certificates, tokens ------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """What the chart gives agents and the operator, made here."""

    agent_kubeconfig: Path
    operator_kubeconfig: Path
    ca_file: Path
    server_cert: tuple[Path, Path]
    agent_client: tuple[Path, Path]
    operator_client: tuple[Path, Path]
    outsider_client: tuple[Path, Path]  # a certificate from another CA
    agent_tokens: dict[str, Path]  # node → a token bound to that node's agent Pod
    operator_token: Path
    directory: Path

    def agent_messaging(self, node: str) -> dict[str, Any]:
        return {
            "address": "127.0.0.1",
            "port": 0,
            "advertise_address": "127.0.0.1",
            "namespace": AGENTS_NAMESPACE,
            "tls": {
                "ca_file": str(self.ca_file),
                "cert_file": str(self.server_cert[0]),
                "key_file": str(self.server_cert[1]),
                "client_cert_file": str(self.agent_client[0]),
                "client_key_file": str(self.agent_client[1]),
            },
            "token_file": str(self.agent_tokens[node]),
            "lease_duration_s": 10,
            "lease_renew_s": 2.0,
            "notification_delay_s": 0.05,
        }


def admin_api(control_plane: ControlPlane) -> KubeApi:
    return KubeApi(
        control_plane.api_client(),
        AgentMetrics(),
        timeout_s=30.0,
        write_budget=TokenBucket(1000.0, 1000),
    )


def _token(api: KubeApi, namespace: str, account: str, pod: dict[str, Any] | None = None) -> str:
    """A token with the agents' audience (TokenRequest), bound to `pod` if given."""
    spec: dict[str, Any] = {"audiences": [AUDIENCE], "expirationSeconds": 3600}
    if pod is not None:
        spec["boundObjectRef"] = {
            "apiVersion": "v1",
            "kind": "Pod",
            "name": pod["metadata"]["name"],
            "uid": pod["metadata"]["uid"],
        }
    path = SERVICE_ACCOUNTS.path(namespace, account) + "/token"
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
    issued = api.call("create", SERVICE_ACCOUNTS, path, body=body)
    return str(issued["status"]["token"])


def _binding(kind: str, name: str, account: str, namespace: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": f"{kind}Binding",
        "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": AGENTS_NAMESPACE}],
    }


def _role(kind: str, name: str, rules: list[dict[str, Any]], namespace: str | None = None) -> Any:
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": meta,
        "rules": rules,
    }


@pytest.fixture(scope="module")
def credentials(control_plane: ControlPlane) -> Iterator[Credentials]:
    with contextlib.suppress(Exception):
        control_plane.create_namespace(AGENTS_NAMESPACE)
    account = {"apiVersion": "v1", "kind": "ServiceAccount"}
    objects: list[dict[str, Any]] = [
        {**account, "metadata": {"name": AGENT_ACCOUNT, "namespace": AGENTS_NAMESPACE}},
        {**account, "metadata": {"name": OPERATOR_ACCOUNT, "namespace": AGENTS_NAMESPACE}},
        _role("ClusterRole", f"{ROLE}-agent", node_agent_rules()),
        _binding("ClusterRole", f"{ROLE}-agent", AGENT_ACCOUNT, None),
        _role("Role", f"{ROLE}-agent", node_agent_namespace_rules(), AGENTS_NAMESPACE),
        _binding("Role", f"{ROLE}-agent", AGENT_ACCOUNT, AGENTS_NAMESPACE),
        _role("ClusterRole", f"{ROLE}-operator", operator_rules(manage_webhooks=True)),
        _binding("ClusterRole", f"{ROLE}-operator", OPERATOR_ACCOUNT, None),
        _role("Role", f"{ROLE}-operator", operator_agent_namespace_rules(), AGENTS_NAMESPACE),
        _binding("Role", f"{ROLE}-operator", OPERATOR_ACCOUNT, AGENTS_NAMESPACE),
    ]
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    control_plane.kubectl("apply", "-f", "-", input=manifest)
    directory = Path(tempfile.mkdtemp(prefix="vmha-mesh-"))
    ca = CertificateAuthority.create("vmha-agents-ca")
    ca_file, _ = ca.write(directory, "ca")
    api = admin_api(control_plane)
    tokens: dict[str, Path] = {}
    for node in NODES:
        # The agent's Pod on the node: its tokens carry the node's name.
        pod = api.call(
            "create",
            PODS,
            PODS.path(AGENTS_NAMESPACE),
            body={
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"generateName": f"vmha-agent-{node}-"},
                "spec": {
                    "nodeName": node,
                    "serviceAccountName": AGENT_ACCOUNT,
                    "containers": [{"name": "agent", "image": "vmha/node-agent"}],
                },
            },
        )
        tokens[node] = directory / f"{node}.token"
        tokens[node].write_text(_token(api, AGENTS_NAMESPACE, AGENT_ACCOUNT, pod))
    operator_token = directory / "operator.token"
    operator_token.write_text(_token(api, AGENTS_NAMESPACE, OPERATOR_ACCOUNT))
    outsider = CertificateAuthority.create("not-the-agents-ca")
    yield Credentials(
        agent_kubeconfig=control_plane.kubeconfig_for_service_account(
            AGENTS_NAMESPACE, AGENT_ACCOUNT
        ),
        operator_kubeconfig=control_plane.kubeconfig_for_service_account(
            AGENTS_NAMESPACE, OPERATOR_ACCOUNT
        ),
        ca_file=ca_file,
        server_cert=ca.issue_server_certificate(["127.0.0.1", "localhost"]).write(
            directory, "server"
        ),
        agent_client=ca.issue_client_certificate(AGENT_ACCOUNT).write(directory, "agent"),
        operator_client=ca.issue_client_certificate(OPERATOR_ACCOUNT).write(directory, "operator"),
        outsider_client=outsider.issue_client_certificate("intruder").write(directory, "outsider"),
        agent_tokens=tokens,
        operator_token=operator_token,
        directory=directory,
    )
    for pod in api.call("list", PODS, PODS.path(AGENTS_NAMESPACE))["items"]:
        with contextlib.suppress(KubeError):
            api.call("delete", PODS, PODS.path(AGENTS_NAMESPACE, pod["metadata"]["name"]))
    api.close()
    for kind in ("clusterrole", "clusterrolebinding"):
        for suffix in ("agent", "operator"):
            control_plane.kubectl("delete", kind, f"{ROLE}-{suffix}", "--ignore-not-found",
                                  check=False)  # fmt: skip
    shutil.rmtree(directory, ignore_errors=True)


# --- guests on their own loop -----------------------------------------------------------------


class GuestLoop:
    """An event loop in a thread for the simulated guests: the test's blocking calls never
    make a guest late, and everything a guest sends is sent from its own loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def do(self, action: Callable[[], T]) -> T:
        async def run() -> T:
            return action()

        return self.call(run())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


# --- the cluster, as KubeVirt would make it ----------------------------------------------------


class World:
    """Plays KubeVirt in one namespace, with the agents of both nodes running."""

    def __init__(
        self,
        control_plane: ControlPlane,
        namespace: str,
        guests: GuestLoop,
        credentials: Credentials,
        *,
        root: Path,
        logs: Path,
    ) -> None:
        self.namespace = namespace
        self.root = root
        self.guests = guests
        self.credentials = credentials
        self.logs = logs
        self.api = admin_api(control_plane)
        self.vms: dict[str, SimulatedGuest] = {}
        self.agents: dict[str, AgentProcess] = {}
        self._links = 0

    # -- agents --

    def start_agent(self, node: str) -> AgentProcess:
        (self.root / node).mkdir(parents=True, exist_ok=True)
        agent = AgentProcess(
            node,
            kubeconfig=self.credentials.agent_kubeconfig,
            kubelet_root=self.root / node,
            log_path=self.logs / f"{node}.log",
            config={**AGENT_CONFIG, "messaging": self.credentials.agent_messaging(node)},
        )
        self.agents[node] = agent.start()
        return agent

    def start_agents(self) -> None:
        for node in NODES:
            self.start_agent(node)
        others = float(len(self.agents) - 1)
        for node, agent in self.agents.items():
            eventually(
                lambda a=agent: a.metric("vmha_peer_agents", state="live") == others,  # type: ignore[misc]
                f"{node} seeing the other agents",
            )

    def endpoint(self, node: str) -> str:
        lease = self.api.call("get", LEASES, LEASES.path(AGENTS_NAMESPACE, lease_name(node)))
        return str(lease["metadata"]["annotations"]["vmha.io/endpoint"])

    # -- objects --

    def group(self, name: str = "web", *, messaging: bool = True) -> None:
        body = {
            "apiVersion": "vmha.io/v1alpha1",
            "kind": "VMGroup",
            "metadata": {"name": name},
            "spec": {
                "policy": "soft-anti-affinity",
                "messaging": messaging,
                "heartbeat": {"minIntervalMs": 100},
            },
        }
        self.api.call("create", VMGROUPS, VMGROUPS.path(self.namespace), body=body)

    def start_vm(self, name: str, node: str, group: str = "web", **guest: Any) -> SimulatedGuest:
        labels = {"vmha.io/group": group}
        vm = self.api.call(
            "create",
            VMS,
            VMS.path(self.namespace),
            body={
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachine",
                "metadata": {"name": name, "labels": labels},
                "spec": {
                    "runStrategy": "Always",
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"domain": {"devices": {}}},
                    },
                },
            },
        )
        owner = {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachine",
            "name": name,
            "uid": vm["metadata"]["uid"],
            "controller": True,
        }
        vmi = self.api.call(
            "create",
            VMIS,
            VMIS.path(self.namespace),
            body={
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstance",
                "metadata": {"name": name, "labels": labels, "ownerReferences": [owner]},
                "spec": {"domain": {"devices": {}}},
            },
        )
        self.set_status(name, {"phase": "Running", "nodeName": node, "conditions": _ready()})
        pod = self.api.call(
            "create",
            PODS,
            PODS.path(self.namespace),
            body={
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {
                    "generateName": f"virt-launcher-{name}-",
                    "labels": {"kubevirt.io/created-by": vmi["metadata"]["uid"]},
                },
                "spec": {
                    "nodeName": node,
                    "automountServiceAccountToken": False,
                    "containers": [
                        {
                            "name": "compute",
                            "image": "quay.io/kubevirt/virt-launcher:v1.5.0",
                            "volumeMounts": [
                                {"name": "private", "mountPath": "/var/run/kubevirt-private"}
                            ],
                        }
                    ],
                    "volumes": [{"name": "private", "emptyDir": {}}],
                },
            },
        )

        async def start() -> SimulatedGuest:
            simulated = SimulatedGuest(
                self._socket_path(node, pod["metadata"]["uid"]), name=name, interval_ms=400,
                **guest,
            )  # fmt: skip
            await simulated.start()
            return simulated

        self.vms[name] = self.guests.call(start())
        return self.vms[name]

    def _socket_path(self, node: str, pod_uid: str) -> Path:
        directory = self.root / node / "pods" / pod_uid / "volumes/kubernetes.io~empty-dir/private"
        directory.mkdir(parents=True)
        self._links += 1
        link = self.root / "l" / str(self._links)
        link.parent.mkdir(exist_ok=True)
        link.symlink_to(directory)
        return link / "vmha"

    def set_status(self, name: str, status: dict[str, Any]) -> None:
        path = VMIS.path(self.namespace, name)
        self.api.call("patch", VMIS, path, body={"status": status}, content_type=MERGE_PATCH)

    def delete_vmi(self, name: str) -> None:
        self.api.call("delete", VMIS, VMIS.path(self.namespace, name))

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
        for agent in self.agents.values():
            agent.stop()
        for guest in self.vms.values():
            with contextlib.suppress(Exception):
                self.guests.call(guest.close())
        for resource in (VMIS, VMS, PODS, VMGROUPS):
            with contextlib.suppress(KubeError):
                items = self.api.call("list", resource, resource.path(self.namespace))["items"]
                for item in items:
                    path = resource.path(self.namespace, item["metadata"]["name"])
                    with contextlib.suppress(KubeError):
                        self.api.call("delete", resource, path)
        self.api.close()


def _ready(paused: bool = False) -> list[dict[str, str]]:
    conditions = [{"type": "Ready", "status": "True"}]
    if paused:  # as virt-handler sets it
        conditions.append({"type": "Paused", "status": "True", "reason": "PausedByUser"})
    return conditions


@pytest.fixture
def world(
    control_plane: ControlPlane, namespace: str, credentials: Credentials, tmp_path: Path
) -> Iterator[World]:
    guests = GuestLoop()
    root = Path(tempfile.mkdtemp(prefix="vm", dir="/tmp"))
    w = World(control_plane, namespace, guests, credentials, root=root, logs=tmp_path)
    yield w
    w.close()
    guests.stop()
    shutil.rmtree(root, ignore_errors=True)
    for node in NODES:
        log = tmp_path / f"{node}.log"
        if log.exists():  # shown by pytest when the test failed
            print(f"--- {node} ---\n" + "\n".join(log.read_text().splitlines()[-60:]))


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

    paused = change({"conditions": _ready(paused=True)}, "paused")
    assert (paused.power_state, paused.node) == ("paused", "node-b")
    assert paused.namespace == web.namespace
    assert change({"conditions": _ready()}, "active").power_state == "running"
    assert change({}, "deleted").display_name == "b1"
    assert notices_about(b1, "b1") == []  # never about itself
    print(f"VMI change → notification at the guests: {[f'{s:.3f}' for s in latencies]} s")
    # The watch delivers the change; nothing polls (a 1 s bound with room for a busy machine).
    assert max(latencies) < 5.0


def test_status_lists_every_member_with_its_state(web: World) -> None:
    web.set_status("b1", {"conditions": _ready(paused=True)})
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


def post(
    url: str,
    body: Any,
    *,
    cert: tuple[Path, Path] | None,
    ca_file: Path,
    token: str | None,
) -> tuple[int, dict[str, Any]]:
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = False
    if cert is not None:
        context.load_cert_chain(*cert)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), json.loads(error.read())


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
    other_token = _token(web.api, web.namespace, "default")  # a valid token, not an agent's

    def refused(reason: str) -> float:
        return agent_b.metric("vmha_peer_refused_total", reason=reason) or 0.0

    # The real thing first: node-a's agent token, a1 (on node-a) to b1 (on node-b).
    legit = batch("a1", ["b1"], "from a1, by hand")
    assert post(url, legit, cert=creds.agent_client, ca_file=creds.ca_file, token=token_a)[0] == 200
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
        status, answer = post(url, body, cert=cert, ca_file=creds.ca_file, token=token)
        assert (status, answer["error"]) == (403, reason)
        assert refused(reason) == before + 1
    # A certificate from another CA does not even finish the handshake.
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        post(url, legit, cert=creds.outsider_client, ca_file=creds.ca_file, token=token_a)
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
def operator(web: World, control_plane: ControlPlane, tmp_path: Path) -> Iterator[OperatorProcess]:
    creds = web.credentials
    args = [
        f"--agent-namespace={AGENTS_NAMESPACE}",
        f"--agent-ca-file={creds.ca_file}",
        f"--agent-cert-file={creds.operator_client[0]}",
        f"--agent-key-file={creds.operator_client[1]}",
        f"--agent-token-file={creds.operator_token}",
        "--vote-timeout=3",
    ]
    with OperatorProcess(
        creds.operator_kubeconfig,
        namespaces=[web.namespace],
        log_path=tmp_path / "operator.log",
        extra_args=args,
    ) as process:
        yield process
    print(
        "--- operator ---\n" + "\n".join((tmp_path / "operator.log").read_text().splitlines()[-40:])
    )


def migrate(control_plane: ControlPlane, namespace: str, vmi: str, name: str) -> Any:
    manifest = f"""
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstanceMigration
metadata: {{name: {name}}}
spec: {{vmiName: {vmi}}}
"""
    return control_plane.kubectl("-n", namespace, "create", "-f", "-", input=manifest, check=False)


def test_a_revocable_migration_is_put_to_the_guest(
    web: World, operator: OperatorProcess, control_plane: ControlPlane
) -> None:
    a1 = web.vms["a1"]
    a1.vote_result, a1.vote_log_msg = "reject", "primary: replication in progress"
    refused = migrate(control_plane, web.namespace, "a1", "m1")
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
    accepted = migrate(control_plane, web.namespace, "a1", "m2")
    assert accepted.returncode == 0, accepted.stderr

    a1.vote_result = None  # a guest that never answers: allowed once its time is up
    started = time.monotonic()
    silent = migrate(control_plane, web.namespace, "a1", "m3")
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
