"""Votes on revocable actions: the host's `action_notify` is put to the applications
subscribed to `vote` through the real local socket; the daemon's `action_response`
carries the decision. Also the pure decision rules."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from vmha_guest.client import (
    ACCEPT,
    GuestClient,
    NoticeEvent,
    Topic,
    UnknownVote,
    VoteDecision,
    VoteEvent,
    reject,
)
from vmha_guest.heartbeat import Vote
from vmha_guest.votes import Answer, answer_window_ms, tally
from vmha_protocol.heartbeat import ActionNotify, ActionResponse, Init, NotificationType
from vmha_testbed.guesthost import (
    WAIT_S,
    Pty,
    ScriptedHost,
    guest_and_host,
    make_config,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)


@contextlib.asynccontextmanager
async def registered_guest(
    pty: Pty, socket_dir: Path
) -> AsyncIterator[tuple[ScriptedHost, Init, Path]]:
    sock = socket_dir / "guest.sock"
    config = make_config(local_api={"socket": str(sock)})
    async with guest_and_host(pty, config) as (_, host):
        init = await host.register()
        await wait_for(sock.exists, "the socket")
        yield host, init, sock


def propose(
    host: ScriptedHost,
    init: Init,
    timeout_ms: int,
    event_type: str = "live_migrate_begin",
    kind: NotificationType = "revocable",
) -> None:
    host.send(
        ActionNotify(
            invocation_id=init.invocation_id,
            event_type=event_type,  # type: ignore[arg-type]
            notification_type=kind,
            timeout_ms=timeout_ms,
        )
    )


async def voter(sock: Path, name: str) -> GuestClient:
    client = GuestClient(sock, name=name)
    await client.connect()
    await client.subscribe([Topic.VOTE])
    return client


async def test_a_reject_wins_at_once_with_the_applications_reason(
    pty: Pty, socket_dir: Path
) -> None:
    async with registered_guest(pty, socket_dir) as (host, init, sock):
        agree, object_, slow = (
            await voter(sock, "web"),
            await voter(sock, "db"),
            await voter(sock, "batch"),
        )
        try:
            propose(host, init, timeout_ms=60_000)  # a decision must not wait for this
            vote = await agree.next_event(timeout=WAIT_S)
            assert isinstance(vote, VoteEvent)
            assert vote.event_type == "live_migrate_begin"
            assert vote.timeout_ms == 59_000  # the notice's time less the margin
            await agree.answer_vote(vote.vote_id, ACCEPT)
            vote = await object_.next_event(timeout=WAIT_S)
            assert isinstance(vote, VoteEvent)
            await object_.answer_vote(vote.vote_id, reject("replication catching up"))
            # `slow` never answers: the reject does not wait for it.
            answer = await host.expect(ActionResponse, timeout=WAIT_S)
        finally:
            for client in (agree, object_, slow):
                await client.close()
    assert (answer.vote_result, answer.log_msg) == ("reject", "replication catching up")
    assert (answer.event_type, answer.notification_type) == ("live_migrate_begin", "revocable")


async def test_all_accepting_decides_at_once(pty: Pty, socket_dir: Path) -> None:
    async with (
        registered_guest(pty, socket_dir) as (host, init, sock),
        GuestClient(sock) as one,
        GuestClient(sock) as two,
    ):
        await one.handle_votes(lambda vote: ACCEPT)
        await two.handle_votes(_accept_later)
        propose(host, init, timeout_ms=60_000, event_type="stop")
        answer = await host.expect(ActionResponse, timeout=WAIT_S)
    assert (answer.vote_result, answer.event_type) == ("accept", "stop")


async def _accept_later(vote: VoteEvent) -> VoteDecision:
    await asyncio.sleep(0.1)
    return ACCEPT


async def test_no_answer_in_time_accepts(pty: Pty, socket_dir: Path) -> None:
    async with registered_guest(pty, socket_dir) as (host, init, sock):
        silent = await voter(sock, "sleepy")
        try:
            propose(host, init, timeout_ms=1500)
            vote = await silent.next_event(timeout=WAIT_S)
            assert isinstance(vote, VoteEvent)
            answer = await host.expect(ActionResponse, timeout=WAIT_S)
            with pytest.raises(UnknownVote):  # too late: the vote is over
                await silent.answer_vote(vote.vote_id, reject("too late"))
        finally:
            await silent.close()
    assert answer.vote_result == "accept"
    assert "no answer in time from 1 application" in answer.log_msg


async def test_without_voters_the_guest_accepts(pty: Pty, socket_dir: Path) -> None:
    async with (
        registered_guest(pty, socket_dir) as (host, init, sock),
        GuestClient(sock) as watcher,
    ):
        await watcher.subscribe([Topic.NOTICE])  # informed, not asked
        propose(host, init, timeout_ms=60_000, event_type="reboot")
        answer = await host.expect(ActionResponse, timeout=WAIT_S)
        notice = await watcher.next_event(timeout=WAIT_S)
    assert answer.vote_result == "accept"
    assert notice == NoticeEvent("reboot", "revocable", 60_000)


async def test_a_voter_that_leaves_is_not_waited_for(pty: Pty, socket_dir: Path) -> None:
    async with registered_guest(pty, socket_dir) as (host, init, sock):
        leaving = await voter(sock, "leaving")
        propose(host, init, timeout_ms=60_000)
        assert isinstance(await leaving.next_event(timeout=WAIT_S), VoteEvent)
        await leaving.close()
        answer = await host.expect(ActionResponse, timeout=WAIT_S)
    assert answer.vote_result == "accept"


async def test_irrevocable_notices_inform_voters_and_are_completed(
    pty: Pty, socket_dir: Path
) -> None:
    async with registered_guest(pty, socket_dir) as (host, init, sock):
        listener = await voter(sock, "web")
        try:
            propose(host, init, timeout_ms=5000, event_type="reboot", kind="irrevocable")
            answer = await host.expect(ActionResponse, timeout=WAIT_S)
            notice = await listener.next_event(timeout=WAIT_S)
        finally:
            await listener.close()
    assert (answer.vote_result, answer.notification_type) == ("complete", "irrevocable")
    assert notice == NoticeEvent("reboot", "irrevocable", 5000)


async def test_a_failing_vote_handler_counts_as_accept(pty: Pty, socket_dir: Path) -> None:
    def broken(vote: VoteEvent) -> VoteDecision:
        raise RuntimeError("bug in the application")

    async with (
        registered_guest(pty, socket_dir) as (host, init, sock),
        GuestClient(sock) as client,
    ):
        await client.handle_votes(broken)
        propose(host, init, timeout_ms=60_000)
        answer = await host.expect(ActionResponse, timeout=WAIT_S)
    assert answer.vote_result == "accept"


# -- the decision rules ------------------------------------------------------------------


def test_tally() -> None:
    accept, no = Answer("web", "accept"), Answer("db", "reject", "busy")
    assert tally([], asked=2) is None
    assert tally([accept], asked=2) is None
    assert tally([accept, accept], asked=2) == Vote("accept")
    assert tally([], asked=0) == Vote("accept")
    decided = tally([no], asked=3)
    assert decided is not None and (decided.result, decided.reason) == ("reject", "busy")
    unexplained = tally([Answer("db", "reject")], asked=2)
    assert unexplained is not None and unexplained.reason == "rejected by db"


@pytest.mark.parametrize(
    ("timeout_ms", "window_ms"),
    [(0, 0), (500, 400), (5000, 4000), (10_000, 9000), (60_000, 59_000)],
)
def test_applications_answer_within_the_notice_time_less_a_margin(
    timeout_ms: int, window_ms: int
) -> None:
    assert answer_window_ms(timeout_ms) == window_ms
