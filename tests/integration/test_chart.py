"""The Helm chart `charts/vmha`, checked as CI must: `helm lint`, `helm template` for the default
values and every value set in `charts/vmha/ci/`, each rendering applied to the real apiserver
with `kubectl apply --server-side --dry-run=server` (schemas, unknown fields, RBAC), and a real
install and upgrade that keep the generated webhook certificate.

The chart mirrors code that is the source of truth; these tests keep them from drifting: its
webhook configurations (`vmha_operator.webhooks`), its RBAC rules (`vmha_operator.rbac`,
`vmha_node_agent.rbac`), and its command lines and agent configuration, parsed by the
programs' own argument parsers and configuration model.
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
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from vmha_node_agent import cli as agent_cli
from vmha_node_agent.config import AgentConfig
from vmha_node_agent.rbac import node_agent_rules
from vmha_operator import cli as operator_cli
from vmha_operator.devrun import operator_command
from vmha_operator.rbac import operator_rules
from vmha_operator.webhooks import webhook_configurations
from vmha_testbed import children
from vmha_testbed.controlplane import ControlPlane
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
KOPF_PEERING_CRD = CHART / "crds" / "clusterkopfpeerings.kopf.dev.yaml"

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
    "CustomResourceDefinition": 2,
    "ServiceAccount": 2,
    "ClusterRole": 2,
    "ClusterRoleBinding": 2,
    "Deployment": 1,
    "Service": 2,
    "Secret": 1,
    "ConfigMap": 1,
    "DaemonSet": 1,
    "MutatingWebhookConfiguration": 1,
    "ValidatingWebhookConfiguration": 1,
    "ServiceMonitor": 1,
    "PrometheusRule": 1,
    "NetworkPolicy": 1,
}
EXPECTED_KINDS: dict[str, dict[str, int]] = {
    "default": COMMON_KINDS,
    "peering": {
        **COMMON_KINDS,
        "Deployment": 0,
        "StatefulSet": 1,
        "ClusterKopfPeering": 1,
        "PodDisruptionBudget": 1,
    },
    "cert-manager": {**COMMON_KINDS, "Secret": 0, "Issuer": 2, "Certificate": 2},
    "cert-manager-issuer": {**COMMON_KINDS, "Secret": 0, "Certificate": 1},
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
        "Service": 1,
        "ConfigMap": 0,
        "DaemonSet": 0,
        "ServiceMonitor": 0,
        "PrometheusRule": 0,
        "NetworkPolicy": 0,
    },
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
    needed = [KOPF_PEERING_CRD, *cert_manager_crd_files()]
    installed = set(control_plane.kubectl("get", "crd", "-o", "name").stdout.split())
    missing = [path for path in needed if f"{CRD_PREFIX}{crd_name(path)}" not in installed]
    control_plane.install_crd_files(missing)
    return control_plane


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
    for role in rendering.all("ClusterRole"):
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    assert (group, resource.split("/")[0]) in served, (role["metadata"], rule)


# --- the chart mirrors the code -------------------------------------------------------------


def test_webhook_configurations_match_the_operator(rendering: Rendering, value_set: str) -> None:
    values = load_values(value_set)
    cert_manager = values["webhook"]["certManager"]["enabled"]
    ca_bundle = "" if cert_manager else rendering.one("Secret")["data"]["ca.crt"]
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


def test_rbac_rules_match_the_programs(rendering: Rendering, value_set: str) -> None:
    values = load_values(value_set)
    roles = {
        role["metadata"]["labels"]["app.kubernetes.io/component"]: role
        for role in rendering.all("ClusterRole")
    }
    peering = values["operator"]["replicas"] > 1
    assert roles["operator"]["rules"] == operator_rules(peering=peering)
    if values["nodeAgent"]["enabled"]:
        assert roles["node-agent"]["rules"] == node_agent_rules()
    for binding in rendering.all("ClusterRoleBinding"):
        component = binding["metadata"]["labels"]["app.kubernetes.io/component"]
        assert binding["roleRef"]["name"] == roles[component]["metadata"]["name"]
        pod_spec = rendering.workload(component)["spec"]["template"]["spec"]
        assert binding["subjects"] == [
            {
                "kind": "ServiceAccount",
                "name": pod_spec["serviceAccountName"],
                "namespace": "vmha-system",
            }
        ]


def container_argv(workload: Object, env: dict[str, str]) -> list[str]:
    """The container's arguments with Kubernetes' $(VAR) references expanded from `env`."""
    container = workload["spec"]["template"]["spec"]["containers"][0]
    declared = {variable["name"] for variable in container.get("env", [])}
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


def test_the_operator_command_line_is_what_the_operator_accepts(
    rendering: Rendering, value_set: str
) -> None:
    values = load_values(value_set)
    workload = rendering.workload("operator")
    peering = values["operator"]["replicas"] > 1
    env = {"POD_NAME": "vmha-operator-1", **({"POD_INDEX": "1"} if peering else {})}
    args = operator_cli.parser().parse_args(container_argv(workload, env))
    config = operator_cli.config_from_args(args)

    tls_dir = mounts_by_volume(workload)["webhook-tls"]["mountPath"]
    assert (config.webhook.cert_file, config.webhook.key_file) == (
        f"{tls_dir}/tls.crt",
        f"{tls_dir}/tls.key",
    )
    secret_name = volumes(workload)["webhook-tls"]["secret"]["secretName"]
    assert secret_name == rendering_secret_name(rendering, values)
    assert config.webhook.listen_address == "0.0.0.0"
    assert config.webhook.port == ports(workload)["webhook"]
    assert config.webhook.managed is None  # the chart owns the configurations
    assert args.liveness == f"http://0.0.0.0:{ports(workload)['health']}/healthz"
    assert list(config.namespaces) == values["operator"]["watchNamespaces"]
    if peering:
        assert workload["kind"] == "StatefulSet"
        assert args.peering == rendering.one("ClusterKopfPeering")["metadata"]["name"]
        assert args.priority == 1
    else:
        assert workload["kind"] == "Deployment"
        assert args.peering is None


def rendering_secret_name(rendering: Rendering, values: dict[str, Any]) -> str:
    """The Secret that holds the serving certificate: the chart's, or cert-manager's target."""
    if values["webhook"]["certManager"]["enabled"]:
        serving = next(
            cert for cert in rendering.all("Certificate") if not cert["spec"].get("isCA")
        )
        name: str = serving["spec"]["secretName"]
        return name
    name = rendering.one("Secret")["metadata"]["name"]
    return name


def test_the_agent_command_line_and_configuration_are_what_the_agent_accepts(
    rendering: Rendering, value_set: str, tmp_path: Path
) -> None:
    values = load_values(value_set)
    if not values["nodeAgent"]["enabled"]:
        pytest.skip("this value set has no node agent")
    workload = rendering.workload("node-agent")
    config_mount = mounts_by_volume(workload)["config"]["mountPath"]
    agent_yaml = rendering.one("ConfigMap")["data"]["agent.yaml"]
    (tmp_path / "agent.yaml").write_text(agent_yaml)
    argv = [
        arg.replace(f"--config={config_mount}/", f"--config={tmp_path}/")
        for arg in container_argv(workload, {"NODE_NAME": "node-a"})
    ]
    assert argv != container_argv(workload, {"NODE_NAME": "node-a"}), "no --config in the mount"
    config: AgentConfig = agent_cli.build_config(agent_cli.parse_args(argv))

    assert config.node_name == "node-a"
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
    policy = rendering.one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"] == selector
    assert [p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]] == ["metrics"]


def test_the_generated_certificate_serves_the_webhook_service(
    tools: Toolchain, helm_env: dict[str, str]
) -> None:
    rendering = render(tools, helm_env, "default", "vmha-system")
    secret = rendering.one("Secret")["data"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["ca.crt"]))
    cert = x509.load_pem_x509_certificate(base64.b64decode(secret["tls.crt"]))
    cert.verify_directly_issued_by(ca)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "vmha-operator.vmha-system.svc" in names.get_values_for_type(x509.DNSName)
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in usages
    checksum = rendering.workload("operator")["spec"]["template"]["metadata"]["annotations"]
    assert checksum["checksum/webhook-tls"]  # a new certificate rolls the operator


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


def live_tls(control_plane: ControlPlane, installed: Installed) -> dict[str, str]:
    secret = json.loads(
        control_plane.kubectl(
            "-n",
            installed.namespace,
            "get",
            "secret",
            f"{installed.release}-webhook-tls",
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


def live_checksum(control_plane: ControlPlane, installed: Installed) -> str:
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
    checksum: str = deployment["spec"]["template"]["metadata"]["annotations"][
        "checksum/webhook-tls"
    ]
    return checksum


def test_upgrades_keep_the_certificate_and_deleting_its_secret_renews_it(
    control_plane: ControlPlane, tools: Toolchain, helm_env: dict[str, str], installed: Installed
) -> None:
    first = live_tls(control_plane, installed)
    assert live_ca_bundles(control_plane, installed) == {first["ca.crt"]}
    checksum = live_checksum(control_plane, installed)

    run_helm(tools, helm_env, "upgrade", installed.release, str(CHART), *installed.args)
    assert live_tls(control_plane, installed) == first
    assert live_ca_bundles(control_plane, installed) == {first["ca.crt"]}
    assert live_checksum(control_plane, installed) == checksum

    # docs/install.md: to renew, delete the Secret and upgrade.
    control_plane.kubectl(
        "-n", installed.namespace, "delete", "secret", f"{installed.release}-webhook-tls"
    )
    run_helm(tools, helm_env, "upgrade", installed.release, str(CHART), *installed.args)
    renewed = live_tls(control_plane, installed)
    assert renewed["tls.crt"] != first["tls.crt"]
    assert live_ca_bundles(control_plane, installed) == {renewed["ca.crt"]}
    assert live_checksum(control_plane, installed) != checksum


# --- the operator as its pod would run it ------------------------------------------------------

OPERATOR_START_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def as_local_process(
    argv: list[str], tls_dir: Path, kubeconfig: Path
) -> tuple[list[str], int, int]:
    """The pod's arguments for a process on this machine: loopback and free ports instead of
    0.0.0.0 and the container's ports, the certificate files from `tls_dir`, a kubeconfig.
    Returns the arguments, the webhook port and the liveness port."""
    webhook_port, health_port = free_port(), free_port()
    local = []
    for arg in argv:
        if arg.startswith("--webhook-port="):
            local.append(f"--webhook-port={webhook_port}")
        elif arg.startswith("--liveness="):
            local.append(f"--liveness=http://127.0.0.1:{health_port}/healthz")
        else:
            local.append(arg.replace("0.0.0.0", "127.0.0.1").replace("=/tls/", f"={tls_dir}/"))
    return [*local, f"--kubeconfig={kubeconfig}"], webhook_port, health_port


def wait_healthy(process: subprocess.Popen[bytes], url: str, log: Path) -> None:
    deadline = time.monotonic() + OPERATOR_START_TIMEOUT
    while True:
        assert process.poll() is None, f"the operator exited:\n{log.read_text()[-3000:]}"
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=5) as response:
            if response.status == 200:
                return
        assert time.monotonic() < deadline, f"{url} not healthy:\n{log.read_text()[-3000:]}"
        time.sleep(0.5)


def peer_priorities(control_plane: ControlPlane, peering: str) -> list[int]:
    obj = json.loads(
        control_plane.kubectl("get", "clusterkopfpeering", peering, "-o", "json").stdout
    )
    return [peer.get("priority") for peer in (obj.get("status") or {}).values()]


@pytest.fixture(scope="module")
def private_control_plane(tools: Toolchain) -> Iterator[ControlPlane]:
    """A control plane of its own: the operator below runs cluster-wide, as the chart runs it,
    and must not touch the objects of other tests."""
    with ControlPlane(tools=tools) as control_plane:
        control_plane.install_crd_files([KOPF_PEERING_CRD])
        yield control_plane


@pytest.mark.parametrize("operator_values", ["default", "peering"])
def test_the_operator_starts_with_the_charts_command_line_rbac_and_certificate(
    private_control_plane: ControlPlane,
    tools: Toolchain,
    helm_env: dict[str, str],
    operator_values: str,
    tmp_path: Path,
) -> None:
    """The operator pod's command line, the chart's RBAC rules (a real ServiceAccount token)
    and the generated certificate: it starts, answers its liveness probe, serves TLS for its
    Service name, and with peering joins the ClusterKopfPeering with its pod index."""
    control_plane = private_control_plane
    namespace = control_plane.create_namespace()
    name = f"vmha-{secrets.token_hex(3)}"
    rendering = render(
        tools, helm_env, operator_values, namespace, f"--set=fullnameOverride={name}"
    )
    components = ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering")
    needed = [
        obj
        for obj in rendering.objects
        if obj["kind"] in components
        and obj["metadata"]["labels"].get("app.kubernetes.io/component") == "operator"
    ]
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": needed})
    control_plane.kubectl("apply", "-f", "-", input=manifest)
    try:
        run_operator_pod_command(control_plane, rendering, namespace, name, tmp_path)
    finally:
        control_plane.kubectl(
            "delete", "-f", "-", "--ignore-not-found", input=manifest, check=False
        )


def test_a_standby_operator_needs_a_cluster_wide_operator(
    tools: Toolchain, helm_env: dict[str, str]
) -> None:
    result = subprocess.run(
        [
            str(tools.helm),
            "template",
            str(CHART),
            "--set=operator.replicas=2",
            "--set=operator.watchNamespaces={prod}",
        ],
        capture_output=True,
        text=True,
        env=helm_env,
        timeout=HELM_TIMEOUT,
        check=False,
    )
    assert result.returncode != 0
    assert "operator.replicas > 1 needs a cluster-wide operator" in result.stderr


def run_operator_pod_command(
    control_plane: ControlPlane, rendering: Rendering, namespace: str, name: str, tmp_path: Path
) -> None:
    workload = rendering.workload("operator")
    account = workload["spec"]["template"]["spec"]["serviceAccountName"]
    kubeconfig = control_plane.kubeconfig_for_service_account(namespace, account)
    tls = tmp_path / "tls"
    tls.mkdir()
    for key, value in rendering.one("Secret")["data"].items():
        (tls / key).write_bytes(base64.b64decode(value))
    peering = workload["kind"] == "StatefulSet"
    env = {"POD_NAME": f"{name}-operator-1", **({"POD_INDEX": "1"} if peering else {})}
    argv, webhook_port, health_port = as_local_process(
        container_argv(workload, env), tls, kubeconfig
    )
    command = workload["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command == ["vmha-operator"]
    log = tmp_path / "operator.log"
    with log.open("ab") as output:
        process = children.spawn(
            [*operator_command(), *argv], output=output, env={**os.environ, **env}
        )
    try:
        wait_healthy(process, f"http://127.0.0.1:{health_port}/healthz", log)
        context = ssl.create_default_context(cafile=str(tls / "ca.crt"))
        service = f"{name}-operator.{namespace}.svc"
        with (
            socket.create_connection(("127.0.0.1", webhook_port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=service) as conn,
        ):
            assert conn.version()
        if peering:
            peering_name = rendering.one("ClusterKopfPeering")["metadata"]["name"]
            deadline = time.monotonic() + OPERATOR_START_TIMEOUT
            while 1 not in peer_priorities(control_plane, peering_name):
                assert time.monotonic() < deadline, f"no peer:\n{log.read_text()[-3000:]}"
                time.sleep(0.5)
    finally:
        children.stop(process)
    text = log.read_text()
    assert "Forbidden" not in text and " 403" not in text, text[-3000:]
