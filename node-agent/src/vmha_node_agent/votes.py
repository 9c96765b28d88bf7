"""Votes on revocable actions (the original's vote): the agent's side.

The operator's admission webhook, before it lets a live migration or a stop of a group
member through, asks the agent of the VM's node (`POST /v1/votes`). The agent puts the
action to the guest — a revocable `action_notify` with `timeout_ms` from the guest's
`vote_secs`, capped at `messaging.max_vote_s` and at what the operator can wait — and
answers with the guest's `action_response`:

| the guest                                 | answer | metric result   |
|-------------------------------------------|--------|-----------------|
| answers `reject`                          | reject (its `log_msg` as reason) | reject |
| answers anything else                     | accept | accept          |
| does not answer in time                   | accept | timeout         |
| is not registered (or not on this node)   | accept | not_registered / not_here |
| registered with `vote_secs` 0             | accept | no_votes        |

Votes are advisory: the platform never waits on a broken guest, so silence is consent.
Irrevocable actions (the heartbeat's corrective action) are notified, never voted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from vmha_node_agent.config import AgentConfig
from vmha_node_agent.heartbeat import REGISTERED_STATES
from vmha_node_agent.kubevirt import Key
from vmha_node_agent.metrics import AgentMetrics
from vmha_node_agent.peerapi import VoteAnswer, VoteRequest
from vmha_node_agent.session import VMSession

log = logging.getLogger(__name__)


class VoteBox:
    def __init__(
        self, config: AgentConfig, metrics: AgentMetrics, sessions: Mapping[Key, VMSession]
    ) -> None:
        self._node = config.node_name
        self._max_vote_s = config.messaging.max_vote_s
        self._metrics = metrics
        self._sessions = sessions

    async def decide(self, request: VoteRequest) -> VoteAnswer:
        vm = f"{request.namespace}/{request.vm}"
        session = self._sessions.get((request.namespace, request.vm))
        if session is None:
            return self._unasked("not_here", f"{vm} has no guest session on node {self._node}")
        registration = session.heartbeat.registration
        if registration is None or session.state not in REGISTERED_STATES:
            return self._unasked("not_registered", f"the guest of {vm} is not registered")
        if registration.vote_secs == 0:
            return self._unasked("no_votes", f"the guest of {vm} takes no votes (vote_secs 0)")
        timeout_s = min(float(registration.vote_secs), self._max_vote_s)
        if request.timeout_ms is not None:
            timeout_s = min(timeout_s, request.timeout_ms / 1000)
        vote = await session.put_to_vote(request.event_type, timeout_s)
        if not vote.answered:
            self._metrics.votes.labels("timeout").inc()
            return VoteAnswer(
                result="accept", reason=f"no answer within {timeout_s:g} s", asked=True
            )
        log.info(
            "%s: the guest votes %s on %s: %s", vm, vote.result, request.event_type, vote.log_msg,
            extra={"namespace": request.namespace, "vm": request.vm},
        )  # fmt: skip
        if vote.result == "reject":
            self._metrics.votes.labels("reject").inc()
            return VoteAnswer(
                result="reject", reason=vote.log_msg or "rejected by the guest", asked=True
            )
        self._metrics.votes.labels("accept").inc()
        return VoteAnswer(result="accept", reason=vote.log_msg, asked=True)

    def _unasked(self, result: str, reason: str) -> VoteAnswer:
        self._metrics.votes.labels(result).inc()
        return VoteAnswer(result="accept", reason=reason, asked=False)
