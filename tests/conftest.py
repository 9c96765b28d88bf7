"""Fixtures shared by the tiers: the real control plane (etcd + kube-apiserver,
`vmha_testbed.controlplane`), used by the integration tests and by the end-to-end tests that
run QEMU guests in a cluster.

The toolchain (kube-apiserver, kubectl, helm, CRDs) is built on the first run, after
collection and before any test, so its minutes count against no test's timeout and its
progress shows on the terminal.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator

import pytest

from vmha_testbed.controlplane import ControlPlane
from vmha_testbed.toolchain import ToolchainError, ensure_toolchain

_startup_report = pytest.StashKey[str]()


def _needs_toolchain(item: pytest.Item) -> bool:
    """Integration tests all use the toolchain (directly or through the control plane);
    other tiers' tests when they ask for the control plane."""
    fixtures = getattr(item, "fixturenames", ())
    return item.get_closest_marker("integration") is not None or "control_plane" in fixtures


def pytest_collection_finish(session: pytest.Session) -> None:
    if session.config.option.collectonly or not any(map(_needs_toolchain, session.items)):
        return
    capture = session.config.pluginmanager.getplugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        try:
            ensure_toolchain()
        except ToolchainError as error:
            # The control_plane fixture tries again and fails the tests that need it.
            warnings.warn(f"toolchain build failed: {error}", stacklevel=1)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    report = terminalreporter.config.stash.get(_startup_report, None)
    if report:
        terminalreporter.write_line(f"vmha control plane startup: {report}")


@pytest.fixture(scope="session")
def control_plane(pytestconfig: pytest.Config) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver with vmha's, KubeVirt's and Prometheus Operator's CRDs."""
    with ControlPlane(tools=ensure_toolchain()) as control_plane:
        pytestconfig.stash[_startup_report] = control_plane.describe_timings()
        yield control_plane


@pytest.fixture
def namespace(control_plane: ControlPlane) -> Iterator[str]:
    """A fresh namespace with its `default` ServiceAccount, deleted after the test."""
    name = control_plane.create_namespace()
    yield name
    control_plane.delete_namespace(name)
