"""The node agent in a cluster with real QEMU guests, and vmha's alerts in a real Prometheus.

One cluster for the whole module, as a real one would be (`vmha_testbed.cluster`): the
control plane, the operator (its webhooks admit and mutate the VirtualMachines; votes on),
two node-agent processes for `node-a` and `node-b` (each with its own fake kubelet root,
each running as the agent's ServiceAccount with exactly its documented RBAC and a real
token, the two talking over mutual TLS), and a real Prometheus scraping both agents as the
chart's ServiceMonitor does, with the chart's alert rules.

The test plays KubeVirt: it creates the VMIs from the (mutated) VM templates, sets their
node, phase and readiness, creates the virt-launcher Pods with their `private` emptyDir, and
boots the QEMU guests (running vmha-guest) with their channel sockets exactly where the
agent of their node looks: `<kubelet root>/pods/<pod uid>/volumes/kubernetes.io~empty-dir/
private/vmha`. Everything is asserted through the APIs: Events on the VMIs (reasons, series),
the `vmha.io/heartbeat` annotation, `VMGroup.status` as the operator maintains it, and the
alerts Prometheus reports.

The tests run in order against the same two guests (booting under TCG is the slow part):
registration, a hang (SIGSTOP) and its recovery, a failing health check, an agent restart, a
live migration from node-a to node-b, `reboot` on an unhealthy guest, and last a killed QEMU
halted by `stop`. The migration is a real QEMU live migration between two QEMU processes (see
`test_a_vmi_live_migrated_to_node_b_is_followed_without_a_fault`).
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import pytest
import yaml

from vmha_testbed import polling
from vmha_testbed.agentproc import AgentProcess
from vmha_testbed.cluster import FAST_AGENT_CONFIG, LocalCluster, local_cluster
from vmha_testbed.controlplane import ControlPlane
from vmha_testbed.guestimage import GuestImage
from vmha_testbed.kubevirt import KubeVirt, Member
from vmha_testbed.operatorproc import OperatorProcess
from vmha_testbed.prometheus import PrometheusServer, ScrapeTarget
from vmha_testbed.qemu import GuestVM, boot_guests
from vmha_testbed.toolchain import REPO_ROOT

pytestmark = pytest.mark.timeout(900)

T = TypeVar("T")
NODES = ("node-a", "node-b")
GROUP = "web"
# Under TCG on two shared cores a guest can be slow to answer: a 2 s interval and three
# misses keep a busy guest from failing by itself, and detect a hang within 8 s. It also
# keeps each hang below what vmha-guest takes for a host that went away (no challenge for
# ten intervals: it registers again, and the fault would end as a new registration).
INTERVAL_MS = 2000
MISSED_THRESHOLD = 3
SETTLE_TIMEOUT = 90.0
HEALTH_FLAG = "/var/lib/vmha-test/healthy"
FAULT_REASONS = ("HeartbeatMissed", "HeartbeatFailed", "HeartbeatUnhealthy")
AGENT_NAMESPACE = "vmha-system"
# The chart's names for release `vmha` in `vmha-system`: the Service (the scrape job) and
# the namespace its alert rules select on.
AGENT_JOB = "vmha-node-agent"
CHART = REPO_ROOT / "charts" / "vmha"
RULE_TEMPLATE = "templates/monitoring/prometheusrule.yaml"
# The chart's rules wait 1-15 minutes (`for`); promtool's unit tests cover those durations.
# Here every `for` is cut to this, so that a real Prometheus shows pending → firing in time.
ALERT_FOR = "3s"

AGENT_CONFIG: dict[str, Any] = {
    **FAST_AGENT_CONFIG,
    "heartbeat": {"min_interval_ms": 100, "missed_threshold": MISSED_THRESHOLD},
    "channel": {"reconnect_initial_s": 0.1, "reconnect_max_s": 1.0},
    "events": {"series_update_s": 0.5},
    "corrective_actions": {"max_notice_s": 5},
}


def guest_config(name: str) -> str:
    # The guest asks for the most (`reboot`), so that the group's action applies: a guest may
    # only narrow it. Its notice before an action is 2 s.
    return f"""
[heartbeat]
name = "{name}"
interval_ms = {INTERVAL_MS}
corrective_action = "reboot"
shutdown_notice_secs = 2

[[checks]]
name = "app-ready"
type = "file"
path = "{HEALTH_FLAG}"
interval_ms = 300
timeout_ms = 500
"""


def eventually(check: Callable[[], T | Literal[False] | None], what: str) -> T:
    """`vmha_testbed.polling.eventually` with the patience QEMU guests under TCG need."""
    return polling.eventually(check, what, SETTLE_TIMEOUT, poll=0.25)


# --- the cluster, as KubeVirt would make it ---------------------------------------------------


@dataclass
class Cluster:
    """The module's cluster (`vmha_testbed.cluster`): operator, the agents of both nodes,
    Prometheus scraping them, and a QEMU guest per VM; the test plays virt-controller and
    virt-handler through `kubevirt`."""

    local: LocalCluster
    prometheus: PrometheusServer
    guests: dict[str, GuestVM] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        return self.local.namespace

    @property
    def agents(self) -> dict[str, AgentProcess]:
        return self.local.agents

    @property
    def operator(self) -> OperatorProcess:
        assert self.local.operator is not None
        return self.local.operator

    @property
    def members(self) -> dict[str, Member]:
        return self.kubevirt.members

    @property
    def kubevirt(self) -> KubeVirt:
        return self.local.kubevirt

    # -- objects --

    def create_group(self, heartbeat: dict[str, Any]) -> None:
        self.kubevirt.create_group(GROUP, heartbeat=heartbeat)

    def patch_group(self, heartbeat: dict[str, Any]) -> None:
        self.kubevirt.patch_group(GROUP, {"heartbeat": heartbeat})

    # -- reading --

    def wait_heartbeat(self, name: str, state: str, node: str | None = None) -> dict[str, Any]:
        return self.kubevirt.wait_heartbeat(name, state, node=node, timeout=SETTLE_TIMEOUT)

    def wait_events(self, name: str, reason: str) -> list[dict[str, Any]]:
        return eventually(lambda: self.kubevirt.events(name, reason), f"{reason} about {name}")

    def faults(self, name: str) -> int:
        return sum(self.kubevirt.count(name, reason) for reason in FAULT_REASONS)

    def wait_count(self, name: str, reason: str, at_least: int) -> int:
        return eventually(
            lambda: (n := self.kubevirt.count(name, reason)) >= at_least and n,
            f"{at_least} x {reason} on {name}",
        )

    def group_status(self) -> dict[str, Any]:
        return self.kubevirt.group_status(GROUP)

    def wait_group(self, check: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        return eventually(lambda: (s := self.group_status()) and check(s) and s, what)

    def close_guests(self) -> None:
        for vm in self.guests.values():
            vm.close()


def member(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next((m for m in status.get("members", []) if m["vm"] == name), {})


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == type_), {})


# --- Prometheus -------------------------------------------------------------------------------


def chart_alert_rules(helm: Path, home: Path) -> list[dict[str, Any]]:
    """The rule groups of the chart's PrometheusRule (release vmha in vmha-system), every
    `for` cut to ALERT_FOR."""
    homes = {f"HELM_{kind}_HOME": str(home / kind) for kind in ("CONFIG", "CACHE", "DATA")}
    result = subprocess.run(
        [
            str(helm), "template", "vmha", str(CHART), f"--namespace={AGENT_NAMESPACE}",
            "--api-versions=monitoring.coreos.com/v1", f"--show-only={RULE_TEMPLATE}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, **homes},
        timeout=180,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    groups: list[dict[str, Any]] = yaml.safe_load(result.stdout)["spec"]["groups"]
    for group in groups:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = ALERT_FOR
    return groups


def scrape_targets(agents: dict[str, AgentProcess]) -> list[ScrapeTarget]:
    """The agents as the chart's ServiceMonitor has them scraped: the pod's namespace and
    name, and the node (its relabeling)."""
    return [
        ScrapeTarget(
            f"127.0.0.1:{agent.port}",
            {"namespace": AGENT_NAMESPACE, "node": node, "pod": f"{AGENT_JOB}-{node}"},
        )
        for node, agent in agents.items()
        if agent.running
    ]


def alerts(prometheus: PrometheusServer, name: str, **labels: str) -> list[dict[str, Any]]:
    return [
        alert
        for alert in prometheus.alerts()
        if alert["labels"]["alertname"] == name
        and all(alert["labels"].get(key) == value for key, value in labels.items())
    ]


def wait_firing(prometheus: PrometheusServer, name: str, **labels: str) -> dict[str, Any]:
    """Wait for the alert to fire; it must have been `pending` first (the rule's `for`)."""
    states: set[str] = set()

    def firing() -> dict[str, Any] | None:
        found = alerts(prometheus, name, **labels)
        states.update(alert["state"] for alert in found)
        return next((alert for alert in found if alert["state"] == "firing"), None)

    alert = eventually(firing, f"{name} {labels} firing")
    assert "pending" in states, f"{name} fired without being pending for {ALERT_FOR}"
    return alert


def wait_resolved(prometheus: PrometheusServer, name: str, **labels: str) -> None:
    eventually(lambda: not alerts(prometheus, name, **labels), f"{name} {labels} resolved")


# --- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(
    control_plane: ControlPlane, guest_image: GuestImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("cluster-e2e")
    with local_cluster(
        control_plane,
        workdir=workdir,
        agent_config=AGENT_CONFIG,
        namespace_prefix="e2e-",
        agents_namespace="vmha-e2e",
        rbac_prefix="vmha-e2e",
    ) as local:
        prometheus = PrometheusServer(
            workdir / "prometheus",
            job=AGENT_JOB,
            rule_groups=chart_alert_rules(control_plane.tools.helm, workdir / "helm"),
        )
        prometheus.set_targets(scrape_targets(local.agents))
        with prometheus:
            world = Cluster(local, prometheus)
            try:
                world.create_group(
                    {"minIntervalMs": 400, "missedThreshold": MISSED_THRESHOLD,
                     "correctiveAction": "log"}
                )  # fmt: skip
                members = local.kubevirt.start_members(GROUP, {"vm-a": "node-a", "vm-b": "node-b"})
                guests = boot_guests(
                    guest_image,
                    workdir / "guests",
                    [guest_config(m.name) for m in members],
                    names=[m.name for m in members],
                    files={HEALTH_FLAG: ""},
                    channel_sockets=[m.socket for m in members],
                )
                world.guests.update((guest.name, guest) for guest in guests)
                yield world
            finally:
                world.close_guests()


@pytest.fixture(autouse=True)
def process_logs(cluster: Cluster) -> Iterator[None]:
    yield
    print(cluster.local.log_tails())  # pytest shows them when the test failed


def guest(cluster: Cluster, name: str) -> GuestVM:
    return cluster.guests[name]


def actions(cluster: Cluster, name: str, action: str) -> list[dict[str, Any]]:
    return [e for e in cluster.kubevirt.events(name, "CorrectiveAction") if e["action"] == action]


def metric(cluster: Cluster, node: str, name: str, **labels: str) -> float:
    return cluster.agents[node].metric(name, **labels) or 0.0


# --- the tests, in order -----------------------------------------------------------------------


def test_members_are_admitted_attached_and_shown_healthy(cluster: Cluster) -> None:
    # Admitted through the operator's webhook: the template carries the channel for the agent.
    template = cluster.kubevirt.vm("vm-a")["spec"]["template"]["metadata"]
    assert template["annotations"]["vmha.io/channel-path"] == "/var/run/kubevirt-private/vmha"
    assert "hooks.kubevirt.io/hookSidecars" in template["annotations"]
    assert template["labels"]["vmha.io/group"] == GROUP

    for name, node in (("vm-a", "node-a"), ("vm-b", "node-b")):
        value = cluster.wait_heartbeat(name, "healthy", node)
        assert value["reason"] == "registered"
        [event] = cluster.wait_events(name, "HeartbeatRegistered")
        assert (event["type"], event["action"]) == ("Normal", "Heartbeat")
        assert event["reportingController"] == "vmha.io/node-agent"
        assert event["reportingInstance"] == node
        assert event["regarding"]["uid"] == cluster.members[name].vmi_uid
        assert metric(cluster, node, "vmha_vms") == 1.0

    status = cluster.wait_group(
        lambda s: condition(s, "Ready").get("status") == "True", "the group Ready"
    )
    shown = [
        (m["vm"], m["node"], m["phase"], m["ready"], m["heartbeat"]) for m in status["members"]
    ]
    assert shown == [
        ("vm-a", "node-a", "Running", True, "healthy"),
        ("vm-b", "node-b", "Running", True, "healthy"),
    ]
    assert condition(status, "Ready")["reason"] == "AllMembersReady"

    # Prometheus scrapes both agents; per-VM series carry the VM's namespace and the node.
    prometheus = cluster.prometheus
    up = eventually(
        lambda: len(r := prometheus.query(f'up{{job="{AGENT_JOB}"}} == 1')) == 2 and r,
        "both agents scraped",
    )
    assert {series["metric"]["node"] for series in up} == set(NODES)
    [healthy] = eventually(
        lambda: prometheus.query('vmha_heartbeat_state{vm="vm-a", state="healthy"} == 1'),
        "vm-a healthy in Prometheus",
    )
    assert healthy["metric"]["namespace"] == cluster.namespace
    assert healthy["metric"]["node"] == "node-a"
    assert [a["labels"]["alertname"] for a in prometheus.alerts()] == []


def test_a_hung_guest_fails_alerts_and_recovers_on_sigcont(cluster: Cluster) -> None:
    prometheus = cluster.prometheus
    vm_b_faults = cluster.faults("vm-b")
    hung = guest(cluster, "vm-a")
    hung.pause()  # SIGSTOP of QEMU
    try:
        failed = cluster.wait_heartbeat("vm-a", "failed", "node-a")
        assert failed["reason"] == "missed"
        assert failed["detail"] == f"{MISSED_THRESHOLD} consecutive challenges unanswered"
        [event] = cluster.wait_events("vm-a", "HeartbeatFailed")
        assert event["type"] == "Warning"
        assert f"{MISSED_THRESHOLD} consecutive challenges unanswered" in event["note"]
        # Each miss before the failure was counted, into one Event with a series.
        cluster.wait_count("vm-a", "HeartbeatMissed", MISSED_THRESHOLD)
        [missed] = cluster.kubevirt.events("vm-a", "HeartbeatMissed")
        assert missed["series"]["lastObservedTime"] > missed["eventTime"]
        eventually(lambda: actions(cluster, "vm-a", "Log"), "the group's action: log")
        status = cluster.wait_group(
            lambda s: member(s, "vm-a").get("heartbeat") == "failed", "vm-a failed in the group"
        )
        ready = condition(status, "Ready")
        assert (ready["status"], ready["reason"]) == ("False", "HeartbeatUnhealthy")
        assert "unhealthy heartbeat: vm-a" in ready["message"]
        alert = wait_firing(prometheus, "VmhaGuestHeartbeatFailed", vm="vm-a")
        assert alert["labels"]["namespace"] == cluster.namespace
        assert alert["labels"]["node"] == "node-a"
        assert alert["labels"]["severity"] == "critical"
        assert f"VM {cluster.namespace}/vm-a" in alert["annotations"]["summary"]
    finally:
        hung.resume()

    recovered = cluster.wait_heartbeat("vm-a", "healthy", "node-a")
    # (`registered` instead would mean the guest was frozen so long that vmha-guest gave up
    # on the host and registered anew: see INTERVAL_MS.)
    assert recovered["reason"] == "recovered"
    cluster.wait_count("vm-a", "HeartbeatRecovered", 1)
    cluster.wait_group(lambda s: condition(s, "Ready").get("status") == "True", "Ready again")
    wait_resolved(prometheus, "VmhaGuestHeartbeatFailed", vm="vm-a")
    assert cluster.faults("vm-b") == vm_b_faults  # the other guest saw nothing


def test_a_failing_health_check_makes_the_guest_unhealthy(cluster: Cluster) -> None:
    prometheus = cluster.prometheus
    vm = guest(cluster, "vm-a")
    recoveries = cluster.kubevirt.count("vm-a", "HeartbeatRecovered")
    vm.check(f"rm {HEALTH_FLAG}")
    try:
        unhealthy = cluster.wait_heartbeat("vm-a", "unhealthy", "node-a")
        assert unhealthy["reason"] == "unhealthy"
        [event] = cluster.wait_events("vm-a", "HeartbeatUnhealthy")
        assert event["type"] == "Warning"
        assert "app-ready" in event["note"]  # the guest names its failing check
        cluster.wait_group(
            lambda s: member(s, "vm-a").get("heartbeat") == "unhealthy", "unhealthy in the group"
        )
        alert = wait_firing(prometheus, "VmhaGuestUnhealthy", vm="vm-a")
        assert alert["labels"]["severity"] == "warning"
    finally:
        vm.check(f"touch {HEALTH_FLAG}")
    cluster.wait_heartbeat("vm-a", "healthy", "node-a")
    cluster.wait_count("vm-a", "HeartbeatRecovered", recoveries + 1)
    wait_resolved(prometheus, "VmhaGuestUnhealthy", vm="vm-a")


def test_an_agent_restart_alerts_and_reattaches_without_a_false_fault(cluster: Cluster) -> None:
    prometheus = cluster.prometheus
    agent = cluster.agents["node-a"]
    before = cluster.kubevirt.heartbeat("vm-a")
    faults = cluster.faults("vm-a")

    agent.stop()
    # Prometheus notices: the agent on node-a cannot be scraped. Some agent still is.
    alert = wait_firing(prometheus, "VmhaNodeAgentDown", node="node-a")
    assert alert["labels"]["severity"] == "critical"
    assert alerts(prometheus, "VmhaNodeAgentDown", node="node-b") == []
    assert alerts(prometheus, "VmhaNodeAgentAbsent") == []

    agent.start()  # on a new port, as a new pod would have a new address
    prometheus.set_targets(scrape_targets(cluster.agents))
    eventually(
        lambda: metric(cluster, "node-a", "vmha_heartbeat_state", vm="vm-a", state="healthy"),
        "vm-a registered with the new agent",
    )
    eventually(
        lambda: metric(cluster, "node-a", "vmha_heartbeat_challenges_total", vm="vm-a") >= 5,
        "vm-a challenged by the new agent",
    )
    assert cluster.kubevirt.heartbeat("vm-a") == before  # not even rewritten
    assert cluster.kubevirt.count("vm-a", "HeartbeatRegistered") == 1
    assert cluster.faults("vm-a") == faults
    wait_resolved(prometheus, "VmhaNodeAgentDown", node="node-a")


def test_a_vmi_live_migrated_to_node_b_is_followed_without_a_fault(cluster: Cluster) -> None:
    """KubeVirt's live migration, with what it takes: the VMI's migrationState names the
    target (the source agent lets go), a target virt-launcher Pod starts on node-b, QEMU
    migrates the running guest into a new QEMU process whose channel socket is in the target
    Pod's emptyDir on node-b, the source launcher ends, and the VMI's node becomes node-b.
    The guest never restarts (same boot id): vmha-guest simply sees its host end close and
    a new one open, and registers again."""
    vm_a = cluster.members["vm-a"]
    source = guest(cluster, "vm-a")
    boot_id = source.check("cat /proc/sys/kernel/random/boot_id").strip()
    faults = cluster.faults("vm-a")
    migration = {
        "migrationUid": secrets.token_hex(8),
        "sourceNode": "node-a",
        "targetNode": "node-b",
        "startTimestamp": "2026-01-01T00:00:00Z",
    }
    cluster.kubevirt.set_vmi_status("vm-a", {"migrationState": migration})
    eventually(lambda: metric(cluster, "node-a", "vmha_vms") == 0.0, "node-a letting go")

    target_launcher = cluster.kubevirt.create_launcher("vm-a", "node-b")
    migration["targetPod"] = target_launcher.name
    cluster.kubevirt.set_vmi_status("vm-a", {"migrationState": migration})
    target = source.migrate(target_launcher.socket)
    cluster.guests["vm-a"] = target
    source.close()
    cluster.kubevirt.delete_pod(vm_a.launcher.name)  # the source virt-launcher is done
    vm_a.launcher = target_launcher
    completed = {**migration, "completed": True, "endTimestamp": "2026-01-01T00:00:05Z"}
    cluster.kubevirt.set_vmi_status("vm-a", {"nodeName": "node-b", "migrationState": completed})

    value = cluster.wait_heartbeat("vm-a", "healthy", "node-b")
    assert value["reason"] == "registered"
    registered = {
        e["reportingInstance"] for e in cluster.kubevirt.events("vm-a", "HeartbeatRegistered")
    }
    assert registered == {"node-a", "node-b"}
    eventually(
        lambda: metric(cluster, "node-b", "vmha_heartbeat_challenges_total", vm="vm-a") >= 5,
        "vm-a challenged on node-b",
    )
    assert metric(cluster, "node-b", "vmha_vms") == 2.0
    assert metric(cluster, "node-a", "vmha_vms") == 0.0
    assert cluster.faults("vm-a") == faults
    status = cluster.wait_group(lambda s: member(s, "vm-a").get("node") == "node-b", "moved")
    assert member(status, "vm-a")["heartbeat"] == "healthy"
    assert target.check("cat /proc/sys/kernel/random/boot_id").strip() == boot_id


def test_reboot_deletes_the_vmi_after_notifying_the_guest(cluster: Cluster) -> None:
    cluster.patch_group({"correctiveAction": "reboot"})
    vm = guest(cluster, "vm-a")
    console = vm.console_size()
    vm.check(f"rm {HEALTH_FLAG}")

    eventually(lambda: cluster.kubevirt.vmi("vm-a") is None, "the VMI deleted")
    [event] = eventually(lambda: actions(cluster, "vm-a", "Reboot"), "the action")
    assert "VMI deleted" in event["note"]
    assert event["reportingInstance"] == "node-b"
    # The guest got its notice first (vmha-guest logs it to the console).
    vm.wait_console(r"host notice: reboot", timeout=30, offset=console)
    # The VirtualMachine stays: its run strategy would start a new VMI.
    assert cluster.kubevirt.vm("vm-a")["spec"]["runStrategy"] == "Always"
    assert (
        metric(cluster, "node-b", "vmha_corrective_actions_total", action="reboot", outcome="taken")
        == 1.0
    )
    status = cluster.wait_group(lambda s: member(s, "vm-a").get("phase") == "Stopped", "stopped")
    assert condition(status, "Ready")["reason"] == "MembersNotReady"


def test_a_killed_qemu_fails_and_stop_halts_its_vm(cluster: Cluster) -> None:
    cluster.patch_group({"correctiveAction": "stop"})
    guest(cluster, "vm-b").kill()

    failed = cluster.wait_heartbeat("vm-b", "failed", "node-b")
    assert failed["reason"] == "missed"
    cluster.wait_events("vm-b", "HeartbeatFailed")
    assert metric(cluster, "node-b", "vmha_channel_connected", vm="vm-b") == 0.0
    eventually(
        lambda: cluster.kubevirt.vm("vm-b")["spec"].get("runStrategy") == "Halted", "vm-b halted"
    )
    [event] = eventually(lambda: actions(cluster, "vm-b", "Stop"), "the action")
    assert "runStrategy Halted" in event["note"]
    assert (
        metric(cluster, "node-b", "vmha_corrective_actions_total", action="stop", outcome="taken")
        == 1.0
    )
    cluster.wait_group(lambda s: member(s, "vm-b").get("heartbeat") == "failed", "vm-b failed")
