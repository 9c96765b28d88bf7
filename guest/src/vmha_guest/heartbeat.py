"""Heartbeat client (PROTOCOL.md §4): register, answer challenges, vote on actions.

On every connection to the host the client registers with `init` (a new invocation id),
re-sending it with backoff until `init_ack` (or a first challenge) arrives. Challenges
are answered at once from the health monitor's latest results. The client registers
again when the host nacks its registration, and when challenges stop coming for
`HeartbeatTiming.rejoin_after` (a host that restarted between two reads of the port
would otherwise wait for an `init` that never comes).

A revocable `action_notify` is put to the `vote` function (the daemon passes
`votes.VoteBroker.vote`, which asks the applications); an irrevocable one is passed to
`notice` for information and answered `complete`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from pydantic import BaseModel

from vmha_guest.backoff import Backoff
from vmha_guest.base import Channel
from vmha_guest.config import HeartbeatConfig
from vmha_guest.health import HealthReport
from vmha_protocol import AppGroup, HostMessage, Inbound, limits
from vmha_protocol.heartbeat import (
    ActionNotify,
    ActionResponse,
    Challenge,
    ChallengeResponse,
    Exit,
    HeartbeatNack,
    Init,
    InitAck,
    VoteResult,
)
from vmha_protocol.nack import NackReason, nack_reason
from vmha_protocol.types import truncate_utf8

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Vote:
    """The guest's answer to a revocable action, and why (sent as `log_msg`)."""

    result: VoteResult
    reason: str = ""


Voter = Callable[[ActionNotify], Awaitable[Vote]]
NoticeListener = Callable[[ActionNotify], None]

# A vmha host starts a nack with a reason code (`vmha_protocol.nack`). For a host that
# sends none, recognise a nack about registration by its wording (the host does not know
# our invocation; these words name the message type).
_REGISTRATION_NACK = re.compile(r"not registered|invocation_id|\binit\b", re.IGNORECASE)
_MAX_INVOCATION_ID = 2**31 - 1


async def accept_vote(notify: ActionNotify) -> Vote:
    """The vote when nothing else decides: accept (the daemon asks its applications
    through `votes.VoteBroker.vote` instead)."""
    return Vote("accept")


def asks_to_register(log_msg: str) -> bool:
    """Whether a heartbeat nack says the host does not know our registration."""
    reason = nack_reason(log_msg)
    if reason is not None:
        return reason.asks_to_register
    return _REGISTRATION_NACK.search(log_msg) is not None


class HealthSource(Protocol):
    def report(self) -> HealthReport: ...


@dataclass(frozen=True)
class HeartbeatTiming:
    init_retry_first_s: float = 1.0
    init_retry_max_s: float = 5.0
    nack_reregister_delay_s: float = 2.0
    # The host says heartbeat is not available for this VM (e.g. only messaging is on):
    # ask again rarely, in case that changes, without filling its log.
    unavailable_retry_s: float = 60.0
    rejoin_min_s: float = 10.0

    def rejoin_after(self, interval_ms: int) -> float:
        """Silence after which we register again: ten intervals, at least `rejoin_min_s`
        (the host may clamp our interval to a longer one)."""
        return max(10 * interval_ms / 1000, self.rejoin_min_s)


class HeartbeatClient:
    """The heartbeat application group's handler in the base layer."""

    group = AppGroup.HEARTBEAT

    def __init__(
        self,
        config: HeartbeatConfig,
        address: str,
        health: HealthSource,
        *,
        vote: Voter = accept_vote,
        notice: NoticeListener | None = None,
        timing: HeartbeatTiming | None = None,
    ) -> None:
        self.config = config
        self.address = address
        self._health = health
        self._vote = vote
        self._notice = notice
        self._timing = timing or HeartbeatTiming()
        self._channel: Channel | None = None
        self.invocation_id: int | None = None
        self._acknowledged = asyncio.Event()
        self._contact = asyncio.Event()  # set by every init_ack and challenge
        self._sequence = 0
        self._registration: asyncio.Task[None] | None = None
        self._votes: set[asyncio.Task[None]] = set()

    @property
    def registered(self) -> bool:
        return self._channel is not None and self._acknowledged.is_set()

    # -- base layer ----------------------------------------------------------------------

    def attached(self, channel: Channel) -> None:
        self._channel = channel
        self._register_now()
        self._keep_registered(delay_s=0.0)

    def detached(self) -> None:
        self._channel = None
        self._acknowledged.clear()
        self._cancel_tasks()

    def received(self, inbound: Inbound[HostMessage]) -> None:
        match inbound.message:
            case InitAck() as ack:
                self._on_init_ack(ack)
            case Challenge() as challenge:
                self._on_challenge(challenge)
            case ActionNotify() as notify:
                self._on_action_notify(notify)
            case HeartbeatNack() as nack:
                self._on_nack(nack)
            case other:
                log.debug("ignored %s on the heartbeat address", other.msg_type)

    def leave(self, reason: str) -> bool:
        """Deregister (`exit`) before the daemon stops; True if the message was queued."""
        self._cancel_tasks()
        if self._channel is None or self.invocation_id is None:
            return False
        log_msg = truncate_utf8(reason, limits.HEARTBEAT_MAX_LOG_BYTES)
        return self._send(Exit(invocation_id=self.invocation_id, log_msg=log_msg))

    # -- registration --------------------------------------------------------------------

    def _register_now(self) -> None:
        self.invocation_id = self._new_invocation_id()
        self._acknowledged.clear()
        self._send_init()

    def _keep_registered(self, delay_s: float) -> None:
        if self._registration is not None:
            self._registration.cancel()
        self._registration = asyncio.get_running_loop().create_task(
            self._registration_loop(delay_s), name="heartbeat registration"
        )

    async def _registration_loop(self, delay_s: float) -> None:
        if delay_s > 0:
            await asyncio.sleep(delay_s)
            self._register_now()
        while True:
            await self._until_acknowledged()
            await self._until_challenges_stop()
            self._register_now()

    async def _until_acknowledged(self) -> None:
        backoff = Backoff(self._timing.init_retry_first_s, self._timing.init_retry_max_s)
        while True:
            try:
                async with asyncio.timeout(backoff.next()):
                    await self._acknowledged.wait()
                return
            except TimeoutError:
                log.info("no init_ack for invocation %s; sending init again", self.invocation_id)
                self._send_init()

    async def _until_challenges_stop(self) -> None:
        limit_s = self._timing.rejoin_after(self.config.interval_ms)
        while True:
            self._contact.clear()
            try:
                async with asyncio.timeout(limit_s):
                    await self._contact.wait()
            except TimeoutError:
                log.warning("no challenge from the host for %.0f s; registering again", limit_s)
                return

    def _send_init(self) -> None:
        assert self.invocation_id is not None
        cfg = self.config
        self._send(
            Init(
                invocation_id=self.invocation_id,
                name=cfg.name,
                heartbeat_interval_ms=cfg.interval_ms,
                vote_secs=cfg.vote_secs,
                shutdown_notice_secs=cfg.shutdown_notice_secs,
                suspend_notice_secs=cfg.suspend_notice_secs,
                resume_notice_secs=cfg.resume_notice_secs,
                restart_secs=cfg.restart_secs,
                corrective_action=cfg.corrective_action,
            )
        )

    def _mark_registered(self, how: str) -> None:
        self._contact.set()
        if not self._acknowledged.is_set():
            self._acknowledged.set()
            log.info(
                "registered as %r (invocation %s, every %d ms, %s)",
                self.config.name,
                self.invocation_id,
                self.config.interval_ms,
                how,
            )

    # -- host messages -------------------------------------------------------------------

    def _on_init_ack(self, ack: InitAck) -> None:
        if ack.invocation_id != self.invocation_id:
            log.debug("ignored init_ack for invocation %s", ack.invocation_id)
            return
        self._mark_registered("acknowledged")

    def _on_challenge(self, challenge: Challenge) -> None:
        # Answer first, from the latest check results: nothing here waits.
        report = self._health.report()
        invocation_id = self.invocation_id
        if invocation_id is None:
            invocation_id = challenge.invocation_id
        elif invocation_id != challenge.invocation_id:
            log.debug(
                "challenge for invocation %s; ours is %s", challenge.invocation_id, invocation_id
            )
        self._send(
            ChallengeResponse(
                invocation_id=invocation_id,
                heartbeat_response=challenge.heartbeat_challenge,
                heartbeat_health="healthy" if report.healthy else "unhealthy",
                corrective_action=self.config.corrective_action,
                log_msg=report.log_msg(),
            )
        )
        self._mark_registered("challenged")

    def _on_nack(self, nack: HeartbeatNack) -> None:
        log.warning("host rejected a message: %s", nack.log_msg or "(no reason given)")
        if not self._acknowledged.is_set() or asks_to_register(nack.log_msg):
            delay_s = (
                self._timing.unavailable_retry_s
                if nack_reason(nack.log_msg) is NackReason.UNAVAILABLE
                else self._timing.nack_reregister_delay_s
            )
            log.info("registering again in %.1f s", delay_s)
            self._acknowledged.clear()
            self._keep_registered(delay_s)

    def _on_action_notify(self, notify: ActionNotify) -> None:
        if notify.notification_type == "irrevocable":
            log.warning("host notice: %s in %d ms", notify.event_type, notify.timeout_ms)
            if self._notice is not None:
                self._notice(notify)
            self._answer_action(notify, Vote("complete"))
            return
        task = asyncio.get_running_loop().create_task(self._vote_on(notify))
        self._votes.add(task)
        task.add_done_callback(self._votes.discard)

    async def _vote_on(self, notify: ActionNotify) -> None:
        try:
            vote = await self._vote(notify)
        except Exception:
            log.exception("voting on %s failed", notify.event_type)
            vote = Vote("error", "the guest failed to vote")
        because = f" ({vote.reason})" if vote.reason else ""
        log.info("host proposes %s: voting %s%s", notify.event_type, vote.result, because)
        self._answer_action(notify, vote)

    def _answer_action(self, notify: ActionNotify, vote: Vote) -> None:
        self._send(
            ActionResponse(
                invocation_id=notify.invocation_id,
                event_type=notify.event_type,
                notification_type=notify.notification_type,
                vote_result=vote.result,
                log_msg=truncate_utf8(vote.reason, limits.HEARTBEAT_MAX_LOG_BYTES),
            )
        )

    # -- helpers -------------------------------------------------------------------------

    def _send(self, message: BaseModel) -> bool:
        if self._channel is None:
            return False
        self._sequence += 1
        sequenced = message.model_copy(update={"sequence": self._sequence})
        return self._channel.send(self.address, sequenced)

    def _new_invocation_id(self) -> int:
        # Random, so a restarted daemon never reuses its predecessor's id.
        while (invocation_id := secrets.randbelow(_MAX_INVOCATION_ID) + 1) == self.invocation_id:
            pass
        return invocation_id

    def _cancel_tasks(self) -> None:
        if self._registration is not None:
            self._registration.cancel()
            self._registration = None
        for task in self._votes:
            task.cancel()
