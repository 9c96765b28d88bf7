"""Votes on revocable actions, put to the applications in the guest (issue 6 §3).

Before the platform live-migrates, stops or reboots a VM whose guest registered for
votes, the host sends a revocable `action_notify`. Every application subscribed to the
`vote` topic gets `{"event": "vote", "vote_id", "event_type", "timeout_ms"}` and answers
with a `vote` request. The decision (`tally`):

- an application rejects → `reject`, with its reason (the platform refuses the action
  and reports that reason);
- every asked application accepted, or none is subscribed → `accept`;
- no decision within the notice's `timeout_ms` minus a margin → `accept`: silence must
  not block the platform, so an application that objects has to say so in time.

Irrevocable notices (the action will happen) are not voted on; they reach the same
applications as `{"event": "notice", ...}` for information. Subscribers of the `notice`
topic get every notice, voted or not, without being asked.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from vmha_guest.events import EventHub, Outbox
from vmha_guest.heartbeat import Vote
from vmha_guest.local_protocol import ApiError, ErrorCode, Topic, notice_event, vote_event
from vmha_protocol.heartbeat import ActionNotify

log = logging.getLogger(__name__)

Choice = Literal["accept", "reject"]


@dataclass(frozen=True)
class Answer:
    voter: str
    result: Choice
    reason: str = ""


def answer_window_ms(timeout_ms: int) -> int:
    """How long applications get to answer: the notice's timeout less a margin for the
    answer to reach the host (a fifth of it, at most one second)."""
    return max(timeout_ms - min(1000, timeout_ms // 5), 0)


def tally(answers: Sequence[Answer], asked: int) -> Vote | None:
    """The decision once it is known, else None (keep waiting). A reject wins at once."""
    for answer in answers:
        if answer.result == "reject":
            return Vote("reject", answer.reason or f"rejected by {answer.voter}")
    if len(answers) >= asked:
        return Vote("accept")
    return None


@dataclass
class _Ballot:
    vote_id: int
    voters: set[Outbox]
    decided: asyncio.Future[Vote]
    answers: dict[Outbox, Answer] = field(default_factory=dict)

    def count(self) -> None:
        if self.decided.done():
            return
        decision = tally(list(self.answers.values()), len(self.voters))
        if decision is not None:
            self.decided.set_result(decision)


@dataclass
class VoteStats:
    votes: int = 0
    rejected: int = 0
    unanswered: int = 0  # decided by the deadline


class VoteBroker:
    """Puts revocable actions to the applications; the heartbeat client's `Voter`."""

    def __init__(self, hub: EventHub) -> None:
        self._hub = hub
        self._ids = itertools.count(1)
        self._ballots: dict[int, _Ballot] = {}
        self.stats = VoteStats()

    async def vote(self, notify: ActionNotify) -> Vote:
        voters = set(self._hub.subscribed(Topic.VOTE))
        self._inform(notify, skip=voters)  # voters get the vote itself
        if not voters:
            return Vote("accept")
        ballot = _Ballot(next(self._ids), voters, asyncio.get_running_loop().create_future())
        window_ms = answer_window_ms(notify.timeout_ms)
        self._ballots[ballot.vote_id] = ballot
        self.stats.votes += 1
        event = vote_event(ballot.vote_id, notify, window_ms)
        for voter in voters:
            voter.offer(event)
        try:
            async with asyncio.timeout(window_ms / 1000):
                decision = await ballot.decided
        except TimeoutError:
            decision = self._unanswered(ballot)
        finally:
            del self._ballots[ballot.vote_id]
        if decision.result == "reject":
            self.stats.rejected += 1
        return decision

    def notice(self, notify: ActionNotify) -> None:
        """An irrevocable notice: for the information of voters and notice subscribers."""
        self._inform(notify)

    def answer(self, voter: Outbox, vote_id: int, result: Choice, reason: str) -> None:
        ballot = self._ballots.get(vote_id)
        if ballot is None or voter not in ballot.voters:
            raise ApiError(ErrorCode.UNKNOWN_VOTE, f"no vote {vote_id} is waiting for you")
        ballot.answers[voter] = Answer(voter.name, result, reason)
        ballot.count()

    def voter_left(self, voter: Outbox) -> None:
        """An application disconnected: stop waiting for its answer."""
        for ballot in self._ballots.values():
            if voter in ballot.voters and voter not in ballot.answers:
                ballot.voters.discard(voter)
                ballot.count()

    def _inform(self, notify: ActionNotify, skip: set[Outbox] | None = None) -> None:
        """A notice event for `notice` subscribers, and for voters when it is irrevocable."""
        topics = [Topic.NOTICE]
        if notify.notification_type == "irrevocable":
            topics.append(Topic.VOTE)
        event = notice_event(notify)
        for outbox in self._hub.subscribed(*topics):
            if skip is None or outbox not in skip:
                outbox.offer(event)

    def _unanswered(self, ballot: _Ballot) -> Vote:
        self.stats.unanswered += 1
        silent = sorted(voter.name for voter in ballot.voters - set(ballot.answers))
        log.warning(
            "vote %d: no answer in time from %s; accepting", ballot.vote_id, ", ".join(silent)
        )
        return Vote("accept", f"no answer in time from {len(silent)} application(s)")
