"""Cluster benchmark driver: one node agent, N VMIs on its node, the real apiserver.

One real `vmha-node-agent` process for node `bench-node` against the test control plane
(etcd + kube-apiserver, `vmha_testbed.controlplane`). The guests are simulated, in another
process (`bench/heartbeat/simulator.py`: a unix socket per guest); each guest's socket is
linked into its virt-launcher Pod's `private` emptyDir under the agent's kubelet root as soon
as the Pod exists, where QEMU's socket would be. Measured:

- discovery: the driver creates N VMIs (Running on the node, members of a VMGroup with
  heartbeat on) and their launcher Pods, 4 at a time; the time from the first create to
  every session attached (`vmha_discovery_vmis{state="attached"}`) and to every guest
  registered, the agent's CPU and peak RSS meanwhile, and when every registration's Event
  and annotation has been written (all writes share the agent's `write_qps` budget);
- steady state: a window of W seconds after that: agent CPU and RSS, and API requests per
  minute as the agent counts them (`vmha_kube_requests_total`) and as the apiserver does
  (`apiserver_request_total` for VMIs, Pods, VMGroups and Events), next to the challenges
  sent meanwhile;
- hang → Event: healthy guests stall (keep reading, stop answering) at random phases, in
  batches, each guest once (so that each `HeartbeatFailed` is a new Event, not a series
  update); the latency is from the stall to the Event arriving on a watch of Events, and
  separately to the Event's own `eventTime` (the agent's detection).

    python -m bench.cluster [--vms 500] [--interval-ms 1000] [--window-s 60] [--stalls 100]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.heartbeat.__main__ import (
    Simulator,
    cpu_seconds,
    machine,
    percentile,
    rss_mib,
    simulator,
)
from vmha_node_agent.kubeapi import EVENTS, PODS, VMGROUPS, VMIS, KubeApi
from vmha_node_agent.watch import watch_events
from vmha_testbed.agentproc import AgentProcess
from vmha_testbed.cluster import admin_api
from vmha_testbed.controlplane import ControlPlane
from vmha_testbed.kubevirt import SOCKET_NAME, launcher_pod, private_dir
from vmha_testbed.promtext import Sample, parse_samples

NODE = "bench-node"
NAMESPACE = "bench"
GROUP = "bench"
MISSED_THRESHOLD = 3
CREATE_WORKERS = 4
POLL_S = 0.5
DISCOVERY_TIMEOUT_S = 600.0
OUR_RESOURCES = frozenset({"virtualmachineinstances", "pods", "vmgroups", "events"})
# The agent's production settings, except where the benchmark needs to see more.
AGENT_CONFIG: dict[str, Any] = {
    "heartbeat": {"min_interval_ms": 100, "missed_threshold": MISSED_THRESHOLD},
    "doctor": {"url": ""},
}

Samples = list[Sample]


@dataclass
class Discovery:
    vms: int
    create_s: float  # the driver's creates, first to last
    attached_s: float  # first create → every session attached
    registered_s: float  # first create → every guest registered (healthy)
    attached_after_last_create_s: float
    written_s: float  # first create → every registration's Event and annotation written
    cpu_s: float  # agent CPU, first create → every guest registered
    peak_rss_mib: float
    requests: dict[str, float]  # the agent's API requests meanwhile, by "verb resource"


@dataclass
class Steady:
    vms: int
    interval_ms: int
    window_s: float
    cpu_percent: float
    rss_mib: float
    challenges_per_min: float
    agent_requests_per_min: float
    apiserver_requests_per_min: float
    agent_requests: dict[str, float]  # in the window, by "verb resource code"
    apiserver_requests: dict[str, float]  # in the window, by "verb resource"


@dataclass
class Hangs:
    stalls: int
    visible_p50_ms: float
    visible_p99_ms: float
    detected_p50_ms: float
    detected_p99_ms: float
    bound_ms: float
    undetected: int
    false_faults: int


@dataclass
class Restart:
    vms: int
    ready_s: float  # agent started → its watches listed (/readyz)
    registered_s: float  # agent started → every guest registered again
    cpu_s: float  # the new process's CPU until then (interpreter start included)
    requests: dict[str, float]  # its API requests until `settle_s` later, by "verb resource"
    settle_s: float


@dataclass
class Result:
    machine: str
    discovery: Discovery
    steady: Steady
    hangs: Hangs
    restart: Restart


# --- metrics ---------------------------------------------------------------------------------


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for sample, found, value in samples
        if sample == name and all(found.get(k) == v for k, v in labels.items())
    )


def healthy_count(samples: Samples) -> int:
    return sum(
        1
        for name, labels, value in samples
        if name == "vmha_heartbeat_state" and labels.get("state") == "healthy" and value == 1
    )


def by_labels(samples: Samples, name: str, keys: tuple[str, ...]) -> dict[str, float]:
    counts: dict[str, float] = {}
    for sample, labels, value in samples:
        if sample == name:
            key = " ".join(labels.get(k, "") for k in keys)
            counts[key] = counts.get(key, 0.0) + value
    return counts


def delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    changes = {key: after[key] - before.get(key, 0.0) for key in after}
    return {key: round(value, 1) for key, value in sorted(changes.items()) if value}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# --- the cluster ------------------------------------------------------------------------------


class Cluster:
    """Plays KubeVirt for the benchmark: VMIs on the node, their launcher Pods, and each
    guest's socket where the agent looks for it."""

    def __init__(self, control_plane: ControlPlane, kubelet_root: Path, guests: Path) -> None:
        self.control_plane = control_plane
        self.kubelet_root = kubelet_root
        self.guests = guests
        self.api = admin_api(control_plane, timeout_s=60.0)

    def create_group(self) -> None:
        heartbeat = {"minIntervalMs": 100, "missedThreshold": MISSED_THRESHOLD,
                     "correctiveAction": "none"}  # fmt: skip
        body = {
            "apiVersion": "vmha.io/v1alpha1",
            "kind": "VMGroup",
            "metadata": {"name": GROUP},
            "spec": {"policy": "soft-anti-affinity", "heartbeat": heartbeat},
        }
        self.api.call("create", VMGROUPS, VMGROUPS.path(NAMESPACE), body=body)

    def create_vm(self, name: str) -> None:
        """A running VMI on the node, its launcher Pod, and the guest's socket in the Pod's
        emptyDir (a link to the simulator's socket)."""
        vmi = self.api.call(
            "create",
            VMIS,
            VMIS.path(NAMESPACE),
            body={
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstance",
                "metadata": {
                    "name": name,
                    "labels": {"vmha.io/group": GROUP},
                    # KubeVirt's own: a real VMI never lacks annotations (the agent's first
                    # write to a VMI without any needs two patches).
                    "annotations": {"kubevirt.io/latest-observed-api-version": "v1"},
                },
                "spec": {"domain": {"devices": {}}},
                # No status subresource on VMIs (as in KubeVirt): the status is stored as sent.
                "status": {"phase": "Running", "nodeName": NODE},
            },
        )
        body = launcher_pod(name, vmi["metadata"]["uid"], NODE)
        pod = self.api.call("create", PODS, PODS.path(NAMESPACE), body=body)
        directory = private_dir(self.kubelet_root, pod["metadata"]["uid"])
        directory.mkdir(parents=True)
        (directory / SOCKET_NAME).symlink_to(self.guests / f"{name}.sock")

    def create_all(self, names: list[str]) -> None:
        with concurrent.futures.ThreadPoolExecutor(CREATE_WORKERS) as pool:
            for future in [pool.submit(self.create_vm, name) for name in names]:
                future.result()

    def apiserver_requests(self) -> dict[str, float]:
        """apiserver_request_total for the resources the agent uses, by verb and resource."""
        text = self.control_plane.kubectl("get", "--raw", "/metrics").stdout
        samples = [s for s in parse_samples(text) if s[1].get("resource") in OUR_RESOURCES]
        return by_labels(samples, "apiserver_request_total", ("verb", "resource"))


class EventWatch:
    """A watch of the namespace's Events: when each (VMI, reason) was first seen here."""

    def __init__(self, api: KubeApi) -> None:
        self._api = api
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, str], tuple[float, dict[str, Any]]] = {}
        self._response: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        listed = self._api.call("list", EVENTS, EVENTS.path(NAMESPACE), query={"limit": "1"})
        version = listed["metadata"]["resourceVersion"]
        query = {"watch": "true", "resourceVersion": version, "timeoutSeconds": "3600"}
        self._response = self._api.open_watch(
            EVENTS, EVENTS.path(NAMESPACE), query, read_timeout_s=3700
        )
        self._thread.start()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._response.shutdown()
        self._thread.join(5)

    def first(self, vm: str, reason: str) -> tuple[float, dict[str, Any]] | None:
        with self._lock:
            return self._seen.get((vm, reason))

    def vms_with(self, reason: str) -> set[str]:
        with self._lock:
            return {vm for vm, seen_reason in self._seen if seen_reason == reason}

    def _run(self) -> None:
        with contextlib.suppress(Exception):  # ends when stopped
            for event in watch_events(self._response):
                obj = event.get("object") or {}
                if event.get("type") != "ADDED" or "regarding" not in obj:
                    continue
                key = (obj["regarding"]["name"], obj["reason"])
                with self._lock:
                    self._seen.setdefault(key, (time.time(), obj))


# --- the phases -------------------------------------------------------------------------------


async def agent_samples(agent: AgentProcess) -> Samples:
    return await asyncio.to_thread(agent.samples)


async def measure_discovery(cluster: Cluster, agent: AgentProcess, count: int) -> Discovery:
    names = [f"g{i}" for i in range(count)]
    before = by_labels(await agent_samples(agent), "vmha_kube_requests_total", ("verb", "resource"))
    cpu_before = cpu_seconds(agent.pid or 0)
    started = time.monotonic()
    creating = asyncio.create_task(asyncio.to_thread(cluster.create_all, names))
    created_at = attached_at = registered_at = 0.0
    cpu_registered = 0.0
    async with asyncio.timeout(DISCOVERY_TIMEOUT_S):
        while not registered_at:
            await asyncio.sleep(POLL_S)
            if creating.done() and not created_at:
                await creating  # raises what the creates raised
                created_at = time.monotonic()
            samples = await agent_samples(agent)
            now = time.monotonic()
            attached = total(samples, "vmha_discovery_vmis", state="attached")
            if attached >= count and not attached_at:
                attached_at = now
            if healthy_count(samples) >= count:
                registered_at, cpu_registered = now, cpu_seconds(agent.pid or 0)
        peak = peak_rss_mib(agent.pid or 0)
        await creating
        created_at = created_at or time.monotonic()
        while True:
            samples = await agent_samples(agent)
            written = total(samples, "vmha_kube_annotation_patches_total", result="patched")
            events = total(samples, "vmha_kube_events_total", result="created")
            if written >= count and events >= count:
                written_at = time.monotonic()
                break
            await asyncio.sleep(POLL_S)
    after = by_labels(samples, "vmha_kube_requests_total", ("verb", "resource"))
    return Discovery(
        vms=count,
        create_s=round(created_at - started, 1),
        attached_s=round(attached_at - started, 1),
        registered_s=round(registered_at - started, 1),
        attached_after_last_create_s=round(max(0.0, attached_at - created_at), 1),
        written_s=round(written_at - started, 1),
        cpu_s=round(cpu_registered - cpu_before, 2),
        peak_rss_mib=round(peak, 1),
        requests=delta(after, before),
    )


async def wait_quiet(agent: AgentProcess) -> None:
    """Until nothing waits to be written to the API."""
    async with asyncio.timeout(DISCOVERY_TIMEOUT_S):
        while True:
            samples = await agent_samples(agent)
            queued = total(samples, "vmha_kube_events_queue_length")
            pending = total(samples, "vmha_kube_annotations_pending")
            if queued == 0 and pending == 0:
                return
            await asyncio.sleep(POLL_S)


async def measure_steady(
    cluster: Cluster, agent: AgentProcess, count: int, interval_ms: int, window_s: float
) -> Steady:
    await wait_quiet(agent)
    await asyncio.sleep(max(5.0, 3 * interval_ms / 1000))
    keys = ("verb", "resource", "code")
    server_before = await asyncio.to_thread(cluster.apiserver_requests)
    server_started = sampled_before = time.monotonic()  # when the agent's counts are read
    samples = await agent_samples(agent)
    agent_before = by_labels(samples, "vmha_kube_requests_total", keys)
    challenges_before = total(samples, "vmha_heartbeat_challenges_total")
    cpu_before, started = cpu_seconds(agent.pid or 0), time.monotonic()
    await asyncio.sleep(window_s)  # nothing polls the agent meanwhile
    cpu_after, ended = cpu_seconds(agent.pid or 0), time.monotonic()
    sampled_after = time.monotonic()
    samples = await agent_samples(agent)
    server_after = await asyncio.to_thread(cluster.apiserver_requests)
    server_minutes = (time.monotonic() - server_started) / 60
    agent_requests = delta(by_labels(samples, "vmha_kube_requests_total", keys), agent_before)
    server_requests = delta(server_after, server_before)
    challenges = total(samples, "vmha_heartbeat_challenges_total") - challenges_before
    minutes = (sampled_after - sampled_before) / 60
    return Steady(
        vms=count,
        interval_ms=interval_ms,
        window_s=round(ended - started, 1),
        cpu_percent=round(100 * (cpu_after - cpu_before) / (ended - started), 1),
        rss_mib=round(rss_mib(agent.pid or 0), 1),
        challenges_per_min=round(challenges / minutes),
        agent_requests_per_min=round(sum(agent_requests.values()) / minutes, 2),
        apiserver_requests_per_min=round(sum(server_requests.values()) / server_minutes, 2),
        agent_requests=agent_requests,
        apiserver_requests=server_requests,
    )


async def measure_hangs(
    sim: Simulator, watch: EventWatch, count: int, interval_ms: int, *, stalls: int, batch: int
) -> Hangs:
    interval_s = interval_ms / 1000
    bound_s = interval_s * (MISSED_THRESHOLD + 1)
    chosen = random.sample([f"g{i}" for i in range(count)], min(stalls, count))
    visible: list[float] = []
    detected: list[float] = []
    undetected = 0
    for first in range(0, len(chosen), batch):
        names = chosen[first : first + batch]
        stalled: dict[str, float] = {}
        for name in names:  # spread over one interval: every phase of the challenge cycle
            await asyncio.sleep(random.uniform(0, interval_s / len(names)))
            stalled |= (await sim.call({"stall": [name]}))["stalled"]
        deadline = time.monotonic() + bound_s + 10
        while time.monotonic() < deadline and not all(
            watch.first(name, "HeartbeatFailed") for name in names
        ):
            await asyncio.sleep(0.05)
        for name, stalled_at in stalled.items():
            seen = watch.first(name, "HeartbeatFailed")
            if seen is None:
                undetected += 1
                continue
            arrived_at, event = seen
            visible.append((arrived_at - stalled_at) * 1000)
            detected.append((event_time(event) - stalled_at) * 1000)
        await sim.call({"resume": names})
        await asyncio.sleep(interval_s * 3)  # they recover before the next batch
    false_faults = len(watch.vms_with("HeartbeatFailed") - set(chosen))
    visible = visible or [float("nan")]
    detected = detected or [float("nan")]
    return Hangs(
        stalls=len(chosen),
        visible_p50_ms=round(percentile(visible, 0.5)),
        visible_p99_ms=round(percentile(visible, 0.99)),
        detected_p50_ms=round(percentile(detected, 0.5)),
        detected_p99_ms=round(percentile(detected, 0.99)),
        bound_ms=round(bound_s * 1000),
        undetected=undetected,
        false_faults=false_faults,
    )


async def measure_restart(agent: AgentProcess, count: int, settle_s: float) -> Restart:
    """Stop the agent and start it again with every VMI and socket in place: it lists, attaches
    every guest at once, and writes nothing (the VMIs already show them healthy here)."""
    await wait_quiet(agent)
    await asyncio.to_thread(agent.stop)
    started = time.monotonic()
    await asyncio.to_thread(agent.start)
    ready_at = time.monotonic()
    async with asyncio.timeout(DISCOVERY_TIMEOUT_S):
        while True:
            samples = await agent_samples(agent)
            if healthy_count(samples) >= count:
                registered_at, cpu = time.monotonic(), cpu_seconds(agent.pid or 0)
                break
            await asyncio.sleep(POLL_S)
    await asyncio.sleep(settle_s)  # any write the re-registrations would cause
    samples = await agent_samples(agent)
    return Restart(
        vms=count,
        ready_s=round(ready_at - started, 1),
        registered_s=round(registered_at - started, 1),
        cpu_s=round(cpu, 2),
        requests=delta(by_labels(samples, "vmha_kube_requests_total", ("verb", "resource")), {}),
        settle_s=settle_s,
    )


def event_time(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["eventTime"].replace("Z", "+00:00")).timestamp()


# --- the run ----------------------------------------------------------------------------------


async def run(args: argparse.Namespace, workdir: Path, control_plane: ControlPlane) -> Result:
    # Short: <root>/pods/<uid>/volumes/kubernetes.io~empty-dir/private/vmha fits in 107 bytes.
    kubelet_root = Path(tempfile.mkdtemp(prefix="vk", dir="/tmp"))
    try:
        control_plane.create_namespace(NAMESPACE)
        guests = workdir / "guests"
        guests.mkdir()
        cluster = Cluster(control_plane, kubelet_root, guests)
        cluster.create_group()
        progress(f"starting {args.vms} simulated guests")
        async with simulator(guests, args.vms, args.interval_ms) as sim:
            agent = AgentProcess(
                workdir / "agent.log",
                AGENT_CONFIG,
                node_name=NODE,
                kubeconfig=control_plane.kubeconfig_path,
                kubelet_root=kubelet_root,
                extra_args=("--log-level=warning",),
            )
            with agent:
                progress("discovery: creating the VMIs and their launcher Pods")
                discovery = await measure_discovery(cluster, agent, args.vms)
                progress(f"discovery: {json.dumps(asdict(discovery))}")
                progress(f"steady state: a {args.window_s:.0f} s window")
                steady = await measure_steady(
                    cluster, agent, args.vms, args.interval_ms, args.window_s
                )
                progress(f"steady state: {json.dumps(asdict(steady))}")
                progress(f"hang → Event: {args.stalls} stalls")
                watch = EventWatch(cluster.api)
                watch.start()
                try:
                    hangs = await measure_hangs(
                        sim, watch, args.vms, args.interval_ms, stalls=args.stalls, batch=args.batch
                    )
                finally:
                    watch.stop()
                progress(f"hang → Event: {json.dumps(asdict(hangs))}")
                progress("agent restart")
                restart = await measure_restart(agent, args.vms, settle_s=10.0)
                progress(f"agent restart: {json.dumps(asdict(restart))}")
        cluster.api.close()
    finally:
        shutil.rmtree(kubelet_root, ignore_errors=True)
    return Result(machine(), discovery, steady, hangs, restart)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def report(result: Result) -> str:
    d, s, h, r = result.discovery, result.steady, result.hangs, result.restart
    agent_requests = ", ".join(f"{k}: {v:g}" for k, v in s.agent_requests.items()) or "none"
    server_requests = ", ".join(f"{k}: {v:g}" for k, v in s.apiserver_requests.items()) or "none"
    return "\n".join(
        [
            f"Machine: {result.machine}",
            "",
            "| VMIs | creates (s) | → all attached (s) | → all registered (s) "
            "| last create → all attached (s) | agent CPU (s) | peak RSS (MiB) "
            "| → all Events and annotations written (s) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {d.vms} | {d.create_s} | {d.attached_s} | {d.registered_s} "
            f"| {d.attached_after_last_create_s} | {d.cpu_s} | {d.peak_rss_mib} | {d.written_s} |",
            "",
            "| VMIs | interval | challenges/min | agent API requests/min "
            "| apiserver requests/min (VMIs, Pods, VMGroups, Events) | agent CPU (% of one core) "
            "| RSS (MiB) |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| {s.vms} | {s.interval_ms} ms | {s.challenges_per_min:g} "
            f"| {s.agent_requests_per_min:g} | {s.apiserver_requests_per_min:g} "
            f"| {s.cpu_percent} | {s.rss_mib} |",
            "",
            f"Requests in the {s.window_s:g} s window — agent: {agent_requests}; "
            f"apiserver: {server_requests}.",
            "",
            "| stalls | hang → Event visible p50 / p99 (ms) | hang → eventTime p50 / p99 (ms) "
            "| bound (ms) | undetected | false faults |",
            "|---:|---:|---:|---:|---:|---:|",
            f"| {h.stalls} | {h.visible_p50_ms} / {h.visible_p99_ms} "
            f"| {h.detected_p50_ms} / {h.detected_p99_ms} | {h.bound_ms} | {h.undetected} "
            f"| {h.false_faults} |",
            "",
            "Discovery: the agent's requests meanwhile: "
            + ", ".join(f"{k}: {v:g}" for k, v in d.requests.items()),
            "",
            "| VMIs | restart → ready (s) | → all registered again (s) | new agent's CPU (s) "
            f"| its API requests (until {r.settle_s:g} s later) |",
            "|---:|---:|---:|---:|---|",
            f"| {r.vms} | {r.ready_s} | {r.registered_s} | {r.cpu_s} "
            f"| {', '.join(f'{k}: {v:g}' for k, v in r.requests.items())} |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=500)
    parser.add_argument("--interval-ms", type=int, default=1000)
    parser.add_argument("--window-s", type=float, default=60.0)
    parser.add_argument("--stalls", type=int, default=100, help="hangs timed, each guest once")
    parser.add_argument("--batch", type=int, default=10, help="guests stalled together")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="vmha-bench-cluster-") as tmp,
        ControlPlane() as control_plane,
    ):
        result = asyncio.run(run(args, Path(tmp), control_plane))
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
