"""Where the development toolchain lives, and building it on first use.

kube-apiserver, kubectl and helm are built from the Go module proxy by
`hack/build-toolchain.sh` into a cache keyed by version (`$VMHA_CACHE`, default
`~/.cache/vmha`); etcd comes from Debian's `etcd-server`. Versions are pinned in
`hack/kube-toolchain/versions.env`, read here and by the script.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

# testbed/src/vmha_testbed/toolchain.py -> the repository root (testbed is development-only
# and always used from a checkout).
REPO_ROOT = Path(__file__).resolve().parents[3]
BUILD_SCRIPT = REPO_ROOT / "hack" / "build-toolchain.sh"
VERSIONS_FILE = REPO_ROOT / "hack" / "kube-toolchain" / "versions.env"
DEFAULT_ETCD = Path("/usr/bin/etcd")


class ToolchainError(RuntimeError):
    """The toolchain is missing and could not be built."""


@dataclass(frozen=True)
class Versions:
    kube: str
    helm: str
    prometheus_operator: str
    cert_manager: str


@dataclass(frozen=True)
class Toolchain:
    versions: Versions
    kube_apiserver: Path
    kubectl: Path
    helm: Path
    etcd: Path
    prometheus_operator_crds: Path
    """Directory of the Prometheus Operator CRD manifests (monitoring.coreos.com_*.yaml)."""
    cert_manager_crds: Path
    """Directory of cert-manager's CRD manifests (cert-manager.io_*.yaml)."""

    def missing(self) -> list[Path]:
        """What the build script has not produced yet (etcd is a system package, not built)."""
        built = (self.kube_apiserver, self.kubectl, self.helm)
        absent = [path for path in built if not os.access(path, os.X_OK)]
        for crds in (self.prometheus_operator_crds, self.cert_manager_crds):
            if not any(crds.glob("*.yaml")):
                absent.append(crds)
        return absent


def cache_dir() -> Path:
    return Path(os.environ.get("VMHA_CACHE") or Path.home() / ".cache" / "vmha")


def read_versions(path: Path = VERSIONS_FILE) -> Versions:
    values: dict[str, str] = {}
    for line in path.read_text().splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            values[key] = value
    try:
        return Versions(
            kube=values["KUBE_VERSION"],
            helm=values["HELM_VERSION"],
            prometheus_operator=values["PROMETHEUS_OPERATOR_VERSION"],
            cert_manager=values["CERT_MANAGER_VERSION"],
        )
    except KeyError as missing:
        raise ToolchainError(f"{path} does not define {missing}") from None


def etcd_path() -> Path:
    """`$VMHA_ETCD`, else Debian's etcd-server (`/usr/bin/etcd`), else `etcd` on PATH."""
    configured = os.environ.get("VMHA_ETCD")
    if configured:
        return Path(configured)
    if DEFAULT_ETCD.exists():
        return DEFAULT_ETCD
    found = shutil.which("etcd")
    return Path(found) if found else DEFAULT_ETCD


def toolchain() -> Toolchain:
    """The toolchain's paths (which need not exist yet: see `ensure_toolchain`)."""
    versions = read_versions()
    cache = cache_dir()
    kube_bin = cache / "kube" / versions.kube / "bin"
    return Toolchain(
        versions=versions,
        kube_apiserver=kube_bin / "kube-apiserver",
        kubectl=kube_bin / "kubectl",
        helm=cache / "helm" / versions.helm / "bin" / "helm",
        etcd=etcd_path(),
        prometheus_operator_crds=cache
        / "prometheus-operator"
        / versions.prometheus_operator
        / "crds",
        cert_manager_crds=cache / "cert-manager" / versions.cert_manager / "crds",
    )


def ensure_toolchain() -> Toolchain:
    """The toolchain, built first by `hack/build-toolchain.sh` if anything is missing.

    The first build takes minutes; the script's progress goes to this process's stderr.
    """
    tools = toolchain()
    if tools.missing():
        result = subprocess.run([str(BUILD_SCRIPT)], check=False)
        if result.returncode != 0:
            raise ToolchainError(
                f"{BUILD_SCRIPT} failed with exit status {result.returncode} (output above)"
            )
        still_missing = tools.missing()
        if still_missing:
            raise ToolchainError(f"{BUILD_SCRIPT} did not produce {still_missing}")
    if not os.access(tools.etcd, os.X_OK):
        raise ToolchainError(
            f"etcd not found at {tools.etcd}: install Debian's etcd-server "
            "(hack/install-system-deps.sh) or set VMHA_ETCD"
        )
    return tools
