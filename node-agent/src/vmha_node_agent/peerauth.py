"""Who is calling the agent's HTTPS endpoint, and what they may do. Pure decisions.

Two things are checked on every request:

1. mutual TLS: the caller presents a certificate signed by the agents' CA (only agents and
   the operator hold one). A caller without a certificate completes the handshake (the
   server asks for one but does not require it) so that it can be refused and counted;
   a certificate from another CA fails the handshake.
2. a ServiceAccount token (`Authorization: Bearer`), validated by the apiserver's
   TokenReview with the agents' audience: it says which ServiceAccount calls, and — for a
   token bound to a pod — on which node that pod runs
   (`authentication.kubernetes.io/node-name` in the review's extra). The certificate is
   shared by all agents; the token tells them apart.

A broadcast is accepted only from the agents' ServiceAccount with a node-bound token; a
vote only from the operator's ServiceAccount. What a broadcast may claim is decided in
`routing.accept_from_peer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from vmha_node_agent.routing import Refusal

NODE_NAME_EXTRA: Final = "authentication.kubernetes.io/node-name"


@dataclass(frozen=True)
class Identity:
    """What TokenReview says about a token (`authenticated` False: it is not valid)."""

    authenticated: bool
    username: str = ""
    node: str | None = None
    expires_at: float | None = None  # Unix time, from the token's `exp`
    error: str = ""

    @classmethod
    def from_review(cls, review: dict[str, Any], expires_at: float | None) -> Identity:
        status = review.get("status") or {}
        if not status.get("authenticated"):
            return cls(False, error=str(status.get("error") or "not authenticated"))
        user = status.get("user") or {}
        nodes = (user.get("extra") or {}).get(NODE_NAME_EXTRA) or []
        return cls(
            True,
            username=str(user.get("username") or ""),
            node=str(nodes[0]) if nodes else None,
            expires_at=expires_at,
        )


def authorize_agent(has_cert: bool, identity: Identity | None, agent_user: str) -> str | Refusal:
    """The node of the agent calling, or why the call is refused."""
    refusal = _authenticate(has_cert, identity, agent_user)
    if refusal is not None:
        return refusal
    assert identity is not None
    if not identity.node:
        return Refusal.NO_NODE
    return identity.node


def authorize_operator(
    has_cert: bool, identity: Identity | None, operator_user: str
) -> Refusal | None:
    return _authenticate(has_cert, identity, operator_user)


def _authenticate(has_cert: bool, identity: Identity | None, user: str) -> Refusal | None:
    if not has_cert:
        return Refusal.NO_CLIENT_CERT
    if identity is None or not identity.authenticated:
        return Refusal.BAD_TOKEN
    if identity.username != user:
        return Refusal.WRONG_SERVICE_ACCOUNT
    return None


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
