"""Run `vmha-operator` as a child process against a development cluster (tests, local demo).

    with OperatorProcess(kubeconfig, namespaces=["demo"], log_path=Path("operator.log")):
        ...  # the webhooks are configured and the watches run

The operator makes its own development CA, serves its webhooks on 127.0.0.1 and lets kopf
write the webhook configurations (named after this process, so several can coexist). `start`
returns once the apiserver knows both configurations with every vmha webhook in them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from vmha_operator import kube
from vmha_operator.handlers import WEBHOOK_IDS

ADMISSION = "/apis/admissionregistration.k8s.io/v1"
START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0
_PR_SET_PDEATHSIG = 1


class OperatorStartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def operator_command() -> list[str]:
    """The installed `vmha-operator` next to this interpreter, else `python -m`."""
    script = Path(sys.executable).parent / "vmha-operator"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vmha_operator"]


def _die_with_parent() -> Callable[[], None]:
    def preexec() -> None:
        # A crashed test run must not leave an operator behind (Linux only; best effort).
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)

    return preexec


class OperatorProcess:
    def __init__(
        self,
        kubeconfig: Path,
        *,
        namespaces: Sequence[str] = (),
        log_path: Path,
        extra_args: Sequence[str] = (),
        managed: str | None = None,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespaces = tuple(namespaces)
        self.log_path = log_path
        self.extra_args = tuple(extra_args)
        self.managed = managed or f"vmha-dev-{secrets.token_hex(4)}.vmha.io"
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def argv(self) -> list[str]:
        namespaces = [arg for ns in self.namespaces for arg in ("--namespace", ns)]
        return [
            *operator_command(),
            f"--kubeconfig={self.kubeconfig}",
            *namespaces,
            "--webhook-listen-address=127.0.0.1",
            "--webhook-host=127.0.0.1",
            f"--webhook-port={self.port}",
            f"--webhook-manage={self.managed}",
            "--verbose",
            *self.extra_args,
        ]

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        self.port = free_port()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._process = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent(),  # noqa: PLW1509 - no threads run in the child yet
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        try:
            asyncio.run(self._wait_configured(timeout))
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (kopf then removes its webhooks), SIGKILL after `timeout`."""
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

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    async def _wait_configured(self, timeout: float) -> None:
        client = kube.KubeClient(kube.load_configuration(str(self.kubeconfig)))
        deadline = time.monotonic() + timeout
        try:
            while not await self._configured(client):
                if not self.running:
                    raise OperatorStartError(f"vmha-operator exited:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise OperatorStartError(
                        f"vmha-operator's webhooks not configured within {timeout:.0f} s:\n"
                        f"{self.log_tail()}"
                    )
                await asyncio.sleep(0.5)
        finally:
            await client.close()

    async def _configured(self, client: kube.KubeClient) -> bool:
        """Both configurations list every vmha webhook at this process's port."""
        urls: dict[str, str] = {}
        for kind in ("mutatingwebhookconfigurations", "validatingwebhookconfigurations"):
            config = await client.get(f"{ADMISSION}/{kind}/{self.managed}")
            for webhook in (config or {}).get("webhooks") or []:
                client_config: dict[str, Any] = webhook.get("clientConfig") or {}
                urls[_webhook_id(str(client_config.get("url", "")))] = client_config.get("url", "")
        wanted = set(WEBHOOK_IDS)
        port = f":{self.port}/"
        return wanted <= set(urls) and all(port in urls[w] for w in wanted)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def _webhook_id(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]
