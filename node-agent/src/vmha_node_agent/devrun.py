"""Run `vmha-node-agent` as a child process (integration tests, benchmarks, the demo).

    with AgentProcess("node-a", kubeconfig=..., kubelet_root=..., log_path=...) as agent:
        agent.metric("vmha_vms")

`start` returns once the agent answers /readyz (its Kubernetes watches have listed).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

import yaml

START_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
_PR_SET_PDEATHSIG = 1


class AgentStartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def agent_command() -> list[str]:
    """The installed `vmha-node-agent` next to this interpreter, else `python -m`."""
    script = Path(sys.executable).parent / "vmha-node-agent"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vmha_node_agent"]


def _die_with_parent() -> Callable[[], None]:
    def preexec() -> None:
        # A crashed test run must not leave an agent behind (Linux only; best effort).
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return preexec


class AgentProcess:
    def __init__(
        self,
        node_name: str,
        *,
        kubeconfig: Path,
        kubelet_root: Path,
        log_path: Path,
        config: Mapping[str, Any] | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        """`config`: the agent's YAML configuration as a dict (see docs/node-agent.md)."""
        self.node_name = node_name
        self.kubeconfig = kubeconfig
        self.kubelet_root = kubelet_root
        self.log_path = log_path
        self.config = dict(config or {})
        self.extra_args = tuple(extra_args)
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def argv(self, config_path: Path) -> list[str]:
        return [
            *agent_command(),
            f"--config={config_path}",
            f"--kubeconfig={self.kubeconfig}",
            f"--node-name={self.node_name}",
            f"--kubelet-root={self.kubelet_root}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={self.port}",
            *self.extra_args,
        ]

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        self.port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        config_path = self.log_path.with_suffix(".yaml")
        config_path.write_text(yaml.safe_dump(self.config))
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            self.argv(config_path),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - no threads run in the child yet
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (the agent drains its queues), SIGKILL after `timeout`."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self, timeout: float = START_TIMEOUT) -> Self:
        self.stop()
        return self.start(timeout)

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def http_get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as error:
            return int(error.code), error.read().decode(errors="replace")

    def metrics_text(self) -> str:
        status, text = self.http_get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return text

    def metric(self, name: str, **labels: str) -> float | None:
        """The value of one sample (the first whose labels include `labels`), if present."""
        return metric_value(self.metrics_text(), name, **labels)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise AgentStartError(f"vmha-node-agent exited:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                if self.http_get("/readyz")[0] == 200:
                    return
            if time.monotonic() > deadline:
                raise AgentStartError(
                    f"vmha-node-agent not ready within {timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.2)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def metric_value(text: str, name: str, **labels: str) -> float | None:
    """One sample's value from Prometheus text (labels must all match)."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        if all(f'{key}="{wanted}"' in label_text for key, wanted in labels.items()):
            return float(value)
    return None
