"""The operator's run-time configuration, as the command line sets it."""

from __future__ import annotations

import dataclasses

from vmha_operator.membership import ChannelSettings
from vmha_operator.votes import VoteSettings


@dataclasses.dataclass(frozen=True)
class WebhookConfig:
    """The admission webhook server and, optionally, the configurations kopf keeps for it."""

    listen_address: str = "127.0.0.1"
    # 0: any free port (only useful with managed configurations, which learn it).
    port: int = 9443
    # Host name or IP the apiserver uses in managed configurations; default: listen_address.
    host: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    # CA bundle put into managed configurations (the CA that signed cert_file).
    ca_file: str | None = None
    # Name of the Validating/MutatingWebhookConfiguration that kopf creates and keeps up to
    # date; None: the configurations are provided from outside (the Helm chart).
    managed: str | None = None


@dataclasses.dataclass(frozen=True)
class OperatorConfig:
    kubeconfig: str | None = None
    # Namespaces to serve; empty: the whole cluster.
    namespaces: tuple[str, ...] = ()
    channel: ChannelSettings = dataclasses.field(default_factory=ChannelSettings)
    webhook: WebhookConfig = dataclasses.field(default_factory=WebhookConfig)
    # Who we are in Events (reportingInstance): the pod name in a cluster.
    instance: str = "vmha-operator"
    # How to ask guests for their vote on revocable actions (off without TLS and token).
    votes: VoteSettings = dataclasses.field(default_factory=VoteSettings)

    def covers(self, namespace: str | None) -> bool:
        """Whether this operator is responsible for objects in `namespace`."""
        return not self.namespaces or (namespace or "") in self.namespaces
