"""The operator's side of votes on revocable actions: which updates stop a VM, how an
agent is found, the refusal a person reads, and that the operator and the agents agree on
the Lease conventions."""

from __future__ import annotations

import time
from typing import Any

import pytest

from vmha_node_agent import leases as agent_leases
from vmha_operator import admission, cli, votes, webhooks


@pytest.mark.parametrize(
    ("old", "new", "stopping"),
    [
        ({"runStrategy": "Always"}, {"runStrategy": "Halted"}, True),
        ({"runStrategy": "RerunOnFailure"}, {"runStrategy": "Halted"}, True),
        ({"runStrategy": "Halted"}, {"runStrategy": "Halted"}, False),
        ({"runStrategy": "Halted"}, {"runStrategy": "Always"}, False),
        ({"running": True}, {"running": False}, True),
        ({}, {"running": False}, True),
        ({"running": False}, {"running": False}, False),
        ({"runStrategy": "Always"}, {"runStrategy": "Always"}, False),
    ],
)
def test_updates_that_stop_a_vm(old: dict[str, Any], new: dict[str, Any], stopping: bool) -> None:
    assert votes.stops({"spec": old}, {"spec": new}) is stopping


def test_a_new_vm_is_not_stopping() -> None:
    assert not votes.stops(None, {"spec": {"runStrategy": "Halted"}})


def test_only_a_running_vmi_has_a_guest_to_ask() -> None:
    assert votes.running_node({"status": {"phase": "Running", "nodeName": "n1"}}) == "n1"
    assert votes.running_node({"status": {"phase": "Scheduling"}}) is None
    assert votes.running_node(None) is None


@pytest.mark.parametrize("node", ["node-a", "n" * 253])
def test_the_lease_conventions_are_the_agents(node: str) -> None:
    assert votes.lease_name(node) == agent_leases.lease_name(node)
    assert votes.ENDPOINT_ANNOTATION == agent_leases.ENDPOINT_ANNOTATION


def test_an_agent_is_reached_through_a_fresh_lease_only() -> None:
    now = time.time()
    lease = {
        "metadata": {"annotations": {"vmha.io/endpoint": "https://10.0.0.7:9443"}},
        "spec": {"renewTime": "2026-01-01T10:00:00.000000Z", "leaseDurationSeconds": 30},
    }
    renewed = 1767261600.0  # 2026-01-01T10:00:00Z
    assert votes.endpoint_of(lease, renewed + 10) == "https://10.0.0.7:9443"
    assert votes.endpoint_of(lease, renewed + 31) is None  # its agent is down
    assert votes.endpoint_of(None, now) is None
    assert votes.endpoint_of({"spec": {}}, now) is None


def test_a_rejected_vote_names_the_vm_and_the_guests_reason() -> None:
    verdict = admission.vote_refused(
        kind="VirtualMachineInstance",
        name="db-1",
        event_type="live_migrate_begin",
        reason="primary: replication in progress",
    )
    assert not verdict.allowed
    assert verdict.message.startswith(
        'VirtualMachineInstance "db-1": its guest rejected live_migrate_begin: '
        "primary: replication in progress (rule: "
    )


def test_votes_are_configured_from_the_command_line() -> None:
    args = cli.parser().parse_args(
        [
            "--agent-namespace", "ops", "--agent-ca-file", "ca", "--agent-cert-file", "c",
            "--agent-key-file", "k", "--agent-token-file", "t", "--vote-timeout", "3",
        ]
    )  # fmt: skip
    settings = cli.config_from_args(args).votes
    assert settings.enabled
    assert (settings.agent_namespace, settings.timeout_s) == ("ops", 3.0)
    assert not cli.config_from_args(cli.parser().parse_args([])).votes.enabled


def test_the_voting_webhooks_declare_their_side_effect() -> None:
    _, validating = webhooks.webhook_configurations("vmha", "vmha-operator", "vmha", "Q0E=")
    effects = {w["name"]: w["sideEffects"] for w in validating["webhooks"]}
    assert effects == {
        "validate-virtualmachine.vmha.io": "NoneOnDryRun",
        "validate-vmgroup.vmha.io": "None",
        "validate-migration.vmha.io": "NoneOnDryRun",
    }
