"""`vmha-operator` as a child process against the local control plane (tests, the demo).

    with OperatorProcess(kubeconfig, namespaces=["demo"], log_path=Path("operator.log")):
        ...  # the webhooks are configured and the watches run

The operator makes its own development CA, serves its webhooks on 127.0.0.1 and lets kopf
write the webhook configurations (named after this process, so several can coexist). `start`
returns once the apiserver knows both configurations with every vmha webhook in them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Self

from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client import ApiException

from vmha_operator.cli import operator_command
from vmha_operator.handlers import WEBHOOK_IDS
from vmha_testbed.children import Child, Runner
from vmha_testbed.loopback import free_port

START_TIMEOUT = 120.0
STOP_TIMEOUT = 30.0


class OperatorProcess(Runner):
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
        self.extra_args = tuple(extra_args)
        self.managed = managed or f"vmha-dev-{secrets.token_hex(4)}.vmha.io"
        self.port = 0
        self._child = Child("vmha-operator", log_path)

    @property
    def log_path(self) -> Path:
        return self._child.log_path

    @property
    def running(self) -> bool:
        return self._child.running

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
        self._child.start(self.argv(), env={**os.environ, "PYTHONUNBUFFERED": "1"})
        api = k8s_config.new_client_from_config(  # type: ignore[no-untyped-call]
            config_file=str(self.kubeconfig)
        )
        try:
            admission = k8s.AdmissionregistrationV1Api(api)
            self._child.wait_until(
                lambda: self._configured(admission), "webhooks configured", timeout, poll=0.5
            )
        except BaseException:
            self.stop()
            raise
        finally:
            client: Any = api  # ApiClient.close() is not annotated
            client.close()
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """SIGTERM (kopf then removes its webhooks), SIGKILL after `timeout`."""
        self._child.stop(timeout)

    def log_tail(self, lines: int = 40) -> str:
        return self._child.log_tail(lines)

    def _configured(self, admission: k8s.AdmissionregistrationV1Api) -> bool:
        """Both configurations list every vmha webhook at this process's port."""
        reads: list[Callable[[str], Any]] = [
            admission.read_mutating_webhook_configuration,
            admission.read_validating_webhook_configuration,
        ]
        urls: dict[str, str] = {}
        for read in reads:
            try:
                configuration = read(self.managed)
            except ApiException as error:
                if error.status == 404:  # not written yet
                    continue
                raise
            for webhook in configuration.webhooks or []:
                url = str(webhook.client_config.url or "")
                urls[url.rstrip("/").rsplit("/", 1)[-1]] = url
        port = f":{self.port}/"
        return set(WEBHOOK_IDS) <= set(urls) and all(port in urls[w] for w in WEBHOOK_IDS)
