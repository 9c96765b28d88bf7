"""TLS contexts for the agent's HTTPS endpoint and for calls to other agents.

All agents share one CA and certificate (the chart's Secret), so a peer cannot be told
apart by its certificate, only recognised as one of us: the client checks the server's
chain against the agents' CA but not its host name (agents are reached by pod IP, which
no shared certificate names); the server asks every caller for a certificate from that
CA. Which node a caller speaks for comes from its token (`peerauth.py`).

The server does not *require* a client certificate at the TLS layer: a caller without one
reaches the handler, is refused with 403 and counted (`no_client_cert`). A certificate from
another CA still fails the handshake.

Certificates rotate (cert-manager renews the Secret, the kubelet updates the files):
`reload_if_changed` builds fresh contexts from the new files. A fresh context, not the old one
with the new files added: after a CA renewal the old CA must stop being trusted. The
listening socket keeps the context it was created with, whose SNI callback (called for every
handshake, with or without a server name) hands each new connection the current one; the
client side asks for `client` each time it opens connections.
"""

from __future__ import annotations

import logging
import ssl
from pathlib import Path

from vmha_node_agent.config import PeerTLS

log = logging.getLogger(__name__)


def server_context(tls: PeerTLS) -> ssl.SSLContext:
    assert tls.ca_file is not None and tls.cert_file is not None and tls.key_file is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(tls.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def client_context(tls: PeerTLS) -> ssl.SSLContext:
    assert tls.ca_file is not None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # one certificate for all agents; the CA is the check
    context.verify_mode = ssl.CERT_REQUIRED
    cert, key = tls.client_pair()
    context.load_cert_chain(cert, key)
    return context


class RotatingContexts:
    """The server and client contexts, replaced when their files change."""

    def __init__(self, tls: PeerTLS) -> None:
        self._tls = tls
        self._current_server = server_context(tls)
        self.client = client_context(tls)
        # Bound to the listening socket for good; every handshake switches to the current one.
        self.server = server_context(tls)
        self.server.sni_callback = self._select_current
        self._stamps = self._mtimes()

    def _select_current(
        self, connection: ssl.SSLObject, server_name: str | None, _: ssl.SSLContext
    ) -> None:
        connection.context = self._current_server

    def reload_if_changed(self) -> bool:
        stamps = self._mtimes()
        if stamps == self._stamps:
            return False
        try:
            server, client = server_context(self._tls), client_context(self._tls)
        except (OSError, ssl.SSLError) as error:
            # Mid-rotation (certificate and key from different generations): next time.
            log.warning("TLS files changed but could not be loaded yet: %s", error)
            return False
        self._current_server, self.client = server, client
        self._stamps = stamps
        log.info("TLS certificates reloaded")
        return True

    def _mtimes(self) -> tuple[float, ...]:
        tls = self._tls
        paths = [tls.ca_file, tls.cert_file, tls.key_file, *tls.client_pair()]
        stamps = []
        for path in paths:
            try:
                stamps.append(Path(str(path)).stat().st_mtime)
            except OSError:
                stamps.append(-1.0)
        return tuple(stamps)
