"""The chart's alert rules, as its PrometheusRule renders them, checked with promtool (Debian's
`prometheus` package): valid rules, and `promtool test rules` with the unit tests in
`charts/vmha/tests/alerts.test.yaml`, which make every alert fire and not fire. Every alert has
such a test and a runbook section in docs/alerts.md."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmha_testbed.toolchain import REPO_ROOT, Toolchain, ensure_toolchain

CHART = REPO_ROOT / "charts" / "vmha"
PROMTOOL_TESTS = CHART / "tests" / "alerts.test.yaml"
RUNBOOK = REPO_ROOT / "docs" / "alerts.md"
RULE_TEMPLATE = "templates/monitoring/prometheusrule.yaml"
TIMEOUT = 120.0

Rule = dict[str, Any]


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool not found: install Debian's prometheus (hack/install-system-deps.sh)"
    return found


def rendered_groups(tmp_path: Path, *values: str) -> list[dict[str, Any]]:
    """spec.groups of the chart's PrometheusRule for release vmha in vmha-system (the names
    the promtool tests use)."""
    tools: Toolchain = ensure_toolchain()
    home = tmp_path / "helm-home"
    result = subprocess.run(
        [
            str(tools.helm),
            "template",
            "vmha",
            str(CHART),
            "--namespace=vmha-system",
            "--api-versions=monitoring.coreos.com/v1",
            f"--show-only={RULE_TEMPLATE}",
            *(f"--set={value}" for value in values),
        ],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            **{f"HELM_{d}_HOME": str(home / d) for d in ("CONFIG", "CACHE", "DATA")},
        },
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    groups: list[dict[str, Any]] = yaml.safe_load(result.stdout)["spec"]["groups"]
    return groups


def rules_of(groups: list[dict[str, Any]]) -> list[Rule]:
    return [rule for group in groups for rule in group["rules"]]


def write_rules(directory: Path, groups: list[dict[str, Any]]) -> None:
    """rules.yaml and a copy of the promtool tests side by side (rule_files is relative)."""
    (directory / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    shutil.copy(PROMTOOL_TESTS, directory / PROMTOOL_TESTS.name)


def run_promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


@pytest.fixture
def groups(tmp_path: Path) -> list[dict[str, Any]]:
    return rendered_groups(tmp_path)


def test_the_rendered_rules_are_valid(groups: list[dict[str, Any]], tmp_path: Path) -> None:
    write_rules(tmp_path, groups)
    result = run_promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules_of(groups))} rules found" in result.stdout


def test_every_alert_fires_and_resolves_in_the_promtool_tests(
    groups: list[dict[str, Any]], tmp_path: Path
) -> None:
    write_rules(tmp_path, groups)
    result = run_promtool("test", "rules", PROMTOOL_TESTS.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_promtool_tests_catch_a_broken_alert(
    groups: list[dict[str, Any]], tmp_path: Path
) -> None:
    for rule in rules_of(groups):
        if rule["alert"] == "VmhaGuestHeartbeatFailed":
            rule["expr"] = 'vmha_heartbeat_state{state="failed"} > 1'  # never true
    write_rules(tmp_path, groups)
    result = run_promtool("test", "rules", PROMTOOL_TESTS.name, cwd=tmp_path)
    assert result.returncode != 0
    assert "alertname: VmhaGuestHeartbeatFailed" in result.stdout + result.stderr


def test_every_alert_is_tested_both_ways_and_has_a_runbook(groups: list[dict[str, Any]]) -> None:
    tests = yaml.safe_load(PROMTOOL_TESTS.read_text())["tests"]
    cases = [case for test in tests for case in test["alert_rule_test"]]
    runbook_headings = set(re.findall(r"^## (\w+)$", RUNBOOK.read_text(), flags=re.MULTILINE))
    for rule in rules_of(groups):
        name = rule["alert"]
        outcomes = {bool(case["exp_alerts"]) for case in cases if case["alertname"] == name}
        assert outcomes == {True, False}, f"{name}: promtool tests must see it fire and not fire"
        assert name in runbook_headings, f"{name}: no '## {name}' section in docs/alerts.md"
        assert {"summary", "description"} <= rule["annotations"].keys()
        assert rule["labels"]["severity"] in ("critical", "warning")


def test_runbook_links_alert_labels_and_the_kube_state_metrics_switch(tmp_path: Path) -> None:
    groups = rendered_groups(
        tmp_path,
        "metrics.prometheusRule.runbookBaseURL=https://docs.example.com/vmha/alerts",
        "metrics.prometheusRule.alertLabels.team=platform",
        "metrics.prometheusRule.kubeStateMetrics=false",
    )
    assert "vmha-node-agent-rollout" not in [group["name"] for group in groups]
    for rule in rules_of(groups):
        anchor = rule["alert"].lower()
        link = f"https://docs.example.com/vmha/alerts#{anchor}"
        assert rule["annotations"]["runbook_url"] == link
        assert rule["labels"]["team"] == "platform"
        assert rule["labels"]["severity"] in ("critical", "warning")
