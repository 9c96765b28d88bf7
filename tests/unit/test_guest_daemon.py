"""The guest daemon against a scripted host, over a real pty opened with pyserial-asyncio
(the same `SerialPort` the daemon uses on a virtio-serial device), and once over a
socket pair through the `Port` interface. The CLI runs in a subprocess."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from vmha_guest.port import SerialPort
from vmha_protocol.heartbeat import (
    ActionNotify,
    ActionResponse,
    Challenge,
    ChallengeResponse,
    Exit,
    HeartbeatNack,
    Init,
    InitAck,
    NotificationType,
)
from vmha_testbed.guesthost import (
    WAIT_S,
    Pty,
    Running,
    ScriptedHost,
    guest_and_host,
    make_config,
    running,
)

pytestmark = pytest.mark.timeout(60)


async def test_registers_with_the_configured_values(pty: Pty) -> None:
    async with guest_and_host(pty) as (run, host):
        address, init = await host.expect_address(Init)
        assert address == "vmha.heartbeat"
        assert (init.name, init.heartbeat_interval_ms, init.corrective_action) == (
            "test-vm",
            200,
            "reboot",
        )
        assert (init.vote_secs, init.shutdown_notice_secs, init.restart_secs) == (7, 11, 140)
        assert (init.suspend_notice_secs, init.resume_notice_secs) == (12, 13)
        host.send(InitAck(invocation_id=init.invocation_id))
        async with asyncio.timeout(WAIT_S):
            while not (run.daemon.heartbeat and run.daemon.heartbeat.registered):
                await asyncio.sleep(0.02)


async def test_original_group_names_on_request(pty: Pty) -> None:
    async with guest_and_host(pty, make_config(addresses="cgcs")) as (_, host):
        address, init = await host.expect_address(Init)
        assert address == "cgcs.heartbeat"
        host.send(InitAck(invocation_id=init.invocation_id), address="cgcs.heartbeat")
        host.send(
            Challenge(invocation_id=init.invocation_id, heartbeat_challenge=5), "cgcs.heartbeat"
        )
        address, response = await host.expect_address(ChallengeResponse)
        assert (address, response.heartbeat_response) == ("cgcs.heartbeat", 5)


async def test_init_is_sent_again_until_acknowledged(pty: Pty) -> None:
    async with guest_and_host(pty) as (_, host):
        first = await host.expect(Init)
        again = await host.expect(Init)  # no ack yet: re-sent
        assert again.invocation_id == first.invocation_id
        assert again.sequence > first.sequence
        host.send(InitAck(invocation_id=first.invocation_id))
        # Acknowledged: the next message is the answer to a challenge, not another init.
        # (One init may have crossed the ack on the wire.)
        host.send(Challenge(invocation_id=first.invocation_id, heartbeat_challenge=1))
        await host.expect(ChallengeResponse, skip=(Init,))
        await asyncio.sleep(1.0)  # well past the re-send delay of 0.3 s
        response = await host.challenge(first, 2)
        assert response.heartbeat_response == 2
        assert host._inbox.empty()


async def test_challenge_is_answered_with_its_value_and_the_health(
    pty: Pty, tmp_path: Path
) -> None:
    alive = tmp_path / "alive"
    alive.write_text("")
    check = {"name": "app-alive", "type": "file", "path": str(alive), "interval_ms": 100}
    async with guest_and_host(pty, make_config(checks=[check])) as (_, host):
        init = await host.register()
        for value in (0, 123456, 2**32 - 1):
            response = await host.challenge(init, value)
            assert response.heartbeat_response == value
            assert response.invocation_id == init.invocation_id
            assert response.heartbeat_health == "healthy"
            assert response.corrective_action == "reboot"
            assert response.log_msg == ""


async def test_failing_check_makes_the_guest_unhealthy_and_names_it(
    pty: Pty, tmp_path: Path
) -> None:
    flag = tmp_path / "healthy"
    checks = [
        {"name": "ready-flag", "type": "command", "command": ["test", "-e", str(flag)]},
        {"name": "other", "type": "command", "command": ["true"]},
    ]
    async with guest_and_host(pty, make_config(checks=checks)) as (_, host):
        init = await host.register()
        response = await _challenge_until(host, init, lambda r: r.heartbeat_health == "unhealthy")
        assert "ready-flag" in response.log_msg
        assert "other" not in response.log_msg
        assert response.corrective_action == "reboot"
        flag.write_text("")  # the check passes again → healthy
        response = await _challenge_until(host, init, lambda r: r.heartbeat_health == "healthy")
        assert response.log_msg == ""


async def test_a_slow_check_does_not_delay_the_response(pty: Pty) -> None:
    # The check takes 30 s; each answer must come long before that, from the latest
    # results (none yet: healthy until the first result).
    slow = {
        "name": "slow",
        "type": "command",
        "command": ["sleep", "30"],
        "timeout_ms": 60000,
    }
    async with guest_and_host(pty, make_config(checks=[slow])) as (_, host):
        init = await host.register()
        for value in range(3):
            host.send(Challenge(invocation_id=init.invocation_id, heartbeat_challenge=value))
            response = await host.expect(ChallengeResponse, timeout=5.0, skip=(Init,))
            assert (response.heartbeat_response, response.heartbeat_health) == (value, "healthy")


async def test_nack_of_the_registration_registers_again(pty: Pty) -> None:
    async with guest_and_host(pty) as (_, host):
        init = await host.register()
        host.send(
            HeartbeatNack(
                invocation_id=init.invocation_id, log_msg="not registered: send init first"
            )
        )
        again = await host.expect(Init)
        assert again.invocation_id != init.invocation_id


@pytest.mark.parametrize(
    ("log_msg", "registers_again"),
    [
        ("unknown-invocation: invocation 12 is not registered", True),
        ("not-registered: send init first", True),
        # The code decides, not the wording ("init" alone would have matched).
        ("invalid: init.name is longer than 64 bytes", False),
        ("rate-limited: too many init messages", False),
    ],
)
async def test_the_nack_reason_code_decides_whether_to_register_again(
    pty: Pty, log_msg: str, registers_again: bool
) -> None:
    async with guest_and_host(pty) as (_, host):
        init = await host.register()
        host.send(HeartbeatNack(invocation_id=init.invocation_id, log_msg=log_msg))
        if registers_again:
            again = await host.expect(Init)
            assert again.invocation_id != init.invocation_id
        else:
            await asyncio.sleep(0.5)  # longer than the re-register delay (0.2 s)
            response = await host.challenge(init, 3)
            assert response.invocation_id == init.invocation_id
            assert host._inbox.empty()


async def test_heartbeat_unavailable_for_the_vm_is_asked_again_only_rarely(pty: Pty) -> None:
    # A VM in a group with messaging on but heartbeat off: the host refuses every init.
    async with guest_and_host(pty) as (_, host):
        init = await host.expect(Init)
        host.send(
            HeartbeatNack(
                invocation_id=init.invocation_id,
                log_msg="unavailable: heartbeat is not enabled for this VM",
            )
        )
        with pytest.raises(TimeoutError):
            await host.expect(Init, timeout=1.0)  # no retry at the usual 0.3-0.6 s pace
        again = await host.expect(Init, timeout=WAIT_S)
        assert again.invocation_id != init.invocation_id


async def test_other_nacks_are_only_logged(pty: Pty, caplog: pytest.LogCaptureFixture) -> None:
    async with guest_and_host(pty) as (_, host):
        init = await host.register()
        host.send(
            HeartbeatNack(
                invocation_id=init.invocation_id,
                log_msg="heartbeat_response does not match the challenge",
            )
        )
        await asyncio.sleep(0.5)  # longer than the re-register delay (0.2 s)
        response = await host.challenge(init, 9)
        assert response.invocation_id == init.invocation_id
        assert host._inbox.empty()
    assert "does not match the challenge" in caplog.text


async def test_action_notices_are_answered(pty: Pty) -> None:
    async with guest_and_host(pty) as (_, host):
        init = await host.register()
        notices: list[tuple[NotificationType, str]] = [
            ("irrevocable", "complete"),
            ("revocable", "accept"),
        ]
        for notification, vote in notices:
            host.send(
                ActionNotify(
                    invocation_id=init.invocation_id,
                    event_type="reboot",
                    notification_type=notification,
                    timeout_ms=5000,
                )
            )
            answer = await host.expect(ActionResponse)
            assert (answer.event_type, answer.notification_type) == ("reboot", notification)
            assert answer.vote_result == vote


async def test_registers_again_when_challenges_stop(pty: Pty) -> None:
    # interval 100 ms → silence limit max(10 * 0.1 s, rejoin_min 1 s) = 1 s.
    config = make_config(heartbeat={"name": "test-vm", "interval_ms": 100})
    async with guest_and_host(pty, config) as (_, host):
        init = await host.register()
        again = await host.expect(Init)
        assert again.invocation_id != init.invocation_id


async def test_garbage_and_invalid_messages_are_survived(pty: Pty) -> None:
    async with guest_and_host(pty) as (run, host):
        init = await host.register()
        host.send_raw(b'\nnot json at all\n{"version": 1}\n' + b"x" * 9000 + b"\n")
        host.send_raw(
            b'\n{"version":1,"source_addr":"vmha.heartbeat","dest_addr":"vmha.heartbeat",'
            b'"data":{"msg_type":"challenge","version":3,"revision":1}}\n'
        )
        response = await host.challenge(init, 77)
        assert response.heartbeat_response == 77
        assert run.daemon.base.stats.invalid == 2  # {"version": 1} and the bad challenge


async def test_stop_deregisters_with_exit(pty: Pty) -> None:
    async with guest_and_host(pty) as (run, host):
        init = await host.register()
        await run.shutdown()
        leaving = await host.expect(Exit)
        assert leaving.invocation_id == init.invocation_id


async def test_reconnects_after_the_host_goes_away(tmp_path: Path) -> None:
    """Host present (pty A) → gone (the port cannot be opened) → back (pty B): the daemon
    registers again with a new invocation id, and waits with backoff meanwhile."""
    link = tmp_path / "port"
    first = Pty()
    link.symlink_to(first.path)
    host = ScriptedHost(os.dup(first.master))
    async with running(make_config(), SerialPort(str(link))) as run:
        init = await host.register()
        await host.challenge(init, 1)

        link.unlink()
        first.hang_up()
        host.close()
        await _assert_waits_without_spinning(run)

        second = Pty()
        link.symlink_to(second.path)
        host = ScriptedHost(os.dup(second.master))
        try:
            init_again = await host.register()
            assert init_again.invocation_id != init.invocation_id
            response = await host.challenge(init_again, 2)
            assert response.heartbeat_response == 2
        finally:
            await run.shutdown()
            host.close()
            second.hang_up()
        assert run.daemon.stats.connections == 1  # the first; the second was stopped


async def test_waits_on_a_port_it_cannot_poll(caplog: pytest.LogCaptureFixture) -> None:
    # epoll refuses /dev/null: opening it must fail cleanly and be retried with backoff.
    caplog.set_level(logging.INFO, logger="vmha_guest")
    async with running(make_config(), SerialPort("/dev/null")) as run:
        await _assert_waits_without_spinning(run)
    assert "cannot open /dev/null: the event loop cannot wait on it; waiting for it" in caplog.text


async def _assert_waits_without_spinning(run: Running) -> None:
    attempts = run.daemon.stats.open_attempts
    await asyncio.sleep(3.0)
    tries = run.daemon.stats.open_attempts - attempts
    # Backoff 0.1, 0.2, 0.4, 0.5, 0.5 … s: about 8 in 3 s. A busy loop would make
    # thousands; allow plenty for a slow machine.
    assert 2 <= tries <= 40


class SocketPairPort:
    """The `Port` interface over one end of a socket pair (no serial device at all)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    def describe(self) -> str:
        return "socketpair"

    async def open(self, protocol: asyncio.Protocol) -> asyncio.Transport:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_unix_connection(lambda: protocol, sock=self._sock)
        return transport


async def test_daemon_runs_over_any_port(tmp_path: Path) -> None:
    guest_end, host_end = socket.socketpair()
    host = ScriptedHost(host_end.detach())
    try:
        async with running(make_config(), SocketPairPort(guest_end)):
            init = await host.register()
            response = await host.challenge(init, 31337)
            assert response.heartbeat_response == 31337
    finally:
        host.close()


async def _challenge_until(
    host: ScriptedHost, init: Init, condition: Any, attempts: int = 100
) -> ChallengeResponse:
    for value in range(attempts):
        response = await host.challenge(init, value)
        if condition(response):
            return response
        await asyncio.sleep(0.1)
    raise AssertionError(f"no matching response in {attempts} challenges")


# -- the CLI, as a process ---------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vmha_guest", *args]


async def _wait_process(process: asyncio.subprocess.Process) -> tuple[int, str]:
    async with asyncio.timeout(WAIT_S):
        _, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def test_cli_exits_cleanly_on_sigterm(pty: Pty, tmp_path: Path) -> None:
    config = tmp_path / "guest.toml"
    config.write_text(
        '[heartbeat]\nname = "cli-vm"\ninterval_ms = 500\n\n[local_api]\nenabled = false\n'
    )
    host = ScriptedHost(os.dup(pty.master))
    process = await asyncio.create_subprocess_exec(
        *_cli("run", "--config", str(config), "--port", pty.path, "--log-level", "debug"),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        init = await host.register()
        assert init.name == "cli-vm"
        response = await host.challenge(init, 4242)
        assert response.heartbeat_response == 4242
        process.send_signal(signal.SIGTERM)
        leaving = await host.expect(Exit, skip=(Init,))
        assert leaving.invocation_id == init.invocation_id
        returncode, stderr = await _wait_process(process)
    finally:
        host.close()
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert returncode == 0, stderr
    assert "stopping on SIGTERM" in stderr
    assert "registered as 'cli-vm'" in stderr


async def test_cli_waits_for_a_missing_port_and_stops_on_sigint(
    tmp_path: Path, socket_dir: Path
) -> None:
    # Every key at its default but the socket's path (the default is /run/vmha/guest.sock).
    sock = socket_dir / "guest.sock"
    config = tmp_path / "guest.toml"
    config.write_text(f'[local_api]\nsocket = "{sock}"\n')
    process = await asyncio.create_subprocess_exec(
        *_cli("run", "--config", str(config), "--port", str(tmp_path / "no-such-port")),
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    async with asyncio.timeout(WAIT_S):
        line = b""
        while b"waiting for it" not in line:
            line = await process.stderr.readline()
            assert line, "the daemon exited instead of waiting for the port"
    assert sock.is_socket()  # applications can connect while the host is away
    assert sock.stat().st_mode & 0o777 == 0o660
    process.send_signal(signal.SIGINT)
    returncode, _ = await _wait_process(process)
    assert returncode == 0
    assert not sock.exists()  # removed on the way out


async def test_cli_reports_configuration_errors(tmp_path: Path) -> None:
    config = tmp_path / "guest.toml"
    config.write_text('[heartbeat]\ninterval_ms = "fast"\n\n[[checks]]\nname = "x"\ntype = "ftp"\n')
    process = await asyncio.create_subprocess_exec(
        *_cli("run", "--config", str(config)), stderr=asyncio.subprocess.PIPE
    )
    returncode, stderr = await _wait_process(process)
    assert returncode == 2
    assert f"vmha-guest: {config}: 2 problems:" in stderr
    assert "heartbeat.interval_ms: Input should be a valid integer" in stderr
    assert "checks[0]: Input tag 'ftp'" in stderr
    assert "Traceback" not in stderr
