"""What a cluster installation gives the operator, checked against the real apiserver: the
least-privilege RBAC rules of `vmha_operator.rbac` (a ServiceAccount with a real token and
exactly these rules does all the operator's work) and the webhook configurations of
`vmha_operator.webhooks` (the Helm chart mirrors both)."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vmha_operator.rbac import operator_rules
from vmha_operator.webhooks import webhook_configurations
from vmha_testbed.controlplane import ControlPlane
from vmha_testbed.operatorproc import OperatorProcess

SETTLE_TIMEOUT = 60.0


@pytest.fixture
def service_account_kubeconfig(control_plane: ControlPlane, namespace: str) -> Iterator[Path]:
    role = f"vmha-operator-{namespace}"
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "vmha-operator", "namespace": namespace},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": role},
            "rules": operator_rules(manage_webhooks=True),
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": role},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role,
            },
            "subjects": [
                {"kind": "ServiceAccount", "name": "vmha-operator", "namespace": namespace}
            ],
        },
    ]
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    control_plane.kubectl("apply", "-f", "-", input=manifest)
    yield control_plane.kubeconfig_for_service_account(namespace, "vmha-operator")
    control_plane.kubectl(
        "delete", "clusterrole,clusterrolebinding", role, "--ignore-not-found", check=False
    )


def test_the_operator_works_with_its_rbac_rules_only(
    control_plane: ControlPlane, namespace: str, service_account_kubeconfig: Path, tmp_path: Path
) -> None:
    def kubectl(*args: str, stdin: str | None = None) -> str:
        return control_plane.kubectl("-n", namespace, *args, input=stdin).stdout

    log = tmp_path / "operator.log"
    with OperatorProcess(service_account_kubeconfig, namespaces=[namespace], log_path=log):
        kubectl(
            "apply",
            "-f",
            "-",
            stdin="""
apiVersion: vmha.io/v1alpha1
kind: VMGroup
metadata: {name: web}
spec: {policy: anti-affinity, maxMembers: 1}
""",
        )
        vm = """
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {name: NAME, labels: {vmha.io/group: web}}
spec: {runStrategy: Always, template: {spec: {domain: {devices: {}}}}}
"""
        kubectl("apply", "-f", "-", stdin=vm.replace("NAME", "a"))
        refused = control_plane.kubectl(
            "-n", namespace, "apply", "-f", "-", input=vm.replace("NAME", "b"), check=False
        )
        assert 'VMGroup "web" is full' in refused.stderr
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            status = json.loads(kubectl("get", "vmg", "web", "-o", "json")).get("status", {})
            configmaps = kubectl("get", "configmap", "-o", "name")
            events = kubectl("get", "events", "-o", "name")
            done = (
                status.get("memberCount") == 1
                and "configmap/vmha-channel-hook" in configmaps
                and events.strip()
            )
            if done:
                break
            assert time.monotonic() < deadline, f"operator incomplete:\n{log.read_text()[-3000:]}"
            time.sleep(0.3)
    text = log.read_text()
    assert "Forbidden" not in text and " 403" not in text, text[-3000:]


def test_the_production_webhook_configurations_are_valid(control_plane: ControlPlane) -> None:
    ca_bundle = base64.b64encode(control_plane.ca_path.read_bytes()).decode()
    objects = webhook_configurations("vmha-prod-check", "vmha-operator", "vmha-system", ca_bundle)
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": objects})
    result = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=manifest)
    assert result.stdout.split("\n")[:2] == [
        "mutatingwebhookconfiguration.admissionregistration.k8s.io/vmha-prod-check created "
        "(server dry run)",
        "validatingwebhookconfiguration.admissionregistration.k8s.io/vmha-prod-check created "
        "(server dry run)",
    ]


def test_the_operator_serves_a_certificate_it_is_given(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> None:
    """--webhook-cert-file/--webhook-key-file as in a cluster (there from the chart's Secret;
    here signed by the control plane's CA), with that CA in the webhook configurations."""
    cert, key = control_plane.issue_serving_certificate(("127.0.0.1",), name="vmha-operator")
    args = [
        f"--webhook-cert-file={cert}",
        f"--webhook-key-file={key}",
        f"--webhook-ca-file={control_plane.ca_path}",
    ]
    log = tmp_path / "operator.log"
    with OperatorProcess(
        control_plane.kubeconfig_path, namespaces=[namespace], log_path=log, extra_args=args
    ):
        control_plane.kubectl(
            "-n",
            namespace,
            "apply",
            "-f",
            "-",
            input="""
apiVersion: vmha.io/v1alpha1
kind: VMGroup
metadata: {name: db}
spec: {policy: affinity}
---
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata: {name: a, labels: {vmha.io/group: db}}
spec: {runStrategy: Always, template: {spec: {domain: {devices: {}}}}}
""",
        )
        vm = json.loads(
            control_plane.kubectl("-n", namespace, "get", "vm", "a", "-o", "json").stdout
        )
        assert "podAffinity" in vm["spec"]["template"]["spec"]["affinity"]
    assert "development certificate" not in log.read_text()
