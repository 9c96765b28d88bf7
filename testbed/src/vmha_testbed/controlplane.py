"""A local Kubernetes control plane: etcd + kube-apiserver on loopback (the envtest pattern).

`ControlPlane` generates its own PKI, starts etcd and kube-apiserver on free loopback ports in a
temporary directory, waits for `/readyz`, writes an admin kubeconfig and installs the CRDs the
tests need (vmha's `crds/`, KubeVirt's VM/VMI/VMIM, the Prometheus Operator's ServiceMonitor
and PrometheusRule). There is no controller-manager, scheduler or kubelet: nothing reconciles,
so tests play the controllers they need (see `create_namespace`).

No process outlives its owner (`vmha_testbed.children`: own session, killed by the kernel
when this process dies), and an atexit handler stops whatever is still running.

    python -m vmha_testbed.controlplane   # runs one until Ctrl-C and prints its KUBECONFIG
"""

from __future__ import annotations

import argparse
import atexit
import base64
import contextlib
import logging
import os
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any, NoReturn, Self, TypeVar, cast

import yaml
from kubernetes import client as k8s
from kubernetes.client import ApiException

from vmha_testbed.children import Child, ChildError, Runner
from vmha_testbed.loopback import HttpProbe, free_ports
from vmha_testbed.pki import CertificateAuthority, IssuedCertificate, SigningKey
from vmha_testbed.toolchain import REPO_ROOT, Toolchain, ensure_toolchain

log = logging.getLogger(__name__)
_T = TypeVar("_T")

MANIFESTS = Path(__file__).resolve().parent / "manifests"
KUBEVIRT_CRDS = MANIFESTS / "kubevirt-crds.yaml"
VMHA_CRDS_DIR = REPO_ROOT / "crds"
# What the Helm chart renders (metrics Service scraping and alerts); the other Prometheus
# Operator CRDs are large and would only slow the start.
PROMETHEUS_OPERATOR_CRDS = ("servicemonitors", "prometheusrules")

ADMIN_USER = "vmha-admin"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVING_HOSTS = (
    "127.0.0.1",
    "localhost",
    "kubernetes",
    "kubernetes.default",
    "kubernetes.default.svc",
    "kubernetes.default.svc.cluster.local",
)

# Generous: the machine may be busy (two cores shared with other builds and test runs).
STARTUP_TIMEOUT = 180.0
CRD_ESTABLISHED_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
KUBECTL_TIMEOUT = 120.0
LOG_TAIL_LINES = 30
PORT_START_ATTEMPTS = 3


class ControlPlaneError(RuntimeError):
    """The control plane did not start (the message carries the servers' log tails)."""


class KubectlError(RuntimeError):
    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"kubectl {' '.join(result.args[1:])} failed ({result.returncode}): "
            f"{result.stderr.strip()}"
        )
        self.result = result


class _PortInUse(ControlPlaneError):
    """A port picked as free was taken before a server bound it; worth another attempt."""


def _spawn(name: str, argv: Sequence[str], log_path: Path) -> Child:
    server = Child(name, log_path)
    server.start(argv)
    log.debug("started %s (pid %s), log %s", name, server.pid, log_path)
    return server


_running: set[ControlPlane] = set()


@atexit.register
def _stop_all_at_exit() -> None:
    for control_plane in list(_running):
        control_plane.stop()


# --- helpers ----------------------------------------------------------------------------------


def _default_workdir_parent() -> str | None:
    """tmpfs when available: etcd fsyncs every write, which is slow on a shared disk."""
    configured = os.environ.get("VMHA_CONTROLPLANE_TMPDIR")
    if configured:
        return configured
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _kubeconfig(server: str, ca_pem: bytes, user: str, credentials: dict[str, str]) -> str:
    cluster, context = "vmha-local", f"{user}@vmha-local"
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": cluster,
                    "cluster": {"server": server, "certificate-authority-data": _b64(ca_pem)},
                }
            ],
            "users": [{"name": user, "user": credentials}],
            "contexts": [{"name": context, "context": {"cluster": cluster, "user": user}}],
            "current-context": context,
        },
        sort_keys=False,
    )


def _file_name(identity: str) -> str:
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in identity)


def _wait_until(
    condition: Callable[[], bool],
    timeout: float,
    describe: str,
    interval: float = 0.2,
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {describe}")
        time.sleep(interval)


class _CrdLoader(yaml.SafeLoader):
    """YAML 1.1's `=` "value" tag is a plain string to Kubernetes (it occurs in enums)."""


def _value_as_string(loader: _CrdLoader, node: yaml.Node) -> str:
    return str(loader.construct_scalar(cast(yaml.ScalarNode, node)))


_CrdLoader.add_constructor("tag:yaml.org,2002:value", _value_as_string)


def _load_crds(path: Path) -> list[dict[str, Any]]:
    """The CustomResourceDefinition documents in a YAML file (other kinds are not CRDs)."""
    with path.open() as stream:
        documents = list(yaml.load_all(stream, Loader=_CrdLoader))
    return [
        doc
        for doc in documents
        if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition"
    ]


def _yaml_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(path for path in directory.rglob("*") if path.suffix in (".yaml", ".yml"))


# --- the control plane ------------------------------------------------------------------------


class ControlPlane(Runner):
    """etcd + kube-apiserver on loopback, with CRDs installed. Use as a context manager."""

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        install_crds: bool = True,
        vmha_crds_dir: Path = VMHA_CRDS_DIR,
        prometheus_crds: Iterable[str] = PROMETHEUS_OPERATOR_CRDS,
        startup_timeout: float = STARTUP_TIMEOUT,
        tools: Toolchain | None = None,
    ) -> None:
        """`workdir`: where certificates, kubeconfigs, logs and etcd's data go; kept after
        `stop()` when given, else a temporary directory (on tmpfs if possible) that is removed."""
        self._requested_workdir = workdir
        self._install_crds = install_crds
        self._vmha_crds_dir = vmha_crds_dir
        self._prometheus_crds = tuple(prometheus_crds)
        self._startup_timeout = startup_timeout
        self._tools = tools
        self._workdir: Path | None = None
        self._servers: list[Child] = []
        self._api: k8s.ApiClient | None = None
        self._ca: CertificateAuthority | None = None
        self._server_url = ""
        self.timings: dict[str, float] = {}
        """Seconds spent per startup phase (pki, etcd, kube-apiserver, crds, total)."""

    # -- lifecycle --

    def start(self) -> Self:
        if self._workdir is not None:
            raise RuntimeError("this control plane was already started")
        started = time.monotonic()
        self._tools = self._tools or ensure_toolchain()
        self._workdir = self._make_workdir()
        _running.add(self)
        try:
            self._timed("pki", self._write_pki)
            self._start_servers()
            self._api = self.api_client()
            self._timed("default-namespace", lambda: self._ensure_namespace_defaults("default"))
            if self._install_crds:
                self._timed("crds", self._install_all_crds)
        except BaseException:
            self.stop()
            raise
        self.timings["total"] = time.monotonic() - started
        log.info("control plane ready at %s in %s", self._server_url, self.describe_timings())
        return self

    def stop(self) -> None:
        """Stops kube-apiserver, then etcd (SIGTERM, SIGKILL after a timeout). Idempotent."""
        if self._api is not None:
            api: Any = self._api  # ApiClient.close() is not annotated
            api.close()
            self._api = None
        for server in reversed(self._servers):
            server.stop(STOP_TIMEOUT)
        _running.discard(self)
        if self._workdir is not None and self._requested_workdir is None:
            shutil.rmtree(self._workdir, ignore_errors=True)

    # -- what callers use --

    @property
    def workdir(self) -> Path:
        return self._require(self._workdir)

    @property
    def tools(self) -> Toolchain:
        return self._require(self._tools)

    @property
    def server_url(self) -> str:
        return self._require(self._server_url or None)

    @property
    def kubeconfig_path(self) -> Path:
        """The admin kubeconfig (user `vmha-admin` in group `system:masters`)."""
        return self.workdir / "admin.kubeconfig"

    @property
    def ca_path(self) -> Path:
        """The cluster CA certificate: trusted for the apiserver and for webhook caBundles."""
        return self.workdir / "pki" / "ca.crt"

    @property
    def ca(self) -> CertificateAuthority:
        """The cluster CA (with its key): signs client and webhook serving certificates."""
        return self._require(self._ca)

    @property
    def servers(self) -> tuple[Child, ...]:
        """etcd and kube-apiserver, in start order."""
        return tuple(self._servers)

    @property
    def pids(self) -> list[int]:
        """Process ids of etcd and kube-apiserver, in start order."""
        return [server.pid for server in self._servers if server.pid is not None]

    def running(self) -> bool:
        return bool(self._servers) and all(server.running for server in self._servers)

    def describe_timings(self) -> str:
        return ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.timings.items())

    def client_configuration(self) -> k8s.Configuration:
        configuration = k8s.Configuration()
        configuration.host = self.server_url
        configuration.ssl_ca_cert = str(self.ca_path)
        configuration.cert_file = str(self._admin_cert_path)
        configuration.key_file = str(self._admin_key_path)
        return configuration

    def api_client(self) -> k8s.ApiClient:
        """A new admin ApiClient of the kubernetes package (the caller closes it)."""
        return k8s.ApiClient(self.client_configuration())

    def kubectl(
        self,
        *args: str,
        input: str | None = None,
        check: bool = True,
        kubeconfig: Path | None = None,
        timeout: float = KUBECTL_TIMEOUT,
    ) -> subprocess.CompletedProcess[str]:
        """Runs the built kubectl against this control plane (admin unless `kubeconfig`).

        Raises KubectlError (with stderr) on failure when `check`; else returns the result.
        """
        argv = [
            str(self.tools.kubectl),
            f"--kubeconfig={kubeconfig or self.kubeconfig_path}",
            f"--cache-dir={self.workdir / 'kubectl-cache'}",
            *args,
        ]
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and result.returncode != 0:
            raise KubectlError(result)
        return result

    def create_namespace(self, name: str | None = None, *, prefix: str = "test-") -> str:
        """Creates a namespace as a full cluster would have it: with its `default`
        ServiceAccount and `kube-root-ca.crt` ConfigMap (controller-manager's job, which does
        not run here). Returns its name (random after `prefix` unless `name`)."""
        name = name or f"{prefix}{secrets.token_hex(4)}"
        k8s.CoreV1Api(self._admin).create_namespace(
            k8s.V1Namespace(metadata=k8s.V1ObjectMeta(name=name))
        )
        self._ensure_namespace_defaults(name)
        return name

    def delete_namespace(self, name: str) -> None:
        """Deletes a namespace. Without the namespace controller it stays `Terminating` and
        keeps its objects, but accepts no new ones."""
        with contextlib.suppress(ApiException):
            k8s.CoreV1Api(self._admin).delete_namespace(name)

    def kubeconfig_for_user(self, user: str, groups: Sequence[str] = ()) -> Path:
        """A kubeconfig authenticating as `user` in `groups` by a client certificate.

        For a ServiceAccount's identity without a token, use user
        `system:serviceaccount:<ns>:<name>` with groups `system:serviceaccounts` and
        `system:serviceaccounts:<ns>`: RBAC bindings to the ServiceAccount then apply.
        """
        cert = self.ca.issue_client_certificate(user, groups)
        credentials = {
            "client-certificate-data": _b64(cert.cert_pem),
            "client-key-data": _b64(cert.key_pem),
        }
        return self._write_kubeconfig(user, credentials)

    def kubeconfig_for_service_account(
        self, namespace: str, name: str, *, expiration_seconds: int = 3600
    ) -> Path:
        """A kubeconfig with a real token for ServiceAccount `namespace/name` (TokenRequest),
        as a pod of that ServiceAccount would have. The ServiceAccount must exist."""
        request = k8s.AuthenticationV1TokenRequest(
            # No audiences: the token is for the apiserver itself.
            spec=k8s.V1TokenRequestSpec(audiences=[], expiration_seconds=expiration_seconds)
        )
        issued = k8s.CoreV1Api(self._admin).create_namespaced_service_account_token(
            name, namespace, request
        )
        token = issued.status.token if issued.status else None
        if not token:
            raise RuntimeError(f"TokenRequest for {namespace}/{name} returned no token")
        user = f"system:serviceaccount:{namespace}:{name}"
        return self._write_kubeconfig(user, {"token": token})

    def issue_serving_certificate(
        self, hosts: Sequence[str] = ("127.0.0.1", "localhost"), name: str = "webhook"
    ) -> tuple[Path, Path]:
        """A serving certificate signed by the cluster CA (for a webhook server the apiserver
        calls: use `ca_path`'s content as the webhook's caBundle). Returns (cert, key) paths."""
        directory = self.workdir / "serving"
        directory.mkdir(exist_ok=True)
        return self.ca.issue_server_certificate(hosts).write(directory, _file_name(name))

    def install_crd_files(self, paths: Iterable[Path]) -> list[str]:
        """Creates the CRDs in `paths` and waits until each is Established. Returns their
        names."""
        extensions = k8s.ApiextensionsV1Api(self._admin)
        names = []
        for path in paths:
            for crd in _load_crds(path):
                name = crd["metadata"]["name"]
                try:
                    # The client sends a dict body as it is; no need to build the model.
                    extensions.create_custom_resource_definition(
                        cast(k8s.V1CustomResourceDefinition, crd)
                    )
                except ApiException as error:
                    raise ControlPlaneError(
                        f"{path}: the apiserver refused CRD {name}: {error.body}"
                    ) from error
                names.append(name)
        for name in names:
            self._wait_established(extensions, name)
        return names

    # -- internals --

    @property
    def _admin_cert_path(self) -> Path:
        return self.workdir / "pki" / f"{ADMIN_USER}.crt"

    @property
    def _admin_key_path(self) -> Path:
        return self.workdir / "pki" / f"{ADMIN_USER}.key"

    @property
    def _admin(self) -> k8s.ApiClient:
        return self._require(self._api)

    @staticmethod
    def _require(value: _T | None) -> _T:
        if value is None:
            raise RuntimeError("the control plane is not started")
        return value

    def _timed(self, phase: str, action: Callable[[], object]) -> None:
        started = time.monotonic()
        action()
        self.timings[phase] = time.monotonic() - started

    def _make_workdir(self) -> Path:
        if self._requested_workdir is not None:
            self._requested_workdir.mkdir(parents=True, exist_ok=True)
            return self._requested_workdir
        return Path(tempfile.mkdtemp(prefix="vmha-controlplane-", dir=_default_workdir_parent()))

    def _write_pki(self) -> None:
        pki = self.workdir / "pki"
        pki.mkdir(exist_ok=True)
        self._ca = CertificateAuthority.create("vmha-local-ca")
        self._ca.write(pki, "ca")
        self._ca.issue_server_certificate(SERVING_HOSTS).write(pki, "apiserver")
        SigningKey.generate().write(pki, "service-account")
        admin: IssuedCertificate = self._ca.issue_client_certificate(ADMIN_USER, ["system:masters"])
        admin.write(pki, ADMIN_USER)

    def _start_servers(self) -> None:
        for attempt in range(1, PORT_START_ATTEMPTS + 1):
            try:
                self._start_servers_once()
                return
            except _PortInUse as error:
                for server in reversed(self._servers):
                    server.stop(STOP_TIMEOUT)
                self._servers.clear()
                if attempt == PORT_START_ATTEMPTS:
                    raise
                log.info("retrying with other ports: %s", error)

    def _start_servers_once(self) -> None:
        # A server may still find its port taken when it binds it: see _PortInUse.
        etcd_port, etcd_peer_port, apiserver_port = free_ports(3)
        etcd_url = f"http://127.0.0.1:{etcd_port}"
        self._timed("etcd", lambda: self._start_etcd(etcd_url, etcd_peer_port))
        self._server_url = f"https://127.0.0.1:{apiserver_port}"
        self._timed("kube-apiserver", lambda: self._start_apiserver(etcd_url, apiserver_port))
        self.kubeconfig_path.write_text(
            _kubeconfig(
                self._server_url,
                self.ca.cert_pem,
                ADMIN_USER,
                {
                    "client-certificate-data": _b64(self._admin_cert_path.read_bytes()),
                    "client-key-data": _b64(self._admin_key_path.read_bytes()),
                },
            )
        )

    def _start_etcd(self, client_url: str, peer_port: int) -> None:
        peer_url = f"http://127.0.0.1:{peer_port}"
        data_dir = self.workdir / "etcd"
        shutil.rmtree(data_dir, ignore_errors=True)  # a retry starts from scratch
        argv = [
            str(self.tools.etcd),
            "--name=vmha",
            f"--data-dir={data_dir}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=vmha={peer_url}",
            "--initial-cluster-state=new",
            "--logger=zap",
            "--log-level=warn",
        ]
        server = _spawn("etcd", argv, self.workdir / "etcd.log")
        self._servers.append(server)
        self._wait_healthy(server, f"{client_url}/health", None)

    def _start_apiserver(self, etcd_url: str, port: int) -> None:
        pki = self.workdir / "pki"
        argv = [
            str(self.tools.kube_apiserver),
            f"--etcd-servers={etcd_url}",
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            f"--secure-port={port}",
            f"--cert-dir={self.workdir / 'apiserver'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
            f"--service-account-key-file={pki / 'service-account.pub'}",
            f"--service-account-signing-key-file={pki / 'service-account.key'}",
            f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
            # RBAC so that the chart's roles are really checked; Node for node identities.
            "--authorization-mode=Node,RBAC",
            # The node agent's DaemonSet is privileged; server-side dry-runs must accept it.
            "--allow-privileged=true",
            "--profiling=false",
        ]
        # The default admission plugins include MutatingAdmissionWebhook and
        # ValidatingAdmissionWebhook, which the operator's webhooks need.
        server = _spawn("kube-apiserver", argv, self.workdir / "kube-apiserver.log")
        self._servers.append(server)
        self._wait_healthy(server, f"{self._server_url}/readyz", self._admin_tls_context())

    def _admin_tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_path))
        context.load_cert_chain(self._admin_cert_path, self._admin_key_path)
        return context

    def _wait_healthy(self, server: Child, url: str, context: ssl.SSLContext | None) -> None:
        healthy = HttpProbe(url, context=context)
        try:
            server.wait_until(healthy, f"healthy at {url}", self._startup_timeout, poll=0.25)
        except ChildError as error:
            last = "" if not server.running else f" (last answer: {healthy.last})"
            self._fail(f"{error.reason}{last}")

    def _fail(self, reason: str) -> NoReturn:
        tails = "\n".join(
            f"--- last lines of {server.name} ({server.log_path}) ---\n"
            f"{server.log_tail(LOG_TAIL_LINES)}"
            for server in self._servers
        )
        message = f"control plane did not start: {reason}\n{tails}"
        if any(
            not server.running and "address already in use" in server.log_tail(200)
            for server in self._servers
        ):
            raise _PortInUse(message)
        raise ControlPlaneError(message)

    def _ensure_namespace_defaults(self, namespace: str) -> None:
        core = k8s.CoreV1Api(self._admin)
        # The apiserver creates `default` itself, shortly after it reports ready.
        _wait_until(
            lambda: self._exists(lambda: core.read_namespace(namespace)),
            CRD_ESTABLISHED_TIMEOUT,
            f"namespace {namespace}",
        )
        objects: list[tuple[Callable[..., object], dict[str, Any]]] = [
            (core.create_namespaced_service_account, {"metadata": {"name": "default"}}),
            (
                core.create_namespaced_config_map,
                {
                    "metadata": {"name": "kube-root-ca.crt"},
                    "data": {"ca.crt": self.ca.cert_pem.decode()},
                },
            ),
        ]
        for create, body in objects:
            try:
                create(namespace, body)
            except ApiException as error:
                if error.status != 409:  # already there
                    raise

    @staticmethod
    def _exists(read: Callable[[], object]) -> bool:
        try:
            read()
        except ApiException as error:
            if error.status == 404:
                return False
            raise
        return True

    def _install_all_crds(self) -> None:
        vmha_files = _yaml_files(self._vmha_crds_dir)
        self.install_crd_files([KUBEVIRT_CRDS, *vmha_files])
        directory = self.tools.prometheus_operator_crds
        self.install_crd_files(
            directory / f"monitoring.coreos.com_{plural}.yaml" for plural in self._prometheus_crds
        )

    def _wait_established(self, extensions: k8s.ApiextensionsV1Api, name: str) -> None:
        def established() -> bool:
            status = extensions.read_custom_resource_definition(name).status
            conditions = {c.type: c for c in (status.conditions or [])} if status else {}
            names_accepted = conditions.get("NamesAccepted")
            if names_accepted is not None and names_accepted.status == "False":
                raise ControlPlaneError(f"CRD {name} rejected: {names_accepted.message}")
            established = conditions.get("Established")
            return established is not None and established.status == "True"

        _wait_until(established, CRD_ESTABLISHED_TIMEOUT, f"CRD {name} to be Established")

    def _write_kubeconfig(self, user: str, credentials: dict[str, str]) -> Path:
        directory = self.workdir / "kubeconfigs"
        directory.mkdir(exist_ok=True)
        path = directory / f"{_file_name(user)}.kubeconfig"
        path.touch(mode=0o600, exist_ok=True)
        path.write_text(_kubeconfig(self.server_url, self.ca.cert_pem, user, credentials))
        return path


# --- developer entry point --------------------------------------------------------------------


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None, out: IO[str] = sys.stdout) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vmha_testbed.controlplane",
        description="Run a local etcd + kube-apiserver with vmha's CRDs until Ctrl-C.",
    )
    parser.add_argument("--workdir", type=Path, help="keep certificates, logs and data here")
    parser.add_argument("--no-crds", action="store_true", help="install no CRDs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # SIGTERM stops as cleanly as Ctrl-C: both unwind through ControlPlane.__exit__.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        with ControlPlane(workdir=args.workdir, install_crds=not args.no_crds) as control_plane:
            _print_usage(control_plane, out)
            while control_plane.running():
                time.sleep(1.0)
            print("a control plane process exited; stopping", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        print("stopped", file=out)
        return 0


def _print_usage(control_plane: ControlPlane, out: IO[str]) -> None:
    print(f"server:     {control_plane.server_url}", file=out)
    print(f"kubeconfig: {control_plane.kubeconfig_path}", file=out)
    print(f"kubectl:    {control_plane.tools.kubectl}", file=out)
    print(f"logs:       {control_plane.workdir}/*.log", file=out)
    processes = ", ".join(f"{server.name} (pid {server.pid})" for server in control_plane.servers)
    print(f"processes:  {processes}", file=out)
    print(f"\nexport KUBECONFIG={control_plane.kubeconfig_path}", file=out)
    print("\nCtrl-C stops it.", file=out, flush=True)


if __name__ == "__main__":
    sys.exit(main())
