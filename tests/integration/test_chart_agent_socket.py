"""The node agent's security context in the chart is enough, and no more than needed, to
connect to a VM's channel socket as KubeVirt lays it out on a node.

QEMU in virt-launcher runs as uid 107 (qemu) and creates the socket with mode 0755 in the
pod's `private` emptyDir; the kubelet keeps that under <root>/pods/<pod uid>/, directories
only root may enter. connect() needs write permission on the socket file. The test builds
that layout, mounts it read-only as the chart does, and connects as the chart's user with
exactly the chart's capabilities (setpriv), then again without CAP_DAC_OVERRIDE, which fails.
Needs root (to own files as uid 107, drop capabilities and bind-mount in a private mount
namespace).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmha_node_agent.transport import connectable_path
from vmha_testbed.toolchain import REPO_ROOT, ensure_toolchain

CHART = REPO_ROOT / "charts" / "vmha"
QEMU_UID = 107
POD_UID = "6c1f0e52-3b8a-4d55-9a31-0d5e8c2b7f10"
SOCKET_IN_POD_DIR = Path("volumes/kubernetes.io~empty-dir/private/vmha")
TIMEOUT = 60.0

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not (shutil.which("setpriv") and shutil.which("unshare")),
    reason="needs root, setpriv and unshare (util-linux)",
)

# The agent's own way to a socket path longer than sockaddr_un allows (as these are).
CONNECT = """
import socket, sys
from pathlib import Path
from vmha_node_agent.transport import connectable_path
client = socket.socket(socket.AF_UNIX)
try:
    with connectable_path(Path(sys.argv[1])) as path:
        client.connect(path)
except OSError as error:
    sys.exit(f"connect failed: {error}")
print("connected")
"""


def agent_container() -> dict[str, Any]:
    tools = ensure_toolchain()
    result = subprocess.run(
        [
            str(tools.helm),
            "template",
            "vmha",
            str(CHART),
            "--show-only=templates/node-agent/daemonset.yaml",
        ],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=True,
    )
    daemonset = yaml.safe_load(result.stdout)
    container: dict[str, Any] = daemonset["spec"]["template"]["spec"]["containers"][0]
    return container


@pytest.fixture
def kubelet_pods(tmp_path: Path) -> Iterator[Path]:
    """<kubelet root>/pods with one virt-launcher pod whose QEMU listens on the channel."""
    pods = tmp_path / "kubelet" / "pods"
    socket_path = pods / POD_UID / SOCKET_IN_POD_DIR
    socket_path.parent.mkdir(parents=True)
    tmp_path.chmod(0o755)
    for directory in (pods / POD_UID, pods / POD_UID / "volumes", socket_path.parent.parent):
        directory.chmod(0o750)  # the kubelet's: root only
    socket_path.parent.chmod(0o777)  # an emptyDir
    with socket.socket(socket.AF_UNIX) as server:
        with connectable_path(socket_path) as path:
            server.bind(path)
        server.listen(8)  # connect() succeeds from the backlog; nobody needs to accept
        os.chown(socket_path, QEMU_UID, QEMU_UID)
        socket_path.chmod(0o755)  # QEMU's umask 022
        yield pods


def connect_as_container(
    pods: Path, container: dict[str, Any], capabilities: list[str], view: Path
) -> subprocess.CompletedProcess[str]:
    """connect() from a process like the agent's: the pods directory mounted at `view` as
    the chart mounts it, the chart's user, only `capabilities`, no new privileges."""
    mount = next(m for m in container["volumeMounts"] if m["name"] == "kubelet-pods")
    context = container["securityContext"]
    view.mkdir()
    remount = "mount -o remount,bind,ro" if mount.get("readOnly") else "true"
    bounding = ",".join(["-all", *(f"+{cap.lower()}" for cap in capabilities)])
    setpriv = [
        "setpriv",
        f"--reuid={context['runAsUser']}",
        "--regid=0",
        "--clear-groups",
        "--inh-caps=-all",
        f"--bounding-set={bounding}",
        *(["--no-new-privs"] if context.get("allowPrivilegeEscalation") is False else []),
    ]
    target = view / POD_UID / SOCKET_IN_POD_DIR
    script = (
        f'mount --bind "{pods}" "{view}" && {remount} "{view}" && '
        f'exec {" ".join(setpriv)} "{sys.executable}" -c "$0" "{target}"'
    )
    return subprocess.run(
        ["unshare", "--mount", "--propagation=private", "sh", "-c", script, CONNECT],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )


def test_the_charts_security_context_connects_to_a_qemu_socket(
    kubelet_pods: Path, tmp_path: Path
) -> None:
    container = agent_container()
    context = container["securityContext"]
    assert context["capabilities"]["drop"] == ["ALL"]
    assert context["privileged"] is False
    assert container["volumeMounts"][1]["readOnly"] is True

    added = context["capabilities"]["add"]
    result = connect_as_container(kubelet_pods, container, added, tmp_path / "view")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "connected"


def test_without_dac_override_the_socket_is_refused(kubelet_pods: Path, tmp_path: Path) -> None:
    container = agent_container()
    fewer = [
        cap for cap in container["securityContext"]["capabilities"]["add"] if cap != "DAC_OVERRIDE"
    ]
    result = connect_as_container(kubelet_pods, container, fewer, tmp_path / "view")
    assert result.returncode != 0
    assert "Permission denied" in result.stderr
