"""The client side: the `vmha-guest` commands run as real processes against the daemon
(in this process, with a scripted host over a pty), the client library's edges, and the
local socket's own rules (bounds, ownership, stale sockets)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from vmha_guest.client import (
    Busy,
    DaemonNotRunning,
    GuestClient,
    Topic,
    broadcast_sync,
    status_sync,
)
from vmha_guest.config import LocalApiConfig
from vmha_guest.events import EventHub
from vmha_guest.local_api import LocalApiError, LocalApiServer
from vmha_guest.port import SerialPort
from vmha_guest.votes import VoteBroker
from vmha_protocol.server_group import (
    GuestBroadcast,
    HostBroadcast,
    Notification,
    ServerGroupNack,
    StatusQuery,
)
from vmha_testbed.guesthost import (
    WAIT_S,
    Guest,
    Pty,
    ScriptedHost,
    guest,
    make_config,
    member,
    messaging_config,
    running,
    wait_for,
)

pytestmark = pytest.mark.timeout(120)
CLI_WAIT_S = 30.0  # a Python process starting on a loaded machine


class Cli:
    """`vmha-guest ...` as a process; the test's event loop keeps serving meanwhile."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, sock: Path, *args: str, stdin: bytes | None = None) -> Cli:
        command = [sys.executable, "-m", "vmha_guest", *args]
        if args and args[0] in ("broadcast", "status", "watch", "app"):
            command += ["--socket", str(sock)]
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        if stdin is not None:
            assert process.stdin is not None
            process.stdin.write(stdin)
            process.stdin.close()
        return cls(process)

    async def line(self) -> str:
        assert self.process.stdout is not None
        async with asyncio.timeout(CLI_WAIT_S):
            return (await self.process.stdout.readline()).decode()

    async def finish(self) -> tuple[int, str, str]:
        try:
            async with asyncio.timeout(CLI_WAIT_S):
                stdout, stderr = await self.process.communicate()
        finally:
            if self.process.returncode is None:
                self.process.kill()
                await self.process.wait()
        assert self.process.returncode is not None
        return self.process.returncode, stdout.decode(), stderr.decode()


async def run_cli(sock: Path, *args: str, stdin: bytes | None = None) -> tuple[int, str, str]:
    return await (await Cli.start(sock, *args, stdin=stdin)).finish()


# -- the commands --------------------------------------------------------------------------


async def test_status_lists_the_members(pty: Pty, socket_dir: Path) -> None:
    async with guest(pty, socket_dir) as g:
        cli = await Cli.start(g.sock, "status")
        await g.answer_status([member("web-2", "paused", host="node-b"), member("web-1")])
        code, out, err = await cli.finish()
        assert (code, err) == (0, "")
        lines = out.splitlines()
        assert lines[0].split() == ["NAME", "STATE", "HEARTBEAT", "HOST", "INSTANCE_ID"]
        assert lines[1].split() == ["web-1", "active", "unknown", "-", "uid-web-1"]
        assert lines[2].split() == ["web-2", "paused", "unknown", "node-b", "uid-web-2"]

        cli = await Cli.start(g.sock, "status", "--json")
        await g.answer_status([member("web-1")])
        code, out, _ = await cli.finish()
    assert code == 0
    reply = json.loads(out)
    assert reply["ok"] is True and reply["truncated"] is False
    assert [m["display_name"] for m in reply["members"]] == ["web-1"]


async def test_broadcast_from_the_command_line_and_from_stdin(pty: Pty, socket_dir: Path) -> None:
    async with guest(pty, socket_dir) as g:
        cli = await Cli.start(g.sock, "broadcast", "--json", "primary is web-1")
        await g.answer_status([member("web-1")])
        assert (await g.host.expect(GuestBroadcast)).data == "primary is web-1"
        code, out, _ = await cli.finish()
        assert (code, json.loads(out)) == (0, {"ok": True, "bytes": 16})

        cli = await Cli.start(g.sock, "broadcast", "-", stdin="from a pipe ✓\n".encode())
        assert (await g.host.expect(GuestBroadcast)).data == "from a pipe ✓"
        code, out, _ = await cli.finish()
    assert (code, out) == (0, "broadcast sent (15 bytes)\n")


async def test_messaging_disabled_exits_3_with_the_reason(pty: Pty, socket_dir: Path) -> None:
    async with guest(pty, socket_dir) as g:
        cli = await Cli.start(g.sock, "broadcast", "--json", "--timeout", "60", "hello")
        await g.host.expect(StatusQuery)
        g.send(
            ServerGroupNack(
                orig_msg_type="status_query",
                log_msg="messaging-disabled: server group messaging is off for group web",
            )
        )
        code, out, err = await cli.finish()  # promptly: long before the 60 s allowed
    assert code == 3
    assert err == (
        "vmha-guest broadcast: server group messaging is disabled for this VM: "
        "server group messaging is off for group web\n"
    )
    assert json.loads(out)["error"]["code"] == "messaging-disabled"


async def test_no_host_exits_4_at_once(socket_dir: Path, tmp_path: Path) -> None:
    sock = socket_dir / "guest.sock"
    async with running(messaging_config(sock), SerialPort(str(tmp_path / "no-port"))):
        await wait_for(sock.exists, "the socket")
        for command in (["status"], ["broadcast", "hello"]):
            code, _, err = await run_cli(sock, *command, "--timeout", "60")
            assert code == 4
            assert "the host is not connected" in err


async def test_a_silent_host_exits_4_after_the_timeout(pty: Pty, socket_dir: Path) -> None:
    async with guest(pty, socket_dir) as g:
        code, _, err = await run_cli(g.sock, "status", "--timeout", "1")
    assert code == 4
    assert "did not answer a status query within 1 s" in err


async def test_rate_limited_exits_5(pty: Pty, socket_dir: Path) -> None:
    sock = socket_dir / "guest.sock"
    async with guest(pty, socket_dir, messaging_config(sock, nack_window_ms=5000)) as g:
        await g.enable()
        cli = await Cli.start(g.sock, "broadcast", "--timeout", "20", "one too many")
        await g.host.expect(GuestBroadcast)
        g.send(ServerGroupNack(orig_msg_type="broadcast", log_msg="rate-limited: 10 per second"))
        code, _, err = await cli.finish()
    assert code == 5
    assert "rate limit" in err and "10 per second" in err


async def test_too_large_exits_2_and_sends_nothing(pty: Pty, socket_dir: Path) -> None:
    async with guest(pty, socket_dir) as g:
        code, _, err = await run_cli(g.sock, "broadcast", "x" * 3051)
        assert code == 2
        assert "3051 bytes; a broadcast holds at most 3050" in err
        code, _, err = await run_cli(g.sock, "broadcast", "-", stdin=b"two\nlines\n")
        assert code == 2
        assert "newline" in err
        assert g.host._inbox.empty()


async def test_without_a_daemon_exits_6(socket_dir: Path) -> None:
    code, _, err = await run_cli(socket_dir / "none.sock", "status")
    assert (code, err) == (
        6,
        f"vmha-guest status: no socket at {socket_dir / 'none.sock'}: is vmha-guest running?\n",
    )
    stale = socket_dir / "stale.sock"
    left_over = socket.socket(socket.AF_UNIX)
    left_over.bind(str(stale))  # bound, never listening: what a killed daemon leaves
    left_over.close()
    code, _, err = await run_cli(stale, "broadcast", "hello")
    assert code == 6
    assert "nothing listens" in err


async def test_usage_errors_exit_2(socket_dir: Path) -> None:
    for args in (["watch", "--topics", "vote"], ["status", "--timeout", "0"], ["broadcast"]):
        code, _, err = await run_cli(socket_dir / "x.sock", *args)
        assert code == 2, args
        assert "usage:" in err


async def test_watch_prints_events_as_they_come(pty: Pty, socket_dir: Path) -> None:
    async with guest(pty, socket_dir) as g:
        cli = await Cli.start(g.sock, "watch", "--json", "--count", "2")
        await _until_subscribed(g, 1)
        g.send(Notification(data=member("web-2", "paused")))
        g.send(HostBroadcast(source_instance="uid-web-2", data="bye"))
        code, out, _ = await cli.finish()
    assert code == 0
    first, second = (json.loads(line) for line in out.splitlines())
    assert first["event"] == "notification"
    assert (first["member"]["display_name"], first["member"]["state"]) == ("web-2", "paused")
    assert second == {"event": "broadcast", "source_instance": "uid-web-2", "data": "bye"}


async def test_watch_exits_7_when_the_duration_ends_first(pty: Pty, socket_dir: Path) -> None:
    async with guest(pty, socket_dir) as g:
        code, out, err = await run_cli(g.sock, "watch", "--count", "1", "--duration", "1")
    assert (code, out) == (7, "")
    assert "0 of 1 event(s) in 1 s" in err


async def test_watch_exits_6_when_the_daemon_stops(pty: Pty, socket_dir: Path) -> None:
    async with guest(pty, socket_dir) as g:
        cli = await Cli.start(g.sock, "watch")
        await _until_subscribed(g, 1)
        await g.run.shutdown()
        code, _, err = await cli.finish()
    assert code == 6
    assert "the daemon closed the connection" in err


async def test_app_mode_prints_like_server_group_app(pty: Pty, socket_dir: Path) -> None:
    """`vmha-guest app MESSAGE`: status at start, MESSAGE as a broadcast, then everything
    that arrives, one readable line each."""
    async with guest(pty, socket_dir) as g:
        cli = await Cli.start(g.sock, "app", "--count", "2", "hello group")
        await g.answer_status([member("web-1", host="node-a"), member("web-2", host="node-b")])
        assert (await g.host.expect(GuestBroadcast)).data == "hello group"
        assert await cli.line() == (
            "status: web-1 state=active heartbeat=unknown host=node-a instance_id=uid-web-1\n"
        )
        assert await cli.line() == (
            "status: web-2 state=active heartbeat=unknown host=node-b instance_id=uid-web-2\n"
        )
        assert await cli.line() == "status done: 2 member(s)\n"
        assert await cli.line() == "broadcast sent: hello group\n"
        g.send(HostBroadcast(source_instance="uid-web-2", data="hello yourself"))
        g.send(Notification(data=member("web-2", "paused", host="node-b", heartbeat="healthy")))
        code, out, err = await cli.finish()
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "broadcast from uid-web-2: hello yourself",
        "notification: web-2 state=paused heartbeat=healthy host=node-b instance_id=uid-web-2",
    ]


async def test_app_mode_json(pty: Pty, socket_dir: Path) -> None:
    async with guest(pty, socket_dir) as g:
        cli = await Cli.start(g.sock, "app", "--json", "--count", "1")
        await g.answer_status([member("web-1")])
        await _until_subscribed(g, 1)
        g.send(Notification(data=member("web-1", "error")))
        code, out, _ = await cli.finish()
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert [e["event"] for e in events] == ["status", "status_done", "notification"]
    assert events[0]["member"]["display_name"] == "web-1"
    assert events[1] == {"event": "status_done", "count": 1}
    assert events[2]["member"]["state"] == "error"


async def _until_subscribed(g: Guest, count: int) -> None:
    """Until `count` applications subscribed to something (the commands run elsewhere)."""
    await wait_for(lambda: len(g.run.daemon.events.subscribed(*Topic)) >= count, "watchers")


# -- the client library ----------------------------------------------------------------------


async def test_the_sync_helpers(pty: Pty, socket_dir: Path) -> None:
    async with guest(pty, socket_dir) as g:
        asking = asyncio.create_task(asyncio.to_thread(status_sync, socket_path=g.sock))
        await g.answer_status([member("web-1")])
        assert [m.display_name for m in (await asking).members] == ["web-1"]
        sending = asyncio.create_task(asyncio.to_thread(broadcast_sync, "hi", socket_path=g.sock))
        assert (await g.host.expect(GuestBroadcast)).data == "hi"
        assert (await sending).bytes == 2


async def test_votes_end_when_the_daemon_stops(pty: Pty, socket_dir: Path) -> None:
    async with guest(pty, socket_dir) as g, g.client() as client:
        voting = asyncio.create_task(client.votes(lambda vote: pytest.fail("no vote expected")))
        await _until_subscribed(g, 1)
        await g.run.shutdown()
        with pytest.raises(DaemonNotRunning):
            await asyncio.wait_for(voting, WAIT_S)


async def test_the_socket_environment_variable_is_the_default(
    pty: Pty, socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with guest(pty, socket_dir) as g:
        monkeypatch.setenv("VMHA_GUEST_SOCKET", str(g.sock))
        async with GuestClient() as client:
            asking = asyncio.create_task(client.status())
            await g.answer_status([])
            assert (await asyncio.wait_for(asking, WAIT_S)).members == ()


# -- the socket's rules --------------------------------------------------------------------


async def test_clients_beyond_the_limit_are_refused(pty: Pty, socket_dir: Path) -> None:
    sock = socket_dir / "guest.sock"
    config = make_config(
        heartbeat={"enabled": False}, local_api={"socket": str(sock), "max_clients": 1}
    )
    async with guest(pty, socket_dir, config) as g, g.client() as first:
        asking = asyncio.create_task(first.status())
        await g.answer_status([])
        await asyncio.wait_for(asking, WAIT_S)
        async with g.client() as second:
            with pytest.raises(Busy, match="1 applications are connected"):
                await second.status()


async def test_bad_requests_get_clear_errors(pty: Pty, socket_dir: Path) -> None:
    async with guest(pty, socket_dir) as g:
        reader, writer = await asyncio.open_unix_connection(str(g.sock))
        replies = []
        for line in (
            b"not json\n",
            b'{"id": 1, "op": "reboot"}\n',
            b'{"id": "a", "op": "status", "timeout_ms": 0}\n',
            b'{"id": 2, "op": "vote", "vote_id": 9, "result": "accept"}\n',
            b'{"id": 3, "op": "subscribe", "topics": ["notification"], "extra": 1}\n',
        ):
            writer.write(line)
            replies.append(json.loads(await asyncio.wait_for(reader.readline(), WAIT_S)))
        writer.write(b'{"id": 4, "op": "broadcast", "data": "' + b"x" * 70_000 + b'"}\n')
        replies.append(json.loads(await asyncio.wait_for(reader.readline(), WAIT_S)))
        assert await asyncio.wait_for(reader.read(), WAIT_S) == b""  # closed after that
        writer.close()
    assert [(r["id"], r["ok"], r["error"]["code"]) for r in replies] == [
        (None, False, "invalid-request"),
        (1, False, "invalid-request"),
        ("a", False, "invalid-request"),
        (2, False, "unknown-vote"),
        (3, False, "invalid-request"),
        (None, False, "invalid-request"),
    ]
    assert "timeout_ms" in replies[2]["error"]["message"]
    assert "longer than 65536 bytes" in replies[5]["error"]["message"]


async def test_a_client_that_stops_sending_still_gets_its_answers(
    pty: Pty, socket_dir: Path
) -> None:
    """`echo '{...}' | socat - UNIX-CONNECT:...`: the request, then EOF."""
    async with guest(pty, socket_dir) as g:
        reader, writer = await asyncio.open_unix_connection(str(g.sock))
        writer.write(b'{"id": 7, "op": "status"}\n')
        writer.write_eof()
        await g.answer_status([member("web-1")])
        reply = json.loads(await asyncio.wait_for(reader.readline(), WAIT_S))
        assert await asyncio.wait_for(reader.read(), WAIT_S) == b""
        writer.close()
    assert (reply["id"], reply["ok"]) == (7, True)
    assert reply["result"]["members"][0]["display_name"] == "web-1"


def _server(sock: Path, **settings: Any) -> LocalApiServer:
    hub = EventHub()
    config = LocalApiConfig(socket=str(sock), **settings)
    return LocalApiServer(
        config, hub, VoteBroker(hub), None, status_timeout_s=1.0, nack_window_s=0.1
    )


async def test_the_socket_gets_its_mode_and_group(socket_dir: Path) -> None:
    sock = socket_dir / "sub" / "guest.sock"  # the directory is created
    server = _server(sock, mode=0o600, group=str(os.getgid()))
    await server.start()
    try:
        info = sock.stat()
        assert (info.st_mode & 0o777, info.st_gid) == (0o600, os.getgid())
    finally:
        await server.stop()
    assert not sock.exists()


async def test_a_stale_socket_is_replaced_but_a_live_one_or_a_file_is_not(
    socket_dir: Path,
) -> None:
    sock = socket_dir / "guest.sock"
    left_over = socket.socket(socket.AF_UNIX)
    left_over.bind(str(sock))
    left_over.close()
    first = _server(sock)
    await first.start()  # replaces the stale one
    try:
        with pytest.raises(LocalApiError, match="another process serves"):
            await _server(sock).start()
    finally:
        await first.stop()
    sock.write_text("not a socket")
    with pytest.raises(LocalApiError, match="exists and is not a socket"):
        await _server(sock).start()
    assert sock.read_text() == "not a socket"
    with pytest.raises(LocalApiError, match="no group named"):
        await _server(socket_dir / "other.sock", group="no-such-group-vmha").start()


async def test_the_daemon_keeps_heartbeating_without_its_socket(
    pty: Pty, socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = socket_dir / "file"
    blocker.write_text("")
    config = make_config(local_api={"socket": str(blocker / "guest.sock")})
    host = ScriptedHost(os.dup(pty.master))
    try:
        async with running(config, SerialPort(pty.path)):
            init = await host.register()
            assert (await host.challenge(init, 5)).heartbeat_response == 5
    finally:
        host.close()
    assert "applications cannot reach the daemon: cannot create" in caplog.text


async def test_a_client_that_does_not_read_its_answers_is_not_read_either(
    pty: Pty, socket_dir: Path
) -> None:
    """Requests without reading the replies: the daemon stops reading from that client
    once 64 replies wait, instead of queueing answers without end."""
    async with guest(pty, socket_dir) as g:
        flood = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        flood.settimeout(WAIT_S)
        await asyncio.to_thread(flood.connect, str(g.sock))
        request = b'{"id": 1, "op": "subscribe", "topics": ["notification"]}\n'
        flood.settimeout(2.0)
        with pytest.raises(TimeoutError):  # the daemon stopped reading: the buffers are full
            await asyncio.to_thread(flood.sendall, request * 200_000)
        outboxes = list(g.run.daemon.events._outboxes)
        assert len(outboxes) == 1
        assert len(outboxes[0]._replies) <= 64
        async with g.client() as other:  # and everybody else is served as usual
            asking = asyncio.create_task(other.status())
            await g.answer_status([member("web-1")])
            await asyncio.wait_for(asking, WAIT_S)
        flood.close()
