"""A local vmha cluster on the real control plane: what the Helm chart would install, and
the processes it would run — for the integration and end-to-end tests, the demo and the
messaging benchmark.

- `service_accounts(control_plane)`: the agents' and the operator's ServiceAccounts with
  exactly `vmha_node_agent.rbac`'s and `vmha_operator.rbac`'s rules.
- `agent_credentials(control_plane)`: those ServiceAccounts; the agents' CA with a
  serving certificate and client certificates for agents and operator (and one from another
  CA, for tests of refusals); one agent Pod per node with a token bound to it (TokenRequest
  with `boundObjectRef`, so that the apiserver puts the node into it), and the operator's
  token, both with the agents' audience; kubeconfigs with real tokens for both accounts.
- `LocalCluster`: the operator (`operatorproc`: webhooks, votes through the agents) and one
  node agent per node (`agentproc`: each with its kubelet root, its Lease, mutual TLS and
  its pod-bound token), KubeVirt played by `kubevirt`.
- `local_cluster(...)`: all of it in a fresh namespace, for a `with` block.

Agents find each other through their Leases in the agents' namespace; the operator finds
them the same way. Everything binds to 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vmha_node_agent.kubeapi import LEASES, PODS, KubeApi, KubeError, Resource
from vmha_node_agent.leases import lease_name
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.ratelimit import TokenBucket
from vmha_node_agent.rbac import node_agent_namespace_rules, node_agent_rules
from vmha_operator.rbac import operator_agent_namespace_rules, operator_rules
from vmha_testbed.agentproc import AgentProcess
from vmha_testbed.controlplane import ControlPlane
from vmha_testbed.kubevirt import Kubelets, KubeVirt
from vmha_testbed.operatorproc import OperatorProcess
from vmha_testbed.pki import CertificateAuthority
from vmha_testbed.polling import eventually

AGENTS_NAMESPACE = "vmha-system"
AGENT_ACCOUNT = "vmha-node-agent"
OPERATOR_ACCOUNT = "vmha-operator"
TOKEN_AUDIENCE = "vmha.io/node-agent"
NODES = ("node-a", "node-b")
SERVICE_ACCOUNTS = Resource("", "v1", "serviceaccounts")
TOKEN_LIFETIME_S = 3600
SETTLE_TIMEOUT = 60.0

# Quick to react, for tests and the demo: reconnects, socket polling, API retries.
FAST_AGENT_CONFIG: dict[str, Any] = {
    "heartbeat": {"min_interval_ms": 50},
    "channel": {"reconnect_initial_s": 0.05, "reconnect_max_s": 0.5},
    "kubernetes": {
        "socket_poll_s": 0.2,
        "retry_initial_s": 0.2,
        "retry_max_s": 2.0,
        "watch_timeout_s": 60,
        "request_timeout_s": 10.0,
    },
    "messaging": {"lease_duration_s": 10, "lease_renew_s": 2.0},
}


def admin_api(control_plane: ControlPlane, timeout_s: float = 30.0) -> KubeApi:
    """The agent's API client with the control plane's admin credentials (caller closes)."""
    return KubeApi(
        control_plane.api_client(),
        AgentMetrics(),
        timeout_s=timeout_s,
        write_budget=TokenBucket(1e6, 1_000_000),
    )


def request_token(
    api: KubeApi,
    namespace: str,
    account: str,
    *,
    pod: Mapping[str, Any] | None = None,
    lifetime_s: int = TOKEN_LIFETIME_S,
) -> str:
    """A token of ServiceAccount `namespace/account` with the agents' audience
    (TokenRequest), bound to `pod` if given."""
    spec: dict[str, Any] = {"audiences": [TOKEN_AUDIENCE], "expirationSeconds": lifetime_s}
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


# --- credentials --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    """What the chart gives agents and the operator, made here."""

    namespace: str  # the agents' namespace: their Pods, Leases and ServiceAccounts
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
        """The `messaging` section of `node`'s agent configuration."""
        return {
            "address": "127.0.0.1",
            "port": 0,
            "advertise_address": "127.0.0.1",
            "namespace": self.namespace,
            "tls": {
                "ca_file": str(self.ca_file),
                "cert_file": str(self.server_cert[0]),
                "key_file": str(self.server_cert[1]),
                "client_cert_file": str(self.agent_client[0]),
                "client_key_file": str(self.agent_client[1]),
            },
            "token_file": str(self.agent_tokens[node]),
            "agent_service_account": AGENT_ACCOUNT,
            "operator_service_account": OPERATOR_ACCOUNT,
        }

    def operator_vote_args(self, vote_timeout_s: float) -> list[str]:
        """The operator's flags that turn votes on (asking the agents over mutual TLS)."""
        return [
            f"--agent-namespace={self.namespace}",
            f"--agent-ca-file={self.ca_file}",
            f"--agent-cert-file={self.operator_client[0]}",
            f"--agent-key-file={self.operator_client[1]}",
            f"--agent-token-file={self.operator_token}",
            f"--vote-timeout={vote_timeout_s:g}",
        ]


def _role(kind: str, name: str, rules: list[dict[str, Any]], namespace: str | None) -> Any:
    meta: dict[str, Any] = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta,
            "rules": rules}  # fmt: skip


def _binding(kind: str, name: str, account: str, namespace: str | None, home: str) -> Any:
    meta: dict[str, Any] = {"name": name, **({"namespace": namespace} if namespace else {})}
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": f"{kind}Binding",
        "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": home}],
    }


def _rbac_objects(namespace: str, prefix: str) -> list[dict[str, Any]]:
    account = {"apiVersion": "v1", "kind": "ServiceAccount"}
    agent, operator = f"{prefix}-agent", f"{prefix}-operator"
    return [
        {**account, "metadata": {"name": AGENT_ACCOUNT, "namespace": namespace}},
        {**account, "metadata": {"name": OPERATOR_ACCOUNT, "namespace": namespace}},
        _role("ClusterRole", agent, node_agent_rules(), None),
        _binding("ClusterRole", agent, AGENT_ACCOUNT, None, namespace),
        _role("Role", agent, node_agent_namespace_rules(), namespace),
        _binding("Role", agent, AGENT_ACCOUNT, namespace, namespace),
        _role("ClusterRole", operator, operator_rules(manage_webhooks=True), None),
        _binding("ClusterRole", operator, OPERATOR_ACCOUNT, None, namespace),
        _role("Role", operator, operator_agent_namespace_rules(), namespace),
        _binding("Role", operator, OPERATOR_ACCOUNT, namespace, namespace),
    ]


def _agent_pod(api: KubeApi, namespace: str, node: str) -> dict[str, Any]:
    """The agent's Pod on `node` (never run: it only gives tokens bound to it the node)."""
    pod: dict[str, Any] = api.call(
        "create",
        PODS,
        PODS.path(namespace),
        body={
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"generateName": f"vmha-agent-{node}-"},
            "spec": {
                "nodeName": node,
                "serviceAccountName": AGENT_ACCOUNT,
                "automountServiceAccountToken": False,
                "containers": [{"name": "agent", "image": "vmha/node-agent"}],
            },
        },
    )
    return pod


@contextlib.contextmanager
def service_accounts(
    control_plane: ControlPlane,
    *,
    namespace: str = AGENTS_NAMESPACE,
    rbac_prefix: str = "vmha-local",
) -> Iterator[None]:
    """The agents' and the operator's ServiceAccounts in `namespace`, bound to their roles
    (named after `rbac_prefix`); afterwards the cluster roles are removed.

    The namespace itself stays (without a namespace controller a deleted namespace would
    stay Terminating and refuse the next user's objects)."""
    with contextlib.suppress(Exception):
        control_plane.create_namespace(namespace)
    manifest = json.dumps({"apiVersion": "v1", "kind": "List",
                           "items": _rbac_objects(namespace, rbac_prefix)})  # fmt: skip
    control_plane.kubectl("apply", "-f", "-", input=manifest)
    try:
        yield
    finally:
        for suffix in ("agent", "operator"):
            control_plane.kubectl("delete", "clusterrole,clusterrolebinding",
                                  f"{rbac_prefix}-{suffix}", "--ignore-not-found",
                                  check=False)  # fmt: skip


@contextlib.contextmanager
def agent_credentials(
    control_plane: ControlPlane,
    *,
    namespace: str = AGENTS_NAMESPACE,
    nodes: Sequence[str] = NODES,
    rbac_prefix: str = "vmha-local",
    token_lifetime_s: int = TOKEN_LIFETIME_S,
) -> Iterator[Credentials]:
    """Make the credentials (with `service_accounts`); afterwards remove the agent Pods,
    Leases and cluster roles."""
    with (
        service_accounts(control_plane, namespace=namespace, rbac_prefix=rbac_prefix),
        _credentials(control_plane, namespace, nodes, token_lifetime_s) as credentials,
    ):
        yield credentials


@contextlib.contextmanager
def _credentials(
    control_plane: ControlPlane, namespace: str, nodes: Sequence[str], token_lifetime_s: int
) -> Iterator[Credentials]:
    directory = Path(tempfile.mkdtemp(prefix="vmha-creds-"))
    api = admin_api(control_plane)
    try:
        ca = CertificateAuthority.create("vmha-agents-ca")
        ca_file, _ = ca.write(directory, "ca")
        tokens: dict[str, Path] = {}
        for node in nodes:
            tokens[node] = directory / f"{node}.token"
            pod = _agent_pod(api, namespace, node)
            token = request_token(
                api, namespace, AGENT_ACCOUNT, pod=pod, lifetime_s=token_lifetime_s
            )
            tokens[node].write_text(token)
        operator_token = directory / "operator.token"
        operator_token.write_text(
            request_token(api, namespace, OPERATOR_ACCOUNT, lifetime_s=token_lifetime_s)
        )
        outsider = CertificateAuthority.create("not-the-agents-ca")
        yield Credentials(
            namespace=namespace,
            agent_kubeconfig=control_plane.kubeconfig_for_service_account(
                namespace, AGENT_ACCOUNT, expiration_seconds=token_lifetime_s
            ),
            operator_kubeconfig=control_plane.kubeconfig_for_service_account(
                namespace, OPERATOR_ACCOUNT, expiration_seconds=token_lifetime_s
            ),
            ca_file=ca_file,
            server_cert=ca.issue_server_certificate(["127.0.0.1", "localhost"]).write(
                directory, "server"
            ),
            agent_client=ca.issue_client_certificate(AGENT_ACCOUNT).write(directory, "agent"),
            operator_client=ca.issue_client_certificate(OPERATOR_ACCOUNT).write(
                directory, "operator"
            ),
            outsider_client=outsider.issue_client_certificate("intruder").write(
                directory, "outsider"
            ),
            agent_tokens=tokens,
            operator_token=operator_token,
            directory=directory,
        )
    finally:
        for resource in (PODS, LEASES):  # the agents' Pods; Leases of agents that were killed
            with contextlib.suppress(KubeError):
                for item in api.call("list", resource, resource.path(namespace))["items"]:
                    with contextlib.suppress(KubeError):
                        path = resource.path(namespace, item["metadata"]["name"])
                        api.call("delete", resource, path)
        api.close()
        shutil.rmtree(directory, ignore_errors=True)


# --- calling an agent's endpoint by hand ---------------------------------------------------------


def post_to_agent(
    url: str,
    body: Any,
    *,
    ca_file: Path,
    cert: tuple[Path, Path] | None,
    token: str | None,
    timeout: float = 10.0,
) -> tuple[int, dict[str, Any]]:
    """POST JSON to an agent's HTTPS endpoint as any caller would: with or without a client
    certificate and a bearer token. (status, JSON answer); a failed handshake raises."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.check_hostname = False  # as the agents: one certificate for every pod IP
    if cert is not None:
        context.load_cert_chain(*cert)
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), json.loads(error.read())


# --- the cluster ----------------------------------------------------------------------------


def merged(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `override` merged into it, section by section (agent configurations)."""
    result = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(result.get(key), Mapping):
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


class LocalCluster:
    """The operator and one node agent per node on `control_plane`, with `credentials`;
    KubeVirt played in `namespace` by `kubevirt`. Close it to stop everything it started
    and delete the namespace's objects."""

    def __init__(
        self,
        control_plane: ControlPlane,
        credentials: Credentials,
        namespace: str,
        *,
        workdir: Path,
        agent_config: Mapping[str, Any] = FAST_AGENT_CONFIG,
        nodes: Sequence[str] = NODES,
        kubelets: Kubelets | None = None,
    ) -> None:
        self.control_plane = control_plane
        self.credentials = credentials
        self.namespace = namespace
        self.workdir = workdir
        self.agent_config = dict(agent_config)
        self.nodes = tuple(nodes)
        self.api = admin_api(control_plane)
        self.kubevirt = KubeVirt(self.api, namespace, kubelets or Kubelets())
        self.agents: dict[str, AgentProcess] = {}
        self.operator: OperatorProcess | None = None

    # -- node agents --

    def agent_process(self, node: str) -> AgentProcess:
        """`node`'s agent, not started: its configuration, kubelet root and log."""
        # The credentials' part of `messaging`, then this cluster's settings over it.
        config = merged({"messaging": self.credentials.agent_messaging(node)}, self.agent_config)
        return AgentProcess(
            self.workdir / f"agent-{node}.log",
            config,
            node_name=node,
            kubeconfig=self.credentials.agent_kubeconfig,
            kubelet_root=self.kubevirt.kubelets.root_of(node),
        )

    def start_agent(self, node: str) -> AgentProcess:
        agent = self.agent_process(node)
        self.agents[node] = agent.start()
        return agent

    def start_agents(self, timeout: float = SETTLE_TIMEOUT) -> None:
        """Start every node's agent; return once each sees the others' Leases live."""
        for node in self.nodes:
            if node not in self.agents or not self.agents[node].running:
                self.start_agent(node)
        self.wait_peers(timeout)

    def wait_peers(self, timeout: float = SETTLE_TIMEOUT) -> None:
        others = float(len(self.agents) - 1)
        for node, agent in self.agents.items():
            eventually(
                lambda a=agent: a.metric("vmha_peer_agents", state="live") == others,  # type: ignore[misc]
                f"{node}'s agent seeing the other agents",
                timeout,
            )

    def endpoint(self, node: str) -> str:
        """`node`'s agent endpoint, as its Lease publishes it."""
        lease = self.api.call(
            "get", LEASES, LEASES.path(self.credentials.namespace, lease_name(node))
        )
        return str(lease["metadata"]["annotations"]["vmha.io/endpoint"])

    def metric(self, node: str, name: str, **labels: str) -> float:
        """One sample of `node`'s agent (0 when the series does not exist)."""
        return self.agents[node].metric(name, **labels) or 0.0

    # -- operator --

    def start_operator(
        self, *, vote_timeout_s: float | None = 3.0, extra_args: Sequence[str] = ()
    ) -> OperatorProcess:
        """The operator for this namespace, running as its ServiceAccount; votes on (asking
        the agents, at most `vote_timeout_s`) unless that is None."""
        votes = self.credentials.operator_vote_args(vote_timeout_s) if vote_timeout_s else []
        operator = OperatorProcess(
            self.credentials.operator_kubeconfig,
            namespaces=[self.namespace],
            log_path=self.workdir / "operator.log",
            extra_args=[*votes, *extra_args],
        )
        self.operator = operator.start()
        return operator

    # -- as a user would, with kubectl --

    def create_migration(self, vmi: str, name: str) -> subprocess.CompletedProcess[str]:
        """`kubectl create` a VirtualMachineInstanceMigration of `vmi` (nothing migrates:
        there is no virt-controller); the result shows what the user would see."""
        manifest = json.dumps({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": name},
            "spec": {"vmiName": vmi},
        })  # fmt: skip
        return self.control_plane.kubectl(
            "-n", self.namespace, "create", "-f", "-", input=manifest, check=False
        )

    # -- logs and the end --

    def log_tails(self, lines: int = 30) -> str:
        """The last lines of every process's log (for a failed test's output)."""
        parts = [f"--- agent {node} ---\n{a.log_tail(lines)}" for node, a in self.agents.items()]
        if self.operator is not None:
            parts.append(f"--- operator ---\n{self.operator.log_tail(lines)}")
        return "\n".join(parts)

    def stop_processes(self) -> None:
        for agent in self.agents.values():
            agent.stop()
        if self.operator is not None:
            self.operator.stop()

    def close(self) -> None:
        """Stop the agents and the operator, delete the namespace's objects, remove the
        kubelet roots."""
        self.stop_processes()
        self.kubevirt.delete_all()
        self.api.close()
        self.kubevirt.kubelets.close()


@contextlib.contextmanager
def local_cluster(
    control_plane: ControlPlane,
    *,
    workdir: Path,
    agent_config: Mapping[str, Any] = FAST_AGENT_CONFIG,
    vote_timeout_s: float | None = 3.0,
    with_operator: bool = True,
    namespace_prefix: str = "vmha-",
    agents_namespace: str = AGENTS_NAMESPACE,
    token_lifetime_s: int = TOKEN_LIFETIME_S,
    rbac_prefix: str = "vmha-local",
) -> Iterator[LocalCluster]:
    """Credentials, a fresh namespace, the operator serving it (unless not `with_operator`)
    and both nodes' agents (running and seeing each other); everything stopped and removed
    afterwards."""
    with agent_credentials(
        control_plane,
        namespace=agents_namespace,
        token_lifetime_s=token_lifetime_s,
        rbac_prefix=rbac_prefix,
    ) as credentials:
        namespace = control_plane.create_namespace(prefix=namespace_prefix)
        cluster = LocalCluster(
            control_plane, credentials, namespace, workdir=workdir, agent_config=agent_config
        )
        try:
            if with_operator:
                cluster.start_operator(vote_timeout_s=vote_timeout_s)
            cluster.start_agents()
            yield cluster
        finally:
            cluster.close()
            control_plane.delete_namespace(namespace)
