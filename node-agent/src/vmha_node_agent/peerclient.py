"""Broadcast copies on their way to other nodes' agents: best-effort, never blocking.

`send()` only queues: one bounded queue per destination node (`messaging.peer_queue_size`;
a full queue drops the new copy). One worker per node drains its queue in order, up to
`peer_batch_size` copies per request, each request within `peer_timeout_s`, over HTTPS
with the agents' client certificate and this agent's token. A node whose agent failed to
answer is skipped for a while (`peer_retry_initial_s`, doubling to `peer_retry_max_s`):
its copies are dropped at once rather than queued behind a dead peer. Every copy that does
not arrive is counted in `vmha_messaging_dropped_total{reason}`:

| reason             | why |
|--------------------|-----|
| `queue_full`       | the node's queue was full (its agent is slower than the senders) |
| `peer_down`        | its Lease went stale before the copy left |
| `peer_unreachable` | the connection failed, or the node is being skipped after a failure |
| `peer_timeout`     | no answer within `peer_timeout_s` |
| `peer_refused`     | the other agent refused the copy (403; see its `vmha_peer_refused_total`) |
| `peer_error`       | any other answer |
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from vmha_node_agent.backoff import Backoff
from vmha_node_agent.config import MessagingConfig
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.peerapi import (
    BROADCAST_PATH,
    BroadcastBatch,
    BroadcastResult,
    ForwardedBroadcast,
)
from vmha_node_agent.tokens import TokenFile

log = logging.getLogger(__name__)


@dataclass
class _Outbox:
    queue: deque[ForwardedBroadcast] = field(default_factory=deque)
    worker: asyncio.Task[None] | None = None
    skip_until: float = 0.0
    backoff: Backoff | None = None
    failed_url: str | None = None  # skipping ends early when the node's agent moves


class PeerSender:
    """The `PeerLink` of the group messenger."""

    def __init__(
        self,
        config: MessagingConfig,
        metrics: AgentMetrics,
        endpoint: Callable[[str], str | None],
        token: TokenFile,
        tls: Callable[[], ssl.SSLContext],
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._endpoint = endpoint
        self._token = token
        self._tls = tls
        self._clock = clock
        self._outboxes: dict[str, _Outbox] = {}
        self._http: aiohttp.ClientSession | None = None
        self._http_tls: ssl.SSLContext | None = None
        self._queued = 0

    def peer_up(self, node: str) -> bool:
        return self._endpoint(node) is not None

    def send(self, node: str, message: ForwardedBroadcast) -> None:
        """Queue one copy for `node`'s agent; never waits."""
        outbox = self._outboxes.setdefault(node, _Outbox())
        copies = len(message.targets)
        if self._skipping(node, outbox):
            self._drop("peer_unreachable", copies)
            return
        if len(outbox.queue) >= self._config.peer_queue_size:
            self._drop("queue_full", copies)
            return
        outbox.queue.append(message)
        self._set_queued(self._queued + 1)
        if outbox.worker is None:
            outbox.worker = asyncio.get_running_loop().create_task(
                self._work(node, outbox), name=f"peer {node}"
            )

    async def run(self) -> None:
        """Until cancelled; then stop the workers and close the connections."""
        try:
            await asyncio.Event().wait()
        finally:
            workers = [o.worker for o in self._outboxes.values() if o.worker is not None]
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            if self._http is not None:
                await self._http.close()

    # -- the workers -----------------------------------------------------------------------

    async def _work(self, node: str, outbox: _Outbox) -> None:
        try:
            while outbox.queue:
                size = min(len(outbox.queue), self._config.peer_batch_size)
                batch = [outbox.queue.popleft() for _ in range(size)]
                self._set_queued(self._queued - size)
                await self._deliver(node, outbox, batch)
        finally:
            outbox.worker = None
            if outbox.queue:  # cancelled with copies waiting: they will not go
                self._drop("peer_unreachable", sum(len(m.targets) for m in outbox.queue))
                self._set_queued(self._queued - len(outbox.queue))
                outbox.queue.clear()

    async def _deliver(self, node: str, outbox: _Outbox, batch: list[ForwardedBroadcast]) -> None:
        copies = sum(len(m.targets) for m in batch)
        url = self._endpoint(node)
        if url is None:
            self._drop("peer_down", copies)
            return
        if self._skipping(node, outbox):
            self._drop("peer_unreachable", copies)
            return
        outcome = await self._post(url, BroadcastBatch.model_construct(messages=batch))
        self._metrics.peer_requests.labels(outcome).inc()
        if outcome == "ok":
            outbox.backoff, outbox.failed_url, outbox.skip_until = None, None, 0.0
            return
        self._drop(f"peer_{outcome}", copies)
        if outcome in ("unreachable", "timeout"):
            outbox.backoff = outbox.backoff or Backoff(
                self._config.peer_retry_initial_s, self._config.peer_retry_max_s
            )
            outbox.skip_until = self._clock() + outbox.backoff.next()
            outbox.failed_url = url

    def _skipping(self, node: str, outbox: _Outbox) -> bool:
        """Whether copies for `node` are dropped at once: its agent failed a moment ago and
        has not been replaced (a new agent publishes a new endpoint)."""
        if self._clock() >= outbox.skip_until:
            return False
        if self._endpoint(node) != outbox.failed_url:
            outbox.skip_until, outbox.backoff = 0.0, None
            return False
        return True

    async def _post(self, url: str, batch: BroadcastBatch) -> str:
        http = self._session()
        headers = {
            "Authorization": f"Bearer {self._token.current()}",
            "Content-Type": "application/json",
        }
        try:
            async with http.post(
                url + BROADCAST_PATH, data=batch.model_dump_json(), headers=headers
            ) as response:
                text = await response.text()
                if response.status == 200:
                    with contextlib.suppress(ValueError):
                        result = BroadcastResult.model_validate_json(text)
                        for reason, count in result.refused.items():
                            log.debug("%s refused %d copies: %s", url, count, reason)
                    return "ok"
                log.warning("%s refused broadcasts: %s %s", url, response.status, text[:200])
                return "refused" if response.status == 403 else "error"
        except TimeoutError:
            return "timeout"
        except (aiohttp.ClientError, OSError) as error:
            log.warning("cannot reach %s: %s", url, error)
            return "unreachable"

    def _session(self) -> aiohttp.ClientSession:
        tls = self._tls()
        if self._http is not None and self._http_tls is not tls:
            # Rotated certificates: new connections with the new context; the old session
            # closes once its requests are done.
            old = self._http
            asyncio.get_running_loop().create_task(old.close())
            self._http = None
        if self._http is None:
            self._http_tls = tls
            connector = aiohttp.TCPConnector(ssl=tls, limit_per_host=4)
            timeout = aiohttp.ClientTimeout(
                total=self._config.peer_timeout_s, connect=self._config.peer_timeout_s
            )
            self._http = aiohttp.ClientSession(connector=connector, timeout=timeout)
        return self._http

    def _drop(self, reason: str, copies: int) -> None:
        self._metrics.messaging_dropped.labels(reason).inc(copies)

    def _set_queued(self, value: int) -> None:
        self._queued = value
        self._metrics.peer_queue.set(value)
