"""kubectl in one namespace of the local control plane, as a user types it (as admin), for
tests that check what a user sees: the objects, and the messages of refusals."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any, Literal, TypeVar

from vmha_testbed.controlplane import ControlPlane
from vmha_testbed.polling import eventually

T = TypeVar("T")
SETTLE_TIMEOUT = 60.0
# Each check runs kubectl, a process that takes a while to start: poll less often.
POLL_S = 0.3


class Kubectl:
    def __init__(self, control_plane: ControlPlane, namespace: str) -> None:
        self.control_plane = control_plane
        self.namespace = namespace

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.control_plane.kubectl("-n", self.namespace, *args, input=stdin, check=False)

    def ok(self, *args: str, stdin: str | None = None) -> str:
        """Its output; the command must succeed."""
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, result.stderr
        return result.stdout

    def refused(self, *args: str, stdin: str | None = None) -> str:
        """Its error output; the command must fail."""
        result = self.run(*args, stdin=stdin)
        assert result.returncode != 0, f"expected a refusal, got: {result.stdout}"
        return result.stderr

    def get(self, kind: str, name: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.ok("get", kind, name, "-o", "json"))
        return result

    def group(self, name: str, spec: str) -> None:
        """Apply VMGroup `name` with `spec` (YAML flow style, e.g. `{policy: anti-affinity}`)."""
        manifest = f"apiVersion: vmha.io/v1alpha1\nkind: VMGroup\nmetadata: {{name: {name}}}\n"
        self.ok("apply", "-f", "-", stdin=manifest + f"spec: {spec}\n")

    def eventually(
        self,
        check: Callable[[], T | Literal[False] | None],
        what: str,
        timeout: float = SETTLE_TIMEOUT,
    ) -> T:
        """`vmha_testbed.polling.eventually`, at a pace for checks that run kubectl."""
        return eventually(check, what, timeout, poll=POLL_S)
