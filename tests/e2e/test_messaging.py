"""Server group messaging end to end: QEMU guests running the real `vmha-guest`, two node
agents, the operator and the real apiserver.

One cluster for the module (`vmha_testbed.cluster.local_cluster`): the control plane, the
operator (its webhooks admit the VMs; votes go through the agents), and the agents of
`node-a` and `node-b`, each as the agents' ServiceAccount with exactly its RBAC, talking to
each other over mutual TLS with pod-bound tokens. The VMGroup `web` has three VMs: web-1
and web-2 on node-a, web-3 on node-b; the test plays KubeVirt (VMIs, launcher Pods, status)
and boots one QEMU guest per VM with its channel socket where its node's agent looks.

Everything a guest application sees is seen through the guest's own tools, run in the guest:
`vmha-guest broadcast|status --json` for scripts, and `vmha-guest watch --json`, started in
every guest at the beginning and running in the background, for what arrives. The tests run
in order against the same guests (booting them is the slow part); the last one deletes a VMI.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vmha_testbed.cluster import (
    FAST_AGENT_CONFIG,
    LocalCluster,
    local_cluster,
    post_to_agent,
    request_token,
)
from vmha_testbed.controlplane import ControlPlane
from vmha_testbed.guestapps import (
    GUEST_PROGRAMS,
    CliResult,
    GuestVoter,
    GuestWatch,
    flood,
    run_cli,
)
from vmha_testbed.guestimage import GuestImage
from vmha_testbed.polling import eventually
from vmha_testbed.qemu import GuestVM, boot_guests

pytestmark = pytest.mark.timeout(900)

T = TypeVar("T")
GROUP = "web"
PLACEMENT = {"web-1": "node-a", "web-2": "node-a", "web-3": "node-b"}
SETTLE_TIMEOUT = 90.0
# A tight per-VM broadcast limit (1/s, burst 5), so that a guest under TCG can exceed it.
BROADCASTS_PER_SECOND = 1.0
BROADCAST_BURST = 5
AGENT_CONFIG: dict[str, Any] = {
    **FAST_AGENT_CONFIG,
    "messaging": {
        **FAST_AGENT_CONFIG["messaging"],
        "broadcasts_per_second": BROADCASTS_PER_SECOND,
        "broadcast_burst": BROADCAST_BURST,
    },
}
# The operator waits at most this for a guest's vote (the webhook itself has 10 s).
VOTE_TIMEOUT_S = 6.0


def guest_config(name: str) -> str:
    # A 2 s heartbeat: a guest under TCG on two shared cores answers in time. Broadcasts
    # wait 100 ms for the host's nack (not 300 ms), so that a flood can outrun the limit.
    return f"""
[heartbeat]
name = "{name}"
interval_ms = 2000
corrective_action = "log"
vote_secs = 10

[server_group]
nack_window_ms = 100
"""


@dataclass
class Mesh:
    cluster: LocalCluster
    guests: dict[str, GuestVM]
    watches: dict[str, GuestWatch]

    @property
    def namespace(self) -> str:
        return self.cluster.namespace

    def source(self, name: str) -> str:
        """The `source_instance` the agents give `name`'s broadcasts."""
        return f"{self.namespace}/{name}"

    def uid(self, name: str) -> str:
        return self.cluster.kubevirt.members[name].vmi_uid

    def marks(self) -> dict[str, int]:
        """How many events each guest's watch has seen so far."""
        seen = in_parallel({name: watch.events for name, watch in self.watches.items()})
        return {name: len(events) for name, events in seen.items()}


def in_parallel(calls: Mapping[str, Callable[[], T]]) -> dict[str, T]:
    """Run the calls at once (each guest has its own CPU); their results by key."""
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        futures = {key: pool.submit(call) for key, call in calls.items()}
        return {key: future.result() for key, future in futures.items()}


@pytest.fixture(scope="module")
def mesh(
    control_plane: ControlPlane, guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Mesh]:
    workdir = tmp_path_factory.mktemp("messaging-e2e")
    with local_cluster(
        control_plane,
        workdir=workdir,
        agent_config=AGENT_CONFIG,
        vote_timeout_s=VOTE_TIMEOUT_S,
        namespace_prefix="e2e-msg-",
        agents_namespace="vmha-e2e",
        rbac_prefix="vmha-e2e",
    ) as cluster:
        kubevirt = cluster.kubevirt
        kubevirt.create_group(GROUP)
        members = kubevirt.start_members(GROUP, PLACEMENT)
        booted = boot_guests(
            guest_image,
            workdir / "guests",
            [guest_config(member.name) for member in members],
            names=[member.name for member in members],
            files=GUEST_PROGRAMS,
            channel_sockets=[member.socket for member in members],
        )
        guests = {guest.name: guest for guest in booted}
        try:
            for name in PLACEMENT:
                kubevirt.wait_heartbeat(name, "healthy", timeout=SETTLE_TIMEOUT)
            watches = {name: GuestWatch(guest).start() for name, guest in guests.items()}
            in_parallel({name: watch.wait_subscribed for name, watch in watches.items()})
            yield Mesh(cluster, guests, watches)
        finally:
            for guest in booted:
                guest.close()


@pytest.fixture(autouse=True)
def process_logs(mesh: Mesh) -> Iterator[None]:
    yield
    print(mesh.cluster.log_tails())  # pytest shows it when the test failed


def metric(mesh: Mesh, node: str, name: str, **labels: str) -> float:
    return mesh.cluster.metric(node, name, **labels)


def cli(mesh: Mesh, name: str, *args: str) -> CliResult:
    return run_cli(mesh.guests[name], *args)


# --- the tests, in order -----------------------------------------------------------------------


def test_status_lists_every_member_with_its_state(mesh: Mesh) -> None:
    results = in_parallel({name: partial(cli, mesh, name, "status") for name in ("web-1", "web-3")})
    expected = [
        (name, node, "active", "healthy", mesh.namespace, mesh.uid(name))
        for name, node in PLACEMENT.items()
    ]
    for name, result in results.items():
        assert result.returncode == 0, f"{name}: {result.output}"
        [answer] = result.objects
        assert answer["ok"] is True
        members = [
            (m["display_name"], m["host"], m["state"], m["heartbeat"], m["namespace"],
             m["instance_id"])
            for m in answer["members"]
        ]  # fmt: skip
        assert members == expected, name
        assert all(m["ready"] and m["power_state"] == "running" for m in answer["members"])


def test_a_broadcast_reaches_the_other_two_with_its_source(mesh: Mesh) -> None:
    marks = mesh.marks()
    peer_before = metric(mesh, "node-b", "vmha_messaging_deliveries_total", path="peer")
    result = cli(mesh, "web-1", "broadcast", "web-1 is active")
    assert result.returncode == 0, result.output
    assert result.objects == [{"ok": True, "bytes": 15}]
    for name in ("web-2", "web-3"):
        event = mesh.watches[name].wait_for(
            lambda e: e.get("event") == "broadcast" and e.get("data") == "web-1 is active",
            "web-1's broadcast",
            after=marks[name],
        )
        assert event["source_instance"] == mesh.source("web-1")
    # web-3 is on the other node: its copy went from agent to agent.
    assert metric(mesh, "node-b", "vmha_messaging_deliveries_total", path="peer") == peer_before + 1
    assert mesh.watches["web-1"].broadcasts(after=marks["web-1"]) == []  # never to itself


def test_an_oversize_or_flooding_sender_is_refused_without_hurting_the_others(
    mesh: Mesh,
) -> None:
    oversize = cli(mesh, "web-2", "broadcast", "x" * 3051)
    assert oversize.returncode == 2, oversize.output
    assert oversize.error["code"] == "too-large"
    assert "3051 bytes" in oversize.error["message"]

    marks = mesh.marks()

    def limited() -> float:
        return metric(
            mesh, "node-a", "vmha_messaging_guest_messages_total",
            type="broadcast", result="rate_limited",
        )  # fmt: skip

    limited_before = limited()
    returncode, summary = flood(mesh.guests["web-2"], 30)
    assert (returncode, summary["errors"]) == (5, {}), summary
    assert summary["rate_limited"] >= 1
    assert summary["sent"] + summary["rate_limited"] == 30
    # The agent refused what was over the limit (a nack that came after the guest's nack
    # window counts as sent there) and passed the rest to both others.
    refused = int(limited() - limited_before)
    print(f"flood of 30: the guest saw {summary}; the agent refused {refused}")
    assert refused >= summary["rate_limited"]
    passed = 30 - refused
    assert passed >= BROADCAST_BURST
    source = mesh.source("web-2")
    for name in ("web-1", "web-3"):
        watch = mesh.watches[name]
        eventually(
            lambda w=watch, n=name: len(w.broadcasts(source, marks[n])) >= passed,  # type: ignore[misc]
            f"{name} receiving the {passed} broadcasts let through",
            poll=0.5,
        )
        assert len(watch.broadcasts(source, marks[name])) == passed

    # The others are unharmed, and the flooder may speak again once its budget refills.
    time.sleep(2.0 / BROADCASTS_PER_SECOND)
    results = in_parallel({
        "web-3": lambda: cli(mesh, "web-3", "broadcast", "web-3 still heard"),
        "web-2": lambda: cli(mesh, "web-2", "broadcast", "web-2 calm again"),
    })  # fmt: skip
    for name, result in results.items():
        assert result.returncode == 0, f"{name}: {result.output}"
    mesh.watches["web-1"].wait_for(
        lambda e: e.get("data") == "web-3 still heard", "web-3's broadcast", after=marks["web-1"]
    )
    mesh.watches["web-3"].wait_for(
        lambda e: e.get("data") == "web-2 calm again", "web-2's broadcast", after=marks["web-3"]
    )


def test_messaging_off_is_a_prompt_error_naming_the_group(mesh: Mesh) -> None:
    kubevirt = mesh.cluster.kubevirt
    marks = mesh.marks()
    kubevirt.patch_group(GROUP, {"messaging": False})
    try:
        # Both agents see the change within a watch event (a retry covers a slow one); with
        # --timeout 60, exit 3 (not 4: not answering) also shows that nothing waited for it.
        def status_off() -> dict[str, CliResult] | None:
            results = in_parallel(
                {name: partial(cli, mesh, name, "status", "--timeout=60") for name in PLACEMENT}
            )
            return results if all(r.returncode == 3 for r in results.values()) else None

        results = eventually(status_off, "every guest told messaging is off", poll=1.0)
        results["web-1 broadcast"] = cli(mesh, "web-1", "broadcast", "anyone?", "--timeout=60")
        for name, result in results.items():
            assert result.returncode == 3, f"{name}: {result.output}"
            assert result.error["code"] == "messaging-disabled", name
            assert "server group messaging is off for group web" in result.error["message"]
            command = "broadcast" if "broadcast" in name else "status"
            assert f"vmha-guest {command}: server group messaging is disabled" in result.output
    finally:
        kubevirt.patch_group(GROUP, {"messaging": True})
    assert mesh.watches["web-2"].broadcasts(mesh.source("web-1"), marks["web-2"]) == []
    back = eventually(
        lambda: (r := cli(mesh, "web-1", "status")).returncode == 0 and r,
        "messaging on again",
        SETTLE_TIMEOUT,
        poll=1.0,
    )
    assert len(back.objects[0]["members"]) == 3


def test_a_migration_rejected_by_the_guest_is_refused_with_its_reason(mesh: Mesh) -> None:
    cluster = mesh.cluster
    before = metric(mesh, "node-a", "vmha_votes_total", result="reject")
    reason = "web-1 is primary: replication in progress"
    voter = GuestVoter(mesh.guests["web-1"], reason).start()
    try:
        refused = cluster.create_migration("web-1", "web-1-refused")
        assert refused.returncode != 0
        assert 'admission webhook "validate-migration.' in refused.stderr
        assert (
            f'VirtualMachineInstance "web-1": its guest rejected live_migrate_begin: {reason}'
        ) in refused.stderr
        [vote] = voter.votes()
        assert vote["event_type"] == "live_migrate_begin"
        assert 0 < vote["timeout_ms"] <= VOTE_TIMEOUT_S * 1000
    finally:
        voter.stop()
    assert metric(mesh, "node-a", "vmha_votes_total", result="reject") == before + 1
    # Without the application nobody objects: the daemon accepts for the guest.
    allowed = cluster.create_migration("web-1", "web-1-allowed")
    assert allowed.returncode == 0, allowed.stderr


def test_a_spoofed_agent_request_is_refused_and_counted(mesh: Mesh) -> None:
    cluster = mesh.cluster
    creds = cluster.credentials
    url = cluster.endpoint("node-b") + "/v1/broadcast"
    token_a = creds.agent_tokens["node-a"].read_text()
    marks = mesh.marks()

    def batch(source: str, target: str, data: str) -> dict[str, Any]:
        ref = {"namespace": mesh.namespace, "name": source, "uid": mesh.uid(source)}
        return {"messages": [{"source": ref, "targets": [target], "data": data}]}

    def refused(reason: str) -> float:
        return metric(mesh, "node-b", "vmha_peer_refused_total", reason=reason)

    # What node-a's agent may send: web-1 (on node-a) to web-3 (on node-b).
    legit = batch("web-1", "web-3", "by hand, as node-a's agent")
    status, _ = post_to_agent(url, legit, ca_file=creds.ca_file, cert=creds.agent_client,
                              token=token_a)  # fmt: skip
    assert status == 200
    mesh.watches["web-3"].wait_for(
        lambda e: e.get("data") == "by hand, as node-a's agent", "the legitimate copy",
        after=marks["web-3"],
    )  # fmt: skip

    not_an_agent = request_token(cluster.api, mesh.namespace, "default")
    cases: list[tuple[str, tuple[Path, Path] | None, str, dict[str, Any]]] = [
        ("no_client_cert", None, token_a, legit),
        ("wrong_service_account", creds.agent_client, not_an_agent, legit),
        # node-a's agent speaking for web-3, which runs on node-b.
        ("not_source_node", creds.agent_client, token_a, batch("web-3", "web-3", "spoofed")),
    ]
    for reason, cert, token, body in cases:
        before = refused(reason)
        status, answer = post_to_agent(url, body, ca_file=creds.ca_file, cert=cert, token=token)
        assert (status, answer.get("error")) == (403, reason)
        assert refused(reason) == before + 1
    time.sleep(1.0)  # anything wrongly let through would have arrived by now
    arrived = [e["data"] for e in mesh.watches["web-3"].broadcasts(after=marks["web-3"])]
    assert arrived == ["by hand, as node-a's agent"]


def test_an_agent_down_does_not_stop_the_others(mesh: Mesh) -> None:
    cluster = mesh.cluster
    agent_b = cluster.agents["node-b"]
    marks = mesh.marks()
    assert agent_b.pid is not None
    os.kill(agent_b.pid, signal.SIGKILL)  # no goodbye: its Lease stays until it is stale

    def dropped() -> float:
        return sum(
            metric(mesh, "node-a", "vmha_messaging_dropped_total", reason=reason)
            for reason in ("peer_unreachable", "peer_down", "peer_timeout")
        )

    dropped_before = dropped()
    sent = cli(mesh, "web-1", "broadcast", "node-b is gone")  # the sender is not held up
    assert sent.returncode == 0, sent.output
    mesh.watches["web-2"].wait_for(
        lambda e: e.get("data") == "node-b is gone", "the local copy", after=marks["web-2"]
    )
    eventually(lambda: dropped() > dropped_before, "the copy for web-3 dropped and counted")
    status = cli(mesh, "web-2", "status")
    assert status.returncode == 0, status.output
    assert [m["display_name"] for m in status.objects[0]["members"]] == list(PLACEMENT)

    agent_b.restart()  # stop() only tidies up after the killed process
    cluster.wait_peers(SETTLE_TIMEOUT)
    eventually(
        lambda: metric(mesh, "node-b", "vmha_heartbeat_state", vm="web-3", state="healthy"),
        "web-3 registered with the new agent",
        SETTLE_TIMEOUT,
    )

    def heard_again() -> bool:
        # node-a skips a node whose agent failed for a while (backoff): retry until through.
        assert cli(mesh, "web-1", "broadcast", "node-b is back").returncode == 0
        return bool(
            [e for e in mesh.watches["web-3"].broadcasts(after=marks["web-3"])
             if e["data"] == "node-b is back"]
        )  # fmt: skip

    eventually(heard_again, "web-3 hearing web-1 again", SETTLE_TIMEOUT, poll=1.0)


def test_pause_unpause_and_deletion_are_notified_to_the_others(mesh: Mesh) -> None:
    """web-2 (node-a) changes; web-1 hears it from the same agent, web-3 from node-b's."""
    kubevirt = mesh.cluster.kubevirt
    observers = ("web-1", "web-3")

    def change(act: Callable[[], None], state: str) -> dict[str, dict[str, Any]]:
        marks = mesh.marks()
        act()

        def told(name: str) -> dict[str, Any]:
            event = mesh.watches[name].wait_for(
                lambda e: (
                    e.get("event") == "notification"
                    and e["member"]["display_name"] == "web-2"
                    and e["member"]["state"] == state
                ),
                f"web-2 {state}",
                after=marks[name],
            )
            member: dict[str, Any] = event["member"]
            return member

        return in_parallel({name: partial(told, name) for name in observers})

    for paused in change(lambda: kubevirt.set_paused("web-2", True), "paused").values():
        assert (paused["power_state"], paused["host"]) == ("paused", "node-a")
        assert paused["instance_id"] == mesh.uid("web-2")
    for active in change(lambda: kubevirt.set_paused("web-2", False), "active").values():
        assert active["power_state"] == "running"
    for deleted in change(lambda: kubevirt.delete_vmi("web-2"), "deleted").values():
        assert deleted["instance_id"] == mesh.uid("web-2")
    assert mesh.watches["web-2"].notifications("web-2") == []  # never about itself
