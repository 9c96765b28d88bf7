"""`vmha-node-agent` as a child process, for the integration and end-to-end tests, the demo
and the benchmarks.

    with AgentProcess(workdir / "node-a.log", config, node_name="node-a",
                      kubeconfig=kubeconfig, kubelet_root=kubelet_root) as agent:
        agent.metric("vmha_vms")

The agent reads `config` (its YAML configuration as a dict, see docs/node-agent.md) from a
file next to its log, logs JSON records to the log, and serves /metrics on a free loopback
port: a new one at each start, as a new pod has a new address. `start` returns once it
answers /readyz (with Kubernetes: once its watches have listed). Without `kubeconfig` it
runs on the static VM list of its configuration.

The calls block; code on an event loop makes them through `asyncio.to_thread`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Self

import yaml

from vmha_node_agent.cli import agent_command
from vmha_testbed.children import Child, Runner
from vmha_testbed.loopback import HttpProbe, free_port, http_get
from vmha_testbed.polling import eventually
from vmha_testbed.promtext import Sample, parse_samples, sample_value

START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0


class AgentProcess(Runner):
    def __init__(
        self,
        log_path: Path,
        config: Mapping[str, Any] | None = None,
        *,
        node_name: str | None = None,
        kubeconfig: Path | None = None,
        kubelet_root: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.config = dict(config or {})
        self.node_name = node_name
        self.kubeconfig = kubeconfig
        self.kubelet_root = kubelet_root
        self.extra_args = tuple(extra_args)
        self.port = 0
        self._child = Child("vmha-node-agent", log_path)

    @property
    def log_path(self) -> Path:
        return self._child.log_path

    @property
    def config_path(self) -> Path:
        return self.log_path.with_suffix(".yaml")

    @property
    def url(self) -> str:
        """Where its /metrics, /healthz and /readyz are."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._child.running

    @property
    def pid(self) -> int | None:
        return self._child.pid

    # -- lifecycle --

    def argv(self) -> list[str]:
        given = {
            "--node-name": self.node_name,
            "--kubeconfig": self.kubeconfig,
            "--kubelet-root": self.kubelet_root,
        }
        return [
            *agent_command(),
            f"--config={self.config_path}",
            *(f"{flag}={value}" for flag, value in given.items() if value is not None),
            "--log-format=json",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.port}",
            *self.extra_args,
        ]

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        self.port = free_port()
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config))
        self._child.start(self.argv(), env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            self._child.wait_until(HttpProbe(f"{self.url}/readyz"), "ready (/readyz)", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (the agent drains its queues), SIGKILL after `timeout`; the exit status."""
        return self._child.stop(timeout)

    def restart(self, timeout: float = START_TIMEOUT) -> Self:
        self.stop()
        return self.start(timeout)

    # -- what it exposes --

    def samples(self) -> list[Sample]:
        status, text = http_get(f"{self.url}/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return parse_samples(text)

    def metric(self, name: str, **labels: str) -> float | None:
        """The value of one sample (the first whose labels include `labels`), if present."""
        return sample_value(self.samples(), name, **labels)

    def state(self, vm: str, namespace: str = "default") -> str | None:
        """The VM's heartbeat state, None when the agent has no session for it."""
        for name, labels, value in self.samples():
            if name != "vmha_heartbeat_state" or value != 1:
                continue
            if (labels["vm"], labels["namespace"]) == (vm, namespace):
                return labels["state"]
        return None

    def wait_state(self, vm: str, state: str, timeout: float, namespace: str = "default") -> None:
        eventually(lambda: self.state(vm, namespace) == state, f"{vm} {state}", timeout)

    def log_tail(self, lines: int = 40) -> str:
        return self._child.log_tail(lines)

    def log_records(self) -> list[dict[str, Any]]:
        records = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # e.g. a traceback printed before logging was set up
        return records

    def transitions(self, vm: str) -> list[dict[str, Any]]:
        """The log records of the VM's heartbeat state changes."""
        return [r for r in self.log_records() if r.get("vm") == vm and "reason" in r]
