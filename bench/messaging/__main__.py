"""Server group messaging benchmark driver: two node agents, the real apiserver.

Two real `vmha-node-agent` processes, `node-a` and `node-b`, against the test control plane
(etcd + kube-apiserver), set up as the Helm chart would (`vmha_testbed.cluster`): the
agents' ServiceAccount with exactly its RBAC, Leases, mutual TLS between the agents and
pod-bound tokens checked by TokenReview. The guests are simulated (`vmha_testbed.simguest`,
in this process), each listening on its VMI's channel socket in its launcher Pod's emptyDir,
where its node's agent finds it; every message a guest receives is timed as it arrives
(same clock as the sender's). Measured, in order:

- broadcast latency, guest to guest: in a group of three, a guest on node-a broadcasts
  `--messages` messages at `--rate` per second; the time from its write to each copy's
  arrival at the member on node-b (guest → agent A → HTTPS → agent B → guest) and at the
  member on node-a (guest → agent A → guest);
- fan-out: a group of `--members` members, half on each node; a member on node-a broadcasts
  `--fanouts` times, one at a time; the time until every other member has its copy, each
  copy's latency by path, and the agents' CPU per broadcast;
- VMI change → notification: `--vmis` VMIs in the cluster, watched by both agents (members
  of groups of ten, on eight other nodes), plus a group of three: an observer on node-a, one
  on node-b, and a subject on a third node. The subject is paused and unpaused `--changes`
  times (its VMI's `Paused` condition, as virt-handler sets it); the latency is from the
  PATCH request to the notification's arrival at each observer (including the agents'
  `notification_delay_s` of 50 ms, which merges a member's changes).

The agents run with their production settings except the per-VM limits on what a guest may
send (`messaging.broadcasts_per_second`, `guest_limits.frames_per_second`), raised so that
one guest can drive the benchmark.

    python -m bench.messaging [--messages 1000] [--rate 50] [--members 100] [--fanouts 50]
                              [--vmis 5000] [--changes 100] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench.heartbeat.__main__ import cpu_seconds, machine, percentile, rss_mib
from vmha_node_agent.kubeapi import VMIS
from vmha_protocol import HostMessage
from vmha_protocol.server_group import HostBroadcast, Notification
from vmha_testbed.cluster import FAST_AGENT_CONFIG, LocalCluster, local_cluster
from vmha_testbed.controlplane import ControlPlane
from vmha_testbed.kubevirt import ready_conditions
from vmha_testbed.simguest import SimulatedGuest, acked

CREATE_WORKERS = 8
SETTLE_TIMEOUT_S = 300.0
COPY_TIMEOUT_S = 10.0
WARM_UP = 20
OTHER_NODES = tuple(f"node-{letter}" for letter in "cdefghij")
AGENT_CONFIG: dict[str, Any] = {
    **FAST_AGENT_CONFIG,
    "heartbeat": {"min_interval_ms": 100},
    "guest_limits": {"frames_per_second": 1000, "frame_burst": 2000},
    "messaging": {
        **FAST_AGENT_CONFIG["messaging"],
        "broadcasts_per_second": 1000,
        "broadcast_burst": 2000,
    },
}


@dataclass
class Latency:
    path: str
    copies: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    lost: int


@dataclass
class FanOut:
    members: int
    broadcasts: int
    all_p50_ms: float  # until every other member has its copy
    all_p99_ms: float
    copies: list[Latency]
    agent_cpu_ms_per_broadcast: dict[str, float]


@dataclass
class Notifications:
    vmis: int
    create_s: float  # the driver's creates, first to last
    watched_s: float  # creates done → both agents have seen every VMI
    agent_rss_mib: dict[str, float]
    changes: int
    latencies: list[Latency]


@dataclass
class Result:
    machine: str
    pair: list[Latency]
    fanout: FanOut
    notifications: Notifications


def summary(path: str, latencies_s: list[float], expected: int) -> Latency:
    values = [s * 1000 for s in latencies_s] or [float("nan")]
    return Latency(
        path=path,
        copies=len(latencies_s),
        p50_ms=round(percentile(values, 0.5), 2),
        p99_ms=round(percentile(values, 0.99), 2),
        max_ms=round(max(values), 2),
        lost=expected - len(latencies_s),
    )


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- guests -------------------------------------------------------------------------------------


class Guests:
    """The simulated guests of this run; when each broadcast copy and notification arrived."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.guests: dict[str, SimulatedGuest] = {}
        self.copies: dict[tuple[str, str], float] = {}  # (guest, data) → arrival
        self.notices: dict[str, list[tuple[float, str, str]]] = defaultdict(list)
        self.changed = asyncio.Event()

    async def start(self, group: str, placement: dict[str, str]) -> None:
        """VMs, VMIs and launcher Pods for `placement` (name → node), a guest for each on a
        node with an agent, and wait until they are registered."""
        kubevirt = self.cluster.kubevirt

        def create(name: str, node: str) -> None:
            kubevirt.create_vm(name, group)
            kubevirt.start_vmi(name, node)

        await in_threads(lambda item: create(*item), placement.items())
        for name, node in placement.items():
            if node in self.cluster.agents:
                await self._start_guest(name)
        async with asyncio.timeout(SETTLE_TIMEOUT_S):
            for name, node in placement.items():
                if node in self.cluster.agents:
                    guest = self.guests[name]
                    await guest.wait_for(lambda g: g.connected and acked(g), SETTLE_TIMEOUT_S)

    async def _start_guest(self, name: str) -> None:
        member = self.cluster.kubevirt.members[name]
        guest = SimulatedGuest(member.socket, name=name, interval_ms=1000)
        guest.on_message = partial(self._arrived, name)
        await guest.start()
        self.guests[name] = guest

    def _arrived(self, name: str, message: HostMessage) -> None:
        now = time.perf_counter()
        if isinstance(message, HostBroadcast):
            self.copies[(name, message.data)] = now
        elif isinstance(message, Notification):
            member = message.data
            self.notices[name].append((now, member.display_name, member.state))
        else:
            return
        self.changed.set()

    def have(self, receivers: Iterable[str], data: str) -> bool:
        """Whether every one of `receivers` has its copy of broadcast `data`."""
        return all((receiver, data) in self.copies for receiver in receivers)

    async def until(self, done: Callable[[], bool], timeout: float) -> bool:
        """Wait (at most `timeout`) until `done()`; whether it came true."""
        deadline = time.perf_counter() + timeout
        while not done():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return False
            self.changed.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self.changed.wait()
            except TimeoutError:
                return done()
        return True

    async def close(self) -> None:
        for guest in self.guests.values():
            await guest.close()
        await asyncio.sleep(0.5)  # their connection handlers see the end


async def in_threads(work: Callable[[Any], None], items: Iterable[Any]) -> None:
    """`work(item)` for every item, CREATE_WORKERS at a time (API requests)."""
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(CREATE_WORKERS) as pool:
        await asyncio.gather(*(loop.run_in_executor(pool, work, item) for item in items))


# --- the measurements ---------------------------------------------------------------------------


async def measure_pair(guests: Guests, messages: int, rate: float) -> list[Latency]:
    await guests.start("pair", {"sender": "node-a", "near": "node-a", "far": "node-b"})
    sender = guests.guests["sender"]
    await warm_up(guests, sender, ("near", "far"))
    sent: dict[str, float] = {}
    started = time.perf_counter()
    for i in range(messages):
        await asyncio.sleep(max(0.0, started + i / rate - time.perf_counter()))
        data = f"pair {i}"
        sent[data] = time.perf_counter()
        sender.send_broadcast(data)
    await guests.until(
        lambda: all(guests.have(("near", "far"), data) for data in sent), COPY_TIMEOUT_S
    )
    return [
        summary(f"{receiver} ({path})", arrival_times(guests, receiver, sent), messages)
        for receiver, path in (("far", "node-a → node-b"), ("near", "node-a → node-a"))
    ]


def arrival_times(guests: Guests, receiver: str, sent: dict[str, float]) -> list[float]:
    """Seconds from each send to its copy's arrival at `receiver` (copies that came)."""
    return [
        guests.copies[(receiver, data)] - at
        for data, at in sent.items()
        if (receiver, data) in guests.copies
    ]


async def warm_up(guests: Guests, sender: SimulatedGuest, receivers: Iterable[str]) -> None:
    """Broadcasts that are not measured: the first copy for another node opens the agents'
    HTTPS connection and has the receiver review the sender's token (cached afterwards)."""
    for i in range(WARM_UP):
        data = f"warm-up {sender.name} {i}"
        sender.send_broadcast(data)
        await guests.until(partial(guests.have, list(receivers), data), COPY_TIMEOUT_S)


async def measure_fanout(guests: Guests, members: int, broadcasts: int) -> FanOut:
    placement = {f"m{i}": "node-a" if i < members // 2 else "node-b" for i in range(members)}
    await guests.start("fan", placement)
    sender = guests.guests["m0"]
    receivers = [name for name in placement if name != "m0"]
    await warm_up(guests, sender, receivers)
    agents = guests.cluster.agents
    cpu_before = {node: cpu_seconds(agent.pid or 0) for node, agent in agents.items()}
    everyone: list[float] = []
    per_path: dict[str, list[float]] = defaultdict(list)
    for i in range(broadcasts):
        data = f"fan {i}"
        t0 = time.perf_counter()
        sender.send_broadcast(data)
        await guests.until(partial(guests.have, receivers, data), COPY_TIMEOUT_S)
        arrivals = {r: guests.copies[(r, data)] for r in receivers if (r, data) in guests.copies}
        if len(arrivals) == len(receivers):
            everyone.append(max(arrivals.values()) - t0)
        for receiver, arrived in arrivals.items():
            path = "node-a → node-a" if placement[receiver] == "node-a" else "node-a → node-b"
            per_path[path].append(arrived - t0)
        await asyncio.sleep(0.2)
    cpu = {
        node: round(1000 * (cpu_seconds(agent.pid or 0) - cpu_before[node]) / broadcasts, 2)
        for node, agent in agents.items()
    }
    local = sum(1 for r in receivers if placement[r] == "node-a")
    values = [s * 1000 for s in everyone] or [float("nan")]
    return FanOut(
        members=members,
        broadcasts=broadcasts,
        all_p50_ms=round(percentile(values, 0.5), 2),
        all_p99_ms=round(percentile(values, 0.99), 2),
        copies=[
            summary(path, per_path[path], broadcasts * count)
            for path, count in (
                ("node-a → node-b", len(receivers) - local),
                ("node-a → node-a", local),
            )
        ],
        agent_cpu_ms_per_broadcast=cpu,
    )


def background_vmi(index: int) -> dict[str, Any]:
    """A running VMI on another node, a member of a group of ten (no guest: not on a node
    with an agent)."""
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "name": f"bg-{index}",
            "labels": {"vmha.io/group": f"bg-{index // 10}"},
            "annotations": {"kubevirt.io/latest-observed-api-version": "v1"},
        },
        "spec": {"domain": {"devices": {}}},
        # No status subresource on VMIs (as in KubeVirt): the status is stored as sent.
        "status": {
            "phase": "Running",
            "nodeName": OTHER_NODES[index % len(OTHER_NODES)],
            "conditions": ready_conditions(),
        },
    }


async def populate(cluster: LocalCluster, count: int) -> tuple[float, float]:
    """Create `count` VMIs in groups of ten: how long the creates took, and then how long
    until both agents had seen them all (seconds)."""
    kubevirt, api = cluster.kubevirt, cluster.api
    await in_threads(lambda g: kubevirt.create_group(f"bg-{g}"), range((count + 9) // 10))
    seen_before = {node: watch_events(cluster, node) for node in cluster.agents}
    started = time.monotonic()
    await in_threads(
        lambda i: api.call("create", VMIS, VMIS.path(cluster.namespace), body=background_vmi(i)),
        range(count),
    )
    created = time.monotonic()
    async with asyncio.timeout(SETTLE_TIMEOUT_S):
        for node in cluster.agents:
            while await asyncio.to_thread(watch_events, cluster, node) < seen_before[node] + count:
                await asyncio.sleep(0.2)
    return created - started, time.monotonic() - created


def watch_events(cluster: LocalCluster, node: str) -> float:
    return cluster.metric(node, "vmha_kube_watch_events_total", resource="virtualmachineinstances")


async def measure_notifications(guests: Guests, vmis: int, changes: int) -> Notifications:
    cluster = guests.cluster
    progress(f"notifications: creating {vmis} VMIs in groups of ten on {len(OTHER_NODES)} nodes")
    create_s, watched_s = await populate(cluster, vmis)
    await guests.start(
        "watched", {"observer-a": "node-a", "observer-b": "node-b", "subject": "node-c"}
    )
    await asyncio.sleep(2.0)  # the subject's arrival is news too: let it pass
    latencies: dict[str, list[float]] = defaultdict(list)
    observers = ("observer-a", "observer-b")
    for i in range(changes):
        paused = i % 2 == 0
        state = "paused" if paused else "active"
        marks = {name: len(guests.notices[name]) for name in observers}
        t0 = time.perf_counter()
        await asyncio.to_thread(cluster.kubevirt.set_paused, "subject", paused)

        def told(name: str, marks: dict[str, int] = marks, s: str = state) -> float | None:
            news = guests.notices[name][marks[name] :]
            return next((at for at, who, what in news if who == "subject" and what == s), None)

        await guests.until(lambda: all(told(n) for n in observers), COPY_TIMEOUT_S)
        for name in observers:
            arrived = told(name)
            if arrived is not None:
                latencies[name].append(arrived - t0)
        await asyncio.sleep(0.3)  # past the agents' notification_delay_s
    return Notifications(
        vmis=vmis,
        create_s=round(create_s, 1),
        watched_s=round(watched_s, 1),
        agent_rss_mib={n: round(rss_mib(a.pid or 0), 1) for n, a in cluster.agents.items()},
        changes=changes,
        latencies=[
            summary(f"subject → guest on {node}", latencies[name], changes)
            for name, node in (("observer-a", "node-a"), ("observer-b", "node-b"))
        ],
    )


# --- the run --------------------------------------------------------------------------------


async def measure(cluster: LocalCluster, args: argparse.Namespace) -> Result:
    guests = Guests(cluster)
    try:
        progress(f"pair: {args.messages} broadcasts at {args.rate:g}/s")
        pair = await measure_pair(guests, args.messages, args.rate)
        progress(f"pair: {json.dumps([asdict(p) for p in pair])}")
        progress(f"fan-out: {args.members} members, {args.fanouts} broadcasts")
        fanout = await measure_fanout(guests, args.members, args.fanouts)
        progress(f"fan-out: {json.dumps(asdict(fanout))}")
        notifications = await measure_notifications(guests, args.vmis, args.changes)
        progress(f"notifications: {json.dumps(asdict(notifications))}")
    finally:
        await guests.close()
    return Result(machine(), pair, fanout, notifications)


def latency_rows(rows: list[Latency]) -> list[str]:
    return [
        f"| {r.path} | {r.copies} | {r.p50_ms} | {r.p99_ms} | {r.max_ms} | {r.lost} |" for r in rows
    ]


def report(result: Result, args: argparse.Namespace) -> str:
    f, n = result.fanout, result.notifications
    cpu = ", ".join(f"{node} {ms:g} ms" for node, ms in f.agent_cpu_ms_per_broadcast.items())
    rss = ", ".join(f"{node} {mib:g} MiB" for node, mib in n.agent_rss_mib.items())
    header = "| path | copies | p50 (ms) | p99 (ms) | max (ms) | lost |"
    return "\n".join(
        [
            f"Machine: {result.machine}",
            "",
            f"Broadcast, guest to guest ({args.messages} at {args.rate:g}/s):",
            "",
            header,
            "|---|---:|---:|---:|---:|---:|",
            *latency_rows(result.pair),
            "",
            f"Fan-out to {f.members - 1} members ({f.broadcasts} broadcasts): every copy "
            f"delivered p50 {f.all_p50_ms} ms, p99 {f.all_p99_ms} ms; agent CPU per "
            f"broadcast (its share of the guests' heartbeats included): {cpu}.",
            "",
            header,
            "|---|---:|---:|---:|---:|---:|",
            *latency_rows(f.copies),
            "",
            f"VMI change → notification with {n.vmis} more VMIs watched (created in "
            f"{n.create_s} s; both agents had seen them all {n.watched_s} s after the last "
            f"create; agent RSS then: {rss}), {n.changes} changes:",
            "",
            header,
            "|---|---:|---:|---:|---:|---:|",
            *latency_rows(n.latencies),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=50.0, help="broadcasts per second")
    parser.add_argument("--members", type=int, default=100)
    parser.add_argument("--fanouts", type=int, default=50)
    parser.add_argument("--vmis", type=int, default=5000)
    parser.add_argument("--changes", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory(prefix="vmha-bench-messaging-") as tmp,
        ControlPlane() as control_plane,
        local_cluster(
            control_plane,
            workdir=Path(tmp),
            agent_config=AGENT_CONFIG,
            with_operator=False,
            namespace_prefix="bench-",
        ) as cluster,
    ):
        result = asyncio.run(measure(cluster, args))
    print(report(result, args))
    if args.json:
        args.json.write_text(json.dumps(asdict(result), indent=2))


if __name__ == "__main__":
    main()
