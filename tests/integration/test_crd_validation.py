"""The VMGroup CRD as installed in the real apiserver: validation as `kubectl` shows it,
defaults, short name and printer columns. No operator runs here: this is the schema alone."""

from __future__ import annotations

import json
import subprocess

import pytest

from vmha_testbed.controlplane import ControlPlane


def vmgroup(name: str, spec: str) -> str:
    return f"""
apiVersion: vmha.io/v1alpha1
kind: VMGroup
metadata:
  name: {name}
spec:
{spec}
"""


def apply(
    control_plane: ControlPlane, namespace: str, manifest: str
) -> subprocess.CompletedProcess[str]:
    return control_plane.kubectl("-n", namespace, "apply", "-f", "-", input=manifest, check=False)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "  policy: friends",
            'spec.policy: Unsupported value: "friends": supported values: "affinity", '
            '"anti-affinity", "soft-affinity", "soft-anti-affinity"',
        ),
        ("  maxMembers: 2", "spec.policy: Required value"),
        (
            "  policy: affinity\n  maxPerNode: 2",
            "maxPerNode applies only to policy anti-affinity (Nova's max_server_per_host)",
        ),
        (
            "  policy: soft-anti-affinity\n  bestEffort: true",
            "bestEffort applies only to the strict policies affinity and anti-affinity; "
            "the soft policies are best effort already",
        ),
        (
            "  policy: anti-affinity\n  maxPerNode: 3\n  maxMembers: 2",
            "maxPerNode must not be greater than maxMembers",
        ),
        (
            "  policy: anti-affinity\n  maxMembers: 0",
            "spec.maxMembers: Invalid value: 0: spec.maxMembers in body should be greater "
            "than or equal to 1",
        ),
        (
            "  policy: anti-affinity\n  heartbeat:\n    minIntervalMs: 5000\n"
            "    maxIntervalMs: 1000",
            "heartbeat.minIntervalMs must not be greater than heartbeat.maxIntervalMs",
        ),
        (
            "  policy: anti-affinity\n  heartbeat:\n    correctiveAction: explode",
            'spec.heartbeat.correctiveAction: Unsupported value: "explode": supported values: '
            '"none", "reboot", "stop", "log"',
        ),
    ],
)
def test_invalid_groups_are_refused_with_a_readable_message(
    control_plane: ControlPlane, namespace: str, spec: str, message: str
) -> None:
    result = apply(control_plane, namespace, vmgroup("bad", spec))
    assert result.returncode != 0
    assert 'The VMGroup "bad" is invalid' in result.stderr
    assert message in result.stderr, result.stderr


def test_a_minimal_group_gets_the_defaults(control_plane: ControlPlane, namespace: str) -> None:
    apply(control_plane, namespace, vmgroup("web", "  policy: anti-affinity")).check_returncode()
    stored = json.loads(
        control_plane.kubectl("-n", namespace, "get", "vmg", "web", "-o", "json").stdout
    )
    assert stored["spec"] == {
        "policy": "anti-affinity",
        "bestEffort": False,
        "messaging": True,
        "heartbeat": {
            "enabled": True,
            "minIntervalMs": 400,
            "maxIntervalMs": 60000,
            "missedThreshold": 3,
            "correctiveAction": "log",
        },
    }


def test_partial_heartbeat_settings_are_completed(
    control_plane: ControlPlane, namespace: str
) -> None:
    spec = "  policy: soft-affinity\n  heartbeat:\n    correctiveAction: reboot"
    apply(control_plane, namespace, vmgroup("db", spec)).check_returncode()
    stored = json.loads(
        control_plane.kubectl("-n", namespace, "get", "vmgroup", "db", "-o", "json").stdout
    )
    assert stored["spec"]["heartbeat"]["correctiveAction"] == "reboot"
    assert stored["spec"]["heartbeat"]["maxIntervalMs"] == 60000


def test_short_name_and_printer_columns(control_plane: ControlPlane, namespace: str) -> None:
    apply(control_plane, namespace, vmgroup("web", "  policy: affinity")).check_returncode()
    table = control_plane.kubectl("-n", namespace, "get", "vmg").stdout.splitlines()
    assert table[0].split() == ["NAME", "POLICY", "MEMBERS", "READY", "AGE"]
    assert table[1].split()[:2] == ["web", "affinity"]
    wide = control_plane.kubectl("-n", namespace, "get", "vmg", "-o", "wide").stdout
    assert wide.splitlines()[0].split() == [
        "NAME",
        "POLICY",
        "MEMBERS",
        "READY",
        "SATISFIED",
        "AGE",
    ]


def test_status_is_a_subresource(control_plane: ControlPlane, namespace: str) -> None:
    """Writing status through the main resource is ignored: only the operator, through
    /status, sets it."""
    manifest = vmgroup("web", "  policy: affinity") + "status:\n  memberCount: 7\n"
    apply(control_plane, namespace, manifest).check_returncode()
    stored = json.loads(
        control_plane.kubectl("-n", namespace, "get", "vmg", "web", "-o", "json").stdout
    )
    assert "status" not in stored
