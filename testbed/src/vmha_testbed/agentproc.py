"""A node agent as a real process, for end-to-end tests, the demo and benchmarks.

`NodeAgentProcess` writes the agent's YAML configuration, starts `python -m vmha_node_agent`
(structured JSON logs to a file), and reads back what the agent exposes: its Prometheus
metrics and its log records.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from prometheus_client.parser import text_string_to_metric_families

from vmha_testbed import children

Sample = tuple[str, frozenset[tuple[str, str]], float]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class NodeAgentProcess:
    def __init__(
        self, config: Mapping[str, Any], workdir: Path, *, args: tuple[str, ...] = ()
    ) -> None:
        self.metrics_port = free_port()
        self.config = {**config, "metrics": {"address": "127.0.0.1", "port": self.metrics_port}}
        self.workdir = workdir
        self.args = args
        self.config_path = workdir / "agent.yaml"
        self.log_path = workdir / "agent.log"
        self._process: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}"

    @property
    def pid(self) -> int:
        return int(self._process.pid)

    async def start(self, timeout: float = 30.0) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        argv = [
            sys.executable, "-m", "vmha_node_agent", "--config", str(self.config_path),
            "--log-format", "json", *self.args,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._process = children.spawn(argv, output=log)
        await self._wait_healthy(timeout)

    async def stop(self, timeout: float = 15.0) -> int:
        if self._process is None:
            return 0
        await asyncio.to_thread(children.stop, self._process, timeout)
        return int(self._process.returncode)

    async def samples(self) -> list[Sample]:
        async with aiohttp.ClientSession() as http, http.get(f"{self.url}/metrics") as response:
            text = await response.text()
        return [
            (sample.name, frozenset(sample.labels.items()), sample.value)
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        ]

    async def value(self, name: str, **labels: str) -> float | None:
        """One sample's value; None when the series does not exist."""
        wanted = set(labels.items())
        for sample_name, sample_labels, value in await self.samples():
            if sample_name == name and wanted <= sample_labels:
                return value
        return None

    async def state(self, vm: str, namespace: str = "default") -> str | None:
        for name, labels, value in await self.samples():
            if name == "vmha_heartbeat_state" and value == 1:
                found = dict(labels)
                if found["vm"] == vm and found["namespace"] == namespace:
                    return found["state"]
        return None

    async def wait_state(
        self, vm: str, state: str, timeout: float, namespace: str = "default"
    ) -> float:
        """Wait until the VM is in `state`; return how long that took."""
        start = time.monotonic()
        async with asyncio.timeout(timeout):
            while await self.state(vm, namespace) != state:
                await asyncio.sleep(0.1)
        return time.monotonic() - start

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # e.g. a traceback printed before logging was set up
        return records

    def transitions(self, vm: str) -> list[dict[str, Any]]:
        return [r for r in self.log_records() if r.get("vm") == vm and "reason" in r]

    async def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if self._process.poll() is not None:
                    raise RuntimeError(
                        f"node agent exited with {self._process.returncode}: "
                        + self.log_path.read_text(errors="replace")[-2000:]
                    )
                try:
                    async with http.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.1)
        raise TimeoutError(f"node agent not healthy after {timeout} s")
