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
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from vmha_testbed.inspector import InspectorServer

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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def agent(
    directory: Path, count: int, inspector_url: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    port = free_port()
    config = {
        "node_name": "bench",
        "heartbeat": {"min_interval_ms": 50, "missed_threshold": MISSED_THRESHOLD},
        "metrics": {"address": "127.0.0.1", "port": port},
        "doctor": {"url": inspector_url, "retry_initial_s": 0.1},
        # The simulated guests are well-behaved; lift the per-guest input budget out of the way.
        "vms": [
            {"name": f"g{i}", "namespace": "bench", "socket": str(directory / f"g{i}.sock")}
            for i in range(count)
        ],
    }
    path = directory / "agent.yaml"
    path.write_text(yaml.safe_dump(config))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vmha_node_agent", "--config", str(path), "--log-level", "error"
    )
    try:
        yield process, port
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), 10)
        except TimeoutError:
            process.kill()
            await process.wait()


async def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{port}/metrics") as r:
        text = await r.text()
    samples = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, rest = head.partition("{")
        labels = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if "=" in part)
        samples.append((name, {k: v.strip('"') for k, v in labels.items()}, float(value)))
    return samples


async def wait_registered(port: int, count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            healthy = sum(
                1
                for name, labels, value in await scrape(port)
                if name == "vmha_heartbeat_state" and labels["state"] == "healthy" and value
            )
            if healthy == count:
                return
        await asyncio.sleep(0.5)
    raise TimeoutError(f"not all {count} guests registered")


def rtt_buckets(samples: list[tuple[str, dict[str, str], float]]) -> dict[float, float]:
    """Cumulative RTT bucket counts summed over every VM."""
    buckets: dict[float, float] = {}
    for name, labels, value in samples:
        if name == "vmha_heartbeat_rtt_seconds_bucket":
            bound = math.inf if labels["le"] == "+Inf" else float(labels["le"])
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


async def measure_detection(
    sim: Simulator, inspector: InspectorServer, count: int, interval_ms: int, target: int
) -> list[float]:
    """Stall guests at random phases, one batch per round, and time their fault reports."""
    latencies: list[float] = []
    per_round = max(1, min(count // 5, target))
    names = [f"g{i}" for i in range(count)]
    while len(latencies) < target:
        chosen = random.sample(names, per_round)
        stalled: dict[str, float] = {}
        for name in chosen:  # spread over one interval: every phase of the challenge cycle
            await asyncio.sleep(random.uniform(0, interval_ms / 1000 / per_round))
            stalled |= (await sim.call({"stall": [name]}))["stalled"]
        seen = len(inspector.events)
        bound_s = interval_ms / 1000 * (MISSED_THRESHOLD + 2) + 5
        async with asyncio.timeout(bound_s + 10):
            while True:
                downs = {
                    e["details"]["vm"]: e
                    for e in inspector.events[seen:]
                    if e["details"]["status"] == "down" and e["details"]["vm"] in stalled
                }
                if len(downs) == len(stalled):
                    break
                await asyncio.sleep(0.05)
        for name, event in downs.items():
            fault_time = datetime.fromisoformat(event["time"].replace("Z", "+00:00")).timestamp()
            latencies.append((fault_time - stalled[name]) * 1000)
        await sim.call({"resume": chosen})
        await asyncio.sleep(interval_ms / 1000 * 3)  # let them recover before the next round
    return latencies


async def run_case(count: int, interval_ms: int, window_s: float, samples: int) -> Result:
    inspector = InspectorServer()
    await inspector.start()
    try:
        with tempfile.TemporaryDirectory(prefix="vmha-bench-") as tmp:
            directory = Path(tmp)
            async with (
                simulator(directory, count, interval_ms) as sim,
                agent(directory, count, inspector.url) as (process, port),
            ):
                await wait_registered(port, count)
                await asyncio.sleep(max(2.0, 3 * interval_ms / 1000))  # warm-up
                before_rtt = rtt_buckets(await scrape(port))
                cpu_before, t_before = cpu_seconds(process.pid), time.monotonic()
                await asyncio.sleep(window_s)
                cpu_after, t_after = cpu_seconds(process.pid), time.monotonic()
                after_rtt = rtt_buckets(await scrape(port))
                memory = rss_mib(process.pid)
                window_rtt = {b: after_rtt[b] - before_rtt.get(b, 0) for b in after_rtt}
                latencies = await measure_detection(sim, inspector, count, interval_ms, samples)
    finally:
        await inspector.stop()
    return Result(
        guests=count,
        interval_ms=interval_ms,
        cpu_percent=round(100 * (cpu_after - cpu_before) / (t_after - t_before), 1),
        rss_mib=round(memory, 1),
        rtt_p50_ms=round(1000 * bucket_quantile(0.5, window_rtt), 2),
        rtt_p99_ms=round(1000 * bucket_quantile(0.99, window_rtt), 2),
        detection_p50_ms=round(percentile(latencies, 0.5)),
        detection_p99_ms=round(percentile(latencies, 0.99)),
        detection_samples=len(latencies),
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
        "| detection p50 / p99 (ms) | bound (ms) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.guests} | {r.interval_ms} ms | {r.cpu_percent} | {r.rss_mib} "
            f"| {r.rtt_p50_ms} / {r.rtt_p99_ms} | {r.detection_p50_ms} / {r.detection_p99_ms} "
            f"(n={r.detection_samples}) | {r.detection_bound_ms:.0f} |"
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
