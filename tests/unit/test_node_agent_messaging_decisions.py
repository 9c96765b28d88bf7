"""Server group messaging decisions without I/O: the group directory's change reports, where
broadcast copies go, what an agent accepts from another, and who may call the agent."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from vmha_node_agent.config import MessagingConfig
from vmha_node_agent.kubevirt import Key
from vmha_node_agent.leases import endpoint_of, lease_name
from vmha_node_agent.members import GroupDirectory, GroupKey, Member
from vmha_node_agent.memberstate import member_state
from vmha_node_agent.peerauth import (
    Identity,
    authorize_agent,
    authorize_operator,
    bearer_token,
)
from vmha_node_agent.routing import Accepted, Drop, Refusal, accept_from_peer, route_broadcast
from vmha_node_agent.tokens import token_expiry
from vmha_node_agent.watch import Changed, Listed
from vmha_protocol.server_group import MemberState

WEB: GroupKey = ("ns", "web")


def vmi(
    name: str,
    node: str | None = "node-a",
    *,
    group: str | None = "web",
    uid: str | None = None,
    paused: bool = False,
    namespace: str = "ns",
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running" if node else "Pending"}
    if node:
        status["nodeName"] = node
    if paused:
        status["conditions"] = [{"type": "Paused", "status": "True"}]
    return {
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": uid or f"uid-{name}",
            "labels": {"vmha.io/group": group} if group else {},
        },
        "status": status,
    }


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[GroupKey, Key, MemberState]] = []

    def member_changed(self, group: GroupKey, member: Key, state: MemberState) -> None:
        self.changes.append((group, member, state))

    def states(self) -> list[tuple[str, str]]:
        return [(key[1], state.state) for _, key, state in self.changes]


@pytest.fixture
def directory() -> tuple[GroupDirectory, Recorder]:
    d = GroupDirectory()
    recorder = Recorder()
    d.subscribe(recorder)
    return d, recorder


# --- the group directory ----------------------------------------------------------------------


def test_the_first_list_is_quiet_and_changes_are_reported_as_they_come(
    directory: tuple[GroupDirectory, Recorder],
) -> None:
    d, seen = directory
    d.vmis_changed(Listed([vmi("a"), vmi("b", "node-b"), vmi("plain", group=None)]))
    assert seen.changes == []
    assert [m.name for m in d.members(WEB)] == ["a", "b"]
    assert d.member(("ns", "plain")) is None

    d.vmis_changed(Changed("MODIFIED", vmi("b", "node-b", paused=True)))
    assert seen.states() == [("b", "paused")]
    # A change that does not change the state (e.g. an unrelated status field) is silent.
    unchanged = vmi("b", "node-b", paused=True)
    unchanged["status"]["interfaces"] = [{"ipAddress": "10.0.0.9"}]
    d.vmis_changed(Changed("MODIFIED", unchanged))
    assert len(seen.changes) == 1
    d.vmis_changed(Changed("ADDED", vmi("c", None)))
    assert seen.states()[-1] == ("c", "building")


def test_a_member_deleted_or_leaving_gets_a_final_deleted_state(
    directory: tuple[GroupDirectory, Recorder],
) -> None:
    d, seen = directory
    d.vmis_changed(Listed([vmi("a"), vmi("b"), vmi("c")]))
    d.vmis_changed(Changed("DELETED", vmi("a")))
    d.vmis_changed(Changed("MODIFIED", vmi("b", group="other")))
    assert seen.states() == [("a", "deleted"), ("b", "deleted"), ("b", "active")]
    groups = [group for group, _, _ in seen.changes]
    assert groups == [WEB, WEB, ("ns", "other")]
    assert [m.name for m in d.members(WEB)] == ["c"]
    assert seen.changes[0][2].instance_id == "uid-a"
    # A DELETED for an older VMI of the same name does not remove the new one.
    d.vmis_changed(Changed("DELETED", vmi("c", uid="uid-old")))
    assert d.member(("ns", "c")) is not None


def test_a_relist_reports_what_changed_meanwhile(
    directory: tuple[GroupDirectory, Recorder],
) -> None:
    d, seen = directory
    d.vmis_changed(Listed([vmi("a"), vmi("b")]))
    d.vmis_changed(Listed([vmi("a", paused=True), vmi("c")]))
    assert sorted(seen.states()) == [("a", "paused"), ("b", "deleted"), ("c", "active")]


def test_messaging_follows_the_vmgroup_and_defaults_to_on(
    directory: tuple[GroupDirectory, Recorder],
) -> None:
    d, _ = directory
    assert d.messaging_enabled(WEB)  # not seen yet
    off = {"metadata": {"name": "web", "namespace": "ns"}, "spec": {"messaging": False}}
    d.groups_changed(Listed([off]))
    assert not d.messaging_enabled(WEB)
    d.groups_changed(Changed("MODIFIED", {**off, "spec": {}}))
    assert d.messaging_enabled(WEB)
    d.groups_changed(Changed("MODIFIED", off))
    d.groups_changed(Changed("DELETED", off))
    assert d.messaging_enabled(WEB)


# --- routing ----------------------------------------------------------------------------------


def member(name: str, node: str | None, group: GroupKey = WEB) -> Member:
    return Member(("ns", name), group, f"uid-{name}", node, member_state(vmi(name, node)))


def test_copies_go_to_every_other_member_by_node() -> None:
    members = [
        member("a", "node-a"),
        member("b", "node-a"),
        member("c", "node-b"),
        member("d", "node-b"),
        member("e", "node-c"),
        member("f", None),
    ]
    route = route_broadcast(
        ("ns", "a"), members, "node-a", peer_transport=True, peer_up=lambda n: n == "node-b"
    )
    assert [m.name for m in route.local] == ["b"]
    assert {node: [m.name for m in ms] for node, ms in route.remote.items()} == {
        "node-b": ["c", "d"]
    }
    assert [(m.name, why) for m, why in route.dropped] == [
        ("e", Drop.PEER_DOWN),
        ("f", Drop.NOT_RUNNING),
    ]


def test_without_peer_transport_only_local_members_are_reached() -> None:
    members = [member("a", "node-a"), member("b", "node-a"), member("c", "node-b")]
    route = route_broadcast(
        ("ns", "a"), members, "node-a", peer_transport=False, peer_up=lambda _: True
    )
    assert [m.name for m in route.local] == ["b"]
    assert route.remote == {}
    assert [(m.name, why) for m, why in route.dropped] == [("c", Drop.NO_PEER_TRANSPORT)]


# --- what an agent accepts from another -------------------------------------------------------


def accept(
    sender: str,
    source: Member | None,
    targets: list[Member | None],
    *,
    uid: str = "uid-s",
    enabled: bool = True,
) -> Accepted | Refusal:
    return accept_from_peer(
        sender,
        source=source,
        source_uid=uid,
        targets=targets,
        local_node="node-b",
        messaging_enabled=lambda _: enabled,
    )


def test_a_copy_is_accepted_from_the_agent_of_the_source_node_for_members_here() -> None:
    source = member("s", "node-a")
    here = [member("t1", "node-b"), member("t2", "node-b")]
    verdict = accept("node-a", source, list(here))
    assert isinstance(verdict, Accepted)
    assert [t.name for t in verdict.targets] == ["t1", "t2"]
    assert verdict.stray == 0


@pytest.mark.parametrize(
    ("sender", "source", "uid", "targets", "enabled", "expected"),
    [
        # Another agent speaking for a VM it does not host.
        ("node-c", member("s", "node-a"), "uid-s", [member("t", "node-b")], True,
         Refusal.NOT_SOURCE_NODE),
        # A source that is no member here, or a stale VMI of that name.
        ("node-a", None, "uid-s", [member("t", "node-b")], True, Refusal.UNKNOWN_SOURCE),
        ("node-a", member("s", "node-a"), "uid-old", [member("t", "node-b")], True,
         Refusal.UNKNOWN_SOURCE),
        # Targets that are not members of the group on this node.
        ("node-a", member("s", "node-a"), "uid-s", [member("t", "node-a")], True,
         Refusal.TARGET_NOT_LOCAL),
        ("node-a", member("s", "node-a"), "uid-s", [None], True, Refusal.TARGET_NOT_LOCAL),
        ("node-a", member("s", "node-a"), "uid-s", [member("t", "node-b", ("ns", "db"))], True,
         Refusal.TARGET_NOT_LOCAL),
        ("node-a", member("s", "node-a"), "uid-s", [member("t", "node-b")], False,
         Refusal.MESSAGING_DISABLED),
    ],
)  # fmt: skip
def test_a_copy_is_refused_when_the_claim_does_not_hold(
    sender: str,
    source: Member | None,
    uid: str,
    targets: list[Member | None],
    *,
    enabled: bool,
    expected: Refusal,
) -> None:
    assert accept(sender, source, targets, uid=uid, enabled=enabled) is expected


def test_stray_targets_are_left_out_and_counted() -> None:
    verdict = accept("node-a", member("s", "node-a"), [member("t", "node-b"), None])
    assert isinstance(verdict, Accepted)
    assert [t.name for t in verdict.targets] == ["t"]
    assert verdict.stray == 1


# --- who may call -----------------------------------------------------------------------------

AGENT = "system:serviceaccount:vmha-system:vmha-node-agent"
OPERATOR = "system:serviceaccount:vmha-system:vmha-operator"


@pytest.mark.parametrize(
    ("has_cert", "identity", "outcome"),
    [
        (True, Identity(True, AGENT, "node-a"), "node-a"),
        (False, Identity(True, AGENT, "node-a"), Refusal.NO_CLIENT_CERT),
        (True, None, Refusal.BAD_TOKEN),
        (True, Identity(False, error="expired"), Refusal.BAD_TOKEN),
        (True, Identity(True, "system:serviceaccount:default:default", "node-a"),
         Refusal.WRONG_SERVICE_ACCOUNT),
        (True, Identity(True, OPERATOR, None), Refusal.WRONG_SERVICE_ACCOUNT),
        (True, Identity(True, AGENT, None), Refusal.NO_NODE),  # not bound to a pod on a node
    ],
)  # fmt: skip
def test_agents_are_known_by_certificate_and_token(
    has_cert: bool, identity: Identity | None, outcome: str | Refusal
) -> None:
    assert authorize_agent(has_cert, identity, AGENT) == outcome


def test_only_the_operator_may_ask_for_votes() -> None:
    assert authorize_operator(True, Identity(True, OPERATOR), OPERATOR) is None
    assert authorize_operator(True, Identity(True, AGENT, "node-a"), OPERATOR) is (
        Refusal.WRONG_SERVICE_ACCOUNT
    )
    assert authorize_operator(False, Identity(True, OPERATOR), OPERATOR) is Refusal.NO_CLIENT_CERT


def test_a_token_review_becomes_an_identity() -> None:
    review = {
        "status": {
            "authenticated": True,
            "user": {
                "username": AGENT,
                "extra": {"authentication.kubernetes.io/node-name": ["node-a"]},
            },
        }
    }
    assert Identity.from_review(review, 100.0) == Identity(True, AGENT, "node-a", 100.0)
    refused = Identity.from_review({"status": {"error": "token expired"}}, None)
    assert not refused.authenticated
    assert refused.error == "token expired"


def test_bearer_tokens_and_their_expiry() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer  abc ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token(None) is None
    claims = base64.urlsafe_b64encode(json.dumps({"exp": 1234}).encode()).rstrip(b"=").decode()
    assert token_expiry(f"header.{claims}.signature") == 1234.0
    assert token_expiry("not a jwt") is None


def test_service_account_user_names() -> None:
    config = MessagingConfig(namespace="vmha-system")
    assert config.account("vmha-operator") == OPERATOR
    assert config.account("other/op") == "system:serviceaccount:other:op"


# --- Leases -----------------------------------------------------------------------------------


def test_lease_names_and_what_a_lease_says() -> None:
    assert lease_name("node-a") == "vmha-agent-node-a"
    long = lease_name("n" * 253)
    assert len(long) <= 253
    assert long != lease_name("n" * 252 + "m")
    lease: dict[str, Any] = {
        "metadata": {"name": "vmha-agent-node-b", "annotations": {"vmha.io/endpoint": "https://x"}},
        "spec": {
            "holderIdentity": "node-b",
            "leaseDurationSeconds": 30,
            "renewTime": "2026-01-01T00:00:00.000000Z",
        },
    }
    found = endpoint_of(lease)
    assert found is not None
    assert (found.node, found.url, found.duration_s) == ("node-b", "https://x", 30.0)
    assert found.live(found.renewed_at + 30)
    assert not found.live(found.renewed_at + 31)
    # A Lease named for one node that claims another is ignored.
    assert endpoint_of({**lease, "metadata": {**lease["metadata"], "name": "vmha-agent-x"}}) is None
