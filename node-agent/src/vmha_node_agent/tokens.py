"""ServiceAccount tokens between agents: ours to send, theirs to check.

`TokenFile` reads this agent's projected, pod-bound token (the kubelet rotates it; the file
is read again when it changes). `TokenReviewer` asks the apiserver (TokenReview, with the
agents' audience) who a caller's token belongs to, and keeps the verdict until the token
expires (at most `token_cache_max_s`: a bound token also dies with its pod, which the
cache cannot see), a refusal for a short while; concurrent requests with one token share
one review, and reviews are rate-limited so that a flood of made-up tokens cannot become a
flood of API requests.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from vmha_node_agent.kubeapi import TOKENREVIEWS, KubeApi, KubeError
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.peerauth import Identity
from vmha_node_agent.ratelimit import TokenBucket

log = logging.getLogger(__name__)

REFUSAL_CACHE_S: Final = 10.0
MAX_CACHED: Final = 4096
MAX_TOKEN_BYTES: Final = 16 * 1024
FILE_CHECK_S: Final = 5.0


class ReviewUnavailable(Exception):
    """The token could not be checked now (API unreachable, review budget spent)."""


class TokenFile:
    def __init__(self, path: Path, clock: Callable[[], float] = time.monotonic) -> None:
        self._path = path
        self._clock = clock
        self._token = ""
        self._mtime = -1.0
        self._checked = -FILE_CHECK_S

    def current(self) -> str:
        """The token, read again when the file changed (looked at every few seconds)."""
        now = self._clock()
        if now - self._checked >= FILE_CHECK_S or not self._token:
            self._checked = now
            try:
                mtime = self._path.stat().st_mtime
                if mtime != self._mtime:
                    self._token = self._path.read_text().strip()
                    self._mtime = mtime
            except OSError as error:
                log.warning("cannot read the agent token %s: %s", self._path, error)
        return self._token


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, unverified (only used to bound how long a verdict the
    apiserver gave is kept)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp") if isinstance(claims, dict) else None
        return float(exp) if isinstance(exp, int | float) else None
    except (IndexError, ValueError):
        return None


class TokenReviewer:
    def __init__(
        self,
        api: KubeApi,
        audience: str,
        metrics: AgentMetrics,
        *,
        cache_max_s: float,
        reviews_per_second: float,
        review_burst: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self._audience = audience
        self._metrics = metrics
        self._cache_max_s = cache_max_s
        self._budget = TokenBucket(reviews_per_second, review_burst)
        self._clock = clock
        self._cache: OrderedDict[str, tuple[Identity, float]] = OrderedDict()
        self._pending: dict[str, asyncio.Future[Identity]] = {}

    async def review(self, token: str) -> Identity:
        """Who `token` belongs to; raises ReviewUnavailable when that cannot be known now."""
        if len(token) > MAX_TOKEN_BYTES:
            return Identity(False, error="token too long")
        digest = hashlib.sha256(token.encode()).hexdigest()
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > self._clock():
            self._metrics.token_reviews.labels("cached").inc()
            return cached[0]
        pending = self._pending.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        if not self._budget.try_take():
            self._metrics.token_reviews.labels("rate_limited").inc()
            raise ReviewUnavailable("too many token reviews")
        future: asyncio.Future[Identity] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        try:
            identity = await self._ask(token)
        except ReviewUnavailable as error:
            future.set_exception(error)
            future.exception()  # retrieved: waiters get it through their own await
            raise
        except BaseException:
            future.cancel()  # the asking request went away; its waiters must not hang
            raise
        finally:
            self._pending.pop(digest, None)
        future.set_result(identity)
        self._remember(digest, identity)
        return identity

    async def _ask(self, token: str) -> Identity:
        body: dict[str, Any] = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": [self._audience]},
        }
        try:
            review = await self._api.request("review", TOKENREVIEWS, TOKENREVIEWS.path(), body=body)
        except KubeError as error:
            self._metrics.token_reviews.labels("error").inc()
            log.warning("TokenReview failed: %s", error)
            raise ReviewUnavailable(str(error)) from None
        identity = Identity.from_review(review or {}, token_expiry(token))
        self._metrics.token_reviews.labels("valid" if identity.authenticated else "invalid").inc()
        return identity

    def _remember(self, digest: str, identity: Identity) -> None:
        now = self._clock()
        if identity.authenticated:
            until = now + self._cache_max_s
            if identity.expires_at is not None:
                until = min(until, identity.expires_at)
        else:
            until = now + REFUSAL_CACHE_S
        self._cache[digest] = (identity, until)
        self._cache.move_to_end(digest)
        while len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)
