"""Server group messaging in the guest daemon: the daemon runs against a scripted host
over a real pty (as in test_guest_daemon.py) and applications talk to it through the
real local socket with the client library."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest

from vmha_guest.client import (
    BroadcastEvent,
    GuestClient,
    HostEvent,
    HostNotAnswering,
    HostNotConnected,
    InvalidMessage,
    MessageTooLarge,
    MessagingDisabled,
    NotificationEvent,
    RateLimited,
    Refused,
    Topic,
)
from vmha_guest.port import SerialPort
from vmha_guest.server_group import MessagingState
from vmha_protocol import encode
from vmha_protocol.server_group import (
    GuestBroadcast,
    HostBroadcast,
    Notification,
    ServerGroupNack,
    StatusQuery,
    StatusResponse,
    StatusResponseDone,
)
from vmha_testbed.guesthost import (
    SG,
    WAIT_S,
    Pty,
    guest,
    make_config,
    member,
    messaging_config,
    running,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)


# -- status ------------------------------------------------------------------------------


async def test_status_is_collected_from_chunked_responses(pty: Pty, socket_dir: Path) -> None:
    members = [member("web-1"), member("web-2", "paused", heartbeat="healthy"), member("db")]
    async with guest(pty, socket_dir) as g, g.client() as client:
        asking = asyncio.create_task(client.status())
        query = await g.host.expect(StatusQuery)
        wire = b"".join(encode(SG, StatusResponse(seq=query.seq, data=m)) for m in members)
        wire += encode(SG, StatusResponse(seq=query.seq + 7, data=member("other-query")))
        wire += encode(SG, StatusResponseDone(seq=query.seq + 7))
        wire += encode(SG, StatusResponseDone(seq=query.seq))
        for start in range(0, len(wire), 97):  # fragments that split frames anywhere
            g.host.send_raw(wire[start : start + 97])
            await asyncio.sleep(0.005)
        result = await asyncio.wait_for(asking, WAIT_S)
    assert [m.display_name for m in result.members] == ["web-1", "web-2", "db"]
    assert result.members[1].state == "paused"
    assert result.seq == query.seq
    assert not result.truncated


async def test_each_query_has_its_own_seq_and_late_answers_are_ignored(
    pty: Pty, socket_dir: Path
) -> None:
    async with guest(pty, socket_dir) as g, g.client() as client:
        asking = asyncio.create_task(client.status(timeout=0.5))
        first = await g.host.expect(StatusQuery)
        with pytest.raises(HostNotAnswering, match="did not answer a status query"):
            await asking  # the host stayed silent

        asking = asyncio.create_task(client.status())
        second = await g.host.expect(StatusQuery)
        assert second.seq == first.seq + 1
        g.send(StatusResponse(seq=first.seq, data=member("late")))  # for the first: ignored
        g.send(StatusResponseDone(seq=first.seq))
        g.send(StatusResponse(seq=second.seq, data=member("current")))
        g.send(StatusResponseDone(seq=second.seq))
        result = await asyncio.wait_for(asking, WAIT_S)
        assert [m.display_name for m in result.members] == ["current"]
        assert g.run.daemon.server_group is not None
        assert g.run.daemon.server_group.stats.stale_responses == 2


async def test_a_status_keeps_at_most_max_members(pty: Pty, socket_dir: Path) -> None:
    config = messaging_config(socket_dir / "guest.sock", max_members=3)
    async with guest(pty, socket_dir, config) as g, g.client() as client:
        asking = asyncio.create_task(client.status())
        await g.answer_status([member(f"vm-{i}") for i in range(5)])
        result = await asyncio.wait_for(asking, WAIT_S)
    assert [m.display_name for m in result.members] == ["vm-0", "vm-1", "vm-2"]
    assert result.truncated


async def test_a_newer_hosts_extra_member_keys_reach_the_application(
    pty: Pty, socket_dir: Path
) -> None:
    async with guest(pty, socket_dir) as g, g.client() as client:
        asking = asyncio.create_task(client.status())
        await g.answer_status([member("web-1", zone="eu-1")])
        result = await asyncio.wait_for(asking, WAIT_S)
    assert result.members[0].model_dump()["zone"] == "eu-1"


# -- events ------------------------------------------------------------------------------


async def test_notifications_and_broadcasts_reach_subscribed_applications(
    pty: Pty, socket_dir: Path
) -> None:
    async with (
        guest(pty, socket_dir) as g,
        g.client() as notifications_only,
        g.client() as both,
    ):
        await notifications_only.subscribe([Topic.NOTIFICATION])
        await both.subscribe([Topic.NOTIFICATION, Topic.BROADCAST])
        g.send(HostBroadcast(source_instance="uid-web-2", data="hello from web-2 ✓"))
        g.send(Notification(data=member("web-2", "paused")))

        event = await notifications_only.next_event(timeout=WAIT_S)  # not the broadcast
        assert isinstance(event, NotificationEvent)
        assert (event.member.display_name, event.member.state) == ("web-2", "paused")

        first = await both.next_event(timeout=WAIT_S)
        second = await both.next_event(timeout=WAIT_S)
        assert first == BroadcastEvent("uid-web-2", "hello from web-2 ✓")
        assert isinstance(second, NotificationEvent)
        assert g.run.daemon.server_group is not None
        assert g.run.daemon.server_group.state is MessagingState.ENABLED


async def test_host_topic_reports_the_connection_and_messaging_state(
    pty: Pty, socket_dir: Path
) -> None:
    async with guest(pty, socket_dir) as g, g.client() as client:
        await client.subscribe([Topic.HOST])
        assert await client.next_event(timeout=WAIT_S) == HostEvent(True, "unknown")
        g.send(Notification(data=member("web-2")))
        assert await client.next_event(timeout=WAIT_S) == HostEvent(True, "enabled")


async def test_a_slow_application_does_not_hold_up_the_others(pty: Pty, socket_dir: Path) -> None:
    """One application subscribes and never reads: its socket fills, its events are
    dropped (oldest first, counted), and the daemon keeps serving the others."""
    sock = socket_dir / "guest.sock"
    config = make_config(
        heartbeat={"enabled": False},
        local_api={"socket": str(sock), "max_queued_events": 8},
    )
    batches, per_batch, payload = 30, 8, "x" * 3000
    async with guest(pty, socket_dir, config) as g, g.client() as fast:
        slow = await _raw_connection(sock)
        slow.sendall(b'{"id": 1, "op": "subscribe", "topics": ["broadcast"]}\n')
        await fast.subscribe([Topic.BROADCAST])
        for batch in range(batches):  # ~720 KB: far more than a socket buffer holds
            await g.push(
                [
                    HostBroadcast(source_instance=f"{batch}.{i}", data=payload)
                    for i in range(per_batch)
                ]
            )
            for i in range(per_batch):
                event = await fast.next_event(timeout=WAIT_S)
                assert event == BroadcastEvent(f"{batch}.{i}", payload)

        asking = asyncio.create_task(fast.status())  # requests are still served at once
        await g.answer_status([member("web-1")])
        assert len((await asyncio.wait_for(asking, WAIT_S)).members) == 1

        lines = await asyncio.to_thread(_read_lines, slow, until=b'"source_instance":"29.7"')
        slow.close()
    events = [json.loads(line) for line in lines]
    assert events[0] == {"id": 1, "ok": True, "result": {"topics": ["broadcast"]}}
    dropped = sum(e["count"] for e in events if e.get("event") == "dropped")
    received = [e for e in events if e.get("event") == "broadcast"]
    assert dropped > 0
    assert dropped + len(received) == batches * per_batch  # each one delivered or counted


async def _raw_connection(sock: Path) -> socket.socket:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(WAIT_S)
    await asyncio.to_thread(client.connect, str(sock))
    return client


def _read_lines(client: socket.socket, until: bytes) -> list[bytes]:
    data = b""
    while until not in data:
        chunk = client.recv(65536)
        assert chunk, "the daemon closed the connection"
        data += chunk
    return data.splitlines()


# -- broadcasts --------------------------------------------------------------------------


async def test_a_broadcast_first_checks_that_messaging_is_on(pty: Pty, socket_dir: Path) -> None:
    async with guest(pty, socket_dir) as g, g.client() as client:
        sending = asyncio.create_task(client.broadcast("primary is web-1"))
        await g.answer_status([member("web-1"), member("web-2")])  # state unknown: asks first
        sent = await g.host.expect(GuestBroadcast)
        assert sent.data == "primary is web-1"
        assert (await asyncio.wait_for(sending, WAIT_S)).bytes == len("primary is web-1")

        # Messaging is known to be on: the next one goes out without a query.
        sending = asyncio.create_task(client.broadcast("é" * 1525))  # 3050 bytes: the limit
        sent = await g.host.expect(GuestBroadcast)
        assert sent.data == "é" * 1525
        assert (await asyncio.wait_for(sending, WAIT_S)).bytes == 3050


@pytest.mark.parametrize(
    ("data", "error", "says"),
    [
        ("x" * 3051, MessageTooLarge, "3051 bytes"),
        ("é" * 1526, MessageTooLarge, "3052 bytes"),  # 1526 characters, 3052 bytes
        ("two\nlines", InvalidMessage, "newline"),
        ("bell\x07", InvalidMessage, "control character"),
    ],
)
async def test_what_cannot_be_a_broadcast_is_refused_in_the_guest(
    pty: Pty, socket_dir: Path, data: str, error: type[Exception], says: str
) -> None:
    async with guest(pty, socket_dir) as g, g.client() as client:
        with pytest.raises(error, match=says):
            await client.broadcast(data)
        # Nothing reached the host: the next thing it sees is this status query.
        asking = asyncio.create_task(client.status())
        await g.answer_status([])
        await asyncio.wait_for(asking, WAIT_S)


@pytest.mark.parametrize(
    "log_msg",
    [
        "messaging-disabled: server group messaging is off for group web",
        "server group messaging is not enabled for this VM",  # a host without reason codes
    ],
)
async def test_messaging_disabled_is_a_prompt_clear_error(
    pty: Pty, socket_dir: Path, log_msg: str
) -> None:
    async with guest(pty, socket_dir) as g, g.client() as client:
        await client.subscribe([Topic.HOST])
        assert await client.next_event(timeout=WAIT_S) == HostEvent(True, "unknown")
        sending = asyncio.create_task(client.broadcast("anyone?"))
        await g.host.expect(StatusQuery)
        g.send(ServerGroupNack(orig_msg_type="status_query", log_msg=log_msg))
        with pytest.raises(MessagingDisabled) as raised:
            await asyncio.wait_for(sending, WAIT_S)
        assert "server group messaging is disabled" in raised.value.message
        assert ("off for group web" in raised.value.message) == log_msg.startswith("messaging-")
        assert await client.next_event(timeout=WAIT_S) == HostEvent(True, "disabled")

        # Disabled is checked again each time: the group's owner may turn it on.
        sending = asyncio.create_task(client.broadcast("now?"))
        await g.answer_status([member("web-1")])
        assert (await g.host.expect(GuestBroadcast)).data == "now?"
        await asyncio.wait_for(sending, WAIT_S)


@pytest.mark.parametrize(
    ("log_msg", "error", "says"),
    [
        ("rate-limited: more than 10 broadcasts per second", RateLimited, "10 broadcasts"),
        ("too-large: 3050 bytes at most", MessageTooLarge, "too large"),
        ("invalid: data: not a string", Refused, "the host refused the broadcast: data"),
        ("computer says no", Refused, "computer says no"),
    ],
)
async def test_a_nack_in_the_window_is_the_broadcasts_answer(
    pty: Pty, socket_dir: Path, log_msg: str, error: type[Exception], says: str
) -> None:
    sock = socket_dir / "guest.sock"
    # A long window: the nack must come within it even on a loaded machine.
    async with guest(pty, socket_dir, messaging_config(sock, nack_window_ms=5000)) as g:
        await g.enable()
        async with g.client() as client:
            sending = asyncio.create_task(client.broadcast("flood", timeout=10))
            await g.host.expect(GuestBroadcast)
            g.send(ServerGroupNack(orig_msg_type="broadcast", log_msg=log_msg))
            with pytest.raises(error, match=says):
                await asyncio.wait_for(sending, WAIT_S)


async def test_broadcasts_wait_their_turn_so_a_nack_is_matched_to_its_own(
    pty: Pty, socket_dir: Path
) -> None:
    sock = socket_dir / "guest.sock"
    async with guest(pty, socket_dir, messaging_config(sock, nack_window_ms=2000)) as g:
        await g.enable()
        async with g.client() as client:
            first = asyncio.create_task(client.broadcast("first", timeout=10))
            assert (await g.host.expect(GuestBroadcast)).data == "first"
            second = asyncio.create_task(client.broadcast("second", timeout=10))
            await asyncio.sleep(0.3)
            assert g.host._inbox.empty()  # the second waits for the first's window
            g.send(ServerGroupNack(orig_msg_type="broadcast", log_msg="rate-limited: slow down"))
            with pytest.raises(RateLimited):
                await asyncio.wait_for(first, WAIT_S)
            assert (await g.host.expect(GuestBroadcast)).data == "second"
            assert (await asyncio.wait_for(second, WAIT_S)).bytes == 6


# -- the host ------------------------------------------------------------------------------


async def test_without_a_host_requests_fail_at_once(socket_dir: Path, tmp_path: Path) -> None:
    sock = socket_dir / "guest.sock"
    port = SerialPort(str(tmp_path / "no-port-yet"))
    async with running(messaging_config(sock), port):
        await wait_for(sock.exists, "the socket")
        async with GuestClient(sock, timeout=30) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(HostNotConnected, match="not connected"):
                await client.broadcast("anyone?")
            with pytest.raises(HostNotConnected):
                await client.status()
            # Long before the 30 s the requests were allowed (not a timeout).
            assert loop.time() - started < 15


async def test_losing_the_host_fails_what_waits_for_it(pty: Pty, socket_dir: Path) -> None:
    async with guest(pty, socket_dir) as g, g.client() as client:
        asking = asyncio.create_task(client.status(timeout=60))
        await g.host.expect(StatusQuery)
        g.host.close()
        pty.hang_up()
        with pytest.raises(HostNotConnected, match="lost the connection"):
            await asyncio.wait_for(asking, WAIT_S)


async def test_original_group_names_on_request(pty: Pty, socket_dir: Path) -> None:
    sock = socket_dir / "guest.sock"
    config = make_config(
        addresses="cgcs", heartbeat={"enabled": False}, local_api={"socket": str(sock)}
    )
    async with guest(pty, socket_dir, config) as g, g.client() as client:
        asking = asyncio.create_task(client.status())
        inbound = await g.host.receive()
        assert inbound.address == "cgcs.server_grp"
        assert isinstance(inbound.message, StatusQuery)
        g.host.send(StatusResponseDone(seq=inbound.message.seq), address="cgcs.server_grp")
        assert (await asyncio.wait_for(asking, WAIT_S)).members == ()


async def test_messaging_can_be_turned_off_in_the_guest(pty: Pty, socket_dir: Path) -> None:
    sock = socket_dir / "guest.sock"
    config = make_config(
        heartbeat={"enabled": False},
        local_api={"socket": str(sock)},
        server_group={"enabled": False},
    )
    async with guest(pty, socket_dir, config) as g, g.client() as client:
        with pytest.raises(MessagingDisabled, match="in this guest"):
            await client.status()
        with pytest.raises(MessagingDisabled, match="in this guest"):
            await client.broadcast("hello")
        assert g.host._inbox.empty()
