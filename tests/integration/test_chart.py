"""The Helm chart `charts/vmha`, checked as CI must: `helm lint`, `helm template` for the default
values and every value set in `charts/vmha/ci/`, each rendering applied to the real apiserver
with `kubectl apply --server-side --dry-run=server` (schemas, unknown fields, RBAC), and a real
install and upgrade that keep the generated certificates.

The chart mirrors code that is the source of truth; these tests keep them from drifting: its
webhook configurations (`vmha_operator.webhooks`), its RBAC rules (`vmha_operator.rbac`,
`vmha_node_agent.rbac`), and its command lines and agent configuration, parsed by the
programs' own argument parsers and configuration model.

Then the pods' containers run here as processes, with what the kubelet would give them
(`LocalPod`: the rendered Secrets and ConfigMaps, projected ServiceAccount tokens from the
apiserver, the chart's RBAC): the operator starts and peers, and asks a node agent for a
guest's vote over the agents' mutual TLS with the chart's certificates and tokens.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from vmha_node_agent import cli as agent_cli
from vmha_node_agent.cli import agent_command
from vmha_node_agent.config import AgentConfig, PeerTLS
from vmha_node_agent.rbac import node_agent_namespace_rules, node_agent_rules
from vmha_node_agent.tls import client_context, server_context
from vmha_operator import cli as operator_cli
from vmha_operator.cli import operator_command
from vmha_operator.rbac import (
    operator_agent_namespace_rules,
    operator_peering_namespace_rules,
    operator_rules,
)
from vmha_operator.webhooks import webhook_configurations
from vmha_testbed.children import Child
from vmha_testbed.controlplane import ControlPlane
from vmha_testbed.loopback import accepts, free_port, http_get, http_ok
from vmha_testbed.pki import CertificateAuthority
from vmha_testbed.promtext import metric_value
from vmha_testbed.toolchain import REPO_ROOT, Toolchain, ensure_toolchain

CHART = REPO_ROOT / "charts" / "vmha"
VALUE_SETS: dict[str, Path | None] = {
    "default": None,
    **{
        path.name.removesuffix("-values.yaml"): path
        for path in sorted((CHART / "ci").glob("*-values.yaml"))
    },
}
RELEASE = "vmha"
HELM_TIMEOUT = 180.0
# The Prometheus Operator's API is served by the test control plane (its CRDs are installed);
# `helm template` must be told, as it does not ask a cluster.
MONITORING_API = "monitoring.coreos.com/v1"
# cert-manager's CRDs come from its Go module (as the Prometheus Operator's do): the chart's
# Certificate and Issuer objects are checked against cert-manager's real schema.
CERT_MANAGER_CRDS = ("certificates", "issuers", "clusterissuers")
KOPF_PEERING_CRDS = (
    CHART / "crds" / "clusterkopfpeerings.kopf.dev.yaml",
    CHART / "crds" / "kopfpeerings.kopf.dev.yaml",
)

Object = dict[str, Any]


# --- rendering --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendering:
    objects: list[Object]

    def kinds(self) -> Counter[str]:
        return Counter(obj["kind"] for obj in self.objects)

    def all(self, kind: str) -> list[Object]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> Object:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
        return found[0]

    def workload(self, component: str) -> Object:
        return next(
            obj
            for obj in self.objects
            if obj["kind"] in ("Deployment", "StatefulSet", "DaemonSet")
            and obj["metadata"]["labels"]["app.kubernetes.io/component"] == component
        )

    def component(self, kind: str, component: str) -> list[Object]:
        return [
            obj
            for obj in self.all(kind)
            if obj["metadata"]["labels"].get("app.kubernetes.io/component") == component
        ]

    def secret_data(self, name: str) -> dict[str, bytes]:
        """A rendered Secret's data, decoded."""
        data = self.one("Secret", name)["data"]
        return {key: base64.b64decode(value) for key, value in data.items()}

    def secret_names(self) -> set[str]:
        """Secrets the chart makes: its own, and those its cert-manager Certificates fill."""
        names = {secret["metadata"]["name"] for secret in self.all("Secret")}
        return names | {cert["spec"]["secretName"] for cert in self.all("Certificate")}

    def yaml(self) -> str:
        return yaml.safe_dump_all(self.objects, sort_keys=False)


@pytest.fixture(scope="module")
def tools() -> Toolchain:
    return ensure_toolchain()


@pytest.fixture(scope="module")
def helm_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """helm with its own config, cache and data directories (none of the user's repos)."""
    home = tmp_path_factory.mktemp("helm-home")
    return {
        **os.environ,
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_DATA_HOME": str(home / "data"),
    }


def run_helm(tools: Toolchain, env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [str(tools.helm), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=HELM_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


def values_args(value_set: str) -> list[str]:
    path = VALUE_SETS[value_set]
    return ["--values", str(path)] if path else []


def load_values(value_set: str) -> dict[str, Any]:
    """The chart's values with the value set merged in (deep merge, as helm does)."""

    def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
        merged = dict(base)
        for key, value in override.items():
            both = isinstance(value, dict) and isinstance(base.get(key), dict)
            merged[key] = merge(base[key], value) if both else value
        return merged

    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    path = VALUE_SETS[value_set]
    return merge(values, yaml.safe_load(path.read_text())) if path else values


def render(
    tools: Toolchain, env: dict[str, str], value_set: str, namespace: str, *extra: str
) -> Rendering:
    output = run_helm(
        tools,
        env,
        "template",
        RELEASE,
        str(CHART),
        f"--namespace={namespace}",
        "--include-crds",
        f"--api-versions={MONITORING_API}",
        f"--kube-version={tools.versions.kube}",
        *values_args(value_set),
        *extra,
    )
    return Rendering([doc for doc in yaml.safe_load_all(output) if doc])


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def value_set(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture(scope="module")
def rendering(tools: Toolchain, helm_env: dict[str, str], value_set: str) -> Rendering:
    return render(tools, helm_env, value_set, "vmha-system")


# What the values switch on, as the chart decides it (templates/_helpers.tpl).


def messaging_on(values: dict[str, Any]) -> bool:
    return bool(values["nodeAgent"]["enabled"] and values["messaging"]["enabled"])


def votes_on(values: dict[str, Any]) -> bool:
    return messaging_on(values) and bool(values["votes"]["enabled"])


def peering_on(values: dict[str, Any]) -> bool:
    return bool(values["operator"]["replicas"] > 1)


def namespaced_peering(values: dict[str, Any]) -> bool:
    return peering_on(values) and bool(values["operator"]["watchNamespaces"])


# --- helm lint and what each value set renders ----------------------------------------------


def test_helm_lint_is_clean(tools: Toolchain, helm_env: dict[str, str], value_set: str) -> None:
    output = run_helm(tools, helm_env, "lint", "--strict", str(CHART), *values_args(value_set))
    assert "1 chart(s) linted, 0 chart(s) failed" in output


def test_the_values_schema_refuses_a_misspelt_key(
    tools: Toolchain, helm_env: dict[str, str]
) -> None:
    result = subprocess.run(
        [str(tools.helm), "template", str(CHART), "--set", "operator.replica=2"],
        capture_output=True,
        text=True,
        env=helm_env,
        timeout=HELM_TIMEOUT,
        check=False,
    )
    assert result.returncode != 0
    assert "additional properties 'replica' not allowed" in result.stderr


COMMON_KINDS = {
    "CustomResourceDefinition": 3,
    "ServiceAccount": 2,
    "ClusterRole": 2,
    "ClusterRoleBinding": 2,
    # The agents' Leases; the operator's view of them (votes).
    "Role": 2,
    "RoleBinding": 2,
    "Deployment": 1,
    "Service": 2,
    # The webhook's; the agents' CA, the agents' certificate, the operator's for the agents.
    "Secret": 4,
    "ConfigMap": 1,
    "DaemonSet": 1,
    "MutatingWebhookConfiguration": 1,
    "ValidatingWebhookConfiguration": 1,
    "ServiceMonitor": 1,
    "PrometheusRule": 1,
    "NetworkPolicy": 1,
}
STANDBY = {"Deployment": 0, "StatefulSet": 1, "PodDisruptionBudget": 1}
EXPECTED_KINDS: dict[str, dict[str, int]] = {
    "default": COMMON_KINDS,
    "peering": {**COMMON_KINDS, **STANDBY, "ClusterKopfPeering": 1},
    # Two watched namespaces: a KopfPeering and a Role (+ binding) for it in each.
    "namespaced-peering": {
        **COMMON_KINDS,
        **STANDBY,
        "KopfPeering": 2,
        "Role": 4,
        "RoleBinding": 4,
    },
    # Self-signed root; CA issuers for the webhook and the agents. Certificates: both CAs,
    # the webhook's, the agents', the operator's.
    "cert-manager": {**COMMON_KINDS, "Secret": 0, "Issuer": 3, "Certificate": 5},
    "cert-manager-issuer": {**COMMON_KINDS, "Secret": 0, "Issuer": 2, "Certificate": 4},
    "metrics-off": {
        **COMMON_KINDS,
        "Service": 1,
        "ServiceMonitor": 0,
        "PrometheusRule": 0,
        "NetworkPolicy": 0,
    },
    "operator-only": {
        **COMMON_KINDS,
        "ServiceAccount": 1,
        "ClusterRole": 1,
        "ClusterRoleBinding": 1,
        "Role": 0,
        "RoleBinding": 0,
        "Service": 1,
        "Secret": 1,
        "ConfigMap": 0,
        "DaemonSet": 0,
        "ServiceMonitor": 0,
        "PrometheusRule": 0,
        "NetworkPolicy": 0,
    },
    "messaging-off": {**COMMON_KINDS, "Role": 0, "RoleBinding": 0, "Secret": 1},
    "votes-off": {**COMMON_KINDS, "Role": 1, "RoleBinding": 1, "Secret": 3},
    # serviceAccount.create: false for the operator.
    "custom": {**COMMON_KINDS, "ServiceAccount": 1},
}


def test_each_value_set_renders_its_objects(rendering: Rendering, value_set: str) -> None:
    assert value_set in EXPECTED_KINDS, f"add ci/{value_set}-values.yaml to EXPECTED_KINDS"
    expected = {kind: n for kind, n in EXPECTED_KINDS[value_set].items() if n}
    assert dict(rendering.kinds()) == expected


def test_monitoring_objects_need_the_prometheus_operator_api(
    tools: Toolchain, helm_env: dict[str, str]
) -> None:
    output = run_helm(tools, helm_env, "template", RELEASE, str(CHART))
    kinds = {doc["kind"] for doc in yaml.safe_load_all(output) if doc}
    assert "DaemonSet" in kinds
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}


def test_a_standby_operator_of_some_namespaces_peers_in_each_of_them(
    tools: Toolchain, helm_env: dict[str, str]
) -> None:
    """kopf peers an operator that serves some namespaces through a KopfPeering in each
    (never a ClusterKopfPeering), which its Role there lets it keep."""
    rendering = render(
        tools,
        helm_env,
        "default",
        "vmha-system",
        "--set=operator.replicas=3",
        "--set=operator.watchNamespaces={prod,staging}",
    )
    peerings = rendering.all("KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["prod", "staging"]
    assert {p["metadata"]["name"] for p in peerings} == {"vmha-operator"}
    assert not rendering.all("ClusterKopfPeering")
    roles = {
        role["metadata"]["namespace"]: role["rules"]
        for role in rendering.all("Role")
        if role["metadata"]["name"] == "vmha-operator-peering"
    }
    assert roles == {ns: operator_peering_namespace_rules() for ns in ("prod", "staging")}
    workload = rendering.workload("operator")
    assert workload["kind"] == "StatefulSet" and workload["spec"]["replicas"] == 3


# --- the rendered objects against the real apiserver -----------------------------------------


CRD_PREFIX = "customresourcedefinition.apiextensions.k8s.io/"


def crd_name(path: Path) -> str:
    name: str = yaml.safe_load(path.read_text())["metadata"]["name"]
    return name


def cert_manager_crd_files() -> list[Path]:
    """cert-manager's CRD manifests, fetched from its Go module by hack/build-toolchain.sh."""
    directory = ensure_toolchain().cert_manager_crds
    return [directory / f"cert-manager.io_{plural}.yaml" for plural in CERT_MANAGER_CRDS]


@pytest.fixture(scope="module")
def cluster_with_crds(control_plane: ControlPlane) -> ControlPlane:
    """The control plane with the CRDs that the chart's custom objects need: kopf's peering
    (from the chart's crds/) and cert-manager's."""
    needed = [*KOPF_PEERING_CRDS, *cert_manager_crd_files()]
    installed = set(control_plane.kubectl("get", "crd", "-o", "name").stdout.split())
    missing = [path for path in needed if f"{CRD_PREFIX}{crd_name(path)}" not in installed]
    control_plane.install_crd_files(missing)
    return control_plane


def ensure_namespaces(control_plane: ControlPlane, names: set[str]) -> None:
    """Namespaces the chart puts objects into besides its own (the operator's watched
    namespaces: KopfPeerings and Roles), which must exist, as for a real install."""
    existing = set(control_plane.kubectl("get", "namespaces", "-o", "name").stdout.split())
    for name in sorted(names):
        if f"namespace/{name}" not in existing:
            control_plane.create_namespace(name)


def server_dry_run(control_plane: ControlPlane, manifests: str) -> list[str]:
    """`kubectl apply --server-side --dry-run=server`; returns kubectl's lines, one per object."""
    result = control_plane.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "--validate=strict",
        "--field-manager=vmha-chart-test",
        # The control plane created the VMGroup CRD: taking its fields over is no error.
        "--force-conflicts",
        "-f",
        "-",
        input=manifests,
        check=False,
    )
    assert result.returncode == 0, f"the apiserver refused the chart:\n{result.stderr}"
    return result.stdout.splitlines()


def test_every_rendered_object_passes_a_server_side_dry_run(
    cluster_with_crds: ControlPlane,
    tools: Toolchain,
    helm_env: dict[str, str],
    value_set: str,
    namespace: str,
) -> None:
    rendering = render(tools, helm_env, value_set, namespace)
    others = {obj["metadata"].get("namespace") for obj in rendering.objects} - {None, namespace}
    ensure_namespaces(cluster_with_crds, {str(name) for name in others})
    lines = server_dry_run(cluster_with_crds, rendering.yaml())
    assert len(lines) == len(rendering.objects)
    assert all(line.endswith("serverside-applied (server dry run)") for line in lines), lines


def test_the_dry_run_catches_what_the_schema_forbids(
    cluster_with_crds: ControlPlane, tools: Toolchain, helm_env: dict[str, str], namespace: str
) -> None:
    """The check above can fail: an unknown field in the DaemonSet is refused."""
    rendering = render(tools, helm_env, "default", namespace)
    daemonset = rendering.one("DaemonSet")
    daemonset["spec"]["template"]["spec"]["containers"][0]["mountPath"] = "/oops"
    result = cluster_with_crds.kubectl(
        "apply",
        "--server-side",
        "--dry-run=server",
        "-f",
        "-",
        input=yaml.safe_dump(daemonset),
        check=False,
    )
    assert result.returncode != 0
    assert '.containers[name="node-agent"].mountPath: field not declared in schema' in (
        result.stderr
    )


def test_rbac_rules_name_resources_the_apiserver_serves(
    cluster_with_crds: ControlPlane, rendering: Rendering
) -> None:
    """RBAC accepts any resource name; a misspelt one would silently grant nothing."""
    names = cluster_with_crds.kubectl("api-resources", "-o", "name").stdout.split()
    # `pods`, `deployments.apps`, `virtualmachines.kubevirt.io`: <resource>[.<group>]
    served = {(name.partition(".")[2], name.partition(".")[0]) for name in names}
    for role in [*rendering.all("ClusterRole"), *rendering.all("Role")]:
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    assert (group, resource.split("/")[0]) in served, (role["metadata"], rule)


# --- the chart mirrors the code -------------------------------------------------------------


def webhook_secret_name(rendering: Rendering) -> str:
    name: str = volumes(rendering.workload("operator"))["webhook-tls"]["secret"]["secretName"]
    return name


def test_webhook_configurations_match_the_operator(rendering: Rendering, value_set: str) -> None:
    values = load_values(value_set)
    cert_manager = values["webhook"]["certManager"]["enabled"]
    ca_bundle = (
        ""
        if cert_manager
        else rendering.one("Secret", webhook_secret_name(rendering))["data"]["ca.crt"]
    )
    mutating = rendering.one("MutatingWebhookConfiguration")
    name = mutating["metadata"]["name"]
    service = rendering.one("Service", f"{name}-operator")["metadata"]["name"]
    expected = webhook_configurations(name, service, "vmha-system", ca_bundle)
    selector = expected_namespace_selector(values)
    validating = rendering.one("ValidatingWebhookConfiguration")
    for want, got in zip(expected, [mutating, validating], strict=True):
        assert (got["kind"], got["metadata"]["name"]) == (want["kind"], want["metadata"]["name"])
        for webhook in got["webhooks"]:
            assert webhook.pop("namespaceSelector", None) == selector
        if cert_manager:
            for webhook in want["webhooks"]:
                del webhook["clientConfig"]["caBundle"]
        assert got["webhooks"] == want["webhooks"]


def expected_namespace_selector(values: dict[str, Any]) -> dict[str, Any] | None:
    if values["webhook"]["namespaceSelector"]:
        selector: dict[str, Any] = values["webhook"]["namespaceSelector"]
        return selector
    if values["operator"]["watchNamespaces"]:
        return {
            "matchExpressions": [
                {
                    "key": "kubernetes.io/metadata.name",
                    "operator": "In",
                    "values": values["operator"]["watchNamespaces"],
                }
            ]
        }
    return None


def expected_roles(values: dict[str, Any], namespace: str) -> dict[tuple[str, str], list[Any]]:
    """(namespace, component) of each Role the values call for → its rules, from the code."""
    roles: dict[tuple[str, str], list[Any]] = {}
    if messaging_on(values):
        roles[(namespace, "node-agent")] = node_agent_namespace_rules()
    if votes_on(values):
        roles[(namespace, "operator")] = operator_agent_namespace_rules()
    if namespaced_peering(values):
        for watched in values["operator"]["watchNamespaces"]:
            roles[(watched, "operator")] = operator_peering_namespace_rules()
    return roles


def test_rbac_rules_match_the_programs(rendering: Rendering, value_set: str) -> None:
    values = load_values(value_set)
    roles = {
        role["metadata"]["labels"]["app.kubernetes.io/component"]: role
        for role in rendering.all("ClusterRole")
    }
    cluster_peering = peering_on(values) and not namespaced_peering(values)
    assert roles["operator"]["rules"] == operator_rules(peering=cluster_peering)
    if values["nodeAgent"]["enabled"]:
        assert roles["node-agent"]["rules"] == node_agent_rules()
    for binding in rendering.all("ClusterRoleBinding"):
        component = binding["metadata"]["labels"]["app.kubernetes.io/component"]
        assert binding["roleRef"]["name"] == roles[component]["metadata"]["name"]
        assert binding["subjects"] == service_account_subject(rendering, component)

    namespaced = {role_key(role): role for role in rendering.all("Role")}
    assert len(namespaced) == len(rendering.all("Role")), "two Roles for one purpose"
    want = expected_roles(values, "vmha-system")
    assert {key: role["rules"] for key, role in namespaced.items()} == want
    bindings = rendering.all("RoleBinding")
    assert len(bindings) == len(namespaced)
    for binding in bindings:
        namespace, component = role_key(binding)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": namespaced[(namespace, component)]["metadata"]["name"],
        }
        assert binding["subjects"] == service_account_subject(rendering, component)


def role_key(obj: Object) -> tuple[str, str]:
    """Where a Role (or RoleBinding) is, and whose it is."""
    meta = obj["metadata"]
    return meta["namespace"], meta["labels"]["app.kubernetes.io/component"]


def service_account_subject(rendering: Rendering, component: str) -> list[Object]:
    pod_spec = rendering.workload(component)["spec"]["template"]["spec"]
    return [
        {
            "kind": "ServiceAccount",
            "name": pod_spec["serviceAccountName"],
            "namespace": "vmha-system",
        }
    ]


def container_env(workload: Object) -> dict[str, Object]:
    container = workload["spec"]["template"]["spec"]["containers"][0]
    return {variable["name"]: variable for variable in container.get("env", [])}


def container_argv(workload: Object, env: dict[str, str]) -> list[str]:
    """The container's arguments with Kubernetes' $(VAR) references expanded from `env`."""
    container = workload["spec"]["template"]["spec"]["containers"][0]
    declared = set(container_env(workload))
    assert set(env) <= declared, f"{set(env) - declared} not in the container's env"
    return [
        re.sub(r"\$\((\w+)\)", lambda match: env[match.group(1)], argument)
        for argument in container["args"]
    ]


def mounts_by_volume(workload: Object) -> dict[str, Object]:
    container = workload["spec"]["template"]["spec"]["containers"][0]
    return {mount["name"]: mount for mount in container["volumeMounts"]}


def volumes(workload: Object) -> dict[str, Object]:
    return {volume["name"]: volume for volume in workload["spec"]["template"]["spec"]["volumes"]}


def ports(workload: Object) -> dict[str, int]:
    container = workload["spec"]["template"]["spec"]["containers"][0]
    return {port["name"]: port["containerPort"] for port in container["ports"]}


def projected_token(workload: Object, volume: str) -> Object:
    """The serviceAccountToken source of a projected volume (the only source)."""
    sources = volumes(workload)[volume]["projected"]["sources"]
    assert len(sources) == 1
    token: Object = sources[0]["serviceAccountToken"]
    return token


def field_ref(workload: Object, variable: str) -> str:
    path: str = container_env(workload)[variable]["valueFrom"]["fieldRef"]["fieldPath"]
    return path


def operator_env(workload: Object, pod_index: int = 1) -> dict[str, str]:
    """The operator container's variables as its pod would have them (release vmha-system)."""
    declared = container_env(workload)
    env = {"POD_NAME": f"vmha-operator-{pod_index}"}
    if "POD_INDEX" in declared:
        env["POD_INDEX"] = str(pod_index)
    if "POD_NAMESPACE" in declared:
        env["POD_NAMESPACE"] = "vmha-system"
    return env


def test_the_operator_command_line_is_what_the_operator_accepts(
    rendering: Rendering, value_set: str
) -> None:
    values = load_values(value_set)
    workload = rendering.workload("operator")
    peering = peering_on(values)
    args = operator_cli.parser().parse_args(container_argv(workload, operator_env(workload)))
    config = operator_cli.config_from_args(args)

    tls_dir = mounts_by_volume(workload)["webhook-tls"]["mountPath"]
    assert (config.webhook.cert_file, config.webhook.key_file) == (
        f"{tls_dir}/tls.crt",
        f"{tls_dir}/tls.key",
    )
    assert webhook_secret_name(rendering) in rendering.secret_names()
    assert config.webhook.listen_address == "0.0.0.0"
    assert config.webhook.port == ports(workload)["webhook"]
    assert config.webhook.managed is None  # the chart owns the configurations
    assert args.liveness == f"http://0.0.0.0:{ports(workload)['health']}/healthz"
    assert list(config.namespaces) == values["operator"]["watchNamespaces"]
    if peering:
        assert workload["kind"] == "StatefulSet"
        kind = "KopfPeering" if namespaced_peering(values) else "ClusterKopfPeering"
        assert {p["metadata"]["name"] for p in rendering.all(kind)} == {args.peering}
        assert args.priority == 1
    else:
        assert workload["kind"] == "Deployment"
        assert args.peering is None

    votes = config.votes
    assert votes.enabled == votes_on(values)
    if not votes.enabled:
        assert "messaging-tls" not in volumes(workload)
        return
    # The agents' namespace is the operator's own (the downward API), where their Leases are.
    assert field_ref(workload, "POD_NAMESPACE") == "metadata.namespace"
    assert votes.agent_namespace == "vmha-system"
    assert votes.timeout_s == values["votes"]["timeoutSeconds"]
    client_dir = mounts_by_volume(workload)["messaging-tls"]["mountPath"]
    assert (votes.ca_file, votes.cert_file, votes.key_file) == (
        f"{client_dir}/ca.crt",
        f"{client_dir}/tls.crt",
        f"{client_dir}/tls.key",
    )
    secret = volumes(workload)["messaging-tls"]["secret"]["secretName"]
    assert secret in rendering.secret_names()
    assert secret != agent_secret_name(rendering)  # a certificate of its own
    token_dir = mounts_by_volume(workload)["messaging-token"]["mountPath"]
    token = projected_token(workload, "messaging-token")
    assert votes.token_file == f"{token_dir}/{token['path']}"
    agent = agent_config(rendering, value_set)
    assert token["audience"] == agent.messaging.token_audience
    assert token["expirationSeconds"] == values["messaging"]["tokenExpirationSeconds"]
    # The agents accept votes only from this ServiceAccount.
    account = workload["spec"]["template"]["spec"]["serviceAccountName"]
    assert agent.messaging.account(agent.messaging.operator_service_account) == (
        f"system:serviceaccount:vmha-system:{account}"
    )


def agent_secret_name(rendering: Rendering) -> str:
    name: str = volumes(rendering.workload("node-agent"))["messaging-tls"]["secret"]["secretName"]
    return name


AGENT_POD_ENV = {"NODE_NAME": "node-a", "POD_IP": "10.0.3.7", "POD_NAMESPACE": "vmha-system"}


def agent_argv(workload: Object, config_dir: Path) -> list[str]:
    """The agent's arguments with the configuration file taken from `config_dir`."""
    declared = container_env(workload)
    env = {key: value for key, value in AGENT_POD_ENV.items() if key in declared}
    config_mount = mounts_by_volume(workload)["config"]["mountPath"]
    argv = container_argv(workload, env)
    local = [arg.replace(f"--config={config_mount}/", f"--config={config_dir}/") for arg in argv]
    assert local != argv, "no --config in the mount"
    return local


def agent_config(rendering: Rendering, value_set: str) -> AgentConfig:
    """The configuration the agent builds from its command line, file and environment in the
    chart's pod (the file written where the test can read it)."""
    workload = rendering.workload("node-agent")
    declared = container_env(workload)
    env = {key: value for key, value in AGENT_POD_ENV.items() if key in declared}
    with (
        tempfile.TemporaryDirectory(prefix="vmha-chart-") as directory,
        _environment(env, unset=set(AGENT_POD_ENV) - set(env)),
    ):
        (Path(directory) / "agent.yaml").write_text(
            rendering.one("ConfigMap")["data"]["agent.yaml"]
        )
        argv = agent_argv(workload, Path(directory))
        return agent_cli.build_config(agent_cli.parse_args(argv))


@contextlib.contextmanager
def _environment(values: dict[str, str], unset: set[str]) -> Iterator[None]:
    """os.environ with `values` set and `unset` removed, restored afterwards."""
    saved = {key: os.environ.get(key) for key in {*values, *unset}}
    os.environ.update(values)
    for key in unset:
        os.environ.pop(key, None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def test_the_agent_command_line_and_configuration_are_what_the_agent_accepts(
    rendering: Rendering, value_set: str
) -> None:
    values = load_values(value_set)
    if not values["nodeAgent"]["enabled"]:
        pytest.skip("this value set has no node agent")
    workload = rendering.workload("node-agent")
    config = agent_config(rendering, value_set)

    assert config.node_name == "node-a"
    assert field_ref(workload, "NODE_NAME") == "spec.nodeName"
    assert config.kubernetes.wanted()
    assert config.metrics.port == ports(workload)["metrics"]
    assert config.metrics.address == values["nodeAgent"]["metrics"]["address"]
    # The agent looks for sockets under <kubelet root>/pods, where the host's pods dir is.
    pods_mount = mounts_by_volume(workload)["kubelet-pods"]
    assert str(config.kubernetes.kubelet_root / "pods") == pods_mount["mountPath"]
    host_root = values["nodeAgent"]["kubeletRoot"].rstrip("/")
    assert volumes(workload)["kubelet-pods"]["hostPath"]["path"] == f"{host_root}/pods"
    doctor = values["nodeAgent"]["doctor"]
    assert config.doctor.url == (
        doctor["url"] or values["nodeAgent"]["config"].get("doctor", {}).get("url")
    )
    if doctor["tokenSecret"]:
        token_dir = mounts_by_volume(workload)["doctor-token"]["mountPath"]
        assert str(config.doctor.token_file) == f"{token_dir}/token"
    for section, settings in values["nodeAgent"]["config"].items():
        for key, value in settings.items():
            assert getattr(getattr(config, section), key) == value

    messaging = config.messaging
    assert messaging.enabled == messaging_on(values)
    assert messaging.peer_transport == messaging_on(values)
    if not messaging.enabled:
        assert "messaging" not in ports(workload)
        assert not {"messaging-tls", "messaging-token"} & set(volumes(workload))
        return
    assert messaging.address == values["messaging"]["address"]
    assert messaging.port == ports(workload)["messaging"] == values["messaging"]["port"]
    # Published in its Lease: the pod IP; the Leases live in the agent's own namespace.
    assert field_ref(workload, "POD_IP") == "status.podIP"
    assert field_ref(workload, "POD_NAMESPACE") == "metadata.namespace"
    assert messaging.advertise_address == AGENT_POD_ENV["POD_IP"]
    assert messaging.namespace == "vmha-system"
    tls_dir = mounts_by_volume(workload)["messaging-tls"]["mountPath"]
    assert messaging.tls == PeerTLS(
        ca_file=Path(f"{tls_dir}/ca.crt"),
        cert_file=Path(f"{tls_dir}/tls.crt"),
        key_file=Path(f"{tls_dir}/tls.key"),
    )
    assert agent_secret_name(rendering) in rendering.secret_names()
    token = projected_token(workload, "messaging-token")
    token_dir = mounts_by_volume(workload)["messaging-token"]["mountPath"]
    assert messaging.token_file == Path(f"{token_dir}/{token['path']}")
    assert token["audience"] == messaging.token_audience
    assert token["expirationSeconds"] == values["messaging"]["tokenExpirationSeconds"]
    # Broadcasts are accepted from the agents' ServiceAccount, votes from the operator's.
    accounts = {
        component: rendering.workload(component)["spec"]["template"]["spec"]["serviceAccountName"]
        for component in ("node-agent", "operator")
    }
    assert messaging.agent_service_account == accounts["node-agent"]
    assert messaging.operator_service_account == accounts["operator"]


def test_the_metrics_are_scraped_where_the_agent_listens(rendering: Rendering) -> None:
    if "ServiceMonitor" not in rendering.kinds():
        pytest.skip("no ServiceMonitor in this value set")
    agent = rendering.workload("node-agent")
    service = rendering.one("Service", agent["metadata"]["name"])
    monitor = rendering.one("ServiceMonitor")
    selector = agent["spec"]["selector"]["matchLabels"]
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"][0]["targetPort"] == "metrics"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [
        service["spec"]["ports"][0]["name"]
    ]


def test_the_network_policy_admits_messaging_only_from_agents_and_operator(
    rendering: Rendering, value_set: str
) -> None:
    if "NetworkPolicy" not in rendering.kinds():
        pytest.skip("no NetworkPolicy in this value set")
    values = load_values(value_set)
    agent = rendering.workload("node-agent")
    policy = rendering.one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == agent["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    rules = {port["port"]: rule for rule in policy["spec"]["ingress"] for port in rule["ports"]}
    assert all(len(rule["ports"]) == 1 for rule in policy["spec"]["ingress"])
    assert set(rules) == ({"metrics", "messaging"} if messaging_on(values) else {"metrics"})
    assert set(rules) <= set(ports(agent))
    assert rules["metrics"].get("from", []) == values["networkPolicy"]["metricsFrom"]
    if messaging_on(values):
        # Same namespace (no namespaceSelector): this release's agents and operator only.
        allowed = [peer["podSelector"]["matchLabels"] for peer in rules["messaging"]["from"]]
        assert all(peer.keys() == {"podSelector"} for peer in rules["messaging"]["from"])
        expected = [agent["spec"]["selector"]["matchLabels"]]
        if votes_on(values):
            expected.append(rendering.workload("operator")["spec"]["selector"]["matchLabels"])
        assert allowed == expected


def test_the_generated_certificate_serves_the_webhook_service(
    tools: Toolchain, helm_env: dict[str, str]
) -> None:
    rendering = render(tools, helm_env, "default", "vmha-system")
    secret = rendering.secret_data(webhook_secret_name(rendering))
    ca = x509.load_pem_x509_certificate(secret["ca.crt"])
    cert = x509.load_pem_x509_certificate(secret["tls.crt"])
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "vmha-operator.vmha-system.svc" in names.get_values_for_type(x509.DNSName)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    checksum = rendering.workload("operator")["spec"]["template"]["metadata"]["annotations"]
    assert checksum["checksum/webhook-tls"]  # a new certificate rolls the operator


def write_tls(directory: Path, data: dict[str, bytes]) -> PeerTLS:
    directory.mkdir(parents=True)
    for key, value in data.items():
        (directory / key).write_bytes(value)
    return PeerTLS(
        ca_file=directory / "ca.crt",
        cert_file=directory / "tls.crt",
        key_file=directory / "tls.key",
    )


def handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> dict[str, Any]:
    """A TLS handshake over a socket pair; returns the certificate the server saw."""
    left, right = socket.socketpair()
    with left, right:
        left.setblocking(False)
        right.setblocking(False)
        tls_server = server.wrap_socket(left, server_side=True, do_handshake_on_connect=False)
        tls_client = client.wrap_socket(right, do_handshake_on_connect=False)
        pending = {tls_server, tls_client}
        deadline = time.monotonic() + 10
        while pending:
            assert time.monotonic() < deadline, "handshake did not finish"
            for end in list(pending):
                try:
                    end.do_handshake()
                    pending.discard(end)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    time.sleep(0.001)
        peer: dict[str, Any] = tls_server.getpeercert() or {}
        return peer


def test_the_generated_messaging_certificates_admit_agents_and_the_operator_only(
    tools: Toolchain, helm_env: dict[str, str], tmp_path: Path
) -> None:
    """The agents' certificate and the operator's come from the agents' own CA, with the
    usages the agents' TLS code checks: an agent serves and calls other agents (serverAuth
    and clientAuth), the operator calls them; a certificate from another CA is refused."""
    rendering = render(tools, helm_env, "default", "vmha-system")
    operator = rendering.workload("operator")
    operator_secret = volumes(operator)["messaging-tls"]["secret"]["secretName"]
    agent = write_tls(tmp_path / "agent", rendering.secret_data(agent_secret_name(rendering)))
    client = write_tls(tmp_path / "operator", rendering.secret_data(operator_secret))
    ca = rendering.secret_data("vmha-messaging-ca")
    assert (tmp_path / "agent" / "ca.crt").read_bytes() == ca["tls.crt"]
    assert (tmp_path / "operator" / "ca.crt").read_bytes() == ca["tls.crt"]
    authority = x509.load_pem_x509_certificate(ca["tls.crt"])
    assert authority.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for holder, wanted in [
        ("agent", {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}),
        ("operator", {ExtendedKeyUsageOID.CLIENT_AUTH}),
    ]:
        cert = x509.load_pem_x509_certificate((tmp_path / holder / "tls.crt").read_bytes())
        cert.verify_directly_issued_by(authority)
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        assert wanted <= usages
    agent_ca = x509.load_pem_x509_certificate(rendering.secret_data("vmha-webhook-tls")["ca.crt"])
    assert agent_ca.subject != authority.subject  # never the webhook's CA

    server = server_context(agent)
    assert handshake(server, client_context(agent))["subject"]  # agent → agent
    assert handshake(server, client_context(client))["subject"]  # operator → agent
    stranger = CertificateAuthority.create("not-the-agents-ca")
    foreign = stranger.issue_client_certificate("intruder").write(tmp_path, "intruder")
    intruder = PeerTLS(
        ca_file=tmp_path / "agent" / "ca.crt", cert_file=foreign[0], key_file=foreign[1]
    )
    with pytest.raises(ssl.SSLError):
        handshake(server, client_context(intruder))


# --- a real install and upgrade ---------------------------------------------------------------


@dataclass
class Installed:
    namespace: str
    release: str
    args: list[str]


@pytest.fixture
def installed(
    control_plane: ControlPlane, tools: Toolchain, helm_env: dict[str, str], namespace: str
) -> Iterator[Installed]:
    """The chart installed for real. Its webhooks select only namespaces labelled for this
    test (there are none), so other tests sharing the control plane are not affected; nothing
    runs the pods (there is no controller-manager)."""
    release = f"vmha-{secrets.token_hex(3)}"
    args = [
        f"--kubeconfig={control_plane.kubeconfig_path}",
        f"--namespace={namespace}",
        f"--set=webhook.namespaceSelector.matchLabels.vmha-chart-test={release}",
    ]
    run_helm(tools, helm_env, "install", release, str(CHART), *args)
    try:
        yield Installed(namespace, release, args)
    finally:
        run_helm(tools, helm_env, "uninstall", release, *args[:2])


def live_secret(control_plane: ControlPlane, installed: Installed, suffix: str) -> dict[str, str]:
    secret = json.loads(
        control_plane.kubectl(
            "-n",
            installed.namespace,
            "get",
            "secret",
            f"{installed.release}-{suffix}",
            "-o",
            "json",
        ).stdout
    )
    data: dict[str, str] = secret["data"]
    return data


def live_ca_bundles(control_plane: ControlPlane, installed: Installed) -> set[str]:
    bundles = set()
    for kind in ("mutatingwebhookconfiguration", "validatingwebhookconfiguration"):
        config = json.loads(
            control_plane.kubectl("get", kind, installed.release, "-o", "json").stdout
        )
        bundles |= {webhook["clientConfig"]["caBundle"] for webhook in config["webhooks"]}
    return bundles


def live_checksums(control_plane: ControlPlane, installed: Installed) -> dict[str, str]:
    deployment = json.loads(
        control_plane.kubectl(
            "-n",
            installed.namespace,
            "get",
            "deployment",
            f"{installed.release}-operator",
            "-o",
            "json",
        ).stdout
    )
    annotations: dict[str, str] = deployment["spec"]["template"]["metadata"]["annotations"]
    return {key: value for key, value in annotations.items() if key.startswith("checksum/")}


MESSAGING_SECRETS = ("messaging-ca", "node-agent-tls", "operator-messaging-tls")


def test_upgrades_keep_the_certificates_and_deleting_a_secret_renews_it(
    control_plane: ControlPlane, tools: Toolchain, helm_env: dict[str, str], installed: Installed
) -> None:
    def upgrade() -> None:
        run_helm(tools, helm_env, "upgrade", installed.release, str(CHART), *installed.args)

    def delete_secret(suffix: str) -> None:
        control_plane.kubectl(
            "-n", installed.namespace, "delete", "secret", f"{installed.release}-{suffix}"
        )

    first = live_secret(control_plane, installed, "webhook-tls")
    assert live_ca_bundles(control_plane, installed) == {first["ca.crt"]}
    messaging = {name: live_secret(control_plane, installed, name) for name in MESSAGING_SECRETS}
    checksums = live_checksums(control_plane, installed)
    assert checksums.keys() == {"checksum/webhook-tls", "checksum/messaging-tls"}

    upgrade()
    assert live_secret(control_plane, installed, "webhook-tls") == first
    assert live_ca_bundles(control_plane, installed) == {first["ca.crt"]}
    for name, data in messaging.items():
        assert live_secret(control_plane, installed, name) == data
    assert live_checksums(control_plane, installed) == checksums

    # docs/install.md: to renew, delete the Secret and upgrade.
    delete_secret("webhook-tls")
    upgrade()
    renewed = live_secret(control_plane, installed, "webhook-tls")
    assert renewed["tls.crt"] != first["tls.crt"]
    assert live_ca_bundles(control_plane, installed) == {renewed["ca.crt"]}
    assert (
        live_checksums(control_plane, installed)["checksum/webhook-tls"]
        != (checksums["checksum/webhook-tls"])
    )

    # The agents' certificate alone: a new one from the same CA, nothing else changes.
    delete_secret("node-agent-tls")
    upgrade()
    agent = live_secret(control_plane, installed, "node-agent-tls")
    assert agent["tls.crt"] != messaging["node-agent-tls"]["tls.crt"]
    assert agent["ca.crt"] == messaging["node-agent-tls"]["ca.crt"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(agent["ca.crt"]))
    x509.load_pem_x509_certificate(base64.b64decode(agent["tls.crt"])).verify_directly_issued_by(ca)
    operator = live_secret(control_plane, installed, "operator-messaging-tls")
    assert operator == messaging["operator-messaging-tls"]
    assert (
        live_checksums(control_plane, installed)["checksum/messaging-tls"]
        == (checksums["checksum/messaging-tls"])
    )

    # The CA: everything it signed is renewed with it, and the operator rolls.
    delete_secret("messaging-ca")
    upgrade()
    renewed_ca = live_secret(control_plane, installed, "messaging-ca")
    assert renewed_ca["tls.crt"] != messaging["messaging-ca"]["tls.crt"]
    for name in ("node-agent-tls", "operator-messaging-tls"):
        assert live_secret(control_plane, installed, name)["ca.crt"] == renewed_ca["tls.crt"]
    assert (
        live_checksums(control_plane, installed)["checksum/messaging-tls"]
        != (checksums["checksum/messaging-tls"])
    )


# --- the pods' containers as processes here ---------------------------------------------------

START_TIMEOUT = 120.0


TokenMaker = Callable[[Object], str]


@dataclass
class LocalPod:
    """A workload's container as a process on this machine, given what the kubelet would
    give it: each volume as a directory at `<root><mountPath>`, filled from the rendering
    (Secrets, ConfigMaps) and from `token` (projected ServiceAccount tokens: it gets the
    volume's serviceAccountToken source). Container paths in the arguments and in the
    ConfigMap files are moved under `root`; $(VAR) references are expanded from `env`."""

    rendering: Rendering
    workload: Object
    root: Path
    env: dict[str, str]
    token: TokenMaker
    _mounts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        container = self.workload["spec"]["template"]["spec"]["containers"][0]
        declared = volumes(self.workload)
        self._mounts = sorted((m["mountPath"] for m in container["volumeMounts"]), key=len)[::-1]
        for mount in container["volumeMounts"]:
            self._fill(Path(f"{self.root}{mount['mountPath']}"), declared[mount["name"]])

    def localize(self, text: str) -> str:
        """Container paths under a mount → the same paths under `root` (one pass, so that
        `root` itself is never rewritten)."""
        pattern = "|".join(re.escape(path) for path in self._mounts)
        return re.sub(
            rf"(?<![\w./-])({pattern})(?=/|$|[\s\"'])",
            lambda match: f"{self.root}{match.group(1)}",
            text,
            flags=re.MULTILINE,
        )

    def argv(self, ports: dict[str, int]) -> list[str]:
        """The container's arguments for a process here: loopback instead of 0.0.0.0, the
        ports of `ports` (by flag) instead of the container's."""
        local = []
        for arg in container_argv(self.workload, self.env):
            flag, _, value = arg.partition("=")
            if flag == "--liveness":
                local.append(f"--liveness=http://127.0.0.1:{ports[flag]}/healthz")
            elif flag in ports:
                local.append(f"{flag}={ports[flag]}")
            elif flag == "--kubelet-root":  # the parent of a mount
                local.append(f"{flag}={self.root}{value}")
            else:
                local.append(self.localize(arg.replace("0.0.0.0", "127.0.0.1")))
        return local

    def path(self, container_path: str) -> Path:
        return Path(self.localize(container_path))

    def _fill(self, directory: Path, volume: Object) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        if "secret" in volume:
            data = self.rendering.secret_data(volume["secret"]["secretName"])
            for key, value in data.items():
                (directory / key).write_bytes(value)
        elif "configMap" in volume:
            config_map = self.rendering.one("ConfigMap", volume["configMap"]["name"])
            for key, text in config_map["data"].items():
                (directory / key).write_text(self.localize(text))
        elif "projected" in volume:
            for source in volume["projected"]["sources"]:
                token = source["serviceAccountToken"]
                (directory / token["path"]).write_text(self.token(token))


def service_account_token(
    control_plane: ControlPlane,
    namespace: str,
    account: str,
    source: Object,
    pod: Object | None = None,
) -> str:
    """A token as the kubelet projects it (TokenRequest with the volume's audience and
    expiration, bound to `pod` if given)."""
    args = [
        "-n",
        namespace,
        "create",
        "token",
        account,
        f"--audience={source['audience']}",
        f"--duration={source['expirationSeconds']}s",
    ]
    if pod is not None:
        meta = pod["metadata"]
        args += [
            "--bound-object-kind=Pod",
            f"--bound-object-name={meta['name']}",
            f"--bound-object-uid={meta['uid']}",
        ]
    return control_plane.kubectl(*args).stdout.strip()


@contextlib.contextmanager
def running(name: str, argv: list[str], env: dict[str, str], log: Path) -> Iterator[Child]:
    child = Child(name, log)
    child.start(argv, env={**os.environ, **env})
    try:
        yield child
    finally:
        child.stop()


def assert_no_refusals(log: Path) -> None:
    text = log.read_text(errors="replace")
    assert "Forbidden" not in text and " 403" not in text, text[-3000:]


def apply(control_plane: ControlPlane, objects: list[Object]) -> str:
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    control_plane.kubectl("apply", "-f", "-", input=manifest)
    return manifest


def rbac_objects(rendering: Rendering, components: tuple[str, ...]) -> list[Object]:
    """The ServiceAccounts and RBAC objects of `components`, as the chart renders them."""
    kinds = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    return [
        obj
        for obj in rendering.objects
        if obj["kind"] in kinds
        and obj["metadata"]["labels"].get("app.kubernetes.io/component") in components
    ]


@pytest.fixture(scope="module")
def private_control_plane(tools: Toolchain) -> Iterator[ControlPlane]:
    """A control plane of its own: the operator below runs cluster-wide, as the chart runs it,
    and must not touch the objects of other tests."""
    with ControlPlane(tools=tools) as control_plane:
        control_plane.install_crd_files(KOPF_PEERING_CRDS)
        yield control_plane


def peered(control_plane: ControlPlane, peering: Object) -> Callable[[], bool]:
    """Whether the replica with priority 1 (pod index 1) has joined `peering`."""
    return lambda: 1 in peer_priorities(control_plane, peering)


def peer_priorities(control_plane: ControlPlane, peering: Object) -> list[int]:
    meta = peering["metadata"]
    where = ["-n", meta["namespace"]] if "namespace" in meta else []
    obj = json.loads(
        control_plane.kubectl(
            *where, "get", peering["kind"].lower(), meta["name"], "-o", "json"
        ).stdout
    )
    return [peer.get("priority") for peer in (obj.get("status") or {}).values()]


@pytest.mark.parametrize("operator_values", ["default", "peering", "namespaced-peering"])
def test_the_operator_starts_with_the_charts_command_line_rbac_and_certificate(
    private_control_plane: ControlPlane,
    tools: Toolchain,
    helm_env: dict[str, str],
    operator_values: str,
    tmp_path: Path,
) -> None:
    """The operator pod's command line, the chart's RBAC rules (a real ServiceAccount token)
    and the generated certificates: it starts, answers its liveness probe, serves TLS for its
    Service name, and with peering joins each peering object with its pod index (the
    ClusterKopfPeering, or the KopfPeering in each namespace it serves)."""
    control_plane = private_control_plane
    namespace = control_plane.create_namespace()
    name = f"vmha-{secrets.token_hex(3)}"
    extra = [f"--set=fullnameOverride={name}"]
    if operator_values == "namespaced-peering":
        watched = [control_plane.create_namespace() for _ in range(2)]
        extra.append(f"--set=operator.watchNamespaces={{{','.join(watched)}}}")
    rendering = render(tools, helm_env, operator_values, namespace, *extra)
    peerings = rendering.all("ClusterKopfPeering") + rendering.all("KopfPeering")
    assert len(peerings) == {"default": 0, "peering": 1, "namespaced-peering": 2}[operator_values]
    manifest = apply(control_plane, [*rbac_objects(rendering, ("operator",)), *peerings])
    try:
        workload = rendering.workload("operator")
        with running_operator(control_plane, rendering, namespace, tmp_path) as operator:
            context = ssl.create_default_context(cafile=str(operator.pod.path("/tls/ca.crt")))
            service = f"{name}-operator.{namespace}.svc"
            with (
                socket.create_connection(("127.0.0.1", operator.webhook_port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname=service) as conn,
            ):
                assert conn.version()
            assert workload["kind"] == ("StatefulSet" if peerings else "Deployment")
            for peering in peerings:
                operator.child.wait_until(
                    peered(control_plane, peering),
                    f"a peer in {peering['kind']} {peering['metadata']}",
                    START_TIMEOUT,
                    poll=0.3,
                )
        assert_no_refusals(operator.log)
    finally:
        control_plane.kubectl(
            "delete", "-f", "-", "--ignore-not-found", input=manifest, check=False
        )


@dataclass
class RunningOperator:
    pod: LocalPod
    child: Child
    webhook_port: int
    log: Path


@contextlib.contextmanager
def running_operator(
    control_plane: ControlPlane, rendering: Rendering, namespace: str, tmp_path: Path
) -> Iterator[RunningOperator]:
    """The operator container as a process (ServiceAccount, RBAC already applied)."""
    workload = rendering.workload("operator")
    spec = workload["spec"]["template"]["spec"]
    assert spec["containers"][0]["command"] == ["vmha-operator"]
    account = spec["serviceAccountName"]
    pod_name = f"{workload['metadata']['name']}-1"
    env = {"POD_NAME": pod_name, "POD_INDEX": "1", "POD_NAMESPACE": namespace}
    env = {key: value for key, value in env.items() if key in container_env(workload)}
    pod = LocalPod(
        rendering,
        workload,
        tmp_path / "operator",
        env,
        lambda source: service_account_token(control_plane, namespace, account, source),
    )
    webhook_port, health_port = free_port(), free_port()
    argv = pod.argv({"--webhook-port": webhook_port, "--liveness": health_port})
    kubeconfig = control_plane.kubeconfig_for_service_account(namespace, account)
    log = tmp_path / "operator.log"
    command = [*operator_command(), *argv, f"--kubeconfig={kubeconfig}"]
    with running("operator", command, env, log) as child:
        health = f"http://127.0.0.1:{health_port}/healthz"
        child.wait_until(lambda: http_ok(health), "healthy", START_TIMEOUT, poll=0.3)
        # Ready as the pod's readinessProbe sees it: the webhook server accepts connections.
        child.wait_until(lambda: accepts(webhook_port), "ready", START_TIMEOUT, poll=0.3)
        yield RunningOperator(pod, child, webhook_port, log)


# --- the operator asks a node agent for a vote, both as the chart runs them -------------------

VOTER_NODE = "node-a"


@dataclass
class RunningAgent:
    pod: LocalPod
    child: Child
    metrics_port: int
    messaging_port: int
    log: Path

    def metric(self, name: str, **labels: str) -> float | None:
        status, text = http_get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10)
        assert status == 200, text
        return metric_value(text, name, **labels)


def stand_in_pod(
    control_plane: ControlPlane, namespace: str, workload: Object, node: str
) -> Object:
    """A Pod object for the workload's pod on `node`, to bind its token to (no kubelet
    runs it): TokenReview then names that node, as for the real pod."""
    spec = workload["spec"]["template"]["spec"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": f"{workload['metadata']['name']}-",
            "namespace": namespace,
        },
        "spec": {
            "nodeName": node,
            "serviceAccountName": spec["serviceAccountName"],
            "containers": [{"name": "stand-in", "image": spec["containers"][0]["image"]}],
        },
    }
    created: Object = json.loads(
        control_plane.kubectl("create", "-f", "-", "-o", "json", input=json.dumps(pod)).stdout
    )
    return created


@contextlib.contextmanager
def running_agent(
    control_plane: ControlPlane, rendering: Rendering, namespace: str, tmp_path: Path
) -> Iterator[RunningAgent]:
    """The agent container of node `VOTER_NODE` as a process (ServiceAccount and RBAC
    already applied); its pod IP is loopback."""
    workload = rendering.workload("node-agent")
    spec = workload["spec"]["template"]["spec"]
    assert spec["containers"][0]["command"] == ["vmha-node-agent"]
    account = spec["serviceAccountName"]
    bound_to = stand_in_pod(control_plane, namespace, workload, VOTER_NODE)
    env = {"NODE_NAME": VOTER_NODE, "POD_IP": "127.0.0.1", "POD_NAMESPACE": namespace}
    pod = LocalPod(
        rendering,
        workload,
        tmp_path / "node-agent",
        env,
        lambda source: service_account_token(control_plane, namespace, account, source, bound_to),
    )
    metrics_port, messaging_port = free_port(), free_port()
    # The chart listens on 0.0.0.0:<messaging.port>; here on loopback and a free port.
    argv = [
        *pod.argv({"--metrics-port": metrics_port}),
        "--messaging-address=127.0.0.1",
        f"--messaging-port={messaging_port}",
    ]
    kubeconfig = control_plane.kubeconfig_for_service_account(namespace, account)
    log = tmp_path / "node-agent.log"
    command = [*agent_command(), *argv, f"--kubeconfig={kubeconfig}"]
    with running("node agent", command, env, log) as child:
        ready = f"http://127.0.0.1:{metrics_port}/readyz"
        child.wait_until(lambda: http_ok(ready), "ready", START_TIMEOUT, poll=0.3)
        yield RunningAgent(pod, child, metrics_port, messaging_port, log)


def lease_endpoint(control_plane: ControlPlane, namespace: str, kubeconfig: Path) -> str | None:
    """The agent's endpoint from its Lease, read as the operator (with its RBAC)."""
    result = control_plane.kubectl(
        "-n", namespace, "get", "lease", f"vmha-agent-{VOTER_NODE}", "-o", "json",
        kubeconfig=kubeconfig, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        assert "NotFound" in result.stderr, result.stderr
        return None
    annotations = json.loads(result.stdout)["metadata"].get("annotations") or {}
    endpoint: str | None = annotations.get("vmha.io/endpoint")
    return endpoint


def migration_review(namespace: str, vmi: str) -> Object:
    """The AdmissionReview the apiserver sends the operator for a live migration."""
    gvk = {"group": "kubevirt.io", "version": "v1", "kind": "VirtualMachineInstanceMigration"}
    gvr = {"group": "kubevirt.io", "version": "v1", "resource": "virtualmachineinstancemigrations"}
    migration = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": f"migrate-{vmi}", "namespace": namespace},
        "spec": {"vmiName": vmi},
    }
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "name": f"migrate-{vmi}",
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "platform-admin"},
            "object": migration,
            "oldObject": None,
            "dryRun": False,
        },
    }


def post_json(
    url: str, body: Object, context: ssl.SSLContext, headers: dict[str, str] | None = None
) -> tuple[int, Object]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as error:
        return int(error.code), json.loads(error.read() or b"{}")


def test_the_operator_asks_the_node_agent_for_votes_with_the_charts_credentials(
    private_control_plane: ControlPlane,
    tools: Toolchain,
    helm_env: dict[str, str],
    tmp_path: Path,
) -> None:
    """Operator and agent as the chart runs them — command lines, agent.yaml, the generated
    certificates, projected tokens (bound to a pod on the agent's node), ServiceAccounts,
    ClusterRoles and Roles: the agent publishes its endpoint (its Lease, with its pod IP);
    the operator, asked by the apiserver about a live migration of a running member, reads
    that Lease and asks the agent over mutual TLS with its token, and the agent answers
    (the guest is not there to ask: accept, with no warning that the agent was not
    reached). The agent refuses the same request made with an agent's credentials."""
    control_plane = private_control_plane
    namespace = control_plane.create_namespace()
    apps = control_plane.create_namespace()
    name = f"vmha-{secrets.token_hex(3)}"
    rendering = render(tools, helm_env, "default", namespace, f"--set=fullnameOverride={name}")
    manifest = apply(control_plane, rbac_objects(rendering, ("operator", "node-agent")))
    group = {
        "apiVersion": "vmha.io/v1alpha1",
        "kind": "VMGroup",
        "metadata": {"name": "web", "namespace": apps},
        "spec": {"policy": "anti-affinity"},
    }
    # A running member, as virt-handler shows it (VMIs have no status subresource).
    vmi = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "db-1", "namespace": apps, "labels": {"vmha.io/group": "web"}},
        "spec": {"domain": {"devices": {}}},
        "status": {"phase": "Running", "nodeName": VOTER_NODE},
    }
    apply(control_plane, [group, vmi])
    try:
        with (
            running_agent(control_plane, rendering, namespace, tmp_path) as agent,
            running_operator(control_plane, rendering, namespace, tmp_path) as operator,
        ):
            operator_account = rendering.workload("operator")["spec"]["template"]["spec"][
                "serviceAccountName"
            ]
            as_operator = control_plane.kubeconfig_for_service_account(namespace, operator_account)
            endpoint = f"https://127.0.0.1:{agent.messaging_port}"
            agent.child.wait_until(
                lambda: lease_endpoint(control_plane, namespace, as_operator) == endpoint,
                "the agent's Lease",
                START_TIMEOUT,
                poll=0.3,
            )

            context = ssl.create_default_context(cafile=str(operator.pod.path("/tls/ca.crt")))
            context.check_hostname = False  # the Service's name; checked in the test above
            status, review = post_json(
                f"https://127.0.0.1:{operator.webhook_port}/validate-migration",
                migration_review(apps, "db-1"),
                context,
            )
            assert status == 200, review
            response = review["response"]
            assert response["allowed"] is True, response
            assert not response.get("warnings"), response  # the agent was reached
            assert agent.metric("vmha_votes_total", result="not_here") == 1.0
            assert agent.metric("vmha_peer_served_total", path="/v1/votes", code="200") == 1.0

            # An agent's certificate and token (valid, for the agents' audience) may not vote.
            tls_dir = agent.pod.path("/etc/vmha/messaging-tls")
            as_agent = ssl.create_default_context(cafile=str(tls_dir / "ca.crt"))
            as_agent.check_hostname = False
            as_agent.load_cert_chain(tls_dir / "tls.crt", tls_dir / "tls.key")
            token = agent.pod.path("/var/run/secrets/vmha/token").read_text()
            vote = {"namespace": apps, "vm": "db-1", "event_type": "live_migrate_begin"}
            status, problem = post_json(
                f"{endpoint}/v1/votes", vote, as_agent, {"Authorization": f"Bearer {token}"}
            )
            assert (status, problem["error"]) == (403, "wrong_service_account")
        assert_no_refusals(operator.log)
    finally:
        control_plane.kubectl(
            "delete", "-f", "-", "--ignore-not-found", input=manifest, check=False
        )
