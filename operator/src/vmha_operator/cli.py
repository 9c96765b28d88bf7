"""`vmha-operator`: run the VMGroup operator (kopf) with its admission webhook server.

Production (the Helm chart provides certificate and webhook configurations):

    vmha-operator --webhook-listen-address 0.0.0.0 \\
        --webhook-cert-file /tls/tls.crt --webhook-key-file /tls/tls.key \\
        --peering vmha-operator --liveness http://0.0.0.0:8080/healthz

Development and tests (a throw-away CA; kopf writes the webhook configurations):

    vmha-operator --kubeconfig kubeconfig --namespace demo \\
        --webhook-host 127.0.0.1 --webhook-port 9443 --webhook-manage vmha-dev.vmha.io
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import kopf

from vmha_operator.certs import write_development_certificates
from vmha_operator.channel import DEFAULT_CHANNEL_PATH
from vmha_operator.config import OperatorConfig, WebhookConfig
from vmha_operator.handlers import build_registry, build_settings
from vmha_operator.membership import ChannelSettings
from vmha_operator.votes import VoteSettings

logger = logging.getLogger(__name__)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vmha-operator",
        description="vmha operator: VMGroup placement, admission, channel wiring and status.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    p.add_argument("--kubeconfig", help="kubeconfig file (default: in-cluster, then $KUBECONFIG)")
    p.add_argument(
        "--namespace",
        "-n",
        action="append",
        default=[],
        dest="namespaces",
        help="serve only this namespace (repeatable; default: the whole cluster)",
    )
    p.add_argument(
        "--peering",
        metavar="NAME",
        help="kopf peering object for active/standby replicas (needs kopf's peering CRDs); "
        "default: standalone",
    )
    p.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    p.add_argument(
        "--liveness", metavar="URL", help="kopf liveness endpoint, e.g. http://0.0.0.0:8080/healthz"
    )
    p.add_argument(
        "--instance",
        default=os.environ.get("POD_NAME") or socket.gethostname(),
        help="name of this replica in Events (default: $POD_NAME or the host name)",
    )
    hooks = p.add_argument_group("admission webhook server")
    hooks.add_argument("--webhook-listen-address", default="127.0.0.1")
    hooks.add_argument("--webhook-port", type=int, default=9443, help="0: any free port")
    hooks.add_argument(
        "--webhook-host",
        help="host name or IP the apiserver calls, in managed configurations and in the "
        "development certificate (default: the listen address)",
    )
    hooks.add_argument("--webhook-cert-file", help="serving certificate (PEM)")
    hooks.add_argument("--webhook-key-file", help="serving key (PEM)")
    hooks.add_argument(
        "--webhook-ca-file", help="CA bundle for managed configurations (the cert's issuer)"
    )
    hooks.add_argument(
        "--webhook-manage",
        metavar="NAME",
        help="let kopf create and update Validating/MutatingWebhookConfiguration NAME "
        "(development); without it the configurations come from the Helm chart",
    )
    channel = p.add_argument_group("vmha channel")
    channel.add_argument(
        "--hook-image", help="sidecar image for the channel hook (default: KubeVirt's sidecar-shim)"
    )
    channel.add_argument(
        "--channel-path",
        default=DEFAULT_CHANNEL_PATH,
        help="socket path of the vmha channel inside virt-launcher (default: %(default)s)",
    )
    votes = p.add_argument_group(
        "votes on revocable actions (off unless the four files are given)",
        "Before a group member is live-migrated or stopped, its guest is asked through the "
        "node agent of its node (mutual TLS with the agents' CA, and a token for them).",
    )
    votes.add_argument(
        "--agent-namespace",
        default=os.environ.get("POD_NAMESPACE") or "vmha-system",
        help="namespace of the node agents' Leases (default: $POD_NAMESPACE or vmha-system)",
    )
    votes.add_argument("--agent-ca-file", help="CA of the agents' certificates (PEM)")
    votes.add_argument("--agent-cert-file", help="client certificate for the agents (PEM)")
    votes.add_argument("--agent-key-file", help="its key (PEM)")
    votes.add_argument(
        "--agent-token-file",
        help="this operator's ServiceAccount token with the agents' audience (a projected "
        "volume, audience vmha.io/node-agent)",
    )
    votes.add_argument(
        "--vote-timeout",
        type=float,
        default=7.0,
        help="the most a guest gets to answer, in seconds (default %(default)s; keep it "
        "well below the webhooks' timeout of 10 s)",
    )
    logs = p.add_mutually_exclusive_group()
    logs.add_argument("--verbose", "-v", action="store_true")
    logs.add_argument("--debug", action="store_true")
    logs.add_argument("--quiet", "-q", action="store_true")
    return p


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    return OperatorConfig(
        kubeconfig=args.kubeconfig,
        namespaces=tuple(args.namespaces),
        channel=ChannelSettings(hook_image=args.hook_image, channel_path=args.channel_path),
        webhook=WebhookConfig(
            listen_address=args.webhook_listen_address,
            port=args.webhook_port,
            host=args.webhook_host,
            cert_file=args.webhook_cert_file,
            key_file=args.webhook_key_file,
            ca_file=args.webhook_ca_file,
            managed=args.webhook_manage,
        ),
        instance=args.instance,
        votes=VoteSettings(
            agent_namespace=args.agent_namespace,
            ca_file=args.agent_ca_file,
            cert_file=args.agent_cert_file,
            key_file=args.agent_key_file,
            token_file=args.agent_token_file,
            timeout_s=args.vote_timeout,
        ),
    )


def with_development_certificates(config: OperatorConfig, directory: Path) -> OperatorConfig:
    """Fill in a throw-away CA and serving certificate when none was given."""
    hook = config.webhook
    if hook.cert_file and hook.key_file:
        return config
    host = hook.host or hook.listen_address
    files = write_development_certificates(directory, [host, "localhost"])
    logger.info("webhook: development certificate for %s, CA in %s", host, files.ca_file)
    webhook = dataclasses.replace(
        hook,
        cert_file=str(files.cert_file),
        key_file=str(files.key_file),
        ca_file=str(files.ca_file),
    )
    return dataclasses.replace(config, webhook=webhook)


def operator_command() -> list[str]:
    """How to run `vmha-operator` from this installation: the script next to this
    interpreter, else `python -m vmha_operator`."""
    script = Path(sys.executable).parent / "vmha-operator"
    return [str(script)] if script.exists() else [sys.executable, "-m", "vmha_operator"]


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    kopf.configure(debug=args.debug, verbose=args.verbose, quiet=args.quiet)
    with tempfile.TemporaryDirectory(prefix="vmha-operator-") as scratch:
        config = with_development_certificates(config_from_args(args), Path(scratch))
        kopf.run(
            registry=build_registry(config),
            settings=build_settings(config),
            standalone=args.peering is None,
            peering_name=args.peering,
            priority=args.priority,
            liveness_endpoint=args.liveness,
            clusterwide=not config.namespaces,
            namespaces=config.namespaces,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
