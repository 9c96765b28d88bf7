"""The local control plane itself: readiness, version, CRDs, identities, webhooks, cleanup."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s
from kubernetes.client import ApiException

from vmha_testbed.controlplane import VMHA_CRDS_DIR, ControlPlane
from vmha_testbed.polling import eventually
from vmha_testbed.toolchain import read_versions

# Waits are generous: two shared cores, other suites running.
SETTLE_TIMEOUT = 30.0
PROCESS_START_TIMEOUT = 240.0


@pytest.fixture
def api(control_plane: ControlPlane) -> Iterator[k8s.ApiClient]:
    with control_plane.api_client() as api_client:
        yield api_client


# --- the server -------------------------------------------------------------------------------


def test_apiserver_reports_ready(control_plane: ControlPlane) -> None:
    assert control_plane.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"


def test_kubectl_version_shows_the_pinned_release_for_client_and_server(
    control_plane: ControlPlane,
) -> None:
    versions = json.loads(control_plane.kubectl("version", "--output=json").stdout)
    pinned = read_versions().kube
    assert versions["clientVersion"]["gitVersion"] == pinned
    assert versions["serverVersion"]["gitVersion"] == pinned


# --- CRDs -------------------------------------------------------------------------------------

KUBEVIRT_CRDS = [
    # name, kind, short names, has a status subresource (as in KubeVirt: not for VMIs)
    ("virtualmachines.kubevirt.io", "VirtualMachine", ["vm", "vms"], True),
    ("virtualmachineinstances.kubevirt.io", "VirtualMachineInstance", ["vmi", "vmis"], False),
    (
        "virtualmachineinstancemigrations.kubevirt.io",
        "VirtualMachineInstanceMigration",
        ["vmim", "vmims"],
        True,
    ),
]


def _established(crd: k8s.V1CustomResourceDefinition) -> bool:
    conditions = crd.status.conditions if crd.status else None
    return any(c.type == "Established" and c.status == "True" for c in conditions or [])


@pytest.mark.parametrize(("name", "kind", "short_names", "status_subresource"), KUBEVIRT_CRDS)
def test_kubevirt_crds_have_kubevirts_names_scope_and_subresources(
    api: k8s.ApiClient, name: str, kind: str, short_names: list[str], status_subresource: bool
) -> None:
    crd = k8s.ApiextensionsV1Api(api).read_custom_resource_definition(name)
    assert _established(crd)
    assert crd.spec.group == "kubevirt.io"
    assert crd.spec.scope == "Namespaced"
    assert crd.spec.names.kind == kind
    assert crd.spec.names.short_names == short_names
    assert crd.spec.names.categories == ["all"]
    [version] = crd.spec.versions
    assert (version.name, version.served, version.storage) == ("v1", True, True)
    has_status = version.subresources is not None and version.subresources.status is not None
    assert has_status == status_subresource


def test_kubevirt_short_names_resolve_through_discovery(
    control_plane: ControlPlane, namespace: str
) -> None:
    for short_name in ("vm", "vmi", "vmim"):
        result = control_plane.kubectl("get", short_name, f"--namespace={namespace}")
        assert "No resources found" in result.stderr


def test_prometheus_operator_crds_for_the_chart_are_established(api: k8s.ApiClient) -> None:
    extensions = k8s.ApiextensionsV1Api(api)
    for name in ("servicemonitors.monitoring.coreos.com", "prometheusrules.monitoring.coreos.com"):
        assert _established(extensions.read_custom_resource_definition(name))


def test_every_crd_in_the_repository_is_established(api: k8s.ApiClient) -> None:
    names = [
        doc["metadata"]["name"]
        for path in sorted(VMHA_CRDS_DIR.rglob("*.y*ml"))
        for doc in _yaml_documents(path)
        if doc.get("kind") == "CustomResourceDefinition"
    ]
    if not names:
        pytest.skip("crds/ holds no CRD yet")
    extensions = k8s.ApiextensionsV1Api(api)
    for name in names:
        assert _established(extensions.read_custom_resource_definition(name)), name


def _yaml_documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if isinstance(doc, dict)]


# --- playing KubeVirt's controllers -----------------------------------------------------------

VMI_SPEC = {"domain": {"devices": {}, "resources": {"requests": {"memory": "64Mi"}}}}


def _read(objects: k8s.CustomObjectsApi, namespace: str, plural: str, name: str) -> dict[str, Any]:
    found = objects.get_namespaced_custom_object("kubevirt.io", "v1", namespace, plural, name)
    assert isinstance(found, dict)
    return found


def test_vmi_status_is_written_with_the_object_as_virt_controller_does(
    control_plane: ControlPlane, api: k8s.ApiClient, namespace: str
) -> None:
    objects = k8s.CustomObjectsApi(api)
    vmi = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {"name": "vm-a"},
        "spec": VMI_SPEC,
    }
    objects.create_namespaced_custom_object(
        "kubevirt.io", "v1", namespace, "virtualmachineinstances", vmi
    )
    status = {
        "phase": "Running",
        "nodeName": "node-1",
        "interfaces": [{"ipAddress": "10.244.1.7"}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }
    objects.patch_namespaced_custom_object(
        "kubevirt.io", "v1", namespace, "virtualmachineinstances", "vm-a", {"status": status}
    )

    assert _read(objects, namespace, "virtualmachineinstances", "vm-a")["status"] == status
    table = control_plane.kubectl("get", "vmi", "vm-a", f"--namespace={namespace}").stdout
    assert re.search(r"vm-a\s+\S+\s+Running\s+10\.244\.1\.7\s+node-1\s+True", table), table


def test_vm_status_is_written_only_through_its_status_subresource(
    api: k8s.ApiClient, namespace: str
) -> None:
    objects = k8s.CustomObjectsApi(api)
    vm = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "vm-b"},
        "spec": {"runStrategy": "Always", "template": {"spec": VMI_SPEC}},
        "status": {"printableStatus": "Ignored"},
    }
    objects.create_namespaced_custom_object("kubevirt.io", "v1", namespace, "virtualmachines", vm)
    args = ("kubevirt.io", "v1", namespace, "virtualmachines", "vm-b")
    assert "status" not in _read(objects, namespace, "virtualmachines", "vm-b")

    objects.patch_namespaced_custom_object_status(
        *args, {"status": {"printableStatus": "Running", "ready": True}}
    )
    objects.patch_namespaced_custom_object(*args, {"status": {"printableStatus": "Ignored"}})

    status = _read(objects, namespace, "virtualmachines", "vm-b")["status"]
    assert status == {"printableStatus": "Running", "ready": True}


# --- namespaces and identities ----------------------------------------------------------------


def test_a_new_namespace_has_its_default_service_account_and_takes_pods(
    api: k8s.ApiClient, namespace: str
) -> None:
    core = k8s.CoreV1Api(api)
    core.read_namespaced_service_account("default", namespace)  # raises when absent
    pod = k8s.V1Pod(
        metadata=k8s.V1ObjectMeta(name="virt-launcher-vm-a"),
        spec=k8s.V1PodSpec(containers=[k8s.V1Container(name="compute", image="example")]),
    )
    created = core.create_namespaced_pod(namespace, pod)
    assert created.spec is not None
    assert created.spec.service_account_name == "default"


def test_rbac_is_enforced_for_a_service_account_token(
    control_plane: ControlPlane, api: k8s.ApiClient, namespace: str
) -> None:
    core, rbac = k8s.CoreV1Api(api), k8s.RbacAuthorizationV1Api(api)
    core.create_namespaced_service_account(
        namespace, k8s.V1ServiceAccount(metadata=k8s.V1ObjectMeta(name="node-agent"))
    )
    kubeconfig = control_plane.kubeconfig_for_service_account(namespace, "node-agent")

    def can_list_pods() -> bool:
        result = control_plane.kubectl(
            "auth", "can-i", "list", "pods", f"--namespace={namespace}",
            kubeconfig=kubeconfig, check=False,
        )  # fmt: skip
        return result.stdout.strip() == "yes"

    whoami = control_plane.kubectl("auth", "whoami", "--output=json", kubeconfig=kubeconfig)
    username = json.loads(whoami.stdout)["status"]["userInfo"]["username"]
    assert username == f"system:serviceaccount:{namespace}:node-agent"
    assert not can_list_pods()
    denied = control_plane.kubectl(
        "get", "pods", f"--namespace={namespace}", kubeconfig=kubeconfig, check=False
    )
    assert "Forbidden" in denied.stderr

    rbac.create_namespaced_role(
        namespace,
        k8s.V1Role(
            metadata=k8s.V1ObjectMeta(name="pod-reader"),
            rules=[k8s.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["list"])],
        ),
    )
    rbac.create_namespaced_role_binding(
        namespace,
        k8s.V1RoleBinding(
            metadata=k8s.V1ObjectMeta(name="node-agent-reads-pods"),
            role_ref=k8s.V1RoleRef(api_group="rbac.authorization.k8s.io", kind="Role",
                                   name="pod-reader"),
            subjects=[k8s.RbacV1Subject(kind="ServiceAccount", name="node-agent",
                                        namespace=namespace)],
        ),
    )  # fmt: skip
    eventually(can_list_pods, "the RoleBinding in effect", SETTLE_TIMEOUT)


def test_client_certificate_identities_carry_user_and_groups(control_plane: ControlPlane) -> None:
    kubeconfig = control_plane.kubeconfig_for_user("jane", ["vmha-operators", "team-a"])
    whoami = control_plane.kubectl("auth", "whoami", "--output=json", kubeconfig=kubeconfig)
    user_info = json.loads(whoami.stdout)["status"]["userInfo"]
    assert user_info["username"] == "jane"
    assert {"vmha-operators", "team-a", "system:authenticated"} <= set(user_info["groups"])
    result = control_plane.kubectl("get", "namespaces", kubeconfig=kubeconfig, check=False)
    assert "Forbidden" in result.stderr


# --- admission webhooks with a certificate from the cluster CA --------------------------------


class _DenyingWebhook(http.server.BaseHTTPRequestHandler):
    """Refuses ConfigMaps named `refused`, as an admission webhook does."""

    def do_POST(self) -> None:
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        request = review["request"]
        allowed = request["name"] != "refused"
        response = {"uid": request["uid"], "allowed": allowed}
        if not allowed:
            response["status"] = {"code": 403, "message": "refused by the test webhook"}
        body = json.dumps({**review, "response": response}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def _webhook_server(cert: Path, key: Path) -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DenyingWebhook)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_apiserver_calls_a_webhook_served_with_a_cluster_ca_certificate(
    control_plane: ControlPlane, api: k8s.ApiClient, namespace: str
) -> None:
    cert, key = control_plane.issue_serving_certificate(name=f"webhook-{namespace}")
    admission = k8s.AdmissionregistrationV1Api(api)
    core = k8s.CoreV1Api(api)
    with _webhook_server(cert, key) as port:
        webhook = k8s.V1ValidatingWebhookConfiguration(
            metadata=k8s.V1ObjectMeta(name=f"deny-{namespace}"),
            webhooks=[
                k8s.V1ValidatingWebhook(
                    name="deny.test.vmha.io",
                    client_config=k8s.AdmissionregistrationV1WebhookClientConfig(
                        url=f"https://127.0.0.1:{port}/validate",
                        ca_bundle=base64.b64encode(control_plane.ca_path.read_bytes()).decode(),
                    ),
                    rules=[k8s.V1RuleWithOperations(api_groups=[""], api_versions=["v1"],
                                                    operations=["CREATE"],
                                                    resources=["configmaps"])],
                    namespace_selector=k8s.V1LabelSelector(
                        match_labels={"kubernetes.io/metadata.name": namespace}
                    ),
                    side_effects="None",
                    admission_review_versions=["v1"],
                    failure_policy="Fail",
                    timeout_seconds=10,
                )
            ],
        )  # fmt: skip
        admission.create_validating_webhook_configuration(webhook)
        try:

            def refused() -> bool:
                try:
                    core.create_namespaced_config_map(
                        namespace, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="refused"))
                    )
                except ApiException as error:
                    assert "refused by the test webhook" in str(error.body)
                    return True
                # Created before the apiserver saw the webhook: remove it and try again.
                core.delete_namespaced_config_map("refused", namespace)
                return False

            eventually(refused, "the webhook refusing", SETTLE_TIMEOUT)
            core.create_namespaced_config_map(
                namespace, k8s.V1ConfigMap(metadata=k8s.V1ObjectMeta(name="accepted"))
            )
        finally:
            admission.delete_validating_webhook_configuration(f"deny-{namespace}")


# --- no process left behind -------------------------------------------------------------------


def _server_alive(pid: int) -> bool:
    """Whether `pid` is still a live etcd or kube-apiserver (not a zombie, not a reused pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False
    state = stat.rpartition(")")[2].split()[0]
    return state != "Z" and (b"etcd" in command or b"kube-apiserver" in command)


def test_stop_leaves_no_process_and_no_files() -> None:
    with ControlPlane(install_crds=False) as control_plane:
        pids, workdir = control_plane.pids, control_plane.workdir
        assert len(pids) == 2
        assert all(map(_server_alive, pids))
    assert not any(map(_server_alive, pids))
    assert not workdir.exists()


def test_an_exception_in_the_with_block_leaves_no_process() -> None:
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="test failure"), ControlPlane(install_crds=False) as cp:
        pids = cp.pids
        assert all(map(_server_alive, pids))
        raise RuntimeError("test failure")
    assert len(pids) == 2
    assert not any(map(_server_alive, pids))


class _DeveloperTool:
    """`python -m vmha_testbed.controlplane` as a developer runs it, its output parsed."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vmha_testbed.controlplane", "--no-crds"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if "Ctrl-C stops it" in line:
                self._ready.set()

    def wait_ready(self) -> None:
        if not self._ready.wait(PROCESS_START_TIMEOUT):
            self.process.kill()
            pytest.fail("control plane tool did not get ready:\n" + "".join(self.lines))

    def value(self, label: str) -> str:
        for line in self.lines:
            if line.startswith(f"{label}:"):
                return line.partition(":")[2].strip()
        raise AssertionError(f"no {label!r} line in:\n{''.join(self.lines)}")

    @property
    def pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"pid (\d+)", self.value("processes"))]


def test_developer_tool_prints_kubeconfig_and_stops_cleanly_on_ctrl_c() -> None:
    tool = _DeveloperTool()
    tool.wait_ready()
    kubeconfig = Path(tool.value("kubeconfig"))
    assert f"export KUBECONFIG={kubeconfig}\n" in tool.lines
    kubectl = tool.value("kubectl")
    readyz = subprocess.run(
        [kubectl, f"--kubeconfig={kubeconfig}", "get", "--raw", "/readyz"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert readyz.stdout.strip() == "ok"
    pids = tool.pids
    assert len(pids) == 2

    tool.process.send_signal(signal.SIGINT)
    assert tool.process.wait(60) == 0
    assert not any(map(_server_alive, pids))
    assert not kubeconfig.exists()


def test_servers_die_with_a_killed_parent() -> None:
    tool = _DeveloperTool()
    tool.wait_ready()
    pids, workdir = tool.pids, Path(tool.value("kubeconfig")).parent
    try:
        assert all(map(_server_alive, pids))
        tool.process.send_signal(signal.SIGKILL)  # no atexit, no __exit__: only the kernel
        tool.process.wait(60)
        eventually(lambda: not any(map(_server_alive, pids)), "servers gone", SETTLE_TIMEOUT)
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(workdir, ignore_errors=True)
