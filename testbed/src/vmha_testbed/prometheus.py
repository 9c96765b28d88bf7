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
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import yaml

from vmha_testbed.children import Child, Runner
from vmha_testbed.loopback import HttpProbe, free_port, http_get

PROMETHEUS_ENV = "VMHA_PROMETHEUS"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
HTTP_TIMEOUT = 10.0


class PrometheusError(RuntimeError):
    """Prometheus is not installed, or its API answered with an error."""


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


class PrometheusServer(Runner):
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
        self._child = Child("prometheus", self.log_path)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._child.running

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> Self:
        """Start it; ChildError (with its log's end) if it exits or is not ready in time."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self._targets_path.exists():
            self.set_targets([])
        config_path = self._write_config()
        self.port = free_port()
        argv = [
            prometheus_binary(),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--log.level=warn",
        ]
        self._child.start(argv)
        try:
            # /-/ready answers 503 while Prometheus starts.
            self._child.wait_until(HttpProbe(f"{self.url}/-/ready", timeout=2), "ready", timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        self._child.stop(timeout)

    def set_targets(self, targets: Sequence[ScrapeTarget]) -> None:
        """Scrape exactly these from now on (a running Prometheus notices within seconds)."""
        groups = [{"targets": [t.address], "labels": dict(t.labels)} for t in targets]
        self.workdir.mkdir(parents=True, exist_ok=True)
        staging = self._targets_path.with_suffix(".tmp")
        staging.write_text(json.dumps(groups))
        staging.replace(self._targets_path)  # never a half-written file to read

    def log_tail(self, lines: int = 40) -> str:
        return self._child.log_tail(lines)

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
        status, body = http_get(url, timeout=HTTP_TIMEOUT)
        if status != 200:
            raise PrometheusError(f"{url}: {status} {body[:500]!r}")
        answer = json.loads(body)
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


def _duration(seconds: float) -> str:
    """Prometheus' duration syntax, in milliseconds so that fractions survive."""
    return f"{round(seconds * 1000)}ms"
