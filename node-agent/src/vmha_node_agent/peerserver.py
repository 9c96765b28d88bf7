"""The agent's HTTPS endpoint for other agents (broadcast copies) and the operator (votes).

Every request is authenticated before its body is read (`peerauth.py`: client certificate
from the agents' CA, then the bearer token through TokenReview), then authorised for what
it asks; refusals answer 403 with the reason and are counted in `vmha_peer_refused_total`,
and every answer in `vmha_peer_served_total{path,code}`. When a token cannot be checked
(the apiserver unreachable) the answer is 503.

Threat model, briefly: anything that is not an agent or the operator (no certificate from
the agents' CA) is refused. An agent may forward broadcasts only from VMs that run on its
own node (per the receiver's VMI watch), and only to members on the receiver's node; so a
compromised VM, or an agent told lies by its guest, cannot speak for another VM. Only the
operator's ServiceAccount may ask for votes. Out of scope: a compromised node — its agent's
credentials can forward what that node's VMs could send, and already allow much more
(the agents' RBAC).
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from vmha_node_agent.config import MessagingConfig
from vmha_node_agent.messenger import GroupMessenger
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.peerapi import (
    BROADCAST_PATH,
    MAX_BATCH,
    VOTES_PATH,
    BroadcastBatch,
    BroadcastResult,
    Problem,
    VoteRequest,
)
from vmha_node_agent.peerauth import Identity, authorize_agent, authorize_operator, bearer_token
from vmha_node_agent.ratelimit import LogThrottle
from vmha_node_agent.routing import Refusal
from vmha_node_agent.tls import RotatingContexts
from vmha_node_agent.tokens import ReviewUnavailable, TokenReviewer
from vmha_node_agent.votes import VoteBox
from vmha_node_agent.web import bound_port
from vmha_protocol import limits

log = logging.getLogger(__name__)
M = TypeVar("M", bound=BaseModel)

# A full batch of the largest broadcasts, JSON-escaped, with room to spare.
MAX_BODY_BYTES: Final = MAX_BATCH * (limits.MAX_BROADCAST_BYTES * 2 + 16 * 1024)


class _Refused(Exception):
    def __init__(self, status: int, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.detail = detail


Handler = Callable[[web.Request], Awaitable[web.Response]]


class PeerServer:
    def __init__(
        self,
        config: MessagingConfig,
        metrics: AgentMetrics,
        reviewer: TokenReviewer,
        messenger: GroupMessenger,
        votes: VoteBox,
    ) -> None:
        self._metrics = metrics
        self._reviewer = reviewer
        self._messenger = messenger
        self._votes = votes
        self._agent_user = config.account(config.agent_service_account)
        self._operator_user = config.account(config.operator_service_account)
        # Refusals are counted one by one; the log says each kind now and then, so that
        # a caller knocking all day cannot fill it.
        self._refusal_log = LogThrottle(interval_s=5.0)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY_BYTES)
        app.router.add_post(BROADCAST_PATH, self._counted(BROADCAST_PATH, self._broadcast))
        app.router.add_post(VOTES_PATH, self._counted(VOTES_PATH, self._vote))
        return app

    # -- endpoints -------------------------------------------------------------------------

    async def _broadcast(self, request: web.Request) -> web.Response:
        has_cert, identity = await self._caller(request)
        node = authorize_agent(has_cert, identity, self._agent_user)
        if isinstance(node, Refusal):
            raise self._refuse(node)
        batch = await _body(request, BroadcastBatch)
        refused: Counter[str] = Counter()
        delivered = 0
        for message in batch.messages:
            outcome = self._messenger.deliver_from_peer(node, message)
            if isinstance(outcome, Refusal):
                refused[outcome.value] += 1
            else:
                delivered += outcome
        result = BroadcastResult(delivered=delivered, refused=dict(refused))
        if refused and sum(refused.values()) == len(batch.messages):
            reason = refused.most_common(1)[0][0]
            self._log_refusal("broadcasts from the agent of %s: %s", node, dict(refused))
            return _json(403, Problem(error=reason, detail=f"refused: {dict(refused)}"))
        return _json(200, result)

    async def _vote(self, request: web.Request) -> web.Response:
        has_cert, identity = await self._caller(request)
        refusal = authorize_operator(has_cert, identity, self._operator_user)
        if refusal is not None:
            raise self._refuse(refusal)
        vote = await _body(request, VoteRequest)
        return _json(200, await self._votes.decide(vote))

    # -- helpers ---------------------------------------------------------------------------

    async def _caller(self, request: web.Request) -> tuple[bool, Identity | None]:
        """Whether the caller showed a certificate from our CA, and whose token it sent (a
        caller without a certificate is refused before its token costs a review)."""
        transport = request.transport
        has_cert = bool(transport.get_extra_info("peercert")) if transport is not None else False
        token = bearer_token(request.headers.get("Authorization"))
        if not has_cert or token is None:
            return has_cert, None
        try:
            return True, await self._reviewer.review(token)
        except ReviewUnavailable as error:
            raise _Refused(503, "review_unavailable", str(error)) from None

    def _log_refusal(self, what: str, *args: object) -> None:
        if self._refusal_log.allow():
            suppressed = self._refusal_log.take_suppressed()
            more = f" (+{suppressed} more refusals not logged)" if suppressed else ""
            log.warning("refused " + what + more, *args)

    def _refuse(self, refusal: Refusal) -> _Refused:
        self._metrics.peer_refused.labels(refusal.value).inc()
        return _Refused(403, refusal.value)

    def _counted(self, path: str, handler: Handler) -> Handler:
        async def counted(request: web.Request) -> web.Response:
            try:
                response = await handler(request)
            except _Refused as refused:
                if refused.status == 403:
                    self._log_refusal("%s from %s: %s", path, request.remote, refused.reason)
                elif refused.reason == Refusal.MALFORMED:
                    self._metrics.peer_refused.labels(refused.reason).inc()
                problem = Problem(error=refused.reason, detail=refused.detail)
                response = _json(refused.status, problem)
            self._metrics.peer_served.labels(path, str(response.status)).inc()
            return response

        return counted


async def _body(request: web.Request, model: type[M]) -> M:
    try:
        return model.model_validate_json(await request.read())
    except ValidationError as error:
        raise _Refused(400, Refusal.MALFORMED.value, str(error)[:500]) from None
    except web.HTTPRequestEntityTooLarge:
        raise _Refused(413, Refusal.MALFORMED.value, "body too large") from None


def _json(status: int, body: BaseModel) -> web.Response:
    return web.Response(status=status, text=body.model_dump_json(), content_type="application/json")


class PeerService:
    """Serves `PeerServer` over mutual TLS until cancelled; publishes its URL once bound."""

    TLS_CHECK_S: Final = 60.0

    def __init__(
        self,
        server: PeerServer,
        config: MessagingConfig,
        contexts: RotatingContexts,
        advertise: str,
    ) -> None:
        self._server = server
        self._config = config
        self._contexts = contexts
        self._advertise = advertise
        self._port: int | None = None

    def url(self) -> str | None:
        if self._port is None:
            return None
        host = f"[{self._advertise}]" if ":" in self._advertise else self._advertise
        return f"https://{host}:{self._port}"

    async def run(self) -> None:
        # At shutdown a vote in flight gets a moment, not a minute: the operator accepts
        # when the agent does not answer.
        runner = web.AppRunner(self._server.app(), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        try:
            site = web.TCPSite(
                runner, self._config.address, self._config.port, ssl_context=self._contexts.server
            )
            await site.start()
            self._port = bound_port(runner)
            log.info(
                "serving other agents on %s (listening on %s)", self.url(), self._config.address
            )
            while True:
                await asyncio.sleep(self.TLS_CHECK_S)
                self._contexts.reload_if_changed()
        finally:
            self._port = None
            await runner.cleanup()
