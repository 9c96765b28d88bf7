"""Heartbeat benchmark driver.

For each guest count N and interval: start N simulated guests (another process, real unix
sockets), start the real `vmha-node-agent` process against them with a local Doctor
inspector, and measure the agent's CPU and RSS in steady state, the challenge round-trip
time (from the agent's own histogram), and the detection latency of stalled guests (stall
time in the simulator → fault report time at the inspector).

    python -m bench.heartbeat [--counts 10,100,500] [--intervals-ms 100,1000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from vmha_testbed.agentproc import AgentProcess
from vmha_testbed.inspector import InspectorServer
from vmha_testbed.promtext import Sample

MISSED_THRESHOLD = 3
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Result:
    guests: int
    interval_ms: int
    cpu_percent: float
    rss_mib: float
    rtt_p50_ms: float
    rtt_p99_ms: float
    detection_p50_ms: float
    detection_p99_ms: float
    detection_samples: int
    undetected: int
    false_faults: int
    detection_bound_ms: float


class Simulator:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    async def call(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.process.stdin and self.process.stdout
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        await self.process.stdin.drain()
        return dict(json.loads(await self.process.stdout.readline()))


@contextlib.asynccontextmanager
async def simulator(directory: Path, count: int, interval_ms: int) -> AsyncIterator[Simulator]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.heartbeat.simulator", "--dir", str(directory),
        "--count", str(count), "--interval-ms", str(interval_ms),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    sim = Simulator(process)
    try:
        assert process.stdout is not None
        ready = json.loads(await asyncio.wait_for(process.stdout.readline(), 60))
        assert ready == {"ready": True}, ready
        yield sim
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sim.call({"quit": True}), 5)
        if process.returncode is None:
            process.kill()
        await process.wait()


def agent_config(directory: Path, count: int, inspector_url: str) -> dict[str, Any]:
    return {
        "node_name": "bench",
        "heartbeat": {"min_interval_ms": 50, "missed_threshold": MISSED_THRESHOLD},
        "doctor": {"url": inspector_url, "retry_initial_s": 0.1, "queue_size": 10000},
        "vms": [
            {"name": f"g{i}", "namespace": "bench", "socket": str(directory / f"g{i}.sock")}
            for i in range(count)
        ],
    }


async def wait_registered(agent: AgentProcess, count: int, timeout: float = 120) -> None:
    async with asyncio.timeout(timeout):
        while True:
            healthy = sum(
                1
                for name, labels, value in await asyncio.to_thread(agent.samples)
                if name == "vmha_heartbeat_state" and labels.get("state") == "healthy" and value
            )
            if healthy == count:
                return
            await asyncio.sleep(0.5)


def rtt_buckets(samples: list[Sample]) -> dict[float, float]:
    """Cumulative RTT bucket counts summed over every VM."""
    buckets: dict[float, float] = {}
    for name, labels, value in samples:
        if name == "vmha_heartbeat_rtt_seconds_bucket":
            bound = float(labels["le"])  # "+Inf" parses as inf
            buckets[bound] = buckets.get(bound, 0.0) + value
    return buckets


def bucket_quantile(q: float, cumulative: dict[float, float]) -> float:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket."""
    bounds = sorted(cumulative)
    total = cumulative[bounds[-1]]
    if total == 0:
        return math.nan
    rank, lower, below = q * total, 0.0, 0.0
    for bound in bounds:
        count = cumulative[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = bound, count
    return lower


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


@dataclass
class Detection:
    latencies_ms: list[float]
    undetected: int  # stalled guests whose fault was not reported within the bound + 5 s
    false_faults: int  # faults reported for guests that were not stalled


def last_status(inspector: InspectorServer) -> dict[str, str]:
    status: dict[str, str] = {}
    for event in inspector.events:
        status[event["details"]["vm"]] = event["details"]["status"]
    return status


async def measure_detection(
    sim: Simulator, inspector: InspectorServer, count: int, interval_ms: int, target: int
) -> Detection:
    """Stall healthy guests at random phases, a batch per round, and time their fault reports."""
    result = Detection([], 0, 0)
    per_round = max(1, min(count // 5, target))
    bound_s = interval_ms / 1000 * (MISSED_THRESHOLD + 1) + 5
    stalled_ever: set[str] = set()
    while len(result.latencies_ms) + result.undetected < target:
        down = {vm for vm, status in last_status(inspector).items() if status == "down"}
        candidates = [f"g{i}" for i in range(count) if f"g{i}" not in down]
        chosen = random.sample(candidates, min(per_round, len(candidates)))
        seen = len(inspector.events)
        stalled: dict[str, float] = {}
        for name in chosen:  # spread over one interval: every phase of the challenge cycle
            await asyncio.sleep(random.uniform(0, interval_ms / 1000 / per_round))
            stalled |= (await sim.call({"stall": [name]}))["stalled"]
        stalled_ever |= stalled.keys()
        reports: dict[str, dict[str, Any]] = {}
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(bound_s):
                while len(reports) < len(stalled):
                    for event in inspector.events[seen:]:
                        vm = event["details"]["vm"]
                        if vm in stalled and event["details"]["status"] == "down":
                            reports.setdefault(vm, event)
                    await asyncio.sleep(0.05)
        for name, event in reports.items():
            fault_time = datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()
            result.latencies_ms.append((fault_time - stalled[name]) * 1000)
        result.undetected += len(stalled) - len(reports)
        await sim.call({"resume": chosen})
        await asyncio.sleep(interval_ms / 1000 * 3)  # let them recover before the next round
    result.false_faults = sum(
        1
        for event in inspector.events
        if event["details"]["status"] == "down" and event["details"]["vm"] not in stalled_ever
    )
    return result


async def run_case(count: int, interval_ms: int, window_s: float, samples: int) -> Result:
    inspector = InspectorServer()
    await inspector.start()
    try:
        with tempfile.TemporaryDirectory(prefix="vmha-bench-") as tmp:
            directory = Path(tmp)
            agent = AgentProcess(
                directory / "agent" / "agent.log",
                agent_config(directory, count, inspector.url),
                extra_args=("--log-level", "error"),
            )
            async with simulator(directory, count, interval_ms) as sim:
                await asyncio.to_thread(agent.start)
                pid = agent.pid or 0
                try:
                    await wait_registered(agent, count)
                    await asyncio.sleep(max(2.0, 3 * interval_ms / 1000))  # warm-up
                    before_rtt = rtt_buckets(await asyncio.to_thread(agent.samples))
                    cpu_before, t_before = cpu_seconds(pid), time.monotonic()
                    await asyncio.sleep(window_s)
                    cpu_after, t_after = cpu_seconds(pid), time.monotonic()
                    after_rtt = rtt_buckets(await asyncio.to_thread(agent.samples))
                    memory = rss_mib(pid)
                    window_rtt = {b: after_rtt[b] - before_rtt.get(b, 0) for b in after_rtt}
                    detection = await measure_detection(sim, inspector, count, interval_ms, samples)
                finally:
                    await asyncio.to_thread(agent.stop)
    finally:
        await inspector.stop()
    latencies = detection.latencies_ms or [math.nan]
    return Result(
        guests=count,
        interval_ms=interval_ms,
        cpu_percent=round(100 * (cpu_after - cpu_before) / (t_after - t_before), 1),
        rss_mib=round(memory, 1),
        rtt_p50_ms=round(1000 * bucket_quantile(0.5, window_rtt), 2),
        rtt_p99_ms=round(1000 * bucket_quantile(0.99, window_rtt), 2),
        detection_p50_ms=round(percentile(latencies, 0.5)),
        detection_p99_ms=round(percentile(latencies, 0.99)),
        detection_samples=len(detection.latencies_ms),
        undetected=detection.undetected,
        false_faults=detection.false_faults,
        detection_bound_ms=interval_ms * (MISSED_THRESHOLD + 1) + 50,
    )


def machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    return (
        f"{model}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def table(results: list[Result]) -> str:
    rows = [
        "| guests | interval | agent CPU (% of one core) | RSS (MiB) | RTT p50 / p99 (ms) "
        "| detection p50 / p99 (ms) | bound (ms) | undetected | false faults |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.guests} | {r.interval_ms} ms | {r.cpu_percent} | {r.rss_mib} "
            f"| {r.rtt_p50_ms} / {r.rtt_p99_ms} | {r.detection_p50_ms} / {r.detection_p99_ms} "
            f"(n={r.detection_samples}) | {r.detection_bound_ms:.0f} | {r.undetected} "
            f"| {r.false_faults} |"
        )
    return "\n".join(rows)


async def main_async(args: argparse.Namespace) -> None:
    results = []
    for interval_ms in args.intervals_ms:
        for count in args.counts:
            print(f"running {count} guests at {interval_ms} ms …", file=sys.stderr, flush=True)
            result = await run_case(count, interval_ms, args.window_s, args.samples)
            print(json.dumps(asdict(result)), file=sys.stderr, flush=True)
            results.append(result)
    print(f"Machine: {machine()}\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=lambda s: [int(x) for x in s.split(",")],
                        default=[10, 100, 500])  # fmt: skip
    parser.add_argument("--intervals-ms", type=lambda s: [int(x) for x in s.split(",")],
                        default=[100, 1000])  # fmt: skip
    parser.add_argument("--window-s", type=float, default=20.0)
    parser.add_argument("--samples", type=int, default=40, help="stalls timed per case")
    parser.add_argument("--json", type=Path)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
