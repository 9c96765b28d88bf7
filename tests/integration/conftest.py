"""Integration tier: tests against a real etcd + kube-apiserver (vmha_testbed.controlplane).

Every test under tests/integration gets the `integration` marker. The `control_plane` and
`namespace` fixtures, and the toolchain build before the first test, are in tests/conftest.py
(the end-to-end tier uses them too). Here: `operator`, the operator serving the test's
namespace.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from vmha_testbed.controlplane import ControlPlane
from vmha_testbed.operatorproc import OperatorProcess

HERE = Path(__file__).resolve().parent


def _is_integration(item: pytest.Item) -> bool:
    return item.path.is_relative_to(HERE)


# tryfirst: the marker must be there before `-m` deselects by it.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _is_integration(item):
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def operator(
    control_plane: ControlPlane, namespace: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    """The operator serving the test's namespace, as admin, its webhooks configured."""
    log = tmp_path / "operator.log"
    with OperatorProcess(control_plane.kubeconfig_path, namespaces=[namespace], log_path=log) as op:
        yield op
