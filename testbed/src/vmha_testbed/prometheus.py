"""A real Prometheus server for tests: Debian's `prometheus` (2.42) on loopback.

    with PrometheusServer(workdir, job="vmha-node-agent", rule_groups=groups) as prometheus:
        prometheus.set_targets([ScrapeTarget("127.0.0.1:9810", {"node": "node-a"})])
        prometheus.alerts()

It scrapes one job whose targets come from a file (file-based service discovery, rewritten by
`set_targets`: a restarted process on a new port is found again, as Kubernetes service
discovery finds a restarted pod), evaluates the given alerting rules, and keeps its data in
`workdir`. Short scrape and evaluation intervals (1 s by default) keep tests short.
`honor_labels` is on by default, as in the vmha chart's ServiceMonitor: a scraped `namespace`
label (the VM's) wins over the target's.

The server is a child process (`vmha_testbed.children`): it never outlives its owner.
Environment: VMHA_PROMETHEUS overrides the binary.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from types import TracebackType
from typing import Any, Self

import yaml

from vmha_testbed import children

PROMETHEUS_ENV = "VMHA_PROMETHEUS"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
HTTP_TIMEOUT = 10.0


class PrometheusError(RuntimeError):
    """Prometheus did not start, exited, or its API answered with an error."""


@dataclass(frozen=True)
class ScrapeTarget:
    """One `host:port` to scrape `/metrics` from, with labels added to its series."""

    address: str
    labels: Mapping[str, str] = field(default_factory=dict)


def prometheus_binary() -> str:
    configured = os.environ.get(PROMETHEUS_ENV)
    found = configured or shutil.which("prometheus")
    if not found:
        raise PrometheusError(
            "prometheus not found: install Debian's prometheus (hack/install-system-deps.sh)"
        )
    return found


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PrometheusServer:
    def __init__(
        self,
        workdir: Path,
        *,
        job: str,
        rule_groups: Sequence[Mapping[str, Any]] = (),
        scrape_interval_s: float = 1.0,
        evaluation_interval_s: float = 1.0,
        honor_labels: bool = True,
    ) -> None:
        """`rule_groups`: Prometheus rule groups (`groups:` of a rule file) to evaluate."""
        self.workdir = workdir
        self.job = job
        self.rule_groups = [dict(group) for group in rule_groups]
        self.scrape_interval_s = scrape_interval_s
        self.evaluation_interval_s = evaluation_interval_s
        self.honor_labels = honor_labels
        self.port = 0
        self.log_path = workdir / "prometheus.log"
        self._targets_path = workdir / "targets.json"
        self._process: Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        if self._process is not None:
            raise PrometheusError("already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self._targets_path.exists():
            self.set_targets([])
        config_path = self._write_config()
        self.port = _free_port()
        argv = [
            prometheus_binary(),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        with self.log_path.open("ab") as log:
            self._process = children.spawn(argv, output=log)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        process, self._process = self._process, None
        if process is not None:
            children.stop(process, timeout)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def set_targets(self, targets: Sequence[ScrapeTarget]) -> None:
        """Scrape exactly these from now on (a running Prometheus notices within seconds)."""
        groups = [{"targets": [t.address], "labels": dict(t.labels)} for t in targets]
        self.workdir.mkdir(parents=True, exist_ok=True)
        staging = self._targets_path.with_suffix(".tmp")
        staging.write_text(json.dumps(groups))
        staging.replace(self._targets_path)  # never a half-written file to read

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- the HTTP API ----------------------------------------------------------------------

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (`pending` or `firing`), each with `labels`, `annotations`, `state`,
        `activeAt` and `value`."""
        alerts: list[dict[str, Any]] = self.api("alerts")["alerts"]
        return alerts

    def query(self, expression: str) -> list[dict[str, Any]]:
        """An instant query's vector: [{"metric": {...}, "value": [time, "value"]}, ...]."""
        data = self.api("query", query=expression)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expression!r} is a {data['resultType']}, not a vector")
        result: list[dict[str, Any]] = data["result"]
        return result

    def targets(self) -> list[dict[str, Any]]:
        """The active targets with their `labels`, `health` and `lastError`."""
        active: list[dict[str, Any]] = self.api("targets", state="active")["activeTargets"]
        return active

    def rule_groups_loaded(self) -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = self.api("rules")["groups"]
        return groups

    def api(self, endpoint: str, **params: str) -> Any:
        """GET /api/v1/<endpoint>; its `data`. Raises PrometheusError on an error answer."""
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"{self.url}/api/v1/{endpoint}{query}"
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise PrometheusError(f"{url}: {error.code} {error.read()[:500]!r}") from None
        if answer.get("status") != "success":
            raise PrometheusError(f"{url}: {answer}")
        return answer["data"]

    # -- internals -------------------------------------------------------------------------

    def _write_config(self) -> Path:
        rules_path = self.workdir / "rules.yaml"
        rules_path.write_text(yaml.safe_dump({"groups": self.rule_groups}, sort_keys=False))
        config = {
            "global": {
                "scrape_interval": _duration(self.scrape_interval_s),
                "scrape_timeout": _duration(self.scrape_interval_s),
                "evaluation_interval": _duration(self.evaluation_interval_s),
            },
            "rule_files": [str(rules_path)],
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "honor_labels": self.honor_labels,
                    "file_sd_configs": [
                        {"files": [str(self._targets_path)], "refresh_interval": "1s"}
                    ],
                }
            ],
        }
        path = self.workdir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if not self.running:
                raise PrometheusError(f"prometheus exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass  # not listening yet, or 503 while starting
            if time.monotonic() > deadline:
                raise PrometheusError(
                    f"prometheus not ready within {timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.2)


def _duration(seconds: float) -> str:
    """Prometheus' duration syntax, in milliseconds so that fractions survive."""
    return f"{round(seconds * 1000)}ms"
